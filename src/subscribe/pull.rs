//! The pull subscriber's loop: carries out what the [`PullSchedule`] decides, one pull
//! at a time, always of the newest version.
//!
//! Events come from the [`Notices`] of the subscription (a new version, sync-now, the
//! connection lost or back), the pull running ([`PullAction`]) and the [`Shutdown`].
//! The loop feeds them to the schedule with the current time (tokio's clock, so tests
//! run it under `tokio::time::pause`), starts a pull when one is due, emits an
//! [`Event`] for each thing worth a line and sleeps until the next event or retry. The
//! pull subscriber writes its database only through pulls (one transaction each) and
//! watches nothing, so its own writes never look like local changes.
//!
//! Shutdown: a graceful request stops at once when no pull runs, else once it ends; a
//! forced one stops at once, dropping the pull in flight (which commits nothing).

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use super::action::{Notices, PullAction};
use super::event::Event;
use super::pull_timer::PullSchedule;
use crate::protocol::control::Applied;
use crate::remote::{Notice, Outgoing};
use crate::shutdown::Shutdown;
use crate::{Error, ErrorKind, Result};

/// What one pull did, for the subscriber's output line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    /// The version the local database now holds.
    pub version: u64,
    /// Pages written.
    pub pages_written: u64,
    /// Pages in the database.
    pub pages_total: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// How long it took.
    pub duration: Duration,
}

/// Why the next pull happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The subscriber started.
    Start,
    /// A new version landed.
    NewVersion,
    /// Someone asked for a sync now.
    SyncNow,
    /// The connection came back: a version may have landed meanwhile.
    Reconnect,
    /// The previous pull failed.
    Retry,
}

impl Reason {
    /// The name in output lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Start => "start",
            Reason::NewVersion => "new-version",
            Reason::SyncNow => "sync-now",
            Reason::Reconnect => "reconnect",
            Reason::Retry => "retry",
        }
    }
}

/// How a pull subscriber ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Asked to stop, with no pull left running.
    Shutdown,
    /// A forced stop: stopped at once.
    Interrupted,
}

/// The pull subscriber's settings.
#[derive(Debug, Clone)]
pub struct PullSubscriber {
    /// The version the local database holds, if known (from the history).
    pub held: Option<u64>,
    /// Draws the jitter of the retry backoff ([`crate::backoff::jitter`]; tests fix it).
    pub jitter: fn() -> f64,
}

/// A pull running on its task; the task hands the action back with the result.
type InFlight<A> = AbortOnDropHandle<(A, Result<Pulled>)>;

impl PullSubscriber {
    /// Settings for a database holding `held`, with random jitter.
    pub fn new(held: Option<u64>) -> PullSubscriber {
        PullSubscriber {
            held,
            jitter: crate::backoff::jitter,
        }
    }

    /// Follows the replica: pulls each new version into the local database until
    /// `shutdown`. `emit` receives every [`Event`].
    pub async fn run<A, N, E>(
        &self,
        action: A,
        notices: &mut N,
        shutdown: &Shutdown,
        mut emit: E,
    ) -> Result<Ended>
    where
        A: PullAction,
        N: Notices,
        E: FnMut(Event),
    {
        let start = Instant::now();
        let now = || start.elapsed();
        let mut schedule = PullSchedule::new(self.held);
        let mut idle = Some(action);
        let mut in_flight: Option<InFlight<A>> = None;
        let mut stopping = false;
        loop {
            if shutdown.is_forced() {
                emit(Event::StoppingNow);
                return Ok(Ended::Interrupted);
            }
            if stopping && schedule.done() {
                return Ok(Ended::Shutdown);
            }
            let t = now();
            if let Some(reason) = schedule.due(t)
                && let Some(mut action) = idle.take()
            {
                schedule.pull_started(t, reason);
                tracing::info!(reason = reason.as_str(), "pull starting");
                let task = tokio::spawn(async move {
                    let result = action.pull(reason).await;
                    (action, result)
                });
                in_flight = Some(AbortOnDropHandle::new(task));
            }
            let sleep = async {
                match schedule.next_wake(now()) {
                    Some(w) => tokio::time::sleep_until(start + w).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                notice = notices.next() => match notice {
                    Some(Notice::Connected { exists, latest, .. }) => {
                        let reason = schedule.connected(now(), latest);
                        // A typo in the replica's name must not leave a service waiting
                        // for ever: a pull subscriber needs a replica to follow.
                        if !exists && reason == Reason::Start {
                            return Err(Error::NotFound(
                                "the replica does not exist: nothing to follow (check its name; \
                                 `sqlferry versions` lists a replica's versions)"
                                    .into(),
                            ));
                        }
                        if reason == Reason::Reconnect {
                            emit(Event::Reconnected { latest });
                        } else if latest == 0 {
                            emit(Event::NoVersionYet);
                        }
                    }
                    Some(Notice::NewVersion(n)) => schedule.new_version(now(), n),
                    Some(Notice::SyncNow) => schedule.sync_now(now()),
                    Some(Notice::Disconnected { error, retry_in }) => {
                        emit(Event::PullServerLost { error, retry_in });
                    }
                    Some(Notice::Fatal(e)) => return Err(e),
                    None => return Err(Error::Disconnected("the subscription ended".into())),
                },
                done = async { in_flight.as_mut().expect("guarded").await }, if in_flight.is_some() => {
                    in_flight = None;
                    let reason = schedule.in_flight().expect("a pull was running");
                    // A pull task that panicked is a bug (Error::Bug), not a failed pull.
                    let (action, result) = done?;
                    idle = Some(action);
                    match result {
                        Ok(pulled) => {
                            schedule.pull_succeeded(now(), pulled.version);
                            // The server shows this follower's version and lag, and a
                            // `push --wait-followers` may be waiting for it.
                            notices.send(Outgoing::Applied(Applied {
                                version: pulled.version,
                                applied_at: Some(crate::epoch::now()),
                            }));
                            emit(Event::Pulled { reason, pulled });
                        }
                        Err(e) => {
                            // A refused key is not mended by retrying; and LOCAL holding
                            // changes no sync carried would not go away: overwriting
                            // them is not ours to decide.
                            if matches!(e.kind(), ErrorKind::Auth | ErrorKind::LocalChanges) {
                                return Err(e);
                            }
                            let retry_in = schedule.pull_failed(now(), (self.jitter)());
                            emit(Event::PullFailed { reason, error: e.to_string(), retry_in });
                        }
                    }
                }
                () = shutdown.forced(), if stopping => {
                    emit(Event::StoppingNow);
                    return Ok(Ended::Interrupted);
                }
                () = shutdown.requested(), if !stopping => {
                    stopping = true;
                    schedule.shutdown(now());
                    if in_flight.is_some() {
                        emit(Event::PullingBeforeStop);
                    }
                }
                () = sleep => {}
            }
        }
    }
}
