//! Flow counts, exact: known traffic from a caged host to the internet host, and the
//! records `cage flows` writes for it, packet for packet and byte for byte (L3 bytes,
//! as Cage counts them). UDP and ICMP are counted from what was sent (every datagram and
//! echo is answered); TCP from a capture on the caged host's own interface, since the
//! kernel decides the segments.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cage_agent::probe::{NetNs, NsThread, Servers, Service};

use crate::lab::{Node, AI1_4, AI1_6, AI1_MAC, PUBLIC4, PUBLIC6};

use super::caged::Caged;
use super::row;

/// One kind of flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Udp4,
    Udp6,
    Tcp4,
    Tcp6,
    Icmp4,
    Icmp6,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Udp4,
        Kind::Udp6,
        Kind::Tcp4,
        Kind::Tcp6,
        Kind::Icmp4,
        Kind::Icmp6,
    ];

    fn label(self) -> &'static str {
        match self {
            Kind::Udp4 => "UDP over IPv4",
            Kind::Udp6 => "UDP over IPv6",
            Kind::Tcp4 => "TCP over IPv4",
            Kind::Tcp6 => "TCP over IPv6",
            Kind::Icmp4 => "ICMP echo over IPv4",
            Kind::Icmp6 => "ICMPv6 echo over IPv6",
        }
    }

    fn v6(self) -> bool {
        matches!(self, Kind::Udp6 | Kind::Tcp6 | Kind::Icmp6)
    }

    fn proto(self) -> &'static str {
        match self {
            Kind::Udp4 | Kind::Udp6 => "udp",
            Kind::Tcp4 | Kind::Tcp6 => "tcp",
            Kind::Icmp4 => "icmp",
            Kind::Icmp6 => "icmpv6",
        }
    }

    fn addrs(self) -> (IpAddr, IpAddr) {
        if self.v6() {
            (AI1_6, PUBLIC6)
        } else {
            (AI1_4, PUBLIC4)
        }
    }
}

/// (packets out, bytes out, packets in, bytes in)
pub type Counts = (u64, u64, u64, u64);

/// The UDP and TCP echo ports on the internet host.
const UDP_PORT: u16 = 7000;
const TCP_PORT: u16 = 7001;
/// ICMP echo identifiers of these flows (one flow per identifier).
const ICMP_ID: u16 = 0x4367;
const ECHOES: u16 = 4;
const ECHO_PAYLOAD: usize = 56;

/// What was sent for one kind: the caged host's port (None for ICMP) and the counts the
/// flow log must show.
struct Sent {
    kind: Kind,
    port: Option<u16>,
    expected: Counts,
}

/// Send each kind's traffic, then check each record; one row per kind.
pub fn exact(c: &Caged, section: &str, kinds: &[Kind]) {
    let servers = match Servers::start(
        &c.lab.netns(Node::Inet),
        &[Service::udp(UDP_PORT), Service::tcp(TCP_PORT)],
        Duration::from_secs(300),
    ) {
        Ok(s) => s,
        Err(e) => {
            row(section, "echo servers", false, "-", e);
            return;
        }
    };
    let ai1 = c.lab.netns(Node::Ai1);
    let mut sent = Vec::new();
    for &kind in kinds {
        match send(&ai1, kind) {
            Ok(s) => sent.push(s),
            Err(e) => {
                row(
                    section,
                    &format!("flow {}", kind.label()),
                    false,
                    "-",
                    format!("sending: {e}"),
                );
            }
        }
    }
    drop(servers);

    // Idle after IDLE_TIMEOUT, written at the next flush: wait until every record is
    // there (bounded).
    let deadline = Instant::now() + Duration::from_secs(60);
    let records = loop {
        let recs = allowed(c);
        let all = sent.iter().all(|s| !matching(&recs, s).is_empty());
        if all || Instant::now() > deadline {
            break recs;
        }
        std::thread::sleep(Duration::from_millis(1000));
    };
    for s in &sent {
        let m = matching(&records, s);
        let got: Vec<Counts> = m.iter().map(|r| counts(r)).collect();
        let mac_ok = m.iter().all(|r| r["mac"] == AI1_MAC);
        let ok = got.len() == 1 && got[0] == s.expected && mac_ok;
        row(
            section,
            &format!("flow {} counted exactly", s.kind.label()),
            ok,
            fmt_counts(s.expected),
            if ok {
                "the flow log's one record equals what went over the wire".to_owned()
            } else {
                format!(
                    "expected one record {}, got {} record(s): {}",
                    fmt_counts(s.expected),
                    got.len(),
                    m.iter()
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            },
        );
    }
}

fn fmt_counts(c: Counts) -> String {
    format!("{} pkts/{} B out, {}/{} in", c.0, c.1, c.2, c.3)
}

fn counts(r: &serde_json::Value) -> Counts {
    let n = |f: &str| r[f].as_u64().unwrap_or(u64::MAX);
    (
        n("packets_out"),
        n("bytes_out"),
        n("packets_in"),
        n("bytes_in"),
    )
}

/// The allowed flows in the flow log.
fn allowed(c: &Caged) -> Vec<serde_json::Value> {
    let out = c
        .lab
        .cage(&["flows", "--json", "-n", "0", "--verdict", "allowed"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn matching<'a>(recs: &'a [serde_json::Value], s: &Sent) -> Vec<&'a serde_json::Value> {
    let (host, peer) = s.kind.addrs();
    recs.iter()
        .filter(|r| {
            r["proto"] == s.kind.proto()
                && r["host"] == host.to_string()
                && r["peer"] == peer.to_string()
                && match s.port {
                    Some(p) => r["host_port"] == p,
                    None => true,
                }
        })
        .collect()
}

fn send(ai1: &NetNs, kind: Kind) -> Result<Sent, String> {
    let (src, dst) = kind.addrs();
    let l3 = if kind.v6() { 40 } else { 20 };
    let sent = match kind {
        Kind::Udp4 | Kind::Udp6 => {
            let (n, size) = if kind.v6() {
                (3u64, 1000usize)
            } else {
                (5, 100)
            };
            let port = ai1
                .run("udp", move || {
                    let s = std::net::UdpSocket::bind((src, 0)).map_err(io)?;
                    s.set_read_timeout(Some(Duration::from_secs(5)))
                        .map_err(io)?;
                    for i in 0..n {
                        s.send_to(&vec![i as u8; size], (dst, UDP_PORT))
                            .map_err(io)?;
                        let mut b = [0u8; 2000];
                        let (got, _) = s.recv_from(&mut b).map_err(io)?;
                        assert_eq!(got, size, "echo of datagram {i}");
                    }
                    Ok(s.local_addr().map_err(io)?.port())
                })
                .map_err(|e| e.to_string())?;
            let b = n * (l3 + 8 + size as u64);
            Sent {
                kind,
                port: Some(port),
                expected: (n, b, n, b),
            }
        }
        Kind::Icmp4 | Kind::Icmp6 => {
            ai1.run("icmp", move || echo(src, dst))
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let n = u64::from(ECHOES);
            let b = n * (l3 + 8 + ECHO_PAYLOAD as u64);
            Sent {
                kind,
                port: None,
                expected: (n, b, n, b),
            }
        }
        Kind::Tcp4 | Kind::Tcp6 => {
            let cap = Capture::start(ai1, "eth0", src, dst)?;
            let port = ai1
                .run("tcp", move || {
                    let domain = if src.is_ipv6() {
                        socket2::Domain::IPV6
                    } else {
                        socket2::Domain::IPV4
                    };
                    let sock =
                        socket2::Socket::new(domain, socket2::Type::STREAM, None).map_err(io)?;
                    sock.bind(&SocketAddr::new(src, 0).into()).map_err(io)?;
                    sock.connect_timeout(
                        &SocketAddr::new(dst, TCP_PORT).into(),
                        Duration::from_secs(5),
                    )
                    .map_err(io)?;
                    let mut s: std::net::TcpStream = sock.into();
                    // One small write (the echo server answers it and closes), so that
                    // every packet on the wire is one the capture sees as such.
                    s.write_all(&[7u8; 500]).map_err(io)?;
                    let mut back = Vec::new();
                    s.set_read_timeout(Some(Duration::from_secs(5)))
                        .map_err(io)?;
                    let _ = s.read_to_end(&mut back);
                    Ok(s.local_addr().map_err(io)?.port())
                })
                .map_err(|e| e.to_string())?;
            let frames = cap.finish()?;
            let mut t = (0, 0, 0, 0);
            for (out, len) in frames {
                if out {
                    t.0 += 1;
                    t.1 += u64::from(len);
                } else {
                    t.2 += 1;
                    t.3 += u64::from(len);
                }
            }
            if t.0 < 3 {
                return Err(format!("the capture saw only {t:?}"));
            }
            Sent {
                kind,
                port: Some(port),
                expected: t,
            }
        }
    };
    Ok(sent)
}

fn io(e: std::io::Error) -> cage_agent::probe::ProbeError {
    cage_agent::probe::ProbeError::Io {
        ns: "ai1".into(),
        op: "flow traffic".into(),
        source: e,
    }
}

/// [`ECHOES`] echo requests with identifier [`ICMP_ID`] from `src` to `dst` over a raw
/// socket, each answered.
fn echo(src: IpAddr, dst: IpAddr) -> Result<Result<(), String>, cage_agent::probe::ProbeError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let v6 = dst.is_ipv6();
    let (domain, proto) = if v6 {
        (Domain::IPV6, Protocol::ICMPV6)
    } else {
        (Domain::IPV4, Protocol::ICMPV4)
    };
    let s = Socket::new(domain, Type::RAW, Some(proto)).map_err(io)?;
    s.bind(&SocketAddr::new(src, 0).into()).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(io)?;
    for seq in 0..ECHOES {
        let mut pkt = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
        pkt.extend_from_slice(&ICMP_ID.to_be_bytes());
        pkt.extend_from_slice(&seq.to_be_bytes());
        pkt.extend(std::iter::repeat_n(0x5a, ECHO_PAYLOAD));
        if !v6 {
            // The kernel fills in ICMPv6's checksum, not ICMP's.
            let sum = checksum(&pkt);
            pkt[2..4].copy_from_slice(&sum.to_be_bytes());
        }
        s.send_to(&pkt, &SocketAddr::new(dst, 0).into())
            .map_err(io)?;
        let until = Instant::now() + Duration::from_secs(5);
        let answered = loop {
            if Instant::now() > until {
                break false;
            }
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
            let Ok(n) = s.recv(&mut buf) else { continue };
            // SAFETY: recv initialised the first n bytes.
            let b: Vec<u8> = buf[..n]
                .iter()
                .map(|x| unsafe { x.assume_init() })
                .collect();
            // An IPv4 raw socket gives the IP header too.
            let icmp = if v6 {
                &b[..]
            } else {
                &b[(usize::from(b[0] & 0x0f) * 4).min(b.len())..]
            };
            let reply = if v6 { 129 } else { 0 };
            if icmp.len() >= 8
                && icmp[0] == reply
                && icmp[4..6] == ICMP_ID.to_be_bytes()
                && icmp[6..8] == seq.to_be_bytes()
            {
                break true;
            }
        };
        if !answered {
            return Ok(Err(format!("echo {seq} to {dst} not answered")));
        }
    }
    Ok(Ok(()))
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The IP packets of one flow (between `a` and `b`, either way) on one interface of a
/// namespace, from a packet socket: (from `a`?, IP length) each.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: NsThread<Vec<(bool, u32)>>,
}

impl Capture {
    pub fn start(
        ns: &NetNs,
        ifname: &'static str,
        a: IpAddr,
        b: IpAddr,
    ) -> Result<Capture, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = ns
            .spawn("capture", move || {
                // SAFETY: plain socket calls on a descriptor this thread owns.
                let fd = unsafe {
                    libc::socket(
                        libc::AF_PACKET,
                        libc::SOCK_DGRAM,
                        i32::from((libc::ETH_P_ALL as u16).to_be()),
                    )
                };
                assert!(
                    fd >= 0,
                    "packet socket: {}",
                    std::io::Error::last_os_error()
                );
                let name = std::ffi::CString::new(ifname).expect("no NUL");
                // SAFETY: a NUL-terminated name.
                let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
                // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
                let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
                sll.sll_ifindex = index as i32;
                // SAFETY: bind with the sockaddr_ll above and its size.
                let rc = unsafe {
                    libc::bind(
                        fd,
                        &sll as *const _ as *const libc::sockaddr,
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    )
                };
                assert_eq!(rc, 0, "bind packet socket");
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 50_000,
                };
                // SAFETY: SO_RCVTIMEO with a timeval.
                unsafe {
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_RCVTIMEO,
                        &tv as *const _ as *const libc::c_void,
                        std::mem::size_of::<libc::timeval>() as u32,
                    )
                };
                let _ = ready_tx.send(());
                let mut seen = Vec::new();
                let mut buf = vec![0u8; 65536];
                let start = Instant::now();
                while !flag.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(120) {
                    // SAFETY: recv into a buffer of that length.
                    let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut _, buf.len(), 0) };
                    if n <= 0 {
                        continue;
                    }
                    let p = &buf[..n as usize];
                    let (src, dst, len): (IpAddr, IpAddr, u32) = match p[0] >> 4 {
                        4 if p.len() >= 20 => (
                            std::net::Ipv4Addr::new(p[12], p[13], p[14], p[15]).into(),
                            std::net::Ipv4Addr::new(p[16], p[17], p[18], p[19]).into(),
                            u32::from(u16::from_be_bytes([p[2], p[3]])),
                        ),
                        6 if p.len() >= 40 => (
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&p[8..24]).expect("16"))
                                .into(),
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&p[24..40]).expect("16"))
                                .into(),
                            40 + u32::from(u16::from_be_bytes([p[4], p[5]])),
                        ),
                        _ => continue,
                    };
                    if (src, dst) == (a, b) || (src, dst) == (b, a) {
                        seen.push((src == a, len));
                    }
                }
                // SAFETY: closing our own descriptor.
                unsafe { libc::close(fd) };
                Ok(seen)
            })
            .map_err(|e| e.to_string())?;
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| "the capture did not start".to_owned())?;
        Ok(Capture { stop, thread })
    }

    pub fn finish(self) -> Result<Vec<(bool, u32)>, String> {
        std::thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|e| e.to_string())
    }
}
