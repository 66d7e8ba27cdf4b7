//! The rtnetlink work of `cage selftest`: what it reads of the router (addresses,
//! neighbours, default gateways, the segment bridge) and the throwaway probe ports it
//! plugs into the live segment bridge (a veth pair whose far end lives in a probe
//! namespace), their addresses, routes and static neighbours, and their removal.
//!
//! Like the rest of `netlink`, every function acts in the network namespace of the
//! calling thread: the router's for the functions that read it or plug a port into its
//! bridge, a probe namespace's for [`configure_probe_host`].

use std::net::IpAddr;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use netlink_packet_route::link::{BridgePortState, InfoData, InfoKind, InfoVeth};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::RouteAddress;
use netlink_packet_route::AddressFamily;
use rtnetlink::{LinkMessageBuilder, LinkUnspec};

use super::*;

/// A link of the router, as the self-test needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterLink {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    pub is_bridge: bool,
}

/// An entry of the router's neighbour table that names a link-layer address: a host
/// that exists (or did a moment ago).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub ifname: String,
    pub addr: IpAddr,
    /// The entry has a link-layer address and is not failed: the host answered once.
    pub resolved: bool,
}

/// What the self-test reads of the router before it changes anything.
#[derive(Debug, Clone, Default)]
pub struct RouterView {
    pub links: Vec<RouterLink>,
    /// Every address of the router, with its prefix and the device it is on.
    pub addresses: Vec<(String, IpNet)>,
    pub neighbours: Vec<Neighbour>,
    /// Gateways of the main table's default routes (IPv4 and IPv6).
    pub gateways: Vec<IpAddr>,
}

impl RouterView {
    pub fn link(&self, name: &str) -> Option<&RouterLink> {
        self.links.iter().find(|l| l.name == name)
    }
}

fn mac_of(attrs: &[LinkAttribute]) -> Option<[u8; 6]> {
    attrs.iter().find_map(|a| match a {
        LinkAttribute::Address(m) if m.len() == 6 => m.as_slice().try_into().ok(),
        _ => None,
    })
}

fn ip_of(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        NeighbourAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Read the router: links, addresses, neighbours, default gateways.
pub async fn router_view() -> Result<RouterView, NetlinkError> {
    let nl = Rtnl::connect()?;
    let msgs = nl.link_messages().await?;
    let links: Vec<RouterLink> = msgs
        .iter()
        .filter_map(|m| {
            let link = Link::from_message(m)?;
            Some(RouterLink {
                index: link.index,
                name: link.name,
                mac: mac_of(&m.attributes),
                mtu: m.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Mtu(mtu) => Some(*mtu),
                    _ => None,
                }),
                is_bridge: link.kind == Some(InfoKind::Bridge),
            })
        })
        .collect();
    let name_of = |index: u32| {
        links
            .iter()
            .find(|l| l.index == index)
            .map(|l| l.name.clone())
            .unwrap_or_else(|| format!("if{index}"))
    };

    let addresses = nl
        .addresses()
        .await?
        .into_iter()
        .map(|a| (name_of(a.index), a.local))
        .collect();

    let neigh: Vec<NeighbourMessage> =
        dump(nl.handle.neighbours().get().execute(), "list neighbours").await?;
    let neighbours = neigh
        .iter()
        .filter_map(|m| {
            let addr = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(d) => ip_of(d),
                _ => None,
            })?;
            let lladdr = m
                .attributes
                .iter()
                .any(|a| matches!(a, NeighbourAttribute::LinkLayerAddress(l) if !l.is_empty()));
            let state = m.header.state;
            let resolved = lladdr
                && !matches!(
                    state,
                    NeighbourState::Failed | NeighbourState::Incomplete | NeighbourState::None
                );
            Some(Neighbour {
                ifname: name_of(m.header.ifindex),
                addr,
                resolved,
            })
        })
        .collect();

    let mut gateways = Vec::new();
    for route in nl.main_routes().await? {
        if !is_main_default(&route) {
            continue;
        }
        let mut attrs: Vec<&RouteAttribute> = route.attributes.iter().collect();
        for attr in &route.attributes {
            if let RouteAttribute::MultiPath(hops) = attr {
                attrs.extend(hops.iter().flat_map(|h| h.attributes.iter()));
            }
        }
        for attr in attrs {
            match attr {
                RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateways.push(IpAddr::V4(*a)),
                RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gateways.push(IpAddr::V6(*a)),
                _ => {}
            }
        }
    }
    gateways.sort();
    gateways.dedup();

    Ok(RouterView {
        links,
        addresses,
        neighbours,
        gateways,
    })
}

/// Plug a probe port into `bridge`: a veth pair `name` (router side, MAC `mac`) ↔ `eth0`
/// (MAC `peer_mac`) created directly in the network namespace open at `peer_ns`. Both
/// ends get the bridge's MTU, so adding the port cannot lower it. The router side is put
/// in the bridge while down, made an isolated port (checked, not assumed), and only then
/// set up: it never forwards a frame without isolation. On error the caller removes
/// `name` (see [`delete_link`]); whatever exists of it then goes.
pub async fn add_probe_port(
    name: &str,
    mac: [u8; 6],
    bridge: &RouterLink,
    peer_ns: RawFd,
    peer_mac: [u8; 6],
) -> Result<(), NetlinkError> {
    let nl = Rtnl::connect()?;
    let mut peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name("eth0".to_owned())
        .address(peer_mac.to_vec())
        .setns_by_fd(peer_ns);
    let mut veth = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
        .name(name.to_owned())
        .address(mac.to_vec());
    if let Some(mtu) = bridge.mtu {
        peer = peer.mtu(mtu);
        veth = veth.mtu(mtu);
    }
    let veth = veth
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
        .build();
    nl.handle
        .link()
        .add(veth)
        .execute()
        .await
        .map_err(|e| request_error(name, "create veth pair", e))?;
    let port = nl.existing_link(name).await?;
    nl.enslave(&port, bridge.index, &bridge.name).await?;
    nl.isolate(&port).await?;
    let port = nl.existing_link(name).await?;
    if port.controller != Some(bridge.index) {
        return Err(NetlinkError::NotApplied {
            ifname: name.to_owned(),
            op: format!("joining {} as an isolated port", bridge.name),
        });
    }
    nl.set_up(&port).await
}

/// The bridge port state of `name` is forwarding.
pub async fn port_forwarding(name: &str) -> Result<bool, NetlinkError> {
    let nl = Rtnl::connect()?;
    let msgs = nl
        .named_link_messages(name)
        .await
        .map_err(|e| request_error(name, "look up link", e))?;
    Ok(msgs.iter().any(|m| {
        m.attributes.iter().any(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().any(|i| match i {
                LinkInfo::PortData(InfoPortData::BridgePort(data)) => {
                    data.contains(&InfoBridgePort::State(BridgePortState::Forwarding))
                }
                _ => false,
            }),
            _ => false,
        })
    }))
}

/// Wait (at most `max`) until the bridge forwards on port `name`.
pub async fn wait_forwarding(name: &str, max: Duration) -> Result<bool, NetlinkError> {
    let until = Instant::now() + max;
    loop {
        if port_forwarding(name).await? {
            return Ok(true);
        }
        if Instant::now() >= until {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Remove link `name` if it exists (a veth takes its peer with it). Whether it existed.
pub async fn delete_link(name: &str) -> Result<bool, NetlinkError> {
    let nl = Rtnl::connect()?;
    let Some(link) = nl.link(name).await? else {
        return Ok(false);
    };
    match nl.handle.link().del(link.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) => unless_no_device(e, name, "delete link").map(|()| false),
    }
}

/// Whether link `name` exists.
pub async fn link_exists(name: &str) -> Result<bool, NetlinkError> {
    Ok(Rtnl::connect()?.link(name).await?.is_some())
}

/// Remove the neighbour entries for `addrs` on `ifname` (entries the self-test's own
/// traffic made). Entries that do not exist are not an error.
pub async fn delete_neighbours(ifname: &str, addrs: &[IpAddr]) -> Result<(), NetlinkError> {
    let nl = Rtnl::connect()?;
    let Some(link) = nl.link(ifname).await? else {
        return Ok(());
    };
    for &addr in addrs {
        let mut msg = NeighbourMessage::default();
        msg.header.family = match addr {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        msg.header.ifindex = link.index;
        msg.attributes
            .push(NeighbourAttribute::Destination(match addr {
                IpAddr::V4(a) => NeighbourAddress::Inet(a),
                IpAddr::V6(a) => NeighbourAddress::Inet6(a),
            }));
        if let Err(e) = nl.handle.neighbours().del(msg).execute().await {
            let err = to_io(e);
            if !matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) {
                return Err(NetlinkError::Request {
                    ifname: ifname.to_owned(),
                    op: format!("delete neighbour {addr}"),
                    source: err,
                });
            }
        }
    }
    Ok(())
}

/// Inside a probe namespace: bring `lo` and `eth0` up, add `addresses` to `eth0`
/// (IPv6 without duplicate address detection), default routes via `gateways`, and
/// permanent neighbour entries (so frames go out without ARP or ND).
pub async fn configure_probe_host(
    addresses: &[IpNet],
    gateways: &[IpAddr],
    neighbours: &[(IpAddr, [u8; 6])],
) -> Result<(), NetlinkError> {
    let nl = Rtnl::connect()?;
    let lo = nl.existing_link("lo").await?;
    nl.set_up(&lo).await?;
    let eth0 = nl.existing_link("eth0").await?;
    nl.set_up(&eth0).await?;
    for &addr in addresses {
        nl.add_address(&eth0, addr).await?;
    }
    for &gw in gateways {
        let msg = match gw {
            IpAddr::V4(g) => RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(g)
                .output_interface(eth0.index)
                .build(),
            IpAddr::V6(g) => RouteMessageBuilder::<Ipv6Addr>::new()
                .gateway(g)
                .output_interface(eth0.index)
                .build(),
        };
        nl.handle
            .route()
            .add(msg)
            .execute()
            .await
            .map_err(|e| request_error("eth0", &format!("add default route via {gw}"), e))?;
    }
    for &(addr, mac) in neighbours {
        nl.handle
            .neighbours()
            .add(eth0.index, addr)
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| request_error("eth0", &format!("add neighbour {addr}"), e))?;
    }
    Ok(())
}
