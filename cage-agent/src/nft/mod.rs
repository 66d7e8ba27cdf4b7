//! The only module that talks to nftables: check, apply, list and remove Cage's tables,
//! and read their counters. Printing a ruleset as nft's JSON or text is pure and lives in
//! `cage-policy` (`cage_policy::text`, re-exported here).
//!
//! Rulesets are typed values of the `nftables` crate, serialised to nft's JSON and fed to
//! `nft -j -f -` in one transaction. The process is run here rather than through the
//! crate's helper because the helper lets nft's stderr through to ours instead of
//! capturing it, and the error message is what a user needs to see.

mod exec;
pub mod monitor;
mod nfnetlink;

use std::collections::BTreeMap;

use nftables::expr::{Expression, NamedExpression};
use nftables::schema::{NfListObject, Nftables};
use nftables::types::NfFamily;
use serde::Serialize;

pub use cage_policy::text::{to_json, to_text, without_learned_elements};

use crate::policy::TABLE;
use exec::{list_objects, run};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run {program} to {operation}: {source} (is the nftables package installed?)")]
    Exec {
        program: String,
        operation: &'static str,
        source: std::io::Error,
    },
    #[error("nft refused to {operation}:\n{stderr}")]
    Failed {
        operation: &'static str,
        stderr: String,
    },
    #[error(
        "nft printed JSON that Cage does not understand while trying to {operation}: {source}"
    )]
    Json {
        operation: &'static str,
        source: serde_json::Error,
    },
}

/// Dry run: nft parses and evaluates the whole transaction but commits nothing.
pub fn check(rs: &Nftables) -> Result<(), NftError> {
    run(
        &["--check", "-j", "-f", "-"],
        Some(&to_json(rs)),
        "check the ruleset",
    )
    .map(|_| ())
}

/// Apply the transaction: all of it or, if the kernel refuses any part, none of it.
pub fn apply(rs: &Nftables) -> Result<(), NftError> {
    run(&["-j", "-f", "-"], Some(&to_json(rs)), "apply the ruleset").map(|_| ())
}

/// One address for the allow sets (`allow4`/`allow6`), with its timeout in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowElement {
    pub addr: std::net::IpAddr,
    pub timeout: u32,
    /// The element may be in the set already: it is added, deleted and added again, so
    /// that it gets the new timeout (a plain add keeps the old one). That costs the
    /// kernel a grace period (milliseconds), so a new address is just added.
    pub renew: bool,
}

/// Put addresses learned from one DNS answer into the allow sets, in one transaction.
///
/// The transaction goes to the kernel over nfnetlink directly (tens of microseconds); if
/// that fails for any reason, through the `nft` program as everything else (milliseconds:
/// nft reads the whole ruleset first), which then says what is wrong.
pub fn add_allowed(entries: &[AllowElement]) -> Result<(), NftError> {
    if entries.is_empty() {
        return Ok(());
    }
    match add_allowed_netlink(entries) {
        Ok(()) => return Ok(()),
        Err(e) => {
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                crate::log::warn(&format!(
                    "adding to the allow sets over nfnetlink failed ({e}); using nft \
                     (slower) whenever it fails"
                ));
            }
        }
    }
    let mut batch = nftables::batch::Batch::new();
    for e in entries {
        let set = crate::policy::ALLOW_SETS[usize::from(e.addr.is_ipv6())];
        let elem = |timeout: Option<u32>| {
            NfListObject::Element(nftables::schema::Element {
                family: NfFamily::INet,
                table: TABLE.into(),
                name: set.into(),
                elem: std::borrow::Cow::Owned(vec![Expression::Named(NamedExpression::Elem(
                    nftables::expr::Elem {
                        val: Box::new(Expression::String(e.addr.to_string().into())),
                        timeout,
                        expires: None,
                        comment: None,
                        counter: None,
                    },
                ))]),
            })
        };
        batch.add(elem(Some(e.timeout)));
        if e.renew {
            batch.delete(elem(None));
            batch.add(elem(Some(e.timeout)));
        }
    }
    run(
        &["-j", "-f", "-"],
        Some(&to_json(&batch.to_nftables())),
        "add learned addresses to the allow sets",
    )
    .map(|_| ())
}

/// [`add_allowed`]'s fast path alone: the transaction over nfnetlink, no fallback.
pub fn add_allowed_netlink(entries: &[AllowElement]) -> std::io::Result<()> {
    nfnetlink::add(entries)
}

/// Whether this kernel matches bridged frames by bridge name (`meta ibrname` in the
/// bridge family, module nft_meta_bridge). Asked with a dry run that commits nothing.
pub fn supports_bridge_meta() -> bool {
    let probe = r#"{"nftables":[
        {"add":{"table":{"family":"bridge","name":"cage_probe"}}},
        {"add":{"chain":{"family":"bridge","table":"cage_probe","name":"f","type":"filter","hook":"forward","prio":0,"policy":"accept"}}},
        {"add":{"rule":{"family":"bridge","table":"cage_probe","chain":"f","expr":[
            {"match":{"op":"==","left":{"meta":{"key":"ibrname"}},"right":"cage_probe"}},{"drop":null}]}}}]}"#;
    run(
        &["--check", "-j", "-f", "-"],
        Some(probe),
        "probe for nft_meta_bridge",
    )
    .is_ok()
}

/// The flowtables in the kernel that offload to hardware (`flags offload`, what fw4
/// writes with `flow_offloading_hw '1'`), as `family table name`. Read from nft's text
/// listing: its JSON (nft 1.0.6) leaves a flowtable's flags out.
pub fn hardware_flowtables() -> Result<Vec<String>, NftError> {
    let text = run(&["list", "flowtables"], None, "list the flowtables")?;
    Ok(offloading_flowtables(&text))
}

/// The flowtables with `flags offload` in `nft list flowtables` text.
pub fn offloading_flowtables(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let (mut table, mut flowtable) = (String::new(), String::new());
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["table", family, name, "{"] => table = format!("{family} {name}"),
            ["flowtable", name, "{"] => flowtable = (*name).to_owned(),
            ["flags", rest @ ..]
                if !flowtable.is_empty()
                    && rest.iter().any(|f| f.trim_end_matches(',') == "offload") =>
            {
                found.push(format!("{table} {flowtable}"));
            }
            ["}"] if !flowtable.is_empty() => flowtable.clear(),
            _ => {}
        }
    }
    found
}

/// Remove Cage's tables (both families) in one transaction. Returns whether any existed.
pub fn remove() -> Result<bool, NftError> {
    let existed = !list_text()?.is_empty();
    let mut batch = nftables::batch::Batch::new();
    for family in [NfFamily::INet, NfFamily::Bridge] {
        let t = || {
            NfListObject::Table(nftables::schema::Table {
                family,
                name: TABLE.into(),
                handle: None,
            })
        };
        batch.add(t());
        batch.delete(t());
    }
    run(
        &["-j", "-f", "-"],
        Some(&to_json(&batch.to_nftables())),
        "remove Cage's tables",
    )?;
    Ok(existed)
}

/// Cage's tables as the kernel has them now, in nft's own text form; empty when Cage's
/// tables are absent.
pub fn list_text() -> Result<String, NftError> {
    list_tables(&["--stateless", "list", "table"])
}

/// Cage's tables without counters and without set contents: what stays the same while
/// the policy runs (the kill switch's set and the automatic-isolation meters change
/// with traffic and presses). The daemon compares this to notice tampering.
pub fn list_structure() -> Result<String, NftError> {
    list_tables(&["--stateless", "--terse", "list", "table"])
}

fn list_tables(args: &[&str]) -> Result<String, NftError> {
    let mut text = String::new();
    for family in ["inet", "bridge"] {
        let mut a = args.to_vec();
        a.extend([family, TABLE]);
        match run(&a, None, "list Cage's tables") {
            Ok(t) => text.push_str(&t),
            Err(NftError::Failed { stderr, .. }) if stderr.contains("No such file") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(text)
}

/// The layer-2 bindings in `bridge cage` now (a MAC's port, an address's MAC), each
/// with the seconds it has left; empty when the table or its sets are absent. Read
/// before every apply so that replacing the tables keeps them.
pub fn bindings() -> Result<crate::policy::Bindings, NftError> {
    let sets = &crate::policy::BIND_SETS;
    let mut out = crate::policy::Bindings::default();
    for name in [sets.macport, sets.bind4, sets.bind6] {
        let args = ["-j", "list", "set", "bridge", TABLE, name];
        let Some(objects) = list_objects(&args, "read the layer-2 bindings")? else {
            continue;
        };
        for (key, left) in set_elements(&objects) {
            let [a, b] = key.as_slice() else { continue };
            if name == sets.macport {
                out.macs.push((a.clone(), b.clone(), left));
            } else if let Ok(addr) = a.parse() {
                out.addrs.push((addr, b.clone(), left));
            }
        }
    }
    Ok(out)
}

/// Bind IPv4 addresses to the MAC their DHCP lease names (a lease wins over first come,
/// first served): each (address, the MAC it is bound to now if another, the lease's
/// MAC, seconds the binding lasts). One transaction.
pub fn bind_leased(
    changes: &[(std::net::Ipv4Addr, Option<String>, String, u32)],
) -> Result<(), NftError> {
    if changes.is_empty() {
        return Ok(());
    }
    let sets = &crate::policy::BIND_SETS;
    let mut script = String::new();
    for (addr, old, mac, secs) in changes {
        if let Some(old) = old {
            script.push_str(&format!(
                "delete element bridge {TABLE} {} {{ {addr} . {old} }}\n\
                 delete element bridge {TABLE} {} {{ {addr} }}\n",
                sets.bind4, sets.own4
            ));
        }
        script.push_str(&format!(
            "add element bridge {TABLE} {} {{ {addr} timeout {secs}s }}\n\
             add element bridge {TABLE} {} {{ {addr} . {mac} timeout {secs}s }}\n",
            sets.own4, sets.bind4
        ));
    }
    run(&["-f", "-"], Some(&script), "bind leased addresses").map(|_| ())
}

/// The elements of a listed set: each one's value (its parts, for a concatenation) and
/// the seconds it has left (`expires`, or its `timeout` when nft gives no expiry).
fn set_elements(objects: &[serde_json::Value]) -> Vec<(Vec<String>, u32)> {
    let part = |p: &serde_json::Value| p.as_str().map(str::to_owned);
    objects
        .iter()
        .filter_map(|o| o["set"]["elem"].as_array())
        .flatten()
        .filter_map(|e| {
            let elem = &e["elem"];
            let val = if elem.is_object() { &elem["val"] } else { e };
            let parts: Vec<String> = match val.get("concat").and_then(|c| c.as_array()) {
                Some(c) => c.iter().filter_map(part).collect(),
                None => vec![part(val)?],
            };
            let left = elem["expires"]
                .as_u64()
                .or_else(|| elem["timeout"].as_u64())
                .unwrap_or(0);
            Some((parts, u32::try_from(left).unwrap_or(u32::MAX)))
        })
        .collect()
}

/// Whether the applied policy isolates the segment now: the `isolated` set has an
/// element. `Ok(false)` when Cage's table is absent.
pub fn isolated_now() -> Result<bool, NftError> {
    let set = [
        "-j",
        "list",
        "set",
        "inet",
        TABLE,
        crate::policy::ISOLATED_SET,
    ];
    let Some(objects) = list_objects(&set, "read the kill switch's set")? else {
        return Ok(false);
    };
    Ok(objects
        .iter()
        .any(|o| o["set"]["elem"].as_array().is_some_and(|e| !e.is_empty())))
}

/// Per-host counts of one of Cage's meters (automatic isolation), keyed by the host's
/// address. Empty when the meter does not exist (yet: it appears with its first packet,
/// or the rule is off).
pub fn meter_counts(name: &str) -> Result<BTreeMap<std::net::IpAddr, Count>, NftError> {
    let meter = ["-j", "list", "meter", "inet", TABLE, name];
    let Some(objects) = list_objects(&meter, "read an automatic-isolation meter")? else {
        return Ok(BTreeMap::new());
    };
    let mut counts = BTreeMap::new();
    for o in &objects {
        for e in o["meter"]["elem"].as_array().into_iter().flatten() {
            let e = &e["elem"];
            let Some(addr) = e["val"].as_str().and_then(|a| a.parse().ok()) else {
                continue;
            };
            counts.insert(addr, Count::of(&e["counter"]));
        }
    }
    Ok(counts)
}

/// A named counter of Cage's tables, summed over both; `None` when absent from both.
pub fn named_counter(name: &str) -> Result<Option<Count>, NftError> {
    // Both tables may have one of that name (each table its own `unlogged`): summed.
    let mut sum: Option<Count> = None;
    for family in ["inet", "bridge"] {
        let counter = ["-j", "list", "counter", family, TABLE, name];
        let Some(objects) = list_objects(&counter, "read a counter")? else {
            continue;
        };
        if let Some(c) = objects.iter().find_map(|o| o.get("counter")).map(Count::of) {
            let s = sum.get_or_insert_with(Count::default);
            s.packets += c.packets;
            s.bytes += c.bytes;
        }
    }
    Ok(sum)
}

/// Packet and byte counts of one rule comment (e.g. `deny:lan`), summed over its rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

impl Count {
    /// A counter as nft prints it in JSON (`{"packets": …, "bytes": …}`).
    fn of(counter: &serde_json::Value) -> Count {
        Count {
            packets: counter["packets"].as_u64().unwrap_or(0),
            bytes: counter["bytes"].as_u64().unwrap_or(0),
        }
    }
}

/// Counters of Cage's rules now in the kernel, summed by rule comment. `None` when Cage's
/// tables are not there.
pub fn counters() -> Result<Option<BTreeMap<String, Count>>, NftError> {
    let mut sums: BTreeMap<String, Count> = BTreeMap::new();
    let mut found = false;
    for family in ["inet", "bridge"] {
        // Read as plain JSON: only rules' comments and counters matter here.
        let table = ["-j", "list", "table", family, TABLE];
        let Some(items) = list_objects(&table, "read Cage's counters")? else {
            continue;
        };
        found = true;
        for item in items {
            let rule = &item["rule"];
            let Some(comment) = rule["comment"].as_str() else {
                continue;
            };
            for e in rule["expr"].as_array().into_iter().flatten() {
                if let Some(c) = e.get("counter").map(Count::of) {
                    let entry = sums.entry(comment.to_owned()).or_default();
                    entry.packets += c.packets;
                    entry.bytes += c.bytes;
                }
            }
        }
    }
    Ok(found.then_some(sums))
}
