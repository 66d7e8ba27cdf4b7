//! Socket plumbing that socket2 does not cover.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};
use std::{mem, ptr};

use socket2::{SockAddr, Socket};

pub(super) fn setsockopt_int(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
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

/// One `pollfd` per socket, waiting for something to read.
pub(super) fn poll_set<'a>(sockets: impl Iterator<Item = &'a Socket>) -> Vec<libc::pollfd> {
    sockets
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect()
}

pub(super) fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
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
pub(super) struct Message {
    pub len: usize,
    pub src: Option<SocketAddr>,
    pub dst: Option<IpAddr>,
    pub ifindex: u32,
}

/// Room for one `in_pktinfo` or `in6_pktinfo` control message, aligned for cmsghdr.
#[repr(C, align(8))]
struct ControlBuf([u8; 128]);

/// Non-blocking read of one datagram; `None` when nothing is queued.
pub(super) fn recv_msg(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<Message>> {
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
pub(super) fn send_msg_from(
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
    // SAFETY: `msg` is the message sent below and `control` its buffer, both alive until
    // it is sent.
    unsafe {
        match from {
            Some(IpAddr::V4(a)) => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(a).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                put_cmsg(
                    &mut msg,
                    &mut control,
                    libc::IPPROTO_IP,
                    libc::IP_PKTINFO,
                    info,
                );
            }
            Some(IpAddr::V6(a)) => {
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: a.octets(),
                    },
                    ipi6_ifindex: ifindex,
                };
                put_cmsg(
                    &mut msg,
                    &mut control,
                    libc::IPPROTO_IPV6,
                    libc::IPV6_PKTINFO,
                    info,
                );
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

/// Make `data` the one control message of `msg` (`level`, `kind`: e.g. `IPPROTO_IP`,
/// `IP_PKTINFO`), built in `control`, which must be large enough (checked).
///
/// # Safety
///
/// `control` must outlive every use of `msg` that reads its control message.
unsafe fn put_cmsg<T>(
    msg: &mut libc::msghdr,
    control: &mut ControlBuf,
    level: libc::c_int,
    kind: libc::c_int,
    data: T,
) {
    let space = libc::CMSG_SPACE(mem::size_of::<T>() as u32);
    assert!(space as usize <= control.0.len());
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer is set and holds CMSG_SPACE(T) bytes, so the first
    // header and its data lie inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(msg);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<T>() as u32) as _;
        ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), data);
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
