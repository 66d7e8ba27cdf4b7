//! The audit log, `<state_dir>/audit.log`: one JSON line ([`AuditEntry`]) for every
//! security event an owner wants kept — each isolate and release of the kill switch
//! (CLI, button, web, automatic), each configuration `cage run` applied or refused, each
//! login and failed login to the page — chained by hashes, so that a line changed,
//! removed, inserted or moved after it was written shows (`cage audit verify`).
//!
//! The chain, exactly:
//! - every line Cage writes carries `seq` and `prev`;
//! - `prev` is the SHA-256 of the line before it in the log: that line's exact bytes as
//!   they are in the file, without its newline, in lowercase hex. The first line of a
//!   fresh log has [`GENESIS`] (64 zeros);
//! - `seq` is 1 at the first chained line and one more at each line after it;
//! - the log is `audit.log.1` followed by `audit.log`. Before an append finds
//!   `audit.log` over [`MAX_BYTES`], it renames it to `audit.log.1` (dropping the one
//!   before), and the first line of the new `audit.log` chains to the last line of
//!   `audit.log.1`; seq goes on;
//! - lines of a Cage before the chain (no `seq`, no `prev`) are accepted at the start of
//!   the history only, and the first chained line chains to the last of them.
//!
//! Writers are separate processes (`cage run`'s automatic isolation and web page,
//! `cage isolate`, the button hook): an append holds an exclusive `flock` on
//! `audit.log.lock` while it rotates, reads the last line and writes, so two of them
//! never chain to the same line. Verification holds it shared.
//!
//! What a chain without a key cannot do: whoever can write the file can rewrite all of
//! it with fresh hashes, and can remove the newest lines (the head) without a trace
//! here. A copy of the head kept elsewhere (the syslog collector gets every line with its
//! `seq` and `prev`) is what catches those: `cage audit verify --expect SEQ:PREV`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

pub use cage_common::records::{AuditEntry, Source};

use crate::config::Config;

/// `audit.log` larger than this is rotated to `audit.log.1` (one old file is kept).
pub const MAX_BYTES: u64 = 256 * 1024;

/// The `prev` of the first line of a fresh log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// How long an append or a verification waits for another process's lock. An append
/// that cannot have it gives up (and says so) rather than fork the chain.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// What of the file an append reads to find the last line; a longer last line makes it
/// read the whole file.
const TAIL_WINDOW: u64 = 64 * 1024;

/// Configuration errors and the like are cut to this many characters in an entry.
const MAX_TEXT: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is held by another process for over {} s", LOCK_WAIT.as_secs())]
    Busy { path: PathBuf },
    #[error("no audit log at {path}{}", if *.rotated_exists { " (but its rotated file is there)" } else { "" })]
    Missing { path: PathBuf, rotated_exists: bool },
    #[error("--expect takes SEQ:PREV (a number, a colon, 64 hex digits), not {0:?}")]
    Expect(String),
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> AuditError + 'a {
    move |source| AuditError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// `<state_dir>/audit.log`.
pub fn path(cfg: &Config) -> PathBuf {
    cfg.main.state_dir.join("audit.log")
}

/// The rotated file of `log`: its name with `.1` added (`audit.log.1`).
pub fn rotated(log: &Path) -> PathBuf {
    sibling(log, ".1")
}

fn sibling(log: &Path, suffix: &str) -> PathBuf {
    let mut name = log.file_name().unwrap_or_default().to_owned();
    name.push(suffix);
    log.with_file_name(name)
}

/// What the next line records of `line` (its bytes without the newline): SHA-256, hex.
pub fn line_hash(line: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, line);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The lock of `log`'s chain, held until dropped.
struct Lock(#[allow(dead_code)] File);

/// Exclusive (an append, which makes the lock file when there is none) or shared (a
/// verification, which makes nothing: a copy checked with `--file` gets no file beside it).
fn lock(log: &Path, exclusive: bool) -> Result<Lock, AuditError> {
    let path = sibling(log, ".lock");
    let file = OpenOptions::new()
        .create(exclusive)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io("open the lock", &path))?;
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    let start = Instant::now();
    loop {
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(Lock(file));
        }
        let e = std::io::Error::last_os_error();
        let again = e.kind() == std::io::ErrorKind::WouldBlock
            || e.kind() == std::io::ErrorKind::Interrupted;
        if !again {
            return Err(io("lock", &path)(e));
        }
        if start.elapsed() > LOCK_WAIT {
            return Err(AuditError::Busy { path });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The end of a file as an append needs it.
struct Tail {
    /// The last line, without its newline.
    line: Vec<u8>,
    /// The seq of the newest chained line seen near the end, if any.
    last_seq: Option<u64>,
    /// Whether the file ends with a newline (a cut-off write does not).
    terminated: bool,
}

fn read_tail(path: &Path) -> Result<Option<Tail>, AuditError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("open", path)(e)),
    };
    let len = file.metadata().map_err(io("read", path))?.len();
    if len == 0 {
        return Ok(None);
    }
    let mut from = len.saturating_sub(TAIL_WINDOW);
    let mut bytes = Vec::new();
    loop {
        bytes.clear();
        file.seek(SeekFrom::Start(from)).map_err(io("read", path))?;
        file.read_to_end(&mut bytes).map_err(io("read", path))?;
        let body = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
        // A window that starts inside a line must still hold the whole last line.
        if from == 0 || body.contains(&b'\n') {
            break;
        }
        from = 0;
    }
    let terminated = bytes.ends_with(b"\n");
    let body = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    let mut lines: Vec<&[u8]> = body.split(|b| *b == b'\n').collect();
    if from > 0 {
        // The first piece is the end of a line that began before the window.
        lines.remove(0);
    }
    let line = lines.last().map(|l| l.to_vec()).unwrap_or_default();
    let last_seq = lines
        .iter()
        .rev()
        .find_map(|l| serde_json::from_slice::<AuditEntry>(l).ok()?.seq);
    Ok(Some(Tail {
        line,
        last_seq,
        terminated,
    }))
}

/// Append `entry` to the log at `log`, chained: its `seq` and `prev` are set here (what
/// the caller put there is ignored), under the lock, after a rotation if `log` is over
/// [`MAX_BYTES`]. Returns the entry as written.
pub fn append(log: &Path, entry: &AuditEntry) -> Result<AuditEntry, AuditError> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    let _lock = lock(log, true)?;
    let old = rotated(log);
    match std::fs::metadata(log) {
        Ok(m) if m.len() > MAX_BYTES => std::fs::rename(log, &old).map_err(io("rotate", log))?,
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("read", log)(e)),
    }
    // The line to chain to: the last of audit.log, or, right after a rotation (or on a
    // log that was never written), the last of audit.log.1.
    let (tail, own) = match read_tail(log)? {
        Some(t) => (Some(t), true),
        None => (read_tail(&old)?, false),
    };
    let mut e = entry.clone();
    let mut bytes = Vec::new();
    match tail {
        None => {
            e.seq = Some(1);
            e.prev = Some(GENESIS.to_owned());
        }
        Some(t) => {
            e.seq = Some(t.last_seq.map_or(1, |s| s + 1));
            e.prev = Some(line_hash(&t.line));
            if own && !t.terminated {
                // A write that was cut off: end its line, so this one stands alone (the
                // cut line stays, and verification reports it).
                bytes.push(b'\n');
            }
        }
    }
    bytes.extend(serde_json::to_vec(&e).expect("an audit entry always serialises"));
    bytes.push(b'\n');
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io("open", log))?;
    f.write_all(&bytes).map_err(io("write", log))?;
    f.sync_data().map_err(io("sync", log))?;
    Ok(e)
}

/// Append to the configuration's audit log; a failure is logged with the entry itself
/// (so it still reaches syslog), never fatal: what was audited has happened.
pub fn record(cfg: &Config, entry: &AuditEntry) {
    record_at(&path(cfg), entry)
}

fn record_at(log: &Path, entry: &AuditEntry) {
    if let Err(e) = append(log, entry) {
        crate::log::error(&format!(
            "cannot append to the audit log: {e}; the entry: {}",
            serde_json::to_string(entry).unwrap_or_default()
        ));
    }
}

fn entry(action: &str, source: Source, reason: &str, who: &str, result: &str) -> AuditEntry {
    AuditEntry {
        time: crate::clock::unix_now(),
        action: action.to_owned(),
        source,
        reason: reason.to_owned(),
        who: who.to_owned(),
        result: result.to_owned(),
        seq: None,
        prev: None,
    }
}

/// One line of at most [`MAX_TEXT`] characters (an error can span lines).
fn summary(text: &str) -> String {
    let one: String = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    match one.char_indices().nth(MAX_TEXT) {
        Some((at, _)) => format!("{}…", &one[..at]),
        None => one,
    }
}

/// `cage run` applied the configuration at `config_path` (`error` None) or refused it,
/// at `when` (`start`, `SIGHUP`). `cfg` is the configuration in force, whose audit log
/// is written; at a refused start there is none, and the log is where the file's
/// `state_dir` says (or the default's), read from its text as far as it goes.
pub fn config_event(cfg: Option<&Config>, config_path: &Path, when: &str, error: Option<&str>) {
    let log = match cfg {
        Some(cfg) => path(cfg),
        None => state_dir_of(config_path).join("audit.log"),
    };
    let reason = format!("{when}: {}", config_path.display());
    let e = match error {
        None => entry("config-applied", Source::Daemon, &reason, "cage", "ok"),
        Some(err) => entry(
            "config-refused",
            Source::Daemon,
            &reason,
            "cage",
            &summary(err),
        ),
    };
    record_at(&log, &e);
}

/// The state directory a configuration file names, even when the file is not valid as
/// a whole: its `cage` section's `state_dir` when that is an absolute path, else the
/// default.
fn state_dir_of(config_path: &Path) -> PathBuf {
    std::fs::read_to_string(config_path)
        .ok()
        .and_then(|text| crate::config::uci::parse(&text).ok())
        .and_then(|raw| {
            let section = raw.sections.into_iter().find(|s| s.kind == "cage")?;
            let option = section
                .options
                .into_iter()
                .find(|o| o.name == "state_dir")?;
            let dir = PathBuf::from(option.value);
            dir.is_absolute().then_some(dir)
        })
        .unwrap_or_else(|| PathBuf::from(crate::config::validate::DEFAULT_STATE_DIR))
}

/// A login to the web page from `who` (`web:<client address>`), or a failed one.
pub fn login_event(cfg: &Config, who: &str, ok: bool) {
    let e = if ok {
        entry("login", Source::Web, "password", who, "ok")
    } else {
        entry(
            "login-failed",
            Source::Web,
            "password",
            who,
            "wrong password",
        )
    };
    record(cfg, &e);
}

/// Every entry of `audit.log.1` and `audit.log` that can be read, oldest first;
/// unreadable lines are skipped (verification reports them).
pub fn read_all(log: &Path) -> Vec<AuditEntry> {
    [rotated(log), log.to_owned()]
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .flat_map(|bytes| {
            bytes
                .split(|b| *b == b'\n')
                .filter_map(|l| serde_json::from_slice(l).ok())
                .collect::<Vec<AuditEntry>>()
        })
        .collect()
}

/// An entry as `cage audit` lists it: seq, time, action, source, who, reason, and the
/// result when it is not `ok`.
pub fn table_line(e: &AuditEntry) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_secs(e.time);
    format!(
        "{:>6} {} {:<14} {:<7} {:<24} {}{}",
        e.seq.map_or_else(|| "-".to_owned(), |s| s.to_string()),
        crate::clock::rfc3339(time),
        e.action,
        e.source,
        e.who,
        e.reason,
        if e.result == "ok" {
            String::new()
        } else {
            format!(" [{}]", e.result)
        }
    )
}

/// The last `n` audit entries, oldest first (from `audit.log.1` too when `audit.log`
/// has fewer).
pub fn tail(cfg: &Config, n: usize) -> Vec<AuditEntry> {
    tail_matching(cfg, n, |_| true)
}

/// The last `n` audit entries that `keep` keeps, oldest first.
pub fn tail_matching(
    cfg: &Config,
    n: usize,
    keep: impl Fn(&AuditEntry) -> bool,
) -> Vec<AuditEntry> {
    let log = path(cfg);
    let own: Vec<AuditEntry> = std::fs::read(&log)
        .unwrap_or_default()
        .split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice(l).ok())
        .filter(&keep)
        .collect();
    let entries = if own.len() >= n {
        own
    } else {
        read_all(&log).into_iter().filter(&keep).collect()
    };
    let skip = entries.len().saturating_sub(n);
    entries.into_iter().skip(skip).collect()
}

/// The newest line: its seq and its SHA-256, which the next line will carry as `prev`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Head {
    pub seq: u64,
    pub sha256: String,
}

/// The first place where the chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Break {
    pub file: PathBuf,
    /// 1-based, in `file`.
    pub line: usize,
    /// The seq that line carries, if it can be read.
    pub seq: Option<u64>,
    /// `changed`, `removed`, `reordered`, `inserted`, `unchained`, `unparseable`,
    /// `truncated`, `not-as-expected`.
    pub kind: &'static str,
    pub what: String,
}

/// What `cage audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The files read, oldest first.
    pub files: Vec<PathBuf>,
    /// Lines in them.
    pub lines: usize,
    /// Chained lines whose place in the chain holds (up to the first break).
    pub verified: usize,
    /// Lines without a chain at the start of the history (an earlier Cage wrote them).
    pub before_chain: usize,
    /// The seq of the first chained line.
    pub first_seq: Option<u64>,
    /// Whether the chain starts at the genesis, or after lines rotated away (or after
    /// unchained lines).
    pub from_genesis: bool,
    pub head: Option<Head>,
    pub broken: Option<Break>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.broken.is_none()
    }

    /// The report as `cage audit verify` prints it.
    pub fn render_text(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let files: Vec<String> = self.files.iter().map(|f| f.display().to_string()).collect();
        let _ = writeln!(o, "audit log: {} ({} lines)", files.join(" + "), self.lines);
        if self.before_chain > 0 {
            let covered = if self.first_seq.is_some() {
                "only the last of them is covered, by the first chained line"
            } else {
                "no chained line yet: none of them is covered until Cage writes the next"
            };
            let _ = writeln!(
                o,
                "{} lines before the chain began (written by a Cage without it; {covered})",
                self.before_chain
            );
        }
        match (self.first_seq, self.from_genesis) {
            (Some(_), true) => {
                let _ = writeln!(o, "the chain starts at its genesis (seq 1)");
            }
            (Some(s), false) if self.before_chain == 0 => {
                let _ = writeln!(
                    o,
                    "the kept history starts at seq {s}: the lines before it were rotated away"
                );
            }
            _ => {}
        }
        match &self.broken {
            None => {
                let _ = writeln!(o, "OK: {} chained lines verified", self.verified);
            }
            Some(b) => {
                let _ = writeln!(
                    o,
                    "BROKEN at {} line {}{}: {}: {}",
                    b.file.display(),
                    b.line,
                    b.seq.map(|s| format!(" (seq {s})")).unwrap_or_default(),
                    b.kind,
                    b.what
                );
                let _ = writeln!(o, "{} chained lines verified before it", self.verified);
            }
        }
        if let Some(h) = &self.head {
            let _ = writeln!(
                o,
                "head: seq {} sha256 {} (compare with the copy your syslog collector has: \
                 the next line's prev)",
                h.seq, h.sha256
            );
        }
        o
    }
}

/// A line of the log, where it is.
struct Line<'a> {
    file: usize,
    number: usize,
    bytes: &'a [u8],
    /// No newline after it: a cut-off write.
    cut: bool,
}

/// `SEQ:PREV`, as `--expect` takes it: the chain must have a line `SEQ` whose `prev` is
/// `PREV` (a collector's copy of the head).
pub fn parse_expect(s: &str) -> Result<(u64, String), AuditError> {
    let bad = || AuditError::Expect(s.to_owned());
    let (seq, prev) = s.split_once(':').ok_or_else(bad)?;
    let seq: u64 = seq.trim().parse().map_err(|_| bad())?;
    let prev = prev.trim().to_ascii_lowercase();
    if prev.len() != 64 || !prev.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    Ok((seq, prev))
}

/// Verify the chain over `audit.log.1` (when there) and `log`, holding the lock shared
/// when there is one (a copy elsewhere has none). A missing
/// `log` is an error; a missing `log` whose rotated file is there is a break (Cage
/// writes `log` right after rotating, so its newest lines were removed).
pub fn verify_file(log: &Path, expect: Option<&(u64, String)>) -> Result<Report, AuditError> {
    let _lock = lock(log, false).ok();
    let old = rotated(log);
    let read = |p: &Path| -> Result<Option<Vec<u8>>, AuditError> {
        match std::fs::read(p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read", p)(e)),
        }
    };
    let older = read(&old)?;
    let Some(newer) = read(log)? else {
        let Some(older) = older else {
            return Err(AuditError::Missing {
                path: log.to_owned(),
                rotated_exists: false,
            });
        };
        let mut report = verify(&[(old.clone(), older)], expect);
        if report.broken.is_none() {
            report.broken = Some(Break {
                file: log.to_owned(),
                line: 1,
                seq: report.head.as_ref().map(|h| h.seq + 1),
                kind: "truncated",
                what: format!(
                    "{} is missing while {} is there: Cage writes it right after rotating, so \
                     the newest lines were removed",
                    log.display(),
                    old.display()
                ),
            });
        }
        return Ok(report);
    };
    let mut files = Vec::new();
    if let Some(older) = older {
        files.push((old, older));
    }
    files.push((log.to_owned(), newer));
    Ok(verify(&files, expect))
}

/// Verify the chain over `files` (oldest first, each with its contents).
pub fn verify(files: &[(PathBuf, Vec<u8>)], expect: Option<&(u64, String)>) -> Report {
    let mut lines = Vec::new();
    for (index, (_, bytes)) in files.iter().enumerate() {
        let body = bytes.strip_suffix(b"\n");
        let cut_last = body.is_none() && !bytes.is_empty();
        let body = body.unwrap_or(bytes);
        if body.is_empty() && !cut_last {
            continue;
        }
        let pieces: Vec<&[u8]> = body.split(|b| *b == b'\n').collect();
        let n = pieces.len();
        for (i, piece) in pieces.into_iter().enumerate() {
            lines.push(Line {
                file: index,
                number: i + 1,
                bytes: piece,
                cut: cut_last && i + 1 == n,
            });
        }
    }
    let parsed: Vec<Option<AuditEntry>> = lines
        .iter()
        .map(|l| serde_json::from_slice(l.bytes).ok())
        .collect();
    let mut report = Report {
        files: files.iter().map(|(p, _)| p.clone()).collect(),
        lines: lines.len(),
        verified: 0,
        before_chain: 0,
        first_seq: None,
        from_genesis: false,
        head: None,
        broken: None,
    };
    if let (Some(last), Some(Some(e))) = (lines.last(), parsed.last()) {
        if let Some(seq) = e.seq {
            report.head = Some(Head {
                seq,
                sha256: line_hash(last.bytes),
            });
        }
    }
    let at = |i: usize, kind: &'static str, what: String| Break {
        file: files[lines[i].file].0.clone(),
        line: lines[i].number,
        seq: parsed[i].as_ref().and_then(|e| e.seq),
        kind,
        what,
    };
    // Where each seq is, to tell lines moved from lines removed.
    let place = |seq: u64| -> Option<usize> {
        parsed
            .iter()
            .position(|e| e.as_ref().and_then(|e| e.seq) == Some(seq))
    };
    let mut last_seq: Option<u64> = None;
    for i in 0..lines.len() {
        let line = &lines[i];
        if line.cut {
            report.broken = Some(at(
                i,
                "truncated",
                "the last line has no newline: a write was cut off, or the file was \
                 truncated inside a line"
                    .into(),
            ));
            break;
        }
        let Some(e) = &parsed[i] else {
            let what = match serde_json::from_slice::<serde_json::Value>(line.bytes) {
                Ok(_) => "JSON, but not an audit entry".to_owned(),
                Err(err) => format!("not JSON ({err})"),
            };
            report.broken = Some(at(i, "unparseable", what));
            break;
        };
        let (seq, prev) = match (e.seq, &e.prev) {
            (None, None) if last_seq.is_none() => {
                report.before_chain += 1;
                continue;
            }
            (None, None) => {
                report.broken = Some(at(
                    i,
                    "unchained",
                    "no seq and prev after the chain began: inserted, or its chain \
                     fields removed"
                        .into(),
                ));
                break;
            }
            (Some(seq), Some(prev)) => (seq, prev.as_str()),
            _ => {
                report.broken = Some(at(
                    i,
                    "unparseable",
                    "it has only one of seq and prev".into(),
                ));
                break;
            }
        };
        if prev.len() != 64 || !prev.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            report.broken = Some(at(
                i,
                "unparseable",
                format!("prev {prev:?} is not 64 lowercase hex digits"),
            ));
            break;
        }
        let Some(last) = last_seq else {
            // The first chained line.
            report.first_seq = Some(seq);
            if i == 0 {
                if prev == GENESIS && seq != 1 {
                    report.broken = Some(at(
                        i,
                        "unparseable",
                        format!("the genesis line has seq {seq}, not 1"),
                    ));
                    break;
                }
                // Anything else before it was rotated away: its prev cannot be checked.
                report.from_genesis = prev == GENESIS;
            } else if seq != 1 || prev != line_hash(lines[i - 1].bytes) {
                report.broken = Some(at(
                    i - 1,
                    "changed",
                    format!(
                        "the first chained line after it (seq {seq}) should have seq 1 and \
                         the SHA-256 of this line as prev: this line or the chain's start \
                         was changed"
                    ),
                ));
                break;
            }
            last_seq = Some(seq);
            report.verified += 1;
            continue;
        };
        if seq > last + 1 {
            let what = match place(last + 1) {
                Some(j) => format!(
                    "seq jumps from {last} to {seq}: lines out of order (seq {} is at {} line {})",
                    last + 1,
                    files[lines[j].file].0.display(),
                    lines[j].number
                ),
                None => format!(
                    "seq jumps from {last} to {seq}: {} line(s) removed before this one",
                    seq - last - 1
                ),
            };
            let kind = if place(last + 1).is_some() {
                "reordered"
            } else {
                "removed"
            };
            report.broken = Some(at(i, kind, what));
            break;
        }
        if seq <= last {
            report.broken = Some(at(
                i,
                "inserted",
                format!(
                    "seq {seq} after seq {last}: a line inserted before this one, or lines \
                     repeated or out of order"
                ),
            ));
            break;
        }
        if prev != line_hash(lines[i - 1].bytes) {
            // Line i-1 is not what line i recorded. If line i is not what line i+1
            // recorded either, line i itself was changed (its prev, at least).
            let next_also = (i + 1 < lines.len())
                && parsed[i + 1]
                    .as_ref()
                    .and_then(|n| n.prev.as_deref())
                    .is_some_and(|p| p != line_hash(line.bytes));
            report.broken = Some(if next_also {
                at(
                    i,
                    "changed",
                    "changed after it was written: its prev is not the SHA-256 of the line \
                     before, and its own SHA-256 is not what the line after recorded"
                        .into(),
                )
            } else {
                // Line i-1 was counted as verified; it is the broken one.
                report.verified -= 1;
                at(
                    i - 1,
                    "changed",
                    format!(
                        "changed after it was written: its SHA-256 is not the prev that the \
                         next line (seq {seq}) recorded"
                    ),
                )
            });
            break;
        }
        last_seq = Some(seq);
        report.verified += 1;
    }
    if let (None, Some((seq, prev))) = (&report.broken, expect) {
        report.broken = expected(&report, &lines, &parsed, files, *seq, prev);
    }
    report
}

/// The `--expect SEQ:PREV` check on a chain that holds.
fn expected(
    report: &Report,
    lines: &[Line],
    parsed: &[Option<AuditEntry>],
    files: &[(PathBuf, Vec<u8>)],
    seq: u64,
    prev: &str,
) -> Option<Break> {
    let found = parsed
        .iter()
        .position(|e| e.as_ref().and_then(|e| e.seq) == Some(seq));
    let last = lines.last();
    let file_of = |l: &Line| files[l.file].0.clone();
    match found {
        Some(i) if parsed[i].as_ref().and_then(|e| e.prev.as_deref()) == Some(prev) => None,
        Some(i) => Some(Break {
            file: file_of(&lines[i]),
            line: lines[i].number,
            seq: Some(seq),
            kind: "not-as-expected",
            what: format!(
                "its prev is not the expected {prev}: the history up to it was rewritten"
            ),
        }),
        None => {
            let head = report.head.as_ref().map_or(0, |h| h.seq);
            let first = report.first_seq.unwrap_or(0);
            if seq > head {
                Some(Break {
                    file: last.map(file_of).unwrap_or_default(),
                    line: last.map_or(0, |l| l.number + 1),
                    seq: Some(seq),
                    kind: "truncated",
                    what: format!(
                        "seq {seq} was expected, but the log ends at seq {head}: the newest \
                         lines were removed"
                    ),
                })
            } else if seq < first {
                Some(Break {
                    file: files.first().map(|f| f.0.clone()).unwrap_or_default(),
                    line: 1,
                    seq: Some(seq),
                    kind: "not-as-expected",
                    what: format!(
                        "seq {seq} is older than the history kept here (from seq {first}):                          it cannot be compared; take a newer line from the collector"
                    ),
                })
            } else {
                Some(Break {
                    file: last.map(file_of).unwrap_or_default(),
                    line: 0,
                    seq: Some(seq),
                    kind: "not-as-expected",
                    what: format!("seq {seq} is not in the log"),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of its own in the temporary directory, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let d = std::env::temp_dir().join(format!("cage-audit-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Scratch(d)
        }

        fn log(&self) -> PathBuf {
            self.0.join("audit.log")
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn press(n: usize) -> AuditEntry {
        AuditEntry {
            time: 1_800_000_000 + n as u64,
            action: if n.is_multiple_of(2) {
                "isolate"
            } else {
                "release"
            }
            .into(),
            source: Source::Cli,
            reason: format!("press {n}"),
            who: "local:test".into(),
            result: "ok".into(),
            seq: None,
            prev: None,
        }
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        std::fs::write(path, lines.join("\n") + "\n").unwrap();
    }

    /// A log of `n` presses (and the directory that holds it).
    fn log_of(name: &str, n: usize) -> (Scratch, PathBuf) {
        let s = Scratch::new(name);
        let log = s.log();
        for i in 0..n {
            append(&log, &press(i)).unwrap();
        }
        (s, log)
    }

    fn broken(log: &Path) -> Break {
        let r = verify_file(log, None).unwrap();
        assert!(!r.ok(), "a broken chain verified: {r:?}");
        r.broken.unwrap()
    }

    #[test]
    fn each_line_carries_the_hash_of_the_one_before() {
        let (_s, log) = log_of("chain", 3);
        let l = lines(&log);
        let e: Vec<AuditEntry> = l.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(e[0].seq, Some(1));
        assert_eq!(e[0].prev.as_deref(), Some(GENESIS));
        assert_eq!(e[1].seq, Some(2));
        assert_eq!(e[1].prev, Some(line_hash(l[0].as_bytes())));
        assert_eq!(e[2].prev, Some(line_hash(l[1].as_bytes())));
        // What is hashed: the line's bytes without the newline, as sha256sum sees them.
        assert_eq!(
            line_hash(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // What the caller gave is kept, whatever it said of seq and prev.
        assert_eq!(e[2].reason, "press 2");
        let r = verify_file(&log, None).unwrap();
        assert!(r.ok(), "{r:?}");
        assert_eq!((r.lines, r.verified, r.first_seq), (3, 3, Some(1)));
        assert!(r.from_genesis);
        assert_eq!(
            r.head,
            Some(Head {
                seq: 3,
                sha256: line_hash(l[2].as_bytes())
            })
        );
        assert!(r.render_text().contains("OK: 3 chained lines verified"));
    }

    #[test]
    fn the_chain_goes_on_across_rotation() {
        let s = Scratch::new("rotate");
        let log = s.log();
        let mut big = press(0);
        big.reason = "x".repeat(MAX_BYTES as usize + 1);
        append(&log, &big).unwrap();
        append(&log, &press(1)).unwrap();
        let old = rotated(&log);
        assert_eq!(lines(&old).len(), 1, "the big line went to audit.log.1");
        let first: AuditEntry = serde_json::from_str(&lines(&log)[0]).unwrap();
        assert_eq!(first.seq, Some(2));
        assert_eq!(first.prev, Some(line_hash(lines(&old)[0].as_bytes())));
        let r = verify_file(&log, None).unwrap();
        assert!(r.ok() && r.from_genesis && r.verified == 2, "{r:?}");
        assert_eq!(r.files, vec![old.clone(), log.clone()]);

        // A second rotation drops the genesis: the kept history starts later, still whole.
        append(&log, &big).unwrap();
        append(&log, &press(3)).unwrap();
        let r = verify_file(&log, None).unwrap();
        assert!(r.ok(), "{r:?}");
        assert_eq!(
            (r.first_seq, r.from_genesis, r.verified),
            (Some(2), false, 3)
        );
        assert_eq!(r.head.as_ref().map(|h| h.seq), Some(4));
        assert!(r.render_text().contains("starts at seq 2"));
        // What the page and `cage status` read goes across the rotation.
        let all = read_all(&log);
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].reason, "press 3");
    }

    #[test]
    fn an_edited_line_is_named() {
        let (_s, log) = log_of("edit", 5);
        let mut l = lines(&log);
        l[2] = l[2].replace("press 2", "press 9");
        write_lines(&log, &l);
        let b = broken(&log);
        assert_eq!((b.line, b.seq, b.kind), (3, Some(3), "changed"), "{b:?}");
        assert_eq!(b.file, log);
        let r = verify_file(&log, None).unwrap();
        assert_eq!(
            r.verified, 2,
            "lines 1 and 2 hold; line 4 does not chain to 3"
        );
        assert!(r.render_text().contains("line 3 (seq 3): changed"));
    }

    #[test]
    fn any_byte_changed_in_any_line_but_the_newest_is_named_there() {
        let (_s, log) = log_of("every-byte", 5);
        let text = std::fs::read(&log).unwrap();
        let starts: Vec<usize> = std::iter::once(0)
            .chain(
                text.iter()
                    .enumerate()
                    .filter(|b| *b.1 == b'\n')
                    .map(|b| b.0 + 1),
            )
            .collect();
        let mut tried = 0;
        for line in 0..4 {
            for at in starts[line]..starts[line + 1] - 1 {
                let mut edited = text.clone();
                edited[at] = if edited[at] == b'Z' { b'Y' } else { b'Z' };
                let r = verify(&[(log.clone(), edited)], None);
                let b = r
                    .broken
                    .unwrap_or_else(|| panic!("byte {at} of line {}", line + 1));
                assert_eq!(b.line, line + 1, "byte {at}: {b:?}");
                tried += 1;
            }
        }
        assert!(tried > 500, "{tried}");
        // The newest line: no line after it records its hash. Only an edit that breaks
        // the line itself shows; the head (what a collector compares) changes.
        let mut edited = text.clone();
        let reason = starts[4]
            + text[starts[4]..]
                .windows(7)
                .position(|w| w == b"press 4")
                .unwrap();
        edited[reason + 6] = b'9';
        let r = verify(&[(log.clone(), edited)], None);
        assert!(r.ok(), "{r:?}");
        assert_ne!(r.head, verify(&[(log.clone(), text)], None).head);
    }

    #[test]
    fn an_edited_prev_names_its_own_line() {
        let (_s, log) = log_of("edit-prev", 5);
        let mut l = lines(&log);
        let e: AuditEntry = serde_json::from_str(&l[2]).unwrap();
        let fake = "1".repeat(64);
        l[2] = l[2].replace(e.prev.as_deref().unwrap(), &fake);
        write_lines(&log, &l);
        let b = broken(&log);
        assert_eq!((b.line, b.kind), (3, "changed"), "{b:?}");
    }

    #[test]
    fn a_deleted_line_is_named() {
        let (_s, log) = log_of("delete", 5);
        let mut l = lines(&log);
        l.remove(2);
        write_lines(&log, &l);
        let b = broken(&log);
        // The line after the gap, now line 3 of the file, seq 4.
        assert_eq!((b.line, b.seq, b.kind), (3, Some(4), "removed"), "{b:?}");
        assert!(b.what.contains("1 line(s) removed"), "{b:?}");
    }

    #[test]
    fn an_inserted_line_is_named() {
        // A copy of an earlier line, or an old-style line without the chain.
        let (_s, log) = log_of("insert", 4);
        let mut l = lines(&log);
        l.insert(2, l[0].clone());
        write_lines(&log, &l);
        let b = broken(&log);
        assert_eq!((b.line, b.kind), (3, "inserted"), "{b:?}");

        let (_s, log) = log_of("insert-old", 4);
        let mut l = lines(&log);
        l.insert(2, serde_json::to_string(&press(7)).unwrap());
        write_lines(&log, &l);
        let b = broken(&log);
        assert_eq!((b.line, b.kind), (3, "unchained"), "{b:?}");

        // A forged line with the right seq and prev: it chains, and the real line after
        // it is where the chain breaks.
        let (_s, log) = log_of("insert-forged", 4);
        let mut l = lines(&log);
        let mut forged = press(8);
        forged.seq = Some(3);
        forged.prev = Some(line_hash(l[1].as_bytes()));
        l.insert(2, serde_json::to_string(&forged).unwrap());
        write_lines(&log, &l);
        let b = broken(&log);
        assert_eq!((b.line, b.seq, b.kind), (4, Some(3), "inserted"), "{b:?}");
    }

    #[test]
    fn reordered_lines_are_named() {
        let (_s, log) = log_of("reorder", 5);
        let mut l = lines(&log);
        l.swap(1, 2);
        write_lines(&log, &l);
        let b = broken(&log);
        assert_eq!((b.line, b.seq, b.kind), (2, Some(3), "reordered"), "{b:?}");
        assert!(b.what.contains("seq 2 is at"), "{b:?}");
    }

    #[test]
    fn what_truncation_of_the_newest_lines_shows() {
        // Whole lines removed from the end: the chain that is left holds. Only the head
        // kept elsewhere (the collector) shows it.
        let (_s, log) = log_of("truncate", 5);
        let l = lines(&log);
        let fourth: AuditEntry = serde_json::from_str(&l[3]).unwrap();
        let expect = (4, fourth.prev.clone().unwrap());
        write_lines(&log, &l[..3]);
        let r = verify_file(&log, None).unwrap();
        assert!(
            r.ok(),
            "a chain alone cannot see its newest lines removed: {r:?}"
        );
        assert_eq!(r.head.as_ref().map(|h| h.seq), Some(3));
        let r = verify_file(&log, Some(&expect)).unwrap();
        let b = r.broken.expect("the collector's head shows the removal");
        assert_eq!(b.kind, "truncated", "{b:?}");
        // The head the collector has, on the intact log, passes; a rewritten one fails.
        let (_s, log) = log_of("truncate-ok", 5);
        assert!(verify_file(&log, Some(&expect)).unwrap().ok());
        let wrong = (4, "2".repeat(64));
        let r = verify_file(&log, Some(&wrong)).unwrap();
        assert_eq!(r.broken.map(|b| b.kind), Some("not-as-expected"));

        // Cut inside the last line: no newline at the end.
        let (_s, log) = log_of("cut", 3);
        let text = std::fs::read_to_string(&log).unwrap();
        std::fs::write(&log, &text[..text.len() - 20]).unwrap();
        let b = broken(&log);
        assert_eq!((b.line, b.kind), (3, "truncated"), "{b:?}");
        // The next append ends the cut line and goes on; the cut line stays reported.
        append(&log, &press(3)).unwrap();
        let b = broken(&log);
        assert_eq!((b.line, b.kind), (3, "unparseable"), "{b:?}");
        assert_eq!(lines(&log).len(), 4);

        // audit.log gone while audit.log.1 is there: Cage writes audit.log right after it
        // rotates, so that is its newest lines removed.
        let s = Scratch::new("gone");
        let log = s.log();
        let mut big = press(0);
        big.reason = "x".repeat(MAX_BYTES as usize + 1);
        append(&log, &big).unwrap();
        append(&log, &press(1)).unwrap();
        std::fs::remove_file(&log).unwrap();
        let b = broken(&log);
        assert_eq!(b.kind, "truncated", "{b:?}");
    }

    #[test]
    fn unparseable_lines_are_named() {
        let (_s, log) = log_of("garbage", 3);
        let mut l = lines(&log);
        l[1] = "{\"time\": 1".into();
        write_lines(&log, &l);
        let b = broken(&log);
        assert_eq!((b.line, b.kind), (2, "unparseable"), "{b:?}");
        assert!(b.what.starts_with("not JSON"), "{b:?}");
    }

    #[test]
    fn old_unchained_lines_start_the_history() {
        let s = Scratch::new("old");
        let log = s.log();
        let old: Vec<String> = (0..3)
            .map(|i| serde_json::to_string(&press(i)).unwrap())
            .collect();
        assert!(
            !old[0].contains("seq"),
            "an entry without chain writes no chain fields"
        );
        write_lines(&log, &old);
        // An old line reads as an entry without seq and prev.
        let e: AuditEntry = serde_json::from_str(
            r#"{"time":1,"action":"isolate","source":"cli","reason":"","who":"local:root","result":"ok"}"#,
        )
        .unwrap();
        assert_eq!((e.seq, e.prev), (None, None));
        append(&log, &press(3)).unwrap();
        append(&log, &press(4)).unwrap();
        let first: AuditEntry = serde_json::from_str(&lines(&log)[3]).unwrap();
        assert_eq!(first.seq, Some(1));
        assert_eq!(first.prev, Some(line_hash(old[2].as_bytes())));
        let r = verify_file(&log, None).unwrap();
        assert!(r.ok(), "{r:?}");
        assert_eq!((r.before_chain, r.verified), (3, 2));
        assert!(r.render_text().contains("3 lines before the chain began"));
        // The last old line is covered by the first chained one; those before it are not.
        let mut l = lines(&log);
        l[2] = l[2].replace("press 2", "press 7");
        write_lines(&log, &l);
        assert_eq!(broken(&log).line, 3);
        let mut l = lines(&log);
        l[2] = l[2].replace("press 7", "press 2");
        l[0] = l[0].replace("press 0", "press 7");
        write_lines(&log, &l);
        assert!(verify_file(&log, None).unwrap().ok());
    }

    #[test]
    fn appends_from_many_writers_never_fork_the_chain() {
        let s = Scratch::new("concurrent");
        let log = s.log();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..20 {
                        append(&log, &press(t * 100 + i)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let r = verify_file(&log, None).unwrap();
        assert!(r.ok(), "{r:?}");
        assert_eq!((r.lines, r.verified), (160, 160));
        assert_eq!(r.head.map(|h| h.seq), Some(160));
    }

    #[test]
    fn verifying_a_copy_creates_nothing_beside_it() {
        let (s, log) = log_of("copy", 2);
        let copy = s.0.join("copy.log");
        std::fs::copy(&log, &copy).unwrap();
        assert!(verify_file(&copy, None).unwrap().ok());
        assert!(!sibling(&copy, ".lock").exists());
        assert!(
            sibling(&log, ".lock").exists(),
            "appends make the lock file"
        );
    }

    #[test]
    fn a_missing_log_is_a_clear_error() {
        let s = Scratch::new("missing");
        let log = s.log();
        let e = verify_file(&log, None).unwrap_err();
        assert_eq!(e.to_string(), format!("no audit log at {}", log.display()));
        for bad in ["4", "x:00", "4:abc", &format!("4:{}", "g".repeat(64))] {
            assert!(parse_expect(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_expect(&format!("4:{}", "A".repeat(64))).unwrap(),
            (4, "a".repeat(64))
        );
    }

    #[test]
    fn config_events_go_where_the_file_says_even_when_it_is_broken() {
        let s = Scratch::new("config");
        let d = &s.0;
        let conf = d.join("cage.conf");
        std::fs::write(
            &conf,
            format!(
                "config cage 'main'\n\toption state_dir '{}/state'\n\toption log_level 'loud'\n",
                d.display()
            ),
        )
        .unwrap();
        assert!(crate::config::load(&conf).is_err());
        config_event(None, &conf, "start", Some("line 3: bad\nand more"));
        let e = read_all(&d.join("state/audit.log"));
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].action.as_str(), e[0].source, e[0].result.as_str()),
            ("config-refused", Source::Daemon, "line 3: bad; and more")
        );
        assert!(e[0].reason.starts_with("start: "), "{:?}", e[0]);
        assert_eq!(state_dir_of(&d.join("absent")), PathBuf::from("/etc/cage"));
        let long = summary(&"e".repeat(5000));
        assert_eq!(long.chars().count(), MAX_TEXT + 1);
    }
}
