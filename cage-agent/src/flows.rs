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

pub use cage_common::records::{FlowFilter, FlowRecord};

use crate::clock::rfc3339;
use crate::config::Config;
use crate::nflog::Denied;

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
        crate::nflog::PROTO_ARP => "arp".into(),
        n => n.to_string(),
    }
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
    /// Flows the eBPF program counted and that were written and removed from its map.
    #[serde(default)]
    pub ebpf_removed: u64,
    /// Flows the eBPF map had to evict before they were written (map too small), and
    /// packets it could not record at all.
    #[serde(default)]
    pub ebpf_evicted: u64,
    #[serde(default)]
    pub ebpf_update_failed: u64,
    /// New flows not recorded because their host had its share of the eBPF map
    /// (`limits.flow_share`): the flooding host's, while the others stay recorded.
    #[serde(default)]
    pub ebpf_over_share: u64,
    /// Records not copied to the persistent directory because the day's write budget
    /// was spent.
    #[serde(default)]
    pub persist_over_budget: u64,
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
/// The most of the flow log's text [`FlowLog::write`] holds before writing it.
const WRITE_CHUNK: usize = 256 * 1024;

pub struct FlowLog {
    dir: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: File,
    size: u64,
    lines: u64,
    /// Bytes appended since it was opened, across rotations.
    appended: u64,
    pub stats: LogStats,
    /// What `stats.json` was last written with: an idle daemon does not rewrite it.
    stats_saved: Option<Vec<u8>>,
}

impl FlowLog {
    pub fn open(cfg: &Config) -> io::Result<FlowLog> {
        Self::open_at(dir(cfg), cfg.flowlog.log_max_bytes, cfg.flowlog.log_files)
    }

    /// A log in `dir`, rotated at `max_bytes`, `keep` old files kept.
    pub fn open_at(dir: PathBuf, max_bytes: u64, keep: u32) -> io::Result<FlowLog> {
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
            max_bytes,
            keep,
            file,
            size,
            lines,
            appended: 0,
            stats,
            stats_saved: None,
        })
    }

    pub fn write(&mut self, records: &[FlowRecord]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        // Few, large writes (on flash, fewer and larger writes wear less), but at most
        // WRITE_CHUNK bytes held at once: 64 k records expiring together are 20 MB of
        // text, which a router's daemon should not hold all at once.
        let mut buf = Vec::new();
        let mut in_buf = 0;
        for (i, r) in records.iter().enumerate() {
            serde_json::to_writer(&mut buf, r).map_err(io::Error::other)?;
            buf.push(b'\n');
            in_buf += 1;
            if buf.len() >= WRITE_CHUNK || i + 1 == records.len() {
                self.write_lines(&buf, in_buf)?;
                buf.clear();
                in_buf = 0;
            }
        }
        crate::metrics::record(records);
        self.save_stats()
    }

    /// Append `n` whole lines, rotating first when they would take the file over its
    /// size.
    fn write_lines(&mut self, buf: &[u8], n: u64) -> io::Result<()> {
        if self.size + buf.len() as u64 > self.max_bytes && self.size > 0 {
            self.rotate()?;
        }
        self.file.write_all(buf)?;
        self.size += buf.len() as u64;
        self.appended += buf.len() as u64;
        self.lines += n;
        self.stats.written += n;
        Ok(())
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

    pub fn save_stats(&mut self) -> io::Result<()> {
        let path = self.dir.join("stats.json");
        self.stats_saved = save_changed(
            &path,
            serde_json::to_vec(&self.stats).map_err(io::Error::other)?,
            self.stats_saved.take(),
        )?;
        Ok(())
    }
}

/// Write `bytes` to `path` (through a temporary file, renamed) unless `saved`, what it was
/// last written with, is the same and the file is still there; what is there now.
fn save_changed(
    path: &Path,
    bytes: Vec<u8>,
    saved: Option<Vec<u8>>,
) -> io::Result<Option<Vec<u8>>> {
    if saved.as_ref() == Some(&bytes) && path.exists() {
        return Ok(saved);
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(tmp, path)?;
    Ok(Some(bytes))
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
    /// The interface the first packet came in on (see [`Denied::indev`]).
    indev: Option<u32>,
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
                        indev: if inbound { None } else { d.indev },
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
                    bridge_port: f.indev.and_then(ifname),
                    peer: k.peer,
                    peer_port: if out { k.service } else { f.other_port },
                    direction: k.direction.into(),
                    packets_out: if out { f.packets } else { 0 },
                    bytes_out: if out { f.bytes } else { 0 },
                    packets_in: if out { 0 } else { f.packets },
                    bytes_in: if out { 0 } else { f.bytes },
                    tag: f.mac.filter(is_selftest_mac).map(|_| "selftest".to_owned()),
                    tcp_flags: None,
                    hostname: None,
                    name: None,
                }
            })
            .collect()
    }
}

/// The name of interface `index`, if it exists.
pub fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname writes at most.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the name is NUL-terminated within `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Name each record's bridge port: the port a denied frame came in on where NFLOG said
/// (the bridge table's denies: `deny:mac-theft` and the like name the thief's port, not
/// the victim's), else its MAC's binding (`ports`: lower-case MAC → port). The
/// segment's `bridge` itself (the inet table's denies) is no port.
pub fn name_ports(records: &mut [FlowRecord], ports: &HashMap<String, String>, bridge: &str) {
    for r in records {
        if r.bridge_port.as_deref() == Some(bridge) {
            r.bridge_port = None;
        }
        if r.bridge_port.is_some() || r.rule.as_deref() == Some("deny:mac-theft") {
            continue;
        }
        if let Some(mac) = &r.mac {
            r.bridge_port = ports.get(&mac.to_ascii_lowercase()).cloned();
        }
    }
}

/// All records in the log, oldest first, that match `filter`. Lines that are not records
/// (a torn last line after a power cut) are skipped and counted.
pub fn read(dir: &Path, keep: u32, filter: &FlowFilter) -> (Vec<FlowRecord>, usize) {
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

/// All records that match `filter`, oldest first: the log and, when
/// `flowlog.persist_dir` is set, its copy on flash (after a reboot the RAM log starts
/// empty; the copy has the past, and where the two overlap each record is shown once).
pub fn read_all(cfg: &Config, filter: &FlowFilter) -> (Vec<FlowRecord>, usize) {
    let (mut records, bad) = read(&dir(cfg), cfg.flowlog.log_files, filter);
    if let Some(persist) = &cfg.flowlog.persist_dir {
        let (old, _) = read(persist, cfg.flowlog.log_files, filter);
        let seen: std::collections::HashSet<String> = records
            .iter()
            .map(|r| serde_json::to_string(r).unwrap_or_default())
            .collect();
        let mut merged: Vec<FlowRecord> = old
            .into_iter()
            .filter(|r| !seen.contains(&serde_json::to_string(r).unwrap_or_default()))
            .collect();
        merged.append(&mut records);
        records = merged;
    }
    (records, bad)
}

/// One line of `cage flows`' table.
pub fn table_line(r: &FlowRecord) -> String {
    let end = |a: IpAddr, p: Option<u16>| match (a, p) {
        (IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
        (a, Some(p)) => format!("{a}:{p}"),
        (a, None) => a.to_string(),
    };
    let arrow = if r.direction == "in" { "<-" } else { "->" };
    let peer = match &r.name {
        Some(n) => format!("{} ({n})", end(r.peer, r.peer_port)),
        None => end(r.peer, r.peer_port),
    };
    format!(
        "{} {:<7} {:<22} {:<6} {} {arrow} {}  out {} pkt/{} B  in {} pkt/{} B",
        &r.start,
        r.verdict,
        r.rule.as_deref().unwrap_or("-"),
        r.proto,
        end(r.host, r.host_port),
        peer,
        r.packets_out,
        r.bytes_out,
        r.packets_in,
        r.bytes_in
    ) + &r
        .tag
        .as_ref()
        .map(|t| format!("  [{t}]"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_lease_binds_its_address_and_wins_over_first_come() {
        let subnet: ipnet::Ipv4Net = "192.168.10.1/24".parse().unwrap();
        let leases = vec![
            // ai2's lease, its address taken first by ai1.
            (
                "192.168.10.100".parse().unwrap(),
                "02:ca:9e:00:00:12".into(),
                5000,
            ),
            // Bound already to its own MAC: nothing to do.
            (
                "192.168.10.101".parse().unwrap(),
                "02:ca:9e:00:00:13".into(),
                0,
            ),
            // Not bound yet.
            (
                "192.168.10.102".parse().unwrap(),
                "02:ca:9e:00:00:14".into(),
                1100,
            ),
            // Ended, and another network's.
            (
                "192.168.10.103".parse().unwrap(),
                "02:ca:9e:00:00:15".into(),
                900,
            ),
            (
                "192.168.8.100".parse().unwrap(),
                "02:ca:9e:00:00:16".into(),
                5000,
            ),
        ];
        let bound = vec![
            (
                "192.168.10.100".parse().unwrap(),
                "02:ca:9e:00:00:11".into(),
                3000,
            ),
            (
                "192.168.10.101".parse().unwrap(),
                "02:CA:9E:00:00:13".into(),
                3000,
            ),
        ];
        assert_eq!(
            lease_bindings(&leases, &bound, subnet, 1000, 3600),
            vec![
                (
                    "192.168.10.100".parse().unwrap(),
                    Some("02:ca:9e:00:00:11".into()),
                    "02:ca:9e:00:00:12".into(),
                    3600
                ),
                (
                    "192.168.10.102".parse().unwrap(),
                    None,
                    "02:ca:9e:00:00:14".into(),
                    100
                ),
            ]
        );
    }

    #[test]
    fn records_name_their_machines_port_but_not_a_stolen_macs() {
        let d = |rule: &str| denied("192.168.10.11", "192.168.8.10", 40000, 22, rule);
        let lo = ifname(1).expect("interface 1 (lo) has a name");
        let mut b = Blocked::default();
        b.add(&d("deny:lan"), &[]);
        b.add(&d("deny:mac-theft"), &[]);
        // A bridge-table deny that says where the frame came in.
        b.add(
            &Denied {
                indev: Some(1),
                ..d("deny:addr-theft")
            },
            &[],
        );
        let mut records = b.drain();
        records.push(FlowRecord {
            mac: None,
            bridge_port: None,
            rule: Some("deny:lan".into()),
            ..records[0].clone()
        });
        // The inet table's: "came in on the bridge", which is no port.
        records.push(FlowRecord {
            rule: Some("deny:spoofed-source".into()),
            bridge_port: Some("br-cage".into()),
            ..records[0].clone()
        });
        let ports: HashMap<String, String> =
            [("02:00:00:00:00:11".to_owned(), "eth1".to_owned())].into();
        name_ports(&mut records, &ports, "br-cage");
        let got: Vec<(Option<&str>, Option<&str>)> = records
            .iter()
            .map(|r| (r.rule.as_deref(), r.bridge_port.as_deref()))
            .collect();
        assert!(got.contains(&(Some("deny:lan"), Some("eth1"))), "{got:?}");
        assert!(got.contains(&(Some("deny:mac-theft"), None)), "{got:?}");
        assert!(
            got.contains(&(Some("deny:addr-theft"), Some(lo.as_str()))),
            "{got:?}"
        );
        assert_eq!(
            got[4],
            (Some("deny:spoofed-source"), Some("eth1")),
            "{got:?}"
        );
        assert_eq!(records[3].bridge_port, None, "no MAC, no port");
    }

    #[test]
    fn the_lease_file_reads_as_dnsmasq_writes_it() {
        let dir = std::env::temp_dir().join(format!("cage-leases-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dhcp.leases");
        std::fs::write(
            &path,
            "1700000000 02:CA:9E:00:00:12 192.168.10.100 agent-mini 01:02:ca:9e:00:00:12\n\
             0 02:ca:9e:00:00:13 192.168.10.101 * *\n\
             garbage line\n",
        )
        .unwrap();
        assert_eq!(
            dhcp_leases(&path),
            vec![
                (
                    "192.168.10.100".parse().unwrap(),
                    "02:ca:9e:00:00:12".into(),
                    1_700_000_000
                ),
                (
                    "192.168.10.101".parse().unwrap(),
                    "02:ca:9e:00:00:13".into(),
                    0
                ),
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
            indev: None,
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

// ---- flows counted in eBPF --------------------------------------------------------------

/// What was already written of a flow still in the kernel's map (after an active
/// timeout): the next record of it carries only what came after. Kept on disk so a
/// restarted daemon neither writes it twice nor loses it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Baseline {
    pub start_ns: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
}

/// A flow's 5-tuple from the caged host's side: (protocol, host, host port, peer, peer
/// port). Used to tell the eBPF record of a blocked attempt from an allowed flow.
pub type Tuple = (u8, IpAddr, u16, IpAddr, u16);

/// Ends flows the eBPF program counted, NetFlow style: a flow idle for
/// `flowlog.idle_timeout` is written and removed from the map; one older than
/// `flowlog.active_timeout` is written and goes on as a new record.
#[derive(Debug, Default)]
pub struct Sweeper {
    baselines: HashMap<String, Baseline>,
    /// 5-tuples that NFLOG reported denied, and when: their eBPF records are the same
    /// attempts as the blocked records and are not written again.
    blocked: HashMap<Tuple, std::time::Instant>,
    /// What `baselines.json` was last written with, and where.
    saved: Option<(PathBuf, Vec<u8>)>,
}

fn key_id(k: &cage_common::FlowKey) -> String {
    format!(
        "{}:{}:{}:{}:{}",
        k.protocol,
        k.client_ip(),
        k.client_port,
        k.server_ip(),
        k.server_port
    )
}

fn flags_text(f: u8) -> String {
    let mut s = String::new();
    for (bit, c) in [
        (0x02, 'S'),
        (0x10, 'A'),
        (0x08, 'P'),
        (0x01, 'F'),
        (0x04, 'R'),
        (0x20, 'U'),
    ] {
        if f & bit != 0 {
            s.push(c);
        }
    }
    s
}

impl Sweeper {
    pub fn load(dir: &Path) -> Sweeper {
        let baselines = std::fs::read(dir.join("baselines.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Sweeper {
            baselines,
            blocked: HashMap::new(),
            saved: None,
        }
    }

    pub fn save(&mut self, dir: &Path) -> io::Result<()> {
        let path = dir.join("baselines.json");
        let saved = self
            .saved
            .take()
            .filter(|(p, _)| *p == path)
            .map(|(_, b)| b);
        let bytes = serde_json::to_vec(&self.baselines).map_err(io::Error::other)?;
        self.saved = save_changed(&path, bytes, saved)?.map(|b| (path, b));
        Ok(())
    }

    /// A denied packet from NFLOG, from the caged host's side.
    pub fn note_blocked(&mut self, d: &Denied, now: std::time::Instant) {
        let port = |p: Option<u16>| p.unwrap_or(0);
        self.blocked
            .insert((d.proto, d.src, port(d.sport), d.dst, port(d.dport)), now);
    }

    fn was_blocked(&self, t: &Tuple) -> bool {
        // ICMP is keyed by echo id and type in eBPF, by type in NFLOG: match on the
        // addresses and protocol alone there.
        if t.0 == 1 || t.0 == 58 {
            return self
                .blocked
                .keys()
                .any(|b| b.0 == t.0 && b.1 == t.1 && b.3 == t.3);
        }
        self.blocked.contains_key(t)
    }

    /// Forget the baselines of flows gone from the map (evicted, or removed by hand):
    /// `flows` is the whole map, as read before [`Sweeper::sweep`] went over it.
    pub fn forget_gone(&mut self, flows: &[(cage_common::FlowKey, cage_common::FlowValue)]) {
        if self.baselines.is_empty() {
            return;
        }
        // Only the ids with a baseline: a set of every flow's id would be 64 k strings.
        let present: std::collections::HashSet<String> = flows
            .iter()
            .map(|(k, _)| key_id(k))
            .filter(|id| self.baselines.contains_key(id))
            .collect();
        self.baselines.retain(|id, _| present.contains(id));
    }

    /// Records for every flow of `flows` (the map, or a part of it) that ended (or
    /// reached the active timeout), and the keys to remove from the map once the records
    /// are written.
    pub fn sweep(
        &mut self,
        cfg: &Config,
        flows: &[(cage_common::FlowKey, cage_common::FlowValue)],
        now_ns: u64,
        now_wall: SystemTime,
        hostnames: &HashMap<IpAddr, String>,
    ) -> (Vec<FlowRecord>, Vec<cage_common::FlowKey>) {
        let idle = u64::from(cfg.flowlog.idle_timeout) * 1_000_000_000;
        let active = u64::from(cfg.flowlog.active_timeout) * 1_000_000_000;
        let wall = |ns: u64| now_wall - std::time::Duration::from_nanos(now_ns.saturating_sub(ns));
        let mut records = Vec::new();
        let mut ended = Vec::new();
        for (k, v) in flows {
            let id = key_id(k);
            let base = self.baselines.get(&id).copied().unwrap_or(Baseline {
                start_ns: v.first_seen_ns,
                ..Baseline::default()
            });
            let is_idle = now_ns.saturating_sub(v.last_seen_ns) > idle;
            let is_long = now_ns.saturating_sub(base.start_ns) > active;
            if !is_idle && !is_long {
                continue;
            }
            let tuple: Tuple = (
                k.protocol,
                k.client_ip(),
                k.client_port,
                k.server_ip(),
                k.server_port,
            );
            let delta = (
                v.packets_from_client.saturating_sub(base.packets_out),
                v.bytes_from_client.saturating_sub(base.bytes_out),
                v.packets_to_client.saturating_sub(base.packets_in),
                v.bytes_to_client.saturating_sub(base.bytes_in),
            );
            let blocked = self.was_blocked(&tuple);
            if !blocked && (delta.0 > 0 || delta.2 > 0) {
                let icmp = k.protocol == 1 || k.protocol == 58;
                let mac = (v.client_mac != [0; 6]).then_some(v.client_mac);
                records.push(FlowRecord {
                    start: rfc3339(wall(base.start_ns.max(v.first_seen_ns))),
                    end: rfc3339(wall(v.last_seen_ns)),
                    verdict: "allowed".into(),
                    rule: None,
                    proto: proto_name(k.protocol),
                    host: k.client_ip(),
                    host_port: (!icmp).then_some(k.client_port),
                    mac: mac.map(mac_text),
                    bridge_port: None,
                    peer: k.server_ip(),
                    peer_port: (!icmp || k.server_port != 0).then_some(k.server_port),
                    direction: "out".into(),
                    packets_out: delta.0,
                    bytes_out: delta.1,
                    packets_in: delta.2,
                    bytes_in: delta.3,
                    tag: mac.filter(is_selftest_mac).map(|_| "selftest".to_owned()),
                    tcp_flags: (k.protocol == 6).then(|| {
                        format!(
                            "{}/{}",
                            flags_text(v.tcp_flags_from_client),
                            flags_text(v.tcp_flags_to_client)
                        )
                    }),
                    hostname: hostnames.get(&k.client_ip()).cloned(),
                    name: None,
                });
            }
            if is_idle {
                self.baselines.remove(&id);
                ended.push(*k);
            } else {
                self.baselines.insert(
                    id,
                    Baseline {
                        start_ns: now_ns,
                        packets_out: v.packets_from_client,
                        bytes_out: v.bytes_from_client,
                        packets_in: v.packets_to_client,
                        bytes_in: v.bytes_to_client,
                    },
                );
            }
        }
        let keep = std::time::Duration::from_nanos(2 * idle + 10_000_000_000);
        self.blocked.retain(|_, at| at.elapsed() < keep);
        records.sort_by(|a, b| a.start.cmp(&b.start));
        (records, ended)
    }
}

/// Hostnames of the caged hosts from the DHCP server's leases (dnsmasq's lease file, as
/// on OpenWrt: `expiry mac ip hostname client-id`). Empty when there is none.
pub fn dhcp_hostnames(path: &Path) -> HashMap<IpAddr, String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return HashMap::new();
    };
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let ip = f.get(2)?.parse().ok()?;
            let name = f.get(3).filter(|n| **n != "*")?;
            Some((ip, (*name).to_owned()))
        })
        .collect()
}

/// The IPv4 leases of the DHCP server's lease file (dnsmasq's: `expiry mac ip hostname
/// client-id`, expiry in Unix seconds, 0 for never): (address, MAC in lower case,
/// expiry). Empty when there is none.
pub fn dhcp_leases(path: &Path) -> Vec<(std::net::Ipv4Addr, String, u64)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let expiry = f.first()?.parse().ok()?;
            let mac = f.get(1)?.to_ascii_lowercase();
            let ip = f.get(2)?.parse().ok()?;
            (mac.len() == 17).then_some((ip, mac, expiry))
        })
        .collect()
}

/// What the DHCP leases change in the layer-2 bindings: every lease in the segment's
/// `subnet` that has not ended binds its address to its MAC (for what is left of it, at
/// most `bind_timeout`), replacing a binding to another MAC (a host that used the
/// address first: the lease wins). Each change: (address, the other MAC if replaced,
/// the lease's MAC, seconds).
pub fn lease_bindings(
    leases: &[(std::net::Ipv4Addr, String, u64)],
    bound: &[(IpAddr, String, u32)],
    subnet: ipnet::Ipv4Net,
    now: u64,
    bind_timeout: u32,
) -> Vec<(std::net::Ipv4Addr, Option<String>, String, u32)> {
    let mut changes = Vec::new();
    for (addr, mac, expiry) in leases {
        if !subnet.contains(addr) || (*expiry != 0 && *expiry <= now) {
            continue;
        }
        let left = if *expiry == 0 {
            bind_timeout
        } else {
            u32::try_from(expiry - now)
                .unwrap_or(u32::MAX)
                .min(bind_timeout)
        };
        let now_bound: Vec<&String> = bound
            .iter()
            .filter(|(a, _, _)| *a == IpAddr::V4(*addr))
            .map(|(_, m, _)| m)
            .collect();
        if now_bound.iter().any(|m| m.eq_ignore_ascii_case(mac)) {
            continue;
        }
        changes.push((
            *addr,
            now_bound.first().map(|m| (*m).clone()),
            mac.clone(),
            left,
        ));
    }
    changes
}

/// Where dnsmasq keeps its leases on OpenWrt.
pub const DHCP_LEASES: &str = "/tmp/dhcp.leases";

// ---- the persistent copy ----------------------------------------------------------------

/// Copies the flow log to a persistent directory (flash) in batches, at most
/// `flowlog.persist_budget` bytes a day: few, large writes wear flash least. Records the
/// budget has no room for are counted, not silently dropped.
pub struct Persister {
    log: FlowLog,
    /// The records for the next batch, as the lines that will be written: at most
    /// `budget` bytes (no day allows more), so memory stays bounded however long the
    /// interval and however many flows end in it.
    pending: Vec<u8>,
    pending_lines: u64,
    /// Records that did not fit in `pending`: over the budget before the batch is made.
    over_pending: u64,
    budget: u64,
    /// (day since the epoch, bytes written that day), kept in `budget.json`.
    spent: (u64, u64),
}

fn day(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0)
}

impl Persister {
    pub fn open(dir: &Path, cfg: &Config) -> io::Result<Persister> {
        let log = FlowLog::open_at(
            dir.to_path_buf(),
            cfg.flowlog.log_max_bytes,
            cfg.flowlog.log_files,
        )?;
        let spent = std::fs::read(dir.join("budget.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or((0, 0));
        Ok(Persister {
            log,
            pending: Vec::new(),
            pending_lines: 0,
            over_pending: 0,
            budget: cfg.flowlog.persist_budget,
            spent,
        })
    }

    /// Keep records for the next batch, as far as a day's budget goes.
    pub fn add(&mut self, records: &[FlowRecord]) {
        for r in records {
            let Ok(mut line) = serde_json::to_vec(r) else {
                self.over_pending += 1;
                continue;
            };
            line.push(b'\n');
            if (self.pending.len() + line.len()) as u64 > self.budget {
                self.over_pending += 1;
            } else {
                self.pending.extend_from_slice(&line);
                self.pending_lines += 1;
            }
        }
    }

    /// Write the pending records in one batch, as many as today's budget allows; the rest
    /// are counted in `over_budget`. Returns how many were written.
    pub fn flush(&mut self, now: SystemTime, over_budget: &mut u64) -> io::Result<usize> {
        *over_budget += std::mem::take(&mut self.over_pending);
        if self.pending.is_empty() {
            return Ok(0);
        }
        let today = day(now);
        if self.spent.0 != today {
            self.spent = (today, 0);
        }
        let room = self.budget.saturating_sub(self.spent.1);
        // The whole lines that fit.
        let (mut cut, mut take) = (0u64, 0u64);
        for line in self.pending.split_inclusive(|&b| b == b'\n') {
            if cut + line.len() as u64 > room {
                break;
            }
            cut += line.len() as u64;
            take += 1;
        }
        *over_budget += self.pending_lines - take;
        let before = self.log.appended;
        if take > 0 {
            // In pieces of WRITE_CHUNK, so that the files rotate at their size.
            let batch = &self.pending[..cut as usize];
            let (mut from, mut at, mut lines) = (0, 0, 0);
            for line in batch.split_inclusive(|&b| b == b'\n') {
                at += line.len();
                lines += 1;
                if at - from >= WRITE_CHUNK || at == batch.len() {
                    self.log.write_lines(&batch[from..at], lines)?;
                    (from, lines) = (at, 0);
                }
            }
            self.log.file.sync_data()?;
            self.log.save_stats()?;
        }
        self.pending = Vec::new();
        self.pending_lines = 0;
        self.spent.1 += self.log.appended.saturating_sub(before);
        let dir = self.log.dir.clone();
        std::fs::write(
            dir.join("budget.json"),
            serde_json::to_vec(&self.spent).map_err(io::Error::other)?,
        )?;
        Ok(take as usize)
    }
}

#[cfg(test)]
mod persist_tests {
    use super::*;
    use std::time::Duration;

    fn record(i: u16) -> FlowRecord {
        FlowRecord {
            start: "2026-11-25T08:00:00.000Z".into(),
            end: "2026-11-25T08:00:01.000Z".into(),
            verdict: "allowed".into(),
            rule: None,
            proto: "udp".into(),
            host: "192.168.10.11".parse().unwrap(),
            host_port: Some(i),
            mac: None,
            bridge_port: None,
            peer: "203.0.113.10".parse().unwrap(),
            peer_port: Some(53),
            direction: "out".into(),
            packets_out: 1,
            bytes_out: 60,
            packets_in: 1,
            bytes_in: 60,
            tag: None,
            tcp_flags: None,
            hostname: None,
            name: None,
        }
    }

    #[test]
    fn batches_within_the_daily_budget_and_counts_the_rest() {
        let dir = std::env::temp_dir().join(format!("cage-persist-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cfg = crate::config::parse("").unwrap();
        let line = serde_json::to_vec(&record(1)).unwrap().len() as u64 + 1;
        cfg.flowlog.persist_budget = 10 * line;
        let mut p = Persister::open(&dir, &cfg).unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut over = 0;
        p.add(&(0..6).map(record).collect::<Vec<_>>());
        assert_eq!(p.flush(t0, &mut over).unwrap(), 6);
        p.add(&(6..12).map(record).collect::<Vec<_>>());
        assert_eq!(p.flush(t0, &mut over).unwrap(), 4, "the budget holds 10");
        assert_eq!(over, 2);
        // Reopened (a restart), the day's spending is remembered.
        let mut p = Persister::open(&dir, &cfg).unwrap();
        p.add(&[record(12)]);
        assert_eq!(p.flush(t0, &mut over).unwrap(), 0);
        assert_eq!(over, 3);
        // A new day, a new budget.
        p.add(&[record(13)]);
        assert_eq!(
            p.flush(t0 + Duration::from_secs(86_400), &mut over)
                .unwrap(),
            1
        );
        let (records, bad) = read(&dir, 4, &FlowFilter::default());
        assert_eq!((records.len(), bad), (11, 0));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_large_batch_is_written_in_chunks_whole_lines_each_and_rotated_between() {
        let dir = std::env::temp_dir().join(format!("cage-chunks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let line = serde_json::to_vec(&record(1)).unwrap().len() as u64 + 1;
        // Three chunks' worth in one batch, into files of a little over one chunk.
        let n = (3 * WRITE_CHUNK as u64 / line) as u16 + 10;
        let max_bytes = WRITE_CHUNK as u64 + 4 * line;
        let mut log = FlowLog::open_at(dir.clone(), max_bytes, 8).unwrap();
        let batch: Vec<FlowRecord> = (0..n).map(record).collect();
        log.write(&batch).unwrap();
        assert_eq!(log.stats.written, u64::from(n));
        let bytes: usize = batch
            .iter()
            .map(|r| serde_json::to_vec(r).unwrap().len() + 1)
            .sum();
        assert_eq!(log.appended, bytes as u64);
        let files = files(&dir, 8);
        assert!(files.len() >= 3, "rotated between chunks: {files:?}");
        for f in &files {
            let len = std::fs::metadata(f).unwrap().len();
            assert!(len <= max_bytes, "{} is {len} bytes", f.display());
        }
        // Every record once, none cut: the same ports back, in order.
        let (back, bad) = read(&dir, 8, &FlowFilter::default());
        assert_eq!(bad, 0);
        let mut ports: Vec<Option<u16>> = back.iter().map(|r| r.host_port).collect();
        ports.sort();
        let sent: Vec<Option<u16>> = batch.iter().map(|r| r.host_port).collect();
        assert_eq!(ports, sent);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
