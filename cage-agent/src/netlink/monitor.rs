//! Changes to the router's links, addresses and routes, and to the neighbour entries of
//! one bridge, as rtnetlink announces them: what the segment's repair, the WAN's facts
//! and the caged hosts' pinned neighbour entries depend on.

use std::io;

use netlink_sys::constants::NETLINK_ROUTE;

use super::multicast::Subscription;

/// `RTNLGRP_LINK`, `RTNLGRP_NEIGH`, `RTNLGRP_IPV4_IFADDR`, `RTNLGRP_IPV4_ROUTE`,
/// `RTNLGRP_IPV6_IFADDR`, `RTNLGRP_IPV6_ROUTE`.
const GROUPS: [u32; 6] = [1, 3, 5, 7, 9, 11];
/// `RTM_NEWLINK`, `RTM_DELLINK`, `RTM_NEWADDR`, `RTM_DELADDR`, `RTM_NEWROUTE`,
/// `RTM_DELROUTE`.
const LINK_ADDR_ROUTE: [u16; 6] = [16, 17, 20, 21, 24, 25];
/// `RTM_NEWNEIGH`, `RTM_DELNEIGH`.
const NEIGH: [u16; 2] = [28, 29];

pub struct Monitor {
    subscription: Subscription,
}

impl Monitor {
    pub fn open() -> io::Result<Monitor> {
        Ok(Monitor {
            subscription: Subscription::open(NETLINK_ROUTE, &GROUPS)?,
        })
    }

    /// Wait until a link, address or route changes, or a neighbour entry on the device
    /// named `bridge` does (looked up at each announcement, since netifd may make the
    /// bridge anew), or the kernel drops announcements (a full queue).
    pub async fn changed(&mut self, bridge: &str) -> io::Result<()> {
        loop {
            // Looked up at the first neighbour message only: most waits end without one.
            let mut bridge_index = None;
            let mut concerns = false;
            let overrun = self
                .subscription
                .next(|kind, payload| {
                    let index = || *bridge_index.get_or_insert_with(|| if_index(bridge));
                    concerns |= concerns_segment(kind, payload, index);
                })
                .await?;
            if concerns || overrun {
                return Ok(());
            }
        }
    }
}

/// Whether one rtnetlink message announces a change the daemon acts on: any link,
/// address or route; a neighbour entry only on the bridge (`bridge_index`), since the
/// LAN's entries change state all the time.
pub fn concerns_segment(
    kind: u16,
    payload: &[u8],
    bridge_index: impl FnOnce() -> Option<u32>,
) -> bool {
    if LINK_ADDR_ROUTE.contains(&kind) {
        return true;
    }
    if !NEIGH.contains(&kind) {
        return false;
    }
    // struct ndmsg: family, two pads, then the interface index.
    let index = payload
        .get(4..8)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_ne_bytes);
    index.is_some_and(|i| bridge_index().is_some_and(|b| i64::from(i) == i64::from(b)))
}

fn if_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name that lives across the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ndmsg(index: i32) -> Vec<u8> {
        let mut p = vec![2, 0, 0, 0];
        p.extend_from_slice(&index.to_ne_bytes());
        p.extend_from_slice(&[0; 4]);
        p
    }

    #[test]
    fn links_addresses_and_routes_count_and_neighbours_only_on_the_bridge() {
        for kind in LINK_ADDR_ROUTE {
            assert!(concerns_segment(kind, &[], || Some(7)), "type {kind}");
        }
        assert!(concerns_segment(28, &ndmsg(7), || Some(7)));
        assert!(concerns_segment(29, &ndmsg(7), || Some(7)));
        // The LAN's neighbours, and any while the bridge is not there.
        assert!(!concerns_segment(28, &ndmsg(3), || Some(7)));
        assert!(!concerns_segment(28, &ndmsg(7), || None));
        // Too short to name an interface; and a type nobody acts on (RTM_NEWRULE).
        assert!(!concerns_segment(28, &[2, 0], || Some(7)));
        assert!(!concerns_segment(32, &ndmsg(7), || Some(7)));
    }

    #[test]
    fn the_loopback_device_has_an_index_and_a_made_up_name_none() {
        assert_eq!(if_index("lo"), Some(1));
        assert_eq!(if_index("no-such-dev0"), None);
    }
}
