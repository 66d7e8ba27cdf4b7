//! The lab in a VM: what `vmlab` (`src/bin/vmlab.rs`) runs inside the guests of `cargo
//! xtask vm` (Debian's Linux 6.1 on x86_64, aarch64 and mipsel under qemu). The same lab
//! and contract as on the host ([`crate::lab`], [`crate::contract`]), the real static
//! `cage` of the router, and the kernel's own modules; the results go out on the serial
//! console as lines `VMLAB<TAB>ROW<TAB>section<TAB>check<TAB>ok|FAIL<TAB>figure<TAB>detail`
//! that xtask turns into the table per architecture.
//!
//! One file per concern: `kernel` (modules, sysctls, what the kernel has), `caged` (a lab
//! with `cage run` in it and the attach path), `flows` (exact counts), `killswitch`
//! (leaks after the press), `cost` (the program's run time per packet), `matrix` (the
//! contract or its subsets), `vlan`, `offload` and `golden` (x86_64's full run).
//!
//! Each scenario runs in a process of its own (`vmlab run NAME`), so a panic (an abort:
//! `vmlab` has the release profile) or a hang ends one scenario, which is then reported
//! as failed, and not the whole run.

use std::fmt::Display;
use std::io::Write;

pub mod caged;
pub mod cost;
pub mod flows;
pub mod golden;
pub mod kernel;
pub mod killswitch;
pub mod matrix;
pub mod offload;
pub mod vlan;

/// Print one result row; `ok` back, so callers can count.
pub fn row(
    section: &str,
    check: &str,
    ok: bool,
    figure: impl Display,
    detail: impl Display,
) -> bool {
    let clean = |s: String| s.replace(['\t', '\n', '\r'], " ");
    let line = format!(
        "VMLAB\tROW\t{}\t{}\t{}\t{}\t{}",
        clean(section.to_owned()),
        clean(check.to_owned()),
        if ok { "ok" } else { "FAIL" },
        clean(figure.to_string()),
        clean(detail.to_string()),
    );
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    ok
}

/// Print one fact about the guest (kernel, CPU, boot time) for the table's heading.
pub fn fact(key: &str, value: impl Display) {
    let value = value.to_string().replace(['\t', '\n'], " ");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "VMLAB\tFACT\t{key}\t{value}");
    let _ = out.flush();
}

/// What the guest was asked to run (`vmlab.mode=` on the kernel's command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// CI's run on every architecture: boot, load, one flow counted exactly, one deny,
    /// one isolation.
    Smoke,
    /// Everything (`cargo xtask vm ARCH --full`).
    Full,
}

/// The scenarios, in the order they run, for this architecture and mode.
pub fn plan(mode: Mode, arch: &str) -> Vec<&'static str> {
    match mode {
        Mode::Smoke => vec!["smoke"],
        Mode::Full => {
            // The JIT the kernel boots with first (mipsel's is off), then the other.
            let mut p = if arch == "mips" {
                vec!["flows-jit-off", "flows-jit-on"]
            } else {
                vec!["flows-jit-on", "flows-jit-off"]
            };
            if arch == "x86_64" {
                p.extend(["contract", "vlan", "offload", "golden"]);
            } else {
                p.extend(["contract-subset", "golden"]);
            }
            p
        }
    }
}

/// Run one scenario in this process (`vmlab run NAME`); false for an unknown name.
pub fn run_scenario(name: &str) -> bool {
    match name {
        "smoke" => caged::smoke(),
        "flows-jit-on" => caged::full_flows(true),
        "flows-jit-off" => caged::full_flows(false),
        "contract" => matrix::full(),
        "contract-subset" => matrix::subset(),
        "vlan" => vlan::run(),
        "offload" => offload::run(),
        "golden" => golden::run(),
        _ => return false,
    }
    true
}
