//! DNS in the lab: a small authoritative server for the internet namespace, a stub
//! resolver for the caged hosts, and TCP listeners that note which of their addresses
//! were connected to. All of it runs on threads inside the lab's namespaces and stops
//! when dropped.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cage_agent::probe::{Background, NetNs, ProbeError};
use portable_atomic::AtomicU64;
use simple_dns::rdata::{RData, A, AAAA, CNAME};
use simple_dns::{
    Name, Packet, PacketFlag, Question, ResourceRecord, CLASS, QCLASS, QTYPE, RCODE, TYPE,
};

/// What a zone says about one name.
#[derive(Debug, Clone)]
pub enum Answer {
    Addrs(Vec<IpAddr>),
    Cname(String),
}

/// An authoritative DNS server on UDP and TCP at the given addresses. Every name
/// of `zone` is answered with its records (a CNAME is followed within the zone), others
/// with NXDOMAIN. Counts the queries it got. Stops when dropped.
pub struct AuthServer {
    queries: Arc<AtomicU64>,
    _threads: Vec<Background>,
}

impl AuthServer {
    /// Bound on every address when it returns, so the server is up when `start` is.
    pub fn start(
        ns: &NetNs,
        addrs: &[SocketAddr],
        zone: HashMap<String, Answer>,
        ttl: u32,
    ) -> Result<AuthServer, ProbeError> {
        let queries = Arc::new(AtomicU64::new(0));
        let zone = Arc::new(zone);
        let mut threads = Vec::new();
        for &sa in addrs {
            let (q, z) = (queries.clone(), zone.clone());
            let udp = server(
                ns,
                "dns-udp",
                "binding UDP",
                sa,
                UdpSocket::bind,
                move |sock, stop| {
                    sock.set_read_timeout(Some(Duration::from_millis(100))).ok();
                    let mut buf = [0u8; 4096];
                    while !stop.load(Ordering::Relaxed) {
                        let Ok((n, from)) = sock.recv_from(&mut buf) else {
                            continue;
                        };
                        q.fetch_add(1, Ordering::Relaxed);
                        if let Some(r) = respond(&buf[..n], &z, ttl) {
                            let _ = sock.send_to(&r, from);
                        }
                    }
                },
            )?;
            threads.push(udp);
            let (q, z) = (queries.clone(), zone.clone());
            let tcp = server(
                ns,
                "dns-tcp",
                "binding TCP",
                sa,
                TcpListener::bind,
                move |l, stop| {
                    l.set_nonblocking(true).ok();
                    while !stop.load(Ordering::Relaxed) {
                        let Ok((mut c, _)) = l.accept() else {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        };
                        c.set_nonblocking(false).ok();
                        c.set_read_timeout(Some(Duration::from_secs(2))).ok();
                        while let Some(msg) = read_framed(&mut c) {
                            q.fetch_add(1, Ordering::Relaxed);
                            match respond(&msg, &z, ttl) {
                                Some(r) => {
                                    if write_framed(&mut c, &r).is_err() {
                                        break;
                                    }
                                }
                                None => break,
                            }
                        }
                    }
                },
            )?;
            threads.push(tcp);
        }
        Ok(AuthServer {
            queries,
            _threads: threads,
        })
    }

    /// Queries received so far (UDP and TCP).
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }
}

/// A server thread in `ns` (named `thread`): `bind` on `sa`, done when this returns (an
/// error says `op` and the address), then `serve` with what it bound until stopped.
fn server<S: 'static>(
    ns: &NetNs,
    thread: &str,
    op: &'static str,
    sa: SocketAddr,
    bind: impl FnOnce(SocketAddr) -> std::io::Result<S> + Send + 'static,
    serve: impl FnOnce(S, &AtomicBool) + Send + 'static,
) -> Result<Background, ProbeError> {
    let name = ns.name().to_owned();
    let (background, ()) = Background::start(
        ns,
        thread,
        &format!("{thread} on {sa} "),
        move || {
            let bound = bind(sa).map_err(|source| ProbeError::Io {
                ns: name,
                op: format!("{op} {sa}"),
                source,
            })?;
            Ok((bound, ()))
        },
        move |bound, stop| {
            serve(bound, stop);
            Ok(())
        },
    )?;
    Ok(background)
}

fn read_framed(c: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    c.read_exact(&mut len).ok()?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    c.read_exact(&mut msg).ok()?;
    Some(msg)
}

fn write_framed(c: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let mut out = (msg.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(msg);
    c.write_all(&out)
}

fn respond(query: &[u8], zone: &HashMap<String, Answer>, ttl: u32) -> Option<Vec<u8>> {
    let q = Packet::parse(query).ok()?;
    let question = q.questions.first()?;
    let mut r = Packet::new_reply(q.id());
    r.set_flags(PacketFlag::AUTHORITATIVE_ANSWER);
    r.questions.push(question.clone());
    // The name and the CNAMEs that lead from it, within the zone.
    let mut chain = Vec::new();
    let mut n = question.qname.to_string().to_ascii_lowercase();
    for _ in 0..8 {
        match zone.get(&n) {
            Some(Answer::Cname(t)) => {
                chain.push((n.clone(), None, Some(t.clone())));
                n = t.clone();
            }
            Some(Answer::Addrs(a)) => {
                chain.push((n.clone(), Some(a.clone()), None));
                break;
            }
            None => break,
        }
    }
    let qtype = question.qtype;
    for (owner, addrs, target) in &chain {
        let owner = Name::new_unchecked(owner);
        if let Some(t) = target {
            r.answers.push(ResourceRecord::new(
                owner.clone(),
                CLASS::IN,
                ttl,
                RData::CNAME(CNAME(Name::new_unchecked(t))),
            ));
        }
        for a in addrs.iter().flatten() {
            let rd = match (a, qtype) {
                (IpAddr::V4(v4), QTYPE::TYPE(TYPE::A)) => RData::A(A::from(*v4)),
                (IpAddr::V6(v6), QTYPE::TYPE(TYPE::AAAA)) => RData::AAAA(AAAA::from(*v6)),
                _ => continue,
            };
            r.answers
                .push(ResourceRecord::new(owner.clone(), CLASS::IN, ttl, rd));
        }
    }
    if chain.is_empty() {
        *r.rcode_mut() = RCODE::NameError;
    }
    r.build_bytes_vec_compressed().ok()
}

/// What a stub resolver got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub rcode: RCODE,
    pub addrs: Vec<IpAddr>,
}

/// Ask `server` (port 53 unless given) for `name`'s A (`v6` false) or AAAA records, from
/// a thread in `ns`, over UDP or TCP. `Err` when nothing answered within `timeout`.
pub fn resolve(
    ns: &NetNs,
    server: SocketAddr,
    name: &str,
    v6: bool,
    tcp: bool,
    timeout: Duration,
) -> Result<Resolved, String> {
    let name = name.to_owned();
    ns.run("stub-resolver", move || {
        Ok(resolve_here(server, &name, v6, tcp, timeout))
    })
    .map_err(|e| e.to_string())?
}

/// [`resolve`] in the calling thread's namespace.
pub fn resolve_here(
    server: SocketAddr,
    name: &str,
    v6: bool,
    tcp: bool,
    timeout: Duration,
) -> Result<Resolved, String> {
    let id: u16 = (Instant::now().elapsed().subsec_nanos() as u16) ^ 0x5a5a ^ (name.len() as u16);
    let mut q = Packet::new_query(id);
    q.set_flags(PacketFlag::RECURSION_DESIRED);
    let qname = Name::new(name).map_err(|e| format!("bad name {name}: {e}"))?;
    q.questions.push(Question::new(
        qname,
        QTYPE::TYPE(if v6 { TYPE::AAAA } else { TYPE::A }),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    let bytes = q.build_bytes_vec().map_err(|e| e.to_string())?;
    let answer = if tcp {
        let mut c = TcpStream::connect_timeout(&server, timeout)
            .map_err(|e| format!("tcp {server}: {e}"))?;
        c.set_read_timeout(Some(timeout)).ok();
        write_framed(&mut c, &bytes).map_err(|e| e.to_string())?;
        read_framed(&mut c).ok_or_else(|| format!("no answer over TCP from {server}"))?
    } else {
        let local: SocketAddr = if server.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let s = UdpSocket::bind(local).map_err(|e| e.to_string())?;
        s.connect(server).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(timeout)).ok();
        s.send(&bytes).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + timeout;
        loop {
            let n = s
                .recv(&mut buf)
                .map_err(|e| format!("no answer over UDP from {server}: {e}"))?;
            if n >= 2 && buf[..2] == id.to_be_bytes() {
                break buf[..n].to_vec();
            }
            if Instant::now() > deadline {
                return Err(format!("no matching answer from {server}"));
            }
        }
    };
    let p = Packet::parse(&answer).map_err(|e| format!("unparsable answer: {e}"))?;
    let addrs = p
        .answers
        .iter()
        .filter_map(|rr| match &rr.rdata {
            RData::A(a) => Some(IpAddr::V4(Ipv4Addr::from(a.address))),
            RData::AAAA(a) => Some(IpAddr::V6(Ipv6Addr::from(a.address))),
            _ => None,
        })
        .collect();
    Ok(Resolved {
        rcode: p.rcode(),
        addrs,
    })
}

/// TCP listeners on a port of every address of a namespace (IPv4 and IPv6 wildcards),
/// noting the local address of every connection accepted: which destination a
/// connection really reached. Stop when dropped.
pub struct Listeners {
    accepted: Arc<Mutex<Vec<SocketAddr>>>,
    _threads: Vec<Background>,
}

impl Listeners {
    pub fn start(ns: &NetNs, ports: &[u16]) -> Result<Listeners, ProbeError> {
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for &port in ports {
            for any in [
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            ] {
                let acc = accepted.clone();
                let sa = SocketAddr::new(any, port);
                let listener = server(
                    ns,
                    "listener",
                    "listening on",
                    sa,
                    listen,
                    move |l, stop| {
                        while !stop.load(Ordering::Relaxed) {
                            match l.accept() {
                                Ok((c, _)) => {
                                    if let Ok(local) = c.local_addr() {
                                        acc.lock().unwrap().push(local);
                                    }
                                }
                                Err(_) => std::thread::sleep(Duration::from_millis(5)),
                            }
                        }
                    },
                )?;
                threads.push(listener);
            }
        }
        Ok(Listeners {
            accepted,
            _threads: threads,
        })
    }

    /// Whether a connection to `addr` was accepted (waiting up to a second for the
    /// listener's thread to take it).
    pub fn reached(&self, addr: SocketAddr) -> bool {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            if self.accepted.lock().unwrap().contains(&addr) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A non-blocking TCP listener on `sa` (IPv6 only for an IPv6 address, so that the
/// IPv4 wildcard can have the same port).
fn listen(sa: SocketAddr) -> std::io::Result<TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(sa),
        socket2::Type::STREAM,
        None,
    )?;
    if sa.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.bind(&sa.into())?;
    s.listen(64)?;
    s.set_nonblocking(true)?;
    Ok(TcpListener::from(s))
}

/// Connect from a thread in `ns` to `dst` (at most `timeout`): whether it connected.
pub fn connects(ns: &NetNs, dst: SocketAddr, timeout: Duration) -> bool {
    ns.run("connect", move || {
        Ok(TcpStream::connect_timeout(&dst, timeout).is_ok())
    })
    .unwrap_or(false)
}
