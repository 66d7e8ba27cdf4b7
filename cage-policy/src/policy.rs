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

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nftables::batch::Batch;
use nftables::expr::{
    Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, SetItem, CT,
};
use nftables::schema::{self, NfListObject, Nftables};
use nftables::stmt::{self, Counter, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook, RejectCode};
use serde::Serialize;

use crate::config::{Config, Egress};

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
const COUNT_BLOCKED_CHAIN: &str = "count_blocked";
const COUNT_UPLOAD_CHAIN: &str = "count_upload";

/// A chain that feeds a per-source-host counter meter pair (IPv4, IPv6) and returns.
fn meter_chain(name: &'static str, meters: [&'static str; 2]) -> ChainRules {
    let mut c = ChainRules::new(NfFamily::INet, name);
    for (meter, proto, family) in [(meters[0], "ip", "ipv4"), (meters[1], "ip6", "ipv6")] {
        c.rule(
            "count:auto",
            vec![
                is(meta(MetaKey::Nfproto), s(family)),
                Statement::Meter(stmt::Meter {
                    name: meter.into(),
                    key: payload(proto, "saddr"),
                    stmt: Box::new(counter()),
                }),
            ],
        );
    }
    c
}

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

// ---- expression helpers -------------------------------------------------------------

fn s(v: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(v.into()))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: key.into(),
        family: None,
        dir: None,
    }))
}

fn net(n: IpNet) -> Expression<'static> {
    if n.prefix_len() == n.max_prefix_len() {
        return s(n.addr().to_string());
    }
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(s(n.network().to_string())),
        len: n.prefix_len() as u32,
    }))
}

fn anon_set(items: Vec<Expression<'static>>) -> Expression<'static> {
    if items.len() == 1 {
        return items.into_iter().next().unwrap();
    }
    Expression::Named(NamedExpression::Set(
        items.into_iter().map(SetItem::Element).collect(),
    ))
}

fn names(devs: &[String]) -> Expression<'static> {
    anon_set(devs.iter().map(|d| s(d.clone())).collect())
}

fn is(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

fn is_not(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::NEQ,
    })
}

fn iifname(devs: &[String]) -> Statement<'static> {
    is(meta(MetaKey::Iifname), names(devs))
}

fn oifname(devs: &[String]) -> Statement<'static> {
    is(meta(MetaKey::Oifname), names(devs))
}

fn l4proto(p: &'static str) -> Statement<'static> {
    is(meta(MetaKey::L4proto), s(p))
}

fn dport(proto: &'static str, port: u16) -> Statement<'static> {
    is(payload(proto, "dport"), Expression::Number(port as u32))
}

fn counter() -> Statement<'static> {
    Statement::Counter(Counter::Anonymous(None))
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

fn drop() -> Statement<'static> {
    Statement::Drop(None)
}

fn jump(chain: &str) -> Statement<'static> {
    Statement::Jump(stmt::JumpTarget {
        target: chain.to_owned().into(),
    })
}

fn set_ref(name: &str) -> Expression<'static> {
    s(format!("@{name}"))
}

/// The NFLOG group Cage's denied packets are logged to (`cage run` reads it), and how
/// much of each packet is copied: the headers are enough for a flow record.
pub const LOG_GROUP: u16 = 2700;
pub const LOG_SNAPLEN: u32 = 128;
/// The named counter of denied packets that were not logged (over the rate limit).
pub const UNLOGGED_COUNTER: &str = "unlogged";

fn log(prefix: &str) -> Statement<'static> {
    Statement::Log(Some(stmt::Log {
        prefix: Some(prefix.to_owned().into()),
        group: Some(u32::from(LOG_GROUP)),
        snaplen: Some(LOG_SNAPLEN),
        queue_threshold: None,
        level: None,
        flags: None,
    }))
}

fn unlogged() -> Statement<'static> {
    Statement::Counter(Counter::Named(UNLOGGED_COUNTER.into()))
}

fn limit() -> Statement<'static> {
    Statement::Limit(stmt::Limit {
        rate: REJECT_RATE_PER_SECOND,
        rate_unit: None,
        per: Some("second".into()),
        burst: Some(REJECT_RATE_PER_SECOND),
        burst_unit: None,
        inv: None,
    })
}

// ---- the ruleset ----------------------------------------------------------------------

/// A chain being filled: rules are appended in order, each with its comment.
struct ChainRules {
    family: NfFamily,
    name: &'static str,
    rules: Vec<(Vec<Statement<'static>>, String)>,
    /// Count each rejected attempt per source host (automatic isolation).
    count_blocked: bool,
}

impl ChainRules {
    fn new(family: NfFamily, name: &'static str) -> Self {
        ChainRules {
            family,
            name,
            rules: Vec::new(),
            count_blocked: false,
        }
    }

    fn counting_blocked(mut self, on: bool) -> Self {
        self.count_blocked = on;
        self
    }

    fn rule(&mut self, comment: &str, stmts: Vec<Statement<'static>>) {
        self.rules.push((stmts, comment.to_owned()));
    }

    /// Deny with a fast answer (TCP reset, ICMP administratively prohibited), counted
    /// and rate-limited: `matches` select the packets, `comment` names the deny.
    /// Deny by dropping, counted, logged to NFLOG while under the rate limit, counted
    /// as unlogged beyond it.
    fn deny(&mut self, comment: &str, matches: Vec<Statement<'static>>) {
        let mut logged = matches.clone();
        logged.extend([limit(), counter(), log(comment), drop()]);
        self.rule(comment, logged);
        let mut over = matches;
        over.extend([counter(), unlogged(), drop()]);
        self.rule(comment, over);
    }

    fn reject(&mut self, comment: &str, matches: Vec<Statement<'static>>) {
        if self.count_blocked {
            let mut count = matches.clone();
            count.push(jump(COUNT_BLOCKED_CHAIN));
            self.rule(comment, count);
        }
        let mut tcp = matches.clone();
        tcp.extend([
            l4proto("tcp"),
            limit(),
            counter(),
            log(comment),
            Statement::Reject(Some(stmt::Reject::new(
                Some(stmt::RejectType::TCPReset),
                None,
            ))),
        ]);
        self.rule(comment, tcp);
        let mut other = matches.clone();
        other.extend([
            limit(),
            counter(),
            log(comment),
            Statement::Reject(Some(stmt::Reject::new(
                Some(stmt::RejectType::ICMPX),
                Some(RejectCode::AdminProhibited),
            ))),
        ]);
        self.rule(comment, other);
        let mut over = matches;
        over.extend([counter(), unlogged(), drop()]);
        self.rule(comment, over);
    }

    fn into_objects(self, table: &str) -> Vec<NfListObject<'static>> {
        let (family, chain) = (self.family, self.name);
        self.rules
            .into_iter()
            .map(|(expr, comment)| {
                NfListObject::Rule(schema::Rule {
                    family,
                    table: table.to_owned().into(),
                    chain: chain.into(),
                    expr: expr.into(),
                    handle: None,
                    index: None,
                    comment: Some(comment.into()),
                })
            })
            .collect()
    }
}

fn table(family: NfFamily) -> NfListObject<'static> {
    NfListObject::Table(schema::Table {
        family,
        name: TABLE.into(),
        handle: None,
    })
}

fn base_chain(
    family: NfFamily,
    name: &'static str,
    kind: NfChainType,
    hook: NfHook,
    prio: i32,
) -> NfListObject<'static> {
    NfListObject::Chain(schema::Chain {
        family,
        table: TABLE.into(),
        name: name.into(),
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Default::default()
    })
}

fn regular_chain(family: NfFamily, name: &'static str) -> NfListObject<'static> {
    NfListObject::Chain(schema::Chain {
        family,
        table: TABLE.into(),
        name: name.into(),
        ..Default::default()
    })
}

/// The type of a set of IPv6 or IPv4 addresses.
fn addr_type(v6: bool) -> schema::SetTypeValue<'static> {
    schema::SetTypeValue::Single(if v6 {
        schema::SetType::Ipv6Addr
    } else {
        schema::SetType::Ipv4Addr
    })
}

fn addr_set(
    name: &'static str,
    v6: bool,
    elems: Vec<IpNet>,
    comment: &'static str,
) -> NfListObject<'static> {
    let interval = elems.iter().any(|n| n.prefix_len() != n.max_prefix_len());
    NfListObject::Set(Box::new(schema::Set {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: name.into(),
        set_type: addr_type(v6),
        flags: interval.then(|| [schema::SetFlag::Interval].into_iter().collect()),
        elem: (!elems.is_empty())
            .then(|| Cow::Owned(elems.into_iter().map(net).collect::<Vec<_>>())),
        comment: Some(comment.into()),
        ..Default::default()
    }))
}

/// Render the whole policy: the commands of one transaction that replaces Cage's tables.
pub fn render(cfg: &Config, facts: &Facts) -> Nftables<'static> {
    let seg = &cfg.segment;
    let bridge = std::slice::from_ref(&seg.bridge);
    let inet = NfFamily::INet;
    let mut batch = Batch::new();

    // Replace, atomically: adding first makes the delete valid when the table is absent.
    for fam in [NfFamily::INet, NfFamily::Bridge] {
        batch.add(table(fam));
        batch.delete(table(fam));
        batch.add(table(fam));
    }

    // Named sets, so that `nft list table inet cage` shows what is denied.
    batch.add(addr_set(
        "deny4",
        false,
        deny4().into_iter().map(IpNet::V4).collect(),
        "private, CGNAT, link-local, multicast and reserved IPv4",
    ));
    batch.add(addr_set(
        "deny6",
        true,
        deny6().into_iter().map(IpNet::V6).collect(),
        "ULA, link-local, multicast and embedded-private IPv6",
    ));
    batch.add(addr_set(
        "upstream4",
        false,
        facts.upstream4.iter().copied().map(IpNet::V4).collect(),
        "the upstream network (WAN subnets, configured upstream subnets)",
    ));
    batch.add(addr_set(
        "upstream6",
        true,
        facts.upstream6.iter().copied().map(IpNet::V6).collect(),
        "the upstream network (WAN subnets, configured upstream subnets)",
    ));
    let (admin4, admin6): (Vec<_>, Vec<_>) = cfg.lan.admin_hosts.iter().partition(|a| a.is_ipv4());
    batch.add(addr_set(
        "admin4",
        false,
        admin4
            .iter()
            .map(|a: &&std::net::IpAddr| IpNet::from(**a))
            .collect(),
        "LAN hosts that may open connections into the segment",
    ));
    batch.add(addr_set(
        "admin6",
        true,
        admin6
            .iter()
            .map(|a: &&std::net::IpAddr| IpNet::from(**a))
            .collect(),
        "LAN hosts that may open connections into the segment",
    ));

    batch.add(NfListObject::Counter(schema::Counter {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: UNLOGGED_COUNTER.into(),
        handle: None,
        packets: None,
        bytes: None,
    }));

    let dns = &cfg.dns;
    if dns.enabled && dns.egress == Egress::Allowlist {
        for (name, v6) in [(ALLOW_SETS[0], false), (ALLOW_SETS[1], true)] {
            batch.add(NfListObject::Set(Box::new(schema::Set {
                family: NfFamily::INet,
                table: TABLE.into(),
                name: name.into(),
                set_type: addr_type(v6),
                flags: Some([schema::SetFlag::Timeout].into_iter().collect()),
                comment: Some("addresses from DNS answers to allowed names".into()),
                ..Default::default()
            })));
        }
    }
    if dns.enabled && !dns.doh_block_ips.is_empty() {
        let (d4, d6): (Vec<std::net::IpAddr>, Vec<std::net::IpAddr>) =
            dns.doh_block_ips.iter().partition(|a| a.is_ipv4());
        batch.add(addr_set(
            "doh4",
            false,
            d4.into_iter().map(IpNet::from).collect(),
            "DNS-over-HTTPS endpoints by address",
        ));
        batch.add(addr_set(
            "doh6",
            true,
            d6.into_iter().map(IpNet::from).collect(),
            "DNS-over-HTTPS endpoints by address",
        ));
    }

    // The kill switch: while the segment's bridge is in this set, everything to and
    // from it is dropped, first thing in every base chain. Isolating or releasing is one
    // element added or flushed (`isolation`), not a new ruleset.
    batch.add(NfListObject::Set(Box::new(schema::Set {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: ISOLATED_SET.into(),
        set_type: schema::SetTypeValue::Single(schema::SetType::Ifname),
        comment: Some("the segment while the kill switch is on".into()),
        ..Default::default()
    })));

    // Base chains: each only dispatches the segment's traffic to a chain of its own.
    batch.add(base_chain(
        inet,
        "prerouting",
        NfChainType::Filter,
        NfHook::Prerouting,
        PRIO_PREROUTING,
    ));
    batch.add(base_chain(
        inet,
        "input",
        NfChainType::Filter,
        NfHook::Input,
        PRIO_FILTER,
    ));
    batch.add(base_chain(
        inet,
        "forward",
        NfChainType::Filter,
        NfHook::Forward,
        PRIO_FILTER,
    ));
    batch.add(base_chain(
        inet,
        "output",
        NfChainType::Filter,
        NfHook::Output,
        PRIO_FILTER,
    ));
    for name in [
        "segment_ingress",
        "segment_to_router",
        "segment_egress",
        "into_segment",
    ] {
        batch.add(regular_chain(inet, name));
    }

    let mut rules = Vec::new();
    let ks = &cfg.killswitch;
    if ks.auto_blocked > 0 {
        batch.add(regular_chain(inet, COUNT_BLOCKED_CHAIN));
        rules.push(meter_chain(COUNT_BLOCKED_CHAIN, AUTO_BLOCKED));
    }
    if ks.auto_upload_bytes > 0 {
        batch.add(regular_chain(inet, COUNT_UPLOAD_CHAIN));
        rules.push(meter_chain(COUNT_UPLOAD_CHAIN, AUTO_UPLOAD));
    }

    let isolated_in = || {
        vec![
            is(meta(MetaKey::Iifname), set_ref(ISOLATED_SET)),
            counter(),
            drop(),
        ]
    };
    let isolated_out = || {
        vec![
            is(meta(MetaKey::Oifname), set_ref(ISOLATED_SET)),
            counter(),
            drop(),
        ]
    };

    let mut pre = ChainRules::new(inet, "prerouting");
    pre.rule("deny:isolated", isolated_in());
    pre.rule("segment", vec![iifname(bridge), jump("segment_ingress")]);
    rules.push(pre);

    rules.push(segment_ingress(cfg));

    let mut input = ChainRules::new(inet, "input");
    input.rule("segment", vec![iifname(bridge), jump("segment_to_router")]);
    rules.push(input);

    rules.push(segment_to_router(cfg));

    let mut fwd = ChainRules::new(inet, "forward");
    fwd.rule("deny:isolated", isolated_out());
    fwd.rule("segment", vec![iifname(bridge), jump("segment_egress")]);
    fwd.rule("segment", vec![oifname(bridge), jump("into_segment")]);
    rules.push(fwd);

    // The router's own packets to the segment (DHCP and DNS answers, neighbour
    // discovery) stop too while isolated; otherwise output is not Cage's business.
    let mut out = ChainRules::new(inet, "output");
    out.rule("deny:isolated", isolated_out());
    rules.push(out);

    rules.push(segment_egress(cfg, facts));
    rules.push(into_segment(cfg));

    // DNS through the router: every query the segment sends to port 53, to the router or
    // to any server outside, is answered by Cage's forwarder (translated to its port on
    // the router's segment address of the same family: explicitly, not `redirect`, which
    // takes whichever address the bridge lists first, where the forwarder may not
    // listen). Without `cage run` the port has no listener, so DNS fails closed. Spoofed
    // sources were dropped before (prerouting at -300).
    if dns.enabled {
        batch.add(base_chain(
            inet,
            "dns_redirect",
            NfChainType::NAT,
            NfHook::Prerouting,
            PRIO_DSTNAT,
        ));
        let mut nat = ChainRules::new(inet, "dns_redirect");
        let targets = std::iter::once((
            "ipv4",
            stmt::NATFamily::IP,
            std::net::IpAddr::V4(seg.router4()),
        ))
        .chain(
            seg.router6()
                .map(|r| ("ipv6", stmt::NATFamily::IP6, std::net::IpAddr::V6(r))),
        );
        for (family, nat_family, router) in targets {
            for proto in ["udp", "tcp"] {
                nat.rule(
                    "redirect:dns",
                    vec![
                        iifname(bridge),
                        is(meta(MetaKey::Nfproto), s(family)),
                        l4proto(proto),
                        dport(proto, 53),
                        counter(),
                        Statement::DNAT(Some(stmt::NAT {
                            addr: Some(s(router.to_string())),
                            family: Some(nat_family),
                            port: Some(Expression::Number(u32::from(dns.listen_port))),
                            flags: None,
                        })),
                    ],
                );
            }
        }
        rules.push(nat);
    }

    // NAT, only where there is a WAN to leave through.
    if cfg.wan.masquerade && !facts.wan_devices.is_empty() {
        batch.add(base_chain(
            inet,
            "postrouting",
            NfChainType::NAT,
            NfHook::Postrouting,
            PRIO_SRCNAT,
        ));
        let mut nat = ChainRules::new(inet, "postrouting");
        let masq = || Statement::Masquerade(None);
        nat.rule(
            "allow:masquerade",
            vec![
                iifname(bridge),
                oifname(&facts.wan_devices),
                is(payload("ip", "saddr"), net(IpNet::V4(seg.subnet4()))),
                masq(),
            ],
        );
        if let Some(sub6) = seg.subnet6() {
            nat.rule(
                "allow:masquerade",
                vec![
                    iifname(bridge),
                    oifname(&facts.wan_devices),
                    is(payload("ip6", "saddr"), net(IpNet::V6(sub6))),
                    masq(),
                ],
            );
        }
        rules.push(nat);
    }

    // Layer 2: frames between two ports of the segment's bridge. Bridge port isolation
    // stops them first; this rule holds if isolation is ever switched off.
    batch.add(base_chain(
        NfFamily::Bridge,
        "forward",
        NfChainType::Filter,
        NfHook::Forward,
        PRIO_BRIDGE_FILTER,
    ));
    let mut l2 = ChainRules::new(NfFamily::Bridge, "forward");
    if facts.bridge_meta {
        l2.rule(
            "deny:segment-l2",
            vec![
                is(meta(MetaKey::Ibridgename), s(seg.bridge.clone())),
                counter(),
                drop(),
            ],
        );
    } else if !seg.ports.is_empty() {
        // Kernels without nft_meta_bridge: the frames that enter through one of the
        // segment's configured ports.
        l2.rule(
            "deny:segment-l2",
            vec![iifname(&seg.ports), counter(), drop()],
        );
    }

    let mut objects = Vec::new();
    for r in rules {
        objects.extend(r.into_objects(TABLE));
    }
    objects.extend(l2.into_objects(TABLE));
    for o in objects {
        batch.add(o);
    }
    batch.to_nftables()
}

/// First look at every packet from the segment, before conntrack: drop spoofed sources,
/// rogue router advertisements and rogue DHCP servers.
fn segment_ingress(cfg: &Config) -> ChainRules {
    let seg = &cfg.segment;
    let mut c = ChainRules::new(NfFamily::INet, "segment_ingress");
    // A DHCP client has no address yet: 0.0.0.0 → 255.255.255.255, UDP 68 → 67.
    c.rule(
        "allow:dhcp-discover",
        vec![
            is(payload("ip", "saddr"), s("0.0.0.0")),
            is(payload("udp", "sport"), Expression::Number(68)),
            dport("udp", 67),
            Statement::Return(None),
        ],
    );
    c.deny(
        "deny:spoofed-source",
        vec![is_not(
            payload("ip", "saddr"),
            net(IpNet::V4(seg.subnet4())),
        )],
    );
    match seg.subnet6() {
        Some(sub6) => {
            // Link-local sources (neighbour discovery, DHCPv6) and the unspecified
            // address (duplicate address detection) are part of IPv6 on a link.
            let ll: Ipv6Net = "fe80::/10".parse().unwrap();
            c.deny(
                "deny:spoofed-source",
                vec![is_not(
                    payload("ip6", "saddr"),
                    anon_set(vec![
                        net(IpNet::V6(sub6)),
                        net(IpNet::V6(ll)),
                        s(Ipv6Addr::UNSPECIFIED.to_string()),
                    ]),
                )],
            );
        }
        None => c.deny("deny:ipv6-off", vec![is(meta(MetaKey::Nfproto), s("ipv6"))]),
    }
    c.deny(
        "deny:rogue-router-advert",
        vec![is(
            payload("icmpv6", "type"),
            anon_set(vec![s("nd-router-advert"), s("nd-redirect")]),
        )],
    );
    c.deny(
        "deny:rogue-dhcp-server",
        vec![
            is(payload("udp", "sport"), Expression::Number(67)),
            dport("udp", 68),
        ],
    );
    c.deny(
        "deny:rogue-dhcp-server",
        vec![
            is(payload("udp", "sport"), Expression::Number(547)),
            dport("udp", 546),
        ],
    );
    c
}

/// Segment → the router itself (any of its addresses): DHCP and DNS, nothing else.
fn segment_to_router(cfg: &Config) -> ChainRules {
    let seg = &cfg.segment;
    let mut c = ChainRules::new(NfFamily::INet, "segment_to_router")
        .counting_blocked(cfg.killswitch.auto_blocked > 0);
    c.rule("allow:dhcp", vec![dport("udp", 67), accept()]);
    let router4 = IpNet::from(std::net::IpAddr::V4(seg.router4()));
    // With DNS through Cage, port 53 never arrives here (redirected to the forwarder's
    // port in prerouting); without, the router's own resolver answers on 53.
    let dns_port = if cfg.dns.enabled {
        cfg.dns.listen_port
    } else {
        53
    };
    for proto in ["udp", "tcp"] {
        c.rule(
            "allow:dns",
            vec![
                is(payload("ip", "daddr"), net(router4)),
                dport(proto, dns_port),
                accept(),
            ],
        );
    }
    if let Some(r6) = seg.router6() {
        let router6 = IpNet::from(std::net::IpAddr::V6(r6));
        c.rule(
            "allow:dhcpv6",
            vec![
                is(
                    payload("ip6", "daddr"),
                    anon_set(vec![s("ff02::1:2"), net(router6)]),
                ),
                dport("udp", 547),
                accept(),
            ],
        );
        for proto in ["udp", "tcp"] {
            c.rule(
                "allow:dns",
                vec![
                    is(payload("ip6", "daddr"), net(router6)),
                    dport(proto, dns_port),
                    accept(),
                ],
            );
        }
        // Without neighbour discovery IPv6 does not work on the link at all.
        c.rule(
            "allow:ndp",
            vec![
                is(
                    payload("icmpv6", "type"),
                    anon_set(vec![
                        s("nd-neighbor-solicit"),
                        s("nd-neighbor-advert"),
                        s("nd-router-solicit"),
                    ]),
                ),
                accept(),
            ],
        );
    }
    // Broadcasts and multicasts (mDNS, SSDP, …) to the router are dropped without an
    // answer: rejecting them would make the router talk to the whole segment.
    c.deny(
        "deny:router",
        vec![is(
            meta(MetaKey::Pkttype),
            anon_set(vec![s("broadcast"), s("multicast")]),
        )],
    );
    c.reject("deny:router", vec![]);
    c
}

/// Segment → anywhere but the router: the internet through the WAN, nothing else.
fn segment_egress(cfg: &Config, facts: &Facts) -> ChainRules {
    let bridge = std::slice::from_ref(&cfg.segment.bridge);
    let mut c = ChainRules::new(NfFamily::INet, "segment_egress")
        .counting_blocked(cfg.killswitch.auto_blocked > 0);
    c.deny("deny:invalid", vec![is(ct("state"), s("invalid"))]);
    // Packets that answer a connection someone else opened into the segment. Only the
    // admin hosts can open one (see `into_segment`), so these are their sessions.
    c.rule(
        "allow:replies",
        vec![is(ct("direction"), s("reply")), accept()],
    );
    c.reject("deny:segment", vec![oifname(bridge)]);
    c.reject("deny:lan", vec![oifname(&cfg.lan.devices)]);
    // The upstream network before the private ranges, which usually contain it: the
    // log then names the more telling rule.
    c.reject(
        "deny:upstream",
        vec![is(payload("ip", "daddr"), set_ref("upstream4"))],
    );
    c.reject(
        "deny:upstream",
        vec![is(payload("ip6", "daddr"), set_ref("upstream6"))],
    );
    c.reject(
        "deny:private",
        vec![is(payload("ip", "daddr"), set_ref("deny4"))],
    );
    c.reject(
        "deny:private",
        vec![is(payload("ip6", "daddr"), set_ref("deny6"))],
    );
    if facts.wan_devices.is_empty() {
        // Fail closed: with no WAN known there is no internet to allow.
        c.reject("deny:no-wan", vec![]);
    } else {
        c.reject(
            "deny:not-wan",
            vec![is_not(meta(MetaKey::Oifname), names(&facts.wan_devices))],
        );
        let dns = &cfg.dns;
        if dns.enabled {
            // DNS over TLS would hide names from Cage; DNS over HTTPS by address too.
            // DNS over TLS (TCP) and over QUIC (UDP) use port 853.
            c.reject(
                "deny:dot",
                vec![
                    is(meta(MetaKey::L4proto), anon_set(vec![s("tcp"), s("udp")])),
                    is(payload("th", "dport"), Expression::Number(853)),
                ],
            );
            if !dns.doh_block_ips.is_empty() {
                c.reject(
                    "deny:doh",
                    vec![is(payload("ip", "daddr"), set_ref("doh4"))],
                );
                c.reject(
                    "deny:doh",
                    vec![is(payload("ip6", "daddr"), set_ref("doh6"))],
                );
            }
            if dns.egress == Egress::Allowlist {
                // Only what answers to allowed names pointed at, while their TTL lasts.
                c.reject(
                    "deny:not-allowlisted",
                    vec![is_not(payload("ip", "daddr"), set_ref(ALLOW_SETS[0]))],
                );
                c.reject(
                    "deny:not-allowlisted",
                    vec![is_not(payload("ip6", "daddr"), set_ref(ALLOW_SETS[1]))],
                );
            }
        }
        if cfg.killswitch.auto_upload_bytes > 0 {
            c.rule("count:auto", vec![jump(COUNT_UPLOAD_CHAIN)]);
        }
        c.rule("allow:internet", vec![counter(), accept()]);
    }
    c
}

/// Anything else → the segment: answers to the segment's own connections, and new
/// connections from the admin hosts on the LAN; nothing else.
fn into_segment(cfg: &Config) -> ChainRules {
    let mut c = ChainRules::new(NfFamily::INet, "into_segment");
    c.rule(
        "allow:established",
        vec![
            is(ct("state"), anon_set(vec![s("established"), s("related")])),
            accept(),
        ],
    );
    let lan = &cfg.lan.devices;
    if cfg.lan.admin_hosts.iter().any(|a| a.is_ipv4()) {
        c.rule(
            "allow:admin-host",
            vec![
                iifname(lan),
                is(payload("ip", "saddr"), set_ref("admin4")),
                is(ct("state"), s("new")),
                accept(),
            ],
        );
    }
    if cfg.lan.admin_hosts.iter().any(|a| a.is_ipv6()) {
        c.rule(
            "allow:admin-host",
            vec![
                iifname(lan),
                is(payload("ip6", "saddr"), set_ref("admin6")),
                is(ct("state"), s("new")),
                accept(),
            ],
        );
    }
    c.deny("deny:into-segment", vec![]);
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Lan, Main, Segment, Wan, WanDevices};

    fn lab_config() -> Config {
        Config {
            main: Main {
                state_dir: "/etc/cage".into(),
                log_dir: "/tmp/cage".into(),
                web_listen: "192.168.8.1:8080".parse().unwrap(),
                bpf_dir: "/sys/fs/bpf/cage".into(),
                mode: crate::config::Mode::Auto,
                password_hash: None,
                web_hostnames: vec![],
                log_level: crate::config::LogLevel::Info,
            },
            segment: Segment {
                bridge: "br-cage".into(),
                address: "192.168.10.1/24".parse().unwrap(),
                ipv6: true,
                address6: Some("fd00:cafe:10::1/64".parse().unwrap()),
                ports: vec!["cage1".into(), "cage2".into()],
                vlan: None,
            },
            lan: Lan {
                devices: vec!["br-lan".into()],
                admin_hosts: vec!["192.168.8.20".parse().unwrap()],
            },
            wan: Wan {
                devices: WanDevices::List(vec!["wan".into()]),
                masquerade: true,
                upstream_subnets: vec![],
            },
            killswitch: Default::default(),
            flowlog: Default::default(),
            selftest: Default::default(),
            dns: Default::default(),
        }
    }

    fn lab_facts() -> Facts {
        Facts {
            wan_devices: vec!["wan".into()],
            upstream4: vec!["10.99.0.0/24".parse().unwrap()],
            upstream6: vec!["2001:db8:99::/64".parse().unwrap()],
            bridge_meta: false,
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
