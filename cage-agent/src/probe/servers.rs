//! Echo servers that answer the probes a policy lets through; they judge nothing.

use std::fmt;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
// portable-atomic: 32-bit MIPS (the GL-MT300N) has no native 64-bit atomics.
use portable_atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Protocol, Socket, Type};

use super::netns::Background;
use super::sys::{poll, poll_set, recv_msg, send_msg_from, setsockopt_int};
use super::witness::{MAX_READS_PER_ROUND, POLL_MS};
use super::{Family, NetNs, ProbeError, Proto};

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
    thread: Background,
    taken: Vec<(Family, Service)>,
}

#[derive(Default)]
struct ServerShared {
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
        let work_shared = shared.clone();
        let ns_name = ns.name().to_owned();
        let services = services.to_vec();
        let (thread, taken) = Background::start(
            ns,
            "servers",
            "servers ",
            move || open_server_sockets(&ns_name, &services),
            move |sockets, stop| {
                serve(&sockets, &work_shared, stop, max_duration);
                Ok(())
            },
        )?;
        Ok(Servers {
            shared,
            thread,
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
        self.thread.stop()
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

fn serve(
    sockets: &[(Family, Proto, Socket)],
    shared: &Arc<ServerShared>,
    stop: &AtomicBool,
    max: Duration,
) {
    let deadline = Instant::now() + max;
    let mut fds = poll_set(sockets.iter().map(|(_, _, s)| s));
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
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
