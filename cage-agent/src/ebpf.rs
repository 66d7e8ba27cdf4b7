//! The only module that talks to BPF: loads Cage's eBPF program (built from `cage-ebpf`
//! and embedded in the binary), attaches it to the AI segment's bridge, pins what must
//! outlive the `cage` process, and reads and writes its maps.
//!
//! # What lives where
//!
//! Everything is pinned in one directory per bridge, [`default_pin_dir`]
//! (`/sys/fs/bpf/cage/<bridge>`), or wherever [`Options::pin_dir`] says: bpffs is global,
//! not per network namespace, so lab tests in different namespaces use different ones.
//!
//! | pin | what |
//! | --- | --- |
//! | `CAGE_FLOWS`, `CAGE_CONTROL`, `CAGE_STATS` | the maps (see `cage-common`) |
//! | `cage_tc_ingress`, `cage_tc_egress` | the two programs |
//! | `link_ingress`, `link_egress` | the TCX links (TCX attachments only) |
//!
//! A program attached through netlink (clsact + direct-action cls_bpf filter) is held by
//! its filter; a TCX link by its pin. Either way the program keeps counting and the kill
//! switch keeps dropping after `cage` exits or dies: fail closed. Only [`detach`] removes
//! it (for `cage disable`).
//!
//! # Attaching
//!
//! [`attach`] is idempotent: it opens the pinned maps rather than making new ones, uses
//! the pinned program when it is the same code as this binary's (same kernel tag and
//! maps) and swaps in this binary's otherwise (an upgrade: atomically, through the TCX
//! link or by replacing the netlink filter in place), and attaches only where it is not
//! attached yet. TCX is used where the kernel has it (6.6 and later), netlink otherwise;
//! [`AttachMode`] forces one. Switching mode removes the other kind of attachment after
//! the new one is in place, so the program never runs twice on a packet for long.
//!
//! Kernel BTF is never needed (the object has no BTF and no CO-RE relocations; the
//! loader is told not to look for `/sys/kernel/btf/vmlinux`).
//!
//! Network interfaces are looked up, and netlink spoken, in the calling thread's network
//! namespace; call from a thread in the namespace of the bridge.

use std::collections::HashMap as StdHashMap;
use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType};
use aya::util::KernelVersion;
use aya::EbpfLoader;
use cage_common::{
    Control, FlowKey, FlowValue, HostFlows, HostKey, DEFAULT_FLOW_ENTRIES, MAP_CONTROL, MAP_FLOWS,
    MAP_HOSTS, MAP_STATS, PROG_EGRESS, PROG_INGRESS, STAT_COUNT, STAT_FLOWS_CREATED,
    STAT_FLOW_UPDATE_FAILED, STAT_ISOLATED_DROPPED, STAT_MALFORMED, STAT_NOT_IP, STAT_OVER_SHARE,
};

/// The eBPF object, built by `build.rs` (which fails when it cannot build it).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cage-ebpf.o"));

/// Where Cage pins its BPF objects, one directory per bridge below.
pub const PIN_ROOT: &str = "/sys/fs/bpf/cage";

/// Priority of Cage's netlink filter: 1, the first filter, so the kill switch drops
/// before anything else (a mirred redirect to an ifb, say) sees the packet.
const NL_PRIORITY: u16 = 1;
/// Handle of Cage's netlink filter ("CA6E"), so re-attaching replaces it in place.
const NL_HANDLE: TcHandle = TcHandle::new(0, 0xCA6E);

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: u32 = 0xCAFE_4A11;

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{} is not on a bpffs (mount -t bpf bpf /sys/fs/bpf)", .0.display())]
    NotBpffs(PathBuf),
    #[error("no interface {0} in this network namespace")]
    NoInterface(String),
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("{op}: {source}")]
    Program {
        op: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("{op}: {source}")]
    Map {
        op: String,
        #[source]
        source: Box<MapError>,
    },
    #[error("{op}: {source}")]
    Link {
        op: String,
        #[source]
        source: Box<LinkError>,
    },
    #[error("{op}: {source}")]
    Tc {
        op: String,
        #[source]
        source: Box<TcError>,
    },
    #[error("{op}: {source}")]
    Pin {
        op: String,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
}

fn program_err(op: impl Into<String>) -> impl FnOnce(ProgramError) -> EbpfError {
    let op = op.into();
    move |source| EbpfError::Program {
        op,
        source: Box::new(source),
    }
}

fn map_err(op: impl Into<String>) -> impl FnOnce(MapError) -> EbpfError {
    let op = op.into();
    move |source| EbpfError::Map {
        op,
        source: Box::new(source),
    }
}

fn link_err(op: impl Into<String>) -> impl FnOnce(LinkError) -> EbpfError {
    let op = op.into();
    move |source| EbpfError::Link {
        op,
        source: Box::new(source),
    }
}

fn tc_err(op: impl Into<String>) -> impl FnOnce(TcError) -> EbpfError {
    let op = op.into();
    move |source| EbpfError::Tc {
        op,
        source: Box::new(source),
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> EbpfError {
    let path = path.to_path_buf();
    move |source| EbpfError::Io { op, path, source }
}

/// How to attach to the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX where the kernel has it (6.6 and later), netlink otherwise.
    Auto,
    /// A TCX link (bpf_link), pinned.
    Tcx,
    /// A clsact qdisc and a direct-action cls_bpf filter, through netlink.
    Netlink,
}

impl AttachMode {
    /// What [`AttachMode::Auto`] means on this kernel.
    pub fn resolve(self) -> AttachMode {
        match self {
            AttachMode::Auto if kernel_has_tcx() => AttachMode::Tcx,
            AttachMode::Auto => AttachMode::Netlink,
            mode => mode,
        }
    }
}

/// Whether the running kernel has TCX (Linux 6.6, `CONFIG_NET_XGRESS`, which clsact's
/// `NET_INGRESS`/`NET_EGRESS` select).
pub fn kernel_has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// The pin directory for a bridge: `/sys/fs/bpf/cage/<bridge>`.
pub fn default_pin_dir(bridge: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(bridge)
}

#[derive(Debug, Clone)]
pub struct Options {
    /// The AI segment's bridge device.
    pub bridge: String,
    /// Where the maps, programs and links are pinned (must be on a bpffs).
    pub pin_dir: PathBuf,
    /// Size of the flow map. Takes effect when the map is created: an existing pinned map
    /// keeps its size until [`detach`] (see [`Attachment::flow_capacity`]).
    pub flow_entries: u32,
    pub mode: AttachMode,
}

impl Options {
    pub fn new(bridge: &str) -> Options {
        Options {
            bridge: bridge.to_owned(),
            pin_dir: default_pin_dir(bridge),
            flow_entries: DEFAULT_FLOW_ENTRIES,
            mode: AttachMode::Auto,
        }
    }
}

/// The bridge's two hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Frames from the caged hosts into the router.
    Ingress,
    /// Frames from the router to the caged hosts.
    Egress,
}

impl Hook {
    pub const BOTH: [Hook; 2] = [Hook::Ingress, Hook::Egress];

    fn program(self) -> &'static str {
        match self {
            Hook::Ingress => PROG_INGRESS,
            Hook::Egress => PROG_EGRESS,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::Ingress => TcAttachType::Ingress,
            Hook::Egress => TcAttachType::Egress,
        }
    }

    fn link_pin(self) -> &'static str {
        match self {
            Hook::Ingress => "link_ingress",
            Hook::Egress => "link_egress",
        }
    }
}

/// What [`attach`] did at one hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookState {
    /// Newly attached.
    Attached,
    /// It was attached already, with the same program: nothing changed.
    AlreadyAttached,
    /// It was attached with another program (an older `cage`), now swapped atomically.
    Replaced,
}

/// The result of [`attach`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// [`AttachMode::Tcx`] or [`AttachMode::Netlink`].
    pub mode: AttachMode,
    pub ingress: HookState,
    pub egress: HookState,
    /// The flow map's actual size (an existing pinned map keeps its own).
    pub flow_capacity: u32,
}

/// Load (or find) Cage's program and attach it to both hooks of `opts.bridge`;
/// idempotent (see the module documentation).
pub fn attach(opts: &Options) -> Result<Attachment, EbpfError> {
    if_index(&opts.bridge)?;
    ensure_pin_dir(&opts.pin_dir)?;
    let mode = opts.mode.resolve();

    let mut loader = EbpfLoader::new();
    // No kernel BTF needed, and none looked for: stock OpenWrt kernels have none.
    loader.btf(None);
    loader.map_max_entries(MAP_FLOWS, opts.flow_entries);
    let pins: Vec<(&str, PathBuf)> = [MAP_FLOWS, MAP_CONTROL, MAP_STATS, MAP_HOSTS]
        .into_iter()
        .map(|m| (m, opts.pin_dir.join(m)))
        .collect();
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    let mut bpf = loader
        .load(OBJECT)
        .map_err(|e| EbpfError::Load(Box::new(e)))?;

    let mut states = Vec::new();
    for hook in Hook::BOTH {
        let name = hook.program();
        let fresh: &mut SchedClassifier = bpf
            .program_mut(name)
            .ok_or(EbpfError::Missing(name))?
            .try_into()
            .map_err(program_err(format!("{name} is not a TC classifier")))?;
        states.push(attach_hook(fresh, opts, mode, hook)?);
    }
    let flow_capacity = Maps::open(&opts.pin_dir)?.flow_capacity()?;
    Ok(Attachment {
        mode,
        ingress: states[0],
        egress: states[1],
        flow_capacity,
    })
}

fn attach_hook(
    fresh: &mut SchedClassifier,
    opts: &Options,
    mode: AttachMode,
    hook: Hook,
) -> Result<HookState, EbpfError> {
    let name = hook.program();
    let bridge = opts.bridge.as_str();
    fresh
        .load()
        .map_err(program_err(format!("loading {name} into the kernel")))?;

    // The pinned program is kept when it is this binary's code on the pinned maps
    // (the kernel's tag ignores map fds, so compare the maps too).
    let prog_pin = opts.pin_dir.join(name);
    let mut pinned = match SchedClassifier::from_pin(&prog_pin) {
        Ok(p) => Some(p),
        Err(_) if !prog_pin.exists() => None,
        Err(e) => return Err(program_err(format!("opening {}", prog_pin.display()))(e)),
    };
    let mut upgrade = false;
    if let Some(p) = &pinned {
        if !same_program(p, fresh)? {
            std::fs::remove_file(&prog_pin).map_err(io_err("unpinning", &prog_pin))?;
            pinned = None;
            upgrade = true;
        }
    }
    let prog: &mut SchedClassifier = match pinned.as_mut() {
        Some(p) => p,
        None => {
            fresh.pin(&prog_pin).map_err(|source| EbpfError::Pin {
                op: format!("pinning {name} at {}", prog_pin.display()),
                source: Box::new(source),
            })?;
            fresh
        }
    };
    let prog_id = prog
        .info()
        .map_err(program_err(format!("reading {name}'s info")))?
        .id();

    let link_pin = opts.pin_dir.join(hook.link_pin());
    match mode {
        AttachMode::Tcx => {
            let state = attach_tcx(prog, prog_id, bridge, hook, &link_pin)?;
            // A netlink filter from an earlier netlink attachment would run the program a
            // second time; remove it now that the TCX link is in place.
            remove_netlink_filter(bridge, hook)?;
            Ok(state)
        }
        _ => {
            let state = attach_netlink(prog, upgrade, bridge, hook)?;
            // Likewise a TCX link from an earlier TCX attachment: unpinning frees it.
            remove_tcx_link(bridge, hook, &link_pin)?;
            Ok(state)
        }
    }
}

/// Same code (kernel tag) on the same maps.
fn same_program(a: &SchedClassifier, b: &SchedClassifier) -> Result<bool, EbpfError> {
    let info = |p: &SchedClassifier| -> Result<(u64, Vec<u32>), EbpfError> {
        let info = p.info().map_err(program_err("reading program info"))?;
        let mut maps = info
            .map_ids()
            .map_err(program_err("reading program map ids"))?
            .unwrap_or_default();
        maps.sort_unstable();
        Ok((info.tag(), maps))
    };
    Ok(info(a)? == info(b)?)
}

fn attach_tcx(
    prog: &mut SchedClassifier,
    prog_id: u32,
    bridge: &str,
    hook: Hook,
    link_pin: &Path,
) -> Result<HookState, EbpfError> {
    let name = hook.program();
    match PinnedLink::from_pin(link_pin) {
        Ok(pinned) => {
            let link = FdLink::from(pinned);
            let linked = link
                .info()
                .map_err(link_err(format!("reading {}", link_pin.display())))?
                .program_id();
            if tcx_attached(bridge, hook)?.contains(&linked) {
                if linked == prog_id {
                    return Ok(HookState::AlreadyAttached);
                }
                // Another program (an older cage's) on our link: swap it atomically. The
                // pin stays on the link, which is the same object after the update.
                let link = SchedClassifierLink::try_from(link)
                    .map_err(link_err(format!("{} as a TCX link", link_pin.display())))?;
                let id = prog.attach_to_link(link).map_err(program_err(format!(
                    "replacing the program on {bridge} {hook:?}"
                )))?;
                drop(
                    prog.take_link(id)
                        .map_err(program_err("taking the TCX link"))?,
                );
                return Ok(HookState::Replaced);
            }
            // The link outlived its device (the bridge was deleted and made again):
            // drop it and attach anew.
            drop(link);
            remove_pin(link_pin)?;
        }
        Err(_) if !link_pin.exists() => {}
        Err(e) => return Err(link_err(format!("opening {}", link_pin.display()))(e)),
    }
    // First, so the kill switch drops before any other TCX program sees the packet.
    let id = prog
        .attach_with_options(
            bridge,
            hook.attach_type(),
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        )
        .map_err(program_err(format!(
            "attaching {name} to {bridge} with TCX"
        )))?;
    let link: FdLink = prog
        .take_link(id)
        .map_err(program_err("taking the TCX link"))?
        .try_into()
        .map_err(link_err("a TCX link as an fd link"))?;
    link.pin(link_pin).map_err(|source| EbpfError::Pin {
        op: format!("pinning the TCX link at {}", link_pin.display()),
        source: Box::new(source),
    })?;
    Ok(HookState::Attached)
}

/// Ids of the programs attached to a bridge hook through TCX.
pub fn tcx_attached(bridge: &str, hook: Hook) -> Result<Vec<u32>, EbpfError> {
    let (_revision, programs) = SchedClassifier::query_tcx(bridge, hook.attach_type())
        .map_err(program_err(format!("querying TCX programs on {bridge}")))?;
    Ok(programs.iter().map(|p| p.id()).collect())
}

fn attach_netlink(
    prog: &mut SchedClassifier,
    upgrade: bool,
    bridge: &str,
    hook: Hook,
) -> Result<HookState, EbpfError> {
    let name = hook.program();
    match tc::qdisc_add_clsact(bridge) {
        Ok(()) => {}
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(tc_err(format!("adding the clsact qdisc to {bridge}"))(e)),
    }
    // Replace our filter in place when it is there (same priority and handle): atomic,
    // and never a second filter. Only when there is none, create it.
    let ours =
        SchedClassifierLink::attached(bridge, hook.attach_type(), NL_PRIORITY, NL_HANDLE, None)
            .map_err(|source| EbpfError::Io {
                op: "looking up",
                path: PathBuf::from(bridge),
                source,
            })?;
    let (id, state) = match prog.attach_to_link(ours) {
        Ok(id) if upgrade => (id, HookState::Replaced),
        Ok(id) => (id, HookState::AlreadyAttached),
        Err(_) => {
            let id = prog
                .attach_with_options(
                    bridge,
                    hook.attach_type(),
                    TcAttachOptions::Netlink(NlOptions {
                        priority: NL_PRIORITY,
                        handle: NL_HANDLE,
                        classid: None,
                    }),
                )
                .map_err(program_err(format!(
                    "attaching {name} to {bridge} through netlink"
                )))?;
            (id, HookState::Attached)
        }
    };
    let link = prog
        .take_link(id)
        .map_err(program_err("taking the netlink link"))?;
    // Dropping aya's link would delete the filter; the filter is meant to outlive this
    // process (fail closed), and the link holds no resource (only ifindex, priority,
    // handle), so forgetting it leaks nothing.
    std::mem::forget(link);
    Ok(state)
}

/// Remove Cage's netlink filter from a hook, if it has one.
fn remove_netlink_filter(bridge: &str, hook: Hook) -> Result<(), EbpfError> {
    match tc::qdisc_detach_program(bridge, hook.attach_type(), hook.program()) {
        Ok(()) => Ok(()),
        // No filter of ours, or no clsact qdisc at all.
        Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(TcError::NetlinkError(e))
            if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) =>
        {
            Ok(())
        }
        Err(e) => Err(tc_err(format!(
            "removing Cage's filter from {bridge} {hook:?}"
        ))(e)),
    }
}

/// Unpin a TCX link of ours and return once the kernel has taken it off the hook. The
/// pin is the link's last reference, but the kernel may free a link after the unlink
/// returns (its release can be deferred), and until then the program runs a second
/// time beside the netlink filter that replaced it: every packet counted twice.
fn remove_tcx_link(bridge: &str, hook: Hook, link_pin: &Path) -> Result<(), EbpfError> {
    let linked = match PinnedLink::from_pin(link_pin) {
        // The id only: the fd is closed again before the pin goes, or it would keep
        // the link.
        Ok(pinned) => FdLink::from(pinned)
            .info()
            .map_err(link_err(format!("reading {}", link_pin.display())))?
            .program_id(),
        Err(_) if !link_pin.exists() => return Ok(()),
        Err(e) => return Err(link_err(format!("opening {}", link_pin.display()))(e)),
    };
    remove_pin(link_pin)?;
    let until = Instant::now() + Duration::from_secs(2);
    while tcx_attached(bridge, hook)?.contains(&linked) {
        if Instant::now() > until {
            return Err(EbpfError::Io {
                op: "removing the earlier TCX link (still attached 2 s after unpinning)",
                path: link_pin.to_path_buf(),
                source: io::Error::from(io::ErrorKind::TimedOut),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn remove_pin(path: &Path) -> Result<(), EbpfError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("unpinning", path)(e)),
    }
}

/// Take Cage's program off the bridge and remove every pin (`cage disable`). Collects
/// every error instead of stopping at the first; a bridge that is gone is not an error.
pub fn detach(bridge: &str, pin_dir: &Path) -> Result<(), Vec<EbpfError>> {
    let mut errors = Vec::new();
    let bridge_exists = if_index(bridge).is_ok();
    for hook in Hook::BOTH {
        if let Err(e) = remove_pin(&pin_dir.join(hook.link_pin())) {
            errors.push(e);
        }
        if bridge_exists {
            if let Err(e) = remove_netlink_filter(bridge, hook) {
                errors.push(e);
            }
        }
        if let Err(e) = remove_pin(&pin_dir.join(hook.program())) {
            errors.push(e);
        }
    }
    for map in [MAP_FLOWS, MAP_CONTROL, MAP_STATS, MAP_HOSTS] {
        if let Err(e) = remove_pin(&pin_dir.join(map)) {
            errors.push(e);
        }
    }
    match std::fs::remove_dir(pin_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => errors.push(io_err("removing", pin_dir)(e)),
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Whether Cage's maps are pinned in `pin_dir` (the program was attached at some point
/// and not detached since).
pub fn is_pinned(pin_dir: &Path) -> bool {
    pin_dir.join(MAP_CONTROL).exists()
}

/// The counters of `CAGE_STATS`, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Flow records created.
    pub flows_created: u64,
    /// Packets whose flow could not be recorded: loss.
    pub flow_update_failed: u64,
    /// Frames dropped by the kill switch.
    pub isolated_dropped: u64,
    /// Non-IP frames (passed, not recorded).
    pub not_ip: u64,
    /// IP packets with unreadable headers (passed, not recorded).
    pub malformed: u64,
    /// New flows not recorded because their host had its share of the map.
    pub over_share: u64,
}

/// The pinned maps, opened from their pins (no program is loaded: cheap, and usable from
/// any process, such as `cage isolate` while the daemon is down).
pub struct Maps {
    flows: HashMap<MapData, FlowKey, FlowValue>,
    control: Array<MapData, Control>,
    stats: PerCpuArray<MapData, u64>,
    /// Each host's part of the flow map; absent where an older `cage` pinned the maps
    /// and its program is still attached (then no host is held to a share).
    hosts: Option<HashMap<MapData, HostKey, HostFlows>>,
    flow_capacity: u32,
}

impl Maps {
    pub fn open(pin_dir: &Path) -> Result<Maps, EbpfError> {
        let open = |name: &str| -> Result<Map, EbpfError> {
            let path = pin_dir.join(name);
            let data =
                MapData::from_pin(&path).map_err(map_err(format!("opening {}", path.display())))?;
            Map::from_map_data(data).map_err(map_err(format!("{} as a map", path.display())))
        };
        let flows_data = MapData::from_pin(pin_dir.join(MAP_FLOWS)).map_err(map_err(format!(
            "opening {}",
            pin_dir.join(MAP_FLOWS).display()
        )))?;
        let flow_capacity = flows_data
            .info()
            .map_err(map_err("reading the flow map's info"))?
            .max_entries();
        let flows = Map::from_map_data(flows_data)
            .map_err(map_err("the flow map"))?
            .try_into()
            .map_err(map_err("the flow map as a hash map"))?;
        let control = open(MAP_CONTROL)?
            .try_into()
            .map_err(map_err("the control map as an array"))?;
        let stats = open(MAP_STATS)?
            .try_into()
            .map_err(map_err("the stats map as a per-CPU array"))?;
        let hosts = match pin_dir.join(MAP_HOSTS).exists() {
            true => Some(
                open(MAP_HOSTS)?
                    .try_into()
                    .map_err(map_err("the hosts map as a hash map"))?,
            ),
            false => None,
        };
        Ok(Maps {
            flows,
            control,
            stats,
            hosts,
            flow_capacity,
        })
    }

    /// The flow map's size.
    pub fn flow_capacity(&self) -> Result<u32, EbpfError> {
        Ok(self.flow_capacity)
    }

    /// Every flow record in the map. The map changes while it is read (the kernel keeps
    /// counting, the LRU may evict), so a record may be a packet behind; a key is never
    /// returned twice.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>, EbpfError> {
        // A vector, sorted and deduplicated afterwards: a hash map of 64 k records held
        // twice their size in buckets, and its conversion to a vector another copy. The
        // capacity is reserved, not touched: only what the walk fills becomes resident.
        let limit = 2 * self.flow_capacity as usize + 16;
        let mut all = Vec::with_capacity(self.flow_capacity as usize + 16);
        // Bounded: a walk restarts from the first key when the key it stands on is
        // evicted, so under churn it could go on; twice the capacity is plenty.
        for item in self.flows.iter().take(limit) {
            match item {
                Ok(kv) => all.push(kv),
                // Removed between the key walk and the lookup: gone, not an error.
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err("reading the flow map")(e)),
            }
        }
        // A key read twice (the walk restarted): the later reading, which is newer.
        all.reverse();
        all.sort_by_key(|(k, _)| *k);
        all.dedup_by_key(|(k, _)| *k);
        Ok(all)
    }

    /// One flow's record, if the map has it.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>, EbpfError> {
        match self.flows.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err("reading a flow")(e)),
        }
    }

    /// Remove a record the collector has written out.
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<(), EbpfError> {
        // Gone already: the LRU evicted it after the collector read it. It was written,
        // so it counts as removed, not as lost (aya reports ENOENT as a syscall error).
        match self.flows.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(e) => Err(map_err("removing a flow")(e)),
        }
    }

    pub fn stats(&self) -> Result<Stats, EbpfError> {
        let mut sums = [0u64; STAT_COUNT as usize];
        for (i, sum) in (0..STAT_COUNT).zip(sums.iter_mut()) {
            let per_cpu = self
                .stats
                .get(&i, 0)
                .map_err(map_err(format!("reading counter {i}")))?;
            *sum = per_cpu.iter().sum();
        }
        let at = |i: u32| sums[i as usize];
        Ok(Stats {
            flows_created: at(STAT_FLOWS_CREATED),
            flow_update_failed: at(STAT_FLOW_UPDATE_FAILED),
            isolated_dropped: at(STAT_ISOLATED_DROPPED),
            not_ip: at(STAT_NOT_IP),
            malformed: at(STAT_MALFORMED),
            over_share: at(STAT_OVER_SHARE),
        })
    }

    /// Packets whose flow could not be recorded (the loss counter).
    pub fn loss(&self) -> Result<u64, EbpfError> {
        Ok(self.stats()?.flow_update_failed)
    }

    /// Turn the kill switch's fast path on or off: one map write, effective from the next
    /// packet on both hooks.
    pub fn set_isolated(&mut self, isolated: bool) -> Result<(), EbpfError> {
        self.change_control(|c| c.isolated = u32::from(isolated))
    }

    pub fn isolated(&self) -> Result<bool, EbpfError> {
        Ok(self.control()?.isolated != 0)
    }

    /// Records one host may have in the flow map at once (0: no limit).
    pub fn set_host_share(&mut self, share: u32) -> Result<(), EbpfError> {
        self.change_control(|c| c.host_share = share)
    }

    fn control(&self) -> Result<Control, EbpfError> {
        self.control
            .get(&0, 0)
            .map_err(map_err("reading the control map"))
    }

    /// Change one switch of the control record, keeping the others. Only `cage` writes
    /// it, one process at a time for each switch.
    fn change_control(&mut self, change: impl FnOnce(&mut Control)) -> Result<(), EbpfError> {
        let mut control = self.control()?;
        change(&mut control);
        self.control
            .set(0, control, 0)
            .map_err(map_err("writing the control map"))
    }

    /// Each host's part of the flow map as the program counts it.
    pub fn hosts(&self) -> Result<Vec<(HostKey, HostFlows)>, EbpfError> {
        let Some(hosts) = &self.hosts else {
            return Ok(Vec::new());
        };
        let mut all = Vec::new();
        for item in hosts.iter().take(2 * cage_common::HOST_ENTRIES as usize) {
            match item {
                Ok(kv) => all.push(kv),
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err("reading the hosts map")(e)),
            }
        }
        Ok(all)
    }

    /// Set each host's count of records to what the map holds now (`counts`; a host
    /// not in it has none): the program counts up, records written out and evicted are
    /// counted down here. Keeps what the program counted over its share.
    pub fn set_host_flows(&mut self, counts: &StdHashMap<HostKey, u32>) -> Result<(), EbpfError> {
        let known = self.hosts()?;
        let Some(hosts) = &mut self.hosts else {
            return Ok(());
        };
        for (key, mut value) in known {
            value.flows = counts.get(&key).copied().unwrap_or(0);
            match hosts.insert(key, value, 0) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err("writing the hosts map")(e)),
            }
        }
        Ok(())
    }
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock of [`FlowValue::first_seen_ns`] and
/// [`FlowValue::last_seen_ns`] (`bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

fn if_index(name: &str) -> Result<u32, EbpfError> {
    let c = CString::new(name).map_err(|_| EbpfError::NoInterface(name.to_owned()))?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(EbpfError::NoInterface(name.to_owned())),
        i => Ok(i),
    }
}

/// Make the pin directory, mounting bpffs on /sys/fs/bpf first if nothing is mounted
/// there (OpenWrt mounts it; a minimal system may not).
fn ensure_pin_dir(pin_dir: &Path) -> Result<(), EbpfError> {
    let root = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(root) && !is_bpffs(root) {
        mount_bpffs(root)?;
    }
    std::fs::create_dir_all(pin_dir).map_err(io_err("creating", pin_dir))?;
    if !is_bpffs(pin_dir) {
        return Err(EbpfError::NotBpffs(pin_dir.to_path_buf()));
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct we own from a valid path.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as u32 == BPF_FS_MAGIC
    }
}

fn mount_bpffs(root: &Path) -> Result<(), EbpfError> {
    let target = CString::new(root.as_os_str().as_encoded_bytes()).expect("no NUL in the path");
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io_err("mounting bpffs on", root)(io::Error::last_os_error()));
    }
    Ok(())
}
