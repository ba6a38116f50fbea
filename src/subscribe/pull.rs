//! The pull subscriber's loop: one pull at a time, always of the newest version.
//!
//! A NEWREPLICAVERSION newer than what the local database holds, a sync-now, or the
//! connection coming back each ask for a pull. Asks that arrive while a pull runs are
//! coalesced into one more pull after it, of whatever is newest then: never two pulls
//! at once, never a pull of a version already superseded. A failed pull is retried with
//! the reconnect backoff. The pull subscriber writes its database only through pulls
//! (one transaction each) and watches nothing, so its own writes never look like local
//! changes.

use std::sync::Arc;
use std::time::Duration;

use super::backoff::reconnect_delay;
use super::{Line, Signals};
use crate::remote::{Notice, Subscription};
use crate::{Error, Result};

/// What one pull did, for the subscriber's output line.
#[derive(Debug, Clone)]
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

/// One pull of the latest version, run on a blocking thread.
pub type PullFn = Arc<dyn Fn() -> anyhow::Result<Pulled> + Send + Sync>;

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

/// Follows a replica: pulls each new version into the local database until a signal.
/// `held` is the version the local database holds, if known. `Ok(true)`: a second
/// signal stopped it with a pull still running (which commits nothing).
pub async fn run(
    subscription: &mut Subscription,
    pull: PullFn,
    mut held: Option<u64>,
    mut signals: Signals,
    line: Line,
) -> Result<bool> {
    // The latest version announced: a pull is wanted while it is past `held`.
    let mut wanted: Option<Reason> = None;
    let mut in_flight: Option<(Reason, tokio::task::JoinHandle<anyhow::Result<Pulled>>)> = None;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut failures = 0u32;
    let mut stopping = false;
    let mut first = true;
    // The newest version announced so far.
    let mut announced = 0u64;
    loop {
        if in_flight.is_none() {
            if stopping {
                return Ok(false);
            }
            if let Some(reason) = wanted.take() {
                let pull = pull.clone();
                tracing::info!(reason = reason.as_str(), "pull starting");
                in_flight = Some((reason, tokio::task::spawn_blocking(move || pull())));
                retry_at = None;
            }
        }
        let retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            notice = subscription.notices.recv() => match notice {
                Some(Notice::Connected { exists, latest, .. }) => {
                    announced = announced.max(latest);
                    let reason = if std::mem::take(&mut first) { Reason::Start } else { Reason::Reconnect };
                    // A typo in the replica's name must not leave a service waiting for
                    // ever: a pull subscriber needs a replica to follow.
                    if !exists && reason == Reason::Start {
                        return Err(Error::NotFound(
                            "the replica does not exist: nothing to follow (check its name; \
                             `sqlferry versions` lists a replica's versions)"
                                .into(),
                        ));
                    }
                    if reason == Reason::Reconnect {
                        line.out(format!("connected again; the replica is at version {latest}"));
                    }
                    if latest > 0 && (reason == Reason::Start || held.is_none_or(|h| latest > h)) {
                        wanted.get_or_insert(reason);
                    } else if latest == 0 && reason == Reason::Start {
                        line.out("the replica has no version yet; waiting for the first".into());
                    }
                }
                Some(Notice::NewVersion(n)) => {
                    announced = announced.max(n);
                    if held.is_none_or(|h| n > h) {
                        wanted.get_or_insert(Reason::NewVersion);
                    }
                }
                Some(Notice::SyncNow) => {
                    wanted = Some(Reason::SyncNow);
                }
                Some(Notice::Disconnected { error, retry_in }) => {
                    line.err(format!(
                        "lost the server ({error}); reconnecting in {}",
                        super::duration::format(retry_in)
                    ));
                }
                Some(Notice::Fatal(e)) => return Err(e),
                None => return Err(Error::Disconnected("the subscription ended".into())),
            },
            done = async { (&mut in_flight.as_mut().expect("guarded").1).await }, if in_flight.is_some() => {
                let (reason, _) = in_flight.take().expect("guarded");
                match done.unwrap_or_else(|e| Err(anyhow::anyhow!("the pull thread failed: {e}"))) {
                    Ok(p) => {
                        failures = 0;
                        held = Some(p.version);
                        // Versions announced during the pull and already pulled by it.
                        if announced <= p.version
                            && matches!(wanted, Some(Reason::NewVersion | Reason::Reconnect))
                        {
                            wanted = None;
                        }
                        line.out(format!(
                            "pull ({}): version {}, {} of {} pages written, {} received in {:.2?}",
                            reason.as_str(),
                            p.version,
                            p.pages_written,
                            p.pages_total,
                            crate::cli::human_bytes(p.bytes_received),
                            p.duration
                        ));
                    }
                    Err(e) => {
                        if super::is_auth_failure(&e) {
                            return Err(Error::Auth(format!("{e:#}")));
                        }
                        // LOCAL holds changes no sync carried: retrying would not make
                        // them go away, and overwriting them is not ours to decide.
                        if super::error_kind(&e) == Some(crate::ErrorKind::LocalChanges) {
                            return Err(Error::LocalChanges(format!("{e:#}")));
                        }
                        failures += 1;
                        let delay = reconnect_delay(failures, super::jitter());
                        line.err(format!(
                            "pull ({}) failed: {e:#}; retry in {}",
                            reason.as_str(),
                            super::duration::format(delay)
                        ));
                        retry_at = Some(tokio::time::Instant::now() + delay);
                    }
                }
            }
            () = retry => {
                wanted.get_or_insert(Reason::Retry);
            }
            () = signals.next() => {
                if stopping {
                    line.err("second signal: stopping now".into());
                    return Ok(true);
                }
                if in_flight.is_none() {
                    return Ok(false);
                }
                line.out("stopping after the pull in progress (a second signal stops at once)".into());
                stopping = true;
            }
        }
    }
}
