//! `dns_redirect`: DNS from the segment to Cage's forwarder.

use nftables::batch::Batch;
use nftables::expr::{Expression, MetaKey};
use nftables::stmt::{self, Statement};
use nftables::types::{NfChainType, NfFamily, NfHook};

use super::rules::*;
use super::*;
use crate::config::Config;

/// The NAT chain that sends the segment's port-53 traffic to the forwarder, when DNS goes
/// through Cage.
pub(super) fn dns_redirect(batch: &mut Batch<'static>, cfg: &Config) -> Option<ChainRules> {
    let dns = &cfg.dns;
    let seg = &cfg.segment;
    let bridge = std::slice::from_ref(&seg.bridge);
    let inet = NfFamily::INet;
    // DNS through the router: every query the segment sends to port 53, to the router or
    // to any server outside, is answered by Cage's forwarder (translated to its port on
    // the router's segment address of the same family: explicitly, not `redirect`, which
    // takes whichever address the bridge lists first, where the forwarder may not
    // listen). Without `cage run` the port has no listener, so DNS fails closed. Spoofed
    // sources were dropped before (prerouting at -300).
    if !dns.enabled {
        return None;
    }
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
    Some(nat)
}
