//! The chunked digest negotiated over WebSocket (OPEN's `digests: ["chunked"]`,
//! CONFIG's `digest_form: "chunked"`), with a real `sqlferry serve` process: a push
//! with a known base then goes by chunks through the server as into the embedded store
//! (the origin reads and sends only the changed chunks' pages, the server's store
//! records the chunked digest only and reads no chunk of its base to make digest 1),
//! and pulls back whole. A client that does not offer the form (an older one, as a
//! proxy that drops the field from OPEN makes it) sees today's wire: digest 1 in BEGIN,
//! in its push report and in the version the server records; it is handed digest 1 of
//! a version made by chunks, and a flipped stored byte under one fails its pull. A server that did not
//! agree refuses a BEGIN asking for the chunked digest, and stores nothing.

use std::path::Path;

use rusqlite::Connection;
use tempfile::TempDir;

use super::{Machine, Report, TestServer};
use crate::merge::rewriting_proxy;
use crate::util::{self, Mode};

const REPLICA: &str = "acme/app.db";
/// About 2,600 pages of 4 KiB: three chunks of page hashes.
const ROWS: u64 = 10_000;

/// A WAL database of [`ROWS`] rows whose pages live in the file, the WAL restarted:
/// the connection stays open (its last close would checkpoint and remove the WAL).
fn wal_database(path: &Path) -> Connection {
    let conn = util::create(path, 4096, Mode::Wal);
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .expect("autocheckpoint");
    util::insert_rows(&conn, ROWS, 1000);
    conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE); UPDATE t SET k = k WHERE id = 1")
        .expect("checkpoint");
    conn
}

/// About 1% of the pages, contiguous: the last rows' blobs.
fn change_last_rows(conn: &Connection) {
    conn.execute(
        "UPDATE t SET v = randomblob(1000) WHERE id > ?1",
        [(ROWS - 26) as i64],
    )
    .expect("update");
}

/// A push's report and whether its origin went by chunks (its debug log says so).
struct Pushed {
    report: Report,
    by_chunks: bool,
    stderr: String,
}

/// `push app.db REPLICA --json` from `m` to `url` with the origin's debug log.
fn push(m: &Machine, url: &str, key: &str) -> Pushed {
    let out = m
        .command()
        .env("RUST_LOG", "sqlferry::engine::origin=debug")
        .args(["push", "app.db", REPLICA, "--json", "--key", key])
        .args(["--server", url])
        .output()
        .expect("run sqlferry");
    let report = Report::of(&out, "push");
    Pushed {
        report,
        by_chunks: util::stderr(&out).contains("origin compared by chunks"),
        stderr: util::stderr(&out),
    }
}

/// `(length(digest), digest2)` of every version the replica file records, oldest
/// first.
fn recorded(file: &Path) -> Vec<(i64, Option<Vec<u8>>)> {
    let conn = Connection::open(file).expect("replica file");
    let mut stmt = conn
        .prepare("SELECT length(digest), digest2 FROM versions ORDER BY number")
        .expect("digests");
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("rows")
        .collect::<rusqlite::Result<_>>()
        .expect("rows")
}

/// The chunked digest of `path` as raw bytes, as `versions.digest2` records it.
fn chunked_bytes(path: &Path) -> Vec<u8> {
    let text = util::chunked_digest(path);
    let hex = text.strip_prefix("c:").expect("c: and hex");
    (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

/// `versions REPLICA --json` from `m`: version `number`'s entry.
fn listed(m: &Machine, url: &str, key: &str, number: u64) -> serde_json::Value {
    let out = m
        .command()
        .args(["versions", REPLICA, "--json", "--key", key, "--server", url])
        .output()
        .expect("run sqlferry");
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let all: serde_json::Value = serde_json::from_str(util::stdout(&out).trim()).expect("JSON");
    all.as_array()
        .expect("a list")
        .iter()
        .find(|v| v["number"] == number)
        .unwrap_or_else(|| panic!("version {number} in {all}"))
        .clone()
}

/// Pulls `spec` into `name` on `m` through `url` and checks it is the database at
/// `origin`: rows, `integrity_check`, digest, and `verify` of the file.
fn pulls_back(m: &Machine, url: &str, key: &str, origin: &Path, name: &str) {
    let out = m
        .command()
        .args([
            "pull", REPLICA, name, "--json", "--key", key, "--server", url,
        ])
        .output()
        .expect("run sqlferry");
    let report = Report::of(&out, "pull");
    assert_eq!(report.digest(), util::digest(origin), "{}", report.0);
    util::assert_same(origin, &m.path(name));
    let (code, verified, stderr) = util::verify_json(&m.path(name));
    assert_eq!(code, 0, "{stderr}");
    let verified = verified.expect("verify --json");
    assert_eq!(verified["digest"], util::digest(origin), "{verified}");
    std::fs::remove_file(m.path(name)).expect("remove the pulled copy");
}

/// A proxy in front of `server` as an older client: its OPEN loses `digests`.
fn older_client(rt: &tokio::runtime::Runtime, server: &TestServer) -> String {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let url = format!("ws://{}", listener.local_addr().expect("address"));
    rt.spawn(rewriting_proxy(listener, server.url.clone(), |ty, json| {
        if ty == 0x50 {
            json.remove("digests");
        }
    }));
    url
}

#[test]
fn a_push_through_the_server_goes_by_chunks_and_records_only_its_chunked_digest() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let key = server.admin_key.clone();
    let a = Machine::new(dir.path(), "a");
    let b = Machine::new(dir.path(), "b");
    let db = a.path("app.db");
    let conn = wal_database(&db);
    let file = server.replica_file(REPLICA);

    let first = push(&a, &server.url, &key);
    assert_eq!(first.report.u64("version"), 1, "{}", first.report.0);
    assert!(!first.by_chunks, "no known base yet");
    // Every chunk new: both digests recorded, digest 1 shown.
    assert_eq!(first.report.digest(), util::digest(&db));

    change_last_rows(&conn);
    let second = push(&a, &server.url, &key);
    assert!(second.by_chunks, "{}", second.stderr);
    assert_eq!(second.report.u64("version"), 2);
    let sent = second.report.u64("pages_sent");
    let pages = u64::from(util::page_count(&db));
    assert!(
        sent > 0 && sent * 50 < pages,
        "{sent} of {pages} pages: {}",
        second.report.0
    );
    // The version kept chunks of version 1: only its chunked digest is recorded (the
    // server read none of version 1's chunks to make digest 1), and shown.
    assert_eq!(second.report.digest(), util::chunked_digest(&db));
    let digests = recorded(&file);
    assert_eq!(digests[0].0, 32, "version 1 records digest 1");
    assert_eq!(digests[1], (0, Some(chunked_bytes(&db))), "version 2");

    pulls_back(&b, &server.url, &key, &db, "back.db");

    // Another 1% change goes by chunks from version 2, kept by chunks on the client;
    // the server made digest 1 of neither version (its push reads no chunk of its base).
    change_last_rows(&conn);
    let third = push(&a, &server.url, &key);
    assert!(third.by_chunks, "{}", third.stderr);
    assert_eq!(third.report.u64("version"), 3);
    assert!(third.report.u64("pages_sent") * 50 < pages);
    let digests = recorded(&file);
    assert_eq!((digests[1].0, digests[2].0), (0, 0), "chunked digests only");
    pulls_back(&b, &server.url, &key, &db, "back.db");

    // Every peer is handed digest 1 (made from the manifest when first asked).
    let v3 = listed(&b, &server.url, &key, 3);
    assert_eq!(v3["digest"], util::digest(&db), "{v3}");
    assert_eq!(v3["digest2"], util::chunked_digest(&db), "{v3}");

    // Nothing changed: no new version.
    let again = push(&a, &server.url, &key);
    assert_eq!(again.report.u64("version"), 3, "{}", again.report.0);
    assert_eq!(again.report.0["created"], false, "{}", again.report.0);
}

#[test]
fn a_client_that_does_not_offer_the_chunked_digest_gets_digest_1_as_before() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let key = server.admin_key.clone();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let old = older_client(&rt, &server);
    let a = Machine::new(dir.path(), "a");
    let b = Machine::new(dir.path(), "b");
    let db = a.path("app.db");
    let conn = wal_database(&db);
    let file = server.replica_file(REPLICA);

    push(&a, &old, &key);
    change_last_rows(&conn);
    let second = push(&a, &old, &key);
    assert!(!second.by_chunks, "{}", second.report.0);
    assert_eq!(second.report.u64("version"), 2);
    assert!(second.report.u64("pages_sent") * 50 < u64::from(util::page_count(&db)));
    assert_eq!(second.report.digest(), util::digest(&db), "digest 1");
    // The server recorded digest 1, as every version before the chunked form.
    assert_eq!(recorded(&file)[1].0, 32, "version 2 records digest 1");
    let v2 = listed(&b, &old, &key, 2);
    assert_eq!(v2["digest"], util::digest(&db), "{v2}");
    pulls_back(&b, &old, &key, &db, "back.db");
}

#[test]
fn a_flipped_byte_under_a_version_made_by_chunks_through_the_server_is_refused_at_pull() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let key = server.admin_key.clone();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let old = older_client(&rt, &server);
    let a = Machine::new(dir.path(), "a");
    let b = Machine::new(dir.path(), "b");
    let db = a.path("app.db");
    let conn = wal_database(&db);
    let file = server.replica_file(REPLICA);
    push(&a, &server.url, &key);
    change_last_rows(&conn);
    assert!(push(&a, &server.url, &key).by_chunks);
    assert_eq!(
        recorded(&file)[1].0,
        0,
        "version 2 records its chunked digest only"
    );
    // An older client is handed digest 1 (made from the manifest) and pulls it whole.
    let v2 = listed(&b, &old, &key, 2);
    assert_eq!(v2["digest"], util::digest(&db), "{v2}");
    pulls_back(&b, &old, &key, &db, "back.db");

    // A page version 2 sent (its last) and one it kept of version 1 (page 2).
    let last = util::page_count(&db);
    for (pgno, url) in [(last, &old), (2, &old), (2, &server.url)] {
        let (hash, data) = crate::trust_store::stored_page(&file, 2, pgno);
        let byte = data.len() / 2;
        crate::trust_store::flip_stored(&file, &hash, byte, 0x01);
        let out = b
            .command()
            .args([
                "pull",
                REPLICA,
                "restored.db",
                "--key",
                &key,
                "--server",
                url,
            ])
            .output()
            .expect("run sqlferry");
        assert_eq!(util::code(&out), 7, "page {pgno}: {}", util::stderr(&out));
        assert!(
            util::stderr(&out).contains("damaged"),
            "page {pgno}: {}",
            util::stderr(&out)
        );
        assert_eq!(util::file_len(&b.path("restored.db")), 0, "nothing written");
        crate::trust_store::flip_stored(&file, &hash, byte, 0x01);
    }
    pulls_back(&b, &old, &key, &db, "back.db");
}

/// A server that did not agree on the chunked digest (its CONFIG, as a proxy makes it,
/// names the form though OPEN, as the server saw it, never offered it) refuses the
/// BEGIN that asks for it: a protocol error, nothing stored.
#[test]
fn a_server_that_did_not_agree_refuses_a_chunked_begin() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let key = server.admin_key.clone();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let lying = format!("ws://{}", listener.local_addr().expect("address"));
    rt.spawn(rewriting_proxy(
        listener,
        server.url.clone(),
        |ty, json| match ty {
            0x50 => drop(json.remove("digests")),
            _ => drop(json.insert("digest_form".into(), "chunked".into())),
        },
    ));
    let a = Machine::new(dir.path(), "a");
    let db = a.path("app.db");
    let conn = wal_database(&db);
    push(&a, &server.url, &key);
    change_last_rows(&conn);
    let out = a
        .command()
        .args(["push", "app.db", REPLICA, "--key", &key, "--server", &lying])
        .output()
        .expect("run sqlferry");
    let stderr = util::stderr(&out);
    assert_ne!(util::code(&out), 0, "{stderr}");
    assert!(stderr.contains("chunked digest"), "{stderr}");
    assert_eq!(server.version_numbers(REPLICA), [1], "nothing stored");
    // Straight to the server the same change goes, by chunks.
    let second = push(&a, &server.url, &key);
    assert!(second.by_chunks, "{}", second.stderr);
    assert_eq!(second.report.u64("version"), 2);
}

/// Two machines push a 1% change each from the same version, by chunks, at once: one
/// version lands, the other push is told VERSION_CONFLICT and stores nothing.
#[test]
fn two_pushes_by_chunks_from_one_version_give_one_version_conflict() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let key = server.admin_key.clone();
    let a = Machine::new(dir.path(), "a");
    let b = Machine::new(dir.path(), "b");
    let conn_a = wal_database(&a.path("app.db"));
    push(&a, &server.url, &key);
    // B's copy comes from a pull of version 1, then follows its own WAL.
    let out = b
        .command()
        .args([
            "pull",
            REPLICA,
            "app.db",
            "--key",
            &key,
            "--server",
            &server.url,
        ])
        .output()
        .expect("run sqlferry");
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let conn_b = util::open(&b.path("app.db"));
    change_last_rows(&conn_a);
    change_last_rows(&conn_b);
    let spawn = |m: &Machine| {
        m.command()
            .env("RUST_LOG", "sqlferry::engine::origin=debug")
            .args(["push", "app.db", REPLICA, "--json", "--key", &key])
            .args(["--server", &server.url])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start sqlferry")
    };
    let pushes = [spawn(&a), spawn(&b)];
    let outs = pushes.map(|c| c.wait_with_output().expect("wait for sqlferry"));
    let codes: Vec<i32> = outs.iter().map(util::code).collect();
    let (winner, loser) = match codes.as_slice() {
        [0, super::EXIT_CONFLICT] => (0, 1),
        [super::EXIT_CONFLICT, 0] => (1, 0),
        _ => panic!(
            "exit codes {codes:?}: {} / {}",
            util::stderr(&outs[0]),
            util::stderr(&outs[1])
        ),
    };
    // Both agreed on the chunked digest; A's origin (following its WAL) goes by
    // chunks when it wins, B's (a pulled copy: no hash list yet) by its kept manifest.
    let won = Report::of(&outs[winner], "winning push");
    let winner_db = [&a, &b][winner].path("app.db");
    assert_eq!(
        won.digest(),
        util::digest_like(&winner_db, &won.0["digest"]),
        "{}",
        won.0
    );
    let err = util::stderr(&outs[loser]);
    assert!(err.contains("VERSION_CONFLICT"), "{err}");
    assert_eq!(
        server.version_numbers(REPLICA),
        [1, 2],
        "one version landed"
    );
    let c = Machine::new(dir.path(), "c");
    pulls_back(&c, &server.url, &key, &winner_db, "back.db");
}
