//! Times as sqlferry stores them: whole seconds since the Unix epoch (`i64`, as SQLite
//! and JSON keep them), and the one way they are shown, RFC 3339 in UTC. A leaf: the
//! store, the history, the server's key list and the command line all stamp and print
//! times through it, so a version's time reads the same wherever it is shown.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, now (0 if the clock is before 1970).
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The instant `secs` seconds after the Unix epoch; times before it read as the epoch.
pub fn to_system_time(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

/// `secs` as RFC 3339 in UTC, to the second: `2026-01-31T12:00:00Z`.
pub fn rfc3339(secs: i64) -> String {
    humantime::format_rfc3339_seconds(to_system_time(secs)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_print_as_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert!(now() > 1_700_000_000);
    }
}
