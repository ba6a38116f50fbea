//! Scrubbing a store: every stored page (once, however many replicas use it) checked
//! against its hash (a sealed page of an encrypted replica against the checksum of its
//! sealed bytes), every version's manifest against its chunk keys and its digest,
//! every referenced page for presence in the page index.
//!
//! Invariants: a scrub reads each replica inside one read transaction (a push landing
//! meanwhile is not half seen) and changes nothing but the `bad_pages` record of what it
//! found, which makes the next push of the database resend those pages; it also removes
//! the files crashed pushes left (see `remove_leftovers`) and cuts the torn tails of
//! packs no live push holds. It moves the pages of replica files of the previous layout
//! into the packs first. Memory does not grow with the store: pages and manifests
//! stream; only the bad pages and the keys of the manifest chunks already checked are
//! kept.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use super::ReplicaPath;
use super::list::{replica_files, replica_of};
use super::pack::{self, Check, Pages};
use super::replica::{
    bad_pages, forget_bad_pages, manifest_damage, page_matches, record_bad_pages, upgrade,
};
use crate::digest::{ChunkedDigest, Digest, HASH_BYTES, Hash, hex, lock_byte_page, sha256};
use crate::{Error, Result};

/// How far a scrub is, for progress displays.
#[derive(Debug, Clone)]
pub struct ScrubProgress {
    /// The replica being checked.
    pub replica: String,
    /// Items (stored pages, then manifest entries) checked in this replica so far.
    pub done: u64,
    /// Items in this replica.
    pub total: u64,
}

/// A stored page that is not what its hash says, or that a version needs and is gone.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BadPage {
    /// The page's hash (its key), lower-case hex.
    pub hash: String,
    /// `damaged` (its bytes do not match the hash) or `missing`.
    pub problem: &'static str,
    /// The versions that use it.
    pub versions: Vec<u64>,
}

/// A version row as scrub checks it: number, page size, page count, digest 1 and the
/// chunked digest (`None` where the file has none yet).
type StoredVersion = (u64, u32, u32, Vec<u8>, Option<Vec<u8>>);

/// A version whose manifest or digest does not hold.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BadVersion {
    /// The version number.
    pub number: u64,
    /// What is wrong.
    pub problem: String,
    /// Whether a push can repair it: true when its problems are damaged or missing
    /// pages (recorded, resent by the next push) or chunks of page hashes (stored again,
    /// checked against their keys, by a push whose database holds the same pages). A
    /// manifest row that is gone, or a digest that does not hold, is never repaired:
    /// stored versions never change.
    pub repairable: bool,
}

/// What a scrub found in one replica.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplicaScrub {
    /// The replica path.
    pub replica: String,
    /// Versions checked.
    pub versions: u64,
    /// Page references (manifest entries) checked.
    pub pages: u64,
    /// Bad pages, and the versions each touches.
    pub bad_pages: Vec<BadPage>,
    /// Versions that use a bad page, or whose manifest or digest does not hold.
    pub bad_versions: Vec<BadVersion>,
    /// The replica could not be checked at all (its file is not readable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ReplicaScrub {
    /// Whether nothing is wrong with it.
    pub fn is_clean(&self) -> bool {
        self.bad_pages.is_empty() && self.bad_versions.is_empty() && self.error.is_none()
    }
}

/// What a scrub found in a whole store.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScrubReport {
    /// The store's directory.
    pub store: PathBuf,
    /// Every replica, in path order.
    pub replicas: Vec<ReplicaScrub>,
    /// Stored pages checked against their hashes (each once, shared by every replica).
    pub pages: u64,
    /// Bytes of files crashed pushes had left, removed.
    pub leftover_bytes_removed: u64,
}

impl ScrubReport {
    /// Whether every replica is clean.
    pub fn is_clean(&self) -> bool {
        self.replicas.iter().all(ReplicaScrub::is_clean)
    }
}

/// Scrubs every replica under `root` (a store's directory).
pub(super) fn scrub(root: &Path, progress: &mut dyn FnMut(&ScrubProgress)) -> Result<ScrubReport> {
    let top = root.join("replicas");
    let mut files = Vec::new();
    let mut leftover_bytes_removed = 0;
    if top.exists() {
        replica_files(&top, &mut files, Some(&mut leftover_bytes_removed))?;
    } else if !root.is_dir() {
        return Err(Error::NotFound(format!(
            "{} is not a store directory",
            root.display()
        )));
    }
    files.sort();
    let pages_dir = pack::dir_of(root);
    // Replica files of the previous layout first give their pages to the packs.
    let mut upgrade_errors = BTreeMap::new();
    for file in &files {
        if let Err(e) = upgrade(file, &pages_dir, false) {
            upgrade_errors.insert(file.clone(), e.to_string());
        }
    }
    let mut damaged: HashSet<Hash> = HashSet::new();
    let mut stored = 0;
    let pages = if pages_dir.exists() {
        let pages = Pages::open(&pages_dir, pack::READER_CACHE_KIB)?;
        leftover_bytes_removed += pages.recover()?;
        stored = check_pages(&pages, &mut damaged, progress)?;
        Some(pages)
    } else {
        None
    };
    let mut replicas = Vec::new();
    for file in files {
        let Some(replica) = replica_of(&top, &file) else {
            continue;
        };
        let checked = match upgrade_errors.remove(&file) {
            Some(e) => Err(Error::Server(e)),
            None => scrub_replica(&file, &replica, pages.as_ref(), &damaged, progress),
        };
        let report = match checked {
            Ok(r) => r,
            Err(e) => ReplicaScrub {
                replica: replica.to_string(),
                versions: 0,
                pages: 0,
                bad_pages: Vec::new(),
                bad_versions: Vec::new(),
                error: Some(e.to_string()),
            },
        };
        replicas.push(report);
    }
    Ok(ScrubReport {
        store: root.to_owned(),
        replicas,
        pages: stored,
        leftover_bytes_removed,
    })
}

/// Checks every indexed page against its hash, in pack order; the damaged ones go into
/// `damaged`. Returns how many were checked.
fn check_pages(
    pages: &Pages,
    damaged: &mut HashSet<Hash>,
    progress: &mut dyn FnMut(&ScrubProgress),
) -> Result<u64> {
    let mut at = ScrubProgress {
        replica: "(stored pages)".into(),
        done: 0,
        total: pages.count()?,
    };
    progress(&at);
    let mut files = pages.files();
    let mut buf = Vec::new();
    pages.for_each(&mut |hash, loc| {
        // The read checks the stored bytes against their sum (an older sealed page's
        // against its SHA-256) and leaves none when they fail. A sealed page (an
        // encrypted replica's) cannot be opened here to hash it; every other page is
        // hashed against its key as well, so scrub checks identities, not only bytes.
        let good = |buf: &[u8]| !buf.is_empty() && (loc.sealed || page_matches(None, &hash, buf));
        let mut intact = files.read(loc, &mut buf)? && good(&buf);
        if !intact && !loc.sealed && matches!(loc.check, Check::Sum(_)) {
            // A plaintext page 1 is read as pulls read it (`Loc::for_page`): by its
            // hash, which leaves out the counters SQLite rewrites, whatever its sum.
            // Scrub agrees with pulls: a flip there is no damage.
            intact = files.read(loc.for_page(1), &mut buf)? && page_matches(Some(1), &hash, &buf);
        }
        if !intact {
            damaged.insert(hash);
        }
        at.done += 1;
        if at.done.is_multiple_of(4096) {
            progress(&at);
        }
        Ok(())
    })?;
    progress(&at);
    Ok(at.done)
}

fn sql(path: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |e| Error::sqlite(path, e)
}

fn scrub_replica(
    file: &Path,
    replica: &ReplicaPath,
    pages: Option<&Pages>,
    damaged: &HashSet<Hash>,
    progress: &mut dyn FnMut(&ScrubProgress),
) -> Result<ReplicaScrub> {
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql(file))?;
    conn.busy_timeout(std::time::Duration::from_secs(60))
        .map_err(sql(file))?;
    conn.execute_batch("BEGIN DEFERRED").map_err(sql(file))?;
    let entries: i64 = conn
        .query_row(
            "SELECT coalesce(sum(page_count), 0) FROM versions",
            [],
            |r| r.get(0),
        )
        .map_err(sql(file))?;
    let mut at = ScrubProgress {
        replica: replica.to_string(),
        done: 0,
        total: entries as u64,
    };
    progress(&at);

    // Every version: its chunks against their keys, both its digests against its
    // manifest, and every page it names present and good.
    let digest2 = match super::replica::has_digest2(&conn, file)? {
        true => "digest2",
        false => "NULL",
    };
    let versions: Vec<StoredVersion> = {
        let mut stmt = conn
            .prepare(&format!(
                "SELECT number, page_size, page_count, digest, {digest2} FROM versions ORDER BY number"
            ))
            .map_err(sql(file))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                ))
            })
            .map_err(sql(file))?;
        rows.collect::<rusqlite::Result<_>>().map_err(sql(file))?
    };
    let mut missing: HashSet<Hash> = HashSet::new();
    let mut users: BTreeMap<Hash, Vec<u64>> = BTreeMap::new();
    let mut checked_chunks: HashSet<Hash> = HashSet::new();
    // Chunks whose page hashes no longer match their key: every version naming one is
    // bad, and the hashes in it are not looked up (they name nothing).
    let mut damaged_chunks: HashSet<Hash> = HashSet::new();
    // What the file records as damaged, to forget what no version uses any more.
    let recorded = bad_pages(&conn, file)?;
    let mut used: HashSet<Hash> = HashSet::new();
    let mut bad_versions = Vec::new();
    let mut chunk_stmt = conn
        .prepare(
            "SELECT m.chunk, c.hashes FROM manifest m LEFT JOIN chunks c ON c.hash = m.chunk
             WHERE m.version = ?1 ORDER BY m.idx",
        )
        .map_err(sql(file))?;
    for (number, page_size, page_count, digest, digest2) in &versions {
        let lock_page = lock_byte_page(*page_size);
        let mut d = Digest::new(*page_size, *page_count);
        let mut d2 = ChunkedDigest::new(*page_size, *page_count);
        let mut problems: Vec<String> = Vec::new();
        let mut touched = false;
        let mut pgno = 0u32;
        // Its shape first (chunks in order, each stored, each of the right length),
        // which says which pages a gap leaves out.
        let shape = manifest_damage(&conn, file, *number, *page_count)?;
        // Whether a push can set it right: bad pages and chunks are stored again by a
        // push that brings them; a manifest or digest that does not hold stays.
        let mut repairable = shape.as_ref().is_none_or(|d| d.repairable);
        problems.extend(shape.as_ref().map(|d| d.problem.clone()));
        // A damaged chunk makes the digests differ too: that is the chunk's problem.
        let mut chunk_damaged = shape.is_some();
        let mut rows = chunk_stmt.query([*number as i64]).map_err(sql(file))?;
        while let Some(row) = rows.next().map_err(sql(file))? {
            let key: Vec<u8> = row.get(0).map_err(sql(file))?;
            let Some(hashes): Option<Vec<u8>> = row.get(1).map_err(sql(file))? else {
                if shape.is_none() {
                    problems.push(format!("its manifest chunk {} is missing", hex(&key)));
                }
                continue;
            };
            let key: Option<Hash> = Hash::try_from(key.as_slice()).ok();
            if let Some(k) = &key {
                d2.push_chunk(k);
            }
            let fresh = key.is_some_and(|k| !checked_chunks.contains(&k));
            if fresh
                && let Some(k) = key
                && k != sha256(&hashes)
            {
                damaged_chunks.insert(k);
            }
            let sound = key.is_some_and(|k| !damaged_chunks.contains(&k));
            if let Some(k) = key.filter(|_| !sound) {
                chunk_damaged = true;
                used.insert(k);
                problems.push(format!("its manifest chunk {} is damaged", hex(&k)));
            }
            for h in hashes.chunks_exact(HASH_BYTES) {
                pgno += 1;
                let h: Hash = h.try_into().expect("chunks_exact yields 32-byte slices");
                d.push(&h);
                at.done += 1;
                if pgno == lock_page || !sound {
                    continue; // never stored (it hashes as zeros), or names nothing
                }
                if recorded.contains(&h) {
                    used.insert(h);
                }
                let bad = if damaged.contains(&h) || missing.contains(&h) {
                    true
                } else if fresh {
                    let present = match pages {
                        Some(p) => p.lookup(&h)?.is_some(),
                        None => false,
                    };
                    if !present {
                        missing.insert(h);
                    }
                    !present
                } else {
                    false
                };
                if bad {
                    touched = true;
                    let v = users.entry(h).or_default();
                    if v.last() != Some(number) {
                        v.push(*number);
                    }
                }
            }
            if let Some(k) = key {
                checked_chunks.insert(k);
            }
            progress(&at);
        }
        // A version made by chunks may record no digest 1, only its chunked digest
        // (checked below); one that records neither is vouched for by nothing.
        let has_digest2 = digest2.as_ref().is_some_and(|d| d.len() == HASH_BYTES);
        match d.finish() {
            Some(ours) if ours[..] == digest[..] => {}
            Some(_) if digest.is_empty() && has_digest2 => {}
            Some(_) if chunk_damaged => {}
            Some(_) => {
                repairable = false;
                problems.push("its digest does not match its manifest".into());
            }
            None if chunk_damaged => {}
            None => {
                repairable = false;
                problems.push(format!("its manifest holds {pgno} pages, not {page_count}"));
            }
        }
        // The chunked digest, where the version records one (an empty one records a
        // manifest that made none, reported above).
        if let Some(digest2) = digest2.as_ref().filter(|d| d.len() == HASH_BYTES)
            && d2.finish().is_none_or(|ours| ours[..] != digest2[..])
            && !chunk_damaged
        {
            repairable = false;
            problems.push("its chunked digest does not match its manifest".into());
        }
        if touched {
            problems.push("it uses damaged or missing pages".into());
        }
        if !problems.is_empty() {
            bad_versions.push(BadVersion {
                number: *number,
                problem: problems.join("; "),
                repairable,
            });
        }
    }
    drop(chunk_stmt);
    drop(conn);

    // The damaged pages and chunks this replica's versions use (others' are theirs to
    // record), and what it recorded before that none of them uses any more (a page or
    // chunk only a removed version had, a hash read from a chunk that was damaged).
    let mut bad: Vec<Hash> = users.keys().copied().collect();
    bad.sort();
    let mut record: Vec<Hash> = bad.iter().chain(&damaged_chunks).copied().collect();
    record.sort();
    if let Err(e) = record_bad_pages(file, &record) {
        tracing::warn!(%replica, error = %e, "could not record the bad pages for repair");
    }
    let stale: Vec<Hash> = recorded.difference(&used).copied().collect();
    if let Err(e) = forget_bad_pages(file, &stale) {
        tracing::warn!(%replica, error = %e, "could not forget damage no version has any more");
    }
    let bad_pages = bad
        .iter()
        .map(|h| BadPage {
            hash: hex(h),
            problem: if damaged.contains(h) {
                "damaged"
            } else {
                "missing"
            },
            versions: users.get(h).cloned().unwrap_or_default(),
        })
        .collect();
    Ok(ReplicaScrub {
        replica: replica.to_string(),
        versions: versions.len() as u64,
        pages: at.done,
        bad_pages,
        bad_versions,
        error: None,
    })
}
