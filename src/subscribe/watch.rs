//! Noticing commits to a local database made by any other connection or process.
//!
//! File events say *something* happened near the database; `PRAGMA data_version` says
//! whether it was a commit. The watcher watches the database's directory (not the file:
//! SQLite deletes and recreates `-wal` and `-journal`), and each event on the database,
//! its `-wal` or its `-journal` nudges a checker thread. `-shm` is ignored: SQLite
//! changes it through a memory map, which makes no event anyway. The checker owns one
//! read-only connection, lets a burst of events settle, then compares the connection's
//! `data_version` with the last one it saw; only a change is reported. So the events
//! that are not commits (readers opening or deleting `-wal`, checkpoints, a rolled-back
//! transaction, a push reading the database) report nothing. One exception: a
//! `TRUNCATE` checkpoint resets the WAL and reads as a change; the push that follows
//! finds nothing new.
//!
//! Each check also walks the database's WAL from where the last walk ended
//! ([`crate::page::Following`]: frame headers only, no SQLite lock), so that the next
//! push knows which pages changed even when checkpoints reset the WAL in between.
//!
//! File events can be missed (a queue overflow, a writer reaching the file through
//! another path), so the checker also checks every `poll` on its own; a change found
//! that way is logged, since it means an event was missed.
//!
//! Invariants: the connection holds no transaction and no lock between checks, each
//! check is one short read (so in rollback mode a writer waits for it at most a moment,
//! and the settling keeps checks out of the middle of a commit), and an idle watcher
//! sleeps: the checker wakes only on an event or once per `poll`. The watcher never
//! writes the database. Like any open connection in WAL mode, the watcher's keeps
//! `-wal` in place when the application's last connection closes (SQLite checkpoints
//! and deletes it only when no connection is left); auto-checkpoints go on as usual.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use notify::{EventKind, RecursiveMode, Watcher as _};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::{Error, Result};

/// The poll a subscriber uses when nothing else is asked for: slow, since file events
/// do the real work.
pub const DEFAULT_POLL: Duration = Duration::from_secs(5);

/// The shortest poll: a zero poll would keep the checker spinning.
pub const MIN_POLL: Duration = Duration::from_millis(10);

/// After a file event, how long the directory must stay quiet before the check: one
/// commit makes a burst of events, and a check in the middle of a rollback-mode commit
/// would make the writer wait for it.
pub const SETTLE: Duration = Duration::from_millis(50);

/// The longest a check is put off by events that keep coming.
pub const MAX_SETTLE: Duration = Duration::from_millis(500);

/// How long a check waits for a writer's lock (rollback mode) before giving up.
pub const CHECK_BUSY_TIMEOUT: Duration = Duration::from_secs(1);

/// When a check found the database locked, the next one is this soon.
const RECHECK_AFTER_BUSY: Duration = Duration::from_millis(200);

/// What the watcher saw: commits by other connections since its last report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// How many changes of `PRAGMA data_version` were observed (1 per report: several
    /// commits between two checks show as one).
    pub commits: u32,
    /// Found by the periodic poll rather than after a file event: an event was missed.
    pub by_poll: bool,
}

/// What the watcher and its checker thread share.
#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    checks: AtomicU64,
}

/// Watches one database for commits; dropping it stops the file watch and the checker
/// thread and waits for the thread to end (at once unless a check is running, then
/// after it: at most [`CHECK_BUSY_TIMEOUT`] plus [`MAX_SETTLE`]), so no thread outlives
/// its watcher.
pub struct Watcher {
    shared: Arc<Shared>,
    nudge: SyncSender<()>,
    /// The checker thread, joined on drop.
    checker: Option<std::thread::JoinHandle<()>>,
    /// The file watch, stopped when dropped.
    _file_watch: DirWatch,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("checks", &self.checks())
            .finish()
    }
}

impl Watcher {
    /// Watches `db`'s directory (notify crate, non-recursive) for the database file,
    /// `db-wal` and `db-journal` (created, modified, removed, renamed; `-shm` and other
    /// files ignored), and polls `PRAGMA data_version` every `poll` on its own idle
    /// connection as a safety net. A commit by any other connection is reported on the
    /// returned channel; events that do not change `PRAGMA data_version` (our own reads
    /// creating or deleting -wal, checkpoints...) are not reported.
    ///
    /// Fails if `db` cannot be opened as an SQLite database or its directory cannot be
    /// watched. The channel closes when the watcher is dropped. A `poll` shorter than
    /// [`MIN_POLL`] counts as [`MIN_POLL`].
    pub fn start(db: &Path, poll: Duration) -> Result<(Watcher, UnboundedReceiver<Seen>)> {
        // SQLite puts -wal and -journal beside the real file, so watch where a symbolic
        // link leads.
        let db = std::fs::canonicalize(db).map_err(|e| Error::io(db, e))?;
        let (dir, name) = match (db.parent(), db.file_name()) {
            (Some(dir), Some(name)) => (dir.to_owned(), name.to_owned()),
            _ => {
                return Err(Error::Usage(format!(
                    "{}: not a database file to watch",
                    db.display()
                )));
            }
        };
        // One slot: a nudge already waiting covers any that come after it.
        let (nudge, nudges) = std::sync::mpsc::sync_channel(1);
        let file_watch = watch_dir(&dir, &name, nudge.clone())?;
        // The baseline is read after the watch has started, so no commit falls between.
        let conn = open(&db)?;
        let version = data_version(&conn).map_err(|e| Error::sqlite(&db, e))?;
        let shared = Arc::new(Shared::default());
        let (seen, seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let checker = Checker {
            db: db.clone(),
            conn,
            version,
            poll: poll.max(MIN_POLL),
            nudges,
            seen,
            shared: Arc::clone(&shared),
            following: crate::page::Following::start(&db),
        };
        let checker = std::thread::Builder::new()
            .name("sqlferry-watch".to_owned())
            .spawn(move || checker.run())
            .map_err(|e| Error::io(&db, e))?;
        let watcher = Watcher {
            shared,
            nudge,
            checker: Some(checker),
            _file_watch: file_watch,
        };
        Ok((watcher, seen_rx))
    }

    /// How many times the checker has read `PRAGMA data_version` since the start, for
    /// diagnostics and tests: it grows with file events and polls, not with commits.
    pub fn checks(&self) -> u64 {
        self.shared.checks.load(Ordering::Relaxed)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Wakes the checker; a full slot means it is being woken already.
        let _ = self.nudge.try_send(());
        if let Some(checker) = self.checker.take()
            && checker.join().is_err()
        {
            tracing::error!("the watcher's checker thread panicked");
        }
    }
}

/// Starts the file watch on `dir`: events on `name`, `name-wal` and `name-journal` send a
/// nudge. The watch is shared ([`DirWatch`]): one per directory in the process.
fn watch_dir(dir: &Path, name: &std::ffi::OsStr, nudge: SyncSender<()>) -> Result<DirWatch> {
    let names: Vec<OsString> = ["", "-wal", "-journal"]
        .iter()
        .map(|suffix| {
            let mut n = name.to_owned();
            n.push(suffix);
            n
        })
        .collect();
    DirWatch::start(
        dir,
        Some(names),
        Arc::new(move || {
            // A full slot already holds a nudge; a closed one means the checker has
            // ended: nothing more to do either way.
            let _ = nudge.try_send(());
        }),
    )
}

/// What an interest in a directory's events calls on each one: it must return at once
/// (it runs on the file watch's thread).
pub type Nudge = Arc<dyn Fn() + Send + Sync>;

/// Interest in file events of one directory: a nudge on each event on one of `names`
/// (on any file when `None`). Registered in the process's one file watch while it
/// lives.
pub struct DirWatch {
    dir: PathBuf,
    id: u64,
}

impl std::fmt::Debug for DirWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirWatch").field("dir", &self.dir).finish()
    }
}

impl DirWatch {
    /// Registers interest in `dir` (an absolute, canonical directory): every event on one
    /// of `names` (any file when `None`), and every event whose file is unknown (notify
    /// lost some), calls `nudge`. The first interest in a directory starts its watch;
    /// the last one dropped stops it.
    pub fn start(dir: &Path, names: Option<Vec<OsString>>, nudge: Nudge) -> Result<DirWatch> {
        let hub = Hub::get().map_err(|e| watch_err(dir, e))?;
        // One registration at a time: the watch is started (or not) for the set of
        // interests this one leaves.
        let mut watcher = hub.watcher.lock().unwrap_or_else(|p| p.into_inner());
        let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
        // The interests' lock is never held across a call into notify: its event
        // thread takes that lock to deliver, and a watch call waits on that thread.
        let first = {
            let mut dirs = hub.dirs.lock().unwrap_or_else(|p| p.into_inner());
            let interests = dirs.entry(dir.to_owned()).or_default();
            interests.push(Interest { id, names, nudge });
            interests.len() == 1
        };
        if first && let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            hub.forget(dir, id);
            return Err(watch_err(dir, e));
        }
        Ok(DirWatch {
            dir: dir.to_owned(),
            id,
        })
    }

    /// How many directories the process watches (diagnostics and tests: one per
    /// directory however many databases it holds).
    pub fn watched_dirs() -> usize {
        HUB.get().map_or(0, |h| {
            h.dirs.lock().unwrap_or_else(|p| p.into_inner()).len()
        })
    }
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        let Some(hub) = HUB.get() else { return };
        let mut watcher = hub.watcher.lock().unwrap_or_else(|p| p.into_inner());
        if hub.forget(&self.dir, self.id) {
            // Gone already (the directory was removed) is fine.
            let _ = watcher.unwatch(&self.dir);
        }
    }
}

fn watch_err(dir: &Path, e: impl std::fmt::Display) -> Error {
    Error::io(
        dir,
        std::io::Error::other(format!("watching for changes: {e}")),
    )
}

/// One interest in a directory's events.
struct Interest {
    id: u64,
    names: Option<Vec<OsString>>,
    nudge: Nudge,
}

type Interests = std::collections::HashMap<PathBuf, Vec<Interest>>;

/// The process's one file watch (notify: one inotify instance and one thread on
/// Linux), shared by every watcher: a daemon with 200 databases in one directory holds
/// one watch, not 200 (and stays far from the default limit of 128 inotify instances
/// per user).
struct Hub {
    watcher: std::sync::Mutex<notify::RecommendedWatcher>,
    dirs: Arc<std::sync::Mutex<Interests>>,
    next_id: AtomicU64,
}

static HUB: std::sync::OnceLock<Hub> = std::sync::OnceLock::new();

/// Held while the hub is made: a failure is not kept, so a later watcher tries again
/// (the inotify instances of this user may have run out for a while).
static MAKING_HUB: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Hub {
    fn get() -> std::result::Result<&'static Hub, String> {
        if let Some(hub) = HUB.get() {
            return Ok(hub);
        }
        let _making = MAKING_HUB.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hub) = HUB.get() {
            return Ok(hub);
        }
        let hub = Hub::new()?;
        Ok(HUB.get_or_init(|| hub))
    }

    fn new() -> std::result::Result<Hub, String> {
        let dirs: Arc<std::sync::Mutex<Interests>> = Arc::default();
        let deliver = Arc::clone(&dirs);
        let handler = move |event: notify::Result<notify::Event>| {
            let dirs = deliver.lock().unwrap_or_else(|p| p.into_inner());
            let event = match event {
                Ok(event) if !event.need_rescan() => event,
                other => {
                    // Events may have been lost: everyone checks rather than waits for
                    // the poll.
                    if let Err(e) = other {
                        tracing::debug!("file events: {e}");
                    }
                    for interest in dirs.values().flatten() {
                        (interest.nudge)();
                    }
                    return;
                }
            };
            if !matches!(
                event.kind,
                EventKind::Any | EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
            ) {
                return;
            }
            for path in &event.paths {
                let (Some(dir), Some(file)) = (path.parent(), path.file_name()) else {
                    continue;
                };
                for interest in dirs.get(dir).into_iter().flatten() {
                    if interest
                        .names
                        .as_ref()
                        .is_none_or(|names| names.iter().any(|n| n == file))
                    {
                        (interest.nudge)();
                    }
                }
            }
        };
        let watcher = notify::recommended_watcher(handler).map_err(|e| e.to_string())?;
        Ok(Hub {
            watcher: std::sync::Mutex::new(watcher),
            dirs,
            next_id: AtomicU64::new(0),
        })
    }

    /// Removes interest `id` in `dir`; true when it was the directory's last.
    fn forget(&self, dir: &Path, id: u64) -> bool {
        let mut dirs = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
        let Some(interests) = dirs.get_mut(dir) else {
            return false;
        };
        interests.retain(|i| i.id != id);
        if interests.is_empty() {
            dirs.remove(dir);
            return true;
        }
        false
    }
}

/// Opens the checker's connection: read-only, and waiting a little for a writer's lock.
///
/// The connection only ever reads `PRAGMA data_version`, and a daemon holds one per
/// database, so it is kept small: no lookaside buffer (120 KiB by default) and a page
/// cache of two pages (from three pages up SQLite allocates 20 at once). About 200 KiB
/// less per database watched.
fn open(db: &Path) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(db, flags).map_err(|e| Error::sqlite(db, e))?;
    // SAFETY: the handle is this open connection's, used on this thread only; with a
    // null buffer and zero sizes SQLite frees its lookaside and allocates none. No
    // statement has run yet, so no lookaside memory is outstanding (which would make
    // the call return SQLITE_BUSY, harmless here).
    let rc = unsafe {
        rusqlite::ffi::sqlite3_db_config(
            conn.handle(),
            rusqlite::ffi::SQLITE_DBCONFIG_LOOKASIDE,
            std::ptr::null_mut::<std::ffi::c_void>(),
            0 as std::ffi::c_int,
            0 as std::ffi::c_int,
        )
    };
    if rc != rusqlite::ffi::SQLITE_OK {
        tracing::debug!(rc, "{}: the lookaside buffer stays", db.display());
    }
    conn.pragma_update(None, "cache_size", 2)
        .map_err(|e| Error::sqlite(db, e))?;
    conn.busy_timeout(CHECK_BUSY_TIMEOUT)
        .map_err(|e| Error::sqlite(db, e))?;
    Ok(conn)
}

/// The connection's `PRAGMA data_version`: a short read transaction, ended on return.
fn data_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("PRAGMA data_version")?
        .query_row([], |row| row.get(0))
}

/// The checker thread's state: it owns the connection.
struct Checker {
    db: PathBuf,
    conn: Connection,
    /// The last `data_version` read.
    version: i64,
    poll: Duration,
    nudges: Receiver<()>,
    seen: UnboundedSender<Seen>,
    shared: Arc<Shared>,
    /// Walks the database's WAL on each check, so pushes know the pages changed across
    /// checkpoints and resets in between (`page/following.rs`).
    following: Option<crate::page::Following>,
}

impl Checker {
    /// Checks on every settled burst of nudges and every `poll`, until the watcher is
    /// dropped or nobody listens.
    fn run(mut self) {
        let mut wait = self.poll;
        let mut failing = false;
        loop {
            let by_poll = match self.nudges.recv_timeout(wait) {
                Ok(()) => {
                    if !self.settle() {
                        break;
                    }
                    false
                }
                Err(RecvTimeoutError::Timeout) => true,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            if self.stopped() {
                break;
            }
            wait = self.poll;
            if let Some(following) = &self.following {
                following.advance();
            }
            self.shared.checks.fetch_add(1, Ordering::Relaxed);
            match data_version(&self.conn) {
                Ok(version) => {
                    failing = false;
                    if version == self.version {
                        continue;
                    }
                    self.version = version;
                    if by_poll {
                        tracing::debug!(
                            "{}: the poll found a commit the file events missed",
                            self.db.display()
                        );
                    }
                    if self
                        .seen
                        .send(Seen {
                            commits: 1,
                            by_poll,
                        })
                        .is_err()
                    {
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.sqlite_error_code(),
                        Some(
                            rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                        )
                    ) =>
                {
                    // A writer holds the database: look again once it is likely done.
                    wait = RECHECK_AFTER_BUSY;
                }
                Err(e) => {
                    // Keep polling: the database may come back (a file being replaced).
                    // Say so once per run of failures, not every poll.
                    if !failing {
                        tracing::warn!("{}: checking for changes: {e}", self.db.display());
                    }
                    failing = true;
                }
            }
        }
        tracing::debug!("{}: watcher stopped", self.db.display());
    }

    /// Waits until no nudge came for [`SETTLE`], or [`MAX_SETTLE`] has passed; false if
    /// the watcher is gone.
    fn settle(&self) -> bool {
        let deadline = Instant::now() + MAX_SETTLE;
        loop {
            if self.stopped() {
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            match self.nudges.recv_timeout(SETTLE.min(left)) {
                Ok(()) => {}
                Err(RecvTimeoutError::Timeout) => return true,
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
    }

    fn stopped(&self) -> bool {
        self.shared.stop.load(Ordering::Relaxed) || self.seen.is_closed()
    }
}
