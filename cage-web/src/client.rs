//! The page's other side, for the tests and the benchmark that talk to it over a real
//! socket (the loop `cage run` serves with, the lab's router): one HTTP/1.1 request a
//! connection (`Connection: close`), over TLS as a browser would (or plain, to see the
//! redirect), the answer read to its end. Not the page's: only the `client` feature
//! builds it, which the tests and the benchmark turn on.
//!
//! The TLS side checks the handshake's signature against the certificate the page
//! presents, as any client does, and takes that certificate as it comes (a router's
//! certificate is self-signed), recording its fingerprint in the answer so that a test
//! can hold it to what `cage status` says; [`exchange_pinned`] refuses any other.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{self, CryptoProvider};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, Error, SignatureScheme, StreamOwned,
};

/// An answer as it came off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// 0 when what came back is not HTTP.
    pub status: u16,
    /// The status line and the header lines.
    pub head: String,
    pub body: String,
    /// The SHA-256 fingerprint of the certificate the page presented (`AB:CD:…`); None
    /// over plain HTTP.
    pub cert: Option<String>,
}

impl Answer {
    /// The head and body of an answer's bytes.
    pub fn parse(bytes: &[u8]) -> Answer {
        let text = String::from_utf8_lossy(bytes);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Answer {
            status,
            head: head.to_owned(),
            body: body.to_owned(),
            cert: None,
        }
    }

    /// `cage_session=…`, the session cookie the answer sets (without its attributes).
    pub fn session_cookie(&self) -> Option<&str> {
        self.head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(": ")?;
                k.eq_ignore_ascii_case("set-cookie").then_some(v)
            })
            .and_then(|c| c.split(';').next())
    }
}

/// `request` over HTTPS on a new connection to `addr` (connecting for at most
/// `connect`, each read waiting at most `read`), and its answer, read until the page
/// closes the connection; any certificate, its fingerprint in the answer.
pub fn exchange(
    addr: SocketAddr,
    request: &str,
    connect: Duration,
    read: Duration,
) -> io::Result<Answer> {
    tls_exchange(addr, request, connect, read, None)
}

/// As [`exchange`], but only with the certificate whose fingerprint is `fingerprint`
/// (`AB:CD:…`): another one fails the handshake.
pub fn exchange_pinned(
    addr: SocketAddr,
    request: &str,
    connect: Duration,
    read: Duration,
    fingerprint: &str,
) -> io::Result<Answer> {
    tls_exchange(addr, request, connect, read, Some(fingerprint.to_owned()))
}

/// `request` in plain HTTP (what the page only redirects).
pub fn exchange_plain(
    addr: SocketAddr,
    request: &str,
    connect: Duration,
    read: Duration,
) -> io::Result<Answer> {
    let mut s = TcpStream::connect_timeout(&addr, connect)?;
    s.set_read_timeout(Some(read))?;
    s.write_all(request.as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(Answer::parse(&out))
}

fn tls_exchange(
    addr: SocketAddr,
    request: &str,
    connect: Duration,
    read: Duration,
    pin: Option<String>,
) -> io::Result<Answer> {
    #[allow(deprecated)] // as the page's side: see `tls::identity`
    let provider = Arc::new(crypto::ring::default_provider());
    let verifier = Arc::new(AnyCertificate {
        provider: provider.clone(),
        seen: Mutex::new(None),
        pin,
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let conn = ClientConnection::new(Arc::new(config), ServerName::IpAddress(addr.ip().into()))
        .map_err(io::Error::other)?;
    let tcp = TcpStream::connect_timeout(&addr, connect)?;
    tcp.set_read_timeout(Some(read))?;
    let mut s = StreamOwned::new(conn, tcp);
    s.write_all(request.as_bytes())?;
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        // The page closed the TCP connection without TLS's close_notify, after its
        // answer: the answer is whole (HTTP says where it ends), so take it.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !out.is_empty() => {}
        Err(e) => return Err(e),
    }
    let mut answer = Answer::parse(&out);
    answer.cert = verifier
        .seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    Ok(answer)
}

/// Takes whichever certificate the page presents (or only the pinned one), and checks
/// the handshake's signatures with it as rustls would.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
    seen: Mutex<Option<String>>,
    pin: Option<String>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let fingerprint = crate::tls::fingerprint(end_entity);
        if let Some(pin) = &self.pin {
            if !pin.eq_ignore_ascii_case(&fingerprint) {
                return Err(Error::General(format!(
                    "the page presented the certificate {fingerprint}, not {pin}"
                )));
            }
        }
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(fingerprint);
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `POST /api/login` with `password`, to the page at `host` (its `Host` header).
pub fn login_request(host: impl std::fmt::Display, password: &str) -> String {
    let body = serde_json::json!({ "password": password }).to_string();
    format!(
        "POST /api/login HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// An address on loopback with a port that is free now, for a page a test configures.
pub fn free_loopback() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on loopback")
}
