//! What a hostile or careless client can cost a real `sqlferry serve`, and that each
//! cost is bounded: a WANT asking for more node hashes than the protocol's window, a
//! pull client that floods the server with frames and never reads, wrong keys tried in
//! a hurry, more sync sessions than `--max-sessions`, a REPORT with a huge error text.
//! Memory is read from `/proc/PID/status` of the server process (VmHWM, the peak since
//! it was reset, against VmRSS before); after each case the server still serves a
//! normal push.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tempfile::TempDir;
use tokio_tungstenite::tungstenite::Message;

use super::raw::{End, connect, end, open, runtime, send};
use super::{Machine, TestServer, exec, saved_push_key, sidecar_field, small_db};

/// The most a hostile session may add to the server's resident memory.
const RSS_BOUND_KIB: u64 = 100 * 1024;

/// How long a session waits for a free slot in these tests (real time: keep it short).
const SESSION_WAIT: Duration = Duration::from_secs(1);

/// How long a send may wait before the test takes it that the server stopped reading.
const STALL: Duration = Duration::from_secs(2);

/// A kB field of `/proc/PID/status` (VmRSS, VmHWM), in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("server status");
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Starts a new peak for VmHWM (`/proc/PID/clear_refs`); returns VmRSS now.
fn memory_baseline(pid: u32) -> u64 {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset VmHWM");
    status_kib(pid, "VmRSS")
}

/// Asserts the server's peak since `baseline` stayed within [`RSS_BOUND_KIB`].
fn assert_memory_bounded(pid: u32, baseline: u64, what: &str) {
    let peak = status_kib(pid, "VmHWM");
    assert!(
        peak.saturating_sub(baseline) < RSS_BOUND_KIB,
        "{what}: the server grew from {baseline} KiB to a peak of {peak} KiB"
    );
}

/// The next binary message, `None` when the session is over.
async fn next(ws: &mut super::raw::Ws) -> Option<Vec<u8>> {
    loop {
        match tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("the server answers in time")
        {
            Some(Ok(Message::Binary(b))) => return Some(b.into()),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

/// A normal push of `db` (changed first) still works: the server serves on.
fn push_still_works(server: &TestServer, a: &Machine, replica: &str, key: &str) {
    exec(
        &a.path("app.db"),
        "CREATE TABLE IF NOT EXISTS after(x); INSERT INTO after VALUES (1);",
    );
    let report = a.push(server, "app.db", replica, &["--key", key]);
    assert!(report.u64("version") >= 2, "a new version after the attack");
}

fn want(level: u8, runs: &[(u32, u32)]) -> Vec<u8> {
    let mut out = vec![0x03, level];
    out.extend_from_slice(&(runs.len() as u16).to_be_bytes());
    for (start, count) in runs {
        out.extend_from_slice(&start.to_be_bytes());
        out.extend_from_slice(&count.to_be_bytes());
    }
    out
}

fn begin(page_size: u32, page_count: u32, base: u64) -> Vec<u8> {
    let mut out = vec![0x01, 0, 1];
    out.extend_from_slice(&page_size.to_be_bytes());
    out.extend_from_slice(&page_count.to_be_bytes());
    out.extend_from_slice(&base.to_be_bytes());
    out.push(0);
    out
}

/// One 32 KB WANT from a PUSH key asking for every page hash 4096 times over (4 Mi
/// hashes, 128 MiB): refused at once as more than the window, in bounded memory.
#[test]
fn a_want_past_the_window_ends_the_push_with_a_protocol_error() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let a = Machine::new(dir.path(), "a");
    small_db(&a.path("app.db"), 4 << 20);
    a.push(
        &server,
        "app.db",
        "acme/app.db",
        &["--key", &server.admin_key],
    );
    let push_key = saved_push_key(&a, &a.path("app.db"));
    let pages = crate::util::page_count(&a.path("app.db"));

    let baseline = memory_baseline(server.pid());
    let rt = runtime();
    let ended = rt.block_on(async {
        let mut ws = connect(&server, &push_key).await;
        open(
            &mut ws,
            json!({"protocol": 1, "op": "push", "replica": "acme/app.db", "base": 1,
                   "force": false, "client_id": "raw@test"}),
        )
        .await;
        assert!(send(&mut ws, begin(4096, pages, 1)).await);
        let ready = next(&mut ws).await.expect("READY");
        assert_eq!(ready[0], 0x02, "READY");
        let held = u32::from_be_bytes(ready[1..5].try_into().expect("u32"));
        assert_eq!(held, pages);
        // Never reading the answers: two WANTs of 4096 runs over every page.
        let runs = vec![(0u32, held); 4096];
        for _ in 0..2 {
            if !send(&mut ws, want(0, &runs)).await {
                break;
            }
        }
        end(&mut ws).await
    });
    let End::Error(code, message, _) = ended else {
        panic!("the session ended without an ERROR: {ended:?}");
    };
    assert_eq!(code, 1, "a protocol error: {message}");
    assert!(message.contains("window"), "says why: {message}");
    assert_memory_bounded(server.pid(), baseline, "a WANT past the window");
    assert_eq!(
        server.version_numbers("acme/app.db"),
        vec![1],
        "no version made"
    );
    push_still_works(&server, &a, "acme/app.db", &push_key);
}

/// A PULL key that answers READY, then sends 256 MiB of frames without reading the
/// pages: the server stops reading it (its queue is bounded), its memory stays flat,
/// and once the client reads, the session ends with a protocol error.
#[test]
fn a_pull_client_flooding_without_reading_costs_bounded_memory() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let a = Machine::new(dir.path(), "a");
    small_db(&a.path("app.db"), 16 << 20);
    a.push(
        &server,
        "app.db",
        "acme/app.db",
        &["--key", &server.admin_key],
    );
    let pull_key = sidecar_field(&a.path("app.db-sqlferry"), "key");

    let baseline = memory_baseline(server.pid());
    let rt = runtime();
    let (stalled, sent_mib, ended) = rt.block_on(async {
        let mut ws = connect(&server, &pull_key).await;
        open(
            &mut ws,
            json!({"protocol": 1, "op": "pull", "replica": "acme/app.db",
                   "version": "latest", "client_id": "raw@test"}),
        )
        .await;
        let first = next(&mut ws).await.expect("BEGIN");
        assert_eq!(first[0], 0x01, "BEGIN");
        assert!(send(&mut ws, vec![0x02, 0, 0, 0, 0]).await, "READY 0");
        let junk = vec![0x05; 80 * 1024];
        let mut sent = 0usize;
        let mut stalled = false;
        while sent < 256 << 20 {
            match tokio::time::timeout(STALL, ws.send(Message::Binary(junk.clone().into()))).await {
                Err(_) => {
                    stalled = true;
                    break;
                }
                Ok(Err(_)) => break,
                Ok(Ok(())) => sent += junk.len(),
            }
        }
        (stalled, sent >> 20, end(&mut ws).await)
    });
    assert_memory_bounded(server.pid(), baseline, "a pull client flooding");
    assert!(
        stalled,
        "the server read all {sent_mib} MiB a client sent without reading"
    );
    let End::Error(code, message, _) = ended else {
        panic!("the session ended without an ERROR: {ended:?}");
    };
    assert_eq!(code, 1, "a protocol error: {message}");
    push_still_works(&server, &a, "acme/app.db", &server.admin_key);
}

/// With `--max-sessions 1` and one pull holding the slot, a second pull waits (1 s
/// here; the exact 30 s default is checked in paused time in `timing.rs`), then is
/// told the server is busy (exit 10, an error subscribers retry); once the slot is
/// free, pulls work again.
#[test]
fn sessions_past_the_cap_are_told_the_server_is_busy() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process_limited(dir.path(), 1, SESSION_WAIT);
    let a = Machine::new(dir.path(), "a");
    small_db(&a.path("app.db"), 64 << 10);
    a.push(
        &server,
        "app.db",
        "acme/app.db",
        &["--key", &server.admin_key],
    );
    let b = Machine::new(dir.path(), "b");

    let rt = runtime();
    let held = rt.block_on(async {
        let mut ws = connect(&server, &server.admin_key).await;
        open(
            &mut ws,
            json!({"protocol": 1, "op": "pull", "replica": "acme/app.db",
                   "version": "latest", "client_id": "raw@test"}),
        )
        .await;
        // The slot is taken once CONFIG came: the session stays at BEGIN, unanswered.
        ws
    });
    let started = Instant::now();
    let out = b.run_on(
        &server,
        ["pull", "acme/app.db", "copy.db", "--key", &server.admin_key],
    );
    let waited = started.elapsed();
    super::assert_fails(&out, 10, "server busy");
    assert!(
        waited >= SESSION_WAIT,
        "the client waited for a slot first ({waited:?})"
    );
    assert!(!b.path("copy.db").exists(), "nothing written");
    // The error a subscriber gets is one it retries.
    let busy = sqlferry::Error::Remote {
        code: 13,
        message: "server busy".into(),
    };
    assert!(busy.is_retryable(), "ServerBusy is retryable");

    drop(held);
    b.pull(
        &server,
        "acme/app.db",
        Some("copy.db"),
        &["--key", &server.admin_key],
    );
    assert_eq!(
        crate::util::digest(&b.path("copy.db")),
        crate::util::digest(&a.path("app.db"))
    );
    // Versions and subscriptions take no slot: they are never refused for it.
    let held = rt.block_on(async {
        let mut ws = connect(&server, &server.admin_key).await;
        open(
            &mut ws,
            json!({"protocol": 1, "op": "pull", "replica": "acme/app.db",
                   "version": "latest", "client_id": "raw@test"}),
        )
        .await;
        ws
    });
    let out = b.run_on(
        &server,
        ["versions", "acme/app.db", "--key", &server.admin_key],
    );
    assert_eq!(crate::util::code(&out), 0, "{}", crate::util::stderr(&out));
    drop(held);
}

/// Sends a WebSocket upgrade with `key` from local address `from`; the status code of
/// the answer and its `Retry-After`, if any.
async fn upgrade_status(server: &TestServer, from: &str, key: &str) -> (u16, Option<u64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{from}:0").parse().expect("address"))
        .expect("bind");
    let mut stream = socket
        .connect(server.addr().parse().expect("server address"))
        .await
        .expect("connect");
    let request = format!(
        "GET /v1/sync HTTP/1.1\r\nhost: {}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         authorization: Bearer {key}\r\n\r\n",
        server.addr()
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head:?}"));
    let retry_after = head
        .lines()
        .find_map(|l| l.strip_prefix("retry-after:"))
        .and_then(|v| v.trim().parse().ok());
    (status, retry_after)
}

/// 100 wrong keys in a row from one address: the first ten are answered 401, then
/// (but for one refill every 2 s) 429 with Retry-After, the key unchecked. A right
/// key from another address works at once; from the slowed-down address it gets an
/// error a subscriber retries (exit 10).
#[test]
fn wrong_keys_are_slowed_down_per_address() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let a = Machine::new(dir.path(), "a");
    small_db(&a.path("app.db"), 64 << 10);
    a.push(
        &server,
        "app.db",
        "acme/app.db",
        &["--key", &server.admin_key],
    );
    let wrong = format!("sfk_{}", "0".repeat(64));

    let rt = runtime();
    let started = Instant::now();
    let answers: Vec<(u16, Option<u64>)> = rt.block_on(async {
        let mut out = Vec::new();
        for _ in 0..100 {
            out.push(upgrade_status(&server, "127.0.0.1", &wrong).await);
        }
        out
    });
    let elapsed = started.elapsed();
    let refused = answers.iter().filter(|(s, _)| *s == 401).count();
    let slowed = answers.iter().filter(|(s, _)| *s == 429).count();
    // Ten free, then one more per 2 s that the 100 attempts took.
    let allowed = 10 + (elapsed.as_secs() / 2) as usize + 1;
    assert!(
        refused <= allowed,
        "{refused} wrong keys answered in {elapsed:?}: not slowed down"
    );
    assert_eq!(refused + slowed, 100, "only 401 and 429: {answers:?}");
    assert!(
        answers
            .iter()
            .filter(|(s, _)| *s == 429)
            .all(|(_, r)| r.is_some_and(|r| (1..=2).contains(&r))),
        "every 429 says when to retry: {answers:?}"
    );

    let (status, _) = rt.block_on(upgrade_status(&server, "127.0.0.2", &server.admin_key));
    assert_eq!(
        status, 101,
        "a right key from another address is not slowed down"
    );
    // Wait for the refill a wrong key takes at once: the next one is 2 s away. Each
    // 429 says how long; waiting that long, not hammering, leaves the CPU to others.
    rt.block_on(async {
        loop {
            match upgrade_status(&server, "127.0.0.1", &wrong).await {
                (401, _) => break,
                (_, retry) => {
                    let wait = Duration::from_millis(retry.unwrap_or(1) * 1000 / 4);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    });
    let out = a.run_on(
        &server,
        ["versions", "acme/app.db", "--key", &server.admin_key],
    );
    super::assert_fails(&out, 10, "too many wrong keys");
}

/// `GET path` on the server's API with `key`; the JSON body.
fn api_get(server: &TestServer, path: &str, key: &str) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(server.addr()).expect("connect");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {key}\r\n\r\n",
        server.addr()
    )
    .expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    let body = answer.split_once("\r\n\r\n").expect("a head and a body").1;
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

/// A push subscriber sends 30 REPORTs of 60,000 bytes each: the server keeps the
/// error cut to 2048 bytes (and `…`), and logs one line, not thirty.
#[test]
fn a_long_report_is_cut_and_logged_at_a_bounded_rate() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let a = Machine::new(dir.path(), "a");
    small_db(&a.path("app.db"), 64 << 10);
    a.push(
        &server,
        "app.db",
        "acme/app.db",
        &["--key", &server.admin_key],
    );

    let rt = runtime();
    let reports = 30;
    let ws = rt.block_on(async {
        let mut ws = connect(&server, &server.admin_key).await;
        open(
            &mut ws,
            json!({"protocol": 1, "op": "subscribe", "replica": "acme/app.db",
                   "role": "push", "client_id": "raw@test"}),
        )
        .await;
        for i in 1..=reports {
            let report = json!({"failing_for": 600, "attempts": i, "error": "é".repeat(30_000)});
            let mut frame = vec![0x56];
            frame.extend_from_slice(report.to_string().as_bytes());
            assert!(send(&mut ws, frame).await, "REPORT {i} sent");
        }
        ws
    });
    let mut status = serde_json::Value::Null;
    assert!(
        crate::util::wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
            status = api_get(&server, "/api/replicas/acme/app.db", &server.admin_key);
            status["failure"]["attempts"] == reports
        }),
        "every REPORT arrived: {status}"
    );
    let error = status["failure"]["error"].as_str().expect("error text");
    assert!(
        error.len() <= 2048 + '…'.len_utf8() && error.ends_with('…'),
        "the error is cut: {} bytes",
        error.len()
    );
    assert!(error.starts_with("éé"), "cut on a character boundary");
    drop(ws);
    let logged = server
        .log()
        .matches("a push subscriber reports failing pushes")
        .count();
    assert_eq!(logged, 1, "one log line for {reports} REPORTs");
}

/// With `--max-sessions 1`, 32 WebSocket sessions of any kind may be open: a 33rd
/// upgrade (32 subscribers open) is answered 503 with Retry-After, the CLI exits 10,
/// and once a subscriber leaves, sessions are accepted again.
#[test]
fn websocket_sessions_past_the_cap_are_answered_503() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process_limited(dir.path(), 1, SESSION_WAIT);
    let a = Machine::new(dir.path(), "a");
    small_db(&a.path("app.db"), 64 << 10);
    a.push(
        &server,
        "app.db",
        "acme/app.db",
        &["--key", &server.admin_key],
    );

    let rt = runtime();
    let mut subscribers = rt.block_on(async {
        let mut all = Vec::new();
        for _ in 0..32 {
            let mut ws = connect(&server, &server.admin_key).await;
            open(
                &mut ws,
                json!({"protocol": 1, "op": "subscribe", "replica": "acme/app.db",
                       "role": "pull", "client_id": "raw@test"}),
            )
            .await;
            all.push(ws);
        }
        all
    });
    let (status, retry_after) =
        rt.block_on(upgrade_status(&server, "127.0.0.1", &server.admin_key));
    assert_eq!(status, 503, "the 33rd session is refused");
    assert_eq!(retry_after, Some(5), "with a Retry-After");
    let out = a.run_on(
        &server,
        ["versions", "acme/app.db", "--key", &server.admin_key],
    );
    super::assert_fails(&out, 10, "server busy");

    drop(subscribers.pop());
    assert!(
        crate::util::wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
            rt.block_on(upgrade_status(&server, "127.0.0.1", &server.admin_key))
                .0
                == 101
        }),
        "a session is accepted once a subscriber left"
    );
    drop(subscribers);
}
