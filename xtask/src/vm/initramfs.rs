//! The guest's root: an initramfs (newc cpio, uncompressed: an emulated CPU unpacks
//! nothing faster than nothing) with busybox, Debian's nft and iproute2 with exactly the
//! shared libraries their ELF headers name, the kernel modules Cage and the lab need with
//! everything they depend on (in load order), the static `cage` and `vmlab`, and `/init`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::arch::Arch;
use super::debian::Unpacked;

/// Programs from the packages, by their path in the package.
pub const PROGRAMS: &[&str] = &[
    "usr/sbin/nft",
    "bin/ip",
    "sbin/ip",
    "sbin/bridge",
    "sbin/tc",
];

/// The kernel modules to load, by name; what they depend on is added and loaded first.
/// What Cage's rulesets use (nf_tables with conntrack, NAT, masquerade, redirect, fib,
/// reject in every family, limit, log to NFLOG, quota, connlimit, the bridge family's
/// `meta ibrname`, named counters), what the eBPF program attaches with before TCX (the clsact qdisc in
/// sch_ingress and cls_bpf), the lab's links (veth, bridge, 802.1Q), and the flowtable
/// that fw4 writes with `flow_offloading`.
pub const MODULES: &[&str] = &[
    // libcrc32c's soft dependency (`softdep=pre: crc32c`: the algorithm it asks the
    // crypto API for at load time; there is no modprobe in the guest to fetch it then).
    "crc32c_generic",
    "veth",
    "bridge",
    "8021q",
    "sch_ingress",
    "cls_bpf",
    "nf_tables",
    "nf_conntrack",
    "nft_ct",
    "nft_chain_nat",
    "nft_nat",
    "nft_masq",
    "nft_redir",
    "nft_reject",
    "nft_reject_inet",
    "nft_reject_ipv4",
    "nft_reject_ipv6",
    "nft_reject_bridge",
    "nft_fib",
    "nft_fib_inet",
    "nft_fib_ipv4",
    "nft_fib_ipv6",
    "nft_limit",
    "nft_log",
    "nf_log_syslog",
    "nfnetlink_log",
    "nft_quota",
    // Named counters (`counter name "…"`, every deny rule's).
    "nft_objref",
    "nft_connlimit",
    "nft_hash",
    "nft_numgen",
    "nft_meta_bridge",
    "nf_flow_table",
    "nf_flow_table_inet",
    "nft_flow_offload",
];

/// Where the guest finds its list of modules (paths, in load order).
pub const MODULE_LIST: &str = "etc/vmlab/modules";

#[derive(Debug, Clone)]
enum Entry {
    Dir,
    File { mode: u32, data: Vec<u8> },
    Symlink(String),
    CharDev(u32, u32),
}

/// A file tree to pack, by path without the leading `/`.
#[derive(Default)]
pub struct Tree {
    entries: BTreeMap<String, Entry>,
}

impl Tree {
    fn dirs_for(&mut self, path: &str) {
        let mut p = Path::new(path).parent();
        while let Some(dir) = p {
            let s = dir.to_string_lossy().into_owned();
            if s.is_empty() {
                break;
            }
            self.entries.entry(s).or_insert(Entry::Dir);
            p = dir.parent();
        }
    }

    pub fn dir(&mut self, path: &str) {
        self.dirs_for(path);
        self.entries.insert(path.to_owned(), Entry::Dir);
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        self.dirs_for(path);
        self.entries
            .insert(path.to_owned(), Entry::File { mode, data });
    }

    pub fn copy(&mut self, path: &str, mode: u32, from: &Path) -> Result<()> {
        let data = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        self.file(path, mode, data);
        Ok(())
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.dirs_for(path);
        self.entries
            .insert(path.to_owned(), Entry::Symlink(target.to_owned()));
    }

    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) {
        self.dirs_for(path);
        self.entries
            .insert(path.to_owned(), Entry::CharDev(major, minor));
    }

    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path)
    }

    /// The tree as a newc ("070701") cpio archive, what the kernel unpacks as initramfs.
    pub fn cpio(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, entry)) in (1u32..).zip(&self.entries) {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match entry {
                Entry::Dir => (0o040755, &[], (0, 0)),
                Entry::File { mode, data } => (0o100000 | mode, data, (0, 0)),
                Entry::Symlink(target) => (0o120777, target.as_bytes(), (0, 0)),
                Entry::CharDev(ma, mi) => (0o020600, &[], (*ma, *mi)),
            };
            newc_entry(&mut out, ino, mode, path, data, rdev);
        }
        newc_entry(&mut out, 0, 0, "TRAILER!!!", &[], (0, 0));
        out
    }

    pub fn size(&self) -> usize {
        self.entries
            .values()
            .map(|e| match e {
                Entry::File { data, .. } => data.len(),
                _ => 0,
            })
            .sum()
    }
}

fn newc_entry(out: &mut Vec<u8>, ino: u32, mode: u32, name: &str, data: &[u8], rdev: (u32, u32)) {
    let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Normalise `a/b/../c` to `a/c` (no filesystem access), without a leading `/`.
fn normalise(path: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    parts.join("/")
}

/// Where a path of the guest is in the packages: the file on the host, its real path in
/// the guest, and the symlinks passed on the way (guest path, target).
type Located = (PathBuf, String, Vec<(String, String)>);

/// Find `path` (no leading `/`) in the package roots, following symlinks as the guest
/// would.
fn locate(roots: &[PathBuf], path: &str) -> Option<Located> {
    let mut path = path.to_owned();
    let mut links = Vec::new();
    for _ in 0..16 {
        let mut next = None;
        for root in roots {
            let host = root.join(&path);
            let Ok(meta) = std::fs::symlink_metadata(&host) else {
                continue;
            };
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&host).ok()?;
                let target_s = target.to_string_lossy().into_owned();
                let resolved = if target.is_absolute() {
                    normalise(&target)
                } else {
                    normalise(
                        &Path::new(&path)
                            .parent()
                            .unwrap_or(Path::new(""))
                            .join(&target),
                    )
                };
                links.push((path.clone(), target_s));
                next = Some(resolved);
                break;
            } else if meta.is_file() {
                return Some((host, path, links));
            }
        }
        path = next?;
    }
    None
}

/// Add `path` from the packages (with the symlinks leading to it).
fn add_from_packages(tree: &mut Tree, roots: &[PathBuf], path: &str) -> Result<PathBuf> {
    let (host, real, links) =
        locate(roots, path).with_context(|| format!("/{path} is in none of the packages"))?;
    for (link, target) in links {
        tree.symlink(&link, &target);
    }
    if !tree.contains(&real) {
        tree.copy(&real, 0o755, &host)?;
    }
    Ok(host)
}

/// What an ELF file asks the dynamic loader for: its interpreter and NEEDED libraries.
fn elf_needs(file: &Path) -> Result<(Option<String>, Vec<String>)> {
    let out = Command::new("readelf")
        .args(["-W", "-l", "-d"])
        .arg(file)
        .output()
        .context("cannot run readelf (binutils)")?;
    if !out.status.success() {
        bail!(
            "readelf {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let bracket = |l: &str| {
        l.rsplit_once('[')
            .and_then(|(_, r)| r.split_once(']'))
            .map(|(v, _)| v.trim().to_owned())
    };
    let interp = text.lines().find_map(|l| {
        let (_, rest) = l.split_once("Requesting program interpreter:")?;
        Some(rest.split(']').next()?.trim().to_owned())
    });
    let needed = text
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(bracket)
        .collect();
    Ok((interp, needed))
}

/// Add the programs and every library they load, transitively.
pub fn add_programs(tree: &mut Tree, arch: &Arch, pk: &Unpacked) -> Result<()> {
    // busybox-static: /init's shell, and the applets behind the real tools on PATH.
    add_from_packages(tree, &pk.roots, "bin/busybox")?;
    let mut queue: Vec<(String, PathBuf)> = Vec::new();
    for program in PROGRAMS {
        let host = add_from_packages(tree, &pk.roots, program)?;
        queue.push((program.to_string(), host));
    }
    let lib_dirs = [
        format!("lib/{}", arch.triplet),
        format!("usr/lib/{}", arch.triplet),
        "lib".to_owned(),
        "usr/lib".to_owned(),
    ];
    let mut seen = BTreeSet::new();
    while let Some((who, host)) = queue.pop() {
        let (interp, needed) = elf_needs(&host)?;
        if let Some(interp) = interp {
            let path = interp.trim_start_matches('/').to_owned();
            if seen.insert(path.clone()) {
                add_from_packages(tree, &pk.roots, &path)
                    .with_context(|| format!("the loader of /{who}"))?;
            }
        }
        for lib in needed {
            if !seen.insert(lib.clone()) {
                continue;
            }
            let found = lib_dirs
                .iter()
                .map(|d| format!("{d}/{lib}"))
                .find(|p| locate(&pk.roots, p).is_some())
                .with_context(|| {
                    format!(
                        "{lib} (needed by /{who}) is in none of the packages: add its \
                         package to debian::USERSPACE"
                    )
                })?;
            let host = add_from_packages(tree, &pk.roots, &found)?;
            queue.push((found, host));
        }
    }
    Ok(())
}

/// The `depends=` of a module's `.modinfo` section.
fn module_depends(data: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    data.windows(key.len())
        .position(|w| w == key)
        .map(|at| {
            let rest = &data[at + key.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn module_name(file: &Path) -> String {
    file.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .trim_end_matches(".ko")
        .replace('-', "_")
}

/// Add [`MODULES`] and what they depend on, and the list in load order; the number of
/// modules.
pub fn add_modules(tree: &mut Tree, pk: &Unpacked) -> Result<usize> {
    let base = pk.kernel.join("lib/modules").join(&pk.release);
    let mut index: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut stack = vec![base.join("kernel")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "ko") {
                index.insert(module_name(&p), p);
            }
        }
    }
    // Depth first, dependencies before dependents.
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<(PathBuf, Vec<u8>)>,
        release: &str,
    ) -> Result<()> {
        let name = name.replace('-', "_");
        if done.contains(&name) {
            return Ok(());
        }
        done.insert(name.clone());
        let file = index.get(&name).with_context(|| {
            format!("kernel module {name} is not in linux-image-{release}: that kernel lacks a feature Cage's VM tests need")
        })?;
        let data = std::fs::read(file)?;
        for dep in module_depends(&data) {
            visit(&dep, index, done, order, release)?;
        }
        order.push((file.clone(), data));
        Ok(())
    }
    let mut done = BTreeSet::new();
    let mut order = Vec::new();
    for m in MODULES {
        visit(m, &index, &mut done, &mut order, &pk.release)?;
    }
    let mut list = String::new();
    for (file, data) in order.iter() {
        let rel = file
            .strip_prefix(&pk.kernel)
            .expect("module under the kernel root")
            .to_string_lossy()
            .into_owned();
        tree.file(&rel, 0o644, data.clone());
        list.push('/');
        list.push_str(&rel);
        list.push('\n');
    }
    tree.file(MODULE_LIST, 0o644, list.into_bytes());
    Ok(order.len())
}

/// The kernel qemu boots, made from the package's when needed (cached next to it).
pub fn kernel_image(arch: &Arch, pk: &Unpacked) -> Result<PathBuf> {
    let boot = pk.kernel.join("boot");
    let vmlinuz = boot.join(format!("vmlinuz-{}", pk.release));
    match arch.kernel {
        super::arch::KernelImage::AsIs => Ok(vmlinuz),
        super::arch::KernelImage::PvhFromBzImage => {
            let out = boot.join(format!("vmlinux-{}", pk.release));
            if out.is_file() {
                return Ok(out);
            }
            let data = std::fs::read(&vmlinuz)
                .with_context(|| format!("reading {}", vmlinuz.display()))?;
            let magic = b"\xfd7zXZ\x00";
            let at = data
                .windows(magic.len())
                .position(|w| w == magic)
                .with_context(|| format!("no xz payload in {}", vmlinuz.display()))?;
            // xz complains about what follows the stream (the bzImage's trailer); the
            // result is checked instead.
            let mut child = Command::new("xz")
                .args(["-dc", "--single-stream"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("cannot run xz")?;
            let mut stdin = child.stdin.take().expect("piped");
            let payload = data[at..].to_vec();
            let writer = std::thread::spawn(move || {
                use std::io::Write;
                let _ = stdin.write_all(&payload);
            });
            let result = child.wait_with_output()?;
            let _ = writer.join();
            if !result.stdout.starts_with(b"\x7fELF") {
                bail!(
                    "the xz payload of {} is not an ELF vmlinux",
                    vmlinuz.display()
                );
            }
            let tmp = out.with_extension("tmp");
            std::fs::write(&tmp, &result.stdout)?;
            std::fs::rename(&tmp, &out)?;
            Ok(out)
        }
    }
}
