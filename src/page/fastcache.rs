//! The page hashes of a WAL database as of a known point of its WAL, so that a push
//! reads only the pages the WAL names after that point ([`super::wal`]).
//!
//! Unlike the fingerprint cache ([`super::hashcache`]), an entry here is trusted without
//! reading its page, so the file must never be stale without that being detected:
//!
//! - its header names the database file (device and inode: a replaced file is another
//!   database), the page size and count, and the WAL [`Position`] the hashes are true at;
//! - and when the file was last written ([`Written`]): a file written since by anything
//!   but a checkpoint (copied over in place while the WAL stayed where it was) is not
//!   the file the hashes are of;
//! - its entries are kept by chunks ([`ChunkedHashes`], format 3): a table of chunk
//!   hashes (the chunked digest's) after the entries, bound to the header by a checksum
//!   read when the list is opened (32 bytes per 1,024 pages), and each chunk of entries
//!   checked against its hash when it is read. A push that follows the WAL reads only
//!   the chunks it needs (with the chunked digest, only the chunks pages changed in);
//! - an update in place writes the changed chunks' entries, then the table, then the
//!   header: a crash in between, or a power cut reordering the writes, leaves a table
//!   its header's checksum refuses (a full scan), or chunks whose entries do not make
//!   their hash (their pages are read), never a wrong hash.
//!
//! A no-change push writes nothing; a push that changed pages in `c` chunks writes
//! `c · 32 KiB`, the table and a header. The file lives beside the fingerprint cache,
//! named after it with `.wal`. A list of an earlier format is not trusted: the first push
//! after an upgrade reads every page, as without a list.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::wal::{POSITION_BYTES, Position};
use crate::digest::{ChunkedHashes, ChunkedWriter, Hash, table_checksum};

const MAGIC: &[u8; 16] = b"sqlferry-walhash";
/// 2: with [`Written`]; 3: by chunks, with a table of chunk hashes. A list of an earlier
/// format is not trusted: one push reads every page.
const FORMAT: u32 = 3;
const HEADER_BYTES: usize = 96;
/// Where the header keeps the checksum over itself and the table.
const CHECKSUM_AT: std::ops::Range<usize> = 68..76;

/// The identity of a database file: a file replaced under the same name is another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The identity of the file at `path`, without opening it: closing a handle of a
    /// database file would drop the POSIX locks this process's connections hold on it.
    pub(super) fn of_path(path: &Path) -> Option<FileId> {
        let m = std::fs::metadata(path).ok()?;
        Some(FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    pub(super) fn of(file: &File) -> Option<FileId> {
        let m = file.metadata().ok()?;
        Some(FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// Where the WAL hash list of `db` lives in `dir`.
fn path(dir: &Path, db: &Path) -> Option<PathBuf> {
    let mut p = super::hashcache::cache_path(dir, db)?.into_os_string();
    p.push(".wal");
    Some(PathBuf::from(p))
}

/// When the database file was last written (its ctime), and how many WAL frames had
/// been copied back into it (the wal-index's `nBackfill`) when that was read, in that
/// order. In WAL mode only a checkpoint writes the file, copying frames back, which
/// changes no page's content but the file's ctime, and moves `nBackfill` (or, with a
/// reset, the WAL's generation). So a file whose ctime moved while neither did was
/// written by something else (copied over in place, restored from a backup while an
/// application held it open): its pages are not the ones the list hashed.
///
/// Reading the ctime first means a checkpoint between the two readings pairs an older
/// ctime with a newer `nBackfill`: the next push then reads every page once, where the
/// other order could pair a later write outside SQLite with a checkpoint it did not
/// follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Written {
    pub(super) ctime: (i64, u32),
    pub(super) backfilled: u32,
}

impl Written {
    /// Whether a list stamped with `self` at a position of generation `salt` may still
    /// describe the file as it is `now`, in generation `salt_now`: the file was not
    /// written since, or a checkpoint may be why.
    pub(super) fn explains(self, salt: [u32; 2], now: Written, salt_now: [u32; 2]) -> bool {
        self.ctime == now.ctime || salt != salt_now || self.backfilled != now.backfilled
    }
}

/// The header facts of a hash list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp {
    pub(super) id: FileId,
    pub(super) page_size: u32,
    pub(super) page_count: u32,
    pub(super) position: Position,
    pub(super) written: Written,
}

/// The header of a list stamped `stamp` whose table is `table`.
fn header(stamp: &Stamp, table: &[Hash]) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[..16].copy_from_slice(MAGIC);
    h[16..20].copy_from_slice(&FORMAT.to_be_bytes());
    h[24..28].copy_from_slice(&stamp.page_size.to_be_bytes());
    h[28..32].copy_from_slice(&stamp.page_count.to_be_bytes());
    h[32..40].copy_from_slice(&stamp.id.dev.to_be_bytes());
    h[40..48].copy_from_slice(&stamp.id.ino.to_be_bytes());
    h[48..48 + POSITION_BYTES].copy_from_slice(&stamp.position.to_bytes());
    h[76..84].copy_from_slice(&stamp.written.ctime.0.to_be_bytes());
    h[84..88].copy_from_slice(&stamp.written.ctime.1.to_be_bytes());
    h[88..92].copy_from_slice(&stamp.written.backfilled.to_be_bytes());
    let sum = table_checksum(&h, table);
    h[CHECKSUM_AT].copy_from_slice(&sum.to_be_bytes());
    h
}

/// The stamp a header holds, and its checksum, if it is a header of this format.
fn parse(h: &[u8; HEADER_BYTES]) -> Option<(Stamp, u64)> {
    let u32_at = |i: usize| u32::from_be_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_be_bytes(h[i..i + 8].try_into().expect("8 bytes"));
    if &h[..16] != MAGIC || u32_at(16) != FORMAT {
        return None;
    }
    let stamp = Stamp {
        id: FileId {
            dev: u64_at(32),
            ino: u64_at(40),
        },
        page_size: u32_at(24),
        page_count: u32_at(28),
        position: Position::from_bytes(h[48..68].try_into().expect("20 bytes")),
        written: Written {
            ctime: (u64_at(76) as i64, u32_at(84)),
            backfilled: u32_at(88),
        },
    };
    Some((stamp, u64_at(CHECKSUM_AT.start)))
}

/// The header of the hash list of `db` in `dir`, if it is one of this format; neither
/// its table nor its entries are checked (a push's [`HashList::load`] does that).
pub(super) fn sealed_stamp(dir: &Path, db: &Path) -> Option<Stamp> {
    let file = File::open(path(dir, db)?).ok()?;
    let mut h = [0u8; HEADER_BYTES];
    file.read_exact_at(&mut h, 0).ok()?;
    parse(&h).map(|(stamp, _)| stamp)
}

/// A hash list whose header and table hold together, open for one scan. Its chunks
/// are checked as they are read; the update the scan makes is written chunk by chunk
/// ([`HashList::write_chunk`]) and sealed by [`HashList::finish`].
pub(super) struct HashList {
    chunks: ChunkedHashes,
    path: PathBuf,
    pub(super) stamp: Stamp,
    /// A write failed: the list is removed at [`HashList::finish`].
    failed: bool,
}

impl HashList {
    /// The hash list of `db` in `dir`, if there is one of this format, of this file and
    /// page size, whose table its header's checksum holds. Reads the header and the
    /// table (32 bytes per 1,024 pages), no entry.
    pub(super) fn load(dir: &Path, db: &Path, id: FileId, page_size: u32) -> Option<HashList> {
        let path = path(dir, db)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .ok()?;
        let mut h = [0u8; HEADER_BYTES];
        file.read_exact_at(&mut h, 0).ok()?;
        let (stamp, sum) = parse(&h)?;
        if stamp.id != id || stamp.page_size != page_size {
            return None;
        }
        h[CHECKSUM_AT].fill(0);
        let chunks = ChunkedHashes::open(file, HEADER_BYTES as u64, stamp.page_count, &h, sum)?;
        Some(HashList {
            chunks,
            path,
            stamp,
            failed: false,
        })
    }

    /// The chunk hashes of the list's pages, in order.
    pub(super) fn table(&self) -> &[Hash] {
        self.chunks.table()
    }

    /// Appends the hashes of chunk `idx` to `out` when they make the chunk's hash:
    /// `false` (and `out` as it was) when they do not, or there is no such chunk.
    pub(super) fn read_chunk(&self, idx: u32, out: &mut Vec<u8>) -> std::io::Result<bool> {
        self.chunks.read_chunk(idx, out)
    }

    /// Writes the new entries of chunk `idx` in place (the update's first step).
    pub(super) fn write_chunk(&mut self, idx: u32, entries: &[u8]) {
        if !self.failed
            && let Err(e) = self.chunks.write_chunk(idx, entries)
        {
            tracing::debug!(error = %e, "could not update the WAL hash list");
            self.failed = true;
        }
    }

    /// Seals the list at `stamp` with the chunk hashes `table`, once every chunk whose
    /// entries changed was written ([`HashList::write_chunk`]): the table goes after
    /// the entries, then the header. Writes nothing when neither changed.
    pub(super) fn finish(mut self, stamp: Stamp, table: Vec<Hash>) {
        if !self.failed && stamp == self.stamp && table == self.chunks.table() {
            return;
        }
        let h = header(&stamp, &table);
        let result = match self.failed {
            true => Err(std::io::Error::other("a chunk could not be written")),
            false => self
                .chunks
                .finish_update(stamp.page_count, table)
                .and_then(|()| self.chunks.file().write_all_at(&h, 0)),
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "could not update the WAL hash list; the next push scans");
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Leaves the list for the next scan to judge: an update begun is not sealed, and
    /// the chunks it wrote fail their check (the rest of the list holds).
    pub(super) fn abandon(self) {
        if self.failed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A new hash list, written during a full scan and sealed at its end.
pub(super) struct ListWriter {
    out: ChunkedWriter<BufWriter<tempfile::NamedTempFile>>,
    path: PathBuf,
}

impl ListWriter {
    pub(super) fn new(dir: &Path, db: &Path) -> Option<ListWriter> {
        let path = path(dir, db)?;
        let parent = path.parent()?;
        std::fs::create_dir_all(parent).ok()?;
        let tmp = tempfile::NamedTempFile::new_in(parent).ok()?;
        let mut out = BufWriter::with_capacity(256 * 1024, tmp);
        out.write_all(&[0u8; HEADER_BYTES]).ok()?;
        Some(ListWriter {
            out: ChunkedWriter::new(out),
            path,
        })
    }

    pub(super) fn push(&mut self, hash: &Hash) -> std::io::Result<()> {
        self.out.push(hash)
    }

    /// Seals the list as true at `position` of the file `id`, `written` as it says, if
    /// it holds `page_count` pages of `page_size` bytes.
    pub(super) fn finish(
        self,
        id: FileId,
        page_size: u32,
        page_count: u32,
        position: Position,
        written: Written,
    ) {
        if self.out.count() != page_count {
            return;
        }
        let stamp = Stamp {
            id,
            page_size,
            page_count,
            position,
            written,
        };
        let result = self.out.finish().and_then(|(out, table)| {
            let tmp = out.into_inner().map_err(|e| e.into_error())?;
            tmp.as_file().write_all_at(&header(&stamp, &table), 0)?;
            tmp.persist(&self.path).map(drop).map_err(|e| e.error)
        });
        if let Err(e) = result {
            tracing::debug!(error = %e, "could not store the WAL hash list");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_written_since_is_trusted_only_where_a_checkpoint_can_be_why() {
        let at = Written {
            ctime: (1_700_000_000, 1),
            backfilled: 4,
        };
        let salt = [1, 2];
        assert!(at.explains(salt, at, salt), "not written since");
        let written = Written {
            ctime: (1_700_000_000, 2),
            ..at
        };
        assert!(!at.explains(salt, written, salt), "written outside SQLite");
        let checkpointed = Written {
            backfilled: 9,
            ..written
        };
        assert!(at.explains(salt, checkpointed, salt), "a checkpoint");
        assert!(at.explains(salt, written, [2, 7]), "a reset");
    }

    #[test]
    fn a_list_is_refused_when_torn_or_of_another_file_and_a_torn_chunk_alone_is_refused() {
        use crate::digest::sha256;
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("a.db");
        std::fs::write(&db, b"x").expect("writes");
        let id = FileId::of(&File::open(&db).expect("opens")).expect("meta");
        let cache = dir.path().join("cache");
        let pos = Position {
            salt: [1, 2],
            frame: 3,
            cksum: [4, 5],
        };
        let page = |i: u32| sha256(&i.to_be_bytes());
        let mut w = ListWriter::new(&cache, &db).expect("writer");
        for i in 1..=2000 {
            w.push(&page(i)).expect("push");
        }
        let written = Written {
            ctime: (1_700_000_000, 5),
            backfilled: 2,
        };
        w.finish(id, 4096, 2000, pos, written);
        let mut list = HashList::load(&cache, &db, id, 4096).expect("a list");
        assert_eq!((list.stamp.position, list.stamp.written), (pos, written));
        let hashes: Vec<Hash> = (1..=2000).map(page).collect();
        assert_eq!(
            list.table(),
            [
                sha256(&hashes[..1024].concat()),
                sha256(&hashes[1024..].concat())
            ]
        );
        let mut got = Vec::new();
        assert!(list.read_chunk(1, &mut got).expect("reads"));
        assert_eq!(got, hashes[1024..].concat());
        assert!(HashList::load(&cache, &db, id, 8192).is_none(), "page size");
        let other = FileId {
            dev: id.dev,
            ino: id.ino + 1,
        };
        assert!(
            HashList::load(&cache, &db, other, 4096).is_none(),
            "replaced file"
        );
        // An update moves the position and grows the list by a chunk; only the chunks
        // that changed are written.
        let mut stamp = list.stamp;
        stamp.position.frame = 9;
        stamp.page_count = 2100;
        let mut new = hashes.clone();
        new[1500] = page(0);
        new.extend((2001..=2100).map(page));
        list.write_chunk(1, &new[1024..2048].concat());
        list.write_chunk(2, &new[2048..].concat());
        let table: Vec<Hash> = new.chunks(1024).map(|c| sha256(&c.concat())).collect();
        list.finish(stamp, table.clone());
        let list = HashList::load(&cache, &db, id, 4096).expect("updated list");
        assert_eq!((list.stamp, list.table()), (stamp, &table[..]));
        for idx in 0..3u32 {
            let mut got = Vec::new();
            assert!(
                list.read_chunk(idx, &mut got).expect("reads"),
                "chunk {idx}"
            );
            let at = idx as usize * 1024;
            assert_eq!(got, new[at..(at + 1024).min(2100)].concat());
        }
        // A flipped byte in an entry: that chunk is refused, the rest holds.
        let p = path(&cache, &db).expect("path");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .expect("opens");
        f.write_all_at(&[0xff], HEADER_BYTES as u64 + 40)
            .expect("writes");
        let list = HashList::load(&cache, &db, id, 4096).expect("the table holds");
        assert!(
            !list.read_chunk(0, &mut Vec::new()).expect("reads"),
            "torn chunk"
        );
        assert!(list.read_chunk(1, &mut Vec::new()).expect("reads"));
        // A flipped byte in the table, or the header: no list.
        let table_at = HEADER_BYTES as u64 + 2100 * 32;
        for at in [table_at + 33, 30] {
            let mut b = [0u8];
            f.read_exact_at(&mut b, at).expect("reads");
            f.write_all_at(&[b[0] ^ 1], at).expect("writes");
            assert!(HashList::load(&cache, &db, id, 4096).is_none(), "byte {at}");
            f.write_all_at(&b, at).expect("writes back");
        }
        assert!(HashList::load(&cache, &db, id, 4096).is_some());
        // A list of format 2 is not trusted.
        f.write_all_at(&2u32.to_be_bytes(), 16).expect("writes");
        assert!(HashList::load(&cache, &db, id, 4096).is_none(), "format 2");
        assert!(sealed_stamp(&cache, &db).is_none());
    }
}
