//! Kernel tests of `cage_agent::ebpf`: Cage's TC program on a real bridge, with real
//! packets, both attach paths.
//!
//! Needs root (network namespaces, BPF); run as anyone else it fails, loudly. Each test
//! builds its own little network in three namespaces and removes it when it ends, failed
//! or not:
//!
//! ```text
//!   host (caged)            router                          server
//!   eth0 10.77.0.2 ──veth── p1 ─[br0 10.77.0.1] wan0 10.78.0.1 ──veth── eth0 10.78.0.2
//!        fd77::2                     fd77::1        fd78::1                fd78::2
//! ```
//!
//! The program sits on br0, so traffic between host and server crosses its ingress
//! (host → router) and its egress (router → host). Pins go to a directory of the test's
//! own under /sys/fs/bpf/cage-test (bpffs is global, not per namespace); the guard
//! detaches and unpins.
//!
//! Expected figures are computed, not read off the program: UDP and ICMP from the sizes
//! sent (every packet is one IP packet of known length), TCP from a packet capture on the
//! host's interface and the kernel's own TCP segment counters (`TCP_INFO`).

use std::io::{Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use cage_agent::ebpf::{self, AttachMode, HookState, Maps, Options};
use cage_agent::probe::{NetNs, NetNsGuard};
use cage_common::{FlowKey, FlowValue, FAMILY_IPV4, FAMILY_IPV6};

const HOST4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const SERVER4: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
const HOST6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0xfd78, 0, 0, 0, 0, 0, 0, 2);
/// The host and the server it talks to, over IPv4 and over IPv6: what each exchange is
/// measured on.
const HOST_SERVER: [(IpAddr, IpAddr); 2] = [
    (IpAddr::V4(HOST4), IpAddr::V4(SERVER4)),
    (IpAddr::V6(HOST6), IpAddr::V6(SERVER6)),
];

// ---- the little network ---------------------------------------------------------------

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip -n NS ARGS…` (ARGS split at spaces), which must succeed.
fn ip(ns: &str, args: &str) -> String {
    let mut all = vec!["ip", "-n", ns];
    all.extend(args.split_whitespace());
    sh(&all)
}

/// `sysctl -w KEY=VALUE` in `ns`, which must succeed.
fn sysctl(ns: &str, setting: &str) {
    sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", setting]);
}

/// Run `f` on a thread that has entered network namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let ns = NetNs::named(ns);
    thread::spawn(move || {
        ns.enter_this_thread().unwrap_or_else(|e| panic!("{e}"));
        f()
    })
}

fn join<T>(h: JoinHandle<T>) -> T {
    h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// The three namespaces and the pin directory; all removed on drop.
struct Net {
    router: String,
    host: String,
    server: String,
    pin_dir: PathBuf,
    /// Dropped after `Net::drop` has detached the program from the router's bridge.
    _namespaces: Vec<NetNsGuard>,
}

impl Net {
    fn new(tag: &str) -> Net {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the eBPF tests load BPF programs and create network namespaces: run them as root \
             (euid is {euid}); they do not skip"
        );
        let pid = std::process::id();
        let (router, host, server) = (
            format!("cgt-eb{tag}-r-{pid}"),
            format!("cgt-eb{tag}-h-{pid}"),
            format!("cgt-eb{tag}-s-{pid}"),
        );
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/cage-test/{tag}-{pid}"));
        // What a killed earlier run with this pid pinned (the guards replace its
        // namespaces).
        unpin(&router, &pin_dir);
        let _namespaces = [&router, &host, &server]
            .map(|ns| NetNsGuard::named(ns.as_str()).unwrap_or_else(|e| panic!("{e}")))
            .into();
        let net = Net {
            router,
            host,
            server,
            pin_dir,
            _namespaces,
        };
        let (r, h, s) = (net.router.as_str(), net.host.as_str(), net.server.as_str());
        for ns in [r, h, s] {
            ip(ns, "link set lo up");
            // No router solicitations or DAD: fewer stray packets, addresses usable at once.
            for scope in ["default", "all"] {
                sysctl(ns, &format!("net.ipv6.conf.{scope}.accept_dad=0"));
            }
        }
        sysctl(r, "net.ipv4.ip_forward=1");
        sysctl(r, "net.ipv6.conf.all.forwarding=1");
        ip(
            r,
            &format!("link add p1 type veth peer name eth0 netns {h}"),
        );
        ip(
            r,
            &format!("link add wan0 type veth peer name eth0 netns {s}"),
        );
        net.bridge_up();
        for (ns, cmd) in [
            (r, "addr add 10.78.0.1/24 dev wan0"),
            (r, "addr add fd78::1/64 dev wan0 nodad"),
            (h, "addr add 10.77.0.2/24 dev eth0"),
            (h, "addr add fd77::2/64 dev eth0 nodad"),
            (s, "addr add 10.78.0.2/24 dev eth0"),
            (s, "addr add fd78::2/64 dev eth0 nodad"),
            (r, "link set p1 up"),
            (r, "link set wan0 up"),
            (h, "link set eth0 up"),
            (s, "link set eth0 up"),
            (h, "route add default via 10.77.0.1"),
            (h, "-6 route add default via fd77::1"),
            (s, "route add default via 10.78.0.1"),
            (s, "-6 route add default via fd78::1"),
        ] {
            ip(ns, cmd);
        }
        net
    }

    /// The router's bridge `br0` with `p1` in it, its addresses, up (again, after it was
    /// deleted).
    fn bridge_up(&self) {
        for cmd in [
            "link add br0 type bridge",
            "link set p1 master br0",
            "addr add 10.77.0.1/24 dev br0",
            "addr add fd77::1/64 dev br0 nodad",
            "link set br0 up",
        ] {
            ip(&self.router, cmd);
        }
    }

    fn options(&self, mode: AttachMode) -> Options {
        Options {
            pin_dir: self.pin_dir.clone(),
            flow_entries: 1024,
            mode,
            ..Options::new("br0")
        }
    }

    /// Attach in the router's namespace.
    fn attach(&self, mode: AttachMode) -> ebpf::Attachment {
        let opts = self.options(mode);
        join(in_ns(&self.router, move || ebpf::attach(&opts)))
            .unwrap_or_else(|e| panic!("attach ({mode:?}): {e}"))
    }

    fn maps(&self) -> Maps {
        Maps::open(&self.pin_dir).unwrap_or_else(|e| panic!("open maps: {e}"))
    }

    /// One ping from the host to `dst` (1 s at most): answered?
    fn ping_answered(&self, dst: &str) -> bool {
        Command::new("ip")
            .args([
                "netns", "exec", &self.host, "ping", "-c", "1", "-W", "1", dst,
            ])
            .output()
            .unwrap()
            .status
            .success()
    }

    /// Wait until the path works both ways (neighbour discovery done), so the counted
    /// traffic that follows has no surprises; the warm-up's own flows are not looked at.
    /// A bridge just made takes a moment to forward (its port's state, the host's router
    /// solicitation and neighbour discovery), longer on a loaded machine: a ping a second
    /// for up to 10 s.
    fn warm_up(&self) {
        for dst in ["10.78.0.2", "fd78::2"] {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !self.ping_answered(dst) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{} cannot ping {dst} within 10 s: the little network does not forward",
                    self.host
                );
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        unpin(&self.router, &self.pin_dir);
    }
}

/// Detach Cage's program from the router's `br0` and remove the pins in `pin_dir`, if
/// there are any.
fn unpin(router: &str, pin_dir: &Path) {
    if !pin_dir.exists() {
        return;
    }
    let in_router = Path::new("/run/netns").join(router).exists();
    let pins = pin_dir.to_owned();
    let result = if in_router {
        join(in_ns(router, move || ebpf::detach("br0", &pins)))
    } else {
        ebpf::detach("br0", &pins)
    };
    if let Err(errors) = result {
        for e in errors {
            eprintln!("detach: {e}");
        }
    }
    let _ = std::fs::remove_dir_all(pin_dir);
}

// ---- reading flows ----------------------------------------------------------------------

fn key(
    protocol: u8,
    client: IpAddr,
    client_port: u16,
    server: IpAddr,
    server_port: u16,
) -> FlowKey {
    let mut k = FlowKey {
        protocol,
        client_port,
        server_port,
        ..FlowKey::default()
    };
    match (client, server) {
        (IpAddr::V4(c), IpAddr::V4(s)) => {
            k.family = FAMILY_IPV4;
            k.client_addr[..4].copy_from_slice(&c.octets());
            k.server_addr[..4].copy_from_slice(&s.octets());
        }
        (IpAddr::V6(c), IpAddr::V6(s)) => {
            k.family = FAMILY_IPV6;
            k.client_addr = c.octets();
            k.server_addr = s.octets();
        }
        _ => panic!("mixed families"),
    }
    k
}

fn flow(maps: &Maps, k: &FlowKey) -> FlowValue {
    match maps.flow(k).expect("read the flow map") {
        Some(v) => v,
        None => panic!(
            "no record for {k:?}; the map has: {:#?}",
            maps.flows().expect("read the flow map")
        ),
    }
}

/// (packets, bytes) each way: what the record says, to compare with what was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Counts {
    packets_from_client: u64,
    bytes_from_client: u64,
    packets_to_client: u64,
    bytes_to_client: u64,
}

impl From<FlowValue> for Counts {
    fn from(v: FlowValue) -> Counts {
        Counts {
            packets_from_client: v.packets_from_client,
            bytes_from_client: v.bytes_from_client,
            packets_to_client: v.packets_to_client,
            bytes_to_client: v.bytes_to_client,
        }
    }
}

fn ip_header(addr: IpAddr) -> u64 {
    if addr.is_ipv4() {
        20
    } else {
        40
    }
}

// ---- traffic ----------------------------------------------------------------------------

/// A UDP echo server in `ns` that answers each datagram with one `extra` bytes longer;
/// it stops when `stop` is set. Bound when this returns (a socket stays in the namespace
/// it was made in), so a client may send at once.
fn udp_server(ns: &str, bind: SocketAddr, extra: usize, stop: Arc<AtomicBool>) -> JoinHandle<u64> {
    let sock = join(in_ns(ns, move || {
        UdpSocket::bind(bind).expect("bind the UDP server")
    }));
    thread::spawn(move || {
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut answered = 0;
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let reply = vec![0x5a; n + extra];
                sock.send_to(&reply, from).expect("UDP reply");
                answered += 1;
            }
        }
        answered
    })
}

/// Send datagrams of `sizes` from `ns` to `server`, each answered before the next;
/// returns the client's port.
fn udp_client(ns: &str, server: SocketAddr, sizes: Vec<usize>, extra: usize) -> u16 {
    join(in_ns(ns, move || {
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let sock = UdpSocket::bind(bind).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = vec![0u8; 65536];
        for n in sizes {
            sock.send_to(&vec![0xa5; n], server).unwrap();
            let (got, _) = sock
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("no UDP answer from {server}: {e}"));
            assert_eq!(got, n + extra);
        }
        sock.local_addr().unwrap().port()
    }))
}

// ---- a packet capture on the host's interface ---------------------------------------

/// One captured frame of a TCP flow.
#[derive(Debug, Clone, Copy)]
struct Frame {
    outgoing: bool,
    /// IP total length (the frame's length minus Ethernet; a GSO frame's whole length).
    l3_len: u64,
    /// IP plus TCP header length.
    headers: u64,
}

/// Captures every TCP frame between `port` and anything on `dev` in `ns`, from when it
/// returns until `stop` is set.
fn capture_tcp(
    ns: &str,
    dev: &'static str,
    port: u16,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Vec<Frame>> {
    let ready = Arc::new(AtomicBool::new(false));
    let r = ready.clone();
    let h = in_ns(ns, move || {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let ifname = std::ffi::CString::new(dev).unwrap();
        // SAFETY: valid C string.
        let ifindex = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
        // SAFETY: zeroed sockaddr_ll filled in; bind with its size.
        unsafe {
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex as i32;
            let rc = libc::bind(
                fd.as_raw_fd(),
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(rc, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 20_000,
            };
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            let size: i32 = 8 << 20;
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const size).cast(),
                4,
            );
        }
        r.store(true, Ordering::SeqCst);
        let mut frames = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            // SAFETY: recvfrom into our buffer and sockaddr; MSG_TRUNC returns the
            // frame's real length even though only its headers are copied.
            let (n, pkttype) = unsafe {
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                let n = libc::recvfrom(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                    (&raw mut sll).cast(),
                    &mut len,
                );
                (n, sll.sll_pkttype)
            };
            if n < 0 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                continue;
            }
            let n = n as usize;
            if let Some(f) = parse_tcp_frame(&buf, n, port, pkttype == libc::PACKET_OUTGOING) {
                frames.push(f);
            }
        }
        frames
    });
    while !ready.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(1));
    }
    h
}

fn parse_tcp_frame(buf: &[u8], len: usize, port: u16, outgoing: bool) -> Option<Frame> {
    let ethertype = u16::from_be_bytes([buf[12], buf[13]]);
    let (ip_hdr, proto) = match ethertype {
        0x0800 => (usize::from(buf[14] & 0x0f) * 4, buf[14 + 9]),
        0x86dd => (40, buf[14 + 6]),
        _ => return None,
    };
    if proto != 6 {
        return None;
    }
    let tcp = 14 + ip_hdr;
    let sport = u16::from_be_bytes([buf[tcp], buf[tcp + 1]]);
    let dport = u16::from_be_bytes([buf[tcp + 2], buf[tcp + 3]]);
    if sport != port && dport != port {
        return None;
    }
    let tcp_hdr = usize::from(buf[tcp + 12] >> 4) * 4;
    Some(Frame {
        outgoing,
        l3_len: (len - 14) as u64,
        headers: (ip_hdr + tcp_hdr) as u64,
    })
}

/// `TCP_INFO`'s segment counters of a socket: (segments out, segments in, MSS sent).
fn tcp_segments(s: &TcpStream) -> (u64, u64, u64) {
    // SAFETY: getsockopt into a zeroed tcp_info of the right size.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as u32;
        let rc = libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        );
        assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
        (
            u64::from(info.tcpi_segs_out),
            u64::from(info.tcpi_segs_in),
            u64::from(info.tcpi_snd_mss),
        )
    }
}

/// What a TCP exchange looked like from the host: the capture and TCP_INFO.
struct TcpRun {
    client_port: u16,
    frames: Vec<Frame>,
    segs_out: u64,
    segs_in: u64,
    client_mss: u64,
    server_mss: u64,
}

/// A TCP connection from the host to the server: the host sends each of `requests` and
/// waits for the server's answer of `answer(n)` bytes; then both close. Captured on the
/// host's eth0.
fn tcp_exchange(
    net: &Net,
    server: SocketAddr,
    requests: Vec<usize>,
    answer: fn(usize) -> usize,
) -> TcpRun {
    let listener = join(in_ns(&net.server, move || {
        TcpListener::bind(server).unwrap()
    }));
    let srv = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            // Each request is one message preceded by its length (4 bytes).
            let mut len = [0u8; 4];
            if s.read_exact(&mut len).is_err() {
                break;
            }
            let n = u32::from_be_bytes(len) as usize;
            s.read_exact(&mut buf[..n]).unwrap();
            s.write_all(&vec![0x42; answer(n)]).unwrap();
        }
        let mss = tcp_segments(&s).2;
        s.shutdown(Shutdown::Write).unwrap();
        mss
    });
    let stop = Arc::new(AtomicBool::new(false));
    let cap = capture_tcp(&net.host, "eth0", server.port(), stop.clone());
    let (client_port, segs_out, segs_in, client_mss) = join(in_ns(&net.host, move || {
        let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for n in requests {
            let mut msg = (n as u32).to_be_bytes().to_vec();
            msg.extend(std::iter::repeat_n(0x24, n));
            s.write_all(&msg).unwrap();
            s.read_exact(&mut buf[..answer(n)]).unwrap();
        }
        s.shutdown(Shutdown::Write).unwrap();
        // The server's FIN: read returns 0.
        assert_eq!(s.read(&mut buf).unwrap(), 0);
        // Our ACK of its FIN goes out at once; give it a moment, then count.
        thread::sleep(Duration::from_millis(100));
        let (out, inn, mss) = tcp_segments(&s);
        (s.local_addr().unwrap().port(), out, inn, mss)
    }));
    let server_mss = srv.join().unwrap();
    thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    TcpRun {
        client_port,
        frames: join(cap),
        segs_out,
        segs_in,
        client_mss,
        server_mss,
    }
}

impl TcpRun {
    /// [`TcpRun::expected`], once the capture agrees with the kernel's own segment
    /// counters (`TCP_INFO`): the reference is checked before the program is held to it.
    fn expected_checked(&self) -> Counts {
        let expected = self.expected();
        assert_eq!(
            expected.packets_from_client, self.segs_out,
            "capture against TCP_INFO"
        );
        assert_eq!(
            expected.packets_to_client, self.segs_in,
            "capture against TCP_INFO"
        );
        expected
    }

    /// The counts the capture implies: each frame is ceil(payload / MSS) wire packets
    /// (one for a frame without payload), each with the frame's headers.
    fn expected(&self) -> Counts {
        let mut c = Counts::default();
        for f in &self.frames {
            let payload = f.l3_len - f.headers;
            let mss = if f.outgoing {
                self.client_mss
            } else {
                self.server_mss
            };
            let segs = payload.div_ceil(mss).max(1);
            let bytes = payload + segs * f.headers;
            if f.outgoing {
                c.packets_from_client += segs;
                c.bytes_from_client += bytes;
            } else {
                c.packets_to_client += segs;
                c.bytes_to_client += bytes;
            }
        }
        c
    }

    fn largest_frame(&self) -> u64 {
        self.frames.iter().map(|f| f.l3_len).max().unwrap_or(0)
    }
}

// ---- the tests ---------------------------------------------------------------------------

/// Exact packets and L3 bytes for UDP, ICMP and TCP, IPv4 and IPv6, on one attach path.
fn exact_counts(tag: &str, mode: AttachMode) {
    let net = Net::new(tag);
    let attached = net.attach(mode);
    assert_eq!(attached.mode, mode);
    assert_eq!(
        (attached.ingress, attached.egress),
        (HookState::Attached, HookState::Attached)
    );
    assert_eq!(attached.flow_capacity, 1024);
    net.warm_up();
    let maps = net.maps();
    let mut report = Vec::new();

    // UDP: datagrams of known sizes, each answered 3 bytes longer.
    let stop = Arc::new(AtomicBool::new(false));
    // One dual-stack socket serves both families.
    let server = udp_server(&net.server, "[::]:5001".parse().unwrap(), 3, stop.clone());
    let sizes = vec![1, 100, 1000, 1400, 0, 512, 37];
    for (host, server) in HOST_SERVER {
        let port = udp_client(&net.host, SocketAddr::new(server, 5001), sizes.clone(), 3);
        let h = ip_header(server) + 8;
        let expected = Counts {
            packets_from_client: sizes.len() as u64,
            bytes_from_client: sizes.iter().map(|&n| h + n as u64).sum(),
            packets_to_client: sizes.len() as u64,
            bytes_to_client: sizes.iter().map(|&n| h + n as u64 + 3).sum(),
        };
        let got = flow(&maps, &key(17, host, port, server, 5001));
        assert_eq!(Counts::from(got), expected, "UDP {host} → {server}");
        assert!(got.first_seen_ns <= got.last_seen_ns && got.last_seen_ns <= ebpf::monotonic_ns());
        report.push(format!("udp {server}: {expected:?}"));
    }
    stop.store(true, Ordering::Relaxed);
    assert_eq!(join(server), 2 * sizes.len() as u64, "datagrams answered");

    // ICMP echo: `ping -s 100` four times, each request answered.
    for (host, server) in HOST_SERVER {
        let dst = server.to_string();
        let known: Vec<FlowKey> = maps.flows().unwrap().into_iter().map(|(k, _)| k).collect();
        sh(&[
            "ip", "netns", "exec", &net.host, "ping", "-c", "4", "-i", "0.05", "-s", "100", "-W",
            "2", &dst,
        ]);
        let proto = if server.is_ipv4() { 1 } else { 58 };
        let echoes: Vec<_> = maps
            .flows()
            .unwrap()
            .into_iter()
            .filter(|(k, _)| {
                !known.contains(k)
                    && k.protocol == proto
                    && k.server_ip() == server
                    && k.client_ip() == host
                    && k.server_port == 0
            })
            .collect();
        assert_eq!(
            echoes.len(),
            1,
            "one new echo flow for {server}: {echoes:#?}"
        );
        let per = ip_header(server) + 8 + 100;
        // A new record: ping picks a new identifier each run, so it holds these four only.
        let expected = Counts {
            packets_from_client: 4,
            bytes_from_client: 4 * per,
            packets_to_client: 4,
            bytes_to_client: 4 * per,
        };
        let (k, v) = echoes[0];
        assert_ne!(k.client_port, 0, "the echo identifier is the client port");
        assert_eq!(Counts::from(v), expected, "ICMP echo {host} → {server}");
        report.push(format!("icmp {server}: {expected:?}"));
    }

    // TCP: small requests and answers (each under one MSS, so no GSO), counted against a
    // capture of the host's interface and the host's TCP_INFO.
    for (host, server) in HOST_SERVER {
        let run = tcp_exchange(
            &net,
            SocketAddr::new(server, 5002),
            vec![10, 200, 1000, 1, 700],
            |n| n + 5,
        );
        assert!(
            run.largest_frame() <= 1500,
            "a frame over the MTU means GSO, not wanted here"
        );
        let expected = run.expected_checked();
        let got = flow(&maps, &key(6, host, run.client_port, server, 5002));
        assert_eq!(Counts::from(got), expected, "TCP {host} → {server}");
        // SYN, ACK, PSH, FIN from the client; SYN, ACK, PSH, FIN to it.
        assert_eq!(got.tcp_flags_from_client, 0x1b, "flags from the client");
        assert_eq!(got.tcp_flags_to_client, 0x1b, "flags to the client");
        report.push(format!(
            "tcp {server}: {expected:?} ({} frames)",
            run.frames.len()
        ));
    }

    // The host's MAC on every record it made.
    let mac = host_mac(&net);
    for (k, v) in maps.flows().unwrap() {
        if k.client_ip() == IpAddr::V4(HOST4) || k.client_ip() == IpAddr::V6(HOST6) {
            assert_eq!(v.client_mac, mac, "client MAC of {k:?}");
        }
    }
    let stats = maps.stats().unwrap();
    assert_eq!(stats.flow_update_failed, 0);
    assert_eq!(stats.isolated_dropped, 0);
    assert!(stats.flows_created >= 6, "{stats:?}");
    println!("{mode:?}: exact counts match");
    for line in report {
        println!("  {line}");
    }
    println!("  stats: {stats:?}");
}

fn host_mac(net: &Net) -> [u8; 6] {
    let out = sh(&["ip", "-n", &net.host, "-j", "link", "show", "eth0"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let s = v[0]["address"].as_str().unwrap();
    let mut mac = [0u8; 6];
    for (b, part) in mac.iter_mut().zip(s.split(':')) {
        *b = u8::from_str_radix(part, 16).unwrap();
    }
    mac
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn exact_counts_tcx() {
    exact_counts("tcx", AttachMode::Tcx);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn exact_counts_netlink() {
    exact_counts("nl", AttachMode::Netlink);
}

/// Bulk TCP, where the host's stack hands the veth GSO packets of many segments: the
/// record counts wire packets (the kernel's own segment counters agree) and their bytes.
fn gso(tag: &str, mode: AttachMode) {
    let net = Net::new(tag);
    net.attach(mode);
    net.warm_up();
    let maps = net.maps();
    for (host, server) in HOST_SERVER {
        let run = tcp_exchange(
            &net,
            SocketAddr::new(server, 5003),
            vec![300_000, 50_000, 200_000],
            |n| n / 2,
        );
        assert!(
            run.largest_frame() > 1500,
            "expected GSO frames, the largest was {}",
            run.largest_frame()
        );
        let expected = run.expected_checked();
        let got = flow(&maps, &key(6, host, run.client_port, server, 5003));
        assert_eq!(Counts::from(got), expected, "bulk TCP {host} → {server}");
        println!(
            "{mode:?} GSO {server}: {expected:?}; {} frames captured, largest {} bytes",
            run.frames.len(),
            run.largest_frame()
        );
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn gso_tcx() {
    gso("gtcx", AttachMode::Tcx);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn gso_netlink() {
    gso("gnl", AttachMode::Netlink);
}

/// A stream of numbered UDP datagrams, each carrying its send time (CLOCK_MONOTONIC ns);
/// the receiver keeps the latest send time and a count.
struct Stream {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    latest_sent_ns: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Stream {
    fn start(from_ns: &str, to_ns: &str, to: SocketAddr) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let latest = Arc::new(AtomicU64::new(0));
        let (st, rc, la) = (stop.clone(), received.clone(), latest.clone());
        let bind = SocketAddr::new(
            if to.is_ipv4() {
                Ipv4Addr::UNSPECIFIED.into()
            } else {
                Ipv6Addr::UNSPECIFIED.into()
            },
            to.port(),
        );
        let rx = join(in_ns(to_ns, move || UdpSocket::bind(bind).unwrap()));
        rx.set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        let receiver = thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !st.load(Ordering::Relaxed) {
                if let Ok(n) = rx.recv(&mut buf) {
                    if n >= 8 {
                        let sent = u64::from_be_bytes(buf[..8].try_into().unwrap());
                        la.fetch_max(sent, Ordering::SeqCst);
                        rc.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
        let st = stop.clone();
        let sender = in_ns(from_ns, move || {
            let any = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let tx = UdpSocket::bind(any).unwrap();
            // Bounded: the test stops it within seconds; this is a backstop.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !st.load(Ordering::Relaxed) && Instant::now() < deadline {
                let _ = tx.send_to(&ebpf::monotonic_ns().to_be_bytes(), to);
                thread::sleep(Duration::from_micros(500));
            }
        });
        Stream {
            stop,
            received,
            latest_sent_ns: latest,
            threads: vec![receiver, sender],
        }
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }

    fn latest_sent_ns(&self) -> u64 {
        self.latest_sent_ns.load(Ordering::SeqCst)
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            join(t);
        }
    }
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        thread::sleep(Duration::from_millis(1));
    }
    start.elapsed()
}

/// The isolated flag drops traffic both ways from the next packet on, as the receivers
/// see it, and clearing it lets traffic through again.
fn isolation(tag: &str, mode: AttachMode) {
    let net = Net::new(tag);
    net.attach(mode);
    net.warm_up();
    let mut maps = net.maps();
    assert!(!maps.isolated().unwrap());

    // Host → server (the bridge's ingress) and server → host (its egress), v4 and v6.
    let streams = [
        Stream::start(
            &net.host,
            &net.server,
            SocketAddr::new(SERVER4.into(), 6001),
        ),
        Stream::start(&net.server, &net.host, SocketAddr::new(HOST4.into(), 6002)),
        Stream::start(
            &net.host,
            &net.server,
            SocketAddr::new(SERVER6.into(), 6003),
        ),
        Stream::start(&net.server, &net.host, SocketAddr::new(HOST6.into(), 6004)),
    ];
    for s in &streams {
        wait_for("the stream flows", Duration::from_secs(3), || {
            s.received() > 20
        });
    }

    maps.set_isolated(true).unwrap();
    let isolated_at = ebpf::monotonic_ns();
    assert!(maps.isolated().unwrap());
    // Let what was in flight land: the senders send every 0.5 ms, so 20 ms without an
    // arrival on any stream means the rest is being dropped. Then nothing more may arrive.
    let counts = || streams.iter().map(Stream::received).collect::<Vec<u64>>();
    let (mut last, mut since) = (counts(), Instant::now());
    wait_for("the streams to fall silent", Duration::from_secs(2), || {
        let now = counts();
        if now != last {
            (last, since) = (now, Instant::now());
        }
        since.elapsed() >= Duration::from_millis(20)
    });
    let before: Vec<u64> = counts();
    thread::sleep(Duration::from_millis(500));
    for (s, b) in streams.iter().zip(&before) {
        assert_eq!(s.received(), *b, "a packet arrived while isolated");
        assert!(
            s.latest_sent_ns() <= isolated_at,
            "a packet sent {} µs after the isolated flag was set arrived",
            (s.latest_sent_ns() - isolated_at) / 1000
        );
    }
    let dropped = maps.stats().unwrap().isolated_dropped;
    // Four streams at ~2000 packets/s for half a second, minus scheduling slack.
    assert!(dropped > 1000, "isolated drops counted: {dropped}");
    // A ping gets no answer either.
    assert!(
        !net.ping_answered("10.78.0.2"),
        "ping answered while isolated"
    );

    maps.set_isolated(false).unwrap();
    let mut resumed = Vec::new();
    for (s, b) in streams.iter().zip(&before) {
        resumed.push(wait_for(
            "traffic resumes after release",
            Duration::from_secs(2),
            || s.received() > b + 10,
        ));
    }
    for s in streams {
        s.stop();
    }
    println!(
        "{mode:?}: isolated: nothing arrived for 500 ms on 4 streams (v4/v6, both ways), {dropped} \
         packets dropped by the flag; released: traffic back within {:?}",
        resumed.iter().max().unwrap()
    );
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn isolation_tcx() {
    isolation("itcx", AttachMode::Tcx);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn isolation_netlink() {
    isolation("inl", AttachMode::Netlink);
}

/// Number of bpf filters on br0's hook, as tc sees them.
fn netlink_filters(net: &Net, hook: &str) -> usize {
    let out = sh(&[
        "tc",
        "-n",
        &net.router,
        "filter",
        "show",
        "dev",
        "br0",
        hook,
    ]);
    out.lines()
        // tc prints a line per priority and chain, then one per filter (with its handle).
        .filter(|l| l.contains(" bpf ") && l.contains(" handle "))
        .count()
}

fn tcx_programs(net: &Net) -> (usize, usize) {
    join(in_ns(&net.router, || {
        (
            ebpf::tcx_attached("br0", ebpf::Hook::Ingress)
                .unwrap()
                .len(),
            ebpf::tcx_attached("br0", ebpf::Hook::Egress).unwrap().len(),
        )
    }))
}

/// Send `n` UDP datagrams host → server, each answered, and return the record's packets
/// from the client (0 without a record).
fn count_udp(net: &Net, n: usize) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let srv = udp_server(
        &net.server,
        "0.0.0.0:5009".parse().unwrap(),
        0,
        stop.clone(),
    );
    let port = udp_client(
        &net.host,
        SocketAddr::new(SERVER4.into(), 5009),
        vec![64; n],
        0,
    );
    stop.store(true, Ordering::Relaxed);
    join(srv);
    let k = key(17, HOST4.into(), port, SERVER4.into(), 5009);
    match net.maps().flow(&k).expect("read the flow map") {
        Some(v) => {
            assert_eq!(v.packets_to_client, v.packets_from_client);
            v.packets_from_client
        }
        None => 0,
    }
}

/// A second attach finds the pinned program and changes nothing; switching the mode
/// leaves one attachment; each packet is still counted once.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn reattach_is_idempotent() {
    let net = Net::new("re");
    for mode in [AttachMode::Netlink, AttachMode::Tcx, AttachMode::Netlink] {
        let first = net.attach(mode);
        let again = net.attach(mode);
        assert_eq!(
            (again.ingress, again.egress),
            (HookState::AlreadyAttached, HookState::AlreadyAttached),
            "{mode:?} after {first:?}"
        );
        let expect_nl = usize::from(mode == AttachMode::Netlink);
        let expect_tcx = usize::from(mode == AttachMode::Tcx);
        assert_eq!(
            netlink_filters(&net, "ingress"),
            expect_nl,
            "{mode:?}: netlink filters on ingress"
        );
        assert_eq!(
            netlink_filters(&net, "egress"),
            expect_nl,
            "{mode:?}: netlink filters on egress"
        );
        assert_eq!(
            tcx_programs(&net),
            (expect_tcx, expect_tcx),
            "{mode:?}: TCX programs"
        );
        assert_eq!(
            count_udp(&net, 25),
            25,
            "{mode:?}: each packet counted once"
        );
    }
    println!("attach twice: AlreadyAttached, one filter or link per hook, 25 packets counted as 25 (netlink → TCX → netlink)");
}

/// When the bridge goes away and comes back (netifd restarting the segment), its
/// attachments are gone with it: attaching again attaches anew, once, on the pinned maps.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn reattach_after_the_bridge_is_recreated() {
    let net = Net::new("br");
    for mode in [AttachMode::Tcx, AttachMode::Netlink] {
        net.attach(mode);
        assert_eq!(count_udp(&net, 5), 5, "{mode:?}: before");
        ip(&net.router, "link del br0");
        net.bridge_up();
        net.warm_up();
        assert_eq!(
            count_udp(&net, 5),
            0,
            "{mode:?}: nothing counts on the new bridge yet"
        );
        let again = net.attach(mode);
        assert_eq!(
            (again.ingress, again.egress),
            (HookState::Attached, HookState::Attached),
            "{mode:?}"
        );
        let (nl, tcx) = (
            usize::from(mode == AttachMode::Netlink),
            usize::from(mode == AttachMode::Tcx),
        );
        assert_eq!(netlink_filters(&net, "ingress"), nl);
        assert_eq!(tcx_programs(&net), (tcx, tcx));
        assert_eq!(
            count_udp(&net, 5),
            5,
            "{mode:?}: counted once on the new bridge"
        );
    }
    println!("bridge deleted and made again: attach attaches anew, once (TCX and netlink)");
}

/// Maps, program and attachment outlive the process that attached (a child process
/// here): packets are still counted and the kill switch still drops.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn pinned_state_survives_the_loader() {
    if std::env::var_os("CAGE_EBPF_CHILD_NS").is_some() {
        return child_attaches_and_exits();
    }
    let net = Net::new("pin");
    for mode in [AttachMode::Tcx, AttachMode::Netlink] {
        // This very test, in a child process that only attaches (see above).
        let status = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "pinned_state_survives_the_loader",
                "--include-ignored",
                "--nocapture",
            ])
            .env("CAGE_EBPF_CHILD_NS", &net.router)
            .env("CAGE_EBPF_CHILD_PIN_DIR", &net.pin_dir)
            .env("CAGE_EBPF_CHILD_MODE", format!("{mode:?}"))
            .status()
            .unwrap();
        assert!(status.success(), "the child that attaches failed");
        assert!(ebpf::is_pinned(&net.pin_dir));
        assert_eq!(
            count_udp(&net, 7),
            7,
            "{mode:?}: counted after the loader exited"
        );
        // The kill switch works on the program the child left behind.
        let mut maps = net.maps();
        maps.set_isolated(true).unwrap();
        assert!(
            !net.ping_answered("10.78.0.2"),
            "{mode:?}: ping answered while isolated"
        );
        maps.set_isolated(false).unwrap();
        join(in_ns(&net.router, {
            let pin_dir = net.pin_dir.clone();
            move || ebpf::detach("br0", &pin_dir)
        }))
        .unwrap_or_else(|e| panic!("detach: {e:?}"));
        assert!(!net.pin_dir.exists(), "detach removes the pin directory");
        assert_eq!(netlink_filters(&net, "ingress"), 0);
        assert_eq!(tcx_programs(&net), (0, 0));
    }
    println!("attached by a child process that exited: still counting, still dropping when isolated (TCX and netlink); detach leaves nothing");
}

/// The child process of `pinned_state_survives_the_loader`: attach as told, and exit.
fn child_attaches_and_exits() {
    let (Ok(ns), Ok(pin_dir), Ok(mode)) = (
        std::env::var("CAGE_EBPF_CHILD_NS"),
        std::env::var("CAGE_EBPF_CHILD_PIN_DIR"),
        std::env::var("CAGE_EBPF_CHILD_MODE"),
    ) else {
        panic!("the child is told where to attach by CAGE_EBPF_CHILD_NS, _PIN_DIR and _MODE");
    };
    let mode = match mode.as_str() {
        "Tcx" => AttachMode::Tcx,
        _ => AttachMode::Netlink,
    };
    let opts = Options {
        pin_dir: pin_dir.into(),
        flow_entries: 1024,
        mode,
        ..Options::new("br0")
    };
    join(in_ns(&ns, move || ebpf::attach(&opts))).expect("attach in the child");
}

/// Counters the collector and `cage status` will read: created flows, non-IP frames.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn map_size_and_counters() {
    let net = Net::new("sz");
    let opts = Options {
        flow_entries: 4096,
        ..net.options(AttachMode::Auto)
    };
    let attached = join(in_ns(&net.router, move || ebpf::attach(&opts))).unwrap();
    assert_eq!(attached.flow_capacity, 4096);
    assert_eq!(attached.mode, AttachMode::Auto.resolve());
    net.warm_up();
    let maps = net.maps();
    let stats = maps.stats().unwrap();
    // ARP from the warm-up is not IP; the warm-up's pings made flows.
    assert!(stats.not_ip > 0, "{stats:?}");
    assert_eq!(
        stats.flows_created,
        maps.flows().unwrap().len() as u64,
        "{stats:?}"
    );
    // Removing a record (the collector's job) works and is counted by nobody.
    let mut maps = maps;
    let (k, _) = maps.flows().unwrap()[0];
    maps.remove_flow(&k).unwrap();
    assert!(maps.flow(&k).unwrap().is_none());
}
