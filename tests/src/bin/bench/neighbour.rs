//! `cargo xtask bench neighbour`: what the hostile-neighbour defences cost a caged host's
//! traffic. Forwarding throughput from a caged host to the internet host (iperf3, TCP and
//! small-datagram UDP) with Cage's policy as applied, and with the layer-2 bindings and
//! the per-host shares taken out of the path (`bridge cage`'s prerouting and output jumps
//! and `inet cage`'s `host_shares` flushed), alternated in one run (ABBA). Release binary
//! (`$CAGE_BIN`, set by xtask). The eBPF flow counter stays attached both times.

use anyhow::{bail, Context, Result};
use cage_tests::contract;
use cage_tests::lab::{self, Lab, Node, PUBLIC4};

use crate::flows::{iperf, Run, Transport};
use crate::results::{load_average, median, pct, record};

/// With/without pairs per transport.
const PAIRS: usize = 6;

pub fn neighbour() -> Result<()> {
    let load = load_average();
    let lab = Lab::up(&lab::unique_prefix()).context("lab up")?;
    lab.write_config(contract::CONFIG_EXTRA);
    apply(&lab)?;
    lab.wait_segment_ready()?;
    lab.pin_router_neighbours(Node::Ai1)?;
    // ai1's addresses bound, as when it came up: the runs then take the bound path.
    let ping = lab::run_command(
        std::process::Command::new("ip").args([
            "netns",
            "exec",
            &lab.ns(Node::Ai1),
            "ping",
            "-c",
            "2",
            "-i",
            "0.2",
            &PUBLIC4.to_string(),
        ]),
        None,
        std::time::Duration::from_secs(10),
    )?;
    if !ping.status.success() {
        bail!("ai1 cannot reach the internet: {ping:?}");
    }
    let mut body = String::new();
    let mut summary = Vec::new();
    for t in [Transport::Tcp, Transport::Udp] {
        let mut pairs: Vec<(Run, Run)> = Vec::new();
        for i in 0..PAIRS {
            let order = if i % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            let (mut with, mut without) = (None, None);
            for on in order {
                if on {
                    apply(&lab)?;
                } else {
                    lab.nft(
                        Node::Router,
                        "flush chain bridge cage prerouting\n\
                         flush chain bridge cage output\n\
                         flush chain inet cage host_shares\n",
                    );
                }
                let r = iperf(&lab, t)?;
                if on {
                    with = Some(r);
                } else {
                    without = Some(r);
                }
            }
            let (Some(with), Some(without)) = (with, without) else {
                unreachable!("each pair has both runs")
            };
            println!(
                "xtask bench: {} pair {}: with the defences {:.0} Mbit/s, without {:.0} \
                 Mbit/s, ratio {:.3}",
                t.name(),
                i + 1,
                with.mbps,
                without.mbps,
                with.mbps / without.mbps
            );
            pairs.push((with, without));
        }
        body.push_str(&format!(
            "{}:\n\n| pair | with Mbit/s | without | ratio |\n| --- | --- | --- | --- |\n",
            t.name()
        ));
        for (i, (w, wo)) in pairs.iter().enumerate() {
            body.push_str(&format!(
                "| {} | {:.0} | {:.0} | {:.3} |\n",
                i + 1,
                w.mbps,
                wo.mbps,
                w.mbps / wo.mbps
            ));
        }
        let ratios: Vec<f64> = pairs.iter().map(|(w, wo)| w.mbps / wo.mbps).collect();
        let ratio = median(pairs.iter().map(|p| p.0.mbps)) / median(pairs.iter().map(|p| p.1.mbps));
        let line = format!(
            "{} throughput with/without the bindings and shares, ratio of medians: \
             **{ratio:.3}** (pairs {:.3}–{:.3}).",
            t.name(),
            pct(&ratios, 0.0),
            pct(&ratios, 100.0)
        );
        body.push_str(&format!("\n{line}\n\n"));
        summary.push(line);
    }
    lab.down()?;
    for l in &summary {
        println!("xtask bench: {l}");
    }
    let method = format!(
        "Load average at the start: {load}; pairs alternate with/without (ABBA). Lab: \
         `cage apply` (no daemon) with the contract's configuration, eBPF flow counter \
         attached throughout. \"with\": the policy as applied (layer-2 bindings: bridge \
         prerouting → bind → bind_addr, output → bind_out; per-host shares for new \
         connections); \"without\": those jumps and the shares' chain flushed. iperf3 from \
         ai1 (its addresses bound) to the internet host, the same runs as `bench flows` \
         (TCP one stream; UDP 512-byte datagrams offered faster than the lab forwards); \
         {PAIRS} pairs each."
    );
    record("Hostile-neighbour defences: throughput", &method, &body)
}

fn apply(lab: &Lab) -> Result<()> {
    let out = lab.cage(&["apply"]);
    if !out.status.success() {
        bail!("cage apply: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
