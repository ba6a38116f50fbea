//! How the store's own SQLite files (the page index, each replica's file) treat their
//! write-ahead log between pushes.
//!
//! Closing the last connection to a WAL database checkpoints it and deletes the WAL, so
//! every small push used to pay two checkpoints (their fsyncs) and recreate both WALs
//! (a directory fsync each). [`keep_wal_on_close`] keeps the WAL instead. But a WAL
//! left behind is not free: the next process to open the file finds no live wal-index
//! (the first opener discards the `-shm`), rebuilds it by reading every frame, and
//! counts none of them as copied back, so it can neither restart the WAL nor skip the
//! frames at the next checkpoint. Left alone, the WAL of a store written by one process
//! per push (the CLI with the embedded store, a server between pushes) only grows, and
//! each push reads and checkpoints all of it again. [`trim_wal`] bounds it: after a
//! commit, a WAL past [`KEPT_WAL_BYTES`] is checkpointed and truncated to nothing, if
//! no reader or writer is in the way at that moment (else the next commit tries).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;
use rusqlite::config::DbConfig;

/// The most a store file's WAL is left holding after a commit: past this, the commit
/// empties it ([`trim_wal`]). About a thousand frames of the index (1 KiB pages), so
/// the cost of rebuilding the wal-index at the next open stays a millisecond or so.
pub(super) const KEPT_WAL_BYTES: u64 = 1 << 20;

/// Makes closing `conn` leave its WAL as it is (no checkpoint, no delete), and a WAL
/// that SQLite restarts after a checkpoint cut back to [`KEPT_WAL_BYTES`]. Every commit
/// is in the WAL and fsynced (`synchronous = FULL`), and any connection that opens the
/// file reads it. The writer must call [`trim_wal`] after its commits.
pub(super) fn keep_wal_on_close(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
    conn.pragma_update(None, "journal_size_limit", KEPT_WAL_BYTES as i64)
}

/// After a commit on `conn` (a connection to `file` set up by [`keep_wal_on_close`]):
/// when the WAL is larger than [`KEPT_WAL_BYTES`], copies it into `file` and truncates
/// it (`wal_checkpoint(TRUNCATE)`), without waiting: a reader's snapshot or another
/// push's commit in the way leaves it for the next commit. `busy` is the connection's
/// busy timeout, set back afterwards. Never fails the commit it follows: the version is
/// durable in the WAL whether or not it is copied back now.
pub(super) fn trim_wal(conn: &Connection, file: &Path, busy: Duration) {
    let wal = wal_of(file);
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

/// The WAL file of the SQLite database `file`.
fn wal_of(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}
