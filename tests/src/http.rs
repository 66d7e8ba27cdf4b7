//! HTTP/1.1 requests to the web page from inside a lab namespace (the LAN host, a caged
//! host), with bounded connect and read times, for the tests that prove where the page
//! answers and where it does not.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use cage_agent::probe::NetNs;

use crate::browser;
use crate::lab::CageRun;

/// One request from inside `ns`: the status, the head and the body, or why none came.
pub fn request(
    ns: &NetNs,
    addr: SocketAddr,
    request: String,
) -> Result<(u16, String, String), String> {
    browser::in_namespace(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(1500))
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no HTTP answer: {text}"))?;
        Ok((status, head.to_owned(), body.to_owned()))
    })
}

/// GET /login with the address as Host: the status, or why none came.
pub fn get_login(ns: &NetNs, addr: SocketAddr) -> Result<u16, String> {
    request(
        ns,
        addr,
        format!("GET /login HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .map(|(status, _, _)| status)
}

/// Poll (bounded) until the page answers at `addr` from `ns`: 200, or 303 to the
/// first-run set-up while no password is set.
pub fn wait_page(ns: &NetNs, addr: SocketAddr, run: &CageRun) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        match get_login(ns, addr) {
            Ok(200 | 303) => return,
            other => assert!(
                Instant::now() < until,
                "the page never answered at {addr}: {other:?}\ncage run:\n{}",
                run.log()
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A form POST of `body` to `path` with the session `cookie`, as the page's own forms
/// send it (Origin the page's own address).
pub fn form_post(ui: SocketAddr, path: &str, cookie: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {ui}\r\nOrigin: http://{ui}\r\nCookie: {cookie}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A GET of `path` with the session `cookie`.
pub fn get(ui: SocketAddr, path: &str, cookie: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {ui}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n")
}

/// Log in from `ns` with `password` (`POST /api/login`), trying again for up to 15 s
/// while the page is not up yet: the session cookie (`name=value`) and the CSRF token.
/// `why` says what to show when it never works (the daemon's log).
pub fn login(
    ns: &NetNs,
    ui: SocketAddr,
    password: &str,
    why: impl Fn() -> String,
) -> (String, String) {
    let until = Instant::now() + Duration::from_secs(15);
    let login = serde_json::json!({ "password": password }).to_string();
    let (head, answer) = loop {
        match request(
            ns,
            ui,
            format!(
                "POST /api/login HTTP/1.1\r\nHost: {ui}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{login}",
                login.len()
            ),
        ) {
            Ok((200, head, body)) => break (head, body),
            other => {
                assert!(
                    Instant::now() < until,
                    "no login on {ui}: {other:?}\n{}",
                    why()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    let cookie = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(": ")?;
            k.eq_ignore_ascii_case("set-cookie").then_some(v)
        })
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_owned();
    let v: serde_json::Value = serde_json::from_str(&answer).expect("login JSON");
    let csrf = v["csrf"].as_str().expect("a CSRF token").to_owned();
    (cookie, csrf)
}
