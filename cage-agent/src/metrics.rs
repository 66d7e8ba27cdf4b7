//! What `/metrics` counts inside `cage run` itself, beside the files `cage status`
//! reads: the bytes of each caged host as the flow log writes its records, and how the
//! daemon notices the kernel's changes. Both live in this process only (a Prometheus
//! counter starts again at 0 when its process does: `cage_daemon_start_time_seconds`
//! says when). A leaf: the flow log and the daemon tell it, the web page reads it.
//!
//! The hosts are bounded: the first [`MAX_HOSTS`] machines seen since the start have
//! their own totals, any further one is added to one `other` total. A caged host that
//! forges thousands of MACs or addresses gets them all counted, in `other`, and the
//! table stays 64 entries long.

use std::collections::BTreeMap;
use std::sync::Mutex;

use cage_common::records::FlowRecord;
use cage_web::metrics::HostBytes;

pub use cage_web::metrics::MAX_HOSTS;

/// Bytes up and down per host, at most [`MAX_HOSTS`] hosts of their own.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HostTable {
    hosts: BTreeMap<String, (u64, u64)>,
    other: (u64, u64),
}

/// The machine a record belongs to: its MAC (lowercase), or its address when the
/// record has no MAC of the usual form.
fn host_key(r: &FlowRecord) -> String {
    match r.mac.as_deref() {
        Some(mac)
            if mac.len() == 17
                && mac.bytes().enumerate().all(|(i, b)| {
                    if i % 3 == 2 {
                        b == b':'
                    } else {
                        b.is_ascii_hexdigit()
                    }
                }) =>
        {
            mac.to_ascii_lowercase()
        }
        _ => r.host.to_string(),
    }
}

impl HostTable {
    pub const fn new() -> HostTable {
        HostTable {
            hosts: BTreeMap::new(),
            other: (0, 0),
        }
    }

    /// Count `r`'s bytes. The self-test's probe hosts are not caged machines (and have
    /// new MACs at every run), so their records are left out.
    pub fn add(&mut self, r: &FlowRecord) {
        if r.tag.as_deref() == Some("selftest") {
            return;
        }
        let key = host_key(r);
        let room = self.hosts.len() < MAX_HOSTS;
        let slot = if room || self.hosts.contains_key(&key) {
            self.hosts.entry(key).or_default()
        } else {
            &mut self.other
        };
        slot.0 = slot.0.saturating_add(r.bytes_out);
        slot.1 = slot.1.saturating_add(r.bytes_in);
    }

    /// Each host's totals, in host order, and the sum of the others.
    pub fn snapshot(&self) -> (Vec<HostBytes>, (u64, u64)) {
        let hosts = self
            .hosts
            .iter()
            .map(|(host, &(up, down))| HostBytes {
                host: host.clone(),
                up,
                down,
            })
            .collect();
        (hosts, self.other)
    }
}

static HOSTS: Mutex<HostTable> = Mutex::new(HostTable::new());
static MONITORS: Mutex<Option<&'static str>> = Mutex::new(None);

/// Count the bytes of records just written to the flow log.
pub fn record(records: &[FlowRecord]) {
    let mut t = HOSTS.lock().unwrap_or_else(|e| e.into_inner());
    for r in records {
        t.add(r);
    }
}

/// The hosts' totals since this process started.
pub fn hosts() -> (Vec<HostBytes>, (u64, u64)) {
    HOSTS.lock().unwrap_or_else(|e| e.into_inner()).snapshot()
}

/// How the daemon notices changes now: `listen`, `partial` or `poll`.
pub fn set_monitors(mode: &'static str) {
    *MONITORS.lock().unwrap_or_else(|e| e.into_inner()) = Some(mode);
}

pub fn monitors() -> Option<&'static str> {
    *MONITORS.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(mac: Option<&str>, host: &str, out: u64, inn: u64) -> FlowRecord {
        FlowRecord {
            start: String::new(),
            end: String::new(),
            verdict: "allowed".into(),
            rule: None,
            proto: "udp".into(),
            host: host.parse().unwrap(),
            host_port: None,
            mac: mac.map(str::to_owned),
            bridge_port: None,
            peer: "203.0.113.10".parse().unwrap(),
            peer_port: None,
            direction: "out".into(),
            packets_out: 1,
            bytes_out: out,
            packets_in: 1,
            bytes_in: inn,
            tag: None,
            tcp_flags: None,
            hostname: None,
            name: None,
        }
    }

    #[test]
    fn a_host_forging_thousands_of_macs_fills_64_entries_and_other() {
        let mut t = HostTable::new();
        t.add(&record(
            Some("02:CA:9E:00:00:11"),
            "192.168.10.11",
            100,
            1000,
        ));
        t.add(&record(Some("02:ca:9e:00:00:11"), "192.168.10.11", 1, 10));
        for i in 0..10_000u32 {
            let mac = format!(
                "02:66:{:02x}:{:02x}:{:02x}:00",
                i >> 16,
                (i >> 8) & 0xff,
                i & 0xff
            );
            t.add(&record(Some(&mac), "192.168.10.99", 7, 0));
        }
        // Without a usable MAC, the address names the host.
        t.add(&record(Some("not a mac"), "192.168.10.12", 5, 5));
        let (hosts, other) = t.snapshot();
        assert_eq!(hosts.len(), MAX_HOSTS);
        assert_eq!(t.hosts.len(), MAX_HOSTS, "the table itself stays bounded");
        let ai1 = hosts
            .iter()
            .find(|h| h.host == "02:ca:9e:00:00:11")
            .unwrap();
        assert_eq!((ai1.up, ai1.down), (101, 1010));
        let all_up: u64 = hosts.iter().map(|h| h.up).sum::<u64>() + other.0;
        assert_eq!(
            all_up,
            101 + 7 * 10_000 + 5,
            "every byte is counted somewhere"
        );
        assert_eq!(other.0, 7 * (10_000 - (MAX_HOSTS as u64 - 1)) + 5);
    }

    #[test]
    fn the_self_tests_probes_are_not_hosts() {
        let mut t = HostTable::new();
        let mut r = record(Some("02:5e:1f:00:00:01"), "192.168.10.200", 9, 9);
        r.tag = Some("selftest".into());
        t.add(&r);
        assert_eq!(t.snapshot(), (vec![], (0, 0)));
    }
}
