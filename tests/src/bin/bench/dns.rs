//! `cargo xtask bench dns`: what DNS through Cage adds to a lookup.
//!
//! In the lab the internet host runs an authoritative server on port 53 (Cage's
//! upstream) and on port 5300 of the same address. A caged host alternates, query by
//! query, between a lookup through Cage (to the router's port 53: redirected to Cage's
//! forwarder, which relays it to port 53 upstream) and a direct one (to port 5300, which
//! the redirect leaves alone: the same server over the same routed path, without the
//! forwarder). Medians of each, and their ratio, in open mode and in allow-list mode
//! (where an answer's new addresses also go into the allow sets, one nftables transaction,
//! before it is relayed), asking for the same name each time and for a new name (with an
//! address of its own) each time. Release binary (`$CAGE_BIN`, set by xtask). Appended to
//! `bench/RESULTS.md`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cage_tests::dns::{resolve_here, Answer, AuthServer};
use cage_tests::lab::{self, Lab, Node, PUBLIC4, ROUTER_SEG4};

use crate::results::{median, pct, record};

const QUERIES: usize = 200;
const DIRECT_PORT: u16 = 5300;

pub fn dns() -> Result<()> {
    let mut rows = String::new();
    for (mode, section) in [
        (
            "open",
            "config dns 'dns'\n\tlist upstream '203.0.113.10'\n\
             \toption max_qps '10000'\n\toption burst '10000'\n",
        ),
        (
            "allowlist",
            "config dns 'dns'\n\toption egress 'allowlist'\n\tlist allow_domain 'bench.test'\n\
             \tlist allow_domain '*.bench.test'\n\
             \tlist upstream '203.0.113.10'\n\toption max_qps '10000'\n\toption burst '10000'\n",
        ),
    ] {
        let lab = Lab::up(&lab::unique_prefix()).context("lab up")?;
        let mut zone = HashMap::new();
        zone.insert(
            "bench.test".to_owned(),
            Answer::Addrs(vec!["203.0.113.20".parse()?, "2001:db8:203::20".parse()?]),
        );
        // The server's own address by name: in allow-list mode, resolving it through
        // Cage first is what lets the direct lookups through.
        zone.insert("ns.bench.test".to_owned(), Answer::Addrs(vec![PUBLIC4]));
        // Names of their own, each with an address of its own: a lookup of one is an
        // answer the allow sets do not have yet.
        for i in 0..QUERIES {
            let addr = if i < 100 {
                format!("203.0.113.{}", 100 + i)
            } else {
                format!("192.0.2.{}", i - 99)
            };
            zone.insert(
                format!("n{i}.bench.test"),
                Answer::Addrs(vec![addr.parse()?]),
            );
        }
        let _auth = AuthServer::start(
            &lab.netns(Node::Inet),
            &[
                SocketAddr::new(PUBLIC4, 53),
                SocketAddr::new(PUBLIC4, DIRECT_PORT),
            ],
            zone,
            300,
        )?;
        lab.write_config(section);
        let r = crate::cage_run(&lab)?;
        lab.wait_segment_ready()?;
        for fresh in [false, true] {
            let (through, direct) = lab
                .netns(Node::Ai1)
                .run("bench-dns", move || Ok(lookups(fresh)))
                .map_err(|e| anyhow::anyhow!("{e}"))??;
            let (mt, md) = (
                median(through.iter().copied()),
                median(direct.iter().copied()),
            );
            let row = format!(
                "| {mode} | {} | {QUERIES} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | +{:.3} |",
                if fresh {
                    "a new name each time"
                } else {
                    "the same name"
                },
                md,
                pct(&direct, 90.0),
                mt,
                pct(&through, 90.0),
                mt / md,
                mt - md
            );
            println!("{row}");
            rows.push_str(&row);
            rows.push('\n');
        }
        drop(r);
        lab.down()?;
    }
    // The per-host query limit is raised out of the way: it is not what is measured.
    let method = format!(
        "Lab: a caged host alternates {QUERIES} lookups (A, UDP) through Cage (router port \
         53, redirected to Cage's forwarder, relayed to the authoritative server on the \
         internet host) with {QUERIES} direct ones (the same server on port {DIRECT_PORT}, \
         over the same routed path, which the redirect leaves alone). Release binary. \
         Milliseconds; ratio and difference of the medians. In allow-list mode each \
         answer's addresses go into the allow sets (one nftables transaction over \
         nfnetlink) before it is relayed, \
         unless the sets already keep them as long as the answer's TTL (a repeated lookup); \
         \"a new name each time\" asks for {QUERIES} names with an address each."
    );
    let body = format!(
        "| mode | names | queries | direct p50 | direct p90 | through Cage p50 | p90 | ratio | added |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n{rows}"
    );
    record("DNS lookup latency through Cage", &method, &body)
}

/// Alternate lookups through Cage and direct ones; their durations in milliseconds.
/// `fresh`: each pair asks for a name not asked before (in allow-list mode, an answer
/// whose address must go into the allow sets); else always the same name.
fn lookups(fresh: bool) -> Result<(Vec<f64>, Vec<f64>), cage_agent::probe::ProbeError> {
    let through_cage = SocketAddr::new(ROUTER_SEG4, 53);
    let direct = SocketAddr::new(PUBLIC4, DIRECT_PORT);
    let timeout = Duration::from_secs(2);
    let (mut t, mut d) = (Vec::new(), Vec::new());
    // Warm up (ARP, conntrack, the forwarder's first task); in allow-list mode this also
    // allows the server's address for the direct lookups.
    let _ = resolve_here(through_cage, "ns.bench.test", false, false, timeout);
    let _ = resolve_here(through_cage, "bench.test", false, false, timeout);
    let _ = resolve_here(direct, "bench.test", false, false, timeout);
    for i in 0..QUERIES {
        let name = if fresh {
            format!("n{i}.bench.test")
        } else {
            "bench.test".to_owned()
        };
        let order = if i % 2 == 0 {
            [(through_cage, true), (direct, false)]
        } else {
            [(direct, false), (through_cage, true)]
        };
        for (server, is_cage) in order {
            let start = Instant::now();
            let ok = resolve_here(server, &name, false, false, timeout)
                .map(|r| !r.addrs.is_empty())
                .unwrap_or(false);
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            if !ok {
                return Err(cage_agent::probe::ProbeError::Io {
                    ns: "ai1".into(),
                    op: format!("lookup {i} at {server} failed"),
                    source: std::io::Error::other("no answer"),
                });
            }
            if is_cage {
                t.push(ms);
            } else {
                d.push(ms);
            }
        }
    }
    Ok((t, d))
}
