//! `sqlferry serve`: HTTP and WebSocket on one port.
//!
//! Layout: this file accepts connections and owns their tasks and the shutdown; the
//! `http` module is the axum router (the JSON API and the WebSocket upgrade on
//! `/v1/sync`), `session` one WebSocket session, `auth` the keys, `throttle` the
//! wrong-key throttle, `hub` the subscribers, `relay` what the hubs of servers sharing
//! a PostgreSQL metadata store tell each other (`serve --meta`), `fault` the server's
//! own failures, `lock` the data directory's lock, `tls` the server's TLS identity. The WebSocket framing
//! and the TLS setup it shares with the client live in [`crate::transport`].
//!
//! Each accepted connection runs in its own task: with TLS (the `tls` module, `serve
//! --tls-cert --tls-key`), the handshake first; then hyper serves one HTTP/1.1 request
//! on it through the axum router. A WebSocket upgrade on `/v1/sync` is authenticated
//! from its `Authorization: Bearer` header before the upgrade is accepted (a missing or
//! wrong key gets `401` with a message saying which; a failure to read the keys, such
//! as a full disk, gets `503`: the `fault` module), then runs one session (the
//! `session` module) in a task of its own: OPEN, then a push, a pull or a version list.
//!
//! Invariants:
//! - A connection that fails its TLS handshake, or never finishes it (or its request
//!   head) within `HEAD_TIMEOUT`, ends alone: the accept loop never waits for a
//!   handshake.
//! - A session that fails for any reason (malformed or oversized frame, wrong key,
//!   dropped connection, client killed) ends alone: the server keeps serving everyone
//!   else, and a push that did not finish leaves no trace (the store's transaction is
//!   rolled back).
//! - An API request the server fails on its own is answered (`500` or `503`, with a
//!   JSON body), never a dropped connection; a panic in a handler included.
//! - Keys are never logged; only key ids are.
//! - A failure of the server's own files is the server's error (`ServerError` on the
//!   wire, `503` before an upgrade), logged at error level; never a refusal of the key.
//! - One server per data directory (the `lock` module), unless every server on it
//!   shares one PostgreSQL metadata store (`serve --meta`: the lock is then taken
//!   shared, and a server without `--meta` still refuses); `serve` takes the lock
//!   before it opens anything in it.
//! - Wrong keys are slowed down per client address (the `throttle` module): past a
//!   few, `429` with `Retry-After`, the key unchecked; other addresses are not slowed
//!   down. A failure of the server's own files is not a wrong key.
//! - At most [`Limits::max_sessions`] push and pull sessions run at once; past it a
//!   session waits [`SESSION_WAIT`] for a slot, then is told the server is busy
//!   (ERROR 13). At most [`CONNECTIONS_PER_SESSION`] times as many WebSocket sessions
//!   of any kind (subscribers, sessions waiting for a slot) are open at once; past it
//!   an upgrade is answered `503` with `Retry-After`. What a
//!   session may cost is bounded by the engine's queues and window.
//! - [`serve`] takes its listener and the one [`Shutdown`]: a graceful stop stops
//!   accepting, tells subscribers to close and lets sessions in flight finish for up to
//!   [`SHUTDOWN_GRACE`]; then, or at once on a forced stop, the rest are dropped (an
//!   aborted push rolls back). Every connection and session task is owned by the
//!   server's task tracker and awaited before [`serve`] returns.
//! - Store and key work (SQLite) and file work run on `spawn_blocking`, never on the
//!   async threads; no session holds a SQLite read transaction across an `.await`.

mod api;
mod auth;
mod dashboard;
pub mod drill;
mod fault;
mod http;
mod hub;
mod lock;
pub mod metrics;
mod packed;
pub mod relay;
mod session;
mod throttle;
mod tls;

pub use api::{Summary, summary};
pub use auth::{Auth, KeyKind, Principal, key_id_of, mask};
pub use fault::disk_full;
pub use hub::{
    Event, FailureStatus, FollowerStatus, Hub, Position, RECENT_VERSIONS, Shared, Status,
    lag_seconds,
};
pub use lock::{DataLock, LOCK_FILE};
pub use tls::Tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::protocol::control::NewVersion;
use crate::shutdown::Shutdown;
use crate::store::{AnyStore, ReplicaPath, Store};
use crate::{Error, Result};

/// How long sessions in flight may take to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long a client may take to send its HTTP request head (and, with TLS, to finish
/// its handshake before that).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The first byte of a TLS handshake record (a ClientHello): never the start of an
/// HTTP request.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The largest HTTP request head accepted.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// What every connection of a server shares.
#[derive(Debug, Clone)]
pub struct State {
    /// The replicas: the directory store in the data directory, or an S3 store
    /// (`serve --store s3://…`).
    pub store: AnyStore,
    /// The keys.
    pub auth: Auth,
    /// Subscribers and what they told the server.
    pub hub: Arc<Hub>,
    /// The server's limits on what clients may cost it.
    pub limits: Arc<Limits>,
    /// Counters of sessions, versions and bytes, for `GET /metrics`.
    pub metrics: Arc<metrics::Metrics>,
    /// The last restore drill of each replica (`serve --drill-every`).
    pub drills: Arc<drill::Drills>,
    /// How often each replica is drilled; `None`: never (the default).
    pub drill_every: Option<Duration>,
    /// Whether `GET /metrics` is served on the main port (`serve --metrics`), to the
    /// admin key.
    pub metrics_on_main: bool,
    /// This server's id ([`Auth::server_id`]), sent in every CONFIG and by
    /// `GET /api/health`.
    pub server_id: String,
    /// What this server tells the servers sharing its PostgreSQL metadata store, and
    /// hears from them (`serve --meta`); `None`: a server on its own.
    pub relay: Option<Arc<relay::Relay>>,
}

/// How many sync sessions run at once by default (`serve --max-sessions`).
pub const DEFAULT_MAX_SESSIONS: usize = 32;

/// How long a sync session waits for a free slot before it is told the server is busy.
pub const SESSION_WAIT: Duration = Duration::from_secs(30);

/// What the server lets clients cost it: sync sessions at once, wrong keys per address.
#[derive(Debug)]
pub struct Limits {
    /// Push and pull sessions running at once, and the memory they leave behind.
    sessions: Arc<SessionPool>,
    /// Wrong keys per client address.
    keys: throttle::KeyThrottle,
    /// Permits for WebSocket sessions of any kind (subscribers included) at once.
    connections: Arc<tokio::sync::Semaphore>,
    /// How long a session waits for a free slot before it is told the server is busy.
    session_wait: Duration,
}

/// The push and pull sessions' permits, shared by [`Limits`] and every running
/// [`SessionSlot`], which returns the memory sessions freed when the last one ends.
#[derive(Debug)]
struct SessionPool {
    permits: Arc<tokio::sync::Semaphore>,
    max: usize,
    /// Whether a return of freed memory is planned: one at a time.
    trimming: std::sync::atomic::AtomicBool,
    /// How many times freed memory was returned to the system.
    trims: std::sync::atomic::AtomicU64,
}

impl SessionPool {
    /// Whether no push or pull session is running.
    fn idle(&self) -> bool {
        self.permits.available_permits() >= self.max
    }
}

/// WebSocket sessions of any kind (subscribers, waiting sessions) allowed at once, per
/// push and pull session allowed: past it an upgrade is answered 503.
pub const CONNECTIONS_PER_SESSION: usize = 32;

/// The `Retry-After` of a 503 for too many connections.
const BUSY_RETRY_AFTER: Duration = Duration::from_secs(5);

impl Limits {
    /// Limits allowing `max_sessions` push and pull sessions at once (at least 1).
    pub fn new(max_sessions: usize) -> Limits {
        let max_sessions = max_sessions.max(1);
        Limits {
            sessions: Arc::new(SessionPool {
                permits: Arc::new(tokio::sync::Semaphore::new(max_sessions)),
                max: max_sessions,
                trimming: Default::default(),
                trims: Default::default(),
            }),
            keys: throttle::KeyThrottle::default(),
            connections: Arc::new(tokio::sync::Semaphore::new(
                max_sessions.saturating_mul(CONNECTIONS_PER_SESSION),
            )),
            session_wait: SESSION_WAIT,
        }
    }

    /// The most push and pull sessions that run at once.
    pub fn max_sessions(&self) -> usize {
        self.sessions.max
    }

    /// A slot for one sync session, waiting up to the session wait ([`SESSION_WAIT`]
    /// unless set) for one to free up; `None` when the server stayed busy.
    pub(crate) async fn session(&self) -> Option<SessionSlot> {
        let permits = self.sessions.permits.clone();
        let permit = tokio::time::timeout(self.session_wait, permits.acquire_owned())
            .await
            .ok()?
            .ok()?;
        Some(SessionSlot {
            permit: Some(permit),
            pool: self.sessions.clone(),
        })
    }

    /// How many push and pull sessions are running now.
    pub fn active_sessions(&self) -> usize {
        self.sessions
            .max
            .saturating_sub(self.sessions.permits.available_permits())
    }

    /// How many times the server returned the memory its finished sessions freed.
    pub fn memory_returns(&self) -> u64 {
        self.sessions
            .trims
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// How long the server waits after its last push or pull session ended before it hands
/// the memory they freed back to the system: long enough for the session's own buffers
/// to be dropped, short enough that a burst's memory is gone a moment after it.
const TRIM_DELAY: Duration = Duration::from_secs(1);

/// A running push or pull session's slot ([`Limits::session`]). When the last running
/// one ends and none starts within [`TRIM_DELAY`], the server returns the memory its
/// sessions freed to the system ([`crate::memory::release_freed`]): the allocator keeps freed
/// memory for reuse otherwise, and after a burst of 100 pulls that was 60 MiB kept
/// (bench/server_memory.py).
#[derive(Debug)]
pub(crate) struct SessionSlot {
    /// Taken in `drop`, so the slot is free before the idle check runs.
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    pool: Arc<SessionPool>,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        drop(self.permit.take());
        if !self.pool.idle() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.pool.trimming.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = self.pool.clone();
        runtime.spawn(async move {
            tokio::time::sleep(TRIM_DELAY).await;
            if pool.idle()
                && tokio::task::spawn_blocking(crate::memory::release_freed)
                    .await
                    .is_ok()
            {
                pool.trims.fetch_add(1, Ordering::Relaxed);
            }
            pool.trimming.store(false, Ordering::Release);
        });
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new(DEFAULT_MAX_SESSIONS)
    }
}

impl State {
    /// The server state for data directory `data`: the store and `server.db` live there.
    pub fn open(data: &std::path::Path) -> Result<State> {
        State::open_with(data, crate::meta::Meta::sqlite(data)?, None)
    }

    /// The server state for data directory `data` with its keys and replica ids in
    /// `meta`; with `bus` (the same PostgreSQL database as `meta`), versions and
    /// sync-now requests are relayed to and from the other servers sharing it. Blocks
    /// (the metadata's rule): call it from a blocking thread.
    pub fn open_with(
        data: &std::path::Path,
        meta: crate::meta::Meta,
        bus: Option<crate::meta::postgres::PgMeta>,
    ) -> Result<State> {
        let auth = Auth::over(meta);
        let server_id = auth.server_id()?;
        // Drill results stay in `server.db` whatever holds the keys: made owner-only
        // here before the drills open it.
        crate::meta::sqlite::create_private(data)?;
        Ok(State {
            server_id,
            store: AnyStore::Dir(Store::new(data).filling_digest1()),
            drills: Arc::new(drill::Drills::open(data)?),
            auth,
            hub: Arc::new(Hub::default()),
            limits: Arc::new(Limits::default()),
            metrics: Arc::default(),
            drill_every: None,
            metrics_on_main: false,
            relay: bus.map(relay::Relay::new).transpose()?.map(Arc::new),
        })
    }

    /// A push committed `version` (created at `created_at`): this server's
    /// subscribers hear it now, the other servers' through the relay.
    pub(crate) fn published(&self, version: NewVersion, created_at: i64) {
        if let Some(relay) = &self.relay {
            relay.announce(version.clone(), created_at);
        }
        self.hub.published(version, created_at);
    }

    /// This state keeping its replicas in `store` instead of the data directory's
    /// directory store.
    pub fn with_store(mut self, store: AnyStore) -> State {
        self.store = store;
        self
    }

    /// Every replica of the store, in path order: a directory store's files; for an
    /// S3 store, the replicas registered in this server's metadata (`server.db`, or
    /// PostgreSQL with `--meta`) by their first push, not a LIST of the bucket: the
    /// API and the metrics ask often, and a LIST grows with the bucket. A replica
    /// pushed to the bucket by a server with other metadata is not listed here (it is
    /// served all the same). Blocking.
    pub fn replicas(&self) -> Result<Vec<ReplicaPath>> {
        match &self.store {
            AnyStore::Dir(store) => store.replicas(),
            AnyStore::S3 { .. } => self.auth.replicas(),
        }
    }

    /// This state with each replica's latest version drilled every `every` (see the
    /// `drill` module) while [`serve`] runs.
    pub fn with_drills(mut self, every: Duration) -> State {
        self.drill_every = Some(every);
        self
    }

    /// This state with `GET /metrics` served on the main port, to the admin key.
    pub fn with_metrics(mut self) -> State {
        self.metrics_on_main = true;
        self
    }

    /// This state with at most `n` push and pull sessions running at once, and
    /// sessions past them waiting up to `wait` for a slot.
    pub fn with_max_sessions(mut self, n: usize, wait: Duration) -> State {
        let mut limits = Limits::new(n);
        limits.session_wait = wait;
        self.limits = Arc::new(limits);
        self
    }
}

/// The tasks of one server, connections and WebSocket sessions alike: all tracked, so
/// [`serve`] waits for them, and all dropped at once when `stop` is cancelled (the
/// grace is over, or the stop is forced).
#[derive(Clone, Default)]
pub(crate) struct Tasks {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Tasks {
    /// Runs `task` until it ends or the server stops it.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = task => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// The address a request came from (for the wrong-key throttle), put in every request
/// of a connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub(crate) Option<std::net::IpAddr>);

/// Serves connections from `listener` until `shutdown` asks it to stop; over TLS when
/// `tls` is given (every connection: the API and WebSocket sessions alike).
///
/// A graceful stop stops accepting, tells subscribers to close, and lets sessions in
/// flight finish for up to [`SHUTDOWN_GRACE`]; a forced stop (or the end of the grace)
/// drops the rest. Returns once every connection and session task has ended.
pub async fn serve(
    listener: TcpListener,
    state: State,
    tls: Option<Tls>,
    shutdown: Shutdown,
) -> Result<()> {
    let state = Arc::new(state);
    let tasks = Tasks::default();
    let app = http::router(state.clone(), tasks.clone());
    // Drills stop at the first stop signal (between two pages), and are awaited below.
    let drills = state
        .drill_every
        .map(|every| tokio::spawn(drill::run(state.clone(), every, shutdown.clone())));
    // Runs until the sessions are over (below), so that the versions they commit in
    // the grace are announced too; awaited below.
    let relay_stop = CancellationToken::new();
    let relay = tokio::spawn(relay::run(state.clone(), relay_stop.clone()));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let (app, tls, shutdown) = (app.clone(), tls.clone(), shutdown.clone());
                    tasks.spawn(async move {
                        if let Err(e) = serve_connection(stream, peer, tls, app, shutdown).await {
                            tracing::info!(%peer, error = %e, "connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the others.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = shutdown.requested() => break,
        }
    }
    drop(listener);
    // Subscribe sessions never end on their own: tell them to close now.
    state.hub.close();
    tasks.tracker.close();
    tracing::info!(sessions = tasks.tracker.len(), "shutting down");
    let drained = tokio::select! {
        () = tasks.tracker.wait() => true,
        () = tokio::time::sleep(SHUTDOWN_GRACE) => false,
        () = shutdown.forced() => false,
    };
    if !drained {
        tracing::warn!(
            sessions = tasks.tracker.len(),
            "aborting sessions still running"
        );
    }
    tasks.stop.cancel();
    tasks.tracker.wait().await;
    relay_stop.cancel();
    if let Err(e) = relay.await {
        tracing::error!(error = %e, "the relay task failed");
    }
    if let Some(Err(e)) = match drills {
        Some(drills) => Some(drills.await),
        None => None,
    } {
        tracing::error!(error = %e, "the drill task failed");
    }
    Ok(())
}

/// Serves `GET /metrics` alone, without a key, on `listener` (`serve --metrics-listen`)
/// until `shutdown` asks it to stop. Meant for a loopback address that only the local
/// Prometheus reaches.
pub async fn serve_metrics(listener: TcpListener, state: State, shutdown: Shutdown) -> Result<()> {
    let app = http::metrics_router(Arc::new(state));
    let tasks = Tasks::default();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let (app, shutdown) = (app.clone(), shutdown.clone());
                    tasks.spawn(async move {
                        let peer = Peer(Some(peer.ip()));
                        if let Err(e) = serve_http(stream, peer, app, shutdown).await {
                            tracing::info!(error = %e, "metrics connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed (metrics)");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = shutdown.requested() => break,
        }
    }
    drop(listener);
    tasks.tracker.close();
    tokio::select! {
        () = tasks.tracker.wait() => {}
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {}
        () = shutdown.forced() => {}
    }
    tasks.stop.cancel();
    tasks.tracker.wait().await;
    Ok(())
}

/// One accepted connection: with TLS, the handshake first (bounded by `HEAD_TIMEOUT`,
/// in this connection's own task), then HTTP.
async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    tls: Option<Tls>,
    app: axum::Router,
    shutdown: Shutdown,
) -> Result<()> {
    // TCP_NODELAY, as the client sets it: the sync protocol's frames are small and its
    // writes already gathered, so Nagle's algorithm only made each exchange wait for a
    // delayed ACK (about 40 ms on Linux).
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "could not set TCP_NODELAY");
    }
    let peer = Peer(Some(peer.ip()));
    let Some(tls) = tls else {
        // A TLS ClientHello (a `wss://` or `https://` client) is hung up on, not
        // answered with hyper's 400 in plain text: the client then says "if the server
        // does not use TLS, use ws://" rather than a puzzling TLS decoding error.
        let mut first = [0u8; 1];
        let peeked = tokio::time::timeout(HEAD_TIMEOUT, stream.peek(&mut first)).await;
        if matches!(peeked, Ok(Ok(1))) && first[0] == TLS_HANDSHAKE_RECORD {
            // Read first: closing with unread bytes would reset the connection, and the
            // client would see a reset instead of the end of the stream.
            let mut hello = vec![0u8; MAX_HEAD_BYTES];
            let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut hello).await;
            return Err(Error::Disconnected(
                "a TLS handshake on a plain server; hung up".into(),
            ));
        }
        return serve_http(stream, peer, app, shutdown).await;
    };
    let stream = tokio::time::timeout(HEAD_TIMEOUT, tls.accept(stream))
        .await
        .map_err(|_| Error::Disconnected("no TLS handshake within 10 s".into()))??;
    serve_http(stream, peer, app, shutdown).await
}

/// Serves HTTP/1.1 on `stream`, upgrades included; every answer but an upgrade closes
/// the connection (the `http` module), so this is one request per connection. A graceful stop ends
/// a connection that has not sent its request yet, and lets one in flight finish.
async fn serve_http<S>(stream: S, peer: Peer, app: axum::Router, shutdown: Shutdown) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tower::ServiceExt as _;
    let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
        request.extensions_mut().insert(peer);
        app.clone().oneshot(request)
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        () = shutdown.requested() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    served.map_err(|e| Error::Disconnected(e.to_string()))
}

/// Runs blocking work (SQLite, files) off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f).await?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lets the tasks the slots spawned run, in paused time.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn freed_memory_is_returned_once_the_last_session_ended_and_none_started() {
        let limits = Limits::new(4);
        let a = limits.session().await.expect("a free slot");
        let b = limits.session().await.expect("a free slot");
        drop(a);
        tokio::time::sleep(TRIM_DELAY * 2).await;
        settle().await;
        assert_eq!(limits.memory_returns(), 0, "a session is still running");

        drop(b);
        tokio::time::sleep(TRIM_DELAY / 2).await;
        let c = limits.session().await.expect("a free slot");
        tokio::time::sleep(TRIM_DELAY).await;
        settle().await;
        assert_eq!(
            limits.memory_returns(),
            0,
            "a session started within the delay"
        );

        drop(c);
        tokio::time::sleep(TRIM_DELAY + Duration::from_millis(10)).await;
        for _ in 0..100 {
            if limits.memory_returns() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(limits.memory_returns(), 1);
    }
}
