//! Network namespaces: a handle ([`NetNs`]) that runs closures on threads inside one, the
//! guard that makes one and removes it again ([`NetNsGuard`]), and the background thread
//! that the witness and the servers run in one.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::{ProbeError, NETNS_RUN_DIR};

/// A network namespace, by name (as `ip netns` names it) or the caller's own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NetNs {
    name: Option<String>,
    /// Where to open it, when that is not `/run/netns/<name>` (see [`NetNs::at_path`]).
    path: Option<PathBuf>,
}

/// A thread running in a network namespace; see [`NetNs::spawn`].
pub struct NsThread<T> {
    handle: JoinHandle<Result<T, ProbeError>>,
    ns: String,
    what: String,
}

impl<T> NsThread<T> {
    /// Wait for the thread; its result, or why it has none.
    pub fn join(self) -> Result<T, ProbeError> {
        match self.handle.join() {
            Ok(result) => result,
            Err(_) => Err(ProbeError::Panicked {
                ns: self.ns,
                what: self.what,
            }),
        }
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

impl NetNs {
    /// The namespace `ip netns` knows as `name` (`/run/netns/<name>`).
    pub fn named(name: impl Into<String>) -> NetNs {
        NetNs {
            name: Some(name.into()),
            path: None,
        }
    }

    /// The namespace of the thread that later runs the closure (no `setns` at all): what
    /// `cage selftest` uses on the router itself.
    pub fn current() -> NetNs {
        NetNs {
            name: None,
            path: None,
        }
    }

    /// A namespace opened at `path`, called `name` in thread names and errors: for
    /// namespaces that `ip netns` does not know, e.g. an anonymous one that a file
    /// descriptor of this process keeps alive (`/proc/<pid>/fd/<fd>`), as `cage selftest`
    /// makes them (they vanish with the process, however it ends).
    pub fn at_path(name: impl Into<String>, path: impl Into<PathBuf>) -> NetNs {
        NetNs {
            name: Some(name.into()),
            path: Some(path.into()),
        }
    }

    /// The name, or `(current)`.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("(current)")
    }

    pub fn path(&self) -> Option<PathBuf> {
        if let Some(path) = &self.path {
            return Some(path.clone());
        }
        self.name
            .as_ref()
            .map(|n| PathBuf::from(NETNS_RUN_DIR).join(n))
    }

    /// Move the calling thread into this namespace. Only for threads the caller owns and
    /// will not hand back to a pool: use [`NetNs::run`] or [`NetNs::spawn`] instead.
    pub fn enter_this_thread(&self) -> Result<(), ProbeError> {
        let Some(path) = self.path() else {
            return Ok(());
        };
        let enter = |source| ProbeError::Enter {
            ns: self.name().to_owned(),
            source,
        };
        let file = File::open(&path).map_err(enter)?;
        // SAFETY: setns on a valid open file descriptor; it changes only this thread's
        // network namespace (CLONE_NEWNET is allowed in a multi-threaded process).
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(enter(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Run `f` on a fresh thread that has entered this namespace.
    pub fn spawn<T, F>(&self, what: &str, f: F) -> Result<NsThread<T>, ProbeError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, ProbeError> + Send + 'static,
    {
        let ns = self.clone();
        let handle = thread::Builder::new()
            .name(format!("{what}@{}", self.name()))
            .spawn(move || {
                ns.enter_this_thread()?;
                f()
            })
            .map_err(|source| ProbeError::Io {
                ns: self.name().to_owned(),
                op: format!("spawning thread '{what}'"),
                source,
            })?;
        Ok(NsThread {
            handle,
            ns: self.name().to_owned(),
            what: what.to_owned(),
        })
    }

    /// Run `f` on a fresh thread in this namespace and wait for it.
    pub fn run<T, F>(&self, what: &str, f: F) -> Result<T, ProbeError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, ProbeError> + Send + 'static,
    {
        self.spawn(what, f)?.join()
    }

    /// Write a `net.*` sysctl of this namespace, e.g. `("net.ipv4.ip_forward", "1")`.
    pub fn set_sysctl(&self, key: &str, value: &str) -> Result<(), ProbeError> {
        let (key, value) = (key.to_owned(), value.to_owned());
        let ns = self.name().to_owned();
        self.run("sysctl", move || write_sysctl(&ns, &key, &value))
    }

    /// Read a `net.*` sysctl of this namespace.
    pub fn sysctl(&self, key: &str) -> Result<String, ProbeError> {
        let key = key.to_owned();
        let ns = self.name().to_owned();
        self.run("sysctl", move || {
            let path = sysctl_path(&key);
            std::fs::read_to_string(&path)
                .map(|s| s.trim().to_owned())
                .map_err(|source| ProbeError::Io {
                    ns,
                    op: format!("reading {}", path.display()),
                    source,
                })
        })
    }
}

fn sysctl_path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

/// Write a sysctl of the calling thread's network namespace. `/proc/sys/net` resolves
/// the namespace of the thread that opens the file, not the process's.
pub(super) fn write_sysctl(ns: &str, key: &str, value: &str) -> Result<(), ProbeError> {
    let path = sysctl_path(key);
    std::fs::write(&path, value).map_err(|source| ProbeError::Io {
        ns: ns.to_owned(),
        op: format!("writing '{value}' to {}", path.display()),
        source,
    })
}

// ---- the guard ----------------------------------------------------------------------

/// A network namespace this process made, removed again when the guard is dropped (or by
/// [`NetNsGuard::remove`], which says what failed): the one type that makes namespaces,
/// for `cage selftest` and for every test (aya's `NetNsGuard` is the model). Two kinds:
///
/// - [`NetNsGuard::named`]: `ip netns add <name>` (`/run/netns/<name>`), so that `ip
///   netns exec`, `ip -n` and `nft` reach it by name; for tests and the lab. A stale one
///   of the same name (left by a killed run) is removed first. Removing it kills what
///   still runs inside (by pid), then `ip netns del`.
/// - [`NetNsGuard::anonymous`]: unshared on a thread of its own and held only by a file
///   descriptor of this process, so it vanishes with the process however that ends (even
///   SIGKILL); `cage selftest`'s probe hosts.
///
/// It dereferences to its [`NetNs`]: `guard.run(…)`, `guard.spawn(…)`, `guard.name()`.
pub struct NetNsGuard {
    ns: NetNs,
    held: Held,
}

enum Held {
    /// `/run/netns/<name>`, to be removed.
    Named,
    /// Alive while this file (`/proc/self/task/<tid>/ns/net`, opened) is.
    Anonymous(File),
    /// Removed already, or left in place on purpose.
    Released,
}

impl NetNsGuard {
    /// `ip netns add name`, after removing a namespace of that name if there is one.
    pub fn named(name: impl Into<String>) -> Result<NetNsGuard, ProbeError> {
        let name = name.into();
        if PathBuf::from(NETNS_RUN_DIR).join(&name).exists() {
            // Left by an earlier run that was killed; its removal's errors show in the
            // `add` that follows, if they matter.
            let _ = remove_named(&name);
        }
        ip(&["netns", "add", &name]).map_err(|source| ProbeError::Create {
            ns: name.clone(),
            source,
        })?;
        Ok(NetNsGuard {
            ns: NetNs::named(name),
            held: Held::Named,
        })
    }

    /// A new namespace that only a file descriptor of this process holds; `name` names
    /// it in thread names and errors.
    pub fn anonymous(name: impl Into<String>) -> Result<NetNsGuard, ProbeError> {
        let name = name.into();
        let thread = thread::Builder::new()
            .name(format!("unshare@{name}"))
            .spawn(|| -> io::Result<File> {
                // SAFETY: unshare(CLONE_NEWNET) changes only this thread's network
                // namespace; the thread ends right after opening it.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::syscall(libc::SYS_gettid) };
                File::open(format!("/proc/self/task/{tid}/ns/net"))
            })
            .map_err(|source| ProbeError::Create {
                ns: name.clone(),
                source,
            })?;
        let file = thread
            .join()
            .map_err(|_| ProbeError::Panicked {
                ns: name.clone(),
                what: "unshare".into(),
            })?
            .map_err(|source| ProbeError::Create {
                ns: name.clone(),
                source,
            })?;
        let path = format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd());
        Ok(NetNsGuard {
            ns: NetNs::at_path(name, path),
            held: Held::Anonymous(file),
        })
    }

    /// The handle, to clone into threads and other values (valid while the guard lives).
    pub fn netns(&self) -> &NetNs {
        &self.ns
    }

    /// The file descriptor that holds an anonymous namespace (to move a link into it).
    pub fn fd(&self) -> Option<RawFd> {
        match &self.held {
            Held::Anonymous(file) => Some(file.as_raw_fd()),
            _ => None,
        }
    }

    /// Leave the namespace in place (a named one stays in `/run/netns`): the demo's lab.
    pub fn keep(mut self) -> NetNs {
        self.held = Held::Released;
        self.ns.clone()
    }

    /// Remove it now; what failed, if anything did.
    pub fn remove(mut self) -> Result<(), ProbeError> {
        self.release()
    }

    /// Remove the namespace `ip netns` knows as `name`, whoever made it: kill what runs
    /// inside (by pid), then `ip netns del`. For cleaning up after a crashed run.
    pub fn remove_by_name(name: &str) -> Result<(), ProbeError> {
        remove_named(name)
    }

    fn release(&mut self) -> Result<(), ProbeError> {
        match std::mem::replace(&mut self.held, Held::Released) {
            Held::Named => remove_named(self.ns.name()),
            // Closing the last descriptor lets the kernel delete it.
            Held::Anonymous(file) => {
                drop(file);
                Ok(())
            }
            Held::Released => Ok(()),
        }
    }
}

impl std::ops::Deref for NetNsGuard {
    type Target = NetNs;

    fn deref(&self) -> &NetNs {
        &self.ns
    }
}

impl Drop for NetNsGuard {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            eprintln!("{e}");
        }
    }
}

fn remove_named(name: &str) -> Result<(), ProbeError> {
    let io = |op: &str, source| ProbeError::Io {
        ns: name.to_owned(),
        op: op.to_owned(),
        source,
    };
    // Only processes inside this namespace, by pid (a `cage run` a test left running).
    let pids = ip(&["netns", "pids", name]).map_err(|e| io("ip netns pids", e))?;
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: kill(2) with a pid read from the namespace; no memory involved.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    ip(&["netns", "del", name]).map_err(|e| io("ip netns del", e))?;
    Ok(())
}

/// `ip ARGS…`; its standard output, or its error output as the error.
fn ip(args: &[&str]) -> io::Result<String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

// ---- background threads ---------------------------------------------------------------

/// A thread in a namespace that works until told to stop: what the witness, the echo
/// servers and the lab's DNS servers run on. Stopped and joined by [`Background::stop`],
/// or when dropped.
pub struct Background {
    stop: Arc<AtomicBool>,
    thread: Option<NsThread<()>>,
}

impl Background {
    /// Run `setup` on a fresh thread in `ns`, then `work` with what it made until the stop
    /// flag is set. Returns once `setup` is done (at most 10 s), with the value it handed
    /// back, or its error. `label` starts the messages of a start that failed
    /// ("servers " for "servers did not start within 10 s").
    pub fn start<S, R>(
        ns: &NetNs,
        what: &str,
        label: &str,
        setup: impl FnOnce() -> Result<(S, R), ProbeError> + Send + 'static,
        work: impl FnOnce(S, &AtomicBool) -> Result<(), ProbeError> + Send + 'static,
    ) -> Result<(Background, R), ProbeError>
    where
        R: Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<R, ProbeError>>();
        let thread_stop = stop.clone();
        let thread = ns.spawn(what, move || {
            let made = match setup() {
                Ok((made, ready)) => {
                    let _ = ready_tx.send(Ok(ready));
                    made
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            work(made, &thread_stop)
        })?;
        let failed = |message: &str| ProbeError::Witness {
            ns: ns.name().to_owned(),
            message: format!("{label}{message}"),
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(ready)) => Ok((
                Background {
                    stop,
                    thread: Some(thread),
                },
                ready,
            )),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            // The thread ended without a word: it could not enter the namespace.
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(thread
                .join()
                .err()
                .unwrap_or_else(|| failed("ended before it started"))),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                stop.store(true, Ordering::SeqCst);
                Err(failed("did not start within 10 s"))
            }
        }
    }

    /// Tell the thread to stop and wait for it; its error, if it failed.
    pub fn stop(&mut self) -> Result<(), ProbeError> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t.join(),
            None => Ok(()),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
