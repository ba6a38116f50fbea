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
//! bytes of page 1 say how the file is being used rather than what it holds (journal
//! mode, change counter, the version of the last writer) and are left out of its hash;
//! the lock-byte page of a database over 1 GiB is never used by SQLite and hashes as
//! zeros. `docs/engine.md` explains both.

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

/// Ranges of page 1 that describe how the file is used, not what it holds: the file
/// format write/read versions (WAL or rollback journal), the file change counter, and
/// the version-valid-for number with the SQLite version of the last writer. SQLite
/// rewrites them on commit in rollback mode, so they are hashed as zeros.
const PAGE1_VOLATILE: [std::ops::Range<usize>; 3] = [18..20, 24..28, 92..100];

/// The SHA-256 identity of page `pgno` with content `data`.
///
/// Page 1 is hashed with bytes 18–19, 24–27 and 92–99 zeroed; the lock-byte page always hashes as
/// a page of zeros.
pub fn page_hash(pgno: u32, data: &[u8]) -> Hash {
    let page_size = data.len() as u32;
    if pgno == 1 && data.len() >= 100 {
        let mut h = Sha256::new();
        let mut at = 0;
        for r in PAGE1_VOLATILE {
            h.update(&data[at..r.start]);
            h.update(&[0u8; 8][..r.len()]);
            at = r.end;
        }
        h.update(&data[at..]);
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
    fn page1_ignores_only_volatile_bytes() {
        let mut a = vec![7u8; 4096];
        let base = page_hash(1, &a);
        for i in [18, 19, 24, 27, 92, 99] {
            a[i] ^= 0xff;
            assert_eq!(page_hash(1, &a), base, "byte {i} should not count");
        }
        for i in [0, 16, 20, 23, 28, 91, 100, 4095] {
            let mut b = vec![7u8; 4096];
            b[i] ^= 0xff;
            assert_ne!(page_hash(1, &b), base, "byte {i} should count");
        }
        // Other pages hash every byte.
        let mut c = vec![7u8; 4096];
        let before = page_hash(2, &c);
        c[18] ^= 1;
        assert_ne!(page_hash(2, &c), before);
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
