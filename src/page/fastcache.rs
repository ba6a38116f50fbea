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
//! - it carries an XXH3 checksum of all its entries, checked (one sequential read of 32
//!   bytes a page) before any entry is used, so a torn or half-updated file is refused;
//! - an update in place first marks the header unsealed, then writes the changed
//!   entries, then seals it with the new position and checksum: a crash in between
//!   leaves an unsealed file, or (power loss reordering the writes) one whose checksum
//!   fails; either means a full scan, never a wrong hash.
//!
//! A no-change push writes nothing; a push that changed `n` pages writes `32·n` bytes and
//! a header. The file lives beside the fingerprint cache, named after it with `.wal`.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::wal::{POSITION_BYTES, Position};
use crate::digest::Hash;

const MAGIC: &[u8; 16] = b"sqlferry-walhash";
/// 2: with [`Written`] (a list of format 1 is not trusted: one push reads every page).
const FORMAT: u32 = 2;
const HEADER_BYTES: usize = 96;
const ENTRY_BYTES: u64 = 32;
const SEALED: u32 = 1;
const UNSEALED: u32 = 0;

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
    pub(super) checksum: u64,
    pub(super) written: Written,
}

fn header(stamp: &Stamp, state: u32) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[..16].copy_from_slice(MAGIC);
    h[16..20].copy_from_slice(&FORMAT.to_be_bytes());
    h[20..24].copy_from_slice(&state.to_be_bytes());
    h[24..28].copy_from_slice(&stamp.page_size.to_be_bytes());
    h[28..32].copy_from_slice(&stamp.page_count.to_be_bytes());
    h[32..40].copy_from_slice(&stamp.id.dev.to_be_bytes());
    h[40..48].copy_from_slice(&stamp.id.ino.to_be_bytes());
    h[48..48 + POSITION_BYTES].copy_from_slice(&stamp.position.to_bytes());
    h[68..76].copy_from_slice(&stamp.checksum.to_be_bytes());
    h[76..84].copy_from_slice(&stamp.written.ctime.0.to_be_bytes());
    h[84..88].copy_from_slice(&stamp.written.ctime.1.to_be_bytes());
    h[88..92].copy_from_slice(&stamp.written.backfilled.to_be_bytes());
    h
}

fn parse(h: &[u8; HEADER_BYTES]) -> Option<Stamp> {
    let u32_at = |i: usize| u32::from_be_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_be_bytes(h[i..i + 8].try_into().expect("8 bytes"));
    if &h[..16] != MAGIC || u32_at(16) != FORMAT || u32_at(20) != SEALED {
        return None;
    }
    Some(Stamp {
        id: FileId {
            dev: u64_at(32),
            ino: u64_at(40),
        },
        page_size: u32_at(24),
        page_count: u32_at(28),
        position: Position::from_bytes(h[48..68].try_into().expect("20 bytes")),
        checksum: u64_at(68),
        written: Written {
            ctime: (u64_at(76) as i64, u32_at(84)),
            backfilled: u32_at(88),
        },
    })
}

/// The header of the hash list of `db` in `dir`, if it is sealed; its entries are not
/// checked (a push's [`HashList::load`] does that before using any).
pub(super) fn sealed_stamp(dir: &Path, db: &Path) -> Option<Stamp> {
    let file = File::open(path(dir, db)?).ok()?;
    let mut h = [0u8; HEADER_BYTES];
    file.read_exact_at(&mut h, 0).ok()?;
    parse(&h)
}

/// A sealed hash list whose checksum holds, open for one scan.
pub(super) struct HashList {
    file: File,
    path: PathBuf,
    pub(super) stamp: Stamp,
}

impl HashList {
    /// The hash list of `db` in `dir`, if there is one, sealed, of this file and page
    /// size, and whole (its checksum holds).
    pub(super) fn load(dir: &Path, db: &Path, id: FileId, page_size: u32) -> Option<HashList> {
        let path = path(dir, db)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .ok()?;
        let mut h = [0u8; HEADER_BYTES];
        file.read_exact_at(&mut h, 0).ok()?;
        let stamp = parse(&h)?;
        if stamp.id != id || stamp.page_size != page_size {
            return None;
        }
        let len = file.metadata().ok()?.len();
        if len != HEADER_BYTES as u64 + u64::from(stamp.page_count) * ENTRY_BYTES {
            return None;
        }
        let mut list = HashList { file, path, stamp };
        let mut sum = xxhash_rust::xxh3::Xxh3::new();
        for h in list.entries().ok()? {
            sum.update(&h.ok()?);
        }
        (sum.digest() == stamp.checksum).then_some(list)
    }

    /// The entries, in page order.
    pub(super) fn entries(
        &mut self,
    ) -> std::io::Result<impl Iterator<Item = std::io::Result<Hash>> + '_> {
        use std::io::Seek;
        let mut f = &self.file;
        f.seek(std::io::SeekFrom::Start(HEADER_BYTES as u64))?;
        let mut r = BufReader::with_capacity(256 * 1024, f);
        Ok((0..self.stamp.page_count).map(move |_| {
            let mut h = [0u8; 32];
            r.read_exact(&mut h)?;
            Ok(h)
        }))
    }

    /// Rewrites the list in place to `stamp`: `changed` holds the new hashes of the
    /// pages that differ (in page order), everything else is as it was.
    pub(super) fn update(self, stamp: Stamp, changed: &[(u32, Hash)]) {
        let f = &self.file;
        let result = (|| -> std::io::Result<()> {
            if stamp == self.stamp {
                return Ok(());
            }
            f.write_all_at(&header(&self.stamp, UNSEALED), 0)?;
            let at = |pgno: u32| HEADER_BYTES as u64 + u64::from(pgno - 1) * ENTRY_BYTES;
            let mut run: Vec<u8> = Vec::new();
            let mut first = 0u32;
            for (pgno, hash) in changed {
                let next = first + (run.len() / 32) as u32;
                if run.is_empty() || *pgno != next || run.len() >= 1 << 20 {
                    if !run.is_empty() {
                        f.write_all_at(&run, at(first))?;
                    }
                    run.clear();
                    first = *pgno;
                }
                run.extend_from_slice(hash);
            }
            if !run.is_empty() {
                f.write_all_at(&run, at(first))?;
            }
            f.set_len(HEADER_BYTES as u64 + u64::from(stamp.page_count) * ENTRY_BYTES)?;
            f.write_all_at(&header(&stamp, SEALED), 0)
        })();
        if let Err(e) = result {
            tracing::debug!(error = %e, "could not update the WAL hash list; the next push scans");
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A new hash list, written during a full scan and sealed at its end.
pub(super) struct ListWriter {
    out: BufWriter<tempfile::NamedTempFile>,
    path: PathBuf,
    sum: xxhash_rust::xxh3::Xxh3,
    count: u32,
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
            out,
            path,
            sum: xxhash_rust::xxh3::Xxh3::new(),
            count: 0,
        })
    }

    pub(super) fn push(&mut self, hash: &Hash) -> std::io::Result<()> {
        self.sum.update(hash);
        self.count += 1;
        self.out.write_all(hash)
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
        if self.count != page_count {
            return;
        }
        let stamp = Stamp {
            id,
            page_size,
            page_count,
            position,
            checksum: self.sum.digest(),
            written,
        };
        let result = self
            .out
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|tmp| {
                tmp.as_file().write_all_at(&header(&stamp, SEALED), 0)?;
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
    fn a_list_is_refused_when_torn_unsealed_or_of_another_file() {
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
        let mut w = ListWriter::new(&cache, &db).expect("writer");
        for i in 0..10u8 {
            w.push(&[i; 32]).expect("push");
        }
        let written = Written {
            ctime: (1_700_000_000, 5),
            backfilled: 2,
        };
        w.finish(id, 4096, 10, pos, written);
        let mut list = HashList::load(&cache, &db, id, 4096).expect("sealed list");
        assert_eq!((list.stamp.position, list.stamp.written), (pos, written));
        let all: Vec<Hash> = list
            .entries()
            .expect("reads")
            .map(|h| h.expect("h"))
            .collect();
        assert_eq!(all[7], [7; 32]);
        assert!(HashList::load(&cache, &db, id, 8192).is_none(), "page size");
        let other = FileId {
            dev: id.dev,
            ino: id.ino + 1,
        };
        assert!(
            HashList::load(&cache, &db, other, 4096).is_none(),
            "replaced file"
        );
        // An update moves the position and changes the named entries only.
        let mut stamp = list.stamp;
        stamp.position.frame = 9;
        stamp.page_count = 11;
        let mut sum = xxhash_rust::xxh3::Xxh3::new();
        for i in 0..11u8 {
            sum.update(&[if i == 2 || i == 10 { 99 } else { i }; 32]);
        }
        stamp.checksum = sum.digest();
        list.update(stamp, &[(3, [99; 32]), (11, [99; 32])]);
        let mut list = HashList::load(&cache, &db, id, 4096).expect("updated list");
        let all: Vec<Hash> = list
            .entries()
            .expect("reads")
            .map(|h| h.expect("h"))
            .collect();
        assert_eq!((all[2], all[3], all[10]), ([99; 32], [3; 32], [99; 32]));
        // A flipped byte in an entry fails the checksum.
        let p = path(&cache, &db).expect("path");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .expect("opens");
        f.write_all_at(&[0xff], HEADER_BYTES as u64 + 40)
            .expect("writes");
        assert!(
            HashList::load(&cache, &db, id, 4096).is_none(),
            "torn entry"
        );
    }
}
