//! A consistent, read-only view of a live database: the origin side of a sync.
//!
//! Invariants: the database is opened read-only and never written; everything is read
//! inside one read transaction, so every page belongs to the same committed state, WAL
//! pages included (`sqlite_dbpage` reads through the pager). In WAL mode a reader never
//! blocks a writer; in rollback mode the shared lock is held only while the snapshot
//! lives, which is one sync.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::hashcache::HashCache;
use super::{Header, JournalMode};
use crate::digest::{Digest, Hash, page_hash};
use crate::{Error, Result};

/// How long a snapshot waits for a writer holding an exclusive lock (rollback mode).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Pages read per `sqlite_dbpage` point query batch are cached by SQLite itself; keep its
/// page cache small so memory does not grow with the database.
const CACHE_KIB: i64 = 2048;

/// The most of the file a check maps into memory (SQLite caps it at 2 GiB by default;
/// past that it reads).
const CHECK_MMAP_BYTES: i64 = 1 << 31;

/// What [`Snapshot::hash_pages`] calls for each page: its number, its hash, and its
/// bytes when they were asked for.
pub type HashedPageFn<'a> = dyn FnMut(u32, Hash, Option<&[u8]>) -> Result<()> + 'a;

/// One read transaction over a database file.
pub struct Snapshot {
    conn: Connection,
    /// The database file, open as long as `conn` (declared after it: dropped after
    /// it), so that no handle of it is ever closed under `conn`'s locks.
    file: std::sync::Arc<std::fs::File>,
    path: PathBuf,
    page_size: u32,
    page_count: u32,
    journal_mode: JournalMode,
    /// Where the page-hash cache lives (`None`: no cache).
    hash_cache: Option<std::path::PathBuf>,
}

impl Snapshot {
    /// Opens `path` read-only and starts the read transaction that pins its state.
    pub fn open(path: &Path) -> Result<Snapshot> {
        super::recover_hot_journal(path);
        let header = Header::read(path)?.ok_or_else(|| Error::NotADatabase {
            path: path.to_owned(),
            reason: "empty database: nothing to sync".into(),
        })?;
        let sql = |e| Error::sqlite(path, e);
        let conn = Self::begin(path).map_err(sql)?;
        super::require_dbpage(&conn, path)?;
        let file = super::handles::open(path, false).map_err(|e| Error::io(path, e))?;
        let page_count: u32 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .map_err(sql)?;
        let page_size: u32 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(sql)?;
        if page_count == 0 {
            return Err(Error::NotADatabase {
                path: path.to_owned(),
                reason: "empty database: nothing to sync".into(),
            });
        }
        Ok(Snapshot {
            conn,
            file,
            path: path.to_owned(),
            page_size,
            page_count,
            journal_mode: header.journal_mode,
            hash_cache: super::hashcache::default_dir(),
        })
    }

    /// Opens `path` read-only and starts the read transaction.
    fn begin(path: &Path) -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
        // The first read starts the read transaction; from here on the state is pinned.
        conn.execute_batch("BEGIN DEFERRED; SELECT 1 FROM sqlite_schema LIMIT 1")?;
        Ok(conn)
    }

    /// Keeps this snapshot's page-hash cache in `dir` instead of the XDG cache
    /// directory; `None` hashes every page.
    pub fn with_hash_cache(mut self, dir: Option<std::path::PathBuf>) -> Self {
        self.hash_cache = dir;
        self
    }

    /// The file this snapshot reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The journal mode the database's header records.
    pub fn journal_mode(&self) -> JournalMode {
        self.journal_mode
    }

    /// Runs `PRAGMA integrity_check` inside the snapshot: `["ok"]` or the problems.
    pub fn integrity_check(&self) -> Result<Vec<String>> {
        self.check("PRAGMA integrity_check")
    }

    /// Runs `PRAGMA quick_check` inside the snapshot, so it checks exactly the state a
    /// sync from this snapshot sends: `["ok"]` or the problems. Cheaper than
    /// [`Snapshot::integrity_check`] (no index-content cross-check), linear in size.
    pub fn quick_check(&self) -> Result<Vec<String>> {
        self.check("PRAGMA quick_check")
    }

    /// The lines a checking pragma answers.
    fn check(&self, pragma: &str) -> Result<Vec<String>> {
        // The check reads every page, some twice (b-tree pages, then the rows), through
        // a 2 MiB cache: mapped, each read is a pointer, not a system call and a copy.
        // The file cannot shrink under the mapping while the read transaction is open
        // (the same argument as `scan::for_each_page`'s).
        let _ = self.conn.pragma_update(None, "mmap_size", CHECK_MMAP_BYTES);
        let result = (|| {
            let mut stmt = self
                .conn
                .prepare(pragma)
                .map_err(|e| Error::sqlite(&self.path, e))?;
            let rows = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(|e| Error::sqlite(&self.path, e))?;
            rows.collect::<rusqlite::Result<_>>()
                .map_err(|e| Error::sqlite(&self.path, e))
        })();
        let _ = self.conn.pragma_update(None, "mmap_size", 0);
        result
    }

    /// Calls `f` with each page number and its bytes, in page order, all from this
    /// snapshot's transaction.
    pub fn for_each_page(&mut self, f: &mut dyn FnMut(u32, &[u8]) -> Result<()>) -> Result<()> {
        super::scan::for_each_page(
            &self.conn,
            &self.file,
            &self.path,
            self.page_size,
            self.page_count,
            f,
        )
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Number of pages.
    pub fn page_count(&self) -> u32 {
        self.page_count
    }

    /// Calls `f` with every page's number and [`page_hash`](crate::digest::page_hash),
    /// in page order, and with the page's bytes too for pages after `with_data_after`.
    /// Unchanged pages take their hash from the page-hash cache.
    pub fn hash_pages(&mut self, with_data_after: u32, f: &mut HashedPageFn<'_>) -> Result<()> {
        let mut cache = HashCache::open(
            self.hash_cache.as_deref(),
            &self.path,
            self.page_size,
            self.page_count,
        );
        self.for_each_page(&mut |pgno, data| {
            f(
                pgno,
                cache.hash(pgno, data),
                (pgno > with_data_after).then_some(data),
            )
        })?;
        tracing::debug!(
            path = %self.path.display(),
            pages = self.page_count,
            cached = cache.hits,
            "origin hashed"
        );
        cache.finish();
        Ok(())
    }

    /// The database's digest as this snapshot sees it. `afresh` hashes every page
    /// (what `verify` does: the check trusts no cache); otherwise unchanged pages take
    /// their hash from the page-hash cache.
    pub fn digest(&mut self, afresh: bool) -> Result<Hash> {
        let mut digest = Digest::new(self.page_size, self.page_count);
        if afresh {
            self.for_each_page(&mut |pgno, data| {
                digest.push(&page_hash(pgno, data));
                Ok(())
            })?;
        } else {
            self.hash_pages(u32::MAX, &mut |_, hash, _| {
                digest.push(&hash);
                Ok(())
            })?;
        }
        digest.finish().ok_or_else(|| Error::NotADatabase {
            path: self.path.clone(),
            reason: "the page count changed while reading".into(),
        })
    }

    /// Reads page `pgno` into `buf` (replacing its contents).
    pub fn read_page(&mut self, pgno: u32, buf: &mut Vec<u8>) -> Result<()> {
        super::scan::read_page(&self.conn, &self.path, pgno, self.page_size, buf)
    }
}
