//! Hardware flow offload (OpenWrt's `flow_offloading_hw`, GL.iNet's "network
//! acceleration"): once a flow is in a flowtable with `flags offload`, the switch or SoC
//! forwards its packets without the CPU, so they pass neither Cage's eBPF program (the
//! flow log misses them, and the kill switch's fast drop never sees them) nor its
//! nftables chains. Software offload is fine: the bridge's TC hooks, where the eBPF program
//! counts and drops, run before a flowtable's ingress hook (proven in the VM stage,
//! `cage_tests::vm::offload`). `cage status` and the page report hardware offload as a
//! problem, with what to do.

use std::path::Path;

use crate::nft;

/// OpenWrt's firewall configuration, where fw4 reads `flow_offloading_hw`.
pub const FIREWALL_CONFIG: &str = "/etc/config/firewall";

/// What to do about it, in the router's own terms.
const REMEDY: &str = "switch it off: uci set firewall.@defaults[0].flow_offloading_hw='0'; \
     uci commit firewall; /etc/init.d/firewall restart (GL.iNet: Network > Network \
     Acceleration off); software offload (flow_offloading) may stay on";

/// The problems hardware offload makes, if it is on: in the kernel (a flowtable with
/// `flags offload`) or configured (`flow_offloading_hw '1'` in fw4's defaults).
pub fn problems(firewall_config: &Path) -> Vec<String> {
    let mut found = Vec::new();
    match nft::hardware_flowtables() {
        Ok(tables) => {
            for t in tables {
                found.push(format!("the kernel's flowtable {t} offloads to hardware"));
            }
        }
        Err(e) => found.push(format!("cannot list the flowtables ({e})")),
    }
    if let Ok(text) = std::fs::read_to_string(firewall_config) {
        if configured(&text) {
            found.push(format!(
                "{} has flow_offloading_hw '1'",
                firewall_config.display()
            ));
        }
    }
    // Unreadable flowtables alone are not a finding about offload.
    if found.iter().all(|f| f.starts_with("cannot list")) {
        return vec![];
    }
    vec![format!(
        "hardware flow offload is on ({}): offloaded flows bypass the CPU, so Cage's flow \
         log misses their packets and the kill switch may not cut them; {REMEDY}",
        found.join("; ")
    )]
}

/// Whether fw4's `defaults` section of a firewall configuration turns hardware offload
/// on (`option flow_offloading_hw '1'`).
pub fn configured(text: &str) -> bool {
    let Ok(raw) = cage_policy::config::uci::parse(text) else {
        return false;
    };
    raw.sections
        .iter()
        .filter(|s| s.kind == "defaults")
        .flat_map(|s| &s.options)
        .any(|o| {
            o.name == "flow_offloading_hw"
                && matches!(o.value.as_str(), "1" | "on" | "true" | "yes")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flowtables_with_flags_offload_are_found() {
        let listing = "table inet fw4 {\n\
                       \tflowtable ft {\n\
                       \t\thook ingress priority filter\n\
                       \t\tdevices = { br-lan, eth0 }\n\
                       \t\tflags offload\n\
                       \t}\n\
                       }\n\
                       table inet soft {\n\
                       \tflowtable ft2 {\n\
                       \t\thook ingress priority filter\n\
                       \t\tdevices = { br-lan }\n\
                       \t}\n\
                       }\n";
        assert_eq!(nft::offloading_flowtables(listing), vec!["inet fw4 ft"]);
        assert!(nft::offloading_flowtables("").is_empty());
    }

    #[test]
    fn fw4_defaults_with_flow_offloading_hw() {
        let on = "config defaults\n\toption input 'REJECT'\n\toption flow_offloading '1'\n\
                  \toption flow_offloading_hw '1'\n\nconfig zone\n\toption name 'lan'\n";
        let soft =
            "config defaults\n\toption flow_offloading '1'\n\toption flow_offloading_hw '0'\n";
        assert!(configured(on));
        assert!(!configured(soft));
        assert!(!configured(
            "config zone\n\toption flow_offloading_hw '1'\n"
        ));
    }
}
