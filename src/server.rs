//! `sqlferry serve`: HTTP and WebSocket on one port.
//!
//! With TLS (the `tls` module, `serve --tls-cert --tls-key`), every connection starts
//! with a TLS handshake in its own task; then, and without TLS at once, every
//! connection is an HTTP request. A WebSocket upgrade on `/v1/sync` is
//! authenticated from its `Authorization: Bearer` header before the upgrade is
//! accepted (a missing or wrong key gets `401` with a message saying which; a failure
//! to read the keys, such as a full disk, gets `503`: the `fault` module), then runs
//! one session (the `session` module): OPEN, then a push, a pull or a version list. Other
//! requests go to the small JSON API (the `http` module).
//!
//! Invariants:
//! - A connection that fails its TLS handshake, or never finishes it within
//!   `HEAD_TIMEOUT`, ends alone: the accept loop never waits for a handshake.
//! - A session that fails for any reason (malformed or oversized frame, wrong key,
//!   dropped connection, client killed) ends alone: the server keeps serving everyone
//!   else, and a push that did not finish leaves no trace (the store's transaction is
//!   rolled back).
//! - Keys are never logged; only key ids are.
//! - A failure of the server's own files is the server's error (`ServerError` on the
//!   wire, `503` before an upgrade), logged at error level; never a refusal of the key.
//! - One server per data directory (the `lock` module); `serve` takes the lock before
//!   it opens anything in it.
//! - Wrong keys are slowed down per client address (the `throttle` module): past a
//!   few, `429` with `Retry-After`, the key unchecked; other addresses are not slowed
//!   down. A failure of the server's own files is not a wrong key.
//! - At most [`Limits::max_sessions`] push and pull sessions run at once; past it a
//!   session waits [`SESSION_WAIT`] for a slot, then is told the server is busy
//!   (ERROR 13). At most [`CONNECTIONS_PER_SESSION`] times as many WebSocket sessions
//!   of any kind (subscribers, sessions waiting for a slot) are open at once; past it
//!   an upgrade is answered `503` with `Retry-After`. What a
//!   session may cost is bounded by the engine's queues and window.
//! - [`serve`] takes its listener and a shutdown future: on shutdown it stops accepting,
//!   lets sessions in flight finish for up to [`SHUTDOWN_GRACE`], then aborts the rest
//!   (an aborted push rolls back).

mod auth;
mod fault;
mod http;
mod hub;
mod lock;
mod session;
mod throttle;
mod tls;

pub use auth::{Auth, KeyKind, Principal, key_id_of, mask};
pub use fault::disk_full;
pub use hub::{Event, FailureStatus, Hub, Status};
pub use lock::{DataLock, LOCK_FILE};
pub use tls::Tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::store::Store;
use crate::{Error, Result};

/// How long sessions in flight may take to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long a client may take to send its HTTP request head (and, with TLS, to finish
/// its handshake before that).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest HTTP request head accepted.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// What every connection of a server shares.
#[derive(Debug, Clone)]
pub struct State {
    /// The replicas.
    pub store: Store,
    /// The keys.
    pub auth: Auth,
    /// Subscribers and what they told the server.
    pub hub: Arc<Hub>,
    /// The server's limits on what clients may cost it.
    pub limits: Arc<Limits>,
}

/// How many sync sessions run at once by default (`serve --max-sessions`).
pub const DEFAULT_MAX_SESSIONS: usize = 32;

/// How long a sync session waits for a free slot before it is told the server is busy.
pub const SESSION_WAIT: Duration = Duration::from_secs(30);

/// What the server lets clients cost it: sync sessions at once, wrong keys per address.
#[derive(Debug)]
pub struct Limits {
    /// Permits for push and pull sessions running at once.
    sessions: Arc<tokio::sync::Semaphore>,
    max_sessions: usize,
    /// Wrong keys per client address.
    keys: throttle::KeyThrottle,
    /// Permits for WebSocket sessions of any kind (subscribers included) at once.
    connections: Arc<tokio::sync::Semaphore>,
    /// How long a session waits for a free slot before it is told the server is busy.
    session_wait: Duration,
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
            sessions: Arc::new(tokio::sync::Semaphore::new(max_sessions)),
            max_sessions,
            keys: throttle::KeyThrottle::default(),
            connections: Arc::new(tokio::sync::Semaphore::new(
                max_sessions.saturating_mul(CONNECTIONS_PER_SESSION),
            )),
            session_wait: SESSION_WAIT,
        }
    }

    /// The most push and pull sessions that run at once.
    pub fn max_sessions(&self) -> usize {
        self.max_sessions
    }

    /// A slot for one sync session, waiting up to the session wait ([`SESSION_WAIT`]
    /// unless set) for one to free up; `None` when the server stayed busy.
    pub(crate) async fn session(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        tokio::time::timeout(self.session_wait, self.sessions.clone().acquire_owned())
            .await
            .ok()?
            .ok()
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
        Ok(State {
            store: Store::new(data),
            auth: Auth::open(data)?,
            hub: Arc::new(Hub::default()),
            limits: Arc::new(Limits::default()),
        })
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

/// Serves connections from `listener` until `shutdown` completes; over TLS when `tls`
/// is given (every connection: the API and WebSocket sessions alike).
pub async fn serve(
    listener: TcpListener,
    state: State,
    tls: Option<Tls>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let state = Arc::new(state);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let state = state.clone();
                    let tls = tls.clone();
                    connections.spawn(async move {
                        if let Err(e) = serve_connection(stream, tls, state).await {
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
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    // Subscribe sessions never end on their own: tell them to close now.
    state.hub.close();
    tracing::info!(sessions = connections.len(), "shutting down");
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            sessions = connections.len(),
            "aborting sessions still running"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
    Ok(())
}

/// A parsed HTTP request head.
pub(crate) struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    /// The client's address (for the wrong-key throttle).
    peer: Option<std::net::IpAddr>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The bearer key, if the request carries one.
    fn bearer(&self) -> Option<&str> {
        let v = self.header("authorization")?;
        let (scheme, key) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
    }
}

/// Reads the request head; returns it and any bytes read past it.
async fn read_head<S>(stream: &mut S) -> Result<(Request, Vec<u8>)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| Error::Disconnected(e.to_string()))?;
        if n == 0 {
            return Err(Error::Disconnected(
                "closed before sending a request".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let request = Request {
                    method: req.method.unwrap_or("").to_owned(),
                    path: req.path.unwrap_or("").to_owned(),
                    headers: req
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_owned(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                    peer: None,
                };
                return Ok((request, buf[len..].to_vec()));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => continue,
            Ok(httparse::Status::Partial) => {
                return Err(Error::Protocol("request head too large".into()));
            }
            Err(e) => return Err(Error::Protocol(format!("bad HTTP request: {e}"))),
        }
    }
}

/// Writes a complete HTTP response with a JSON body and closes.
pub(crate) async fn respond<S>(stream: &mut S, status: u16, body: &serde_json::Value) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    answer(stream, status, None, body).await
}

/// Writes a `429` or `503` answer with `Retry-After` and a JSON body, and closes.
pub(crate) async fn respond_later<S>(
    stream: &mut S,
    status: u16,
    retry_after: Duration,
    body: &serde_json::Value,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    answer(stream, status, Some(retry_after), body).await
}

/// Writes one HTTP response (status, JSON body, `Retry-After` if given) and closes.
async fn answer<S>(
    stream: &mut S,
    status: u16,
    retry_after: Option<Duration>,
    body: &serde_json::Value,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let retry = retry_after.map_or(String::new(), |d| {
        format!("retry-after: {}\r\n", d.as_secs().max(1))
    });
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{retry}connection: close\r\n\r\n",
        body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    stream
        .write_all(&out)
        .await
        .map_err(|e| Error::Disconnected(e.to_string()))?;
    let _ = stream.shutdown().await;
    Ok(())
}

/// Why [`authenticate_throttled`] refused.
pub(crate) enum Refusal {
    /// The key was missing, wrong, or could not be checked: answer 401.
    Key(Error),
    /// Too many wrong keys from this address: answer 429 with this `Retry-After`.
    TooMany(Duration),
}

/// [`authenticate`] through the wrong-key throttle of the client's address.
pub(crate) async fn authenticate_throttled(
    state: &State,
    request: &Request,
) -> std::result::Result<Principal, Refusal> {
    let keys = &state.limits.keys;
    let ticket = match keys.admit(request.peer, std::time::Instant::now()) {
        throttle::Verdict::Check(ticket) => ticket,
        throttle::Verdict::Wait(wait) => {
            tracing::info!(peer = ?request.peer, "too many wrong keys; answered 429");
            return Err(Refusal::TooMany(wait));
        }
    };
    let result = authenticate(state, request).await;
    let wrong = matches!(&result, Err(e) if e.kind() == crate::ErrorKind::Auth);
    keys.done(ticket, wrong, std::time::Instant::now());
    result.map_err(Refusal::Key)
}

/// The `429` answer to an address that sent too many wrong keys.
pub(crate) async fn respond_too_many<S>(stream: &mut S, wait: Duration) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let message = format!(
        "too many wrong keys from this address; retry in {} s",
        wait.as_secs().max(1)
    );
    respond_later(stream, 429, wait, &serde_json::json!({ "error": message })).await
}

/// Authenticates the key a request carries. `Err` of kind [`crate::ErrorKind::Auth`]
/// is the refusal to send (401); any other is the server's own failure (503, see
/// [`refusal`]).
pub(crate) async fn authenticate(state: &State, request: &Request) -> Result<Principal> {
    let Some(key) = request.bearer().map(str::to_owned) else {
        return Err(Error::Auth(
            "missing key: send it as Authorization: Bearer <key>".into(),
        ));
    };
    let auth = state.auth.clone();
    let principal = tokio::task::spawn_blocking(move || auth.check(&key))
        .await
        .map_err(Error::from)
        .and_then(|checked| checked)
        .map_err(|e| fault::server_side(e, state.store.root()))?;
    principal.ok_or_else(|| Error::Auth("wrong key: this server does not know it".into()))
}

/// The HTTP status and body for a failed [`authenticate`]: 401 for a refused key, 503
/// (logged) when the server could not check it.
pub(crate) fn refusal(e: &Error) -> (u16, serde_json::Value) {
    if e.kind() == crate::ErrorKind::Auth {
        (401, serde_json::json!({"error": e.to_string()}))
    } else {
        tracing::error!(error = %e, "cannot check a key");
        (503, serde_json::json!({"error": e.to_string()}))
    }
}

/// One accepted connection: with TLS, the handshake first (bounded by `HEAD_TIMEOUT`,
/// in this connection's own task), then the request.
async fn serve_connection(stream: TcpStream, tls: Option<Tls>, state: Arc<State>) -> Result<()> {
    let peer = stream.peer_addr().ok().map(|a| a.ip());
    let Some(tls) = tls else {
        return connection(stream, state, peer).await;
    };
    let stream = tokio::time::timeout(HEAD_TIMEOUT, tls.accept(stream))
        .await
        .map_err(|_| Error::Disconnected("no TLS handshake within 10 s".into()))??;
    connection(stream, state, peer).await
}

async fn connection<S>(
    mut stream: S,
    state: Arc<State>,
    peer: Option<std::net::IpAddr>,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut request, rest) = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| Error::Disconnected("no request within 10 s".into()))??;
    request.peer = peer;
    let upgrade = request
        .header("upgrade")
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !upgrade {
        return http::route(&mut stream, &request, &state).await;
    }
    if request.path != "/v1/sync" {
        return respond(
            &mut stream,
            404,
            &serde_json::json!({"error": "WebSocket sessions live at /v1/sync"}),
        )
        .await;
    }
    let Some(ws_key) = request.header("sec-websocket-key").map(str::to_owned) else {
        return respond(
            &mut stream,
            400,
            &serde_json::json!({"error": "missing Sec-WebSocket-Key"}),
        )
        .await;
    };
    if !rest.is_empty() {
        return respond(
            &mut stream,
            400,
            &serde_json::json!({"error": "data sent before the upgrade"}),
        )
        .await;
    }
    // Every WebSocket session, subscribers included, holds a connection slot: past the
    // limit the upgrade is refused (503, retry later) before anything is allocated.
    let Ok(_connection) = state.limits.connections.clone().try_acquire_owned() else {
        let message = format!(
            "server busy: {} WebSocket sessions are open (its limit, {CONNECTIONS_PER_SESSION} × serve --max-sessions); retry later",
            state.limits.max_sessions() * CONNECTIONS_PER_SESSION
        );
        tracing::info!("too many WebSocket sessions; answered 503");
        return respond_later(
            &mut stream,
            503,
            BUSY_RETRY_AFTER,
            &serde_json::json!({ "error": message }),
        )
        .await;
    };
    let principal = match authenticate_throttled(&state, &request).await {
        Ok(p) => p,
        Err(Refusal::TooMany(wait)) => return respond_too_many(&mut stream, wait).await,
        Err(Refusal::Key(e)) => {
            let (status, body) = refusal(&e);
            return respond(&mut stream, status, &body).await;
        }
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(ws_key.as_bytes());
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
    );
    // Flushed, so a TLS stream does not keep the 101 in its buffer while the client
    // waits for it.
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| Error::Disconnected(e.to_string()))?;
    stream
        .flush()
        .await
        .map_err(|e| Error::Disconnected(e.to_string()))?;
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        stream,
        tokio_tungstenite::tungstenite::protocol::Role::Server,
        Some(crate::remote::ws::ws_config()),
    )
    .await;
    tracing::info!(key = %principal.key_id, kind = principal.kind.as_str(), "session opened");
    session::run(ws, &state, &principal).await;
    Ok(())
}
