//! The web page's settings, end to end in the lab: from the LAN host, over HTTP, a
//! setting saved on the page is written to the configuration file and `cage run` (told
//! by SIGHUP) applies it to the kernel; a setting the validator refuses comes back with
//! the validator's message and leaves the file byte for byte as it was.

use std::net::SocketAddr;
use std::time::Duration;

use cage_agent::probe::NetNs;
use cage_tests::http::{form_post, login};
use cage_tests::lab::{self, Lab, Node, ROUTER_LAN4};
use cage_web::client;

const PASSWORD: &str = "correct horse battery";

fn http(ns: &NetNs, addr: SocketAddr, request: String) -> Result<client::Answer, String> {
    cage_tests::http::request(ns, addr, request)
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn settings_saved_on_the_page_reach_the_kernel_and_bad_ones_change_nothing() {
    let lab = Lab::for_test();
    let path = lab.write_config("");
    cage_agent::web::set_password(&path, PASSWORD, PASSWORD).expect("cage passwd");
    let run = lab.cage_run();
    let lan = lab.netns(Node::Lan);
    let ui = SocketAddr::new(ROUTER_LAN4, lab::WEB_PORT);

    let (cookie, csrf) = login(&lan, ui, PASSWORD, || format!("cage run:\n{}", run.log()));
    assert!(
        !lab.nft_ruleset(Node::Router).contains("192.168.8.20"),
        "an admin host before any was set"
    );

    // A good change: an admin host. Written, reloaded, in the kernel.
    let good = format!(
        "csrf={csrf}&address=192.168.10.1%2F24&ipv6=1&address6=fd00%3Acafe%3A10%3A%3A1%2F64\
         &admin_hosts=192.168.8.20&auto_blocked=&auto_upload_bytes=&auto_window=10&web_hostnames="
    );
    let saved = http(&lan, ui, form_post(ui, "/settings", &cookie, &good)).expect("POST /settings");
    assert_eq!(saved.status, 303, "{}\n{}", saved.head, saved.body);
    assert!(
        saved.head.contains("/settings?saved=settings"),
        "{}",
        saved.head
    );
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("list admin_host '192.168.8.20'"), "{text}");
    run.wait_until(
        Duration::from_secs(15),
        "the admin host saved on the page never reached the kernel",
        || lab.nft_ruleset(Node::Router).contains("192.168.8.20"),
    );
    assert!(run.log().contains("SIGHUP"), "{}", run.log());

    // A bad change: the validator's message, and the file as it was.
    let before = std::fs::read(&path).unwrap();
    let bad = format!(
        "csrf={csrf}&address=192.168.10.300%2F24&ipv6=1&address6=fd00%3Acafe%3A10%3A%3A1%2F64\
         &admin_hosts=&auto_blocked=&auto_upload_bytes=&auto_window=10&web_hostnames="
    );
    let refused =
        http(&lan, ui, form_post(ui, "/settings", &cookie, &bad)).expect("POST /settings");
    let (status, body) = (refused.status, refused.body);
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("cage.ai.address (line")
            && body.contains("is not an IPv4 address with prefix, e.g. 192.168.10.1/24"),
        "{body}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "a refused setting touched the file"
    );
    assert!(
        lab.nft_ruleset(Node::Router).contains("192.168.8.20"),
        "the running policy changed"
    );
    run.stop();
}
