//! Encrypted replicas on the command line (end-to-end encryption, docs/security.md),
//! with real `sqlferry` processes: `keygen` writes a 0600 key and never overwrites
//! one; a WAL database whose rows carry a marker is pushed with the key into the
//! embedded store and into a real `sqlferry serve` on 127.0.0.1, and no file of the
//! store or of the server's data directory holds the marker; it pulls back with the
//! key (rows, integrity, digest), and a one-row change sends a few pages. A wrong key
//! exits 5 and a flipped stored ciphertext byte exits 7, LOCAL byte for byte as it
//! was; a keyless pull or push and a keyed push to a plaintext replica are refused;
//! `SQLFERRY_ENCRYPTION_KEY` works like the file; a key given where it cannot work
//! (a local copy, `--merge`, the daemon's environment) is refused, never ignored; a
//! conflicting push advises the one way out that works, and following it works.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use sqlferry::crypt::EncryptionKey;

use crate::sealed::{MARKER, existing_dest, marked_db};
use crate::server::{Machine, Report, TestServer, assert_fails};
use crate::util;

const REPLICA: &str = "acme/app.db";
const EXIT_AUTH: i32 = 5;
const EXIT_VERIFY: i32 = 7;

/// `sqlferry keygen FILE` on `m`, asserted to succeed; the key's path.
pub(crate) fn keygen(m: &Machine, name: &str) -> PathBuf {
    let out = m.run(["keygen", name]);
    assert_eq!(util::code(&out), 0, "keygen: {}", util::stderr(&out));
    m.path(name)
}

/// The key in a key file, as the tests' own check of identities.
pub(crate) fn read_key(path: &Path) -> EncryptionKey {
    let text = std::fs::read_to_string(path).expect("read the key file");
    sqlferry::crypt::parse_key_text(&text, "test").expect("a key")
}

/// The `pages/index.sqlite` under `root` (a store directory or a server's data).
pub(crate) fn page_index(root: &Path) -> PathBuf {
    util::files_under(root)
        .into_iter()
        .find(|p| p.ends_with("pages/index.sqlite"))
        .unwrap_or_else(|| panic!("no page index under {}", root.display()))
}

/// The store a page index (`<store>/pages/index.sqlite`) belongs to.
fn store_root(index: &Path) -> PathBuf {
    index
        .ancestors()
        .nth(2)
        .expect("<store>/pages/index.sqlite")
        .to_owned()
}

/// Flips one bit of the stored ciphertext of the page whose identity is `identity`
/// (past the nonce, in the sealed page's body).
pub(crate) fn flip_stored(root: &Path, identity: &[u8; 32]) {
    use std::os::unix::fs::FileExt;
    let index = page_index(root);
    let (pack, offset, codec): (i64, i64, i64) = util::index_snapshot(&store_root(&index))
        .query_row(
            "SELECT pack, offset, codec FROM pages WHERE hash = ?1",
            [&identity[..]],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("the page's identity is stored");
    assert_eq!(codec, 2, "a sealed entry");
    let pack = index.with_file_name(format!("{pack}.pack"));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pack)
        .expect("open the pack");
    let at = offset as u64 + 100;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).expect("read");
    b[0] ^= 0x10;
    f.write_all_at(&b, at).expect("write");
}

/// The rows of `notes` in `db`: (count, body of row 77).
pub(crate) fn notes(db: &Path) -> (i64, String) {
    let conn = util::open(db);
    let count = conn
        .query_row("SELECT count(*) FROM notes", [], |r| r.get(0))
        .expect("count");
    let body = conn
        .query_row("SELECT body FROM notes WHERE id = 77", [], |r| r.get(0))
        .expect("row 77");
    (count, body)
}

#[test]
fn keygen_writes_a_0600_key_and_never_overwrites_one() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let m = Machine::new(dir.path(), "m");
    let out = m.run(["keygen", "app.key"]);
    assert_eq!(util::code(&out), 0, "keygen: {}", util::stderr(&out));
    let path = m.path("app.key");
    let mode = std::fs::metadata(&path)
        .expect("key file")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the key file is its owner's only");
    let key = read_key(&path);
    // It says where the key is, its id, and what losing it means.
    let said = util::stdout(&out);
    assert!(said.contains("app.key"), "{said}");
    assert!(said.contains(&key.id().to_string()), "{said}");
    let note = util::stderr(&out);
    assert!(
        note.contains("no back door") && note.contains("lost"),
        "{note}"
    );

    // A second keygen to the same file is refused, naming it, and the key stays.
    let before = std::fs::read(&path).expect("read");
    let again = m.run(["keygen", "app.key"]);
    let line = assert_fails(&again, 2, "app.key");
    assert!(line.contains("never overwritten"), "{line}");
    assert_eq!(std::fs::read(&path).expect("read"), before);
    // Two keys are two keys.
    let other = keygen(&m, "other.key");
    assert_ne!(read_key(&other).id(), key.id());
}

/// The store `m`'s commands use: `file://` + a directory, or a server.
pub(crate) enum Store<'a> {
    Dir(PathBuf),
    Server(&'a TestServer),
}

impl Store<'_> {
    /// The directory whose files must hold no plaintext.
    pub(crate) fn files(&self) -> PathBuf {
        match self {
            Store::Dir(d) => d.clone(),
            Store::Server(s) => s.data_dir().to_owned(),
        }
    }

    /// `sqlferry ARGS` on `m` against this store (with the admin key on a server),
    /// with `env` set.
    pub(crate) fn run(
        &self,
        m: &Machine,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> std::process::Output {
        let mut cmd = m.command();
        cmd.args(args);
        match self {
            Store::Dir(d) => cmd.arg("--server").arg(format!("file://{}", d.display())),
            Store::Server(s) => cmd
                .arg("--server")
                .arg(&s.url)
                .arg("--key")
                .arg(&s.admin_key),
        };
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run sqlferry")
    }
}

/// Everything a user does with an encrypted replica, on one store.
fn encrypted_replica_round_trip(store: Store<'_>) {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let m = Machine::new(dir.path(), "m");
    let db = marked_db(&m.work);
    assert_eq!(util::journal_mode(&db), "wal");
    let key_file = keygen(&m, "app.key");
    let key = read_key(&key_file);
    let kf = key_file.to_str().expect("UTF-8 path");

    // The first push: a new encrypted replica.
    let out = store.run(
        &m,
        &[
            "push",
            "app.db",
            REPLICA,
            "--json",
            "--encryption-key-file",
            kf,
        ],
        &[],
    );
    let first = Report::of(&out, "the keyed push");
    assert_eq!(first.u64("version"), 1);
    assert_eq!(first.0["encryption_key_id"], key.id().to_string());
    assert_eq!(first.0["plaintext_digest"], util::digest(&db));
    assert_ne!(
        first.digest(),
        util::digest(&db),
        "the store's digest is over identities"
    );

    // No file of the store holds the marker, nor any page's SHA-256.
    assert_eq!(
        util::holding(&store.files(), MARKER.as_bytes()),
        Vec::<PathBuf>::new()
    );
    let hashes = util::page_hashes(&db);
    let index = util::index_snapshot(&store_root(&page_index(&store.files())));
    let mut stmt = index
        .prepare("SELECT hash, codec FROM pages")
        .expect("prepare");
    let rows: Vec<(Vec<u8>, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("rows")
        .collect::<rusqlite::Result<_>>()
        .expect("rows");
    assert!(!rows.is_empty());
    for (hash, codec) in &rows {
        assert_eq!(*codec, 2, "every stored page is sealed");
        assert!(
            !hashes.iter().any(|h| h[..] == hash[..]),
            "a page hash stored"
        );
    }
    drop(stmt);
    drop(index);

    // Pulled back with the key: the same rows, an intact database, the same digest.
    let out = store.run(
        &m,
        &[
            "pull",
            REPLICA,
            "fresh.db",
            "--json",
            "--encryption-key-file",
            kf,
        ],
        &[],
    );
    let pulled = Report::of(&out, "the keyed pull");
    let fresh = m.path("fresh.db");
    assert_eq!(pulled.0["plaintext_digest"], util::digest(&db));
    assert_eq!(util::digest(&fresh), util::digest(&db));
    assert_eq!(util::integrity(&fresh), "ok");
    assert_eq!(notes(&fresh).0, 2000);
    assert!(notes(&fresh).1.contains(MARKER));

    // A one-row change sends a few pages, not the database.
    util::open(&db)
        .execute("UPDATE notes SET body = 'changed' WHERE id = 77", [])
        .expect("update");
    let out = store.run(
        &m,
        &[
            "push",
            "app.db",
            REPLICA,
            "--json",
            "--encryption-key-file",
            kf,
        ],
        &[],
    );
    let second = Report::of(&out, "the second keyed push");
    assert_eq!(second.u64("version"), 2);
    let sent = second.u64("pages_sent");
    assert!(
        (1..=4).contains(&sent),
        "{sent} of {} pages sent for one row",
        second.u64("pages_total")
    );

    // SQLFERRY_ENCRYPTION_KEY works like the file: fresh.db follows to version 2.
    let text = std::fs::read_to_string(&key_file).expect("key text");
    let out = store.run(
        &m,
        &["pull", REPLICA, "fresh.db", "--json"],
        &[("SQLFERRY_ENCRYPTION_KEY", text.trim())],
    );
    let followed = Report::of(&out, "the pull with SQLFERRY_ENCRYPTION_KEY");
    assert_eq!(followed.u64("version"), 2);
    assert!(followed.u64("pages_sent") <= 4, "{}", followed.0);
    assert_eq!(notes(&fresh), (2000, "changed".into()));
    assert_eq!(util::integrity(&fresh), "ok");

    // diff and versions --changes open the versions with the key: one row updated.
    let updated_notes = |tables: &serde_json::Value| {
        let t = tables
            .as_array()
            .expect("tables")
            .iter()
            .find(|t| t["name"] == "notes")
            .unwrap_or_else(|| panic!("no notes in {tables}"))
            .clone();
        (
            t["inserted"].clone(),
            t["updated"].clone(),
            t["deleted"].clone(),
        )
    };
    let one_update = (0.into(), 1.into(), 0.into());
    let at = |n: u32| format!("{REPLICA}@{n}");
    let out = store.run(
        &m,
        &[
            "diff",
            &at(1),
            &at(2),
            "--json",
            "--encryption-key-file",
            kf,
        ],
        &[],
    );
    assert_eq!(
        updated_notes(&Report::of(&out, "diff @1 @2").0["tables"]),
        one_update
    );
    let out = store.run(
        &m,
        &[
            "diff",
            "app.db",
            &at(1),
            "--json",
            "--encryption-key-file",
            kf,
        ],
        &[],
    );
    assert_eq!(
        updated_notes(&Report::of(&out, "diff app.db @1").0["tables"]),
        one_update
    );
    let out = store.run(
        &m,
        &[
            "versions",
            REPLICA,
            "--changes",
            "--json",
            "--encryption-key-file",
            kf,
        ],
        &[],
    );
    let listed = Report::of(&out, "versions --changes").0;
    assert_eq!(updated_notes(&listed[1]["changes"]), one_update, "{listed}");
    // Without the key, diff and verify say which flag opens them.
    let out = store.run(&m, &["diff", &at(1), &at(2)], &[]);
    let line = assert_fails(&out, EXIT_AUTH, "--encryption-key-file");
    assert!(line.contains("encrypted"), "{line}");
    let out = store.run(&m, &["verify", "--replica", &at(2)], &[]);
    let line = assert_fails(&out, EXIT_AUTH, "--encryption-key-file");
    assert!(line.contains("is encrypted"), "{line}");

    // A wrong key: exit 5 before a page moves, naming the key; LOCAL as it was.
    let wrong = keygen(&m, "wrong.key");
    let before = std::fs::read(&fresh).expect("read");
    let out = store.run(
        &m,
        &[
            "pull",
            REPLICA,
            "fresh.db",
            "--encryption-key-file",
            wrong.to_str().expect("utf-8"),
        ],
        &[],
    );
    let line = assert_fails(&out, EXIT_AUTH, "wrong.key");
    assert!(line.contains(&read_key(&wrong).id().to_string()), "{line}");
    assert!(
        line.contains(&key.id().to_string()),
        "the replica's key id: {line}"
    );
    assert_eq!(std::fs::read(&fresh).expect("read"), before);

    // No key: refused, saying which flag is missing; nothing written.
    let out = store.run(&m, &["pull", REPLICA, "nokey.db", "--force"], &[]);
    assert_eq!(util::code(&out), EXIT_AUTH, "{}", util::stderr(&out));
    let err = util::stderr(&out);
    assert!(err.contains("--encryption-key-file"), "{err}");
    assert!(
        !m.path("nokey.db").exists()
            || std::fs::metadata(m.path("nokey.db")).expect("meta").len() == 0,
        "nothing pulled without the key"
    );
    // A keyless push to the encrypted replica, and a keyed push to a plaintext one.
    let out = store.run(&m, &["push", "app.db", REPLICA], &[]);
    assert_fails(&out, EXIT_AUTH, "is encrypted");
    assert_eq!(
        util::code(&store.run(&m, &["push", "app.db", "acme/plain.db"], &[])),
        0
    );
    let out = store.run(
        &m,
        &[
            "push",
            "app.db",
            "acme/plain.db",
            "--encryption-key-file",
            kf,
        ],
        &[],
    );
    assert_fails(&out, EXIT_AUTH, "is not encrypted");

    // A flipped byte of a stored ciphertext (page 10's, which version 2 holds and
    // LOCAL lacks): exit 7, and LOCAL (another database, overwritten only with --force)
    // byte for byte as it was.
    let identity = key.page_identity(&util::page_hashes(&db)[9]);
    flip_stored(&store.files(), &identity);
    let (local, local_bytes) = existing_dest(&m.work);
    let out = store.run(
        &m,
        &[
            "pull",
            REPLICA,
            local.to_str().expect("utf-8"),
            "--force",
            "--encryption-key-file",
            kf,
        ],
        &[],
    );
    assert_eq!(
        util::code(&out),
        EXIT_VERIFY,
        "{}{}",
        util::stderr(&out),
        util::stdout(&out)
    );
    assert_eq!(std::fs::read(&local).expect("read"), local_bytes);
}

#[test]
fn an_encrypted_replica_in_the_embedded_store() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    encrypted_replica_round_trip(Store::Dir(dir.path().join("store")));
}

#[test]
fn an_encrypted_replica_on_a_server() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    encrypted_replica_round_trip(Store::Server(&server));
}

#[test]
fn a_key_where_it_cannot_work_is_refused_not_ignored() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let m = Machine::new(dir.path(), "m");
    marked_db(&m.work);
    let key_file = keygen(&m, "app.key");
    let kf = key_file.to_str().expect("UTF-8 path");
    let store = format!("file://{}", dir.path().join("store").display());
    let text = std::fs::read_to_string(&key_file).expect("key text");

    // A local copy stays plaintext: the key is refused for it.
    let out = m.run(["push", "app.db", "./copy.db", "--encryption-key-file", kf]);
    assert_fails(&out, 2, "./copy.db is a local file");
    assert!(!m.path("copy.db").exists());
    // The daemon takes a key per entry of its file: one in the environment is refused.
    let out = m
        .command()
        .args(["daemon", "--config", "nowhere.toml"])
        .env("SQLFERRY_ENCRYPTION_KEY", text.trim())
        .output()
        .expect("run");
    assert_fails(&out, 2, "encryption_key_file");
    // --merge cannot merge what the store cannot read.
    let out = m.run([
        "push",
        "app.db",
        REPLICA,
        "--server",
        &store,
        "--merge",
        "--encryption-key-file",
        kf,
    ]);
    assert_fails(&out, 2, "cannot merge");
}

#[test]
fn a_key_file_others_may_read_is_used_with_a_warning() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let m = Machine::new(dir.path(), "m");
    marked_db(&m.work);
    let key_file = keygen(&m, "app.key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let store = format!("file://{}", dir.path().join("store").display());
    let out = m.run([
        "push",
        "app.db",
        REPLICA,
        "--server",
        &store,
        "--encryption-key-file",
        key_file.to_str().expect("UTF-8 path"),
    ]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let err = util::stderr(&out);
    assert!(
        err.contains("warning") && err.contains("chmod 600") && err.contains("0644"),
        "{err}"
    );
    // A file that holds no key is refused as such, never shown.
    std::fs::write(m.path("bad.key"), "not a key at all\n").expect("write");
    let out = m.run([
        "pull",
        REPLICA,
        "x.db",
        "--server",
        &store,
        "--encryption-key-file",
        "bad.key",
    ]);
    let line = assert_fails(&out, 2, "bad.key is not a key");
    assert!(!line.contains("not a key at all"), "{line}");
}

/// A push to an encrypted replica that moved on since its base: the error says the one
/// way out that works (neither `--merge` nor `--force` can), `--force` is refused as it
/// says, and following its advice lands both machines' changes.
fn an_encrypted_conflict_advises_what_works(store: Store<'_>) {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let a = Machine::new(dir.path(), "a");
    let b = Machine::new(dir.path(), "b");
    marked_db(&a.work);
    let key_file = keygen(&a, "app.key");
    let kf = key_file.to_str().expect("UTF-8 path");
    let run = |m: &Machine, args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--encryption-key-file", kf]);
        store.run(m, &all, &[])
    };
    let set = |m: &Machine, file: &str, id: i64, body: &str| {
        util::open(&m.path(file))
            .execute(
                "UPDATE notes SET body = ?2 WHERE id = ?1",
                rusqlite::params![id, body],
            )
            .expect("update");
    };
    Report::of(
        &run(&a, &["push", "app.db", REPLICA, "--json"]),
        "a's first push",
    );
    Report::of(&run(&b, &["pull", REPLICA, "app.db", "--json"]), "b's pull");
    set(&b, "app.db", 1, "from b");
    let v2 = Report::of(&run(&b, &["push", "app.db", REPLICA, "--json"]), "b's push");
    assert_eq!(v2.u64("version"), 2);

    // a's push is based on version 1: a conflict whose advice is what works.
    set(&a, "app.db", 2, "from a");
    for extra in [None, Some("--force")] {
        let mut args = vec!["push", "app.db", REPLICA];
        args.extend(extra);
        let err = assert_fails(&run(&a, &args), 6, "VERSION_CONFLICT");
        assert!(
            err.contains("pull acme/app.db into another file, make this push's changes there, and push that file"),
            "{extra:?}: {err}"
        );
        assert!(
            !err.contains("with --force to replace") && !err.contains("push with --merge"),
            "{extra:?}: advice that cannot work: {err}"
        );
    }
    let out = run(&a, &["push", "app.db", REPLICA, "--merge"]);
    assert_fails(&out, 2, "pull the latest version into another file");

    // The advice, followed: both changes land.
    Report::of(
        &run(&a, &["pull", REPLICA, "latest.db", "--json"]),
        "a's pull",
    );
    set(&a, "latest.db", 2, "from a");
    let v3 = Report::of(
        &run(&a, &["push", "latest.db", REPLICA, "--json"]),
        "a's push",
    );
    assert_eq!(v3.u64("version"), 3);
    Report::of(
        &run(&b, &["pull", REPLICA, "app.db", "--json"]),
        "b's pull of 3",
    );
    let conn = util::open(&b.path("app.db"));
    let body = |id: i64| -> String {
        conn.query_row("SELECT body FROM notes WHERE id = ?1", [id], |r| r.get(0))
            .expect("row")
    };
    assert_eq!((body(1), body(2)), ("from b".into(), "from a".into()));
    assert_eq!(util::integrity(&b.path("app.db")), "ok");
}

#[test]
fn an_encrypted_conflict_in_the_embedded_store_advises_what_works() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    an_encrypted_conflict_advises_what_works(Store::Dir(dir.path().join("store")));
}

#[test]
fn an_encrypted_conflict_on_a_server_advises_what_works() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    an_encrypted_conflict_advises_what_works(Store::Server(&server));
}
