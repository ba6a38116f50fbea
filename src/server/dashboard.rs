//! The dashboard: a web page served at `/` by `sqlferry serve` itself, with its script,
//! style sheet and icon, all embedded in the binary (`include_str!`; no build step, no
//! CDN). The page holds no data: its script asks the JSON API for it with the admin
//! key the user types in, kept in the browser tab's `sessionStorage` and sent only in
//! `Authorization: Bearer` (never in a URL). So these routes need no key.
//!
//! Every answer carries headers that keep the page to itself: a Content-Security-Policy
//! of `default-src 'self'` (no inline script or style, nothing from elsewhere, no
//! framing, no form posting anywhere), `X-Content-Type-Options: nosniff`, no referrer,
//! and `Cache-Control: no-cache` so a new server binary's page is seen at once.

use axum::Router;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;

/// The page, its script, style sheet and icon.
const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");
const FAVICON_SVG: &str = include_str!("dashboard/favicon.svg");

/// What the page may load and do: only its own files and the API on this server.
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The dashboard's routes, for the server's router.
pub(super) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            any(|m: Method| async move { asset(&m, "text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/app.js",
            any(|m: Method| async move { asset(&m, "text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/app.css",
            any(|m: Method| async move { asset(&m, "text/css; charset=utf-8", APP_CSS) }),
        )
        .route(
            "/favicon.svg",
            any(|m: Method| async move { asset(&m, "image/svg+xml", FAVICON_SVG) }),
        )
}

/// One embedded file with the dashboard's headers; GET or HEAD only.
fn asset(method: &Method, content_type: &'static str, body: &'static str) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return super::http::error(StatusCode::METHOD_NOT_ALLOWED, "use GET");
    }
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CACHE_CONTROL, "no-cache"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}
