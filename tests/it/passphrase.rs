//! Passphrases for encrypted replicas (`--passphrase-file`, docs/security.md "Keys"),
//! with real `sqlferry` processes, into the embedded store and a real `sqlferry serve`
//! on 127.0.0.1: the first push makes the replica's salt, another machine pulls with
//! the same passphrase (rows, integrity, digest); no stored file holds the marker or
//! the passphrase; a wrong passphrase and a key file against the passphrase replica
//! exit 5 with LOCAL byte for byte unchanged; a rekey to a key file and back to a new
//! passphrase keeps every older version readable with its own; a push subscriber and
//! a pull subscriber with a passphrase push and follow a change; a passphrase file
//! others may read is used with a warning naming it; a plaintext push and a passphrase
//! push racing for a new replica of a server make one version, the loser refused with
//! the mix's message.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::encrypted::{Store, keygen, notes, read_key};
use crate::sealed::{MARKER, marked_db};
use crate::server::{Machine, Report, TestServer, assert_fails};
use crate::subscribe::Subscriber;
use crate::util;

const REPLICA: &str = "acme/app.db";
const EXIT_AUTH: i32 = 5;
const PASSPHRASE: &str = "correct horse battery staple";

/// A passphrase file `name` on `m` holding `text` and a newline, mode 0600.
pub(crate) fn passphrase_file(m: &Machine, name: &str, text: &str) -> PathBuf {
    let path = m.path(name);
    std::fs::write(&path, format!("{text}\n")).expect("write the passphrase file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// `sqlferry ARGS` against `store`, asserted to succeed; its JSON report.
fn ok(store: &Store<'_>, m: &Machine, args: &[&str], what: &str) -> Report {
    let mut args = args.to_vec();
    args.push("--json");
    Report::of(&store.run(m, &args, &[]), what)
}

fn passphrase_round_trip(store: Store<'_>) {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let origin = Machine::new(dir.path(), "origin");
    let db = marked_db(&origin.work);
    let pass = passphrase_file(&origin, "pass.txt", PASSPHRASE);

    // The first push makes the replica's salt and seals with the stretched key.
    let first = ok(
        &store,
        &origin,
        &["push", "app.db", REPLICA, "--passphrase-file", s(&pass)],
        "the first passphrase push",
    );
    assert_eq!(first.u64("version"), 1);
    let pass_id = first.0["encryption_key_id"]
        .as_str()
        .expect("a key id")
        .to_owned();
    // No stored file holds the marker, nor the passphrase.
    assert_eq!(
        util::holding(&store.files(), MARKER.as_bytes()),
        Vec::<PathBuf>::new()
    );
    assert_eq!(
        util::holding(&store.files(), PASSPHRASE.as_bytes()),
        Vec::<PathBuf>::new()
    );
    // Nor does anything this machine keeps (its config, cache and data directories,
    // the sidecar), and neither the passphrase nor the key is written there.
    assert_eq!(
        util::holding(
            origin.work.parent().expect("machine"),
            PASSPHRASE.as_bytes()
        )
        .into_iter()
        .filter(|p| p != &pass)
        .collect::<Vec<_>>(),
        Vec::<PathBuf>::new()
    );

    // Another machine pulls with the same passphrase: the same database.
    let other = Machine::new(dir.path(), "other");
    let opass = passphrase_file(&other, "pass.txt", PASSPHRASE);
    let pulled = ok(
        &store,
        &other,
        &["pull", REPLICA, "fresh.db", "--passphrase-file", s(&opass)],
        "the passphrase pull",
    );
    assert_eq!(pulled.0["encryption_key_id"], pass_id.as_str());
    let fresh = other.path("fresh.db");
    assert_eq!(util::digest(&fresh), util::digest(&db));
    assert_eq!(util::integrity(&fresh), "ok");
    assert_eq!(notes(&fresh).0, 2000);

    // Version 2; a wrong passphrase and a key file are other keys: exit 5, LOCAL
    // byte for byte as it was.
    util::open(&db)
        .execute("UPDATE notes SET body = 'changed' WHERE id = 77", [])
        .expect("update");
    let second = ok(
        &store,
        &origin,
        &["push", "app.db", REPLICA, "--passphrase-file", s(&pass)],
        "the second passphrase push",
    );
    assert_eq!(second.u64("version"), 2);
    assert!(second.u64("pages_sent") <= 4, "{}", second.0);
    // diff and versions --changes open the versions with the passphrase: one row
    // of notes updated.
    let at = |n: u32| format!("{REPLICA}@{n}");
    let diff = ok(
        &store,
        &other,
        &["diff", &at(1), &at(2), "--passphrase-file", s(&opass)],
        "diff with a passphrase",
    );
    let notes_diff = diff.0["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .find(|t| t["name"] == "notes")
        .expect("notes changed")
        .clone();
    assert_eq!(notes_diff["updated"], 1, "{notes_diff}");
    let out = store.run(
        &other,
        &[
            "versions",
            REPLICA,
            "--changes",
            "--json",
            "--passphrase-file",
            s(&opass),
        ],
        &[],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(
        util::stdout(&out).contains("\"notes\""),
        "{}",
        util::stdout(&out)
    );
    let before = std::fs::read(&fresh).expect("read");
    let wrong = passphrase_file(&other, "wrong.txt", "correct horse battery stapler");
    let out = store.run(
        &other,
        &["pull", REPLICA, "fresh.db", "--passphrase-file", s(&wrong)],
        &[],
    );
    let line = assert_fails(&out, EXIT_AUTH, &pass_id);
    assert!(line.contains("--passphrase-file"), "{line}");
    assert_eq!(std::fs::read(&fresh).expect("read"), before);
    let key_file = keygen(&other, "app.key");
    let out = store.run(
        &other,
        &[
            "pull",
            REPLICA,
            "fresh.db",
            "--encryption-key-file",
            s(&key_file),
        ],
        &[],
    );
    assert_fails(&out, EXIT_AUTH, &pass_id);
    assert_eq!(std::fs::read(&fresh).expect("read"), before);
    // A push with the key file is refused too, nothing stored.
    let out = store.run(
        &origin,
        &[
            "push",
            "app.db",
            REPLICA,
            "--encryption-key-file",
            s(&key_file),
        ],
        &[],
    );
    assert_fails(&out, EXIT_AUTH, &pass_id);

    // Rekey to the key file (version 3), then to a new passphrase (version 4): each
    // version opens with its own key, old ones included.
    let key_id = read_key(&key_file).id().to_string();
    let rekeyed = ok(
        &store,
        &origin,
        &[
            "rekey",
            REPLICA,
            "--passphrase-file",
            s(&pass),
            "--new-key-file",
            s(&key_file),
        ],
        "the rekey to a key file",
    );
    assert_eq!(rekeyed.u64("version"), 3);
    assert_eq!(rekeyed.0["encryption_key_id"], key_id.as_str());
    let pass2 = passphrase_file(&origin, "pass2.txt", "a new passphrase, 2027");
    let back = ok(
        &store,
        &origin,
        &[
            "rekey",
            REPLICA,
            "--encryption-key-file",
            s(&key_file),
            "--new-passphrase-file",
            s(&pass2),
        ],
        "the rekey to a new passphrase",
    );
    assert_eq!(back.u64("version"), 4);
    let pass2_id = back.0["encryption_key_id"].as_str().expect("id").to_owned();
    assert!(pass2_id != pass_id && pass2_id != key_id);
    let opass2 = passphrase_file(&other, "pass2.txt", "a new passphrase, 2027");
    let open = |n: u32, into: &str, flag: &str, file: &Path| {
        let at = format!("{REPLICA}@{n}");
        let r = ok(
            &store,
            &other,
            &["pull", &at, into, flag, s(file)],
            &format!("pull @{n} with {flag}"),
        );
        let got = other.path(into);
        assert_eq!(util::integrity(&got), "ok");
        (r, got)
    };
    let (r, v1) = open(1, "v1.db", "--passphrase-file", &opass);
    assert_eq!(r.0["encryption_key_id"], pass_id.as_str());
    assert_eq!(notes(&v1).0, 2000);
    assert!(notes(&v1).1.contains(MARKER));
    let (_, v3) = open(3, "v3.db", "--encryption-key-file", &key_file);
    assert_eq!(notes(&v3), (2000, "changed".into()));
    let (_, v4) = open(4, "v4.db", "--passphrase-file", &opass2);
    assert_eq!(util::digest(&v4), util::digest(&db));
    // The latest with the old passphrase alone: exit 5, naming the id it needs.
    let before = std::fs::read(&fresh).expect("read");
    let out = store.run(
        &other,
        &["pull", REPLICA, "fresh.db", "--passphrase-file", s(&opass)],
        &[],
    );
    assert_fails(&out, EXIT_AUTH, &pass2_id);
    assert_eq!(std::fs::read(&fresh).expect("read"), before);
    // Both passphrases: each version with its own.
    let out = store.run(
        &other,
        &[
            "pull",
            REPLICA,
            "fresh.db",
            "--json",
            "--passphrase-file",
            s(&opass),
            "--passphrase-file",
            s(&opass2),
        ],
        &[],
    );
    let r = Report::of(&out, "pull with both passphrases");
    assert_eq!(r.u64("version"), 4);
    assert_eq!(util::digest(&fresh), util::digest(&db));
    // The replica's salt is never changed: the stored files still hold no passphrase.
    for p in [PASSPHRASE, "a new passphrase, 2027"] {
        assert_eq!(
            util::holding(&store.files(), p.as_bytes()),
            Vec::<PathBuf>::new()
        );
    }
}

#[test]
fn a_passphrase_replica_in_the_embedded_store() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    passphrase_round_trip(Store::Dir(dir.path().join("store")));
}

#[test]
fn a_passphrase_replica_on_a_server() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    passphrase_round_trip(Store::Server(&server));
}

#[test]
fn a_passphrase_where_it_cannot_work_is_refused() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let store = Store::Dir(dir.path().join("store"));
    let m = Machine::new(dir.path(), "m");
    marked_db(&m.work);
    let pass = passphrase_file(&m, "pass.txt", PASSPHRASE);

    // A plaintext replica: a push with a passphrase is refused (exit 5), and a pull
    // with one too (the replica keeps no salt).
    ok(
        &store,
        &m,
        &["push", "app.db", "plain/app.db"],
        "plain push",
    );
    let out = store.run(
        &m,
        &[
            "push",
            "app.db",
            "plain/app.db",
            "--passphrase-file",
            s(&pass),
        ],
        &[],
    );
    assert_fails(&out, EXIT_AUTH, "not encrypted");
    let out = store.run(
        &m,
        &[
            "pull",
            "plain/app.db",
            "p.db",
            "--passphrase-file",
            s(&pass),
        ],
        &[],
    );
    assert_fails(&out, EXIT_AUTH, "keeps no passphrase salt");
    assert!(!m.path("p.db").exists());

    // A key-file replica: a passphrase pull is refused the same way.
    let key_file = keygen(&m, "app.key");
    ok(
        &store,
        &m,
        &[
            "push",
            "app.db",
            "keyed/app.db",
            "--encryption-key-file",
            s(&key_file),
        ],
        "keyed push",
    );
    let out = store.run(
        &m,
        &[
            "pull",
            "keyed/app.db",
            "k.db",
            "--passphrase-file",
            s(&pass),
        ],
        &[],
    );
    assert_fails(&out, EXIT_AUTH, "keeps no passphrase salt");

    // An empty passphrase file (exit 2) and a missing one (exit 3, an I/O error, as
    // for a missing key file), each named, before anything is sent.
    std::fs::write(m.path("empty.txt"), "\n").expect("write");
    let out = store.run(
        &m,
        &[
            "push",
            "app.db",
            "new/app.db",
            "--passphrase-file",
            "empty.txt",
        ],
        &[],
    );
    assert_fails(&out, 2, "holds no passphrase");
    let out = store.run(
        &m,
        &[
            "push",
            "app.db",
            "new/app.db",
            "--passphrase-file",
            "missing.txt",
        ],
        &[],
    );
    assert_fails(&out, 3, "cannot read the passphrase file: missing.txt");
    // A local copy stays plaintext: refused, as a key is.
    let out = m.run(["push", "app.db", "./copy.db", "--passphrase-file", s(&pass)]);
    assert_fails(&out, 2, "./copy.db is a local file");

    // A file others may read is used with a warning.
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = store.run(
        &m,
        &[
            "push",
            "app.db",
            "new/app.db",
            "--passphrase-file",
            s(&pass),
        ],
        &[],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let err = util::stderr(&out);
    assert!(
        err.contains(&format!(
            "sqlferry: warning: the passphrase file {} may be read by other users (mode \
             0644): whoever reads it reads every version made with it; chmod 600 {}",
            s(&pass),
            s(&pass)
        )),
        "{err}"
    );
    assert!(!err.contains(PASSPHRASE), "{err}");
    // --quiet and --json print no warning (docs/security.md, "Passphrases"); the file
    // is used all the same.
    for flag in ["--quiet", "--json"] {
        let out = store.run(
            &m,
            &[
                "push",
                "app.db",
                "new/app.db",
                "--passphrase-file",
                s(&pass),
                flag,
            ],
            &[],
        );
        assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
        assert!(
            !util::stderr(&out).contains("warning"),
            "{flag}: {}",
            util::stderr(&out)
        );
    }
}

#[test]
fn subscribers_push_and_pull_with_a_passphrase() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let store = Store::Server(&server);
    let origin = Machine::new(dir.path(), "origin");
    let db = marked_db(&origin.work);
    let pass = passphrase_file(&origin, "pass.txt", PASSPHRASE);
    ok(
        &store,
        &origin,
        &["push", "app.db", REPLICA, "--passphrase-file", s(&pass)],
        "first push",
    );
    let replica = Machine::new(dir.path(), "replica");
    let rpass = passphrase_file(&replica, "pass.txt", PASSPHRASE);
    let mut sub = Subscriber::start(
        &replica,
        &[
            "pull",
            REPLICA,
            "sub.db",
            "--server",
            &server.url,
            "--key",
            &server.admin_key,
            "--subscribe",
            "--passphrase-file",
            s(&rpass),
        ],
    );
    sub.expect(&["pull (start): version 1"]);
    // A push subscriber with the passphrase pushes the change it sees.
    let mut push = Subscriber::start(
        &origin,
        &[
            "push",
            "app.db",
            REPLICA,
            "--server",
            &server.url,
            "--subscribe",
            "--wait-idle",
            "10s",
            "--max-changes",
            "1",
            "--poll",
            "1s",
            "--passphrase-file",
            s(&pass),
        ],
    );
    push.expect(&["push (start): no change, still version 1"]);
    util::open(&db)
        .execute("UPDATE notes SET body = 'followed' WHERE id = 77", [])
        .expect("update");
    push.expect(&["push (changes): version 2"]);
    sub.expect(&["pull (new-version): version 2"]);
    let sub_db = replica.path("sub.db");
    assert!(util::wait_until(
        Duration::from_secs(30),
        Duration::from_millis(20),
        || util::digest(&sub_db) == util::digest(&db)
    ));
    assert_eq!(util::integrity(&sub_db), "ok");
    assert_eq!(notes(&sub_db), (2000, "followed".into()));
    assert_eq!(push.stop(), 0, "{}", push.output());

    // `sqlferry subscribe app.db` takes the passphrase the same way.
    let mut again = Subscriber::start(
        &origin,
        &[
            "subscribe",
            "app.db",
            "--wait-idle",
            "10s",
            "--max-changes",
            "1",
            "--poll",
            "1s",
            "--passphrase-file",
            s(&pass),
        ],
    );
    again.expect(&["push (start): no change"]);
    util::open(&db)
        .execute("UPDATE notes SET body = 'again' WHERE id = 77", [])
        .expect("update");
    again.expect(&["push (changes): version 3"]);
    sub.expect(&["pull (new-version): version 3"]);
    assert!(util::wait_until(
        Duration::from_secs(30),
        Duration::from_millis(20),
        || util::digest(&sub_db) == util::digest(&db)
    ));
    assert_eq!(notes(&sub_db), (2000, "again".into()));
    assert_eq!(again.stop(), 0, "{}", again.output());
    sub.stop();
}

/// The passphrase salts (salt and cost) kept in `dir`'s files: every replica file
/// holding a `passphrase` table, read as the store reads it.
fn stored_salts(dir: &Path) -> Vec<(Vec<u8>, u32, u32, u32)> {
    let mut salts = Vec::new();
    for file in util::files_under(dir) {
        let Ok(conn) = rusqlite::Connection::open_with_flags(
            &file,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        ) else {
            continue;
        };
        let Ok(mut rows) = conn
            .prepare("SELECT salt, memory_kib, passes, lanes FROM passphrase")
            .and_then(|mut st| {
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
        else {
            continue;
        };
        salts.append(&mut rows);
    }
    salts
}

/// A rekey from one passphrase straight to another keeps the replica's one salt: the
/// new key is the new passphrase stretched with it (docs/security.md, "Per replica,
/// not per key epoch"), and the versions before and after it each open with their own
/// passphrase, and only with it.
#[test]
fn a_rekey_to_a_new_passphrase_keeps_the_replicas_salt() {
    let dir = tempfile::TempDir::new().expect("tempdir");
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
        .expect("id")
        .to_owned();
    let salts = stored_salts(&store.files());
    assert_eq!(salts.len(), 1, "one salt, kept with the replica");
    let (salt, memory_kib, passes, lanes) = salts[0].clone();
    let salted = sqlferry::crypt::PassphraseSalt {
        salt: salt.as_slice().try_into().expect("16 bytes"),
        cost: sqlferry::crypt::PassphraseCost {
            memory_kib,
            passes,
            lanes,
        },
    };
    assert_eq!(
        salted
            .derive(PASSPHRASE.as_bytes())
            .expect("stretch")
            .id()
            .to_string(),
        pass_id
    );
    let v1_digest = util::digest(&db);

    let new_text = "another passphrase, after the rekey";
    let pass2 = passphrase_file(&origin, "pass2.txt", new_text);
    let rekeyed = ok(
        &store,
        &origin,
        &[
            "rekey",
            REPLICA,
            "--passphrase-file",
            s(&pass),
            "--new-passphrase-file",
            s(&pass2),
        ],
        "the rekey to a new passphrase",
    );
    assert_eq!(rekeyed.u64("version"), 2);
    let pass2_id = rekeyed.0["encryption_key_id"]
        .as_str()
        .expect("id")
        .to_owned();
    // The same salt, one row, and the new key is the new passphrase under it.
    assert_eq!(stored_salts(&store.files()), salts);
    assert_eq!(
        salted
            .derive(new_text.as_bytes())
            .expect("stretch")
            .id()
            .to_string(),
        pass2_id
    );
    // The origin follows the rekeyed version (same content: a pull, as documented),
    // then a change pushed with the new passphrase is version 3.
    let followed = ok(
        &store,
        &origin,
        &["pull", REPLICA, "app.db", "--passphrase-file", s(&pass2)],
        "the origin follows the rekey",
    );
    assert_eq!(followed.u64("version"), 2);
    assert_eq!(util::digest(&db), v1_digest);
    util::open(&db)
        .execute(
            "UPDATE notes SET body = 'after the rekey' WHERE id = 77",
            [],
        )
        .expect("update");
    let third = ok(
        &store,
        &origin,
        &["push", "app.db", REPLICA, "--passphrase-file", s(&pass2)],
        "a push with the new passphrase",
    );
    assert_eq!(third.u64("version"), 3);
    assert!(third.u64("pages_sent") <= 4, "{}", third.0);

    // Another machine: each version with its own passphrase, and only with it.
    let other = Machine::new(dir.path(), "other");
    let old = passphrase_file(&other, "old.txt", PASSPHRASE);
    let new = passphrase_file(&other, "new.txt", new_text);
    for (n, file, id, digest) in [
        (1, &old, &pass_id, v1_digest.clone()),
        (2, &new, &pass2_id, v1_digest.clone()),
        (3, &new, &pass2_id, util::digest(&db)),
    ] {
        let into = format!("v{n}.db");
        let r = ok(
            &store,
            &other,
            &[
                "pull",
                &format!("{REPLICA}@{n}"),
                &into,
                "--passphrase-file",
                s(file),
            ],
            &format!("version {n} with its passphrase"),
        );
        assert_eq!(r.0["encryption_key_id"], id.as_str());
        let got = other.path(&into);
        assert_eq!(util::integrity(&got), "ok");
        assert_eq!(util::digest(&got), digest, "version {n}");
    }
    assert_eq!(
        notes(&other.path("v3.db")),
        (2000, "after the rekey".into())
    );
    for (n, file, needed) in [(1, &new, &pass_id), (3, &old, &pass2_id)] {
        let into = other.path(&format!("v{n}.db"));
        let before = std::fs::read(&into).expect("read");
        let out = store.run(
            &other,
            &[
                "pull",
                &format!("{REPLICA}@{n}"),
                s(&into),
                "--force",
                "--passphrase-file",
                s(file),
            ],
            &[],
        );
        assert_fails(&out, EXIT_AUTH, needed);
        assert_eq!(std::fs::read(&into).expect("read"), before);
    }
}

/// A plaintext push and a first push with a passphrase to the same new replica of a
/// `sqlferry serve` with a directory store, started together: exactly one kind wins
/// (version 1), the other is refused with the mix's message (exit 5), and a pull of the
/// winner gives its rows (with the passphrase when it was the winner).
#[test]
fn plaintext_and_passphrase_first_pushes_racing_on_a_server() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let store = Store::Server(&server);
    let a = Machine::new(dir.path(), "plain");
    let b = Machine::new(dir.path(), "sealed");
    let reader = Machine::new(dir.path(), "reader");
    let (db_a, db_b) = (marked_db(&a.work), marked_db(&b.work));
    util::open(&db_b)
        .execute("UPDATE notes SET body = 'sealed' WHERE id <= 10", [])
        .expect("b's own change");
    let pb = passphrase_file(&b, "pass.txt", PASSPHRASE);
    let rp = passphrase_file(&reader, "pass.txt", PASSPHRASE);
    for run in 0..3 {
        let replica = format!("acme/mixed-{run}.db");
        let spawn = |m: &Machine, extra: &[&str]| {
            let mut cmd = m.command();
            cmd.args([
                "push",
                "app.db",
                &replica,
                "--json",
                "--server",
                &server.url,
            ])
            .args(["--key", &server.admin_key])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
            cmd.spawn().expect("start a push")
        };
        let (x, y) = (spawn(&a, &[]), spawn(&b, &["--passphrase-file", s(&pb)]));
        let outs = [x, y].map(|c| c.wait_with_output().expect("wait for the push"));
        let codes: Vec<i32> = outs.iter().map(util::code).collect();
        eprintln!("{replica}: exit codes {codes:?} (plaintext, passphrase)");
        let (winner, loser) = util::winner_and_loser(&codes);
        let err = util::stderr(&outs[loser]);
        assert_eq!(codes[loser], EXIT_AUTH, "the mix refused: {err}");
        let words = ["is not encrypted", "is encrypted"][winner];
        assert!(err.contains(words) && err.contains(&replica), "{err}");
        let versions = server.versions(&replica).expect("the replica's versions");
        assert_eq!(versions.len(), 1, "one version");
        assert_eq!(versions[0].encryption.is_some(), winner == 1, "its kind");
        let copy = format!("copy-{run}.db");
        let mut args = vec!["pull", replica.as_str(), copy.as_str()];
        if winner == 1 {
            args.extend(["--passphrase-file", s(&rp)]);
        }
        ok(&store, &reader, &args, "the pull of the winner");
        let db = [&db_a, &db_b][winner];
        assert_eq!(util::digest(&reader.path(&copy)), util::digest(db));
        assert_eq!(util::integrity(&reader.path(&copy)), "ok");
        assert_eq!(notes(&reader.path(&copy)), notes(db));
    }
}
