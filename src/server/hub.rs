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
//! - All of it lives in memory: a restarted server learns it again from subscribers as
//!   they reconnect and report.

use std::collections::HashMap;
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

/// The hub of one server.
#[derive(Debug)]
pub struct Hub {
    replicas: Mutex<HashMap<String, ReplicaState>>,
    closing: watch::Sender<bool>,
}

#[derive(Debug)]
struct ReplicaState {
    events: broadcast::Sender<Event>,
    push_subscribers: u64,
    pull_subscribers: u64,
    /// Unix seconds at which a push subscriber plans to push.
    expected_push_at: Option<i64>,
    /// The latest failure report, with the Unix time it arrived.
    failure: Option<(FailureReport, i64)>,
    /// When a REPORT and a CHANGED of this replica were last logged, and how many
    /// arrived unlogged since.
    report_log: LogLimit,
    changed_log: LogLimit,
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
            pull_subscribers: 0,
            expected_push_at: None,
            failure: None,
            report_log: LogLimit::default(),
            changed_log: LogLimit::default(),
        }
    }
}

/// A subscriber's membership: counted until dropped.
#[derive(Debug)]
pub struct Membership<'a> {
    hub: &'a Hub,
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
                SubscriberRole::Push => state.push_subscribers -= 1,
                SubscriberRole::Pull => state.pull_subscribers -= 1,
            }
        }
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
        match role {
            SubscriberRole::Push => state.push_subscribers += 1,
            SubscriberRole::Pull => state.pull_subscribers += 1,
        }
        Membership {
            hub: self,
            replica: replica.to_owned(),
            role,
            events: state.events.subscribe(),
            closing: self.closing.subscribe(),
        }
    }

    /// Tells `replica`'s subscribers about a new version; a committed push also ends
    /// the wait for it and any failure streak.
    pub fn published(&self, version: NewVersion) {
        let mut replicas = self.lock();
        if let Some(state) = replicas.get_mut(&version.replica) {
            state.expected_push_at = None;
            state.failure = None;
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

    /// What the hub knows of `replica`.
    pub fn status(&self, replica: &str) -> Status {
        let replicas = self.lock();
        let Some(state) = replicas.get(replica) else {
            return Status::default();
        };
        Status {
            push_subscribers: state.push_subscribers,
            pull_subscribers: state.pull_subscribers,
            expected_push_at: state.expected_push_at,
            failure: state.failure.as_ref().map(|(r, at)| FailureStatus {
                failing_since: at - i64::try_from(r.failing_for).unwrap_or(i64::MAX).min(*at),
                attempts: r.attempts,
                error: r.error.clone(),
                reported_at: *at,
            }),
        }
    }

    /// The replicas the hub knows something of now (a subscriber connected, a planned
    /// push, a failure report), in no particular order: a listing adds them to the
    /// store's, so a replica whose first push keeps failing is listed too.
    pub fn replicas(&self) -> Vec<String> {
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
    }

    /// Tells every subscribe session that the server is shutting down.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }
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
        hub.published(version(4));
        assert_eq!(m.events.try_recv(), Ok(Event::NewVersion(version(4))));
        let s = hub.status("acme/app.db");
        assert_eq!((s.expected_push_at, s.failure), (None, None));
    }

    #[test]
    fn a_lagging_member_still_gets_the_newest_version() {
        let hub = Hub::default();
        let mut m = hub.join("acme/app.db", SubscriberRole::Pull);
        for n in 1..=(EVENT_BACKLOG as u64 + 5) {
            hub.published(version(n));
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
}
