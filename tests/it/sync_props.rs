//! Sync correctness over random edit sequences: whatever the origin goes through
//! (inserts, updates, deletes, VACUUM, growth and shrinkage to sizes one page either
//! side of the hash tree's group boundaries), after every sync the replica's rows,
//! integrity check and digest equal the origin's.
//!
//! Each case draws a page size (512 to 65536), the origin's journal mode and
//! auto-vacuum setting, and what the replica is at the start (new, or an existing
//! database in either journal mode, possibly of another page size).

use std::path::Path;

use proptest::prelude::*;
use rusqlite::Connection;
use tempfile::TempDir;

use crate::util::{self, Mode};

/// Groups of the hash tree: 16 pages per node, so 16, 256 and 4096 pages are where a
/// database starts to need another node or another level.
const BOUNDARIES: [u32; 3] = [16, 256, 4096];

/// Largest database a case grows to, to keep the whole property quick.
const MAX_BYTES: u64 = 16 << 20;

/// Bytes of rows one insert step adds at most.
const MAX_INSERT_BYTES: u64 = 2 << 20;

#[derive(Debug, Clone)]
enum Op {
    /// `rows` rows with `blob`-byte blobs (large ones overflow into chains).
    Insert { rows: u32, blob: u32 },
    /// New blobs of `blob` bytes for every row whose id is a multiple of `every`.
    Update { every: u32, blob: u32 },
    /// Delete every row whose id is a multiple of `every` (1: all of them).
    Delete { every: u32 },
    /// `VACUUM`: every page may move; the database usually shrinks.
    Vacuum,
    /// `PRAGMA incremental_vacuum`: frees pages at the end in incremental mode.
    IncrementalVacuum,
    /// Grow or shrink to a page count one page either side of a group boundary.
    Resize { boundary: usize, offset: i32 },
}

#[derive(Debug, Clone, Copy)]
enum Replica {
    /// DEST does not exist before the first sync.
    New,
    /// DEST is an older database with the origin's schema, in `mode`, with pages of
    /// `page_size`.
    Existing { mode: Mode, page_size: u32 },
}

#[derive(Debug, Clone, Copy)]
enum AutoVacuum {
    None,
    Full,
    Incremental,
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![Just(Mode::Wal), Just(Mode::Rollback)]
}

fn page_size() -> impl Strategy<Value = u32> {
    (9u32..=16).prop_map(|shift| 1 << shift)
}

fn blob() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..200, 200u32..5000, 5000u32..70_000]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1u32..400, blob()).prop_map(|(rows, blob)| Op::Insert { rows, blob }),
        2 => (1u32..6, blob()).prop_map(|(every, blob)| Op::Update { every, blob }),
        2 => (1u32..6).prop_map(|every| Op::Delete { every }),
        1 => Just(Op::Vacuum),
        1 => Just(Op::IncrementalVacuum),
        3 => (0..BOUNDARIES.len(), -1i32..=1)
            .prop_map(|(boundary, offset)| Op::Resize { boundary, offset }),
    ]
}

fn replica() -> impl Strategy<Value = Replica> {
    prop_oneof![
        1 => Just(Replica::New),
        2 => (mode(), page_size())
            .prop_map(|(mode, page_size)| Replica::Existing { mode, page_size }),
    ]
}

fn auto_vacuum() -> impl Strategy<Value = AutoVacuum> {
    prop_oneof![
        2 => Just(AutoVacuum::None),
        1 => Just(AutoVacuum::Full),
        1 => Just(AutoVacuum::Incremental),
    ]
}

/// The origin's schema: `t` for random edits, `g` for filler rows used to reach exact
/// sizes.
const SCHEMA: &str = "
    CREATE TABLE t(id INTEGER PRIMARY KEY, k TEXT NOT NULL, v BLOB);
    CREATE INDEX t_k ON t(k);
    CREATE TABLE g(id INTEGER PRIMARY KEY, v BLOB);";

fn create(path: &Path, page_size: u32, mode: Mode, auto_vacuum: AutoVacuum) -> Connection {
    let conn = util::open(path);
    let av = match auto_vacuum {
        AutoVacuum::None => "NONE",
        AutoVacuum::Full => "FULL",
        AutoVacuum::Incremental => "INCREMENTAL",
    };
    conn.execute_batch(&format!(
        "PRAGMA page_size = {page_size}; PRAGMA auto_vacuum = {av};
         PRAGMA journal_mode = {}; PRAGMA synchronous = OFF; {SCHEMA}",
        mode.pragma()
    ))
    .expect("create database");
    assert_eq!(util::page_size(path), page_size);
    conn
}

fn page_count(conn: &Connection) -> u32 {
    conn.query_row("PRAGMA page_count", [], |r| r.get(0))
        .expect("page_count")
}

/// Grows or shrinks the origin to about `target` pages. Shrinking deletes filler rows
/// from the end of `g` (auto-vacuum, or `VACUUM` without it, gives the pages back), so
/// most pages stay where they are; growing adds one small row at a time until the page
/// count reaches the target, so it lands on it or just past it.
fn resize(conn: &Connection, page_size: u32, target: u32) {
    let auto_vacuum: i64 = conn
        .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
        .expect("auto_vacuum");
    while page_count(conn) > target {
        let excess = page_count(conn) - target;
        let filler: i64 = conn
            .query_row("SELECT count(*) FROM g", [], |r| r.get(0))
            .expect("count g");
        if filler > 0 {
            // About 7 filler rows fill a page: free about half the excess each round.
            conn.execute(
                "DELETE FROM g WHERE id IN (SELECT id FROM g ORDER BY id DESC LIMIT ?1)",
                [(i64::from(excess) * 7 / 2).max(1)],
            )
            .expect("delete filler");
        } else {
            conn.execute(
                "DELETE FROM t WHERE id > (SELECT (min(id) + max(id)) / 2 FROM t)
                    OR (SELECT count(*) FROM t) < 4",
                [],
            )
            .expect("delete rows");
        }
        match auto_vacuum {
            0 => conn.execute_batch("VACUUM").expect("vacuum"),
            2 => conn
                .execute_batch("PRAGMA incremental_vacuum")
                .expect("incremental_vacuum"),
            _ => {}
        }
    }
    conn.execute_batch("BEGIN").expect("begin");
    let mut insert = conn
        .prepare("INSERT INTO g(v) VALUES (randomblob(?1))")
        .expect("prepare");
    while page_count(conn) < target {
        insert.execute([page_size / 8]).expect("grow");
    }
    drop(insert);
    conn.execute_batch("COMMIT").expect("commit");
    let now = page_count(conn);
    assert!(
        (target..=target + 3).contains(&now),
        "resized to {now} pages for {target}"
    );
}

fn apply(conn: &Connection, page_size: u32, op: &Op) {
    let limit = |rows: u32, blob: u32| {
        u64::from(rows)
            .min(MAX_INSERT_BYTES / u64::from(blob.max(1)))
            .max(1) as i64
    };
    let db_bytes = u64::from(page_count(conn)) * u64::from(page_size);
    match *op {
        Op::Insert { rows, blob } if db_bytes < MAX_BYTES / 2 => {
            conn.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
                 INSERT INTO t(k, v) SELECT hex(randomblob(6)), randomblob(?2) FROM n",
                rusqlite::params![limit(rows, blob), blob],
            )
            .expect("insert");
        }
        Op::Insert { .. } => {}
        Op::Update { every, blob } => {
            conn.execute(
                "UPDATE t SET v = randomblob(?2), k = hex(randomblob(6)) WHERE id % ?1 = 0
                 AND id IN (SELECT id FROM t WHERE id % ?1 = 0 LIMIT ?3)",
                rusqlite::params![every, blob, limit(u32::MAX, blob)],
            )
            .expect("update");
        }
        Op::Delete { every } => {
            conn.execute("DELETE FROM t WHERE id % ?1 = 0", [every])
                .expect("delete");
        }
        Op::Vacuum => conn.execute_batch("VACUUM").expect("vacuum"),
        Op::IncrementalVacuum => conn
            .execute_batch("PRAGMA incremental_vacuum")
            .expect("incremental_vacuum"),
        Op::Resize { boundary, offset } => {
            // The largest boundary that fits this page size within MAX_BYTES.
            let fits = |n: u32| u64::from(n + 1) * u64::from(page_size) <= MAX_BYTES;
            let n = BOUNDARIES[..=boundary]
                .iter()
                .rev()
                .copied()
                .find(|&n| fits(n))
                .expect("the smallest boundary always fits");
            resize(conn, page_size, n.saturating_add_signed(offset));
        }
    }
}

/// Syncs and checks what a user would: rows, integrity check, digest, page size, and
/// that the replica kept its journal mode.
fn sync_and_check(origin: &Path, replica: &Path, replica_mode: Mode, step: &str) {
    let stats = util::sync(origin, replica);
    assert_eq!(
        stats.digest,
        util::digest(origin),
        "{step}: the origin's digest"
    );
    assert!(stats.pages_sent <= stats.pages_total, "{step}");
    assert_eq!(util::integrity(replica), "ok", "{step}: integrity");
    assert_eq!(util::page_size(replica), util::page_size(origin), "{step}");
    assert!(
        util::dump(replica) == util::dump(origin),
        "{step}: the replica's rows differ from the origin's"
    );
    assert_eq!(
        util::digest(replica),
        stats.digest,
        "{step}: replica digest"
    );
    assert_eq!(
        util::journal_mode(replica),
        replica_mode.pragma(),
        "{step}: journal mode"
    );
}

fn run_case(
    page_size: u32,
    origin_mode: Mode,
    auto_vacuum: AutoVacuum,
    start: Replica,
    ops: &[Op],
) {
    let dir = TempDir::new().expect("tempdir");
    let origin = dir.path().join("origin.db");
    let replica = dir.path().join("replica.db");
    // The origin's connection stays open, so in WAL mode part of its content stays in
    // the WAL, where the sync must find it.
    let conn = create(&origin, page_size, origin_mode, auto_vacuum);
    apply(
        &conn,
        page_size,
        &Op::Insert {
            rows: 50,
            blob: 100,
        },
    );
    let replica_mode = match start {
        Replica::New => origin_mode,
        Replica::Existing { mode, page_size } => {
            let r = create(&replica, page_size, mode, AutoVacuum::None);
            apply(
                &r,
                page_size,
                &Op::Insert {
                    rows: 80,
                    blob: 700,
                },
            );
            mode
        }
    };
    sync_and_check(&origin, &replica, replica_mode, "first sync");
    for (i, op) in ops.iter().enumerate() {
        apply(&conn, page_size, op);
        sync_and_check(
            &origin,
            &replica,
            replica_mode,
            &format!("after op {i}: {op:?}"),
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        max_shrink_iters: 32,
        ..ProptestConfig::default()
    })]

    #[test]
    fn replica_equals_origin_after_every_sync(
        page_size in page_size(),
        origin_mode in mode(),
        auto_vacuum in auto_vacuum(),
        start in replica(),
        ops in prop::collection::vec(op(), 1..7),
    ) {
        run_case(page_size, origin_mode, auto_vacuum, start, &ops);
    }
}

/// The boundary sizes themselves, for every group size, deterministically: one page
/// under, at, and over each boundary, growing and then shrinking through them.
#[test]
fn sizes_around_every_group_boundary() {
    let page_size = 1024;
    let dir = TempDir::new().expect("tempdir");
    let origin = dir.path().join("origin.db");
    let replica = dir.path().join("replica.db");
    let conn = create(&origin, page_size, Mode::Wal, AutoVacuum::Full);
    let mut targets: Vec<u32> = BOUNDARIES.iter().flat_map(|&n| [n - 1, n, n + 1]).collect();
    let down: Vec<u32> = targets.iter().rev().skip(1).copied().collect();
    targets.extend(down);
    for target in targets {
        resize(&conn, page_size, target);
        sync_and_check(&origin, &replica, Mode::Wal, &format!("{target} pages"));
    }
}
