//! The workflows around the subscriber loops: which subscriber a command runs, with
//! which key, and the real push, pull, subscription and watcher the loops act on.
//!
//! - [`resolve`]: `sqlferry subscribe TARGET` decides between a push and a pull
//!   subscriber (a saved PUSH key: push; a sidecar: pull; else the last sync).
//! - [`push`]: a push subscriber. Without a key of its own it takes the PULL key of the
//!   sidecar beside the database; when the server says the key is a PULL key, it
//!   follows the replica instead, unless the database holds changes no sync carried
//!   (following would overwrite them: invariant 8).
//! - [`pull`]: a pull subscriber.
//!
//! They return plain values ([`Ended`], [`crate::Error`]) and report through [`Event`]s;
//! the command line turns those into lines and exit codes. Blocking work (SQLite,
//! files) runs on `spawn_blocking`; the client's push and pull are async.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::action::{Changes, PullAction, PushAction};
use super::event::Event;
use super::pull::{PullSubscriber, Pulled, Reason};
use super::push::{PushSubscriber, Pushed};
use super::timer::{Timing, Trigger};
use super::watch::{Seen, Watcher};
use crate::client::{Kept, Puller, Pusher, unsynced_changes};
use crate::config::{Secrets, Sidecar};
use crate::protocol::control::{Applied, SubscriberRole};
use crate::remote::{Outgoing, Server};
use crate::shutdown::Shutdown;
use crate::store::ReplicaPath;
use crate::synclog::running::{Planned, Running};
use crate::{Error, Result};

/// How a subscriber ended, when it ended without an error.
#[derive(Debug)]
pub enum Ended {
    /// Asked to stop; nothing left undone.
    Shutdown,
    /// Asked to stop, but the changes pending could not be pushed: why.
    Unpushed(Error),
    /// A forced stop: stopped at once.
    Interrupted,
}

/// Which subscriber `sqlferry subscribe TARGET` runs.
#[derive(Debug)]
pub enum Plan {
    /// A push subscriber of this database.
    Push(Pusher),
    /// A pull subscriber into this database.
    Pull(Puller),
}

/// The push subscriber's options, as given (checked by [`push`]).
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// `--wait-idle` (required).
    pub wait_idle: Option<Duration>,
    /// `--min-interval`.
    pub min_interval: Option<Duration>,
    /// `--max-interval`.
    pub max_interval: Option<Duration>,
    /// `--max-changes`.
    pub max_changes: Option<u32>,
    /// How often the watcher's safety-net poll runs.
    pub poll: Duration,
    /// How long pushes must fail before the server hears of it.
    pub report_after: Duration,
    /// How long pending changes may take to push after a graceful stop request.
    pub shutdown_bound: Duration,
    /// Shared by subscribers that should not all push at once (the daemon's): a push
    /// waits for a permit first.
    pub permits: Option<Arc<tokio::sync::Semaphore>>,
}

impl PushOptions {
    /// The checked timing: a usage error when `--wait-idle` is missing or the flags
    /// contradict each other.
    pub fn timing(&self) -> Result<Timing> {
        let wait_idle = self.wait_idle.ok_or_else(|| {
            Error::Usage("a push subscriber needs --wait-idle (for example --wait-idle 10m)".into())
        })?;
        Timing::new(
            wait_idle,
            self.min_interval,
            self.max_interval,
            self.max_changes,
        )
        .map_err(Error::Usage)
    }
}

impl PushOptions {
    /// The push subscriber these options make, with the checked `timing`.
    fn subscriber(&self, timing: Timing, follow_versions: bool) -> PushSubscriber {
        PushSubscriber {
            timing,
            shutdown_bound: self.shutdown_bound,
            report_after: self.report_after,
            follow_versions,
        }
    }
}

/// Starts watching `database` for commits (on a blocking thread: it opens the
/// database), checking every `poll` besides the file events.
async fn watch_database(database: PathBuf, poll: Duration) -> Result<Watched> {
    let (watcher, seen) =
        tokio::task::spawn_blocking(move || Watcher::start(&database, poll)).await??;
    Ok(Watched {
        _watcher: watcher,
        seen,
    })
}

/// Decides which subscriber `sqlferry subscribe` runs for `target` (a database or a
/// sidecar file; `given` is how the user wrote it, for the error message).
pub async fn resolve(target: PathBuf, given: String) -> Result<Plan> {
    tokio::task::spawn_blocking(move || resolve_blocking(&target, &given)).await?
}

fn resolve_blocking(target: &Path, given: &str) -> Result<Plan> {
    if let Some(database) = Sidecar::database_for(target).filter(|_| target.is_file()) {
        return follow_sidecar(target, &database);
    }
    let database = crate::config::database_key(target);
    if let Some(saved) = Secrets::load()?.for_database(&database).cloned() {
        let server = Server::parse(Some(&saved.server))?;
        let replica = ReplicaPath::parse(&saved.replica)?;
        return Ok(Plan::Push(Pusher::new(target, replica, server, None)?));
    }
    let sidecar = Sidecar::path_for(target);
    if sidecar.is_file() {
        return follow_sidecar(&sidecar, target);
    }
    let Some(last) = crate::history::last(target) else {
        return Err(Error::Usage(format!(
            "{} has no saved key, no sidecar ({}) and no sync on record: push it once \
             (sqlferry push {given} NAMESPACE/NAME) or name a sidecar",
            target.display(),
            sidecar.display(),
        )));
    };
    let server = Server::parse(Some(&last.server))?;
    let replica = ReplicaPath::parse(&last.replica)?;
    if last.op == "pull" {
        return Ok(Plan::Pull(Puller {
            key: None,
            server,
            replica,
            local: target.to_owned(),
            database,
            force: false,
            encryption: None,
        }));
    }
    Ok(Plan::Push(Pusher::new(target, replica, server, None)?))
}

/// A pull subscriber of the replica `sidecar` names, into `database`.
fn follow_sidecar(sidecar: &Path, database: &Path) -> Result<Plan> {
    let s = Sidecar::load(sidecar)?;
    Ok(Plan::Pull(Puller {
        server: Server::parse(Some(&s.server))?,
        replica: ReplicaPath::parse(&s.replica)?,
        local: database.to_owned(),
        database: crate::config::database_key(database),
        key: Some(s.key),
        force: false,
        encryption: None,
    }))
}

/// Runs a push subscriber of `pusher`'s database until `shutdown`; follows the replica
/// instead when the key is a PULL key.
pub async fn push<E: FnMut(Event)>(
    mut pusher: Pusher,
    options: PushOptions,
    shutdown: &Shutdown,
    mut emit: E,
) -> Result<Ended> {
    // No key of our own: the sidecar beside LOCAL may hold a PULL key for the replica.
    let mut sidecar_key = false;
    if pusher.key.is_none() && pusher.server.needs_key() {
        let (local, url, replica) = (
            pusher.local.clone(),
            pusher.server.url(),
            pusher.replica.to_string(),
        );
        let found = tokio::task::spawn_blocking(move || {
            Sidecar::load(&Sidecar::path_for(&local))
                .ok()
                .filter(|s| s.server == url && s.replica == replica)
        })
        .await?;
        if let Some(s) = found {
            pusher.key = Some(s.key);
            sidecar_key = true;
        }
    }
    pusher.require_key()?;
    let timing = options.timing()?;
    let (server, replica, key) = (
        pusher.server.clone(),
        pusher.replica.clone(),
        pusher.key.clone(),
    );
    let database = pusher.local.clone();
    let database_key = pusher.database.to_string_lossy().into_owned();
    let mut subscription = server
        .subscribe(&replica, SubscriberRole::Push, key)
        .await?;
    emit(Event::PushStarted {
        database: database.clone(),
        replica: replica.to_string(),
        server: server.url(),
        timing,
    });
    // A merging subscriber merges other clients' versions in as they land.
    let subscriber = options.subscriber(timing, pusher.merge.is_some());
    let poll = options.poll;
    let watch = || watch_database(database, poll);
    let action = ClientPush::new(pusher, options.permits.clone());
    let mut record = Running::start(&database_key, &server.url(), replica.as_str(), "push");
    let mut emit_noted = |event: Event| {
        note_plan(&mut record, &timing, &event);
        emit(event);
    };
    let ended = subscriber
        .run(action, &mut subscription, watch, shutdown, &mut emit_noted)
        .await;
    drop(record);
    subscription.close().await;
    match ended? {
        super::push::Ended::Shutdown => Ok(Ended::Shutdown),
        super::push::Ended::Unpushed(e) => Ok(Ended::Unpushed(e)),
        super::push::Ended::Interrupted => Ok(Ended::Interrupted),
        super::push::Ended::PullKey(action) => {
            let puller = action.puller().await;
            let from = if sidecar_key {
                " (from the sidecar)"
            } else {
                ""
            };
            // Following writes LOCAL: never over changes that were not synced.
            let why = unsynced_changes(&puller.local, &puller.server, &puller.replica).await?;
            if let Some(why) = why {
                return Err(Error::Auth(format!(
                    "the key{from} for {replica} is a PULL key, and {} {why}: following the \
                     replica would overwrite it; push it with its PUSH key (--key, or the admin key)",
                    puller.local.display()
                )));
            }
            emit(Event::FollowingInstead {
                replica: replica.to_string(),
                from_sidecar: sidecar_key,
            });
            pull(puller, shutdown, emit).await
        }
    }
}

/// Where a push subscriber sends its database's changes.
#[derive(Debug)]
pub enum Destination {
    /// A replica in a store (embedded or a server): each push makes a version.
    Replica(Box<Pusher>),
    /// A local file kept equal to the database (`push app.db ./backup/app.db`).
    File {
        /// The database.
        local: PathBuf,
        /// The copy.
        copy: PathBuf,
    },
}

impl Destination {
    /// How lines name it: `acme/app.db on ws://host:port`, `acme/app.db in the embedded
    /// store`, or the copy's path.
    pub fn label(&self) -> String {
        match self {
            Destination::Replica(p) => match &p.server {
                Server::Embedded(_) => format!("{} (embedded store)", p.replica),
                Server::S3 { location, .. } => format!("{} in {location}", p.replica),
                Server::Ws { url, .. } => format!("{} on {url}", p.replica),
            },
            Destination::File { copy, .. } => copy.display().to_string(),
        }
    }
}

/// Runs a push subscriber of one database to one destination until `shutdown`.
pub async fn push_to<E: FnMut(Event)>(
    destination: Destination,
    options: PushOptions,
    shutdown: &Shutdown,
    emit: E,
) -> Result<Ended> {
    match destination {
        Destination::Replica(pusher) => push(*pusher, options, shutdown, emit).await,
        Destination::File { local, copy } => {
            push_to_file(local, copy, options, shutdown, emit).await
        }
    }
}

/// Runs one push subscriber per destination, side by side on this task, each with its
/// own base version, retries and status, until `shutdown`; `emit` hears each one's
/// events with its index. One failing never stops the others; the results come back in
/// the destinations' order.
pub async fn push_many<E: FnMut(usize, Event)>(
    destinations: Vec<Destination>,
    options: PushOptions,
    shutdown: &Shutdown,
    emit: E,
) -> Vec<Result<Ended>> {
    let emit = std::cell::RefCell::new(emit);
    let emit = &emit;
    let runs = destinations.into_iter().enumerate().map(|(i, d)| {
        let options = options.clone();
        async move { push_to(d, options, shutdown, move |e| (emit.borrow_mut())(i, e)).await }
    });
    futures_util::future::join_all(runs).await
}

/// Runs a push subscriber that keeps the local file `copy` equal to `local`.
pub async fn push_to_file<E: FnMut(Event)>(
    local: PathBuf,
    copy: PathBuf,
    options: PushOptions,
    shutdown: &Shutdown,
    mut emit: E,
) -> Result<Ended> {
    let timing = options.timing()?;
    let database = local.clone();
    let database_key = crate::config::database_key(&local)
        .to_string_lossy()
        .into_owned();
    let copy_key = crate::config::database_key(&copy)
        .to_string_lossy()
        .into_owned();
    emit(Event::PushStarted {
        database: database.clone(),
        replica: copy.display().to_string(),
        server: String::new(),
        timing,
    });
    let subscriber = options.subscriber(timing, false);
    let poll = options.poll;
    let watch = || watch_database(database, poll);
    let action = FileCopy {
        local,
        copy,
        permits: options.permits.clone(),
    };
    let mut record = Running::start(&database_key, "file", &copy_key, "push");
    let ended = subscriber
        .run(
            action,
            &mut NoServer::default(),
            watch,
            shutdown,
            |event: Event| {
                note_plan(&mut record, &timing, &event);
                emit(event);
            },
        )
        .await;
    drop(record);
    match ended? {
        super::push::Ended::Shutdown => Ok(Ended::Shutdown),
        super::push::Ended::Unpushed(e) => Ok(Ended::Unpushed(e)),
        super::push::Ended::Interrupted | super::push::Ended::PullKey(_) => Ok(Ended::Interrupted),
    }
}

/// Keeps the running note's planned push up to date from a [`Event::Planned`].
fn note_plan(record: &mut Option<Running>, timing: &Timing, event: &Event) {
    if let (
        Some(record),
        Event::Planned {
            after,
            trigger,
            running,
        },
    ) = (record, event)
    {
        record.plan(trigger.map(|t| Planned {
            at:
                after.filter(|_| !running).map(|d| {
                    crate::epoch::now() + i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2)
                }),
            why: why(t, timing, *after),
        }));
    }
}

/// The line to no server, for a file copy: connected from the start, nothing heard,
/// nothing told.
#[derive(Debug, Default)]
struct NoServer {
    greeted: bool,
}

impl super::action::Notices for NoServer {
    fn next(&mut self) -> impl Future<Output = Option<crate::remote::Notice>> + Send {
        let first = !std::mem::replace(&mut self.greeted, true);
        async move {
            if first {
                return Some(crate::remote::Notice::Connected {
                    exists: true,
                    latest: 0,
                    key_type: String::new(),
                });
            }
            std::future::pending().await
        }
    }

    fn send(&mut self, _message: Outgoing) {}
}

/// The push of a file copy: `push LOCAL ./copy.db`, each time.
struct FileCopy {
    local: PathBuf,
    copy: PathBuf,
    permits: Option<Arc<tokio::sync::Semaphore>>,
}

impl PushAction for FileCopy {
    fn push(&mut self, trigger: Trigger) -> impl Future<Output = Result<Pushed>> + Send {
        let (local, copy, permits) = (self.local.clone(), self.copy.clone(), self.permits.clone());
        async move {
            let _permit = permit(permits.as_ref()).await;
            let stats = crate::client::copy_file_for(
                &local,
                &copy,
                false,
                trigger.as_str(),
                crate::remote::no_progress(),
            )
            .await?;
            Ok(Pushed {
                version: 0,
                copy: true,
                created: stats.pages_sent > 0,
                pages_sent: u64::from(stats.pages_sent),
                pages_total: u64::from(stats.pages_total),
                bytes_sent: stats.bytes_sent,
                duration: stats.duration,
                saved_keys: None,
                merged: None,
            })
        }
    }
}

/// A permit of `permits`, when the subscriber shares some (held for one push).
async fn permit(
    permits: Option<&Arc<tokio::sync::Semaphore>>,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    match permits {
        Some(p) => Arc::clone(p).acquire_owned().await.ok(),
        None => None,
    }
}

/// Runs a pull subscriber of `puller`'s replica into its database until `shutdown`.
pub async fn pull<E: FnMut(Event)>(
    puller: Puller,
    shutdown: &Shutdown,
    mut emit: E,
) -> Result<Ended> {
    let (server, replica, key) = (
        puller.server.clone(),
        puller.replica.clone(),
        puller.key.clone(),
    );
    let last = crate::client::last_sync(&puller.database, &server, &replica).await?;
    let held = last.as_ref().map(|l| l.version);
    if server.needs_key() && key.is_none() {
        return Err(Error::Auth(format!(
            "no key for {replica} on {}: pass --key, set SQLFERRY_KEY, or use the replica's sidecar (--from)",
            server.url()
        )));
    }
    let mut subscription = server
        .subscribe(&replica, SubscriberRole::Pull, key)
        .await?;
    // The version the database held at its last sync, told at once: the server shows
    // this follower's lag while the start pull runs (and that pull reports again).
    if let Some(last) = last {
        subscription.send(Outgoing::Applied(Applied {
            version: last.version,
            applied_at: Some(last.at),
        }));
    }
    emit(Event::PullStarted {
        replica: replica.to_string(),
        server: server.url(),
        local: puller.local.clone(),
    });
    let _record = Running::start(
        &puller.database.to_string_lossy(),
        &server.url(),
        replica.as_str(),
        "pull",
    );
    let action = ClientPull {
        shared: Arc::new(tokio::sync::Mutex::new((puller, Kept::default()))),
    };
    let ended = PullSubscriber::new(held)
        .run(action, &mut subscription, shutdown, &mut emit)
        .await;
    subscription.close().await;
    Ok(match ended? {
        super::pull::Ended::Shutdown => Ended::Shutdown,
        super::pull::Ended::Interrupted => Ended::Interrupted,
    })
}

/// Why a push is planned `after` from now, as `status` shows it: `idle 10m`,
/// `max-interval 24h`, `idle 10m, min-interval 1h` (when the idle push waits for
/// `--min-interval`), ….
fn why(trigger: Trigger, timing: &Timing, after: Option<Duration>) -> String {
    let d = super::duration::format;
    match trigger {
        Trigger::Idle if after.is_some_and(|a| a > timing.wait_idle) => format!(
            "idle {}, min-interval {}",
            d(timing.wait_idle),
            d(timing.min_interval)
        ),
        Trigger::Idle => format!("idle {}", d(timing.wait_idle)),
        Trigger::MaxInterval => match timing.max_interval {
            Some(max) => format!("max-interval {}", d(max)),
            None => "max-interval".into(),
        },
        Trigger::Changes => match timing.max_changes {
            Some(n) => format!("max-changes {n}"),
            None => "max-changes".into(),
        },
        Trigger::Retry => "retry after a failed push".into(),
        Trigger::Start => "start".into(),
        Trigger::SyncNow => "sync-now".into(),
        Trigger::Shutdown => "stopping".into(),
    }
}

/// The database being watched: the watcher (stopped and joined when dropped) and its
/// reports.
struct Watched {
    _watcher: Watcher,
    seen: tokio::sync::mpsc::UnboundedReceiver<Seen>,
}

impl Changes for Watched {
    fn next(&mut self) -> impl Future<Output = Option<Seen>> + Send {
        self.seen.recv()
    }
}

/// The client's push, for the push subscriber: one database to one replica, each push
/// based on the last (the client keeps the base version in the history).
struct ClientPush {
    pusher: Arc<tokio::sync::Mutex<Pusher>>,
    /// The commit message given, empty for the default one per trigger.
    message: String,
    permits: Option<Arc<tokio::sync::Semaphore>>,
}

impl ClientPush {
    fn new(mut pusher: Pusher, permits: Option<Arc<tokio::sync::Semaphore>>) -> ClientPush {
        let message = std::mem::take(&mut pusher.message);
        ClientPush {
            pusher: Arc::new(tokio::sync::Mutex::new(pusher)),
            message,
            permits,
        }
    }

    /// A puller of the same database from the same replica, with the same key.
    async fn puller(&self) -> Puller {
        let p = self.pusher.lock().await;
        Puller {
            server: p.server.clone(),
            replica: p.replica.clone(),
            local: p.local.clone(),
            database: p.database.clone(),
            key: p.key.clone(),
            force: false,
            encryption: p.encryption.clone().map(crate::crypt::Keys::one),
        }
    }
}

impl PushAction for ClientPush {
    fn push(&mut self, trigger: Trigger) -> impl Future<Output = Result<Pushed>> + Send {
        let pusher = Arc::clone(&self.pusher);
        let message = if self.message.is_empty() {
            format!("sqlferry subscribe: {}", trigger.as_str())
        } else {
            self.message.clone()
        };
        let permits = self.permits.clone();
        async move {
            let _permit = permit(permits.as_ref()).await;
            let mut p = pusher.lock().await;
            p.message = message;
            p.trigger = trigger.as_str();
            let report = match p.push(crate::remote::no_progress()).await {
                Ok(report) => report,
                Err(e) => return Err(rekeyed(&p, e).await),
            };
            let o = report.outcome;
            let merged = o.merged.as_ref().map(|m| super::push::MergedPush {
                base: m.result.base,
                onto: m.result.onto,
                candidate: m.result.candidate,
                changes: m.result.changes,
                conflicts: m.result.conflicts_total,
                local_kept: report.local_kept.is_some(),
            });
            Ok(Pushed {
                version: o.version,
                copy: false,
                created: o.created,
                pages_sent: u64::from(o.stats.pages_sent),
                pages_total: u64::from(o.stats.pages_total),
                bytes_sent: o.stats.bytes_sent,
                duration: o.stats.duration,
                saved_keys: report.saved_keys,
                merged,
            })
        }
    }
}

/// A sealed push refused for its key (an auth error) because someone else rekeyed the
/// replica since this subscriber chose its key: said as such, with what to do, since
/// retrying cannot mend it (the push subscriber stops on an auth error; a daemon unit
/// tries again with backoff and is refused the same way until its entry's key changes).
/// Told by the replica's versions: the latest is sealed with another key id, and an
/// earlier one with this key's. Any other error, or one the versions cannot explain
/// (or cannot be listed), passes as it is.
async fn rekeyed(p: &Pusher, e: Error) -> Error {
    let Some(ours) = p.encryption.as_ref().map(|k| k.id().to_string()) else {
        return e;
    };
    if e.kind() != crate::ErrorKind::Auth {
        return e;
    }
    let Ok(versions) = p.server.versions(&p.replica, p.key.as_deref()).await else {
        return e;
    };
    match crate::client::RekeyedAway::of(&versions, &ours) {
        Some(away) => Error::Auth(format!(
            "{}; this subscriber seals with key id {ours}, which can no longer push to it: \
             start it again with the new key (--encryption-key-file or --passphrase-file; \
             in a daemon entry, change encryption_key_file or passphrase_file and reload); \
             nothing was pushed",
            away.what(&p.replica.to_string())
        )),
        None => e,
    }
}

/// The client's pull of the latest version, for the pull subscriber; the writer and
/// what tells whether anyone else wrote LOCAL are kept between pulls.
struct ClientPull {
    shared: Arc<tokio::sync::Mutex<(Puller, Kept)>>,
}

impl PullAction for ClientPull {
    fn pull(&mut self, reason: Reason) -> impl Future<Output = Result<Pulled>> + Send {
        let shared = Arc::clone(&self.shared);
        async move {
            let mut guard = shared.lock().await;
            let (puller, kept) = &mut *guard;
            let o = puller.pull_latest_kept(kept, reason.as_str()).await?;
            Ok(Pulled {
                version: o.version,
                pages_written: u64::from(o.stats.pages_sent),
                pages_total: u64::from(o.stats.pages_total),
                bytes_received: o.stats.bytes_received,
                duration: o.stats.duration,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_names_the_flag_that_decides_when() {
        let m = |n: u64| Duration::from_secs(60 * n);
        let timing = Timing::new(m(10), None, Some(m(120)), Some(50)).unwrap();
        assert_eq!(timing.min_interval, m(60), "half of max-interval");
        assert_eq!(why(Trigger::Idle, &timing, Some(m(10))), "idle 10m");
        assert_eq!(
            why(Trigger::Idle, &timing, Some(m(55))),
            "idle 10m, min-interval 1h"
        );
        assert_eq!(
            why(Trigger::MaxInterval, &timing, Some(m(90))),
            "max-interval 2h"
        );
        assert_eq!(why(Trigger::Changes, &timing, None), "max-changes 50");
        assert_eq!(
            why(Trigger::Retry, &timing, Some(m(1))),
            "retry after a failed push"
        );
    }
}
