//! Restore drills, metrics and `verify --all-versions` against a real `sqlferry serve`:
//!
//! - `serve --drill-every 1s`: a drill result appears in the replica's API answer
//!   (`last_drill`), is still there after a restart without drills, and a stored page
//!   damaged in its pack makes the next drill fail, naming the page and version, logged
//!   at ERROR.
//! - `GET /metrics`, parsed by a real Prometheus text-format parser (`prometheus-parse`):
//!   after a push and a pull the counters have those values, the replica's gauges exist,
//!   and a drill result appears; on the main port only to the admin key.
//! - `verify REMOTE --all-versions` against a server: every version, one line each.
//!
//! Waits poll the server's answers with a deadline, never a fixed sleep.

use std::io::{Read, Write};
use std::time::Duration;

use prometheus_parse::{Sample, Scrape, Value};
use tempfile::TempDir;

use super::{Machine, TestServer, small_db};
use crate::util;

const REPLICA: &str = "acme/app.db";

/// How long a drill every second may take to show (a debug build on a busy machine).
const DRILL_TIMEOUT: Duration = Duration::from_secs(60);

/// One HTTP GET: the status code and the body.
pub(crate) fn get(addr: &str, path: &str, key: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let auth = key.map_or(String::new(), |k| format!("authorization: Bearer {k}\r\n"));
    write!(s, "GET {path} HTTP/1.1\r\nhost: {addr}\r\n{auth}\r\n").expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read to the end");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    (head[9..12].parse().expect("a status code"), body.to_owned())
}

/// The replica's API answer, with the admin key.
fn replica_status(server: &TestServer) -> serde_json::Value {
    let (status, body) = get(
        server.addr(),
        &format!("/api/replicas/{REPLICA}"),
        Some(&server.admin_key),
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("JSON")
}

/// Polls the replica's API answer until `last_drill` satisfies `cond`; that drill.
fn wait_for_drill(
    server: &TestServer,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let found = util::wait_until(DRILL_TIMEOUT, Duration::from_millis(100), || {
        last = replica_status(server)["last_drill"].clone();
        !last.is_null() && cond(&last)
    });
    assert!(
        found,
        "no such drill within {DRILL_TIMEOUT:?}; last: {last}; log:\n{}",
        server.log()
    );
    last
}

/// A pushed database on a new machine: the machine and the database's path.
fn pushed(dir: &TempDir, server: &TestServer) -> (Machine, String) {
    let m = Machine::new(dir.path(), "alice");
    let db = m.path("app.db");
    small_db(&db, 300_000);
    let db = db.to_str().expect("utf-8").to_owned();
    m.push(server, &db, REPLICA, &["--key", &server.admin_key]);
    (m, db)
}

#[test]
fn a_drill_result_appears_outlives_a_restart_and_a_damaged_page_fails_the_next_one() {
    let dir = TempDir::new().expect("tempdir");
    let mut server = TestServer::start_args(dir.path(), &["--drill-every", "1s"]);
    let before = sqlferry::epoch::now();
    pushed(&dir, &server);

    let drill = wait_for_drill(&server, |_| true);
    assert_eq!(drill["ok"], true, "{drill}");
    assert_eq!(drill["version"], 1, "{drill}");
    assert!(drill["error"].is_null(), "{drill}");
    assert!(drill["at"].as_i64().expect("at") >= before, "{drill}");
    assert!(
        drill["seconds"].as_f64().expect("seconds") >= 0.0,
        "{drill}"
    );
    // The temporary copies are gone once a drill is done (one may be under way now).
    let tmp = server.replica_file(REPLICA);
    let data = tmp
        .ancestors()
        .find(|a| a.ends_with("server-data"))
        .expect("the data directory")
        .to_owned();

    // Restarted without drills: the last one is still shown.
    server.restart_with(&[]);
    let kept = replica_status(&server)["last_drill"].clone();
    assert_eq!(kept["ok"], true, "{kept}");
    assert_eq!(kept["version"], 1, "{kept}");
    assert!(
        kept["at"].as_i64() >= drill["at"].as_i64(),
        "{kept} after {drill}"
    );
    // No drill runs, and none left a temporary file behind.
    let leftovers: Vec<_> = std::fs::read_dir(data.join("tmp"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A bad disk flips a byte of page 2 in its pack: the next drill fails, naming it.
    let file = server.replica_file(REPLICA);
    let (hash, _) = crate::trust_store::stored_page(&file, 1, 2);
    crate::trust_store::flip_stored(&file, &hash, 10, 0x40);
    server.restart_with(&["--drill-every", "1s"]);
    let failed = wait_for_drill(&server, |d| d["ok"] == false);
    assert_eq!(failed["version"], 1, "{failed}");
    let error = failed["error"].as_str().expect("an error text");
    assert!(
        error.contains("page 2 of acme/app.db@1"),
        "the error names the page and the version: {error}"
    );
    // The server records the result (what the API shows) just before it logs it: wait
    // for the line.
    let logged = util::wait_until(DRILL_TIMEOUT, Duration::from_millis(50), || {
        server.log().contains("restore drill FAILED")
    });
    let log = server.log();
    assert!(logged, "a failed drill is logged; log:\n{log}");
    let line = log
        .lines()
        .find(|l| l.contains("restore drill FAILED"))
        .expect("the line waited for");
    assert!(line.contains("ERROR"), "logged at ERROR: {line}");
    assert!(line.contains("acme/app.db"), "{line}");
}

/// The samples of `name` in a scrape.
fn samples<'a>(scrape: &'a Scrape, name: &str) -> Vec<&'a Sample> {
    scrape.samples.iter().filter(|s| s.metric == name).collect()
}

/// The value of the one sample of `name` whose labels include `labels`.
pub(crate) fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<_> = samples(scrape, name)
        .into_iter()
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(found.len(), 1, "one {name} {labels:?}: {found:?}");
    match &found[0].value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{name}: not a number: {other:?}"),
    }
}

pub(crate) fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("the text format parses")
}

#[test]
fn metrics_count_a_push_and_a_pull_and_show_the_replica_and_its_drill() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start_args(
        dir.path(),
        &[
            "--metrics",
            "--metrics-listen",
            "127.0.0.1:0",
            "--drill-every",
            "1s",
        ],
    );
    let metrics = server.metrics_addr.clone().expect("a metrics listener");
    let (m, _) = pushed(&dir, &server);
    let copy = m.path("copy.db");
    m.pull(
        &server,
        REPLICA,
        Some(copy.to_str().expect("utf-8")),
        &["--key", &server.admin_key],
    );

    // A drill result shows up in the metrics too.
    let mut text = String::new();
    let drilled = util::wait_until(DRILL_TIMEOUT, Duration::from_millis(100), || {
        let (status, body) = get(&metrics, "/metrics", None);
        assert_eq!(status, 200, "{body}");
        text = body;
        text.contains("sqlferry_replica_drill_ok{")
    });
    assert!(drilled, "no drill in the metrics:\n{text}");
    let scrape = parse(&text);
    assert_eq!(
        value(&scrape, "sqlferry_pushes_total", &[("result", "ok")]),
        1.0
    );
    assert_eq!(
        value(&scrape, "sqlferry_pushes_total", &[("result", "failed")]),
        0.0
    );
    assert_eq!(
        value(&scrape, "sqlferry_pulls_total", &[("result", "ok")]),
        1.0
    );
    assert_eq!(value(&scrape, "sqlferry_versions_created_total", &[]), 1.0);
    assert!(value(&scrape, "sqlferry_received_bytes_total", &[]) > 300_000.0);
    assert!(value(&scrape, "sqlferry_sent_bytes_total", &[]) > 300_000.0);
    let replica = [("replica", REPLICA)];
    let age = value(
        &scrape,
        "sqlferry_replica_latest_version_age_seconds",
        &replica,
    );
    assert!((0.0..600.0).contains(&age), "{age}");
    assert_eq!(
        value(&scrape, "sqlferry_replica_latest_version", &replica),
        1.0
    );
    assert_eq!(value(&scrape, "sqlferry_replica_drill_ok", &replica), 1.0);
    assert_eq!(value(&scrape, "sqlferry_active_sessions", &[]), 0.0);
    let durations = samples(&scrape, "sqlferry_sync_duration_seconds");
    let push = durations
        .iter()
        .find(|s| s.labels.get("op") == Some("push"))
        .expect("a push duration histogram");
    match &push.value {
        Value::Histogram(buckets) => {
            let inf = buckets.last().expect("buckets");
            assert!(inf.less_than.is_infinite(), "{buckets:?}");
            assert_eq!(inf.count, 1.0, "one push: {buckets:?}");
        }
        other => panic!("not a histogram: {other:?}"),
    }
    assert_eq!(
        scrape
            .docs
            .get("sqlferry_pushes_total")
            .map(String::is_empty),
        Some(false),
        "every family has its HELP"
    );

    // On the main port: the admin key only.
    let (status, body) = get(server.addr(), "/metrics", None);
    assert_eq!(status, 401, "{body}");
    let (status, body) = get(server.addr(), "/metrics", Some(&server.admin_key));
    assert_eq!(status, 200, "{body}");
    let main = parse(&body);
    assert_eq!(value(&main, "sqlferry_versions_created_total", &[]), 1.0);
}

#[test]
fn metrics_are_off_unless_asked_for() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let (status, body) = get(server.addr(), "/metrics", Some(&server.admin_key));
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("--metrics"),
        "says how to turn them on: {body}"
    );
}

#[test]
fn verify_all_versions_checks_every_version_on_a_server() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let (m, db) = pushed(&dir, &server);
    let mut digests = vec![util::digest(std::path::Path::new(&db))];
    for round in 0..2 {
        super::exec(
            std::path::Path::new(&db),
            &format!("UPDATE t SET v = randomblob(300) WHERE rowid % 7 = {round}"),
        );
        m.push(&server, &db, REPLICA, &["--key", &server.admin_key]);
        digests.push(util::digest(std::path::Path::new(&db)));
    }
    let out = m.run_on(
        &server,
        [
            "verify",
            REPLICA,
            "--all-versions",
            "--json",
            "--key",
            &server.admin_key,
        ],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["replica"], REPLICA);
    assert_eq!(
        (report["checked"].as_u64(), report["failed"].as_u64()),
        (Some(3), Some(0))
    );
    let versions = report["versions"].as_array().expect("versions");
    for (i, v) in versions.iter().enumerate() {
        assert_eq!(v["version"], i as u64 + 1, "{v}");
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["digest"], digests[i].as_str(), "{v}");
        assert_eq!(v["integrity"], serde_json::json!(["ok"]), "{v}");
    }

    let out = m.run_on(
        &server,
        [
            "verify",
            REPLICA,
            "--all-versions",
            "--key",
            &server.admin_key,
        ],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let text = util::stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert_eq!(lines[1], format!("version 2  ok  {}", digests[1]));
    assert_eq!(lines[3], format!("{REPLICA}: all 3 versions ok"));
}
