//! One WebSocket session: OPEN, authorization, then a push, a pull or a version list.
//!
//! Push: `OPEN` → `CONFIG` (the replica's latest version) → optional `KEYREQUEST` and
//! `COMMITMESSAGE` → the page sync with the store as replica → `CONFIG` (the version the
//! push made, and new keys if asked for). Pull: `OPEN` → `CONFIG` (the version to be
//! sent) → the page sync with the store as origin. Versions: `OPEN` → `CONFIG` with the
//! list. Subscribe: `OPEN` → `CONFIG` (the latest version), then NEWREPLICAVERSION and
//! SYNCNOW from the hub, CHANGED and REPORT from a push subscriber, and a ping every
//! [`PING_INTERVAL`], until either side closes. Sync-now: `OPEN` → `CONFIG` with the number
//! of subscribers reached. Keys (admin key only): `OPEN` → `CONFIG` with the key list,
//! or with the key revoked. Any failure is answered with one `ERROR` frame, then the
//! connection closes; a failure of the server's own files is a `ServerError` (the
//! `fault` module) and is logged at error level with the replica and key id.
//!
//! Bounds: a push or a pull holds a session slot of the server's [`super::Limits`]
//! from OPEN to its end (ERROR 13 after waiting for one in vain); a peer that stops
//! reading is cut off after the idle limit (a subscriber: after three ping intervals),
//! and the last ERROR and the close wait for it at most
//! [`CLOSE_TIMEOUT`](crate::transport::ws::CLOSE_TIMEOUT).
//!
//! Store and key work runs on `spawn_blocking`; no SQLite read transaction is held
//! across an `.await` (a pull resolves its version first, answers CONFIG, and opens
//! the version for reading only on the engine's thread).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;

use super::fault::{self, OwnFaults};
use super::metrics::Outcome;
use super::packed::PackedLink;
use super::{Event, KeyKind, Principal, State, blocking};
use crate::engine::{ChannelLink, pumped_link};
use crate::engine::{NoProgress, OriginOptions, Role, run_origin, run_origin_with, run_replica};
use crate::protocol::compress::{CompressMode, PackedPages};
use crate::protocol::control::{
    Config, Control, DIGEST_CHUNKED, Encryption, Followed, MAX_FOLLOWERS_WAIT, NewVersion, Op,
    Open, PING_INTERVAL, SubscriberRole, VersionInfo,
};
use crate::protocol::{ErrorCode, Frame, PROTOCOL_VERSION};
use crate::store::{PushOptions, ReplicaPath, Selector};
use crate::transport::ws::{
    CLOSE_TIMEOUT, Incoming, Pump, Wire, WireBytes, choose, classify, recv_binary, send_binary,
    send_ping, wire_for, within,
};
use crate::{Error, ErrorKind, Result};

// How long a client may stay silent during a sync: one value for both sides.
use crate::protocol::SYNC_IDLE_TIMEOUT;

/// How long a client may take to send OPEN after the upgrade.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a session ended early.
enum Failure {
    /// Not yet told to the client: one ERROR frame goes out.
    Report(Error),
    /// The sync engine already sent its ERROR frame (or the peer is gone).
    Reported(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Report(e)
    }
}

/// The most of a replica name a log line shows (OPEN may carry a long one).
const LOGGED_REPLICA_CHARS: usize = 300;

/// Runs a session to its end; a failure is reported to the client once, then logged
/// (at error level when it is the server's own).
pub(super) async fn run<S>(mut ws: WebSocketStream<S>, state: &State, principal: &Principal)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut replica = String::new();
    let failure = session(&mut ws, state, principal, &mut replica).await.err();
    let replica: String = replica.chars().take(LOGGED_REPLICA_CHARS).collect();
    let (e, report) = match failure {
        None => {
            let _ = ws.close(None).await;
            return;
        }
        Some(Failure::Report(e)) => {
            // The disk probe behind `server_side` is file work: off the async threads.
            let data = state.store.root().to_owned();
            let e = blocking(move || Ok(fault::server_side(e, &data)))
                .await
                .unwrap_or_else(|join| join);
            (e, true)
        }
        // A panicked engine thread reported nothing.
        Some(Failure::Reported(e)) => {
            let bug = e.kind() == ErrorKind::Bug;
            (e, bug)
        }
    };
    if matches!(e.kind(), ErrorKind::Server | ErrorKind::Bug) {
        tracing::error!(%replica, key = %principal.key_id, error = %e, "session failed on the server's side");
    } else {
        tracing::info!(%replica, key = %principal.key_id, error = %e, "session failed");
    }
    if report {
        // The peer may have gone already (that may be the failure); try anyway.
        if !matches!(e, Error::Disconnected(_) | Error::Remote { .. }) {
            let frame = Frame::Error {
                code: ErrorCode::for_kind(e.kind()) as u16,
                message: e.to_string(),
            };
            let _ = within(Some(CLOSE_TIMEOUT), send_binary(&mut ws, frame.to_bytes())).await;
        }
    }
    // A peer that stopped reading cannot take the close either: bounded. Then what the
    // peer still sends is read and dropped until it closes too (for a bounded time):
    // closing a socket with unread data resets the connection, and a reset can destroy
    // the ERROR frame before the peer reads it.
    let _ = within(Some(CLOSE_TIMEOUT), async {
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// `send`, or a lost connection if it does not complete within `limit`.
async fn send_within(
    limit: Duration,
    send: impl std::future::Future<Output = Result<()>>,
) -> Result<()> {
    within(Some(limit), send).await.unwrap_or_else(|| {
        Err(Error::Disconnected(format!(
            "the subscriber read nothing for {} s",
            limit.as_secs()
        )))
    })
}

async fn send_control<S>(ws: &mut WebSocketStream<S>, c: Control) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send_binary(ws, c.to_bytes()).await
}

fn decode_control(bytes: &[u8]) -> Result<Control> {
    Control::decode(bytes).map_err(|e| Error::Protocol(e.to_string()))
}

/// Runs `engine` on a blocking thread as `role` over the engine's channel link, its
/// frames carried over `ws` (see [`crate::transport::ws::run_engine`]).
/// Pages travel as `pump` says: compressed when OPEN offered and CONFIG chose zstd,
/// and then as the store keeps them (the server compresses nothing itself).
/// The bytes of frames it carried are added to `bytes`.
async fn run_engine<S, T, F>(
    ws: &mut WebSocketStream<S>,
    role: Role,
    first: Vec<Vec<u8>>,
    pump: Pump,
    bytes: &mut WireBytes,
    engine: F,
) -> (Result<T>, Vec<Vec<u8>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: Send + 'static,
    F: FnOnce(&mut ChannelLink) -> Result<T> + Send + 'static,
{
    let (result, rest, carried) = crate::transport::ws::run_engine_with(
        ws,
        pumped_link(role),
        first,
        Some(SYNC_IDLE_TIMEOUT),
        pump,
        engine,
    )
    .await;
    bytes.sent += carried.sent;
    bytes.received += carried.received;
    (result, rest)
}

async fn session<S>(
    ws: &mut WebSocketStream<S>,
    state: &State,
    principal: &Principal,
    name: &mut String,
) -> Result<(), Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let first = tokio::time::timeout(OPEN_TIMEOUT, recv_binary(ws))
        .await
        .map_err(|_| Error::Protocol("no OPEN frame within 10 s".into()))??
        .ok_or_else(|| Error::Disconnected("closed before OPEN".into()))?;
    let open = match decode_control(&first)? {
        Control::Open(open) => open,
        _ => return Err(Error::Protocol("the first frame must be OPEN".into()).into()),
    };
    if open.protocol != PROTOCOL_VERSION {
        return Err(Error::Protocol(format!(
            "the client speaks protocol version {}; this server speaks {PROTOCOL_VERSION}",
            open.protocol
        ))
        .into());
    }
    name.clone_from(&open.replica);
    if matches!(open.op, Op::Keys | Op::RevokeKey) {
        return Ok(keys(ws, state, principal, &open).await?);
    }
    let replica = ReplicaPath::parse(&open.replica)?;
    principal.authorize(open.op, &replica)?;
    // Push and pull sessions hold a slot until they end; past the limit a client waits
    // a little, then is told the server is busy (ERROR 13: retry later).
    let _slot = match open.op {
        Op::Push | Op::Pull => match state.limits.session().await {
            Some(slot) => Some(slot),
            None => {
                let message = format!(
                    "server busy: {} push and pull sessions are running (its limit, serve --max-sessions); retry later",
                    state.limits.max_sessions()
                );
                let frame = Frame::Error {
                    code: ErrorCode::ServerBusy as u16,
                    message: message.clone(),
                };
                let _ = within(Some(CLOSE_TIMEOUT), send_binary(ws, frame.to_bytes())).await;
                return Err(Failure::Reported(Error::Server(message)));
            }
        },
        _ => None,
    };
    match open.op {
        Op::Versions if open.passphrase => Ok(passphrase(ws, state, principal, &replica).await?),
        Op::Versions => Ok(versions(ws, state, principal, &replica, open.paged).await?),
        // Counted for the metrics where they end, whatever the end.
        Op::Pull => {
            let (started, mut bytes) = (tokio::time::Instant::now(), WireBytes::default());
            let result = pull(ws, state, principal, &replica, &open, &mut bytes).await;
            let outcome = match result {
                Ok(()) => Outcome::Ok,
                Err(_) => Outcome::Failed,
            };
            let took = started.elapsed();
            (state.metrics).pull_done(outcome, took, bytes.received, bytes.sent);
            result
        }
        Op::Push => {
            let (started, mut bytes) = (tokio::time::Instant::now(), WireBytes::default());
            let result = push(ws, state, principal, replica, open, &mut bytes).await;
            let outcome = match result {
                Ok(true) => Outcome::Ok,
                Ok(false) => Outcome::Unchanged,
                Err(_) => Outcome::Failed,
            };
            let took = started.elapsed();
            (state.metrics).push_done(outcome, took, bytes.received, bytes.sent);
            result.map(drop)
        }
        Op::Subscribe => Ok(subscribe(ws, state, principal, &replica, &open).await?),
        Op::WaitFollowers => Ok(wait_followers(ws, state, principal, &replica).await?),
        Op::SyncNow => {
            // Every server's subscribers when servers share PostgreSQL (`relay`).
            let reach = super::relay::sync_now(state, replica.as_str()).await?;
            let reached = reach.reached;
            tracing::info!(%replica, reached, servers = reach.servers, silent = reach.silent,
                key = %principal.key_id, "sync now");
            let mut c = config(state, principal, &replica, String::new(), 0);
            c.reached = Some(reached);
            Ok(send_control(ws, Control::Config(c)).await?)
        }
        // Answered above, before the replica path (which they may leave empty).
        Op::Keys | Op::RevokeKey => Ok(keys(ws, state, principal, &open).await?),
        Op::Retention => Ok(retention(ws, state, principal, &replica, &open).await?),
        Op::Prune => Ok(prune(ws, state, principal, &replica, &open).await?),
    }
}

/// The refusal of a retention change or a prune by a key that is not the admin key: a
/// leaked PUSH key must not be able to erase history.
fn admin_only(principal: &Principal, what: &str) -> Result<()> {
    if principal.kind == KeyKind::Admin {
        return Ok(());
    }
    Err(Error::Auth(format!(
        "only the admin key may {what}; this is a {} key (it may show the policy: `sqlferry retention REMOTE`)",
        principal.kind.as_str().to_uppercase()
    )))
}

/// `retention`: shows the replica's policy (any key of it), or sets it (admin key).
async fn retention<S>(
    ws: &mut WebSocketStream<S>,
    state: &State,
    principal: &Principal,
    replica: &ReplicaPath,
    open: &Open,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let change = open.retention.is_some() || open.retention_clear;
    if change {
        admin_only(principal, "set a retention policy")?;
    }
    let (store, auth, r) = (state.store.clone(), state.auth.clone(), replica.clone());
    let (policy, clear) = (open.retention.clone(), open.retention_clear);
    let (id, shown) = blocking(move || {
        let id = auth.replica_id(&r, false)?;
        let shown = if change {
            store.set_retention(&r, if clear { None } else { policy.as_ref() })?
        } else {
            store.retention(&r)?
        };
        Ok((id, shown))
    })
    .await?;
    if change {
        tracing::info!(%replica, policy = %shown.policy, source = %shown.source, key = %principal.key_id, "retention policy set");
    }
    let mut c = config(state, principal, replica, id.unwrap_or_default(), 0);
    c.retention = Some(Box::new(shown));
    send_control(ws, Control::Config(c)).await
}

/// `prune` (admin key): removes what the replica's policy does not keep and frees the
/// pages no version uses; a dry run says what it would do.
async fn prune<S>(
    ws: &mut WebSocketStream<S>,
    state: &State,
    principal: &Principal,
    replica: &ReplicaPath,
    open: &Open,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    admin_only(principal, "prune")?;
    // Over S3, one sweep at a time among the servers sharing PostgreSQL (each server's
    // own sweeps are one at a time through its cache's lock); held until the sweep ends.
    let _sweeping = match (&state.relay, state.store.is_s3()) {
        (Some(relay), true) => Some(relay.sweep_lock().await?.ok_or_else(|| {
            Error::InUse(
                "another server sharing this metadata store is sweeping the S3 store; try again when it ends"
                    .into(),
            )
        })?),
        _ => None,
    };
    let (store, auth, r) = (state.store.clone(), state.auth.clone(), replica.clone());
    let dry_run = open.dry_run;
    let (id, report) = blocking(move || {
        let id = auth.replica_id(&r, false)?;
        let report = store.prune(&r, dry_run, crate::epoch::now(), crate::store::PRUNE_WAIT)?;
        Ok((id, report))
    })
    .await?;
    if !dry_run {
        tracing::info!(%replica, removed = report.removed.len(), freed_bytes = report.freed_bytes, key = %principal.key_id, "pruned");
    }
    let mut c = config(state, principal, replica, id.unwrap_or_default(), 0);
    c.pruned = Some(Box::new(report));
    send_control(ws, Control::Config(c)).await
}

/// `keys` and `revoke-key`: the admin key lists or revokes keys; CONFIG carries the
/// list (ids and facts, never a secret).
async fn keys<S>(
    ws: &mut WebSocketStream<S>,
    state: &State,
    principal: &Principal,
    open: &Open,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if principal.kind != KeyKind::Admin {
        return Err(Error::Auth(format!(
            "only the admin key may list or revoke keys; this is a {} key",
            principal.kind.as_str().to_uppercase()
        )));
    }
    let filter = match open.replica.as_str() {
        "" => None,
        r => Some(ReplicaPath::parse(r)?),
    };
    let auth = state.auth.clone();
    let (op, f) = (open.op, filter.clone());
    let target = open.key_id.clone();
    let list = blocking(move || match op {
        Op::RevokeKey => {
            let id = target
                .as_deref()
                .and_then(super::key_id_of)
                .ok_or_else(|| Error::Usage("revoke-key needs a key id (16 hex digits)".into()))?;
            Ok(vec![auth.revoke(&id, f.as_ref())?])
        }
        _ => auth.list(f.as_ref()),
    })
    .await?;
    if let (Op::RevokeKey, Some(k)) = (open.op, list.first()) {
        tracing::info!(revoked = %k.id, key = %principal.key_id, "key revoked");
    }
    let c = Config {
        path: open.replica.clone(),
        key_type: principal.kind.as_str().into(),
        key_list: Some(list),
        server_id: Some(state.server_id.clone()),
        ..Config::default()
    };
    send_control(ws, Control::Config(c)).await
}

/// A CONFIG with the facts every session's CONFIG carries: the replica, the version,
/// the key type, and this server's id and abilities.
fn config(
    state: &State,
    principal: &Principal,
    replica: &ReplicaPath,
    replica_id: String,
    version: u64,
) -> Config {
    Config {
        replica_id,
        path: replica.to_string(),
        version,
        key_type: principal.kind.as_str().into(),
        // This server takes APPLIED and the wait-followers op.
        followers: true,
        server_id: Some(state.server_id.clone()),
        ..Config::default()
    }
}

async fn versions<S>(
    ws: &mut WebSocketStream<S>,
    state: &State,
    principal: &Principal,
    replica: &ReplicaPath,
    paged: bool,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (store, auth, r) = (state.store.clone(), state.auth.clone(), replica.clone());
    let (id, list) = blocking(move || {
        Ok((
            auth.replica_id(&r, false)?,
            store.versions_with_stored_bytes(&r)?,
        ))
    })
    .await?;
    let c = config(
        state,
        principal,
        replica,
        id.unwrap_or_default(),
        list.last().map_or(0, |v| v.number),
    );
    if !paged {
        // An older client reads one CONFIG: every version in it, as before.
        let mut c = c;
        c.versions = Some(list);
        return send_control(ws, Control::Config(c)).await;
    }
    let runs = version_runs(list);
    let last = runs.len() - 1;
    for (i, run) in runs.into_iter().enumerate() {
        let mut c = c.clone();
        c.versions = Some(run);
        c.more = i < last;
        send_control(ws, Control::Config(c)).await?;
    }
    Ok(())
}

/// `versions` asking for the passphrase salt (OPEN's `passphrase`): one CONFIG with the
/// replica's salt and cost, or `null` when it has none or does not exist yet (a first
/// push with a passphrase makes them), and no version list.
async fn passphrase<S>(
    ws: &mut WebSocketStream<S>,
    state: &State,
    principal: &Principal,
    replica: &ReplicaPath,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (store, auth, r) = (state.store.clone(), state.auth.clone(), replica.clone());
    let (id, salted) =
        blocking(move || Ok((auth.replica_id(&r, false)?, store.passphrase(&r)?))).await?;
    let mut c = config(state, principal, replica, id.unwrap_or_default(), 0);
    c.passphrase = Some(salted.as_ref().map(|s| {
        let c = s.cost;
        crate::protocol::control::Passphrase::new(&s.salt, c.memory_kib, c.passes, c.lanes)
    }));
    send_control(ws, Control::Config(c)).await
}

/// The bytes of versions' JSON one CONFIG of a paged `versions` carries at most: well
/// under the frame limit, leaving room for the CONFIG's other fields.
const VERSIONS_RUN_BYTES: usize = crate::protocol::MAX_FRAME_BYTES / 2;

/// `list` cut into runs, oldest first, each within [`VERSIONS_RUN_BYTES`] of JSON (a
/// version is at most a few KiB: its message is at most 4,096 bytes). Always at least
/// one run, empty for a replica without versions.
fn version_runs(list: Vec<VersionInfo>) -> Vec<Vec<VersionInfo>> {
    let mut runs = vec![Vec::new()];
    let mut bytes = 0;
    for v in list {
        let size = serde_json::to_vec(&v).map_or(VERSIONS_RUN_BYTES, |j| j.len() + 1);
        let run = runs.last_mut().expect("one run at least");
        if !run.is_empty() && bytes + size > VERSIONS_RUN_BYTES {
            runs.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        runs.last_mut().expect("one run at least").push(v);
    }
    runs
}

/// The replica's id (if registered) and latest version (0 when it has none yet).
async fn latest(state: &State, replica: &ReplicaPath) -> Result<(Option<String>, u64)> {
    let (store, auth, r) = (state.store.clone(), state.auth.clone(), replica.clone());
    blocking(move || {
        let id = auth.replica_id(&r, false)?;
        // The number alone, one row: listing the versions would make digest 1 of a
        // latest version made by chunks, reading the chunks its push left alone.
        let latest = match store.latest_number(&r) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        Ok((id, latest))
    })
    .await
}

/// The replica's id, its latest version, and its newest versions' numbers and times
/// (at most [`RECENT_VERSIONS`](super::RECENT_VERSIONS), oldest first) with whether they
/// are all it has: what the hub needs to tell a follower's lag.
async fn latest_with_times(
    state: &State,
    replica: &ReplicaPath,
) -> Result<(Option<String>, u64, Vec<(u64, i64)>, bool)> {
    let (store, auth, r) = (state.store.clone(), state.auth.clone(), replica.clone());
    blocking(move || {
        let id = auth.replica_id(&r, false)?;
        let (versions, all) = store.newest(&r, super::RECENT_VERSIONS)?;
        let latest = versions.last().map_or(0, |v| v.number);
        let newest = versions.iter().map(|v| (v.number, v.created_at)).collect();
        Ok((id, latest, newest, all))
    })
    .await
}

/// The creation time of the oldest stored version of `replica` after `version`.
async fn first_after(state: &State, replica: &ReplicaPath, version: u64) -> Result<Option<i64>> {
    let (store, r) = (state.store.clone(), replica.clone());
    blocking(move || Ok(store.first_after(&r, version)?.map(|v| v.created_at))).await
}

async fn subscribe<S>(
    ws: &mut WebSocketStream<S>,
    state: &State,
    principal: &Principal,
    replica: &ReplicaPath,
    open: &Open,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::sync::broadcast::error::RecvError;

    let asked = open
        .role
        .ok_or_else(|| Error::Protocol("a subscribe OPEN needs a role: push or pull".into()))?;
    // A PULL key asking to push-subscribe is told so by CONFIG's key type, and counted
    // as what it can be: a pull subscriber.
    let role = match (asked, principal.kind) {
        (SubscriberRole::Push, KeyKind::Pull) => SubscriberRole::Pull,
        (role, _) => role,
    };
    // Joined before the latest version is read: a push committing in between is then
    // heard as a NEWREPLICAVERSION rather than lost (a repeat is harmless).
    let mut member = state.hub.join(replica.as_str(), role);
    let (id, latest, newest, all) = latest_with_times(state, replica).await?;
    state.hub.learn_versions(replica.as_str(), &newest, all);
    send_control(
        ws,
        Control::Config(config(
            state,
            principal,
            replica,
            id.unwrap_or_default(),
            latest,
        )),
    )
    .await?;
    tracing::info!(%replica, role = role.as_str(), key = %principal.key_id, "subscriber joined");
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.reset();
    // A client that answers nothing, not even a ping, for three intervals is gone
    // (a machine switched off sends no FIN): it stops being counted.
    let mut last_heard = tokio::time::Instant::now();
    // A subscriber that stops reading stalls a send: as long as silence, it is gone.
    let silence = PING_INTERVAL * 3;
    let result = loop {
        // Joined after the server began closing: the change below was already seen.
        if *member.closing.borrow() {
            break Ok(());
        }
        tokio::select! {
            event = member.events.recv() => match event {
                Ok(Event::NewVersion(v)) => {
                    send_within(silence, send_control(ws, Control::NewReplicaVersion(v))).await?;
                }
                Ok(Event::SyncNow) => send_within(silence, send_control(ws, Control::SyncNow)).await?,
                // Older events were dropped; the newer ones are still queued.
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => break Ok(()),
            },
            message = ws.next() => {
                last_heard = tokio::time::Instant::now();
                let bytes = match classify(message) {
                    Ok(Incoming::Frame(b)) => b,
                    Ok(Incoming::Closed) => break Ok(()),
                    // Pongs (and pings, answered by tungstenite) only prove it is there.
                    Ok(Incoming::Alive) => continue,
                    Err(e) => break Err(e),
                };
                let now = crate::epoch::now();
                match decode_control(&bytes)? {
                    Control::Changed(seconds) if role == SubscriberRole::Push => {
                        if let Some(held_back) = state.hub.changed(replica.as_str(), seconds, now) {
                            tracing::info!(%replica, seconds, held_back, "push expected");
                        }
                    }
                    Control::Report(mut report) if role == SubscriberRole::Push => {
                        report.cap_error();
                        let (attempts, failing_for) = (report.attempts, report.failing_for);
                        let error = report.error.clone();
                        if let Some(held_back) = state.hub.report(replica.as_str(), report, now) {
                            tracing::warn!(%replica, attempts, failing_for, %error, held_back,
                                "a push subscriber reports failing pushes");
                        }
                    }
                    // From a push subscriber (which has no followers' version) it is
                    // ignored, as docs/protocol.md says.
                    Control::Applied(applied) => {
                        if role == SubscriberRole::Pull {
                            let older = match member.needs_store_for(applied.version) {
                                true => first_after(state, replica, applied.version).await?,
                                false => None,
                            };
                            tracing::debug!(%replica, version = applied.version, "a follower applied a version");
                            member.applied(applied.version, applied.applied_at, older, now);
                        }
                    }
                    other => {
                        break Err(Error::Protocol(format!(
                            "unexpected {other:?} from a {} subscriber",
                            role.as_str()
                        )));
                    }
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > PING_INTERVAL * 3 {
                    break Err(Error::Disconnected(format!(
                        "no answer to pings for {}s",
                        last_heard.elapsed().as_secs()
                    )));
                }
                send_within(silence, send_ping(ws)).await?;
            }
            _ = member.closing.changed() => break Ok(()),
        }
    };
    tracing::info!(%replica, role = role.as_str(), "subscriber left");
    result
}

/// `wait-followers`: CONFIG (the latest version), then WAITFOLLOWERS from the client;
/// FOLLOWED each time the count of pull subscribers holding the version changes, and a
/// last one (`done`) when it reaches the count asked for or the wait times out. Woken
/// by the hub, never polling; holds no store transaction and no session slot.
async fn wait_followers<S>(
    ws: &mut WebSocketStream<S>,
    state: &State,
    principal: &Principal,
    replica: &ReplicaPath,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (id, latest) = latest(state, replica).await?;
    if id.is_none() && latest == 0 {
        return Err(Error::NotFound(format!("replica {replica} does not exist")));
    }
    send_control(
        ws,
        Control::Config(config(
            state,
            principal,
            replica,
            id.unwrap_or_default(),
            latest,
        )),
    )
    .await?;
    let bytes = tokio::time::timeout(OPEN_TIMEOUT, recv_binary(ws))
        .await
        .map_err(|_| Error::Protocol("no WAITFOLLOWERS frame within 10 s".into()))??
        .ok_or_else(|| Error::Disconnected("closed before WAITFOLLOWERS".into()))?;
    let wait = match decode_control(&bytes)? {
        Control::WaitFollowers(w) if w.count > 0 && w.version > 0 => w,
        Control::WaitFollowers(w) => {
            return Err(Error::Usage(format!(
                "WAITFOLLOWERS for {} followers of version {}: both must be at least 1",
                w.count, w.version
            )));
        }
        other => {
            return Err(Error::Protocol(format!(
                "expected WAITFOLLOWERS, got {other:?}"
            )));
        }
    };
    let limit = Duration::from_millis(wait.timeout_ms).min(MAX_FOLLOWERS_WAIT);
    let deadline = tokio::time::Instant::now() + limit;
    tracing::info!(%replica, version = wait.version, count = wait.count, timeout_ms = limit.as_millis() as u64,
        key = %principal.key_id, "waiting for followers");
    let mut closing = state.hub.closing();
    let mut sent = None;
    loop {
        // Subscribed before counting: a report that lands in between still wakes us.
        let (count, mut changed) = state.hub.wait_followers(replica.as_str(), wait.version);
        let reached = count >= wait.count;
        // A server shutting down answers at once with what it has.
        let done = reached || tokio::time::Instant::now() >= deadline || *closing.borrow();
        if done || sent != Some(count) {
            let followed = Followed {
                count,
                version: wait.version,
                done,
            };
            send_within(CLOSE_TIMEOUT, send_control(ws, Control::Followed(followed))).await?;
            sent = Some(count);
        }
        if done {
            tracing::info!(%replica, version = wait.version, count, wanted = wait.count, reached,
                "wait for followers ended");
            return Ok(());
        }
        tokio::select! {
            _ = changed.changed() => {}
            () = tokio::time::sleep_until(deadline) => {}
            message = ws.next() => match classify(message)? {
                Incoming::Closed => return Ok(()),
                Incoming::Alive => {}
                Incoming::Frame(_) => {
                    return Err(Error::Protocol("a frame while waiting for followers".into()));
                }
            },
            _ = closing.changed() => {}
        }
    }
}

async fn pull<S>(
    ws: &mut WebSocketStream<S>,
    state: &State,
    principal: &Principal,
    replica: &ReplicaPath,
    open: &Open,
    bytes: &mut WireBytes,
) -> Result<(), Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let spec = format!("{replica}@{}", open.version.as_deref().unwrap_or("latest"));
    let (_, selector) = Selector::split(&spec)?;
    // Only the version's number is resolved here: the reader (a SQLite read
    // transaction) is opened on the engine's thread, never held across the CONFIG
    // send below. Versions are immutable, so the number names the same version then.
    let (store, auth, r) = (state.store.clone(), state.auth.clone(), replica.clone());
    let (id, number, encryption) = blocking(move || {
        let id = auth.replica_id(&r, false)?;
        let (number, encryption) = store.resolve(&r, selector)?;
        Ok((id, number, encryption))
    })
    .await?;
    let mut c = config(state, principal, replica, id.unwrap_or_default(), number);
    // An encrypted version goes as it is stored, sealed, and never compressed (the
    // client refuses a mix of keys from this answer, before any page moves).
    c.encryption = open
        .encryption
        .as_ref()
        .map(|_| encryption.clone().map(Encryption::key));
    // An S3 store keeps no compressed pages to hand on: plain, as for push.
    c.compress = match open.encryption.is_some() || encryption.is_some() {
        true => None,
        false => choose(&open.compress).filter(|_| !state.store.is_s3()),
    };
    let wire = wire_for(c.compress.as_deref());
    send_control(ws, Control::Config(c)).await?;
    let (store, r) = (state.store.clone(), replica.clone());
    let data = state.store.root().to_owned();
    // A page the store keeps compressed goes to a zstd peer as it is kept; every other
    // page goes plain (no compression work here: see docs/server.md).
    let pump = Pump {
        wire,
        compress: CompressMode::Off,
        keep_packed: None,
    };
    let (result, _) = run_engine(ws, Role::Origin, Vec::new(), pump, bytes, move |link| {
        let mut reader = match store.read(&r, Selector::Number(number)) {
            Ok(reader) => reader,
            // The engine has not started, so it reports nothing: tell the client here.
            Err(e) => return Err(fault::report(link, fault::server_side(e, &data))),
        };
        if let (Wire::Zstd, crate::store::AnyReader::Dir(dir)) = (wire, &mut reader) {
            let packed = PackedPages::new();
            dir.hand_packed(packed.clone());
            let mut link = PackedLink::new(link, packed);
            run_origin(
                &mut OwnFaults::new(&mut reader, &data),
                &mut link,
                &NoProgress,
            )
            .map(drop)
        } else {
            let options = OriginOptions {
                sealing: reader.relay(),
                ..OriginOptions::default()
            };
            let mut source = OwnFaults::new(&mut reader, &data);
            run_origin_with(&mut source, link, &NoProgress, options).map(drop)
        }
    })
    .await;
    // The engine reported its own failure to the client already.
    result.map_err(Failure::Reported)
}

async fn push<S>(
    ws: &mut WebSocketStream<S>,
    state: &State,
    principal: &Principal,
    replica: ReplicaPath,
    open: Open,
    bytes: &mut WireBytes,
) -> Result<bool, Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let admin = principal.kind == KeyKind::Admin;
    // Merging reads and writes database files beside the directory store: refused
    // before anything is exchanged, whether or not the replica moved.
    if open.merge.is_some() && state.store.is_s3() {
        return Err(crate::store::not_with_s3("push --merge").into());
    }
    // Registered only once its first version commits (below): a failed first push
    // leaves no replica behind.
    let (id, latest) = latest(state, &replica).await?;
    // Only an admin key creates replicas; a push key's replica exists already.
    if id.is_none() && !admin {
        return Err(Error::NotFound(format!(
            "replica {replica} does not exist; an admin key creates it"
        ))
        .into());
    }
    let mut c = config(
        state,
        principal,
        &replica,
        id.clone().unwrap_or_default(),
        latest,
    );
    // An encrypted replica's encryption, asked only when it matters: to a push with a
    // key (CONFIG answers it), or one asking to merge (refused on ciphertext).
    let encryption = match open.encryption.is_some() || open.merge.is_some() {
        true => {
            let (store, r) = (state.store.clone(), replica.clone());
            blocking(move || store.encryption(&r)).await?
        }
        false => None,
    };
    if open.merge.is_some() && (open.encryption.is_some() || encryption.is_some()) {
        return Err(Error::Usage(format!(
            "{replica} is encrypted: the server cannot read an encrypted replica's rows, so it cannot merge them; pull the latest version into another file, make this push's changes there, and push that file (without --merge)"
        ))
        .into());
    }
    c.encryption = open
        .encryption
        .as_ref()
        .map(|_| encryption.clone().map(Encryption::key));
    // An encrypted session never agrees to compression (docs/security.md). An S3 store
    // keeps pages plain: the client is told to send them plain too (the offer is
    // declined, as an older server declines it), rather than have the server
    // decompress them.
    c.compress = match open.encryption.is_some() {
        true => None,
        false => choose(&open.compress).filter(|_| !state.store.is_s3()),
    };
    // A push asking to merge hears that this server merges (an older one says
    // nothing, and the client stops); it merges when the replica moved past its base.
    c.merge = open.merge.is_some();
    let merging = match (&open.merge, open.base) {
        (Some(request), Some(base)) if !open.force && latest > 0 && base != latest => {
            Some((crate::merge::OnConflict::from_request(request)?, base))
        }
        _ => None,
    };
    // The chunked digest where the client offered it, for a push stored as it comes
    // (a merge receives its candidate into a database file, which checks digest 1).
    let chunked = merging.is_none() && open.digests.iter().any(|d| d == DIGEST_CHUNKED);
    c.digest_form = chunked.then(|| DIGEST_CHUNKED.to_owned());
    let wire = wire_for(c.compress.as_deref());
    send_control(ws, Control::Config(c)).await?;

    // Control frames until the first page-sync frame, which belongs to the engine.
    let mut message = String::new();
    let mut key_request = false;
    let first_sync = loop {
        // Bounded like silence inside the sync: this session holds a slot.
        let bytes = within(Some(SYNC_IDLE_TIMEOUT), recv_binary(ws))
            .await
            .ok_or_else(|| {
                Error::Protocol(format!(
                    "no frame for {} s; the session is closed",
                    SYNC_IDLE_TIMEOUT.as_secs()
                ))
            })??
            .ok_or_else(|| Error::Disconnected("closed before the push began".into()))?;
        match bytes.first() {
            Some(&b) if Control::is_control(b) => match decode_control(&bytes)? {
                Control::KeyRequest => key_request = true,
                Control::CommitMessage(m) => message = m,
                other => {
                    return Err(
                        Error::Protocol(format!("unexpected control frame {other:?}")).into(),
                    );
                }
            },
            _ => break bytes,
        }
    };
    if key_request && !admin {
        tracing::info!(key = %principal.key_id, "KEYREQUEST from a non-admin key ignored");
        key_request = false;
    }
    if let Some((on_conflict, base)) = merging {
        let request = crate::merge::Request {
            replica: replica.clone(),
            base,
            on_conflict,
            message,
            client_id: open.client_id.clone(),
            key_id: principal.key_id.clone(),
        };
        let pump = Pump {
            wire,
            compress: CompressMode::Off,
            keep_packed: None,
        };
        return merge_push(ws, state, principal, id, request, first_sync, pump, bytes).await;
    }
    // A passphrase's salt and cost, checked before anything is stored (the store
    // records them with the replica's first passphrase version).
    let passphrase = match open.encryption.as_ref().and_then(|e| e.passphrase.as_ref()) {
        Some(p) => Some(crate::crypt::PassphraseSalt::from_wire(
            replica.as_str(),
            p.salt_bytes().as_deref(),
            p.cost(),
        )?),
        None => None,
    };
    let options = PushOptions {
        base: open.base,
        force: open.force,
        message,
        client_id: open.client_id.clone(),
        key_id: principal.key_id.clone(),
        encryption: open.encryption.as_ref().map(|e| e.key_id.clone()),
        rekey_from: open.encryption.as_ref().and_then(|e| e.rekey_from.clone()),
        passphrase,
    };
    let (store, r) = (state.store.clone(), replica.clone());
    let data = state.store.root().to_owned();
    // Pages that come compressed are kept as they came: the pump hands their bytes to
    // the store beside the plain pages the engine checks.
    let packed = (wire == Wire::Zstd).then(PackedPages::new);
    let pump = Pump {
        wire,
        compress: CompressMode::Off,
        keep_packed: packed.clone(),
    };
    let (result, _) = run_engine(
        ws,
        Role::Replica,
        vec![first_sync],
        pump,
        bytes,
        move |link| {
            let mut writer = match store.push(&r, options) {
                Ok(w) => w,
                // The engine has not started, so it reports nothing: tell the client
                // here, or it would only see the connection close.
                Err(e) => return Err(fault::report(link, fault::server_side(e, &data))),
            };
            if let (Some(packed), crate::store::AnyWriter::Dir(writer)) = (packed, &mut writer) {
                writer.keep_packed(packed);
            }
            run_replica(
                &mut OwnFaults::new(&mut writer, &data).agreeing_chunked(chunked),
                link,
            )?;
            let (version, created) = writer.outcome().expect("a committed push has an outcome");
            Ok((
                version.clone(),
                created,
                writer.repaired(),
                writer.removed().to_vec(),
            ))
        },
    )
    .await;
    // The engine reported its own failure to the client already.
    let (version, created, repaired, removed) = result.map_err(Failure::Reported)?;
    let id = match id {
        Some(id) => id,
        None => {
            let (auth, r) = (state.auth.clone(), replica.clone());
            blocking(move || auth.replica_id(&r, true))
                .await?
                .expect("replica_id registers when asked to")
        }
    };
    tracing::info!(%replica, version = version.number, created, key = %principal.key_id, "push committed");
    if created {
        // Digest 1 where the version recorded it; a version made by chunks recorded only
        // its chunked digest (`c:…`, which says its form): subscribers act on the
        // number alone, and making digest 1 would read the chunks the push left alone.
        let digest = version.recorded_digest();
        state.published(
            NewVersion {
                replica: replica.to_string(),
                version: version.number,
                digest,
            },
            version.created_at,
        );
    } else {
        state.hub.pushed_unchanged(replica.as_str());
    }
    let keys = if key_request {
        let (auth, r) = (state.auth.clone(), replica.clone());
        Some(blocking(move || auth.mint_replica_keys(&r)).await?)
    } else {
        None
    };
    let mut c = config(state, principal, &replica, id, version.number);
    c.created = Some(created);
    c.repaired = (repaired > 0).then_some(repaired);
    c.keys = keys;
    // Only to a client that agreed on the chunked form: an older one sees today's CONFIG.
    c.digest = chunked.then(|| version.recorded_digest());
    // Tests end the session here, committed and unanswered, as a lost connection would
    // (debug builds only; the pause blocks this worker until the test kills the server).
    crate::error::debug_panic("answer");
    crate::error::debug_pause("answer");
    send_control(ws, Control::Config(c)).await?;
    ws.flush()
        .await
        .map_err(|e| Error::Disconnected(e.to_string()))?;
    // Versions the retention policy removed after this one: their pages are freed now
    // that the push let go of the store (best effort, briefly: see the store).
    if !removed.is_empty() {
        let (store, r) = (state.store.clone(), replica.clone());
        blocking(move || {
            store.dir("retention")?.collect_after_removal(&r, &removed);
            Ok(created)
        })
        .await?;
    }
    Ok(created)
}

/// A push whose base is stale, merged (`push --merge`): the candidate is received into
/// a scratch file built from the base version (the client sends the pages that differ
/// from it), then merged onto the latest version and stored as a new version by
/// [`crate::merge::merge_into_store`], in a scratch directory under the data directory
/// (`merging/`, removed when the merge ends, and at the next start after a kill). The
/// answer is a CONFIG with the merge's report (`merged`): the version it made, or why
/// it was refused (the client turns that into VERSION_CONFLICT with the rows).
#[allow(clippy::too_many_arguments)]
async fn merge_push<S>(
    ws: &mut WebSocketStream<S>,
    state: &State,
    principal: &Principal,
    id: Option<String>,
    request: crate::merge::Request,
    first_sync: Vec<u8>,
    pump: Pump,
    bytes: &mut WireBytes,
) -> Result<bool, Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let replica = request.replica.clone();
    // Refused in `push` before this is reached; the type needs the directory store.
    let dir = state.store.dir("push --merge")?.clone();
    let root = dir.root().to_owned();
    let scratch = {
        let root = root.clone();
        blocking(move || crate::merge::scratch_in(&root)).await?
    };
    let candidate = scratch.path().join("candidate.db");
    let (store, r, data) = (dir.clone(), replica.clone(), root.clone());
    let (base, path) = (request.base, candidate.clone());
    let (result, _) = run_engine(
        ws,
        Role::Replica,
        vec![first_sync],
        pump,
        bytes,
        move |link| {
            // The base version first: the client sends only the pages that differ.
            if let Err(e) = crate::merge::materialize(&store, &r, base, &path) {
                let e = match e.kind() {
                    ErrorKind::NotFound => Error::NotFound(format!(
                        "cannot merge: version {base} of {r}, the one this push is based on, \
                         is no longer stored ({e}); nothing was stored. Pull the replica into \
                         another file and compare (`sqlferry diff`); `push --force` would \
                         replace the latest version with this push, leaving the rows others \
                         pushed since only in older versions"
                    )),
                    _ => fault::server_side(e, &data),
                };
                return Err(fault::report(link, e));
            }
            let mut writer = match crate::page::Writer::open(&path) {
                Ok(w) => w.with_hash_cache(None),
                Err(e) => return Err(fault::report(link, fault::server_side(e, &data))),
            };
            run_replica(&mut writer, link).map(|done| crate::digest::hex(&done.digest))
        },
    )
    .await;
    // The engine reported its own failure to the client already.
    let candidate_digest = result.map_err(Failure::Reported)?;
    let (store, dir) = (dir, scratch.path().to_owned());
    let merged = blocking(move || {
        crate::error::debug_pause("merge");
        let stored =
            crate::merge::merge_into_store(&store, &request, &candidate, &candidate_digest, &dir);
        drop(scratch);
        stored
    })
    .await;
    let stored = match merged {
        Ok(stored) => stored,
        Err(e) => match e.merge_report() {
            // Refused: the report goes back whole, the client makes it an error.
            Some(report) => {
                let result: crate::protocol::control::MergeResult =
                    serde_json::from_value(report.clone()).unwrap_or_default();
                tracing::info!(%replica, key = %principal.key_id, error = %e, "merge refused");
                let mut c = config(
                    state,
                    principal,
                    &replica,
                    id.unwrap_or_default(),
                    result.onto,
                );
                c.merged = Some(Box::new(fit(result)));
                send_control(ws, Control::Config(c)).await?;
                return Ok(false);
            }
            None => return Err(e.into()),
        },
    };
    let version = &stored.version;
    tracing::info!(%replica, version = version.number, base = stored.result.base,
        onto = stored.result.onto, key = %principal.key_id, "merged push committed");
    if stored.created {
        state.published(
            NewVersion {
                replica: replica.to_string(),
                version: version.number,
                digest: version.digest.clone(),
            },
            version.created_at,
        );
    }
    let mut c = config(
        state,
        principal,
        &replica,
        id.unwrap_or_default(),
        version.number,
    );
    c.created = Some(stored.created);
    c.merged = Some(Box::new(fit(stored.result)));
    send_control(ws, Control::Config(c)).await?;
    ws.flush()
        .await
        .map_err(|e| Error::Disconnected(e.to_string()))?;
    Ok(stored.created)
}

/// A merge's report cut to fit in one CONFIG frame: conflicting rows dropped from the
/// end of the list (their count stays) until it does.
fn fit(mut result: crate::protocol::control::MergeResult) -> crate::protocol::control::MergeResult {
    let limit = crate::protocol::MAX_FRAME_BYTES / 2;
    while !result.conflicts.is_empty() && serde_json::to_vec(&result).map_or(0, |v| v.len()) > limit
    {
        result.conflicts.pop();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every run of a paged `versions` fits in a frame even when each version has the
    /// longest message, and the runs hold every version once, in order.
    #[test]
    fn version_runs_fit_in_frames_and_keep_every_version_in_order() {
        let list: Vec<VersionInfo> = (1..=200u64)
            .map(|n| VersionInfo {
                number: n,
                page_size: 4096,
                page_count: 1 << 20,
                size: 4 << 30,
                digest: "ab".repeat(32),
                digest2: None,
                message: "é".repeat(2048),
                created_at: 1_800_000_000,
                client_id: "someone@a-long-host-name.example".into(),
                key_id: "0123456789abcdef".into(),
                base: n - 1,
                stored_bytes: Some(u64::MAX),
                merged_into: Some(u64::MAX),
                encryption: None,
            })
            .collect();
        let runs = version_runs(list.clone());
        assert!(runs.len() > 10, "{} runs", runs.len());
        for run in &runs {
            let c = Config {
                replica_id: "f".repeat(32),
                path: "a".repeat(200),
                versions: Some(run.clone()),
                more: true,
                server_id: Some("0".repeat(32)),
                ..Config::default()
            };
            let bytes = Control::Config(c).to_bytes();
            assert!(
                bytes.len() < crate::protocol::MAX_FRAME_BYTES,
                "{}",
                bytes.len()
            );
        }
        assert_eq!(runs.concat(), list);
        assert_eq!(version_runs(Vec::new()), vec![Vec::<VersionInfo>::new()]);
    }
}
