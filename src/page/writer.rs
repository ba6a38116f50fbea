//! The replica side of a sync on an SQLite file: every change to an existing file in
//! one `BEGIN IMMEDIATE` transaction through `sqlite_dbpage`, a file that does not exist
//! yet written whole beside its path and linked into place ([`Fresh`]); either is
//! committed only after the engine has checked the result against the origin's digest.
//!
//! Invariants:
//! - Readers in other processes see the old database or the new one, never a mix: all
//!   writes, and the truncation when the origin shrank, happen in one SQLite transaction;
//!   a new file appears at its path only whole, synced and checked.
//! - Until [`Writer::commit_pages`], nothing is visible; dropping a `Writer` rolls back,
//!   and a file this writer created (or its temporary file) is removed again.
//! - A replica keeps its own journal mode (a WAL replica stays WAL); an empty or new one
//!   takes the origin's page size and journal mode.
//! - A replica with another page size is first rebuilt at the origin's page size with
//!   `VACUUM` (see `docs/engine.md`), then synced like any other.

use std::ffi::{c_char, c_uint, c_void};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, config::DbConfig};

use super::hashcache::{CacheBuilder, HashCache};
use super::state::SourceState;
use super::{Header, JournalMode};
use crate::digest::{Digest, Hash, HashSpill};
use crate::{Error, Result};

/// How long the writer waits for other connections' locks (readers finishing, in
/// rollback mode, before the commit can take its exclusive lock).
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// SQLite page cache for the writer, in KiB. Dirty pages beyond it spill to the journal
/// or WAL, so memory stays flat however many pages change.
const CACHE_KIB: i64 = 8192;

/// Pages written by one INSERT statement.
const BATCH_PAGES: usize = 32;

/// A replica database being brought up to date.
pub struct Writer {
    conn: Option<Connection>,
    /// The database file, open from just after the connection until after it closes:
    /// closing any handle of the file would drop the connection's POSIX locks (see
    /// `scan::for_each_page`).
    file: Option<std::sync::Arc<std::fs::File>>,
    path: PathBuf,
    /// The journal mode the replica had before this sync, when it held pages.
    journal_mode: Option<JournalMode>,
    page_size: u32,
    page_count: u32,
    /// Where the page-hash cache lives (`None`: no cache).
    hash_cache: Option<PathBuf>,
    /// Pages waiting to be written in one statement.
    batch: Vec<(u32, Vec<u8>)>,
    /// Page 1 as received, written last (see `write_page`).
    page1: Option<Vec<u8>>,
    /// The page-hash cache of a replica written from empty, built as pages arrive.
    building: Option<CacheBuilder>,
    /// Whether this writer created the file (it is removed again on failure).
    created: bool,
    committed: bool,
    /// Keep the page hashes of each committed version for the next sync through this
    /// writer (see [`Writer::keep_committed_hashes`]).
    keep_committed: bool,
    /// The version this writer committed last, while it may still hold.
    last_commit: Option<LastCommit>,
    /// Whether the last `hashes` came from `last_commit` rather than a scan.
    known_hashes_used: bool,
    /// A new file being written whole, beside its path (see [`Fresh`]).
    fresh: Option<Fresh>,
    /// The hashes of the pages held, as a seal proves them (see [`SealedHashes`]).
    sealed: Option<SealedHashes>,
    /// Whether the last `hashes` came from `sealed` rather than a read of the file.
    sealed_used: bool,
    /// Keep, after each commit, the state the file was left in and the committed
    /// hashes, for the caller to seal ([`Writer::seal_commits`]).
    seal_commits: bool,
    /// The state the last commit left the file in, when it could be proved.
    committed_state: Option<SourceState>,
}

/// The page hashes of the database a writer is about to change, as its last sync left
/// them (docs/engine.md, "A pull that reads what changed"): the state the file was in
/// then ([`SourceState::to_token`]), and the digest of those pages. The writer uses
/// them instead of reading the file only when, inside its write transaction (no other
/// connection can commit until it ends), it finds the file in exactly that state; and
/// it checks them against the digest as it reads them: hashes that do not make it end
/// the sync before anything is written.
pub struct SealedHashes {
    /// The state token the hashes were true in.
    pub state: String,
    /// Their digest (page size, page count, the hashes in order).
    pub digest: Hash,
    /// Page size.
    pub page_size: u32,
    /// Page count.
    pub page_count: u32,
    /// The hashes, in page order.
    pub hashes: Box<dyn Iterator<Item = Result<Hash>> + Send>,
}

impl std::fmt::Debug for SealedHashes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedHashes")
            .field("state", &self.state)
            .field("page_size", &self.page_size)
            .field("page_count", &self.page_count)
            .finish_non_exhaustive()
    }
}

/// What a writer knows of the database right after its own commit.
#[derive(Debug)]
struct LastCommit {
    page_size: u32,
    page_count: u32,
    /// The committed pages' hashes, in order.
    hashes: HashSpill,
    /// `PRAGMA data_version` on this writer's connection, read inside its transaction,
    /// just before COMMIT: it changes only when another connection commits.
    data_version: i64,
    /// The file the connection has open (device, inode): the path must still name it.
    identity: (u64, u64),
}

fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl Writer {
    /// Opens (or creates) the replica at `path` for writing. Nothing is changed yet: a
    /// file that is not an SQLite database, a read-only file, or a missing directory is
    /// refused here.
    pub fn open(path: &Path) -> Result<Writer> {
        let existed = match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => {
                return Err(Error::io(
                    path,
                    std::io::Error::other("is a directory, not a database file"),
                ));
            }
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::io(path, e)),
        };
        if existed {
            // Opening for writing changes nothing but proves we may write (a kept
            // handle: closing one would drop other connections' locks).
            super::handles::open(path, true).map_err(|e| Error::io(path, e))?;
        } else {
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            match std::fs::metadata(parent) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(Error::io(
                        parent,
                        std::io::Error::other("is not a directory"),
                    ));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Error::io(
                        parent,
                        std::io::Error::other("directory does not exist"),
                    ));
                }
                Err(e) => return Err(Error::io(parent, e)),
            }
        }
        let header = if existed {
            super::recover_hot_journal(path);
            Header::read(path)?
        } else {
            None
        };
        let mut writer = Writer {
            conn: None,
            file: None,
            path: path.to_owned(),
            journal_mode: header.map(|h| h.journal_mode),
            page_size: header.map_or(0, |h| h.page_size),
            page_count: 0,
            hash_cache: super::hashcache::default_dir(),
            batch: Vec::with_capacity(BATCH_PAGES),
            page1: None,
            building: None,
            created: !existed,
            committed: false,
            keep_committed: false,
            last_commit: None,
            known_hashes_used: false,
            fresh: None,
            sealed: None,
            sealed_used: false,
            seal_commits: false,
            committed_state: None,
        };
        // A file that does not exist yet is written whole into a temporary file by
        // `prepare`, unless the writer is to serve again (`keep_committed_hashes`):
        // then, and for every existing file, through SQLite, connected now.
        if existed {
            writer.connect()?;
        }
        Ok(writer)
    }

    /// Opens the SQLite connection (creating the file if it does not exist).
    fn connect(&mut self) -> Result<()> {
        let path = self.path.clone();
        let path = path.as_path();
        let sql = |e| Error::sqlite(path, e);
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
        conn.pragma_update(None, "cache_size", -CACHE_KIB)
            .map_err(sql)?;
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, false)
            .map_err(sql)?;
        super::require_dbpage(&conn, path)?;
        disable_autovacuum_on_commit(&conn).map_err(sql)?;
        // A second sqlite_dbpage instance, for page 1 (see `commit`).
        conn.execute_batch("CREATE VIRTUAL TABLE temp.sqlferry_dbpage USING sqlite_dbpage")
            .map_err(sql)?;
        self.conn = Some(conn);
        self.file = Some(super::handles::open(path, false).map_err(|e| Error::io(path, e))?);
        Ok(())
    }

    /// Keeps this replica's page-hash cache in `dir` instead of the XDG cache
    /// directory; `None` hashes every page.
    pub fn with_hash_cache(mut self, dir: Option<PathBuf>) -> Self {
        self.hash_cache = dir;
        self
    }

    /// Keeps, after each commit, the committed pages' hashes and a way to know whether
    /// anyone else has written the database since: the next sync through this same
    /// writer ([`Writer::ready_again`]) then takes the hashes of the pages it holds from
    /// there instead of reading the whole file. For a writer that lives across syncs (a
    /// pull subscriber's).
    pub fn keep_committed_hashes(mut self) -> Self {
        self.keep_committed = true;
        self
    }

    /// Takes the hashes of the pages held from `sealed` instead of reading the file,
    /// if the file is still in the state they were true in when the sync runs
    /// ([`SealedHashes`]); otherwise the file is read as always.
    pub fn with_sealed_hashes(mut self, sealed: SealedHashes) -> Self {
        self.sealed = Some(sealed);
        self
    }

    /// Whether the last sync took the hashes of the pages held from the sealed hashes
    /// ([`Writer::with_sealed_hashes`]) rather than reading the file.
    pub fn used_sealed_hashes(&self) -> bool {
        self.sealed_used
    }

    /// Keeps, after each commit, the committed page hashes and the state the file was
    /// left in, when it can be proved that no other connection wrote it in between
    /// ([`Writer::committed_seal`]). In WAL mode the commit's frames are then
    /// checkpointed into the file at once (without waiting for readers: a reader still
    /// on an older state leaves them in the WAL), so that the state holds after this
    /// writer's connection closes, which would otherwise checkpoint them itself.
    pub fn seal_commits(mut self) -> Self {
        self.seal_commits = true;
        self
    }

    /// After a commit of a writer asked to [seal](Writer::seal_commits): the state the
    /// commit left the file in and the committed page hashes, in order. `None` when the
    /// state could not be proved (not WAL mode, another connection committed or held
    /// the write lock right after, no wal-index to read).
    pub fn committed_seal(&self) -> Option<(SourceState, impl Iterator<Item = Result<Hash>> + '_)> {
        let state = self.committed_state?;
        let last = self.last_commit.as_ref()?;
        let io = |e| Error::io(Path::new("committed page hashes"), e);
        Some((
            state,
            last.hashes
                .iter(last.page_count)
                .map(move |h| h.map_err(io)),
        ))
    }

    /// The file's state now, as [`SourceState`] names it (what a snapshot's
    /// [`local_state`](super::Snapshot::local_state) would see), for a file of
    /// `page_count` pages. Only meaningful while this writer holds the write lock
    /// (inside `BEGIN IMMEDIATE`): then no other connection can commit, so the WAL
    /// position and the file stand still but for checkpoints (which move nothing the
    /// state compares but the file's times, and only cost a later proof). `None`
    /// outside WAL mode or when unsure.
    fn state_now(&self, page_count: u32) -> Option<SourceState> {
        if self.journal_mode != Some(JournalMode::Wal) {
            return None;
        }
        let position = if super::wal::holds_no_frames(&self.path, self.page_size) {
            super::wal::FILE_ONLY
        } else {
            super::wal::observe(&self.path, self.page_size)?.position
        };
        let file = self.file.as_ref()?;
        let meta = file.metadata().ok()?;
        SourceState::new(file, &meta, self.page_size, page_count, position)
    }

    /// After a commit that left the file at `data_version` (this connection's, read
    /// inside the committed transaction): checkpoints the commit's frames (WAL mode,
    /// without waiting), then, holding the write lock, checks that no other connection
    /// committed since and reads the state. `None` when it cannot be sure.
    fn state_after_commit(&mut self, data_version: i64, page_count: u32) -> Option<SourceState> {
        let wal = self.journal_mode == Some(JournalMode::Wal);
        if !wal {
            return None;
        }
        // Never wait: a reader or writer in the way only costs the next pull's proof.
        let _ = self.conn().busy_timeout(Duration::ZERO);
        let state = (|| {
            let conn = self.conn();
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .ok()?;
            conn.execute_batch("BEGIN IMMEDIATE").ok()?;
            let now: Option<i64> = conn.query_row("PRAGMA data_version", [], |r| r.get(0)).ok();
            let state = (now == Some(data_version))
                .then(|| self.state_now(page_count))
                .flatten();
            let _ = self.conn().execute_batch("ROLLBACK");
            state
        })();
        let _ = self.conn().busy_timeout(BUSY_TIMEOUT);
        state
    }

    /// After a new file was linked into place: opens it and, holding the write lock,
    /// reads its state, which is the state this writer left it in if the WAL holds no
    /// frame and the file is still the one written, not modified since (`written`, its
    /// facts before the link: a link changes only the ctime). `None` otherwise.
    fn state_after_link(
        &mut self,
        written: &std::fs::Metadata,
        page_count: u32,
    ) -> Option<SourceState> {
        self.connect().ok()?;
        let mode: String = self
            .conn()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .ok()?;
        if !mode.eq_ignore_ascii_case("wal") {
            return None;
        }
        self.journal_mode = Some(JournalMode::Wal);
        let _ = self.conn().busy_timeout(Duration::ZERO);
        let state = (|| {
            self.conn().execute_batch("BEGIN IMMEDIATE").ok()?;
            let state = self
                .state_now(page_count)
                .filter(|s| s.file_only() && s.same_written_file(written));
            let _ = self.conn().execute_batch("ROLLBACK");
            state
        })();
        let _ = self.conn().busy_timeout(BUSY_TIMEOUT);
        state
    }

    /// Makes a committed writer ready for another sync of the same file. `Ok(false)`
    /// when it cannot serve again: it did not commit, or its path now names another
    /// file (replaced or removed); open a new writer then.
    pub fn ready_again(&mut self) -> Result<bool> {
        let same_file = self
            .last_commit
            .as_ref()
            .is_some_and(|c| identity(&self.path) == Some(c.identity));
        if !self.committed || !same_file {
            return Ok(false);
        }
        // From the connection, not the file's header: reading the file through a
        // handle of our own and closing it would drop the connection's locks.
        let conn = self.conn();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(self.sql())?;
        let page_size: u32 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(self.sql())?;
        self.journal_mode = Some(if mode.eq_ignore_ascii_case("wal") {
            JournalMode::Wal
        } else {
            JournalMode::Rollback
        });
        self.page_size = page_size;
        self.page_count = 0;
        self.batch.clear();
        self.page1 = None;
        self.building = None;
        self.created = false;
        self.committed = false;
        self.known_hashes_used = false;
        self.sealed_used = false;
        self.committed_state = None;
        Ok(true)
    }

    /// Whether the last sync took the hashes of the pages held from the previous
    /// commit (no one else had written the file) rather than reading the file.
    pub fn used_known_hashes(&self) -> bool {
        self.known_hashes_used
    }

    /// The hashes of the pages held, if they are exactly those of this writer's last
    /// commit: same size and count, and no other connection has committed since
    /// (checked inside this sync's transaction, so no commit can slip in after).
    fn known_hashes(&mut self) -> Result<Option<&HashSpill>> {
        let Some(last) = self.last_commit.as_ref().filter(|_| self.keep_committed) else {
            return Ok(None);
        };
        if last.page_size != self.page_size || last.page_count != self.page_count {
            return Ok(None);
        }
        let now: i64 = self
            .conn()
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(self.sql())?;
        let last = self.last_commit.as_ref().expect("checked above");
        Ok((now == last.data_version).then_some(&last.hashes))
    }

    fn conn(&self) -> &Connection {
        self.conn
            .as_ref()
            .expect("the connection lives until the writer is dropped")
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> Error + '_ {
        |e| Error::sqlite(&self.path, e)
    }

    /// Rebuilds a replica that holds pages of another size at `page_size`, in place, so
    /// that `sqlite_dbpage` can then write origin pages into it.
    fn change_page_size(&mut self, page_size: u32) -> Result<()> {
        let wal = self.journal_mode == Some(JournalMode::Wal);
        tracing::info!(
            path = %self.path.display(),
            from = self.page_size,
            to = page_size,
            "replica has another page size; rebuilding it with VACUUM first"
        );
        let conn = self.conn();
        if wal {
            // The page size of a WAL database cannot change; leave WAL for the rebuild.
            let mode: String = conn
                .query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))
                .map_err(self.sql())?;
            if !mode.eq_ignore_ascii_case("delete") {
                return Err(Error::sqlite(
                    &self.path,
                    rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                        Some("replica has another page size and is open elsewhere in WAL mode; close other connections and retry".into()),
                    ),
                ));
            }
        }
        conn.pragma_update(None, "page_size", page_size)
            .map_err(self.sql())?;
        conn.execute_batch("VACUUM").map_err(self.sql())?;
        if wal {
            conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))
                .map_err(self.sql())?;
        }
        let now: u32 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(self.sql())?;
        if now != page_size {
            return Err(Error::NotADatabase {
                path: self.path.clone(),
                reason: format!(
                    "could not change its page size from {} to {page_size}",
                    self.page_size
                ),
            });
        }
        self.page_size = page_size;
        Ok(())
    }
}

/// Keeps SQLite's auto-vacuum from moving pages at COMMIT: the writer's pages are the
/// origin's exactly, and auto-vacuum would reorganise them after the digest check.
fn disable_autovacuum_on_commit(conn: &Connection) -> rusqlite::Result<()> {
    unsafe extern "C" fn no_pages(
        _: *mut c_void,
        _: *const c_char,
        _: c_uint,
        _: c_uint,
        _: c_uint,
    ) -> c_uint {
        0
    }
    // SAFETY: the handle is valid for the connection's lifetime; the callback has the
    // signature SQLite documents and no state to free.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_autovacuum_pages(
            conn.handle(),
            Some(no_pages),
            std::ptr::null_mut(),
            None,
        )
    };
    // Not ignored: without the callback a COMMIT could reorganise the pages after the
    // digest check, so a writer that cannot install it must not write.
    if rc == rusqlite::ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rc),
            Some("could not turn off auto-vacuum at commit (sqlite3_autovacuum_pages)".into()),
        ))
    }
}

/// The replica side of a sync, as the engine drives it (`engine/sqlite.rs` implements
/// the engine's page target with these).
impl Writer {
    /// Prepares to hold a database of `page_size`-byte pages (rebuilding one of another
    /// page size first), opens the write transaction, and returns how many pages it
    /// holds (0 when empty or new). A file has no versions: only the page size matters.
    pub fn prepare(&mut self, page_size: u32) -> Result<u32> {
        if self.conn.is_none() {
            if !self.keep_committed {
                self.fresh = Some(Fresh::create(&self.path)?);
                // Nothing is created at the path before the commit links it there.
                self.created = false;
                self.page_size = page_size;
                self.page_count = 0;
                self.building = Some(CacheBuilder::new(
                    self.hash_cache.as_deref(),
                    &self.path,
                    page_size,
                ));
                return Ok(0);
            }
            self.connect()?;
        }
        match self.journal_mode {
            None => {
                // Empty or new: takes the origin's page size.
                self.conn()
                    .pragma_update(None, "page_size", page_size)
                    .map_err(self.sql())?;
                self.page_size = page_size;
            }
            Some(_) if self.page_size != page_size => self.change_page_size(page_size)?,
            Some(_) => {}
        }
        self.conn()
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(self.sql())?;
        let count: u32 = self
            .conn()
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .map_err(self.sql())?;
        let size: u32 = self
            .conn()
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(self.sql())?;
        if size != page_size {
            return Err(Error::NotADatabase {
                path: self.path.clone(),
                reason: format!("page size is {size}, expected {page_size}"),
            });
        }
        // A brand-new database gets page 1 initialised by BEGIN IMMEDIATE; it is not
        // content the origin sent, so it counts as empty.
        self.page_count = if self.journal_mode.is_none() {
            0
        } else {
            count
        };
        if self.page_count == 0 {
            self.building = Some(CacheBuilder::new(
                self.hash_cache.as_deref(),
                &self.path,
                page_size,
            ));
        }
        Ok(self.page_count)
    }

    /// Calls `f` with the number and hash of every page it holds, in page order: from
    /// the last commit's kept hashes when no one else wrote the file since, else read.
    pub fn held_hashes(&mut self, f: &mut dyn FnMut(u32, Hash) -> Result<()>) -> Result<()> {
        if self.page_count == 0 {
            return Ok(());
        }
        let page_count = self.page_count;
        if let Some(kept) = self.known_hashes()? {
            let io = |e| Error::io(Path::new("kept page hashes"), e);
            for (pgno, h) in (1..=page_count).zip(kept.iter(page_count)) {
                f(pgno, h.map_err(io)?)?;
            }
            self.known_hashes_used = true;
            return Ok(());
        }
        if let Some(sealed) = self.sealed.take()
            && sealed.page_size == self.page_size
            && sealed.page_count == page_count
            && self
                .state_now(page_count)
                .is_some_and(|s| s.to_token() == sealed.state)
        {
            // Inside the write transaction: the file is in the state the hashes were
            // true in, and stays so until this sync ends. They must still make the
            // digest they were sealed with, or nothing is written.
            let mut digest = Digest::new(self.page_size, page_count);
            let mut hashes = sealed.hashes;
            for pgno in 1..=page_count {
                let h = hashes.next().unwrap_or_else(|| {
                    Err(Error::io(
                        Path::new("sealed page hashes"),
                        std::io::ErrorKind::UnexpectedEof.into(),
                    ))
                })?;
                digest.push(&h);
                f(pgno, h)?;
            }
            if digest.finish() != Some(sealed.digest) {
                return Err(Error::Verification(format!(
                    "the page hashes kept for {} do not make the digest it was left with; \
                     nothing was written (the next pull reads the file)",
                    self.path.display()
                )));
            }
            self.sealed_used = true;
            return Ok(());
        }
        let mut cache = HashCache::open(
            self.hash_cache.as_deref(),
            &self.path,
            self.page_size,
            self.page_count,
        );
        super::scan::for_each_page(
            self.conn(),
            self.file.as_ref().expect("open while the connection is"),
            &self.path,
            self.page_size,
            self.page_count,
            &mut |pgno, data| f(pgno, cache.hash(pgno, data)),
        )?;
        cache.finish();
        Ok(())
    }

    /// Writes one page (not yet visible); `hash` is its
    /// [`page_hash`](crate::digest::page_hash).
    pub fn write_page(&mut self, pgno: u32, data: Vec<u8>, hash: &Hash) -> Result<()> {
        if pgno == 1 {
            // Page 1 holds the schema cookie. Written now, the next statement would see
            // the cookie change and reload the schema from a half-written database
            // ("malformed"), so page 1 waits and is written last, in `commit`.
            let mut page1 = data;
            // A page 1 SQLite would refuse (no header, journal-mode bytes other than the
            // two legal pairs) is refused here, whoever sent it: the file stays as it was.
            Header::parse(&page1).map_err(|reason| {
                Error::Verification(format!(
                    "the page 1 received is not a valid SQLite header ({reason}); nothing was written"
                ))
            })?;
            if let Some(mode) = self.journal_mode {
                // Keep the replica's own journal mode (file format versions).
                let v = if mode == JournalMode::Wal { 2 } else { 1 };
                page1[18] = v;
                page1[19] = v;
            }
            // Both legal pairs of bytes 18-19 hash alike (see `page_hash`): `hash` holds.
            if let Some(b) = &mut self.building {
                b.page(1, &page1, hash);
            }
            self.page1 = Some(page1);
            return Ok(());
        }
        if let Some(b) = &mut self.building {
            b.page(pgno, &data, hash);
        }
        if let Some(fresh) = &mut self.fresh {
            return fresh.write(pgno, data, self.page_size);
        }
        self.insert_page(pgno, data)
    }

    /// Truncates to `page_count` pages and commits: every change becomes visible at
    /// once. The engine calls it only after checking the result against the origin's
    /// digest; `hashes` are the final page hashes, kept for the next sync when asked
    /// ([`Writer::keep_committed_hashes`]).
    pub fn commit_pages(
        &mut self,
        page_count: u32,
        hashes: &mut dyn Iterator<Item = Result<Hash>>,
    ) -> Result<()> {
        if let Some(mut fresh) = self.fresh.take() {
            let page1 = self
                .page1
                .take()
                .ok_or_else(|| Error::Bug("a new file committed without its page 1".into()))?;
            fresh.write(1, page1, self.page_size)?;
            let written = fresh.commit(&self.path, page_count, self.page_size)?;
            self.committed = true;
            if let Some(b) = self.building.take() {
                b.finish(page_count);
            }
            if self.seal_commits {
                self.last_commit = keep_hashes(hashes).map(|hashes| LastCommit {
                    page_size: self.page_size,
                    page_count,
                    hashes,
                    data_version: 0,
                    identity: (0, 0),
                });
                if self.last_commit.is_some() {
                    self.committed_state = self.state_after_link(&written, page_count);
                }
            }
            return Ok(());
        }
        self.flush()?;
        let page1 = self.page1.take();
        // `self.page_count` is what the replica held; pages written past it only grow it.
        if page_count < self.page_count {
            // sqlite_dbpage's documented truncation: page `page_count + 1` and all
            // after it go at COMMIT, unless this instance writes another page first.
            self.conn()
                .execute(
                    "INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, NULL)",
                    [page_count + 1],
                )
                .map_err(self.sql())?;
        }
        // Page 1 last, and nothing after it but COMMIT: its new schema cookie would make
        // any later statement reload the schema and check its root pages against the
        // page count the btree layer read at BEGIN, which no longer holds here. It goes
        // through a second sqlite_dbpage instance, because a write through the first
        // would cancel the truncation pending there.
        if let Some(page1) = page1 {
            self.conn()
                .execute(
                    "INSERT INTO temp.sqlferry_dbpage(pgno, data) VALUES (1, ?1)",
                    [&page1],
                )
                .map_err(self.sql())?;
        }
        // Read inside the transaction: no other connection can commit between this and
        // COMMIT, and this connection's own commit does not move it.
        let data_version: Option<i64> = if self.keep_committed || self.seal_commits {
            Some(
                self.conn()
                    .query_row("PRAGMA data_version", [], |r| r.get(0))
                    .map_err(self.sql())?,
            )
        } else {
            None
        };
        self.last_commit = None;
        self.conn().execute_batch("COMMIT").map_err(self.sql())?;
        self.committed = true;
        if let (Some(data_version), Some(identity)) = (data_version, identity(&self.path)) {
            // Kept only if every hash could be stored: the next sync scans otherwise.
            self.last_commit = keep_hashes(hashes).map(|hashes| LastCommit {
                page_size: self.page_size,
                page_count,
                hashes,
                data_version,
                identity,
            });
            if self.seal_commits && self.last_commit.is_some() {
                self.committed_state = self.state_after_commit(data_version, page_count);
            }
        }
        if let Some(b) = self.building.take() {
            b.finish(page_count);
        }
        // A new file takes its journal mode from the page 1 just committed; this
        // connection notices on its next transaction, and that moves data_version. Let
        // it notice now, and check the file against the kept hashes inside the same
        // transaction, so the next sync can still trust them.
        if self.journal_mode.is_none()
            && self.last_commit.is_some()
            && let Err(e) = self.settle_new_file()
        {
            tracing::debug!(error = %e, "the new file's hashes are not kept");
            self.last_commit = None;
        }
        Ok(())
    }
}

/// The committed page hashes, in an unlinked temporary file; `None` (logged) when one
/// could not be written.
fn keep_hashes(hashes: &mut dyn Iterator<Item = Result<Hash>>) -> Option<HashSpill> {
    let kept = (|| -> std::io::Result<HashSpill> {
        let mut w = HashSpill::writer()?;
        for h in hashes {
            w.push(&h.map_err(std::io::Error::other)?)?;
        }
        w.finish()
    })();
    kept.map_err(|e| tracing::debug!(error = %e, "could not keep the committed hashes"))
        .ok()
}

impl Writer {
    /// After the first commit into a new file: in one write transaction (no other
    /// connection can commit meanwhile), reads data_version anew and hashes the file;
    /// the kept hashes stay only if the file matches them exactly.
    fn settle_new_file(&mut self) -> Result<()> {
        self.conn()
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(self.sql())?;
        let result = (|| -> Result<bool> {
            let data_version: i64 = self
                .conn()
                .query_row("PRAGMA data_version", [], |r| r.get(0))
                .map_err(self.sql())?;
            let last = self.last_commit.as_ref().expect("checked by the caller");
            let io = |e| Error::io(Path::new("kept page hashes"), e);
            let mut kept = last.hashes.iter(last.page_count);
            let mut cache = HashCache::open(
                self.hash_cache.as_deref(),
                &self.path,
                last.page_size,
                last.page_count,
            );
            let mut same = true;
            super::scan::for_each_page(
                self.conn(),
                self.file.as_ref().expect("open while the connection is"),
                &self.path,
                last.page_size,
                last.page_count,
                &mut |pgno, data| {
                    let h = kept
                        .next()
                        .unwrap_or_else(|| Err(std::io::ErrorKind::UnexpectedEof.into()))
                        .map_err(io)?;
                    same &= cache.hash(pgno, data) == h;
                    Ok(())
                },
            )?;
            cache.finish();
            if same {
                self.last_commit.as_mut().expect("still there").data_version = data_version;
            }
            Ok(same)
        })();
        let end = self.conn().execute_batch("COMMIT").map_err(self.sql());
        match result? {
            true => end,
            false => Err(Error::Verification(
                "the new file does not hold the committed pages".into(),
            )),
        }
    }
}

impl Writer {
    /// Queues a page; full batches go to SQLite in one statement.
    fn insert_page(&mut self, pgno: u32, data: Vec<u8>) -> Result<()> {
        self.batch.push((pgno, data));
        if self.batch.len() == BATCH_PAGES {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the queued pages with one multi-row INSERT: a statement per page costs
    /// more than the page copy itself.
    fn flush(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let rows = vec!["(?, ?)"; self.batch.len()].join(", ");
        let sql = format!("INSERT INTO sqlite_dbpage(pgno, data) VALUES {rows}");
        let batch = std::mem::take(&mut self.batch);
        let params: Vec<&dyn rusqlite::ToSql> = batch
            .iter()
            .flat_map(|(pgno, data)| [pgno as &dyn rusqlite::ToSql, data as &dyn rusqlite::ToSql])
            .collect();
        self.conn()
            .prepare_cached(&sql)
            .and_then(|mut stmt| stmt.execute(params.as_slice()))
            .map_err(self.sql())?;
        self.batch = batch;
        self.batch.clear();
        Ok(())
    }
}

/// A database file that does not exist yet, written whole beside its path and linked
/// into place at commit: no pager, no journal, no page copied into a cache, and nothing
/// at the path until every page is written, synced and checked against the digest.
///
/// The temporary file has one name per destination (`.NAME.sqlferry-new` in the same
/// directory), taken under an exclusive `flock`: a second writer of the same new file
/// is refused while the first runs, and the file a killed writer left is found, by that
/// name, and emptied by the next writer of that path (or removed by [`Writer`]'s drop).
/// Whoever holds the lock checks that the name still names the file it locked, so two
/// writers never share one. Commit hard-links it to the destination, which fails if
/// anything appeared there meanwhile (nothing is overwritten), then removes the name.
struct Fresh {
    file: std::fs::File,
    tmp: PathBuf,
    /// Whether the name is gone (committed): it may name another writer's file now.
    unlinked: bool,
    /// Contiguous pages waiting to be written with one system call: the first page's
    /// number and the pages.
    run: (u32, Vec<Vec<u8>>),
}

/// Pages gathered into one vectored write of a new file (1 MiB of 4 KiB pages).
const FRESH_RUN_PAGES: usize = 256;

impl Fresh {
    /// The temporary file beside `path`.
    fn tmp_path(path: &Path) -> PathBuf {
        let mut name = std::ffi::OsString::from(".");
        name.push(path.file_name().unwrap_or_default());
        name.push(".sqlferry-new");
        path.with_file_name(name)
    }

    fn create(path: &Path) -> Result<Fresh> {
        use std::os::unix::fs::MetadataExt;
        let tmp = Self::tmp_path(path);
        let io = |e| Error::io(&tmp, e);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&tmp)
            // Named after the destination: the directory is what the user chose.
            .map_err(|e| Error::io(path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::InUse(format!(
                    "{} is being written by another sqlferry ({} is locked)",
                    path.display(),
                    tmp.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let ours = file.metadata().map_err(io)?;
        let named = std::fs::metadata(&tmp).map_err(io)?;
        if (ours.dev(), ours.ino()) != (named.dev(), named.ino()) {
            // The writer that held it finished and removed the name in between.
            return Err(Error::InUse(format!(
                "{} was being written by another sqlferry; try again",
                path.display()
            )));
        }
        // What a killed writer left goes now.
        file.set_len(0).map_err(io)?;
        Ok(Fresh {
            file,
            tmp,
            unlinked: false,
            run: (0, Vec::with_capacity(FRESH_RUN_PAGES)),
        })
    }

    /// Queues page `pgno`; a run that is full, or that it does not continue, is written.
    fn write(&mut self, pgno: u32, data: Vec<u8>, page_size: u32) -> Result<()> {
        let (first, pages) = &self.run;
        if !pages.is_empty()
            && (pages.len() == FRESH_RUN_PAGES || *first + pages.len() as u32 != pgno)
        {
            self.flush(page_size)?;
        }
        if self.run.1.is_empty() {
            self.run.0 = pgno;
        }
        self.run.1.push(data);
        Ok(())
    }

    /// Writes the queued run at its place, in as few system calls as it takes.
    fn flush(&mut self, page_size: u32) -> Result<()> {
        use std::io::{IoSlice, Seek, SeekFrom, Write};
        let (first, pages) = &mut self.run;
        if pages.is_empty() {
            return Ok(());
        }
        let io = |e| Error::io(&self.tmp, e);
        let offset = u64::from(*first - 1) * u64::from(page_size);
        self.file.seek(SeekFrom::Start(offset)).map_err(io)?;
        let mut slices: Vec<IoSlice<'_>> = pages.iter().map(|p| IoSlice::new(p)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match self.file.write_vectored(rest) {
                Ok(0) => return Err(io(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(e)),
            }
        }
        drop(slices);
        pages.clear();
        Ok(())
    }

    /// Sizes the file to `page_count` pages, syncs it, and links it to `path`;
    /// returns the file's facts as they were once written, before the link.
    fn commit(
        &mut self,
        path: &Path,
        page_count: u32,
        page_size: u32,
    ) -> Result<std::fs::Metadata> {
        self.flush(page_size)?;
        let io = |e| Error::io(&self.tmp, e);
        self.file
            .set_len(u64::from(page_count) * u64::from(page_size))
            .map_err(io)?;
        self.file.sync_all().map_err(io)?;
        let written = self.file.metadata().map_err(io)?;
        let taken = || {
            Error::InUse(format!(
                "{} was created by another program during the copy; it was left as it is",
                path.display()
            ))
        };
        match std::fs::hard_link(&self.tmp, path) {
            Ok(()) => {
                // Committed: the database is in place whatever follows. A name left
                // behind is emptied by the next writer of this path.
                self.unlinked = true;
                if let Err(e) = std::fs::remove_file(&self.tmp) {
                    tracing::debug!(error = %e, path = %self.tmp.display(), "could not remove the temporary file");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(taken()),
            Err(e) => {
                // A file system without hard links (FAT, some network ones): a rename,
                // which would replace, after checking that nothing is there. Only the
                // moment between the two is unguarded.
                tracing::debug!(error = %e, "no hard link; renaming the new file into place");
                if std::fs::symlink_metadata(path).is_ok() {
                    return Err(taken());
                }
                std::fs::rename(&self.tmp, path).map_err(|e| Error::io(path, e))?;
                self.unlinked = true;
            }
        }
        // The new name, and the old one gone, reach the disk too.
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if let Ok(d) = std::fs::File::open(dir) {
            d.sync_all().map_err(|e| Error::io(dir, e))?;
        }
        Ok(written)
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        // Still ours (the lock is held until the file closes): a failed copy leaves
        // nothing behind. After a commit the name is gone already.
        if !self.unlinked {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the connection rolls back any open transaction; the file handle
        // goes only after it.
        drop(self.conn.take());
        drop(self.file.take());
        // Only a file that is still empty: if another push created and committed the
        // same path meanwhile, it is theirs, not ours to remove.
        let still_empty = std::fs::metadata(&self.path).is_ok_and(|m| m.len() == 0);
        if self.created && !self.committed && still_empty {
            for suffix in ["", "-journal", "-wal", "-shm"] {
                let mut p = self.path.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
        }
    }
}
