//! The one path from a configuration file to enforced policy, shared by `cage check`,
//! `cage apply` and `cage run`: load → validate → detect → render → `nft --check` →
//! apply the policy → set up the segment. Any failure before "apply" changes nothing.

use std::path::Path;

use nftables::schema::Nftables;

use crate::config::{self, Config};
use crate::ebpf;
use crate::isolation;
use crate::netlink;
use crate::nft;
use crate::policy::{self, Facts};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Config(#[from] config::LoadError),
    #[error("cannot detect the WAN devices and addresses: {0}")]
    Detect(#[source] netlink::NetlinkError),
    #[error("the rendered policy did not pass the dry run, nothing was changed: {0}")]
    Check(#[source] nft::NftError),
    #[error("applying the policy failed; the kernel keeps the policy it had: {0}")]
    Apply(#[source] nft::NftError),
    #[error("the policy is applied, but setting up the segment failed: {0}")]
    Segment(#[source] netlink::NetlinkError),
}

/// A configuration turned into a ruleset that nft has accepted in a dry run.
pub struct Checked {
    pub config: Config,
    pub facts: Facts,
    pub ruleset: Nftables<'static>,
    /// The kill switch is on: the ruleset isolates the segment.
    pub isolated: bool,
}

/// Load, validate, detect and render, then dry-run the ruleset with `nft --check`.
pub async fn check(path: &Path) -> Result<Checked, ApplyError> {
    let config = config::load(path)?;
    check_config(config).await
}

/// Detect, render and dry-run an already validated configuration.
pub async fn check_config(config: Config) -> Result<Checked, ApplyError> {
    let mut facts = netlink::detect_facts(&config)
        .await
        .map_err(ApplyError::Detect)?;
    facts.bridge_meta = nft::supports_bridge_meta();
    // The bindings the kernel has learned go into the new tables, so a replace keeps
    // them. Unreadable (an nft that cannot list them) means starting afresh, first come
    // first served again: said, not fatal.
    facts.bindings = nft::bindings().unwrap_or_else(|e| {
        crate::log::warn(&format!("layer-2 bindings not carried over: {e}"));
        Default::default()
    });
    let mut ruleset = policy::render(&config, &facts);
    // A pressed kill switch is part of every policy Cage applies until it is released.
    let isolated = isolation::load(&config).isolated;
    if isolated {
        let on = policy::isolation(&config, true);
        ruleset.objects.to_mut().extend(on.objects.iter().cloned());
    }
    nft::check(&ruleset).map_err(ApplyError::Check)?;
    Ok(Checked {
        config,
        facts,
        ruleset,
        isolated,
    })
}

/// Enforce a checked ruleset, then make the segment exist. The policy goes first: its
/// rules match the segment by name, so they hold before the bridge and ports are up and
/// no port is ever in the bridge without the policy in force.
pub async fn enforce(checked: &Checked) -> Result<Vec<String>, ApplyError> {
    nft::apply(&checked.ruleset).map_err(ApplyError::Apply)?;
    let report = match netlink::setup_segment(&checked.config).await {
        Ok(r) => r,
        // OpenWrt mode, before netifd made the bridge: the policy holds by its name, and
        // `cage run` adopts the bridge when it appears.
        Err(e @ netlink::NetlinkError::BridgeMissing { .. }) => {
            crate::log::warn(&e.to_string());
            return Ok(Vec::new());
        }
        Err(e) => return Err(ApplyError::Segment(e)),
    };
    let mut actions = report.actions;
    // The eBPF program counts flows and is the kill switch's fast path; the cage holds
    // without it (nftables enforces everything), so a failure is logged, not fatal.
    match attach_ebpf(&checked.config, checked.isolated) {
        Ok(Some(a)) => actions.push(a),
        Ok(None) => {}
        Err(e) => crate::log::error(&format!(
            "eBPF not attached to {} (no flow counting, kill switch in nftables only): {e}",
            checked.config.segment.bridge
        )),
    }
    Ok(actions)
}

/// The eBPF attachment options for a configuration (in this network namespace).
pub fn ebpf_options(cfg: &Config) -> ebpf::Options {
    ebpf::Options {
        bridge: cfg.segment.bridge.clone(),
        pin_dir: cfg.pin_dir(),
        flow_entries: cfg.flowlog.max_flows,
        mode: match cfg.flowlog.attach {
            crate::config::Attach::Auto => ebpf::AttachMode::Auto,
            crate::config::Attach::Tcx => ebpf::AttachMode::Tcx,
            crate::config::Attach::Netlink => ebpf::AttachMode::Netlink,
        },
    }
}

/// Attach (idempotently) and set the kill switch's flag to `isolated`. Says what it did
/// when it attached anew.
/// The records one caged host may have in a flow map of `capacity`:
/// `limits.flow_share` percent of it, at least one; 0 (no limit) at 100 percent.
pub fn host_share(cfg: &Config, capacity: u32) -> u32 {
    match cfg.limits.flow_share {
        100.. => 0,
        p => (u64::from(capacity) * u64::from(p) / 100).max(1) as u32,
    }
}

pub fn attach_ebpf(cfg: &Config, isolated: bool) -> Result<Option<String>, ebpf::EbpfError> {
    let opts = ebpf_options(cfg);
    let a = ebpf::attach(&opts)?;
    let mut maps = ebpf::Maps::open(&opts.pin_dir)?;
    maps.set_isolated(isolated)?;
    maps.set_host_share(host_share(cfg, a.flow_capacity))?;
    let new = [a.ingress, a.egress]
        .iter()
        .any(|h| *h != ebpf::HookState::AlreadyAttached);
    Ok(new.then(|| {
        format!(
            "attached the flow counter to {} ({:?}, {} flows)",
            cfg.segment.bridge, a.mode, a.flow_capacity
        )
    }))
}
