//! Where the LAN web page listens: the configured address, or (`lan:PORT`) every address
//! the LAN devices have now, never one inside the segment. The page (`web`) binds them;
//! `cage status` shows them.

use std::net::{IpAddr, SocketAddr};

use crate::config::{self, Config};

/// Where the page should listen now: the configured address, or (`lan:PORT`) every
/// address of the LAN devices the router has at this moment. Never an address inside the
/// segment, whatever the LAN says.
pub async fn listen_addresses(
    cfg: &Config,
) -> Result<Vec<SocketAddr>, crate::netlink::NetlinkError> {
    let port = cfg.main.web_listen.port();
    let ips = match cfg.main.web_listen {
        config::WebListen::Address(addr) => vec![addr.ip()],
        config::WebListen::Lan { .. } => crate::netlink::device_addresses(&cfg.lan.devices).await?,
    };
    Ok(ips
        .into_iter()
        .filter(|ip| !in_segment(cfg, *ip))
        .map(|ip| SocketAddr::new(ip, port))
        .collect())
}

fn in_segment(cfg: &Config, ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => cfg.segment.subnet4().contains(&ip),
        IpAddr::V6(ip) => cfg.segment.subnet6().is_some_and(|net| net.contains(&ip)),
    }
}

/// `https://192.168.8.1:2243/`, `https://[fd00::1]:2243/`.
pub fn url(addr: &SocketAddr) -> String {
    format!("https://{addr}/")
}
