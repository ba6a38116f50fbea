//! SQLite page access: what a page is, how it is identified, and the two ends that read
//! and write whole databases page by page.
//!
//! - [`Snapshot`] reads a live database through one read transaction over
//!   `sqlite_dbpage`, so pages still in the WAL are seen, and never writes it.
//! - [`Writer`] changes a database in one `BEGIN IMMEDIATE` transaction through
//!   `sqlite_dbpage`: readers in other processes see the old database or the new one.
//!
//! Page identity is SHA-256 ([`page_hash`]) and a database's identity is its digest
//! ([`Digest`]): SHA-256 over page size, page count and the ordered page hashes. A few
//! bytes of page 1 say how the file is being used rather than what it holds: the two
//! legal journal-mode pairs hash alike, and the counters SQLite rewrites at every commit
//! are left out (an illegal journal-mode pair hashes unlike any legal page); the
//! lock-byte page of a database over 1 GiB is never used by SQLite and hashes as zeros.
//! `docs/engine.md` explains both.

pub(crate) mod handles;
mod hashcache;
mod header;
mod scan;
mod snapshot;
mod writer;

pub use header::{Header, JournalMode};
pub use snapshot::Snapshot;
pub use writer::Writer;

use sha2::{Digest as _, Sha256};

use crate::protocol::Hash;

/// The byte offset SQLite reserves for file locks: the page holding it is never used.
const PENDING_BYTE: u64 = 0x4000_0000;

/// The page that holds byte offset 2³⁰ (SQLite's pending byte) for a given page size. SQLite never stores
/// anything in it; only databases larger than 1 GiB reach it.
pub fn lock_byte_page(page_size: u32) -> u32 {
    (PENDING_BYTE / u64::from(page_size)) as u32 + 1
}

/// Where page 1 records its file format versions (write, read): (1, 1) for a rollback
/// journal, (2, 2) for WAL. They are the only values SQLite opens ("file is not a
/// database" otherwise).
const FORMAT_VERSIONS: std::ops::Range<usize> = 18..20;

/// Ranges of page 1 that SQLite rewrites by itself on every commit in rollback mode: the
/// file change counter (24–27), and the version-valid-for number with the SQLite version
/// of the last writer (92–99). A pull into a rollback replica is such a commit, so a
/// replica that took every byte of a version holds other values here a moment later;
/// hashing them would make its next, unchanged, push a new version. They cannot make a
/// database unreadable: SQLite reads them only to tell whether its cache and the
/// in-header page count (28–31) are current, and falls back to the file size when the
/// version-valid-for number does not match the change counter.
const PAGE1_COUNTERS: [std::ops::Range<usize>; 2] = [24..28, 92..100];

/// Appended to what is hashed when page 1's file format versions are not one of the two
/// legal pairs: such a page then never hashes like a legal one, whatever its bytes.
const ILLEGAL_FORMAT_MARK: &[u8] = b"sqlferry: illegal file format versions";

/// Whether page 1's file format versions (bytes 18–19) are one of the two legal pairs.
pub fn legal_format_versions(page1: &[u8]) -> bool {
    matches!(page1.get(FORMAT_VERSIONS), Some([1, 1]) | Some([2, 2]))
}

/// The SHA-256 identity of page `pgno` with content `data`.
///
/// Every byte counts, with these exceptions on page 1: bytes 24–27 and 92–99 (the
/// counters SQLite rewrites at every commit in rollback mode) are hashed as zeros, and bytes 18–19 are hashed as zeros when
/// they are one of the two legal pairs, (1, 1) and (2, 2): a WAL origin and a rollback
/// replica hold the same content. Any other pair is hashed as it is, with a mark
/// appended, so a page 1 that SQLite would refuse never has the hash of one it opens.
/// Zero is the canonical value because earlier versions zeroed these bytes whatever they
/// held: the hashes of every legal page 1 stored before are unchanged. The lock-byte
/// page always hashes as a page of zeros.
pub fn page_hash(pgno: u32, data: &[u8]) -> Hash {
    let page_size = data.len() as u32;
    if pgno == 1 && data.len() >= 100 {
        let legal = legal_format_versions(data);
        let mut h = Sha256::new();
        h.update(&data[..FORMAT_VERSIONS.start]);
        if legal {
            h.update([0u8; 2]);
        } else {
            h.update(&data[FORMAT_VERSIONS]);
        }
        let mut at = FORMAT_VERSIONS.end;
        for r in PAGE1_COUNTERS {
            h.update(&data[at..r.start]);
            h.update(&[0u8; 8][..r.len()]);
            at = r.end;
        }
        h.update(&data[at..]);
        if !legal {
            h.update(ILLEGAL_FORMAT_MARK);
        }
        h.finalize().into()
    } else if pgno == lock_byte_page(page_size) {
        zero_page_hash(page_size)
    } else {
        Sha256::digest(data).into()
    }
}

/// The hash of a page of zeros: the identity of the lock-byte page.
pub fn zero_page_hash(page_size: u32) -> Hash {
    let mut h = Sha256::new();
    let zeros = [0u8; 4096];
    let mut left = page_size as usize;
    while left > 0 {
        let n = left.min(zeros.len());
        h.update(&zeros[..n]);
        left -= n;
    }
    h.finalize().into()
}

/// Builds a database digest from its page hashes, streaming: SHA-256 over the page size
/// (u32 big-endian), the page count (u32 big-endian) and each page hash in page order.
pub struct Digest {
    hasher: Sha256,
    expected: u32,
    seen: u32,
}

impl Digest {
    /// Starts the digest of a database of `page_count` pages of `page_size` bytes.
    pub fn new(page_size: u32, page_count: u32) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(page_size.to_be_bytes());
        hasher.update(page_count.to_be_bytes());
        Digest {
            hasher,
            expected: page_count,
            seen: 0,
        }
    }

    /// Adds the next page's hash.
    pub fn push(&mut self, page_hash: &Hash) {
        self.hasher.update(page_hash);
        self.seen += 1;
    }

    /// The digest, or `None` when fewer or more hashes were pushed than pages declared.
    pub fn finish(self) -> Option<Hash> {
        (self.seen == self.expected).then(|| self.hasher.finalize().into())
    }
}

/// Lets SQLite roll back a hot journal that a crashed or killed writer left beside the
/// database at `path`, exactly as the next connection to open it would. Until then the
/// file's header may be half-written (a new database killed mid-creation has a zeroed
/// page 1), and a read-only connection may not roll back. Best effort: if recovery fails,
/// the caller's own open reports the problem.
pub fn recover_hot_journal(path: &std::path::Path) {
    let mut journal = path.as_os_str().to_owned();
    journal.push("-journal");
    let hot = std::fs::metadata(&journal).is_ok_and(|m| m.len() > 0);
    if !hot {
        return;
    }
    tracing::info!(path = %path.display(), "letting SQLite roll back the journal a crashed writer left");
    if let Ok(conn) =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
    {
        let _ = conn.busy_timeout(std::time::Duration::from_secs(10));
        // Taking the shared lock is what makes SQLite check for, and play back, a hot
        // journal; a live writer's journal is not hot and is left alone.
        let _ = conn.query_row("SELECT 1 FROM sqlite_schema LIMIT 1", [], |_| Ok(()));
    }
}

/// Lower-case hex of a hash, as printed and stored.
pub fn hex(hash: &Hash) -> String {
    use std::fmt::Write;
    hash.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_byte_page_is_where_sqlite_puts_it() {
        assert_eq!(lock_byte_page(4096), 262_145);
        assert_eq!(lock_byte_page(65536), 16_385);
        assert_eq!(lock_byte_page(512), 2_097_153);
    }

    #[test]
    fn page1_ignores_only_counters_and_the_journal_mode() {
        let page = |w: u8, r: u8| {
            let mut a = vec![7u8; 4096];
            a[18] = w;
            a[19] = r;
            a
        };
        let rollback = page_hash(1, &page(1, 1));
        // A WAL origin and a rollback replica hold the same content.
        assert_eq!(page_hash(1, &page(2, 2)), rollback);
        // The counters SQLite rewrites at every commit do not count.
        let mut a = page(1, 1);
        for i in [24, 25, 27, 92, 95, 99] {
            a[i] ^= 0xff;
            assert_eq!(page_hash(1, &a), rollback, "byte {i} should not count");
        }
        // Any other journal-mode pair is another page, even the zeros hashed for legal
        // pairs, and no two illegal pairs look alike.
        let mut illegal = std::collections::HashSet::new();
        for (w, r) in [(0, 0), (1, 2), (2, 1), (3, 3), (0, 1), (1, 0xff)] {
            let h = page_hash(1, &page(w, r));
            assert_ne!(h, rollback, "({w}, {r}) must not hash like a legal pair");
            assert!(illegal.insert(h), "({w}, {r}) hashes like another pair");
        }
        for i in [0, 16, 20, 23, 28, 91, 100, 4095] {
            let mut b = page(1, 1);
            b[i] ^= 0xff;
            assert_ne!(page_hash(1, &b), rollback, "byte {i} should count");
        }
        // Other pages hash every byte.
        let mut c = vec![7u8; 4096];
        let before = page_hash(2, &c);
        c[18] ^= 1;
        assert_ne!(page_hash(2, &c), before);
    }

    #[test]
    fn legal_page1_hashes_as_before() {
        // The hash of earlier versions, which zeroed bytes 18-19 whatever they held:
        // versions stored before still verify.
        let mut a = vec![7u8; 4096];
        a[18] = 2;
        a[19] = 2;
        let mut old = a.clone();
        for r in [18..20, 24..28, 92..100] {
            old[r].fill(0);
        }
        assert_eq!(page_hash(1, &a), <[u8; 32]>::from(Sha256::digest(&old)));
    }

    #[test]
    fn lock_byte_page_hashes_as_zeros_whatever_it_holds() {
        let junk = vec![0xabu8; 65536];
        assert_eq!(page_hash(16_385, &junk), zero_page_hash(65536));
        assert_eq!(zero_page_hash(65536), page_hash(2, &vec![0u8; 65536]));
    }

    #[test]
    fn digest_counts_pages() {
        let h = [1u8; 32];
        let mut d = Digest::new(4096, 2);
        d.push(&h);
        assert!(Digest::new(4096, 2).finish().is_none());
        d.push(&h);
        let one = d.finish().expect("two pages pushed");
        let mut e = Digest::new(8192, 2);
        e.push(&h);
        e.push(&h);
        assert_ne!(Some(one), e.finish(), "page size is part of the digest");
        assert_eq!(hex(&[0xab; 32]).len(), 64);
    }
}
