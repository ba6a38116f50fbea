//! The fence between the sweep of an S3 store and the pushes of every server sharing
//! the metadata store (`docs/scale-out.md`, "The fence"), with two real `serve
//! --store s3://… --meta postgres://…` processes on the real SeaweedFS of `seaweed` and
//! the real PostgreSQL of `postgres`. Never by racing: a psql session of the test's
//! holds what makes each ordering happen, and the test waits until PostgreSQL shows
//! each process waiting where it must (`pg_stat_activity`, `pg_locks`) before the next
//! step.
//!
//! - A push holding the fence (its record held back by the test's lock on the
//!   fence's table, after it took the lock) makes the sweep on the other server wait;
//!   the push then lands and the sweep keeps every object the new version names, though
//!   no version named them when it marked.
//! - A sweep waiting for the fence (held by the test's session, as by another push)
//!   makes a push that comes after it wait behind it; the sweep deletes, then the push
//!   finds what its cache named gone, fails cleanly ("push again", no version) and
//!   lands when pushed again, writing the pages anew.
//! - A push killed after its version object and before its row (the test's session
//!   holding the fence, recording the push and dying; the object written by the
//!   test): the waiting sweep reads the version by its record and keeps what it names.
//! - The record of a push whose session ended mid-commit, with no version object:
//!   the sweep stops before deleting anything (exit 6) while the push could still make
//!   it, and drops the record and sweeps once it is older than that.
//! - What the fence costs a push: its round trips timed against the row insert alone.
//!
//! Every version is pulled back afterwards (rows, `integrity_check`, digest).

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, ChildStdout, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::postgres::{self, Postgres};
use crate::s3_gc::{garbage_kind, json, numbers, referenced};
use crate::s3_serve::{new_location, s3_server};
use crate::server::{DbState, EXIT_CONFLICT, Machine, TestServer, assert_fails, exec, small_db};
use crate::util;
use sqlferry::meta::postgres::FENCE_LOCK;

/// Exit code: the server failed on its own side (docs/exit-codes.md).
const EXIT_SERVER: i32 = 10;

/// How long a process may take to reach the state a test waits for.
const REACH_TIMEOUT: Duration = Duration::from_secs(120);

/// Two servers sharing a bucket and a metadata store (A sweeps with `--gc-grace 0s`),
/// and a replica `acme/x.db` whose version 1 (pushed through B, so B's cache knows its
/// pack) shares no page with version 2, with a policy keeping only the last: a prune
/// through A removes version 1 and finds its objects to sweep.
struct Setup {
    pg: &'static Postgres,
    db: String,
    location: String,
    a: TestServer,
    b: TestServer,
    m: Machine,
    /// Version 1's database (also in `again.db` on `m`).
    first: DbState,
    /// Version 2's.
    second: DbState,
    _dir: TempDir,
}

fn setup() -> Setup {
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
    let b = s3_server(
        dir.path(),
        "b",
        &location,
        &["--meta", &meta],
        Some(&a.admin_key),
    );
    let m = Machine::new(dir.path(), "m");
    let path = m.path("app.db");
    small_db(&path, 256 << 10);
    let first = DbState::of(&path);
    std::fs::copy(&path, m.path("again.db")).expect("copy the database");
    m.push(&b, "app.db", "acme/x.db", &["--key", &a.admin_key]);
    exec(
        &path,
        "DROP TABLE t; CREATE TABLE u(id INTEGER PRIMARY KEY, v BLOB);
         INSERT INTO u(v) SELECT randomblob(500) FROM
           (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 400) SELECT x FROM c);
         VACUUM;",
    );
    let second = DbState::of(&path);
    m.push(&b, "app.db", "acme/x.db", &["--key", &a.admin_key]);
    json(
        &m,
        &a,
        &a.admin_key,
        &["retention", "acme/x.db", "--keep-last", "1"],
    );
    Setup {
        pg,
        db,
        location,
        a,
        b,
        m,
        first,
        second,
        _dir: dir,
    }
}

impl Setup {
    /// `sqlferry ARGS --json --key ADMIN --server URL` on `m`, started, not waited for.
    fn spawn(&self, server: &TestServer, args: &[&str]) -> Child {
        self.m
            .command()
            .args(args)
            .args([
                "--json",
                "--key",
                &self.a.admin_key,
                "--server",
                &server.url,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sqlferry")
    }

    /// One value from PostgreSQL.
    fn sql(&self, sql: &str) -> String {
        self.pg.psql(&self.db, sql)
    }

    /// Waits until `sql` answers `want` (`what` says what is awaited).
    fn wait_until(&self, what: &str, sql: &str, want: &str) {
        let deadline = Instant::now() + REACH_TIMEOUT;
        loop {
            let got = self.sql(sql);
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {sql} answers {got:?}");
            std::thread::yield_now();
        }
    }

    /// How many sessions wait for the fence's lock in `mode` (`ShareLock` for a push,
    /// `ExclusiveLock` for a sweep), or hold it (`granted`).
    fn fence_sessions(&self, mode: &str, granted: bool) -> String {
        self.sql(&format!(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND classid::bigint = {} AND objid::bigint = {} AND mode = '{mode}' AND granted = {granted}",
            (FENCE_LOCK as u64) >> 32,
            (FENCE_LOCK as u64) & 0xffff_ffff
        ))
    }

    fn await_fence(&self, what: &str, mode: &str, granted: bool, want: &str) {
        let deadline = Instant::now() + REACH_TIMEOUT;
        loop {
            let got = self.fence_sessions(mode, granted);
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {got} sessions");
            std::thread::yield_now();
        }
    }

    /// Pulls every version the replicas keep on a new machine through `server` and
    /// checks each holds what was pushed.
    fn pull_back(&self, server: &TestServer, name: &str, wanted: &[(&str, &DbState)]) {
        let other = Machine::new(self._dir.path(), name);
        for (i, (spec, state)) in wanted.iter().enumerate() {
            let local = format!("copy{i}.db");
            other.pull(server, spec, Some(&local), &["--key", &self.a.admin_key]);
            state.assert_held_by(&other.path(&local), spec);
        }
    }
}

/// A psql session of the test's: SQL in, one answer line out.
struct Session {
    child: Child,
    to: ChildStdin,
    said: BufReader<ChildStdout>,
}

impl Session {
    fn open(pg: &Postgres, db: &str) -> Session {
        let mut child = pg.session(db);
        let to = child.stdin.take().expect("psql's stdin");
        let said = BufReader::new(child.stdout.take().expect("psql's stdout"));
        Session { child, to, said }
    }

    /// Sends `sql`, which must end by selecting `marker`, and waits for that line.
    fn run(&mut self, sql: &str, marker: &str) {
        writeln!(self.to, "{sql}").expect("send SQL to psql");
        self.to.flush().expect("send it");
        let mut line = String::new();
        while !line.contains(marker) {
            line.clear();
            let n = self.said.read_line(&mut line).expect("psql answers");
            assert!(n > 0, "psql ended before answering {marker}");
        }
    }

    /// Ends the session (what it held goes with it).
    fn end(self) {
        let Session { mut child, to, .. } = self;
        drop(to);
        child.wait().expect("psql ends");
    }
}

fn finish(child: Child) -> Output {
    child.wait_with_output().expect("sqlferry ends")
}

fn report(out: &Output, what: &str) -> serde_json::Value {
    assert_eq!(util::code(out), 0, "{what}: {}", util::stderr(out));
    serde_json::from_str(util::stdout(out).trim()).expect("JSON")
}

#[test]
fn a_sweep_waits_for_a_push_holding_the_fence_and_keeps_what_its_version_names() {
    let s = setup();
    let v1 = referenced(&s.location, "acme/x.db", &[1]);

    // The push's record is held back by the test's lock on the fence's table: the push
    // takes the fence, then waits there, before its checks and its version object.
    let mut table = Session::open(s.pg, &s.db);
    table.run(
        "BEGIN; LOCK TABLE sqlferry_pushing IN SHARE ROW EXCLUSIVE MODE; SELECT 'locked';",
        "locked",
    );
    // B's cache names version 1's pack and chunks: the new replica's version will name
    // them, and no page is sent to be stored again.
    let push = s.spawn(&s.b, &["push", "again.db", "acme/y.db"]);
    s.wait_until(
        "the push waits for the fence's table",
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
           AND wait_event_type = 'Lock' AND wait_event = 'relation'
           AND query LIKE '%INSERT INTO sqlferry_pushing%'",
        "1",
    );
    s.await_fence("the push holds the fence", "ShareLock", true, "1");

    // The prune removes version 1, marks (no version names its objects yet: acme/y.db
    // has none), and waits for the fence before deleting them.
    let prune = s.spawn(&s.a, &["prune", "acme/x.db"]);
    s.await_fence("the sweep waits for the fence", "ExclusiveLock", false, "1");
    assert!(
        v1.iter().all(|k| garbage_kind(&s.location).contains(k)),
        "nothing deleted while the push holds the fence"
    );

    // Let go: the push records itself, checks, creates its version and its row, and
    // lets the fence go; the sweep then reads that version and keeps what it names.
    table.run("ROLLBACK; SELECT 'released';", "released");
    let pushed = report(&finish(push), "the push holding the fence");
    assert_eq!(pushed["version"], 1, "{pushed}");
    let pruned = report(&finish(prune), "the prune that waited");
    table.end();
    assert_eq!(numbers(&pruned["removed"]), [1], "{pruned}");
    assert_eq!(pruned["swept_objects"], 0, "{pruned}");

    let y1 = referenced(&s.location, "acme/y.db", &[1]);
    assert_eq!(y1, v1, "the new version names version 1's objects");
    let mut kept = referenced(&s.location, "acme/x.db", &[2]);
    kept.extend(y1);
    assert_eq!(
        garbage_kind(&s.location),
        kept,
        "what the versions name, all of it"
    );
    assert_eq!(s.sql("SELECT count(*) FROM sqlferry_pushing"), "0");
    assert_eq!(
        s.sql("SELECT count(*) FROM sqlferry_versions WHERE replica = 'acme/y.db'"),
        "1"
    );

    s.pull_back(
        &s.a,
        "other",
        &[
            ("acme/y.db@1", &s.first),
            ("acme/x.db@2", &s.second),
            ("acme/x.db@latest", &s.second),
        ],
    );
    // A second sweep finds nothing more to delete, and a pull through B (which knew
    // the pack all along) still holds.
    let again = json(&s.m, &s.a, &s.a.admin_key, &["prune", "acme/x.db"]);
    assert_eq!(again["swept_objects"], 0, "{again}");
    s.pull_back(&s.b, "third", &[("acme/y.db@latest", &s.first)]);
}

#[test]
fn a_push_waits_behind_a_sweep_holding_the_fence_and_lands_when_pushed_again() {
    let s = setup();
    let v1 = referenced(&s.location, "acme/x.db", &[1]);

    // Another push holds the fence (the test's session, shared): the sweep waits.
    let mut other_push = Session::open(s.pg, &s.db);
    other_push.run(
        &format!("SELECT pg_advisory_lock_shared({FENCE_LOCK}), 'held';"),
        "held",
    );
    let prune = s.spawn(&s.a, &["prune", "acme/x.db"]);
    s.await_fence("the sweep waits for the fence", "ExclusiveLock", false, "1");
    // A push reaching the fence now waits behind the sweep, not beside the holder.
    let push = s.spawn(&s.b, &["push", "again.db", "acme/y.db"]);
    s.await_fence("the push waits behind the sweep", "ShareLock", false, "1");

    // The holder lets go: the sweep deletes version 1's objects, then the push checks
    // what its cache named and finds it gone.
    other_push.end();
    let pruned = report(&finish(prune), "the prune");
    assert_eq!(numbers(&pruned["removed"]), [1], "{pruned}");
    assert_eq!(pruned["swept_objects"], v1.len(), "{pruned}");
    let left = garbage_kind(&s.location);
    assert!(v1.iter().all(|k| !left.contains(k)), "swept: {left:?}");
    let out = finish(push);
    let line = assert_fails(&out, EXIT_SERVER, "that are gone");
    assert!(line.contains("push again"), "{line}");
    assert!(
        crate::s3_serve::objects_under(&s.location)
            .iter()
            .all(|(k, _)| !k.contains("replicas/acme/y.db/v/")),
        "no version of acme/y.db"
    );
    s.wait_until(
        "the failed push's record deleted as it let the fence go",
        "SELECT count(*) FROM sqlferry_pushing",
        "0",
    );

    // Pushed again: B's cache forgot what was gone, the pages are written anew.
    let r =
        s.m.push(&s.b, "again.db", "acme/y.db", &["--key", &s.a.admin_key]);
    assert_eq!(r.u64("version"), 1);
    s.pull_back(
        &s.a,
        "other",
        &[("acme/y.db@1", &s.first), ("acme/x.db@latest", &s.second)],
    );
    assert_fails(
        &s.m.run_on(
            &s.a,
            ["pull", "acme/x.db@1", "removed.db", "--key", &s.a.admin_key],
        ),
        crate::server::EXIT_NOT_FOUND,
        "removed",
    );
}

#[test]
fn the_record_of_a_push_cut_off_mid_commit_stops_the_sweep_until_it_is_old() {
    let s = setup();
    let v1 = referenced(&s.location, "acme/x.db", &[1]);
    let store = s.sql("SELECT DISTINCT store FROM sqlferry_versions");
    assert!(store.starts_with("s3://"), "{store}");
    // A push through a server killed (or cut off from PostgreSQL) after it took the
    // fence and recorded itself: its version object may still appear.
    s.sql(&format!(
        "INSERT INTO sqlferry_pushing(store, replica, number, started_at)
         VALUES ('{store}', 'acme/z.db', 1, extract(epoch FROM now())::bigint - 5)"
    ));
    let out =
        s.m.run_on(&s.a, ["prune", "acme/x.db", "--key", &s.a.admin_key]);
    let line = assert_fails(
        &out,
        EXIT_CONFLICT,
        "lost its session with the metadata store",
    );
    assert!(line.contains("acme/z.db@1"), "{line}");
    let left = garbage_kind(&s.location);
    assert!(
        v1.iter().all(|k| left.contains(k)),
        "nothing deleted: {left:?}"
    );

    // Older than any request that push could still make: the record goes, the sweep
    // runs.
    s.sql("UPDATE sqlferry_pushing SET started_at = started_at - 3600");
    let pruned = json(&s.m, &s.a, &s.a.admin_key, &["prune", "acme/x.db"]);
    assert_eq!(pruned["swept_objects"], v1.len(), "{pruned}");
    assert_eq!(s.sql("SELECT count(*) FROM sqlferry_pushing"), "0");
    s.pull_back(&s.b, "other", &[("acme/x.db@latest", &s.second)]);
}

#[test]
fn a_push_killed_after_its_version_object_leaves_a_record_the_sweep_keeps_it_by() {
    let s = setup();
    let v1 = referenced(&s.location, "acme/x.db", &[1]);
    // Version 1's object as a push into acme/z.db would make it (the same pages).
    let mut made = crate::s3_gc::json_object(&s.location, "replicas/acme/x.db/v/1");
    made["replica"] = "acme/z.db".into();
    let store = s.sql("SELECT DISTINCT store FROM sqlferry_versions");

    // The push holds the fence (the test's session, as the killed server's did):
    // the sweep marks, then waits.
    let mut killed = Session::open(s.pg, &s.db);
    killed.run(
        &format!("SELECT pg_advisory_lock_shared({FENCE_LOCK}), 'held';"),
        "held",
    );
    let prune = s.spawn(&s.a, &["prune", "acme/x.db"]);
    s.await_fence("the sweep waits for the fence", "ExclusiveLock", false, "1");
    // Its record, then its version object, then it dies before its row: its
    // connection closes, the lock with it.
    killed.run(
        &format!(
            "INSERT INTO sqlferry_pushing(store, replica, number, started_at)
             VALUES ('{store}', 'acme/z.db', 1, extract(epoch FROM now())::bigint); SELECT 'recorded';"
        ),
        "recorded",
    );
    let (objects, rt) = crate::s3_gc::objects(&s.location);
    rt.block_on(objects.put(
        "replicas/acme/z.db/v/1",
        serde_json::to_vec(&made).expect("JSON"),
    ))
    .expect("create the version object");
    killed.end();

    // The sweep reads the record's version and keeps what it names.
    let pruned = report(&finish(prune), "the prune");
    assert_eq!(numbers(&pruned["removed"]), [1], "{pruned}");
    assert_eq!(pruned["swept_objects"], 0, "{pruned}");
    let left = garbage_kind(&s.location);
    assert!(v1.iter().all(|k| left.contains(k)), "kept: {left:?}");
    assert_eq!(s.sql("SELECT count(*) FROM sqlferry_pushing"), "0");
    // Its row, missing, is repaired by the next read of the replica; it pulls whole.
    s.pull_back(&s.b, "other", &[("acme/z.db@1", &s.first)]);
    assert_eq!(
        s.sql("SELECT count(*) FROM sqlferry_versions WHERE replica = 'acme/z.db'"),
        "1"
    );
}

#[test]
fn the_fence_costs_a_push_about_one_round_trip() {
    use sqlferry::meta::postgres::PgMeta;
    use sqlferry::store::s3::{IndexRow, VersionIndex as _};

    const ROUNDS: u64 = 200;
    let pg = postgres::shared();
    let url = pg.database();
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let meta = rt.block_on(PgMeta::connect(&url)).expect("connect");
    let row = |number: u64| IndexRow {
        number,
        page_size: 4096,
        page_count: 1,
        digest: String::new(),
        digest2: String::new(),
        message: String::new(),
        created_at: 0,
        client_id: String::new(),
        key_id: String::new(),
        base: 0,
        removed_at: None,
        encryption_key_id: None,
    };
    // Warm: the pool's connections made, statements prepared.
    for n in 1..=8 {
        meta.insert("s3://t/p", "warm", &[row(n)]).expect("insert");
        meta.push_fence("s3://t/p", "warm2", n)
            .expect("fence")
            .land(&row(n))
            .expect("land");
    }
    let started = Instant::now();
    for n in 1..=ROUNDS {
        meta.insert("s3://t/p", "plain", &[row(n)]).expect("insert");
    }
    let plain = started.elapsed();
    let started = Instant::now();
    for n in 1..=ROUNDS {
        meta.push_fence("s3://t/p", "fenced", n)
            .expect("fence")
            .land(&row(n))
            .expect("land");
    }
    let fenced = started.elapsed();
    eprintln!(
        "per push: the row alone {:?}, the fence with the row {:?} (PostgreSQL on 127.0.0.1)",
        plain / ROUNDS as u32,
        fenced / ROUNDS as u32
    );
    let db = url.rsplit('/').next().expect("a database name");
    assert_eq!(
        pg.psql(
            db,
            "SELECT count(*) FROM sqlferry_versions WHERE replica = 'fenced'"
        ),
        ROUNDS.to_string()
    );
    assert_eq!(pg.psql(db, "SELECT count(*) FROM sqlferry_pushing"), "0");
    assert_eq!(
        pg.psql(
            db,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ),
        "0",
        "every push let the fence go"
    );
    drop(meta);
}
