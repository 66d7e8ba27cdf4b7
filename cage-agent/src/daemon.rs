//! `cage run`: apply the policy, then keep it in force.
//!
//! The kernel enforces the policy, not this process: stopping or killing `cage run` leaves
//! Cage's tables in place. The daemon's work is to (re)apply: on SIGHUP with the new
//! configuration if it is valid (a bad one is logged and the running policy stays), and
//! every few seconds when the facts it was rendered from change (the WAN got a new
//! address) or when Cage's tables were removed or altered behind its back.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use ipnet::IpNet;

use crate::apply::{self, ApplyError, Checked};
use crate::config::{Config, SelfTest};
use crate::dns;
use crate::flows::{self, Blocked, FlowLog, Persister, Sweeper};
use crate::isolation::{self, Source};
use crate::killswitch::{self, AutoWatch, Trigger};
use crate::log;
use crate::nflog::{self, Denied, NflogCounts, NflogStats};
use crate::nft;
use crate::policy::{self, Facts};
use crate::running::{self, DaemonState};

/// How often the daemon verifies the kernel state and re-detects the facts when it cannot
/// hear the kernel's announcements of changes (see [`Monitors`]).
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);
/// How often it reads everything anyway when it hears them: a safety net, not the way
/// a change is found.
pub const FULL_CHECK_INTERVAL: Duration = Duration::from_secs(300);
/// Announced changes come in bursts (a replaced table is one message per object, a
/// remade bridge several links, addresses and routes): the daemon acts once on a burst,
/// this long after its first message.
pub const SETTLE: Duration = Duration::from_millis(100);
/// How often the checks that start no process run: the DHCP leases' file changed, the
/// eBPF kill-switch flag (a map, which announces nothing).
pub const QUICK_INTERVAL: Duration = Duration::from_secs(2);
/// How often denied packets are taken from the NFLOG reader at most (when it has sent
/// some), and how often the flow log is written (one batched write, friendly to flash).
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(250);
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// Flows of the eBPF map made into records and written at once (see `flush`).
const SWEEP_CHUNK: usize = 4096;
/// Denied packets waiting between the NFLOG reader and the collector at most.
const NFLOG_QUEUE: usize = 16_384;

/// How often automatic isolation reads its meters (only when a rule is on).
pub const AUTO_INTERVAL: Duration = Duration::from_secs(1);

fn save(state: &DaemonState, log_dir: &Path) {
    if let Err(e) = running::store(state, log_dir) {
        log::warn(&format!(
            "cannot write {}: {e}",
            running::state_path(log_dir).display()
        ));
    }
}

pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    // Start: a bad configuration stops the daemon, but whatever policy the kernel already
    // has stays in force (fail closed).
    let current: Checked = match apply::check(config_path).await {
        Ok(c) => c,
        Err(e) => {
            crate::audit::config_event(None, config_path, "start", Some(&e.to_string()));
            lock_down_if_bare(config_path);
            return Err(e.into());
        }
    };
    // The exporter first, so that the audit line of this start reaches the collector.
    crate::syslog::configure(&current.config);
    let applied = apply::enforce(&current).await;
    let error = applied.as_ref().err().map(ToString::to_string);
    crate::audit::config_event(
        Some(&current.config),
        config_path,
        "start",
        error.as_deref(),
    );
    for a in applied? {
        log::info(&a);
    }
    let state = DaemonState {
        pid: std::process::id(),
        config: config_path.to_owned(),
        started: crate::clock::unix_now(),
        last_apply: Some(crate::clock::unix_now()),
        applies: 1,
        last_error: None,
        wan_devices: current.facts.wan_devices.clone(),
    };
    let mut d = Daemon::new(current, state, nft::list_structure()?, Instant::now());
    d.sync_dns();
    save(&d.state, &d.current.config.main.log_dir);
    // Said once the state file is there, so whoever reads the log and then looks for the
    // daemon (`cage disable`, `cage status`) finds it.
    log::info(&format!(
        "policy applied from {} (WAN: {})",
        config_path.display(),
        wan_list(&d.current)
    ));

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // The LAN web page, on a thread of its own; it never stops the daemon. Started once
    // SIGHUP is caught, since saving its settings sends one.
    if let Err(e) = crate::web::spawn(config_path, d.current.config.clone()) {
        log::error(&format!(
            "the web page is off: cannot start its thread: {e}"
        ));
    }
    let mut monitors = Monitors::open();
    // The first look, once listening: what the start could not set up (in OpenWrt mode,
    // a segment bridge netifd has not made yet) is said now, and the announcements from
    // here on repair the rest.
    d.on_watch().await;
    let mut tick = tokio::time::interval(monitors.watch_interval());
    tick.tick().await;
    let mut quick_tick = tokio::time::interval(QUICK_INTERVAL);
    quick_tick.tick().await;
    // When to act on announced changes, once they have settled.
    let mut announced: Option<Instant> = None;
    let mut heard_from: Vec<&str> = Vec::new();
    let mut auto_tick = tokio::time::interval(AUTO_INTERVAL);
    // It ticks only while a rule is on (no wakeup otherwise); switched on, once at once.
    auto_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    auto_tick.tick().await;
    let mut collector = Collector::start(&d.current.config);
    collector.names = Some(d.dns_shared.clone());
    // Denied packets are drained when the reader has sent some, at most every
    // DRAIN_INTERVAL: an idle daemon does not wake for them.
    let ready = collector.ready.clone();
    let mut drain_pending = false;
    let mut drained_at = Instant::now();
    let mut flush_tick = tokio::time::interval(FLUSH_INTERVAL);

    loop {
        // Each applied change is answered once, at the turn after it.
        if d.selftest
            .after_change_due(&d.current.config.selftest, &d.state)
        {
            d.start_selftest("after a policy change");
        }
        // Computed anew at every turn from the configuration in force, so a reloaded
        // `selftest.interval` counts from the next turn on.
        let next_selftest = d.selftest.next(&d.current.config.selftest);
        let bridge = d.current.config.segment.bridge.clone();
        let interval_before = monitors.watch_interval();
        crate::metrics::set_monitors(monitors.mode());
        tokio::select! {
            _ = hup.recv() => d.on_hup(config_path).await,
            heard = monitors.changed(&bridge) => {
                if let Some(what) = heard {
                    announced.get_or_insert_with(|| Instant::now() + SETTLE);
                    if !heard_from.contains(&what) {
                        heard_from.push(what);
                    }
                }
            }
            _ = sleep_until(announced) => {
                announced = None;
                ::log::debug!(
                    "watch: the kernel announced a change ({})",
                    heard_from.join(", ")
                );
                heard_from.clear();
                d.on_watch().await;
            }
            _ = tick.tick() => d.on_watch().await,
            _ = quick_tick.tick() => d.on_quick().await,
            _ = auto_tick.tick(), if d.auto_inputs().is_some() => d.on_auto().await,
            _ = sleep_until(next_selftest) => {
                if d.selftest.scheduled_due(&d.current.config.selftest, Instant::now()) {
                    d.start_selftest("scheduled");
                }
            }
            _ = ready.notified(), if !drain_pending => drain_pending = true,
            _ = sleep_until(drain_pending.then(|| drained_at + DRAIN_INTERVAL)) => {
                drain_pending = false;
                drained_at = Instant::now();
                collector.drain(&d.current.config);
            }
            _ = flush_tick.tick() => collector.flush(&d.current.config, &d.ports),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        if monitors.watch_interval() != interval_before {
            // A monitor failed: back to reading the kernel every few seconds.
            tick = tokio::time::interval(monitors.watch_interval());
            tick.tick().await;
        }
    }
    // What the kernel still holds in its log batch arrives within its flush timeout.
    tokio::time::sleep(nflog::FLUSH_TIMEOUT * 2).await;
    collector.drain(&d.current.config);
    collector.flush(&d.current.config, &d.ports);
    collector.persist(&d.current.config, true);
    collector.stop();
    if let Some(f) = d.dns.take() {
        f.stop();
    }
    log::info("stopping; the policy stays in the kernel (`cage disable` removes it)");
    crate::syslog::stop(Duration::from_secs(2));
    Ok(())
}

/// The kernel's announcements of changes that `cage run` repairs: to Cage's tables
/// (nfnetlink) and to links, addresses, routes and the segment's neighbour entries
/// (rtnetlink). With both, the daemon reads the kernel's state when it changed rather
/// than every [`WATCH_INTERVAL`], and idles; a monitor that cannot be opened or fails
/// is dropped, with a warning, and the daemon polls again.
struct Monitors {
    nft: Option<nft::monitor::Monitor>,
    rt: Option<crate::netlink::monitor::Monitor>,
}

/// `CAGE_WATCH=poll` makes `cage run` read the kernel every [`WATCH_INTERVAL`] instead
/// of listening to its announcements: for a kernel whose announcements are suspect, and
/// for `bench idle`, which compares both.
pub const WATCH_ENV: &str = "CAGE_WATCH";

impl Monitors {
    fn open() -> Monitors {
        if std::env::var(WATCH_ENV).is_ok_and(|v| v == "poll") {
            log::info(&format!(
                "{WATCH_ENV}=poll: reading the kernel every {} s rather than listening to its \
                 announcements of changes",
                WATCH_INTERVAL.as_secs()
            ));
            return Monitors {
                nft: None,
                rt: None,
            };
        }
        let nft = nft::monitor::Monitor::open()
            .inspect_err(|e| Self::failed("nf_tables", e))
            .ok();
        let rt = crate::netlink::monitor::Monitor::open()
            .inspect_err(|e| Self::failed("rtnetlink", e))
            .ok();
        Monitors { nft, rt }
    }

    fn failed(what: &str, e: &std::io::Error) {
        log::warn(&format!(
            "cannot hear {what}'s announcements of changes ({e}): reading the kernel every \
             {} s instead",
            WATCH_INTERVAL.as_secs()
        ));
    }

    /// `listen` (both monitors open), `partial` (one is) or `poll` (none).
    fn mode(&self) -> &'static str {
        match (self.nft.is_some(), self.rt.is_some()) {
            (true, true) => "listen",
            (false, false) => "poll",
            _ => "partial",
        }
    }

    fn watch_interval(&self) -> Duration {
        if self.nft.is_some() && self.rt.is_some() {
            FULL_CHECK_INTERVAL
        } else {
            WATCH_INTERVAL
        }
    }

    /// Wait for an announcement that concerns Cage, and say whose it was; `None` when a
    /// monitor failed (and is dropped).
    async fn changed(&mut self, bridge: &str) -> Option<&'static str> {
        let Monitors { nft, rt } = self;
        let nft = async {
            match nft.as_mut() {
                Some(m) => m
                    .changed()
                    .await
                    .map(|()| "nf_tables")
                    .map_err(|e| ("nf_tables", e)),
                None => std::future::pending().await,
            }
        };
        let rt = async {
            match rt.as_mut() {
                Some(m) => m
                    .changed(bridge)
                    .await
                    .map(|()| "rtnetlink")
                    .map_err(|e| ("rtnetlink", e)),
                None => std::future::pending().await,
            }
        };
        let heard = tokio::select! {
            r = nft => r,
            r = rt => r,
        };
        match heard {
            Ok(what) => Some(what),
            Err((what, e)) => {
                Self::failed(what, &e);
                match what {
                    "nf_tables" => self.nft = None,
                    _ => self.rt = None,
                }
                None
            }
        }
    }
}

/// Sleep until `at`; never wake when there is no `at`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// What `cage run` keeps between events. Each event of the loop in [`run`] is one method;
/// the decisions in them (`auto_inputs`, `auto_decide`, [`drift`], [`SelftestPlan`]) take
/// what the kernel and the disk said as input, so they are tested without either.
struct Daemon {
    current: Checked,
    state: DaemonState,
    /// Cage's tables as the daemon last left them, to notice changes behind its back.
    applied_text: String,
    /// The last segment setup error, logged once rather than at every tick.
    segment_error: Option<String>,
    /// The last error pinning the router's neighbours, said once until it changes.
    pin_error: Option<String>,
    /// When the DHCP server last wrote its leases, as last seen.
    leases_seen: Option<std::time::SystemTime>,
    /// Each bound MAC's bridge port, as the layer-2 bindings said at the last watch
    /// tick: the flow log's records name the port of their machine with it.
    ports: HashMap<String, String>,
    /// The DNS forwarder, while the configuration has DNS through Cage.
    dns: Option<dns::Forwarder>,
    /// What it shares with the flow log and automatic isolation; outlives restarts of
    /// the forwarder.
    dns_shared: Arc<dns::Shared>,
    /// Automatic isolation's history of readings.
    auto: AutoWatch,
    /// When to run `cage selftest` by itself (config `selftest`).
    selftest: SelftestPlan,
    /// The self-test running now, if any: one at a time, on a blocking thread.
    selftest_task: Option<tokio::task::JoinHandle<()>>,
}

/// Which readings automatic isolation needs at a tick: the meters (a rule on them is on),
/// the DNS forwarder's violation counts (its rule is on and the forwarder runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AutoInputs {
    meters: bool,
    dns: bool,
}

impl Daemon {
    fn new(current: Checked, state: DaemonState, applied_text: String, now: Instant) -> Daemon {
        Daemon {
            current,
            state,
            applied_text,
            segment_error: None,
            pin_error: None,
            leases_seen: None,
            ports: HashMap::new(),
            dns: None,
            dns_shared: Arc::new(dns::Shared::default()),
            auto: AutoWatch::default(),
            selftest: SelftestPlan::new(now),
            selftest_task: None,
        }
    }

    /// SIGHUP: the configuration file again, applied if it is valid.
    async fn on_hup(&mut self, config_path: &Path) {
        log::info("SIGHUP: reloading configuration");
        let next = apply::check(config_path).await;
        self.reapply(next, "new configuration refused, the running policy stays")
            .await;
        let error = self.state.last_error.as_deref();
        crate::audit::config_event(Some(&self.current.config), config_path, "SIGHUP", error);
        match self.selftest.next(&self.current.config.selftest) {
            Some(at) => ::log::debug!(
                "self-test: the next scheduled run in {} s",
                at.saturating_duration_since(Instant::now()).as_secs()
            ),
            None => ::log::debug!("self-test: no scheduled run (selftest.interval 0)"),
        }
    }

    /// The watch tick: repair the segment, and re-apply when the kernel drifted from what
    /// was applied.
    async fn on_watch(&mut self) {
        self.repair_segment().await;
        self.pin_neighbours().await;
        let seen = Observed::now(&self.current).await;
        let drifted = drift(&self.current, &self.applied_text, &seen);
        ::log::debug!(
            "watch: {}",
            drifted
                .as_deref()
                .unwrap_or("the kernel holds what was applied")
        );
        if let Some(reason) = drifted {
            log::warn(&format!("{reason}: re-applying the policy"));
            let next = apply::check_config(self.current.config.clone()).await;
            self.reapply(next, "re-apply failed").await;
        }
    }

    /// The checks between announcements that start no process: a new DHCP lease binds
    /// its address at once (the lease file changed), and the eBPF kill-switch flag, a
    /// map that announces nothing, still follows the kill switch.
    async fn on_quick(&mut self) {
        let leases = std::fs::metadata(flows::DHCP_LEASES)
            .and_then(|m| m.modified())
            .ok();
        if leases != self.leases_seen {
            self.leases_seen = leases;
            ::log::debug!("the DHCP leases changed");
            self.pin_neighbours().await;
        }
        let wanted = isolation::load(&self.current.config).isolated;
        if ebpf_isolated(&self.current.config.pin_dir()).is_some_and(|flag| flag != wanted) {
            self.on_watch().await;
        }
    }

    /// The router's neighbour entries for the caged hosts follow the layer-2 bindings:
    /// pinned to the bound MAC, put back when something moved one.
    async fn pin_neighbours(&mut self) {
        let mut bindings = match nft::bindings() {
            Ok(b) => b,
            Err(e) => {
                ::log::debug!("bindings not read: {e}");
                return;
            }
        };
        self.bind_leases(&mut bindings);
        self.ports = bindings
            .macs
            .iter()
            .map(|(mac, port, _)| (mac.to_ascii_lowercase(), port.clone()))
            .collect();
        let bound: Vec<(IpAddr, String)> =
            bindings.addrs.into_iter().map(|(a, m, _)| (a, m)).collect();
        let bridge = &self.current.config.segment.bridge;
        match crate::netlink::pin_neighbours(bridge, &bound).await {
            Ok(r) => {
                for (addr, mac) in &r.repaired {
                    log::warn(&format!(
                        "the router's neighbour entry for {addr} named {mac}, not the MAC the \
                         address is bound to: put back (an advertisement for someone else's \
                         address)"
                    ));
                }
                if !r.pinned.is_empty() || !r.unpinned.is_empty() {
                    ::log::debug!(
                        "neighbours pinned: {:?}, unpinned (binding ended): {:?}",
                        r.pinned,
                        r.unpinned
                    );
                }
            }
            Err(e) => {
                let e = e.to_string();
                if self.pin_error.as_ref() != Some(&e) {
                    log::error(&format!(
                        "the caged hosts' neighbour entries not pinned: {e}"
                    ));
                    self.pin_error = Some(e);
                }
                return;
            }
        }
        self.pin_error = None;
    }

    /// The DHCP server's leases bind their addresses to their MACs (a lease wins over
    /// first come); `bindings` follows.
    fn bind_leases(&mut self, bindings: &mut policy::Bindings) {
        let cfg = &self.current.config;
        let leases = flows::dhcp_leases(Path::new(flows::DHCP_LEASES));
        if leases.is_empty() {
            return;
        }
        let now = crate::clock::unix_now();
        let changes = flows::lease_bindings(
            &leases,
            &bindings.addrs,
            cfg.segment.subnet4(),
            now,
            cfg.limits.bind_timeout,
        );
        if changes.is_empty() {
            return;
        }
        if let Err(e) = nft::bind_leased(&changes) {
            log::error(&format!("leased addresses not bound: {e}"));
            return;
        }
        for (addr, old, mac, secs) in changes {
            if let Some(old) = &old {
                log::warn(&format!(
                    "{addr} was bound to {old}, but its DHCP lease names {mac}: bound to \
                     {mac} now, {old} claiming it is dropped"
                ));
            }
            bindings.addrs.retain(|(a, _, _)| *a != IpAddr::V4(addr));
            bindings.addrs.push((IpAddr::V4(addr), mac, secs));
        }
    }

    /// What automatic isolation must read now; `None` when it has nothing to watch: no
    /// rule is on, or the segment is isolated already.
    fn auto_inputs(&self) -> Option<AutoInputs> {
        let cfg = &self.current.config;
        let inputs = AutoInputs {
            meters: cfg.killswitch.auto_blocked > 0 || cfg.killswitch.auto_upload_bytes > 0,
            dns: self.dns.is_some() && cfg.dns.auto_violations > 0,
        };
        ((inputs.meters || inputs.dns) && !self.current.isolated).then_some(inputs)
    }

    /// Whether these readings make automatic isolation fire: the meters' rules first,
    /// then the DNS forwarder's.
    fn auto_decide(
        &mut self,
        inputs: AutoInputs,
        meters: &killswitch::Readings,
        dns_violations: &HashMap<IpAddr, u64>,
        now: Instant,
    ) -> Option<Trigger> {
        let cfg = &self.current.config;
        let mut fired = None;
        if inputs.meters {
            fired = self.auto.observe(cfg, meters, now);
        }
        if fired.is_none() && inputs.dns {
            fired = self.auto.observe_dns(cfg, dns_violations, now);
        }
        fired
    }

    /// The automatic-isolation tick: read, decide, and isolate when a limit was passed.
    async fn on_auto(&mut self) {
        let Some(inputs) = self.auto_inputs() else {
            return;
        };
        let meters = if inputs.meters {
            killswitch::read(&self.current.config)
        } else {
            killswitch::Readings::default()
        };
        let violations = self.dns_shared.violations();
        let Some(trigger) = self.auto_decide(inputs, &meters, &violations, Instant::now()) else {
            ::log::debug!(
                "automatic isolation: {} meters read ({} host readings), {} hosts with DNS \
                 violations: nothing over the limits",
                meters.meters.len(),
                meters.meters.iter().map(|(_, c)| c.len()).sum::<usize>(),
                violations.len()
            );
            return;
        };
        log::warn(&format!("{trigger}: isolating the segment"));
        let cfg = self.current.config.clone();
        match killswitch::isolate(&cfg, Source::Auto, &trigger.to_string(), "cage").await {
            Ok(_) => {
                // The applied policy now isolates; what the daemon knows too.
                let next = apply::check_config(cfg).await;
                self.reapply(next, "re-apply failed").await;
            }
            Err(e) => log::error(&format!("automatic isolation failed: {e}")),
        }
        self.auto.reset();
        self.dns_shared.restart_violations();
    }

    /// Run `cage selftest` on a blocking thread unless one is running; its result goes to
    /// `<log_dir>/selftest.json` (what `cage status` shows), and a failure is an alert in
    /// the log.
    fn start_selftest(&mut self, why: &str) {
        if self
            .selftest_task
            .as_ref()
            .is_some_and(|t| !t.is_finished())
        {
            return;
        }
        let cfg = self.current.config.clone();
        let why = why.to_owned();
        self.selftest_task = Some(tokio::task::spawn_blocking(move || {
            let opts = crate::selftest::Options::configured(&cfg);
            let result = crate::selftest::run_and_store(&cfg, &opts);
            match &result {
                Ok(r) if r.ok => log::info(&format!("self-test ({why}): {}", r.verdict)),
                Ok(r) => log::error(&format!("ALERT: self-test ({why}): {}", r.verdict)),
                Err(e) => log::error(&format!("ALERT: self-test ({why}) could not run: {e}")),
            }
            crate::events::emit(crate::events::selftest(
                &why,
                result
                    .as_ref()
                    .map(|r| (r.ok, r.verdict.as_str()))
                    .map_err(|e| e.to_string()),
            ));
        }));
    }

    /// Enforce `next` if it was checked successfully; otherwise log why not and keep the
    /// running policy. Either way, record the attempt for `cage status`.
    async fn reapply(&mut self, next: Result<Checked, ApplyError>, refused: &str) {
        let outcome = match next {
            Ok(next) => match apply::enforce(&next).await {
                Ok(actions) => {
                    for a in actions {
                        log::info(&a);
                    }
                    log::info("policy applied");
                    ::log::debug!(
                        "applied: {} objects in the transaction, WAN {}, isolated: {}",
                        next.ruleset.objects.len(),
                        wan_list(&next),
                        next.isolated
                    );
                    log::configure(next.config.main.log_level);
                    self.current = next;
                    self.sync_dns();
                    crate::syslog::configure(&self.current.config);
                    Ok(())
                }
                Err(e) => Err(format!("applying failed: {e}")),
            },
            Err(e) => Err(format!("{refused}: {e}")),
        };
        if let Err(e) = &outcome {
            log::error(e);
        }
        self.state.last_error = outcome.err();
        self.state.applies += 1;
        self.state.last_apply = Some(crate::clock::unix_now());
        self.state.wan_devices = self.current.facts.wan_devices.clone();
        self.applied_text = nft::list_structure().unwrap_or_default();
        save(&self.state, &self.current.config.main.log_dir);
    }

    /// Start, reconfigure or stop the DNS forwarder to match the applied configuration,
    /// and put learned addresses back into the (new, empty) allow sets.
    fn sync_dns(&mut self) {
        let cfg = &self.current.config;
        match (&mut self.dns, cfg.dns.enabled) {
            (Some(f), true) => f.reapplied(cfg),
            (None, true) => match dns::Forwarder::start(cfg, self.dns_shared.clone()) {
                Ok(f) => {
                    log::info(&format!(
                        "DNS forwarder on port {} of the segment's addresses ({} mode)",
                        cfg.dns.listen_port,
                        if cfg.dns.egress == crate::config::Egress::Allowlist {
                            "allow-list"
                        } else {
                            "open"
                        }
                    ));
                    self.dns = Some(f);
                }
                Err(e) => log::error(&format!(
                    "DNS forwarder cannot start: {e}; the segment has no DNS (it fails closed)"
                )),
            },
            (Some(_), false) => {
                if let Some(f) = self.dns.take() {
                    f.stop();
                }
                log::info("DNS forwarder stopped (no dns section in the configuration)");
            }
            (None, false) => {}
        }
    }

    /// The segment too: a port re-created or re-bridged by someone else comes back
    /// without isolation. Setup is idempotent, so this repairs only what drifted.
    async fn repair_segment(&mut self) {
        match crate::netlink::setup_segment(&self.current.config).await {
            Ok(report) => {
                // Repaired, or adopted at last (OpenWrt: netifd made the bridge).
                let repaired = !report.actions.is_empty() || self.segment_error.is_some();
                for a in report.actions {
                    log::warn(&format!("segment repaired: {a}"));
                }
                if self.segment_error.take().is_some() {
                    log::info(&format!(
                        "segment {} in place",
                        self.current.config.segment.bridge
                    ));
                }
                if repaired {
                    // A bridge made anew has lost its eBPF attachment. Its flag follows the
                    // kill switch as stored, the truth (a `cage release` from the shell
                    // since the last apply changed that, not `self.current`).
                    let isolated = isolation::load(&self.current.config).isolated;
                    match apply::attach_ebpf(&self.current.config, isolated) {
                        Ok(Some(a)) => log::warn(&format!("segment repaired: {a}")),
                        Ok(None) => {}
                        Err(e) => log::error(&format!("eBPF not attached: {e}")),
                    }
                }
            }
            Err(e) => {
                let e = e.to_string();
                if self.segment_error.as_ref() != Some(&e) {
                    log::error(&format!("cannot set up the segment: {e}"));
                    self.segment_error = Some(e);
                }
            }
        }
    }
}

/// When `cage run` runs `cage selftest` by itself: every `selftest.interval` minutes
/// (counted from the last scheduled run, or from the start), and after every change of the
/// applied policy when `selftest.after_change` is on. The interval is read from the
/// configuration in force at each turn, so a reload changes it at once.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SelftestPlan {
    /// The start, or the last scheduled run.
    since: Instant,
    /// The count of applies already answered with a self-test (or passed over).
    applies_seen: u64,
}

impl SelftestPlan {
    fn new(now: Instant) -> SelftestPlan {
        // The first apply counts as a change.
        SelftestPlan {
            since: now,
            applies_seen: 0,
        }
    }

    /// When the next scheduled run is due; `None` when `interval` is 0 (never).
    fn next(&self, cfg: &SelfTest) -> Option<Instant> {
        (cfg.interval_minutes > 0)
            .then(|| self.since + Duration::from_secs(60 * u64::from(cfg.interval_minutes)))
    }

    /// Whether a scheduled run is due `now`; if so the next one counts from `now`.
    fn scheduled_due(&mut self, cfg: &SelfTest, now: Instant) -> bool {
        match self.next(cfg) {
            Some(at) if at <= now => {
                self.since = now;
                true
            }
            _ => false,
        }
    }

    /// Whether the policy changed since the last look and a self-test should prove it:
    /// `after_change` is on and the change applied without error. Each change is
    /// answered once.
    fn after_change_due(&mut self, cfg: &SelfTest, state: &DaemonState) -> bool {
        if state.applies == self.applies_seen {
            return false;
        }
        self.applies_seen = state.applies;
        cfg.after_change && state.last_error.is_none()
    }
}

/// What one watch tick read of the kernel and the disk, for [`drift`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observed {
    /// Cage's tables without counters and set contents (`nft::list_structure`), or why
    /// they could not be read.
    structure: Result<String, String>,
    /// The kill switch as stored: the truth the kernel must follow.
    wanted_isolated: bool,
    /// Whether the kill switch's set holds the segment now, or why it could not be read.
    kernel_isolated: Result<bool, String>,
    /// The eBPF program's kill-switch flag, when it is pinned and could be read.
    ebpf_isolated: Option<bool>,
    /// The facts detected now; `None` when detection failed (that is no drift).
    facts: Option<Facts>,
}

impl Observed {
    async fn now(current: &Checked) -> Observed {
        let pin_dir = current.config.pin_dir();
        Observed {
            structure: nft::list_structure().map_err(|e| e.to_string()),
            wanted_isolated: isolation::load(&current.config).isolated,
            kernel_isolated: nft::isolated_now().map_err(|e| e.to_string()),
            ebpf_isolated: ebpf_isolated(&pin_dir),
            facts: crate::netlink::detect_facts(&current.config).await.ok(),
        }
    }
}

/// The eBPF program's kill-switch flag, when the program is pinned and the flag could be
/// read.
fn ebpf_isolated(pin_dir: &Path) -> Option<bool> {
    crate::ebpf::is_pinned(pin_dir)
        .then(|| {
            crate::ebpf::Maps::open(pin_dir)
                .and_then(|m| m.isolated())
                .ok()
        })
        .flatten()
}

/// The tables the applied policy makes, as nft's listing names them ("bridge cage"),
/// each once (the transaction adds each twice: add, delete, add, to replace it whether
/// or not it was there).
fn applied_tables(current: &Checked) -> Vec<String> {
    let mut tables: Vec<String> = current
        .ruleset
        .objects
        .iter()
        .filter_map(|o| match o {
            nftables::schema::NfObject::CmdObject(nftables::schema::NfCmd::Add(
                nftables::schema::NfListObject::Table(t),
            )) => serde_json::to_value(t.family)
                .ok()
                .and_then(|f| f.as_str().map(|f| format!("{f} {}", t.name))),
            _ => None,
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    tables.retain(|t| seen.insert(t.clone()));
    tables
}

/// Why the kernel no longer has what the daemon applied, if it doesn't: the first of
/// Cage's tables removed or changed, the kill switch differing from its stored state (in
/// nftables or in the eBPF flag), the WAN's facts changed.
fn drift(current: &Checked, applied_text: &str, seen: &Observed) -> Option<String> {
    // Each table the policy makes, by name first: `applied_text` is read back from the
    // kernel after applying, so a table removed in that instant would be missing from
    // both.
    if let Ok(t) = &seen.structure {
        if let Some(gone) = applied_tables(current)
            .into_iter()
            .find(|name| !t.contains(&format!("table {name} {{")))
        {
            return Some(if t.is_empty() {
                "Cage's tables were removed".into()
            } else {
                format!("Cage's table {gone} was removed")
            });
        }
    }
    match &seen.structure {
        Ok(t) if t.is_empty() => return Some("Cage's tables were removed".into()),
        Ok(t) if t != applied_text => return Some("Cage's tables were changed".into()),
        Ok(_) => {}
        Err(e) => return Some(format!("cannot read Cage's tables ({e})")),
    }
    // The kill switch's state on disk is the truth; the kernel must follow it, whoever
    // changed either (`cage isolate` from another process, or a hand edit of the set).
    let wanted = seen.wanted_isolated;
    match &seen.kernel_isolated {
        Ok(now) if *now != wanted => {
            return Some(if wanted {
                "the kill switch is on but the kernel does not isolate".into()
            } else {
                "the kill switch is off but the kernel isolates".into()
            })
        }
        Ok(_) => {}
        Err(e) => return Some(format!("cannot read the kill switch's set ({e})")),
    }
    if seen.ebpf_isolated.is_some_and(|flag| flag != wanted) {
        return Some("the eBPF kill-switch flag differs from the kill switch".into());
    }
    let mut facts = seen.facts.clone()?;
    // Detection does not probe the kernel's nft modules; those do not change. Bindings
    // are the kernel's to learn: not a reason to re-apply.
    facts.bridge_meta = current.facts.bridge_meta;
    facts.bindings = current.facts.bindings.clone();
    (facts != current.facts).then(|| "the WAN devices or addresses changed".into())
}

fn wan_list(c: &Checked) -> String {
    if c.facts.wan_devices.is_empty() {
        "none found, so no internet for the segment".into()
    } else {
        c.facts.wan_devices.join(", ")
    }
}

/// Hosts over their share of the eBPF flow map, said at most once a minute each with
/// what they lost since.
#[derive(Default)]
struct OverShare {
    /// Per host: its over-share count last said, and when.
    said: HashMap<cage_common::HostKey, (u32, Instant)>,
}

impl OverShare {
    const EVERY: Duration = Duration::from_secs(60);

    /// The lines to log for these readings of the hosts map.
    fn news(
        &mut self,
        hosts: &[(cage_common::HostKey, cage_common::HostFlows)],
        now: Instant,
    ) -> Vec<String> {
        let mut lines = Vec::new();
        for (key, flows) in hosts {
            let (said, due) = match self.said.get(key) {
                Some(&(said, at)) => (said, now.duration_since(at) >= Self::EVERY),
                None => (0, true),
            };
            if flows.over_share > said && due {
                lines.push(format!(
                    "flow log: {} has its share of the flow map ({} flows): {} more of its \
                     new flows counted, not recorded (limits.flow_share; the other hosts \
                     are still recorded)",
                    key.ip(),
                    flows.flows,
                    flows.over_share - said
                ));
                self.said.insert(*key, (flows.over_share, now));
            }
        }
        lines
    }
}

/// The flow log's side of the daemon: denied packets from NFLOG folded into blocked-flow
/// records and written in batches. If the log or NFLOG cannot be opened, the cage still
/// holds; the problem is logged and the flow log is off.
struct Collector {
    log: Option<FlowLog>,
    rx: Option<Receiver<Denied>>,
    /// Told by the reader each time it sent denied packets: the loop drains then.
    ready: Arc<tokio::sync::Notify>,
    stopper: Option<nflog::Stopper>,
    reader: Option<std::thread::JoinHandle<()>>,
    stats: Arc<NflogStats>,
    /// NFLOG counts already added to the log's stats.
    accounted: NflogCounts,
    blocked: Blocked,
    /// Denied packets the blocked-flow table had no room for.
    table_full: u64,
    sweeper: Sweeper,
    /// The batched copy to `flowlog.persist_dir`, and when it was last written.
    persister: Option<Persister>,
    persisted_at: std::time::Instant,
    /// DNS names for the records (the forwarder's answers), when DNS goes through Cage.
    names: Option<Arc<dns::Shared>>,
    /// Hosts over their share of the flow map: what was said of each, and when.
    over_share: OverShare,
}

impl Collector {
    fn start(cfg: &Config) -> Collector {
        let stats = Arc::new(NflogStats::default());
        let ready = Arc::new(tokio::sync::Notify::new());
        let log = match FlowLog::open(cfg) {
            Ok(l) => Some(l),
            Err(e) => {
                log::error(&format!(
                    "the flow log is off: cannot open {}: {e}",
                    flows::dir(cfg).display()
                ));
                None
            }
        };
        let (tx, rx) = sync_channel(NFLOG_QUEUE);
        let sent = ready.clone();
        let (reader, stopper) = match nflog::open(policy::LOG_GROUP)
            .and_then(|s| nflog::spawn_reader(s, tx, stats.clone(), move || sent.notify_one()))
        {
            Ok((h, s)) => (Some(h), Some(s)),
            Err(e) => {
                log::error(&format!(
                    "blocked flows are not logged: cannot read NFLOG group {}: {e}",
                    policy::LOG_GROUP
                ));
                (None, None)
            }
        };
        Collector {
            log,
            rx: reader.as_ref().map(|_| rx),
            ready,
            stopper,
            reader,
            stats,
            accounted: NflogCounts::default(),
            over_share: OverShare::default(),
            blocked: Blocked::default(),
            table_full: 0,
            sweeper: Sweeper::load(&flows::dir(cfg)),
            persister: cfg.flowlog.persist_dir.as_ref().and_then(|dir| {
                Persister::open(dir, cfg)
                    .map_err(|e| {
                        log::error(&format!(
                            "the flow log is not copied to {}: {e}",
                            dir.display()
                        ))
                    })
                    .ok()
            }),
            persisted_at: std::time::Instant::now(),
            names: None,
        }
    }

    fn drain(&mut self, cfg: &Config) {
        let Some(rx) = &self.rx else { return };
        let segment: Vec<IpNet> = std::iter::once(IpNet::V4(cfg.segment.subnet4()))
            .chain(cfg.segment.subnet6().map(IpNet::V6))
            .collect();
        let now = std::time::Instant::now();
        for _ in 0..NFLOG_QUEUE {
            match rx.try_recv() {
                Ok(d) => {
                    if crate::events::active() {
                        crate::events::emit(crate::events::blocked(&d));
                    }
                    self.sweeper.note_blocked(&d, now);
                    if !self.blocked.add(&d, &segment) {
                        self.table_full += 1;
                    }
                }
                Err(_) => break,
            }
        }
    }

    /// Write what ended; `ports` (MAC → bridge port) names each record's port.
    fn flush(&mut self, cfg: &Config, ports: &HashMap<String, String>) {
        let Some(log) = &mut self.log else { return };
        let now = self.stats.snapshot();
        let lost_before = log.stats.nflog_overruns + log.stats.nflog_dropped;
        log.stats.nflog_overruns += now.overruns - self.accounted.overruns;
        log.stats.nflog_dropped += now.channel_full - self.accounted.channel_full + now.unparsable
            - self.accounted.unparsable
            + std::mem::take(&mut self.table_full);
        self.accounted = now;
        let lost = log.stats.nflog_overruns + log.stats.nflog_dropped - lost_before;
        if lost > 0 {
            let line = format!(
                "flow log: {lost} denied packets could not be logged (counted in cage status)"
            );
            log::warn(&line);
            crate::events::emit(crate::events::lost(&line, "nflog", lost));
        }
        let mut records = self.blocked.drain();
        // The flows the eBPF program counted: written once they end, then removed from
        // its map (after the write, so a crash in between writes them again rather than
        // losing them).
        let pin_dir = cfg.pin_dir();
        let mut maps = crate::ebpf::is_pinned(&pin_dir)
            .then(|| crate::ebpf::Maps::open(&pin_dir))
            .and_then(|m| {
                m.map_err(|e| log::error(&format!("flow log: cannot open the eBPF maps: {e}")))
                    .ok()
            });
        let mut in_map = 0;
        // Each host's records left in the map after this sweep, for its share.
        let mut per_host: HashMap<cage_common::HostKey, u32> = HashMap::new();
        // The counters before the walk over the map: a flow created in between is then
        // in the walk but not yet counted, so the eviction estimate below can only err
        // low while traffic flows, and is exact once it stops.
        let before = maps.as_ref().and_then(|m| m.stats().ok());
        let flows = match &maps {
            Some(m) => m.flows().unwrap_or_else(|e| {
                log::error(&format!("flow log: cannot read the eBPF flow map: {e}"));
                Vec::new()
            }),
            None => Vec::new(),
        };
        let hostnames = match flows.is_empty() {
            true => HashMap::new(),
            false => flows::dhcp_hostnames(Path::new(flows::DHCP_LEASES)),
        };
        // The map in parts of SWEEP_CHUNK flows, each written before the next is made
        // into records: 64 k flows ending together are otherwise 64 k records (some 500
        // bytes each with their strings) held at once.
        // The blocked records go with the first part.
        let mut parts = flows.chunks(SWEEP_CHUNK);
        let mut first = true;
        loop {
            let part = parts.next();
            if part.is_none() && !first {
                break;
            }
            first = false;
            let part = part.unwrap_or_default();
            let (allowed, ended) = self.sweeper.sweep(
                cfg,
                part,
                crate::ebpf::monotonic_ns(),
                std::time::SystemTime::now(),
                &hostnames,
            );
            in_map += part.len() - ended.len();
            let done: std::collections::HashSet<&cage_common::FlowKey> = ended.iter().collect();
            for (k, _) in part.iter().filter(|(k, _)| !done.contains(k)) {
                *per_host.entry(cage_common::HostKey::of(k)).or_default() += 1;
            }
            records.extend(allowed);
            if let Some(names) = &self.names {
                for r in &mut records {
                    r.name = names.name_of(r.host, r.peer);
                }
            }
            flows::name_ports(&mut records, ports, &cfg.segment.bridge);
            records.sort_by(|a, b| a.start.cmp(&b.start));
            ::log::debug!("flow log: writing {} records", records.len());
            let result = if records.is_empty() {
                log.save_stats()
            } else {
                log.write(&records)
            };
            if let Err(e) = result {
                // Nothing is removed from the map: the flows stay there to be written later.
                log::error(&format!("flow log: cannot write: {e}"));
                return;
            }
            crate::ipfix::export(cfg, &records);
            if let Some(p) = &mut self.persister {
                p.add(&records);
            }
            crate::events::flows(&records);
            records = Vec::new();
            if let Some(m) = &mut maps {
                for k in &ended {
                    match m.remove_flow(k) {
                        Ok(()) => log.stats.ebpf_removed += 1,
                        Err(e) => log::error(&format!("flow log: cannot remove a flow: {e}")),
                    }
                }
            }
        }
        self.sweeper.forget_gone(&flows);
        drop(flows);
        ::log::debug!("flow log: {in_map} flows still in the eBPF map");
        if let Err(e) = self.sweeper.save(&flows::dir(cfg)) {
            log::error(&format!("flow log: cannot save its progress: {e}"));
        }
        if let Some(m) = &mut maps {
            if let Some(s) = before {
                // Every flow the program created was written (and removed), is still in
                // the map, or was evicted by the map before it could be written.
                // While flows are created the walk over the map can miss some (it starts
                // over when the entry it stands on goes), so this is an estimate then,
                // and exact once the map is quiet: the figure is taken as it comes, not
                // kept at its highest.
                let evicted = s
                    .flows_created
                    .saturating_sub(log.stats.ebpf_removed + in_map as u64);
                if evicted > log.stats.ebpf_evicted {
                    let line = format!(
                        "flow log: {} flows were evicted from the eBPF map before they \
                         were written (flowlog.max_flows is too small for this traffic)",
                        evicted - log.stats.ebpf_evicted
                    );
                    log::warn(&line);
                    let n = evicted - log.stats.ebpf_evicted;
                    crate::events::emit(crate::events::lost(&line, "ebpf_evicted", n));
                }
                log.stats.ebpf_evicted = evicted;
                log.stats.ebpf_update_failed = s.flow_update_failed;
                log.stats.ebpf_over_share = s.over_share;
            }
            if let Err(e) = m.set_host_flows(&per_host) {
                log::error(&format!("flow log: cannot update the hosts' shares: {e}"));
            }
            match m.hosts() {
                Ok(hosts) => {
                    for line in self.over_share.news(&hosts, std::time::Instant::now()) {
                        log::warn(&line);
                    }
                }
                Err(e) => log::error(&format!("flow log: cannot read the hosts' shares: {e}")),
            }
            let _ = log.save_stats();
        }
        self.persist(cfg, false);
    }

    /// Copy to the persistent directory when its interval has passed (or `now`).
    fn persist(&mut self, cfg: &Config, now: bool) {
        let (Some(p), Some(log)) = (&mut self.persister, &mut self.log) else {
            return;
        };
        let every = Duration::from_secs(60 * u64::from(cfg.flowlog.persist_interval));
        if !now && self.persisted_at.elapsed() < every {
            return;
        }
        self.persisted_at = std::time::Instant::now();
        let before = log.stats.persist_over_budget;
        match p.flush(
            std::time::SystemTime::now(),
            &mut log.stats.persist_over_budget,
        ) {
            Ok(_) => {
                let over = log.stats.persist_over_budget - before;
                if over > 0 {
                    log::warn(&format!(
                        "flow log: {over} records not copied to flash: today's write \
                         budget (flowlog.persist_budget) is spent"
                    ));
                }
            }
            Err(e) => log::error(&format!("flow log: cannot copy to flash: {e}")),
        }
        let _ = log.save_stats();
    }

    fn stop(&mut self) {
        if let Some(s) = &self.stopper {
            s.stop();
        }
        if let Some(h) = self.reader.take() {
            let deadline = std::time::Instant::now() + nflog::STOP_WAIT;
            while !h.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

/// `cage run` cannot start with this configuration. If the kernel has a Cage policy, it
/// stays as it is (fail closed). If it has none (a reboot with a broken file), the
/// segment's bridge is locked down: everything to and from it dropped until a valid
/// configuration is applied. The bridge's name is taken from the file if it can be read
/// there, else the default.
fn lock_down_if_bare(config_path: &Path) {
    match nft::list_text() {
        Ok(t) if t.is_empty() => {}
        _ => return,
    }
    let bridge = std::fs::read_to_string(config_path)
        .ok()
        .and_then(|text| crate::config::uci::parse(&text).ok())
        .and_then(|raw| {
            raw.sections
                .iter()
                .filter(|s| s.kind == "segment")
                .flat_map(|s| &s.options)
                .find(|o| o.name == "bridge" && !o.is_list)
                .map(|o| o.value.clone())
        })
        .filter(|b| {
            !b.is_empty()
                && b.len() <= 15
                && b.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.@".contains(&c))
        })
        .unwrap_or_else(|| "br-cage".to_owned());
    match nft::apply(&crate::policy::lockdown(&bridge)) {
        Ok(()) => log::error(&format!(
            "no Cage policy was in the kernel and the configuration cannot be used: \
             {bridge} is LOCKED DOWN (everything to and from it dropped) until a valid \
             configuration is applied"
        )),
        Err(e) => log::error(&format!("cannot lock {bridge} down either: {e}")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_host_over_its_share_is_said_once_a_minute_with_what_it_lost() {
        let key = |last: u8| cage_common::HostKey {
            addr: [192, 168, 10, last, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            family: cage_common::FAMILY_IPV4,
            _pad: [0; 3],
        };
        let flows = |flows, over_share| cage_common::HostFlows { flows, over_share };
        let mut o = OverShare::default();
        let t0 = Instant::now();
        let lines = o.news(&[(key(11), flows(4096, 10)), (key(12), flows(3, 0))], t0);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("192.168.10.11") && lines[0].contains("10 more"));
        // Within the minute: nothing, however much more it lost.
        assert!(o
            .news(&[(key(11), flows(4096, 500))], t0 + Duration::from_secs(30))
            .is_empty());
        // After it: what it lost since the last line.
        let lines = o.news(&[(key(11), flows(4096, 700))], t0 + Duration::from_secs(61));
        assert!(lines[0].contains("690 more"), "{lines:?}");
        // Nothing new: nothing said.
        assert!(o
            .news(
                &[(key(11), flows(4096, 700))],
                t0 + Duration::from_secs(200)
            )
            .is_empty());
    }

    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn checked(text: &str) -> Checked {
        let config = crate::config::parse(text).unwrap_or_else(|e| panic!("{e}"));
        let facts = Facts {
            wan_devices: vec!["wan".into()],
            ..Facts::default()
        };
        let ruleset = policy::render(&config, &facts);
        Checked {
            config,
            facts,
            ruleset,
            isolated: false,
        }
    }

    fn daemon(text: &str, start: Instant) -> Daemon {
        let current = checked(text);
        // What the kernel lists of an applied policy, as far as drift reads it: its tables.
        let applied = applied_tables(&current)
            .iter()
            .map(|t| format!("table {t} {{\n}}\n"))
            .collect();
        Daemon::new(current, DaemonState::default(), applied, start)
    }

    fn interval(minutes: u32) -> String {
        format!("config selftest 'selftest'\n\toption interval '{minutes}'\n")
    }

    #[test]
    fn a_reloaded_selftest_interval_takes_effect() {
        let t0 = Instant::now();
        let mut d = daemon(&interval(60), t0);
        let plan = |d: &Daemon| d.selftest.next(&d.current.config.selftest);
        assert_eq!(plan(&d), Some(t0 + 60 * MINUTE));
        // SIGHUP with `interval '5'`: the loop asks the plan at its next turn, which
        // counts 5 minutes from the start, not the 60 the daemon started with.
        d.current = checked(&interval(5));
        assert_eq!(plan(&d), Some(t0 + 5 * MINUTE));
        let cfg = d.current.config.selftest.clone();
        assert!(!d.selftest.scheduled_due(&cfg, t0 + 4 * MINUTE));
        assert!(d.selftest.scheduled_due(&cfg, t0 + 5 * MINUTE));
        assert_eq!(plan(&d), Some(t0 + 10 * MINUTE), "then every 5 minutes");
        // `interval '0'`: never; and from never to every minute, due a minute after the
        // last scheduled run.
        d.current = checked(&interval(0));
        assert_eq!(plan(&d), None);
        assert!(!d
            .selftest
            .scheduled_due(&d.current.config.selftest.clone(), t0 + 900 * MINUTE));
        d.current = checked(&interval(1));
        assert_eq!(plan(&d), Some(t0 + 6 * MINUTE));
    }

    #[test]
    fn each_applied_change_is_proved_once_and_a_failed_one_not_at_all() {
        let t0 = Instant::now();
        let on = checked("config selftest 'selftest'\n\toption after_change '1'\n");
        let mut d = daemon("", t0);
        d.current = on;
        let cfg = d.current.config.selftest.clone();
        d.state.applies = 1;
        assert!(
            d.selftest.after_change_due(&cfg, &d.state),
            "the first apply"
        );
        assert!(!d.selftest.after_change_due(&cfg, &d.state), "once");
        d.state.applies = 2;
        d.state.last_error = Some("new configuration refused".into());
        assert!(
            !d.selftest.after_change_due(&cfg, &d.state),
            "nothing changed"
        );
        d.state.applies = 3;
        d.state.last_error = None;
        assert!(d.selftest.after_change_due(&cfg, &d.state));
        let off = checked("").config.selftest;
        d.state.applies = 4;
        assert!(
            !d.selftest.after_change_due(&off, &d.state),
            "after_change off"
        );
    }

    #[test]
    fn automatic_isolation_reads_only_what_is_on_and_never_for_an_isolated_segment() {
        let t0 = Instant::now();
        assert_eq!(daemon("", t0).auto_inputs(), None, "no rule");
        // The DNS rule needs the forwarder, which a test daemon does not run.
        let dns_only = daemon("config dns 'dns'\n\toption auto_violations '5'\n", t0);
        assert_eq!(dns_only.auto_inputs(), None);
        let mut d = daemon(
            "config killswitch 'killswitch'\n\toption auto_blocked '20'\n",
            t0,
        );
        let inputs = d.auto_inputs().expect("the blocked-attempts rule is on");
        assert_eq!(
            inputs,
            AutoInputs {
                meters: true,
                dns: false
            }
        );
        let host: IpAddr = "192.168.10.10".parse().unwrap();
        let reading = |packets: u64| killswitch::Readings {
            meters: vec![(
                policy::AUTO_BLOCKED[0],
                [(host, nft::Count { packets, bytes: 0 })].into(),
            )],
            selftest_hosts: vec![],
        };
        let none = HashMap::new();
        assert_eq!(d.auto_decide(inputs, &reading(3), &none, t0), None);
        let fired = d
            .auto_decide(inputs, &reading(40), &none, t0 + Duration::from_secs(1))
            .expect("40 blocked attempts, limit 20");
        assert_eq!(fired.host, host);
        // Isolated already: nothing to watch until a release.
        d.current.isolated = true;
        assert_eq!(d.auto_inputs(), None);
    }

    fn seen(structure: &str) -> Observed {
        Observed {
            structure: Ok(structure.into()),
            wanted_isolated: false,
            kernel_isolated: Ok(false),
            ebpf_isolated: None,
            facts: None,
        }
    }

    #[test]
    fn drift_names_the_first_thing_that_differs_from_what_was_applied() {
        let d = daemon("", Instant::now());
        let applied = d.applied_text.clone();
        let check = |o: &Observed| drift(&d.current, &applied, o);
        assert_eq!(check(&seen(&applied)), None, "as applied");
        assert_eq!(
            check(&seen("")).as_deref(),
            Some("Cage's tables were removed")
        );
        assert_eq!(
            check(&seen("table inet cage { chain x {} }")).as_deref(),
            Some("Cage's table bridge cage was removed")
        );
        assert_eq!(
            check(&seen(&format!("{applied}table inet other {{\n}}\n"))).as_deref(),
            Some("Cage's tables were changed")
        );
        // A table gone from what was read back after applying is still missed.
        let both = applied_tables(&d.current);
        assert_eq!(both, ["inet cage", "bridge cage"]);
        let inet_only = "table inet cage {\n}\n";
        assert_eq!(
            drift(&d.current, inet_only, &seen(inet_only)).as_deref(),
            Some("Cage's table bridge cage was removed")
        );
        let mut o = seen(&applied);
        o.structure = Err("nft: not found".into());
        assert_eq!(
            check(&o).as_deref(),
            Some("cannot read Cage's tables (nft: not found)")
        );
        // The stored kill switch is the truth, in nftables and in the eBPF flag.
        let mut o = seen(&applied);
        o.wanted_isolated = true;
        assert_eq!(
            check(&o).as_deref(),
            Some("the kill switch is on but the kernel does not isolate")
        );
        o.kernel_isolated = Ok(true);
        assert_eq!(check(&o), None);
        o.ebpf_isolated = Some(false);
        assert_eq!(
            check(&o).as_deref(),
            Some("the eBPF kill-switch flag differs from the kill switch")
        );
        let mut o = seen(&applied);
        o.kernel_isolated = Ok(true);
        assert_eq!(
            check(&o).as_deref(),
            Some("the kill switch is off but the kernel isolates")
        );
        // The WAN: a new device or address is drift; the bridge-meta probe is not
        // detected again, so it never is; a failed detection is not.
        let mut o = seen(&applied);
        o.facts = Some(Facts {
            bridge_meta: !d.current.facts.bridge_meta,
            ..d.current.facts.clone()
        });
        assert_eq!(check(&o), None);
        o.facts = Some(Facts {
            wan_devices: vec!["wwan0".into()],
            ..d.current.facts.clone()
        });
        assert_eq!(
            check(&o).as_deref(),
            Some("the WAN devices or addresses changed")
        );
    }
}
