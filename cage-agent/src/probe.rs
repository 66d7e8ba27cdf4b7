//! Probing: real packets that prove the connectivity contract, the denies as well as the
//! allows.
//!
//! A *prober* sends one probe (a TCP connection, a UDP datagram or an ICMP echo request)
//! that carries a unique [`Token`] and waits for the answer. A [`Witness`] in the
//! destination's network namespace holds raw sockets for TCP, UDP and ICMP over IPv4 and
//! IPv6. The kernel hands a raw socket a copy of every packet it delivers locally, after
//! the netfilter input hook (`raw_local_deliver` runs in `ip_local_deliver_finish`, past
//! `NF_INET_LOCAL_IN`; `raw6_local_deliver` likewise), so the witness sees exactly what got
//! through the firewall, whether or not a server listens. [`Servers`] answer the probes that
//! are let through (TCP accept and echo, UDP echo).
//!
//! The witness is the judge: a probe was [`Verdict::Delivered`] when the witness saw it and
//! the prober got its answer, [`Verdict::Blocked`] when the witness saw nothing and the
//! prober got nothing, and anything else is inconsistent (a packet arrived but the answer
//! did not come back, or an answer came back from something the witness never saw) and
//! must be looked into.
//!
//! Network namespaces are per thread: [`NetNs::run`] and [`NetNs::spawn`] run a closure on a
//! fresh thread that has entered the namespace, and every socket that closure creates lives
//! there. Nothing here knows any particular topology: the lab of the end-to-end tests and
//! `cage selftest` on a router use the same code.
//!
//! Every loop here is bounded in count and in time.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
// portable-atomic: 32-bit MIPS (the GL-MT300N) has no native 64-bit atomics.
use portable_atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use std::{fmt, mem, ptr};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Where `ip netns add` puts the namespaces it names.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// How long a packet may still be on its way after the prober gave up: the witness is
/// read up to this long past the end of an attempt before a "nothing arrived" counts.
pub const IN_FLIGHT: Duration = Duration::from_millis(50);

/// Errors that keep a probe from being made or judged (as opposed to a probe that was
/// made and failed, which is an [`Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot enter network namespace {ns}: {source}")]
    Enter { ns: String, source: io::Error },
    #[error("{op} (network namespace {ns}): {source}")]
    Io {
        ns: String,
        op: String,
        source: io::Error,
    },
    #[error("thread '{what}' in network namespace {ns} panicked")]
    Panicked { ns: String, what: String },
    #[error("witness in network namespace {ns}: {message}")]
    Witness { ns: String, message: String },
}

// ---- network namespaces ---------------------------------------------------------------

/// A network namespace, by name (as `ip netns` names it) or the caller's own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NetNs {
    name: Option<String>,
    /// Where to open it, when that is not `/run/netns/<name>` (see [`NetNs::at_path`]).
    path: Option<PathBuf>,
}

/// A thread running in a network namespace; see [`NetNs::spawn`].
pub struct NsThread<T> {
    handle: JoinHandle<Result<T, ProbeError>>,
    ns: String,
    what: String,
}

impl<T> NsThread<T> {
    /// Wait for the thread; its result, or why it has none.
    pub fn join(self) -> Result<T, ProbeError> {
        match self.handle.join() {
            Ok(result) => result,
            Err(_) => Err(ProbeError::Panicked {
                ns: self.ns,
                what: self.what,
            }),
        }
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

impl NetNs {
    /// The namespace `ip netns` knows as `name` (`/run/netns/<name>`).
    pub fn named(name: impl Into<String>) -> NetNs {
        NetNs {
            name: Some(name.into()),
            path: None,
        }
    }

    /// The namespace of the thread that later runs the closure (no `setns` at all): what
    /// `cage selftest` uses on the router itself.
    pub fn current() -> NetNs {
        NetNs {
            name: None,
            path: None,
        }
    }

    /// A namespace opened at `path`, called `name` in thread names and errors: for
    /// namespaces that `ip netns` does not know, e.g. an anonymous one that a file
    /// descriptor of this process keeps alive (`/proc/<pid>/fd/<fd>`), as `cage selftest`
    /// makes them (they vanish with the process, however it ends).
    pub fn at_path(name: impl Into<String>, path: impl Into<PathBuf>) -> NetNs {
        NetNs {
            name: Some(name.into()),
            path: Some(path.into()),
        }
    }

    /// The name, or `(current)`.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("(current)")
    }

    pub fn path(&self) -> Option<PathBuf> {
        if let Some(path) = &self.path {
            return Some(path.clone());
        }
        self.name
            .as_ref()
            .map(|n| PathBuf::from(NETNS_RUN_DIR).join(n))
    }

    /// Move the calling thread into this namespace. Only for threads the caller owns and
    /// will not hand back to a pool: use [`NetNs::run`] or [`NetNs::spawn`] instead.
    pub fn enter_this_thread(&self) -> Result<(), ProbeError> {
        let Some(path) = self.path() else {
            return Ok(());
        };
        let enter = |source| ProbeError::Enter {
            ns: self.name().to_owned(),
            source,
        };
        let file = File::open(&path).map_err(enter)?;
        // SAFETY: setns on a valid open file descriptor; it changes only this thread's
        // network namespace (CLONE_NEWNET is allowed in a multi-threaded process).
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(enter(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Run `f` on a fresh thread that has entered this namespace.
    pub fn spawn<T, F>(&self, what: &str, f: F) -> Result<NsThread<T>, ProbeError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, ProbeError> + Send + 'static,
    {
        let ns = self.clone();
        let handle = thread::Builder::new()
            .name(format!("{what}@{}", self.name()))
            .spawn(move || {
                ns.enter_this_thread()?;
                f()
            })
            .map_err(|source| ProbeError::Io {
                ns: self.name().to_owned(),
                op: format!("spawning thread '{what}'"),
                source,
            })?;
        Ok(NsThread {
            handle,
            ns: self.name().to_owned(),
            what: what.to_owned(),
        })
    }

    /// Run `f` on a fresh thread in this namespace and wait for it.
    pub fn run<T, F>(&self, what: &str, f: F) -> Result<T, ProbeError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, ProbeError> + Send + 'static,
    {
        self.spawn(what, f)?.join()
    }

    /// Write a `net.*` sysctl of this namespace, e.g. `("net.ipv4.ip_forward", "1")`.
    pub fn set_sysctl(&self, key: &str, value: &str) -> Result<(), ProbeError> {
        let (key, value) = (key.to_owned(), value.to_owned());
        let ns = self.name().to_owned();
        self.run("sysctl", move || write_sysctl(&ns, &key, &value))
    }

    /// Read a `net.*` sysctl of this namespace.
    pub fn sysctl(&self, key: &str) -> Result<String, ProbeError> {
        let key = key.to_owned();
        let ns = self.name().to_owned();
        self.run("sysctl", move || {
            let path = sysctl_path(&key);
            std::fs::read_to_string(&path)
                .map(|s| s.trim().to_owned())
                .map_err(|source| ProbeError::Io {
                    ns,
                    op: format!("reading {}", path.display()),
                    source,
                })
        })
    }
}

fn sysctl_path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

/// Write a sysctl of the calling thread's network namespace. `/proc/sys/net` resolves
/// the namespace of the thread that opens the file, not the process's.
fn write_sysctl(ns: &str, key: &str, value: &str) -> Result<(), ProbeError> {
    let path = sysctl_path(key);
    std::fs::write(&path, value).map_err(|source| ProbeError::Io {
        ns: ns.to_owned(),
        op: format!("writing '{value}' to {}", path.display()),
        source,
    })
}

// ---- what probes are made of ----------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    /// ICMP echo (ICMPv6 echo for IPv6 destinations).
    Icmp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::UNSPECIFIED.into(),
            Family::V6 => Ipv6Addr::UNSPECIFIED.into(),
        }
    }

    fn domain(self) -> Domain {
        match self {
            Family::V4 => Domain::IPV4,
            Family::V6 => Domain::IPV6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        })
    }
}

/// What makes one probe's packets recognisable: `cage-probe:` and 16 hex digits, in the
/// payload of every packet that has one (UDP datagrams, ICMP echoes, TCP data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(pub u64);

const TOKEN_TAG: &[u8] = b"cage-probe:";
/// Length of a token on the wire.
pub const TOKEN_LEN: usize = TOKEN_TAG.len() + 16;

impl Token {
    /// A token no other probe of this process, nor of another process running at the same
    /// time, carries: the process id in the high bits, a counter in the low ones.
    pub fn fresh() -> Token {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed) & 0xff_ffff_ffff;
        Token(((std::process::id() as u64 & 0xff_ffff) << 40) | n)
    }

    pub fn to_bytes(self) -> Vec<u8> {
        format!("cage-probe:{:016x}", self.0).into_bytes()
    }

    /// The first token in a payload, if there is one.
    pub fn find(payload: &[u8]) -> Option<Token> {
        let at = payload
            .windows(TOKEN_TAG.len())
            .position(|w| w == TOKEN_TAG)?;
        let hex = payload.get(at + TOKEN_TAG.len()..at + TOKEN_LEN)?;
        let hex = std::str::from_utf8(hex).ok()?;
        u64::from_str_radix(hex, 16).ok().map(Token)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

// ---- the witness ----------------------------------------------------------------------

/// One packet the witness saw delivered locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// When the witness read it (at most one poll round after the kernel queued it).
    pub at: Instant,
    pub proto: Proto,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// TCP or UDP source port; the ICMP echo identifier.
    pub src_port: u16,
    /// TCP or UDP destination port; 0 for ICMP.
    pub dst_port: u16,
    /// TCP flags (0 for UDP and ICMP).
    pub tcp_flags: u8,
    /// ICMP or ICMPv6 type.
    pub icmp_type: Option<u8>,
    /// The probe token in the payload, if any.
    pub token: Option<Token>,
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

impl Record {
    pub fn family(&self) -> Family {
        Family::of(self.dst)
    }

    /// A TCP connection attempt (SYN without ACK).
    pub fn is_syn(&self) -> bool {
        self.proto == Proto::Tcp && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    pub fn is_echo_request(&self) -> bool {
        matches!(
            (self.proto, self.icmp_type),
            (Proto::Icmp, Some(ICMP_ECHO_REQUEST | ICMPV6_ECHO_REQUEST))
        )
    }

    /// Does this packet belong to `attempt`? UDP and ICMP packets must carry its token;
    /// for TCP, a SYN to the probed address and port counts as well (a SYN has no payload,
    /// and NAT may change its source port), so callers must not probe one TCP address and
    /// port from two places at the same time.
    pub fn belongs_to(&self, attempt: &Attempt) -> bool {
        let p = &attempt.probe;
        if self.proto != p.proto || self.dst != p.dst || self.at < attempt.started {
            return false;
        }
        let tokened = self.token == Some(attempt.token);
        match p.proto {
            Proto::Udp => self.dst_port == p.port && tokened,
            Proto::Tcp => self.dst_port == p.port && (tokened || self.is_syn()),
            Proto::Icmp => self.is_echo_request() && tokened,
        }
    }
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sock = |a: IpAddr, p: u16| SocketAddr::new(a, p).to_string();
        match self.proto {
            Proto::Icmp => write!(
                f,
                "icmp type {} id {} {} -> {}",
                self.icmp_type.unwrap_or(255),
                self.src_port,
                self.src,
                self.dst
            )?,
            Proto::Tcp => write!(
                f,
                "tcp {} -> {} flags {:#04x}",
                sock(self.src, self.src_port),
                sock(self.dst, self.dst_port),
                self.tcp_flags
            )?,
            Proto::Udp => write!(
                f,
                "udp {} -> {}",
                sock(self.src, self.src_port),
                sock(self.dst, self.dst_port)
            )?,
        }
        if let Some(t) = self.token {
            write!(f, " token {t}")?;
        }
        Ok(())
    }
}

/// How long a witness watches and how much it keeps.
#[derive(Debug, Clone, Copy)]
pub struct WitnessLimits {
    pub max_duration: Duration,
    pub max_records: usize,
}

impl Default for WitnessLimits {
    fn default() -> Self {
        WitnessLimits {
            max_duration: Duration::from_secs(600),
            max_records: 200_000,
        }
    }
}

#[derive(Default)]
struct WitnessShared {
    stop: AtomicBool,
    records: Mutex<Vec<Record>>,
    /// Packets seen after `max_records` was reached, not kept.
    overflow: AtomicU64,
    /// Every packet the kernel queued before this instant has been read and recorded.
    drained_until: Mutex<Option<Instant>>,
    /// Why the witness stopped watching early, if it did.
    failed: Mutex<Option<String>>,
    running: AtomicBool,
}

/// Raw sockets in one network namespace that record every TCP, UDP and ICMP packet the
/// kernel delivers locally there, after the firewall's input hook. See the module docs.
pub struct Witness {
    ns: NetNs,
    shared: Arc<WitnessShared>,
    thread: Option<NsThread<()>>,
}

/// The raw sockets a witness reads: (family, protocol) pairs.
const WITNESS_SOCKETS: [(Family, Proto); 6] = [
    (Family::V4, Proto::Tcp),
    (Family::V4, Proto::Udp),
    (Family::V4, Proto::Icmp),
    (Family::V6, Proto::Tcp),
    (Family::V6, Proto::Udp),
    (Family::V6, Proto::Icmp),
];

/// Poll timeout of the witness and the servers: how quickly they notice a stop.
const POLL_MS: i32 = 20;
/// Packets read from one socket in one poll round at most.
const MAX_READS_PER_ROUND: usize = 4096;

impl Witness {
    /// Open the raw sockets in `ns` and start recording. Returns once the sockets exist,
    /// so every packet delivered after this returns is seen.
    pub fn start(ns: &NetNs, limits: WitnessLimits) -> Result<Witness, ProbeError> {
        let shared = Arc::new(WitnessShared::default());
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), ProbeError>>();
        let thread_shared = shared.clone();
        let ns_name = ns.name().to_owned();
        let thread = ns.spawn("witness", move || {
            let sockets = match open_witness_sockets(&ns_name) {
                Ok(s) => s,
                Err(e) => {
                    let message = e.to_string();
                    let _ = ready_tx.send(Err(e));
                    return Err(ProbeError::Witness {
                        ns: ns_name,
                        message,
                    });
                }
            };
            thread_shared.running.store(true, Ordering::SeqCst);
            let _ = ready_tx.send(Ok(()));
            let result = witness_loop(&sockets, &thread_shared, limits);
            thread_shared.running.store(false, Ordering::SeqCst);
            if let Err(message) = &result {
                *thread_shared.failed.lock().unwrap() = Some(message.clone());
            }
            result.map_err(|message| ProbeError::Witness {
                ns: ns_name,
                message,
            })
        })?;
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(Witness {
                ns: ns.clone(),
                shared,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            // The thread ended without a word: it could not enter the namespace.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(thread.join().err().unwrap_or(ProbeError::Witness {
                    ns: ns.name().to_owned(),
                    message: "ended before it started".into(),
                }))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                shared.stop.store(true, Ordering::SeqCst);
                Err(ProbeError::Witness {
                    ns: ns.name().to_owned(),
                    message: "did not start within 10 s".into(),
                })
            }
        }
    }

    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// Everything recorded so far.
    pub fn records(&self) -> Vec<Record> {
        self.shared.records.lock().unwrap().clone()
    }

    /// Packets seen but not kept because `max_records` was reached.
    pub fn overflow(&self) -> u64 {
        self.shared.overflow.load(Ordering::Relaxed)
    }

    /// The recorded packets that belong to `attempt` (see [`Record::belongs_to`]).
    pub fn seen(&self, attempt: &Attempt) -> Vec<Record> {
        let records = self.shared.records.lock().unwrap();
        records
            .iter()
            .filter(|r| r.belongs_to(attempt))
            .cloned()
            .collect()
    }

    /// Wait until everything the kernel delivered before `instant` has been recorded, for
    /// at most `max_wait`. Fails when the witness stopped watching, lags behind, or lost
    /// records: "nothing was seen" would then mean nothing.
    pub fn wait_drained(&self, instant: Instant, max_wait: Duration) -> Result<(), ProbeError> {
        let give_up = Instant::now() + max_wait;
        let fail = |message: String| ProbeError::Witness {
            ns: self.ns.name().to_owned(),
            message,
        };
        loop {
            if let Some(why) = self.shared.failed.lock().unwrap().clone() {
                return Err(fail(format!("stopped watching: {why}")));
            }
            let overflow = self.overflow();
            if overflow > 0 {
                return Err(fail(format!(
                    "{overflow} packets were not recorded (record limit reached)"
                )));
            }
            if self
                .shared
                .drained_until
                .lock()
                .unwrap()
                .is_some_and(|d| d >= instant)
            {
                return Ok(());
            }
            if !self.shared.running.load(Ordering::SeqCst) {
                return Err(fail(
                    "is not running (time limit reached or stopped)".into(),
                ));
            }
            if Instant::now() >= give_up {
                return Err(fail(format!(
                    "still behind after {max_wait:?}: the machine is too busy to judge"
                )));
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Make `probe` from `from` and judge it by what this witness saw.
    pub fn observe(&self, from: &NetNs, probe: &Probe) -> Result<Observation, ProbeError> {
        let attempt = probe_in(from, probe)?;
        self.judge(attempt)
    }

    /// Judge an attempt made towards this witness's namespace: wait until the packets
    /// that could still be in flight have been read, then compare.
    pub fn judge(&self, attempt: Attempt) -> Result<Observation, ProbeError> {
        self.wait_drained(attempt.finished + IN_FLIGHT, Duration::from_secs(5))?;
        let seen = self.seen(&attempt);
        let verdict = Verdict::of(&attempt.outcome, !seen.is_empty());
        Ok(Observation {
            attempt,
            seen,
            verdict,
        })
    }

    /// Stop watching; the records, or why the witness failed.
    pub fn stop(mut self) -> Result<Vec<Record>, ProbeError> {
        self.shutdown()?;
        Ok(mem::take(&mut *self.shared.records.lock().unwrap()))
    }

    fn shutdown(&mut self) -> Result<(), ProbeError> {
        self.shared.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t.join(),
            None => Ok(()),
        }
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn open_witness_sockets(ns: &str) -> Result<Vec<(Family, Proto, Socket)>, ProbeError> {
    let mut sockets = Vec::new();
    for (family, proto) in WITNESS_SOCKETS {
        let io = |op: &str, source| ProbeError::Io {
            ns: ns.to_owned(),
            op: format!("{op} raw {family} {proto} socket"),
            source,
        };
        let protocol = match (family, proto) {
            (_, Proto::Tcp) => Protocol::TCP,
            (_, Proto::Udp) => Protocol::UDP,
            (Family::V4, Proto::Icmp) => Protocol::ICMPV4,
            (Family::V6, Proto::Icmp) => Protocol::ICMPV6,
        };
        let s = Socket::new(family.domain(), Type::RAW, Some(protocol))
            .map_err(|e| io("opening", e))?;
        s.set_nonblocking(true).map_err(|e| io("configuring", e))?;
        // Room for bursts while the witness thread is not scheduled.
        let _ = s.set_recv_buffer_size(4 << 20);
        if family == Family::V6 {
            // IPv6 raw sockets get no IP header: the destination comes as ancillary data.
            setsockopt_int(s.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)
                .map_err(|e| io("configuring", e))?;
        }
        sockets.push((family, proto, s));
    }
    Ok(sockets)
}

fn witness_loop(
    sockets: &[(Family, Proto, Socket)],
    shared: &WitnessShared,
    limits: WitnessLimits,
) -> Result<(), String> {
    let deadline = Instant::now() + limits.max_duration;
    let mut fds: Vec<libc::pollfd> = sockets
        .iter()
        .map(|(_, _, s)| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut buf = vec![0u8; 65536];
    while !shared.stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        let round = Instant::now();
        poll(&mut fds, POLL_MS).map_err(|e| format!("poll: {e}"))?;
        let mut complete = true;
        for (family, proto, socket) in sockets {
            let mut reads = 0;
            loop {
                if reads == MAX_READS_PER_ROUND {
                    complete = false;
                    break;
                }
                reads += 1;
                let msg = match recv_msg(socket.as_raw_fd(), &mut buf) {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => return Err(format!("reading raw {family} {proto} socket: {e}")),
                };
                let now = Instant::now();
                let packet = &buf[..msg.len];
                let record = match family {
                    Family::V4 => parse_ipv4(packet, now),
                    Family::V6 => match (msg.src, msg.dst) {
                        (Some(src), Some(dst)) => parse_l4(*proto, src.ip(), dst, packet, now),
                        _ => None,
                    },
                };
                let Some(record) = record else { continue };
                let mut records = shared.records.lock().unwrap();
                if records.len() < limits.max_records {
                    records.push(record);
                } else {
                    shared.overflow.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // A raw socket whose receive buffer is full drops packets silently: then "the
        // witness saw nothing" would mean nothing, so the witness fails instead.
        for (family, proto, socket) in sockets {
            match socket_drops(socket.as_raw_fd()) {
                Ok(0) => {}
                Ok(n) => {
                    return Err(format!(
                        "the kernel dropped {n} packets for the raw {family} {proto} socket \
                         (receive buffer full)"
                    ))
                }
                Err(e) => return Err(format!("reading drops of raw {family} {proto} socket: {e}")),
            }
        }
        if complete {
            *shared.drained_until.lock().unwrap() = Some(round);
        }
    }
    Ok(())
}

/// Packets the kernel dropped for a socket (`SO_MEMINFO`, `SK_MEMINFO_DROPS`).
fn socket_drops(fd: RawFd) -> io::Result<u32> {
    // The kernel fills in SK_MEMINFO_VARS (9 today) values, as many as fit.
    let mut info = [0u32; 16];
    let mut len = mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: `info` and `len` describe a live buffer of `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info[libc::SK_MEMINFO_DROPS as usize])
}

fn parse_ipv4(packet: &[u8], at: Instant) -> Option<Record> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let proto = match packet[9] {
        6 => Proto::Tcp,
        17 => Proto::Udp,
        1 => Proto::Icmp,
        _ => return None,
    };
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    parse_l4(proto, src.into(), dst.into(), packet.get(ihl..)?, at)
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Parse a transport header and payload (what IPv6 raw sockets deliver, and what follows
/// the IPv4 header).
fn parse_l4(proto: Proto, src: IpAddr, dst: IpAddr, l4: &[u8], at: Instant) -> Option<Record> {
    let mut record = Record {
        at,
        proto,
        src,
        dst,
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        icmp_type: None,
        token: None,
    };
    let payload = match proto {
        Proto::Tcp => {
            record.src_port = be16(l4, 0)?;
            record.dst_port = be16(l4, 2)?;
            record.tcp_flags = *l4.get(13)?;
            let offset = usize::from(l4.get(12)? >> 4) * 4;
            l4.get(offset..).unwrap_or(&[])
        }
        Proto::Udp => {
            record.src_port = be16(l4, 0)?;
            record.dst_port = be16(l4, 2)?;
            l4.get(8..).unwrap_or(&[])
        }
        Proto::Icmp => {
            let kind = *l4.first()?;
            // Neighbour discovery and multicast listener messages are the link's own
            // chatter, not anything a probe sends: not worth a record.
            if src.is_ipv6() && matches!(kind, 130..=137 | 143) {
                return None;
            }
            record.icmp_type = Some(kind);
            record.src_port = be16(l4, 4).unwrap_or(0);
            l4.get(8..).unwrap_or(&[])
        }
    };
    record.token = Token::find(payload);
    Some(record)
}

// ---- servers --------------------------------------------------------------------------

/// A port to answer on, on every address of the namespace, IPv4 and IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service {
    pub proto: Proto,
    pub port: u16,
}

impl Service {
    pub const fn tcp(port: u16) -> Service {
        Service {
            proto: Proto::Tcp,
            port,
        }
    }
    pub const fn udp(port: u16) -> Service {
        Service {
            proto: Proto::Udp,
            port,
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.proto, self.port)
    }
}

/// Echo servers in one namespace: TCP (accept, echo what the client sends first, close)
/// and UDP (echo each datagram from the address it was sent to). They answer probes the
/// policy lets through; they judge nothing.
pub struct Servers {
    shared: Arc<ServerShared>,
    thread: Option<NsThread<()>>,
    taken: Vec<(Family, Service)>,
}

#[derive(Default)]
struct ServerShared {
    stop: AtomicBool,
    answered: AtomicU64,
    connections: AtomicUsize,
}

/// TCP connections served at once at most; beyond that, new ones are closed at once.
const MAX_CONNECTIONS: usize = 128;
/// How long a TCP connection may take to send its first bytes.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(3);

impl Servers {
    /// Listen on `services` in `ns` (IPv4 and IPv6 each) for at most `max_duration`.
    /// A port something else already listens on is skipped and listed by
    /// [`Servers::taken`]; any other failure is an error.
    pub fn start(
        ns: &NetNs,
        services: &[Service],
        max_duration: Duration,
    ) -> Result<Servers, ProbeError> {
        let shared = Arc::new(ServerShared::default());
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_shared = shared.clone();
        let ns_name = ns.name().to_owned();
        let services = services.to_vec();
        let thread = ns.spawn("servers", move || {
            let (sockets, taken) = match open_server_sockets(&ns_name, &services) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            let _ = ready_tx.send(Ok(taken));
            serve(&sockets, &thread_shared, max_duration);
            Ok(())
        })?;
        let taken = match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(taken)) => taken,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(thread.join().err().unwrap_or(ProbeError::Witness {
                    ns: ns.name().to_owned(),
                    message: "servers ended before they started".into(),
                }))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                shared.stop.store(true, Ordering::SeqCst);
                return Err(ProbeError::Witness {
                    ns: ns.name().to_owned(),
                    message: "servers did not start within 10 s".into(),
                });
            }
        };
        Ok(Servers {
            shared,
            thread: Some(thread),
            taken,
        })
    }

    /// Services something else was already listening on.
    pub fn taken(&self) -> &[(Family, Service)] {
        &self.taken
    }

    /// Probes answered so far.
    pub fn answered(&self) -> u64 {
        self.shared.answered.load(Ordering::Relaxed)
    }

    pub fn stop(mut self) -> Result<(), ProbeError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), ProbeError> {
        self.shared.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t.join(),
            None => Ok(()),
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

type ServerSockets = Vec<(Family, Proto, Socket)>;

fn open_server_sockets(
    ns: &str,
    services: &[Service],
) -> Result<(ServerSockets, Vec<(Family, Service)>), ProbeError> {
    let mut sockets = Vec::new();
    let mut taken = Vec::new();
    for &service in services {
        for family in [Family::V4, Family::V6] {
            let io = |op: &str, source| ProbeError::Io {
                ns: ns.to_owned(),
                op: format!("{op} {family} {service} server"),
                source,
            };
            let (ty, protocol) = match service.proto {
                Proto::Tcp => (Type::STREAM, Protocol::TCP),
                Proto::Udp => (Type::DGRAM, Protocol::UDP),
                Proto::Icmp => continue, // the kernel answers echo requests itself
            };
            let s =
                Socket::new(family.domain(), ty, Some(protocol)).map_err(|e| io("opening", e))?;
            s.set_reuse_address(true)
                .map_err(|e| io("configuring", e))?;
            let fd = s.as_raw_fd();
            match family {
                Family::V4 => setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1),
                Family::V6 => {
                    s.set_only_v6(true).map_err(|e| io("configuring", e))?;
                    setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)
                }
            }
            .map_err(|e| io("configuring", e))?;
            let addr = SocketAddr::new(family.unspecified(), service.port);
            match s.bind(&addr.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
                    taken.push((family, service));
                    continue;
                }
                Err(e) => return Err(io("binding", e)),
            }
            if service.proto == Proto::Tcp {
                s.listen(128).map_err(|e| io("listening on", e))?;
            }
            s.set_nonblocking(true).map_err(|e| io("configuring", e))?;
            sockets.push((family, service.proto, s));
        }
    }
    Ok((sockets, taken))
}

fn serve(sockets: &[(Family, Proto, Socket)], shared: &Arc<ServerShared>, max: Duration) {
    let deadline = Instant::now() + max;
    let mut fds: Vec<libc::pollfd> = sockets
        .iter()
        .map(|(_, _, s)| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut buf = vec![0u8; 65536];
    while !shared.stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        if poll(&mut fds, POLL_MS).is_err() {
            thread::sleep(Duration::from_millis(POLL_MS as u64));
            continue;
        }
        for (i, (_, proto, socket)) in sockets.iter().enumerate() {
            if fds[i].revents == 0 {
                continue;
            }
            for _ in 0..MAX_READS_PER_ROUND {
                let more = match proto {
                    Proto::Tcp => accept_one(socket, shared),
                    _ => echo_datagram(socket, &mut buf, shared),
                };
                if !more {
                    break;
                }
            }
        }
    }
}

/// Accept one connection and serve it on a thread of its own; false when none waits.
fn accept_one(listener: &Socket, shared: &Arc<ServerShared>) -> bool {
    let Ok((conn, _)) = listener.accept() else {
        return false;
    };
    if shared.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
        shared.connections.fetch_sub(1, Ordering::SeqCst);
        return true; // dropping `conn` closes it
    }
    let inner = shared.clone();
    let spawned = thread::Builder::new().name("echo".into()).spawn(move || {
        if echo_stream(conn) {
            inner.answered.fetch_add(1, Ordering::Relaxed);
        }
        inner.connections.fetch_sub(1, Ordering::SeqCst);
    });
    if spawned.is_err() {
        // A failed spawn drops the closure (and the connection) without running it.
        shared.connections.fetch_sub(1, Ordering::SeqCst);
    }
    true
}

fn echo_stream(conn: Socket) -> bool {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(CONNECTION_TIMEOUT));
    let _ = conn.set_write_timeout(Some(CONNECTION_TIMEOUT));
    let mut buf = [0u8; 4096];
    let n = match (&conn).read(&mut buf) {
        Ok(n) if n > 0 => n,
        _ => return false,
    };
    let ok = (&conn).write_all(&buf[..n]).is_ok();
    let _ = conn.shutdown(std::net::Shutdown::Write);
    ok
}

/// Echo one datagram from the address it was sent to; false when none waits.
fn echo_datagram(socket: &Socket, buf: &mut [u8], shared: &ServerShared) -> bool {
    let msg = match recv_msg(socket.as_raw_fd(), buf) {
        Ok(Some(m)) => m,
        _ => return false,
    };
    if let Some(to) = msg.src {
        if send_msg_from(
            socket.as_raw_fd(),
            &buf[..msg.len],
            to,
            msg.dst,
            msg.ifindex,
        )
        .is_ok()
        {
            shared.answered.fetch_add(1, Ordering::Relaxed);
        }
    }
    true
}

// ---- probers --------------------------------------------------------------------------

/// One probe: what to send where, and from where.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Probe {
    pub proto: Proto,
    pub dst: IpAddr,
    /// Destination port (ignored for ICMP).
    pub port: u16,
    /// Source address; the kernel's choice when `None`. The address must be configured
    /// in the prober's namespace (that is how a spoofing host sends from it too).
    pub src: Option<IpAddr>,
    /// Source port (e.g. 68 for a DHCP client); the kernel's choice when `None`.
    pub src_port: Option<u16>,
    /// How long to wait for the connection and the answer, together.
    pub timeout: Duration,
}

impl Probe {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

    pub fn new(proto: Proto, dst: IpAddr, port: u16) -> Probe {
        Probe {
            proto,
            dst,
            port,
            src: None,
            src_port: None,
            timeout: Probe::DEFAULT_TIMEOUT,
        }
    }
    pub fn tcp(dst: IpAddr, port: u16) -> Probe {
        Probe::new(Proto::Tcp, dst, port)
    }
    pub fn udp(dst: IpAddr, port: u16) -> Probe {
        Probe::new(Proto::Udp, dst, port)
    }
    pub fn icmp(dst: IpAddr) -> Probe {
        Probe::new(Proto::Icmp, dst, 0)
    }
    pub fn from(mut self, src: IpAddr) -> Probe {
        self.src = Some(src);
        self
    }
    pub fn from_port(mut self, port: u16) -> Probe {
        self.src_port = Some(port);
        self
    }
    pub fn timeout(mut self, timeout: Duration) -> Probe {
        self.timeout = timeout;
        self
    }
    pub fn family(&self) -> Family {
        Family::of(self.dst)
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let src = self
            .src
            .map(|s| match self.src_port {
                Some(p) => SocketAddr::new(s, p).to_string(),
                None => s.to_string(),
            })
            .unwrap_or_else(|| "*".into());
        match self.proto {
            Proto::Icmp => write!(f, "icmp echo {src} -> {}", self.dst),
            p => write!(f, "{p} {src} -> {}", SocketAddr::new(self.dst, self.port)),
        }
    }
}

/// How a probe ended, as the prober saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The echo came back with the probe's token.
    Answered,
    /// Refused at once: a TCP reset, an ICMP unreachable or prohibited, a local error.
    Refused(String),
    /// No answer within the probe's timeout.
    TimedOut,
    /// Connected, but the answer was not the echo of the token.
    WrongAnswer(String),
}

impl Outcome {
    pub fn answered(&self) -> bool {
        *self == Outcome::Answered
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Answered => f.write_str("answered"),
            Outcome::Refused(why) => write!(f, "refused ({why})"),
            Outcome::TimedOut => f.write_str("timed out"),
            Outcome::WrongAnswer(why) => write!(f, "wrong answer ({why})"),
        }
    }
}

/// A probe as made.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub probe: Probe,
    pub token: Token,
    /// The socket's own address, once bound (the ICMP echo identifier as port).
    pub local: Option<SocketAddr>,
    pub started: Instant,
    pub finished: Instant,
    pub outcome: Outcome,
}

/// Make `probe` from a fresh thread in `ns`.
pub fn probe_in(ns: &NetNs, probe: &Probe) -> Result<Attempt, ProbeError> {
    let probe = probe.clone();
    let ns_name = ns.name().to_owned();
    ns.run("probe", move || send_probe(&ns_name, &probe))
}

/// Make `probe` from the calling thread's namespace. `ns` only names it in errors.
/// Errors are failures to make the probe at all (no such source address, no socket);
/// a probe that was made and got no answer is an `Ok` with an [`Outcome`].
pub fn send_probe(ns: &str, probe: &Probe) -> Result<Attempt, ProbeError> {
    let token = Token::fresh();
    let started = Instant::now();
    let mut attempt = Attempt {
        probe: probe.clone(),
        token,
        local: None,
        started,
        finished: started,
        outcome: Outcome::TimedOut,
    };
    let deadline = started + probe.timeout;
    let io = |op: &str, source| ProbeError::Io {
        ns: ns.to_owned(),
        op: format!("{op} for {probe}"),
        source,
    };
    let socket = open_probe_socket(ns, probe).map_err(|e| io("opening a socket", e))?;
    let dst = SockAddr::from(SocketAddr::new(probe.dst, probe.port));
    let payload = token.to_bytes();
    let outcome = match probe.proto {
        Proto::Tcp => match socket.connect_timeout(&dst, probe.timeout) {
            Err(e) => network_failure(e).map_err(|e| io("connecting", e))?,
            Ok(()) => {
                attempt.local = local_addr(&socket);
                match (&socket).write_all(&payload) {
                    Err(e) => network_failure(e).map_err(|e| io("sending", e))?,
                    Ok(()) => read_echo(&socket, &payload, deadline, |b| b.to_vec())
                        .map_err(|e| io("receiving", e))?,
                }
            }
        },
        Proto::Udp => {
            socket.connect(&dst).map_err(|e| io("connecting", e))?;
            attempt.local = local_addr(&socket);
            match socket.send(&payload) {
                Err(e) => network_failure(e).map_err(|e| io("sending", e))?,
                Ok(_) => read_echo(&socket, &payload, deadline, |b| b.to_vec())
                    .map_err(|e| io("receiving", e))?,
            }
        }
        Proto::Icmp => {
            // A connected ping socket reports ICMP errors (e.g. "administratively
            // prohibited") as hard errors on receive, so a reject is seen at once.
            socket.connect(&dst).map_err(|e| io("connecting", e))?;
            attempt.local = local_addr(&socket);
            let (request, reply) = match probe.family() {
                Family::V4 => (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY),
                Family::V6 => (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY),
            };
            // Type, code, checksum and identifier (both filled in by the kernel for
            // ping sockets), sequence 1, then the token.
            let mut packet = vec![request, 0, 0, 0, 0, 0, 0, 1];
            packet.extend_from_slice(&payload);
            match socket.send(&packet) {
                Err(e) => network_failure(e).map_err(|e| io("sending", e))?,
                Ok(_) => read_echo(&socket, &payload, deadline, |b| {
                    // Only echo replies count; the payload follows the 8-byte header.
                    if b.len() >= 8 && b[0] == reply {
                        b[8..].to_vec()
                    } else {
                        Vec::new()
                    }
                })
                .map_err(|e| io("receiving", e))?,
            }
        }
    };
    attempt.outcome = outcome;
    attempt.finished = Instant::now();
    Ok(attempt)
}

fn open_probe_socket(ns: &str, probe: &Probe) -> io::Result<Socket> {
    let family = probe.family();
    let socket = match probe.proto {
        Proto::Tcp => Socket::new(family.domain(), Type::STREAM, Some(Protocol::TCP))?,
        Proto::Udp => Socket::new(family.domain(), Type::DGRAM, Some(Protocol::UDP))?,
        Proto::Icmp => {
            let protocol = match family {
                Family::V4 => Protocol::ICMPV4,
                Family::V6 => Protocol::ICMPV6,
            };
            match Socket::new(family.domain(), Type::DGRAM, Some(protocol)) {
                Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                    // Ping sockets are off by default (no group may open them). The
                    // prober's namespace is the caller's to configure: allow every group
                    // there, for IPv4 and IPv6 alike (one sysctl covers both).
                    write_sysctl(ns, "net.ipv4.ping_group_range", "0 2147483647")
                        .map_err(|e| io::Error::other(e.to_string()))?;
                    Socket::new(family.domain(), Type::DGRAM, Some(protocol))?
                }
                other => other?,
            }
        }
    };
    if probe.src.is_some() || probe.src_port.is_some() {
        if probe.src_port.is_some() {
            socket.set_reuse_address(true)?;
        }
        let src = SocketAddr::new(
            probe.src.unwrap_or(family.unspecified()),
            probe.src_port.unwrap_or(0),
        );
        socket.bind(&src.into())?;
    }
    Ok(socket)
}

fn local_addr(socket: &Socket) -> Option<SocketAddr> {
    socket.local_addr().ok().and_then(|a| a.as_socket())
}

/// Network errors that mean "the other side (or something on the way) said no".
fn network_failure(e: io::Error) -> io::Result<Outcome> {
    if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock {
        return Ok(Outcome::TimedOut);
    }
    match e.raw_os_error() {
        Some(
            libc::ECONNREFUSED
            | libc::ECONNRESET
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EPROTO
            | libc::EACCES
            | libc::EPERM
            | libc::EPIPE,
        ) => Ok(Outcome::Refused(e.to_string())),
        _ => Err(e),
    }
}

/// Read until the echo of `token` arrives, the peer closes, or `deadline` passes.
/// `payload_of` extracts the part of a read that should hold the token.
fn read_echo(
    socket: &Socket,
    token: &[u8],
    deadline: Instant,
    payload_of: impl Fn(&[u8]) -> Vec<u8>,
) -> io::Result<Outcome> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Bounded by the deadline, and by a count in case of a flood of stray datagrams.
    for _ in 0..1024 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Outcome::TimedOut);
        }
        socket.set_read_timeout(Some(left))?;
        let n = match (&*socket).read(&mut buf) {
            Ok(n) => n,
            Err(e) => return network_failure(e),
        };
        if n == 0 {
            return Ok(Outcome::WrongAnswer(format!(
                "connection closed after {} bytes",
                got.len()
            )));
        }
        got.extend_from_slice(&payload_of(&buf[..n]));
        if got.windows(token.len()).any(|w| w == token) {
            return Ok(Outcome::Answered);
        }
        if socket.r#type()? != Type::STREAM {
            got.clear(); // each datagram stands alone
        }
    }
    Ok(Outcome::WrongAnswer("too many stray packets".into()))
}

// ---- verdicts -------------------------------------------------------------------------

/// What a probe proves, the witness and the prober taken together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The witness saw it arrive and the prober got the answer.
    Delivered,
    /// The witness saw nothing arrive and the prober got no answer.
    Blocked,
    /// The witness saw it arrive but the prober got no answer: a packet got through a
    /// policy that (perhaps) only stopped the way back. A deny that leaks.
    Leaked,
    /// The prober got an answer the witness never saw arrive: something else answered
    /// (a proxy, a redirect, another host with the address).
    Inconsistent,
}

impl Verdict {
    pub fn of(outcome: &Outcome, witnessed: bool) -> Verdict {
        match (witnessed, outcome.answered()) {
            (true, true) => Verdict::Delivered,
            (false, false) => Verdict::Blocked,
            (true, false) => Verdict::Leaked,
            (false, true) => Verdict::Inconsistent,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Delivered => "delivered",
            Verdict::Blocked => "blocked",
            Verdict::Leaked => "LEAKED",
            Verdict::Inconsistent => "INCONSISTENT",
        })
    }
}

/// A judged probe.
#[derive(Debug, Clone)]
pub struct Observation {
    pub attempt: Attempt,
    /// The witness's records of this probe.
    pub seen: Vec<Record>,
    pub verdict: Verdict,
}

impl Observation {
    /// One line: the verdict, the prober's outcome and what the witness saw.
    pub fn summary(&self) -> String {
        let seen = match self.seen.first() {
            None => "witness saw nothing".to_owned(),
            Some(r) if self.seen.len() == 1 => format!("witness saw {r}"),
            Some(r) => format!("witness saw {r} (+{} more)", self.seen.len() - 1),
        };
        format!("{}: {}; {seen}", self.verdict, self.attempt.outcome)
    }
}

// ---- socket plumbing that socket2 does not cover ---------------------------------------

fn setsockopt_int(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` outlives the call and its size is passed along.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid slice of pollfd for the duration of the call.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if r >= 0 {
        return Ok(r as usize);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::Interrupted {
        Ok(0)
    } else {
        Err(e)
    }
}

/// A datagram read with `recvmsg`: its length, source, and (when `IP_PKTINFO` or
/// `IPV6_RECVPKTINFO` is on) the local address it was sent to and the interface.
struct Message {
    len: usize,
    src: Option<SocketAddr>,
    dst: Option<IpAddr>,
    ifindex: u32,
}

/// Room for one `in_pktinfo` or `in6_pktinfo` control message, aligned for cmsghdr.
#[repr(C, align(8))]
struct ControlBuf([u8; 128]);

/// Non-blocking read of one datagram; `None` when nothing is queued.
fn recv_msg(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<Message>> {
    // SAFETY: all-zero is a valid sockaddr_storage and msghdr.
    let mut name: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut control = ControlBuf([0; 128]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    // SAFETY: every pointer in `msg` points at a live buffer of the stated size.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        };
    }
    let src = sockaddr_to_std(&name);
    let (mut dst, mut ifindex) = (None, 0);
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled in, within
    // `msg_controllen`; each payload is read unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let (level, kind) = ((*cmsg).cmsg_level, (*cmsg).cmsg_type);
            let data = libc::CMSG_DATA(cmsg);
            if level == libc::IPPROTO_IP && kind == libc::IP_PKTINFO {
                let info: libc::in_pktinfo = ptr::read_unaligned(data.cast());
                dst = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    info.ipi_addr.s_addr,
                ))));
                ifindex = info.ipi_ifindex as u32;
            } else if level == libc::IPPROTO_IPV6 && kind == libc::IPV6_PKTINFO {
                let info: libc::in6_pktinfo = ptr::read_unaligned(data.cast());
                dst = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                ifindex = info.ipi6_ifindex;
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Some(Message {
        len: n as usize,
        src,
        dst,
        ifindex,
    }))
}

/// Send a datagram to `to` from the local address `from` (so that an answer to a
/// wildcard-bound socket leaves from the address the question was sent to).
fn send_msg_from(
    fd: RawFd,
    data: &[u8],
    to: SocketAddr,
    from: Option<IpAddr>,
    ifindex: u32,
) -> io::Result<()> {
    let to = SockAddr::from(to);
    let mut control = ControlBuf([0; 128]);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = to.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = to.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    // SAFETY: the control message is built inside `control`, which is large enough for
    // one in_pktinfo or in6_pktinfo (checked by CMSG_SPACE below).
    unsafe {
        match from {
            Some(IpAddr::V4(a)) => {
                let space = libc::CMSG_SPACE(mem::size_of::<libc::in_pktinfo>() as u32);
                assert!(space as usize <= control.0.len());
                msg.msg_control = control.0.as_mut_ptr().cast();
                msg.msg_controllen = space as _;
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::IPPROTO_IP;
                (*cmsg).cmsg_type = libc::IP_PKTINFO;
                (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<libc::in_pktinfo>() as u32) as _;
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(a).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
            }
            Some(IpAddr::V6(a)) => {
                let space = libc::CMSG_SPACE(mem::size_of::<libc::in6_pktinfo>() as u32);
                assert!(space as usize <= control.0.len());
                msg.msg_control = control.0.as_mut_ptr().cast();
                msg.msg_controllen = space as _;
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::IPPROTO_IPV6;
                (*cmsg).cmsg_type = libc::IPV6_PKTINFO;
                (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<libc::in6_pktinfo>() as u32) as _;
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: a.octets(),
                    },
                    ipi6_ifindex: ifindex,
                };
                ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
            }
            None => {}
        }
    }
    // SAFETY: every pointer in `msg` points at a live buffer of the stated size.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn sockaddr_to_std(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a: libc::sockaddr_in =
                unsafe { ptr::read_unaligned((storage as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a: libc::sockaddr_in6 =
                unsafe { ptr::read_unaligned((storage as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_and_found_again() {
        let a = Token::fresh();
        let b = Token::fresh();
        assert_ne!(a, b);
        let mut payload = b"junk before ".to_vec();
        payload.extend_from_slice(&a.to_bytes());
        payload.extend_from_slice(b" and after");
        assert_eq!(Token::find(&payload), Some(a));
        assert_eq!(a.to_bytes().len(), TOKEN_LEN);
        assert_eq!(Token::find(b"cage-probe:12"), None);
        assert_eq!(Token::find(b"nothing here"), None);
    }

    #[test]
    fn verdicts() {
        assert_eq!(Verdict::of(&Outcome::Answered, true), Verdict::Delivered);
        assert_eq!(Verdict::of(&Outcome::TimedOut, false), Verdict::Blocked);
        assert_eq!(
            Verdict::of(&Outcome::Refused("x".into()), false),
            Verdict::Blocked
        );
        assert_eq!(Verdict::of(&Outcome::TimedOut, true), Verdict::Leaked);
        assert_eq!(
            Verdict::of(&Outcome::Answered, false),
            Verdict::Inconsistent
        );
    }

    fn ipv4_tcp(flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0];
        p.extend_from_slice(&[192, 168, 10, 11, 203, 0, 113, 10]);
        p.extend_from_slice(&[0x9c, 0x40, 0, 80, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, flags]);
        p.extend_from_slice(&[0; 6]);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn parses_ipv4_tcp_and_matches_attempts() {
        let now = Instant::now();
        let token = Token::fresh();
        let syn = parse_ipv4(&ipv4_tcp(TCP_SYN, b""), now).unwrap();
        assert_eq!(syn.src, "192.168.10.11".parse::<IpAddr>().unwrap());
        assert_eq!(syn.dst, "203.0.113.10".parse::<IpAddr>().unwrap());
        assert_eq!((syn.src_port, syn.dst_port), (40000, 80));
        assert!(syn.is_syn());
        let data = parse_ipv4(&ipv4_tcp(TCP_ACK, &token.to_bytes()), now).unwrap();
        assert_eq!(data.token, Some(token));
        assert!(!data.is_syn());

        let mut attempt = Attempt {
            probe: Probe::tcp("203.0.113.10".parse().unwrap(), 80),
            token,
            local: None,
            started: now,
            finished: now,
            outcome: Outcome::TimedOut,
        };
        assert!(syn.belongs_to(&attempt) && data.belongs_to(&attempt));
        let stray_ack = parse_ipv4(&ipv4_tcp(TCP_ACK, b""), now).unwrap();
        assert!(!stray_ack.belongs_to(&attempt));
        attempt.probe.port = 443;
        assert!(!syn.belongs_to(&attempt));
        attempt.probe.port = 80;
        attempt.token = Token::fresh();
        assert!(!data.belongs_to(&attempt), "another probe's data");
    }

    #[test]
    fn icmpv6_link_chatter_is_not_recorded() {
        let src: IpAddr = "fe80::1".parse().unwrap();
        let dst: IpAddr = "ff02::1".parse().unwrap();
        let now = Instant::now();
        assert!(parse_l4(Proto::Icmp, src, dst, &[135, 0, 0, 0, 0, 0, 0, 0], now).is_none());
        let echo = parse_l4(Proto::Icmp, src, dst, &[128, 0, 0, 0, 0, 7, 0, 1], now).unwrap();
        assert!(echo.is_echo_request());
        assert_eq!(echo.src_port, 7);
    }
}
