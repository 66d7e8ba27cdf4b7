//! `cage run`: apply the policy, then keep it in force.
//!
//! The kernel enforces the policy, not this process: stopping or killing `cage run` leaves
//! Cage's tables in place. The daemon's work is to (re)apply: on SIGHUP with the new
//! configuration if it is valid (a bad one is logged and the running policy stays), and
//! every few seconds when the facts it was rendered from change (the WAN got a new
//! address) or when Cage's tables were removed or altered behind its back.

use std::path::Path;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use ipnet::IpNet;

use crate::apply::{self, ApplyError, Checked};
use crate::config::Config;
use crate::dns;
use crate::flows::{self, Blocked, FlowLog, Persister, Sweeper};
use crate::isolation::{self, Source};
use crate::killswitch::{self, AutoWatch};
use crate::log;
use crate::nflog::{self, Denied, NflogCounts, NflogStats};
use crate::nft;
use crate::policy;
use crate::running::{self, DaemonState};

/// How often the daemon verifies the kernel state and re-detects the facts.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);
/// How often denied packets are taken from the NFLOG reader, and how often the flow log
/// is written (one batched write, friendly to flash).
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(250);
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(5);
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
            lock_down_if_bare(config_path);
            return Err(e.into());
        }
    };
    for a in apply::enforce(&current).await? {
        log::info(&a);
    }
    let mut d = Daemon {
        state: DaemonState {
            pid: std::process::id(),
            config: config_path.to_owned(),
            started: crate::clock::unix_now(),
            last_apply: Some(crate::clock::unix_now()),
            applies: 1,
            last_error: None,
            wan_devices: current.facts.wan_devices.clone(),
        },
        applied_text: nft::list_structure()?,
        current,
        segment_error: None,
        dns: None,
        dns_shared: Arc::new(dns::Shared::default()),
    };
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
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.tick().await;
    let mut auto_tick = tokio::time::interval(AUTO_INTERVAL);
    auto_tick.tick().await;
    let mut auto = AutoWatch::default();
    let mut collector = Collector::start(&d.current.config);
    collector.names = Some(d.dns_shared.clone());
    // Self-tests the daemon runs (config `selftest`): on a schedule, and after a change
    // of the applied policy. One at a time, on a blocking thread.
    let mut selftest_timer = tokio::time::interval(Duration::from_secs(
        60 * u64::from(d.current.config.selftest.interval_minutes.max(1)),
    ));
    selftest_timer.tick().await;
    let mut selftest_task: Option<tokio::task::JoinHandle<()>> = None;
    // The first apply counts as a change.
    let mut applies_seen = 0;
    let mut drain_tick = tokio::time::interval(DRAIN_INTERVAL);
    let mut flush_tick = tokio::time::interval(FLUSH_INTERVAL);

    loop {
        tokio::select! {
            _ = hup.recv() => {
                log::info("SIGHUP: reloading configuration");
                let next = apply::check(config_path).await;
                d.reapply(next, "new configuration refused, the running policy stays").await;
            }
            _ = tick.tick() => {
                d.repair_segment().await;
                if let Some(reason) = drift(&d.current, &d.applied_text).await {
                    log::warn(&format!("{reason}: re-applying the policy"));
                    let next = apply::check_config(d.current.config.clone()).await;
                    d.reapply(next, "re-apply failed").await;
                }
            }
            _ = auto_tick.tick() => {
                let ks = &d.current.config.killswitch;
                let dns_auto = d.dns.is_some() && d.current.config.dns.auto_violations > 0;
                if (ks.auto_blocked == 0 && ks.auto_upload_bytes == 0 && !dns_auto)
                    || d.current.isolated
                {
                    continue;
                }
                let now = std::time::Instant::now();
                let mut fired = None;
                if ks.auto_blocked > 0 || ks.auto_upload_bytes > 0 {
                    fired = auto.observe(&d.current.config, now);
                }
                if fired.is_none() && dns_auto {
                    fired = auto.observe_dns(&d.current.config, &d.dns_shared.violations(), now);
                }
                if let Some(trigger) = fired {
                    log::warn(&format!("{trigger}: isolating the segment"));
                    let cfg = d.current.config.clone();
                    match killswitch::isolate(&cfg, Source::Auto, &trigger.to_string(), "cage").await {
                        Ok(_) => {
                            // The applied policy now isolates; what the daemon knows too.
                            let next = apply::check_config(cfg).await;
                            d.reapply(next, "re-apply failed").await;
                        }
                        Err(e) => log::error(&format!("automatic isolation failed: {e}")),
                    }
                    auto.reset();
                    d.dns_shared.restart_violations();
                }
            }
            _ = selftest_timer.tick() => {
                if d.current.config.selftest.interval_minutes > 0 {
                    start_selftest(&mut selftest_task, &d.current.config, "scheduled");
                }
            }
            _ = drain_tick.tick() => {
                collector.drain(&d.current.config);
                if d.state.applies != applies_seen {
                    applies_seen = d.state.applies;
                    if d.current.config.selftest.after_change && d.state.last_error.is_none() {
                        start_selftest(&mut selftest_task, &d.current.config, "after a policy change");
                    }
                }
            }
            _ = flush_tick.tick() => collector.flush(&d.current.config),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // What the kernel still holds in its log batch arrives within its flush timeout.
    tokio::time::sleep(nflog::FLUSH_TIMEOUT * 2).await;
    collector.drain(&d.current.config);
    collector.flush(&d.current.config);
    collector.persist(&d.current.config, true);
    collector.stop();
    if let Some(f) = d.dns.take() {
        f.stop();
    }
    log::info("stopping; the policy stays in the kernel (`cage disable` removes it)");
    Ok(())
}

/// What `cage run` keeps between events.
struct Daemon {
    current: Checked,
    state: DaemonState,
    /// Cage's tables as the daemon last left them, to notice changes behind its back.
    applied_text: String,
    /// The last segment setup error, logged once rather than at every tick.
    segment_error: Option<String>,
    /// The DNS forwarder, while the configuration has DNS through Cage.
    dns: Option<dns::Forwarder>,
    /// What it shares with the flow log and automatic isolation; outlives restarts of
    /// the forwarder.
    dns_shared: Arc<dns::Shared>,
}

impl Daemon {
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
                    self.current = next;
                    self.sync_dns();
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
                    // A bridge made anew has lost its eBPF attachment.
                    match apply::attach_ebpf(&self.current.config, self.current.isolated) {
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

/// Why the kernel no longer has what the daemon applied, if it doesn't.
async fn drift(current: &Checked, applied_text: &str) -> Option<String> {
    match nft::list_structure() {
        Ok(t) if t.is_empty() => return Some("Cage's tables were removed".into()),
        Ok(t) if t != applied_text => return Some("Cage's tables were changed".into()),
        Ok(_) => {}
        Err(e) => return Some(format!("cannot read Cage's tables ({e})")),
    }
    // The kill switch's state on disk is the truth; the kernel must follow it, whoever
    // changed either (`cage isolate` from another process, or a hand edit of the set).
    let wanted = isolation::load(&current.config).isolated;
    match nft::isolated_now() {
        Ok(now) if now != wanted => {
            return Some(if wanted {
                "the kill switch is on but the kernel does not isolate".into()
            } else {
                "the kill switch is off but the kernel isolates".into()
            })
        }
        Ok(_) => {}
        Err(e) => return Some(format!("cannot read the kill switch's set ({e})")),
    }
    let pin_dir = current.config.pin_dir();
    if crate::ebpf::is_pinned(&pin_dir) {
        match crate::ebpf::Maps::open(&pin_dir).and_then(|m| m.isolated()) {
            Ok(flag) if flag != wanted => {
                return Some("the eBPF kill-switch flag differs from the kill switch".into())
            }
            _ => {}
        }
    }
    match crate::netlink::detect_facts(&current.config).await {
        Ok(mut f) => {
            // Detection does not probe the kernel's nft modules; those do not change.
            f.bridge_meta = current.facts.bridge_meta;
            (f != current.facts).then(|| "the WAN devices or addresses changed".into())
        }
        Err(_) => None,
    }
}

fn wan_list(c: &Checked) -> String {
    if c.facts.wan_devices.is_empty() {
        "none found, so no internet for the segment".into()
    } else {
        c.facts.wan_devices.join(", ")
    }
}

/// The flow log's side of the daemon: denied packets from NFLOG folded into blocked-flow
/// records and written in batches. If the log or NFLOG cannot be opened, the cage still
/// holds; the problem is logged and the flow log is off.
struct Collector {
    log: Option<FlowLog>,
    rx: Option<Receiver<Denied>>,
    stop: Arc<AtomicBool>,
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
}

impl Collector {
    fn start(cfg: &Config) -> Collector {
        let stats = Arc::new(NflogStats::default());
        let stop = Arc::new(AtomicBool::new(false));
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
        let reader = match nflog::open(policy::LOG_GROUP)
            .and_then(|s| nflog::spawn_reader(s, tx, stop.clone(), stats.clone()))
        {
            Ok(h) => Some(h),
            Err(e) => {
                log::error(&format!(
                    "blocked flows are not logged: cannot read NFLOG group {}: {e}",
                    policy::LOG_GROUP
                ));
                None
            }
        };
        Collector {
            log,
            rx: reader.as_ref().map(|_| rx),
            stop,
            reader,
            stats,
            accounted: NflogCounts::default(),
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
                    self.sweeper.note_blocked(&d, now);
                    if !self.blocked.add(&d, &segment) {
                        self.table_full += 1;
                    }
                }
                Err(_) => break,
            }
        }
    }

    fn flush(&mut self, cfg: &Config) {
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
            log::warn(&format!(
                "flow log: {lost} denied packets could not be logged (counted in cage status)"
            ));
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
        let mut ended = Vec::new();
        let mut in_map = 0;
        // The counters before the walk over the map: a flow created in between is then
        // in the walk but not yet counted, so the eviction estimate below can only err
        // low while traffic flows, and is exact once it stops.
        let before = maps.as_ref().and_then(|m| m.stats().ok());
        if let Some(m) = &maps {
            match m.flows() {
                Ok(flows) => {
                    let hostnames = flows::dhcp_hostnames(Path::new(flows::DHCP_LEASES));
                    let (allowed, done) = self.sweeper.sweep(
                        cfg,
                        &flows,
                        crate::ebpf::monotonic_ns(),
                        std::time::SystemTime::now(),
                        &hostnames,
                    );
                    in_map = flows.len() - done.len();
                    records.extend(allowed);
                    ended = done;
                }
                Err(e) => log::error(&format!("flow log: cannot read the eBPF flow map: {e}")),
            }
        }
        if let Some(names) = &self.names {
            for r in &mut records {
                r.name = names.name_of(r.host, r.peer);
            }
        }
        records.sort_by(|a, b| a.start.cmp(&b.start));
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
        if let Some(p) = &mut self.persister {
            p.add(&records);
        }
        if let Err(e) = self.sweeper.save(&flows::dir(cfg)) {
            log::error(&format!("flow log: cannot save its progress: {e}"));
        }
        if let Some(m) = &mut maps {
            for k in &ended {
                match m.remove_flow(k) {
                    Ok(()) => log.stats.ebpf_removed += 1,
                    Err(e) => log::error(&format!("flow log: cannot remove a flow: {e}")),
                }
            }
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
                    log::warn(&format!(
                        "flow log: {} flows were evicted from the eBPF map before they \
                         were written (flowlog.max_flows is too small for this traffic)",
                        evicted - log.stats.ebpf_evicted
                    ));
                }
                log.stats.ebpf_evicted = evicted;
                log.stats.ebpf_update_failed = s.flow_update_failed;
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
        self.stop.store(true, Ordering::Relaxed);
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

/// Run `cage selftest` on a blocking thread unless one is running; its result goes to
/// `<log_dir>/selftest.json` (what `cage status` shows), and a failure is an alert in
/// the log.
fn start_selftest(task: &mut Option<tokio::task::JoinHandle<()>>, cfg: &Config, why: &str) {
    if task.as_ref().is_some_and(|t| !t.is_finished()) {
        return;
    }
    let cfg = cfg.clone();
    let why = why.to_owned();
    *task = Some(tokio::task::spawn_blocking(move || {
        let targets = cfg
            .selftest
            .targets
            .iter()
            .filter_map(|t| t.parse().ok())
            .collect();
        match crate::selftest::run_and_store(&cfg, &crate::selftest::Options { targets }) {
            Ok(r) if r.ok => log::info(&format!("self-test ({why}): {}", r.verdict)),
            Ok(r) => log::error(&format!("ALERT: self-test ({why}): {}", r.verdict)),
            Err(e) => log::error(&format!("ALERT: self-test ({why}) could not run: {e}")),
        }
    }));
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
