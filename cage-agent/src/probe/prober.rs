//! Probers: one probe (a TCP connection, a UDP datagram or an ICMP echo request) made
//! from a namespace, and how it ended.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use socket2::{Protocol, SockAddr, Socket, Type};

use super::netns::write_sysctl;
use super::witness::{ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST};
use super::{Family, NetNs, ProbeError, Proto, Token};

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
            // A signal handler ran on this thread: a read with SO_RCVTIMEO is never
            // restarted (signal(7)), so read again until the deadline.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
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
