//! The kill switch: isolate the segment at once, keep it isolated across restarts and
//! reboots, release only on purpose, and write every press to an audit log.
//!
//! The state lives in `<state_dir>/isolation.json` (persistent, so a reboot comes back
//! isolated) and is written, synced, before the kernel is touched: any policy rendered
//! after that moment (by `cage run` reapplying, or at its start) already includes the
//! isolation, so no concurrent reapply can undo it. The kernel part is one element added
//! to (or the set flushed from) the `isolated` set of Cage's table, which drops
//! everything to and from the segment in every base chain, established flows included.
//!
//! Every caller (the CLI, the hardware button, the web page, automatic isolation) goes
//! through [`isolate`] and [`release`], which work on the kernel directly: they need no
//! daemon. A state file that cannot be read counts as isolated (fail closed).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::apply;
use crate::config::Config;
use crate::nft;
use crate::policy;

/// Who pressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Cli,
    Web,
    Button,
    Auto,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Cli => "cli",
            Source::Web => "web",
            Source::Button => "button",
            Source::Auto => "auto",
        })
    }
}

/// The kill switch's state as stored on disk; the default is "never pressed".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub isolated: bool,
    /// Unix time of the last isolate or release.
    pub since: u64,
    pub source: Option<Source>,
    pub reason: String,
    pub who: String,
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Unix time, seconds.
    pub time: u64,
    /// `isolate` or `release`.
    pub action: String,
    pub source: Source,
    pub reason: String,
    pub who: String,
    /// `ok`, or what went wrong (the state was still written).
    pub result: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KillSwitchError {
    #[error("cannot write the kill-switch state {path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the state says isolated, but the kernel could not be told: {0}")]
    Kernel(String),
}

/// Audit logs larger than this are rotated to `audit.log.1` (one old file is kept).
pub const AUDIT_MAX_BYTES: u64 = 256 * 1024;

pub fn state_path(cfg: &Config) -> PathBuf {
    cfg.main.state_dir.join("isolation.json")
}

pub fn audit_path(cfg: &Config) -> PathBuf {
    cfg.main.state_dir.join("audit.log")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The stored state. No file: not isolated (nothing was ever pressed). A file that cannot
/// be read or parsed: isolated, because the cage must not open on a damaged disk.
pub fn load(cfg: &Config) -> State {
    let path = state_path(cfg);
    match std::fs::read(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
        Err(e) => damaged(&path, &e.to_string()),
        Ok(bytes) => {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| damaged(&path, &e.to_string()))
        }
    }
}

fn damaged(path: &Path, why: &str) -> State {
    State {
        isolated: true,
        since: 0,
        source: None,
        reason: format!(
            "the kill-switch state {} is unreadable ({why}); isolated until released",
            path.display()
        ),
        who: "cage".into(),
    }
}

/// Write `bytes` to `path` so that after a crash or power loss the file holds either the
/// old or the new content: a temporary file, synced, renamed, directory synced.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

fn store(cfg: &Config, state: &State) -> Result<(), KillSwitchError> {
    let path = state_path(cfg);
    let bytes = serde_json::to_vec_pretty(state).expect("the state always serialises");
    write_durably(&path, &bytes).map_err(|source| KillSwitchError::State { path, source })
}

fn audit(cfg: &Config, entry: &AuditEntry) {
    let path = audit_path(cfg);
    let write = || -> std::io::Result<()> {
        if std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) > AUDIT_MAX_BYTES {
            std::fs::rename(&path, path.with_extension("log.1"))?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let mut line = serde_json::to_vec(entry).expect("an audit entry always serialises");
        line.push(b'\n');
        f.write_all(&line)?;
        f.sync_data()
    };
    if let Err(e) = write() {
        crate::log::error(&format!(
            "cannot append to the audit log {}: {e}",
            path.display()
        ));
    }
}

/// The last `n` audit entries, oldest first.
pub fn audit_tail(cfg: &Config, n: usize) -> Vec<AuditEntry> {
    let text = std::fs::read_to_string(audit_path(cfg)).unwrap_or_default();
    let entries: Vec<AuditEntry> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let skip = entries.len().saturating_sub(n);
    entries.into_iter().skip(skip).collect()
}

/// Who is at the keyboard, for the audit log of a local command.
pub fn local_user() -> String {
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| {
            // SAFETY: getuid has no preconditions.
            format!("uid {}", unsafe { libc::getuid() })
        });
    format!("local:{user}")
}

/// Tell the kernel. The quick way is one element in the applied policy's set; if Cage's
/// table is not there (never applied, or removed), the whole policy is applied, which
/// reads the isolation from the state just written.
async fn enforce(cfg: &Config, on: bool) -> Result<(), KillSwitchError> {
    // The fast path first: one write to the pinned map, and the eBPF program drops every
    // frame of the segment at the bridge, before netfilter (and before any flow
    // offloading that would bypass it).
    let pin_dir = cfg.pin_dir();
    if crate::ebpf::is_pinned(&pin_dir) {
        if let Err(e) = crate::ebpf::Maps::open(&pin_dir).and_then(|mut m| m.set_isolated(on)) {
            crate::log::warn(&format!(
                "the eBPF kill-switch flag could not be set ({e}); nftables still acts"
            ));
        }
    }
    match nft::apply(&policy::isolation(cfg, on)) {
        Ok(()) => Ok(()),
        Err(quick) => {
            let checked = apply::check_config(cfg.clone())
                .await
                .map_err(|e| KillSwitchError::Kernel(format!("{quick}; and then: {e}")))?;
            apply::enforce(&checked)
                .await
                .map(|_| ())
                .map_err(|e| KillSwitchError::Kernel(format!("{quick}; and then: {e}")))
        }
    }
}

async fn switch(
    cfg: &Config,
    on: bool,
    source: Source,
    reason: &str,
    who: &str,
) -> Result<State, KillSwitchError> {
    let state = State {
        isolated: on,
        since: now(),
        source: Some(source),
        reason: reason.to_owned(),
        who: who.to_owned(),
    };
    let mut entry = AuditEntry {
        time: state.since,
        action: if on { "isolate" } else { "release" }.into(),
        source,
        reason: reason.to_owned(),
        who: who.to_owned(),
        result: "ok".into(),
    };
    // Disk first: see the module documentation.
    if let Err(e) = store(cfg, &state) {
        entry.result = e.to_string();
        audit(cfg, &entry);
        if on {
            // Isolate anyway: the press must take effect even if the disk fails.
            enforce(cfg, true).await?;
        }
        return Err(e);
    }
    let result = enforce(cfg, on).await;
    if let Err(e) = &result {
        entry.result = e.to_string();
    }
    audit(cfg, &entry);
    result.map(|()| state)
}

/// Cut the segment off: everything to and from it is dropped until [`release`].
pub async fn isolate(
    cfg: &Config,
    source: Source,
    reason: &str,
    who: &str,
) -> Result<State, KillSwitchError> {
    switch(cfg, true, source, reason, who).await
}

/// End an isolation: the full contract applies again.
pub async fn release(
    cfg: &Config,
    source: Source,
    reason: &str,
    who: &str,
) -> Result<State, KillSwitchError> {
    switch(cfg, false, source, reason, who).await
}

/// What a hardware button event means for the kill switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ButtonAction {
    Isolate,
    Release,
    /// Another button, or a release event that the configuration ignores.
    Ignore,
}

/// Map an OpenWrt button hotplug event (`$BUTTON`, `$ACTION`) to the kill switch.
pub fn button_action(cfg: &Config, button: &str, action: &str) -> ButtonAction {
    if cfg.killswitch.button.as_deref() != Some(button) {
        return ButtonAction::Ignore;
    }
    match action {
        "pressed" => ButtonAction::Isolate,
        "released" if cfg.killswitch.button_release => ButtonAction::Release,
        _ => ButtonAction::Ignore,
    }
}

/// Automatic isolation: watches Cage's per-host meters and says when a caged host went
/// over a configured limit within the window. Readings are cumulative counters, so the
/// watch keeps, per host, the readings of the last window and compares the newest with
/// the oldest. A counter that went down (the policy was re-applied and the meters
/// started again) restarts that host's history.
#[derive(Debug, Default)]
pub struct AutoWatch {
    history: HashMap<(&'static str, IpAddr), VecDeque<(Instant, u64)>>,
    /// Hosts that never trigger until then: a running `cage selftest`'s probe hosts,
    /// whose hundred denied attempts are on purpose, for one window after they were last
    /// seen (their counts stay in the window that long).
    exempt: HashMap<IpAddr, Instant>,
}

/// Why automatic isolation fired: the evidence, for the log and the audit entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    pub host: IpAddr,
    pub what: &'static str,
    pub amount: u64,
    pub limit: u64,
    pub window: u32,
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "automatic: {} made {} {} within {} s (limit {})",
            self.host, self.amount, self.what, self.window, self.limit
        )
    }
}

impl AutoWatch {
    /// Take one reading of the meters and return the first limit exceeded, if any.
    pub fn observe(&mut self, cfg: &Config, now: Instant) -> Option<Trigger> {
        let ks = &cfg.killswitch;
        let window = Duration::from_secs(u64::from(ks.auto_window));
        if let Some(st) = crate::selftest::running(&cfg.main.log_dir) {
            for a in st.addresses {
                self.exempt.insert(a, now + window);
            }
        }
        self.exempt.retain(|_, until| *until > now);
        let rules: [(&'static [&'static str; 2], u64, &'static str, bool); 2] = [
            (
                &policy::AUTO_BLOCKED,
                u64::from(ks.auto_blocked),
                "blocked attempts",
                false,
            ),
            (
                &policy::AUTO_UPLOAD,
                ks.auto_upload_bytes,
                "bytes sent to the internet",
                true,
            ),
        ];
        for (meters, limit, what, bytes) in rules {
            if limit == 0 {
                continue;
            }
            for meter in meters.iter() {
                let counts = match nft::meter_counts(meter) {
                    Ok(c) => c,
                    Err(e) => {
                        crate::log::warn(&format!("automatic isolation cannot read {meter}: {e}"));
                        continue;
                    }
                };
                for (host, count) in counts {
                    let value = if bytes { count.bytes } else { count.packets };
                    let t = self.step(meter, host, value, limit, what, ks.auto_window, now);
                    if t.is_some() {
                        return t;
                    }
                }
            }
        }
        None
    }

    /// Take one reading of the DNS forwarder's per-host limit violations (cumulative,
    /// see `dns::Shared::violations`) and say whether a host went over
    /// `dns.auto_violations` within the window.
    pub fn observe_dns(
        &mut self,
        cfg: &Config,
        violations: &HashMap<IpAddr, u64>,
        now: Instant,
    ) -> Option<Trigger> {
        let limit = u64::from(cfg.dns.auto_violations);
        if limit == 0 {
            return None;
        }
        let mut hosts: Vec<_> = violations.iter().collect();
        hosts.sort();
        for (&host, &value) in hosts {
            let t = self.step(
                "dns_violations",
                host,
                value,
                limit,
                "DNS limit violations",
                cfg.killswitch.auto_window,
                now,
            );
            if t.is_some() {
                return t;
            }
        }
        None
    }

    /// One reading of one host's cumulative counter: the trigger if it grew by more than
    /// `limit` within the window.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        counter: &'static str,
        host: IpAddr,
        value: u64,
        limit: u64,
        what: &'static str,
        window_secs: u32,
        now: Instant,
    ) -> Option<Trigger> {
        let window = Duration::from_secs(u64::from(window_secs));
        let h = self.history.entry((counter, host)).or_default();
        if h.back().is_some_and(|&(_, last)| value < last) {
            h.clear();
        }
        if h.is_empty() {
            // A host seen for the first time got its entry since the last reading (the
            // meters start empty with each applied policy, the forwarder's counts with
            // each daemon): all of its count is recent, as if it read 0 just now.
            h.push_back((now, 0));
        }
        h.push_back((now, value));
        // The baseline is the oldest reading within the window.
        while h.len() > 1 && now.duration_since(h[0].0) > window {
            h.pop_front();
        }
        let amount = value.saturating_sub(h[0].1);
        (amount > limit && !self.exempt.contains_key(&host)).then_some(Trigger {
            host,
            what,
            amount,
            limit,
            window: window_secs,
        })
    }

    /// Forget all readings (after an isolation, so a release starts afresh).
    pub fn reset(&mut self) {
        self.history.clear();
    }
}
