//! `bridge cage`: layer 2 inside the segment.
//!
//! - `forward`: frames between two ports of the segment are dropped (bridge port
//!   isolation stops them first; this holds if isolation is ever switched off).
//! - `prerouting` → `bind` → `bind_addr`: addresses belong to a port, first come, first
//!   served (in the spirit of RFC 6620's FCFS SAVI). A MAC is bound to the port that first
//!   sent it, an IPv4/IPv6 address to the MAC that first used it (as an ARP sender or a
//!   packet's source); while a binding lasts (`limits.bind_timeout` unused), a frame from
//!   another port with that MAC, or from another MAC with that address, is dropped —
//!   before the bridge learns from it, so the bridge's forwarding table and the router's
//!   neighbour table cannot be moved by it. New MACs a port may bring and new addresses
//!   a MAC may take are rate-limited, so the tables cannot be flooded. Bindings live in
//!   the kernel's sets: they hold while `cage run` is down, and the daemon carries them
//!   over a replace of the tables ([`Bindings`]).
//! - `output` → `bind_out`: a packet the router sends into the segment goes only to the
//!   MAC its address is bound to: should the router's neighbour table ever name another
//!   MAC (an IPv6 neighbour advertisement for someone else's address, which the bridge
//!   family cannot match by its target), the packet is dropped, never delivered to the
//!   impostor.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv6Addr};

use ipnet::{IpNet, Ipv6Net};
use nftables::batch::Batch;
use nftables::expr::{Expression, MetaKey, NamedExpression};
use nftables::schema::{self, NfListObject};
use nftables::stmt::{self, Statement};
use nftables::types::{NfChainType, NfFamily, NfHook};

use super::rules::*;
use super::*;
use crate::config::Config;

/// The binding sets of `bridge cage`: MACs and the ports they are bound to, addresses
/// and the MACs they are bound to. `cage status` lists them.
pub const BIND_SETS: BindSets = BindSets {
    macs: "macs",
    macport: "macport",
    own4: "own4",
    bind4: "bind4",
    own6: "own6",
    bind6: "bind6",
};

pub struct BindSets {
    pub macs: &'static str,
    pub macport: &'static str,
    pub own4: &'static str,
    pub bind4: &'static str,
    pub own6: &'static str,
    pub bind6: &'static str,
}

/// How many entries each binding set holds at most: far more than a segment has hosts;
/// the rate limits keep a flood from filling them.
const BIND_SET_SIZE: u32 = 4096;

/// The bindings in the kernel when the tables are replaced, with the seconds each has
/// left, so that a replace keeps them (one transaction: no moment without them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Bindings {
    /// (MAC, port, seconds left).
    pub macs: Vec<(String, String, u32)>,
    /// (address, MAC, seconds left).
    pub addrs: Vec<(IpAddr, String, u32)>,
}

pub(super) fn layer2(batch: &mut Batch<'static>, cfg: &Config, facts: &Facts) -> Vec<ChainRules> {
    let seg = &cfg.segment;
    let lim = &cfg.limits;
    let bridge = NfFamily::Bridge;
    for (name, hook) in [
        ("prerouting", NfHook::Prerouting),
        ("forward", NfHook::Forward),
        ("output", NfHook::Output),
    ] {
        batch.add(base_chain(
            bridge,
            name,
            NfChainType::Filter,
            hook,
            PRIO_BRIDGE_FILTER,
        ));
    }
    for name in ["bind", "bind_addr", "bind_out", "mac_flood", "addr_flood"] {
        batch.add(regular_chain(bridge, name));
    }
    binding_sets(batch, lim.bind_timeout, &facts.bindings);
    batch.add(unlogged_counter(bridge));

    // Frames from the segment's ports: by the bridge where the kernel can match it
    // (nft_meta_bridge), by the configured ports otherwise.
    let from_segment = |c: &mut ChainRules, comment: &str, then: Vec<Statement<'static>>| {
        let mut stmts = if facts.bridge_meta {
            vec![is(meta(MetaKey::Ibridgename), s(seg.bridge.clone()))]
        } else if !seg.ports.is_empty() {
            vec![iifname(&seg.ports)]
        } else {
            return;
        };
        stmts.extend(then);
        c.rule(comment, stmts);
    };

    let mut forward = ChainRules::new(bridge, "forward");
    from_segment(&mut forward, "deny:segment-l2", vec![counter(), drop()]);

    let mut pre = ChainRules::new(bridge, "prerouting");
    from_segment(&mut pre, "segment", vec![jump("bind")]);

    let mut out = ChainRules::new(bridge, "output");
    if facts.bridge_meta {
        out.rule(
            "segment",
            vec![
                is(meta(MetaKey::Obridgename), s(seg.bridge.clone())),
                jump("bind_out"),
            ],
        );
    } else if !seg.ports.is_empty() {
        out.rule("segment", vec![oifname(&seg.ports), jump("bind_out")]);
    }

    vec![
        forward,
        pre,
        bind_mac(lim),
        bind_addr(cfg),
        bind_out(),
        flood_chain("mac_flood", "deny:mac-flood"),
        flood_chain("addr_flood", "deny:addr-flood"),
        out,
    ]
}

/// One frame in [`REFRESH_EVERY`], at random: the one whose binding's timeout is
/// renewed. The others only look their binding up, which costs less than renewing it
/// (two set updates a frame for each of MAC and address): a host in use sends many
/// frames within `limits.bind_timeout`, so one in sixteen renews it all the same.
fn refresh_now() -> Statement<'static> {
    is(
        Expression::Named(NamedExpression::Numgen(nftables::expr::Numgen {
            mode: nftables::expr::NgMode::Random,
            ng_mod: REFRESH_EVERY,
            offset: None,
        })),
        Expression::Number(0),
    )
}

/// See [`refresh_now`].
const REFRESH_EVERY: u32 = 16;

/// A per-key meter that matches once `key` goes over `per_minute` (after `burst`).
fn over_rate(
    name: &str,
    key: Expression<'static>,
    per_minute: u32,
    burst: u32,
) -> Statement<'static> {
    Statement::Meter(stmt::Meter {
        name: name.to_owned().into(),
        key,
        stmt: Box::new(Statement::Limit(stmt::Limit {
            rate: per_minute,
            rate_unit: None,
            per: Some("minute".into()),
            burst: Some(burst),
            burst_unit: None,
            inv: Some(true),
        })),
    })
}

/// A chain that only denies: the end of a flood rule.
fn flood_chain(name: &'static str, comment: &str) -> ChainRules {
    let mut c = ChainRules::new(NfFamily::Bridge, name);
    c.deny(comment, vec![]);
    c
}

fn set_stmt(op: stmt::SetOp, set: &str, elem: Expression<'static>) -> Statement<'static> {
    Statement::Set(stmt::Set {
        op,
        elem,
        set: format!("@{set}").into(),
    })
}

fn concat(parts: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(parts))
}

/// A frame's source MAC to the port it came in on: known (refreshed), someone else's
/// (dropped), or new (rate-limited per port, then bound).
fn bind_mac(lim: &crate::config::Limits) -> ChainRules {
    use stmt::SetOp::{Add, Update};
    let b = &BIND_SETS;
    let mac = || payload("ether", "saddr");
    let mac_port = || concat(vec![mac(), meta(MetaKey::Iifname)]);
    let mut c = ChainRules::new(NfFamily::Bridge, "bind");
    c.rule(
        "allow:bound-mac",
        vec![
            refresh_now(),
            is(mac_port(), set_ref(b.macport)),
            set_stmt(Update, b.macport, mac_port()),
            set_stmt(Update, b.macs, mac()),
            goto("bind_addr"),
        ],
    );
    c.rule(
        "allow:bound-mac",
        vec![is(mac_port(), set_ref(b.macport)), goto("bind_addr")],
    );
    c.deny("deny:mac-theft", vec![is(mac(), set_ref(b.macs))]);
    // Over the rate: to a chain of its own, so that the meter is asked once a frame
    // (the deny pattern's two rules would each take a token).
    c.rule(
        "flood:mac",
        vec![
            over_rate(
                "new_macs",
                meta(MetaKey::Iifname),
                lim.new_macs_per_minute,
                lim.macs_per_port,
            ),
            goto("mac_flood"),
        ],
    );
    c.rule(
        "allow:learn-mac",
        vec![
            set_stmt(Add, b.macs, mac()),
            set_stmt(Add, b.macport, mac_port()),
            goto("bind_addr"),
        ],
    );
    c
}

/// New addresses one MAC may take: a burst, then this many a minute.
const NEW_ADDRS_PER_MINUTE: u32 = 4;
const NEW_ADDRS_BURST: u32 = 8;

/// An address a frame claims (an ARP sender's, a packet's source) to the frame's MAC:
/// known (refreshed), someone else's (dropped), or new: bound, when it is one of the
/// segment's (a spoofed source outside it is the inet table's to drop, not to learn).
fn bind_addr(cfg: &Config) -> ChainRules {
    use stmt::SetOp::{Add, Update};
    let b = &BIND_SETS;
    let seg = &cfg.segment;
    let mut c = ChainRules::new(NfFamily::Bridge, "bind_addr");
    // Each family its own meter: a meter belongs to the one rule that declares it.
    let mut family = |meter: &str,
                      addr: Expression<'static>,
                      mac: Expression<'static>,
                      unspecified: &str,
                      own: &'static str,
                      bind: &'static str,
                      ours: Expression<'static>| {
        let pair = || concat(vec![addr.clone(), mac.clone()]);
        // No address yet (a DHCP client, ARP probes, duplicate address detection).
        c.rule(
            "allow:no-address",
            vec![is(addr.clone(), s(unspecified)), Statement::Return(None)],
        );
        c.rule(
            "allow:bound-address",
            vec![
                refresh_now(),
                is(pair(), set_ref(bind)),
                set_stmt(Update, bind, pair()),
                set_stmt(Update, own, addr.clone()),
                Statement::Return(None),
            ],
        );
        c.rule(
            "allow:bound-address",
            vec![is(pair(), set_ref(bind)), Statement::Return(None)],
        );
        c.deny("deny:addr-theft", vec![is(addr.clone(), set_ref(own))]);
        c.rule(
            "flood:address",
            vec![
                is(addr.clone(), ours.clone()),
                over_rate(meter, mac.clone(), NEW_ADDRS_PER_MINUTE, NEW_ADDRS_BURST),
                goto("addr_flood"),
            ],
        );
        c.rule(
            "allow:learn-address",
            vec![
                is(addr.clone(), ours),
                set_stmt(Add, own, addr.clone()),
                set_stmt(Add, bind, pair()),
                Statement::Return(None),
            ],
        );
    };
    let sub4 = net(IpNet::V4(seg.subnet4()));
    family(
        "new_arp4",
        payload("arp", "saddr ip"),
        payload("arp", "saddr ether"),
        "0.0.0.0",
        b.own4,
        b.bind4,
        sub4.clone(),
    );
    family(
        "new_ip4",
        payload("ip", "saddr"),
        payload("ether", "saddr"),
        "0.0.0.0",
        b.own4,
        b.bind4,
        sub4,
    );
    if let Some(sub6) = seg.subnet6() {
        let ll: Ipv6Net = "fe80::/10".parse().unwrap();
        family(
            "new_ip6",
            payload("ip6", "saddr"),
            payload("ether", "saddr"),
            &Ipv6Addr::UNSPECIFIED.to_string(),
            b.own6,
            b.bind6,
            anon_set(vec![net(IpNet::V6(sub6)), net(IpNet::V6(ll))]),
        );
    }
    c
}

/// What the router sends into the segment: to the MAC the address is bound to, or not
/// at all. Counted, not logged: the sender is the router, the impostor is elsewhere.
fn bind_out() -> ChainRules {
    let b = &BIND_SETS;
    let mut c = ChainRules::new(NfFamily::Bridge, "bind_out");
    for (proto, own, bind) in [("ip", b.own4, b.bind4), ("ip6", b.own6, b.bind6)] {
        let daddr = || payload(proto, "daddr");
        c.rule(
            "allow:bound-delivery",
            vec![
                is(
                    concat(vec![daddr(), payload("ether", "daddr")]),
                    set_ref(bind),
                ),
                Statement::Return(None),
            ],
        );
        c.rule(
            "deny:misdelivery",
            vec![is(daddr(), set_ref(own)), counter(), drop()],
        );
    }
    c
}

fn binding_sets(batch: &mut Batch<'static>, timeout: u32, bindings: &Bindings) {
    use schema::SetType::{EtherAddr, Ifname, Ipv4Addr as V4, Ipv6Addr as V6};
    let b = &BIND_SETS;
    let elem = |val: Expression<'static>, left: u32| {
        Expression::Named(NamedExpression::Elem(nftables::expr::Elem {
            val: Box::new(val),
            // What is left of it, at least a second: a binding about to end ends soon.
            timeout: Some(left.clamp(1, timeout)),
            expires: None,
            comment: None,
            counter: None,
        }))
    };
    let macs: Vec<_> = bindings
        .macs
        .iter()
        .map(|(m, _, left)| elem(s(m.clone()), *left))
        .collect();
    let macport: Vec<_> = bindings
        .macs
        .iter()
        .map(|(m, p, left)| elem(concat(vec![s(m.clone()), s(p.clone())]), *left))
        .collect();
    let addrs = |v6: bool| -> (Vec<_>, Vec<_>) {
        bindings
            .addrs
            .iter()
            .filter(|(a, _, _)| a.is_ipv6() == v6)
            .map(|(a, m, left)| {
                (
                    elem(s(a.to_string()), *left),
                    elem(concat(vec![s(a.to_string()), s(m.clone())]), *left),
                )
            })
            .unzip()
    };
    let (own4, bind4) = addrs(false);
    let (own6, bind6) = addrs(true);
    for (name, types, elems, comment) in [
        (b.macs, vec![EtherAddr], macs, "MACs bound to a port"),
        (
            b.macport,
            vec![EtherAddr, Ifname],
            macport,
            "each MAC's port",
        ),
        (b.own4, vec![V4], own4, "IPv4 addresses bound to a MAC"),
        (
            b.bind4,
            vec![V4, EtherAddr],
            bind4,
            "each IPv4 address's MAC",
        ),
        (b.own6, vec![V6], own6, "IPv6 addresses bound to a MAC"),
        (
            b.bind6,
            vec![V6, EtherAddr],
            bind6,
            "each IPv6 address's MAC",
        ),
    ] {
        let set_type = if types.len() == 1 {
            schema::SetTypeValue::Single(types[0])
        } else {
            schema::SetTypeValue::Concatenated(Cow::Owned(types))
        };
        batch.add(NfListObject::Set(Box::new(schema::Set {
            family: NfFamily::Bridge,
            table: TABLE.into(),
            name: name.into(),
            set_type,
            flags: Some([schema::SetFlag::Timeout].into_iter().collect()),
            timeout: Some(timeout),
            size: Some(BIND_SET_SIZE),
            elem: (!elems.is_empty()).then(|| Cow::Owned(elems)),
            comment: Some(comment.into()),
            ..Default::default()
        })));
    }
}
