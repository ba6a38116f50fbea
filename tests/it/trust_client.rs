//! The client never loses what the user wrote, as a user would find out: real
//! `sqlferry` processes, a real `sqlferry serve` (or the embedded store), real SQLite
//! files, and what a user checks afterwards (rows, digest, exit code, error text).
//!
//! - A pull into a database with changes that were never pushed is refused (exit 9)
//!   and changes nothing, in the app's own directory, after a VERSION_CONFLICT, and in
//!   a pull subscriber when another program wrote its database; `--dry-run` says so.
//! - A push's base is kept per (database, replica, store).
//! - A database whose key is saved for a server is pushed there without `--server`.
//! - Concurrent first pushes keep every PUSH key.
//! - A push subscriber whose last push failed does not exit 0.
//! - `sync-now` and `pull --subscribe` of a replica that does not exist exit 8.
//! - A push of a database that fails `PRAGMA quick_check` is refused (exit 7).
//! - A push whose answer is lost after its commit finds its version, or says it was
//!   committed, and its advice loses nothing.

use std::path::Path;
use std::process::Output;

use tempfile::TempDir;

use crate::server::{
    EXIT_CONFLICT, EXIT_NOT_FOUND, Machine, TestServer, assert_fails, saved_push_key,
};
use crate::subscribe::{Subscriber, commit_rows, first_push, max_id, writer_db};
use crate::util;

/// Exit code: a check failed (digest, integrity, quick_check).
const EXIT_VERIFY: i32 = 7;
/// Exit code: LOCAL has changes that were never pushed.
const EXIT_LOCAL_CHANGES: i32 = 9;

fn run(m: &Machine, args: &[&str]) -> Output {
    m.run(args)
}

/// The database's rows of `w`, for "intact" checks.
fn rows(path: &Path) -> u64 {
    util::open(path)
        .query_row("SELECT count(*) FROM w", [], |r| r.get::<_, i64>(0))
        .expect("count rows") as u64
}

#[test]
fn a_pull_over_changes_never_pushed_is_refused_and_changes_nothing() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path());
    let m = Machine::new(dir.path(), "m");
    let app = m.path("app.db");
    writer_db(&app, 10);
    first_push(&server, &m, "app.db", "demo/app.db");
    // The seen case: 20 more rows, then `pull demo/app.db` in the app's directory.
    commit_rows(&app, 11..=30);
    let before = util::digest(&app);
    let out = m.run_on(&server, ["pull", "demo/app.db"]);
    let line = assert_fails(&out, EXIT_LOCAL_CHANGES, "never pushed");
    for advice in [
        "sqlferry push ",
        "demo/app.db",
        "--force",
        "another file",
        "app.pulled.db",
    ] {
        assert!(line.contains(advice), "the refusal says {advice:?}: {line}");
    }
    assert_eq!(rows(&app), 30, "rows intact");
    assert_eq!(util::digest(&app), before, "not a byte changed");
    assert_eq!(util::integrity(&app), "ok");

    // --dry-run says the same, with the same exit status, and changes nothing.
    let out = m.run_on(&server, ["pull", "demo/app.db", "--dry-run"]);
    assert_eq!(
        util::code(&out),
        EXIT_LOCAL_CHANGES,
        "{}",
        util::stderr(&out)
    );
    let said = util::stdout(&out);
    assert!(
        said.contains("would pull demo/app.db@1") && said.contains("refused"),
        "{said}"
    );
    assert!(!said.contains(&server.admin_key), "keys are masked: {said}");
    assert_eq!(util::digest(&app), before);

    // The advice works: pulling into another file keeps LOCAL and brings version 1.
    let other = m.run_on(&server, ["pull", "demo/app.db", "app.pulled.db"]);
    assert_eq!(util::code(&other), 0, "{}", util::stderr(&other));
    assert_eq!(rows(&m.path("app.pulled.db")), 10);

    // A LOCAL never synced with the replica that differs from the version is refused
    // too; a new file is not.
    writer_db(&m.path("stranger.db"), 3);
    let out = m.run_on(&server, ["pull", "demo/app.db", "stranger.db"]);
    assert_fails(&out, EXIT_LOCAL_CHANGES, "never pushed to or pulled from");
    assert_eq!(rows(&m.path("stranger.db")), 3);

    // Another client moves the replica on; our push is refused (VERSION_CONFLICT), and
    // the pull still refuses to lose the 20 rows.
    let b = Machine::new(dir.path(), "b");
    writer_db(&b.path("app.db"), 50);
    let out = b.run_on(
        &server,
        [
            "push",
            "app.db",
            "demo/app.db",
            "--force",
            "--key",
            &server.admin_key,
        ],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let out = m.run_on(&server, ["push", "app.db", "demo/app.db"]);
    assert_eq!(util::code(&out), EXIT_CONFLICT, "{}", util::stderr(&out));
    let out = m.run_on(&server, ["pull", "demo/app.db"]);
    assert_fails(&out, EXIT_LOCAL_CHANGES, "--force");
    assert_eq!(rows(&app), 30, "rows intact after the conflict");
    // No advice left that loses them.
    let help = util::stdout(&m.run(["push", "--help"]));
    assert!(!help.contains("pull first"), "{help}");

    // --force overwrites, as told; then a pull of an unchanged LOCAL just works.
    let out = m.run_on(&server, ["pull", "demo/app.db", "--force"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert_eq!(rows(&app), 50);
    let out = m.run_on(&server, ["pull", "demo/app.db"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
}

#[test]
fn a_pull_subscriber_refuses_to_overwrite_what_another_program_wrote() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path());
    let m = Machine::new(dir.path(), "m");
    writer_db(&m.path("app.db"), 5);
    first_push(&server, &m, "app.db", "acme/app.db");
    let f = Machine::new(dir.path(), "f");
    let key = &server.admin_key;
    let mut follower = Subscriber::start(
        &f,
        &[
            "pull",
            "acme/app.db",
            "copy.db",
            "--subscribe",
            "--server",
            &server.url,
            "--key",
            key,
        ],
    );
    follower.expect(&["pull (start): version 1"]);
    commit_rows(&m.path("app.db"), 6..=7);
    let out = m.run_on(&server, ["push", "app.db", "acme/app.db"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    follower.expect(&["version 2"]);
    assert_eq!(max_id(&f.path("copy.db")), 7);
    // Someone else writes the follower's database; then a new version lands.
    commit_rows(&f.path("copy.db"), 100..=101);
    commit_rows(&m.path("app.db"), 8..=8);
    let out = m.run_on(&server, ["push", "app.db", "acme/app.db"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert_eq!(follower.wait(), EXIT_LOCAL_CHANGES, "{}", follower.output());
    assert!(
        follower.output().contains("never pushed"),
        "{}",
        follower.output()
    );
    assert_eq!(
        max_id(&f.path("copy.db")),
        101,
        "the other program's rows are kept"
    );
    assert_eq!(rows(&f.path("copy.db")), 9);
}

#[test]
fn a_push_to_another_replica_or_store_keeps_the_base_of_the_usual_one() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path());
    let m = Machine::new(dir.path(), "m");
    writer_db(&m.path("live.db"), 5);
    let admin = ["--key", server.admin_key.as_str()];
    let push = |replica: &str, extra: &[&str]| {
        let mut args = vec!["push", "live.db", replica];
        args.extend_from_slice(extra);
        m.run_on(&server, args)
    };
    assert_eq!(util::code(&push("prod/live.db", &admin)), 0);
    commit_rows(&m.path("live.db"), 6..=6);
    let out = push("prod/live-before-upgrade.db", &admin);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    // Another store altogether: the embedded one in a directory of its own.
    let other = format!("file://{}", dir.path().join("other-store").display());
    let out = run(&m, &["push", "live.db", "prod/live.db", "--server", &other]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    for round in 7..=8 {
        commit_rows(&m.path("live.db"), round..=round);
        let out = push("prod/live.db", &admin);
        assert_eq!(util::code(&out), 0, "round {round}: {}", util::stderr(&out));
    }
    assert_eq!(server.version_numbers("prod/live.db"), [1, 2, 3]);
    assert_eq!(server.version_numbers("prod/live-before-upgrade.db"), [1]);
}

#[test]
fn a_database_pushed_to_a_server_goes_there_without_server_flag() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path());
    let m = Machine::new(dir.path(), "m");
    writer_db(&m.path("app.db"), 5);
    first_push(&server, &m, "app.db", "acme/app.db");
    commit_rows(&m.path("app.db"), 6..=9);
    // No --server, no SQLFERRY_SERVER, no config file.
    let out = run(&m, &["push", "app.db", "acme/app.db"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(
        util::stderr(&out).contains(&server.url),
        "stderr names the server: {}",
        util::stderr(&out)
    );
    assert_eq!(server.version_numbers("acme/app.db"), [1, 2]);
    // Nothing went to this machine's embedded store.
    let out = run(
        &m,
        &[
            "versions",
            "acme/app.db",
            "--server",
            &format!(
                "file://{}",
                m.work
                    .parent()
                    .unwrap()
                    .join("home/data/sqlferry")
                    .display()
            ),
        ],
    );
    assert_eq!(util::code(&out), EXIT_NOT_FOUND, "{}", util::stdout(&out));
    // Another replica: either store could be meant, so none is picked.
    let out = run(&m, &["push", "app.db", "acme/other.db"]);
    let line = assert_fails(&out, 2, "--server");
    assert!(
        line.contains(&server.url) && line.contains("file://"),
        "{line}"
    );
    // A pull into it comes from the server too (here: already at its latest version).
    let out = run(&m, &["pull", "acme/app.db", "--json"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(
        util::stderr(&out).contains(&server.url),
        "{}",
        util::stderr(&out)
    );
    assert!(
        util::stdout(&out).contains("\"version\":2"),
        "{}",
        util::stdout(&out)
    );
    assert_eq!(max_id(&m.path("app.db")), 9);
}

#[test]
fn concurrent_first_pushes_keep_every_push_key() {
    const N: usize = 40;
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path());
    let m = Machine::new(dir.path(), "m");
    for i in 0..N {
        writer_db(&m.path(&format!("db{i}.db")), 2);
    }
    let children: Vec<_> = (0..N)
        .map(|i| {
            m.command()
                .args([
                    "push",
                    &format!("db{i}.db"),
                    &format!("acme/db{i}.db"),
                    "--server",
                    &server.url,
                    "--key",
                    &server.admin_key,
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn push")
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().expect("push ends");
        assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    }
    let mut lost = Vec::new();
    for i in 0..N {
        let db = m.work.join(format!("db{i}.db"));
        let text = std::fs::read_to_string(m.secrets_file()).expect("secrets file");
        if !text.contains(&format!("\"{}\"", db.display())) {
            lost.push(i);
            continue;
        }
        // The saved key is usable: the next push needs no key.
        let key = saved_push_key(&m, &db);
        assert!(key.starts_with("sfk_"));
        commit_rows(&db, 3..=3);
        let out = m.run_on(
            &server,
            ["push", &format!("db{i}.db"), &format!("acme/db{i}.db")],
        );
        assert_eq!(util::code(&out), 0, "db{i}: {}", util::stderr(&out));
    }
    assert!(lost.is_empty(), "keys lost for databases {lost:?}");
}

#[test]
fn a_push_subscriber_whose_last_push_failed_does_not_exit_0() {
    let dir = TempDir::new().unwrap();
    let mut server = TestServer::start(dir.path());
    let m = Machine::new(dir.path(), "m");
    writer_db(&m.path("app.db"), 3);
    first_push(&server, &m, "app.db", "acme/app.db");
    commit_rows(&m.path("app.db"), 4..=6);
    let url = server.url.clone();
    server.sigkill();
    let mut push = Subscriber::start(
        &m,
        &[
            "push",
            "app.db",
            "acme/app.db",
            "--server",
            &url,
            "--subscribe",
            "--waitIdle",
            "10s",
        ],
    );
    push.expect(&["push (start) failed"]);
    let code = push.stop();
    let said = push.output();
    assert_ne!(code, 0, "exit 0 with changes not pushed:\n{said}");
    assert_eq!(code, 4, "the failure's code (connection lost):\n{said}");
    assert!(said.contains("not pushed"), "{said}");
}

#[test]
fn sync_now_and_a_pull_subscriber_of_no_such_replica_exit_8() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path());
    let m = Machine::new(dir.path(), "m");
    let key = server.admin_key.as_str();
    let out = m.run_on(&server, ["sync-now", "acme/typo.db", "--key", key]);
    assert_fails(&out, EXIT_NOT_FOUND, "does not exist");
    let mut follower = Subscriber::start(
        &m,
        &[
            "pull",
            "acme/typo.db",
            "--subscribe",
            "--server",
            &server.url,
            "--key",
            key,
        ],
    );
    assert_eq!(follower.wait(), EXIT_NOT_FOUND, "{}", follower.output());
    assert!(
        follower.output().contains("does not exist"),
        "{}",
        follower.output()
    );
    // The embedded store too.
    let out = run(&m, &["sync-now", "acme/typo.db"]);
    assert_fails(&out, EXIT_NOT_FOUND, "does not exist");
    let mut follower = Subscriber::start(&m, &["pull", "acme/typo.db", "--subscribe"]);
    assert_eq!(follower.wait(), EXIT_NOT_FOUND, "{}", follower.output());
    assert!(!m.path("typo.db").exists(), "nothing was created");
}

/// A database of `w` rows whose table b-tree is damaged: garbage over the cell pointers
/// of one of its leaves. SQLite still reads its pages; `PRAGMA quick_check` fails.
fn damaged_db(path: &Path) {
    writer_db(path, 2000);
    util::checkpoint(path);
    let mut bytes = std::fs::read(path).expect("read db");
    let leaves: Vec<usize> = (2..=bytes.len() / 4096)
        .filter(|pgno| bytes[(pgno - 1) * 4096] == 0x0d)
        .collect();
    assert!(leaves.len() > 4, "the table has leaf pages");
    let at = (leaves[leaves.len() / 2] - 1) * 4096;
    bytes[at + 8..at + 40].fill(0xaa);
    std::fs::write(path, &bytes).expect("write damaged copy");
    assert_ne!(util::integrity(path), "ok", "the damage is seen");
}

#[test]
fn a_push_of_a_damaged_database_is_refused_unless_allowed() {
    let dir = TempDir::new().unwrap();
    let m = Machine::new(dir.path(), "m");
    writer_db(&m.path("good.db"), 5);
    // A good backup and a good replica exist.
    let out = run(&m, &["push", "good.db", "./backup.db"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let out = run(&m, &["push", "good.db", "acme/app.db"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let backup = util::digest(&m.path("backup.db"));
    damaged_db(&m.path("bad.db"));
    // --dry-run says so, with the real run's exit status.
    for dest in ["./backup.db", "acme/app.db"] {
        let out = run(&m, &["push", "bad.db", dest, "--dry-run"]);
        assert_eq!(util::code(&out), EXIT_VERIFY, "{}", util::stderr(&out));
        assert!(
            util::stdout(&out).contains("quick_check"),
            "{}",
            util::stdout(&out)
        );
    }
    for dest in ["./backup.db", "acme/app.db"] {
        let out = run(&m, &["push", "bad.db", dest, "--force"]);
        let line = assert_fails(&out, EXIT_VERIFY, "quick_check");
        assert!(line.contains("--allow-corrupt"), "{line}");
    }
    assert_eq!(
        util::digest(&m.path("backup.db")),
        backup,
        "the backup is untouched"
    );
    // The local copy checks SRC while its pages are already on their way: a new DEST
    // is not left behind, whole or in part.
    let out = run(&m, &["push", "bad.db", "./fresh.db"]);
    let line = assert_fails(&out, EXIT_VERIFY, "quick_check");
    assert!(line.contains("--allow-corrupt"), "{line}");
    for name in [
        "fresh.db",
        "fresh.db-journal",
        "fresh.db-wal",
        ".fresh.db.sqlferry-new",
    ] {
        assert!(!m.path(name).exists(), "{name} was left behind");
    }
    let versions = run(&m, &["versions", "acme/app.db", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&versions.stdout).expect("JSON");
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(1),
        "no new version: {list}"
    );
    let out = run(&m, &["push", "bad.db", "./backup.db", "--allow-corrupt"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert_eq!(
        util::digest(&m.path("backup.db")),
        util::digest(&m.path("bad.db"))
    );
    let out = run(
        &m,
        &[
            "push",
            "bad.db",
            "acme/app.db",
            "--force",
            "--allow-corrupt",
        ],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
}

#[test]
fn a_base_recorded_before_records_were_kept_per_replica_is_still_used() {
    use sha2::Digest as _;
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path());
    let m = Machine::new(dir.path(), "m");
    writer_db(&m.path("app.db"), 5);
    first_push(&server, &m, "app.db", "acme/app.db");
    // What an older sqlferry left: only the per-database record, named by the SHA-256
    // of the database's path.
    let db = m.work.canonicalize().unwrap().join("app.db");
    let old_name = format!(
        "{}.json",
        &sqlferry::digest::hex(&sha2::Sha256::digest(db.as_os_str().as_encoded_bytes()))[..32]
    );
    let history = m.work.parent().unwrap().join("home/state/sqlferry/history");
    let mut kept = 0;
    for entry in std::fs::read_dir(&history).expect("history dir") {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() == old_name.as_str() {
            kept += 1;
        } else if path.is_dir() {
            // The room kept for records (`history/room/`), which it had not either.
            std::fs::remove_dir_all(path).unwrap();
        } else {
            std::fs::remove_file(path).unwrap();
        }
    }
    assert_eq!(kept, 1, "the per-database record is where it was");
    commit_rows(&m.path("app.db"), 6..=6);
    let out = m.run_on(&server, ["push", "app.db", "acme/app.db"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert_eq!(server.version_numbers("acme/app.db"), [1, 2]);
}

#[test]
fn a_pull_into_a_database_created_but_never_written_needs_no_force() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path());
    let m = Machine::new(dir.path(), "m");
    writer_db(&m.path("app.db"), 10);
    first_push(&server, &m, "app.db", "demo/app.db");
    // What an application leaves when it opens its database before any table exists:
    // one page, an empty schema. It holds nothing a pull could lose.
    let fresh = m.path("fresh.db");
    let conn = util::open(&fresh);
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .expect("journal_mode");
    assert_eq!(mode, "wal");
    drop(conn);
    assert!(std::fs::metadata(&fresh).expect("created").len() > 0);
    let out = m.run_on(&server, ["pull", "demo/app.db", "fresh.db"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert_eq!(rows(&fresh), 10);
    assert_eq!(util::integrity(&fresh), "ok");
}

#[test]
fn a_pull_killed_after_its_commit_does_not_refuse_the_next_pull() {
    // bench/trials.py's case: a pull killed after LOCAL committed the new version but
    // before the sync was recorded. LOCAL holds exactly the version: nothing to lose.
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path());
    let m = Machine::new(dir.path(), "m");
    writer_db(&m.path("app.db"), 10);
    first_push(&server, &m, "app.db", "demo/app.db");
    let r = Machine::new(dir.path(), "r");
    let key = server.admin_key.clone();
    r.pull(&server, "demo/app.db", Some("copy.db"), &["--key", &key]);
    commit_rows(&m.path("app.db"), 11..=20);
    m.push(&server, "app.db", "demo/app.db", &[]);
    // The pull of version 2 lands, but the machine is left as if killed before it
    // recorded it: its history still says version 1.
    let before = r.state();
    r.pull(&server, "demo/app.db", Some("copy.db"), &["--key", &key]);
    for (path, bytes) in &before {
        std::fs::write(path, bytes).expect("restore the machine's state");
    }
    let out = r.run_on(&server, ["pull", "demo/app.db", "copy.db", "--key", &key]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert_eq!(rows(&r.path("copy.db")), 20);
}

/// The same for an encrypted replica, whose versions' digests are over page identities
/// (a file cannot be compared with them without the key): the next pull goes ahead, and
/// a file holding changes that were never pushed is still refused.
#[test]
fn an_encrypted_pull_killed_after_its_commit_does_not_refuse_the_next_pull() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path());
    let m = Machine::new(dir.path(), "m");
    let key_file = crate::encrypted::keygen(&m, "app.key");
    let key_arg = key_file.to_str().expect("utf-8 path").to_owned();
    let admin = server.admin_key.clone();
    writer_db(&m.path("app.db"), 10);
    m.push(
        &server,
        "app.db",
        "demo/app.db",
        &["--key", &admin, "--encryption-key-file", &key_arg],
    );
    let r = Machine::new(dir.path(), "r");
    let pull = |spec: &str| {
        r.run_on(
            &server,
            [
                "pull",
                spec,
                "copy.db",
                "--key",
                &admin,
                "--encryption-key-file",
                &key_arg,
            ],
        )
    };
    let out = pull("demo/app.db");
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    commit_rows(&m.path("app.db"), 11..=20);
    m.push(
        &server,
        "app.db",
        "demo/app.db",
        &["--key", &admin, "--encryption-key-file", &key_arg],
    );
    // The pull of version 2 lands, and the machine is left as if killed before it
    // recorded it: its history still says version 1.
    let before = r.state();
    let out = pull("demo/app.db");
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    for (path, bytes) in &before {
        std::fs::write(path, bytes).expect("restore the machine's state");
    }
    let out = pull("demo/app.db");
    assert_eq!(
        util::code(&out),
        0,
        "the same version again: {}",
        util::stderr(&out)
    );
    assert_eq!(rows(&r.path("copy.db")), 20);
    assert_eq!(util::integrity(&r.path("copy.db")), "ok");
    // Changes that were never pushed are still refused, the file left as it is.
    commit_rows(&r.path("copy.db"), 21..=22);
    let bytes = std::fs::read(r.path("copy.db")).expect("read");
    let out = pull("demo/app.db");
    assert_eq!(util::code(&out), 9, "{}", util::stderr(&out));
    assert!(
        util::stderr(&out).contains("has changes that were never pushed"),
        "{}",
        util::stderr(&out)
    );
    assert_eq!(std::fs::read(r.path("copy.db")).expect("read"), bytes);
}

/// Through a real server the source check runs beside the scan and is answered before
/// COMMIT: a damaged LOCAL is refused (exit 7) and the server stores no version; with
/// the server out of reach the push still says the database is damaged, not that the
/// connection failed.
#[test]
fn a_damaged_database_pushed_to_a_server_is_refused_before_commit() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path());
    let m = Machine::new(dir.path(), "m");
    damaged_db(&m.path("bad.db"));
    let out = m
        .command()
        .args(["push", "bad.db", "acme/bad.db", "--server", &server.url])
        .args(["--key", &server.admin_key])
        .output()
        .expect("push");
    let line = assert_fails(&out, EXIT_VERIFY, "quick_check");
    assert!(line.contains("--allow-corrupt"), "{line}");
    let out = m
        .command()
        .args(["versions", "acme/bad.db", "--server", &server.url])
        .args(["--key", &server.admin_key])
        .output()
        .expect("versions");
    assert_fails(&out, EXIT_NOT_FOUND, "does not exist");

    let out = m
        .command()
        .args([
            "push",
            "bad.db",
            "acme/bad.db",
            "--server",
            "ws://127.0.0.1:1",
        ])
        .args(["--key", &server.admin_key])
        .output()
        .expect("push");
    assert_fails(&out, EXIT_VERIFY, "quick_check");
}

/// A server whose push session ends after its commit and before its answer (the
/// connection lost at that moment): the client finds the version it made by its digest
/// and succeeds as if answered; a first push's new keys, lost with the answer, are said
/// so, and the advice (`--new-keys`) gets new ones. No version is made twice.
#[test]
fn a_push_whose_answer_is_lost_after_its_commit_finds_its_version() {
    let dir = TempDir::new().unwrap();
    let mut server = TestServer::start_env(dir.path(), &[("SQLFERRY_DEBUG_PANIC", "answer")]);
    let m = Machine::new(dir.path(), "m");
    let app = m.path("app.db");
    writer_db(&app, 5);
    let push = |extra: &[&str]| {
        m.run_on(
            &server,
            ["push", "app.db", "acme/app.db", "--json"]
                .iter()
                .chain(extra.iter()),
        )
    };
    let out = push(&["--key", &server.admin_key]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(
        util::stdout(&out).contains("\"version\":1"),
        "{}",
        util::stdout(&out)
    );
    let said = util::stderr(&out);
    assert!(said.contains("answer was lost"), "{said}");
    assert!(said.contains("--new-keys"), "{said}");
    commit_rows(&app, 6..=8);
    let out = push(&["--key", &server.admin_key]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(
        util::stdout(&out).contains("\"version\":2"),
        "{}",
        util::stdout(&out)
    );

    // The advice, on a server that answers again: new keys, then pushes without a key.
    server.restart();
    let out = m.run_on(
        &server,
        [
            "push",
            "app.db",
            "acme/app.db",
            "--key",
            &server.admin_key,
            "--new-keys",
        ],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(saved_push_key(&m, &app).starts_with("sfk_"));
    commit_rows(&app, 9..=9);
    let out = m.run_on(&server, ["push", "app.db", "acme/app.db"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert_eq!(server.version_numbers("acme/app.db"), vec![1, 2, 3]);
    m.pull(&server, "acme/app.db", Some("copy.db"), &[]);
    assert_eq!(max_id(&m.path("copy.db")), 9);
    assert_eq!(util::integrity(&m.path("copy.db")), "ok");
}

/// A server killed after a push's commit and before its answer: the push cannot look
/// its version up; it says it was committed, names the digest, and keeps the push in
/// its history. The next push finds that version and builds on it: an unchanged LOCAL
/// is already there, a changed one makes the next version (no VERSION_CONFLICT with
/// its own version, no `--force`), and the pulled copy has every row.
#[test]
fn a_push_whose_server_dies_after_its_commit_is_built_on_by_the_next() {
    built_on_by_the_next(false);
}

/// The same on an encrypted replica, which can be neither forced nor merged over: its
/// conflict with its own version would have no way out but pulling into another file.
#[test]
fn an_encrypted_push_whose_server_dies_after_its_commit_is_built_on_by_the_next() {
    built_on_by_the_next(true);
}

fn built_on_by_the_next(encrypted: bool) {
    let dir = TempDir::new().unwrap();
    let paused = dir.path().join("paused");
    let pause = [
        ("SQLFERRY_DEBUG_PAUSE", "answer"),
        ("SQLFERRY_DEBUG_PAUSE_FILE", paused.to_str().expect("UTF-8")),
    ];
    let mut server = TestServer::start(dir.path());
    let m = Machine::new(dir.path(), "m");
    let app = m.path("app.db");
    writer_db(&app, 5);
    let key_file = encrypted.then(|| crate::encrypted::keygen(&m, "app.key"));
    let enc: Vec<&str> = match &key_file {
        Some(f) => vec!["--encryption-key-file", f.to_str().expect("UTF-8")],
        None => Vec::new(),
    };
    let push = |server: &TestServer, extra: &[&str]| {
        let args = ["push", "app.db", "acme/app.db"];
        m.run_on(server, args.iter().chain(extra).chain(&enc))
    };
    let out = push(&server, &["--key", &server.admin_key]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let kept = || {
        let history = m.state_home().join("sqlferry/history");
        std::fs::read_dir(history)
            .expect("the history")
            .filter(|e| {
                let name = e.as_ref().expect("entry").file_name();
                name.to_string_lossy().ends_with(".unanswered")
            })
            .count()
    };
    let killed_after_commit = |server: &mut TestServer, rows| {
        server.restart_env(&pause);
        commit_rows(&app, rows);
        let push = m
            .command()
            .args(["push", "app.db", "acme/app.db", "--server", &server.url])
            .args(&enc)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the push");
        assert!(
            util::wait_until(
                std::time::Duration::from_secs(60),
                std::time::Duration::from_millis(20),
                || paused.exists()
            ),
            "the server reached its answer"
        );
        server.sigkill();
        let _ = std::fs::remove_file(&paused);
        let out = push.wait_with_output().expect("the push ends");
        let err = crate::server::assert_fails(&out, crate::server::EXIT_NETWORK, "committed");
        server.restart();
        err
    };

    let err = killed_after_commit(&mut server, 6..=7);
    for said in [
        "sqlferry versions acme/app.db --json",
        "holding digest ",
        "The next push of this database finds that version and builds on it",
    ] {
        assert!(err.contains(said), "{said}: {err}");
    }
    assert_eq!(kept(), 1, "the unanswered push is kept");
    // Twice in a row: the next push builds on version 2 and is killed after its
    // commit too; its record names version 2, past the history's base.
    let err = killed_after_commit(&mut server, 8..=9);
    assert_eq!(kept(), 1);
    let digest = err
        .split("holding digest ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the error names the digest")
        .to_owned();
    let latest = server
        .versions("acme/app.db")
        .expect("versions")
        .pop()
        .expect("a latest version");
    assert_eq!((latest.number, latest.base), (3, 2));
    assert!(latest.has_digest(&digest), "{digest}: {latest:?}");
    // A database changed after the lost answers makes the next version.
    commit_rows(&app, 10..=10);
    let out = push(&server, &["--json"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(
        util::stdout(&out).contains("\"version\":4"),
        "{}",
        util::stdout(&out)
    );
    assert_eq!(kept(), 0, "forgotten once a push recorded");

    // An unchanged one finds its version already there.
    killed_after_commit(&mut server, 11..=11);
    let out = push(&server, &[]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(
        util::stdout(&out).contains("already at version 5"),
        "{}",
        util::stdout(&out)
    );
    assert_eq!(kept(), 0);
    assert_eq!(server.version_numbers("acme/app.db"), vec![1, 2, 3, 4, 5]);
    m.pull(&server, "acme/app.db", Some("copy.db"), &enc);
    assert_eq!(max_id(&m.path("copy.db")), 11);
    assert_eq!(util::integrity(&m.path("copy.db")), "ok");
}
