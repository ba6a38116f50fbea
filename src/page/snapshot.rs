//! A consistent, read-only view of a live database: the origin side of a sync.
//!
//! Invariants: the database is opened read-only and never written; everything is read
//! inside one read transaction, so every page belongs to the same committed state, WAL
//! pages included (`sqlite_dbpage` reads through the pager). In WAL mode a reader never
//! blocks a writer; in rollback mode the shared lock is held only while the snapshot
//! lives, which is one sync.
//!
//! In WAL mode a scan reads only the pages the WAL names since the hash list's position
//! (`page/wal.rs`, `page/fastcache.rs`; across resets with what a subscriber's follower
//! walked, `page/following.rs`), when it can be sure that is every change, and every
//! page otherwise; either way the hashes describe this snapshot's state.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use std::cell::RefCell;

use super::fastcache::{FileId, HashList, ListWriter, Stamp, Written};
use super::hashcache::HashCache;
use super::state::SourceState;
use super::wal::{self, Position};
use super::{Header, JournalMode};
use crate::digest::{
    Digest, HASH_BYTES, Hash, chunk_count, chunk_pages, lock_byte_page, page_hash, sha256,
};
use crate::{Error, Result};

/// How long a snapshot waits for a writer holding an exclusive lock (rollback mode).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Pages read per `sqlite_dbpage` point query batch are cached by SQLite itself; keep its
/// page cache small so memory does not grow with the database.
const CACHE_KIB: i64 = 2048;

/// The most of the file a check maps into memory; past it SQLite reads. Mapped pages
/// are the page cache's, but they count in the process's resident size for as long as
/// the map lives, so the map is capped: with 2 GiB a check of a 1 GiB database showed
/// 1,051 MiB resident (8.8 MiB of it the process's own memory), against invariant 3's
/// "memory does not grow with database size". With 48 MiB a full copy of the 216 MB
/// benchmark database takes the same time (0.253 s, median of 7, against 0.253 s
/// mapped whole) and a 1 GiB one peaks at 69 MiB resident.
const CHECK_MMAP_BYTES: i64 = 48 << 20;

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
    /// The database file's identity.
    id: Option<FileId>,
    /// In WAL mode, a point of the WAL this snapshot contains every frame up to
    /// (`None`: not known, and every scan reads every page).
    pinned: Option<Position>,
    /// Whether the WAL was seen at `pinned` both before and after the read transaction
    /// started: then the snapshot holds exactly the frames up to it.
    exact: bool,
    /// The state this snapshot holds, when it holds exactly the frames up to `pinned`.
    state: Option<SourceState>,
    /// [`Snapshot::local_state`].
    local_state: Option<SourceState>,
    /// In WAL mode, when the database file was last written, read after the read
    /// transaction started, with the WAL generation then ([`Written`]).
    written: Option<(Written, [u32; 2])>,
    /// How the next [`Snapshot::hash_pages`] learns the pages, once decided.
    plan: RefCell<Option<Plan>>,
    /// Whether a scan that reads every page from the file runs `PRAGMA quick_check`
    /// beside it ([`Snapshot::check_beside_scan`]).
    check_beside: bool,
    /// The answer of `PRAGMA quick_check` run beside a scan, for the next
    /// [`Snapshot::quick_check`].
    checked: RefCell<Option<Result<Vec<String>>>>,
    /// The structural check of the changed pages the next scan reads, on the bytes it
    /// reads ([`Snapshot::check_in_pass`]).
    pass_check: RefCell<Option<PassCheck>>,
}

/// What the structural check of the changed pages found during a scan that follows the
/// WAL, and whether it saw every one of them.
struct PassCheck {
    /// The changed pages to check (the lock-byte page is never read).
    expected: u32,
    /// The changed pages checked so far.
    seen: u32,
    /// The problems found.
    problems: Vec<String>,
}

/// How a scan learns the pages' hashes.
enum Plan {
    /// From the WAL hash list, reading only the pages in `changed` (a bit per page), the
    /// ones the WAL names after the list's position.
    Follow(Follow),
    /// By reading every page.
    Scan,
}

/// A scan that follows the WAL: the list, the pages to read, and the list's update as
/// it is made, chunk by chunk.
struct Follow {
    list: HashList,
    changed: Vec<u64>,
    count: u32,
    /// The new chunk hashes: the list's for a chunk no page of which changed, `None`
    /// for one not hashed yet ([`Follow::touched`]).
    table: Vec<Option<Hash>>,
    /// Pages whose hash differs from the list's (or that it has none of).
    differ: u32,
}

impl Follow {
    fn new(list: HashList, changed: Vec<u64>, count: u32, page_count: u32) -> Follow {
        let mut f = Follow {
            list,
            changed,
            count,
            table: Vec::new(),
            differ: 0,
        };
        f.table = (0..chunk_count(page_count))
            .map(|idx| match f.touched(idx, page_count) {
                true => None,
                false => Some(f.list.table()[idx as usize]),
            })
            .collect();
        f
    }

    /// Whether chunk `idx` must be hashed: a page of it changed, or the list's chunk
    /// covers other pages (the database grew or shrank there, or the list has no such
    /// chunk).
    fn touched(&self, idx: u32, page_count: u32) -> bool {
        let pages = chunk_pages(idx, page_count);
        chunk_pages(idx, self.list.stamp.page_count) != pages
            || crate::digest::any_page_set(&self.changed, pages)
    }
}

/// More changed pages than one in this many and a push reads the whole file instead:
/// reading in large blocks is faster than many point reads, and the list of changed
/// hashes stays small.
const FOLLOW_MAX_SHARE: u32 = 16;

/// The bytes of a whole chunk of page hashes.
const CHUNK_BYTES: usize = crate::digest::CHUNK_PAGES as usize * HASH_BYTES;

fn is_set(bits: &[u64], pgno: u32) -> bool {
    let i = (pgno - 1) as usize;
    bits[i / 64] & (1 << (i % 64)) != 0
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
        let wal_mode = header.journal_mode == JournalMode::Wal;
        let before = wal_mode
            .then(|| wal::observe(path, header.page_size))
            .flatten();
        let no_frames_before = wal_mode && wal::holds_no_frames(path, header.page_size);
        let conn = Self::begin(path).map_err(sql)?;
        // No committed frame before the read transaction started and none after: the
        // snapshot holds the file alone (a writer that committed in between left
        // frames, or, if it checkpointed them and went, wrote the file: its times).
        let file_only = no_frames_before && wal::holds_no_frames(path, header.page_size);
        // The snapshot holds every frame `before` counted unless the WAL was reset in
        // between, which changes its salts (see `page/wal.rs`).
        let after = before.and_then(|_| wal::observe(path, header.page_size));
        let (pinned, exact) = match (before, after) {
            (Some(b), Some(a))
                if a.position.salt == b.position.salt && a.position.frame >= b.position.frame =>
            {
                (Some(b.position), a.position == b.position)
            }
            _ => (None, false),
        };
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
        let pinned = pinned.filter(|_| page_size == header.page_size);
        // The file's ctime, then the wal-index's backfill count: in that order (see
        // `fastcache::Written`).
        let written = pinned.and_then(|_| {
            use std::os::unix::fs::MetadataExt;
            let meta = file.metadata().ok()?;
            let ctime = (meta.ctime(), u32::try_from(meta.ctime_nsec()).ok()?);
            let now = wal::observe(path, page_size)?;
            let written = Written {
                ctime,
                backfilled: now.backfilled,
            };
            Some((written, now.position.salt))
        });
        // Taken inside the read transaction, from the handle kept with it.
        let state = match (pinned, exact) {
            (Some(position), true) => file
                .metadata()
                .ok()
                .and_then(|m| SourceState::new(&file, &m, page_size, page_count, position)),
            _ => None,
        };
        let local_state = match state {
            Some(s) if !s.file_only() => Some(s),
            _ if file_only && page_size == header.page_size => file
                .metadata()
                .ok()
                .and_then(|m| SourceState::new(&file, &m, page_size, page_count, wal::FILE_ONLY)),
            _ => None,
        };
        Ok(Snapshot {
            conn,
            path: path.to_owned(),
            page_size,
            page_count,
            journal_mode: header.journal_mode,
            hash_cache: super::hashcache::default_dir(),
            id: FileId::of(&file),
            file,
            pinned,
            exact,
            state,
            local_state,
            written,
            plan: RefCell::new(None),
            check_beside: false,
            checked: RefCell::new(None),
            pass_check: RefCell::new(None),
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
        self.plan = RefCell::new(None);
        self
    }

    /// The file this snapshot reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state this snapshot sees, in constant-size facts (the database file's
    /// identity, size and times, the WAL position), when it is a WAL database whose
    /// snapshot holds exactly the frames up to a position the wal-index named; `None`
    /// otherwise (rollback mode, no wal-index, a writer committing while it opened).
    /// Two snapshots with the same state see the same database ([`SourceState`]).
    pub fn state(&self) -> Option<SourceState> {
        self.state
    }

    /// The state this snapshot sees as a pull's writer of the same file names it
    /// (`Writer::state`): [`Snapshot::state`] when the WAL holds frames, and, when it
    /// holds none (checkpointed and truncated, or deleted by the last connection to
    /// close), the file's facts alone. `None` in rollback mode, or when unsure. What a
    /// pull compares with the seal its last sync left (docs/engine.md, "A pull that
    /// reads what changed").
    pub fn local_state(&self) -> Option<SourceState> {
        self.local_state
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
        if let Some(answer) = self.checked.borrow_mut().take() {
            return answer;
        }
        self.check("PRAGMA quick_check")
    }

    /// Lets the next scan that reads every page straight from the file (no WAL frame
    /// names a page: the WAL is empty or gone, or the database is in rollback mode)
    /// run `PRAGMA quick_check` on this snapshot's connection, on a second thread, at
    /// the same time; the next [`Snapshot::quick_check`] then gives its answer instead
    /// of checking again. It is the same check of the same read transaction, only
    /// sooner: a local full copy otherwise runs it after its last page, alone on one
    /// core while the other waits.
    pub fn check_beside_scan(&mut self) {
        self.check_beside = true;
    }

    /// When the next scan [`follows_wal`](Snapshot::follows_wal): the problems the
    /// structural check of the pages it reads finds (empty: none). `None` when it reads
    /// every page, and only `PRAGMA quick_check` can say.
    pub fn check_changed_pages(&self) -> Result<Option<Vec<String>>> {
        let Some(pages) = self.changed_pages() else {
            return Ok(None);
        };
        let mut buf = Vec::with_capacity(self.page_size as usize);
        let lock_page = lock_byte_page(self.page_size);
        let mut problems = Vec::new();
        for pgno in pages.into_iter().filter(|&p| p != lock_page) {
            super::scan::read_page(&self.conn, &self.path, pgno, self.page_size, &mut buf)?;
            problems.extend(super::btree::check_page(pgno, &buf, self.page_count));
        }
        Ok(Some(problems))
    }

    /// When the next scan [`follows_wal`](Snapshot::follows_wal): arms the structural
    /// check of the pages it reads because the WAL names them, done on the bytes the
    /// scan reads anyway (so each changed page is read once, not once to check and again
    /// to hash and send), and answers `true`; [`Snapshot::pass_check`] gives the verdict
    /// after the scan. `false` when the scan reads every page: only `PRAGMA quick_check`
    /// can say then.
    pub fn check_in_pass(&self) -> bool {
        let Some(pages) = self.changed_pages() else {
            return false;
        };
        let lock_page = lock_byte_page(self.page_size);
        let expected = pages.into_iter().filter(|&p| p != lock_page).count() as u32;
        *self.pass_check.borrow_mut() = Some(PassCheck {
            expected,
            seen: 0,
            problems: Vec::new(),
        });
        true
    }

    /// The verdict of the check [`Snapshot::check_in_pass`] armed, once: `None` when
    /// none was armed; `Some(Ok(()))` when the scan checked every changed page and found
    /// nothing wrong; `Some(Err(why))` when it found a problem, or did not see every
    /// changed page (a scan that ended early, or read the file another way): the full
    /// `quick_check` must decide then.
    pub fn pass_check(&self) -> Option<std::result::Result<(), String>> {
        let check = self.pass_check.borrow_mut().take()?;
        Some(match check.problems.first() {
            Some(problem) => Err(problem.clone()),
            None if check.seen != check.expected => Err(format!(
                "the scan checked {} of the {} changed pages",
                check.seen, check.expected
            )),
            None => Ok(()),
        })
    }

    /// The first problem the check [`Snapshot::check_in_pass`] armed has found so far,
    /// without taking its verdict: what a push that failed mid-way asks, to report a
    /// damaged LOCAL before anything else.
    pub fn pass_problem(&self) -> Option<String> {
        self.pass_check
            .borrow()
            .as_ref()
            .and_then(|c| c.problems.first().cloned())
    }

    /// The lines a checking pragma answers.
    fn check(&self, pragma: &str) -> Result<Vec<String>> {
        run_check(&self.conn, &self.path, pragma)
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
    /// in page order, and with the page's bytes too for pages after `with_data_after`
    /// that were read: on a WAL database whose hash list is current, only the pages the
    /// WAL names since are read, and the others come without their bytes (`None`; the
    /// caller reads them with [`Snapshot::read_page`] if it needs them). Otherwise every
    /// page is read, and unchanged pages take their hash from the page-hash cache.
    pub fn hash_pages(&mut self, with_data_after: u32, f: &mut HashedPageFn<'_>) -> Result<()> {
        self.decide();
        let plan = self.plan.take().unwrap_or(Plan::Scan);
        match plan {
            Plan::Follow(mut follow) => {
                let result = (0..chunk_count(self.page_count)).try_for_each(|idx| {
                    self.follow_chunk(&mut follow, idx, with_data_after, f)
                        .map(drop)
                });
                match result {
                    Ok(()) => self.finish_follow(follow),
                    Err(e) => {
                        follow.list.abandon();
                        Err(e)
                    }
                }
            }
            Plan::Scan => self.scan(with_data_after, f),
        }
    }

    /// Whether the next scan reads only the pages the WAL names (a hash list current
    /// for this file was found): then [`Snapshot::changed_pages`] are the pages read.
    pub fn follows_wal(&self) -> bool {
        self.decide();
        matches!(*self.plan.borrow(), Some(Plan::Follow(_)))
    }

    /// The pages the next scan reads because the WAL names them, when it
    /// [`follows_wal`](Snapshot::follows_wal); `None` when it reads every page.
    pub fn changed_pages(&self) -> Option<Vec<u32>> {
        self.decide();
        match &*self.plan.borrow() {
            Some(Plan::Follow(follow)) => {
                Some(crate::digest::pages_set(&follow.changed, self.page_count).collect())
            }
            _ => None,
        }
    }

    /// Decides, once per scan, how the next scan learns the pages.
    fn decide(&self) {
        if self.plan.borrow().is_none() {
            let plan = self.plan_follow().unwrap_or(Plan::Scan);
            if let Plan::Scan = plan {
                tracing::debug!(path = %self.path.display(), "origin reads every page");
            }
            *self.plan.borrow_mut() = Some(plan);
        }
    }

    /// The follow plan, when the WAL says for sure which pages changed since the hash
    /// list's position (reasoning in `page/wal.rs` and docs/engine.md).
    fn plan_follow(&self) -> Option<Plan> {
        let (dir, pinned, id) = (self.hash_cache.as_deref()?, self.pinned?, self.id?);
        let list = HashList::load(dir, &self.path, id, self.page_size)?;
        let from = list.stamp.position;
        let (written, salt_now) = self.written?;
        if !list.stamp.written.explains(from.salt, written, salt_now) {
            // The file was written since the list was made, and not by a checkpoint:
            // the WAL cannot say what changed.
            return None;
        }
        if from.salt == pinned.salt && from.frame > pinned.frame {
            // The list is of a later state than this snapshot (another push's).
            return None;
        }
        let pages = if from == pinned && self.exact {
            // The WAL has not moved since the list was made: nothing changed.
            Vec::new()
        } else {
            // What a subscriber's follower walked since the list's position, if one
            // did; the walk goes on from where it ended.
            let (mut pages, start) =
                super::following::since(dir, &self.path, id, from).unwrap_or((Vec::new(), from));
            let walk = wal::walk_since(&self.path, self.page_size, start)?;
            // The walk must have reached the snapshot's generation and its frames.
            if walk.salt != pinned.salt || walk.last < pinned.frame {
                return None;
            }
            // No reset while walking: the frames read were the generation's own.
            let now = wal::observe(&self.path, self.page_size)?;
            if now.position.salt != pinned.salt {
                return None;
            }
            pages.extend(walk.pages);
            pages
        };
        let mut changed = vec![0u64; (self.page_count as usize).div_ceil(64)];
        let mut set = |p: u32| {
            if (1..=self.page_count).contains(&p) {
                let i = (p - 1) as usize;
                changed[i / 64] |= 1 << (i % 64);
            }
        };
        // Page 1 always: it is small, and it holds the header the check reads.
        set(1);
        pages.into_iter().for_each(&mut set);
        (list.stamp.page_count + 1..=self.page_count).for_each(set);
        let count = changed.iter().map(|w| w.count_ones()).sum::<u32>();
        if count > (self.page_count / FOLLOW_MAX_SHARE).max(64) {
            return None;
        }
        Some(Plan::Follow(Follow::new(
            list,
            changed,
            count,
            self.page_count,
        )))
    }

    /// Reads every page (fingerprint cache for the hashes), and leaves a hash list true
    /// at the pinned WAL position.
    fn scan(&mut self, with_data_after: u32, f: &mut HashedPageFn<'_>) -> Result<()> {
        let mut cache = HashCache::open(
            self.hash_cache.as_deref(),
            &self.path,
            self.page_size,
            self.page_count,
        );
        let mut list = match (&self.hash_cache, self.pinned, self.id) {
            (Some(dir), Some(_), Some(_)) => ListWriter::new(dir, &self.path),
            _ => None,
        };
        let mut each = |pgno, data: &[u8]| {
            let hash = cache.hash(pgno, data);
            if let Some(w) = &mut list
                && w.push(&hash).is_err()
            {
                list = None;
            }
            f(pgno, hash, (pgno > with_data_after).then_some(data))
        };
        if std::mem::take(&mut self.check_beside) {
            let path = self.path.clone();
            let (scanned, checked) = super::scan::for_each_page_beside(
                &self.conn,
                &self.file,
                &self.path,
                self.page_size,
                self.page_count,
                &mut each,
                move |conn| run_check(conn, &path, "PRAGMA quick_check"),
            );
            *self.checked.borrow_mut() = checked;
            scanned?;
        } else {
            super::scan::for_each_page(
                &self.conn,
                &self.file,
                &self.path,
                self.page_size,
                self.page_count,
                &mut each,
            )?;
        }
        tracing::debug!(
            path = %self.path.display(),
            pages = self.page_count,
            cached = cache.hits,
            "origin hashed"
        );
        cache.finish();
        if let (Some(w), Some(pinned), Some(id), Some((written, _))) =
            (list, self.pinned, self.id, self.written)
        {
            w.finish(id, self.page_size, self.page_count, pinned, written);
        }
        Ok(())
    }

    /// Calls `f` with every page of chunk `idx`, in order: its hash from the list when
    /// the WAL names no change to it and the list's chunk of it holds, read and hashed
    /// (bytes passed on after `with_data_after`) otherwise. Returns the chunk's hash; a
    /// chunk whose entries differ from the list's is written to the list at once (until
    /// the list is sealed, that chunk fails its check, which only costs a read).
    fn follow_chunk(
        &mut self,
        follow: &mut Follow,
        idx: u32,
        with_data_after: u32,
        f: &mut HashedPageFn<'_>,
    ) -> Result<Hash> {
        let io = |e: std::io::Error| Error::io(&self.path, e);
        let pages = chunk_pages(idx, self.page_count);
        let first = *pages.start();
        let mut entries = Vec::with_capacity(CHUNK_BYTES);
        // The list's entries of this chunk, if it has the chunk and it holds; pages
        // past them (the list's chunk was shorter) are read.
        let len = pages.end() - first + 1;
        let held = match follow.list.read_chunk(idx, &mut entries).map_err(io)? {
            // The list's chunk may be longer (the database shrank): its first pages.
            true => len.min((entries.len() / HASH_BYTES) as u32),
            false => 0,
        };
        entries.truncate(held as usize * HASH_BYTES);
        if held == 0 && idx < chunk_count(follow.list.stamp.page_count) {
            tracing::debug!(path = %self.path.display(), chunk = idx, "a chunk of the WAL hash list does not hold: its pages are read");
        }
        let lock_page = lock_byte_page(self.page_size);
        let mut buf = Vec::with_capacity(self.page_size as usize);
        let mut differ = false;
        for pgno in pages.clone() {
            let at = (pgno - first) as usize * HASH_BYTES;
            let listed = pgno - first < held;
            if listed && !is_set(&follow.changed, pgno) {
                let h: Hash = entries[at..at + HASH_BYTES].try_into().expect("32 bytes");
                f(pgno, h, None)?;
                continue;
            }
            if pgno == lock_page {
                buf.clear();
                buf.resize(self.page_size as usize, 0);
            } else {
                super::scan::read_page(&self.conn, &self.path, pgno, self.page_size, &mut buf)?;
            }
            if pgno != lock_page
                && is_set(&follow.changed, pgno)
                && let Some(check) = self.pass_check.get_mut()
            {
                check.seen += 1;
                check
                    .problems
                    .extend(super::btree::check_page(pgno, &buf, self.page_count));
            }
            let h = page_hash(pgno, &buf);
            if !listed {
                entries.resize(at + HASH_BYTES, 0);
            }
            if !listed || entries[at..at + HASH_BYTES] != h {
                entries[at..at + HASH_BYTES].copy_from_slice(&h);
                differ = true;
                follow.differ += 1;
            }
            f(pgno, h, (pgno > with_data_after).then_some(&buf[..]))?;
        }
        let hash = match (differ, follow.table[idx as usize]) {
            (false, Some(known)) => known,
            _ => sha256(&entries),
        };
        if follow.list.table().get(idx as usize) != Some(&hash) || held != len {
            follow.list.write_chunk(idx, &entries);
        }
        follow.table[idx as usize] = Some(hash);
        Ok(hash)
    }

    /// Seals the list's update at the pinned position, once every chunk that had to be
    /// hashed was.
    fn finish_follow(&self, follow: Follow) -> Result<()> {
        let (Some(pinned), Some(id), Some((written, _))) = (self.pinned, self.id, self.written)
        else {
            return Err(Error::Bug("a WAL plan without a WAL position".into()));
        };
        tracing::debug!(
            path = %self.path.display(),
            pages = self.page_count,
            read = follow.count,
            differ = follow.differ,
            "origin followed the WAL"
        );
        let Some(table) = follow.table.iter().copied().collect::<Option<Vec<Hash>>>() else {
            // A chunk was never hashed: the list cannot be brought to this state.
            follow.list.abandon();
            return Err(Error::Bug(
                "a chunk of a followed scan was never hashed".into(),
            ));
        };
        let stamp = Stamp {
            id,
            page_size: self.page_size,
            page_count: self.page_count,
            position: pinned,
            written,
        };
        follow.list.finish(stamp, table);
        Ok(())
    }

    /// The chunk hashes of this snapshot ([`crate::digest::CHUNK_PAGES`] page hashes
    /// each, as the chunked digest hashes them) as far as the WAL hash list knows them
    /// without reading a page: the list's hash for each chunk no page of which the WAL
    /// names since the list's position, `None` for a chunk that must be hashed
    /// ([`Snapshot::hash_chunk`]). `None` when the next scan does not follow the WAL
    /// ([`Snapshot::follows_wal`]): only a full scan can say.
    pub fn chunk_hashes(&mut self) -> Option<Vec<Option<Hash>>> {
        self.decide();
        match &*self.plan.borrow() {
            Some(Plan::Follow(follow)) => Some(follow.table.clone()),
            _ => None,
        }
    }

    /// After [`Snapshot::chunk_hashes`]: calls `f` with every page of chunk `idx` (its
    /// number, its hash, and its bytes when it was read), in order, and returns the
    /// chunk's hash. Every chunk `chunk_hashes` left `None` must be hashed before
    /// [`Snapshot::chunks_done`]; others may be (their page hashes come from the list,
    /// each chunk checked against its hash, and are read when it does not hold).
    pub fn hash_chunk(&mut self, idx: u32, f: &mut HashedPageFn<'_>) -> Result<Hash> {
        let plan = self.plan.borrow_mut().take();
        let Some(Plan::Follow(mut follow)) = plan else {
            *self.plan.borrow_mut() = plan;
            return Err(Error::Bug(format!(
                "chunk {idx} asked of a scan that follows no WAL"
            )));
        };
        if idx >= chunk_count(self.page_count) {
            *self.plan.borrow_mut() = Some(Plan::Follow(follow));
            return Err(Error::Bug(format!("chunk {idx} asked past the end")));
        }
        let result = self.follow_chunk(&mut follow, idx, 0, f);
        *self.plan.borrow_mut() = Some(Plan::Follow(follow));
        result
    }

    /// Ends a scan by chunks: brings the WAL hash list to this snapshot's state when
    /// every chunk that had to be hashed was ([`Snapshot::hash_chunk`]), and refuses (an
    /// error, the list left as it was) otherwise.
    pub fn chunks_done(&mut self) -> Result<()> {
        match self.plan.borrow_mut().take() {
            Some(Plan::Follow(follow)) => self.finish_follow(follow),
            _ => Err(Error::Bug("a scan by chunks ended that never began".into())),
        }
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

    /// Both forms of the database's digest ([`crate::digest::Digests`]), from one pass
    /// over its page hashes as [`Snapshot::digest`] makes them.
    pub fn digests(&mut self, afresh: bool) -> Result<crate::digest::Digests> {
        self.digests_of(afresh, |hash| hash)
    }

    /// Both digests over this snapshot's page identities under `key` (the HMAC of each
    /// page hash, [`crate::crypt::EncryptionKey::page_identity`]): what an encrypted
    /// replica records for a version of these pages made with that key.
    pub fn identity_digests(
        &mut self,
        key: &crate::crypt::EncryptionKey,
    ) -> Result<crate::digest::Digests> {
        self.digests_of(false, |hash| key.page_identity(&hash))
    }

    /// Both digests over `leaf` of each page hash, in one pass ([`Snapshot::digests`]).
    fn digests_of(
        &mut self,
        afresh: bool,
        leaf: impl Fn(Hash) -> Hash,
    ) -> Result<crate::digest::Digests> {
        let mut both = crate::digest::BothDigester::new(self.page_size, self.page_count);
        if afresh {
            self.for_each_page(&mut |pgno, data| {
                both.push(&leaf(page_hash(pgno, data)));
                Ok(())
            })?;
        } else {
            self.hash_pages(u32::MAX, &mut |_, hash, _| {
                both.push(&leaf(hash));
                Ok(())
            })?;
        }
        both.finish().ok_or_else(|| Error::NotADatabase {
            path: self.path.clone(),
            reason: "the page count changed while reading".into(),
        })
    }

    /// Reads page `pgno` into `buf` (replacing its contents).
    pub fn read_page(&mut self, pgno: u32, buf: &mut Vec<u8>) -> Result<()> {
        super::scan::read_page(&self.conn, &self.path, pgno, self.page_size, buf)
    }
}

/// The lines a checking pragma answers on `conn` (the database at `path`).
fn run_check(conn: &Connection, path: &Path, pragma: &str) -> Result<Vec<String>> {
    // The check reads every page, some twice (b-tree pages, then the rows), through a
    // 2 MiB cache: mapped, each read is a pointer, not a system call and a copy. The
    // file cannot shrink under the mapping while the read transaction is open (the same
    // argument as `scan::for_each_page`'s).
    let _ = conn.pragma_update(None, "mmap_size", CHECK_MMAP_BYTES);
    let result = (|| {
        let mut stmt = conn.prepare(pragma).map_err(|e| Error::sqlite(path, e))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(|e| Error::sqlite(path, e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| Error::sqlite(path, e))
    })();
    let _ = conn.pragma_update(None, "mmap_size", 0);
    result
}
