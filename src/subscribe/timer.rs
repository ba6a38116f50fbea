//! When a push subscriber pushes: a pure state machine fed with what happened and the
//! current time ([`Time`], injected by the caller, so the rules are tested without a
//! clock).
//!
//! The rules, all in one place:
//!
//! - The subscriber pushes once at start ([`Trigger::Start`]).
//! - Each change (re)starts one timer: the push fires `max(wait_idle, min_interval −
//!   time since the last push)` after the latest change ([`Trigger::Idle`]). Put
//!   differently, at `max(latest change + wait_idle, last push + min_interval)`, which
//!   is also how changes seen during a push are timed once it has ended.
//! - While changes keep coming, a push still happens once `max_interval` has passed
//!   since the last push, if anything is pending ([`Trigger::MaxInterval`]).
//! - Once `max_changes` commits have been seen since the last push started, a push is
//!   due at once ([`Trigger::Changes`]).
//! - "Sync now" pushes at once even without a change; asked during a push, it makes
//!   exactly one more push right after it ([`Trigger::SyncNow`]).
//! - A failed push is retried after 5, 10, 20, 40 and 80 s ([`Trigger::Retry`], see
//!   [`backoff::retry_delay`]); while a retry is scheduled it is the only automatic
//!   push, so changes do not bypass the backoff. After the fifth retry has failed the
//!   usual rules apply again: the next change, `max_interval` or "sync now" pushes.
//! - Shutdown makes one last push at once if changes are pending or a failed push is
//!   owed ([`Trigger::Shutdown`]); nothing else is pushed after shutdown.
//! - Never two pushes at once: nothing is due while a push is in flight.
//!
//! "The last push" is the end of the latest push attempt, whether it succeeded or
//! failed (before the first one ends, the subscriber's start): a failing server is
//! not pushed to more often than the intervals allow once the retries are spent.
//!
//! The schedule also decides the CHANGED notices that tell the server a push is coming:
//! one for the first change after a push, carrying the whole seconds until the planned
//! push (rounded up); if later changes move the plan, a corrected notice
//! [`CHANGED_RESEND_LEAD`] before the announced time, so the server's expectation is
//! put right just before it would go stale.

use std::time::Duration;

use super::{Time, duration};
use crate::backoff;

/// The shortest `--wait-idle`: below it a busy database would be pushed almost
/// continuously.
pub const MIN_WAIT_IDLE: Duration = Duration::from_secs(10);

/// The longest `--wait-idle` (24 days): a limit long enough for any use, and short
/// enough for every timer a subscriber or its peers may set.
pub const MAX_WAIT_IDLE: Duration = Duration::from_secs(24 * 24 * 3600);

/// How long before an announced push time a corrected CHANGED notice is sent, when
/// later changes have moved the push.
pub const CHANGED_RESEND_LEAD: Duration = Duration::from_secs(10);

/// The push subscriber's timing flags, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// `--wait-idle`: how long the database must stay unchanged before a push.
    pub wait_idle: Duration,
    /// `--min-interval`: the least time between the end of one push and the next
    /// change-driven push.
    pub min_interval: Duration,
    /// `--max-interval`: the most time between two pushes while changes are pending.
    pub max_interval: Option<Duration>,
    /// `--max-changes`: push at once after this many commits.
    pub max_changes: Option<u32>,
}

impl Timing {
    /// Validates flags: wait_idle must lie in 10 s ..= 24 days; min_interval defaults to
    /// half of max_interval (0 when there is no max_interval); min_interval may not
    /// exceed max_interval; max_interval is at least 10 s; max_changes >= 1.
    ///
    /// Errors are one clear line naming the flag (e.g. "--wait-idle 5s: must be at least
    /// 10s").
    pub fn new(
        wait_idle: Duration,
        min_interval: Option<Duration>,
        max_interval: Option<Duration>,
        max_changes: Option<u32>,
    ) -> Result<Timing, String> {
        let f = duration::format;
        if wait_idle < MIN_WAIT_IDLE {
            return Err(format!(
                "--wait-idle {}: must be at least {}",
                f(wait_idle),
                f(MIN_WAIT_IDLE)
            ));
        }
        if wait_idle > MAX_WAIT_IDLE {
            return Err(format!(
                "--wait-idle {}: must be at most {}",
                f(wait_idle),
                f(MAX_WAIT_IDLE)
            ));
        }
        // The same floor as --wait-idle, for the same reason.
        if let Some(max) = max_interval.filter(|&max| max < MIN_WAIT_IDLE) {
            return Err(format!(
                "--max-interval {}: must be at least {} (like --wait-idle: a busy database \
                 would otherwise be pushed almost continuously)",
                f(max),
                f(MIN_WAIT_IDLE)
            ));
        }
        for (flag, value) in [
            ("--min-interval", min_interval),
            ("--max-interval", max_interval),
        ] {
            if let Some(v) = value.filter(|&v| v > MAX_INTERVAL) {
                return Err(format!(
                    "{flag} {}: must be at most {}",
                    f(v),
                    f(MAX_INTERVAL)
                ));
            }
        }
        let min_interval = match (min_interval, max_interval) {
            (Some(min), Some(max)) if min > max => {
                return Err(format!(
                    "--min-interval {}: may not exceed --max-interval {}",
                    f(min),
                    f(max)
                ));
            }
            (Some(min), _) => min,
            (None, Some(max)) => max / 2,
            (None, None) => Duration::ZERO,
        };
        if max_changes == Some(0) {
            return Err("--max-changes 0: must be at least 1".to_owned());
        }
        Ok(Timing {
            wait_idle,
            min_interval,
            max_interval,
            max_changes,
        })
    }
}

/// Why a push runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The subscriber has just started.
    Start,
    /// The database has been idle for long enough after a change.
    Idle,
    /// Changes kept coming for `max_interval` since the last push.
    MaxInterval,
    /// `max_changes` commits were seen.
    Changes,
    /// Someone asked for a push now.
    SyncNow,
    /// The subscriber is stopping and a push was owed.
    Shutdown,
    /// A push failed and this is one of its retries.
    Retry,
}

impl Trigger {
    /// The trigger's name in logs and in the sync history: "start", "idle",
    /// "max-interval", "changes", "sync-now", "shutdown" or "retry".
    pub fn as_str(&self) -> &'static str {
        match self {
            Trigger::Start => "start",
            Trigger::Idle => "idle",
            Trigger::MaxInterval => "max-interval",
            Trigger::Changes => "changes",
            Trigger::SyncNow => "sync-now",
            Trigger::Shutdown => "shutdown",
            Trigger::Retry => "retry",
        }
    }
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The longest `--min-interval` or `--max-interval` accepted: about ten years, far
/// beyond any use, and far from the clock arithmetic's limits.
pub const MAX_INTERVAL: Duration = Duration::from_secs(520 * 7 * 24 * 3600);

/// The push in flight: its trigger and the commits its snapshot covers.
#[derive(Debug, Clone, Copy)]
struct Flight {
    trigger: Trigger,
    commits: u32,
}

/// A push subscriber's schedule: feed it every event with the current time, then ask
/// [`Schedule::due`], [`Schedule::changed_notice`] and [`Schedule::next_wake`].
///
/// The loop driving it, after each event or wake-up at `now`: if `due(now)` names a
/// trigger, call `push_started` and start the push; send `changed_notice(now)` if there
/// is one; then sleep until `next_wake(now)` or the next event.
#[derive(Debug, Clone)]
pub struct Schedule {
    timing: Timing,
    /// The end of the last push attempt, or the start before the first one ended.
    last_end: Time,
    /// When the Start push was asked for, until a push starts.
    start: Option<Time>,
    /// When "sync now" was asked for, until a push starts.
    sync_now: Option<Time>,
    /// When shutdown was asked for.
    shutdown: Option<Time>,
    /// A push started after shutdown was asked for: it was the last one.
    final_started: bool,
    /// Commits seen since the last push started.
    fresh: u32,
    /// The latest of those commits.
    last_change: Option<Time>,
    /// When `fresh` reached `max_changes`.
    changes_reached: Option<Time>,
    /// Commits whose push failed, owed to the next push.
    carried: u32,
    in_flight: Option<Flight>,
    /// Push attempts failed in a row since the last success.
    failures: u32,
    /// The first of those failures.
    first_failure: Option<Time>,
    /// The scheduled retry, if the retries are not spent.
    retry_at: Option<Time>,
    /// The push time the last CHANGED notice announced, since the last push started.
    announced: Option<Time>,
}

impl Schedule {
    /// A schedule for a subscriber starting at `now`: a Start push is due at once.
    pub fn new(timing: Timing, now: Time) -> Schedule {
        Schedule {
            timing,
            last_end: now,
            start: Some(now),
            sync_now: None,
            shutdown: None,
            final_started: false,
            fresh: 0,
            last_change: None,
            changes_reached: None,
            carried: 0,
            in_flight: None,
            failures: 0,
            first_failure: None,
            retry_at: None,
            announced: None,
        }
    }

    /// The timing this schedule follows.
    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    /// The watcher saw `commits` (>= 1) commits at `now`; 0 is ignored.
    pub fn change(&mut self, now: Time, commits: u32) {
        if commits == 0 {
            return;
        }
        self.fresh = self.fresh.saturating_add(commits);
        self.last_change = Some(now);
        if self.changes_reached.is_none()
            && self.timing.max_changes.is_some_and(|n| self.fresh >= n)
        {
            self.changes_reached = Some(now);
        }
    }

    /// A push is due at once (trigger SyncNow), even with no change; if a push is in
    /// flight, exactly one more push runs right after it.
    pub fn sync_now(&mut self, now: Time) {
        self.sync_now.get_or_insert(now);
    }

    /// The subscriber is stopping: if changes are pending (or a failed push is owed),
    /// one last push is due at once (Shutdown) — after the one in flight, if any;
    /// otherwise nothing. No other push is due after this.
    pub fn shutdown(&mut self, now: Time) {
        self.shutdown.get_or_insert(now);
    }

    /// Whether a push should start now, and why; never while one is in flight.
    pub fn due(&self, now: Time) -> Option<Trigger> {
        self.plan()
            .filter(|&(at, _)| at <= now)
            .map(|(_, trigger)| trigger)
    }

    /// The push's snapshot is taken now: the pending changes and any "sync now" request
    /// are covered by it, and the CHANGED announcement starts afresh.
    pub fn push_started(&mut self, _now: Time, trigger: Trigger) {
        // A second push while one is in flight is the caller's mistake; its commits
        // are merged rather than lost.
        let earlier = self.in_flight.map_or(0, |f| f.commits);
        self.in_flight = Some(Flight {
            trigger,
            commits: self
                .fresh
                .saturating_add(self.carried)
                .saturating_add(earlier),
        });
        self.fresh = 0;
        self.carried = 0;
        self.last_change = None;
        self.changes_reached = None;
        self.start = None;
        self.sync_now = None;
        self.retry_at = None;
        self.announced = None;
        if trigger == Trigger::Shutdown || self.shutdown.is_some() {
            self.final_started = true;
        }
    }

    /// The push in flight succeeded at `now`, which becomes the last push. Changes seen
    /// during it stay pending and are timed as usual; the retry count starts over.
    pub fn push_succeeded(&mut self, now: Time) {
        self.in_flight = None;
        self.last_end = now;
        self.failures = 0;
        self.first_failure = None;
        self.retry_at = None;
    }

    /// The push in flight failed at `now`: its changes are pending again and a Retry is
    /// scheduled per [`backoff::retry_delay`]; after the fifth retry has failed there is
    /// none, and the next change, max-interval, sync-now or shutdown pushes as usual.
    pub fn push_failed(&mut self, now: Time) {
        if let Some(flight) = self.in_flight.take() {
            self.carried = self.carried.saturating_add(flight.commits);
        }
        self.last_end = now;
        self.failures = self.failures.saturating_add(1);
        self.first_failure.get_or_insert(now);
        self.retry_at = backoff::retry_delay(self.failures).map(|d| now.saturating_add(d));
    }

    /// The earliest time after `now` at which [`Schedule::due`] or
    /// [`Schedule::changed_notice`] could change answer; `None` when only an event can.
    ///
    /// Only future times are named: whatever is due at `now` already is the caller's to
    /// take before sleeping.
    pub fn next_wake(&self, now: Time) -> Option<Time> {
        let push = self.plan().map(|(at, _)| at);
        let notice = self.notice_plan().map(|(send_at, _)| send_at);
        [push, notice]
            .into_iter()
            .flatten()
            .filter(|&t| t > now)
            .min()
    }

    /// The CHANGED notice to send now, if one is due: the whole seconds until the
    /// planned push, rounded up. Each notice is returned once.
    pub fn changed_notice(&mut self, now: Time) -> Option<u32> {
        let (send_at, push_at) = self.notice_plan()?;
        if send_at > now || push_at <= now {
            return None;
        }
        self.announced = Some(push_at);
        let left = push_at - now;
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        Some(u32::try_from(secs).unwrap_or(u32::MAX))
    }

    /// How long pushes have been failing at `now`: since the first failure after the
    /// last success, while the latest push attempt failed; `None` after a success.
    pub fn failing_for(&self, now: Time) -> Option<Duration> {
        self.first_failure.map(|first| now.saturating_sub(first))
    }

    /// How many push attempts have failed in a row since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether changes were seen that no push has carried successfully yet, counting
    /// those of the push in flight.
    pub fn pending(&self) -> bool {
        self.fresh > 0 || self.carried > 0 || self.in_flight.is_some_and(|f| f.commits > 0)
    }

    /// The server answers again at `now` after being unreachable (or restarted, having
    /// forgotten what it was told): if pushes have been failing and changes are owed, a
    /// Retry is due at once, even when the retries were spent; a push still planned is
    /// announced again (CHANGED).
    pub fn server_back(&mut self, now: Time) {
        self.announced = None;
        if self.first_failure.is_some() && self.in_flight.is_none() && self.owed() {
            self.retry_at = Some(now);
        }
    }

    /// The trigger of the push in flight, if one is.
    pub fn in_flight(&self) -> Option<Trigger> {
        self.in_flight.map(|f| f.trigger)
    }

    /// The planned push time and its trigger, for logs; `None` while a push is in flight
    /// or when nothing will be pushed until an event.
    pub fn planned(&self) -> Option<(Time, Trigger)> {
        self.plan()
    }

    /// Shutdown was asked for and nothing is left to do: no push in flight and none due
    /// or planned. The subscriber may stop.
    pub fn done(&self) -> bool {
        self.shutdown.is_some() && self.in_flight.is_none() && self.plan().is_none()
    }

    /// Whether a push is owed whatever the timers say: changes pending outside the
    /// push in flight, or the latest push attempt failed.
    fn owed(&self) -> bool {
        self.fresh > 0 || self.carried > 0 || self.first_failure.is_some()
    }

    /// The next push: when it is due (possibly in the past) and why.
    fn plan(&self) -> Option<(Time, Trigger)> {
        if self.in_flight.is_some() {
            return None;
        }
        if let Some(at) = self.shutdown {
            return (!self.final_started && self.owed()).then_some((at, Trigger::Shutdown));
        }
        if let Some(at) = self.start {
            return Some((at, Trigger::Start));
        }
        if let Some(at) = self.sync_now {
            return Some((at, Trigger::SyncNow));
        }
        if let Some(at) = self.retry_at {
            // The backoff stands: changes ride along with the retry.
            return Some((at, Trigger::Retry));
        }
        let changes = self.changes_reached.map(|at| (at, Trigger::Changes));
        let max_interval = self
            .timing
            .max_interval
            .filter(|_| self.fresh > 0 || self.carried > 0)
            .map(|max| (self.last_end.saturating_add(max), Trigger::MaxInterval));
        let idle = self.last_change.map(|change| {
            let after_change = change.saturating_add(self.timing.wait_idle);
            let after_push = self.last_end.saturating_add(self.timing.min_interval);
            (after_change.max(after_push), Trigger::Idle)
        });
        // The earliest wins; on a tie, the first in this order names the push.
        [changes, max_interval, idle]
            .into_iter()
            .flatten()
            .min_by_key(|&(at, _)| at)
    }

    /// The next CHANGED notice: when to send it and the push time it announces.
    fn notice_plan(&self) -> Option<(Time, Time)> {
        if self.in_flight.is_some() || (self.fresh == 0 && self.carried == 0) {
            return None;
        }
        let (push_at, _) = self.plan()?;
        match self.announced {
            None => Some((Time::ZERO, push_at)),
            Some(announced) if push_at > announced => {
                Some((announced.saturating_sub(CHANGED_RESEND_LEAD), push_at))
            }
            Some(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Time {
        Duration::from_secs(n)
    }

    fn m(n: u64) -> Time {
        s(60 * n)
    }

    fn ms(n: u64) -> Time {
        Duration::from_millis(n)
    }

    fn timing(
        wait_idle: Duration,
        min_interval: Option<Duration>,
        max_interval: Option<Duration>,
        max_changes: Option<u32>,
    ) -> Timing {
        Timing::new(wait_idle, min_interval, max_interval, max_changes).expect("valid timing")
    }

    /// A schedule whose Start push ran at 0 and succeeded at `ended`.
    fn after_start(timing: Timing, ended: Time) -> Schedule {
        let mut sched = Schedule::new(timing, Time::ZERO);
        assert_eq!(sched.due(Time::ZERO), Some(Trigger::Start));
        sched.push_started(Time::ZERO, Trigger::Start);
        sched.push_succeeded(ended);
        sched
    }

    /// Asserts that nothing is due until just before `at` and `trigger` is due at `at`.
    #[track_caller]
    fn assert_fires_at(sched: &Schedule, at: Time, trigger: Trigger) {
        assert_eq!(
            sched.due(at - ms(1)),
            None,
            "nothing due just before {at:?}"
        );
        assert_eq!(sched.due(at), Some(trigger), "due at {at:?}");
        assert_eq!(sched.planned(), Some((at, trigger)));
    }

    /// What a simulated subscriber did.
    #[derive(Debug, Default)]
    struct Run {
        pushes: Vec<(Time, Trigger)>,
        notices: Vec<(Time, u32)>,
    }

    /// Drives `sched` the way the subscriber loop does, from `now` up to `until`: one
    /// commit at each of `changes` (sorted), every push succeeding `push_takes` after
    /// it starts, and waking only at the events and at the times `next_wake` names,
    /// so a wrong `next_wake` shows as a missed or late push.
    fn drive(
        sched: &mut Schedule,
        mut now: Time,
        changes: &[Time],
        push_takes: Duration,
        until: Time,
    ) -> Run {
        let mut run = Run::default();
        let mut changes = changes.iter().copied().peekable();
        let mut push_ends = None;
        loop {
            if push_ends == Some(now) {
                sched.push_succeeded(now);
                push_ends = None;
            }
            while changes.next_if(|&c| c <= now).is_some() {
                sched.change(now, 1);
            }
            if let Some(trigger) = sched.due(now) {
                assert!(
                    push_ends.is_none(),
                    "{trigger:?} due during a push at {now:?}"
                );
                sched.push_started(now, trigger);
                run.pushes.push((now, trigger));
                push_ends = Some(now + push_takes);
                if push_takes.is_zero() {
                    sched.push_succeeded(now);
                    push_ends = None;
                    assert_eq!(sched.due(now), None, "a second push due at {now:?}");
                }
            }
            if let Some(secs) = sched.changed_notice(now) {
                run.notices.push((now, secs));
            }
            let next = [changes.peek().copied(), push_ends, sched.next_wake(now)]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(t) if t <= until => {
                    assert!(t > now, "next wake {t:?} is not after {now:?}");
                    now = t;
                }
                _ => return run,
            }
        }
    }

    #[test]
    fn timing_checks_its_flags() {
        let t = timing(m(5), None, Some(m(60)), None);
        assert_eq!(t.min_interval, m(30), "half of max_interval by default");
        let t = timing(m(5), None, None, None);
        assert_eq!(t.min_interval, Duration::ZERO, "0 without max_interval");
        let t = timing(s(10), Some(m(60)), Some(m(60)), Some(1));
        assert_eq!((t.wait_idle, t.min_interval), (s(10), m(60)));
        assert_eq!(
            timing(s(24 * 86_400), None, None, None).wait_idle,
            s(24 * 86_400)
        );

        let err = |w, min, max, n| Timing::new(w, min, max, n).unwrap_err();
        assert_eq!(
            err(s(5), None, None, None),
            "--wait-idle 5s: must be at least 10s"
        );
        assert_eq!(
            err(s(24 * 86_400 + 1), None, None, None),
            "--wait-idle 24d1s: must be at most 24d"
        );
        assert_eq!(
            err(m(5), Some(m(61)), Some(m(60)), None),
            "--min-interval 1h1m: may not exceed --max-interval 1h"
        );
        for max in [s(0), s(5), s(9)] {
            let e = err(s(10), None, Some(max), None);
            assert!(
                e.starts_with(&format!(
                    "--max-interval {}: must be at least 10s",
                    duration::format(max)
                )),
                "{e}"
            );
        }
        assert_eq!(timing(s(10), None, Some(s(10)), None).min_interval, s(5));
        assert_eq!(
            err(m(5), None, None, Some(0)),
            "--max-changes 0: must be at least 1"
        );
    }

    #[test]
    fn start_pushes_at_once_then_nothing_without_a_change() {
        let mut sched = Schedule::new(timing(m(5), None, Some(m(60)), None), s(3));
        assert_eq!(sched.due(s(3)), Some(Trigger::Start));
        assert_eq!(sched.planned(), Some((s(3), Trigger::Start)));
        sched.push_started(s(3), Trigger::Start);
        assert_eq!(sched.due(s(3)), None);
        sched.push_succeeded(s(4));
        assert_eq!(sched.due(m(100_000)), None, "no change, no push");
        assert_eq!(
            sched.next_wake(s(4)),
            None,
            "only an event can make a push due"
        );
        assert_eq!(sched.planned(), None);
        assert!(!sched.pending());
    }

    #[test]
    fn change_soon_after_a_push_waits_for_min_interval() {
        // The example: wait-idle 5m, min-interval 10m, a change 3 minutes after a
        // push fires 7 minutes later.
        let mut sched = after_start(timing(m(5), Some(m(10)), None, None), Time::ZERO);
        sched.change(m(3), 1);
        assert!(sched.pending());
        assert_fires_at(&sched, m(10), Trigger::Idle);
        assert_eq!(sched.next_wake(m(3)), Some(m(10)));
    }

    #[test]
    fn change_long_after_a_push_waits_for_wait_idle() {
        // The example: a change 12 minutes after a push fires 5 minutes later.
        let mut sched = after_start(timing(m(5), Some(m(10)), None, None), Time::ZERO);
        sched.change(m(12), 1);
        assert_fires_at(&sched, m(17), Trigger::Idle);
        assert_eq!(sched.next_wake(m(12)), Some(m(17)));
    }

    #[test]
    fn each_change_restarts_the_timer() {
        let mut sched = after_start(timing(m(5), None, None, None), Time::ZERO);
        sched.change(m(1), 1);
        assert_eq!(sched.planned(), Some((m(6), Trigger::Idle)));
        sched.change(m(3), 2);
        sched.change(m(6) - s(1), 1);
        assert_fires_at(&sched, m(11) - s(1), Trigger::Idle);
    }

    #[test]
    fn changes_every_minute_forever_push_every_max_interval() {
        let mut sched = Schedule::new(timing(m(5), None, Some(m(60)), None), Time::ZERO);
        let changes: Vec<Time> = (1..=300).map(m).collect();
        let run = drive(&mut sched, Time::ZERO, &changes, Duration::ZERO, m(300));
        let mut expected = vec![(Time::ZERO, Trigger::Start)];
        expected.extend((1..=5).map(|h| (m(60 * h), Trigger::MaxInterval)));
        assert_eq!(run.pushes, expected);
    }

    #[test]
    fn max_interval_counts_from_the_end_of_the_last_push() {
        let mut sched = Schedule::new(timing(m(5), None, Some(m(60)), None), Time::ZERO);
        let changes: Vec<Time> = (1..=200).map(m).collect();
        let run = drive(&mut sched, Time::ZERO, &changes, s(10), m(200));
        assert_eq!(
            run.pushes,
            [
                (Time::ZERO, Trigger::Start),
                (m(60) + s(10), Trigger::MaxInterval),
                (m(120) + s(20), Trigger::MaxInterval),
                (m(180) + s(30), Trigger::MaxInterval),
            ]
        );
    }

    #[test]
    fn max_interval_needs_pending_changes() {
        let mut sched = after_start(timing(m(5), None, Some(m(60)), None), Time::ZERO);
        assert_eq!(sched.due(m(61)), None);
        assert_eq!(sched.next_wake(Time::ZERO), None);
        // A change after max_interval has passed pushes at once, as overdue.
        sched.change(m(70), 1);
        assert_eq!(sched.due(m(70)), Some(Trigger::MaxInterval));
    }

    #[test]
    fn max_changes_pushes_at_once() {
        let mut sched = after_start(timing(m(5), None, None, Some(3)), Time::ZERO);
        sched.change(m(1), 1);
        sched.change(m(2), 1);
        assert_eq!(sched.due(m(2)), None);
        assert_eq!(sched.planned(), Some((m(7), Trigger::Idle)));
        sched.change(m(2) + s(30), 1);
        assert_eq!(sched.due(m(2) + s(30)), Some(Trigger::Changes));
        sched.push_started(m(2) + s(30), Trigger::Changes);
        // Commits seen during the push count towards the next one.
        sched.change(m(3), 2);
        assert_eq!(sched.due(m(3)), None, "in flight");
        sched.push_succeeded(m(3) + s(10));
        assert_eq!(sched.due(m(3) + s(10)), None, "2 of 3 commits");
        sched.change(m(4), 1);
        assert_eq!(sched.due(m(4)), Some(Trigger::Changes));

        // Many commits in one report count as many.
        let mut sched = after_start(timing(m(5), None, None, Some(3)), Time::ZERO);
        sched.change(m(1), 5);
        assert_eq!(sched.due(m(1)), Some(Trigger::Changes));
    }

    #[test]
    fn changes_during_a_push_wait_for_it_then_time_as_usual() {
        let mut sched = after_start(timing(m(5), Some(m(10)), None, None), Time::ZERO);
        sched.change(m(20), 1);
        assert_eq!(sched.due(m(25)), Some(Trigger::Idle));
        sched.push_started(m(25), Trigger::Idle);
        sched.change(m(25) + s(30), 1);
        assert!(sched.pending());
        assert_eq!(sched.due(m(40)), None, "never while a push is in flight");
        assert_eq!(sched.next_wake(m(25) + s(30)), None);
        assert_eq!(sched.planned(), None);
        sched.push_succeeded(m(26));
        assert!(
            sched.pending(),
            "the change during the push is still pending"
        );
        // wait_idle after the change would be 30m30s; min_interval after the push's
        // end is later.
        assert_fires_at(&sched, m(36), Trigger::Idle);

        // With no min_interval, wait_idle after the change decides.
        let mut sched = after_start(timing(m(5), None, None, None), Time::ZERO);
        sched.change(m(20), 1);
        sched.push_started(m(25), Trigger::Idle);
        sched.change(m(25) + s(30), 1);
        sched.push_succeeded(m(26));
        assert_fires_at(&sched, m(30) + s(30), Trigger::Idle);
    }

    #[test]
    fn never_two_pushes_at_once() {
        let mut sched = after_start(timing(s(10), None, Some(m(1)), Some(1)), Time::ZERO);
        sched.change(s(1), 1);
        assert_eq!(sched.due(s(1)), Some(Trigger::Changes));
        sched.push_started(s(1), Trigger::Changes);
        sched.change(s(2), 5);
        sched.sync_now(s(3));
        for t in [s(3), m(5), m(500)] {
            assert_eq!(sched.due(t), None);
            assert_eq!(sched.next_wake(t), None);
        }
        assert_eq!(sched.in_flight(), Some(Trigger::Changes));
        sched.push_succeeded(m(500));
        assert_eq!(sched.in_flight(), None);
        assert_eq!(sched.due(m(500)), Some(Trigger::SyncNow));
    }

    #[test]
    fn sync_now_pushes_at_once_even_without_a_change() {
        let mut sched = after_start(timing(m(5), None, None, None), Time::ZERO);
        sched.sync_now(m(3));
        assert_eq!(sched.due(m(3)), Some(Trigger::SyncNow));
        sched.push_started(m(3), Trigger::SyncNow);
        sched.push_succeeded(m(3) + s(1));
        assert_eq!(sched.due(m(3) + s(1)), None, "one request, one push");
        assert_eq!(sched.next_wake(m(3) + s(1)), None);
    }

    #[test]
    fn sync_now_during_a_push_runs_exactly_one_more_after_it() {
        let mut sched = after_start(timing(m(5), None, None, None), Time::ZERO);
        sched.change(m(1), 1);
        sched.push_started(m(6), Trigger::Idle);
        sched.sync_now(m(6) + s(1));
        sched.sync_now(m(6) + s(2));
        sched.sync_now(m(6) + s(3));
        assert_eq!(sched.due(m(6) + s(3)), None);
        sched.push_succeeded(m(7));
        assert_eq!(sched.due(m(7)), Some(Trigger::SyncNow));
        sched.push_started(m(7), Trigger::SyncNow);
        sched.push_succeeded(m(7) + s(5));
        assert_eq!(sched.due(m(7) + s(5)), None);
        assert_eq!(sched.next_wake(m(7) + s(5)), None);

        // A request made before a push starts is covered by it, whatever its trigger.
        let mut sched = after_start(timing(m(5), None, None, None), Time::ZERO);
        sched.change(m(1), 1);
        sched.sync_now(m(6));
        sched.push_started(m(6), Trigger::Idle);
        sched.push_succeeded(m(6) + s(1));
        assert_eq!(sched.due(m(6) + s(1)), None);
    }

    #[test]
    fn failed_pushes_retry_after_5_10_20_40_80_seconds_then_wait_for_a_change() {
        let mut sched = after_start(timing(m(5), None, None, None), Time::ZERO);
        sched.change(m(1), 1);
        sched.push_started(m(6), Trigger::Idle);
        assert_eq!(sched.failing_for(m(6)), None);
        // Each attempt takes 2 s and fails.
        let mut now = m(6) + s(2);
        sched.push_failed(now);
        let first_failure = now;
        assert!(sched.pending(), "the failed push's change is pending again");
        for (attempt, delay) in [5, 10, 20, 40, 80].into_iter().enumerate() {
            let at = now + s(delay);
            assert_eq!(sched.next_wake(now), Some(at), "retry {}", attempt + 1);
            assert_fires_at(&sched, at, Trigger::Retry);
            sched.push_started(at, Trigger::Retry);
            now = at + s(2);
            sched.push_failed(now);
            assert_eq!(sched.failures(), attempt as u32 + 2);
        }
        // Five retries are spent: nothing more until something happens.
        assert_eq!(sched.due(now + m(1000)), None);
        assert_eq!(sched.next_wake(now), None);
        assert!(sched.pending());
        assert_eq!(
            sched.failing_for(now + s(1)),
            Some(now + s(1) - first_failure)
        );
        // The next change pushes as usual, carrying the failed push's change too.
        sched.change(now + m(3), 1);
        assert_fires_at(&sched, now + m(8), Trigger::Idle);
        sched.push_started(now + m(8), Trigger::Idle);
        sched.push_failed(now + m(8) + s(1));
        assert_eq!(sched.due(now + m(1000)), None, "no retry until a success");
        sched.sync_now(now + m(9));
        sched.push_started(now + m(9), Trigger::SyncNow);
        sched.push_succeeded(now + m(9) + s(1));
        assert_eq!(sched.failing_for(now + m(9) + s(1)), None);
        assert!(!sched.pending());
        assert_eq!(sched.failures(), 0);
        // A success resets the count: the next failure retries after 5 s again.
        sched.change(now + m(10), 1);
        sched.push_started(now + m(15), Trigger::Idle);
        sched.push_failed(now + m(15));
        assert_fires_at(&sched, now + m(15) + s(5), Trigger::Retry);
    }

    #[test]
    fn a_scheduled_retry_is_the_only_automatic_push() {
        let mut sched = after_start(timing(s(10), None, Some(s(15)), Some(2)), Time::ZERO);
        sched.change(s(20), 1);
        sched.push_started(s(20), Trigger::MaxInterval);
        sched.push_failed(s(21));
        sched.push_started(s(26), Trigger::Retry);
        sched.push_failed(s(27));
        sched.push_started(s(37), Trigger::Retry);
        sched.push_failed(s(38));
        // The third retry is 20 s away, at 58 s; max-changes (at once), idle (49 s) and
        // max-interval (53 s) would all fire sooner.
        sched.change(s(39), 3);
        assert_fires_at(&sched, s(58), Trigger::Retry);
        // A manual request does not wait.
        sched.sync_now(s(40));
        assert_eq!(sched.due(s(40)), Some(Trigger::SyncNow));
    }

    #[test]
    fn after_the_retries_max_interval_pushes_what_is_owed() {
        let mut sched = after_start(timing(m(5), None, Some(m(60)), None), Time::ZERO);
        sched.change(m(1), 1);
        let mut now = m(6);
        sched.push_started(now, Trigger::Idle);
        sched.push_failed(now);
        for delay in [5, 10, 20, 40, 80] {
            now += s(delay);
            assert_eq!(sched.due(now), Some(Trigger::Retry));
            sched.push_started(now, Trigger::Retry);
            sched.push_failed(now);
        }
        // Counted from the last failure, not the last success: no storm of pushes.
        assert_eq!(sched.next_wake(now), Some(now + m(60)));
        assert_fires_at(&sched, now + m(60), Trigger::MaxInterval);
    }

    #[test]
    fn failing_for_counts_from_the_first_failure_since_a_success() {
        let mut sched = Schedule::new(timing(m(5), None, None, None), Time::ZERO);
        sched.push_started(Time::ZERO, Trigger::Start);
        sched.push_failed(s(3));
        assert_eq!(sched.failing_for(s(3)), Some(Duration::ZERO));
        assert_eq!(sched.failing_for(s(7)), Some(s(4)));
        // A failed start push is retried though no change is pending.
        assert!(!sched.pending());
        assert_eq!(sched.due(s(8)), Some(Trigger::Retry));
        sched.push_started(s(8), Trigger::Retry);
        assert_eq!(sched.failing_for(s(9)), Some(s(6)), "still, while retrying");
        sched.push_failed(s(10));
        assert_eq!(sched.failing_for(s(20)), Some(s(17)));
        sched.push_started(s(20), Trigger::Retry);
        sched.push_succeeded(s(21));
        assert_eq!(sched.failing_for(s(21)), None);
    }

    #[test]
    fn shutdown_with_pending_changes_pushes_once_more() {
        let mut sched = after_start(timing(m(5), None, None, None), Time::ZERO);
        sched.change(m(1), 1);
        sched.shutdown(m(2));
        assert_eq!(sched.due(m(2)), Some(Trigger::Shutdown));
        assert!(!sched.done());
        sched.push_started(m(2), Trigger::Shutdown);
        sched.change(m(2) + s(1), 1);
        sched.sync_now(m(2) + s(1));
        sched.push_failed(m(2) + s(2));
        assert_eq!(sched.due(m(1000)), None, "one last push, no retry");
        assert_eq!(sched.next_wake(m(2) + s(2)), None);
        assert!(sched.done());
    }

    #[test]
    fn shutdown_without_pending_changes_pushes_nothing() {
        let mut sched = after_start(timing(m(5), None, Some(m(10)), None), Time::ZERO);
        sched.shutdown(m(2));
        assert_eq!(sched.due(m(2)), None);
        assert_eq!(sched.next_wake(m(2)), None);
        assert!(sched.done());
        // A change seen before the subscriber stops is still pushed.
        sched.change(m(3), 1);
        assert_eq!(sched.due(m(3)), Some(Trigger::Shutdown));
    }

    #[test]
    fn shutdown_pushes_a_failed_push_that_is_owed() {
        let mut sched = Schedule::new(timing(m(5), None, None, None), Time::ZERO);
        sched.push_started(Time::ZERO, Trigger::Start);
        sched.push_failed(s(1));
        assert!(!sched.pending());
        sched.shutdown(s(2));
        assert_eq!(sched.due(s(2)), Some(Trigger::Shutdown), "before the retry");
    }

    #[test]
    fn shutdown_during_a_push_waits_for_it() {
        let mut sched = after_start(timing(m(5), None, None, None), Time::ZERO);
        sched.change(m(1), 1);
        sched.push_started(m(6), Trigger::Idle);
        sched.shutdown(m(6) + s(1));
        assert_eq!(sched.due(m(6) + s(1)), None);
        assert!(!sched.done(), "a push is in flight");
        sched.push_succeeded(m(6) + s(2));
        assert!(sched.done(), "nothing was seen during the push");

        let mut sched = after_start(timing(m(5), None, None, None), Time::ZERO);
        sched.change(m(1), 1);
        sched.push_started(m(6), Trigger::Idle);
        sched.change(m(6) + s(1), 1);
        sched.shutdown(m(6) + s(1));
        sched.push_succeeded(m(6) + s(2));
        assert_eq!(sched.due(m(6) + s(2)), Some(Trigger::Shutdown));
    }

    #[test]
    fn the_first_change_after_a_push_is_announced_once() {
        let mut sched = after_start(timing(m(5), Some(m(10)), None, None), Time::ZERO);
        assert_eq!(sched.changed_notice(m(1)), None, "nothing changed");
        sched.change(m(3), 1);
        assert_eq!(sched.changed_notice(m(3)), Some(420), "push at 10m");
        assert_eq!(sched.changed_notice(m(3)), None, "taken");
        sched.change(m(4), 1);
        assert_eq!(sched.changed_notice(m(4)), None, "the plan did not move");
        // Rounded up to whole seconds.
        let mut sched = after_start(timing(m(5), None, None, None), Time::ZERO);
        sched.change(ms(1500), 1);
        assert_eq!(sched.changed_notice(ms(2001)), Some(300));
    }

    #[test]
    fn a_moved_push_is_announced_again_just_before_the_old_time() {
        let mut sched = after_start(timing(m(5), None, None, None), Time::ZERO);
        sched.change(m(1), 1);
        assert_eq!(sched.changed_notice(m(1)), Some(300), "push at 6m");
        sched.change(m(2), 1);
        sched.change(m(4), 1);
        // The push moved to 9m: the server learns it 10 s before 6m.
        assert_eq!(sched.next_wake(m(4)), Some(m(6) - s(10)));
        assert_eq!(sched.changed_notice(m(6) - s(11)), None);
        assert_eq!(sched.changed_notice(m(6) - s(10)), Some(190));
        assert_eq!(sched.next_wake(m(6) - s(10)), Some(m(9)));
        // A notice already late is sent at once.
        sched.change(m(8) + s(55), 1);
        assert_eq!(sched.changed_notice(m(8) + s(55)), Some(300));
        // Once the push starts, the next change is announced afresh.
        let at = m(13) + s(55);
        assert_fires_at(&sched, at, Trigger::Idle);
        sched.push_started(at, Trigger::Idle);
        sched.change(at + s(1), 1);
        assert_eq!(sched.changed_notice(at + s(1)), None, "in flight");
        sched.push_succeeded(at + s(2));
        assert_eq!(sched.changed_notice(at + s(2)), Some(299));
    }

    #[test]
    fn notices_follow_a_busy_database_until_max_interval() {
        let mut sched = Schedule::new(
            timing(m(5), Some(Duration::ZERO), Some(m(20)), None),
            Time::ZERO,
        );
        let changes: Vec<Time> = (1..=30).map(m).collect();
        let run = drive(&mut sched, Time::ZERO, &changes, Duration::ZERO, m(30));
        assert_eq!(
            run.pushes,
            [(Time::ZERO, Trigger::Start), (m(20), Trigger::MaxInterval)]
        );
        assert_eq!(
            run.notices,
            [
                // The first change: push at 6m.
                (m(1), 300),
                // 10 s before 6m the push is at 10m (change at 5m), and so on.
                (m(6) - s(10), 250),
                (m(10) - s(10), 250),
                (m(14) - s(10), 250),
                // 10 s before 18m: max-interval at 20m caps the idle timer.
                (m(18) - s(10), 130),
                // After the max-interval push: the change at 21m.
                (m(21), 300),
                (m(26) - s(10), 250),
                (m(30) - s(10), 250),
            ]
        );
    }

    #[test]
    fn triggers_have_stable_names() {
        let names: Vec<_> = [
            Trigger::Start,
            Trigger::Idle,
            Trigger::MaxInterval,
            Trigger::Changes,
            Trigger::SyncNow,
            Trigger::Shutdown,
            Trigger::Retry,
        ]
        .iter()
        .map(Trigger::as_str)
        .collect();
        assert_eq!(
            names,
            [
                "start",
                "idle",
                "max-interval",
                "changes",
                "sync-now",
                "shutdown",
                "retry"
            ]
        );
        assert_eq!(Trigger::MaxInterval.to_string(), "max-interval");
    }

    #[test]
    fn the_server_back_gets_owed_changes_at_once_and_hears_the_plan_again() {
        let t = timing(m(5), None, None, None);
        let mut sched = after_start(t, s(1));
        sched.change(s(10), 1);
        assert_eq!(sched.changed_notice(s(10)), Some(300));
        // A server restart forgets the plan: it is announced again, with what is left.
        sched.server_back(s(70));
        assert_eq!(sched.due(s(70)), None, "nothing failed: no push yet");
        assert_eq!(sched.changed_notice(s(70)), Some(240));
        // Pushes fail until the retries are spent; changes stay owed.
        let mut now = s(310);
        assert_eq!(sched.due(now), Some(Trigger::Idle));
        for _ in 0..6 {
            sched.push_started(now, sched.due(now).expect("a push is due"));
            sched.push_failed(now);
            match sched.planned() {
                Some((at, Trigger::Retry)) => now = at,
                _ => break,
            }
        }
        assert_eq!(sched.planned(), None, "the retries are spent");
        // The server answers again: the owed push goes at once.
        let back = now + m(30);
        sched.server_back(back);
        assert_eq!(sched.due(back), Some(Trigger::Retry));
        sched.push_started(back, Trigger::Retry);
        sched.push_succeeded(back + s(1));
        sched.server_back(back + s(2));
        assert_eq!(sched.due(back + s(2)), None, "nothing owed any more");
    }

    #[test]
    fn intervals_past_ten_years_are_refused() {
        let e = Timing::new(m(10), None, Some(MAX_INTERVAL + s(1)), None).unwrap_err();
        assert!(e.starts_with("--max-interval "), "{e}");
        let e =
            Timing::new(m(10), Some(Duration::from_secs(u64::MAX / 4)), None, None).unwrap_err();
        assert!(
            e.starts_with("--min-interval ") && e.contains("at most"),
            "{e}"
        );
    }
}
