//! A cache of page hashes per database file, so an unchanged page is not hashed again.
//!
//! SHA-256 is the identity of a page, and computing it for every page of a large,
//! mostly unchanged database costs more than reading it. The cache keeps, for each page
//! position, a 128-bit XXH3 fingerprint of the bytes and their SHA-256. When a page's
//! fingerprint at the same position is unchanged, its SHA-256 is taken from the cache;
//! otherwise it is computed. The fingerprint is a change detector, not an identity:
//! what travels, what is compared and what the digest covers is always SHA-256.
//!
//! The cache is advisory: it is read and written sequentially (memory stays flat), a
//! missing, stale or damaged cache only costs hashing, and a failure to write one never
//! fails a sync. Caches live in `$XDG_CACHE_HOME/sqlferry/hashes/` (or a directory the
//! caller names), one file per database path, at most 256 of them; deleting them is
//! always safe.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::digest::{Hash, page_hash};

const MAGIC: &[u8; 16] = b"sqlferry-hashes\0";
const FORMAT: u32 = 1;
const HEADER_BYTES: usize = 32;
const ENTRY_BYTES: usize = 16 + 32;

/// The hash cache of one database file, being read and rewritten during one scan.
pub(super) struct HashCache {
    old: Option<BufReader<File>>,
    old_count: u32,
    new: Option<(BufWriter<tempfile::NamedTempFile>, PathBuf)>,
    /// Pages whose hash came from the cache, for logs and tests.
    pub(super) hits: u32,
}

/// The most cache files kept in one directory; the least recently written go first.
const MAX_CACHE_FILES: usize = 256;

/// Where page-hash caches live by default: `$XDG_CACHE_HOME/sqlferry/hashes`.
pub fn default_dir() -> Option<PathBuf> {
    Some(crate::config::cache_dir()?.join("hashes"))
}

/// Where the cache of the database at `db` lives, in `dir`.
pub(super) fn cache_path(dir: &Path, db: &Path) -> Option<PathBuf> {
    // A file not created yet (a new replica written beside its path) is named by its
    // directory's canonical path: what canonicalizing it will give once it exists.
    let abs = std::fs::canonicalize(db).ok().or_else(|| {
        let dir = match db.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        Some(std::fs::canonicalize(dir).ok()?.join(db.file_name()?))
    })?;
    let key = crate::digest::name_key(&[abs.as_os_str().as_encoded_bytes()]);
    Some(dir.join(&key[..32]))
}

/// Keeps at most [`MAX_CACHE_FILES`] caches in `dir`, so caches of databases long gone
/// do not pile up.
fn prune(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let meta = e.metadata().ok()?;
            let modified = meta.modified().ok()?;
            (meta.is_file() && e.file_name().len() == 32).then(|| (modified, e.path()))
        })
        .collect();
    if files.len() <= MAX_CACHE_FILES {
        return;
    }
    files.sort();
    for (_, path) in &files[..files.len() - MAX_CACHE_FILES] {
        let _ = std::fs::remove_file(path);
        // The WAL hash list of the same database (`fastcache`) goes with it.
        let mut list = path.clone().into_os_string();
        list.push(".wal");
        let _ = std::fs::remove_file(list);
    }
}

impl HashCache {
    /// Opens the cache in `dir` for `db` holding `page_count` pages of `page_size`
    /// bytes. Never fails: with no directory, or an unusable one, it simply hashes
    /// everything.
    pub(super) fn open(
        dir: Option<&Path>,
        db: &Path,
        page_size: u32,
        page_count: u32,
    ) -> HashCache {
        let mut cache = HashCache {
            old: None,
            old_count: 0,
            new: None,
            hits: 0,
        };
        let Some(path) = dir.and_then(|dir| cache_path(dir, db)) else {
            return cache;
        };
        if let Ok(file) = File::open(&path) {
            let mut r = BufReader::with_capacity(64 * 1024, file);
            let mut h = [0u8; HEADER_BYTES];
            if r.read_exact(&mut h).is_ok()
                && &h[..16] == MAGIC
                && h[16..20] == FORMAT.to_be_bytes()
                && h[20..24] == page_size.to_be_bytes()
            {
                cache.old_count = u32::from_be_bytes([h[24], h[25], h[26], h[27]]);
                cache.old = Some(r);
            }
        }
        let dir = path.parent().expect("the cache path has a directory");
        let new = std::fs::create_dir_all(dir)
            .and_then(|()| tempfile::NamedTempFile::new_in(dir))
            .and_then(|tmp| {
                let mut w = BufWriter::with_capacity(64 * 1024, tmp);
                let mut h = [0u8; HEADER_BYTES];
                h[..16].copy_from_slice(MAGIC);
                h[16..20].copy_from_slice(&FORMAT.to_be_bytes());
                h[20..24].copy_from_slice(&page_size.to_be_bytes());
                h[24..28].copy_from_slice(&page_count.to_be_bytes());
                w.write_all(&h)?;
                Ok(w)
            });
        match new {
            Ok(w) => cache.new = Some((w, path)),
            Err(e) => {
                tracing::debug!(error = %e, "page-hash cache not writable; hashing every page")
            }
        }
        cache
    }

    /// The hash of page `pgno` with content `data`. Pages must come in order from 1.
    pub(super) fn hash(&mut self, pgno: u32, data: &[u8]) -> Hash {
        let fingerprint = xxhash_rust::xxh3::xxh3_128(data).to_be_bytes();
        let mut cached = None;
        if pgno <= self.old_count
            && let Some(r) = &mut self.old
        {
            let mut e = [0u8; ENTRY_BYTES];
            match r.read_exact(&mut e) {
                Ok(()) if e[..16] == fingerprint => {
                    let mut h = [0u8; 32];
                    h.copy_from_slice(&e[16..]);
                    cached = Some(h);
                }
                Ok(()) => {}
                Err(_) => self.old = None,
            }
        }
        let hash = match cached {
            Some(h) => {
                self.hits += 1;
                h
            }
            None => page_hash(pgno, data),
        };
        if let Some((w, _)) = &mut self.new
            && w.write_all(&fingerprint)
                .and_then(|()| w.write_all(&hash))
                .is_err()
        {
            self.new = None;
        }
        hash
    }

    /// Replaces the stored cache with the one written during this scan. Call only after
    /// every page was hashed.
    pub(super) fn finish(self) {
        if let Some((w, path)) = self.new {
            let result = w
                .into_inner()
                .map_err(|e| e.into_error())
                .and_then(|tmp| tmp.persist(&path).map(drop).map_err(|e| e.error));
            match result {
                Ok(()) => prune(path.parent().expect("the cache path has a directory")),
                Err(e) => tracing::debug!(error = %e, "could not store the page-hash cache"),
            }
        }
    }
}

/// The cache of a database being written from empty, page 2 first and page 1 last (as
/// [`super::Writer`] writes a full copy), so the next sync of it hashes nothing it
/// wrote. Entries stream to a temporary file (memory stays flat); a page out of order
/// abandons the cache, which only costs the next sync its hashing.
pub(super) struct CacheBuilder {
    file: Option<(BufWriter<tempfile::NamedTempFile>, PathBuf)>,
    page_size: u32,
    /// The next page expected after page 1 (pages arrive 2, 3, 4…).
    next: u32,
    first: Option<[u8; ENTRY_BYTES]>,
}

impl CacheBuilder {
    /// Starts the cache of `db` (which must exist) in `dir`.
    pub(super) fn new(dir: Option<&Path>, db: &Path, page_size: u32) -> CacheBuilder {
        let file = dir.and_then(|dir| cache_path(dir, db)).and_then(|path| {
            let dir = path.parent()?;
            std::fs::create_dir_all(dir).ok()?;
            let tmp = tempfile::NamedTempFile::new_in(dir).ok()?;
            let mut w = BufWriter::with_capacity(64 * 1024, tmp);
            // Header and page 1's entry are written at the end, when they are known.
            w.write_all(&[0u8; HEADER_BYTES + ENTRY_BYTES]).ok()?;
            Some((w, path))
        });
        CacheBuilder {
            file,
            page_size,
            next: 2,
            first: None,
        }
    }

    fn entry(data: &[u8], hash: &Hash) -> [u8; ENTRY_BYTES] {
        let mut e = [0u8; ENTRY_BYTES];
        e[..16].copy_from_slice(&xxhash_rust::xxh3::xxh3_128(data).to_be_bytes());
        e[16..].copy_from_slice(hash);
        e
    }

    /// Page `pgno` was written with `data`, whose [`page_hash`] is `hash` (the engine
    /// computed it already: no page is hashed twice).
    pub(super) fn page(&mut self, pgno: u32, data: &[u8], hash: &Hash) {
        if self.file.is_none() {
            return;
        }
        if pgno == 1 {
            self.first = Some(Self::entry(data, hash));
            return;
        }
        if pgno != self.next {
            self.file = None;
            return;
        }
        self.next += 1;
        let e = Self::entry(data, hash);
        if let Some((w, _)) = &mut self.file
            && w.write_all(&e).is_err()
        {
            self.file = None;
        }
    }

    /// The sync committed `page_count` pages: the cache is stored if it holds them all.
    pub(super) fn finish(self, page_count: u32) {
        use std::io::Seek;
        let (Some((w, path)), Some(first)) = (self.file, self.first) else {
            return;
        };
        if self.next != page_count + 1 {
            return;
        }
        let mut h = [0u8; HEADER_BYTES];
        h[..16].copy_from_slice(MAGIC);
        h[16..20].copy_from_slice(&FORMAT.to_be_bytes());
        h[20..24].copy_from_slice(&self.page_size.to_be_bytes());
        h[24..28].copy_from_slice(&page_count.to_be_bytes());
        let result = w
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|mut tmp| {
                tmp.rewind()?;
                tmp.write_all(&h)?;
                tmp.write_all(&first)?;
                tmp.persist(&path).map(drop).map_err(|e| e.error)
            });
        match result {
            Ok(()) => prune(path.parent().expect("the cache path has a directory")),
            Err(e) => tracing::debug!(error = %e, "could not store the page-hash cache"),
        }
    }
}
