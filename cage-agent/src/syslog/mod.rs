//! Cage's events to the owner's syslog collector (`export.syslog`) as RFC 5424 messages
//! (`format.rs`) over UDP, TCP or TLS (`transport.rs`).
//!
//! The daemon never waits for the collector: [`configure`] installs a sink for
//! `crate::events` that formats each event and puts it in a bounded queue
//! (`syslog_queue`; when full the oldest message is dropped, so the newest are kept),
//! and a thread of the exporter's own sends from it, reconnecting with a backoff of 1 s
//! doubling to 60 s. Sent, dropped and failed messages are counted
//! (`<log_dir>/syslog.json`, shown by `cage status`) and losses are logged at most once
//! a minute.
//!
//! The same thread follows the audit log (`<state_dir>/audit.log`, rotated to
//! `audit.log.1`) and sends every new line with all its JSON fields as SD params, so a
//! press from another process (`cage isolate`, the button's hook) reaches the collector
//! as well as the daemon's own. Blocked attempts are rate-bounded here: per caged host and
//! rule, one message at once and then at most one a minute carrying the count.

pub mod format;
pub mod transport;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

// portable-atomic: 32-bit MIPS (the GL-MT300N) has no native 64-bit atomics.
use portable_atomic::AtomicU64;

use serde::{Deserialize, Serialize};

use crate::config::{Config, SyslogExport, SyslogTransport};
use crate::events::{self, Event, Kind, Severity};
use crate::log;
use cage_common::records::FlowRecord;
use format::Origin;
use transport::{Conn, Target};

/// Blocked attempts of one host and rule: one message a window, with the count.
pub const BLOCKED_WINDOW: Duration = Duration::from_secs(60);
/// Host and rule pairs tracked at once; attempts beyond are counted under host `*`.
pub const BLOCKED_KEYS: usize = 256;
/// Losses and connection problems are logged at most this often.
pub const LOG_EVERY: Duration = Duration::from_secs(60);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// The exporter thread's housekeeping (audit log, rate windows, the stats file).
const TICK: Duration = Duration::from_secs(1);

/// What `cage status` shows of the exporter (`<log_dir>/syslog.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// `udp://…`, `tcp://…` or `tls://…`.
    pub collector: String,
    pub connected: bool,
    /// Messages handed to the transport.
    pub sent: u64,
    /// Messages dropped from the full queue (the oldest first).
    pub dropped: u64,
    /// Failed connection attempts and sends.
    pub errors: u64,
    /// Messages waiting.
    pub queued: u64,
    /// Blocked attempts folded into another message's `count`.
    pub blocked_folded: u64,
    pub last_error: Option<String>,
}

pub fn stats_path(cfg: &Config) -> PathBuf {
    cfg.main.log_dir.join("syslog.json")
}

/// The exporter's counters as `cage run` last wrote them, when syslog is configured.
pub fn read_stats(cfg: &Config) -> Option<Stats> {
    cfg.export.syslog.as_ref()?;
    serde_json::from_slice(&std::fs::read(stats_path(cfg)).ok()?).ok()
}

fn url(c: &SyslogExport) -> String {
    let scheme = match c.transport {
        SyslogTransport::Udp => "udp",
        SyslogTransport::Tcp => "tcp",
        SyslogTransport::Tls => "tls",
    };
    format!("{scheme}://{}", c.server)
}

/// The queue and counters, shared by the sink (the daemon's threads) and the sender.
struct Shared {
    queue: Mutex<VecDeque<(u64, Vec<u8>)>>,
    wake: Condvar,
    capacity: AtomicU64,
    next_id: AtomicU64,
    seq: AtomicU32,
    origin: Origin,
    flows: AtomicBool,
    limiter: Mutex<Limiter>,
    sent: AtomicU64,
    dropped: AtomicU64,
    errors: AtomicU64,
    folded: AtomicU64,
}

impl Shared {
    fn new(origin: Origin) -> Shared {
        Shared {
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            capacity: AtomicU64::new(1024),
            next_id: AtomicU64::new(1),
            seq: AtomicU32::new(0),
            origin,
            flows: AtomicBool::new(false),
            limiter: Mutex::new(Limiter::default()),
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            folded: AtomicU64::new(0),
        }
    }

    /// Format `e` now and queue it; the oldest message goes when the queue is full.
    fn push(&self, e: &Event) {
        // sequenceId runs from 1 to 2147483647 and then starts over at 1 (§7.3.1).
        let seq = self
            .seq
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some(if s >= 2_147_483_647 { 1 } else { s + 1 })
            })
            .map(|s| if s >= 2_147_483_647 { 1 } else { s + 1 })
            .unwrap_or(1);
        let bytes = format::message(&self.origin, e, SystemTime::now(), seq);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cap = self.capacity.load(Ordering::Relaxed).max(1) as usize;
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while q.len() >= cap {
            q.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back((id, bytes));
        drop(q);
        self.wake.notify_one();
    }

    fn queued(&self) -> u64 {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).len() as u64
    }
}

impl events::Sink for Shared {
    fn event(&self, e: Event) {
        if e.kind == Kind::Blocked {
            let admitted = self
                .limiter
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .admit(e, Instant::now());
            match admitted {
                Some(e) => self.push(&e),
                None => {
                    self.folded.fetch_add(1, Ordering::Relaxed);
                }
            }
        } else {
            self.push(&e);
        }
    }

    fn flows(&self, records: &[FlowRecord]) {
        if !self.flows.load(Ordering::Relaxed) {
            return;
        }
        for r in records {
            let mut e = Event::new(
                Kind::Flow,
                Severity::Info,
                format!(
                    "{} {} {} -> {} ({} bytes out, {} in)",
                    r.verdict, r.proto, r.host, r.peer, r.bytes_out, r.bytes_in
                ),
            );
            e.params = json_params(&serde_json::to_value(r).unwrap_or_default());
            self.push(&e);
        }
    }
}

/// Per host and rule, the blocked attempts of the current window.
#[derive(Debug, Default)]
struct Limiter {
    windows: HashMap<(String, String), Window>,
}

#[derive(Debug)]
struct Window {
    since: Instant,
    /// Attempts since the last message, and the latest of them.
    folded: u64,
    last: Event,
}

impl Limiter {
    /// The message to send for this attempt now, if any: the first of a host and rule
    /// goes at once (`count` 1); the others of its window are folded into the message
    /// [`Limiter::due`] makes when the window ends.
    fn admit(&mut self, e: Event, now: Instant) -> Option<Event> {
        let rule = e.param("rule").unwrap_or("").to_owned();
        let mut key = (e.param("host").unwrap_or("").to_owned(), rule.clone());
        if !self.windows.contains_key(&key) && self.windows.len() >= BLOCKED_KEYS {
            key = ("*".to_owned(), rule);
        }
        match self.windows.get_mut(&key) {
            Some(w) if now.duration_since(w.since) < BLOCKED_WINDOW => {
                w.folded += 1;
                w.last = e;
                None
            }
            Some(w) => {
                let count = w.folded + 1;
                w.since = now;
                w.folded = 0;
                w.last = e.clone();
                Some(e.with("count", count))
            }
            None => {
                let first = (key.0 != "*").then(|| e.clone().with("count", 1));
                self.windows.insert(
                    key,
                    Window {
                        since: now,
                        folded: u64::from(first.is_none()),
                        last: e,
                    },
                );
                first
            }
        }
    }

    /// The messages of the windows that ended: the attempts folded in them, counted, with
    /// the last one's fields. A window that ended with nothing folded is forgotten.
    fn due(&mut self, now: Instant) -> Vec<Event> {
        let mut out = Vec::new();
        self.windows.retain(|(host, _), w| {
            if now.duration_since(w.since) < BLOCKED_WINDOW {
                return true;
            }
            if w.folded == 0 {
                return false;
            }
            let mut e = w.last.clone();
            e.msg = format!(
                "{} more blocked attempts in the last {} s; the last: {}",
                w.folded,
                BLOCKED_WINDOW.as_secs(),
                e.msg
            );
            if host == "*" {
                e.params.retain(|(n, _)| n != "host" && n != "mac");
                e = e.with("host", "*");
            }
            out.push(e.with("count", w.folded));
            w.since = now;
            w.folded = 0;
            true
        });
        out
    }
}

/// An audit line's (or a flow record's) JSON fields as SD params, in the line's order
/// where serde_json keeps it: strings as they are, everything else as its JSON text.
fn json_params(v: &serde_json::Value) -> Vec<(String, String)> {
    let Some(obj) = v.as_object() else {
        return Vec::new();
    };
    obj.iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), text)
        })
        .collect()
}

/// One audit-log line as an event: `ISOLATE`/`RELEASE` (or `AUDIT`) with every field.
fn audit_event(line: &str) -> Event {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return Event::new(
            Kind::Audit,
            Severity::Error,
            format!("an audit-log line that is not JSON: {line}"),
        );
    };
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("");
    let (kind, severity) = match (field("action"), field("source")) {
        ("isolate", "auto") => (Kind::Isolate, Severity::Alert),
        ("isolate", _) => (Kind::Isolate, Severity::Warning),
        ("release", _) => (Kind::Release, Severity::Notice),
        ("config-applied", _) => (Kind::Applied, Severity::Info),
        ("config-refused", _) => (Kind::Refused, Severity::Error),
        ("login", _) => (Kind::Login, Severity::Notice),
        ("login-failed", _) => (Kind::LoginFailed, Severity::Warning),
        _ => (Kind::Audit, Severity::Notice),
    };
    let mut msg = format!(
        "{} by {} ({})",
        field("action"),
        field("source"),
        field("who")
    );
    if !field("reason").is_empty() {
        msg.push_str(": ");
        msg.push_str(field("reason"));
    }
    if !matches!(field("result"), "" | "ok") {
        msg.push_str(&format!(" [{}]", field("result")));
    }
    let mut e = Event::new(kind, severity, msg);
    e.params = json_params(&v);
    e
}

/// Where the audit log was read up to: its inode and offset
/// (`<state_dir>/syslog-audit.json`, so a restarted daemon goes on where it stopped).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct AuditMark {
    inode: u64,
    offset: u64,
}

struct AuditTail {
    log: PathBuf,
    mark_file: PathBuf,
    mark: AuditMark,
}

fn inode(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.ino(), m.len()))
}

impl AuditTail {
    /// Go on from the stored mark; without one (the first export), from the end of the
    /// audit log: its older lines were written before an exporter was configured.
    fn open(cfg: &Config) -> AuditTail {
        let log = crate::audit::path(cfg);
        // In the state directory (flash on a router): lines written while no `cage run`
        // ran (a `cage isolate` at boot) are sent once it runs, after a reboot too. One
        // small write per audit line, which are rare.
        let mark_file = cfg.main.state_dir.join("syslog-audit.json");
        let stored: Option<AuditMark> = std::fs::read(&mark_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let mark = stored.unwrap_or_else(|| {
            inode(&log)
                .map(|(inode, len)| AuditMark { inode, offset: len })
                .unwrap_or_default()
        });
        AuditTail {
            log,
            mark_file,
            mark,
        }
    }

    /// The complete lines written since the last call, oldest first.
    fn new_lines(&mut self) -> Vec<String> {
        let before = self.mark;
        let mut lines = Vec::new();
        let rotated = crate::audit::rotated(&self.log);
        match inode(&self.log) {
            Some((ino, _)) if ino == self.mark.inode => self.read(&self.log.clone(), &mut lines),
            Some((ino, _)) => {
                // Rotated (or new): the rest of the old file, if it is the one rotated
                // away, then the new one from its start.
                if inode(&rotated).is_some_and(|(r, _)| r == self.mark.inode) {
                    self.read(&rotated, &mut lines);
                }
                self.mark = AuditMark {
                    inode: ino,
                    offset: 0,
                };
                self.read(&self.log.clone(), &mut lines);
            }
            None => {}
        }
        if self.mark != before {
            let _ = std::fs::write(
                &self.mark_file,
                serde_json::to_vec(&self.mark).unwrap_or_default(),
            );
        }
        lines
    }

    fn read(&mut self, path: &Path, lines: &mut Vec<String>) {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(path) else {
            return;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.mark.offset {
            // Truncated in place: from its start again.
            self.mark.offset = 0;
        }
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(self.mark.offset)).is_err()
            || f.take(1 << 20).read_to_end(&mut buf).is_err()
        {
            return;
        }
        // Only complete lines; a line being written is read at the next tick.
        let complete = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        for line in buf[..complete].split(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(line);
            if !line.trim().is_empty() {
                lines.push(line.into_owned());
            }
        }
        self.mark.offset += complete as u64;
    }
}

/// The running exporter: its configuration and the flag that stops its thread.
struct Running {
    cfg: SyslogExport,
    ca: Option<Vec<u8>>,
    dirs: (PathBuf, PathBuf),
    stop: Arc<AtomicBool>,
}

static SHARED: Mutex<Option<Arc<Shared>>> = Mutex::new(None);
static RUNNING: Mutex<Option<Running>> = Mutex::new(None);

/// Start, change or stop the exporter to match `cfg.export.syslog`: called by `cage run`
/// after every apply, so a changed collector takes effect on SIGHUP. Unchanged settings
/// (and an unchanged CA file) leave the running exporter alone; a change moves the
/// queued messages to the new collector.
pub fn configure(cfg: &Config) {
    let mut running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
    let want = cfg.export.syslog.clone();
    let ca = want
        .as_ref()
        .and_then(|w| w.ca_file.as_ref())
        .and_then(|p| std::fs::read(p).ok());
    let dirs = (cfg.main.state_dir.clone(), cfg.main.log_dir.clone());
    if let (Some(r), Some(w)) = (running.as_ref(), want.as_ref()) {
        if r.cfg == *w && r.ca == ca && r.dirs == dirs {
            return;
        }
    }
    if let Some(old) = running.take() {
        old.stop.store(true, Ordering::Relaxed);
        if let Some(s) = SHARED.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            s.wake.notify_all();
        }
    }
    let Some(want) = want else {
        events::set_sink(None);
        if let Some(s) = SHARED.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            s.queue.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
        let _ = std::fs::remove_file(stats_path(cfg));
        return;
    };
    let shared = SHARED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(|| Arc::new(Shared::new(Origin::this_router())))
        .clone();
    shared
        .capacity
        .store(u64::from(want.queue.max(1)), Ordering::Relaxed);
    shared.flows.store(want.flows, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let target = Target::new(&want);
    let sender = Sender {
        shared: shared.clone(),
        stop: stop.clone(),
        url: url(&want),
        audit: AuditTail::open(cfg),
        stats_file: stats_path(cfg),
    };
    match std::thread::Builder::new()
        .name("cage-syslog".into())
        .spawn(move || sender.run(target))
    {
        Ok(_) => {
            log::info(&format!("syslog: sending events to {}", url(&want)));
            events::set_sink(Some(shared));
            *running = Some(Running {
                cfg: want,
                ca,
                dirs,
                stop,
            });
        }
        Err(e) => {
            events::set_sink(None);
            log::error(&format!("syslog: cannot start the exporter's thread: {e}"));
        }
    }
}

/// `cage run` stops: an event saying so, then up to `wait` for the exporter to send what
/// is queued; what is left is counted as dropped (in `<log_dir>/syslog.json`) and said.
pub fn stop(wait: Duration) {
    let Some(running) = RUNNING.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        return;
    };
    events::emit(Event::new(
        Kind::Stopped,
        Severity::Notice,
        "cage run stops; the policy stays in the kernel",
    ));
    events::set_sink(None);
    let Some(shared) = SHARED.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
        return;
    };
    let until = Instant::now() + wait;
    while shared.queued() > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    running.stop.store(true, Ordering::Relaxed);
    shared.wake.notify_all();
    let left = {
        let mut q = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        let n = q.len() as u64;
        q.clear();
        n
    };
    if left > 0 {
        shared.dropped.fetch_add(left, Ordering::Relaxed);
        log::warn(&format!(
            "syslog: {left} messages not sent to {} before stopping (counted as dropped)",
            url(&running.cfg)
        ));
    }
    // The thread may be between two ticks: the final counts are written here.
    let path = running.dirs.1.join("syslog.json");
    let mut stats: Stats = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    stats.collector = url(&running.cfg);
    stats.sent = shared.sent.load(Ordering::Relaxed);
    stats.dropped = shared.dropped.load(Ordering::Relaxed);
    stats.errors = shared.errors.load(Ordering::Relaxed);
    stats.queued = 0;
    stats.connected = false;
    let _ = write_atomically(
        &path,
        &serde_json::to_vec_pretty(&stats).unwrap_or_default(),
    );
}

/// Logs something at most once a [`LOG_EVERY`].
#[derive(Default)]
struct Throttle(Option<Instant>);

impl Throttle {
    fn ready(&mut self, now: Instant) -> bool {
        if self.0.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            return false;
        }
        self.0 = Some(now);
        true
    }
}

/// The exporter's thread.
struct Sender {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    url: String,
    audit: AuditTail,
    stats_file: PathBuf,
}

impl Sender {
    fn run(mut self, target: Result<Target, transport::TransportError>) {
        let s = self.shared.clone();
        let mut conn: Option<Conn> = None;
        let mut backoff = BACKOFF_MIN;
        let mut next_try = Instant::now();
        let mut next_tick = Instant::now();
        let mut last_error: Option<String> = None;
        let mut problem_log = Throttle::default();
        let mut loss_log = Throttle::default();
        let mut logged_losses = (0, 0);
        let mut written = Stats::default();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + TICK;
                self.housekeeping();
                let stats = Stats {
                    collector: self.url.clone(),
                    connected: conn.is_some(),
                    sent: s.sent.load(Ordering::Relaxed),
                    dropped: s.dropped.load(Ordering::Relaxed),
                    errors: s.errors.load(Ordering::Relaxed),
                    queued: s.queued(),
                    blocked_folded: s.folded.load(Ordering::Relaxed),
                    last_error: last_error.clone(),
                };
                let losses = (stats.dropped, stats.errors);
                if losses != logged_losses && loss_log.ready(now) {
                    log::warn(&format!(
                        "syslog: {} messages dropped (queue full), {} errors sending to {} \
                         (counted in cage status)",
                        stats.dropped - logged_losses.0,
                        stats.errors - logged_losses.1,
                        self.url
                    ));
                    logged_losses = losses;
                }
                if stats != written {
                    let _ = write_atomically(
                        &self.stats_file,
                        &serde_json::to_vec_pretty(&stats).unwrap_or_default(),
                    );
                    written = stats;
                }
            }
            // The oldest message, if any, without taking it: it leaves the queue once
            // sent.
            let front = {
                let q = s.queue.lock().unwrap_or_else(|p| p.into_inner());
                match q.front() {
                    Some(m) => Some(m.clone()),
                    None => {
                        let wait = next_tick.saturating_duration_since(Instant::now());
                        let _ = s.wake.wait_timeout(q, wait);
                        None
                    }
                }
            };
            let Some((id, bytes)) = front else { continue };
            if conn.as_mut().is_some_and(|c| !c.open()) {
                conn = None;
            }
            if conn.is_none() {
                let now = Instant::now();
                if now < next_try {
                    self.idle(next_try.min(next_tick));
                    continue;
                }
                let attempt = match &target {
                    Ok(t) => t.connect().map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match attempt {
                    Ok(c) => {
                        conn = Some(c);
                        backoff = BACKOFF_MIN;
                        if last_error.take().is_some() {
                            log::info(&format!("syslog: connected to {} again", self.url));
                        }
                    }
                    Err(e) => {
                        s.errors.fetch_add(1, Ordering::Relaxed);
                        if problem_log.ready(now) {
                            log::warn(&format!(
                                "syslog: cannot reach {}: {e} (trying again, every {} s at most)",
                                self.url,
                                BACKOFF_MAX.as_secs()
                            ));
                        }
                        last_error = Some(e);
                        next_try = now + backoff;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                }
            }
            let c = conn.as_mut().expect("connected above");
            match c.send(&bytes) {
                Ok(()) => {
                    s.sent.fetch_add(1, Ordering::Relaxed);
                    let mut q = s.queue.lock().unwrap_or_else(|p| p.into_inner());
                    if q.front().is_some_and(|(f, _)| *f == id) {
                        q.pop_front();
                    }
                }
                Err(e) => {
                    s.errors.fetch_add(1, Ordering::Relaxed);
                    let e = format!("sending to {}: {e}", self.url);
                    if problem_log.ready(Instant::now()) {
                        log::warn(&format!("syslog: {e}"));
                    }
                    last_error = Some(e);
                    conn = None;
                    next_try = Instant::now() + backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Wait until `until`, or until stopped.
    fn idle(&self, until: Instant) {
        let q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        let wait = until.saturating_duration_since(Instant::now());
        if !self.stop.load(Ordering::Relaxed) && !wait.is_zero() {
            // Woken by new messages too; the loop then waits again for its time.
            let _ = self.shared.wake.wait_timeout(q, wait.min(TICK));
        }
    }

    /// The audit log's new lines, and the blocked-attempt windows that ended.
    fn housekeeping(&mut self) {
        for line in self.audit.new_lines() {
            self.shared.push(&audit_event(&line));
        }
        let due = self
            .shared
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .due(Instant::now());
        for e in due {
            self.shared.push(&e);
        }
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocked(host: &str, rule: &str) -> Event {
        Event::new(Kind::Blocked, Severity::Notice, format!("{host} {rule}"))
            .with("host", host)
            .with("rule", rule)
    }

    #[test]
    fn blocked_attempts_are_one_message_a_minute_per_host_and_rule_with_the_count() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        let first = l
            .admit(blocked("10.0.0.1", "deny:lan"), t0)
            .expect("the first");
        assert_eq!(first.param("count"), Some("1"));
        // Another rule or host is a window of its own.
        assert!(l.admit(blocked("10.0.0.1", "deny:router"), t0).is_some());
        assert!(l.admit(blocked("10.0.0.2", "deny:lan"), t0).is_some());
        for i in 0..10_000 {
            let t = t0 + Duration::from_millis(i % 59_000);
            assert!(l.admit(blocked("10.0.0.1", "deny:lan"), t).is_none());
        }
        assert!(
            l.due(t0 + Duration::from_secs(59)).is_empty(),
            "within the minute"
        );
        let due = l.due(t0 + BLOCKED_WINDOW);
        assert_eq!(
            due.len(),
            1,
            "only the window with folded attempts: {due:?}"
        );
        assert_eq!(due[0].param("count"), Some("10000"));
        assert_eq!(due[0].param("host"), Some("10.0.0.1"));
        // The windows without more attempts are forgotten; the flooded one goes on.
        assert_eq!(l.windows.len(), 1);
        assert!(l
            .admit(blocked("10.0.0.1", "deny:lan"), t0 + BLOCKED_WINDOW)
            .is_none());
        let due = l.due(t0 + 2 * BLOCKED_WINDOW);
        assert_eq!(due[0].param("count"), Some("1"));
        // A quiet window ends, and the next attempt is a message at once again.
        assert!(l.due(t0 + 3 * BLOCKED_WINDOW).is_empty());
        assert!(l.windows.is_empty());
    }

    #[test]
    fn spoofed_sources_cannot_grow_the_limiter_past_its_keys() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        let mut sent = 0;
        for i in 0..10_000u32 {
            let host = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
            sent += usize::from(l.admit(blocked(&host, "deny:spoof"), t0).is_some());
        }
        assert_eq!(sent, BLOCKED_KEYS);
        assert_eq!(l.windows.len(), BLOCKED_KEYS + 1);
        let due = l.due(t0 + BLOCKED_WINDOW);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].param("host"), Some("*"));
        assert_eq!(
            due[0].param("count"),
            Some((10_000 - BLOCKED_KEYS).to_string().as_str())
        );
    }

    #[test]
    fn audit_lines_go_out_with_every_field_whatever_it_is() {
        let line = r#"{"time":1800000000,"action":"isolate","source":"auto","reason":"host 192.168.10.11: 300 new connections in 10 s","who":"cage","result":"ok","prev":"9f86d081"}"#;
        let e = audit_event(line);
        assert_eq!((e.kind, e.severity), (Kind::Isolate, Severity::Alert));
        assert_eq!(
            e.param("prev"),
            Some("9f86d081"),
            "a field Cage does not know yet"
        );
        assert_eq!(e.param("time"), Some("1800000000"));
        assert!(e.msg.contains("300 new connections"), "{}", e.msg);
        let e = audit_event(
            r#"{"action":"release","source":"web","who":"web:192.168.8.10","reason":"","result":"ok","chain":{"n":3}}"#,
        );
        assert_eq!(e.kind, Kind::Release);
        assert_eq!(e.param("chain"), Some(r#"{"n":3}"#));
        let e = audit_event(
            r#"{"action":"config-refused","source":"daemon","result":"cage.export.syslog_queue (line 3): bad"}"#,
        );
        assert_eq!((e.kind, e.severity), (Kind::Refused, Severity::Error));
        assert!(e.msg.contains("syslog_queue"), "{}", e.msg);
        let e = audit_event(r#"{"action":"login-failed","source":"web","who":"web:192.168.8.10"}"#);
        assert_eq!((e.kind, e.severity), (Kind::LoginFailed, Severity::Warning));
        let e = audit_event("not json\"]");
        assert_eq!((e.kind, e.severity), (Kind::Audit, Severity::Error));
    }

    #[test]
    fn the_audit_log_is_followed_across_rotation() {
        let dir = std::env::temp_dir().join(format!("cage-syslog-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("audit.log");
        std::fs::write(&log, "old\n").unwrap();
        let mut t = AuditTail {
            log: log.clone(),
            mark_file: dir.join("mark.json"),
            mark: AuditMark {
                inode: inode(&log).unwrap().0,
                offset: 4,
            },
        };
        assert!(t.new_lines().is_empty());
        let append = |text: &str| {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&log)
                .unwrap();
            f.write_all(text.as_bytes()).unwrap();
        };
        append("one\ntw");
        assert_eq!(t.new_lines(), vec!["one"]);
        append("o\n");
        assert_eq!(t.new_lines(), vec!["two"]);
        append("three\n");
        std::fs::rename(&log, dir.join("audit.log.1")).unwrap();
        append("four\n");
        assert_eq!(t.new_lines(), vec!["three", "four"]);
        // The mark survives a restart.
        let stored: AuditMark =
            serde_json::from_slice(&std::fs::read(dir.join("mark.json")).unwrap()).unwrap();
        assert_eq!(stored, t.mark);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
