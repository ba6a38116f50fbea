//! The server's metrics, in the Prometheus text exposition format (`GET /metrics`).
//!
//! Counters are plain atomics bumped where a push or pull session ends (the `session`
//! module): nothing is locked and nothing allocated on a session's path. Gauges that
//! describe replicas are computed when the metrics are scraped, from what is cheap to
//! read: the latest version row of each replica (never a manifest), the hub's counts
//! and the last drill results (kept in memory).
//!
//! The text format is written here by hand rather than through a client library: the
//! families are few and fixed, the per-replica gauges are computed at scrape time
//! (which a registry of long-lived metric objects fits poorly), and the only subtle
//! part, escaping label values (`\\`, `"` and newlines), is one small function with its
//! own test. A test parses the whole output with a real text-format parser.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::store::object::RequestCounts;

/// Upper bounds (seconds) of the sync-duration histograms' buckets: from a no-change
/// push of a small database to a first push of a large one.
const DURATION_BUCKETS_S: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0,
];

/// A histogram of durations, in atomics: a count per bucket (not cumulative; made so
/// when written), the sum in microseconds, and the count.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; DURATION_BUCKETS_S.len()],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = DURATION_BUCKETS_S.iter().position(|&le| s <= le) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes the `_bucket`, `_sum` and `_count` lines of this histogram, with `labels`
    /// (already formatted, without braces) on each.
    fn write(&self, out: &mut String, name: &str, labels: &str) {
        // The count is read first: a sample landing meanwhile may make the buckets
        // exceed it by one for this scrape, never fall below it.
        let count = self.count.load(Ordering::Relaxed);
        let mut cumulative = 0;
        for (i, le) in DURATION_BUCKETS_S.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{le}\"}} {}",
                cumulative.min(count)
            );
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// How a push or a pull session ended, as the metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A push that made a new version, or a pull that delivered one.
    Ok,
    /// A push whose content equalled the latest version: no version made.
    Unchanged,
    /// A session that failed, for any reason (the client's or the server's).
    Failed,
}

impl Outcome {
    fn index(self) -> usize {
        self as usize
    }

    fn label(i: usize) -> &'static str {
        ["ok", "unchanged", "failed"][i]
    }
}

/// The server's counters since it started.
#[derive(Debug, Default)]
pub struct Metrics {
    versions_created: AtomicU64,
    pushes: [AtomicU64; 3],
    pulls: [AtomicU64; 3],
    bytes_received: AtomicU64,
    bytes_sent: AtomicU64,
    push_seconds: Histogram,
    pull_seconds: Histogram,
}

impl Metrics {
    /// Counts a push session that ended `outcome` after `took`, having received and
    /// sent these bytes of frames.
    pub fn push_done(&self, outcome: Outcome, took: Duration, received: u64, sent: u64) {
        if outcome == Outcome::Ok {
            self.versions_created.fetch_add(1, Ordering::Relaxed);
        }
        self.pushes[outcome.index()].fetch_add(1, Ordering::Relaxed);
        self.push_seconds.observe(took);
        self.bytes(received, sent);
    }

    /// Counts a pull session that ended `outcome` after `took`.
    pub fn pull_done(&self, outcome: Outcome, took: Duration, received: u64, sent: u64) {
        self.pulls[outcome.index()].fetch_add(1, Ordering::Relaxed);
        self.pull_seconds.observe(took);
        self.bytes(received, sent);
    }

    fn bytes(&self, received: u64, sent: u64) {
        self.bytes_received.fetch_add(received, Ordering::Relaxed);
        self.bytes_sent.fetch_add(sent, Ordering::Relaxed);
    }
}

/// What a scrape shows of one replica, gathered at scrape time.
#[derive(Debug, Clone, Default)]
pub struct ReplicaGauges {
    /// `namespace/name`.
    pub replica: String,
    /// The latest version's number and Unix time, if it has one.
    pub latest: Option<(u64, i64)>,
    /// Unique page bytes its versions use: `None` until the store can say
    /// (`Store::stored_bytes`, issue 11's retention work).
    pub stored_bytes: Option<u64>,
    /// The largest lag of its pull subscribers, seconds: `None` until the hub keeps
    /// per-follower state (issue 11's followers work).
    pub follower_lag_seconds: Option<f64>,
    /// The last restore drill: when (Unix seconds), whether it passed, how long it took.
    pub drill: Option<(i64, bool, f64)>,
}

/// The server-wide gauges, read at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerGauges {
    /// Push and pull sessions running now.
    pub active_sessions: u64,
    /// Push subscribers connected now.
    pub push_subscribers: u64,
    /// Pull subscribers connected now.
    pub pull_subscribers: u64,
    /// The requests this server made to its object storage (`--store s3://…`), by kind;
    /// `None` with the directory store (the family is then left out).
    pub object_requests: Option<RequestCounts>,
}

/// Escapes a label value for the text format: backslash, double quote and line feed.
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// One family's `# HELP` and `# TYPE` lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The whole exposition: counters, server gauges, and per-replica gauges at `now`
/// (Unix seconds).
pub fn render(
    metrics: &Metrics,
    server: ServerGauges,
    replicas: &[ReplicaGauges],
    now: i64,
) -> String {
    let mut out = String::new();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);

    family(
        &mut out,
        "sqlferry_versions_created_total",
        "counter",
        "Versions pushes created since the server started.",
    );
    let _ = writeln!(
        out,
        "sqlferry_versions_created_total {}",
        load(&metrics.versions_created)
    );
    for (name, counts, help) in [
        (
            "sqlferry_pushes_total",
            &metrics.pushes,
            "Push sessions that ended, by result (ok: a new version; unchanged: equal to the latest; failed).",
        ),
        (
            "sqlferry_pulls_total",
            &metrics.pulls,
            "Pull sessions that ended, by result (ok or failed).",
        ),
    ] {
        family(&mut out, name, "counter", help);
        for (i, count) in counts.iter().enumerate() {
            if name == "sqlferry_pulls_total" && i == Outcome::Unchanged.index() {
                continue;
            }
            let _ = writeln!(
                out,
                "{name}{{result=\"{}\"}} {}",
                Outcome::label(i),
                load(count)
            );
        }
    }
    family(
        &mut out,
        "sqlferry_received_bytes_total",
        "counter",
        "Bytes of protocol frames received by push and pull sessions.",
    );
    let _ = writeln!(
        out,
        "sqlferry_received_bytes_total {}",
        load(&metrics.bytes_received)
    );
    family(
        &mut out,
        "sqlferry_sent_bytes_total",
        "counter",
        "Bytes of protocol frames sent by push and pull sessions.",
    );
    let _ = writeln!(
        out,
        "sqlferry_sent_bytes_total {}",
        load(&metrics.bytes_sent)
    );
    if let Some(r) = server.object_requests {
        family(
            &mut out,
            "sqlferry_object_requests_total",
            "counter",
            "Requests made to the object storage since the server started, by kind (a multipart upload counts each of its requests).",
        );
        for (kind, n) in [
            ("put", r.put),
            ("get", r.get),
            ("head", r.head),
            ("delete", r.delete),
            ("list", r.list),
        ] {
            let _ = writeln!(out, "sqlferry_object_requests_total{{kind=\"{kind}\"}} {n}");
        }
    }
    family(
        &mut out,
        "sqlferry_sync_duration_seconds",
        "histogram",
        "How long push and pull sessions took, from the session slot to their end.",
    );
    metrics
        .push_seconds
        .write(&mut out, "sqlferry_sync_duration_seconds", "op=\"push\"");
    metrics
        .pull_seconds
        .write(&mut out, "sqlferry_sync_duration_seconds", "op=\"pull\"");

    family(
        &mut out,
        "sqlferry_active_sessions",
        "gauge",
        "Push and pull sessions running now.",
    );
    let _ = writeln!(out, "sqlferry_active_sessions {}", server.active_sessions);
    family(
        &mut out,
        "sqlferry_subscribers",
        "gauge",
        "Subscribers connected now, by role.",
    );
    let _ = writeln!(
        out,
        "sqlferry_subscribers{{role=\"push\"}} {}",
        server.push_subscribers
    );
    let _ = writeln!(
        out,
        "sqlferry_subscribers{{role=\"pull\"}} {}",
        server.pull_subscribers
    );

    type Gauge = fn(&ReplicaGauges, i64) -> Option<String>;
    let per_replica: [(&str, &str, Gauge); 7] = [
        (
            "sqlferry_replica_latest_version",
            "The number of the replica's latest version.",
            |r, _| r.latest.map(|(n, _)| n.to_string()),
        ),
        (
            "sqlferry_replica_latest_version_age_seconds",
            "Seconds since the replica's latest version was created.",
            |r, now| r.latest.map(|(_, at)| (now - at).max(0).to_string()),
        ),
        (
            "sqlferry_replica_stored_bytes",
            "Unique page bytes the replica's versions use.",
            |r, _| r.stored_bytes.map(|b| b.to_string()),
        ),
        (
            "sqlferry_replica_follower_lag_seconds",
            "The largest lag of the replica's pull subscribers, in seconds.",
            |r, _| r.follower_lag_seconds.map(|s| s.to_string()),
        ),
        (
            "sqlferry_replica_drill_ok",
            "Whether the replica's last restore drill passed (1) or failed (0).",
            |r, _| r.drill.map(|(_, ok, _)| u8::from(ok).to_string()),
        ),
        (
            "sqlferry_replica_drill_timestamp_seconds",
            "When the replica's last restore drill ran (Unix seconds).",
            |r, _| r.drill.map(|(at, _, _)| at.to_string()),
        ),
        (
            "sqlferry_replica_drill_duration_seconds",
            "How long the replica's last restore drill took.",
            |r, _| r.drill.map(|(_, _, s)| s.to_string()),
        ),
    ];
    for (name, help, value) in per_replica {
        let values: Vec<(String, String)> = replicas
            .iter()
            .filter_map(|r| value(r, now).map(|v| (escape_label(&r.replica), v)))
            .collect();
        // A family with no sample is left out whole: a parser then sees no empty
        // family, and a missing series reads as "not known" in PromQL.
        if values.is_empty() {
            continue;
        }
        family(&mut out, name, "gauge", help);
        for (replica, v) in values {
            let _ = writeln!(out, "{name}{{replica=\"{replica}\"}} {v}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("acme/app.db"), "acme/app.db");
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let m = Metrics::default();
        m.push_done(Outcome::Ok, Duration::from_millis(3), 100, 10);
        m.push_done(Outcome::Unchanged, Duration::from_millis(30), 5, 5);
        m.push_done(Outcome::Failed, Duration::from_secs(1000), 1, 0);
        let text = render(&m, ServerGauges::default(), &[], 0);
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        let push = "sqlferry_sync_duration_seconds_bucket{op=\"push\",";
        assert_eq!(line(&format!("{push}le=\"0.005\"}}")), "1");
        assert_eq!(line(&format!("{push}le=\"0.05\"}}")), "2");
        assert_eq!(line(&format!("{push}le=\"300\"}}")), "2");
        assert_eq!(line(&format!("{push}le=\"+Inf\"}}")), "3");
        assert_eq!(
            line("sqlferry_sync_duration_seconds_count{op=\"push\"}"),
            "3"
        );
        assert_eq!(line("sqlferry_versions_created_total"), "1");
        assert_eq!(line("sqlferry_pushes_total{result=\"unchanged\"}"), "1");
        assert_eq!(line("sqlferry_received_bytes_total"), "106");
        assert!(!text.contains("sqlferry_pulls_total{result=\"unchanged\"}"));
    }

    #[test]
    fn object_requests_appear_only_with_an_object_store() {
        let none = render(&Metrics::default(), ServerGauges::default(), &[], 0);
        assert!(!none.contains("sqlferry_object_requests_total"), "{none}");
        let gauges = ServerGauges {
            object_requests: Some(RequestCounts {
                put: 7,
                get: 3,
                head: 1,
                delete: 0,
                list: 2,
            }),
            ..ServerGauges::default()
        };
        let text = render(&Metrics::default(), gauges, &[], 0);
        assert!(text.contains("# TYPE sqlferry_object_requests_total counter\n"));
        for line in [
            "sqlferry_object_requests_total{kind=\"put\"} 7",
            "sqlferry_object_requests_total{kind=\"get\"} 3",
            "sqlferry_object_requests_total{kind=\"head\"} 1",
            "sqlferry_object_requests_total{kind=\"delete\"} 0",
            "sqlferry_object_requests_total{kind=\"list\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
        }
    }

    #[test]
    fn replica_gauges_appear_only_when_known() {
        let r = ReplicaGauges {
            replica: "acme/app.db".into(),
            latest: Some((7, 100)),
            drill: Some((90, false, 0.5)),
            ..ReplicaGauges::default()
        };
        let text = render(&Metrics::default(), ServerGauges::default(), &[r], 160);
        assert!(
            text.contains(
                "sqlferry_replica_latest_version_age_seconds{replica=\"acme/app.db\"} 60\n"
            )
        );
        assert!(text.contains("sqlferry_replica_drill_ok{replica=\"acme/app.db\"} 0\n"));
        assert!(!text.contains("sqlferry_replica_stored_bytes"), "{text}");
        assert!(!text.contains("sqlferry_replica_follower_lag_seconds"));
    }
}
