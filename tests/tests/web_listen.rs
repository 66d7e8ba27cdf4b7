//! The shipped `web_listen 'lan:2243'`: the page listens on every address the LAN bridge
//! has, as the router has them at run time, and follows a change of them; a caged host
//! reaches it on none of the router's addresses.
//!
//! The firmware decides the LAN address (OpenWrt's 192.168.1.1, GL.iNet's 192.168.8.1,
//! the owner's own), so a fixed address in the shipped file would leave the page down on
//! most routers.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use cage_agent::probe::NetNs;
use cage_tests::browser;
use cage_tests::lab::{self, Lab, Node, ROUTER_LAN4, ROUTER_LAN6, ROUTER_SEG4, ROUTER_SEG6};
use cage_tests::require_root;

const PORT: u16 = 2243;

/// GET /login from inside `ns` with the address as Host: the status, or why none came.
fn get_login(ns: &NetNs, addr: SocketAddr) -> Result<u16, String> {
    browser::in_namespace(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(1500))
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let request = format!("GET /login HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out);
        text.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no HTTP answer: {text}"))
    })
}

/// Poll until the page answers at `addr` from `ns` (bounded): 200, or 303 to the
/// first-run set-up while no password is set.
fn wait_page(ns: &NetNs, addr: SocketAddr, run: &lab::CageRun) {
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

#[test]
#[ignore = "needs root: cargo xtask test"]
fn the_page_listens_on_the_lans_addresses_as_the_router_has_them_and_follows_them() {
    require_root();
    lab::cage_bin().unwrap_or_else(|e| panic!("{e}"));
    let lab = Lab::up(&lab::unique_prefix()).expect("lab up");
    let path = lab.config_path();
    let text = lab.base_config().replace(
        &format!("option web_listen '192.168.8.1:{}'", lab::WEB_PORT),
        &format!("option web_listen 'lan:{PORT}'"),
    );
    assert!(text.contains("'lan:2243'"), "{text}");
    std::fs::write(&path, text).unwrap();
    let mut run = lab.spawn_cage_run();
    run.wait_applied();
    let lan = lab.netns(Node::Lan);
    let v4 = SocketAddr::new(ROUTER_LAN4, PORT);
    let v6 = SocketAddr::new(ROUTER_LAN6, PORT);
    wait_page(&lan, v4, &run);
    wait_page(&lan, v6, &run);
    assert!(
        run.log()
            .contains("web page on http://192.168.8.1:2243/ and http://[fd00:8::1]:2243/"),
        "{}",
        run.log()
    );

    // A caged host reaches the page on none of the router's addresses, not even the LAN
    // address it is served on.
    let ai1 = lab.netns(Node::Ai1);
    for ip in [ROUTER_LAN4, ROUTER_LAN6, ROUTER_SEG4, ROUTER_SEG6] {
        let addr = SocketAddr::new(ip, PORT);
        let got = get_login(&ai1, addr);
        assert!(
            got.is_err(),
            "a caged host reached the page at {addr}: {got:?}"
        );
    }

    // The owner moves the LAN to another subnet: the page follows within seconds, and
    // the old address is gone.
    let new4: IpAddr = "192.168.9.1".parse().unwrap();
    lab.ip(
        Node::Router,
        &["addr", "add", "192.168.9.1/24", "dev", "br-lan"],
    )
    .unwrap();
    lab.ip(
        Node::Router,
        &["addr", "del", "192.168.8.1/24", "dev", "br-lan"],
    )
    .unwrap();
    lab.ip(
        Node::Lan,
        &["addr", "add", "192.168.9.10/24", "dev", "eth0"],
    )
    .unwrap();
    let moved_at = Instant::now();
    wait_page(&lan, SocketAddr::new(new4, PORT), &run);
    println!(
        "the page followed the LAN's new address in {:.1} s",
        moved_at.elapsed().as_secs_f64()
    );
    assert!(
        run.log()
            .contains("web page: moving to http://192.168.9.1:2243/"),
        "{}",
        run.log()
    );
    assert!(
        get_login(&lan, v4).is_err(),
        "the old address still answers"
    );
    wait_page(&lan, v6, &run);
    let got = get_login(&ai1, SocketAddr::new(new4, PORT));
    assert!(got.is_err(), "a caged host reached the moved page: {got:?}");

    // No LAN address at all: the page waits, saying so, and the daemon goes on.
    lab.ip(Node::Router, &["addr", "flush", "dev", "br-lan"])
        .unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while !run.log().contains("web page: no address to listen on yet") {
        assert!(
            Instant::now() < until,
            "the page did not say it has no address:\n{}",
            run.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(run.is_running(), "cage run stopped:\n{}", run.log());
    // And comes back with the address.
    lab.ip(
        Node::Router,
        &["addr", "add", "192.168.8.1/24", "dev", "br-lan"],
    )
    .unwrap();
    wait_page(&lan, v4, &run);
}
