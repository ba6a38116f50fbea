//! Restore drills (`serve --drill-every`): the server reads each replica's latest
//! version back out of its store into a temporary database file, as a restore would,
//! and checks it: every page against its hash as it is read, the whole-database digest
//! against the one the version recorded, and `PRAGMA integrity_check` on the file. An
//! encrypted replica's version, which the server cannot open, is checked as far as it
//! can be: every sealed page against its checksum, and the digest over identities.
//!
//! - One replica at a time, on the blocking pool; pages stream from the store's
//!   version reader into the file, so memory stays flat whatever the database's size.
//! - The temporary files live in the data directory's own `tmp/` (the store's disk,
//!   not the system's), and are removed after each drill; ones a killed server left are
//!   removed when the next one starts.
//! - A stop of the server stops a drill between two pages, or inside the integrity
//!   check (SQLite's progress handler): a stopped drill records nothing.
//! - The last result of each replica is kept in `server.db` (table `drills`) and in
//!   memory, so the API and the metrics show it without any file work, and a restarted
//!   server shows the drills done before it.
//! - Schedule: a replica is drilled [`DrillPlan::every`] after its last drill. One never
//!   drilled (a new replica, or the first start with drills on) is first drilled a
//!   little after start, at an offset within [`FIRST_DRILL_SPREAD`] (or the period, if
//!   shorter) derived from its name, so a server with many replicas does not start with
//!   all of them at once.
//! - A failed drill is logged at error level with the replica, the version and the
//!   error (which names the damaged page).

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, params};

use crate::digest::{BothDigester, page_hash};
use crate::engine::PageSource as _;
use crate::shutdown::Shutdown;
use crate::store::{AnyStore, ReplicaPath, Selector};
use crate::{Error, Result};

/// The longest a never-drilled replica waits for its first drill after start (or
/// after it appears): replicas' first drills are spread over this much time.
pub const FIRST_DRILL_SPREAD: Duration = Duration::from_secs(10 * 60);

/// How often the schedule looks for replicas that appeared since it last looked (or
/// the drill period, if shorter).
const RESCAN_EVERY: Duration = Duration::from_secs(60);

/// The directory under the data directory that holds the drills' temporary files.
pub const TMP_DIR: &str = "tmp";

/// How often a stop is sent again to a drill's integrity check until it ends.
const STOP_POLL: Duration = Duration::from_millis(50);

/// The longest error text a drill result keeps.
const MAX_ERROR_CHARS: usize = 2000;

/// The last restore drill of a replica, as the API (`last_drill`) and the metrics show
/// it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DrillResult {
    /// When the drill began, Unix seconds.
    pub at: i64,
    /// The version drilled (the latest when the drill began); 0 when none could be
    /// opened.
    pub version: u64,
    /// Whether it passed: digest and integrity check.
    pub ok: bool,
    /// How long it took, seconds.
    pub seconds: f64,
    /// What failed, when it did.
    pub error: Option<String>,
}

/// The last drill result of every replica: in memory, and in `server.db` so that it
/// outlives a restart.
#[derive(Debug)]
pub struct Drills {
    db: PathBuf,
    last: Mutex<HashMap<String, DrillResult>>,
}

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS drills(
        replica TEXT PRIMARY KEY,
        at INTEGER NOT NULL,
        version INTEGER NOT NULL,
        ok INTEGER NOT NULL,
        seconds REAL NOT NULL,
        error TEXT
    );
";

impl Drills {
    /// Opens the drill results kept in `server.db` of `data` (which
    /// [`Auth::open`](super::Auth::open) made, owner-only), creating their table.
    pub fn open(data: &Path) -> Result<Drills> {
        let db = data.join("server.db");
        let conn = connect(&db)?;
        let sql = |e| Error::sqlite(&db, e);
        conn.execute_batch(SCHEMA).map_err(sql)?;
        let mut last = HashMap::new();
        {
            let mut stmt = conn
                .prepare("SELECT replica, at, version, ok, seconds, error FROM drills")
                .map_err(sql)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        DrillResult {
                            at: r.get(1)?,
                            version: r.get::<_, i64>(2)? as u64,
                            ok: r.get(3)?,
                            seconds: r.get(4)?,
                            error: r.get(5)?,
                        },
                    ))
                })
                .map_err(sql)?;
            for row in rows {
                let (replica, result) = row.map_err(sql)?;
                last.insert(replica, result);
            }
        }
        Ok(Drills {
            db,
            last: Mutex::new(last),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, DrillResult>> {
        // A panic while holding it leaves a whole map (every update is one insert).
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last drill of `replica`, if it had one.
    pub fn last(&self, replica: &str) -> Option<DrillResult> {
        self.lock().get(replica).cloned()
    }

    /// The last drill of every replica that had one.
    pub fn all(&self) -> HashMap<String, DrillResult> {
        self.lock().clone()
    }

    /// Records `result` as `replica`'s last drill (blocking: one SQLite write).
    pub fn record(&self, replica: &str, result: &DrillResult) -> Result<()> {
        self.lock().insert(replica.to_owned(), result.clone());
        let conn = connect(&self.db)?;
        conn.execute(
            "INSERT OR REPLACE INTO drills(replica, at, version, ok, seconds, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                replica,
                result.at,
                result.version as i64,
                result.ok,
                result.seconds,
                result.error
            ],
        )
        .map_err(|e| Error::sqlite(&self.db, e))?;
        Ok(())
    }
}

fn connect(db: &Path) -> Result<Connection> {
    let conn = Connection::open(db).map_err(|e| Error::sqlite(db, e))?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(|e| Error::sqlite(db, e))?;
    Ok(conn)
}

/// Removes the drills' temporary files a killed server left in `data/tmp/`.
pub fn remove_leftovers(data: &Path) {
    let Ok(entries) = std::fs::read_dir(data.join(TMP_DIR)) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with("drill-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Drills the latest version of `replica` (blocking): reads it back into a temporary
/// file under `data/tmp/`, recomputes its digest from the bytes written and runs
/// `PRAGMA integrity_check` on the file. `None` when `stop` asked for a stop meanwhile
/// (the integrity check is stopped through `interrupt`: see [`Interrupt`]).
pub fn drill(
    store: &AnyStore,
    replica: &ReplicaPath,
    stop: &Shutdown,
    interrupt: &Interrupt,
) -> Option<DrillResult> {
    let (at, started) = (crate::epoch::now(), Instant::now());
    let mut version = 0;
    let outcome = restore_and_check(store, replica, stop, interrupt, &mut version);
    let seconds = started.elapsed().as_secs_f64();
    let error = match outcome {
        Ok(()) => None,
        Err(_) if stop.is_requested() => return None,
        Err(e) => Some(e.to_string().chars().take(MAX_ERROR_CHARS).collect()),
    };
    Some(DrillResult {
        at,
        version,
        ok: error.is_none(),
        seconds,
        error,
    })
}

/// What a stopped drill returns inside [`restore_and_check`]; never recorded.
fn stopped() -> Error {
    Error::Server("the drill was stopped: the server is shutting down".into())
}

fn restore_and_check(
    store: &AnyStore,
    replica: &ReplicaPath,
    stop: &Shutdown,
    interrupt: &Interrupt,
    version: &mut u64,
) -> Result<()> {
    let mut reader = store.read(replica, Selector::Latest)?;
    let info = reader.info().clone();
    *version = info.number;
    if info.encryption.is_some() {
        return check_sealed(&mut reader, replica, stop);
    }
    let tmp_root = store.root().join(TMP_DIR);
    std::fs::create_dir_all(&tmp_root).map_err(|e| Error::io(&tmp_root, e))?;
    // A directory, not a file: SQLite's `-wal` and `-shm` beside the copy go with it.
    let tmp = tempfile::Builder::new()
        .prefix("drill-")
        .tempdir_in(&tmp_root)
        .map_err(|e| Error::io(&tmp_root, e))?;
    let path = tmp.path().join("restored.db");
    let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, file);
    let mut digest = BothDigester::new(info.page_size, info.page_count);
    let mut next = 1u32;
    // Every page's bytes come through the reader, which checks them against their hash
    // (a damaged page is an error naming it); the digest is then rebuilt from the bytes
    // written, so what is checked is the file a restore would produce.
    reader.scan(0, &mut |pgno, _, data| {
        if stop.is_requested() {
            return Err(stopped());
        }
        let data =
            data.ok_or_else(|| Error::Bug(format!("the store gave no bytes for page {pgno}")))?;
        if pgno != next {
            return Err(Error::Verification(format!(
                "{replica}@{}: the manifest gave page {pgno} where page {next} was due",
                info.number
            )));
        }
        next += 1;
        digest.push(&page_hash(pgno, data));
        out.write_all(data).map_err(|e| Error::io(&path, e))
    })?;
    // The version stays readable as long as it is needed, and no longer: the reader's
    // read transaction ends before the integrity check, which may take a while.
    drop(reader);
    out.flush().map_err(|e| Error::io(&path, e))?;
    let file = out
        .into_inner()
        .map_err(|e| Error::io(&path, e.into_error()))?;
    drop(file);
    let recomputed = digest.finish().ok_or_else(|| {
        Error::Verification(format!(
            "{replica}@{}: {} pages restored where the version has {}",
            info.number,
            next - 1,
            info.page_count
        ))
    })?;
    // Each digest the version recorded, in its own form (a version made by chunks
    // records only its chunked digest).
    if let Err((theirs, ours)) = info.check_digests(&recomputed) {
        return Err(Error::Verification(match theirs.is_empty() {
            true => format!("{replica}@{}: no digest is recorded for it", info.number),
            false => format!(
                "{replica}@{}: the restored file's digest {ours} differs from the one recorded, {theirs}",
                info.number
            ),
        }));
    }
    let problems = integrity_check(&path, stop, interrupt)?;
    if problems != ["ok"] {
        return Err(Error::Verification(format!(
            "{replica}@{}: PRAGMA integrity_check on the restored file: {}",
            info.number,
            problems.join("; ")
        )));
    }
    Ok(())
}

/// The drill of an encrypted replica's version, whose pages the server cannot open
/// (docs/security.md): every sealed page is read and checked against the checksum of
/// its sealed bytes (the reader does), and the version's digest over page identities
/// against the one recorded. No file is restored and no integrity check runs: only a
/// client with the key can do either.
fn check_sealed(
    reader: &mut crate::store::AnyReader,
    replica: &ReplicaPath,
    stop: &Shutdown,
) -> Result<()> {
    let info = reader.info().clone();
    let mut digest = BothDigester::new(info.page_size, info.page_count);
    let mut next = 1u32;
    reader.scan(0, &mut |pgno, identity, data| {
        if stop.is_requested() {
            return Err(stopped());
        }
        if data.is_none() || pgno != next {
            return Err(Error::Verification(format!(
                "{replica}@{}: the store gave page {pgno} where page {next} was due",
                info.number
            )));
        }
        next += 1;
        digest.push(&identity);
        Ok(())
    })?;
    let recomputed = digest.finish().ok_or_else(|| {
        Error::Verification(format!(
            "{replica}@{}: {} sealed pages read where the version has {}",
            info.number,
            next - 1,
            info.page_count
        ))
    })?;
    info.check_digests(&recomputed).map_err(|(theirs, ours)| {
        Error::Verification(format!(
            "{replica}@{}: the digest of its page identities {ours} differs from the one recorded, {theirs}",
            info.number
        ))
    })
}

/// `PRAGMA integrity_check` on the restored copy at `path`. Its connection's interrupt
/// handle is left in `interrupt` while it runs, for a stop of the server to use.
fn integrity_check(path: &Path, stop: &Shutdown, interrupt: &Interrupt) -> Result<Vec<String>> {
    // Read-write only so SQLite may make the copy's `-shm` (a WAL-mode header);
    // `query_only` keeps it from writing the database itself.
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| Error::sqlite(path, e))?;
    conn.pragma_update(None, "query_only", true)
        .map_err(|e| Error::sqlite(path, e))?;
    *lock(interrupt) = Some(conn.get_interrupt_handle());
    // Asked to stop before the handle was there: the stopper may have missed it.
    if stop.is_requested() {
        return Err(stopped());
    }
    let lines = (|| {
        let mut stmt = conn.prepare("PRAGMA integrity_check")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect::<rusqlite::Result<Vec<String>>>()
    })();
    *lock(interrupt) = None;
    lines.map_err(|e| check_error(path, e))
}

/// Where a running integrity check leaves its connection's interrupt handle.
pub type Interrupt = Mutex<Option<rusqlite::InterruptHandle>>;

fn lock(interrupt: &Interrupt) -> std::sync::MutexGuard<'_, Option<rusqlite::InterruptHandle>> {
    interrupt.lock().unwrap_or_else(|p| p.into_inner())
}

/// An error of the integrity check itself: SQLite could not walk the file (which is
/// the check's answer), or the drill was stopped.
fn check_error(path: &Path, e: rusqlite::Error) -> Error {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::OperationInterrupted) => stopped(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
            Error::Verification(format!("the restored file is damaged: {e}"))
        }
        _ => Error::sqlite(path, e),
    }
}

/// When each replica is next due for a drill: the pure part of the schedule.
#[derive(Debug)]
pub struct DrillPlan {
    /// The time between two drills of one replica.
    pub every: Duration,
    due: HashMap<String, Instant>,
}

impl DrillPlan {
    /// A plan drilling each replica every `every`.
    pub fn new(every: Duration) -> DrillPlan {
        DrillPlan {
            every,
            due: HashMap::new(),
        }
    }

    /// Learns of `replica` at `now` (a no-op when known): due `every` after its last
    /// drill `last_age` ago, or, never drilled (or overdue), at its offset within the
    /// first-drill spread.
    pub fn learn(&mut self, replica: &str, last_age: Option<Duration>, now: Instant) {
        if self.due.contains_key(replica) {
            return;
        }
        let spread = self.every.min(FIRST_DRILL_SPREAD);
        let offset = spread.mul_f64(spread_fraction(replica));
        let due = match last_age.and_then(|age| self.every.checked_sub(age)) {
            Some(left) => now + left.max(offset),
            None => now + offset,
        };
        self.due.insert(replica.to_owned(), due);
    }

    /// Forgets replicas not in `present` (removed since).
    pub fn keep_only(&mut self, present: &[ReplicaPath]) {
        self.due
            .retain(|r, _| present.iter().any(|p| p.as_str() == r));
    }

    /// The replica due soonest, and when.
    pub fn next(&self) -> Option<(&str, Instant)> {
        self.due
            .iter()
            .min_by(|a, b| a.1.cmp(b.1).then(a.0.cmp(b.0)))
            .map(|(r, at)| (r.as_str(), *at))
    }

    /// Records that `replica` was drilled (or tried) at `now`: due again `every` later.
    pub fn done(&mut self, replica: &str, now: Instant) {
        self.due.insert(replica.to_owned(), now + self.every);
    }
}

/// A fraction in [0, 1) derived from the replica's name: where in the spread its first
/// drill falls. The same name falls at the same place on every start.
fn spread_fraction(replica: &str) -> f64 {
    let h = crate::digest::sha256(replica.as_bytes());
    let n = u16::from_be_bytes([h[0], h[1]]);
    f64::from(n) / 65536.0
}

/// The drill loop of a server: until `shutdown` asks for a stop, drills the replica due
/// soonest, one at a time, records the result and logs a failure at error level.
pub(super) async fn run(state: Arc<super::State>, every: Duration, shutdown: Shutdown) {
    let data = state.store.root().to_owned();
    let mut plan = DrillPlan::new(every);
    let mut scanned: Option<Instant> = None;
    // A replica pushed after start waits for the next look at most this long.
    let rescan = RESCAN_EVERY.min(every);
    {
        let data = data.clone();
        let _ = tokio::task::spawn_blocking(move || remove_leftovers(&data)).await;
    }
    loop {
        // The runtime's clock (so `tokio::time::pause` drives it), as a std instant.
        let now = tokio::time::Instant::now().into_std();
        if scanned.is_none_or(|t| now.duration_since(t) >= rescan) {
            let s = state.clone();
            match super::blocking(move || s.replicas()).await {
                Ok(present) => {
                    plan.keep_only(&present);
                    let wall = crate::epoch::now();
                    for r in &present {
                        let age = state
                            .drills
                            .last(r.as_str())
                            .map(|last| Duration::from_secs((wall - last.at).max(0) as u64));
                        plan.learn(r.as_str(), age, now);
                    }
                }
                Err(e) => tracing::error!(error = %e, "drills: cannot list the replicas"),
            }
            scanned = Some(now);
        }
        let wake = match plan.next() {
            Some((_, due)) => due.min(now + rescan),
            None => now + rescan,
        };
        if wake > now {
            tokio::select! {
                () = tokio::time::sleep_until(wake.into()) => continue,
                () = shutdown.requested() => return,
            }
        }
        let Some((replica, _)) = plan.next() else {
            continue;
        };
        let replica = replica.to_owned();
        plan.done(&replica, now);
        let Ok(path) = ReplicaPath::parse(&replica) else {
            continue;
        };
        let (store, stop, s) = (state.store.clone(), shutdown.clone(), state.clone());
        let name = replica.clone();
        let interrupt: Arc<Interrupt> = Arc::default();
        let check = interrupt.clone();
        let mut task = tokio::task::spawn_blocking(move || {
            let result = drill(&store, &path, &stop, &check)?;
            if let Err(e) = s.drills.record(&name, &result) {
                tracing::error!(replica = %name, error = %e, "drills: cannot record a drill");
            }
            Some(result)
        });
        // A stop reaches the drill between two pages through the shutdown itself, and
        // inside the integrity check through its interrupt handle, sent until the
        // drill has ended (a check starting just after one would miss it).
        let mut stopping = false;
        let result = loop {
            tokio::select! {
                r = &mut task => break r,
                () = shutdown.requested(), if !stopping => stopping = true,
                () = tokio::time::sleep(STOP_POLL), if stopping => {}
            }
            if let (true, Some(handle)) = (stopping, lock(&interrupt).as_ref()) {
                handle.interrupt();
            }
        };
        match result {
            Ok(Some(r)) if r.ok => {
                tracing::info!(%replica, version = r.version, seconds = r.seconds, "restore drill passed");
            }
            Ok(Some(r)) => {
                tracing::error!(%replica, version = r.version, error = r.error.as_deref().unwrap_or(""), "restore drill FAILED");
            }
            Ok(None) => return,
            Err(e) => tracing::error!(%replica, error = %e, "a restore drill panicked"),
        }
        if shutdown.is_requested() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_drills_are_spread_and_later_ones_follow_the_last() {
        let every = Duration::from_secs(24 * 3600);
        let now = Instant::now();
        let mut plan = DrillPlan::new(every);
        for i in 0..50 {
            plan.learn(&format!("acme/db{i}.db"), None, now);
        }
        let dues: Vec<Duration> = plan.due.values().map(|d| d.duration_since(now)).collect();
        assert!(dues.iter().all(|d| *d < FIRST_DRILL_SPREAD), "{dues:?}");
        let distinct: std::collections::HashSet<_> = dues.iter().collect();
        assert!(distinct.len() > 40, "spread out, not all at once: {dues:?}");

        // Drilled an hour ago: due 23 h from now.
        plan.learn("acme/old.db", Some(Duration::from_secs(3600)), now);
        assert_eq!(
            plan.due["acme/old.db"],
            now + every - Duration::from_secs(3600)
        );
        // Overdue (drilled two days ago): within the spread, like a new one.
        plan.learn("acme/late.db", Some(every * 2), now);
        assert!(plan.due["acme/late.db"] < now + FIRST_DRILL_SPREAD);

        plan.done("acme/old.db", now);
        assert_eq!(plan.due["acme/old.db"], now + every);
        plan.keep_only(&[ReplicaPath::parse("acme/old.db").unwrap()]);
        assert_eq!(plan.next(), Some(("acme/old.db", now + every)));
    }

    #[test]
    fn a_short_period_spreads_within_itself() {
        let every = Duration::from_secs(1);
        let now = Instant::now();
        let mut plan = DrillPlan::new(every);
        plan.learn("acme/app.db", None, now);
        assert!(plan.next().unwrap().1 < now + every);
    }
}
