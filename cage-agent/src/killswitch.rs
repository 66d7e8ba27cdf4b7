//! The kill switch: isolate the segment at once, keep it isolated across restarts and
//! reboots, release only on purpose, and write every press to an audit log.
//!
//! The state lives in `<state_dir>/isolation.json` (`isolation`: persistent, so a reboot
//! comes back isolated) and is written, synced, before the kernel is touched: any policy rendered
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
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::apply;
use crate::config::Config;
use crate::isolation::{self, AuditEntry, Source, State};
use crate::nft;
use crate::policy;

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
        since: crate::clock::unix_now(),
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
    if let Err(source) = isolation::store(cfg, &state) {
        let e = KillSwitchError::State {
            path: isolation::state_path(cfg),
            source,
        };
        entry.result = e.to_string();
        isolation::audit(cfg, &entry);
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
    isolation::audit(cfg, &entry);
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
