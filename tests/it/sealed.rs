//! The engine's sealed sessions (end-to-end encryption, docs/security.md) on real
//! SQLite files over the in-memory link: an origin with a key pushes into a keeper
//! that holds what it cannot read (as a store will), which relays it to a replica with
//! the key. What the keeper holds has no plaintext and no page hash; the pulled file
//! has the origin's rows; and a wrong key, a changed byte, swapped pages, a seal of
//! another version, or a plaintext and a sealed side mixed are each refused with the
//! replica's file byte for byte as it was.

use std::collections::BTreeMap;
use std::path::Path;

use sqlferry::crypt::EncryptionKey;
use sqlferry::digest::Hash;
use sqlferry::engine::{
    self, BeginInfo, FLAG_SEALED, NoProgress, Opening, OriginOptions, PageSource, PageTarget,
    ScanFn, Sealing,
};
use sqlferry::page::{Snapshot, Writer};
use sqlferry::protocol::{Frame, PROTOCOL_VERSION};
use sqlferry::{Error, ErrorKind, Result};
use tempfile::TempDir;

use crate::util::{self, Mode};

const REPLICA: &str = "acme/app.db";
pub(crate) const MARKER: &str = "sqlferry-marker-7f3a9c";

/// What a store keeps of a sealed version: each page's identity and sealed bytes, and
/// the seal.
#[derive(Default, Clone)]
struct Keeper {
    page_size: u32,
    page_count: u32,
    pages: BTreeMap<u32, (Hash, Vec<u8>)>,
    seal: Option<Vec<u8>>,
    staged_seal: Option<Vec<u8>>,
    staged: BTreeMap<u32, (Hash, Vec<u8>)>,
}

impl PageTarget for Keeper {
    fn begin(&mut self, begin: &BeginInfo) -> Result<u32> {
        assert!(begin.sealed, "a keeper takes sealed sessions only");
        self.staged.clear();
        Ok(match begin.page_size == self.page_size {
            true => self.page_count,
            false => 0,
        })
    }
    fn keeps_sealed(&self) -> bool {
        true
    }
    fn speaks_chunked_digest(&self) -> bool {
        true
    }
    fn hashes(&mut self, f: &mut dyn FnMut(u32, Hash) -> Result<()>) -> Result<()> {
        for (&pgno, (identity, _)) in &self.pages {
            f(pgno, *identity)?;
        }
        Ok(())
    }
    fn write_page(&mut self, pgno: u32, data: Vec<u8>, hash: &Hash) -> Result<()> {
        self.staged.insert(pgno, (*hash, data));
        Ok(())
    }
    fn keep_seal(&mut self, seal: Vec<u8>) -> Result<()> {
        self.staged_seal = Some(seal);
        Ok(())
    }
    fn commit(
        &mut self,
        page_count: u32,
        _digest: &Hash,
        hashes: &mut dyn Iterator<Item = Result<Hash>>,
    ) -> Result<()> {
        let staged = std::mem::take(&mut self.staged);
        self.pages.extend(staged);
        self.pages.retain(|&p, _| p <= page_count);
        for (pgno, h) in (1..).zip(hashes) {
            assert_eq!(self.pages[&pgno].0, h?, "manifest of page {pgno}");
        }
        self.page_count = page_count;
        self.seal = self.staged_seal.take();
        Ok(())
    }
}

/// A key of 32 bytes `byte`.
pub(crate) fn key(byte: u8) -> EncryptionKey {
    EncryptionKey::from_bytes(&[byte; 32])
}

/// A database whose rows all carry the marker.
pub(crate) fn marked_db(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("app.db");
    let conn = util::create(&path, 4096, Mode::Wal);
    conn.execute_batch("CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)")
        .expect("schema");
    for i in 0..2000 {
        conn.execute(
            "INSERT INTO notes(body) VALUES (?1)",
            [format!("{MARKER} note {i} of someone's private data")],
        )
        .expect("insert");
    }
    path
}

/// Pushes `src` into `keeper` sealed with `key` as version `version`.
fn push_sealed(src: &Path, keeper: &mut Keeper, key: &EncryptionKey, version: u64) {
    push_sealed_with(src, keeper, key, version, false)
}

/// [`push_sealed`], in the chunked digest when `chunked`.
fn push_sealed_with(
    src: &Path,
    keeper: &mut Keeper,
    key: &EncryptionKey,
    version: u64,
    chunked: bool,
) {
    let mut snap = Snapshot::open(src).expect("snapshot").with_hash_cache(None);
    let stats = engine::sync_local_with(
        &mut snap,
        keeper,
        &NoProgress,
        OriginOptions {
            sealing: Some(Sealing::Seal {
                key,
                replica: REPLICA,
                version,
                message: "before migration",
            }),
            chunked_digest: chunked,
            ..OriginOptions::default()
        },
    )
    .expect("sealed push");
    assert_eq!(
        stats.plaintext_digest.as_deref(),
        Some(util::digest(src).as_str()),
        "the seal's digest 1 is the database's"
    );
    assert_ne!(
        stats.digest,
        util::digest(src),
        "the session's digest is over identities"
    );
    keeper.page_size = stats.page_size;
}

/// Pulls what `keeper` holds into `dest`, opening it with `key` as version `version`.
fn pull_sealed(
    keeper: &Keeper,
    dest: &Path,
    key: Option<&EncryptionKey>,
    version: u64,
    relay: bool,
) -> Result<engine::ReplicaDone> {
    let (mut origin_link, mut replica_link) = engine::mem_pair();
    let mut writer = Writer::open(dest).expect("writer").with_hash_cache(None);
    let seal = keeper.seal.clone().expect("a seal was kept");
    std::thread::scope(|s| {
        let replica = s.spawn(move || {
            let opening = key.map(|key| Opening {
                key,
                replica: REPLICA,
                version,
            });
            engine::run_replica_opening(&mut writer, &mut replica_link, &NoProgress, opening)
        });
        let mut source = Relay(keeper, Hostile::Honest);
        let options = OriginOptions {
            sealing: relay.then_some(Sealing::Relay { seal }),
            ..OriginOptions::default()
        };
        let _ = engine::run_origin_with(&mut source, &mut origin_link, &NoProgress, options);
        drop(origin_link);
        replica.join().expect("replica thread")
    })
}

/// Another database at `dest`, whose bytes a refused pull must leave as they are.
pub(crate) fn existing_dest(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let dest = dir.join("local.db");
    let conn = util::create(&dest, 4096, Mode::Rollback);
    conn.execute_batch("CREATE TABLE mine(x); INSERT INTO mine VALUES ('local rows');")
        .expect("local rows");
    drop(conn);
    let bytes = std::fs::read(&dest).expect("read dest");
    (dest, bytes)
}

#[test]
fn a_sealed_push_keeps_no_plaintext_and_a_keyed_pull_rebuilds_the_database() {
    let dir = TempDir::new().expect("tempdir");
    let src = marked_db(dir.path());
    let k = key(7);
    let mut keeper = Keeper::default();
    push_sealed(&src, &mut keeper, &k, 1);

    // What the keeper holds: no marker, no page hash, pages a page plus 28 bytes.
    let hashes = util::page_hashes(&src);
    assert_eq!(keeper.pages.len(), hashes.len());
    let needle = MARKER.as_bytes();
    for (&pgno, (identity, sealed)) in &keeper.pages {
        assert_eq!(sealed.len(), 4096 + 28, "page {pgno}");
        assert!(
            !sealed.windows(needle.len()).any(|w| w == needle),
            "page {pgno} holds the marker in clear"
        );
        assert_ne!(
            identity,
            &hashes[pgno as usize - 1],
            "page {pgno}'s identity is its hash"
        );
        assert_eq!(identity, &k.page_identity(&hashes[pgno as usize - 1]));
    }
    let seal = keeper.seal.as_ref().expect("the seal was kept");
    assert!(!String::from_utf8_lossy(seal).contains("before migration"));

    // Pulled with the key into a new file, and into one that holds other rows.
    let fresh = dir.path().join("fresh.db");
    let done = pull_sealed(&keeper, &fresh, Some(&k), 1, true).expect("keyed pull");
    util::assert_same(&src, &fresh);
    assert!(
        util::dump(&fresh)
            .iter()
            .any(|(_, rows)| rows.len() == 2000)
    );
    let facts = done.opened.expect("the seal was opened");
    assert_eq!(facts.message, "before migration");
    assert_eq!(sqlferry::digest::hex(&facts.digest), util::digest(&src));
    let (dest, _) = existing_dest(dir.path());
    pull_sealed(&keeper, &dest, Some(&k), 1, true).expect("keyed pull over a file");
    util::assert_same(&src, &dest);

    // A change, pushed again into the keeper that holds version 1: the descent runs on
    // identities and sends only what changed.
    let conn = util::open(&src);
    conn.execute("UPDATE notes SET body = 'changed' WHERE id = 77", [])
        .expect("update");
    drop(conn);
    let before = keeper.pages.clone();
    push_sealed(&src, &mut keeper, &k, 2);
    let changed = keeper
        .pages
        .iter()
        .filter(|(p, v)| before.get(p) != Some(v))
        .count();
    assert!(
        (1..=4).contains(&changed),
        "{changed} pages of {} changed for one row",
        keeper.pages.len()
    );
    pull_sealed(&keeper, &fresh, Some(&k), 2, true).expect("second keyed pull");
    util::assert_same(&src, &fresh);
}

/// A version pushed in the chunked digest (as a push into a store agrees to) is pulled
/// in digest 1 (as a store's origin sends): the seal's digest over identities is
/// checked in its own form.
#[test]
fn a_seal_made_in_the_chunked_digest_opens_in_a_digest_1_pull() {
    let dir = TempDir::new().expect("tempdir");
    let src = marked_db(dir.path());
    let k = key(7);
    let mut keeper = Keeper::default();
    push_sealed_with(&src, &mut keeper, &k, 1, true);
    let dest = dir.path().join("pulled.db");
    let done = pull_sealed(&keeper, &dest, Some(&k), 1, true).expect("keyed pull");
    util::assert_same(&src, &dest);
    let facts = done.opened.expect("opened");
    assert_eq!(facts.identity_form, sqlferry::digest::DigestForm::Chunked);
    assert_eq!(done.form, sqlferry::digest::DigestForm::One);
}

/// Each thing a store could do to what it keeps, and a wrong key: refused as a
/// verification failure (exit 7), the pulled file byte for byte as it was.
#[test]
fn tampering_and_wrong_keys_are_refused_with_the_file_untouched() {
    let dir = TempDir::new().expect("tempdir");
    let src = marked_db(dir.path());
    let k = key(7);
    let mut keeper = Keeper::default();
    push_sealed(&src, &mut keeper, &k, 1);
    let (dest, bytes) = existing_dest(dir.path());
    let refused = |keeper: &Keeper, key: &EncryptionKey, version: u64, what: &str| {
        let err = pull_sealed(keeper, &dest, Some(key), version, true)
            .expect_err(&format!("{what} is refused"));
        assert_eq!(err.kind(), ErrorKind::Verification, "{what}: {err}");
        assert_eq!(
            std::fs::read(&dest).expect("read"),
            bytes,
            "{what}: file changed"
        );
        err.to_string()
    };

    let m = refused(&keeper, &key(8), 1, "a wrong key");
    assert!(m.contains("does not open"), "{m}");

    let mut flipped = keeper.clone();
    // Pages past the local file's end, so that they are sent whatever it holds.
    flipped.pages.get_mut(&20).expect("page 20").1[100] ^= 1;
    let m = refused(&flipped, &k, 1, "a flipped ciphertext byte");
    assert!(m.contains("does not open"), "{m}");

    // Two pages exchanged with their identities: each opens, the manifest is another,
    // and the store's digest over it is not the one the seal names.
    let mut swapped = keeper.clone();
    let ten = swapped.pages[&10].clone();
    let eleven = swapped.pages.insert(11, ten).expect("page 11");
    swapped.pages.insert(10, eleven);
    let m = refused(&swapped, &k, 1, "two pages exchanged");
    assert!(
        m.contains("the seal of version 1 of acme/app.db names identity digest")
            && m.contains("but the origin's is"),
        "{m}"
    );

    // A seal made with the key, naming the version's identities but another plaintext
    // (a key holder's inconsistent seal): every page opens and the identities agree,
    // and the plaintext check refuses it.
    let mut forged = keeper.clone();
    let mut facts = engine::Facts::decode(
        &k.open_version(REPLICA, 1, keeper.seal.as_ref().expect("a seal"))
            .expect("the seal opens"),
    )
    .expect("facts");
    facts.digest[0] ^= 1;
    forged.seal = Some(k.seal_version(REPLICA, 1, &facts.encode()).expect("sealed"));
    let m = refused(&forged, &k, 1, "a seal naming another plaintext");
    assert!(
        m.contains("the pages of version 1 of acme/app.db have digest")
            && m.contains("but its seal names"),
        "{m}"
    );

    // A page under another page's identity: it does not open.
    let mut relabelled = keeper.clone();
    let id13 = relabelled.pages[&13].0;
    relabelled.pages.get_mut(&12).expect("page 12").0 = id13;
    refused(&relabelled, &k, 1, "a page under another identity");

    // The seal of version 1 served as version 2's.
    let m = refused(&keeper, &k, 2, "a seal moved to another version");
    assert!(m.contains("seal of version 2"), "{m}");

    // A page of another version of the same replica, under its own identity.
    let conn = util::open(&src);
    conn.execute("UPDATE notes SET body = 'v2' WHERE id = 1", [])
        .expect("update");
    drop(conn);
    let mut v2 = keeper.clone();
    push_sealed(&src, &mut v2, &k, 2);
    let mut mixed = keeper.clone();
    for (p, v) in &v2.pages {
        if *p <= keeper.page_count && keeper.pages.get(p) != Some(v) {
            mixed.pages.insert(*p, v.clone());
        }
    }
    let m = refused(&mixed, &k, 1, "a page of another version");
    assert!(m.contains("but the origin's is"), "{m}");
}

/// A plaintext side and a sealed one never mix: refused before anything is written.
#[test]
fn plaintext_and_sealed_sides_do_not_mix() {
    let dir = TempDir::new().expect("tempdir");
    let src = marked_db(dir.path());
    let k = key(7);
    let mut keeper = Keeper::default();
    push_sealed(&src, &mut keeper, &k, 1);
    let (dest, bytes) = existing_dest(dir.path());

    // Sealed pages to a file writer with no key.
    let err = pull_sealed(&keeper, &dest, None, 1, true).expect_err("no key");
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(err.to_string().contains("no key to open them"), "{err}");
    assert_eq!(std::fs::read(&dest).expect("read"), bytes);

    // A plaintext session to a replica that expects a sealed version.
    let mut snap = Snapshot::open(&src)
        .expect("snapshot")
        .with_hash_cache(None);
    let (mut origin_link, mut replica_link) = engine::mem_pair();
    let mut writer = Writer::open(&dest).expect("writer").with_hash_cache(None);
    let err = std::thread::scope(|s| {
        let replica = s.spawn(|| {
            let opening = Opening {
                key: &k,
                replica: REPLICA,
                version: 1,
            };
            engine::run_replica_opening(&mut writer, &mut replica_link, &NoProgress, Some(opening))
        });
        let _ = engine::run_origin(&mut snap, &mut origin_link, &NoProgress);
        drop(origin_link);
        replica.join().expect("replica thread")
    })
    .expect_err("a plaintext version where a sealed one was expected");
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(err.to_string().contains("is not encrypted"), "{err}");
    assert_eq!(std::fs::read(&dest).expect("read"), bytes);
}

/// The frames of one kind of session in the other: PAGE in a sealed session, SPAGE and
/// SEAL in a plaintext one, a sealed COMMIT without SEAL, a second SEAL.
#[test]
fn frames_out_of_their_session_are_protocol_errors() {
    let dir = TempDir::new().expect("tempdir");
    let begin = |flags| Frame::Begin {
        version: PROTOCOL_VERSION,
        page_size: 512,
        page_count: 1,
        base_version: 0,
        flags,
    };
    let page = Frame::Page {
        pgno: 1,
        data: vec![0; 512],
    };
    let spage = Frame::SealedPage {
        pgno: 1,
        identity: [1; 32],
        sealed: vec![0; 512 + 28],
    };
    let seal = Frame::Seal {
        sealed: vec![0; 40],
    };
    let commit = Frame::Commit {
        page_count: 1,
        digest: [0; 32],
    };
    let cases: Vec<(&str, bool, Vec<Frame>, &str)> = vec![
        (
            "PAGE sealed",
            true,
            vec![page.clone()],
            "PAGE frame in a sealed session",
        ),
        (
            "SPAGE plain",
            false,
            vec![spage.clone()],
            "outside a sealed session",
        ),
        (
            "SEAL plain",
            false,
            vec![seal.clone()],
            "outside a sealed session",
        ),
        (
            "COMMIT without SEAL",
            true,
            vec![spage.clone(), commit.clone()],
            "without the version's SEAL",
        ),
        (
            "two SEALs",
            true,
            vec![seal.clone(), seal.clone()],
            "a second SEAL",
        ),
    ];
    for (what, sealed, frames, words) in cases {
        let dir = dir.path();
        let (mut origin_link, mut replica_link) = engine::mem_pair();
        let err = std::thread::scope(|s| {
            let replica = s.spawn(move || -> Result<()> {
                match sealed {
                    true => {
                        let mut keeper = Keeper::default();
                        engine::run_replica(&mut keeper, &mut replica_link).map(|_| ())
                    }
                    false => {
                        let path = dir.join(format!("{}.db", what.replace(' ', "-")));
                        let mut w = Writer::open(&path).expect("writer").with_hash_cache(None);
                        engine::run_replica(&mut w, &mut replica_link).map(|_| ())
                    }
                }
            });
            use sqlferry::engine::Link as _;
            origin_link
                .send(&begin(if sealed { FLAG_SEALED } else { 0 }))
                .expect("BEGIN");
            for f in &frames {
                let _ = origin_link.send(f);
            }
            let _ = origin_link.recv();
            drop(origin_link);
            replica.join().expect("replica thread")
        })
        .expect_err(what);
        assert_eq!(err.kind(), ErrorKind::Protocol, "{what}: {err}");
        assert!(err.to_string().contains(words), "{what}: {err}");
    }
}

/// What a store (or server) does to the sealed pages it relays.
#[derive(Clone, Copy, Debug)]
enum Hostile {
    /// Nothing: its identities and sealed bytes, as they are, in order.
    Honest,
    /// Every page, last first.
    Reversed,
    /// Page `n` sent again right after itself.
    Twice(u32),
    /// After the last page, one past the page count (another page's sealed bytes).
    PastCount,
    /// The stored read fails after `n` pages: the origin sends ERROR mid-batch.
    FailAfter(u32),
    /// The origin dies after `n` pages: the link drops mid-batch.
    DieAfter(u32),
    /// The last page's sealed bytes changed: it fails in the last batch, just
    /// before COMMIT.
    BadLast,
}

/// The keeper as the origin of a pull, relaying its sealed pages as `Hostile` says.
struct Relay<'a>(&'a Keeper, Hostile);

impl PageSource for Relay<'_> {
    fn page_size(&self) -> u32 {
        self.0.page_size
    }
    fn page_count(&self) -> u32 {
        self.0.page_count
    }
    fn scan(&mut self, with_data_after: u32, f: &mut ScanFn<'_>) -> Result<()> {
        let mut order: Vec<(u32, Hash, Vec<u8>)> = self
            .0
            .pages
            .iter()
            .map(|(&p, (id, sealed))| (p, *id, sealed.clone()))
            .collect();
        let last = self.0.page_count;
        match self.1 {
            Hostile::Reversed => order.reverse(),
            Hostile::Twice(n) => {
                let at = order.iter().position(|(p, ..)| *p == n).expect("page n");
                let again = order[at].clone();
                order.insert(at + 1, again);
            }
            Hostile::PastCount => {
                let (_, id, sealed) = order[3].clone();
                order.push((last + 1, id, sealed));
            }
            Hostile::BadLast => {
                order.last_mut().expect("a page").2[300] ^= 0x40;
            }
            Hostile::Honest | Hostile::FailAfter(_) | Hostile::DieAfter(_) => {}
        }
        for (i, (pgno, id, sealed)) in order.iter().enumerate() {
            match self.1 {
                Hostile::FailAfter(n) if i as u32 == n => {
                    return Err(Error::Verification(
                        "stored page damaged (the hostile relay's own error)".into(),
                    ));
                }
                Hostile::DieAfter(n) if i as u32 == n => panic!("the origin dies mid-batch"),
                _ => {}
            }
            f(
                *pgno,
                *id,
                (*pgno > with_data_after).then_some(sealed.as_slice()),
            )?;
        }
        Ok(())
    }
    fn read_page(&mut self, pgno: u32, buf: &mut Vec<u8>) -> Result<()> {
        buf.clear();
        buf.extend_from_slice(&self.0.pages[&pgno].1);
        Ok(())
    }
    fn chunk_hashes(&mut self) -> Result<Option<Vec<Option<Hash>>>> {
        Ok(None)
    }
    fn scan_chunk(&mut self, idx: u32, _f: &mut ScanFn<'_>) -> Result<Hash> {
        Err(Error::Bug(format!("chunk {idx} of a relay")))
    }
    fn chunks_done(&mut self) -> Result<()> {
        Ok(())
    }
}

/// A keyed pull from a hostile relay into `dest`: the replica's result (the origin's
/// thread may die, as `DieAfter` asks).
fn pull_hostile(keeper: &Keeper, dest: &Path, k: &EncryptionKey, how: Hostile) -> Result<()> {
    let (mut origin_link, mut replica_link) = engine::mem_pair();
    let mut writer = Writer::open(dest).expect("writer").with_hash_cache(None);
    let seal = keeper.seal.clone().expect("a seal was kept");
    std::thread::scope(|s| {
        let replica = s.spawn(move || {
            let opening = Some(Opening {
                key: k,
                replica: REPLICA,
                version: 1,
            });
            engine::run_replica_opening(&mut writer, &mut replica_link, &NoProgress, opening)
        });
        let origin = s.spawn(move || {
            let mut source = Relay(keeper, how);
            let options = OriginOptions {
                sealing: Some(Sealing::Relay { seal }),
                ..OriginOptions::default()
            };
            let _ = engine::run_origin_with(&mut source, &mut origin_link, &NoProgress, options);
        });
        let died = origin.join().is_err();
        assert_eq!(died, matches!(how, Hostile::DieAfter(_)), "{how:?}");
        replica.join().expect("replica thread").map(|_| ())
    })
}

/// A hostile relay of a keyed pull, several batches of sealed pages long: pages out of
/// order are taken (each is written where it belongs), and a page sent twice, a page
/// past the count, an ERROR or a dropped link mid-batch, or a page that fails to open
/// in the last batch before COMMIT each end the session with the replica's file byte
/// for byte as it was, and the replica returns (its opening thread is joined: a hang
/// here would hang the test).
#[test]
fn a_hostile_relay_of_sealed_pages_changes_nothing_and_never_hangs() {
    let dir = TempDir::new().expect("tempdir");
    let src = dir.path().join("big.db");
    let conn = util::create(&src, 4096, Mode::Wal);
    conn.execute_batch("CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)")
        .expect("schema");
    for i in 0..24_000 {
        conn.execute(
            "INSERT INTO notes(body) VALUES (?1)",
            [format!(
                "{MARKER} note {i} padded to spread over many pages"
            )],
        )
        .expect("insert");
    }
    drop(conn);
    let k = key(7);
    let mut keeper = Keeper::default();
    push_sealed(&src, &mut keeper, &k, 1);
    let pages = keeper.pages.len() as u32;
    assert!(
        pages > 32 * 4 * 2 + 5,
        "{pages} pages: more than the opener's bound"
    );

    // The origin itself refuses a store that hands it pages out of order.
    let cases = [
        (Hostile::Reversed, None, "out of order"),
        (Hostile::Twice(100), Some(ErrorKind::Protocol), "sent twice"),
        (
            Hostile::PastCount,
            Some(ErrorKind::Protocol),
            "outside the database",
        ),
        (
            Hostile::FailAfter(150),
            Some(ErrorKind::Verification),
            "hostile relay's own error",
        ),
        (Hostile::DieAfter(150), Some(ErrorKind::Disconnected), ""),
        (
            Hostile::BadLast,
            Some(ErrorKind::Verification),
            "does not open",
        ),
    ];
    for (how, kind, words) in cases {
        let (dest, bytes) = existing_dest(dir.path());
        let err = pull_hostile(&keeper, &dest, &k, how).expect_err(&format!("{how:?}"));
        if let Some(kind) = kind {
            assert_eq!(err.kind(), kind, "{how:?}: {err:?}");
        }
        assert!(err.to_string().contains(words), "{how:?}: {err}");
        assert_eq!(
            std::fs::read(&dest).expect("read"),
            bytes,
            "{how:?}: the replica's file changed"
        );
        assert_eq!(util::integrity(&dest), "ok", "{how:?}");
        std::fs::remove_file(&dest).expect("rm");
    }
}
