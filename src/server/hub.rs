//! The notification hub: who is subscribed to which replica, and what the server
//! knows of each replica's push subscribers.
//!
//! - Every subscribe session holds a [`broadcast`] receiver of its replica's events:
//!   a new version (after a push commits) or a sync-now request. A receiver that falls
//!   behind loses old events, never the latest: a lagging pull subscriber learns it
//!   lagged and pulls the newest version, which is what coalescing wants anyway.
//! - CHANGED frames set the replica's expected push time; a push that commits clears
//!   it. REPORT frames record a subscriber's failures until its next push commits,
//!   their error text cut to a few KB. Each kind is logged at most once a minute per
//!   replica, so a flood of them cannot flood the log.
//! - Followers: each pull subscriber's session reports (APPLIED) the version its
//!   database holds. The hub keeps one [`Follower`] per pull session, dropped with the
//!   membership, and from it a lag a user can alert on ([`lag_seconds`]). A
//!   `watch` channel per replica wakes whoever waits for followers
//!   ([`Hub::wait_followers`]) when a report arrives or a follower leaves.
//! - All of it lives in memory: a restarted server learns it again from subscribers as
//!   they reconnect and report.
//! - Servers sharing a PostgreSQL metadata store (`serve --meta`) show each other's
//!   subscribers: the relay writes what this hub knows ([`Hub::shared`]) to PostgreSQL
//!   at most once a second and hands back what the other servers wrote
//!   ([`Hub::set_others`]), which [`Hub::status`], [`Hub::replicas`] and
//!   [`Hub::wait_followers`] add to this server's own. Without `--meta` there are no
//!   others and nothing of this runs.
//!
//! Bounds: one entry per replica a subscriber ever joined, one [`Follower`] per open
//! pull session (sessions are bounded by the server's connection limit), and the
//! times of at most [`RECENT_VERSIONS`] versions per replica.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::{broadcast, watch};

use crate::protocol::control::{FailureReport, NewVersion, SubscriberRole};

/// What a subscriber hears about its replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A push committed a new version.
    NewVersion(NewVersion),
    /// Someone asked for a sync now.
    SyncNow,
}

/// How many events a slow subscriber may fall behind before it only hears that it
/// lagged.
const EVENT_BACKLOG: usize = 16;

/// How many of a replica's newest versions the hub keeps the creation time of: enough
/// to compute the lag of a follower that is up to this many versions behind without
/// asking the store.
pub const RECENT_VERSIONS: usize = 16;

/// The hub of one server.
#[derive(Debug)]
pub struct Hub {
    replicas: Mutex<HashMap<String, ReplicaState>>,
    closing: watch::Sender<bool>,
    /// The id of the next membership (followers are keyed by it).
    next_member: std::sync::atomic::AtomicU64,
    /// What the other servers sharing the metadata store know (`serve --meta`), as
    /// the relay last read it; empty on a server on its own.
    others: Mutex<Shared>,
}

/// One subscriber, as servers sharing a metadata store tell each other (a row of
/// `sqlferry_positions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The replica it subscribes to.
    pub replica: String,
    /// Its membership id on its server.
    pub member: u64,
    /// Push or pull.
    pub role: SubscriberRole,
    /// The version its database holds (a pull subscriber that reported one).
    pub applied: Option<u64>,
    /// When it applied it (Unix seconds).
    pub applied_at: Option<i64>,
    /// When the first version it does not hold was created (Unix seconds).
    pub behind_since: Option<i64>,
}

/// What one hub knows that the others show: its subscribers, the pushes its push
/// subscribers announced (replica, Unix seconds) and their failure reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shared {
    /// Every subscriber connected, by replica then membership.
    pub positions: Vec<Position>,
    /// Expected pushes: replica, when (Unix seconds).
    pub expected: Vec<(String, i64)>,
    /// Failure reports: replica, the report.
    pub failures: Vec<(String, FailureStatus)>,
}

/// What the hub knows of one pull subscriber (one session).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Follower {
    /// The version its database holds, once it reported one.
    applied: Option<u64>,
    /// When it applied it (Unix seconds).
    applied_at: Option<i64>,
    /// When the first version it does not hold was created (Unix seconds); `None`
    /// while it holds the latest (or never reported).
    behind_since: Option<i64>,
}

/// A follower's lag, in whole seconds at `now`: 0 when it holds the latest version,
/// else the time since the first version it does not hold was created (`behind_since`),
/// so a follower that stopped applying lags more every second. `None` when it never
/// reported a version (an older subscriber, or one still on its first pull).
pub fn lag_seconds(applied: Option<u64>, behind_since: Option<i64>, now: i64) -> Option<u64> {
    applied?;
    Some(behind_since.map_or(0, |t| u64::try_from(now.saturating_sub(t)).unwrap_or(0)))
}

#[derive(Debug)]
struct ReplicaState {
    events: broadcast::Sender<Event>,
    push_subscribers: u64,
    /// Push subscribers by membership id.
    pushers: std::collections::BTreeSet<u64>,
    pull_subscribers: u64,
    /// Unix seconds at which a push subscriber plans to push.
    expected_push_at: Option<i64>,
    /// The latest failure report, with the Unix time it arrived.
    failure: Option<(FailureReport, i64)>,
    /// When a REPORT and a CHANGED of this replica were last logged, and how many
    /// arrived unlogged since.
    report_log: LogLimit,
    changed_log: LogLimit,
    /// Pull subscribers by membership id.
    followers: BTreeMap<u64, Follower>,
    /// The newest versions known (number, creation time), oldest first, at most
    /// [`RECENT_VERSIONS`].
    recent: VecDeque<(u64, i64)>,
    /// Whether `recent` holds every version from its first on down to version 1 (the
    /// replica has no older ones): then no follower's first missing version is older.
    recent_complete: bool,
    /// Bumped whenever a follower reports or leaves; waiters watch it.
    followed: watch::Sender<u64>,
}

/// How often one kind of subscriber message of one replica is logged at most.
const LOG_EVERY_S: i64 = 60;

/// Lets one log line through per [`LOG_EVERY_S`], counting the ones held back.
#[derive(Debug, Default)]
struct LogLimit {
    last: Option<i64>,
    held_back: u64,
}

impl LogLimit {
    /// `Some(held back since the last line)` when this one should be logged.
    fn allow(&mut self, now: i64) -> Option<u64> {
        if self.last.is_some_and(|t| now - t < LOG_EVERY_S && now >= t) {
            self.held_back += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

impl ReplicaState {
    fn new() -> ReplicaState {
        ReplicaState {
            events: broadcast::channel(EVENT_BACKLOG).0,
            push_subscribers: 0,
            pushers: std::collections::BTreeSet::new(),
            pull_subscribers: 0,
            expected_push_at: None,
            failure: None,
            report_log: LogLimit::default(),
            changed_log: LogLimit::default(),
            followers: BTreeMap::new(),
            recent: VecDeque::new(),
            recent_complete: false,
            followed: watch::channel(0).0,
        }
    }

    /// Learns that `number` was created at `created_at`.
    fn learn(&mut self, number: u64, created_at: i64) {
        if self.recent.back().is_some_and(|&(n, _)| n >= number) {
            return;
        }
        self.recent.push_back((number, created_at));
        if self.recent.len() > RECENT_VERSIONS {
            self.recent.pop_front();
            self.recent_complete = false;
        }
    }

    /// The creation time of the first version after `applied`, if the hub knows it:
    /// `Ok(None)` when `applied` is the latest known, `Err(())` when only the store
    /// can tell (it is older than every version kept here).
    fn first_missing(&self, applied: u64) -> Result<Option<i64>, ()> {
        let Some(&(first, at)) = self.recent.iter().find(|&&(n, _)| n > applied) else {
            return Ok(None);
        };
        // The oldest version kept may not be the first after `applied`: older ones the
        // hub never kept may lie between.
        let oldest_kept = self.recent.front().map(|&(n, _)| n);
        if oldest_kept == Some(first) && first > applied + 1 && !self.recent_complete {
            return Err(());
        }
        Ok(Some(at))
    }

    fn count_at(&self, version: u64) -> usize {
        self.followers
            .values()
            .filter(|f| f.applied.is_some_and(|a| a >= version))
            .count()
    }
}

/// A subscriber's membership: counted until dropped.
#[derive(Debug)]
pub struct Membership<'a> {
    hub: &'a Hub,
    id: u64,
    replica: String,
    role: SubscriberRole,
    /// The replica's events.
    pub events: broadcast::Receiver<Event>,
    /// Becomes `true` when the server shuts down.
    pub closing: watch::Receiver<bool>,
}

impl Drop for Membership<'_> {
    fn drop(&mut self) {
        let mut replicas = self.hub.lock();
        if let Some(state) = replicas.get_mut(&self.replica) {
            match self.role {
                SubscriberRole::Push => {
                    state.push_subscribers -= 1;
                    state.pushers.remove(&self.id);
                }
                SubscriberRole::Pull => {
                    state.pull_subscribers -= 1;
                    if state.followers.remove(&self.id).is_some() {
                        state.followed.send_modify(|n| *n += 1);
                    }
                }
            }
        }
    }
}

impl Membership<'_> {
    /// Whether recording `version` as applied needs the creation time of the first
    /// version after it from the store ([`Membership::applied`]'s `older`): it is more
    /// than [`RECENT_VERSIONS`] versions behind what the hub knows.
    pub fn needs_store_for(&self, version: u64) -> bool {
        self.hub
            .lock()
            .get(&self.replica)
            .is_some_and(|s| s.first_missing(version).is_err())
    }

    /// A pull subscriber reports that its database holds `version`, applied at
    /// `applied_at` (its clock; the arrival time `now` when absent or later). `older`
    /// is the creation time of the first stored version after `version`, when
    /// [`Membership::needs_store_for`] asked for it. Wakes the waiters. A push
    /// subscriber's report is ignored.
    pub fn applied(&self, version: u64, applied_at: Option<i64>, older: Option<i64>, now: i64) {
        if self.role != SubscriberRole::Pull {
            return;
        }
        let mut replicas = self.hub.lock();
        let Some(state) = replicas.get_mut(&self.replica) else {
            return;
        };
        let behind_since = match state.first_missing(version) {
            Ok(t) => t,
            // Not asked for, or a version was pruned: the oldest time kept is the best
            // the hub knows, and it errs on the small side.
            Err(()) => older.or(state.recent.front().map(|&(_, t)| t)),
        };
        state.followers.insert(
            self.id,
            Follower {
                applied: Some(version),
                applied_at: Some(applied_at.map_or(now, |t| t.min(now))),
                behind_since,
            },
        );
        state.followed.send_modify(|n| *n += 1);
    }
}

/// What the API shows about a replica's subscribers.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    /// Push subscribers connected now.
    pub push_subscribers: u64,
    /// Pull subscribers connected now.
    pub pull_subscribers: u64,
    /// When a push subscriber last said it would push (Unix seconds), until that push
    /// commits.
    pub expected_push_at: Option<i64>,
    /// A push subscriber's latest failure report, until its next push commits.
    pub failure: Option<FailureStatus>,
    /// Every pull subscriber connected now, in the order they joined.
    pub followers: Vec<FollowerStatus>,
}

/// One pull subscriber as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FollowerStatus {
    /// The version its database holds; null until it reports one (an older
    /// subscriber never does).
    pub applied_version: Option<u64>,
    /// When it applied that version (Unix seconds).
    pub applied_at: Option<i64>,
    /// 0 when it holds the latest version, else the seconds since the first version it
    /// does not hold was created; null when `applied_version` is ([`lag_seconds`]).
    pub lag_seconds: Option<u64>,
}

/// A failure report as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FailureStatus {
    /// Unix seconds at which the failures began.
    pub failing_since: i64,
    /// Failed attempts so far.
    pub attempts: u32,
    /// The latest attempt's error.
    pub error: String,
    /// Unix seconds at which the report arrived.
    pub reported_at: i64,
}

impl Hub {
    /// Push and pull subscribers connected now, over every replica.
    pub fn subscriber_totals(&self) -> (u64, u64) {
        self.lock().values().fold((0, 0), |(push, pull), r| {
            (push + r.push_subscribers, pull + r.pull_subscribers)
        })
    }
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            replicas: Mutex::new(HashMap::new()),
            closing: watch::channel(false).0,
            next_member: std::sync::atomic::AtomicU64::new(0),
            others: Mutex::new(Shared::default()),
        }
    }
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ReplicaState>> {
        // A panic while holding the lock leaves plain counters behind: still usable.
        self.replicas.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a subscriber of `replica` in until the membership is dropped.
    pub fn join(&self, replica: &str, role: SubscriberRole) -> Membership<'_> {
        let mut replicas = self.lock();
        let state = replicas
            .entry(replica.to_owned())
            .or_insert_with(ReplicaState::new);
        let id = self
            .next_member
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match role {
            SubscriberRole::Push => {
                state.push_subscribers += 1;
                state.pushers.insert(id);
            }
            SubscriberRole::Pull => {
                state.pull_subscribers += 1;
                state.followers.insert(id, Follower::default());
            }
        }
        Membership {
            hub: self,
            id,
            replica: replica.to_owned(),
            role,
            events: state.events.subscribe(),
            closing: self.closing.subscribe(),
        }
    }

    /// Learns `replica`'s newest versions (number, creation time; oldest first) from
    /// the store, as a subscriber joins: `all` says they are all the replica has.
    /// Only the last [`RECENT_VERSIONS`] are kept.
    pub fn learn_versions(&self, replica: &str, newest: &[(u64, i64)], all: bool) {
        let mut replicas = self.lock();
        let Some(state) = replicas.get_mut(replica) else {
            return;
        };
        if state.recent.is_empty() {
            state.recent_complete = all && newest.len() <= RECENT_VERSIONS;
        }
        let skip = newest.len().saturating_sub(RECENT_VERSIONS);
        for &(n, at) in &newest[skip..] {
            state.learn(n, at);
        }
    }

    /// Tells `replica`'s subscribers about a new version, created at `created_at`
    /// (Unix seconds); a committed push also ends the wait for it and any failure
    /// streak. Followers that held the latest version start lagging from `created_at`.
    pub fn published(&self, version: NewVersion, created_at: i64) {
        let mut replicas = self.lock();
        if let Some(state) = replicas.get_mut(&version.replica) {
            state.expected_push_at = None;
            state.failure = None;
            state.learn(version.version, created_at);
            for f in state.followers.values_mut() {
                if f.applied.is_some_and(|a| a < version.version) && f.behind_since.is_none() {
                    f.behind_since = Some(created_at);
                }
            }
            let _ = state.events.send(Event::NewVersion(version));
        }
    }

    /// A push to `replica` committed without a new version (nothing had changed).
    pub fn pushed_unchanged(&self, replica: &str) {
        if let Some(state) = self.lock().get_mut(replica) {
            state.expected_push_at = None;
            state.failure = None;
        }
    }

    /// Asks `replica`'s subscribers to sync now; returns how many were reached.
    pub fn sync_now(&self, replica: &str) -> u64 {
        match self.lock().get(replica) {
            Some(state) => state.events.send(Event::SyncNow).unwrap_or(0) as u64,
            None => 0,
        }
    }

    /// A push subscriber of `replica` plans to push in `seconds`. Returns
    /// `Some(held back)` when it should be logged: at most once a minute per replica,
    /// with the number of CHANGED frames not logged since the last line.
    pub fn changed(&self, replica: &str, seconds: u32, now: i64) -> Option<u64> {
        let mut replicas = self.lock();
        let state = replicas.get_mut(replica)?;
        state.expected_push_at = Some(now + i64::from(seconds));
        state.changed_log.allow(now)
    }

    /// A push subscriber of `replica` reports failures; its error text is cut to
    /// [`crate::protocol::control::MAX_REPORT_ERROR_BYTES`]. Returns `Some(held back)`
    /// when it should be logged: at most once a minute per replica.
    pub fn report(&self, replica: &str, mut report: FailureReport, now: i64) -> Option<u64> {
        report.cap_error();
        let mut replicas = self.lock();
        let state = replicas.get_mut(replica)?;
        state.failure = Some((report, now));
        state.report_log.allow(now)
    }

    /// What the hub knows of `replica`, lags computed now.
    pub fn status(&self, replica: &str) -> Status {
        self.status_at(replica, crate::epoch::now())
    }

    /// What the hub knows of `replica`, lags computed at `now` (Unix seconds): this
    /// server's subscribers first, then the other servers' (`serve --meta`).
    pub fn status_at(&self, replica: &str, now: i64) -> Status {
        let mut status = {
            let replicas = self.lock();
            match replicas.get(replica) {
                None => Status::default(),
                Some(state) => Status {
                    followers: followers_of(state, now),
                    push_subscribers: state.push_subscribers,
                    pull_subscribers: state.pull_subscribers,
                    expected_push_at: state.expected_push_at,
                    failure: state.failure.as_ref().map(|(r, at)| FailureStatus {
                        failing_since: at
                            - i64::try_from(r.failing_for).unwrap_or(i64::MAX).min(*at),
                        attempts: r.attempts,
                        error: r.error.clone(),
                        reported_at: *at,
                    }),
                },
            }
        };
        let others = self.others();
        for p in others.positions.iter().filter(|p| p.replica == replica) {
            match p.role {
                SubscriberRole::Push => status.push_subscribers += 1,
                SubscriberRole::Pull => {
                    status.pull_subscribers += 1;
                    status.followers.push(FollowerStatus {
                        applied_version: p.applied,
                        applied_at: p.applied_at,
                        lag_seconds: lag_seconds(p.applied, p.behind_since, now),
                    });
                }
            }
        }
        for (_, at) in others.expected.iter().filter(|(r, _)| r == replica) {
            status.expected_push_at = status.expected_push_at.max(Some(*at));
        }
        for (_, f) in others.failures.iter().filter(|(r, _)| r == replica) {
            if status
                .failure
                .as_ref()
                .is_none_or(|mine| mine.reported_at < f.reported_at)
            {
                status.failure = Some(f.clone());
            }
        }
        status
    }

    /// The replicas the hub knows something of now (a subscriber connected, a planned
    /// push, a failure report; here or, with `serve --meta`, on another server), in no
    /// particular order: a listing adds them to the store's, so a replica whose first
    /// push keeps failing is listed too.
    pub fn replicas(&self) -> Vec<String> {
        let mut names: Vec<String> = {
            let replicas = self.lock();
            replicas
                .iter()
                .filter(|(_, s)| {
                    s.push_subscribers + s.pull_subscribers > 0
                        || s.expected_push_at.is_some()
                        || s.failure.is_some()
                })
                .map(|(name, _)| name.clone())
                .collect()
        };
        let others = self.others();
        names.extend(others.positions.iter().map(|p| p.replica.clone()));
        names.extend(others.expected.iter().map(|(r, _)| r.clone()));
        names.extend(others.failures.iter().map(|(r, _)| r.clone()));
        names.sort();
        names.dedup();
        names
    }

    fn others(&self) -> std::sync::MutexGuard<'_, Shared> {
        // A panic while holding it leaves a whole value behind: still usable.
        self.others.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What this server's hub knows, as the other servers sharing its metadata store
    /// show it: every subscriber (by replica, then membership), every expected push and
    /// failure report.
    pub fn shared(&self) -> Shared {
        let replicas = self.lock();
        let mut names: Vec<&String> = replicas.keys().collect();
        names.sort();
        let mut shared = Shared::default();
        for name in names {
            let state = &replicas[name];
            let pushers = state.pushers.iter().map(|&member| Position {
                replica: name.clone(),
                member,
                role: SubscriberRole::Push,
                applied: None,
                applied_at: None,
                behind_since: None,
            });
            let pullers = state.followers.iter().map(|(&member, f)| Position {
                replica: name.clone(),
                member,
                role: SubscriberRole::Pull,
                applied: f.applied,
                applied_at: f.applied_at,
                behind_since: f.behind_since,
            });
            shared.positions.extend(pushers.chain(pullers));
            if let Some(at) = state.expected_push_at {
                shared.expected.push((name.clone(), at));
            }
            if let Some((r, at)) = &state.failure {
                shared.failures.push((
                    name.clone(),
                    FailureStatus {
                        failing_since: at
                            - i64::try_from(r.failing_for).unwrap_or(i64::MAX).min(*at),
                        attempts: r.attempts,
                        error: r.error.clone(),
                        reported_at: *at,
                    },
                ));
            }
        }
        shared
    }

    /// What the other servers sharing the metadata store know, as the relay just read
    /// it: shown with this server's own from now on. Wakes whoever waits for followers
    /// when it changed.
    pub fn set_others(&self, others: Shared) {
        let changed = {
            let mut kept = self.others();
            let changed = *kept != others;
            *kept = others;
            changed
        };
        if changed {
            for state in self.lock().values() {
                state.followed.send_modify(|n| *n += 1);
            }
        }
    }

    /// Every replica with a pull subscriber connected, and its followers, lags computed
    /// at `now` (Unix seconds): what `/metrics` shows. Sorted by replica.
    pub fn followers_by_replica(&self, now: i64) -> Vec<(String, Vec<FollowerStatus>)> {
        let replicas = self.lock();
        let mut all: Vec<_> = replicas
            .iter()
            .filter(|(_, s)| !s.followers.is_empty())
            .map(|(r, s)| (r.clone(), followers_of(s, now)))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// How many of `replica`'s connected pull subscribers hold `version` or a later
    /// one, and a receiver that changes whenever that may have changed (subscribe to
    /// it before counting again, and no report is missed).
    pub fn wait_followers(&self, replica: &str, version: u64) -> (u32, watch::Receiver<u64>) {
        let mut replicas = self.lock();
        let state = replicas
            .entry(replica.to_owned())
            .or_insert_with(ReplicaState::new);
        let elsewhere = self
            .others()
            .positions
            .iter()
            .filter(|p| p.replica == replica && p.applied.is_some_and(|a| a >= version))
            .count();
        let count = state.count_at(version) + elsewhere;
        (
            u32::try_from(count).unwrap_or(u32::MAX),
            state.followed.subscribe(),
        )
    }

    /// Becomes `true` when the server shuts down (for sessions that are no members).
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Tells every subscribe session that the server is shutting down.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }
}

fn followers_of(state: &ReplicaState, now: i64) -> Vec<FollowerStatus> {
    state
        .followers
        .values()
        .map(|f| FollowerStatus {
            applied_version: f.applied,
            applied_at: f.applied_at,
            lag_seconds: lag_seconds(f.applied, f.behind_since, now),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(n: u64) -> NewVersion {
        NewVersion {
            replica: "acme/app.db".into(),
            version: n,
            digest: "ab".into(),
        }
    }

    #[test]
    fn members_are_counted_and_reached_until_they_leave() {
        let hub = Hub::default();
        assert_eq!(hub.sync_now("acme/app.db"), 0);
        let mut a = hub.join("acme/app.db", SubscriberRole::Push);
        let b = hub.join("acme/app.db", SubscriberRole::Pull);
        let other = hub.join("acme/other.db", SubscriberRole::Pull);
        let s = hub.status("acme/app.db");
        assert_eq!((s.push_subscribers, s.pull_subscribers), (1, 1));
        assert_eq!(hub.sync_now("acme/app.db"), 2);
        assert_eq!(a.events.try_recv(), Ok(Event::SyncNow));
        let mut known = hub.replicas();
        known.sort();
        assert_eq!(known, ["acme/app.db", "acme/other.db"]);
        drop(b);
        assert_eq!(hub.status("acme/app.db").pull_subscribers, 0);
        assert_eq!(hub.sync_now("acme/app.db"), 1);
        drop(other);
        assert_eq!(
            hub.replicas(),
            ["acme/app.db"],
            "no one left on acme/other.db"
        );
    }

    #[test]
    fn a_commit_clears_the_expected_push_and_the_failure() {
        let hub = Hub::default();
        let mut m = hub.join("acme/app.db", SubscriberRole::Pull);
        hub.changed("acme/app.db", 300, 1_000);
        let report = FailureReport {
            failing_for: 400,
            attempts: 6,
            error: "down".into(),
        };
        hub.report("acme/app.db", report, 1_100);
        let s = hub.status("acme/app.db");
        assert_eq!(s.expected_push_at, Some(1_300));
        let f = s.failure.expect("a failure was reported");
        assert_eq!(
            (f.failing_since, f.attempts, f.reported_at),
            (700, 6, 1_100)
        );
        hub.published(version(4), 1_200);
        assert_eq!(m.events.try_recv(), Ok(Event::NewVersion(version(4))));
        let s = hub.status("acme/app.db");
        assert_eq!((s.expected_push_at, s.failure), (None, None));
    }

    #[test]
    fn a_lagging_member_still_gets_the_newest_version() {
        let hub = Hub::default();
        let mut m = hub.join("acme/app.db", SubscriberRole::Pull);
        for n in 1..=(EVENT_BACKLOG as u64 + 5) {
            hub.published(version(n), 1_000);
        }
        assert!(matches!(
            m.events.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(_))
        ));
        let mut last = None;
        while let Ok(Event::NewVersion(v)) = m.events.try_recv() {
            last = Some(v.version);
        }
        assert_eq!(last, Some(EVENT_BACKLOG as u64 + 5));
    }

    #[test]
    fn lag_is_zero_when_current_and_grows_from_the_first_missing_version() {
        assert_eq!(lag_seconds(None, None, 1_000), None);
        assert_eq!(lag_seconds(Some(7), None, 1_000), Some(0));
        assert_eq!(lag_seconds(Some(6), Some(990), 1_000), Some(10));
        assert_eq!(lag_seconds(Some(6), Some(990), 1_060), Some(70));
        // A clock that went back shows no negative lag.
        assert_eq!(lag_seconds(Some(6), Some(1_010), 1_000), Some(0));
    }

    #[test]
    fn followers_report_lag_and_leave_with_their_session() {
        let hub = Hub::default();
        let r = "acme/app.db";
        let pusher = hub.join(r, SubscriberRole::Push);
        let a = hub.join(r, SubscriberRole::Pull);
        let b = hub.join(r, SubscriberRole::Pull);
        hub.learn_versions(r, &[(1, 100), (2, 200)], true);
        // Not reported yet: listed, nothing known.
        let unknown = FollowerStatus {
            applied_version: None,
            applied_at: None,
            lag_seconds: None,
        };
        assert_eq!(
            hub.status_at(r, 300).followers,
            [unknown.clone(), unknown.clone()]
        );
        a.applied(2, Some(250), None, 260);
        b.applied(1, None, None, 260);
        // A push subscriber's report counts for nothing.
        pusher.applied(2, None, None, 260);
        let s = hub.status_at(r, 300);
        assert_eq!(
            s.followers,
            [
                FollowerStatus {
                    applied_version: Some(2),
                    applied_at: Some(250),
                    lag_seconds: Some(0)
                },
                // Version 2 (made at 200) is the first it lacks.
                FollowerStatus {
                    applied_version: Some(1),
                    applied_at: Some(260),
                    lag_seconds: Some(100)
                },
            ]
        );
        // A new version: the current follower lags from its creation; the one behind
        // keeps lagging from the first version it lacks.
        hub.published(version(3), 400);
        let lags: Vec<_> = hub
            .status_at(r, 410)
            .followers
            .iter()
            .map(|f| f.lag_seconds)
            .collect();
        assert_eq!(lags, [Some(10), Some(210)]);
        assert_eq!(
            hub.followers_by_replica(410),
            [(r.to_owned(), hub.status_at(r, 410).followers)]
        );
        a.applied(3, Some(405), None, 406);
        assert_eq!(hub.status_at(r, 500).followers[0].lag_seconds, Some(0));
        // A subscriber's clock ahead of the server's is not believed.
        b.applied(3, Some(9_999), None, 501);
        assert_eq!(hub.status_at(r, 501).followers[1].applied_at, Some(501));
        drop(a);
        assert_eq!(hub.status_at(r, 501).followers.len(), 1);
        drop(b);
        assert!(hub.status_at(r, 501).followers.is_empty());
        assert!(hub.followers_by_replica(501).is_empty());
    }

    #[test]
    fn a_follower_far_behind_takes_its_first_missing_version_from_the_store() {
        let hub = Hub::default();
        let r = "acme/app.db";
        let m = hub.join(r, SubscriberRole::Pull);
        let versions: Vec<(u64, i64)> = (1..=40).map(|n| (n, n as i64 * 10)).collect();
        hub.learn_versions(r, &versions, true);
        // Versions 25..=40 are kept: version 24 lacking 25 needs no store.
        assert!(!m.needs_store_for(24));
        assert!(!m.needs_store_for(40));
        assert!(m.needs_store_for(5));
        m.applied(5, None, Some(60), 1_000);
        assert_eq!(hub.status_at(r, 1_000).followers[0].lag_seconds, Some(940));
        m.applied(24, None, None, 1_000);
        assert_eq!(hub.status_at(r, 1_000).followers[0].lag_seconds, Some(750));
        // A replica whose every version is kept never needs the store.
        let other = hub.join("acme/small.db", SubscriberRole::Pull);
        hub.learn_versions("acme/small.db", &[(3, 30), (9, 90)], true);
        assert!(!other.needs_store_for(1));
        other.applied(1, None, None, 100);
        assert_eq!(
            hub.status_at("acme/small.db", 100).followers[0].lag_seconds,
            Some(70)
        );
    }

    #[tokio::test]
    async fn the_other_servers_subscribers_are_shown_with_this_ones() {
        let hub = Hub::default();
        let r = "acme/app.db";
        let mine = hub.join(r, SubscriberRole::Pull);
        mine.applied(2, Some(100), None, 100);
        hub.changed(r, 60, 100);
        let (count, mut rx) = hub.wait_followers(r, 3);
        assert_eq!(count, 0);
        let elsewhere = |applied| Position {
            replica: r.into(),
            member: 0,
            role: SubscriberRole::Pull,
            applied: Some(applied),
            applied_at: Some(150),
            behind_since: None,
        };
        hub.set_others(Shared {
            positions: vec![
                elsewhere(3),
                Position {
                    role: SubscriberRole::Push,
                    applied: None,
                    ..elsewhere(0)
                },
            ],
            expected: vec![(r.into(), 500)],
            failures: vec![(
                "acme/other.db".into(),
                FailureStatus {
                    failing_since: 90,
                    attempts: 2,
                    error: "down".into(),
                    reported_at: 120,
                },
            )],
        });
        rx.changed().await.expect("new rows wake the waiter");
        assert_eq!(hub.wait_followers(r, 3).0, 1, "the other server's follower");
        let s = hub.status_at(r, 200);
        assert_eq!((s.push_subscribers, s.pull_subscribers), (1, 2));
        assert_eq!(s.followers.len(), 2);
        assert_eq!(s.followers[1].applied_version, Some(3));
        assert_eq!(s.expected_push_at, Some(500), "the later plan");
        assert_eq!(
            hub.status_at("acme/other.db", 200)
                .failure
                .map(|f| f.attempts),
            Some(2)
        );
        let mut known = hub.replicas();
        known.sort();
        assert_eq!(known, ["acme/app.db", "acme/other.db"]);
        // This server's own state is what it shares, never the others'.
        let own = hub.shared();
        assert_eq!(own.positions.len(), 1);
        assert_eq!(own.positions[0].applied, Some(2));
        assert_eq!(own.expected, [(r.to_owned(), 160)]);
        hub.set_others(Shared::default());
        assert_eq!(hub.status_at(r, 200).pull_subscribers, 1);
    }

    #[tokio::test]
    async fn waiters_wake_when_a_follower_reports_or_leaves() {
        let hub = Hub::default();
        let r = "acme/app.db";
        let (count, mut rx) = hub.wait_followers(r, 2);
        assert_eq!(count, 0);
        let m = hub.join(r, SubscriberRole::Pull);
        m.applied(1, None, None, 10);
        rx.changed().await.expect("a report wakes the waiter");
        assert_eq!(hub.wait_followers(r, 2).0, 0);
        m.applied(3, None, None, 11);
        rx.changed().await.expect("a report wakes the waiter");
        let (count, mut rx) = hub.wait_followers(r, 2);
        assert_eq!(count, 1);
        drop(m);
        rx.changed()
            .await
            .expect("a follower leaving wakes the waiter");
        assert_eq!(hub.wait_followers(r, 2).0, 0);
    }
}
