//! Between servers sharing a PostgreSQL metadata store (`serve --meta`): what one
//! server's hub hears, every server's hub hears.
//!
//! - A version committed here is told to this server's subscribers at once (the hub),
//!   and announced to the others through PostgreSQL ([`Relay::announce`]): queued,
//!   then sent by the relay's own task, retried with the subscribers' backoff for
//!   about a minute when PostgreSQL is down (the push itself has committed by then and
//!   is never undone for this).
//! - A version announced by another server reaches this server's subscribers of that
//!   replica as if it had been pushed here ([`super::Hub::published`]); one announced
//!   while this server's listening connection was down is read back when it is up
//!   again (`meta::postgres`'s catch-up).
//! - A sync-now ([`sync_now`]) reaches this server's subscribers, then is sent to the
//!   others, each of which tells its own and answers with how many it reached. The
//!   asking server waits for as many answers as there are other listening servers
//!   (their listening connections counted in `pg_stat_activity` just before), at most
//!   [`SYNC_ANSWER_WAIT`], and answers with the sum, the servers that answered and
//!   those that stayed silent.
//!
//! Invariants: the relay's tasks are owned by [`run`], which [`super::serve`] stops
//! once its sessions are over and awaits (versions committed in the shutdown grace are
//! announced, each tried once more at the stop);
//! memory is bounded (at most 1,024 announcements queued, a new one past them dropped
//! with a warning; one entry per sync-now in flight); a notice this server sent itself is
//! never applied twice.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::State;
use crate::meta::postgres::{Heard, Notice, PgMeta};
use crate::protocol::control::NewVersion;
use crate::{Error, Result};

/// How long a sync-now waits for the other servers' answers.
pub const SYNC_ANSWER_WAIT: Duration = Duration::from_secs(1);

/// Announcements queued while PostgreSQL is slow or down.
const OUTBOX: usize = 1024;

/// How many times an announcement is tried before it is given up (with the
/// subscribers' backoff: 1 s doubling, about a minute in all).
const ANNOUNCE_TRIES: u32 = 7;

/// How long an announcement left at the stop may take.
const LAST_TRY: Duration = Duration::from_secs(2);

/// A version to announce.
#[derive(Debug)]
struct Announcement {
    version: NewVersion,
    created_at: i64,
}

/// This server's end of the relay.
#[derive(Debug)]
pub struct Relay {
    bus: PgMeta,
    /// This process's id in notices (not the server id, which servers sharing the
    /// store share).
    instance: String,
    outbox: mpsc::Sender<Announcement>,
    queued: Mutex<Option<mpsc::Receiver<Announcement>>>,
    /// Sync-now requests of this server waiting for answers, by request id.
    pending: Mutex<HashMap<String, mpsc::Sender<u64>>>,
    /// Whether the listening connection is up.
    listening: AtomicBool,
}

/// What a sync-now reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    /// Subscribers told, on every server that answered.
    pub reached: u64,
    /// Servers that answered in time, this one included.
    pub servers: u64,
    /// Listening servers that did not answer within [`SYNC_ANSWER_WAIT`].
    pub silent: u64,
}

impl Relay {
    /// A relay over `bus`, for one server process.
    pub fn new(bus: PgMeta) -> Result<Relay> {
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| Error::Bug(format!("no randomness: {e}")))?;
        let (outbox, queued) = mpsc::channel(OUTBOX);
        Ok(Relay {
            bus,
            instance: crate::digest::hex(&id),
            outbox,
            queued: Mutex::new(Some(queued)),
            pending: Mutex::default(),
            listening: AtomicBool::new(false),
        })
    }

    /// Queues `version` (created at `created_at`) to be announced to the other servers.
    pub fn announce(&self, version: NewVersion, created_at: i64) {
        if let Err(e) = self.outbox.try_send(Announcement {
            version,
            created_at,
        }) {
            tracing::warn!(error = %e, "too many versions waiting to be announced to the other servers; this one is not");
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<u64>>> {
        // A panic while holding it leaves a whole map behind: still usable.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Asks `replica`'s subscribers on every server to sync now. Without a relay (one
/// server), this server's subscribers only. A PostgreSQL that cannot be reached is
/// [`Error::Server`], before anyone is told.
pub async fn sync_now(state: &State, replica: &str) -> Result<Reach> {
    let Some(relay) = &state.relay else {
        let reached = state.hub.sync_now(replica);
        return Ok(Reach {
            reached,
            servers: 1,
            silent: 0,
        });
    };
    let listening = relay.bus.listening_servers().await?;
    let own = u64::from(relay.listening.load(Ordering::Acquire));
    let others = listening.saturating_sub(own);
    let request = {
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| Error::Bug(format!("no randomness: {e}")))?;
        crate::digest::hex(&id)
    };
    let (tx, mut answers) = mpsc::channel(64);
    relay.pending().insert(request.clone(), tx);
    let local = state.hub.sync_now(replica);
    let sent = relay
        .bus
        .notify(&Notice::Sync {
            replica: replica.to_owned(),
            request: request.clone(),
            origin: relay.instance.clone(),
        })
        .await;
    let (mut reached, mut answered) = (local, 0);
    if sent.is_ok() {
        let deadline = tokio::time::Instant::now() + SYNC_ANSWER_WAIT;
        while answered < others {
            tokio::select! {
                answer = answers.recv() => match answer {
                    Some(n) => {
                        reached += n;
                        answered += 1;
                    }
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
    }
    relay.pending().remove(&request);
    sent?;
    Ok(Reach {
        reached,
        servers: answered + 1,
        silent: others - answered,
    })
}

/// Runs the relay of `state` (if it has one) until `stop`: the listening connection,
/// what it hears, and the announcements queued.
pub async fn run(state: std::sync::Arc<State>, stop: CancellationToken) {
    let Some(relay) = state.relay.clone() else {
        return;
    };
    let (heard_tx, mut heard) = mpsc::channel(256);
    let listener = tokio::spawn(relay.bus.clone().listen(heard_tx, stop.clone()));
    let queued = relay
        .queued
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    let announcer =
        queued.map(|queued| tokio::spawn(announce_all(relay.clone(), queued, stop.clone())));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            h = heard.recv() => match h {
                Some(Heard::Up) => {
                    if !relay.listening.swap(true, Ordering::AcqRel) {
                        tracing::info!(at = %relay.bus_name(), "listening for the other servers' versions and sync-now requests");
                    }
                }
                Some(Heard::Down(e)) => {
                    if relay.listening.swap(false, Ordering::AcqRel) {
                        tracing::error!(error = %e, "lost the connection that hears the other servers; reconnecting");
                    } else {
                        tracing::warn!(error = %e, "cannot listen for the other servers yet; retrying");
                    }
                }
                Some(Heard::Notice(notice)) => on_notice(&state, &relay, notice).await,
                None => break,
            },
        }
    }
    let _ = listener.await;
    if let Some(announcer) = announcer {
        let _ = announcer.await;
    }
}

impl Relay {
    fn bus_name(&self) -> String {
        crate::meta::MetaStore::describe(&self.bus)
    }
}

/// Applies what another server said.
async fn on_notice(state: &State, relay: &Relay, notice: Notice) {
    match notice {
        Notice::Version {
            replica,
            version,
            digest,
            created_at,
            origin,
            ..
        } => {
            if origin == relay.instance {
                return;
            }
            tracing::debug!(%replica, version, "a version pushed on another server");
            state.hub.published(
                NewVersion {
                    replica,
                    version,
                    digest,
                },
                created_at,
            );
        }
        Notice::Sync {
            replica,
            request,
            origin,
        } => {
            if origin == relay.instance {
                return;
            }
            let reached = state.hub.sync_now(&replica);
            tracing::info!(%replica, reached, "sync now (asked on another server)");
            let answer = Notice::Reached {
                request,
                reached,
                origin: relay.instance.clone(),
            };
            if let Err(e) = relay.bus.notify(&answer).await {
                tracing::warn!(error = %e, "could not answer another server's sync-now");
            }
        }
        Notice::Reached {
            request, reached, ..
        } => {
            if let Some(waiting) = relay.pending().get(&request) {
                let _ = waiting.try_send(reached);
            }
        }
    }
}

/// Announces the queued versions one by one, each retried up to [`ANNOUNCE_TRIES`]
/// times, until `stop`.
async fn announce_all(
    relay: std::sync::Arc<Relay>,
    mut queued: mpsc::Receiver<Announcement>,
    stop: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => {
                // The last sessions' versions: one try each, bounded.
                while let Ok(a) = queued.try_recv() {
                    let once = relay.bus.announce_version(
                        &a.version.replica,
                        a.version.version,
                        &a.version.digest,
                        a.created_at,
                        &relay.instance,
                    );
                    if !matches!(tokio::time::timeout(LAST_TRY, once).await, Ok(Ok(()))) {
                        tracing::warn!(replica = %a.version.replica, version = a.version.version,
                            "stopping: a version was not announced to the other servers");
                    }
                }
                return;
            }
            next = queued.recv() => next,
        };
        let Some(a) = next else { return };
        let mut backoff = crate::backoff::Reconnect::new();
        loop {
            let sent = relay
                .bus
                .announce_version(
                    &a.version.replica,
                    a.version.version,
                    &a.version.digest,
                    a.created_at,
                    &relay.instance,
                )
                .await;
            let Err(e) = sent else { break };
            if backoff.attempts() + 1 >= ANNOUNCE_TRIES {
                tracing::error!(replica = %a.version.replica, version = a.version.version, error = %e,
                    "gave up announcing a version to the other servers: their subscribers learn of it at the next version or sync-now");
                break;
            }
            let delay = backoff.next_delay(crate::backoff::jitter());
            tracing::warn!(replica = %a.version.replica, error = %e, ?delay, "cannot announce a version to the other servers yet; retrying");
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
}
