//! Log lines on stderr, one per event: `cage[PID]: LEVEL: message`. procd forwards a
//! service's stderr to syslog on OpenWrt (`logread`), and a terminal shows them as they
//! are.
//!
//! Cage logs through the `log` facade, with this small logger of its own behind it (no
//! `tracing`: size matters on a router), so the libraries that log through `log` (aya,
//! rtnetlink, netlink-proto) are heard too; their lines name where they come from
//! (`cage[PID]: warning: netlink_proto::connection: …`). The level is
//! `cage.main.log_level`, or `CAGE_LOG` when it is set (it wins, so a running system can
//! be asked for more without editing its configuration). At `debug` Cage adds its own
//! debug lines (each DNS query, the daemon's decisions); the libraries' debug lines, far
//! more numerous, only come at `trace`.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

use ::log::{Level, LevelFilter, Log, Metadata, Record};

use crate::config::LogLevel;

/// The environment variable that overrides `cage.main.log_level`.
pub const ENV: &str = "CAGE_LOG";

/// The level in force, as a `LogLevel` discriminant.
static LEVEL: AtomicU8 = AtomicU8::new(LogLevel::Info as u8);

struct Logger;

static LOGGER: Logger = Logger;

fn level() -> LogLevel {
    match LEVEL.load(Ordering::Relaxed) {
        0 => LogLevel::Error,
        1 => LogLevel::Warning,
        2 => LogLevel::Info,
        3 => LogLevel::Debug,
        _ => LogLevel::Trace,
    }
}

/// Whether Cage itself wrote the line (any of its crates), rather than a library.
fn ours(target: &str) -> bool {
    target == "cage" || target.starts_with("cage_")
}

/// Whether a line of `level` from `target` is written when the level in force is `at`.
fn allowed(at: LogLevel, level: Level, target: &str) -> bool {
    let wanted = match at {
        LogLevel::Error => LevelFilter::Error,
        LogLevel::Warning => LevelFilter::Warn,
        LogLevel::Info => LevelFilter::Info,
        // The libraries' debug lines (netlink-proto logs every message) stay out.
        LogLevel::Debug if !ours(target) => LevelFilter::Info,
        LogLevel::Debug => LevelFilter::Debug,
        LogLevel::Trace => LevelFilter::Trace,
    };
    level <= wanted
}

/// The facade's global filter for the level in force: the most verbose line any target
/// may write, so that disabled lines cost one comparison.
fn max_filter(at: LogLevel) -> LevelFilter {
    match at {
        LogLevel::Error => LevelFilter::Error,
        LogLevel::Warning => LevelFilter::Warn,
        LogLevel::Info => LevelFilter::Info,
        LogLevel::Debug => LevelFilter::Debug,
        LogLevel::Trace => LevelFilter::Trace,
    }
}

/// One line as it is written, newline included.
fn format_line(pid: u32, level: Level, target: &str, msg: &std::fmt::Arguments) -> String {
    let name = match level {
        Level::Error => "error",
        Level::Warn => "warning",
        Level::Info => "info",
        Level::Debug => "debug",
        Level::Trace => "trace",
    };
    if ours(target) {
        format!("cage[{pid}]: {name}: {msg}\n")
    } else {
        format!("cage[{pid}]: {name}: {target}: {msg}\n")
    }
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        allowed(level(), m.level(), m.target())
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let line = format_line(std::process::id(), r.level(), r.target(), r.args());
        // One write a line, so that lines of two threads never interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// The level `CAGE_LOG` asks for, if it is set; a value that is not a level is said once
/// and ignored.
fn from_env() -> Option<LogLevel> {
    let value = std::env::var(ENV).ok().filter(|v| !v.is_empty())?;
    match value.parse() {
        Ok(level) => Some(level),
        Err(e) => {
            // Not `warn()`: this runs inside `init`.
            ::log::warn!(target: "cage", "{ENV}: {e}; it is ignored");
            None
        }
    }
}

fn set(at: LogLevel) {
    LEVEL.store(at as u8, Ordering::Relaxed);
    ::log::set_max_level(max_filter(at));
}

/// Install the logger (once; later calls do nothing), at `CAGE_LOG`'s level or `info`.
/// `cage` calls it first thing; Cage's own lines call it too, so that a program that uses
/// the library without calling it (a test, a benchmark) still shows them.
pub fn init() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        if ::log::set_logger(&LOGGER).is_ok() {
            set(LogLevel::Info);
            if let Some(at) = from_env() {
                set(at);
            }
        }
    });
}

/// The configuration's `log_level` is in force from now on, unless `CAGE_LOG` is set.
pub fn configure(log_level: LogLevel) {
    if std::env::var_os(ENV).is_none_or(|v| v.is_empty()) {
        set(log_level);
    }
}

pub fn info(msg: &str) {
    init();
    ::log::info!(target: "cage", "{msg}");
}

pub fn warn(msg: &str) {
    init();
    ::log::warn!(target: "cage", "{msg}");
}

pub fn error(msg: &str) {
    init();
    ::log::error!(target: "cage", "{msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cages_lines_keep_their_format_and_a_librarys_names_its_source() {
        let line =
            |level, target, msg: &str| format_line(42, level, target, &format_args!("{msg}"));
        assert_eq!(
            line(
                Level::Warn,
                "cage",
                "flow log: 3 denied packets could not be logged"
            ),
            "cage[42]: warning: flow log: 3 denied packets could not be logged\n"
        );
        assert_eq!(
            line(Level::Info, "cage", "policy applied"),
            "cage[42]: info: policy applied\n"
        );
        assert_eq!(line(Level::Error, "cage", "x"), "cage[42]: error: x\n");
        assert_eq!(
            line(Level::Debug, "cage_agent::dns::forwarder", "DNS: q"),
            "cage[42]: debug: DNS: q\n"
        );
        assert_eq!(
            line(
                Level::Warn,
                "netlink_proto::connection",
                "netlink socket closed"
            ),
            "cage[42]: warning: netlink_proto::connection: netlink socket closed\n"
        );
    }

    #[test]
    fn each_level_lets_through_what_it_says() {
        use LogLevel::*;
        let lib = "aya::bpf";
        let cage = "cage_agent::daemon";
        // Warnings of the libraries are heard at the default level.
        assert!(allowed(Info, Level::Warn, lib));
        assert!(allowed(Info, Level::Info, cage));
        assert!(!allowed(Info, Level::Debug, cage));
        assert!(!allowed(Warning, Level::Info, cage));
        assert!(allowed(Warning, Level::Warn, lib));
        assert!(!allowed(Error, Level::Warn, cage));
        assert!(allowed(Error, Level::Error, lib));
        // Debug is Cage's own; the libraries' debug lines need trace.
        assert!(allowed(Debug, Level::Debug, cage));
        assert!(!allowed(Debug, Level::Debug, lib));
        assert!(allowed(Debug, Level::Info, lib));
        assert!(!allowed(Debug, Level::Trace, cage));
        assert!(allowed(Trace, Level::Debug, lib));
        assert!(allowed(Trace, Level::Trace, lib));
        for at in [Error, Warning, Info, Debug, Trace] {
            for level in [
                Level::Error,
                Level::Warn,
                Level::Info,
                Level::Debug,
                Level::Trace,
            ] {
                if allowed(at, level, cage) || allowed(at, level, lib) {
                    assert!(level <= max_filter(at), "{at:?} {level:?}");
                }
            }
        }
    }

    #[test]
    fn the_facade_reaches_this_logger_so_library_warnings_are_heard() {
        init();
        set(LogLevel::Info);
        let meta = |level, target| Metadata::builder().level(level).target(target).build();
        let logger = ::log::logger();
        assert!(logger.enabled(&meta(Level::Warn, "netlink_proto::connection")));
        assert!(logger.enabled(&meta(Level::Warn, "aya::programs")));
        assert!(::log::max_level() >= LevelFilter::Warn);
        assert!(!logger.enabled(&meta(Level::Debug, "rtnetlink")));
        // The only test that changes the level in force (tests run at once).
        for at in [
            LogLevel::Error,
            LogLevel::Warning,
            LogLevel::Info,
            LogLevel::Debug,
            LogLevel::Trace,
        ] {
            set(at);
            assert_eq!(level(), at);
        }
        set(LogLevel::Info);
        assert!(logger.enabled(&meta(Level::Info, "cage")));
    }

    #[test]
    fn the_level_names_are_the_configurations() {
        assert_eq!("debug".parse::<LogLevel>(), Ok(LogLevel::Debug));
        assert_eq!("warning".parse::<LogLevel>(), Ok(LogLevel::Warning));
        let e = "verbose".parse::<LogLevel>().unwrap_err();
        assert!(
            e.starts_with("'verbose' is not a log level; give error, warning, info"),
            "{e}"
        );
    }
}
