//! Compression on the wire: pages travel zstd-compressed when both ends offer it, plain
//! when either end is older (or has it turned off with `SQLFERRY_COMPRESS=off`, which
//! makes a client's OPEN and a server's CONFIG exactly an older one's), and a
//! compressed page that would expand past a page, or does not expand at all, ends the
//! session with a protocol error and changes nothing; one that expands to a page other
//! than the one COMMIT's digest is of fails the digest check and changes nothing. The
//! same from the server's side (a proxy rewriting what a real server sends): the pull
//! fails and writes no file.
//!
//! The server keeps a page that arrived compressed as it came (one zstd frame in its
//! pack, `codec` 1 in the page index) and sends it to a zstd peer as it is kept: its
//! store is smaller than the database, and every reader (a zstd pull, a plain pull, the
//! embedded store, scrub) expands and checks what it reads.

use std::path::Path;

use serde_json::json;
use tempfile::TempDir;

use super::raw::{End, connect, end, open, runtime, send};
use super::{Machine, TestServer, exec, small_db};
use crate::trust_store::store_of;
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

/// A client that compresses every page that shrinks (`SQLFERRY_COMPRESS=zstd`): the
/// test server runs on 127.0.0.1, where the default (`auto`) sends plain.
fn zstd_machine(root: &Path) -> Machine {
    let mut m = Machine::new(root, "new");
    m.set_env("SQLFERRY_COMPRESS", "zstd");
    m
}

/// `auto` (the default) to a server on this machine: pages go plain, there being no
/// link slower than the compressor; pages the server keeps compressed still come
/// compressed (the server sends them as kept), unless `--compress off`, which asks for
/// plain ones. `--compress zstd` compresses. A word that names no mode is refused
/// before anything is sent, from the flag or the environment.
#[test]
fn auto_sends_plain_on_loopback_and_takes_compressed_pages_as_kept() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let zstd = zstd_machine(dir.path());
    let mut auto = Machine::new(dir.path(), "auto");
    text_db(&zstd.path("app.db"), 20_000);
    std::fs::copy(zstd.path("app.db"), auto.path("app.db")).expect("copy");
    let size = std::fs::metadata(auto.path("app.db")).expect("size").len();
    let key = ["--key", server.admin_key.as_str()];

    let kept = zstd.push(&server, "app.db", "acme/z.db", &key);
    assert!(kept.u64("bytes_sent") * 2 < size, "zstd: {}", kept.0);
    let plain = auto.push(&server, "app.db", "acme/a.db", &key);
    assert!(
        plain.u64("bytes_sent") >= size,
        "auto on loopback: {}",
        plain.0
    );
    assert_eq!(plain.digest(), kept.digest());
    let forced = auto.push(
        &server,
        "app.db",
        "acme/f.db",
        &["--key", &server.admin_key, "--compress", "zstd"],
    );
    assert!(
        forced.u64("bytes_sent") * 2 < size,
        "--compress zstd: {}",
        forced.0
    );

    let got = auto.pull(&server, "acme/z.db", Some("z.db"), &key);
    assert!(
        got.u64("bytes_received") * 2 < size,
        "kept compressed: {}",
        got.0
    );
    let off = auto.pull(
        &server,
        "acme/z.db",
        Some("off.db"),
        &["--key", &server.admin_key, "--compress", "off"],
    );
    assert!(
        off.u64("bytes_received") >= size,
        "--compress off: {}",
        off.0
    );
    for (r, file) in [(&got, "z.db"), (&off, "off.db")] {
        assert_eq!(r.digest(), kept.digest());
        assert_eq!(util::integrity(&auto.path(file)), "ok");
        util::assert_same(&auto.path("app.db"), &auto.path(file));
    }

    let bad = auto.run_on(
        &server,
        [
            "push",
            "app.db",
            "acme/b.db",
            "--compress",
            "fast",
            "--key",
            &server.admin_key,
        ],
    );
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("expected auto, zstd or off"), "{err}");
    let versions = auto.run_on(
        &server,
        ["versions", "acme/b.db", "--key", &server.admin_key],
    );
    assert_eq!(versions.status.code(), Some(8), "acme/b.db was never made");
    auto.set_env("SQLFERRY_COMPRESS", "fast");
    let bad = auto.run_on(
        &server,
        ["pull", "acme/z.db", "bad.db", "--key", &server.admin_key],
    );
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("expected auto, zstd or off"), "{err}");
    assert!(!auto.path("bad.db").exists());
}

/// Push and pull between two new ends: the pages go compressed, the figures say what
/// went on the wire, and the copies are exact. The same with compression turned off
/// on the client (an older client): plain pages, and more than twice the bytes.
#[test]
fn text_pages_travel_compressed_and_the_figures_say_what_went_on_the_wire() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let new = zstd_machine(dir.path());
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
    let new = zstd_machine(dir.path());
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
    let a = zstd_machine(dir.path());
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

/// A digest as hex (the JSON reports') as bytes.
fn hex_digest(hex: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex");
    }
    out
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
    let data = store_of(&server.replica_file("acme/t.db"));
    let stored = pack_bytes(&data);
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
    // A ZPAGE that expands to a whole page, but not the page COMMIT's digest is of:
    // the digest check refuses it (ERROR 5), and the page it carried is not kept.
    let ended = rt.block_on(async {
        let mut ws = connect(&server, &server.admin_key).await;
        let o = json!({"protocol": 1, "op": "push", "replica": "acme/t.db",
            "base": 1, "client_id": "raw@test", "compress": ["zstd"]});
        let config = open(&mut ws, o).await;
        assert_eq!(config["compress"], "zstd");
        let pages = util::page_count(&a.path("app.db"));
        let begin = Frame::Begin {
            version: 1,
            page_size: 4096,
            page_count: pages,
            base_version: 1,
            flags: 0,
        };
        assert!(send(&mut ws, begin.to_bytes()).await);
        assert_eq!(super::raw::next(&mut ws).await.expect("READY")[0], 0x02);
        send(&mut ws, zpage(2, &page)).await;
        let commit = Frame::Commit {
            page_count: pages,
            digest: hex_digest(v1.digest()),
        };
        send(&mut ws, commit.to_bytes()).await;
        end(&mut ws).await
    });
    let End::Error(code, message, _) = ended else {
        panic!("a mismatched compressed page: no ERROR frame");
    };
    assert_eq!(code, 5, "{message}");
    assert_eq!(server.version_numbers("acme/t.db"), vec![1]);

    // The server still serves, and version 1 is intact.
    let back = a.pull(&server, "acme/t.db", Some("back.db"), &key);
    assert_eq!(back.digest(), v1.digest());
    assert_eq!(pack_bytes(&data), stored, "the refused pushes kept no byte");
}

const EXIT_VERIFY: i32 = 7;

/// The bytes of every pack of the store in `data`.
fn pack_bytes(data: &Path) -> u64 {
    std::fs::read_dir(data.join("pages")).map_or(0, |d| {
        d.flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".pack"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    })
}

fn page_index(data: &Path) -> rusqlite::Connection {
    util::index_snapshot(data)
}

/// How many indexed pages are kept plain (codec 0) and compressed (codec 1).
fn codecs(data: &Path) -> (i64, i64) {
    page_index(data)
        .query_row(
            "SELECT count(*) FILTER (WHERE codec = 0), count(*) FILTER (WHERE codec = 1) FROM pages",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("count codecs")
}

/// `sqlferry pull SPEC LOCAL --json` through the embedded store at `data` (the server's
/// own directory, read in this process's child): exit code and stdout + stderr.
fn embedded_pull(m: &Machine, data: &Path, spec: &str, local: &str) -> (i32, String) {
    let out = m.run([
        "pull",
        spec,
        m.path(local).to_str().expect("utf-8"),
        "--json",
        "--server",
        &format!("file://{}", data.display()),
    ]);
    (
        util::code(&out),
        format!("{}{}", util::stdout(&out), util::stderr(&out)),
    )
}

/// `sqlferry scrub --json --data DATA`: exit code and report.
fn scrub(m: &Machine, data: &Path) -> (i32, serde_json::Value) {
    let out = m.run(["scrub", "--json", "--data", data.to_str().expect("utf-8")]);
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("scrub --json: {e}: {}", util::stderr(&out)));
    (util::code(&out), json)
}

/// A push of text rows lands stored compressed (the packs are under half the
/// database), and the version pulls back to the same digest and rows through a zstd
/// peer (compressed bytes, sent as stored), a plain peer and the embedded store.
#[test]
fn a_push_of_text_rows_is_stored_compressed_and_pulls_back_whole_every_way() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let new = zstd_machine(dir.path());
    let mut old = Machine::new(dir.path(), "old");
    old.set_env("SQLFERRY_COMPRESS", "off");
    text_db(&new.path("app.db"), 20_000);
    let size = std::fs::metadata(new.path("app.db")).expect("size").len();
    let key = ["--key", server.admin_key.as_str()];
    let pushed = new.push(&server, "app.db", "acme/t.db", &key);
    let data = store_of(&server.replica_file("acme/t.db"));

    let (plain, zstd) = codecs(&data);
    assert!(zstd > 9 * plain, "{zstd} entries compressed, {plain} plain");
    let stored = pack_bytes(&data);
    assert!(stored * 2 < size, "{stored} bytes stored for {size}");

    let z = new.pull(&server, "acme/t.db", Some("z.db"), &key);
    assert!(z.u64("bytes_received") * 2 < size, "{}", z.0);
    let p = old.pull(&server, "acme/t.db", Some("p.db"), &key);
    assert!(p.u64("bytes_received") >= size, "{}", p.0);
    let (code, said) = embedded_pull(&new, &data, "acme/t.db", "e.db");
    assert_eq!(code, 0, "{said}");
    assert!(said.contains(pushed.digest()), "{said}");
    for (m, f) in [(&new, "z.db"), (&old, "p.db"), (&new, "e.db")] {
        assert_eq!(util::integrity(&m.path(f)), "ok", "{f}");
        util::assert_same(&new.path("app.db"), &m.path(f));
    }
    for r in [&z, &p] {
        assert_eq!(r.digest(), pushed.digest());
    }
    assert_eq!(scrub(&new, &data).0, 0);
}

/// A compressed entry damaged on disk is found like a damaged plain one: a pull (zstd
/// or plain) fails and writes nothing, scrub names the page, and the next push of the
/// same database replaces it (compressed again).
#[test]
fn a_damaged_compressed_entry_is_never_delivered_and_is_found_and_repaired() {
    use std::os::unix::fs::FileExt;
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let new = zstd_machine(dir.path());
    let mut old = Machine::new(dir.path(), "old");
    old.set_env("SQLFERRY_COMPRESS", "off");
    text_db(&new.path("app.db"), 5_000);
    let key = ["--key", server.admin_key.as_str()];
    new.push(&server, "app.db", "acme/t.db", &key);
    let data = store_of(&server.replica_file("acme/t.db"));
    // The last compressed entry (a leaf of the table, not page 1).
    let (hash, pack, offset, len): (Vec<u8>, i64, i64, i64) = page_index(&data)
        .query_row(
            "SELECT hash, pack, offset, len FROM pages WHERE codec = 1 ORDER BY offset DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .expect("a compressed entry");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(data.join(format!("pages/{pack}.pack")))
        .expect("open pack");
    let at = (offset + len / 2) as u64;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).expect("read");
    f.write_all_at(&[b[0] ^ 0x5a], at).expect("write");
    drop(f);

    for (m, via) in [(&new, "zstd"), (&old, "plain")] {
        let out = m.run_on(
            &server,
            ["pull", "acme/t.db", "back.db", "--key", &server.admin_key],
        );
        assert_eq!(
            util::code(&out),
            EXIT_VERIFY,
            "{via}: {}",
            util::stderr(&out)
        );
        assert!(
            util::stderr(&out).contains("damaged"),
            "{via}: {}",
            util::stderr(&out)
        );
        assert!(
            !m.path("back.db").exists(),
            "{via}: a pull that failed wrote a file"
        );
    }
    let (code, said) = embedded_pull(&new, &data, "acme/t.db", "e.db");
    assert_eq!(code, EXIT_VERIFY, "{said}");
    let (code, report) = scrub(&new, &data);
    assert_eq!(code, EXIT_VERIFY, "{report}");
    let bad = &report["replicas"][0]["bad_pages"][0];
    assert_eq!(bad["hash"], sqlferry::digest::hex(&hash));
    assert_eq!(bad["problem"], "damaged");

    let again = new.push(&server, "app.db", "acme/t.db", &key);
    assert_eq!(again.0["repaired"], 1, "{}", again.0);
    let back = old.pull(&server, "acme/t.db", Some("back.db"), &key);
    assert_eq!(back.digest(), again.digest());
    util::assert_same(&new.path("app.db"), &old.path("back.db"));
    assert_eq!(scrub(&new, &data).0, 0);
    let (_, zstd) = codecs(&data);
    let replaced: i64 = page_index(&data)
        .query_row("SELECT codec FROM pages WHERE hash = ?1", [&hash], |r| {
            r.get(0)
        })
        .expect("the page is indexed");
    assert!(
        zstd > 0 && replaced == 1,
        "the repair came compressed and is kept so"
    );
}

/// A store whose index was made before compressed entries (plain entries, no `codec`
/// column) keeps working: a compressed push of a change adds compressed entries beside
/// the old plain ones, and every version reads back whole every way.
#[test]
fn a_store_with_old_plain_entries_and_new_compressed_ones_reads_back_whole() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let new = zstd_machine(dir.path());
    let mut old = Machine::new(dir.path(), "old");
    old.set_env("SQLFERRY_COMPRESS", "off");
    text_db(&old.path("app.db"), 10_000);
    let key = ["--key", server.admin_key.as_str()];
    let v1 = old.push(&server, "app.db", "acme/t.db", &key);
    let data = store_of(&server.replica_file("acme/t.db"));
    // As an index made before the column existed.
    page_index(&data)
        .execute_batch("ALTER TABLE pages DROP COLUMN codec")
        .expect("drop codec");

    new.pull(&server, "acme/t.db", Some("app.db"), &key);
    exec(
        &new.path("app.db"),
        "UPDATE notes SET body = body || ' (edited, and edited again)' WHERE id % 7 = 0;",
    );
    util::checkpoint(&new.path("app.db"));
    let v2 = new.push(&server, "app.db", "acme/t.db", &key);
    let (plain, zstd) = codecs(&data);
    assert!(plain > 0 && zstd > 0, "{plain} plain, {zstd} compressed");

    let z = new.pull(&server, "acme/t.db", Some("z.db"), &key);
    let p = old.pull(&server, "acme/t.db", Some("p.db"), &key);
    let z1 = new.pull(&server, "acme/t.db@1", Some("z1.db"), &key);
    let (code, said) = embedded_pull(&old, &data, "acme/t.db", "e.db");
    assert_eq!(code, 0, "{said}");
    assert_eq!((z.digest(), p.digest()), (v2.digest(), v2.digest()));
    assert_eq!(z1.digest(), v1.digest());
    for (m, f) in [(&new, "z.db"), (&old, "p.db"), (&old, "e.db")] {
        assert_eq!(util::integrity(&m.path(f)), "ok", "{f}");
        util::assert_same(&new.path("app.db"), &m.path(f));
    }
    util::assert_same(&old.path("app.db"), &new.path("z1.db"));
    assert_eq!(scrub(&new, &data).0, 0);
}

/// What a client asked the proxy for: its path and its `Authorization` header.
type AskedFor = Option<(
    tokio_tungstenite::tungstenite::http::Uri,
    Option<tokio_tungstenite::tungstenite::http::HeaderValue>,
)>;

/// Keeps what the client asked for while its upgrade is accepted.
struct Asked<'a>(&'a mut AskedFor);

impl tokio_tungstenite::tungstenite::handshake::server::Callback for Asked<'_> {
    fn on_request(
        self,
        request: &tokio_tungstenite::tungstenite::handshake::server::Request,
        response: tokio_tungstenite::tungstenite::handshake::server::Response,
    ) -> Result<
        tokio_tungstenite::tungstenite::handshake::server::Response,
        tokio_tungstenite::tungstenite::handshake::server::ErrorResponse,
    > {
        *self.0 = Some((
            request.uri().clone(),
            request.headers().get("authorization").cloned(),
        ));
        Ok(response)
    }
}

/// A proxy on `listener` between clients and the server at `upstream` (`ws://…`) that
/// hands every message through, the `Authorization` header included, except the first
/// ZPAGE frame the server sends on each connection: its zstd bytes become `bad`.
async fn mangling_proxy(listener: tokio::net::TcpListener, upstream: String, bad: Vec<u8>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    while let Ok((tcp, _)) = listener.accept().await {
        let (upstream, bad) = (upstream.clone(), bad.clone());
        tokio::spawn(async move {
            let mut asked = None;
            let client = tokio_tungstenite::accept_hdr_async(tcp, Asked(&mut asked))
                .await
                .expect("the client's upgrade");
            let (uri, auth) = asked.expect("a request");
            let mut request = format!("{upstream}{uri}")
                .into_client_request()
                .expect("request");
            if let Some(auth) = auth {
                request.headers_mut().insert("authorization", auth);
            }
            let (server, _) = tokio_tungstenite::connect_async(request)
                .await
                .expect("the server's upgrade");
            let (mut c_tx, mut c_rx) = client.split();
            let (mut s_tx, mut s_rx) = server.split();
            let up = async {
                while let Some(Ok(m)) = c_rx.next().await {
                    if s_tx.send(m).await.is_err() {
                        break;
                    }
                }
            };
            let down = async {
                let mut bad = Some(bad);
                while let Some(Ok(m)) = s_rx.next().await {
                    let m = match m {
                        Message::Binary(b) if b.first() == Some(&0x0a) && bad.is_some() => {
                            let mut f = b[..5].to_vec();
                            f.extend(bad.take().expect("checked"));
                            Message::Binary(f.into())
                        }
                        m => m,
                    };
                    if c_tx.send(m).await.is_err() {
                        break;
                    }
                }
            };
            tokio::select! {
                _ = up => {}
                _ = down => {}
            }
        });
    }
}

/// The other direction: a server (here a proxy in front of a real one) that sends a
/// compressed page that is garbage, a bomb, or a whole page of other content. The pull
/// fails (4: the peer broke the protocol; 7: the digest does not match) and writes no
/// file.
#[test]
fn a_pull_refuses_a_bad_compressed_page_from_the_server_and_writes_nothing() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let a = zstd_machine(dir.path());
    text_db(&a.path("app.db"), 3000);
    let key = ["--key", server.admin_key.as_str()];
    let pushed = a.push(&server, "app.db", "acme/t.db", &key);
    // Pulled straight, the version comes whole (its pages as the server keeps them).
    let good = a.pull(&server, "acme/t.db", Some("good.db"), &key);
    assert_eq!(good.digest(), pushed.digest());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cases: [(&str, Vec<u8>, i32, &str); 3] = [
        (
            "garbage",
            vec![0x28, 0xb5, 0x2f, 0xfd, 0xde, 0xad],
            4,
            "ZPAGE",
        ),
        (
            "a bomb",
            zstd::bulk::compress(&vec![0u8; 1 << 20], 19).expect("compress"),
            4,
            "is not a page",
        ),
        (
            "another page",
            zstd::bulk::compress(&[7u8; 4096], 1).expect("compress"),
            7,
            "",
        ),
    ];
    for (i, (what, bad, code, phrase)) in cases.into_iter().enumerate() {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let url = format!("ws://{}", listener.local_addr().expect("address"));
        let proxy = rt.spawn(mangling_proxy(listener, server.url.clone(), bad));
        let local = format!("bad-{i}.db");
        let out = a
            .command()
            .args(["pull", "acme/t.db", &local, "--server", &url])
            .args(key)
            .output()
            .expect("pull");
        proxy.abort();
        let err = util::stderr(&out);
        assert_eq!(util::code(&out), code, "{what}: {err}");
        assert!(err.contains(phrase), "{what}: {err}");
        assert!(!a.path(&local).exists(), "{what}: no file is left");
    }
}
