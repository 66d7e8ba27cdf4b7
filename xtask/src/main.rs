//! `cargo xtask`: set-up, demo, lab and tests, so a fresh machine needs two commands.
//!
//! xtask builds tools, not the product: it links nothing of Cage, so `cargo xtask setup`
//! installs the toolchains before anything of Cage is compiled (`cage-agent`'s build
//! script needs the eBPF toolchain). What needs Cage's code runs as programs that xtask
//! builds and starts: `cage-tests`' binaries `demo` and `bench`.

use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};

mod bench;
mod demo;
mod dist;
mod fuzz;
mod openwrt;
mod package;
mod setup;
mod vm;

const USAGE: &str = "\
usage: cargo xtask <command>

  setup              install what Cage's build and tests need (idempotent)
  demo               bring up the lab with Cage running, check the contract, print hints
  lab down           tear the demo lab down (also cleans up after a crashed run)
  test               setup, build, run every test, check nothing was left behind
  bench killswitch   isolate latency over 60 presses, daemon up and down (bench/RESULTS.md)
  bench flows        throughput with/without the eBPF flow counter, new-flow rate (bench/RESULTS.md)
  bench web          page and API latency with 10 000 flows, the agent's memory (bench/RESULTS.md)
  bench dns          lookup latency through Cage's DNS forwarder against direct (bench/RESULTS.md)
  bench neighbour    throughput with/without the layer-2 bindings and per-host shares (bench/RESULTS.md)
  bench product      a plain router, hand-written nftables and Cage side by side (bench/RESULTS.md)
  bench idle         cage run's idle CPU and repair time, listening against polling (bench/RESULTS.md)
  bench export       cage run's CPU and memory at 10 000 flows a minute, IPFIX export on/off (bench/RESULTS.md)
  bench memory       cage run's memory with 64 000 flows and at its peak, musl and glibc (bench/RESULTS.md)
  fuzz [SECONDS]     fuzz the configuration parser and the policy renderer, then DNS
                     message handling (default 60 s each)
  dist [--target T]  static router binaries in target/dist (aarch64 armv7 x86_64 mipsel)
  package [--target T]  .ipk packages for OpenWrt/opkg in target/dist (no SDK needed)
  vm ARCH... [--full]   boot Debian's Linux 6.1 for x86_64, aarch64 or mipsel under qemu and
                     run the lab in it (smoke run; --full: every VM check), results per arch
  vm ci              CI's VM stage: x86_64 --full, aarch64 and mipsel smoke runs
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["setup"] => setup::install(),
        ["demo"] => setup::install().and_then(|()| demo::up()),
        ["lab", "down"] => demo::down(),
        ["test"] => setup::install().and_then(|()| test()),
        ["bench", which @ ("killswitch" | "flows" | "dns" | "export" | "neighbour" | "product" | "idle"
        | "memory")] => setup::install().and_then(|()| bench::run_bench(which)),
        ["bench", "web"] => bench::run_bench("web"),
        ["fuzz"] => fuzz::run_fuzz(60),
        ["fuzz", secs] => match secs.parse() {
            Ok(s) => fuzz::run_fuzz(s),
            Err(_) => {
                eprint!("{USAGE}");
                return ExitCode::from(2);
            }
        },
        ["dist", rest @ ..] => setup::install().and_then(|()| dist::run_dist(rest)),
        ["package", rest @ ..] => setup::install().and_then(|()| package::run_package(rest)),
        ["vm", rest @ ..] => setup::install().and_then(|()| vm::run_vm(rest)),
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Run a command, inheriting stdio; fail with its name if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Build one of `cage-tests`' programs (`demo`, `bench`) and return a command that runs
/// it from the workspace's root (where it finds `bench/`, `target/`).
pub fn lab_program(name: &str) -> Result<Command> {
    run(cargo().args(["build", "--locked", "-p", "cage-tests", "--bin", name]))?;
    let mut cmd = Command::new(dist::target_dir().join("debug").join(name));
    cmd.current_dir(dist::workspace_root());
    Ok(cmd)
}

fn test() -> Result<()> {
    setup::require_root("the tests build network namespaces and nftables tables")?;
    let before = leftovers();
    let warnings = std::path::Path::new("target/tmp/cage-test-warnings.txt");
    let _ = std::fs::remove_file(warnings);
    run(cargo().args(["build", "--workspace", "--locked"]))?;
    // The router binaries and packages that tests/tests/package.rs checks under qemu
    // (aarch64, armv7), and the x86_64 package that tests/tests/install.rs installs with
    // OpenWrt's own opkg in a board's root; `cargo xtask dist` builds mipsel too.
    package::run_package(&["aarch64", "armv7", "x86_64"])?;
    // The kernel tests are `#[ignore = "needs root: cargo xtask test"]`, so that a plain
    // `cargo test` as anyone passes and says what it skipped; here they run too.
    // `--show-output` prints what passing tests printed (the contract matrix, the
    // restart figures), grouped by test after the run.
    let tests = run(cargo().args([
        "test",
        "--workspace",
        "--locked",
        "--no-fail-fast",
        "--",
        "--include-ignored",
        "--show-output",
    ]));
    // Checks the kernel here could not run: said loudly, at the end, every time.
    if let Ok(w) = std::fs::read_to_string(warnings) {
        for line in w.lines() {
            println!("xtask: NOT CHECKED ON THIS MACHINE: {line}");
        }
    }
    tests?;
    // Every test cleans up after itself; prove it for the whole run.
    let after = leftovers();
    let new: Vec<_> = after.iter().filter(|l| !before.contains(l)).collect();
    if !new.is_empty() {
        bail!("the tests left these behind: {new:?}");
    }
    println!("xtask: the tests left no namespace, root-namespace link or nftables table behind");
    Ok(())
}

/// What tests could leave on the machine: namespaces named like the tests' (`cgt-…`),
/// links in the root namespace, and nftables tables in the root namespace.
fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("cgt-") {
                found.push(format!("netns {name}"));
            }
        }
    }
    // What `cage` pinned in the labs (`cage_tests::lab::bpf_dir`).
    if let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("cage-lab-cgt-") {
                found.push(format!("bpffs /sys/fs/bpf/{name}"));
            }
        }
    }
    // What the eBPF tests pin (bpffs is global, not per namespace).
    if let Ok(dir) = std::fs::read_dir("/sys/fs/bpf/cage-test") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            found.push(format!("bpffs /sys/fs/bpf/cage-test/{name}"));
        }
    }
    let out = |args: &[&str]| {
        Command::new(args[0])
            .args(&args[1..])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    for line in out(&["ip", "-o", "link", "show"]).lines() {
        if let Some(name) = line.split(':').nth(1) {
            found.push(format!("link {}", name.trim()));
        }
    }
    for line in out(&["nft", "list", "tables"]).lines() {
        found.push(format!("nftables {}", line.trim()));
    }
    found
}
