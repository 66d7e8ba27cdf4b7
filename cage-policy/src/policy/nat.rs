//! `postrouting`: masquerade for the segment's traffic leaving through the WAN.

use ipnet::IpNet;
use nftables::batch::Batch;
use nftables::stmt::Statement;
use nftables::types::{NfChainType, NfFamily, NfHook};

use super::rules::*;
use super::*;
use crate::config::Config;

pub(super) fn masquerade(
    batch: &mut Batch<'static>,
    cfg: &Config,
    facts: &Facts,
) -> Option<ChainRules> {
    let seg = &cfg.segment;
    let bridge = std::slice::from_ref(&seg.bridge);
    let inet = NfFamily::INet;
    // NAT, only where there is a WAN to leave through.
    if !cfg.wan.masquerade || facts.wan_devices.is_empty() {
        return None;
    }
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
    Some(nat)
}
