//! The benchmarks that `cargo xtask bench …` runs: Cage's costs, measured side by side in
//! one run (with Cage against without), printed and appended to `bench/RESULTS.md` with
//! the date and the machine. One file per benchmark:
//!
//! - `killswitch`: how fast the kill switch cuts a running stream, daemon up and down;
//! - `flows`: what the eBPF flow counter costs (throughput with/without) and how many new
//!   flows a second it records;
//! - `dns`: what DNS through Cage's forwarder adds to a lookup;
//! - `export`: what the IPFIX export costs `cage run` at 10 000 flows a minute;
//! - `neighbour`: what the layer-2 bindings and per-host shares cost a caged host's
//!   traffic;
//! - `product`: a plain router, a hand-written nftables ruleset and Cage as a whole,
//!   forwarding a caged host's traffic side by side;
//! - `idle`: `cage run`'s CPU with nothing to do and how soon it repairs a change,
//!   listening to the kernel's announcements against polling;
//! - `memory`: `cage run`'s resident memory with 64 000 flows in the map, when they
//!   expire, and its peak, static with musl and with glibc;
//! - `web`: page and API latency with 10 000 flows, and the agent's memory (runs the
//!   `web_bench` programs that xtask built).
//!
//! xtask builds what a benchmark measures (the release `cage`, the `web_bench` example)
//! and runs this program from the workspace's root; it links none of Cage itself.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use cage_tests::lab::{CageRun, Lab};

mod dns;
mod export;
mod flows;
mod idle;
mod killswitch;
mod memory;
mod neighbour;
mod product;
mod results;
mod web;

const USAGE: &str = "\
usage: bench killswitch | flows | dns | export | neighbour | product | idle | web GLIBC_WEB_BENCH MUSL_WEB_BENCH
       | memory GLIBC_CAGE MUSL_CAGE
  (run by `cargo xtask bench …`, which builds what is measured first)
";

fn main() -> ExitCode {
    cage_tests::program_main(USAGE, |args| {
        let root = || cage_tests::root_for("the benchmark builds a lab in network namespaces");
        Some(match args {
            ["killswitch"] => root().and_then(|()| killswitch::killswitch()),
            ["flows"] => root().and_then(|()| flows::flows()),
            ["dns"] => root().and_then(|()| dns::dns()),
            ["export"] => root().and_then(|()| export::export()),
            ["neighbour"] => root().and_then(|()| neighbour::neighbour()),
            ["product"] => root().and_then(|()| product::product()),
            ["idle"] => root().and_then(|()| idle::idle()),
            ["web", glibc, musl] => web::web(glibc, musl),
            ["memory", glibc, musl] => root().and_then(|()| memory::memory(glibc, musl)),
            _ => return None,
        })
    })
}

/// `cage run` in the lab's router, once it has applied its policy (at most 15 s).
fn cage_run(lab: &Lab) -> Result<CageRun> {
    let r = lab.spawn_cage_run();
    let start = Instant::now();
    while !r.log().contains("policy applied") {
        if start.elapsed() > Duration::from_secs(15) {
            bail!("cage run did not start:\n{}", r.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(r)
}
