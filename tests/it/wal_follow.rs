//! Pushes of WAL databases that read only the pages the WAL names: every change is seen.
//!
//! A proptest interleaves writes (from the test's own connection and from a second
//! process), checkpoints of every kind, `VACUUM`, connections closing (the last one
//! deletes the WAL) and pushes, and after every push the replica's rows, integrity check
//! and digest equal the origin's; in half the cases a push subscriber's follower walks
//! the WAL between pushes (as its watcher does on file events), and the pushes use what
//! it saw. Deterministic tests show the fast path is taken where
//! it should be (no change, a small change), reads what it says, falls back where it
//! cannot be sure (a reset it did not see, a replaced file, a damaged hash list), and
//! that a damaged page among the changed ones is refused. Every push of the proptest
//! also goes into an embedded store through the CLI, where a push that proves "no
//! change" from a few facts and runs no sync must still report the origin's digest, and
//! some pushes compare by chunks (only the chunks the WAL named are read); a
//! deterministic test changes each of those facts in turn.
//!
//! `SQLFERRY_FUZZ_CASES` sets the number of cases (default 8, a few seconds; 120 take about
//! a minute).

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use rusqlite::Connection;
use sqlferry::page::{Following, Snapshot};
use tempfile::TempDir;

use crate::util::{self, Mode};

const DEFAULT_CASES: u32 = 8;

fn cache_of(db: &Path) -> PathBuf {
    db.parent().expect("a directory").join(".hash-cache")
}

/// A snapshot of `db` with the cache `util::sync` uses.
fn snapshot(db: &Path) -> Snapshot {
    Snapshot::open(db)
        .expect("snapshot")
        .with_hash_cache(Some(cache_of(db)))
}

/// A WAL database of `rows` rows whose application connection stays open (so the WAL
/// is not deleted behind the test's back) with auto-checkpoints off.
pub(crate) fn wal_db(path: &Path, rows: u64) -> Connection {
    let conn = util::create(path, 4096, Mode::Wal);
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .expect("autocheckpoint");
    util::insert_rows(&conn, rows, 200);
    conn
}

/// The salts in the WAL's header: they change at every reset.
fn wal_salt(db: &Path) -> Option<Vec<u8>> {
    let wal = std::fs::read(util::sidecar(db, "-wal")).ok()?;
    wal.get(16..24).map(<[u8]>::to_vec)
}

#[derive(Debug, Clone)]
enum Op {
    Insert {
        rows: u32,
        blob: u32,
    },
    Update {
        every: u32,
    },
    Delete {
        every: u32,
    },
    /// One row rewritten: the small commit most applications make most often.
    Touch {
        id: u32,
    },
    /// `PRAGMA wal_checkpoint(KIND)`.
    Checkpoint(&'static str),
    Vacuum,
    /// Rows written by a second process (python3's own SQLite).
    OtherProcess {
        rows: u32,
    },
    /// The application's connection closes (the last one checkpoints and deletes the
    /// WAL) and opens again.
    Reopen,
    /// The subscriber's follower walks the WAL (as its watcher does on a file event).
    Follow,
    Push,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u32..200, prop_oneof![Just(50u32), Just(3000u32), Just(9000u32)])
            .prop_map(|(rows, blob)| Op::Insert { rows, blob }),
        2 => (1u32..20).prop_map(|every| Op::Update { every }),
        1 => (1u32..10).prop_map(|every| Op::Delete { every }),
        3 => (1u32..300).prop_map(|id| Op::Touch { id }),
        2 => prop_oneof![
            Just("PASSIVE"),
            Just("FULL"),
            Just("RESTART"),
            Just("TRUNCATE")
        ]
        .prop_map(Op::Checkpoint),
        1 => Just(Op::Vacuum),
        1 => (1u32..50).prop_map(|rows| Op::OtherProcess { rows }),
        1 => Just(Op::Reopen),
        4 => Just(Op::Follow),
        5 => Just(Op::Push),
    ]
}

fn apply(conn: &mut Connection, db: &Path, op: &Op) {
    match op {
        Op::Insert { rows, blob } => util::insert_rows(conn, u64::from(*rows), u64::from(*blob)),
        Op::Update { every } => {
            conn.execute(
                "UPDATE t SET v = randomblob(length(v) + 10) WHERE id % ?1 = 0",
                [every],
            )
            .expect("update");
        }
        Op::Delete { every } => {
            conn.execute("DELETE FROM t WHERE id % ?1 = 0", [every])
                .expect("delete");
        }
        Op::Touch { id } => {
            conn.execute("UPDATE t SET k = k || 'x' WHERE id = ?1", [id])
                .expect("touch");
        }
        Op::Checkpoint(kind) => {
            conn.query_row(&format!("PRAGMA wal_checkpoint({kind})"), [], |_| Ok(()))
                .expect("checkpoint");
        }
        Op::Vacuum => conn.execute_batch("VACUUM").expect("vacuum"),
        Op::OtherProcess { rows } => {
            util::python(
                "import sqlite3, sys\n\
                 c = sqlite3.connect(sys.argv[1], timeout=30)\n\
                 c.execute('PRAGMA wal_autocheckpoint=0')\n\
                 c.executemany('INSERT INTO t(k, v) VALUES (?, randomblob(300))',\n\
                 [('p%d' % i,) for i in range(int(sys.argv[2]))])\n\
                 c.commit()\n\
                 c.close()",
                &[db.as_os_str(), std::ffi::OsStr::new(&rows.to_string())],
            );
        }
        Op::Reopen => {
            // The last connection closes: SQLite checkpoints and deletes the WAL.
            let placeholder = Connection::open_in_memory().expect("in memory");
            drop(std::mem::replace(conn, placeholder));
            *conn = util::open(db);
            conn.pragma_update(None, "wal_autocheckpoint", 0)
                .expect("autocheckpoint");
        }
        Op::Follow | Op::Push => {}
    }
}

#[test]
fn every_change_is_pushed_whatever_the_wal_went_through() {
    let cases = std::env::var("SQLFERRY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    );
    let followed = std::cell::Cell::new(0u32);
    let crossed = std::cell::Cell::new(0u32);
    let pushes = std::cell::Cell::new(0u32);
    let proved = std::cell::Cell::new(0u32);
    let by_chunks = std::cell::Cell::new(0u32);
    runner
        .run(&prop::collection::vec(op(), 1..24), |ops| {
            let dir = TempDir::new().expect("tempdir");
            let origin = dir.path().join("origin.db");
            let replica = dir.path().join("replica.db");
            let mut conn = wal_db(&origin, 300);
            // The WAL at a high-water mark (as a busy application's is): later, shorter
            // generations leave older frames behind their own.
            conn.execute_batch(
                "INSERT INTO t(k, v) SELECT k, randomblob(3000) FROM t;
                 DELETE FROM t WHERE id > 300; PRAGMA wal_checkpoint(PASSIVE);
                 UPDATE t SET k = k WHERE id = 1;",
            )
            .expect("writes");
            util::sync(&origin, &replica);
            // Half the cases have a subscriber's follower walking the WAL between pushes.
            let following = (ops.len() % 2 == 0)
                .then(|| Following::start_in(&origin, cache_of(&origin)).expect("follows"));
            let mut last_salt = wal_salt(&origin);
            for op in ops.iter().chain([&Op::Push]) {
                apply(&mut conn, &origin, op);
                if let (Op::Follow, Some(f)) = (op, &following) {
                    f.advance();
                }
                if let Op::Push = op {
                    if snapshot(&origin).follows_wal() {
                        followed.set(followed.get() + 1);
                        if wal_salt(&origin) != last_salt {
                            crossed.set(crossed.get() + 1);
                        }
                    }
                    pushes.set(pushes.get() + 1);
                    last_salt = wal_salt(&origin);
                    util::sync(&origin, &replica);
                    util::assert_same(&origin, &replica);
                    // The same state pushed into a store: a push that proves "no
                    // change" without a sync must report the origin's digest too
                    // (`pushed` asserts it), whatever the WAL went through.
                    let (was_proved, chunks) = pushed_by(dir.path(), &origin);
                    if was_proved {
                        proved.set(proved.get() + 1);
                    }
                    if chunks {
                        by_chunks.set(by_chunks.get() + 1);
                    }
                }
            }
            Ok(())
        })
        .expect("every push equals the origin");
    // The property means something only if the fast path ran, and the fallbacks did.
    assert!(followed.get() > 0, "no push followed the WAL");
    assert!(
        crossed.get() > 0,
        "no push followed the WAL across a reset ({} of {} followed it)",
        followed.get(),
        pushes.get()
    );
    assert!(followed.get() < pushes.get(), "every push followed the WAL");
    assert!(
        proved.get() > 0,
        "no push into the store proved \"no change\""
    );
    assert!(
        proved.get() < pushes.get(),
        "every push proved \"no change\""
    );
    // Pushes into the store that compared by chunks (the origin read only the chunks
    // the WAL named) ran too, and reported the origin's digest like every other.
    assert!(by_chunks.get() > 0, "no push into the store went by chunks");
}

/// [`pushed`], with the origin's log: whether the push proved "no change", and whether
/// it compared by chunks (docs/engine.md, "The chunked digest").
fn pushed_by(dir: &Path, db: &Path) -> (bool, bool) {
    let store = format!("file://{}", dir.join("store").display());
    let out = util::sqlferry(dir)
        .env("RUST_LOG", "sqlferry::engine::origin=debug")
        .arg("push")
        .arg(db)
        .args(["t/origin.db", "--server", &store, "--json"])
        .output()
        .expect("run push");
    let err = util::stderr(&out);
    assert_eq!(util::code(&out), 0, "push failed: {err}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!(
        report["digest"],
        util::digest_like(db, &report["digest"]),
        "the pushed digest"
    );
    (
        report["proved_unchanged"]
            .as_bool()
            .expect("proved_unchanged"),
        err.contains("origin compared by chunks"),
    )
}

#[test]
fn a_push_after_no_change_or_a_small_one_reads_only_what_the_wal_names() {
    let dir = TempDir::new().expect("tempdir");
    let origin = dir.path().join("origin.db");
    let replica = dir.path().join("replica.db");
    let conn = wal_db(&origin, 20_000);
    assert!(!snapshot(&origin).follows_wal(), "no hash list yet");
    util::sync(&origin, &replica);
    // Nothing changed: only page 1 is read.
    let snap = snapshot(&origin);
    assert_eq!(snap.changed_pages(), Some(vec![1]));
    drop(snap);
    let stats = util::sync(&origin, &replica);
    assert_eq!(stats.pages_sent, 0);
    // One row updated: a handful of pages, all sent or all equal.
    conn.execute("UPDATE t SET v = randomblob(200) WHERE id = 777", [])
        .expect("update");
    let changed = snapshot(&origin).changed_pages().expect("follows the WAL");
    assert!(changed.len() < 10, "{changed:?}");
    let stats = util::sync(&origin, &replica);
    assert!(stats.pages_sent >= 1 && stats.pages_sent as usize <= changed.len());
    util::assert_same(&origin, &replica);
    // A checkpoint that does not reset keeps the fast path.
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        .expect("checkpoint");
    assert!(snapshot(&origin).follows_wal());
}

/// The WAL goes through two resets between two pushes; the push follows it only if a
/// follower walked the generation in between while its frames were still there.
/// Returns whether the push followed the WAL; the push's result equals the origin.
fn resets_between_pushes(follower: bool) -> bool {
    let dir = TempDir::new().expect("tempdir");
    let origin = dir.path().join("origin.db");
    let replica = dir.path().join("replica.db");
    let conn = wal_db(&origin, 20_000);
    let exec = |sql: &str| conn.execute_batch(sql).expect("writes");
    // A long generation, then a short one the push's hash list is stamped in.
    exec("UPDATE t SET v = randomblob(200); PRAGMA wal_checkpoint(PASSIVE);");
    exec("INSERT INTO t(k, v) VALUES ('a', 'b')");
    util::sync(&origin, &replica);
    let following = follower.then(|| Following::start_in(&origin, cache_of(&origin)).expect("f"));
    let walk = || following.iter().for_each(Following::advance);
    // Changes in that generation, walked.
    exec("UPDATE t SET v = randomblob(200) WHERE id BETWEEN 100 AND 400");
    walk();
    // Checkpointed and reset; walked once the new generation has begun.
    exec("PRAGMA wal_checkpoint(PASSIVE); UPDATE t SET k = 'c' WHERE id = 9000");
    walk();
    // The new generation writes over frames of the old one the list never saw.
    exec("UPDATE t SET v = randomblob(200) WHERE id BETWEEN 5000 AND 5300");
    let follows = snapshot(&origin).follows_wal();
    if let Some(f) = &following {
        assert!(
            f.pages_kept().is_some_and(|n| n > 10),
            "{:?}",
            f.pages_kept()
        );
    }
    util::sync(&origin, &replica);
    util::assert_same(&origin, &replica);
    follows
}

#[test]
fn a_follower_carries_a_push_across_resets_the_push_alone_cannot_cross() {
    assert!(
        !resets_between_pushes(false),
        "alone: frames lost to the reset"
    );
    assert!(
        resets_between_pushes(true),
        "followed: every frame was walked"
    );
}

#[test]
fn a_reset_it_did_not_see_a_replaced_file_or_a_damaged_list_means_a_full_scan() {
    let dir = TempDir::new().expect("tempdir");
    let origin = dir.path().join("origin.db");
    let replica = dir.path().join("replica.db");
    let conn = wal_db(&origin, 2000);
    util::sync(&origin, &replica);
    assert!(snapshot(&origin).follows_wal());
    // Written, checkpointed and reset: the frames are gone, the pages changed.
    conn.execute("UPDATE t SET v = randomblob(300) WHERE id % 7 = 0", [])
        .expect("update");
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("checkpoint");
    conn.execute("INSERT INTO t(k, v) VALUES ('x', 'y')", [])
        .expect("insert");
    assert!(!snapshot(&origin).follows_wal(), "a reset it never saw");
    util::sync(&origin, &replica);
    util::assert_same(&origin, &replica);
    assert!(
        snapshot(&origin).follows_wal(),
        "the full scan left a new list"
    );
    // A damaged hash list is refused, never trusted.
    let list = std::fs::read_dir(cache_of(&origin))
        .expect("cache dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "wal"))
        .expect("a WAL hash list");
    let mut bytes = std::fs::read(&list).expect("read list");
    let n = bytes.len();
    bytes[n - 5] ^= 1;
    std::fs::write(&list, &bytes).expect("write list");
    assert!(!snapshot(&origin).follows_wal(), "a damaged list");
    util::sync(&origin, &replica);
    util::assert_same(&origin, &replica);
    // The file replaced by another database under the same name.
    drop(conn);
    let other = dir.path().join("other.db");
    let c = wal_db(&other, 2100);
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .expect("checkpoint");
    drop(c);
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(util::sidecar(&origin, suffix));
    }
    std::fs::rename(&other, &origin).expect("replace");
    assert!(!snapshot(&origin).follows_wal(), "another file");
    util::sync(&origin, &replica);
    util::assert_same(&origin, &replica);
}

#[test]
fn a_damaged_page_among_the_changed_ones_is_refused() {
    let dir = TempDir::new().expect("tempdir");
    let origin = dir.path().join("origin.db");
    let replica = dir.path().join("replica.db");
    let conn = wal_db(&origin, 2000);
    util::sync(&origin, &replica);
    damage_a_leaf(&conn);
    let snap = snapshot(&origin);
    assert!(snap.follows_wal());
    let err = sqlferry::remote::check_source(&snap).expect_err("refused");
    assert!(err.to_string().contains("quick_check"), "{err}");
    assert_eq!(err.kind(), sqlferry::ErrorKind::Verification);
}

/// The same damage, through `sqlferry push SRC DEST` between two files: the copy checks
/// SRC after its scan (to overlap the copy), when the changed pages are no longer what
/// the hash list names; it must still refuse, and DEST must keep what it had.
#[test]
fn a_local_copy_refuses_a_damaged_page_among_the_changed_ones() {
    let dir = TempDir::new().expect("tempdir");
    let origin = dir.path().join("origin.db");
    let replica = dir.path().join("replica.db");
    let conn = wal_db(&origin, 2000);
    util::push_json(&origin, &replica);
    // A small change first: the next push follows the WAL (the list is at its end).
    conn.execute("UPDATE t SET k = 'x' WHERE id = 7", [])
        .expect("update");
    util::push_json(&origin, &replica);
    let before = util::digest(&replica);
    damage_a_leaf(&conn);
    let out = util::run(
        dir.path(),
        &["push".as_ref(), origin.as_os_str(), replica.as_os_str()],
    );
    assert_eq!(util::code(&out), 7, "{}", util::stderr(&out));
    assert!(
        util::stderr(&out).contains("quick_check"),
        "{}",
        util::stderr(&out)
    );
    assert_eq!(util::digest(&replica), before, "DEST is as it was");
    assert_eq!(util::integrity(&replica), "ok");
}

/// Garbage over the cell pointers of a table leaf, written through SQLite (so it is a
/// WAL frame, as a bug in the application or its SQLite would write it).
fn damage_a_leaf(conn: &Connection) {
    let leaf: u32 = conn
        .query_row(
            "SELECT pgno FROM sqlite_dbpage WHERE pgno > 2 AND substr(data, 1, 1) = x'0d' LIMIT 1",
            [],
            |r| r.get(0),
        )
        .expect("a leaf");
    let mut page: Vec<u8> = conn
        .query_row(
            "SELECT data FROM sqlite_dbpage WHERE pgno = ?1",
            [leaf],
            |r| r.get(0),
        )
        .expect("the leaf");
    page[8..40].fill(0xaa);
    conn.execute(
        "UPDATE sqlite_dbpage SET data = ?2 WHERE pgno = ?1",
        rusqlite::params![leaf, page],
    )
    .expect("damage");
}

/// `sqlferry push DB t/origin.db --server file://DIR/store --json` (plus `extra`), run
/// in `dir`: its exit code, its JSON report (when it printed one) and its stderr.
pub(crate) fn store_push(
    dir: &Path,
    db: &Path,
    extra: &[&str],
) -> (i32, serde_json::Value, String) {
    let store = format!("file://{}", dir.join("store").display());
    let out = util::sqlferry(dir)
        .arg("push")
        .arg(db)
        .args(["t/origin.db", "--server", &store, "--json"])
        .args(extra)
        .output()
        .expect("run push");
    (
        util::code(&out),
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null),
        util::stderr(&out),
    )
}

/// A push to the store that succeeded: whether it proved "no change" without a sync,
/// and whether it made a version. Its digest is the origin's, whatever it did.
pub(crate) fn pushed(dir: &Path, db: &Path, extra: &[&str]) -> (bool, bool) {
    let (code, report, err) = store_push(dir, db, extra);
    assert_eq!(code, 0, "push failed: {err}");
    assert_eq!(
        report["digest"],
        util::digest_like(db, &report["digest"]),
        "the pushed digest"
    );
    (
        report["proved_unchanged"]
            .as_bool()
            .expect("proved_unchanged"),
        report["created"].as_bool().expect("created"),
    )
}

/// A no-change push of a WAL database proves it from constant-size facts and runs no
/// sync; each of those facts changing in turn makes the next push a real one, and the
/// one after proves "no change" again.
#[test]
fn a_no_change_push_proves_it_from_a_few_facts_and_runs_when_any_of_them_moved() {
    const RAN: (bool, bool) = (false, false);
    const MADE: (bool, bool) = (false, true);
    const PROVED: (bool, bool) = (true, false);
    let dir = TempDir::new().expect("tempdir");
    let origin = dir.path().join("origin.db");
    let conn = wal_db(&origin, 2000);
    assert_eq!(pushed(dir.path(), &origin, &[]), MADE, "the first push");
    assert_eq!(pushed(dir.path(), &origin, &[]), PROVED, "nothing changed");
    assert_eq!(pushed(dir.path(), &origin, &[]), PROVED, "still nothing");

    // A commit: the WAL's frame count and checksum.
    conn.execute("UPDATE t SET k = 'x' WHERE id = 7", [])
        .expect("update");
    assert_eq!(pushed(dir.path(), &origin, &[]), MADE, "a commit");
    assert_eq!(pushed(dir.path(), &origin, &[]), PROVED);

    // A checkpoint that copies frames back: the file's size and times, same contents.
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        .expect("checkpoint");
    assert_eq!(pushed(dir.path(), &origin, &[]), RAN, "a checkpoint");
    assert_eq!(pushed(dir.path(), &origin, &[]), PROVED);

    // The file's times alone: its ctime (a chmod to the same mode), then its mtime.
    let mode = std::fs::metadata(&origin).expect("stat").permissions();
    std::fs::set_permissions(&origin, mode).expect("chmod");
    assert_eq!(pushed(dir.path(), &origin, &[]), RAN, "the ctime");
    assert_eq!(pushed(dir.path(), &origin, &[]), PROVED);
    let file = std::fs::File::options()
        .write(true)
        .open(&origin)
        .expect("open");
    let epoch = std::time::SystemTime::UNIX_EPOCH;
    file.set_modified(epoch + std::time::Duration::new(1 << 30, 123_456_789))
        .expect("mtime");
    assert_eq!(pushed(dir.path(), &origin, &[]), RAN, "the mtime");
    assert_eq!(pushed(dir.path(), &origin, &[]), PROVED);

    // Times of whole seconds (a coarse file system keeps no more) cannot prove "not
    // written since": a write within the second keeps them. Every push runs.
    file.set_modified(epoch + std::time::Duration::from_secs(1 << 30))
        .expect("mtime");
    assert_eq!(pushed(dir.path(), &origin, &[]), RAN, "whole seconds");
    assert_eq!(pushed(dir.path(), &origin, &[]), RAN, "still whole seconds");
    file.set_modified(epoch + std::time::Duration::new(1 << 30, 5))
        .expect("mtime");
    drop(file);
    assert_eq!(pushed(dir.path(), &origin, &[]), RAN, "fine times again");
    assert_eq!(pushed(dir.path(), &origin, &[]), PROVED);

    // A reset: the WAL's salts (and its frame count, back to 0).
    let salt = wal_salt(&origin);
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("checkpoint");
    assert_ne!(wal_salt(&origin), salt, "a new generation");
    assert_eq!(pushed(dir.path(), &origin, &[]), RAN, "a reset");
    assert_eq!(pushed(dir.path(), &origin, &[]), PROVED);

    // The replica records a damaged stored page: the push resends it.
    let hash = util::page_hashes(&origin)[4];
    let replica_file = dir.path().join("store/replicas/t/origin.db.sqlferry");
    Connection::open(&replica_file)
        .expect("replica file")
        .execute(
            "INSERT INTO bad_pages(hash, found_at) VALUES (?1, 0)",
            [&hash[..]],
        )
        .expect("record a damaged page");
    let (code, report, err) = store_push(dir.path(), &origin, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        (
            report["proved_unchanged"].as_bool(),
            report["repaired"].as_u64()
        ),
        (Some(false), Some(1)),
        "{report}"
    );
    assert_eq!(pushed(dir.path(), &origin, &[]), PROVED);

    // A push with --allow-corrupt leaves an unchecked state: the next checked push runs.
    conn.execute("UPDATE t SET k = 'y' WHERE id = 8", [])
        .expect("update");
    assert_eq!(
        pushed(dir.path(), &origin, &["--allow-corrupt"]),
        MADE,
        "unchecked"
    );
    assert_eq!(pushed(dir.path(), &origin, &[]), RAN, "checked this time");
    assert_eq!(pushed(dir.path(), &origin, &[]), PROVED);

    // The replica moved (another database pushed over it): a conflict, not "no change".
    let other = dir.path().join("other.db");
    drop(wal_db(&other, 100));
    assert_eq!(pushed(dir.path(), &other, &["--force"]), MADE);
    let (code, _, err) = store_push(dir.path(), &origin, &[]);
    assert_eq!(code, 6, "a conflict: {err}");
    assert_eq!(pushed(dir.path(), &origin, &["--force"]), MADE);
    assert_eq!(pushed(dir.path(), &origin, &[]), PROVED);

    // The file replaced by a copy of itself: another inode (and another WAL).
    drop(conn);
    let copy = dir.path().join("copy.db");
    std::fs::copy(&origin, &copy).expect("copy");
    std::fs::rename(&copy, &origin).expect("replace");
    let conn = util::open(&origin);
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .expect("autocheckpoint");
    conn.execute("UPDATE t SET k = k WHERE id = 1", [])
        .expect("a frame");
    let (proved, _) = pushed(dir.path(), &origin, &[]);
    assert!(!proved, "another file");
    assert_eq!(pushed(dir.path(), &origin, &[]), PROVED);
    drop(conn);
}
