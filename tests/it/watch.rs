//! The push subscriber's watcher on real databases, in WAL and rollback mode: commits by
//! another connection or another process are reported, reads, checkpoints, rolled-back
//! transactions and sqlferry's own push are not, the poll finds a commit that made no
//! file event in the watched directory, and dropping the watcher ends it.
//!
//! Every wait for a report is on the watcher's channel, bounded by a timeout; only the
//! proofs of absence wait out a short window.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlferry::ErrorKind;
use sqlferry::subscribe::{Seen, Watcher};
use tempfile::TempDir;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::util::{self, Mode};

/// A poll so slow it never runs during a test: only file events find commits.
const NO_POLL: Duration = Duration::from_secs(3600);

/// A generous bound for a report that normally arrives within a tenth of a second.
const SEEN_WITHIN: Duration = Duration::from_secs(10);

/// How long a test waits to be sure that no report comes.
const QUIET_FOR: Duration = Duration::from_millis(1500);

/// A database being watched, and the watcher's channel.
struct Watched {
    _dir: TempDir,
    db: PathBuf,
    watcher: Option<Watcher>,
    seen: UnboundedReceiver<Seen>,
    rt: tokio::runtime::Runtime,
}

impl Watched {
    /// A new database in `mode` with table `t`, watched with `poll`.
    fn new(mode: Mode, poll: Duration) -> Watched {
        let dir = TempDir::new().expect("tempdir");
        let db = dir.path().join("app.db");
        drop(util::create(&db, 4096, mode));
        Watched::on(dir, db, poll)
    }

    fn on(dir: TempDir, db: PathBuf, poll: Duration) -> Watched {
        let (watcher, seen) =
            Watcher::start(&db, poll).unwrap_or_else(|e| panic!("watch {}: {e}", db.display()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        Watched {
            _dir: dir,
            db,
            watcher: Some(watcher),
            seen,
            rt,
        }
    }

    fn watcher(&self) -> &Watcher {
        self.watcher.as_ref().expect("not dropped yet")
    }

    /// The next report within `within`: `Ok(None)` if the channel closed, `Err` if
    /// nothing came.
    fn next(&mut self, within: Duration) -> Result<Option<Seen>, ()> {
        let seen = &mut self.seen;
        self.rt
            .block_on(async { tokio::time::timeout(within, seen.recv()).await })
            .map_err(|_| ())
    }

    /// Waits for the next report and returns it.
    #[track_caller]
    fn seen(&mut self) -> Seen {
        match self.next(SEEN_WITHIN) {
            Ok(Some(seen)) => seen,
            Ok(None) => panic!("the watcher's channel closed"),
            Err(()) => panic!("no report within {SEEN_WITHIN:?}"),
        }
    }

    /// Asserts that no report comes for a while.
    #[track_caller]
    fn quiet(&mut self) {
        if let Ok(seen) = self.next(QUIET_FOR) {
            panic!("expected no report, got {seen:?}");
        }
    }
}

/// One commit through a new connection, closed afterwards.
fn commit(db: &Path) {
    util::open(db)
        .execute("INSERT INTO t(k, v) VALUES ('x', randomblob(100))", [])
        .expect("insert");
}

const FOUND_BY_EVENT: Seen = Seen {
    commits: 1,
    by_poll: false,
};

fn commits_by_another_connection_are_seen(mode: Mode) {
    let mut w = Watched::new(mode, NO_POLL);
    commit(&w.db);
    assert_eq!(w.seen(), FOUND_BY_EVENT);
    // An application's long-lived connection, committing twice.
    let app = util::open(&w.db);
    app.execute("INSERT INTO t(k) VALUES ('a')", [])
        .expect("insert");
    assert_eq!(w.seen(), FOUND_BY_EVENT);
    app.execute("UPDATE t SET k = 'b'", []).expect("update");
    assert_eq!(w.seen(), FOUND_BY_EVENT);
    w.quiet();
}

#[test]
fn commits_by_another_connection_are_seen_wal() {
    commits_by_another_connection_are_seen(Mode::Wal);
}

#[test]
fn commits_by_another_connection_are_seen_rollback() {
    commits_by_another_connection_are_seen(Mode::Rollback);
}

#[test]
fn commits_by_another_process_are_seen() {
    const SCRIPT: &str = "import sqlite3, sys
con = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
con.execute(\"INSERT INTO t(k, v) VALUES ('python', x'00')\")
con.close()";
    for mode in [Mode::Wal, Mode::Rollback] {
        let mut w = Watched::new(mode, NO_POLL);
        util::python(SCRIPT, &[&w.db]);
        assert_eq!(w.seen(), FOUND_BY_EVENT, "{mode:?}");
        w.quiet();
    }
}

fn reads_checkpoints_and_rollbacks_are_not_commits(mode: Mode) {
    let mut w = Watched::new(mode, NO_POLL);
    // Something to checkpoint in WAL mode.
    commit(&w.db);
    assert_eq!(w.seen(), FOUND_BY_EVENT);
    let checks = w.watcher().checks();

    // A reader opens the database, reads and closes.
    let reader = util::open(&w.db);
    let rows: i64 = reader
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .expect("count");
    assert_eq!(rows, 1);
    drop(reader);
    // A transaction that writes and rolls back: a -journal comes and goes.
    let writer = util::open(&w.db);
    writer
        .execute_batch(
            "BEGIN IMMEDIATE; INSERT INTO t(k) VALUES ('gone'); UPDATE t SET k = 'y'; ROLLBACK;",
        )
        .expect("rolled back");
    // A checkpoint writes the main file (in rollback mode there is no WAL to copy).
    let (busy, _, _): (i64, i64, i64) = writer
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .expect("checkpoint");
    assert_eq!(busy, 0);
    drop(writer);
    // sqlferry's own push reads the database.
    let copy = w.db.with_file_name("copy.db");
    util::push_json(&w.db, &copy);
    util::assert_same(&w.db, &copy);

    w.quiet();
    assert!(
        w.watcher().checks() > checks,
        "the file events reached the checker, which found no commit"
    );
    // Still watching.
    commit(&w.db);
    assert_eq!(w.seen(), FOUND_BY_EVENT);
}

#[test]
fn reads_checkpoints_and_rollbacks_are_not_commits_wal() {
    reads_checkpoints_and_rollbacks_are_not_commits(Mode::Wal);
}

#[test]
fn reads_checkpoints_and_rollbacks_are_not_commits_rollback() {
    reads_checkpoints_and_rollbacks_are_not_commits(Mode::Rollback);
}

#[test]
fn the_poll_finds_a_commit_that_made_no_file_event() {
    // A writer reaching the database through a hard link in another directory changes
    // the same file, but its events happen in that other directory. In rollback mode
    // that is a safe way to share a database: SQLite's locks are on the file itself.
    let dir = TempDir::new().expect("tempdir");
    let watched_dir = dir.path().join("watched");
    let other_dir = dir.path().join("other");
    std::fs::create_dir(&watched_dir).expect("mkdir");
    std::fs::create_dir(&other_dir).expect("mkdir");
    let db = watched_dir.join("app.db");
    drop(util::create(&db, 4096, Mode::Rollback));
    let link = other_dir.join("link.db");
    std::fs::hard_link(&db, &link).expect("hard link");

    let mut w = Watched::on(dir, db, Duration::from_millis(200));
    commit(&link);
    assert_eq!(
        w.seen(),
        Seen {
            commits: 1,
            by_poll: true
        }
    );
    let rows: i64 = util::open(&w.db)
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .expect("count");
    assert_eq!(
        rows, 1,
        "the commit through the link is in the watched file"
    );
    // The same commit is reported once.
    w.quiet();
}

#[test]
fn a_burst_of_commits_is_a_few_reports_not_one_each() {
    let mut w = Watched::new(Mode::Wal, NO_POLL);
    let app = util::open(&w.db);
    for i in 0..50 {
        app.execute("INSERT INTO t(k) VALUES (?1)", [i])
            .expect("insert");
    }
    let mut reports = vec![w.seen()];
    while let Ok(Some(seen)) = w.next(QUIET_FOR) {
        reports.push(seen);
    }
    assert!(
        reports.len() < 10,
        "50 quick commits made {} reports",
        reports.len()
    );
    assert!(reports.iter().all(|s| *s == FOUND_BY_EVENT), "{reports:?}");
}

#[test]
fn dropping_the_watcher_ends_it() {
    let mut w = Watched::new(Mode::Wal, NO_POLL);
    drop(w.watcher.take());
    // The checker thread drops the sending half only when it ends, and dropping the
    // watcher waits for that: no thread outlives it.
    assert_eq!(
        w.seen.try_recv(),
        Err(tokio::sync::mpsc::error::TryRecvError::Disconnected),
        "the checker thread has ended"
    );
}

#[test]
fn watching_what_is_not_a_database_fails_clearly() {
    let dir = TempDir::new().expect("tempdir");
    let missing = dir.path().join("missing.db");
    let err = Watcher::start(&missing, NO_POLL).expect_err("no such file");
    assert_eq!(err.kind(), ErrorKind::LocalIo);
    assert!(err.to_string().contains("missing.db"), "{err}");

    let text = dir.path().join("notes.txt");
    std::fs::write(
        &text,
        "not a database, but long enough to have a header...\n".repeat(4),
    )
    .expect("write");
    let err = Watcher::start(&text, NO_POLL).expect_err("not SQLite");
    assert_eq!(err.kind(), ErrorKind::NotADatabase, "{err}");
    assert!(err.to_string().contains("notes.txt"), "{err}");
}
