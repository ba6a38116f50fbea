//! Several `sqlferry serve` processes in front of one data directory, sharing their
//! metadata and notifications through a real PostgreSQL (`serve --meta`; the cluster
//! from [`crate::postgres`], one database per test): keys minted by one server work on
//! the other, a push to one is pulled from the other, a pull subscriber on one hears a
//! push to the other and a sync-now sent to the other, two pushes racing on two
//! servers end with one version and one VERSION_CONFLICT, a server killed mid-push
//! leaves no version and the other keeps serving, and PostgreSQL stopped for a moment
//! is a clear error, then recovered from without a restart. One machine pushes and
//! pulls through either server as through one store (its history keyed by the shared
//! server id), and each server's API shows the subscribers of both.
//!
//! Every wait is on an event (a subscriber's line, a process exit, a command that
//! succeeds again), polled with a deadline; nothing sleeps.

use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::postgres::{self, Postgres};
use crate::server::kill::{start_push, wait_mid_push, wal_len};
use crate::server::{
    DbState, EXIT_CONFLICT, Machine, Report, TestServer, exec, saved_push_key, sidecar_field,
    small_db, wait_for_exit,
};
use crate::subscribe::{Subscriber, http};
use crate::util;

/// Exit code: the server failed on its own side (docs/exit-codes.md).
const EXIT_SERVER: i32 = 10;

/// How long a command may take here (a debug build on a busy CI).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Two servers sharing `dir/shared-data` and the database `meta`.
fn two_servers(dir: &Path, meta: &str) -> (TestServer, TestServer) {
    let data = dir.join("shared-data");
    let a = TestServer::start_sharing(dir, "a", &data, meta, None);
    let b = TestServer::start_sharing(dir, "b", &data, meta, Some(&a.admin_key));
    (a, b)
}

/// `app.db` of `m` created (about `bytes`) and pushed to `server` with the admin key:
/// the replica's PUSH key (saved on `m`) and PULL key (in its sidecar).
fn first_push(m: &Machine, server: &TestServer, bytes: u64) -> (String, String) {
    small_db(&m.path("app.db"), bytes);
    m.push(
        server,
        "app.db",
        "acme/app.db",
        &["-m", "one", "--key", &server.admin_key],
    );
    (
        saved_push_key(m, &m.path("app.db")),
        sidecar_field(&m.path("app.db-sqlferry"), "key"),
    )
}

fn spawn_push(m: &Machine, server: &TestServer, key: &str) -> Child {
    m.command()
        .args(["push", "app.db", "acme/app.db", "--json", "--key", key])
        .args(["--server", &server.url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start push")
}

fn finish(mut child: Child) -> Output {
    wait_for_exit(&mut child, COMMAND_TIMEOUT).expect("the command ends");
    child.wait_with_output().expect("its output")
}

#[test]
fn two_servers_share_keys_versions_subscribers_and_sync_now() {
    let pg = postgres::shared();
    let meta = pg.database();
    let dir = TempDir::new().expect("tempdir");
    let (a, b) = two_servers(dir.path(), &meta);
    assert_eq!(
        pg.psql(
            meta.rsplit('/').next().expect("a database name"),
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM sqlferry_migrations"
        ),
        "1,2,3,4,5",
        "the migrations ran once, recorded"
    );
    let origin = Machine::new(dir.path(), "origin");
    let follower = Machine::new(dir.path(), "follower");

    // Keys minted by A (on the first push) work on B: pushed to A, pulled from B
    // with the PULL key, and from A too.
    let (push_key, pull_key) = first_push(&origin, &a, 256 << 10);
    exec(
        &origin.path("app.db"),
        "UPDATE t SET v = randomblob(300) WHERE id < 50",
    );
    let two = DbState::of(&origin.path("app.db"));
    let r = origin.push(
        &a,
        "app.db",
        "acme/app.db",
        &["-m", "two", "--key", &push_key],
    );
    assert_eq!(r.u64("version"), 2);
    assert_eq!(r.digest(), two.digest);
    let r = follower.pull(&b, "acme/app.db", Some("copy.db"), &["--key", &pull_key]);
    assert_eq!(r.digest(), two.digest);
    two.assert_held_by(&follower.path("copy.db"), "version 2 pulled from B");
    assert_eq!(util::integrity(&follower.path("copy.db")), "ok");
    let r = follower.pull(&a, "acme/app.db", Some("from-a.db"), &["--key", &pull_key]);
    assert_eq!(r.digest(), two.digest);

    // A pull subscriber on B.
    let mut sub = Subscriber::start(
        &follower,
        &[
            "pull",
            "acme/app.db",
            "sub.db",
            "--subscribe",
            "--server",
            &b.url,
            "--key",
            &pull_key,
        ],
    );
    sub.expect(&["pull (start): version 2"]);

    // A push to A reaches it through PostgreSQL.
    exec(&origin.path("app.db"), "DELETE FROM t WHERE id % 7 = 0");
    let three = DbState::of(&origin.path("app.db"));
    let r = origin.push(
        &a,
        "app.db",
        "acme/app.db",
        &["-m", "three", "--key", &push_key],
    );
    assert_eq!(r.u64("version"), 3);
    sub.expect(&["pull (new-version): version 3"]);
    three.assert_held_by(
        &follower.path("sub.db"),
        "the subscriber on B after a push to A",
    );
    let r = follower.pull(&b, "acme/app.db", Some("pulled.db"), &["--key", &pull_key]);
    assert_eq!(r.digest(), three.digest);
    assert_eq!(util::integrity(&follower.path("pulled.db")), "ok");
    assert_eq!(
        util::dump(&follower.path("pulled.db")),
        util::dump(&origin.path("app.db"))
    );

    // A sync-now sent to A counts and reaches B's subscriber (A has none of its own).
    let (status, body) = http(&a, "POST", "/api/replicas/acme/app.db/sync", &a.admin_key);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reached"], 1, "{body}");
    assert_eq!(body["servers"], 2, "{body}");
    assert_eq!(body["silent_servers"], 0, "{body}");
    sub.expect(&["pull (sync-now)"]);
    let out = origin.run([
        "sync-now",
        "acme/app.db",
        "--server",
        &a.url,
        "--key",
        &push_key,
    ]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert_eq!(
        util::stdout(&out).trim(),
        "sync-now acme/app.db: 1 subscriber reached"
    );
    sub.expect(&["pull (sync-now)"]);

    // Both servers are one server to a client: the same id, the same keys listed.
    let (_, health_a) = http(&a, "GET", "/api/health", "");
    let (_, health_b) = http(&b, "GET", "/api/health", "");
    assert_eq!(
        health_a["server_id"], health_b["server_id"],
        "{health_a} {health_b}"
    );
    drop(sub);
}

#[test]
fn pushes_racing_on_two_servers_make_one_version_and_one_conflict() {
    let pg = postgres::shared();
    let meta = pg.database();
    let dir = TempDir::new().expect("tempdir");
    let (a, b) = two_servers(dir.path(), &meta);
    let one = Machine::new(dir.path(), "one");
    let other = Machine::new(dir.path(), "other");
    let (push_key, _) = first_push(&one, &a, 1 << 20);
    other.pull(&b, "acme/app.db", Some("app.db"), &["--key", &push_key]);

    exec(
        &one.path("app.db"),
        "UPDATE t SET v = randomblob(300) WHERE id % 3 = 0",
    );
    exec(&other.path("app.db"), "DELETE FROM t WHERE id % 5 = 0");
    let states = [
        DbState::of(&one.path("app.db")),
        DbState::of(&other.path("app.db")),
    ];
    assert_ne!(states[0].digest, states[1].digest);
    let pushes = [
        spawn_push(&one, &a, &push_key),
        spawn_push(&other, &b, &push_key),
    ];
    let outs = pushes.map(finish);
    let codes: Vec<i32> = outs.iter().map(util::code).collect();
    let winner = match codes.as_slice() {
        [0, EXIT_CONFLICT] => 0,
        [EXIT_CONFLICT, 0] => 1,
        _ => panic!(
            "exit codes {codes:?}: {} / {}",
            util::stderr(&outs[0]),
            util::stderr(&outs[1])
        ),
    };
    let r = Report::of(&outs[winner], "the winning push");
    assert_eq!(r.u64("version"), 2);
    let err = util::stderr(&outs[1 - winner]);
    assert!(
        err.contains("VERSION_CONFLICT") && err.contains("acme/app.db is at version 2"),
        "{err}"
    );
    for server in [&a, &b] {
        let versions = server.versions("acme/app.db").expect("exists");
        assert_eq!(versions.len(), 2);
        assert_eq!(versions[1].digest, states[winner].digest);
    }
}

#[test]
fn a_server_killed_mid_push_leaves_no_version_and_the_other_keeps_serving() {
    let pg = postgres::shared();
    let meta = pg.database();
    let dir = TempDir::new().expect("tempdir");
    let (mut a, b) = two_servers(dir.path(), &meta);
    let m = Machine::new(dir.path(), "m");
    let reader = Machine::new(dir.path(), "reader");
    let (push_key, pull_key) = first_push(&m, &a, 256 << 10);
    let one = DbState::of(&m.path("app.db"));

    // The database grows large; its push to A is killed with A half-way through.
    util::fill(&util::open(&m.path("app.db")), 48 << 20, 4000);
    util::checkpoint(&m.path("app.db"));
    let mut push = start_push(&m, &a, "killed with its server");
    wait_mid_push(&a, &mut push, wal_len(&a));
    a.sigkill();
    let out = finish(push);
    assert_ne!(util::code(&out), 0, "the push could not finish");

    // B never shows a partial version, serves version 1 and takes the push.
    let versions = b.versions("acme/app.db").expect("exists");
    assert_eq!(versions.iter().map(|v| v.number).collect::<Vec<_>>(), [1]);
    let r = reader.pull(&b, "acme/app.db", Some("v1.db"), &["--key", &pull_key]);
    assert_eq!(r.digest(), one.digest);
    one.assert_held_by(&reader.path("v1.db"), "version 1 from B after A was killed");
    let big = DbState::of(&m.path("app.db"));
    let r = m.push(
        &b,
        "app.db",
        "acme/app.db",
        &["-m", "again", "--key", &push_key],
    );
    assert_eq!(r.u64("version"), 2);
    assert_eq!(r.digest(), big.digest);
    let r = reader.pull(&b, "acme/app.db", Some("v2.db"), &["--key", &pull_key]);
    assert_eq!(r.digest(), big.digest);
    assert_eq!(util::integrity(&reader.path("v2.db")), "ok");

    // A, started again on the directory its killed push left, shows no partial
    // version either: the two complete ones, and serves the second.
    a.restart();
    let versions = a.versions("acme/app.db").expect("exists");
    assert_eq!(
        versions.iter().map(|v| v.number).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(versions[1].digest, big.digest);
    let r = reader.pull(&a, "acme/app.db", Some("v2-a.db"), &["--key", &pull_key]);
    assert_eq!(r.digest(), big.digest);
}

#[test]
fn postgres_stopped_for_a_moment_is_a_clear_error_then_servers_recover_without_a_restart() {
    // A cluster of its own: stopping the shared one would fail the other tests.
    let pg = Postgres::start();
    let meta = pg.database();
    let dir = TempDir::new().expect("tempdir");
    let (a, b) = two_servers(dir.path(), &meta);
    let origin = Machine::new(dir.path(), "origin");
    let follower = Machine::new(dir.path(), "follower");
    let (push_key, pull_key) = first_push(&origin, &a, 256 << 10);
    let mut sub = Subscriber::start(
        &follower,
        &[
            "pull",
            "acme/app.db",
            "sub.db",
            "--subscribe",
            "--server",
            &b.url,
            "--key",
            &pull_key,
        ],
    );
    sub.expect(&["pull (start): version 1"]);

    pg.stop();
    exec(
        &origin.path("app.db"),
        "UPDATE t SET v = randomblob(300) WHERE id < 50",
    );
    let out = origin.run([
        "push",
        "app.db",
        "acme/app.db",
        "--server",
        &a.url,
        "--key",
        &push_key,
    ]);
    let err = util::stderr(&out);
    assert_eq!(util::code(&out), EXIT_SERVER, "{err}");
    assert!(
        err.contains("metadata store") && err.contains("PostgreSQL at 127.0.0.1"),
        "the error names what failed: {err}"
    );
    assert!(
        !err.contains("revoked") && !err.contains("wrong key"),
        "{err}"
    );

    pg.start_again();
    // The same servers, no restart: the push goes through once PostgreSQL is back
    // (each attempt a real push; the first after the restart may still find the pool's
    // broken connection, which is then replaced).
    let mut last = None;
    let pushed = util::wait_until(COMMAND_TIMEOUT, Duration::from_millis(100), || {
        let out = origin.run([
            "push",
            "app.db",
            "acme/app.db",
            "--json",
            "--server",
            &a.url,
            "--key",
            &push_key,
        ]);
        let ok = util::code(&out) == 0;
        last = Some(out);
        ok
    });
    let last = last.expect("one attempt at least");
    assert!(
        pushed,
        "no push after PostgreSQL came back: {}",
        util::stderr(&last)
    );
    let r = Report::of(&last, "the push after the outage");
    assert_eq!(r.u64("version"), 2);
    // B's listening connection came back too (or caught up): its subscriber hears it.
    sub.expect(&["pull (new-version): version 2"]);
    let two = DbState::of(&origin.path("app.db"));
    two.assert_held_by(
        &follower.path("sub.db"),
        "the subscriber on B after the outage",
    );
    assert!(
        b.log()
            .contains("lost the connection that hears the other servers"),
        "B said it lost its listening connection:\n{}",
        b.log()
    );
    drop(sub);
}

#[test]
fn one_machine_pushes_and_pulls_through_either_server_as_through_one() {
    let pg = postgres::shared();
    let meta = pg.database();
    let dir = TempDir::new().expect("tempdir");
    let (a, b) = two_servers(dir.path(), &meta);
    let m = Machine::new(dir.path(), "m");
    let other = Machine::new(dir.path(), "other");
    let (push_key, pull_key) = first_push(&m, &a, 256 << 10);
    let db = m.path("app.db");

    // Version 1 through A, version 2 through B: B takes the base A left.
    exec(&db, "UPDATE t SET v = randomblob(300) WHERE id < 50");
    let two = DbState::of(&db);
    let r = m.push(
        &b,
        "app.db",
        "acme/app.db",
        &["-m", "two", "--key", &push_key],
    );
    assert_eq!(r.u64("version"), 2);
    // Pulled from A into the database itself: it holds version 2, nothing to refuse.
    let r = m.pull(&a, "acme/app.db", Some("app.db"), &["--key", &push_key]);
    assert_eq!(r.u64("version"), 2);
    assert_eq!(r.digest(), two.digest);
    two.assert_held_by(&db, "app.db after pushing to B and pulling from A");
    // Pushed to A again: based on the version pushed to B, no VERSION_CONFLICT.
    exec(&db, "DELETE FROM t WHERE id % 4 = 0");
    let three = DbState::of(&db);
    let r = m.push(
        &a,
        "app.db",
        "acme/app.db",
        &["-m", "three", "--key", &push_key],
    );
    assert_eq!(r.u64("version"), 3);
    assert_eq!(r.digest(), three.digest);

    // Another machine pulls from A, then (a URL it never used) from B.
    let r = other.pull(&a, "acme/app.db", Some("copy.db"), &["--key", &pull_key]);
    assert_eq!(r.digest(), three.digest);
    exec(&db, "UPDATE t SET v = randomblob(100) WHERE id % 9 = 0");
    let four = DbState::of(&db);
    let r = m.push(
        &b,
        "app.db",
        "acme/app.db",
        &["-m", "four", "--key", &push_key],
    );
    assert_eq!(r.u64("version"), 4);
    let r = other.pull(&b, "acme/app.db", Some("copy.db"), &["--key", &pull_key]);
    assert_eq!(r.u64("version"), 4);
    assert_eq!(r.digest(), four.digest);
    four.assert_held_by(&other.path("copy.db"), "copy.db pulled from A, then from B");
    assert_eq!(util::integrity(&other.path("copy.db")), "ok");
    assert_eq!(util::dump(&other.path("copy.db")), util::dump(&db));
}

/// The replica's status on `server` once `ready` holds (polled, with a deadline).
fn status_on(
    server: &TestServer,
    what: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut status = serde_json::Value::Null;
    let met = util::wait_until(COMMAND_TIMEOUT, Duration::from_millis(50), || {
        status = http(
            server,
            "GET",
            "/api/replicas/acme/app.db",
            &server.admin_key,
        )
        .1;
        ready(&status)
    });
    assert!(met, "{what}: {status}");
    status
}

#[test]
fn every_server_shows_the_subscribers_of_every_server() {
    let pg = postgres::shared();
    let meta = pg.database();
    let db_name = meta.rsplit('/').next().expect("a database name").to_owned();
    let dir = TempDir::new().expect("tempdir");
    let (a, b) = two_servers(dir.path(), &meta);
    let origin = Machine::new(dir.path(), "origin");
    let follower = Machine::new(dir.path(), "follower");
    let (_, pull_key) = first_push(&origin, &a, 256 << 10);

    // A pull subscriber on B, a push subscriber on A that plans a push an hour away.
    let mut pull = Subscriber::start(
        &follower,
        &[
            "pull",
            "acme/app.db",
            "sub.db",
            "--subscribe",
            "--server",
            &b.url,
            "--key",
            &pull_key,
        ],
    );
    pull.expect(&["pull (start): version 1"]);
    let mut push =
        crate::subscribe::push_subscriber(&origin, &a, &["--waitIdle", "1h", "--poll", "1s", "-v"]);
    push.expect(&["push (start): no change"]);
    exec(
        &origin.path("app.db"),
        "UPDATE t SET v = randomblob(200) WHERE id < 9",
    );
    push.expect(&["push planned"]);

    // Each server shows both: its own subscriber and the other's.
    let shows_both = |s: &serde_json::Value| {
        s["push_subscribers"] == 1
            && s["pull_subscribers"] == 1
            && s["expected_push_at"].is_i64()
            && s["followers"].as_array().is_some_and(|f| {
                f.len() == 1 && f[0]["applied_version"] == 1 && f[0]["lag_seconds"] == 0
            })
    };
    let on_a = status_on(&a, "A shows B's follower and its own pusher", shows_both);
    let on_b = status_on(&b, "B shows A's pusher and its plan", shows_both);
    assert_eq!(on_a["expected_push_at"], on_b["expected_push_at"]);
    let (_, list) = http(&a, "GET", "/api/replicas", &a.admin_key);
    assert_eq!(list["replicas"][0]["pull_subscribers"], 1, "{list}");
    // In PostgreSQL: one row per subscriber, one expected push.
    assert_eq!(
        pg.psql(
            &db_name,
            "SELECT string_agg(role || ':' || coalesce(applied_version::text, '-'), ',' ORDER BY role) FROM sqlferry_positions"
        ),
        "pull:1,push:-"
    );
    assert_eq!(
        pg.psql(&db_name, "SELECT count(*) FROM sqlferry_expected"),
        "1"
    );

    // The follower leaves B: A stops showing it.
    drop(pull);
    status_on(&a, "A no longer shows B's follower", |s| {
        s["pull_subscribers"] == 0 && s["followers"] == serde_json::json!([])
    });
    // The planned push, asked for through B, lands through A: B shows no plan.
    let (code, body) = http(&b, "POST", "/api/replicas/acme/app.db/sync", &b.admin_key);
    assert_eq!(code, 200, "{body}");
    push.expect(&["push (sync-now): version 2"]);
    status_on(&b, "a commit on A clears the plan B showed", |s| {
        s["expected_push_at"].is_null() && s["push_subscribers"] == 1
    });
    drop(push);
    status_on(&b, "B no longer shows A's pusher", |s| {
        s["push_subscribers"] == 0
    });
}
