//! All rtnetlink work of `cage`: building the AI segment on standalone Linux (bridge,
//! router addresses, isolated member ports, forwarding), detecting the [`Facts`] the
//! policy needs (WAN devices and upstream subnets), and reading the ports' state for
//! `cage status`.
//!
//! Every function opens its own rtnetlink socket, so it acts in the network namespace of
//! the calling *thread* at the time of the call (tests rely on this: they move one thread
//! into a throwaway namespace and run a current-thread runtime on it). The forwarding
//! switches are read and written through `/proc/sys/net`, which the kernel also resolves
//! against the namespace of the calling thread; `/proc/net` would not do, since it is a
//! link to `/proc/self/net`, the namespace of the process's main thread.
//!
//! Nothing here touches a device that the configuration does not name.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use netlink_packet_route::link::{
    InfoBridgePort, InfoKind, InfoPortData, InfoPortKind, LinkAttribute, LinkFlags, LinkInfo,
    LinkMessage,
};
use netlink_packet_route::route::{RouteAttribute, RouteHeader, RouteMessage, RouteType};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec, RouteMessageBuilder};
use serde::Serialize;

use crate::config::{Config, WanDevices};
use crate::policy::Facts;

pub mod monitor;
pub mod multicast;
pub mod selftest;

/// The kernel's switch for IPv4 forwarding (per network namespace).
const IPV4_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// The kernel's switch for IPv6 forwarding on all interfaces (per network namespace).
const IPV6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// What went wrong, on which interface, while doing what.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The rtnetlink socket could not be opened. Not about one interface: nothing has been
    /// asked of the kernel yet.
    #[error("cannot open an rtnetlink socket: {source}")]
    Socket { source: io::Error },

    /// The kernel refused a request about one interface (or the request failed).
    #[error("{ifname}: cannot {op}: {source}")]
    Request {
        ifname: String,
        op: String,
        source: io::Error,
    },

    /// A dump of the whole namespace (links, addresses, routes) failed. Not about one
    /// interface: the dump is of all of them.
    #[error("cannot {op}: {source}")]
    Dump { op: String, source: io::Error },

    /// Ports listed in `cage.ai.port` do not exist. Checked before anything is changed.
    #[error(
        "segment port{} {} (cage.ai.port) do{} not exist; create {} or remove {} from the \
         configuration",
        plural(.ifnames.len()), .ifnames.join(", "), if .ifnames.len() == 1 { "es" } else { "" },
        it_them(.ifnames.len()), it_them(.ifnames.len())
    )]
    MissingPorts { ifnames: Vec<String> },

    /// A device with the bridge's name exists and is not a bridge. Cage does not delete or
    /// adopt a device it did not make.
    #[error(
        "{ifname} (cage.ai.bridge) exists but is {kind}, not a bridge; remove it or set \
         cage.ai.bridge to another name"
    )]
    NotABridge { ifname: String, kind: String },

    /// OpenWrt mode: netifd has not made the segment's bridge (yet). Cage's policy holds
    /// by the bridge's name meanwhile; the daemon adopts the bridge when it appears.
    #[error(
        "{ifname} does not exist yet; on OpenWrt netifd creates it (network.cage, see \
         /etc/uci-defaults/90-cage); the policy holds meanwhile"
    )]
    BridgeMissing { ifname: String },

    /// A port is the bridge itself; a bridge cannot be its own member.
    #[error("{ifname} is both the segment's bridge and one of its ports (cage.ai.port)")]
    PortIsBridge { ifname: String },

    /// The kernel accepted a request but its state afterwards says otherwise (for example
    /// a kernel that silently ignores port isolation). Security properties are checked,
    /// not assumed.
    #[error("{ifname}: {op} was accepted but did not take effect")]
    NotApplied { ifname: String, op: String },

    /// A forwarding switch under `/proc/sys` could not be read or written.
    #[error("cannot {op} {path}: {source}")]
    Sysctl {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn it_them(n: usize) -> &'static str {
    if n == 1 {
        "it"
    } else {
        "them"
    }
}

/// What [`setup_segment`] changed, one human-readable line per action, e.g.
/// "created bridge br-cage" or "isolated port cage1". Empty when everything was already
/// in place.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SetupReport {
    pub actions: Vec<String>,
}

impl SetupReport {
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    fn push(&mut self, action: impl Into<String>) {
        self.actions.push(action.into());
    }
}

/// OpenWrt mode: netifd owns the segment (bridge, addresses, which ports are in it,
/// Wi-Fi interfaces that hostapd adds); Cage adopts the bridge and isolates every port it
/// has, whoever put it there, so two caged hosts never talk at layer 2. Nothing is created.
async fn adopt_segment(cfg: &Config) -> Result<SetupReport, NetlinkError> {
    let seg = &cfg.segment;
    let nl = Rtnl::connect()?;
    let mut report = SetupReport::default();
    let links = nl.links().await?;
    let Some(bridge) = links.iter().find(|l| l.name == seg.bridge) else {
        return Err(NetlinkError::BridgeMissing {
            ifname: seg.bridge.clone(),
        });
    };
    if bridge.kind != Some(InfoKind::Bridge) {
        return Err(NetlinkError::NotABridge {
            ifname: seg.bridge.clone(),
            kind: bridge.kind_description(),
        });
    }
    for port in links.iter().filter(|l| l.controller == Some(bridge.index)) {
        if port.isolated != Some(true) {
            nl.isolate(port).await?;
            report.push(format!("isolated port {}", port.name));
        }
    }
    Ok(report)
}

/// The state of one configured segment port, for `cage status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortState {
    pub name: String,
    /// The device exists.
    pub exists: bool,
    /// Its master is the segment's bridge.
    pub in_bridge: bool,
    /// Bridge port isolation is on (it cannot talk to the other isolated ports).
    pub isolated: bool,
    /// Administratively up.
    pub up: bool,
    /// The link has a carrier (something is plugged in / the peer is up).
    pub carrier: bool,
}

/// Build the AI segment with rtnetlink, for standalone Linux and the lab: the bridge, the
/// router's addresses on it, the member ports (enslaved, up, isolated from each other)
/// and forwarding. Idempotent: what is already in place is left alone and not reported.
///
/// All preconditions (the bridge name is free or a bridge; every port exists) are checked
/// before the first change, so a bad configuration changes nothing.
///
/// Call this after Cage's nftables table is in place: from the moment the bridge has an
/// address and forwarding is on, only the policy keeps the segment off the router's
/// services and the LAN.
///
/// `cfg.segment.vlan` is not used here. A VLAN id only means something on OpenWrt, where
/// the segment is fed by a tagged trunk port and netifd/UCI build the bridge; standalone
/// Linux gets untagged member ports. (The development kernel has neither 802.1Q devices
/// nor bridge VLAN filtering, so OpenWrt mode is tested elsewhere.)
pub async fn setup_segment(cfg: &Config) -> Result<SetupReport, NetlinkError> {
    if cfg.main.mode.resolve(crate::config::on_openwrt()) == crate::config::Mode::OpenWrt {
        return adopt_segment(cfg).await;
    }
    let seg = &cfg.segment;
    let nl = Rtnl::connect()?;
    let mut report = SetupReport::default();

    // Preflight: look, change nothing.
    let links = nl.links().await?;
    let by_name: HashMap<&str, &Link> = links.iter().map(|l| (l.name.as_str(), l)).collect();
    let existing_bridge = by_name.get(seg.bridge.as_str()).copied();
    if let Some(link) = existing_bridge {
        if link.kind != Some(InfoKind::Bridge) {
            return Err(NetlinkError::NotABridge {
                ifname: seg.bridge.clone(),
                kind: link.kind_description(),
            });
        }
    }
    if seg.ports.contains(&seg.bridge) {
        return Err(NetlinkError::PortIsBridge {
            ifname: seg.bridge.clone(),
        });
    }
    let missing: Vec<String> = seg
        .ports
        .iter()
        .filter(|p| !by_name.contains_key(p.as_str()))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(NetlinkError::MissingPorts { ifnames: missing });
    }

    // The bridge.
    let bridge = match existing_bridge {
        Some(link) => link.clone(),
        None => {
            nl.handle
                .link()
                .add(LinkBridge::new(&seg.bridge).build())
                .execute()
                .await
                .map_err(|e| request_error(&seg.bridge, "create bridge", e))?;
            report.push(format!("created bridge {}", seg.bridge));
            nl.link(&seg.bridge)
                .await?
                .ok_or_else(|| NetlinkError::NotApplied {
                    ifname: seg.bridge.clone(),
                    op: "create bridge".into(),
                })?
        }
    };
    if !bridge.up {
        nl.set_up(&bridge).await?;
        report.push(format!("set {} up", bridge.name));
    }

    // The router's addresses on the bridge.
    let present: Vec<IpNet> = nl
        .addresses()
        .await?
        .into_iter()
        .filter(|a| a.index == bridge.index)
        .map(|a| a.local)
        .collect();
    let mut wanted = vec![IpNet::V4(seg.address)];
    wanted.extend(seg.address6.map(IpNet::V6));
    for addr in wanted {
        if !present.contains(&addr) {
            nl.add_address(&bridge, addr).await?;
            report.push(format!("added address {addr} to {}", bridge.name));
        }
    }

    // The member ports.
    for name in &seg.ports {
        let mut port = by_name[name.as_str()].clone();
        if port.controller != Some(bridge.index) {
            nl.enslave(&port, bridge.index, &bridge.name).await?;
            report.push(
                match port
                    .controller
                    .and_then(|i| links.iter().find(|l| l.index == i))
                {
                    Some(old) => format!("moved port {name} from {} to {}", old.name, bridge.name),
                    None => format!("added port {name} to {}", bridge.name),
                },
            );
            // A new bridge port starts with the kernel's defaults; read them back.
            port = nl.existing_link(name).await?;
        }
        if !port.up {
            nl.set_up(&port).await?;
            report.push(format!("set {name} up"));
        }
        if port.isolated != Some(true) {
            nl.isolate(&port).await?;
            report.push(format!("isolated port {name}"));
        }
    }

    // Forwarding. Note for standalone Linux: with IPv6 forwarding on, interfaces whose
    // accept_ra is 1 stop accepting router advertisements; a WAN that gets its IPv6
    // address by SLAAC needs accept_ra=2. Cage does not change that: the WAN is not a
    // device Cage owns.
    if ensure_sysctl_one(Path::new(IPV4_FORWARD))? {
        report.push("enabled IPv4 forwarding");
    }
    if seg.address6.is_some() && ensure_sysctl_one(Path::new(IPV6_FORWARD))? {
        report.push("enabled IPv6 forwarding");
    }

    Ok(report)
}

/// Detect what the policy needs to know about the running system: the WAN devices (the
/// configured list, or with `auto` the devices of the IPv4 and IPv6 default routes of the
/// main table) and the upstream subnets (the networks of the WAN devices' IPv4 addresses
/// and global IPv6 addresses, plus the configured `upstream_subnet`s).
///
/// No default route means no WAN devices, which is not an error: the policy then allows
/// no egress at all (fail closed). A configured WAN device that does not exist is still
/// listed, with no addresses, since it may appear later (a USB modem, a Wi-Fi client).
pub async fn detect_facts(cfg: &Config) -> Result<Facts, NetlinkError> {
    let nl = Rtnl::connect()?;
    let links = nl.links().await?;
    let names: HashMap<u32, &str> = links.iter().map(|l| (l.index, l.name.as_str())).collect();

    let wan_devices: Vec<String> = match &cfg.wan.devices {
        WanDevices::List(devices) => devices.clone(),
        WanDevices::Auto => {
            let mut devices: Vec<String> = nl
                .default_route_devices()
                .await?
                .into_iter()
                .filter_map(|index| names.get(&index).map(|n| n.to_string()))
                .collect();
            devices.sort();
            devices.dedup();
            devices
        }
    };

    let wan_indexes: Vec<u32> = links
        .iter()
        .filter(|l| wan_devices.contains(&l.name))
        .map(|l| l.index)
        .collect();
    let mut upstream4 = Vec::new();
    let mut upstream6 = Vec::new();
    for addr in nl.addresses().await? {
        if !wan_indexes.contains(&addr.index) {
            continue;
        }
        match addr.network {
            IpNet::V4(net) => upstream4.push(net),
            IpNet::V6(net) if !is_link_local6(net.addr()) => upstream6.push(net),
            IpNet::V6(_) => {}
        }
    }
    for net in &cfg.wan.upstream_subnets {
        match net.trunc() {
            IpNet::V4(net) => upstream4.push(net),
            IpNet::V6(net) => upstream6.push(net),
        }
    }
    upstream4.sort();
    upstream4.dedup();
    upstream6.sort();
    upstream6.dedup();

    Ok(Facts {
        wan_devices,
        upstream4,
        upstream6,
        conntrack_max: conntrack_max(),
        ..Default::default()
    })
}

/// The router's conntrack table size, 0 when it cannot be read (no conntrack yet).
fn conntrack_max() -> u32 {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// What [`pin_neighbours`] did to the router's neighbour table on the segment.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PinReport {
    /// Bound addresses pinned anew to their MAC.
    pub pinned: Vec<IpAddr>,
    /// Entries that named another MAC than the binding (an advertisement for someone
    /// else's address got through to the router's stack): (address, the MAC it named).
    pub repaired: Vec<(IpAddr, String)>,
    /// Pins of bindings that ended, removed.
    pub unpinned: Vec<IpAddr>,
}

/// Make the router's neighbour entries on `bridge` say what the layer-2 bindings say:
/// every bound address (the address's MAC, from `bridge cage`'s sets) a permanent entry
/// with that MAC, which no neighbour advertisement or ARP can move; a permanent entry
/// whose binding ended is removed. The bridge family cannot match an IPv6 neighbour
/// advertisement by its target, so one for someone else's address can reach the
/// router's stack: the bridge then drops what the router would misdeliver, and this
/// puts the entry back. Nothing when the bridge does not exist (yet).
pub async fn pin_neighbours(
    bridge: &str,
    bound: &[(IpAddr, String)],
) -> Result<PinReport, NetlinkError> {
    use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
    let nl = Rtnl::connect()?;
    let Some(link) = nl.link(bridge).await? else {
        return Ok(PinReport::default());
    };
    let entries = dump(
        nl.handle.neighbours().get().execute(),
        "list the neighbour table",
    )
    .await?;
    // (address) → (MAC, permanent, the message, to delete it by)
    let mut now: HashMap<IpAddr, (Option<String>, bool, _)> = HashMap::new();
    for m in entries
        .into_iter()
        .filter(|m| m.header.ifindex == link.index)
    {
        let mut addr = None;
        let mut lladdr = None;
        for a in &m.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                    addr = Some(IpAddr::V4(*v4))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                    addr = Some(IpAddr::V6(*v6))
                }
                NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                    lladdr = Some(mac_text(l))
                }
                _ => {}
            }
        }
        if let Some(addr) = addr {
            let permanent = m.header.state == NeighbourState::Permanent;
            now.insert(addr, (lladdr, permanent, m));
        }
    }
    let mut report = PinReport::default();
    for (addr, mac) in bound {
        let mac = mac.to_ascii_lowercase();
        match now.get(addr) {
            Some((Some(l), true, _)) if *l == mac => continue,
            Some((Some(l), _, _)) if *l != mac => report.repaired.push((*addr, l.clone())),
            _ => {}
        }
        let Some(lla) = parse_mac(&mac) else { continue };
        nl.handle
            .neighbours()
            .add(link.index, *addr)
            .link_layer_address(&lla)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| request_error(bridge, &format!("pin the neighbour {addr}"), e))?;
        report.pinned.push(*addr);
    }
    for (addr, (_, permanent, msg)) in now {
        if permanent && !bound.iter().any(|(a, _)| *a == addr) {
            nl.handle
                .neighbours()
                .del(msg)
                .execute()
                .await
                .map_err(|e| request_error(bridge, &format!("unpin the neighbour {addr}"), e))?;
            report.unpinned.push(addr);
        }
    }
    Ok(report)
}

fn mac_text(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

/// The addresses of `devices` that a service can listen on, IPv4 first: not IPv6
/// link-local ones (a browser cannot be given one without a zone), and not IPv6 ones that
/// are still tentative or failed duplicate address detection (they cannot be bound).
/// A device that does not exist (yet) has none.
pub async fn device_addresses(devices: &[String]) -> Result<Vec<IpAddr>, NetlinkError> {
    let nl = Rtnl::connect()?;
    let links = nl.links().await?;
    let wanted: Vec<u32> = links
        .iter()
        .filter(|l| devices.contains(&l.name))
        .map(|l| l.index)
        .collect();
    let msgs = dump(nl.handle.address().get().execute(), "list addresses").await?;
    let unusable = AddressFlags::Tentative | AddressFlags::Dadfailed;
    let mut found: Vec<IpAddr> = msgs
        .iter()
        .filter(|m| wanted.contains(&m.header.index))
        .filter(|m| {
            !m.attributes.iter().any(|a| match a {
                AddressAttribute::Flags(f) => f.intersects(unusable),
                _ => false,
            })
        })
        .filter_map(Address::from_message)
        .map(|a| a.local.addr())
        .filter(|ip| match ip {
            IpAddr::V4(ip) => !ip.is_loopback(),
            IpAddr::V6(ip) => !ip.is_loopback() && !is_link_local6(*ip),
        })
        .collect();
    found.sort_by_key(|ip| (ip.is_ipv6(), *ip));
    found.dedup();
    Ok(found)
}

/// The state of every configured segment port, in configuration order.
pub async fn port_states(cfg: &Config) -> Result<Vec<PortState>, NetlinkError> {
    let nl = Rtnl::connect()?;
    let links = nl.links().await?;
    let by_name: HashMap<&str, &Link> = links.iter().map(|l| (l.name.as_str(), l)).collect();
    let bridge = by_name
        .get(cfg.segment.bridge.as_str())
        .filter(|l| l.kind == Some(InfoKind::Bridge))
        .map(|l| l.index);
    Ok(cfg
        .segment
        .ports
        .iter()
        .map(|name| match by_name.get(name.as_str()) {
            Some(link) => {
                let in_bridge = bridge.is_some() && link.controller == bridge;
                PortState {
                    name: name.clone(),
                    exists: true,
                    in_bridge,
                    isolated: in_bridge && link.isolated == Some(true),
                    up: link.up,
                    carrier: link.carrier,
                }
            }
            None => PortState {
                name: name.clone(),
                exists: false,
                in_bridge: false,
                isolated: false,
                up: false,
                carrier: false,
            },
        })
        .collect())
}

/// `fe80::/10`, the IPv6 link-local unicast range.
fn is_link_local6(addr: Ipv6Addr) -> bool {
    addr.segments()[0] & 0xffc0 == 0xfe80
}

/// Set a `/proc/sys` switch to 1 unless it already is. Returns whether it was changed.
fn ensure_sysctl_one(path: &Path) -> Result<bool, NetlinkError> {
    let current = std::fs::read_to_string(path).map_err(|source| NetlinkError::Sysctl {
        path: path.to_owned(),
        op: "read",
        source,
    })?;
    if current.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(path, "1\n").map_err(|source| NetlinkError::Sysctl {
        path: path.to_owned(),
        op: "write",
        source,
    })?;
    Ok(true)
}

/// The parts of a link that Cage looks at.
#[derive(Debug, Clone)]
struct Link {
    index: u32,
    name: String,
    kind: Option<InfoKind>,
    controller: Option<u32>,
    up: bool,
    carrier: bool,
    /// `Some` when the link is a bridge port: whether it is isolated.
    isolated: Option<bool>,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Option<Self> {
        let mut name = None;
        let mut kind = None;
        let mut controller = None;
        let mut bridge_port = false;
        let mut isolated = false;
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::Controller(i) if *i != 0 => controller = Some(*i),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => kind = Some(k.clone()),
                            LinkInfo::PortKind(InfoPortKind::Bridge) => bridge_port = true,
                            LinkInfo::PortData(InfoPortData::BridgePort(data)) => {
                                isolated = data.contains(&InfoBridgePort::Isolated(true));
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        Some(Link {
            index: msg.header.index,
            name: name?,
            kind,
            controller,
            up: msg.header.flags.contains(LinkFlags::Up),
            carrier: msg.header.flags.contains(LinkFlags::LowerUp),
            isolated: bridge_port.then_some(isolated),
        })
    }

    /// "a dummy device", or "a device of no particular kind" for physical NICs.
    fn kind_description(&self) -> String {
        match &self.kind {
            Some(kind) => format!("a {kind} device"),
            None => "a device of no particular kind (a physical NIC?)".into(),
        }
    }
}

/// One address as the policy and the idempotence checks need it.
#[derive(Debug, Clone)]
struct Address {
    index: u32,
    /// The interface's own address with its prefix, as `ip addr add` takes it.
    local: IpNet,
    /// The on-link network: the address (or, on point-to-point links, the peer) with the
    /// host bits cleared, which is what the kernel's prefix route covers.
    network: IpNet,
}

impl Address {
    fn from_message(msg: &netlink_packet_route::address::AddressMessage) -> Option<Self> {
        let mut address = None;
        let mut local = None;
        for attr in &msg.attributes {
            match attr {
                AddressAttribute::Address(a) => address = Some(*a),
                AddressAttribute::Local(a) => local = Some(*a),
                _ => {}
            }
        }
        let prefix = msg.header.prefix_len;
        // IFA_LOCAL is the interface's address; IFA_ADDRESS is the same, or the peer on
        // point-to-point links. IPv6 often sends IFA_ADDRESS only.
        let own = local.or(address)?;
        let on_link = address.or(local)?;
        Some(Address {
            index: msg.header.index,
            local: IpNet::new(own, prefix).ok()?,
            network: IpNet::new(on_link, prefix).ok()?.trunc(),
        })
    }
}

/// An rtnetlink connection whose background task ends with it.
struct Rtnl {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Rtnl {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Rtnl {
    fn connect() -> Result<Self, NetlinkError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| NetlinkError::Socket { source })?;
        let task = tokio::spawn(connection);
        Ok(Rtnl { handle, task })
    }

    /// Make `port` a port of the bridge with this index and name.
    async fn enslave(
        &self,
        port: &Link,
        bridge: u32,
        bridge_name: &str,
    ) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(port.index)
                    .controller(bridge)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| request_error(&port.name, &format!("enslave to {bridge_name}"), e))
    }

    /// Switch bridge port isolation on for `port`, and check that it took: isolation is
    /// what keeps caged hosts apart at layer 2, so it is checked, not trusted.
    async fn isolate(&self, port: &Link) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set_port(LinkBridgePort::new(port.index).isolated(true).build())
            .execute()
            .await
            .map_err(|e| request_error(&port.name, "set bridge port isolation on", e))?;
        if self.existing_link(&port.name).await?.isolated != Some(true) {
            return Err(NetlinkError::NotApplied {
                ifname: port.name.clone(),
                op: "set bridge port isolation on".into(),
            });
        }
        Ok(())
    }

    /// Every IPv4 and IPv6 route (all tables; callers filter).
    async fn main_routes(&self) -> Result<Vec<RouteMessage>, NetlinkError> {
        let route = self.handle.route();
        let v4 = route.get(RouteMessageBuilder::<Ipv4Addr>::new().build());
        let mut routes = dump(v4.execute(), "list IPv4 routes").await?;
        let v6 = route.get(RouteMessageBuilder::<Ipv6Addr>::new().build());
        routes.extend(dump(v6.execute(), "list IPv6 routes").await?);
        Ok(routes)
    }

    async fn link_messages(&self) -> Result<Vec<LinkMessage>, NetlinkError> {
        dump(self.handle.link().get().execute(), "list links").await
    }

    async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let msgs = self.link_messages().await?;
        Ok(msgs.iter().filter_map(Link::from_message).collect())
    }

    /// The messages of the link named `name` (the kernel says ENODEV when there is none).
    async fn named_link_messages(&self, name: &str) -> Result<Vec<LinkMessage>, rtnetlink::Error> {
        let get = self.handle.link().get().match_name(name);
        get.execute().try_collect().await
    }

    /// One link by name; `None` when there is no such device.
    async fn link(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        match self.named_link_messages(name).await {
            Ok(msgs) => Ok(msgs.iter().find_map(Link::from_message)),
            Err(e) => unless_no_device(e, name, "look up link").map(|()| None),
        }
    }

    /// One link that must exist (it did a moment ago).
    async fn existing_link(&self, name: &str) -> Result<Link, NetlinkError> {
        self.link(name).await?.ok_or_else(|| NetlinkError::Request {
            ifname: name.into(),
            op: "look up link".into(),
            source: io::Error::from_raw_os_error(libc::ENODEV),
        })
    }

    async fn set_up(&self, link: &Link) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(link.index).up().build())
            .execute()
            .await
            .map_err(|e| request_error(&link.name, "set up", e))
    }

    async fn add_address(&self, link: &Link, addr: IpNet) -> Result<(), NetlinkError> {
        let mut req = self
            .handle
            .address()
            .add(link.index, addr.addr(), addr.prefix_len());
        if addr.addr().is_ipv6() {
            // The router's address must be usable at once: duplicate address detection
            // would keep it tentative (and unusable for DHCPv6/RA) for a second or more,
            // and a caged host could block it for good by answering the DAD probe.
            let msg = req.message_mut();
            msg.header.flags |= AddressHeaderFlags::Nodad;
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute()
            .await
            .map_err(|e| request_error(&link.name, &format!("add address {addr}"), e))
    }

    async fn addresses(&self) -> Result<Vec<Address>, NetlinkError> {
        let msgs = dump(self.handle.address().get().execute(), "list addresses").await?;
        Ok(msgs.iter().filter_map(Address::from_message).collect())
    }

    /// Output interfaces of the IPv4 and IPv6 default routes in the main table
    /// (multipath routes give one per next hop).
    async fn default_route_devices(&self) -> Result<Vec<u32>, NetlinkError> {
        let routes = self.main_routes().await?;

        let mut devices = BTreeMap::new();
        for route in routes.iter().filter(|r| is_main_default(r)) {
            for attr in &route.attributes {
                match attr {
                    RouteAttribute::Oif(index) => {
                        devices.insert(*index, ());
                    }
                    RouteAttribute::MultiPath(hops) => {
                        for hop in hops {
                            devices.insert(hop.interface_index, ());
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(devices.into_keys().filter(|&i| i != 0).collect())
    }
}

/// A unicast default route (`0.0.0.0/0` or `::/0`) in the main table. Unreachable,
/// blackhole and prohibit defaults lead nowhere and are not WAN devices.
fn is_main_default(route: &RouteMessage) -> bool {
    // RTA_TABLE holds the full table id; the header's u8 is only a compatibility copy.
    let table = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table));
    route.header.destination_prefix_length == 0
        && route.header.kind == RouteType::Unicast
        && table == u32::from(RouteHeader::RT_TABLE_MAIN)
}

/// The kernel's answer as an `io::Error` ("File exists (os error 17)"), which says more
/// than rtnetlink's wrapper around it.
fn to_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
        other => io::Error::other(other),
    }
}

fn request_error(ifname: &str, op: &str, e: rtnetlink::Error) -> NetlinkError {
    NetlinkError::Request {
        ifname: ifname.into(),
        op: op.into(),
        source: to_io(e),
    }
}

/// A request's error about `ifname`, or `Ok` when the kernel says there is no such
/// device (ENODEV): for the callers to whom a missing link is an answer, not a failure.
fn unless_no_device(e: rtnetlink::Error, ifname: &str, op: &str) -> Result<(), NetlinkError> {
    let source = to_io(e);
    if source.raw_os_error() == Some(libc::ENODEV) {
        return Ok(());
    }
    Err(NetlinkError::Request {
        ifname: ifname.into(),
        op: op.into(),
        source,
    })
}

/// Everything a dump request (links, addresses, routes, neighbours of the whole
/// namespace) answers, or [`NetlinkError::Dump`] saying what was being listed.
async fn dump<T>(
    answers: impl futures::Stream<Item = Result<T, rtnetlink::Error>>,
    op: &str,
) -> Result<Vec<T>, NetlinkError> {
    answers.try_collect().await.map_err(|e| NetlinkError::Dump {
        op: op.into(),
        source: to_io(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_range() {
        assert!(is_link_local6("fe80::1".parse().unwrap()));
        assert!(is_link_local6("febf:ffff::1".parse().unwrap()));
        assert!(!is_link_local6("fec0::1".parse().unwrap()));
        assert!(!is_link_local6("2001:db8::1".parse().unwrap()));
        assert!(!is_link_local6("fd00::1".parse().unwrap()));
    }

    #[test]
    fn missing_ports_message_names_them() {
        let one = NetlinkError::MissingPorts {
            ifnames: vec!["lan3".into()],
        };
        assert_eq!(
            one.to_string(),
            "segment port lan3 (cage.ai.port) does not exist; create it or remove it from \
             the configuration"
        );
        let two = NetlinkError::MissingPorts {
            ifnames: vec!["lan3".into(), "lan4".into()],
        };
        assert!(two
            .to_string()
            .starts_with("segment ports lan3, lan4 (cage.ai.port) do not"));
    }

    #[test]
    fn upstream_network_of_point_to_point_is_the_peer() {
        let mut msg = netlink_packet_route::address::AddressMessage::default();
        msg.header.index = 7;
        msg.header.prefix_len = 32;
        msg.attributes = vec![
            AddressAttribute::Local("100.64.0.2".parse().unwrap()),
            AddressAttribute::Address("100.64.0.1".parse().unwrap()),
        ];
        let a = Address::from_message(&msg).unwrap();
        assert_eq!(a.local, "100.64.0.2/32".parse::<IpNet>().unwrap());
        assert_eq!(a.network, "100.64.0.1/32".parse::<IpNet>().unwrap());
    }
}
