//! The shipped `web_listen 'lan:2243'`: the page listens on every address the LAN bridge
//! has, as the router has them at run time, and follows a change of them; a caged host
//! reaches it on none of the router's addresses.
//!
//! The firmware decides the LAN address (OpenWrt's 192.168.1.1, GL.iNet's 192.168.8.1,
//! the owner's own), so a fixed address in the shipped file would leave the page down on
//! most routers.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use cage_tests::http::{get_login, wait_page};
use cage_tests::lab::{self, Lab, Node, ROUTER_LAN4, ROUTER_LAN6, ROUTER_SEG4, ROUTER_SEG6};

const PORT: u16 = 2243;

#[test]
#[ignore = "needs root: cargo xtask test"]
fn the_page_listens_on_the_lans_addresses_as_the_router_has_them_and_follows_them() {
    let lab = Lab::for_test();
    let path = lab.config_path();
    let text = lab.base_config().replace(
        &format!("option web_listen '192.168.8.1:{}'", lab::WEB_PORT),
        &format!("option web_listen 'lan:{PORT}'"),
    );
    assert!(text.contains("'lan:2243'"), "{text}");
    std::fs::write(&path, text).unwrap();
    let mut run = lab.cage_run();
    let lan = lab.netns(Node::Lan);
    let v4 = SocketAddr::new(ROUTER_LAN4, PORT);
    let v6 = SocketAddr::new(ROUTER_LAN6, PORT);
    wait_page(&lan, v4, &run);
    wait_page(&lan, v6, &run);
    assert!(
        run.log()
            .contains("web page on https://192.168.8.1:2243/ and https://[fd00:8::1]:2243/"),
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
    let took = wait_page(&lan, SocketAddr::new(new4, PORT), &run);
    println!(
        "the page followed the LAN's new address in {:.1} s",
        took.as_secs_f64()
    );
    assert!(
        run.log()
            .contains("web page: moving to https://192.168.9.1:2243/"),
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
    run.wait_until(
        Duration::from_secs(20),
        "the page did not say it has no address",
        || run.log().contains("web page: no address to listen on yet"),
    );
    assert!(run.is_running(), "cage run stopped:\n{}", run.log());
    // And comes back with the address.
    lab.ip(
        Node::Router,
        &["addr", "add", "192.168.8.1/24", "dev", "br-lan"],
    )
    .unwrap();
    wait_page(&lan, v4, &run);
}
