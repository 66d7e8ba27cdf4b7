//! A lab with `cage run` in it, as on the host, with waits long enough for an emulated
//! CPU; the attach path the kernel gave the eBPF program; and the scenarios built on it.

use std::time::{Duration, Instant};

use crate::contract;
use crate::lab::{self, CageRun, Lab, Node};

use super::{cost, flows, kernel, killswitch, matrix, row};

/// The flow log's idle timeout in the VM's labs (seconds): short, so that records are
/// written soon after the traffic.
pub const IDLE_TIMEOUT: u64 = 1;

/// A lab and the `cage run` in its router.
pub struct Caged {
    pub lab: Lab,
    pub run: CageRun,
}

impl Caged {
    /// Where `cage` pinned the segment's programs and maps.
    pub fn pin_dir(&self) -> std::path::PathBuf {
        lab::bpf_dir(self.lab.prefix()).join("br-cage")
    }
}

/// Lab up, the contract's configuration with a short flow-log idle timeout (and
/// `extra`), `cage run` until its policy is applied; one row.
pub fn up(section: &str, extra: &str) -> Option<Caged> {
    let started = Instant::now();
    let lab = match Lab::up(&lab::unique_prefix()) {
        Ok(l) => l,
        Err(e) => {
            row(section, "lab up", false, "-", e);
            return None;
        }
    };
    let path = lab.write_config(contract::CONFIG_EXTRA);
    let text = std::fs::read_to_string(&path).unwrap_or_default()
        + &format!("\nconfig flowlog 'flowlog'\n\toption idle_timeout '{IDLE_TIMEOUT}'\n")
        + extra;
    if let Err(e) = std::fs::write(&path, text) {
        row(section, "configuration", false, "-", e);
        return None;
    }
    let lab_time = started.elapsed();
    let mut run = lab.spawn_cage_run();
    let applied = Instant::now();
    // An emulated CPU verifies and loads the eBPF program, and runs nft, many times
    // slower than the host: 15 s on the host's tests, 120 s here.
    while !run.log().contains("policy applied") {
        if applied.elapsed() > Duration::from_secs(120) || !run.is_running() {
            row(
                section,
                "cage run",
                false,
                "-",
                format!(
                    "no policy applied ({:.0} s): {}",
                    applied.elapsed().as_secs_f64(),
                    run.log()
                ),
            );
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let apply_time = applied.elapsed();
    let ready = lab
        .wait_segment_ready()
        .and_then(|()| lab.pin_router_neighbours(Node::Ai1));
    let ok = ready.is_ok();
    row(
        section,
        "cage run applies its policy",
        ok,
        format!("{:.1} s", apply_time.as_secs_f64()),
        match ready {
            Ok(()) => format!(
                "lab up in {:.1} s; segment forwarding",
                lab_time.as_secs_f64()
            ),
            Err(e) => format!("segment not ready: {e}"),
        },
    );
    ok.then_some(Caged { lab, run })
}

/// The eBPF program is attached through clsact and cls_bpf (no TCX before 6.6), at both
/// hooks of `br-cage`, as `tc` in the router sees it; interpreted or JIT-compiled as
/// `jit` says.
pub fn attach_path(section: &str, c: &Caged, jit: Option<bool>) -> bool {
    let log = c.run.log();
    let said = log
        .lines()
        .find(|l| l.contains("attached the flow counter"))
        .unwrap_or("")
        .to_owned();
    let mut tc = String::new();
    for hook in ["ingress", "egress"] {
        let mut cmd = c.lab.in_router_netns();
        // iproute2's tc by its path: busybox's nsenter prefers its own applets, and
        // busybox's tc knows no clsact.
        cmd.args(["/sbin/tc", "filter", "show", "dev", "br-cage", hook]);
        match lab::run_command(&mut cmd, None, Duration::from_secs(20)) {
            Ok(out) => {
                tc.push_str(&String::from_utf8_lossy(&out.stdout));
                tc.push_str(&String::from_utf8_lossy(&out.stderr));
            }
            Err(e) => tc.push_str(&format!("(tc failed: {e})")),
        }
    }
    let both = tc.contains("cage_tc_ingress") && tc.contains("cage_tc_egress");
    let da = tc.matches("direct-action").count() >= 2;
    let jited: Vec<bool> = ["cage_tc_ingress", "cage_tc_egress"]
        .iter()
        .filter_map(|p| aya::programs::ProgramInfo::from_pin(c.pin_dir().join(p)).ok())
        .map(|i| i.size_jitted() > 0)
        .collect();
    let jit_ok = match jit {
        Some(want) => jited.len() == 2 && jited.iter().all(|&j| j == want),
        None => jited.len() == 2,
    };
    let how = match jited.as_slice() {
        [true, true] => "JIT-compiled",
        [false, false] => "interpreted",
        _ => "JIT state unknown",
    };
    // TCX arrived in 6.6; before it, clsact and cls_bpf through netlink.
    let (release, _) = kernel::uname();
    let mut v = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    let tcx = (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 6);
    let netlink = said.contains(if tcx { "(Tcx" } else { "(Netlink" });
    row(
        section,
        "eBPF program attached",
        netlink && both && da && jit_ok,
        format!("clsact + cls_bpf, {how}"),
        if netlink && both && da {
            format!(
                "no TCX on {release}: cage chose netlink; tc shows both programs direct-action on br-cage"
            )
        } else {
            format!("cage said {said:?}; tc: {}", tc.replace('\n', " | "))
        },
    )
}

/// CI's run: boot (done), load (the attach), one flow counted exactly, one allow and
/// one deny of the contract, one isolation.
pub fn smoke() {
    let jit = kernel::sysctl("net/core/bpf_jit_enable").map(|v| v != "0");
    let Some(c) = up("smoke", "") else { return };
    attach_path("smoke", &c, jit);
    flows::exact(&c, "smoke", &[flows::Kind::Udp4]);
    matrix::smoke(&c.lab);
    killswitch::leaks(&c, "smoke");
}

/// The eBPF checks of the full run with the JIT on or off: attach, exact counts for
/// UDP, TCP and ICMP over IPv4 and IPv6, the run time per packet, the kill switch.
pub fn full_flows(jit: bool) {
    let section = if jit { "eBPF, JIT on" } else { "eBPF, JIT off" };
    if let Err(e) = kernel::set_jit(jit) {
        row(section, "BPF JIT setting", false, "-", e);
        return;
    }
    if let Err(e) = kernel::set_sysctl("kernel/bpf_stats_enabled", "1") {
        row(section, "kernel.bpf_stats_enabled", false, "-", e);
        return;
    }
    let Some(c) = up(section, "") else { return };
    attach_path(section, &c, Some(jit));
    flows::exact(&c, section, &flows::Kind::ALL);
    cost::per_packet(&c, section);
    killswitch::leaks(&c, section);
}
