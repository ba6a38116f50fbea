//! The push subscriber's loop: carries out what the [`Schedule`] decides.
//!
//! Events come from four places: the [`Changes`] of the database (a commit was seen),
//! the [`Notices`] of the subscription (sync-now, the server reachable again), the push
//! running ([`PushAction`]) and the [`Shutdown`]. The loop feeds them to the schedule
//! with the current time, starts a push when one is due (on a task of its own, never
//! two at once), sends CHANGED and failure reports when the schedule says so, emits an
//! [`Event`] for each thing worth a line, and sleeps until the schedule's next wake-up
//! or the next event. All timing decisions are the schedule's; this loop only keeps
//! time, with tokio's clock, so tests run it under `tokio::time::pause`.
//!
//! Shutdown: a graceful request pushes the pending changes (or the failed push owed)
//! once more, within [`PushSubscriber::shutdown_bound`], then stops; a forced one stops
//! at once, dropping the push in flight (which commits nothing).

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use super::Time;
use super::action::{Changes, Notices, PushAction};
use super::event::{Event, NextPush};
use super::timer::{Schedule, Timing, Trigger};
use crate::protocol::control::FailureReport;
use crate::remote::{Notice, Outgoing};
use crate::shutdown::Shutdown;
use crate::{Error, ErrorKind, Result};

/// Pushes failing for longer than this are reported to the server.
pub const REPORT_FAILURES_AFTER: Duration = Duration::from_secs(5 * 60);

/// How long pending changes may take to push after a graceful shutdown request.
pub const SHUTDOWN_BOUND: Duration = Duration::from_secs(60);

/// How long the subscriber waits for the server's first word (which tells a PULL key
/// from a PUSH key) before it starts watching anyway.
pub const FIRST_WORD: Duration = Duration::from_secs(5);

/// What one push did, for the subscriber's output line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// The replica's version after the push (0 for a local file copy, which keeps no
    /// versions: see `copy`).
    pub version: u64,
    /// A local file copy was brought up to date, not a replica.
    pub copy: bool,
    /// Whether the push made that version.
    pub created: bool,
    /// Pages sent.
    pub pages_sent: u64,
    /// Pages in the database.
    pub pages_total: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// How long it took.
    pub duration: Duration,
    /// Where new keys were saved, when the server minted some (a first push with the
    /// admin key); told before the push's line.
    pub saved_keys: Option<crate::client::SavedKeys>,
    /// Set when the push was merged (`--merge`, the replica had moved): what the merge
    /// did and whether LOCAL was brought to it.
    pub merged: Option<MergedPush>,
}

/// What a merged push did, for the subscriber's line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedPush {
    /// The version the push was based on (OLD).
    pub base: u64,
    /// The latest version it was merged onto.
    pub onto: u64,
    /// The version holding what the push sent (its candidate, stored just before the
    /// merge; the latest itself when the push held exactly that; 0 when the server
    /// stored none).
    pub candidate: u64,
    /// The push's row changes applied.
    pub changes: u64,
    /// Rows changed on both sides, decided by `--on-conflict`.
    pub conflicts: u64,
    /// LOCAL was written meanwhile, so it kept its changes instead of being brought to
    /// the merged version (its base is now the candidate).
    pub local_kept: bool,
}

/// How a push subscriber ended.
#[derive(Debug)]
pub enum Ended<A> {
    /// Asked to stop; pending changes pushed (or none pending).
    Shutdown,
    /// Asked to stop, but the changes pending could not be pushed: the last failure.
    Unpushed(Error),
    /// A forced stop: stopped at once.
    Interrupted,
    /// The key turned out to be a PULL key: follow the replica instead. The action is
    /// handed back (no push runs).
    PullKey(A),
}

/// The push subscriber's settings.
#[derive(Debug, Clone)]
pub struct PushSubscriber {
    /// When to push.
    pub timing: Timing,
    /// How long pending changes may take to push after a graceful shutdown request
    /// ([`SHUTDOWN_BOUND`]).
    pub shutdown_bound: Duration,
    /// How long pushes must have been failing before the server is told
    /// ([`REPORT_FAILURES_AFTER`] unless a test wants it sooner).
    pub report_after: Duration,
    /// Push (and so merge) when another client's new version lands, even without a
    /// change here (`push --subscribe --merge`): a merge with nothing to merge brings
    /// LOCAL to the latest version when LOCAL holds no unpushed change, so subscribers
    /// on several machines converge.
    pub follow_versions: bool,
}

/// A push running on its task; the task hands the action back with the result.
type InFlight<A> = (Trigger, AbortOnDropHandle<(A, Result<Pushed>)>);

impl PushSubscriber {
    /// Runs until `shutdown` (or a PULL key). `watch` starts watching the database; it
    /// is called once the server's first word has come (or not come within
    /// [`FIRST_WORD`]), since a PULL key means there is nothing to watch. `emit` receives
    /// every [`Event`].
    pub async fn run<A, N, C, W, F, E>(
        &self,
        action: A,
        notices: &mut N,
        watch: W,
        shutdown: &Shutdown,
        mut emit: E,
    ) -> Result<Ended<A>>
    where
        A: PushAction,
        N: Notices,
        C: Changes,
        W: FnOnce() -> F,
        F: Future<Output = Result<C>>,
        E: FnMut(Event),
    {
        let start = Instant::now();
        let now = || start.elapsed();
        // The first word from the server says what kind of key this is; offline, the
        // subscriber starts anyway and its pushes retry. A stop request ends the wait.
        let no_word = || Notice::Disconnected {
            error: "no answer yet".into(),
            retry_in: Duration::ZERO,
        };
        let first = tokio::select! {
            first = tokio::time::timeout(FIRST_WORD, notices.next()) => match first {
                Ok(notice) => notice,
                Err(_) => {
                    emit(Event::NoFirstWord { waited: FIRST_WORD });
                    Some(no_word())
                }
            },
            () = shutdown.requested() => Some(no_word()),
        };
        let mut connected = false;
        match first {
            Some(Notice::Connected { key_type, .. }) if key_type == "pull" => {
                return Ok(Ended::PullKey(action));
            }
            Some(Notice::Connected { .. }) => connected = true,
            Some(Notice::Disconnected { error, retry_in }) if !retry_in.is_zero() => {
                emit(Event::StartedOffline { error, retry_in });
            }
            Some(Notice::Fatal(e)) => return Err(e),
            Some(_) | None => {}
        }
        let mut changes = watch().await?;
        let mut schedule = Schedule::new(self.timing, now());
        let mut idle: Option<A> = Some(action);
        let mut in_flight: Option<InFlight<A>> = None;
        let mut last_failure: Option<Error> = None;
        let mut reported = false;
        // The newest version this subscriber's own pushes left: a notice of it, or of
        // an older one, is no news.
        let mut last_version = 0u64;
        let mut shutdown_deadline: Option<Time> = None;
        let mut was_disconnected = !connected;
        let mut last_plan = None;
        loop {
            if shutdown.is_forced() {
                emit(Event::StoppingNow);
                return Ok(Ended::Interrupted);
            }
            let t = now();
            if in_flight.is_none()
                && let Some(trigger) = schedule.due(t)
                && let Some(mut action) = idle.take()
            {
                schedule.push_started(t, trigger);
                tracing::info!(trigger = trigger.as_str(), "push starting");
                let task = tokio::spawn(async move {
                    let result = action.push(trigger).await;
                    (action, result)
                });
                in_flight = Some((trigger, AbortOnDropHandle::new(task)));
            }
            if let Some(seconds) = schedule.changed_notice(t) {
                tracing::info!(seconds, "telling the server when the push is planned");
                notices.send(Outgoing::Changed(seconds));
            }
            if let Some(failing) = schedule.failing_for(t)
                && connected
                && !reported
                && failing >= self.report_after
            {
                let attempts = schedule.failures();
                tracing::info!(
                    failing_for = failing.as_secs(),
                    attempts,
                    "reporting the failures to the server"
                );
                notices.send(Outgoing::Report(FailureReport {
                    failing_for: failing.as_secs(),
                    attempts,
                    error: last_failure
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                }));
                reported = true;
            }
            if let Some(deadline) = shutdown_deadline {
                if in_flight.is_none() && schedule.done() {
                    return Ok(ending(&schedule, last_failure.take()));
                }
                if t >= deadline {
                    return Ok(Ended::Unpushed(Error::Disconnected(format!(
                        "the last push did not finish within {}",
                        super::duration::format(self.shutdown_bound)
                    ))));
                }
            }
            // The plan, for `status`: told whenever it moves.
            let plan = match schedule.in_flight() {
                Some(trigger) => (None, Some(trigger), true),
                None => match schedule.planned() {
                    Some((at, trigger)) => (Some(at), Some(trigger), false),
                    None => (None, None, false),
                },
            };
            if last_plan != Some(plan) {
                last_plan = Some(plan);
                emit(Event::Planned {
                    after: plan.0.map(|at| at.saturating_sub(t)),
                    trigger: plan.1,
                    running: plan.2,
                });
            }
            let mut wake = schedule.next_wake(t);
            // The moment a failure streak becomes worth reporting.
            if let Some(failing) = schedule.failing_for(t).filter(|_| connected && !reported)
                && failing < self.report_after
            {
                let at = t + (self.report_after - failing);
                wake = Some(wake.map_or(at, |w| w.min(at)));
            }
            if let Some(deadline) = shutdown_deadline {
                wake = Some(wake.map_or(deadline, |w| w.min(deadline)));
            }
            let sleep = async {
                match wake {
                    Some(w) => tokio::time::sleep_until(start + w).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                s = changes.next() => match s {
                    Some(s) => {
                        schedule.change(now(), s.commits);
                        if let Some((at, trigger)) = schedule.planned() {
                            tracing::info!(by_poll = s.by_poll, trigger = trigger.as_str(),
                                in_secs = at.saturating_sub(now()).as_secs(), "change seen; push planned");
                        }
                    }
                    None => return Err(Error::Protocol("the file watcher stopped".into())),
                },
                notice = notices.next() => match notice {
                    Some(Notice::SyncNow) => {
                        tracing::info!("sync now asked");
                        schedule.sync_now(now());
                    }
                    // The server said late what kind of key this is.
                    Some(Notice::Connected { key_type, .. }) if key_type == "pull" && in_flight.is_none() => {
                        let action = idle.take().expect("no push runs, so the action is idle");
                        return Ok(Ended::PullKey(action));
                    }
                    Some(Notice::Connected { .. }) => {
                        connected = true;
                        reported = false;
                        if was_disconnected {
                            emit(Event::ServerBack);
                            schedule.server_back(now());
                        }
                        was_disconnected = false;
                    }
                    Some(Notice::Disconnected { error, retry_in }) => {
                        if connected || !was_disconnected {
                            emit(Event::PushServerLost { error, retry_in });
                        }
                        connected = false;
                        was_disconnected = true;
                    }
                    Some(Notice::NewVersion(n)) if self.follow_versions && n > last_version => {
                        tracing::info!(version = n, "a new version landed: merging it in");
                        schedule.sync_now(now());
                    }
                    Some(Notice::NewVersion(_)) => {}
                    Some(Notice::Fatal(e)) => return Err(e),
                    None => return Err(Error::Disconnected("the subscription ended".into())),
                },
                done = async { (&mut in_flight.as_mut().expect("guarded").1).await }, if in_flight.is_some() => {
                    let (trigger, _) = in_flight.take().expect("a push was running");
                    // A push task that panicked is a bug (Error::Bug), not a failed push.
                    let (action, result) = done?;
                    idle = Some(action);
                    let t = now();
                    match result {
                        Ok(pushed) => {
                            last_version = last_version.max(pushed.version);
                            schedule.push_succeeded(t);
                            reported = false;
                            last_failure = None;
                            emit(Event::Pushed { trigger, pushed });
                        }
                        Err(e) => {
                            schedule.push_failed(t);
                            // A refused key ends the subscriber (below): no retry to announce.
                            let refused = e.kind() == ErrorKind::Auth;
                            let next = match schedule.planned() {
                                _ if shutdown_deadline.is_some() || refused => NextPush::Stopping,
                                Some((at, Trigger::Retry)) => NextPush::RetryIn(at.saturating_sub(t)),
                                _ => NextPush::AtNextChange,
                            };
                            emit(Event::PushFailed { trigger, error: e.to_string(), next });
                            // A refused key is not mended by retrying.
                            if refused {
                                return Err(e);
                            }
                            last_failure = Some(e);
                        }
                    }
                }
                () = shutdown.forced(), if shutdown_deadline.is_some() => {
                    emit(Event::StoppingNow);
                    return Ok(Ended::Interrupted);
                }
                () = shutdown.requested(), if shutdown_deadline.is_none() => {
                    let t = now();
                    schedule.shutdown(t);
                    shutdown_deadline = Some(t + self.shutdown_bound);
                    if schedule.pending() || in_flight.is_some() {
                        emit(Event::PushingBeforeStop { bound: self.shutdown_bound });
                    }
                }
                () = sleep => {}
            }
        }
    }
}

/// How a subscriber asked to stop ends once nothing is left to do. It never ends as a
/// clean shutdown (exit 0) over changes that were not pushed: when the latest push
/// attempt failed (`last_failure`; even one that had no commits to carry, like the
/// start push, since LOCAL may hold changes from before), that failure is the end; when
/// commits arrived during the final push, the end is a [`Error::LocalChanges`].
fn ending<A>(schedule: &Schedule, last_failure: Option<Error>) -> Ended<A> {
    match last_failure {
        Some(e) => Ended::Unpushed(e),
        None if schedule.pending() => Ended::Unpushed(Error::LocalChanges(
            "commits arrived during the final push and were not pushed; the next push \
             (or subscriber) carries them"
                .into(),
        )),
        None => Ended::Shutdown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> Schedule {
        let timing = Timing::new(Duration::from_secs(10), None, None, None).expect("valid");
        Schedule::new(timing, Duration::ZERO)
    }

    fn s(n: u64) -> Time {
        Duration::from_secs(n)
    }

    #[test]
    fn commits_during_the_final_push_are_not_a_clean_shutdown() {
        let mut sch = schedule();
        assert_eq!(sch.due(s(0)), Some(Trigger::Start));
        sch.push_started(s(0), Trigger::Start);
        sch.push_succeeded(s(1));
        sch.change(s(2), 1);
        sch.shutdown(s(3));
        assert_eq!(sch.due(s(3)), Some(Trigger::Shutdown));
        sch.push_started(s(3), Trigger::Shutdown);
        sch.change(s(4), 2);
        sch.push_succeeded(s(5));
        assert!(sch.done(), "no push after the final one");
        match ending::<()>(&sch, None) {
            Ended::Unpushed(e) => {
                assert_eq!(e.kind(), crate::ErrorKind::LocalChanges);
                assert!(e.to_string().contains("not pushed"), "{e}");
            }
            other => panic!("ended {other:?} with commits not pushed"),
        }
    }

    #[test]
    fn a_failed_start_push_then_a_signal_is_not_a_clean_shutdown() {
        let mut sch = schedule();
        sch.push_started(s(0), Trigger::Start);
        sch.push_failed(s(1));
        sch.shutdown(s(2));
        assert_eq!(
            sch.due(s(2)),
            Some(Trigger::Shutdown),
            "the failed push is owed"
        );
        sch.push_started(s(2), Trigger::Shutdown);
        sch.push_failed(s(3));
        assert!(sch.done());
        assert!(!sch.pending(), "no commit was seen: only the failure tells");
        let failure = Error::Disconnected("server gone".into());
        match ending::<()>(&sch, Some(failure)) {
            Ended::Unpushed(e) => assert!(e.to_string().contains("server gone")),
            other => panic!("ended {other:?} after a failed final push"),
        }
    }

    #[test]
    fn a_final_push_that_carried_everything_is_a_clean_shutdown() {
        let mut sch = schedule();
        sch.push_started(s(0), Trigger::Start);
        sch.push_succeeded(s(1));
        sch.change(s(2), 1);
        sch.shutdown(s(3));
        sch.push_started(s(3), Trigger::Shutdown);
        sch.push_succeeded(s(4));
        assert!(sch.done());
        assert!(matches!(ending::<()>(&sch, None), Ended::Shutdown));
    }
}
