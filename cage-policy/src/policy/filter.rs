//! The filter chains: four base chains (prerouting, input, forward, output) that only
//! dispatch the segment's traffic, after the kill switch's check, to a chain of its own
//! (`segment_ingress`, `segment_to_router`, `segment_egress`, `into_segment`), and the
//! counting chains of automatic isolation.

use ipnet::IpNet;
use nftables::batch::Batch;
use nftables::expr::{Expression, MetaKey};
use nftables::stmt::{self, Statement};
use nftables::types::{NfChainType, NfFamily, NfHook};

use super::rules::*;
use super::*;
use crate::config::{Config, Egress};

/// The base and regular chains into `batch`; their rules, in order, for the caller to add
/// after every chain exists.
pub(super) fn filter(batch: &mut Batch<'static>, cfg: &Config, facts: &Facts) -> Vec<ChainRules> {
    let seg = &cfg.segment;
    let bridge = std::slice::from_ref(&seg.bridge);
    let inet = NfFamily::INet;
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
        HOST_SHARES,
        OVER_CONNTRACK,
        OVER_FLOW_RATE,
        OVER_DNS_TCP,
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
    rules.extend(host_shares(cfg, facts));
    rules
}

const HOST_SHARES: &str = "host_shares";
const OVER_CONNTRACK: &str = "over_conntrack";
const OVER_FLOW_RATE: &str = "over_flow_rate";
const OVER_DNS_TCP: &str = "over_dns_tcp";

/// One caged host's share of what the router keeps for every connection: at most
/// `limits.conntrack_per_host` connections at once and `limits.new_flows_per_second`
/// new ones a second (per source address, IPv4 and IPv6 alike). A host over its share
/// gets no new connection; the others are unaffected. Asked once for each new
/// connection (`ct state new`), from the segment's chains; each "over" chain denies with
/// a rule of its own, so the meters are asked once a packet.
fn host_shares(cfg: &Config, facts: &Facts) -> Vec<ChainRules> {
    let lim = &cfg.limits;
    let conns = lim.conntrack_per_host(facts.conntrack_max);
    let mut c = ChainRules::new(NfFamily::INet, HOST_SHARES);
    for (proto, family, v) in [("ip", "ipv4", "4"), ("ip6", "ipv6", "6")] {
        c.rule(
            "share:conntrack",
            vec![
                is(meta(MetaKey::Nfproto), s(family)),
                meter_over(
                    &format!("conns{v}"),
                    payload(proto, "saddr"),
                    ct_count_over(conns),
                ),
                goto(OVER_CONNTRACK),
            ],
        );
        c.rule(
            "share:flow-rate",
            vec![
                is(meta(MetaKey::Nfproto), s(family)),
                meter_over(
                    &format!("new_flows{v}"),
                    payload(proto, "saddr"),
                    Statement::Limit(stmt::Limit {
                        rate: lim.new_flows_per_second,
                        rate_unit: None,
                        per: Some("second".into()),
                        burst: Some(lim.new_flows_burst),
                        burst_unit: None,
                        inv: Some(true),
                    }),
                ),
                goto(OVER_FLOW_RATE),
            ],
        );
    }
    // Going over a share is a blocked attempt too: with `killswitch.auto_blocked` on, it
    // counts towards the host's automatic isolation like a rejected one.
    let over = |name: &'static str, comment: &str| {
        let mut o = ChainRules::new(NfFamily::INet, name);
        if cfg.killswitch.auto_blocked > 0 {
            o.rule(comment, vec![jump(COUNT_BLOCKED_CHAIN)]);
        }
        o.deny(comment, vec![]);
        o
    };
    vec![
        c,
        over(OVER_CONNTRACK, "deny:conntrack-share"),
        over(OVER_FLOW_RATE, "deny:flow-rate"),
        over(OVER_DNS_TCP, "deny:dns-tcp-share"),
    ]
}

fn ct_count_over(n: u32) -> Statement<'static> {
    Statement::CTCount(stmt::CTCount {
        val: Expression::Number(n),
        inv: Some(true),
    })
}

fn meter_over(
    name: &str,
    key: Expression<'static>,
    over: Statement<'static>,
) -> Statement<'static> {
    Statement::Meter(stmt::Meter {
        name: name.to_owned().into(),
        key,
        stmt: Box::new(over),
    })
}

/// `ct state new jump host_shares`, for the segment's chains.
fn new_connection_shares() -> Vec<Statement<'static>> {
    vec![is(ct("state"), s("new")), jump(HOST_SHARES)]
}

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
    c.rule("share", new_connection_shares());
    // DNS over TCP holds a connection per query stream: one host holding many would
    // leave the resolver none for the others.
    for (proto, family, v) in [("ip", "ipv4", "4"), ("ip6", "ipv6", "6")] {
        c.rule(
            "share:dns-tcp",
            vec![
                is(meta(MetaKey::Nfproto), s(family)),
                dport("tcp", dns_port),
                is(ct("state"), s("new")),
                meter_over(
                    &format!("dns_tcp{v}"),
                    payload(proto, "saddr"),
                    ct_count_over(cfg.limits.dns_tcp_per_host),
                ),
                goto(OVER_DNS_TCP),
            ],
        );
    }
    let allow_dns = |c: &mut ChainRules, family: &'static str, router: IpNet| {
        for proto in ["udp", "tcp"] {
            c.rule(
                "allow:dns",
                vec![
                    is(payload(family, "daddr"), net(router)),
                    dport(proto, dns_port),
                    accept(),
                ],
            );
        }
    };
    allow_dns(&mut c, "ip", router4);
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
        allow_dns(&mut c, "ip6", router6);
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
    for (comment, set4, set6) in [
        ("deny:upstream", "upstream4", "upstream6"),
        ("deny:private", "deny4", "deny6"),
    ] {
        for (proto, set) in [("ip", set4), ("ip6", set6)] {
            c.reject(comment, vec![is(payload(proto, "daddr"), set_ref(set))]);
        }
    }
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
        c.rule("share", new_connection_shares());
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
    for (v6, proto, set) in [(false, "ip", "admin4"), (true, "ip6", "admin6")] {
        if cfg.lan.admin_hosts.iter().any(|a| a.is_ipv6() == v6) {
            c.rule(
                "allow:admin-host",
                vec![
                    iifname(lan),
                    is(payload(proto, "saddr"), set_ref(set)),
                    is(ct("state"), s("new")),
                    accept(),
                ],
            );
        }
    }
    c.deny("deny:into-segment", vec![]);
    c
}
