//! The HTTP API as a client meets it, byte for byte where it matters: status lines,
//! JSON bodies, `connection: close` (one request per connection: a client reading to
//! the end of the answer is not kept waiting), the 404 and 405 answers, and a key's
//! refusals. The server runs in this test process.

use std::io::{Read, Write};

use tempfile::TempDir;

use super::{Machine, TestServer, exec, saved_push_key, sidecar_field, small_db};
use crate::util;

/// One raw HTTP/1.1 request; the status code, the head (lower-cased) and the body.
fn exchange(server: &TestServer, head: &str) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(server.addr()).expect("connect");
    write!(s, "{head}host: {}\r\n\r\n", server.addr()).expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read to the end");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    let status = head[9..12].parse().expect("a status code");
    (status, head.to_lowercase(), body.to_owned())
}

/// One raw HTTP/1.1 request; the status code, the head (lower-cased) and the body as
/// JSON.
fn request(server: &TestServer, head: &str) -> (u16, String, serde_json::Value) {
    let (status, head, body) = exchange(server, head);
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {head}{body}"));
    (status, head, json)
}

#[test]
fn the_api_answers_json_with_the_status_codes_it_documents() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let admin = format!("authorization: Bearer {}\r\n", server.admin_key);

    let (status, head, body) = request(&server, "GET /api/health HTTP/1.1\r\n");
    assert_eq!(status, 200);
    assert!(head.starts_with("http/1.1 200 ok"), "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body["status"], "ok");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));

    let (status, _, body) = request(
        &server,
        "POST /api/health HTTP/1.1\r\ncontent-length: 0\r\n",
    );
    assert_eq!((status, body["error"].as_str()), (405, Some("use GET")));

    let (status, _, body) = request(&server, "GET /nowhere HTTP/1.1\r\n");
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("no such endpoint: /nowhere"))
    );
    // A WebSocket upgrade anywhere but /v1/sync; /v1/sync without an upgrade.
    let (status, _, body) = request(
        &server,
        "GET /api/health HTTP/1.1\r\nupgrade: websocket\r\nconnection: Upgrade\r\n",
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("WebSocket sessions live at /v1/sync"))
    );
    let (status, _, body) = request(&server, "GET /v1/sync HTTP/1.1\r\n");
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("no such endpoint: /v1/sync"))
    );
    let (status, _, body) = request(
        &server,
        &format!("GET /v1/sync HTTP/1.1\r\nupgrade: websocket\r\nconnection: Upgrade\r\n{admin}"),
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("missing Sec-WebSocket-Key"))
    );

    let versions = "/api/replicas/acme/app.db/versions";
    let (status, _, body) = request(&server, &format!("POST {versions} HTTP/1.1\r\n{admin}"));
    assert_eq!(status, 405);
    assert_eq!(body["error"], format!("use GET for {versions}"));
    let (status, _, body) = request(&server, &format!("GET {versions} HTTP/1.1\r\n"));
    assert_eq!(status, 401);
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("missing key")),
        "{body}"
    );
    let (status, _, body) = request(
        &server,
        &format!(
            "GET {versions} HTTP/1.1\r\nauthorization: Bearer sfk_{}\r\n",
            "0".repeat(64)
        ),
    );
    assert_eq!(status, 401);
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("wrong key")),
        "{body}"
    );
    let (status, _, body) = request(&server, &format!("GET {versions} HTTP/1.1\r\n{admin}"));
    assert_eq!(status, 404, "{body}");
    let (status, _, body) = request(
        &server,
        &format!("GET /api/replicas/acme/../x/versions HTTP/1.1\r\n{admin}"),
    );
    assert_eq!(status, 400, "{body}");
    let (status, _, body) = request(
        &server,
        &format!("POST /api/replicas/acme/app.db/sync HTTP/1.1\r\ncontent-length: 0\r\n{admin}"),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["replica"], "acme/app.db");
    assert_eq!(body["reached"], 0);
}

#[test]
fn the_replica_list_shows_every_replica_to_the_admin_key_only() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let admin = format!("authorization: Bearer {}\r\n", server.admin_key);
    let (status, _, body) = request(&server, &format!("GET /api/replicas HTTP/1.1\r\n{admin}"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        serde_json::json!({"replicas": []}),
        "nothing pushed yet"
    );

    let m = Machine::new(dir.path(), "m");
    small_db(&m.path("app.db"), 20_000);
    let key = ["--key", server.admin_key.as_str()];
    m.push(&server, "app.db", "acme/app.db", &key);
    exec(
        &m.path("app.db"),
        "INSERT INTO t(k) VALUES ('second version')",
    );
    m.push(&server, "app.db", "acme/app.db", &key);
    small_db(&m.path("users.db"), 8_000);
    m.push(&server, "users.db", "acme/eu/users.db", &key);

    let size = u64::from(util::page_size(&m.path("app.db")))
        * u64::from(util::page_count(&m.path("app.db")));
    for path in ["/api/replicas", "/api/replicas/"] {
        let (status, head, body) = request(&server, &format!("GET {path} HTTP/1.1\r\n{admin}"));
        assert_eq!(status, 200, "{path}: {body}");
        assert!(head.contains("content-type: application/json"), "{head}");
        let list = body["replicas"].as_array().expect("a list");
        let names: Vec<&str> = list
            .iter()
            .map(|r| r["replica"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["acme/app.db", "acme/eu/users.db"], "{body}");
        let a = &list[0];
        assert_eq!(a["latest_version"], 2, "{a}");
        assert_eq!(a["version_count"], 2, "{a}");
        assert_eq!(a["size_bytes"], size, "{a}");
        assert_eq!(a["digest"], util::digest(&m.path("app.db")), "{a}");
        assert!(
            a["latest_at"].as_i64().is_some_and(|t| t > 1_700_000_000),
            "{a}"
        );
        for (field, value) in [
            ("push_subscribers", serde_json::json!(0)),
            ("pull_subscribers", serde_json::json!(0)),
            ("expected_push_at", serde_json::Value::Null),
            ("failure", serde_json::Value::Null),
            ("last_drill", serde_json::Value::Null),
        ] {
            assert_eq!(a[field], value, "{field}: {a}");
        }
        assert_eq!(a.get("versions"), None, "the list holds no versions: {a}");
        // The replica's stored bytes are the sum of what each version brought.
        let (status, _, versions) = request(
            &server,
            &format!("GET /api/replicas/acme/app.db/versions HTTP/1.1\r\n{admin}"),
        );
        assert_eq!(status, 200, "{versions}");
        let brought: u64 = versions
            .as_array()
            .expect("versions")
            .iter()
            .map(|v| v["stored_bytes"].as_u64().expect("stored_bytes"))
            .sum();
        assert!(brought > 0, "{versions}");
        assert_eq!(a["stored_bytes"], brought, "{a}\n{versions}");
        assert_eq!(
            (&list[1]["latest_version"], &list[1]["version_count"]),
            (&1.into(), &1.into())
        );
    }

    // One replica: the same summary, and its versions.
    let (_, _, list) = request(&server, &format!("GET /api/replicas HTTP/1.1\r\n{admin}"));
    let (status, _, one) = request(
        &server,
        &format!("GET /api/replicas/acme/app.db HTTP/1.1\r\n{admin}"),
    );
    assert_eq!(status, 200, "{one}");
    for (field, value) in list["replicas"][0].as_object().expect("an object") {
        assert_eq!(&one[field], value, "{field}: {one}");
    }
    let numbers: Vec<u64> = one["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| v["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2]);

    // PUSH and PULL keys may read their own replica, not the list.
    let push_key = saved_push_key(&m, &m.path("app.db"));
    let pull_key = sidecar_field(&m.path("app.db-sqlferry"), "key");
    for (kind, key) in [("PUSH", &push_key), ("PULL", &pull_key)] {
        let auth = format!("authorization: Bearer {key}\r\n");
        let (status, _, body) = request(&server, &format!("GET /api/replicas HTTP/1.1\r\n{auth}"));
        assert_eq!(status, 403, "{kind}: {body}");
        assert_eq!(
            body["error"],
            format!(
                "listing every replica needs the admin key; this {kind} key may read only its \
                 own replica, at /api/replicas/acme/app.db"
            )
        );
        let (status, _, body) = request(
            &server,
            &format!("GET /api/replicas/acme/app.db HTTP/1.1\r\n{auth}"),
        );
        assert_eq!(
            (status, &body["latest_version"]),
            (200, &2.into()),
            "{kind}: {body}"
        );
    }
    let (status, _, body) = request(&server, "GET /api/replicas HTTP/1.1\r\n");
    assert_eq!(status, 401, "{body}");
    let (status, _, body) = request(
        &server,
        &format!("POST /api/replicas HTTP/1.1\r\ncontent-length: 0\r\n{admin}"),
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (405, Some("use GET for /api/replicas"))
    );
}

#[test]
fn the_dashboard_files_need_no_key_and_keep_the_page_to_itself() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    for (path, content_type) in [
        ("/", "text/html; charset=utf-8"),
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/app.css", "text/css; charset=utf-8"),
        ("/favicon.svg", "image/svg+xml"),
    ] {
        let (status, head, body) = exchange(&server, &format!("GET {path} HTTP/1.1\r\n"));
        assert_eq!(status, 200, "{path}: {head}");
        for line in [
            format!("content-type: {content_type}"),
            "content-security-policy: default-src 'self';".to_owned(),
            "x-content-type-options: nosniff".to_owned(),
            "x-frame-options: deny".to_owned(),
            "referrer-policy: no-referrer".to_owned(),
            "connection: close".to_owned(),
        ] {
            assert!(head.contains(&line), "{path} says {line}: {head}");
        }
        // Nothing from elsewhere: no CDN, no remote font. (The icon's only URL is its
        // XML namespace's name, which nothing fetches.)
        let urls = body.matches("https://").count() + body.matches("http://").count();
        let namespace = usize::from(path == "/favicon.svg");
        assert_eq!(urls, namespace, "{path}: {body}");
        if path == "/" {
            assert!(
                body.contains(r#"<script src="/app.js" defer></script>"#),
                "{body}"
            );
            assert!(
                body.contains(r#"<link rel="stylesheet" href="/app.css">"#),
                "{body}"
            );
            // No inline script or style: the policy would block them.
            assert_eq!(body.matches("<script").count(), 1, "{body}");
            assert!(
                !body.contains("style=") && !body.contains("<style"),
                "{body}"
            );
        }
    }
    let (status, _, body) = request(&server, "POST / HTTP/1.1\r\ncontent-length: 0\r\n");
    assert_eq!((status, body["error"].as_str()), (405, Some("use GET")));
}
