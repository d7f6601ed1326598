/*
 * C harness for the ztna agent C ABI: what the macOS packet tunnel provider does,
 * in plain C against the static library. It owns the UDP socket and the timer
 * (poll(2) with the agent's next timeout) and plays the tunnel itself: it builds
 * IPv4 packets, feeds them with ztna_agent_tun_input and checks what
 * ztna_agent_poll_tun returns, byte for byte.
 *
 * Usage: harness INTERMEDIATE_PORT CA_PEM CERT_PEM KEY_PEM
 * The intermediate listens on 127.0.0.1:INTERMEDIATE_PORT; a connector serves
 * "echo" (UDP echo behind 10.100.0.1) and "web" (a TCP listener behind 10.100.0.2).
 * The PEM files are read into memory first: the library takes bytes (on macOS
 * they come from the keychain), never paths.
 *
 * Exit status 0 when every check passed; the last line says how many did.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "ztna_agent.h"

static int passed, failed;

static void check(int ok, const char *what, ...) {
    va_list ap;
    va_start(ap, what);
    if (ok) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL: ");
        vfprintf(stderr, what, ap);
        fprintf(stderr, "\n");
    }
    va_end(ap);
}

static void die(const char *what) {
    fprintf(stderr, "fatal: %s\n", what);
    exit(2);
}

static uint8_t *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die(path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc((size_t)n);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) die(path);
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void log_cb(void *ctx, enum ztna_log_level level, const char *msg) {
    /* Counts lines so main can check that the callback got the context back. */
    int *lines = ctx;
    (*lines)++;
    if (level <= ZTNA_LOG_LEVEL_WARN) fprintf(stderr, "agent: %s\n", msg);
}

/* ---- the "tunnel": packets the agent produced, kept until checked ----------- */

#define MAX_TUN 64
static uint8_t tun_pkts[MAX_TUN][ZTNA_MAX_PACKET];
static size_t tun_lens[MAX_TUN];
static int tun_count;

static struct ztna_agent *agent;
static int sock;

static struct ztna_sockaddr to_z(const struct sockaddr_in *a) {
    struct ztna_sockaddr z;
    memset(&z, 0, sizeof z);
    z.family = 4;
    z.port = ntohs(a->sin_port);
    memcpy(z.addr, &a->sin_addr.s_addr, 4);
    return z;
}

static struct sockaddr_in from_z(const struct ztna_sockaddr *z) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(z->port);
    memcpy(&a.sin_addr.s_addr, z->addr, 4);
    return a;
}

/* Sends every datagram and keeps every tunnel packet the agent has ready. */
static void flush(void) {
    uint8_t buf[ZTNA_MAX_DATAGRAM];
    size_t len;
    struct ztna_sockaddr to;
    enum ztna_error r;
    while ((r = ztna_agent_poll_udp(agent, buf, sizeof buf, &len, &to)) == ZTNA_ERROR_OK) {
        if (to.family != 4) continue; /* the harness has an IPv4 socket only */
        struct sockaddr_in dst = from_z(&to);
        sendto(sock, buf, len, 0, (struct sockaddr *)&dst, sizeof dst);
    }
    if (r != ZTNA_ERROR_NOTHING) die(ztna_error_message(r));
    while (tun_count < MAX_TUN &&
           (r = ztna_agent_poll_tun(agent, tun_pkts[tun_count], ZTNA_MAX_PACKET, &len)) ==
               ZTNA_ERROR_OK) {
        tun_lens[tun_count++] = len;
    }
    if (tun_count < MAX_TUN && r != ZTNA_ERROR_NOTHING) die(ztna_error_message(r));
}

/* One turn of the driver loop: wait for the socket or the timer, feed, flush. */
static void turn(void) {
    uint64_t ms = 5;
    enum ztna_error r = ztna_agent_next_timeout_ms(agent, &ms);
    if (r == ZTNA_ERROR_NOTHING || ms > 5) ms = 5;
    struct pollfd p = {.fd = sock, .events = POLLIN};
    poll(&p, 1, (int)ms);
    uint8_t buf[2048];
    for (;;) {
        struct sockaddr_in from;
        socklen_t fl = sizeof from;
        ssize_t n = recvfrom(sock, buf, sizeof buf, MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
        if (n <= 0) break;
        struct ztna_sockaddr z = to_z(&from);
        r = ztna_agent_udp_input(agent, buf, (size_t)n, &z);
        if (r != ZTNA_ERROR_OK) die(ztna_error_message(r));
    }
    r = ztna_agent_on_timeout(agent);
    if (r != ZTNA_ERROR_OK) die(ztna_error_message(r));
    flush();
}

typedef int (*cond_fn)(void);

static int wait_for(cond_fn done, double secs) {
    double deadline = now_s() + secs;
    while (!done()) {
        if (now_s() > deadline) return 0;
        turn();
    }
    return 1;
}

/* ---- packets ----------------------------------------------------------------- */

static uint32_t sum16(const uint8_t *b, size_t n, uint32_t s) {
    for (size_t i = 0; i + 1 < n; i += 2) s += (uint32_t)(b[i] << 8 | b[i + 1]);
    if (n & 1) s += (uint32_t)(b[n - 1] << 8);
    return s;
}

static uint16_t fold(uint32_t s) {
    while (s > 0xffff) s = (s & 0xffff) + (s >> 16);
    return (uint16_t)~s;
}

static void ipv4_header(uint8_t *p, size_t total, uint8_t proto, const uint8_t src[4],
                        const uint8_t dst[4]) {
    memset(p, 0, 20);
    p[0] = 0x45;
    p[2] = (uint8_t)(total >> 8);
    p[3] = (uint8_t)total;
    p[8] = 64;
    p[9] = proto;
    memcpy(p + 12, src, 4);
    memcpy(p + 16, dst, 4);
    uint16_t c = fold(sum16(p, 20, 0));
    p[10] = (uint8_t)(c >> 8);
    p[11] = (uint8_t)c;
}

static uint32_t pseudo(const uint8_t *ip, uint8_t proto, size_t len) {
    uint32_t s = sum16(ip + 12, 8, 0);
    return s + proto + (uint32_t)len;
}

static size_t build_udp(uint8_t *p, const uint8_t src[4], uint16_t sport, const uint8_t dst[4],
                        uint16_t dport, const uint8_t *payload, size_t n) {
    size_t total = 28 + n;
    ipv4_header(p, total, 17, src, dst);
    uint8_t *u = p + 20;
    u[0] = (uint8_t)(sport >> 8);
    u[1] = (uint8_t)sport;
    u[2] = (uint8_t)(dport >> 8);
    u[3] = (uint8_t)dport;
    u[4] = (uint8_t)((8 + n) >> 8);
    u[5] = (uint8_t)(8 + n);
    u[6] = u[7] = 0;
    memcpy(u + 8, payload, n);
    uint16_t c = fold(sum16(u, 8 + n, pseudo(p, 17, 8 + n)));
    if (c == 0) c = 0xffff;
    u[6] = (uint8_t)(c >> 8);
    u[7] = (uint8_t)c;
    return total;
}

static size_t build_syn(uint8_t *p, const uint8_t src[4], uint16_t sport, const uint8_t dst[4],
                        uint16_t dport, uint32_t seq) {
    size_t total = 20 + 24;
    ipv4_header(p, total, 6, src, dst);
    uint8_t *t = p + 20;
    memset(t, 0, 24);
    t[0] = (uint8_t)(sport >> 8);
    t[1] = (uint8_t)sport;
    t[2] = (uint8_t)(dport >> 8);
    t[3] = (uint8_t)dport;
    t[4] = (uint8_t)(seq >> 24);
    t[5] = (uint8_t)(seq >> 16);
    t[6] = (uint8_t)(seq >> 8);
    t[7] = (uint8_t)seq;
    t[12] = 6 << 4; /* 24-byte header: MSS option */
    t[13] = 0x02;   /* SYN */
    t[14] = t[15] = 0xff;
    t[20] = 2;
    t[21] = 4;
    t[22] = 0x04; /* MSS 1240 */
    t[23] = 0xd8;
    uint16_t c = fold(sum16(t, 24, pseudo(p, 6, 24)));
    t[16] = (uint8_t)(c >> 8);
    t[17] = (uint8_t)c;
    return total;
}

/* ---- conditions ------------------------------------------------------------- */

static struct ztna_tunnel_info info;
static struct ztna_prefix prefixes[8];
static size_t prefix_count;

static int routes_ready(void) {
    enum ztna_error r = ztna_agent_routes(agent, &info, prefixes, 8, &prefix_count);
    return r == ZTNA_ERROR_OK && info.has_address && prefix_count == 2;
}

static const uint8_t ECHO_VIP[4] = {10, 100, 0, 1};
static const uint8_t WEB_VIP[4] = {10, 100, 0, 2};
static uint8_t want[ZTNA_MAX_PACKET];
static size_t want_len;

/* A tunnel packet equal to `want` byte for byte (the UDP header and payload, the
 * addresses, the protocol, the lengths), but for the IPv4 fields the replying
 * stack chooses: TOS, id, flags, TTL and so the header checksum (bytes 1, 4-8,
 * 10-11). */
static int reply_seen(void) {
    for (int i = 0; i < tun_count; i++) {
        if (tun_lens[i] != want_len) continue;
        if (tun_pkts[i][0] == want[0] && memcmp(tun_pkts[i] + 2, want + 2, 2) == 0 &&
            tun_pkts[i][9] == want[9] &&
            memcmp(tun_pkts[i] + 12, want + 12, want_len - 12) == 0)
            return 1;
    }
    return 0;
}

static uint32_t syn_seq = 7000;
static int synack_seen(void) {
    for (int i = 0; i < tun_count; i++) {
        const uint8_t *p = tun_pkts[i];
        if (tun_lens[i] < 40 || p[9] != 6) continue;
        const uint8_t *t = p + (p[0] & 0xf) * 4;
        uint32_t ack = (uint32_t)t[8] << 24 | (uint32_t)t[9] << 16 | (uint32_t)t[10] << 8 | t[11];
        if (memcmp(p + 12, WEB_VIP, 4) == 0 && memcmp(p + 16, info.ipv4, 4) == 0 && t[0] == 0 &&
            t[1] == 80 && t[2] == (40001 >> 8) && t[3] == (40001 & 0xff) &&
            (t[13] & 0x12) == 0x12 && ack == syn_seq + 1)
            return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 5) die("usage: harness INTERMEDIATE_PORT CA_PEM CERT_PEM KEY_PEM");
    size_t ca_len, cert_len, key_len;
    uint8_t *ca = read_file(argv[2], &ca_len);
    uint8_t *cert = read_file(argv[3], &cert_len);
    uint8_t *key = read_file(argv[4], &key_len);

    sock = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in local = {.sin_family = AF_INET};
    local.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (sock < 0 || bind(sock, (struct sockaddr *)&local, sizeof local) != 0) die("bind");
    socklen_t ll = sizeof local;
    getsockname(sock, (struct sockaddr *)&local, &ll);

    struct sockaddr_in inter = {.sin_family = AF_INET};
    inter.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    inter.sin_port = htons((uint16_t)atoi(argv[1]));

    const char *services[] = {"echo", "web"};
    int log_lines = 0;
    struct ztna_agent_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.intermediate = to_z(&inter);
    cfg.server_name = "intermediate.ztna";
    cfg.ca_pem = ca;
    cfg.ca_pem_len = ca_len;
    cfg.cert_pem = cert;
    cfg.cert_pem_len = cert_len;
    cfg.key_pem = key;
    cfg.key_pem_len = key_len;
    cfg.services = services;
    cfg.services_len = 2;
    cfg.local = to_z(&local);
    cfg.options = ZTNA_OPT_DATA_PATH;
    cfg.log_level = ZTNA_LOG_LEVEL_INFO;
    cfg.log = log_cb;
    cfg.log_ctx = &log_lines;

    /* Bad input first: errors, not crashes. */
    struct ztna_agent *none = NULL;
    check(ztna_agent_new(NULL, &none) == ZTNA_ERROR_NULL_POINTER && none == NULL, "null config");
    const char *bad_services[] = {"e\xff"};
    cfg.services = bad_services;
    cfg.services_len = 1;
    check(ztna_agent_new(&cfg, &none) == ZTNA_ERROR_INVALID_UTF8 && none == NULL, "bad UTF-8");
    cfg.services = services;
    cfg.services_len = 2;
    check(ztna_agent_poll_tun(NULL, want, sizeof want, &want_len) == ZTNA_ERROR_NULL_POINTER,
          "null handle");
    check(strcmp(ztna_error_message(ZTNA_ERROR_BUFFER_TOO_SMALL), "ok") != 0 &&
              strlen(ztna_error_message(12345)) > 0,
          "error messages");

    enum ztna_error r = ztna_agent_new(&cfg, &agent);
    check(r == ZTNA_ERROR_OK && agent != NULL, "ztna_agent_new: %s", ztna_error_message(r));
    if (!agent) return 1;
    /* The library copied what it needs. */
    memset(key, 0, key_len);
    free(ca);
    free(cert);
    free(key);

    /* Too small a buffer: the needed size, then the datagram with a big one. */
    uint8_t small[8];
    size_t need = 0;
    struct ztna_sockaddr to;
    r = ztna_agent_poll_udp(agent, small, sizeof small, &need, &to);
    check(r == ZTNA_ERROR_BUFFER_TOO_SMALL && need > sizeof small && need <= ZTNA_MAX_DATAGRAM,
          "too-small buffer reports the size (%d, %zu)", r, need);
    flush();

    check(wait_for(routes_ready, 60), "tunnel address and two routes");
    int have_echo = 0, have_web = 0;
    for (size_t i = 0; i < prefix_count; i++) {
        have_echo |= prefixes[i].family == 4 && prefixes[i].prefix_len == 32 &&
                     memcmp(prefixes[i].addr, ECHO_VIP, 4) == 0;
        have_web |= prefixes[i].family == 4 && prefixes[i].prefix_len == 32 &&
                    memcmp(prefixes[i].addr, WEB_VIP, 4) == 0;
    }
    check(have_echo && have_web, "routes are 10.100.0.1/32 and 10.100.0.2/32");
    check(info.mtu == 1280, "mtu 1280 (%u)", info.mtu);

    /* Status JSON: size first, then the text. */
    size_t jlen = 0;
    r = ztna_agent_status_json(agent, NULL, 0, &jlen);
    check(r == ZTNA_ERROR_BUFFER_TOO_SMALL && jlen > 0, "status size");
    char *json = malloc(jlen + 1);
    r = ztna_agent_status_json(agent, json, jlen + 1, &jlen);
    check(r == ZTNA_ERROR_OK && strlen(json) == jlen && strstr(json, "\"connected\":true") &&
              strstr(json, "\"name\":\"web\"") && strstr(json, "\"standby\":") &&
              strstr(json, "\"relays\":[{\"address\":"),
          "status JSON: %s", json);
    free(json);

    /* UDP echo: the reply is our packet with addresses and ports swapped. */
    const char *payloads[] = {"hello from C", "a second, longer datagram through the tunnel"};
    for (int k = 0; k < 2; k++) {
        uint8_t pkt[ZTNA_MAX_PACKET];
        size_t n = build_udp(pkt, info.ipv4, 40000, ECHO_VIP, 7, (const uint8_t *)payloads[k],
                             strlen(payloads[k]));
        want_len = build_udp(want, ECHO_VIP, 7, info.ipv4, 40000, (const uint8_t *)payloads[k],
                             strlen(payloads[k]));
        tun_count = 0;
        r = ztna_agent_tun_input(agent, pkt, n);
        check(r == ZTNA_ERROR_OK, "tun input");
        flush();
        check(wait_for(reply_seen, 30), "UDP echo reply %d byte for byte", k);
    }

    /* TCP handshake to the web service. */
    {
        uint8_t pkt[64];
        size_t n = build_syn(pkt, info.ipv4, 40001, WEB_VIP, 80, syn_seq);
        tun_count = 0;
        check(ztna_agent_tun_input(agent, pkt, n) == ZTNA_ERROR_OK, "SYN input");
        flush();
        check(wait_for(synack_seen, 30), "SYN-ACK from 10.100.0.2:80");
    }

    /* Wake from sleep: one interface address. */
    struct ztna_sockaddr addrs[1] = {to_z(&local)};
    check(ztna_agent_network_changed(agent, addrs, 1) == ZTNA_ERROR_OK, "network changed");

    /* The relay list: the one intermediate again changes nothing; none is refused. */
    struct ztna_sockaddr relays[1] = {to_z(&inter)};
    check(ztna_agent_set_relays(agent, relays, 1) == ZTNA_ERROR_OK, "same relays");
    check(ztna_agent_set_relays(agent, NULL, 0) == ZTNA_ERROR_INVALID_LENGTH, "no relays");

    check(log_lines > 0, "log callback got its context (%d lines)", log_lines);

    check(ztna_agent_close(agent) == ZTNA_ERROR_OK, "close");
    flush();
    ztna_agent_free(agent);
    close(sock);

    printf("c harness: %d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
