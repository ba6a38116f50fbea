//! `sqlferry verify REMOTE` of an encrypted replica (docs/security.md), with real
//! `sqlferry` processes against the embedded store and a real `sqlferry serve` on
//! 127.0.0.1: with its key (a key file, `SQLFERRY_ENCRYPTION_KEY` or a passphrase) a
//! stored version is opened as a pull opens it, hashed again and compared with the
//! plaintext digest its seal records (exit 0, the database's own digest printed);
//! without a key or with a wrong one it is refused (exit 5) before anything is
//! fetched; a flipped byte of a sealed page in the store's pack is found (exit 7),
//! `--all-versions` naming the one version that holds it, and verify changes no byte
//! of the store.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use crate::encrypted::{Store, flip_stored, keygen, read_key};
use crate::sealed::marked_db;
use crate::server::{Machine, Report, TestServer, assert_fails};
use crate::util;

const REPLICA: &str = "acme/app.db";
const PASS_REPLICA: &str = "acme/pass.db";
const EXIT_AUTH: i32 = 5;
const EXIT_VERIFY: i32 = 7;

/// Every file under `root` and its bytes: what verify must leave as it was.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    util::files_under(root)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).expect("read a store file");
            (p, bytes)
        })
        .collect()
}

/// The files the server keeps open and rewrites on its own (its own database and its
/// logs) are left out: only the replicas' files are compared.
fn replica_files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    snapshot(root)
        .into_iter()
        .filter(|(p, _)| {
            let name = p.to_string_lossy();
            !name.contains("server.db")
                && !name.ends_with(".log")
                && !name.ends_with("-wal")
                && !name.ends_with("-shm")
                && !name.ends_with(".lock")
        })
        .collect()
}

fn verify_round_trip(store: Store<'_>) {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let m = Machine::new(dir.path(), "m");
    let db = marked_db(&m.work);
    let key_file = keygen(&m, "app.key");
    let key = read_key(&key_file);
    let kf = key_file.to_str().expect("UTF-8 path");
    let keyed = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--encryption-key-file", kf]);
        store.run(&m, &all, &[])
    };

    // Two versions: the second changes one row.
    let out = keyed(&["push", "app.db", REPLICA, "--json"]);
    assert_eq!(Report::of(&out, "push 1").u64("version"), 1);
    let v1_digest = util::digest(&db);
    let v1_pages = util::page_hashes(&db);
    util::open(&db)
        .execute("UPDATE notes SET body = 'changed' WHERE id = 77", [])
        .expect("update");
    let out = keyed(&["push", "app.db", REPLICA, "--json"]);
    assert_eq!(Report::of(&out, "push 2").u64("version"), 2);
    let v2_digest = util::digest(&db);

    // With the key: the version is opened, and its plaintext digest is the database's.
    let out = keyed(&["verify", "--replica", &format!("{REPLICA}@2"), "--json"]);
    let report = Report::of(&out, "verify @2 with the key");
    assert_eq!(report.0["digest"], v2_digest, "{}", report.0);
    assert_eq!(report.0["integrity"], serde_json::json!(["ok"]));
    assert_eq!(report.0["version"], 2);
    let out = keyed(&["verify", "--replica", &format!("{REPLICA}@1")]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(
        util::stdout(&out).contains(&v1_digest),
        "{}",
        util::stdout(&out)
    );
    // SQLFERRY_ENCRYPTION_KEY works like the file.
    let text = std::fs::read_to_string(&key_file).expect("key text");
    let out = store.run(
        &m,
        &["verify", "--replica", REPLICA],
        &[("SQLFERRY_ENCRYPTION_KEY", text.trim())],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(util::stdout(&out).contains(&v2_digest));
    let out = keyed(&["verify", REPLICA, "--all-versions"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(
        util::stdout(&out).contains("all 2 versions ok"),
        "{}",
        util::stdout(&out)
    );

    // Without a key: refused, saying how to give it; with a wrong key: refused,
    // naming both key ids and the file. Nothing fetched, nothing stored.
    let before = replica_files(&store.files());
    let out = store.run(&m, &["verify", "--replica", REPLICA], &[]);
    let line = assert_fails(&out, EXIT_AUTH, "--encryption-key-file");
    assert!(
        line.contains("is encrypted") && line.contains("--passphrase-file"),
        "{line}"
    );
    let out = store.run(&m, &["verify", REPLICA, "--all-versions"], &[]);
    assert_fails(&out, EXIT_AUTH, "give its key");
    let wrong = keygen(&m, "wrong.key");
    let wrong_id = read_key(&wrong).id().to_string();
    for all in [false, true] {
        let mut args = vec!["verify", "--replica", REPLICA, "--encryption-key-file"];
        args.push(wrong.to_str().expect("utf-8"));
        if all {
            args.push("--all-versions");
        }
        let out = store.run(&m, &args, &[]);
        let line = assert_fails(&out, EXIT_AUTH, &wrong_id);
        assert!(line.contains(&key.id().to_string()), "{line}");
        assert!(line.contains("wrong.key"), "{line}");
    }
    // A key for a local file is refused, not ignored.
    let out = m.run(["verify", "./app.db", "--encryption-key-file", kf]);
    assert_fails(&out, 2, "local file");
    assert_eq!(replica_files(&store.files()), before);

    // A flipped byte of the sealed bytes of a page only version 2 holds (the changed
    // row's): version 2 fails (7), naming the page, version 1 still verifies, and
    // verify writes no byte of the store.
    let v2_pages = util::page_hashes(&db);
    let changed = (0..v2_pages.len())
        .find(|&i| v1_pages.get(i) != Some(&v2_pages[i]) && !v1_pages.contains(&v2_pages[i]))
        .expect("a page version 1 lacks");
    let identity = key.page_identity(&v2_pages[changed]);
    flip_stored(&store.files(), &identity);
    let damaged = replica_files(&store.files());
    let named = format!("page {} of {REPLICA}@2 is damaged", changed + 1);
    let out = keyed(&["verify", "--replica", &format!("{REPLICA}@2")]);
    assert_fails(&out, EXIT_VERIFY, &named);
    let out = keyed(&["verify", REPLICA, "--all-versions", "--json"]);
    assert_eq!(util::code(&out), EXIT_VERIFY, "{}", util::stderr(&out));
    let all: serde_json::Value = serde_json::from_str(&util::stdout(&out)).expect("JSON");
    assert_eq!(all["failed"], 1, "{all}");
    assert_eq!(all["versions"][0]["ok"], true, "{all}");
    assert_eq!(all["versions"][0]["digest"], v1_digest, "{all}");
    assert_eq!(all["versions"][1]["ok"], false, "{all}");
    let error = all["versions"][1]["error"].as_str().expect("an error");
    assert!(error.contains(&named), "{all}");
    assert_eq!(
        replica_files(&store.files()),
        damaged,
        "verify changed the store"
    );

    // A passphrase replica verifies with its passphrase.
    let pass = m.path("pass.txt");
    std::fs::write(&pass, "correct horse battery staple\n").expect("write");
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let ps = pass.to_str().expect("utf-8");
    let out = store.run(
        &m,
        &["push", "app.db", PASS_REPLICA, "--passphrase-file", ps],
        &[],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let out = store.run(
        &m,
        &[
            "verify",
            "--replica",
            PASS_REPLICA,
            "--passphrase-file",
            ps,
            "--json",
        ],
        &[],
    );
    assert_eq!(
        Report::of(&out, "verify with a passphrase").0["digest"],
        v2_digest
    );
}

#[test]
fn an_encrypted_version_verifies_with_its_key_in_the_embedded_store() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    verify_round_trip(Store::Dir(dir.path().join("store")));
}

#[test]
fn an_encrypted_version_verifies_with_its_key_on_a_server() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    verify_round_trip(Store::Server(&server));
}
