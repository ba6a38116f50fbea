//! Compression on the wire: pages travel zstd-compressed when both ends offer it, plain
//! when either end is older (or has it turned off with `SQLFERRY_COMPRESS=off`, which
//! makes a client's OPEN and a server's CONFIG exactly an older one's), and a
//! compressed page that would expand past a page, or does not expand at all, ends the
//! session with a protocol error and changes nothing.

use serde_json::json;
use tempfile::TempDir;

use super::raw::{End, connect, end, open, runtime, send};
use super::{Machine, TestServer, exec, small_db};
use crate::util;
use sqlferry::protocol::Frame;
use sqlferry::protocol::compress::Expander;

/// A WAL database of text rows that compresses well, about `rows` × 120 bytes.
fn text_db(path: &std::path::Path, rows: u32) {
    drop(util::create(path, 4096, util::Mode::Wal));
    exec(
        path,
        &format!(
            "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
             INSERT INTO notes(body) SELECT printf('note %d: the quick brown fox jumps over the lazy dog, then %d more', i, i % 97) FROM n;"
        ),
    );
    util::checkpoint(path);
}

/// Push and pull between two new ends: the pages go compressed, the figures say what
/// went on the wire, and the copies are exact. The same with compression turned off
/// on the client (an older client): plain pages, and more than twice the bytes.
#[test]
fn text_pages_travel_compressed_and_the_figures_say_what_went_on_the_wire() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let new = Machine::new(dir.path(), "new");
    let mut old = Machine::new(dir.path(), "old");
    old.set_env("SQLFERRY_COMPRESS", "off");
    text_db(&new.path("app.db"), 20_000);
    std::fs::copy(new.path("app.db"), old.path("app.db")).expect("copy");
    let size = std::fs::metadata(new.path("app.db")).expect("size").len();
    let key = ["--key", server.admin_key.as_str()];

    let zstd = new.push(&server, "app.db", "acme/z.db", &key);
    let plain = old.push(&server, "app.db", "acme/p.db", &key);
    assert_eq!(zstd.digest(), plain.digest());
    let (z, p) = (zstd.u64("bytes_sent"), plain.u64("bytes_sent"));
    assert!(
        p >= size,
        "plain push sent {p} bytes of a {size}-byte database"
    );
    assert!(z * 2 < p, "compressed push sent {z} bytes, plain {p}");

    let zp = new.pull(&server, "acme/p.db", Some("back.db"), &key);
    let pp = old.pull(&server, "acme/z.db", Some("back.db"), &key);
    for (m, r) in [(&new, &zp), (&old, &pp)] {
        assert_eq!(r.digest(), zstd.digest());
        assert_eq!(util::integrity(&m.path("back.db")), "ok");
        util::assert_same(&m.path("app.db"), &m.path("back.db"));
    }
    let (z, p) = (zp.u64("bytes_received"), pp.u64("bytes_received"));
    assert!(
        p >= size,
        "plain pull received {p} bytes of a {size}-byte database"
    );
    assert!(z * 2 < p, "compressed pull received {z} bytes, plain {p}");
}

/// Random blobs do not compress: they go plain, and cost no more bytes than plain.
#[test]
fn pages_that_do_not_compress_go_plain() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let new = Machine::new(dir.path(), "new");
    let mut old = Machine::new(dir.path(), "old");
    old.set_env("SQLFERRY_COMPRESS", "off");
    small_db(&new.path("app.db"), 2 << 20);
    std::fs::copy(new.path("app.db"), old.path("app.db")).expect("copy");
    let key = ["--key", server.admin_key.as_str()];
    let z = new
        .push(&server, "app.db", "acme/z.db", &key)
        .u64("bytes_sent");
    let p = old
        .push(&server, "app.db", "acme/p.db", &key)
        .u64("bytes_sent");
    // Blob pages stay plain; the few table-interior pages may shrink.
    assert!(z <= p && z * 10 > p * 9, "compressed {z}, plain {p}");
}

/// A client that offers no compression (an older one) gets a CONFIG without
/// `compress` and plain PAGE frames only; one that offers zstd gets `"compress":
/// "zstd"` and ZPAGE frames that expand to exactly the pages.
#[test]
fn the_server_compresses_only_for_a_client_that_offers_it() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let a = Machine::new(dir.path(), "a");
    text_db(&a.path("app.db"), 3_000);
    let pages = util::page_count(&a.path("app.db"));
    a.push(
        &server,
        "app.db",
        "acme/t.db",
        &["--key", &server.admin_key],
    );
    let rt = runtime();
    for offer in [
        None,
        Some(json!(["zstd"])),
        Some(json!(["lz77", "zstd"])),
        Some(json!(["brotli"])),
    ] {
        let got = rt.block_on(async {
            let mut ws = connect(&server, &server.admin_key).await;
            let mut o = json!({"protocol": 1, "op": "pull", "replica": "acme/t.db",
                "version": "latest", "client_id": "raw@test"});
            if let Some(offer) = &offer {
                o["compress"] = offer.clone();
            }
            let config = open(&mut ws, o).await;
            let begin = super::raw::next(&mut ws).await.expect("BEGIN");
            assert_eq!(begin[0], 0x01);
            assert!(send(&mut ws, Frame::Ready { page_count: 0 }.to_bytes()).await);
            let mut kinds = Vec::new();
            let mut expander = Expander::new();
            loop {
                let f = super::raw::next(&mut ws).await.expect("a frame");
                if f[0] == 0x06 {
                    break;
                }
                kinds.push(f[0]);
                let plain = expander.unpack(f).expect("a ZPAGE expands");
                let Ok(Frame::Page { pgno, data }) = Frame::decode(&plain) else {
                    panic!("a page frame");
                };
                assert!(pgno >= 1 && pgno <= pages && data.len() == 4096);
            }
            (config.get("compress").cloned(), kinds)
        });
        let (compress, kinds) = got;
        assert_eq!(kinds.len(), pages as usize, "offer {offer:?}");
        let zpages = kinds.iter().filter(|&&k| k == 0x0a).count();
        match offer.as_ref().map(|o| o.to_string()) {
            Some(o) if o.contains("zstd") => {
                assert_eq!(compress, Some(json!("zstd")), "offer {o}");
                assert!(
                    zpages * 10 > kinds.len() * 9,
                    "{zpages} of {} compressed",
                    kinds.len()
                );
            }
            _ => {
                assert_eq!(compress, None, "offer {offer:?}: no compress in CONFIG");
                assert_eq!(zpages, 0, "offer {offer:?}: plain pages only");
            }
        }
    }
}

/// A new client against an older server (one that answers OPEN without `compress`,
/// here a server with it turned off): plain pages, both ways, and exact copies.
#[test]
fn a_new_client_and_an_older_server_speak_plain() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start_env(dir.path(), &[("SQLFERRY_COMPRESS", "off")]);
    let a = Machine::new(dir.path(), "a");
    text_db(&a.path("app.db"), 20_000);
    let size = std::fs::metadata(a.path("app.db")).expect("size").len();
    let key = ["--key", server.admin_key.as_str()];
    let pushed = a.push(&server, "app.db", "acme/t.db", &key);
    assert!(pushed.u64("bytes_sent") >= size, "plain: {}", pushed.0);
    let pulled = a.pull(&server, "acme/t.db", Some("back.db"), &key);
    assert!(pulled.u64("bytes_received") >= size, "plain: {}", pulled.0);
    assert_eq!(pulled.digest(), pushed.digest());
    util::assert_same(&a.path("app.db"), &a.path("back.db"));
}

fn zpage(pgno: u32, z: &[u8]) -> Vec<u8> {
    let mut out = vec![0x0a];
    out.extend_from_slice(&pgno.to_be_bytes());
    out.extend_from_slice(z);
    out
}

/// A bomb (a small ZPAGE that would expand to 1 MiB), a ZPAGE that states a page but
/// holds more, garbage, and a ZPAGE in a session that did not agree to compression:
/// each ends the push with ERROR 1, and no version appears; the server goes on.
#[test]
fn a_bomb_or_garbage_in_a_compressed_page_is_refused_and_changes_nothing() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let a = Machine::new(dir.path(), "a");
    text_db(&a.path("app.db"), 500);
    let key = ["--key", server.admin_key.as_str()];
    let v1 = a.push(&server, "app.db", "acme/t.db", &key);
    let page = zstd::bulk::compress(&[7u8; 4096], 1).expect("compress");
    let cases: [(&str, bool, Vec<u8>, &str); 5] = [
        (
            "a bomb",
            true,
            zpage(
                1,
                &zstd::bulk::compress(&vec![0u8; 1 << 20], 19).expect("compress"),
            ),
            "is not a page",
        ),
        (
            "two pages in one",
            true,
            zpage(1, &[page.clone(), page.clone()].concat()),
            "ZPAGE",
        ),
        (
            "garbage",
            true,
            zpage(1, &[0x28, 0xb5, 0x2f, 0xfd, 0xde, 0xad]),
            "ZPAGE",
        ),
        (
            "truncated",
            true,
            vec![0x0a, 0, 0],
            "ZPAGE frame is truncated",
        ),
        ("not agreed", false, zpage(1, &page), "did not agree"),
    ];
    let rt = runtime();
    for (what, agreed, frame, phrase) in cases {
        let ended = rt.block_on(async {
            let mut ws = connect(&server, &server.admin_key).await;
            let mut o = json!({"protocol": 1, "op": "push", "replica": "acme/t.db",
                "base": 1, "client_id": "raw@test"});
            if agreed {
                o["compress"] = json!(["zstd"]);
            }
            let config = open(&mut ws, o).await;
            assert_eq!(config.get("compress").is_some(), agreed, "{what}");
            let begin = Frame::Begin {
                version: 1,
                page_size: 4096,
                page_count: 2,
                base_version: 0,
                flags: 0,
            };
            assert!(send(&mut ws, begin.to_bytes()).await);
            assert_eq!(super::raw::next(&mut ws).await.expect("READY")[0], 0x02);
            send(&mut ws, frame).await;
            end(&mut ws).await
        });
        let End::Error(code, message, _) = ended else {
            panic!("{what}: no ERROR frame");
        };
        assert_eq!(code, 1, "{what}: {message}");
        assert!(message.contains(phrase), "{what}: {message}");
        assert_eq!(server.version_numbers("acme/t.db"), vec![1], "{what}");
    }
    // The server still serves, and version 1 is intact.
    let back = a.pull(&server, "acme/t.db", Some("back.db"), &key);
    assert_eq!(back.digest(), v1.digest());
}
