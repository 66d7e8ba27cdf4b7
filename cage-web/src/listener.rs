//! The page's TCP listener, bounded: at most [`MAX_CONNECTIONS`] open at once and each
//! for at most [`LIFETIME`]. The page lives in the `cage run` process, so a client on the
//! LAN that opens connections without end (or keeps them open, sending a byte a minute)
//! must not use up the daemon's file descriptors; past the limit, new connections wait
//! in the kernel's backlog. Browsers reopen a closed keep-alive connection by themselves.
//! One listener may accept on several sockets (the LAN's IPv4 and IPv6 addresses), with
//! one limit for all of them. With TLS (`cage run`'s page), each connection is a
//! [`tls::Stream`](crate::tls::Stream): TLS or a plain-HTTP client to redirect, told
//! apart by its first byte, the handshake done on the connection's own task.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

use crate::tls::{SchemeCell, Stream, TlsAcceptor};

pub const MAX_CONNECTIONS: usize = 64;
pub const LIFETIME: Duration = Duration::from_secs(120);

pub struct Bounded {
    inner: Vec<TcpListener>,
    slots: Arc<Semaphore>,
    tls: Option<TlsAcceptor>,
}

impl Bounded {
    /// Accept on every one of `inner` (at least one), plain HTTP.
    pub fn new(inner: Vec<TcpListener>) -> Bounded {
        assert!(!inner.is_empty(), "a listener needs a socket to accept on");
        Bounded {
            inner,
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            tls: None,
        }
    }

    /// Accept on every one of `inner`, HTTPS with `tls` (plain HTTP only redirected).
    pub fn with_tls(inner: Vec<TcpListener>, tls: TlsAcceptor) -> Bounded {
        Bounded {
            tls: Some(tls),
            ..Bounded::new(inner)
        }
    }
}

/// A connection that holds a slot and ends at its deadline.
pub struct Conn {
    stream: Stream,
    deadline: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl Conn {
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the connection's time is up")
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(timed_out()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(timed_out()));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Listener for Bounded {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        loop {
            // The semaphore is never closed, so this always gives a slot.
            let Ok(slot) = self.slots.clone().acquire_owned().await else {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            // Whichever socket has a connection first; accept is cancel-safe, so the
            // others lose nothing.
            let accepts = self.inner.iter().map(|l| Box::pin(l.accept()));
            let (accepted, _, _) = futures::future::select_all(accepts).await;
            match accepted {
                Ok((stream, addr)) => {
                    return (
                        Conn {
                            stream: Stream::new(stream, self.tls.clone()),
                            deadline: Box::pin(tokio::time::sleep(LIFETIME)),
                            _slot: slot,
                        },
                        addr,
                    )
                }
                // Out of file descriptors, or a connection reset before it was taken:
                // wait a moment rather than spin (as axum's own TcpListener does).
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner[0].local_addr()
    }
}

/// The client's address and its connection's scheme (known once its first byte came,
/// before any request), as handlers see them (`ConnectInfo<Peer>`).
#[derive(Debug, Clone)]
pub struct Peer(pub SocketAddr, pub SchemeCell);

impl Connected<IncomingStream<'_, Bounded>> for Peer {
    fn connect_info(stream: IncomingStream<'_, Bounded>) -> Peer {
        Peer(*stream.remote_addr(), stream.io().stream.scheme())
    }
}
