//! Software flow offload, as fw4 writes it with `flow_offloading '1'`: a flowtable on
//! the router's L3 devices and `flow add @ft` in a forward chain at priority 0. Once a
//! flow is in the flowtable its packets skip the forward hook (and Cage's nftables
//! chains), so what must still hold is what does not depend on them: the eBPF program
//! at the bridge's TC hooks counts every packet, its isolation flag drops them, and new
//! flows meet the whole policy first. A counter in the forward chain shows that the
//! flows really were offloaded.

use std::time::Duration;

use cage_agent::probe::{Servers, Service};

use crate::lab::{Node, AI1_4, PUBLIC4};

use super::{caged, flows, kernel, killswitch, matrix, row};

const SECTION: &str = "flow offload";

/// fw4's flowtable and offload rule (firewall4's ruleset template with
/// `flow_offloading '1'`), in a table of their own, with a counter of the packets of
/// the test stream that still pass the forward hook.
const FW4_OFFLOAD: &str = "table inet fw4 {
	flowtable ft {
		hook ingress priority 0;
		devices = { \"br-cage\", \"br-lan\", \"wan\" };
	}
	chain forward {
		type filter hook forward priority filter; policy accept;
		udp dport 7003 counter name stream_forward
		meta l4proto { tcp, udp } flow add @ft
	}
	counter stream_forward {
	}
}
";

pub fn run() {
    if !kernel::require(SECTION, "nf_flow_table", "CONFIG_NF_FLOW_TABLE")
        || !kernel::require(SECTION, "nft_flow_offload", "CONFIG_NFT_FLOW_OFFLOAD")
    {
        return;
    }
    let Some(c) = caged::up(SECTION, "") else {
        return;
    };
    c.lab.nft(Node::Router, FW4_OFFLOAD);
    row(
        SECTION,
        "fw4's flowtable and `flow add @ft` in place",
        c.lab.nft_ruleset(Node::Router).contains("flow add @ft"),
        "software",
        "flowtable ft on br-cage, br-lan, wan; forward chain at priority 0",
    );

    // A stream of 200 echoed datagrams: after the first exchange the flow is offloaded
    // and the forward hook sees (almost) nothing more of it.
    let servers = Servers::start(
        &c.lab.netns(Node::Inet),
        &[Service::udp(7003)],
        Duration::from_secs(120),
    );
    let sent = c.lab.netns(Node::Ai1).run("stream", || {
        let s = std::net::UdpSocket::bind((AI1_4, 0)).expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut echoed = 0u64;
        for i in 0..200u64 {
            let _ = s.send_to(&[i as u8; 100], (PUBLIC4, 7003));
            let mut b = [0u8; 200];
            if s.recv_from(&mut b).is_ok() {
                echoed += 1;
            }
        }
        Ok((s.local_addr().expect("addr").port(), echoed))
    });
    drop(servers);
    let counted = forward_count(&c.lab);
    match sent {
        Ok((port, echoed)) => {
            row(
                SECTION,
                "the stream was offloaded",
                echoed == 200 && counted < 20,
                format!(
                    "{counted} of {} packets through the forward hook",
                    200 + echoed
                ),
                format!("UDP from port {port}: 200 datagrams, {echoed} echoed"),
            );
        }
        Err(e) => {
            row(SECTION, "the stream was offloaded", false, "-", e);
        }
    }

    // `cage status`: software offload is no problem; hardware offload is one, with
    // what to do. A flowtable with `flags offload` cannot be made on veths (no
    // hardware), so the configured side is shown: fw4's `flow_offloading_hw '1'`.
    let hw = |c: &caged::Caged| -> Vec<String> {
        let out = c.lab.cage(&["status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["problems"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str())
            .filter(|p| p.contains("hardware flow offload"))
            .map(str::to_owned)
            .collect()
    };
    let soft = hw(&c);
    row(
        SECTION,
        "cage status: software offload is no problem",
        soft.is_empty(),
        "no problem",
        if soft.is_empty() {
            "with fw4's software flowtable in place".to_owned()
        } else {
            soft.join("; ")
        },
    );
    let config = std::path::Path::new("/etc/config/firewall");
    let written = std::fs::create_dir_all("/etc/config").and_then(|()| {
        std::fs::write(
            config,
            "config defaults\n\toption flow_offloading '1'\n\toption flow_offloading_hw '1'\n",
        )
    });
    let reported = hw(&c);
    let _ = std::fs::remove_file(config);
    row(
        SECTION,
        "cage status: hardware offload (flow_offloading_hw '1') is a problem",
        written.is_ok() && reported.len() == 1 && reported[0].contains("uci set firewall"),
        if reported.is_empty() {
            "not reported"
        } else {
            "reported"
        },
        reported
            .first()
            .cloned()
            .unwrap_or_else(|| format!("{written:?}")),
    );

    // Counted exactly all the same: UDP and TCP, both families.
    flows::exact(&c, SECTION, &flows::Kind::ALL);
    // The kill switch cuts offloaded flows (the TCP transfer is long-lived).
    killswitch::leaks(&c, SECTION);
    // And the contract holds with the flowtable in place.
    matrix::prove(
        &c.lab,
        SECTION,
        "contract with offload on: every allow, one deny of every kind",
        &matrix::subset_checks(),
    );
}

/// The packets of the test stream that went through the forward hook.
fn forward_count(lab: &crate::lab::Lab) -> u64 {
    let mut cmd = lab.in_router_netns();
    cmd.args(["nft", "list", "counter", "inet", "fw4", "stream_forward"]);
    let out = crate::lab::run_command(&mut cmd, None, Duration::from_secs(30))
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX)
}
