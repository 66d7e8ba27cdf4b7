//! The lab: a simulated travel router in network namespaces.
//!
//! ```text
//!   {p}-ai1 ──eth0═cage1─┐                                   ┌─ {p}-hotel 10.99.0.10
//!   {p}-ai2 ──eth0═cage2─┤ {p}-router                        │
//!                        │  (cage1, cage2: unbridged; Cage   {p}-up ═ br0 10.99.0.1 ══ inet0 ══ {p}-inet
//!   {p}-lan ──eth0═lan1── br-lan 192.168.8.1   makes br-cage)  │        198.51.100.1/30    198.51.100.2
//!     .10 and .20 (admin) wan 10.99.0.2 ═══════════════════ r0┘                         + lo: 203.0.113.10,
//!                                                                                         private ranges
//! ```
//!
//! Every name lives inside a namespace of the lab (`ip -n A link add X type veth peer name
//! Y netns B`), so nothing appears in the root namespace. [`Lab::up`] removes what a
//! crashed run with the same prefix left behind, then builds; dropping the [`Lab`] tears
//! it all down. The router's ports to the caged hosts are left unbridged: Cage makes
//! `br-cage` from its configuration. The upstream namespace routes everything, private
//! ranges included, towards "the internet", so without Cage a caged host reaches every
//! destination the contract denies (see [`Lab::plain_segment`] and the baseline test).
//!
//! The harness shells out to `ip` and `nft`; the `cage` binary itself uses rtnetlink.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cage_agent::probe::{self, NetNs, NetNsGuard, Outcome, Probe, ProbeError};

// ---- the lab's addresses --------------------------------------------------------------

const fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

#[allow(clippy::too_many_arguments)]
const fn v6(a: u16, b: u16, c: u16, d: u16, e: u16, f: u16, g: u16, h: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h))
}

/// The router on the AI segment (made by Cage from the configuration).
pub const ROUTER_SEG4: IpAddr = v4(192, 168, 10, 1);
pub const ROUTER_SEG6: IpAddr = v6(0xfd00, 0xcafe, 0x10, 0, 0, 0, 0, 1);
/// The router on the LAN (`br-lan`).
pub const ROUTER_LAN4: IpAddr = v4(192, 168, 8, 1);
pub const ROUTER_LAN6: IpAddr = v6(0xfd00, 8, 0, 0, 0, 0, 0, 1);
/// The router on the WAN (`wan`).
pub const ROUTER_WAN4: IpAddr = v4(10, 99, 0, 2);
pub const ROUTER_WAN6: IpAddr = v6(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 2);
/// The caged hosts.
pub const AI1_4: IpAddr = v4(192, 168, 10, 11);
pub const AI1_6: IpAddr = v6(0xfd00, 0xcafe, 0x10, 0, 0, 0, 0, 0x11);
pub const AI2_4: IpAddr = v4(192, 168, 10, 12);
pub const AI2_6: IpAddr = v6(0xfd00, 0xcafe, 0x10, 0, 0, 0, 0, 0x12);
/// Addresses outside the segment that ai1 also carries, to send spoofed packets from.
pub const AI1_SPOOF4: IpAddr = v4(172, 31, 0, 11);
pub const AI1_SPOOF6: IpAddr = v6(0x2001, 0xdb8, 0xbad, 0, 0, 0, 0, 0x11);
/// The LAN host, and the address of it that configurations may name as admin host.
pub const LAN_HOST4: IpAddr = v4(192, 168, 8, 10);
pub const LAN_HOST6: IpAddr = v6(0xfd00, 8, 0, 0, 0, 0, 0, 0x10);
pub const LAN_ADMIN4: IpAddr = v4(192, 168, 8, 20);
pub const LAN_ADMIN6: IpAddr = v6(0xfd00, 8, 0, 0, 0, 0, 0, 0x20);
/// The hotel's gateway and a host on the hotel's network (the router's upstream).
pub const UPSTREAM_GW4: IpAddr = v4(10, 99, 0, 1);
pub const UPSTREAM_GW6: IpAddr = v6(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 1);
pub const HOTEL4: IpAddr = v4(10, 99, 0, 10);
pub const HOTEL6: IpAddr = v6(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 0x10);
/// The public test host ("the internet").
pub const PUBLIC4: IpAddr = v4(203, 0, 113, 10);
pub const PUBLIC6: IpAddr = v6(0x2001, 0xdb8, 0x203, 0, 0, 0, 0, 0x10);
/// Private destinations that exist beyond the router (in the internet namespace), to
/// prove the range denies: without Cage, each one is reachable from a caged host.
/// The last two embed private IPv4 addresses in IPv6 (NAT64's well-known prefix, 6to4):
/// a hotel's NAT64 gateway would turn them into its private hosts.
pub const PRIVATE: [(IpAddr, &str); 8] = [
    (v4(10, 200, 0, 10), "10/8"),
    (v4(172, 16, 0, 10), "172.16/12"),
    (v4(192, 168, 200, 10), "192.168/16"),
    (v4(100, 64, 0, 10), "CGNAT"),
    (v4(169, 254, 99, 10), "link-local"),
    (v6(0xfd99, 0, 0, 0, 0, 0, 0, 0x10), "ULA"),
    // 64:ff9b::10.200.0.10
    (
        v6(0x64, 0xff9b, 0, 0, 0, 0, 0x0ac8, 0x000a),
        "NAT64 of 10/8",
    ),
    // 2002:172.16.0.10::10
    (
        v6(0x2002, 0xac10, 0x000a, 0, 0, 0, 0, 0x10),
        "6to4 of 172.16/12",
    ),
];

/// MAC addresses of the caged hosts' `eth0`, fixed so that static neighbour entries can
/// name them.
/// The port of the lab's web page (`cage.main.web_listen` on the router's LAN address):
/// not one the contract matrix probes with its echo servers (8080 is one), so the page
/// and the matrix never want the same port.
pub const WEB_PORT: u16 = 8081;

pub const AI1_MAC: &str = "02:ca:9e:00:00:11";
pub const AI2_MAC: &str = "02:ca:9e:00:00:12";

/// The namespaces of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Node {
    Router,
    Ai1,
    Ai2,
    Lan,
    Up,
    Hotel,
    Inet,
}

impl Node {
    pub const ALL: [Node; 7] = [
        Node::Router,
        Node::Ai1,
        Node::Ai2,
        Node::Lan,
        Node::Up,
        Node::Hotel,
        Node::Inet,
    ];

    /// The namespace's name after the prefix: `{prefix}-{role}`.
    pub fn role(self) -> &'static str {
        match self {
            Node::Router => "router",
            Node::Ai1 => "ai1",
            Node::Ai2 => "ai2",
            Node::Lan => "lan",
            Node::Up => "up",
            Node::Hotel => "hotel",
            Node::Inet => "inet",
        }
    }

    /// The namespace an address of the lab lives in.
    pub fn of(addr: IpAddr) -> Option<Node> {
        let node = match addr {
            a if [ROUTER_SEG4, ROUTER_SEG6, ROUTER_LAN4, ROUTER_LAN6].contains(&a) => Node::Router,
            a if [ROUTER_WAN4, ROUTER_WAN6].contains(&a) => Node::Router,
            a if [AI1_4, AI1_6, AI1_SPOOF4, AI1_SPOOF6].contains(&a) => Node::Ai1,
            a if [AI2_4, AI2_6].contains(&a) => Node::Ai2,
            a if [LAN_HOST4, LAN_HOST6, LAN_ADMIN4, LAN_ADMIN6].contains(&a) => Node::Lan,
            a if [UPSTREAM_GW4, UPSTREAM_GW6].contains(&a) => Node::Up,
            a if [HOTEL4, HOTEL6].contains(&a) => Node::Hotel,
            a if [PUBLIC4, PUBLIC6].contains(&a) => Node::Inet,
            a if PRIVATE.iter().any(|(p, _)| *p == a) => Node::Inet,
            _ => return None,
        };
        Some(node)
    }
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.role())
    }
}

/// Link names the lab makes (all inside its namespaces); the leak check looks for them
/// in the root namespace.
pub const LINK_NAMES: &[&str] = &[
    "cage1", "cage2", "lan1", "wan", "br-lan", "br-cage", "r0", "h0", "br0", "inet0",
];

// ---- errors ---------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the lab needs root (network namespaces, veths, raw sockets)")]
    NotRoot,
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("`{cmd}` did not finish within {after:?}; killed")]
    Timeout { cmd: String, after: Duration },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error("lab {prefix} is not ready: {why}")]
    NotReady { prefix: String, why: String },
    #[error("tearing down lab {prefix}: {}", errors.join("; "))]
    Teardown { prefix: String, errors: Vec<String> },
    #[error(
        "no cage binary at {}: build it first (`cargo build -p cage-agent`), or point \
         $CAGE_BIN at one",
        path.display()
    )]
    NoCageBinary { path: PathBuf },
}

// ---- commands -------------------------------------------------------------------------

/// How long one `ip`/`nft` command may take before the lab gives up on it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// Run a command to completion with `stdin` fed in, killing it after `timeout`.
pub fn run_command(
    cmd: &mut Command,
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<Output, LabError> {
    let line = format!("{cmd:?}").replace('"', "");
    let io = |source| LabError::Io {
        what: format!("running `{line}`"),
        source,
    };
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(io)?;
    // Read the output while the command runs: one that fills a pipe would block.
    let stdout = reader(child.stdout.take());
    let stderr = reader(child.stderr.take());
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(io)?;
    }
    let until = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(io)? {
            break Some(status);
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let (stdout, stderr) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => Err(LabError::Timeout {
            cmd: line,
            after: timeout,
        }),
    }
}

fn reader<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

/// Run a command that must succeed; its stdout.
fn checked(cmd: &mut Command, stdin: Option<&str>) -> Result<String, LabError> {
    let line = format!("{cmd:?}").replace('"', "");
    let out = run_command(cmd, stdin, COMMAND_TIMEOUT)?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: line,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -n NS ARGS…`
fn ip(ns: &str, args: &[&str]) -> Result<String, LabError> {
    checked(Command::new("ip").arg("-n").arg(ns).args(args), None)
}

/// `ip -n NS -batch -` with one command a line: far fewer processes than one each.
fn ip_batch(ns: &str, lines: &[String]) -> Result<(), LabError> {
    let script = lines.join("\n") + "\n";
    checked(
        Command::new("ip").args(["-n", ns, "-batch", "-"]),
        Some(&script),
    )
    .map_err(|e| match e {
        LabError::Command { status, stderr, .. } => LabError::Command {
            cmd: format!("ip -n {ns} -batch - <<EOF\n{script}EOF"),
            status,
            stderr,
        },
        e => e,
    })?;
    Ok(())
}

/// The lines of an `ip -batch` script.
fn lines(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// IPv4 and IPv6 forwarding on in `ns`: a router.
fn forward(ns: &NetNs) -> Result<(), LabError> {
    ns.set_sysctl("net.ipv4.ip_forward", "1")?;
    ns.set_sysctl("net.ipv6.conf.all.forwarding", "1")?;
    Ok(())
}

/// `ip netns exec NS nft -f -` with `script` on stdin.
fn nft(ns: &str, script: &str) -> Result<(), LabError> {
    checked(
        Command::new("ip").args(["netns", "exec", ns, "nft", "-f", "-"]),
        Some(script),
    )?;
    Ok(())
}

// ---- prefixes, leftovers, teardown ----------------------------------------------------

/// A prefix no other lab of this machine uses right now: `cgt-<pid>-<n>`.
pub fn unique_prefix() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "cgt-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn ns_name(prefix: &str, node: Node) -> String {
    format!("{prefix}-{}", node.role())
}

/// The lab's own directory (configuration, Cage's state and logs).
pub fn lab_dir(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("cage-lab-{prefix}"))
}

/// Where the lab's `cage` pins its eBPF maps and links (`cage.main.bpf_dir`).
pub fn bpf_dir(prefix: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/cage-lab-{prefix}"))
}

/// What a lab with this prefix has left behind: its namespaces (`/run/netns/{prefix}-…`)
/// and its directory.
pub fn leftovers(prefix: &str) -> Vec<String> {
    let mut found: Vec<String> = Node::ALL
        .iter()
        .map(|&n| ns_name(prefix, n))
        .filter(|name| Path::new(probe::NETNS_RUN_DIR).join(name).exists())
        .map(|name| format!("netns {name}"))
        .collect();
    for dir in [lab_dir(prefix), bpf_dir(prefix)] {
        if dir.exists() {
            found.push(format!("directory {}", dir.display()));
        }
    }
    found
}

/// Remove everything a lab with this prefix made: the processes still running in its
/// namespaces (a `cage run` orphaned by a crash), the namespaces (their links go with
/// them) and its directory. Collects every error rather than stopping at the first.
pub fn down(prefix: &str) -> Result<(), LabError> {
    let mut errors = Vec::new();
    for node in Node::ALL {
        let name = ns_name(prefix, node);
        if Path::new(probe::NETNS_RUN_DIR).join(&name).exists() {
            if let Err(e) = NetNsGuard::remove_by_name(&name) {
                errors.push(e.to_string());
            }
        }
    }
    errors.extend(remove_dirs(prefix));
    if errors.is_empty() {
        Ok(())
    } else {
        Err(LabError::Teardown {
            prefix: prefix.to_owned(),
            errors,
        })
    }
}

/// Remove the lab's directory and its eBPF pin directory; what failed.
fn remove_dirs(prefix: &str) -> Vec<String> {
    let mut errors = Vec::new();
    // The lab's directory, and Cage's eBPF pins (bpffs is one for all namespaces, so
    // each lab's configuration names a pin directory of its own).
    for dir in [lab_dir(prefix), bpf_dir(prefix)] {
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                errors.push(format!("removing {}: {e}", dir.display()));
            }
        }
    }
    errors
}

/// Links in the root namespace, by name.
pub fn root_links() -> Result<Vec<String>, LabError> {
    let out = checked(Command::new("ip").args(["-o", "link", "show"]), None)?;
    Ok(out
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|name| name.trim().split('@').next().unwrap_or("").to_owned())
        .collect())
}

// ---- the cage binary ------------------------------------------------------------------

/// `$CAGE_BIN`, else `$CARGO_TARGET_DIR/debug/cage`, else `<workspace>/target/debug/cage`.
pub fn cage_bin() -> Result<PathBuf, LabError> {
    let path = match std::env::var_os("CAGE_BIN") {
        Some(p) => PathBuf::from(p),
        None => crate::target_dir().join("debug").join("cage"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(LabError::NoCageBinary { path })
    }
}

/// Panics unless this process runs as root and there is a `cage` binary to test, saying
/// which is missing: what every test of the `cage` binary checks before it builds a lab.
pub fn require_cage() {
    crate::require_root();
    cage_bin().unwrap_or_else(|e| panic!("{e}"));
}

/// `cage run` in the router's namespace; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct CageRun {
    child: Child,
    log: PathBuf,
}

impl CageRun {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running?
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait (at most 15 s) until it has applied its policy; panics with its log if not.
    pub fn wait_applied(&self) {
        self.wait_until(
            Duration::from_secs(15),
            "cage run did not apply its policy",
            || self.log().contains("policy applied"),
        );
    }

    /// Poll `cond` until it holds, for at most `within`; when the time passes first,
    /// panics with `failure` and this daemon's log (what it did meanwhile is most often
    /// why).
    pub fn wait_until(&self, within: Duration, failure: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < within,
                "{failure}\ncage run:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop it: SIGTERM, up to 5 s to exit, then SIGKILL. Its exit status.
    pub fn stop(mut self) -> Option<ExitStatus> {
        self.terminate()
    }

    fn terminate(&mut self) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for CageRun {
    fn drop(&mut self) {
        self.terminate();
    }
}

// ---- the lab --------------------------------------------------------------------------

/// A running lab; dropping it tears it down.
pub struct Lab {
    prefix: String,
    dir: PathBuf,
    /// One for each node, in `Node::ALL` order.
    namespaces: Vec<NetNsGuard>,
    torn_down: bool,
    /// The router's ports to ai1 and ai2, which must both forward in `br-cage` before the
    /// segment is ready: `cage1`, `cage2` here; a board's own names in a prewired lab.
    segment_ports: [String; 2],
}

/// One veth between the router and a host of a prewired lab (see
/// [`Lab::build_prewired`]): its router end, named as the router's software knows the
/// port, and its other end, parked in the router's namespace until the lab plugs it in.
#[derive(Debug, Clone)]
pub struct Cable {
    pub router_end: String,
    pub parked_end: String,
}

/// What a prewired router's ports lead to: the two caged hosts, the LAN host and the
/// hotel's gateway.
#[derive(Debug, Clone)]
pub struct Wiring {
    pub ai1: Cable,
    pub ai2: Cable,
    pub lan: Cable,
    pub wan: Cable,
}

/// How long `Lab::up` waits for addresses and neighbours to be usable.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

impl Lab {
    /// Build the lab under `prefix` (namespaces `{prefix}-router`, `{prefix}-ai1`, …),
    /// after removing whatever a previous run with the same prefix left behind.
    pub fn up(prefix: &str) -> Result<Lab, LabError> {
        let lab = Lab::namespaces(prefix)?;
        lab.build()?;
        lab.wait_ready()?;
        Ok(lab)
    }

    /// The lab of one test of `cage`, under a prefix of its own, once [`require_cage`]
    /// holds.
    pub fn for_test() -> Lab {
        require_cage();
        Lab::up(&unique_prefix()).expect("lab up")
    }

    /// [`Lab::for_test`] with the configuration the contract assumes (the base one and
    /// [`crate::contract::CONFIG_EXTRA`]), followed by `extra_sections`.
    pub fn for_contract(extra_sections: &str) -> Lab {
        let lab = Lab::for_test();
        lab.write_config(&format!(
            "{}{extra_sections}",
            crate::contract::CONFIG_EXTRA
        ));
        lab
    }

    /// The lab's namespaces and directory under `prefix`, with nothing in them yet, after
    /// removing whatever a previous run with the same prefix left behind. For a router
    /// that runs its own software: make its ports, then [`Lab::build_prewired`].
    pub fn namespaces(prefix: &str) -> Result<Lab, LabError> {
        if !crate::is_root() {
            return Err(LabError::NotRoot);
        }
        down(prefix)?;
        let dir = lab_dir(prefix);
        // From here on, a failure drops `lab`, which tears down what was made.
        let mut lab = Lab {
            prefix: prefix.to_owned(),
            dir: dir.clone(),
            namespaces: Vec::new(),
            torn_down: false,
            segment_ports: ["cage1".into(), "cage2".into()],
        };
        std::fs::create_dir_all(&dir).map_err(|source| LabError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        for node in Node::ALL {
            lab.namespaces.push(NetNsGuard::named(lab.ns(node))?);
        }
        Ok(lab)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The lab's directory (configuration, Cage's state and logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The name of a node's namespace.
    pub fn ns(&self, node: Node) -> String {
        ns_name(&self.prefix, node)
    }

    pub fn netns(&self, node: Node) -> NetNs {
        NetNs::named(self.ns(node))
    }

    fn build(&self) -> Result<(), LabError> {
        self.build_router()?;
        self.build_hosts()
    }

    /// Build the rest of a lab whose router makes its own bridges, addresses, routes and
    /// firewall (OpenWrt's netifd and fw4: see `owlab`): plug each cable's parked end into
    /// its host (as `eth0`; `r0` at the hotel's gateway) and build the hosts. The router
    /// gets only what the kernel of any router has before its software runs: forwarding
    /// and rp_filter are left to it, except rp_filter's explicit 0 (see [`Lab::up`]).
    pub fn build_prewired(&mut self, wiring: &Wiring) -> Result<(), LabError> {
        let router = self.ns(Node::Router);
        for (cable, node, name) in [
            (&wiring.ai1, Node::Ai1, "eth0"),
            (&wiring.ai2, Node::Ai2, "eth0"),
            (&wiring.lan, Node::Lan, "eth0"),
            (&wiring.wan, Node::Up, "r0"),
        ] {
            let host = self.ns(node);
            ip(&router, &["link", "set", &cable.parked_end, "netns", &host])?;
            ip(&host, &["link", "set", &cable.parked_end, "name", name])?;
        }
        self.segment_ports = [wiring.ai1.router_end.clone(), wiring.ai2.router_end.clone()];
        let r = self.netns(Node::Router);
        r.set_sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        r.set_sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        self.build_hosts()
    }

    /// The router: its ports, `br-lan` with the LAN's addresses, the WAN, routes,
    /// forwarding, and the stand-in for fw4.
    fn build_router(&self) -> Result<(), LabError> {
        let ns = |n| self.ns(n);
        let (router, ai1, ai2, lan, up) = (
            ns(Node::Router),
            ns(Node::Ai1),
            ns(Node::Ai2),
            ns(Node::Lan),
            ns(Node::Up),
        );

        // The router. Links come up before addresses and routes: a route via a gateway
        // needs its device up.
        ip_batch(
            &router,
            &lines(&[
                "link set lo up",
                &format!("link add cage1 type veth peer name eth0 netns {ai1}"),
                &format!("link add cage2 type veth peer name eth0 netns {ai2}"),
                &format!("link add lan1 type veth peer name eth0 netns {lan}"),
                &format!("link add wan type veth peer name r0 netns {up}"),
                "link add br-lan type bridge mcast_snooping 0",
                "link set lan1 master br-lan",
                "link set cage1 up",
                "link set cage2 up",
                "link set lan1 up",
                "link set br-lan up",
                "link set wan up",
                "addr add 192.168.8.1/24 dev br-lan",
                "addr add fd00:8::1/64 dev br-lan nodad",
                "addr add 10.99.0.2/24 dev wan",
                "addr add 2001:db8:99::2/64 dev wan nodad",
                "route add default via 10.99.0.1",
                "route add ::/0 via 2001:db8:99::1",
            ]),
        )?;
        let r = self.netns(Node::Router);
        forward(&r)?;
        // Reverse-path filtering would drop spoofed packets before Cage sees them and
        // prove nothing about Cage: off, explicitly (it is off by default too).
        r.set_sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        r.set_sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        // The lab's stand-in for OpenWrt's fw4: the LAN is masqueraded out of the WAN.
        nft(
            &router,
            "table inet labfw {\n\
             \tcomment \"the lab's stand-in for OpenWrt's fw4\"\n\
             \tchain srcnat {\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\toifname \"wan\" ip saddr 192.168.8.0/24 masquerade comment \"lan out of the wan\"\n\
             \t\toifname \"wan\" ip6 saddr fd00:8::/64 masquerade comment \"lan out of the wan\"\n\
             \t}\n\
             }\n",
        )?;
        Ok(())
    }

    /// Everything but the router: the hotel's gateway, the hotel host, the internet, the
    /// LAN host and the caged hosts, each with its `eth0` (`r0` at the gateway) already
    /// plugged into the router.
    fn build_hosts(&self) -> Result<(), LabError> {
        let ns = |n| self.ns(n);
        let (ai1, ai2, lan, up, hotel, inet) = (
            ns(Node::Ai1),
            ns(Node::Ai2),
            ns(Node::Lan),
            ns(Node::Up),
            ns(Node::Hotel),
            ns(Node::Inet),
        );

        // The hotel's gateway: a bridge for the router and the hotel host, a link to the
        // internet, and every route pointing there.
        ip_batch(
            &up,
            &lines(&[
                "link set lo up",
                &format!("link add h0 type veth peer name eth0 netns {hotel}"),
                &format!("link add inet0 type veth peer name eth0 netns {inet}"),
                "link add br0 type bridge mcast_snooping 0",
                "link set r0 master br0",
                "link set h0 master br0",
                "link set r0 up",
                "link set h0 up",
                "link set br0 up",
                "link set inet0 up",
                "addr add 10.99.0.1/24 dev br0",
                "addr add 2001:db8:99::1/64 dev br0 nodad",
                "addr add 198.51.100.1/30 dev inet0",
                "addr add 2001:db8:ff::1/64 dev inet0 nodad",
                "route add default via 198.51.100.2",
                "route add ::/0 via 2001:db8:ff::2",
            ]),
        )?;
        forward(&self.netns(Node::Up))?;

        let mut inet_lines = lines(&[
            "link set lo up",
            "link set eth0 up",
            "addr add 198.51.100.2/30 dev eth0",
            "addr add 2001:db8:ff::2/64 dev eth0 nodad",
            "addr add 203.0.113.10/32 dev lo",
            "addr add 2001:db8:203::10/128 dev lo nodad",
            "route add default via 198.51.100.1",
            "route add ::/0 via 2001:db8:ff::1",
        ]);
        for (addr, _) in PRIVATE {
            let len = if addr.is_ipv4() { 32 } else { 128 };
            inet_lines.push(format!("addr add {addr}/{len} dev lo nodad"));
        }
        ip_batch(&inet, &inet_lines)?;

        ip_batch(
            &hotel,
            &lines(&[
                "link set lo up",
                "link set eth0 up",
                "addr add 10.99.0.10/24 dev eth0",
                "addr add 2001:db8:99::10/64 dev eth0 nodad",
                "route add default via 10.99.0.1",
                "route add ::/0 via 2001:db8:99::1",
            ]),
        )?;

        ip_batch(
            &lan,
            &lines(&[
                "link set lo up",
                "link set eth0 up",
                "addr add 192.168.8.10/24 dev eth0",
                "addr add 192.168.8.20/24 dev eth0",
                "addr add fd00:8::10/64 dev eth0 nodad",
                "addr add fd00:8::20/64 dev eth0 nodad",
                "route add default via 192.168.8.1",
                "route add ::/0 via fd00:8::1",
            ]),
        )?;

        // The caged hosts. ai1 also carries addresses outside the segment, to spoof from
        // (a hostile host can configure any address). ai2 knows ai1 by static neighbour
        // entries, so its frames to ai1 are sent at layer 2 without ARP or ND: the
        // isolation must stop the frames themselves.
        ip_batch(
            &ai1,
            &lines(&[
                "link set lo up",
                &format!("link set eth0 address {AI1_MAC}"),
                "link set eth0 up",
                "addr add 192.168.10.11/24 dev eth0",
                "addr add fd00:cafe:10::11/64 dev eth0 nodad",
                &format!("addr add {AI1_SPOOF4}/32 dev eth0"),
                // Deprecated (preferred_lft 0): only a probe that binds to it uses it;
                // otherwise source selection would pick it for 2001:db8::/32 targets.
                &format!("addr add {AI1_SPOOF6}/128 dev eth0 nodad preferred_lft 0"),
                "route add default via 192.168.10.1",
                "route add ::/0 via fd00:cafe:10::1",
            ]),
        )?;
        ip_batch(
            &ai2,
            &lines(&[
                "link set lo up",
                &format!("link set eth0 address {AI2_MAC}"),
                "link set eth0 up",
                "addr add 192.168.10.12/24 dev eth0",
                "addr add fd00:cafe:10::12/64 dev eth0 nodad",
                "route add default via 192.168.10.1",
                "route add ::/0 via fd00:cafe:10::1",
                &format!("neigh replace {AI1_4} lladdr {AI1_MAC} dev eth0 nud permanent"),
                &format!("neigh replace {AI1_6} lladdr {AI1_MAC} dev eth0 nud permanent"),
            ]),
        )?;
        Ok(())
    }

    /// Wait (bounded) until no address of the lab is tentative and the links outside the
    /// segment carry traffic: LAN and hotel host to their gateways, the router to the
    /// internet. The segment is Cage's: see [`Lab::wait_segment_ready`].
    pub fn wait_ready(&self) -> Result<(), LabError> {
        let until = Instant::now() + READY_TIMEOUT;
        self.wait_no_tentative(&Node::ALL, until)?;
        let pairs = [
            (Node::Lan, ROUTER_LAN4),
            (Node::Lan, ROUTER_LAN6),
            (Node::Hotel, UPSTREAM_GW4),
            (Node::Hotel, UPSTREAM_GW6),
            (Node::Router, PUBLIC4),
            (Node::Router, PUBLIC6),
        ];
        for (node, addr) in pairs {
            self.wait_ping(node, addr, until)?;
        }
        Ok(())
    }

    /// Wait (bounded) until the segment's addresses on the router (made by Cage, or by
    /// [`Lab::plain_segment`]) and the caged hosts' addresses are usable.
    /// That includes both ports forwarding in `br-cage`: the kernel enables a bridge port
    /// when it processes the carrier change, which it batches for up to a second.
    pub fn wait_segment_ready(&self) -> Result<(), LabError> {
        let until = Instant::now() + READY_TIMEOUT;
        self.wait_no_tentative(&[Node::Router, Node::Ai1, Node::Ai2], until)?;
        let router = self.ns(Node::Router);
        loop {
            let out = checked(
                Command::new("bridge").args(["-n", &router, "link", "show"]),
                None,
            )?;
            let forwarding = |port: &str| {
                out.lines().any(|l| {
                    l.split(':')
                        .nth(1)
                        .map(|n| n.trim().split('@').next() == Some(port))
                        == Some(true)
                        && l.contains("master br-cage")
                        && l.contains("state forwarding")
                })
            };
            if self.segment_ports.iter().all(|p| forwarding(p)) {
                return Ok(());
            }
            if Instant::now() >= until {
                return Err(self.not_ready(format!(
                    "the ports of br-cage ({}) are not both forwarding:\n{out}",
                    self.segment_ports.join(", ")
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_no_tentative(&self, nodes: &[Node], until: Instant) -> Result<(), LabError> {
        for &node in nodes {
            loop {
                let out = ip(&self.ns(node), &["-6", "-o", "addr", "show", "tentative"])?;
                let failed = ip(&self.ns(node), &["-6", "-o", "addr", "show", "dadfailed"])?;
                if !failed.trim().is_empty() {
                    return Err(self.not_ready(format!(
                        "duplicate address detection failed in {node}: {}",
                        failed.trim()
                    )));
                }
                if out.trim().is_empty() {
                    break;
                }
                if Instant::now() >= until {
                    return Err(self.not_ready(format!(
                        "addresses still tentative in {node}: {}",
                        out.trim()
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    fn wait_ping(&self, node: Node, addr: IpAddr, until: Instant) -> Result<(), LabError> {
        let ns = self.netns(node);
        let mut last = String::new();
        while Instant::now() < until {
            let probe = Probe::icmp(addr).timeout(Duration::from_millis(300));
            let attempt = probe::probe_in(&ns, &probe)?;
            if attempt.outcome == Outcome::Answered {
                return Ok(());
            }
            last = attempt.outcome.to_string();
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(self.not_ready(format!("{node} cannot ping {addr}: {last}")))
    }

    fn not_ready(&self, why: String) -> LabError {
        LabError::NotReady {
            prefix: self.prefix.clone(),
            why,
        }
    }

    /// Make the AI segment the way a plain router would, with no policy at all: bridge
    /// `br-cage` with the router's addresses and both ports, the segment masqueraded out
    /// of the WAN, routes back to ai1's out-of-segment addresses. This is the baseline
    /// against which Cage's denies mean something. Not for labs that run Cage.
    pub fn plain_segment(&self) -> Result<(), LabError> {
        let router = self.ns(Node::Router);
        let lines: Vec<String> = [
            "link add br-cage type bridge mcast_snooping 0",
            "link set cage1 master br-cage",
            "link set cage2 master br-cage",
            "link set br-cage up",
            "addr add 192.168.10.1/24 dev br-cage",
            "addr add fd00:cafe:10::1/64 dev br-cage nodad",
            &format!("route add {AI1_SPOOF4}/32 dev br-cage"),
            &format!("route add {AI1_SPOOF6}/128 dev br-cage"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        ip_batch(&router, &lines)?;
        nft(
            &router,
            "table inet labplain {\n\
             \tcomment \"a router without Cage: the segment is routed and masqueraded\"\n\
             \tchain srcnat {\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\toifname \"wan\" masquerade\n\
             \t}\n\
             }\n",
        )?;
        self.wait_segment_ready()
    }

    /// Pin the router's segment addresses in `node`'s neighbour table (the router's
    /// `br-cage` MAC, permanent). A hostile host can do this; the probes need it so that
    /// packets from a spoofed source go out on the wire: resolving the router from such a
    /// source would otherwise fail first (the router's policy drops the spoofed
    /// solicitation), and "nothing arrived" would prove nothing.
    pub fn pin_router_neighbours(&self, node: Node) -> Result<(), LabError> {
        let router = self.ns(Node::Router);
        let out = ip(&router, &["-o", "link", "show", "br-cage"])?;
        let mac = out
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .ok_or_else(|| self.not_ready(format!("no MAC address on br-cage: {out}")))?
            .to_owned();
        let ns = self.ns(node);
        for addr in [ROUTER_SEG4, ROUTER_SEG6] {
            ip(
                &ns,
                &[
                    "neigh",
                    "replace",
                    &addr.to_string(),
                    "lladdr",
                    &mac,
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ],
            )?;
        }
        Ok(())
    }

    /// Run `ip -n {node} ARGS…`; its stdout.
    pub fn ip(&self, node: Node, args: &[&str]) -> Result<String, LabError> {
        ip(&self.ns(node), args)
    }

    /// `nft -f -` in a node with `script` on its standard input (one command or a
    /// whole file's worth), which must succeed.
    pub fn nft(&self, node: Node, script: &str) {
        nft(&self.ns(node), script).unwrap_or_else(|e| panic!("{e}"));
    }

    /// `nft list ruleset` in a node (for diagnostics).
    pub fn nft_ruleset(&self, node: Node) -> String {
        let cmd = &mut Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(node), "nft", "list", "ruleset"]);
        match checked(cmd, None) {
            Ok(s) => s,
            Err(e) => format!("(nft list ruleset failed: {e})"),
        }
    }

    // ---- Cage in the lab ----

    /// Where [`Lab::write_config`] writes.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("cage.conf")
    }

    /// The lab's Cage configuration. It ends with the `lan` section, so `extra` lines
    /// given to [`Lab::write_config`] that are options (e.g. `list admin_host
    /// '192.168.8.20'`) go there; `extra` may also add sections of its own.
    pub fn base_config(&self) -> String {
        let dir = self.dir.display();
        format!(
            "# Cage configuration for lab {prefix}\n\
             config cage 'main'\n\
             \toption state_dir '{dir}/state'\n\
             \toption log_dir '{dir}/log'\n\
             \toption web_listen '192.168.8.1:{web_port}'\n\
             \toption bpf_dir '{bpf}'\n\
             \n\
             config segment 'ai'\n\
             \toption bridge 'br-cage'\n\
             \toption address '192.168.10.1/24'\n\
             \toption ipv6 '1'\n\
             \toption address6 'fd00:cafe:10::1/64'\n\
             \tlist port 'cage1'\n\
             \tlist port 'cage2'\n\
             \n\
             config wan 'wan'\n\
             \tlist device 'wan'\n\
             \toption masquerade '1'\n\
             \n\
             config lan 'lan'\n\
             \tlist device 'br-lan'\n",
            prefix = self.prefix,
            bpf = bpf_dir(&self.prefix).display(),
            web_port = WEB_PORT,
        )
    }

    /// Write [`Lab::base_config`] followed by `extra` to [`Lab::config_path`].
    pub fn write_config(&self, extra: &str) -> PathBuf {
        let path = self.config_path();
        let mut text = self.base_config();
        text.push_str(extra);
        if !text.ends_with('\n') {
            text.push('\n');
        }
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// The command line that runs `cage --config <config_path> ARGS…` in the router's
    /// namespace. Panics with a clear message when there is no cage binary.
    pub fn cage_command(&self, args: &[&str]) -> Command {
        let bin = cage_bin().unwrap_or_else(|e| panic!("{e}"));
        if !self.config_path().exists() {
            self.write_config("");
        }
        let mut cmd = self.in_router_netns();
        cmd.arg(bin)
            .arg("--config")
            .arg(self.config_path())
            .args(args);
        cmd
    }

    /// A command line prefix that runs a program in the router's network namespace and
    /// nothing else: `nsenter --net=…`, not `ip netns exec`, which also gives the program
    /// a mount namespace with a fresh /sys, hiding the real bpffs at /sys/fs/bpf, so that
    /// Cage's eBPF pins would land in a private bpffs that dies with the process. On the
    /// router, `cage` runs in the one namespace there is; this is the lab's equivalent.
    pub fn in_router_netns(&self) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!(
            "--net={}/{}",
            probe::NETNS_RUN_DIR,
            self.ns(Node::Router)
        ));
        cmd
    }

    /// Run `cage ARGS…` in the router's namespace (at most 60 s) and return its output.
    pub fn cage(&self, args: &[&str]) -> Output {
        let mut cmd = self.cage_command(args);
        match run_command(&mut cmd, None, Duration::from_secs(60)) {
            Ok(out) => out,
            Err(e) => panic!("running cage {}: {e}", args.join(" ")),
        }
    }

    /// Every record of Cage's flow log, as `cage flows --json -n 0` prints them.
    pub fn flow_records(&self) -> Vec<serde_json::Value> {
        let out = self.cage(&["flows", "--json", "-n", "0"]);
        assert!(out.status.success(), "cage flows: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON record"))
            .collect()
    }

    /// Start `cage run` in the router's namespace; it is stopped when the guard drops.
    /// Its output goes to `cage-run.log` in the lab's directory.
    pub fn spawn_cage_run(&self) -> CageRun {
        self.spawn_cage_run_env(&[])
    }

    /// [`Lab::spawn_cage_run`] with these environment variables (`CAGE_LOG`,
    /// `CAGE_WATCH`).
    pub fn spawn_cage_run_env(&self, env: &[(&str, &str)]) -> CageRun {
        let log = self.dir.join("cage-run.log");
        let file = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let err = file
            .try_clone()
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let child = self
            .cage_command(&["run"])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting cage run: {e}"));
        CageRun { child, log }
    }

    /// [`Lab::spawn_cage_run`], once it has applied its policy.
    pub fn cage_run(&self) -> CageRun {
        let run = self.spawn_cage_run();
        run.wait_applied();
        run
    }

    /// [`Lab::cage_run`], then the segment ready: its ports bridged and its hosts
    /// reachable.
    pub fn cage_run_ready(&self) -> CageRun {
        let run = self.cage_run();
        self.wait_segment_ready().expect("segment ready");
        run
    }

    /// [`Lab::cage_run_ready`], and the router's neighbour entries of ai1 pinned: where a
    /// test that sends from ai1 starts.
    pub fn cage_run_ai1_ready(&self) -> CageRun {
        let run = self.cage_run_ready();
        self.pin_router_neighbours(Node::Ai1).expect("neighbours");
        run
    }

    /// Leave the lab running after this value is gone (the demo does, so that people can
    /// poke at it); `down(prefix)` or the next `Lab::up(prefix)` removes it.
    pub fn keep(mut self) {
        self.torn_down = true;
        for ns in self.namespaces.drain(..) {
            ns.keep();
        }
    }

    /// Tear the lab down now; every error, not just the first.
    pub fn down(mut self) -> Result<(), LabError> {
        self.teardown()
    }

    /// Remove the namespaces (with what runs in them) and the directories.
    fn teardown(&mut self) -> Result<(), LabError> {
        self.torn_down = true;
        let mut errors: Vec<String> = self
            .namespaces
            .drain(..)
            .filter_map(|ns| ns.remove().err())
            .map(|e| e.to_string())
            .collect();
        errors.extend(remove_dirs(&self.prefix));
        if errors.is_empty() {
            Ok(())
        } else {
            Err(LabError::Teardown {
                prefix: self.prefix.clone(),
                errors,
            })
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        if let Err(e) = self.teardown() {
            eprintln!("lab {}: {e}", self.prefix);
        }
    }
}
