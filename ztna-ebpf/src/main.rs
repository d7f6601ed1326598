//! The ztna XDP relay: forwards relayed QUIC packets by destination connection ID.
//!
//! Ethernet → IPv4 (no options, not a fragment) → UDP to the relay port → to one of
//! the relay's own addresses (`ZTNA_LOCAL_ADDRS`) → QUIC DCID (short header: the 8
//! bytes after the first byte; long header: version, a DCID length of 8, the DCID)
//! → the frame holds the whole IP packet, and the IP packet the headers up to the
//! DCID → `ZTNA_RELAY` lookup → sender check →
//! `bpf_fib_lookup` for the new destination (cached per session and CPU for a
//! second) → rewrite
//! (source = the relay's own address and port, i.e. the packet's destination;
//! destination = the peer; TTL 64, as the userspace forwarder's own sends) with
//! incremental IP and UDP checksum updates → `XDP_TX` or `bpf_redirect`. Anything else is `XDP_PASS` to the
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
    MAX_LOCAL_ADDRS, MAX_RELAY_ENTRIES, NEXTHOP_CACHE_NS, NextHop, RELAY_CID_LEN, RELAY_CID_MARKER,
    RelayConfig, RelayEntry, RelayKey, SessionStats, VERDICT_COUNT, Verdict,
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

/// TTL of forwarded packets: the relay sends them as their new source, like the
/// userspace forwarder's socket does, so they start over.
const RELAY_TTL: u8 = 64;

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const UDP_LEN: usize = 8;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_UDP: u8 = 17;
const AF_INET: u8 = 2;
const IP_OFF: usize = ETH_LEN;
const UDP_OFF: usize = ETH_LEN + IP_LEN;
const QUIC_OFF: usize = UDP_OFF + UDP_LEN;

/// `struct bpf_fib_lookup` (64 bytes) with the IPv4 members we use.
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

fn try_ztna_relay(ctx: &XdpContext) -> (u32, Verdict) {
    // Ethernet.
    let Some(ethertype) = read::<u16>(ctx, 12) else {
        return (PASS, Verdict::PassTruncated);
    };
    if u16::from_be(ethertype) != ETH_P_IP {
        return (PASS, Verdict::PassNotIpv4);
    }
    // IPv4 header, fixed 20 bytes.
    let Some(ver_ihl) = read::<u8>(ctx, IP_OFF) else {
        return (PASS, Verdict::PassTruncated);
    };
    if ver_ihl >> 4 != 4 {
        return (PASS, Verdict::PassNotIpv4);
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
    let relay_port = match ZTNA_CONFIG.get(0) {
        Some(c) if c.port != 0 => c.port,
        _ => return (PASS, Verdict::PassNotConfigured),
    };
    if dport != relay_port {
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
    // QUIC DCID.
    let Some(first) = read::<u8>(ctx, QUIC_OFF) else {
        return (PASS, Verdict::PassTruncated);
    };
    let dcid_off = if first & 0x80 == 0 {
        QUIC_OFF + 1
    } else {
        let Some(len) = read::<u8>(ctx, QUIC_OFF + 5) else {
            return (PASS, Verdict::PassTruncated);
        };
        if len as usize != RELAY_CID_LEN {
            return (PASS, Verdict::PassNotRelayCid);
        }
        QUIC_OFF + 6
    };
    let Some(cid) = read::<[u8; RELAY_CID_LEN]>(ctx, dcid_off) else {
        return (PASS, Verdict::PassTruncated);
    };
    // A frame that ends before its IP total length lost bytes on the way, and an IP
    // packet whose total length ends before the DCID does not hold the headers just
    // read (they lie in the Ethernet padding): the receiver's kernel would drop
    // either, so relaying them only wastes the peer's link.
    let ip_total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if IP_OFF + ip_total > ctx.data_end() - ctx.data()
        || IP_OFF + ip_total < dcid_off + RELAY_CID_LEN
    {
        return (PASS, Verdict::PassTruncated);
    }
    if cid[0] != RELAY_CID_MARKER {
        return (PASS, Verdict::PassNotRelayCid);
    }
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
    if hop.ifindex == ingress {
        (xdp_action::XDP_TX, Verdict::Tx)
    } else {
        // SAFETY: plain helper call.
        let action = unsafe { bpf_redirect(hop.ifindex, 0) } as u32;
        (action, Verdict::Redirect)
    }
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
    // SAFETY: helper call with a 64-byte bpf_fib_lookup on our stack.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            (&mut fib as *mut FibParams).cast(),
            size_of::<FibParams>() as i32,
            0,
        )
    };
    (rc == 0).then_some(NextHop {
        ifindex: fib.ifindex,
        peer_addr: entry.peer_addr,
        smac: fib.smac,
        dmac: fib.dmac,
        _pad: [0; 4],
        expires_ns: 0,
    })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
