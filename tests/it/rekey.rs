//! Key rotation of encrypted replicas (`sqlferry rekey`, docs/security.md), with real
//! `sqlferry` processes on the embedded store and a real `sqlferry serve`: version 1
//! pushed with key A, rekeyed to key B as version 2 (the whole database sent, no
//! marker in any stored file), a change pushed with B as version 3 (only its pages
//! sent); each version pulled with its own key, and with both keys given at once (rows,
//! `PRAGMA integrity_check`, digest); a version whose key was not given, a plain push
//! with the old key (told the replica was rekeyed away from it, when, and to which key),
//! and rekeys that cannot be are refused with LOCAL byte for byte as it was; a rekey
//! killed half-way leaves the latest version as it was, readable with the old key.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::encrypted::{Store, keygen, notes, read_key};
use crate::sealed::{MARKER, existing_dest, marked_db};
use crate::server::{Machine, Report, TestServer, assert_fails};
use crate::util::{self, Mode};

const REPLICA: &str = "acme/app.db";
const EXIT_USAGE: i32 = 2;
const EXIT_AUTH: i32 = 5;

/// `--encryption-key-file FILE` for each of `files`.
fn key_flags<'a>(files: &[&'a str]) -> Vec<&'a str> {
    files
        .iter()
        .flat_map(|f| ["--encryption-key-file", f])
        .collect()
}

/// `sqlferry pull REPLICA@VERSION DEST --json` with `keys`, asserted to succeed.
fn pull_with(store: &Store<'_>, m: &Machine, at: &str, dest: &str, keys: &[&str]) -> Report {
    let mut args = vec!["pull", at, dest, "--json"];
    args.extend(key_flags(keys));
    let out = store.run(m, &args, &[]);
    Report::of(&out, &format!("pull {at} with {keys:?}"))
}

/// Everything a user does around one rekey, on one store.
fn rekey_round_trip(store: Store<'_>) {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let mut m = Machine::new(dir.path(), "m");
    // The rekey's scratch file goes here, so the test can see it is removed.
    let tmp = m.path("tmp");
    std::fs::create_dir(&tmp).expect("tmp");
    m.set_env("TMPDIR", tmp.to_str().expect("UTF-8 path"));
    let db = marked_db(&m.work);
    let (a_file, b_file) = (keygen(&m, "a.key"), keygen(&m, "b.key"));
    let (a, b) = (read_key(&a_file), read_key(&b_file));
    let (a_id, b_id) = (a.id().to_string(), b.id().to_string());
    let (af, bf) = (
        a_file.to_str().expect("UTF-8 path"),
        b_file.to_str().expect("UTF-8 path"),
    );

    // Version 1, with key A.
    let mut args = vec!["push", "app.db", REPLICA, "--json"];
    args.extend(key_flags(&[af]));
    let first = Report::of(&store.run(&m, &args, &[]), "the push with A");
    assert_eq!(first.u64("version"), 1);
    let digest1 = util::digest(&db);

    // The rekey to B: version 2, the whole database sent (no identity is shared
    // across keys), no marker in any stored file, no scratch file left behind.
    let mut args = vec!["rekey", REPLICA, "--new-key-file", bf, "--json"];
    args.extend(key_flags(&[af]));
    let rekeyed = Report::of(&store.run(&m, &args, &[]), "the rekey");
    assert_eq!(rekeyed.u64("version"), 2);
    assert_eq!(rekeyed.u64("from_version"), 1);
    assert_eq!(rekeyed.0["from_encryption_key_id"], a_id.as_str());
    assert_eq!(rekeyed.0["encryption_key_id"], b_id.as_str());
    assert_eq!(
        rekeyed.u64("pages_sent"),
        rekeyed.u64("pages_total"),
        "a rekey sends every page: {}",
        rekeyed.0
    );
    assert_eq!(
        util::holding(&store.files(), MARKER.as_bytes()),
        Vec::<PathBuf>::new()
    );
    assert_eq!(util::files_under(&tmp), Vec::<PathBuf>::new());

    // LOCAL was last synced as version 1: it follows to version 2 (same rows, no page
    // of it changes), then a one-row change goes as version 3 with B, a few pages.
    let followed = pull_with(&store, &m, REPLICA, "app.db", &[bf]);
    assert_eq!(followed.u64("version"), 2);
    assert_eq!(followed.u64("pages_sent"), 0, "{}", followed.0);
    assert_eq!(util::digest(&db), digest1);
    util::open(&db)
        .execute("UPDATE notes SET body = 'changed' WHERE id = 77", [])
        .expect("update");
    let digest3 = util::digest(&db);
    let mut args = vec!["push", "app.db", REPLICA, "--json"];
    args.extend(key_flags(&[bf]));
    let third = Report::of(&store.run(&m, &args, &[]), "the push with B");
    assert_eq!(third.u64("version"), 3);
    assert_eq!(third.0["encryption_key_id"], b_id.as_str());
    let sent = third.u64("pages_sent");
    assert!(
        (1..=4).contains(&sent),
        "{sent} of {} pages sent for one row",
        third.u64("pages_total")
    );

    // Each version with its own key, and both with both keys (in either order).
    let check = |file: &str, digest: &str, body: &str| {
        let path = m.path(file);
        assert_eq!(util::digest(&path), digest, "{file}");
        assert_eq!(util::integrity(&path), "ok", "{file}");
        let (count, row) = notes(&path);
        assert_eq!(count, 2000, "{file}");
        assert!(row.contains(body), "{file}: {row}");
    };
    let (at1, at3) = (format!("{REPLICA}@1"), format!("{REPLICA}@3"));
    let one = pull_with(&store, &m, &at1, "one.db", &[af]);
    assert_eq!(one.0["encryption_key_id"], a_id.as_str());
    check("one.db", &digest1, MARKER);
    let three = pull_with(&store, &m, &at3, "three.db", &[bf]);
    assert_eq!(three.0["encryption_key_id"], b_id.as_str());
    check("three.db", &digest3, "changed");
    let both1 = pull_with(&store, &m, &at1, "both1.db", &[bf, af]);
    assert_eq!(both1.0["encryption_key_id"], a_id.as_str());
    check("both1.db", &digest1, MARKER);
    let both3 = pull_with(&store, &m, &at3, "both3.db", &[af, bf]);
    assert_eq!(both3.0["encryption_key_id"], b_id.as_str());
    check("both3.db", &digest3, "changed");
    // diff opens each side with its own key.
    let mut args = vec!["diff", &at1, &at3, "--json"];
    args.extend(key_flags(&[af, bf]));
    let diffed = Report::of(&store.run(&m, &args, &[]), "diff @1 @3 with both keys");
    let notes_table = diffed.0["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .find(|t| t["name"] == "notes")
        .cloned()
        .unwrap_or_else(|| panic!("no notes in {}", diffed.0));
    assert_eq!(notes_table["updated"], 1, "{notes_table}");

    // Version 1 with B alone: exit 5 naming the key id it needs; LOCAL as it was.
    let (local, local_bytes) = existing_dest(&m.work);
    let local_arg = local.to_str().expect("UTF-8 path");
    let mut args = vec!["pull", &at1, local_arg, "--force"];
    args.extend(key_flags(&[bf]));
    let line = assert_fails(&store.run(&m, &args, &[]), EXIT_AUTH, &a_id);
    assert!(line.contains(&b_id), "{line}");
    assert_eq!(std::fs::read(&local).expect("read"), local_bytes);
    // And with two keys, neither of them version 3's: both ids named.
    let c_file = keygen(&m, "c.key");
    let c_id = read_key(&c_file).id().to_string();
    let mut args = vec!["pull", &at3, local_arg, "--force"];
    args.extend(key_flags(&[af, c_file.to_str().expect("UTF-8 path")]));
    let line = assert_fails(&store.run(&m, &args, &[]), EXIT_AUTH, &b_id);
    assert!(line.contains(&a_id) && line.contains(&c_id), "{line}");
    assert_eq!(std::fs::read(&local).expect("read"), local_bytes);

    // A plain push with the old key after the rekey: refused, nothing stored, and told
    // that the replica was rekeyed away from this key, when, and to which.
    util::open(&db)
        .execute("UPDATE notes SET body = 'again' WHERE id = 78", [])
        .expect("update");
    let mut args = vec!["push", "app.db", REPLICA];
    args.extend(key_flags(&[af]));
    let line = assert_fails(
        &store.run(&m, &args, &[]),
        EXIT_AUTH,
        &format!(
            "{REPLICA} was rekeyed at version 2 from key id {a_id} (the key given) to key id \
             {b_id}: push with the new key file"
        ),
    );
    assert!(line.contains(af), "the key's file named: {line}");
    let out = store.run(&m, &["versions", REPLICA, "--json"], &[]);
    let listed: serde_json::Value =
        serde_json::from_str(util::stdout(&out).trim()).expect("versions --json");
    assert_eq!(listed.as_array().map(Vec::len), Some(3), "nothing stored");
    // With both keys, a push takes the latest version's: B.
    let mut args = vec!["push", "app.db", REPLICA, "--json"];
    args.extend(key_flags(&[af, bf]));
    let fourth = Report::of(&store.run(&m, &args, &[]), "the push with both keys");
    assert_eq!(fourth.u64("version"), 4);
    assert_eq!(fourth.0["encryption_key_id"], b_id.as_str());

    // Rekeys that cannot be: to the key it is under, from a key that is not its, and
    // of a plaintext replica. Each changes nothing.
    let mut args = vec!["rekey", REPLICA, "--new-key-file", bf];
    args.extend(key_flags(&[bf]));
    assert_fails(
        &store.run(&m, &args, &[]),
        EXIT_USAGE,
        "already under key id",
    );
    let cf = c_file.to_str().expect("UTF-8 path");
    let mut args = vec!["rekey", REPLICA, "--new-key-file", cf];
    args.extend(key_flags(&[af]));
    let line = assert_fails(&store.run(&m, &args, &[]), EXIT_AUTH, &b_id);
    assert!(line.contains(&a_id), "{line}");
    assert_eq!(
        util::code(&store.run(&m, &["push", "app.db", "acme/plain.db"], &[])),
        0
    );
    let mut args = vec!["rekey", "acme/plain.db", "--new-key-file", bf];
    args.extend(key_flags(&[af]));
    assert_fails(&store.run(&m, &args, &[]), EXIT_USAGE, "is not encrypted");
    let out = store.run(&m, &["versions", REPLICA, "--json"], &[]);
    let listed: serde_json::Value =
        serde_json::from_str(util::stdout(&out).trim()).expect("versions --json");
    let numbers: Vec<u64> = listed
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| v["number"].as_u64().expect("number"))
        .collect();
    assert_eq!(numbers, [1, 2, 3, 4]);
}

#[test]
fn a_rekey_in_the_embedded_store() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    rekey_round_trip(Store::Dir(dir.path().join("store")));
}

#[test]
fn a_rekey_on_a_server() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    rekey_round_trip(Store::Server(&server));
}

#[test]
fn rekey_help_says_what_a_lost_key_and_the_old_versions_mean() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let m = Machine::new(dir.path(), "m");
    let out = m.run(["rekey", "--help"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let help = util::stdout(&out)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for words in [
        "A lost key is lost data",
        "no back door and no recovery",
        "stay readable with the old key only, as long as they are kept",
        "retention removes them",
        "--new-key-file",
        "--encryption-key-file",
    ] {
        assert!(help.contains(words), "{words:?} in {help}");
    }
}

/// The bytes of every file under `dir`.
fn bytes_under(dir: &Path) -> u64 {
    util::files_under(dir)
        .iter()
        .map(|p| util::file_len(p))
        .sum()
}

#[test]
fn a_killed_rekey_leaves_the_latest_version_readable_with_the_old_key() {
    const STORED_MID_WAY: u64 = 8 << 20;
    let dir = tempfile::TempDir::new().expect("tempdir");
    let mut m = Machine::new(dir.path(), "m");
    // A killed rekey leaves its scratch file (the plaintext of the version it pulled)
    // where it was: inside this test's directory, not the machine's /tmp.
    let tmp = m.path("tmp");
    std::fs::create_dir(&tmp).expect("tmp");
    m.set_env("TMPDIR", tmp.to_str().expect("UTF-8 path"));
    let db = m.path("big.db");
    util::fill(&util::create(&db, 4096, Mode::Wal), 48 << 20, 2000);
    let store_dir = dir.path().join("store");
    let store = format!("file://{}", store_dir.display());
    let (a_file, b_file) = (keygen(&m, "a.key"), keygen(&m, "b.key"));
    let (af, bf) = (
        a_file.to_str().expect("UTF-8 path"),
        b_file.to_str().expect("UTF-8 path"),
    );
    let out = m.run([
        "push",
        "big.db",
        REPLICA,
        "--server",
        &store,
        "--encryption-key-file",
        af,
    ]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let digest = util::digest(&db);

    // Killed once the store has taken a good part of the new version's pages.
    let before = bytes_under(&store_dir);
    let mut rekey = m
        .command()
        .args(["rekey", REPLICA, "--server", &store, "--quiet"])
        .args(["--encryption-key-file", af, "--new-key-file", bf])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start rekey");
    let mut finished = false;
    let reached = util::wait_until(Duration::from_secs(120), Duration::from_millis(1), || {
        finished = rekey.try_wait().expect("try_wait").is_some();
        finished || bytes_under(&store_dir) >= before + STORED_MID_WAY
    });
    assert!(reached, "the rekey never got to storing pages");
    assert!(!finished, "the rekey finished before it could be killed");
    rekey.kill().expect("SIGKILL the rekey");
    rekey.wait().expect("wait rekey");
    // What SIGKILL leaves: the scratch file, plaintext, in a directory of its owner's.
    let left = util::files_under(&tmp);
    let scratch = left
        .iter()
        .find(|p| p.ends_with("rekey.db"))
        .unwrap_or_else(|| panic!("the scratch file: {left:?}"));
    let mode = std::fs::metadata(scratch.parent().expect("its directory"))
        .expect("metadata")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "the scratch directory is its owner's: {mode:o}"
    );

    // The replica is as it was: version 1, pulled with A, the same database.
    let out = m.run(["versions", REPLICA, "--server", &store, "--json"]);
    let listed: serde_json::Value =
        serde_json::from_str(util::stdout(&out).trim()).expect("versions --json");
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    let out = m.run([
        "pull",
        REPLICA,
        "back.db",
        "--server",
        &store,
        "--json",
        "--encryption-key-file",
        af,
    ]);
    let pulled = Report::of(&out, "the pull after the killed rekey");
    assert_eq!(pulled.u64("version"), 1);
    assert_eq!(util::digest(&m.path("back.db")), digest);
    assert_eq!(util::integrity(&m.path("back.db")), "ok");

    // And the rekey, run again, completes.
    let out = m.run([
        "rekey",
        REPLICA,
        "--server",
        &store,
        "--json",
        "--encryption-key-file",
        af,
        "--new-key-file",
        bf,
    ]);
    assert_eq!(Report::of(&out, "the rekey again").u64("version"), 2);
    let out = m.run([
        "pull",
        REPLICA,
        "again.db",
        "--server",
        &store,
        "--encryption-key-file",
        bf,
    ]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert_eq!(util::digest(&m.path("again.db")), digest);
}
