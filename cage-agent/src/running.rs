//! The running `cage run`, as every other process sees it: its state file
//! (`<log_dir>/daemon.json`, written by the daemon on every change), whether the process
//! it names is alive, and the two signals others send it: SIGHUP to reload the
//! configuration ([`request_reload`], after an edit), SIGTERM to stop ([`stop_daemon`],
//! for `cage disable`).
//!
//! A leaf: it depends on the configuration's types only, so that editing the
//! configuration (`config::edit`), the web page and `cage dns allow` can ask for a reload
//! without depending on the daemon.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;

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

/// The state the daemon last wrote, if there is a readable one.
pub fn load(log_dir: &Path) -> Option<DaemonState> {
    let bytes = std::fs::read(state_path(log_dir)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Write the state (a temporary file renamed over the old one).
pub fn store(state: &DaemonState, log_dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(log_dir)?;
    let tmp = log_dir.join("daemon.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(tmp, state_path(log_dir))
}

/// Whether a process with this pid is a running `cage` (a zombie is not running).
pub fn cage_running(pid: u32) -> bool {
    // /proc/PID/stat is "pid (comm) state …"; comm may hold spaces and parentheses.
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let comm = &stat[open + 1..close];
    let state = stat[close + 1..].split_whitespace().next().unwrap_or("");
    comm == "cage" && state != "Z" && state != "X"
}

/// Ask the running `cage run` (if any) to reload its configuration, as `kill -HUP` would.
/// `Ok(false)` when no daemon runs for this configuration's log directory.
pub fn request_reload(cfg: &Config) -> std::io::Result<bool> {
    let Some(state) = load(&cfg.main.log_dir) else {
        return Ok(false);
    };
    if !cage_running(state.pid) {
        return Ok(false);
    }
    // SAFETY: kill(2) with a pid read from Cage's own state file, checked to be a `cage`.
    if unsafe { libc::kill(state.pid as i32, libc::SIGHUP) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(true)
}

/// Stop a running `cage run` (SIGTERM, then wait up to 5 s). Used by `cage disable`,
/// which would otherwise see the daemon restore the tables it removed.
pub fn stop_daemon(log_dir: &Path) -> anyhow::Result<()> {
    let Some(state) = load(log_dir) else {
        return Ok(());
    };
    if !cage_running(state.pid) || state.pid == std::process::id() {
        return Ok(());
    }
    eprintln!("cage: stopping the daemon (pid {})", state.pid);
    // SAFETY: kill(2) with a pid read from our own state file, checked to be a `cage`.
    unsafe { libc::kill(state.pid as i32, libc::SIGTERM) };
    for _ in 0..50 {
        if !cage_running(state.pid) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    anyhow::bail!("the daemon (pid {}) did not stop within 5 s", state.pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_live_cage_process_counts_as_running() {
        // This test binary is alive but is not called `cage`.
        assert!(!cage_running(std::process::id()));
        assert!(!cage_running(u32::MAX));
    }

    #[test]
    fn the_state_file_round_trips_and_a_missing_one_is_none() {
        let dir = std::env::temp_dir().join(format!("cage-running-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(load(&dir).is_none());
        let state = DaemonState {
            pid: 4242,
            applies: 3,
            wan_devices: vec!["wan".into()],
            ..DaemonState::default()
        };
        store(&state, &dir).unwrap();
        let back = load(&dir).expect("written");
        assert_eq!(
            (back.pid, back.applies, back.wan_devices),
            (4242, 3, state.wan_devices)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
