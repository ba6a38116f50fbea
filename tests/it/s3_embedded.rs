//! The embedded store over S3, `--server s3://BUCKET/PREFIX` (issue 14, slice 5): real
//! CLI processes with no server, over the real SeaweedFS of `seaweed` (one bucket for
//! the module, a prefix per test). A WAL database pushed, changed and pushed again (the
//! second push sends only the changed pages), pulled back by `@1`, `@latest` and a
//! time, listed, verified, diffed and pruned; one store reached two ways (the embedded
//! client and a `serve --store` on the same bucket and prefix); two pushes raced from
//! two processes (one version, one VERSION_CONFLICT, nothing lost); a push killed
//! (SIGKILL) midway, leaving no version; bad credentials, an endpoint nobody listens
//! on and a missing bucket, one line each; and what the S3 store cannot do yet,
//! refused by name with exit 2 and the bucket unchanged (encrypted replicas it keeps:
//! `s3_sealed`).
//!
//! Every wait is on a process exit or a line of its output; nothing sleeps.

use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tempfile::TempDir;

use crate::s3_serve::{aws_env, objects_under, s3_server, wal_db};
use crate::seaweed::{self, SECRET_KEY};
use crate::server::{
    DbState, EXIT_CONFLICT, EXIT_NOT_FOUND, EXIT_USAGE, Machine, Report, assert_fails, exec,
    wait_for_exit,
};
use crate::util;

/// Exit code: the store failed on its own side (docs/exit-codes.md), as `serve` exits
/// when its bucket is not usable.
const EXIT_SERVER: i32 = 10;

/// How long one command may take here (a debug build on a busy CI).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// A new prefix of this module's one bucket: `s3://BUCKET/embedded-N`. One bucket for
/// the module, not one per test: each bucket grows SeaweedFS volumes of its own, and
/// the test server has room for a bounded number (`seaweed.rs`).
fn new_location() -> String {
    static BUCKET: OnceLock<String> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let bucket = BUCKET.get_or_init(|| seaweed::shared().bucket());
    format!("{bucket}/embedded-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A machine whose commands reach the test SeaweedFS: the `AWS_*` variables of its
/// identity; the endpoint is given per command (`--s3-endpoint`) or by
/// `AWS_ENDPOINT_URL` when `endpoint_env`.
fn s3_machine(dir: &std::path::Path, name: &str, endpoint_env: bool) -> Machine {
    let mut m = Machine::new(dir, name);
    for (k, v) in aws_env() {
        m.set_env(k, v);
    }
    if endpoint_env {
        m.set_env("AWS_ENDPOINT_URL", &seaweed::shared().endpoint);
    }
    m
}

/// `sqlferry ARGS --server LOCATION --s3-endpoint URL` on `m`.
fn run_s3(m: &Machine, location: &str, args: &[&str]) -> Output {
    m.command()
        .args(args)
        .args(["--server", location, "--s3-endpoint"])
        .arg(&seaweed::shared().endpoint)
        .output()
        .expect("run sqlferry")
}

/// `sqlferry push LOCAL REPLICA --json ARGS…` into `location`, asserted to succeed.
fn push(m: &Machine, location: &str, local: &str, replica: &str, args: &[&str]) -> Report {
    let mut all = vec!["push", local, replica, "--json"];
    all.extend_from_slice(args);
    Report::of(
        &run_s3(m, location, &all),
        &format!("push {local} {args:?}"),
    )
}

/// `sqlferry pull SPEC LOCAL --json` from `location`, asserted to succeed.
fn pull(m: &Machine, location: &str, spec: &str, local: &str) -> Report {
    let out = run_s3(m, location, &["pull", spec, local, "--json"]);
    Report::of(&out, &format!("pull {spec} {local}"))
}

/// The version numbers `versions --json` lists.
fn version_numbers(m: &Machine, location: &str, replica: &str) -> Vec<u64> {
    let out = run_s3(m, location, &["versions", replica, "--json"]);
    assert_eq!(util::code(&out), 0, "versions: {}", util::stderr(&out));
    let listed: serde_json::Value =
        serde_json::from_str(util::stdout(&out).trim()).expect("versions --json is JSON");
    let list = listed
        .as_array()
        .unwrap_or_else(|| panic!("a list of versions: {listed}"));
    list.iter()
        .map(|v| v["number"].as_u64().expect("a version number"))
        .collect()
}

fn finish(mut child: Child) -> Output {
    wait_for_exit(&mut child, COMMAND_TIMEOUT).expect("the command ends");
    child.wait_with_output().expect("its output")
}

#[test]
fn a_wal_database_goes_to_s3_and_back_without_a_server() {
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    let origin = s3_machine(dir.path(), "origin", false);
    let (one, writer) = wal_db(&origin, 3 << 20);
    let r = push(&origin, &location, "app.db", "acme/app.db", &["-m", "one"]);
    assert_eq!(r.u64("version"), 1);
    assert_eq!(r.u64("pages_sent"), one.hashes.len() as u64, "{}", r.0);
    // The marker, one pack and its index, one chunk, the version: pages and versions
    // in the bucket, the cache under XDG_CACHE_HOME, nothing in the data dir.
    let after_one = objects_under(&location);
    assert_eq!(after_one.len(), 5, "{after_one:?}");
    let home = origin.work.parent().expect("a machine dir").join("home");
    assert!(
        !util::files_under(&home.join("cache/sqlferry/s3")).is_empty(),
        "the S3 store's cache is under the XDG cache dir"
    );
    assert!(
        !home.join("data/sqlferry").exists(),
        "nothing in the XDG data dir"
    );

    // A 1% change, left in the WAL: the second push sends only the changed pages.
    let path = origin.path("app.db");
    writer
        .execute_batch("UPDATE t SET v = randomblob(300) WHERE id BETWEEN 5000 AND 5120")
        .expect("a change");
    let two = DbState::of(&path);
    let changed = one.pages_differing(&two);
    assert!(changed > 0 && changed * 100 <= two.hashes.len() as u64 * 2);
    let r = push(&origin, &location, "app.db", "acme/app.db", &["-m", "two"]);
    assert_eq!(r.u64("version"), 2);
    assert_eq!(
        r.u64("pages_sent"),
        changed,
        "only the changed pages: {}",
        r.0
    );
    assert_eq!(util::digest_like(&path, &r.0["digest"]), r.digest());
    // The same database again: no version.
    let r = push(&origin, &location, "app.db", "acme/app.db", &[]);
    assert_eq!((r.u64("version"), r.u64("pages_sent")), (2, 0), "{}", r.0);
    drop(writer);

    // Another machine: the endpoint from AWS_ENDPOINT_URL, the store from
    // SQLFERRY_SERVER, then from config.toml.
    let mut other = s3_machine(dir.path(), "other", true);
    other.set_env("SQLFERRY_SERVER", &location);
    let out = other
        .command()
        .args(["pull", "acme/app.db@1", "one.db", "--json"])
        .output()
        .expect("run");
    assert_eq!(Report::of(&out, "pull @1").u64("version"), 1);
    one.assert_held_by(&other.path("one.db"), "@1");
    let config = dir.path().join("other/home/config/sqlferry");
    std::fs::create_dir_all(&config).expect("config dir");
    std::fs::write(
        config.join("config.toml"),
        format!("server = \"{location}\"\n"),
    )
    .expect("config.toml");
    // The same machine (its XDG_CONFIG_HOME holds the file), without SQLFERRY_SERVER.
    let plain = s3_machine(dir.path(), "other", true);
    let out = plain
        .command()
        .args(["pull", "acme/app.db", "latest.db", "--json"])
        .output()
        .expect("run");
    assert_eq!(Report::of(&out, "pull @latest").u64("version"), 2);
    two.assert_held_by(&plain.path("latest.db"), "@latest");
    let r = pull(&other, &location, "acme/app.db@latest-1", "prev.db");
    assert_eq!(r.u64("version"), 1);
    one.assert_held_by(&other.path("prev.db"), "@latest-1");
    assert_eq!(version_numbers(&other, &location, "acme/app.db"), [1, 2]);
    // By time: version 2's time names version 2; a second before version 1, nothing.
    let created = |n: usize| {
        let out = run_s3(&other, &location, &["versions", "acme/app.db", "--json"]);
        let listed: serde_json::Value =
            serde_json::from_str(util::stdout(&out).trim()).expect("versions --json");
        listed[n]["created_at"].as_u64().expect("created_at")
    };
    let rfc3339 = |t: u64| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t))
            .to_string()
    };
    let at_two = format!("acme/app.db@{}", rfc3339(created(1)));
    assert_eq!(pull(&other, &location, &at_two, "at.db").u64("version"), 2);
    two.assert_held_by(&other.path("at.db"), "@TIME of version 2");
    let before = format!("acme/app.db@{}", rfc3339(created(0) - 1));
    let out = run_s3(&other, &location, &["pull", &before, "before.db"]);
    assert_fails(&out, EXIT_NOT_FOUND, "no version is that old");
    assert!(!other.path("before.db").exists(), "nothing written");

    // verify of a stored version: fetched whole, every page hashed again.
    let out = run_s3(&other, &location, &["verify", "acme/app.db@2", "--json"]);
    assert_eq!(util::code(&out), 0, "verify: {}", util::stderr(&out));
    let report: serde_json::Value =
        serde_json::from_str(util::stdout(&out).trim()).expect("verify --json");
    assert_eq!(report["integrity"], serde_json::json!(["ok"]), "{report}");
    let expected = util::digest_like(&origin.path("app.db"), &report["digest"]);
    assert_eq!(
        report["digest"].as_str(),
        Some(expected.as_str()),
        "{report}"
    );

    // The diff of the two versions: the rows the change updated.
    let out = run_s3(
        &other,
        &location,
        &["diff", "acme/app.db@1", "acme/app.db@2"],
    );
    assert_eq!(util::code(&out), 0, "diff: {}", util::stderr(&out));
    let text = util::stdout(&out);
    assert!(
        text.contains("table t: 0 inserted, 121 updated, 0 deleted"),
        "the diff names the 121 rows updated: {text}"
    );

    // Retention: keep the last one; version 1 goes, version 2 pulls back whole.
    let out = run_s3(
        &origin,
        &location,
        &["retention", "acme/app.db", "--keep-last", "1"],
    );
    assert_eq!(util::code(&out), 0, "retention: {}", util::stderr(&out));
    let out = run_s3(&origin, &location, &["prune", "acme/app.db", "--json"]);
    assert_eq!(util::code(&out), 0, "prune: {}", util::stderr(&out));
    assert_eq!(version_numbers(&other, &location, "acme/app.db"), [2]);
    let out = run_s3(&other, &location, &["pull", "acme/app.db@1", "gone.db"]);
    assert_fails(&out, EXIT_NOT_FOUND, "removed by the retention policy");
    assert!(!other.path("gone.db").exists(), "nothing written");
    let r = pull(&other, &location, "acme/app.db", "after.db");
    assert_eq!(r.u64("version"), 2);
    two.assert_held_by(&other.path("after.db"), "@latest after the prune");
}

#[test]
fn one_s3_store_two_ways_in_the_embedded_client_and_a_server() {
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    let origin = s3_machine(dir.path(), "origin", false);
    let (one, _writer) = wal_db(&origin, 1 << 20);
    let r = push(
        &origin,
        &location,
        "app.db",
        "acme/app.db",
        &["-m", "embedded"],
    );
    assert_eq!(r.u64("version"), 1);

    // A server on the same bucket and prefix serves what the embedded client pushed.
    let server = s3_server(dir.path(), "s3", &location, &[], None);
    let remote = Machine::new(dir.path(), "remote");
    let r = remote.pull(
        &server,
        "acme/app.db",
        Some("app.db"),
        &["--key", &server.admin_key],
    );
    assert_eq!(r.u64("version"), 1);
    one.assert_held_by(&remote.path("app.db"), "version 1 through the server");

    // A version pushed through the server is pulled by the embedded client.
    exec(
        &remote.path("app.db"),
        "UPDATE t SET v = randomblob(300) WHERE id <= 50",
    );
    let two = DbState::of(&remote.path("app.db"));
    let r = remote.push(
        &server,
        "app.db",
        "acme/app.db",
        &["-m", "served", "--key", &server.admin_key],
    );
    assert_eq!(r.u64("version"), 2);
    let r = pull(&origin, &location, "acme/app.db", "back.db");
    assert_eq!(r.u64("version"), 2);
    two.assert_held_by(
        &origin.path("back.db"),
        "version 2 through the embedded client",
    );
    assert_eq!(version_numbers(&origin, &location, "acme/app.db"), [1, 2]);
}

#[test]
fn two_pushes_raced_from_two_processes_make_one_version_and_lose_nothing() {
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    let origin = s3_machine(dir.path(), "origin", false);
    let (_one, writer) = wal_db(&origin, 1 << 20);
    drop(writer);
    push(&origin, &location, "app.db", "acme/app.db", &[]);
    // Two machines, both based on version 1, each with its own change.
    let machines = [
        s3_machine(dir.path(), "a", false),
        s3_machine(dir.path(), "b", false),
    ];
    let mut states = Vec::new();
    for (i, m) in machines.iter().enumerate() {
        pull(m, &location, "acme/app.db", "app.db");
        exec(
            &m.path("app.db"),
            &format!("UPDATE t SET v = randomblob({}) WHERE id <= 40", 100 + i),
        );
        states.push(DbState::of(&m.path("app.db")));
    }
    let start = |m: &Machine| -> Child {
        let mut cmd: Command = m.command();
        cmd.args([
            "push",
            "app.db",
            "acme/app.db",
            "--json",
            "--server",
            &location,
        ])
        .arg("--s3-endpoint")
        .arg(&seaweed::shared().endpoint)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        cmd.spawn().expect("start a push")
    };
    let (a, b) = (start(&machines[0]), start(&machines[1]));
    let outs = [finish(a), finish(b)];
    let codes: Vec<i32> = outs.iter().map(util::code).collect();
    let (winner, loser) = util::winner_and_loser(&codes);
    let err = util::stderr(&outs[loser]);
    assert_eq!(codes[loser], EXIT_CONFLICT, "the other conflicts: {err}");
    assert!(
        err.contains("VERSION_CONFLICT: acme/app.db is at version 2")
            && err.contains("with --force to replace version 2"),
        "the advice of today: {err}"
    );
    assert_eq!(version_numbers(&origin, &location, "acme/app.db"), [1, 2]);
    let r = pull(&origin, &location, "acme/app.db@2", "two.db");
    assert_eq!(r.u64("version"), 2);
    states[winner].assert_held_by(&origin.path("two.db"), "the winner's version");
    // The loser's LOCAL kept its change; pushed again as the advice says, it lands as
    // version 3 and the winner's version 2 stays.
    states[loser].assert_held_by(&machines[loser].path("app.db"), "the loser's LOCAL");
    let r = push(
        &machines[loser],
        &location,
        "app.db",
        "acme/app.db",
        &["--force"],
    );
    assert_eq!(r.u64("version"), 3);
    pull(&origin, &location, "acme/app.db@3", "three.db");
    states[loser].assert_held_by(&origin.path("three.db"), "the loser's version");
    pull(&origin, &location, "acme/app.db@2", "two-again.db");
    states[winner].assert_held_by(&origin.path("two-again.db"), "version 2 kept");
}

#[test]
fn a_wrong_secret_a_dead_endpoint_or_a_missing_bucket_is_one_line() {
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    let origin = s3_machine(dir.path(), "origin", false);
    let (_one, writer) = wal_db(&origin, 256 << 10);
    drop(writer);
    push(&origin, &location, "app.db", "acme/app.db", &[]);
    let before = objects_under(&location);

    let mut wrong = s3_machine(dir.path(), "wrong", false);
    wrong.set_env("AWS_SECRET_ACCESS_KEY", "not-the-secret-key-at-all");
    std::fs::copy(origin.path("app.db"), wrong.path("app.db")).expect("copy");
    for args in [
        &["push", "app.db", "acme/app.db"][..],
        &["pull", "acme/app.db", "x.db"],
        &["versions", "acme/app.db"],
    ] {
        let out = run_s3(&wrong, &location, args);
        let line = assert_fails(&out, EXIT_SERVER, "refused the credentials");
        assert!(line.contains(&location), "{line}");
        assert!(!line.contains("not-the-secret-key-at-all"), "{line}");
        assert!(!line.contains(SECRET_KEY), "{line}");
    }
    assert!(!wrong.path("x.db").exists(), "nothing pulled");

    // An endpoint nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let out = origin
        .command()
        .args([
            "versions",
            "acme/app.db",
            "--server",
            &location,
            "--s3-endpoint",
            &dead,
        ])
        .output()
        .expect("run");
    assert_fails(&out, EXIT_SERVER, "cannot reach the object storage");

    // A bucket nobody made: a pull says so (a push would make it: SeaweedFS creates
    // buckets on their first write).
    let missing = format!("{}/sqlferry", seaweed::shared().bucket());
    let out = run_s3(&origin, &missing, &["pull", "acme/app.db", "y.db"]);
    let line = assert_fails(&out, EXIT_SERVER, "the bucket does not exist");
    assert!(line.contains(&missing), "{line}");
    assert!(!origin.path("y.db").exists(), "nothing pulled");
    assert_eq!(objects_under(&location), before, "the bucket unchanged");
}

#[test]
fn what_the_embedded_s3_store_cannot_do_yet_is_refused_by_name() {
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    let origin = s3_machine(dir.path(), "origin", false);
    let (_one, writer) = wal_db(&origin, 256 << 10);
    drop(writer);
    push(&origin, &location, "app.db", "acme/app.db", &[]);
    exec(
        &origin.path("app.db"),
        "UPDATE t SET v = randomblob(50) WHERE id <= 5",
    );
    let before = objects_under(&location);
    let refused: [(&[&str], &str); 4] = [
        (
            &["push", "app.db", "acme/app.db", "--merge"],
            "push --merge",
        ),
        (
            &[
                "push",
                "app.db",
                "acme/app.db",
                "--subscribe",
                "--wait-idle",
                "10s",
            ],
            "push --subscribe",
        ),
        (
            &["pull", "acme/app.db", "s.db", "--subscribe"],
            "pull --subscribe",
        ),
        (&["sync-now", "acme/app.db"], "sync-now"),
    ];
    for (args, feature) in refused {
        let out = run_s3(&origin, &location, args);
        let line = assert_fails(&out, EXIT_USAGE, "not with an S3 store yet");
        assert!(line.contains(feature), "{args:?} names {feature}: {line}");
        assert_eq!(
            objects_under(&location),
            before,
            "{args:?}: the bucket unchanged"
        );
    }
    // scrub checks a store on this machine; it takes no endpoint.
    let out = origin
        .command()
        .args(["scrub", "--server", &location])
        .output()
        .expect("run");
    let line = assert_fails(&out, EXIT_USAGE, "scrub: not with an S3 store yet");
    assert!(line.contains("scrub"), "{line}");
    assert_eq!(
        objects_under(&location),
        before,
        "scrub: the bucket unchanged"
    );
    for file in ["e.db", "s.db"] {
        assert!(!origin.path(file).exists(), "{file}: nothing pulled");
    }
    assert_eq!(version_numbers(&origin, &location, "acme/app.db"), [1]);
}

#[test]
fn a_push_killed_midway_leaves_no_version_and_the_next_push_lands() {
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    let origin = s3_machine(dir.path(), "origin", false);
    let (one, writer) = wal_db(&origin, 256 << 10);
    drop(writer);
    push(&origin, &location, "app.db", "acme/app.db", &[]);
    // About 60 MB of new rows: a push long enough to be killed while it sends pages.
    let path = origin.path("app.db");
    util::fill(&util::open(&path), 60 << 20, 4000);
    let two = DbState::of(&path);
    let mut child = origin
        .command()
        .args([
            "push",
            "app.db",
            "acme/app.db",
            "-vv",
            "--server",
            &location,
        ])
        .arg("--s3-endpoint")
        .arg(&seaweed::shared().endpoint)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a push");
    // Its log line that the origin reads LOCAL: the store was checked, pages go.
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("piped stderr"));
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut stderr, &mut line).expect("read its stderr");
        assert!(n > 0, "the push ended before its origin began: {seen}");
        seen.push_str(&line);
        if line.contains("DEBUG origin") {
            break;
        }
    }
    child.kill().expect("kill -9 the push");
    let status = child.wait().expect("its end");
    assert!(!status.success(), "killed, not finished: {status}");

    // Nothing half-done: version 1 is the latest, whole.
    let other = s3_machine(dir.path(), "other", false);
    assert_eq!(version_numbers(&other, &location, "acme/app.db"), [1]);
    assert_eq!(
        pull(&other, &location, "acme/app.db", "one.db").u64("version"),
        1
    );
    one.assert_held_by(&other.path("one.db"), "version 1 after the kill");
    // The push made again lands whole.
    let r = push(&origin, &location, "app.db", "acme/app.db", &[]);
    assert_eq!(r.u64("version"), 2);
    assert_eq!(
        pull(&other, &location, "acme/app.db", "one.db").u64("version"),
        2
    );
    two.assert_held_by(&other.path("one.db"), "version 2 pushed again");
}
