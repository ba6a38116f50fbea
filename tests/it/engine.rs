//! The engine's edge cases on real files: what a new, an existing, a differently sized
//! or a larger replica becomes; what a sync sends when nothing or a little changed; and
//! databases over 1 GiB, which hold SQLite's lock-byte page.

use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::util::{self, Mode};

/// An origin in `dir` with `page_size`, `mode` and about `bytes` of rows.
fn origin(dir: &Path, page_size: u32, mode: Mode, bytes: u64) -> PathBuf {
    let path = dir.join(format!("origin-{page_size}-{mode:?}.db"));
    let conn = util::create(&path, page_size, mode);
    util::fill(&conn, bytes, 300);
    path
}

#[test]
fn new_dest_takes_origin_page_size_and_journal_mode() {
    let dir = TempDir::new().expect("tempdir");
    for (page_size, mode) in [
        (512, Mode::Rollback),
        (1024, Mode::Wal),
        (8192, Mode::Rollback),
        (65536, Mode::Wal),
    ] {
        let src = origin(dir.path(), page_size, mode, 200_000);
        let dest = dir.path().join(format!("new-{page_size}-{mode:?}.db"));
        let stats = util::sync(&src, &dest);
        assert_eq!(stats.page_size, page_size);
        assert_eq!(
            stats.pages_sent,
            util::page_count(&src),
            "a new DEST gets every page"
        );
        util::assert_same(&src, &dest);
        assert_eq!(
            util::journal_mode(&dest),
            mode.pragma(),
            "{page_size} {mode:?}"
        );
        let (code, report, err) = util::verify_json(&dest);
        assert_eq!(code, 0, "verify: {err}");
        let report = report.expect("verify --json report");
        assert_eq!(report["journal_mode"], mode.verify_name());
        assert_eq!(report["page_size"], page_size);
        assert_eq!(report["digest"], stats.digest);
        assert_eq!(report["integrity"], serde_json::json!(["ok"]));
    }
}

#[test]
fn empty_dest_file_takes_origin_page_size() {
    let dir = TempDir::new().expect("tempdir");
    let src = origin(dir.path(), 2048, Mode::Wal, 100_000);
    let dest = dir.path().join("empty.db");
    std::fs::write(&dest, b"").expect("create empty file");
    util::sync(&src, &dest);
    util::assert_same(&src, &dest);
    assert_eq!(util::journal_mode(&dest), "wal");
}

/// An existing replica in `mode`: the origin's schema with other, fewer rows, like an
/// old copy of it.
fn existing_replica(path: &Path, page_size: u32, mode: Mode) {
    let conn = util::create(path, page_size, mode);
    util::fill(&conn, 50_000, 500);
}

#[test]
fn existing_unrelated_database_becomes_origin_copy() {
    let dir = TempDir::new().expect("tempdir");
    for (mode, replica_mode) in [(Mode::Wal, Mode::Rollback), (Mode::Rollback, Mode::Wal)] {
        let src = origin(dir.path(), 4096, mode, 300_000);
        // Another database entirely, with more schema objects than the origin.
        let dest = dir.path().join(format!("unrelated-{replica_mode:?}.db"));
        let conn = util::create(&dest, 4096, replica_mode);
        conn.execute_batch(
            "CREATE TABLE other(x); CREATE INDEX other_x ON other(x);
             INSERT INTO other VALUES (1), (2), (3);",
        )
        .expect("other data");
        drop(conn);
        let stats = util::sync(&src, &dest);
        util::assert_same(&src, &dest);
        assert_eq!(util::digest(&dest), stats.digest);
        assert_eq!(util::journal_mode(&dest), replica_mode.pragma());
    }
}

#[test]
fn wal_replica_stays_wal_when_origin_is_rollback() {
    let dir = TempDir::new().expect("tempdir");
    let src = origin(dir.path(), 4096, Mode::Rollback, 300_000);
    let dest = dir.path().join("replica.db");
    existing_replica(&dest, 4096, Mode::Wal);
    for round in 0..2 {
        let stats = util::sync(&src, &dest);
        assert_eq!(util::journal_mode(&dest), "wal", "round {round}");
        util::assert_same(&src, &dest);
        assert_eq!(util::digest(&dest), stats.digest);
        assert_eq!(
            util::journal_mode(&src),
            "delete",
            "the origin is never changed"
        );
        util::insert_rows(&util::open(&src), 50, 1000);
    }
}

#[test]
fn rollback_replica_stays_rollback_when_origin_is_wal() {
    let dir = TempDir::new().expect("tempdir");
    let src = origin(dir.path(), 4096, Mode::Wal, 300_000);
    let dest = dir.path().join("replica.db");
    existing_replica(&dest, 4096, Mode::Rollback);
    for round in 0..2 {
        let stats = util::sync(&src, &dest);
        assert_eq!(util::journal_mode(&dest), "delete", "round {round}");
        assert!(
            !util::sidecar(&dest, "-wal").exists(),
            "a rollback replica has no -wal"
        );
        util::assert_same(&src, &dest);
        assert_eq!(util::digest(&dest), stats.digest);
        util::insert_rows(&util::open(&src), 50, 1000);
    }
}

#[test]
fn replica_with_other_page_size_ends_up_as_origin_copy() {
    let dir = TempDir::new().expect("tempdir");
    for (origin_size, origin_mode, replica_size, replica_mode) in [
        (4096, Mode::Wal, 1024, Mode::Wal),
        (1024, Mode::Rollback, 65536, Mode::Rollback),
        (65536, Mode::Wal, 512, Mode::Rollback),
        (512, Mode::Rollback, 8192, Mode::Wal),
    ] {
        let src = origin(dir.path(), origin_size, origin_mode, 150_000);
        let dest = dir
            .path()
            .join(format!("replica-{replica_size}-{replica_mode:?}.db"));
        existing_replica(&dest, replica_size, replica_mode);
        let stats = util::sync(&src, &dest);
        let case = format!("{origin_size} {origin_mode:?} into {replica_size} {replica_mode:?}");
        assert_eq!(util::page_size(&dest), origin_size, "{case}");
        assert_eq!(util::journal_mode(&dest), replica_mode.pragma(), "{case}");
        util::assert_same(&src, &dest);
        assert_eq!(util::digest(&dest), stats.digest, "{case}");
        // And it is an ordinary replica from then on: a second sync sends nothing.
        assert_eq!(util::sync(&src, &dest).pages_sent, 0, "{case}");
    }
}

#[test]
fn shrunk_origin_truncates_replica() {
    let dir = TempDir::new().expect("tempdir");
    for (mode, replica_mode) in [(Mode::Rollback, Mode::Rollback), (Mode::Wal, Mode::Wal)] {
        let src = origin(dir.path(), 4096, mode, 3_000_000);
        let dest = dir.path().join(format!("replica-{replica_mode:?}.db"));
        existing_replica(&dest, 4096, replica_mode);
        util::sync(&src, &dest);
        let before = util::page_count(&dest);
        let conn = util::open(&src);
        conn.execute_batch("DELETE FROM t WHERE id % 4 != 0; VACUUM;")
            .expect("shrink");
        drop(conn);
        let after = util::page_count(&src);
        assert!(after < before / 2, "the origin shrank: {before} -> {after}");
        let stats = util::sync(&src, &dest);
        assert_eq!(stats.pages_total, after);
        util::assert_same(&src, &dest);
        util::checkpoint(&dest);
        assert_eq!(
            util::file_len(&dest),
            u64::from(after) * 4096,
            "the replica file was truncated ({mode:?})"
        );
    }
}

#[test]
fn unchanged_origin_sends_no_pages_and_few_hashes() {
    let dir = TempDir::new().expect("tempdir");
    for mode in [Mode::Wal, Mode::Rollback] {
        let src = origin(dir.path(), 4096, mode, 20_000_000);
        let dest = dir.path().join(format!("replica-{mode:?}.db"));
        let first = util::sync(&src, &dest);
        let pages = util::page_count(&src);
        assert!(
            pages > 4096,
            "big enough to need three tree levels: {pages}"
        );
        let again = util::sync(&src, &dest);
        assert_eq!(again.pages_sent, 0, "{mode:?}");
        assert_eq!(again.digest, first.digest);
        // Only the top of the tree travels: at most 256 node hashes each way.
        assert!(
            again.hash_bytes < 16 * 1024,
            "hash bytes {}",
            again.hash_bytes
        );
        assert!(
            again.bytes_sent + again.bytes_received < 20 * 1024,
            "sent {} received {}",
            again.bytes_sent,
            again.bytes_received
        );
        util::assert_same(&src, &dest);
    }
}

#[test]
fn clustered_change_sends_only_the_changed_pages() {
    let dir = TempDir::new().expect("tempdir");
    let src = dir.path().join("origin.db");
    let conn = util::create(&src, 4096, Mode::Wal);
    util::fill(&conn, 20_000_000, 1000);
    let dest = dir.path().join("replica.db");
    util::sync(&src, &dest);
    let before = util::page_hashes(&src);

    // A run of neighbouring rows changes in place: a cluster of leaf pages.
    conn.execute(
        "UPDATE t SET v = randomblob(1000) WHERE id BETWEEN 9000 AND 9300",
        [],
    )
    .expect("update cluster");
    let after = util::page_hashes(&src);
    assert_eq!(before.len(), after.len());
    let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count() as u32;
    assert!(
        (50..200).contains(&changed),
        "the update changes a cluster of pages: {changed}"
    );

    let stats = util::sync(&src, &dest);
    assert_eq!(
        stats.pages_sent, changed,
        "exactly the pages that differ travel"
    );
    assert!(
        stats.bytes_sent < u64::from(changed) * 4200 + 8 * 1024,
        "bytes sent {} for {changed} pages",
        stats.bytes_sent
    );
    assert!(
        stats.hash_bytes < 32 * 1024,
        "hash traffic grows with the changed region, not the database: {}",
        stats.hash_bytes
    );
    util::assert_same(&src, &dest);
}

#[test]
fn database_over_one_gib_syncs_across_the_lock_byte_page() {
    const PAGE: u32 = 65536;
    let lock_page = sqlferry::digest::lock_byte_page(PAGE);
    let dir = TempDir::new().expect("tempdir");
    let src = dir.path().join("big.db");
    let conn = util::create(&src, PAGE, Mode::Rollback);
    // One 60 000-byte row fills one 64 KiB page, so rows and pages correspond. Mostly
    // zeros with a random head: distinct pages, cheap to make.
    conn.pragma_update(None, "journal_mode", "OFF")
        .expect("no journal while filling");
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
         INSERT INTO t(k, v) SELECT hex(randomblob(8)), randomblob(32) || zeroblob(59968)
         FROM n",
        [lock_page + 200],
    )
    .expect("fill past 1 GiB");
    conn.pragma_update(None, "journal_mode", "DELETE")
        .expect("back to rollback");
    let pages = util::page_count(&src);
    assert!(
        pages > lock_page + 100 && u64::from(pages) * u64::from(PAGE) > 1 << 30,
        "{pages} pages reach past the lock-byte page {lock_page}"
    );
    let rows = |path: &Path| -> (i64, i64, i64) {
        util::open(path)
            .query_row(
                "SELECT count(*), max(id), sum(id * unicode(k)) FROM t",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .expect("row summary")
    };

    // First sync: every page past the (new) replica's end is sent, except the
    // lock-byte page, which SQLite never uses.
    let dest = dir.path().join("replica.db");
    let first = util::sync(&src, &dest);
    assert_eq!(first.pages_total, pages);
    assert_eq!(first.pages_sent, pages - 1, "all but the lock-byte page");
    assert_eq!(util::digest(&dest), first.digest);

    // Second sync: rows on both sides of the lock-byte page change and the database
    // grows; the descent compares the lock-byte page's hash on both sides.
    conn.execute(
        "UPDATE t SET v = randomblob(60000) WHERE id IN (?1, ?2, ?3, ?4)",
        [lock_page - 3, lock_page - 2, lock_page + 2, lock_page + 3],
    )
    .expect("update around the lock-byte page");
    util::insert_rows(&conn, 20, 60_000);
    let second = util::sync(&src, &dest);
    // 4 rewritten and 20 new row pages, plus the interior and index pages they touch.
    assert!(
        (24..=60).contains(&second.pages_sent),
        "changed and new pages only: {}",
        second.pages_sent
    );
    assert_ne!(second.digest, first.digest);
    assert_eq!(util::digest(&dest), second.digest);
    assert_eq!(util::integrity(&dest), "ok");
    assert_eq!(rows(&dest), rows(&src));
}

#[test]
fn schema_change_on_origin_reaches_existing_replica() {
    let dir = TempDir::new().expect("tempdir");
    for (step, sql) in [
        ("new index", "CREATE INDEX t_v ON t(v)"),
        (
            "new table",
            "CREATE TABLE u(a, b); INSERT INTO u VALUES (1, 2)",
        ),
        ("vacuum", "DELETE FROM t WHERE id % 3 = 0; VACUUM"),
        // Fewer schema rows than the replica had: page 1 shrinks.
        ("drop index and vacuum", "DROP INDEX t_k; VACUUM"),
        (
            "drop table and vacuum",
            "CREATE TABLE u(a); DROP TABLE u; DROP INDEX t_k; VACUUM",
        ),
    ] {
        for mode in [Mode::Wal, Mode::Rollback] {
            let src = dir
                .path()
                .join(format!("origin-{mode:?}-{}.db", step.replace(' ', "-")));
            util::fill(&util::create(&src, 4096, mode), 300_000, 300);
            let dest = util::sidecar(&src, ".replica");
            util::sync(&src, &dest);
            util::open(&src).execute_batch(sql).expect(step);
            util::sync(&src, &dest);
            util::assert_same(&src, &dest);
        }
    }
}

#[test]
fn a_full_copy_leaves_the_new_replica_a_hash_cache_the_next_sync_can_trust() {
    for mode in [Mode::Wal, Mode::Rollback] {
        let dir = TempDir::new().expect("tempdir");
        let src = origin(dir.path(), 4096, mode, 2_000_000);
        let dest = dir.path().join("copy.db");
        let cache = dir.path().join(".hash-cache");
        util::sync(&src, &dest);
        // One cache for the origin (its scan), one for the copy (built as it was written).
        let caches = || std::fs::read_dir(&cache).expect("cache dir").count();
        assert_eq!(caches(), 2, "{mode:?}");
        let expected = 32 + 48 * u64::from(util::page_count(&dest));
        let sizes: Vec<u64> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .collect();
        assert_eq!(sizes, [expected, expected], "{mode:?}: one entry per page");
        // The next syncs use it: still exact copies after changes and after none.
        let conn = util::open(&src);
        conn.execute("UPDATE t SET v = zeroblob(300) WHERE rowid % 7 = 0", [])
            .expect("update");
        drop(conn);
        let stats = util::sync(&src, &dest);
        assert!(stats.pages_sent > 0, "{mode:?}");
        util::assert_same(&src, &dest);
        let stats = util::sync(&src, &dest);
        assert_eq!(stats.pages_sent, 0, "{mode:?}");
        util::assert_same(&src, &dest);
    }
}

#[test]
fn a_writer_kept_across_syncs_reads_nothing_it_knows_and_notices_other_writers() {
    use sqlferry::page::Writer;
    for mode in [Mode::Wal, Mode::Rollback] {
        let dir = TempDir::new().expect("tempdir");
        let src = origin(dir.path(), 4096, mode, 1_000_000);
        let dest = dir.path().join("follower.db");
        let sync = |w: &mut Writer| sync_into(&src, w);
        let change = |n: i64| change_every_11th_row(&src, n);
        let mut w = Writer::open(&dest)
            .expect("writer")
            .with_hash_cache(None)
            .keep_committed_hashes();
        sync(&mut w);
        util::assert_same(&src, &dest);

        // Nobody else wrote the follower: the next sync takes what it holds from the
        // last commit, and is exact.
        change(1);
        assert!(w.ready_again().expect("ready"), "{mode:?}");
        let stats = sync(&mut w);
        assert!(w.used_known_hashes(), "{mode:?}");
        assert!(stats.pages_sent > 0);
        util::assert_same(&src, &dest);

        // Someone else wrote it: the sync reads the file again and still makes it exact.
        util::open(&dest)
            .execute("DELETE FROM t WHERE rowid % 5 = 0", [])
            .expect("outside write");
        change(2);
        assert!(w.ready_again().expect("ready"), "{mode:?}");
        sync(&mut w);
        assert!(
            !w.used_known_hashes(),
            "{mode:?}: an outside commit is noticed"
        );
        util::assert_same(&src, &dest);

        // The file replaced under the path: this writer cannot serve again.
        let other = dir.path().join("other.db");
        std::fs::copy(&dest, &other).expect("copy");
        std::fs::rename(&other, &dest).expect("replace");
        assert!(!w.ready_again().expect("ready"), "{mode:?}");
    }
}

#[test]
fn a_kept_writer_keeps_its_locks_and_readers_in_other_processes_see_every_version() {
    use sqlferry::page::Writer;
    // What a reader application in another process sees: it opens, reads and closes
    // (the last connection to close checkpoints and removes the WAL if it can).
    let reader = |db: &Path| {
        util::python(
            "import sqlite3,sys;d=sqlite3.connect(sys.argv[1]);\
             print(d.execute('SELECT count(*), sum(length(v)) FROM t').fetchone());d.close()",
            &[db],
        )
    };
    for mode in [Mode::Wal, Mode::Rollback] {
        let dir = TempDir::new().expect("tempdir");
        let src = origin(dir.path(), 4096, mode, 1_000_000);
        let dest = dir.path().join("follower.db");
        let sync = |w: &mut Writer| sync_into(&src, w);
        let mut w = Writer::open(&dest)
            .expect("writer")
            .with_hash_cache(None)
            .keep_committed_hashes();
        sync(&mut w);
        assert_eq!(
            reader(&dest),
            reader(&src),
            "{mode:?}: after the first pull"
        );
        for n in 1..=3i64 {
            change_every_11th_row(&src, n);
            assert!(w.ready_again().expect("ready"), "{mode:?}");
            sync(&mut w);
            assert!(w.used_known_hashes(), "{mode:?}: pull {n}");
            assert_eq!(reader(&dest), reader(&src), "{mode:?}: after pull {n}");
        }
        drop(w);
        util::assert_same(&src, &dest);
    }
}

/// Syncs `src` into the writer kept by the caller, through the library.
fn sync_into(src: &Path, w: &mut sqlferry::page::Writer) -> sqlferry::engine::SyncStats {
    let mut source = sqlferry::page::Snapshot::open(src)
        .expect("snapshot")
        .with_hash_cache(None);
    sqlferry::engine::sync_local(&mut source, w, &sqlferry::engine::NoProgress).expect("sync")
}

/// Changes every 11th row of `src`'s table (a new blob length each `n`).
fn change_every_11th_row(src: &Path, n: i64) {
    util::open(src)
        .execute(
            "UPDATE t SET v = zeroblob(300 + ?1) WHERE rowid % 11 = 0",
            [n],
        )
        .expect("update");
}

/// Writes every page of `src` into `w` as the replica role does, without committing.
fn write_all_pages(src: &Path, w: &mut sqlferry::page::Writer) -> u32 {
    let mut snap = sqlferry::page::Snapshot::open(src).expect("snapshot");
    let count = snap.page_count();
    assert_eq!(w.prepare(snap.page_size()).expect("prepare"), 0);
    snap.for_each_page(&mut |pgno, data| {
        if pgno != sqlferry::digest::lock_byte_page(data.len() as u32) {
            let hash = sqlferry::digest::page_hash(pgno, data);
            w.write_page(pgno, data.to_vec(), &hash)?;
        }
        Ok(())
    })
    .expect("write pages");
    count
}

#[test]
fn a_new_dest_appears_only_whole_and_two_writers_of_it_do_not_mix() {
    use sqlferry::page::Writer;
    let dir = TempDir::new().expect("tempdir");
    let src = origin(dir.path(), 4096, Mode::Wal, 1_000_000);
    let dest = dir.path().join("new.db");
    let tmp = dir.path().join(".new.db.sqlferry-new");

    let mut first = Writer::open(&dest).expect("writer").with_hash_cache(None);
    let count = write_all_pages(&src, &mut first);
    assert!(!dest.exists(), "nothing at DEST before the commit");
    assert!(tmp.exists(), "the pages go beside it");

    // A second writer of the same new file is refused while the first one runs.
    let mut second = Writer::open(&dest).expect("writer").with_hash_cache(None);
    let refused = second.prepare(4096).expect_err("a second writer of DEST");
    assert_eq!(refused.kind(), sqlferry::ErrorKind::Busy, "{refused}");
    assert!(
        refused.to_string().contains("another sqlferry"),
        "{refused}"
    );
    drop(second);
    assert!(
        tmp.exists(),
        "the refused writer left the first one's file alone"
    );

    // Dropped without commit: nothing at DEST, nothing beside it.
    drop(first);
    assert!(
        !dest.exists() && !tmp.exists(),
        "a failed copy leaves nothing"
    );

    // Committed: DEST is the origin's copy, and the temporary name is gone.
    let mut w = Writer::open(&dest).expect("writer").with_hash_cache(None);
    let count2 = write_all_pages(&src, &mut w);
    assert_eq!(count, count2);
    w.commit_pages(count, &mut std::iter::empty())
        .expect("commit");
    drop(w);
    assert!(!tmp.exists(), "the temporary name goes at commit");
    util::assert_same(&src, &dest);
    assert_eq!(util::journal_mode(&dest), "wal");
}

#[test]
fn a_new_dest_created_by_someone_else_during_the_copy_is_left_as_it_is() {
    use sqlferry::page::Writer;
    let dir = TempDir::new().expect("tempdir");
    let src = origin(dir.path(), 4096, Mode::Rollback, 500_000);
    let dest = dir.path().join("new.db");
    let mut w = Writer::open(&dest).expect("writer").with_hash_cache(None);
    let count = write_all_pages(&src, &mut w);
    // Another program makes its own database there meanwhile.
    let theirs = util::create(&dest, 1024, Mode::Rollback);
    theirs
        .execute_batch("CREATE TABLE mine(x); INSERT INTO mine VALUES (42);")
        .expect("their database");
    drop(theirs);
    let before = util::digest(&dest);
    let err = w
        .commit_pages(count, &mut std::iter::empty())
        .expect_err("DEST exists now");
    assert!(
        err.to_string().contains("created by another program"),
        "{err}"
    );
    drop(w);
    assert_eq!(util::digest(&dest), before, "their database is untouched");
    assert!(!dir.path().join(".new.db.sqlferry-new").exists());
}

#[test]
fn a_stale_temporary_file_of_a_killed_copy_is_replaced_by_the_next_one() {
    let dir = TempDir::new().expect("tempdir");
    let src = origin(dir.path(), 4096, Mode::Wal, 500_000);
    let dest = dir.path().join("new.db");
    let tmp = dir.path().join(".new.db.sqlferry-new");
    // What a killed copy leaves: a file beside DEST, no lock on it.
    std::fs::write(&tmp, vec![0xa5; 3 << 20]).expect("stale file");
    util::sync(&src, &dest);
    util::assert_same(&src, &dest);
    assert!(!tmp.exists(), "the next copy took it over and removed it");
}
