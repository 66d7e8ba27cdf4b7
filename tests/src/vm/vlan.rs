//! VLANs for real (the CI kernel has neither 802.1Q devices nor bridge VLAN filtering):
//!
//! - **Trunk**: the segment on VLAN 10 over a LAN port, as OpenWrt mode has it (90-cage's
//!   `cage.ai.vlan`: the 802.1Q device `lan2.10` is a port of `br-cage`, `lan2` stays in
//!   `br-lan`). Behind `lan2` a managed switch (a VLAN-filtering bridge) has a caged host
//!   on an access port of VLAN 10 and a LAN host on VLAN 1, untagged on the trunk.
//! - **DSA**: the LAN bridge with `vlan_filtering` as OpenWrt builds it on DSA routers
//!   (`br-lan`, VLAN 1 untagged on its ports), one of its ports an access port of VLAN 10,
//!   and the segment reached as `br-lan.10`, a port of `br-cage`.
//!
//! In both, the caged host behind the VLAN reaches the internet and the router's DNS, is
//! counted in the flow log, and reaches neither the LAN, the router's other services nor
//! the other caged hosts. From caged ports, hand-made frames tagged with the LAN's VLAN id,
//! double-tagged (802.1Q in 802.1Q, and 802.1ad outside) never reach the LAN host or the
//! router (witnesses in both see nothing); the same frames sent where they are allowed do
//! arrive, so the injection itself is proven.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::Duration;

use cage_agent::probe::{
    NetNs, NetNsGuard, Probe, Servers, Service, Verdict, Witness, WitnessLimits,
};

use crate::contract;
use crate::lab::{self, Lab, Node, AI1_4, LAN_HOST4, PUBLIC4, ROUTER_LAN4, ROUTER_SEG4};

use super::{kernel, row};

const TPID_8021Q: u16 = 0x8100;
const TPID_8021AD: u16 = 0x88a8;

pub fn run() {
    if !kernel::require("VLAN", "8021q", "CONFIG_VLAN_8021Q")
        || !kernel::require("VLAN", "bridge", "CONFIG_BRIDGE")
    {
        return;
    }
    trunk();
    dsa();
}

/// `ip -n NS ARGS`, which must succeed.
fn ip(ns: &str, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("ip");
    cmd.arg("-n").arg(ns).args(args);
    match lab::run_command(&mut cmd, None, Duration::from_secs(30)) {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => Err(format!(
            "ip -n {ns} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// `bridge -n NS ARGS`, which must succeed.
fn bridge(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut cmd = Command::new("bridge");
    cmd.arg("-n").arg(ns).args(args);
    match lab::run_command(&mut cmd, None, Duration::from_secs(30)) {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "bridge -n {ns} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(e.to_string()),
    }
}

fn mac(ns: &str, dev: &str) -> Result<[u8; 6], String> {
    let out = ip(ns, &["-o", "link", "show", "dev", dev])?;
    let text = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .ok_or_else(|| format!("no MAC on {dev} in {ns}"))?;
    let mut m = [0u8; 6];
    for (i, part) in text.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(part, 16).map_err(|e| e.to_string())?;
    }
    Ok(m)
}

/// A caged host behind a VLAN: its namespace and address.
struct VlanHost {
    ns: NetNs,
    addr4: IpAddr,
    /// `ip -n` name, for its MAC.
    name: String,
}

/// Make a host namespace `{prefix}-{role}` with `eth0` (peer `peer` in `from_ns`), up,
/// then `ip` commands in it (addresses, routes).
fn host(
    prefix: &str,
    role: &str,
    from_ns: &str,
    peer: &str,
    config: &[&[&str]],
) -> Result<NetNsGuard, String> {
    let g = NetNsGuard::named(format!("{prefix}-{role}")).map_err(|e| e.to_string())?;
    let name = g.name().to_owned();
    ip(
        from_ns,
        &[
            "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", &name,
        ],
    )?;
    ip(&name, &["link", "set", "lo", "up"])?;
    ip(&name, &["link", "set", "eth0", "up"])?;
    for args in config {
        ip(&name, args)?;
    }
    Ok(g)
}

/// [`host`] for a caged host of the segment.
fn caged_host(
    prefix: &str,
    role: &str,
    from_ns: &str,
    peer: &str,
    addr4: &str,
    addr6: &str,
) -> Result<NetNsGuard, String> {
    host(
        prefix,
        role,
        from_ns,
        peer,
        &[
            &["addr", "add", addr4, "dev", "eth0"],
            &["addr", "add", addr6, "dev", "eth0", "nodad"],
            &["route", "add", "default", "via", "192.168.10.1"],
            &["route", "add", "::/0", "via", "fd00:cafe:10::1"],
        ],
    )
}

/// A lab in OpenWrt mode whose segment bridge (made here, as netifd would) has the
/// caged ports and `extra_port`; `cage run` adopted it and isolated every port.
fn openwrt_lab(
    section: &str,
    setup: &dyn Fn(&Lab) -> Result<String, String>,
) -> Option<(Lab, lab::CageRun)> {
    let lab = match Lab::up(&lab::unique_prefix()) {
        Ok(l) => l,
        Err(e) => {
            row(section, "lab up", false, "-", e);
            return None;
        }
    };
    if let Err(e) = lab.plain_segment() {
        row(section, "the segment as netifd makes it", false, "-", e);
        return None;
    }
    let extra_port = match setup(&lab) {
        Ok(p) => p,
        Err(e) => {
            row(section, "VLAN set-up", false, "-", e);
            return None;
        }
    };
    // Cage's policy replaces the plain router's masquerading.
    lab.nft(Node::Router, "delete table inet labplain");
    let path = lab.write_config(contract::CONFIG_EXTRA);
    let text = std::fs::read_to_string(&path).unwrap_or_default().replace(
        "config cage 'main'\n",
        "config cage 'main'\n\toption mode 'openwrt'\n",
    ) + "\nconfig flowlog 'flowlog'\n\toption idle_timeout '1'\n";
    let _ = std::fs::write(&path, text);
    let run = lab.spawn_cage_run();
    let router = lab.ns(Node::Router);
    let isolated = |port: &str| {
        ip(&router, &["-d", "-j", "link", "show", port])
            .map(|o| o.contains("\"isolated\":true"))
            .unwrap_or(false)
    };
    let start = std::time::Instant::now();
    while !(run.log().contains("policy applied")
        && isolated("cage1")
        && isolated("cage2")
        && isolated(&extra_port))
    {
        if start.elapsed() > Duration::from_secs(120) {
            row(
                section,
                "cage run adopts the segment",
                false,
                "-",
                format!("after 120 s: {}", run.log()),
            );
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let ready = lab
        .wait_segment_ready()
        .and_then(|()| lab.pin_router_neighbours(Node::Ai1));
    let log = run.log();
    let made = log.contains("created bridge") || log.contains("added address");
    row(
        section,
        "cage run (OpenWrt mode) adopted br-cage and isolated every port",
        ready.is_ok() && !made,
        format!("cage1, cage2, {extra_port}"),
        match ready {
            Ok(()) if !made => "it created no bridge and added no address of its own".to_owned(),
            Ok(()) => format!("cage made the segment itself: {log}"),
            Err(e) => e.to_string(),
        },
    );
    Some((lab, run))
}

/// A probe from `from` to an address in `to`, judged by a witness there, with echo
/// servers answering.
fn judge(from: &NetNs, to: &NetNs, probe: &Probe) -> Result<Verdict, String> {
    let servers = Servers::start(
        to,
        &[
            Service::tcp(22),
            Service::tcp(443),
            Service::udp(53),
            Service::tcp(53),
        ],
        Duration::from_secs(60),
    )
    .map_err(|e| e.to_string())?;
    let w = Witness::start(
        to,
        WitnessLimits {
            max_duration: Duration::from_secs(60),
            max_records: 10_000,
        },
    )
    .map_err(|e| e.to_string())?;
    let v = w
        .observe(from, probe)
        .map(|o| o.verdict)
        .map_err(|e| e.to_string());
    drop(w);
    drop(servers);
    v
}

/// Probes from a caged host behind a VLAN; one row for all of them.
fn probes_from(section: &str, lab: &Lab, h: &VlanHost, extra: &[(&str, NetNs, IpAddr)]) {
    let from = h.ns.clone();
    let t = Duration::from_secs(1);
    let mut cases: Vec<(String, NetNs, Probe, bool)> = vec![
        (
            "internet TCP 443".into(),
            lab.netns(Node::Inet),
            Probe::tcp(PUBLIC4, 443),
            true,
        ),
        (
            "internet UDP 53".into(),
            lab.netns(Node::Inet),
            Probe::udp(PUBLIC4, 53),
            true,
        ),
        (
            "internet ICMP".into(),
            lab.netns(Node::Inet),
            Probe::icmp(PUBLIC4),
            true,
        ),
        (
            "router DNS".into(),
            lab.netns(Node::Router),
            Probe::udp(ROUTER_SEG4, 53),
            true,
        ),
        (
            "router SSH".into(),
            lab.netns(Node::Router),
            Probe::tcp(ROUTER_SEG4, 22),
            false,
        ),
        (
            "router LAN address".into(),
            lab.netns(Node::Router),
            Probe::tcp(ROUTER_LAN4, 22),
            false,
        ),
        (
            "LAN host".into(),
            lab.netns(Node::Lan),
            Probe::tcp(LAN_HOST4, 22),
            false,
        ),
        (
            "LAN host ICMP".into(),
            lab.netns(Node::Lan),
            Probe::icmp(LAN_HOST4),
            false,
        ),
        (
            "caged ai1".into(),
            lab.netns(Node::Ai1),
            Probe::udp(AI1_4, 53),
            false,
        ),
    ];
    for (name, ns, dst) in extra {
        cases.push((name.to_string(), ns.clone(), Probe::tcp(*dst, 22), false));
    }
    let mut bad = Vec::new();
    let (mut allows, mut denies) = (0, 0);
    for (name, to, p, allow) in cases {
        let p = p.from(h.addr4).timeout(t);
        let want = if allow {
            Verdict::Delivered
        } else {
            Verdict::Blocked
        };
        match judge(&from, &to, &p) {
            Ok(v) if v == want => {
                if allow {
                    allows += 1;
                } else {
                    denies += 1;
                }
            }
            Ok(v) => bad.push(format!("{name}: {v}, expected {want}")),
            Err(e) => bad.push(format!("{name}: {e}")),
        }
    }
    row(
        section,
        "caged host behind the VLAN: allows delivered, denies blocked",
        bad.is_empty(),
        format!("{allows} allows, {denies} denies"),
        if bad.is_empty() {
            "internet, router DNS; not router SSH, router LAN address, LAN host(s), other caged host".to_owned()
        } else {
            bad.join("; ")
        },
    );
}

/// An IPv4/UDP frame with `tags` (TPID, VID) outermost first.
fn frame(
    dst: [u8; 6],
    src: [u8; 6],
    tags: &[(u16, u16)],
    from: Ipv4Addr,
    to: Ipv4Addr,
    dport: u16,
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    for (tpid, vid) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let payload = b"cage vlan hop test";
    let udp_len = 8 + payload.len() as u16;
    let total = 20 + udp_len;
    let mut iph = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0];
    iph[2..4].copy_from_slice(&total.to_be_bytes());
    iph.extend_from_slice(&from.octets());
    iph.extend_from_slice(&to.octets());
    let mut sum = 0u32;
    for w in iph.chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let ck = !(sum as u16);
    iph[10..12].copy_from_slice(&ck.to_be_bytes());
    f.extend_from_slice(&iph);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    while f.len() < 60 {
        f.push(0);
    }
    f
}

/// Send raw frames out of `dev` in `ns` (a packet socket: the frames as they are).
fn inject(ns: &NetNs, dev: &'static str, frames: Vec<Vec<u8>>) -> Result<(), String> {
    ns.run("inject", move || {
        // SAFETY: plain socket calls on a descriptor this closure owns.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        let name = std::ffi::CString::new(dev).expect("no NUL");
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        for f in &frames {
            // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = index as i32;
            sll.sll_halen = 6;
            sll.sll_addr[..6].copy_from_slice(&f[..6]);
            // SAFETY: sendto with the frame and the sockaddr_ll above.
            let n = unsafe {
                libc::sendto(
                    fd,
                    f.as_ptr() as *const libc::c_void,
                    f.len(),
                    0,
                    &sll as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert!(
                n == f.len() as isize,
                "sendto: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
        Ok(())
    })
    .map_err(|e| e.to_string())
}

/// The hop attempts from a caged port: each variant aimed at the LAN host and at the
/// router's LAN address; (variant, destination port) for the witnesses.
struct Hop {
    label: String,
    frame: Vec<u8>,
    dport: u16,
}

fn hops(
    src_mac: [u8; 6],
    src_ip: Ipv4Addr,
    lan_mac: [u8; 6],
    router_lan_mac: [u8; 6],
    lan_vid: u16,
    seg_vid: Option<u16>,
) -> Vec<Hop> {
    let mut variants: Vec<(String, Vec<(u16, u16)>)> = vec![
        (
            format!("tagged {lan_vid} (the LAN's VLAN)"),
            vec![(TPID_8021Q, lan_vid)],
        ),
        (format!("802.1ad {lan_vid}"), vec![(TPID_8021AD, lan_vid)]),
        (
            format!("802.1ad {lan_vid} + 802.1Q {lan_vid}"),
            vec![(TPID_8021AD, lan_vid), (TPID_8021Q, lan_vid)],
        ),
    ];
    if let Some(s) = seg_vid {
        variants.push((
            format!("double-tagged {s}/{lan_vid}"),
            vec![(TPID_8021Q, s), (TPID_8021Q, lan_vid)],
        ));
        variants.push((
            format!("double-tagged {lan_vid}/{s}"),
            vec![(TPID_8021Q, lan_vid), (TPID_8021Q, s)],
        ));
    } else {
        variants.push((
            format!("double-tagged {lan_vid}/{lan_vid}"),
            vec![(TPID_8021Q, lan_vid), (TPID_8021Q, lan_vid)],
        ));
    }
    let lan4 = match LAN_HOST4 {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => unreachable!(),
    };
    let router4 = match ROUTER_LAN4 {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => unreachable!(),
    };
    let mut out = Vec::new();
    let mut port = 41000;
    for (label, tags) in variants {
        for (to_mac, to_ip, who) in [
            (lan_mac, lan4, "LAN host"),
            (router_lan_mac, router4, "router"),
            ([0xff; 6], lan4, "broadcast"),
        ] {
            out.push(Hop {
                label: format!("{label} -> {who}"),
                frame: frame(to_mac, src_mac, &tags, src_ip, to_ip, port),
                dport: port,
            });
            port += 1;
        }
    }
    out
}

/// Send the hops from `dev` in `from` and see what the LAN host and the router got; one
/// row. `control` is one frame that must arrive (at the router), sent the same way.
fn hop_row(
    section: &str,
    lab: &Lab,
    from: &NetNs,
    dev: &'static str,
    hops: Vec<Hop>,
    control: Vec<u8>,
    control_port: u16,
) {
    let limits = WitnessLimits {
        max_duration: Duration::from_secs(60),
        max_records: 10_000,
    };
    let (w_lan, w_router) = match (
        Witness::start(&lab.netns(Node::Lan), limits),
        Witness::start(&lab.netns(Node::Router), limits),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        _ => {
            row(
                section,
                "VLAN hopping",
                false,
                "-",
                "cannot start the witnesses",
            );
            return;
        }
    };
    let n = hops.len();
    let mut frames: Vec<Vec<u8>> = hops.iter().map(|h| h.frame.clone()).collect();
    frames.push(control);
    // Three times each, in case one is lost for another reason.
    let all: Vec<Vec<u8>> = frames
        .iter()
        .cycle()
        .take(frames.len() * 3)
        .cloned()
        .collect();
    let sent = inject(from, dev, all);
    std::thread::sleep(Duration::from_millis(1500));
    let now = std::time::Instant::now();
    let _ = w_lan.wait_drained(now, Duration::from_secs(3));
    let _ = w_router.wait_drained(now, Duration::from_secs(3));
    let seen: Vec<u16> = w_lan
        .records()
        .into_iter()
        .chain(w_router.records())
        .filter(|r| r.src_port == 40000)
        .map(|r| r.dst_port)
        .collect();
    let through: Vec<&str> = hops
        .iter()
        .filter(|h| seen.contains(&h.dport))
        .map(|h| h.label.as_str())
        .collect();
    let control_arrived = seen.contains(&control_port);
    let ok = sent.is_ok() && through.is_empty() && control_arrived;
    row(
        section,
        "VLAN hopping from a caged port: LAN-VLAN-tagged and double-tagged frames",
        ok,
        format!("{} of {n} kinds through", through.len()),
        if ok {
            format!(
                "{n} frame kinds (3 each) at the LAN host, the router's LAN address and broadcast: none reached the LAN host or the router; the control frame (untagged, to the router's DNS) did: {}",
                hops.iter().map(|h| h.label.clone()).collect::<Vec<_>>().join(", ")
            )
        } else {
            format!("through: {through:?}; control arrived: {control_arrived}; sent: {sent:?}")
        },
    );
    let _ = w_lan.stop();
    let _ = w_router.stop();
}

/// The trunk: `lan2` in `br-lan` (the LAN untagged), `lan2.10` in `br-cage`; a managed
/// switch behind it.
fn trunk() {
    let section = "VLAN trunk (8021q)";
    let holder: std::cell::RefCell<Vec<NetNsGuard>> = Default::default();
    let built = openwrt_lab(section, &|lab: &Lab| {
        let router = lab.ns(Node::Router);
        let prefix = lab.prefix().to_owned();
        let sw = NetNsGuard::named(format!("{prefix}-sw")).map_err(|e| e.to_string())?;
        let swn = sw.name().to_owned();
        holder.borrow_mut().push(sw);
        ip(
            &router,
            &[
                "link", "add", "lan2", "type", "veth", "peer", "name", "trunk", "netns", &swn,
            ],
        )?;
        ip(&router, &["link", "set", "lan2", "master", "br-lan"])?;
        ip(&router, &["link", "set", "lan2", "up"])?;
        ip(
            &router,
            &[
                "link", "add", "link", "lan2", "name", "lan2.10", "type", "vlan", "id", "10",
            ],
        )?;
        ip(&router, &["link", "set", "lan2.10", "master", "br-cage"])?;
        ip(&router, &["link", "set", "lan2.10", "up"])?;
        // The switch: VLAN 1 untagged and VLAN 10 tagged on the trunk, an access port
        // of each.
        ip(&swn, &["link", "set", "lo", "up"])?;
        ip(
            &swn,
            &[
                "link",
                "add",
                "swbr",
                "type",
                "bridge",
                "vlan_filtering",
                "1",
                "mcast_snooping",
                "0",
            ],
        )?;
        let ai3 = caged_host(
            &prefix,
            "ai3",
            &swn,
            "p10",
            "192.168.10.13/24",
            "fd00:cafe:10::13/64",
        )?;
        holder.borrow_mut().push(ai3);
        let lan3 = host(
            &prefix,
            "lan3",
            &swn,
            "p1",
            &[
                &["addr", "add", "192.168.8.30/24", "dev", "eth0"],
                &["route", "add", "default", "via", "192.168.8.1"],
            ],
        )?;
        holder.borrow_mut().push(lan3);
        for p in ["trunk", "p10", "p1"] {
            ip(&swn, &["link", "set", p, "master", "swbr"])?;
            ip(&swn, &["link", "set", p, "up"])?;
        }
        ip(&swn, &["link", "set", "swbr", "up"])?;
        bridge(&swn, &["vlan", "add", "dev", "trunk", "vid", "10"])?;
        bridge(&swn, &["vlan", "del", "dev", "p10", "vid", "1"])?;
        bridge(
            &swn,
            &["vlan", "add", "dev", "p10", "vid", "10", "pvid", "untagged"],
        )?;
        Ok("lan2.10".into())
    });
    let guards = holder.into_inner();
    let Some((lab, run)) = built else { return };
    let ai3 = VlanHost {
        ns: guards[1].netns().clone(),
        addr4: IpAddr::V4(Ipv4Addr::new(192, 168, 10, 13)),
        name: guards[1].name().to_owned(),
    };
    let lan3_ns = guards[2].netns().clone();
    let lan3_addr = IpAddr::V4(Ipv4Addr::new(192, 168, 8, 30));
    probes_from(
        section,
        &lab,
        &ai3,
        &[("LAN host behind the switch", lan3_ns.clone(), lan3_addr)],
    );

    // The LAN behind the trunk still works (untagged).
    let lan_ok = judge(
        &lan3_ns,
        &lab.netns(Node::Inet),
        &Probe::tcp(PUBLIC4, 443)
            .from(lan3_addr)
            .timeout(Duration::from_secs(1)),
    );
    row(
        section,
        "LAN host behind the trunk (VLAN 1, untagged) reaches the internet",
        matches!(lan_ok, Ok(Verdict::Delivered)),
        match &lan_ok {
            Ok(v) => v.to_string(),
            Err(e) => e.clone(),
        },
        "the trunk's untagged part is br-lan's",
    );
    flow_row(section, &lab, &ai3);

    // Hops from the router's own caged port (cage1) and from behind the switch.
    hops_from(
        section,
        "cage1",
        &lab,
        &lab.netns(Node::Ai1),
        &lab.ns(Node::Ai1),
        AI1_4,
        Some(10),
    );
    hops_from(
        section,
        "behind the switch",
        &lab,
        &ai3.ns,
        &ai3.name,
        ai3.addr4,
        Some(10),
    );
    drop(run);
    drop(lab);
    drop(guards);
}

/// Read the MACs, make the hops and the control frame, send, one row.
fn hops_from(
    section: &str,
    port: &str,
    lab: &Lab,
    from: &NetNs,
    from_name: &str,
    from_addr: IpAddr,
    seg_vid: Option<u16>,
) {
    let macs = (
        mac(from_name, "eth0"),
        mac(&lab.ns(Node::Lan), "eth0"),
        mac(&lab.ns(Node::Router), "br-lan"),
        mac(&lab.ns(Node::Router), "br-cage"),
    );
    let (Ok(src_mac), Ok(lan_mac), Ok(brlan_mac), Ok(brcage_mac)) = macs else {
        row(
            section,
            "VLAN hopping",
            false,
            "-",
            format!("cannot read the MAC addresses: {macs:?}"),
        );
        return;
    };
    let IpAddr::V4(src) = from_addr else { return };
    let seg4 = Ipv4Addr::new(192, 168, 10, 1);
    hop_row(
        &format!("{section}, from {port}"),
        lab,
        from,
        "eth0",
        hops(src_mac, src, lan_mac, brlan_mac, 1, seg_vid),
        frame(brcage_mac, src_mac, &[], src, seg4, 53),
        53,
    );
}

/// UDP from a caged host behind a VLAN to the internet: 5 echoed datagrams, one record
/// in the flow log with exact counts and the host's MAC.
fn flow_row(section: &str, lab: &Lab, h: &VlanHost) {
    let servers = Servers::start(
        &lab.netns(Node::Inet),
        &[Service::udp(7010)],
        Duration::from_secs(60),
    );
    let addr = h.addr4;
    let sent = h.ns.run("udp", move || {
        let s = std::net::UdpSocket::bind((addr, 0)).expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let mut echoed = 0u64;
        for i in 0..5u8 {
            let _ = s.send_to(&[i; 100], (PUBLIC4, 7010));
            let mut b = [0u8; 200];
            if s.recv_from(&mut b).is_ok() {
                echoed += 1;
            }
        }
        Ok((s.local_addr().expect("addr").port(), echoed))
    });
    drop(servers);
    let mac = mac(&h.name, "eth0")
        .map(|m| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        })
        .unwrap_or_default();
    let Ok((port, echoed)) = sent else {
        row(
            section,
            "flow from behind the VLAN counted exactly",
            false,
            "-",
            format!("{sent:?}"),
        );
        return;
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let rec = loop {
        let out = lab.cage(&["flows", "--json", "-n", "0", "--verdict", "allowed"]);
        let found: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| {
                r["host"] == addr.to_string() && r["host_port"] == port && r["proto"] == "udp"
            })
            .collect();
        if !found.is_empty() || std::time::Instant::now() > deadline {
            break found;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let want = (5u64, 640u64, echoed, echoed * 128);
    let got: Vec<(u64, u64, u64, u64)> = rec
        .iter()
        .map(|r| {
            let n = |f: &str| r[f].as_u64().unwrap_or(u64::MAX);
            (
                n("packets_out"),
                n("bytes_out"),
                n("packets_in"),
                n("bytes_in"),
            )
        })
        .collect();
    let ok = echoed == 5 && got == [want] && rec[0]["mac"] == mac;
    row(
        section,
        "flow from behind the VLAN counted exactly, with the host's MAC",
        ok,
        format!("{} pkts/{} B out, {}/{} in", want.0, want.1, want.2, want.3),
        format!(
            "records {got:?}, mac {} (host's {mac})",
            rec.first()
                .map(|r| r["mac"].to_string())
                .unwrap_or_default()
        ),
    );
}

/// The DSA way: `br-lan` filters VLANs (VLAN 1 untagged on its ports and itself, the
/// LAN), its port `lan5` is an access port of VLAN 10 only, and the segment gets VLAN 10
/// as `br-lan.10`, a port of `br-cage`.
fn dsa() {
    let section = "DSA bridge, VLAN 10";
    let holder: std::cell::RefCell<Vec<NetNsGuard>> = Default::default();
    let built = openwrt_lab(section, &|lab: &Lab| {
        let router = lab.ns(Node::Router);
        let prefix = lab.prefix().to_owned();
        ip(
            &router,
            &[
                "link",
                "set",
                "br-lan",
                "type",
                "bridge",
                "vlan_filtering",
                "1",
            ],
        )?;
        let ai4 = caged_host(
            &prefix,
            "ai4",
            &router,
            "lan5",
            "192.168.10.14/24",
            "fd00:cafe:10::14/64",
        )?;
        holder.borrow_mut().push(ai4);
        ip(&router, &["link", "set", "lan5", "master", "br-lan"])?;
        ip(&router, &["link", "set", "lan5", "up"])?;
        bridge(&router, &["vlan", "del", "dev", "lan5", "vid", "1"])?;
        bridge(
            &router,
            &[
                "vlan", "add", "dev", "lan5", "vid", "10", "pvid", "untagged",
            ],
        )?;
        bridge(
            &router,
            &["vlan", "add", "dev", "br-lan", "vid", "10", "self"],
        )?;
        ip(
            &router,
            &[
                "link",
                "add",
                "link",
                "br-lan",
                "name",
                "br-lan.10",
                "type",
                "vlan",
                "id",
                "10",
            ],
        )?;
        ip(&router, &["link", "set", "br-lan.10", "master", "br-cage"])?;
        ip(&router, &["link", "set", "br-lan.10", "up"])?;
        Ok("br-lan.10".into())
    });
    let guards = holder.into_inner();
    let Some((lab, run)) = built else { return };
    let ai4 = VlanHost {
        ns: guards[0].netns().clone(),
        addr4: IpAddr::V4(Ipv4Addr::new(192, 168, 10, 14)),
        name: guards[0].name().to_owned(),
    };
    // The LAN on the filtering bridge still works.
    let lan_ok = judge(
        &lab.netns(Node::Lan),
        &lab.netns(Node::Router),
        &Probe::tcp(ROUTER_LAN4, 22)
            .from(LAN_HOST4)
            .timeout(Duration::from_secs(1)),
    );
    row(
        section,
        "LAN host (VLAN 1 of the filtering br-lan) reaches the router",
        matches!(lan_ok, Ok(Verdict::Delivered)),
        match &lan_ok {
            Ok(v) => v.to_string(),
            Err(e) => e.clone(),
        },
        "br-lan with vlan_filtering 1, VLAN 1 pvid untagged",
    );
    probes_from(section, &lab, &ai4, &[]);
    flow_row(section, &lab, &ai4);

    // From the VLAN-10 access port: tagged with the LAN's VLAN, double-tagged.
    hops_from(
        section,
        "lan5 (access port, VLAN 10)",
        &lab,
        &ai4.ns,
        &ai4.name,
        ai4.addr4,
        Some(10),
    );
    hops_from(
        section,
        "cage1",
        &lab,
        &lab.netns(Node::Ai1),
        &lab.ns(Node::Ai1),
        AI1_4,
        None,
    );

    // The baseline: were lan5 a member of VLAN 1, a frame tagged 1 would reach the LAN
    // host, so the denial above is the bridge's VLAN filter.
    let router = lab.ns(Node::Router);
    let baseline = bridge(&router, &["vlan", "add", "dev", "lan5", "vid", "1"]).and_then(|()| {
        let macs = (mac(&ai4.name, "eth0"), mac(&lab.ns(Node::Lan), "eth0"));
        let (Ok(src_mac), Ok(lan_mac)) = macs else {
            return Err("MACs".to_owned());
        };
        let IpAddr::V4(src) = ai4.addr4 else {
            unreachable!()
        };
        let IpAddr::V4(lan4) = LAN_HOST4 else {
            unreachable!()
        };
        let w = Witness::start(
            &lab.netns(Node::Lan),
            WitnessLimits {
                max_duration: Duration::from_secs(30),
                max_records: 1000,
            },
        )
        .map_err(|e| e.to_string())?;
        inject(
            &ai4.ns,
            "eth0",
            vec![frame(lan_mac, src_mac, &[(TPID_8021Q, 1)], src, lan4, 42999); 3],
        )?;
        std::thread::sleep(Duration::from_millis(1000));
        let _ = w.wait_drained(std::time::Instant::now(), Duration::from_secs(3));
        let arrived = w.records().iter().any(|r| r.dst_port == 42999);
        let _ = bridge(&router, &["vlan", "del", "dev", "lan5", "vid", "1"]);
        Ok(arrived)
    });
    row(
        section,
        "baseline: with lan5 in VLAN 1 the tagged frame does reach the LAN host",
        baseline == Ok(true),
        format!("{baseline:?}"),
        "so the frames above were real VLAN-1 frames, stopped by the bridge's VLAN filter",
    );
    drop(run);
    drop(lab);
    drop(guards);
}
