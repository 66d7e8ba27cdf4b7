//! HTTP/1.1 requests to the web page from inside a lab namespace (the LAN host, a caged
//! host), over HTTPS as the page serves (or plain, to see its redirect), with bounded
//! connect and read times, for the tests that prove where the page answers and where it
//! does not.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cage_agent::probe::NetNs;
use cage_web::client;

use crate::browser;
use crate::lab::{CageRun, Lab};

/// One request from inside `ns`: the answer, or why none came.
pub fn request(ns: &NetNs, addr: SocketAddr, request: String) -> Result<client::Answer, String> {
    browser::in_namespace(ns, move || {
        let (connect, read) = (Duration::from_millis(1500), Duration::from_secs(30));
        let a = client::exchange(addr, &request, connect, read).map_err(|e| e.to_string())?;
        if a.status == 0 {
            return Err(format!("no HTTP answer: {}{}", a.head, a.body));
        }
        Ok(a)
    })
}

/// One request in plain HTTP from inside `ns` (the page only redirects it).
pub fn request_plain(
    ns: &NetNs,
    addr: SocketAddr,
    request: String,
) -> Result<client::Answer, String> {
    browser::in_namespace(ns, move || {
        let (connect, read) = (Duration::from_millis(1500), Duration::from_secs(30));
        let a = client::exchange_plain(addr, &request, connect, read).map_err(|e| e.to_string())?;
        if a.status == 0 {
            return Err(format!("no HTTP answer: {}{}", a.head, a.body));
        }
        Ok(a)
    })
}

/// The page's certificate as `cage status --json` shows it (`web_cert`: its
/// fingerprint and its public key's pin), once `cage run` has it (up to 20 s).
pub fn web_cert(lab: &Lab, run: &CageRun) -> (String, String) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let out = lab.cage(&["status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let c = &v["web_cert"];
        if let (Some(f), Some(p)) = (c["fingerprint"].as_str(), c["spki_sha256"].as_str()) {
            return (f.to_owned(), p.to_owned());
        }
        assert!(
            Instant::now() < until,
            "cage status shows no web certificate: {}\ncage run:\n{}",
            String::from_utf8_lossy(&out.stdout),
            run.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// GET /login with the address as Host: the status, or why none came.
pub fn get_login(ns: &NetNs, addr: SocketAddr) -> Result<u16, String> {
    request(
        ns,
        addr,
        format!("GET /login HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .map(|a| a.status)
}

/// Poll (bounded) until the page answers at `addr` from `ns`: 200, or 303 to the
/// first-run set-up while no password is set. How long it took.
pub fn wait_page(ns: &NetNs, addr: SocketAddr, run: &CageRun) -> Duration {
    let start = Instant::now();
    let until = start + Duration::from_secs(20);
    loop {
        match get_login(ns, addr) {
            Ok(200 | 303) => return start.elapsed(),
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
        "POST {path} HTTP/1.1\r\nHost: {ui}\r\nOrigin: https://{ui}\r\nCookie: {cookie}\r\n\
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
    let login = loop {
        match request(ns, ui, client::login_request(ui, password)) {
            Ok(a) if a.status == 200 => break a,
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
    let cookie = login.session_cookie().expect("a session cookie").to_owned();
    let v: serde_json::Value = serde_json::from_str(&login.body).expect("login JSON");
    let csrf = v["csrf"].as_str().expect("a CSRF token").to_owned();
    (cookie, csrf)
}
