//! The S3 store (`sqlferry::store::s3`) against a real SeaweedFS (`seaweed`): real WAL
//! databases pushed through the engine into it and pulled back into files, the
//! requests each operation makes (counted by the object layer; the numbers in
//! docs/scale-out.md's "Requests per operation" come from these tests), two pushes
//! racing for one version number, a damaged pack refused, pages shared by replicas.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier, OnceLock};

use sqlferry::digest::{Hash, chunk_count, sha256};
use sqlferry::engine::{
    BaseManifest, BeginInfo, KnownBase, NoProgress, OriginOptions, PageTarget, sync_local,
    sync_local_with,
};
use sqlferry::page::{Snapshot, Writer};
use sqlferry::store::object::{Objects, RequestCounts, S3Location};
use sqlferry::store::s3::{RUN_BYTES, S3Store, S3VersionWriter};
use sqlferry::store::{PushOptions, ReplicaPath, Selector};
use sqlferry::{Error, ErrorKind};
use tempfile::TempDir;

use crate::seaweed;
use crate::util::{self, Mode};

/// The runtime the store's requests run on; the tests themselves block on its
/// answers from their own thread, as the engine's threads do.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

/// A store under a prefix of its own, with its cache in `cache`. The tests of this
/// module share one bucket: SeaweedFS gives each bucket volumes of its own, and the
/// test server has few (`seaweed`).
fn new_store(rt: &tokio::runtime::Runtime, cache: &Path) -> S3Store {
    static BUCKET: OnceLock<String> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let bucket = BUCKET.get_or_init(|| seaweed::shared().bucket());
    let location = S3Location::parse(&format!(
        "{bucket}/store-{}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
    .unwrap();
    let objects = Objects::open(location, &seaweed::shared().options()).expect("open");
    S3Store::open(objects, cache, rt.handle().clone()).expect("open")
}

/// The same bucket as `store`, seen by another server: an empty cache of its own.
fn other_server(rt: &tokio::runtime::Runtime, store: &S3Store, cache: &Path) -> S3Store {
    let objects = Objects::open(
        store.objects().location().clone(),
        &seaweed::shared().options(),
    )
    .expect("open");
    S3Store::open(objects, cache, rt.handle().clone()).expect("open")
}

/// A WAL database of about 3,300 pages of 4 KiB (random blobs: no two pages alike),
/// its writes in the WAL as long as the connection returned stays open.
fn wal_database(path: &Path) -> rusqlite::Connection {
    let conn = util::create(path, 4096, Mode::Wal);
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .expect("no checkpoints");
    util::insert_rows(&conn, 12_000, 1000);
    assert!(util::page_count(path) > 3000, "thousands of pages");
    conn
}

fn options(base: Option<u64>, message: &str) -> PushOptions {
    PushOptions {
        base,
        message: message.into(),
        client_id: "s3test".into(),
        ..PushOptions::default()
    }
}

/// Pushes `db` into `replica` through the engine (the hash-tree path).
fn push(store: &S3Store, replica: &ReplicaPath, db: &Path, base: Option<u64>) -> (u64, bool) {
    let mut writer = store.push(replica, options(base, "test")).expect("push");
    let mut source = Snapshot::open(db).expect("snapshot").with_hash_cache(None);
    sync_local(&mut source, &mut writer, &NoProgress).expect("the push");
    let (v, made) = writer.outcome().expect("an outcome");
    (v.number, made)
}

/// Pulls `replica@selector` into `dest` through the engine.
fn pull(store: &S3Store, replica: &ReplicaPath, selector: Selector, dest: &Path) {
    let mut reader = store.read(replica, selector).expect("read");
    let mut writer = Writer::open(dest).expect("writer");
    sync_local(&mut reader, &mut writer, &NoProgress).expect("the pull");
}

fn delta(after: RequestCounts, before: RequestCounts) -> RequestCounts {
    RequestCounts {
        put: after.put - before.put,
        get: after.get - before.get,
        head: after.head - before.head,
        delete: after.delete - before.delete,
        list: after.list - before.list,
    }
}

/// The chunks (1,024 page hashes) of `new` that differ from `old`'s.
fn changed_chunks(old: &[Hash], new: &[Hash]) -> u64 {
    let old: HashSet<Hash> = old.chunks(1024).map(|c| sha256(&c.concat())).collect();
    new.chunks(1024)
        .filter(|c| !old.contains(&sha256(&c.concat())))
        .count() as u64
}

/// Pages of `new` whose content is in no page of `old` (each counted once).
fn new_pages(old: &[Hash], new: &[Hash]) -> u64 {
    let old: HashSet<&Hash> = old.iter().collect();
    new.iter()
        .filter(|h| !old.contains(h))
        .collect::<HashSet<_>>()
        .len() as u64
}

/// A full push of a WAL database into a new replica makes version 1 with one pack,
/// its index, its chunks and the version object; pulled back by another server (its
/// cache empty) into a new file, it is the same database: rows, integrity, digest.
#[test]
fn a_wal_database_pushed_and_pulled_back_is_the_same() {
    let rt = runtime();
    let dir = TempDir::new().unwrap();
    let db = dir.path().join("app.db");
    let _writer = wal_database(&db);
    assert!(
        util::file_len(&util::sidecar(&db, "-wal")) > 0,
        "pages in the WAL"
    );
    let store = new_store(&rt, &dir.path().join("cache-a"));
    let replica = ReplicaPath::parse("acme/app.db").unwrap();
    let pages = util::page_count(&db) as u64;
    let chunks = u64::from(chunk_count(pages as u32));

    let before = store.objects().requests();
    assert_eq!(push(&store, &replica, &db, None), (1, true));
    let pushed = delta(store.objects().requests(), before);
    eprintln!("full push of {pages} pages: {pushed:?}");
    // 1 pack (below the multipart size) + 1 index + the chunks + 1 version object;
    // 1 GET: version 1 does not exist yet.
    assert_eq!(pushed.put, 1 + 1 + chunks + 1, "{pushed:?}");
    assert_eq!(
        (pushed.get, pushed.head, pushed.list),
        (1, 0, 0),
        "{pushed:?}"
    );
    let v = store.version(&replica, 1).unwrap().expect("version 1");
    assert_eq!(v.packs.len(), 1);
    assert_eq!(v.digest, util::digest(&db));
    assert_eq!(v.digest2, util::chunked_digest(&db));
    let pack = v.packs[0].clone();
    let pack_len = rt
        .block_on(store.objects().head(&format!("packs/{pack}.pack")))
        .unwrap()
        .expect("the pack exists");
    assert_eq!(pack_len, pages * 4096, "every page once, plain");

    let other = other_server(&rt, &store, &dir.path().join("cache-b"));
    let copy = dir.path().join("copy.db");
    let before = other.objects().requests();
    pull(&other, &replica, Selector::Latest, &copy);
    let pulled = delta(other.objects().requests(), before);
    eprintln!("full pull: {pulled:?}");
    util::assert_same(&db, &copy);
    // Finding the latest with no hint: 1 found, 3 and 2 missing; the pack's index;
    // the chunks; the pages in ranged GETs of at most RUN_BYTES.
    let runs = pack_len.div_ceil(RUN_BYTES);
    assert_eq!(pulled.get, 3 + 1 + chunks + runs, "{pulled:?}");
    assert_eq!((pulled.put, pulled.list), (0, 0), "{pulled:?}");

    // Every way to name it gives it.
    let soon = sqlferry::epoch::now() + 60;
    for (i, sel) in [Selector::Number(1), Selector::At(soon)]
        .into_iter()
        .enumerate()
    {
        let again = dir.path().join(format!("again-{i}.db"));
        pull(&other, &replica, sel, &again);
        assert_eq!(util::digest(&again), util::digest(&db), "{sel}");
    }
    let versions = other.versions(&replica).unwrap();
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0].message, "test");
    let missing = other
        .read(&replica, Selector::Number(2))
        .err()
        .expect("no version 2");
    assert_eq!(missing.kind(), ErrorKind::NotFound, "{missing}");
    let none = other
        .versions(&ReplicaPath::parse("acme/none.db").unwrap())
        .unwrap_err();
    assert_eq!(none.kind(), ErrorKind::NotFound, "{none}");
}

/// A database's page hashes, as a known base for the origin.
struct Manifest(Vec<Hash>, Vec<Hash>);

impl Manifest {
    fn of(path: &Path) -> Manifest {
        let pages = util::page_hashes(path);
        let chunks = pages.chunks(1024).map(|c| sha256(&c.concat())).collect();
        Manifest(pages, chunks)
    }
}

impl BaseManifest for Manifest {
    fn chunk_hashes(&self) -> &[Hash] {
        &self.1
    }
    fn read_chunk(&mut self, idx: u32, out: &mut Vec<u8>) -> sqlferry::Result<bool> {
        for h in self.0.chunks(1024).nth(idx as usize).unwrap_or_default() {
            out.extend_from_slice(h);
        }
        Ok(true)
    }
}

/// About 1% of the rows changed: the push by hash tree, then one by chunks from a
/// known base, each write a pack of only the new pages, its index, the changed chunks
/// and the version object; a push of nothing new makes no version and writes
/// nothing. Each version pulls back the same as its database.
#[test]
fn a_small_change_pushes_only_the_changed_pages() {
    let rt = runtime();
    let dir = TempDir::new().unwrap();
    let db = dir.path().join("app.db");
    let writer = wal_database(&db);
    let store = new_store(&rt, &dir.path().join("cache"));
    let replica = ReplicaPath::parse("acme/app.db").unwrap();
    push(&store, &replica, &db, None);
    let v1 = util::page_hashes(&db);
    let v1_file = dir.path().join("v1.db");
    util::sync(&db, &v1_file);

    // 1% of the rows, spread through the table.
    let conn = &writer;
    conn.execute("UPDATE t SET v = randomblob(1000) WHERE id % 100 = 7", [])
        .unwrap();
    let v2 = util::page_hashes(&db);
    let two_file = dir.path().join("v2.db");
    util::sync(&db, &two_file);
    let (chunks, fresh) = (changed_chunks(&v1, &v2), new_pages(&v1, &v2));
    assert!(
        fresh > 0 && fresh < v2.len() as u64 / 20,
        "{fresh} new pages"
    );
    let before = store.objects().requests();
    assert_eq!(push(&store, &replica, &db, Some(1)), (2, true));
    let pushed = delta(store.objects().requests(), before);
    eprintln!("1% push by hash tree ({fresh} new pages, {chunks} chunks): {pushed:?}");
    assert_eq!(pushed.put, 1 + 1 + chunks + 1, "{pushed:?}");
    // Version 1 and the missing 2; version 1's chunks for the hash exchange.
    let all_chunks = u64::from(chunk_count(v1.len() as u32));
    assert_eq!(pushed.get, 2 + all_chunks, "{pushed:?}");
    let v = store.version(&replica, 2).unwrap().expect("version 2");
    let new_pack = v.packs.iter().find(|p| {
        !store
            .version(&replica, 1)
            .unwrap()
            .unwrap()
            .packs
            .contains(p)
    });
    let new_pack = new_pack.expect("a pack of its own");
    let len = rt
        .block_on(store.objects().head(&format!("packs/{new_pack}.pack")))
        .unwrap()
        .unwrap();
    assert_eq!(len, fresh * 4096, "only the new pages");

    // By chunks, from the known base 2, with the chunked digest.
    conn.execute("UPDATE t SET v = randomblob(1000) WHERE id % 100 = 42", [])
        .unwrap();
    let v3 = util::page_hashes(&db);
    let (chunks, fresh) = (changed_chunks(&v2, &v3), new_pages(&v2, &v3));
    let mut base = Manifest::of(&two_file);
    let mut writer = store.push(&replica, options(Some(2), "by chunks")).unwrap();
    let mut source = Snapshot::open(&db).unwrap().with_hash_cache(None);
    let before = store.objects().requests();
    let stats = sync_local_with(
        &mut source,
        &mut writer,
        &NoProgress,
        OriginOptions {
            base: Some(KnownBase {
                version: 2,
                page_size: 4096,
                page_count: v2.len() as u32,
                hashes: &mut base,
            }),
            manifest: None,
            chunked_digest: true,
            sealing: None,
        },
    )
    .expect("the push by chunks");
    let pushed = delta(store.objects().requests(), before);
    eprintln!("1% push by chunks ({fresh} new pages, {chunks} chunks): {pushed:?}");
    assert_eq!(stats.hash_bytes, 0, "no hash travelled");
    assert_eq!(writer.outcome().unwrap().0.number, 3);
    assert_eq!(pushed.put, 1 + 1 + chunks + 1, "{pushed:?}");
    // Version 2 and the missing 3 (the latest from the base), and the held chunks
    // pages were sent for (the engine reads their page hashes).
    assert_eq!(pushed.get, 2 + chunks, "{pushed:?}");
    let v = store.version(&replica, 3).unwrap().unwrap();
    assert_eq!(v.digest2, util::chunked_digest(&db));
    drop(writer);

    // Nothing new: no version, nothing written; version 3 and the missing 4, and
    // the chunks for the hash exchange.
    let before = store.objects().requests();
    assert_eq!(push(&store, &replica, &db, Some(3)), (3, false));
    let pushed = delta(store.objects().requests(), before);
    eprintln!("no-change push: {pushed:?}");
    assert_eq!((pushed.put, pushed.get), (0, 2 + all_chunks), "{pushed:?}");

    // Each version is its database; a 1% pull into the old copy by another server.
    let other = other_server(&rt, &store, &dir.path().join("cache-b"));
    let before = other.objects().requests();
    pull(&other, &replica, Selector::Number(3), &v1_file);
    let pulled = delta(other.objects().requests(), before);
    let differ = v1.iter().zip(&v3).filter(|(a, b)| a != b).count() as u64;
    eprintln!("pull of 3 into a copy of 1 ({differ} pages differ): {pulled:?}");
    // The latest without a hint (1 and 3 found, 7, 5 and 4 missing), the indexes of
    // version 3's 3 packs, its chunks twice (the scan's hashes, then those of the
    // pages read); then the pages that differ, read ahead: they lie end to end in the
    // packs of versions 2 and 3, so a ranged GET brings many (at least one GET per
    // pack, and ten pages or more per GET; one GET per page was 240 here).
    let page_gets = pulled.get - (5 + 3 + 2 * all_chunks);
    assert!(
        (2..=differ / 10).contains(&page_gets),
        "{page_gets} GETs for {differ} pages: {pulled:?}"
    );
    util::assert_same(&db, &v1_file);
    let two = dir.path().join("two.db");
    pull(&other, &replica, Selector::LatestMinus(1), &two);
    assert_eq!(util::page_hashes(&two), v2);
    assert_eq!(util::integrity(&two), "ok");
}

/// Drives `writer` as the engine's replica role does, with every page of `db` (not
/// committed): what a push does up to its COMMIT.
fn begin_and_write(writer: &mut S3VersionWriter, db: &Path) -> (u32, Vec<Hash>) {
    use sqlferry::engine::PageSource;
    let mut snap = Snapshot::open(db).unwrap().with_hash_cache(None);
    let count = snap.page_count();
    writer
        .begin(&BeginInfo {
            page_size: 4096,
            page_count: count,
            base_version: 1,
            known_base: false,
            chunked_digest: false,
            sealed: false,
        })
        .unwrap();
    let mut hashes = Vec::new();
    snap.scan(0, &mut |pgno, hash, data| {
        hashes.push(hash);
        let data = data.expect("a snapshot reads every page").to_vec();
        writer.write_page(pgno, data, &hash)
    })
    .unwrap();
    (count, hashes)
}

fn digest_of(hashes: &[Hash]) -> Hash {
    let mut d = sqlferry::digest::Digest::new(4096, hashes.len() as u32);
    for h in hashes {
        d.push(h);
    }
    d.finish().unwrap()
}

/// Two pushes onto version 1 from two servers: both begin before either commits, so
/// both claim version 2; the object storage's create-if-absent lets exactly one make
/// it, and the other is refused with VERSION_CONFLICT, its version never visible.
/// Then rounds of two real engine pushes released at once by a barrier: each round,
/// exactly one new version, and it holds the winner's database.
#[test]
fn two_pushes_racing_for_a_version_one_wins() {
    let rt = runtime();
    let dir = TempDir::new().unwrap();
    let db = dir.path().join("app.db");
    let _writer = wal_database(&db);
    let a = new_store(&rt, &dir.path().join("cache-a"));
    let b = other_server(&rt, &a, &dir.path().join("cache-b"));
    let replica = ReplicaPath::parse("acme/app.db").unwrap();
    push(&a, &replica, &db, None);

    let (db_a, db_b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    for (path, n) in [(&db_a, 1), (&db_b, 2)] {
        util::sync(&db, path);
        util::open(path)
            .execute("UPDATE t SET k = ?1 WHERE id < 50", [format!("writer {n}")])
            .unwrap();
    }
    let mut wa = a.push(&replica, options(Some(1), "a")).unwrap();
    let mut wb = b.push(&replica, options(Some(1), "b")).unwrap();
    let (count_a, hashes_a) = begin_and_write(&mut wa, &db_a);
    let (count_b, hashes_b) = begin_and_write(&mut wb, &db_b);
    wa.commit(
        count_a,
        &digest_of(&hashes_a),
        &mut hashes_a.iter().map(|h| Ok(*h)),
    )
    .expect("the first to commit makes version 2");
    let lost = wb
        .commit(
            count_b,
            &digest_of(&hashes_b),
            &mut hashes_b.iter().map(|h| Ok(*h)),
        )
        .unwrap_err();
    assert!(matches!(lost, Error::Conflict { latest: 2, .. }), "{lost}");
    assert_eq!(lost.kind(), ErrorKind::Conflict);
    let latest = b.latest(&replica).unwrap().unwrap();
    assert_eq!((latest.number, latest.message.as_str()), (2, "a"));
    assert_eq!(latest.digest, util::digest(&db_a));

    // Real pushes through the engine, released at once.
    for round in 0..3u64 {
        let base = 2 + round;
        let barrier = Arc::new(Barrier::new(2));
        let results: Vec<_> = [(&a, &db_a, "a"), (&b, &db_b, "b")]
            .map(|(store, path, name)| {
                util::open(path)
                    .execute(
                        "UPDATE t SET k = ?1 WHERE id = 1",
                        [format!("{name} {round}")],
                    )
                    .unwrap();
                (store.clone(), path.to_path_buf(), name, barrier.clone())
            })
            .into_iter()
            .map(|(store, path, name, barrier)| {
                let replica = replica.clone();
                std::thread::spawn(move || {
                    let mut writer = store.push(&replica, options(Some(base), name)).unwrap();
                    let mut source = Snapshot::open(&path).unwrap().with_hash_cache(None);
                    barrier.wait();
                    sync_local(&mut source, &mut writer, &NoProgress)
                        .map(|_| writer.outcome().unwrap().0.number)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let won: Vec<_> = results.iter().filter(|r| r.is_ok()).collect();
        assert_eq!(won.len(), 1, "round {round}: {results:?}");
        assert_eq!(*won[0].as_ref().unwrap(), base + 1, "round {round}");
        let lost = results.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert_eq!(lost.kind(), ErrorKind::Conflict, "round {round}: {lost}");
        let latest = a.latest(&replica).unwrap().unwrap();
        assert_eq!(latest.number, base + 1);
        let winner = if latest.message == "a" { &db_a } else { &db_b };
        assert_eq!(latest.digest, util::digest(winner), "round {round}");
        // The loser's next push starts from the winner's version.
        let loser = if latest.message == "a" { &db_b } else { &db_a };
        util::sync(winner, loser);
    }
}

/// A byte flipped in a pack: the pull that reads that page fails naming it, and the
/// local database is exactly as it was (rows, integrity, digest).
#[test]
fn a_damaged_pack_fails_the_pull_and_leaves_local_alone() {
    let rt = runtime();
    let dir = TempDir::new().unwrap();
    let db = dir.path().join("app.db");
    let _writer = wal_database(&db);
    let store = new_store(&rt, &dir.path().join("cache"));
    let replica = ReplicaPath::parse("acme/app.db").unwrap();
    push(&store, &replica, &db, None);

    let local = dir.path().join("local.db");
    let conn = util::create(&local, 4096, Mode::Wal);
    util::insert_rows(&conn, 100, 500);
    drop(conn);
    let (digest, rows) = (util::digest(&local), util::dump(&local));

    let v = store.version(&replica, 1).unwrap().unwrap();
    let key = format!("packs/{}.pack", v.packs[0]);
    let mut bytes = rt.block_on(store.objects().get(&key)).unwrap().unwrap();
    let at = bytes.len() / 2 + 100;
    bytes[at] ^= 0x01;
    rt.block_on(store.objects().put(&key, bytes)).unwrap();

    // Another server (no cache), and this one: both refuse.
    let other = other_server(&rt, &store, &dir.path().join("cache-b"));
    for s in [&other, &store] {
        let mut reader = s.read(&replica, Selector::Latest).unwrap();
        let mut writer = Writer::open(&local).unwrap();
        let err = sync_local(&mut reader, &mut writer, &NoProgress).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("damaged") && text.contains(&key), "{text}");
        assert_eq!(err.kind(), ErrorKind::Verification, "{text}");
        drop(writer);
        assert_eq!(util::digest(&local), digest);
        assert_eq!(util::integrity(&local), "ok");
        assert!(util::dump(&local) == rows, "local rows unchanged");
    }
}

/// A pull into an older copy reads ahead in a pack (docs/scale-out.md): a damaged page
/// among those fetched ahead is never delivered. The pull fails naming the pack, and
/// the older copy is left as it was.
#[test]
fn a_damaged_page_read_ahead_fails_the_pull_and_leaves_the_old_copy_alone() {
    let rt = runtime();
    let dir = TempDir::new().unwrap();
    let db = dir.path().join("app.db");
    let conn = wal_database(&db);
    let store = new_store(&rt, &dir.path().join("cache"));
    let replica = ReplicaPath::parse("acme/app.db").unwrap();
    push(&store, &replica, &db, None);
    let old = dir.path().join("old.db");
    pull(&store, &replica, Selector::Number(1), &old);
    let (digest, rows) = (util::digest(&old), util::dump(&old));

    // A contiguous change: its pages lie end to end in version 2's own pack.
    conn.execute(
        "UPDATE t SET v = randomblob(1000) WHERE id BETWEEN 200 AND 400",
        [],
    )
    .unwrap();
    assert_eq!(push(&store, &replica, &db, Some(1)), (2, true));
    let v1 = store.version(&replica, 1).unwrap().unwrap();
    let v2 = store.version(&replica, 2).unwrap().unwrap();
    let pack = v2.packs.iter().find(|p| !v1.packs.contains(p)).unwrap();
    let key = format!("packs/{pack}.pack");
    let mut bytes = rt.block_on(store.objects().get(&key)).unwrap().unwrap();
    assert!(bytes.len() >= 8 * 4096, "{} bytes", bytes.len());
    // The fourth page of the pack: fetched ahead with the first.
    bytes[3 * 4096 + 100] ^= 0x01;
    rt.block_on(store.objects().put(&key, bytes)).unwrap();

    let before = store.objects().requests();
    let mut reader = store.read(&replica, Selector::Latest).unwrap();
    let mut writer = Writer::open(&old).unwrap();
    let err = sync_local(&mut reader, &mut writer, &NoProgress).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("damaged") && text.contains(&key), "{text}");
    assert_eq!(err.kind(), ErrorKind::Verification, "{text}");
    drop(writer);
    let pulled = delta(store.objects().requests(), before);
    eprintln!("the pull that met the damage: {pulled:?}");
    assert_eq!(util::digest(&old), digest);
    assert_eq!(util::integrity(&old), "ok");
    assert!(util::dump(&old) == rows, "the old copy's rows unchanged");
}

/// A second replica with the same pages, pushed by the same server: no pack, no
/// index, no chunk, only its version object, naming the first replica's pack. Pushed
/// by another server (which knows no pack), the pack it writes has the same name: the
/// same object. Both pull back whole.
#[test]
fn replicas_with_the_same_pages_share_them() {
    let rt = runtime();
    let dir = TempDir::new().unwrap();
    let db = dir.path().join("app.db");
    let _writer = wal_database(&db);
    let store = new_store(&rt, &dir.path().join("cache"));
    let (a, b, c) = (
        ReplicaPath::parse("acme/a.db").unwrap(),
        ReplicaPath::parse("acme/b.db").unwrap(),
        ReplicaPath::parse("other/c.db").unwrap(),
    );
    push(&store, &a, &db, None);
    let before = store.objects().requests();
    assert_eq!(push(&store, &b, &db, None), (1, true));
    let pushed = delta(store.objects().requests(), before);
    eprintln!("the same pages into a second replica: {pushed:?}");
    assert_eq!(pushed.put, 1, "only the version object: {pushed:?}");
    let (va, vb) = (
        store.version(&a, 1).unwrap().unwrap(),
        store.version(&b, 1).unwrap().unwrap(),
    );
    assert_eq!(vb.packs, va.packs);
    assert_eq!(vb.chunks, va.chunks);

    let other = other_server(&rt, &store, &dir.path().join("cache-b"));
    push(&other, &c, &db, None);
    assert_eq!(other.version(&c, 1).unwrap().unwrap().packs, va.packs);

    for (replica, name) in [(&b, "b.db"), (&c, "c.db")] {
        let copy = dir.path().join(name);
        pull(&other, replica, Selector::Latest, &copy);
        util::assert_same(&db, &copy);
    }
}

/// A push whose new pages pass the multipart size: the pack goes up in parts read one
/// at a time from the push's temporary file (start, 16 MiB parts, completion), and
/// pulls back whole.
#[test]
fn a_large_pack_is_uploaded_in_parts() {
    use sqlferry::store::object::{MULTIPART_ABOVE, PART_SIZE};
    let rt = runtime();
    let dir = TempDir::new().unwrap();
    let db = dir.path().join("big.db");
    let conn = util::create(&db, 4096, Mode::Wal);
    util::fill(&conn, MULTIPART_ABOVE as u64 + (4 << 20), 3000);
    drop(conn);
    let store = new_store(&rt, &dir.path().join("cache"));
    let replica = ReplicaPath::parse("acme/big.db").unwrap();
    let pages = util::page_count(&db);
    let pack_len = u64::from(pages) * 4096;
    assert!(pack_len > MULTIPART_ABOVE as u64);
    let before = store.objects().requests();
    assert_eq!(push(&store, &replica, &db, None), (1, true));
    let pushed = delta(store.objects().requests(), before);
    eprintln!("full push of {pages} pages in parts: {pushed:?}");
    let parts = pack_len.div_ceil(PART_SIZE as u64);
    let chunks = u64::from(chunk_count(pages));
    assert_eq!(pushed.put, 1 + parts + 1 + 1 + chunks + 1, "{pushed:?}");
    let v = store.version(&replica, 1).unwrap().unwrap();
    let stored = rt
        .block_on(store.objects().head(&format!("packs/{}.pack", v.packs[0])))
        .unwrap();
    assert_eq!(stored, Some(pack_len));
    let other = other_server(&rt, &store, &dir.path().join("cache-b"));
    let copy = dir.path().join("copy.db");
    pull(&other, &replica, Selector::Latest, &copy);
    util::assert_same(&db, &copy);
}

/// A sealed push of `pages` made-up sealed pages (the store cannot open a page, only
/// keep it and its checksum), begun on a new replica, its pages written and its seal
/// kept; the identities it sent, for its commit.
fn begin_sealed(writer: &mut S3VersionWriter, pages: u32, seed: u8) -> Vec<Hash> {
    writer
        .begin(&BeginInfo {
            page_size: 4096,
            page_count: pages,
            base_version: 0,
            known_base: false,
            chunked_digest: false,
            sealed: true,
        })
        .unwrap();
    let ids: Vec<Hash> = (1..=pages).map(|p| sha256(&[seed, p as u8])).collect();
    for (i, id) in ids.iter().enumerate() {
        writer
            .write_page(i as u32 + 1, vec![seed; 4096 + 28], id)
            .unwrap();
    }
    writer.keep_seal(vec![seed; 64]).unwrap();
    ids
}

/// A first push sealed with key id `key`, stretched from a passphrase with `salt`.
fn sealed_options(key: &str, salt: &sqlferry::crypt::PassphraseSalt) -> PushOptions {
    PushOptions {
        encryption: Some(key.into()),
        passphrase: Some(*salt),
        ..options(None, "")
    }
}

fn commit(writer: &mut S3VersionWriter, hashes: &[Hash]) -> sqlferry::Result<()> {
    writer.commit(
        hashes.len() as u32,
        &digest_of(hashes),
        &mut hashes.iter().map(|h| Ok(*h)),
    )
}

/// First pushes of a new replica that both begin before either commits (two servers
/// over one bucket), committed in a set order: the one that loses version 1 to a
/// version of the other kind (plaintext and sealed) or another key id is refused as
/// the mix is (auth, exit 5), never as a VERSION_CONFLICT whose advice (`--force`)
/// cannot work; one whose passphrase salt lost to another's is refused before its
/// version object, the first salt kept. Exactly one version 1, the winner's.
#[test]
fn first_pushes_racing_for_a_new_replica_the_loser_hears_why() {
    let rt = runtime();
    let dir = TempDir::new().unwrap();
    let plain_db = dir.path().join("plain.db");
    util::insert_rows(&util::create(&plain_db, 4096, Mode::Rollback), 20, 100);
    let a = new_store(&rt, &dir.path().join("cache-a"));
    let b = other_server(&rt, &a, &dir.path().join("cache-b"));
    let (salt_a, salt_b) = (
        sqlferry::crypt::PassphraseSalt::new().unwrap(),
        sqlferry::crypt::PassphraseSalt::new().unwrap(),
    );
    let (key_a, key_b) = ("00112233445566aa", "00112233445566bb");
    let plain = |store: &S3Store, replica: &ReplicaPath| {
        let mut w = store.push(replica, options(None, "plain")).unwrap();
        let mut snap = Snapshot::open(&plain_db).unwrap().with_hash_cache(None);
        let count = { snap.page_count() };
        w.begin(&BeginInfo {
            page_size: 4096,
            page_count: count,
            base_version: 0,
            known_base: false,
            chunked_digest: false,
            sealed: false,
        })
        .unwrap();
        let mut hashes = Vec::new();
        {
            use sqlferry::engine::PageSource;
            snap.scan(0, &mut |pgno, hash, data| {
                hashes.push(hash);
                w.write_page(pgno, data.expect("every page").to_vec(), &hash)
            })
            .unwrap();
        }
        (w, hashes)
    };
    let latest_key = |replica: &ReplicaPath| {
        let v = b.latest(replica).unwrap().expect("version 1");
        assert_eq!(v.number, 1);
        v.encryption_key_id
    };

    // Plaintext first, sealed second: the sealed push hears "is not encrypted".
    let r1 = ReplicaPath::parse("acme/plain-first.db").unwrap();
    let mut sealed = a.push(&r1, sealed_options(key_a, &salt_a)).unwrap();
    let ids = begin_sealed(&mut sealed, 3, 1);
    let (mut w, hashes) = plain(&b, &r1);
    commit(&mut w, &hashes).expect("the plaintext push makes version 1");
    let lost = commit(&mut sealed, &ids).unwrap_err();
    assert_eq!(lost.kind(), ErrorKind::Auth, "{lost}");
    assert!(lost.to_string().contains("is not encrypted"), "{lost}");
    assert_eq!(latest_key(&r1), None);

    // Sealed first, plaintext second: the plaintext push hears "is encrypted".
    let r2 = ReplicaPath::parse("acme/sealed-first.db").unwrap();
    let mut sealed = a.push(&r2, sealed_options(key_a, &salt_a)).unwrap();
    let ids = begin_sealed(&mut sealed, 3, 2);
    let (mut w, hashes) = plain(&b, &r2);
    commit(&mut sealed, &ids).expect("the sealed push makes version 1");
    let lost = commit(&mut w, &hashes).unwrap_err();
    assert_eq!(lost.kind(), ErrorKind::Auth, "{lost}");
    assert!(lost.to_string().contains("is encrypted (key id"), "{lost}");
    assert_eq!(latest_key(&r2).as_deref(), Some(key_a));

    // Two passphrases, each with a salt of its own: the second's salt is refused
    // before its version object, the first's kept.
    let r3 = ReplicaPath::parse("acme/two-salts.db").unwrap();
    let mut one = a.push(&r3, sealed_options(key_a, &salt_a)).unwrap();
    let mut two = b.push(&r3, sealed_options(key_b, &salt_b)).unwrap();
    let (ids_one, ids_two) = (begin_sealed(&mut one, 3, 3), begin_sealed(&mut two, 3, 4));
    commit(&mut one, &ids_one).expect("the first makes version 1");
    let lost = commit(&mut two, &ids_two).unwrap_err();
    assert_eq!(lost.kind(), ErrorKind::Auth, "{lost}");
    assert!(
        lost.to_string().contains("another passphrase salt"),
        "{lost}"
    );
    assert_eq!(latest_key(&r3).as_deref(), Some(key_a));
    assert_eq!(b.passphrase(&r3).unwrap(), Some(salt_a));

    // Two passphrases stretched with one salt (an earlier push's, left when it
    // failed): the second is refused for its key id, not as a conflict.
    let r4 = ReplicaPath::parse("acme/one-salt.db").unwrap();
    let mut one = a.push(&r4, sealed_options(key_a, &salt_a)).unwrap();
    let mut two = b.push(&r4, sealed_options(key_b, &salt_a)).unwrap();
    let (ids_one, ids_two) = (begin_sealed(&mut one, 3, 5), begin_sealed(&mut two, 3, 6));
    commit(&mut one, &ids_one).expect("the first makes version 1");
    let lost = commit(&mut two, &ids_two).unwrap_err();
    assert_eq!(lost.kind(), ErrorKind::Auth, "{lost}");
    assert!(
        lost.to_string().contains(&format!(
            "made with key id {key_a}, and this push's key id is {key_b}"
        )),
        "{lost}"
    );
    assert_eq!(latest_key(&r4).as_deref(), Some(key_a));
    for r in [&r1, &r2, &r3, &r4] {
        assert_eq!(
            b.version(r, 2).unwrap().map(|v| v.number),
            None,
            "{r}: no version 2"
        );
    }
}
