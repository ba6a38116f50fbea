//! Encrypted replicas on the S3 store (issue 15; docs/security.md, "The S3 store"):
//! real `sqlferry` processes over the real SeaweedFS of `seaweed`, through a real
//! `sqlferry serve --store s3://…` (with a real PostgreSQL, `--meta`) and through the
//! embedded store over S3 (`--server s3://…`, no server). A WAL database whose rows
//! carry a marker is pushed with a key file: no object of the bucket holds the marker,
//! every pack index is a sealed one whose identities are no page's SHA-256, and the
//! version object names the key id; another machine pulls it with the key (rows,
//! `PRAGMA integrity_check`, digest); a wrong key exits 5 with LOCAL byte for byte
//! unchanged; a 1% change sends and uploads about 1% of the pages; a keyless push,
//! another key without a rekey, a keyed push to a plaintext replica (exit 5) and a
//! sealed push from a stale base, forced or not (exit 6), are refused with the bucket
//! unchanged; `rekey` makes the next version under a new key and old and new versions
//! both pull with their own key; retention and a sweep remove the old key's versions
//! and packs and the latest still pulls; `verify REMOTE` with the key passes, and finds a
//! flipped byte of a sealed pack object (exit 7), as a pull does. With a passphrase:
//! the first push writes the replica's salt object, another machine pulls with the
//! passphrase, and a wrong one exits 5. Races, processes started together: two first
//! passphrase pushes (two passphrases, and one) keep one salt and one version, the
//! winner's, the loser refused (exit 5) and able to push after a pull; a plaintext and
//! a passphrase first push make one version of the winner's kind, the loser refused
//! with the mix's message (exit 5), never a conflict.
//!
//! Every wait is on a process exit; nothing sleeps.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Output;

use futures_util::TryStreamExt as _;
use object_store::ObjectStore as _;
use tempfile::TempDir;

use crate::encrypted::{keygen, notes, read_key};
use crate::postgres;
use crate::s3_serve::{aws_env, new_location, s3_server};
use crate::sealed::{MARKER, existing_dest};
use crate::seaweed::{self, ACCESS_KEY, SECRET_KEY};
use crate::server::{EXIT_CONFLICT, EXIT_NOT_FOUND, Machine, Report, TestServer, assert_fails};
use crate::util;

const REPLICA: &str = "acme/app.db";
const EXIT_AUTH: i32 = 5;
const EXIT_VERIFY: i32 = 7;
/// The bytes a sealed page adds to the page: nonce and tag.
const SEAL_OVERHEAD: u64 = 28;

/// Where the commands of a test reach the S3 store.
enum Target {
    /// A `serve --store s3://…`.
    Serve(Box<TestServer>, String),
    /// The embedded store over S3: `--server s3://…`.
    Embedded(String),
}

impl Target {
    fn location(&self) -> &str {
        match self {
            Target::Serve(_, l) | Target::Embedded(l) => l,
        }
    }

    /// `sqlferry ARGS` on `m`, through this target.
    fn run(&self, m: &Machine, args: &[&str]) -> Output {
        self.command(m, args).output().expect("run sqlferry")
    }

    /// `sqlferry ARGS` on `m` with this target's server options.
    fn command(&self, m: &Machine, args: &[&str]) -> std::process::Command {
        let mut cmd = m.command();
        cmd.args(args);
        match self {
            Target::Serve(s, _) => cmd
                .arg("--server")
                .arg(&s.url)
                .arg("--key")
                .arg(&s.admin_key),
            Target::Embedded(l) => cmd
                .args(["--server", l, "--s3-endpoint"])
                .arg(&seaweed::shared().endpoint)
                .envs(aws_env()),
        };
        cmd
    }

    /// [`Target::run`] with `--json`, asserted to succeed.
    fn ok(&self, m: &Machine, args: &[&str], what: &str) -> Report {
        let mut all = args.to_vec();
        all.push("--json");
        Report::of(&self.run(m, &all), what)
    }
}

/// The bucket of `location` (`s3://BUCKET/PREFIX`) and the prefix, with a runtime to
/// wait on it: the test's own client, not sqlferry's.
fn bucket(
    location: &str,
) -> (
    object_store::aws::AmazonS3,
    object_store::path::Path,
    tokio::runtime::Runtime,
) {
    let rest = location.strip_prefix("s3://").expect("an s3:// location");
    let (bucket, prefix) = rest.split_once('/').expect("a prefix");
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region("us-east-1")
        .with_endpoint(&seaweed::shared().endpoint)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_access_key_id(ACCESS_KEY)
        .with_secret_access_key(SECRET_KEY)
        .build()
        .expect("a client of the test bucket");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    (store, object_store::path::Path::from(prefix), runtime)
}

/// Every object under `location`: its name below the prefix and its bytes.
fn objects(location: &str) -> Vec<(String, Vec<u8>)> {
    let (store, prefix, rt) = bucket(location);
    let listed = rt
        .block_on(store.list(Some(&prefix)).try_collect::<Vec<_>>())
        .expect("list the bucket");
    let mut out: Vec<(String, Vec<u8>)> = listed
        .into_iter()
        .map(|meta| {
            let bytes = rt
                .block_on(async { store.get(&meta.location).await.expect("get").bytes().await })
                .expect("read an object");
            let name = meta.location.to_string();
            let name = name
                .strip_prefix(&format!("{prefix}/"))
                .unwrap_or(&name)
                .to_owned();
            (name, bytes.to_vec())
        })
        .collect();
    out.sort();
    out
}

/// Flips one bit of object `name` under `location`, `at` bytes in.
fn flip(location: &str, name: &str, at: usize) {
    let (store, prefix, rt) = bucket(location);
    let path = object_store::path::Path::from(format!("{prefix}/{name}"));
    rt.block_on(async {
        let mut bytes = store
            .get(&path)
            .await
            .expect("get")
            .bytes()
            .await
            .expect("read")
            .to_vec();
        bytes[at] ^= 0x10;
        store.put(&path, bytes.into()).await.expect("put it back");
    });
}

/// `app.db` of `m`: 40,000 rows that each carry the marker, in WAL mode (about 590
/// pages), the last change left in the WAL.
fn marked_wal_db(m: &Machine) -> std::path::PathBuf {
    let path = m.path("app.db");
    let conn = util::create(&path, 4096, util::Mode::Wal);
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .expect("no checkpoint");
    conn.execute_batch(&format!(
        "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 40000)
         INSERT INTO notes(body) SELECT '{MARKER} note ' || i || ' of someone''s data' FROM n;"
    ))
    .expect("rows");
    path
}

/// No object under `location` holds `needle`.
fn assert_bucket_lacks(location: &str, needle: &[u8], what: &str) {
    let holding: Vec<String> = objects(location)
        .into_iter()
        .filter(|(_, b)| b.windows(needle.len()).any(|w| w == needle))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(holding, Vec::<String>::new(), "objects holding {what}");
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Everything a user does with a replica encrypted by key files, on one target.
/// `meta`: the PostgreSQL database of a `serve --meta`, whose dump must hold no marker
/// and the key id of every version.
fn key_file_round_trip(target: Target, meta: Option<&str>) {
    let location = target.location().to_owned();
    let dir = TempDir::new().expect("tempdir");
    let m = Machine::new(dir.path(), "origin");
    let other = Machine::new(dir.path(), "other");
    let db = marked_wal_db(&m);
    let (a_file, b_file) = (keygen(&m, "a.key"), keygen(&m, "b.key"));
    let (a_id, b_id) = (
        read_key(&a_file).id().to_string(),
        read_key(&b_file).id().to_string(),
    );
    let (af, bf) = (s(&a_file), s(&b_file));

    // Version 1 with key A, and a commit message that carries the marker too (it
    // travels only inside the seal).
    let message = format!("{MARKER} in a commit message");
    let first = target.ok(
        &m,
        &[
            "push",
            "app.db",
            REPLICA,
            "-m",
            &message,
            "--encryption-key-file",
            af,
        ],
        "the keyed push",
    );
    assert_eq!(first.u64("version"), 1);
    assert_eq!(first.0["encryption_key_id"], a_id.as_str());
    let digest1 = util::digest(&db);
    assert_eq!(first.0["plaintext_digest"], digest1.as_str());
    let total = first.u64("pages_total");
    assert!(total > 500, "{total} pages");

    // The bucket: no marker anywhere; every pack index a sealed one whose identities
    // are no page's SHA-256; the version object names the key and keeps the seal.
    assert_bucket_lacks(&location, MARKER.as_bytes(), "the marker");
    let hashes = util::page_hashes(&db);
    let all = objects(&location);
    let magic = sqlferry::store::s3::IDX_SEALED_MAGIC;
    let idx: Vec<&Vec<u8>> = all
        .iter()
        .filter(|(n, _)| n.ends_with(".idx"))
        .map(|(_, b)| b)
        .collect();
    assert_eq!(
        idx.len(),
        1,
        "one pack: {:?}",
        all.iter().map(|o| &o.0).collect::<Vec<_>>()
    );
    for bytes in &idx {
        assert!(bytes.starts_with(magic), "a sealed pack's index");
        let entries = &bytes[magic.len() + 4..];
        assert_eq!(entries.len() % (32 + 8 + 4 + 32), 0);
        for e in entries.chunks_exact(32 + 8 + 4 + 32) {
            assert!(
                !hashes.iter().any(|h| h[..] == e[..32]),
                "a page hash stored"
            );
            let len = u32::from_be_bytes(e[40..44].try_into().expect("4 bytes"));
            assert_eq!(
                u64::from(len),
                4096 + SEAL_OVERHEAD,
                "stored sealed, uncompressed"
            );
        }
    }
    let v1: serde_json::Value = serde_json::from_slice(
        &all.iter()
            .find(|(n, _)| n == "replicas/acme/app.db/v/1")
            .expect("version 1's object")
            .1,
    )
    .expect("JSON");
    assert_eq!(v1["encryption_key_id"], a_id.as_str());
    assert_eq!(v1["format"], 2);
    assert!(v1["seal"].as_str().is_some_and(|t| !t.is_empty()), "{v1}");
    assert!(!v1.to_string().contains(MARKER));

    // `versions` names the key id (the index's row too, with --meta).
    let listed = target.ok(&m, &["versions", REPLICA], "versions");
    assert_eq!(listed.0[0]["encryption"], a_id.as_str(), "{}", listed.0);

    // Another machine pulls it with the key: the rows, an intact database, the digest.
    let pulled = target.ok(
        &other,
        &["pull", REPLICA, "copy.db", "--encryption-key-file", af],
        "the keyed pull",
    );
    assert_eq!(pulled.u64("version"), 1);
    let copy = other.path("copy.db");
    assert_eq!(util::digest(&copy), digest1);
    assert_eq!(util::integrity(&copy), "ok");
    assert_eq!(notes(&copy).0, 40_000);
    assert!(notes(&copy).1.contains(MARKER));

    // A wrong key: exit 5 naming both key ids, LOCAL byte for byte as it was.
    let (dest, before) = existing_dest(&other.work);
    let out = target.run(
        &other,
        &[
            "pull",
            REPLICA,
            s(&dest),
            "--force",
            "--encryption-key-file",
            bf,
        ],
    );
    let line = assert_fails(&out, EXIT_AUTH, &a_id);
    assert!(line.contains(&b_id), "{line}");
    assert_eq!(
        std::fs::read(&dest).expect("read"),
        before,
        "LOCAL unchanged"
    );

    // A 1% change (400 of 40,000 rows, side by side): about 1% of the pages sent and
    // uploaded.
    util::open(&db)
        .execute(
            "UPDATE notes SET body = 'changed ' || id WHERE id <= 400",
            [],
        )
        .expect("update");
    let digest2 = util::digest(&db);
    let objects_before = objects(&location);
    let second = target.ok(
        &m,
        &["push", "app.db", REPLICA, "--encryption-key-file", af],
        "the 1% push",
    );
    assert_eq!(second.u64("version"), 2);
    let sent = second.u64("pages_sent");
    assert!(
        sent >= 1 && sent * 40 <= total,
        "{sent} of {total} pages sent for 1% of the rows"
    );
    let new: Vec<(String, usize)> = objects(&location)
        .into_iter()
        .filter(|o| !objects_before.contains(o))
        .map(|(n, b)| (n, b.len()))
        .collect();
    let pack: u64 = new
        .iter()
        .filter(|(n, _)| n.ends_with(".pack"))
        .map(|(_, l)| *l as u64)
        .sum();
    assert_eq!(
        pack,
        sent * (4096 + SEAL_OVERHEAD),
        "only the pages sent: {new:?}"
    );
    let uploaded: u64 = new.iter().map(|(_, l)| *l as u64).sum();
    eprintln!(
        "a 1% change: {sent} of {total} pages sent, {uploaded} bytes uploaded in {} objects",
        new.len()
    );
    assert!(
        uploaded * 20 < total * 4096,
        "{uploaded} bytes uploaded for a 1% change: {new:?}"
    );

    // Refused before anything is stored, the bucket unchanged: a keyless push, another
    // key without a rekey, and a sealed push from a stale base, forced or not.
    let unchanged = objects(&location);
    let out = target.run(&m, &["push", "app.db", REPLICA]);
    assert_fails(&out, EXIT_AUTH, "is encrypted");
    let out = target.run(
        &m,
        &["push", "app.db", REPLICA, "--encryption-key-file", bf],
    );
    let line = assert_fails(&out, EXIT_AUTH, &a_id);
    assert!(line.contains(&b_id), "{line}");
    util::open(&copy)
        .execute("UPDATE notes SET body = 'stale' WHERE id = 5000", [])
        .expect("update the copy");
    for force in [false, true] {
        let mut args = vec!["push", "copy.db", REPLICA, "--encryption-key-file", af];
        if force {
            args.push("--force");
        }
        let out = target.run(&other, &args);
        assert_eq!(util::code(&out), EXIT_CONFLICT, "{}", util::stderr(&out));
    }
    assert!(objects(&location) == unchanged, "the bucket unchanged");

    // A plaintext replica (of a database without the marker) takes no keyed push.
    util::create(&m.path("plain.db"), 4096, util::Mode::Wal)
        .execute_batch("CREATE TABLE plain(x); INSERT INTO plain VALUES ('plain');")
        .expect("a plaintext database");
    target.ok(
        &m,
        &["push", "plain.db", "acme/plain.db"],
        "a plaintext push",
    );
    let out = target.run(
        &m,
        &[
            "push",
            "plain.db",
            "acme/plain.db",
            "--encryption-key-file",
            af,
        ],
    );
    assert_fails(&out, EXIT_AUTH, "is not encrypted");

    // The rekey to B: version 3, every page sent; each version pulls with its own key.
    let before_rekey: Vec<String> = objects(&location).into_iter().map(|(n, _)| n).collect();
    let rekeyed = target.ok(
        &m,
        &[
            "rekey",
            REPLICA,
            "--new-key-file",
            bf,
            "--encryption-key-file",
            af,
        ],
        "the rekey",
    );
    assert_eq!(rekeyed.u64("version"), 3);
    assert_eq!(rekeyed.0["encryption_key_id"], b_id.as_str());
    assert_eq!(rekeyed.u64("pages_sent"), rekeyed.u64("pages_total"));
    assert_bucket_lacks(&location, MARKER.as_bytes(), "the marker");
    let at = |n: u32| format!("{REPLICA}@{n}");
    for (spec, key, digest) in [(at(1), af, &digest1), (at(3), bf, &digest2)] {
        let name = format!("v{}.db", &spec[spec.len() - 1..]);
        let r = target.ok(
            &other,
            &["pull", &spec, &name, "--encryption-key-file", key],
            "a pull of a version with its key",
        );
        assert_eq!(util::digest(&other.path(&name)), *digest, "{}", r.0);
        assert_eq!(util::integrity(&other.path(&name)), "ok");
    }
    let out = target.run(
        &other,
        &["pull", REPLICA, "old-key.db", "--encryption-key-file", af],
    );
    let line = assert_fails(&out, EXIT_AUTH, &b_id);
    assert!(line.contains(&a_id), "{line}");

    // Retention keeps the last version only: versions 1 and 2 (key A) become
    // tombstones, and a server's sweep (grace 0 s) deletes the packs only they name,
    // keeping the rekey's; the latest still pulls with B, version 1 is refused.
    let (rekey_pack, len) = objects(&location)
        .into_iter()
        .map(|(n, b)| (n, b.len()))
        .find(|(n, _)| n.ends_with(".pack") && !before_rekey.contains(n))
        .expect("the rekey's pack");
    target.ok(
        &m,
        &["retention", REPLICA, "--keep-last", "1"],
        "retention --keep-last 1",
    );
    let pruned = target.ok(&m, &["prune", REPLICA], "prune");
    assert_eq!(
        pruned.0["removed"],
        serde_json::json!([1, 2]),
        "{}",
        pruned.0
    );
    if matches!(target, Target::Serve(..)) {
        let packs: Vec<String> = objects(&location)
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n.ends_with(".pack"))
            .collect();
        assert_eq!(packs.len(), 2, "the rekey's and plain.db's: {packs:?}");
        assert!(packs.contains(&rekey_pack), "{packs:?}");
    }
    let after = target.ok(
        &other,
        &[
            "pull",
            REPLICA,
            "after-prune.db",
            "--encryption-key-file",
            bf,
        ],
        "a pull after the prune",
    );
    assert_eq!(after.u64("version"), 3);
    assert_eq!(util::digest(&other.path("after-prune.db")), digest2);
    let out = target.run(
        &other,
        &["pull", &at(1), "gone.db", "--encryption-key-file", af],
    );
    assert_eq!(util::code(&out), EXIT_NOT_FOUND, "{}", util::stderr(&out));

    // verify REMOTE with the key: the plaintext digest; then a flipped byte of the
    // rekey's sealed pack is found (exit 7), by verify and by a pull (LOCAL unchanged).
    let verified = target.ok(
        &m,
        &["verify", "--replica", REPLICA, "--encryption-key-file", bf],
        "verify with the key",
    );
    assert_eq!(verified.0["digest"], digest2.as_str(), "{}", verified.0);
    assert_eq!(verified.0["integrity"], serde_json::json!(["ok"]));
    flip(&location, &rekey_pack, len / 2);
    let out = target.run(
        &m,
        &["verify", "--replica", REPLICA, "--encryption-key-file", bf],
    );
    assert_fails(&out, EXIT_VERIFY, "damaged");
    let (dest, before) = existing_dest(&m.work);
    let out = target.run(
        &m,
        &[
            "pull",
            REPLICA,
            s(&dest),
            "--force",
            "--encryption-key-file",
            bf,
        ],
    );
    assert_eq!(
        util::code(&out),
        EXIT_VERIFY,
        "{} {}",
        util::stderr(&out),
        util::stdout(&out)
    );
    assert_eq!(
        std::fs::read(&dest).expect("read"),
        before,
        "LOCAL unchanged"
    );

    // PostgreSQL holds no marker, and the key id of each version.
    if let Some(url) = meta {
        let dump = postgres::shared().dump(url.rsplit('/').next().expect("a database name"));
        assert!(
            !dump.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
            "the marker in the PostgreSQL dump"
        );
        let text = String::from_utf8_lossy(&dump);
        assert!(
            text.contains(&a_id) && text.contains(&b_id),
            "the key ids in the index"
        );
    }
}

#[test]
fn a_key_file_replica_through_a_server_over_s3_with_meta() {
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    let meta = postgres::shared().database();
    let server = s3_server(
        dir.path(),
        "s3",
        &location,
        &["--meta", &meta, "--gc-grace", "0s"],
        None,
    );
    key_file_round_trip(Target::Serve(Box::new(server), location), Some(&meta));
}

#[test]
fn a_key_file_replica_in_the_embedded_store_over_s3() {
    key_file_round_trip(Target::Embedded(new_location()), None);
}

/// A passphrase file `name` on `m` holding `text` and a newline, mode 0600.
fn passphrase_file(m: &Machine, name: &str, text: &str) -> std::path::PathBuf {
    let path = m.path(name);
    std::fs::write(&path, format!("{text}\n")).expect("write the passphrase file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

/// A replica encrypted with a passphrase, on one target.
fn passphrase_round_trip(target: Target) {
    const PASSPHRASE: &str = "correct horse battery staple";
    let location = target.location().to_owned();
    let dir = TempDir::new().expect("tempdir");
    let m = Machine::new(dir.path(), "origin");
    let other = Machine::new(dir.path(), "other");
    let db = marked_wal_db(&m);
    let pf = passphrase_file(&m, "pass", PASSPHRASE);
    let first = target.ok(
        &m,
        &["push", "app.db", REPLICA, "--passphrase-file", s(&pf)],
        "the first push with a passphrase",
    );
    assert_eq!(first.u64("version"), 1);
    // The salt object: one, public by design; no marker and no passphrase anywhere.
    let all = objects(&location);
    let salt = &all
        .iter()
        .find(|(n, _)| n == "replicas/acme/app.db/passphrase.json")
        .expect("the replica's salt object")
        .1;
    let salt: serde_json::Value = serde_json::from_slice(salt).expect("JSON");
    assert_eq!(salt["salt"].as_str().map(str::len), Some(32), "{salt}");
    assert_bucket_lacks(&location, MARKER.as_bytes(), "the marker");
    assert_bucket_lacks(&location, PASSPHRASE.as_bytes(), "the passphrase");

    // Another machine pulls with the same passphrase; a change follows.
    let of = passphrase_file(&other, "pass", PASSPHRASE);
    target.ok(
        &other,
        &["pull", REPLICA, "copy.db", "--passphrase-file", s(&of)],
        "the pull with the passphrase",
    );
    let copy = other.path("copy.db");
    assert_eq!(util::digest(&copy), util::digest(&db));
    assert_eq!(util::integrity(&copy), "ok");
    util::open(&db)
        .execute("UPDATE notes SET body = 'changed' WHERE id = 77", [])
        .expect("update");
    let second = target.ok(
        &m,
        &["push", "app.db", REPLICA, "--passphrase-file", s(&pf)],
        "the second push with the passphrase",
    );
    assert_eq!(second.u64("version"), 2);
    assert!(second.u64("pages_sent") <= 4, "{}", second.0);
    target.ok(
        &other,
        &["pull", REPLICA, "copy.db", "--passphrase-file", s(&of)],
        "the pull of version 2",
    );
    assert_eq!(notes(&copy), (40_000, "changed".into()));
    assert_eq!(
        objects(&location)
            .iter()
            .filter(|(n, _)| n.ends_with("passphrase.json"))
            .count(),
        1,
        "the salt is written once"
    );

    // A wrong passphrase: exit 5, LOCAL byte for byte as it was.
    let wrong = passphrase_file(&other, "wrong", "another passphrase entirely");
    let (dest, before) = existing_dest(&other.work);
    let out = target.run(
        &other,
        &[
            "pull",
            REPLICA,
            s(&dest),
            "--force",
            "--passphrase-file",
            s(&wrong),
        ],
    );
    assert_fails(&out, EXIT_AUTH, "--passphrase-file");
    assert_eq!(
        std::fs::read(&dest).expect("read"),
        before,
        "LOCAL unchanged"
    );
}

#[test]
fn a_passphrase_replica_through_a_server_over_s3() {
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    let server = s3_server(dir.path(), "s3", &location, &[], None);
    passphrase_round_trip(Target::Serve(Box::new(server), location));
}

#[test]
fn a_passphrase_replica_in_the_embedded_store_over_s3() {
    passphrase_round_trip(Target::Embedded(new_location()));
}

/// Replaces object `name` under `location` with `bytes`.
fn put(location: &str, name: &str, bytes: Vec<u8>) {
    let (store, prefix, rt) = bucket(location);
    let path = object_store::path::Path::from(format!("{prefix}/{name}"));
    rt.block_on(store.put(&path, bytes.into()))
        .expect("put the object");
}

/// The bytes of object `name` under `location`.
fn object(location: &str, name: &str) -> Vec<u8> {
    objects(location)
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("object {name}"))
        .1
}

/// A hostile bucket under the embedded store: a sealed pack index whose checksum of
/// one entry was edited, a version object whose key id was edited (to another key the
/// puller holds, and to one it does not), and a passphrase salt object replaced by
/// another salt. Each pull fails with LOCAL byte for byte as it was, on a machine
/// whose cache never saw the true objects; a push onto the edited replica is refused
/// and stores no version.
#[test]
fn a_hostile_bucket_changes_no_local_file() {
    let location = new_location();
    let target = Target::Embedded(location.clone());
    let dir = TempDir::new().expect("tempdir");
    let m = Machine::new(dir.path(), "origin");
    marked_wal_db(&m);
    let (a_file, b_file) = (keygen(&m, "a.key"), keygen(&m, "b.key"));
    let b_id = read_key(&b_file).id().to_string();
    let (af, bf) = (s(&a_file), s(&b_file));
    target.ok(
        &m,
        &["push", "app.db", REPLICA, "--encryption-key-file", af],
        "the keyed push",
    );
    let mut fresh = 0;
    let mut refused = |args: &[&str], code: i32, words: &str, what: &str| {
        fresh += 1;
        let other = Machine::new(dir.path(), &format!("other{fresh}"));
        let (dest, before) = existing_dest(&other.work);
        let mut all = vec!["pull", REPLICA, s(&dest), "--force"];
        all.extend_from_slice(args);
        let out = target.run(&other, &all);
        let line = assert_fails(&out, code, words);
        assert_eq!(
            std::fs::read(&dest).expect("read"),
            before,
            "{what}: LOCAL changed ({line})"
        );
    };

    // One entry's checksum in the sealed pack index, edited.
    let idx_name = objects(&location)
        .into_iter()
        .find(|(n, _)| n.ends_with(".idx"))
        .expect("a pack index")
        .0;
    let idx = object(&location, &idx_name);
    let magic = sqlferry::store::s3::IDX_SEALED_MAGIC;
    let mut edited = idx.clone();
    edited[magic.len() + 4 + 5 * (32 + 8 + 4 + 32) + 44 + 3] ^= 0x01;
    put(&location, &idx_name, edited);
    refused(
        &["--encryption-key-file", af],
        EXIT_VERIFY,
        "",
        "an edited checksum",
    );
    put(&location, &idx_name, idx);

    // The version object's key id, edited to B's: a puller given A and B opens the seal
    // with B, which does not open it; a puller given only A is told the version's key.
    let v1_name = "replicas/acme/app.db/v/1";
    let v1 = object(&location, v1_name);
    let mut json: serde_json::Value = serde_json::from_slice(&v1).expect("JSON");
    json["encryption_key_id"] = b_id.as_str().into();
    put(&location, v1_name, serde_json::to_vec(&json).expect("JSON"));
    refused(
        &["--encryption-key-file", af, "--encryption-key-file", bf],
        EXIT_VERIFY,
        "",
        "a key id edited to another key given",
    );
    refused(
        &["--encryption-key-file", af],
        EXIT_AUTH,
        &b_id,
        "a key id edited to a key not given",
    );
    let pusher = Machine::new(dir.path(), "pusher");
    marked_wal_db(&pusher);
    let out = target.run(
        &pusher,
        &["push", "app.db", REPLICA, "--encryption-key-file", af],
    );
    assert_fails(&out, EXIT_AUTH, &b_id);
    assert!(
        !objects(&location)
            .iter()
            .any(|(n, _)| n == "replicas/acme/app.db/v/2"),
        "no version 2"
    );
    put(&location, v1_name, v1);

    // A passphrase replica whose salt object is replaced by another salt.
    const SALTED: &str = "acme/salted.db";
    let pf = passphrase_file(&m, "pass", "correct horse battery staple");
    target.ok(
        &m,
        &["push", "app.db", SALTED, "--passphrase-file", s(&pf)],
        "the passphrase push",
    );
    let salt_name = "replicas/acme/salted.db/passphrase.json";
    let mut salt: serde_json::Value =
        serde_json::from_slice(&object(&location, salt_name)).expect("JSON");
    assert_ne!(salt["salt"], "00112233445566778899aabbccddeeff");
    salt["salt"] = "00112233445566778899aabbccddeeff".into();
    put(
        &location,
        salt_name,
        serde_json::to_vec(&salt).expect("JSON"),
    );
    let other = Machine::new(dir.path(), "salted");
    let (dest, before) = existing_dest(&other.work);
    let out = target.run(
        &other,
        &[
            "pull",
            SALTED,
            s(&dest),
            "--force",
            "--passphrase-file",
            s(&pf),
        ],
    );
    assert_fails(&out, EXIT_AUTH, "");
    assert_eq!(std::fs::read(&dest).expect("read"), before, "LOCAL changed");
    let pusher = Machine::new(dir.path(), "salted-pusher");
    marked_wal_db(&pusher);
    let out = target.run(
        &pusher,
        &["push", "app.db", SALTED, "--passphrase-file", s(&pf)],
    );
    assert_fails(&out, EXIT_AUTH, "");
    assert!(
        !objects(&location)
            .iter()
            .any(|(n, _)| n == "replicas/acme/salted.db/v/2"),
        "no version 2"
    );
}

impl Target {
    /// `sqlferry ARGS --json` on `m` through this target, started and not waited for.
    fn spawn(&self, m: &Machine, args: &[&str]) -> std::process::Child {
        let mut cmd = self.command(m, args);
        cmd.arg("--json")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start sqlferry")
    }
}

/// Two commands, `one` on `a` and `two` on `b`, started together through `target`;
/// their outputs in that order. Whichever runs first, both are waited for.
fn race(
    target: &Target,
    (a, one): (&Machine, &[&str]),
    (b, two): (&Machine, &[&str]),
) -> [Output; 2] {
    let (x, y) = (target.spawn(a, one), target.spawn(b, two));
    [x, y].map(|c| c.wait_with_output().expect("wait for sqlferry"))
}

/// The versions of `replica` as `versions --json` lists them: number and key id.
fn listed(target: &Target, m: &Machine, replica: &str) -> Vec<(u64, Option<String>)> {
    let r = target.ok(m, &["versions", replica], "versions");
    r.0.as_array()
        .expect("a list")
        .iter()
        .map(|v| {
            (
                v["number"].as_u64().expect("a number"),
                v["encryption"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

/// The rows of PostgreSQL's versions index for `replica` (`--meta`): number and key id.
fn indexed(meta: &str, replica: &str) -> Vec<(u64, Option<String>)> {
    let db = meta.rsplit('/').next().expect("a database name");
    postgres::shared()
        .psql(
            db,
            &format!(
                "SELECT number, coalesce(encryption_key_id, '') FROM sqlferry_versions \
                 WHERE replica = '{replica}' ORDER BY number"
            ),
        )
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, k) = l.split_once('|').expect("two columns");
            let k = (!k.is_empty()).then(|| k.to_owned());
            (n.parse().expect("a number"), k)
        })
        .collect()
}

/// How many salt objects `replica` has under `location`.
fn salts(location: &str, replica: &str) -> usize {
    let name = format!("replicas/{replica}/passphrase.json");
    objects(location).iter().filter(|(n, _)| *n == name).count()
}

/// Two first pushes with a passphrase to the same new replica, started together: with
/// two passphrases, and with one passphrase from two files. Whichever wins, exactly
/// one salt is stored; every version opens with the passphrase whose push made it
/// (rows, `PRAGMA integrity_check`, digest); a push that lost made no version and
/// exited 5 (another salt, or another key id: said so) or 6 (a conflict with the
/// winner's version under the same key); and the replica takes the next push with the
/// winner's passphrase from the loser's machine once it pulled.
fn first_passphrase_pushes_racing(target: Target, meta: Option<&str>) {
    let location = target.location().to_owned();
    let dir = TempDir::new().expect("tempdir");
    let a = Machine::new(dir.path(), "a");
    let b = Machine::new(dir.path(), "b");
    let reader = Machine::new(dir.path(), "reader");
    let (db_a, db_b) = (marked_wal_db(&a), marked_wal_db(&b));
    util::open(&db_b)
        .execute("UPDATE notes SET body = 'b was here' WHERE id <= 10", [])
        .expect("b's own change");
    let pa = passphrase_file(&a, "pass", "the passphrase of a");
    for (replica, b_text) in [
        ("acme/two-passphrases.db", "the passphrase of b"),
        ("acme/one-passphrase.db", "the passphrase of a"),
    ] {
        let same = b_text == "the passphrase of a";
        let pb = passphrase_file(&b, &format!("pass-{same}"), b_text);
        let outs = race(
            &target,
            (
                &a,
                &["push", "app.db", replica, "--passphrase-file", s(&pa)],
            ),
            (
                &b,
                &["push", "app.db", replica, "--passphrase-file", s(&pb)],
            ),
        );
        let codes: Vec<i32> = outs.iter().map(util::code).collect();
        eprintln!(
            "{replica}: exit codes {codes:?}; {}",
            outs.iter().map(util::stderr).collect::<String>().trim()
        );
        assert_eq!(salts(&location, replica), 1, "one salt object");
        // The versions that exist are the ones the successful pushes said they made.
        let mut made = Vec::new();
        for (i, out) in outs.iter().enumerate() {
            let err = util::stderr(out);
            match util::code(out) {
                0 => {
                    let r = Report::of(out, "the push that won");
                    let key = r.0["encryption_key_id"].as_str().expect("a key id");
                    made.push((r.u64("version"), Some(key.to_owned()), i));
                }
                5 => assert!(
                    err.contains(replica)
                        && (err.contains("another passphrase salt") || err.contains("key id")),
                    "{err}"
                ),
                6 if same => assert!(err.contains("VERSION_CONFLICT"), "{err}"),
                code => panic!("push {i} exited {code}: {err}"),
            }
        }
        assert_eq!(made.len(), 1, "exactly one push wins: {codes:?}");
        let versions: Vec<(u64, Option<String>)> =
            made.iter().map(|(n, k, _)| (*n, k.clone())).collect();
        assert_eq!(listed(&target, &reader, replica), versions);
        if let Some(url) = meta {
            assert_eq!(indexed(url, replica), versions, "PostgreSQL's rows");
        }
        // The winner's passphrase opens its version, on another machine; the loser's,
        // when it is another passphrase, is refused.
        let (_, _, winner) = made[0];
        let (db, text) = match winner {
            0 => (&db_a, "the passphrase of a"),
            _ => (&db_b, b_text),
        };
        let rp = passphrase_file(&reader, &format!("{replica}.pass").replace('/', "-"), text);
        let copy = format!("{}.db", replica.replace('/', "-"));
        target.ok(
            &reader,
            &["pull", replica, &copy, "--passphrase-file", s(&rp)],
            "the pull with the winner's passphrase",
        );
        assert_eq!(util::digest(&reader.path(&copy)), util::digest(db));
        assert_eq!(util::integrity(&reader.path(&copy)), "ok");
        assert_eq!(notes(&reader.path(&copy)), notes(db));
        if !same {
            let loser_pass = if winner == 0 { &pb } else { &pa };
            let out = target.run(
                &reader,
                &["pull", replica, "no.db", "--passphrase-file", s(loser_pass)],
            );
            assert_fails(&out, EXIT_AUTH, "key id");
        }
        // The loser's machine, given the winner's passphrase, pulls the replica over its
        // LOCAL (discarding its change, as asked) and pushes a change as version 2.
        let (loser, loser_db) = match winner {
            0 => (&b, &db_b),
            _ => (&a, &db_a),
        };
        let lp = passphrase_file(loser, &format!("{replica}.win").replace('/', "-"), text);
        target.ok(
            loser,
            &[
                "pull",
                replica,
                "app.db",
                "--force",
                "--passphrase-file",
                s(&lp),
            ],
            "the loser pulls the winner's version",
        );
        util::open(loser_db)
            .execute(
                "UPDATE notes SET body = 'after the race for ' || ?1 WHERE id = 99",
                [replica],
            )
            .expect("a change after the race");
        let next = target.ok(
            loser,
            &["push", "app.db", replica, "--passphrase-file", s(&lp)],
            "the push after the race",
        );
        assert_eq!(next.u64("version"), 2);
        assert_eq!(salts(&location, replica), 1, "still one salt object");
    }
}

#[test]
fn first_passphrase_pushes_racing_through_a_server_over_s3_with_meta() {
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    let meta = postgres::shared().database();
    let server = s3_server(dir.path(), "s3", &location, &["--meta", &meta], None);
    first_passphrase_pushes_racing(Target::Serve(Box::new(server), location), Some(&meta));
}

#[test]
fn first_passphrase_pushes_racing_in_the_embedded_store_over_s3() {
    first_passphrase_pushes_racing(Target::Embedded(new_location()), None);
}

/// A plaintext push and a first push with a passphrase to the same new replica,
/// started together. Exactly one kind wins: the other is refused with the mix's
/// message (exit 5: "is encrypted" or "is not encrypted"), never a conflict whose
/// advice (`--force`) could not work; the replica is one version of the winner's kind
/// in the bucket and in PostgreSQL's index, and a pull of it works (with the
/// passphrase when the winner was encrypted, and a passphrase pull of a plaintext
/// winner is refused).
fn plaintext_and_passphrase_first_pushes_racing(target: Target, meta: Option<&str>) {
    let dir = TempDir::new().expect("tempdir");
    let a = Machine::new(dir.path(), "plain");
    let b = Machine::new(dir.path(), "sealed");
    let reader = Machine::new(dir.path(), "reader");
    let (db_a, db_b) = (marked_wal_db(&a), marked_wal_db(&b));
    util::open(&db_b)
        .execute("UPDATE notes SET body = 'sealed' WHERE id <= 10", [])
        .expect("b's own change");
    let pb = passphrase_file(&b, "pass", "the passphrase of b");
    let rp = passphrase_file(&reader, "pass", "the passphrase of b");
    const RUNS: usize = 3;
    for run in 0..RUNS {
        let replica = format!("acme/mixed-{run}.db");
        // The passphrase push stretches its key (a third of a second) before it opens:
        // the plaintext push grows from run to run (by 4 MB, then 8 MB more) so that it
        // is still sending when the other begins, and may lose the race at its commit.
        if run > 0 {
            util::open(&db_a)
                .execute_batch(&format!(
                    "CREATE TABLE IF NOT EXISTS ballast(b BLOB);
                     WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {})
                     INSERT INTO ballast SELECT randomblob(4000) FROM n;",
                    1000 * run
                ))
                .expect("ballast");
        }
        let outs = race(
            &target,
            (&a, &["push", "app.db", &replica]),
            (
                &b,
                &["push", "app.db", &replica, "--passphrase-file", s(&pb)],
            ),
        );
        let codes: Vec<i32> = outs.iter().map(util::code).collect();
        eprintln!(
            "{replica}: exit codes {codes:?} (plaintext, passphrase); {}",
            outs.iter().map(util::stderr).collect::<String>().trim()
        );
        let (winner, loser) = util::winner_and_loser(&codes);
        let err = util::stderr(&outs[loser]);
        assert_eq!(codes[loser], EXIT_AUTH, "the mix refused: {err}");
        let words = match winner {
            0 => "is not encrypted",
            _ => "is encrypted",
        };
        assert!(err.contains(words) && err.contains(&replica), "{err}");
        let key = Report::of(&outs[winner], "the winner").0["encryption_key_id"]
            .as_str()
            .map(str::to_owned);
        assert_eq!(key.is_some(), winner == 1, "the winner's kind");
        let versions = vec![(1, key)];
        assert_eq!(listed(&target, &reader, &replica), versions);
        if let Some(url) = meta {
            assert_eq!(indexed(url, &replica), versions, "PostgreSQL's rows");
        }
        let copy = format!("copy-{run}.db");
        let (db, args) = match winner {
            0 => (&db_a, vec!["pull", &replica, &copy]),
            _ => (
                &db_b,
                vec!["pull", &replica, &copy, "--passphrase-file", s(&rp)],
            ),
        };
        target.ok(&reader, &args, "the pull of the winner");
        assert_eq!(util::digest(&reader.path(&copy)), util::digest(db));
        assert_eq!(util::integrity(&reader.path(&copy)), "ok");
        // The other kind stays refused, by a pull too (a passphrase pull of the
        // plaintext winner: "keeps no passphrase salt", or, where the losing push left
        // its salt, "is not encrypted").
        let other: Vec<&str> = match winner {
            0 => vec!["pull", &replica, "no.db", "--passphrase-file", s(&rp)],
            _ => vec!["pull", &replica, "no.db"],
        };
        assert_fails(&target.run(&reader, &other), EXIT_AUTH, &replica);
    }
}

#[test]
fn plaintext_and_passphrase_first_pushes_racing_through_a_server_over_s3_with_meta() {
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    let meta = postgres::shared().database();
    let server = s3_server(dir.path(), "s3", &location, &["--meta", &meta], None);
    plaintext_and_passphrase_first_pushes_racing(
        Target::Serve(Box::new(server), location),
        Some(&meta),
    );
}

#[test]
fn plaintext_and_passphrase_first_pushes_racing_in_the_embedded_store_over_s3() {
    plaintext_and_passphrase_first_pushes_racing(Target::Embedded(new_location()), None);
}
