//! OpenWrt's own userspace for the tests, and the routers' first-boot configuration.
//!
//! [`Tools`] finds what `cargo xtask setup` built from `../shared/openwrt` into
//! `target/openwrt` (uci, jshn, ubus, ucode, fw4, netifd, procd, opkg, and OpenWrt
//! 23.05.4's base-files and board definitions). [`Root`] makes a router's root filesystem
//! in a temporary directory: busybox, base-files, the board's target files, uci and jshn
//! with their libraries, then runs OpenWrt's own `board_detect` and `config_generate`
//! in it (`chroot`), unchanged, for a [`Board`]'s name. What they write (`/etc/board.json`,
//! `/etc/config/network`, `/etc/config/system`) is the default configuration that board
//! gets on first boot; `/etc/config/firewall` is firewall4's shipped default and
//! `/etc/config/dhcp` dnsmasq's. Nothing of it is written by hand.
//!
//! Wi-Fi is the exception: OpenWrt writes `/etc/config/wireless` from the radios the
//! kernel reports (`wifi config`, mac80211's detection script, which needs the hardware
//! and is not in the snapshot), so a fixture has no wireless configuration unless a test
//! adds one ([`Root::add_radio`]), and says so.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where `cargo xtask setup` put OpenWrt's tools.
#[derive(Debug, Clone)]
pub struct Tools {
    dir: PathBuf,
}

impl Tools {
    /// `<workspace>/target/openwrt`, or `CAGE_OPENWRT_TOOLS`. Panics, saying how to make
    /// them, when they are not there: a test that cannot run fails.
    pub fn get() -> Tools {
        let dir = std::env::var_os("CAGE_OPENWRT_TOOLS")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .parent()
                    .expect("the tests crate lives in the workspace")
                    .join("target/openwrt")
            });
        for needed in ["prefix/bin/uci", "prefix/sbin/netifd", "openwrt-23.05.4"] {
            assert!(
                dir.join(needed).exists(),
                "OpenWrt's tools are not built: {} is missing. Run `cargo xtask setup` \
                 (it builds them from ../shared/openwrt)",
                dir.join(needed).display()
            );
        }
        Tools { dir }
    }

    /// `prefix/bin/NAME` or `prefix/sbin/NAME`.
    pub fn bin(&self, name: &str) -> PathBuf {
        let bin = self.dir.join("prefix/bin").join(name);
        if bin.exists() {
            bin
        } else {
            self.dir.join("prefix/sbin").join(name)
        }
    }

    pub fn prefix(&self) -> PathBuf {
        self.dir.join("prefix")
    }

    /// firewall4's tree: `"23.05"` (OpenWrt 23.05.4's pin) or `"main"` (its newest commit).
    pub fn firewall4(&self, version: &str) -> PathBuf {
        self.dir.join(format!("firewall4-{version}"))
    }

    /// The OpenWrt 23.05.4 subset (`package/…`, `target/linux/…`).
    pub fn openwrt_files(&self) -> PathBuf {
        self.dir.join("openwrt-23.05.4")
    }
}

/// The routers Cage targets, by the name OpenWrt's `board_detect` knows them by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Board {
    /// GL.iNet GL-MT3000 (Beryl AX): WAN eth0, one LAN port eth1.
    Mt3000,
    /// GL.iNet GL-MT6000 (Flint 2): WAN eth1, LAN lan1…lan5 (DSA).
    Mt6000,
    /// GL.iNet GL-MT300N-V2 (Mango): a swconfig switch, LAN eth0.1 (one port), WAN eth0.2.
    Mt300nV2,
    /// GL.iNet GL-AR300M (NAND): ath79, big-endian MIPS.
    Ar300m,
    /// OpenWrt on an x86_64 VM or mini PC with two network cards (eth0, eth1).
    X86_64,
}

impl Board {
    pub const ALL: [Board; 5] = [
        Board::Mt3000,
        Board::Mt6000,
        Board::Mt300nV2,
        Board::Ar300m,
        Board::X86_64,
    ];

    /// The name in `/tmp/sysinfo/board_name` that `board_detect` dispatches on.
    pub fn board_name(self) -> &'static str {
        match self {
            Board::Mt3000 => "glinet,gl-mt3000",
            Board::Mt6000 => "glinet,gl-mt6000",
            Board::Mt300nV2 => "glinet,gl-mt300n-v2",
            Board::Ar300m => "glinet,gl-ar300m-nand",
            // What x86's preinit writes from a QEMU VM's DMI tables.
            Board::X86_64 => "qemu-standard-pc-q35-ich9-2009",
        }
    }

    /// How people know it.
    pub fn label(self) -> &'static str {
        match self {
            Board::Mt3000 => "GL-MT3000 (Beryl AX)",
            Board::Mt6000 => "GL-MT6000 (Flint 2)",
            Board::Mt300nV2 => "GL-MT300N-V2 (Mango)",
            Board::Ar300m => "GL-AR300M",
            Board::X86_64 => "x86_64 (two NICs)",
        }
    }

    /// The OpenWrt target whose `base-files` hold the board's `board.d`.
    pub fn target(self) -> &'static str {
        match self {
            Board::Mt3000 | Board::Mt6000 => "mediatek/filogic",
            Board::Mt300nV2 => "ramips/mt76x8",
            Board::Ar300m => "ath79/nand",
            Board::X86_64 => "x86",
        }
    }

    /// Network devices the board's kernel has, for the scripts that look in
    /// `/sys/class/net` (x86's default network takes eth1 as WAN only if it exists).
    fn netdevs(self) -> &'static [&'static str] {
        match self {
            Board::X86_64 => &["eth0", "eth1"],
            _ => &[],
        }
    }
}

/// A router's root filesystem in a temporary directory, with the board's first-boot
/// configuration; removed when dropped.
pub struct Root {
    dir: PathBuf,
    board: Board,
    tools: Tools,
}

impl Root {
    /// Make the root and run OpenWrt's `board_detect` and `config_generate` in it.
    pub fn new(board: Board) -> Result<Root, String> {
        let tools = Tools::get();
        let dir = unique_dir(&format!(
            "cage-owrt-{}",
            board.board_name().replace(',', "-")
        ));
        let root = Root { dir, board, tools };
        root.populate()?;
        Ok(root)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn board(&self) -> Board {
        self.board
    }

    pub fn tools(&self) -> &Tools {
        &self.tools
    }

    /// A path inside the root (`rel` with or without its leading `/`).
    pub fn join(&self, rel: &str) -> PathBuf {
        self.dir.join(rel.trim_start_matches('/'))
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.join(rel))
            .unwrap_or_else(|e| panic!("{}: {e}", self.join(rel).display()))
    }

    pub fn write(&self, rel: &str, text: &str) {
        let path = self.join(rel);
        std::fs::create_dir_all(path.parent().expect("a path in the root has a parent")).unwrap();
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }

    /// Run a shell script inside the root (`chroot ROOT /bin/sh -c SCRIPT`), as the
    /// router's own busybox ash.
    pub fn sh(&self, script: &str) -> Output {
        Command::new("chroot")
            .arg(&self.dir)
            .args(["/bin/sh", "-c", script])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", "/root")
            .output()
            .unwrap_or_else(|e| panic!("chroot {}: {e}", self.dir.display()))
    }

    /// Like [`Root::sh`], panicking with the script's output unless it succeeds; its
    /// standard output.
    pub fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "in {} ({}): `{script}` failed ({}):\n{}{}",
            self.dir.display(),
            self.board.label(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `uci -q get KEY` inside the root, or `None`.
    pub fn uci_get(&self, key: &str) -> Option<String> {
        let out = self.sh(&format!("uci -q get '{key}'"));
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    }

    /// A radio and its default access point on the LAN, as OpenWrt's mac80211 detection
    /// (`wifi config`) writes them for a board's first radio, with the radio enabled
    /// (GL.iNet's firmware ships it on; OpenWrt's own default is `disabled '1'`). Not
    /// produced by OpenWrt's scripts here: they need the hardware.
    pub fn add_radio(&self, enabled: bool) {
        let script = format!(
            "uci -q batch <<'EOF'\n\
             set wireless.radio0=wifi-device\n\
             set wireless.radio0.type='mac80211'\n\
             set wireless.radio0.path='platform/soc/18000000.wifi'\n\
             set wireless.radio0.channel='1'\n\
             set wireless.radio0.band='2g'\n\
             set wireless.radio0.htmode='HE20'\n\
             set wireless.radio0.disabled='{}'\n\
             set wireless.default_radio0=wifi-iface\n\
             set wireless.default_radio0.device='radio0'\n\
             set wireless.default_radio0.network='lan'\n\
             set wireless.default_radio0.mode='ap'\n\
             set wireless.default_radio0.ssid='OpenWrt'\n\
             set wireless.default_radio0.encryption='none'\n\
             commit wireless\n\
             EOF",
            if enabled { 0 } else { 1 }
        );
        self.write("etc/config/wireless", "");
        self.sh_ok(&script);
    }

    fn populate(&self) -> Result<(), String> {
        let files = self.tools.openwrt_files();
        let copy_tree = |from: &Path| -> Result<(), String> {
            let out = Command::new("cp")
                .arg("-a")
                .arg(format!("{}/.", from.display()))
                .arg(&self.dir)
                .output()
                .map_err(|e| format!("cp: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "copying {}: {}",
                    from.display(),
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| e.to_string())?;
        copy_tree(&files.join("package/base-files/files"))?;
        copy_tree(
            &files
                .join("target/linux")
                .join(self.board.target())
                .join("base-files"),
        )?;
        for d in [
            "bin",
            "sbin",
            "usr/bin",
            "usr/sbin",
            "usr/lib",
            "usr/share/libubox",
            "lib64",
            "etc/config",
            "tmp/sysinfo",
            "var",
            "root",
            "dev",
            "proc",
            "sys/class/net",
        ] {
            std::fs::create_dir_all(self.join(d)).map_err(|e| e.to_string())?;
        }
        // busybox, with every applet OpenWrt's scripts may call as a link, as on the router.
        let busybox = Path::new("/bin/busybox");
        if !busybox.exists() {
            return Err("no /bin/busybox: `cargo xtask setup` installs busybox-static".into());
        }
        std::fs::copy(busybox, self.join("bin/busybox")).map_err(|e| e.to_string())?;
        let list = Command::new(busybox)
            .arg("--list-full")
            .output()
            .map_err(|e| e.to_string())?;
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            let link = self.join(applet);
            if link.exists() || link.symlink_metadata().is_ok() {
                continue;
            }
            let _ = std::fs::create_dir_all(link.parent().unwrap());
            let _ = std::os::unix::fs::symlink("/bin/busybox", &link);
        }
        // uci and jshn (and what they link) where OpenWrt has them.
        let prefix = self.tools.prefix();
        for (bin, to) in [("bin/uci", "sbin/uci"), ("bin/jshn", "usr/bin/jshn")] {
            let _ = std::fs::remove_file(self.join(to));
            std::fs::copy(prefix.join(bin), self.join(to)).map_err(|e| e.to_string())?;
        }
        std::fs::copy(
            prefix.join("share/libubox/jshn.sh"),
            self.join("usr/share/libubox/jshn.sh"),
        )
        .map_err(|e| e.to_string())?;
        for lib in std::fs::read_dir(prefix.join("lib")).map_err(|e| e.to_string())? {
            let lib = lib.map_err(|e| e.to_string())?.path();
            let name = lib.file_name().unwrap().to_string_lossy().into_owned();
            if name.contains(".so") {
                std::fs::copy(&lib, self.join("usr/lib").join(&name)).map_err(|e| e.to_string())?;
            }
        }
        self.copy_host_libs(&[prefix.join("bin/uci"), prefix.join("bin/jshn")])?;
        self.write(
            "tmp/sysinfo/board_name",
            &format!("{}\n", self.board.board_name()),
        );
        self.write("tmp/sysinfo/model", &format!("{}\n", self.board.label()));
        for dev in self.board.netdevs() {
            std::fs::create_dir_all(self.join(&format!("sys/class/net/{dev}")))
                .map_err(|e| e.to_string())?;
        }
        // First boot, as OpenWrt does it: the board's definition, then its network.
        let out = self.sh("/bin/board_detect && /bin/config_generate");
        if !out.status.success() {
            return Err(format!(
                "board_detect/config_generate for {} failed ({}): {}{}",
                self.board.board_name(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let network = self.read("etc/config/network");
        if !network.contains("config interface 'lan'") {
            return Err(format!(
                "config_generate wrote no LAN for {}:\n{network}",
                self.board.board_name()
            ));
        }
        std::fs::copy(
            self.tools
                .firewall4("23.05")
                .join("root/etc/config/firewall"),
            self.join("etc/config/firewall"),
        )
        .map_err(|e| e.to_string())?;
        std::fs::copy(
            files.join("package/network/services/dnsmasq/files/dhcp.conf"),
            self.join("etc/config/dhcp"),
        )
        .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The host's C library and the other shared libraries these programs need (the
    /// tools are built for the host; OpenWrt's own are musl builds of the same sources).
    pub fn copy_host_libs(&self, programs: &[PathBuf]) -> Result<(), String> {
        for program in programs {
            let out = Command::new("ldd")
                .arg(program)
                .output()
                .map_err(|e| format!("ldd: {e}"))?;
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let path = match line.split_whitespace().collect::<Vec<_>>().as_slice() {
                    [_, "=>", path, ..] if path.starts_with('/') => (*path).to_owned(),
                    [path, ..] if path.starts_with('/') => (*path).to_owned(),
                    _ => continue,
                };
                if path.starts_with(&*self.tools.prefix().to_string_lossy()) {
                    continue;
                }
                let to = self.join(&path);
                if !to.exists() {
                    std::fs::create_dir_all(to.parent().unwrap()).map_err(|e| e.to_string())?;
                    std::fs::copy(&path, &to).map_err(|e| format!("{path}: {e}"))?;
                }
            }
        }
        Ok(())
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        if std::env::var_os("CAGE_KEEP_ROOT").is_some() {
            eprintln!("keeping {}", self.dir.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn unique_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}
