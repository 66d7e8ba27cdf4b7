//! The connection to the collector: UDP (RFC 5426, one message a datagram), TCP with
//! octet counting (RFC 6587 §3.4.1) or TLS (RFC 5425: the same framing inside TLS 1.3,
//! rustls with ring, the collector's certificate checked against `syslog_ca` and
//! `syslog_name` or its address). Blocking sockets with timeouts, used only on the
//! exporter's own thread.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use super::format::octet_counted;
use crate::config::{SyslogExport, SyslogTransport};

/// How long a connection attempt (TCP and the TLS handshake each) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one message may take to be written before the connection is given up.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot read syslog_ca {path}: {err}")]
    CaFile { path: String, err: String },
    #[error("syslog_ca {0} holds no certificate")]
    NoCa(String),
    #[error("syslog_name {0:?} is not a DNS name")]
    Name(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{what} {addr}: {err}")]
    Io {
        what: &'static str,
        addr: SocketAddr,
        err: io::Error,
    },
}

/// What connecting needs, prepared once per configuration: the TLS client's settings
/// with the collector's CA, and the name its certificate must carry.
pub struct Target {
    pub cfg: SyslogExport,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

impl Target {
    pub fn new(cfg: &SyslogExport) -> Result<Target, TransportError> {
        let tls = match cfg.transport {
            SyslogTransport::Tls => Some(tls_client(cfg)?),
            _ => None,
        };
        Ok(Target {
            cfg: cfg.clone(),
            tls,
        })
    }

    pub fn connect(&self) -> Result<Conn, TransportError> {
        let addr = self.cfg.server;
        let io = |what, err| TransportError::Io { what, addr, err };
        match self.cfg.transport {
            SyslogTransport::Udp => {
                let local: SocketAddr = if addr.is_ipv4() {
                    (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let s = UdpSocket::bind(local).map_err(|e| io("UDP socket for", e))?;
                s.connect(addr).map_err(|e| io("UDP connect to", e))?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
                    .map_err(|e| io("UDP socket for", e))?;
                Ok(Conn::Udp(s))
            }
            SyslogTransport::Tcp => Ok(Conn::Tcp(tcp(addr).map_err(|e| io("connect to", e))?)),
            SyslogTransport::Tls => {
                let (config, name) = self.tls.clone().expect("a TLS target has its client");
                let mut sock = tcp(addr).map_err(|e| io("connect to", e))?;
                let mut conn = ClientConnection::new(config, name)
                    .map_err(|e| TransportError::Tls(e.to_string()))?;
                // The handshake now, so a collector whose certificate is refused is an
                // error of the connection, not of a later message.
                sock.set_read_timeout(Some(CONNECT_TIMEOUT))
                    .map_err(|e| io("connect to", e))?;
                while conn.is_handshaking() {
                    conn.complete_io(&mut sock)
                        .map_err(|e| TransportError::Tls(format!("handshake with {addr}: {e}")))?;
                }
                Ok(Conn::Tls(Box::new(StreamOwned::new(conn, sock))))
            }
        }
    }
}

fn tcp(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    s.set_write_timeout(Some(WRITE_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// rustls's client: TLS 1.3 only (what the page's server side links, no TLS 1.2 code),
/// ring's primitives, the collector's certificate checked against the CA of `syslog_ca`
/// only (no system roots) for `syslog_name`, or for the collector's address when no name
/// is given.
fn tls_client(
    cfg: &SyslogExport,
) -> Result<(Arc<ClientConfig>, ServerName<'static>), TransportError> {
    let path = cfg.ca_file.clone().unwrap_or_default();
    let shown = path.display().to_string();
    let bytes = std::fs::read(&path).map_err(|e| TransportError::CaFile {
        path: shown.clone(),
        err: e.to_string(),
    })?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        let cert = cert.map_err(|e| TransportError::CaFile {
            path: shown.clone(),
            err: e.to_string(),
        })?;
        roots.add(cert).map_err(|e| TransportError::CaFile {
            path: shown.clone(),
            err: e.to_string(),
        })?;
    }
    if roots.is_empty() {
        return Err(TransportError::NoCa(shown));
    }
    // Deprecated only for ring's lack of a post-quantum key exchange; the page's server
    // uses the same provider, for the same reasons (cage-web's `tls::identity`).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = match &cfg.server_name {
        Some(n) => ServerName::try_from(n.clone()).map_err(|_| TransportError::Name(n.clone()))?,
        None => ServerName::IpAddress(cfg.server.ip().into()),
    };
    Ok((Arc::new(config), name))
}

/// An open connection to the collector.
pub enum Conn {
    Udp(UdpSocket),
    Tcp(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Conn {
    /// Send one message: a datagram of its own over UDP, octet-counted over TCP and TLS.
    pub fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        match self {
            Conn::Udp(s) => s.send(msg).map(|_| ()),
            Conn::Tcp(s) => s.write_all(&octet_counted(msg)),
            Conn::Tls(s) => {
                s.write_all(&octet_counted(msg))?;
                s.flush()
            }
        }
    }

    /// Whether a stream is still open as far as can be told without blocking: a syslog
    /// collector never sends, so something to read is its end of the stream (or, over
    /// TLS, a session ticket or close_notify, which rustls reads here). Asked before
    /// each message so that a collector that went away costs no message written into a
    /// closed connection. UDP is connectionless: always open.
    pub fn open(&mut self) -> bool {
        match self {
            Conn::Udp(_) => true,
            Conn::Tcp(s) => {
                if s.set_nonblocking(true).is_err() {
                    return false;
                }
                let mut b = [0u8; 64];
                let open = match s.peek(&mut b) {
                    Err(e) => e.kind() == io::ErrorKind::WouldBlock,
                    Ok(0) => false,
                    // Nothing a collector should send; drained so it does not hide an
                    // end of stream behind it.
                    Ok(_) => s.read(&mut b).is_ok_and(|n| n > 0),
                };
                s.set_nonblocking(false).is_ok() && open
            }
            Conn::Tls(s) => {
                if s.sock.set_nonblocking(true).is_err() {
                    return false;
                }
                let open = loop {
                    match s.conn.read_tls(&mut s.sock) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
                        Err(_) | Ok(0) => break false,
                        Ok(_) => {
                            let Ok(state) = s.conn.process_new_packets() else {
                                break false;
                            };
                            if state.peer_has_closed() {
                                break false;
                            }
                            let mut sink = vec![0u8; state.plaintext_bytes_to_read()];
                            let _ = s.conn.reader().read(&mut sink);
                        }
                    }
                };
                s.sock.set_nonblocking(false).is_ok() && open
            }
        }
    }
}
