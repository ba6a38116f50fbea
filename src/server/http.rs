//! The server's small JSON API over HTTP (HTTPS when the server has TLS).
//!
//! - `GET /api/health`: `{"status": "ok", "version": "…"}`, no key needed.
//! - `GET /api/replicas/<namespace>/<name>/versions`: the replica's versions, with a
//!   key allowed to pull it (`Authorization: Bearer <key>`).
//! - `GET /api/replicas/<namespace>/<name>`: the replica's latest version and what the
//!   hub knows: subscribers connected, the push a subscriber announced (CHANGED), the
//!   failures it reported.
//! - `POST /api/replicas/<namespace>/<name>/sync`: ask every running subscriber to sync
//!   now (PUSH or admin key); answers at once with how many were reached.
//!
//! Errors are JSON too: `{"error": "…"}` with the matching status code; a failure of
//! the server's own files (a full disk) is `503`, never `401` or `500`.

use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    Refusal, Request, State, Status, authenticate_throttled, fault, refusal, respond,
    respond_too_many,
};
use crate::protocol::control::Op;
use crate::store::ReplicaPath;
use crate::{ErrorKind, Result};

/// Answers one API request.
pub(super) async fn route<S>(stream: &mut S, request: &Request, state: &State) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let path = request.path.split('?').next().unwrap_or("");
    let method = request.method.as_str();
    if path == "/api/health" {
        if method != "GET" {
            return respond(stream, 405, &json!({"error": "use GET"})).await;
        }
        return respond(
            stream,
            200,
            &json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}),
        )
        .await;
    }
    let Some(rest) = path.strip_prefix("/api/replicas/") else {
        return respond(
            stream,
            404,
            &json!({"error": format!("no such endpoint: {path}")}),
        )
        .await;
    };
    let (replica, endpoint, op, allowed) = if let Some(r) = rest.strip_suffix("/versions") {
        (r, Endpoint::Versions, Op::Pull, "GET")
    } else if let Some(r) = rest.strip_suffix("/sync") {
        (r, Endpoint::Sync, Op::SyncNow, "POST")
    } else {
        (rest, Endpoint::Status, Op::Pull, "GET")
    };
    if method != allowed {
        return respond(
            stream,
            405,
            &json!({"error": format!("use {allowed} for {path}")}),
        )
        .await;
    }
    let principal = match authenticate_throttled(state, request).await {
        Ok(p) => p,
        Err(Refusal::TooMany(wait)) => return respond_too_many(stream, wait).await,
        Err(Refusal::Key(e)) => {
            let (status, body) = refusal(&e);
            return respond(stream, status, &body).await;
        }
    };
    let replica = match ReplicaPath::parse(replica) {
        Ok(r) => r,
        Err(e) => return respond(stream, 400, &json!({"error": e.to_string()})).await,
    };
    if let Err(e) = principal.authorize(op, &replica) {
        return respond(stream, 403, &json!({"error": e.to_string()})).await;
    }
    if endpoint == Endpoint::Sync {
        let reached = state.hub.sync_now(replica.as_str());
        tracing::info!(%replica, reached, key = %principal.key_id, "sync now (HTTP)");
        return respond(
            stream,
            200,
            &json!({"replica": replica.as_str(), "reached": reached}),
        )
        .await;
    }
    let store = state.store.clone();
    let r = replica.clone();
    let versions = tokio::task::spawn_blocking(move || store.versions(&r))
        .await
        .map_err(crate::Error::from)
        .and_then(|v| v)
        .map_err(|e| fault::server_side(e, state.store.root()));
    let versions = match versions {
        Ok(v) => v,
        // A replica with subscribers but no version yet still has a status.
        Err(e) if e.kind() == ErrorKind::NotFound && endpoint == Endpoint::Status => Vec::new(),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return respond(stream, 404, &json!({"error": e.to_string()})).await;
        }
        Err(e) if e.kind() == ErrorKind::Server || e.kind() == ErrorKind::Bug => {
            tracing::error!(%replica, key = %principal.key_id, error = %e, "API request failed");
            return respond(stream, 503, &json!({"error": e.to_string()})).await;
        }
        Err(e) => return respond(stream, 500, &json!({"error": e.to_string()})).await,
    };
    if endpoint == Endpoint::Versions {
        return respond(stream, 200, &json!(versions)).await;
    }
    let status = state.hub.status(replica.as_str());
    if versions.is_empty() && status == Status::default() {
        return respond(
            stream,
            404,
            &json!({"error": format!("replica {replica} has no version and no subscriber")}),
        )
        .await;
    }
    let latest = versions.last();
    let mut body = json!(status);
    body["replica"] = replica.as_str().into();
    body["latest_version"] = json!(latest.map(|v| v.number));
    body["latest_at"] = json!(latest.map(|v| v.created_at));
    respond(stream, 200, &body).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Versions,
    Status,
    Sync,
}
