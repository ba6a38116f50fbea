//! The server's small JSON API over HTTP (HTTPS when the server has TLS).
//!
//! - `GET /api/health`: `{"status": "ok", "version": "…"}`, no key needed.
//! - `GET /api/replicas/<namespace>/<name>/versions`: the replica's versions, with a
//!   key allowed to pull it (`Authorization: Bearer <key>`).
//!
//! Errors are JSON too: `{"error": "…"}` with the matching status code.

use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Request, State, authenticate, respond};
use crate::protocol::control::Op;
use crate::store::ReplicaPath;
use crate::{ErrorKind, Result};

/// Answers one API request.
pub(super) async fn route<S>(stream: &mut S, request: &Request, state: &State) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    if request.method != "GET" {
        return respond(stream, 405, &json!({"error": "only GET is supported here"})).await;
    }
    let path = request.path.split('?').next().unwrap_or("");
    if path == "/api/health" {
        return respond(
            stream,
            200,
            &json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}),
        )
        .await;
    }
    let Some(replica) = path
        .strip_prefix("/api/replicas/")
        .and_then(|p| p.strip_suffix("/versions"))
    else {
        return respond(
            stream,
            404,
            &json!({"error": format!("no such endpoint: {path}")}),
        )
        .await;
    };
    let principal = match authenticate(state, request).await {
        Ok(p) => p,
        Err(e) => return respond(stream, 401, &json!({"error": e.to_string()})).await,
    };
    let replica = match ReplicaPath::parse(replica) {
        Ok(r) => r,
        Err(e) => return respond(stream, 400, &json!({"error": e.to_string()})).await,
    };
    if let Err(e) = principal.authorize(Op::Pull, &replica) {
        return respond(stream, 403, &json!({"error": e.to_string()})).await;
    }
    let store = state.store.clone();
    let versions = tokio::task::spawn_blocking(move || store.versions(&replica))
        .await
        .map_err(|e| crate::Error::Protocol(e.to_string()))?;
    match versions {
        Ok(v) => respond(stream, 200, &json!(v)).await,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            respond(stream, 404, &json!({"error": e.to_string()})).await
        }
        Err(e) => respond(stream, 500, &json!({"error": e.to_string()})).await,
    }
}
