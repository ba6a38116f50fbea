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
//! - What this server's hub knows of its subscribers (positions, expected pushes,
//!   failure reports) is written to PostgreSQL by the relay's own task at most once a
//!   second ([`SHARE_EVERY`]), rewritten only when it changed (a heartbeat otherwise),
//!   and the other servers' rows are read back in the same transaction and handed to
//!   the hub ([`super::Hub::set_others`]): never on a push's or pull's path. While
//!   PostgreSQL cannot be reached, the hub shows this server's own only (a warning is
//!   logged once); a stopping server deletes its rows, a killed one's stop being shown
//!   [`crate::meta::postgres::SHARED_FRESH`] after its last write.
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
use super::hub::{Position, Shared};
use crate::meta::postgres::{FailureRow, Heard, Notice, PgMeta, PositionRow, SharedRows};
use crate::protocol::control::NewVersion;
use crate::protocol::control::SubscriberRole;
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

/// How often this server shares what its hub knows with the other servers, and reads
/// theirs: at most one transaction a second per server, whatever its subscribers do.
pub const SHARE_EVERY: Duration = Duration::from_secs(1);

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
    let sharer = tokio::spawn(share_all(state.clone(), relay.clone(), stop.clone()));
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
    let _ = sharer.await;
}

/// Shares this server's hub with the other servers and hands theirs to it, every
/// [`SHARE_EVERY`], until `stop`; then deletes what it shared (bounded by [`LAST_TRY`]).
async fn share_all(
    state: std::sync::Arc<State>,
    relay: std::sync::Arc<Relay>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(SHARE_EVERY);
    // A PostgreSQL that was slow is not sent the missed writes in a burst: the next one
    // carries the state of then.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut written: Option<SharedRows> = None;
    let mut failing = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let mine = rows_of(&state.hub.shared());
        let changed = written.as_ref() != Some(&mine);
        let shared = tokio::select! {
            () = stop.cancelled() => break,
            shared = relay.bus.share(&relay.instance, &mine, changed) => shared,
        };
        match shared {
            Ok(others) => {
                state.hub.set_others(shared_of(others));
                written = Some(mine);
                if std::mem::take(&mut failing) {
                    tracing::info!(
                        "sharing this server's subscribers with the other servers again"
                    );
                }
            }
            Err(e) => {
                // Shown as unknown rather than stale: this server's own only.
                state.hub.set_others(Shared::default());
                written = None;
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(error = %e, "cannot share this server's subscribers with the other servers, nor show theirs; retrying every second");
                }
            }
        }
    }
    if !matches!(
        tokio::time::timeout(LAST_TRY, relay.bus.unshare(&relay.instance)).await,
        Ok(Ok(()))
    ) {
        tracing::debug!(
            "stopping: this server's subscribers stay shown by the others until its heartbeat is stale"
        );
    }
}

/// The hub's state as rows.
fn rows_of(shared: &Shared) -> SharedRows {
    let i64_of = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    SharedRows {
        positions: shared
            .positions
            .iter()
            .map(|p| PositionRow {
                member: i64_of(p.member),
                replica: p.replica.clone(),
                role: match p.role {
                    SubscriberRole::Push => "push",
                    SubscriberRole::Pull => "pull",
                }
                .to_owned(),
                applied_version: p.applied.map(i64_of),
                applied_at: p.applied_at,
                behind_since: p.behind_since,
            })
            .collect(),
        expected: shared.expected.clone(),
        failures: shared
            .failures
            .iter()
            .map(|(replica, f)| FailureRow {
                replica: replica.clone(),
                failing_since: f.failing_since,
                attempts: i64::from(f.attempts),
                error: f.error.clone(),
                reported_at: f.reported_at,
            })
            .collect(),
    }
}

/// The other servers' rows as the hub shows them (rows of a role this build does not
/// know are left out).
fn shared_of(rows: SharedRows) -> Shared {
    let u64_of = |n: i64| u64::try_from(n).unwrap_or(0);
    Shared {
        positions: rows
            .positions
            .into_iter()
            .filter_map(|p| {
                let role = match p.role.as_str() {
                    "push" => SubscriberRole::Push,
                    "pull" => SubscriberRole::Pull,
                    _ => return None,
                };
                Some(Position {
                    replica: p.replica,
                    member: u64_of(p.member),
                    role,
                    applied: p.applied_version.map(u64_of),
                    applied_at: p.applied_at,
                    behind_since: p.behind_since,
                })
            })
            .collect(),
        expected: rows.expected,
        failures: rows
            .failures
            .into_iter()
            .map(|f| {
                (
                    f.replica,
                    super::hub::FailureStatus {
                        failing_since: f.failing_since,
                        attempts: u32::try_from(f.attempts).unwrap_or(u32::MAX),
                        error: f.error,
                        reported_at: f.reported_at,
                    },
                )
            })
            .collect(),
    }
}

impl Relay {
    /// The sweep lock of the servers sharing this database
    /// ([`PgMeta::sweep_lock`]); `None` while another server sweeps.
    pub async fn sweep_lock(&self) -> Result<Option<crate::meta::postgres::SweepLock>> {
        self.bus.sweep_lock().await
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::FailureStatus;

    #[test]
    fn a_hubs_state_survives_its_rows() {
        let shared = Shared {
            positions: vec![
                Position {
                    replica: "acme/app.db".into(),
                    member: 3,
                    role: SubscriberRole::Push,
                    applied: None,
                    applied_at: None,
                    behind_since: None,
                },
                Position {
                    replica: "acme/app.db".into(),
                    member: 4,
                    role: SubscriberRole::Pull,
                    applied: Some(7),
                    applied_at: Some(1_000),
                    behind_since: Some(990),
                },
            ],
            expected: vec![("acme/app.db".into(), 4_600)],
            failures: vec![(
                "acme/other.db".into(),
                FailureStatus {
                    failing_since: 900,
                    attempts: 3,
                    error: "VERSION_CONFLICT".into(),
                    reported_at: 1_000,
                },
            )],
        };
        let rows = rows_of(&shared);
        assert_eq!(rows.positions[0].role, "push");
        assert_eq!(rows.positions[1].applied_version, Some(7));
        assert_eq!(shared_of(rows.clone()), shared);
        // A role a newer build may write is left out, not misread.
        let mut newer = rows;
        newer.positions[0].role = "mirror".into();
        assert_eq!(shared_of(newer).positions.len(), 1);
    }
}
