//! The server's session state machine fuzzed over a real connection: proptest makes
//! arbitrary sequences of frames (well-formed page-sync frames with plausible and
//! implausible fields, control frames, truncated and random bytes, compressed pages:
//! real ones, bombs and garbage, in sessions that agreed to compression or not) and sends each
//! sequence on its own WebSocket session to a real `sqlferry serve`, with the admin key
//! or a PULL key, as a push, a pull or no OPEN at all, reading whatever comes back.
//!
//! Whatever a case sends, the session ends by itself once the client closes (no hang),
//! the server keeps running and serving, no version appears and no replica file is
//! added, and its peak memory stays bounded. Then a real client pushes and pulls.
//!
//! `SQLFERRY_FUZZ_CASES` sets the number of sequences (default 64, a few seconds, from a fixed seed so CI sees the same sequences every
//! run; with the variable set the seed is random); a
//! long run is `SQLFERRY_FUZZ_CASES=20000 cargo test --test it server::fuzz`
//! (docs/trust.md records how long it ran without a finding).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRng, TestRunner};
use serde_json::json;
use tempfile::TempDir;
use tokio_tungstenite::tungstenite::Message;

use super::raw::{connect, open_frame, runtime};
use super::{Machine, TestServer, small_db};
use sqlferry::protocol::{Frame, Run};

/// Sequences per run unless `SQLFERRY_FUZZ_CASES` says otherwise.
const DEFAULT_CASES: u32 = 64;

/// How long a session may take to end once the client has closed its side. The server
/// notices at once; this only bounds a failing test.
const END_TIMEOUT: Duration = Duration::from_secs(20);

/// The server's peak resident set after the whole run may not pass this.
const PEAK_RSS_KIB: u64 = 256 * 1024;

/// What one case sends after connecting.
#[derive(Debug, Clone)]
struct Case {
    /// Use the PULL key instead of the admin key.
    pull_key: bool,
    /// The OPEN frame, if any.
    open: Option<serde_json::Value>,
    /// A well-formed BEGIN of this many pages right after OPEN, so that many sequences
    /// reach the page sync's own states, not only the session's front door.
    begin: Option<u32>,
    /// The messages after OPEN.
    messages: Vec<Vec<u8>>,
}

fn page_size() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => Just(4096u32),
        1 => Just(512u32),
        1 => Just(65536u32),
        1 => any::<u32>(),
    ]
}

fn small_u32() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0u32..80, 1 => any::<u32>()]
}

fn hash() -> impl Strategy<Value = [u8; 32]> {
    prop_oneof![Just([0u8; 32]), any::<[u8; 32]>()]
}

/// A page-sync frame, well formed on the wire, with fields an honest peer would and
/// would not send.
fn frame() -> impl Strategy<Value = Frame> {
    let runs = prop::collection::vec(
        (small_u32(), small_u32()).prop_map(|(start, count)| Run { start, count }),
        0..6,
    );
    prop_oneof![
        (page_size(), small_u32(), 0u64..6, any::<u8>()).prop_map(
            |(page_size, page_count, base_version, flags)| Frame::Begin {
                version: 1,
                page_size,
                page_count,
                base_version,
                flags,
            }
        ),
        small_u32().prop_map(|page_count| Frame::Ready { page_count }),
        (0u8..6, runs).prop_map(|(level, runs)| Frame::Want { level, runs }),
        (0u8..6, small_u32(), prop::collection::vec(hash(), 0..20)).prop_map(
            |(level, start, hashes)| Frame::Nodes {
                level,
                start,
                hashes
            }
        ),
        (
            small_u32(),
            prop_oneof![Just(4096usize), 0usize..600],
            any::<u8>()
        )
            .prop_map(|(pgno, len, fill)| {
                let mut data = vec![fill; len];
                if pgno == 1 && len >= 16 {
                    data[..16].copy_from_slice(b"SQLite format 3\0");
                }
                Frame::Page { pgno, data }
            }),
        (small_u32(), hash()).prop_map(|(page_count, digest)| Frame::Commit { page_count, digest }),
        (small_u32(), hash()).prop_map(|(pages_written, digest)| Frame::Done {
            pages_written,
            digest
        }),
        (any::<u16>(), ".{0,40}").prop_map(|(code, message)| Frame::Error { code, message }),
        (any::<u8>(), ".{0,40}").prop_map(|(level, text)| Frame::Message { level, text }),
    ]
}

/// One message: an encoded frame, a truncated one, a control frame, or random bytes.
fn message() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => frame().prop_map(|f| {
            let mut out = Vec::new();
            f.encode(&mut out);
            out
        }),
        1 => (frame(), any::<prop::sample::Index>()).prop_map(|(f, cut)| {
            let mut out = Vec::new();
            f.encode(&mut out);
            let keep = cut.index(out.len());
            out.truncate(keep.max(1));
            out
        }),
        1 => (0x50u8..0x58, prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(t, rest)| {
            let mut out = vec![t];
            out.extend(rest);
            out
        }),
        1 => prop::collection::vec(any::<u8>(), 0..200),
        // ZPAGE (compressed PAGE): a real one (a page of one byte, or a bomb of up to
        // 1 MiB), or zstd's magic followed by garbage.
        1 => (1u32..8, 9u32..=20, any::<u8>()).prop_map(|(pgno, shift, fill)| {
            let mut out = vec![0x0a];
            out.extend_from_slice(&pgno.to_be_bytes());
            out.extend(zstd::bulk::compress(&vec![fill; 1 << shift], 1).expect("zstd"));
            out
        }),
        1 => (small_u32(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(pgno, rest)| {
            let mut out = vec![0x0a];
            out.extend_from_slice(&pgno.to_be_bytes());
            out.extend_from_slice(&[0x28, 0xb5, 0x2f, 0xfd]);
            out.extend(rest);
            out
        }),
    ]
}

fn open() -> impl Strategy<Value = Option<serde_json::Value>> {
    let replica = prop_oneof![
        6 => Just("acme/fuzz.db".to_owned()),
        1 => Just("acme/fuzz-new.db".to_owned()),
        1 => "[a-z/.]{0,12}",
    ];
    let op = prop_oneof![
        3 => Just("push"),
        3 => Just("pull"),
        1 => Just("versions"),
        1 => Just("subscribe"),
        1 => Just("sync-now"),
        1 => Just("delete"),
    ];
    prop_oneof![
        8 => (op, replica, prop_oneof![4 => Just(1u64), 1 => 0u64..4], any::<bool>(), any::<bool>()).prop_map(|(op, replica, base, force, zstd)| Some({
            let mut open = json!({"protocol": 1, "op": op, "replica": replica, "base": base,
                   "force": force, "version": "latest", "role": "pull",
                   "client_id": "fuzz@test"});
            // Half the sessions agree to compressed pages: ZPAGEs are expanded first.
            if zstd {
                open["compress"] = json!(["zstd"]);
            }
            open
        })),
        1 => Just(None),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::bool::weighted(0.25),
        open(),
        prop::option::of(small_u32()),
        prop::collection::vec(message(), 0..24),
    )
        .prop_map(|(pull_key, open, begin, messages)| Case {
            pull_key,
            open,
            begin,
            messages,
        })
}

/// Sends the case on a fresh session while reading everything the server says, then
/// closes and waits for the session to end. Fails if it does not end in time; returns
/// the type bytes of the frames the server sent.
///
/// Where an honest client would wait for the server (CONFIG after OPEN, the origin's
/// BEGIN of a pull, READY after a push's BEGIN), this one waits too before sending the
/// rest, so the sequences reach the sync's later states whatever the timing; after
/// that it sends without waiting.
async fn run(server: &TestServer, pull_key: &str, case: &Case) -> Result<Vec<u8>, String> {
    let key = if case.pull_key {
        pull_key
    } else {
        &server.admin_key
    };
    let ws = connect(server, key).await;
    let (mut sink, mut stream) = ws.split();
    let (types_tx, mut types) = tokio::sync::mpsc::unbounded_channel();
    // Whatever the server sends is read, so it never waits on this client.
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(Ok(m)) = stream.next().await {
            if let Message::Binary(b) = m {
                seen.extend(b.first().copied());
                let _ = types_tx.send(b.first().copied());
            }
        }
        seen
    });
    // The type of the server's next frame; `None` once the session is over.
    let mut next_type = async || {
        tokio::time::timeout(END_TIMEOUT, types.recv())
            .await
            .ok()
            .flatten()
            .flatten()
    };
    let op = |name: &str| case.open.as_ref().is_some_and(|o| o["op"] == name);
    let mut open_ok = false;
    if let Some(open) = &case.open
        && sink
            .send(Message::Binary(open_frame(open).into()))
            .await
            .is_ok()
    {
        open_ok = next_type().await == Some(0x51);
        if open_ok && op("pull") {
            next_type().await;
        }
    }
    if let Some(page_count) = case.begin {
        let mut out = Vec::new();
        Frame::Begin {
            version: 1,
            page_size: 4096,
            page_count,
            base_version: 1,
            flags: 0,
        }
        .encode(&mut out);
        if sink.send(Message::Binary(out.into())).await.is_ok() && open_ok && op("push") {
            next_type().await;
        }
    }
    for m in &case.messages {
        // A session the server ended refuses further sends: that is an answer too.
        if sink.send(Message::Binary(m.clone().into())).await.is_err() {
            break;
        }
    }
    let _ = sink.close().await;
    tokio::time::timeout(END_TIMEOUT, reader)
        .await
        .map_err(|_| format!("the session did not end within {END_TIMEOUT:?} of the close"))?
        .map_err(|e| format!("reader task: {e}"))
}

/// The server's peak resident set (VmHWM), KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

#[test]
fn arbitrary_frame_sequences_change_nothing_and_end() {
    let tmp = TempDir::new().expect("tempdir");
    let server = TestServer::start(tmp.path());
    let owner = Machine::new(tmp.path(), "owner");
    let db = owner.path("fuzz.db");
    small_db(&db, 200 * 1024);
    let first = owner.push(
        &server,
        "fuzz.db",
        "acme/fuzz.db",
        &["--key", &server.admin_key],
    );
    let pull_key = crate::server::sidecar_field(&owner.path("fuzz.db-sqlferry"), "key");
    let versions_before = server.versions("acme/fuzz.db");
    let files_before = server.replica_files();

    let asked: Option<u32> = std::env::var("SQLFERRY_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok());
    let config = Config {
        cases: asked.unwrap_or(DEFAULT_CASES),
        failure_persistence: None,
        ..Config::default()
    };
    let cases = config.cases;
    let rt = runtime();
    let mut runner = match asked {
        Some(_) => TestRunner::new(config),
        None => {
            let rng = TestRng::deterministic_rng(config.rng_algorithm);
            TestRunner::new_with_rng(config, rng)
        }
    };
    let seen = std::cell::RefCell::new(std::collections::BTreeSet::new());
    let result = runner.run(&case(), |case| {
        let types = rt
            .block_on(run(&server, &pull_key, &case))
            .map_err(TestCaseError::fail)?;
        seen.borrow_mut().extend(types);
        prop_assert_eq!(
            server.versions("acme/fuzz.db"),
            versions_before.clone(),
            "a version changed"
        );
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}\nserver log:\n{}", server.log());
    }

    // The sequences reached the page sync itself: the server answered a push's BEGIN
    // (READY) and began a pull (BEGIN), not only refused OPENs.
    let seen = seen.into_inner();
    for (byte, what) in [(0x02u8, "READY"), (0x01, "BEGIN"), (0x08, "ERROR")] {
        assert!(
            seen.contains(&byte),
            "no session got a {what} frame: {seen:x?}\nserver log:\n{}",
            server.log()
        );
    }
    assert_eq!(
        server.replica_files(),
        files_before,
        "a replica file appeared"
    );
    let peak = peak_rss_kib(server.pid());
    assert!(
        peak < PEAK_RSS_KIB,
        "server peak RSS {peak} KiB after {cases} sessions"
    );
    // The server still serves a real client, and what it holds is whole.
    let out = owner.path("back.db");
    let pulled = owner.pull(&server, "acme/fuzz.db", Some("back.db"), &[]);
    assert_eq!(pulled.digest(), first.digest());
    assert_eq!(crate::util::integrity(&out), "ok");
}
