//! The types that the eBPF program (`cage-ebpf`) and the `cage` binary share, in one
//! place: the flow map's key and value, the control record, the counters' indices and
//! the names the maps and programs are known by.
//!
//! Everything here is `#[repr(C)]` with every byte a named field (explicit `_pad`), so
//! the layout is the same on both sides and a key built on the BPF stack has no
//! uninitialised padding (the verifier rejects passing those to a map helper, and hash
//! keys are compared byte by byte). Integers are in host byte order: the object is built
//! for the router's endianness (`bpfel`/`bpfeb`).
//!
//! With the `serde` feature (user space only), `records` adds the records Cage writes to
//! its logs and serves on its page, so the agent and the web crate share one definition.
#![no_std]

#[cfg(feature = "serde")]
extern crate alloc;

#[cfg(feature = "serde")]
pub mod records;

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The flow map: [`FlowKey`] → [`FlowValue`], an LRU hash sized by user space.
pub const MAP_FLOWS: &str = "CAGE_FLOWS";
/// The control map: one [`Control`] at index 0.
pub const MAP_CONTROL: &str = "CAGE_CONTROL";
/// Per-CPU counters, indexed by the `STAT_*` constants.
pub const MAP_STATS: &str = "CAGE_STATS";
/// Each caged host's flows in [`MAP_FLOWS`]: [`HostKey`] → [`HostFlows`], an LRU hash.
pub const MAP_HOSTS: &str = "CAGE_HOSTS";
/// Hosts [`MAP_HOSTS`] keeps at most: far more than a segment has.
pub const HOST_ENTRIES: u32 = 1024;

/// The classifier for the segment bridge's ingress: frames from caged hosts.
pub const PROG_INGRESS: &str = "cage_tc_ingress";
/// The classifier for the segment bridge's egress: frames towards caged hosts.
pub const PROG_EGRESS: &str = "cage_tc_egress";

/// Flow map size compiled into the object; user space normally sets its own.
pub const DEFAULT_FLOW_ENTRIES: u32 = 16_384;

/// New flow records created (successful inserts). With the records still in the map and
/// those the collector removed, this tells how many the LRU evicted unread.
pub const STAT_FLOWS_CREATED: u32 = 0;
/// Packets whose flow could not be recorded (the map refused the insert): loss.
pub const STAT_FLOW_UPDATE_FAILED: u32 = 1;
/// Frames dropped because the segment is isolated (kill switch).
pub const STAT_ISOLATED_DROPPED: u32 = 2;
/// Frames that are not IPv4 or IPv6 (ARP and the like): passed, not recorded.
pub const STAT_NOT_IP: u32 = 3;
/// IP packets whose headers could not be read (truncated or malformed): passed, not recorded.
pub const STAT_MALFORMED: u32 = 4;
/// New flows not recorded because their host already had its share of the flow map
/// ([`Control::host_share`]): passed, not recorded, counted per host as well.
pub const STAT_OVER_SHARE: u32 = 5;
/// Number of counter slots (some spare, so new counters need no map change).
pub const STAT_COUNT: u32 = 8;

/// Address family of a [`FlowKey`].
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// One flow, normalised so that the caged host is the client: the classifier on the
/// bridge's ingress sees the caged host as the source, the one on its egress as the
/// destination, and both land in the same record.
///
/// Ports: TCP and UDP ports. For ICMP and ICMPv6 echo request/reply, `client_port` is
/// the echo identifier and `server_port` 0 (so a ping's requests and replies share a
/// record, as conntrack does it); for other ICMP messages `client_port` is 0 and
/// `server_port` is `type << 8 | code`. Non-first IPv4/IPv6 fragments carry no ports:
/// both are 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// The caged host's address; an IPv4 address uses the first 4 bytes, the rest are 0.
    pub client_addr: [u8; 16],
    /// The other end's address, same layout.
    pub server_addr: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, others as seen).
    pub protocol: u8,
    pub _pad: [u8; 2],
}

impl FlowKey {
    pub fn client_ip(&self) -> IpAddr {
        ip_of(self.family, &self.client_addr)
    }

    pub fn server_ip(&self) -> IpAddr {
        ip_of(self.family, &self.server_addr)
    }
}

/// A caged host, as [`MAP_HOSTS`] knows it: its address in [`FlowKey`]'s layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostKey {
    pub addr: [u8; 16],
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    pub _pad: [u8; 3],
}

impl HostKey {
    pub fn ip(&self) -> IpAddr {
        ip_of(self.family, &self.addr)
    }

    /// The key of the host of `flow`.
    pub fn of(flow: &FlowKey) -> HostKey {
        HostKey {
            addr: flow.client_addr,
            family: flow.family,
            _pad: [0; 3],
        }
    }
}

/// One caged host's part of the flow map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostFlows {
    /// Its records in the flow map: the classifier adds one for each record it creates,
    /// the collector sets the true count at every sweep (it removes records, and the
    /// LRU evicts some, which nobody counts down).
    pub flows: u32,
    /// Its new flows not recorded because `flows` had reached the share. Only grows.
    pub over_share: u32,
}

fn ip_of(family: u8, addr: &[u8; 16]) -> IpAddr {
    if family == FAMILY_IPV4 {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*addr))
    }
}

/// What is known about one flow. Counters only grow; the collector removes records it
/// has written out.
///
/// Bytes are layer-3 bytes (IP header and payload, as an IP packet's total length
/// counts them), packets are packets on the wire: a GSO/GRO packet of N segments counts
/// N packets and the bytes of N IP packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the first packet.
    pub first_seen_ns: u64,
    /// Same clock, the latest packet.
    pub last_seen_ns: u64,
    pub packets_from_client: u64,
    pub bytes_from_client: u64,
    pub packets_to_client: u64,
    pub bytes_to_client: u64,
    /// The caged host's MAC address as the first packet showed it.
    pub client_mac: [u8; 6],
    /// TCP flags (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10, URG 0x20, ECE 0x40,
    /// CWR 0x80) seen from the client, ORed together.
    pub tcp_flags_from_client: u8,
    /// The same, seen towards the client.
    pub tcp_flags_to_client: u8,
}

/// The control record, index 0 of [`MAP_CONTROL`]; user space writes it, the classifier
/// reads it on every packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Control {
    /// Non-zero: the kill switch is on; every frame to and from the segment is dropped.
    pub isolated: u32,
    /// Records one caged host may have in the flow map at once; 0: no limit. Its new
    /// flows beyond it are counted (`STAT_OVER_SHARE`, [`HostFlows::over_share`]), not
    /// recorded, so one host flooding the map leaves the others visible.
    pub host_share: u32,
    /// Room for more switches without changing the map's value size.
    pub _reserved: [u32; 2],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain old data: repr(C), every byte a named field (no padding), valid for
    // any bit pattern.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Control {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::HostKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::HostFlows {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn layouts_have_no_padding() {
        // Every field is named, so the size is the sum of the fields.
        assert_eq!(core::mem::size_of::<FlowKey>(), 16 + 16 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(core::mem::size_of::<FlowValue>(), 6 * 8 + 6 + 1 + 1);
        assert_eq!(core::mem::size_of::<Control>(), 16);
        assert_eq!(core::mem::size_of::<HostKey>(), 16 + 1 + 3);
        assert_eq!(core::mem::size_of::<HostFlows>(), 4 + 4);
    }

    #[test]
    fn addresses_read_back() {
        let mut k = FlowKey {
            family: FAMILY_IPV4,
            ..FlowKey::default()
        };
        k.client_addr[..4].copy_from_slice(&[10, 0, 0, 2]);
        assert_eq!(k.client_ip(), IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
        let v6: Ipv6Addr = "fd00::2".parse().unwrap();
        k.family = FAMILY_IPV6;
        k.server_addr = v6.octets();
        assert_eq!(k.server_ip(), IpAddr::V6(v6));
    }
}
