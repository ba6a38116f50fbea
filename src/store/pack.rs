//! The store's page bytes: append-only pack files shared by every replica, with one
//! index from page hash to where its bytes are.
//!
//! Layout, under `<store>/pages/`:
//! - `<id>.pack`: page bytes, one after another, nothing else. A pack only grows, and
//!   only by one push at a time: the push holds the pack's exclusive `flock` from its
//!   first page until it has committed or given up.
//! - `index.sqlite`: `packs(id, size)`, the committed length of each pack,
//!   `runs(seq, entries)`, the run files of the index (`run-<seq>.run`, see
//!   [`super::runs`]: immutable, sorted by hash, written once by the push that brings
//!   their pages or by a merge of runs), and `entries(hash, pack, offset, len, codec,
//!   checksum)`, the entries a store kept before runs (the table was `pages`; `pages`
//!   is now a view an older sqlferry fails to read, see [`SCHEMA`]). A lookup checks
//!   the write transaction's new entries, the runs newest first, then the table. An
//!   entry says where a page's bytes are and in which form: `codec` 0 is the page as it is, 1 one zstd frame of it (a page that
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
//! - Run files are written only inside a write transaction of the index, fsynced and
//!   renamed into place before the commit that lists them; a run is removed only after
//!   the commit that unlists it (a reader that listed it keeps its open file). A merge
//!   takes the newest runs only, so the newest entry of a hash always wins. Files no
//!   committed list names are what a killed push or merge left: the next write
//!   transaction removes them.
//! - Lock order: a replica's write lock, then the index's write lock, never the other
//!   way round.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use crate::digest::Hash;
use crate::protocol::compress::Expander;
use crate::{Error, Result};

use super::runs::{self, Entry, Run};

/// How often a reader lists the runs again when one it listed was merged away meanwhile.
const REFRESH_TRIES: usize = 8;

/// The error of a run the index lists whose file is gone.
fn missing_run(path: &Path) -> Error {
    Error::io(
        path,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "a run file the page index lists is missing; nothing was changed: the store needs its run files back (from a copy of it)",
        ),
    )
}

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

/// The index's tables. `entries` was called `pages` before run files: an index made
/// then is renamed when first opened ([`Pages::open`]), and `pages` becomes a view no
/// older sqlferry can read (it names a function only a newer one would have), so an
/// older sqlferry fails at the index instead of seeing the table without the runs
/// (where its collection would free the bytes only runs name). The view is made last:
/// SQLite reads every view again when a table is altered, and this one no longer
/// compiles, so a later change of a table has to drop it first.
const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS packs(
        id INTEGER PRIMARY KEY,
        size INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS entries(
        hash BLOB PRIMARY KEY,
        pack INTEGER NOT NULL,
        offset INTEGER NOT NULL,
        len INTEGER NOT NULL,
        codec INTEGER NOT NULL DEFAULT 0,
        checksum BLOB
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS runs(
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        entries INTEGER NOT NULL
    );
    CREATE VIEW IF NOT EXISTS pages AS
        SELECT hash, pack, offset, len, codec, checksum FROM entries
        WHERE this_store_needs_a_newer_sqlferry();
";

/// New entries a push keeps in memory before they go to a run file of their own (about
/// 6 MiB of them): a full push of any size writes its entries in runs of this many.
const SPILL_ENTRIES: usize = 65_536;

/// Runs of one tier (sizes within a factor of 8) merged into one, the newest first: an
/// entry is rewritten once per tier it climbs, about three times in a 10 GiB store.
const FANOUT: usize = 8;

/// The most runs the index keeps: past it, the newest [`FANOUT`] are merged whatever
/// their sizes (a lookup checks each run's filter, in memory, so many small runs cost
/// little, but each is a file and an open descriptor).
const MOST_RUNS: usize = 40;

/// A run's tier: the number of its entries in powers of 8.
fn tier(entries: u64) -> u32 {
    (64 - entries.max(1).leading_zeros()) / 3
}

/// Every entry the index holds: the table's rows that no run holds a newer entry of,
/// and the runs' entries (staged in `temp.staged`, see [`Pages::stage_runs`]).
const ALL_ENTRIES: &str = "
    SELECT hash, pack, offset, len, codec, checksum FROM entries
        WHERE hash NOT IN (SELECT hash FROM temp.staged)
    UNION ALL
    SELECT hash, pack, offset, len, codec, checksum FROM temp.staged";

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
fn add_column(conn: &Connection, table: &str, name: &str, decl: &str) -> rusqlite::Result<()> {
    let has = |conn: &Connection| -> rusqlite::Result<bool> {
        conn.query_row(
            "SELECT count(*) FROM pragma_table_info(?1) WHERE name = ?2",
            [table, name],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )
    };
    if has(conn)? {
        return Ok(());
    }
    match conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {name} {decl}")) {
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

/// The values of an `entries` row (or a staged one): hash, pack, offset, len, codec,
/// checksum.
fn entry_row<'a>(hash: &'a Hash, loc: &Loc) -> impl rusqlite::Params + 'a {
    (
        &hash[..],
        loc.pack,
        loc.offset as i64,
        loc.len,
        loc.codec(),
        loc.checksum(),
    )
}

fn run_path(dir: &Path, seq: i64) -> PathBuf {
    dir.join(format!("run-{seq}.run"))
}

/// The run a file name names (`run-<seq>.run`, or a run being written), if it does.
fn run_seq(name: &str) -> Option<i64> {
    let rest = name.strip_prefix("run-")?;
    let seq = rest
        .strip_suffix(".run")
        .or_else(|| rest.strip_suffix(".run-tmp"))?;
    seq.parse().ok()
}

/// The page index of a store, and the pack files read through it.
pub(super) struct Pages {
    dir: PathBuf,
    index: PathBuf,
    conn: Connection,
    files: PackFiles,
    tiers: RefCell<Tiers>,
    /// New entries kept in memory before they go to a run ([`SPILL_ENTRIES`]).
    spill_at: usize,
}

/// The run files of the index as this connection knows them, and what an open write
/// transaction added.
#[derive(Default)]
struct Tiers {
    /// The runs, oldest first: (seq, run). In a write transaction, its own runs too.
    listed: Vec<(i64, Run)>,
    /// `PRAGMA data_version` when `listed` was read (it changes when another connection
    /// commits).
    seen: Option<i64>,
    /// A write transaction is open ([`Pages::begin`]).
    writing: bool,
    /// The write transaction's new entries not yet in a run.
    added: BTreeMap<Hash, Loc>,
    /// How many of the newest listed runs the write transaction made.
    own: usize,
    /// Run files the write transaction wrote: removed if it does not commit.
    created: Vec<PathBuf>,
    /// Run files the write transaction merged away: removed once it commits.
    obsolete: Vec<PathBuf>,
    /// The listed runs' seqs that `temp.staged` holds the entries of.
    staged: Option<Vec<i64>>,
}

/// A run the index lists whose file is gone: merged away after the snapshot that
/// listed it (read again), or lost.
struct Missing(PathBuf);

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
        if !Pages::is_current(&conn).map_err(s)? {
            Pages::make_current(&conn).map_err(s)?;
        }
        Ok(Pages {
            dir: dir.to_owned(),
            index,
            conn,
            files: PackFiles::new(dir),
            tiers: RefCell::new(Tiers::default()),
            spill_at: SPILL_ENTRIES,
        })
    }

    /// Whether the index has today's layout: `entries`, `runs` and the `pages` view.
    fn is_current(conn: &Connection) -> rusqlite::Result<bool> {
        conn.query_row(
            "SELECT count(*) FROM sqlite_schema
             WHERE (type, name) IN (VALUES ('table', 'packs'), ('table', 'entries'),
                                           ('table', 'runs'), ('view', 'pages'))",
            [],
            |r| r.get::<_, i64>(0).map(|n| n == 4),
        )
    }

    /// Makes a new index, or brings an older one to today's layout, in one transaction
    /// (several processes may open it first at once: the others then find it done).
    /// An older index's rows stay where they are: `pages` gains `codec` (every old row
    /// plain) and `checksum` (none) if it lacks them, and is renamed `entries`.
    fn make_current(conn: &Connection) -> rusqlite::Result<()> {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let done = (|| {
            if Pages::is_current(conn)? {
                return Ok(());
            }
            let old_table: bool = conn.query_row(
                "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'pages'",
                [],
                |r| r.get::<_, i64>(0).map(|n| n > 0),
            )?;
            if old_table {
                add_column(conn, "pages", "codec", "INTEGER NOT NULL DEFAULT 0")?;
                add_column(conn, "pages", "checksum", "BLOB")?;
                conn.execute_batch("ALTER TABLE pages RENAME TO entries")?;
            }
            conn.execute_batch(SCHEMA)
        })();
        match done {
            Ok(()) => conn.execute_batch("COMMIT"),
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> Error + '_ {
        move |e| Error::sqlite(&self.index, e)
    }

    /// Where the page stored under `hash` is, if any: the write transaction's new
    /// entries, then the runs newest first, then the table. Outside a transaction the
    /// runs are listed again first if another connection committed since.
    pub fn lookup(&self, hash: &Hash) -> Result<Option<Loc>> {
        if self.conn.is_autocommit() {
            self.refresh_retrying()?;
        }
        {
            let t = self.tiers.borrow();
            if let Some(loc) = t.added.get(hash) {
                return Ok(Some(*loc));
            }
            for (_, run) in t.listed.iter().rev() {
                if let Some(loc) = run.lookup(hash)? {
                    return Ok(Some(loc));
                }
            }
        }
        self.lookup_table(hash)
    }

    fn lookup_table(&self, hash: &Hash) -> Result<Option<Loc>> {
        self.conn
            .prepare_cached(
                "SELECT pack, offset, len, codec, checksum FROM entries WHERE hash = ?1",
            )
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
        if !self.conn.is_autocommit() {
            return Ok(());
        }
        let mut tries = 0;
        loop {
            self.conn
                .execute_batch("BEGIN DEFERRED")
                .map_err(self.sql())?;
            match self.refresh(false)? {
                Ok(()) => return Ok(()),
                Err(Missing(path)) => {
                    self.rollback();
                    tries += 1;
                    if tries == REFRESH_TRIES {
                        return Err(missing_run(&path));
                    }
                }
            }
        }
    }

    /// Lists the runs again, outside a transaction, as often as a merge that commits
    /// meanwhile removes one just listed.
    fn refresh_retrying(&self) -> Result<()> {
        for _ in 1..REFRESH_TRIES {
            if let Ok(()) = self.refresh(false)? {
                return Ok(());
            }
        }
        self.refresh(true)?
            .map_err(|Missing(path)| missing_run(&path))
    }

    /// Reads the list of runs again if another connection committed since it was read
    /// (or `force`), opening the runs not open yet. A listed run whose file is gone is
    /// `Missing`: the caller reads the list again in a newer snapshot.
    fn refresh(&self, force: bool) -> Result<std::result::Result<(), Missing>> {
        let version = self.data_version()?;
        let mut t = self.tiers.borrow_mut();
        if !force && t.seen == Some(version) {
            return Ok(Ok(()));
        }
        let seqs: Vec<i64> = {
            let mut stmt = self
                .conn
                .prepare_cached("SELECT seq FROM runs ORDER BY seq")
                .map_err(self.sql())?;
            let rows = stmt.query_map([], |r| r.get(0)).map_err(self.sql())?;
            rows.collect::<rusqlite::Result<_>>().map_err(self.sql())?
        };
        let mut open: HashMap<i64, Run> = std::mem::take(&mut t.listed).into_iter().collect();
        t.seen = None;
        let mut listed = Vec::with_capacity(seqs.len());
        for seq in seqs {
            let run = match open.remove(&seq) {
                Some(run) => run,
                None => {
                    let path = run_path(&self.dir, seq);
                    match File::open(&path) {
                        Ok(file) => Run::of_file(&path, file)?,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            t.listed = listed;
                            return Ok(Err(Missing(path)));
                        }
                        Err(e) => return Err(Error::io(&path, e)),
                    }
                }
            };
            listed.push((seq, run));
        }
        t.listed = listed;
        t.seen = Some(version);
        Ok(Ok(()))
    }

    /// `PRAGMA data_version`: it changes when another connection commits. Asked before
    /// every lookup outside a transaction, so its statement is kept.
    fn data_version(&self) -> Result<i64> {
        self.conn
            .prepare_cached("PRAGMA data_version")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(self.sql())
    }

    /// Lists the runs inside a transaction (no one can change them until it ends): a
    /// listed run whose file is gone is an error.
    fn relist(&self) -> Result<()> {
        self.refresh(true)?
            .map_err(|Missing(path)| missing_run(&path))
    }

    /// Inside a write transaction just begun: lists the runs and removes the run files
    /// no committed list names, what a push, merge or collection that died before its
    /// commit left (only a write transaction makes run files). Rolls back on an error.
    fn start_writing(&self) -> Result<()> {
        if let Err(e) = self.relist().and_then(|()| self.remove_orphans()) {
            self.rollback();
            return Err(e);
        }
        let mut t = self.tiers.borrow_mut();
        t.writing = true;
        t.own = 0;
        Ok(())
    }

    /// Starts a write transaction on the index (the caller holds its replica's write
    /// lock already, see the lock order above), ending a read transaction first. It
    /// lists the runs as they are and removes the files of runs that never committed
    /// ([`Pages::start_writing`]).
    pub fn begin(&self) -> Result<()> {
        self.rollback();
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(self.sql())?;
        self.start_writing()
    }

    /// Removes the run files the list does not name (inside a write transaction).
    fn remove_orphans(&self) -> Result<()> {
        let t = self.tiers.borrow();
        let listed: std::collections::HashSet<i64> = t.listed.iter().map(|(s, _)| *s).collect();
        let entries = std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&self.dir, e))?;
            let name = entry.file_name();
            let Some(seq) = name.to_str().and_then(run_seq) else {
                continue;
            };
            let is_tmp = name.to_str().is_some_and(|n| n.ends_with("-tmp"));
            if is_tmp || !listed.contains(&seq) {
                let path = entry.path();
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::info!(file = %path.display(), "removed a run file a push or merge that did not commit left")
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(&path, e)),
                }
            }
        }
        Ok(())
    }

    /// Indexes `hash` at `loc` inside the transaction `begin` opened; `replace` points an
    /// existing row at the new bytes (a repair). Returns whether a row was written.
    ///
    /// An entry with a sum (every new one) goes to the transaction's new entries, and
    /// from there into a run file ([`SPILL_ENTRIES`] at a time, and at commit); an
    /// entry of an older kind into the table, as before runs.
    pub fn insert(&self, hash: &Hash, loc: Loc, replace: bool) -> Result<bool> {
        debug_assert!(
            self.tiers.borrow().writing,
            "insert inside begin()..commit()"
        );
        if Entry::fits(&loc) {
            if !replace && self.lookup(hash)?.is_some() {
                return Ok(false);
            }
            let full = {
                let mut t = self.tiers.borrow_mut();
                t.added.insert(*hash, loc);
                t.added.len() >= self.spill_at
            };
            if full {
                self.spill()?;
            }
            return Ok(true);
        }
        let sql = if replace {
            "INSERT OR REPLACE INTO entries(hash, pack, offset, len, codec, checksum) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
        } else {
            "INSERT OR IGNORE INTO entries(hash, pack, offset, len, codec, checksum) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
        };
        let n = self
            .conn
            .prepare_cached(sql)
            .and_then(|mut s| s.execute(entry_row(hash, &loc)))
            .map_err(self.sql())?;
        Ok(n > 0)
    }

    /// Ends the transaction `begin` opened: commits it, with `appender`'s pack grown
    /// to its current end (its bytes must be durable already, see [`Appender::sync`]).
    ///
    /// The transaction's new entries are written as a run first (fsynced, and listed in
    /// the same commit), and runs are merged as the tiers fill ([`Pages::merge_runs`]):
    /// the merged run is listed, and the runs it replaces unlisted, in the same commit,
    /// their files removed after it. On an error nothing is committed (the caller rolls
    /// back, which removes the run files the transaction wrote).
    pub fn commit(&self, appender: Option<&mut Appender>) -> Result<()> {
        self.spill()?;
        self.merge_runs()?;
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
        self.committed();
        crate::page::kept_wal::trim_wal(&self.conn, &self.index, BUSY_TIMEOUT);
        Ok(())
    }

    /// After a commit of this connection's: the list is as it committed it, and the
    /// runs it merged away go.
    fn committed(&self) {
        let version = self.data_version().ok();
        let mut t = self.tiers.borrow_mut();
        t.writing = false;
        t.own = 0;
        t.created.clear();
        t.seen = version;
        for path in std::mem::take(&mut t.obsolete) {
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(file = %path.display(), error = %e, "could not remove a run merged into another; the next push removes it");
            }
        }
    }

    /// Ends the transaction `begin` opened without changing anything (or a read
    /// transaction): the run files a write transaction wrote go, and the runs are
    /// listed again when next used.
    pub fn rollback(&self) {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        let mut t = self.tiers.borrow_mut();
        if t.writing {
            t.writing = false;
            t.own = 0;
            t.added.clear();
            t.obsolete.clear();
            t.listed.clear();
            t.seen = None;
            t.staged = None;
            for path in std::mem::take(&mut t.created) {
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_file(runs::temporary(&path));
            }
        }
    }

    /// A new row in `runs` for a run about to be written (inside the write
    /// transaction): its seq, never one a committed run had (`AUTOINCREMENT`).
    fn new_run(&self) -> Result<(i64, PathBuf)> {
        self.conn
            .execute("INSERT INTO runs(entries) VALUES (0)", [])
            .map_err(self.sql())?;
        let seq = self.conn.last_insert_rowid();
        let path = run_path(&self.dir, seq);
        self.tiers.borrow_mut().created.push(path.clone());
        Ok((seq, path))
    }

    /// Writes the run at `path` (`seq`'s) of `entries`, at most `most`, and records
    /// how many it holds; the run, opened.
    fn write_run(
        &self,
        seq: i64,
        path: &Path,
        most: u64,
        entries: &mut dyn Iterator<Item = Result<Entry>>,
    ) -> Result<Run> {
        let n = runs::write(path, most, entries)?;
        self.conn
            .execute(
                "UPDATE runs SET entries = ?1 WHERE seq = ?2",
                params![n as i64, seq],
            )
            .map_err(self.sql())?;
        Run::open(path)
    }

    /// Writes the transaction's new entries as a run of their own, listed (not yet
    /// committed) after the others.
    fn spill(&self) -> Result<()> {
        let added = std::mem::take(&mut self.tiers.borrow_mut().added);
        if added.is_empty() {
            return Ok(());
        }
        let (seq, path) = self.new_run()?;
        let most = added.len() as u64;
        let mut entries = added.into_iter().map(|(hash, loc)| Ok(Entry { hash, loc }));
        let run = self.write_run(seq, &path, most, &mut entries)?;
        let mut t = self.tiers.borrow_mut();
        t.listed.push((seq, run));
        t.own += 1;
        Ok(())
    }

    /// Merges runs inside the write transaction, the newest always (a merge of runs
    /// that are not the newest could put an older entry of a hash after a newer one):
    /// the transaction's own runs into one, then while the newest [`FANOUT`] runs are
    /// of one tier, or the index lists more than [`MOST_RUNS`], the newest
    /// [`FANOUT`] into one.
    fn merge_runs(&self) -> Result<()> {
        loop {
            let take = {
                let t = self.tiers.borrow();
                let n = t.listed.len();
                let newest_tier = t.listed.last().map(|(_, r)| tier(r.count()));
                if t.own > 1 {
                    t.own
                } else if n >= FANOUT
                    && t.listed[n - FANOUT..]
                        .iter()
                        .all(|(_, r)| Some(tier(r.count())) == newest_tier)
                    || n > MOST_RUNS
                {
                    FANOUT
                } else {
                    return Ok(());
                }
            };
            self.merge_newest(take)?;
        }
    }

    /// Merges the newest `take` runs into one (inside the write transaction).
    fn merge_newest(&self, take: usize) -> Result<()> {
        let (seq, path) = self.new_run()?;
        let (run, inputs) = {
            let t = self.tiers.borrow();
            let n = t.listed.len();
            let inputs: Vec<&Run> = t.listed[n - take..].iter().map(|(_, r)| r).collect();
            let most = inputs.iter().map(|r| r.count()).sum();
            let run = self.write_run(seq, &path, most, &mut runs::merged(&inputs))?;
            let seqs: Vec<i64> = t.listed[n - take..].iter().map(|(s, _)| *s).collect();
            (run, seqs)
        };
        for s in &inputs {
            self.conn
                .execute("DELETE FROM runs WHERE seq = ?1", [s])
                .map_err(self.sql())?;
        }
        let mut t = self.tiers.borrow_mut();
        let n = t.listed.len();
        let gone: Vec<(i64, Run)> = t.listed.drain(n - take..).collect();
        for (_, r) in gone {
            t.obsolete.push(r.path().to_owned());
        }
        t.listed.push((seq, run));
        t.own = if t.own > 0 { 1 } else { 0 };
        tracing::debug!(
            runs = take,
            entries = t.listed.last().map(|(_, r)| r.count()),
            "merged the newest runs of the page index"
        );
        Ok(())
    }

    /// Fills `temp.staged` with every run's entry (the newest of each hash), for the
    /// walks of the whole index ([`ALL_ENTRIES`]): a temporary table, spilled to a
    /// file past the connection's cache (bounded memory). Done again only when the
    /// runs changed.
    fn stage_runs(&self) -> Result<()> {
        if self.conn.is_autocommit() {
            self.refresh_retrying()?;
        }
        let seqs: Vec<i64> = self.tiers.borrow().listed.iter().map(|(s, _)| *s).collect();
        if self.tiers.borrow().staged.as_ref() == Some(&seqs) {
            return Ok(());
        }
        self.conn
            .execute_batch(
                "PRAGMA temp_store = FILE;
                 DROP TABLE IF EXISTS temp.staged;
                 CREATE TEMP TABLE staged(hash BLOB PRIMARY KEY, pack INTEGER, offset INTEGER,
                     len INTEGER, codec INTEGER, checksum BLOB) WITHOUT ROWID;",
            )
            .map_err(self.sql())?;
        let outer = self.conn.is_autocommit();
        if outer {
            self.conn.execute_batch("BEGIN").map_err(self.sql())?;
        }
        let filled = (|| -> Result<()> {
            let t = self.tiers.borrow();
            let runs: Vec<&Run> = t.listed.iter().map(|(_, r)| r).collect();
            let mut stmt = self
                .conn
                .prepare("INSERT INTO temp.staged VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
                .map_err(self.sql())?;
            for e in runs::merged(&runs) {
                let Entry { hash, loc } = e?;
                stmt.execute(entry_row(&hash, &loc)).map_err(self.sql())?;
            }
            Ok(())
        })();
        if outer {
            match &filled {
                Ok(()) => self.conn.execute_batch("COMMIT").map_err(self.sql())?,
                Err(_) => self.rollback(),
            }
        }
        filled?;
        self.tiers.borrow_mut().staged = Some(seqs);
        Ok(())
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
        self.stage_runs()?;
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT * FROM ({ALL_ENTRIES}) ORDER BY pack, offset"
            ))
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
        self.stage_runs()?;
        self.conn
            .query_row(&format!("SELECT count(*) FROM ({ALL_ENTRIES})"), [], |r| {
                r.get::<_, i64>(0)
            })
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
            .map_err(self.sql())?;
        if dry_run {
            // Counts only: the runs as this transaction sees them.
            if let Err(e) = self.relist() {
                self.rollback();
                return Err(e);
            }
            return Ok(());
        }
        // What a collection or push killed before its commit left goes first.
        self.start_writing()
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
    ///
    /// The runs are rewritten as one run of the marked entries (their list changes in
    /// the same commit); the table loses its unmarked rows, and those a run holds a
    /// newer entry of.
    pub fn sweep(&self, dry_run: bool) -> Result<(u64, u64)> {
        if let Err(e) = self.stage_runs() {
            self.rollback();
            return Err(e);
        }
        let (count, bytes): (i64, i64) = self
            .conn
            .query_row(
                &format!(
                    "SELECT count(*), coalesce(sum(len), 0) FROM ({ALL_ENTRIES})
                     WHERE hash NOT IN (SELECT hash FROM temp.live)"
                ),
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(self.sql())?;
        if dry_run {
            self.rollback();
            return Ok((count as u64, bytes as u64));
        }
        let swept = self.sweep_runs().and_then(|()| {
            self.conn
                .execute(
                    "DELETE FROM entries WHERE hash NOT IN (SELECT hash FROM temp.live)
                        OR hash IN (SELECT hash FROM temp.staged)",
                    [],
                )
                .map_err(self.sql())?;
            self.conn.execute_batch("COMMIT").map_err(self.sql())
        });
        if let Err(e) = swept {
            self.rollback();
            return Err(e);
        }
        self.committed();
        crate::page::kept_wal::trim_wal(&self.conn, &self.index, BUSY_TIMEOUT);
        Ok((count as u64, bytes as u64))
    }

    /// Replaces every run by one of their marked entries (inside the collection's
    /// write transaction).
    fn sweep_runs(&self) -> Result<()> {
        let dead: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM temp.staged WHERE hash NOT IN (SELECT hash FROM temp.live)",
                [],
                |r| r.get(0),
            )
            .map_err(self.sql())?;
        if dead == 0 {
            return Ok(());
        }
        let mut live = self
            .conn
            .prepare("SELECT 1 FROM temp.live WHERE hash = ?1")
            .map_err(self.sql())?;
        self.rewrite_runs(&mut |e| live.exists([&e.hash[..]]).map_err(self.sql()))
    }

    /// Replaces every run by one of their entries that `keep` keeps (inside a write
    /// transaction): listed in its commit, the old runs' files removed after it.
    fn rewrite_runs(&self, keep: &mut dyn FnMut(&Entry) -> Result<bool>) -> Result<()> {
        let (seq, path) = self.new_run()?;
        let run = {
            let t = self.tiers.borrow();
            let inputs: Vec<&Run> = t.listed.iter().map(|(_, r)| r).collect();
            let most = inputs.iter().map(|r| r.count()).sum();
            let mut kept = runs::merged(&inputs).filter_map(|e| match e {
                Ok(e) => match keep(&e) {
                    Ok(true) => Some(Ok(e)),
                    Ok(false) => None,
                    Err(err) => Some(Err(err)),
                },
                Err(err) => Some(Err(err)),
            });
            self.write_run(seq, &path, most, &mut kept)?
        };
        self.conn
            .execute("DELETE FROM runs WHERE seq <> ?1", [seq])
            .map_err(self.sql())?;
        let mut t = self.tiers.borrow_mut();
        let gone: Vec<(i64, Run)> = t.listed.drain(..).collect();
        t.obsolete
            .extend(gone.iter().map(|(_, r)| r.path().to_owned()));
        t.listed.push((seq, run));
        t.staged = None;
        Ok(())
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
        self.stage_runs()?;
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT pack, offset, len FROM ({ALL_ENTRIES}) ORDER BY pack, offset"
            ))
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

    /// Removes the entry of `hash` wherever it is (the table, runs), as damage would:
    /// for tests of what the store does with a page it lost ([`index_entries`]).
    /// Returns whether there was one.
    fn forget(&self, hash: &Hash) -> Result<bool> {
        self.begin()?;
        let forgotten = (|| -> Result<bool> {
            let mut gone = self
                .conn
                .execute("DELETE FROM entries WHERE hash = ?1", [&hash[..]])
                .map_err(self.sql())?
                > 0;
            let held = self
                .tiers
                .borrow()
                .listed
                .iter()
                .any(|(_, r)| r.lookup(hash).is_ok_and(|l| l.is_some()));
            if held {
                gone = true;
                self.rewrite_runs(&mut |e| Ok(e.hash != *hash))?;
            }
            self.conn.execute_batch("COMMIT").map_err(self.sql())?;
            Ok(gone)
        })();
        match forgotten {
            Ok(gone) => {
                self.committed();
                Ok(gone)
            }
            Err(e) => {
                self.rollback();
                Err(e)
            }
        }
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

/// One entry of a store's page index, as [`index_entries`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// The page's hash (a sealed page's identity).
    pub hash: Hash,
    /// The pack file its bytes are in (`<id>.pack`).
    pub pack: i64,
    /// Where in the pack.
    pub offset: u64,
    /// How many bytes.
    pub len: u32,
    /// 0 plain, 1 one zstd frame, 2 sealed.
    pub codec: i64,
    /// The sum (8 bytes) or an older sealed entry's SHA-256 (32), as the table keeps it.
    pub checksum: Option<Vec<u8>>,
}

/// Every entry of the page index of the store rooted at `root`, the table's and the
/// runs' alike, in pack order: for tests that look at where pages are, or damage them.
pub fn index_entries(root: &Path) -> Result<Vec<IndexEntry>> {
    let pages = Pages::open(&dir_of(root), READER_CACHE_KIB)?;
    let mut all = Vec::new();
    pages.for_each(&mut |hash, loc| {
        all.push(IndexEntry {
            hash,
            pack: loc.pack,
            offset: loc.offset,
            len: loc.len,
            codec: loc.codec(),
            checksum: loc.checksum(),
        });
        Ok(())
    })?;
    Ok(all)
}

/// Removes the entry of `hash` from the page index of the store rooted at `root`, as
/// if it were lost: for tests. Returns whether there was one.
pub fn forget_entry(root: &Path, hash: &Hash) -> Result<bool> {
    Pages::open(&dir_of(root), WRITER_CACHE_KIB)?.forget(hash)
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
            .query_row("SELECT codec, checksum FROM entries", [], |r| {
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
            .execute("UPDATE entries SET checksum = NULL WHERE codec = 2", [])
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
            conn.execute_batch(
                "CREATE TABLE packs(id INTEGER PRIMARY KEY, size INTEGER NOT NULL);
                 CREATE TABLE pages(hash BLOB PRIMARY KEY, pack INTEGER NOT NULL,
                     offset INTEGER NOT NULL, len INTEGER NOT NULL,
                     codec INTEGER NOT NULL DEFAULT 0, checksum BLOB) WITHOUT ROWID;",
            )
            .expect("the layout before runs");
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

#[cfg(test)]
mod run_tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn hash(seed: u8) -> Hash {
        crate::digest::sha256(&[seed])
    }

    /// An entry whose place says which operation wrote it.
    fn loc(seed: u8, op: usize) -> Loc {
        Loc::of_bytes(
            op as i64,
            u64::from(seed) * 4096,
            &[seed, op as u8],
            false,
            seed.is_multiple_of(7),
        )
    }

    fn run_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("read dir")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("run-"))
            .collect();
        names.sort();
        names
    }

    fn listed_files(pages: &Pages) -> Vec<String> {
        let mut names: Vec<String> = pages
            .tiers
            .borrow()
            .listed
            .iter()
            .map(|(seq, _)| format!("run-{seq}.run"))
            .collect();
        names.sort();
        names
    }

    fn everything(pages: &Pages) -> BTreeMap<Hash, Loc> {
        let mut all = BTreeMap::new();
        pages
            .for_each(&mut |h, l| {
                assert!(all.insert(h, l).is_none(), "each hash once");
                Ok(())
            })
            .expect("for_each");
        all
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Inserts (seed, replace), then commits.
        Commit(Vec<(u8, bool)>),
        /// Inserts, then rolls back.
        Abandon(Vec<u8>),
        /// Collects: keeps the seeds not divisible by the number.
        Sweep(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => proptest::collection::vec((0u8..120, proptest::bool::weighted(0.1)), 0..12)
                .prop_map(Op::Commit),
            1 => proptest::collection::vec(0u8..120, 1..8).prop_map(Op::Abandon),
            1 => (2u8..6).prop_map(Op::Sweep),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Whatever commits, spills, merges, rollbacks and collections happen, every
        /// lookup (of the writer and of a second connection, as another process) finds
        /// what was committed last for its hash, the walk lists exactly that, and no run
        /// file is left that the index does not list.
        #[test]
        fn the_index_finds_what_committed_through_spills_merges_rollbacks_and_collections(
            ops in proptest::collection::vec(op(), 1..50)
        ) {
            let dir = tempfile::tempdir().expect("temp dir");
            let mut pages = Pages::open(dir.path(), WRITER_CACHE_KIB).expect("open");
            pages.spill_at = 3;
            let reader = Pages::open(dir.path(), READER_CACHE_KIB).expect("open");
            let mut model: BTreeMap<Hash, Loc> = BTreeMap::new();
            for (i, op) in ops.iter().enumerate() {
                match op {
                    Op::Commit(inserts) => {
                        pages.begin().expect("begin");
                        let mut txn = model.clone();
                        for &(seed, replace) in inserts {
                            let h = hash(seed);
                            let wrote = pages.insert(&h, loc(seed, i), replace).expect("insert");
                            prop_assert_eq!(wrote, replace || !txn.contains_key(&h));
                            if wrote {
                                txn.insert(h, loc(seed, i));
                            }
                        }
                        pages.commit(None).expect("commit");
                        model = txn;
                    }
                    Op::Abandon(seeds) => {
                        pages.begin().expect("begin");
                        for &seed in seeds {
                            pages.insert(&hash(seed), loc(seed, i), true).expect("insert");
                        }
                        pages.rollback();
                    }
                    Op::Sweep(m) => {
                        pages.mark_begin(false).expect("mark");
                        for (h, _) in model.iter() {
                            if (0u8..120).any(|s| hash(s) == *h && s % m != 0) {
                                pages.mark(h).expect("mark");
                            }
                        }
                        pages.sweep(false).expect("sweep");
                        pages.mark_end();
                        model.retain(|h, _| (0u8..120).any(|s| hash(s) == *h && s % m != 0));
                        prop_assert_eq!(pages.reclaim().expect("reclaim"), 0);
                    }
                }
                for seed in 0u8..120 {
                    let h = hash(seed);
                    prop_assert_eq!(pages.lookup(&h).expect("lookup"), model.get(&h).copied(), "op {}", i);
                    prop_assert_eq!(reader.lookup(&h).expect("lookup"), model.get(&h).copied(), "op {}", i);
                }
                prop_assert_eq!(everything(&pages), model.clone());
                prop_assert_eq!(pages.count().expect("count"), model.len() as u64);
                prop_assert_eq!(run_files(dir.path()), listed_files(&pages));
                prop_assert!(pages.tiers.borrow().listed.len() <= MOST_RUNS);
            }
        }
    }

    /// A push killed after writing its runs and before its commit: its runs are not
    /// listed, so nothing it wrote is found, and the next write transaction removes
    /// its files.
    #[test]
    fn runs_a_dead_push_left_are_never_read_and_go_at_the_next_push() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pages = Pages::open(dir.path(), WRITER_CACHE_KIB).expect("open");
        pages.begin().expect("begin");
        for seed in 0..4 {
            pages
                .insert(&hash(seed), loc(seed, 0), false)
                .expect("insert");
        }
        pages.commit(None).expect("commit");

        let mut dying = Pages::open(dir.path(), WRITER_CACHE_KIB).expect("open");
        dying.spill_at = 3;
        dying.begin().expect("begin");
        for seed in 10..20 {
            dying
                .insert(&hash(seed), loc(seed, 1), false)
                .expect("insert");
        }
        // The process dies here: SQLite's transaction goes with its connection, no
        // code of ours runs.
        drop(dying);
        assert_eq!(
            run_files(dir.path()).len(),
            4,
            "{:?}",
            run_files(dir.path())
        );

        let next = Pages::open(dir.path(), WRITER_CACHE_KIB).expect("open");
        for seed in 10..20 {
            assert_eq!(next.lookup(&hash(seed)).expect("lookup"), None);
        }
        for seed in 0..4 {
            assert_eq!(
                next.lookup(&hash(seed)).expect("lookup"),
                Some(loc(seed, 0))
            );
        }
        next.begin().expect("begin");
        next.rollback();
        assert!(next.lookup(&hash(0)).expect("lookup").is_some());
        assert_eq!(run_files(dir.path()), listed_files(&next));
        assert_eq!(run_files(dir.path()).len(), 1);
    }

    /// A reader inside a read transaction keeps finding the entries of runs that a
    /// writer merged away and removed meanwhile; its next transaction sees the merge.
    #[test]
    fn a_reader_keeps_reading_the_runs_a_merge_removed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let writer = Pages::open(dir.path(), WRITER_CACHE_KIB).expect("open");
        let commit = |seeds: std::ops::Range<u8>, op: usize| {
            writer.begin().expect("begin");
            for seed in seeds {
                writer
                    .insert(&hash(seed), loc(seed, op), false)
                    .expect("insert");
            }
            writer.commit(None).expect("commit");
        };
        commit(0..5, 0);
        let reader = Pages::open(dir.path(), READER_CACHE_KIB).expect("open");
        reader.begin_read().expect("begin_read");
        let first = run_files(dir.path());
        for op in 1..FANOUT {
            commit(op as u8 * 5..op as u8 * 5 + 5, op);
        }
        assert!(
            run_files(dir.path()).iter().all(|f| !first.contains(f)),
            "the first run was merged away: {:?}",
            run_files(dir.path())
        );
        assert_eq!(run_files(dir.path()).len(), 1);
        for seed in 0..5 {
            assert_eq!(
                reader.lookup(&hash(seed)).expect("lookup"),
                Some(loc(seed, 0))
            );
        }
        reader.rollback();
        for seed in 0..FANOUT as u8 * 5 {
            assert!(reader.lookup(&hash(seed)).expect("lookup").is_some());
        }
    }

    /// An older sqlferry reads `pages`: in a store of today's layout that fails, by
    /// name, instead of finding a table without the runs' entries.
    #[test]
    fn an_older_sqlferry_cannot_read_the_index() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pages = Pages::open(dir.path(), WRITER_CACHE_KIB).expect("open");
        pages.begin().expect("begin");
        pages.insert(&hash(1), loc(1, 0), false).expect("insert");
        pages.commit(None).expect("commit");
        let old = Connection::open(dir.path().join("index.sqlite")).expect("open");
        let e = old
            .query_row(
                "SELECT pack, offset, len, codec, checksum FROM pages WHERE hash = ?1",
                [&hash(1)[..]],
                |r| r.get::<_, i64>(0),
            )
            .expect_err("an older sqlferry's lookup fails");
        assert!(
            e.to_string().contains("this_store_needs_a_newer_sqlferry"),
            "{e}"
        );
    }
}
