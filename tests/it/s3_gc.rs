//! Retention and garbage collection over an S3 store, with real `sqlferry serve
//! --store s3://…` processes on the real SeaweedFS of `seaweed` (a bucket per test):
//! `retention --keep-last` and `prune` removing versions (the kept ones pulled back
//! with their rows, integrity and digest; a removed one refused by name), the bucket
//! listed by the test after a sweep holding exactly what the kept versions name, a dry
//! run deleting nothing and naming what a real run then deletes, an object younger
//! than the grace (a push in flight's pack and chunk, written through the object layer)
//! surviving a sweep and going under a server with `--gc-grace 0s`, and a push onto
//! objects another server swept failing cleanly, then landing when pushed again; with
//! `--meta`, a prune refused while another holder of the sweep's PostgreSQL advisory
//! lock (a psql session of the test's) holds it, and run once it lets go.
//!
//! The grace is a flag of the server (`--gc-grace`), never a sleep: "old" is `0s`,
//! "young" is the default hour. Every wait is on a process's exit.

use std::collections::BTreeSet;

use serde_json::Value;
use tempfile::TempDir;

use crate::postgres;
use crate::s3_serve::{new_location, objects_under, s3_server};
use crate::seaweed;
use crate::server::{
    DbState, EXIT_CONFLICT, EXIT_NOT_FOUND, Machine, TestServer, assert_fails, exec, small_db,
};
use crate::util;
use sqlferry::digest::{hex, sha256};
use sqlferry::store::object::{Objects, S3Location};

/// Exit code: the server failed on its own side (docs/exit-codes.md).
const EXIT_SERVER: i32 = 10;

/// The prefix every test's location has (`new_location`).
const PREFIX: &str = "sqlferry/";

/// The object the sweep writes for its clock: not a pack, chunk or version.
const CLOCK: &str = "sqlferry-gc-clock";

/// The store's objects, keys relative to its prefix, with their sizes; the sweep's
/// clock object left out.
fn store_objects(location: &str) -> Vec<(String, u64)> {
    objects_under(location)
        .into_iter()
        .map(|(k, s)| {
            (
                k.strip_prefix(PREFIX).expect("under the prefix").to_owned(),
                s,
            )
        })
        .filter(|(k, _)| k != CLOCK)
        .collect()
}

/// The keys of the packs, indexes and chunks in the store.
pub fn garbage_kind(location: &str) -> BTreeSet<String> {
    store_objects(location)
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("packs/") || k.starts_with("chunks/"))
        .collect()
}

/// The object layer on the test's location, with the right key, and a runtime to
/// wait on it.
pub fn objects(location: &str) -> (Objects, tokio::runtime::Runtime) {
    let objects = Objects::open(
        S3Location::parse(location).expect("an s3:// location"),
        &seaweed::shared().options(),
    )
    .expect("open the store's objects");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    (objects, rt)
}

/// The object `key` of the store, parsed as JSON.
pub fn json_object(location: &str, key: &str) -> Value {
    let (objects, rt) = objects(location);
    let bytes = rt
        .block_on(objects.get(key))
        .expect("read the object")
        .unwrap_or_else(|| panic!("{key} exists"));
    serde_json::from_slice(&bytes).expect("JSON")
}

/// What versions `numbers` of `replica` name: their chunks, packs and indexes.
pub fn referenced(location: &str, replica: &str, numbers: &[u64]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for n in numbers {
        let v = json_object(location, &format!("replicas/{replica}/v/{n}"));
        for c in v["chunks"].as_array().expect("chunks") {
            out.insert(format!("chunks/{}", c.as_str().expect("a hash")));
        }
        for p in v["packs"].as_array().expect("packs") {
            let p = p.as_str().expect("a hash");
            out.insert(format!("packs/{p}.pack"));
            out.insert(format!("packs/{p}.idx"));
        }
    }
    out
}

/// `sqlferry ARGS --json --key KEY` on `server`, asserted to succeed; its JSON.
pub fn json(m: &Machine, server: &TestServer, key: &str, args: &[&str]) -> Value {
    let out = m.run_on(server, args.iter().copied().chain(["--json", "--key", key]));
    assert_eq!(util::code(&out), 0, "{args:?}: {}", util::stderr(&out));
    serde_json::from_str(util::stdout(&out).trim()).expect("JSON")
}

pub fn numbers(v: &Value) -> Vec<u64> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|n| n.as_u64().expect("a number"))
        .collect()
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|n| n.as_str().expect("a string").to_owned())
        .collect()
}

/// A change to `path` that rewrites about a seventh of its rows.
fn change(path: &std::path::Path, i: u64) {
    exec(
        path,
        &format!("UPDATE t SET v = randomblob(300) WHERE id % 7 = {i}"),
    );
}

#[test]
fn retention_over_s3_keeps_the_last_versions_and_the_sweep_leaves_only_what_they_name() {
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    let server = s3_server(dir.path(), "s3", &location, &["--gc-grace", "0s"], None);
    let admin = server.admin_key.clone();
    let m = Machine::new(dir.path(), "m");
    let path = m.path("app.db");
    small_db(&path, 512 << 10);
    let mut states = Vec::new();
    for i in 1..=4u64 {
        if i > 1 {
            change(&path, i);
        }
        let r = m.push(
            &server,
            "app.db",
            "acme/app.db",
            &["-m", &format!("v{i}"), "--key", &admin],
        );
        assert_eq!(r.u64("version"), i);
        states.push(DbState::of(&path));
    }

    // The policy: set, then shown, as over the directory store.
    let out = m.run_on(
        &server,
        [
            "retention",
            "acme/app.db",
            "--keep-last",
            "2",
            "--key",
            &admin,
        ],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert_eq!(
        util::stdout(&out).trim(),
        "acme/app.db: keep-last=2 (its own)"
    );
    let shown = json(&m, &server, &admin, &["retention", "acme/app.db"]);
    assert_eq!(shown["policy"]["keep_last"], 2, "{shown}");
    assert_eq!(shown["source"], "replica");

    // A dry run: versions 1 and 2 would go, and exactly the objects only they name.
    let before = store_objects(&location);
    let kept_refs = referenced(&location, "acme/app.db", &[3, 4]);
    let garbage: BTreeSet<String> = garbage_kind(&location)
        .difference(&kept_refs)
        .cloned()
        .collect();
    assert!(
        !garbage.is_empty(),
        "versions 1 and 2 have objects of their own"
    );
    let garbage_bytes: u64 = before
        .iter()
        .filter(|(k, _)| garbage.contains(k))
        .map(|(_, s)| s)
        .sum();
    let dry = json(&m, &server, &admin, &["prune", "acme/app.db", "--dry-run"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(numbers(&dry["removed"]), [1, 2], "{dry}");
    assert_eq!(dry["kept"], 2);
    assert_eq!(strings(&dry["swept"]), garbage, "{dry}");
    assert_eq!(dry["swept_objects"], garbage.len() as u64);
    assert_eq!(dry["freed_bytes"], garbage_bytes);
    assert_eq!(
        store_objects(&location),
        before,
        "a dry run deletes nothing"
    );
    let out = m.run_on(
        &server,
        ["prune", "acme/app.db", "--dry-run", "--key", &admin],
    );
    let text = util::stdout(&out);
    assert!(
        text.contains("would remove 2 versions: 1, 2; 2 kept"),
        "{text}"
    );
    for key in &garbage {
        assert!(
            text.contains(key.as_str()),
            "the dry run lists {key}: {text}"
        );
    }

    // For real: the bucket then holds only what versions 3 and 4 name.
    let pruned = json(&m, &server, &admin, &["prune", "acme/app.db"]);
    assert_eq!(numbers(&pruned["removed"]), [1, 2], "{pruned}");
    assert_eq!(pruned["swept_objects"], garbage.len() as u64, "{pruned}");
    assert_eq!(pruned["freed_bytes"], garbage_bytes);
    assert_eq!(garbage_kind(&location), kept_refs);
    for n in [1, 2] {
        let t = json_object(&location, &format!("replicas/acme/app.db/v/{n}"));
        assert!(
            t["removed_at"].as_i64().is_some(),
            "v/{n} is a tombstone: {t}"
        );
        assert!(t.get("packs").is_none(), "a tombstone names nothing: {t}");
    }
    let versions = json(&m, &server, &admin, &["versions", "acme/app.db"]);
    let listed: Vec<u64> = versions
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| v["number"].as_u64().expect("a number"))
        .collect();
    assert_eq!(listed, [3, 4]);

    // The kept versions pull back whole; the removed ones are refused by name.
    let other = Machine::new(dir.path(), "other");
    let key = ["--key", admin.as_str()];
    let r = other.pull(&server, "acme/app.db@3", Some("v3.db"), &key);
    assert_eq!(r.u64("version"), 3);
    states[2].assert_held_by(&other.path("v3.db"), "@3 after the sweep");
    let r = other.pull(&server, "acme/app.db", Some("v4.db"), &key);
    assert_eq!(r.u64("version"), 4);
    assert_eq!(r.digest(), states[3].digest);
    states[3].assert_held_by(&other.path("v4.db"), "@latest after the sweep");
    for spec in ["acme/app.db@1", "acme/app.db@latest-3"] {
        let out = other.run_on(&server, ["pull", spec, "gone.db", "--key", &admin]);
        let line = assert_fails(&out, EXIT_NOT_FOUND, "was removed by the retention policy");
        assert!(line.contains("acme/app.db@1"), "{spec}: {line}");
        assert!(!other.path("gone.db").exists(), "{spec}: nothing written");
    }

    // Pushes go on past the tombstones, and a server with an empty cache finds the
    // latest (through them) and reads it.
    change(&path, 5);
    let r = m.push(&server, "app.db", "acme/app.db", &["--key", &admin]);
    assert_eq!(r.u64("version"), 5);
    let five = DbState::of(&path);
    let fresh = s3_server(dir.path(), "fresh", &location, &[], None);
    let r = other.pull(
        &fresh,
        "acme/app.db",
        Some("v5.db"),
        &["--key", &fresh.admin_key],
    );
    assert_eq!(r.u64("version"), 5);
    five.assert_held_by(&other.path("v5.db"), "@latest from a fresh server");

    // Nothing more to remove (keep-last=2: version 3 goes now), and the sweep finds
    // only what version 3 alone named.
    let again = json(&m, &server, &admin, &["prune", "acme/app.db"]);
    assert_eq!(numbers(&again["removed"]), [3], "{again}");
    assert_eq!(
        garbage_kind(&location),
        referenced(&location, "acme/app.db", &[4, 5])
    );
    let last = json(&m, &server, &admin, &["prune", "acme/app.db"]);
    assert_eq!(numbers(&last["removed"]), Vec::<u64>::new(), "{last}");
    assert_eq!(last["swept_objects"], 0, "{last}");
}

#[test]
fn an_object_younger_than_the_grace_survives_a_sweep_and_goes_under_grace_zero() {
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    // The default grace: an hour.
    let server = s3_server(dir.path(), "a", &location, &[], None);
    let m = Machine::new(dir.path(), "m");
    let path = m.path("app.db");
    small_db(&path, 256 << 10);
    let admin = server.admin_key.clone();
    m.push(&server, "app.db", "acme/app.db", &["--key", &admin]);
    change(&path, 3);
    m.push(&server, "app.db", "acme/app.db", &["--key", &admin]);
    let two = DbState::of(&path);
    json(
        &m,
        &server,
        &admin,
        &["retention", "acme/app.db", "--keep-last", "1"],
    );

    // A push in flight on another server: its pack, index and chunk written, its
    // version object not yet.
    let (objects, rt) = objects(&location);
    let pack = vec![7u8; 4096];
    let name = hex(&sha256(&pack));
    let in_flight = [
        format!("packs/{name}.pack"),
        format!("packs/{name}.idx"),
        format!("chunks/{}", hex(&sha256(b"in flight"))),
    ];
    for key in &in_flight {
        rt.block_on(objects.put(key, pack.clone()))
            .expect("write an in-flight object");
    }
    let garbage: BTreeSet<String> = garbage_kind(&location)
        .difference(&referenced(&location, "acme/app.db", &[2]))
        .cloned()
        .collect();
    assert!(in_flight.iter().all(|k| garbage.contains(k)));
    assert!(
        garbage.len() > in_flight.len(),
        "version 1 has objects of its own"
    );

    let pruned = json(&m, &server, &admin, &["prune", "acme/app.db"]);
    assert_eq!(numbers(&pruned["removed"]), [1], "{pruned}");
    assert_eq!(
        pruned["swept_objects"], 0,
        "all younger than an hour: {pruned}"
    );
    assert_eq!(pruned["young_objects"], garbage.len() as u64, "{pruned}");
    assert_eq!(pruned["freed_bytes"], 0);
    for key in &garbage {
        assert!(garbage_kind(&location).contains(key), "{key} survived");
    }

    // Another server on the bucket, its grace 0s: the same policy (it lives in the
    // bucket), a dry run naming every unreferenced object and deleting none, then
    // the sweep.
    let zero = s3_server(dir.path(), "zero", &location, &["--gc-grace", "0s"], None);
    let zadmin = zero.admin_key.clone();
    let shown = json(&m, &zero, &zadmin, &["retention", "acme/app.db"]);
    assert_eq!(shown["policy"]["keep_last"], 1, "{shown}");
    assert_eq!(shown["source"], "replica");
    let before = store_objects(&location);
    let dry = json(&m, &zero, &zadmin, &["prune", "acme/app.db", "--dry-run"]);
    assert_eq!(strings(&dry["swept"]), garbage, "{dry}");
    assert_eq!(
        store_objects(&location),
        before,
        "a dry run deletes nothing"
    );
    let swept = json(&m, &zero, &zadmin, &["prune", "acme/app.db"]);
    assert_eq!(swept["swept_objects"], garbage.len() as u64, "{swept}");
    assert_eq!(
        garbage_kind(&location),
        referenced(&location, "acme/app.db", &[2])
    );
    let other = Machine::new(dir.path(), "other");
    for s in [&server, &zero] {
        let r = other.pull(s, "acme/app.db", Some("copy.db"), &["--key", &s.admin_key]);
        assert_eq!(r.u64("version"), 2);
        two.assert_held_by(&other.path("copy.db"), "the kept version");
        std::fs::remove_file(other.path("copy.db")).expect("remove the copy");
    }
}

#[test]
fn a_push_onto_objects_another_server_swept_fails_cleanly_and_lands_when_pushed_again() {
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    let a = s3_server(dir.path(), "a", &location, &[], None);
    let b = s3_server(dir.path(), "b", &location, &["--gc-grace", "0s"], None);
    let m = Machine::new(dir.path(), "m");
    let path = m.path("app.db");
    small_db(&path, 256 << 10);
    let first = DbState::of(&path);
    std::fs::copy(&path, m.path("again.db")).expect("copy the database");
    m.push(&a, "app.db", "acme/x.db", &["--key", &a.admin_key]);
    // Version 2 shares no page with version 1.
    exec(
        &path,
        "DROP TABLE t; CREATE TABLE u(id INTEGER PRIMARY KEY, v BLOB);
         INSERT INTO u(v) SELECT randomblob(500) FROM
           (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 400) SELECT x FROM c);
         VACUUM;",
    );
    m.push(&a, "app.db", "acme/x.db", &["--key", &a.admin_key]);
    json(
        &m,
        &a,
        &a.admin_key,
        &["retention", "acme/x.db", "--keep-last", "1"],
    );
    let v1 = referenced(&location, "acme/x.db", &[1]);
    let swept = json(&m, &b, &b.admin_key, &["prune", "acme/x.db"]);
    assert_eq!(numbers(&swept["removed"]), [1], "{swept}");
    let left = garbage_kind(&location);
    assert!(
        v1.iter().all(|k| !left.contains(k)),
        "version 1's objects are gone: {left:?}"
    );

    // Server A's cache still knows version 1's pack: a push of the same pages into a
    // new replica would name it. It is refused, no version made.
    let out = m.run_on(&a, ["push", "again.db", "acme/y.db", "--key", &a.admin_key]);
    let line = assert_fails(&out, EXIT_SERVER, "that are gone");
    assert!(line.contains("push again"), "{line}");
    assert!(
        !objects_under(&location)
            .iter()
            .any(|(k, _)| k.contains("replicas/acme/y.db/v/")),
        "no version of acme/y.db"
    );
    // Pushed again, it writes the pages anew, and pulls back whole.
    let r = m.push(&a, "again.db", "acme/y.db", &["--key", &a.admin_key]);
    assert_eq!(r.u64("version"), 1);
    let other = Machine::new(dir.path(), "other");
    let r = other.pull(&b, "acme/y.db", Some("y.db"), &["--key", &b.admin_key]);
    assert_eq!(r.u64("version"), 1);
    first.assert_held_by(&other.path("y.db"), "the replica pushed again");
}

#[test]
fn servers_sharing_postgres_sweep_one_at_a_time() {
    use std::io::{BufRead as _, Write as _};

    let pg = postgres::shared();
    let meta = pg.database();
    let db = meta.rsplit('/').next().expect("a database name").to_owned();
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    let a = s3_server(
        dir.path(),
        "a",
        &location,
        &["--meta", &meta, "--gc-grace", "0s"],
        None,
    );
    let admin = a.admin_key.clone();
    let m = Machine::new(dir.path(), "m");
    let path = m.path("app.db");
    small_db(&path, 256 << 10);
    m.push(&a, "app.db", "acme/app.db", &["--key", &admin]);
    change(&path, 2);
    m.push(&a, "app.db", "acme/app.db", &["--key", &admin]);
    json(
        &m,
        &a,
        &admin,
        &["retention", "acme/app.db", "--keep-last", "1"],
    );

    // Another server's sweep, as PostgreSQL sees it: a session holding the lock.
    let mut holder = pg.session(&db);
    let mut said = std::io::BufReader::new(holder.stdout.take().expect("psql's stdout"));
    let mut to = holder.stdin.take().expect("psql's stdin");
    writeln!(
        to,
        "SELECT pg_advisory_lock({}), 'held';",
        sqlferry::meta::postgres::SWEEP_LOCK
    )
    .expect("ask for the lock");
    to.flush().expect("send it");
    let mut line = String::new();
    said.read_line(&mut line).expect("psql answers");
    assert!(line.contains("held"), "{line}");

    let before = store_objects(&location);
    let out = m.run_on(&a, ["prune", "acme/app.db", "--key", &admin]);
    // Busy: exit 6, as for a replica another session holds.
    assert_fails(
        &out,
        EXIT_CONFLICT,
        "another server sharing this metadata store is sweeping",
    );
    assert_eq!(store_objects(&location), before, "nothing removed or swept");

    // Released (the session ends): the prune runs, and the next one too (the first
    // gave the lock back).
    drop(to);
    holder.wait().expect("psql ends");
    let pruned = json(&m, &a, &admin, &["prune", "acme/app.db"]);
    assert_eq!(numbers(&pruned["removed"]), [1], "{pruned}");
    assert!(pruned["swept_objects"].as_u64() > Some(0), "{pruned}");
    let again = json(&m, &a, &admin, &["prune", "acme/app.db"]);
    assert_eq!(again["swept_objects"], 0, "{again}");
}
