//! A full disk under encrypted pulls and pushes, with real `sqlferry` processes and a
//! real tmpfs of a few MB (mounted by the test: CI runs as root; a test that cannot
//! mount fails, it never skips). The pulling machine's LOCAL and its own state (the
//! local history, seals, saved keys) are on the tmpfs, as on a machine with one disk.
//!
//! - A pull of an encrypted version (a key file, a passphrase; plaintext too; from the
//!   embedded store or a real `sqlferry serve`) into a new LOCAL on a disk that fills
//!   up half-way fails with one line saying the disk is full and what to do, exit 3,
//!   and leaves no LOCAL and no temporary file beside it; with room again the same
//!   pull succeeds and its digest is the origin's.
//! - The same into a LOCAL holding an older version that a reader has open (WAL), or
//!   in rollback mode: LOCAL keeps its rows and `PRAGMA integrity_check` says ok, the
//!   reader reads on, and with room again a plain pull (no `--force`) brings the new
//!   version.
//! - An encrypted push into an embedded store on a full disk fails the same way; the
//!   store's versions are as they were, and with room again a plain push makes the next
//!   version, pulled back equal to the origin.
//! - Pulls and pushes killed (SIGKILL) while the disk is full, at a few points: the
//!   next plain pull or push, once there is room, succeeds and leaves nothing behind.
//! - A push or pull whose local history is on a full disk (LOCAL and the store
//!   elsewhere) records into the room the syncs before it kept (`history/room/`); one
//!   that finds no room is refused before it commits: with room again, the plain push
//!   after it never conflicts with its own version, the plain pull never refuses LOCAL.

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::encrypted::keygen;
use crate::passphrase::passphrase_file;
use crate::sealed::MARKER;
use crate::server::{DbState, Machine, Report, TestServer, assert_fails, wait_for_exit};
use crate::util::{self, Mode, Tmpfs};

const REPLICA: &str = "acme/app.db";
/// Exit code: a local file (here: its disk is full).
const EXIT_LOCAL: i32 = 3;
/// Rows of the test database: about 2.6 MB of 4 KiB pages.
const ROWS: i64 = 3000;
/// The tmpfs under the machine on a full disk: room for the database twice over once
/// the filler is gone.
const DISK: &str = "12m";
/// What the filler leaves free: less than any version of the database.
const ROOM: u64 = 1 << 20;
/// How long a command on a full disk may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// How a replica is sealed, and the arguments that say so.
#[derive(Clone, Copy, Debug)]
enum Seal {
    Key,
    Passphrase,
    Plain,
}

/// The secret's file for `seal`, made once on `origin` and read by every machine.
struct Secret(Seal, Option<PathBuf>);

impl Secret {
    fn new(seal: Seal, origin: &Machine) -> Secret {
        let file = match seal {
            Seal::Key => Some(keygen(origin, "app.key")),
            Seal::Passphrase => Some(passphrase_file(
                origin,
                "pass.txt",
                "correct horse battery staple, on a full disk",
            )),
            Seal::Plain => None,
        };
        Secret(seal, file)
    }

    fn args(&self) -> Vec<String> {
        let flag = match self.0 {
            Seal::Key => "--encryption-key-file",
            Seal::Passphrase => "--passphrase-file",
            Seal::Plain => return Vec::new(),
        };
        let file = self.1.as_ref().expect("a secret file");
        vec![flag.into(), file.to_str().expect("UTF-8 path").into()]
    }
}

/// `sqlferry ARGS --server file://STORE` with the secret's arguments, on `m`.
fn command(m: &Machine, store: &Path, secret: &Secret, args: &[&str]) -> std::process::Command {
    let mut cmd = m.command();
    cmd.args(args)
        .arg("--server")
        .arg(format!("file://{}", store.display()))
        .args(secret.args());
    cmd
}

fn run(m: &Machine, store: &Path, secret: &Secret, args: &[&str]) -> Output {
    command(m, store, secret, args)
        .output()
        .expect("run sqlferry")
}

/// The same, asserted to succeed; its `--json` report.
fn ok(m: &Machine, store: &Path, secret: &Secret, args: &[&str], what: &str) -> Report {
    let mut args = args.to_vec();
    args.push("--json");
    Report::of(&run(m, store, secret, &args), what)
}

/// The origin's database: `ROWS` notes carrying the marker, in WAL mode.
fn origin_db(m: &Machine) -> PathBuf {
    origin_db_in(m, Mode::Wal)
}

/// [`origin_db`] in `mode` (a pulled copy keeps it).
fn origin_db_in(m: &Machine, mode: Mode) -> PathBuf {
    let path = m.path("app.db");
    let conn = util::create(&path, 4096, mode);
    conn.execute_batch("CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)")
        .expect("schema");
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
         INSERT INTO notes(body) SELECT ?2 || ' ' || hex(randomblob(400)) FROM n",
        rusqlite::params![ROWS, MARKER],
    )
    .expect("notes");
    path
}

/// Rewrites every note: a version that changes every page of the table.
fn rewrite_all(db: &Path, tag: &str) {
    util::open(db)
        .execute(
            "UPDATE notes SET body = ?1 || ' ' || hex(randomblob(400))",
            [tag],
        )
        .expect("rewrite");
}

/// The first note's body: which version a database holds.
fn first_note(db: &Path) -> String {
    util::open(db)
        .query_row("SELECT body FROM notes WHERE id = 1", [], |r| r.get(0))
        .expect("note 1")
}

/// A machine whose directory (its LOCAL files and its state) is a tmpfs of `DISK`.
fn machine_on_tmpfs(root: &Path, name: &str) -> (Tmpfs, Machine) {
    let disk = Tmpfs::mount(&root.join(name), DISK);
    (disk, Machine::new(root, name))
}

/// Asserts the one error line of a full disk: exit 3, the disk named as full, what to
/// do; returns it.
fn assert_disk_full(out: &Output, dir: &Path) -> String {
    let line = assert_fails(out, EXIT_LOCAL, "is full");
    assert!(
        line.contains(&format!("the disk holding {} is full", dir.display())),
        "names the disk: {line}"
    );
    assert!(line.contains("free some space"), "says what to do: {line}");
    line
}

/// Names in `dir` that a pull into `local` may have left: LOCAL, its journal files,
/// its temporary file.
fn beside(dir: &Path, local: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(local))
        .collect();
    names.sort();
    names
}

/// The versions `sqlferry versions` lists: their numbers.
fn versions(m: &Machine, store: &Path, secret: &Secret) -> Vec<u64> {
    let out = run(m, store, secret, &["versions", REPLICA, "--json"]);
    assert_eq!(util::code(&out), 0, "versions: {}", util::stderr(&out));
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    list.iter()
        .map(|v| v["number"].as_u64().expect("a number"))
        .collect()
}

/// A pull of a new version into a new LOCAL on a full disk, then with room.
fn pull_into_a_new_file_on_a_full_disk(seal: Seal) {
    let dir = TempDir::new().expect("tempdir");
    let store = dir.path().join("store");
    let origin = Machine::new(dir.path(), "origin");
    let secret = Secret::new(seal, &origin);
    let db = origin_db(&origin);
    ok(
        &origin,
        &store,
        &secret,
        &["push", "app.db", REPLICA],
        "push",
    );

    let (disk, b) = machine_on_tmpfs(dir.path(), "b");
    let filler = disk.fill_leaving(ROOM);
    let out = run(&b, &store, &secret, &["pull", REPLICA, "copy.db"]);
    let line = assert_disk_full(&out, &b.work);
    assert!(line.contains("copy.db"), "names LOCAL: {line}");
    assert_eq!(
        beside(&b.work, "copy.db"),
        Vec::<String>::new(),
        "no LOCAL, nothing beside it"
    );

    std::fs::remove_file(&filler).expect("free the disk");
    let pulled = ok(
        &b,
        &store,
        &secret,
        &["pull", REPLICA, "copy.db"],
        "the pull with room",
    );
    let copy = b.path("copy.db");
    let digest = util::digest(&db);
    match seal {
        Seal::Plain => assert_eq!(pulled.digest(), digest),
        _ => assert_eq!(pulled.0["plaintext_digest"], digest.as_str()),
    }
    util::assert_same(&db, &copy);
    assert_eq!(beside(&b.work, "copy.db"), vec!["copy.db".to_owned()]);
}

#[test]
fn an_encrypted_pull_into_a_new_file_on_a_full_disk_leaves_nothing_then_succeeds() {
    pull_into_a_new_file_on_a_full_disk(Seal::Key);
}

#[test]
fn a_passphrase_pull_into_a_new_file_on_a_full_disk_leaves_nothing_then_succeeds() {
    pull_into_a_new_file_on_a_full_disk(Seal::Passphrase);
}

#[test]
fn a_plaintext_pull_into_a_new_file_on_a_full_disk_leaves_nothing_then_succeeds() {
    pull_into_a_new_file_on_a_full_disk(Seal::Plain);
}

/// The same pull from a real `sqlferry serve`: the client's disk is full, not the
/// server's; the error is the client's (3), never the server's (10).
#[test]
fn an_encrypted_pull_from_a_server_into_a_full_disk_leaves_nothing_then_succeeds() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let origin = Machine::new(dir.path(), "origin");
    let secret = Secret::new(Seal::Key, &origin);
    let db = origin_db(&origin);
    let on_server = |m: &Machine, args: &[&str]| {
        m.command()
            .args(args)
            .args(["--server", &server.url, "--key", &server.admin_key])
            .args(secret.args())
            .output()
            .expect("run sqlferry")
    };
    let out = on_server(&origin, &["push", "app.db", REPLICA, "--json"]);
    Report::of(&out, "push to the server");

    let (disk, b) = machine_on_tmpfs(dir.path(), "b");
    let filler = disk.fill_leaving(ROOM);
    let out = on_server(&b, &["pull", REPLICA, "copy.db"]);
    let line = assert_disk_full(&out, &b.work);
    assert!(line.contains("copy.db was not made"), "{line}");
    assert_eq!(beside(&b.work, "copy.db"), Vec::<String>::new());

    std::fs::remove_file(&filler).expect("free the disk");
    let out = on_server(&b, &["pull", REPLICA, "copy.db", "--json"]);
    let pulled = Report::of(&out, "the pull with room");
    assert_eq!(pulled.0["plaintext_digest"], util::digest(&db).as_str());
    assert_eq!(util::digest(&b.path("copy.db")), util::digest(&db));
}

/// A pull of a new version over LOCAL holding the one before, which a reader holds
/// open, on a full disk; then with room, a plain pull.
fn pull_over_an_open_older_version_on_a_full_disk(seal: Seal) {
    let dir = TempDir::new().expect("tempdir");
    let store = dir.path().join("store");
    let origin = Machine::new(dir.path(), "origin");
    let secret = Secret::new(seal, &origin);
    let db = origin_db(&origin);
    ok(
        &origin,
        &store,
        &secret,
        &["push", "app.db", REPLICA],
        "push 1",
    );

    let (disk, b) = machine_on_tmpfs(dir.path(), "b");
    ok(&b, &store, &secret, &["pull", REPLICA, "copy.db"], "pull 1");
    let copy = b.path("copy.db");
    let old = DbState::of(&copy);
    let old_note = first_note(&copy);

    rewrite_all(&db, "version two");
    ok(
        &origin,
        &store,
        &secret,
        &["push", "app.db", REPLICA],
        "push 2",
    );

    // A reader in the middle of a read transaction on LOCAL.
    let reader = util::open(&copy);
    reader.execute_batch("BEGIN").expect("begin");
    let count: i64 = reader
        .query_row("SELECT count(*) FROM notes", [], |r| r.get(0))
        .expect("read");
    assert_eq!(count, ROWS);

    let filler = disk.fill_leaving(ROOM);
    let out = run(&b, &store, &secret, &["pull", REPLICA, "copy.db"]);
    let line = assert_disk_full(&out, &b.work);
    assert!(line.contains("copy.db"), "names LOCAL: {line}");
    assert!(
        line.contains("as it was"),
        "says LOCAL is untouched: {line}"
    );

    // The reader reads on, the old version; so does a new one.
    let note: String = reader
        .query_row("SELECT body FROM notes WHERE id = 1", [], |r| r.get(0))
        .expect("the reader reads on");
    assert_eq!(note, old_note);
    reader.execute_batch("COMMIT").expect("end the read");
    drop(reader);
    old.assert_held_by(&copy, "LOCAL after the pull that found the disk full");
    assert_eq!(util::integrity(&copy), "ok");

    // With room again, a plain pull (no --force) brings version 2.
    std::fs::remove_file(&filler).expect("free the disk");
    let pulled = ok(
        &b,
        &store,
        &secret,
        &["pull", REPLICA, "copy.db"],
        "pull 2 with room",
    );
    assert_eq!(pulled.u64("version"), 2);
    util::assert_same(&db, &copy);
    assert!(first_note(&copy).starts_with("version two"));
}

#[test]
fn an_encrypted_pull_over_an_open_older_version_on_a_full_disk_changes_nothing() {
    pull_over_an_open_older_version_on_a_full_disk(Seal::Key);
}

#[test]
fn a_passphrase_pull_over_an_open_older_version_on_a_full_disk_changes_nothing() {
    pull_over_an_open_older_version_on_a_full_disk(Seal::Passphrase);
}

#[test]
fn a_plaintext_pull_over_an_open_older_version_on_a_full_disk_changes_nothing() {
    pull_over_an_open_older_version_on_a_full_disk(Seal::Plain);
}

/// The same over a LOCAL in rollback mode (its journal is what fills the disk), with
/// no reader: one would hold the commit back for its busy timeout.
#[test]
fn an_encrypted_pull_over_an_older_rollback_version_on_a_full_disk_changes_nothing() {
    let dir = TempDir::new().expect("tempdir");
    let store = dir.path().join("store");
    let origin = Machine::new(dir.path(), "origin");
    let secret = Secret::new(Seal::Key, &origin);
    let db = origin_db_in(&origin, Mode::Rollback);
    ok(
        &origin,
        &store,
        &secret,
        &["push", "app.db", REPLICA],
        "push 1",
    );
    let (disk, b) = machine_on_tmpfs(dir.path(), "b");
    ok(&b, &store, &secret, &["pull", REPLICA, "copy.db"], "pull 1");
    let copy = b.path("copy.db");
    assert_eq!(util::journal_mode(&copy), "delete");
    let old = DbState::of(&copy);
    rewrite_all(&db, "version two");
    ok(
        &origin,
        &store,
        &secret,
        &["push", "app.db", REPLICA],
        "push 2",
    );

    let filler = disk.fill_leaving(ROOM);
    let out = run(&b, &store, &secret, &["pull", REPLICA, "copy.db"]);
    let line = assert_disk_full(&out, &b.work);
    assert!(line.contains("copy.db is as it was"), "{line}");
    assert_eq!(
        beside(&b.work, "copy.db"),
        vec!["copy.db".to_owned()],
        "no journal left"
    );
    old.assert_held_by(
        &copy,
        "a rollback LOCAL after the pull that found the disk full",
    );

    std::fs::remove_file(&filler).expect("free the disk");
    let pulled = ok(
        &b,
        &store,
        &secret,
        &["pull", REPLICA, "copy.db"],
        "pull 2 with room",
    );
    assert_eq!(pulled.u64("version"), 2);
    util::assert_same(&db, &copy);
}

/// A push into an embedded store on a full disk; then with room, a plain push.
fn push_into_a_full_store(seal: Seal) {
    let dir = TempDir::new().expect("tempdir");
    let store = dir.path().join("store");
    let disk = Tmpfs::mount(&store, DISK);
    let origin = Machine::new(dir.path(), "origin");
    let secret = Secret::new(seal, &origin);
    let db = origin_db(&origin);
    ok(
        &origin,
        &store,
        &secret,
        &["push", "app.db", REPLICA],
        "push 1",
    );
    let b = Machine::new(dir.path(), "b");
    ok(&b, &store, &secret, &["pull", REPLICA, "v1.db"], "pull 1");
    let v1 = DbState::of(&b.path("v1.db"));

    rewrite_all(&db, "version two");
    let filler = disk.fill_leaving(ROOM);
    let out = run(&origin, &store, &secret, &["push", "app.db", REPLICA]);
    assert_disk_full(&out, &store);
    assert_eq!(versions(&origin, &store, &secret), vec![1], "no version 2");
    ok(
        &b,
        &store,
        &secret,
        &["pull", REPLICA, "latest.db"],
        "pull latest",
    );
    v1.assert_held_by(
        &b.path("latest.db"),
        "the latest version after the failed push",
    );

    // With room again, a plain push (no --force) makes version 2.
    std::fs::remove_file(&filler).expect("free the disk");
    let pushed = ok(
        &origin,
        &store,
        &secret,
        &["push", "app.db", REPLICA],
        "push 2 with room",
    );
    assert_eq!(pushed.u64("version"), 2);
    assert_eq!(versions(&origin, &store, &secret), vec![1, 2]);
    ok(&b, &store, &secret, &["pull", REPLICA, "v1.db"], "pull 2");
    let copy = b.path("v1.db");
    util::assert_same(&db, &copy);
    assert!(first_note(&copy).starts_with("version two"));
}

#[test]
fn an_encrypted_push_into_a_full_store_keeps_its_versions_then_succeeds() {
    push_into_a_full_store(Seal::Key);
}

#[test]
fn a_passphrase_push_into_a_full_store_keeps_its_versions_then_succeeds() {
    push_into_a_full_store(Seal::Passphrase);
}

#[test]
fn a_plaintext_push_into_a_full_store_keeps_its_versions_then_succeeds() {
    push_into_a_full_store(Seal::Plain);
}

/// Pushes and pulls whose own bookkeeping (the local history, under the machine's
/// state directory) is on a full disk, LOCAL and the store elsewhere: refused before
/// they commit, so that the next plain push or pull, with room again, finds the
/// version it last made or pulled.
fn bookkeeping_on_a_full_disk(seal: Seal) {
    let dir = TempDir::new().expect("tempdir");
    let store = dir.path().join("store");
    let home = dir.path().join("a/home");
    let disk = Tmpfs::mount(&home, DISK);
    let a = Machine::new(dir.path(), "a");
    let history = home.join("state/sqlferry/history");
    let secret = Secret::new(seal, &a);
    let db = origin_db(&a);
    ok(&a, &store, &secret, &["push", "app.db", REPLICA], "push 1");
    ok(&a, &store, &secret, &["pull", REPLICA, "copy.db"], "pull 1");
    let copy = a.path("copy.db");
    let v1 = DbState::of(&copy);

    // The room the syncs before kept for the next one's records (`history/room/`) is
    // the disk's no longer: the first push on the full disk records its version in it.
    rewrite_all(&db, "version two");
    disk.fill();
    let pushed = ok(
        &a,
        &store,
        &secret,
        &["push", "app.db", REPLICA],
        "version two",
    );
    assert_eq!(pushed.u64("version"), 2, "pushed into the room kept");
    // It made its room again (with the space its records' old files left): a push
    // that changes nothing, on that full disk, goes through.
    let again = ok(
        &a,
        &store,
        &secret,
        &["push", "app.db", REPLICA],
        "no change",
    );
    assert_eq!(again.u64("version"), 2, "no change");
    // A machine whose disk filled before the room could be made again (here: the room
    // removed and the disk filled again): a push that could not record the version it
    // makes does not make it.
    std::fs::remove_dir_all(history.join("room")).expect("remove the room");
    let filler = disk.fill();
    rewrite_all(&db, "version three");
    let out = run(&a, &store, &secret, &["push", "app.db", REPLICA]);
    let line = assert_disk_full(&out, &history);
    assert!(line.contains("nothing was pushed"), "{line}");
    assert_eq!(versions(&a, &store, &secret), vec![1, 2], "no version 3");
    let out = run(&a, &store, &secret, &["pull", REPLICA, "copy.db"]);
    let line = assert_disk_full(&out, &history);
    assert!(line.contains("copy.db is as it was"), "{line}");
    v1.assert_held_by(&copy, "LOCAL after a pull that could not be recorded");

    // With room again, plain pushes follow one another, and plain pulls too.
    std::fs::remove_file(&filler).expect("free the disk");
    let pulled = ok(
        &a,
        &store,
        &secret,
        &["pull", REPLICA, "copy.db"],
        "version two",
    );
    assert_eq!(pulled.u64("version"), 2, "version two");
    for (n, tag) in [(3, "version three"), (4, "version four")] {
        if n == 4 {
            rewrite_all(&db, tag);
        }
        let pushed = ok(&a, &store, &secret, &["push", "app.db", REPLICA], tag);
        assert_eq!(pushed.u64("version"), n, "{tag}");
        let pulled = ok(&a, &store, &secret, &["pull", REPLICA, "copy.db"], tag);
        assert_eq!(pulled.u64("version"), n, "{tag}");
        assert_eq!(util::digest(&copy), util::digest(&db), "{tag}");
    }
}

#[test]
fn an_encrypted_push_or_pull_that_could_not_be_recorded_is_refused_before_it_commits() {
    bookkeeping_on_a_full_disk(Seal::Key);
}

#[test]
fn a_plaintext_push_or_pull_that_could_not_be_recorded_is_refused_before_it_commits() {
    bookkeeping_on_a_full_disk(Seal::Plain);
}

/// Starts `cmd`, waits until `at` holds (or the command ends by itself), and kills it
/// with SIGKILL. Whether the kill landed before the command's own end.
fn kill_when(mut cmd: std::process::Command, mut at: impl FnMut() -> bool) -> bool {
    let mut child: Child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sqlferry");
    let mut ended = false;
    util::wait_until(TIMEOUT, Duration::from_millis(1), || {
        ended = child.try_wait().expect("try_wait").is_some();
        ended || at()
    });
    if !ended {
        let _ = child.kill();
    }
    let status = wait_for_exit(&mut child, TIMEOUT).expect("the killed command ends");
    status.signal() == Some(9)
}

fn len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Bytes of every file under `dir`.
fn bytes_under(dir: &Path) -> u64 {
    util::files_under(dir).iter().map(|p| len(p)).sum()
}

#[test]
fn encrypted_pulls_and_pushes_killed_on_a_full_disk_are_retried_plainly() {
    let dir = TempDir::new().expect("tempdir");
    let store = dir.path().join("store");
    let store_disk = Tmpfs::mount(&store, DISK);
    let origin = Machine::new(dir.path(), "origin");
    let secret = Secret::new(Seal::Key, &origin);
    let db = origin_db(&origin);
    ok(
        &origin,
        &store,
        &secret,
        &["push", "app.db", REPLICA],
        "push 1",
    );
    let (disk, b) = machine_on_tmpfs(dir.path(), "b");
    ok(&b, &store, &secret, &["pull", REPLICA, "old.db"], "pull 1");
    let old = b.path("old.db");
    let v1 = DbState::of(&old);
    let tmp = b.path(".new.db.sqlferry-new");
    let mut landed = Vec::new();

    // Pulls of version 1 into a new file, killed as its temporary file appears, once
    // it has taken half the room left, and as it takes the last of it (the pull may
    // end first there, failing on the full disk: either way, the same checks).
    disk.fill_leaving(ROOM);
    for bytes in [0, ROOM / 2, ROOM - (64 << 10)] {
        let cmd = command(&b, &store, &secret, &["pull", REPLICA, "new.db"]);
        landed.push(kill_when(cmd, || tmp.exists() && len(&tmp) >= bytes));
        assert!(!b.path("new.db").exists(), "no LOCAL after a killed pull");
    }
    // Version 2, every page changed, pulled over old.db: killed once its WAL grows.
    // The filler leaves the room again (what the killed pulls left takes some).
    let filler = disk.fill_leaving(ROOM);
    rewrite_all(&db, "version two");
    ok(
        &origin,
        &store,
        &secret,
        &["push", "app.db", REPLICA],
        "push 2",
    );
    let wal = util::sidecar(&old, "-wal");
    let before = len(&wal);
    let cmd = command(&b, &store, &secret, &["pull", REPLICA, "old.db"]);
    landed.push(kill_when(cmd, || len(&wal) > before));

    // With room again (a reader of LOCAL needs room too, for its shared memory): LOCAL
    // as it was; plain pulls, nothing left behind.
    std::fs::remove_file(&filler).expect("free the disk");
    v1.assert_held_by(&old, "LOCAL after a pull killed on a full disk");
    assert_eq!(util::integrity(&old), "ok");
    ok(
        &b,
        &store,
        &secret,
        &["pull", REPLICA, "new.db"],
        "pull into new.db",
    );
    assert!(!tmp.exists(), "the temporary file is gone once done");
    ok(
        &b,
        &store,
        &secret,
        &["pull", REPLICA, "old.db"],
        "plain pull into old.db",
    );
    for copy in [b.path("new.db"), old.clone()] {
        assert_eq!(util::digest(&copy), util::digest(&db), "{}", copy.display());
        assert_eq!(util::integrity(&copy), "ok");
    }

    // A push of version 3 into the full store, killed as the store grows.
    rewrite_all(&db, "version three");
    let filler = store_disk.fill_leaving(ROOM);
    let grown = bytes_under(&store);
    let cmd = command(&origin, &store, &secret, &["push", "app.db", REPLICA]);
    landed.push(kill_when(cmd, || bytes_under(&store) > grown));
    assert_eq!(
        versions(&origin, &store, &secret),
        vec![1, 2],
        "no version 3"
    );
    std::fs::remove_file(&filler).expect("free the store's disk");
    let pushed = ok(
        &origin,
        &store,
        &secret,
        &["push", "app.db", REPLICA],
        "plain push 3",
    );
    assert_eq!(pushed.u64("version"), 3);
    ok(
        &b,
        &store,
        &secret,
        &["pull", REPLICA, "old.db"],
        "plain pull 3",
    );
    assert_eq!(util::digest(&old), util::digest(&db));
    assert!(first_note(&old).starts_with("version three"));
    eprintln!("kills that landed before the command's own end: {landed:?}");
}
