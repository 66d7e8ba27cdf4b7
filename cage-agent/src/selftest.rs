//! `cage selftest`: prove the connectivity contract on the live router, with real
//! packets, from inside the AI segment.
//!
//! The self-test plugs two throwaway probe hosts into the live segment bridge, as caged
//! hosts would be plugged in: each is an anonymous network namespace (`cage-st-<pid>-a`
//! and `-b` in messages) behind a veth pair whose router end (`cst<pid>a`, `cst<pid>b`) is
//! an isolated port of the bridge. They take free addresses at the top of the segment's
//! subnets, default routes via the router's segment addresses, and then probe every row
//! of the contract they can from there. The namespaces are held only by file descriptors
//! of this process: however it ends (even SIGKILL), the kernel removes them and their
//! veth pairs with it. The normal path, errors and Ctrl-C remove the router ends
//! explicitly, and the neighbour entries the probes left on the router.
//!
//! How probes are judged:
//! - **towards the router itself** (its services on every address, DNS, DHCP, spoofed
//!   sources, multicast): a [`Witness`] in the router's own namespace sees every packet
//!   that got past the input hook, so "denied" and "allowed" are proven, whether or not
//!   anything listens;
//! - **between the two probe hosts** (caged ↔ caged): a witness in the receiving probe
//!   host, and echo servers there;
//! - **beyond the router** (LAN hosts, the upstream network, private ranges, the
//!   internet): nothing of ours runs there, so the prober judges alone: a deny holds
//!   when the probe gets no answer or a reject, an allow when it gets an answer. A TCP
//!   reset looks the same from Cage and from a closed port on a host that was reached;
//!   the ICMP and UDP probes of the same destination tell them apart (an echo reply, or a
//!   port-unreachable from the host's own stack, fails the check).
//!
//! The traffic is tagged so that the flow log can mark it as self-test: the probe hosts'
//! MAC addresses start with [`MAC_PREFIX`], TCP and UDP probes leave from
//! [`SOURCE_PORTS`] (ICMP echoes use them as identifier), and every UDP, ICMP and TCP
//! payload carries `cage-probe:` and a token (see `probe::Token`).
//!
//! Bounded: each probe waits at most [`PROBE_TIMEOUT`], at most [`PARALLEL`] run at once,
//! starts are [`SPACING`] apart (no more than 100 probes a second, below the rate at
//! which Cage's rejects turn into silent drops), and probes not started within
//! [`BUDGET`] are reported as not run.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::config::Config;
use crate::netlink::selftest::{self as nl, RouterView};
use crate::netlink::{self, NetlinkError};
use crate::nft;
use crate::probe::{
    self, Attempt, NetNs, NetNsGuard, Outcome, Probe, ProbeError, Proto, Servers, Service, Witness,
    WitnessLimits,
};

/// The first five bytes of the probe hosts' MAC addresses (and of their router-side
/// ports). `fe` is a locally administered unicast first byte, and the highest one: the
/// bridge takes the lowest MAC of its ports as its own unless one was set, so a high
/// one never changes the bridge's address under the real caged hosts.
pub const MAC_PREFIX: [u8; 5] = [0xfe, 0xca, 0x9e, 0x5e, 0x1f];
/// Source ports of the self-test's TCP and UDP probes, and identifiers of its ICMP
/// echoes (above Linux's default ephemeral range, 32768–60999). DHCP probes leave from
/// 68 and 546, as DHCP clients do.
pub const SOURCE_PORTS: RangeInclusive<u16> = 61000..=61999;
/// How long one probe waits for its answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Probes in flight at once at most.
pub const PARALLEL: usize = 16;
/// Time between two probe starts at least.
pub const SPACING: Duration = Duration::from_millis(10);
/// Probes not started this long after the first are not run.
pub const BUDGET: Duration = Duration::from_secs(20);
/// The last result, in the log directory.
pub const RESULT_FILE: &str = "selftest.json";
/// While a self-test runs: its pid and its probe hosts' addresses (see [`running`]).
pub const RUNNING_FILE: &str = "selftest.running.json";
const LOCK_FILE: &str = "selftest.lock";

/// The probe hosts' MACs (inside the namespaces) and their router-side ports'.
const HOST_MAC: [[u8; 6]; 2] = [mac(0x0a), mac(0x0b)];
const PORT_MAC: [[u8; 6]; 2] = [mac(0x1a), mac(0x1b)];

const fn mac(last: u8) -> [u8; 6] {
    let p = MAC_PREFIX;
    [p[0], p[1], p[2], p[3], p[4], last]
}

fn mac_text(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

// ---- errors ---------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum SelftestError {
    #[error("another cage selftest is running (it holds {})", path.display())]
    Busy { path: PathBuf },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error(
        "the segment bridge {bridge} (cage.ai.bridge) does not exist or is not a bridge; \
         set the segment up first (`cage apply`)"
    )]
    NoBridge { bridge: String },
    #[error("no free address for a probe host in {subnet}: {why}")]
    NoFreeAddress { subnet: String, why: String },
    #[error("{0}")]
    Setup(String),
    #[error("interrupted; everything the self-test made was removed")]
    Interrupted,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SelftestError {
    let what = what.into();
    move |source| SelftestError::Io { what, source }
}

// ---- options --------------------------------------------------------------------------

/// An internet destination the owner names: pinged, or connected to over TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Ping(IpAddr),
    Connect(SocketAddr),
}

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Target, String> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(Target::Connect(sa));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Target::Ping(ip));
        }
        Err(format!(
            "'{s}' is not an address (pinged, e.g. 203.0.113.10) or address:port \
             (connected to over TCP, e.g. 203.0.113.10:443 or [2001:db8::10]:443)"
        ))
    }
}

impl Target {
    fn addr(self) -> IpAddr {
        match self {
            Target::Ping(a) => a,
            Target::Connect(sa) => sa.ip(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Internet destinations that must be reachable from the segment.
    pub targets: Vec<Target>,
}

// ---- interruption ---------------------------------------------------------------------

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT, SIGTERM and SIGHUP set a flag instead of ending the process, while this
/// value lives: the self-test stops at the next probe and cleans up. The previous
/// handlers come back when it is dropped.
pub struct Interrupts {
    old: Vec<(libc::c_int, libc::sigaction)>,
}

pub fn catch_interrupts() -> Interrupts {
    let mut old = Vec::new();
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic,
        // which is async-signal-safe.
        unsafe {
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            new.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut new.sa_mask);
            let mut prev: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, &new, &mut prev) == 0 {
                old.push((sig, prev));
            }
        }
    }
    Interrupts { old }
}

impl Drop for Interrupts {
    fn drop(&mut self) {
        for (sig, prev) in &self.old {
            // SAFETY: restores a sigaction the kernel gave us.
            unsafe { libc::sigaction(*sig, prev, std::ptr::null_mut()) };
        }
    }
}

/// A signal asked the self-test to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupted() -> Result<(), SelftestError> {
    if interrupted() {
        Err(SelftestError::Interrupted)
    } else {
        Ok(())
    }
}

// ---- the result -----------------------------------------------------------------------

/// One check and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// The contract row, e.g. `caged -> LAN`.
    pub name: String,
    /// `address:port`, an address (ICMP), or a device.
    pub target: String,
    /// `tcp`, `udp`, `icmp`, or `state` for what is read from the kernel.
    pub proto: String,
    pub expected: String,
    pub observed: String,
    /// `None`: not run (the reason is in `observed`).
    pub ok: Option<bool>,
    /// `witness@router`, `witness@probe-b`, `prober` or `kernel`.
    pub judged_by: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// A probe host as the flow log will see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeHost {
    pub name: String,
    /// The router-side port in the segment bridge.
    pub port: String,
    pub mac: String,
    pub addresses: Vec<IpAddr>,
}

/// A whole self-test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Unix time (seconds) at the end of the run.
    pub finished_at: u64,
    pub duration_ms: u64,
    /// Every check that ran holds, and at least one ran.
    pub ok: bool,
    /// "all N checks hold" or "K of N checks FAIL: …".
    pub verdict: String,
    pub checks: Vec<Check>,
    /// What the checks could not cover, and why.
    pub notes: Vec<String>,
    pub probe_hosts: Vec<ProbeHost>,
}

impl Report {
    fn new(
        checks: Vec<Check>,
        notes: Vec<String>,
        probe_hosts: Vec<ProbeHost>,
        took: Duration,
    ) -> Report {
        let ran: Vec<&Check> = checks.iter().filter(|c| c.ok.is_some()).collect();
        let failed: Vec<&Check> = ran
            .iter()
            .copied()
            .filter(|c| c.ok == Some(false))
            .collect();
        let skipped = checks.len() - ran.len();
        let skipped_text = if skipped > 0 {
            format!(" ({skipped} not run)")
        } else {
            String::new()
        };
        let ok = failed.is_empty() && !ran.is_empty();
        let verdict = if ran.is_empty() {
            "no check ran".to_owned()
        } else if ok {
            format!("all {} checks hold{skipped_text}", ran.len())
        } else {
            let list: Vec<String> = failed
                .iter()
                .take(8)
                .map(|c| format!("{} {} {}", c.name, c.target, c.proto))
                .collect();
            let more = if failed.len() > 8 {
                format!("; and {} more", failed.len() - 8)
            } else {
                String::new()
            };
            format!(
                "{} of {} checks FAIL{skipped_text}: {}{more}",
                failed.len(),
                ran.len(),
                list.join("; ")
            )
        };
        Report {
            finished_at: unix_now(),
            duration_ms: took.as_millis() as u64,
            ok,
            verdict,
            checks,
            notes,
            probe_hosts,
        }
    }

    /// The checks as a table, the notes, and the verdict.
    pub fn render_text(&self) -> String {
        let mut rows: Vec<[String; 7]> = vec![[
            "check".into(),
            "target".into(),
            "proto".into(),
            "expected".into(),
            "observed".into(),
            "ok".into(),
            "judged by".into(),
        ]];
        for c in &self.checks {
            rows.push([
                c.name.clone(),
                c.target.clone(),
                c.proto.clone(),
                c.expected.clone(),
                c.observed.clone(),
                match c.ok {
                    Some(true) => "ok",
                    Some(false) => "FAIL",
                    None => "-",
                }
                .into(),
                c.judged_by.clone(),
            ]);
        }
        let mut widths = [0usize; 7];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for (i, row) in rows.iter().enumerate() {
            let line: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            let _ = writeln!(out, "{}", line.join("  ").trim_end());
            if i == 0 {
                let total = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
                let _ = writeln!(out, "{}", "-".repeat(total));
            }
        }
        for c in self.checks.iter().filter(|c| c.ok == Some(false)) {
            if !c.detail.is_empty() {
                let _ = writeln!(
                    out,
                    "FAIL {} {} {}: {}",
                    c.name, c.target, c.proto, c.detail
                );
            }
        }
        let _ = writeln!(out);
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        let _ = writeln!(
            out,
            "\nselftest: {} (in {:.1} s)",
            self.verdict,
            self.duration_ms as f64 / 1000.0
        );
        out
    }
}

/// What `cage status` shows of the last self-test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Last {
    pub finished_at: u64,
    pub ok: bool,
    pub verdict: String,
}

impl Last {
    /// "verified 2 minutes ago: all 87 checks hold".
    pub fn line(&self) -> String {
        let ago = unix_now().saturating_sub(self.finished_at);
        let when = match ago {
            0..=59 => format!("{ago} s ago"),
            60..=7199 => format!("{} minutes ago", ago / 60),
            7200..=172_799 => format!("{} hours ago", ago / 3600),
            _ => format!("{} days ago", ago / 86_400),
        };
        let word = if self.ok { "verified" } else { "FAILED" };
        format!("{word} {when}: {}", self.verdict)
    }
}

/// A self-test in progress, as `<log_dir>/selftest.running.json` tells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    pub pid: u32,
    /// Every source address the probe hosts use (spoofed ones included).
    pub addresses: Vec<IpAddr>,
}

/// The self-test running now, if any (its process is alive). Whatever reacts to a
/// caged host's behaviour (automatic isolation, alerts) should leave these addresses
/// alone while it runs: the self-test makes a hundred denied attempts in a few seconds
/// on purpose.
pub fn running(log_dir: &Path) -> Option<Running> {
    let bytes = std::fs::read(log_dir.join(RUNNING_FILE)).ok()?;
    let r: Running = serde_json::from_slice(&bytes).ok()?;
    Path::new(&format!("/proc/{}", r.pid)).exists().then_some(r)
}

/// The last self-test's result stored in `log_dir`, if there is one.
pub fn last(log_dir: &Path) -> Option<Last> {
    let bytes = std::fs::read(log_dir.join(RESULT_FILE)).ok()?;
    let r: Report = serde_json::from_slice(&bytes).ok()?;
    Some(Last {
        finished_at: r.finished_at,
        ok: r.ok,
        verdict: r.verdict,
    })
}

/// [`run`], then [`store`] the result, a run that could not be made included (as a
/// failed report that says why), so that `cage status` shows the last attempt. An
/// interrupted run stores nothing. A failure to store is logged, not returned.
pub fn run_and_store(cfg: &Config, opts: &Options) -> Result<Report, SelftestError> {
    let started = Instant::now();
    let result = run(cfg, opts);
    let report = match &result {
        Ok(r) => r.clone(),
        Err(SelftestError::Interrupted) => return result,
        Err(e) => {
            let mut r = Report::new(Vec::new(), Vec::new(), Vec::new(), started.elapsed());
            r.verdict = format!("could not run: {e}");
            r
        }
    };
    if let Err(e) = store(&report, &cfg.main.log_dir) {
        crate::log::warn(&format!("selftest: {e}"));
    }
    result
}

/// Store `report` as `<log_dir>/selftest.json` (written aside, then renamed).
pub fn store(report: &Report, log_dir: &Path) -> Result<PathBuf, SelftestError> {
    std::fs::create_dir_all(log_dir).map_err(io_err(format!("creating {}", log_dir.display())))?;
    let path = log_dir.join(RESULT_FILE);
    let tmp = log_dir.join(format!(".{RESULT_FILE}.{}", std::process::id()));
    let json = serde_json::to_vec_pretty(report).expect("a report serializes");
    std::fs::write(&tmp, json).map_err(io_err(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, &path).map_err(io_err(format!("renaming to {}", path.display())))?;
    Ok(path)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---- running it -----------------------------------------------------------------------

/// Run the self-test against the live router this process runs on (its network
/// namespace). Probe hosts are made and removed here; the report is returned, not stored
/// (see [`store`]). Call [`catch_interrupts`] first in a CLI so that Ctrl-C cleans up.
pub fn run(cfg: &Config, opts: &Options) -> Result<Report, SelftestError> {
    let started = Instant::now();
    let _lock = lock(&cfg.main.log_dir)?;
    let mut notes = Vec::new();

    // Look first; change nothing yet.
    let view = here("read-router", nl::router_view)?;
    let facts = here("detect-facts", {
        let cfg = cfg.clone();
        move || async move { netlink::detect_facts(&cfg).await }
    })?;
    let ports = here("port-states", {
        let cfg = cfg.clone();
        move || async move { netlink::port_states(&cfg).await }
    })?;
    let bridge = view
        .link(&cfg.segment.bridge)
        .filter(|l| l.is_bridge)
        .cloned()
        .ok_or_else(|| SelftestError::NoBridge {
            bridge: cfg.segment.bridge.clone(),
        })?;
    let mut checks = static_checks(cfg, &ports);
    let isolated = nft::isolated_now().unwrap_or_else(|e| {
        notes.push(format!(
            "cannot tell whether the kill switch is on ({e}); the checks assume it is off"
        ));
        false
    });
    if !nft::supports_bridge_meta() {
        notes.push(format!(
            "this kernel cannot match a bridge by name (no nft_meta_bridge), so Cage's \
             layer-2 rule names the configured ports ({}), not the probe ports: the caged -> \
             caged checks here prove bridge port isolation (and Cage's inet rules, where \
             br_netfilter is loaded), not that rule",
            if cfg.segment.ports.is_empty() {
                "none".to_owned()
            } else {
                cfg.segment.ports.join(", ")
            }
        ));
    }
    check_interrupted()?;

    // Addresses for the probe hosts: free ones at the top of the segment's subnets.
    let subnet4 = cfg.segment.subnet4();
    let router4 = cfg.segment.router4();
    let v6 = match (cfg.segment.subnet6(), cfg.segment.router6()) {
        (Some(net), Some(r)) if cfg.segment.ipv6 => Some((net, r)),
        _ => None,
    };
    let free4 = free_addresses(
        IpNet::V4(subnet4),
        top_hosts4(subnet4, 8).into_iter().map(IpAddr::V4).collect(),
        &view,
        &bridge.name,
    )?;
    let free6 = match v6 {
        Some((net, _)) => free_addresses(
            IpNet::V6(net),
            top_hosts6(net, 8).into_iter().map(IpAddr::V6).collect(),
            &view,
            &bridge.name,
        )?,
        None => Vec::new(),
    };
    let spoof4 = spoof_source4(subnet4);
    let spoof6 = v6.map(|(net, _)| spoof_source6(net));
    check_interrupted()?;

    // The probe hosts.
    let pid = std::process::id();
    let mut rig = Rig::new(&cfg.segment.bridge);
    let mut hosts = Vec::new();
    for (i, letter) in ['a', 'b'].into_iter().enumerate() {
        let name = format!("cage-st-{pid}-{letter}");
        let port = format!("cst{pid}{letter}");
        let mut addrs = vec![IpNet::new(free4[i], subnet4.prefix_len()).unwrap()];
        if let Some((net, _)) = v6 {
            addrs.push(IpNet::new(free6[i], net.prefix_len()).unwrap());
        }
        let ns = NetNsGuard::anonymous(&name)?;
        let (netns, fd) = (ns.netns().clone(), ns.fd().expect("an anonymous namespace"));
        rig.namespaces.push(ns);
        rig.router_neighbours.extend(addrs.iter().map(|a| a.addr()));
        hosts.push(HostSetup {
            name,
            port,
            ns: netns,
            fd,
            addrs,
            mac: HOST_MAC[i],
            port_mac: PORT_MAC[i],
        });
    }
    for h in &hosts {
        prepare_namespace(&h.ns, v6.is_some())?;
        rig.ports.push(h.port.clone());
        let (port, port_mac, bridge_link, fd, host_mac) =
            (h.port.clone(), h.port_mac, bridge.clone(), h.fd, h.mac);
        here("add-probe-port", move || async move {
            nl::add_probe_port(&port, port_mac, &bridge_link, fd, host_mac).await
        })
        .map_err(|e| match &e {
            SelftestError::Netlink(NetlinkError::Request { source, .. })
                if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                SelftestError::Setup(format!(
                    "{e}: this kernel has no veth driver (OpenWrt: kmod-veth)"
                ))
            }
            _ => e,
        })?;
    }
    let after = here("read-router", nl::router_view)?;
    if after.link(&bridge.name).and_then(|l| l.mac) != bridge.mac {
        return Err(SelftestError::Setup(format!(
            "adding the probe ports changed the MAC address of {} (it takes its lowest \
             port's when none is set); stopped, so as not to disturb the caged hosts",
            bridge.name
        )));
    }
    let mut gateways = vec![IpAddr::V4(router4)];
    if let Some((_, r6)) = v6 {
        gateways.push(IpAddr::V6(r6));
    }
    let bridge_mac = bridge.mac.unwrap_or([0; 6]);
    // Host a knows b and the router by static neighbour entries: its frames to b are
    // really sent (isolation must stop the frames themselves), and its spoofed packets go
    // out although the router would not answer ARP or ND for a spoofed source. Host b
    // resolves a the ordinary way (ARP, ND).
    let mut pinned: Vec<(IpAddr, [u8; 6])> = gateways.iter().map(|&g| (g, bridge_mac)).collect();
    pinned.extend(hosts[1].addrs.iter().map(|a| (a.addr(), hosts[1].mac)));
    for (i, h) in hosts.iter().enumerate() {
        let mut addrs = h.addrs.clone();
        let neighbours = if i == 0 {
            addrs.push(IpNet::from(IpAddr::V4(spoof4)));
            addrs.extend(spoof6.map(|s| IpNet::from(IpAddr::V6(s))));
            pinned.clone()
        } else {
            Vec::new()
        };
        let gws = gateways.clone();
        h.ns.run("configure-probe-host", move || {
            block_on(async move { nl::configure_probe_host(&addrs, &gws, &neighbours).await })
        })?
        .map_err(|e| SelftestError::Setup(format!("configuring probe host {}: {e}", h.name)))?;
    }
    for h in &hosts {
        let port = h.port.clone();
        let ready = here("wait-forwarding", move || async move {
            nl::wait_forwarding(&port, Duration::from_secs(3)).await
        })?;
        if !ready {
            return Err(SelftestError::Setup(format!(
                "{} does not forward on its new port {} within 3 s (does it run STP? a \
                 port then takes 30 s to forward)",
                bridge.name, h.port
            )));
        }
    }
    check_interrupted()?;

    // Tell whoever watches the caged hosts' behaviour that these are ours.
    let mut addresses: Vec<IpAddr> = hosts
        .iter()
        .flat_map(|h| h.addrs.iter().map(|a| a.addr()))
        .collect();
    addresses.push(IpAddr::V4(spoof4));
    addresses.extend(spoof6.map(IpAddr::V6));
    let running_path = cfg.main.log_dir.join(RUNNING_FILE);
    let running = Running { pid, addresses };
    std::fs::write(
        &running_path,
        serde_json::to_vec(&running).expect("serializes"),
    )
    .map_err(io_err(format!("writing {}", running_path.display())))?;
    rig.running_file = Some(running_path);
    // Witnesses where packets can be seen, echo servers in the probe hosts.
    let limits = WitnessLimits {
        max_duration: BUDGET + Duration::from_secs(30),
        max_records: 50_000,
    };
    let router_ns = NetNs::current();
    let witness_router = Witness::start(&router_ns, limits)?;
    let witness_a = Witness::start(&hosts[0].ns, limits)?;
    let witness_b = Witness::start(&hosts[1].ns, limits)?;
    let echo = [Service::tcp(CAGED_TCP), Service::udp(CAGED_UDP)];
    let servers_a = Servers::start(&hosts[0].ns, &echo, limits.max_duration)?;
    let servers_b = Servers::start(&hosts[1].ns, &echo, limits.max_duration)?;

    let ctx = Ctx {
        a: hosts[0].ns.clone(),
        b: hosts[1].ns.clone(),
        witness_router: &witness_router,
        witness_a: &witness_a,
        witness_b: &witness_b,
    };
    let plan = plan(&Planning {
        cfg,
        view: &view,
        facts: &facts,
        a4: hosts[0].addrs[0].addr(),
        a6: hosts[0].addrs.get(1).map(|a| a.addr()),
        b4: hosts[1].addrs[0].addr(),
        b6: hosts[1].addrs.get(1).map(|a| a.addr()),
        spoof4: IpAddr::V4(spoof4),
        spoof6: spoof6.map(IpAddr::V6),
        targets: &opts.targets,
        isolated,
    });
    notes.extend(plan.notes);
    checks.extend(run_plan(&plan.probes, &ctx));
    checks.extend(plan.skipped);
    drop(ctx);
    for w in [witness_router, witness_a, witness_b] {
        if let Err(e) = w.stop() {
            notes.push(format!("a witness stopped with an error: {e}"));
        }
    }
    let _ = servers_a.stop();
    let _ = servers_b.stop();

    notes.extend(gateway_notes(&view, &facts));
    notes.push(format!(
        "self-test traffic: MAC addresses {}:xx, source ports {}-{}, payloads with \
         'cage-probe:'; deny verdicts beyond the router are the prober's (no answer or a \
         reject), a TCP reset from a closed port looks like Cage's, the ICMP and UDP \
         probes of the same host tell them apart",
        MAC_PREFIX
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
        SOURCE_PORTS.start(),
        SOURCE_PORTS.end()
    ));

    let probe_hosts = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let mut addresses: Vec<IpAddr> = h.addrs.iter().map(|a| a.addr()).collect();
            if i == 0 {
                addresses.push(IpAddr::V4(spoof4));
                addresses.extend(spoof6.map(IpAddr::V6));
            }
            ProbeHost {
                name: h.name.clone(),
                port: h.port.clone(),
                mac: mac_text(&h.mac),
                addresses,
            }
        })
        .collect();
    drop(hosts);
    let errors = rig.teardown();
    if !errors.is_empty() {
        return Err(SelftestError::Setup(format!(
            "the checks ran, but cleaning up failed: {}",
            errors.join("; ")
        )));
    }
    if interrupted() {
        return Err(SelftestError::Interrupted);
    }
    Ok(Report::new(checks, notes, probe_hosts, started.elapsed()))
}

/// Ports the probe hosts serve each other on (caged ↔ caged).
const CAGED_TCP: u16 = 22;
const CAGED_UDP: u16 = 53;

struct HostSetup {
    name: String,
    port: String,
    ns: NetNs,
    fd: i32,
    addrs: Vec<IpNet>,
    mac: [u8; 6],
    port_mac: [u8; 6],
}

/// Hold `<log_dir>/selftest.lock`: one self-test at a time per router.
fn lock(log_dir: &Path) -> Result<File, SelftestError> {
    std::fs::create_dir_all(log_dir).map_err(io_err(format!("creating {}", log_dir.display())))?;
    let path = log_dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(format!("opening {}", path.display())))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(SelftestError::Busy { path });
    }
    Ok(file)
}

/// Run `f`'s future to completion on a fresh thread of this namespace with a runtime of
/// its own (whether or not the caller is inside one).
fn here<T, F, Fut>(what: &str, f: F) -> Result<T, SelftestError>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, NetlinkError>>,
{
    Ok(NetNs::current().run(what, move || block_on(f()))??)
}

fn block_on<Fut: std::future::Future>(fut: Fut) -> Result<Fut::Output, ProbeError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ProbeError::Io {
            ns: "(self-test)".into(),
            op: "starting a runtime".into(),
            source,
        })?;
    Ok(rt.block_on(fut))
}

// ---- probe namespaces -----------------------------------------------------------------

/// Sysctls of a probe host, before its `eth0` exists: no router advertisements, no
/// autoconfiguration, no duplicate address detection (its addresses are checked free
/// beforehand), ping sockets allowed; IPv6 off when the segment has none.
fn prepare_namespace(ns: &NetNs, ipv6: bool) -> Result<(), SelftestError> {
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
struct Rig {
    bridge: String,
    ports: Vec<String>,
    namespaces: Vec<NetNsGuard>,
    router_neighbours: Vec<IpAddr>,
    /// `<log_dir>/selftest.running.json`, once written.
    running_file: Option<PathBuf>,
    done: bool,
}

impl Rig {
    fn new(bridge: &str) -> Rig {
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
    fn teardown(&mut self) -> Vec<String> {
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
fn top_hosts4(net: Ipv4Net, n: u32) -> Vec<Ipv4Addr> {
    if net.prefix_len() >= 31 {
        return Vec::new();
    }
    let (first, last) = (u32::from(net.network()), u32::from(net.broadcast()));
    (1..=n)
        .map(|k| last - k)
        .filter(|&a| a > first)
        .map(Ipv4Addr::from)
        .collect()
}

/// Up to `n` addresses from the top of `net`.
fn top_hosts6(net: Ipv6Net, n: u128) -> Vec<Ipv6Addr> {
    if net.prefix_len() >= 127 {
        return Vec::new();
    }
    let (first, last) = (u128::from(net.network()), u128::from(net.broadcast()));
    (1..=n)
        .map(|k| last - k)
        .filter(|&a| a > first)
        .map(Ipv6Addr::from)
        .collect()
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
fn free_addresses(
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
fn spoof_source4(subnet: Ipv4Net) -> Ipv4Addr {
    [
        Ipv4Addr::new(192, 0, 2, 99),
        Ipv4Addr::new(198, 51, 100, 99),
    ]
    .into_iter()
    .find(|a| !subnet.contains(a))
    .expect("a /24 subnet cannot hold both")
}

fn spoof_source6(subnet: Ipv6Net) -> Ipv6Addr {
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
fn gateway_notes(view: &RouterView, facts: &crate::policy::Facts) -> Vec<String> {
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

fn is_link_local(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
    }
}

// ---- what to check --------------------------------------------------------------------

/// Kernel state that the probes do not show: every configured segment port is in the
/// bridge and isolated (a port that is not silently opens the cage for what plugs into
/// it, and the probe hosts bring their own isolated ports).
fn static_checks(cfg: &Config, ports: &[netlink::PortState]) -> Vec<Check> {
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
enum Src {
    A,
    B,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Judge {
    /// A witness in the router's namespace.
    Router,
    /// A witness in probe host a / b.
    HostA,
    HostB,
    /// The prober's outcome alone.
    Prober,
}

impl Judge {
    fn label(self) -> &'static str {
        match self {
            Judge::Router => "witness@router",
            Judge::HostA => "witness@probe-a",
            Judge::HostB => "witness@probe-b",
            Judge::Prober => "prober",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Allow,
    Deny,
}

#[derive(Debug, Clone)]
struct Planned {
    name: String,
    from: Src,
    probe: Probe,
    expect: Expect,
    judge: Judge,
}

struct Planning<'a> {
    cfg: &'a Config,
    view: &'a RouterView,
    facts: &'a crate::policy::Facts,
    a4: IpAddr,
    a6: Option<IpAddr>,
    b4: IpAddr,
    b6: Option<IpAddr>,
    spoof4: IpAddr,
    spoof6: Option<IpAddr>,
    targets: &'a [Target],
    /// The kill switch is on: everything to and from the segment must be dropped.
    isolated: bool,
}

/// What [`plan`] makes of a [`Planning`].
struct Plan {
    probes: Vec<Planned>,
    /// What the probes cannot cover here, and why.
    notes: Vec<String>,
    /// Checks that cannot run at all, reported as not run.
    skipped: Vec<Check>,
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
fn plan(p: &Planning) -> Plan {
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

// ---- probing --------------------------------------------------------------------------

struct Ctx<'a> {
    a: NetNs,
    b: NetNs,
    witness_router: &'a Witness,
    witness_a: &'a Witness,
    witness_b: &'a Witness,
}

/// Run the plan: [`PARALLEL`] workers, starts [`SPACING`] apart, nothing started after
/// [`BUDGET`] or an interruption.
fn run_plan(plan: &[Planned], ctx: &Ctx) -> Vec<Check> {
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

fn run_one(planned: &Planned, ctx: &Ctx) -> Check {
    let mut check = not_run(planned, "");
    let from = match planned.from {
        Src::A => &ctx.a,
        Src::B => &ctx.b,
    };
    let attempt = match probe::probe_in(from, &planned.probe) {
        Ok(a) => a,
        Err(e) => {
            check.observed = "ERROR".into();
            check.ok = Some(false);
            check.detail = format!("the probe could not be made: {e}");
            return check;
        }
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
        Err(e) => {
            check.observed = "ERROR".into();
            check.ok = Some(false);
            check.detail = format!("cannot judge: {e}");
            return check;
        }
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
    fn targets_parse() {
        assert_eq!(
            "203.0.113.10".parse::<Target>().unwrap(),
            Target::Ping("203.0.113.10".parse().unwrap())
        );
        assert_eq!(
            "[2001:db8::1]:443".parse::<Target>().unwrap(),
            Target::Connect("[2001:db8::1]:443".parse().unwrap())
        );
        assert!("example.com".parse::<Target>().is_err());
    }

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

    #[test]
    fn verdicts() {
        let check = |ok| Check {
            name: "caged -> LAN".into(),
            target: "192.168.8.10".into(),
            proto: "icmp".into(),
            expected: "deny".into(),
            observed: "x".into(),
            ok,
            judged_by: "prober".into(),
            detail: String::new(),
        };
        let r = Report::new(
            vec![check(Some(true)), check(None)],
            vec![],
            vec![],
            Duration::ZERO,
        );
        assert!(r.ok);
        assert_eq!(r.verdict, "all 1 checks hold (1 not run)");
        let r = Report::new(
            vec![check(Some(true)), check(Some(false))],
            vec![],
            vec![],
            Duration::ZERO,
        );
        assert!(!r.ok);
        assert_eq!(
            r.verdict,
            "1 of 2 checks FAIL: caged -> LAN 192.168.8.10 icmp"
        );
        let r = Report::new(vec![check(None)], vec![], vec![], Duration::ZERO);
        assert!(!r.ok);
    }
}
