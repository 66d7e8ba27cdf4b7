//! The names the forwarder refused in allow-list mode, for the owner to review:
//! `<log_dir>/dns-refused.json`, bounded to [`MAX_REFUSED`] names (the least recently
//! refused go first) and [`MAX_HOSTS`] hosts a name.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub use cage_common::records::RefusedName;

pub const MAX_REFUSED: usize = 256;
pub const MAX_HOSTS: usize = 8;

pub fn path(log_dir: &Path) -> PathBuf {
    log_dir.join("dns-refused.json")
}

pub fn load(log_dir: &Path) -> BTreeMap<String, RefusedName> {
    std::fs::read(path(log_dir))
        .ok()
        .and_then(|b| serde_json::from_slice::<Vec<RefusedName>>(&b).ok())
        .unwrap_or_default()
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect()
}

/// Record one refusal of `name` asked by `host` at `now` (RFC 3339).
pub fn note(map: &mut BTreeMap<String, RefusedName>, name: &str, host: IpAddr, now: &str) {
    if !map.contains_key(name) && map.len() >= MAX_REFUSED {
        if let Some(oldest) = map
            .values()
            .min_by(|a, b| a.last.cmp(&b.last))
            .map(|r| r.name.clone())
        {
            map.remove(&oldest);
        }
    }
    let r = map.entry(name.to_owned()).or_insert_with(|| RefusedName {
        name: name.to_owned(),
        count: 0,
        first: now.to_owned(),
        last: now.to_owned(),
        hosts: Vec::new(),
    });
    r.count += 1;
    r.last = now.to_owned();
    if !r.hosts.contains(&host) && r.hosts.len() < MAX_HOSTS {
        r.hosts.push(host);
    }
}

/// Write the list atomically (a temporary file renamed over the old one).
pub fn save(log_dir: &Path, map: &BTreeMap<String, RefusedName>) -> std::io::Result<()> {
    std::fs::create_dir_all(log_dir)?;
    let tmp = log_dir.join("dns-refused.json.tmp");
    let list: Vec<&RefusedName> = map.values().collect();
    std::fs::write(&tmp, serde_json::to_vec_pretty(&list)?)?;
    std::fs::rename(tmp, path(log_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_in_names_and_hosts() {
        let mut m = BTreeMap::new();
        for i in 0..(MAX_REFUSED + 10) {
            note(
                &mut m,
                &format!("n{i}.example"),
                "192.168.10.11".parse().unwrap(),
                &format!("2026-01-01T00:{:02}:{:02}Z", i / 60, i % 60),
            );
        }
        assert_eq!(m.len(), MAX_REFUSED);
        assert!(!m.contains_key("n0.example"));
        for i in 0..20u8 {
            note(
                &mut m,
                "x.example",
                IpAddr::from([192, 168, 10, i]),
                "2026-01-02T00:00:00Z",
            );
        }
        let x = &m["x.example"];
        assert_eq!(x.count, 20);
        assert_eq!(x.hosts.len(), MAX_HOSTS);
    }
}
