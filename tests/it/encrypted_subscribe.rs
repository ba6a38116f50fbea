//! Encrypted replicas kept fresh on their own (docs/security.md, "Subscribers"), with
//! real processes and a real `sqlferry serve` on 127.0.0.1: a push subscriber with a
//! key follows a writer in another process (`helpers/writer.py`), and a pull
//! subscriber with the key applies each version (rows, `PRAGMA integrity_check`); the
//! server's data directory holds no marker of the rows; sync-now reaches both,
//! retention and prune work on the encrypted versions, and the dashboard's API shows
//! sizes and times, never content. A rekey while pull subscribers run: one holding
//! both keys follows it, one holding the old key only stops with exit 5 naming the
//! key id it needs, its database as it was. The daemon runs an encrypted `[[push]]`
//! and `[[pull]]` entry (`encryption_key_file`), and refuses a bad key file with the
//! config file's line. The embedded store's subscribers do the same on one machine.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use crate::encrypted::{keygen, notes, read_key};
use crate::live::Helper;
use crate::sealed::{MARKER, marked_db};
use crate::server::{DbState, EXIT_AUTH, Machine, TestServer, assert_fails};
use crate::subscribe::{Subscriber, http, max_id};
use crate::util;

const REPLICA: &str = "acme/app.db";

/// A WAL database whose `notes` rows carry the marker, with the writer's table `w`.
fn marked_writer_db(m: &Machine) -> PathBuf {
    let db = marked_db(&m.work);
    util::open(&db)
        .execute_batch("CREATE TABLE w(id INTEGER PRIMARY KEY, at REAL NOT NULL)")
        .expect("the writer's table");
    db
}

/// `sqlferry ARGS` on `m` against `server` with the admin key, asserted to succeed.
fn ok(m: &Machine, server: &TestServer, args: &[&str]) -> std::process::Output {
    let out = m.run_on(
        server,
        args.iter().copied().chain(["--key", &server.admin_key]),
    );
    assert_eq!(
        util::code(&out),
        0,
        "sqlferry {args:?}: {}",
        util::stderr(&out)
    );
    out
}

/// The latest version of the replica pulled with `key` into `m`'s `into` (a fresh
/// copy each time), checked whole; its `w` rows.
fn pulled_rows(m: &Machine, server: &TestServer, key: &Path, into: &str) -> u64 {
    let kf = key.to_str().expect("UTF-8 path");
    ok(
        m,
        server,
        &[
            "pull",
            REPLICA,
            into,
            "--force",
            "--encryption-key-file",
            kf,
        ],
    );
    let path = m.path(into);
    assert_eq!(util::integrity(&path), "ok");
    max_id(&path)
}

/// No file of the server's data directory holds the marker of the rows.
fn assert_no_plaintext(server: &TestServer) {
    assert_eq!(
        util::holding(server.data_dir(), MARKER.as_bytes()),
        Vec::<PathBuf>::new(),
        "the server's data directory holds plaintext"
    );
}

#[test]
fn subscribers_with_a_key_follow_a_writer_and_the_server_reads_none_of_it() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let origin = Machine::new(dir.path(), "origin");
    let db = marked_writer_db(&origin);
    let key = keygen(&origin, "app.key");
    let kf = key.to_str().expect("UTF-8 path");
    ok(
        &origin,
        &server,
        &["push", "app.db", REPLICA, "--encryption-key-file", kf],
    );

    // A follower on another machine with the same key, and the origin's push
    // subscriber with it: both name nothing but sizes in their lines.
    let replica = Machine::new(dir.path(), "replica");
    let mut pull = Subscriber::start(
        &replica,
        &[
            "pull",
            REPLICA,
            "follower.db",
            "--server",
            &server.url,
            "--key",
            &server.admin_key,
            "--subscribe",
            "--encryption-key-file",
            kf,
        ],
    );
    pull.expect(&["pull (start): version 1"]);
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
            "--encryption-key-file",
            kf,
        ],
    );
    push.expect(&["push (start): no change, still version 1"]);

    // A writer in its own process commits a row every 20 ms; each commit seen is
    // pushed, sealed, and the follower pulls what lands.
    let writer = Helper::start("writer.py", &[db.as_os_str(), "20".as_ref(), "50".as_ref()]);
    push.expect(&["push (changes): version 2"]);
    pull.expect(&["pull (new-version): version"]);
    let commits = writer.finish()["commits"].as_u64().expect("commits");
    assert!(commits > 0);
    let follower = replica.path("follower.db");
    let caught_up = util::wait_until(Duration::from_secs(60), Duration::from_millis(50), || {
        max_id(&follower) == commits
    });
    assert!(
        caught_up,
        "the follower never held the writer's {commits} rows"
    );
    assert_eq!(util::integrity(&follower), "ok");
    assert_eq!(notes(&follower), notes(&db));
    assert_eq!(pulled_rows(&origin, &server, &key, "check.db"), commits);
    assert_no_plaintext(&server);

    // sync-now reaches both encrypted subscribers: each syncs at once (nothing is
    // left to push or pull), then a marked row is pushed and followed.
    let out = ok(&origin, &server, &["sync-now", REPLICA]);
    assert!(
        util::stdout(&out).contains("2 subscribers reached"),
        "{}",
        util::stdout(&out)
    );
    push.expect(&["push (sync-now)"]);
    pull.expect(&["pull (sync-now)"]);
    util::open(&db)
        .execute(
            "INSERT INTO notes(body) VALUES (?1)",
            [format!("{MARKER} one more note")],
        )
        .expect("one more note");
    push.expect(&["push (changes): version"]);
    let caught_up = util::wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
        notes(&follower).0 == notes(&db).0
    });
    assert!(caught_up, "the follower never pulled the last note");
    assert_eq!(util::integrity(&follower), "ok");
    let latest = *server.version_numbers(REPLICA).last().expect("a version");
    assert_no_plaintext(&server);

    // Retention and prune work on encrypted versions the same way, and the latest
    // still opens with the key.
    ok(
        &origin,
        &server,
        &["retention", REPLICA, "--keep-last", "1", "--json"],
    );
    let pruned = ok(&origin, &server, &["prune", REPLICA, "--json"]);
    let pruned: serde_json::Value =
        serde_json::from_str(util::stdout(&pruned).trim()).expect("prune JSON");
    assert!(
        pruned["removed"].as_array().is_some_and(|r| !r.is_empty()),
        "{pruned}"
    );
    assert_eq!(server.version_numbers(REPLICA), [latest]);
    assert_eq!(
        pulled_rows(&origin, &server, &key, "after-prune.db"),
        commits
    );

    // The dashboard's API: sizes and times; never a row or a commit message.
    let (code, status) = http(
        &server,
        "GET",
        "/api/replicas/acme/app.db",
        &server.admin_key,
    );
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["latest_version"], latest, "{status}");
    let (code, versions) = http(
        &server,
        "GET",
        "/api/replicas/acme/app.db/versions",
        &server.admin_key,
    );
    for shown in [&status, &versions] {
        let text = shown.to_string();
        assert!(
            !text.contains(MARKER),
            "the dashboard shows content: {text}"
        );
        assert!(
            !text.contains("sqlferry subscribe"),
            "a sealed message shown: {text}"
        );
    }
    assert_eq!(code, 200, "{versions}");

    assert_eq!(push.stop(), 0, "{}", push.output());
    assert_eq!(pull.stop(), 0, "{}", pull.output());
    assert_eq!(max_id(&follower), commits);
}

#[test]
fn a_rekey_is_followed_with_both_keys_and_stops_a_subscriber_with_the_old_one() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let origin = Machine::new(dir.path(), "origin");
    let db = marked_writer_db(&origin);
    let a = keygen(&origin, "a.key");
    let b = keygen(&origin, "b.key");
    let (af, bf) = (a.to_str().expect("UTF-8"), b.to_str().expect("UTF-8"));
    let b_id = read_key(&b).id().to_string();
    ok(
        &origin,
        &server,
        &["push", "app.db", REPLICA, "--encryption-key-file", af],
    );

    let replica = Machine::new(dir.path(), "replica");
    let follow = |into: &str, keys: &[&str]| {
        let mut args = vec![
            "pull",
            REPLICA,
            into,
            "--server",
            &server.url,
            "--key",
            &server.admin_key,
            "--subscribe",
        ];
        for k in keys {
            args.extend(["--encryption-key-file", k]);
        }
        Subscriber::start(&replica, &args)
    };
    let mut both = follow("both.db", &[af, bf]);
    let mut old = follow("old.db", &[af]);
    both.expect(&["pull (start): version 1"]);
    old.expect(&["pull (start): version 1"]);

    // Version 2, still under A: both follow.
    crate::subscribe::commit_rows(&db, 1..=5);
    ok(
        &origin,
        &server,
        &["push", "app.db", REPLICA, "--encryption-key-file", af],
    );
    both.expect(&["pull (new-version): version 2"]);
    old.expect(&["pull (new-version): version 2"]);
    let old_db = replica.path("old.db");
    let held = DbState::of(&old_db);
    assert_eq!(max_id(&old_db), 5);

    // The rekey to B makes version 3: the subscriber holding both keys opens it, the
    // one holding A alone stops (exit 5) naming B's key id, never writing.
    ok(
        &origin,
        &server,
        &[
            "rekey",
            REPLICA,
            "--new-key-file",
            bf,
            "--encryption-key-file",
            af,
        ],
    );
    both.expect(&["pull (new-version): version 3"]);
    assert_eq!(old.wait(), EXIT_AUTH, "{}", old.output());
    let said = old.output();
    assert!(
        said.contains(&b_id),
        "the key id it needs is named:\n{said}"
    );
    held.assert_held_by(&old_db, "the subscriber refused the rekeyed version");
    assert_no_plaintext(&server);

    // The next change, pushed with B after the origin follows its rekey, lands too.
    ok(
        &origin,
        &server,
        &[
            "pull",
            REPLICA,
            "app.db",
            "--encryption-key-file",
            af,
            "--encryption-key-file",
            bf,
        ],
    );
    crate::subscribe::commit_rows(&db, 6..=9);
    ok(
        &origin,
        &server,
        &["push", "app.db", REPLICA, "--encryption-key-file", bf],
    );
    both.expect(&["pull (new-version): version 4"]);
    let both_db = replica.path("both.db");
    assert_eq!(max_id(&both_db), 9);
    assert_eq!(util::integrity(&both_db), "ok");
    assert_eq!(util::digest(&both_db), util::digest(&db));
    assert_eq!(both.stop(), 0, "{}", both.output());
}

/// The daemon's file: an encrypted push of `app.db` and an encrypted pull of the same
/// replica into `copy/app.db`, the key file relative to the config file.
fn daemon_config(url: &str, key: &str) -> String {
    format!(
        r#"[defaults]
server = "{url}"
key_env = "SQLFERRY_KEY"
wait_idle = "10s"
max_changes = 1
poll = "1s"

[[push]]
database = "app.db"
to = ["{REPLICA}"]
encryption_key_file = "{key}"

[[pull]]
replica = "{REPLICA}"
into = "copy/app.db"
encryption_key_file = "{key}"
"#
    )
}

#[test]
fn the_daemon_runs_encrypted_entries_and_refuses_a_bad_key_file_with_its_line() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let mut m = Machine::new(dir.path(), "host");
    m.set_env("SQLFERRY_KEY", &server.admin_key);
    let db = marked_writer_db(&m);
    std::fs::create_dir_all(m.path("keys")).expect("mkdir");
    let key = keygen(&m, "keys/app.key");
    let id = read_key(&key).id().to_string();
    ok(
        &m,
        &server,
        &[
            "push",
            "app.db",
            REPLICA,
            "--encryption-key-file",
            key.to_str().expect("UTF-8"),
        ],
    );
    std::fs::create_dir_all(m.path("copy")).expect("mkdir");
    std::fs::write(
        m.path("sqlferry.toml"),
        daemon_config(&server.url, "keys/app.key"),
    )
    .expect("write the config");

    // --check names each entry's key id, never the key.
    let out = m.run(["daemon", "--config", "sqlferry.toml", "--check"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let check = util::stdout(&out);
    assert_eq!(
        check.matches(&format!("encrypted (key id {id}")).count(),
        2,
        "{check}"
    );
    let text = std::fs::read_to_string(&key).expect("key text");
    assert!(!check.contains(text.trim()), "{check}");

    let mut daemon = Subscriber::start(&m, &["daemon", "--config", "sqlferry.toml"]);
    daemon.expect_all(&[
        &["app.db -> acme/app.db", "push (start)"],
        &["copy/app.db: pull (", "pull (start): version 1"],
    ]);
    crate::subscribe::commit_rows(&db, 1..=3);
    daemon.expect_all(&[
        &["app.db -> acme/app.db", "version 2"],
        &["copy/app.db: pull (", "version 2"],
    ]);
    let copy = m.path("copy/app.db");
    assert_eq!(util::integrity(&copy), "ok");
    assert_eq!(max_id(&copy), 3);
    assert_eq!(notes(&copy), notes(&db));
    assert_no_plaintext(&server);
    assert_eq!(daemon.stop(), 0, "{}", daemon.output());

    // A key file that is no key, one that is missing, and a key with merge: each the
    // file's error, with the entry's line, nothing started.
    std::fs::write(m.path("keys/bad.key"), "not a key at all\n").expect("write");
    for (key, phrase) in [
        ("keys/bad.key", "is not a key"),
        ("keys/missing.key", "cannot read the encryption key file"),
    ] {
        std::fs::write(m.path("bad.toml"), daemon_config(&server.url, key)).expect("write");
        let out = m.run(["daemon", "--config", "bad.toml", "--check"]);
        let line = assert_fails(&out, 2, phrase);
        assert!(line.contains("bad.toml:8: [[push]]"), "{line}");
        assert!(line.contains("encryption_key_file"), "{line}");
        assert!(!line.contains("not a key at all"), "{line}");
    }
    let merged = daemon_config(&server.url, "keys/app.key").replace(
        "to = [\"acme/app.db\"]",
        "to = [\"acme/app.db\"]\nmerge = true",
    );
    std::fs::write(m.path("bad.toml"), merged).expect("write");
    let out = m.run(["daemon", "--config", "bad.toml", "--check"]);
    assert_fails(&out, 2, "cannot merge");
    // One key in the environment for every entry is refused, not applied to all.
    let out = m
        .command()
        .args(["daemon", "--config", "sqlferry.toml", "--check"])
        .env("SQLFERRY_ENCRYPTION_KEY", text.trim())
        .output()
        .expect("run");
    assert_fails(&out, 2, "per entry");
}

/// `sqlferry subscribe app.db` takes the key too (never saved with the database).
#[test]
fn sqlferry_subscribe_takes_the_key_and_refuses_to_push_without_it() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let m = Machine::new(dir.path(), "m");
    let db = marked_writer_db(&m);
    let key = keygen(&m, "app.key");
    let kf = key.to_str().expect("UTF-8");
    ok(
        &m,
        &server,
        &["push", "app.db", REPLICA, "--encryption-key-file", kf],
    );
    // Without the key, the push subscriber is refused at its first push (exit 5),
    // nothing pushed.
    let mut keyless = Subscriber::start(&m, &["subscribe", "app.db", "--wait-idle", "10s"]);
    assert_eq!(keyless.wait(), EXIT_AUTH, "{}", keyless.output());
    assert_eq!(server.version_numbers(REPLICA), [1]);
    let mut sub = Subscriber::start(
        &m,
        &[
            "subscribe",
            "app.db",
            "--wait-idle",
            "10s",
            "--max-changes",
            "1",
            "--poll",
            "1s",
            "--encryption-key-file",
            kf,
        ],
    );
    sub.expect(&["push (start): no change"]);
    crate::subscribe::commit_rows(&db, 1..=2);
    sub.expect(&["push (changes): version 2"]);
    assert_eq!(sub.stop(), 0, "{}", sub.output());
    assert_eq!(pulled_rows(&m, &server, &key, "check.db"), 2);
    assert_no_plaintext(&server);
}

/// The embedded store: a keyed push subscriber and a keyed pull subscriber of one
/// machine reach each other and sync-now, and the store's directory holds no marker.
#[test]
fn encrypted_subscribers_of_the_embedded_store() {
    let dir = TempDir::new().expect("tempdir");
    let mut m = Machine::new(dir.path(), "m");
    let store = dir.path().join("store");
    m.set_env("SQLFERRY_SERVER", &format!("file://{}", store.display()));
    let db = marked_writer_db(&m);
    let key = keygen(&m, "app.key");
    let kf = key.to_str().expect("UTF-8");
    let out = m.run(["push", "app.db", REPLICA, "--encryption-key-file", kf]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let mut pull = Subscriber::start(
        &m,
        &[
            "pull",
            REPLICA,
            "copy.db",
            "--subscribe",
            "--encryption-key-file",
            kf,
        ],
    );
    pull.expect(&["pull (start): version 1"]);
    let mut push = Subscriber::start(
        &m,
        &[
            "push",
            "app.db",
            REPLICA,
            "--subscribe",
            "--wait-idle",
            "10s",
            "--max-changes",
            "1",
            "--poll",
            "1s",
            "--encryption-key-file",
            kf,
        ],
    );
    push.expect(&["push (start): no change"]);
    crate::subscribe::commit_rows(&db, 1..=5);
    let copy = m.path("copy.db");
    assert!(
        util::wait_until(Duration::from_secs(30), Duration::from_millis(20), || {
            max_id(&copy) == 5
        }),
        "the pull subscriber follows; push:\n{}\npull:\n{}",
        push.output(),
        pull.output()
    );
    assert_eq!(util::integrity(&copy), "ok");
    assert_eq!(notes(&copy), notes(&db));
    let out = m.run(["sync-now", REPLICA]);
    assert!(
        util::stdout(&out).contains("2 subscribers reached"),
        "{}",
        util::stdout(&out)
    );
    push.expect(&["push (sync-now)"]);
    pull.expect(&["pull (sync-now)"]);
    assert_eq!(push.stop(), 0, "{}", push.output());
    assert_eq!(pull.stop(), 0, "{}", pull.output());
    assert!(
        !util::files_under(&store).is_empty(),
        "the replica is in {}",
        store.display()
    );
    assert_eq!(
        util::holding(&store, MARKER.as_bytes()),
        Vec::<PathBuf>::new(),
        "the embedded store holds plaintext"
    );
}

/// After someone else's `rekey`, a push subscriber with the old key (a key file) and a
/// daemon push unit with the old passphrase are refused at their next push, and say
/// the replica was rekeyed and what to do: the subscriber stops (exit 5) after one
/// refusal, the unit tries again later each time (backoff); nothing is pushed.
#[test]
fn push_subscribers_after_someone_elses_rekey_say_so_and_do_not_spin() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let mut m = Machine::new(dir.path(), "origin");
    m.set_env("SQLFERRY_KEY", &server.admin_key);
    let db = marked_writer_db(&m);
    std::fs::create_dir_all(m.path("b")).expect("mkdir");
    let b_db = marked_writer_db(&Machine::new(dir.path(), "scratch"));
    std::fs::copy(&b_db, m.path("b/app.db")).expect("copy");
    let b_db = m.path("b/app.db");
    let key = keygen(&m, "old.key");
    let old_id = read_key(&key).id().to_string();
    let pass = crate::passphrase::passphrase_file(&m, "old.pass", "the old passphrase");
    let kf = key.to_str().expect("UTF-8");
    let pf = pass.to_str().expect("UTF-8");
    ok(
        &m,
        &server,
        &["push", "app.db", REPLICA, "--encryption-key-file", kf],
    );
    let out = ok(
        &m,
        &server,
        &[
            "push",
            "b/app.db",
            "acme/b.db",
            "--passphrase-file",
            pf,
            "--json",
        ],
    );
    let pushed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let old_pass_id = pushed["encryption_key_id"].as_str().expect("id").to_owned();

    let mut sub = Subscriber::start(
        &m,
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
            "--encryption-key-file",
            kf,
        ],
    );
    sub.expect(&["push (start): no change, still version 1"]);
    std::fs::write(
        m.path("sqlferry.toml"),
        format!(
            "[defaults]\nserver = \"{}\"\nkey_env = \"SQLFERRY_KEY\"\nwait_idle = \"10s\"\n\
             max_changes = 1\npoll = \"1s\"\n\n[[push]]\ndatabase = \"b/app.db\"\n\
             to = [\"acme/b.db\"]\npassphrase_file = \"old.pass\"\n",
            server.url
        ),
    )
    .expect("write the config");
    let mut daemon = Subscriber::start(&m, &["daemon", "--config", "sqlferry.toml"]);
    daemon.expect(&["b/app.db -> acme/b.db on ", "push (start): no change"]);

    // Another machine rekeys both replicas.
    let admin = Machine::new(dir.path(), "admin");
    let new_key = keygen(&admin, "new.key");
    let new_id = read_key(&new_key).id().to_string();
    let akey = admin.path("old.key");
    std::fs::copy(&key, &akey).expect("copy the key");
    let apass = crate::passphrase::passphrase_file(&admin, "old.pass", "the old passphrase");
    let anew = crate::passphrase::passphrase_file(&admin, "new.pass", "the new passphrase");
    let s = |p: &Path| p.to_str().expect("UTF-8").to_owned();
    ok(
        &admin,
        &server,
        &[
            "rekey",
            REPLICA,
            "--encryption-key-file",
            &s(&akey),
            "--new-key-file",
            &s(&new_key),
        ],
    );
    ok(
        &admin,
        &server,
        &[
            "rekey",
            "acme/b.db",
            "--passphrase-file",
            &s(&apass),
            "--new-passphrase-file",
            &s(&anew),
        ],
    );

    // The subscriber's next push: refused once, said so, and it stops with exit 5.
    crate::subscribe::commit_rows(&db, 1..=1);
    let line = sub.expect(&["push (changes) failed: ", "was rekeyed"]);
    assert!(line.ends_with("not retried: stopping"), "{line}");
    for part in [old_id.as_str(), &new_id, "start it again with the new key"] {
        assert!(line.contains(part), "{part}: {line}");
    }
    assert_eq!(sub.wait(), EXIT_AUTH, "{}", sub.output());
    assert!(
        sub.output().matches("was rekeyed").count() <= 2,
        "{}",
        sub.output()
    );

    // The daemon's unit: refused, said so, and tried again later each time.
    crate::subscribe::commit_rows(&b_db, 1..=1);
    let unit = "b/app.db -> acme/b.db on ";
    let first = daemon.expect(&[
        unit,
        ": failed: with the key of passphrase_file",
        &old_pass_id,
        "was rekeyed",
        "start it again with the new key",
        "starting again in",
    ]);
    let second = daemon.expect(&[unit, ": failed: ", "was rekeyed"]);
    let third = daemon.expect(&[unit, ": failed: ", "was rekeyed"]);
    let wait = crate::daemon_passphrase::wait;
    assert!(wait(&second) >= wait(&first), "{first}\n{second}");
    assert!(wait(&third) >= wait(&second), "{second}\n{third}");
    assert!(wait(&third) >= Duration::from_secs(1), "{third}");
    daemon.stop();

    // Nothing was pushed: version 2 (the rekey) is the latest of each.
    for replica in [REPLICA, "acme/b.db"] {
        let out = ok(&admin, &server, &["versions", replica, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("versions JSON");
        let text = v.to_string();
        assert!(text.contains("\"number\":2"), "{text}");
        assert!(!text.contains("\"number\":3"), "{text}");
    }
}
