//! How sqlferry's own SQLite files in WAL mode (the store's page index and replica
//! files, the client's sync log) keep their write-ahead log small between processes.
//!
//! Closing the last connection to a WAL database checkpoints it and deletes the WAL, so
//! every small push used to pay two checkpoints (their fsyncs) and recreate both WALs
//! (a directory fsync each). [`keep_wal_on_close`] keeps the WAL instead. But a WAL
//! left behind is not free: the next process to open the file finds no live wal-index
//! (the first opener discards the `-shm`), rebuilds it by reading every frame, and
//! counts none of them as copied back, so it can neither restart the WAL nor skip the
//! frames at the next checkpoint. Left alone, the WAL of a store written by one process
//! per push (the CLI with the embedded store, a server between pushes) only grows, and
//! each push reads and checkpoints all of it again. A connection a process never closes
//! (the sync log's, kept for a subscriber's records and dropped only at exit) leaves
//! its WAL the same way. [`trim_wal`] bounds it: after a commit, a WAL past
//! [`KEPT_WAL_BYTES`] is checkpointed and truncated to nothing, if no reader or writer
//! is in the way at that moment (else the next commit tries).

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;
use rusqlite::config::DbConfig;

/// The most the WAL of a file kept this way (the store's index and replica files, the
/// sync log) is left holding after a commit: past this, the commit empties it
/// ([`trim_wal`]). About a thousand frames of the index (1 KiB pages), so the cost of
/// rebuilding the wal-index at the next open stays a millisecond or so.
pub(crate) const KEPT_WAL_BYTES: u64 = 1 << 20;

/// Makes closing `conn` leave its WAL as it is (no checkpoint, no delete), and a WAL
/// that SQLite restarts after a checkpoint cut back to [`KEPT_WAL_BYTES`]. Every commit
/// is in the WAL and fsynced (`synchronous = FULL`), and any connection that opens the
/// file reads it. The writer must call [`trim_wal`] after its commits.
pub(crate) fn keep_wal_on_close(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
    conn.pragma_update(None, "journal_size_limit", KEPT_WAL_BYTES as i64)
}

/// After a commit on `conn`, a connection to `file` that is closed without a checkpoint
/// ([`keep_wal_on_close`]) or never closed at all (a process's cached connection):
/// when the WAL is larger than [`KEPT_WAL_BYTES`], copies it into `file` and truncates
/// it (`wal_checkpoint(TRUNCATE)`), without waiting: a reader's snapshot or another
/// push's commit in the way leaves it for the next commit. `busy` is the connection's
/// busy timeout, set back afterwards. Never fails the commit it follows: the version is
/// durable in the WAL whether or not it is copied back now.
pub(crate) fn trim_wal(conn: &Connection, file: &Path, busy: Duration) {
    let wal = super::sqlite_sibling(file, "-wal");
    let len = std::fs::metadata(&wal).map_or(0, |m| m.len());
    if len <= KEPT_WAL_BYTES {
        return;
    }
    let outcome = conn.busy_timeout(Duration::ZERO).and_then(|()| {
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            r.get::<_, i64>(0)
        })
    });
    if let Err(e) = conn.busy_timeout(busy) {
        tracing::warn!(file = %file.display(), error = %e, "could not set the busy timeout back");
    }
    match outcome {
        Ok(0) => {
            tracing::debug!(file = %file.display(), wal_bytes = len, "WAL checkpointed and emptied")
        }
        Ok(_) => {
            tracing::debug!(file = %file.display(), wal_bytes = len, "WAL in use: left for the next commit")
        }
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "could not checkpoint the WAL; the next commit tries again")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUSY: Duration = Duration::from_secs(60);

    /// A WAL database at `dir/t.db` set up as the store's files are, holding `rows`
    /// rows of 1 KiB written in one transaction, not copied back.
    fn database(dir: &Path, rows: i64) -> (Connection, std::path::PathBuf) {
        let file = dir.join("t.db");
        let conn = Connection::open(&file).unwrap();
        conn.busy_timeout(BUSY).unwrap();
        keep_wal_on_close(&conn).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;
             CREATE TABLE t(x BLOB);",
        )
        .unwrap();
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
             INSERT INTO t SELECT randomblob(1024) FROM n",
            [rows],
        )
        .unwrap();
        (conn, file)
    }

    fn wal_len(file: &Path) -> u64 {
        std::fs::metadata(super::super::sqlite_sibling(file, "-wal")).map_or(0, |m| m.len())
    }

    fn rows(file: &Path) -> i64 {
        let conn = Connection::open(file).unwrap();
        conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_wal_past_the_bound_is_copied_back_and_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let (conn, file) = database(dir.path(), 2000);
        assert!(wal_len(&file) > KEPT_WAL_BYTES, "{}", wal_len(&file));
        trim_wal(&conn, &file, BUSY);
        assert_eq!(wal_len(&file), 0);
        drop(conn);
        // Everything is in the main file: a copy of it alone holds every row.
        std::fs::copy(&file, dir.path().join("alone.db")).unwrap();
        assert_eq!(rows(&dir.path().join("alone.db")), 2000);
    }

    #[test]
    fn a_small_wal_is_left_for_later() {
        let dir = tempfile::tempdir().unwrap();
        let (conn, file) = database(dir.path(), 50);
        let before = wal_len(&file);
        assert!(before > 0 && before <= KEPT_WAL_BYTES, "{before}");
        trim_wal(&conn, &file, BUSY);
        assert_eq!(wal_len(&file), before);
        drop(conn);
        assert_eq!(rows(&file), 50);
    }

    #[test]
    fn a_reader_in_the_way_is_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let (conn, file) = database(dir.path(), 2000);
        let reader = Connection::open(&file).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let n: i64 = reader
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2000);
        let before = wal_len(&file);
        let started = std::time::Instant::now();
        trim_wal(&conn, &file, BUSY);
        // The reader's snapshot holds the WAL: left whole, and at once (the connection's
        // own busy timeout is a minute).
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(wal_len(&file), before);
        let timeout: i64 = conn
            .query_row("PRAGMA busy_timeout", [], |r| r.get(0))
            .unwrap();
        assert_eq!(timeout, 60_000, "the busy timeout is set back");
        reader.execute_batch("COMMIT").unwrap();
        trim_wal(&conn, &file, BUSY);
        assert_eq!(wal_len(&file), 0);
    }
}
