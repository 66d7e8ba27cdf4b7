//! The flow log: one JSON Lines record per flow, accepted or blocked, in
//! `<log_dir>/flows/flows.jsonl`, rotated at `flowlog.log_max_bytes` with
//! `flowlog.log_files` old files kept.
//!
//! Blocked flows come from NFLOG (see `nflog`): the denied packets of one caged host
//! towards one destination, port and protocol, denied by one rule, are folded into one
//! record per flush interval. Nothing is lost silently: packets over the kernel's log
//! rate limit, log messages the kernel could not deliver, and records rotated away are
//! counted in `<log_dir>/flows/stats.json`, which `cage status` shows.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::nflog::Denied;

/// One flow, as written to the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// First and last packet, RFC 3339 UTC with milliseconds.
    pub start: String,
    pub end: String,
    /// `allowed` or `blocked`.
    pub verdict: String,
    /// The rule that blocked it (`deny:lan`, …); none for an allowed flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, or the protocol number.
    pub proto: String,
    /// The caged host.
    pub host: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The other end.
    pub peer: IpAddr,
    /// The peer's port (for ICMP, the type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_port: Option<u16>,
    /// `out` when the caged host spoke first, `in` when the peer did.
    pub direction: String,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    /// `selftest` for the probe traffic of `cage selftest` (known by its MAC prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// Whether a MAC address is one of `cage selftest`'s probe hosts.
pub fn is_selftest_mac(m: &[u8; 6]) -> bool {
    m[..5] == crate::selftest::MAC_PREFIX
}

pub fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        n => n.to_string(),
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

pub fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Losses and totals, kept beside the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogStats {
    /// Records written since the log was created.
    pub written: u64,
    /// Records in files rotated away (deleted) before anyone read them.
    pub rotated_away: u64,
    /// Denied packets the kernel could not hand over (NFLOG socket overrun events).
    pub nflog_overruns: u64,
    /// Denied packets the collector could not keep up with.
    pub nflog_dropped: u64,
}

pub fn dir(cfg: &Config) -> PathBuf {
    cfg.main.log_dir.join("flows")
}

/// The log files, oldest first: `flows.jsonl.N` … `flows.jsonl.1`, `flows.jsonl`.
pub fn files(dir: &Path, keep: u32) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = (1..=keep)
        .rev()
        .map(|i| dir.join(format!("flows.jsonl.{i}")))
        .filter(|p| p.exists())
        .collect();
    let current = dir.join("flows.jsonl");
    if current.exists() {
        v.push(current);
    }
    v
}

/// Appends records, rotates, and keeps the loss counts.
pub struct FlowLog {
    dir: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: File,
    size: u64,
    lines: u64,
    pub stats: LogStats,
}

impl FlowLog {
    pub fn open(cfg: &Config) -> io::Result<FlowLog> {
        let dir = dir(cfg);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("flows.jsonl");
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        let lines = count_lines(&path);
        let stats = std::fs::read(dir.join("stats.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Ok(FlowLog {
            dir,
            max_bytes: cfg.flowlog.log_max_bytes,
            keep: cfg.flowlog.log_files,
            file,
            size,
            lines,
            stats,
        })
    }

    pub fn write(&mut self, records: &[FlowRecord]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for r in records {
            serde_json::to_writer(&mut buf, r).map_err(io::Error::other)?;
            buf.push(b'\n');
        }
        if self.size + buf.len() as u64 > self.max_bytes && self.size > 0 {
            self.rotate()?;
        }
        // One write per batch: on flash, fewer and larger writes wear less.
        self.file.write_all(&buf)?;
        self.size += buf.len() as u64;
        self.lines += records.len() as u64;
        self.stats.written += records.len() as u64;
        self.save_stats()
    }

    fn rotate(&mut self) -> io::Result<()> {
        let oldest = self.dir.join(format!("flows.jsonl.{}", self.keep));
        if oldest.exists() {
            self.stats.rotated_away += count_lines(&oldest);
            std::fs::remove_file(&oldest)?;
        }
        for i in (1..self.keep).rev() {
            let from = self.dir.join(format!("flows.jsonl.{i}"));
            if from.exists() {
                std::fs::rename(&from, self.dir.join(format!("flows.jsonl.{}", i + 1)))?;
            }
        }
        let current = self.dir.join("flows.jsonl");
        std::fs::rename(&current, self.dir.join("flows.jsonl.1"))?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&current)?;
        self.size = 0;
        self.lines = 0;
        Ok(())
    }

    pub fn save_stats(&self) -> io::Result<()> {
        let tmp = self.dir.join("stats.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec(&self.stats).map_err(io::Error::other)?,
        )?;
        std::fs::rename(tmp, self.dir.join("stats.json"))
    }
}

fn count_lines(path: &Path) -> u64 {
    File::open(path)
        .map(|f| BufReader::new(f).lines().count() as u64)
        .unwrap_or(0)
}

pub fn read_stats(cfg: &Config) -> Option<LogStats> {
    std::fs::read(dir(cfg).join("stats.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// Denied packets folded into blocked-flow records until the next flush.
#[derive(Debug, Default)]
pub struct Blocked {
    flows: HashMap<BlockedKey, BlockedFlow>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BlockedKey {
    rule: String,
    proto: u8,
    host: IpAddr,
    peer: IpAddr,
    /// The port (or ICMP type) the attempt was aimed at: the peer's for an outbound
    /// attempt, the caged host's for an inbound one.
    service: Option<u16>,
    direction: &'static str,
}

#[derive(Debug)]
struct BlockedFlow {
    start: SystemTime,
    end: SystemTime,
    /// The other end's port; `None` once it varied (a scan, retries).
    other_port: Option<u16>,
    mac: Option<[u8; 6]>,
    packets: u64,
    bytes: u64,
}

/// Blocked flows in memory at most; beyond it, packets are counted as dropped.
pub const MAX_BLOCKED_FLOWS: usize = 16_384;

impl Blocked {
    /// Add one denied packet. Returns false if it could not be kept (table full).
    pub fn add(&mut self, d: &Denied, segment: &[IpNet]) -> bool {
        // The caged host is the segment's end of the packet; a packet into the segment
        // (from the LAN, say) has it as destination.
        let inbound = !segment.iter().any(|n| n.contains(&d.src))
            && segment.iter().any(|n| n.contains(&d.dst));
        let (host, peer) = if inbound {
            (d.dst, d.src)
        } else {
            (d.src, d.dst)
        };
        let key = BlockedKey {
            rule: d.rule.clone(),
            proto: d.proto,
            host,
            peer,
            service: d.dport,
            direction: if inbound { "in" } else { "out" },
        };
        let full = self.flows.len() >= MAX_BLOCKED_FLOWS;
        match self.flows.get_mut(&key) {
            Some(f) => {
                f.end = d.at;
                f.packets += 1;
                f.bytes += u64::from(d.len);
                if f.other_port != d.sport {
                    f.other_port = None;
                }
                true
            }
            None if full => false,
            None => {
                self.flows.insert(
                    key,
                    BlockedFlow {
                        start: d.at,
                        end: d.at,
                        other_port: d.sport,
                        mac: if inbound { None } else { d.mac },
                        packets: 1,
                        bytes: u64::from(d.len),
                    },
                );
                true
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Every blocked flow so far as a record, oldest first; the table starts afresh.
    pub fn drain(&mut self) -> Vec<FlowRecord> {
        let mut v: Vec<(BlockedKey, BlockedFlow)> = self.flows.drain().collect();
        v.sort_by_key(|(_, f)| f.start);
        v.into_iter()
            .map(|(k, f)| {
                let out = k.direction == "out";
                FlowRecord {
                    start: rfc3339(f.start),
                    end: rfc3339(f.end),
                    verdict: "blocked".into(),
                    rule: Some(k.rule),
                    proto: proto_name(k.proto),
                    host: k.host,
                    host_port: if out { f.other_port } else { k.service },
                    mac: f.mac.map(mac_text),
                    peer: k.peer,
                    peer_port: if out { k.service } else { f.other_port },
                    direction: k.direction.into(),
                    packets_out: if out { f.packets } else { 0 },
                    bytes_out: if out { f.bytes } else { 0 },
                    packets_in: if out { 0 } else { f.packets },
                    bytes_in: if out { 0 } else { f.bytes },
                    tag: f
                        .mac
                        .filter(is_selftest_mac)
                        .map(|_| "selftest".to_owned()),
                }
            })
            .collect()
    }
}

/// Which records `cage flows` shows.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub host: Option<IpAddr>,
    pub port: Option<u16>,
    pub verdict: Option<String>,
}

impl Filter {
    pub fn matches(&self, r: &FlowRecord) -> bool {
        self.host.is_none_or(|h| r.host == h || r.peer == h)
            && self
                .port
                .is_none_or(|p| r.peer_port == Some(p) || r.host_port == Some(p))
            && self.verdict.as_ref().is_none_or(|v| &r.verdict == v)
    }
}

/// All records in the log, oldest first, that match `filter`. Lines that are not records
/// (a torn last line after a power cut) are skipped and counted.
pub fn read(dir: &Path, keep: u32, filter: &Filter) -> (Vec<FlowRecord>, usize) {
    let mut out = Vec::new();
    let mut bad = 0;
    for path in files(dir, keep) {
        let Ok(f) = File::open(&path) else { continue };
        for line in BufReader::new(f).lines().map_while(Result::ok) {
            match serde_json::from_str::<FlowRecord>(&line) {
                Ok(r) if filter.matches(&r) => out.push(r),
                Ok(_) => {}
                Err(_) => bad += 1,
            }
        }
    }
    (out, bad)
}

/// One line of `cage flows`' table.
pub fn table_line(r: &FlowRecord) -> String {
    let end = |a: IpAddr, p: Option<u16>| match (a, p) {
        (IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
        (a, Some(p)) => format!("{a}:{p}"),
        (a, None) => a.to_string(),
    };
    let arrow = if r.direction == "in" { "<-" } else { "->" };
    format!(
        "{} {:<7} {:<22} {:<6} {} {arrow} {}  out {} pkt/{} B  in {} pkt/{} B",
        &r.start,
        r.verdict,
        r.rule.as_deref().unwrap_or("-"),
        r.proto,
        end(r.host, r.host_port),
        end(r.peer, r.peer_port),
        r.packets_out,
        r.bytes_out,
        r.packets_in,
        r.bytes_in
    ) + &r.tag.as_ref().map(|t| format!("  [{t}]")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn denied(src: &str, dst: &str, sport: u16, dport: u16, rule: &str) -> Denied {
        Denied {
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            rule: rule.into(),
            proto: 6,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport: Some(sport),
            dport: Some(dport),
            mac: Some([2, 0, 0, 0, 0, 0x11]),
            len: 60,
        }
    }

    #[test]
    fn denied_packets_fold_into_one_record_per_destination_and_rule() {
        let seg: Vec<IpNet> = vec!["192.168.10.0/24".parse().unwrap()];
        let mut b = Blocked::default();
        for sport in [40000, 40001, 40002] {
            assert!(b.add(
                &denied("192.168.10.11", "192.168.8.10", sport, 22, "deny:lan"),
                &seg
            ));
        }
        assert!(b.add(
            &denied("192.168.10.11", "192.168.8.10", 40003, 80, "deny:lan"),
            &seg
        ));
        for sport in [50000, 50001] {
            let d = denied(
                "192.168.8.10",
                "192.168.10.11",
                sport,
                22,
                "deny:into-segment",
            );
            assert!(b.add(&d, &seg));
        }
        let mut records = b.drain();
        records.sort_by_key(|r| (r.rule.clone(), r.peer_port));
        assert_eq!(records.len(), 3);
        assert!(b.is_empty());
        let ssh = &records[1];
        assert_eq!(ssh.rule.as_deref(), Some("deny:lan"));
        assert_eq!(ssh.peer_port, Some(22));
        assert_eq!((ssh.packets_out, ssh.bytes_out), (3, 180));
        assert_eq!(ssh.host_port, None, "three source ports: none named");
        assert_eq!(ssh.mac.as_deref(), Some("02:00:00:00:00:11"));
        let inbound = &records[0];
        assert_eq!(inbound.direction, "in");
        assert_eq!(inbound.host, "192.168.10.11".parse::<IpAddr>().unwrap());
        assert_eq!(inbound.host_port, Some(22));
        assert_eq!(inbound.peer_port, None);
        assert_eq!(inbound.packets_in, 2);
    }
}
