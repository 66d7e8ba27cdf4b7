//! What Cage's program costs per packet, from the kernel's own accounting
//! (`kernel.bpf_stats_enabled`: run_time_ns and run_cnt of each program): the change
//! over a known burst of echoed UDP datagrams. Under an emulated CPU the figure is only
//! relative (JIT against interpreter, one architecture against another).

use std::time::Duration;

use cage_agent::probe::{Servers, Service};

use crate::lab::{Node, AI1_4, PUBLIC4};

use super::caged::Caged;
use super::row;

const PROGRAMS: [&str; 2] = ["cage_tc_ingress", "cage_tc_egress"];
const DATAGRAMS: u64 = 2000;

fn stats(c: &Caged) -> Result<(u64, u64), String> {
    let mut runs = 0;
    let mut ns = 0;
    for p in PROGRAMS {
        let path = c.pin_dir().join(p);
        let info = aya::programs::ProgramInfo::from_pin(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        runs += info.run_count();
        ns += info.run_time().as_nanos() as u64;
    }
    Ok((runs, ns))
}

/// One row: nanoseconds per run of the program over [`DATAGRAMS`] echoed datagrams.
pub fn per_packet(c: &Caged, section: &str) {
    let servers = match Servers::start(
        &c.lab.netns(Node::Inet),
        &[Service::udp(7002)],
        Duration::from_secs(300),
    ) {
        Ok(s) => s,
        Err(e) => {
            row(section, "program cost", false, "-", e);
            return;
        }
    };
    let before = match stats(c) {
        Ok(s) => s,
        Err(e) => {
            row(section, "program cost", false, "-", e);
            return;
        }
    };
    let sent = c.lab.netns(Node::Ai1).run("burst", || {
        let s = std::net::UdpSocket::bind((AI1_4, 0)).expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut echoed = 0u64;
        for i in 0..DATAGRAMS {
            let _ = s.send_to(&[i as u8; 64], (PUBLIC4, 7002));
            let mut b = [0u8; 128];
            if s.recv_from(&mut b).is_ok() {
                echoed += 1;
            }
        }
        Ok(echoed)
    });
    drop(servers);
    let after = stats(c);
    match (sent, after) {
        (Ok(echoed), Ok(after)) => {
            let runs = after.0 - before.0;
            let ns = after.1 - before.1;
            let per = ns as f64 / runs.max(1) as f64;
            row(
                section,
                "program run time per packet (kernel.bpf_stats_enabled)",
                runs >= DATAGRAMS + echoed && ns > 0,
                format!("{per:.0} ns/packet"),
                format!(
                    "{runs} runs, {ns} ns over {DATAGRAMS} datagrams and {echoed} echoes (64 B) through br-cage; emulated CPU: relative only"
                ),
            );
        }
        (Err(e), _) => {
            row(section, "program cost", false, "-", e);
        }
        (_, Err(e)) => {
            row(section, "program cost", false, "-", e);
        }
    }
}
