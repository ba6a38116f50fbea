//! A raw WebSocket client (tokio-tungstenite, the key in `Authorization: Bearer`)
//! sends what no sqlferry client would: garbage, truncated and malformed frames, a
//! page-sync frame before OPEN, text, an oversized message, frames out of order, a
//! digest that does not match, a connection dropped half-way. Each time the session
//! ends (an ERROR frame, or the connection closed), no version appears, and the server
//! keeps serving: the next session works.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{DbState, Machine, TestServer, small_db};
use sqlferry::protocol::Frame;

/// A frame may be this big and no bigger (`docs/protocol.md`).
const MAX_FRAME_BYTES: usize = 81_920;

/// How long a session may take to end after a bad frame. The server answers at once;
/// this only bounds a failing test.
const END_TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A single-threaded runtime for the raw client.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Opens a WebSocket session on `/v1/sync` with `key`.
pub(crate) async fn connect(server: &TestServer, key: &str) -> Ws {
    connect_url(&server.url, key).await
}

/// Opens a WebSocket session on `/v1/sync` of the server at `url` with `key`.
pub(crate) async fn connect_url(url: &str, key: &str) -> Ws {
    let mut request = format!("{url}/v1/sync")
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("header value"),
    );
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("WebSocket upgrade");
    ws
}

/// Sends one binary message; whether it went out (the server may have closed).
pub(crate) async fn send(ws: &mut Ws, bytes: Vec<u8>) -> bool {
    ws.send(Message::Binary(bytes.into())).await.is_ok()
}

/// OPEN with a JSON payload.
pub(crate) fn open_frame(json: &serde_json::Value) -> Vec<u8> {
    let mut out = vec![0x50];
    out.extend_from_slice(json.to_string().as_bytes());
    out
}

/// The next binary message, `None` when the session is over (close, reset, EOF).
pub(crate) async fn next(ws: &mut Ws) -> Option<Vec<u8>> {
    loop {
        match tokio::time::timeout(END_TIMEOUT, ws.next())
            .await
            .expect("the server answers in time")
        {
            Some(Ok(Message::Binary(b))) => return Some(b.into()),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

/// Sends OPEN and returns the CONFIG the server answers with (as JSON).
pub(crate) async fn open(ws: &mut Ws, json: serde_json::Value) -> serde_json::Value {
    assert!(send(ws, open_frame(&json)).await, "OPEN sent");
    let config = next(ws).await.expect("an answer to OPEN");
    assert_eq!(
        config[0],
        0x51,
        "CONFIG expected, got {:?}",
        String::from_utf8_lossy(&config)
    );
    serde_json::from_slice(&config[1..]).expect("CONFIG is JSON")
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum End {
    /// An ERROR frame with this code and message, then as many more ERROR frames as
    /// the third field says, then the close.
    Error(u16, String, usize),
    /// The connection closed without an ERROR frame.
    Closed,
}

/// Reads until the session ends: the first ERROR frame if one comes (counting any
/// that follow it), skipping other frames.
pub(super) async fn end(ws: &mut Ws) -> End {
    let mut first = None;
    let mut more = 0;
    while let Some(frame) = next(ws).await {
        if frame.first() == Some(&0x08) {
            let Ok(Frame::Error { code, message }) = Frame::decode(&frame) else {
                panic!("a malformed ERROR frame: {frame:?}");
            };
            match first {
                None => first = Some((code, message)),
                Some(_) => more += 1,
            }
        } else {
            assert!(first.is_none(), "a frame after ERROR: {frame:?}");
        }
    }
    match first {
        Some((code, message)) => End::Error(code, message, more),
        None => End::Closed,
    }
}

fn begin(version: u16, page_size: u32, page_count: u32, base: u64) -> Vec<u8> {
    let mut out = vec![0x01];
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&page_size.to_be_bytes());
    out.extend_from_slice(&page_count.to_be_bytes());
    out.extend_from_slice(&base.to_be_bytes());
    out.push(0);
    out
}

fn page(pgno: u32, data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x05];
    out.extend_from_slice(&pgno.to_be_bytes());
    out.extend_from_slice(data);
    out
}

fn commit(page_count: u32, digest: [u8; 32]) -> Vec<u8> {
    let mut out = vec![0x06];
    out.extend_from_slice(&page_count.to_be_bytes());
    out.extend_from_slice(&digest);
    out
}

/// What a misbehaving client sends, step by step.
#[derive(Debug, Clone)]
enum Step {
    /// A binary message.
    Send(Vec<u8>),
    /// A text message.
    Text(&'static str),
    /// Wait for a frame of this type from the server.
    Expect(u8),
    /// Drop the connection (TCP close, no WebSocket close).
    Drop,
}

/// A case: what it is, the steps after connecting, and how the session must end:
/// `Some(code)` an ERROR with that code, `None` an ERROR of code 1 or a close.
struct Case {
    what: &'static str,
    steps: Vec<Step>,
    want: Option<u16>,
}

/// The server's latest version of `replica` in a session of its own: proof that the
/// server still serves, and that nothing was added.
async fn latest(server: &TestServer, replica: &str) -> (u64, Option<String>) {
    let mut ws = connect(server, &server.admin_key).await;
    let config = open(
        &mut ws,
        json!({"protocol": 1, "op": "versions", "replica": replica, "client_id": "raw@test"}),
    )
    .await;
    let versions = config["versions"].as_array().cloned().unwrap_or_default();
    let digest = versions
        .last()
        .map(|v| v["digest"].as_str().expect("digest").to_owned());
    (config["version"].as_u64().expect("version"), digest)
}

/// Runs `case` on a fresh session with the admin key; how it ended.
async fn run_case(server: &TestServer, case: &Case) -> End {
    let mut ws = connect(server, &server.admin_key).await;
    for step in &case.steps {
        match step {
            Step::Send(bytes) => {
                // A refused frame may close the session before the next one goes out.
                if !send(&mut ws, bytes.clone()).await {
                    break;
                }
            }
            Step::Text(t) => {
                if ws.send(Message::Text((*t).into())).await.is_err() {
                    break;
                }
            }
            Step::Expect(ty) => {
                let frame = next(&mut ws).await.unwrap_or_else(|| {
                    panic!("{}: the session ended before frame 0x{ty:02x}", case.what)
                });
                assert_eq!(
                    frame[0],
                    *ty,
                    "{}: got {:?}",
                    case.what,
                    String::from_utf8_lossy(&frame)
                );
            }
            Step::Drop => {
                drop(ws);
                return End::Closed;
            }
        }
    }
    end(&mut ws).await
}

fn push_open(replica: &str, base: Option<u64>) -> Vec<u8> {
    open_frame(&json!({
        "protocol": 1, "op": "push", "replica": replica, "base": base,
        "force": false, "client_id": "raw@test",
    }))
}

fn pull_open(replica: &str) -> Vec<u8> {
    open_frame(&json!({
        "protocol": 1, "op": "pull", "replica": replica, "version": "latest",
        "client_id": "raw@test",
    }))
}

#[test]
fn malformed_oversized_and_out_of_order_frames_end_the_session_and_change_nothing() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let a = Machine::new(dir.path(), "a");
    let src = a.path("app.db");
    small_db(&src, 64 << 10);
    a.push(
        &server,
        "app.db",
        "acme/raw.db",
        &["--key", &server.admin_key],
    );
    let v1 = DbState::of(&src);
    let pages = v1.hashes.len() as u32;
    let files_before = server.replica_files();

    use Step::{Drop, Expect, Send, Text};
    let after_config = |steps: Vec<Step>| {
        let mut all = vec![Send(push_open("acme/raw.db", Some(1))), Expect(0x51)];
        all.extend(steps);
        all
    };
    let in_sync = |steps: Vec<Step>| {
        after_config([vec![Send(begin(1, 4096, pages, 1)), Expect(0x02)], steps].concat())
    };
    let mut oversized_open = open_frame(&json!({"protocol": 1, "op": "versions"}));
    oversized_open.resize(MAX_FRAME_BYTES + 1, b' ');
    let cases = [
        Case {
            what: "garbage bytes",
            steps: vec![Send(vec![0xde, 0xad, 0xbe, 0xef])],
            want: Some(1),
        },
        Case {
            what: "an empty message",
            steps: vec![Send(vec![])],
            want: Some(1),
        },
        Case {
            what: "OPEN with no payload",
            steps: vec![Send(vec![0x50])],
            want: Some(1),
        },
        Case {
            what: "truncated OPEN",
            steps: vec![Send(br#"P{"protocol": 1, "op": "push", "repl"#.to_vec())],
            want: Some(1),
        },
        Case {
            what: "OPEN that is not JSON",
            steps: vec![Send(b"Pnot json at all".to_vec())],
            want: Some(1),
        },
        Case {
            what: "OPEN with an unknown op",
            steps: vec![Send(open_frame(
                &json!({"protocol": 1, "op": "delete", "replica": "acme/raw.db"}),
            ))],
            want: Some(1),
        },
        Case {
            what: "OPEN of protocol version 2",
            steps: vec![Send(open_frame(
                &json!({"protocol": 2, "op": "push", "replica": "acme/raw.db"}),
            ))],
            want: Some(1),
        },
        Case {
            what: "CONFIG from the client",
            steps: vec![Send(
                br#"Q{"replica_id":"x","path":"acme/raw.db","version":9,"key_type":"admin"}"#
                    .to_vec(),
            )],
            want: Some(1),
        },
        Case {
            what: "BEGIN before OPEN",
            steps: vec![Send(begin(1, 4096, pages, 1))],
            want: Some(1),
        },
        Case {
            what: "COMMIT before OPEN",
            steps: vec![Send(commit(1, [0; 32]))],
            want: Some(1),
        },
        Case {
            what: "a text message",
            steps: vec![Text("hello")],
            want: Some(1),
        },
        Case {
            what: "an oversized OPEN",
            steps: vec![Send(oversized_open)],
            want: None,
        },
        Case {
            what: "COMMIT right after CONFIG",
            steps: after_config(vec![Send(commit(pages, v1_digest(&v1)))]),
            want: Some(1),
        },
        Case {
            what: "a second OPEN",
            steps: after_config(vec![Send(push_open("acme/raw.db", Some(1)))]),
            want: Some(1),
        },
        Case {
            what: "KEYREQUEST with a payload",
            steps: after_config(vec![Send(vec![0x53, 0])]),
            want: Some(1),
        },
        Case {
            what: "a truncated COMMITMESSAGE",
            steps: after_config(vec![Send(vec![0x54, 0, 5, b'a'])]),
            want: Some(1),
        },
        Case {
            what: "a COMMITMESSAGE over 4096 bytes",
            steps: after_config(vec![Send(
                [vec![0x54, 0x10, 0x01], vec![b'm'; 4097]].concat(),
            )]),
            want: Some(1),
        },
        Case {
            what: "a truncated BEGIN",
            steps: after_config(vec![Send(begin(1, 4096, pages, 1)[..10].to_vec())]),
            want: Some(1),
        },
        Case {
            what: "BEGIN of protocol version 2",
            steps: after_config(vec![Send(begin(2, 4096, pages, 1))]),
            want: Some(1),
        },
        Case {
            what: "BEGIN with a page size that is not a power of two",
            steps: after_config(vec![Send(begin(1, 1000, pages, 1))]),
            want: Some(1),
        },
        Case {
            what: "a text message after CONFIG",
            steps: after_config(vec![Text("hello")]),
            want: Some(1),
        },
        Case {
            what: "an oversized message after CONFIG",
            steps: after_config(vec![Send(vec![0x05; MAX_FRAME_BYTES + 1])]),
            want: None,
        },
        Case {
            what: "KEYREQUEST inside the page sync",
            steps: in_sync(vec![Send(vec![0x53])]),
            want: Some(1),
        },
        Case {
            what: "a page past BEGIN's page count",
            steps: in_sync(vec![Send(page(pages + 1, &[0; 4096]))]),
            want: Some(1),
        },
        Case {
            what: "a page of the wrong size",
            steps: in_sync(vec![Send(page(1, &[0; 512]))]),
            want: Some(1),
        },
        Case {
            what: "a second BEGIN",
            steps: in_sync(vec![Send(begin(1, 4096, pages, 1))]),
            want: Some(1),
        },
        Case {
            what: "COMMIT for another page count",
            steps: in_sync(vec![Send(commit(pages + 1, [0; 32]))]),
            want: Some(1),
        },
        Case {
            what: "an oversized PAGE inside the page sync",
            steps: in_sync(vec![Send(page(2, &vec![0; MAX_FRAME_BYTES]))]),
            want: None,
        },
        Case {
            what: "a text message inside the page sync",
            steps: in_sync(vec![Text("hello")]),
            want: None,
        },
        Case {
            what: "a changed page, then COMMIT with a digest that does not match",
            steps: in_sync(vec![
                Send(page(2, &[7; 4096])),
                Send(commit(pages, v1_digest(&v1))),
            ]),
            want: Some(5),
        },
        Case {
            what: "the connection dropped after a changed page",
            steps: in_sync(vec![Send(page(2, &[7; 4096])), Drop]),
            want: None,
        },
        Case {
            what: "a pull answered with garbage instead of READY",
            steps: vec![
                Send(pull_open("acme/raw.db")),
                Expect(0x51),
                Expect(0x01),
                Send(vec![0xde, 0xad]),
            ],
            want: Some(1),
        },
        Case {
            what: "a pull answered with a PAGE",
            steps: vec![
                Send(pull_open("acme/raw.db")),
                Expect(0x51),
                Expect(0x01),
                Send(page(1, &[0; 4096])),
            ],
            want: Some(1),
        },
    ];

    let rt = runtime();
    let mut report = Vec::new();
    for case in &cases {
        let ended = rt.block_on(run_case(&server, case));
        match (&ended, case.want) {
            (End::Error(code, message, _), Some(want)) => {
                assert_eq!(*code, want, "{}: ERROR {code} {message}", case.what);
                assert!(!message.is_empty(), "{}: the ERROR says why", case.what);
            }
            (End::Error(code, message, _), None) => {
                assert_eq!(*code, 1, "{}: ERROR {code} {message}", case.what);
            }
            (End::Closed, None) => {}
            (End::Closed, Some(want)) => {
                panic!("{}: closed without the ERROR {want} frame", case.what)
            }
        }
        report.push(format!("{}: {ended:?}", case.what));
        // The server still serves, and the replica is still at version 1.
        let (latest, digest) = rt.block_on(latest(&server, "acme/raw.db"));
        assert_eq!(
            (latest, digest.as_deref()),
            (1, Some(v1.digest.as_str())),
            "after {}",
            case.what
        );
    }
    eprintln!("how each session ended:\n{}", report.join("\n"));
    assert_eq!(server.replica_files(), files_before, "no file added");

    // Right after, a real client pushes and pulls as usual.
    super::exec(&src, "UPDATE t SET v = randomblob(300) WHERE id = 3");
    let v2 = DbState::of(&src);
    let r = a.push(&server, "app.db", "acme/raw.db", &[]);
    assert_eq!(r.u64("version"), 2);
    let b = Machine::new(dir.path(), "b");
    b.pull(
        &server,
        "acme/raw.db",
        Some("back.db"),
        &["--key", &server.admin_key],
    );
    v2.assert_held_by(&b.path("back.db"), "pulled after the bad sessions");
}

/// A failed first push of a replica, by the admin key, leaves no replica behind: it
/// still does not exist for `versions` and `pull`, and no file was made for it.
#[test]
fn a_failed_first_push_creates_no_replica() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let b = Machine::new(dir.path(), "b");
    let rt = runtime();
    for (what, steps) in [
        ("garbage after CONFIG", vec![Step::Send(vec![0xde, 0xad])]),
        (
            "a digest that does not match",
            vec![
                Step::Send(begin(1, 4096, 1, 0)),
                Step::Expect(0x02),
                Step::Send(page(1, &[7; 4096])),
                Step::Send(commit(1, [0; 32])),
            ],
        ),
        (
            "the connection dropped",
            vec![
                Step::Send(begin(1, 4096, 1, 0)),
                Step::Expect(0x02),
                Step::Drop,
            ],
        ),
    ] {
        let case = Case {
            what,
            steps: [
                vec![
                    Step::Send(push_open("acme/fresh.db", None)),
                    Step::Expect(0x51),
                ],
                steps,
            ]
            .concat(),
            want: None,
        };
        rt.block_on(run_case(&server, &case));
        let out = b.run_on(
            &server,
            ["pull", "acme/fresh.db", "--key", &server.admin_key],
        );
        super::assert_fails(&out, super::EXIT_NOT_FOUND, "does not exist");
        assert_eq!(
            server.versions("acme/fresh.db"),
            None,
            "after {what}: `versions` says the replica does not exist"
        );
        assert_eq!(
            server.replica_files(),
            Vec::<std::path::PathBuf>::new(),
            "after {what}: no replica file"
        );
    }
}

/// A refused frame is answered with one ERROR frame, then the close: not two.
#[test]
fn a_refused_frame_gets_one_error_frame() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let a = Machine::new(dir.path(), "a");
    small_db(&a.path("app.db"), 16 << 10);
    a.push(
        &server,
        "app.db",
        "acme/one.db",
        &["--key", &server.admin_key],
    );
    let rt = runtime();
    for case in [
        Case {
            what: "push: COMMIT right after CONFIG",
            steps: vec![
                Step::Send(push_open("acme/one.db", Some(1))),
                Step::Expect(0x51),
                Step::Send(commit(1, [0; 32])),
            ],
            want: Some(1),
        },
        Case {
            what: "pull: garbage instead of READY",
            steps: vec![
                Step::Send(pull_open("acme/one.db")),
                Step::Expect(0x51),
                Step::Expect(0x01),
                Step::Send(vec![0xde, 0xad]),
            ],
            want: Some(1),
        },
    ] {
        let ended = rt.block_on(run_case(&server, &case));
        let End::Error(code, message, more) = ended else {
            panic!("{}: no ERROR frame", case.what);
        };
        assert_eq!(Some(code), case.want, "{}: {message}", case.what);
        assert_eq!(
            more,
            0,
            "{}: {} ERROR frames for one refusal",
            case.what,
            more + 1
        );
    }
}

fn v1_digest(v1: &DbState) -> [u8; 32] {
    let mut out = [0; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&v1.digest[2 * i..2 * i + 2], 16).expect("hex digest");
    }
    out
}
