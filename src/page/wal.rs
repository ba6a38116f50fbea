//! Following a database's write-ahead log: which pages changed since a known point of
//! it, learnt from frame headers instead of from reading every page.
//!
//! A point of the WAL is a [`Position`]: the generation's salts, a frame count, and the
//! cumulative checksum of that frame. Frames of one generation are only ever appended
//! (a rolled-back transaction's frames lie past `mxFrame` and are written over by the
//! next one), and a reset starts a new generation with new salts (salt-1 goes up by one,
//! salt-2 is random; a deleted and recreated WAL draws both at random). So between two
//! positions of the same generation, the pages that changed are exactly the pages the
//! frames between them name.
//!
//! Where a reader's snapshot is: SQLite does not say, but the wal-index (`-shm`) does
//! for the latest commit. [`observe`] reads its header (both copies must agree, as
//! SQLite's own readers require) before the snapshot's read transaction starts, and
//! again after: when the salts did not change in between, the snapshot contains at
//! least every frame the first observation counted (within a generation `mxFrame` only
//! grows, and a reader takes the latest header when it starts). That first position is
//! what the page-hash cache is stamped with; frames after it that the snapshot may also
//! contain are found by walking the WAL file past it, and their pages read too (a
//! superset costs a read, never a miss).
//!
//! The `-shm` file is read through a kept handle ([`super::handles`]): SQLite's WAL
//! locks are POSIX locks on it, and closing any handle of it would drop them.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const WAL_HEADER_BYTES: u64 = 32;
const FRAME_HEADER_BYTES: u64 = 24;
const WAL_MAGIC: [u32; 2] = [0x377f_0682, 0x377f_0683];
/// The wal-index format SQLite writes (`WALINDEX_MAX_VERSION`).
const SHM_VERSION: u32 = 3_007_000;
/// One copy of the wal-index header (`WalIndexHdr`).
const SHM_HEADER_BYTES: usize = 48;

/// A point in one generation of a WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    /// The generation's salt-1 and salt-2.
    pub salt: [u32; 2],
    /// Frames of the generation up to this point.
    pub frame: u32,
    /// The cumulative checksum of frame `frame` (zeros when `frame` is 0).
    pub cksum: [u32; 2],
}

/// Bytes of a serialized [`Position`].
pub(crate) const POSITION_BYTES: usize = 20;

impl Position {
    pub(crate) fn to_bytes(self) -> [u8; POSITION_BYTES] {
        let mut b = [0u8; POSITION_BYTES];
        for (i, w) in [
            self.salt[0],
            self.salt[1],
            self.frame,
            self.cksum[0],
            self.cksum[1],
        ]
        .into_iter()
        .enumerate()
        {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
        }
        b
    }

    pub(crate) fn from_bytes(b: &[u8; POSITION_BYTES]) -> Position {
        let w = |i: usize| be(b, i * 4);
        Position {
            salt: [w(0), w(1)],
            frame: w(2),
            cksum: [w(3), w(4)],
        }
    }
}

fn be(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn sibling(db: &Path, suffix: &str) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// What the wal-index header says now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Observed {
    /// The latest commit's position.
    pub position: Position,
    /// Frames copied back into the database file.
    pub backfilled: u32,
}

/// Reads the wal-index header of the database at `db` with `page_size`-byte pages.
/// `None` when there is none (no `-shm`, a heap-memory wal-index, a header being
/// written or not initialised, another page size): the caller cannot be sure of
/// anything and scans.
pub(crate) fn observe(db: &Path, page_size: u32) -> Option<Observed> {
    let shm_path = sibling(db, "-shm");
    if !shm_path.exists() {
        return None;
    }
    let shm = super::handles::open(&shm_path, false).ok()?;
    let mut b = [0u8; 2 * SHM_HEADER_BYTES + 4];
    // A writer updates copy 2 then copy 1; a read that sees them differ raced it.
    for _ in 0..8 {
        if shm.read_exact_at(&mut b, 0).is_err() {
            return None;
        }
        if b[..SHM_HEADER_BYTES] == b[SHM_HEADER_BYTES..2 * SHM_HEADER_BYTES] {
            let ne = |at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            let sz = u32::from(u16::from_ne_bytes([b[14], b[15]]));
            let size = (sz & 0xff00) | ((sz & 1) << 16);
            if ne(0) != SHM_VERSION || b[12] != 1 || size != page_size {
                return None;
            }
            let frame = ne(16);
            let salt = [be(&b, 32), be(&b, 36)];
            if salt == [0, 0] {
                // A wal-index no writer has used yet: every such one looks the same,
                // so it names no generation.
                return None;
            }
            return Some(Observed {
                position: Position {
                    // The salts are the WAL header's bytes, copied as they are.
                    salt,
                    frame,
                    cksum: if frame == 0 { [0, 0] } else { [ne(24), ne(28)] },
                },
                backfilled: ne(2 * SHM_HEADER_BYTES),
            });
        }
        std::thread::yield_now();
    }
    None
}

/// The pages named by the frames of the WAL after `from`, as far as frames of its
/// generation go (frames past the latest commit included: a superset), each passed to
/// `page`. `None` when the WAL does not hold `from` any more (reset, replaced, another
/// page size): the changes since `from` cannot be known from it.
pub(crate) fn pages_since(db: &Path, page_size: u32, from: Position) -> Option<Vec<u32>> {
    let wal_path = sibling(db, "-wal");
    let wal = std::fs::File::open(&wal_path).ok()?;
    let len = wal.metadata().ok()?.len();
    let mut header = [0u8; WAL_HEADER_BYTES as usize];
    if len < WAL_HEADER_BYTES {
        return (from.frame == 0).then(Vec::new);
    }
    wal.read_exact_at(&mut header, 0).ok()?;
    if !WAL_MAGIC.contains(&be(&header, 0)) || be(&header, 8) != page_size {
        return None;
    }
    let salt = [be(&header, 16), be(&header, 20)];
    if salt != from.salt {
        // A new generation: if `from` is its empty start, every frame of it counts.
        return None;
    }
    let stride = FRAME_HEADER_BYTES + u64::from(page_size);
    let at = |frame: u32| WAL_HEADER_BYTES + u64::from(frame - 1) * stride;
    let mut f = [0u8; FRAME_HEADER_BYTES as usize];
    if from.frame > 0 {
        // The frame `from` ends at must still be the one it named.
        if at(from.frame) + stride > len || wal.read_exact_at(&mut f, at(from.frame)).is_err() {
            return None;
        }
        if [be(&f, 8), be(&f, 12)] != salt || [be(&f, 16), be(&f, 20)] != from.cksum {
            return None;
        }
    }
    // Frame headers only: 24 bytes a frame, never the pages.
    let mut pages = Vec::new();
    let mut frame = from.frame + 1;
    while at(frame) + stride <= len {
        if wal.read_exact_at(&mut f, at(frame)).is_err() {
            return None;
        }
        if [be(&f, 8), be(&f, 12)] != salt {
            break;
        }
        pages.push(be(&f, 0));
        frame += 1;
    }
    Some(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip() {
        let p = Position {
            salt: [1, u32::MAX],
            frame: 77,
            cksum: [5, 6],
        };
        assert_eq!(Position::from_bytes(&p.to_bytes()), p);
    }

    #[test]
    fn a_walk_finds_the_pages_written_since_a_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("a.db");
        let conn = rusqlite::Connection::open(&db).expect("opens");
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;
             CREATE TABLE t(x); INSERT INTO t VALUES (randomblob(3000));",
        )
        .expect("writes");
        let before = observe(&db, 4096).expect("a wal-index");
        assert!(before.position.frame > 0);
        let same = pages_since(&db, 4096, before.position).expect("same generation");
        assert!(same.is_empty(), "{same:?}");
        conn.execute_batch("INSERT INTO t SELECT randomblob(3000) FROM t")
            .expect("writes");
        let pages = pages_since(&db, 4096, before.position).expect("same generation");
        assert!(pages.contains(&1) && pages.contains(&3), "{pages:?}");
        // A reset starts a generation the old position is not part of.
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); INSERT INTO t VALUES (1)")
            .expect("writes");
        assert!(pages_since(&db, 4096, before.position).is_none());
        let after = observe(&db, 4096).expect("a wal-index");
        assert_ne!(after.position.salt, before.position.salt);
    }
}
