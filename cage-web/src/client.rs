//! The page's other side, for the tests and the benchmark that talk to it over a real
//! socket (the loop `cage run` serves with, the lab's router): one HTTP/1.1 request a
//! connection (`Connection: close`), the answer read to its end. Not the page's: only
//! the `client` feature builds it, which the tests and the benchmark turn on.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// An answer as it came off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// 0 when what came back is not HTTP.
    pub status: u16,
    /// The status line and the header lines.
    pub head: String,
    pub body: String,
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

/// `request` on a new connection to `addr` (connecting for at most `connect`, each read
/// waiting at most `read`), and its answer, read until the page closes the connection.
pub fn exchange(
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
