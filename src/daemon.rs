//! `sqlferry daemon`: many push and pull subscribers in one process, from one
//! configuration file ([`config`]), reloaded on request (SIGHUP).
//!
//! The file becomes a set of [`Unit`]s: a push subscriber per database and destination,
//! a pull subscriber per followed replica, and a scanner per watched directory, which
//! keeps a push unit per database (and destination) it finds. Each unit runs on a task
//! of its own under a supervisor:
//!
//! - A unit that fails (a database that does not exist yet, a server that refuses the
//!   key) is reported and started again after a backoff (1 s doubling to 60 s); it
//!   never stops the others.
//! - A reload reads and checks the whole file first; a bad file is refused (its line and
//!   reason reported) and nothing changes. A good one is compared with the running set
//!   by unit identity: units gone are stopped (gracefully: pending changes pushed
//!   first), changed ones are stopped and started again with the new settings (the new
//!   one waits for the old one to end), the others are not touched.
//! - Shutdown is the one [`Shutdown`]: a graceful request stops every unit gracefully,
//!   a forced one stops them at once.
//!
//! Resources stay flat with the number of databases: the file watch is one per
//! directory ([`crate::subscribe::watch::DirWatch`]), an idle unit sleeps, and at most
//! `max_concurrent_pushes` pushes run at once (the others wait for a permit).

pub mod config;
pub mod directory;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

pub use config::{Config, Refused, Target, Unit};

use crate::client::{Connection, Puller, Pusher};
use crate::crypt::EncryptionKey;
use crate::shutdown::Shutdown;
use crate::subscribe::Event;
use crate::subscribe::plan::{self, Destination, Ended, PushOptions};
use crate::{Error, Result};

/// What the daemon tells its user, per unit (or about the file, labelled `config`).
#[derive(Debug)]
pub enum Note {
    /// One of the unit's subscriber events.
    Event(Event),
    /// The unit failed; it starts again after `retry_in`.
    Failed {
        /// Why.
        error: Error,
        /// When it starts again.
        retry_in: Duration,
    },
    /// The unit stopped, and why (`removed from the configuration`, `changed`, …).
    Stopped(String),
    /// A watched directory found a database (its push units start).
    Found(PathBuf),
    /// A database left a watched directory (its push units stop).
    Dropped(PathBuf),
    /// The configuration was read: how many units it makes.
    Loaded {
        /// The file.
        path: PathBuf,
        /// Its units.
        units: usize,
    },
    /// A reload was applied.
    Reloaded(Diff),
    /// A reload was refused: the file's line and reason. The running set is kept.
    Refused(Refused),
}

/// Where the daemon's notes go; called from any of its tasks, it must not block.
pub type Report = Arc<dyn Fn(&str, Note) + Send + Sync>;

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// Units started.
    pub added: usize,
    /// Units stopped.
    pub removed: usize,
    /// Units restarted with new settings.
    pub changed: usize,
    /// Units left running as they were.
    pub kept: usize,
}

/// Where the daemon is in its life, for a service manager (systemd's `READY=1`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The configuration is loaded and its units started.
    Ready,
    /// A reload is being applied.
    Reloading,
    /// Stopping.
    Stopping,
}

/// How the daemon ended: the units that stopped with changes they could not push.
#[derive(Debug, Default)]
pub struct Stopped {
    /// Unit label and the last push failure, for each unit that left changes behind.
    pub unpushed: Vec<(String, Error)>,
}

/// What every unit shares.
#[derive(Clone)]
struct Shared {
    report: Report,
    permits: Arc<Semaphore>,
}

/// Runs the daemon of the configuration file `path` until `shutdown`; each message on
/// `reload` reloads the file. `phase` hears the daemon's phases. A file that cannot be
/// loaded at the start is an error (a usage error: nothing was started).
pub async fn run(
    path: &Path,
    shutdown: &Shutdown,
    reload: &mut tokio::sync::mpsc::Receiver<()>,
    report: Report,
    mut phase: impl FnMut(Phase),
) -> Result<Stopped> {
    let config = load(path).await.map_err(|e| Error::Usage(e.0))?;
    let shared = Shared {
        report: Arc::clone(&report),
        permits: Arc::new(Semaphore::new(config.max_concurrent_pushes)),
    };
    let mut concurrency = config.max_concurrent_pushes;
    let mut units = Units::new(shared.clone(), false);
    report(
        "config",
        Note::Loaded {
            path: path.to_owned(),
            units: config.units.len(),
        },
    );
    units.apply(config.units, "removed from the configuration");
    phase(Phase::Ready);
    let mut trim = tokio::time::interval(TRIM_EVERY);
    trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = trim.tick() => {
                // Idle (no push holds a permit): hand back what the last pushes freed.
                // Holding every permit keeps pushes from starting meanwhile.
                if let Ok(all) = shared.permits.try_acquire_many(concurrency as u32) {
                    let _ = tokio::task::spawn_blocking(crate::memory::release_freed).await;
                    drop(all);
                }
            }
            asked = reload.recv() => {
                if asked.is_none() {
                    // Nobody can ask any more: wait for the stop alone.
                    shutdown.requested().await;
                    break;
                }
                phase(Phase::Reloading);
                match load(path).await {
                    Ok(config) => {
                        let wanted = config.max_concurrent_pushes;
                        if wanted > concurrency {
                            shared.permits.add_permits(wanted - concurrency);
                        } else if wanted < concurrency {
                            // Permits held now come back and are kept; pushes past the
                            // new bound finish first.
                            let gone = shared.permits.forget_permits(concurrency - wanted);
                            if gone < concurrency - wanted {
                                let rest = concurrency - wanted - gone;
                                let permits = Arc::clone(&shared.permits);
                                tokio::spawn(async move {
                                    if let Ok(p) = permits.acquire_many(rest as u32).await {
                                        p.forget();
                                    }
                                });
                            }
                        }
                        concurrency = wanted;
                        let diff = units.apply(config.units, "removed from the configuration");
                        report("config", Note::Reloaded(diff));
                    }
                    Err(refused) => report("config", Note::Refused(refused)),
                }
                phase(Phase::Ready);
            }
            () = shutdown.requested() => break,
        }
    }
    phase(Phase::Stopping);
    Ok(units.stop_all(shutdown).await)
}

/// How often an idle daemon hands freed memory back: 200 start pushes on many threads
/// leave glibc's arenas at their peak (about 60 MiB) otherwise.
const TRIM_EVERY: Duration = Duration::from_secs(30);

/// Reads and checks the file off the async threads.
async fn load(path: &Path) -> std::result::Result<Config, Refused> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || Config::load(&path))
        .await
        .unwrap_or_else(|e| Err(Refused(format!("reading the configuration: {e}"))))
}

/// A unit's supervisor task: it ends with the unit's label and last push failure when
/// the unit stopped with changes not pushed.
type Task = JoinHandle<Option<(String, Error)>>;

/// A running unit.
struct Running {
    unit: Unit,
    stop: Shutdown,
    task: Task,
}

/// A set of running units, by id: the daemon's, and each watched directory's.
struct Units {
    shared: Shared,
    running: HashMap<String, Running>,
    /// Units stopped by a change, still finishing: waited for (and forced with the
    /// rest) at the end.
    stopping: Vec<(Shutdown, Task)>,
    /// Stop removed units at once instead of gracefully (a directory's databases that
    /// were deleted have nothing left to push).
    force_removed: bool,
}

impl Units {
    fn new(shared: Shared, force_removed: bool) -> Units {
        Units {
            shared,
            running: HashMap::new(),
            stopping: Vec::new(),
            force_removed,
        }
    }

    /// Makes the running set `wanted`: starts what is new, stops what is gone (saying
    /// `why`), restarts what changed, leaves the rest alone.
    fn apply(&mut self, mut wanted: BTreeMap<String, Unit>, why: &str) -> Diff {
        let mut diff = Diff::default();
        let ids: Vec<String> = self.running.keys().cloned().collect();
        for id in ids {
            match wanted.remove(&id) {
                None => {
                    let old = self.running.remove(&id).expect("listed");
                    diff.removed += 1;
                    self.stop(old, why);
                }
                Some(unit) if unit == self.running[&id].unit => {
                    diff.kept += 1;
                }
                Some(unit) => {
                    let old = self.running.remove(&id).expect("listed");
                    diff.changed += 1;
                    old.stop.begin();
                    (self.shared.report)(
                        &old.unit.label(),
                        Note::Stopped("changed in the configuration; starting again".into()),
                    );
                    let started = self.start(unit, Some((old.stop, old.task)));
                    self.running.insert(id, started);
                }
            }
        }
        for (id, unit) in wanted {
            diff.added += 1;
            let started = self.start(unit, None);
            self.running.insert(id, started);
        }
        self.stopping.retain(|(_, t)| !t.is_finished());
        diff
    }

    fn stop(&mut self, old: Running, why: &str) {
        if self.force_removed {
            old.stop.force();
        } else {
            old.stop.begin();
        }
        (self.shared.report)(&old.unit.label(), Note::Stopped(why.to_owned()));
        self.stopping.push((old.stop, old.task));
    }

    fn start(&self, unit: Unit, previous: Option<(Shutdown, Task)>) -> Running {
        let stop = Shutdown::new();
        let task = tokio::spawn(supervise(
            unit.clone(),
            stop.clone(),
            self.shared.clone(),
            previous,
        ));
        Running { unit, stop, task }
    }

    /// Stops every unit as `shutdown` asks (gracefully; at once when it is forced, now
    /// or while waiting) and waits for them all.
    async fn stop_all(mut self, shutdown: &Shutdown) -> Stopped {
        let mut stops: Vec<Shutdown> = self.running.values().map(|r| r.stop.clone()).collect();
        stops.extend(self.stopping.iter().map(|(s, _)| s.clone()));
        for stop in &stops {
            if shutdown.is_forced() {
                stop.force();
            } else {
                stop.begin();
            }
        }
        let mut tasks: Vec<Task> = self.running.drain().map(|(_, r)| r.task).collect();
        tasks.extend(self.stopping.drain(..).map(|(_, t)| t));
        let all = futures_util::future::join_all(tasks);
        tokio::pin!(all);
        let ended = tokio::select! {
            ended = &mut all => ended,
            () = shutdown.forced() => {
                for stop in &stops {
                    stop.force();
                }
                all.await
            }
        };
        Stopped {
            unpushed: ended.into_iter().filter_map(|r| r.ok().flatten()).collect(),
        }
    }
}

/// How long a unit must have run for its failures to count from zero again.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// Runs `unit` until `stop`, starting it again after each failure. Returns the unit's
/// label and last push failure when it stopped with changes not pushed.
async fn supervise(
    unit: Unit,
    stop: Shutdown,
    shared: Shared,
    previous: Option<(Shutdown, Task)>,
) -> Option<(String, Error)> {
    if let Some((old_stop, old)) = previous {
        // The old settings' subscriber first finishes (its pending push included),
        // unless this one is told to stop at once.
        tokio::pin!(old);
        tokio::select! {
            _ = &mut old => {}
            () = stop.forced() => {
                old_stop.force();
                let _ = old.await;
            }
        }
    }
    let label = unit.label();
    let mut backoff = crate::backoff::Reconnect::new();
    loop {
        if stop.is_requested() {
            return None;
        }
        let started = tokio::time::Instant::now();
        let report = Arc::clone(&shared.report);
        let emit_label = label.clone();
        let emit = move |event: Event| report(&emit_label, Note::Event(event));
        let result = run_unit(&unit, &stop, &shared, emit).await;
        let error = match result {
            Ok(Ended::Shutdown) if stop.is_requested() => {
                (shared.report)(&label, Note::Stopped("every change seen is pushed".into()));
                return None;
            }
            Ok(Ended::Interrupted) if stop.is_requested() => {
                (shared.report)(&label, Note::Stopped("at once".into()));
                return None;
            }
            Ok(Ended::Unpushed(e)) if stop.is_requested() => {
                (shared.report)(&label, Note::Stopped(format!("changes not pushed: {e}")));
                return Some((label, e));
            }
            Ok(_) => Error::Disconnected("the subscriber ended on its own".into()),
            Err(e) => e,
        };
        if stop.is_requested() {
            (shared.report)(&label, Note::Stopped(format!("stopped after: {error}")));
            return None;
        }
        if started.elapsed() >= HEALTHY_AFTER {
            backoff.reset();
        }
        let retry_in = backoff.next_delay(crate::backoff::jitter());
        (shared.report)(&label, Note::Failed { error, retry_in });
        tokio::select! {
            () = tokio::time::sleep(retry_in) => {}
            () = stop.requested() => return None,
        }
    }
}

/// Runs `unit` once, until `stop` or a failure.
async fn run_unit<E: FnMut(Event) + Send>(
    unit: &Unit,
    stop: &Shutdown,
    shared: &Shared,
    emit: E,
) -> Result<Ended> {
    match unit {
        Unit::Push {
            database,
            target,
            when,
            message,
        } => {
            let (destination, sealing) = destination(database, target, message).await?;
            let options = push_options(when, &shared.permits);
            let ended = plan::push_to(destination, options, stop, emit).await;
            match (target, ended) {
                (Target::Replica { store, .. }, Err(e)) => {
                    Err(name_key(e, store, sealing.as_ref()))
                }
                (_, ended) => ended,
            }
        }
        Unit::Pull {
            replica,
            store,
            into,
        } => {
            let connection = connection(store);
            let server = connection.resolve().await?;
            let key = connection.key_for(&server, replica, Some(into)).await?;
            // A passphrase is stretched now, once for this start (a replica that kept
            // no salt at the last start may keep one now), never per version.
            let encryption = match &store.passphrase {
                Some(pass) => Some(stretch(&server, replica, key.as_deref(), pass, false).await?),
                None => store.encryption.as_ref().map(|k| k.key.clone()),
            };
            let puller = Puller {
                server,
                replica: replica.clone(),
                local: into.clone(),
                database: crate::config::database_key(into),
                key,
                force: false,
                encryption: encryption.clone().map(crate::crypt::Keys::one),
            };
            plan::pull(puller, stop, emit)
                .await
                .map_err(|e| name_key(e, store, encryption.as_ref()))
        }
        Unit::Directory { .. } => directory::run(unit, stop, shared).await,
    }
}

/// The push subscriber's options of a unit's timing.
fn push_options(when: &config::When, permits: &Arc<Semaphore>) -> PushOptions {
    let t = &when.timing;
    PushOptions {
        wait_idle: Some(t.wait_idle),
        min_interval: Some(t.min_interval),
        max_interval: t.max_interval,
        max_changes: t.max_changes,
        poll: when.poll,
        report_after: crate::subscribe::push::REPORT_FAILURES_AFTER,
        shutdown_bound: crate::subscribe::push::SHUTDOWN_BOUND,
        permits: Some(Arc::clone(permits)),
    }
}

/// The connection of a configured store: its server, and its key (else
/// `SQLFERRY_KEY`, else the key saved for the database, found by the client).
fn connection(store: &config::Store) -> Connection {
    Connection {
        compress: store.compress,
        server: store.server.clone(),
        s3_endpoint: None,
        key: store
            .key
            .as_ref()
            .map(|k| k.0.clone())
            .or_else(|| std::env::var("SQLFERRY_KEY").ok().filter(|k| !k.is_empty())),
    }
}

/// The push subscriber's destination for `database` to `target`, and the key it seals
/// with (a passphrase's stretched now: with the replica's salt, or a new one the first
/// push records, as `push --passphrase-file` does).
async fn destination(
    database: &Path,
    target: &Target,
    message: &str,
) -> Result<(Destination, Option<EncryptionKey>)> {
    Ok(match target {
        Target::File(copy) => (
            Destination::File {
                local: database.to_owned(),
                copy: copy.clone(),
            },
            None,
        ),
        Target::Replica { replica, store } => {
            let connection = connection(store);
            let server = connection.resolve().await?;
            let mut pusher =
                Pusher::open(database, replica.clone(), server, connection.key.clone()).await?;
            let encryption = match &store.passphrase {
                Some(pass) => {
                    let key = pusher.key.as_deref();
                    Some(stretch(&pusher.server, replica, key, pass, true).await?)
                }
                None => store.encryption.as_ref().map(|k| k.key.clone()),
            };
            pusher.message = message.to_owned();
            pusher.merge = store.merge.clone();
            pusher.encryption = encryption.clone();
            (Destination::Replica(Box::new(pusher)), encryption)
        }
    })
}

/// At most one passphrase is stretched at a time in the daemon: each stretch holds
/// 64 MiB for about 0.2 s, and a watched directory of many passphrase replicas starts
/// all its units at once (bounded memory, docs/DESIGN.md).
static STRETCHING: Semaphore = Semaphore::const_new(1);

/// The key `pass` gives for `replica` on `server`: the salt and cost the replica keeps
/// asked for first (a server too old to keep them is refused), then Argon2id on a
/// blocking thread. A replica that keeps no salt is refused (auth: it was not made with
/// a passphrase, or has no version yet) unless `making` (a push unit): a new random
/// salt, which the push records with its version (docs/security.md, "Keys"). The key
/// is never written anywhere; only its id is shown.
async fn stretch(
    server: &crate::remote::Server,
    replica: &crate::store::ReplicaPath,
    key: Option<&str>,
    pass: &config::ConfiguredPassphrase,
    making: bool,
) -> Result<EncryptionKey> {
    let salted = match server.passphrase(replica, key, making).await? {
        Some(salted) => salted,
        None if making => crate::crypt::PassphraseSalt::new()?,
        None => {
            return Err(Error::Auth(format!(
                "{replica} keeps no passphrase salt: it was not made with a passphrase (it \
                 is plaintext, under a key file, or has no version yet), so passphrase_file \
                 {} cannot give its key; give its key (encryption_key_file) instead, or push \
                 its first version with the passphrase; nothing was pulled",
                pass.file.display()
            )));
        }
    };
    let _one = STRETCHING
        .acquire()
        .await
        .map_err(|e| Error::Bug(format!("the stretch semaphore closed: {e}")))?;
    let passphrase = pass.passphrase.clone();
    crate::remote::blocking(move || salted.derive(&passphrase)).await
}

/// A unit's refused key (an auth error) with where its key came from and its id, so
/// the log names the entry's file: `with the key of passphrase_file FILE (key id …)`.
/// Other errors pass as they are.
fn name_key(e: Error, store: &config::Store, key: Option<&EncryptionKey>) -> Error {
    if e.kind() != crate::ErrorKind::Auth {
        return e;
    }
    let source = match (&store.passphrase, &store.encryption) {
        (Some(p), _) => format!("passphrase_file {}", p.file.display()),
        (None, Some(k)) => format!("encryption_key_file {}", k.file.display()),
        (None, None) => return e,
    };
    match key {
        Some(k) => e.context(format!("with the key of {source} (key id {})", k.id())),
        None => e.context(format!("with the key of {source}")),
    }
}
