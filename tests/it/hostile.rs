//! A hostile user against the newest paths. Each scenario ends the way a user would
//! check it: the replica pulled into another file holds the origin's rows, passes
//! `PRAGMA integrity_check`, and the push reported the origin's digest.
//!
//! - The no-change push that reads nothing (pushes into the embedded store that prove
//!   "no change" from a few facts and a seal): writes from a second connection and a
//!   second process, checkpoints of every kind followed by a write, a journal-mode round
//!   trip, the file copied over in place or renamed over with its old mtime, the
//!   application closing and reopening, a pull into the database, seals that are
//!   garbage, cut short or another database's, two databases of the same name sharing
//!   one cache, and stale `-wal`/`-shm` files beside a symlink to the database. And
//!   what it writes: only its line in the sync log (the store, the history and the
//!   log's shared memory byte for byte as they were), yet it sees a version another
//!   client left in the replica's WAL.
//! - `apply` onto a database it cannot write, a changeset swapped while it is applied,
//!   and how a conflict line reads.
//! - `versions` of a replica with thousands of versions over a server: every version,
//!   in order, in several CONFIG frames.

use std::path::{Path, PathBuf};

use rusqlite::Connection;
use tempfile::TempDir;

use crate::util;
use crate::wal_follow::{pushed, store_push, wal_db};

/// A push that ran a sync and made no version.
const RAN: (bool, bool) = (false, false);
/// A push that proved "no change" without a sync.
const PROVED: (bool, bool) = (true, false);

/// The replica in `dir`'s store, pulled into a new file, holds what `origin` holds:
/// the same rows, and it passes the integrity check.
fn pulled_equals(dir: &Path, origin: &Path, what: &str) {
    let dest = dir.join("pulled-elsewhere.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(util::sidecar(&dest, suffix));
    }
    let store = format!("file://{}", dir.join("store").display());
    // Its own cache: the seal this pull leaves is not one of the pushes' the tests
    // count.
    let out = util::sqlferry(dir)
        .args(["pull", "t/origin.db"])
        .arg(&dest)
        .args(["--server", &store])
        .env("XDG_CACHE_HOME", dir.join(".elsewhere-cache"))
        .output()
        .expect("run pull");
    assert_eq!(util::code(&out), 0, "{what}: pull: {}", util::stderr(&out));
    assert_eq!(util::integrity(&dest), "ok", "{what}");
    assert!(
        util::dump(&dest) == util::dump(origin),
        "{what}: the replica does not hold the origin's rows"
    );
}

/// A push into the store (its digest asserted to be the origin's), then the replica
/// pulled elsewhere and compared: whether the push proved "no change", and whether it
/// made a version.
fn step(dir: &Path, origin: &Path, what: &str) -> (bool, bool) {
    let result = pushed(dir, origin, &[]);
    pulled_equals(dir, origin, what);
    result
}

/// A push that must not have proved "no change" (something changed), then one that
/// proves it (nothing changed since).
fn changed(dir: &Path, origin: &Path, what: &str) {
    let (proved, _) = step(dir, origin, what);
    assert!(!proved, "{what}: a change was proved to be no change");
    assert_eq!(
        step(dir, origin, what),
        PROVED,
        "{what}: then nothing changed"
    );
}

/// The application's connection as the tests keep it: auto-checkpoints off, so the
/// WAL only changes when the test says so.
fn app(path: &Path) -> Connection {
    let conn = util::open(path);
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .expect("autocheckpoint");
    conn
}

fn checkpoint(conn: &Connection, kind: &str) {
    let busy: i64 = conn
        .query_row(&format!("PRAGMA wal_checkpoint({kind})"), [], |r| r.get(0))
        .expect("checkpoint");
    assert_eq!(busy, 0, "checkpoint {kind} was blocked");
}

/// The seal files in `dir`'s cache.
fn seals(dir: &Path) -> Vec<PathBuf> {
    let manifests = dir.join(".home/cache/sqlferry/manifests");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&manifests)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "seal"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// The one seal file of `dir`'s cache.
fn only_seal(dir: &Path) -> PathBuf {
    let found = seals(dir);
    assert_eq!(found.len(), 1, "one seal: {found:?}");
    found[0].clone()
}

/// An application keeps the database open (its WAL persists) while a hostile user
/// changes it every way that could leave the facts a no-change push trusts as they
/// were; each time the next push runs a sync and the replica gets the change.
#[test]
fn no_write_is_ever_proved_to_be_no_change() {
    let dir = TempDir::new().expect("tempdir");
    let d = dir.path();
    let origin = d.join("origin.db");
    let mut conn = wal_db(&origin, 500);
    conn.pragma_update(None, "synchronous", "NORMAL")
        .expect("synchronous");
    assert_eq!(step(d, &origin, "first push"), (false, true));
    assert_eq!(step(d, &origin, "nothing changed"), PROVED);

    // The seal garbage, cut short, or another database's: the push runs.
    let seal = only_seal(d);
    let good = std::fs::read(&seal).expect("seal");
    std::fs::write(&seal, b"\x00\xffnot json at all").expect("garbage");
    assert_eq!(step(d, &origin, "a garbage seal"), RAN);
    assert_eq!(step(d, &origin, "sealed again"), PROVED);
    let good_again = std::fs::read(&seal).expect("seal");
    assert_eq!(good_again, good, "the same state seals the same way");
    std::fs::write(&seal, &good[..good.len() / 2]).expect("cut short");
    assert_eq!(step(d, &origin, "a seal cut short"), RAN);
    assert_eq!(step(d, &origin, "sealed again"), PROVED);
    // Another database's seal, rewritten to name this replica and this version: its
    // state is another file's.
    let other = d.join("other.db");
    let other_conn = wal_db(&other, 50);
    let store = format!("file://{}", d.join("store").display());
    let out = util::sqlferry(d)
        .arg("push")
        .arg(&other)
        .args(["t/other.db", "--server", &store])
        .output()
        .expect("push other");
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    drop(other_conn);
    let other_seal = seals(d)
        .into_iter()
        .find(|p| *p != seal)
        .expect("the other database's seal");
    let mut foreign: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&other_seal).expect("read")).expect("json");
    let mine: serde_json::Value = serde_json::from_slice(&good).expect("json");
    for field in ["replica", "version", "digest"] {
        foreign[field] = mine[field].clone();
    }
    std::fs::write(&seal, foreign.to_string()).expect("foreign seal");
    assert_eq!(step(d, &origin, "another database's seal"), RAN);
    assert_eq!(step(d, &origin, "sealed again"), PROVED);

    // A write from a second connection, then from a second process.
    util::open(&origin)
        .execute("UPDATE t SET k = 'second connection' WHERE id = 3", [])
        .expect("write");
    changed(d, &origin, "a second connection's write");
    util::python(
        "import sqlite3, sys\n\
         c = sqlite3.connect(sys.argv[1], timeout=30)\n\
         c.execute(\"UPDATE t SET k = 'second process' WHERE id = 4\")\n\
         c.commit()\n\
         c.close()",
        &[origin.as_os_str()],
    );
    changed(d, &origin, "a second process's write");

    // A checkpoint of each kind, then one small write: after RESTART and TRUNCATE the
    // WAL starts again from its first frame, no longer than it was.
    for (i, kind) in ["PASSIVE", "FULL", "RESTART", "TRUNCATE"]
        .iter()
        .enumerate()
    {
        let wal_len = util::file_len(&util::sidecar(&origin, "-wal"));
        checkpoint(&conn, kind);
        conn.execute(
            "UPDATE t SET k = ?1 WHERE id = 5",
            [format!("after {kind}")],
        )
        .expect("write");
        if i >= 2 {
            assert!(util::file_len(&util::sidecar(&origin, "-wal")) <= wal_len);
        }
        changed(d, &origin, &format!("a write after a {kind} checkpoint"));
    }

    // The journal mode to DELETE, a write in rollback mode, and back to WAL (SQLite
    // needs the database to itself for that: the application closes first).
    drop(conn);
    let c = util::open(&origin);
    let mode: String = c
        .query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))
        .expect("to delete");
    assert_eq!(mode, "delete");
    c.execute("UPDATE t SET k = 'rollback mode' WHERE id = 6", [])
        .expect("write");
    let mode: String = c
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .expect("to wal");
    assert_eq!(mode, "wal");
    drop(c);
    conn = app(&origin);
    // A frame, so that the WAL names a generation and the push can seal its state.
    conn.execute("UPDATE t SET k = k WHERE id = 1", [])
        .expect("a frame");
    changed(d, &origin, "a journal mode round trip");

    // The application closes, another opens it and writes, and stays open.
    drop(conn);
    conn = app(&origin);
    conn.execute("UPDATE t SET k = 'reopened' WHERE id = 7", [])
        .expect("write");
    changed(d, &origin, "a write after the application reopened");

    // The file copied over in place (same inode, same size) with its old mtime, the
    // WAL empty: only the ctime says the file was written.
    checkpoint(&conn, "TRUNCATE");
    let before = d.join("before.db");
    std::fs::copy(&origin, &before).expect("copy");
    conn.execute("UPDATE t SET k = 'will be lost by cp' WHERE id = 8", [])
        .expect("write");
    checkpoint(&conn, "TRUNCATE");
    let (proved, _) = step(d, &origin, "before cp");
    assert!(!proved);
    assert_eq!(step(d, &origin, "before cp"), PROVED);
    let meta = std::fs::metadata(&origin).expect("stat");
    assert_eq!(meta.len(), util::file_len(&before), "the same size");
    let ino = std::os::unix::fs::MetadataExt::ino(&meta);
    std::fs::copy(&before, &origin).expect("cp over");
    set_mtime(&origin, meta.modified().expect("mtime"));
    let now = std::fs::metadata(&origin).expect("stat");
    assert_eq!(std::os::unix::fs::MetadataExt::ino(&now), ino, "same inode");
    assert_eq!(
        now.modified().expect("mtime"),
        meta.modified().expect("mtime")
    );
    changed(
        d,
        &origin,
        "the file copied over in place with its old mtime",
    );
    // The application's page cache holds the old file: it lets go of it before it
    // writes again.
    drop(conn);

    // The file renamed over by another of the same size and mtime.
    conn = app(&origin);
    conn.execute("UPDATE t SET k = 'x' WHERE id = 9", [])
        .expect("a frame");
    checkpoint(&conn, "TRUNCATE");
    let (proved, _) = step(d, &origin, "before mv");
    assert!(!proved);
    assert_eq!(step(d, &origin, "before mv"), PROVED);
    let replacement = d.join("replacement.db");
    std::fs::copy(&before, &replacement).expect("copy");
    let meta = std::fs::metadata(&origin).expect("stat");
    assert_eq!(meta.len(), util::file_len(&replacement), "the same size");
    set_mtime(&replacement, meta.modified().expect("mtime"));
    std::fs::rename(&replacement, &origin).expect("mv over");
    let what = "the file renamed over with the old one's mtime";
    let (proved, _) = step(d, &origin, what);
    assert!(!proved, "{what}: a change was proved to be no change");
    // Whether the next push proves "no change" is up to SQLite: the application and
    // the test's connections hold two files of one name (a connection to the new one
    // closing may take its WAL for unused, checkpoint it and delete it).
    step(d, &origin, what);
    // The application still has the old file open: it opens the new one.
    drop(conn);

    // A pull into the database (another client's version), then a push.
    conn = app(&origin);
    conn.execute("UPDATE t SET k = 'y' WHERE id = 10", [])
        .expect("a frame");
    let (proved, _) = step(d, &origin, "before the pull");
    assert!(!proved);
    let theirs = d.join("theirs.db");
    let their_conn = wal_db(&theirs, 80);
    let (code, _, err) = store_push(d, &theirs, &["--force"]);
    assert_eq!(code, 0, "{err}");
    drop(their_conn);
    let out = util::sqlferry(d)
        .args(["pull", "t/origin.db"])
        .arg(&origin)
        .args(["--server", &store])
        .output()
        .expect("pull");
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(util::dump(&origin) == util::dump(&theirs), "pulled");
    changed(d, &origin, "a pull into the database");
    conn.execute("UPDATE t SET k = 'after the pull' WHERE id = 2", [])
        .expect("write");
    changed(d, &origin, "a write after the pull");
    drop(conn);
}

fn set_mtime(path: &Path, to: std::time::SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .expect("open")
        .set_modified(to)
        .expect("set mtime");
}

/// Two databases of the same name in two directories share one cache and push to the
/// same replica: each one's seal is its own, a write to either is pushed, and the
/// other then meets a replica that moved (a conflict, never "no change").
/// What a file is now: its inode, length, modification time and the SHA-256 of its
/// bytes.
type FileState = (u64, u64, std::time::SystemTime, String);

fn file_state(path: &Path) -> Option<FileState> {
    use sha2::Digest as _;
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    let bytes = std::fs::read(path).ok()?;
    let sum = sqlferry::digest::hex(&sha2::Sha256::digest(&bytes));
    Some((m.ino(), m.len(), m.modified().ok()?, sum))
}

/// Every file under `dir`, with its state.
fn files_under(dir: &Path) -> Vec<(PathBuf, Option<FileState>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push((p.clone(), file_state(&p)));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The syncs the sync log of `dir`'s machine holds.
fn logged_syncs(dir: &Path) -> i64 {
    let log = dir.join(".home/state/sqlferry/syncs.sqlite");
    util::open(&log)
        .query_row("SELECT count(*) FROM syncs", [], |r| r.get(0))
        .expect("count the syncs")
}

/// A push that changes nothing is logged, and writes nothing else: the replica file,
/// its WAL and shared memory, the local history (its records and the room kept for
/// them) and the sync log's shared memory are left byte for byte, with their times.
/// And the look that proves it reads the replica's committed versions from its WAL,
/// the only process with it open: a version another client pushed meanwhile, in the
/// WAL and nowhere else, is seen, and the push is refused instead of proved.
#[test]
fn a_push_that_changes_nothing_is_logged_and_writes_nothing_else() {
    let dir = TempDir::new().expect("tempdir");
    let d = dir.path();
    let origin = d.join("origin.db");
    let conn = wal_db(&origin, 500);
    assert_eq!(step(d, &origin, "first push"), (false, true));
    conn.execute("UPDATE t SET v = 'two' WHERE id % 7 = 0", [])
        .expect("write");
    assert_eq!(step(d, &origin, "second version"), (false, true));
    let replica_wal = d.join("store/replicas/t/origin.db.sqlferry-wal");
    let wal_len = std::fs::metadata(&replica_wal)
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(
        wal_len > 0,
        "version 2 is in the replica's WAL, not copied back"
    );
    assert_eq!(step(d, &origin, "nothing changed"), PROVED);
    let logged = logged_syncs(d);

    let store = files_under(&d.join("store"));
    let state = files_under(&d.join(".home/state/sqlferry/history"));
    let log_shm = file_state(&d.join(".home/state/sqlferry/syncs.sqlite-shm"));
    assert!(
        state
            .iter()
            .any(|(p, _)| p.extension().is_some_and(|x| x == "json"))
    );
    for round in 0..2 {
        let (code, report, err) = store_push(d, &origin, &[]);
        assert_eq!(code, 0, "round {round}: {err}");
        assert_eq!(report["proved_unchanged"], true, "round {round}");
        assert_eq!(report["version"], 2, "round {round}");
        assert_eq!(
            files_under(&d.join("store")),
            store,
            "round {round}: the store"
        );
        assert_eq!(
            files_under(&d.join(".home/state/sqlferry/history")),
            state,
            "round {round}: the history"
        );
        assert_eq!(
            file_state(&d.join(".home/state/sqlferry/syncs.sqlite-shm")),
            log_shm,
            "round {round}: the sync log's shared memory"
        );
        assert_eq!(logged_syncs(d), logged + 1 + round, "round {round}: logged");
    }
    pulled_equals(d, &origin, "after the no-change pushes");

    // Another client pushes version 3 over it; version 3 is in the replica's WAL only
    // and no process has the replica open. This database's next push, its state as
    // it was sealed, must see version 3 and be refused, not proved unchanged.
    let other = d.join("other.db");
    std::fs::copy(&origin, &other).expect("copy");
    let _ = std::fs::copy(
        util::sidecar(&origin, "-wal"),
        util::sidecar(&other, "-wal"),
    );
    let other_conn = util::open(&other);
    other_conn
        .execute("UPDATE t SET v = 'three' WHERE id % 5 = 0", [])
        .expect("write other");
    let (code, report, err) = store_push(d, &other, &["--force"]);
    assert_eq!(code, 0, "the other client's push: {err}");
    assert_eq!(report["version"], 3, "{report}");
    assert!(
        std::fs::metadata(&replica_wal)
            .map(|m| m.len())
            .unwrap_or(0)
            > wal_len
    );
    let (code, report, err) = store_push(d, &origin, &[]);
    assert_ne!(
        code, 0,
        "a push based on version 2 of a replica at 3: {report}"
    );
    assert!(
        err.contains("VERSION_CONFLICT: t/origin.db is at version 3")
            && err.contains("based on version 2"),
        "{err}"
    );
}

#[test]
fn two_databases_of_one_name_sharing_a_cache_keep_their_own_seals() {
    let dir = TempDir::new().expect("tempdir");
    let d = dir.path();
    std::fs::create_dir_all(d.join("a")).expect("mkdir");
    std::fs::create_dir_all(d.join("b")).expect("mkdir");
    let (a, b) = (d.join("a/app.db"), d.join("b/app.db"));
    let a_conn = wal_db(&a, 300);
    checkpoint(&a_conn, "TRUNCATE");
    std::fs::copy(&a, &b).expect("copy");
    a_conn
        .execute("UPDATE t SET k = k WHERE id = 1", [])
        .expect("a frame");
    let b_conn = app(&b);
    b_conn
        .execute("UPDATE t SET k = k WHERE id = 1", [])
        .expect("a frame");
    assert_eq!(step(d, &a, "a first"), (false, true));
    assert_eq!(step(d, &a, "a again"), PROVED);
    // b holds the same rows: "already at" that version, then proved on its own seal.
    assert_eq!(step(d, &b, "b first"), RAN);
    assert_eq!(step(d, &b, "b again"), PROVED);
    assert_eq!(seals(d).len(), 2, "one seal each");
    b_conn
        .execute("UPDATE t SET k = 'b wrote' WHERE id = 2", [])
        .expect("write");
    assert_eq!(step(d, &b, "b wrote"), (false, true));
    let (code, report, err) = store_push(d, &a, &[]);
    assert_eq!(code, 6, "a conflict for a, not no change: {report} {err}");
    drop((a_conn, b_conn));
}

/// A database reached through a symlink: SQLite resolves the link and keeps the WAL
/// and the wal-index beside the real file. A push through the link reads the frames
/// of that WAL (the application's latest commits, not yet in the file); and stale
/// `-wal` and `-shm` files beside the link (left there by a file that once had that
/// name) are not this database's: a write after a push through the link is pushed,
/// into the store (where the push would otherwise prove "no change") and into a local
/// copy (where it follows the WAL).
#[test]
fn a_push_through_a_symlink_reads_the_wal_sqlite_uses() {
    let dir = TempDir::new().expect("tempdir");
    let d = dir.path();
    let real = d.join("real.db");
    // Every row is in the WAL: the file holds only the empty table.
    let conn = wal_db(&real, 300);
    let link = d.join("origin.db");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let copy = d.join("copy.db");
    let to_copy = |what: &str| {
        let out = util::sqlferry(d)
            .arg("push")
            .arg(&link)
            .arg(&copy)
            .arg("--json")
            .output()
            .expect("push to a copy");
        assert_eq!(util::code(&out), 0, "{what}: {}", util::stderr(&out));
        assert!(util::dump(&copy) == util::dump(&real), "{what}: the copy");
        assert_eq!(util::integrity(&copy), "ok", "{what}");
    };
    assert_eq!(step(d, &link, "first push"), (false, true));
    to_copy("first copy");
    conn.execute("UPDATE t SET k = 'through the link' WHERE id = 10", [])
        .expect("write");
    // Only the WAL was written: status finds it where SQLite keeps it.
    let out = util::sqlferry(d)
        .arg("status")
        .arg(&link)
        .output()
        .expect("status");
    assert!(
        util::stdout(&out).contains("changes not pushed yet"),
        "status: {}{}",
        util::stdout(&out),
        util::stderr(&out)
    );
    changed(d, &link, "a write, pushed through the link");
    to_copy("a write, copied through the link");

    for suffix in ["-wal", "-shm"] {
        std::fs::copy(util::sidecar(&real, suffix), util::sidecar(&link, suffix))
            .expect("stale copy");
    }
    for i in 0..3 {
        conn.execute("UPDATE t SET k = ?1 WHERE id = 11", [format!("write {i}")])
            .expect("write");
        let (proved, created) = step(d, &link, "stale files beside the link");
        assert!(
            !proved && created,
            "write {i}: proved {proved}, created {created}"
        );
        to_copy("stale files beside the link");
    }
    drop(conn);
}

/// `versions` of a replica with thousands of versions, over a server: every version,
/// in order, whole (their JSON is many times the frame limit, so it comes in several
/// CONFIG frames), in `--json`, in the table, and with `--changes`.
#[test]
fn versions_of_thousands_of_versions_over_a_server_are_complete_and_ordered() {
    use sqlferry::engine::{NoProgress, sync_local};
    use sqlferry::page::Snapshot;
    use sqlferry::store::{PushOptions, ReplicaPath, Store};
    const VERSIONS: u64 = 2000;
    // Every 50th message is 4,000 bytes long: runs of every size.
    let message = |n: u64| match n % 50 {
        0 => format!("{n}: {}", "m".repeat(4000)),
        _ => format!("version {n}"),
    };
    let dir = TempDir::new().expect("tempdir");
    let server = crate::server::TestServer::in_process(dir.path());
    let db = dir.path().join("app.db");
    let conn = util::create(&db, 4096, util::Mode::Wal);
    util::insert_rows(&conn, 20, 100);
    // Made straight in the server's store: a push through the network each would take
    // minutes.
    let store = Store::new(dir.path().join("server-data"));
    let replica = ReplicaPath::parse("acme/many.db").expect("valid");
    for n in 1..=VERSIONS {
        conn.execute("UPDATE t SET k = ?1 WHERE id = 1", [n.to_string()])
            .expect("update");
        let mut writer = store
            .push(
                &replica,
                PushOptions {
                    base: (n > 1).then_some(n - 1),
                    message: message(n),
                    client_id: "many@test".into(),
                    ..PushOptions::default()
                },
            )
            .expect("open a push");
        let mut source = Snapshot::open(&db).expect("snapshot").with_hash_cache(None);
        sync_local(&mut source, &mut writer, &NoProgress).expect("push");
        assert_eq!(writer.outcome().expect("an outcome").0.number, n);
    }

    let admin = crate::server::Machine::new(dir.path(), "admin");
    let key = server.admin_key.as_str();
    let out = admin.run_on(
        &server,
        ["versions", "acme/many.db", "--json", "--key", key],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(
        out.stdout.len() > 4 * sqlferry::protocol::MAX_FRAME_BYTES,
        "the list is many frames long"
    );
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(list.len() as u64, VERSIONS);
    for (i, v) in list.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(v["number"], n, "in order, none missing");
        assert_eq!(v["message"], message(n), "version {n}");
        assert!(v["stored_bytes"].is_u64(), "version {n}: {v}");
    }

    let out = admin.run_on(&server, ["versions", "acme/many.db", "--key", key]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let text = util::stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    let numbers: Vec<u64> = lines[1..lines.len() - 1]
        .iter()
        .map(|l| {
            l.split_whitespace()
                .next()
                .expect("a number")
                .parse()
                .expect("a number")
        })
        .collect();
    assert_eq!(numbers, (1..=VERSIONS).collect::<Vec<_>>());
    let last = text.lines().last().expect("a total");
    assert!(
        last.starts_with(&format!("{VERSIONS} versions, ")),
        "{last}"
    );

    let out = admin.run_on(
        &server,
        [
            "versions",
            "acme/many.db",
            "--json",
            "--changes",
            "--last",
            "3",
            "--key",
            key,
        ],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(list.len() as u64, VERSIONS);
    for (i, v) in list.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(v["number"], n);
        if n <= VERSIONS - 3 {
            assert!(v["changes"].is_null(), "version {n} not looked at: {v}");
            continue;
        }
        let changes = v["changes"].as_array().expect("changes");
        assert_eq!(changes.len(), 1, "version {n}: {v}");
        assert_eq!(
            (
                &changes[0]["name"],
                &changes[0]["updated"],
                &changes[0]["inserted"]
            ),
            (
                &serde_json::json!("t"),
                &serde_json::json!(1),
                &serde_json::json!(0)
            ),
            "version {n}"
        );
    }
    drop(conn);
}

/// `apply` onto a rollback-mode database it cannot write: in a read-only directory
/// (SQLite cannot make its journal there, which it finds only at the first change) and
/// a read-only file. The error names the database, not the changeset (which is fine),
/// the exit code is 3, and the database is byte for byte as it was, no journal left.
#[test]
fn apply_onto_a_database_it_cannot_write_names_the_database_and_changes_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new().expect("tempdir");
    let d = dir.path();
    let (a, b) = (d.join("a.db"), d.join("b.db"));
    let conn = util::create(&a, 4096, util::Mode::Rollback);
    util::insert_rows(&conn, 50, 100);
    drop(conn);
    std::fs::copy(&a, &b).expect("copy");
    util::open(&b)
        .execute("UPDATE t SET k = 'changed' WHERE id < 20", [])
        .expect("update");
    let changeset = d.join("c.changeset");
    let out = util::sqlferry(d)
        .arg("diff")
        .arg(&a)
        .arg(&b)
        .arg("--changeset")
        .arg(&changeset)
        .arg("-q")
        .output()
        .expect("diff");
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(util::file_len(&changeset) > 0);

    let locked = d.join("locked");
    std::fs::create_dir(&locked).expect("mkdir");
    let in_locked = locked.join("target.db");
    std::fs::copy(&a, &in_locked).expect("copy");
    std::fs::set_permissions(&in_locked, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let read_only = d.join("read-only.db");
    std::fs::copy(&a, &read_only).expect("copy");
    std::fs::set_permissions(&read_only, std::fs::Permissions::from_mode(0o444)).expect("chmod");
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    for (target, phrase) in [
        (&in_locked, "readonly database"),
        (&read_only, "readonly database"),
    ] {
        let before = std::fs::read(target).expect("read");
        let mut cmd = util::sqlferry(d);
        cmd.arg("apply").arg(&changeset).arg(target);
        crate::cli::as_permission_bound_user(d, &mut cmd);
        let out = cmd.output().expect("apply");
        let err = util::stderr(&out);
        assert_eq!(util::code(&out), 3, "{err}");
        assert!(
            !err.contains("not a SQLite changeset"),
            "blames the changeset: {err}"
        );
        assert!(
            err.contains(&format!("{}: ", target.display())) && err.contains(phrase),
            "names the database and why: {err}"
        );
        assert_eq!(std::fs::read(target).expect("read"), before, "{err}");
        assert!(!util::sidecar(target, "-journal").exists(), "{err}");
    }
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// `apply` of a changeset that comes through a pipe (`/dev/stdin`, or `<(…)` in a
/// shell): it is read twice (checked, then applied), and a pipe gives its bytes once.
/// Every change is applied, not reported applied and left out.
#[test]
fn apply_of_a_changeset_through_a_pipe_applies_it() {
    use std::io::Write;
    let dir = TempDir::new().expect("tempdir");
    let d = dir.path();
    let (a, b) = (d.join("a.db"), d.join("b.db"));
    let conn = util::create(&a, 4096, util::Mode::Wal);
    util::insert_rows(&conn, 50, 100);
    drop(conn);
    util::checkpoint(&a);
    std::fs::copy(&a, &b).expect("copy");
    util::open(&b)
        .execute("UPDATE t SET k = 'changed' WHERE id < 20", [])
        .expect("update");
    let changeset = d.join("c.changeset");
    let out = util::sqlferry(d)
        .arg("diff")
        .arg(&a)
        .arg(&b)
        .arg("--changeset")
        .arg(&changeset)
        .arg("-q")
        .output()
        .expect("diff");
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let target = d.join("target.db");
    std::fs::copy(&a, &target).expect("copy");
    let mut child = util::sqlferry(d)
        .arg("apply")
        .arg("/dev/stdin")
        .arg(&target)
        .arg("--json")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("apply");
    let bytes = std::fs::read(&changeset).expect("changeset");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(&bytes).expect("write the changeset");
    drop(stdin);
    let out = child.wait_with_output().expect("apply");
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["changes"], 19, "{report}");
    assert!(
        util::dump(&target) == util::dump(&b),
        "every change applied: {report}"
    );
    assert_eq!(util::integrity(&target), "ok");
}
