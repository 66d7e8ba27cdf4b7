//! What to check: the contract's rows as probes from the probe hosts, and the kernel state
//! the probes do not show.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::config::Config;
use crate::netlink::selftest::RouterView;
use crate::netlink::{self};
use crate::nft;
use crate::probe::{Probe, Proto};

use super::report::Check;
use super::rig::is_link_local;
use super::{Target, CAGED_TCP, CAGED_UDP, PROBE_TIMEOUT, SOURCE_PORTS};
// ---- what to check --------------------------------------------------------------------

/// Kernel state that the probes do not show: every configured segment port is in the
/// bridge and isolated (a port that is not silently opens the cage for what plugs into
/// it, and the probe hosts bring their own isolated ports).
pub(super) fn static_checks(cfg: &Config, ports: &[netlink::PortState]) -> Vec<Check> {
    let tables = nft::list_text();
    let mut out: Vec<Check> = ["inet", "bridge"]
        .into_iter()
        .map(|family| {
            let (observed, ok) = match &tables {
                Ok(text) if text.contains(&format!("table {family} {}", crate::policy::TABLE)) => {
                    ("present".to_owned(), true)
                }
                Ok(_) => ("ABSENT".to_owned(), false),
                Err(e) => (format!("unreadable ({e})"), false),
            };
            Check {
                name: "policy".into(),
                target: format!("table {family} {}", crate::policy::TABLE),
                proto: "state".into(),
                expected: "present".into(),
                observed,
                ok: Some(ok),
                judged_by: "kernel".into(),
                detail: String::new(),
            }
        })
        .collect();
    for p in ports {
        let (observed, ok) = if !p.exists {
            ("absent (nothing to check)".to_owned(), None)
        } else if !p.in_bridge {
            (format!("NOT in {}", cfg.segment.bridge), Some(false))
        } else if !p.isolated {
            ("NOT isolated".to_owned(), Some(false))
        } else {
            ("isolated".to_owned(), Some(true))
        };
        out.push(Check {
            name: "segment port".into(),
            target: p.name.clone(),
            proto: "state".into(),
            expected: format!("isolated in {}", cfg.segment.bridge),
            observed,
            ok,
            judged_by: "kernel".into(),
            detail: String::new(),
        });
    }
    out
}

/// The probe host a probe leaves from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Src {
    A,
    B,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Judge {
    /// A witness in the router's namespace.
    Router,
    /// A witness in probe host a / b.
    HostA,
    HostB,
    /// The prober's outcome alone.
    Prober,
}

impl Judge {
    pub(super) fn label(self) -> &'static str {
        match self {
            Judge::Router => "witness@router",
            Judge::HostA => "witness@probe-a",
            Judge::HostB => "witness@probe-b",
            Judge::Prober => "prober",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expect {
    Allow,
    Deny,
}

#[derive(Debug, Clone)]
pub(super) struct Planned {
    pub(super) name: String,
    pub(super) from: Src,
    pub(super) probe: Probe,
    pub(super) expect: Expect,
    pub(super) judge: Judge,
}

pub(super) struct Planning<'a> {
    pub(super) cfg: &'a Config,
    pub(super) view: &'a RouterView,
    pub(super) facts: &'a crate::policy::Facts,
    pub(super) a4: IpAddr,
    pub(super) a6: Option<IpAddr>,
    pub(super) b4: IpAddr,
    pub(super) b6: Option<IpAddr>,
    pub(super) spoof4: IpAddr,
    pub(super) spoof6: Option<IpAddr>,
    pub(super) targets: &'a [Target],
    /// The kill switch is on: everything to and from the segment must be dropped.
    pub(super) isolated: bool,
}

/// What [`plan`] makes of a [`Planning`].
pub(super) struct Plan {
    pub(super) probes: Vec<Planned>,
    /// What the probes cannot cover here, and why.
    pub(super) notes: Vec<String>,
    /// Checks that cannot run at all, reported as not run.
    pub(super) skipped: Vec<Check>,
}

/// At most this many router addresses, LAN hosts per family, upstream hosts per family,
/// router TCP ports and router UDP ports.
const MAX_ROUTER_ADDRESSES: usize = 12;
const MAX_HOSTS: usize = 3;
const MAX_TCP_PORTS: usize = 12;
const MAX_UDP_PORTS: usize = 8;

#[derive(Debug, Clone, Copy)]
enum Svc {
    Tcp(u16),
    Udp(u16),
    /// UDP from a fixed source port (DHCP 68 → 67, DHCPv6 546 → 547).
    UdpFrom(u16, u16),
    Icmp,
}

/// The probes of a plan, as they are added: the source address follows from the probe
/// host and the destination's family (no address of that family: no probe), and while
/// the kill switch is on every "allow" becomes a "deny".
struct Probes {
    out: Vec<Planned>,
    a4: IpAddr,
    a6: Option<IpAddr>,
    b4: IpAddr,
    b6: Option<IpAddr>,
    isolated: bool,
}

impl Probes {
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        name: &str,
        from: Src,
        src: Option<IpAddr>,
        dst: IpAddr,
        svcs: &[Svc],
        expect: Expect,
        judge: Judge,
    ) {
        let own = match (from, dst) {
            (Src::A, IpAddr::V4(_)) => Some(self.a4),
            (Src::A, IpAddr::V6(_)) => self.a6,
            (Src::B, IpAddr::V4(_)) => Some(self.b4),
            (Src::B, IpAddr::V6(_)) => self.b6,
        };
        let Some(src) = src.or(own) else {
            return;
        };
        let expect = if self.isolated { Expect::Deny } else { expect };
        for &svc in svcs {
            let (proto, port, sport) = match svc {
                Svc::Tcp(p) => (Proto::Tcp, p, None),
                Svc::Udp(p) => (Proto::Udp, p, None),
                Svc::UdpFrom(s, p) => (Proto::Udp, p, Some(s)),
                Svc::Icmp => (Proto::Icmp, 0, None),
            };
            let mut probe = Probe::new(proto, dst, port)
                .from(src)
                .timeout(PROBE_TIMEOUT);
            probe.src_port = sport;
            self.out.push(Planned {
                name: name.to_owned(),
                from,
                probe,
                expect,
                judge,
            });
        }
    }

    /// From probe host a, towards the router (judged by the router's witness).
    fn towards_router(&mut self, name: &str, dst: IpAddr, svcs: &[Svc], expect: Expect) {
        self.add(name, Src::A, None, dst, svcs, expect, Judge::Router);
    }

    /// From probe host a, beyond the router (judged by the prober).
    fn beyond(&mut self, name: &str, dst: IpAddr, svcs: &[Svc], expect: Expect) {
        self.add(name, Src::A, None, dst, svcs, expect, Judge::Prober);
    }
}

/// The probes, in report order.
pub(super) fn plan(p: &Planning) -> Plan {
    use Expect::{Allow, Deny};
    let mut notes: Vec<String> = Vec::new();
    let mut skipped: Vec<Check> = Vec::new();
    let mut probes = Probes {
        out: Vec::new(),
        a4: p.a4,
        a6: p.a6,
        b4: p.b4,
        b6: p.b6,
        isolated: p.isolated,
    };
    if p.isolated {
        notes.push(
            "the kill switch is on: every check expects the segment cut off, DNS, DHCP and \
             the internet included"
                .into(),
        );
    }
    let seg = &p.cfg.segment;
    let router4 = IpAddr::V4(seg.router4());
    let router6 = seg.router6().map(IpAddr::V6).filter(|_| p.a6.is_some());
    let seg_addrs: Vec<IpAddr> = std::iter::once(router4).chain(router6).collect();

    // The router's DNS and DHCP: allowed (the router's witness tells whether the policy
    // let them through; the prober whether anything listens). With DNS through Cage,
    // port 53 is redirected to the forwarder's port, so the policy's allow is probed
    // there (the witness sees packets after the redirect).
    let dns_port = if p.cfg.dns.enabled {
        p.cfg.dns.listen_port
    } else {
        53
    };
    for &r in &seg_addrs {
        probes.towards_router(
            "caged -> router DNS",
            r,
            &[Svc::Udp(dns_port), Svc::Tcp(dns_port)],
            Allow,
        );
    }
    probes.towards_router(
        "caged -> router DHCP",
        router4,
        &[Svc::UdpFrom(68, 67)],
        Allow,
    );
    if let Some(r6) = router6 {
        probes.towards_router(
            "caged -> router DHCPv6",
            r6,
            &[Svc::UdpFrom(546, 547)],
            Allow,
        );
    }

    // The router's other services, on every address it has.
    let (tcp_ports, udp_ports) = router_ports(p.cfg.main.web_listen.port(), dns_port);
    let mut addrs: Vec<IpAddr> = seg_addrs.clone();
    for (_, net) in &p.view.addresses {
        let a = net.addr();
        if a.is_loopback() || is_link_local(a) || addrs.contains(&a) {
            continue;
        }
        if a.is_ipv6() && p.a6.is_none() {
            continue;
        }
        addrs.push(a);
    }
    if addrs.len() > MAX_ROUTER_ADDRESSES {
        notes.push(format!(
            "the router has {} addresses; the self-test probes the first {MAX_ROUTER_ADDRESSES}",
            addrs.len()
        ));
        addrs.truncate(MAX_ROUTER_ADDRESSES);
    }
    for &a in &addrs {
        let mut svcs: Vec<Svc> = tcp_ports.iter().map(|&t| Svc::Tcp(t)).collect();
        svcs.extend(udp_ports.iter().map(|&u| Svc::Udp(u)));
        if !seg_addrs.contains(&a) && !p.cfg.dns.enabled {
            // DNS is allowed on the segment's router address only. (With DNS through
            // Cage, port 53 to any address is answered by Cage's forwarder, by design:
            // nothing reaches the router's other addresses on it.)
            svcs.extend([Svc::Tcp(53), Svc::Udp(53)]);
        }
        svcs.push(Svc::Icmp);
        probes.towards_router("caged -> router other", a, &svcs, Deny);
    }
    // Multicast to the router (mDNS, SSDP and the like): dropped, not answered.
    let all_hosts = IpAddr::V4(Ipv4Addr::new(224, 0, 0, 1));
    probes.towards_router("caged -> router multicast", all_hosts, &[Svc::Udp(9)], Deny);

    // Spoofed sources: the router's DNS, which a source inside the subnet may use.
    let spoofable = [Svc::Udp(53), Svc::Tcp(53), Svc::Icmp];
    for (spoof, r) in [(Some(p.spoof4), Some(router4)), (p.spoof6, router6)] {
        if let (Some(spoof), Some(r)) = (spoof, r) {
            let name = "spoofed source -> router";
            probes.add(
                name,
                Src::A,
                Some(spoof),
                r,
                &spoofable,
                Deny,
                Judge::Router,
            );
        }
    }

    // Caged <-> caged: a knows b by static neighbour entries (frames really sent), b
    // resolves a by ARP and ND.
    let caged = [Svc::Tcp(CAGED_TCP), Svc::Udp(CAGED_UDP), Svc::Icmp];
    for dst in std::iter::once(p.b4).chain(p.b6) {
        let name = "caged -> caged (static neigh)";
        probes.add(name, Src::A, None, dst, &caged, Deny, Judge::HostB);
    }
    for dst in std::iter::once(p.a4).chain(p.a6) {
        let name = "caged -> caged (ARP/ND)";
        probes.add(name, Src::B, None, dst, &caged, Deny, Judge::HostA);
    }

    // The LAN: hosts the router knows there, else one address of each LAN subnet.
    let lan_nets: Vec<IpNet> = p
        .view
        .addresses
        .iter()
        .filter(|(dev, net)| p.cfg.lan.devices.contains(dev) && !is_link_local(net.addr()))
        .map(|(_, net)| net.trunc())
        .collect();
    let lan_svcs = [Svc::Tcp(22), Svc::Tcp(80), Svc::Udp(53), Svc::Icmp];
    for dst in hosts_in(p, &lan_nets, &p.cfg.lan.devices, &[], "LAN", &mut notes) {
        probes.beyond("caged -> LAN", dst, &lan_svcs, Deny);
    }

    // The upstream network: the WAN gateways, hosts the router knows there, else one
    // address of each upstream subnet.
    let up_nets: Vec<IpNet> = p
        .facts
        .upstream4
        .iter()
        .map(|n| IpNet::V4(*n))
        .chain(p.facts.upstream6.iter().map(|n| IpNet::V6(*n)))
        .collect();
    let gateways: Vec<IpAddr> = p
        .view
        .gateways
        .iter()
        .copied()
        .filter(|g| !is_link_local(*g))
        .collect();
    let wan = &p.facts.wan_devices;
    let beyond_svcs = [Svc::Tcp(80), Svc::Udp(53), Svc::Icmp];
    for dst in hosts_in(p, &up_nets, wan, &gateways, "upstream", &mut notes) {
        probes.beyond("caged -> upstream", dst, &beyond_svcs, Deny);
    }

    // One address of each private, CGNAT, link-local and ULA range, and private IPv4
    // inside NAT64 and 6to4.
    let mut taken_nets: Vec<IpNet> = vec![IpNet::V4(seg.subnet4())];
    taken_nets.extend(seg.subnet6().map(IpNet::V6));
    taken_nets.extend(lan_nets.iter().copied());
    taken_nets.extend(up_nets.iter().copied());
    for (label, candidates) in private_ranges() {
        let free = candidates
            .iter()
            .copied()
            .find(|c| !taken_nets.iter().any(|n| n.contains(c)));
        if let Some(dst) = free {
            probes.beyond(&format!("caged -> {label}"), dst, &beyond_svcs, Deny);
        }
    }

    // The internet: only where the owner names a target.
    let internet_skipped = |target: String, why: &str| Check {
        name: "caged -> internet".into(),
        target,
        proto: "-".into(),
        expected: if p.isolated { "deny" } else { "allow" }.into(),
        observed: format!("skipped: {why}"),
        ok: None,
        judged_by: "prober".into(),
        detail: String::new(),
    };
    if p.targets.is_empty() {
        let why = "no target (give --target ADDR or ADDR:PORT)";
        skipped.push(internet_skipped("(none)".into(), why));
    }
    for t in p.targets {
        if t.addr().is_ipv6() && p.a6.is_none() {
            let why = "the segment has no IPv6";
            skipped.push(internet_skipped(t.addr().to_string(), why));
            continue;
        }
        let svc = match t {
            Target::Ping(_) => Svc::Icmp,
            Target::Connect(sa) => Svc::Tcp(sa.port()),
        };
        probes.beyond("caged -> internet", t.addr(), &[svc], Allow);
    }

    // Tag every probe that has no fixed source port with one of the self-test's.
    let mut out = probes.out;
    for (i, planned) in out.iter_mut().enumerate() {
        if planned.probe.src_port.is_none() {
            let port = SOURCE_PORTS.start() + i as u16;
            assert!(
                SOURCE_PORTS.contains(&port),
                "too many probes for the port range"
            );
            planned.probe.src_port = Some(port);
        }
    }
    Plan {
        probes: out,
        notes,
        skipped,
    }
}

/// Destinations in `nets`: `first` (gateways), then hosts the router has resolved on
/// `devices` within `nets` (at most [`MAX_HOSTS`] a family), then, for a net with none,
/// one address of it (noted: an address that may not exist proves little).
fn hosts_in(
    p: &Planning,
    nets: &[IpNet],
    devices: &[String],
    first: &[IpAddr],
    what: &str,
    notes: &mut Vec<String>,
) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = first
        .iter()
        .copied()
        .filter(|a| a.is_ipv4() || p.a6.is_some())
        .collect();
    let mut known: Vec<IpAddr> = p
        .view
        .neighbours
        .iter()
        .filter(|n| n.resolved && devices.contains(&n.ifname) && !is_link_local(n.addr))
        .filter(|n| nets.iter().any(|net| net.contains(&n.addr)))
        .map(|n| n.addr)
        .filter(|a| !out.contains(a))
        .filter(|a| a.is_ipv4() || p.a6.is_some())
        .collect();
    known.sort();
    known.dedup();
    for family_v4 in [true, false] {
        out.extend(
            known
                .iter()
                .filter(|a| a.is_ipv4() == family_v4)
                .take(MAX_HOSTS),
        );
    }
    if nets.is_empty() && out.is_empty() {
        notes.push(format!(
            "{what}: no subnet and no host known, nothing to probe"
        ));
    }
    let router_addrs: Vec<IpAddr> = p.view.addresses.iter().map(|(_, n)| n.addr()).collect();
    for net in nets {
        if net.addr().is_ipv6() && p.a6.is_none() {
            continue;
        }
        if out.iter().any(|a| net.contains(a)) {
            continue;
        }
        let Some(guess) = net.hosts().take(16).find(|h| !router_addrs.contains(h)) else {
            continue;
        };
        notes.push(format!(
            "{what}: the router knows no host in {net}; the self-test probes {guess}, which \
             may not exist (then \"no answer\" proves little)"
        ));
        out.push(guess);
    }
    out
}

/// The ranges a caged host must never reach, one probe address each (two candidates, in
/// case the first lies in one of the router's own networks).
fn private_ranges() -> Vec<(&'static str, [IpAddr; 2])> {
    let v4 = |a, b, c, d| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
    #[allow(clippy::too_many_arguments)]
    let v6 = |a, b, c, d, e, f, g, h| IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h));
    vec![
        ("private 10/8", [v4(10, 213, 0, 10), v4(10, 97, 0, 10)]),
        (
            "private 172.16/12",
            [v4(172, 29, 0, 10), v4(172, 18, 0, 10)],
        ),
        (
            "private 192.168/16",
            [v4(192, 168, 213, 10), v4(192, 168, 97, 10)],
        ),
        ("CGNAT 100.64/10", [v4(100, 99, 0, 10), v4(100, 77, 0, 10)]),
        (
            "link-local 169.254/16",
            [v4(169, 254, 213, 10), v4(169, 254, 97, 10)],
        ),
        (
            "ULA fc00::/7",
            [
                v6(0xfd5e, 0x1f, 0, 0, 0, 0, 0, 0x10),
                v6(0xfdca, 0x9e, 0, 0, 0, 0, 0, 0x10),
            ],
        ),
        // 64:ff9b::10.213.0.10
        (
            "NAT64 of 10/8",
            [
                v6(0x64, 0xff9b, 0, 0, 0, 0, 0x0ad5, 0x000a),
                v6(0x64, 0xff9b, 0, 0, 0, 0, 0x0a61, 0x000a),
            ],
        ),
        // 2002:192.168.213.10::10
        (
            "6to4 of 192.168/16",
            [
                v6(0x2002, 0xc0a8, 0xd50a, 0, 0, 0, 0, 0x10),
                v6(0x2002, 0xc0a8, 0x610a, 0, 0, 0, 0, 0x10),
            ],
        ),
    ]
}

/// Ports to probe on the router's addresses: the usual web and shell ports and Cage's
/// own web port, and whatever the router listens on (TCP) or has bound (UDP) on an
/// address other than loopback, DNS (53, or Cage's forwarder's port) and DHCP aside
/// (checked on their own).
fn router_ports(web_port: u16, dns_port: u16) -> (Vec<u16>, Vec<u16>) {
    let mut tcp = vec![22, 80, 443, web_port];
    let mut udp = vec![161];
    tcp.extend(bound_ports("tcp", 0x0a));
    tcp.extend(bound_ports("tcp6", 0x0a));
    udp.extend(bound_ports("udp", 0x07));
    udp.extend(bound_ports("udp6", 0x07));
    let skip = [53, dns_port, 67, 68, 546, 547];
    let tidy = |v: &mut Vec<u16>, max: usize| {
        let fixed: Vec<u16> = v.iter().take(4).copied().collect();
        v.retain(|p| !skip.contains(p));
        v.sort_unstable();
        v.dedup();
        // Keep the fixed ones first when there are too many.
        let mut rest: Vec<u16> = v.iter().copied().filter(|p| !fixed.contains(p)).collect();
        let mut keep: Vec<u16> = fixed.into_iter().filter(|p| v.contains(p)).collect();
        keep.dedup();
        rest.truncate(max.saturating_sub(keep.len()));
        keep.extend(rest);
        keep.sort_unstable();
        keep.dedup();
        *v = keep;
    };
    tidy(&mut tcp, MAX_TCP_PORTS);
    tidy(&mut udp, MAX_UDP_PORTS);
    (tcp, udp)
}

/// Local ports of `/proc/net/<table>` sockets in `state` (0x0a: TCP listening; 0x07:
/// UDP unconnected) that are not bound to a loopback address.
fn bound_ports(table: &str, state: u8) -> Vec<u16> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/net/{table}")) else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let local = f.nth(1)?;
            let remote = f.next()?;
            let st = u8::from_str_radix(f.next()?, 16).ok()?;
            if st != state || !remote.trim_start_matches(['0', ':']).is_empty() {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            // The address is printed as 32-bit words in host byte order.
            let bytes: Vec<u8> = (0..addr.len() / 8)
                .filter_map(|i| u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).ok())
                .flat_map(u32::to_ne_bytes)
                .collect();
            let loopback = match bytes.len() {
                4 => bytes[0] == 127,
                16 => {
                    let a = Ipv6Addr::from(<[u8; 16]>::try_from(bytes.as_slice()).ok()?);
                    a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v| v.is_loopback())
                }
                _ => false,
            };
            if loopback {
                return None;
            }
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use ipnet::Ipv4Net;

    use super::*;

    #[test]
    fn private_ranges_are_denied_by_the_policy() {
        let deny4: Vec<Ipv4Net> = crate::policy::DENY4
            .iter()
            .map(|(n, _)| n.parse().unwrap())
            .collect();
        let deny6 = crate::policy::deny6();
        for (label, cands) in private_ranges() {
            for c in cands {
                let denied = match c {
                    IpAddr::V4(a) => deny4.iter().any(|n| n.contains(&a)),
                    IpAddr::V6(a) => deny6.iter().any(|n| n.contains(&a)),
                };
                assert!(denied, "{label}: {c} is not in the policy's deny lists");
            }
        }
    }
}
