//! The kill switch's state, as the disk keeps it: `<state_dir>/isolation.json` (the
//! truth: persistent, so a reboot comes back isolated, and written durably before the
//! kernel is told) and the audit log of every press (`<state_dir>/audit.log`).
//!
//! A leaf: it depends on the configuration only, so that rendering a policy
//! (`apply`, which must include a pressed kill switch) and pressing the switch
//! (`killswitch`, which then applies) do not depend on each other.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use cage_common::records::{AuditEntry, Source};

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

/// Audit logs larger than this are rotated to `audit.log.1` (one old file is kept).
pub const AUDIT_MAX_BYTES: u64 = 256 * 1024;

pub fn state_path(cfg: &Config) -> PathBuf {
    cfg.main.state_dir.join("isolation.json")
}

pub fn audit_path(cfg: &Config) -> PathBuf {
    cfg.main.state_dir.join("audit.log")
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

/// Write the state durably (see [`write_durably`]).
pub fn store(cfg: &Config, state: &State) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(state).expect("the state always serialises");
    write_durably(&state_path(cfg), &bytes)
}

/// Append one entry to the audit log (rotated at [`AUDIT_MAX_BYTES`]); a failure is
/// logged, never fatal: the press itself must take effect.
pub fn audit(cfg: &Config, entry: &AuditEntry) {
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
