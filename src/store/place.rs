//! Place hints: where the pages of a manifest chunk were stored when a version using
//! the chunk was committed, so that a full read of a version (a pull into a new file)
//! goes straight to the pack bytes instead of looking every page up in the page index
//! (one SQLite leaf, one `pread`, per page).
//!
//! Layout, in the replica file: `places(chunk, runs)`, one row per manifest chunk (keyed
//! like `chunks`, by the SHA-256 of its page hashes, so every version that shares a
//! chunk shares its hint). `runs` is a list of runs, each `pack` (i64), `offset` (u64),
//! `count` (u32), little-endian, then:
//! - for a run of entries with sums (`pack` < 0, the entries in pack `-pack`), `count`
//!   times a length (u32; the top bit set for an entry stored as one zstd frame, the
//!   next for a sealed one) and the entry's sum (u64, [`super::pack::sum_of`] of its stored
//!   bytes, as its index row has it): a read through the hint checks the bytes against
//!   it, as a read through the index does. Older sqlferry refuses such a hint (a
//!   negative pack) and reads through the index;
//! - for a run of older entries (`pack` > 0), `count` lengths (u32, the top bit set for
//!   an entry stored as one zstd frame), checked by their page's hash;
//! - a run with `pack` 0 is `count` pages with no place known (the reader looks them up
//!   in the index; so is an older sealed entry, whose SHA-256 a hint does not carry).
//!
//! The entries of a placed run lie end to end from `offset`: a version pushed whole has
//! one run a chunk, 12 bytes a page.
//!
//! Invariants:
//! - A hint is never trusted. Every page read through one is checked against its hash
//!   as every read is; a page whose hinted bytes do not check (its bytes moved: a
//!   damaged page pointed at good bytes by a repair, a page collected and pushed again,
//!   a pack cut back) is read again through the index, and only what the index names
//!   decides whether the page is damaged or missing. A hint that does not parse, or
//!   does not cover its chunk, is not used at all. So a stale hint costs a read, never
//!   a wrong byte.
//! - Hints are written in the push's transaction, after its pages are indexed: a hint
//!   exists only beside the manifest rows it describes. A push writes one for each
//!   chunk of its version that has none (a chunk unchanged from the version before keeps
//!   its hint), from where this push put or found each page, else the previous
//!   version's hint for an unchanged page, else the index: a push's cost stays in
//!   proportion to the chunks it changed. A push that repaired pages writes its
//!   version's hints again.
//! - Existing stores keep working: a replica file made before hints has none until its
//!   next push, which writes them for every chunk of its version (one index lookup a
//!   page, once); until then its pulls look every page up, as before.
//! - Removing a version removes the hints of the chunks no version uses any more.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use super::CHUNK_PAGES;
use super::pack::{Check, Loc, Pages};
use super::replica::sql;
use crate::Result;
use crate::digest::{HASH_BYTES, Hash};

/// The table of hints, created beside the manifest by the first push that writes one.
pub(super) const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS places(
        chunk BLOB PRIMARY KEY,
        runs BLOB NOT NULL
    );
";

/// Where the push in progress put or found each page it was sent, one row a chunk
/// ([`Placed`]): what its hints are built from. An entry whose hash is not the
/// version's page there is not used.
pub(super) const PLACED_SCHEMA: &str = "
    CREATE TEMP TABLE IF NOT EXISTS placed(
        idx INTEGER PRIMARY KEY,
        pages BLOB NOT NULL
    );
    DELETE FROM temp.placed;
";

/// Bytes of one entry of a `temp.placed` row: present (1: the entry has a sum, 2: it is
/// checked by its page's hash), hash, pack (8), offset (8), length (4, with the bits
/// below), sum (8).
const PLACED_ENTRY_BYTES: usize = 1 + HASH_BYTES + 8 + 8 + 4 + 8;

/// The bit of an entry's length that says it is stored as one zstd frame.
const ZSTD_BIT: u32 = 1 << 31;

/// The bit of an entry's length that says it is a sealed page (runs with sums only).
const SEALED_BIT: u32 = 1 << 30;

/// How a hint can place an entry: with its sum, by its page's hash, or not at all.
#[derive(PartialEq, Eq)]
enum Kind {
    Sum,
    Page,
    Unplaced,
}

fn kind(loc: &Option<Loc>) -> Kind {
    match loc.map(|l| (l.check, l.sealed)) {
        Some((Check::Sum(_), _)) => Kind::Sum,
        Some((Check::Page, false)) => Kind::Page,
        _ => Kind::Unplaced,
    }
}

/// An entry's length with its flag bits.
fn flagged_len(loc: &Loc) -> u32 {
    loc.len | if loc.zstd { ZSTD_BIT } else { 0 } | if loc.sealed { SEALED_BIT } else { 0 }
}

/// Bytes of a run's head: pack, offset, count.
const RUN_HEAD_BYTES: usize = 8 + 8 + 4;

/// Whether the replica open on `conn` has a hint table (a file made before hints has
/// none).
pub(super) fn has_places(conn: &Connection, file: &Path) -> Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'places'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )
    .map_err(sql(file))
}

/// Encodes the places of one chunk's pages (in page order) into `out`.
pub(super) fn encode(locs: &[Option<Loc>], out: &mut Vec<u8>) {
    out.clear();
    let mut i = 0;
    while i < locs.len() {
        let mut j = i + 1;
        let run = kind(&locs[i]);
        match (run, locs[i]) {
            (Kind::Unplaced, _) | (_, None) => {
                while j < locs.len() && kind(&locs[j]) == Kind::Unplaced {
                    j += 1;
                }
                out.extend_from_slice(&0i64.to_le_bytes());
                out.extend_from_slice(&0u64.to_le_bytes());
                out.extend_from_slice(&((j - i) as u32).to_le_bytes());
            }
            (run, Some(first)) => {
                let mut end = first.offset + u64::from(first.len);
                while let Some(Some(next)) = locs.get(j) {
                    if next.pack != first.pack || next.offset != end || kind(&locs[j]) != run {
                        break;
                    }
                    end += u64::from(next.len);
                    j += 1;
                }
                let pack = if run == Kind::Sum {
                    -first.pack
                } else {
                    first.pack
                };
                out.extend_from_slice(&pack.to_le_bytes());
                out.extend_from_slice(&first.offset.to_le_bytes());
                out.extend_from_slice(&((j - i) as u32).to_le_bytes());
                for loc in locs[i..j].iter().flatten() {
                    out.extend_from_slice(&flagged_len(loc).to_le_bytes());
                    if let Check::Sum(sum) = loc.check {
                        out.extend_from_slice(&sum.to_le_bytes());
                    }
                }
            }
        }
        i = j;
    }
}

/// Decodes a chunk's hint of `pages` entries into `out`; `false` (and `out` empty) when
/// it is not one (damaged, or of another chunk length): then it is not used.
pub(super) fn decode(blob: &[u8], pages: usize, out: &mut Vec<Option<Loc>>) -> bool {
    out.clear();
    let ok = decode_into(blob, pages, out).is_some();
    if !ok {
        out.clear();
    }
    ok
}

fn decode_into(mut blob: &[u8], pages: usize, out: &mut Vec<Option<Loc>>) -> Option<()> {
    fn take<const N: usize>(blob: &mut &[u8]) -> Option<[u8; N]> {
        let (head, rest) = blob.split_at_checked(N)?;
        *blob = rest;
        head.try_into().ok()
    }
    while !blob.is_empty() {
        if blob.len() < RUN_HEAD_BYTES {
            return None;
        }
        let pack = i64::from_le_bytes(take(&mut blob)?);
        let mut offset = u64::from_le_bytes(take(&mut blob)?);
        let count = u32::from_le_bytes(take(&mut blob)?) as usize;
        if count == 0 || out.len() + count > pages || pack == i64::MIN {
            return None;
        }
        if pack == 0 {
            out.extend(std::iter::repeat_n(None, count));
            continue;
        }
        let summed = pack < 0;
        for _ in 0..count {
            let raw = u32::from_le_bytes(take(&mut blob)?);
            let (check, sealed) = if summed {
                let sum = u64::from_le_bytes(take(&mut blob)?);
                (Check::Sum(sum), raw & SEALED_BIT != 0)
            } else if raw & SEALED_BIT != 0 {
                return None;
            } else {
                (Check::Page, false)
            };
            let len = raw & !(ZSTD_BIT | SEALED_BIT);
            if len == 0 {
                return None;
            }
            out.push(Some(Loc {
                pack: pack.abs(),
                offset,
                len,
                zstd: raw & ZSTD_BIT != 0,
                sealed,
                check,
            }));
            offset = offset.checked_add(u64::from(len))?;
        }
    }
    (out.len() == pages).then_some(())
}

/// Where the push in progress put or found the pages it was sent: the chunk pages are
/// coming for in memory (one entry a page, about 56 KiB), the others in `temp.placed`,
/// one row a chunk, written when the pages move on to another chunk (a push sends
/// its pages in page order: one row a chunk, where a row a page cost a full push of
/// 216 MB about 0.1 s of the server's CPU).
pub(super) struct Placed {
    /// The chunk in memory, and its entries.
    idx: Option<u32>,
    pages: Vec<Option<(Hash, Loc)>>,
}

impl Placed {
    pub fn new() -> Placed {
        Placed {
            idx: None,
            pages: Vec::new(),
        }
    }

    /// Records where page `pgno` (hash `hash`) was put or found.
    pub fn add(
        &mut self,
        conn: &Connection,
        file: &Path,
        pgno: u32,
        hash: &Hash,
        loc: Loc,
    ) -> Result<()> {
        let idx = (pgno - 1) / CHUNK_PAGES as u32;
        if self.idx != Some(idx) {
            self.flush(conn, file)?;
            self.idx = Some(idx);
            self.pages.clear();
            self.pages.resize(CHUNK_PAGES, None);
        }
        // An older sealed entry is not placed: a hint cannot carry its SHA-256.
        self.pages[(pgno - 1) as usize % CHUNK_PAGES] =
            (kind(&Some(loc)) != Kind::Unplaced).then_some((*hash, loc));
        Ok(())
    }

    /// Writes the chunk in memory into `temp.placed`, over what an earlier visit of
    /// the same chunk left (the later entry of a page wins).
    pub fn flush(&mut self, conn: &Connection, file: &Path) -> Result<()> {
        let Some(idx) = self.idx.take() else {
            return Ok(());
        };
        let mut merged = Vec::with_capacity(CHUNK_PAGES);
        load(conn, file, idx, &mut merged)?;
        for (slot, ours) in merged.iter_mut().zip(&self.pages) {
            if ours.is_some() {
                *slot = *ours;
            }
        }
        let mut blob = Vec::with_capacity(CHUNK_PAGES * PLACED_ENTRY_BYTES);
        for entry in &merged {
            match entry {
                Some((hash, loc)) => {
                    let sum = match loc.check {
                        Check::Sum(sum) => Some(sum),
                        _ => None,
                    };
                    blob.push(if sum.is_some() { 1 } else { 2 });
                    blob.extend_from_slice(hash);
                    blob.extend_from_slice(&loc.pack.to_le_bytes());
                    blob.extend_from_slice(&loc.offset.to_le_bytes());
                    blob.extend_from_slice(&flagged_len(loc).to_le_bytes());
                    blob.extend_from_slice(&sum.unwrap_or(0).to_le_bytes());
                }
                None => blob.extend_from_slice(&[0u8; PLACED_ENTRY_BYTES]),
            }
        }
        conn.prepare_cached("INSERT OR REPLACE INTO temp.placed(idx, pages) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![idx, blob]))
            .map(drop)
            .map_err(sql(file))
    }

    /// Forgets where this push put its pages (some of them moved: `drop_unused`); its
    /// hints are then built from the previous version's and the index.
    pub fn forget(&mut self, conn: &Connection, file: &Path) -> Result<()> {
        self.idx = None;
        conn.execute_batch("DELETE FROM temp.placed")
            .map_err(sql(file))
    }
}

/// The entries `temp.placed` holds for chunk `idx` into `out` (one a page of a chunk,
/// `None` where none was recorded).
fn load(
    conn: &Connection,
    file: &Path,
    idx: u32,
    out: &mut Vec<Option<(Hash, Loc)>>,
) -> Result<()> {
    out.clear();
    out.resize(CHUNK_PAGES, None);
    let blob: Option<Vec<u8>> = conn
        .prepare_cached("SELECT pages FROM temp.placed WHERE idx = ?1")
        .and_then(|mut s| s.query_row([idx], |r| r.get(0)).optional())
        .map_err(sql(file))?;
    let Some(blob) = blob else {
        return Ok(());
    };
    for (slot, e) in out.iter_mut().zip(blob.chunks_exact(PLACED_ENTRY_BYTES)) {
        if e[0] != 1 && e[0] != 2 {
            continue;
        }
        let at = 1 + HASH_BYTES;
        let word = |from: usize| -> [u8; 8] { e[from..from + 8].try_into().expect("8 bytes") };
        let len = u32::from_le_bytes(e[at + 16..at + 20].try_into().expect("4 bytes"));
        *slot = Some((
            e[1..at].try_into().expect("32 bytes"),
            Loc {
                pack: i64::from_le_bytes(word(at)),
                offset: u64::from_le_bytes(word(at + 8)),
                len: len & !(ZSTD_BIT | SEALED_BIT),
                zstd: len & ZSTD_BIT != 0,
                sealed: len & SEALED_BIT != 0,
                check: if e[0] == 1 {
                    Check::Sum(u64::from_le_bytes(word(at + 20)))
                } else {
                    Check::Page
                },
            },
        ));
    }
    Ok(())
}

/// Writes the hints of `version`'s chunks that have none (every chunk with `all`), in
/// the open transactions of the replica (`conn`) and of the index (`pages`, whose rows
/// this push added are seen), after the version's rows and the index rows of its pages.
/// `previous` is the version the push was made onto, whose hints serve the pages it
/// did not change. Returns the hints written.
pub(super) fn write(
    conn: &Connection,
    file: &Path,
    pages: &Pages,
    placed: &mut Placed,
    version: u64,
    previous: Option<u64>,
    all: bool,
) -> Result<u64> {
    placed.flush(conn, file)?;
    // The chunks to write a hint for, listed first (the loop below writes to
    // `places`): one key a chunk, never the page hashes.
    let todo: Vec<(u32, Vec<u8>)> = conn
        .prepare(
            "SELECT m.idx, m.chunk FROM manifest m
             WHERE m.version = ?1
               AND (?2 OR NOT EXISTS (SELECT 1 FROM places p WHERE p.chunk = m.chunk))
             ORDER BY m.idx",
        )
        .and_then(|mut s| {
            s.query_map(params![version as i64, all], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()
        })
        .map_err(sql(file))?;
    let mut written = 0u64;
    let mut locs: Vec<Option<Loc>> = Vec::with_capacity(CHUNK_PAGES);
    let mut old_locs: Vec<Option<Loc>> = Vec::with_capacity(CHUNK_PAGES);
    let mut here: Vec<Option<(Hash, Loc)>> = Vec::with_capacity(CHUNK_PAGES);
    let mut blob = Vec::new();
    for (idx, key) in todo {
        let hashes: Option<Vec<u8>> = conn
            .prepare_cached("SELECT hashes FROM chunks WHERE hash = ?1")
            .and_then(|mut s| s.query_row([&key], |r| r.get(0)).optional())
            .map_err(sql(file))?;
        let Some(hashes) = hashes else {
            continue; // left to scrub, as every read of this chunk is
        };
        // Where this push put or found the chunk's pages.
        load(conn, file, idx, &mut here)?;
        // The previous version's chunk at the same place, and its hint.
        let old: Option<(Vec<u8>, Option<Vec<u8>>)> = match previous {
            Some(prev) => conn
                .prepare_cached(
                    "SELECT c.hashes, p.runs FROM manifest m JOIN chunks c ON c.hash = m.chunk
                     LEFT JOIN places p ON p.chunk = m.chunk
                     WHERE m.version = ?1 AND m.idx = ?2",
                )
                .and_then(|mut s| {
                    s.query_row(params![prev as i64, idx], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()
                })
                .map_err(sql(file))?,
            None => None,
        };
        let (old_hashes, old_ok) = match &old {
            Some((h, Some(runs))) => {
                let n = h.len() / HASH_BYTES;
                (&h[..], decode(runs, n, &mut old_locs))
            }
            _ => (&[][..], false),
        };
        locs.clear();
        for (j, h) in hashes.chunks_exact(HASH_BYTES).enumerate() {
            let h: Hash = h.try_into().expect("chunks_exact yields 32-byte slices");
            let loc = match here[j] {
                Some((hash, loc)) if hash == h => Some(loc),
                // Sent by this push, but not as this page: the index says.
                Some(_) => pages.lookup(&h)?,
                None => match old_locs.get(j) {
                    Some(&Some(loc))
                        if old_ok
                            && old_hashes.get(j * HASH_BYTES..(j + 1) * HASH_BYTES)
                                == Some(&h[..]) =>
                    {
                        Some(loc)
                    }
                    _ => pages.lookup(&h)?,
                },
            };
            locs.push(loc);
        }
        encode(&locs, &mut blob);
        conn.prepare_cached("INSERT OR REPLACE INTO places(chunk, runs) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![&key, &blob]))
            .map_err(sql(file))?;
        written += 1;
    }
    Ok(written)
}

/// Removes the hints of chunks no version uses any more (after versions were removed),
/// in `conn`'s open transaction; a file without hints is left as it is.
pub(super) fn remove_unused(conn: &Connection, file: &Path) -> Result<()> {
    if has_places(conn, file)? {
        conn.execute(
            "DELETE FROM places WHERE chunk NOT IN (SELECT hash FROM chunks)",
            [],
        )
        .map_err(sql(file))?;
    }
    Ok(())
}

/// A chunk's hint, read with its hashes: the places of its pages, for a reader.
pub(super) struct Hint {
    locs: Vec<Option<Loc>>,
    ok: bool,
}

impl Hint {
    pub fn new() -> Hint {
        Hint {
            locs: Vec::with_capacity(CHUNK_PAGES),
            ok: false,
        }
    }

    /// Takes the hint `runs` of a chunk of `pages` pages (`None`: no hint).
    pub fn load(&mut self, runs: Option<&[u8]>, pages: usize) {
        self.ok = match runs {
            Some(runs) => decode(runs, pages, &mut self.locs),
            None => false,
        };
    }

    /// The hinted place of the chunk's page `j` (0-based), if any.
    pub fn get(&self, j: usize) -> Option<Loc> {
        if self.ok {
            self.locs.get(j).copied().flatten()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(pack: i64, offset: u64, len: u32, zstd: bool) -> Option<Loc> {
        Some(Loc {
            pack,
            offset,
            len,
            zstd,
            sealed: false,
            check: Check::Page,
        })
    }

    fn summed(pack: i64, offset: u64, len: u32, zstd: bool, sealed: bool) -> Option<Loc> {
        Some(Loc {
            check: Check::Sum(offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(len)),
            sealed,
            ..loc(pack, offset, len, zstd)?
        })
    }

    /// Entries with sums go in runs of their own, with each sum and the sealed and
    /// compressed bits; an older entry keeps its own kind of run; an older sealed entry
    /// (checked by a SHA-256 a hint cannot carry) is left unplaced.
    #[test]
    fn hints_carry_each_entry_sum_and_kind() {
        let old_sealed = Some(Loc {
            sealed: true,
            check: Check::Sha([7; 32]),
            ..loc(1, 0, 4124, false).unwrap()
        });
        let locs = vec![
            summed(3, 0, 4096, false, false),
            summed(3, 4096, 100, true, false),
            summed(3, 4196, 4124, false, true),
            loc(3, 8320, 4096, false),
            old_sealed,
            summed(3, 12416, 4096, false, false),
        ];
        let mut blob = Vec::new();
        encode(&locs, &mut blob);
        // Runs: three summed entries, one older, one unplaced, one summed.
        assert_eq!(blob.len(), 4 * RUN_HEAD_BYTES + 4 * 12 + 4);
        let mut out = Vec::new();
        assert!(decode(&blob, locs.len(), &mut out));
        let mut want = locs.clone();
        want[4] = None;
        assert_eq!(out, want);
        // Older sqlferry refused a negative pack: such a hint was never read by it.
        assert_eq!(i64::from_le_bytes(blob[..8].try_into().unwrap()), -3);
    }

    #[test]
    fn hints_round_trip_with_runs_gaps_and_compressed_entries() {
        let locs = vec![
            loc(1, 0, 4096, false),
            loc(1, 4096, 4096, false),
            loc(1, 8192, 100, true),
            None,
            None,
            loc(2, 50, 4096, false),
            loc(1, 0, 4096, false),
        ];
        let mut blob = Vec::new();
        encode(&locs, &mut blob);
        // Runs: [0..3) in pack 1, two unplaced, one in pack 2, one back in pack 1.
        assert_eq!(blob.len(), 4 * RUN_HEAD_BYTES + 5 * 4);
        let mut out = Vec::new();
        assert!(decode(&blob, locs.len(), &mut out));
        assert_eq!(out, locs);
    }

    #[test]
    fn a_hint_of_another_length_or_cut_short_is_not_used() {
        let locs: Vec<_> = (0..3).map(|i| loc(1, i * 4096, 4096, false)).collect();
        let mut blob = Vec::new();
        encode(&locs, &mut blob);
        let mut out = Vec::new();
        assert!(!decode(&blob, 4, &mut out));
        assert!(out.is_empty());
        assert!(!decode(&blob, 2, &mut out));
        assert!(!decode(&blob[..blob.len() - 1], 3, &mut out));
        assert!(!decode(&[], 3, &mut out));
        let mut hint = Hint::new();
        hint.load(Some(&blob[..5]), 3);
        assert_eq!(hint.get(0), None);
        hint.load(Some(&blob), 3);
        assert_eq!(hint.get(2), loc(1, 8192, 4096, false));
    }
}
