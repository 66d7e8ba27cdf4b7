//! `cargo xtask demo`: the lab (a simulated travel router in network namespaces) with
//! `cage run` in the router, the connectivity contract checked with real packets and
//! printed, and the lab left up to poke at. `cargo xtask lab down` removes it.
//!
//! `demo up` and `demo down`, run by xtask after it has built `cage` (debug).

use std::os::unix::process::CommandExt;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cage_tests::contract;
use cage_tests::lab::{self, Lab};

/// The demo lab's prefix: namespaces `cage-router`, `cage-ai1`, …
pub const PREFIX: &str = "cage";

fn main() -> ExitCode {
    cage_tests::program_main(
        "usage: demo up | down  (run by `cargo xtask demo` and `cargo xtask lab down`)\n",
        |args| match args {
            ["up"] => Some(up()),
            ["down"] => Some(down()),
            _ => None,
        },
    )
}

fn up() -> Result<()> {
    cage_tests::root_for("the lab builds network namespaces and nftables tables")?;

    println!("xtask demo: building the lab (removing a previous one first)");
    let lab = Lab::up(PREFIX).context("bringing the lab up")?;
    let config = lab.write_config(contract::CONFIG_EXTRA);

    // `cage run` in the router's namespace, in a process group of its own so that it
    // keeps running after this command ends, as it would on the router.
    let log_path = lab.dir().join("cage-run.log");
    let log = std::fs::File::create(&log_path)?;
    lab.cage_command(&["run"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting cage run")?;
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("policy applied") {
            break;
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("cage run did not apply its policy within 20 s:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "xtask demo: cage run is up in {PREFIX}-router with {}",
        config.display()
    );

    println!("xtask demo: checking the connectivity contract with real packets…\n");
    let report = contract::run_matrix(&lab, &contract::checks());
    println!("{}", report.table());

    let status = lab.cage(&["status"]);
    println!("{}", String::from_utf8_lossy(&status.stdout));

    let ns = |n: &str| format!("{PREFIX}-{n}");
    let cage_cmd = format!(
        "nsenter --net=/run/netns/{} {} --config {}",
        ns("router"),
        lab::cage_bin()?.display(),
        config.display()
    );
    println!(
        "The lab stays up. Things to try (as root):\n\
         \x20 ip netns exec {ai1} ping -c1 203.0.113.10        # internet: allowed\n\
         \x20 ip netns exec {ai1} ping -c1 -W1 192.168.8.10    # the LAN: denied (admin prohibited)\n\
         \x20 ip netns exec {ai1} ping -c1 -W1 10.99.0.10      # the hotel network: denied\n\
         \x20 ip netns exec {ai1} ping -c1 -W1 192.168.10.12   # the other caged host: denied at layer 2\n\
         \x20 ip netns exec {lan} ping -c1 -I 192.168.8.20 192.168.10.11   # admin host: allowed\n\
         \x20 ip netns exec {router} nft list table inet cage   # Cage's policy\n\
         \x20 C=\"{c}\"\n\
         \x20 $C status                          # the cage, the daemon, denies, losses\n\
         \x20 $C flows -n 20                     # the flow log (allowed and blocked)\n\
         \x20 $C isolate --reason demo           # the kill switch ($C release ends it)\n\
         \x20 $C selftest --target 203.0.113.10  # prove the cage from inside\n\
         \x20 echo 'a long password' | $C passwd  # the web page's password\n\
         \x20 ip netns exec {lan} curl -sik https://192.168.8.1:{web}/login | head -1   # the web page (HTTPS, self-signed), from the LAN\n\
         \x20 ip netns exec {ai1} curl -m2 -k https://192.168.8.1:{web}/   # ... not from a caged host\n\
         \x20 kill -HUP $(ip netns pids {router})               # reload (a bad config is refused)\n\
         \x20 tail -f {log}                                      # cage run's log\n\
         \x20 cargo xtask lab down                              # remove the lab\n",
        ai1 = ns("ai1"),
        lan = ns("lan"),
        router = ns("router"),
        c = cage_cmd,
        web = lab::WEB_PORT,
        log = log_path.display(),
    );
    let failed = report.failures().len();
    lab.keep();
    if failed > 0 {
        bail!("{failed} contract checks failed (see the table above)");
    }
    Ok(())
}

fn down() -> Result<()> {
    cage_tests::root_for("removing network namespaces")?;
    lab::down(PREFIX).context("tearing the lab down")?;
    let left = lab::leftovers(PREFIX);
    if !left.is_empty() {
        bail!("still there after teardown: {left:?}");
    }
    println!("xtask: lab {PREFIX} removed");
    Ok(())
}
