//! The store's page packs: identical pages stored once across replicas, pushes into
//! different replicas at once (in one process and from two processes), and a store of
//! the previous layout (pages in each replica file) moved into packs on open.

use std::path::{Path, PathBuf};
use std::process::Output;

use rusqlite::Connection;
use sqlferry::digest::{Hash, page_hash};
use sqlferry::engine::{BeginInfo, PageTarget};
use sqlferry::store::{PushOptions, ReplicaPath, Selector, Store};
use tempfile::TempDir;

use crate::trust_store::digest_of;
use crate::util::{self, Mode};

fn store_url(dir: &Path) -> String {
    format!("file://{}", dir.join("store").display())
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

fn run(dir: &Path, args: &[&str]) -> Output {
    util::sqlferry(dir)
        .args(args)
        .args(["--json", "--server", &store_url(dir)])
        .output()
        .expect("run sqlferry")
}

/// The bytes of every pack file of the store in `dir`.
fn pack_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("store/pages")).map_or(0, |d| {
        d.flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".pack"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    })
}

fn scrub_clean(dir: &Path) {
    let out = util::sqlferry(dir)
        .args(["scrub", "--json", "--data"])
        .arg(dir.join("store"))
        .output()
        .expect("scrub");
    assert_eq!(util::code(&out), 0, "{}", util::stdout(&out));
}

fn database(dir: &Path, name: &str, rows: u64) -> PathBuf {
    let p = dir.join(name);
    let conn = util::create(&p, 4096, Mode::Wal);
    util::insert_rows(&conn, rows, 300);
    util::checkpoint(&p);
    p
}

#[test]
fn identical_pages_are_stored_once_across_replicas() {
    let dir = TempDir::new().expect("tempdir");
    let db = database(dir.path(), "app.db", 6000);
    let size = std::fs::metadata(&db).expect("db").len();
    for replica in ["acme/one.db", "acme/two.db", "other/three.db"] {
        run_ok(dir.path(), &["push", db.to_str().expect("utf-8"), replica]);
    }
    let packs = pack_bytes(dir.path());
    assert!(
        packs <= size,
        "three replicas of a {size}-byte database take {packs} bytes of packs"
    );
    for replica in ["acme/one.db", "acme/two.db", "other/three.db"] {
        let copy = dir.path().join(replica.replace('/', "-"));
        run_ok(
            dir.path(),
            &["pull", replica, copy.to_str().expect("utf-8")],
        );
        util::assert_same(&db, &copy);
    }
    scrub_clean(dir.path());
}

/// Pages of a rollback-mode database file, as an origin sends them.
fn file_pages(path: &Path) -> Vec<Vec<u8>> {
    std::fs::read(path)
        .expect("read")
        .chunks(4096)
        .map(<[u8]>::to_vec)
        .collect()
}

/// Pushes `pages` into `replica` as a first version, through the page-target API, with
/// `between` run after half the pages are written and before the commit.
fn push_pages(store: &Store, replica: &str, pages: &[Vec<u8>], between: impl FnOnce()) {
    let r = ReplicaPath::parse(replica).expect("valid");
    let mut w = store.push(&r, PushOptions::default()).expect("push");
    let n = pages.len() as u32;
    let held = w
        .begin(&BeginInfo {
            page_size: 4096,
            page_count: n,
            base_version: 0,
            known_base: false,
            chunked_digest: false,
            sealed: false,
        })
        .expect("begin");
    assert_eq!(held, 0);
    let hashes: Vec<Hash> = (1..=n)
        .map(|pgno| page_hash(pgno, &pages[pgno as usize - 1]))
        .collect();
    let half = pages.len() / 2;
    for (i, p) in pages.iter().enumerate().take(half) {
        w.write_page(i as u32 + 1, p.clone(), &hashes[i])
            .expect("write");
    }
    between();
    for (i, p) in pages.iter().enumerate().skip(half) {
        w.write_page(i as u32 + 1, p.clone(), &hashes[i])
            .expect("write");
    }
    w.commit(n, &digest_of(pages), &mut hashes.iter().map(|h| Ok(*h)))
        .expect("commit");
    assert!(w.outcome().is_some_and(|(_, made)| made));
}

/// The page hashes of `pages`: what identifies them (page 1's hash leaves out the
/// header bytes SQLite bumps on every write, so two databases whose page 1 differs
/// only there share it).
fn hashes_of(pages: &[Vec<u8>]) -> Vec<Hash> {
    pages
        .iter()
        .enumerate()
        .map(|(i, p)| page_hash(i as u32 + 1, p))
        .collect()
}

/// The page hashes of every page of `replica`'s latest version, read back through the
/// store (which checks each against the manifest).
fn read_back(store: &Store, replica: &str) -> Vec<Hash> {
    use sqlferry::engine::PageSource;
    let mut r = store
        .read(
            &ReplicaPath::parse(replica).expect("valid"),
            Selector::Latest,
        )
        .expect("read");
    (1..=r.page_count())
        .map(|pgno| {
            let mut buf = Vec::new();
            r.read_page(pgno, &mut buf).expect("page");
            page_hash(pgno, &buf)
        })
        .collect()
}

#[test]
fn two_pushes_into_different_replicas_at_once_both_land_whole() {
    let dir = TempDir::new().expect("tempdir");
    let a = dir.path().join("a.db");
    let conn = util::create(&a, 4096, Mode::Rollback);
    util::insert_rows(&conn, 400, 300);
    drop(conn);
    let b = dir.path().join("b.db");
    std::fs::copy(&a, &b).expect("copy");
    util::open(&b)
        .execute("UPDATE t SET k = 'b' WHERE id % 5 = 0", [])
        .expect("update");
    let (pa, pb) = (file_pages(&a), file_pages(&b));
    let store = Store::new(dir.path().join("store"));
    // A push into acme/b begins, lands and is read back while the push into acme/a
    // holds its pack half-written: each has a pack of its own, and neither sees the
    // other's uncommitted bytes.
    push_pages(&store, "acme/a.db", &pa, || {
        push_pages(&store, "acme/b.db", &pb, || {});
        assert_eq!(read_back(&store, "acme/b.db"), hashes_of(&pb));
    });
    assert_eq!(read_back(&store, "acme/a.db"), hashes_of(&pa));
    assert_eq!(read_back(&store, "acme/b.db"), hashes_of(&pb));
    let packs = std::fs::read_dir(dir.path().join("store/pages"))
        .expect("pages dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".pack"))
        .count();
    assert_eq!(packs, 2, "two pushes at once append to two packs");

    // A push that has looked pages up (its snapshot of the index taken) and appended
    // nothing yet, while another push appends to a pack and commits: the first then
    // appends to that pack after the other's committed bytes, not over them.
    let mut pc = pa.clone();
    let mut pd = pb.clone();
    for p in pc.iter_mut().skip(pa.len() / 2 + 1) {
        p[4000] ^= 0x5a;
    }
    for p in pd.iter_mut().skip(1) {
        p[4001] ^= 0xa5;
    }
    push_pages(&store, "acme/c.db", &pc, || {
        push_pages(&store, "acme/d.db", &pd, || {});
    });
    assert_eq!(read_back(&store, "acme/c.db"), hashes_of(&pc));
    assert_eq!(read_back(&store, "acme/d.db"), hashes_of(&pd));
    assert_eq!(read_back(&store, "acme/a.db"), hashes_of(&pa));
    scrub_clean(dir.path());
}

#[test]
fn pushes_and_pulls_from_several_processes_at_once_all_land() {
    let dir = TempDir::new().expect("tempdir");
    let dbs: Vec<PathBuf> = (0..3)
        .map(|i| {
            let db = database(dir.path(), &format!("db{i}.db"), 3000);
            util::open(&db)
                .execute(&format!("UPDATE t SET k = 'db{i}' WHERE id % 3 = 0"), [])
                .expect("update");
            db
        })
        .collect();
    run_ok(
        dir.path(),
        &["push", dbs[0].to_str().expect("utf-8"), "acme/db0.db"],
    );
    // Two pushes into new replicas and a pull of an existing one, all at once.
    let spawn = |args: Vec<String>| {
        util::sqlferry(dir.path())
            .args(&args)
            .args(["--json", "--server", &store_url(dir.path())])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let s = |p: &Path| p.to_str().expect("utf-8").to_owned();
    let pulled = dir.path().join("pulled0.db");
    let children = vec![
        spawn(vec!["push".into(), s(&dbs[1]), "acme/db1.db".into()]),
        spawn(vec!["push".into(), s(&dbs[2]), "acme/db2.db".into()]),
        spawn(vec!["pull".into(), "acme/db0.db".into(), s(&pulled)]),
    ];
    for child in children {
        let out = child.wait_with_output().expect("wait");
        assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    }
    util::assert_same(&dbs[0], &pulled);
    for (i, db) in dbs.iter().enumerate().skip(1) {
        let copy = dir.path().join(format!("copy{i}.db"));
        run_ok(dir.path(), &["pull", &format!("acme/db{i}.db"), &s(&copy)]);
        util::assert_same(db, &copy);
    }
    scrub_clean(dir.path());
}

#[test]
fn a_store_of_the_previous_layout_is_moved_into_packs_on_first_use() {
    let dir = TempDir::new().expect("tempdir");
    let db = database(dir.path(), "app.db", 2000);
    run_ok(
        dir.path(),
        &["push", db.to_str().expect("utf-8"), "acme/app.db"],
    );
    util::open(&db)
        .execute("UPDATE t SET k = 'second' WHERE id % 11 = 0", [])
        .expect("update");
    run_ok(
        dir.path(),
        &["push", db.to_str().expect("utf-8"), "acme/app.db"],
    );
    let store = dir.path().join("store");
    let file = store.join("replicas/acme/app.db.sqlferry");

    // Made into the previous layout: every page a row of the replica file's own
    // `pages` table, and no packs.
    {
        let conn = Connection::open(&file).expect("replica file");
        conn.execute_batch("CREATE TABLE pages(hash BLOB PRIMARY KEY, data BLOB NOT NULL);")
            .expect("old table");
        let rows: Vec<(Vec<u8>, i64, i64, i64)> = util::index_snapshot(&store)
            .prepare("SELECT hash, pack, offset, len FROM pages")
            .expect("index")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .expect("rows")
            .collect::<rusqlite::Result<_>>()
            .expect("rows");
        assert!(rows.len() > 100);
        for (hash, pack, offset, len) in rows {
            let bytes = std::fs::read(store.join(format!("pages/{pack}.pack"))).expect("pack");
            let data = &bytes[offset as usize..(offset + len) as usize];
            conn.execute(
                "INSERT INTO pages(hash, data) VALUES (?1, ?2)",
                rusqlite::params![hash, data],
            )
            .expect("insert");
        }
    }
    std::fs::remove_dir_all(store.join("pages")).expect("no packs");

    // A pull of the first version moves the pages, and both versions pull whole.
    let v1 = dir.path().join("v1.db");
    run_ok(
        dir.path(),
        &["pull", "acme/app.db@1", v1.to_str().expect("utf-8")],
    );
    assert_eq!(util::integrity(&v1), "ok");
    let latest = dir.path().join("latest.db");
    run_ok(
        dir.path(),
        &["pull", "acme/app.db", latest.to_str().expect("utf-8")],
    );
    util::assert_same(&db, &latest);
    let old_table: i64 = Connection::open(&file)
        .expect("replica file")
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name = 'pages'",
            [],
            |r| r.get(0),
        )
        .expect("schema");
    assert_eq!(old_table, 0, "the old pages table is gone");
    assert!(pack_bytes(dir.path()) > 0);
    // And a no-change push finds every page where it now is.
    let again = run_ok(
        dir.path(),
        &["push", db.to_str().expect("utf-8"), "acme/app.db"],
    );
    assert_eq!(again["created"].as_bool(), Some(false), "{again}");
    scrub_clean(dir.path());
}

/// The page hashes of `replica`'s latest version read through a pull's scan (the runs
/// of entries lying end to end in a pack, one read each), and the page numbers the
/// scan handed on before it ended, with its error if it failed.
fn scan_back(store: &Store, replica: &str) -> (Vec<Hash>, Option<sqlferry::Error>) {
    use sqlferry::engine::PageSource;
    let mut r = store
        .read(
            &ReplicaPath::parse(replica).expect("valid"),
            Selector::Latest,
        )
        .expect("read");
    let mut seen = Vec::new();
    let result = r.scan(0, &mut |pgno, hash, data| {
        let data = data.expect("a scan from page 0 reads every page");
        assert_eq!(page_hash(pgno, data), hash, "page {pgno} as handed on");
        assert_eq!(pgno as usize, seen.len() + 1, "pages in order");
        seen.push(hash);
        Ok(())
    });
    (seen, result.err())
}

/// Where the pages of `replica`'s latest version are stored: (pack, offset) each.
fn locations(dir: &Path, replica: &str) -> Vec<(i64, i64)> {
    let hashes = read_back(&Store::new(dir.join("store")), replica);
    let index = util::index_snapshot(&dir.join("store"));
    hashes
        .iter()
        .map(|h| {
            index
                .query_row(
                    "SELECT pack, offset FROM pages WHERE hash = ?1",
                    [&h[..]],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .expect("indexed")
        })
        .collect()
}

/// A pull reads the pages lying end to end in a pack with one read, across runs that
/// end where a version's pages come from another pack, from elsewhere in the same pack
/// or repeat a page; bytes a crashed push left past a pack's end change nothing it
/// reads, and the next push cuts them off.
#[test]
fn a_pull_reads_runs_across_packs_and_past_a_torn_tail() {
    let dir = TempDir::new().expect("tempdir");
    let a = dir.path().join("a.db");
    let conn = util::create(&a, 4096, Mode::Rollback);
    util::insert_rows(&conn, 2500, 300);
    drop(conn);
    let pa = file_pages(&a);
    let n = pa.len();
    assert!(n > 100, "{n} pages: several runs of 16");
    // Other bytes for every page but the first, pushed at the same time into another
    // replica: a pack of its own.
    let mut pb = pa.clone();
    for p in pb.iter_mut().skip(1) {
        p[4000] ^= 0x5a;
    }
    let store = Store::new(dir.path().join("store"));
    push_pages(&store, "acme/a.db", &pa, || {
        push_pages(&store, "acme/b.db", &pb, || {});
    });
    // A version made of both: a stretch of a's pages, a stretch of b's, a page that
    // repeats another, a's again. Every page is stored already: nothing is appended.
    let mut pc = pa.clone();
    pc[20..60].clone_from_slice(&pb[20..60]);
    pc[70] = pa[5].clone();
    push_pages(&store, "acme/c.db", &pc, || {});
    let packs: std::collections::BTreeSet<i64> = locations(dir.path(), "acme/c.db")
        .iter()
        .map(|(pack, _)| *pack)
        .collect();
    assert_eq!(packs.len(), 2, "c's pages lie in two packs");

    // A torn tail on every pack, as a push killed mid-write leaves it.
    let pack_files: Vec<PathBuf> = std::fs::read_dir(dir.path().join("store/pages"))
        .expect("pages dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .collect();
    let sizes: Vec<u64> = pack_files
        .iter()
        .map(|p| std::fs::metadata(p).expect("pack").len())
        .collect();
    for p in &pack_files {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(p)
            .expect("open pack");
        f.write_all(&[0xee; 6000]).expect("torn tail");
    }
    for (replica, pages) in [("acme/a.db", &pa), ("acme/b.db", &pb), ("acme/c.db", &pc)] {
        let (hashes, error) = scan_back(&store, replica);
        assert!(error.is_none(), "{replica}: {error:?}");
        assert_eq!(hashes, hashes_of(pages), "{replica}");
    }

    // The next push (new pages: it appends) cuts the torn tails off first.
    let mut pd = pa.clone();
    for p in pd.iter_mut().skip(1) {
        p[3000] ^= 0x11;
    }
    push_pages(&store, "acme/d.db", &pd, || {});
    let (hashes, error) = scan_back(&store, "acme/d.db");
    assert!(error.is_none(), "{error:?}");
    assert_eq!(hashes, hashes_of(&pd));
    for (p, size) in pack_files.iter().zip(&sizes) {
        let now = std::fs::metadata(p).expect("pack").len();
        assert!(
            now == *size || now == size + (n as u64 - 1) * 4096,
            "{}: {size} bytes committed, {now} now",
            p.display()
        );
    }
    scrub_clean(dir.path());
}

/// A page damaged in the middle of a run fails the read at that page, after the pages
/// before it, and is recorded, so the next push of it repairs it; a page whose index
/// row is gone breaks the run and is reported missing.
#[test]
fn a_page_damaged_in_the_middle_of_a_run_is_found_and_recorded() {
    let dir = TempDir::new().expect("tempdir");
    let a = dir.path().join("a.db");
    let conn = util::create(&a, 4096, Mode::Rollback);
    util::insert_rows(&conn, 600, 300);
    drop(conn);
    let pa = file_pages(&a);
    assert!(pa.len() > 40, "{} pages", pa.len());
    let store = Store::new(dir.path().join("store"));
    push_pages(&store, "acme/a.db", &pa, || {});
    let file = dir.path().join("store/replicas/acme/a.db.sqlferry");
    let here = locations(dir.path(), "acme/a.db");
    assert!(
        here.windows(2).all(|w| w[1].1 == w[0].1 + 4096),
        "a version pushed whole lies in page order"
    );

    let (hash, _) = crate::trust_store::stored_page(&file, 1, 10);
    crate::trust_store::flip_stored(&file, &hash, 2048, 0x04);
    let (seen, error) = scan_back(&store, "acme/a.db");
    assert_eq!(seen, hashes_of(&pa)[..9].to_vec(), "pages 1 to 9 went out");
    let error = error.expect("page 10 is refused").to_string();
    assert!(
        error.contains("page 10 ") && error.contains("damaged"),
        "{error}"
    );
    let recorded: Vec<Vec<u8>> = Connection::open(&file)
        .expect("replica file")
        .prepare("SELECT hash FROM bad_pages")
        .expect("bad pages")
        .query_map([], |r| r.get(0))
        .expect("rows")
        .collect::<rusqlite::Result<_>>()
        .expect("read");
    assert_eq!(recorded, vec![hash.to_vec()]);

    // Its row gone instead (put the byte back first): the version's place hint still
    // names its bytes, which check, so the pull has it; without the hint (a store an
    // older sqlferry made) the index decides: missing, at that page.
    crate::trust_store::flip_stored(&file, &hash, 2048, 0x04);
    let (gone, _) = crate::trust_store::stored_page(&file, 1, 30);
    assert!(
        util::forget_page(&dir.path().join("store"), &gone),
        "the page was indexed"
    );
    let (seen, error) = scan_back(&store, "acme/a.db");
    assert!(error.is_none(), "{error:?}");
    assert_eq!(seen, hashes_of(&pa), "every page, checked");
    Connection::open(&file)
        .expect("replica file")
        .execute_batch("DROP TABLE places")
        .expect("drop the hints");
    let (seen, error) = scan_back(&store, "acme/a.db");
    assert_eq!(seen.len(), 29, "pages 1 to 29 went out");
    let error = error.expect("page 30 is refused").to_string();
    assert!(
        error.contains("page 30 ") && error.contains("missing"),
        "{error}"
    );
}

/// The place hints of `replica`'s file: (chunk key, runs) of every hint.
fn hints(file: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    Connection::open(file)
        .expect("replica file")
        .prepare("SELECT chunk, runs FROM places ORDER BY chunk")
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()
        })
        .expect("places")
}

/// A full read of `replica`'s latest version through its scan: the page hashes it
/// handed on, and (pages read where a hint said, those read again through the index).
fn scan_counted(store: &Store, replica: &str) -> (Vec<Hash>, (u64, u64)) {
    use sqlferry::engine::PageSource;
    let mut r = store
        .read(
            &ReplicaPath::parse(replica).expect("valid"),
            Selector::Latest,
        )
        .expect("read");
    let mut seen = Vec::new();
    r.scan(0, &mut |pgno, hash, data| {
        let data = data.expect("a scan from page 0 reads every page");
        assert_eq!(page_hash(pgno, data), hash, "page {pgno} as handed on");
        seen.push(hash);
        Ok(())
    })
    .expect("scan");
    (seen, r.hinted())
}

/// A push leaves a place hint for each chunk of its version, and a full read goes where
/// the hints say, with no page looked up in the index; a hint that names wrong bytes
/// (stale) costs a read through the index, never a wrong page or a page recorded as
/// damaged; a replica file without hints (an older sqlferry's) is read through the
/// index, and its next push writes them.
#[test]
fn a_full_read_follows_place_hints_and_falls_back_when_they_are_stale() {
    let dir = TempDir::new().expect("tempdir");
    let a = dir.path().join("a.db");
    let conn = util::create(&a, 4096, Mode::Rollback);
    util::insert_rows(&conn, 15000, 300);
    drop(conn);
    let pa = file_pages(&a);
    assert!(pa.len() > 1024, "more than one chunk: {} pages", pa.len());
    let store = Store::new(dir.path().join("store"));
    push_pages(&store, "acme/a.db", &pa, || {});
    let file = dir.path().join("store/replicas/acme/a.db.sqlferry");
    let chunks = pa.len().div_ceil(1024);
    assert_eq!(hints(&file).len(), chunks, "one hint a chunk");
    let (seen, (hinted, stale)) = scan_counted(&store, "acme/a.db");
    assert_eq!(seen, hashes_of(&pa));
    assert_eq!(
        (hinted, stale),
        (pa.len() as u64, 0),
        "every page where its hint said"
    );

    // Every hint moved one page on: each names its neighbour's bytes (the last,
    // bytes past the run), as a hint of pages moved since would.
    let db = Connection::open(&file).expect("replica file");
    for (chunk, mut runs) in hints(&file) {
        // Runs: pack (i64, negative: its entries carry sums), offset (u64), count
        // (u32), then a length (u32) and a sum (u64) an entry.
        let mut at = 0;
        while at < runs.len() {
            let pack = i64::from_le_bytes(runs[at..at + 8].try_into().expect("8 bytes"));
            let offset = u64::from_le_bytes(runs[at + 8..at + 16].try_into().expect("8 bytes"));
            let count = u32::from_le_bytes(runs[at + 16..at + 20].try_into().expect("4 bytes"));
            assert!(pack < 0, "every page has a place, and a sum");
            runs[at + 8..at + 16].copy_from_slice(&(offset + 4096).to_le_bytes());
            at += 20 + 12 * count as usize;
        }
        db.execute(
            "UPDATE places SET runs = ?2 WHERE chunk = ?1",
            rusqlite::params![chunk, runs],
        )
        .expect("move the hint");
    }
    let (seen, (hinted, stale)) = scan_counted(&store, "acme/a.db");
    assert_eq!(seen, hashes_of(&pa), "the right pages all the same");
    assert_eq!((hinted, stale), (pa.len() as u64, pa.len() as u64));
    let bad: i64 = db
        .query_row("SELECT count(*) FROM bad_pages", [], |r| r.get(0))
        .unwrap_or(0);
    assert_eq!(bad, 0, "a stale hint is not damage");

    // A hint that does not parse is not used at all.
    db.execute("UPDATE places SET runs = X'00'", [])
        .expect("spoil the hints");
    let (seen, counted) = scan_counted(&store, "acme/a.db");
    assert_eq!(seen, hashes_of(&pa));
    assert_eq!(counted, (0, 0));

    // No hint table, as an older sqlferry made the file: read through the index; the
    // next push (one page changed) writes a hint for every chunk of its version.
    db.execute_batch("DROP TABLE places")
        .expect("drop the hints");
    let (seen, counted) = scan_counted(&store, "acme/a.db");
    assert_eq!(seen, hashes_of(&pa));
    assert_eq!(counted, (0, 0));
    drop(db);
    let mut pb = pa.clone();
    let last = pb.len() - 1;
    pb[last][100] ^= 0x01; // a leaf's cell content: the page differs, the file still reads
    let r = ReplicaPath::parse("acme/a.db").expect("valid");
    let mut w = store
        .push(
            &r,
            PushOptions {
                base: Some(1),
                ..PushOptions::default()
            },
        )
        .expect("push");
    let n = pb.len() as u32;
    let held = w
        .begin(&BeginInfo {
            page_size: 4096,
            page_count: n,
            base_version: 1,
            known_base: true,
            chunked_digest: false,
            sealed: false,
        })
        .expect("begin");
    assert_eq!(held, n, "every page held");
    let hashes = hashes_of(&pb);
    w.write_page(n, pb[last].clone(), &hashes[last])
        .expect("write");
    w.commit(n, &digest_of(&pb), &mut hashes.iter().map(|h| Ok(*h)))
        .expect("commit");
    assert!(w.outcome().is_some_and(|(v, made)| made && v.number == 2));
    drop(w);
    assert_eq!(
        hints(&file).len(),
        chunks,
        "a hint for each chunk of version 2"
    );
    let (seen, (hinted, stale)) = scan_counted(&store, "acme/a.db");
    assert_eq!(seen, hashes);
    assert_eq!((hinted, stale), (pb.len() as u64, 0));
}

/// The store's files keep their WAL between pushes (fewer fsyncs for small pushes), but
/// each CLI push is a new process, which rebuilds the wal-index from the WAL and counts
/// none of its frames as copied back: without a trim after the commit, the index's WAL
/// grew by every push forever, and every push read and checkpointed all of it again.
#[test]
fn the_store_files_wals_stay_small_over_many_pushes() {
    let dir = TempDir::new().expect("tempdir");
    let db = database(dir.path(), "app.db", 60_000);
    let src = db.to_str().expect("utf-8");
    let index_wal = dir.path().join("store/pages/index.sqlite-wal");
    let replica_wal = dir.path().join("store/replicas/acme/app.db.sqlferry-wal");
    // The largest WAL seen after a push, the largest one push added, and all they added.
    let (mut most, mut step, mut grown) = (0, 0, 0);
    for round in 0..12u64 {
        // A tenth of the rows, spread over the whole file: new pages all over the index.
        let conn = util::open(&db);
        conn.execute(
            "UPDATE t SET v = randomblob(300) WHERE id % 10 = ?1",
            [round as i64 % 10],
        )
        .expect("update");
        drop(conn);
        let before = [util::file_len(&index_wal), util::file_len(&replica_wal)];
        let out = run_ok(dir.path(), &["push", src, "acme/app.db"]);
        assert_eq!(out["version"], round + 1, "{out}");
        let after = [util::file_len(&index_wal), util::file_len(&replica_wal)];
        for (a, b) in after.iter().zip(before) {
            step = step.max(a.saturating_sub(b));
            grown += a.saturating_sub(b);
        }
        most = most.max(after[0]).max(after[1]);
    }
    assert!(
        grown > 2 << 20,
        "the pushes added only {grown} bytes to the store's WALs: too little to show growth"
    );
    // Trimmed past 1 MiB at a commit: never more than that and one push's frames.
    assert!(
        most <= (1 << 20) + step,
        "a store WAL reached {most} bytes over 12 pushes (one push adds up to {step})"
    );
    let copy = dir.path().join("copy.db");
    run_ok(
        dir.path(),
        &["pull", "acme/app.db", copy.to_str().expect("utf-8")],
    );
    util::assert_same(&db, &copy);
    scrub_clean(dir.path());
}

/// The run files of the store in `dir` (`store/pages/run-*.run`).
fn run_files(dir: &Path) -> Vec<PathBuf> {
    let mut runs: Vec<PathBuf> = std::fs::read_dir(dir.join("store/pages"))
        .expect("pages dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "run"))
        .collect();
    runs.sort();
    runs
}

/// A push writes its new pages' index entries as a run file; eight runs of one size
/// are merged into one. A damaged run stops every push and pull that reads it, by
/// name, and changes nothing; the run put back, everything goes on. A run file no
/// commit lists (a push killed before its commit) is never read, and the next push
/// removes it.
#[test]
fn the_index_runs_merge_are_checked_and_a_killed_pushs_run_goes() {
    let dir = TempDir::new().expect("tempdir");
    let db = database(dir.path(), "app.db", 4000);
    let src = db.to_str().expect("utf-8");
    run_ok(dir.path(), &["push", src, "acme/app.db"]);
    assert_eq!(run_files(dir.path()).len(), 1, "the full push's run");
    let change = |round: i64| {
        util::open(&db)
            .execute(
                "UPDATE t SET v = randomblob(300) WHERE id % 40 = ?1",
                [round],
            )
            .expect("update");
    };
    for round in 0..7 {
        change(round);
        run_ok(dir.path(), &["push", src, "acme/app.db"]);
    }
    assert_eq!(
        run_files(dir.path()).len(),
        8,
        "{:?}",
        run_files(dir.path())
    );
    change(7);
    run_ok(dir.path(), &["push", src, "acme/app.db"]);
    // The eighth small run made seven small ones and itself one: the full push's run
    // is of another size.
    assert_eq!(
        run_files(dir.path()).len(),
        2,
        "{:?}",
        run_files(dir.path())
    );
    scrub_clean(dir.path());

    // A flipped byte in a run's summary (read when the run opens): every push and
    // pull stops there, by name.
    let versions = |dir: &Path| run_ok(dir, &["versions", "acme/app.db"]);
    let before = versions(dir.path());
    let newest = run_files(dir.path()).pop().expect("a run");
    let name = newest.file_name().unwrap().to_string_lossy().to_string();
    let good = std::fs::read(&newest).expect("run");
    let damaged = |at: usize| {
        let mut bad = good.clone();
        bad[at] ^= 0x01;
        std::fs::write(&newest, &bad).expect("damage");
    };
    damaged(good.len() - 40);
    change(8);
    let out = run(dir.path(), &["push", src, "acme/app.db"]);
    assert_ne!(util::code(&out), 0);
    let said = util::stderr(&out) + &util::stdout(&out);
    assert!(
        said.contains("a run file of the page index is damaged") && said.contains(&name),
        "{said}"
    );
    // A flipped byte among its entries: read only by the lookups that land in that
    // block, and by scrub, which reads every entry.
    damaged(16 + 64 * 3 + 40);
    let scrub = util::sqlferry(dir.path())
        .args(["scrub", "--json", "--data"])
        .arg(dir.path().join("store"))
        .output()
        .expect("scrub");
    assert_ne!(util::code(&scrub), 0, "scrub finds the damaged run");
    let said = util::stderr(&scrub) + &util::stdout(&scrub);
    assert!(
        said.contains("a block of entries fails its sum") && said.contains(&name),
        "{said}"
    );

    // Put back: the failed push made no version, and the same push lands and pulls
    // whole.
    std::fs::write(&newest, &good).expect("repair");
    assert_eq!(
        versions(dir.path()),
        before,
        "the failed push made no version"
    );
    run_ok(dir.path(), &["push", src, "acme/app.db"]);
    let copy = dir.path().join("copy.db");
    run_ok(
        dir.path(),
        &["pull", "acme/app.db", copy.to_str().expect("utf-8")],
    );
    util::assert_same(&db, &copy);

    // A run a killed push wrote (and one it was still writing): not listed, so not
    // read, though it is garbage; the next push removes both.
    let listed = run_files(dir.path());
    let stray = dir.path().join("store/pages/run-9999.run");
    std::fs::write(&stray, b"garbage").expect("stray run");
    let torn = dir.path().join("store/pages/run-10000.run-tmp");
    std::fs::write(&torn, b"garbage").expect("torn run");
    run_ok(
        dir.path(),
        &["pull", "acme/app.db", copy.to_str().expect("utf-8")],
    );
    change(9);
    run_ok(dir.path(), &["push", src, "acme/app.db"]);
    assert!(!stray.exists() && !torn.exists());
    assert!(run_files(dir.path()).len() <= listed.len() + 1);
    scrub_clean(dir.path());
}
