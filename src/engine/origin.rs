//! The origin role: hashes its pages, descends the replica's hash tree where it differs,
//! sends the pages that differ, and asks the replica to commit against its digest.
//!
//! Invariants: the source is only read; at most [`WINDOW_NODES`] node hashes are
//! requested and unanswered at any time (bounding the replica → origin queue); pages
//! beyond the replica's end are sent without any hash exchange; the lock-byte page is
//! never sent.
//!
//! In a sealed session ([`Sealing`]) the origin's hashes are identities and its pages
//! go sealed; a sealing origin checks each page it seals against the hash its pass
//! made of it, since the store that receives it cannot.

use std::collections::VecDeque;
use std::time::Instant;

use super::seal::{FLAG_SEALED, Facts, Sealing};
use super::tree::Tree;
use super::{FANOUT, Link, PageSource, Phase, Progress, SyncStats, WINDOW_NODES};
use crate::digest::{
    CHUNK_PAGES, ChunkedDigest, Digest, DigestForm, HASH_BYTES, Hash, HashSpill, chunk_count,
    chunk_pages, digest_text, hex, lock_byte_page, page_hash,
};
use crate::protocol::{ErrorCode, Frame, MAX_RUNS_PER_FRAME, PROTOCOL_VERSION, Run};
use crate::{Error, Result};

/// BEGIN flag: the origin knows the replica's manifest of `base_version`; it sends the
/// pages that differ from it and asks for no hashes.
pub const FLAG_KNOWN_BASE: u8 = 0x01;

/// BEGIN flag: COMMIT and DONE carry the chunked digest
/// ([`crate::digest::DigestForm::Chunked`]) instead of digest 1. Set only when the peer
/// speaks it: in process always where the caller asks for it; a peer that does not know
/// the bit refuses the BEGIN.
pub const FLAG_CHUNKED_DIGEST: u8 = 0x02;

/// Pages hashed between two progress reports.
const PROGRESS_BATCH: u64 = 1024;

/// The descent starts at the lowest level that has at most this many nodes.
const TOP_NODES: u64 = 256;

/// The page hashes of the version the replica holds, as the origin keeps them: by
/// chunks ([`crate::digest::CHUNK_PAGES`] page hashes each), each chunk checked against
/// its hash when it is read.
pub trait BaseManifest {
    /// Its chunk hashes, in order.
    fn chunk_hashes(&self) -> &[Hash];
    /// Appends the page hashes of chunk `idx` (0-based) to `out`, back to back, when
    /// they make the chunk's hash: `Ok(false)` and `out` as it was when they do not (a
    /// damaged record), and the origin then sends every page of that chunk.
    fn read_chunk(&mut self, idx: u32, out: &mut Vec<u8>) -> Result<bool>;
}

/// The version the replica holds, as the origin already knows it: its page hashes. With
/// it the origin compares pages itself and no hash travels at all; with the chunked
/// digest and a source that knows its chunks ([`PageSource::chunk_hashes`]) it compares
/// chunks first, and pages only in the chunks that differ.
pub struct KnownBase<'a> {
    /// The version number (sent in BEGIN).
    pub version: u64,
    /// Its page size.
    pub page_size: u32,
    /// Its page count.
    pub page_count: u32,
    /// Its page hashes.
    pub hashes: &'a mut dyn BaseManifest,
}

/// What the replica now holds, as [`ManifestSink`] hears it.
pub enum Synced<'a> {
    /// Every page hash, in order.
    Pages(&'a mut dyn Iterator<Item = Result<Hash>>),
    /// The known base with some chunks changed (a sync by chunks): every chunk's hash
    /// in order, and the index and page hashes of each chunk whose hash is not the
    /// base's (or whose base record did not hold), in order. Every other chunk's page
    /// hashes are the base's.
    Chunks {
        /// The chunk hashes.
        table: &'a [Hash],
        /// The changed chunks.
        changed: &'a mut dyn Iterator<Item = Result<(u32, Vec<u8>)>>,
    },
}

/// Receives the origin's page hashes after a successful sync: the page size, the page
/// count and the hashes.
pub type ManifestSink<'a> = dyn FnMut(u32, u32, Synced<'_>) -> Result<()> + 'a;

/// A base's page hashes read in page order, a chunk at a time: no hash for a page of a
/// chunk that does not hold, nor past the base's end.
struct BasePages<'a> {
    base: &'a mut dyn BaseManifest,
    page_count: u32,
    chunk: Option<u32>,
    buf: Vec<u8>,
}

impl BasePages<'_> {
    fn hash(&mut self, pgno: u32) -> Result<Option<Hash>> {
        if pgno == 0 || pgno > self.page_count {
            return Ok(None);
        }
        let idx = (pgno - 1) / CHUNK_PAGES;
        if self.chunk != Some(idx) {
            self.buf.clear();
            self.base.read_chunk(idx, &mut self.buf)?;
            self.chunk = Some(idx);
        }
        let at = ((pgno - 1) % CHUNK_PAGES) as usize * HASH_BYTES;
        Ok(self
            .buf
            .get(at..at + HASH_BYTES)
            .map(|h| h.try_into().expect("32 bytes")))
    }
}

/// Optional behaviour of the origin.
#[derive(Default)]
pub struct OriginOptions<'a> {
    /// The replica's version, if the origin knows its manifest. Used only when the
    /// replica's READY agrees (same page count); otherwise the hash-tree exchange runs.
    pub base: Option<KnownBase<'a>>,
    /// Called with the page size, the page count and the synced page hashes once the
    /// replica committed (the client keeps them as the next push's known base): all of
    /// them, or after a pass by chunks only the chunks that differ from the base
    /// ([`Synced`]); not called when the base was known and the result is the base
    /// (the hashes are the base's).
    pub manifest: Option<&'a mut ManifestSink<'a>>,
    /// Agree on the chunked digest ([`FLAG_CHUNKED_DIGEST`]); only for a peer that
    /// speaks it.
    pub chunked_digest: bool,
    /// A sealed session ([`FLAG_SEALED`]): seal with a key, or relay what a store kept
    /// sealed. A sealing origin's known base and manifest sink are in identities. No
    /// pass by chunks runs in a sealed session (a source's chunk hashes are of its
    /// plaintext page hashes).
    pub sealing: Option<Sealing<'a>>,
}

/// How the origin sends a page: plain, or sealed.
struct PageOut<'a> {
    sealing: Option<&'a Sealing<'a>>,
    page_size: u32,
    buf: Vec<u8>,
}

impl PageOut<'_> {
    /// Sends page `pgno`, whose hash in this session is `hash` (an identity when
    /// sealed), with its bytes `data` (sealed already when relayed).
    fn send(&mut self, link: &mut dyn Link, pgno: u32, hash: &Hash, data: &[u8]) -> Result<()> {
        let sealed = match self.sealing {
            None => return link.send_page(pgno, data),
            Some(Sealing::Seal { key, .. }) => {
                // The store cannot check what it is sent: the origin checks that the
                // bytes it seals are the page its pass hashed.
                if key.page_identity(&page_hash(pgno, data)) != *hash {
                    return Err(Error::Verification(format!(
                        "page {pgno} changed between the origin's pass and its sending; nothing was committed"
                    )));
                }
                let mut buf = std::mem::take(&mut self.buf);
                buf.clear();
                key.seal_page(hash, data, &mut buf)?;
                buf
            }
            Some(Sealing::Relay { .. }) => {
                if data.len() != self.page_size as usize + crate::protocol::SEAL_OVERHEAD {
                    return Err(Error::Verification(format!(
                        "the stored sealed page {pgno} has {} bytes, not a sealed page of {}",
                        data.len(),
                        self.page_size
                    )));
                }
                data.to_vec()
            }
        };
        let frame = Frame::SealedPage {
            pgno,
            identity: *hash,
            sealed,
        };
        link.send(&frame)?;
        if let Frame::SealedPage { sealed, .. } = frame {
            self.buf = sealed;
        }
        Ok(())
    }
}

/// Runs the origin side of one sync over `link`.
pub fn run(
    source: &mut dyn PageSource,
    link: &mut dyn Link,
    progress: &dyn Progress,
) -> Result<SyncStats> {
    run_with(source, link, progress, OriginOptions::default())
}

/// Runs the origin side of one sync over `link`, with options.
pub fn run_with(
    source: &mut dyn PageSource,
    link: &mut dyn Link,
    progress: &dyn Progress,
    options: OriginOptions<'_>,
) -> Result<SyncStats> {
    let started = Instant::now();
    let result = session(source, link, progress, started, options);
    if let Err(e) = &result {
        // Tell the replica why, unless it is the one that ended the session.
        if !matches!(e, Error::Remote { .. } | Error::Disconnected(_)) {
            let _ = link.send(&Frame::Error {
                code: ErrorCode::for_kind(e.kind()) as u16,
                message: e.to_string(),
            });
        }
    }
    progress.finish();
    result
}

/// Pages in node `idx` of `level`, clipped to the first `limit` pages.
fn pages_under(level: u8, idx: u32, limit: u32) -> u64 {
    let span = u64::from(FANOUT).pow(u32::from(level));
    let first = u64::from(idx) * span;
    (first + span).min(u64::from(limit)).saturating_sub(first)
}

/// Nodes of `level` needed to cover the first `pages` pages.
fn nodes_covering(pages: u32, level: u8) -> u32 {
    let span = u64::from(FANOUT).pow(u32::from(level));
    u64::from(pages).div_ceil(span) as u32
}

/// The level the descent starts at for `pages` common pages.
fn top_level(pages: u32) -> u8 {
    let mut level = 0;
    while u64::from(nodes_covering(pages, level)) > TOP_NODES {
        level += 1;
    }
    level
}

/// Receives the next frame, turning the peer's ERROR into an error and skipping notes.
pub(super) fn recv(link: &mut dyn Link) -> Result<Frame> {
    loop {
        match link.recv()? {
            Frame::Message { text, .. } => tracing::info!(peer = %text, "peer says"),
            Frame::Error { code, message } => return Err(Error::Remote { code, message }),
            frame => return Ok(frame),
        }
    }
}

struct Sender<'a> {
    source: &'a mut dyn PageSource,
    link: &'a mut dyn Link,
    progress: &'a dyn Progress,
    lock_page: u32,
    buf: Vec<u8>,
    pages_sent: u32,
    out: PageOut<'a>,
}

impl Sender<'_> {
    /// Reads and sends page `pgno`, whose hash in this session is `hash`.
    fn page(&mut self, pgno: u32, hash: &Hash) -> Result<()> {
        if pgno != self.lock_page {
            self.source.read_page(pgno, &mut self.buf)?;
            self.out.send(self.link, pgno, hash, &self.buf)?;
            self.pages_sent += 1;
        }
        self.progress.advance(1);
        Ok(())
    }
}

/// What the origin's pass over its pages leaves for the rest of the sync.
enum Pass {
    /// Every page hash, in a tree (with its levels when a descent may ask for nodes).
    Tree(Tree),
    /// A pass by chunks against the known base: the result's chunk hashes, and the
    /// chunks that differ from the base's.
    Chunks {
        table: Vec<Hash>,
        changed: ChangedChunks,
    },
}

/// The chunks a pass by chunks found different from the base's, and their page hashes
/// (in an unlinked temporary file, chunk after chunk: memory stays flat).
struct ChangedChunks {
    chunks: Vec<u32>,
    entries: HashSpill,
}

/// The origin's pass by chunks: the base's chunk hashes against the source's, and
/// pages compared, read and sent only in the chunks that differ.
struct ChunkPass<'a> {
    source: &'a mut dyn PageSource,
    link: &'a mut dyn Link,
    progress: &'a dyn Progress,
    base: &'a mut dyn BaseManifest,
    page_size: u32,
    page_count: u32,
    pages_sent: u32,
}

impl ChunkPass<'_> {
    /// Runs the pass over `known` ([`PageSource::chunk_hashes`]): returns the chunked
    /// digest, the chunk hashes and the chunks that differ from the base's.
    ///
    /// A chunk the source knows (its pages unchanged since its record) with the base's
    /// hash is the base's: nothing of it is read or sent. Every other chunk is hashed by
    /// the source page by page and compared with the base's chunk page by page (a base
    /// chunk whose record does not hold matches nothing: all its pages go), and the pages
    /// that differ are sent. The digest is over every chunk's hash; the replica checks it
    /// against its own result, so a base that is not what this origin believes is refused
    /// there, never committed.
    fn run(&mut self, known: &[Option<Hash>]) -> Result<(Option<Hash>, Vec<Hash>, ChangedChunks)> {
        let chunks = chunk_count(self.page_count);
        if known.len() != chunks as usize {
            return Err(Error::Bug(format!(
                "the source knows {} chunks of {chunks}",
                known.len()
            )));
        }
        let temp = |e| Error::io(&std::env::temp_dir(), e);
        let base_table = self.base.chunk_hashes().to_vec();
        let lock_page = lock_byte_page(self.page_size);
        let mut digest = ChunkedDigest::new(self.page_size, self.page_count);
        let mut table = Vec::with_capacity(chunks as usize);
        let mut changed = Vec::new();
        let mut spill = HashSpill::writer().map_err(temp)?;
        let (mut theirs, mut mine) = (Vec::new(), Vec::new());
        let mut unread = Vec::new();
        let mut buf = Vec::with_capacity(self.page_size as usize);
        for idx in 0..chunks {
            let pages = chunk_pages(idx, self.page_count);
            let (first, len) = (*pages.start(), pages.end() - pages.start() + 1);
            let base_hash = base_table.get(idx as usize).copied();
            if let (Some(ours), Some(b)) = (known[idx as usize], base_hash)
                && ours == b
            {
                digest.push_chunk(&ours);
                table.push(ours);
                self.progress.advance(u64::from(len));
                continue;
            }
            theirs.clear();
            let base_holds = base_hash.is_some() && self.base.read_chunk(idx, &mut theirs)?;
            mine.clear();
            let (link, pages_sent) = (&mut *self.link, &mut self.pages_sent);
            let hash = self.source.scan_chunk(idx, &mut |pgno, hash, data| {
                if pgno != first + (mine.len() / HASH_BYTES) as u32 {
                    return Err(Error::Protocol(format!(
                        "page {pgno} of chunk {idx} came out of order"
                    )));
                }
                mine.extend_from_slice(&hash);
                let at = (pgno - first) as usize * HASH_BYTES;
                if theirs.get(at..at + HASH_BYTES) != Some(&hash[..]) && pgno != lock_page {
                    match data {
                        Some(data) => {
                            link.send_page(pgno, data)?;
                            *pages_sent += 1;
                        }
                        None => unread.push(pgno),
                    }
                }
                Ok(())
            })?;
            if mine.len() != len as usize * HASH_BYTES {
                return Err(Error::Protocol(format!(
                    "chunk {idx} of the origin has {} pages of {len}",
                    mine.len() / HASH_BYTES
                )));
            }
            for pgno in unread.drain(..) {
                self.source.read_page(pgno, &mut buf)?;
                self.link.send_page(pgno, &buf)?;
                self.pages_sent += 1;
            }
            self.progress.advance(u64::from(len));
            digest.push_chunk(&hash);
            table.push(hash);
            // A base chunk whose record did not hold is kept anew, even when its hash
            // is the same: the next push reads it whole again.
            if base_hash != Some(hash) || !base_holds {
                changed.push(idx);
                for h in mine.chunks_exact(HASH_BYTES) {
                    spill.push(h.try_into().expect("32 bytes")).map_err(temp)?;
                }
            }
        }
        self.source.chunks_done()?;
        let entries = spill.finish().map_err(temp)?;
        tracing::debug!(
            chunks,
            differ = changed.len(),
            pages_sent = self.pages_sent,
            "origin compared by chunks"
        );
        Ok((
            digest.finish(),
            table,
            ChangedChunks {
                chunks: changed,
                entries,
            },
        ))
    }
}

fn session(
    source: &mut dyn PageSource,
    link: &mut dyn Link,
    progress: &dyn Progress,
    started: Instant,
    options: OriginOptions<'_>,
) -> Result<SyncStats> {
    let page_size = source.page_size();
    let page_count = source.page_count();
    let OriginOptions {
        base,
        manifest,
        chunked_digest,
        sealing,
    } = options;
    let seal_key = match &sealing {
        Some(Sealing::Seal { key, .. }) => Some(*key),
        _ => None,
    };
    // A sealing origin's plaintext digest 1, for the seal: made during its one pass.
    let mut plain_digest = seal_key.map(|_| Digest::new(page_size, page_count));
    let mut out = PageOut {
        sealing: sealing.as_ref(),
        page_size,
        buf: Vec::new(),
    };
    let form = match chunked_digest {
        true => DigestForm::Chunked,
        false => DigestForm::One,
    };
    let mut flags = if base.is_some() { FLAG_KNOWN_BASE } else { 0 };
    if chunked_digest {
        flags |= FLAG_CHUNKED_DIGEST;
    }
    if sealing.is_some() {
        flags |= FLAG_SEALED;
    }
    link.send(&Frame::Begin {
        version: PROTOCOL_VERSION,
        page_size,
        page_count,
        base_version: base.as_ref().map_or(0, |b| b.version),
        flags,
    })?;

    let replica_count = match recv(link)? {
        Frame::Ready { page_count } => page_count,
        other => {
            return Err(Error::Protocol(format!(
                "expected READY, got {}",
                other.name()
            )));
        }
    };
    let lock_page = lock_byte_page(page_size);
    // A known base is only as good as the replica's agreement with it.
    let mut base = base.filter(|b| b.page_size == page_size && b.page_count == replica_count);
    let base_known = base.is_some();
    if base_known {
        tracing::debug!("base manifest known: no hash exchange");
    }
    // With a known base every page is compared during the pass; without, the pages the
    // replica lacks are sent during the pass and the rest is found by the descent.
    let common = if base.is_some() {
        0
    } else {
        page_count.min(replica_count)
    };
    // With the chunked digest, a source that knows its chunks is compared with the
    // base by chunks: only the chunks that differ are read, and no tree is built.
    let known_chunks = match (&base, form) {
        (Some(_), DigestForm::Chunked) if sealing.is_none() => source.chunk_hashes()?,
        _ => None,
    };

    // One pass over the source: hash every page, and send the pages the replica does
    // not have, or that differ from the known base, as they go by.
    progress.start(Phase::Hashing, u64::from(page_count), page_size);
    let mut pages_sent = 0u32;
    // Pages the pass wanted to send but got no bytes of (page runs would be smaller;
    // a source sends bytes for every page it read, so this stays short).
    let mut unread: Vec<(u32, Hash)> = Vec::new();
    let (pass, digest) = match (known_chunks, base.as_mut()) {
        (Some(known), Some(b)) => {
            tracing::debug!(
                "base manifest and source chunks known: only differing chunks are read"
            );
            let mut chunks = ChunkPass {
                source: &mut *source,
                link: &mut *link,
                progress,
                base: &mut *b.hashes,
                page_size,
                page_count,
                pages_sent: 0,
            };
            let (digest, table, changed) = chunks.run(&known)?;
            pages_sent = chunks.pages_sent;
            (Pass::Chunks { table, changed }, digest)
        }
        (_, b) => {
            let mut base_pages = b.map(|b| BasePages {
                page_count: b.page_count,
                base: &mut *b.hashes,
                chunk: None,
                buf: Vec::new(),
            });
            let wants_data = |pgno: u32| pgno > common;
            let mut hashed = 0u64;
            // With a known base no node is ever asked for: the pages and the digest
            // suffice.
            let (tree, digest) = Tree::build_with(
                page_size,
                page_count,
                !base_known,
                form,
                |f| {
                    source.scan(common, &mut |pgno, hash, data| {
                        // A sealing origin compares, sends and builds its tree on
                        // identities; its plaintext hashes make the seal's digest 1.
                        let hash = match seal_key {
                            Some(key) => {
                                if let Some(d) = plain_digest.as_mut() {
                                    d.push(&hash);
                                }
                                key.page_identity(&hash)
                            }
                            None => hash,
                        };
                        let differs = match &mut base_pages {
                            Some(b) => b.hash(pgno)? != Some(hash),
                            None => true,
                        };
                        if differs && pgno != lock_page {
                            match data {
                                Some(data) => {
                                    out.send(link, pgno, &hash, data)?;
                                    pages_sent += 1;
                                }
                                // A source that did not read this page (its hash was
                                // known) sends it after the pass.
                                None if wants_data(pgno) => unread.push((pgno, hash)),
                                None => {}
                            }
                        }
                        f(pgno, hash)
                    })
                },
                || {
                    // Progress in batches: a call per page costs a clock read each in
                    // the bar, which was 8% of a no-change push of 1 GiB.
                    hashed += 1;
                    if hashed.is_multiple_of(PROGRESS_BATCH) {
                        progress.advance(PROGRESS_BATCH);
                    }
                },
            )?;
            progress.advance(hashed % PROGRESS_BATCH);
            (Pass::Tree(tree), digest)
        }
    };
    let digest = digest
        .ok_or_else(|| Error::Protocol("the origin's page count changed while hashing".into()))?;
    let mut hash_bytes = 0u64;

    progress.start(Phase::Sending, u64::from(common), page_size);
    let mut tx = Sender {
        source,
        link,
        progress,
        lock_page,
        buf: Vec::with_capacity(page_size as usize),
        pages_sent,
        out,
    };
    for (pgno, hash) in unread {
        tx.page(pgno, &hash)?;
    }

    // Descent: a queue of node runs to ask for, answered in order, pipelined up to the
    // window. Adjacent runs of one level merge, so a region of many changes costs one
    // run, not one request per node.
    let mut pending: VecDeque<(u8, Run)> = VecDeque::new();
    if common > 0 {
        let top = top_level(common);
        pending.push_back((
            top,
            Run {
                start: 0,
                count: nodes_covering(common, top),
            },
        ));
    }
    let mut outstanding = 0u32;
    let mut mine = Vec::new();
    let mut pass = pass;
    loop {
        while outstanding < WINDOW_NODES {
            let Some(&(level, _)) = pending.front() else {
                break;
            };
            let mut runs = Vec::new();
            while runs.len() < MAX_RUNS_PER_FRAME && outstanding < WINDOW_NODES {
                match pending.front_mut() {
                    Some((l, run)) if *l == level => {
                        let take = run.count.min(WINDOW_NODES - outstanding);
                        runs.push(Run {
                            start: run.start,
                            count: take,
                        });
                        outstanding += take;
                        if take == run.count {
                            pending.pop_front();
                        } else {
                            run.start += take;
                            run.count -= take;
                        }
                    }
                    _ => break,
                }
            }
            let frame = Frame::Want { level, runs };
            hash_bytes += frame.to_bytes().len() as u64;
            tx.link.send(&frame)?;
        }
        if outstanding == 0 {
            break;
        }
        let frame = recv(tx.link)?;
        // Only a descent asks for nodes, and only the pass with a tree has one.
        let Pass::Tree(tree) = &mut pass else {
            return Err(Error::Bug("a descent without a hash tree".into()));
        };
        let Frame::Nodes {
            level,
            start,
            hashes,
        } = frame
        else {
            return Err(Error::Protocol(format!(
                "expected NODES, got {}",
                frame.name()
            )));
        };
        let n = hashes.len() as u32;
        if n > outstanding || start.checked_add(n).is_none_or(|end| end > tree.len(level)) {
            return Err(Error::Protocol(format!(
                "NODES for level {level} from {start} were not asked for"
            )));
        }
        hash_bytes += 8 + u64::from(n) * 32;
        outstanding -= n;
        mine.clear();
        tree.nodes(level, start, n, &mut mine)?;
        for (j, (a, b)) in mine.iter().zip(&hashes).enumerate() {
            let idx = start + j as u32;
            if level == 0 {
                if a != b {
                    tx.page(idx + 1, a)?;
                } else {
                    progress.advance(1);
                }
            } else if a == b {
                progress.advance(pages_under(level, idx, common));
            } else {
                let child = level - 1;
                let first = idx * FANOUT;
                let count = FANOUT.min(nodes_covering(common, child) - first);
                match pending.back_mut() {
                    Some((l, run)) if *l == child && run.start + run.count == first => {
                        run.count += count
                    }
                    _ => pending.push_back((
                        child,
                        Run {
                            start: first,
                            count,
                        },
                    )),
                }
            }
        }
    }

    let pages_sent = tx.pages_sent;
    // Last word before COMMIT: the replica is still writing the pages sent.
    tx.source.check()?;
    let plaintext_digest = match plain_digest {
        Some(d) => Some(d.finish().ok_or_else(|| {
            Error::Protocol("the origin's page count changed while hashing".into())
        })?),
        None => None,
    };
    match &sealing {
        None => {}
        Some(Sealing::Seal {
            key,
            replica,
            version,
            message,
        }) => {
            let facts = Facts {
                page_size,
                page_count,
                digest: plaintext_digest.expect("a sealing origin makes digest 1"),
                identity_form: form,
                identity_digest: digest,
                message: (*message).to_owned(),
            };
            let sealed = key.seal_version(replica, *version, &facts.encode())?;
            link.send(&Frame::Seal { sealed })?;
        }
        Some(Sealing::Relay { seal }) => link.send(&Frame::Seal {
            sealed: seal.clone(),
        })?,
    }
    link.send(&Frame::Commit { page_count, digest })?;
    match recv(link)? {
        Frame::Done { digest: theirs, .. } if theirs == digest => {}
        Frame::Done { digest: theirs, .. } => {
            return Err(Error::Verification(format!(
                "replica committed digest {} but the origin's is {}",
                hex(&theirs),
                hex(&digest)
            )));
        }
        other => {
            return Err(Error::Protocol(format!(
                "expected DONE, got {}",
                other.name()
            )));
        }
    }
    // With a known base and nothing sent, the synced hashes are the base's: the caller
    // keeps what it has (a no-change push reads and writes no manifest).
    match pass {
        Pass::Tree(mut tree) => {
            // A database that only shrank sends no page either, but its manifest is
            // no longer the base's.
            let same_as_base =
                pages_sent == 0 && base.as_ref().is_some_and(|b| b.page_count == page_count);
            if let Some(keep) = manifest.filter(|_| !same_as_base) {
                keep(
                    page_size,
                    page_count,
                    Synced::Pages(&mut tree.leaves(page_count)?),
                )?;
            }
        }
        Pass::Chunks { table, changed } => {
            let same_as_base = changed.chunks.is_empty()
                && base.as_ref().is_some_and(|b| {
                    b.page_count == page_count && b.hashes.chunk_hashes() == table
                });
            if let Some(keep) = manifest.filter(|_| !same_as_base) {
                let io = |e| Error::io(&std::env::temp_dir(), e);
                let mut at = 0u32;
                let mut entries = changed.chunks.iter().map(|&idx| {
                    let len = chunk_pages(idx, page_count).count() as u32;
                    let mut out = Vec::with_capacity(len as usize);
                    changed.entries.read_at(at, len, &mut out).map_err(io)?;
                    at += len;
                    Ok((idx, out.concat()))
                });
                keep(
                    page_size,
                    page_count,
                    Synced::Chunks {
                        table: &table,
                        changed: &mut entries,
                    },
                )?;
            }
        }
    }
    Ok(SyncStats {
        page_size,
        pages_total: page_count,
        pages_sent,
        bytes_sent: link.bytes_sent(),
        bytes_received: link.bytes_received(),
        hash_bytes,
        duration: started.elapsed(),
        digest: digest_text(form, &digest),
        plaintext_digest: plaintext_digest.map(|d| hex(&d)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descent_starts_low_enough_to_be_small() {
        assert_eq!(top_level(1), 0);
        assert_eq!(top_level(256), 0);
        assert_eq!(top_level(257), 1);
        assert_eq!(top_level(4096), 1);
        assert_eq!(top_level(4097), 2);
        assert_eq!(top_level(u32::MAX), 6);
    }

    #[test]
    fn coverage_is_clipped() {
        assert_eq!(pages_under(0, 4, 10), 1);
        assert_eq!(pages_under(1, 0, 10), 10);
        assert_eq!(pages_under(1, 1, 40), 16);
        assert_eq!(pages_under(1, 2, 40), 8);
        assert_eq!(pages_under(2, 3, 40), 0);
        assert_eq!(nodes_covering(17, 1), 2);
        assert_eq!(nodes_covering(0, 1), 0);
    }
}
