//! The AI port: which of the router's sockets the agent's machine plugs into.
//!
//! On OpenWrt the segment's ports are netifd's (`/etc/config/network`), chosen from the
//! board at install by the package's `/usr/libexec/cage-port` (the last LAN port on a
//! router with several, the only one on a one-port router when the owner can still come
//! in over the LAN Wi-Fi, a switch VLAN of its own on swconfig routers). `cage port`,
//! `cage status` and the web page ask that script, so there is one answer, written in
//! the firmware's own terms with the real `uci`. Elsewhere (standalone mode) the ports
//! are `cage.ai.port` and Cage bridges them itself.

use std::path::PathBuf;
use std::process::Command;

use serde::Serialize;

use crate::config::{Config, Mode};

/// The package's helper. `CAGE_PORT_HELPER` overrides it (tests run it in a board's
/// root).
pub const HELPER: &str = "/usr/libexec/cage-port";

/// What `cage-port show` says, or what the configuration says in standalone mode.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// `single`, `multi` or `swconfig` (OpenWrt); `standalone` otherwise.
    pub layout: String,
    /// The wired AI ports (netifd device names), with how a person finds each.
    pub ai_ports: Vec<Port>,
    /// Wired ports that stay on the LAN.
    pub lan_ports: Vec<String>,
    /// SSIDs of the enabled access points on the LAN: the owner's way in over Wi-Fi.
    pub wifi_lan: Vec<String>,
    /// SSIDs of the access points on the segment.
    pub wifi_ai: Vec<String>,
    /// Why the board got what it got (e.g. a one-port router that kept its port).
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Port {
    pub device: String,
    pub label: String,
}

impl Report {
    /// Whether a machine plugged into a wired port can be caged at all.
    pub fn has_wired_ai_port(&self) -> bool {
        !self.ai_ports.is_empty()
    }

    /// The owner's ways in, for people: "LAN ports lan1, lan2", "Wi-Fi 'OpenWrt'".
    pub fn owner_way_in(&self) -> Vec<String> {
        let mut ways = Vec::new();
        if !self.lan_ports.is_empty() {
            ways.push(format!(
                "LAN port{} {}",
                if self.lan_ports.len() == 1 { "" } else { "s" },
                self.lan_ports.join(", ")
            ));
        }
        for ssid in &self.wifi_lan {
            ways.push(format!("Wi-Fi '{ssid}'"));
        }
        ways
    }

    /// Lines for `cage status` and the log.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.ai_ports.is_empty() {
            out.push("AI port: none: a machine plugged into a LAN port is NOT caged".into());
        }
        for p in &self.ai_ports {
            out.push(format!(
                "AI port: {} ({}): plug the agent's machine in here",
                p.device, p.label
            ));
        }
        for ssid in &self.wifi_ai {
            out.push(format!("AI Wi-Fi: '{ssid}'"));
        }
        let ways = self.owner_way_in();
        out.push(format!(
            "owner's way in: {}",
            if ways.is_empty() {
                "none found on this router".to_owned()
            } else {
                ways.join("; ")
            }
        ));
        for n in &self.notes {
            out.push(format!("note: {n}"));
        }
        out
    }

    /// Parse `cage-port show`: `KEY VALUE` lines. Unknown keys are kept out, so an older
    /// `cage` reads a newer script.
    pub fn parse(text: &str) -> Report {
        let mut r = Report::default();
        let mut labels = Vec::new();
        for line in text.lines() {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            let value = value.trim().to_owned();
            match key {
                "layout" => r.layout = value,
                "ai_port" => r.ai_ports.push(Port {
                    device: value,
                    label: String::new(),
                }),
                "ai_label" => labels.push(value),
                "lan_port" => r.lan_ports.push(value),
                "wifi_lan" => r.wifi_lan.push(value),
                "wifi_ai" => r.wifi_ai.push(value),
                "note" => r.notes.push(value),
                _ => {}
            }
        }
        for (port, label) in r.ai_ports.iter_mut().zip(labels) {
            port.label = label;
        }
        for port in &mut r.ai_ports {
            if port.label.is_empty() {
                port.label = port.device.clone();
            }
        }
        r
    }
}

/// Why the AI port could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("cannot run {helper}: {source}")]
    Start {
        helper: String,
        source: std::io::Error,
    },
    /// The helper refused (a port this router does not have, or one that would leave the
    /// owner no way in): its own message.
    #[error("{0}")]
    Refused(String),
    #[error("the AI port is chosen by OpenWrt's network configuration only in OpenWrt mode; here it is cage.ai.port: {0}")]
    Standalone(String),
    #[error("the network did not reload: {0}")]
    Reload(String),
}

fn helper() -> PathBuf {
    std::env::var_os("CAGE_PORT_HELPER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(HELPER))
}

fn run_helper(args: &[&str]) -> Result<String, PortError> {
    let helper = helper();
    let out = Command::new(&helper)
        .args(args)
        .output()
        .map_err(|source| PortError::Start {
            helper: helper.display().to_string(),
            source,
        })?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(PortError::Refused(if msg.is_empty() {
            format!(
                "{} {} failed ({})",
                helper.display(),
                args.join(" "),
                out.status
            )
        } else {
            msg
        }));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The AI port as things stand.
pub fn show(cfg: &Config) -> Result<Report, PortError> {
    match cfg.main.mode.resolve(crate::config::on_openwrt()) {
        Mode::OpenWrt => Ok(Report::parse(&run_helper(&["show"])?)),
        _ => Ok(Report {
            layout: "standalone".into(),
            ai_ports: cfg
                .segment
                .ports
                .iter()
                .map(|p| Port {
                    device: p.clone(),
                    label: p.clone(),
                })
                .collect(),
            ..Report::default()
        }),
    }
}

/// An access point on the segment, as `cage-port wifi` reads it from
/// `/etc/config/wireless`, key included: for the owner's first-run page only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wifi {
    /// The wifi-iface section (`cage` for the one 90-cage makes).
    pub section: String,
    pub ssid: String,
    pub encryption: String,
    pub key: String,
    pub hidden: bool,
    /// The access point and its radio are on.
    pub enabled: bool,
}

impl Wifi {
    /// Parse `cage-port wifi`: an `ap SECTION` line starts each access point, the
    /// `KEY VALUE` lines after it describe it. Values are taken as they are (an SSID may
    /// begin or end with a space); unknown keys are left out.
    pub fn parse(text: &str) -> Vec<Wifi> {
        let mut out: Vec<Wifi> = Vec::new();
        for line in text.lines() {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            if key == "ap" {
                out.push(Wifi {
                    section: value.to_owned(),
                    ..Wifi::default()
                });
                continue;
            }
            let Some(w) = out.last_mut() else { continue };
            match key {
                "ssid" => w.ssid = value.to_owned(),
                "encryption" => w.encryption = value.to_owned(),
                "key" => w.key = value.to_owned(),
                "hidden" => w.hidden = value == "1",
                "enabled" => w.enabled = value == "1",
                _ => {}
            }
        }
        out
    }
}

/// The access points on the segment with their keys: `cage-port wifi` on OpenWrt; none
/// in standalone mode (Cage makes no Wi-Fi itself).
pub fn wifi(cfg: &Config) -> Result<Vec<Wifi>, PortError> {
    match cfg.main.mode.resolve(crate::config::on_openwrt()) {
        Mode::OpenWrt => Ok(Wifi::parse(&run_helper(&["wifi"])?)),
        _ => Ok(Vec::new()),
    }
}

/// What to make the AI port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// This wired port (the previous one goes back to the LAN).
    Port(String),
    /// No wired AI port: every wired port on the LAN.
    None,
    /// The board's default, as at install.
    Auto,
}

/// Change the AI port in OpenWrt's network configuration (through the helper and the
/// real `uci`), then have netifd apply it. The helper refuses, changing nothing, a port
/// the router does not have and a change that would leave the owner no way in (unless
/// `force`). Cage's policy holds the segment by the bridge's name meanwhile, and
/// `cage run` isolates the port netifd adds.
pub fn set(cfg: &Config, choice: &Choice, force: bool) -> Result<Report, PortError> {
    if cfg.main.mode.resolve(crate::config::on_openwrt()) != Mode::OpenWrt {
        return Err(PortError::Standalone(cfg.segment.ports.join(" ")));
    }
    let mut args: Vec<&str> = match choice {
        Choice::Port(dev) => vec!["set", dev.as_str()],
        Choice::None => vec!["none"],
        Choice::Auto => vec!["auto"],
    };
    if force {
        args.push("--force");
    }
    run_helper(&args)?;
    reload_network()?;
    show(cfg)
}

/// `ubus call network reload`, which is what OpenWrt's `/etc/init.d/network reload`
/// does: netifd re-reads /etc/config/network and moves the ports.
fn reload_network() -> Result<(), PortError> {
    let out = Command::new("ubus")
        .args(["call", "network", "reload"])
        .output()
        .map_err(|e| PortError::Reload(format!("cannot run ubus: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(PortError::Reload(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_helper_prints() {
        let r = Report::parse(
            "layout single\nai_port eth1\nai_label the LAN port\nwifi_lan OpenWrt\n\
             wifi_ai Cage-AI\nnote the owner comes in over Wi-Fi\nfuture_key x\n",
        );
        assert_eq!(r.layout, "single");
        assert_eq!(
            r.ai_ports,
            vec![Port {
                device: "eth1".into(),
                label: "the LAN port".into()
            }]
        );
        assert!(r.lan_ports.is_empty());
        assert_eq!(r.wifi_lan, vec!["OpenWrt"]);
        assert_eq!(r.wifi_ai, vec!["Cage-AI"]);
        assert_eq!(r.owner_way_in(), vec!["Wi-Fi 'OpenWrt'"]);
        let lines = r.lines();
        assert_eq!(
            lines[0],
            "AI port: eth1 (the LAN port): plug the agent's machine in here"
        );
        assert!(lines.contains(&"owner's way in: Wi-Fi 'OpenWrt'".to_owned()));
    }

    #[test]
    fn reads_the_access_points_with_their_keys_as_they_are() {
        let w = Wifi::parse(
            "ap cage\nssid Cage-AI \nencryption psk2\nkey a;b,c: d\nhidden 0\nenabled 1\n\
             future x\nap cfg073579\nssid Second\nencryption none\nkey \nhidden 1\n\
             enabled 0\n",
        );
        assert_eq!(
            w,
            vec![
                Wifi {
                    section: "cage".into(),
                    ssid: "Cage-AI ".into(),
                    encryption: "psk2".into(),
                    key: "a;b,c: d".into(),
                    hidden: false,
                    enabled: true,
                },
                Wifi {
                    section: "cfg073579".into(),
                    ssid: "Second".into(),
                    encryption: "none".into(),
                    key: String::new(),
                    hidden: true,
                    enabled: false,
                },
            ]
        );
        assert!(Wifi::parse("ssid before any ap\n").is_empty());
    }

    #[test]
    fn a_router_without_a_wired_ai_port_says_so() {
        let r = Report::parse("layout single\nlan_port eth1\nnote eth1 stays LAN\n");
        assert!(!r.has_wired_ai_port());
        let lines = r.lines();
        assert!(lines[0].contains("NOT caged"), "{lines:?}");
        assert!(lines.contains(&"owner's way in: LAN port eth1".to_owned()));
        assert!(lines.contains(&"note: eth1 stays LAN".to_owned()));
    }
}
