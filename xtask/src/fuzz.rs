//! `cargo xtask fuzz [SECONDS]`: fuzz the configuration parser, validator and renderer
//! with cargo-fuzz (libFuzzer, nightly), seeded with every configuration in the repo; then
//! the DNS forwarder's handling of messages (queries and answers), as long again.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::{cargo, run};

pub fn run_fuzz(seconds: u64) -> Result<()> {
    let have_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have_fuzz {
        println!("xtask fuzz: installing cargo-fuzz");
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    // A fresh corpus seeded from the repo's configurations: the shipped example, the
    // golden cases and the bad-config corpus.
    let corpus = Path::new("target/fuzz-corpus/config");
    let _ = std::fs::remove_dir_all(corpus);
    std::fs::create_dir_all(corpus)?;
    let mut seeds = vec![Path::new("openwrt/files/etc/config/cage").to_path_buf()];
    for dir in ["cage-agent/tests/golden", "cage-agent/tests/bad-configs"] {
        for e in std::fs::read_dir(dir).with_context(|| format!("reading {dir}"))? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "conf") {
                seeds.push(p);
            }
        }
    }
    for (i, s) in seeds.iter().enumerate() {
        std::fs::copy(s, corpus.join(format!("seed-{i}")))?;
    }
    println!(
        "xtask fuzz: {} seeds, {seconds} s of libFuzzer on config::parse + policy::render",
        seeds.len()
    );
    let corpus = std::fs::canonicalize(corpus)?;
    libfuzzer("config", &corpus, seconds, 4096)?;
    // DNS messages (hostile queries, upstream answers): the forwarder's parsing.
    let dns_corpus = Path::new("target/fuzz-corpus/dns");
    std::fs::create_dir_all(dns_corpus)?;
    let dns_corpus = std::fs::canonicalize(dns_corpus)?;
    println!("xtask fuzz: {seconds} s of libFuzzer on the DNS forwarder's message handling");
    libfuzzer("dns", &dns_corpus, seconds, 1500)
}

/// `cargo +nightly fuzz run TARGET CORPUS` in cage-agent, for `seconds`, with inputs of
/// at most `max_len` bytes.
fn libfuzzer(target: &str, corpus: &Path, seconds: u64, max_len: usize) -> Result<()> {
    run(Command::new("cargo")
        .current_dir("cage-agent")
        .args(["+nightly", "fuzz", "run", target])
        .arg(corpus)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-max_len={max_len}")))
}
