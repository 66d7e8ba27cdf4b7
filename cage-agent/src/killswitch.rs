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

use std::collections::{BTreeMap, HashMap, VecDeque};
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
        seq: None,
        prev: None,
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

/// One reading of what automatic isolation watches, as [`read`] takes it from the
/// kernel and the disk: per-host counts of Cage's meters, and the probe hosts of a
/// running `cage selftest`. [`AutoWatch::observe`] decides on it alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readings {
    /// Each meter read (`policy::AUTO_BLOCKED`, `policy::AUTO_UPLOAD`) with its per-host
    /// counts; a meter that could not be read is left out (and logged by [`read`]).
    pub meters: Vec<(&'static str, BTreeMap<IpAddr, nft::Count>)>,
    /// The probe hosts of a running `cage selftest`.
    pub selftest_hosts: Vec<IpAddr>,
}

/// The rules of automatic isolation on the meters: their meter pair, limit (0: off),
/// what they count, and whether that is bytes (else packets).
fn meter_rules(cfg: &Config) -> [(&'static [&'static str; 2], u64, &'static str, bool); 2] {
    let ks = &cfg.killswitch;
    [
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
    ]
}

/// Read the meters of the rules that are on (only those: each is one nft run), and the
/// hosts of a running `cage selftest`.
pub fn read(cfg: &Config) -> Readings {
    let mut readings = Readings {
        meters: Vec::new(),
        selftest_hosts: crate::selftest::running(&cfg.main.log_dir)
            .map(|st| st.addresses)
            .unwrap_or_default(),
    };
    for (meters, limit, _, _) in meter_rules(cfg) {
        if limit == 0 {
            continue;
        }
        for &meter in meters.iter() {
            match nft::meter_counts(meter) {
                Ok(c) => readings.meters.push((meter, c)),
                Err(e) => {
                    crate::log::warn(&format!("automatic isolation cannot read {meter}: {e}"))
                }
            }
        }
    }
    readings
}

impl AutoWatch {
    /// Take one reading of the meters and return the first limit exceeded, if any.
    pub fn observe(&mut self, cfg: &Config, readings: &Readings, now: Instant) -> Option<Trigger> {
        let ks = &cfg.killswitch;
        let window = Duration::from_secs(u64::from(ks.auto_window));
        for &a in &readings.selftest_hosts {
            self.exempt.insert(a, now + window);
        }
        self.exempt.retain(|_, until| *until > now);
        for (meters, limit, what, bytes) in meter_rules(cfg) {
            if limit == 0 {
                continue;
            }
            for meter in meters.iter() {
                let Some((_, counts)) = readings.meters.iter().find(|(m, _)| m == meter) else {
                    continue;
                };
                for (&host, count) in counts {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        crate::config::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn host(last: u8) -> IpAddr {
        IpAddr::from([192, 168, 10, last])
    }

    /// One reading of the blocked-attempts meter (IPv4) with these packet counts.
    fn blocked(counts: &[(IpAddr, u64)]) -> Readings {
        Readings {
            meters: vec![(
                policy::AUTO_BLOCKED[0],
                counts
                    .iter()
                    .map(|&(h, packets)| (h, nft::Count { packets, bytes: 0 }))
                    .collect(),
            )],
            selftest_hosts: vec![],
        }
    }

    const BLOCKED_20: &str = "config killswitch 'killswitch'\n\toption auto_blocked '20'\n\
                              \toption auto_window '10'\n";

    #[test]
    fn the_button_isolates_and_releases_only_as_configured() {
        use ButtonAction::*;
        let none = config("");
        let press = config("config killswitch 'killswitch'\n\toption button 'BTN_0'\n");
        let toggle = config(
            "config killswitch 'killswitch'\n\toption button 'BTN_0'\n\
             \toption button_release '1'\n",
        );
        for (cfg, button, action, want) in [
            (&none, "BTN_0", "pressed", Ignore),
            (&press, "BTN_0", "pressed", Isolate),
            (&press, "BTN_0", "released", Ignore),
            (&press, "reset", "pressed", Ignore),
            (&toggle, "BTN_0", "released", Release),
            (&toggle, "BTN_0", "held", Ignore),
        ] {
            assert_eq!(
                button_action(cfg, button, action),
                want,
                "{button} {action}"
            );
        }
    }

    #[test]
    fn a_burst_over_the_limit_within_the_window_fires_and_names_the_host() {
        let cfg = config(BLOCKED_20);
        let mut w = AutoWatch::default();
        let t0 = Instant::now();
        // A host seen for the first time: its whole count is recent.
        assert_eq!(w.observe(&cfg, &blocked(&[(host(10), 15)]), t0), None);
        let t = w
            .observe(
                &cfg,
                &blocked(&[(host(10), 36)]),
                t0 + Duration::from_secs(1),
            )
            .expect("36 blocked attempts within 10 s, limit 20");
        assert_eq!(
            t,
            Trigger {
                host: host(10),
                what: "blocked attempts",
                amount: 36,
                limit: 20,
                window: 10,
            }
        );
        assert_eq!(
            t.to_string(),
            "automatic: 192.168.10.10 made 36 blocked attempts within 10 s (limit 20)"
        );
    }

    #[test]
    fn a_steady_trickle_under_the_limit_per_window_never_fires() {
        let cfg = config(BLOCKED_20);
        let mut w = AutoWatch::default();
        let t0 = Instant::now();
        // One reading a second, 2 more each time: 20 per 10 s window, never over 20.
        for s in 0..60u64 {
            let now = t0 + Duration::from_secs(s);
            let r = blocked(&[(host(10), 2 * s)]);
            assert_eq!(w.observe(&cfg, &r, now), None, "second {s}");
        }
    }

    #[test]
    fn a_counter_that_went_down_starts_the_host_afresh() {
        let cfg = config(BLOCKED_20);
        let mut w = AutoWatch::default();
        let t0 = Instant::now();
        assert_eq!(w.observe(&cfg, &blocked(&[(host(10), 5)]), t0), None);
        assert_eq!(w.observe(&cfg, &blocked(&[(host(10), 18)]), t0), None);
        // The policy was re-applied: the meter starts from 0 again. 12 since then is 12,
        // not 18 + 12.
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(w.observe(&cfg, &blocked(&[(host(10), 12)]), t1), None);
        assert!(w.observe(&cfg, &blocked(&[(host(10), 33)]), t1).is_some());
    }

    #[test]
    fn the_self_tests_probe_hosts_never_fire_and_a_rule_that_is_off_reads_nothing() {
        let cfg = config(BLOCKED_20);
        let mut w = AutoWatch::default();
        let t0 = Instant::now();
        let mut r = blocked(&[(host(200), 0)]);
        r.selftest_hosts = vec![host(200)];
        assert_eq!(w.observe(&cfg, &r, t0), None);
        r.meters = blocked(&[(host(200), 500)]).meters;
        assert_eq!(w.observe(&cfg, &r, t0 + Duration::from_secs(1)), None);
        // Off: the same readings decide nothing, and `read` would ask nft for nothing.
        let off = config("");
        let mut w = AutoWatch::default();
        assert_eq!(w.observe(&off, &blocked(&[(host(10), 0)]), t0), None);
        assert_eq!(
            w.observe(
                &off,
                &blocked(&[(host(10), 1_000_000)]),
                t0 + Duration::from_secs(1)
            ),
            None
        );
        assert!(meter_rules(&off).iter().all(|(_, limit, _, _)| *limit == 0));
    }

    #[test]
    fn uploads_are_counted_in_bytes_on_their_own_meter() {
        let cfg = config("config killswitch 'killswitch'\n\toption auto_upload_bytes '1000000'\n");
        let mut w = AutoWatch::default();
        let t0 = Instant::now();
        let upload = |bytes: u64| Readings {
            meters: vec![(
                policy::AUTO_UPLOAD[1],
                [(
                    "fd00:cafe:10::10".parse().unwrap(),
                    nft::Count { packets: 3, bytes },
                )]
                .into(),
            )],
            selftest_hosts: vec![],
        };
        assert_eq!(w.observe(&cfg, &upload(10), t0), None);
        // The blocked-attempts meter is not this rule's.
        assert_eq!(
            w.observe(&cfg, &blocked(&[(host(10), 5_000_000)]), t0),
            None
        );
        let t = w
            .observe(&cfg, &upload(2_000_000), t0 + Duration::from_secs(1))
            .expect("2 MB within the window, limit 1 MB");
        assert_eq!(
            (t.what, t.amount),
            ("bytes sent to the internet", 2_000_000)
        );
    }

    #[test]
    fn dns_violations_fire_their_own_rule_and_reset_forgets_the_history() {
        let cfg = config("config dns 'dns'\n\toption auto_violations '50'\n");
        let mut w = AutoWatch::default();
        let t0 = Instant::now();
        let v = |n: u64| HashMap::from([(host(11), n)]);
        assert_eq!(w.observe_dns(&cfg, &v(10), t0), None);
        let t = w
            .observe_dns(&cfg, &v(70), t0 + Duration::from_secs(1))
            .expect("70 violations, limit 50");
        assert_eq!((t.host, t.what), (host(11), "DNS limit violations"));
        // After an isolation the history is forgotten and the forwarder's counts start
        // from 0 (`dns::Shared::restart_violations`): the released segment is judged on
        // what it does from then on.
        w.reset();
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(w.observe_dns(&cfg, &v(10), t1), None);
        assert_eq!(w.observe_dns(&cfg, &v(45), t1), None);
        assert!(w.observe_dns(&cfg, &v(61), t1).is_some());
        assert_eq!(w.observe_dns(&config(""), &v(10_000), t0), None, "off");
    }
}
