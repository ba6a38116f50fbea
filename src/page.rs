//! SQLite page access: what a page is, how it is identified, and the two ends that read
//! and write whole databases page by page.
//!
//! - [`Snapshot`] reads a live database through one read transaction over
//!   `sqlite_dbpage`, so pages still in the WAL are seen, and never writes it.
//! - [`Writer`] changes a database in one `BEGIN IMMEDIATE` transaction through
//!   `sqlite_dbpage`: readers in other processes see the old database or the new one.
//!
//! Page identity and the database digest are computed in [`crate::digest`] (a leaf every
//! module may use); this module reads and writes the pages they are computed over, and
//! knows nothing of the sync engine: the engine implements its page source and target
//! over these two types (`engine/sqlite.rs`).

mod btree;
mod fastcache;
mod following;
pub(crate) mod handles;
mod hashcache;
mod header;
pub(crate) mod kept_wal;
mod scan;
mod snapshot;
mod state;
mod wal;
mod writer;

pub use following::Following;
pub use header::{Header, JournalMode};
pub use snapshot::{HashedPageFn, Snapshot};
pub use state::SourceState;
pub use writer::{SealedHashes, Writer};

/// The file SQLite keeps beside the database at `db` with `suffix` (`-wal`, `-shm`,
/// `-journal`). SQLite resolves symbolic links in a database's path before it names
/// these (its unix VFS does, as `realpath` does), so the WAL of a database reached
/// through a link lies beside the file the link points to, not beside the link. A
/// reader looking beside the link would find no WAL, and take pages the WAL holds newer
/// versions of from the file, or find a stale one a former file of that name left.
pub(crate) fn sqlite_sibling(db: &std::path::Path, suffix: &str) -> std::path::PathBuf {
    let real = std::fs::canonicalize(db).unwrap_or_else(|_| db.to_owned());
    let mut p = real.into_os_string();
    p.push(suffix);
    std::path::PathBuf::from(p)
}

/// Lets SQLite roll back a hot journal that a crashed or killed writer left beside the
/// database at `path`, exactly as the next connection to open it would. Until then the
/// file's header may be half-written (a new database killed mid-creation has a zeroed
/// page 1), and a read-only connection may not roll back. Best effort: if recovery fails,
/// the caller's own open reports the problem.
pub fn recover_hot_journal(path: &std::path::Path) {
    let journal = sqlite_sibling(path, "-journal");
    let hot = std::fs::metadata(&journal).is_ok_and(|m| m.len() > 0);
    if !hot {
        return;
    }
    tracing::info!(path = %path.display(), "letting SQLite roll back the journal a crashed writer left");
    if let Ok(conn) =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
    {
        let _ = conn.busy_timeout(std::time::Duration::from_secs(10));
        // Taking the shared lock is what makes SQLite check for, and play back, a hot
        // journal; a live writer's journal is not hot and is left alone.
        let _ = conn.query_row("SELECT 1 FROM sqlite_schema LIMIT 1", [], |_| Ok(()));
    }
}

/// What a build of SQLite without `sqlite_dbpage` is told, once, at open: the virtual
/// table is an optional part of SQLite, and without it every read would end in a bare
/// "no such table" far from its cause.
const NO_DBPAGE: &str = "this SQLite was built without SQLITE_ENABLE_DBPAGE_VTAB, \
which sqlferry needs to read and write pages: build with \
LIBSQLITE3_FLAGS=\"-DSQLITE_ENABLE_DBPAGE_VTAB\" in the environment or in your \
project's .cargo/config.toml [env] (sqlferry's own .cargo/config.toml sets it), \
then rebuild rusqlite's bundled SQLite (cargo clean -p libsqlite3-sys)";

/// Whether the SQLite this process links provides the `sqlite_dbpage` virtual table.
/// Asked once per process: it is a property of the build, the same for every
/// connection. A connection that cannot even list its modules is asked again later.
fn has_dbpage(conn: &rusqlite::Connection) -> rusqlite::Result<bool> {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if let Some(present) = PRESENT.get() {
        return Ok(*present);
    }
    let listed = conn.query_row(
        "SELECT count(*) FROM pragma_module_list WHERE name = 'sqlite_dbpage'",
        [],
        |r| r.get::<_, i64>(0),
    );
    let present = match listed {
        Ok(n) => n > 0,
        // A build with SQLITE_OMIT_INTROSPECTION_PRAGMAS cannot list its modules; its
        // compile options still say whether the table was built in.
        Err(_) => {
            conn.query_row(
                "SELECT sqlite_compileoption_used('ENABLE_DBPAGE_VTAB')",
                [],
                |r| r.get::<_, i64>(0),
            )? > 0
        }
    };
    Ok(*PRESENT.get_or_init(|| present))
}

/// The error for a build without `sqlite_dbpage`, or `None` when it is there.
fn dbpage_error(present: bool) -> Option<crate::Error> {
    (!present).then(|| crate::Error::Usage(NO_DBPAGE.into()))
}

/// Checks, on a connection just opened to `path`, that `sqlite_dbpage` is available:
/// one clear error at open instead of "no such table" in the middle of a sync.
pub(crate) fn require_dbpage(
    conn: &rusqlite::Connection,
    path: &std::path::Path,
) -> crate::Result<()> {
    let present = has_dbpage(conn).map_err(|e| crate::Error::sqlite(path, e))?;
    dbpage_error(present).map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_without_dbpage_says_how_to_enable_it() {
        let e = dbpage_error(false).expect("an error");
        assert_eq!(e.kind(), crate::ErrorKind::Usage);
        let text = e.to_string();
        assert!(text.starts_with("this SQLite was built without SQLITE_ENABLE_DBPAGE_VTAB"));
        assert!(text.contains("LIBSQLITE3_FLAGS"), "{text}");
        assert!(dbpage_error(true).is_none());
    }

    #[test]
    fn this_build_has_dbpage() {
        let conn = rusqlite::Connection::open_in_memory().expect("in memory");
        assert!(has_dbpage(&conn).expect("lists modules"));
        require_dbpage(&conn, std::path::Path::new(":memory:")).expect("present");
    }
}
