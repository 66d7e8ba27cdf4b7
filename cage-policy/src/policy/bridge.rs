//! `bridge cage`: layer 2 inside the segment.

use nftables::batch::Batch;
use nftables::expr::MetaKey;
use nftables::types::{NfChainType, NfFamily, NfHook};

use super::rules::*;
use super::*;
use crate::config::Config;

pub(super) fn layer2(batch: &mut Batch<'static>, cfg: &Config, facts: &Facts) -> ChainRules {
    let seg = &cfg.segment;
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
    l2
}
