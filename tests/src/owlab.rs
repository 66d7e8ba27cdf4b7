//! The lab's router running OpenWrt's own userspace: ubusd, netifd and fw4, built from
//! `../shared/openwrt` (see `cage_tests::openwrt`), in place of the plain lab's
//! hand-made bridges, addresses and stand-in firewall table.
//!
//! ```text
//!   board root (openwrt::Root: base-files, board_detect, config_generate)
//!     + the package's files, the lab's addresses set with uci, 90-cage run with uci
//!   {p}-router: netns + a mount namespace of its own, chrooted into the root
//!     /proc, /sys (of the router's netns), a minimal /dev; /var -> /tmp as on OpenWrt
//!     ubusd, netifd (from /etc/config/network), fw4 (from /etc/config/firewall and
//!     netifd's interface state over ubus), hotplug-call -> 20-firewall -> fw4 reload
//!   ports as the board names them (GL-MT6000: eth1 WAN, lan1..lan5), veths whose
//!   other ends the lab plugs into its hosts; Wi-Fi access points as veths that a
//!   stand-in wireless driver reports to netifd (see below)
//! ```
//!
//! [`OwLab::up`] makes the board's root, puts OpenWrt's software and the package's files
//! in it, makes the router's namespaces and ports, runs `/etc/uci-defaults/90-cage` there
//! (so it sees the ports in `/sys/class/net` as on first boot), reads what it declared,
//! plugs the lab's hosts into the ports it gave the segment and the LAN, and starts
//! ubusd. [`OwLab::boot_network`] then does what the boot order does after Cage
//! (`START=18`): the firewall (19, `fw4 start`), then the network (20, netifd), and waits
//! until netifd reports the interfaces up and fw4 has reloaded with their devices (via
//! netifd's hotplug events, as on a router).
//!
//! [`OwLab::boot_procd`] instead reboots the router into OpenWrt's own init: procd as
//! PID 1 of a PID and mount namespace, which starts ubusd and runs the enabled init
//! scripts (the package's `cage`, the firewall, the network) as procd services.
//!
//! What is not OpenWrt's own here, and why:
//! - The router's addresses: the board's defaults are changed with the real `uci` to
//!   the lab's (the contract's): LAN 192.168.8.1/24 (GL.iNet's stock LAN; OpenWrt's
//!   default is 192.168.1.1) and fd00:8::1/64 (instead of a delegated ULA prefix), and a
//!   static WAN 10.99.0.2/24 + 2001:db8:99::2/64 via the hotel's gateway (OpenWrt's
//!   default is DHCP; the lab's hotel runs no DHCP server). The segment's addresses are
//!   what 90-cage takes from the package's `/etc/config/cage` (192.168.10.1/24,
//!   fd00:cafe:10::1/64), checked, not set.
//! - Wi-Fi: no radio exists here, so `mac80211.sh` (which drives hostapd) is replaced
//!   by a stand-in driver script that reports one lab veth per configured access point
//!   to netifd with `wireless_add_vif` (netifd-wireless.sh, netifd's own). netifd then
//!   does what it does for real Wi-Fi: puts the interface into the bridge of the
//!   wifi-iface's `network` and applies its `isolate` setting. The radio itself is the
//!   fixture's [`Root::add_radio`] (OpenWrt's detection needs the hardware).
//! - The programs are the host's builds (glibc) of OpenWrt's sources; `nft` is
//!   Debian's, and `flock` util-linux's (OpenWrt's busybox has the applet, Debian's
//!   busybox-static does not). `/lib/config/uci.sh` is the lab's stand-in (see
//!   `tests/standins/uci.sh`, put in by `openwrt::Root`). `jsonfilter` is not in the
//!   snapshot: `20-firewall` only needs it for interfaces without a zone; the dnsmasq
//!   test puts the lab's stand-in in ([`OwLab::install_dnsmasq`]).
//! - OpenWrt's `/etc/init.d/sysctl` is not run (it sets machine-wide values such as
//!   `kernel.panic`); the per-namespace `net.ipv4.conf.*`, `net.ipv4.ip_forward` and
//!   `net.ipv6.conf.*` lines of base-files' `/etc/sysctl.d/10-default.conf` are applied.
//! - 802.1Q devices (`eth1.10`, swconfig's `eth0.1`) cannot be made on this kernel, so a
//!   port 90-cage puts in the segment as a VLAN is reported, loudly, and not wired.
//!
//! Dropping the [`OwLab`] stops the router's processes (by pid, all of them in its
//! namespace), removes the namespaces, then the root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::contract::{Check, Expect};
use crate::lab::{self, run_command, Cable, CageRun, Lab, Node, Wiring};
use crate::openwrt::{Board, Root, Tools};
use cage_agent::probe::Verdict;

/// Which firewall4: the one OpenWrt 23.05.4 pins, or firewall4's newest commit (what
/// OpenWrt 24.10 and GL.iNet's op24 firmware are closer to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fw4 {
    Release2305,
    Main,
}

impl Fw4 {
    pub const ALL: [Fw4; 2] = [Fw4::Release2305, Fw4::Main];

    /// The name `Tools::firewall4` takes.
    pub fn version(self) -> &'static str {
        match self {
            Fw4::Release2305 => "23.05",
            Fw4::Main => "main",
        }
    }
}

impl std::fmt::Display for Fw4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "firewall4 {}", self.version())
    }
}

/// How a host reaches a network of the router: a wired port, or an access point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attachment {
    /// A port of the board (`lan3`, `eth1`).
    Port(String),
    /// An access point of `/etc/config/wireless`: its section, SSID and the interface
    /// the lab gives it (`phy0-ap1`).
    Wifi {
        section: String,
        ssid: String,
        ifname: String,
    },
}

impl Attachment {
    /// The router's interface for it.
    pub fn ifname(&self) -> &str {
        match self {
            Attachment::Port(p) => p,
            Attachment::Wifi { ifname, .. } => ifname,
        }
    }
}

impl std::fmt::Display for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attachment::Port(p) => write!(f, "port {p}"),
            Attachment::Wifi { ssid, ifname, .. } => write!(f, "Wi-Fi '{ssid}' ({ifname})"),
        }
    }
}

/// What the board's configuration gives each network after 90-cage, and where the lab
/// plugged its hosts in.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The WAN device (`network.wan.device`).
    pub wan: String,
    /// The segment's bridge (`cage.ai.bridge`) and what feeds it.
    pub bridge: String,
    pub segment: Vec<Attachment>,
    /// Segment ports this kernel cannot make (802.1Q VLANs), not wired.
    pub segment_unmade: Vec<String>,
    /// What feeds `br-lan`.
    pub lan: Vec<Attachment>,
    /// Where ai1, ai2 and the LAN host are plugged in.
    pub ai1: Attachment,
    pub ai2: Attachment,
    pub lan_host: Attachment,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[Attachment]| {
            v.iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(f, "WAN: {}", self.wan)?;
        write!(f, "segment {}: {}", self.bridge, list(&self.segment))?;
        if !self.segment_unmade.is_empty() {
            write!(
                f,
                " (not made on this kernel, no 802.1Q: {})",
                self.segment_unmade.join(", ")
            )?;
        }
        writeln!(f)?;
        writeln!(f, "br-lan: {}", list(&self.lan))?;
        write!(
            f,
            "ai1 on {}, ai2 on {}, the LAN host on {}",
            self.ai1, self.ai2, self.lan_host
        )
    }
}

/// The web page's port in the package's configuration (`web_listen 'lan:2243'`).
pub const WEB_PORT: u16 = 2243;

/// How long netifd may take to bring the interfaces up, and fw4 to reload with them.
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one command in the router may take.
const ROUTER_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// The PATH of OpenWrt's shell.
const OPENWRT_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// The lab with its router running OpenWrt's own userspace; dropping it tears it all
/// down.
pub struct OwLab {
    // Dropped in this order: the daemons (ours, by pid), the lab (every process left in
    // its namespaces, then the namespaces), then the root.
    daemons: std::sync::Mutex<BTreeMap<&'static str, Child>>,
    holder: Option<Child>,
    /// procd's pid (as the test sees it) once the router runs it as init.
    procd_pid: Option<u32>,
    lab: Lab,
    root: Root,
    layout: Layout,
    fw4: Fw4,
    board: Board,
}

impl OwLab {
    /// Make the board's root and the lab around it, run 90-cage in the router and plug
    /// the hosts in where it put the segment and the LAN, and start ubusd. Panics, saying
    /// why, when something cannot be made: the tests that use it must fail then.
    pub fn up(board: Board, fw4: Fw4) -> OwLab {
        crate::require_root();
        let root = Root::new(board).unwrap_or_else(|e| panic!("{}: {e}", board.label()));
        // A radio, on (GL.iNet ships it on): 90-cage adds the Cage-AI SSID to it, and the
        // owner's own SSID stays on the LAN.
        root.add_radio(true);
        install_openwrt(&root, fw4);
        let lab = Lab::namespaces(&lab::unique_prefix()).expect("the lab's namespaces");
        let mut ow = OwLab {
            daemons: std::sync::Mutex::new(BTreeMap::new()),
            holder: None,
            procd_pid: None,
            lab,
            root,
            layout: Layout {
                wan: String::new(),
                bridge: String::new(),
                segment: vec![],
                segment_unmade: vec![],
                lan: vec![],
                ai1: Attachment::Port(String::new()),
                ai2: Attachment::Port(String::new()),
                lan_host: Attachment::Port(String::new()),
            },
            fw4,
            board,
        };
        ow.lab_addresses();
        let ports = ow.board_ports();
        let router = ow.lab.ns(Node::Router);
        let mut parked = BTreeMap::new();
        let mut batch = vec!["link set lo up".to_owned()];
        for (i, port) in ports.iter().enumerate() {
            let peer = format!("pk{i}");
            batch.push(format!("link add {port} type veth peer name {peer}"));
            parked.insert(port.clone(), peer);
        }
        ip_batch(&router, &batch);
        ow.start_holder();
        ow.sh_ok("cage --version >/dev/null");
        // First boot's uci-defaults, as OpenWrt runs them: in the router, with its ports.
        crate::assert_success(&ow.sh("cd /etc/uci-defaults && sh ./90-cage"), "90-cage");
        let layout = ow.read_layout(&ports);
        // The access points' interfaces, as the Wi-Fi driver would make them.
        let mut batch = vec![];
        for (i, a) in layout.segment.iter().chain(&layout.lan).enumerate() {
            if let Attachment::Wifi { ifname, .. } = a {
                let peer = format!("pw{i}");
                batch.push(format!("link add {ifname} type veth peer name {peer}"));
                parked.insert(ifname.clone(), peer);
            }
        }
        if !batch.is_empty() {
            ip_batch(&router, &batch);
        }
        ow.write_wifi_driver(&layout);
        let cable = |a: &Attachment| Cable {
            router_end: a.ifname().to_owned(),
            parked_end: parked[a.ifname()].clone(),
        };
        let wiring = Wiring {
            ai1: cable(&layout.ai1),
            ai2: cable(&layout.ai2),
            lan: cable(&layout.lan_host),
            wan: Cable {
                router_end: layout.wan.clone(),
                parked_end: parked[&layout.wan].clone(),
            },
        };
        ow.lab
            .build_prewired(&wiring)
            .unwrap_or_else(|e| panic!("plugging the lab's hosts in: {e}"));
        // The other ports stay unplugged (no carrier): their other ends go to the LAN
        // host's namespace, down, out of the router's way.
        let plugged = [&wiring.ai1, &wiring.ai2, &wiring.lan, &wiring.wan];
        let lan_ns = ow.lab.ns(Node::Lan);
        let spare: Vec<String> = parked
            .values()
            .filter(|p| !plugged.iter().any(|c| &c.parked_end == *p))
            .map(|p| format!("link set {p} netns {lan_ns}"))
            .collect();
        if !spare.is_empty() {
            ip_batch(&router, &spare);
        }
        // The LAN's IPv6 prefix is routed to the router by the hotel, as an upstream that
        // delegated it would: OpenWrt routes the LAN's IPv6 and does not masquerade it
        // (fw4's masq6 is off). The plain lab's stand-in firewall masquerades it instead.
        ow.lab
            .ip(
                Node::Up,
                &["-6", "route", "add", "fd00:8::/64", "via", "2001:db8:99::2"],
            )
            .unwrap_or_else(|e| panic!("{e}"));
        ow.layout = layout;
        ow.apply_sysctl_defaults();
        ow.start_daemon("ubusd", &["/sbin/ubusd"]);
        ow.wait_for("ubusd", Duration::from_secs(10), |ow| {
            ow.sh("ubus list").status.success()
        });
        ow
    }

    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn fw4(&self) -> Fw4 {
        self.fw4
    }

    pub fn board(&self) -> Board {
        self.board
    }

    /// Write the lab's Cage configuration ([`Lab::base_config`] and `extra`) for this
    /// router: OpenWrt mode (netifd makes the segment, Cage adopts it), the segment's
    /// ports as 90-cage gave them, the board's WAN device, and the web page where the
    /// package puts it: on the LAN's addresses as netifd gives them, port [`WEB_PORT`].
    pub fn write_cage_config(&self, extra: &str) -> PathBuf {
        let path = self.lab.write_config(extra);
        let ports: String = self
            .layout
            .segment
            .iter()
            .map(|a| format!("\tlist port '{}'\n", a.ifname()))
            .collect();
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace(
                "config cage 'main'\n",
                "config cage 'main'\n\toption mode 'openwrt'\n",
            )
            .replace("\tlist port 'cage1'\n\tlist port 'cage2'\n", &ports)
            .replace(
                "\tlist device 'wan'\n",
                &format!("\tlist device '{}'\n", self.layout.wan),
            )
            .replace(
                &format!("\toption web_listen '192.168.8.1:{}'\n", lab::WEB_PORT),
                &format!("\toption web_listen 'lan:{WEB_PORT}'\n"),
            );
        assert!(
            text.contains(&ports)
                && text.contains("option mode 'openwrt'")
                && text.contains(&format!("web_listen 'lan:{WEB_PORT}'")),
            "the lab's base configuration changed shape:\n{text}"
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The lab's Cage configuration ([`OwLab::write_cage_config`]) as the router's own
    /// `/etc/config/cage`, with the package's paths inside the root (state in /etc/cage,
    /// logs in /tmp/cage, pins in /sys/fs/bpf/cage): for `cage run` under procd, which
    /// runs it as the init script does, `cage --config /etc/config/cage run`.
    pub fn install_cage_config(&self, extra: &str) -> String {
        let text = std::fs::read_to_string(self.write_cage_config(extra)).unwrap();
        let text: String = text
            .lines()
            .map(|l| {
                let t = l.trim_start();
                if t.starts_with("option state_dir ") {
                    "\toption state_dir '/etc/cage'".to_owned()
                } else if t.starts_with("option log_dir ") {
                    "\toption log_dir '/tmp/cage'".to_owned()
                } else if t.starts_with("option bpf_dir ") {
                    "\toption bpf_dir '/sys/fs/bpf/cage'".to_owned()
                } else {
                    l.to_owned()
                }
            })
            .map(|l| l + "\n")
            .collect();
        install_text(&self.root, "etc/config/cage", &text, 0o644);
        text
    }

    /// Boot the router as OpenWrt does with the package installed: `cage run` first
    /// (`START=18`: its policy is in the kernel, by the bridge's name, before the bridge
    /// exists), then the firewall and the network ([`OwLab::boot_network`]). Waits until
    /// Cage has isolated every port netifd put in the segment's bridge. The lab's Cage
    /// configuration is [`OwLab::write_cage_config`] with `extra`.
    pub fn boot_with_cage(&self, extra: &str) -> CageRun {
        self.write_cage_config(extra);
        let run = self.lab.spawn_cage_run();
        run.wait_applied();
        self.boot_network();
        self.wait_for(
            "Cage to isolate every port of the segment",
            BOOT_TIMEOUT,
            |ow| ow.segment_ports_isolated(),
        );
        run
    }

    /// Every attachment of the segment is a port of its bridge, with bridge port
    /// isolation on.
    pub fn segment_ports_isolated(&self) -> bool {
        self.layout.segment.iter().all(|a| {
            self.lab
                .ip(Node::Router, &["-d", "-j", "link", "show", a.ifname()])
                .map(|out| {
                    out.contains(&format!("\"master\":\"{}\"", self.layout.bridge))
                        && out.contains("\"isolated\":true")
                })
                .unwrap_or(false)
        })
    }

    /// What the boot order does after Cage: the firewall (`fw4 start`, as
    /// `/etc/init.d/firewall`'s start_service), then netifd; then wait (bounded) until
    /// netifd has the LAN, the WAN and the segment up, fw4 has reloaded with their
    /// devices (netifd's ifup hotplug events run `20-firewall`, which runs `fw4 reload`),
    /// and the lab's links carry traffic.
    pub fn boot_network(&self) {
        crate::assert_success(&self.sh("fw4 start"), "fw4 start");
        self.start_netifd();
        self.wait_network_up();
    }

    /// Start netifd (as `/etc/init.d/network` does: `netifd` with its defaults; its log
    /// on stderr, into the lab's directory).
    pub fn start_netifd(&self) {
        self.start_daemon("netifd", &["/sbin/netifd", "-S"]);
    }

    /// netifd's process id, if it runs.
    pub fn netifd_pid(&self) -> Option<u32> {
        let mut daemons = self.daemons.lock().unwrap();
        let child = daemons.get_mut("netifd")?;
        matches!(child.try_wait(), Ok(None)).then(|| child.id())
    }

    /// Stop netifd with `signal` and wait (bounded) until it has exited.
    pub fn stop_netifd(&self, signal: i32) {
        let mut child = self
            .daemons
            .lock()
            .unwrap()
            .remove("netifd")
            .expect("netifd was started");
        // SAFETY: kill(2) on the pid of our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("netifd did not exit within 10 s of signal {signal}");
    }

    /// Wait (bounded) until netifd has the LAN, WAN and segment interfaces up, fw4's
    /// ruleset has each zone's device, and the lab's links carry traffic.
    pub fn wait_network_up(&self) {
        let cage_iface = self.cage_interface();
        self.wait_for(
            "netifd to bring lan, wan and the segment up",
            BOOT_TIMEOUT,
            |ow| {
                ["lan", "wan", cage_iface.as_str()].iter().all(|iface| {
                    let out = ow.sh(&format!("ubus -S call network.interface.{iface} status"));
                    String::from_utf8_lossy(&out.stdout).contains("\"up\":true")
                })
            },
        );
        let wan = self.layout.wan.clone();
        let bridge = self.layout.bridge.clone();
        self.wait_for("fw4 to know every zone's device", BOOT_TIMEOUT, |ow| {
            let input = ow.nft_list("chain inet fw4 input");
            [
                "iifname \"br-lan\" jump input_lan".to_owned(),
                format!("iifname \"{wan}\" jump input_wan"),
                format!("iifname \"{bridge}\" jump input_cage"),
            ]
            .iter()
            .all(|rule| input.contains(rule))
        });
        self.lab
            .wait_ready()
            .unwrap_or_else(|e| panic!("{e}\n{}", self.diagnostics()));
    }

    /// The netifd interface 90-cage made for the segment (`network.cage`).
    pub fn cage_interface(&self) -> String {
        "cage".into()
    }

    /// `nft list WHAT` in the router ("" if it fails).
    pub fn nft_list(&self, what: &str) -> String {
        let mut cmd = self.lab.in_router_netns();
        cmd.arg("nft").arg("list").args(what.split_whitespace());
        match run_command(&mut cmd, None, ROUTER_COMMAND_TIMEOUT) {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
            _ => String::new(),
        }
    }

    /// Run a shell script in the router, as OpenWrt's own shell: chrooted into the
    /// board's root, in the router's network and mount namespaces, with OpenWrt's PATH and
    /// nothing else of the test's environment. At most 30 s.
    pub fn sh(&self, script: &str) -> Output {
        let mut cmd = self.in_router();
        cmd.args(["/bin/sh", "-c", script]);
        run_command(&mut cmd, None, ROUTER_COMMAND_TIMEOUT)
            .unwrap_or_else(|e| panic!("in the router: {e}"))
    }

    /// Like [`OwLab::sh`], panicking with the output unless it succeeds; its stdout.
    pub fn sh_ok(&self, script: &str) -> String {
        let label = self.board.label();
        crate::assert_success(
            &self.sh(script),
            format_args!("in the router ({label}): `{script}`"),
        )
    }

    /// A command line that runs a program of the root in the router.
    fn in_router(&self) -> Command {
        let (target, pid_ns) = match self.procd_pid {
            Some(procd) => (procd, true),
            None => (
                self.holder.as_ref().expect("the router's holder runs").id(),
                false,
            ),
        };
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t").arg(target.to_string());
        if pid_ns {
            cmd.arg("-p");
        }
        cmd.args(["-m", "-n", "-r", "-w", "/usr/bin/env", "-i"])
            .arg(format!("PATH={OPENWRT_PATH}"))
            .arg("HOME=/root");
        cmd
    }

    /// What the daemons logged, the interfaces and the ruleset: for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for name in self.daemons.lock().unwrap().keys() {
            let log = self.lab.dir().join(format!("{name}.log"));
            out.push_str(&format!(
                "--- {name} log:\n{}\n",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        if self.procd_pid.is_some() {
            out.push_str(&format!(
                "--- procd's output:\n{}\n--- syslog:\n{}\n",
                std::fs::read_to_string(self.lab.dir().join("procd.log")).unwrap_or_default(),
                self.syslog()
            ));
        }
        out.push_str(&format!(
            "--- the Wi-Fi stand-in's log:\n{}\n",
            std::fs::read_to_string(self.root.join("tmp/wifi-standin.log")).unwrap_or_default()
        ));
        out.push_str(&format!(
            "--- addresses:\n{}\n",
            self.lab
                .ip(Node::Router, &["-br", "addr"])
                .unwrap_or_else(|e| e.to_string())
        ));
        out.push_str(&format!(
            "--- bridge ports:\n{}\n",
            run_command(
                Command::new("bridge").args(["-n", &self.lab.ns(Node::Router), "link"]),
                None,
                ROUTER_COMMAND_TIMEOUT
            )
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
        ));
        out.push_str(&format!(
            "--- ruleset:\n{}",
            self.lab.nft_ruleset(Node::Router)
        ));
        out
    }

    // ---- building ----

    /// The lab's addresses, set with the real uci (see the module's docs).
    fn lab_addresses(&self) {
        self.root.uci_set(
            "network",
            &[
                ("network.lan.ipaddr", "192.168.8.1"),
                ("network.lan.netmask", "255.255.255.0"),
                ("network.lan.ip6addr", "fd00:8::1/64"),
                ("network.wan.proto", "static"),
                ("network.wan.ipaddr", "10.99.0.2"),
                ("network.wan.netmask", "255.255.255.0"),
                ("network.wan.gateway", "10.99.0.1"),
                ("network.wan.ip6addr", "2001:db8:99::2/64"),
                ("network.wan.ip6gw", "2001:db8:99::1"),
            ],
        );
    }

    /// The board's Ethernet ports: the WAN device and br-lan's ports, as config_generate
    /// wrote them. Panics for a board whose ports are VLANs of a switch (swconfig): this
    /// kernel has no 802.1Q.
    fn board_ports(&self) -> Vec<String> {
        let wan = self
            .root
            .uci_get("network.wan.device")
            .expect("config_generate wrote a WAN device");
        let mut ports = vec![wan];
        ports.extend(self.bridge_ports("br-lan"));
        for p in &ports {
            assert!(
                !p.contains('.'),
                "{}: port {p} is a VLAN (a swconfig switch); this kernel has no 802.1Q \
                 (CONFIG_VLAN_8021Q), so this board cannot be built in the lab",
                self.board.label()
            );
        }
        ports
    }

    /// The ports of the bridge device named `name` in /etc/config/network.
    fn bridge_ports(&self, name: &str) -> Vec<String> {
        let show = uci_show(&self.root, "network");
        let Some(section) = show.iter().find_map(|(k, v)| {
            let s = k.strip_suffix(".name")?;
            (v.first().map(String::as_str) == Some(name)
                && show
                    .iter()
                    .any(|(k2, v2)| *k2 == format!("{s}.type") && v2 == &["bridge"]))
            .then(|| s.to_owned())
        }) else {
            return vec![];
        };
        show.iter()
            .find(|(k, _)| *k == format!("{section}.ports"))
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    /// What 90-cage declared, and where the lab's hosts go: ai1 and ai2 on the segment's
    /// first two attachments (ports before Wi-Fi), the LAN host on br-lan's first.
    fn read_layout(&self, board_ports: &[String]) -> Layout {
        let bridge = self
            .root
            .uci_get("cage.ai.bridge")
            .unwrap_or_else(|| "br-cage".into());
        let cage_device = self.root.uci_get("network.cage.device");
        assert_eq!(
            cage_device.as_deref(),
            Some(bridge.as_str()),
            "90-cage made no interface 'cage' on {bridge}:\n{}",
            self.root.read("etc/config/network")
        );
        for (key, want) in [
            ("network.cage.ipaddr", "192.168.10.1"),
            ("network.cage.netmask", "255.255.255.0"),
            ("network.cage.ip6addr", "fd00:cafe:10::1/64"),
        ] {
            assert_eq!(
                self.root.uci_get(key).as_deref(),
                Some(want),
                "the segment's address in /etc/config/network is not the lab's"
            );
        }
        let wan = self.root.uci_get("network.wan.device").unwrap();
        let wifi = self.access_points();
        let of = |bridge: &str, network: &str| -> (Vec<Attachment>, Vec<String>) {
            let (mut made, mut unmade) = (vec![], vec![]);
            for p in self.bridge_ports(bridge) {
                if board_ports.contains(&p) {
                    made.push(Attachment::Port(p));
                } else {
                    unmade.push(p);
                }
            }
            made.extend(
                wifi.iter()
                    .filter(|(net, _)| net == network)
                    .map(|(_, a)| a.clone()),
            );
            (made, unmade)
        };
        let (segment, segment_unmade) = of(&bridge, "cage");
        let (lan, lan_unmade) = of("br-lan", "lan");
        assert!(
            lan_unmade.is_empty(),
            "br-lan has ports this lab cannot make: {lan_unmade:?}"
        );
        assert!(
            segment.len() >= 2,
            "{}: 90-cage gave the segment {} attachment(s) this lab can make ({}), \
             the contract needs two caged hosts; not made here (no 802.1Q): {:?}\n{}",
            self.board.label(),
            segment.len(),
            segment
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            segment_unmade,
            self.root.read("etc/config/network")
        );
        assert!(
            !lan.is_empty(),
            "{}: nothing feeds br-lan after 90-cage: the owner has no way in",
            self.board.label()
        );
        if !segment_unmade.is_empty() {
            let msg = format!(
                "{}: segment ports {} are 802.1Q VLANs, which this kernel cannot make \
                 (no CONFIG_VLAN_8021Q): netifd's handling of them is NOT CHECKED here",
                self.board.label(),
                segment_unmade.join(", ")
            );
            crate::warn(&msg);
        }
        // Ports before Wi-Fi: a cable is what a buyer plugs the agent's machine into.
        let mut seg_sorted = segment.clone();
        seg_sorted.sort_by_key(|a| matches!(a, Attachment::Wifi { .. }));
        let mut lan_sorted = lan.clone();
        lan_sorted.sort_by_key(|a| matches!(a, Attachment::Wifi { .. }));
        Layout {
            wan,
            bridge,
            ai1: seg_sorted[0].clone(),
            ai2: seg_sorted[1].clone(),
            lan_host: lan_sorted[0].clone(),
            segment,
            segment_unmade,
            lan,
        }
    }

    /// The access points of /etc/config/wireless on the first radio, in file order, each
    /// with its network and the interface name OpenWrt 23.05 gives it (`phy0-ap<n>`).
    fn access_points(&self) -> Vec<(String, Attachment)> {
        let show = uci_show(&self.root, "wireless");
        let get = |s: &str, o: &str| {
            show.iter()
                .find(|(k, _)| *k == format!("{s}.{o}"))
                .and_then(|(_, v)| v.first().cloned())
        };
        let sections: Vec<String> = show
            .iter()
            .filter(|(k, v)| !k.contains('.') && v == &["wifi-iface"])
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = vec![];
        for (n, s) in sections.iter().enumerate() {
            if get(s, "mode").as_deref() != Some("ap") || get(s, "disabled").as_deref() == Some("1")
            {
                continue;
            }
            let Some(network) = get(s, "network") else {
                continue;
            };
            out.push((
                network,
                Attachment::Wifi {
                    section: s.clone(),
                    ssid: get(s, "ssid").unwrap_or_default(),
                    ifname: format!("phy0-ap{n}"),
                },
            ));
        }
        out
    }

    /// The stand-in for mac80211.sh (see the module's docs): netifd runs it to set the
    /// radio up; it reports each access point's lab interface with netifd-wireless.sh's
    /// `wireless_add_vif`, and netifd bridges and isolates it from the wifi-iface's
    /// options, as for a real access point.
    fn write_wifi_driver(&self, layout: &Layout) {
        let mut cases = String::new();
        let mut ssids = std::collections::BTreeSet::new();
        for a in layout.segment.iter().chain(&layout.lan) {
            if let Attachment::Wifi { ssid, ifname, .. } = a {
                assert!(
                    ssids.insert(ssid.clone()),
                    "two access points named '{ssid}': the lab's Wi-Fi stand-in tells them \
                     apart by SSID"
                );
                let quoted = format!("'{}'", ssid.replace('\'', "'\\''"));
                cases.push_str(&format!("\t{quoted}) ifname={ifname} ;;\n"));
            }
        }
        let script = format!(
            "#!/bin/sh\n\
             # The lab's stand-in for mac80211.sh and hostapd (no radio here): each access\n\
             # point is a veth the lab made; netifd bridges and isolates it.\n\
             # What it does, for the lab's diagnostics.\n\
             exec 2>>/tmp/wifi-standin.log\n\
             echo \"$*\" >&2\n\
             . /lib/netifd/netifd-wireless.sh\n\
             init_wireless_driver \"$@\"\n\
             \n\
             drv_mac80211_init_device_config() {{ :; }}\n\
             drv_mac80211_init_iface_config() {{ :; }}\n\
             drv_mac80211_init_vlan_config() {{ :; }}\n\
             drv_mac80211_init_station_config() {{ :; }}\n\
             drv_mac80211_cleanup() {{ :; }}\n\
             drv_mac80211_teardown() {{ :; }}\n\
             \n\
             # netifd names the access points by index; the lab knows them by SSID.\n\
             lab_vif() {{\n\
             \tlocal ssid ifname\n\
             \tjson_select config\n\
             \tjson_get_var ssid ssid\n\
             \tjson_select ..\n\
             \tcase \"$ssid\" in\n\
             {cases}\
             \t*) return ;;\n\
             \tesac\n\
             \techo \"access point $1 '$ssid': $ifname\" >&2\n\
             \t# hostapd has the interface up when netifd is told of it (an external\n\
             \t# device netifd uses only while it is up).\n\
             \tip link set \"$ifname\" up\n\
             \twireless_add_vif \"$1\" \"$ifname\"\n\
             }}\n\
             \n\
             drv_mac80211_setup() {{\n\
             \tfor_each_interface \"ap\" lab_vif\n\
             \twireless_set_up\n\
             }}\n\
             \n\
             add_driver mac80211\n"
        );
        let path = "lib/netifd/wireless/mac80211.sh";
        install_text(&self.root, path, &script, 0o755);
    }

    /// The router's mount namespace: a process in the router's netns that has its own
    /// mounts (/proc, the netns's /sys, a minimal /dev inside the root, the lab's `cage`
    /// binary at /usr/bin/cage) and sits chrooted in the root; everything in the router
    /// enters it (`nsenter -t`).
    fn start_holder(&mut self) {
        let r = self.root.path().display().to_string();
        let cage = lab::cage_bin().unwrap_or_else(|e| panic!("{e}"));
        let cage = cage.display();
        let script = format!(
            "{}exec chroot '{r}' /bin/sh -c 'echo ready; while :; do sleep 3600; done'\n",
            router_mounts(&r, &cage.to_string())
        );
        let mut child = self
            .lab
            .in_router_netns()
            .args(["unshare", "--mount", "--propagation", "private", "--"])
            .args(["/bin/sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting the router's mount namespace: {e}"));
        // It says "ready" once chrooted: from then on nsenter -r finds the root.
        let mut stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 6];
            let ok = stdout.read_exact(&mut buf).is_ok() && &buf == b"ready\n";
            let _ = tx.send(ok);
            // Keep the pipe open (and drained) for as long as the holder lives.
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        });
        let ready = rx.recv_timeout(Duration::from_secs(10)).unwrap_or(false);
        self.holder = Some(child);
        assert!(ready, "the router's mount namespace did not come up");
    }

    /// Reboot the router into OpenWrt's own init: the lab's holder and ubusd go, and
    /// procd runs as PID 1 of a PID and mount namespace of its own (in the router's
    /// netns, chrooted into the root), in the container mode procd has for LXC and the
    /// like (`$container` set: it leaves /dev as it finds it). procd starts ubusd itself,
    /// then runs /etc/inittab: `rcS S boot`, every /etc/rc.d/S* in order, which are the
    /// init scripts `services` (enabled here, as an image build enables them) — say
    /// `cage` (S18), `firewall` (S19), `network` (S20). busybox's syslogd catches what
    /// procd's instances log (`/tmp/syslog`, see [`OwLab::syslog`]).
    ///
    /// Not run, and why: `/etc/init.d/boot` (S10: kmodloader, mounts, uci-defaults,
    /// which `up` ran already), and procd's coldplug, `udevtrigger` (not in the root):
    /// it would replay the uevents of the host's own devices.
    pub fn boot_procd(&mut self, services: &[&str]) {
        for service in services {
            self.root.sh_ok(&format!("/etc/init.d/{service} enable"));
        }
        for (_, mut child) in std::mem::take(&mut *self.daemons.lock().unwrap()) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut holder) = self.holder.take() {
            // The holder's shell and its sleep; nothing else of ours runs in it.
            let children = children_of(holder.id());
            let _ = holder.kill();
            let _ = holder.wait();
            for pid in children {
                // SAFETY: kill(2) on a child of our own child, by pid.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        let _ = std::fs::remove_file(self.root.join("tmp/run/ubus/ubus.sock"));
        let r = self.root.path().display().to_string();
        let cage = lab::cage_bin().unwrap_or_else(|e| panic!("{e}"));
        let script = format!(
            "{}mount -t bpf -o mode=0700 bpffs '{r}/sys/fs/bpf'\n\
             exec chroot '{r}' /usr/bin/env -i container=cage-lab PATH={OPENWRT_PATH} \
             /sbin/procd -S\n",
            router_mounts(&r, &cage.display().to_string())
        );
        let log = self.lab.dir().join("procd.log");
        let file = std::fs::File::create(&log).unwrap();
        let err = file.try_clone().unwrap();
        let child = self
            .lab
            .in_router_netns()
            .args([
                "unshare",
                "--mount",
                "--pid",
                "--fork",
                "--propagation",
                "private",
            ])
            .args(["--", "/bin/sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting procd: {e}"));
        let unshare = child.id();
        self.holder = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        let procd = loop {
            let kids = children_of(unshare);
            if let Some(&pid) = kids.first() {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "procd" {
                    break pid;
                }
            }
            assert!(
                Instant::now() < until,
                "procd did not start:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        self.procd_pid = Some(procd);
        self.wait_for(
            "procd's ubus (procd started ubusd)",
            Duration::from_secs(20),
            |ow| ow.sh("ubus call service list").status.success(),
        );
        self.sh_ok("syslogd -O /tmp/syslog");
        // What /etc/init.d/boot does last: `reload_config` records the configuration's
        // checksums, against which the next `reload_config` tells what changed.
        self.sh_ok("reload_config");
    }

    /// Put OpenWrt's dnsmasq package into the root as opkg would: its init script, its
    /// shared files and `/etc/dnsmasq.conf` from the snapshot, its user made by
    /// base-files' own `add_group_and_user` from the package's `Require-User` (453, as
    /// OpenWrt's Makefile has it); the daemon itself is Debian's dnsmasq (2.90, as
    /// OpenWrt 23.05, but built without ubus, so `dhcp.@dnsmasq[0].ubus` is set to 0),
    /// with its libraries. `jsonfilter` is the lab's stand-in
    /// (`cage_tests::jsonfilter`: the init script learns each interface's device and
    /// subnet through `/lib/functions/network.sh`, which needs it). Enable it with
    /// [`OwLab::boot_procd`]'s `dnsmasq`.
    pub fn install_dnsmasq(&self, jsonfilter: &Path) {
        let files = self
            .root
            .tools()
            .openwrt_files()
            .join("package/network/services/dnsmasq/files");
        for (from, to, mode) in [
            ("dnsmasq.init", "etc/init.d/dnsmasq", 0o755),
            ("dhcp-script.sh", "usr/lib/dnsmasq/dhcp-script.sh", 0o755),
            (
                "dhcpbogushostname.conf",
                "usr/share/dnsmasq/dhcpbogushostname.conf",
                0o644,
            ),
            ("rfc6761.conf", "usr/share/dnsmasq/rfc6761.conf", 0o644),
            ("dnsmasq.conf", "etc/dnsmasq.conf", 0o644),
        ] {
            use std::os::unix::fs::PermissionsExt;
            install_file(&self.root, &files.join(from), to);
            std::fs::set_permissions(self.root.join(to), std::fs::Permissions::from_mode(mode))
                .unwrap();
        }
        let dnsmasq = Path::new("/usr/sbin/dnsmasq");
        assert!(
            dnsmasq.is_file(),
            "no /usr/sbin/dnsmasq: `cargo xtask setup` installs Debian's dnsmasq-base"
        );
        install_file(&self.root, dnsmasq, "usr/sbin/dnsmasq");
        install_file(&self.root, jsonfilter, "usr/bin/jsonfilter");
        // The init script computes each DHCP range with base-files' ipcalc.sh, an awk
        // script that needs awk's math (`**`), which OpenWrt's busybox has and Debian's
        // static busybox lacks: GNU awk stands in for the applet.
        let gawk = Path::new("/usr/bin/gawk");
        assert!(
            gawk.is_file(),
            "no /usr/bin/gawk: `cargo xtask setup` installs Debian's gawk"
        );
        install_file(&self.root, gawk, "usr/bin/awk");
        self.root
            .copy_host_libs(&[
                dnsmasq.to_path_buf(),
                jsonfilter.to_path_buf(),
                gawk.to_path_buf(),
            ])
            .unwrap_or_else(|e| panic!("copying libraries into the root: {e}"));
        install_text(
            &self.root,
            "usr/lib/opkg/info/dnsmasq.control",
            "Package: dnsmasq\nRequire-User: dnsmasq=453:dnsmasq=453\n",
            0o644,
        );
        self.root
            .sh_ok(". /lib/functions.sh && lock() { :; } && add_group_and_user dnsmasq");
        // Debian's dnsmasq is built without ubus (OpenWrt's registers there for lease
        // events, which Cage does not use): the one option the lab changes. And the
        // directory /etc/init.d/boot (not run here) makes for the resolver file.
        self.root.sh_ok(
            "uci set dhcp.@dnsmasq[0].ubus='0' && uci commit dhcp && mkdir -p /tmp/resolv.conf.d",
        );
        assert!(
            self.root.read("etc/passwd").contains("dnsmasq:x:453:453:"),
            "add_group_and_user made no dnsmasq user:\n{}",
            self.root.read("etc/passwd")
        );
    }

    /// procd's pid as the test sees it, when it runs.
    pub fn procd_pid(&self) -> Option<u32> {
        self.procd_pid
    }

    /// What the router's syslog has (procd's instances' output: `cage run`'s log).
    pub fn syslog(&self) -> String {
        std::fs::read_to_string(self.root.join("tmp/syslog")).unwrap_or_default()
    }

    /// `ubus call service list` for one service: its instances' pids (running ones).
    pub fn service_pids(&self, service: &str) -> Vec<u32> {
        let out = self.sh(&format!(
            "ubus call service list '{{\"name\":\"{service}\"}}'"
        ));
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let mut pids = vec![];
        if let Some(instances) = v[service]["instances"].as_object() {
            for inst in instances.values() {
                if inst["running"] == true {
                    if let Some(pid) = inst["pid"].as_u64() {
                        pids.push(pid as u32);
                    }
                }
            }
        }
        pids
    }

    /// base-files' per-namespace network sysctls (see the module's docs).
    fn apply_sysctl_defaults(&self) {
        let conf = self.root.read("etc/sysctl.d/10-default.conf");
        let lines: Vec<&str> = conf
            .lines()
            .map(str::trim)
            .filter(|l| {
                l.starts_with("net.ipv4.conf.")
                    || l.starts_with("net.ipv4.ip_forward=")
                    || l.starts_with("net.ipv6.conf.")
            })
            .collect();
        assert!(
            lines.iter().any(|l| l.starts_with("net.ipv4.ip_forward=")),
            "10-default.conf has no ip_forward line:\n{conf}"
        );
        for line in lines {
            self.sh_ok(&format!("sysctl -w '{line}' >/dev/null"));
        }
    }

    /// Start a daemon of the root in the router, its output into `<name>.log` in the
    /// lab's directory.
    fn start_daemon(&self, name: &'static str, argv: &[&str]) {
        let log = self.lab.dir().join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let err = file.try_clone().unwrap();
        let child = self
            .in_router()
            .args(argv)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        self.daemons.lock().unwrap().insert(name, child);
    }

    /// Poll `cond` every 100 ms for at most `timeout`; panics with the diagnostics if
    /// it never holds.
    pub fn wait_for(&self, what: &str, timeout: Duration, cond: impl Fn(&OwLab) -> bool) {
        let start = Instant::now();
        while !cond(self) {
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for OwLab {
    fn drop(&mut self) {
        for (_, mut child) in std::mem::take(&mut *self.daemons.lock().unwrap()) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut holder) = self.holder.take() {
            let _ = holder.kill();
            let _ = holder.wait();
        }
        // Then `lab` (every other process in its namespaces, and the namespaces) and
        // `root`, in field order.
    }
}

/// The router's mounts inside the root, for a shell in its fresh mount namespace: /proc,
/// the netns's /sys, a minimal /dev (null, zero, random, urandom and the fd links that
/// procd's hotplug rules make on a router; no watchdog, no kmsg, no console: nothing of
/// the host's), and the lab's `cage` at /usr/bin/cage.
fn router_mounts(r: &str, cage: &str) -> String {
    format!(
        "set -e\n\
         mount -t proc proc '{r}/proc'\n\
         mount -t sysfs sysfs '{r}/sys'\n\
         mount -t tmpfs -o mode=755 tmpfs '{r}/dev'\n\
         mknod -m 666 '{r}/dev/null' c 1 3\n\
         mknod -m 666 '{r}/dev/zero' c 1 5\n\
         mknod -m 666 '{r}/dev/random' c 1 8\n\
         mknod -m 666 '{r}/dev/urandom' c 1 9\n\
         ln -s /proc/self/fd '{r}/dev/fd'\n\
         ln -s /proc/self/fd/0 '{r}/dev/stdin'\n\
         ln -s /proc/self/fd/1 '{r}/dev/stdout'\n\
         ln -s /proc/self/fd/2 '{r}/dev/stderr'\n\
         touch '{r}/usr/bin/cage'\n\
         mount --bind '{cage}' '{r}/usr/bin/cage'\n"
    )
}

/// A process's children (from /proc), in the order the kernel lists them.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

// ---- the root ---------------------------------------------------------------------------

/// Put OpenWrt's software and the package's files into the board's root, where OpenWrt
/// has them.
fn install_openwrt(root: &Root, fw4: Fw4) {
    let tools: &Tools = root.tools();
    let prefix = tools.prefix();
    let files = tools.openwrt_files();
    // The tools were built for `prefix`: ucode looks for its modules under it, and they
    // find their libraries there (rpath). Inside the root, the prefix is /usr (a relative
    // link, so that from outside it points into the root, never at the host's /usr).
    let inner = root.join(&prefix.to_string_lossy());
    std::fs::create_dir_all(inner.parent().unwrap()).unwrap();
    let depth = prefix.components().count() - 2;
    let up = "../".repeat(depth);
    let _ = std::fs::remove_file(&inner);
    std::os::unix::fs::symlink(format!("{up}usr"), &inner).unwrap();
    assert_eq!(
        inner.canonicalize().unwrap(),
        root.join("usr").canonicalize().unwrap(),
        "the prefix link in the root must lead to the root's /usr"
    );
    for (from, to) in [
        ("sbin/ubusd", "sbin/ubusd"),
        ("sbin/procd", "sbin/procd"),
        ("sbin/netifd", "sbin/netifd"),
        ("bin/ubus", "bin/ubus"),
        ("bin/ucode", "usr/bin/ucode"),
        ("bin/utpl", "usr/bin/utpl"),
    ] {
        install_file(root, &prefix.join(from), to);
    }
    copy_tree(root, &prefix.join("lib/ucode"), "usr/lib/ucode");
    copy_tree(root, &prefix.join("share/netifd"), "lib/netifd");
    copy_tree(root, &tools.firewall4(fw4.version()).join("root"), "");
    copy_tree(root, &files.join("package/network/config/netifd/files"), "");
    let procd = files.join("package/system/procd/files");
    install_file(root, &procd.join("procd.sh"), "lib/functions/procd.sh");
    // Programs, as procd's package installs them (INSTALL_BIN), whatever mode the
    // snapshot has.
    for (from, to) in [
        ("reload_config", "sbin/reload_config"),
        ("service", "sbin/service"),
    ] {
        use std::os::unix::fs::PermissionsExt;
        install_file(root, &procd.join(from), to);
        std::fs::set_permissions(root.join(to), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    install_file(root, &procd.join("hotplug.json"), "etc/hotplug.json");
    install_file(root, &prefix.join("lib/libsetlbf.so"), "lib/libsetlbf.so");
    // Cage itself goes where the package puts it, /usr/bin/cage, by a bind mount in the
    // router's mount namespace (see `start_holder`; a debug build is over 100 MB), with
    // the libraries it needs.
    let cage = lab::cage_bin().unwrap_or_else(|e| panic!("{e}"));
    install_file(root, Path::new("/usr/sbin/nft"), "usr/sbin/nft");
    install_file(root, Path::new("/usr/bin/flock"), "usr/bin/flock");
    let mut programs: Vec<PathBuf> = ["/usr/sbin/nft", "/usr/bin/flock"]
        .iter()
        .map(PathBuf::from)
        .collect();
    programs.push(cage);
    for p in [
        "sbin/ubusd",
        "sbin/procd",
        "sbin/netifd",
        "bin/ubus",
        "bin/ucode",
        "bin/utpl",
    ] {
        programs.push(prefix.join(p));
    }
    for lib in std::fs::read_dir(prefix.join("lib/ucode"))
        .unwrap()
        .flatten()
    {
        programs.push(lib.path());
    }
    root.copy_host_libs(&programs)
        .unwrap_or_else(|e| panic!("copying libraries into the root: {e}"));
    // The package, as an image build places it (installing it with the real opkg is
    // tests/tests/package.rs's business).
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../openwrt/files");
    copy_tree(root, &package, "");
    // The image build writes the firmware's PATH into these (base-files' Makefile,
    // TARGET_INIT_PATH); hotplug-call runs every hotplug script with it.
    for rel in ["sbin/hotplug-call", "etc/profile", "etc/preinit"] {
        let text = root.read(rel);
        if text.contains("%PATH%") {
            install_text(root, rel, &text.replace("%PATH%", OPENWRT_PATH), 0o755);
        }
    }
    // /var is /tmp on OpenWrt (ubusd's socket is /var/run/ubus/ubus.sock).
    let var = root.join("var");
    if var.is_dir() && !var.is_symlink() {
        std::fs::remove_dir(&var).expect("the fixture's /var is empty");
    }
    if !var.is_symlink() {
        std::os::unix::fs::symlink("tmp", &var).unwrap();
    }
    for d in ["tmp/run/ubus", "tmp/lock", "tmp/state", "etc/rc.d"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    // Enabled, as an image build enables every package's init script (rc.d links):
    // 20-firewall reloads fw4 on ifup only when the firewall is enabled.
    root.sh_ok("/etc/init.d/firewall enable && /etc/init.d/network enable");
}

/// Copy one file into the root at `rel`, replacing what is there. Never through a link:
/// the fixture's busybox applets are links to /bin/busybox, and copying onto one would
/// overwrite the host's own busybox.
fn install_file(root: &Root, from: &Path, rel: &str) {
    let to = safe_target(root, rel);
    if to.symlink_metadata().is_ok() {
        std::fs::remove_file(&to).unwrap_or_else(|e| panic!("{}: {e}", to.display()));
    }
    std::fs::copy(from, &to)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
}

fn install_text(root: &Root, rel: &str, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let to = safe_target(root, rel);
    if to.symlink_metadata().is_ok() {
        std::fs::remove_file(&to).unwrap();
    }
    std::fs::write(&to, text).unwrap();
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `root/rel`, its parent directories made; panics unless the parent really is inside
/// the root (no link along the way leads out).
fn safe_target(root: &Root, rel: &str) -> PathBuf {
    let to = root.join(rel);
    let parent = to.parent().unwrap();
    std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("{}: {e}", parent.display()));
    let inside = root.path().canonicalize().unwrap();
    assert!(
        parent.canonicalize().unwrap().starts_with(&inside),
        "{} leads out of the root",
        parent.display()
    );
    to
}

/// Copy a directory tree into the root under `rel` with [`install_file`] (modes kept).
fn copy_tree(root: &Root, from: &Path, rel: &str) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let entries = std::fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let sub = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            copy_tree(root, &path, &sub);
        } else if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path).unwrap();
            let to = safe_target(root, &sub);
            if to.symlink_metadata().is_ok() {
                std::fs::remove_file(&to).unwrap();
            }
            std::os::unix::fs::symlink(target, &to).unwrap();
        } else {
            install_file(root, &path, &sub);
            let to = root.join(&sub);
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
                .unwrap();
        }
    }
}

/// `uci -q show PACKAGE` in the root, as (key, values): `network.cage.ports` → its list.
fn uci_show(root: &Root, package: &str) -> Vec<(String, Vec<String>)> {
    let out = root.sh_ok(&format!("uci -q show {package}"));
    out.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once('=')?;
            let key = key.strip_prefix(&format!("{package}."))?.to_owned();
            Some((key, uci_values(value)))
        })
        .collect()
}

/// `'a' 'b c'` → [a, "b c"]; a bare word → [word]. (uci show quotes each list element;
/// a quote inside a value is written `'\''`.)
fn uci_values(text: &str) -> Vec<String> {
    let mut out = vec![];
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            '\\' if !quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ' ' if !quoted => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn ip_batch(ns: &str, lines: &[String]) {
    let script = lines.join("\n") + "\n";
    let out = run_command(
        Command::new("ip").args(["-n", ns, "-batch", "-"]),
        Some(&script),
        ROUTER_COMMAND_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("ip -n {ns} -batch: {e}"));
    assert!(
        out.status.success(),
        "ip -n {ns} -batch - <<EOF\n{script}EOF\nfailed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(test)]
mod tests {
    use super::uci_values;

    #[test]
    fn uci_show_values() {
        assert_eq!(uci_values("'lan3' 'lan1.10'"), ["lan3", "lan1.10"]);
        assert_eq!(uci_values("'a b'"), ["a b"]);
        assert_eq!(uci_values("bridge"), ["bridge"]);
        assert_eq!(uci_values("'it'\\''s'"), ["it's"]);
        assert_eq!(uci_values("''"), [""]);
    }
}

// ---- probing while the router changes -------------------------------------------------

/// What probing the whole time something ran saw.
#[derive(Debug)]
pub struct ProbeRun {
    /// Probes made (and judged).
    pub probes: usize,
    /// Of them, those that ended while `during` still ran.
    pub during: usize,
    /// Full passes over the checks.
    pub rounds: usize,
    /// One line for each probe that did not get the expected verdict.
    pub failures: Vec<String>,
    pub elapsed: Duration,
}

impl std::fmt::Display for ProbeRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} probes ({} while it ran; {} rounds of the checks) in {:.1} s, {} failed",
            self.probes,
            self.during,
            self.rounds,
            self.elapsed.as_secs_f64(),
            self.failures.len()
        )?;
        for line in self.failures.iter().take(40) {
            write!(f, "\n  {line}")?;
        }
        Ok(())
    }
}

/// The most a [`probe_while`] may probe, whatever `during` does.
const PROBE_WHILE_LIMIT: Duration = Duration::from_secs(120);

/// Probe `checks` over and over from [`PROBE_THREADS`] threads for as long as `during`
/// runs, then one more full round; every probe judged by a witness in its destination,
/// as in the contract matrix. Probes towards the same (address, protocol, port) take
/// turns (a SYN is recognised by destination alone). Bounded: at most 120 s of probing.
pub fn probe_while<T>(lab: &Lab, checks: &[Check], during: impl FnOnce() -> T) -> (T, ProbeRun) {
    use cage_agent::probe::{Servers, Witness, WitnessLimits};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;

    let started = Instant::now();
    let targets: std::collections::BTreeSet<Node> = checks.iter().map(|c| c.to).collect();
    let limits = WitnessLimits {
        max_duration: PROBE_WHILE_LIMIT + Duration::from_secs(30),
        max_records: 200_000,
    };
    let mut witnesses = BTreeMap::new();
    let mut servers = vec![];
    for &node in &targets {
        let ns = lab.netns(node);
        servers.push(
            Servers::start(&ns, crate::contract::SERVICES, limits.max_duration)
                .unwrap_or_else(|e| panic!("echo servers in {node}: {e}")),
        );
        witnesses.insert(
            node,
            Witness::start(&ns, limits).unwrap_or_else(|e| panic!("witness in {node}: {e}")),
        );
    }
    let mut lanes: BTreeMap<(std::net::IpAddr, cage_agent::probe::Proto, u16), Vec<&Check>> =
        BTreeMap::new();
    for c in checks {
        lanes.entry((c.dst, c.proto, c.port)).or_default().push(c);
    }
    let lanes: Vec<Vec<&Check>> = lanes.into_values().collect();
    let threads = PROBE_THREADS.min(lanes.len());
    let stop = AtomicBool::new(false);
    let probes = AtomicUsize::new(0);
    let during_probes = AtomicUsize::new(0);
    let rounds = AtomicUsize::new(usize::MAX);
    let failures = Mutex::new(Vec::new());
    let result = std::thread::scope(|scope| {
        for t in 0..threads {
            let (lanes, witnesses, stop, probes, during_probes, rounds, failures) = (
                &lanes,
                &witnesses,
                &stop,
                &probes,
                &during_probes,
                &rounds,
                &failures,
            );
            scope.spawn(move || {
                let mine: Vec<&Vec<&Check>> = lanes.iter().skip(t).step_by(threads).collect();
                let mut round = 0;
                loop {
                    // Checked before a round: a round that starts after `during` ended
                    // is the last one.
                    let last = stop.load(Ordering::SeqCst);
                    for lane in &mine {
                        for c in lane.iter() {
                            let from = lab.netns(c.from.node());
                            let probe = c.probe().timeout(PROBE_WHILE_TIMEOUT);
                            let verdict = witnesses[&c.to].observe(&from, &probe);
                            probes.fetch_add(1, Ordering::Relaxed);
                            if !stop.load(Ordering::SeqCst) {
                                during_probes.fetch_add(1, Ordering::Relaxed);
                            }
                            let ok = matches!(
                                (c.expect, &verdict),
                                (Expect::Allow, Ok(o)) if o.verdict == Verdict::Delivered
                            ) || matches!(
                                (c.expect, &verdict),
                                (Expect::Deny, Ok(o)) if o.verdict == Verdict::Blocked
                            );
                            if !ok {
                                let why = match &verdict {
                                    Ok(o) => format!("{}: {}", o.verdict, o.summary()),
                                    Err(e) => format!("ERROR: {e}"),
                                };
                                failures.lock().unwrap().push(format!(
                                    "at {:.2} s: {} {} -> {} {} (expected {}): {why}",
                                    started.elapsed().as_secs_f64(),
                                    c.row,
                                    c.from.label(),
                                    c.target(),
                                    c.proto,
                                    c.expect
                                ));
                            }
                        }
                    }
                    round += 1;
                    if last || started.elapsed() > PROBE_WHILE_LIMIT {
                        break;
                    }
                }
                rounds.fetch_min(round, Ordering::SeqCst);
            });
        }
        let result = during();
        stop.store(true, Ordering::SeqCst);
        result
    });
    for w in witnesses.into_values() {
        let _ = w.stop();
    }
    for s in servers {
        let _ = s.stop();
    }
    let run = ProbeRun {
        probes: probes.into_inner(),
        during: during_probes.into_inner(),
        rounds: rounds.into_inner(),
        failures: failures.into_inner().unwrap(),
        elapsed: started.elapsed(),
    };
    (result, run)
}

/// How long a probe of [`probe_while`] waits for an answer: short, so that many probes
/// are in flight during a change. A deny is judged by the witness, which waits for what
/// could still be in flight whatever the prober's timeout; only an allow's answer must
/// come within it.
pub const PROBE_WHILE_TIMEOUT: Duration = Duration::from_millis(250);

/// Threads [`probe_while`] probes from.
pub const PROBE_THREADS: usize = 16;
