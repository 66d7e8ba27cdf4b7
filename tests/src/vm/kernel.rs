//! The guest's kernel: its modules loaded in the order xtask wrote (dependencies first),
//! what it is and has, and the global BPF sysctls.

use std::ffi::CString;
use std::time::Instant;

use super::{fact, row};

/// Where xtask put the module list (`xtask/src/vm/initramfs.rs`, `MODULE_LIST`).
pub const MODULE_LIST: &str = "/etc/vmlab/modules";

/// `uname -r` and `uname -m`.
pub fn uname() -> (String, String) {
    // SAFETY: uname fills the struct it is given.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    unsafe { libc::uname(&mut u) };
    let field = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    (field(&u.release), field(&u.machine))
}

/// The facts of the table's heading: kernel, CPU, seconds from boot to here.
pub fn facts() {
    let (release, machine) = uname();
    fact("kernel", &release);
    fact("machine", &machine);
    let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    fact("boot_s", uptime.split_whitespace().next().unwrap_or("?"));
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name") || l.starts_with("cpu model"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "?".into());
    fact("cpu", cpu);
    fact(
        "bpf_jit_enable",
        sysctl("net/core/bpf_jit_enable").unwrap_or_default(),
    );
}

/// Load every module of the list; one row. A module that does not load is named.
pub fn load_modules() -> bool {
    let started = Instant::now();
    let list = match std::fs::read_to_string(MODULE_LIST) {
        Ok(l) => l,
        Err(e) => {
            return row(
                "kernel",
                "modules",
                false,
                "-",
                format!("{MODULE_LIST}: {e}"),
            )
        }
    };
    let mut loaded = 0;
    let mut failed = Vec::new();
    for path in list.lines().filter(|l| !l.is_empty()) {
        match finit_module(path) {
            Ok(()) => loaded += 1,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => loaded += 1,
            Err(e) => failed.push(format!("{path}: {e}")),
        }
    }
    let ok = failed.is_empty();
    row(
        "kernel",
        "modules",
        ok,
        format!("{loaded} in {:.1} s", started.elapsed().as_secs_f64()),
        if ok {
            "nf_tables, nft_* (ct, nat, fib, reject, log, limit, quota, meta_bridge, flow_offload), bridge, 8021q, veth, sch_ingress, cls_bpf".to_owned()
        } else {
            format!("NOT LOADED: {}", failed.join("; "))
        },
    )
}

fn finit_module(path: &str) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    use std::os::fd::AsRawFd;
    let params = CString::new("").expect("no NUL");
    // SAFETY: finit_module reads the open file and the NUL-terminated parameters.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A sysctl of the guest's own (initial) namespace, by its path under /proc/sys.
pub fn sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{path}"))
        .ok()
        .map(|s| s.trim().to_owned())
}

pub fn set_sysctl(path: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(format!("/proc/sys/{path}"), value)
}

/// Whether a module is loaded (or built in), by `/sys/module/<name>`.
pub fn has_module(name: &str) -> bool {
    std::path::Path::new("/sys/module").join(name).exists()
}

/// Fail loudly, naming it, when a kernel feature a check needs is missing: a row that
/// fails, and false.
pub fn require(section: &str, module: &str, config: &str) -> bool {
    if has_module(module) {
        return true;
    }
    row(
        section,
        &format!("kernel feature {config}"),
        false,
        "missing",
        format!("module {module} is not loaded: this check cannot run without {config}"),
    );
    false
}

/// Set the BPF JIT (`net.core.bpf_jit_enable`); it applies to programs loaded later.
pub fn set_jit(on: bool) -> Result<(), String> {
    set_sysctl("net/core/bpf_jit_enable", if on { "1" } else { "0" })
        .map_err(|e| format!("net.core.bpf_jit_enable: {e}"))?;
    let now = sysctl("net/core/bpf_jit_enable").unwrap_or_default();
    if (now != "0") != on {
        return Err(format!("net.core.bpf_jit_enable is {now} after setting it"));
    }
    Ok(())
}
