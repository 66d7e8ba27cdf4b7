//! What the self-test makes on the router and probes from: the probe hosts (anonymous
//! namespaces behind isolated ports of the segment bridge), their addresses, and the
//! probing itself.

use std::fs::File;
use std::io::{self, Read as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::netlink::selftest::{self as nl, RouterView};
use crate::netlink::NetlinkError;
use crate::probe::{self, Attempt, NetNs, NetNsGuard, Outcome, Probe, Proto, Witness};

use super::plan::{Expect, Judge, Planned, Src};
use super::report::Check;
use super::{here, interrupted, SelftestError, BUDGET, PARALLEL, SPACING};
// ---- probe namespaces -----------------------------------------------------------------

/// Sysctls of a probe host, before its `eth0` exists: no router advertisements, no
/// autoconfiguration, no duplicate address detection (its addresses are checked free
/// beforehand), ping sockets allowed; IPv6 off when the segment has none.
pub(super) fn prepare_namespace(ns: &NetNs, ipv6: bool) -> Result<(), SelftestError> {
    ns.set_sysctl("net.ipv4.ping_group_range", "0 2147483647")?;
    for scope in ["all", "default"] {
        let key = |k: &str| format!("net.ipv6.conf.{scope}.{k}");
        if ipv6 {
            ns.set_sysctl(&key("accept_ra"), "0")?;
            ns.set_sysctl(&key("autoconf"), "0")?;
            ns.set_sysctl(&key("dad_transmits"), "0")?;
        } else {
            ns.set_sysctl(&key("disable_ipv6"), "1")?;
        }
    }
    Ok(())
}

/// Everything the self-test makes on the router, removed by [`Rig::teardown`] or when
/// dropped (on errors and interruptions).
pub(super) struct Rig {
    bridge: String,
    pub(super) ports: Vec<String>,
    pub(super) namespaces: Vec<NetNsGuard>,
    pub(super) router_neighbours: Vec<IpAddr>,
    /// `<log_dir>/selftest.running.json`, once written.
    pub(super) running_file: Option<PathBuf>,
    done: bool,
}

impl Rig {
    pub(super) fn new(bridge: &str) -> Rig {
        Rig {
            bridge: bridge.to_owned(),
            ports: Vec::new(),
            namespaces: Vec::new(),
            router_neighbours: Vec::new(),
            running_file: None,
            done: false,
        }
    }

    /// Remove the router-side ports (each takes its peer with it) and check they are
    /// gone, remove the neighbour entries the probes left on the bridge, then let go of
    /// the namespaces (the kernel deletes them). Every error, not just the first.
    pub(super) fn teardown(&mut self) -> Vec<String> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        let ports = std::mem::take(&mut self.ports);
        let bridge = self.bridge.clone();
        let neighbours = std::mem::take(&mut self.router_neighbours);
        let result = here("cleanup", move || async move {
            let mut errors = Vec::new();
            for port in &ports {
                if let Err(e) = nl::delete_link(port).await {
                    errors.push(e.to_string());
                }
            }
            let until = Instant::now() + Duration::from_secs(2);
            for port in &ports {
                loop {
                    match nl::link_exists(port).await {
                        Ok(false) => break,
                        Ok(true) if Instant::now() < until => {
                            tokio::time::sleep(Duration::from_millis(20)).await
                        }
                        Ok(true) => {
                            errors.push(format!("{port} is still there after 2 s"));
                            break;
                        }
                        Err(e) => {
                            errors.push(e.to_string());
                            break;
                        }
                    }
                }
            }
            if let Err(e) = nl::delete_neighbours(&bridge, &neighbours).await {
                errors.push(e.to_string());
            }
            Ok::<_, NetlinkError>(errors)
        });
        self.namespaces.clear();
        let mut errors = match result {
            Ok(errors) => errors,
            Err(e) => vec![e.to_string()],
        };
        if let Some(path) = self.running_file.take() {
            if let Err(e) = std::fs::remove_file(&path) {
                errors.push(format!("removing {}: {e}", path.display()));
            }
        }
        errors
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for e in self.teardown() {
            crate::log::error(&format!("selftest cleanup: {e}"));
        }
    }
}

// ---- addresses ------------------------------------------------------------------------

/// Up to `n` host addresses from the top of `net` (below the broadcast address).
pub(super) fn top_hosts4(net: Ipv4Net, n: u32) -> Vec<Ipv4Addr> {
    let (first, last) = (u32::from(net.network()), u32::from(net.broadcast()));
    // Below `last`, which is a u32: the cast back is exact.
    top_of(first.into(), last.into(), n.into())
        .map(|a| Ipv4Addr::from(a as u32))
        .collect()
}

/// Up to `n` addresses from the top of `net`.
pub(super) fn top_hosts6(net: Ipv6Net, n: u128) -> Vec<Ipv6Addr> {
    let (first, last) = (u128::from(net.network()), u128::from(net.broadcast()));
    top_of(first, last, n).map(Ipv6Addr::from).collect()
}

/// Up to `n` numbers counting down from just below `last`, all above `first`: the top
/// hosts of a network whose first and last addresses are these (none in a /31, /32,
/// /127 or /128).
fn top_of(first: u128, last: u128, n: u128) -> impl Iterator<Item = u128> {
    (1..=n)
        .filter_map(move |k| last.checked_sub(k))
        .filter(move |&a| a > first)
}

/// Addresses the router's DHCP server has leased (dnsmasq's lease file on OpenWrt).
fn leased() -> Vec<IpAddr> {
    let mut text = String::new();
    if File::open("/tmp/dhcp.leases")
        .and_then(|mut f| f.read_to_string(&mut text))
        .is_err()
    {
        return Vec::new();
    }
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
        .collect()
}

/// Two of `candidates` that no host uses: not the router's, not in its neighbour table
/// with a link-layer address, not leased, and silent when the router pings them (a ping
/// also makes the router resolve them: a host that answers ARP or ND but not pings shows
/// in the neighbour table afterwards).
pub(super) fn free_addresses(
    subnet: IpNet,
    candidates: Vec<IpAddr>,
    view: &RouterView,
    bridge: &str,
) -> Result<Vec<IpAddr>, SelftestError> {
    let leases = leased();
    let taken = |a: &IpAddr, view: &RouterView| {
        view.addresses.iter().any(|(_, n)| n.addr() == *a)
            || view.neighbours.iter().any(|n| n.addr == *a && n.resolved)
            || leases.contains(a)
    };
    let candidates: Vec<IpAddr> = candidates.into_iter().filter(|a| !taken(a, view)).collect();
    let answering: Vec<bool> = std::thread::scope(|s| {
        let handles: Vec<_> = candidates
            .iter()
            .map(|&a| s.spawn(move || router_ping(a, Duration::from_millis(300)).unwrap_or(false)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(true))
            .collect()
    });
    let after = here("read-router", nl::router_view)?;
    let free: Vec<IpAddr> = candidates
        .iter()
        .zip(answering)
        .filter(|(a, answered)| !answered && !taken(a, &after))
        .map(|(a, _)| *a)
        .take(2)
        .collect();
    // The pings left neighbour entries on the router; the probe hosts' own are removed at
    // the end, the rest here.
    let unused: Vec<IpAddr> = candidates
        .iter()
        .filter(|a| !free.contains(a))
        .copied()
        .collect();
    let bridge = bridge.to_owned();
    let _ = here("cleanup-neighbours", move || async move {
        nl::delete_neighbours(&bridge, &unused).await
    });
    if free.len() < 2 {
        return Err(SelftestError::NoFreeAddress {
            subnet: subnet.to_string(),
            why: format!(
                "the self-test takes two addresses from the top of the range and found {} \
                 free among {}",
                free.len(),
                candidates.len()
            ),
        });
    }
    Ok(free)
}

/// A source address outside the segment's subnet, for the spoofing probes: from the
/// documentation ranges, which no network uses.
pub(super) fn spoof_source4(subnet: Ipv4Net) -> Ipv4Addr {
    [
        Ipv4Addr::new(192, 0, 2, 99),
        Ipv4Addr::new(198, 51, 100, 99),
    ]
    .into_iter()
    .find(|a| !subnet.contains(a))
    .expect("a /24 subnet cannot hold both")
}

pub(super) fn spoof_source6(subnet: Ipv6Net) -> Ipv6Addr {
    [
        Ipv6Addr::new(0x2001, 0xdb8, 0x5e1f, 0, 0, 0, 0, 0x99),
        Ipv6Addr::new(0x3fff, 0x5e1f, 0, 0, 0, 0, 0, 0x99),
    ]
    .into_iter()
    .find(|a| !subnet.contains(a))
    .expect("one subnet cannot hold both")
}

/// Ping `addr` from the router with a raw socket (the router's ping sockets may be
/// off, and the self-test does not change the router's sysctls). Whether it answered.
fn router_ping(addr: IpAddr, timeout: Duration) -> io::Result<bool> {
    let (domain, protocol, request, reply) = match addr {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128u8, 129u8),
    };
    let socket = Socket::new(domain, Type::RAW, Some(protocol))?;
    let id = (std::process::id() as u16) ^ 0x5e1f;
    let seq = (u32::from_be_bytes(match addr {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(a) => {
            let o = a.octets();
            [o[12], o[13], o[14], o[15]]
        }
    }) & 0xffff) as u16;
    let mut packet = vec![request, 0, 0, 0];
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend_from_slice(b"cage-selftest");
    if addr.is_ipv4() {
        let sum = checksum(&packet);
        packet[2..4].copy_from_slice(&sum.to_be_bytes());
    } // the kernel fills in ICMPv6 checksums of raw sockets
    socket.send_to(&packet, &SockAddr::from(SocketAddr::new(addr, 0)))?;
    let deadline = Instant::now() + timeout;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
    for _ in 0..1000 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        socket.set_read_timeout(Some(left))?;
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // SAFETY: recv_from initialised the first `n` bytes.
        let data: Vec<u8> = buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        // IPv4 raw sockets deliver the IP header too; IPv6 ones do not.
        let icmp = match addr {
            IpAddr::V4(_) => {
                let ihl = usize::from(data.first().copied().unwrap_or(0) & 0x0f) * 4;
                data.get(ihl..).unwrap_or(&[])
            }
            IpAddr::V6(_) => &data[..],
        };
        if from.as_socket().map(|s| s.ip()) == Some(addr)
            && icmp.len() >= 8
            && icmp[0] == reply
            && icmp[4..6] == id.to_be_bytes()
            && icmp[6..8] == seq.to_be_bytes()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether the router reaches its WAN gateways (context for the internet checks).
pub(super) fn gateway_notes(view: &RouterView, facts: &crate::policy::Facts) -> Vec<String> {
    let gateways: Vec<IpAddr> = view
        .gateways
        .iter()
        .copied()
        .filter(|g| !is_link_local(*g))
        .collect();
    if gateways.is_empty() {
        return vec![if facts.wan_devices.is_empty() {
            "the router has no default route: it is offline, and Cage allows no egress".into()
        } else {
            "the router's default routes name no gateway address to check".into()
        }];
    }
    gateways
        .into_iter()
        .map(|g| match router_ping(g, Duration::from_millis(500)) {
            Ok(true) => format!("the router reaches its upstream gateway {g} (it answered a ping)"),
            Ok(false) => format!(
                "the router's upstream gateway {g} did not answer the router's ping: if an \
                 internet target fails too, the upstream may be down rather than the cage"
            ),
            Err(e) => format!("could not ping the upstream gateway {g} from the router: {e}"),
        })
        .collect()
}

pub(super) fn is_link_local(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
    }
}

// ---- probing --------------------------------------------------------------------------

pub(super) struct Ctx<'a> {
    pub(super) a: NetNs,
    pub(super) b: NetNs,
    pub(super) witness_router: &'a Witness,
    pub(super) witness_a: &'a Witness,
    pub(super) witness_b: &'a Witness,
}

/// Run the plan: [`PARALLEL`] workers, starts [`SPACING`] apart, nothing started after
/// [`BUDGET`] or an interruption.
pub(super) fn run_plan(plan: &[Planned], ctx: &Ctx) -> Vec<Check> {
    let deadline = Instant::now() + BUDGET;
    let next = AtomicUsize::new(0);
    let slot = Mutex::new(Instant::now());
    let results: Mutex<Vec<Option<Check>>> = Mutex::new(vec![None; plan.len()]);
    std::thread::scope(|s| {
        for _ in 0..PARALLEL.min(plan.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(planned) = plan.get(i) else {
                    break;
                };
                let check = if interrupted() {
                    not_run(planned, "not run: interrupted")
                } else if Instant::now() >= deadline {
                    not_run(planned, "not run: the time budget was spent")
                } else {
                    {
                        let mut at = slot.lock().unwrap();
                        let now = Instant::now();
                        if *at > now {
                            std::thread::sleep(*at - now);
                        }
                        *at = (*at).max(now) + SPACING;
                    }
                    run_one(planned, ctx)
                };
                results.lock().unwrap()[i] = Some(check);
            });
        }
    });
    results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|c| c.expect("every planned probe has a result"))
        .collect()
}

fn target_text(p: &Probe) -> String {
    match (p.proto, p.dst) {
        (Proto::Icmp, d) => d.to_string(),
        (_, d) => SocketAddr::new(d, p.port).to_string(),
    }
}

fn expect_text(e: Expect) -> &'static str {
    match e {
        Expect::Allow => "allow",
        Expect::Deny => "deny",
    }
}

fn not_run(p: &Planned, why: &str) -> Check {
    Check {
        name: p.name.clone(),
        target: target_text(&p.probe),
        proto: p.probe.proto.to_string(),
        expected: expect_text(p.expect).into(),
        observed: why.into(),
        ok: None,
        judged_by: p.judge.label().into(),
        detail: String::new(),
    }
}

/// The errno in a refusal ("Connection refused (os error 111)").
fn os_error(outcome: &Outcome) -> Option<i32> {
    let Outcome::Refused(text) = outcome else {
        return None;
    };
    let at = text.rfind("os error ")?;
    text[at + 9..].trim_end_matches(')').parse().ok()
}

/// Whether the probe reached its destination, by what came back: an answer, a completed
/// TCP handshake, or a port-unreachable from the destination's own stack.
fn reached(a: &Attempt) -> Option<&'static str> {
    match &a.outcome {
        Outcome::Answered => Some("ANSWERED"),
        Outcome::WrongAnswer(_) => Some("ANSWERED (not the echo)"),
        // The socket's address is only recorded once a TCP handshake completed.
        _ if a.probe.proto == Proto::Tcp && a.local.is_some() => Some("CONNECTED"),
        o if a.probe.proto == Proto::Udp && os_error(o) == Some(libc::ECONNREFUSED) => {
            Some("PORT UNREACHABLE from the host (it was reached)")
        }
        _ => None,
    }
}

/// How a probe that reached nothing ended, in words.
fn refusal(a: &Attempt) -> String {
    match (&a.outcome, os_error(&a.outcome)) {
        (Outcome::TimedOut, _) => "no answer".into(),
        (_, Some(libc::ECONNREFUSED)) if a.probe.proto == Proto::Tcp => "reset".into(),
        (_, Some(libc::EACCES | libc::EPERM)) => "rejected (prohibited)".into(),
        (_, Some(libc::EHOSTUNREACH)) => "rejected (unreachable/prohibited)".into(),
        (_, Some(libc::ENETUNREACH)) => "rejected (network unreachable)".into(),
        (o, _) => o.to_string(),
    }
}

/// For a probe the router's witness saw delivered: whether anything listens there.
fn listening(a: &Attempt) -> &'static str {
    match (&a.outcome, a.probe.proto) {
        (Outcome::Answered, _) => "allowed, answered",
        (_, Proto::Tcp) if a.local.is_some() => "allowed, listening",
        (o, _) if os_error(o) == Some(libc::ECONNREFUSED) => "allowed by policy, nothing listening",
        (Outcome::TimedOut, Proto::Udp) => "allowed (delivered; no answer to the probe's payload)",
        _ => "allowed (delivered)",
    }
}

/// `check` failed with an error (`detail`) before it could be judged.
fn failed(mut check: Check, detail: String) -> Check {
    check.observed = "ERROR".into();
    check.ok = Some(false);
    check.detail = detail;
    check
}

fn run_one(planned: &Planned, ctx: &Ctx) -> Check {
    let mut check = not_run(planned, "");
    let from = match planned.from {
        Src::A => &ctx.a,
        Src::B => &ctx.b,
    };
    let attempt = match probe::probe_in(from, &planned.probe) {
        Ok(a) => a,
        Err(e) => return failed(check, format!("the probe could not be made: {e}")),
    };
    let witness = match planned.judge {
        Judge::Router => Some(ctx.witness_router),
        Judge::HostA => Some(ctx.witness_a),
        Judge::HostB => Some(ctx.witness_b),
        Judge::Prober => None,
    };
    let reached = reached(&attempt);
    let Some(witness) = witness else {
        // Beyond the router: the prober's outcome alone.
        let (observed, ok) = match (planned.expect, reached) {
            (Expect::Deny, None) => (refusal(&attempt), true),
            (Expect::Deny, Some(r)) => (r.to_owned(), false),
            (Expect::Allow, Some(_)) => ("answered".to_owned(), true),
            (Expect::Allow, None) => (format!("NOT REACHED: {}", refusal(&attempt)), false),
        };
        check.observed = observed;
        check.ok = Some(ok);
        if !ok {
            check.detail = format!("{}: {}", attempt.probe, attempt.outcome);
        }
        return check;
    };
    let observation = match witness.judge(attempt) {
        Ok(o) => o,
        Err(e) => return failed(check, format!("cannot judge: {e}")),
    };
    let attempt = &observation.attempt;
    // The probe's own packets: from its source address (and, for TCP, whose SYN carries
    // no token, from its source port).
    let seen: Vec<_> = observation
        .seen
        .iter()
        .filter(|r| Some(r.src) == attempt.probe.src)
        .filter(|r| attempt.probe.proto != Proto::Tcp || Some(r.src_port) == attempt.probe.src_port)
        .collect();
    let delivered = !seen.is_empty();
    let (observed, ok) = match (planned.expect, delivered) {
        (Expect::Allow, true) => (listening(attempt).to_owned(), true),
        (Expect::Allow, false) => (format!("BLOCKED ({})", refusal(attempt)), false),
        (Expect::Deny, false) => match reached {
            None => (refusal(attempt), true),
            Some(r) => (format!("{r}, though the witness saw nothing arrive"), false),
        },
        (Expect::Deny, true) => (
            match reached {
                Some(r) => format!("DELIVERED and {r}"),
                None => "DELIVERED (got past the firewall)".to_owned(),
            },
            false,
        ),
    };
    check.observed = observed;
    check.ok = Some(ok);
    if !ok {
        check.detail = format!(
            "{}: {}; {}",
            attempt.probe,
            attempt.outcome,
            match seen.first() {
                Some(r) => format!("witness saw {r}"),
                None => "witness saw nothing".into(),
            }
        );
    }
    check
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_of_the_range() {
        let net: Ipv4Net = "192.168.10.1/24".parse::<Ipv4Net>().unwrap().trunc();
        assert_eq!(
            top_hosts4(net, 2),
            vec![
                Ipv4Addr::new(192, 168, 10, 254),
                Ipv4Addr::new(192, 168, 10, 253)
            ]
        );
        assert!(top_hosts4("10.0.0.0/31".parse().unwrap(), 2).is_empty());
        assert_eq!(top_hosts4("10.0.0.0/30".parse().unwrap(), 8).len(), 2);
        let net6: Ipv6Net = "fd00:cafe:10::/64".parse().unwrap();
        assert_eq!(
            top_hosts6(net6, 1),
            vec!["fd00:cafe:10:0:ffff:ffff:ffff:fffe"
                .parse::<Ipv6Addr>()
                .unwrap()]
        );
    }

    #[test]
    fn spoofed_sources_are_outside_the_subnet() {
        assert_eq!(
            spoof_source4("192.0.2.0/24".parse().unwrap()),
            Ipv4Addr::new(198, 51, 100, 99)
        );
        assert!(!"fd00::/64"
            .parse::<Ipv6Net>()
            .unwrap()
            .contains(&spoof_source6("fd00::/64".parse().unwrap())));
    }

    #[test]
    fn errno_of_a_refusal() {
        assert_eq!(
            os_error(&Outcome::Refused(
                "Connection refused (os error 111)".into()
            )),
            Some(111)
        );
        assert_eq!(os_error(&Outcome::TimedOut), None);
    }

    #[test]
    fn checksum_of_an_echo_request() {
        // type 8, code 0, id 1, seq 1: the sum of the words is 0x0802.
        assert_eq!(checksum(&[8, 0, 0, 0, 0, 1, 0, 1]), !0x0802);
    }
}
