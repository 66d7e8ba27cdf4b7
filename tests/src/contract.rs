//! MISSION.md's connectivity contract as data, and a runner that proves it in the lab.
//!
//! [`ROWS`] lists, for each row of the contract, who sends, to which of the lab's
//! addresses, over what, and whether Cage must let it through; [`checks`] expands it into
//! one [`Check`] per (destination, service). [`run_matrix`] starts a witness and echo
//! servers in every destination namespace, makes every probe, judges each by what the
//! witness saw (see `cage_agent::probe`), prints the matrix and returns a [`Report`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cage_agent::probe::{
    self, Family, NetNs, Probe, Proto, Servers, Service, Verdict, Witness, WitnessLimits,
};

use crate::lab::*;

/// What Cage must do with a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Expect {
    Allow,
    Deny,
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Expect::Allow => "allow",
            Expect::Deny => "deny",
        })
    }
}

/// Who sends a probe: a node of the lab and the source address it uses there (always
/// explicit: ai1 carries spoofable addresses, and the LAN host two addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Host {
    Ai1,
    /// ai2, which reaches ai1 through static neighbour entries (no ARP, no ND).
    Ai2,
    /// ai1 sending from addresses outside the segment's subnet.
    Ai1Spoofed,
    Lan,
    /// The LAN host's admin address (192.168.8.20 / fd00:8::20).
    LanAdmin,
}

impl Host {
    pub fn node(self) -> Node {
        match self {
            Host::Ai1 | Host::Ai1Spoofed => Node::Ai1,
            Host::Ai2 => Node::Ai2,
            Host::Lan | Host::LanAdmin => Node::Lan,
        }
    }

    pub fn src(self, family: Family) -> IpAddr {
        let (four, six) = match self {
            Host::Ai1 => (AI1_4, AI1_6),
            Host::Ai2 => (AI2_4, AI2_6),
            Host::Ai1Spoofed => (AI1_SPOOF4, AI1_SPOOF6),
            Host::Lan => (LAN_HOST4, LAN_HOST6),
            Host::LanAdmin => (LAN_ADMIN4, LAN_ADMIN6),
        };
        match family {
            Family::V4 => four,
            Family::V6 => six,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Host::Ai1 => "ai1",
            Host::Ai2 => "ai2",
            Host::Ai1Spoofed => "ai1 spoofed",
            Host::Lan => "lan",
            Host::LanAdmin => "lan admin",
        }
    }
}

/// What a probe speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Svc {
    Tcp(u16),
    Udp(u16),
    /// UDP from a fixed source port (DHCP: 68 → 67, DHCPv6: 546 → 547).
    UdpFrom(u16, u16),
    Icmp,
}

/// One row of the contract, for the lab.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    pub name: &'static str,
    pub from: Host,
    pub to: &'static [IpAddr],
    pub services: &'static [Svc],
    pub expect: Expect,
}

use Expect::{Allow, Deny};
use Svc::{Icmp, Tcp, Udp, UdpFrom};

const ROUTER_ALL: &[IpAddr] = &[
    ROUTER_SEG4,
    ROUTER_SEG6,
    ROUTER_LAN4,
    ROUTER_LAN6,
    ROUTER_WAN4,
    ROUTER_WAN6,
];
const PRIVATE_ALL: &[IpAddr] = &[
    PRIVATE[0].0,
    PRIVATE[1].0,
    PRIVATE[2].0,
    PRIVATE[3].0,
    PRIVATE[4].0,
    PRIVATE[5].0,
    PRIVATE[6].0,
    PRIVATE[7].0,
];

/// The connectivity contract, row by row (MISSION.md, "The connectivity contract").
/// Not covered here: multicast destinations (the lab routes no multicast, so a baseline
/// could not show them reachable), IPv6 link-local beyond the link (never forwarded by any
/// router) and the kill switch (its own tests).
pub const ROWS: &[Row] = &[
    Row {
        name: "caged -> internet",
        from: Host::Ai1,
        to: &[PUBLIC4, PUBLIC6],
        services: &[Tcp(80), Tcp(443), Udp(53), Udp(443), Icmp],
        expect: Allow,
    },
    Row {
        name: "caged -> internet",
        from: Host::Ai2,
        to: &[PUBLIC4, PUBLIC6],
        services: &[Tcp(443), Icmp],
        expect: Allow,
    },
    Row {
        name: "caged -> router DNS",
        from: Host::Ai1,
        to: &[ROUTER_SEG4, ROUTER_SEG6],
        services: &[Tcp(53), Udp(53)],
        expect: Allow,
    },
    Row {
        name: "caged -> router DHCP",
        from: Host::Ai1,
        to: &[ROUTER_SEG4],
        services: &[UdpFrom(68, 67)],
        expect: Allow,
    },
    Row {
        name: "caged -> router DHCPv6",
        from: Host::Ai1,
        to: &[ROUTER_SEG6],
        services: &[UdpFrom(546, 547)],
        expect: Allow,
    },
    Row {
        name: "caged -> router other",
        from: Host::Ai1,
        to: ROUTER_ALL,
        services: &[Tcp(22), Tcp(80), Tcp(443), Tcp(8080), Udp(161), Icmp],
        expect: Deny,
    },
    Row {
        name: "caged -> LAN",
        from: Host::Ai1,
        to: &[LAN_HOST4, LAN_HOST6, LAN_ADMIN4, LAN_ADMIN6],
        services: &[Tcp(22), Tcp(80), Udp(53), Icmp],
        expect: Deny,
    },
    Row {
        name: "caged -> upstream local",
        from: Host::Ai1,
        to: &[HOTEL4, HOTEL6, UPSTREAM_GW4, UPSTREAM_GW6],
        services: &[Tcp(80), Udp(53), Icmp],
        expect: Deny,
    },
    Row {
        name: "caged -> private range",
        from: Host::Ai1,
        to: PRIVATE_ALL,
        services: &[Tcp(80), Udp(53), Icmp],
        expect: Deny,
    },
    Row {
        name: "caged -> caged (ARP/ND)",
        from: Host::Ai1,
        to: &[AI2_4, AI2_6],
        services: &[Tcp(22), Udp(53), Icmp],
        expect: Deny,
    },
    Row {
        name: "caged -> caged (static neigh)",
        from: Host::Ai2,
        to: &[AI1_4, AI1_6],
        services: &[Tcp(22), Udp(53), Icmp],
        expect: Deny,
    },
    Row {
        name: "LAN -> caged",
        from: Host::Lan,
        to: &[AI1_4, AI1_6],
        services: &[Tcp(22), Udp(53), Icmp],
        expect: Deny,
    },
    Row {
        name: "LAN admin -> caged",
        from: Host::LanAdmin,
        to: &[AI1_4, AI1_6],
        services: &[Tcp(22), Udp(53), Icmp],
        expect: Allow,
    },
    Row {
        name: "LAN -> internet",
        from: Host::Lan,
        to: &[PUBLIC4, PUBLIC6],
        services: &[Tcp(443), Udp(53), Icmp],
        expect: Allow,
    },
    Row {
        name: "LAN -> router",
        from: Host::Lan,
        to: &[ROUTER_LAN4, ROUTER_LAN6],
        services: &[Tcp(22), Tcp(80), Tcp(443), Tcp(8080), Udp(53), Icmp],
        expect: Allow,
    },
    Row {
        name: "spoofed -> internet",
        from: Host::Ai1Spoofed,
        to: &[PUBLIC4, PUBLIC6],
        services: &[Tcp(443), Udp(53), Icmp],
        expect: Deny,
    },
    Row {
        name: "spoofed -> router DNS",
        from: Host::Ai1Spoofed,
        to: &[ROUTER_SEG4, ROUTER_SEG6],
        services: &[Tcp(53), Udp(53)],
        expect: Deny,
    },
];

/// The configuration lines the contract assumes on top of the lab's base configuration
/// (see `Lab::write_config`): the LAN host's .20 / ::20 is an admin host.
pub const CONFIG_EXTRA: &str = "\tlist admin_host '192.168.8.20'\n\tlist admin_host 'fd00:8::20'\n";

/// The echo services every destination namespace runs during a matrix: all the ports
/// [`ROWS`] probe.
pub const SERVICES: &[Service] = &[
    Service::tcp(22),
    Service::tcp(53),
    Service::tcp(80),
    Service::tcp(443),
    Service::tcp(8080),
    Service::udp(53),
    Service::udp(67),
    Service::udp(161),
    Service::udp(443),
    Service::udp(547),
];

/// One probe with its expected verdict.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Check {
    pub row: &'static str,
    pub from: Host,
    pub to: Node,
    pub dst: IpAddr,
    pub proto: Proto,
    pub port: u16,
    pub src_port: Option<u16>,
    pub expect: Expect,
}

/// How long a probe waits for its answer: a reject answers at once, a drop costs this.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

impl Check {
    pub fn family(&self) -> Family {
        Family::of(self.dst)
    }

    pub fn probe(&self) -> Probe {
        let mut p = Probe::new(self.proto, self.dst, self.port)
            .from(self.from.src(self.family()))
            .timeout(PROBE_TIMEOUT);
        p.src_port = self.src_port;
        p
    }

    /// The same check with another expectation (the baseline expects everything to
    /// get through).
    pub fn expecting(mut self, expect: Expect) -> Check {
        self.expect = expect;
        self
    }

    /// Probes that must not run at the same time (a TCP SYN carries no token: it is
    /// recognised by destination address and port alone; a fixed source port can be
    /// bound once).
    fn lane_key(&self) -> (IpAddr, Proto, u16) {
        (self.dst, self.proto, self.port)
    }

    /// `dst:port` or `dst` for ICMP, with the source port if fixed.
    pub fn target(&self) -> String {
        let dst = match (self.proto, self.dst) {
            (Proto::Icmp, d) => d.to_string(),
            (_, IpAddr::V4(d)) => format!("{d}:{}", self.port),
            (_, IpAddr::V6(d)) => format!("[{d}]:{}", self.port),
        };
        match self.src_port {
            Some(p) => format!("{dst} (from :{p})"),
            None => dst,
        }
    }
}

/// Every check of the contract, expanded from [`ROWS`].
pub fn checks() -> Vec<Check> {
    let mut out = Vec::new();
    for row in ROWS {
        for &dst in row.to {
            let to = Node::of(dst).unwrap_or_else(|| panic!("{dst} is not a lab address"));
            for &svc in row.services {
                let (proto, port, src_port) = match svc {
                    Tcp(p) => (Proto::Tcp, p, None),
                    Udp(p) => (Proto::Udp, p, None),
                    UdpFrom(s, p) => (Proto::Udp, p, Some(s)),
                    Icmp => (Proto::Icmp, 0, None),
                };
                out.push(Check {
                    row: row.name,
                    from: row.from,
                    to,
                    dst,
                    proto,
                    port,
                    src_port,
                    expect: row.expect,
                });
            }
        }
    }
    out
}

/// The result of one check.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub check: Check,
    /// The verdict, or why there is none (the probe could not be made or judged).
    pub observed: Result<Verdict, String>,
    /// The prober's outcome and what the witness saw.
    pub detail: String,
    pub elapsed: Duration,
}

impl CheckResult {
    pub fn ok(&self) -> bool {
        matches!(
            (self.check.expect, &self.observed),
            (Expect::Allow, Ok(Verdict::Delivered)) | (Expect::Deny, Ok(Verdict::Blocked))
        )
    }

    fn observed_text(&self) -> String {
        match &self.observed {
            Ok(v) => v.to_string(),
            Err(_) => "ERROR".into(),
        }
    }
}

/// All results of a matrix run.
#[derive(Debug, Clone)]
pub struct Report {
    pub results: Vec<CheckResult>,
    pub elapsed: Duration,
}

impl Report {
    pub fn failures(&self) -> Vec<&CheckResult> {
        self.results.iter().filter(|r| !r.ok()).collect()
    }

    /// The matrix as a table, failures detailed at the end.
    pub fn table(&self) -> String {
        let mut rows: Vec<Vec<String>> = vec![[
            "check", "from", "to", "proto", "family", "expected", "observed", "ok", "time",
        ]
        .map(String::from)
        .into()];
        for r in &self.results {
            let c = &r.check;
            rows.push(vec![
                c.row.into(),
                c.from.label().into(),
                c.target(),
                c.proto.to_string(),
                c.family().to_string(),
                c.expect.to_string(),
                r.observed_text(),
                if r.ok() { "ok" } else { "FAIL" }.into(),
                format!("{} ms", r.elapsed.as_millis()),
            ]);
        }
        let mut out = cage_agent::selftest::text_table(&rows);
        let failures = self.failures();
        let _ = writeln!(
            out,
            "\n{} checks, {} passed, {} failed, in {:.1} s",
            self.results.len(),
            self.results.len() - failures.len(),
            failures.len(),
            self.elapsed.as_secs_f64()
        );
        for f in failures {
            let c = &f.check;
            let why = match &f.observed {
                Ok(_) => f.detail.clone(),
                Err(e) => e.clone(),
            };
            let _ = writeln!(
                out,
                "FAIL {} {} -> {} {} (expected {}): {why}",
                c.row,
                c.from.label(),
                c.target(),
                c.proto,
                c.expect
            );
        }
        out
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.table())
    }
}

/// Probes in flight at once at most.
pub const PARALLEL: usize = 24;

/// Run `checks` in `lab`, print the matrix, return the report.
///
/// A witness and echo servers ([`SERVICES`]) run in every destination namespace for the
/// duration. The router's segment addresses are pinned in ai1's neighbour table first
/// (see `Lab::pin_router_neighbours`), so the segment (Cage's `br-cage`, or
/// `Lab::plain_segment`) must exist. Probes towards different (address, protocol, port)
/// run in parallel; those towards the same one run one after the other.
///
/// Panics when the witnesses or servers cannot be started: then nothing can be judged.
pub fn run_matrix(lab: &Lab, checks: &[Check]) -> Report {
    let started = Instant::now();
    lab.wait_segment_ready()
        .unwrap_or_else(|e| panic!("the segment is not ready: {e}"));
    if checks.iter().any(|c| c.from.node() == Node::Ai1) {
        lab.pin_router_neighbours(Node::Ai1)
            .unwrap_or_else(|e| panic!("pinning the router in ai1: {e}"));
    }
    let targets: BTreeSet<Node> = checks.iter().map(|c| c.to).collect();
    let limits = WitnessLimits {
        max_duration: Duration::from_secs(300),
        max_records: 200_000,
    };
    let mut witnesses = BTreeMap::new();
    let mut servers = Vec::new();
    for &node in &targets {
        let ns = lab.netns(node);
        let s = Servers::start(&ns, SERVICES, limits.max_duration)
            .unwrap_or_else(|e| panic!("starting echo servers in {node}: {e}"));
        for (family, service) in s.taken() {
            eprintln!("note: {service} ({family}) in {node} is served by something else");
        }
        servers.push(s);
        let w = Witness::start(&ns, limits)
            .unwrap_or_else(|e| panic!("starting the witness in {node}: {e}"));
        witnesses.insert(node, w);
    }

    // Lanes: checks with the same key, in table order; the lanes run in parallel.
    let mut lanes: BTreeMap<(IpAddr, Proto, u16), Vec<usize>> = BTreeMap::new();
    for (i, c) in checks.iter().enumerate() {
        lanes.entry(c.lane_key()).or_default().push(i);
    }
    // Longest lanes first, so the run ends when the longest one does.
    let mut queue: Vec<Vec<usize>> = lanes.into_values().collect();
    queue.sort_by_key(|l| std::cmp::Reverse(l.len()));
    queue.reverse(); // popped from the end
    let queue = Mutex::new(queue);
    let results: Mutex<Vec<Option<CheckResult>>> = Mutex::new(vec![None; checks.len()]);

    std::thread::scope(|scope| {
        for _ in 0..PARALLEL.min(checks.len()) {
            scope.spawn(|| loop {
                let Some(lane) = queue.lock().unwrap().pop() else {
                    break;
                };
                for i in lane {
                    let r = run_check(lab, &witnesses, &checks[i]);
                    results.lock().unwrap()[i] = Some(r);
                }
            });
        }
    });

    for w in witnesses.into_values() {
        if let Err(e) = w.stop() {
            eprintln!("warning: {e}");
        }
    }
    for s in servers {
        let _ = s.stop();
    }
    let report = Report {
        results: results
            .into_inner()
            .unwrap()
            .into_iter()
            .map(|r| r.expect("every check ran"))
            .collect(),
        elapsed: started.elapsed(),
    };
    println!("{report}");
    report
}

fn run_check(lab: &Lab, witnesses: &BTreeMap<Node, Witness>, check: &Check) -> CheckResult {
    let t = Instant::now();
    let from: NetNs = lab.netns(check.from.node());
    let witness = &witnesses[&check.to];
    let (observed, detail) = match witness.observe(&from, &check.probe()) {
        Ok(o) => (Ok(o.verdict), o.summary()),
        Err(e) => (Err(e.to_string()), String::new()),
    };
    CheckResult {
        check: check.clone(),
        observed,
        detail,
        elapsed: t.elapsed(),
    }
}

/// Make one probe in the lab and judge it, outside a matrix (for ad-hoc tests). Starts
/// a witness and servers in the destination's namespace for the duration.
pub fn probe_once(lab: &Lab, from: Node, probe: &Probe) -> Result<probe::Observation, String> {
    let to = Node::of(probe.dst).ok_or_else(|| format!("{} is not a lab address", probe.dst))?;
    let ns = lab.netns(to);
    let servers =
        Servers::start(&ns, SERVICES, Duration::from_secs(60)).map_err(|e| e.to_string())?;
    let witness = Witness::start(
        &ns,
        WitnessLimits {
            max_duration: Duration::from_secs(60),
            max_records: 10_000,
        },
    )
    .map_err(|e| e.to_string())?;
    let result = witness
        .observe(&lab.netns(from), probe)
        .map_err(|e| e.to_string());
    drop(witness);
    drop(servers);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_destination_is_a_lab_address_and_checks_are_distinct() {
        let all = checks();
        assert!(all.len() > 100, "{} checks", all.len());
        let distinct: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), all.len(), "duplicate checks in ROWS");
        for c in &all {
            assert_ne!(c.from.node(), c.to, "{c:?} probes its own namespace");
        }
    }

    #[test]
    fn every_contract_row_has_allow_and_deny_coverage_in_both_families() {
        let all = checks();
        for family in [Family::V4, Family::V6] {
            for proto in [Proto::Tcp, Proto::Udp, Proto::Icmp] {
                for expect in [Expect::Allow, Expect::Deny] {
                    assert!(
                        all.iter().any(|c| c.family() == family
                            && c.proto == proto
                            && c.expect == expect),
                        "no {expect} check for {proto} over {family}"
                    );
                }
            }
        }
    }
}
