//! `cage run`: apply the policy, then keep it in force.
//!
//! The kernel enforces the policy, not this process: stopping or killing `cage run` leaves
//! Cage's tables in place. The daemon's work is to (re)apply: on SIGHUP with the new
//! configuration if it is valid (a bad one is logged and the running policy stays), and
//! every few seconds when the facts it was rendered from change (the WAN got a new
//! address) or when Cage's tables were removed or altered behind its back.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::signal::unix::{signal, SignalKind};

use crate::apply::{self, Checked};
use crate::log;
use crate::nft;

/// How often the daemon verifies the kernel state and re-detects the facts.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// What the daemon tells `cage status`, written to `<log_dir>/daemon.json` on every
/// change (the log directory is RAM on OpenWrt, so this costs no flash writes).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct DaemonState {
    pub pid: u32,
    pub config: PathBuf,
    pub started: u64,
    pub last_apply: Option<u64>,
    pub applies: u64,
    pub last_error: Option<String>,
    pub wan_devices: Vec<String>,
}

pub fn state_path(log_dir: &Path) -> PathBuf {
    log_dir.join("daemon.json")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn save(state: &DaemonState, log_dir: &Path) {
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(log_dir)?;
        let tmp = log_dir.join("daemon.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
        std::fs::rename(tmp, state_path(log_dir))
    };
    if let Err(e) = write() {
        log::warn(&format!(
            "cannot write {}: {e}",
            state_path(log_dir).display()
        ));
    }
}

pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    // Start: a bad configuration stops the daemon, but whatever policy the kernel already
    // has stays in force (fail closed).
    let mut current: Checked = apply::check(config_path).await?;
    let actions = apply::enforce(&current).await?;
    for a in actions {
        log::info(&a);
    }
    let mut state = DaemonState {
        pid: std::process::id(),
        config: config_path.to_owned(),
        started: now(),
        last_apply: Some(now()),
        applies: 1,
        last_error: None,
        wan_devices: current.facts.wan_devices.clone(),
    };
    let mut applied_text = nft::list_text()?;
    log::info(&format!(
        "policy applied from {} (WAN: {})",
        config_path.display(),
        wan_list(&current)
    ));
    save(&state, &current.config.main.log_dir);

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    // The last segment setup error, logged once rather than at every tick.
    let mut segment_error: Option<String> = None;
    tick.tick().await;

    loop {
        tokio::select! {
            _ = hup.recv() => {
                log::info("SIGHUP: reloading configuration");
                match apply::check(config_path).await {
                    Ok(next) => match apply::enforce(&next).await {
                        Ok(actions) => {
                            for a in actions { log::info(&a); }
                            current = next;
                            state.last_error = None;
                            log::info("new configuration applied");
                        }
                        Err(e) => {
                            log::error(&format!("reload failed: {e}"));
                            state.last_error = Some(e.to_string());
                        }
                    },
                    Err(e) => {
                        log::error(&format!("new configuration refused, the running policy stays: {e}"));
                        state.last_error = Some(e.to_string());
                    }
                }
                state.applies += 1;
                state.last_apply = Some(now());
                state.wan_devices = current.facts.wan_devices.clone();
                applied_text = nft::list_text().unwrap_or_default();
                save(&state, &current.config.main.log_dir);
            }
            _ = tick.tick() => {
                // The segment too: a port re-created or re-bridged by someone else comes
                // back without isolation. Setup is idempotent, so this repairs only that.
                match crate::netlink::setup_segment(&current.config).await {
                    Ok(report) => {
                        for a in report.actions {
                            log::warn(&format!("segment repaired: {a}"));
                        }
                        segment_error = None;
                    }
                    Err(e) => {
                        let e = e.to_string();
                        if segment_error.as_ref() != Some(&e) {
                            log::error(&format!("cannot set up the segment: {e}"));
                            segment_error = Some(e);
                        }
                    }
                }
                if let Some(reason) = drift(&current, &applied_text).await {
                    log::warn(&format!("{reason}: re-applying the policy"));
                    match apply::check_config(current.config.clone()).await {
                        Ok(next) => match apply::enforce(&next).await {
                            Ok(actions) => {
                                for a in actions { log::info(&a); }
                                current = next;
                                state.last_error = None;
                            }
                            Err(e) => {
                                log::error(&format!("re-apply failed: {e}"));
                                state.last_error = Some(e.to_string());
                            }
                        },
                        Err(e) => {
                            log::error(&format!("re-apply failed: {e}"));
                            state.last_error = Some(e.to_string());
                        }
                    }
                    state.applies += 1;
                    state.last_apply = Some(now());
                    state.wan_devices = current.facts.wan_devices.clone();
                    applied_text = nft::list_text().unwrap_or_default();
                    save(&state, &current.config.main.log_dir);
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    log::info("stopping; the policy stays in the kernel (`cage disable` removes it)");
    Ok(())
}

/// Why the kernel no longer has what the daemon applied, if it doesn't.
async fn drift(current: &Checked, applied_text: &str) -> Option<String> {
    match nft::list_text() {
        Ok(t) if t.is_empty() => return Some("Cage's tables were removed".into()),
        Ok(t) if t != applied_text => return Some("Cage's tables were changed".into()),
        Ok(_) => {}
        Err(e) => return Some(format!("cannot read Cage's tables ({e})")),
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
