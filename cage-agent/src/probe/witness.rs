//! The witness: raw sockets that record every packet delivered locally in a namespace,
//! after the input hook (see the module documentation of `probe`).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
// portable-atomic: 32-bit MIPS (the GL-MT300N) has no native 64-bit atomics.
use portable_atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use std::{fmt, mem};

use socket2::{Protocol, Socket, Type};

use super::netns::Background;
use super::sys::{poll, poll_set, recv_msg, setsockopt_int};
use super::{
    probe_in, Attempt, Family, NetNs, Observation, Probe, ProbeError, Proto, Token, Verdict,
    IN_FLIGHT,
};

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
pub(super) const ICMP_ECHO_REQUEST: u8 = 8;
pub(super) const ICMP_ECHO_REPLY: u8 = 0;
pub(super) const ICMPV6_ECHO_REQUEST: u8 = 128;
pub(super) const ICMPV6_ECHO_REPLY: u8 = 129;

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
    thread: Background,
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
pub(super) const POLL_MS: i32 = 20;
/// Packets read from one socket in one poll round at most.
pub(super) const MAX_READS_PER_ROUND: usize = 4096;

impl Witness {
    /// Open the raw sockets in `ns` and start recording. Returns once the sockets exist,
    /// so every packet delivered after this returns is seen.
    pub fn start(ns: &NetNs, limits: WitnessLimits) -> Result<Witness, ProbeError> {
        let shared = Arc::new(WitnessShared::default());
        let (setup_shared, work_shared) = (shared.clone(), shared.clone());
        let ns_name = ns.name().to_owned();
        let (thread, ()) = Background::start(
            ns,
            "witness",
            "",
            move || {
                let sockets = open_witness_sockets(&ns_name)?;
                setup_shared.running.store(true, Ordering::SeqCst);
                Ok(((sockets, ns_name), ()))
            },
            move |(sockets, ns_name), stop| {
                let result = witness_loop(&sockets, &work_shared, stop, limits);
                work_shared.running.store(false, Ordering::SeqCst);
                if let Err(message) = &result {
                    *work_shared.failed.lock().unwrap() = Some(message.clone());
                }
                result.map_err(|message| ProbeError::Witness {
                    ns: ns_name,
                    message,
                })
            },
        )?;
        Ok(Witness {
            ns: ns.clone(),
            shared,
            thread,
        })
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
        self.thread.stop()?;
        Ok(mem::take(&mut *self.shared.records.lock().unwrap()))
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
    stop: &AtomicBool,
    limits: WitnessLimits,
) -> Result<(), String> {
    let deadline = Instant::now() + limits.max_duration;
    let mut fds = poll_set(sockets.iter().map(|(_, _, s)| s));
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{Attempt, Outcome, Probe, Token};

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
