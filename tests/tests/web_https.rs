//! HTTPS for the web page, end to end in the lab: `cage run` makes its self-signed
//! certificate at first start and serves the page over TLS only; plain HTTP on the same
//! port answers nothing but a redirect (no page, no cookie, no login); the session cookie
//! is Secure; the fingerprint `cage status` shows is the one of the certificate the page
//! presents, as OpenSSL's own client reads it off the wire; a caged host reaches the page
//! neither over TLS nor in plain HTTP on any of the router's addresses; a certificate
//! configuration that is wrong is refused with a clear message and changes nothing, and
//! the firmware's own certificate (DER, as uhttpd's px5g writes it) is served when
//! configured.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use cage_tests::http::{self, get_login, request, request_plain, wait_page, web_cert};
use cage_tests::lab::{self, Lab, Node, ROUTER_LAN4, ROUTER_LAN6, ROUTER_SEG4, ROUTER_SEG6};
use cage_web::client;

const PASSWORD: &str = "correct horse battery";

/// The SHA-256 fingerprint of the certificate the page at `addr` presents, as
/// `openssl s_client` (from the LAN host) receives it and `openssl x509` reads it:
/// another TLS implementation than the page's and the tests' own. Tried for up to 10 s
/// (the page rebinds for a moment when its certificate changes).
fn openssl_fingerprint(lab: &Lab, addr: SocketAddr) -> String {
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match try_openssl_fingerprint(lab, addr) {
            Ok(f) => return f,
            Err(e) => assert!(std::time::Instant::now() < until, "{e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn try_openssl_fingerprint(lab: &Lab, addr: SocketAddr) -> Result<String, String> {
    let script = format!(
        "openssl s_client -connect {addr} </dev/null 2>/dev/null | openssl x509 -noout \
         -fingerprint -sha256"
    );
    let out = Command::new("timeout")
        .args([
            "20",
            "ip",
            "netns",
            "exec",
            &lab.ns(Node::Lan),
            "sh",
            "-c",
            &script,
        ])
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    text.split_once('=')
        .map(|(_, f)| f.to_owned())
        .ok_or_else(|| format!("openssl read no certificate from {addr}: {text} {out:?}"))
}

/// `openssl` makes an EC P-256 certificate and key in DER, as uhttpd's init script has
/// px5g (or openssl) make `/etc/uhttpd.crt` and `/etc/uhttpd.key`.
fn uhttpd_like_files(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    std::fs::create_dir_all(dir).expect("a directory for the files");
    let (crt, key) = (dir.join("uhttpd.crt"), dir.join("uhttpd.key"));
    let pem_key = dir.join("uhttpd-key.pem");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "730",
        "-subj",
        "/CN=OpenWrt",
        "-outform",
        "der",
        "-keyout",
        pem_key.to_str().unwrap(),
        "-out",
        crt.to_str().unwrap(),
    ]);
    run(&[
        "pkey",
        "-in",
        pem_key.to_str().unwrap(),
        "-outform",
        "der",
        "-out",
        key.to_str().unwrap(),
    ]);
    (crt, key)
}

fn status_json(lab: &Lab) -> serde_json::Value {
    let out = lab.cage(&["status", "--json"]);
    serde_json::from_slice(&out.stdout).expect("status json")
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn the_page_is_https_only_and_its_certificate_is_the_one_cage_status_shows() {
    let lab = Lab::for_test();
    let path = lab.write_config("");
    cage_agent::web::set_password(&path, PASSWORD, PASSWORD).expect("cage passwd");
    let run = lab.cage_run();
    let lan = lab.netns(Node::Lan);
    let ui = SocketAddr::new(ROUTER_LAN4, lab::WEB_PORT);
    wait_page(&lan, ui, &run);

    // Made at first start, in the state directory, the key the owner's only.
    let state = lab.dir().join("state");
    let key_mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(state.join("web-key.pem"))
            .expect("the page's key was made")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(key_mode, 0o600);
    // OpenSSL reads it as X.509 and its self-signature checks out; the key is its key.
    let cert_file = state.join("web-cert.pem");
    let verify = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&cert_file)
        .arg(&cert_file)
        .output()
        .expect("openssl verify");
    assert!(verify.status.success(), "openssl verify: {verify:?}");
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&cert_file)
        .output()
        .expect("openssl x509");
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("Subject: CN = Cage")
            && text.contains("ecdsa-with-SHA256")
            && text.contains("IP Address:192.168.8.1"),
        "{text}"
    );

    // The fingerprint: cage status (JSON and text), the daemon's log, what the page
    // presents to OpenSSL and to the tests' client: all the same.
    let (fingerprint, _spki) = web_cert(&lab, &run);
    assert_eq!(fingerprint.len(), 95, "{fingerprint}");
    assert_eq!(openssl_fingerprint(&lab, ui), fingerprint);
    let text = String::from_utf8_lossy(&lab.cage(&["status"]).stdout).into_owned();
    assert!(
        text.contains(&format!("web cert: SHA-256 {fingerprint}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("https://{ui}/")),
        "status names the page's https address: {text}"
    );
    assert!(
        run.log().contains(&format!("SHA-256 {fingerprint}")),
        "the log does not show the fingerprint:\n{}",
        run.log()
    );
    let page = request(
        &lan,
        ui,
        format!("GET /login HTTP/1.1\r\nHost: {ui}\r\nConnection: close\r\n\r\n"),
    )
    .expect("GET /login over TLS");
    assert_eq!(page.status, 200);
    assert_eq!(page.cert.as_deref(), Some(fingerprint.as_str()));
    // A client that pins another certificate is refused by its own check: the pin is
    // real.
    let other = format!("{}00", "00:".repeat(31));
    let wrong = browser_free_pinned(&lan, ui, &other);
    assert!(
        wrong.is_err(),
        "a pin of another certificate passed: {wrong:?}"
    );

    // The session cookie is Secure (and keeps the other attributes).
    let login = request(&lan, ui, client::login_request(ui, PASSWORD)).expect("login");
    assert_eq!(login.status, 200, "{}", login.head);
    let set_cookie = login
        .head
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie: cage_session=")
        })
        .expect("a session cookie")
        .to_owned();
    for attr in ["; Secure", "; HttpOnly", "; SameSite=Strict"] {
        assert!(set_cookie.contains(attr), "{set_cookie}");
    }

    // Plain HTTP on the same port: only a redirect to the same place over HTTPS, with
    // no page, no cookie and no login, whatever the request.
    let plain = |req: String| request_plain(&lan, ui, req).expect("a plain HTTP answer");
    let got = plain(format!(
        "GET /login?next=%2F HTTP/1.1\r\nHost: {ui}\r\nConnection: close\r\n\r\n"
    ));
    assert_eq!(got.status, 308, "{}\n{}", got.head, got.body);
    assert!(
        got.head
            .lines()
            .any(|l| l == format!("location: https://{ui}/login?next=%2F")),
        "{}",
        got.head
    );
    let login_plain = plain(client::login_request(ui, PASSWORD));
    for a in [&got, &login_plain] {
        assert!(
            !a.head.to_ascii_lowercase().contains("set-cookie"),
            "{}",
            a.head
        );
        assert!(
            !a.body.contains("<form") && !a.body.contains("csrf"),
            "{}",
            a.body
        );
    }
    assert_eq!(
        login_plain.status, 308,
        "a plain login: {}",
        login_plain.head
    );
    // One login in the daemon's log (the one over TLS), not two.
    assert_eq!(
        run.log()
            .matches(&format!("web page: login from {}", lab::LAN_HOST4))
            .count(),
        1,
        "{}",
        run.log()
    );
    // A foreign Host gets its 421, not a redirect to where it says.
    let foreign =
        plain("GET / HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".to_owned());
    assert_eq!(foreign.status, 421, "{}", foreign.head);
    assert!(!foreign.head.to_ascii_lowercase().contains("location:"));
    // The security headers are on the redirect too.
    assert!(
        got.head
            .to_ascii_lowercase()
            .contains("content-security-policy:"),
        "{}",
        got.head
    );

    // A caged host reaches the page on none of the router's addresses, neither over
    // TLS nor in plain HTTP, nor a TCP connection on the ports the firmware's own pages
    // use.
    let ai1 = lab.netns(Node::Ai1);
    for ip in [ROUTER_LAN4, ROUTER_LAN6, ROUTER_SEG4, ROUTER_SEG6] {
        let addr = SocketAddr::new(ip, lab::WEB_PORT);
        let tls = get_login(&ai1, addr);
        assert!(
            tls.is_err(),
            "a caged host reached the page at {addr}: {tls:?}"
        );
        let plain = request_plain(
            &ai1,
            addr,
            format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
        );
        assert!(
            plain.is_err(),
            "a caged host got an answer at {addr}: {plain:?}"
        );
        for port in [80, 443, 2243, 8080, 8443] {
            let to = SocketAddr::new(ip, port);
            let connected = cage_tests::browser::in_namespace(&ai1, || {
                std::net::TcpStream::connect_timeout(&to, Duration::from_millis(800)).is_ok()
            });
            assert!(!connected, "a caged host connected to {to}");
        }
    }
    drop(run);
}

/// A request from `ns` that accepts only the certificate `pin`.
fn browser_free_pinned(
    ns: &cage_agent::probe::NetNs,
    addr: SocketAddr,
    pin: &str,
) -> Result<client::Answer, String> {
    let request = format!("GET /login HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let pin = pin.to_owned();
    cage_tests::browser::in_namespace(ns, move || {
        client::exchange_pinned(
            addr,
            &request,
            Duration::from_secs(2),
            Duration::from_secs(10),
            &pin,
        )
        .map_err(|e| e.to_string())
    })
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_bad_certificate_configuration_changes_nothing_and_the_firmwares_is_served() {
    let lab = Lab::for_test();
    let path = lab.write_config("");
    cage_agent::web::set_password(&path, PASSWORD, PASSWORD).expect("cage passwd");
    let run = lab.cage_run();
    let lan = lab.netns(Node::Lan);
    let ui = SocketAddr::new(ROUTER_LAN4, lab::WEB_PORT);
    wait_page(&lan, ui, &run);
    let (own, _) = web_cert(&lab, &run);
    let base = std::fs::read_to_string(&path).unwrap();
    // The policy as Cage rendered it, without the set elements the kernel learns.
    let policy = || cage_agent::nft::without_learned_elements(&lab.nft_ruleset(Node::Router));
    let ruleset = policy();
    let (crt, key) = uhttpd_like_files(lab.dir());
    let with = |lines: &str| {
        base.replace(
            "config cage 'main'\n",
            &format!("config cage 'main'\n{lines}"),
        )
    };
    let presented = || openssl_fingerprint(&lab, ui);

    // A certificate without its key: refused by the validator, naming option and line.
    let half = with(&format!("\toption web_cert '{}'\n", crt.display()));
    std::fs::write(&path, &half).unwrap();
    let check = lab.cage(&["check"]);
    let said = String::from_utf8_lossy(&check.stderr).into_owned();
    assert!(
        !check.status.success(),
        "cage check took a certificate without its key"
    );
    assert!(
        said.contains(
            "cage.main.web_cert (line 3): a certificate without its key: set web_key too"
        ),
        "{said}"
    );
    // A relative path: refused as well.
    std::fs::write(
        &path,
        with("\toption web_cert 'uhttpd.crt'\n\toption web_key '/etc/uhttpd.key'\n"),
    )
    .unwrap();
    let check = lab.cage(&["check"]);
    let said = String::from_utf8_lossy(&check.stderr).into_owned();
    assert!(
        said.contains("cage.main.web_cert (line 3): 'uhttpd.crt' is not an absolute path"),
        "{said}"
    );
    unsafe { libc::kill(run.pid() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(
        presented(),
        own,
        "a refused configuration changed the certificate"
    );
    assert!(policy() == ruleset, "the policy changed:\n{}", policy());

    // A valid configuration whose files are not a certificate and key: said clearly,
    // in the log and by cage status; the page keeps serving the one it had.
    let garbage = lab.dir().join("garbage.crt");
    std::fs::write(&garbage, "this is not a certificate\n").unwrap();
    std::fs::write(
        &path,
        with(&format!(
            "\toption web_cert '{}'\n\toption web_key '{}'\n",
            garbage.display(),
            key.display()
        )),
    )
    .unwrap();
    run.wait_until(
        Duration::from_secs(20),
        "the page did not say the certificate is bad",
        || {
            run.log()
                .contains("it keeps serving the certificate it has")
        },
    );
    assert!(
        run.log().contains(&format!(
            "the web page's certificate {}: the certificate is not a PEM or DER X.509 certificate",
            garbage.display()
        )),
        "{}",
        run.log()
    );
    assert_eq!(presented(), own, "a bad certificate replaced the good one");
    let problems = status_json(&lab)["problems"].to_string();
    assert!(problems.contains("garbage.crt"), "{problems}");
    // A key that is not the certificate's.
    let other_key = lab.dir().join("state").join("web-key.pem");
    std::fs::write(
        &path,
        with(&format!(
            "\toption web_cert '{}'\n\toption web_key '{}'\n",
            crt.display(),
            other_key.display()
        )),
    )
    .unwrap();
    run.wait_until(
        Duration::from_secs(20),
        "the page did not say the key is not the certificate's",
        || {
            run.log()
                .contains(&format!("is not the key of {}", crt.display()))
        },
    );
    assert_eq!(presented(), own);

    // The firmware's own certificate and key, DER as uhttpd keeps them: served, and
    // cage status shows its fingerprint.
    std::fs::write(
        &path,
        with(&format!(
            "\toption web_cert '{}'\n\toption web_key '{}'\n",
            crt.display(),
            key.display()
        )),
    )
    .unwrap();
    let der = std::fs::read(&crt).unwrap();
    let firmware = cage_web::tls::fingerprint(&der);
    run.wait_until(
        Duration::from_secs(20),
        "the page did not take the firmware's certificate",
        || try_openssl_fingerprint(&lab, ui).is_ok_and(|f| f == firmware),
    );
    let (shown, _) = web_cert(&lab, &run);
    assert_eq!(shown, firmware);
    wait_page(&lan, ui, &run);
    let (cookie, _) = http::login(&lan, ui, PASSWORD, || run.log());
    assert!(cookie.starts_with("cage_session="));
    drop(run);
}

/// At first start with a certificate that cannot be served, the page stays off, says
/// why, and tries again; the daemon runs on and enforces. Once the files are good, the
/// page comes up with them, without a restart.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_first_start_with_a_bad_certificate_keeps_the_daemon_and_retries_the_page() {
    let lab = Lab::for_test();
    let (crt, key) = (lab.dir().join("fw.crt"), lab.dir().join("fw.key"));
    std::fs::write(&crt, "not yet a certificate\n").unwrap();
    std::fs::write(&key, "not yet a key\n").unwrap();
    let path = lab.write_config("");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "config cage 'main'\n",
        &format!(
            "config cage 'main'\n\toption web_cert '{}'\n\toption web_key '{}'\n",
            crt.display(),
            key.display()
        ),
    );
    std::fs::write(&path, text).unwrap();
    cage_agent::web::set_password(&path, PASSWORD, PASSWORD).expect("cage passwd");
    let mut run = lab.cage_run();
    run.wait_until(
        Duration::from_secs(20),
        "the page did not say why it is off",
        || {
            run.log().contains(&format!(
                "web page: the web page's certificate {}: the certificate is not a PEM or DER \
                 X.509 certificate",
                crt.display()
            )) && run
                .log()
                .contains("the page is off; trying again every 3 s")
        },
    );
    let lan = lab.netns(Node::Lan);
    let ui = SocketAddr::new(ROUTER_LAN4, lab::WEB_PORT);
    assert!(
        get_login(&lan, ui).is_err(),
        "a page without a certificate answered"
    );
    assert!(run.is_running(), "cage run stopped:\n{}", run.log());
    assert!(
        lab.nft_ruleset(Node::Router).contains("table inet cage"),
        "the policy is not in force"
    );
    // The firmware's files become good: the page comes up with them.
    let (good_crt, good_key) = uhttpd_like_files(&lab.dir().join("good"));
    std::fs::copy(&good_crt, &crt).unwrap();
    std::fs::copy(&good_key, &key).unwrap();
    let took = wait_page(&lan, ui, &run);
    println!(
        "the page came up {:.1} s after the files were fixed",
        took.as_secs_f64()
    );
    let firmware = cage_web::tls::fingerprint(&std::fs::read(&crt).unwrap());
    assert_eq!(openssl_fingerprint(&lab, ui), firmware);
    drop(run);
}
