//! Cage's eBPF program: two TC classifiers on the AI segment's bridge device.
//!
//! `cage_tc_ingress` runs on the bridge's ingress (frames from caged hosts into the
//! router), `cage_tc_egress` on its egress (frames from the router to caged hosts). Each
//! is a thin entry point into [`try_cage_tc`], which:
//!
//! 1. drops every frame while the control map's `isolated` flag is set (the kill switch:
//!    one map write from user space takes effect on the next packet);
//! 2. otherwise parses Ethernet, up to two VLAN tags, IPv4/IPv6 (with IPv6 extension
//!    headers), TCP/UDP/ICMP, and adds the packet to its flow's record, keyed so that the
//!    caged host is the client whichever way the packet goes;
//! 3. and lets the packet go on (`TC_ACT_UNSPEC`: the next TCX program or tc filter
//!    decides, and with none the packet passes), so Cage coexists with other TC users.
//!
//! Nothing is lost silently: a flow that cannot be recorded, a malformed packet, a
//! non-IP frame and an isolated drop each bump a per-CPU counter in `CAGE_STATS`.
//!
//! Packet fields are read with `bpf_skb_load_bytes` (`TcContext::load`), which works on
//! non-linear skbs and needs no bounds-check dance for the verifier. No BTF, no CO-RE:
//! the program reads only `__sk_buff` fields that kernels since 5.1 have (`gso_segs`).
#![no_std]
#![no_main]
// The bpf targets have no compare-and-swap, so core::sync::atomic offers no fetch_add
// there; the intrinsic lowers to BPF_XADD (nightly is needed for build-std anyway).
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{Array, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use cage_common::{
    Control, FlowKey, FlowValue, HostFlows, HostKey, DEFAULT_FLOW_ENTRIES, FAMILY_IPV4,
    FAMILY_IPV6, HOST_ENTRIES, STAT_COUNT, STAT_FLOWS_CREATED, STAT_FLOW_UPDATE_FAILED,
    STAT_ISOLATED_DROPPED, STAT_MALFORMED, STAT_NOT_IP, STAT_OVER_SHARE,
};

/// Let the packet continue: in TCX this is `TCX_NEXT`, in a direct-action cls_bpf filter
/// "continue with the next filter"; with nothing after Cage the packet passes.
const TC_ACT_UNSPEC: i32 = -1;
/// Drop the packet (`TCX_DROP`).
const TC_ACT_SHOT: i32 = 2;

/// `BPF_NOEXIST`: insert only if the key is not there yet.
const BPF_NOEXIST: u64 = 1;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_UDPLITE: u8 = 136;

/// IPv6 extension headers walked before giving up on finding the transport header.
const MAX_IPV6_EXT: usize = 6;

#[map]
static CAGE_FLOWS: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, 0);

#[map]
static CAGE_CONTROL: Array<Control> = Array::with_max_entries(1, 0);

#[map]
static CAGE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

#[map]
static CAGE_HOSTS: LruHashMap<HostKey, HostFlows> = LruHashMap::with_max_entries(HOST_ENTRIES, 0);

#[classifier]
pub fn cage_tc_ingress(ctx: TcContext) -> i32 {
    match try_cage_tc(&ctx, Direction::FromClient) {
        Ok(action) => action,
        Err(stat) => {
            count(stat);
            TC_ACT_UNSPEC
        }
    }
}

#[classifier]
pub fn cage_tc_egress(ctx: TcContext) -> i32 {
    match try_cage_tc(&ctx, Direction::ToClient) {
        Ok(action) => action,
        Err(stat) => {
            count(stat);
            TC_ACT_UNSPEC
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Bridge ingress: the caged host is the source.
    FromClient,
    /// Bridge egress: the caged host is the destination.
    ToClient,
}

/// What one packet contributes to its flow.
struct Packet {
    key: FlowKey,
    client_mac: [u8; 6],
    packets: u64,
    bytes: u64,
    tcp_flags: u8,
}

/// The verdict for one frame, or the counter to bump when it could not be recorded (the
/// frame passes either way).
#[inline(always)]
fn try_cage_tc(ctx: &TcContext, dir: Direction) -> Result<i32, u32> {
    if isolated() {
        count(STAT_ISOLATED_DROPPED);
        return Ok(TC_ACT_SHOT);
    }
    let packet = parse(ctx, dir)?;
    record(&packet, dir)?;
    Ok(TC_ACT_UNSPEC)
}

/// The records one host may have in the flow map; 0: no limit.
#[inline(always)]
fn host_share() -> u32 {
    match CAGE_CONTROL.get(0) {
        // SAFETY: a valid pointer into the array's value, read once.
        Some(control) => unsafe { core::ptr::read_volatile(&control.host_share) },
        None => 0,
    }
}

/// This host's entry in `CAGE_HOSTS`, made when it has none; `None` only when the map
/// refuses (then the host is not held to its share: recording beats losing).
#[inline(always)]
fn host_entry(host: &HostKey) -> Option<*mut HostFlows> {
    if let Some(h) = CAGE_HOSTS.get_ptr_mut(host) {
        return Some(h);
    }
    let _ = CAGE_HOSTS.insert(host, HostFlows::default(), BPF_NOEXIST);
    CAGE_HOSTS.get_ptr_mut(host)
}

#[inline(always)]
fn isolated() -> bool {
    match CAGE_CONTROL.get(0) {
        // SAFETY: a valid pointer into the array's value, read once.
        Some(control) => unsafe { core::ptr::read_volatile(&control.isolated) != 0 },
        None => false,
    }
}

#[inline(always)]
fn count(stat: u32) {
    if let Some(slot) = CAGE_STATS.get_ptr_mut(stat) {
        // SAFETY: this CPU's slot of a per-CPU array; BPF programs do not migrate while
        // they run, so nothing else writes it concurrently.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, u32> {
    ctx.load::<T>(offset).map_err(|_| STAT_MALFORMED)
}

#[inline(always)]
fn be16(ctx: &TcContext, offset: usize) -> Result<u16, u32> {
    load::<u16>(ctx, offset).map(u16::from_be)
}

#[inline(always)]
fn parse(ctx: &TcContext, dir: Direction) -> Result<Packet, u32> {
    let dst_mac: [u8; 6] = load(ctx, 0)?;
    let src_mac: [u8; 6] = load(ctx, 6)?;
    let mut ethertype_at = 12usize;
    let mut ethertype = be16(ctx, ethertype_at).map_err(|_| STAT_NOT_IP)?;
    // Up to two in-band VLAN tags (802.1ad outer, 802.1Q inner). With VLAN offload the
    // tag is in skb metadata and the frame reads as untagged.
    for _ in 0..2 {
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            ethertype_at += 4;
            ethertype = be16(ctx, ethertype_at).map_err(|_| STAT_NOT_IP)?;
        }
    }
    let l3 = ethertype_at + 2;

    let mut key = FlowKey::default();
    let (src, dst): ([u8; 16], [u8; 16]);
    let l4: usize;
    let ip_len: u64;
    let protocol: u8;
    let later_fragment: bool;
    match ethertype {
        ETH_P_IP => {
            let version_ihl: u8 = load(ctx, l3)?;
            let ihl = usize::from(version_ihl & 0x0f) * 4;
            if version_ihl >> 4 != 4 || ihl < 20 {
                return Err(STAT_MALFORMED);
            }
            ip_len = u64::from(be16(ctx, l3 + 2)?);
            later_fragment = be16(ctx, l3 + 6)? & 0x1fff != 0;
            protocol = load(ctx, l3 + 9)?;
            let s: [u8; 4] = load(ctx, l3 + 12)?;
            let d: [u8; 4] = load(ctx, l3 + 16)?;
            let (mut s16, mut d16) = ([0u8; 16], [0u8; 16]);
            s16[..4].copy_from_slice(&s);
            d16[..4].copy_from_slice(&d);
            (src, dst) = (s16, d16);
            l4 = l3 + ihl;
            key.family = FAMILY_IPV4;
        }
        ETH_P_IPV6 => {
            let version: u8 = load(ctx, l3)?;
            if version >> 4 != 6 {
                return Err(STAT_MALFORMED);
            }
            let payload_len = u64::from(be16(ctx, l3 + 4)?);
            let mut next: u8 = load(ctx, l3 + 6)?;
            src = load(ctx, l3 + 8)?;
            dst = load(ctx, l3 + 24)?;
            let mut at = l3 + 40;
            let mut fragment = false;
            for _ in 0..MAX_IPV6_EXT {
                match next {
                    // Hop-by-hop, routing, destination options: length in 8-byte units.
                    0 | 43 | 60 => {
                        let h: [u8; 2] = load(ctx, at)?;
                        next = h[0];
                        at += (usize::from(h[1]) + 1) * 8;
                    }
                    // Authentication header: length in 4-byte units, minus 2.
                    51 => {
                        let h: [u8; 2] = load(ctx, at)?;
                        next = h[0];
                        at += (usize::from(h[1]) + 2) * 4;
                    }
                    // Fragment header: only the first fragment has the transport header.
                    44 => {
                        let h: [u8; 4] = load(ctx, at)?;
                        next = h[0];
                        fragment = u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0;
                        at += 8;
                    }
                    _ => break,
                }
            }
            // A payload length of 0 is a jumbogram (or BIG TCP): the skb knows the size.
            ip_len = if payload_len == 0 {
                u64::MAX
            } else {
                40 + payload_len
            };
            later_fragment = fragment;
            protocol = next;
            l4 = at;
            key.family = FAMILY_IPV6;
        }
        _ => return Err(STAT_NOT_IP),
    }
    key.protocol = protocol;

    // Ports as the packet has them (source, destination), or, for ICMP, already as
    // (client, server); and the transport header's length for GSO accounting.
    let mut directional = true;
    let (mut sport, mut dport, mut tcp_flags, mut l4_header) = (0u16, 0u16, 0u8, 0usize);
    if !later_fragment {
        match protocol {
            IPPROTO_TCP => {
                sport = be16(ctx, l4)?;
                dport = be16(ctx, l4 + 2)?;
                let off_flags: [u8; 2] = load(ctx, l4 + 12)?;
                l4_header = usize::from(off_flags[0] >> 4) * 4;
                tcp_flags = off_flags[1];
            }
            IPPROTO_UDP | IPPROTO_UDPLITE => {
                sport = be16(ctx, l4)?;
                dport = be16(ctx, l4 + 2)?;
                l4_header = 8;
            }
            IPPROTO_ICMP | IPPROTO_ICMPV6 => {
                let type_code: [u8; 2] = load(ctx, l4)?;
                let echo = if protocol == IPPROTO_ICMP {
                    type_code[0] == 8 || type_code[0] == 0
                } else {
                    type_code[0] == 128 || type_code[0] == 129
                };
                directional = false;
                if echo {
                    sport = be16(ctx, l4 + 4)?;
                } else {
                    dport = u16::from_be_bytes(type_code);
                }
                l4_header = 8;
            }
            _ => {}
        }
    }

    let (client_mac, client_port, server_port);
    match dir {
        Direction::FromClient => {
            (key.client_addr, key.server_addr) = (src, dst);
            client_mac = src_mac;
            (client_port, server_port) = (sport, dport);
        }
        Direction::ToClient => {
            (key.client_addr, key.server_addr) = (dst, src);
            client_mac = dst_mac;
            (client_port, server_port) = if directional {
                (dport, sport)
            } else {
                (sport, dport)
            };
        }
    }
    key.client_port = client_port;
    key.server_port = server_port;

    // Layer-3 bytes. The skb's length runs from the Ethernet header; a GSO/GRO skb stands
    // for `gso_segs` packets on the wire, each with its own IP and transport headers. A
    // plain packet counts what its IP header says (the skb may carry Ethernet padding).
    let skb_l3 = u64::from(ctx.len()).saturating_sub(l3 as u64);
    // SAFETY: reading a field of the context the kernel handed us.
    let gso_segs = u64::from(unsafe { (*ctx.skb.skb).gso_segs });
    let (packets, bytes) = if gso_segs > 1 {
        let headers = (l4 - l3 + l4_header) as u64;
        (gso_segs, skb_l3 + (gso_segs - 1) * headers)
    } else {
        (1, if ip_len < skb_l3 { ip_len } else { skb_l3 })
    };

    Ok(Packet {
        key,
        client_mac,
        packets,
        bytes,
        tcp_flags,
    })
}

#[inline(always)]
fn record(p: &Packet, dir: Direction) -> Result<(), u32> {
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(value) = CAGE_FLOWS.get_ptr_mut(p.key) {
        add(value, p, dir, now);
        return Ok(());
    }
    // A new flow: within its host's share of the map, or counted and not recorded.
    let share = host_share();
    let mut host: Option<*mut HostFlows> = None;
    if share != 0 {
        host = host_entry(&HostKey::of(&p.key));
        if let Some(h) = host {
            // SAFETY: a pointer into a map value the kernel keeps alive for this run.
            unsafe {
                if core::ptr::read_volatile(&raw const (*h).flows) >= share {
                    atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(
                        &raw mut (*h).over_share,
                        1,
                    );
                    return Err(STAT_OVER_SHARE);
                }
            }
        }
    }
    let mut value = FlowValue {
        first_seen_ns: now,
        last_seen_ns: now,
        client_mac: p.client_mac,
        ..FlowValue::default()
    };
    match dir {
        Direction::FromClient => {
            value.packets_from_client = p.packets;
            value.bytes_from_client = p.bytes;
            value.tcp_flags_from_client = p.tcp_flags;
        }
        Direction::ToClient => {
            value.packets_to_client = p.packets;
            value.bytes_to_client = p.bytes;
            value.tcp_flags_to_client = p.tcp_flags;
        }
    }
    if CAGE_FLOWS.insert(p.key, value, BPF_NOEXIST).is_ok() {
        count(STAT_FLOWS_CREATED);
        if let Some(h) = host {
            // SAFETY: as above.
            unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(&raw mut (*h).flows, 1) };
        }
        return Ok(());
    }
    // Another CPU created the record between our lookup and insert: add to it. If it is
    // not there either, the map refused the insert (LRU out of free nodes): loss.
    match CAGE_FLOWS.get_ptr_mut(p.key) {
        Some(value) => {
            add(value, p, dir, now);
            Ok(())
        }
        None => Err(STAT_FLOW_UPDATE_FAILED),
    }
}

/// Add a packet to an existing record. Counters are atomic adds whose result is unused
/// (plain `BPF_XADD`, which every kernel Cage targets has; fetching variants need 5.12).
/// The flags are a read-modify-write: two CPUs racing on the same flow and direction can
/// lose a bit, which is harmless for "flags seen".
#[inline(always)]
fn add(value: *mut FlowValue, p: &Packet, dir: Direction, now: u64) {
    // SAFETY: `value` points into a map value the kernel keeps alive for this program run;
    // the counters are 8-byte aligned (FlowValue is repr(C) with u64s first).
    unsafe {
        let (packets, bytes, flags) = match dir {
            Direction::FromClient => (
                &raw mut (*value).packets_from_client,
                &raw mut (*value).bytes_from_client,
                &raw mut (*value).tcp_flags_from_client,
            ),
            Direction::ToClient => (
                &raw mut (*value).packets_to_client,
                &raw mut (*value).bytes_to_client,
                &raw mut (*value).tcp_flags_to_client,
            ),
        };
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(packets, p.packets);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(bytes, p.bytes);
        core::ptr::write_volatile(&raw mut (*value).last_seen_ns, now);
        if p.tcp_flags != 0 {
            let seen = core::ptr::read_volatile(flags);
            if seen & p.tcp_flags != p.tcp_flags {
                core::ptr::write_volatile(flags, seen | p.tcp_flags);
            }
        }
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
