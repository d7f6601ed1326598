//! The ztna XDP relay: forwards relayed QUIC packets by destination connection ID.
//!
//! Ethernet → IPv4 (no options, not a fragment) or IPv6 (the fixed 40-byte header
//! followed directly by UDP; extension headers pass) → UDP to the relay port → to
//! one of the relay's own addresses (`ZTNA_LOCAL_ADDRS`, `ZTNA_LOCAL_ADDRS6`) →
//! (IPv6: a UDP checksum, which IPv6 requires) → QUIC DCID (short header: the 8
//! bytes after the first byte; long header: version, a DCID length of 8, the DCID)
//! → the frame holds the whole IP packet, and the IP packet the headers up to the
//! DCID → relay CID marker → the CID's relay ID is this relay's (`ZTNA_CONFIG`) →
//! `ZTNA_RELAY` (IPv4) or `ZTNA_RELAY6` (IPv6) lookup → sender check →
//! `bpf_fib_lookup` (AF_INET or AF_INET6) for the new destination (cached per
//! session and CPU for a second) → rewrite
//! (source = the relay's own address and port, i.e. the packet's destination;
//! destination = the peer; TTL / hop limit 64, as the userspace forwarder's own
//! sends) with incremental IP (IPv4) and UDP checksum updates; a UDP checksum that
//! comes out 0 is sent as 0xffff (RFC 768; for IPv6, 0 would be invalid) →
//! `XDP_TX` or `bpf_redirect`. Anything else is `XDP_PASS` to the
//! kernel and the intermediate's userspace forwarder, which also handles sender
//! changes (NAT rebinding) and peers without a route or neighbour entry yet.
//! Each decision increments one per-CPU counter of `ZTNA_STATS` (`Verdict`) and adds
//! the frame's length to the same slot of `ZTNA_STATS_BYTES`.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::btf_maps::{Array, HashMap, PerCpuArray, PerCpuHashMap};
use aya_ebpf::helpers::generated::{bpf_fib_lookup, bpf_ktime_get_coarse_ns, bpf_redirect};
use aya_ebpf::macros::{btf_map, xdp};
use aya_ebpf::programs::XdpContext;
use ztna_common::relay::{
    MAX_LOCAL_ADDRS, MAX_RELAY_ENTRIES, NEXTHOP_CACHE_NS, NextHop, NextHop6, RELAY_CID_LEN,
    RELAY_CID_MARKER, RELAY_ID_OFFSET, RelayConfig, RelayEntry, RelayEntry6, RelayKey,
    SessionStats, SessionStats6, VERDICT_COUNT, Verdict,
};

#[btf_map]
static ZTNA_RELAY: HashMap<RelayKey, RelayEntry, { MAX_RELAY_ENTRIES as usize }> = HashMap::new();

#[btf_map]
static ZTNA_SESSION_STATS: PerCpuHashMap<RelayKey, SessionStats, { MAX_RELAY_ENTRIES as usize }> =
    PerCpuHashMap::new();

#[btf_map]
static ZTNA_STATS: PerCpuArray<u64, { VERDICT_COUNT as usize }> = PerCpuArray::new();

#[btf_map]
static ZTNA_STATS_BYTES: PerCpuArray<u64, { VERDICT_COUNT as usize }> = PerCpuArray::new();

#[btf_map]
static ZTNA_CONFIG: Array<RelayConfig, 1> = Array::new();

/// The relay's own IPv4 addresses (network order) → `LOCAL_ADDR_PRESENT`.
#[btf_map]
static ZTNA_LOCAL_ADDRS: HashMap<u32, u8, { MAX_LOCAL_ADDRS as usize }> = HashMap::new();

#[btf_map]
static ZTNA_RELAY6: HashMap<RelayKey, RelayEntry6, { MAX_RELAY_ENTRIES as usize }> = HashMap::new();

#[btf_map]
static ZTNA_SESSION_STATS6: PerCpuHashMap<RelayKey, SessionStats6, { MAX_RELAY_ENTRIES as usize }> =
    PerCpuHashMap::new();

/// The relay's own IPv6 addresses (the 16 bytes) → `LOCAL_ADDR_PRESENT`.
#[btf_map]
static ZTNA_LOCAL_ADDRS6: HashMap<[u8; 16], u8, { MAX_LOCAL_ADDRS as usize }> = HashMap::new();

/// TTL of forwarded packets: the relay sends them as their new source, like the
/// userspace forwarder's socket does, so they start over.
const RELAY_TTL: u8 = 64;

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const UDP_LEN: usize = 8;
const IP6_LEN: usize = 40;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_UDP: u8 = 17;
/// IPv6 next-header values of extension headers (RFC 8200 §4, IANA "IPv6
/// Extension Header Types"): hop-by-hop, routing, destination options, AH,
/// mobility, HIP, shim6, experimental. Fragment (44) is told apart.
const IPV6_EXT_HEADERS: [u8; 9] = [0, 43, 60, 51, 135, 139, 140, 253, 254];
const IPPROTO_FRAGMENT: u8 = 44;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IP_OFF: usize = ETH_LEN;
const UDP_OFF: usize = ETH_LEN + IP_LEN;
const QUIC_OFF: usize = UDP_OFF + UDP_LEN;
const UDP6_OFF: usize = ETH_LEN + IP6_LEN;
const QUIC6_OFF: usize = UDP6_OFF + UDP_LEN;

/// `struct bpf_fib_lookup` (64 bytes) with the members we use. For AF_INET6
/// `src`/`dst` hold the whole addresses and `tos` is the flow info.
#[repr(C)]
struct FibParams {
    family: u8,
    l4_protocol: u8,
    sport: u16,
    dport: u16,
    tot_len: u16,
    ifindex: u32,
    tos: u32,
    src: [u32; 4],
    dst: [u32; 4],
    vlan: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
}

#[xdp]
pub fn ztna_relay(ctx: XdpContext) -> u32 {
    let (action, verdict) = try_ztna_relay(&ctx);
    count(verdict, ctx.data_end() - ctx.data());
    action
}

/// Passes everything. Attached to the peer end of a veth pair that receives XDP_TX
/// or redirected frames: veth only delivers those if the peer runs an XDP program.
#[xdp]
pub fn ztna_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The benchmarks' calibration: swaps the Ethernet addresses and sends the frame
/// back (`XDP_TX`), the least any XDP forwarder does. Its cost under
/// `BPF_PROG_TEST_RUN` next to `ztna_relay`'s makes the relay's figure comparable
/// across machines. Never attached by the intermediate.
#[xdp]
pub fn ztna_minimal(ctx: XdpContext) -> u32 {
    let Some(eth) = ptr_at::<[u8; 12]>(&ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: ptr_at checked that 12 bytes are in the packet.
    unsafe {
        let mut macs = eth.read_unaligned();
        let (dst, src) = macs.split_at_mut(6);
        dst.swap_with_slice(src);
        eth.write_unaligned(macs);
    }
    xdp_action::XDP_TX
}

#[inline(always)]
fn count(v: Verdict, len: usize) {
    if let Some(c) = ZTNA_STATS.get_ptr_mut(v as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *c += 1 };
    }
    if let Some(b) = ZTNA_STATS_BYTES.get_ptr_mut(v as u32) {
        // SAFETY: as above.
        unsafe { *b += len as u64 };
    }
}

/// The one bounds check: a pointer to a `T` at `offset`, if the packet holds it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: ptr_at checked the bounds; unaligned because packet fields are.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { p.read_unaligned() })
}

/// RFC 1624 eqn. 3 for one 16-bit word: HC' = ~(~HC + ~m + m').
#[inline(always)]
fn csum_replace16(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The same for a 32-bit field (two words). Values as read from the packet.
#[inline(always)]
fn csum_replace32(check: u16, old: u32, new: u32) -> u16 {
    let c = csum_replace16(check, old as u16, new as u16);
    csum_replace16(c, (old >> 16) as u16, (new >> 16) as u16)
}

const PASS: u32 = xdp_action::XDP_PASS;

/// The packet's checks and rewrite up to the point where IPv4 and IPv6 differ.
fn try_ztna_relay(ctx: &XdpContext) -> (u32, Verdict) {
    let Some(ethertype) = read::<u16>(ctx, 12) else {
        return (PASS, Verdict::PassTruncated);
    };
    let Some(config) = ZTNA_CONFIG.get(0).copied() else {
        return (PASS, Verdict::PassNotConfigured);
    };
    match u16::from_be(ethertype) {
        ETH_P_IP => relay_ipv4(ctx, &config),
        ETH_P_IPV6 => relay_ipv6(ctx, &config),
        _ => (PASS, Verdict::PassNotIp),
    }
}

/// The QUIC DCID at `quic_off` and where it starts, if it is a relay CID of this
/// relay; `ip_end` is where the IP packet ends (its length field), checked against
/// the frame and the DCID.
#[inline(always)]
fn relay_cid(
    ctx: &XdpContext,
    quic_off: usize,
    ip_end: usize,
    config: &RelayConfig,
) -> Result<[u8; RELAY_CID_LEN], Verdict> {
    let first = read::<u8>(ctx, quic_off).ok_or(Verdict::PassTruncated)?;
    let dcid_off = if first & 0x80 == 0 {
        quic_off + 1
    } else {
        let len = read::<u8>(ctx, quic_off + 5).ok_or(Verdict::PassTruncated)?;
        if len as usize != RELAY_CID_LEN {
            return Err(Verdict::PassNotRelayCid);
        }
        quic_off + 6
    };
    let cid = read::<[u8; RELAY_CID_LEN]>(ctx, dcid_off).ok_or(Verdict::PassTruncated)?;
    // A frame that ends before its IP length lost bytes on the way, and an IP
    // packet whose length ends before the DCID does not hold the headers just
    // read (they lie in the Ethernet padding): the receiver's kernel would drop
    // either, so relaying them only wastes the peer's link.
    if ip_end > ctx.data_end() - ctx.data() || ip_end < dcid_off + RELAY_CID_LEN {
        return Err(Verdict::PassTruncated);
    }
    if cid[0] != RELAY_CID_MARKER {
        return Err(Verdict::PassNotRelayCid);
    }
    // Another relay's CID (QUIC-LB relay ID, network order like the config's).
    if u16::from_ne_bytes([cid[RELAY_ID_OFFSET], cid[RELAY_ID_OFFSET + 1]]) != config.relay_id {
        return Err(Verdict::PassOtherRelay);
    }
    Ok(cid)
}

// Not inlined: each family's path gets a stack frame of its own rather than one
// frame holding both (the BPF stack is 512 bytes).
#[inline(never)]
fn relay_ipv4(ctx: &XdpContext, config: &RelayConfig) -> (u32, Verdict) {
    // IPv4 header, fixed 20 bytes.
    let Some(ver_ihl) = read::<u8>(ctx, IP_OFF) else {
        return (PASS, Verdict::PassTruncated);
    };
    if ver_ihl >> 4 != 4 {
        return (PASS, Verdict::PassNotIp);
    }
    if ver_ihl != 0x45 {
        return (PASS, Verdict::PassIpOptions);
    }
    let Some(ip) = read::<[u8; IP_LEN]>(ctx, IP_OFF) else {
        return (PASS, Verdict::PassTruncated);
    };
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & 0x3fff != 0 {
        return (PASS, Verdict::PassFragment);
    }
    if ip[9] != IPPROTO_UDP {
        return (PASS, Verdict::PassNotUdp);
    }
    // UDP to the relay port.
    let Some(udp) = read::<[u16; 4]>(ctx, UDP_OFF) else {
        return (PASS, Verdict::PassTruncated);
    };
    let (sport, dport, udp_check) = (udp[0], udp[1], udp[3]);
    if config.port == 0 {
        return (PASS, Verdict::PassNotConfigured);
    }
    if dport != config.port {
        return (PASS, Verdict::PassOtherPort);
    }
    // To the relay itself: its socket only receives packets to its own addresses, so
    // anything else (a relay CID on its way to another host's port) is not ours to
    // forward, and the rewrite would give it a source address that is not ours. An
    // empty map holds no local address, so nothing is forwarded.
    let daddr = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    if ZTNA_LOCAL_ADDRS.get_ptr(daddr).is_none() {
        return (PASS, Verdict::PassNotLocalAddress);
    }
    let ip_end = IP_OFF + usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let cid = match relay_cid(ctx, QUIC_OFF, ip_end, config) {
        Ok(c) => c,
        Err(v) => return (PASS, v),
    };
    let key = RelayKey { cid };
    // SAFETY: the value is copied out at once; userspace replaces whole entries.
    let Some(entry) = (unsafe { ZTNA_RELAY.get(key) }).copied() else {
        return (PASS, Verdict::PassUnknownCid);
    };
    let saddr = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    if saddr != entry.expected_src_addr || sport != entry.expected_src_port {
        return (PASS, Verdict::PassSenderMismatch);
    }
    // SAFETY: plain helper call.
    // The coarse clock (jiffies resolution) is ample for "last seen" and the route
    // cache, and several times cheaper than the precise one in a VM.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: reading the xdp_md context field.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    // Route and neighbour for the new destination, before touching the packet:
    // this CPU's cached lookup for this session, else one bpf_fib_lookup.
    let session = ZTNA_SESSION_STATS.get_ptr_mut(key);
    // SAFETY: per-CPU value, only this CPU touches it while we run.
    let cached = session
        .map(|s| unsafe { (*s).next_hop })
        .filter(|h| h.expires_ns > now && h.peer_addr == entry.peer_addr);
    let hop = match cached {
        Some(h) => h,
        None => match route(ctx, &ip, daddr, dport, &entry, ingress) {
            Some(mut h) => {
                h.expires_ns = now + NEXTHOP_CACHE_NS;
                if let Some(s) = session {
                    // SAFETY: as above.
                    unsafe { (*s).next_hop = h };
                }
                h
            }
            None => return (PASS, Verdict::PassFibMiss),
        },
    };
    // Rewrite. From here on a failure is XDP_ABORTED.
    let (Some(eth), Some(iph), Some(udph)) = (
        ptr_at::<[u8; 12]>(ctx, 0),
        ptr_at::<[u8; IP_LEN]>(ctx, IP_OFF),
        ptr_at::<[u16; 4]>(ctx, UDP_OFF),
    ) else {
        return (xdp_action::XDP_ABORTED, Verdict::Aborted);
    };
    let new_saddr = daddr;
    let new_daddr = entry.peer_addr;
    let new_sport = dport;
    let new_dport = entry.peer_port;
    // SAFETY: all three pointers were bounds-checked by ptr_at.
    unsafe {
        let e = &mut *eth;
        e[..6].copy_from_slice(&hop.dmac);
        e[6..].copy_from_slice(&hop.smac);

        let h = &mut *iph;
        let mut ip_check = u16::from_ne_bytes([h[10], h[11]]);
        // TTL shares a 16-bit word with the protocol.
        let old_ttl_word = u16::from_ne_bytes([h[8], h[9]]);
        h[8] = RELAY_TTL;
        let new_ttl_word = u16::from_ne_bytes([h[8], h[9]]);
        ip_check = csum_replace16(ip_check, old_ttl_word, new_ttl_word);
        ip_check = csum_replace32(ip_check, saddr, new_saddr);
        ip_check = csum_replace32(ip_check, daddr, new_daddr);
        h[10..12].copy_from_slice(&ip_check.to_ne_bytes());
        h[12..16].copy_from_slice(&new_saddr.to_ne_bytes());
        h[16..20].copy_from_slice(&new_daddr.to_ne_bytes());

        let u = &mut *udph;
        u[0] = new_sport;
        u[1] = new_dport;
        if udp_check != 0 {
            // Pseudo-header addresses and both ports changed.
            let mut c = csum_replace32(udp_check, saddr, new_saddr);
            c = csum_replace32(c, daddr, new_daddr);
            c = csum_replace16(c, sport, new_sport);
            c = csum_replace16(c, dport, new_dport);
            u[3] = if c == 0 { 0xffff } else { c };
        }
    }
    if let Some(s) = session {
        // SAFETY: per-CPU value, only this CPU writes it while we run.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += (ctx.data_end() - ctx.data()) as u64;
            (*s).last_seen_ns = now;
        }
    }
    send(hop.ifindex, ingress)
}

/// XDP_TX back out of the ingress interface, else a redirect.
#[inline(always)]
fn send(ifindex: u32, ingress: u32) -> (u32, Verdict) {
    if ifindex == ingress {
        (xdp_action::XDP_TX, Verdict::Tx)
    } else {
        // SAFETY: plain helper call.
        let action = unsafe { bpf_redirect(ifindex, 0) } as u32;
        (action, Verdict::Redirect)
    }
}

#[inline(never)]
fn relay_ipv6(ctx: &XdpContext, config: &RelayConfig) -> (u32, Verdict) {
    // IPv6 fixed header: version/class/label 4, payload length 2, next header 1,
    // hop limit 1, source 16, destination 16. Read in place, not copied: the
    // 16-byte addresses would crowd the 512-byte BPF stack.
    let Some(iph) = ptr_at::<[u8; IP6_LEN]>(ctx, IP_OFF) else {
        return (PASS, Verdict::PassTruncated);
    };
    // SAFETY: bounds-checked by ptr_at; nothing writes the packet until the rewrite.
    let ip = unsafe { &*iph };
    if ip[0] >> 4 != 6 {
        return (PASS, Verdict::PassNotIp);
    }
    let next = ip[6];
    if next == IPPROTO_FRAGMENT {
        return (PASS, Verdict::PassFragment);
    }
    if next != IPPROTO_UDP {
        let mut i = 0;
        while i < IPV6_EXT_HEADERS.len() {
            if IPV6_EXT_HEADERS[i] == next {
                return (PASS, Verdict::PassIpOptions);
            }
            i += 1;
        }
        return (PASS, Verdict::PassNotUdp);
    }
    let Some(udph) = ptr_at::<[u16; 4]>(ctx, UDP6_OFF) else {
        return (PASS, Verdict::PassTruncated);
    };
    // SAFETY: as above.
    let (sport, dport, udp_check) = unsafe { ((*udph)[0], (*udph)[1], (*udph)[3]) };
    if config.port == 0 {
        return (PASS, Verdict::PassNotConfigured);
    }
    if dport != config.port {
        return (PASS, Verdict::PassOtherPort);
    }
    let mut daddr = [0u8; 16];
    daddr.copy_from_slice(&ip[24..40]);
    if ZTNA_LOCAL_ADDRS6.get_ptr(daddr).is_none() {
        return (PASS, Verdict::PassNotLocalAddress);
    }
    // An incremental update needs a checksum to start from; IPv6 forbids 0.
    if udp_check == 0 {
        return (PASS, Verdict::PassZeroUdpChecksum);
    }
    let payload_len = u16::from_be_bytes([ip[4], ip[5]]);
    let ip_end = UDP6_OFF + usize::from(payload_len);
    let cid = match relay_cid(ctx, QUIC6_OFF, ip_end, config) {
        Ok(c) => c,
        Err(v) => return (PASS, v),
    };
    let key = RelayKey { cid };
    // SAFETY: the value is copied out at once, as on the IPv4 path; userspace
    // replaces whole entries.
    let Some(entry) = (unsafe { ZTNA_RELAY6.get(key) }).copied() else {
        return (PASS, Verdict::PassUnknownCid);
    };
    let entry = &entry;
    if ip[8..24] != entry.expected_src_addr || sport != entry.expected_src_port {
        return (PASS, Verdict::PassSenderMismatch);
    }
    // SAFETY: plain helper call (see relay_ipv4 for the coarse clock).
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: reading the xdp_md context field.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let session = ZTNA_SESSION_STATS6.get_ptr_mut(key);
    // SAFETY: per-CPU value, only this CPU touches it while we run.
    let cached = session.is_some_and(|s| unsafe {
        (*s).next_hop.expires_ns > now && (*s).next_hop.peer_addr == entry.peer_addr
    });
    let hop = match session {
        // SAFETY: as above.
        Some(s) if cached => unsafe { (*s).next_hop },
        _ => {
            let q = Route6Query {
                tot_len: payload_len.wrapping_add(IP6_LEN as u16),
                sport: dport,
                ingress,
            };
            let mut h = NextHop6::default();
            if !route6(ctx, q, &daddr, entry, &mut h) {
                return (PASS, Verdict::PassFibMiss);
            }
            h.expires_ns = now + NEXTHOP_CACHE_NS;
            if let Some(s) = session {
                // SAFETY: as above.
                unsafe { (*s).next_hop = h };
            }
            h
        }
    };
    let Some(eth) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return (xdp_action::XDP_ABORTED, Verdict::Aborted);
    };
    let new_sport = dport;
    let new_dport = entry.peer_port;
    // UDP checksum, RFC 1624 eqn. 3 over every changed word of the pseudo-header
    // and the header: HC' = ~(~HC + ~m + m'). Summed in 32-bit words (the ones'
    // complement sum is the same: 2^16 = 1 mod 0xffff). The new source address is
    // the old destination, so the destination's old and new words cancel: what
    // changes is old source → new destination (the peer), and both ports. The hop
    // limit is not in the pseudo-header.
    let src = ptr_at::<[u32; 4]>(ctx, IP_OFF + 8);
    let Some(src) = src else {
        return (xdp_action::XDP_ABORTED, Verdict::Aborted);
    };
    // SAFETY: bounds-checked by ptr_at.
    let src = unsafe { *src };
    let mut sum = u64::from(!udp_check);
    let mut w = 0;
    while w < 4 {
        let at = w * 4;
        let peer = u32::from_ne_bytes([
            entry.peer_addr[at],
            entry.peer_addr[at + 1],
            entry.peer_addr[at + 2],
            entry.peer_addr[at + 3],
        ]);
        sum += u64::from(!src[w]) + u64::from(peer);
        w += 1;
    }
    sum += u64::from(!sport) + u64::from(new_sport) + u64::from(!dport) + u64::from(new_dport);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let c = !(sum as u16);
    // SAFETY: all three pointers were bounds-checked by ptr_at.
    unsafe {
        let e = &mut *eth;
        e[..6].copy_from_slice(&hop.dmac);
        e[6..].copy_from_slice(&hop.smac);

        let h = &mut *iph;
        h[7] = RELAY_TTL;
        h[8..24].copy_from_slice(&daddr);
        h[24..40].copy_from_slice(&entry.peer_addr);

        let u = &mut *udph;
        u[0] = new_sport;
        u[1] = new_dport;
        // 0 means "no checksum", which IPv6 forbids; 0xffff is the same sum.
        u[3] = if c == 0 { 0xffff } else { c };
    }
    if let Some(s) = session {
        // SAFETY: per-CPU value, only this CPU writes it while we run.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += (ctx.data_end() - ctx.data()) as u64;
            (*s).last_seen_ns = now;
        }
    }
    send(hop.ifindex, ingress)
}

/// `bpf_fib_lookup` for the rewritten packet: egress interface and MACs.
#[inline(always)]
fn route(
    ctx: &XdpContext,
    ip: &[u8; IP_LEN],
    new_saddr: u32,
    new_sport: u16,
    entry: &RelayEntry,
    ingress: u32,
) -> Option<NextHop> {
    let mut fib = FibParams {
        family: AF_INET,
        l4_protocol: IPPROTO_UDP,
        sport: new_sport,
        dport: entry.peer_port,
        tot_len: u16::from_be_bytes([ip[2], ip[3]]),
        ifindex: ingress,
        tos: u32::from(ip[1]),
        src: [new_saddr, 0, 0, 0],
        dst: [entry.peer_addr, 0, 0, 0],
        vlan: 0,
        smac: [0; 6],
        dmac: [0; 6],
    };
    fib_lookup(ctx, &mut fib).then_some(NextHop {
        ifindex: fib.ifindex,
        peer_addr: entry.peer_addr,
        smac: fib.smac,
        dmac: fib.dmac,
        _pad: [0; 4],
        expires_ns: 0,
    })
}

/// What [`route6`] needs of the packet besides the addresses (one argument: BPF
/// calls take at most five).
#[derive(Clone, Copy)]
struct Route6Query {
    /// The IPv6 packet's length: the kernel checks it against the egress MTU.
    tot_len: u16,
    /// The new source port (network order).
    sport: u16,
    ingress: u32,
}

/// The same for an IPv6 peer (AF_INET6), into `hop`; true if found. Not inlined:
/// its 64-byte lookup struct gets a stack frame of its own.
#[inline(never)]
fn route6(
    ctx: &XdpContext,
    q: Route6Query,
    new_saddr: &[u8; 16],
    entry: &RelayEntry6,
    hop: &mut NextHop6,
) -> bool {
    let mut fib = FibParams {
        family: AF_INET6,
        l4_protocol: IPPROTO_UDP,
        sport: q.sport,
        dport: entry.peer_port,
        tot_len: q.tot_len,
        ifindex: q.ingress,
        tos: 0,
        src: [0; 4],
        dst: [0; 4],
        vlan: 0,
        smac: [0; 6],
        dmac: [0; 6],
    };
    // SAFETY: 16 bytes each way between arrays we own (byte copies: no alignment).
    unsafe {
        core::ptr::copy_nonoverlapping(new_saddr.as_ptr(), fib.src.as_mut_ptr().cast::<u8>(), 16);
        core::ptr::copy_nonoverlapping(
            entry.peer_addr.as_ptr(),
            fib.dst.as_mut_ptr().cast::<u8>(),
            16,
        );
    }
    if !fib_lookup(ctx, &mut fib) {
        return false;
    }
    hop.ifindex = fib.ifindex;
    hop.smac = fib.smac;
    hop.dmac = fib.dmac;
    hop.peer_addr = entry.peer_addr;
    true
}

/// True if the route and neighbour were found (`BPF_FIB_LKUP_RET_SUCCESS`).
#[inline(always)]
fn fib_lookup(ctx: &XdpContext, fib: &mut FibParams) -> bool {
    // SAFETY: helper call with a 64-byte bpf_fib_lookup on our stack.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            (fib as *mut FibParams).cast(),
            size_of::<FibParams>() as i32,
            0,
        )
    };
    rc == 0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
