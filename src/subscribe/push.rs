//! The push subscriber's loop: carries out what the [`Schedule`] decides.
//!
//! Events come from three places: the [`Watcher`] (a commit was seen), the
//! [`Subscription`] (sync-now, the server reachable again) and the signals (SIGINT,
//! SIGTERM). The loop feeds them to the schedule with the current time, starts a push
//! when one is due (on a blocking thread, never two at once), sends CHANGED and failure
//! reports when the schedule says so, and sleeps until the schedule's next wake-up or
//! the next event. All timing decisions are the schedule's; this loop only keeps time.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Time;
use super::timer::{Schedule, Timing, Trigger};
use super::watch::Watcher;
use super::{Line, Signals};
use crate::protocol::control::FailureReport;
use crate::remote::{Notice, Outgoing, Subscription};
use crate::{Error, Result};

/// Pushes failing for longer than this are reported to the server.
pub const REPORT_FAILURES_AFTER: Duration = Duration::from_secs(5 * 60);

/// How long the subscriber waits for the server's first word (which tells a PULL key
/// from a PUSH key) before it starts watching anyway.
const FIRST_WORD: Duration = Duration::from_secs(5);

/// What one push did, for the subscriber's output line.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// The replica's version after the push.
    pub version: u64,
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
}

/// One push, run on a blocking thread; the trigger goes into the commit message.
pub type PushFn = Arc<dyn Fn(Trigger) -> anyhow::Result<Pushed> + Send + Sync>;

/// How a push subscriber ended.
#[derive(Debug)]
pub enum Ended {
    /// A signal, pending changes pushed (or none pending).
    Shutdown,
    /// A signal, but the changes pending could not be pushed: the last failure.
    Unpushed(anyhow::Error),
    /// A second signal: stopped at once.
    Interrupted,
    /// The key turned out to be a PULL key: follow the replica instead.
    PullKey,
}

/// The push subscriber's settings.
pub struct PushSubscriber {
    /// The database to watch and push.
    pub database: PathBuf,
    /// When to push.
    pub timing: Timing,
    /// How often the watcher's safety-net poll runs.
    pub poll: Duration,
    /// How long pending changes may take to push after a signal.
    pub shutdown_bound: Duration,
    /// How long pushes must have been failing before the server is told
    /// ([`REPORT_FAILURES_AFTER`] unless a test wants it sooner).
    pub report_after: Duration,
    /// One push.
    pub push: PushFn,
}

impl PushSubscriber {
    /// Runs until a signal (or a PULL key). `line` prints one output line.
    pub async fn run(
        self,
        subscription: &mut Subscription,
        mut signals: Signals,
        line: Line,
    ) -> Result<Ended> {
        let start = Instant::now();
        let now = || start.elapsed();
        // The first word from the server says what kind of key this is; offline, the
        // subscriber starts anyway and its pushes retry.
        let mut connected = false;
        let first = tokio::time::timeout(FIRST_WORD, subscription.notices.recv()).await;
        match first.unwrap_or_else(|_| {
            line.err(format!(
                "no answer from the server within {}s; watching anyway",
                FIRST_WORD.as_secs()
            ));
            Some(Notice::Disconnected {
                error: "no answer yet".into(),
                retry_in: Duration::ZERO,
            })
        }) {
            Some(Notice::Connected { key_type, .. }) if key_type == "pull" => {
                return Ok(Ended::PullKey);
            }
            Some(Notice::Connected { .. }) => connected = true,
            Some(Notice::Disconnected { error, retry_in }) if !retry_in.is_zero() => {
                line.err(format!(
                    "server unreachable ({error}); watching anyway, retrying in {}",
                    super::duration::format(retry_in)
                ));
            }
            Some(Notice::Fatal(e)) => return Err(e),
            Some(_) | None => {}
        }
        let (_watcher, mut seen) = Watcher::start(&self.database, self.poll)?;
        let mut schedule = Schedule::new(self.timing, now());
        let mut in_flight: Option<(Trigger, tokio::task::JoinHandle<anyhow::Result<Pushed>>)> =
            None;
        let mut last_failure: Option<anyhow::Error> = None;
        let mut reported = false;
        let mut shutdown_deadline: Option<Time> = None;
        let mut was_disconnected = !connected;
        loop {
            let t = now();
            if in_flight.is_none()
                && let Some(trigger) = schedule.due(t)
            {
                schedule.push_started(t, trigger);
                tracing::info!(trigger = trigger.as_str(), "push starting");
                let push = self.push.clone();
                in_flight = Some((trigger, tokio::task::spawn_blocking(move || push(trigger))));
            }
            if let Some(seconds) = schedule.changed_notice(t) {
                tracing::info!(seconds, "telling the server when the push is planned");
                subscription.send(Outgoing::Changed(seconds));
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
                subscription.send(Outgoing::Report(FailureReport {
                    failing_for: failing.as_secs(),
                    attempts,
                    error: last_failure
                        .as_ref()
                        .map(|e| format!("{e:#}"))
                        .unwrap_or_default(),
                }));
                reported = true;
            }
            if let Some(deadline) = shutdown_deadline {
                if in_flight.is_none() && schedule.done() {
                    return Ok(ending(&schedule, last_failure.take()));
                }
                if t >= deadline {
                    return Ok(Ended::Unpushed(
                        Error::Disconnected(format!(
                            "the last push did not finish within {}",
                            super::duration::format(self.shutdown_bound)
                        ))
                        .into(),
                    ));
                }
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
                s = seen.recv() => match s {
                    Some(s) => {
                        schedule.change(now(), s.commits);
                        if let Some((at, trigger)) = schedule.planned() {
                            tracing::info!(by_poll = s.by_poll, trigger = trigger.as_str(),
                                in_secs = at.saturating_sub(now()).as_secs(), "change seen; push planned");
                        }
                    }
                    None => return Err(Error::Protocol("the file watcher stopped".into())),
                },
                notice = subscription.notices.recv() => match notice {
                    Some(Notice::SyncNow) => {
                        tracing::info!("sync now asked");
                        schedule.sync_now(now());
                    }
                    // The server said late what kind of key this is.
                    Some(Notice::Connected { key_type, .. }) if key_type == "pull" && in_flight.is_none() => {
                        return Ok(Ended::PullKey);
                    }
                    Some(Notice::Connected { .. }) => {
                        connected = true;
                        reported = false;
                        if was_disconnected {
                            line.out("server reachable again".into());
                            schedule.server_back(now());
                        }
                        was_disconnected = false;
                    }
                    Some(Notice::Disconnected { error, retry_in }) => {
                        if connected || !was_disconnected {
                            line.err(format!(
                                "lost the server ({error}); changes are tracked and pushed when it is back (next try in {})",
                                super::duration::format(retry_in)
                            ));
                        }
                        connected = false;
                        was_disconnected = true;
                    }
                    Some(Notice::NewVersion(_)) => {}
                    Some(Notice::Fatal(e)) => return Err(e),
                    None => return Err(Error::Disconnected("the subscription ended".into())),
                },
                done = async { (&mut in_flight.as_mut().expect("guarded").1).await }, if in_flight.is_some() => {
                    let (trigger, _) = in_flight.take().expect("guarded");
                    let t = now();
                    match done.unwrap_or_else(|e| Err(anyhow::anyhow!("the push thread failed: {e}"))) {
                        Ok(p) => {
                            schedule.push_succeeded(t);
                            reported = false;
                            last_failure = None;
                            line.out(pushed_line(trigger, &p));
                        }
                        Err(e) => {
                            schedule.push_failed(t);
                            let error = format!("{e:#}");
                            let next = match schedule.planned() {
                                _ if shutdown_deadline.is_some() => "not retried: stopping".into(),
                                Some((at, Trigger::Retry)) => format!(
                                    "retry in {}",
                                    super::duration::format(at.saturating_sub(t))
                                ),
                                _ => "no more retries; pushing at the next change".into(),
                            };
                            line.err(format!("push ({}) failed: {error}; {next}", trigger.as_str()));
                            if super::is_auth_failure(&e) {
                                return Err(Error::Auth(error));
                            }
                            last_failure = Some(e);
                        }
                    }
                }
                () = signals.next() => {
                    if shutdown_deadline.is_some() {
                        line.err("second signal: stopping now".into());
                        return Ok(Ended::Interrupted);
                    }
                    let t = now();
                    schedule.shutdown(t);
                    shutdown_deadline = Some(t + self.shutdown_bound);
                    if schedule.pending() || in_flight.is_some() {
                        line.out(format!(
                            "stopping: pushing pending changes first (at most {}; a second signal stops at once)",
                            super::duration::format(self.shutdown_bound)
                        ));
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
fn ending(schedule: &Schedule, last_failure: Option<anyhow::Error>) -> Ended {
    match last_failure {
        Some(e) => Ended::Unpushed(e),
        None if schedule.pending() => Ended::Unpushed(
            Error::LocalChanges(
                "commits arrived during the final push and were not pushed; the next push \
                 (or subscriber) carries them"
                    .into(),
            )
            .into(),
        ),
        None => Ended::Shutdown,
    }
}

fn pushed_line(trigger: Trigger, p: &Pushed) -> String {
    if p.created {
        format!(
            "push ({}): version {}, {} of {} pages, {} sent in {:.2?}",
            trigger.as_str(),
            p.version,
            p.pages_sent,
            p.pages_total,
            crate::cli::human_bytes(p.bytes_sent),
            p.duration
        )
    } else {
        format!(
            "push ({}): no change, still version {} ({} sent in {:.2?})",
            trigger.as_str(),
            p.version,
            crate::cli::human_bytes(p.bytes_sent),
            p.duration
        )
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
        match ending(&sch, None) {
            Ended::Unpushed(e) => {
                assert_eq!(
                    super::super::error_kind(&e),
                    Some(crate::ErrorKind::LocalChanges)
                );
                assert!(format!("{e:#}").contains("not pushed"), "{e:#}");
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
        let failure = anyhow::Error::from(Error::Disconnected("server gone".into()));
        match ending(&sch, Some(failure)) {
            Ended::Unpushed(e) => assert!(format!("{e:#}").contains("server gone")),
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
        assert!(matches!(ending(&sch, None), Ended::Shutdown));
    }
}
