//! `push --merge` on the embedded store and on a real server: two machines (two homes, so two local
//! histories) pushing one replica from older versions. Disjoint edits merge and both
//! sides end with every row; overlapping edits are refused with the rows listed (stderr
//! and `--json`) and nothing stored; `--on-conflict ours|theirs|newer` decide them; a
//! schema change and a base removed by retention are refused with their reason; a
//! server killed in the middle of a merge leaves the latest version as it was and no
//! scratch file once restarted.
//!
//! What is checked is what a user checks: the rows of each local file and of the
//! latest version, `PRAGMA integrity_check`, the versions and their messages, the exit
//! code, the lines and the JSON fields.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use sqlferry::store::{ReplicaPath, Store};
use tempfile::TempDir;

use crate::server::{Machine, TestServer};
use crate::util::{self, Mode};

const REPLICA: &str = "acme/app.db";

/// A shared embedded store and two machines, `a` and `b`, each with its own home and
/// its own `app.db`.
struct Two {
    dir: TempDir,
}

impl Two {
    /// Machine a creates `app.db` with rows 1..=5 and pushes it (version 1); machine b
    /// pulls it.
    fn new(mode: Mode) -> Two {
        let two = Two {
            dir: TempDir::new().expect("tempdir"),
        };
        for m in ["a", "b"] {
            std::fs::create_dir(two.dir.path().join(m)).expect("machine dir");
        }
        let conn = util::create(&two.db("a"), 4096, mode);
        conn.execute_batch(
            "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, at INTEGER);
             CREATE TABLE log(msg TEXT);
             INSERT INTO items VALUES (1, 'one', 1, 100), (2, 'two', 2, 100),
                 (3, 'three', 3, 100), (4, 'four', 4, 100), (5, 'five', 5, 100);
             INSERT INTO log VALUES ('created');",
        )
        .expect("fill");
        drop(conn);
        two.ok("a", &["push", "DB", REPLICA]);
        two.ok("b", &["pull", REPLICA, "DB"]);
        two
    }

    fn db(&self, machine: &str) -> PathBuf {
        self.dir.path().join(machine).join("app.db")
    }

    fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// `sqlferry ARGS… --server file:///…/store` on `machine`; `DB` stands for its
    /// `app.db`.
    fn run(&self, machine: &str, args: &[&str]) -> Output {
        let db = self.db(machine);
        util::sqlferry(&self.dir.path().join(machine))
            .args(args.iter().map(|a| match *a {
                "DB" => db.as_os_str().to_owned(),
                a => a.into(),
            }))
            .arg("--server")
            .arg(format!("file://{}", self.store_dir().display()))
            .output()
            .expect("run sqlferry")
    }

    fn ok(&self, machine: &str, args: &[&str]) -> String {
        let out = self.run(machine, args);
        assert_eq!(
            util::code(&out),
            0,
            "{machine} {args:?}: {}{}",
            util::stderr(&out),
            util::stdout(&out)
        );
        util::stdout(&out)
    }

    fn json(&self, machine: &str, args: &[&str]) -> (i32, serde_json::Value, String) {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.run(machine, &all);
        let json = serde_json::from_str(util::stdout(&out).trim()).unwrap_or_else(|e| {
            panic!(
                "{args:?}: not JSON ({e}): {}{}",
                util::stdout(&out),
                util::stderr(&out)
            )
        });
        (util::code(&out), json, util::stderr(&out))
    }

    fn edit(&self, machine: &str, sql: &str) {
        util::open(&self.db(machine))
            .execute_batch(sql)
            .expect("edit");
    }

    /// Every version's (number, message).
    fn versions(&self) -> Vec<(u64, String)> {
        Store::new(self.store_dir())
            .versions(&ReplicaPath::parse(REPLICA).expect("valid"))
            .expect("versions")
            .into_iter()
            .map(|v| (v.number, v.message))
            .collect()
    }

    /// The latest version's rows, pulled into a file of its own (by machine a's
    /// history-free pull into a new file).
    fn latest_rows(&self) -> Vec<(String, Vec<Vec<rusqlite::types::Value>>)> {
        let file = self
            .dir
            .path()
            .join(format!("latest-{}.db", self.versions().len()));
        let path = file.to_str().expect("UTF-8");
        self.ok("a", &["pull", REPLICA, path]);
        assert_eq!(util::integrity(&file), "ok");
        util::dump(&file)
    }
}

fn items(path: &Path) -> Vec<(i64, String, i64, i64)> {
    let conn = util::open(path);
    let mut stmt = conn
        .prepare("SELECT id, name, qty, at FROM items ORDER BY id")
        .expect("select");
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("rows")
}

#[test]
fn disjoint_edits_merge_and_both_sides_hold_every_row() {
    for mode in [Mode::Wal, Mode::Rollback] {
        let two = Two::new(mode);
        two.edit(
            "a",
            "UPDATE items SET qty = 10 WHERE id = 1; INSERT INTO log VALUES ('a');",
        );
        two.ok("a", &["push", "DB", REPLICA]);
        two.edit(
            "b",
            "UPDATE items SET qty = 20 WHERE id = 2; DELETE FROM items WHERE id = 3;
             INSERT INTO items VALUES (6, 'six', 6, 100); INSERT INTO log VALUES ('b');",
        );
        let plan = two.ok("b", &["push", "DB", REPLICA, "--merge", "--dry-run"]);
        assert!(
            plan.contains("a merge of LOCAL's row changes since version 1 onto version 2"),
            "{plan}"
        );
        // Without --merge: refused as before, nothing stored.
        let refused = two.run("b", &["push", "DB", REPLICA]);
        assert_eq!(util::code(&refused), 6, "{}", util::stderr(&refused));
        assert!(util::stderr(&refused).contains("VERSION_CONFLICT"));
        assert_eq!(two.versions().len(), 2);

        let before = std::fs::read(two.db("a")).expect("a's bytes");
        let (code, json, stderr) = two.json("b", &["push", "DB", REPLICA, "--merge"]);
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(json["version"], 3);
        assert_eq!(json["created"], true);
        assert_eq!(json["merged"]["base"], 1);
        assert_eq!(json["merged"]["onto"], 2);
        assert_eq!(json["merged"]["version"], 3);
        assert_eq!(
            json["merged"]["changes"], 4,
            "b's row changes: 3 of items, 1 of log"
        );
        assert_eq!(json["merged"]["conflicts_total"], 0);
        assert_eq!(json["local_updated"], true);
        assert_eq!(
            two.versions().last().expect("a version").1,
            "merge of v1 (this push) onto v2"
        );
        let expected = vec![
            (1, "one".into(), 10, 100),
            (2, "two".into(), 20, 100),
            (4, "four".into(), 4, 100),
            (5, "five".into(), 5, 100),
            (6, "six".into(), 6, 100),
        ];
        // b now holds the merged version, whole; a is untouched until it pulls.
        assert_eq!(items(&two.db("b")), expected);
        assert_eq!(util::integrity(&two.db("b")), "ok");
        assert_eq!(std::fs::read(two.db("a")).expect("a's bytes"), before);
        assert_eq!(util::dump(&two.db("b")), two.latest_rows());
        two.ok("a", &["pull", REPLICA, "DB"]);
        assert_eq!(items(&two.db("a")), expected);
        let log: Vec<String> = util::open(&two.db("a"))
            .prepare("SELECT msg FROM log ORDER BY rowid")
            .expect("select")
            .query_map([], |r| r.get(0))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(log, ["created", "a", "b"], "a table without a primary key");
        // b's next push is based on the merge: nothing to merge, nothing changed.
        let (code, json, _) = two.json("b", &["push", "DB", REPLICA, "--merge"]);
        assert_eq!((code, json["created"].clone()), (0, false.into()));
        assert!(json.get("merged").is_none(), "{json}");
    }
}

#[test]
fn overlapping_edits_are_refused_with_the_rows_listed_and_nothing_stored() {
    let two = Two::new(Mode::Wal);
    two.edit("a", "UPDATE items SET name = 'FIVE' WHERE id = 5;");
    two.ok("a", &["push", "DB", REPLICA]);
    two.edit(
        "b",
        "UPDATE items SET qty = 50 WHERE id = 5; UPDATE items SET qty = 40 WHERE id = 4;",
    );
    let before = std::fs::read(two.db("b")).expect("b's bytes");
    let out = two.run("b", &["push", "DB", REPLICA, "--merge"]);
    assert_eq!(util::code(&out), 6, "{}", util::stderr(&out));
    let stderr = util::stderr(&out);
    assert!(stderr.contains("VERSION_CONFLICT"), "{stderr}");
    assert!(
        stderr.contains("1 row was changed both by this push and in the latest version"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "conflict: items id=5: base (at=100, name='five', qty=5), theirs (at=100, \
             name='FIVE', qty=5), ours (at=100, name='five', qty=50) → refused"
        ),
        "{stderr}"
    );
    assert_eq!(two.versions().len(), 2, "nothing stored");
    assert_eq!(
        std::fs::read(two.db("b")).expect("b's bytes"),
        before,
        "LOCAL untouched"
    );

    let (code, json, _) = two.json("b", &["push", "DB", REPLICA, "--merge"]);
    assert_eq!(code, 6);
    assert_eq!(json["exit"], 6);
    assert!(
        json["error"]
            .as_str()
            .expect("error")
            .contains("VERSION_CONFLICT")
    );
    let conflicts = json["merged"]["conflicts"].as_array().expect("conflicts");
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0]["table"], "items");
    assert_eq!(conflicts[0]["key"], serde_json::json!([5]));
    assert_eq!(conflicts[0]["base"]["name"], "five");
    assert_eq!(conflicts[0]["theirs"]["name"], "FIVE");
    assert_eq!(conflicts[0]["ours"]["qty"], 50);
    assert_eq!(json["merged"]["conflicts_total"], 1);
}

#[test]
fn each_on_conflict_mode_decides_the_rows_changed_on_both_sides() {
    // Each mode on a fresh pair: a sets row 5 (at 200), b sets it too (at 300 or 50).
    for (mode, b_at, want) in [
        (&["--on-conflict", "ours"][..], 300, "b"),
        (&["--on-conflict", "theirs"][..], 300, "a"),
        (
            &["--on-conflict", "newer", "--lww-column", "at"][..],
            300,
            "b",
        ),
        (
            &["--on-conflict", "newer", "--lww-column", "at"][..],
            50,
            "a",
        ),
    ] {
        let two = Two::new(Mode::Wal);
        two.edit("a", "UPDATE items SET name = 'a', at = 200 WHERE id = 5;");
        two.ok("a", &["push", "DB", REPLICA]);
        two.edit(
            "b",
            &format!(
                "UPDATE items SET name = 'b', at = {b_at} WHERE id = 5;
                 UPDATE items SET qty = 11 WHERE id = 1;"
            ),
        );
        let mut args = vec!["push", "DB", REPLICA, "--merge"];
        args.extend(mode);
        let (code, json, stderr) = two.json("b", &args);
        assert_eq!(code, 0, "{mode:?}: {stderr}");
        assert_eq!(json["merged"]["conflicts_total"], 1, "{mode:?}");
        let side = if want == "b" { "ours" } else { "theirs" };
        assert_eq!(
            json["merged"]["conflicts"][0]["resolution"], side,
            "{mode:?}"
        );
        let rows = items(&two.db("b"));
        assert_eq!(rows[4].1, want, "{mode:?}: row 5");
        assert_eq!(rows[0].2, 11, "{mode:?}: b's other change is in");
        assert_eq!(util::dump(&two.db("b")), two.latest_rows(), "{mode:?}");
    }
}

#[test]
fn schema_changes_and_a_removed_base_are_refused_with_their_reason() {
    let two = Two::new(Mode::Wal);
    two.edit("a", "UPDATE items SET qty = 10 WHERE id = 1;");
    two.ok("a", &["push", "DB", REPLICA]);
    two.edit("b", "ALTER TABLE items ADD COLUMN note TEXT;");
    let out = two.run(
        "b",
        &["push", "DB", REPLICA, "--merge", "--on-conflict", "ours"],
    );
    assert_eq!(util::code(&out), 6, "{}", util::stderr(&out));
    let stderr = util::stderr(&out);
    assert!(
        stderr.contains("schema changes are never merged: table items was altered by this push"),
        "{stderr}"
    );
    assert_eq!(two.versions().len(), 2);

    // The base (version 1) removed by retention: the merge cannot be made.
    let two = Two::new(Mode::Wal);
    two.ok("a", &["retention", REPLICA, "--keep-last", "1"]);
    two.edit("a", "UPDATE items SET qty = 10 WHERE id = 1;");
    two.ok("a", &["push", "DB", REPLICA]);
    assert_eq!(two.versions().len(), 1, "version 1 removed");
    two.edit("b", "UPDATE items SET qty = 20 WHERE id = 2;");
    let out = two.run("b", &["push", "DB", REPLICA, "--merge"]);
    let stderr = util::stderr(&out);
    assert_eq!(util::code(&out), 8, "{stderr}");
    assert!(
        stderr.contains("cannot merge: version 1 of acme/app.db"),
        "{stderr}"
    );
    assert!(stderr.contains("retention"), "{stderr}");
}

#[test]
fn merge_flags_go_together() {
    let two = Two::new(Mode::Wal);
    for (args, says) in [
        (&["--merge", "--force"][..], "cannot be used with"),
        (&["--on-conflict", "ours"][..], "--merge"),
        (&["--merge", "--on-conflict", "newer"][..], "--lww-column"),
        (
            &["--merge", "--lww-column", "at"][..],
            "--on-conflict newer",
        ),
    ] {
        let mut all = vec!["push", "DB", REPLICA];
        all.extend(args);
        let out = two.run("b", &all);
        assert_eq!(util::code(&out), 2, "{args:?}: {}", util::stderr(&out));
        assert!(
            util::stderr(&out).contains(says),
            "{args:?}: {}",
            util::stderr(&out)
        );
    }
}

/// Two machines on a real `sqlferry serve`, each with the admin key: machine a creates
/// the replica (version 1) from rows 1..=5 and machine b pulls it.
fn on_server(server: &TestServer, root: &Path) -> (Machine, Machine) {
    let (a, b) = (Machine::new(root, "a"), Machine::new(root, "b"));
    let conn = util::create(&a.path("app.db"), 4096, Mode::Wal);
    conn.execute_batch(
        "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, at INTEGER);
         INSERT INTO items VALUES (1, 'one', 1, 100), (2, 'two', 2, 100),
             (3, 'three', 3, 100), (4, 'four', 4, 100), (5, 'five', 5, 100);",
    )
    .expect("fill");
    drop(conn);
    let key = server.admin_key.as_str();
    a.push(server, "app.db", REPLICA, &["--key", key]);
    b.pull(server, REPLICA, Some("app.db"), &["--key", key]);
    (a, b)
}

#[test]
fn a_server_merges_with_the_same_code() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let (a, b) = on_server(&server, dir.path());
    let key = server.admin_key.as_str();
    util::open(&a.path("app.db"))
        .execute_batch("UPDATE items SET qty = 10 WHERE id = 1;")
        .expect("edit a");
    a.push(&server, "app.db", REPLICA, &["--key", key]);
    util::open(&b.path("app.db"))
        .execute_batch(
            "UPDATE items SET qty = 20 WHERE id = 2; INSERT INTO items VALUES (6, 'six', 6, 100);",
        )
        .expect("edit b");
    let report = b.push(&server, "app.db", REPLICA, &["--key", key, "--merge"]);
    assert_eq!(report.u64("version"), 3);
    assert_eq!(report.0["merged"]["base"], 1);
    assert_eq!(report.0["merged"]["onto"], 2);
    assert_eq!(report.0["merged"]["changes"], 2);
    assert_eq!(report.0["local_updated"], true);
    let versions = server.versions(REPLICA).expect("versions");
    assert_eq!(
        versions.last().expect("v3").message,
        "merge of v1 (this push) onto v2"
    );
    let expected = vec![
        (1, "one".into(), 10, 100),
        (2, "two".into(), 20, 100),
        (3, "three".into(), 3, 100),
        (4, "four".into(), 4, 100),
        (5, "five".into(), 5, 100),
        (6, "six".into(), 6, 100),
    ];
    assert_eq!(items(&b.path("app.db")), expected);
    assert_eq!(util::integrity(&b.path("app.db")), "ok");
    assert_eq!(
        versions.last().expect("v3").digest,
        util::digest(&b.path("app.db"))
    );
    a.pull(&server, REPLICA, Some("app.db"), &["--key", key]);
    assert_eq!(items(&a.path("app.db")), expected);

    // Overlapping edits: refused, the row listed, nothing stored.
    util::open(&a.path("app.db"))
        .execute_batch("UPDATE items SET name = 'FOUR' WHERE id = 4;")
        .expect("edit a");
    a.push(&server, "app.db", REPLICA, &["--key", key]);
    util::open(&b.path("app.db"))
        .execute_batch("UPDATE items SET qty = 44 WHERE id = 4;")
        .expect("edit b");
    let out = b.run_on(
        &server,
        ["push", "app.db", REPLICA, "--key", key, "--merge"],
    );
    let stderr = util::stderr(&out);
    assert_eq!(util::code(&out), 6, "{stderr}");
    assert!(
        stderr.contains("moved from version 3 (this push's base) to 4"),
        "{stderr}"
    );
    assert!(
        stderr.contains("conflict: items id=4: base (at=100, name='four', qty=4)"),
        "{stderr}"
    );
    assert_eq!(server.version_numbers(REPLICA), [1, 2, 3, 4]);
    // Decided: ours.
    let report = b.push(
        &server,
        "app.db",
        REPLICA,
        &["--key", key, "--merge", "--on-conflict", "ours"],
    );
    assert_eq!(report.u64("version"), 5);
    assert_eq!(items(&b.path("app.db"))[3], (4, "four".into(), 44, 100));
}

#[test]
fn a_server_killed_mid_merge_leaves_the_latest_version_and_no_scratch_files() {
    let dir = TempDir::new().expect("tempdir");
    let paused = dir.path().join("paused");
    let paused_str = paused.to_str().expect("UTF-8");
    let mut server = TestServer::start_env(
        dir.path(),
        &[
            ("SQLFERRY_DEBUG_PAUSE", "merge"),
            ("SQLFERRY_DEBUG_PAUSE_FILE", paused_str),
        ],
    );
    let (a, b) = on_server(&server, dir.path());
    let key = server.admin_key.clone();
    util::open(&a.path("app.db"))
        .execute_batch("UPDATE items SET qty = 10 WHERE id = 1;")
        .expect("edit a");
    a.push(&server, "app.db", REPLICA, &["--key", &key]);
    let latest = server.versions(REPLICA).expect("versions");
    util::open(&b.path("app.db"))
        .execute_batch("UPDATE items SET qty = 20 WHERE id = 2;")
        .expect("edit b");
    let before = std::fs::read(b.path("app.db")).expect("b's bytes");
    let mut push = b
        .command()
        .args([
            "push",
            "app.db",
            REPLICA,
            "--merge",
            "--key",
            &key,
            "--server",
            &server.url,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the push");
    assert!(
        util::wait_until(Duration::from_secs(60), Duration::from_millis(20), || {
            paused.exists()
        }),
        "the server reached the merge"
    );
    let scratch = dir.path().join("server-data").join("merging");
    assert!(
        std::fs::read_dir(&scratch)
            .expect("scratch dir")
            .next()
            .is_some(),
        "the merge's files are there while it runs"
    );
    server.sigkill();
    let status = push.wait().expect("the push ends");
    assert_eq!(status.code(), Some(4), "the connection was lost");
    assert_eq!(std::fs::read(b.path("app.db")).expect("b's bytes"), before);
    server.restart();
    assert!(!scratch.exists(), "no stray files after the restart");
    assert_eq!(
        server.versions(REPLICA).expect("versions"),
        latest,
        "LATEST as it was"
    );
    // The same push again merges (the restarted server does not pause).
    let report = b.push(&server, "app.db", REPLICA, &["--key", &key, "--merge"]);
    assert_eq!(report.u64("version"), 3);
    assert_eq!(
        items(&b.path("app.db"))[..2],
        [(1, "one".into(), 10, 100), (2, "two".into(), 20, 100)]
    );
}

/// Inserts rows `first..first+count` into `items` of the database at `argv[1]`, one
/// transaction each, a little apart: a writer process of its own.
const WRITER: &str = "
import sqlite3, sys, time
db, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conn = sqlite3.connect(db, timeout=30, isolation_level=None)
for i in range(first, first + count):
    conn.execute('BEGIN IMMEDIATE')
    conn.execute('INSERT INTO items VALUES (?, ?, ?, ?)', (i, 'w%d' % i, i, i))
    conn.execute('COMMIT')
    time.sleep(0.03)
";

fn ids(path: &Path) -> Vec<i64> {
    let conn = util::open(path);
    let mut stmt = conn
        .prepare("SELECT id FROM items ORDER BY id")
        .expect("select");
    stmt.query_map([], |r| r.get(0))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("rows")
}

#[test]
fn two_merging_push_subscribers_converge() {
    const ROWS: i64 = 20;
    let two = Two::new(Mode::Wal);
    let store = format!("file://{}", two.store_dir().display());
    let subscriber = |m: &str| {
        let db = two.db(m);
        let log = std::fs::File::create(two.dir.path().join(format!("{m}.log"))).expect("log");
        util::sqlferry(&two.dir.path().join(m))
            .args(["push", db.to_str().expect("UTF-8"), REPLICA, "--subscribe"])
            .args(["--wait-idle", "10s", "--max-changes", "1", "--poll", "1s"])
            .args(["--merge", "--server", &store])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn a push subscriber")
    };
    let (mut sub_a, mut sub_b) = (subscriber("a"), subscriber("b"));
    let writer = |m: &str, first: i64| {
        std::process::Command::new("python3")
            .args(["-c", WRITER, two.db(m).to_str().expect("UTF-8")])
            .args([first.to_string(), ROWS.to_string()])
            .spawn()
            .expect("spawn a writer")
    };
    let (mut w_a, mut w_b) = (writer("a", 1000), writer("b", 2000));
    assert!(w_a.wait().expect("writer a").success());
    assert!(w_b.wait().expect("writer b").success());
    let mut all: Vec<i64> = (1..=5).collect();
    all.extend(1000..1000 + ROWS);
    all.extend(2000..2000 + ROWS);
    // Until both hold every row, or a subscriber stopped (then it failed: no wait).
    let converged = util::wait_until(Duration::from_secs(120), Duration::from_millis(100), || {
        let stopped = [&mut sub_a, &mut sub_b]
            .into_iter()
            .any(|s| s.try_wait().ok().flatten().is_some());
        stopped || (ids(&two.db("a")) == all && ids(&two.db("b")) == all)
    }) && ids(&two.db("a")) == all
        && ids(&two.db("b")) == all;
    for sub in [&mut sub_a, &mut sub_b] {
        if sub.try_wait().ok().flatten().is_none() {
            crate::server::signal(sub, "TERM");
        }
    }
    let logs = || {
        ["a", "b"]
            .map(|m| {
                std::fs::read_to_string(two.dir.path().join(format!("{m}.log"))).unwrap_or_default()
            })
            .join("\n---\n")
    };
    assert!(
        converged,
        "both local files hold every row; logs:\n{}",
        logs()
    );
    for sub in [&mut sub_a, &mut sub_b] {
        let status = crate::server::wait_for_exit(sub, Duration::from_secs(30)).expect("exits");
        assert!(status.success(), "{status}; logs:\n{}", logs());
    }
    for m in ["a", "b"] {
        assert_eq!(util::integrity(&two.db(m)), "ok");
    }
    let latest = two.latest_rows();
    let items = latest.iter().find(|(t, _)| t == "items").expect("items");
    assert_eq!(
        items.1.len(),
        all.len(),
        "the latest version holds every row"
    );
}

#[test]
fn local_written_while_the_server_merges_keeps_its_changes_and_merges_next_time() {
    let dir = TempDir::new().expect("tempdir");
    let paused = dir.path().join("paused");
    let paused_str = paused.to_str().expect("UTF-8");
    let server = TestServer::start_env(
        dir.path(),
        &[
            ("SQLFERRY_DEBUG_PAUSE", "merge"),
            ("SQLFERRY_DEBUG_PAUSE_FILE", paused_str),
        ],
    );
    let (a, b) = on_server(&server, dir.path());
    let key = server.admin_key.clone();
    util::open(&a.path("app.db"))
        .execute_batch("UPDATE items SET qty = 10 WHERE id = 1;")
        .expect("edit a");
    a.push(&server, "app.db", REPLICA, &["--key", &key]);
    util::open(&b.path("app.db"))
        .execute_batch("UPDATE items SET qty = 20 WHERE id = 2;")
        .expect("edit b");
    let push = b
        .command()
        .args([
            "push", "app.db", REPLICA, "--merge", "--json", "--key", &key,
        ])
        .args(["--server", &server.url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the push");
    assert!(
        util::wait_until(Duration::from_secs(60), Duration::from_millis(20), || {
            paused.exists()
        }),
        "the server reached the merge"
    );
    // b's application writes while the server merges what b's push read.
    util::open(&b.path("app.db"))
        .execute_batch("INSERT INTO items VALUES (7, 'seven', 7, 100);")
        .expect("write b meanwhile");
    std::fs::remove_file(&paused).expect("let the merge go on");
    let out = push.wait_with_output().expect("the push ends");
    let report = crate::server::Report::of(&out, "push --merge");
    assert_eq!(report.u64("version"), 3, "the merge was stored");
    assert_eq!(report.0["local_updated"], false);
    assert!(
        report.0["local_kept"]
            .as_str()
            .expect("why")
            .contains("was written since this push read it"),
        "{}",
        report.0
    );
    // b kept its row 7 and is not brought to version 3 (a's qty 10 is not in it).
    let rows = items(&b.path("app.db"));
    assert_eq!(rows[0], (1, "one".into(), 1, 100));
    assert_eq!(rows.last().expect("row 7").0, 7);
    // Its next push merges again, from the same base: everything ends up in (the
    // server pauses again at the merge: let it go at once).
    let push = b
        .command()
        .args([
            "push", "app.db", REPLICA, "--merge", "--json", "--key", &key,
        ])
        .args(["--server", &server.url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("push again");
    assert!(
        util::wait_until(Duration::from_secs(60), Duration::from_millis(20), || {
            paused.exists()
        }),
        "the server reached the second merge"
    );
    std::fs::remove_file(&paused).expect("let the merge go on");
    let out = push.wait_with_output().expect("the push ends");
    let report = crate::server::Report::of(&out, "push --merge again");
    assert_eq!(report.u64("version"), 4);
    assert_eq!(report.0["merged"]["base"], 1, "the same base as before");
    assert_eq!(report.0["local_updated"], true);
    let rows = items(&b.path("app.db"));
    assert_eq!(rows[0], (1, "one".into(), 10, 100), "a's change");
    assert_eq!(rows[1], (2, "two".into(), 20, 100), "b's first change");
    assert_eq!(
        rows.last().expect("row 7").0,
        7,
        "b's row written meanwhile"
    );
}
