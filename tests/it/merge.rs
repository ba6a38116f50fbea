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
        let sent = util::dump(&two.db("b"));
        let (code, json, stderr) = two.json("b", &["push", "DB", REPLICA, "--merge"]);
        assert_eq!(code, 0, "{stderr}");
        // Two versions: 3, what b sent (its candidate), and 4, the merge.
        assert_eq!(json["version"], 4);
        assert_eq!(json["created"], true);
        assert_eq!(json["merged"]["base"], 1);
        assert_eq!(json["merged"]["onto"], 2);
        assert_eq!(json["merged"]["version"], 4);
        assert_eq!(json["merged"]["candidate"], 3);
        assert_eq!(
            json["merged"]["changes"], 4,
            "b's row changes: 3 of items, 1 of log"
        );
        assert_eq!(json["merged"]["conflicts_total"], 0);
        assert_eq!(json["local_updated"], true);
        assert_eq!(
            two.versions()[2..],
            [
                (3, "push based on v1, merged in v4".into()),
                (4, "merge of v3 (this push, based on v1) onto v2".into())
            ]
        );
        // `versions --json` says which is the candidate; `@3` is exactly what b sent.
        let (_, listed, _) = two.json("a", &["versions", REPLICA]);
        assert_eq!(listed[2]["merged_into"], 4, "{listed}");
        assert!(listed[3].get("merged_into").is_none(), "{listed}");
        let candidate = two.dir.path().join("candidate.db");
        two.ok(
            "a",
            &[
                "pull",
                &format!("{REPLICA}@3"),
                candidate.to_str().expect("UTF-8"),
            ],
        );
        assert_eq!(util::dump(&candidate), sent, "version 3 is what b pushed");
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
    // The advice says what --force would cost, and offers the way that loses nothing.
    assert!(stderr.contains("into another file and compare"), "{stderr}");
    assert!(
        stderr.contains("leaving the rows others pushed since only in older versions"),
        "{stderr}"
    );
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
    let sent = util::dump(&b.path("app.db"));
    let report = b.push(&server, "app.db", REPLICA, &["--key", key, "--merge"]);
    assert_eq!(report.u64("version"), 4);
    assert_eq!(report.0["merged"]["base"], 1);
    assert_eq!(report.0["merged"]["onto"], 2);
    assert_eq!(report.0["merged"]["candidate"], 3);
    assert_eq!(report.0["merged"]["changes"], 2);
    assert_eq!(report.0["local_updated"], true);
    let versions = server.versions(REPLICA).expect("versions");
    assert_eq!(
        versions.last().expect("v4").message,
        "merge of v3 (this push, based on v1) onto v2"
    );
    assert_eq!(versions[2].merged_into, Some(4));
    assert_eq!(versions[2].message, "push based on v1, merged in v4");
    assert_eq!(versions[2].base, 1);
    a.pull(
        &server,
        &format!("{REPLICA}@3"),
        Some("candidate.db"),
        &["--key", key],
    );
    assert_eq!(
        util::dump(&a.path("candidate.db")),
        sent,
        "v3 is what b sent"
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
        versions.last().expect("v4").digest,
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
        stderr.contains("moved from version 4 (this push's base) to 5"),
        "{stderr}"
    );
    assert!(
        stderr.contains("conflict: items id=4: base (at=100, name='four', qty=4)"),
        "{stderr}"
    );
    assert_eq!(server.version_numbers(REPLICA), [1, 2, 3, 4, 5]);
    // Decided: ours.
    let report = b.push(
        &server,
        "app.db",
        REPLICA,
        &["--key", key, "--merge", "--on-conflict", "ours"],
    );
    assert_eq!(report.u64("version"), 7);
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
    assert_eq!(report.u64("version"), 4);
    assert_eq!(
        items(&b.path("app.db"))[..2],
        [(1, "one".into(), 10, 100), (2, "two".into(), 20, 100)]
    );
}

/// An application on one machine: for `seconds`, a row a tenth of a second into its own
/// range of ids (from `first`), and every third time an update of one of the rows it
/// wrote before (so it keeps changing rows its subscriber already pushed); prints how
/// many rows it wrote.
const WRITER: &str = "
import sqlite3, sys, time
db, first, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
conn = sqlite3.connect(db, timeout=30, isolation_level=None)
end, n = time.monotonic() + seconds, 0
while time.monotonic() < end:
    conn.execute('BEGIN IMMEDIATE')
    conn.execute('INSERT INTO items VALUES (?, ?, ?, ?)', (first + n, 'w%d' % n, n, n))
    if n % 3 == 2:
        conn.execute('UPDATE items SET qty = qty + 1000 WHERE id = ?', (first + n // 2,))
    conn.execute('COMMIT')
    n += 1
    time.sleep(0.1)
print(n)
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

/// Two machines, each with a push subscriber `--merge` on its `app.db` (`dbs`), each
/// database written by an application ([`WRITER`]) for `seconds`, into its own range
/// of ids, updating its own earlier rows as it goes. Once the applications stop: both
/// subscribers settle with both files holding every row either side wrote (every
/// update too) and the same rows, and the latest version (`latest` pulls it into a
/// new file) holding them too; each subscriber then stops cleanly on SIGTERM.
/// `subscriber(i, log)` spawns machine i's subscriber, its stderr into `log`.
fn applications_and_merging_subscribers_converge(
    root: &Path,
    dbs: [PathBuf; 2],
    seconds: &str,
    subscriber: &dyn Fn(usize, std::fs::File) -> std::process::Child,
    latest: &dyn Fn(usize) -> PathBuf,
) {
    let log_path = |i: usize| root.join(format!("subscriber-{i}.log"));
    let mut subs: Vec<std::process::Child> = (0..2)
        .map(|i| subscriber(i, std::fs::File::create(log_path(i)).expect("log")))
        .collect();
    let logs = || {
        (0..2)
            .map(|i| std::fs::read_to_string(log_path(i)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let firsts = [100_000i64, 200_000];
    let writers: Vec<std::process::Child> = (0..2)
        .map(|i| {
            std::process::Command::new("python3")
                .args(["-c", WRITER, dbs[i].to_str().expect("UTF-8")])
                .args([&firsts[i].to_string(), seconds])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn a writer")
        })
        .collect();
    let written: Vec<i64> = writers
        .into_iter()
        .map(|w| {
            let out = w.wait_with_output().expect("writer");
            assert!(out.status.success(), "the writer failed");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("rows written")
        })
        .collect();
    let least = seconds.parse::<i64>().expect("seconds") * 2;
    assert!(
        written.iter().all(|&n| n > least),
        "each wrote for {seconds} s: {written:?} rows"
    );
    let mut all: Vec<i64> = (1..=5).collect();
    for i in 0..2 {
        all.extend(firsts[i]..firsts[i] + written[i]);
    }
    // Until both hold every row and the same rows, or a subscriber stopped (then it
    // failed: no wait).
    let same =
        || ids(&dbs[0]) == all && ids(&dbs[1]) == all && util::dump(&dbs[0]) == util::dump(&dbs[1]);
    let converged = util::wait_until(Duration::from_secs(240), Duration::from_millis(200), || {
        let stopped = subs
            .iter_mut()
            .any(|s| s.try_wait().ok().flatten().is_some());
        stopped || same()
    }) && same();
    // The latest version holds the same rows (the last merge may still be landing).
    let mut pulls = 0;
    let latest_same = converged
        && util::wait_until(Duration::from_secs(120), Duration::from_millis(200), || {
            pulls += 1;
            let file = latest(pulls);
            util::integrity(&file) == "ok" && util::dump(&file) == util::dump(&dbs[0])
        });
    for sub in &mut subs {
        if sub.try_wait().ok().flatten().is_none() {
            crate::server::signal(sub, "TERM");
        }
    }
    assert!(
        converged,
        "both local files hold every row; logs:\n{}",
        logs()
    );
    assert!(
        latest_same,
        "the latest version holds every row; logs:\n{}",
        logs()
    );
    for sub in &mut subs {
        let status = crate::server::wait_for_exit(sub, Duration::from_secs(60)).expect("exits");
        assert!(status.success(), "{status}; logs:\n{}", logs());
    }
    // Every update either side made is there: row first + k was raised by 1000 for
    // each n = 3k + 2 the writer reached.
    for db in &dbs {
        assert_eq!(util::integrity(db), "ok");
        for i in 0..2 {
            let raised: i64 = util::open(db)
                .query_row(
                    "SELECT count(*) FROM items WHERE id >= ?1 AND id < ?2 AND qty >= 1000",
                    [firsts[i], firsts[i] + written[i]],
                    |r| r.get(0),
                )
                .expect("count");
            assert_eq!(
                raised,
                (0..written[i]).filter(|n| n % 3 == 2).count() as i64
            );
        }
    }
    // Refused merges are what the applications must not meet; each subscriber's line
    // says when its push was merged, and when LOCAL kept later changes.
    assert!(!logs().contains("merge was refused"), "logs:\n{}", logs());
    assert!(logs().contains("merged v"), "logs:\n{}", logs());
}

#[test]
fn two_merging_push_subscribers_converge() {
    let two = Two::new(Mode::Wal);
    let store = format!("file://{}", two.store_dir().display());
    let machines = ["a", "b"];
    applications_and_merging_subscribers_converge(
        two.dir.path(),
        [two.db("a"), two.db("b")],
        "10",
        &|i, log| {
            let db = two.db(machines[i]);
            util::sqlferry(&two.dir.path().join(machines[i]))
                .args(["push", db.to_str().expect("UTF-8"), REPLICA, "--subscribe"])
                .args(["--wait-idle", "10s", "--max-changes", "1", "--poll", "1s"])
                .args(["--merge", "--server", &store])
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("spawn a push subscriber")
        },
        &|n| {
            let file = two.dir.path().join(format!("latest-{n}.db"));
            two.ok("a", &["pull", REPLICA, file.to_str().expect("UTF-8")]);
            file
        },
    );
}

/// The run that found the limit of the first merging subscribers: two machines on a
/// real server, each application writing for 30 s and updating rows it pushed before.
#[test]
fn two_merging_push_subscribers_on_a_server_converge() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let (a, b) = on_server(&server, dir.path());
    let key = server.admin_key.as_str();
    let machines = [&a, &b];
    applications_and_merging_subscribers_converge(
        dir.path(),
        [a.path("app.db"), b.path("app.db")],
        "30",
        &|i, log| {
            machines[i]
                .command()
                .args(["push", "app.db", REPLICA, "--subscribe"])
                .args(["--wait-idle", "10s", "--max-changes", "1", "--poll", "1s"])
                .args(["--merge", "--server", &server.url, "--key", key])
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("spawn a push subscriber")
        },
        &|n| {
            let file = dir.path().join(format!("latest-{n}.db"));
            let out = a.run_on(
                &server,
                ["pull", REPLICA, file.to_str().expect("UTF-8"), "--key", key],
            );
            assert!(out.status.success(), "{}", util::stderr(&out));
            file
        },
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
    assert_eq!(report.u64("version"), 4, "the merge was stored");
    assert_eq!(
        report.0["merged"]["candidate"], 3,
        "and what b sent, before it"
    );
    assert_eq!(report.0["local_updated"], false);
    assert!(
        report.0["local_kept"]
            .as_str()
            .expect("why")
            .contains("was written since this push read it"),
        "{}",
        report.0
    );
    // b kept its row 7 and is not brought to version 4 (a's qty 10 is not in it).
    let rows = items(&b.path("app.db"));
    assert_eq!(rows[0], (1, "one".into(), 1, 100));
    assert_eq!(rows.last().expect("row 7").0, 7);
    // Its next push merges again, based on what its first push sent (version 3):
    // everything ends up in (the server pauses again at the merge: let it go at once).
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
    assert_eq!(report.u64("version"), 6);
    assert_eq!(report.0["merged"]["base"], 3, "based on the candidate");
    assert_eq!(report.0["merged"]["onto"], 4);
    assert_eq!(
        report.0["merged"]["changes"], 1,
        "row 7 only: b's first change is in"
    );
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

/// `push --merge` in the daemon: `merge = true` in a `[[push]]` merges the daemon's
/// push onto a replica another machine moved, and its line says so.
#[test]
fn a_daemon_push_with_merge_true_merges_end_to_end() {
    use crate::subscribe::{Subscriber, commit_rows, writer_db};
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let key = server.admin_key.clone();
    let mut host = Machine::new(dir.path(), "host");
    host.set_env("SQLFERRY_KEY", &key);
    let other = Machine::new(dir.path(), "other");
    std::fs::create_dir_all(host.path("dbs")).expect("dbs");
    writer_db(&host.path("dbs/m.db"), 3);
    host.push(&server, "dbs/m.db", "acme/m.db", &["--key", &key]);
    // Another machine adds rows of its own: version 2. Then the host's application
    // writes too, before its daemon starts: its first push finds the replica moved.
    other.pull(&server, "acme/m.db", Some("m.db"), &["--key", &key]);
    commit_rows(&other.path("m.db"), 100..=102);
    other.push(&server, "m.db", "acme/m.db", &["--key", &key]);
    commit_rows(&host.path("dbs/m.db"), 4..=5);
    std::fs::write(
        host.path("sqlferry.toml"),
        format!(
            r#"[defaults]
server = "{}"
key_env = "SQLFERRY_KEY"
wait_idle = "10s"
max_changes = 1
poll = "1s"

[[push]]
database = "dbs/m.db"
to = ["acme/m.db"]
merge = true
"#,
            server.url
        ),
    )
    .expect("config");
    let mut daemon = Subscriber::start(&host, &["daemon", "--config", "sqlferry.toml"]);
    daemon.expect(&[
        "dbs/m.db -> acme/m.db",
        "push (start): merged v1 onto v2 → version 4 (this push kept as version 3)",
        "LOCAL now holds version 4",
    ]);
    let ids = |path: &Path| -> Vec<i64> {
        util::open(path)
            .prepare("SELECT id FROM w ORDER BY id")
            .expect("select")
            .query_map([], |r| r.get(0))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("rows")
    };
    let both = vec![1, 2, 3, 4, 5, 100, 101, 102];
    assert_eq!(ids(&host.path("dbs/m.db")), both);
    let latest = other.pull(&server, "acme/m.db", Some("latest.db"), &["--key", &key]);
    assert_eq!(latest.u64("version"), 4);
    assert_eq!(ids(&other.path("latest.db")), both);
    assert_eq!(util::integrity(&other.path("latest.db")), "ok");
    assert_eq!(daemon.stop(), 0, "{}", daemon.output());
}

/// A proxy on `listener` in front of the server at `upstream` (`ws://…`) that makes it
/// a server older than merging: the client's OPEN loses its `merge` request on the way
/// in, and the server's CONFIG its `merge` answer on the way out (an older server
/// ignores the one and never sends the other).
async fn pre_merge_proxy(listener: tokio::net::TcpListener, upstream: String) {
    rewriting_proxy(listener, upstream, |_, json| {
        json.remove("merge");
    })
    .await
}

/// A proxy on `listener` in front of the server at `upstream` (`ws://…`) that passes
/// every message as it is but the JSON control frames OPEN (0x50, on the way in) and
/// CONFIG (0x51, on the way out), which `rewrite` (given the frame's type) changes:
/// a peer of another age, as the other end sees it.
pub(crate) async fn rewriting_proxy(
    listener: tokio::net::TcpListener,
    upstream: String,
    rewrite: fn(u8, &mut serde_json::Map<String, serde_json::Value>),
) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::handshake::server::{
        Callback, ErrorResponse, Request, Response,
    };
    struct Auth<'a>(&'a mut Option<(String, Option<String>)>);
    impl Callback for Auth<'_> {
        fn on_request(
            self,
            request: &Request,
            response: Response,
        ) -> Result<Response, ErrorResponse> {
            *self.0 = Some((
                request.uri().to_string(),
                request
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            ));
            Ok(response)
        }
    }
    // The control frame `b` of type `ty`, rewritten.
    let strip = move |b: &[u8], ty: u8| -> Option<Vec<u8>> {
        if b.first() != Some(&ty) {
            return None;
        }
        let mut v: serde_json::Value = serde_json::from_slice(&b[1..]).ok()?;
        rewrite(ty, v.as_object_mut()?);
        let mut out = vec![ty];
        out.extend(serde_json::to_vec(&v).expect("JSON"));
        Some(out)
    };
    while let Ok((tcp, _)) = listener.accept().await {
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let mut asked = None;
            let Ok(client) = tokio_tungstenite::accept_hdr_async(tcp, Auth(&mut asked)).await
            else {
                return;
            };
            let (uri, auth) = asked.expect("a request");
            let mut request = format!("{upstream}{uri}")
                .into_client_request()
                .expect("request");
            if let Some(auth) = auth {
                request
                    .headers_mut()
                    .insert("authorization", auth.parse().expect("header"));
            }
            let (server, _) = tokio_tungstenite::connect_async(request)
                .await
                .expect("the server's upgrade");
            let (mut c_tx, mut c_rx) = client.split();
            let (mut s_tx, mut s_rx) = server.split();
            let up = async {
                while let Some(Ok(m)) = c_rx.next().await {
                    let m = match m {
                        Message::Binary(b) => {
                            Message::Binary(strip(&b, 0x50).unwrap_or_else(|| b.to_vec()).into())
                        }
                        m => m,
                    };
                    if s_tx.send(m).await.is_err() {
                        break;
                    }
                }
            };
            let down = async {
                while let Some(Ok(m)) = s_rx.next().await {
                    let m = match m {
                        Message::Binary(b) => {
                            Message::Binary(strip(&b, 0x51).unwrap_or_else(|| b.to_vec()).into())
                        }
                        m => m,
                    };
                    if c_tx.send(m).await.is_err() {
                        break;
                    }
                }
            };
            tokio::select! {
                _ = up => {}
                _ = down => {}
            }
        });
    }
}

/// A server older than merging (simulated by a proxy that drops the merge fields both
/// ways) answers a `--merge` push onto a replica that moved with a clear refusal,
/// before a page is sent: exit 4, nothing stored, LOCAL untouched.
#[test]
fn a_server_older_than_merging_refuses_a_merge_push_clearly() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let key = server.admin_key.clone();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let old = format!("ws://{}", listener.local_addr().expect("address"));
    let proxy = rt.spawn(pre_merge_proxy(listener, server.url.clone()));
    let (a, _) = on_server(&server, dir.path());
    // Machine c knows the replica only through the old server.
    let c = Machine::new(dir.path(), "c");
    let run = |m: &Machine, args: &[&str]| {
        m.command()
            .args(args)
            .args(["--server", &old, "--key", &key])
            .output()
            .expect("run sqlferry")
    };
    let out = run(&c, &["pull", REPLICA, "app.db"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    util::open(&a.path("app.db"))
        .execute_batch("UPDATE items SET qty = 10 WHERE id = 1;")
        .expect("edit a");
    a.push(&server, "app.db", REPLICA, &["--key", &key]);
    util::open(&c.path("app.db"))
        .execute_batch("UPDATE items SET qty = 30 WHERE id = 3;")
        .expect("edit c");
    let before = std::fs::read(c.path("app.db")).expect("c's bytes");
    let out = run(&c, &["push", "app.db", REPLICA, "--merge"]);
    let stderr = util::stderr(&out);
    assert_eq!(util::code(&out), 4, "{stderr}");
    assert!(
        stderr.contains("does not merge pushes (a sqlferry serve older than this client)"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was pushed"), "{stderr}");
    assert_eq!(server.version_numbers(REPLICA), [1, 2], "nothing stored");
    assert_eq!(std::fs::read(c.path("app.db")).expect("c's bytes"), before);
    // Through the old server a push whose base is the latest still goes, merge or not.
    let out = run(&c, &["pull", REPLICA, "fresh.db"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    util::open(&c.path("fresh.db"))
        .execute_batch("UPDATE items SET qty = 40 WHERE id = 4;")
        .expect("edit");
    let out = run(&c, &["push", "fresh.db", REPLICA, "--merge"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert_eq!(server.version_numbers(REPLICA), [1, 2, 3]);
    proxy.abort();
}

/// Hostile: the server killed (SIGKILL) when both versions of a merge are written and
/// neither is committed: after a restart neither exists, the latest is as it was,
/// and the same push merges again into both.
#[test]
fn a_server_killed_between_the_candidate_and_the_merge_leaves_neither() {
    let dir = TempDir::new().expect("tempdir");
    let paused = dir.path().join("paused");
    let mut server = TestServer::start_env(
        dir.path(),
        &[
            ("SQLFERRY_DEBUG_PAUSE", "merge-commit"),
            ("SQLFERRY_DEBUG_PAUSE_FILE", paused.to_str().expect("UTF-8")),
        ],
    );
    let (a, b) = on_server(&server, dir.path());
    let key = server.admin_key.clone();
    util::open(&a.path("app.db"))
        .execute_batch("UPDATE items SET qty = 10 WHERE id = 1;")
        .expect("edit a");
    a.push(&server, "app.db", REPLICA, &["--key", &key]);
    let before = server.versions(REPLICA).expect("versions");
    util::open(&b.path("app.db"))
        .execute_batch("UPDATE items SET qty = 20 WHERE id = 2;")
        .expect("edit b");
    let mut push = b
        .command()
        .args(["push", "app.db", REPLICA, "--merge", "--key", &key])
        .args(["--server", &server.url])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the push");
    assert!(
        util::wait_until(Duration::from_secs(60), Duration::from_millis(20), || {
            paused.exists()
        }),
        "the server reached the merge's commit"
    );
    server.sigkill();
    assert_eq!(push.wait().expect("the push ends").code(), Some(4));
    server.restart();
    assert_eq!(
        server.versions(REPLICA).expect("versions"),
        before,
        "neither the candidate nor the merge"
    );
    // A pull subscriber's view: the latest is version 2, whole.
    let latest = a.pull(&server, REPLICA, Some("latest.db"), &["--key", &key]);
    assert_eq!(latest.u64("version"), 2);
    assert_eq!(util::integrity(&a.path("latest.db")), "ok");
    let report = b.push(&server, "app.db", REPLICA, &["--key", &key, "--merge"]);
    assert_eq!(report.u64("version"), 4);
    assert_eq!(report.0["merged"]["candidate"], 3);
    let numbers: Vec<(u64, Option<u64>)> = server
        .versions(REPLICA)
        .expect("versions")
        .iter()
        .map(|v| (v.number, v.merged_into))
        .collect();
    assert_eq!(numbers, [(1, None), (2, None), (3, Some(4)), (4, None)]);
}

/// Hostile: two merging pushes from two machines at once, onto a replica a third moved.
/// Both land (one merges again onto the other's), each as a candidate and its merge,
/// adjacent; the latest holds every side's rows.
#[test]
fn two_merging_pushes_racing_both_land_each_with_its_candidate() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let (a, b) = on_server(&server, dir.path());
    let key = server.admin_key.clone();
    let c = Machine::new(dir.path(), "c");
    c.pull(&server, REPLICA, Some("app.db"), &["--key", &key]);
    util::open(&a.path("app.db"))
        .execute_batch("UPDATE items SET qty = 10 WHERE id = 1;")
        .expect("edit a");
    a.push(&server, "app.db", REPLICA, &["--key", &key]);
    for (m, sql) in [
        (
            &b,
            "UPDATE items SET qty = 20 WHERE id = 2; INSERT INTO items VALUES (6, 'six', 6, 1);",
        ),
        (
            &c,
            "UPDATE items SET qty = 30 WHERE id = 3; INSERT INTO items VALUES (7, 'seven', 7, 1);",
        ),
    ] {
        util::open(&m.path("app.db"))
            .execute_batch(sql)
            .expect("edit");
    }
    let spawn = |m: &Machine| {
        m.command()
            .args([
                "push", "app.db", REPLICA, "--merge", "--json", "--key", &key,
            ])
            .args(["--server", &server.url])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn a push")
    };
    let (pb, pc) = (spawn(&b), spawn(&c));
    for (p, what) in [(pb, "b"), (pc, "c")] {
        let out = p.wait_with_output().expect("the push ends");
        let report = crate::server::Report::of(&out, what);
        assert_eq!(report.0["local_updated"], true, "{what}: {}", report.0);
        let (version, candidate) = (
            report.u64("version"),
            report.0["merged"]["candidate"].clone(),
        );
        assert_eq!(candidate, version - 1, "{what}: {}", report.0);
    }
    let versions = server.versions(REPLICA).expect("versions");
    let numbers: Vec<(u64, Option<u64>)> =
        versions.iter().map(|v| (v.number, v.merged_into)).collect();
    assert_eq!(
        numbers,
        [
            (1, None),
            (2, None),
            (3, Some(4)),
            (4, None),
            (5, Some(6)),
            (6, None)
        ]
    );
    let latest = a.pull(&server, REPLICA, Some("app.db"), &["--key", &key]);
    assert_eq!(latest.u64("version"), 6);
    let rows = items(&a.path("app.db"));
    let qty: Vec<(i64, i64)> = rows.iter().map(|r| (r.0, r.2)).collect();
    assert_eq!(
        qty,
        [(1, 10), (2, 20), (3, 30), (4, 4), (5, 5), (6, 6), (7, 7)],
        "every side's rows"
    );
    // The first to land holds its rows and a's; the second, everything: both files.
    assert_eq!(
        items(&b.path("app.db")).len() + items(&c.path("app.db")).len(),
        6 + 7
    );
}

/// Hostile: a merging push whose LOCAL holds exactly the latest version (the same
/// bytes, though its base is older): nothing to merge, nothing stored, LOCAL recorded
/// at the latest version.
#[test]
fn a_merge_whose_candidate_is_the_latest_version_stores_nothing() {
    let two = Two::new(Mode::Wal);
    two.edit("a", "UPDATE items SET qty = 10 WHERE id = 1;");
    two.ok("a", &["push", "DB", REPLICA]);
    // b's file becomes exactly version 2 (pulled into another file, copied over).
    let v2 = two.dir.path().join("v2.db");
    two.ok("a", &["pull", REPLICA, v2.to_str().expect("UTF-8")]);
    util::open(&v2)
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .expect("checkpoint");
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", two.db("b").display()));
    }
    std::fs::copy(&v2, two.db("b")).expect("copy");
    let (code, json, stderr) = two.json("b", &["push", "DB", REPLICA, "--merge"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json["version"], 2, "{json}");
    assert_eq!(json["created"], false);
    // The embedded store sees the same content before it would merge ("already at
    // version 2"); a server merges, finds the candidate is the latest, and says so.
    if let Some(merged) = json.get("merged") {
        assert_eq!(merged["candidate"], 2, "{json}");
        assert_eq!(json["local_updated"], true);
    }
    assert_eq!(two.versions().len(), 2, "nothing stored");
    // Its next push is based on version 2: nothing to do.
    let (code, json, _) = two.json("b", &["push", "DB", REPLICA, "--merge"]);
    assert_eq!((code, json["created"].clone()), (0, false.into()));
    assert!(json.get("merged").is_none(), "{json}");
}

/// Retention counts a merge's candidate with its merge: `keep-last 2` keeps the two
/// newest versions and the candidate of either, which a LOCAL kept after the merge is
/// based on; it goes with its merge.
#[test]
fn retention_keeps_a_candidate_as_long_as_its_merge() {
    let two = Two::new(Mode::Wal);
    two.ok("a", &["retention", REPLICA, "--keep-last", "2"]);
    two.edit("a", "UPDATE items SET qty = 10 WHERE id = 1;");
    two.ok("a", &["push", "DB", REPLICA]);
    two.edit("b", "UPDATE items SET qty = 20 WHERE id = 2;");
    let (code, json, stderr) = two.json("b", &["push", "DB", REPLICA, "--merge"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        (json["version"].clone(), json["merged"]["candidate"].clone()),
        (4.into(), 3.into())
    );
    let numbers = |two: &Two| -> Vec<u64> { two.versions().iter().map(|v| v.0).collect() };
    assert_eq!(
        numbers(&two),
        [2, 3, 4],
        "version 1 removed, the candidate kept"
    );
    two.ok("a", &["pull", REPLICA, "DB"]);
    two.edit("a", "UPDATE items SET qty = 11 WHERE id = 1;");
    two.ok("a", &["push", "DB", REPLICA]);
    assert_eq!(
        numbers(&two),
        [3, 4, 5],
        "the candidate stays with its merge"
    );
    two.edit("a", "UPDATE items SET qty = 12 WHERE id = 1;");
    two.ok("a", &["push", "DB", REPLICA]);
    assert_eq!(numbers(&two), [5, 6], "and goes with it");
}

/// The bug the candidate fixes, step by step on the embedded store: b's application
/// changes again, while b's push merges, the very row that push carried. LOCAL keeps
/// its change and is based on the candidate; its next merge sees only that change (no
/// conflict with its own earlier value, which the first pass refused), and both
/// changes of the row end in the order they were made.
#[test]
fn local_changing_again_a_row_it_pushed_while_merging_merges_without_conflict() {
    let two = Two::new(Mode::Wal);
    two.edit("a", "UPDATE items SET qty = 10 WHERE id = 1;");
    two.ok("a", &["push", "DB", REPLICA]);
    two.edit("b", "UPDATE items SET qty = 20 WHERE id = 2;");
    let paused = two.dir.path().join("paused");
    let push = util::sqlferry(&two.dir.path().join("b"))
        .args([
            "push",
            two.db("b").to_str().expect("UTF-8"),
            REPLICA,
            "--merge",
            "--json",
        ])
        .arg("--server")
        .arg(format!("file://{}", two.store_dir().display()))
        // The embedded store merges in this process: it pauses with both versions
        // written, before they commit.
        .env("SQLFERRY_DEBUG_PAUSE", "merge-commit")
        .env("SQLFERRY_DEBUG_PAUSE_FILE", &paused)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the push");
    assert!(
        util::wait_until(Duration::from_secs(60), Duration::from_millis(20), || {
            paused.exists()
        }),
        "the push reached the merge's commit"
    );
    two.edit("b", "UPDATE items SET qty = 21 WHERE id = 2;");
    std::fs::remove_file(&paused).expect("let the merge go on");
    let out = push.wait_with_output().expect("the push ends");
    let report = crate::server::Report::of(&out, "push --merge");
    assert_eq!(report.u64("version"), 4);
    assert_eq!(report.0["merged"]["candidate"], 3);
    assert_eq!(report.0["local_updated"], false, "{}", report.0);
    assert!(
        report.0["local_kept"]
            .as_str()
            .expect("why")
            .contains("was written since this push read it"),
        "{}",
        report.0
    );
    // The next push: based on version 3, it carries only qty 20 → 21.
    let (code, json, stderr) = two.json("b", &["push", "DB", REPLICA, "--merge"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json["merged"]["base"], 3, "{json}");
    assert_eq!(json["merged"]["onto"], 4);
    assert_eq!(json["merged"]["changes"], 1);
    assert_eq!(json["merged"]["conflicts_total"], 0);
    assert_eq!(json["version"], 6);
    assert_eq!(json["local_updated"], true);
    let rows = items(&two.db("b"));
    assert_eq!(
        (rows[0].2, rows[1].2),
        (10, 21),
        "a's change and b's last one"
    );
    assert_eq!(util::dump(&two.db("b")), two.latest_rows());
}

/// Hostile: a merging push whose rows the latest version already holds (a merging push
/// killed after its commit and retried, say): the merge adds nothing, so nothing is
/// stored ("already at version 4") and LOCAL is brought to the latest. The candidate
/// alone never becomes the latest (it lacked a's row, which later merges then deleted).
#[test]
fn a_merge_adding_nothing_to_the_latest_stores_nothing_and_updates_local() {
    let two = Two::new(Mode::Wal);
    std::fs::create_dir(two.dir.path().join("c")).expect("machine dir");
    two.ok("c", &["pull", REPLICA, "DB"]);
    two.edit("a", "INSERT INTO items VALUES (6, 'a-1', 6, 1);");
    two.ok("a", &["push", "DB", REPLICA]);
    two.edit("c", "INSERT INTO items VALUES (100, 'X', 1, 1);");
    two.ok("c", &["push", "DB", REPLICA, "--merge"]);
    assert_eq!(two.versions().len(), 4, "v3 candidate, v4 merge");
    let v4 = two.latest_rows();
    two.edit("b", "INSERT INTO items VALUES (100, 'X', 1, 1);");
    let (code, json, stderr) = two.json("b", &["push", "DB", REPLICA, "--merge"]);
    assert_eq!(code, 0, "{stderr}{json}");
    assert_eq!(json["version"], 4, "{json}");
    assert_eq!(json["created"], false, "{json}");
    assert_eq!(json["local_updated"], true, "{json}");
    assert_eq!(
        two.versions().len(),
        4,
        "nothing stored: {:?}",
        two.versions()
    );
    assert_eq!(two.latest_rows(), v4);
    let ids: Vec<i64> = items(&two.db("b")).iter().map(|r| r.0).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 6, 100], "LOCAL holds version 4");
    let out = two.run("b", &["push", "DB", REPLICA, "--merge"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert_eq!(
        two.versions().len(),
        4,
        "based on version 4 now: nothing to do"
    );
}

/// The same on a server.
#[test]
fn a_server_merge_adding_nothing_to_the_latest_stores_nothing_and_updates_local() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let (a, b) = on_server(&server, dir.path());
    let key = server.admin_key.clone();
    let c = Machine::new(dir.path(), "c");
    c.pull(&server, REPLICA, Some("app.db"), &["--key", &key]);
    util::open(&a.path("app.db"))
        .execute_batch("INSERT INTO items VALUES (6, 'a-1', 6, 1);")
        .expect("edit a");
    a.push(&server, "app.db", REPLICA, &["--key", &key]);
    util::open(&c.path("app.db"))
        .execute_batch("INSERT INTO items VALUES (100, 'X', 1, 1);")
        .expect("edit c");
    let report = c.push(&server, "app.db", REPLICA, &["--key", &key, "--merge"]);
    assert_eq!(report.u64("version"), 4);
    util::open(&b.path("app.db"))
        .execute_batch("INSERT INTO items VALUES (100, 'X', 1, 1);")
        .expect("edit b");
    let report = b.push(&server, "app.db", REPLICA, &["--key", &key, "--merge"]);
    assert_eq!(report.u64("version"), 4, "{}", report.0);
    assert_eq!(report.0["created"], false, "{}", report.0);
    assert_eq!(report.0["local_updated"], true, "{}", report.0);
    let versions = server.versions(REPLICA).expect("versions");
    assert_eq!(versions.len(), 4, "nothing stored");
    let ids: Vec<i64> = items(&b.path("app.db")).iter().map(|r| r.0).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 6, 100], "LOCAL holds version 4");
    let latest = a.pull(&server, REPLICA, Some("app.db"), &["--key", &key]);
    assert_eq!(latest.u64("version"), 4);
    let ids: Vec<i64> = items(&a.path("app.db")).iter().map(|r| r.0).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 6, 100]);
}

/// Hostile: two `push --merge` whose base is the latest, started together against a
/// server: the one that loses the race at COMMIT (a plain VERSION_CONFLICT there) is
/// pushed again and merged, as the embedded store merges it; both succeed and the
/// latest version holds both rows. Run a few times: the race is not always lost.
#[test]
fn two_merging_pushes_from_the_latest_racing_on_a_server_both_merge() {
    for round in 0..3 {
        let dir = TempDir::new().expect("tempdir");
        let server = TestServer::start(dir.path());
        let (a, b) = on_server(&server, dir.path());
        let key = server.admin_key.clone();
        util::open(&a.path("app.db"))
            .execute_batch("INSERT INTO items VALUES (100, 'a', 1, 1);")
            .expect("edit a");
        util::open(&b.path("app.db"))
            .execute_batch("INSERT INTO items VALUES (200, 'b', 1, 1);")
            .expect("edit b");
        let spawn = |m: &Machine| {
            m.command()
                .args([
                    "push", "app.db", REPLICA, "--merge", "--json", "--key", &key,
                ])
                .args(["--server", &server.url])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn a push")
        };
        let (pa, pb) = (spawn(&a), spawn(&b));
        for (p, what) in [(pa, "a"), (pb, "b")] {
            let out = p.wait_with_output().expect("the push ends");
            assert_eq!(
                util::code(&out),
                0,
                "round {round}, {what}: {}{}",
                util::stderr(&out),
                util::stdout(&out)
            );
        }
        let c = Machine::new(dir.path(), "c");
        c.pull(&server, REPLICA, Some("app.db"), &["--key", &key]);
        let ids: Vec<i64> = items(&c.path("app.db")).iter().map(|r| r.0).collect();
        assert_eq!(ids, [1, 2, 3, 4, 5, 100, 200], "round {round}: both rows");
    }
}
