//! A pull whose cost follows the change: after a pull (or a push) LOCAL is sealed, and
//! the next pull of a small change reads a few pages of it, not the file; every way to
//! change LOCAL behind the seal's back is still seen (the pull is refused as local
//! changes, or reads LOCAL as before), and the result is always the version's rows,
//! integrity check and digest.
//!
//! A proptest runs random histories (pushes, pulls, an application writing LOCAL and
//! checkpointing it in every mode, connections closing, another process writing, the
//! file replaced) and checks every pull against a model: refused exactly when LOCAL
//! holds changes no sync carried, else the latest version.
//!
//! What a command read is measured the way the kernel counts it: `rchar` of
//! `/proc/self/io` of a small Python parent, before and after it waited for the
//! `sqlferry` child (a waited-for child's I/O is added to its parent's).

use std::path::Path;
use std::process::Output;

use tempfile::TempDir;

use crate::server::{DbState, Machine, TestServer, exec, small_db};
use crate::util;

/// Exit code of a pull refused over changes LOCAL holds that were never pushed.
const EXIT_LOCAL_CHANGES: i32 = 9;

/// `sqlferry ARGS` on `machine` under a Python parent that reports how many bytes the
/// child passed to `read` and `pread` (all files: LOCAL, the store or the server's
/// answers, the kept manifest, the history): its exit code, stdout, stderr and that
/// count.
fn run_counted(machine: &Machine, args: &[&str]) -> (Output, u64) {
    const SCRIPT: &str = r#"
import json, subprocess, sys
def rchar():
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
before = rchar()
p = subprocess.run(sys.argv[1:], capture_output=True)
after = rchar()
print(json.dumps({"code": p.returncode, "rchar": after - before,
                  "stdout": p.stdout.decode(), "stderr": p.stderr.decode()}))
"#;
    let out = machine
        .command_of(Path::new("python3"))
        .arg("-c")
        .arg(SCRIPT)
        .arg(env!("CARGO_BIN_EXE_sqlferry"))
        .args(args)
        .output()
        .expect("run python3");
    assert!(out.status.success(), "{}", util::stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the wrapper's JSON");
    let text = |f: &str| v[f].as_str().expect("text").as_bytes().to_vec();
    let code = v["code"].as_i64().expect("code") as i32;
    let child = Output {
        // A wait status: the exit code in the second byte.
        status: std::os::unix::process::ExitStatusExt::from_raw(code << 8),
        stdout: text("stdout"),
        stderr: text("stderr"),
    };
    (child, v["rchar"].as_u64().expect("rchar"))
}

/// The JSON report of a pull that must have succeeded.
fn report(out: &Output, what: &str) -> serde_json::Value {
    assert_eq!(
        util::code(out),
        0,
        "{what} failed: {}{}",
        util::stderr(out),
        util::stdout(out)
    );
    serde_json::from_str(util::stdout(out).trim()).expect("pull --json prints one object")
}

fn sealed(report: &serde_json::Value) -> bool {
    report["local_sealed"].as_bool().expect("local_sealed")
}

/// Over a real `sqlferry serve`: a one-row change pulled into a 16 MB LOCAL reads
/// under 1 MB in all (LOCAL, the kept manifest, the history), where the pull that
/// must read LOCAL reads all of it; a no-change pull reads as little; a LOCAL written
/// by another process at once after a pull is refused; after `--force` (which reads
/// LOCAL) and after a push of LOCAL's own change, the next pull is sealed again.
#[test]
fn a_small_change_pulled_over_a_server_reads_what_changed_and_any_write_is_seen() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let key = server.admin_key.clone();
    let a = Machine::new(dir.path(), "a");
    let b = Machine::new(dir.path(), "b");
    let src = a.path("app.db");
    small_db(&src, 16 << 20);
    let file_bytes = util::file_len(&src);
    a.push(&server, "app.db", "acme/app.db", &["--key", &key]);
    let local = b.path("local.db");
    let first = b.pull(&server, "acme/app.db", Some("local.db"), &["--key", &key]);
    assert!(!sealed(&first.0), "a new file has no seal");

    // One row changes: the pull writes its pages and reads little of anything.
    exec(&src, "UPDATE t SET v = randomblob(300) WHERE id = 77");
    a.push(&server, "app.db", "acme/app.db", &[]);
    let v2 = DbState::of(&src);
    let url = server.url.clone();
    let pull = [
        "pull",
        "acme/app.db",
        "local.db",
        "--json",
        "--key",
        &key,
        "--server",
        &url,
    ];
    let (out, read) = run_counted(&b, &pull);
    let r = report(&out, "the pull of one row");
    assert!(sealed(&r), "{r}");
    assert!(
        (1..=3).contains(&r["pages_sent"].as_u64().expect("pages")),
        "{r}"
    );
    v2.assert_held_by(&local, "after the small pull");
    assert!(
        read < 1 << 20,
        "read {read} bytes for one row of {file_bytes}"
    );

    // Nothing new: sealed, nothing written, as little read.
    let (out, read) = run_counted(&b, &pull);
    let r = report(&out, "the no-change pull");
    assert_eq!(
        (sealed(&r), r["pages_sent"].as_u64()),
        (true, Some(0)),
        "{r}"
    );
    assert!(read < 1 << 20, "read {read} bytes");
    v2.assert_held_by(&local, "after the no-change pull");

    // Another process writes LOCAL at once (same second as the last pull's seal).
    util::python(
        "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1])\nc.execute('UPDATE t SET v = x\\'00\\' WHERE id = 5')\nc.commit()",
        &[&local],
    );
    let edited = DbState::of(&local);
    assert_ne!(edited.digest, v2.digest);
    let (out, _) = run_counted(&b, &pull);
    assert_eq!(
        util::code(&out),
        EXIT_LOCAL_CHANGES,
        "{}",
        util::stderr(&out)
    );
    assert!(util::stderr(&out).contains("has changes that were never pushed"));
    edited.assert_held_by(&local, "a refused pull changes nothing");

    // --force reads LOCAL (its seal no longer holds) and brings it to the version.
    let mut forced: Vec<&str> = pull.to_vec();
    forced.push("--force");
    let (out, read) = run_counted(&b, &forced);
    let r = report(&out, "the forced pull");
    assert!(!sealed(&r), "{r}");
    assert!(
        read >= file_bytes,
        "a pull that cannot trust LOCAL reads it: {read}"
    );
    v2.assert_held_by(&local, "after --force");
    let (out, _) = run_counted(&b, &pull);
    assert!(sealed(&report(&out, "after --force")), "sealed again");

    // LOCAL's own change, pushed from b with an application connection open (its
    // WAL stays): the next pull of that version is sealed by the push, and correct.
    let app = util::open(&local);
    app.pragma_update(None, "wal_autocheckpoint", 0)
        .expect("autocheckpoint");
    app.execute("UPDATE t SET v = randomblob(300) WHERE id = 9", [])
        .expect("update");
    let pushed = b.push(&server, "local.db", "acme/app.db", &["--key", &key]);
    assert_eq!(pushed.u64("version"), 3);
    let v3 = DbState::of(&local);
    let (out, _) = run_counted(&b, &pull);
    let r = report(&out, "the pull after b's push");
    assert_eq!((sealed(&r), r["version"].as_u64()), (true, Some(3)), "{r}");
    v3.assert_held_by(&local, "after b's push and pull");
    drop(app);

    // a pulls b's change into its own file and pushes another row; b follows it.
    a.pull(&server, "acme/app.db", Some("app.db"), &["--key", &key]);
    exec(&src, "UPDATE t SET v = randomblob(300) WHERE id = 1234");
    a.push(&server, "app.db", "acme/app.db", &["--key", &key]);
    let v4 = DbState::of(&src);
    let (out, _) = run_counted(&b, &pull);
    let r = report(&out, "the pull of a's second change");
    assert_eq!(r["version"].as_u64(), Some(4), "{r}");
    v4.assert_held_by(&local, "after a's second change");
}

/// The embedded store, LOCAL changed in every way the seal's facts must catch, each
/// followed by a pull: refused as local changes when LOCAL's contents changed, read
/// whole when only the facts moved; never a wrong file.
#[test]
fn every_change_behind_the_seal_is_refused_or_read() {
    let dir = TempDir::new().expect("tempdir");
    let m = Machine::new(dir.path(), "m");
    let src = m.path("origin.db");
    small_db(&src, 4 << 20);
    let push = |what: &str| {
        let out = m.run(["push", "origin.db", "acme/app.db", "--json"]);
        report(&out, what);
    };
    let pull = |extra: &[&str]| {
        m.run(
            ["pull", "acme/app.db", "local.db", "--json"]
                .iter()
                .chain(extra),
        )
    };
    push("v1");
    let local = m.path("local.db");
    report(&pull(&[]), "the first pull");
    let change = |sql: &str| {
        exec(&src, sql);
        push("a change");
        DbState::of(&src)
    };
    let v = change("UPDATE t SET v = randomblob(300) WHERE id = 3");
    let r = report(&pull(&[]), "sealed");
    assert!(sealed(&r), "{r}");
    v.assert_held_by(&local, "sealed");

    // A checkpoint that resets the WAL, with an application connection open, and no
    // change: the contents are the same; whatever the pull reads, it is right.
    let app = util::open(&local);
    app.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("checkpoint");
    let v = change("UPDATE t SET v = randomblob(300) WHERE id = 4");
    report(&pull(&[]), "after a reset");
    v.assert_held_by(&local, "after a reset");

    // A write by the application, then a reset that checkpoints it into the file:
    // no frame of it is left, only the file's facts.
    app.pragma_update(None, "wal_autocheckpoint", 0)
        .expect("autocheckpoint");
    app.execute("UPDATE t SET v = x'01' WHERE id = 6", [])
        .expect("write");
    app.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("checkpoint");
    let written = DbState::of(&local);
    let out = pull(&[]);
    assert_eq!(
        util::code(&out),
        EXIT_LOCAL_CHANGES,
        "{}",
        util::stderr(&out)
    );
    written.assert_held_by(&local, "refused after a write and a reset");
    drop(app);
    let r = report(&pull(&["--force"]), "forced");
    assert!(!sealed(&r));
    v.assert_held_by(&local, "forced");
    assert!(sealed(&report(&pull(&[]), "sealed again")));

    // Replaced by a copy of itself (another inode, the same contents): read, allowed.
    let copy = m.path("copy.db");
    std::fs::copy(&local, &copy).expect("copy");
    std::fs::rename(&copy, &local).expect("replace");
    let v = change("UPDATE t SET v = randomblob(300) WHERE id = 7");
    let r = report(&pull(&[]), "a replaced file");
    assert!(!sealed(&r), "another inode: {r}");
    v.assert_held_by(&local, "a replaced file");

    // Replaced by a copy of an older version kept aside: other contents, refused.
    let old = m.path("old.db");
    std::fs::copy(&local, &old).expect("keep");
    let v = change("UPDATE t SET v = randomblob(300) WHERE id = 8");
    report(&pull(&[]), "the version after the kept copy");
    std::fs::rename(&old, &local).expect("put the old copy back");
    let before = std::fs::read(&local).expect("read");
    let out = pull(&[]);
    assert_eq!(
        util::code(&out),
        EXIT_LOCAL_CHANGES,
        "{}",
        util::stderr(&out)
    );
    assert_eq!(std::fs::read(&local).expect("read"), before, "untouched");
    report(&pull(&["--force"]), "forced over the old copy");
    v.assert_held_by(&local, "forced over the old copy");
    assert!(sealed(&report(&pull(&[]), "sealed again")));

    // Written in place outside SQLite, same size (one byte of a row's blob), at once.
    let v_now = DbState::of(&local);
    let len = util::file_len(&local);
    let mut bytes = std::fs::read(&local).expect("read");
    let at = (len - 100) as usize;
    bytes[at] ^= 0xff;
    std::fs::write(&local, &bytes).expect("write in place");
    assert_eq!(util::file_len(&local), len);
    assert_ne!(
        util::digest(&local),
        v_now.digest,
        "every page is in the digest"
    );
    let out = pull(&[]);
    assert_eq!(
        util::code(&out),
        EXIT_LOCAL_CHANGES,
        "{}",
        util::stderr(&out)
    );
    report(&pull(&["--force"]), "forced over the byte");
    v_now.assert_held_by(&local, "forced over the byte");

    // Truncated by a page: refused (or unreadable), never written.
    assert!(sealed(&report(&pull(&[]), "sealed again")));
    let whole = std::fs::read(&local).expect("read");
    let file = std::fs::File::options()
        .write(true)
        .open(&local)
        .expect("open");
    file.set_len(len - 4096).expect("truncate");
    drop(file);
    let before = std::fs::read(&local).expect("read");
    let out = pull(&[]);
    assert_ne!(util::code(&out), 0, "a truncated LOCAL is not pulled into");
    assert_eq!(std::fs::read(&local).expect("read"), before, "untouched");
    // Put back whole (rewritten: new times, the same contents): read, allowed.
    std::fs::write(&local, &whole).expect("put back");
    let r = report(&pull(&[]), "put back");
    assert!(!sealed(&r), "{r}");
    v_now.assert_held_by(&local, "put back");

    // The seal or the kept manifest damaged: the pull reads LOCAL instead.
    let manifests = m.path("../home/cache/sqlferry/manifests");
    for entry in std::fs::read_dir(&manifests).expect("manifests") {
        let path = entry.expect("entry").path();
        if path.extension().is_none() {
            let mut bytes = std::fs::read(&path).expect("manifest");
            let last = bytes.len() - 1;
            bytes[last] ^= 0xff;
            std::fs::write(&path, bytes).expect("damage the manifest");
        }
    }
    let v = change("UPDATE t SET v = randomblob(300) WHERE id = 11");
    let r = report(&pull(&[]), "a damaged manifest");
    assert!(!sealed(&r), "{r}");
    v.assert_held_by(&local, "a damaged manifest");
    assert!(sealed(&report(&pull(&[]), "sealed again")));
}

/// What happens to LOCAL (or the replica) between two pulls, in the proptest below.
#[derive(Debug, Clone)]
enum Op {
    /// The origin changes `rows` rows and pushes: there is something new to pull.
    Push { rows: u32 },
    /// `sqlferry pull` (exit 9 expected when LOCAL holds changes no sync carried).
    Pull,
    /// `sqlferry pull --force`.
    ForcePull,
    /// The application (connection kept open, auto-checkpoints off) writes LOCAL.
    AppWrite { id: u32 },
    /// The application rewrites a row with the bytes it holds (pages written, the
    /// same contents).
    AppSame { id: u32 },
    /// `PRAGMA wal_checkpoint(KIND)` on the application's connection.
    Checkpoint(&'static str),
    /// The application's connection closes (the last one checkpoints and deletes the
    /// WAL) and opens again.
    Reopen,
    /// Another process writes a row.
    OtherProcess { id: u32 },
    /// LOCAL replaced by a copy of itself (another inode).
    Replace,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (1u32..40).prop_map(|rows| Op::Push { rows }),
        5 => Just(Op::Pull),
        1 => Just(Op::ForcePull),
        2 => (1u32..2000).prop_map(|id| Op::AppWrite { id }),
        1 => (1u32..2000).prop_map(|id| Op::AppSame { id }),
        2 => prop_oneof![
            Just("PASSIVE"),
            Just("FULL"),
            Just("RESTART"),
            Just("TRUNCATE")
        ]
        .prop_map(Op::Checkpoint),
        1 => Just(Op::Reopen),
        1 => (1u32..2000).prop_map(|id| Op::OtherProcess { id }),
        1 => Just(Op::Replace),
    ]
}

/// Random histories of pulls, pushes and everything an application or another program
/// does to LOCAL in between, on the embedded store: every pull either is refused
/// (exit 9, LOCAL as it was) exactly when LOCAL holds changes no sync carried, or
/// leaves LOCAL with the latest version's rows, integrity check and digest. The seals
/// make some of those pulls read only what changed; none may make one wrong.
/// `SQLFERRY_FUZZ_CASES` sets the number of cases (default 6).
#[test]
fn every_pull_is_right_or_refused_whatever_local_went_through() {
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let cases = std::env::var("SQLFERRY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let sealed_pulls = std::cell::Cell::new(0u32);
    runner
        .run(&proptest::collection::vec(op(), 1..20), |ops| {
            let dir = TempDir::new().expect("tempdir");
            let m = Machine::new(dir.path(), "m");
            let src = m.path("origin.db");
            small_db(&src, 2 << 20);
            let local = m.path("local.db");
            let run = |args: &[&str]| m.run(args);
            report(&run(&["push", "origin.db", "acme/app.db", "--json"]), "v1");
            report(&run(&["pull", "acme/app.db", "local.db", "--json"]), "first pull");
            let mut latest = DbState::of(&src);
            let mut synced = latest.digest.clone();
            let mut app = Some(util::open(&local));
            let mut n = 0u32;
            for op in ops.iter().chain([&Op::Pull]) {
                match op {
                    Op::Push { rows } => {
                        n += 1;
                        exec(
                            &src,
                            &format!(
                                "UPDATE t SET v = randomblob(300) WHERE id % 97 < {rows} AND id % 7 = {}",
                                n % 7
                            ),
                        );
                        report(&run(&["push", "origin.db", "acme/app.db", "--json"]), "push");
                        latest = DbState::of(&src);
                    }
                    Op::Pull | Op::ForcePull => {
                        let before = util::digest(&local);
                        let mut args = vec!["pull", "acme/app.db", "local.db", "--json"];
                        if matches!(op, Op::ForcePull) {
                            args.push("--force");
                        }
                        let out = run(&args);
                        let refused = matches!(op, Op::Pull)
                            && before != synced
                            && before != latest.digest;
                        if refused {
                            assert_eq!(util::code(&out), EXIT_LOCAL_CHANGES, "{}", util::stderr(&out));
                            assert_eq!(util::digest(&local), before, "a refusal writes nothing");
                        } else {
                            let r = report(&out, "a pull");
                            if sealed(&r) {
                                sealed_pulls.set(sealed_pulls.get() + 1);
                            }
                            latest.assert_held_by(&local, &format!("{op:?} of {ops:?}"));
                            synced = latest.digest.clone();
                        }
                    }
                    Op::AppWrite { id } => {
                        let c = app.get_or_insert_with(|| util::open(&local));
                        c.pragma_update(None, "wal_autocheckpoint", 0).expect("autocheckpoint");
                        c.execute("UPDATE t SET v = randomblob(301) WHERE id = ?1", [id])
                            .expect("write");
                    }
                    Op::AppSame { id } => {
                        let c = app.get_or_insert_with(|| util::open(&local));
                        c.execute("UPDATE t SET v = v WHERE id = ?1", [id]).expect("write");
                    }
                    Op::Checkpoint(kind) => {
                        let c = app.get_or_insert_with(|| util::open(&local));
                        c.query_row(&format!("PRAGMA wal_checkpoint({kind})"), [], |_| Ok(()))
                            .expect("checkpoint");
                    }
                    Op::Reopen => {
                        drop(app.take());
                        app = Some(util::open(&local));
                    }
                    Op::OtherProcess { id } => {
                        util::python(
                            "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1], timeout=30)\nc.execute('UPDATE t SET v = randomblob(302) WHERE id = ?', (int(sys.argv[2]),))\nc.commit()",
                            &[local.to_str().expect("UTF-8"), &id.to_string()],
                        );
                    }
                    Op::Replace => {
                        // The application lets go first: a copy of a file with a live
                        // WAL would not hold its frames.
                        drop(app.take());
                        let copy = m.path("copy.db");
                        std::fs::copy(&local, &copy).expect("copy");
                        std::fs::rename(&copy, &local).expect("replace");
                    }
                }
            }
            Ok(())
        })
        .expect("every pull right or refused");
    assert!(
        sealed_pulls.get() > 0,
        "no pull was sealed: the fast path was never taken"
    );
}
