//! Following a database's write-ahead log: which pages changed since a known point of
//! it, learnt from frame headers instead of from reading every page.
//!
//! A point of the WAL is a [`Position`]: the generation's salts, a frame count, and the
//! cumulative checksum of that frame. Frames of one generation are only ever appended
//! (a rolled-back transaction's frames lie past `mxFrame` and are written over by the
//! next one), and a reset starts a new generation with new salts (salt-1 goes up by one,
//! salt-2 is random; a deleted and recreated WAL draws both at random). So between two
//! positions of the same generation, the pages that changed are exactly the pages the
//! frames between them name. Across one reset they can still be known while the new
//! generation has not written over the old frames ([`walk_since`]).
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

/// The WAL or wal-index SQLite uses for `db`: beside the file a symbolic link points
/// to ([`super::sqlite_sibling`]).
fn sibling(db: &Path, suffix: &str) -> PathBuf {
    super::sqlite_sibling(db, suffix)
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

/// The position that stands for "the WAL holds no committed frame": the database's
/// content is its file alone. Only [`super::SourceState`] uses it (a real position of
/// frame 0 has the generation's salts; this one is canonical, whatever the salts).
pub(crate) const FILE_ONLY: Position = Position {
    salt: [0, 0],
    frame: 0,
    cksum: [0, 0],
};

/// Whether the WAL of `db` holds no committed frame, so that the database's content is
/// its file alone: a wal-index whose header (both copies agreeing, initialised) says
/// `mxFrame` is 0, or, with no wal-index, no WAL file or one too short to hold a frame
/// of `page_size` bytes. `false` when unsure (a header being written, a WAL of frames
/// no wal-index describes: a crashed writer's, which the next connection recovers).
///
/// A caller that is not holding the write lock reads it before and after its read
/// transaction starts, as [`observe`] is read (`Snapshot::open`).
pub(crate) fn holds_no_frames(db: &Path, page_size: u32) -> bool {
    let shm_path = sibling(db, "-shm");
    if !shm_path.exists() {
        return match std::fs::metadata(sibling(db, "-wal")) {
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
            Ok(m) => m.len() < WAL_HEADER_BYTES + FRAME_HEADER_BYTES + u64::from(page_size),
        };
    }
    let Ok(shm) = super::handles::open(&shm_path, false) else {
        return false;
    };
    let mut b = [0u8; 2 * SHM_HEADER_BYTES];
    for _ in 0..8 {
        if shm.read_exact_at(&mut b, 0).is_err() {
            return false;
        }
        if b[..SHM_HEADER_BYTES] == b[SHM_HEADER_BYTES..] {
            let ne = |at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            return ne(0) == SHM_VERSION && b[12] == 1 && ne(16) == 0;
        }
        std::thread::yield_now();
    }
    false
}

/// What a walk of the WAL from a known [`Position`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Walk {
    /// The pages the frames after the position name (duplicates possible), frames past
    /// the latest commit included: a superset of the pages committed since.
    pub pages: Vec<u32>,
    /// The generation the WAL is in now.
    pub salt: [u32; 2],
    /// The last frame of that generation the walk covered (at least the position's,
    /// when it is of that generation).
    pub last: u32,
    /// The last commit frame walked of that generation (the position itself when the
    /// walk found none): where the next walk can start, since a committed frame is
    /// never written over within its generation.
    pub resume: Position,
}

/// Where frame `frame` (1-based) starts, with `stride`-byte frames.
fn frame_at(frame: u32, stride: u64) -> u64 {
    WAL_HEADER_BYTES + u64::from(frame - 1) * stride
}

/// A WAL header's salts and checkpoint sequence.
type WalHeader = ([u32; 2], u32);

/// The WAL file of `db`, its length, and what its header says. `None` when it is not a
/// WAL of `page_size`-byte pages; no header when the file holds none yet.
fn open_wal(db: &Path, page_size: u32) -> Option<(std::fs::File, u64, Option<WalHeader>)> {
    let wal = std::fs::File::open(sibling(db, "-wal")).ok()?;
    let len = wal.metadata().ok()?.len();
    if len < WAL_HEADER_BYTES {
        return Some((wal, len, None));
    }
    let mut header = [0u8; WAL_HEADER_BYTES as usize];
    wal.read_exact_at(&mut header, 0).ok()?;
    if !WAL_MAGIC.contains(&be(&header, 0)) || be(&header, 8) != page_size {
        return None;
    }
    let salt = [be(&header, 16), be(&header, 20)];
    Some((wal, len, Some((salt, be(&header, 12)))))
}

/// The header of frame `frame`, if the file holds the whole frame.
fn frame_header(wal: &std::fs::File, len: u64, stride: u64, frame: u32) -> Option<[u8; 24]> {
    let mut f = [0u8; FRAME_HEADER_BYTES as usize];
    let at = frame_at(frame, stride);
    (at + stride <= len && wal.read_exact_at(&mut f, at).is_ok()).then_some(f)
}

/// Walks the frames of generation `salt` from `first` on (headers only, 24 bytes a
/// frame, never the pages), adding the pages they name to `pages`; returns the last
/// frame of the generation found (`first - 1` if none) and the last commit among them.
fn walk_generation(
    wal: &std::fs::File,
    len: u64,
    stride: u64,
    salt: [u32; 2],
    first: u32,
    pages: &mut Vec<u32>,
) -> (u32, Option<Position>) {
    let mut frame = first;
    let mut commit = None;
    while let Some(f) = frame_header(wal, len, stride, frame) {
        if [be(&f, 8), be(&f, 12)] != salt {
            break;
        }
        pages.push(be(&f, 0));
        if be(&f, 4) != 0 {
            commit = Some(Position {
                salt,
                frame,
                cksum: [be(&f, 16), be(&f, 20)],
            });
        }
        frame += 1;
    }
    (frame - 1, commit)
}

/// Walks the WAL of `db` from `from`: the pages changed since, as far as the WAL can
/// say. `None` when it cannot be sure it names every one (see docs/engine.md, "Why
/// every changed page is seen"):
///
/// - same generation: the frame `from` ends at must still be the one it named;
/// - one reset since (the header's salt-1 is `from`'s plus one and its checkpoint
///   sequence not zero: a WAL SQLite restarted, not one it made anew): the new
///   generation writes from frame 1, so if it has written no further than `from`'s
///   frame, the old generation's frames after `from` are still in the file. Frames of
///   a generation are written in order and committed ones never over, so every frame
///   the old generation wrote after `from` lies between `from` and the first frame
///   position holding another generation's salts. That frame must exist: a file that
///   ends first may have been cut (a `TRUNCATE` checkpoint, `journal_size_limit`),
///   and frames cut are frames not seen. Afterwards the header and the frame after
///   `from` are read again, so a new generation that reached the old frames (or a
///   second reset) while they were read is noticed;
/// - anything else (two resets or more, a WAL made anew, another page size): `None`.
pub(crate) fn walk_since(db: &Path, page_size: u32, from: Position) -> Option<Walk> {
    let (wal, len, header) = open_wal(db, page_size)?;
    let stride = FRAME_HEADER_BYTES + u64::from(page_size);
    let Some((salt, checkpoints)) = header else {
        // No header: no frame was written since a reset or creation.
        return (from.frame == 0).then_some(Walk {
            pages: Vec::new(),
            salt: from.salt,
            last: 0,
            resume: from,
        });
    };
    let mut pages = Vec::new();
    if salt == from.salt {
        if from.frame > 0 {
            // The frame `from` ends at must still be the one it named.
            let f = frame_header(&wal, len, stride, from.frame)?;
            if [be(&f, 8), be(&f, 12)] != salt || [be(&f, 16), be(&f, 20)] != from.cksum {
                return None;
            }
        }
        let (last, commit) = walk_generation(&wal, len, stride, salt, from.frame + 1, &mut pages);
        return Some(Walk {
            pages,
            salt,
            last,
            resume: commit.unwrap_or(from),
        });
    }
    if salt[0] != from.salt[0].wrapping_add(1) || checkpoints == 0 {
        return None;
    }
    // The new generation, from its first frame.
    let (last, commit) = walk_generation(&wal, len, stride, salt, 1, &mut pages);
    if last > from.frame {
        // It wrote over frames of the old one that were never seen.
        return None;
    }
    // The old generation's frames after `from`, up to the first frame position that
    // holds anything else; the file must not end first.
    let mut frame = from.frame + 1;
    loop {
        let f = frame_header(&wal, len, stride, frame)?;
        if [be(&f, 8), be(&f, 12)] != from.salt {
            break;
        }
        pages.push(be(&f, 0));
        frame += 1;
    }
    // Nothing moved under the walk: still one reset, and the new generation still short
    // of the old frames read (it writes in order, so not at `from`'s next frame means
    // not past it either).
    let (wal_now, len_now, header_now) = open_wal(db, page_size)?;
    if header_now.map(|h| h.0) != Some(salt) {
        return None;
    }
    let next = frame_header(&wal_now, len_now, stride, from.frame + 1)?;
    if [be(&next, 8), be(&next, 12)] == salt {
        return None;
    }
    Some(Walk {
        pages,
        salt,
        last,
        resume: commit.unwrap_or(Position {
            salt,
            frame: 0,
            cksum: [0, 0],
        }),
    })
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
        let same = walk_since(&db, 4096, before.position).expect("same generation");
        assert!(same.pages.is_empty(), "{same:?}");
        conn.execute_batch("INSERT INTO t SELECT randomblob(3000) FROM t")
            .expect("writes");
        let pages = walk_since(&db, 4096, before.position)
            .expect("same generation")
            .pages;
        assert!(pages.contains(&1) && pages.contains(&3), "{pages:?}");
        // A reset starts a generation the old position is not part of.
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); INSERT INTO t VALUES (1)")
            .expect("writes");
        assert!(walk_since(&db, 4096, before.position).is_none());
        let after = observe(&db, 4096).expect("a wal-index");
        assert_ne!(after.position.salt, before.position.salt);
    }

    fn exec(conn: &rusqlite::Connection, sql: &str) {
        conn.execute_batch(sql).expect("writes");
    }

    #[test]
    fn no_frames_means_no_committed_frame_in_the_wal_index_or_no_wal_at_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("a.db");
        let conn = rusqlite::Connection::open(&db).expect("opens");
        exec(
            &conn,
            "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0; CREATE TABLE t(x)",
        );
        assert!(!holds_no_frames(&db, 4096), "a commit in the WAL");
        exec(&conn, "PRAGMA wal_checkpoint(PASSIVE)");
        assert!(!holds_no_frames(&db, 4096), "copied back, still in the WAL");
        exec(&conn, "PRAGMA wal_checkpoint(TRUNCATE)");
        assert!(holds_no_frames(&db, 4096), "reset: the file alone");
        exec(&conn, "INSERT INTO t VALUES (1)");
        assert!(!holds_no_frames(&db, 4096), "a commit after the reset");
        // The last connection closing checkpoints and deletes the WAL and wal-index.
        drop(conn);
        assert!(!sibling(&db, "-wal").exists());
        assert!(holds_no_frames(&db, 4096), "no WAL at all");
        // A WAL of committed frames no wal-index describes (a crashed writer's).
        std::fs::write(sibling(&db, "-wal"), vec![1u8; 32 + 24 + 4096]).expect("wal");
        assert!(!holds_no_frames(&db, 4096), "frames nobody recovered yet");
        std::fs::write(sibling(&db, "-wal"), vec![1u8; 32]).expect("wal");
        assert!(holds_no_frames(&db, 4096), "too short for a frame");
    }

    #[test]
    fn a_walk_crosses_one_reset_while_the_old_frames_are_still_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("a.db");
        let conn = rusqlite::Connection::open(&db).expect("opens");
        // A long first generation, so later, shorter ones leave its frames behind them.
        exec(
            &conn,
            "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0; CREATE TABLE t(x);
             WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 60)
             INSERT INTO t SELECT randomblob(3000) FROM c;
             PRAGMA wal_checkpoint(PASSIVE);
             UPDATE t SET x = randomblob(3000) WHERE rowid <= 10;",
        );
        let from = observe(&db, 4096).expect("a wal-index").position;
        assert!(from.frame >= 10, "{from:?}");
        exec(&conn, "UPDATE t SET x = randomblob(3000) WHERE rowid = 40");
        let named = walk_since(&db, 4096, from).expect("same generation").pages;
        assert!(!named.is_empty());
        // Checkpointed and reset; the new generation is shorter than `from`.
        exec(
            &conn,
            "PRAGMA wal_checkpoint(PASSIVE); UPDATE t SET x = randomblob(3000) WHERE rowid = 3;",
        );
        let now = observe(&db, 4096).expect("a wal-index").position;
        assert_eq!(now.salt[0], from.salt[0].wrapping_add(1), "one reset");
        let walk = walk_since(&db, 4096, from).expect("the old frames are still there");
        assert_eq!(walk.salt, now.salt);
        assert!(walk.last >= now.frame);
        for p in &named {
            assert!(
                walk.pages.contains(p),
                "page {p} of the old generation: {walk:?}"
            );
        }
        // The new generation writes over the old frames after `from`: not sure any more.
        exec(&conn, "UPDATE t SET x = randomblob(3000) WHERE rowid > 20");
        assert!(walk_since(&db, 4096, from).is_none());
        // Two resets: not sure either, even from a position of the last generation but
        // one.
        let at = walk.resume;
        exec(
            &conn,
            "PRAGMA wal_checkpoint(PASSIVE); UPDATE t SET x = randomblob(3000) WHERE rowid = 4;
             PRAGMA wal_checkpoint(PASSIVE); UPDATE t SET x = randomblob(3000) WHERE rowid = 5;",
        );
        assert!(walk_since(&db, 4096, at).is_none());
    }

    #[test]
    fn a_walk_across_a_reset_refuses_a_wal_that_ends_where_the_old_frames_were() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("a.db");
        let conn = rusqlite::Connection::open(&db).expect("opens");
        exec(
            &conn,
            "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0; CREATE TABLE t(x);
             WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 30)
             INSERT INTO t SELECT randomblob(3000) FROM c;",
        );
        // The old generation ends where the file does: frames after it may have been cut,
        // so even a plain reset is not enough to be sure.
        let from = observe(&db, 4096).expect("a wal-index").position;
        exec(
            &conn,
            "PRAGMA wal_checkpoint(PASSIVE); UPDATE t SET x = randomblob(3000) WHERE rowid = 3;",
        );
        assert!(walk_since(&db, 4096, from).is_none());
    }
}
