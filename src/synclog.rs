//! The sync log: every push and pull this machine ran, when, why, what it moved, and
//! whether it worked. `sqlferry status` answers "is every database safe?" from it and
//! `sqlferry history` prints its daily totals.
//!
//! One SQLite file, `$XDG_STATE_HOME/sqlferry/syncs.sqlite`, in WAL mode, shared by
//! every sqlferry process of the user (each write is one short transaction, so
//! concurrent pushes, pulls and subscribers just wait their turn):
//! - `syncs`: one row per sync of the last [`DETAIL_DAYS`] days.
//! - `daily`: older syncs folded into one row per UTC day, database, store, replica,
//!   operation and trigger (counts and sums), so the file stays bounded: a push every
//!   minute for a year is about 10,000 recent rows and a few hundred daily ones, well
//!   under 4 MB (a test inserts that year).
//! - `latest`: per database, store, replica and operation, the last attempt, the last
//!   success and the failures since, kept whatever was folded: what `status` reads.
//!
//! Recording never fails a sync: [`record`] logs a warning and moves on when the file
//! cannot be written (a full disk, a read-only home), since the sync itself already
//! happened.

pub mod running;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use crate::Result;

/// How many days of single syncs are kept before they are folded into daily totals.
pub const DETAIL_DAYS: i64 = 8;

/// How often, at most, a record also folds old rows (seconds).
const FOLD_EVERY_S: i64 = 3600;

const DAY_S: i64 = 86_400;

/// The schema version `PRAGMA user_version` records once [`SCHEMA`] is in place.
const SCHEMA_VERSION: i64 = 1;

/// How long a record waits for another process's record to the log.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS syncs(
        id INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        database TEXT NOT NULL,
        store TEXT NOT NULL,
        replica TEXT NOT NULL,
        op TEXT NOT NULL,
        trigger TEXT NOT NULL,
        pages INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        duration_ms INTEGER NOT NULL,
        version INTEGER,
        created INTEGER NOT NULL,
        error TEXT
    );
    CREATE INDEX IF NOT EXISTS syncs_at ON syncs(at);
    CREATE TABLE IF NOT EXISTS daily(
        day TEXT NOT NULL,
        database TEXT NOT NULL,
        store TEXT NOT NULL,
        replica TEXT NOT NULL,
        op TEXT NOT NULL,
        trigger TEXT NOT NULL,
        syncs INTEGER NOT NULL,
        versions INTEGER NOT NULL,
        pages INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        duration_ms INTEGER NOT NULL,
        failures INTEGER NOT NULL,
        PRIMARY KEY(day, database, store, replica, op, trigger)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS latest(
        database TEXT NOT NULL,
        store TEXT NOT NULL,
        replica TEXT NOT NULL,
        op TEXT NOT NULL,
        attempt_at INTEGER NOT NULL,
        attempt_error TEXT,
        success_at INTEGER,
        success_version INTEGER,
        success_trigger TEXT,
        success_started_ms INTEGER,
        failures_since INTEGER NOT NULL,
        PRIMARY KEY(database, store, replica, op)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
";

/// One push or pull, as it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sync {
    /// When it ended, seconds since the Unix epoch.
    pub at: i64,
    /// When it started, milliseconds since the Unix epoch: a push read the database
    /// as of about then, so a write after it is not in the version it made.
    pub started_ms: i64,
    /// The local database (its [`crate::config::database_key`]).
    pub database: String,
    /// The store's URL.
    pub store: String,
    /// The replica path.
    pub replica: String,
    /// `push` or `pull`.
    pub op: &'static str,
    /// Why it ran: `manual` for a command, else the subscriber's trigger (`start`,
    /// `idle`, `max-interval`, `changes`, `sync-now`, `shutdown`, `retry`,
    /// `new-version`, `reconnect`).
    pub trigger: String,
    /// Pages sent or received.
    pub pages: u64,
    /// Bytes sent or received.
    pub bytes: u64,
    /// How long it took.
    pub duration: Duration,
    /// The replica's version it left the database at (`None` when it failed early).
    pub version: Option<u64>,
    /// Whether it made a new version (a push that changed something).
    pub created: bool,
    /// Why it failed; `None` when it worked.
    pub error: Option<String>,
}

/// The health of one database's sync with one replica, in one direction.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Health {
    /// The local database.
    pub database: String,
    /// The store's URL.
    pub store: String,
    /// The replica path.
    pub replica: String,
    /// `push` or `pull`.
    pub op: String,
    /// When the last attempt ended.
    pub attempt_at: i64,
    /// Its error, when it failed.
    pub attempt_error: Option<String>,
    /// When the last success ended.
    pub success_at: Option<i64>,
    /// The version the last success left.
    pub success_version: Option<u64>,
    /// Why the last success ran.
    pub success_trigger: Option<String>,
    /// When the last success started, milliseconds since the Unix epoch.
    pub success_started_ms: Option<i64>,
    /// Failed attempts since the last success.
    pub failures_since: u64,
}

/// One UTC day of syncs, summed over databases and replicas (or one database's).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Day {
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    /// Syncs run (pushes and pulls).
    pub syncs: u64,
    /// New versions made by pushes.
    pub versions: u64,
    /// Pages moved.
    pub pages: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Total duration of the syncs, milliseconds.
    pub duration_ms: u64,
    /// Syncs that failed.
    pub failures: u64,
    /// Syncs per trigger.
    pub triggers: std::collections::BTreeMap<String, u64>,
}

impl Day {
    /// The mean duration of a sync that day.
    pub fn average(&self) -> Duration {
        Duration::from_millis(self.duration_ms.checked_div(self.syncs).unwrap_or(0))
    }
}

/// The variable that turns the sync log off: `SQLFERRY_SYNC_LOG=off`.
pub const OFF_VAR: &str = "SQLFERRY_SYNC_LOG";

/// The sync log file of this user: `$XDG_STATE_HOME/sqlferry/syncs.sqlite`; `None`
/// when there is no state directory, or when `SQLFERRY_SYNC_LOG=off` (nothing is
/// recorded, and `status` and `history` know of no sync).
pub fn default_path() -> Option<PathBuf> {
    if std::env::var_os(OFF_VAR).is_some_and(|v| v == "off") {
        return None;
    }
    Some(crate::config::state_dir()?.join("syncs.sqlite"))
}

/// Records `sync` in this user's sync log. Never fails: a log that cannot be written
/// after a sync that worked is a warning (the sync itself happened; `status` will not
/// know); after a failed sync it is only logged at debug level, since the failure's
/// own error line says what the user must know (often the same cause: a read-only or
/// full disk).
pub fn record(sync: &Sync) {
    /// The log this process wrote last, kept open: a subscriber records a sync every
    /// few seconds, and opening the file was most of a record's cost.
    static OPEN: std::sync::Mutex<Option<Log>> = std::sync::Mutex::new(None);
    let Some(path) = default_path() else {
        return;
    };
    /// Whether this process recorded a sync before: its first record (a one-shot push
    /// or pull's only one) tries the log alone ([`Log::open_alone`]).
    static RECORDED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let mut open = OPEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let cached = open.take().filter(|log| log.path == path);
    // The first record: no log is cached yet.
    if !RECORDED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        match Log::open_alone(&path) {
            // Recorded, and closed at once: the file is this process's alone while
            // this connection lives.
            Ok(Some(log)) => match log.record(sync) {
                Ok(()) => return,
                Err(e) => {
                    tracing::debug!("recording in the sync log alone failed ({e}); again, shared")
                }
            },
            Ok(None) => {}
            Err(e) => tracing::debug!("the sync log could not be opened alone ({e}); shared"),
        }
    }
    let attempt = |cached: Option<Log>| {
        match cached {
            Some(log) => Ok(log),
            None => Log::open(&path),
        }
        .and_then(|log| {
            log.record(sync)?;
            Ok(log)
        })
    };
    let result = match attempt(cached) {
        // A damaged log only holds the record of past syncs: keep it for a look, start
        // a new one, and say so once.
        Err(e) if is_damaged(&e) => match set_aside(&path) {
            Ok(aside) => {
                tracing::warn!(
                    "the sync log {} was damaged ({e}): moved to {}, a new one started",
                    path.display(),
                    aside.display()
                );
                attempt(None)
            }
            Err(_) => Err(e),
        },
        other => other,
    };
    let result = result.map(|log| *open = Some(log));
    if let Err(e) = result {
        match sync.error {
            None => tracing::warn!("the sync log {} was not updated: {e}", path.display()),
            Some(_) => tracing::debug!("the sync log {} was not updated: {e}", path.display()),
        }
    }
}

/// Whether `e` says the log file is not a database, or a damaged one.
fn is_damaged(e: &crate::Error) -> bool {
    matches!(
        e.kind(),
        crate::ErrorKind::NotADatabase | crate::ErrorKind::Verification
    )
}

/// Moves a damaged log (and its WAL and shared-memory files) to
/// `syncs.sqlite.damaged-<unix seconds>`; returns where.
fn set_aside(path: &Path) -> std::io::Result<PathBuf> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".damaged-{}", crate::epoch::now()));
    let aside = PathBuf::from(aside);
    std::fs::rename(path, &aside)?;
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(side));
    }
    Ok(aside)
}

/// An open sync log.
#[derive(Debug)]
pub struct Log {
    conn: Connection,
    path: PathBuf,
}

impl Log {
    /// Opens (creating if needed) the log at `path`.
    pub fn open(path: &Path) -> Result<Log> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
        }
        let sql = |e| crate::Error::sqlite(path, e);
        let conn = Connection::open(path).map_err(sql)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql)?;
        // A log made before needs no schema work (a few ms a push otherwise): its
        // user_version says it is whole. WAL mode is kept in the file once set.
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql)?;
        if version < SCHEMA_VERSION {
            conn.pragma_update(None, "journal_mode", "WAL")
                .map_err(sql)?;
            conn.execute_batch(SCHEMA).map_err(sql)?;
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(sql)?;
        }
        Ok(Log {
            conn,
            path: path.to_owned(),
        })
    }

    /// Opens the log at `path` for this connection alone (`locking_mode = EXCLUSIVE`),
    /// when no other connection has it open; `None` when one has (or the file is new:
    /// [`Log::open`] sets it up). Held only for one record, then closed.
    ///
    /// Why (issue 10: a push that changes nothing writes under 100 KB): the first
    /// connection to open a WAL database truncates its `-shm` file and writes it again,
    /// eight pages of 4 KiB, which a one-shot push or pull, the only process with the
    /// log open, did at every sync. A connection in exclusive locking mode from its first
    /// access keeps that index in its own memory and never touches the `-shm` file (see
    /// SQLite's "WAL without shared memory"). It holds the file's exclusive lock until
    /// it closes: another process's record or `status` waits its busy timeout for those
    /// few milliseconds, and one that has the log open (a subscriber keeps it) holds a
    /// shared lock, so this open fails at once and the record is made shared. The WAL
    /// is left on close (`kept_wal::keep_wal_on_close`), as a shared
    /// connection that is never closed leaves it; the next shared opener rebuilds the
    /// `-shm` from it.
    pub fn open_alone(path: &Path) -> Result<Option<Log>> {
        if !path.exists() {
            return Ok(None);
        }
        let alone = || -> rusqlite::Result<Option<Connection>> {
            let conn = Connection::open(path)?;
            conn.busy_timeout(Duration::ZERO)?;
            conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
            crate::page::kept_wal::keep_wal_on_close(&conn)?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            // The first access takes the exclusive lock (and, the log being in WAL
            // mode, builds the wal-index in memory).
            let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
            let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
            if version < SCHEMA_VERSION || !mode.eq_ignore_ascii_case("wal") {
                return Ok(None);
            }
            conn.busy_timeout(BUSY_TIMEOUT)?;
            Ok(Some(conn))
        };
        match alone() {
            Ok(conn) => Ok(conn.map(|conn| Log {
                conn,
                path: path.to_owned(),
            })),
            // Another connection has the file.
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy =>
            {
                Ok(None)
            }
            Err(e) => Err(crate::Error::sqlite(path, e)),
        }
    }

    /// Opens the log at `path` for reading only; `None` when there is none yet.
    pub fn open_existing(path: &Path) -> Result<Option<Log>> {
        if !path.exists() {
            return Ok(None);
        }
        Log::open(path).map(Some).map_err(|e| {
            if !is_damaged(&e) {
                return e;
            }
            let why = format!(
                "the sync log is damaged ({e}); it only holds the record of past syncs: \
                 the next push or pull moves it aside and starts a new one"
            );
            crate::Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::InvalidData, why),
            )
        })
    }

    /// Adds `sync`, updates its `latest` row, and folds old syncs when that is due.
    pub fn record(&self, sync: &Sync) -> Result<()> {
        self.try_record(sync).map_err(|e| self.sql(e))
    }

    fn sql(&self, e: rusqlite::Error) -> crate::Error {
        crate::Error::sqlite(&self.path, e)
    }

    fn try_record(&self, sync: &Sync) -> rusqlite::Result<()> {
        // IMMEDIATE: take the write lock before the first read, so a writer waits its
        // turn (busy timeout) instead of failing on a snapshot another one moved.
        let tx = rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Immediate,
        )?;
        self.insert(sync)?;
        self.fold_if_due(sync.at)?;
        tx.commit()?;
        // The connection is never closed (`record` keeps it until the process exits),
        // so nothing else would ever copy the WAL back and restart it.
        crate::page::kept_wal::trim_wal(&self.conn, &self.path, BUSY_TIMEOUT);
        Ok(())
    }

    fn insert(&self, s: &Sync) -> rusqlite::Result<()> {
        let duration_ms = i64::try_from(s.duration.as_millis()).unwrap_or(i64::MAX);
        self.conn
            .prepare_cached(
                "INSERT INTO syncs(at, database, store, replica, op, trigger, pages, bytes,
                     duration_ms, version, created, error)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?
            .execute(params![
                s.at,
                s.database,
                s.store,
                s.replica,
                s.op,
                s.trigger,
                s.pages as i64,
                s.bytes as i64,
                duration_ms,
                s.version.map(|v| v as i64),
                s.created,
                s.error,
            ])?;
        let (success_at, success_version, success_trigger, success_started_ms) = match s.error {
            None => (
                Some(s.at),
                s.version.map(|v| v as i64),
                Some(s.trigger.as_str()),
                Some(s.started_ms),
            ),
            Some(_) => (None, None, None, None),
        };
        self.conn
            .prepare_cached(
                "INSERT INTO latest(database, store, replica, op, attempt_at, attempt_error,
                     success_at, success_version, success_trigger, success_started_ms,
                     failures_since)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT(database, store, replica, op) DO UPDATE SET
                     attempt_at = excluded.attempt_at,
                     attempt_error = excluded.attempt_error,
                     success_at = coalesce(excluded.success_at, success_at),
                     success_version = CASE WHEN excluded.success_at IS NULL
                         THEN success_version ELSE excluded.success_version END,
                     success_trigger = coalesce(excluded.success_trigger, success_trigger),
                     success_started_ms = coalesce(excluded.success_started_ms,
                         success_started_ms),
                     failures_since = CASE WHEN excluded.attempt_error IS NULL
                         THEN 0 ELSE failures_since + 1 END",
            )?
            .execute(params![
                s.database,
                s.store,
                s.replica,
                s.op,
                s.at,
                s.error,
                success_at,
                success_version,
                success_trigger,
                success_started_ms,
                i64::from(s.error.is_some()),
            ])?;
        Ok(())
    }

    /// Folds syncs older than [`DETAIL_DAYS`] before `now` into daily totals, at most
    /// once an hour (the last fold's time is kept in the file).
    fn fold_if_due(&self, now: i64) -> rusqlite::Result<()> {
        let last: Option<i64> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'folded_at'", [], |r| {
                r.get(0)
            })
            .optional()?;
        if last.is_some_and(|t| now - t < FOLD_EVERY_S && t <= now) {
            return Ok(());
        }
        self.try_fold(now)
    }

    /// Folds every sync older than [`DETAIL_DAYS`] before `now` into daily totals.
    pub fn fold(&self, now: i64) -> Result<()> {
        self.try_fold(now).map_err(|e| self.sql(e))
    }

    fn try_fold(&self, now: i64) -> rusqlite::Result<()> {
        let before = now - DETAIL_DAYS * DAY_S;
        self.conn.execute(
            "INSERT INTO daily(day, database, store, replica, op, trigger, syncs, versions,
                 pages, bytes, duration_ms, failures)
             SELECT date(at, 'unixepoch'), database, store, replica, op, trigger, count(*),
                 sum(created), sum(pages), sum(bytes), sum(duration_ms),
                 sum(error IS NOT NULL)
             FROM syncs WHERE at < ?1
             GROUP BY 1, 2, 3, 4, 5, 6
             ON CONFLICT DO UPDATE SET
                 syncs = syncs + excluded.syncs,
                 versions = versions + excluded.versions,
                 pages = pages + excluded.pages,
                 bytes = bytes + excluded.bytes,
                 duration_ms = duration_ms + excluded.duration_ms,
                 failures = failures + excluded.failures",
            [before],
        )?;
        self.conn
            .execute("DELETE FROM syncs WHERE at < ?1", [before])?;
        self.conn.execute(
            "INSERT INTO meta(key, value) VALUES ('folded_at', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [now],
        )?;
        Ok(())
    }

    /// The health of every (database, store, replica, operation) this log knows, or
    /// of those of `database` only; oldest success first, never-succeeded first of all.
    pub fn health(&self, database: Option<&str>) -> Result<Vec<Health>> {
        self.try_health(database).map_err(|e| self.sql(e))
    }

    fn try_health(&self, database: Option<&str>) -> rusqlite::Result<Vec<Health>> {
        let mut stmt = self.conn.prepare(
            "SELECT database, store, replica, op, attempt_at, attempt_error, success_at,
                 success_version, success_trigger, success_started_ms, failures_since
             FROM latest WHERE ?1 IS NULL OR database = ?1
             ORDER BY success_at IS NOT NULL, success_at, database, replica, op",
        )?;
        let rows = stmt.query_map([database], |r| {
            Ok(Health {
                database: r.get(0)?,
                store: r.get(1)?,
                replica: r.get(2)?,
                op: r.get(3)?,
                attempt_at: r.get(4)?,
                attempt_error: r.get(5)?,
                success_at: r.get(6)?,
                success_version: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
                success_trigger: r.get(8)?,
                success_started_ms: r.get(9)?,
                failures_since: r.get::<_, i64>(10)? as u64,
            })
        })?;
        rows.collect()
    }

    /// One row per UTC day for the `days` days up to `now` (today included), newest
    /// first, of every sync or of those of `database` and/or `replica` only. Days
    /// without a sync are left out.
    pub fn days(
        &self,
        database: Option<&str>,
        replica: Option<&str>,
        days: u32,
        now: i64,
    ) -> Result<Vec<Day>> {
        self.try_days(database, replica, days, now)
            .map_err(|e| self.sql(e))
    }

    fn try_days(
        &self,
        database: Option<&str>,
        replica: Option<&str>,
        days: u32,
        now: i64,
    ) -> rusqlite::Result<Vec<Day>> {
        let since = now - i64::from(days.saturating_sub(1)) * DAY_S;
        let mut stmt = self.conn.prepare(
            "SELECT day, trigger, sum(syncs), sum(versions), sum(pages), sum(bytes),
                 sum(duration_ms), sum(failures)
             FROM (
                 SELECT day, database, replica, trigger, syncs, versions, pages, bytes,
                     duration_ms, failures
                 FROM daily
                 UNION ALL
                 SELECT date(at, 'unixepoch'), database, replica, trigger, 1, created, pages,
                     bytes, duration_ms, error IS NOT NULL
                 FROM syncs
             )
             WHERE day >= date(?1, 'unixepoch') AND day <= date(?2, 'unixepoch')
                 AND (?3 IS NULL OR database = ?3) AND (?4 IS NULL OR replica = ?4)
             GROUP BY day, trigger
             ORDER BY day DESC, trigger",
        )?;
        let mut out: Vec<Day> = Vec::new();
        let mut rows = stmt.query(params![since, now, database, replica])?;
        while let Some(r) = rows.next()? {
            let day: String = r.get(0)?;
            if out.last().is_none_or(|d| d.day != day) {
                out.push(Day {
                    day,
                    ..Day::default()
                });
            }
            let d = out.last_mut().expect("pushed above");
            let syncs = r.get::<_, i64>(2)? as u64;
            d.triggers.insert(r.get(1)?, syncs);
            d.syncs += syncs;
            d.versions += r.get::<_, i64>(3)? as u64;
            d.pages += r.get::<_, i64>(4)? as u64;
            d.bytes += r.get::<_, i64>(5)? as u64;
            d.duration_ms += r.get::<_, i64>(6)? as u64;
            d.failures += r.get::<_, i64>(7)? as u64;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sync(at: i64, op: &'static str, trigger: &str, error: Option<&str>) -> Sync {
        Sync {
            at,
            started_ms: at * 1000 - 200,
            database: "/srv/app.db".into(),
            store: "ws://backup:8080".into(),
            replica: "acme/app.db".into(),
            op,
            trigger: trigger.into(),
            pages: 10,
            bytes: 40_960,
            duration: Duration::from_millis(200),
            version: error.is_none().then_some(7),
            created: error.is_none() && op == "push",
            error: error.map(str::to_owned),
        }
    }

    /// 2026-12-01T12:00:00Z.
    const NOON: i64 = 1_796_126_400;

    #[test]
    fn a_log_alone_records_without_touching_the_shared_memory_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("syncs.sqlite");
        let shm = dir.path().join("syncs.sqlite-shm");
        // A new log is set up shared; closed, SQLite removes its -shm.
        assert!(Log::open_alone(&path).unwrap().is_none(), "no log yet");
        Log::open(&path)
            .unwrap()
            .record(&sync(NOON, "push", "manual", None))
            .unwrap();
        assert!(!shm.exists());
        // Alone, a record leaves no -shm (a shared one makes it), and its WAL stays.
        let alone = Log::open_alone(&path).unwrap().expect("no one else has it");
        alone
            .record(&sync(NOON + 60, "push", "manual", None))
            .unwrap();
        // Meanwhile another connection can not even read it: nothing half-done is seen.
        let other = Connection::open(&path).unwrap();
        other.busy_timeout(Duration::ZERO).unwrap();
        let busy = other.query_row("SELECT count(*) FROM syncs", [], |r| r.get::<_, i64>(0));
        assert!(
            matches!(&busy, Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy),
            "{busy:?}"
        );
        drop(alone);
        assert!(!shm.exists(), "alone, the wal-index stays in memory");
        assert!(dir.path().join("syncs.sqlite-wal").exists());
        // A shared reader sees both syncs; while it has the log open, no one has it
        // alone, and a record made shared lands beside them.
        let shared = Log::open(&path).unwrap();
        assert!(
            Log::open_alone(&path).unwrap().is_none(),
            "a shared connection has it"
        );
        Log::open(&path)
            .unwrap()
            .record(&sync(NOON + 120, "pull", "manual", None))
            .unwrap();
        let n: i64 = shared
            .conn
            .query_row("SELECT count(*) FROM syncs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 3);
        let ok: String = shared
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
    }

    #[test]
    fn latest_keeps_the_last_success_and_counts_failures_since() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(&dir.path().join("syncs.sqlite")).unwrap();
        log.record(&sync(NOON, "push", "idle", None)).unwrap();
        log.record(&sync(
            NOON + 60,
            "push",
            "retry",
            Some("connection refused"),
        ))
        .unwrap();
        log.record(&sync(
            NOON + 120,
            "push",
            "retry",
            Some("connection refused"),
        ))
        .unwrap();
        let h = log.health(None).unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].success_at, Some(NOON));
        assert_eq!(h[0].success_version, Some(7));
        assert_eq!(h[0].success_trigger.as_deref(), Some("idle"));
        assert_eq!(h[0].attempt_at, NOON + 120);
        assert_eq!(h[0].attempt_error.as_deref(), Some("connection refused"));
        assert_eq!(h[0].failures_since, 2);

        log.record(&sync(NOON + 180, "push", "max-interval", None))
            .unwrap();
        let h = log.health(Some("/srv/app.db")).unwrap();
        assert_eq!((h[0].failures_since, h[0].attempt_error.clone()), (0, None));
        assert_eq!(h[0].success_trigger.as_deref(), Some("max-interval"));
        assert!(log.health(Some("/srv/other.db")).unwrap().is_empty());
    }

    #[test]
    fn days_sum_recent_and_folded_syncs_alike() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(&dir.path().join("syncs.sqlite")).unwrap();
        // Ten days ago (folded later) and today (kept in detail).
        for at in [NOON - 10 * DAY_S, NOON - 10 * DAY_S + 60, NOON, NOON + 60] {
            log.record(&sync(at, "push", "idle", None)).unwrap();
        }
        log.record(&sync(NOON + 120, "push", "retry", Some("disk full")))
            .unwrap();
        log.record(&sync(NOON + 180, "pull", "new-version", None))
            .unwrap();
        log.fold(NOON + 200).unwrap();
        let remaining: i64 = log
            .conn
            .query_row("SELECT count(*) FROM syncs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(remaining, 4, "the two old syncs were folded");

        let days = log.days(None, None, 14, NOON + 200).unwrap();
        assert_eq!(days.len(), 2);
        let today = &days[0];
        assert_eq!(today.day, "2026-12-01");
        assert_eq!((today.syncs, today.versions, today.failures), (4, 2, 1));
        assert_eq!(today.pages, 40);
        assert_eq!(today.average(), Duration::from_millis(200));
        assert_eq!(today.triggers["idle"], 2);
        assert_eq!(today.triggers["retry"], 1);
        assert_eq!(today.triggers["new-version"], 1);
        let old = &days[1];
        assert_eq!(old.day, "2026-11-21");
        assert_eq!((old.syncs, old.versions, old.failures), (2, 2, 0));
        assert_eq!(log.days(None, None, 7, NOON + 200).unwrap().len(), 1);
    }

    #[test]
    fn a_year_of_a_push_every_minute_stays_under_4_mb() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("syncs.sqlite");
        let log = Log::open(&path).unwrap();
        let start = NOON - DAY_S / 2 - 365 * DAY_S; // midnight, a year before today
        // One transaction per simulated hour, as `record` folds at most hourly.
        for hour in 0..365 * 24 {
            let tx = log.conn.unchecked_transaction().unwrap();
            for minute in 0..60 {
                let at = start + hour * 3600 + minute * 60;
                let error = (minute == 30).then_some("server busy");
                log.insert(&sync(at, "push", "idle", error)).unwrap();
            }
            log.fold_if_due(start + hour * 3600 + 3599).unwrap();
            tx.commit().unwrap();
        }
        log.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
        let size = std::fs::metadata(&path).unwrap().len();
        eprintln!("the sync log after a year of a push a minute: {size} bytes");
        assert!(size < 4_000_000, "the log is {size} bytes after a year");
        let days = log.days(None, None, 400, NOON - DAY_S).unwrap();
        assert_eq!(days.len(), 365);
        assert_eq!(days.iter().map(|d| d.syncs).sum::<u64>(), 365 * 24 * 60);
        assert_eq!(days.iter().map(|d| d.failures).sum::<u64>(), 365 * 24);
    }

    #[test]
    fn a_damaged_log_is_refused_with_advice_then_set_aside_by_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("syncs.sqlite");
        std::fs::write(&path, vec![0x5a; 5000]).unwrap();
        let err = Log::open_existing(&path).unwrap_err();
        assert!(err.to_string().contains("moves it aside"), "{err}");
        assert_eq!(err.kind(), crate::ErrorKind::LocalIo);

        let aside = set_aside(&path).unwrap();
        assert_eq!(
            std::fs::read(&aside).unwrap(),
            vec![0x5a; 5000],
            "kept for a look"
        );
        let log = Log::open(&path).unwrap();
        log.record(&sync(NOON, "push", "idle", None)).unwrap();
        assert_eq!(log.health(None).unwrap().len(), 1);
    }

    #[test]
    fn concurrent_writers_lose_no_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("syncs.sqlite");
        Log::open(&path).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let log = Log::open(&path).unwrap();
                    for i in 0..50 {
                        let mut s = sync(NOON + i, "push", "idle", None);
                        s.database = format!("/srv/db{t}.db");
                        log.record(&s).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let log = Log::open(&path).unwrap();
        assert_eq!(log.health(None).unwrap().len(), 4);
        assert_eq!(log.days(None, None, 1, NOON + 100).unwrap()[0].syncs, 200);
    }
}
