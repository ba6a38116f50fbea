//! The store's page bytes: append-only pack files shared by every replica, with one
//! index from page hash to where its bytes are.
//!
//! Layout, under `<store>/pages/`:
//! - `<id>.pack`: page bytes, one after another, nothing else. A pack only grows, and
//!   only by one push at a time: the push holds the pack's exclusive `flock` from its
//!   first page until it has committed or given up.
//! - `index.sqlite`: `packs(id, size)`, the committed length of each pack, and
//!   `pages(hash, pack, offset, len, codec, checksum)`, where each page's bytes are and
//!   in which form: `codec` 0 is the page as it is, 1 one zstd frame of it (a page that
//!   arrived compressed is kept as it came, see `docs/server.md`), 2 a sealed page of
//!   an encrypted replica (`nonce ‖ ciphertext ‖ tag`, keyed by its identity, which
//!   the store cannot recompute; `docs/security.md`). `checksum` is the xxh3-64 of the
//!   entry's stored bytes (8 bytes, little-endian) for every entry written since the
//!   store kept sums; an older sealed entry's is the SHA-256 of its bytes, an older
//!   plain or compressed entry has none. Only the index's small rows go through SQLite;
//!   the page bytes never do. An index made before `codec` or `checksum` existed gains
//!   the column (every old row plain, no checksum) when first opened: no byte moves.
//! - Every read checks what it reads ([`PackFiles::read`]): the stored bytes against
//!   their sum ([`Check`]), before a compressed entry is expanded; an older entry's page
//!   against its hash; a plaintext page 1 always against its hash ([`Loc::for_page`]).
//!   Bytes that fail, and an entry that does not expand to a page, read as damaged. A
//!   page's identity is checked once, when the store takes it (its hash, computed from
//!   the bytes received); the sum then finds any byte changed since, as the hash would,
//!   for a small part of its CPU (docs/performance.md), and the client hashes every page
//!   it receives all the same. `scrub` checks both. A pull reads the entries that lie end to end in a pack
//!   with one read ([`PackFiles::read_raw`] of their span, then [`PackFiles::expand`]
//!   for each compressed one) and checks each entry of it on its own all the same.
//!
//! Invariants:
//! - A page is written once: into a pack, fsynced once per push before the index rows
//!   naming it commit. Bytes past a pack's committed size belong to a push in progress
//!   or to one that died: whoever next takes the pack's lock truncates them (the torn
//!   tail), so a crash leaves no partial version and nothing indexed points there.
//! - Identical pages are stored once in the whole store: a push indexes a page only if
//!   no replica's push indexed it before (two pushes racing with the same new page both
//!   append it; the second's copy stays unindexed, dead bytes).
//! - Index rows are only added, or, for a page found damaged, pointed at new good bytes
//!   by the push that brought them: a reader never sees a row point at bytes that are
//!   not committed.
//! - Lock order: a replica's write lock, then the index's write lock, never the other
//!   way round.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use crate::digest::Hash;
use crate::protocol::compress::Expander;
use crate::{Error, Result};

/// A pack takes new pushes while it is smaller than this; a push never spans packs, so
/// one may end larger.
const PACK_TARGET_BYTES: u64 = 1 << 30;

/// How long a commit waits for another push's commit to the index.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// The page cache of an index connection that reads versions: 256 KiB (a negative
/// `cache_size` is KiB). A pull looks each page up once, at a random leaf: a larger
/// cache buys little and costs every concurrent pull on a server.
pub(super) const READER_CACHE_KIB: i64 = -256;

/// The page cache of a push's index connection: 8 MiB, one per push. Its lookups and
/// inserts land on random leaves, about two index pages read and two written per new
/// page, so it holds what a change of a few thousand pages touches. Each push is a
/// process of its own (or a connection of its own on a server), so the cache starts
/// cold either way: for 2,600 new pages in a 1 GiB or a 4 GiB store, 64 MiB read and
/// wrote exactly what 8 MiB did (docs/performance.md, "The 10 GiB case's 1%").
pub(super) const WRITER_CACHE_KIB: i64 = -8192;

/// The index's page size (a new store's). Entries are keyed by hash, so a push's
/// inserts land on random leaves: each new page dirties about one leaf, written to the
/// WAL at commit and again at the checkpoint. Smaller leaves make that cost smaller:
/// for a 1% change of a 1 GiB database (2,603 new entries among 267,000) the WAL grows
/// by 4.3 MB at 1 KiB against 8.8 MB at SQLite's default 4 KiB, for a 6% larger
/// index and no slower lookups (docs/performance.md). 512 bytes saved less again
/// (3.2 MB) for a 14% larger index and deeper trees. Counted at the disk, where the
/// checkpoint's 1 KiB writes each dirty a 4 KiB page of the OS, no page size wins by
/// much: 17.0, 17.9 and 19.8 MB (WAL and checkpoint) at 1, 2 and 4 KiB for those
/// 2,600 entries among 272,000, and 23.9, 23.1 and 25.8 MB among 1.06 million.
const INDEX_PAGE_SIZE: i64 = 1024;

/// The write buffer of a pack being appended to.
const APPEND_BUFFER_BYTES: usize = 1 << 20;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS packs(
        id INTEGER PRIMARY KEY,
        size INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS pages(
        hash BLOB PRIMARY KEY,
        pack INTEGER NOT NULL,
        offset INTEGER NOT NULL,
        len INTEGER NOT NULL,
        codec INTEGER NOT NULL DEFAULT 0,
        checksum BLOB
    ) WITHOUT ROWID;
";

/// `pages.codec` of an entry that holds the page as it is.
const CODEC_PLAIN: i64 = 0;
/// `pages.codec` of an entry that holds one zstd frame of the page (a ZPAGE's bytes).
const CODEC_ZSTD: i64 = 1;
/// `pages.codec` of a sealed page (an SPAGE's bytes): `checksum` is their SHA-256.
const CODEC_SEALED: i64 = 2;

/// Where a page's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Loc {
    pub pack: i64,
    pub offset: u64,
    pub len: u32,
    /// The bytes are one zstd frame of the page, not the page.
    pub zstd: bool,
    /// A sealed page's entry (codec 2): the store cannot open it to hash the page.
    pub sealed: bool,
    /// How a read checks the entry's bytes.
    pub check: Check,
}

/// How a read checks an entry's bytes. Every entry written since the store kept sums
/// has one ([`Check::Sum`]); older entries are checked as they always were.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Check {
    /// The xxh3-64 of the stored bytes, as written: the store checked the page's
    /// identity when it took the page (its hash, or for a sealed page nothing it can
    /// check), so a read only has to find the same bytes again. Much cheaper than
    /// SHA-256, which was most of a pull's CPU on the server; the client still hashes
    /// every page it receives against the version's page hashes before its digest
    /// check (docs/trust.md).
    Sum(u64),
    /// An older sealed entry: the SHA-256 of its stored bytes.
    Sha(Hash),
    /// An older plain or compressed entry: the page, expanded, hashes to its key.
    Page,
}

/// The checksum of an entry's stored bytes ([`Check::Sum`]).
pub(super) fn sum_of(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

impl Loc {
    /// A new entry of `bytes` at `offset` of pack `pack`, with their sum.
    pub fn of_bytes(pack: i64, offset: u64, bytes: &[u8], zstd: bool, sealed: bool) -> Loc {
        Loc {
            pack,
            offset,
            len: bytes.len() as u32,
            zstd,
            sealed,
            check: Check::Sum(sum_of(bytes)),
        }
    }

    /// The entry's `codec` column.
    pub fn codec(&self) -> i64 {
        match (self.sealed, self.zstd) {
            (true, _) => CODEC_SEALED,
            (false, true) => CODEC_ZSTD,
            (false, false) => CODEC_PLAIN,
        }
    }

    /// The entry as a read of it as page `pgno` checks it: a plaintext page 1 by its
    /// page's hash, whatever its sum. Its hash leaves out the counters SQLite rewrites
    /// on every commit (docs/engine.md), so a change there is no damage; on every other
    /// page, a byte that changed fails its hash and its sum alike.
    pub fn for_page(self, pgno: u32) -> Loc {
        if pgno == 1 && !self.sealed {
            Loc {
                check: Check::Page,
                ..self
            }
        } else {
            self
        }
    }

    /// Whether `stored`, read where this entry is, are its bytes as far as they can be
    /// checked before they are expanded: `None` for an older plain or compressed entry,
    /// which only its page's hash checks.
    pub fn holds(&self, stored: &[u8]) -> Option<bool> {
        match self.check {
            Check::Sum(sum) => Some(stored.len() == self.len as usize && sum_of(stored) == sum),
            Check::Sha(sum) => Some(crate::digest::sha256(stored) == sum),
            Check::Page => None,
        }
    }

    /// Whether a `codec` column names a compressed entry. An unknown codec is read as
    /// plain: its bytes then fail their hash check (damaged), never become a page.
    pub fn is_zstd(codec: i64) -> bool {
        codec == CODEC_ZSTD
    }

    /// The entry an index row (or a push's pending row) describes. `checksum` is 8
    /// bytes (the sum, little-endian) for an entry written since the store kept sums,
    /// 32 (SHA-256) for an older sealed one, none for an older plain or compressed one.
    /// A sealed entry with neither gets a hash no bytes have, so it reads as damaged.
    pub fn from_row(
        pack: i64,
        offset: i64,
        len: u32,
        codec: i64,
        checksum: Option<Vec<u8>>,
    ) -> Loc {
        let sealed = codec == CODEC_SEALED;
        let check = match checksum.as_deref() {
            Some(c) if c.len() == 8 => {
                Check::Sum(u64::from_le_bytes(c.try_into().expect("8 bytes")))
            }
            Some(c) if sealed && c.len() == 32 => Check::Sha(c.try_into().expect("32 bytes")),
            _ if sealed => Check::Sha([0; 32]),
            _ => Check::Page,
        };
        Loc {
            pack,
            offset: offset as u64,
            len,
            zstd: Loc::is_zstd(codec),
            sealed,
            check,
        }
    }

    /// The `checksum` column of the entry.
    pub fn checksum(&self) -> Option<Vec<u8>> {
        match self.check {
            Check::Sum(sum) => Some(sum.to_le_bytes().to_vec()),
            Check::Sha(sum) => Some(sum.to_vec()),
            Check::Page => None,
        }
    }
}

/// Gives an index made before a column existed that column (`decl`: its type and
/// default, which every existing row takes). Two processes may race to add it: the
/// loser finds it there.
fn add_column(conn: &Connection, name: &str, decl: &str) -> rusqlite::Result<()> {
    let has = |conn: &Connection| -> rusqlite::Result<bool> {
        conn.query_row(
            "SELECT count(*) FROM pragma_table_info('pages') WHERE name = ?1",
            [name],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )
    };
    if has(conn)? {
        return Ok(());
    }
    match conn.execute_batch(&format!("ALTER TABLE pages ADD COLUMN {name} {decl}")) {
        Ok(()) => Ok(()),
        Err(_) if has(conn)? => Ok(()),
        Err(e) => Err(e),
    }
}

/// Switches a new index to WAL. SQLite takes the exclusive lock that needs without
/// calling the busy handler, so pushes opening a new store at the same moment were
/// refused with "database is locked" (a daemon's first pushes into a new server, each
/// then retried seconds later): it is tried again, every few milliseconds, for as long
/// as the busy timeout.
fn to_wal(conn: &Connection) -> rusqlite::Result<()> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            done => return done,
        }
    }
}

/// The pages directory of the store rooted at `root`.
pub(super) fn dir_of(root: &Path) -> PathBuf {
    root.join("pages")
}

/// Opens pack `id` in `dir` for reading and appending, creating it if it is new (never
/// truncated: its committed bytes stay); the file and its path.
fn open_pack(dir: &Path, id: i64) -> Result<(File, PathBuf)> {
    let path = pack_path(dir, id);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    Ok((file, path))
}

fn pack_path(dir: &Path, id: i64) -> PathBuf {
    dir.join(format!("{id}.pack"))
}

/// The page index of a store, and the pack files read through it.
pub(super) struct Pages {
    dir: PathBuf,
    index: PathBuf,
    conn: Connection,
    files: PackFiles,
}

/// Pack files opened for reading, by id.
pub(super) struct PackFiles {
    dir: PathBuf,
    files: HashMap<i64, File>,
    /// Expands compressed entries; its zstd state is made for the first one.
    expander: Expander,
    /// A compressed entry's bytes, read before they are expanded.
    raw: Vec<u8>,
}

impl PackFiles {
    fn new(dir: &Path) -> PackFiles {
        PackFiles {
            dir: dir.to_owned(),
            files: HashMap::new(),
            expander: Expander::new(),
            raw: Vec::new(),
        }
    }

    /// Reads the page stored at `loc` into `buf`, expanding a compressed entry. A short
    /// read (bytes gone) is `Ok(false)`: the caller treats it as a missing page. Stored
    /// bytes that fail their entry's check ([`Loc::holds`]), and a compressed entry that
    /// does not expand to a page, leave `buf` empty (`Ok(true)`): damaged. An entry
    /// whose check is its page's hash ([`Check::Page`]) is left for the caller to hash.
    pub fn read(&mut self, loc: Loc, buf: &mut Vec<u8>) -> Result<bool> {
        self.read_keeping(loc, buf, None)
    }

    /// [`PackFiles::read`], and a compressed entry's own bytes into `packed` too (left
    /// empty for a plain entry): what a pull to a peer that agreed to zstd sends as it is.
    pub fn read_keeping(
        &mut self,
        loc: Loc,
        buf: &mut Vec<u8>,
        packed: Option<&mut Vec<u8>>,
    ) -> Result<bool> {
        if !loc.zstd {
            if let Some(p) = packed {
                p.clear();
            }
            let found = self.read_raw(loc, buf)?;
            if found && loc.holds(buf) == Some(false) {
                buf.clear();
            }
            return Ok(found);
        }
        let mut raw = std::mem::take(&mut self.raw);
        let found = self.read_raw(loc, &mut raw);
        let result = match found {
            Ok(true) => {
                if loc.holds(&raw) == Some(false) || self.expander.expand_into(&raw, buf).is_err() {
                    buf.clear();
                }
                Ok(true)
            }
            other => other,
        };
        match packed {
            Some(p) => {
                // The caller keeps the bytes; the scratch is its old buffer.
                std::mem::swap(p, &mut raw);
                self.raw = raw;
            }
            None => self.raw = raw,
        }
        result
    }

    /// Expands the stored bytes `raw` of a compressed entry into `page`, as
    /// [`PackFiles::read`] does: bytes that do not expand to a page leave `page` empty
    /// (they then fail the caller's hash check).
    pub fn expand(&mut self, raw: &[u8], page: &mut Vec<u8>) {
        if self.expander.expand_into(raw, page).is_err() {
            page.clear();
        }
    }

    /// Reads the bytes at `loc` as they are stored into `buf`, never expanded (`loc`
    /// may span several entries that lie end to end: one read for a run of pages);
    /// a short read is `Ok(false)`.
    pub fn read_raw(&mut self, loc: Loc, buf: &mut Vec<u8>) -> Result<bool> {
        let path = pack_path(&self.dir, loc.pack);
        let file = match self.files.entry(loc.pack) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => match File::open(&path) {
                Ok(f) => v.insert(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(Error::io(&path, e)),
            },
        };
        // Only new room is zeroed: the read overwrites what the buffer held (a run's
        // buffer is reused for every run of a pull).
        buf.resize(loc.len as usize, 0);
        match file.read_exact_at(buf, loc.offset) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(Error::io(&path, e)),
        }
    }
}

impl Pages {
    /// Opens (creating if needed) the page index in `dir`, with a page cache of
    /// `cache_kib` (negative: KiB, as SQLite's `cache_size`).
    pub fn open(dir: &Path, cache_kib: i64) -> Result<Pages> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let index = dir.join("index.sqlite");
        let conn = Connection::open(&index).map_err(|e| Error::sqlite(&index, e))?;
        let s = |e| Error::sqlite(&index, e);
        conn.busy_timeout(BUSY_TIMEOUT).map_err(s)?;
        // Takes effect only while the file is empty (a new store); an older store keeps
        // the page size it was made with.
        conn.pragma_update(None, "page_size", INDEX_PAGE_SIZE)
            .map_err(s)?;
        conn.pragma_update(None, "cache_size", cache_kib)
            .map_err(s)?;
        crate::page::kept_wal::keep_wal_on_close(&conn).map_err(s)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(s)?;
        if !mode.eq_ignore_ascii_case("wal") {
            to_wal(&conn).map_err(s)?;
        }
        // The index commit is what makes a push's pages exist: it is fsynced, after
        // the pack bytes it names.
        conn.pragma_update(None, "synchronous", "FULL").map_err(s)?;
        let have: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name IN ('packs', 'pages')",
                [],
                |r| r.get(0),
            )
            .map_err(s)?;
        if have < 2 {
            conn.execute_batch(SCHEMA).map_err(s)?;
        }
        // Older indexes: compressed entries came with `codec` (every old row plain),
        // sealed ones with `checksum` (no old row has one).
        add_column(&conn, "codec", "INTEGER NOT NULL DEFAULT 0").map_err(s)?;
        add_column(&conn, "checksum", "BLOB").map_err(s)?;
        Ok(Pages {
            dir: dir.to_owned(),
            index,
            conn,
            files: PackFiles::new(dir),
        })
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> Error + '_ {
        move |e| Error::sqlite(&self.index, e)
    }

    /// Where the page stored under `hash` is, if any.
    pub fn lookup(&self, hash: &Hash) -> Result<Option<Loc>> {
        self.conn
            .prepare_cached("SELECT pack, offset, len, codec, checksum FROM pages WHERE hash = ?1")
            .and_then(|mut s| {
                s.query_row([&hash[..]], |r| {
                    Ok(Loc::from_row(
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                    ))
                })
                .optional()
            })
            .map_err(self.sql())
    }

    /// Reads the page at `loc` into `buf` (see [`PackFiles::read`]).
    pub fn read(&mut self, loc: Loc, buf: &mut Vec<u8>) -> Result<bool> {
        self.files.read(loc, buf)
    }

    /// Reads the page at `loc` into `buf`, and a compressed entry's bytes into `packed`
    /// (see [`PackFiles::read_keeping`]).
    pub fn read_keeping(
        &mut self,
        loc: Loc,
        buf: &mut Vec<u8>,
        packed: Option<&mut Vec<u8>>,
    ) -> Result<bool> {
        self.files.read_keeping(loc, buf, packed)
    }

    /// The pack files this index reads through (for reads of several entries at once,
    /// [`PackFiles::read_raw`], and expanding what they read, [`PackFiles::expand`]).
    pub fn pack_files(&mut self) -> &mut PackFiles {
        &mut self.files
    }

    /// A second set of pack files to read with, for reading while iterating the index.
    pub fn files(&self) -> PackFiles {
        PackFiles::new(&self.dir)
    }

    /// Starts a read transaction: lookups inside it cost no locking each. What commits
    /// meanwhile is not seen (a page another push indexed is then appended again, and
    /// cut out again at COMMIT, see `begin`).
    pub fn begin_read(&self) -> Result<()> {
        if self.conn.is_autocommit() {
            self.conn
                .execute_batch("BEGIN DEFERRED")
                .map_err(self.sql())?;
        }
        Ok(())
    }

    /// Starts a write transaction on the index (the caller holds its replica's write
    /// lock already, see the lock order above), ending a read transaction first.
    pub fn begin(&self) -> Result<()> {
        self.rollback();
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(self.sql())
    }

    /// Indexes `hash` at `loc` inside the transaction `begin` opened; `replace` points an
    /// existing row at the new bytes (a repair). Returns whether a row was written.
    pub fn insert(&self, hash: &Hash, loc: Loc, replace: bool) -> Result<bool> {
        let sql = if replace {
            "INSERT OR REPLACE INTO pages(hash, pack, offset, len, codec, checksum) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
        } else {
            "INSERT OR IGNORE INTO pages(hash, pack, offset, len, codec, checksum) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
        };
        let n = self
            .conn
            .prepare_cached(sql)
            .and_then(|mut s| {
                s.execute(params![
                    &hash[..],
                    loc.pack,
                    loc.offset as i64,
                    loc.len,
                    loc.codec(),
                    loc.checksum()
                ])
            })
            .map_err(self.sql())?;
        Ok(n > 0)
    }

    /// Ends the transaction `begin` opened: commits it, with `appender`'s pack grown
    /// to its current end (its bytes must be durable already, see [`Appender::sync`]).
    pub fn commit(&self, appender: Option<&mut Appender>) -> Result<()> {
        if let Some(a) = &appender {
            self.conn
                .execute(
                    "UPDATE packs SET size = ?1 WHERE id = ?2",
                    params![a.end as i64, a.id],
                )
                .map_err(self.sql())?;
        }
        self.conn.execute_batch("COMMIT").map_err(self.sql())?;
        if let Some(a) = appender {
            a.start = a.end;
        }
        crate::page::kept_wal::trim_wal(&self.conn, &self.index, BUSY_TIMEOUT);
        Ok(())
    }

    /// Ends the transaction `begin` opened without changing anything.
    pub fn rollback(&self) {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    /// A connection of its own for the packs' committed sizes: `conn` may be inside a
    /// read transaction (see `begin_read`), whose snapshot may predate another push's
    /// commit; a size read from it could cut committed bytes off.
    fn control(&self) -> Result<Connection> {
        let conn = Connection::open(&self.index).map_err(self.sql())?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(self.sql())?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(self.sql())?;
        Ok(conn)
    }

    /// Every committed pack: (id, committed size).
    fn packs(&self, conn: &Connection) -> Result<Vec<(i64, u64)>> {
        let mut stmt = conn
            .prepare("SELECT id, size FROM packs ORDER BY id")
            .map_err(self.sql())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
            .map_err(self.sql())?;
        rows.collect::<rusqlite::Result<_>>().map_err(self.sql())
    }

    fn committed_size(&self, conn: &Connection, id: i64) -> Result<u64> {
        conn.query_row("SELECT size FROM packs WHERE id = ?1", [id], |r| {
            r.get::<_, i64>(0)
        })
        .map(|n| n as u64)
        .map_err(self.sql())
    }

    /// Truncates the torn tails crashed pushes left: bytes past a pack's committed
    /// size, in packs no live push holds. Returns the bytes freed.
    pub fn recover(&self) -> Result<u64> {
        let mut freed = 0;
        let control = self.control()?;
        for (id, _) in self.packs(&control)? {
            let path = pack_path(&self.dir, id);
            let Ok(file) = std::fs::OpenOptions::new().write(true).open(&path) else {
                continue;
            };
            if file.try_lock().is_err() {
                continue; // a live push appends to it
            }
            // Read under the lock: a push that held it may have committed meanwhile.
            let size = self.committed_size(&control, id)?;
            let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
            if len > size {
                file.set_len(size).map_err(|e| Error::io(&path, e))?;
                tracing::info!(pack = %path.display(), bytes = len - size, "truncated what a crashed push left");
                freed += len - size;
            }
        }
        Ok(freed)
    }

    /// Every indexed page, in pack order: `f(hash, loc)`. Streams.
    pub fn for_each(&self, f: &mut dyn FnMut(Hash, Loc) -> Result<()>) -> Result<()> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT hash, pack, offset, len, codec, checksum FROM pages ORDER BY pack, offset",
            )
            .map_err(self.sql())?;
        let mut rows = stmt.query([]).map_err(self.sql())?;
        while let Some(row) = rows.next().map_err(self.sql())? {
            let key: Vec<u8> = row.get(0).map_err(self.sql())?;
            let Ok(hash) = Hash::try_from(key.as_slice()) else {
                continue;
            };
            f(
                hash,
                Loc::from_row(
                    row.get(1).map_err(self.sql())?,
                    row.get(2).map_err(self.sql())?,
                    row.get(3).map_err(self.sql())?,
                    row.get(4).map_err(self.sql())?,
                    row.get(5).map_err(self.sql())?,
                ),
            )?;
        }
        Ok(())
    }

    /// How many pages are indexed.
    pub fn count(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT count(*) FROM pages", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(self.sql())
    }

    /// Starts a collection's mark: an empty temporary table of live page hashes,
    /// spilled to a temporary file past the connection's cache (bounded memory).
    /// A dry run reads in a deferred transaction, so pushes commit meanwhile.
    pub fn mark_begin(&self, dry_run: bool) -> Result<()> {
        self.conn
            .execute_batch(
                "PRAGMA temp_store = FILE;
                 DROP TABLE IF EXISTS temp.live;
                 CREATE TEMP TABLE live(hash BLOB PRIMARY KEY) WITHOUT ROWID;",
            )
            .map_err(self.sql())?;
        self.conn
            .execute_batch(if dry_run {
                "BEGIN DEFERRED"
            } else {
                "BEGIN IMMEDIATE"
            })
            .map_err(self.sql())
    }

    /// Marks `hash` as used by a remaining version.
    pub fn mark(&self, hash: &Hash) -> Result<()> {
        self.conn
            .prepare_cached("INSERT OR IGNORE INTO temp.live(hash) VALUES (?1)")
            .and_then(|mut s| s.execute([&hash[..]]))
            .map(drop)
            .map_err(self.sql())
    }

    /// Deletes (unless `dry_run`) the index rows of the pages not marked, in the
    /// transaction `mark_begin` opened, and commits it: (pages, their stored bytes).
    pub fn sweep(&self, dry_run: bool) -> Result<(u64, u64)> {
        let (count, bytes): (i64, i64) = self
            .conn
            .query_row(
                "SELECT count(*), coalesce(sum(len), 0) FROM pages
                 WHERE hash NOT IN (SELECT hash FROM temp.live)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(self.sql())?;
        if dry_run {
            self.rollback();
        } else {
            self.conn
                .execute(
                    "DELETE FROM pages WHERE hash NOT IN (SELECT hash FROM temp.live)",
                    [],
                )
                .map_err(self.sql())?;
            self.conn.execute_batch("COMMIT").map_err(self.sql())?;
            crate::page::kept_wal::trim_wal(&self.conn, &self.index, BUSY_TIMEOUT);
        }
        Ok((count as u64, bytes as u64))
    }

    /// Ends a collection's mark: the temporary table goes.
    pub fn mark_end(&self) {
        self.rollback();
        let _ = self.conn.execute_batch("DROP TABLE IF EXISTS temp.live");
    }

    /// Gives back to the file system the committed bytes of every pack that no index
    /// row names, by punching holes (live pages keep their offsets); the caller holds
    /// the store's GC lock exclusively, so no push appends and no pull reads. Punching
    /// a hole twice is harmless, so a collection cut short is finished by the next.
    /// Returns the allocated bytes given back (as the file system counts them).
    pub fn reclaim(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let control = self.control()?;
        let packs = self.packs(&control)?;
        let mut stmt = self
            .conn
            .prepare("SELECT pack, offset, len FROM pages ORDER BY pack, offset")
            .map_err(self.sql())?;
        let mut rows = stmt.query([]).map_err(self.sql())?;
        let mut next = rows.next().map_err(self.sql())?.map(|r| {
            (
                r.get::<_, i64>(0).unwrap_or(-1),
                r.get::<_, i64>(1).unwrap_or(0) as u64,
                r.get::<_, i64>(2).unwrap_or(0) as u64,
            )
        });
        let mut given_back = 0u64;
        let mut unsupported = false;
        for (id, size) in packs {
            let path = pack_path(&self.dir, id);
            let file = match std::fs::OpenOptions::new().write(true).open(&path) {
                Ok(f) => Some(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(Error::io(&path, e)),
            };
            let before = match &file {
                Some(f) => f.metadata().map_err(|e| Error::io(&path, e))?.blocks(),
                None => 0,
            };
            let mut at = 0u64;
            let mut punch = |from: u64, to: u64| -> Result<()> {
                let to = to.min(size);
                if let Some(f) = &file
                    && to > from
                    && !unsupported
                    && !punch_hole(f, from, to - from).map_err(|e| Error::io(&path, e))?
                {
                    unsupported = true;
                }
                Ok(())
            };
            // Rows of packs the list does not hold (none should exist) are skipped.
            while let Some((pack, offset, len)) = next {
                if pack > id {
                    break;
                }
                if pack == id {
                    if offset > at {
                        punch(at, offset)?;
                    }
                    at = at.max(offset + len);
                }
                next = rows.next().map_err(self.sql())?.map(|r| {
                    (
                        r.get::<_, i64>(0).unwrap_or(-1),
                        r.get::<_, i64>(1).unwrap_or(0) as u64,
                        r.get::<_, i64>(2).unwrap_or(0) as u64,
                    )
                });
            }
            punch(at, size)?;
            if let Some(f) = &file {
                let after = f.metadata().map_err(|e| Error::io(&path, e))?.blocks();
                given_back += before.saturating_sub(after) * 512;
            }
        }
        if unsupported {
            tracing::warn!(dir = %self.dir.display(), "this file system cannot punch holes in files: the freed pages' bytes stay allocated in the packs (they are no longer indexed, and new pages do not reuse them)");
        }
        Ok(given_back)
    }

    /// Takes a pack to append to: the first one under the target size no live push
    /// holds (its torn tail cut off), else a new one.
    pub fn appender(&self) -> Result<Appender> {
        let control = self.control()?;
        for (id, size) in self.packs(&control)? {
            if size >= PACK_TARGET_BYTES {
                continue;
            }
            let (file, path) = open_pack(&self.dir, id)?;
            if file.try_lock().is_err() {
                continue;
            }
            return Appender::new(file, path, id, self.committed_size(&control, id)?);
        }
        // The new pack's row commits now, before any byte goes into the pack.
        control
            .execute("INSERT INTO packs(size) VALUES (0)", [])
            .map_err(self.sql())?;
        let id = control.last_insert_rowid();
        let (file, path) = open_pack(&self.dir, id)?;
        file.lock().map_err(|e| Error::io(&path, e))?;
        // Once the directory entry is durable, the pack survives a crash with its row.
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Appender::new(file, path, id, 0)
    }
}

/// A pack taken by one push: its lock, and the bytes appended past its committed size.
/// Dropped before [`Pages::commit`], it cuts the pack back to that size.
pub(super) struct Appender {
    id: i64,
    path: PathBuf,
    out: BufWriter<File>,
    /// The pack's committed size: where this push's bytes begin.
    start: u64,
    /// Where the next byte goes.
    end: u64,
}

impl Appender {
    fn new(file: File, path: PathBuf, id: i64, size: u64) -> Result<Appender> {
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len != size {
            // A torn tail a crashed push left (or a pack cut short, whose rows name
            // bytes that are gone: what they name is found missing when read).
            file.set_len(size).map_err(|e| Error::io(&path, e))?;
        }
        let mut out = BufWriter::with_capacity(APPEND_BUFFER_BYTES, file);
        std::io::Seek::seek(&mut out, std::io::SeekFrom::Start(size))
            .map_err(|e| Error::io(&path, e))?;
        Ok(Appender {
            id,
            path,
            out,
            start: size,
            end: size,
        })
    }

    /// The pack's id.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Where the next appended byte goes.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Appends one entry's bytes (a page, or with `zstd` one zstd frame of it, or a
    /// `sealed` page); returns where they are, with their sum.
    pub fn append(&mut self, data: &[u8], zstd: bool, sealed: bool) -> Result<Loc> {
        self.out
            .write_all(data)
            .map_err(|e| Error::io(&self.path, e))?;
        let loc = Loc::of_bytes(self.id, self.end, data, zstd, sealed);
        self.end += data.len() as u64;
        Ok(loc)
    }

    /// Drops the appended pages `keep` says no (in offset order, as `(loc, keep)`) by
    /// moving the kept ones down over them; calls `moved(old, new)` for each kept page
    /// that moved. Only this push's uncommitted bytes are touched.
    pub fn compact(
        &mut self,
        pages: &mut dyn Iterator<Item = Result<(Hash, Loc, bool)>>,
        moved: &mut dyn FnMut(&Hash, Loc) -> Result<()>,
    ) -> Result<()> {
        self.out.flush().map_err(|e| Error::io(&self.path, e))?;
        let mut at = self.start;
        let mut buf = Vec::new();
        for page in pages {
            let (hash, loc, keep) = page?;
            if !keep {
                continue;
            }
            if loc.offset != at {
                buf.resize(loc.len as usize, 0);
                let file = self.out.get_ref();
                file.read_exact_at(&mut buf, loc.offset)
                    .and_then(|()| file.write_all_at(&buf, at))
                    .map_err(|e| Error::io(&self.path, e))?;
                moved(
                    &hash,
                    Loc {
                        pack: self.id,
                        offset: at,
                        ..loc
                    },
                )?;
            }
            at += u64::from(loc.len);
        }
        self.out
            .get_ref()
            .set_len(at)
            .map_err(|e| Error::io(&self.path, e))?;
        std::io::Seek::seek(&mut self.out, std::io::SeekFrom::Start(at))
            .map_err(|e| Error::io(&self.path, e))?;
        self.end = at;
        Ok(())
    }

    /// Makes everything appended durable: one fsync per push.
    pub fn sync(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| Error::io(&self.path, e))?;
        if self.end > self.start {
            self.out
                .get_ref()
                .sync_data()
                .map_err(|e| Error::io(&self.path, e))?;
        }
        Ok(())
    }
}

impl Drop for Appender {
    fn drop(&mut self) {
        if self.end > self.start {
            // Nothing indexed points past `start`: cut the uncommitted bytes off before
            // the lock goes (it goes with the file).
            let _ = self.out.flush();
            let _ = self.out.get_ref().set_len(self.start);
        }
    }
}

/// Punches a hole of `len` bytes at `offset` into `file`, keeping its size: the range
/// reads as zeros and its whole blocks go back to the file system. `Ok(false)` where
/// the file system (or the platform) cannot.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a file descriptor we own, with plain integer arguments.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(false),
        _ => Err(e),
    }
}

/// Without `fallocate`, no hole is punched: the bytes stay allocated.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn punch_hole(_file: &File, _offset: u64, _len: u64) -> std::io::Result<bool> {
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushes into a new store open its page index at the same moment: each must get
    /// it, none a "database is locked" (the switch to WAL takes its lock without
    /// SQLite's busy handler).
    #[test]
    fn many_first_opens_of_a_new_index_at_once_all_succeed() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().expect("temp dir");
            let pages = dir.path().join("pages");
            let start = std::sync::Barrier::new(8);
            std::thread::scope(|s| {
                let opened: Vec<_> = (0..8)
                    .map(|_| {
                        s.spawn(|| {
                            start.wait();
                            Pages::open(&pages, WRITER_CACHE_KIB).map(drop)
                        })
                    })
                    .collect();
                for o in opened {
                    let result = o.join().expect("no panic");
                    assert!(result.is_ok(), "{result:?}");
                }
            });
        }
    }

    /// An index made before sealed entries (no `checksum` column, and before that no
    /// `codec`) opens as it is: it gains the columns, its rows read as the plain and
    /// compressed entries they are, and a sealed entry written next reads back with
    /// its checksum.
    #[test]
    fn an_index_of_an_older_layout_gains_the_columns_and_keeps_its_rows() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pages = dir.path().join("pages");
        std::fs::create_dir_all(&pages).expect("mkdir");
        {
            let conn = Connection::open(pages.join("index.sqlite")).expect("open");
            conn.execute_batch(
                "CREATE TABLE packs(id INTEGER PRIMARY KEY, size INTEGER NOT NULL);
                 CREATE TABLE pages(hash BLOB PRIMARY KEY, pack INTEGER NOT NULL,
                     offset INTEGER NOT NULL, len INTEGER NOT NULL) WITHOUT ROWID;
                 INSERT INTO pages VALUES (X'01', 1, 0, 4096);",
            )
            .expect("old layout");
        }
        let index = Pages::open(&pages, READER_CACHE_KIB).expect("opens");
        let mut old = [0u8; 32];
        old[0] = 1;
        // A key that is no hash is never looked up; the row is the old one.
        let row: (i64, Option<Vec<u8>>) = index
            .conn
            .query_row("SELECT codec, checksum FROM pages", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .expect("the old row");
        assert_eq!(row, (0, None));
        assert_eq!(index.lookup(&old).expect("lookup"), None);

        // An older sealed row (SHA-256), an older compressed row, and a row of today
        // (a sum).
        let sealed = Loc {
            pack: 1,
            offset: 4096,
            len: 4124,
            zstd: false,
            sealed: true,
            check: Check::Sha([9; 32]),
        };
        let zstd = Loc {
            offset: 8220,
            len: 100,
            zstd: true,
            sealed: false,
            check: Check::Page,
            ..sealed
        };
        let summed = Loc::of_bytes(1, 8320, b"stored bytes", false, true);
        index.begin().expect("begin");
        assert!(index.insert(&[4; 32], summed, false).expect("insert"));
        assert!(index.insert(&[2; 32], sealed, false).expect("insert"));
        assert!(index.insert(&[3; 32], zstd, false).expect("insert"));
        index.commit(None).expect("commit");
        assert_eq!(index.lookup(&[2; 32]).expect("lookup"), Some(sealed));
        assert_eq!(index.lookup(&[3; 32]).expect("lookup"), Some(zstd));
        assert_eq!(index.lookup(&[4; 32]).expect("lookup"), Some(summed));
        assert_eq!(sealed.codec(), CODEC_SEALED);
        // A sealed row whose checksum is gone reads as sealed with a checksum no bytes
        // have: damaged, never a plain page.
        index
            .conn
            .execute("UPDATE pages SET checksum = NULL WHERE codec = 2", [])
            .expect("damage");
        let damaged = index.lookup(&[2; 32]).expect("lookup").expect("a row");
        assert_eq!((damaged.sealed, damaged.check), (true, Check::Sha([0; 32])));
    }

    /// Every entry appended now carries the sum of its bytes, and a read checks it: a
    /// flipped byte in the pack, plain or compressed, reads as no bytes (damaged), the
    /// intact entry as itself.
    #[test]
    fn a_read_checks_the_entry_sum_and_finds_a_flipped_byte() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Pages::open(dir.path(), READER_CACHE_KIB).expect("open");
        let page: Vec<u8> = (0..4096u32).map(|i| (i % 13) as u8).collect();
        let frame = zstd::bulk::compress(&page, 1).expect("compress");
        let mut appender = index.appender().expect("appender");
        let plain = appender.append(&page, false, false).expect("append");
        let packed = appender.append(&frame, true, false).expect("append");
        appender.sync().expect("sync");
        index.begin().expect("begin");
        index.commit(Some(&mut appender)).expect("commit");
        assert_eq!(plain.check, Check::Sum(sum_of(&page)));
        assert_eq!(plain.checksum(), Some(sum_of(&page).to_le_bytes().to_vec()));
        drop(appender);
        let mut files = index.files();
        let mut buf = Vec::new();
        for loc in [plain, packed] {
            assert!(files.read(loc, &mut buf).expect("read"));
            assert_eq!(buf, page, "the intact entry reads as the page");
        }
        let path = pack_path(dir.path(), plain.pack);
        let mut bytes = std::fs::read(&path).expect("pack");
        bytes[100] ^= 1;
        bytes[(packed.offset + u64::from(packed.len) / 2) as usize] ^= 1;
        std::fs::write(&path, bytes).expect("damage");
        let mut files = index.files();
        for loc in [plain, packed] {
            assert!(files.read(loc, &mut buf).expect("read"), "found");
            assert!(buf.is_empty(), "damaged bytes read as none");
        }
    }

    /// A new store's index gets small pages; one made by an older sqlferry (SQLite's
    /// default 4 KiB) keeps its page size and its entries.
    #[test]
    fn a_new_index_has_small_pages_and_an_old_one_keeps_its_own() {
        let page_size = |pages: &Pages| -> i64 {
            pages
                .conn
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .expect("page_size")
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let new = Pages::open(&dir.path().join("new"), WRITER_CACHE_KIB).expect("new index");
        assert_eq!(page_size(&new), INDEX_PAGE_SIZE);

        let old_dir = dir.path().join("old");
        std::fs::create_dir_all(&old_dir).expect("mkdir");
        {
            let conn = Connection::open(old_dir.join("index.sqlite")).expect("old index");
            conn.pragma_update(None, "page_size", 4096)
                .expect("page_size");
            conn.pragma_update(None, "journal_mode", "WAL")
                .expect("wal");
            conn.execute_batch(SCHEMA).expect("schema");
            conn.execute(
                "INSERT INTO pages(hash, pack, offset, len) VALUES (?1, 1, 8192, 4096)",
                [&[7u8; 32][..]],
            )
            .expect("entry");
        }
        let old = Pages::open(&old_dir, WRITER_CACHE_KIB).expect("old index opens");
        assert_eq!(page_size(&old), 4096);
        let loc = old.lookup(&[7u8; 32]).expect("lookup").expect("entry kept");
        assert_eq!((loc.pack, loc.offset, loc.len), (1, 8192, 4096));
    }
}
