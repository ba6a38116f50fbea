//! The versions index of the S3 store in PostgreSQL (`serve --store s3://… --meta
//! postgres://…`, `sqlferry_versions`): two real `serve` processes sharing the real
//! SeaweedFS of `seaweed` and a real PostgreSQL (`postgres`). Versions pushed through
//! server A listed through server B with the object request counter of B's `/metrics`
//! showing two GETs for the command (the probe past the index's latest, for the
//! session's latest and for the listing; not one per version); `@latest-N` and `@TIME`
//! resolved through the index; a prune marking rows removed with their tombstones (a
//! time a removed version was current still refused); a row deleted by hand (a server
//! killed between a version object and its row) repaired by the next listing and by
//! the next push, the version listed and pulled; a push while PostgreSQL is stopped
//! refused cleanly (exit 10, no version object), then landing once it is back.
//!
//! Every wait is on an event (a line, a process exit, a condition polled); nothing
//! sleeps.

use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use crate::postgres::{self, Postgres};
use crate::s3_serve::{new_location, objects_under, s3_server};
use crate::server::drill::{get, parse, value};
use crate::server::{DbState, EXIT_NOT_FOUND, Machine, TestServer, assert_fails, exec, small_db};
use crate::util;

/// Exit code: the server failed on its own side (docs/exit-codes.md).
const EXIT_SERVER: i32 = 10;

/// How long a server may take to come back to a PostgreSQL restarted under it.
const RECOVER_TIMEOUT: Duration = Duration::from_secs(120);

/// The database name of a `postgres://…/NAME` URL.
fn db_name(url: &str) -> &str {
    url.rsplit('/').next().expect("a database name")
}

/// The GETs `server` made to its bucket so far (`sqlferry_object_requests_total`).
fn gets(server: &TestServer) -> f64 {
    let addr = server.metrics_addr.as_deref().expect("--metrics-listen");
    let (code, text) = get(addr, "/metrics", None);
    assert_eq!(code, 200, "{text}");
    value(
        &parse(&text),
        "sqlferry_object_requests_total",
        &[("kind", "get")],
    )
}

/// `sqlferry ARGS --json --key KEY` on `server`, asserted to succeed; its JSON.
fn json(m: &Machine, server: &TestServer, key: &str, args: &[&str]) -> Value {
    let out = m.run_on(server, args.iter().copied().chain(["--json", "--key", key]));
    assert_eq!(util::code(&out), 0, "{args:?}: {}", util::stderr(&out));
    serde_json::from_str(util::stdout(&out).trim()).expect("JSON")
}

/// The version numbers `versions` lists on `server`.
fn listed(m: &Machine, server: &TestServer, key: &str) -> Vec<u64> {
    json(m, server, key, &["versions", "acme/app.db"])
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| v["number"].as_u64().expect("a number"))
        .collect()
}

/// The rows of the index: `number` or `number-` (removed), in order, comma-separated.
fn rows(pg: &Postgres, meta: &str) -> String {
    pg.psql(
        db_name(meta),
        "SELECT coalesce(string_agg(number::text || CASE WHEN removed_at IS NULL THEN '' ELSE '-' END, ',' ORDER BY number), '')
         FROM sqlferry_versions WHERE replica = 'acme/app.db'",
    )
}

/// A change to `path` that rewrites about a seventh of its rows.
fn change(path: &std::path::Path, i: u64) {
    exec(
        path,
        &format!("UPDATE t SET v = randomblob(300) WHERE id % 7 = {i}"),
    );
}

/// Unix seconds now.
fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
}

/// `n` versions of `acme/app.db` pushed through `server` from `m`, each a change of
/// the last; the state of each. Version `apart + 1` is made in a later second than
/// version `apart` (the clock waited for, so that a time picks version `apart` or an
/// older one).
fn push_versions(m: &Machine, server: &TestServer, n: u64, apart: u64) -> Vec<DbState> {
    let path = m.path("app.db");
    small_db(&path, 256 << 10);
    let mut states = Vec::new();
    for i in 1..=n {
        if i > 1 {
            change(&path, i);
        }
        let r = m.push(
            server,
            "app.db",
            "acme/app.db",
            &["-m", &format!("v{i}"), "--key", &server.admin_key],
        );
        assert_eq!(r.u64("version"), i);
        states.push(DbState::of(&path));
        if i == apart {
            let made_by = now();
            let later = util::wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
                now() > made_by
            });
            assert!(later, "the clock moves on");
        }
    }
    states
}

#[test]
fn versions_pushed_on_one_server_are_listed_and_selected_on_another_through_the_index() {
    let pg = postgres::shared();
    let meta = pg.database();
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    let extra = [
        "--meta",
        meta.as_str(),
        "--gc-grace",
        "0s",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let a = s3_server(dir.path(), "a", &location, &extra, None);
    let b = s3_server(dir.path(), "b", &location, &extra, Some(&a.admin_key));
    let admin = a.admin_key.clone();
    let m = Machine::new(dir.path(), "m");
    let states = push_versions(&m, &a, 6, 4);
    assert_eq!(rows(pg, &meta), "1,2,3,4,5,6", "a row per version, by A");

    // B lists them with one GET (the probe past the index's latest), not seven.
    let before = gets(&b);
    let all = json(&m, &b, &admin, &["versions", "acme/app.db"]);
    let after = gets(&b);
    let numbers: Vec<u64> = all
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| v["number"].as_u64().expect("a number"))
        .collect();
    assert_eq!(numbers, [1, 2, 3, 4, 5, 6]);
    assert_eq!(all[2]["message"], "v3", "{all}");
    assert_eq!(all[5]["digest"], states[5].digest.as_str(), "{all}");
    // Two GETs for the whole command, whatever the number of versions: the session's
    // latest version and the listing each read the index and probe past its latest.
    assert_eq!(
        after - before,
        2.0,
        "versions through the index: one GET past its latest row, twice"
    );

    // @latest-N and @TIME through the index, pulled whole from B.
    let other = Machine::new(dir.path(), "other");
    let key = ["--key", admin.as_str()];
    let r = other.pull(&b, "acme/app.db@latest-2", Some("l2.db"), &key);
    assert_eq!(r.u64("version"), 4);
    states[3].assert_held_by(&other.path("l2.db"), "@latest-2 from B");
    // Version 3's time: it, or version 4 made in the same second (never 5, made in
    // a later second than 4), is the version then current.
    let at = all[2]["created_at"].as_i64().expect("a time");
    let expected = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["created_at"].as_i64().unwrap() <= at)
        .map(|v| v["number"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!((3..=4).contains(&expected), "{all}");
    let time = sqlferry::epoch::rfc3339(at);
    // The same version by number first (B's cache then knows its packs' indexes), then
    // by time: the time costs one GET more than the number (the listing's probe past
    // the index's latest), where without the index it reads every version object and
    // the next number (7 GETs more here).
    let before = gets(&b);
    let by_number = format!("acme/app.db@{expected}");
    let r = other.pull(&b, &by_number, Some("n.db"), &key);
    assert_eq!(r.u64("version"), expected);
    let middle = gets(&b);
    let r = other.pull(&b, &format!("acme/app.db@{time}"), Some("t.db"), &key);
    assert_eq!(r.u64("version"), expected);
    states[expected as usize - 1].assert_held_by(&other.path("t.db"), "@TIME from B");
    let (by_n, by_time) = (middle - before, gets(&b) - middle);
    assert!(
        by_time <= by_n + 1.0,
        "@TIME read the index, not every version object: {by_time} GETs, @N {by_n}"
    );

    // A prune through B (keep-last 2): rows and objects removed together.
    let out = m.run_on(
        &b,
        [
            "retention",
            "acme/app.db",
            "--keep-last",
            "2",
            "--key",
            &admin,
        ],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let pruned = json(&m, &b, &admin, &["prune", "acme/app.db"]);
    assert_eq!(
        pruned["removed"],
        serde_json::json!([1, 2, 3, 4]),
        "{pruned}"
    );
    assert_eq!(rows(pg, &meta), "1-,2-,3-,4-,5,6");
    let names: Vec<String> = objects_under(&location)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    for n in 1..=4 {
        let key = format!("replicas/acme/app.db/v/{n}");
        assert!(
            names.iter().any(|k| k.ends_with(&key)),
            "{key} stays, a tombstone"
        );
    }
    assert_eq!(listed(&m, &a, &admin), [5, 6], "A lists what B kept");
    assert_eq!(listed(&m, &b, &admin), [5, 6]);
    // A removed version, and a time one was current, are refused by name.
    let refused = [
        ("acme/app.db@2".to_owned(), 2),
        (format!("acme/app.db@{time}"), expected),
    ];
    for (spec, number) in refused {
        let out = other.run_on(&a, ["pull", &spec, "gone.db", "--key", &admin]);
        let line = assert_fails(&out, EXIT_NOT_FOUND, "was removed by the retention policy");
        assert!(line.contains(&format!("acme/app.db@{number} ")), "{line}");
        assert!(!other.path("gone.db").exists(), "{spec}: nothing written");
    }
    let r = other.pull(&a, "acme/app.db@5", Some("v5.db"), &key);
    assert_eq!(r.u64("version"), 5);
    states[4].assert_held_by(&other.path("v5.db"), "@5 after the prune");

    // The dashboard's API lists the replica's latest from the index too.
    let (status, list) = crate::subscribe::http(&b, "GET", "/api/replicas", &admin);
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["replicas"][0]["latest_version"], 6, "{list}");
}

#[test]
fn a_row_lost_after_its_object_is_repaired_and_a_push_without_postgres_is_refused() {
    // A cluster of its own: this test stops it.
    let pg = Postgres::start();
    let meta = pg.database();
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    let extra = ["--meta", meta.as_str()];
    let a = s3_server(dir.path(), "a", &location, &extra, None);
    let b = s3_server(dir.path(), "b", &location, &extra, Some(&a.admin_key));
    let admin = a.admin_key.clone();
    let m = Machine::new(dir.path(), "m");
    let states = push_versions(&m, &a, 3, 0);
    assert_eq!(rows(&pg, &meta), "1,2,3");

    // A server killed between version 3's object and its row: the row is missing.
    // B's next listing finds the object past the index's latest and puts the row back.
    pg.psql(
        db_name(&meta),
        "DELETE FROM sqlferry_versions WHERE number = 3",
    );
    assert_eq!(rows(&pg, &meta), "1,2");
    assert_eq!(listed(&m, &b, &admin), [1, 2, 3]);
    assert_eq!(rows(&pg, &meta), "1,2,3", "repaired by the listing");
    let other = Machine::new(dir.path(), "other");
    let key = ["--key", admin.as_str()];
    let r = other.pull(&b, "acme/app.db@3", Some("v3.db"), &key);
    assert_eq!(r.u64("version"), 3);
    states[2].assert_held_by(&other.path("v3.db"), "@3 after the repair");

    // Lost again, then a push through B: it finds version 3 as the latest (repairing
    // its row) and makes 4, so the rows stay numbered without a gap.
    pg.psql(
        db_name(&meta),
        "DELETE FROM sqlferry_versions WHERE number = 3",
    );
    let path = m.path("app.db");
    change(&path, 4);
    let r = m.push(&b, "app.db", "acme/app.db", &["--key", &admin]);
    assert_eq!(r.u64("version"), 4);
    assert_eq!(rows(&pg, &meta), "1,2,3,4", "repaired by the push");

    // PostgreSQL stopped: a push is refused cleanly, before any object is written.
    let objects = objects_under(&location);
    pg.stop();
    change(&path, 5);
    let out = m.run_on(&a, ["push", "app.db", "acme/app.db", "--key", &admin]);
    let err = util::stderr(&out);
    assert_eq!(util::code(&out), EXIT_SERVER, "{err}");
    assert!(err.contains("metadata store"), "{err}");
    assert_eq!(objects_under(&location), objects, "nothing was written");

    // Back: the same push lands (the first attempts may still meet a broken pooled
    // connection), is indexed, and B lists and serves it.
    pg.start_again();
    let mut last = None;
    let pushed = util::wait_until(RECOVER_TIMEOUT, Duration::from_millis(100), || {
        let out = m.run_on(&a, ["push", "app.db", "acme/app.db", "--key", &admin]);
        let ok = util::code(&out) == 0;
        last = Some(out);
        ok
    });
    assert!(
        pushed,
        "no push after PostgreSQL came back: {}",
        util::stderr(last.as_ref().expect("an attempt"))
    );
    let five = DbState::of(&path);
    assert_eq!(listed(&m, &b, &admin), [1, 2, 3, 4, 5]);
    assert_eq!(rows(&pg, &meta), "1,2,3,4,5");
    let r = other.pull(&b, "acme/app.db", Some("v5.db"), &key);
    assert_eq!(r.u64("version"), 5);
    five.assert_held_by(&other.path("v5.db"), "@latest after the outage");
}
