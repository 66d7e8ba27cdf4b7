//! HTTPS for the page: the certificate and key as the agent read them (PEM or DER, the
//! way uhttpd, GL.iNet's nginx and Cage itself store them) turned into rustls's server
//! configuration, and the connection type that tells TLS from plain HTTP by the first
//! byte the client sends.
//!
//! One port serves both: a TLS ClientHello starts with the handshake record type 0x16,
//! which no HTTP request does (a request starts with a method's letter). A plain HTTP
//! request is answered by [`only_https`] with a redirect to the same address over HTTPS
//! and nothing else, so an owner who types `http://192.168.8.1:2243/` lands on the page,
//! and the session cookie (which is `Secure`) never crosses the LAN in clear.
//!
//! This module reads no file: the agent hands it bytes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};

use axum::extract::{ConnectInfo, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::crypto::{ring as provider, CryptoProvider};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
};
use tokio_rustls::rustls::ServerConfig;
pub use tokio_rustls::TlsAcceptor;

use crate::listener::Peer;

/// The first byte of a TLS record that carries a handshake message (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// A certificate and its key, ready to serve, with what the owner checks it by.
#[derive(Clone)]
pub struct Identity {
    pub config: Arc<ServerConfig>,
    /// SHA-256 of the certificate (DER), `AB:CD:…` as browsers and `openssl x509
    /// -fingerprint -sha256` show it.
    pub fingerprint: String,
    /// SHA-256 of the certificate's public key (SubjectPublicKeyInfo), base64: what
    /// `curl --pinnedpubkey sha256//…` and Chromium's
    /// `--ignore-certificate-errors-spki-list` take.
    pub spki_sha256: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .field("spki_sha256", &self.spki_sha256)
            .finish()
    }
}

/// Why a certificate or key cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    #[error("the certificate is not a PEM or DER X.509 certificate: {0}")]
    Cert(String),
    #[error(
        "the key is not a PEM or DER private key (PKCS#8, SEC1 or PKCS#1) that TLS can use: {0}"
    )]
    Key(String),
    #[error("the key does not belong to the certificate")]
    Mismatch,
    #[error("the certificate and key cannot be served: {0}")]
    Other(String),
}

fn is_pem(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .is_some_and(|i| bytes[i..].starts_with(b"-----BEGIN"))
}

/// The certificate chain in `bytes`: every CERTIFICATE block of a PEM file (the
/// server's first), or one DER certificate. The server's certificate must parse as
/// X.509.
pub fn parse_chain(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    if bytes.is_empty() {
        return Err(TlsError::Cert("the file is empty".into()));
    }
    let chain = if is_pem(bytes) {
        CertificateDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Cert(e.to_string()))?
    } else {
        vec![CertificateDer::from(bytes.to_vec())]
    };
    let Some(server) = chain.first() else {
        return Err(TlsError::Cert("there is no CERTIFICATE block".into()));
    };
    webpki::EndEntityCert::try_from(server)
        .map_err(|e| TlsError::Cert(format!("it does not parse ({e:?})")))?;
    Ok(chain)
}

/// The private key in `bytes`: PEM (PRIVATE KEY, EC PRIVATE KEY, RSA PRIVATE KEY), or DER
/// in any of those encodings (uhttpd's px5g writes DER without saying which).
pub fn parse_key(
    bytes: &[u8],
    provider: &CryptoProvider,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    if bytes.is_empty() {
        return Err(TlsError::Key("the file is empty".into()));
    }
    let usable = |k: &PrivateKeyDer<'static>| provider.key_provider.load_private_key(k.clone_key());
    if is_pem(bytes) {
        let key = PrivateKeyDer::from_pem_slice(bytes).map_err(|e| TlsError::Key(e.to_string()))?;
        usable(&key).map_err(|e| TlsError::Key(e.to_string()))?;
        return Ok(key);
    }
    let der = bytes.to_vec();
    let candidates: [PrivateKeyDer<'static>; 3] = [
        PrivatePkcs8KeyDer::from(der.clone()).into(),
        PrivateSec1KeyDer::from(der.clone()).into(),
        PrivatePkcs1KeyDer::from(der).into(),
    ];
    candidates
        .into_iter()
        .find(|k| usable(k).is_ok())
        .ok_or_else(|| TlsError::Key("no key in PKCS#8, SEC1 or PKCS#1 DER".into()))
}

/// rustls's server side for `cert` and `key` (the bytes of their files), with HTTP/1.1
/// the only protocol offered (ALPN), as the page speaks only that.
pub fn identity(cert: &[u8], key: &[u8]) -> Result<Identity, TlsError> {
    use tokio_rustls::rustls::{Error, InconsistentKeys};
    // Deprecated only because ring has no post-quantum key exchange (ML-KEM); aws-lc-rs,
    // which has, needs cmake and a C toolchain per router target and weighs about 1 MiB
    // more. X25519 against a reader of the owner's Wi-Fi is what matters here.
    #[allow(deprecated)]
    let provider = Arc::new(provider::default_provider());
    let chain = parse_chain(cert)?;
    let key = parse_key(key, &provider)?;
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::Key(e.to_string()))?;
    let spki = signing
        .public_key()
        .ok_or_else(|| TlsError::Key("its public key cannot be derived".into()))?;
    let fingerprint = fingerprint(&chain[0]);
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Other(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            Error::InconsistentKeys(InconsistentKeys::KeyMismatch) => TlsError::Mismatch,
            e => TlsError::Cert(e.to_string()),
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Identity {
        config: Arc::new(config),
        fingerprint,
        spki_sha256: base64(ring::digest::digest(&ring::digest::SHA256, spki.as_ref()).as_ref()),
    })
}

/// SHA-256 of `der`, as `AB:CD:…`.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: Vec<String> = digest.as_ref().iter().map(|b| format!("{b:02X}")).collect();
    hex.join(":")
}

/// Standard base64 with padding (RFC 4648), for the public key's pin.
pub fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// How a connection turned out to speak, once its first byte came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Https,
    /// Plain HTTP on the HTTPS port: answered with a redirect only.
    Http,
}

/// A connection's scheme, shared between the connection (which decides it) and its
/// requests (which read it through [`Peer`]).
#[derive(Debug, Clone, Default)]
pub struct SchemeCell(Arc<OnceLock<Scheme>>);

impl SchemeCell {
    pub fn get(&self) -> Option<Scheme> {
        self.0.get().copied()
    }
}

/// A TCP connection to the page: TLS (handshake driven on first use, so a slow client
/// never holds up the others' accepts) or plain HTTP, told apart by the first byte.
pub struct Stream {
    state: State,
    scheme: SchemeCell,
}

enum State {
    /// Plain HTTP only: the unit tests' server ([`crate::serve`]).
    Plain(TcpStream),
    /// Waiting for the first byte.
    Sniff(TcpStream, TlsAcceptor),
    Handshake(Box<tokio_rustls::Accept<TcpStream>>),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// A plain HTTP client on the HTTPS port.
    Redirect(TcpStream),
    /// The handshake failed.
    Failed,
}

impl Stream {
    pub fn new(tcp: TcpStream, tls: Option<TlsAcceptor>) -> Stream {
        let state = match tls {
            Some(acceptor) => State::Sniff(tcp, acceptor),
            None => State::Plain(tcp),
        };
        Stream {
            state,
            scheme: SchemeCell::default(),
        }
    }

    pub fn scheme(&self) -> SchemeCell {
        self.scheme.clone()
    }

    /// Drive the connection to where it can carry HTTP: the first byte read (without
    /// taking it), then the handshake.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match &mut self.state {
                State::Sniff(tcp, _) => {
                    let mut first = [0u8; 1];
                    let mut buf = ReadBuf::new(&mut first);
                    ready!(tcp.poll_peek(cx, &mut buf))?;
                    let tls = buf.filled().first() == Some(&TLS_HANDSHAKE);
                    let State::Sniff(tcp, acceptor) =
                        std::mem::replace(&mut self.state, State::Failed)
                    else {
                        unreachable!("matched above")
                    };
                    if tls {
                        let _ = self.scheme.0.set(Scheme::Https);
                        self.state = State::Handshake(Box::new(acceptor.accept(tcp)));
                    } else {
                        let _ = self.scheme.0.set(Scheme::Http);
                        self.state = State::Redirect(tcp);
                    }
                }
                State::Handshake(accept) => match ready!(Pin::new(&mut **accept).poll(cx)) {
                    Ok(tls) => self.state = State::Tls(Box::new(tls)),
                    Err(e) => {
                        self.state = State::Failed;
                        return Poll::Ready(Err(e));
                    }
                },
                State::Failed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the TLS handshake failed",
                    )))
                }
                State::Plain(_) | State::Tls(_) | State::Redirect(_) => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_ready(cx))?;
        match &mut self.state {
            State::Tls(s) => Pin::new(s).poll_read(cx, buf),
            State::Plain(s) | State::Redirect(s) => Pin::new(s).poll_read(cx, buf),
            _ => unreachable!("poll_ready leaves a carrying state"),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_ready(cx))?;
        match &mut self.state {
            State::Tls(s) => Pin::new(s).poll_write(cx, buf),
            State::Plain(s) | State::Redirect(s) => Pin::new(s).poll_write(cx, buf),
            _ => unreachable!("poll_ready leaves a carrying state"),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.state {
            State::Tls(s) => Pin::new(s).poll_flush(cx),
            State::Plain(s) | State::Redirect(s) => Pin::new(s).poll_flush(cx),
            // Nothing was written yet.
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.state {
            State::Tls(s) => Pin::new(s).poll_shutdown(cx),
            State::Plain(s) | State::Redirect(s) | State::Sniff(s, _) => {
                Pin::new(s).poll_shutdown(cx)
            }
            // Dropping the handshake closes the socket.
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// The middleware that answers every plain-HTTP request on the HTTPS port with a
/// redirect to the same page over HTTPS (308: the method stays). It runs inside
/// [`crate::security::guard`], so the Host header has been checked (a foreign name got
/// its 421, and so cannot make this an open redirect) and the answer carries the
/// security headers.
pub async fn only_https(req: Request, next: Next) -> Response {
    let plain = req
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .is_some_and(|c| c.0 .1.get() == Some(Scheme::Http));
    if !plain {
        return next.run(req).await;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| p.starts_with('/'))
        .unwrap_or("/");
    let target = format!("https://{host}{path}");
    let mut response = (
        StatusCode::PERMANENT_REDIRECT,
        format!("This page is served over HTTPS only: {target}\n"),
    )
        .into_response();
    match HeaderValue::from_str(&target) {
        Ok(v) => {
            response.headers_mut().insert(header::LOCATION, v);
            response
        }
        Err(_) => (
            StatusCode::BAD_REQUEST,
            "This page is served over HTTPS only.\n",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_rfc_4648() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want, "{input}");
        }
        assert_eq!(base64(&[0xff, 0xfe, 0xfd]), "//79");
    }

    #[test]
    fn bad_certificates_and_keys_are_refused_with_what_is_wrong() {
        let err = identity(b"", b"").unwrap_err();
        assert_eq!(err, TlsError::Cert("the file is empty".into()));
        let err = identity(b"-----BEGIN NOTHING-----\n-----END NOTHING-----\n", b"x").unwrap_err();
        assert!(matches!(err, TlsError::Cert(_)), "{err}");
        let err = identity(b"\x30\x03\x02\x01\x01", b"not a key").unwrap_err();
        assert!(matches!(err, TlsError::Cert(_)), "{err}");
        let err = identity(b"this is text", b"not a key").unwrap_err();
        assert!(matches!(err, TlsError::Cert(_)), "{err}");
    }
}
