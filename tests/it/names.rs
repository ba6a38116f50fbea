//! Which store an argument names, as a user meets it: never guessed.
//!
//! - `push app.db backups/app.db` while `backups/` exists here is refused (exit 2) with
//!   the two spellings that say which, and writes nothing: no file, no replica, no key.
//! - `./backups/app.db` is the file; `--replica backups/app.db` the replica; a bare
//!   `backup.db` that is no file says to write `./backup.db`.
//! - `pull` and `verify` follow the same rule; `pull` of a local file says to push it.
//! - `push LOCAL REMOTE REMOTE…`: every destination gets the database (rows, digest),
//!   each line names its store; one failing does not stop the others and the exit code
//!   is the first failure's; `--json` prints one object per destination.
//! - `push LOCAL REMOTE REMOTE… --subscribe`: a push subscriber per destination, each
//!   line prefixed with its destination; a change reaches both.
//!
//! Every command runs the real binary in a `Machine`'s working directory, with its own
//! XDG directories (its embedded store is `~/data/sqlferry` there).

use std::path::Path;

use tempfile::TempDir;

use crate::server::{DbState, EXIT_USAGE, Machine, TestServer, assert_fails, exec, small_db};
use crate::subscribe::Subscriber;
use crate::util;

/// Exit code: a local file could not be read or written.
const EXIT_LOCAL: i32 = 3;

/// A machine with `app.db` (a small WAL database) and an empty directory `backups/`.
fn machine(dir: &TempDir) -> Machine {
    let m = Machine::new(dir.path(), "m");
    small_db(&m.path("app.db"), 64 << 10);
    std::fs::create_dir(m.path("backups")).expect("mkdir backups");
    m
}

/// The names in a directory (none when it does not exist).
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| {
                    e.expect("dir entry")
                        .file_name()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The embedded store's replicas on `m`, as `sqlferry` lists none: the files under its
/// store directory (empty when no replica was ever made).
fn store_files(m: &Machine) -> Vec<String> {
    let data = m
        .work
        .parent()
        .expect("machine dir")
        .join("home/data/sqlferry");
    names_in(&data)
}

/// stdout as lines.
fn lines(out: &std::process::Output) -> Vec<String> {
    util::stdout(out).lines().map(str::to_owned).collect()
}

#[test]
fn a_path_whose_directory_exists_is_refused_with_both_spellings_and_nothing_written() {
    let dir = TempDir::new().expect("tempdir");
    let m = machine(&dir);
    let before = m.state();

    let out = m.run(["push", "app.db", "backups/app.db"]);
    let line = assert_fails(&out, EXIT_USAGE, "could be the local file ./backups/app.db");
    assert!(line.contains("--replica backups/app.db"), "{line}");
    assert!(
        line.contains("write ./backups/app.db for the file"),
        "{line}"
    );
    assert!(
        line.contains("the directory backups/ exists here"),
        "{line}"
    );

    assert_eq!(
        names_in(&m.path("backups")),
        Vec::<String>::new(),
        "no file"
    );
    assert_eq!(store_files(&m), Vec::<String>::new(), "no replica");
    assert!(
        m.state() == before,
        "nothing under the machine's XDG directories changed"
    );

    // The same name among several destinations: refused before anything is pushed.
    let out = m.run(["push", "app.db", "./copy.db", "backups/app.db"]);
    assert_fails(&out, EXIT_USAGE, "--replica backups/app.db");
    assert!(
        !m.path("copy.db").exists(),
        "the valid destination was not pushed either"
    );

    // pull and verify read the name by the same rule.
    let out = m.run(["pull", "backups/app.db", "back.db"]);
    assert_fails(
        &out,
        EXIT_USAGE,
        "write --replica backups/app.db for the replica",
    );
    assert!(!m.path("back.db").exists());
    let out = m.run(["verify", "backups/app.db"]);
    let line = assert_fails(&out, EXIT_USAGE, "--replica backups/app.db");
    assert!(line.contains("./backups/app.db"), "{line}");
}

#[test]
fn dot_slash_makes_a_file_and_replica_flag_makes_a_replica() {
    let dir = TempDir::new().expect("tempdir");
    let m = machine(&dir);
    let state = DbState::of(&m.path("app.db"));

    let out = m.run(["push", "app.db", "./backups/app.db"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let said = lines(&out);
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(
        said[0].starts_with("pushed app.db to ./backups/app.db (a local file): "),
        "the line names the file: {said:?}"
    );
    state.assert_held_by(&m.path("backups/app.db"), "the local copy");
    assert_eq!(store_files(&m), Vec::<String>::new(), "no replica");

    // Now backups/app.db exists: it is that file, plainly.
    let out = m.run(["push", "app.db", "backups/app.db"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(
        util::stdout(&out).starts_with("pushed app.db to backups/app.db (a local file): 0 of "),
        "{}",
        util::stdout(&out)
    );

    // --replica: the replica of that name, whatever exists here.
    std::fs::remove_file(m.path("backups/app.db")).expect("rm copy");
    let out = m.run([
        "push",
        "app.db",
        "--replica",
        "backups/app.db",
        "-m",
        "first",
    ]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(
        util::stdout(&out).starts_with(
            "pushed app.db to backups/app.db in the embedded store (~/data/sqlferry): version 1 ("
        ),
        "the line names the embedded store: {}",
        util::stdout(&out)
    );
    assert!(!m.path("backups/app.db").exists(), "no file was written");

    // Back with pull --replica (LOCAL follows alone); the JSON names the store.
    let out = m.run(["pull", "--replica", "backups/app.db", "back.db", "--json"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let report: serde_json::Value =
        serde_json::from_str(util::stdout(&out).trim()).expect("one JSON object");
    assert_eq!(report["replica"], "backups/app.db");
    assert_eq!(report["version"], 1);
    let store = report["store"].as_str().expect("store");
    assert!(
        store.starts_with("file:///") && store.ends_with("/home/data/sqlferry"),
        "{store}"
    );
    state.assert_held_by(&m.path("back.db"), "pulled from the replica");

    // And verify --replica checks the stored version.
    let out = m.run(["verify", "--replica", "backups/app.db@1", "--json"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let report: serde_json::Value =
        serde_json::from_str(util::stdout(&out).trim()).expect("one JSON object");
    assert_eq!(report["digest"].as_str(), Some(state.digest.as_str()));
}

#[test]
fn a_bare_name_says_to_write_dot_slash_and_a_local_file_is_no_remote_for_pull() {
    let dir = TempDir::new().expect("tempdir");
    let m = machine(&dir);
    let before = m.state();

    let out = m.run(["push", "app.db", "backup.db"]);
    let line = assert_fails(&out, EXIT_USAGE, "write ./backup.db for a local copy");
    assert!(line.contains("it needs a namespace and a name"), "{line}");
    assert!(!m.path("backup.db").exists());
    assert_eq!(store_files(&m), Vec::<String>::new(), "no replica");
    assert!(m.state() == before);

    // pull reads replicas only: a local file is refused with the command that copies it.
    let out = m.run(["pull", "app.db", "copy.db"]);
    let line = assert_fails(&out, EXIT_USAGE, "app.db is a file here, not a replica");
    assert!(line.contains("sqlferry push app.db LOCAL"), "{line}");
    assert!(!m.path("copy.db").exists());

    // verify: a bare name is a file, missing here (exit 3), as before.
    let out = m.run(["verify", "backup.db"]);
    assert_eq!(util::code(&out), EXIT_LOCAL, "{}", util::stderr(&out));
}

#[test]
fn one_push_to_a_file_and_a_replica_sends_to_both_and_each_line_names_its_store() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let m = machine(&dir);
    let state = DbState::of(&m.path("app.db"));

    let out = m.run_on(
        &server,
        [
            "push",
            "app.db",
            "./backups/app.db",
            "acme/app.db",
            "--key",
            server.admin_key.as_str(),
        ],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let said = lines(&out);
    assert_eq!(said.len(), 2, "a line per destination: {said:?}");
    assert!(
        said[0].starts_with("pushed app.db to ./backups/app.db (a local file): "),
        "{said:?}"
    );
    assert!(
        said[1].starts_with(&format!(
            "pushed app.db to acme/app.db on {}: version 1 (",
            server.url
        )),
        "{said:?}"
    );
    state.assert_held_by(&m.path("backups/app.db"), "the local copy");
    assert_eq!(server.version_numbers("acme/app.db"), [1]);
    let out = m.run_on(
        &server,
        [
            "pull",
            "acme/app.db",
            "back.db",
            "--key",
            server.admin_key.as_str(),
        ],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    state.assert_held_by(&m.path("back.db"), "pulled from the server");

    // A change, pushed to both again as JSON lines: each from its own base, so each
    // sends only what changed, and each object names its destination and store.
    crate::server::exec(
        &m.path("app.db"),
        "CREATE TABLE more(x); INSERT INTO more VALUES (1), (2);",
    );
    let state = DbState::of(&m.path("app.db"));
    let out = m.run_on(
        &server,
        [
            "push",
            "app.db",
            "./backups/app.db",
            "acme/app.db",
            "--json",
        ],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let objects: Vec<serde_json::Value> = lines(&out)
        .iter()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(objects.len(), 2, "{objects:?}");
    assert_eq!(objects[0]["destination"], "./backups/app.db");
    assert_eq!(objects[0]["store"], "./backups/app.db");
    assert_eq!(objects[1]["destination"], "acme/app.db");
    assert_eq!(objects[1]["store"], server.url.as_str());
    assert_eq!(objects[1]["version"], 2);
    for o in &objects {
        let (sent, total) = (o["pages_sent"].as_u64(), o["pages_total"].as_u64());
        assert!(sent < total, "only the changed pages: {o}");
    }
    state.assert_held_by(&m.path("backups/app.db"), "the copy, second push");
    let out = m.run_on(
        &server,
        [
            "pull",
            "acme/app.db",
            "back.db",
            "--key",
            server.admin_key.as_str(),
        ],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    state.assert_held_by(&m.path("back.db"), "the replica, second push");
}

#[test]
fn a_failing_destination_does_not_stop_the_others_and_sets_the_exit_code() {
    let dir = TempDir::new().expect("tempdir");
    let m = machine(&dir);
    let state = DbState::of(&m.path("app.db"));

    // The first destination's directory does not exist: exit 3, the replica is pushed.
    let out = m.run(["push", "app.db", "./gone/app.db", "acme/app.db", "--json"]);
    let err = util::stderr(&out);
    assert_eq!(
        util::code(&out),
        EXIT_LOCAL,
        "the first failure's code: {err}"
    );
    let err_lines: Vec<&str> = err.lines().collect();
    assert_eq!(err_lines.len(), 2, "an error line and a summary: {err}");
    assert!(
        err_lines[0].starts_with("sqlferry: error: push to ./gone/app.db: "),
        "{err}"
    );
    assert_eq!(
        err_lines[1],
        "sqlferry: error: 1 of 2 destinations failed: ./gone/app.db (exit 3); the others were pushed"
    );
    let objects: Vec<serde_json::Value> = lines(&out)
        .iter()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(objects.len(), 2, "{objects:?}");
    assert_eq!(objects[0]["destination"], "./gone/app.db");
    assert_eq!(objects[0]["exit"], EXIT_LOCAL);
    assert!(objects[0]["error"].is_string(), "{}", objects[0]);
    assert_eq!(objects[1]["destination"], "acme/app.db");
    assert_eq!(objects[1]["version"], 1);
    assert!(!m.path("gone").exists());
    let out = m.run(["pull", "acme/app.db", "back.db"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    state.assert_held_by(&m.path("back.db"), "the replica pushed after the failure");

    // Two failures: the first one's code, whichever it is, and both in the summary.
    let out = m.run(["push", "app.db", "./app.db", "./gone/b.db"]);
    let err = util::stderr(&out);
    assert_eq!(
        util::code(&out),
        EXIT_USAGE,
        "LOCAL itself came first: {err}"
    );
    assert!(
        err.contains("push to ./app.db: LOCAL and REMOTE are the same file"),
        "{err}"
    );
    assert!(
        err.ends_with(
            "sqlferry: error: 2 of 2 destinations failed: ./app.db (exit 2), ./gone/b.db \
             (exit 3); none was pushed\n"
        ),
        "{err}"
    );
    let out = m.run(["push", "app.db", "./gone/b.db", "./app.db"]);
    assert_eq!(util::code(&out), EXIT_LOCAL, "{}", util::stderr(&out));
    state.assert_held_by(&m.path("app.db"), "LOCAL is only read");

    // Several destinations take no --wait-followers, and each is named once.
    let out = m.run([
        "push",
        "app.db",
        "./copy.db",
        "acme/app.db",
        "--wait-followers",
        "1",
    ]);
    assert_fails(
        &out,
        EXIT_USAGE,
        "./copy.db, acme/app.db are several destinations",
    );
    let out = m.run(["push", "app.db", "acme/app.db", "--replica", "acme/app.db"]);
    assert_fails(&out, EXIT_USAGE, "acme/app.db is named twice");
    assert!(!m.path("copy.db").exists());
}

#[test]
fn a_push_subscriber_to_a_file_and_a_replica_keeps_both_up_to_date() {
    let dir = TempDir::new().expect("tempdir");
    let m = machine(&dir);
    let mut push = Subscriber::start(
        &m,
        &[
            "push",
            "app.db",
            "./backups/app.db",
            "acme/app.db",
            "--subscribe",
            "--wait-idle",
            "10s",
            "--max-changes",
            "1",
            "--poll",
            "1s",
        ],
    );
    push.expect_all(&[
        &["./backups/app.db: push (start): copy updated"],
        &["acme/app.db (embedded store): push (start): version 1"],
    ]);
    exec(
        &m.path("app.db"),
        "CREATE TABLE more(x); INSERT INTO more VALUES (1);",
    );
    let state = DbState::of(&m.path("app.db"));
    push.expect_all(&[
        &["./backups/app.db: push (", "copy updated"],
        &["acme/app.db (embedded store): push (", "version 2"],
    ]);
    assert_eq!(push.stop(), 0, "{}", push.output());

    state.assert_held_by(&m.path("backups/app.db"), "the copy the subscriber kept");
    let out = m.run(["pull", "acme/app.db", "back.db"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    state.assert_held_by(&m.path("back.db"), "the replica the subscriber kept");
}
