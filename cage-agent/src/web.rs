//! The web page's side of the agent: [`AgentBackend`] gives `cage-web` the real kill
//! switch, status, flow log, audit log and configuration, and [`spawn`] serves the page
//! from `cage run` on `cage.main.web_listen`: by default every address of the LAN
//! devices, as the router has them now, followed when they change.
//!
//! The page runs on a thread of its own with its own runtime, so a busy page never delays
//! the daemon's work (draining NFLOG, writing the flow log, watching the policy). It
//! must never stop the daemon either: an address that cannot be bound yet (netifd has
//! not put it on the LAN bridge) is tried again every few seconds, and every error of a
//! request is an answer, not a crash.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use cage_web::{
    Access, Alert, AuditEntry, Backend, BackendError, Binding, CageState, FlowFilter, FlowRecord,
    Review, Segment, SelfTest, Settings, Status,
};
use futures::future::BoxFuture;
use futures::FutureExt;

use crate::cert;
use crate::config::edit::{self, Edit};
use crate::config::{self, Config};
use crate::flows;
use crate::isolation::{self, Source};
use crate::killswitch;
use crate::listen::{self, url};
use crate::log;
use crate::status;

/// How long to wait before trying to bind the listen address again.
pub const BIND_RETRY: Duration = Duration::from_secs(3);
/// How often a serving page checks whether `web_listen` or the LAN's addresses changed.
const LISTEN_CHECK: Duration = Duration::from_secs(3);
/// How often a page that could bind only some of its addresses tries the others again.
const PARTIAL_RETRY: Duration = Duration::from_secs(30);

/// The configuration as last read, and the file's modification time and size then.
struct Cached {
    stamp: Option<(SystemTime, u64)>,
    cfg: Config,
}

/// The agent behind the web page. It reads the configuration file again whenever it
/// changed on disk (a valid one; a broken file leaves the last good one in use, as the
/// daemon does).
pub struct AgentBackend {
    path: PathBuf,
    cached: Mutex<Cached>,
    /// The addresses the page is listening on right now (the Host check's addresses).
    listening: Mutex<Vec<IpAddr>>,
    /// The segment as last read, and when: reading the bindings runs `nft` three times,
    /// too slow to do at every page of a busy visitor.
    segment: Mutex<Option<(std::time::Instant, Segment)>>,
}

/// How long the page uses the segment's bindings and leases as read before reading them
/// again: a new machine shows within this.
const SEGMENT_TTL: Duration = Duration::from_secs(3);

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn failed(e: impl std::fmt::Display) -> BackendError {
    BackendError::Failed(e.to_string())
}

impl AgentBackend {
    pub fn new(path: &Path, cfg: Config) -> AgentBackend {
        AgentBackend {
            path: path.to_owned(),
            cached: Mutex::new(Cached {
                stamp: stamp(path),
                cfg,
            }),
            listening: Mutex::new(Vec::new()),
            segment: Mutex::new(None),
        }
    }

    /// The configuration in force for the page.
    pub fn config(&self) -> Config {
        let mut c = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        let now = stamp(&self.path);
        if now != c.stamp {
            c.stamp = now;
            match config::load(&self.path) {
                Ok(cfg) => c.cfg = cfg,
                Err(e) => log::warn(&format!(
                    "web page: the configuration changed but is not valid, the last good one \
                     stays in use: {e}"
                )),
            }
        }
        c.cfg.clone()
    }

    fn remember(&self, cfg: Config) {
        let mut c = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        c.stamp = stamp(&self.path);
        c.cfg = cfg;
    }

    /// Apply `edits` to the configuration file (all or nothing, with the validator's
    /// messages), then have `cage run` reload it when `reload`.
    async fn edit(&self, edits: Vec<Edit>, reload: bool) -> Result<Config, BackendError> {
        let path = self.path.clone();
        let cfg = tokio::task::spawn_blocking(move || edit::edit_file(&path, &edits))
            .await
            .map_err(failed)?
            .map_err(|e| match e {
                edit::EditError::Read { .. } | edit::EditError::Write { .. } => failed(e),
                e => BackendError::Refused(e.to_string()),
            })?;
        self.remember(cfg.clone());
        if reload {
            match crate::running::request_reload(&cfg) {
                Ok(true) => {}
                Ok(false) => log::warn(
                    "web page: settings saved, but no `cage run` is running to apply them",
                ),
                Err(e) => log::error(&format!(
                    "web page: settings saved, but cage run could not be told to apply them: {e}"
                )),
            }
        }
        Ok(cfg)
    }

    /// The kill switch pressed on the page: isolate when `on`, else release.
    async fn press(&self, on: bool, reason: String, who: String) -> Result<(), BackendError> {
        let cfg = self.config();
        let pressed = if on {
            killswitch::isolate(&cfg, Source::Web, &reason, &who).await
        } else {
            killswitch::release(&cfg, Source::Web, &reason, &who).await
        };
        pressed.map(drop).map_err(failed)
    }

    /// An option's text as the file has it, from the first section of `kind`.
    fn raw_option(&self, kind: &str, option: &str) -> Option<String> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let raw = config::uci::parse(&text).ok()?;
        let section = raw.sections.iter().find(|s| s.kind == kind)?;
        section
            .options
            .iter()
            .find(|o| o.name == option)
            .map(|o| o.value.clone())
    }

    async fn records(&self, filter: FlowFilter) -> Result<Vec<FlowRecord>, BackendError> {
        let cfg = self.config();
        let (records, _bad) = tokio::task::spawn_blocking(move || flows::read_all(&cfg, &filter))
            .await
            .map_err(failed)?;
        Ok(records)
    }
}

/// The layer-2 bindings in the kernel now, by machine, and the DHCP leases with their
/// names: what tells the page's machines apart besides the flow log.
fn segment_files() -> (Vec<Binding>, Vec<(String, IpAddr, String)>) {
    let bindings = match crate::nft::bindings() {
        Ok(b) => status::machines(&b)
            .into_iter()
            .map(|m| Binding {
                mac: m.mac,
                port: m.port,
                addresses: m.addresses.into_iter().map(|(a, _)| a).collect(),
            })
            .collect(),
        Err(e) => {
            ::log::debug!("the layer-2 bindings not read for the page: {e}");
            Vec::new()
        }
    };
    let path = Path::new(flows::DHCP_LEASES);
    let names = flows::dhcp_hostnames(path);
    let leases = flows::dhcp_leases(path)
        .into_iter()
        .map(|(ip, mac, _)| {
            let ip = IpAddr::V4(ip);
            let name = names.get(&ip).cloned().unwrap_or_default();
            (mac, ip, name)
        })
        .collect();
    (bindings, leases)
}

/// `cage status`, as the page shows it.
pub fn page_status(s: &status::Status) -> Status {
    let isolation = s.isolation.clone().unwrap_or_default();
    let state = if s.lockdown {
        CageState::Lockdown
    } else if isolation.isolated {
        CageState::Isolated
    } else {
        CageState::Open
    };
    let lost = s
        .flow_log
        .map(|f| {
            f.rotated_away
                + f.nflog_overruns
                + f.nflog_dropped
                + f.ebpf_evicted
                + f.ebpf_update_failed
                + f.ebpf_over_share
                + f.persist_over_budget
        })
        .unwrap_or(0)
        + s.unlogged;
    Status {
        state,
        isolated: isolation.isolated,
        reason: isolation.reason,
        since: isolation.since,
        source: isolation.source.map(|s| s.to_string()),
        who: isolation.who,
        enforcing: s.enforcing,
        flows: s.flow_log.map(|f| f.written).unwrap_or(0),
        blocked: s.denied_total,
        lost,
        selftest: s.selftest.as_ref().map(|t| SelfTest {
            finished_at: t.finished_at,
            ok: t.ok,
            verdict: t.verdict.clone(),
        }),
        problems: s.problems.clone(),
    }
}

/// `cage status`, and the hosts' bytes and the monitors of this process, as `/metrics`
/// shows them.
pub fn page_metrics(s: &status::Status) -> cage_web::Metrics {
    use cage_web::metrics::{DaemonHealth, DnsCounts};
    let page = page_status(s);
    let f = s.flow_log.unwrap_or_default();
    let lost = [
        ("rotated_away", f.rotated_away),
        ("nflog_overrun", f.nflog_overruns),
        ("nflog_dropped", f.nflog_dropped),
        ("ebpf_evicted", f.ebpf_evicted),
        ("ebpf_update_failed", f.ebpf_update_failed),
        ("ebpf_over_share", f.ebpf_over_share),
        ("persist_over_budget", f.persist_over_budget),
        ("unlogged", s.unlogged),
    ];
    let (hosts, hosts_other) = crate::metrics::hosts();
    cage_web::Metrics {
        state: page.state,
        isolated: page.isolated,
        isolation_source: page.source,
        isolation_since: page.since,
        enforcing: s.enforcing,
        flows: page.flows,
        blocked: s
            .denied
            .iter()
            .map(|(rule, c)| (rule.clone(), c.packets, c.bytes))
            .collect(),
        lost: lost.iter().map(|(c, n)| ((*c).to_owned(), *n)).collect(),
        dns: s.dns.as_ref().map(|d| DnsCounts {
            queries: d.queries,
            forwarded: d.forwarded,
            refused: [
                ("not_allowed", d.refused_not_allowed),
                ("rate", d.refused_rate),
                ("long", d.refused_long),
                ("doh", d.doh_blocked),
                ("malformed", d.malformed),
            ]
            .iter()
            .map(|(r, n)| ((*r).to_owned(), *n))
            .collect(),
            failures: vec![
                ("upstream".to_owned(), d.upstream_failures),
                ("allow_set".to_owned(), d.set_failures),
            ],
        }),
        hosts,
        hosts_other,
        daemon: s.daemon.as_ref().map(|d| DaemonHealth {
            running: s.daemon_running,
            started: d.started,
            last_apply: d.last_apply,
            last_apply_failed: d.last_error.is_some(),
            applies: d.applies,
            monitors: crate::metrics::monitors().map(str::to_owned),
        }),
        selftest: page.selftest,
        ebpf_map: s
            .ebpf
            .as_ref()
            .map(|e| (e.flows_in_map as u64, u64::from(e.flow_capacity))),
    }
}

/// Unset an option when the field was left empty (the default applies), set it otherwise.
fn set_or_unset(kind: &str, section: &str, option: &str, value: &str) -> Edit {
    if value.is_empty() {
        Edit::unset(kind, section, option)
    } else {
        Edit::set(kind, section, option, value)
    }
}

/// The edits that make the configuration say `s`.
pub fn settings_edits(s: &Settings) -> Vec<Edit> {
    vec![
        set_or_unset("segment", "ai", "address", &s.address),
        Edit::set("segment", "ai", "ipv6", if s.ipv6 { "1" } else { "0" }),
        set_or_unset("segment", "ai", "address6", &s.address6),
        Edit::set_list("lan", "lan", "admin_host", &s.admin_hosts),
        set_or_unset("killswitch", "killswitch", "auto_blocked", &s.auto_blocked),
        set_or_unset(
            "killswitch",
            "killswitch",
            "auto_upload_bytes",
            &s.auto_upload_bytes,
        ),
        set_or_unset("killswitch", "killswitch", "auto_window", &s.auto_window),
        Edit::set_list("cage", "main", "web_hostname", &s.web_hostnames),
    ]
}

impl Backend for AgentBackend {
    fn access(&self) -> Access {
        let cfg = self.config();
        let addresses = match cfg.main.web_listen {
            config::WebListen::Address(addr) => vec![addr.ip()],
            config::WebListen::Lan { .. } => self
                .listening
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        };
        Access {
            addresses,
            port: cfg.main.web_listen.port(),
            hostnames: cfg.main.web_hostnames,
        }
    }

    fn status(&self) -> BoxFuture<'_, Status> {
        async move { page_status(&status::gather(&self.path).await) }.boxed()
    }

    fn isolate(&self, reason: String, who: String) -> BoxFuture<'_, Result<(), BackendError>> {
        self.press(true, reason, who).boxed()
    }

    fn release(&self, reason: String, who: String) -> BoxFuture<'_, Result<(), BackendError>> {
        self.press(false, reason, who).boxed()
    }

    fn flows(
        &self,
        filter: FlowFilter,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<FlowRecord>, BackendError>> {
        async move {
            let mut all = self.records(filter).await?;
            if limit > 0 && all.len() > limit {
                all.drain(..all.len() - limit);
            }
            Ok(all)
        }
        .boxed()
    }

    fn segment(&self) -> BoxFuture<'_, Segment> {
        async move {
            if let Some((at, seg)) = &*self.segment.lock().unwrap_or_else(|e| e.into_inner()) {
                if at.elapsed() < SEGMENT_TTL {
                    return seg.clone();
                }
            }
            let cfg = self.config();
            let mut router: Vec<IpAddr> = vec![IpAddr::V4(cfg.segment.address.addr())];
            router.extend(cfg.segment.address6.map(|a| IpAddr::V6(a.addr())));
            match crate::netlink::device_addresses(std::slice::from_ref(&cfg.segment.bridge)).await
            {
                Ok(found) => router.extend(found),
                Err(e) => ::log::debug!("the segment bridge's addresses not read: {e}"),
            }
            router.sort();
            router.dedup();
            let mut subnets = vec![(
                IpAddr::V4(cfg.segment.subnet4().network()),
                cfg.segment.subnet4().prefix_len(),
            )];
            subnets.extend(
                cfg.segment
                    .subnet6()
                    .map(|n| (IpAddr::V6(n.network()), n.prefix_len())),
            );
            let (bindings, leases) = tokio::task::spawn_blocking(segment_files)
                .await
                .unwrap_or_default();
            let seg = Segment {
                router,
                subnets,
                bindings,
                leases,
            };
            *self.segment.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((std::time::Instant::now(), seg.clone()));
            seg
        }
        .boxed()
    }

    fn audit(&self, n: usize) -> BoxFuture<'_, Vec<AuditEntry>> {
        async move {
            let cfg = self.config();
            tokio::task::spawn_blocking(move || isolation::audit_tail(&cfg, n))
                .await
                .unwrap_or_default()
        }
        .boxed()
    }

    fn alerts(&self) -> BoxFuture<'_, Vec<Alert>> {
        async move {
            let s = status::gather(&self.path).await;
            let mut alerts = Vec::new();
            let audit = self.audit(cage_web::alerts::AUDIT_TAIL).await;
            for e in audit.iter().rev() {
                if e.source == Source::Auto && e.action == "isolate" {
                    alerts.push(Alert {
                        time: Some(e.time),
                        kind: "auto-isolation".into(),
                        text: e.reason.clone(),
                    });
                }
                if e.result != "ok" {
                    alerts.push(Alert {
                        time: Some(e.time),
                        kind: "kill-switch".into(),
                        text: format!("{} by {} failed: {}", e.action, e.who, e.result),
                    });
                }
            }
            if let Some(t) = s.selftest.as_ref().filter(|t| !t.ok) {
                alerts.push(Alert {
                    time: Some(t.finished_at),
                    kind: "selftest".into(),
                    text: format!("the self-test failed: {}", t.verdict),
                });
            }
            if let Some(f) = s.flow_log {
                let parts = [
                    (f.rotated_away, "records rotated away unread"),
                    (
                        f.nflog_overruns,
                        "denied packets the kernel could not hand over",
                    ),
                    (
                        f.nflog_dropped,
                        "denied packets the collector could not keep up with",
                    ),
                    (s.unlogged, "denied packets over the log's rate limit"),
                    (
                        f.ebpf_evicted,
                        "flows evicted from the eBPF map before they were written",
                    ),
                    (
                        f.ebpf_update_failed,
                        "packets the eBPF map could not record",
                    ),
                    (
                        f.ebpf_over_share,
                        "new flows of a host over its share of the eBPF map",
                    ),
                    (f.persist_over_budget, "records over the flash write budget"),
                ];
                for (n, what) in parts {
                    if n > 0 {
                        alerts.push(Alert {
                            time: None,
                            kind: "lost-records".into(),
                            text: format!("{n} {what}"),
                        });
                    }
                }
            }
            alerts.extend(neighbour_alerts(&s.denied));
            if let Some(d) = crate::dns::read_stats(&self.config()) {
                let limited = d.refused_rate + d.refused_long;
                if limited > 0 {
                    let mut hosts: Vec<_> = d.violations.iter().collect();
                    hosts.sort_by(|a, b| b.1.cmp(a.1));
                    let who: Vec<String> = hosts
                        .iter()
                        .take(5)
                        .map(|(h, n)| format!("{h} ({n})"))
                        .collect();
                    alerts.push(Alert {
                        time: None,
                        kind: "dns-limits".into(),
                        text: format!(
                            "{limited} DNS queries refused over the query rate or name length \
                             limits ({} rate, {} length), by {}",
                            d.refused_rate,
                            d.refused_long,
                            who.join(", ")
                        ),
                    });
                }
            }
            for p in s
                .problems
                .iter()
                .filter(|p| !p.starts_with("the last self-test"))
            {
                alerts.push(Alert {
                    time: None,
                    kind: "problem".into(),
                    text: p.clone(),
                });
            }
            alerts
        }
        .boxed()
    }

    fn settings(&self) -> BoxFuture<'_, Result<Settings, BackendError>> {
        async move {
            let cfg = self.config();
            Ok(Settings {
                address: cfg.segment.address.to_string(),
                ipv6: cfg.segment.ipv6,
                // With IPv6 off the validated configuration drops address6; the file may
                // still have it, and saving the page must not lose it.
                address6: cfg
                    .segment
                    .address6
                    .map(|a| a.to_string())
                    .or_else(|| self.raw_option("segment", "address6"))
                    .unwrap_or_default(),
                admin_hosts: cfg.lan.admin_hosts.iter().map(|h| h.to_string()).collect(),
                auto_blocked: cfg.killswitch.auto_blocked.to_string(),
                auto_upload_bytes: cfg.killswitch.auto_upload_bytes.to_string(),
                auto_window: cfg.killswitch.auto_window.to_string(),
                web_hostnames: cfg.main.web_hostnames.clone(),
            })
        }
        .boxed()
    }

    fn apply_settings(&self, settings: Settings) -> BoxFuture<'_, Result<(), BackendError>> {
        async move {
            self.edit(settings_edits(&settings), true).await?;
            log::info("web page: settings changed; cage run reloads the configuration");
            Ok(())
        }
        .boxed()
    }

    fn password_hash(&self) -> BoxFuture<'_, Option<String>> {
        async move { self.config().main.password_hash }.boxed()
    }

    fn set_password_hash(&self, phc: String) -> BoxFuture<'_, Result<(), BackendError>> {
        async move {
            // The password does not change the policy: nothing to reload.
            self.edit(
                vec![Edit::set("cage", "main", "password_hash", &phc)],
                false,
            )
            .await?;
            Ok(())
        }
        .boxed()
    }

    fn review(&self) -> BoxFuture<'_, Result<Review, BackendError>> {
        async move {
            let cfg = self.config();
            let egress = if !cfg.dns.enabled {
                "off"
            } else if cfg.dns.egress == config::Egress::Allowlist {
                "allowlist"
            } else {
                "open"
            };
            let refused = crate::dns::refused(&cfg);
            Ok(Review {
                egress: egress.into(),
                allowed: cfg.dns.allow_domains.clone(),
                refused,
            })
        }
        .boxed()
    }

    fn allow_name(&self, name: String, who: String) -> BoxFuture<'_, Result<String, BackendError>> {
        async move {
            let path = self.path.clone();
            let asked = name.clone();
            let allowed = tokio::task::spawn_blocking(move || crate::dns::allow(&path, &asked))
                .await
                .map_err(failed)?
                .map_err(|e| match e {
                    crate::dns::AllowError::Reload(_) => failed(e),
                    e => BackendError::Refused(e.to_string()),
                })?;
            if allowed.added {
                log::info(&format!(
                    "web page: {who} allowed the name {} (list allow_domain); cage run {}",
                    allowed.name,
                    if allowed.reloaded {
                        "reloads the configuration"
                    } else {
                        "is not running to apply it"
                    }
                ));
            }
            Ok(allowed.name)
        }
        .boxed()
    }

    fn ai_port(&self) -> BoxFuture<'_, Result<cage_web::AiPort, BackendError>> {
        async move {
            let cfg = self.config();
            let report = tokio::task::spawn_blocking(move || crate::aiport::show(&cfg))
                .await
                .map_err(failed)?
                .map_err(failed)?;
            Ok(page_port(report))
        }
        .boxed()
    }

    fn set_ai_port(
        &self,
        choice: String,
        who: String,
    ) -> BoxFuture<'_, Result<cage_web::AiPort, BackendError>> {
        async move {
            let cfg = self.config();
            let wanted = if choice == "none" {
                crate::aiport::Choice::None
            } else {
                crate::aiport::Choice::Port(choice.clone())
            };
            // Never forced from the page: the owner must keep a way in.
            let report =
                tokio::task::spawn_blocking(move || crate::aiport::set(&cfg, &wanted, false))
                    .await
                    .map_err(failed)?
                    .map_err(|e| match e {
                        crate::aiport::PortError::Refused(_)
                        | crate::aiport::PortError::Standalone(_) => {
                            BackendError::Refused(e.to_string())
                        }
                        e => failed(e),
                    })?;
            log::info(&format!(
                "web page: {who} made the AI port {choice}; {}",
                report.lines().join("; ")
            ));
            Ok(page_port(report))
        }
        .boxed()
    }

    fn ai_wifi(&self) -> BoxFuture<'_, Result<Vec<cage_web::AiWifi>, BackendError>> {
        async move {
            let cfg = self.config();
            let aps = tokio::task::spawn_blocking(move || crate::aiport::wifi(&cfg))
                .await
                .map_err(failed)?
                .map_err(failed)?;
            Ok(aps
                .into_iter()
                .map(|w| cage_web::AiWifi {
                    ssid: w.ssid,
                    key: w.key,
                    encryption: w.encryption,
                    hidden: w.hidden,
                    enabled: w.enabled,
                })
                .collect())
        }
        .boxed()
    }

    fn run_selftest(&self, who: String) -> BoxFuture<'_, Result<SelfTest, BackendError>> {
        async move {
            let cfg = self.config();
            log::info(&format!("web page: {who} runs the self-test"));
            // What `cage run` does on its schedule: the same run, stored for `cage
            // status`. A thread of its own, not one of the page's two blocking threads:
            // it takes up to half a minute.
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::Builder::new()
                .name("cage-selftest".into())
                .spawn(move || {
                    let opts = crate::selftest::Options::configured(&cfg);
                    let _ = tx.send(crate::selftest::run_and_store(&cfg, &opts));
                })
                .map_err(failed)?;
            let result = rx
                .await
                .map_err(|_| failed("the self-test's thread ended without a result"))?;
            if let Ok(r) = &result {
                let why = "from the web page";
                crate::events::emit(crate::events::selftest(why, Ok((r.ok, &r.verdict))));
            }
            match result {
                Ok(r) => {
                    if r.ok {
                        log::info(&format!("self-test (from the web page): {}", r.verdict));
                    } else {
                        log::error(&format!(
                            "ALERT: self-test (from the web page): {}",
                            r.verdict
                        ));
                    }
                    Ok(SelfTest {
                        finished_at: r.finished_at,
                        ok: r.ok,
                        verdict: r.verdict,
                    })
                }
                Err(e @ crate::selftest::SelftestError::Busy { .. }) => {
                    Err(BackendError::Refused(e.to_string()))
                }
                Err(e) => {
                    log::error(&format!(
                        "ALERT: self-test (from the web page) could not run: {e}"
                    ));
                    Err(failed(format!("could not run: {e}")))
                }
            }
        }
        .boxed()
    }

    fn metrics_access(&self) -> Option<cage_web::MetricsAccess> {
        let m = self.config().export.metrics;
        m.enabled().then(|| cage_web::MetricsAccess {
            token: m.token,
            allow: m.allow.iter().map(|n| (n.addr(), n.prefix_len())).collect(),
        })
    }

    fn metrics(&self) -> BoxFuture<'_, Result<cage_web::Metrics, BackendError>> {
        async move { Ok(page_metrics(&status::gather(&self.path).await)) }.boxed()
    }

    fn event(&self, message: &str) {
        log::info(message);
        if let Some(e) = crate::events::Event::web(message) {
            crate::events::emit(e);
        }
    }

    fn audit_login(&self, who: String, ok: bool) -> BoxFuture<'_, ()> {
        async move {
            let cfg = self.config();
            let write = move || crate::audit::login_event(&cfg, &who, ok);
            let _ = tokio::task::spawn_blocking(write).await;
        }
        .boxed()
    }
}

fn page_port(r: crate::aiport::Report) -> cage_web::AiPort {
    cage_web::AiPort {
        layout: r.layout,
        ai_ports: r
            .ai_ports
            .into_iter()
            .map(|p| (p.device, p.label))
            .collect(),
        lan_ports: r.lan_ports,
        wifi_lan: r.wifi_lan,
        wifi_ai: r.wifi_ai,
        notes: r.notes,
    }
}

/// Serve the page from `cage run`, on a thread of its own, until the process ends.
pub fn spawn(config_path: &Path, cfg: Config) -> std::io::Result<std::thread::JoinHandle<()>> {
    let backend = Arc::new(AgentBackend::new(config_path, cfg));
    std::thread::Builder::new()
        .name("cage-web".into())
        .spawn(move || {
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    log::error(&format!(
                        "the web page is off: cannot start its runtime: {e}"
                    ));
                    return;
                }
            };
            rt.block_on(serve_forever(backend));
        })
}

/// The page's runtime: one thread for the requests, and at most two more for the work
/// that blocks (reading the flow log, hashing a password), so that a burst of requests
/// cannot make threads (and their memory) without end.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(2)
        .thread_name("cage-web")
        .build()
}

/// Listen where [`listen::listen_addresses`] says (again and again until it can), serve, and
/// move when the configuration or the LAN's addresses move.
pub async fn serve_forever(backend: Arc<AgentBackend>) {
    let state = cage_web::AppState::new(backend.clone());
    // A problem is logged when it starts or changes, not every retry.
    let mut last_problem: Option<String> = None;
    let problem = |last: &mut Option<String>, p: String| {
        if last.as_ref() != Some(&p) {
            log::warn(&format!(
                "web page: {p}; trying again every {} s",
                BIND_RETRY.as_secs()
            ));
            *last = Some(p);
        }
    };
    // The certificate served, and the files' stamp last tried (served or refused).
    let mut tls: Option<cert::Identity> = None;
    let mut tried: Option<cert::Stamp> = None;
    loop {
        let cfg = backend.config();
        let wanted = match listen::listen_addresses(&cfg).await {
            Ok(w) => w,
            Err(e) => {
                problem(
                    &mut last_problem,
                    format!("cannot read the LAN's addresses: {e}"),
                );
                tokio::time::sleep(BIND_RETRY).await;
                continue;
            }
        };
        if wanted.is_empty() {
            problem(
                &mut last_problem,
                format!(
                    "no address to listen on yet ({} has none outside the segment)",
                    cfg.lan.devices.join(", ")
                ),
            );
            tokio::time::sleep(BIND_RETRY).await;
            continue;
        }
        // The certificate: loaded (or, Cage's own, made) at first, and again when the
        // configuration names other files or the files changed. One that cannot be
        // served is said in the log; the page keeps the certificate it has, or stays
        // off until there is one it can serve.
        let stamp = cert::stamp(&cfg);
        if tried.as_ref() != Some(&stamp) {
            let ips: Vec<IpAddr> = wanted.iter().map(SocketAddr::ip).collect();
            match cert::load_or_make(&cfg, &cfg.main.web_hostnames, &ips) {
                Ok(loaded) => {
                    log::info(&format!(
                        "web page certificate {}{}: SHA-256 {}",
                        loaded.path.display(),
                        if loaded.made {
                            " (self-signed, made now)"
                        } else {
                            ""
                        },
                        loaded.identity.fingerprint
                    ));
                    tls = Some(loaded.identity);
                    tried = Some(cert::stamp(&cfg));
                }
                Err(e) if tls.is_some() => {
                    log::error(&format!(
                        "web page: {e}; it keeps serving the certificate it has"
                    ));
                    tried = Some(stamp);
                }
                Err(e) => {
                    problem(&mut last_problem, format!("{e}; the page is off"));
                    tokio::time::sleep(BIND_RETRY).await;
                    continue;
                }
            }
        }
        let (Some(identity), Some(served_stamp)) = (tls.clone(), tried.clone()) else {
            continue;
        };
        let mut listeners = Vec::new();
        let mut bound = Vec::new();
        let mut failed = Vec::new();
        for addr in &wanted {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => {
                    listeners.push(l);
                    bound.push(*addr);
                }
                Err(e) => failed.push(format!("{addr} ({e})")),
            }
        }
        if listeners.is_empty() {
            problem(
                &mut last_problem,
                format!("cannot listen on {}", failed.join(", ")),
            );
            tokio::time::sleep(BIND_RETRY).await;
            continue;
        }
        last_problem = None;
        *backend.listening.lock().unwrap_or_else(|e| e.into_inner()) =
            bound.iter().map(SocketAddr::ip).collect();
        let urls: Vec<String> = bound.iter().map(url).collect();
        log::info(&format!("web page on {}", urls.join(" and ")));
        if !failed.is_empty() {
            log::warn(&format!(
                "web page: cannot listen on {} yet; trying again in {} s",
                failed.join(", "),
                PARTIAL_RETRY.as_secs()
            ));
        }
        let watch = backend.clone();
        let partial = !failed.is_empty();
        let moved = async move {
            let since = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(LISTEN_CHECK).await;
                let cfg = watch.config();
                // A failed look-up keeps the page where it is.
                if let Ok(now) = listen::listen_addresses(&cfg).await {
                    if now != wanted {
                        let now: Vec<String> = now.iter().map(url).collect();
                        log::info(&format!(
                            "web page: moving to {}",
                            if now.is_empty() {
                                "no address".to_owned()
                            } else {
                                now.join(" and ")
                            }
                        ));
                        break;
                    }
                }
                if cert::stamp(&cfg) != served_stamp {
                    log::info("web page: its certificate's files changed; reading them again");
                    break;
                }
                if partial && since.elapsed() >= PARTIAL_RETRY {
                    break;
                }
            }
        };
        if let Err(e) = cage_web::serve_https(listeners, &identity, state.clone(), moved).await {
            log::error(&format!("web page on {} stopped: {e}", urls.join(" and ")));
            tokio::time::sleep(BIND_RETRY).await;
        }
        backend
            .listening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// `cage passwd`: the new password from the terminal, twice, without echo; or one line
/// from standard input when it is not a terminal (scripts, the package's set-up).
pub fn read_new_password() -> std::io::Result<(String, String)> {
    use std::io::BufRead;
    // SAFETY: isatty has no preconditions.
    if unsafe { libc::isatty(0) } == 1 {
        let first = prompt_hidden("New password for the web page: ")?;
        let again = prompt_hidden("Again: ")?;
        Ok((first, again))
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        let line = line.trim_end_matches(['\n', '\r']).to_owned();
        Ok((line.clone(), line))
    }
}

/// Read one line from the terminal with echo off (restored afterwards, also on error).
fn prompt_hidden(prompt: &str) -> std::io::Result<String> {
    use std::io::{BufRead, Write};
    eprint!("{prompt}");
    std::io::stderr().flush()?;
    // SAFETY: termios is plain data; tcgetattr fills it for fd 0, a terminal.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut quiet = saved;
    quiet.c_lflag &= !libc::ECHO;
    quiet.c_lflag |= libc::ECHONL;
    // SAFETY: a termios obtained from tcgetattr, with one flag changed.
    if unsafe { libc::tcsetattr(0, libc::TCSANOW, &quiet) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    // SAFETY: restores the settings read above.
    unsafe { libc::tcsetattr(0, libc::TCSANOW, &saved) };
    read?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

/// Why `cage passwd` did not set the password.
#[derive(Debug, thiserror::Error)]
pub enum PasswdError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Edit(#[from] edit::EditError),
}

/// Hash `password` (argon2id) and write it to `cage.main.password_hash` of the file at
/// `path`, validated and atomically like every edit. A running page picks it up at its
/// next request (it reads the file again when it changed).
pub fn set_password(path: &Path, password: &str, confirm: &str) -> Result<(), PasswdError> {
    if let Some(problem) = cage_web::password_problem(password, confirm) {
        return Err(PasswdError::Refused(problem));
    }
    let phc = cage_web::hash_password(password).map_err(PasswdError::Refused)?;
    edit::edit_file(path, &[Edit::set("cage", "main", "password_hash", &phc)])?;
    Ok(())
}

/// One alert for each of the rules against a hostile neighbour that has stopped
/// something: how many, what, and the rule to look for in the flow log (its blocked
/// records name the host).
fn neighbour_alerts(denied: &std::collections::BTreeMap<String, crate::nft::Count>) -> Vec<Alert> {
    crate::policy::NEIGHBOUR_DENIES
        .iter()
        .filter_map(|(rule, what)| {
            let n = denied.get(*rule).map_or(0, |c| c.packets);
            (n > 0).then(|| Alert {
                time: None,
                kind: "neighbour".into(),
                text: format!("{n} {what} dropped ({rule} in the flow log)"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn a_neighbour_defence_that_stopped_something_is_an_alert() {
        let count = |packets| crate::nft::Count { packets, bytes: 0 };
        let denied = [
            ("deny:addr-theft".to_owned(), count(30)),
            ("deny:mac-flood".to_owned(), count(0)),
            ("deny:lan".to_owned(), count(7)),
        ]
        .into_iter()
        .collect();
        let alerts = neighbour_alerts(&denied);
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].kind, "neighbour");
        assert_eq!(
            alerts[0].text,
            "30 frames claiming another machine's bound address (address theft) dropped \
             (deny:addr-theft in the flow log)"
        );
    }

    /// A flow with every field set, so that none is left out of its JSON.
    fn full_record() -> FlowRecord {
        FlowRecord {
            start: "2026-11-25T10:31:00.123Z".into(),
            end: "2026-11-25T10:31:05.456Z".into(),
            verdict: "blocked".into(),
            rule: Some("deny:lan".into()),
            proto: "tcp".into(),
            host: "192.168.10.10".parse().unwrap(),
            host_port: Some(40000),
            mac: Some("02:00:00:00:00:0a".into()),
            bridge_port: Some("eth1".into()),
            peer: "192.168.8.10".parse().unwrap(),
            peer_port: Some(22),
            direction: "out".into(),
            packets_out: 3,
            bytes_out: 180,
            packets_in: 0,
            bytes_in: 0,
            tag: Some("selftest".into()),
            tcp_flags: Some("S/".into()),
            hostname: Some("agent-box".into()),
            name: Some("lan.example".into()),
        }
    }

    fn keys(v: serde_json::Value) -> BTreeSet<String> {
        v.as_object()
            .expect("a JSON object")
            .keys()
            .cloned()
            .collect()
    }

    /// One schema per record: the flow log on disk, the API (`GET /api/flows` answers the
    /// backend's records as JSON) and the CSV download carry the same fields, so a field
    /// added to `FlowRecord` cannot silently go missing from one of them.
    #[tokio::test]
    async fn the_flow_log_the_api_and_the_csv_carry_the_same_fields() {
        let dir = std::env::temp_dir().join(format!("cage-web-schema-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cage");
        std::fs::write(
            &path,
            format!(
                "config cage 'main'\n\toption log_dir '{d}/log'\n\toption state_dir '{d}/state'\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let cfg = config::load(&path).unwrap();
        flows::FlowLog::open(&cfg)
            .unwrap()
            .write(&[full_record()])
            .unwrap();

        let files = flows::files(&flows::dir(&cfg), cfg.flowlog.log_files);
        let text = std::fs::read_to_string(&files[0]).unwrap();
        let line = text.lines().next().expect("the record was written");
        let in_file = keys(serde_json::from_str(line).unwrap());

        let served = AgentBackend::new(&path, cfg)
            .flows(FlowFilter::default(), 0)
            .await
            .unwrap();
        assert_eq!(
            served,
            vec![full_record()],
            "the API serves what the log holds"
        );
        let in_api = keys(serde_json::to_value(&served[0]).unwrap());

        let csv = cage_web::flows::csv(&served);
        let mut rows = csv.lines();
        let header: Vec<String> = rows.next().unwrap().split(',').map(String::from).collect();
        let row: Vec<&str> = rows.next().unwrap().split(',').collect();
        let in_csv: BTreeSet<String> = header.iter().cloned().collect();

        assert_eq!(in_file.len(), 20, "{in_file:?}");
        assert_eq!(in_api, in_file, "the API and the flow log");
        assert_eq!(in_csv, in_file, "the CSV's columns and the flow log");
        assert_eq!(header.len(), in_csv.len(), "no CSV column twice");
        assert_eq!(
            row.len(),
            header.len(),
            "a value for every CSV column: {row:?}"
        );
        for (column, value) in header.iter().zip(&row) {
            let json = &serde_json::to_value(&served[0]).unwrap()[column];
            let want = json
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| json.to_string());
            assert_eq!(*value, want, "CSV column {column}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
