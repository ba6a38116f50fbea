//! The store delivers nothing corrupt and keeps nothing unbounded: byte flips in stored
//! pages (page 1's journal-mode bytes, its counters, any other page), pushes that land
//! twice, hostile origins driven through the engine API (unknown BEGIN flags, a page 1
//! that is no SQLite header, pages sent twice or never used), `sqlferry scrub`, and the
//! files a killed first push leaves behind.
//!
//! The CLI cases use an embedded store (`--server file:///…`) in the test's own TempDir,
//! so every damage is done to a real replica file with a second SQLite connection, the
//! way a disk or an operator would do it. The last two cases go through a real `sqlferry
//! serve` (a damaged page pulled, scrubbed and repaired; a push whose answer was lost).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use rusqlite::{Connection, params};
use sqlferry::digest::{Digest, page_hash};
use sqlferry::engine::{BeginInfo, Link, PageTarget, mem_pair, run_replica};
use sqlferry::protocol::{Frame, Hash, PROTOCOL_VERSION};
use sqlferry::store::{PushOptions, ReplicaPath, Store};
use tempfile::TempDir;

use crate::util::{self, Mode};

const EXIT_CONFLICT: i32 = 6;
const EXIT_VERIFY: i32 = 7;
const REPLICA: &str = "acme/app.db";

/// A test's directory, its store and its sqlferry runs.
struct Bench {
    dir: TempDir,
}

impl Bench {
    fn new() -> Bench {
        Bench {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn store(&self) -> PathBuf {
        self.path("store")
    }

    fn url(&self) -> String {
        format!("file://{}", self.store().display())
    }

    fn replica_file(&self) -> PathBuf {
        self.store().join("replicas/acme/app.db.sqlferry")
    }

    /// `sqlferry ARGS… --server file:///STORE`.
    fn run(&self, args: &[&str]) -> Output {
        util::sqlferry(self.dir.path())
            .current_dir(self.dir.path())
            .args(args)
            .arg("--server")
            .arg(self.url())
            .output()
            .expect("run sqlferry")
    }

    /// A WAL database `name` with `rows` rows.
    fn database(&self, name: &str, rows: u64) -> PathBuf {
        let p = self.path(name);
        let conn = util::create(&p, 4096, Mode::Wal);
        util::insert_rows(&conn, rows, 300);
        p
    }

    fn push(&self, local: &Path, extra: &[&str]) -> Output {
        let mut args = vec!["push", local.to_str().expect("utf-8"), REPLICA, "--json"];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    fn pull(&self, spec: &str, local: &Path) -> Output {
        self.run(&["pull", spec, local.to_str().expect("utf-8"), "--json"])
    }

    fn scrub(&self) -> (i32, serde_json::Value) {
        let out = util::sqlferry(self.dir.path())
            .args(["scrub", "--json", "--data"])
            .arg(self.store())
            .output()
            .expect("run scrub");
        let json = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("scrub --json: {e}: {}", util::stderr(&out)));
        (util::code(&out), json)
    }
}

fn ok(out: &Output, what: &str) -> serde_json::Value {
    assert_eq!(
        util::code(out),
        0,
        "{what}: {}{}",
        util::stderr(out),
        util::stdout(out)
    );
    serde_json::from_str(util::stdout(out).trim()).expect("one JSON object")
}

/// The store directory a replica file is in (`<store>/replicas/...`).
pub(crate) fn store_of(file: &Path) -> PathBuf {
    file.ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "replicas"))
        .and_then(Path::parent)
        .expect("a replica file is under <store>/replicas")
        .to_owned()
}

/// A snapshot of the store's page index, as a table `pages` (see
/// [`util::index_snapshot`]).
fn page_index(file: &Path) -> Connection {
    util::index_snapshot(&store_of(file))
}

/// Where the page stored under `hash` is: its pack file, offset and length.
fn page_location(file: &Path, hash: &Hash) -> (PathBuf, u64, usize) {
    let (pack, offset, len): (i64, i64, i64) = page_index(file)
        .query_row(
            "SELECT pack, offset, len FROM pages WHERE hash = ?1",
            [&hash[..]],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("an indexed page");
    (
        store_of(file).join(format!("pages/{pack}.pack")),
        offset as u64,
        len as usize,
    )
}

/// The hash and stored bytes of page `pgno` of `version` in a replica file.
pub(crate) fn stored_page(file: &Path, version: u64, pgno: u32) -> (Hash, Vec<u8>) {
    use std::os::unix::fs::FileExt;
    let conn = Connection::open(file).expect("open replica file");
    let idx = (pgno - 1) / 1024;
    let chunk: Vec<u8> = conn
        .query_row(
            "SELECT c.hashes FROM manifest m JOIN chunks c ON c.hash = m.chunk
             WHERE m.version = ?1 AND m.idx = ?2",
            params![version as i64, idx],
            |r| r.get(0),
        )
        .expect("manifest chunk");
    let at = ((pgno - 1) % 1024) as usize * 32;
    let hash: Hash = chunk[at..at + 32].try_into().expect("32 bytes");
    let (pack, offset, len) = page_location(file, &hash);
    let mut data = vec![0u8; len];
    std::fs::File::open(&pack)
        .expect("open pack")
        .read_exact_at(&mut data, offset)
        .expect("page data");
    (hash, data)
}

/// Flips bits of one byte of a stored page, in place in its pack, as a bad disk would.
pub(crate) fn flip_stored(file: &Path, hash: &Hash, byte: usize, bits: u8) {
    use std::os::unix::fs::FileExt;
    let (pack, offset, len) = page_location(file, hash);
    assert!(byte < len);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pack)
        .expect("open pack");
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset + byte as u64).expect("read");
    b[0] ^= bits;
    f.write_all_at(&b, offset + byte as u64).expect("write");
}

/// The bytes of every pack of the store a replica file is in.
fn stored_bytes(file: &Path) -> u64 {
    std::fs::read_dir(store_of(file).join("pages")).map_or(0, |d| {
        d.flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".pack"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    })
}

/// How many pages the store holds (every replica's, each once).
fn stored_pages(file: &Path) -> i64 {
    page_index(file)
        .query_row("SELECT count(*) FROM pages", [], |r| r.get(0))
        .expect("count pages")
}

// ---- item 1: every byte that matters is hashed ----

#[test]
fn a_flipped_journal_mode_byte_in_the_store_is_a_failed_pull_not_a_broken_database() {
    for byte in [18usize, 19] {
        let b = Bench::new();
        let db = b.database("app.db", 200);
        ok(&b.push(&db, &[]), "push");
        let (hash, _) = stored_page(&b.replica_file(), 1, 1);
        flip_stored(&b.replica_file(), &hash, byte, 0x04); // 2 → 6: not a legal pair

        let out = b.pull(REPLICA, &b.path("restored.db"));
        assert_eq!(
            util::code(&out),
            EXIT_VERIFY,
            "byte {byte}: {}",
            util::stderr(&out)
        );
        assert!(
            util::stderr(&out).contains("damaged"),
            "{}",
            util::stderr(&out)
        );
        assert!(
            util::file_len(&b.path("restored.db")) == 0,
            "byte {byte}: nothing is written"
        );
    }
}

#[test]
fn flipped_counter_bytes_in_the_store_still_pull_a_good_database() {
    for byte in [25usize, 95] {
        let b = Bench::new();
        let db = b.database("app.db", 200);
        ok(&b.push(&db, &[]), "push");
        let (hash, _) = stored_page(&b.replica_file(), 1, 1);
        flip_stored(&b.replica_file(), &hash, byte, 0x5a);

        // Into a new file, and into an existing rollback-mode one.
        let fresh = b.path("fresh.db");
        ok(&b.pull(REPLICA, &fresh), "pull into a new file");
        let rollback = b.path("rollback.db");
        drop(util::create(&rollback, 4096, Mode::Rollback));
        // It holds a schema of its own: only --force pulls over it.
        let local = rollback.to_str().expect("utf-8");
        let out = b.run(&["pull", REPLICA, local, "--json", "--force"]);
        ok(&out, "pull into a rollback file");
        for (name, file) in [("new", &fresh), ("rollback", &rollback)] {
            assert_eq!(util::integrity(file), "ok", "byte {byte}, {name}");
            assert!(
                util::dump(file) == util::dump(&db),
                "byte {byte}, {name}: same rows"
            );
            assert_eq!(util::digest(file), util::digest(&db), "byte {byte}, {name}");
        }
        // Scrub agrees with the pulls: a counter is no damage.
        let (code, report) = b.scrub();
        assert_eq!(code, 0, "byte {byte}: {report}");
        assert_eq!(
            report["replicas"][0]["bad_pages"],
            serde_json::json!([]),
            "{report}"
        );
    }
}

// ---- item 2: a push that already landed ----

#[test]
fn a_push_equal_to_the_latest_version_succeeds_whatever_its_base() {
    let b = Bench::new();
    let db = b.database("app.db", 300);
    ok(&b.push(&db, &[]), "first push");
    // app.db changes; a copy of it lands as version 2 while app.db still records
    // version 1 (as when a push landed but its client died before the answer).
    util::insert_rows(&util::open(&db), 50, 300);
    util::checkpoint(&db);
    let copy = b.path("copy.db");
    std::fs::copy(&db, &copy).expect("copy");
    let v2 = ok(&b.push(&copy, &["--force"]), "the copy's push");
    assert_eq!(v2["version"], 2);

    // app.db's push is based on version 1 (its kept manifest too): equal content.
    let out = b.run(&["push", db.to_str().expect("utf-8"), REPLICA]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(
        util::stdout(&out).contains("already at version 2"),
        "{}",
        util::stdout(&out)
    );
    // A database never pushed (no base at all) with that content: the same answer.
    let never = b.path("never.db");
    std::fs::copy(&copy, &never).expect("copy");
    let out = b.run(&["push", never.to_str().expect("utf-8"), REPLICA]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(util::stdout(&out).contains("already at version 2"));
    let versions = ok(&b.run(&["versions", REPLICA, "--json"]), "versions");
    assert_eq!(versions.as_array().map(Vec::len), Some(2), "no new version");
}

#[test]
fn a_push_of_the_same_size_equal_to_the_latest_succeeds_and_one_that_differs_conflicts() {
    // The same page count in versions 1 and 2: the origin's kept manifest of version 1
    // would match READY's count, so the store must make it run the hash exchange.
    let b = Bench::new();
    let db = b.database("app.db", 300);
    ok(&b.push(&db, &[]), "first push");
    util::open(&db)
        .execute("UPDATE t SET k = 'same size' WHERE id % 7 = 0", [])
        .expect("update");
    util::checkpoint(&db);
    let copy = b.path("copy.db");
    std::fs::copy(&db, &copy).expect("copy");
    ok(&b.push(&copy, &["--force"]), "the copy's push");
    let versions = ok(&b.run(&["versions", REPLICA, "--json"]), "versions");
    assert_eq!(
        versions[0]["page_count"], versions[1]["page_count"],
        "the same page count in both versions"
    );
    let v = ok(&b.push(&db, &[]), "equal content, stale base");
    assert_eq!(
        (v["version"].as_u64(), v["created"].as_bool()),
        (Some(2), Some(false))
    );

    // Now a change of the same size on top of the copy, pushed; app.db, unchanged
    // since version 2, sends no page at all against its kept manifest unless told to
    // run the hash exchange: it must hear VERSION_CONFLICT, not a failed digest.
    util::open(&copy)
        .execute("UPDATE t SET k = 'copy' WHERE id = 3", [])
        .expect("update");
    ok(&b.push(&copy, &["--force"]), "v3");
    let pages_before = stored_pages(&b.replica_file());
    let out = b.push(&db, &[]);
    assert_eq!(util::code(&out), EXIT_CONFLICT, "{}", util::stderr(&out));
    assert!(
        util::stderr(&out).contains("is at version 3"),
        "{}",
        util::stderr(&out)
    );
    assert_eq!(
        stored_pages(&b.replica_file()),
        pages_before,
        "nothing stored"
    );
}

#[test]
fn a_real_conflict_names_the_version_its_time_and_client_and_stores_nothing() {
    let b = Bench::new();
    let db = b.database("app.db", 300);
    ok(&b.push(&db, &[]), "first push");
    let other = b.path("other.db");
    std::fs::copy(&db, &other).expect("copy");
    util::insert_rows(&util::open(&other), 10, 300);
    ok(&b.push(&other, &["--force"]), "the other push");
    util::insert_rows(&util::open(&db), 400, 300);
    let before = util::file_len(&b.replica_file())
        + util::file_len(&util::sidecar(&b.replica_file(), "-wal"));
    let pages_before = stored_pages(&b.replica_file());

    let out = b.push(&db, &[]);
    assert_eq!(util::code(&out), EXIT_CONFLICT, "{}", util::stderr(&out));
    let err = util::stderr(&out);
    for phrase in [
        "VERSION_CONFLICT",
        "acme/app.db is at version 2",
        "based on version 1",
        "Z by client", // RFC 3339 UTC time, then the client
        "push with --merge to merge this push's row changes onto version 2",
        "--force",
        "into another file",
    ] {
        assert!(err.contains(phrase), "{phrase:?} in {err}");
    }
    assert!(!err.contains("pull first"), "{err}");
    assert_eq!(
        stored_pages(&b.replica_file()),
        pages_before,
        "nothing stored"
    );
    let after = util::file_len(&b.replica_file())
        + util::file_len(&util::sidecar(&b.replica_file(), "-wal"));
    assert!(after <= before + 64 * 1024, "{before} -> {after}");
}

// ---- items 3 and 5: hostile origins through the engine API ----

/// A real two-page-or-more rollback database: its pages, as an origin would send them.
fn real_pages(dir: &Path) -> Vec<Vec<u8>> {
    let p = dir.join("real.db");
    let conn = util::create(&p, 4096, Mode::Rollback);
    util::insert_rows(&conn, 60, 300);
    drop(conn);
    std::fs::read(&p)
        .expect("read")
        .chunks(4096)
        .map(<[u8]>::to_vec)
        .collect()
}

/// The digest an origin of `pages` (4096 bytes each) sends.
pub(crate) fn digest_of(pages: &[Vec<u8>]) -> Hash {
    let mut d = Digest::new(4096, pages.len() as u32);
    for (i, p) in pages.iter().enumerate() {
        d.push(&page_hash(i as u32 + 1, p));
    }
    d.finish().expect("all pages")
}

/// Plays `frames` as an origin against a push into `store`; the replica's result.
fn hostile_push(store: &Store, frames: Vec<Frame>) -> sqlferry::Result<()> {
    let (mut origin, mut link) = mem_pair();
    let store = store.clone();
    let replica = std::thread::spawn(move || {
        let r = ReplicaPath::parse(REPLICA).expect("valid");
        let mut writer = store.push(
            &r,
            PushOptions {
                base: Some(1),
                client_id: "hostile".into(),
                ..PushOptions::default()
            },
        )?;
        run_replica(&mut writer, &mut link).map(|_| ())
    });
    for f in frames {
        if origin.send(&f).is_err() {
            break;
        }
    }
    while let Ok(frame) = origin.recv() {
        if matches!(frame, Frame::Error { .. } | Frame::Done { .. }) {
            break;
        }
    }
    drop(origin);
    replica.join().expect("no panic")
}

/// Runs a pull into the database file `local` against an origin that sends `frames`
/// (a hostile server), and returns what the pull's replica side made of them.
fn hostile_pull(local: &Path, frames: Vec<Frame>) -> sqlferry::Result<()> {
    let (mut origin, mut link) = mem_pair();
    let target = local.to_path_buf();
    let replica = std::thread::spawn(move || {
        let mut writer = sqlferry::page::Writer::open(&target)?;
        run_replica(&mut writer, &mut link).map(|_| ())
    });
    for f in frames {
        if origin.send(&f).is_err() {
            break;
        }
    }
    while let Ok(frame) = origin.recv() {
        if matches!(frame, Frame::Error { .. } | Frame::Done { .. }) {
            break;
        }
    }
    drop(origin);
    replica.join().expect("no panic")
}

fn begin(pages: &[Vec<u8>], flags: u8) -> Frame {
    Frame::Begin {
        version: PROTOCOL_VERSION,
        page_size: 4096,
        page_count: pages.len() as u32,
        base_version: 0,
        flags,
    }
}

fn all_pages(pages: &[Vec<u8>]) -> Vec<Frame> {
    pages
        .iter()
        .enumerate()
        .map(|(i, p)| Frame::Page {
            pgno: i as u32 + 1,
            data: p.clone(),
        })
        .collect()
}

/// A store with version 1 of the replica, made of `pages`.
fn store_with_v1(b: &Bench, pages: &[Vec<u8>]) -> Store {
    let store = Store::new(b.store());
    let mut frames = vec![begin(pages, 0)];
    frames.extend(all_pages(pages));
    frames.push(Frame::Commit {
        page_count: pages.len() as u32,
        digest: digest_of(pages),
    });
    hostile_push(&store, frames).expect("an honest first push");
    store
}

fn version_count(store: &Store) -> usize {
    store
        .versions(&ReplicaPath::parse(REPLICA).expect("valid"))
        .map_or(0, |v| v.len())
}

#[test]
fn begin_flags_outside_the_defined_bits_are_refused() {
    let b = Bench::new();
    let pages = real_pages(b.dir.path());
    let store = store_with_v1(&b, &pages);
    let mut changed = pages.clone();
    changed[1][3000] ^= 1;
    for flags in [0x08u8, 0x80, 0xff] {
        let mut frames = vec![begin(&changed, flags)];
        frames.extend(all_pages(&changed));
        frames.push(Frame::Commit {
            page_count: changed.len() as u32,
            digest: digest_of(&changed),
        });
        let err = hostile_push(&store, frames).expect_err("unknown flags");
        assert_eq!(err.kind(), sqlferry::ErrorKind::Protocol, "{err}");
        assert!(err.to_string().contains("BEGIN flags"), "{err}");
        assert_eq!(version_count(&store), 1, "flags {flags:#x}: nothing stored");
    }
    // The sealed flag (0x04) is known, and refused from a push that named no
    // encryption key (and into a plaintext replica), before anything is stored.
    let mut frames = vec![begin(&changed, 0x04)];
    frames.extend(all_pages(&changed));
    let err = hostile_push(&store, frames).expect_err("a sealed session");
    assert_eq!(err.kind(), sqlferry::ErrorKind::Protocol, "{err}");
    assert!(
        err.to_string().contains("without its encryption key id"),
        "{err}"
    );
    assert_eq!(version_count(&store), 1, "sealed: nothing stored");
    // The chunked digest's flag (0x02) is known, and holds the origin to that form: a
    // COMMIT with digest 1 is a digest that does not match.
    let mut frames = vec![begin(&changed, 0x02)];
    frames.extend(all_pages(&changed));
    frames.push(Frame::Commit {
        page_count: changed.len() as u32,
        digest: digest_of(&changed),
    });
    let err = hostile_push(&store, frames).expect_err("digest 1 under the chunked flag");
    assert_eq!(err.kind(), sqlferry::ErrorKind::Verification, "{err}");
    assert_eq!(version_count(&store), 1, "nothing stored");
}

/// The chunked digest of `pages` (4096 bytes each).
fn chunked_digest_of(pages: &[Vec<u8>]) -> Hash {
    use sqlferry::digest::{DigestForm, Digester};
    let mut d = Digester::new(DigestForm::Chunked, 4096, pages.len() as u32);
    for (i, p) in pages.iter().enumerate() {
        d.push(&page_hash(i as u32 + 1, p));
    }
    d.finish().expect("all pages")
}

#[test]
fn a_push_by_chunks_that_asks_for_nodes_after_all_is_answered_with_the_tree_it_names() {
    let b = Bench::new();
    let pages = real_pages(b.dir.path());
    let store = store_with_v1(&b, &pages);
    let mut changed = pages.clone();
    changed[1][3000] ^= 1;
    let n = changed.len() as u32;
    // Known base and chunked digest: the store builds no tree at BEGIN. A page comes,
    // then a WANT for every page hash: the answer is the base's hashes with the page
    // received set, and the push commits what it sent.
    let (mut origin, mut link) = mem_pair();
    let writer_store = store.clone();
    let replica = std::thread::spawn(move || {
        let r = ReplicaPath::parse(REPLICA).expect("valid");
        let mut writer = writer_store.push(
            &r,
            PushOptions {
                base: Some(1),
                ..PushOptions::default()
            },
        )?;
        run_replica(&mut writer, &mut link).map(|_| ())
    });
    for f in [
        Frame::Begin {
            version: PROTOCOL_VERSION,
            page_size: 4096,
            page_count: n,
            base_version: 1,
            flags: 0x03,
        },
        Frame::Page {
            pgno: 2,
            data: changed[1].clone(),
        },
        Frame::Want {
            level: 0,
            runs: vec![sqlferry::protocol::Run { start: 0, count: n }],
        },
    ] {
        origin.send(&f).expect("sent");
    }
    let mut answered = Vec::new();
    while answered.len() < n as usize {
        match origin.recv().expect("the replica answers") {
            Frame::Nodes { hashes, .. } => answered.extend(hashes),
            Frame::Ready { page_count } => assert_eq!(page_count, n),
            other => panic!("unexpected {}", other.name()),
        }
    }
    let expected: Vec<Hash> = changed
        .iter()
        .enumerate()
        .map(|(i, p)| page_hash(i as u32 + 1, p))
        .collect();
    assert_eq!(
        answered, expected,
        "the base's hashes, with page 2 as received"
    );
    origin
        .send(&Frame::Commit {
            page_count: n,
            digest: chunked_digest_of(&changed),
        })
        .expect("sent");
    assert!(matches!(origin.recv(), Ok(Frame::Done { .. })));
    drop(origin);
    replica.join().expect("no panic").expect("committed");
    let versions = store
        .versions(&ReplicaPath::parse(REPLICA).expect("valid"))
        .expect("versions");
    assert_eq!(versions.len(), 2);
    assert_eq!(
        versions[1].digest,
        sqlferry::digest::hex(&digest_of(&changed)),
        "the version's digest 1, computed from what was checked"
    );
}

#[test]
fn a_version_whose_page_1_is_no_sqlite_header_or_disagrees_is_refused() {
    let b = Bench::new();
    let pages = real_pages(b.dir.path());
    let store = store_with_v1(&b, &pages);
    let n = pages.len() as u32;
    type Spoil = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Spoil)> = vec![
        (
            "not a header",
            Box::new(|p| p[..16].copy_from_slice(b"not SQLite at al")),
        ),
        (
            "page size",
            Box::new(|p| p[16..18].copy_from_slice(&8192u16.to_be_bytes())),
        ),
        (
            "page count",
            Box::new(move |p| p[28..32].copy_from_slice(&(n + 5).to_be_bytes())),
        ),
        ("journal mode", Box::new(|p| p[18] = 3)),
    ];
    let pages_before =
        stored_pages(&store.replica_file(&ReplicaPath::parse(REPLICA).expect("valid")));
    for (what, spoil) in cases {
        let mut bad = pages.clone();
        spoil(&mut bad[0]);
        let mut frames = vec![begin(&bad, 0)];
        frames.extend(all_pages(&bad));
        frames.push(Frame::Commit {
            page_count: n,
            digest: digest_of(&bad),
        });
        let err = hostile_push(&store, frames).expect_err(what);
        assert_eq!(
            err.kind(),
            sqlferry::ErrorKind::Verification,
            "{what}: {err}"
        );
        assert!(err.to_string().contains("page 1"), "{what}: {err}");
        assert_eq!(version_count(&store), 1, "{what}: no version");
        assert_eq!(
            stored_pages(&store.replica_file(&ReplicaPath::parse(REPLICA).expect("valid"))),
            pages_before,
            "{what}: no page kept"
        );
    }
}

#[test]
fn a_pull_refuses_a_page_1_with_illegal_journal_mode_bytes_whoever_sends_it() {
    // An origin (a hostile server) whose digest covers its illegal page 1 honestly.
    let b = Bench::new();
    let mut pages = real_pages(b.dir.path());
    pages[0][18] = 3;
    pages[0][19] = 3;
    for existing in [false, true] {
        let local = b.path(&format!("local-{existing}.db"));
        if existing {
            let conn = util::create(&local, 4096, Mode::Rollback);
            util::insert_rows(&conn, 5, 100);
        }
        let before = std::fs::read(&local).unwrap_or_default();
        let mut frames = vec![begin(&pages, 0)];
        frames.extend(all_pages(&pages));
        frames.push(Frame::Commit {
            page_count: pages.len() as u32,
            digest: digest_of(&pages),
        });
        let err = hostile_pull(&local, frames).expect_err("refused");
        assert_eq!(err.kind(), sqlferry::ErrorKind::Verification, "{err}");
        assert!(err.to_string().contains("page 1"), "{err}");
        assert_eq!(
            std::fs::read(&local).unwrap_or_default(),
            before,
            "existing {existing}: untouched"
        );
    }
}

#[test]
fn a_pull_refuses_an_origin_asking_for_the_chunked_digest_it_never_offered() {
    // A server (hostile, or newer and wrong) that sets BEGIN's chunked-digest bit on a
    // pull, with a chunked digest that is right for its pages: a database file records
    // digest 1 of what it pulled, so taking it would make the next pull see "LOCAL
    // changed". Refused before anything is written.
    let b = Bench::new();
    let pages = real_pages(b.dir.path());
    for existing in [false, true] {
        let local = b.path(&format!("local-{existing}.db"));
        if existing {
            let conn = util::create(&local, 4096, Mode::Rollback);
            util::insert_rows(&conn, 5, 100);
        }
        let before = std::fs::read(&local).unwrap_or_default();
        let mut frames = vec![begin(&pages, 0x02)];
        frames.extend(all_pages(&pages));
        frames.push(Frame::Commit {
            page_count: pages.len() as u32,
            digest: chunked_digest_of(&pages),
        });
        let err = hostile_pull(&local, frames).expect_err("refused");
        assert_eq!(err.kind(), sqlferry::ErrorKind::Protocol, "{err}");
        assert!(err.to_string().contains("chunked digest"), "{err}");
        assert_eq!(
            std::fs::read(&local).unwrap_or_default(),
            before,
            "existing {existing}: untouched"
        );
    }
}

#[test]
fn a_page_sent_twice_is_refused_and_nothing_is_kept() {
    let b = Bench::new();
    let pages = real_pages(b.dir.path());
    let store = store_with_v1(&b, &pages);
    let file = store.replica_file(&ReplicaPath::parse(REPLICA).expect("valid"));
    let pages_before = stored_pages(&file);
    let mut changed = pages.clone();
    changed[1][3000] ^= 1;
    let mut frames = vec![begin(&changed, 0)];
    // 500 junk copies of page 2 before the real one: each a page no version would use.
    for i in 0..500u32 {
        let mut junk = vec![0u8; 4096];
        junk[..4].copy_from_slice(&i.to_be_bytes());
        frames.push(Frame::Page {
            pgno: 2,
            data: junk,
        });
    }
    frames.extend(all_pages(&changed));
    frames.push(Frame::Commit {
        page_count: changed.len() as u32,
        digest: digest_of(&changed),
    });
    let err = hostile_push(&store, frames).expect_err("page 2 twice");
    assert!(err.to_string().contains("sent twice"), "{err}");
    assert_eq!(version_count(&store), 1);
    assert_eq!(stored_pages(&file), pages_before);
}

#[test]
fn pages_a_push_stores_but_its_version_does_not_use_are_not_kept() {
    let b = Bench::new();
    let pages = real_pages(b.dir.path());
    let store = store_with_v1(&b, &pages);
    let r = ReplicaPath::parse(REPLICA).expect("valid");
    let file = store.replica_file(&r);
    let pages_before = stored_pages(&file);
    let bytes_before = stored_bytes(&file);
    let mut changed = pages.clone();
    changed[1][3000] ^= 1;
    let mut writer = store
        .push(
            &r,
            PushOptions {
                base: Some(1),
                ..PushOptions::default()
            },
        )
        .expect("push");
    let n = changed.len() as u32;
    let held = writer
        .begin(&BeginInfo {
            page_size: 4096,
            page_count: n,
            base_version: 1,
            known_base: false,
            chunked_digest: false,
            sealed: false,
        })
        .expect("begin");
    assert_eq!(held, n);
    // A target driven directly: 2,000 pages written that the version will not use.
    for i in 0..2000u32 {
        let mut junk = vec![1u8; 4096];
        junk[..4].copy_from_slice(&i.to_be_bytes());
        let h = page_hash(3, &junk);
        writer
            .write_page(3 + (i % (n - 2)), junk, &h)
            .expect("write");
    }
    let h2 = page_hash(2, &changed[1]);
    writer
        .write_page(2, changed[1].clone(), &h2)
        .expect("write");
    let hashes: Vec<Hash> = changed
        .iter()
        .enumerate()
        .map(|(i, p)| page_hash(i as u32 + 1, p))
        .collect();
    writer
        .commit(n, &digest_of(&changed), &mut hashes.iter().map(|h| Ok(*h)))
        .expect("commit");
    drop(writer);
    assert_eq!(version_count(&store), 2);
    assert_eq!(
        stored_pages(&file),
        pages_before + 1,
        "only the changed page is new"
    );
    assert_eq!(
        stored_bytes(&file),
        bytes_before + 4096,
        "only the changed page's bytes are kept"
    );
    // And version 2 is what was pushed.
    let out = Bench::run(
        &b,
        &[
            "pull",
            &format!("{REPLICA}@2"),
            b.path("v2.db").to_str().expect("utf-8"),
            "--json",
        ],
    );
    let report = ok(&out, "pull v2");
    assert_eq!(
        report["digest"],
        sqlferry::digest::hex(&digest_of(&changed))
    );
}

// ---- item 4: damaged pages are found, reported and repaired ----

#[test]
fn a_damaged_page_fails_the_pull_and_the_next_push_of_the_same_database_repairs_it() {
    let b = Bench::new();
    let db = b.database("app.db", 400);
    ok(&b.push(&db, &[]), "first push");
    let (hash, _) = stored_page(&b.replica_file(), 1, 5);
    flip_stored(&b.replica_file(), &hash, 1000, 0x01);

    let out = b.pull(REPLICA, &b.path("restored.db"));
    assert_eq!(util::code(&out), EXIT_VERIFY, "{}", util::stderr(&out));
    let err = util::stderr(&out);
    assert!(err.contains("page 5") && err.contains("damaged"), "{err}");

    // The same database again, with its kept manifest (no hash would travel): the
    // damaged page is sent again and replaced, and the push says so.
    let out = b.run(&["push", db.to_str().expect("utf-8"), REPLICA]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let said = util::stdout(&out);
    assert!(
        said.contains("repaired")
            && said.contains("already at version 1")
            && !said.contains("no change"),
        "{said}"
    );
    let restored = b.path("restored.db");
    ok(&b.pull(REPLICA, &restored), "pull after the repair");
    util::assert_same(&db, &restored);
    assert_eq!(b.scrub().0, 0);
}

#[test]
fn a_version_whose_manifest_lost_a_chunk_is_refused_by_name_and_a_push_makes_a_whole_one() {
    let b = Bench::new();
    // More than one manifest chunk (1,024 pages each).
    let db = b.database("app.db", 20_000);
    ok(&b.push(&db, &[]), "v1");
    util::open(&db)
        .execute("UPDATE t SET k = 'changed' WHERE id = 1", [])
        .expect("update");
    ok(&b.push(&db, &[]), "v2");
    let n = Connection::open(b.replica_file())
        .expect("open replica file")
        .execute("DELETE FROM manifest WHERE version = 2 AND idx = 1", [])
        .expect("delete a manifest row");
    assert_eq!(n, 1);

    // The pull names the version and what is wrong with it, before writing anything.
    let restored = b.path("restored.db");
    let out = b.pull(REPLICA, &restored);
    assert_eq!(util::code(&out), EXIT_VERIFY, "{}", util::stderr(&out));
    let err = util::stderr(&out);
    assert!(
        err.contains(
            "acme/app.db@2 is damaged in the store: its manifest has no chunk 1 (pages 1025–"
        ) && err.contains("Pull another version"),
        "{err}"
    );
    assert!(!restored.exists());
    // The other version is whole.
    ok(
        &b.pull(&format!("{REPLICA}@1"), &b.path("v1.db")),
        "pull v1",
    );
    assert_eq!(util::integrity(&b.path("v1.db")), "ok");

    // Scrub says the same, and that no push repairs it.
    let (code, report) = b.scrub();
    assert_eq!(code, EXIT_VERIFY, "{report}");
    let bad = &report["replicas"][0]["bad_versions"];
    assert_eq!(bad.as_array().map(Vec::len), Some(1), "{report}");
    assert_eq!(bad[0]["number"], 2);
    assert_eq!(bad[0]["repairable"], false);
    assert!(
        bad[0]["problem"]
            .as_str()
            .is_some_and(|p| p.starts_with("its manifest has no chunk 1")),
        "{report}"
    );
    let out = util::sqlferry(b.dir.path())
        .args(["scrub", "--data"])
        .arg(b.store())
        .output()
        .expect("scrub");
    let said = util::stdout(&out);
    assert!(
        said.contains("nothing repairs it")
            && said.contains("push the database to make a whole new latest one"),
        "{said}"
    );

    // Following that advice: the same database pushed again makes version 3, whole,
    // though its content is version 2's.
    let v3 = ok(&b.push(&db, &[]), "push after the damage");
    assert_eq!(v3["version"], 3, "{v3}");
    ok(&b.pull(REPLICA, &restored), "pull v3");
    util::assert_same(&db, &restored);
    assert_eq!(util::integrity(&restored), "ok");
    // Version 2 stays as it was: damaged, and the only bad one.
    let (code, report) = b.scrub();
    assert_eq!(code, EXIT_VERIFY, "{report}");
    let bad = &report["replicas"][0]["bad_versions"];
    assert_eq!(bad.as_array().map(Vec::len), Some(1), "{report}");
    assert_eq!(bad[0]["number"], 2);
}

/// Zeroes the page hashes of the chunks of `version`'s manifest that `which` (an SQL
/// condition on `idx`) selects, in place, as a bad disk would; returns how many.
fn zero_chunks(file: &Path, version: u64, which: &str) -> usize {
    Connection::open(file)
        .expect("open replica file")
        .execute(
            &format!(
                "UPDATE chunks SET hashes = zeroblob(length(hashes))
                 WHERE hash IN (SELECT chunk FROM manifest WHERE version = ?1 AND {which})"
            ),
            [version as i64],
        )
        .expect("zero chunks")
}

#[test]
fn a_damaged_chunk_of_page_hashes_is_named_and_a_push_of_the_same_pages_heals_every_version() {
    let b = Bench::new();
    let db = b.database("app.db", 40_000);
    ok(&b.push(&db, &[]), "v1");
    // Row 1's blob: its table leaf and the header, both in chunk 0, so the later chunks
    // are shared. (Changing `k` moved entries of the index on it, on pages anywhere in
    // the file: now and then every chunk differed and no chunk was shared.)
    util::open(&db)
        .execute("UPDATE t SET v = randomblob(300) WHERE id = 1", [])
        .expect("update");
    ok(&b.push(&db, &[]), "v2");
    // A chunk both versions share.
    let idx: u32 = Connection::open(b.replica_file())
        .expect("open replica file")
        .query_row(
            "SELECT a.idx FROM manifest a JOIN manifest b ON b.idx = a.idx AND b.chunk = a.chunk
             WHERE a.version = 1 AND b.version = 2 ORDER BY a.idx LIMIT 1",
            [],
            |r| r.get(0),
        )
        .expect("a shared chunk");
    assert_eq!(
        zero_chunks(&b.replica_file(), 2, &format!("idx = {idx}")),
        1
    );

    let restored = b.path("restored.db");
    let out = b.pull(REPLICA, &restored);
    assert_eq!(util::code(&out), EXIT_VERIFY, "{}", util::stderr(&out));
    let err = util::stderr(&out);
    assert!(
        err.contains(&format!(
            "acme/app.db@2 is damaged in the store: chunk {idx} of its manifest (pages {}–",
            idx * 1024 + 1
        )) && err.contains("its page hashes no longer match their key")
            && err.contains("repairs this one too"),
        "{err}"
    );
    assert!(!restored.exists());

    // Scrub names both versions, and no page: the zeroed hashes name nothing.
    let (code, report) = b.scrub();
    assert_eq!(code, EXIT_VERIFY, "{report}");
    let r = &report["replicas"][0];
    assert_eq!(r["bad_pages"], serde_json::json!([]), "{report}");
    let bad: Vec<_> = r["bad_versions"]
        .as_array()
        .expect("bad versions")
        .iter()
        .map(|v| (v["number"].clone(), v["repairable"].clone()))
        .collect();
    assert_eq!(
        bad,
        [(1.into(), true.into()), (2.into(), true.into())],
        "{report}"
    );

    // The same database pushed again: a whole new version, and the chunk stored whole
    // again under its key, so the older versions are whole too.
    let v3 = ok(&b.push(&db, &[]), "push after the damage");
    assert_eq!(v3["version"], 3, "{v3}");
    ok(&b.pull(REPLICA, &restored), "pull v3");
    util::assert_same(&db, &restored);
    for v in [1, 2] {
        let out = b.path(&format!("v{v}.db"));
        ok(
            &b.pull(&format!("{REPLICA}@{v}"), &out),
            "pull an older version",
        );
        assert_eq!(util::integrity(&out), "ok");
    }
    let (code, report) = b.scrub();
    assert_eq!(code, 0, "{report}");
}

#[test]
fn a_damaged_chunk_found_by_a_push_at_commit_stores_nothing_and_the_next_push_repairs_it() {
    let b = Bench::new();
    let db = b.database("app.db", 20_000);
    ok(&b.push(&db, &[]), "v1");
    // Every chunk of the latest version damaged, and nothing recorded: the push that
    // changes a page reads the chunk of that page only at COMMIT.
    assert!(zero_chunks(&b.replica_file(), 1, "1") > 1);
    util::open(&db)
        .execute("UPDATE t SET k = 'changed' WHERE id = 1", [])
        .expect("update");
    let out = b.push(&db, &[]);
    assert_eq!(util::code(&out), EXIT_VERIFY, "{}", util::stderr(&out));
    let err = util::stderr(&out);
    assert!(
        err.contains("acme/app.db@1 is damaged in the store: chunk 0 of its manifest")
            && err.contains("nothing was stored, and the next push of the database repairs it"),
        "{err}"
    );
    assert_eq!(
        Connection::open(b.replica_file())
            .expect("open replica file")
            .query_row("SELECT count(*) FROM versions", [], |r| r.get::<_, i64>(0))
            .expect("count"),
        1
    );

    // Its advice, followed.
    let v2 = ok(&b.push(&db, &[]), "the next push");
    assert_eq!(v2["version"], 2, "{v2}");
    let restored = b.path("restored.db");
    ok(&b.pull(REPLICA, &restored), "pull v2");
    util::assert_same(&db, &restored);
    assert_eq!(util::integrity(&restored), "ok");
}

#[test]
fn scrub_reports_bad_pages_and_versions_and_a_later_push_makes_every_version_pullable() {
    let b = Bench::new();
    let db = b.database("app.db", 400);
    ok(&b.push(&db, &[]), "v1");
    let (code, clean) = b.scrub();
    assert_eq!(code, 0, "{clean}");
    assert_eq!(clean["replicas"][0]["replica"], REPLICA);

    let (hash, _) = stored_page(&b.replica_file(), 1, 7);
    flip_stored(&b.replica_file(), &hash, 2000, 0x80);
    let (code, report) = b.scrub();
    assert_eq!(code, EXIT_VERIFY, "{report}");
    let r = &report["replicas"][0];
    assert_eq!(r["bad_pages"][0]["hash"], sqlferry::digest::hex(&hash));
    assert_eq!(r["bad_pages"][0]["problem"], "damaged");
    assert_eq!(r["bad_pages"][0]["versions"], serde_json::json!([1]));
    assert_eq!(r["bad_versions"][0]["number"], 1);

    // The text form says the same, with exit 7.
    let out = util::sqlferry(b.dir.path())
        .args(["scrub", "--data"])
        .arg(b.store())
        .output()
        .expect("scrub");
    assert_eq!(util::code(&out), EXIT_VERIFY);
    assert!(
        util::stdout(&out).contains("damaged page"),
        "{}",
        util::stdout(&out)
    );

    // A change elsewhere, pushed: page 7 is resent though it did not change, so both
    // versions pull.
    util::open(&db)
        .execute("UPDATE t SET k = 'changed' WHERE id = 1", [])
        .expect("update");
    let v2 = ok(&b.push(&db, &[]), "v2");
    assert_eq!(v2["version"], 2);
    assert_eq!(v2["repaired"], 1);
    let restored = b.path("restored.db");
    ok(&b.pull(REPLICA, &restored), "pull v2");
    util::assert_same(&db, &restored);
    ok(
        &b.pull(&format!("{REPLICA}@1"), &b.path("v1.db")),
        "pull v1",
    );
    assert_eq!(util::integrity(&b.path("v1.db")), "ok");
    assert_eq!(b.scrub().0, 0);
}

#[test]
fn a_missing_page_is_found_by_scrub_and_brought_back_by_the_next_push() {
    let b = Bench::new();
    let db = b.database("app.db", 400);
    ok(&b.push(&db, &[]), "v1");
    let (hash, _) = stored_page(&b.replica_file(), 1, 9);
    // Its bytes gone too (zeros, as a collection's hole reads): the version's place
    // hint names bytes that no longer check, and the index names none.
    {
        use std::os::unix::fs::FileExt;
        let (pack, offset, len) = page_location(&b.replica_file(), &hash);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&pack)
            .expect("open pack")
            .write_all_at(&vec![0u8; len], offset)
            .expect("zero the page");
    }
    assert!(
        util::forget_page(&store_of(&b.replica_file()), &hash[..]),
        "the page was indexed"
    );
    let (code, report) = b.scrub();
    assert_eq!(code, EXIT_VERIFY, "{report}");
    let bad = &report["replicas"][0]["bad_pages"][0];
    assert_eq!(
        (bad["problem"].as_str(), bad["versions"].clone()),
        (Some("missing"), serde_json::json!([1]))
    );
    let out = b.pull(REPLICA, &b.path("restored.db"));
    assert_eq!(util::code(&out), EXIT_VERIFY, "{}", util::stderr(&out));
    assert!(
        util::stderr(&out).contains("missing"),
        "{}",
        util::stderr(&out)
    );

    let again = ok(&b.push(&db, &[]), "the same database again");
    assert_eq!(
        (again["created"].as_bool(), again["repaired"].as_u64()),
        (Some(false), Some(1))
    );
    let restored = b.path("restored.db");
    ok(&b.pull(REPLICA, &restored), "pull");
    util::assert_same(&db, &restored);
    assert_eq!(b.scrub().0, 0);
}

#[test]
fn a_push_on_a_base_whose_page_1_is_damaged_is_refused_then_repaired() {
    let b = Bench::new();
    let db = b.database("app.db", 400);
    ok(&b.push(&db, &[]), "v1");
    let (hash, _) = stored_page(&b.replica_file(), 1, 1);
    flip_stored(&b.replica_file(), &hash, 3000, 0x01);

    // A change that leaves page 1's hash alone: the new version would reuse the damaged
    // page 1, which the store reads back and refuses.
    util::open(&db)
        .execute("UPDATE t SET k = 'changed' WHERE id = 300", [])
        .expect("update");
    let out = b.push(&db, &[]);
    assert_eq!(util::code(&out), EXIT_VERIFY, "{}", util::stderr(&out));
    assert!(
        util::stderr(&out).contains("page 1 of acme/app.db is damaged"),
        "{}",
        util::stderr(&out)
    );
    let versions = ok(&b.run(&["versions", REPLICA, "--json"]), "versions");
    assert_eq!(versions.as_array().map(Vec::len), Some(1), "nothing stored");

    // Recorded: the next push sends page 1 again.
    let v2 = ok(&b.push(&db, &[]), "v2");
    assert_eq!(
        (v2["version"].as_u64(), v2["repaired"].as_u64()),
        (Some(2), Some(1))
    );
    let restored = b.path("restored.db");
    ok(&b.pull(REPLICA, &restored), "pull v2");
    util::assert_same(&db, &restored);
    assert_eq!(b.scrub().0, 0);
}

// ---- item 6: files a crashed push left ----

fn leftovers(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    n.ends_with(".new") || n.ends_with(".new-wal") || n.ends_with(".new-shm")
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn files_a_dead_push_left_are_removed_but_not_those_of_a_live_one() {
    let b = Bench::new();
    let db = b.database("app.db", 100);
    let dir = b.store().join("replicas/acme");
    std::fs::create_dir_all(&dir).expect("mkdir");
    // A dead push's private file with its WAL and shared memory, and a WAL whose file
    // is gone; and one a live push holds (its lock, taken here).
    for name in [
        ".app.db.sqlferry.dead01.new",
        ".app.db.sqlferry.dead01.new-wal",
        ".app.db.sqlferry.dead01.new-shm",
        ".app.db.sqlferry.gone02.new-wal",
        ".app.db.sqlferry.live03.new",
    ] {
        std::fs::write(dir.join(name), vec![0u8; 100_000]).expect("write");
    }
    let live = std::fs::File::open(dir.join(".app.db.sqlferry.live03.new")).expect("open");
    live.lock().expect("lock");

    ok(&b.push(&db, &[]), "push");
    assert_eq!(
        leftovers(&dir),
        vec![".app.db.sqlferry.live03.new".to_owned()]
    );
    drop(live);
    ok(&b.pull(REPLICA, &b.path("copy.db")), "pull");
    assert_eq!(leftovers(&dir), Vec::<String>::new());
}

#[test]
fn a_first_push_killed_half_way_leaves_nothing_after_the_next_push() {
    let b = Bench::new();
    let db = b.path("big.db");
    let conn = util::create(&db, 4096, Mode::Wal);
    util::fill(&conn, 40_000_000, 4000);
    drop(conn);
    let dir = b.store().join("replicas/acme");
    let mut child = util::sqlferry(b.dir.path())
        .args([
            "push",
            db.to_str().expect("utf-8"),
            REPLICA,
            "--server",
            &b.url(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn push");
    // Killed once its pack holds some of the database (appended, never committed).
    let packs = b.store().join("pages");
    let pack_bytes = || -> u64 {
        std::fs::read_dir(&packs).map_or(0, |d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".pack"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
    };
    let grew = util::wait_until(Duration::from_secs(60), Duration::from_millis(5), || {
        pack_bytes() > 4_000_000
    });
    assert!(grew, "the push's pack never grew");
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    assert!(!leftovers(&dir).is_empty(), "the kill left files");
    assert!(!b.replica_file().exists(), "no replica yet");

    ok(&b.push(&db, &[]), "the next push");
    assert_eq!(leftovers(&dir), Vec::<String>::new());
    // The torn tail was cut off: the packs hold the database once, not once and a half.
    let size = std::fs::metadata(&db).expect("db").len();
    assert!(
        pack_bytes() <= size,
        "packs {} for a database of {size}",
        pack_bytes()
    );
    let copy = b.path("copy.db");
    ok(&b.pull(REPLICA, &copy), "pull");
    assert_eq!(util::digest(&copy), util::digest(&db));
}

// ---- the same through a real server ----

#[test]
fn through_a_server_a_damaged_page_is_refused_scrubbed_and_repaired() {
    use crate::server::{Machine, TestServer};
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let a = Machine::new(dir.path(), "a");
    let db = a.path("app.db");
    let conn = util::create(&db, 4096, Mode::Wal);
    util::insert_rows(&conn, 400, 300);
    drop(conn);
    a.push(&server, "app.db", REPLICA, &["--key", &server.admin_key]);
    let file = server.replica_file(REPLICA);
    let (hash, _) = stored_page(&file, 1, 4);
    flip_stored(&file, &hash, 100, 0x10);

    // The server finds it on a pull, and says which page of which version.
    let out = a.run_on(&server, ["pull", REPLICA, "copy.db"]);
    assert_eq!(util::code(&out), EXIT_VERIFY, "{}", util::stderr(&out));
    assert!(
        util::stderr(&out).contains("page 4 of acme/app.db@1 is damaged"),
        "{}",
        util::stderr(&out)
    );
    // scrub on the running server's data directory reports it too.
    let data = file
        .ancestors()
        .nth(3)
        .expect("data/replicas/acme/app.db.sqlferry")
        .to_owned();
    let out = util::sqlferry(dir.path())
        .args(["scrub", "--json", "--data"])
        .arg(&data)
        .output()
        .expect("scrub");
    assert_eq!(util::code(&out), EXIT_VERIFY, "{}", util::stderr(&out));

    // The same database pushed again: the page is resent and the answer says so.
    let r = a.push(&server, "app.db", REPLICA, &[]);
    assert_eq!(r.0["created"], false);
    assert_eq!(r.0["repaired"], 1);
    a.pull(&server, REPLICA, Some("copy.db"), &[]);
    util::assert_same(&db, &a.path("copy.db"));
    let out = util::sqlferry(dir.path())
        .args(["scrub", "--data"])
        .arg(&data)
        .output()
        .expect("scrub");
    assert_eq!(util::code(&out), 0, "{}", util::stdout(&out));
}

#[test]
fn through_a_server_a_push_whose_answer_was_lost_is_already_there_next_time() {
    use crate::server::{Machine, TestServer};
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let a = Machine::new(dir.path(), "a");
    let db = a.path("app.db");
    let conn = util::create(&db, 4096, Mode::Wal);
    util::insert_rows(&conn, 400, 300);
    drop(conn);
    a.push(&server, "app.db", REPLICA, &["--key", &server.admin_key]);
    util::open(&db)
        .execute("UPDATE t SET k = 'second' WHERE id % 9 = 0", [])
        .expect("update");

    // Version 2 lands, but the client is left as if killed before the answer: its
    // history and kept manifest still say version 1.
    let before = a.state();
    let r = a.push(&server, "app.db", REPLICA, &[]);
    assert_eq!(r.u64("version"), 2);
    for (path, bytes) in &before {
        std::fs::write(path, bytes).expect("restore the client's state");
    }

    let out = a.run_on(&server, ["push", "app.db", REPLICA]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(
        util::stdout(&out).contains("already at version 2"),
        "{}",
        util::stdout(&out)
    );
    assert_eq!(server.version_numbers(REPLICA), vec![1, 2]);
}

#[test]
fn a_first_push_resent_while_the_first_still_publishes_is_already_there() {
    // The trials' case: a first push's client is killed after COMMIT; the server still
    // publishes it when the same client pushes again, so both push sessions build the
    // new replica in private files. The second to publish holds the same content: it
    // succeeds with no new version. One with other content is refused, nothing lost.
    use sqlferry::engine::{NoProgress, sync_local};
    use sqlferry::page::Snapshot;
    let b = Bench::new();
    let db = b.database("app.db", 200);
    let store = Store::new(b.store());
    let replica = ReplicaPath::parse(REPLICA).expect("valid");
    let first = || {
        store
            .push(&replica, PushOptions::default())
            .expect("open a push")
    };
    // Both open before either commits: neither sees a replica.
    let (mut one, mut two) = (first(), first());
    sync_local(&mut Snapshot::open(&db).expect("db"), &mut one, &NoProgress)
        .expect("the first publishes");
    let stats = sync_local(&mut Snapshot::open(&db).expect("db"), &mut two, &NoProgress)
        .expect("the same content, resent, is already there");
    let (version, created) = two.outcome().expect("an outcome");
    assert_eq!((version.number, created), (1, false));
    assert_eq!(version.digest, stats.digest);

    // Other content, on another new replica: the first to publish stands.
    let race = ReplicaPath::parse("acme/race.db").expect("valid");
    let open = || {
        store
            .push(&race, PushOptions::default())
            .expect("open a push")
    };
    let (mut winner, mut loser) = (open(), open());
    let other = b.database("other.db", 150);
    sync_local(
        &mut Snapshot::open(&db).expect("db"),
        &mut winner,
        &NoProgress,
    )
    .expect("the first publishes");
    let err = sync_local(
        &mut Snapshot::open(&other).expect("db"),
        &mut loser,
        &NoProgress,
    )
    .expect_err("other content is refused");
    assert!(err.to_string().contains("with other content"), "{err}");
    let versions = store.versions(&race).expect("versions");
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0].digest, util::digest(&db));
}

// ---- verify --all-versions ----

#[test]
fn verify_all_versions_names_the_one_damaged_version_and_checks_the_others() {
    let b = Bench::new();
    let db = b.database("app.db", 300);
    ok(&b.push(&db, &[]), "push 1");
    for n in 2..=3 {
        util::open(&db)
            .execute_batch("UPDATE t SET v = randomblob(300)")
            .expect("update");
        ok(&b.push(&db, &[]), &format!("push {n}"));
    }
    // A page only version 2 holds (every row changed in 2 and again in 3).
    let file = b.replica_file();
    let pgno = util::page_count(&db);
    let (hash, _) = stored_page(&file, 2, pgno);
    assert_ne!(stored_page(&file, 1, pgno).0, hash);
    assert_ne!(stored_page(&file, 3, pgno).0, hash);
    flip_stored(&file, &hash, 200, 0x10);

    let out = b.run(&["verify", REPLICA, "--all-versions", "--json"]);
    assert_eq!(util::code(&out), EXIT_VERIFY, "{}", util::stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        (report["checked"].as_u64(), report["failed"].as_u64()),
        (Some(3), Some(1))
    );
    let versions = report["versions"].as_array().expect("versions");
    assert_eq!(versions[0]["ok"], true, "{report}");
    assert_eq!(versions[2]["ok"], true, "{report}");
    assert_eq!(versions[2]["integrity"], serde_json::json!(["ok"]));
    assert_eq!(versions[1]["ok"], false, "{report}");
    assert!(versions[1]["digest"].is_null(), "{report}");
    let error = versions[1]["error"].as_str().expect("an error");
    assert!(
        error.contains(&format!("page {pgno} of {REPLICA}@2")),
        "names the page and version: {error}"
    );

    let out = b.run(&["verify", REPLICA, "--all-versions"]);
    assert_eq!(util::code(&out), EXIT_VERIFY);
    let text = util::stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "a line per version and a summary: {text}");
    assert!(lines[0].starts_with("version 1  ok  "), "{text}");
    assert!(lines[1].starts_with("version 2  FAILED  "), "{text}");
    assert!(lines[2].starts_with("version 3  ok  "), "{text}");
    assert_eq!(
        lines[3],
        format!("{REPLICA}: 1 of 3 versions FAILED (versions 2)")
    );

    // A version selector, or a local file, is refused with a usage error.
    let out = b.run(&["verify", &format!("{REPLICA}@2"), "--all-versions"]);
    assert_eq!(util::code(&out), 2, "{}", util::stderr(&out));
    assert!(
        util::stderr(&out).contains("without @VERSION"),
        "{}",
        util::stderr(&out)
    );
}
