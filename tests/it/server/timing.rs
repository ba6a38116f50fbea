//! The server's time bounds, under `tokio::time::pause`: a server in this test's own
//! (current-thread, paused) runtime, raw WebSocket clients beside it. Time moves only
//! when every task waits on a timer (never while store work runs on a blocking thread),
//! so a 10 s or 30 s bound is checked in no time at all, and exactly: the session ends
//! no sooner than the bound, with the error a user would see.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use tempfile::TempDir;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::raw::{Ws, connect_url, open_frame, send};
use sqlferry::protocol::Frame;
use sqlferry::server::{SESSION_WAIT, State, serve};
use sqlferry::shutdown::Shutdown;

/// A bound on a test's waits in paused time: far past every server bound, free to
/// wait out.
const PAUSED_LIMIT: Duration = Duration::from_secs(3600);

/// A server on this runtime (port 0, data in `dir`); its `ws://` URL, its admin key,
/// and what stops it. Stopped on drop of the [`Running`].
struct Running {
    url: String,
    admin_key: String,
    shutdown: Shutdown,
    served: Option<tokio::task::JoinHandle<sqlferry::Result<()>>>,
}

impl Running {
    async fn start(dir: &std::path::Path, max_sessions: usize) -> Running {
        Running::start_with(dir, max_sessions, None).await
    }

    async fn start_with(
        dir: &std::path::Path,
        max_sessions: usize,
        tls: Option<sqlferry::server::Tls>,
    ) -> Running {
        let state = State::open(&dir.join("server-data"))
            .expect("server state")
            .with_max_sessions(max_sessions, SESSION_WAIT);
        let admin_key = state
            .auth
            .ensure_admin()
            .expect("admin key")
            .expect("a new admin key");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("ws://{}", listener.local_addr().expect("address"));
        let shutdown = Shutdown::new();
        let served = tokio::spawn(serve(listener, state, tls, shutdown.clone()));
        Running {
            url,
            admin_key,
            shutdown,
            served: Some(served),
        }
    }

    /// A forced stop, waited for: the server task ends cleanly.
    async fn stop(mut self) {
        self.shutdown.force();
        let served = self.served.take().expect("running");
        served.await.expect("joined").expect("a clean stop");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.force();
    }
}

/// The next binary message; `None` once the session is over.
async fn next(ws: &mut Ws) -> Option<Vec<u8>> {
    loop {
        match tokio::time::timeout(PAUSED_LIMIT, ws.next())
            .await
            .expect("the server answers within the paused limit")
        {
            Some(Ok(Message::Binary(b))) => return Some(b.into()),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

/// The ERROR frame a session ends with: code and message.
async fn error_frame(ws: &mut Ws) -> (u16, String) {
    let frame = next(ws).await.expect("an ERROR frame");
    match Frame::decode(&frame) {
        Ok(Frame::Error { code, message }) => (code, message),
        other => panic!("ERROR expected, got {other:?}"),
    }
}

/// OPEN of a push of `replica` by the admin key: the server answers CONFIG and then
/// waits for the push's frames, holding a session slot.
fn push_open(replica: &str) -> Vec<u8> {
    open_frame(&json!({"protocol": 1, "op": "push", "replica": replica,
                       "client_id": "raw@test"}))
}

/// A client that upgrades and then sends no OPEN is told so after 10 s, not sooner.
#[tokio::test(start_paused = true)]
async fn a_session_without_open_ends_after_10_s_with_an_error() {
    let dir = TempDir::new().expect("tempdir");
    let server = Running::start(dir.path(), 1).await;
    let mut ws = connect_url(&server.url, &server.admin_key).await;
    let started = Instant::now();
    let (code, message) = error_frame(&mut ws).await;
    assert!(
        started.elapsed() >= Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(code, 1, "a protocol error: {message}");
    assert!(message.contains("no OPEN frame within 10 s"), "{message}");
    assert_eq!(next(&mut ws).await, None, "then the session is over");
    server.stop().await;
}

/// With one session slot taken, the next push waits the whole session wait (30 s by
/// default) for it, then gets ERROR 13, server busy; once the slot is free, a push is
/// served again.
#[tokio::test(start_paused = true)]
async fn a_session_past_the_cap_waits_30_s_then_is_told_the_server_is_busy() {
    let dir = TempDir::new().expect("tempdir");
    let server = Running::start(dir.path(), 1).await;
    let mut holder = connect_url(&server.url, &server.admin_key).await;
    assert!(send(&mut holder, push_open("acme/app.db")).await);
    let config = next(&mut holder).await.expect("CONFIG");
    assert_eq!(config[0], 0x51, "CONFIG: the slot is taken");

    let mut late = connect_url(&server.url, &server.admin_key).await;
    let started = Instant::now();
    assert!(send(&mut late, push_open("acme/app.db")).await);
    let (code, message) = error_frame(&mut late).await;
    assert!(started.elapsed() >= SESSION_WAIT, "{:?}", started.elapsed());
    assert_eq!(code, 13, "ServerBusy: {message}");
    assert!(message.contains("server busy"), "{message}");
    assert!(message.contains("serve --max-sessions"), "{message}");

    // The holder leaves: its slot is free again.
    drop(holder);
    let mut next_one = connect_url(&server.url, &server.admin_key).await;
    assert!(send(&mut next_one, push_open("acme/app.db")).await);
    let config = next(&mut next_one).await.expect("CONFIG");
    assert_eq!(config[0], 0x51, "CONFIG once the slot is free");
    server.stop().await;
}

/// A graceful stop lets a session in flight run for the grace, then drops it; the
/// server's task ends and nothing was committed (the push never finished).
#[tokio::test(start_paused = true)]
async fn a_graceful_stop_waits_the_grace_then_drops_what_is_left() {
    let dir = TempDir::new().expect("tempdir");
    let mut server = Running::start(dir.path(), 1).await;
    let mut ws = connect_url(&server.url, &server.admin_key).await;
    assert!(send(&mut ws, push_open("acme/app.db")).await);
    assert_eq!(next(&mut ws).await.expect("CONFIG")[0], 0x51);
    let started = Instant::now();
    server.shutdown.begin();
    let served = server.served.take().expect("running");
    served.await.expect("joined").expect("a clean stop");
    assert!(
        started.elapsed() >= sqlferry::server::SHUTDOWN_GRACE,
        "the session had its grace: {:?}",
        started.elapsed()
    );
    assert_eq!(next(&mut ws).await, None, "the session was dropped");
    let store = sqlferry::store::Store::new(dir.path().join("server-data"));
    let replica = sqlferry::store::ReplicaPath::parse("acme/app.db").expect("path");
    assert!(store.versions(&replica).is_err(), "no version was made");
}

/// A client that connects and sends no request head is closed after 10 s, not
/// sooner: it holds no one up meanwhile (another request is answered at once).
#[tokio::test(start_paused = true)]
async fn a_connection_without_a_request_is_closed_after_10_s() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = TempDir::new().expect("tempdir");
    let server = Running::start(dir.path(), 1).await;
    let addr = server.url.trim_start_matches("ws://").to_owned();
    let mut silent = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let started = Instant::now();

    let mut other = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    other
        .write_all(b"GET /api/health HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .expect("send");
    let mut answer = String::new();
    other.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered at once"
    );

    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(PAUSED_LIMIT, silent.read(&mut byte))
        .await
        .expect("closed within the paused limit");
    assert!(matches!(read, Ok(0) | Err(_)), "closed: {read:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    server.stop().await;
}

/// A client that connects to a TLS server and never starts its handshake is closed
/// after 10 s, and the server's log says why.
#[tokio::test(start_paused = true)]
async fn a_stalled_tls_handshake_is_closed_after_10_s() {
    use tokio::io::AsyncReadExt;
    let dir = TempDir::new().expect("tempdir");
    let certs = super::tls::Certs::make(dir.path());
    let tls = sqlferry::server::Tls::from_pem_files(&certs.cert, &certs.key).expect("TLS");
    // The server's log, caught: the server runs on this thread.
    let log = Log::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(log.clone())
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let server = Running::start_with(dir.path(), 1, Some(tls)).await;
    let addr = server.url.trim_start_matches("ws://").to_owned();
    let mut stalled = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let started = Instant::now();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(PAUSED_LIMIT, stalled.read(&mut byte))
        .await
        .expect("closed within the paused limit");
    // Closed by the server: an end of file, or an error such as a reset.
    assert!(matches!(read, Ok(0) | Err(_)), "closed: {read:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    server.stop().await;
    let logged = log.text();
    assert!(logged.contains("no TLS handshake within 10 s"), "{logged}");
}

/// A log writer into memory.
#[derive(Clone, Default)]
struct Log(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log lock")).into_owned()
    }
}

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Log {
    type Writer = Log;
    fn make_writer(&'a self) -> Log {
        self.clone()
    }
}
