//! Hashes and digests: what identifies a page, a hash-tree node and a whole database,
//! how they are printed, and where long runs of them are kept. A leaf: it imports no
//! other module of the crate, so every module (the page reader, the engine, the store,
//! the protocol, the server, the client) can use the one implementation of each.
//!
//! - [`page_hash`]: SHA-256 over every byte of a page, except the few bytes of page 1
//!   that say how the file is used rather than what it holds (`docs/engine.md`).
//! - [`Digest`]: a database's identity, SHA-256 over page size, page count and the
//!   ordered page hashes (*digest 1*); [`ChunkedDigest`]: the same identity with
//!   structure (*the chunked digest*, `sqlferry-digest-2`), SHA-256 over page size, page
//!   count and the hashes of chunks of [`CHUNK_PAGES`] page hashes, so that a change of
//!   a few pages rehashes a few chunks, not every page hash; [`Digester`] builds either
//!   from page hashes; [`digest_text`] prints either in its form; [`node_hash`]: a
//!   hash-tree node over its children.
//! - [`hex()`]: lower-case hex, as hashes are printed and stored.
//! - [`name_key`]: the short file name derived from a path (caches, history records,
//!   socket directories), so one spelling rule holds everywhere.
//! - [`HashSpill`]: page hashes in an unlinked temporary file, 32 bytes each, so that
//!   no side holds a database's hashes in memory (DESIGN.md invariant 3).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;

use sha2::{Digest as _, Sha256};

/// The length of a SHA-256 hash, and so of every page hash, node hash and digest.
pub const HASH_BYTES: usize = 32;

/// A SHA-256 value: a page hash, a tree node hash or a database digest.
pub type Hash = [u8; HASH_BYTES];

/// The byte offset SQLite reserves for file locks: the page holding it is never used.
const PENDING_BYTE: u64 = 0x4000_0000;

/// The page that holds byte offset 2³⁰ (SQLite's pending byte) for a given page size.
/// SQLite never stores anything in it; only databases larger than 1 GiB reach it.
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
/// counters SQLite rewrites at every commit in rollback mode) are hashed as zeros, and
/// bytes 18–19 are hashed as zeros when they are one of the two legal pairs, (1, 1) and
/// (2, 2): a WAL origin and a rollback replica hold the same content. Any other pair is
/// hashed as it is, with a mark appended, so a page 1 that SQLite would refuse never has
/// the hash of one it opens. Zero is the canonical value because earlier versions zeroed
/// these bytes whatever they held: the hashes of every legal page 1 stored before are
/// unchanged. The lock-byte page always hashes as a page of zeros.
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
        sha256(data)
    }
}

/// Plain SHA-256 of `data`: a stored page's content key, a manifest chunk's key, a key
/// secret's stored form.
pub fn sha256(data: &[u8]) -> Hash {
    Sha256::digest(data).into()
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

/// The hash of a hash-tree node: SHA-256 over its children's hashes, in order.
pub fn node_hash(children: &[Hash]) -> Hash {
    let mut h = Sha256::new();
    for c in children {
        h.update(c);
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

/// Page hashes per chunk of the chunked digest, and per chunk of a store's manifest: the
/// two are the same chunks, so a stored version's manifest keys are its chunk hashes.
pub const CHUNK_PAGES: u32 = 1024;

/// The domain tag the chunked digest starts with: no digest 1 (which starts with a
/// page size) is ever computed over the same bytes.
const CHUNKED_TAG: &[u8] = b"sqlferry-digest-2";

/// The prefix of a chunked digest in text (`c:` + 64 hex digits); a digest 1 is 64 hex
/// digits alone, as every record written before the chunked form.
pub const CHUNKED_PREFIX: &str = "c:";

/// How many chunks a database of `page_count` pages has (the last one may be short).
pub fn chunk_count(page_count: u32) -> u32 {
    page_count.div_ceil(CHUNK_PAGES)
}

/// The pages of chunk `idx` (0-based) of a database of `page_count` pages, as the
/// 1-based range `first..=last`; empty (`first > last`) past the end.
pub fn chunk_pages(idx: u32, page_count: u32) -> std::ops::RangeInclusive<u32> {
    let first = idx.saturating_mul(CHUNK_PAGES).saturating_add(1);
    let last = ((u64::from(idx) + 1) * u64::from(CHUNK_PAGES)).min(u64::from(page_count)) as u32;
    first..=last
}

/// Whether any of `pages` (1-based page numbers) has its bit set in `bits` (bit
/// `pgno - 1`), a word at a time: a push asks it of every chunk of the database, so
/// its cost is the file's size over 64, not the file's size (a 10 GiB database has
/// 2.6 million pages).
pub fn any_page_set(bits: &[u64], pages: std::ops::RangeInclusive<u32>) -> bool {
    if pages.is_empty() {
        return false;
    }
    let (first, last) = ((*pages.start() - 1) as usize, (*pages.end() - 1) as usize);
    let (first_word, last_word) = (first / 64, last / 64);
    (first_word..=last_word).any(|w| {
        let mut word = bits[w];
        if w == first_word {
            word &= !0u64 << (first % 64);
        }
        if w == last_word {
            word &= !0u64 >> (63 - last % 64);
        }
        word != 0
    })
}

/// The 1-based page numbers whose bit is set in `bits` (bit `pgno - 1`) among the
/// first `page_count`, in order, skipping empty words whole.
pub fn pages_set(bits: &[u64], page_count: u32) -> impl Iterator<Item = u32> + '_ {
    bits.iter()
        .enumerate()
        .flat_map(move |(w, &word)| {
            let mut rest = word;
            std::iter::from_fn(move || {
                if rest == 0 {
                    return None;
                }
                let bit = rest.trailing_zeros();
                rest &= rest - 1;
                Some(w as u64 * 64 + u64::from(bit) + 1)
            })
        })
        .take_while(move |&p| p <= u64::from(page_count))
        .map(|p| p as u32)
}

/// Which of the two forms a digest is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestForm {
    /// Digest 1: SHA-256 over page size, page count and every page hash.
    One,
    /// The chunked digest: SHA-256 over a tag, page size, page count and every chunk
    /// hash.
    Chunked,
}

/// A digest as printed and recorded: 64 hex digits for digest 1, `c:` and 64 hex
/// digits for the chunked form. Two digests compare only in the same form.
pub fn digest_text(form: DigestForm, digest: &Hash) -> String {
    match form {
        DigestForm::One => hex(digest),
        DigestForm::Chunked => format!("{CHUNKED_PREFIX}{}", hex(digest)),
    }
}

/// The chunked digest, streaming over chunk hashes: SHA-256 over `sqlferry-digest-2`,
/// the page size (u32 big-endian), the page count (u32 big-endian) and each chunk hash
/// in order. A chunk hash is the SHA-256 of the chunk's page hashes, concatenated
/// ([`sha256`] of them; a store's manifest keys its chunks so).
pub struct ChunkedDigest {
    hasher: Sha256,
    expected: u32,
    seen: u32,
}

impl ChunkedDigest {
    /// Starts the chunked digest of a database of `page_count` pages of `page_size`
    /// bytes.
    pub fn new(page_size: u32, page_count: u32) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(CHUNKED_TAG);
        hasher.update(page_size.to_be_bytes());
        hasher.update(page_count.to_be_bytes());
        ChunkedDigest {
            hasher,
            expected: chunk_count(page_count),
            seen: 0,
        }
    }

    /// Adds the next chunk's hash.
    pub fn push_chunk(&mut self, chunk_hash: &Hash) {
        self.hasher.update(chunk_hash);
        self.seen += 1;
    }

    /// The digest, or `None` when fewer or more chunk hashes were pushed than the page
    /// count makes.
    pub fn finish(self) -> Option<Hash> {
        (self.seen == self.expected).then(|| self.hasher.finalize().into())
    }
}

/// Builds a database digest in either form from its page hashes, in page order.
pub struct Digester(Building);

enum Building {
    One(Digest),
    Chunked {
        /// The digest over the chunk hashes.
        chunks: ChunkedDigest,
        /// The SHA-256 of the current chunk's page hashes so far.
        chunk: Sha256,
        /// Page hashes in the current chunk.
        in_chunk: u32,
        /// Page hashes pushed.
        seen: u32,
        /// Pages declared.
        expected: u32,
    },
}

impl Digester {
    /// Starts the digest of a database of `page_count` pages of `page_size` bytes, in
    /// `form`.
    pub fn new(form: DigestForm, page_size: u32, page_count: u32) -> Self {
        Digester(match form {
            DigestForm::One => Building::One(Digest::new(page_size, page_count)),
            DigestForm::Chunked => Building::Chunked {
                chunks: ChunkedDigest::new(page_size, page_count),
                chunk: Sha256::new(),
                in_chunk: 0,
                seen: 0,
                expected: page_count,
            },
        })
    }

    /// Adds the next page's hash.
    pub fn push(&mut self, page_hash: &Hash) {
        match &mut self.0 {
            Building::One(d) => d.push(page_hash),
            Building::Chunked {
                chunks,
                chunk,
                in_chunk,
                seen,
                ..
            } => {
                chunk.update(page_hash);
                *in_chunk += 1;
                *seen += 1;
                if *in_chunk == CHUNK_PAGES {
                    let full = std::mem::take(chunk);
                    chunks.push_chunk(&full.finalize().into());
                    *in_chunk = 0;
                }
            }
        }
    }

    /// The digest, or `None` when fewer or more hashes were pushed than pages declared.
    pub fn finish(self) -> Option<Hash> {
        match self.0 {
            Building::One(d) => d.finish(),
            Building::Chunked {
                mut chunks,
                chunk,
                in_chunk,
                seen,
                expected,
            } => {
                if seen != expected {
                    return None;
                }
                if in_chunk > 0 {
                    chunks.push_chunk(&chunk.finalize().into());
                }
                chunks.finish()
            }
        }
    }
}

/// Builds both forms of a database's digest at once from its page hashes, in page order:
/// what a local file's digest is compared with a recorded one in whichever form that
/// one is ([`Digests::matches`]).
pub struct BothDigester {
    one: Digest,
    chunked: Digester,
}

impl BothDigester {
    /// Starts both digests of a database of `page_count` pages of `page_size` bytes.
    pub fn new(page_size: u32, page_count: u32) -> Self {
        BothDigester {
            one: Digest::new(page_size, page_count),
            chunked: Digester::new(DigestForm::Chunked, page_size, page_count),
        }
    }

    /// Adds the next page's hash.
    pub fn push(&mut self, page_hash: &Hash) {
        self.one.push(page_hash);
        self.chunked.push(page_hash);
    }

    /// Both digests, or `None` when fewer or more hashes were pushed than pages declared.
    pub fn finish(self) -> Option<Digests> {
        Some(Digests {
            one: self.one.finish()?,
            chunked: self.chunked.finish()?,
        })
    }
}

/// One database's digest in both forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digests {
    /// Digest 1.
    pub one: Hash,
    /// The chunked digest.
    pub chunked: Hash,
}

impl Digests {
    /// Whether `recorded` (text in either form, [`digest_text`]) is this database's
    /// digest, compared in its own form.
    pub fn matches(&self, recorded: &str) -> bool {
        match recorded.starts_with(CHUNKED_PREFIX) {
            true => recorded == digest_text(DigestForm::Chunked, &self.chunked),
            false => recorded == hex(&self.one),
        }
    }
}

/// The length of a file of page hashes in chunks ([`ChunkedHashes`]) whose owner's header
/// takes `offset` bytes: the entries (32 bytes a page), then the table (32 bytes a chunk).
pub fn chunked_len(offset: u64, page_count: u32) -> u64 {
    offset + (u64::from(page_count) + u64::from(chunk_count(page_count))) * HASH_BYTES as u64
}

/// The checksum binding a chunked file's header to its table: XXH3-64 over `seed` (the
/// owner's header, its checksum field zeroed) and the chunk hashes. A header of one
/// update with the table of another, or a torn table, fails it.
pub fn table_checksum(seed: &[u8], table: &[Hash]) -> u64 {
    let mut sum = xxhash_rust::xxh3::Xxh3::new();
    sum.update(seed);
    for h in table {
        sum.update(h);
    }
    sum.digest()
}

/// Page hashes kept in a file by chunks, so that a reader trusts a few chunks without
/// reading the others, and an update rewrites only the chunks that changed: the hash
/// list of a WAL database (`page/fastcache.rs`) and a client's kept manifest
/// (`history.rs`).
///
/// From `offset` (the owner's header comes first): the entries (each page's hash, in
/// page order), then the table (each chunk's hash, [`CHUNK_PAGES`] entries a chunk, as the
/// chunked digest hashes them). The table lies after the entries, so that an update that
/// changes the page count moves only the table, never an entry. The owner's header
/// holds the page count and a [`table_checksum`] over itself and the table, checked when
/// the file is opened; each chunk's entries are checked against the chunk's hash when
/// they are read ([`ChunkedHashes::read_chunk`]). A torn write, a power cut that
/// reordered writes, or two writers interleaved can therefore leave a file that is
/// refused (a bad table) or chunks that are refused (entries that do not make their
/// hash), never a hash that is trusted and wrong.
#[derive(Debug)]
pub struct ChunkedHashes {
    file: File,
    offset: u64,
    page_count: u32,
    table: Vec<Hash>,
}

impl ChunkedHashes {
    /// Opens the chunked hashes of `page_count` pages at `offset` of `file`: `None` unless
    /// the file is exactly as long as they make ([`chunked_len`]) and the table passes
    /// `checksum` with `seed`. Reads the table only.
    pub fn open(
        file: File,
        offset: u64,
        page_count: u32,
        seed: &[u8],
        checksum: u64,
    ) -> Option<ChunkedHashes> {
        if file.metadata().ok()?.len() != chunked_len(offset, page_count) {
            return None;
        }
        let chunks = chunk_count(page_count) as usize;
        let mut buf = vec![0u8; chunks * HASH_BYTES];
        let at = offset + u64::from(page_count) * HASH_BYTES as u64;
        file.read_exact_at(&mut buf, at).ok()?;
        let table: Vec<Hash> = buf
            .chunks_exact(HASH_BYTES)
            .map(|c| c.try_into().expect("32 bytes"))
            .collect();
        (table_checksum(seed, &table) == checksum).then_some(ChunkedHashes {
            file,
            offset,
            page_count,
            table,
        })
    }

    /// The chunk hashes, in order.
    pub fn table(&self) -> &[Hash] {
        &self.table
    }

    /// Pages the hashes are of.
    pub fn page_count(&self) -> u32 {
        self.page_count
    }

    /// Removes the file at `path` if it is still the file this opened: another
    /// process may have put a new, whole file there since, which must stay.
    pub fn remove_if_at(&self, path: &std::path::Path) {
        use std::os::unix::fs::MetadataExt;
        let (Ok(open), Ok(there)) = (self.file.metadata(), std::fs::metadata(path)) else {
            return;
        };
        if (open.dev(), open.ino()) == (there.dev(), there.ino()) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// The open file (its owner writes its header through it).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Appends the page hashes of chunk `idx` to `out` when they make the chunk's hash
    /// in the table: `Ok(false)`, `out` as it was, when they do not (a torn or damaged
    /// chunk) or there is no such chunk.
    pub fn read_chunk(&self, idx: u32, out: &mut Vec<u8>) -> std::io::Result<bool> {
        let Some(hash) = self.table.get(idx as usize) else {
            return Ok(false);
        };
        let pages = chunk_pages(idx, self.page_count);
        let len = (pages.end() - pages.start() + 1) as usize * HASH_BYTES;
        let from = out.len();
        out.resize(from + len, 0);
        let at = self.offset + u64::from(pages.start() - 1) * HASH_BYTES as u64;
        if let Err(e) = self.file.read_exact_at(&mut out[from..], at) {
            out.truncate(from);
            // A file cut short (a crash while it grew, a full disk) lost the chunk: it
            // is read again from the pages, like a torn one.
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                return Ok(false);
            }
            return Err(e);
        }
        if sha256(&out[from..]) != *hash {
            out.truncate(from);
            return Ok(false);
        }
        Ok(true)
    }

    /// Every page hash in order, each chunk checked before any of its hashes is given
    /// out: a chunk that fails is an error ([`std::io::ErrorKind::InvalidData`]).
    pub fn hashes(&self) -> impl Iterator<Item = std::io::Result<Hash>> + '_ {
        let mut buf = Vec::new();
        let mut at = 0usize;
        (1..=self.page_count).map(move |pgno| {
            if (pgno - 1).is_multiple_of(CHUNK_PAGES) {
                buf.clear();
                at = 0;
                if !self.read_chunk((pgno - 1) / CHUNK_PAGES, &mut buf)? {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("chunk {} does not match its hash", (pgno - 1) / CHUNK_PAGES),
                    ));
                }
            }
            let h: Hash = buf[at..at + HASH_BYTES].try_into().expect("32 bytes");
            at += HASH_BYTES;
            Ok(h)
        })
    }

    /// Writes the entries of chunk `idx` (whole hashes back to back, starting at the
    /// chunk's first page), in place. The table is not touched: until
    /// [`ChunkedHashes::finish_update`] the chunk fails its check, unless its entries are
    /// what they were.
    pub fn write_chunk(&self, idx: u32, entries: &[u8]) -> std::io::Result<()> {
        let at = self.offset + u64::from(idx) * u64::from(CHUNK_PAGES) * HASH_BYTES as u64;
        self.file.write_all_at(entries, at)
    }

    /// Ends an update: the table `table` of `page_count` pages goes after their entries
    /// and the file is cut there. The caller has written every chunk whose entries
    /// changed ([`ChunkedHashes::write_chunk`]), and writes its header (with the
    /// [`table_checksum`] of `table`) after this.
    pub fn finish_update(&mut self, page_count: u32, table: Vec<Hash>) -> std::io::Result<()> {
        debug_assert_eq!(table.len(), chunk_count(page_count) as usize);
        let at = self.offset + u64::from(page_count) * HASH_BYTES as u64;
        self.file.write_all_at(&table.concat(), at)?;
        self.file.set_len(chunked_len(self.offset, page_count))?;
        self.page_count = page_count;
        self.table = table;
        Ok(())
    }
}

/// Writes new chunked hashes ([`ChunkedHashes`]) to `out`, positioned at their offset:
/// the entries as they are pushed, then the table.
pub struct ChunkedWriter<W: Write> {
    out: W,
    chunk: Sha256,
    in_chunk: u32,
    count: u32,
    table: Vec<Hash>,
}

impl<W: Write> ChunkedWriter<W> {
    /// Starts writing to `out`.
    pub fn new(out: W) -> Self {
        ChunkedWriter {
            out,
            chunk: Sha256::new(),
            in_chunk: 0,
            count: 0,
            table: Vec::new(),
        }
    }

    /// Appends the next page's hash.
    pub fn push(&mut self, hash: &Hash) -> std::io::Result<()> {
        self.out.write_all(hash)?;
        self.chunk.update(hash);
        self.count += 1;
        self.in_chunk += 1;
        if self.in_chunk == CHUNK_PAGES {
            self.table
                .push(std::mem::take(&mut self.chunk).finalize().into());
            self.in_chunk = 0;
        }
        Ok(())
    }

    /// Pages pushed.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Writes the table and hands back the writer and the table.
    pub fn finish(mut self) -> std::io::Result<(W, Vec<Hash>)> {
        if self.in_chunk > 0 {
            self.table.push(self.chunk.finalize().into());
        }
        self.out.write_all(&self.table.concat())?;
        Ok((self.out, self.table))
    }
}

/// Lower-case hex of a hash (or any bytes), as printed and stored.
pub fn hex(bytes: &[u8]) -> String {
    ::hex::encode(bytes)
}

/// 64 hex digits naming `parts` (a path's bytes, a server URL, a replica path): the
/// SHA-256 of the parts with a NUL byte between them (NUL is in neither a path nor a
/// URL, so no two lists of parts collide). Callers keep a prefix of it as a file name:
/// page-hash caches, history records and subscriber socket directories are all named
/// this way.
pub fn name_key(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            h.update([0u8]);
        }
        h.update(part);
    }
    hex(&h.finalize())
}

/// Hashes kept in an unlinked temporary file, 32 bytes each, in order: a database's page
/// hashes (a hash tree's leaves, a committed version's manifest, what a push sent)
/// without holding them in memory. The file goes when the value is dropped.
#[derive(Debug)]
pub struct HashSpill {
    file: File,
    len: u32,
}

/// Appends hashes to a new [`HashSpill`], buffered; [`SpillWriter::finish`] hands it
/// over.
pub struct SpillWriter {
    out: BufWriter<File>,
    len: u32,
}

/// How many bytes a spill reads or writes at a time.
const SPILL_BUFFER_BYTES: usize = 64 * 1024;

impl HashSpill {
    /// Starts a new spill in the temporary directory.
    pub fn writer() -> std::io::Result<SpillWriter> {
        Ok(SpillWriter {
            out: BufWriter::with_capacity(SPILL_BUFFER_BYTES, tempfile::tempfile()?),
            len: 0,
        })
    }

    /// How many hashes it holds.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether it holds no hash.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends hashes `first .. first + count` (0-based) to `out`.
    pub fn read_at(&self, first: u32, count: u32, out: &mut Vec<Hash>) -> std::io::Result<()> {
        let mut buf = vec![0u8; count as usize * HASH_BYTES];
        self.file
            .read_exact_at(&mut buf, u64::from(first) * HASH_BYTES as u64)?;
        out.extend(buf.chunks_exact(HASH_BYTES).map(|c| {
            let mut h = [0u8; HASH_BYTES];
            h.copy_from_slice(c);
            h
        }));
        Ok(())
    }

    /// Overwrites (or extends) the hashes from index `first` (0-based) with `hashes`,
    /// which holds whole hashes back to back.
    pub fn write_at(&mut self, first: u32, hashes: &[u8]) -> std::io::Result<()> {
        debug_assert!(hashes.len().is_multiple_of(HASH_BYTES));
        self.file
            .write_all_at(hashes, u64::from(first) * HASH_BYTES as u64)?;
        self.len = self.len.max(first + (hashes.len() / HASH_BYTES) as u32);
        Ok(())
    }

    /// The first `count` hashes, in order, read as they are needed.
    pub fn iter(&self, count: u32) -> HashReader<BufReader<ReadAt<'_>>> {
        HashReader::new(
            BufReader::with_capacity(
                SPILL_BUFFER_BYTES,
                ReadAt {
                    file: &self.file,
                    at: 0,
                },
            ),
            count,
        )
    }
}

impl SpillWriter {
    /// Appends one hash.
    pub fn push(&mut self, hash: &Hash) -> std::io::Result<()> {
        self.len += 1;
        self.out.write_all(hash)
    }

    /// How many hashes were appended.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether no hash was appended.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes out what is buffered and hands the spill over.
    pub fn finish(self) -> std::io::Result<HashSpill> {
        Ok(HashSpill {
            file: self.out.into_inner().map_err(|e| e.into_error())?,
            len: self.len,
        })
    }
}

/// Reads a file from its start by position, leaving the file's own offset alone: a
/// spill can be read while more is written to it, and read by several readers.
pub struct ReadAt<'a> {
    file: &'a File,
    at: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// A given number of hashes read back to back from a reader: a spill, or the body of a
/// kept manifest file. Too few bytes is an error ([`std::io::ErrorKind::UnexpectedEof`]).
pub struct HashReader<R> {
    reader: R,
    left: u32,
}

impl<R: Read> HashReader<R> {
    /// Reads `count` hashes from `reader`.
    pub fn new(reader: R, count: u32) -> Self {
        HashReader {
            reader,
            left: count,
        }
    }
}

impl<R: Read> Iterator for HashReader<R> {
    type Item = std::io::Result<Hash>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let mut h = [0u8; HASH_BYTES];
        Some(self.reader.read_exact(&mut h).map(|()| h))
    }
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
        assert_eq!(page_hash(1, &a), sha256(&old));
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
    }

    /// The chunked digest computed the long way, from its definition: every chunk's
    /// page hashes concatenated and hashed, then the tag, sizes and chunk hashes.
    fn chunked_by_definition(page_size: u32, hashes: &[Hash]) -> Hash {
        let mut all = Vec::new();
        all.extend_from_slice(b"sqlferry-digest-2");
        all.extend_from_slice(&page_size.to_be_bytes());
        all.extend_from_slice(&(hashes.len() as u32).to_be_bytes());
        for chunk in hashes.chunks(1024) {
            all.extend_from_slice(&sha256(&chunk.concat()));
        }
        sha256(&all)
    }

    #[test]
    fn the_chunked_digest_is_its_definition() {
        let page = |i: u32| sha256(&i.to_be_bytes());
        for n in [1u32, 2, 1023, 1024, 1025, 2048, 3000] {
            let hashes: Vec<Hash> = (1..=n).map(page).collect();
            let mut d = Digester::new(DigestForm::Chunked, 4096, n);
            hashes.iter().for_each(|h| d.push(h));
            let ours = d.finish().expect("every page pushed");
            assert_eq!(ours, chunked_by_definition(4096, &hashes), "{n} pages");
            // From chunk hashes directly, as a store computes it from its manifest keys.
            let mut c = ChunkedDigest::new(4096, n);
            for chunk in hashes.chunks(1024) {
                c.push_chunk(&sha256(&chunk.concat()));
            }
            assert_eq!(c.finish(), Some(ours), "{n} pages, from chunk hashes");
            // Another form, another value; another page size too.
            let mut one = Digester::new(DigestForm::One, 4096, n);
            hashes.iter().for_each(|h| one.push(h));
            assert_ne!(one.finish(), Some(ours));
            assert_ne!(chunked_by_definition(8192, &hashes), ours);
        }
        // The counts are checked: a page or a chunk short is no digest.
        let mut short = Digester::new(DigestForm::Chunked, 4096, 1025);
        (1..=1024).for_each(|i| short.push(&page(i)));
        assert!(short.finish().is_none());
        let mut c = ChunkedDigest::new(4096, 1025);
        c.push_chunk(&page(1));
        assert!(c.finish().is_none());
        // A changed page changes its chunk's hash, and so the digest.
        let mut hashes: Vec<Hash> = (1..=2048).map(page).collect();
        let before = chunked_by_definition(4096, &hashes);
        hashes[1500] = page(0);
        assert_ne!(chunked_by_definition(4096, &hashes), before);
    }

    #[test]
    fn page_bits_read_a_word_at_a_time_say_what_bit_by_bit_says() {
        let bit_by_bit = |bits: &[u64], pgno: u32| {
            let i = (pgno - 1) as usize;
            bits[i / 64] & (1 << (i % 64)) != 0
        };
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..80 {
            let words = 1 + round % 12;
            let mut bits = vec![0u64; words];
            // Sparse, dense and empty sets, with bits at the words' edges.
            for w in bits.iter_mut() {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                *w = match round % 4 {
                    0 => 0,
                    1 => rng & (rng >> 11) & (rng >> 23),
                    2 => rng,
                    _ => (1 << 63) | 1,
                };
            }
            let page_count = (words * 64) as u32 - (rng % 64) as u32;
            for first in 1..=page_count {
                for last in [
                    first,
                    first + 1,
                    first + 62,
                    first + 63,
                    first + 64,
                    first + 130,
                    page_count,
                ] {
                    let last = last.min(page_count);
                    let want = (first..=last).any(|p| bit_by_bit(&bits, p));
                    assert_eq!(any_page_set(&bits, first..=last), want, "{first}..={last}");
                }
            }
            assert!(!any_page_set(&bits, chunk_pages(99, page_count)));
            let want: Vec<u32> = (1..=page_count).filter(|&p| bit_by_bit(&bits, p)).collect();
            assert_eq!(pages_set(&bits, page_count).collect::<Vec<_>>(), want);
        }
    }

    #[test]
    fn chunks_cover_the_pages_in_order() {
        assert_eq!(chunk_count(0), 0);
        assert_eq!(chunk_count(1024), 1);
        assert_eq!(chunk_count(1025), 2);
        assert_eq!(chunk_pages(0, 3000), 1..=1024);
        assert_eq!(chunk_pages(2, 3000), 2049..=3000);
        assert!(chunk_pages(3, 3000).is_empty());
        assert_eq!(chunk_pages(4_194_303, u32::MAX), 4_294_966_273..=u32::MAX);
        assert_eq!(digest_text(DigestForm::One, &[0xab; 32]), "ab".repeat(32));
        assert_eq!(
            digest_text(DigestForm::Chunked, &[0xab; 32]),
            format!("c:{}", "ab".repeat(32))
        );
    }

    #[test]
    fn hex_is_lower_case_and_name_keys_separate_their_parts() {
        assert_eq!(hex(&[0xab; 32]).len(), 64);
        assert_eq!(hex(&[0x0f, 0xa0]), "0fa0");
        // One part is the plain SHA-256 of it (the names caches already have on disk).
        assert_eq!(
            name_key(&[b"/x/app.db".as_slice()]),
            hex(&sha256(b"/x/app.db"))
        );
        assert_ne!(
            name_key(&[b"ab".as_slice(), b"c"]),
            name_key(&[b"a".as_slice(), b"bc"])
        );
    }

    #[test]
    fn chunked_hashes_check_each_chunk_and_update_in_place() {
        let page = |i: u32| sha256(&i.to_be_bytes());
        let offset = 10u64;
        let tmp = tempfile::tempfile().expect("a temporary file");
        // The owner's header first, then the hashes.
        let mut out = std::io::BufWriter::new(&tmp);
        out.write_all(&[0u8; 10]).expect("header");
        let mut w = ChunkedWriter::new(out);
        (1..=2100).for_each(|i| w.push(&page(i)).expect("push"));
        let (out, table) = w.finish().expect("finish");
        drop(out);
        assert_eq!(table.len(), 3);
        let hashes: Vec<Hash> = (1..=2100).map(page).collect();
        assert_eq!(table[2], sha256(&hashes[2048..].concat()));
        let seed = b"header";
        let sum = table_checksum(seed, &table);
        let open =
            |n, sum| ChunkedHashes::open(tmp.try_clone().expect("clone"), offset, n, seed, sum);
        assert!(open(2100, sum + 1).is_none(), "another checksum");
        assert!(open(2101, sum).is_none(), "another length");
        let mut c = open(2100, sum).expect("opens");
        let all: Vec<Hash> = c.hashes().map(|h| h.expect("whole")).collect();
        assert_eq!(all, hashes);
        let mut got = Vec::new();
        assert!(c.read_chunk(1, &mut got).expect("reads"));
        assert_eq!(got, hashes[1024..2048].concat());
        assert!(!c.read_chunk(3, &mut got).expect("no chunk 3"));
        // A chunk written without its table entry fails its check; the others hold.
        c.write_chunk(1, &page(0)).expect("writes");
        let mut got = Vec::new();
        assert!(!c.read_chunk(1, &mut got).expect("reads"));
        assert!(got.is_empty());
        assert!(c.read_chunk(2, &mut got).expect("reads"));
        assert!(c.hashes().any(|h| h.is_err()));
        // Shrunk to 1500 pages: chunk 1 rewritten whole and shorter, the table moved.
        let mut short = hashes[..1500].to_vec();
        short[1100] = page(0);
        c.write_chunk(1, &short[1024..].concat()).expect("writes");
        let table = vec![table[0], sha256(&short[1024..].concat())];
        c.finish_update(1500, table.clone()).expect("updates");
        let c = open(1500, table_checksum(seed, &table)).expect("opens");
        let all: Vec<Hash> = c.hashes().map(|h| h.expect("whole")).collect();
        assert_eq!(all, short);
        // Cut short after it was opened (a crash while it grew, a full disk): the lost
        // chunk is no chunk, never an error that ends the push.
        tmp.set_len(offset + 1200 * HASH_BYTES as u64).expect("cut");
        let mut got = Vec::new();
        assert!(!c.read_chunk(1, &mut got).expect("a short read is no chunk"));
        assert!(got.is_empty());
        assert!(c.read_chunk(0, &mut got).expect("reads"));
    }

    #[test]
    fn a_spill_gives_back_what_was_written() {
        let h = |i: u8| [i; HASH_BYTES];
        let mut w = HashSpill::writer().expect("a temporary file");
        for i in 0..10 {
            w.push(&h(i)).expect("appends");
        }
        let mut spill = w.finish().expect("flushes");
        assert_eq!(spill.len(), 10);
        let mut got = Vec::new();
        spill.read_at(3, 2, &mut got).expect("reads");
        assert_eq!(got, vec![h(3), h(4)]);
        spill
            .write_at(9, &[h(90), h(100)].concat())
            .expect("writes");
        assert_eq!(spill.len(), 11);
        let all: Vec<Hash> = spill.iter(11).map(|r| r.expect("reads")).collect();
        assert_eq!(all[9], h(90));
        assert_eq!(all[10], h(100));
        assert_eq!(all[..9], (0..9).map(h).collect::<Vec<_>>()[..]);
        // Two readers at once, and a short file is an error, not a short list.
        assert_eq!(spill.iter(2).zip(spill.iter(2)).count(), 2);
        assert!(spill.iter(12).any(|r| r.is_err()));
    }
}
