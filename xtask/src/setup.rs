//! Install what building and testing Cage needs, idempotently and quickly when it is
//! already there: Debian packages (nftables, iproute2, ping, tcpdump, iperf3) and the
//! rustup components the checks use.

use std::process::Command;

use anyhow::{bail, Result};

use crate::run;

/// Debian packages and a program each provides, to tell whether it is installed.
const PACKAGES: &[(&str, &str)] = &[
    ("nftables", "nft"),
    ("iproute2", "ip"),
    ("iputils-ping", "ping"),
    ("tcpdump", "tcpdump"),
    ("iperf3", "iperf3"),
];

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run this as root: {why}");
    }
    Ok(())
}

pub fn install() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, program)| !have(program))
        .map(|(pkg, _)| *pkg)
        .collect();
    if !missing.is_empty() {
        require_root("installing Debian packages")?;
        println!("xtask setup: installing {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    for component in ["rustfmt", "clippy"] {
        let installed = Command::new("rustup")
            .args(["component", "list", "--installed"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains(component))
            .unwrap_or(false);
        if !installed {
            println!("xtask setup: adding rustup component {component}");
            run(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    println!("xtask setup: ready");
    Ok(())
}
