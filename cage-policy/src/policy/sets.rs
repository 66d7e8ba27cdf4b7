//! The named sets of `inet cage`, so that `nft list table inet cage` shows what is
//! denied: the deny lists, the upstream network, the admin hosts, the unlogged counter,
//! with DNS through Cage the allow sets and the DoH endpoints by address, and the kill
//! switch's `isolated` set.

use ipnet::IpNet;
use nftables::batch::Batch;
use nftables::schema::{self, NfListObject};
use nftables::types::NfFamily;

use super::rules::*;
use super::*;
use crate::config::{Config, Egress};

pub(super) fn sets(batch: &mut Batch<'static>, cfg: &Config, facts: &Facts) {
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

    batch.add(unlogged_counter(NfFamily::INet));

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
}
