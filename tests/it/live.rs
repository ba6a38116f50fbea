//! Syncs next to real second processes: a writer committing to the origin every few
//! milliseconds, a reader reading the replica continuously, and a push killed with
//! SIGKILL half-way. The second processes are Python scripts (`helpers/`) using their
//! own SQLite, as an application would; every wait is on their output or on a file
//! event, never on a fixed sleep.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::util::{self, Mode};

/// A helper script running as its own process. It prints "ready" once it is working
/// and one JSON line with its findings when its stdin closes. Killed if dropped early.
pub struct Helper {
    name: &'static str,
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Helper {
    /// Starts `helpers/<script>` with `args` and waits until it says it is ready.
    pub fn start(script: &'static str, args: &[&std::ffi::OsStr]) -> Helper {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/it/helpers")
            .join(script);
        let mut child = Command::new("python3")
            .arg(&path)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start python3 {}: {e}", path.display()));
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut helper = Helper {
            name: script,
            child,
            stdout,
        };
        let line = helper.line();
        if line.trim() != "ready" {
            let rest = helper.finish_raw();
            panic!("{script} did not get ready: {line}{rest}");
        }
        helper
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read helper stdout");
        line
    }

    /// Closes stdin and returns everything else the helper printed, stderr included.
    fn finish_raw(&mut self) -> String {
        drop(self.child.stdin.take());
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut rest).expect("read stdout");
        let status = self.child.wait().expect("wait helper");
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut err).expect("read stderr");
        }
        assert!(
            status.success(),
            "{} failed ({status}): {rest}{err}",
            self.name
        );
        rest
    }

    /// Tells the helper to stop and returns its JSON report.
    pub fn finish(mut self) -> serde_json::Value {
        let out = self.finish_raw();
        serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("{} report {out:?}: {e}", self.name))
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // Only reached with the process still running when a test failed early.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn count_and_span(path: &Path, table: &str) -> (i64, i64, i64) {
    util::open(path)
        .query_row(
            &format!("SELECT count(*), coalesce(min(id), 0), coalesce(max(id), 0) FROM {table}"),
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("count rows")
}

#[test]
fn writer_is_never_blocked_and_replica_is_one_committed_state() {
    let dir = TempDir::new().expect("tempdir");
    let src = dir.path().join("origin.db");
    let conn = util::create(&src, 4096, Mode::Wal);
    conn.execute_batch("CREATE TABLE w(id INTEGER PRIMARY KEY, at REAL NOT NULL)")
        .expect("writer's table");
    util::fill(&conn, 64 << 20, 4000);
    drop(conn);
    let (big_rows, _, _) = count_and_span(&src, "t");
    let dest = dir.path().join("replica.db");

    // Commit every 2 ms; checkpoint often, so checkpoints run during the syncs too.
    let writer = Helper::start("writer.py", &[src.as_os_str(), "2".as_ref(), "50".as_ref()]);
    let mut seen = Vec::new();
    for round in 0..3 {
        let report = util::push_json(&src, &dest);
        // The writer's rows in the replica are exactly 1..k: one committed state.
        let (k, first, last) = count_and_span(&dest, "w");
        assert!(
            k > 0,
            "round {round}: the writer had committed before the push"
        );
        assert_eq!(
            (first, last),
            (1, k),
            "round {round}: ids 1..{k} without a gap"
        );
        assert_eq!(util::integrity(&dest), "ok", "round {round}");
        assert_eq!(
            util::digest(&dest),
            report["digest"].as_str().expect("digest")
        );
        assert_eq!(count_and_span(&dest, "t").0, big_rows, "round {round}");
        seen.push(k);
    }
    let report = writer.finish();
    assert_eq!(
        report["errors"],
        serde_json::json!([]),
        "writer errors: {report}"
    );
    let commits = report["commits"].as_i64().expect("commits");
    let max_ms = report["max_commit_ms"].as_f64().expect("max_commit_ms");
    assert!(
        max_ms < 500.0,
        "a commit waited {max_ms:.0} ms while the origin was being synced"
    );
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]) && commits > seen[2],
        "the writer kept committing through the syncs: replicas had {seen:?}, {commits} commits"
    );
}

/// Moves the origin to generation `g`: every row carries `g`, rows come and go so the
/// database grows and shrinks, and the meta row records `g` and the row count, all in
/// one transaction.
fn next_generation(path: &Path, g: i64) {
    let conn = util::open(path);
    conn.execute_batch("BEGIN").expect("begin");
    conn.execute("DELETE FROM t WHERE id % 4 = ?1 % 4", [g])
        .expect("delete");
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2)
         INSERT INTO t(g, k, v) SELECT ?1, hex(randomblob(8)), randomblob(300) FROM n",
        [g, 2000 + 1500 * (g % 3)],
    )
    .expect("insert");
    conn.execute("UPDATE t SET g = ?1", [g]).expect("update");
    conn.execute("UPDATE meta SET g = ?1, n = (SELECT count(*) FROM t)", [g])
        .expect("meta");
    conn.execute_batch("COMMIT").expect("commit");
    if g % 3 == 0 {
        conn.execute_batch("VACUUM").expect("vacuum");
    }
}

fn reader_never_sees_a_mixed_state(mode: Mode) {
    let dir = TempDir::new().expect("tempdir");
    let src = dir.path().join("origin.db");
    let conn = util::create(&src, 4096, mode);
    conn.execute_batch(
        "DROP INDEX t_k; DROP TABLE t;
         CREATE TABLE t(id INTEGER PRIMARY KEY, g INTEGER NOT NULL, k TEXT, v BLOB);
         CREATE INDEX t_g ON t(g);
         CREATE TABLE meta(g INTEGER NOT NULL, n INTEGER NOT NULL);
         INSERT INTO meta VALUES (0, 0);",
    )
    .expect("schema");
    drop(conn);
    next_generation(&src, 1);
    // A new replica takes the origin's journal mode.
    let dest = dir.path().join("replica.db");
    util::push_json(&src, &dest);
    assert_eq!(util::journal_mode(&dest), mode.pragma());

    let reader = Helper::start("reader.py", &[dest.as_os_str()]);
    for g in 2..=9 {
        next_generation(&src, g);
        util::push_json(&src, &dest);
    }
    let report = reader.finish();
    assert_eq!(
        report["errors"],
        serde_json::json!([]),
        "{mode:?}: {report}"
    );
    assert_eq!(
        report["mismatches"],
        serde_json::json!([]),
        "{mode:?}: {report}"
    );
    let generations = report["generations"].as_array().expect("generations");
    assert!(
        generations.len() >= 3 && report["reads"].as_i64() > Some(20),
        "{mode:?}: the reader read throughout the syncs: {report}"
    );
    util::assert_same(&src, &dest);
}

#[test]
fn reader_of_wal_replica_never_sees_a_mixed_state() {
    reader_never_sees_a_mixed_state(Mode::Wal);
}

#[test]
fn reader_of_rollback_replica_never_sees_a_mixed_state() {
    reader_never_sees_a_mixed_state(Mode::Rollback);
}

/// Rows of the replica in a form cheap to compare.
fn summary(path: &Path) -> (i64, i64, i64, String) {
    util::open(path)
        .query_row(
            "SELECT count(*), sum(id), sum(length(v)), max(k) FROM t",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .expect("summary")
}

fn killed_push_leaves_replica_as_it_was(mode: Mode, sidecar: &str) {
    const WAL_BIG_ENOUGH: u64 = 12 << 20;
    let dir = TempDir::new().expect("tempdir");
    let src = dir.path().join("origin.db");
    util::fill(&util::create(&src, 4096, mode), 64 << 20, 2000);
    let dest = dir.path().join("replica.db");
    util::push_json(&src, &dest);
    let digest = util::digest(&dest);
    let rows = summary(&dest);
    let sidecar: PathBuf = util::sidecar(&dest, sidecar);
    assert!(!sidecar.exists(), "{} left over", sidecar.display());

    // Every page changes, so the push writes the whole replica.
    util::open(&src)
        .execute("UPDATE t SET v = randomblob(2000)", [])
        .expect("change everything");
    let mut push = util::sqlferry(dir.path())
        .arg("push")
        .arg(&src)
        .arg(&dest)
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start push");
    // In the middle: in rollback mode, the journal exists and the replica file itself
    // has been written (the cache spilled); in WAL mode, the WAL holds many pages.
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let file_time = modified(&dest);
    let mut finished = false;
    let reached = util::wait_until(Duration::from_secs(120), Duration::from_millis(1), || {
        finished = push.try_wait().expect("try_wait").is_some();
        finished
            || match mode {
                Mode::Rollback => sidecar.exists() && modified(&dest) != file_time,
                Mode::Wal => util::file_len(&sidecar) >= WAL_BIG_ENOUGH,
            }
    });
    assert!(reached, "{mode:?}: the push never got to writing");
    assert!(!finished, "the push finished before it could be killed");
    push.kill().expect("SIGKILL the push");
    let status = push.wait().expect("wait push");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "killed by SIGKILL"
    );

    // What a user checks first: verify, which only reads. Its verdict is asserted at
    // the end, after the replica itself has been checked through SQLite.
    let verified = util::verify_json(&dest);
    assert_eq!(util::integrity(&dest), "ok", "{mode:?}");
    assert_eq!(
        summary(&dest),
        rows,
        "{mode:?}: the replica's rows are as before"
    );
    assert_eq!(
        util::digest(&dest),
        digest,
        "{mode:?}: the replica is as before"
    );
    let (code, report, err) = verified;
    assert_eq!(code, 0, "{mode:?}: verify right after the kill: {err}");
    let report = report.expect("verify report");
    assert_eq!(report["digest"], digest.as_str(), "{mode:?}");
    assert_eq!(report["integrity"], serde_json::json!(["ok"]), "{mode:?}");

    // And the next push completes the job.
    let report = util::push_json(&src, &dest);
    assert_eq!(
        util::digest(&dest),
        report["digest"].as_str().expect("digest")
    );
    assert_eq!(summary(&dest), summary(&src));
}

#[test]
fn killed_push_leaves_rollback_replica_as_it_was() {
    killed_push_leaves_replica_as_it_was(Mode::Rollback, "-journal");
}

#[test]
fn killed_push_leaves_wal_replica_as_it_was() {
    killed_push_leaves_replica_as_it_was(Mode::Wal, "-wal");
}

#[test]
fn killed_push_into_new_dest_leaves_nothing_half_written() {
    let dir = TempDir::new().expect("tempdir");
    let src = dir.path().join("origin.db");
    util::fill(&util::create(&src, 4096, Mode::Wal), 64 << 20, 2000);
    let dest = dir.path().join("new.db");
    let mut push = util::sqlferry(dir.path())
        .arg("push")
        .arg(&src)
        .arg(&dest)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start push");
    // In the middle: a new DEST is written into a temporary file beside it, which has
    // grown by then.
    let tmp = dir.path().join(".new.db.sqlferry-new");
    let mut finished = false;
    let reached = util::wait_until(Duration::from_secs(120), Duration::from_millis(1), || {
        finished = push.try_wait().expect("try_wait").is_some();
        finished || util::file_len(&tmp) >= 12 << 20
    });
    assert!(reached, "the new DEST's temporary file never grew");
    assert!(!finished, "the push finished before it could be killed");
    push.kill().expect("SIGKILL the push");
    push.wait().expect("wait push");

    // What an application opening DEST now sees: nothing at all, no half-written
    // database, and no file beside it that SQLite would take for its journal or WAL.
    for suffix in ["", "-journal", "-wal"] {
        assert!(
            !util::sidecar(&dest, suffix).exists(),
            "the killed push left DEST{suffix}"
        );
    }
    assert!(
        tmp.exists(),
        "the kill left the temporary file (what this test is about)"
    );

    // What the user does next: push again. It must complete the job.
    let out = util::run(
        dir.path(),
        &[
            "push".as_ref(),
            src.as_os_str(),
            dest.as_os_str(),
            "--json".as_ref(),
        ],
    );
    assert_eq!(
        util::code(&out),
        0,
        "push after the killed one: {}",
        util::stderr(&out)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        util::digest(&dest),
        report["digest"].as_str().expect("digest")
    );
    assert_eq!(util::integrity(&dest), "ok");
    assert_eq!(summary(&dest), summary(&src));
    assert!(!tmp.exists(), "the next push cleaned up the temporary file");
}
