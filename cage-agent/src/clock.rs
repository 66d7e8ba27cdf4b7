//! The wall clock, as Cage writes it down: Unix seconds (the state files, the audit log)
//! and RFC 3339 UTC with milliseconds (the flow log, the DNS review).

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in whole seconds since the Unix epoch (0 for a clock set before 1970).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `t` as RFC 3339 UTC with milliseconds, e.g. `2026-11-25T10:31:00.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_are_written_as_the_logs_have_them() {
        let t = UNIX_EPOCH + Duration::from_millis(1_800_000_000_123);
        assert_eq!(rfc3339(t), "2027-01-15T08:00:00.123Z");
        assert!(unix_now() > 1_700_000_000);
    }
}
