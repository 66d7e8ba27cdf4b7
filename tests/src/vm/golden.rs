//! `meta ibrname` (nft_meta_bridge), which the CI kernel lacks: the golden rulesets that
//! use it (`cage-agent/tests/golden/`, `bridge_meta=1`), rendered again here, must equal
//! their golden files, pass `nft --check` and apply; and in a lab where `cage apply`
//! found the module and wrote its layer-2 rule with `meta ibrname`, that rule alone
//! (bridge port isolation switched off) keeps the caged hosts apart, frame for frame.

use std::process::Command;
use std::time::Duration;

use cage_agent::probe::NetNsGuard;
use cage_agent::{config, nft, policy};

use crate::contract::{self, Check, Expect};
use crate::lab::{self, Lab, Node};

use super::{kernel, matrix, row};

const SECTION: &str = "meta ibrname";

/// The golden cases that use `meta ibrname`: (name, configuration, expected ruleset).
const CASES: &[(&str, &str, &str)] = &[
    (
        "example",
        include_str!("../../../openwrt/files/etc/config/cage"),
        include_str!("../../../cage-agent/tests/golden/example.nft"),
    ),
    (
        "ipv4-only",
        include_str!("../../../cage-agent/tests/golden/ipv4-only.conf"),
        include_str!("../../../cage-agent/tests/golden/ipv4-only.nft"),
    ),
    (
        "no-wan",
        include_str!("../../../cage-agent/tests/golden/no-wan.conf"),
        include_str!("../../../cage-agent/tests/golden/no-wan.nft"),
    ),
];

/// The facts line of a golden configuration (`# facts: wan=… bridge_meta=1`); the
/// shipped example's are those `cage-agent/tests/golden.rs` gives it.
fn facts(name: &str, text: &str) -> policy::Facts {
    let line = if name == "example" {
        "wan=wan upstream4=192.168.1.0/24 bridge_meta=1"
    } else {
        text.lines()
            .next()
            .and_then(|l| l.strip_prefix("# facts:"))
            .unwrap_or("")
    };
    let mut f = policy::Facts::default();
    for kv in line.split_whitespace() {
        let Some((k, v)) = kv.split_once('=') else {
            continue;
        };
        let list = || v.split(',').filter(|s| !s.is_empty());
        match k {
            "wan" => f.wan_devices = list().map(str::to_owned).collect(),
            "upstream4" => f.upstream4 = list().filter_map(|s| s.parse().ok()).collect(),
            "upstream6" => f.upstream6 = list().filter_map(|s| s.parse().ok()).collect(),
            "bridge_meta" => f.bridge_meta = v == "1",
            _ => {}
        }
    }
    f
}

pub fn run() {
    if !kernel::require(SECTION, "nft_meta_bridge", "CONFIG_NFT_BRIDGE_META") {
        return;
    }
    let ns = match NetNsGuard::named(format!("vmg-golden-{}", std::process::id())) {
        Ok(ns) => ns,
        Err(e) => {
            row(SECTION, "namespace", false, "-", e);
            return;
        }
    };
    row(
        SECTION,
        "this kernel matches bridged frames by bridge name",
        ns.run("probe", || Ok(nft::supports_bridge_meta()))
            .unwrap_or(false),
        "nft_meta_bridge",
        "cage's own probe (nft --check of a `meta ibrname` rule)",
    );
    for (name, text, golden) in CASES {
        let facts = facts(name, text);
        let cfg = match config::parse(text) {
            Ok(c) => c,
            Err(e) => {
                row(SECTION, &format!("golden {name}"), false, "-", e);
                continue;
            }
        };
        let rendered = policy::render(&cfg, &facts);
        let same = nft::to_text(&rendered) == *golden;
        let json = nft::to_json(&rendered);
        let mut results = Vec::new();
        for args in [&["--check", "-j", "-f", "-"][..], &["-j", "-f", "-"][..]] {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns.name(), "nft"]).args(args);
            results.push(
                match lab::run_command(&mut cmd, Some(&json), Duration::from_secs(60)) {
                    Ok(out) if out.status.success() => Ok(()),
                    Ok(out) => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
                    Err(e) => Err(e.to_string()),
                },
            );
        }
        let mut list = Command::new("ip");
        list.args([
            "netns",
            "exec",
            ns.name(),
            "nft",
            "list",
            "table",
            "bridge",
            "cage",
        ]);
        let listed = lab::run_command(&mut list, None, Duration::from_secs(60))
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let in_kernel = listed.contains("meta ibrname") || listed.contains("ibrname");
        let ok = same && results.iter().all(Result::is_ok) && in_kernel && facts.bridge_meta;
        row(
            SECTION,
            &format!("golden {name}: checked, applied"),
            ok,
            if in_kernel {
                "ibrname rule in the kernel"
            } else {
                "no ibrname rule"
            },
            if ok {
                "rendered = golden file; nft --check and the transaction passed".to_owned()
            } else {
                format!(
                    "same as golden: {same}; nft: {results:?}; listed: {}",
                    listed
                        .lines()
                        .filter(|l| l.contains("br"))
                        .collect::<Vec<_>>()
                        .join(" | ")
                )
            },
        );
        let mut del = Command::new("ip");
        del.args(["netns", "exec", ns.name(), "nft", "flush", "ruleset"]);
        let _ = lab::run_command(&mut del, None, Duration::from_secs(60));
    }
    drop(ns);
    layer2_by_ibrname();
}

/// A lab where `cage apply` wrote the `meta ibrname` rule; with port isolation off, the
/// caged hosts still do not reach each other (the bridge table alone).
fn layer2_by_ibrname() {
    let lab = match Lab::up(&lab::unique_prefix()) {
        Ok(l) => l,
        Err(e) => {
            row(SECTION, "lab up", false, "-", e);
            return;
        }
    };
    lab.write_config(contract::CONFIG_EXTRA);
    let out = lab.cage(&["apply"]);
    if !out.status.success() {
        row(
            SECTION,
            "cage apply",
            false,
            "-",
            String::from_utf8_lossy(&out.stderr),
        );
        return;
    }
    let ruleset = lab.nft_ruleset(Node::Router);
    let uses = ruleset
        .lines()
        .find(|l| l.contains("ibrname"))
        .map(|l| l.trim().to_owned());
    row(
        SECTION,
        "cage apply wrote its layer-2 rule with meta ibrname",
        uses.is_some(),
        "bridge cage",
        uses.unwrap_or_else(|| "no ibrname rule in the router's ruleset".into()),
    );
    for port in ["cage1", "cage2"] {
        if let Err(e) = lab.ip(
            Node::Router,
            &[
                "link",
                "set",
                "dev",
                port,
                "type",
                "bridge_slave",
                "isolated",
                "off",
            ],
        ) {
            row(SECTION, "port isolation off", false, "-", e);
            return;
        }
    }
    let checks: Vec<Check> = contract::checks()
        .into_iter()
        .filter(|c| c.row.starts_with("caged -> caged"))
        .collect();
    matrix::prove(
        &lab,
        SECTION,
        "caged -> caged, port isolation off: the ibrname rule alone",
        &checks,
    );
    // The baseline: without Cage's bridge table (and no br_netfilter, as on OpenWrt) the
    // same frames get through, so the denies above are the rule's.
    lab.nft(Node::Router, "delete table bridge cage");
    let open: Vec<Check> = checks
        .into_iter()
        .map(|c| c.expecting(Expect::Allow))
        .collect();
    matrix::prove(
        &lab,
        SECTION,
        "baseline: the same without the bridge table get through",
        &open,
    );
}
