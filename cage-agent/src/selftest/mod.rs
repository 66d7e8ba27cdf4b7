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
//!
//! Here: the options, the errors, interruption and [`run`], which strings the parts
//! together. `plan.rs` is what to check (pure: the router as seen, in; the probes, out),
//! `rig.rs` what is made on the router (the probe hosts, their addresses) and the
//! probing, `report.rs` the result, as printed, stored and shown by `cage status`.

mod plan;
mod report;
mod rig;

use std::fs::File;
use std::io::{self};
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::config::Config;
use crate::netlink::selftest::{self as nl};
use crate::netlink::{self, NetlinkError};
use crate::nft;
use crate::probe::{NetNs, NetNsGuard, ProbeError, Servers, Service, Witness, WitnessLimits};

use plan::{plan, static_checks, Planning};
pub use report::{last, running, store, text_table, Check, Last, ProbeHost, Report, Running};
use rig::{
    free_addresses, gateway_notes, prepare_namespace, run_plan, spoof_source4, spoof_source6,
    top_hosts4, top_hosts6, Ctx, Rig,
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

impl Options {
    /// The options `cage run` uses (its schedule and the web page's button): the targets
    /// of the configuration's `selftest` section.
    pub fn configured(cfg: &crate::config::Config) -> Options {
        Options {
            targets: cfg
                .selftest
                .targets
                .iter()
                .filter_map(|t| t.parse().ok())
                .collect(),
        }
    }
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
}
