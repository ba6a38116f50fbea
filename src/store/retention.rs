//! Retention: which versions a replica keeps, removing the others, and collecting the
//! pages no version of any replica uses any more.
//!
//! - The choice is a pure function of the policy, the versions' numbers and times, and
//!   the current time ([`keep`]): no clock inside, so tests pass times in.
//! - A replica's own policy lives in its file (table `retention`); the store's default
//!   in `<store>/retention.json` (or, for a server, `serve --retention`, which overrides
//!   that file while it runs). With neither, everything is kept.
//! - Removing versions is local to the replica's file: one transaction (under the
//!   replica's write lock, like a push) deletes their rows, their manifests and the
//!   manifest chunks no remaining version uses. The latest version is never removed,
//!   whatever the policy says.
//! - Freeing pages is store-wide, because a page is stored once for every replica:
//!   under the store's exclusive GC lock (`pages/gc.lock`; every push, pull and scrub
//!   holds it shared for its whole duration), every remaining version's page hashes of
//!   every replica are streamed into a temporary table (on disk past a small cache: the
//!   memory does not grow with the store), the index rows of the pages not in it are
//!   deleted in one transaction, then the bytes no index row names are given back to
//!   the file system by punching holes in the packs (offsets of live pages unchanged).
//!   A crash at any point leaves every remaining version whole: rows go before bytes,
//!   and the next collection punches whatever bytes no row names, idempotently.
//!
//! Invariants: a push never dedups against a page being freed and a pull never reads
//! one (both hold the GC lock shared, so a collection runs only between them, and sees
//! every version committed before it); a version being removed while a pull reads it
//! stays readable to that pull (its read transaction's snapshot, and its pages, live on
//! until it ends); a replica file that cannot be read stops the collection before
//! anything is freed (its pages might be in use).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::RetentionPolicy;
use super::pack::{self, Pages};
use super::replica::{remove_leftovers, upgrade};
use crate::digest::{HASH_BYTES, Hash};
use crate::{Error, Result};

/// Seconds in a day, for day and week buckets (UTC).
const DAY_SECS: i64 = 86_400;

/// How long a removal waits for a push holding the replica's write lock.
const REMOVE_BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// The name of the store's default policy file, in the store's directory.
pub(super) const DEFAULT_FILE: &str = "retention.json";

/// Which of `versions` (number, created_at in Unix seconds; oldest first) `policy` keeps
/// at time `now`: one flag each, in the same order. The latest version is always kept;
/// a policy with no rule keeps everything.
///
/// - `keep_last` N: the N newest versions;
/// - `keep_daily` D: the newest version of each of the D most recent UTC days that have
///   a version (days without one do not count, so a replica that stopped being pushed
///   keeps its history);
/// - `keep_weekly` W: the same for ISO weeks (Monday to Sunday, UTC);
/// - `keep_within_seconds` S: every version made at or after `now - S` (and any dated
///   after `now`, a clock that moved back).
pub fn keep(policy: &RetentionPolicy, versions: &[(u64, i64)], now: i64) -> Vec<bool> {
    let n = versions.len();
    if policy.keeps_everything() {
        return vec![true; n];
    }
    let mut kept = vec![false; n];
    if let Some(last) = kept.last_mut() {
        *last = true;
    }
    if let Some(k) = policy.keep_last {
        let k = usize::try_from(k).unwrap_or(usize::MAX).min(n);
        for flag in &mut kept[n - k..] {
            *flag = true;
        }
    }
    if let Some(s) = policy.keep_within_seconds {
        let since = now.saturating_sub(i64::try_from(s).unwrap_or(i64::MAX));
        for (flag, (_, at)) in kept.iter_mut().zip(versions) {
            if *at >= since {
                *flag = true;
            }
        }
    }
    let mut newest_per_bucket = |count: Option<u64>, bucket: &dyn Fn(i64) -> i64| {
        let Some(count) = count else { return };
        let mut seen = 0u64;
        let mut current = None;
        for (i, (_, at)) in versions.iter().enumerate().rev() {
            let b = bucket(*at);
            if current != Some(b) {
                current = Some(b);
                seen += 1;
                if seen > count {
                    break;
                }
                kept[i] = true;
            }
        }
    };
    newest_per_bucket(policy.keep_daily, &|at| at.div_euclid(DAY_SECS));
    // 1970-01-01 was a Thursday: three days later the first full ISO week begins.
    newest_per_bucket(policy.keep_weekly, &|at| {
        (at.div_euclid(DAY_SECS) + 3).div_euclid(7)
    });
    kept
}

/// [`keep`] for versions some of which are merges' candidates (number, created_at, the
/// version that merged it): a candidate is no version of its own to the policy (it is
/// not counted by `keep_last`, nor a day's or week's newest) and is kept exactly as long
/// as the merge that holds it, so it never goes before any other version would: the
/// client whose LOCAL kept later changes after the merge is based on it.
pub fn keep_with_candidates(
    policy: &RetentionPolicy,
    versions: &[(u64, i64, Option<u64>)],
    now: i64,
) -> Vec<bool> {
    if policy.keeps_everything() {
        return vec![true; versions.len()];
    }
    let own: Vec<(u64, i64)> = versions
        .iter()
        .filter(|(_, _, merged)| merged.is_none())
        .map(|&(n, at, _)| (n, at))
        .collect();
    let flags = keep(policy, &own, now);
    let kept: std::collections::HashSet<u64> = own
        .iter()
        .zip(&flags)
        .filter(|(_, k)| **k)
        .map(|((n, _), _)| *n)
        .collect();
    versions
        .iter()
        .map(|(n, _, merged)| kept.contains(&merged.unwrap_or(*n)))
        .collect()
}

/// Parses a policy written as `serve --retention` takes it:
/// `keep-last=30,keep-daily=14,keep-weekly=8,keep-within=30d` (any of them, in any
/// order), or `all` for "keep everything".
pub fn parse_policy(s: &str) -> Result<RetentionPolicy> {
    let mut policy = RetentionPolicy::default();
    let s = s.trim();
    if s == "all" {
        return Ok(policy);
    }
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = |why: String| {
            Error::Usage(format!(
                "invalid retention rule '{part}': {why}; write e.g. keep-last=30,keep-daily=14,keep-weekly=8,keep-within=30d"
            ))
        };
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| bad("expected NAME=VALUE".into()))?;
        let count = || {
            value
                .parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| bad(format!("'{value}' is not a count of at least 1")))
        };
        match name {
            "keep-last" => policy.keep_last = Some(count()?),
            "keep-daily" => policy.keep_daily = Some(count()?),
            "keep-weekly" => policy.keep_weekly = Some(count()?),
            "keep-within" => policy.keep_within_seconds = Some(parse_span(value)?),
            other => return Err(bad(format!("unknown rule '{other}'"))),
        }
    }
    Ok(policy)
}

/// A span such as `30d`, `12h` or `2weeks`, in seconds (at least one).
pub fn parse_span(s: &str) -> Result<u64> {
    humantime::parse_duration(s)
        .ok()
        .map(|d| d.as_secs())
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            Error::Usage(format!(
                "invalid duration '{s}': use a span such as 30d, 12h or 2weeks"
            ))
        })
}

fn sql(path: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |e| Error::sqlite(path, e)
}

const POLICY_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS retention(
    id INTEGER PRIMARY KEY CHECK (id = 1),
    policy TEXT NOT NULL
)";

/// The record of removed versions (number and time, so that `@TIME` of a time one of
/// them was current is refused rather than answered with an older version). A few
/// bytes a version.
const REMOVED_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS removed_versions(
    number INTEGER PRIMARY KEY,
    created_at INTEGER NOT NULL,
    removed_at INTEGER NOT NULL
)";

/// The newest removed version made at or before `t`, if any (read on `conn`, inside
/// the caller's transaction).
pub(super) fn removed_at(conn: &Connection, file: &Path, t: i64) -> Result<Option<u64>> {
    let exists: bool = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'removed_versions'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )
        .map_err(sql(file))?;
    if !exists {
        return Ok(None);
    }
    conn.query_row(
        "SELECT max(number) FROM removed_versions WHERE created_at <= ?1",
        [t],
        |r| r.get::<_, Option<i64>>(0),
    )
    .map(|n| n.map(|n| n as u64))
    .map_err(sql(file))
}

/// The replica's own policy, if it has one.
pub(super) fn own_policy(file: &Path) -> Result<Option<RetentionPolicy>> {
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql(file))?;
    conn.busy_timeout(REMOVE_BUSY_TIMEOUT).map_err(sql(file))?;
    let exists: bool = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'retention'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )
        .map_err(sql(file))?;
    if !exists {
        return Ok(None);
    }
    let json: Option<String> = conn
        .query_row("SELECT policy FROM retention WHERE id = 1", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(sql(file))?;
    json.map(|j| {
        serde_json::from_str(&j).map_err(|e| {
            Error::Server(format!(
                "{}: its retention policy is not readable: {e}",
                file.display()
            ))
        })
    })
    .transpose()
}

/// Sets (or with `None` drops) the replica's own policy, in one transaction.
pub(super) fn set_own_policy(file: &Path, policy: Option<&RetentionPolicy>) -> Result<()> {
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql(file))?;
    conn.busy_timeout(REMOVE_BUSY_TIMEOUT).map_err(sql(file))?;
    conn.execute_batch("BEGIN IMMEDIATE").map_err(sql(file))?;
    conn.execute_batch(POLICY_SCHEMA).map_err(sql(file))?;
    match policy {
        Some(p) => {
            let json = serde_json::to_string(p).expect("a policy serialises");
            conn.execute(
                "INSERT OR REPLACE INTO retention(id, policy) VALUES (1, ?1)",
                [json],
            )
            .map_err(sql(file))?;
        }
        None => {
            conn.execute("DELETE FROM retention", [])
                .map_err(sql(file))?;
        }
    }
    conn.execute_batch("COMMIT").map_err(sql(file))
}

/// The store's default policy file's content, if it exists.
pub(super) fn read_default(root: &Path) -> Result<Option<RetentionPolicy>> {
    let path = root.join(DEFAULT_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Error::Usage(format!(
                "{}: not a retention policy ({e}); set it again with `sqlferry retention --default`",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// Writes (or with `None` removes) the store's default policy file, atomically.
pub(super) fn write_default(root: &Path, policy: Option<&RetentionPolicy>) -> Result<()> {
    let path = root.join(DEFAULT_FILE);
    let Some(policy) = policy else {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&path, e)),
            _ => Ok(()),
        };
    };
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let mut tmp = tempfile::NamedTempFile::new_in(root).map_err(|e| Error::io(root, e))?;
    serde_json::to_writer_pretty(&mut tmp, policy).expect("a policy serialises");
    tmp.as_file().sync_all().map_err(|e| Error::io(&path, e))?;
    tmp.persist(&path).map_err(|e| Error::io(&path, e.error))?;
    Ok(())
}

/// Removes the versions of the replica in `file` that `policy` does not keep at `now`
/// (or, with `dry_run`, only says which). Returns the numbers removed, oldest first,
/// and how many versions remain. One transaction under the replica's write lock.
pub(super) fn remove_versions(
    file: &Path,
    policy: &RetentionPolicy,
    now: i64,
    dry_run: bool,
) -> Result<(Vec<u64>, u64)> {
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql(file))?;
    conn.busy_timeout(REMOVE_BUSY_TIMEOUT).map_err(sql(file))?;
    conn.execute_batch(if dry_run {
        "BEGIN DEFERRED"
    } else {
        "BEGIN IMMEDIATE"
    })
    .map_err(sql(file))?;
    let merged_into = match super::replica::has_merged_into(&conn, file)? {
        true => "merged_into",
        false => "NULL",
    };
    let versions: Vec<(u64, i64, Option<u64>)> = {
        let mut stmt = conn
            .prepare(&format!(
                "SELECT number, created_at, {merged_into} FROM versions ORDER BY number"
            ))
            .map_err(sql(file))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get(1)?,
                    r.get::<_, Option<i64>>(2)?.map(|n| n as u64),
                ))
            })
            .map_err(sql(file))?;
        rows.collect::<rusqlite::Result<_>>().map_err(sql(file))?
    };
    let flags = keep_with_candidates(policy, &versions, now);
    let removed: Vec<u64> = versions
        .iter()
        .zip(&flags)
        .filter(|(_, k)| !**k)
        .map(|((n, _, _), _)| *n)
        .collect();
    let kept = (versions.len() - removed.len()) as u64;
    if dry_run || removed.is_empty() {
        conn.execute_batch("ROLLBACK").map_err(sql(file))?;
        return Ok((removed, kept));
    }
    conn.execute_batch(REMOVED_SCHEMA).map_err(sql(file))?;
    {
        let mut record = conn
            .prepare(
                "INSERT OR REPLACE INTO removed_versions(number, created_at, removed_at)
                 SELECT number, created_at, ?2 FROM versions WHERE number = ?1",
            )
            .map_err(sql(file))?;
        for n in &removed {
            record.execute(params![*n as i64, now]).map_err(sql(file))?;
        }
    }
    {
        let mut manifest = conn
            .prepare("DELETE FROM manifest WHERE version = ?1")
            .map_err(sql(file))?;
        let mut version = conn
            .prepare("DELETE FROM versions WHERE number = ?1")
            .map_err(sql(file))?;
        for n in &removed {
            manifest.execute([*n as i64]).map_err(sql(file))?;
            version.execute([*n as i64]).map_err(sql(file))?;
        }
    }
    conn.execute(
        "DELETE FROM chunks WHERE hash NOT IN (SELECT chunk FROM manifest)",
        [],
    )
    .map_err(sql(file))?;
    super::place::remove_unused(&conn, file)?;
    conn.execute_batch("COMMIT").map_err(sql(file))?;
    Ok((removed, kept))
}

/// The store's GC lock file.
fn lock_path(pages_dir: &Path) -> PathBuf {
    pages_dir.join("gc.lock")
}

fn open_lock(pages_dir: &Path) -> Result<(File, PathBuf)> {
    std::fs::create_dir_all(pages_dir).map_err(|e| Error::io(pages_dir, e))?;
    let path = lock_path(pages_dir);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    Ok((file, path))
}

/// The GC lock held shared, by a push, a pull or a scrub for its whole duration: no
/// page is freed meanwhile. Waits while a collection runs. Released on drop.
#[derive(Debug)]
pub struct GcShared {
    _file: Option<File>,
}

impl GcShared {
    /// Takes the lock shared. Without `create`, a store that has no pages directory yet
    /// (nothing stored, nothing to collect) is left as it is and nothing is locked.
    pub(super) fn take(pages_dir: &Path, create: bool) -> Result<GcShared> {
        if !create && !pages_dir.is_dir() {
            return Ok(GcShared { _file: None });
        }
        let (file, path) = open_lock(pages_dir)?;
        file.lock_shared().map_err(|e| Error::io(&path, e))?;
        Ok(GcShared { _file: Some(file) })
    }
}

/// How often a collection waiting for the GC lock tries again.
const LOCK_RETRY: Duration = Duration::from_millis(50);

/// Takes the GC lock exclusively, trying until `wait` has passed; `None` if pushes or
/// pulls held it all that time.
fn take_exclusive(pages_dir: &Path, wait: Duration) -> Result<Option<File>> {
    let (file, path) = open_lock(pages_dir)?;
    let deadline = Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(LOCK_RETRY);
    }
}

/// What a collection freed (or, in a dry run, would free).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Collected {
    /// Pages no version uses, whose index rows were deleted.
    pub pages: u64,
    /// Their stored bytes.
    pub bytes: u64,
    /// Allocated disk space the packs gave back.
    pub reclaimed: u64,
}

/// Versions left out of the mark: those a dry run would remove, `(replica file,
/// numbers)`.
pub(super) type Excluded<'a> = Option<(&'a Path, &'a [u64])>;

/// Frees the pages no remaining version of any replica under `root` uses (see the
/// module doc). `excluded` versions count as removed; `dry_run` only counts. Returns
/// `None` when the GC lock could not be had within `wait` (pushes or pulls running).
pub(super) fn collect(
    root: &Path,
    excluded: Excluded<'_>,
    dry_run: bool,
    wait: Duration,
) -> Result<Option<Collected>> {
    let pages_dir = pack::dir_of(root);
    if !pages_dir.join("index.sqlite").exists() {
        return Ok(Some(Collected::default()));
    }
    // A dry run changes nothing, so it needs no more than what a pull holds.
    let _shared;
    let _exclusive;
    if dry_run {
        _shared = GcShared::take(&pages_dir, false)?;
    } else {
        match take_exclusive(&pages_dir, wait)? {
            Some(f) => _exclusive = f,
            None => return Ok(None),
        }
    }
    let mut files = Vec::new();
    let top = root.join("replicas");
    if top.exists() {
        walk(&top, &mut files)?;
    }
    let pages = Pages::open(&pages_dir, pack::WRITER_CACHE_KIB)?;
    pages.mark_begin(dry_run)?;
    for file in &files {
        // A replica file of the previous layout gives its pages to the packs first, so
        // that its versions' pages are marked where they now are.
        if !dry_run {
            upgrade(file, &pages_dir, false)?;
        }
        let skip = match excluded {
            Some((f, numbers)) if f == file => numbers,
            _ => &[],
        };
        mark_replica(&pages, file, skip)?;
    }
    let (count, bytes) = pages.sweep(dry_run)?;
    let reclaimed = if dry_run { 0 } else { pages.reclaim()? };
    pages.mark_end();
    Ok(Some(Collected {
        pages: count,
        bytes,
        reclaimed,
    }))
}

/// Every replica file under `dir` (not the private files of replicas being made).
fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    remove_leftovers(dir);
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if kind.is_dir() {
            walk(&path, files)?;
        } else if kind.is_file()
            && path.extension().is_some_and(|e| e == "sqlferry")
            && !entry.file_name().to_string_lossy().starts_with('.')
        {
            files.push(path);
        }
    }
    Ok(())
}

/// Marks every page hash the versions of the replica in `file` use, but for `skip`'s:
/// each distinct manifest chunk once. An unreadable file is an error: what it uses is
/// unknown, so nothing may be freed.
fn mark_replica(pages: &Pages, file: &Path, skip: &[u64]) -> Result<()> {
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql(file))?;
    conn.busy_timeout(REMOVE_BUSY_TIMEOUT).map_err(sql(file))?;
    let has_manifest: bool = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'manifest'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )
        .map_err(sql(file))?;
    if !has_manifest {
        return Ok(()); // a replica whose first push never committed uses nothing
    }
    let skipped = skip
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut stmt = conn
        .prepare(&format!(
            "SELECT c.hash, c.hashes FROM chunks c WHERE c.hash IN
               (SELECT chunk FROM manifest WHERE version NOT IN ({skipped}))"
        ))
        .map_err(sql(file))?;
    let mut rows = stmt.query([]).map_err(sql(file))?;
    while let Some(row) = rows.next().map_err(sql(file))? {
        let blob = row
            .get_ref(1)
            .map_err(sql(file))?
            .as_blob()
            .map_err(|e| sql(file)(e.into()))?;
        for h in blob.chunks_exact(HASH_BYTES) {
            pages.mark(h.try_into().expect("chunks_exact yields 32-byte slices"))?;
        }
    }
    // A version whose manifest names a chunk that is gone cannot be told apart from
    // damage: scrub reports it; its other pages were marked above.
    Ok(())
}

/// Stored bytes of the replica in `file`: for each version (oldest first) the bytes
/// of the pages no earlier version of it uses, and their sum (the unique pages the
/// replica's versions use). Streams: each distinct chunk is read once, and the pages
/// seen so far are kept in a temporary table, not in memory.
pub(super) fn stored_bytes(file: &Path, pages_dir: &Path) -> Result<(Vec<(u64, u64)>, u64)> {
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql(file))?;
    conn.busy_timeout(REMOVE_BUSY_TIMEOUT).map_err(sql(file))?;
    conn.pragma_update(None, "cache_size", pack::READER_CACHE_KIB)
        .map_err(sql(file))?;
    conn.execute_batch(
        "CREATE TEMP TABLE seen_pages(hash BLOB PRIMARY KEY) WITHOUT ROWID;
         CREATE TEMP TABLE seen_chunks(hash BLOB PRIMARY KEY) WITHOUT ROWID;
         BEGIN DEFERRED",
    )
    .map_err(sql(file))?;
    let index = if pages_dir.join("index.sqlite").exists() {
        Some(Pages::open(pages_dir, pack::READER_CACHE_KIB)?)
    } else {
        None
    };
    if let Some(p) = &index {
        p.begin_read()?;
    }
    let numbers: Vec<u64> = {
        let mut stmt = conn
            .prepare("SELECT number FROM versions ORDER BY number")
            .map_err(sql(file))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, i64>(0).map(|n| n as u64))
            .map_err(sql(file))?;
        rows.collect::<rusqlite::Result<_>>().map_err(sql(file))?
    };
    let mut chunks = conn
        .prepare(
            "SELECT m.chunk, c.hashes FROM manifest m JOIN chunks c ON c.hash = m.chunk
             WHERE m.version = ?1 ORDER BY m.idx",
        )
        .map_err(sql(file))?;
    let mut new_chunk = conn
        .prepare("INSERT OR IGNORE INTO temp.seen_chunks(hash) VALUES (?1)")
        .map_err(sql(file))?;
    let mut new_page = conn
        .prepare("INSERT OR IGNORE INTO temp.seen_pages(hash) VALUES (?1)")
        .map_err(sql(file))?;
    let mut per_version = Vec::with_capacity(numbers.len());
    let mut total = 0u64;
    for number in numbers {
        let mut bytes = 0u64;
        let mut rows = chunks.query([number as i64]).map_err(sql(file))?;
        while let Some(row) = rows.next().map_err(sql(file))? {
            let key = row.get_ref(0).map_err(sql(file))?.as_blob().unwrap_or(&[]);
            if new_chunk.execute([key]).map_err(sql(file))? == 0 {
                continue; // every page of a chunk seen before was counted then
            }
            let blob = row.get_ref(1).map_err(sql(file))?.as_blob().unwrap_or(&[]);
            for h in blob.chunks_exact(HASH_BYTES) {
                if new_page.execute([h]).map_err(sql(file))? == 0 {
                    continue;
                }
                let hash: Hash = h.try_into().expect("chunks_exact yields 32-byte slices");
                if let Some(loc) = match &index {
                    Some(p) => p.lookup(&hash)?,
                    None => None,
                } {
                    bytes += u64::from(loc.len);
                }
            }
        }
        per_version.push((number, bytes));
        total += bytes;
    }
    Ok((per_version, total))
}

/// Seconds since the Unix epoch of the day `at` falls in, for tests and messages.
#[cfg(test)]
fn day_of(at: i64) -> i64 {
    at.div_euclid(DAY_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = DAY_SECS;
    /// 2026-12-07, a Monday, 00:00 UTC.
    const MONDAY: i64 = 1_796_601_600;

    fn kept(policy: &RetentionPolicy, versions: &[(u64, i64)], now: i64) -> Vec<u64> {
        keep(policy, versions, now)
            .into_iter()
            .zip(versions)
            .filter(|(k, _)| *k)
            .map(|(_, (n, _))| *n)
            .collect()
    }

    #[test]
    fn the_test_monday_is_a_monday() {
        // 1970-01-05 was the first Monday; weeks are whole days apart from it.
        assert_eq!((day_of(MONDAY) - 4) % 7, 0);
    }

    #[test]
    fn no_rule_keeps_everything_and_the_latest_is_always_kept() {
        let versions: Vec<(u64, i64)> = (1..=5).map(|n| (n, n as i64 * DAY)).collect();
        assert_eq!(
            kept(&RetentionPolicy::default(), &versions, 100 * DAY),
            [1, 2, 3, 4, 5]
        );
        // A rule that keeps nothing of these still keeps the latest.
        let within = RetentionPolicy {
            keep_within_seconds: Some(60),
            ..RetentionPolicy::default()
        };
        assert_eq!(kept(&within, &versions, 100 * DAY), [5]);
        assert!(keep(&within, &[], 0).is_empty());
    }

    #[test]
    fn a_candidate_lives_as_long_as_its_merge_and_is_not_counted() {
        // 1, 2, then a merge: 3 the candidate (merged into 4), 4 the merge; then 5.
        let versions = [
            (1, 1, None),
            (2, 2, None),
            (3, 3, Some(4)),
            (4, 3, None),
            (5, 5, None),
        ];
        let last = |n| RetentionPolicy {
            keep_last: Some(n),
            ..RetentionPolicy::default()
        };
        let kept = |p: &RetentionPolicy| -> Vec<u64> {
            keep_with_candidates(p, &versions, 10)
                .into_iter()
                .zip(&versions)
                .filter(|(k, _)| *k)
                .map(|(_, (n, _, _))| *n)
                .collect()
        };
        assert_eq!(kept(&last(1)), [5]);
        assert_eq!(
            kept(&last(2)),
            [3, 4, 5],
            "the candidate counts with its merge"
        );
        assert_eq!(kept(&last(3)), [2, 3, 4, 5]);
        // The merge the latest: its candidate stays with it, whatever the policy.
        let latest_merge = &versions[..4];
        let flags = keep_with_candidates(&last(1), latest_merge, 10);
        assert_eq!(flags, [false, false, true, true]);
        // A candidate whose merge is gone (removed before) goes too.
        let orphan = [(3, 3, Some(4)), (5, 5, None)];
        assert_eq!(keep_with_candidates(&last(5), &orphan, 10), [false, true]);
        assert_eq!(
            keep_with_candidates(&RetentionPolicy::default(), &orphan, 10),
            [true, true],
            "no rule keeps everything"
        );
    }

    #[test]
    fn keep_last_keeps_the_newest_n() {
        let versions: Vec<(u64, i64)> = (1..=6).map(|n| (n, n as i64)).collect();
        let p = RetentionPolicy {
            keep_last: Some(2),
            ..RetentionPolicy::default()
        };
        assert_eq!(kept(&p, &versions, 10), [5, 6]);
        let all = RetentionPolicy {
            keep_last: Some(100),
            ..RetentionPolicy::default()
        };
        assert_eq!(kept(&all, &versions, 10).len(), 6);
    }

    #[test]
    fn keep_within_keeps_what_is_recent_and_what_is_dated_after_now() {
        let now = MONDAY;
        let versions = [
            (1, now - 3 * DAY),
            (2, now - DAY - 1),
            (3, now - DAY),
            (4, now - 10),
            (5, now + 50), // a clock that moved back
            (6, now - 5),
        ];
        let p = RetentionPolicy {
            keep_within_seconds: Some(DAY as u64),
            ..RetentionPolicy::default()
        };
        assert_eq!(kept(&p, &versions, now), [3, 4, 5, 6]);
    }

    #[test]
    fn keep_daily_keeps_the_newest_of_each_recent_day_that_has_one() {
        // Day 0: versions 1, 2; day 1: 3; (day 2: none); day 3: 4, 5, 6.
        let d0 = MONDAY;
        let versions = [
            (1, d0 + 10),
            (2, d0 + 20),
            (3, d0 + DAY + 5),
            (4, d0 + 3 * DAY + 1),
            (5, d0 + 3 * DAY + 2),
            (6, d0 + 3 * DAY + 3),
        ];
        let p = |d| RetentionPolicy {
            keep_daily: Some(d),
            ..RetentionPolicy::default()
        };
        let now = d0 + 30 * DAY; // long after: days without versions do not count
        assert_eq!(kept(&p(1), &versions, now), [6]);
        assert_eq!(kept(&p(2), &versions, now), [3, 6]);
        assert_eq!(kept(&p(3), &versions, now), [2, 3, 6]);
        assert_eq!(kept(&p(10), &versions, now), [2, 3, 6]);
    }

    #[test]
    fn keep_weekly_buckets_by_iso_week_monday_to_sunday() {
        let versions = [
            (1, MONDAY - DAY + 100), // Sunday: the week before
            (2, MONDAY - 50),        // Sunday, later: the newest of that week
            (3, MONDAY + 10),        // Monday: a new week
            (4, MONDAY + 6 * DAY),   // Sunday of the same week: its newest
            (5, MONDAY + 7 * DAY),   // the next Monday
        ];
        let p = |w| RetentionPolicy {
            keep_weekly: Some(w),
            ..RetentionPolicy::default()
        };
        let now = MONDAY + 100 * DAY;
        assert_eq!(kept(&p(1), &versions, now), [5]);
        assert_eq!(kept(&p(2), &versions, now), [4, 5]);
        assert_eq!(kept(&p(3), &versions, now), [2, 4, 5]);
    }

    #[test]
    fn rules_add_up() {
        let versions: Vec<(u64, i64)> = (1..=10)
            .map(|n| (n, MONDAY + (n as i64) * DAY / 2))
            .collect();
        // keep-last 2 keeps 9 and 10; keep-daily 3 the newest of each of the three
        // latest days that have versions.
        let p = RetentionPolicy {
            keep_last: Some(2),
            keep_daily: Some(3),
            ..RetentionPolicy::default()
        };
        // Day index of version n is n / 2: 1→0, 2,3→1, 4,5→2, 6,7→3, 8,9→4, 10→5.
        assert_eq!(kept(&p, &versions, MONDAY + 20 * DAY), [7, 9, 10]);
    }

    #[test]
    fn policies_parse_and_print_back() {
        let p = parse_policy("keep-last=30, keep-daily=14,keep-weekly=8,keep-within=30d")
            .expect("valid");
        assert_eq!(p.keep_last, Some(30));
        assert_eq!(p.keep_daily, Some(14));
        assert_eq!(p.keep_weekly, Some(8));
        assert_eq!(p.keep_within_seconds, Some(30 * 86_400));
        assert_eq!(parse_policy(&p.to_string()).expect("its own form"), p);
        assert!(parse_policy("all").expect("valid").keeps_everything());
        assert_eq!(
            RetentionPolicy::default().to_string(),
            "keep everything",
            "what `retention` shows"
        );
        for (bad, why) in [
            ("keep-last", "NAME=VALUE"),
            ("keep-last=0", "at least 1"),
            ("keep-last=x", "at least 1"),
            ("keep-monthly=3", "unknown rule"),
            ("keep-within=soon", "30d"),
        ] {
            let err = parse_policy(bad).expect_err(bad).to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
