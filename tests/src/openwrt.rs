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
//! adds one ([`Root::add_radio`], a stand-in for `wifi config`), and says so.
//!
//! The root also holds what a router runs the package with: OpenWrt's `opkg`, `ubusd`,
//! `ubus` and `procd` (with procd's `procd.sh`, `reload_config` and `service`), and an
//! `nft` (the build machine's, with its libraries, standing in for the router's
//! `nftables-json`; opkg's status file lists `nftables-json`, `kmod-nft-bridge` and
//! `kmod-sched-bpf` as installed, as on a router that has them). [`Root::boot`] runs the
//! root as a router: in a network namespace of its own, a PID namespace whose init
//! starts busybox's syslogd, OpenWrt's ubusd and procd (as a service manager: procd runs
//! as PID 1 only on a real boot), with /proc, /sys and a bpffs mounted in a mount
//! namespace of its own; [`Router::sh`] runs commands in it. Dropping the [`Router`]
//! kills every process in it and removes the namespace.
//!
//! opkg crashed in a chroot once (../shared/openwrt/README.md): opkg-lede unpacks each
//! archive through an external `gzip -d -c` (libbb/gzip.c) fed by a thread; when there
//! is no `gzip` on the chroot's PATH the child's exec fails, `gzip_close` closes the pipe
//! and the file under the feeding thread, and the process dies of SIGSEGV (or exits 255,
//! depending on timing). Every OpenWrt has busybox's gzip, and so does this root.

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
            .unwrap_or_else(|| crate::workspace_dir().join("target/openwrt"));
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
        let (dir, label) = (self.dir.display(), self.board.label());
        crate::assert_success(
            &self.sh(script),
            format_args!("in {dir} ({label}): `{script}`"),
        )
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
        self.write("etc/config/wireless", "");
        self.uci_set(
            "wireless",
            &[
                ("wireless.radio0", "wifi-device"),
                ("wireless.radio0.type", "mac80211"),
                ("wireless.radio0.path", "platform/soc/18000000.wifi"),
                ("wireless.radio0.channel", "1"),
                ("wireless.radio0.band", "2g"),
                ("wireless.radio0.htmode", "HE20"),
                ("wireless.radio0.disabled", if enabled { "0" } else { "1" }),
                ("wireless.default_radio0", "wifi-iface"),
                ("wireless.default_radio0.device", "radio0"),
                ("wireless.default_radio0.network", "lan"),
                ("wireless.default_radio0.mode", "ap"),
                ("wireless.default_radio0.ssid", "OpenWrt"),
                ("wireless.default_radio0.encryption", "none"),
            ],
        );
    }

    /// `uci set` of each `(KEY, VALUE)` (a section's type for a key that names a
    /// section), then `uci commit CONFIG`: one `uci batch` in the root.
    pub fn uci_set(&self, config: &str, sets: &[(&str, &str)]) {
        let mut script = String::from("uci -q batch <<'EOF'\n");
        for (key, value) in sets {
            script.push_str(&format!("set {key}='{value}'\n"));
        }
        script.push_str(&format!("commit {config}\nEOF"));
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
            "etc/rc.d",
            "tmp/sysinfo",
            "tmp/lock",
            "root",
            "dev",
            "proc",
            "sys/class/net",
        ] {
            std::fs::create_dir_all(self.join(d)).map_err(|e| e.to_string())?;
        }
        // OpenWrt's /var is /tmp.
        std::os::unix::fs::symlink("tmp", self.join("var")).map_err(|e| e.to_string())?;
        // The device nodes scripts use (0 for null, the key of the AI Wi-Fi from urandom).
        for (name, major, minor) in [
            ("null", 1, 3),
            ("zero", 1, 5),
            ("random", 1, 8),
            ("urandom", 1, 9),
        ] {
            let path = std::ffi::CString::new(
                self.join(&format!("dev/{name}"))
                    .into_os_string()
                    .into_encoded_bytes(),
            )
            .expect("no NUL in a path");
            // SAFETY: a valid C string; mknod has no other preconditions.
            let rc = unsafe {
                libc::mknod(
                    path.as_ptr(),
                    libc::S_IFCHR | 0o666,
                    libc::makedev(major, minor),
                )
            };
            if rc != 0 {
                return Err(format!(
                    "mknod /dev/{name}: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        for (name, to) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            std::os::unix::fs::symlink(to, self.join(&format!("dev/{name}")))
                .map_err(|e| e.to_string())?;
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
        // OpenWrt's programs (and what they link) where OpenWrt has them.
        let prefix = self.tools.prefix();
        let programs = [
            ("bin/uci", "sbin/uci"),
            ("bin/jshn", "usr/bin/jshn"),
            ("bin/ubus", "bin/ubus"),
            ("sbin/ubusd", "sbin/ubusd"),
            ("sbin/procd", "sbin/procd"),
            ("sbin/opkg", "bin/opkg"),
        ];
        for (bin, to) in programs {
            let _ = std::fs::remove_file(self.join(to));
            std::fs::copy(prefix.join(bin), self.join(to)).map_err(|e| e.to_string())?;
        }
        // procd's shell side, from OpenWrt's procd package.
        let procd_files = files.join("package/system/procd/files");
        for (from, to, mode) in [
            ("procd.sh", "lib/functions/procd.sh", 0o644),
            ("reload_config", "sbin/reload_config", 0o755),
            ("service", "sbin/service", 0o755),
        ] {
            let _ = std::fs::remove_file(self.join(to));
            std::fs::copy(procd_files.join(from), self.join(to)).map_err(|e| e.to_string())?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(self.join(to), std::fs::Permissions::from_mode(mode))
                .map_err(|e| e.to_string())?;
        }
        // nft for `cage`, standing in for the router's nftables-json.
        let nft = ["/usr/sbin/nft", "/sbin/nft"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or("no nft on this machine: `cargo xtask setup` installs nftables")?;
        std::fs::copy(&nft, self.join("usr/sbin/nft")).map_err(|e| e.to_string())?;
        // procd.sh locks with flock, an applet of OpenWrt's busybox that Debian's lacks:
        // util-linux's stands in.
        let flock = PathBuf::from("/usr/bin/flock");
        if !flock.exists() {
            return Err("no /usr/bin/flock (util-linux) on this machine".into());
        }
        let _ = std::fs::remove_file(self.join("usr/bin/flock"));
        std::fs::copy(&flock, self.join("usr/bin/flock")).map_err(|e| e.to_string())?;
        self.write_opkg_config();
        std::fs::copy(
            prefix.join("share/libubox/jshn.sh"),
            self.join("usr/share/libubox/jshn.sh"),
        )
        .map_err(|e| e.to_string())?;
        // uci's shell library (`uci_load` behind `config_load`, `uci_get`): the lab's
        // stand-in, as the snapshot lacks OpenWrt's (see tests/standins/uci.sh).
        self.write("lib/config/uci.sh", include_str!("../standins/uci.sh"));
        for lib in std::fs::read_dir(prefix.join("lib")).map_err(|e| e.to_string())? {
            let lib = lib.map_err(|e| e.to_string())?.path();
            let name = lib.file_name().unwrap().to_string_lossy().into_owned();
            if name.contains(".so") {
                std::fs::copy(&lib, self.join("usr/lib").join(&name)).map_err(|e| e.to_string())?;
            }
        }
        let mut linked: Vec<PathBuf> = programs.iter().map(|(bin, _)| prefix.join(bin)).collect();
        linked.push(nft);
        linked.push(flock);
        self.copy_host_libs(&linked)?;
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

    /// opkg's configuration as OpenWrt ships it (its `/etc/opkg.conf`, without the
    /// feeds), the architecture of the x86_64 package, and a status file that lists the
    /// package's dependencies as installed.
    fn write_opkg_config(&self) {
        self.write(
            "etc/opkg.conf",
            "dest root /\ndest ram /tmp\nlists_dir ext /var/opkg-lists\noption check_signature\n",
        );
        self.write(
            "etc/opkg/arch.conf",
            "arch all 1\narch noarch 1\narch x86_64 10\n",
        );
        let mut status = String::new();
        for dep in ["nftables-json", "kmod-nft-bridge", "kmod-sched-bpf"] {
            status.push_str(&format!(
                "Package: {dep}\nVersion: 23.05.4\nStatus: install user installed\n\
                 Architecture: x86_64\nInstalled-Time: 1717000000\n\n"
            ));
            self.write(&format!("usr/lib/opkg/info/{dep}.list"), "");
        }
        self.write("usr/lib/opkg/status", &status);
    }

    /// Install a package as OpenWrt's image builder does (`include/rootfs.mk`): opkg
    /// with `--offline-root` and no scripts, then each postinst with IPKG_INSTROOT set,
    /// which enables the service (rc.d links) and leaves the uci-defaults for the
    /// image's first boot ([`Router::first_boot`]). Returns opkg's and the scripts'
    /// output.
    pub fn install_offline(&self, ipk: &Path) -> String {
        let opkg = self.tools.bin("opkg");
        let out = Command::new(&opkg)
            .arg("--offline-root")
            .arg(&self.dir)
            .args(["-f"])
            .arg(self.join("etc/opkg.conf"))
            .args(["--force-postinstall", "--add-dest", "root:/"])
            .args(["--add-arch", "all:100", "--add-arch", "x86_64:200"])
            .arg("install")
            .arg(ipk)
            .env("IPKG_NO_SCRIPT", "1")
            .env("IPKG_INSTROOT", &self.dir)
            .env("TMPDIR", self.join("tmp"))
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", opkg.display()));
        let mut text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "offline opkg install failed:\n{text}");
        let info = self.join("usr/lib/opkg/info");
        let mut scripts: Vec<_> = std::fs::read_dir(&info)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "postinst"))
            .collect();
        scripts.sort();
        for script in scripts {
            let shell = if Path::new("/bin/bash").exists() {
                "/bin/bash"
            } else {
                "/bin/sh"
            };
            let out = Command::new(shell)
                .arg(&script)
                .current_dir(&self.dir)
                .env("IPKG_INSTROOT", &self.dir)
                .output()
                .unwrap();
            text.push_str(&String::from_utf8_lossy(&out.stdout));
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            assert!(
                out.status.success(),
                "{} failed ({}):\n{text}",
                script.display(),
                out.status
            );
        }
        text
    }

    /// Run the root as a router (see the module's documentation).
    pub fn boot(&self) -> Router<'_> {
        Router::start(self)
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
        // A process of a router that was just stopped may still be writing; try again.
        for _ in 0..10 {
            if std::fs::remove_dir_all(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        eprintln!("could not remove {}", self.dir.display());
    }
}

fn next_number() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn unique_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{tag}-{}-{}", std::process::id(), next_number()))
}

/// A [`Root`] running as a router: its own network, PID and mount namespaces, busybox's
/// syslogd (to `/tmp/syslog`), OpenWrt's ubusd and procd. Everything in it is killed and
/// the network namespace removed when this is dropped.
pub struct Router<'a> {
    root: &'a Root,
    netns: String,
    /// `unshare --kill-child`: killing it kills the PID namespace's init, and with it
    /// every process in the namespace.
    unshare: std::process::Child,
    /// The init's PID as this machine sees it (for nsenter).
    init: u32,
}

const INIT: &str = r#"#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mkdir -p /var/run/ubus /var/lock /var/log /tmp/.uci
syslogd -n -O /tmp/syslog &
ubusd &
n=0
while [ ! -S /var/run/ubus/ubus.sock ] && [ $n -lt 200 ]; do sleep 0.05; n=$((n + 1)); done
procd &
n=0
while ! ubus -t 1 list service >/dev/null 2>&1 && [ $n -lt 200 ]; do sleep 0.05; n=$((n + 1)); done
touch /tmp/.router-up
while :; do wait; sleep 1; done
"#;

impl<'a> Router<'a> {
    fn start(root: &'a Root) -> Router<'a> {
        let netns = format!("cgt-{}-owrt{}", std::process::id(), next_number());
        let out = Command::new("ip")
            .args(["netns", "add", &netns])
            .output()
            .unwrap();
        crate::assert_success(
            &out,
            format_args!("ip netns add {netns} (this test needs root)"),
        );
        let _ = std::fs::remove_file(root.join("tmp/.router-up"));
        root.write("tmp/.router-init", INIT);
        let dir = root.path().display().to_string();
        let mounts = format!(
            "mount -t proc proc '{dir}/proc' && mount -t sysfs sysfs '{dir}/sys' && \
             mkdir -p '{dir}/sys/fs/bpf' && mount -t bpf bpf '{dir}/sys/fs/bpf' && \
             exec chroot '{dir}' /bin/sh /tmp/.router-init"
        );
        let unshare = Command::new("ip")
            .args(["netns", "exec", &netns])
            .args([
                "unshare",
                "--pid",
                "--fork",
                "--kill-child",
                "--mount",
                "--propagation",
                "private",
            ])
            .args(["/bin/sh", "-c", &mounts])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("ip netns exec unshare");
        let mut router = Router {
            root,
            netns,
            init: 0,
            unshare,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let children = std::fs::read_to_string(format!(
                "/proc/{0}/task/{0}/children",
                router.unshare.id()
            ))
            .unwrap_or_default();
            if let Some(pid) = children.split_whitespace().next() {
                router.init = pid.parse().unwrap();
            }
            if router.init != 0 && root.join("tmp/.router-up").exists() {
                break;
            }
            if let Ok(Some(status)) = router.unshare.try_wait() {
                panic!("the router's init ended ({status}) before ubusd and procd were up");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "ubusd and procd did not come up in 20 s in {}",
                root.path().display()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        router
    }

    pub fn root(&self) -> &Root {
        self.root
    }

    /// The router's network namespace (`ip netns exec NAME ...` from outside).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Run a shell script in the router (busybox ash, as root, in its namespaces and
    /// chroot).
    pub fn sh(&self, script: &str) -> Output {
        Command::new("nsenter")
            .args(["--target", &self.init.to_string()])
            .args(["--mount", "--net", "--pid", "--root", "--wd"])
            .args(["/bin/sh", "-c", script])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", "/root")
            .output()
            .expect("nsenter")
    }

    /// The router's nftables policy: `nft list ruleset` without the set elements the
    /// kernel learns from traffic and expires (layer-2 bindings, meters), which change
    /// with every frame and are not policy.
    pub fn policy(&self) -> String {
        cage_agent::nft::without_learned_elements(&self.sh_ok("nft list ruleset"))
    }

    /// [`Router::policy`] once Cage's policy is in and has settled: the same in two
    /// readings a second apart (right after the install, `cage run` may still apply it
    /// again as netifd brings the interfaces up). Panics after 15 s without that.
    pub fn settled_policy(&self) -> String {
        let start = std::time::Instant::now();
        let mut last = String::new();
        while start.elapsed() < std::time::Duration::from_secs(15) {
            let now = self.policy();
            if now == last && now.contains("chain segment_egress") {
                return now;
            }
            last = now;
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        panic!(
            "on the {} router: Cage's policy did not settle in 15 s; the last reading:\n{last}",
            self.root.board().label()
        )
    }

    /// Like [`Router::sh`], panicking with the output unless it succeeds; its standard
    /// output and standard error, in that order.
    pub fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "on the {} router: `{script}` failed ({}):\n{text}",
            self.root.board().label(),
            out.status
        );
        text
    }

    /// What reached the router's syslog.
    pub fn syslog(&self) -> String {
        std::fs::read_to_string(self.root.join("tmp/syslog")).unwrap_or_default()
    }

    /// The first boot of an image (OpenWrt's `/etc/init.d/boot`: `config_generate` ran
    /// when the root was made), its `uci_apply_defaults`, unchanged, then procd's
    /// `reload_config` as boot does. Returns what the uci-defaults scripts printed.
    pub fn first_boot(&self) -> String {
        self.sh_ok(". /etc/init.d/boot; uci_apply_defaults; /sbin/reload_config")
    }

    /// `opkg install` of a package on the running router, as its owner does it (the
    /// package copied to /tmp first): opkg runs the maintainer scripts, which run the
    /// uci-defaults with the real uci and start the service under procd. Returns
    /// opkg's exit status and everything it and the scripts printed.
    pub fn opkg_install(&self, ipk: &Ipk) -> (bool, String) {
        let name = ipk.path.file_name().unwrap().to_string_lossy().into_owned();
        std::fs::copy(&ipk.path, self.root.join(&format!("tmp/{name}"))).unwrap();
        let out = self.sh(&format!(
            "opkg install /tmp/{name} 2>&1; rc=$?; rm -f /tmp/{name}; exit $rc"
        ));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// `uci -q get KEY` in the router, or `None`.
    pub fn uci_get(&self, key: &str) -> Option<String> {
        let out = self.sh(&format!("uci -q get '{key}'"));
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    }
}

impl Router<'_> {
    /// Processes whose root directory is this router's root.
    fn processes_inside(&self) -> usize {
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return 0;
        };
        procs
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .filter(|e| {
                std::fs::read_link(e.path().join("root")).is_ok_and(|r| r == self.root.path())
            })
            .count()
    }
}

impl Drop for Router<'_> {
    fn drop(&mut self) {
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
        // The PID namespace's processes die with its init; wait until none is left in
        // the root (the kernel kills them one by one), so the root can be removed.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.processes_inside() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// A Cage package (`.ipk`).
#[derive(Debug, Clone)]
pub struct Ipk {
    pub path: PathBuf,
    pub version: String,
}

impl Ipk {
    /// The x86_64 package `cargo xtask package --target x86_64` made. Panics, saying so,
    /// when it is not there.
    pub fn x86_64() -> Ipk {
        let version = format!("{}-r1", env!("CARGO_PKG_VERSION"));
        let path = crate::target_dir()
            .join("dist")
            .join(format!("cage_{version}_x86_64.ipk"));
        assert!(
            path.is_file(),
            "{} is missing: run `cargo xtask package --target x86_64` (cargo xtask test does)",
            path.display()
        );
        let ipk = Ipk { path, version };
        ipk.assert_fresh();
        ipk
    }

    /// The package's scripts are the repository's: a package built before a change of
    /// `openwrt/` would test the old scripts.
    fn assert_fresh(&self) {
        let repo = crate::workspace_dir().join("openwrt");
        let out = Command::new("sh")
            .arg("-c")
            .arg("tar -xzOf \"$1\" ./data.tar.gz | tar -tzf - | sed -n 's|^\\./||p'")
            .arg("sh")
            .arg(&self.path)
            .output()
            .unwrap();
        let names = String::from_utf8_lossy(&out.stdout).into_owned();
        for name in names.lines().filter(|n| !n.ends_with('/') && !n.is_empty()) {
            let source = repo.join("files").join(name);
            if !source.exists() {
                continue; // the binary
            }
            assert!(
                self.member("data", name) == std::fs::read(&source).unwrap(),
                "{} holds an older {name} than openwrt/files: run `cargo xtask package --target x86_64`",
                self.path.display()
            );
        }
        for script in ["postinst", "prerm"] {
            assert!(
                self.member("control", script) == std::fs::read(repo.join("control").join(script)).unwrap(),
                "{} holds an older {script} than openwrt/control: run `cargo xtask package --target x86_64`",
                self.path.display()
            );
        }
    }

    /// The file `./NAME` of the package's `ARCHIVE.tar.gz` (`data` or `control`).
    fn member(&self, archive: &str, name: &str) -> Vec<u8> {
        Command::new("sh")
            .arg("-c")
            .arg("tar -xzOf \"$1\" \"./$2.tar.gz\" | tar -xzOf - \"./$3\"")
            .arg("sh")
            .arg(&self.path)
            .arg(archive)
            .arg(name)
            .output()
            .unwrap()
            .stdout
    }

    /// The same package as another version, with `edit` run on its unpacked data tree
    /// first (e.g. to ship a different /etc/config/cage). Written into `dir`.
    pub fn repack(&self, dir: &Path, version: &str, edit: impl FnOnce(&Path)) -> Ipk {
        let work = dir.join(format!("repack-{version}"));
        let _ = std::fs::remove_dir_all(&work);
        for d in ["outer", "data", "control"] {
            std::fs::create_dir_all(work.join(d)).unwrap();
        }
        let sh = |script: &str| {
            let out = Command::new("sh")
                .arg("-c")
                .arg(script)
                .current_dir(&work)
                .output()
                .unwrap();
            crate::assert_success(&out, script);
        };
        sh(&format!("tar -xzf '{}' -C outer", self.path.display()));
        sh("tar -xzf outer/data.tar.gz -C data && tar -xzf outer/control.tar.gz -C control");
        let control = work.join("control/control");
        let text = std::fs::read_to_string(&control).unwrap();
        let text: String = text
            .lines()
            .map(|l| {
                if l.starts_with("Version: ") {
                    format!("Version: {version}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(&control, text).unwrap();
        edit(&work.join("data"));
        let tar = "tar --format=gnu --numeric-owner --owner=0 --group=0 --sort=name";
        sh(&format!(
            "{tar} -C data -czf outer/data.tar.gz . && {tar} -C control -czf outer/control.tar.gz . && \
             {tar} -C outer -czf out.ipk ./debian-binary ./data.tar.gz ./control.tar.gz"
        ));
        let path = dir.join(format!("cage_{version}_x86_64.ipk"));
        std::fs::rename(work.join("out.ipk"), &path).unwrap();
        let _ = std::fs::remove_dir_all(&work);
        Ipk {
            path,
            version: version.to_owned(),
        }
    }
}
