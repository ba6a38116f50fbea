//! The server's HTTP face, an axum router (HTTPS when the server has TLS):
//!
//! - `GET /v1/sync` with `Upgrade: websocket`: a WebSocket session, once the key in
//!   `Authorization: Bearer` is checked (the `session` module runs it).
//! - `GET /api/health`: `{"status": "ok", "version": "…", "server_id": "…"}`, no key
//!   needed; the id is the one CONFIG carries (clients match saved keys by it).
//! - `GET /api/replicas` (or `/api/replicas/`): every replica's summary (the `api`
//!   module), with the admin key only.
//! - `GET /api/replicas/<namespace>/<name>/versions`: the replica's versions, with a
//!   key allowed to pull it (`Authorization: Bearer <key>`).
//! - `GET /api/replicas/<namespace>/<name>`: the replica's summary (its latest version
//!   and what the hub knows: subscribers connected, the push a subscriber announced
//!   (CHANGED), the failures it reported) and its versions.
//! - `POST /api/replicas/<namespace>/<name>/sync`: ask every running subscriber to sync
//!   now (PUSH or admin key); answers at once with how many were reached.
//! - `GET /`, `/app.js`, `/app.css`, `/favicon.svg`: the dashboard (the `dashboard`
//!   module), static files that hold no data and need no key.
//! - `GET /metrics`: the Prometheus text format (the `metrics` module), with the admin
//!   key, when the server runs with `--metrics` (404 otherwise); and without a key on
//!   the second listener of `--metrics-listen` ([`metrics_router`]).
//!
//! Errors are JSON too: `{"error": "…"}` with the matching status code; a failure of
//! the server's own files (a full disk) is `503`, never `401`; any other failure of the
//! server, a panicking handler included, is `500`. A WebSocket upgrade anywhere but
//! `/v1/sync` is `404`.
//!
//! The replica routes take the rest of the path as one piece: a replica path is
//! `namespace/name`, checked by [`ReplicaPath::parse`] after the key (so a bad path
//! gets its own 400 message, not a bare 404), exactly as the WebSocket OPEN is.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Extension, Request, State as With};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use futures_util::FutureExt as _;
use serde_json::json;

use super::{
    BUSY_RETRY_AFTER, CONNECTIONS_PER_SESSION, KeyKind, Peer, Principal, State, Status, Tasks, api,
    fault, session, throttle,
};
use crate::protocol::control::Op;
use crate::store::{Latest, ReplicaPath};
use crate::transport::ws::ws_config;
use crate::{Error, ErrorKind, Result};

/// What every handler shares: the server's state and its task owner (a WebSocket
/// session runs in a task of its own, owned like the connections).
#[derive(Clone)]
struct Ctx {
    state: Arc<State>,
    tasks: Tasks,
}

/// The router of one server.
pub(super) fn router(state: Arc<State>, tasks: Tasks) -> Router {
    Router::new()
        .route("/v1/sync", any(sync))
        .route("/api/health", any(health))
        .route("/api/replicas", any(replicas))
        .route("/api/replicas/", any(replicas))
        .route("/api/replicas/{*replica}", any(replica))
        .merge(super::dashboard::routes())
        .route("/metrics", any(metrics_with_key))
        .fallback(no_such_endpoint)
        .layer(middleware::from_fn(upgrades_only_at_sync))
        .layer(middleware::from_fn(panic_is_500))
        .layer(middleware::from_fn(one_request_per_connection))
        .with_state(Ctx {
            state,
            tasks: tasks.clone(),
        })
}

/// The router of the metrics listener (`serve --metrics-listen`): `GET /metrics`
/// without a key, and nothing else.
pub(super) fn metrics_router(state: Arc<State>) -> Router {
    Router::new()
        .route("/metrics", any(metrics_open))
        .fallback(no_such_endpoint)
        .layer(middleware::from_fn(panic_is_500))
        .layer(middleware::from_fn(one_request_per_connection))
        .with_state(Ctx {
            state,
            tasks: Tasks::default(),
        })
}

/// `GET /metrics` on the main port: only with `serve --metrics`, and only to the admin
/// key (the port may face the world; replica names are not for everyone).
async fn metrics_with_key(
    With(ctx): With<Ctx>,
    Extension(peer): Extension<Peer>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    if !ctx.state.metrics_on_main {
        return error(
            StatusCode::NOT_FOUND,
            "no such endpoint: /metrics (start the server with --metrics, or --metrics-listen ADDR)",
        );
    }
    if method != Method::GET {
        return error(StatusCode::METHOD_NOT_ALLOWED, "use GET");
    }
    let principal = match authenticate_throttled(&ctx.state, peer, &headers).await {
        Ok(p) => p,
        Err(refusal) => return refusal.into_response(),
    };
    if principal.kind != super::KeyKind::Admin {
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "only the admin key may read /metrics; this is a {} key",
                principal.kind.as_str().to_uppercase()
            ),
        );
    }
    metrics(&ctx.state).await
}

/// `GET /metrics` on the metrics listener: no key (see [`metrics_router`]).
async fn metrics_open(With(ctx): With<Ctx>, method: Method) -> Response {
    if method != Method::GET {
        return error(StatusCode::METHOD_NOT_ALLOWED, "use GET");
    }
    metrics(&ctx.state).await
}

/// The metrics as the text format: counters from memory, replicas' gauges from each
/// replica's latest version row (on the blocking pool), the hub and the drills.
async fn metrics(state: &Arc<State>) -> Response {
    use super::metrics::{ReplicaGauges, ServerGauges, render};
    let s = state.clone();
    let gathered = super::blocking(move || {
        let drills = s.drills.all();
        // The largest lag of each replica's followers (those that reported a version).
        let lags: std::collections::HashMap<String, u64> = s
            .hub
            .followers_by_replica(crate::epoch::now())
            .into_iter()
            .filter_map(|(r, f)| Some((r, f.iter().filter_map(|f| f.lag_seconds).max()?)))
            .collect();
        let mut out = Vec::new();
        for replica in s.replicas()? {
            let latest = match s.store.latest(&replica) {
                Ok(v) => v.map(|l| (l.version.number, l.version.created_at)),
                Err(e) if e.kind() == ErrorKind::NotFound => None,
                Err(e) => return Err(e),
            };
            out.push(ReplicaGauges {
                latest,
                stored_bytes: s.store.stored_bytes(&replica).ok(),
                follower_lag_seconds: lags.get(replica.as_str()).map(|&l| l as f64),
                drill: drills
                    .get(replica.as_str())
                    .map(|d| (d.at, d.ok, d.seconds)),
                replica: replica.to_string(),
            });
        }
        Ok(out)
    })
    .await;
    let replicas = match gathered {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot gather the metrics");
            return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
        }
    };
    let (push_subscribers, pull_subscribers) = state.hub.subscriber_totals();
    let server = ServerGauges {
        active_sessions: state.limits.active_sessions() as u64,
        push_subscribers,
        pull_subscribers,
        object_requests: state.store.object_requests(),
    };
    let text = render(&state.metrics, server, &replicas, crate::epoch::now());
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// A response with a JSON body.
fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// A `429` or `503` answer with `Retry-After` (whole seconds, at least 1).
fn answer_later(status: StatusCode, retry_after: Duration, body: serde_json::Value) -> Response {
    let mut response = answer(status, body);
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(retry_after.as_secs().max(1)),
    );
    response
}

/// `{"error": message}` with `status`.
pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    answer(status, json!({ "error": message.into() }))
}

/// Whether a request asks for a WebSocket upgrade.
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// A WebSocket upgrade anywhere but `/v1/sync` is answered 404 saying where sessions
/// live.
async fn upgrades_only_at_sync(request: Request, next: Next) -> Response {
    if is_upgrade(request.headers()) && request.uri().path() != "/v1/sync" {
        return error(StatusCode::NOT_FOUND, "WebSocket sessions live at /v1/sync");
    }
    next.run(request).await
}

/// Every answer but a WebSocket upgrade closes its connection (`connection: close`,
/// which hyper honours): one request per connection, as this API always had, so a
/// client reading the answer to its end is not kept waiting. (hyper's own keep-alive
/// switch would also turn the upgrade's `connection: Upgrade` into `close`.)
async fn one_request_per_connection(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A handler that panics is answered 500 with a JSON body (and logged), rather than
/// leaving the client with a dropped connection.
async fn panic_is_500(request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    match std::panic::AssertUnwindSafe(next.run(request))
        .catch_unwind()
        .await
    {
        Ok(response) => response,
        Err(_) => {
            tracing::error!(%path, "a request handler panicked");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error: the server failed on this request; see its log",
            )
        }
    }
}

async fn no_such_endpoint(request: Request) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {}", request.uri().path()),
    )
}

async fn health(With(ctx): With<Ctx>, method: Method) -> Response {
    if method != Method::GET {
        return error(StatusCode::METHOD_NOT_ALLOWED, "use GET");
    }
    answer(
        StatusCode::OK,
        json!({
            "status": "ok",
            "version": env!("CARGO_PKG_VERSION"),
            "server_id": ctx.state.server_id,
        }),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Versions,
    Status,
    Sync,
}

/// The replica API: versions, status and sync-now.
async fn replica(
    With(ctx): With<Ctx>,
    Extension(peer): Extension<Peer>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let state = &ctx.state;
    let path = uri.path();
    let rest = path.strip_prefix("/api/replicas/").unwrap_or_default();
    let (replica, endpoint, op, allowed) = if let Some(r) = rest.strip_suffix("/versions") {
        (r, Endpoint::Versions, Op::Pull, Method::GET)
    } else if let Some(r) = rest.strip_suffix("/sync") {
        (r, Endpoint::Sync, Op::SyncNow, Method::POST)
    } else {
        (rest, Endpoint::Status, Op::Pull, Method::GET)
    };
    if method != allowed {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("use {allowed} for {path}"),
        );
    }
    let principal = match authenticate_throttled(state, peer, &headers).await {
        Ok(p) => p,
        Err(refusal) => return refusal.into_response(),
    };
    let replica = match ReplicaPath::parse(replica) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Err(e) = principal.authorize(op, &replica) {
        return error(StatusCode::FORBIDDEN, e.to_string());
    }
    if endpoint == Endpoint::Sync {
        let reach = match super::relay::sync_now(state, replica.as_str()).await {
            Ok(reach) => reach,
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        };
        tracing::info!(%replica, reached = reach.reached, servers = reach.servers,
            silent = reach.silent, key = %principal.key_id, "sync now (HTTP)");
        return answer(
            StatusCode::OK,
            json!({"replica": replica.as_str(), "reached": reach.reached,
                   "servers": reach.servers, "silent_servers": reach.silent}),
        );
    }
    let (store, r) = (state.store.clone(), replica.clone());
    // The version list carries each version's stored bytes, as `versions --json` does;
    // the status needs only the rows.
    let with_bytes = endpoint == Endpoint::Versions;
    let versions = super::blocking(move || {
        let versions = if with_bytes {
            store.versions_with_stored_bytes(&r)
        } else {
            store.versions(&r)
        }
        .map_err(|e| fault::server_side(e, store.root()))?;
        // The summary's total: kept by the store until the versions change.
        let stored = (!with_bytes).then(|| store.stored_bytes(&r).ok()).flatten();
        Ok((versions, stored))
    })
    .await;
    let (versions, stored_bytes) = match versions {
        Ok(v) => v,
        // A replica with subscribers but no version yet still has a status.
        Err(e) if e.kind() == ErrorKind::NotFound && endpoint == Endpoint::Status => {
            (Vec::new(), None)
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return error(StatusCode::NOT_FOUND, e.to_string());
        }
        Err(e) if e.kind() == ErrorKind::Server || e.kind() == ErrorKind::Bug => {
            tracing::error!(%replica, key = %principal.key_id, error = %e, "API request failed");
            return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
        }
        Err(e) => {
            tracing::error!(%replica, key = %principal.key_id, error = %e, "API request failed");
            return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
        }
    };
    if endpoint == Endpoint::Versions {
        return answer(StatusCode::OK, json!(versions));
    }
    let status = state.hub.status(replica.as_str());
    if versions.is_empty() && status == Status::default() {
        return error(
            StatusCode::NOT_FOUND,
            format!("replica {replica} has no version and no subscriber"),
        );
    }
    let latest = versions.last().map(|v| Latest {
        version: v.clone(),
        count: versions.len() as u64,
    });
    let drill = state.drills.last(replica.as_str());
    let mut summary = api::summary(replica.as_str(), latest.as_ref(), status, drill);
    summary.stored_bytes = stored_bytes;
    let mut body = json!(summary);
    body["versions"] = json!(versions);
    answer(StatusCode::OK, body)
}

/// The list of every replica's summary: admin key only.
async fn replicas(
    With(ctx): With<Ctx>,
    Extension(peer): Extension<Peer>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let state = &ctx.state;
    if method != Method::GET {
        return error(StatusCode::METHOD_NOT_ALLOWED, "use GET for /api/replicas");
    }
    let principal = match authenticate_throttled(state, peer, &headers).await {
        Ok(p) => p,
        Err(refusal) => return refusal.into_response(),
    };
    if principal.kind != KeyKind::Admin {
        let own = principal.replica.as_deref().unwrap_or("namespace/name");
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "listing every replica needs the admin key; this {} key may read only its \
                 own replica, at /api/replicas/{own}",
                principal.kind.as_str().to_uppercase()
            ),
        );
    }
    let s = state.clone();
    let listed = super::blocking(move || {
        s.replicas()
            .and_then(|replicas| api::list(&s.store, replicas, &s.hub, &s.drills))
            .map_err(|e| fault::server_side(e, s.store.root()))
    })
    .await;
    match listed {
        Ok(summaries) => answer(StatusCode::OK, json!({ "replicas": summaries })),
        Err(e) => {
            tracing::error!(key = %principal.key_id, error = %e, "listing the replicas failed");
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

/// The WebSocket upgrade on `/v1/sync`: checked (a connection slot, then the key)
/// before it is accepted; the session then runs in a task of its own.
async fn sync(
    With(ctx): With<Ctx>,
    Extension(peer): Extension<Peer>,
    mut request: Request,
) -> Response {
    let state = ctx.state.clone();
    if !is_upgrade(request.headers()) {
        return no_such_endpoint(request).await;
    }
    // Taken now: the request itself (its body is not `Sync`) is not held across an
    // `.await`.
    let upgrade = hyper::upgrade::on(&mut request);
    let headers = std::mem::take(request.headers_mut());
    drop(request);
    let Some(ws_key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return error(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    };
    // Every WebSocket session, subscribers included, holds a connection slot: past the
    // limit the upgrade is refused (503, retry later) before anything is allocated.
    let Ok(slot) = state.limits.connections.clone().try_acquire_owned() else {
        let message = format!(
            "server busy: {} WebSocket sessions are open (its limit, {CONNECTIONS_PER_SESSION} × serve --max-sessions); retry later",
            state.limits.max_sessions() * CONNECTIONS_PER_SESSION
        );
        tracing::info!("too many WebSocket sessions; answered 503");
        return answer_later(
            StatusCode::SERVICE_UNAVAILABLE,
            BUSY_RETRY_AFTER,
            json!({ "error": message }),
        );
    };
    let principal = match authenticate_throttled(&state, peer, &headers).await {
        Ok(p) => p,
        Err(refusal) => return refusal.into_response(),
    };
    ctx.tasks.spawn(async move {
        let upgraded = match upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::info!(error = %e, "the WebSocket upgrade failed");
                return;
            }
        };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            Some(ws_config()),
        )
        .await;
        tracing::info!(key = %principal.key_id, kind = principal.kind.as_str(), "session opened");
        session::run(ws, &state, &principal).await;
        drop(slot);
    });
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(ws_key.as_bytes());
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::UPGRADE, "websocket".to_owned()),
            (header::CONNECTION, "Upgrade".to_owned()),
            (header::SEC_WEBSOCKET_ACCEPT, accept),
        ],
    )
        .into_response()
}

/// Why [`authenticate_throttled`] refused.
enum Refusal {
    /// The key was missing or wrong: 401.
    Key(Error),
    /// The server could not check the key (its own files failed): 503, logged.
    Server(Error),
    /// Too many wrong keys from this address: 429 with this `Retry-After`.
    TooMany(Duration),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Key(e) => error(StatusCode::UNAUTHORIZED, e.to_string()),
            Refusal::Server(e) => {
                tracing::error!(error = %e, "cannot check a key");
                error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            Refusal::TooMany(wait) => {
                let message = format!(
                    "too many wrong keys from this address; retry in {} s",
                    wait.as_secs().max(1)
                );
                answer_later(
                    StatusCode::TOO_MANY_REQUESTS,
                    wait,
                    json!({ "error": message }),
                )
            }
        }
    }
}

/// The key a request carries in `Authorization: Bearer`.
fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim().to_owned())
}

/// [`authenticate`] through the wrong-key throttle of the client's address.
async fn authenticate_throttled(
    state: &State,
    Peer(peer): Peer,
    headers: &HeaderMap,
) -> std::result::Result<Principal, Refusal> {
    let keys = &state.limits.keys;
    let ticket = match keys.admit(peer, Instant::now()) {
        throttle::Verdict::Check(ticket) => ticket,
        throttle::Verdict::Wait(wait) => {
            tracing::info!(?peer, "too many wrong keys; answered 429");
            return Err(Refusal::TooMany(wait));
        }
    };
    let result = authenticate(state, headers).await;
    let wrong = matches!(&result, Err(e) if e.kind() == ErrorKind::Auth);
    keys.done(ticket, wrong, Instant::now());
    result.map_err(|e| {
        if e.kind() == ErrorKind::Auth {
            Refusal::Key(e)
        } else {
            Refusal::Server(e)
        }
    })
}

/// Authenticates the key a request carries. `Err` of kind [`ErrorKind::Auth`] is the
/// refusal to send (401); any other is the server's own failure (503).
async fn authenticate(state: &State, headers: &HeaderMap) -> Result<Principal> {
    let Some(key) = bearer(headers) else {
        return Err(Error::Auth(
            "missing key: send it as Authorization: Bearer <key>".into(),
        ));
    };
    let (auth, root) = (state.auth.clone(), state.store.root().to_owned());
    let principal =
        super::blocking(move || auth.check(&key).map_err(|e| fault::server_side(e, &root))).await?;
    principal.ok_or_else(|| Error::Auth("wrong key: this server does not know it".into()))
}
