//! The directory store keeping encrypted replicas (end-to-end encryption,
//! docs/security.md), driven through the engine API: a sealed push into a real store
//! leaves no plaintext in any of its files and no page hash in its index, only sealed
//! entries (codec 2) with the checksum of their bytes; a pull back through the engine
//! with the key rebuilds the database; a second push of a small change stores only what
//! changed, and equal pages under one key are stored once across replicas. A flipped
//! stored byte is refused on read with the pulled file untouched, and reported by
//! `scrub`; mixing plaintext and sealed pushes, two keys, a stale base and a merge are
//! each refused before anything is stored.

use std::path::{Path, PathBuf};

use rusqlite::Connection;
use sqlferry::crypt::EncryptionKey;
use sqlferry::engine::{self, NoProgress, Opening, OriginOptions, Sealing};
use sqlferry::page::{Snapshot, Writer};
use sqlferry::protocol::control::VersionInfo;
use sqlferry::store::{PushOptions, ReplicaPath, Selector, Store};
use sqlferry::{ErrorKind, Result};
use tempfile::TempDir;

use crate::sealed::{MARKER, existing_dest, key, marked_db};
use crate::util;

const REPLICA: &str = "acme/app.db";

/// Pushes `src` into `replica` of `store`, sealed with `key` when given, based on
/// `base`: the version now latest and whether this push made it.
pub(crate) fn push(
    store: &Store,
    replica: &str,
    src: &Path,
    key: Option<&EncryptionKey>,
    base: Option<u64>,
) -> Result<(VersionInfo, bool)> {
    push_rekeying(store, replica, src, key, base, None)
}

/// [`push`], marked as a rekey from the key id `rekey_from` when given.
fn push_rekeying(
    store: &Store,
    replica: &str,
    src: &Path,
    key: Option<&EncryptionKey>,
    base: Option<u64>,
    rekey_from: Option<&EncryptionKey>,
) -> Result<(VersionInfo, bool)> {
    let r = ReplicaPath::parse(replica).expect("valid path");
    let mut writer = store.push(
        &r,
        PushOptions {
            base,
            client_id: "test".into(),
            message: "sealed".into(),
            encryption: key.map(|k| k.id().to_string()),
            rekey_from: rekey_from.map(|k| k.id().to_string()),
            ..PushOptions::default()
        },
    )?;
    let mut snap = Snapshot::open(src)?.with_hash_cache(None);
    let options = OriginOptions {
        sealing: key.map(|key| Sealing::Seal {
            key,
            replica,
            version: base.unwrap_or(0) + 1,
            message: "sealed",
        }),
        chunked_digest: true,
        ..OriginOptions::default()
    };
    engine::sync_local_with(&mut snap, &mut writer, &NoProgress, options)?;
    let (v, made) = writer.outcome().expect("a committed push has an outcome");
    Ok((v.clone(), made))
}

/// Pulls `version` of `replica` into `dest` through the engine, the store relaying
/// what it keeps and the replica opening it with `key`.
fn pull(
    store: &Store,
    replica: &str,
    version: u64,
    dest: &Path,
    key: Option<&EncryptionKey>,
) -> Result<engine::ReplicaDone> {
    let r = ReplicaPath::parse(replica).expect("valid path");
    let mut reader = store.read(&r, Selector::Number(version))?;
    let (mut origin_link, mut replica_link) = engine::mem_pair();
    let mut writer = Writer::open(dest)?.with_hash_cache(None);
    std::thread::scope(|s| {
        let replica_side = s.spawn(move || {
            let opening = key.map(|key| Opening {
                key,
                replica,
                version,
            });
            engine::run_replica_opening(&mut writer, &mut replica_link, &NoProgress, opening)
        });
        let options = OriginOptions {
            sealing: reader.relay(),
            ..OriginOptions::default()
        };
        let _ = engine::run_origin_with(&mut reader, &mut origin_link, &NoProgress, options);
        drop(origin_link);
        replica_side.join().expect("replica thread")
    })
}

/// A full read of `version` through its scan: (pages handed on, pages read where a
/// place hint said, hinted pages read again through the index).
fn scan_hinted(store: &Store, replica: &str, version: u64) -> (u64, u64, u64) {
    use sqlferry::engine::PageSource;
    let mut r = store
        .read(
            &ReplicaPath::parse(replica).expect("valid"),
            Selector::Number(version),
        )
        .expect("read");
    let mut pages = 0;
    r.scan(0, &mut |_, _, data| {
        assert_eq!(data.map(<[u8]>::len), Some(4096 + 28), "a sealed page");
        pages += 1;
        Ok(())
    })
    .expect("scan");
    let (hinted, stale) = r.hinted();
    (pages, hinted, stale)
}

fn index(store: &Path) -> Connection {
    util::index_snapshot(store)
}

/// The page index's rows: (key, codec, checksum, pack, offset, len).
type Row = (Vec<u8>, i64, Option<Vec<u8>>, i64, i64, i64);

fn index_rows(store: &Path) -> Vec<Row> {
    let conn = index(store);
    let mut stmt = conn
        .prepare("SELECT hash, codec, checksum, pack, offset, len FROM pages")
        .expect("prepare");
    stmt.query_map([], |r| {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
        ))
    })
    .expect("rows")
    .collect::<rusqlite::Result<_>>()
    .expect("rows")
}

/// Flips one bit of byte `at` of the entry stored under `identity`.
fn flip(store: &Path, identity: &[u8; 32], at: u64) {
    use std::os::unix::fs::FileExt;
    let (pack, offset): (i64, i64) = index(store)
        .query_row(
            "SELECT pack, offset FROM pages WHERE hash = ?1",
            [&identity[..]],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("an indexed page");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(store.join(format!("pages/{pack}.pack")))
        .expect("open pack");
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset as u64 + at).expect("read");
    b[0] ^= 0x10;
    f.write_all_at(&b, offset as u64 + at).expect("write");
}

#[test]
fn a_sealed_push_into_the_store_keeps_no_plaintext_and_pulls_back_with_the_key() {
    let dir = TempDir::new().expect("tempdir");
    let src = marked_db(dir.path());
    let root = dir.path().join("store");
    let store = Store::new(&root);
    let k = key(7);
    let (v1, made) = push(&store, REPLICA, &src, Some(&k), None).expect("sealed push");
    assert!(made);
    assert_eq!(v1.number, 1);
    assert_eq!(v1.encryption.as_deref(), Some(k.id().to_string().as_str()));
    assert_ne!(
        v1.digest,
        util::digest(&src),
        "the store's digest is over identities"
    );
    assert_eq!(
        store
            .encryption(&ReplicaPath::parse(REPLICA).expect("valid"))
            .expect("asked"),
        Some(k.id().to_string())
    );

    // No file of the store holds the marker; every index row is a sealed entry keyed
    // by an identity, never by a page's SHA-256, with the checksum of its bytes.
    assert_eq!(
        util::holding(&root, MARKER.as_bytes()),
        Vec::<PathBuf>::new()
    );
    let hashes = util::page_hashes(&src);
    let rows = index_rows(&root);
    assert_eq!(rows.len(), hashes.len(), "one entry a distinct page");
    for (key_bytes, codec, checksum, pack, offset, len) in &rows {
        assert_eq!(*codec, 2, "a sealed entry");
        assert_eq!(*len, 4096 + 28);
        assert!(
            !hashes.iter().any(|h| h[..] == key_bytes[..]),
            "a page hash as a key"
        );
        let mut bytes = vec![0u8; *len as usize];
        use std::os::unix::fs::FileExt;
        std::fs::File::open(root.join(format!("pages/{pack}.pack")))
            .expect("pack")
            .read_exact_at(&mut bytes, *offset as u64)
            .expect("entry");
        // The store checks sealed bytes it cannot open by their sum, as it does every
        // entry it writes (xxh3-64, little-endian: src/store/pack.rs).
        assert_eq!(
            checksum.as_deref(),
            Some(&xxhash_rust::xxh3::xxh3_64(&bytes).to_le_bytes()[..]),
            "the checksum is the sealed bytes' sum"
        );
    }
    for h in &hashes {
        let id = k.page_identity(h);
        assert!(rows.iter().any(|r| r.0 == id), "page identity stored");
    }

    // Pulled back with the key: the same database, rows and all.
    let fresh = dir.path().join("fresh.db");
    let done = pull(&store, REPLICA, 1, &fresh, Some(&k)).expect("keyed pull");
    util::assert_same(&src, &fresh);
    assert_eq!(util::integrity(&fresh), "ok");
    assert_eq!(
        util::dump(&fresh)
            .iter()
            .find(|(t, _)| t == "notes")
            .map(|(_, rows)| rows.len()),
        Some(2000)
    );
    let facts = done.opened.expect("the seal was opened");
    assert_eq!(facts.message, "sealed");
    assert_eq!(sqlferry::digest::hex(&facts.digest), util::digest(&src));

    // The store reads every sealed page where its place hint says (the hint carries
    // the entry's sum), looking none up in the page index.
    assert_eq!(
        scan_hinted(&store, REPLICA, 1),
        (hashes.len() as u64, hashes.len() as u64, 0),
        "(pages read, read where a hint said, hints found stale)"
    );

    // A one-row change, based on version 1: only the pages it changed are stored.
    let conn = util::open(&src);
    conn.execute("UPDATE notes SET body = 'changed' WHERE id = 77", [])
        .expect("update");
    drop(conn);
    let (v2, made) = push(&store, REPLICA, &src, Some(&k), Some(1)).expect("second push");
    assert!(made);
    assert_eq!(v2.number, 2);
    let added = index_rows(&root).len() - rows.len();
    assert!((1..=4).contains(&added), "{added} pages stored for one row");
    pull(&store, REPLICA, 2, &fresh, Some(&k)).expect("second keyed pull");
    util::assert_same(&src, &fresh);
    assert_eq!(
        util::holding(&root, MARKER.as_bytes()),
        Vec::<PathBuf>::new()
    );

    // The same database under the same key in another replica: nothing stored again.
    let before = index_rows(&root).len();
    push(&store, "acme/copy.db", &src, Some(&k), None).expect("push of a copy");
    assert_eq!(
        index_rows(&root).len(),
        before,
        "equal identities stored once"
    );

    // Without the key the pull is refused, the file untouched.
    let (dest, bytes) = existing_dest(dir.path());
    let err = pull(&store, REPLICA, 2, &dest, None).expect_err("no key");
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert_eq!(std::fs::read(&dest).expect("read"), bytes);
}

#[test]
fn a_flipped_sealed_byte_is_refused_on_read_and_reported_by_scrub() {
    let dir = TempDir::new().expect("tempdir");
    let src = marked_db(dir.path());
    let root = dir.path().join("store");
    let store = Store::new(&root);
    let k = key(7);
    push(&store, REPLICA, &src, Some(&k), None).expect("sealed push");
    assert!(store.scrub(&mut |_| {}).expect("scrub").is_clean());

    let identity = k.page_identity(&util::page_hashes(&src)[19]);
    flip(&root, &identity, 100);
    let (dest, bytes) = existing_dest(dir.path());
    let err = pull(&store, REPLICA, 1, &dest, Some(&k)).expect_err("a flipped byte");
    assert_eq!(err.kind(), ErrorKind::Verification, "{err}");
    assert!(
        err.to_string()
            .contains("page 20 of acme/app.db@1 is damaged"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&dest).expect("read"),
        bytes,
        "the file changed"
    );

    let report = store.scrub(&mut |_| {}).expect("scrub");
    assert!(!report.is_clean());
    let r = &report.replicas[0];
    assert_eq!(r.bad_pages.len(), 1, "{:?}", r.bad_pages);
    assert_eq!(r.bad_pages[0].hash, sqlferry::digest::hex(&identity));
    assert_eq!(r.bad_pages[0].problem, "damaged");

    // The next push of the database resends the page, and the pull works again.
    let (_, made) = push(&store, REPLICA, &src, Some(&k), Some(1)).expect("repairing push");
    assert!(!made, "the same content makes no version");
    pull(&store, REPLICA, 1, &dest, Some(&k)).expect("pull after the repair");
    util::assert_same(&src, &dest);
    assert!(store.scrub(&mut |_| {}).expect("scrub").is_clean());
}

#[test]
fn plaintext_and_sealed_pushes_other_keys_and_stale_bases_are_refused() {
    let dir = TempDir::new().expect("tempdir");
    let src = marked_db(dir.path());
    let store = Store::new(dir.path().join("store"));
    let k = key(7);
    push(&store, REPLICA, &src, Some(&k), None).expect("sealed push");
    let conn = util::open(&src);
    conn.execute("UPDATE notes SET body = 'v2' WHERE id = 1", [])
        .expect("update");
    drop(conn);

    let refused = |key: Option<&EncryptionKey>, base: Option<u64>, kind: ErrorKind, words: &str| {
        let err = push(&store, REPLICA, &src, key, base).expect_err(words);
        assert_eq!(err.kind(), kind, "{err}");
        assert!(err.to_string().contains(words), "{err}");
        let r = ReplicaPath::parse(REPLICA).expect("valid");
        assert_eq!(
            store.latest_number(&r).expect("latest"),
            1,
            "{words}: stored"
        );
    };
    refused(
        None,
        Some(1),
        ErrorKind::Auth,
        "acme/app.db is encrypted (key id",
    );
    refused(
        Some(&key(8)),
        Some(1),
        ErrorKind::Auth,
        &format!("made with key id {}", k.id()),
    );
    // A seal made for version 1 (base: none), or forced past a stale base.
    refused(Some(&k), None, ErrorKind::Conflict, "VERSION_CONFLICT");

    // A sealed push into a plaintext replica.
    let plain = "acme/plain.db";
    push(&store, plain, &src, None, None).expect("plaintext push");
    let err = push(&store, plain, &src, Some(&k), Some(1)).expect_err("sealed into plaintext");
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(err.to_string().contains("is not encrypted"), "{err}");
    let r = ReplicaPath::parse(plain).expect("valid");
    assert_eq!(store.encryption(&r).expect("asked"), None);

    // A candidate of a merge cannot be sealed: the store cannot read its rows.
    let r = ReplicaPath::parse(REPLICA).expect("valid");
    let mut writer = store
        .push(
            &r,
            PushOptions {
                base: Some(1),
                encryption: Some(k.id().to_string()),
                ..PushOptions::default()
            },
        )
        .expect("writer");
    writer.stage_candidate(1, "merge".into());
    let mut snap = Snapshot::open(&src)
        .expect("snapshot")
        .with_hash_cache(None);
    let err = engine::sync_local_with(
        &mut snap,
        &mut writer,
        &NoProgress,
        OriginOptions {
            sealing: Some(Sealing::Seal {
                key: &k,
                replica: REPLICA,
                version: 2,
                message: "merge",
            }),
            ..OriginOptions::default()
        },
    )
    .expect_err("a sealed merge");
    assert!(err.to_string().contains("cannot merge"), "{err}");
}

#[test]
fn a_key_change_is_taken_only_from_a_rekey_of_the_latest_key() {
    let dir = TempDir::new().expect("tempdir");
    let src = marked_db(dir.path());
    let store = Store::new(dir.path().join("store"));
    let r = ReplicaPath::parse(REPLICA).expect("valid");
    let (a, b, c) = (key(7), key(8), key(9));
    push(&store, REPLICA, &src, Some(&a), None).expect("sealed push with A");

    let refused = |new: Option<&EncryptionKey>,
                   base: Option<u64>,
                   from: &EncryptionKey,
                   kind: ErrorKind,
                   words: &str| {
        let err = push_rekeying(&store, REPLICA, &src, new, base, Some(from)).expect_err(words);
        assert_eq!(err.kind(), kind, "{err}");
        assert!(err.to_string().contains(words), "{err}");
        assert_eq!(
            store.encryption(&r).expect("asked"),
            Some(a.id().to_string()),
            "{words}: the key id is as it was"
        );
    };
    // From a key id that is not the latest version's.
    refused(
        Some(&b),
        Some(1),
        &c,
        ErrorKind::Auth,
        &format!("from key id {}", c.id()),
    );
    // To the key it is under, and to plaintext.
    refused(
        Some(&a),
        Some(1),
        &a,
        ErrorKind::Usage,
        "already under key id",
    );
    refused(
        None,
        Some(1),
        &a,
        ErrorKind::Usage,
        "turning encryption off",
    );
    assert_eq!(
        store.latest_number(&r).expect("latest"),
        1,
        "nothing stored"
    );
    // From a stale base: the seal names the base's next number.
    util::open(&src)
        .execute("UPDATE notes SET body = 'v2' WHERE id = 1", [])
        .expect("update");
    let out = push(&store, REPLICA, &src, Some(&a), Some(1)).expect("version 2 with A");
    assert_eq!(out.0.number, 2);
    refused(
        Some(&b),
        Some(1),
        &a,
        ErrorKind::Conflict,
        "VERSION_CONFLICT",
    );
    assert_eq!(
        store.latest_number(&r).expect("latest"),
        2,
        "nothing stored"
    );

    // The rekey: version 3 under B; version 2 still opens with A, 3 with B only.
    let (v, made) =
        push_rekeying(&store, REPLICA, &src, Some(&b), Some(2), Some(&a)).expect("the rekey");
    assert!(made);
    assert_eq!(v.number, 3);
    assert_eq!(
        store.encryption(&r).expect("asked"),
        Some(b.id().to_string())
    );
    for (version, k, file) in [(2, &a, "two.db"), (3, &b, "three.db")] {
        let dest = dir.path().join(file);
        pull(&store, REPLICA, version, &dest, Some(k)).expect("pull with its key");
        assert_eq!(util::digest(&dest), util::digest(&src), "{file}");
    }
    let (dest, before) = existing_dest(dir.path());
    assert!(pull(&store, REPLICA, 3, &dest, Some(&a)).is_err());
    assert_eq!(std::fs::read(&dest).expect("read"), before);
    // After it, a plain push with A is another key, refused as before.
    let err = push(&store, REPLICA, &src, Some(&a), Some(3)).expect_err("A after the rekey");
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");

    // Nothing to rekey: a plaintext replica, and one with no version.
    push(&store, "acme/plain.db", &src, None, None).expect("plaintext push");
    let err = push_rekeying(&store, "acme/plain.db", &src, Some(&b), Some(1), Some(&a))
        .expect_err("a rekey of plaintext");
    assert_eq!(err.kind(), ErrorKind::Usage, "{err}");
    assert!(err.to_string().contains("is not encrypted"), "{err}");
    let err = push_rekeying(&store, "acme/none.db", &src, Some(&b), None, Some(&a))
        .expect_err("a rekey of nothing");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

/// A sealed push whose key came from a passphrase with `salted`: [`push`] naming it.
fn push_salted(
    store: &Store,
    src: &Path,
    key: &EncryptionKey,
    base: Option<u64>,
) -> Result<(VersionInfo, bool)> {
    let r = ReplicaPath::parse(REPLICA).expect("valid path");
    let mut writer = store.push(
        &r,
        PushOptions {
            base,
            client_id: "test".into(),
            message: "salted".into(),
            encryption: Some(key.id().to_string()),
            passphrase: key.passphrase().copied(),
            ..PushOptions::default()
        },
    )?;
    let mut snap = Snapshot::open(src)?.with_hash_cache(None);
    let options = OriginOptions {
        sealing: Some(Sealing::Seal {
            key,
            replica: REPLICA,
            version: base.unwrap_or(0) + 1,
            message: "salted",
        }),
        chunked_digest: true,
        ..OriginOptions::default()
    };
    engine::sync_local_with(&mut snap, &mut writer, &NoProgress, options)?;
    let (v, made) = writer.outcome().expect("a committed push has an outcome");
    Ok((v.clone(), made))
}

/// The store keeps a replica's passphrase salt and cost with its first passphrase
/// version, and refuses a push naming another salt before any page is stored; a key
/// file's push (no salt) leaves the record as it is.
#[test]
fn the_store_keeps_one_passphrase_salt_per_replica() {
    use sqlferry::crypt::{PassphraseCost, PassphraseSalt};
    let dir = TempDir::new().expect("tempdir");
    let src = marked_db(dir.path());
    let store = Store::new(dir.path().join("store"));
    let r = ReplicaPath::parse(REPLICA).expect("valid");
    // A cheap cost: the store keeps what it is given (the client checks the cost).
    let cost = PassphraseCost {
        memory_kib: 64,
        passes: 1,
        lanes: 1,
    };
    let first = PassphraseSalt {
        salt: [1; 16],
        cost,
    };
    let other = PassphraseSalt {
        salt: [2; 16],
        cost,
    };
    assert_eq!(store.passphrase(&r).expect("asked"), None, "no replica yet");
    let k1 = first.derive(b"correct horse").expect("stretch");
    push_salted(&store, &src, &k1, None).expect("first passphrase push");
    assert_eq!(store.passphrase(&r).expect("asked"), Some(first));

    // Another salt is another key; a push naming the replica's key id with another
    // salt (only the salt differs) is refused (exit 5), nothing stored.
    let stretched_other = other.derive(b"correct horse").expect("stretch");
    assert_ne!(stretched_other.id(), k1.id(), "another salt is another key");
    let k_other = k1.clone();
    let r2 = ReplicaPath::parse(REPLICA).expect("valid");
    let mut writer = store
        .push(
            &r2,
            PushOptions {
                base: Some(1),
                client_id: "test".into(),
                message: "other salt".into(),
                encryption: Some(k_other.id().to_string()),
                passphrase: Some(other),
                ..PushOptions::default()
            },
        )
        .expect("open the push");
    let mut snap = Snapshot::open(&src).expect("open").with_hash_cache(None);
    let options = OriginOptions {
        sealing: Some(Sealing::Seal {
            key: &k_other,
            replica: REPLICA,
            version: 2,
            message: "other salt",
        }),
        ..OriginOptions::default()
    };
    let e = engine::sync_local_with(&mut snap, &mut writer, &NoProgress, options)
        .expect_err("another salt is refused");
    assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    assert!(e.to_string().contains("another passphrase salt"), "{e}");
    drop(writer);
    let versions = store.versions(&r).expect("versions");
    assert_eq!(versions.len(), 1, "nothing stored");
    assert_eq!(store.passphrase(&r).expect("asked"), Some(first));

    // The same salt: version 2, and the record unchanged.
    util::open(&src)
        .execute("UPDATE notes SET body = 'changed' WHERE id = 77", [])
        .expect("update");
    let (v2, _) = push_salted(&store, &src, &k1, Some(1)).expect("same salt");
    assert_eq!(v2.number, 2);
    assert_eq!(store.passphrase(&r).expect("asked"), Some(first));
}

/// Every page a full read of `version` of `replica` hands on, with (pages read where a
/// hint said, hinted pages read again through the index).
fn scan_all(store: &Store, replica: &str, version: u64) -> (Vec<Vec<u8>>, (u64, u64)) {
    use sqlferry::engine::PageSource;
    let mut r = store
        .read(
            &ReplicaPath::parse(replica).expect("valid"),
            Selector::Number(version),
        )
        .expect("read");
    let mut pages = Vec::new();
    r.scan(0, &mut |_, _, data| {
        pages.push(data.expect("data asked of every page").to_vec());
        Ok(())
    })
    .expect("scan");
    (pages, r.hinted())
}

/// The place hints of the replica file of `replica` (one row a chunk).
fn places(root: &Path, replica: &str) -> Connection {
    let file = root.join("replicas").join(format!("{replica}.sqlferry"));
    assert!(file.exists(), "{}", file.display());
    Connection::open(file).expect("open the replica file")
}

/// `runs` with the sealed bit set on every summed entry's length: a hint edited to
/// call plaintext entries sealed (their sums still match their bytes).
fn marked_sealed(runs: &[u8]) -> Vec<u8> {
    let mut out = runs.to_vec();
    let mut at = 0;
    while at < out.len() {
        let pack = i64::from_le_bytes(out[at..at + 8].try_into().expect("8"));
        let count = u32::from_le_bytes(out[at + 16..at + 20].try_into().expect("4")) as usize;
        at += 20;
        assert!(pack < 0, "a run with sums");
        for _ in 0..count {
            let len = u32::from_le_bytes(out[at..at + 4].try_into().expect("4")) | 1 << 30;
            out[at..at + 4].copy_from_slice(&len.to_le_bytes());
            at += 12;
        }
    }
    out
}

/// A sealed version whose place hint names a plaintext replica's entries (a stale
/// hint, or one edited to call them sealed, their sums intact): the store never hands
/// a plaintext page as a sealed one. Each page is read again through the index, and a
/// keyed pull rebuilds the database.
#[test]
fn a_hint_naming_plaintext_entries_never_hands_plaintext_as_a_sealed_page() {
    let dir = TempDir::new().expect("tempdir");
    let src = marked_db(dir.path());
    let root = dir.path().join("store");
    let store = Store::new(&root);
    let k = key(7);
    const SEALED: &str = "acme/sealed.db";
    const PLAIN: &str = "acme/plain.db";
    push(&store, SEALED, &src, Some(&k), None).expect("sealed push");
    push(&store, PLAIN, &src, None, None).expect("plaintext push");
    let (pages, hinted) = scan_all(&store, SEALED, 1);
    let n = pages.len() as u64;
    assert_eq!(hinted, (n, 0), "every page read where its hint said");

    let plain_runs: Vec<u8> = places(&root, PLAIN)
        .query_row("SELECT runs FROM places", [], |r| r.get(0))
        .expect("one chunk's hint");
    let marker = MARKER.as_bytes();
    for (what, runs) in [
        ("a stale hint", plain_runs.clone()),
        ("a hint edited to say sealed", marked_sealed(&plain_runs)),
    ] {
        let conn = places(&root, SEALED);
        let changed = conn
            .execute("UPDATE places SET runs = ?1", [&runs])
            .expect("plant the hint");
        assert_eq!(changed, 1, "one chunk");
        drop(conn);
        let (pages, (hinted, stale)) = scan_all(&store, SEALED, 1);
        for (i, page) in pages.iter().enumerate() {
            assert_eq!(
                page.len(),
                4096 + 28,
                "{what}: page {} is no sealed page",
                i + 1
            );
            assert!(
                !page.windows(marker.len()).any(|w| w == marker),
                "{what}: page {} handed in clear",
                i + 1
            );
        }
        assert_eq!(
            (hinted, stale),
            (n, n),
            "{what}: every hinted page read again"
        );
        let dest = dir.path().join(format!("{}.db", what.replace(' ', "-")));
        pull(&store, SEALED, 1, &dest, Some(&k)).expect("keyed pull");
        util::assert_same(&src, &dest);
    }
}
