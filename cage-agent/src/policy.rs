//! The connectivity contract as one nftables ruleset, rendered from a `Config` and the
//! facts detected on the running system.

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Serialize;

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
}
