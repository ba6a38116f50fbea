//! The daemon's `passphrase_file` (docs/service.md, docs/security.md "Keys"), with real
//! `sqlferry daemon` processes, a real `sqlferry serve` on 127.0.0.1 and the embedded
//! store: a `[[push]]` and a `[[pull]]` entry with a passphrase file keep a new replica
//! (the push unit makes its salt) and its copy equal (rows, `PRAGMA integrity_check`,
//! digest), and no stored file holds the marker or the passphrase, nor any file the
//! machine keeps; pull units with a wrong passphrase, with no key, and of a replica
//! that keeps no salt yet each say why in the log and try again later (backing off),
//! their databases byte for byte as they were, and the last one follows the replica
//! once a push made its salt; an entry naming both a key file and a passphrase file is
//! refused at load, with its line; a passphrase file others may read is logged with a
//! warning naming it (never the passphrase) and used.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use crate::encrypted::{Store, notes};
use crate::passphrase::passphrase_file;
use crate::sealed::{MARKER, marked_db};
use crate::server::{EXIT_USAGE, Machine, Report, TestServer, assert_fails};
use crate::subscribe::{Subscriber, commit_rows, max_id};
use crate::util;

const REPLICA: &str = "acme/app.db";
const PASSPHRASE: &str = "correct horse battery staple";

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The `[defaults]` of a daemon file keeping replicas in `store`.
fn defaults(store: &Store<'_>) -> String {
    let (server, key) = match store {
        Store::Dir(d) => (format!("file://{}", d.display()), ""),
        Store::Server(s) => (s.url.clone(), "key_env = \"SQLFERRY_KEY\"\n"),
    };
    format!(
        "[defaults]\nserver = \"{server}\"\n{key}wait_idle = \"10s\"\nmax_changes = 1\n\
         poll = \"1s\"\n"
    )
}

/// `sqlferry ARGS --json` against `store`, asserted to succeed.
fn ok(store: &Store<'_>, m: &Machine, args: &[&str], what: &str) -> Report {
    let mut args = args.to_vec();
    args.push("--json");
    Report::of(&store.run(m, &args, &[]), what)
}

/// A daemon with a push unit and a pull unit of a new replica, both by passphrase.
fn the_daemon_keeps_a_passphrase_replica(store: Store<'_>, dir: &Path) {
    let mut m = Machine::new(dir, "host");
    if let Store::Server(server) = &store {
        m.set_env("SQLFERRY_KEY", &server.admin_key);
    }
    let db = marked_db(&m.work);
    util::open(&db)
        .execute_batch("CREATE TABLE w(id INTEGER PRIMARY KEY, at REAL NOT NULL)")
        .expect("the writer's table");
    std::fs::create_dir_all(m.path("keys")).expect("mkdir");
    std::fs::create_dir_all(m.path("copy")).expect("mkdir");
    let pass = passphrase_file(&m, "keys/pass.txt", PASSPHRASE);
    let config = format!(
        "{}\n[[push]]\ndatabase = \"app.db\"\nto = [\"{REPLICA}\"]\n\
         passphrase_file = \"keys/pass.txt\"\n\n\
         [[pull]]\nreplica = \"{REPLICA}\"\ninto = \"copy/app.db\"\n\
         passphrase_file = \"keys/pass.txt\"\n",
        defaults(&store)
    );
    std::fs::write(m.path("sqlferry.toml"), &config).expect("write the config");

    // --check reads the passphrase file but connects to nothing: no key id yet.
    let out = m.run(["daemon", "--config", "sqlferry.toml", "--check"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let check = util::stdout(&out);
    assert_eq!(
        check
            .matches(&format!("encrypted (passphrase_file {}", s(&pass)))
            .count(),
        2,
        "{check}"
    );
    assert!(!check.contains(PASSPHRASE), "{check}");

    // The push unit makes the replica's salt with its first version; the pull unit
    // (which may start before that version, and then tries again) follows it.
    let mut daemon = Subscriber::start(&m, &["daemon", "--config", "sqlferry.toml"]);
    daemon.expect_all(&[
        &["app.db -> acme/app.db", "version 1"],
        &["copy/app.db: pull (", "version 1"],
    ]);
    commit_rows(&db, 1..=3);
    daemon.expect_all(&[
        &["app.db -> acme/app.db", "version 2"],
        &["copy/app.db: pull (", "version 2"],
    ]);
    let copy = m.path("copy/app.db");
    assert!(util::wait_until(
        Duration::from_secs(30),
        Duration::from_millis(20),
        || util::digest(&copy) == util::digest(&db)
    ));
    assert_eq!(util::integrity(&copy), "ok");
    assert_eq!(max_id(&copy), 3);
    assert_eq!(notes(&copy), notes(&db));
    assert_eq!(daemon.stop(), 0, "{}", daemon.output());
    assert!(!daemon.output().contains(PASSPHRASE), "{}", daemon.output());

    // The versions are sealed with the passphrase's key: a pull with it opens the
    // latest, and one without a key is refused.
    let other = Machine::new(dir, "other");
    let opass = passphrase_file(&other, "pass.txt", PASSPHRASE);
    let pulled = ok(
        &store,
        &other,
        &["pull", REPLICA, "fresh.db", "--passphrase-file", s(&opass)],
        "a pull with the daemon's passphrase",
    );
    assert_eq!(pulled.u64("version"), 2);
    assert_eq!(util::digest(&other.path("fresh.db")), util::digest(&db));
    let out = store.run(&other, &["pull", REPLICA, "bare.db"], &[]);
    assert_eq!(
        util::code(&out),
        crate::server::EXIT_AUTH,
        "{}",
        util::stderr(&out)
    );

    // Neither the marker nor the passphrase in any stored file; the passphrase in no
    // file the machine keeps but its own.
    assert_eq!(
        util::holding(&store.files(), MARKER.as_bytes()),
        Vec::<PathBuf>::new()
    );
    assert_eq!(
        util::holding(&store.files(), PASSPHRASE.as_bytes()),
        Vec::<PathBuf>::new()
    );
    assert_eq!(
        util::holding(m.work.parent().expect("machine"), PASSPHRASE.as_bytes())
            .into_iter()
            .filter(|p| p != &pass)
            .collect::<Vec<_>>(),
        Vec::<PathBuf>::new()
    );

    // Both keys in one entry: refused at load, with the entry's line, nothing started.
    let key = crate::encrypted::keygen(&m, "keys/app.key");
    let both = config.replacen(
        "passphrase_file = \"keys/pass.txt\"",
        &format!(
            "encryption_key_file = \"{}\"\npassphrase_file = \"keys/pass.txt\"",
            s(&key)
        ),
        1,
    );
    std::fs::write(m.path("both.toml"), both).expect("write");
    let out = m.run(["daemon", "--config", "both.toml"]);
    let line = assert_fails(
        &out,
        EXIT_USAGE,
        "give encryption_key_file or passphrase_file, not both",
    );
    let at = format!(
        "both.toml:{}: [[push]] ",
        defaults(&store).lines().count() + 2
    );
    assert!(line.contains(&at), "{at}: {line}");
}

#[test]
fn the_daemon_keeps_a_passphrase_replica_on_a_server() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    the_daemon_keeps_a_passphrase_replica(Store::Server(&server), dir.path());
}

#[test]
fn the_daemon_keeps_a_passphrase_replica_in_the_embedded_store() {
    let dir = TempDir::new().expect("tempdir");
    let store = dir.path().join("store");
    the_daemon_keeps_a_passphrase_replica(Store::Dir(store), dir.path());
}

/// Pull units that cannot open the replica say why and try again, their databases
/// untouched; one whose replica gains a salt later follows it.
#[test]
fn daemon_pull_units_without_the_right_key_say_why_and_keep_their_database() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let store = Store::Server(&server);
    let origin = Machine::new(dir.path(), "origin");
    let db = marked_db(&origin.work);
    let pass = passphrase_file(&origin, "pass.txt", PASSPHRASE);
    let first = ok(
        &store,
        &origin,
        &["push", "app.db", REPLICA, "--passphrase-file", s(&pass)],
        "the first passphrase push",
    );
    let pass_id = first.0["encryption_key_id"]
        .as_str()
        .expect("a key id")
        .to_owned();
    // The replica machine holds version 1 in two databases; version 2 comes next.
    let mut m = Machine::new(dir.path(), "replica");
    m.set_env("SQLFERRY_KEY", &server.admin_key);
    std::fs::create_dir_all(m.path("keys")).expect("mkdir");
    std::fs::create_dir_all(m.path("copy")).expect("mkdir");
    let mpass = passphrase_file(&m, "keys/pass.txt", PASSPHRASE);
    for into in ["copy/a.db", "copy/b.db"] {
        ok(
            &store,
            &m,
            &["pull", REPLICA, into, "--passphrase-file", s(&mpass)],
            "the first pull",
        );
    }
    util::open(&db)
        .execute("UPDATE notes SET body = 'changed' WHERE id = 77", [])
        .expect("update");
    ok(
        &store,
        &origin,
        &["push", "app.db", REPLICA, "--passphrase-file", s(&pass)],
        "version 2",
    );
    let wrong = passphrase_file(&m, "keys/wrong.txt", "correct horse battery stapler");
    let config = format!(
        "{}\n[[pull]]\nreplica = \"{REPLICA}\"\ninto = \"copy/a.db\"\n\
         passphrase_file = \"keys/wrong.txt\"\n\n\
         [[pull]]\nreplica = \"{REPLICA}\"\ninto = \"copy/b.db\"\n\n\
         [[pull]]\nreplica = \"acme/later.db\"\ninto = \"copy/later.db\"\n\
         passphrase_file = \"keys/pass.txt\"\n",
        defaults(&store)
    );
    std::fs::write(m.path("sqlferry.toml"), config).expect("write the config");
    let (a, b) = (m.path("copy/a.db"), m.path("copy/b.db"));
    let before = |p: &Path| std::fs::read(p).expect("read");
    let (a_before, b_before) = (before(&a), before(&b));

    let mut daemon = Subscriber::start(&m, &["daemon", "--config", "sqlferry.toml"]);
    let lines = daemon.expect_all(&[
        // The wrong passphrase: the key id the version needs, the entry's file.
        &[
            "copy/a.db: failed: ",
            &pass_id,
            s(&wrong),
            "starting again in",
        ],
        // No key for an encrypted replica.
        &[
            "copy/b.db: failed: ",
            "sealed its pages",
            "no key to open them",
            "encryption_key_file or passphrase_file",
            "starting again in",
        ],
        // No salt yet: it was never pushed with a passphrase.
        &[
            "copy/later.db: failed: ",
            "keeps no passphrase salt",
            s(&mpass),
            "starting again in",
        ],
    ]);
    // Each tries again, later each time: a backoff, not a spin.
    let again = daemon.expect_all(&[
        &["copy/a.db: failed: ", &pass_id],
        &["copy/b.db: failed: ", "no key to open them"],
    ]);
    for (first, second) in lines.iter().zip(&again) {
        assert!(wait(second) >= wait(first), "{first}\n{second}");
        assert!(wait(first) >= Duration::from_millis(500), "{first}");
    }
    assert!(!daemon.output().contains(PASSPHRASE));
    // The salt appears with a first passphrase push: the unit, started again,
    // stretches with it and follows the replica.
    ok(
        &store,
        &origin,
        &[
            "push",
            "app.db",
            "acme/later.db",
            "--passphrase-file",
            s(&pass),
        ],
        "the first push of later.db",
    );
    daemon.expect(&["copy/later.db: pull (", "version 1"]);
    let later = m.path("copy/later.db");
    assert!(util::wait_until(
        Duration::from_secs(30),
        Duration::from_millis(20),
        || util::digest(&later) == util::digest(&db)
    ));
    assert_eq!(util::integrity(&later), "ok");
    assert_eq!(before(&a), a_before, "the wrong passphrase wrote copy/a.db");
    assert_eq!(before(&b), b_before, "no key wrote copy/b.db");
    assert_eq!(daemon.stop(), 0, "{}", daemon.output());
}

/// The delay a daemon's failure line names (`starting again in 1s309ms`).
pub(crate) fn wait(line: &str) -> Duration {
    let text = line
        .rsplit("starting again in ")
        .next()
        .expect("a delay")
        .trim();
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u32 = rest[..digits]
            .parse()
            .unwrap_or_else(|_| panic!("a delay: {line}"));
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else {
            panic!("a delay: {line}")
        };
        total += unit * n;
        rest = &rest[len..];
    }
    total
}

/// A `[[push]]` entry whose `passphrase_file` group and others may read (mode 0644):
/// `--check` and the daemon itself log the warning, naming the file, its mode and the
/// `chmod 600` that mends it, and never the passphrase; the file is used all the same
/// (the unit pushes version 1, which the passphrase opens). Once it is 0600, a reload
/// logs no warning.
#[test]
fn a_passphrase_file_others_may_read_is_used_with_a_warning_naming_it() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new().expect("tempdir");
    let store = Store::Dir(dir.path().join("store"));
    let m = Machine::new(dir.path(), "host");
    let db = marked_db(&m.work);
    std::fs::create_dir_all(m.path("keys")).expect("mkdir");
    let pass = passphrase_file(&m, "keys/pass.txt", PASSPHRASE);
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let config = format!(
        "{}\n[[push]]\ndatabase = \"app.db\"\nto = [\"{REPLICA}\"]\n\
         passphrase_file = \"keys/pass.txt\"\n",
        defaults(&store)
    );
    std::fs::write(m.path("sqlferry.toml"), &config).expect("write the config");
    let warning = format!(
        "the passphrase file {} may be read by other users (mode 0644): whoever reads it \
         reads every version made with it; chmod 600 {}",
        s(&pass),
        s(&pass)
    );

    let out = m.run(["daemon", "--config", "sqlferry.toml", "--check"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let err = util::stderr(&out);
    assert!(
        err.lines()
            .any(|l| l.contains("WARN") && l.contains(&warning)),
        "{err}"
    );
    assert!(!err.contains(PASSPHRASE) && !util::stdout(&out).contains(PASSPHRASE));

    let mut daemon = Subscriber::start(&m, &["daemon", "--config", "sqlferry.toml"]);
    daemon.expect(&["WARN", &warning]);
    daemon.expect(&["app.db -> acme/app.db", "version 1"]);
    assert_eq!(daemon.stop(), 0, "{}", daemon.output());
    let output = daemon.output();
    assert!(!output.contains(PASSPHRASE), "{output}");
    let other = Machine::new(dir.path(), "other");
    let opass = passphrase_file(&other, "pass.txt", PASSPHRASE);
    let pulled = ok(
        &store,
        &other,
        &["pull", REPLICA, "copy.db", "--passphrase-file", s(&opass)],
        "a pull with the passphrase",
    );
    assert_eq!(pulled.u64("version"), 1);
    assert_eq!(util::digest(&other.path("copy.db")), util::digest(&db));

    // Mode 0600: no warning.
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let out = m.run(["daemon", "--config", "sqlferry.toml", "--check"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(
        !util::stderr(&out).contains("may be read"),
        "{}",
        util::stderr(&out)
    );
}
