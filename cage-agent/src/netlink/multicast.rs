//! Listening to a netlink multicast group: the kernel's own notifications of a change
//! (links, addresses, routes and neighbours over rtnetlink; Cage's tables over
//! nfnetlink), so `cage run` reacts when something changes instead of reading everything
//! every few seconds.

use std::io;

use netlink_sys::{Socket, SocketAddr};
use tokio::io::unix::AsyncFd;

/// The header in front of every netlink message.
const NLMSG_HDRLEN: usize = 16;
/// What the kernel answers when a listener's queue overflowed and it dropped messages.
const ENOBUFS: i32 = 105;

/// A socket that belongs to some multicast groups of one netlink protocol.
pub struct Subscription {
    fd: AsyncFd<Socket>,
    buf: Vec<u8>,
}

impl Subscription {
    /// Join `groups` (numbers, not masks) of `protocol` (`NETLINK_ROUTE`, …).
    pub fn open(protocol: isize, groups: &[u32]) -> io::Result<Subscription> {
        let mut socket = Socket::new(protocol)?;
        socket.bind(&SocketAddr::new(0, 0))?;
        for &g in groups {
            socket.add_membership(g)?;
        }
        socket.set_non_blocking(true)?;
        // A replace of Cage's tables is one message per object: room for a burst. The
        // kernel caps it at net.core.rmem_max; an overflow is noticed all the same.
        let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(1 << 20);
        // SAFETY: the socket owns its descriptor and closes it only when dropped, which
        // is when the AsyncFd that owns the socket is dropped.
        let fd = unsafe { AsyncFd::register(socket) }?;
        Ok(Subscription {
            fd,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Wait for notifications, then hand each message queued by now to `each` (its type and
    /// what follows the netlink header). `Ok(true)` when the kernel dropped some because
    /// the queue was full: the listener has missed changes and must read the state again.
    pub async fn next(&mut self, mut each: impl FnMut(u16, &[u8])) -> io::Result<bool> {
        let Subscription { fd, buf } = self;
        loop {
            let mut ready = fd.readable_mut().await?;
            let (mut got, mut overrun) = (false, false);
            loop {
                match ready.get_inner_mut().recv(&mut &mut buf[..], 0) {
                    Ok(n) => {
                        got = true;
                        for (kind, payload) in messages(&buf[..n]) {
                            each(kind, payload);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready.clear_ready();
                        break;
                    }
                    Err(e) if e.raw_os_error() == Some(ENOBUFS) => overrun = true,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if got || overrun {
                return Ok(overrun);
            }
        }
    }
}

/// The messages of one datagram: each one's type and payload. A truncated message ends
/// the walk.
pub fn messages(datagram: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let header = datagram.get(at..at + NLMSG_HDRLEN)?;
        let len = u32::from_ne_bytes(header[0..4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes([header[4], header[5]]);
        if len < NLMSG_HDRLEN || at + len > datagram.len() {
            return None;
        }
        let payload = &datagram[at + NLMSG_HDRLEN..at + len];
        at += len.next_multiple_of(4);
        Some((kind, payload))
    })
}

/// The attributes that follow a fixed header: each one's type (without the nested and
/// byte-order flags) and value.
pub fn attributes(body: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let header = body.get(at..at + 4)?;
        let len = usize::from(u16::from_ne_bytes([header[0], header[1]]));
        let kind = u16::from_ne_bytes([header[2], header[3]]) & 0x3fff;
        if len < 4 || at + len > body.len() {
            return None;
        }
        let value = &body[at + 4..at + len];
        at += len.next_multiple_of(4);
        Some((kind, value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(payload);
        m.resize(m.len().next_multiple_of(4), 0);
        m
    }

    #[test]
    fn a_datagram_is_walked_message_by_message_and_a_truncated_one_ends_it() {
        let mut d = message(16, &[1, 2, 3]);
        d.extend(message(28, &[9; 8]));
        let seen: Vec<_> = messages(&d).map(|(k, p)| (k, p.to_vec())).collect();
        assert_eq!(seen, vec![(16, vec![1, 2, 3]), (28, vec![9; 8])]);
        // The second message cut short: only the first is read.
        let cut = &d[..d.len() - 2];
        assert_eq!(messages(cut).count(), 1);
        // A length below the header's size is garbage, not a loop.
        let mut bad = message(16, &[]);
        bad[0..4].copy_from_slice(&4u32.to_ne_bytes());
        assert_eq!(messages(&bad).count(), 0);
    }

    #[test]
    fn attributes_lose_their_flags_and_stop_at_a_bad_length() {
        let mut body = Vec::new();
        for (kind, value) in [(1u16 | 0x8000, &b"cage\0"[..]), (2, &b"isolated\0"[..])] {
            body.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
            body.extend_from_slice(&kind.to_ne_bytes());
            body.extend_from_slice(value);
            body.resize(body.len().next_multiple_of(4), 0);
        }
        let seen: Vec<_> = attributes(&body).collect();
        assert_eq!(seen, vec![(1, &b"cage\0"[..]), (2, &b"isolated\0"[..])]);
        body[0] = 200;
        assert_eq!(attributes(&body).count(), 0);
    }
}
