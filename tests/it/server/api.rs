//! The HTTP API as a client meets it, byte for byte where it matters: status lines,
//! JSON bodies, `connection: close` (one request per connection: a client reading to
//! the end of the answer is not kept waiting), the 404 and 405 answers, and a key's
//! refusals. The server runs in this test process.

use std::io::{Read, Write};

use tempfile::TempDir;

use super::TestServer;

/// One raw HTTP/1.1 request; the status code, the head (lower-cased) and the body as
/// JSON.
fn request(server: &TestServer, head: &str) -> (u16, String, serde_json::Value) {
    let mut s = std::net::TcpStream::connect(server.addr()).expect("connect");
    write!(s, "{head}host: {}\r\n\r\n", server.addr()).expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read to the end");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    let status = head[9..12].parse().expect("a status code");
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"));
    (status, head.to_lowercase(), json)
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
