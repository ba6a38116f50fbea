//! Run files: immutable, sorted parts of the page index, written once in hash order.
//!
//! The page index maps a page's hash to where its bytes are. Kept as one B-tree keyed by
//! hash, every new page lands on a random leaf: once the store holds far more pages than
//! a push brings, each new page reads a leaf no other shares and writes it twice (WAL
//! and checkpoint), so a push's cost grows with the store (docs/performance.md, "The
//! page index at 10 GiB"). A run file holds a batch of entries sorted by hash, written
//! sequentially in one go and never changed; lookups check the runs newest first, then
//! the table ([`super::pack::Pages`]); runs are merged into larger ones, in order, as
//! they accumulate (a log-structured merge). A push then writes 64 bytes per new page
//! once, wherever the store's size.
//!
//! Layout of `run-<seq>.run` (all integers little-endian):
//!
//! ```text
//! header   "SQFRUN01" | count: u64
//! entries  count × 64 bytes, sorted by hash, each hash once:
//!          hash[32] | pack: i64 | offset: u64 | len: u32 | flags: u8 | 0[3] | sum: u64
//! filter   blocks × 64 bytes: a blocked Bloom filter, 10 bits an entry, 7 probes
//!          inside one 512-bit block chosen by the hash
//! summary  one 40-byte row per 64 entries (one 4 KiB block of entries):
//!          the block's first hash[32] | xxh3-64 of the block's bytes
//! footer   filter blocks: u64 | xxh3-64 of filter and summary | 0: u64 | "SQFRUNZ1"
//! ```
//!
//! Every byte read is checked: the sizes when the run opens, the filter and summary
//! against the footer's sum when first read (so a pull that follows its place hints
//! never reads them), each block of entries against its summary row when a lookup or a
//! scan reads it. A run that fails is an error naming the file, never a missing page: a page
//! the index no longer finds would be stored again by the next push, but a version that
//! names it could not be pulled. Only `flags` bit 0 (zstd) and bit 1 (sealed) are used;
//! every entry of a run has a sum ([`Check::Sum`]); older kinds stay in the table.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::digest::Hash;
use crate::{Error, Result};

use super::pack::{Check, Loc, sum_of};

/// Bytes of one entry.
pub(super) const ENTRY_BYTES: usize = 64;
/// Entries of one block, the unit a lookup reads and checks (4 KiB).
const BLOCK_ENTRIES: usize = 64;
const BLOCK_BYTES: usize = BLOCK_ENTRIES * ENTRY_BYTES;
const HEADER_BYTES: usize = 16;
const SUMMARY_ROW: usize = 40;
const FOOTER_BYTES: usize = 32;
const MAGIC: &[u8; 8] = b"SQFRUN01";
const FOOTER_MAGIC: &[u8; 8] = b"SQFRUNZ1";
/// Filter bits per entry and probes per lookup: about 0.8% false positives.
const FILTER_BITS_PER_ENTRY: usize = 10;
const FILTER_PROBES: usize = 7;
const FILTER_BLOCK_BYTES: usize = 64;

const FLAG_ZSTD: u8 = 1;
const FLAG_SEALED: u8 = 2;

/// One entry: a page's hash and where its bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub hash: Hash,
    pub loc: Loc,
}

impl Entry {
    /// Whether a run can hold `loc`: only entries with a sum (every new one).
    pub fn fits(loc: &Loc) -> bool {
        matches!(loc.check, Check::Sum(_))
    }

    fn encode(&self, out: &mut [u8]) {
        let Check::Sum(sum) = self.loc.check else {
            unreachable!("only entries with a sum go into runs (Entry::fits)")
        };
        out[..32].copy_from_slice(&self.hash);
        out[32..40].copy_from_slice(&self.loc.pack.to_le_bytes());
        out[40..48].copy_from_slice(&self.loc.offset.to_le_bytes());
        out[48..52].copy_from_slice(&self.loc.len.to_le_bytes());
        let flags =
            (u8::from(self.loc.zstd) * FLAG_ZSTD) | (u8::from(self.loc.sealed) * FLAG_SEALED);
        out[52] = flags;
        out[53..56].fill(0);
        out[56..64].copy_from_slice(&sum.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Entry {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Entry {
            hash: b[..32].try_into().expect("32 bytes"),
            loc: Loc {
                pack: u64_at(32) as i64,
                offset: u64_at(40),
                len: u32::from_le_bytes(b[48..52].try_into().expect("4 bytes")),
                zstd: b[52] & FLAG_ZSTD != 0,
                sealed: b[52] & FLAG_SEALED != 0,
                check: Check::Sum(u64_at(56)),
            },
        }
    }
}

/// The filter block and the bits inside it that `hash` sets. SHA-256 output is uniform,
/// so its bytes serve as the filter's hash functions directly.
fn probes(hash: &Hash, blocks: usize) -> (usize, [u16; FILTER_PROBES]) {
    let block =
        (u64::from_le_bytes(hash[..8].try_into().expect("8 bytes")) % blocks as u64) as usize;
    let mut bits = [0u16; FILTER_PROBES];
    for (i, bit) in bits.iter_mut().enumerate() {
        *bit = u16::from_le_bytes([hash[8 + 2 * i], hash[9 + 2 * i]])
            % (FILTER_BLOCK_BYTES as u16 * 8);
    }
    (block, bits)
}

fn filter_blocks(count: u64) -> usize {
    ((count as usize * FILTER_BITS_PER_ENTRY).div_ceil(FILTER_BLOCK_BYTES * 8)).max(1)
}

fn damaged(path: &Path, what: &str) -> Error {
    Error::io(
        path,
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "a run file of the page index is damaged ({what}); nothing was changed: the store needs its run files back (from a copy of it)"
            ),
        ),
    )
}

/// Where the run at `path` is written before it is renamed into place.
pub(super) fn temporary(path: &Path) -> PathBuf {
    path.with_extension("run-tmp")
}

/// Writes the run of `entries` (sorted by hash, each hash once; at most `most` of them)
/// to `path`: into a temporary file beside it, fsynced, renamed, the directory fsynced.
/// Returns how many entries it holds.
pub(super) fn write(
    path: &Path,
    most: u64,
    entries: &mut dyn Iterator<Item = Result<Entry>>,
) -> Result<u64> {
    let dir = path
        .parent()
        .expect("a run file lives in the pages directory");
    let tmp = temporary(path);
    let io = |e| Error::io(&tmp, e);
    let file = File::create(&tmp).map_err(io)?;
    let mut out = BufWriter::with_capacity(1 << 20, &file);
    out.write_all(MAGIC).map_err(io)?;
    out.write_all(&0u64.to_le_bytes()).map_err(io)?;
    let blocks = filter_blocks(most);
    let mut filter = vec![0u8; blocks * FILTER_BLOCK_BYTES];
    let mut summary = Vec::new();
    let mut block = Vec::with_capacity(BLOCK_BYTES);
    let mut first = [0u8; 32];
    let mut count = 0u64;
    let mut last: Option<Hash> = None;
    let mut buf = [0u8; ENTRY_BYTES];
    let close_block = |block: &mut Vec<u8>, first: &Hash, summary: &mut Vec<u8>| {
        summary.extend_from_slice(first);
        summary.extend_from_slice(&sum_of(block).to_le_bytes());
        block.clear();
    };
    for entry in entries {
        let entry = entry?;
        assert!(
            last.is_none_or(|l| l < entry.hash),
            "a run's entries come sorted by hash, each once"
        );
        assert!(
            count < most,
            "a run holds at most the entries it was sized for"
        );
        last = Some(entry.hash);
        let (b, bits) = probes(&entry.hash, blocks);
        for bit in bits {
            filter[b * FILTER_BLOCK_BYTES + bit as usize / 8] |= 1 << (bit % 8);
        }
        if block.is_empty() {
            first = entry.hash;
        }
        entry.encode(&mut buf);
        block.extend_from_slice(&buf);
        out.write_all(&buf).map_err(io)?;
        count += 1;
        if block.len() == BLOCK_BYTES {
            close_block(&mut block, &first, &mut summary);
        }
    }
    if !block.is_empty() {
        close_block(&mut block, &first, &mut summary);
    }
    let mut sum = xxhash_rust::xxh3::Xxh3::new();
    sum.update(&filter);
    sum.update(&summary);
    out.write_all(&filter).map_err(io)?;
    out.write_all(&summary).map_err(io)?;
    out.write_all(&(blocks as u64).to_le_bytes()).map_err(io)?;
    out.write_all(&sum.digest().to_le_bytes()).map_err(io)?;
    out.write_all(&0u64.to_le_bytes()).map_err(io)?;
    out.write_all(FOOTER_MAGIC).map_err(io)?;
    out.flush().map_err(io)?;
    drop(out);
    file.write_all_at(&count.to_le_bytes(), 8).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))?;
    Ok(count)
}

/// An open run: its filter and summary mapped and checked when first used (about 1.9
/// bytes an entry; a pull that follows its place hints never reads them), its entries
/// read a block at a time.
pub(super) struct Run {
    path: PathBuf,
    file: File,
    count: u64,
    /// Filter blocks.
    blocks: u64,
    /// The footer's sum of the filter and summary.
    sum: u64,
    loaded: std::cell::OnceCell<Loaded>,
}

/// A run's filter and summary, checked: the file's tail, mapped read-only. Mapped, not
/// read, because the newest pushes look up a few thousand pages in a run of millions
/// (5 MB of filter and summary at 10 GiB): a copy into fresh memory cost each push
/// about 6 ms of page faults and copying, the map about a tenth (docs/performance.md).
struct Loaded {
    map: Tail,
    /// Where the summary starts in `map` (the filter is before it).
    filter_bytes: usize,
}

/// The bytes of a run's filter and summary: mapped, or read where the file system
/// cannot map files.
enum Tail {
    Mapped(memmap2::Mmap),
    Read(Vec<u8>),
}

impl std::ops::Deref for Tail {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Tail::Mapped(map) => map,
            Tail::Read(bytes) => bytes,
        }
    }
}

impl Loaded {
    fn filter(&self) -> &[u8] {
        &self.map[..self.filter_bytes]
    }

    /// Summary rows: one per block of entries.
    fn rows(&self) -> usize {
        (self.map.len() - self.filter_bytes) / SUMMARY_ROW
    }

    /// Row `i`: the block's first hash and the sum of its bytes.
    fn row(&self, i: usize) -> (&[u8], u64) {
        let r = &self.map[self.filter_bytes + i * SUMMARY_ROW..][..SUMMARY_ROW];
        (
            &r[..32],
            u64::from_le_bytes(r[32..].try_into().expect("8 bytes")),
        )
    }
}

impl Run {
    /// Opens the run at `path`, checking its structure (its filter and summary are
    /// checked when first read).
    pub fn open(path: &Path) -> Result<Run> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        Run::of_file(path, file)
    }

    /// Opens the run in `file` (at `path`), checking as [`Run::open`] does.
    pub fn of_file(path: &Path, file: File) -> Result<Run> {
        let io = |e| Error::io(path, e);
        let len = file.metadata().map_err(io)?.len();
        if len < (HEADER_BYTES + FOOTER_BYTES) as u64 {
            return Err(damaged(path, "too short"));
        }
        let mut header = [0u8; HEADER_BYTES];
        file.read_exact_at(&mut header, 0).map_err(io)?;
        let mut footer = [0u8; FOOTER_BYTES];
        file.read_exact_at(&mut footer, len - FOOTER_BYTES as u64)
            .map_err(io)?;
        if &header[..8] != MAGIC || &footer[24..] != FOOTER_MAGIC {
            return Err(damaged(path, "not a run file"));
        }
        let count = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
        let blocks = u64::from_le_bytes(footer[..8].try_into().expect("8 bytes"));
        let sum = u64::from_le_bytes(footer[8..16].try_into().expect("8 bytes"));
        let rows = count.div_ceil(BLOCK_ENTRIES as u64);
        let expected = count
            .checked_mul(ENTRY_BYTES as u64)
            .and_then(|n| n.checked_add(blocks.checked_mul(FILTER_BLOCK_BYTES as u64)?))
            .and_then(|n| n.checked_add(rows * SUMMARY_ROW as u64))
            .and_then(|n| n.checked_add((HEADER_BYTES + FOOTER_BYTES) as u64));
        if expected != Some(len) || blocks == 0 || footer[16..24] != [0; 8] {
            return Err(damaged(path, "its sizes do not add up"));
        }
        Ok(Run {
            path: path.to_owned(),
            file,
            count,
            blocks,
            sum,
            loaded: std::cell::OnceCell::new(),
        })
    }

    /// The filter and summary, mapped (or read) and checked the first time.
    fn loaded(&self) -> Result<&Loaded> {
        match self.loaded.get() {
            Some(l) => Ok(l),
            None => self.load(true),
        }
    }

    /// Maps the filter and summary (reads them when `map` is false or the file system
    /// cannot map), checks them against the footer's sum and keeps them.
    fn load(&self, map: bool) -> Result<&Loaded> {
        let at = HEADER_BYTES as u64 + self.count * ENTRY_BYTES as u64;
        let filter_bytes = self.blocks as usize * FILTER_BLOCK_BYTES;
        let rows = self.count.div_ceil(BLOCK_ENTRIES as u64) as usize;
        let len = filter_bytes + rows * SUMMARY_ROW;
        // SAFETY: a run file is never written after its rename into place (`write`
        // makes it under a temporary name) and only ever removed, which leaves a map
        // valid; its length was checked at open to hold this range. Only a file cut
        // short by hand under a running push could fault (SIGBUS), as with SQLite's
        // own mmap.
        let mapped = map.then(|| unsafe {
            memmap2::MmapOptions::new()
                .offset(at)
                .len(len)
                .map(&self.file)
        });
        let tail = match mapped {
            Some(Ok(map)) => Tail::Mapped(map),
            _ => {
                let mut bytes = vec![0u8; len];
                self.file
                    .read_exact_at(&mut bytes, at)
                    .map_err(|e| Error::io(&self.path, e))?;
                Tail::Read(bytes)
            }
        };
        if sum_of(&tail) != self.sum {
            return Err(damaged(&self.path, "its filter or summary fails its sum"));
        }
        Ok(self.loaded.get_or_init(|| Loaded {
            map: tail,
            filter_bytes,
        }))
    }

    /// How many entries the run holds.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether the filter says `hash` may be in the run (false: it is not).
    pub fn may_hold(&self, hash: &Hash) -> Result<bool> {
        let filter = self.loaded()?.filter();
        let (b, bits) = probes(hash, self.blocks as usize);
        let block = &filter[b * FILTER_BLOCK_BYTES..][..FILTER_BLOCK_BYTES];
        Ok(bits
            .iter()
            .all(|&bit| block[bit as usize / 8] & (1 << (bit % 8)) != 0))
    }

    /// Reads block `i` into `buf`, checked against its summary row.
    fn block(&self, i: usize, buf: &mut Vec<u8>) -> Result<()> {
        let n = (self.count as usize - i * BLOCK_ENTRIES).min(BLOCK_ENTRIES);
        buf.resize(n * ENTRY_BYTES, 0);
        self.file
            .read_exact_at(buf, (HEADER_BYTES + i * BLOCK_BYTES) as u64)
            .map_err(|e| Error::io(&self.path, e))?;
        let (first, sum) = self.loaded()?.row(i);
        if sum_of(buf) != sum || buf[..32] != *first {
            return Err(damaged(&self.path, "a block of entries fails its sum"));
        }
        Ok(())
    }

    /// The entry of `hash`, if the run holds one.
    pub fn lookup(&self, hash: &Hash) -> Result<Option<Loc>> {
        if !self.may_hold(hash)? {
            return Ok(None);
        }
        // The last block whose first hash is not above `hash`.
        let loaded = self.loaded()?;
        let (mut lo, mut hi) = (0, loaded.rows());
        while lo < hi {
            let mid = (lo + hi) / 2;
            match loaded.row(mid).0 <= &hash[..] {
                true => lo = mid + 1,
                false => hi = mid,
            }
        }
        let i = lo;
        if i == 0 {
            return Ok(None);
        }
        let mut buf = Vec::with_capacity(BLOCK_BYTES);
        self.block(i - 1, &mut buf)?;
        let entries = buf.len() / ENTRY_BYTES;
        let at = |k: usize| &buf[k * ENTRY_BYTES..][..ENTRY_BYTES];
        let (mut lo, mut hi) = (0, entries);
        while lo < hi {
            let mid = (lo + hi) / 2;
            match at(mid)[..32].cmp(&hash[..]) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(Some(Entry::decode(at(mid)).loc)),
            }
        }
        Ok(None)
    }

    /// Every entry, in hash order, each block checked as it is read.
    pub fn scan(&self) -> Scan<'_> {
        Scan {
            run: self,
            next_block: 0,
            buf: Vec::new(),
            at: 0,
            done: false,
        }
    }

    /// Where the run's file is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The entries of a run in order ([`Run::scan`]): reads up to 64 blocks (256 KiB) at a
/// time, at offsets, so scans of one run never share a file position.
pub(super) struct Scan<'a> {
    run: &'a Run,
    next_block: usize,
    buf: Vec<u8>,
    at: usize,
    done: bool,
}

/// Blocks a scan reads at once.
const SCAN_BLOCKS: usize = 64;

impl Scan<'_> {
    fn fill(&mut self) -> Result<bool> {
        let run = self.run;
        let loaded = run.loaded()?;
        let first = self.next_block;
        if first == loaded.rows() {
            return Ok(false);
        }
        let last = (first + SCAN_BLOCKS).min(loaded.rows());
        let entries = (run.count as usize).min(last * BLOCK_ENTRIES) - first * BLOCK_ENTRIES;
        self.buf.resize(entries * ENTRY_BYTES, 0);
        run.file
            .read_exact_at(&mut self.buf, (HEADER_BYTES + first * BLOCK_BYTES) as u64)
            .map_err(|e| Error::io(&run.path, e))?;
        for (i, block) in self.buf.chunks(BLOCK_BYTES).enumerate() {
            let (first_hash, sum) = loaded.row(first + i);
            if sum_of(block) != sum || block[..32] != *first_hash {
                return Err(damaged(&run.path, "a block of entries fails its sum"));
            }
        }
        self.next_block = last;
        self.at = 0;
        Ok(true)
    }
}

impl Iterator for Scan<'_> {
    type Item = Result<Entry>;

    fn next(&mut self) -> Option<Result<Entry>> {
        if self.done {
            return None;
        }
        if self.at == self.buf.len() {
            match self.fill() {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => {
                    // An error ends the scan.
                    self.done = true;
                    self.buf.clear();
                    self.at = 0;
                    return Some(Err(e));
                }
            }
        }
        let e = Entry::decode(&self.buf[self.at..][..ENTRY_BYTES]);
        self.at += ENTRY_BYTES;
        Some(Ok(e))
    }
}

/// The entries of `runs` (oldest first) merged in hash order, each hash once: where
/// several hold it, the newest's entry.
pub(super) fn merged<'a>(runs: &'a [&'a Run]) -> impl Iterator<Item = Result<Entry>> + 'a {
    let mut heads: Vec<(Scan<'a>, Option<Entry>)> = runs.iter().map(|r| (r.scan(), None)).collect();
    let mut started = false;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed {
            return None;
        }
        if !started {
            started = true;
            for (scan, head) in heads.iter_mut() {
                match scan.next().transpose() {
                    Ok(e) => *head = e,
                    Err(e) => {
                        failed = true;
                        return Some(Err(e));
                    }
                }
            }
        }
        // The smallest hash; among equals the newest run's (the last).
        let mut best: Option<(usize, Hash)> = None;
        for (i, (_, head)) in heads.iter().enumerate() {
            if let Some(e) = head
                && best.is_none_or(|(_, h)| e.hash <= h)
            {
                best = Some((i, e.hash));
            }
        }
        let (winner, hash) = best?;
        let entry = heads[winner].1.expect("the best head is an entry");
        for (scan, head) in heads.iter_mut() {
            if head.is_some_and(|e| e.hash == hash) {
                match scan.next().transpose() {
                    Ok(e) => *head = e,
                    Err(e) => {
                        failed = true;
                        return Some(Err(e));
                    }
                }
            }
        }
        Some(Ok(entry))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn entry(seed: u64, pack: i64) -> Entry {
        let hash = crate::digest::sha256(&seed.to_le_bytes());
        Entry {
            hash,
            loc: Loc::of_bytes(
                pack,
                seed * 4096,
                &seed.to_be_bytes(),
                seed.is_multiple_of(3),
                seed.is_multiple_of(5),
            ),
        }
    }

    fn write_map(path: &Path, map: &BTreeMap<Hash, Loc>) -> Run {
        let mut it = map.iter().map(|(h, l)| Ok(Entry { hash: *h, loc: *l }));
        let n = write(path, map.len() as u64, &mut it).expect("write");
        assert_eq!(n, map.len() as u64);
        Run::open(path).expect("open")
    }

    #[test]
    fn a_run_finds_every_entry_it_holds_and_none_it_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let map: BTreeMap<Hash, Loc> = (0..5_000u64)
            .map(|s| entry(s, 7))
            .map(|e| (e.hash, e.loc))
            .collect();
        let run = write_map(&dir.path().join("run-1.run"), &map);
        assert_eq!(run.count(), 5_000);
        for (h, l) in &map {
            assert_eq!(run.lookup(h).unwrap(), Some(*l));
        }
        assert!(matches!(run.loaded().unwrap().map, Tail::Mapped(_)));
        let mut false_positives = 0;
        for s in 5_000..25_000u64 {
            let h = crate::digest::sha256(&s.to_le_bytes());
            assert_eq!(run.lookup(&h).unwrap(), None);
            false_positives += usize::from(run.may_hold(&h).unwrap());
        }
        assert!(
            false_positives < 400,
            "{false_positives} of 20,000 passed the filter"
        );
        let scanned: Vec<_> = run.scan().map(|e| e.unwrap()).collect();
        let want: Vec<_> = map
            .iter()
            .map(|(h, l)| Entry { hash: *h, loc: *l })
            .collect();
        assert_eq!(scanned, want);
    }

    #[test]
    fn a_run_read_where_it_cannot_be_mapped_answers_the_same_and_checks_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let map: BTreeMap<Hash, Loc> = (0..1_000u64)
            .map(|s| entry(s, 5))
            .map(|e| (e.hash, e.loc))
            .collect();
        let path = dir.path().join("run-1.run");
        write_map(&path, &map);
        let run = Run::open(&path).unwrap();
        run.load(false).unwrap();
        assert!(matches!(run.loaded().unwrap().map, Tail::Read(_)));
        for (h, l) in &map {
            assert_eq!(run.lookup(h).unwrap(), Some(*l));
        }
        assert_eq!(
            run.lookup(&[0xee; 32]).unwrap(),
            map.get(&[0xee; 32]).copied()
        );
        assert_eq!(run.scan().count(), 1_000);
        // A flipped byte of the filter fails the sum, read as mapped.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_BYTES + 1_000 * ENTRY_BYTES + 3] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let run = Run::open(&path).unwrap();
        let e = run.load(false).err().expect("a damaged filter is an error");
        assert!(e.to_string().contains("fails its sum"), "{e}");
    }

    #[test]
    fn an_empty_run_is_a_run() {
        let dir = tempfile::tempdir().unwrap();
        let run = write_map(&dir.path().join("run-1.run"), &BTreeMap::new());
        assert_eq!(run.count(), 0);
        assert_eq!(run.lookup(&[1; 32]).unwrap(), None);
        assert_eq!(run.scan().count(), 0);
    }

    #[test]
    fn every_flipped_byte_is_an_error_or_the_same_answer() {
        let dir = tempfile::tempdir().unwrap();
        let map: BTreeMap<Hash, Loc> = (0..100u64)
            .map(|s| entry(s, 3))
            .map(|e| (e.hash, e.loc))
            .collect();
        let path = dir.path().join("run-1.run");
        write_map(&path, &map);
        let good = std::fs::read(&path).unwrap();
        for at in 0..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            let Ok(run) = Run::open(&path) else { continue };
            for (h, l) in &map {
                match run.lookup(h) {
                    Ok(found) => assert_eq!(found, Some(*l), "byte {at}: a wrong answer"),
                    Err(e) => assert!(e.to_string().contains("damaged"), "{e}"),
                }
            }
            for e in run.scan() {
                match e {
                    Ok(e) => assert_eq!(map.get(&e.hash), Some(&e.loc), "byte {at}"),
                    Err(e) => assert!(e.to_string().contains("damaged"), "{e}"),
                }
            }
        }
    }

    #[test]
    fn a_run_cut_short_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let map: BTreeMap<Hash, Loc> = (0..300u64)
            .map(|s| entry(s, 3))
            .map(|e| (e.hash, e.loc))
            .collect();
        let path = dir.path().join("run-1.run");
        write_map(&path, &map);
        let len = std::fs::metadata(&path).unwrap().len();
        for cut in [0, 10, 16, 100, len / 2, len - 1] {
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(cut).unwrap();
            let e = Run::open(&path).err().expect("a torn run does not open");
            assert!(e.to_string().contains("damaged"), "{e}");
            write_map(&path, &map);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn merging_runs_keeps_the_newest_entry_of_every_hash(
            runs in proptest::collection::vec(proptest::collection::vec(0u64..400, 0..300), 1..6)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut want = BTreeMap::new();
            let mut opened = Vec::new();
            for (i, seeds) in runs.iter().enumerate() {
                let map: BTreeMap<Hash, Loc> = seeds
                    .iter()
                    .map(|&s| entry(s, i as i64))
                    .map(|e| (e.hash, e.loc))
                    .collect();
                want.extend(map.iter().map(|(h, l)| (*h, *l)));
                opened.push(write_map(&dir.path().join(format!("run-{i}.run")), &map));
            }
            let refs: Vec<&Run> = opened.iter().collect();
            let most = refs.iter().map(|r| r.count()).sum();
            let path = dir.path().join("run-merged.run");
            let n = write(&path, most, &mut merged(&refs)).unwrap();
            prop_assert_eq!(n, want.len() as u64);
            let run = Run::open(&path).unwrap();
            for (h, l) in &want {
                prop_assert_eq!(run.lookup(h).unwrap(), Some(*l));
            }
            let all: Vec<_> = run.scan().map(|e| e.unwrap()).map(|e| (e.hash, e.loc)).collect();
            prop_assert_eq!(all, want.into_iter().collect::<Vec<_>>());
        }
    }
}
