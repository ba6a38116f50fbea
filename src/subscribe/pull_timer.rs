//! When a pull subscriber pulls: a pure state machine like the push
//! [`Schedule`](super::Schedule), fed with what happened and the current time
//! ([`Time`], injected by the caller), answering whether a pull is due and when to wake
//! up next.
//!
//! The rules, all in one place:
//!
//! - The first connection pulls the replica's latest version, if it has one
//!   ([`Reason::Start`]); a connection that comes back pulls when the replica moved past
//!   what the database holds ([`Reason::Reconnect`]).
//! - A NEWREPLICAVERSION newer than what the database holds asks for a pull
//!   ([`Reason::NewVersion`]); "sync now" always does ([`Reason::SyncNow`]).
//! - Never two pulls at once. Asks that arrive while a pull runs are coalesced into one
//!   more pull after it, of whatever is newest then; versions announced during a pull
//!   and already carried by it ask for nothing more. A sync-now asked during a pull is
//!   never dropped: it makes exactly one more pull.
//! - A failed pull is retried after the reconnect backoff ([`reconnect_delay`]: 1 s
//!   doubling to a minute, jittered), for ever ([`Reason::Retry`]); a new ask meanwhile
//!   pulls at once. A success resets the backoff.
//! - Once asked to stop, nothing new starts; the subscriber is done when no pull runs.
//!
//! The loop that carries this out is [`super::pull`]; jitter is drawn by the caller.

use std::time::Duration;

use super::Time;
use super::pull::Reason;
use crate::backoff::reconnect_delay;

/// The pull subscriber's timing state.
#[derive(Debug, Clone, Default)]
pub struct PullSchedule {
    /// The version the local database holds, if known.
    held: Option<u64>,
    /// The newest version announced so far.
    announced: u64,
    /// A pull asked for and not started yet, and why.
    wanted: Option<Reason>,
    /// The pull running, and why.
    in_flight: Option<Reason>,
    /// Pulls failed since the last success.
    failures: u32,
    /// When the next retry is due, after a failure.
    retry_at: Option<Time>,
    /// Whether a connection was seen already (the next one is a reconnect).
    connected_once: bool,
    /// Asked to stop.
    stopping: bool,
}

impl PullSchedule {
    /// A schedule for a database that holds version `held`, if known.
    pub fn new(held: Option<u64>) -> PullSchedule {
        PullSchedule {
            held,
            ..PullSchedule::default()
        }
    }

    /// Connected (again) to a replica whose latest version is `latest` (0: none yet).
    /// Returns [`Reason::Start`] for the first connection, [`Reason::Reconnect`] after.
    pub fn connected(&mut self, _now: Time, latest: u64) -> Reason {
        self.announced = self.announced.max(latest);
        let reason = if std::mem::replace(&mut self.connected_once, true) {
            Reason::Reconnect
        } else {
            Reason::Start
        };
        // The start pulls even what the history says is held: the database may have
        // been replaced since.
        if latest > 0 && (reason == Reason::Start || self.held.is_none_or(|h| latest > h)) {
            self.want(reason);
        }
        reason
    }

    /// Version `version` landed.
    pub fn new_version(&mut self, _now: Time, version: u64) {
        self.announced = self.announced.max(version);
        if self.held.is_none_or(|h| version > h) {
            self.want(Reason::NewVersion);
        }
    }

    /// Someone asked for a sync now.
    pub fn sync_now(&mut self, _now: Time) {
        self.wanted = Some(Reason::SyncNow);
    }

    /// Asked to stop: nothing new starts.
    pub fn shutdown(&mut self, _now: Time) {
        self.stopping = true;
    }

    /// The pull due now, if any.
    pub fn due(&self, now: Time) -> Option<Reason> {
        if self.in_flight.is_some() || self.stopping {
            return None;
        }
        self.wanted
            .or_else(|| self.retry_at.filter(|at| *at <= now).map(|_| Reason::Retry))
    }

    /// A pull for `reason` started.
    pub fn pull_started(&mut self, _now: Time, reason: Reason) {
        self.in_flight = Some(reason);
        self.wanted = None;
        self.retry_at = None;
    }

    /// The running pull ended well; the database now holds `version`.
    pub fn pull_succeeded(&mut self, _now: Time, version: u64) {
        self.in_flight = None;
        self.failures = 0;
        self.held = Some(version);
        // Versions announced during the pull and carried by it ask for nothing more; a
        // sync-now asked meanwhile still pulls once more.
        if self.announced <= version
            && matches!(self.wanted, Some(Reason::NewVersion | Reason::Reconnect))
        {
            self.wanted = None;
        }
    }

    /// The running pull failed; returns the wait before its retry. `jitter` (drawn by
    /// the caller, see [`crate::backoff::jitter`]) scales the backoff.
    pub fn pull_failed(&mut self, now: Time, jitter: f64) -> Duration {
        self.in_flight = None;
        self.failures = self.failures.saturating_add(1);
        let delay = reconnect_delay(self.failures, jitter);
        self.retry_at = Some(now.saturating_add(delay));
        delay
    }

    /// When the loop must wake up next to start a pull (`None`: only an event can).
    pub fn next_wake(&self, now: Time) -> Option<Time> {
        if self.in_flight.is_some() || self.stopping {
            return None;
        }
        if self.wanted.is_some() {
            return Some(now);
        }
        self.retry_at
    }

    /// The pull running, if any.
    pub fn in_flight(&self) -> Option<Reason> {
        self.in_flight
    }

    /// Whether the subscriber was asked to stop and no pull runs any more.
    pub fn done(&self) -> bool {
        self.stopping && self.in_flight.is_none()
    }

    /// The version the database holds, as far as the subscriber knows.
    pub fn held(&self) -> Option<u64> {
        self.held
    }

    fn want(&mut self, reason: Reason) {
        self.wanted.get_or_insert(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Time {
        Duration::from_secs(n)
    }

    /// Starts the due pull at `now`, asserting why it is due.
    #[track_caller]
    fn start(sched: &mut PullSchedule, now: Time, reason: Reason) {
        assert_eq!(sched.due(now), Some(reason), "at {now:?}");
        sched.pull_started(now, reason);
        assert_eq!(sched.due(now), None, "never two pulls at once");
    }

    #[test]
    fn the_start_pulls_the_latest_version_even_if_held() {
        let mut sched = PullSchedule::new(Some(3));
        assert_eq!(sched.due(s(0)), None, "nothing before the server's word");
        assert_eq!(sched.connected(s(0), 3), Reason::Start);
        start(&mut sched, s(0), Reason::Start);
        sched.pull_succeeded(s(1), 3);
        assert_eq!(sched.due(s(1)), None);
        assert_eq!(sched.next_wake(s(1)), None, "sleeps until an event");
    }

    #[test]
    fn a_replica_without_versions_waits_for_the_first() {
        let mut sched = PullSchedule::new(None);
        assert_eq!(sched.connected(s(0), 0), Reason::Start);
        assert_eq!(sched.due(s(0)), None);
        sched.new_version(s(5), 1);
        start(&mut sched, s(5), Reason::NewVersion);
    }

    #[test]
    fn versions_announced_during_a_pull_make_one_more_pull_of_the_newest() {
        let mut sched = PullSchedule::new(Some(1));
        sched.connected(s(0), 1);
        start(&mut sched, s(0), Reason::Start);
        sched.pull_succeeded(s(1), 1);
        sched.new_version(s(2), 2);
        start(&mut sched, s(2), Reason::NewVersion);
        for v in 3..=6 {
            sched.new_version(s(2 + v), v);
            assert_eq!(sched.due(s(2 + v)), None, "coalesced while pulling");
        }
        // The pull of 2 ends: one more pull, of whatever is newest then.
        sched.pull_succeeded(s(10), 2);
        start(&mut sched, s(10), Reason::NewVersion);
        sched.pull_succeeded(s(11), 6);
        assert_eq!(sched.due(s(11)), None, "6 was the newest announced");
    }

    #[test]
    fn versions_a_pull_already_carried_ask_for_nothing_more() {
        let mut sched = PullSchedule::new(Some(1));
        sched.connected(s(0), 1);
        start(&mut sched, s(0), Reason::Start);
        sched.pull_succeeded(s(1), 1);
        sched.new_version(s(2), 2);
        start(&mut sched, s(2), Reason::NewVersion);
        // Version 3 lands while the pull runs, and the pull already fetched it.
        sched.new_version(s(3), 3);
        sched.pull_succeeded(s(4), 3);
        assert_eq!(sched.due(s(4)), None);
        // An old announcement changes nothing either.
        sched.new_version(s(5), 2);
        assert_eq!(sched.due(s(5)), None);
    }

    #[test]
    fn sync_now_during_a_pull_pulls_exactly_once_more() {
        let mut sched = PullSchedule::new(Some(1));
        sched.connected(s(0), 1);
        start(&mut sched, s(0), Reason::Start);
        sched.new_version(s(1), 2);
        sched.sync_now(s(1));
        sched.sync_now(s(2));
        sched.pull_succeeded(s(3), 2);
        start(&mut sched, s(3), Reason::SyncNow);
        sched.pull_succeeded(s(4), 2);
        assert_eq!(sched.due(s(4)), None);
        // Idle, sync-now pulls at once even without a new version.
        sched.sync_now(s(9));
        assert_eq!(sched.next_wake(s(9)), Some(s(9)));
        start(&mut sched, s(9), Reason::SyncNow);
    }

    #[test]
    fn failed_pulls_retry_after_1_2_4_8_16_32_60_60_seconds() {
        let mut sched = PullSchedule::new(Some(1));
        sched.connected(s(0), 2);
        start(&mut sched, s(0), Reason::Start);
        let mut now = s(0);
        for want in [1, 2, 4, 8, 16, 32, 60, 60] {
            let delay = sched.pull_failed(now, 1.0);
            assert_eq!(delay, s(want));
            assert_eq!(sched.next_wake(now), Some(now + s(want)));
            assert_eq!(sched.due(now + s(want) - Duration::from_millis(1)), None);
            now += s(want);
            start(&mut sched, now, Reason::Retry);
        }
        // Jitter shortens a wait by at most half.
        assert_eq!(sched.pull_failed(now, 0.5), s(30));
        start(&mut sched, now + s(30), Reason::Retry);
        // A success resets the backoff.
        sched.pull_succeeded(now + s(31), 2);
        sched.new_version(now + s(40), 3);
        start(&mut sched, now + s(40), Reason::NewVersion);
        assert_eq!(sched.pull_failed(now + s(41), 1.0), s(1));
    }

    #[test]
    fn a_new_version_during_the_retry_wait_pulls_at_once() {
        let mut sched = PullSchedule::new(Some(1));
        sched.connected(s(0), 2);
        start(&mut sched, s(0), Reason::Start);
        assert_eq!(sched.pull_failed(s(1), 1.0), s(1));
        sched.pull_started(s(2), Reason::Retry);
        assert_eq!(sched.pull_failed(s(3), 1.0), s(2));
        sched.new_version(s(4), 3);
        start(&mut sched, s(4), Reason::NewVersion);
    }

    #[test]
    fn a_reconnect_pulls_only_when_the_replica_moved_on() {
        let mut sched = PullSchedule::new(None);
        sched.connected(s(0), 2);
        start(&mut sched, s(0), Reason::Start);
        sched.pull_succeeded(s(1), 2);
        assert_eq!(sched.connected(s(10), 2), Reason::Reconnect);
        assert_eq!(sched.due(s(10)), None, "nothing landed meanwhile");
        assert_eq!(sched.connected(s(20), 4), Reason::Reconnect);
        start(&mut sched, s(20), Reason::Reconnect);
        sched.pull_succeeded(s(21), 4);
        assert_eq!(sched.held(), Some(4));
    }

    #[test]
    fn stopping_starts_nothing_and_waits_for_the_running_pull() {
        let mut sched = PullSchedule::new(Some(1));
        sched.connected(s(0), 1);
        start(&mut sched, s(0), Reason::Start);
        sched.new_version(s(1), 2);
        sched.shutdown(s(2));
        assert!(!sched.done(), "a pull runs");
        assert_eq!(sched.in_flight(), Some(Reason::Start));
        sched.pull_failed(s(3), 1.0);
        assert!(sched.done());
        assert_eq!(sched.due(s(100)), None);
        assert_eq!(sched.next_wake(s(3)), None);
    }
}
