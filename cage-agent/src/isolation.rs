//! The kill switch's state, as the disk keeps it: `<state_dir>/isolation.json` (the
//! truth: persistent, so a reboot comes back isolated, and written durably before the
//! kernel is told); every press goes to the audit log (`audit`).
//!
//! A leaf: it depends on the configuration only, so that rendering a policy
//! (`apply`, which must include a pressed kill switch) and pressing the switch
//! (`killswitch`, which then applies) do not depend on each other.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use cage_common::records::{AuditEntry, Source};
// The audit log is `audit`'s; the kill switch writes its presses with this.
pub use crate::audit::record as audit;

use crate::config::Config;

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

pub fn state_path(cfg: &Config) -> PathBuf {
    cfg.main.state_dir.join("isolation.json")
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
    // A temporary name of this writer's own: two presses at once (two `cage isolate`,
    // or the page and automatic isolation in one `cage run`) must not rename each
    // other's file away.
    // portable-atomic: 32-bit MIPS has no native 64-bit atomics.
    static WRITES: portable_atomic::AtomicU64 = portable_atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("{}.{n}.tmp", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Write the state durably (see [`write_durably`]).
pub fn store(cfg: &Config, state: &State) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(state).expect("the state always serialises");
    write_durably(&state_path(cfg), &bytes)
}

/// The kill switch's last `n` presses (isolate, release) in the audit log, oldest first:
/// what `cage status` and the page's kill-switch log show (`cage audit` shows all).
pub fn audit_tail(cfg: &Config, n: usize) -> Vec<AuditEntry> {
    crate::audit::tail_matching(cfg, n, |e| e.action == "isolate" || e.action == "release")
}
