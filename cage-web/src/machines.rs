//! Machines, not addresses: the flow log grouped by caged machine (its MAC, the bridge
//! port it is bound to, its DHCP name), with every address it used as its own, and the
//! addresses it only claimed — a source outside the segment, another machine's address
//! or MAC — as spoofing attempts of that machine, never as machines of their own. The
//! router's own addresses are never a machine.
//!
//! Pure: the flows and the agent's [`Segment`] in, [`Machines`] out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::backend::{FlowRecord, Segment};

/// The rules that deny a frame for the source it claims, not for where it goes: a
/// blocked record under one of them names an address (or MAC) its machine claimed.
pub const SPOOF_RULES: [&str; 5] = [
    "deny:spoofed-source",
    "deny:addr-theft",
    "deny:addr-flood",
    "deny:mac-theft",
    "deny:mac-flood",
];

/// Spoofing attempts listed per machine, the most persistent first; the others are
/// counted ([`Machine::spoofed_more`]): a host that forges thousands of sources must not
/// make its card thousands of lines long.
pub const MAX_SPOOFED: usize = 32;

/// One caged machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// Lower-case MAC: what the machine is known by.
    pub mac: String,
    /// The bridge port it is bound to now, or was when its newest flow was written.
    pub port: Option<String>,
    /// Its DHCP name, where known.
    pub hostname: Option<String>,
    /// Its own addresses: bound to its MAC, or the source of flows that were not
    /// spoofing attempts.
    pub addresses: Vec<IpAddr>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub flows: u64,
    /// Packets of its blocked flows (spoofing attempts included).
    pub blocked: u64,
    /// The addresses it only claimed, each with its attempts.
    pub spoofed: Vec<Spoofed>,
    /// Further claimed sources beyond the [`MAX_SPOOFED`] listed.
    pub spoofed_more: u64,
    /// Start of its oldest flow and end of its newest (RFC 3339); empty when only the
    /// bindings know it.
    pub first_seen: String,
    pub last_seen: String,
}

/// An address a machine claimed that is not its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spoofed {
    /// The source address of the refused frames.
    pub address: IpAddr,
    /// The source MAC they claimed, when not the machine's own (`deny:mac-theft`,
    /// `deny:mac-flood`: the machine is then known by the port they came in on).
    pub mac: Option<String>,
    /// The rule that refused it (`deny:spoofed-source`, `deny:addr-theft`, …).
    pub rule: String,
    /// Packets refused.
    pub attempts: u64,
    pub last: String,
}

/// `GET /api/hosts`: every machine, busiest uploader first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machines {
    pub machines: Vec<Machine>,
    /// Blocked packets towards segment addresses no machine has (a LAN host probing the
    /// segment, say): attempts, but nobody's.
    pub unattributed: u64,
}

impl Machines {
    pub fn find(&self, mac: &str) -> Option<&Machine> {
        let mac = mac.to_ascii_lowercase();
        self.machines.iter().find(|m| m.mac == mac)
    }
}

/// Whether `r` is a spoofing attempt: refused for its source, or (the eBPF program's
/// record of a frame refused later) with a source outside the segment's networks.
pub fn is_spoof(r: &FlowRecord, seg: &Segment) -> bool {
    if let Some(rule) = &r.rule {
        if SPOOF_RULES.contains(&rule.as_str()) {
            return true;
        }
    }
    r.direction == "out" && !seg.subnets.is_empty() && !own_address(r.host, seg)
}

/// Can `a` be a caged host's own address: in the segment's networks, or IPv6
/// link-local (neighbour discovery, DHCPv6)?
fn own_address(a: IpAddr, seg: &Segment) -> bool {
    if let IpAddr::V6(v6) = a {
        if v6.segments()[0] & 0xffc0 == 0xfe80 {
            return true;
        }
    }
    seg.subnets.iter().any(|(net, len)| contains(*net, *len, a))
}

/// Is `a` in the network `net/len`?
pub fn contains(net: IpAddr, len: u8, a: IpAddr) -> bool {
    match (net, a) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let len = u32::from(len.min(32));
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let len = u32::from(len.min(128));
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// Never a caged machine: the router, multicast, broadcast (the limited one and each
/// IPv4 subnet's), unspecified.
fn not_a_host(a: IpAddr, router: &HashSet<IpAddr>, seg: &Segment) -> bool {
    router.contains(&a)
        || a.is_multicast()
        || a.is_unspecified()
        || a == IpAddr::from([255, 255, 255, 255])
        || seg.subnets.iter().any(|&(net, len)| match (net, a) {
            // All host bits set, inside the subnet.
            (IpAddr::V4(_), IpAddr::V4(v4)) if len < 31 => {
                let host = u32::MAX >> len;
                u32::from(v4) & host == host && contains(net, len, a)
            }
            _ => false,
        })
}

/// A group (multicast or broadcast) MAC: the I/G bit of its first octet. Frames to one
/// name no machine.
fn group_mac(mac: &str) -> bool {
    u8::from_str_radix(mac.get(..2).unwrap_or("00"), 16).is_ok_and(|b| b & 1 == 1)
}

/// Which machine (MAC) each record belongs to, `None` for records of no machine (the
/// router's, selftest probes, attempts towards addresses nobody has). A record without
/// a MAC (an attempt from the LAN towards a caged host) belongs to the machine its
/// address is bound to, leased to, or was last seen with in a flow that was no spoof.
pub struct Attribution<'a> {
    seg: &'a Segment,
    router: HashSet<IpAddr>,
    owner: HashMap<IpAddr, String>,
    /// Each bridge port's machine: what frames with a forged MAC are attributed by.
    port_owner: HashMap<String, String>,
}

/// The rules that refuse a frame for the MAC it claims: its record's MAC is not its
/// machine's.
const MAC_RULES: [&str; 2] = ["deny:mac-theft", "deny:mac-flood"];

fn forged_mac(r: &FlowRecord) -> bool {
    r.rule
        .as_deref()
        .is_some_and(|rule| MAC_RULES.contains(&rule))
}

impl<'a> Attribution<'a> {
    pub fn new(flows: &[FlowRecord], seg: &'a Segment) -> Attribution<'a> {
        let router: HashSet<IpAddr> = seg.router.iter().copied().collect();
        let mut owner: HashMap<IpAddr, String> = HashMap::new();
        let mut port_owner: HashMap<String, String> = HashMap::new();
        // Weakest first, so that a stronger source overwrites: what flows showed (the
        // newest wins), the leases, then the bindings in the kernel now.
        for r in flows {
            if let Some(mac) = &r.mac {
                if r.tag.is_none() && !is_spoof(r, seg) {
                    owner.insert(r.host, mac.to_ascii_lowercase());
                    if let Some(port) = &r.bridge_port {
                        port_owner.insert(port.clone(), mac.to_ascii_lowercase());
                    }
                }
            }
        }
        for (mac, addr, _) in &seg.leases {
            owner.insert(*addr, mac.to_ascii_lowercase());
        }
        for b in &seg.bindings {
            for a in &b.addresses {
                owner.insert(*a, b.mac.to_ascii_lowercase());
            }
            if let Some(port) = &b.port {
                port_owner.insert(port.clone(), b.mac.to_ascii_lowercase());
            }
        }
        Attribution {
            seg,
            router,
            owner,
            port_owner,
        }
    }

    /// The MAC of the machine `r` belongs to.
    pub fn machine_of(&self, r: &FlowRecord) -> Option<String> {
        if r.tag.is_some() {
            return None;
        }
        if forged_mac(r) {
            // Its MAC is not its machine's: the machine is the one on the port the
            // frame came in on, if the record names one that is known.
            return self.port_owner.get(r.bridge_port.as_deref()?).cloned();
        }
        if r.mac.as_deref().is_some_and(group_mac) {
            return None;
        }
        if not_a_host(r.host, &self.router, self.seg) {
            // A frame from a machine that claimed the router's address is that
            // machine's spoofing attempt; the router's own traffic is nobody's.
            return match &r.mac {
                Some(mac) if self.router.contains(&r.host) && r.verdict == "blocked" => {
                    Some(mac.to_ascii_lowercase())
                }
                _ => None,
            };
        }
        match &r.mac {
            Some(mac) if r.direction == "out" || r.verdict == "allowed" => {
                Some(mac.to_ascii_lowercase())
            }
            _ => self.owner.get(&r.host).cloned(),
        }
    }

    /// Whether `r` is a spoofing attempt (see [`is_spoof`]); the router's addresses are
    /// only ever claimed.
    pub fn is_spoof(&self, r: &FlowRecord) -> bool {
        is_spoof(r, self.seg) || self.router.contains(&r.host)
    }
}

/// The flows grouped by machine; the bindings add the machines that have no flow yet
/// and the ports and addresses as they are now, the leases the names.
pub fn group(flows: &[FlowRecord], seg: &Segment) -> Machines {
    group_with(flows, seg, &Attribution::new(flows, seg))
}

/// [`group`], with the flows' attribution made already.
pub fn group_with(flows: &[FlowRecord], seg: &Segment, who: &Attribution<'_>) -> Machines {
    let mut by_mac: BTreeMap<String, Machine> = BTreeMap::new();
    let mut spoofs: BTreeMap<(String, IpAddr, Option<String>), Spoofed> = BTreeMap::new();
    let mut own: HashMap<String, HashSet<IpAddr>> = HashMap::new();
    let mut unattributed = 0u64;
    for r in flows {
        let Some(mac) = who.machine_of(r) else {
            if r.tag.is_none() && r.verdict == "blocked" && !not_a_host(r.host, &who.router, seg) {
                unattributed = unattributed.saturating_add(attempts(r));
            }
            continue;
        };
        let m = by_mac.entry(mac.clone()).or_insert_with(|| Machine {
            mac: mac.clone(),
            ..Machine::default()
        });
        if m.first_seen.is_empty() || r.start < m.first_seen {
            m.first_seen.clone_from(&r.start);
        }
        // RFC 3339 UTC in one fixed format sorts as text; the newest record names the
        // port and the host name.
        if r.end >= m.last_seen {
            m.last_seen.clone_from(&r.end);
            if r.bridge_port.is_some() {
                m.port.clone_from(&r.bridge_port);
            }
            if r.hostname.is_some() {
                m.hostname.clone_from(&r.hostname);
            }
        }
        m.bytes_up = m.bytes_up.saturating_add(r.bytes_out);
        m.bytes_down = m.bytes_down.saturating_add(r.bytes_in);
        m.flows += 1;
        if r.verdict == "blocked" {
            m.blocked = m.blocked.saturating_add(attempts(r));
        }
        if who.is_spoof(r) {
            let claimed = r
                .mac
                .as_ref()
                .map(|m| m.to_ascii_lowercase())
                .filter(|m| *m != mac);
            let key = (mac, r.host, claimed.clone());
            let s = spoofs.entry(key).or_insert_with(|| Spoofed {
                address: r.host,
                mac: claimed,
                rule: String::new(),
                attempts: 0,
                last: String::new(),
            });
            s.attempts = s.attempts.saturating_add(attempts(r));
            if r.end >= s.last {
                s.last.clone_from(&r.end);
                s.rule = r
                    .rule
                    .clone()
                    .unwrap_or_else(|| "deny:spoofed-source".into());
            }
        } else {
            own.entry(mac).or_default().insert(r.host);
        }
    }
    for b in &seg.bindings {
        let mac = b.mac.to_ascii_lowercase();
        let m = by_mac.entry(mac.clone()).or_insert_with(|| Machine {
            mac: mac.clone(),
            ..Machine::default()
        });
        if b.port.is_some() {
            m.port.clone_from(&b.port);
        }
        own.entry(mac)
            .or_default()
            .extend(b.addresses.iter().filter(|a| !who.router.contains(a)));
    }
    for (mac, _, name) in &seg.leases {
        if let Some(m) = by_mac.get_mut(&mac.to_ascii_lowercase()) {
            if !name.is_empty() && name != "*" {
                m.hostname = Some(name.clone());
            }
        }
    }
    for (mac, m) in by_mac.iter_mut() {
        let mut addrs: Vec<IpAddr> = own.remove(mac).unwrap_or_default().into_iter().collect();
        addrs.sort();
        m.addresses = addrs;
    }
    for ((mac, addr, claimed), s) in spoofs {
        if let Some(m) = by_mac.get_mut(&mac) {
            // A source it used as its own as well is its address, and the refused
            // frames with it stay counted as blocked; only claimed ones are listed.
            if claimed.is_some() || !m.addresses.contains(&addr) {
                m.spoofed.push(s);
            }
        }
    }
    let mut machines: Vec<Machine> = by_mac.into_values().collect();
    for m in &mut machines {
        m.spoofed.sort_by(|a, b| {
            b.attempts
                .cmp(&a.attempts)
                .then(a.address.cmp(&b.address))
                .then(a.mac.cmp(&b.mac))
        });
        if m.spoofed.len() > MAX_SPOOFED {
            m.spoofed_more = (m.spoofed.len() - MAX_SPOOFED) as u64;
            m.spoofed.truncate(MAX_SPOOFED);
        }
    }
    machines.sort_by(|a, b| b.bytes_up.cmp(&a.bytes_up).then(a.mac.cmp(&b.mac)));
    Machines {
        machines,
        unattributed,
    }
}

/// Packets of a blocked record (at least one: a record is one attempt or more).
fn attempts(r: &FlowRecord) -> u64 {
    (r.packets_out + r.packets_in).max(1)
}

/// One destination of a machine: its DNS name where known, else its address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    pub name: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub flows: u64,
}

/// The destinations of the allowed flows, most bytes (both ways) first, at most `n`;
/// multicast (neighbour discovery, router solicitations) is the link's, not a
/// destination.
pub fn top_destinations<'a>(
    flows: impl Iterator<Item = &'a FlowRecord>,
    n: usize,
) -> Vec<Destination> {
    let mut by: HashMap<String, Destination> = HashMap::new();
    for r in flows.filter(|r| r.verdict == "allowed" && r.tag.is_none() && !r.peer.is_multicast()) {
        let name = r.name.clone().unwrap_or_else(|| r.peer.to_string());
        let d = by.entry(name.clone()).or_insert_with(|| Destination {
            name,
            ..Destination::default()
        });
        d.bytes_up = d.bytes_up.saturating_add(r.bytes_out);
        d.bytes_down = d.bytes_down.saturating_add(r.bytes_in);
        d.flows += 1;
    }
    let mut v: Vec<Destination> = by.into_values().collect();
    v.sort_by(|a, b| {
        (b.bytes_up + b.bytes_down)
            .cmp(&(a.bytes_up + a.bytes_down))
            .then(a.name.cmp(&b.name))
    });
    v.truncate(n);
    v
}

/// Blocked packets by rule, most first.
pub fn blocked_by_rule<'a>(flows: impl Iterator<Item = &'a FlowRecord>) -> Vec<(String, u64)> {
    let mut by: HashMap<String, u64> = HashMap::new();
    for r in flows.filter(|r| r.verdict == "blocked") {
        let n = by.entry(r.rule.clone().unwrap_or_default()).or_default();
        *n = n.saturating_add(attempts(r));
    }
    let mut v: Vec<(String, u64)> = by.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Binding;

    const AI1: &str = "02:ca:9e:00:00:11";
    const AI2: &str = "02:ca:9e:00:00:12";

    fn rec(host: &str, mac: Option<&str>, verdict: &str, rule: Option<&str>) -> FlowRecord {
        FlowRecord {
            start: "2026-12-07T12:00:00.000Z".into(),
            end: "2026-12-07T12:00:01.000Z".into(),
            verdict: verdict.into(),
            rule: rule.map(Into::into),
            proto: "udp".into(),
            host: host.parse().unwrap(),
            host_port: Some(40000),
            mac: mac.map(Into::into),
            bridge_port: None,
            peer: "203.0.113.10".parse().unwrap(),
            peer_port: Some(53),
            direction: "out".into(),
            packets_out: 2,
            bytes_out: 100,
            packets_in: 1,
            bytes_in: 300,
            tag: None,
            tcp_flags: None,
            hostname: None,
            name: None,
        }
    }

    fn segment() -> Segment {
        Segment {
            router: vec![
                "192.168.10.1".parse().unwrap(),
                "fd00:10::1".parse().unwrap(),
                "fe80::1".parse().unwrap(),
            ],
            subnets: vec![
                ("192.168.10.0".parse().unwrap(), 24),
                ("fd00:10::".parse().unwrap(), 64),
            ],
            bindings: vec![Binding {
                mac: AI1.to_uppercase(),
                port: Some("veth-ai1".into()),
                addresses: vec!["192.168.10.11".parse().unwrap()],
            }],
            leases: vec![(
                AI1.into(),
                "192.168.10.11".parse().unwrap(),
                "agent-mini".into(),
            )],
        }
    }

    #[test]
    fn a_spoofing_machine_with_two_families_is_one_machine() {
        let seg = segment();
        let mut flows = vec![
            rec("192.168.10.11", Some(AI1), "allowed", None),
            rec("fd00:10::11", Some(AI1), "allowed", None),
            rec("fe80::11", Some(AI1), "allowed", None),
            // A source outside the segment, refused, and the eBPF twin of another.
            rec(
                "198.51.100.7",
                Some(AI1),
                "blocked",
                Some("deny:spoofed-source"),
            ),
            rec("198.51.100.8", Some(AI1), "allowed", None),
            // ai2's address, claimed by ai1.
            rec(
                "192.168.10.12",
                Some(AI1),
                "blocked",
                Some("deny:addr-theft"),
            ),
            rec("192.168.10.12", Some(AI2), "allowed", None),
            // Frames with ai2's MAC and a random one, coming in on ai1's port.
            FlowRecord {
                bridge_port: Some("veth-ai1".into()),
                ..rec(
                    "192.168.10.11",
                    Some(AI2),
                    "blocked",
                    Some("deny:mac-theft"),
                )
            },
            FlowRecord {
                bridge_port: Some("veth-ai1".into()),
                ..rec(
                    "192.168.10.11",
                    Some("02:66:66:66:66:66"),
                    "blocked",
                    Some("deny:mac-flood"),
                )
            },
            // The same on a port nobody is known on: nobody's, but counted.
            FlowRecord {
                bridge_port: Some("veth-nobody".into()),
                ..rec(
                    "192.168.10.11",
                    Some("02:77:77:77:77:77"),
                    "blocked",
                    Some("deny:mac-flood"),
                )
            },
            // The router's address, claimed by ai1 and refused.
            rec("192.168.10.1", Some(AI1), "blocked", Some("deny:router")),
            // The router's own traffic and multicast are nobody's.
            rec("192.168.10.1", Some("02:00:00:00:00:01"), "allowed", None),
            rec("fe80::1", Some("02:00:00:00:00:01"), "allowed", None),
            rec("ff02::1", Some("33:33:00:00:00:01"), "allowed", None),
            // The subnet's broadcast, and a frame to the broadcast MAC.
            rec("192.168.10.255", Some(AI2), "allowed", None),
            rec("192.168.10.77", Some("ff:ff:ff:ff:ff:ff"), "allowed", None),
        ];
        // A LAN host's attempt towards ai1 (no MAC: it came from the LAN) and towards an
        // address nobody has.
        let mut inbound = rec("192.168.10.11", None, "blocked", Some("deny:into-segment"));
        inbound.direction = "in".into();
        inbound.packets_out = 0;
        inbound.packets_in = 4;
        flows.push(inbound.clone());
        inbound.host = "192.168.10.99".parse().unwrap();
        flows.push(inbound);
        let g = group(&flows, &seg);
        let macs: Vec<&str> = g.machines.iter().map(|m| m.mac.as_str()).collect();
        assert_eq!(macs, vec![AI1, AI2], "{g:#?}");
        let ai1 = g.find(AI1).unwrap();
        assert_eq!(
            ai1.addresses,
            ["192.168.10.11", "fd00:10::11", "fe80::11"]
                .map(|a| a.parse::<IpAddr>().unwrap())
                .to_vec()
        );
        let spoofed: Vec<(String, Option<&str>, &str, u64)> = ai1
            .spoofed
            .iter()
            .map(|s| {
                (
                    s.address.to_string(),
                    s.mac.as_deref(),
                    s.rule.as_str(),
                    s.attempts,
                )
            })
            .collect();
        assert_eq!(
            spoofed,
            vec![
                ("192.168.10.1".into(), None, "deny:router", 3),
                (
                    "192.168.10.11".into(),
                    Some("02:66:66:66:66:66"),
                    "deny:mac-flood",
                    3
                ),
                ("192.168.10.11".into(), Some(AI2), "deny:mac-theft", 3),
                ("192.168.10.12".into(), None, "deny:addr-theft", 3),
                ("198.51.100.7".into(), None, "deny:spoofed-source", 3),
                ("198.51.100.8".into(), None, "deny:spoofed-source", 3),
            ]
        );
        assert!(
            g.find("02:66:66:66:66:66").is_none() && g.find("02:77:77:77:77:77").is_none(),
            "a forged MAC is no machine"
        );
        assert_eq!(ai1.port.as_deref(), Some("veth-ai1"));
        assert_eq!(ai1.hostname.as_deref(), Some("agent-mini"));
        assert_eq!(
            ai1.flows, 10,
            "its own, its spoofs and the attempt towards it"
        );
        assert_eq!(ai1.blocked, 5 * 3 + 4);
        assert_eq!(ai1.bytes_up, 10 * 100);
        assert_eq!(g.unattributed, 4 + 3);
        let ai2 = g.find(AI2).unwrap();
        assert_eq!(
            ai2.addresses,
            vec!["192.168.10.12".parse::<IpAddr>().unwrap()]
        );
        assert!(ai2.spoofed.is_empty());
        for m in &g.machines {
            for a in &m.addresses {
                assert!(!seg.router.contains(a), "the router's {a} is a host's");
            }
        }
    }

    #[test]
    fn a_flood_of_forged_sources_is_counted_not_listed() {
        let seg = segment();
        let mut flows = vec![rec("192.168.10.11", Some(AI1), "allowed", None)];
        for i in 0..1000u32 {
            let [_, _, c, d] = (0x0a00_0000 + i).to_be_bytes();
            flows.push(rec(
                &format!("10.0.{c}.{d}"),
                Some(AI1),
                "blocked",
                Some("deny:spoofed-source"),
            ));
            // Addresses of the segment beyond the rate of new ones: claims too.
            flows.push(rec(
                &format!("192.168.10.{}", 20 + i % 200),
                Some(AI1),
                "blocked",
                Some("deny:addr-flood"),
            ));
        }
        let g = group(&flows, &seg);
        let m = g.find(AI1).unwrap();
        assert_eq!(
            m.addresses,
            vec!["192.168.10.11".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(m.spoofed.len(), MAX_SPOOFED);
        assert_eq!(m.spoofed_more, (1000 + 200 - MAX_SPOOFED) as u64);
        // The addresses flooded five times come first.
        assert!(m
            .spoofed
            .iter()
            .all(|s| s.rule == "deny:addr-flood" && s.attempts == 15));
    }

    #[test]
    fn a_bound_machine_without_flows_is_listed_and_selftest_probes_are_not() {
        let seg = segment();
        let mut probe = rec("192.168.10.200", Some("02:ca:9e:ff:00:01"), "allowed", None);
        probe.tag = Some("selftest".into());
        let g = group(&[probe], &seg);
        assert_eq!(g.machines.len(), 1);
        let m = &g.machines[0];
        assert_eq!(m.mac, AI1);
        assert_eq!(m.flows, 0);
        assert_eq!(m.first_seen, "");
        assert_eq!(
            m.addresses,
            vec!["192.168.10.11".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn destinations_by_name_and_blocked_by_rule() {
        let mut a = rec("192.168.10.11", Some(AI1), "allowed", None);
        a.name = Some("api.example.com".into());
        let mut b = a.clone();
        b.peer = "203.0.113.11".parse().unwrap();
        let mut c = rec("192.168.10.11", Some(AI1), "allowed", None);
        c.bytes_in = 5000;
        let d = rec("192.168.10.11", Some(AI1), "blocked", Some("deny:lan"));
        let mut e = rec("fe80::11", Some(AI1), "allowed", None);
        e.peer = "ff02::2".parse().unwrap();
        let flows = [a, b, c, d, e];
        let top = top_destinations(flows.iter(), 10);
        assert_eq!(
            top.iter()
                .map(|d| (d.name.as_str(), d.flows))
                .collect::<Vec<_>>(),
            vec![("203.0.113.10", 1), ("api.example.com", 2)]
        );
        assert_eq!(blocked_by_rule(flows.iter()), vec![("deny:lan".into(), 3)]);
    }

    #[test]
    fn networks_contain_their_addresses_only() {
        let n: IpAddr = "192.168.10.0".parse().unwrap();
        assert!(contains(n, 24, "192.168.10.255".parse().unwrap()));
        assert!(!contains(n, 24, "192.168.11.1".parse().unwrap()));
        assert!(!contains(n, 24, "fd00::1".parse().unwrap()));
        let n6: IpAddr = "fd00:10::".parse().unwrap();
        assert!(contains(n6, 64, "fd00:10::ffff".parse().unwrap()));
        assert!(!contains(n6, 64, "fd00:11::1".parse().unwrap()));
        assert!(contains(n6, 0, "2001:db8::1".parse().unwrap()));
    }
}
