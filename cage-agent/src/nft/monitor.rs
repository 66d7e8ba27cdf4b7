//! Changes to Cage's tables as the kernel announces them (nf_tables' multicast group,
//! which `nft monitor` listens to): a table, chain, rule, set or object of Cage's made or
//! removed, or the kill switch's set changed. Elements that Cage's own rules or its DNS
//! forwarder add to the other sets (bindings, meters, allow sets) are not changes of the
//! policy, and the kernel does not announce what the packet path adds at all.

use std::io;

use netlink_sys::constants::NETLINK_NETFILTER;

use crate::netlink::multicast::{attributes, Subscription};
use crate::policy::{ISOLATED_SET, TABLE};

/// `NFNLGRP_NFTABLES`.
const GROUP: u32 = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// The size of `struct nfgenmsg`, in front of the attributes.
const NFGENMSG_LEN: usize = 4;
/// Every object's table is its attribute 1 (`NFTA_TABLE_NAME`, `NFTA_CHAIN_TABLE`,
/// `NFTA_RULE_TABLE`, `NFTA_SET_TABLE`, `NFTA_SET_ELEM_LIST_TABLE`, `NFTA_OBJ_TABLE`,
/// `NFTA_FLOWTABLE_TABLE`); a set-element list names its set in attribute 2.
const ATTR_TABLE: u16 = 1;
const ATTR_SET: u16 = 2;

/// The nf_tables messages that announce a change: `NFT_MSG_NEW*` and `NFT_MSG_DEL*` of
/// tables (0, 2), chains (3, 5), rules (6, 8), sets (9, 11), set elements (12, 14),
/// objects (18, 20) and flowtables (22, 24). Generations (15) come after every
/// transaction of anyone's, and traces (17) are packets.
const CHANGES: [u16; 14] = [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 18, 20, 22, 24];
const NEWSETELEM: u16 = 12;
const DELSETELEM: u16 = 14;

pub struct Monitor {
    subscription: Subscription,
}

impl Monitor {
    pub fn open() -> io::Result<Monitor> {
        Ok(Monitor {
            subscription: Subscription::open(NETLINK_NETFILTER, &[GROUP])?,
        })
    }

    /// Wait until the kernel announces a change that concerns Cage's policy, or drops
    /// announcements (a full queue), since one of those may have been one.
    pub async fn changed(&mut self) -> io::Result<()> {
        loop {
            let mut concerns = false;
            let overrun = self
                .subscription
                .next(|kind, payload| concerns |= concerns_cage(kind, payload))
                .await?;
            if concerns || overrun {
                return Ok(());
            }
        }
    }
}

/// Whether one nfnetlink message announces a change of Cage's policy.
pub fn concerns_cage(kind: u16, payload: &[u8]) -> bool {
    if kind >> 8 != NFNL_SUBSYS_NFTABLES || !CHANGES.contains(&(kind & 0xff)) {
        return false;
    }
    let Some(attrs) = payload.get(NFGENMSG_LEN..) else {
        return false;
    };
    let name = |want: u16| {
        attributes(attrs)
            .find(|(k, _)| *k == want)
            .map(|(_, v)| v.strip_suffix(b"\0").unwrap_or(v))
    };
    if name(ATTR_TABLE) != Some(TABLE.as_bytes()) {
        return false;
    }
    match kind & 0xff {
        NEWSETELEM | DELSETELEM => name(ATTR_SET) == Some(ISOLATED_SET.as_bytes()),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announcement(msg: u16, attrs: &[(u16, &str)]) -> (u16, Vec<u8>) {
        let mut p = vec![1, 0, 0, 0];
        for (kind, value) in attrs {
            let v = format!("{value}\0");
            p.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
            p.extend_from_slice(&kind.to_ne_bytes());
            p.extend_from_slice(v.as_bytes());
            p.resize(p.len().next_multiple_of(4), 0);
        }
        ((NFNL_SUBSYS_NFTABLES << 8) | msg, p)
    }

    #[test]
    fn only_changes_of_cages_own_policy_count() {
        type Case<'a> = (u16, &'a [(u16, &'a str)], bool);
        let cases: [Case; 9] = [
            // A rule of Cage's deleted, its table removed, a chain of its added.
            (8, &[(1, "cage"), (2, "forward")], true),
            (2, &[(1, "cage")], true),
            (3, &[(1, "cage"), (3, "extra")], true),
            // The kill switch's set emptied behind Cage's back.
            (14, &[(1, "cage"), (2, "isolated")], true),
            // The DNS forwarder's allow-set additions and learned bindings: not policy.
            (12, &[(1, "cage"), (2, "allow4")], false),
            (12, &[(1, "cage"), (2, "bind4")], false),
            // fw4 replacing its own table.
            (6, &[(1, "fw4"), (2, "input")], false),
            // A new generation (after anyone's transaction) and a listing request.
            (15, &[], false),
            (7, &[(1, "cage")], false),
        ];
        for (msg, attrs, want) in cases {
            let (kind, payload) = announcement(msg, attrs);
            assert_eq!(
                concerns_cage(kind, &payload),
                want,
                "message {msg} {attrs:?}"
            );
        }
        // Another subsystem (conntrack's events), and a payload too short for nfgenmsg.
        let (_, payload) = announcement(8, &[(1, "cage")]);
        assert!(!concerns_cage((1 << 8) | 8, &payload));
        assert!(!concerns_cage((NFNL_SUBSYS_NFTABLES << 8) | 8, &[1, 0]));
    }
}
