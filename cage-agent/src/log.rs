//! Log lines on stderr, one per event. procd forwards a service's stderr to syslog on
//! OpenWrt (`logread`), and a terminal shows them as they are; no logging framework is
//! needed for that.

fn line(level: &str, msg: &str) {
    eprintln!("cage[{}]: {level}: {msg}", std::process::id());
}

pub fn info(msg: &str) {
    line("info", msg);
}

pub fn warn(msg: &str) {
    line("warning", msg);
}

pub fn error(msg: &str) {
    line("error", msg);
}
