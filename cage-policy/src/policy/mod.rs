//! The connectivity contract as one nftables ruleset, rendered from a `Config` and the
//! facts detected on the running system.
//!
//! Cage owns two tables, `inet cage` and `bridge cage`, and replaces both in one
//! transaction (`render` emits "add table; delete table; add table; …" so that the batch
//! works whether or not the tables exist, and the kernel swaps old for new atomically).
//!
//! The base chains hook in before OpenWrt's fw4 (which uses priority `filter`, 0, for
//! input and forward, `dstnat`/`srcnat` for NAT). A `drop` or `reject` here is final; an
//! `accept` here only ends Cage's chain, and fw4's chains still see the packet. So Cage
//! can only ever add restrictions to what fw4 allows.
//!
//! Every rule carries a comment `allow:<what>` or `deny:<what>`: `cage status` sums the
//! counters of the `deny:` rules by that name, and `nft list table inet cage` reads well.

use std::borrow::Cow;
use std::net::Ipv6Addr;

use ipnet::{Ipv4Net, Ipv6Net};
use nftables::batch::Batch;
use nftables::schema::{self, NfListObject, Nftables};
use nftables::types::{NfChainType, NfFamily, NfHook};
use serde::Serialize;

use crate::config::Config;

mod bridge;
pub use bridge::{Bindings, BIND_SETS};
mod dns;
mod filter;
mod nat;
mod rules;
mod sets;

use rules::*;

/// The name of both of Cage's tables (`inet cage` and `bridge cage`).
pub const TABLE: &str = "cage";

/// Base chain priorities. fw4 uses `filter` (0) for input/forward, so Cage's chains run
/// first; prerouting runs at `raw` (-300), before conntrack (-200) sees the packet, so a
/// spoofed packet never creates a conntrack entry. In the bridge family `filter` is -200.
pub const PRIO_PREROUTING: i32 = -300;
pub const PRIO_FILTER: i32 = -10;
pub const PRIO_SRCNAT: i32 = 100;
pub const PRIO_BRIDGE_FILTER: i32 = -210;

/// Meters that count, per caged host, rejected attempts (`AUTO_BLOCKED`) and bytes sent
/// to the internet (`AUTO_UPLOAD`), for automatic isolation. Only in the ruleset when the
/// rule is switched on. Cumulative: the daemon compares readings over its window.
pub const AUTO_BLOCKED: [&str; 2] = ["auto_blocked4", "auto_blocked6"];
pub const AUTO_UPLOAD: [&str; 2] = ["auto_upload4", "auto_upload6"];
/// The rules that stop one caged host from harming the others (layer-2 bindings, floods,
/// shares), with what each stops, for the owner's alerts.
pub const NEIGHBOUR_DENIES: [(&str, &str); 8] = [
    (
        "deny:mac-theft",
        "frames from another port with a bound MAC (MAC theft)",
    ),
    (
        "deny:addr-theft",
        "frames claiming another machine's bound address (address theft)",
    ),
    (
        "deny:mac-flood",
        "frames from new MACs over a port's limit (MAC flood)",
    ),
    (
        "deny:addr-flood",
        "frames from new addresses over a MAC's limit (address flood)",
    ),
    (
        "deny:misdelivery",
        "packets the router would have delivered to the wrong MAC",
    ),
    (
        "deny:conntrack-share",
        "new connections of a host over its conntrack share",
    ),
    (
        "deny:flow-rate",
        "new connections of a host over its rate of new flows",
    ),
    (
        "deny:dns-tcp-share",
        "DNS-over-TCP connections of a host over its share",
    ),
];

const COUNT_BLOCKED_CHAIN: &str = "count_blocked";
const COUNT_UPLOAD_CHAIN: &str = "count_upload";

/// The sets of addresses learned from DNS answers to allowed names (allow-list mode):
/// `ipv4_addr`/`ipv6_addr` with per-element timeouts, filled by the forwarder.
pub const ALLOW_SETS: [&str; 2] = ["allow4", "allow6"];
/// The NAT chain's priority: before fw4's `dstnat` (-100), so Cage's DNS redirect is the
/// one that counts.
pub const PRIO_DSTNAT: i32 = -110;

/// The set of `inet cage` that holds the segment's bridge while the kill switch is on.
pub const ISOLATED_SET: &str = "isolated";

/// The comment of the lockdown ruleset's rules, so `cage status` can tell it apart.
pub const LOCKDOWN: &str = "deny:lockdown";

/// The ruleset of last resort: `cage run` started with a configuration it cannot use and
/// the kernel has no Cage policy at all (a reboot with a broken file). Everything to and
/// from `bridge` is dropped, as by the kill switch, until a valid configuration is applied.
pub fn lockdown(bridge: &str) -> Nftables<'static> {
    let mut batch = Batch::new();
    batch.add(table(NfFamily::INet));
    batch.delete(table(NfFamily::INet));
    batch.add(table(NfFamily::INet));
    let b = [bridge.to_owned()];
    let mut rules = Vec::new();
    for (name, hook, prio, matches) in [
        (
            "prerouting",
            NfHook::Prerouting,
            PRIO_PREROUTING,
            iifname(&b),
        ),
        ("forward", NfHook::Forward, PRIO_FILTER, oifname(&b)),
        ("output", NfHook::Output, PRIO_FILTER, oifname(&b)),
    ] {
        batch.add(base_chain(
            NfFamily::INet,
            name,
            NfChainType::Filter,
            hook,
            prio,
        ));
        let mut c = ChainRules::new(NfFamily::INet, name);
        c.rule(LOCKDOWN, vec![matches, counter(), drop()]);
        rules.push(c);
    }
    for r in rules {
        for o in r.into_objects(TABLE) {
            batch.add(o);
        }
    }
    batch.to_nftables()
}

/// The commands that switch isolation on or off in an applied policy: one element added
/// to the `isolated` set, or the set flushed. Both are idempotent.
pub fn isolation(cfg: &Config, on: bool) -> Nftables<'static> {
    let mut batch = Batch::new();
    let set = || schema::Set {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: ISOLATED_SET.into(),
        set_type: schema::SetTypeValue::Single(schema::SetType::Ifname),
        ..Default::default()
    };
    if on {
        batch.add(NfListObject::Element(schema::Element {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: ISOLATED_SET.into(),
            elem: Cow::Owned(vec![s(cfg.segment.bridge.clone())]),
        }));
    } else {
        batch.add_cmd(schema::NfCmd::Flush(schema::FlushObject::Set(Box::new(
            set(),
        ))));
    }
    batch.to_nftables()
}

/// Rejections answer at most this many packets a second per rule (burst as much again);
/// beyond it, denied packets are dropped silently, so a flood of denied traffic cannot
/// make the router spend its CPU answering it.
pub const REJECT_RATE_PER_SECOND: u32 = 200;

/// The NFLOG group Cage's denied packets are logged to (`cage run` reads it), and how
/// much of each packet is copied: the headers are enough for a flow record.
pub const LOG_GROUP: u16 = 2700;
pub const LOG_SNAPLEN: u32 = 128;
/// The named counter of denied packets that were not logged (over the rate limit).
pub const UNLOGGED_COUNTER: &str = "unlogged";

/// What the policy needs to know about the running system besides the configuration.
/// Detected by `netlink::detect_facts`; written by hand in golden tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Facts {
    /// WAN devices: the configured list, or the devices of the default routes.
    pub wan_devices: Vec<String>,
    /// Subnets of the WAN devices' own IPv4 addresses plus configured upstream subnets.
    pub upstream4: Vec<Ipv4Net>,
    /// Subnets of the WAN devices' own global IPv6 addresses plus configured ones.
    pub upstream6: Vec<Ipv6Net>,
    /// Whether the kernel can match a bridged frame by its bridge (`meta ibrname`, module
    /// nft_meta_bridge, CONFIG_NFT_BRIDGE_META). Without it the layer-2 rule names the
    /// segment's ports instead. Detected by `nft::supports_bridge_meta`.
    pub bridge_meta: bool,
    /// The layer-2 bindings in the kernel now, kept across a replace.
    pub bindings: Bindings,
    /// The router's conntrack table size (`nf_conntrack_max`), which the per-host
    /// conntrack share is a part of; 0 when unknown.
    pub conntrack_max: u32,
}

/// IPv4 destinations a caged host may never reach, whatever the route: private (RFC 1918),
/// CGNAT, loopback, link-local, "this network", IETF protocol assignments, benchmarking,
/// multicast, reserved and broadcast. The documentation ranges (192.0.2.0/24,
/// 198.51.100.0/24, 203.0.113.0/24) are not routed on the internet and are left out on
/// purpose: the lab uses them as "the internet".
pub const DENY4: &[(&str, &str)] = &[
    ("0.0.0.0/8", "this network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "CGNAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved and broadcast"),
];

/// IPv6 destinations a caged host may never reach. Besides the ranges of their own, the
/// IPv4 ranges above are denied where IPv6 embeds IPv4 addresses: NAT64's well-known
/// prefix (64:ff9b::/96, a hotel's NAT64 gateway would otherwise reach its private IPv4
/// hosts) and 6to4 (2002::/16); NAT64's local-use prefix and Teredo are denied whole.
pub const DENY6: &[(&str, &str)] = &[
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("2001::/32", "Teredo"),
    ("fc00::/7", "unique local (ULA)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
];

/// The IPv6 deny list in full: [`DENY6`] plus the IPv4 deny list embedded in NAT64's
/// well-known prefix and in 6to4.
pub fn deny6() -> Vec<Ipv6Net> {
    let mut nets: Vec<Ipv6Net> = DENY6.iter().map(|(n, _)| n.parse().unwrap()).collect();
    for (n, _) in DENY4 {
        let v4: Ipv4Net = n.parse().unwrap();
        let o = v4.network().octets();
        // 64:ff9b::a.b.c.d/96+len
        let nat64 = Ipv6Addr::new(
            0x64,
            0xff9b,
            0,
            0,
            0,
            0,
            u16::from_be_bytes([o[0], o[1]]),
            u16::from_be_bytes([o[2], o[3]]),
        );
        nets.push(Ipv6Net::new(nat64, 96 + v4.prefix_len()).unwrap());
        // 2002:a.b.c.d::/16+len
        let six2four = Ipv6Addr::new(
            0x2002,
            u16::from_be_bytes([o[0], o[1]]),
            u16::from_be_bytes([o[2], o[3]]),
            0,
            0,
            0,
            0,
            0,
        );
        nets.push(Ipv6Net::new(six2four, 16 + v4.prefix_len()).unwrap());
    }
    nets.sort();
    nets
}

fn deny4() -> Vec<Ipv4Net> {
    DENY4.iter().map(|(n, _)| n.parse().unwrap()).collect()
}

/// Render the whole policy: the commands of one transaction that replaces Cage's tables.
pub fn render(cfg: &Config, facts: &Facts) -> Nftables<'static> {
    let mut batch = Batch::new();
    // Replace, atomically: adding first makes the delete valid when the table is absent.
    for fam in [NfFamily::INet, NfFamily::Bridge] {
        batch.add(table(fam));
        batch.delete(table(fam));
        batch.add(table(fam));
    }
    sets::sets(&mut batch, cfg, facts);
    // Every chain exists before the first rule: the rules jump between them.
    let mut rules = filter::filter(&mut batch, cfg, facts);
    rules.extend(dns::dns_redirect(&mut batch, cfg));
    rules.extend(nat::masquerade(&mut batch, cfg, facts));
    rules.extend(bridge::layer2(&mut batch, cfg, facts));
    for r in rules {
        for o in r.into_objects(TABLE) {
            batch.add(o);
        }
    }
    batch.to_nftables()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab_config() -> Config {
        crate::config::parse(
            "config segment 'ai'\n\toption ipv6 '1'\n\toption address6 'fd00:cafe:10::1/64'\n\
             \tlist port 'cage1'\n\tlist port 'cage2'\n\n\
             config lan 'lan'\n\tlist admin_host '192.168.8.20'\n\n\
             config wan 'wan'\n\tlist device 'wan'\n",
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn lab_facts() -> Facts {
        Facts {
            wan_devices: vec!["wan".into()],
            upstream4: vec!["10.99.0.0/24".parse().unwrap()],
            upstream6: vec!["2001:db8:99::/64".parse().unwrap()],
            ..Default::default()
        }
    }

    #[test]
    fn deny6_embeds_private_ipv4_in_nat64_and_6to4() {
        let d = deny6();
        assert!(d.contains(&"64:ff9b::a00:0/104".parse().unwrap()));
        assert!(d.contains(&"2002:c0a8::/32".parse().unwrap()));
        assert!(d.contains(&"fc00::/7".parse().unwrap()));
    }

    #[test]
    fn every_deny_rule_is_counted() {
        let rs = render(&lab_config(), &lab_facts());
        let json = serde_json::to_value(&rs).unwrap();
        let mut denies = 0;
        for o in json["nftables"].as_array().unwrap() {
            let Some(rule) = o.get("add").and_then(|a| a.get("rule")) else {
                continue;
            };
            let comment = rule["comment"].as_str().unwrap();
            let exprs = rule["expr"].as_array().unwrap();
            if comment.starts_with("deny:") {
                denies += 1;
                assert!(
                    exprs.iter().any(|e| e.get("counter").is_some()),
                    "{comment} has no counter"
                );
            }
        }
        assert!(denies > 20, "only {denies} deny rules");
    }

    #[test]
    fn no_wan_means_no_internet() {
        let rs = render(&lab_config(), &Facts::default());
        let text = crate::text::to_text(&rs);
        assert!(text.contains("comment \"deny:no-wan\""));
        assert!(!text.contains("allow:internet"));
        assert!(!text.contains("masquerade"));
    }
}
