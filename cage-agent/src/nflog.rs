//! The only module that reads NFLOG: the packets Cage's policy denied, as the kernel hands
//! them over (group `policy::LOG_GROUP`, first `policy::LOG_SNAPLEN` bytes, the rule that
//! denied them as the log prefix).
//!
//! A reader thread binds the group, parses each packet's IP and transport headers into a
//! [`Denied`] and hands it to the collector over a bounded channel. Nothing is lost
//! silently: a full socket buffer (the kernel reports ENOBUFS), a full channel and an
//! unparsable packet are each counted in [`NflogStats`].

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
// portable-atomic: 32-bit MIPS (the GL-MT300N) has no native 64-bit atomics.
use portable_atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::nflog::{
    config_request, ConfigCmd, ConfigMode, ConfigNla, PacketNla, Timeout, ULogMessage,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::{constants::NETLINK_NETFILTER, Socket};
use serde::Serialize;

/// One denied packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub at: SystemTime,
    /// The rule that denied it (`deny:lan`, …): the log prefix.
    pub rule: String,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, …).
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// TCP/UDP ports; for ICMP the type as `dport`.
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    /// The source MAC address, when the packet came in over Ethernet.
    pub mac: Option<[u8; 6]>,
    /// The interface it came in on: for the bridge table's denies the bridge port (for
    /// the inet table's, the bridge itself).
    pub indev: Option<u32>,
    /// The IP packet's length.
    pub len: u32,
}

/// What the reader saw and what it could not pass on.
#[derive(Debug, Default)]
pub struct NflogStats {
    pub received: AtomicU64,
    /// Times the kernel dropped log messages because the socket buffer was full.
    pub overruns: AtomicU64,
    /// Packets dropped because the collector did not keep up.
    pub channel_full: AtomicU64,
    pub unparsable: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct NflogCounts {
    pub received: u64,
    pub overruns: u64,
    pub channel_full: u64,
    pub unparsable: u64,
}

impl NflogStats {
    pub fn snapshot(&self) -> NflogCounts {
        NflogCounts {
            received: self.received.load(Ordering::Relaxed),
            overruns: self.overruns.load(Ordering::Relaxed),
            channel_full: self.channel_full.load(Ordering::Relaxed),
            unparsable: self.unparsable.load(Ordering::Relaxed),
        }
    }
}

/// Socket receive buffer: room for a burst of several thousand small log messages.
const RCVBUF: usize = 4 << 20;

/// How long the kernel holds a logged packet before handing it over, at most.
pub const FLUSH_TIMEOUT: Duration = Duration::from_millis(100);

fn configure(socket: &Socket, group: u16, nlas: Vec<ConfigNla>) -> io::Result<()> {
    let msg = config_request(NetfilterProtoFamily::Unspec, group, nlas);
    let mut buf = vec![0; msg.header.length as usize];
    msg.serialize(&mut buf[..]);
    socket.send(&buf, 0)?;
    let mut rx = vec![0; 4096];
    let n = socket.recv(&mut &mut rx[..], 0)?;
    let reply = <NetlinkMessage<NetfilterMessage>>::deserialize(&rx[..n])
        .map_err(|e| io::Error::other(format!("NFLOG configuration reply: {e}")))?;
    match reply.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
        },
        _ => Ok(()),
    }
}

/// Bind NFLOG `group` and return the socket, ready to receive.
pub fn open(group: u16) -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.set_rx_buf_sz(RCVBUF)?;
    configure(
        &socket,
        group,
        vec![
            ConfigCmd::Bind.into(),
            ConfigMode::new_packet(crate::policy::LOG_SNAPLEN).into(),
            // The kernel batches log messages until this many are queued or the flush
            // timeout passes (defaults: 100 and 1 s); a short timeout keeps batches
            // (cheap) and the delay small.
            ConfigNla::QThresh(64),
            Timeout::from(FLUSH_TIMEOUT).into(),
        ],
    )?;
    // Read without blocking: the reader waits in poll(2), for a message or for its stop.
    socket.set_non_blocking(true)?;
    Ok(socket)
}

/// Tells the reader thread to stop, and wakes it from its wait for the socket: it sleeps
/// until a message or this, never on a timer.
pub struct Stopper {
    stop: Arc<AtomicBool>,
    /// The write end of a pipe whose read end the reader polls next to the socket.
    wake: std::os::fd::OwnedFd,
}

impl Stopper {
    pub fn stop(&self) {
        use std::os::fd::AsRawFd;
        self.stop.store(true, Ordering::Relaxed);
        // SAFETY: one byte from a live buffer to a descriptor this owns.
        unsafe { libc::write(self.wake.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    }
}

/// A pipe: (read end, write end), closed on exec.
fn pipe() -> io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array, which this then owns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors from pipe2, owned by nothing else.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

/// Wait until `socket` has something to read; `false` once `stop` says so (or poll fails
/// for good).
fn wait_readable(socket: &Socket, stop_r: &std::os::fd::OwnedFd, stop: &AtomicBool) -> bool {
    use std::os::fd::AsRawFd;
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let mut fds = [
            libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop_r.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two initialised pollfd structs, their count given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            crate::log::error(&format!("NFLOG reader stopped: {e}"));
            return false;
        }
        if fds[1].revents != 0 {
            return false;
        }
        if fds[0].revents != 0 {
            return true;
        }
    }
}

/// Read `socket` on a thread of its own until told to stop (the [`Stopper`]), sending
/// each denied packet to `tx` and calling `sent` after each message that brought some.
pub fn spawn_reader(
    socket: Socket,
    tx: SyncSender<Denied>,
    stats: Arc<NflogStats>,
    sent: impl Fn() + Send + 'static,
) -> io::Result<(JoinHandle<()>, Stopper)> {
    let stop = Arc::new(AtomicBool::new(false));
    let (stop_r, wake) = pipe()?;
    let stopper = Stopper {
        stop: stop.clone(),
        wake,
    };
    let handle = std::thread::Builder::new()
        .name("nflog".into())
        .spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            while wait_readable(&socket, &stop_r, &stop) {
                // Everything queued, then wait again.
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let n = match socket.recv(&mut &mut buf[..], 0) {
                        Ok(n) => n,
                        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                            stats.overruns.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            crate::log::error(&format!("NFLOG reader stopped: {e}"));
                            return;
                        }
                    };
                    let mut offset = 0;
                    let mut any = false;
                    while offset < n {
                        let Ok(msg) =
                            <NetlinkMessage<NetfilterMessage>>::deserialize(&buf[offset..n])
                        else {
                            stats.unparsable.fetch_add(1, Ordering::Relaxed);
                            break;
                        };
                        let len = msg.header.length as usize;
                        if let NetlinkPayload::InnerMessage(NetfilterMessage {
                            inner: NetfilterMessageInner::ULog(ULogMessage::Packet(nlas)),
                            ..
                        }) = &msg.payload
                        {
                            stats.received.fetch_add(1, Ordering::Relaxed);
                            match parse(nlas) {
                                Some(d) => match tx.try_send(d) {
                                    Ok(()) => any = true,
                                    Err(TrySendError::Full(_)) => {
                                        stats.channel_full.fetch_add(1, Ordering::Relaxed);
                                    }
                                    Err(TrySendError::Disconnected(_)) => return,
                                },
                                None => {
                                    stats.unparsable.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        if len == 0 {
                            break;
                        }
                        offset += (len + 3) & !3;
                    }
                    if any {
                        sent();
                    }
                }
            }
        })?;
    Ok((handle, stopper))
}

/// A logged packet's attributes → a [`Denied`], from the IP header on.
pub fn parse(nlas: &[PacketNla]) -> Option<Denied> {
    let mut rule = String::new();
    let mut payload: Option<&[u8]> = None;
    let mut mac = None;
    let (mut indev, mut physindev) = (None, None);
    for nla in nlas {
        match nla {
            PacketNla::IfIndexInDev(i) => indev = Some(*i),
            PacketNla::IfIndexPhysInDev(i) => physindev = Some(*i),
            PacketNla::Prefix(p) => rule = p.to_string_lossy().into_owned(),
            PacketNla::Payload(p) => payload = Some(p),
            PacketNla::HwHeader(h) if h.len() >= 12 => {
                let mut m = [0u8; 6];
                m.copy_from_slice(&h[6..12]);
                mac = Some(m);
            }
            _ => {}
        }
    }
    let payload = payload?;
    if let Some((src, dst)) = arp(payload) {
        return Some(Denied {
            at: SystemTime::now(),
            rule,
            proto: PROTO_ARP,
            src: src.into(),
            dst: dst.into(),
            sport: None,
            dport: None,
            mac,
            indev: physindev.or(indev),
            len: payload.len() as u32,
        });
    }
    let (proto, src, dst, len, l4) = ip_header(payload)?;
    let (sport, dport) = match proto {
        6 | 17 if l4.len() >= 4 => (
            Some(u16::from_be_bytes([l4[0], l4[1]])),
            Some(u16::from_be_bytes([l4[2], l4[3]])),
        ),
        1 | 58 if !l4.is_empty() => (None, Some(u16::from(l4[0]))),
        _ => (None, None),
    };
    Some(Denied {
        at: SystemTime::now(),
        rule,
        proto,
        src,
        dst,
        sport,
        dport,
        mac,
        indev: physindev.or(indev),
        len,
    })
}

/// The protocol number a denied ARP packet is recorded with (the bridge table denies
/// ARP that claims someone else's address): 255, which IANA keeps reserved, so it is no
/// IP protocol a packet can carry.
pub const PROTO_ARP: u8 = 255;

/// An ARP packet for IPv4 over Ethernet: (sender address, target address).
fn arp(p: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if p.len() < 28 || p[..6] != [0, 1, 8, 0, 6, 4] {
        return None;
    }
    Some((
        Ipv4Addr::new(p[14], p[15], p[16], p[17]),
        Ipv4Addr::new(p[24], p[25], p[26], p[27]),
    ))
}

/// (protocol, source, destination, packet length, transport header onward).
fn ip_header(p: &[u8]) -> Option<(u8, IpAddr, IpAddr, u32, &[u8])> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let len = u32::from(u16::from_be_bytes([p[2], p[3]]));
            let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
            let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            Some((
                p[9],
                src.into(),
                dst.into(),
                len,
                p.get(ihl..).unwrap_or(&[]),
            ))
        }
        6 if p.len() >= 40 => {
            let len = 40 + u32::from(u16::from_be_bytes([p[4], p[5]]));
            let src: [u8; 16] = p[8..24].try_into().ok()?;
            let dst: [u8; 16] = p[24..40].try_into().ok()?;
            // Extension headers are not followed: the next-header value is reported.
            Some((
                p[6],
                Ipv6Addr::from(src).into(),
                Ipv6Addr::from(dst).into(),
                len,
                &p[40..],
            ))
        }
        _ => None,
    }
}

/// How long the collector waits for the reader to wind down.
pub const STOP_WAIT: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    #[test]
    fn parses_a_logged_tcp_syn() {
        let mut ip = vec![0x45, 0, 0, 60, 0, 0, 0x40, 0, 64, 6, 0, 0];
        ip.extend([192, 168, 10, 11, 192, 168, 8, 10]);
        ip.extend([0xa4, 0x10, 0, 22, 0, 0, 0, 0]);
        let mut hw = vec![0xff; 6];
        hw.extend([2, 0xca, 0x9e, 0, 0, 0x11, 8, 0]);
        let d = parse(&[
            PacketNla::Prefix(CString::new("deny:lan").unwrap()),
            PacketNla::HwHeader(hw),
            PacketNla::Payload(ip),
        ])
        .unwrap();
        assert_eq!(d.rule, "deny:lan");
        assert_eq!(d.proto, 6);
        assert_eq!(d.src, "192.168.10.11".parse::<IpAddr>().unwrap());
        assert_eq!(d.dst, "192.168.8.10".parse::<IpAddr>().unwrap());
        assert_eq!((d.sport, d.dport), (Some(42000), Some(22)));
        assert_eq!(d.mac, Some([2, 0xca, 0x9e, 0, 0, 0x11]));
        assert_eq!(d.len, 60);
    }

    #[test]
    fn parses_a_logged_arp_claim() {
        // A reply: 192.168.10.12 is at 02:ca:9e:00:00:11 (someone else's address).
        let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 2];
        arp.extend([2, 0xca, 0x9e, 0, 0, 0x11, 192, 168, 10, 12]);
        arp.extend([2, 0, 0, 0, 0, 1, 192, 168, 10, 1]);
        let mut hw = vec![0xff; 6];
        hw.extend([2, 0xca, 0x9e, 0, 0, 0x11, 8, 6]);
        let d = parse(&[
            PacketNla::Prefix(CString::new("deny:addr-theft").unwrap()),
            PacketNla::IfIndexInDev(7),
            PacketNla::HwHeader(hw),
            PacketNla::Payload(arp),
        ])
        .unwrap();
        assert_eq!(d.proto, PROTO_ARP);
        assert_eq!(d.src, "192.168.10.12".parse::<IpAddr>().unwrap());
        assert_eq!(d.dst, "192.168.10.1".parse::<IpAddr>().unwrap());
        assert_eq!(d.mac, Some([2, 0xca, 0x9e, 0, 0, 0x11]));
        assert_eq!(d.indev, Some(7), "the port it came in on");
        assert_eq!(crate::flows::proto_name(d.proto), "arp");
    }

    #[test]
    fn garbage_is_not_a_packet() {
        for p in [vec![], vec![0x45; 10], vec![0x60; 39], vec![0x15; 60]] {
            assert!(parse(&[PacketNla::Payload(p)]).is_none());
        }
        assert!(parse(&[]).is_none());
    }
}
