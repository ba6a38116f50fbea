//! The chunked digest (`sqlferry-digest-2`) in the embedded store: every version
//! records it, a replica file made before it gets it from its manifest rows alone, and
//! a push with a known base, which the store checks by chunks (reading only the chunks
//! pages came for), never commits a version whose base was not what it claimed: a
//! wrong chunk in the base, a damaged chunk of page hashes (sent to or not), and a
//! damaged kept manifest on the client are each refused or repaired, never stored.

use std::path::{Path, PathBuf};
use std::process::Output;

use rusqlite::Connection;
use sqlferry::digest::{Hash, sha256};
use sqlferry::store::{ReplicaPath, Selector, Store};
use tempfile::TempDir;

use crate::util::{self, Mode};

/// Rows of the test database: about 2,600 pages of 4 KiB, three chunks.
const ROWS: u64 = 10_000;

fn store_url(dir: &Path) -> String {
    format!("file://{}", dir.join("store").display())
}

fn run(dir: &Path, args: &[&str]) -> Output {
    util::sqlferry(dir)
        .args(args)
        .args(["--json", "--server", &store_url(dir)])
        .output()
        .expect("run sqlferry")
}

/// `sqlferry ARGS… --json --server file:///DIR/store`, asserted to succeed.
fn run_ok(dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = run(dir, args);
    assert_eq!(
        util::code(&out),
        0,
        "{args:?}: {}{}",
        util::stderr(&out),
        util::stdout(&out)
    );
    serde_json::from_str(util::stdout(&out).trim()).expect("one JSON object")
}

fn push(dir: &Path, db: &Path) -> serde_json::Value {
    run_ok(dir, &["push", db.to_str().expect("utf-8"), "acme/app.db"])
}

/// The chunked digest of the database at `path`, computed from its definition: the
/// SHA-256 of `sqlferry-digest-2`, the page size and count, and the SHA-256 of each
/// run of 1,024 page hashes.
fn chunked_digest(path: &Path) -> Hash {
    let hashes = util::page_hashes(path);
    let mut all = b"sqlferry-digest-2".to_vec();
    all.extend_from_slice(&util::page_size(path).to_be_bytes());
    all.extend_from_slice(&(hashes.len() as u32).to_be_bytes());
    for chunk in hashes.chunks(1024) {
        all.extend_from_slice(&sha256(&chunk.concat()));
    }
    sha256(&all)
}

/// A WAL database of [`ROWS`] rows, pushed once (version 1, every page sent), its
/// last rows changed and pushed again (version 2, with the kept manifest as its known
/// base: the store works by chunks). Returns the database and the replica file.
fn two_versions(dir: &Path) -> (PathBuf, PathBuf) {
    let db = dir.join("app.db");
    let conn = util::create(&db, 4096, Mode::Wal);
    util::insert_rows(&conn, ROWS, 1000);
    drop(conn);
    util::checkpoint(&db);
    let first = push(dir, &db);
    assert_eq!(first["version"], 1, "{first}");
    change_last_rows(&db);
    let second = push(dir, &db);
    assert_eq!(second["version"], 2, "{second}");
    // A version made by chunks records (and the push shows) only its chunked digest.
    assert_eq!(second["digest"], util::chunked_digest(&db), "{second}");
    let sent = second["pages_sent"].as_u64().expect("pages_sent");
    assert!(
        sent > 0 && sent < 100,
        "only the changed pages go: {second}"
    );
    (db, dir.join("store/replicas/acme/app.db.sqlferry"))
}

/// Changes the last rows of the table (pages of its last chunk), in place.
fn change_last_rows(db: &Path) {
    util::open(db)
        .execute(
            "UPDATE t SET v = randomblob(1000) WHERE id > ?1",
            [(ROWS - 8) as i64],
        )
        .expect("update");
}

/// `versions.digest2` of every version, oldest first.
fn digests2(file: &Path) -> Vec<Option<Vec<u8>>> {
    let conn = Connection::open(file).expect("replica file");
    let mut stmt = conn
        .prepare("SELECT digest2 FROM versions ORDER BY number")
        .expect("digest2");
    stmt.query_map([], |r| r.get(0))
        .expect("rows")
        .collect::<rusqlite::Result<_>>()
        .expect("rows")
}

fn pull(dir: &Path, spec: &str, name: &str) -> PathBuf {
    let out = dir.join(name);
    run_ok(dir, &["pull", spec, out.to_str().expect("utf-8")]);
    out
}

fn versions(dir: &Path) -> usize {
    run_ok(dir, &["versions", "acme/app.db"])
        .as_array()
        .expect("a list of versions")
        .len()
}

/// The client's kept manifests (the files of its cache's `manifests` directory that
/// are not seals: at least one chunk of page hashes long).
fn kept_manifests(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join(".home/cache/sqlferry/manifests"))
        .expect("kept manifests")
        .flatten()
        .filter(|e| e.metadata().is_ok_and(|m| m.len() >= 1024 * 32))
        .map(|e| e.path())
        .collect()
}

fn scrub(dir: &Path) -> Output {
    util::sqlferry(dir)
        .args(["scrub", "--json", "--data"])
        .arg(dir.join("store"))
        .output()
        .expect("scrub")
}

#[test]
fn every_version_records_its_chunked_digest_and_an_old_file_gets_it_from_its_manifest() {
    let dir = TempDir::new().expect("tempdir");
    let (db, file) = two_versions(dir.path());
    let v1 = pull(dir.path(), "acme/app.db@1", "v1.db");
    let v2 = pull(dir.path(), "acme/app.db@2", "v2.db");
    util::assert_same(&db, &v2);
    let expected = vec![
        Some(chunked_digest(&v1).to_vec()),
        Some(chunked_digest(&v2).to_vec()),
    ];
    assert_eq!(digests2(&file), expected);

    // A replica file made before the column existed: no column, and no pages to read
    // either (the packs are moved away), so it can only come from the manifest rows.
    Connection::open(&file)
        .expect("replica file")
        .execute_batch("ALTER TABLE versions DROP COLUMN digest2")
        .expect("drop the column");
    let pages = dir.path().join("store/pages");
    let away = dir.path().join("pages.away");
    std::fs::rename(&pages, &away).expect("move the packs away");
    let replica = ReplicaPath::parse("acme/app.db").expect("valid");
    drop(
        Store::new(dir.path().join("store"))
            .read(&replica, Selector::Latest)
            .expect("opens for reading"),
    );
    assert_eq!(digests2(&file), expected, "filled from the manifest rows");
    if pages.exists() {
        std::fs::remove_dir_all(&pages).expect("the empty packs directory");
    }
    std::fs::rename(&away, &pages).expect("the packs back");
    assert_eq!(util::code(&scrub(dir.path())), 0);

    // A recorded chunked digest that does not match its manifest is found.
    Connection::open(&file)
        .expect("replica file")
        .execute(
            "UPDATE versions SET digest2 = zeroblob(32) WHERE number = 1",
            [],
        )
        .expect("tamper");
    let out = scrub(dir.path());
    assert_eq!(util::code(&out), 7, "{}", util::stdout(&out));
    assert!(
        util::stdout(&out).contains("its chunked digest does not match its manifest"),
        "{}",
        util::stdout(&out)
    );
}

/// The key of chunk `idx` of `version`'s manifest.
fn chunk_key(conn: &Connection, version: i64, idx: i64) -> Vec<u8> {
    conn.query_row(
        "SELECT chunk FROM manifest WHERE version = ?1 AND idx = ?2",
        [version, idx],
        |r| r.get(0),
    )
    .expect("manifest row")
}

/// Flips a byte in the middle of the stored page hashes of chunk `key`.
fn damage_chunk(conn: &Connection, key: &[u8]) {
    let mut hashes: Vec<u8> = conn
        .query_row("SELECT hashes FROM chunks WHERE hash = ?1", [key], |r| {
            r.get(0)
        })
        .expect("chunk");
    let at = hashes.len() / 2;
    hashes[at] ^= 0xff;
    conn.execute(
        "UPDATE chunks SET hashes = ?1 WHERE hash = ?2",
        rusqlite::params![hashes, key],
    )
    .expect("damage");
}

/// A push that must be refused with exit 7 and `why` in its error, leaving the
/// replica at two versions.
fn refused(dir: &Path, db: &Path, why: &str) {
    change_last_rows(db);
    let out = run(dir, &["push", db.to_str().expect("utf-8"), "acme/app.db"]);
    assert_eq!(
        util::code(&out),
        7,
        "{}{}",
        util::stderr(&out),
        util::stdout(&out)
    );
    let said = format!("{}{}", util::stderr(&out), util::stdout(&out));
    assert!(said.contains(why), "{said}");
    assert_eq!(versions(dir), 2, "nothing was committed");
}

#[test]
fn a_base_chunk_that_is_not_the_base_is_refused() {
    let dir = TempDir::new().expect("tempdir");
    let (db, file) = two_versions(dir.path());
    // The store's version 2 names, as its first chunk, a chunk of other page hashes
    // (well formed, keyed by its own hash): the chunk no page of the next push touches.
    {
        let conn = Connection::open(&file).expect("replica file");
        let other: Vec<u8> = (0..1024u32)
            .flat_map(|i| sha256(&i.to_be_bytes()))
            .collect();
        let key = sha256(&other);
        conn.execute(
            "INSERT INTO chunks(hash, hashes) VALUES (?1, ?2)",
            rusqlite::params![&key[..], other],
        )
        .expect("a chunk");
        conn.execute(
            "UPDATE manifest SET chunk = ?1 WHERE version = 2 AND idx = 0",
            [&key[..]],
        )
        .expect("tamper");
    }
    refused(dir.path(), &db, "digest");
}

#[test]
fn a_damaged_chunk_of_page_hashes_is_refused_whether_pages_came_for_it_or_not() {
    // Pages come for the last chunk: its page hashes are read, and checked first.
    let dir = TempDir::new().expect("tempdir");
    let (db, file) = two_versions(dir.path());
    {
        let conn = Connection::open(&file).expect("replica file");
        let last: i64 = conn
            .query_row("SELECT max(idx) FROM manifest WHERE version = 2", [], |r| {
                r.get(0)
            })
            .expect("chunks");
        assert!(last >= 2, "three chunks or more");
        damage_chunk(&conn, &chunk_key(&conn, 2, last));
    }
    let why = "is damaged: its page hashes no longer match their key; nothing was stored, and the next push of the database repairs it";
    refused(dir.path(), &db, why);
    // Its advice, followed: the chunk is recorded, the next push takes no shortcut over
    // it, and stores a whole version. Version 2 keeps its damaged chunk (no push brings
    // its pages there again): scrub still names it, and only it.
    repaired(dir.path(), &db);
    assert_eq!(bad_versions(dir.path()), [2]);

    // No page comes for the first chunk: it is held as it is, and its page hashes
    // are read only for page 1's hash (the check of the new version's page 1),
    // checked against its key then. (Another held chunk is not read by a push at all:
    // like a kept page, a pull or `scrub` finds it damaged.)
    let dir = TempDir::new().expect("tempdir");
    let (db, file) = two_versions(dir.path());
    {
        let conn = Connection::open(&file).expect("replica file");
        damage_chunk(&conn, &chunk_key(&conn, 2, 0));
    }
    refused(dir.path(), &db, why);
    // Here version 3 holds the same pages there: the chunk is stored whole again under
    // its key, and every version is whole.
    repaired(dir.path(), &db);
    assert_eq!(bad_versions(dir.path()), [0u64; 0]);
}

/// The next push after a refusal for damage: version 3, the database's.
fn repaired(dir: &Path, db: &Path) {
    let third = push(dir, db);
    assert_eq!(third["version"], 3, "{third}");
    assert_eq!(
        third["digest"],
        util::digest_like(db, &third["digest"]),
        "{third}"
    );
    util::assert_same(db, &pull(dir, "acme/app.db@3", "v3.db"));
}

/// The versions `scrub` finds bad.
fn bad_versions(dir: &Path) -> Vec<u64> {
    let out = scrub(dir);
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("scrub --json: {e}"));
    let bad: Vec<u64> = report["replicas"][0]["bad_versions"]
        .as_array()
        .expect("bad versions")
        .iter()
        .map(|v| v["number"].as_u64().expect("a number"))
        .collect();
    assert_eq!(
        util::code(&out),
        if bad.is_empty() { 0 } else { 7 },
        "{report}"
    );
    bad
}

#[test]
fn a_damaged_kept_manifest_costs_pages_never_a_wrong_version() {
    let dir = TempDir::new().expect("tempdir");
    let (db, _) = two_versions(dir.path());
    // The client's kept manifest of version 2: page hashes flipped all through it.
    let kept = kept_manifests(dir.path());
    assert_eq!(kept.len(), 1, "one kept manifest");
    for path in &kept {
        let mut bytes = std::fs::read(path).expect("read");
        let len = bytes.len();
        for at in (len / 8..len).step_by(len / 8) {
            bytes[at] ^= 0xff;
        }
        std::fs::write(path, bytes).expect("write");
    }
    change_last_rows(&db);
    let third = push(dir.path(), &db);
    assert_eq!(third["version"], 3, "{third}");
    assert_eq!(
        third["digest"],
        util::digest_like(&db, &third["digest"]),
        "{third}"
    );
    let v3 = pull(dir.path(), "acme/app.db@3", "v3.db");
    util::assert_same(&db, &v3);
    assert_eq!(util::code(&scrub(dir.path())), 0);
}

#[test]
fn a_latest_version_without_a_recorded_chunked_digest_is_still_seen_as_unchanged() {
    // A row an older sqlferry wrote after this push's upgrade, or one whose chunked
    // digest could not be recorded: the store computes it from the manifest's keys,
    // so a push of the same content stores no duplicate version.
    let dir = TempDir::new().expect("tempdir");
    let (db, file) = two_versions(dir.path());
    Connection::open(&file)
        .expect("replica file")
        .execute("UPDATE versions SET digest2 = X'' WHERE number = 2", [])
        .expect("clear digest2");
    // The same content, through frames the push must read: a row changed and back.
    let conn = util::open(&db);
    let old: Vec<u8> = conn
        .query_row("SELECT v FROM t WHERE id = ?1", [ROWS as i64], |r| r.get(0))
        .expect("row");
    conn.execute("UPDATE t SET v = x'00' WHERE id = ?1", [ROWS as i64])
        .expect("change");
    conn.execute(
        "UPDATE t SET v = ?2 WHERE id = ?1",
        rusqlite::params![ROWS as i64, old],
    )
    .expect("change back");
    drop(conn);
    let again = push(dir.path(), &db);
    assert_eq!(again["version"], 2, "{again}");
    assert_eq!(versions(dir.path()), 2, "no duplicate version");
    assert_eq!(
        again["digest"],
        util::digest_like(&db, &again["digest"]),
        "{again}"
    );
}

#[test]
fn a_damaged_chunk_of_page_hashes_is_healed_by_following_the_advice() {
    // Chunk 0 (no page of it changes) damaged in the store: the push is refused and
    // says the next push repairs it; scrub finds it too; the next push must then store
    // a version that pulls back, and heal the chunk for the versions before it, never
    // name the damaged row again.
    let dir = TempDir::new().expect("tempdir");
    let (db, file) = two_versions(dir.path());
    {
        let conn = Connection::open(&file).expect("replica file");
        damage_chunk(&conn, &chunk_key(&conn, 2, 0));
    }
    refused(dir.path(), &db, "the next push of the database repairs it");
    let found = scrub(dir.path());
    assert_ne!(util::code(&found), 0, "scrub finds the damage");
    let third = push(dir.path(), &db);
    assert_eq!(third["version"], 3, "{third}");
    assert_eq!(
        third["digest"],
        util::digest_like(&db, &third["digest"]),
        "{third}"
    );
    let v3 = pull(dir.path(), "acme/app.db@3", "v3.db");
    util::assert_same(&db, &v3);
    // Version 2 names the same chunk: it pulls back too, to its recorded digest.
    let listed = run_ok(dir.path(), &["versions", "acme/app.db"]);
    let v2_digest = listed
        .as_array()
        .expect("versions")
        .iter()
        .find(|v| v["number"] == 2)
        .map(|v| v["digest2"].clone())
        .expect("version 2 listed");
    let v2 = pull(dir.path(), "acme/app.db@2", "v2.db");
    assert_eq!(serde_json::json!(util::chunked_digest(&v2)), v2_digest);
    assert_eq!(util::code(&scrub(dir.path())), 0, "nothing damaged is left");
}

#[test]
fn a_truncated_kept_manifest_is_no_kept_manifest() {
    // The cache is safe to lose: a kept manifest cut short (a full disk, a crash of
    // another tool) must cost a read of the database, never a failed push.
    let dir = TempDir::new().expect("tempdir");
    let (db, _) = two_versions(dir.path());
    let kept = kept_manifests(dir.path());
    assert_eq!(kept.len(), 1, "one kept manifest");
    for path in &kept {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open");
        file.set_len(5000).expect("truncate");
    }
    change_last_rows(&db);
    let third = push(dir.path(), &db);
    assert_eq!(third["version"], 3, "{third}");
    assert_eq!(
        third["digest"],
        util::digest_like(&db, &third["digest"]),
        "{third}"
    );
    let v3 = pull(dir.path(), "acme/app.db@3", "v3.db");
    util::assert_same(&db, &v3);
}

/// The origin's side of a push by chunks: a WAL database whose application keeps its
/// connection open (so its WAL persists and a push follows it), pushed into the store
/// once whole and once by chunks.
struct Followed {
    dir: TempDir,
    db: PathBuf,
    conn: Connection,
}

/// What a push logged, as `RUST_LOG` asks: whether the origin compared by chunks, and
/// whether it read every page.
struct Logged {
    report: serde_json::Value,
    by_chunks: bool,
    read_all: bool,
    stderr: String,
}

impl Followed {
    fn new() -> Followed {
        Followed::with(false)
    }

    /// [`Followed::new`], with `auto_vacuum = INCREMENTAL` when `shrinks` (so that the
    /// file can shrink by a few pages, `PRAGMA incremental_vacuum`).
    fn with(shrinks: bool) -> Followed {
        let dir = TempDir::new().expect("tempdir");
        let db = dir.path().join("app.db");
        let conn = crate::wal_follow::wal_db(&db, 0);
        if shrinks {
            conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")
                .expect("auto_vacuum");
        }
        util::insert_rows(&conn, ROWS, 1000);
        // Copied into the file, and the WAL restarted by the next write: the pages
        // live in the file, the WAL holds only what changes from here on.
        conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE); UPDATE t SET k = k WHERE id = 1")
            .expect("checkpoint");
        let f = Followed { dir, db, conn };
        let first = f.push();
        assert!(first.read_all && !first.by_chunks, "{}", first.stderr);
        f.change_last_rows();
        let second = f.push();
        assert!(second.by_chunks && !second.read_all, "{}", second.stderr);
        assert_eq!(second.report["version"], 2, "{}", second.report);
        f
    }

    fn change_last_rows(&self) {
        self.conn
            .execute(
                "UPDATE t SET v = randomblob(1000) WHERE id > ?1",
                [(ROWS - 8) as i64],
            )
            .expect("update");
    }

    /// Pushes into the store, asserting it succeeded with the origin's digest.
    fn push(&self) -> Logged {
        let out = util::sqlferry(self.dir.path())
            .env(
                "RUST_LOG",
                "sqlferry::engine::origin=debug,sqlferry::page::snapshot=debug",
            )
            .args(["push", self.db.to_str().expect("utf-8"), "acme/app.db"])
            .args(["--json", "--server", &store_url(self.dir.path())])
            .output()
            .expect("run sqlferry");
        let stderr = util::stderr(&out);
        assert_eq!(util::code(&out), 0, "{stderr}{}", util::stdout(&out));
        let report: serde_json::Value =
            serde_json::from_str(util::stdout(&out).trim()).expect("one JSON object");
        assert_eq!(
            report["digest"],
            util::digest_like(&self.db, &report["digest"]),
            "{report}"
        );
        Logged {
            report,
            by_chunks: stderr.contains("origin compared by chunks"),
            read_all: stderr.contains("origin reads every page"),
            stderr,
        }
    }

    /// Pulls the latest version and checks it holds the origin's rows and pages.
    fn pulls_back(&self) {
        let out = pull(self.dir.path(), "acme/app.db", "back.db");
        util::assert_same(&self.db, &out);
        std::fs::remove_file(&out).expect("remove the pulled copy");
    }

    /// The index (0-based) of the database's last chunk, where its last rows are.
    fn last_chunk(&self) -> u64 {
        (util::page_hashes(&self.db).len() as u64 - 1) / 1024
    }

    /// The client's WAL hash list of the database (in its cache's `hashes`).
    fn hash_list(&self) -> PathBuf {
        std::fs::read_dir(self.dir.path().join(".home/cache/sqlferry/hashes"))
            .expect("hash caches")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "wal"))
            .expect("a WAL hash list")
    }
}

/// Where the page hashes of chunk `idx` start in a file of chunked hashes whose header
/// is `header` bytes long.
fn chunk_at(header: u64, idx: u64) -> u64 {
    header + idx * 1024 * 32
}

/// Overwrites the page hashes of chunk `to` with those of chunk `from` (well-formed
/// hashes, only not this chunk's), leaving the table as it was: a torn write.
fn misplace_chunk(path: &Path, header: u64, from: u64, to: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut buf = vec![0u8; 100 * 32];
    f.read_exact_at(&mut buf, chunk_at(header, from))
        .expect("read");
    f.write_all_at(&buf, chunk_at(header, to)).expect("write");
}

#[test]
fn a_push_by_chunks_reads_only_the_changed_chunks_and_keeps_its_manifest_by_them() {
    let f = Followed::new();
    f.pulls_back();
    let stderr = &f.push().stderr;
    // Nothing changed: no sync at all (the seal proves it).
    assert!(!stderr.contains("origin compared by chunks"), "{stderr}");
    // A change in the last chunk: one chunk differs, its pages only are sent.
    f.change_last_rows();
    let third = f.push();
    assert!(third.by_chunks, "{}", third.stderr);
    assert!(third.stderr.contains("differ=1"), "{}", third.stderr);
    let sent = third.report["pages_sent"].as_u64().expect("pages_sent");
    assert!(sent > 0 && sent < 100, "{}", third.report);
    assert_eq!(third.report["version"], 3);
    f.pulls_back();
    // A change in the first chunk and growth of the last one: the kept manifest was
    // brought to version 3 by chunks, and is the known base again.
    f.conn
        .execute("UPDATE t SET v = randomblob(1000) WHERE id = 3", [])
        .expect("update");
    util::insert_rows(&f.conn, 100, 1000);
    let fourth = f.push();
    assert!(fourth.by_chunks, "{}", fourth.stderr);
    let sent = fourth.report["pages_sent"].as_u64().expect("pages_sent");
    assert!(sent > 0 && sent < 200, "{}", fourth.report);
    assert_eq!(fourth.report["version"], 4);
    f.pulls_back();
    assert_eq!(util::code(&scrub(f.dir.path())), 0);
}

#[test]
fn a_torn_chunk_of_the_hash_list_is_read_again_never_trusted() {
    let f = Followed::new();
    // The hash list's last chunk (where the next change lands) holds hashes of the
    // first chunk's pages, its table as it was: trusted, they would make the origin's
    // digest another database's, and the store would refuse the push.
    misplace_chunk(&f.hash_list(), 96, 0, f.last_chunk());
    f.change_last_rows();
    let third = f.push();
    assert!(third.by_chunks, "{}", third.stderr);
    assert!(
        third.stderr.contains("does not hold: its pages are read"),
        "{}",
        third.stderr
    );
    assert_eq!(third.report["version"], 3, "{}", third.report);
    f.pulls_back();
    // The chunk was read and written anew: the next push trusts it again.
    f.change_last_rows();
    let fourth = f.push();
    assert!(
        !fourth.stderr.contains("does not hold"),
        "{}",
        fourth.stderr
    );
    f.pulls_back();
}

#[test]
fn a_damaged_chunk_of_the_kept_manifest_costs_its_pages() {
    let f = Followed::new();
    let kept = kept_manifests(f.dir.path());
    assert_eq!(kept.len(), 1, "one kept manifest");
    // The kept manifest's last chunk holds other hashes: every page of it is sent
    // (the store takes them as they are), none is left out.
    let last = f.last_chunk();
    misplace_chunk(&kept[0], 80, 0, last);
    f.change_last_rows();
    let third = f.push();
    assert!(third.by_chunks, "{}", third.stderr);
    let sent = third.report["pages_sent"].as_u64().expect("pages_sent");
    let in_last_chunk = util::page_hashes(&f.db).len() as u64 - last * 1024;
    assert!(
        sent >= in_last_chunk,
        "{sent} of {in_last_chunk}: {}",
        third.report
    );
    f.pulls_back();
    // Kept anew: the next push sends only what changed.
    f.change_last_rows();
    let fourth = f.push();
    let sent = fourth.report["pages_sent"].as_u64().expect("pages_sent");
    assert!(sent < 100, "{}", fourth.report);
    f.pulls_back();
}

#[test]
fn a_page_written_behind_the_lists_back_is_read_never_taken_from_the_list() {
    use std::os::unix::fs::FileExt;
    let f = Followed::new();
    // A blob byte of a table leaf in the first chunk, written into the file in place
    // (a restore over a live file, another tool): no WAL frame names it. Trusted, the
    // list would give the page's old hash, and the store would take a version that is
    // not the database (its digest the old one's).
    let leaf: u32 = f
        .conn
        .query_row(
            "SELECT pgno FROM sqlite_dbpage WHERE pgno BETWEEN 10 AND 1000 \
             AND substr(data, 1, 1) = x'0d' LIMIT 1",
            [],
            |r| r.get(0),
        )
        .expect("a table leaf");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f.db)
        .expect("open");
    let at = u64::from(leaf) * 4096 - 1;
    let mut b = [0u8];
    file.read_exact_at(&mut b, at).expect("read");
    file.write_all_at(&[b[0] ^ 0x5a], at).expect("write");
    drop(file);
    let third = f.push();
    assert!(third.read_all && !third.by_chunks, "{}", third.stderr);
    assert_eq!(third.report["version"], 3, "{}", third.report);
    f.pulls_back();
    assert_eq!(util::integrity(&f.db), "ok");
}

#[test]
fn a_wal_reset_the_push_did_not_see_means_every_page_is_read() {
    let f = Followed::new();
    // Rows of the first chunk changed, checkpointed and the WAL truncated: the frames
    // that named those pages are gone. Then a change in the last chunk.
    f.conn
        .execute("UPDATE t SET v = randomblob(1000) WHERE id < 20", [])
        .expect("update");
    f.conn
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .expect("checkpoint");
    f.change_last_rows();
    let third = f.push();
    assert!(third.read_all && !third.by_chunks, "{}", third.stderr);
    assert_eq!(third.report["version"], 3, "{}", third.report);
    f.pulls_back();
}

#[test]
fn a_push_by_chunks_follows_a_database_that_shrank() {
    let f = Followed::with(true);
    let before = util::page_hashes(&f.db).len();
    // The last rows deleted and their pages given back: the file ends a few dozen
    // pages earlier, inside its last chunk, which is then shorter.
    f.conn
        .execute("DELETE FROM t WHERE id > ?1", [(ROWS - 60) as i64])
        .expect("delete");
    f.conn
        .execute_batch("PRAGMA incremental_vacuum")
        .expect("incremental_vacuum");
    let after = util::page_hashes(&f.db).len();
    assert!(
        after < before && after / 1024 == (before - 1) / 1024,
        "{before} -> {after}"
    );
    let third = f.push();
    assert!(third.by_chunks, "{}", third.stderr);
    assert_eq!(third.report["version"], 3, "{}", third.report);
    f.pulls_back();
    // The hash list and the kept manifest were brought to the shorter file: the next
    // push goes by chunks again.
    f.conn
        .execute(
            "UPDATE t SET v = randomblob(1000) WHERE id > ?1",
            [(ROWS - 70) as i64],
        )
        .expect("update");
    let fourth = f.push();
    assert!(fourth.by_chunks, "{}", fourth.stderr);
    f.pulls_back();
}

/// `length(versions.digest)` and `versions.digest2` of every version, oldest first.
fn recorded_digests(file: &Path) -> Vec<(i64, Option<Vec<u8>>)> {
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
    chunked_digest(path).to_vec()
}

#[test]
fn a_version_made_by_chunks_records_only_its_chunked_digest_and_every_reader_compares_it() {
    let dir = TempDir::new().expect("tempdir");
    let (db, file) = two_versions(dir.path());
    // Version 1 sent every chunk: both digests, for free. Version 2 kept chunks of
    // version 1: its chunked digest only (making digest 1 would read every kept chunk).
    let recorded = recorded_digests(&file);
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[0].0, 32, "version 1 records digest 1");
    assert_eq!(recorded[1], (0, Some(chunked_bytes(&db))), "version 2");

    // `versions --json` shows each form it recorded.
    let listed = run_ok(dir.path(), &["versions", "acme/app.db"]);
    let v2 = &listed.as_array().expect("versions")[1];
    assert_eq!(v2["number"], 2, "{listed}");
    assert_eq!(v2["digest"], "", "{listed}");
    assert_eq!(v2["digest2"], util::chunked_digest(&db), "{listed}");

    // `verify` of the stored version compares the restored file in the chunked form.
    let report = run_ok(dir.path(), &["verify", "acme/app.db@2"]);
    assert_eq!(report["integrity"], serde_json::json!(["ok"]), "{report}");
    assert_eq!(report["digest"], util::digest(&db), "{report}");
    assert_eq!(report["digest2"], util::chunked_digest(&db), "{report}");
    let all = run_ok(dir.path(), &["verify", "--all-versions", "acme/app.db"]);
    assert_eq!(all["failed"], 0, "{all}");
    assert_eq!(all["checked"], 2, "{all}");
    assert_eq!(util::code(&scrub(dir.path())), 0, "scrub finds it whole");

    // The push's record and seal are in the chunked form: a push with nothing changed
    // (proved from the seal where the file system's times allow, else by chunks) is
    // found unchanged against version 2 in that form, and makes no version.
    let again = push(dir.path(), &db);
    assert_eq!(again["version"], 2, "{again}");
    assert_eq!(again["created"], false, "{again}");
    assert_eq!(again["digest"], util::chunked_digest(&db), "{again}");
    assert_eq!(versions(dir.path()), 2, "no new version");

    // A file never synced that holds version 2 is found to hold it (compared in the
    // chunked form, read from the file): the pull is not refused.
    let copy = dir.path().join("copy.db");
    util::sync(&db, &copy);
    let out = run(
        dir.path(),
        &["pull", "acme/app.db", copy.to_str().expect("utf-8")],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    util::assert_same(&db, &copy);

    // LOCAL written after its push is refused, not overwritten.
    change_last_rows(&db);
    let before = util::digest(&db);
    let out = run(
        dir.path(),
        &["pull", "acme/app.db", db.to_str().expect("utf-8")],
    );
    assert_eq!(util::code(&out), 9, "{}", util::stderr(&out));
    assert!(
        util::stderr(&out).contains("never pushed"),
        "{}",
        util::stderr(&out)
    );
    assert_eq!(util::digest(&db), before, "LOCAL untouched");
}

#[test]
fn a_flipped_byte_under_a_version_made_by_chunks_is_refused_at_pull() {
    let dir = TempDir::new().expect("tempdir");
    let (db, file) = two_versions(dir.path());
    assert_eq!(recorded_digests(&file)[1].0, 0, "version 2 has no digest 1");
    let last = util::page_count(&db);
    // A page version 2 sent (its last chunk, new) and one it kept of version 1.
    for pgno in [last, 2] {
        let (hash, data) = crate::trust_store::stored_page(&file, 2, pgno);
        let byte = data.len() / 2;
        crate::trust_store::flip_stored(&file, &hash, byte, 0x01);
        let out_file = dir.path().join(format!("restored-{pgno}.db"));
        let out = run(
            dir.path(),
            &["pull", "acme/app.db@2", out_file.to_str().expect("utf-8")],
        );
        assert_eq!(util::code(&out), 7, "page {pgno}: {}", util::stderr(&out));
        assert!(
            util::stderr(&out).contains("damaged"),
            "page {pgno}: {}",
            util::stderr(&out)
        );
        assert_eq!(util::file_len(&out_file), 0, "page {pgno}: nothing written");
        // Flipped back: the version pulls whole again.
        crate::trust_store::flip_stored(&file, &hash, byte, 0x01);
        util::assert_same(
            &db,
            &pull(dir.path(), "acme/app.db@2", &format!("ok-{pgno}.db")),
        );
    }
}

#[test]
fn a_server_gives_digest_1_of_a_version_made_by_chunks_to_every_peer() {
    // A version made by chunks in a directory a server then serves: a peer that knows
    // only digest 1 (every client before the chunked form) must see it as before.
    let dir = TempDir::new().expect("tempdir");
    let server = crate::server::TestServer::start(dir.path());
    let data = format!("file://{}", dir.path().join("server-data").display());
    let db = dir.path().join("app.db");
    let conn = util::create(&db, 4096, Mode::Wal);
    util::insert_rows(&conn, ROWS, 1000);
    drop(conn);
    util::checkpoint(&db);
    let push_data = || {
        let out = util::sqlferry(dir.path())
            .args(["push", db.to_str().expect("utf-8"), "acme/app.db"])
            .args(["--json", "--server", &data])
            .output()
            .expect("push");
        assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
        serde_json::from_str::<serde_json::Value>(util::stdout(&out).trim()).expect("JSON")
    };
    push_data();
    change_last_rows(&db);
    let second = push_data();
    assert_eq!(second["digest"], util::chunked_digest(&db), "{second}");
    let file = server.replica_file("acme/app.db");
    assert_eq!(recorded_digests(&file)[1].0, 0, "made by chunks");

    let listed = server.versions("acme/app.db").expect("listed");
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[1].digest, util::digest(&db), "digest 1, as before");
    assert_eq!(
        listed[1].digest2.as_deref(),
        Some(util::chunked_digest(&db).as_str())
    );
    // Made once, then recorded.
    assert_eq!(recorded_digests(&file)[1].0, 32, "recorded once made");

    let out = util::sqlferry(dir.path())
        .args(["verify", "acme/app.db@2", "--json", "--server", &server.url])
        .args(["--key", &server.admin_key])
        .output()
        .expect("verify");
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
}

#[test]
fn a_damaged_kept_chunk_a_push_does_not_read_is_found_at_pull_never_delivered() {
    // A push by chunks no longer reads the chunks it keeps (but chunk 0): a chunk of
    // page hashes damaged in the store goes into the new version by its key, as a
    // damaged kept page would, and is found where every chunk is read: at pull (exit
    // 7, nothing written) and by `scrub`.
    let dir = TempDir::new().expect("tempdir");
    let (db, file) = two_versions(dir.path());
    {
        let conn = Connection::open(&file).expect("replica file");
        damage_chunk(&conn, &chunk_key(&conn, 2, 1));
    }
    change_last_rows(&db);
    let third = push(dir.path(), &db);
    assert_eq!(third["version"], 3, "{third}");
    assert_eq!(third["digest"], util::chunked_digest(&db), "{third}");
    let out_file = dir.path().join("v3.db");
    let out = run(
        dir.path(),
        &["pull", "acme/app.db@3", out_file.to_str().expect("utf-8")],
    );
    assert_eq!(util::code(&out), 7, "{}", util::stderr(&out));
    assert_eq!(util::file_len(&out_file), 0, "nothing written");
    // Versions 1 and 2 name the same chunk.
    assert_eq!(bad_versions(dir.path()), [1, 2, 3]);
}
