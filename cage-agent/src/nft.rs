//! The only module that talks to nftables: check, apply, list and remove Cage's tables,
//! and read their counters. Printing a ruleset as nft's JSON or text is pure and lives in
//! `cage-policy` (`cage_policy::text`, re-exported here).
//!
//! Rulesets are typed values of the `nftables` crate, serialised to nft's JSON and fed to
//! `nft -j -f -` in one transaction. The process is run here rather than through the
//! crate's helper because the helper lets nft's stderr through to ours instead of
//! capturing it, and the error message is what a user needs to see.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};

use nftables::expr::{Expression, NamedExpression};
use nftables::schema::{NfListObject, Nftables};
use nftables::types::NfFamily;
use serde::Serialize;

pub use cage_policy::text::{to_json, to_text};

use crate::policy::TABLE;

/// The nft program; `CAGE_NFT` overrides it (tests, unusual installs).
fn nft_program() -> String {
    std::env::var("CAGE_NFT").unwrap_or_else(|_| "nft".to_owned())
}

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

fn run(args: &[&str], stdin: Option<&str>, operation: &'static str) -> Result<String, NftError> {
    let program = nft_program();
    let exec = |source| NftError::Exec {
        program: program.clone(),
        operation,
        source,
    };
    let mut child = Command::new(&program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(exec)?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin was piped");
        pipe.write_all(input.as_bytes()).map_err(exec)?;
    }
    let out = child.wait_with_output().map_err(exec)?;
    if !out.status.success() {
        return Err(NftError::Failed {
            operation,
            stderr: String::from_utf8_lossy(&out.stderr).trim_end().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
    setelem::add(entries)
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

/// Whether the applied policy isolates the segment now: the `isolated` set has an
/// element. `Ok(false)` when Cage's table is absent.
pub fn isolated_now() -> Result<bool, NftError> {
    match run(
        &[
            "-j",
            "list",
            "set",
            "inet",
            TABLE,
            crate::policy::ISOLATED_SET,
        ],
        None,
        "read the kill switch's set",
    ) {
        Ok(out) => {
            let v: serde_json::Value =
                serde_json::from_str(&out).map_err(|source| NftError::Json {
                    operation: "read the kill switch's set",
                    source,
                })?;
            Ok(v["nftables"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|o| o["set"]["elem"].as_array().is_some_and(|e| !e.is_empty())))
        }
        Err(NftError::Failed { stderr, .. }) if stderr.contains("No such file") => Ok(false),
        Err(e) => Err(e),
    }
}

/// Per-host counts of one of Cage's meters (automatic isolation), keyed by the host's
/// address. Empty when the meter does not exist (yet: it appears with its first packet,
/// or the rule is off).
pub fn meter_counts(name: &str) -> Result<BTreeMap<std::net::IpAddr, Count>, NftError> {
    let out = match run(
        &["-j", "list", "meter", "inet", TABLE, name],
        None,
        "read an automatic-isolation meter",
    ) {
        Ok(out) => out,
        Err(NftError::Failed { stderr, .. }) if stderr.contains("No such file") => {
            return Ok(BTreeMap::new())
        }
        Err(e) => return Err(e),
    };
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|source| NftError::Json {
        operation: "read an automatic-isolation meter",
        source,
    })?;
    let mut counts = BTreeMap::new();
    for o in v["nftables"].as_array().into_iter().flatten() {
        for e in o["meter"]["elem"].as_array().into_iter().flatten() {
            let e = &e["elem"];
            let Some(addr) = e["val"].as_str().and_then(|a| a.parse().ok()) else {
                continue;
            };
            counts.insert(
                addr,
                Count {
                    packets: e["counter"]["packets"].as_u64().unwrap_or(0),
                    bytes: e["counter"]["bytes"].as_u64().unwrap_or(0),
                },
            );
        }
    }
    Ok(counts)
}

/// A named counter of Cage's inet table; `None` when it (or the table) is absent.
pub fn named_counter(name: &str) -> Result<Option<Count>, NftError> {
    let out = match run(
        &["-j", "list", "counter", "inet", TABLE, name],
        None,
        "read a counter",
    ) {
        Ok(out) => out,
        Err(NftError::Failed { stderr, .. }) if stderr.contains("No such file") => return Ok(None),
        Err(e) => return Err(e),
    };
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|source| NftError::Json {
        operation: "read a counter",
        source,
    })?;
    Ok(v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|o| o.get("counter"))
        .map(|c| Count {
            packets: c["packets"].as_u64().unwrap_or(0),
            bytes: c["bytes"].as_u64().unwrap_or(0),
        }))
}

/// Packet and byte counts of one rule comment (e.g. `deny:lan`), summed over its rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

/// Counters of Cage's rules now in the kernel, summed by rule comment. `None` when Cage's
/// tables are not there.
pub fn counters() -> Result<Option<BTreeMap<String, Count>>, NftError> {
    let mut sums: BTreeMap<String, Count> = BTreeMap::new();
    let mut found = false;
    for family in ["inet", "bridge"] {
        let out = match run(
            &["-j", "list", "table", family, TABLE],
            None,
            "read Cage's counters",
        ) {
            Ok(out) => out,
            Err(NftError::Failed { stderr, .. }) if stderr.contains("No such file") => continue,
            Err(e) => return Err(e),
        };
        found = true;
        // Read as plain JSON: only rules' comments and counters matter here.
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|source| NftError::Json {
            operation: "read Cage's counters",
            source,
        })?;
        let items = v["nftables"].as_array().cloned().unwrap_or_default();
        for item in items {
            let rule = &item["rule"];
            let Some(comment) = rule["comment"].as_str() else {
                continue;
            };
            for e in rule["expr"].as_array().into_iter().flatten() {
                if let Some(c) = e.get("counter") {
                    let entry = sums.entry(comment.to_owned()).or_default();
                    entry.packets += c["packets"].as_u64().unwrap_or(0);
                    entry.bytes += c["bytes"].as_u64().unwrap_or(0);
                }
            }
        }
    }
    Ok(found.then_some(sums))
}

/// Adding elements to the allow sets over nfnetlink, without the `nft` program: one batch
/// (begin; per address: add, or add, delete, add with the new timeout; end), each message
/// acked.
mod setelem {
    use std::io;
    use std::net::IpAddr;
    use std::os::fd::AsRawFd;

    use netlink_sys::{constants::NETLINK_NETFILTER, Socket, SocketAddr};

    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
    const NFNL_MSG_BATCH_END: u16 = 0x11;
    const NFT_MSG_NEWSETELEM: u16 = 12;
    const NFT_MSG_DELSETELEM: u16 = 14;
    const NFPROTO_INET: u8 = 1;
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_ACK: u16 = 0x4;
    const NLM_F_CREATE: u16 = 0x400;
    const NLMSG_ERROR: u16 = 2;
    const NLA_F_NESTED: u16 = 0x8000;
    const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
    const NFTA_SET_ELEM_LIST_SET: u16 = 2;
    const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
    const NFTA_LIST_ELEM: u16 = 1;
    const NFTA_SET_ELEM_KEY: u16 = 1;
    const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
    const NFTA_DATA_VALUE: u16 = 1;

    fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        out.extend_from_slice(&(len as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(out.len().next_multiple_of(4), 0);
    }

    fn cstr(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    /// One nfnetlink message: header, nfgenmsg, attributes.
    fn message(
        out: &mut Vec<u8>,
        kind: u16,
        flags: u16,
        seq: u32,
        family: u8,
        res_id: u16,
        attrs: &[u8],
    ) {
        let len = 16 + 4 + attrs.len();
        out.extend_from_slice(&(len as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&[family, 0]);
        out.extend_from_slice(&res_id.to_be_bytes());
        out.extend_from_slice(attrs);
    }

    /// The attributes of a set-element message for one address.
    fn elements(addr: IpAddr, timeout_s: Option<u32>) -> Vec<u8> {
        let set = crate::policy::ALLOW_SETS[usize::from(addr.is_ipv6())];
        let value = match addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        let mut key = Vec::new();
        attr(&mut key, NFTA_DATA_VALUE, &value);
        let mut elem = Vec::new();
        attr(&mut elem, NFTA_SET_ELEM_KEY | NLA_F_NESTED, &key);
        if let Some(t) = timeout_s {
            attr(
                &mut elem,
                NFTA_SET_ELEM_TIMEOUT,
                &(u64::from(t) * 1000).to_be_bytes(),
            );
        }
        let mut list = Vec::new();
        attr(&mut list, NFTA_LIST_ELEM | NLA_F_NESTED, &elem);
        let mut attrs = Vec::new();
        attr(
            &mut attrs,
            NFTA_SET_ELEM_LIST_TABLE,
            &cstr(crate::policy::TABLE),
        );
        attr(&mut attrs, NFTA_SET_ELEM_LIST_SET, &cstr(set));
        attr(
            &mut attrs,
            NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED,
            &list,
        );
        attrs
    }

    pub fn add(entries: &[super::AllowElement]) -> io::Result<()> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: setsockopt on a socket we own, with a correctly sized timeval.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &timeout as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let base = std::process::id().wrapping_mul(7919) ^ (entries.len() as u32) << 20;
        let mut seq = base;
        let mut batch = Vec::new();
        message(
            &mut batch,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            seq,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        let mut acks = 0;
        let kind = |m: u16| (NFNL_SUBSYS_NFTABLES << 8) | m;
        for e in entries {
            let (addr, timeout) = (e.addr, e.timeout);
            let steps: &[(u16, Option<u32>, u16)] = if e.renew {
                &[
                    (NFT_MSG_NEWSETELEM, Some(timeout), NLM_F_CREATE),
                    (NFT_MSG_DELSETELEM, None, 0),
                    (NFT_MSG_NEWSETELEM, Some(timeout), NLM_F_CREATE),
                ]
            } else {
                &[(NFT_MSG_NEWSETELEM, Some(timeout), NLM_F_CREATE)]
            };
            for &(m, t, flags) in steps {
                seq = seq.wrapping_add(1);
                message(
                    &mut batch,
                    kind(m),
                    NLM_F_REQUEST | NLM_F_ACK | flags,
                    seq,
                    NFPROTO_INET,
                    0,
                    &elements(addr, t),
                );
                acks += 1;
            }
        }
        seq = seq.wrapping_add(1);
        message(
            &mut batch,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            seq,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        socket.send(&batch, 0)?;
        // One ack (an error message with code 0) for each message that asked for one;
        // the first non-zero code is the kernel's refusal of the whole batch.
        let mut buf = vec![0u8; 65536];
        while acks > 0 {
            let n = socket.recv(&mut &mut buf[..], 0)?;
            let mut at = 0;
            while at + 16 <= n {
                let len =
                    u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                if len < 16 || at + len > n {
                    return Err(io::Error::other("malformed netlink answer"));
                }
                if kind == NLMSG_ERROR && len >= 20 {
                    let code =
                        i32::from_ne_bytes(buf[at + 16..at + 20].try_into().unwrap_or_default());
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    acks -= 1;
                }
                at += (len + 3) & !3;
            }
        }
        Ok(())
    }
}
