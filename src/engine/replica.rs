//! The replica role: reports what it holds, answers the origin's hash requests, writes
//! the pages it is sent, and commits only when the result has the origin's digest.
//!
//! Invariants: every frame is checked against the session (no BEGIN flag this side does
//! not know, page numbers in range, each page at most once, pages of the session's size,
//! hashes only for nodes that exist); any violation ends the session with nothing
//! committed. Since each page is written at most once, every page written is part of the
//! result whose digest is checked: a peer cannot make the target keep pages that the
//! committed result does not use. A WANT that would leave more than the window of node
//! hashes unread by the origin is refused, so a peer that asks without reading costs a
//! bounded queue. Every page is hashed as it is written; before COMMIT
//! every page past the replica's old end must have arrived, and the digest over all
//! page hashes, old and new, must equal the origin's.
//!
//! With the chunked digest and a known base, a target that keeps its chunk hashes
//! ([`PageTarget::held_chunks`]) is not read until it must be: no tree is built unless a
//! WANT comes (then it is built as it would have been at BEGIN, with the pages received
//! so far set in it); at COMMIT the chunks no page was sent for keep their hash, and
//! each other chunk is made of its held page hashes (checked against the held chunk's
//! hash first) and the hashes of the pages received. The digest over those chunk
//! hashes must equal the origin's, as above.
//!
//! In a sealed session ([`FLAG_SEALED`]) pages come as SPAGE and the version's seal as
//! SEAL before COMMIT; PAGE is refused, as are SPAGE and SEAL in any other session. A
//! replica with the key ([`Opening`]) opens each page under the identity it came with,
//! recomputes that identity from the plaintext ([`super::opener`]), writes the
//! plaintext, and at COMMIT opens the seal (bound to the replica and version it asked
//! for) and checks its digest over plaintext page hashes against the result's, and its
//! digest over identities against the origin's, before the target commits.
//! A replica without one hands the sealed bytes to a target that keeps them
//! ([`PageTarget::keeps_sealed`]), or refuses the session before writing anything.

use super::opener::{Opened, Opener};
use super::origin::{FLAG_CHUNKED_DIGEST, FLAG_KNOWN_BASE, recv};
use super::seal::{FLAG_SEALED, Facts, Opening};
use super::tree::Tree;
use super::{BeginInfo, Chunk, Link, PageTarget, Phase, Progress, WINDOW_NODES};
use crate::digest::{
    ChunkedDigest, DigestForm, HASH_BYTES, Hash, HashSpill, chunk_count, chunk_pages, hex,
    lock_byte_page, page_hash, sha256, zero_page_hash,
};
use crate::protocol::{ErrorCode, Frame, MAX_NODES_PER_FRAME, PROTOCOL_VERSION, SEAL_OVERHEAD};
use crate::{Error, Result};

/// What the replica side of a finished sync did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaDone {
    /// Page size of the result.
    pub page_size: u32,
    /// Page count of the result.
    pub page_count: u32,
    /// Pages written.
    pub pages_written: u32,
    /// Bytes of hash-tree traffic, both directions (WANT and NODES frames).
    pub hash_bytes: u64,
    /// The digest verified before commit, in the session's form.
    pub digest: Hash,
    /// The form of `digest`.
    pub form: DigestForm,
    /// A replica that opened a sealed session ([`Opening`]): the version's facts, as
    /// its seal holds them and as checked (digest 1 over the plaintext, the commit
    /// message). `None` for every other session.
    pub opened: Option<Facts>,
}

/// Runs the replica side of one sync over `link`.
pub fn run(target: &mut dyn PageTarget, link: &mut dyn Link) -> Result<ReplicaDone> {
    run_with(target, link, &super::NoProgress)
}

/// Runs the replica side of one sync over `link`, reporting pages as they are written.
pub fn run_with(
    target: &mut dyn PageTarget,
    link: &mut dyn Link,
    progress: &dyn Progress,
) -> Result<ReplicaDone> {
    run_opening(target, link, progress, None)
}

/// Runs the replica side of one sync over `link`, opening a sealed session with
/// `opening`'s key: a sealed session is then required (a plaintext one is refused
/// before anything is written), and the target is handed plaintext pages and their page
/// hashes as in any other session.
pub fn run_opening(
    target: &mut dyn PageTarget,
    link: &mut dyn Link,
    progress: &dyn Progress,
    opening: Option<Opening<'_>>,
) -> Result<ReplicaDone> {
    let result = session(target, link, progress, opening.as_ref());
    progress.finish();
    if let Err(e) = &result
        && !matches!(e, Error::Remote { .. } | Error::Disconnected(_))
    {
        let _ = link.send(&Frame::Error {
            code: ErrorCode::for_kind(e.kind()) as u16,
            message: e.to_string(),
        });
    }
    result
}

/// One bit per page: which pages this session wrote.
struct Written(Vec<u64>);

impl Written {
    fn new(pages: u32) -> Self {
        Written(vec![0; (pages as usize).div_ceil(64)])
    }
    fn set(&mut self, pgno: u32) {
        let i = (pgno - 1) as usize;
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn get(&self, pgno: u32) -> bool {
        let i = (pgno - 1) as usize;
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
    /// Whether any page of `pages` was written (a word at a time: asked of every
    /// chunk of the database at COMMIT).
    fn any(&self, pages: std::ops::RangeInclusive<u32>) -> bool {
        crate::digest::any_page_set(&self.0, pages)
    }
}

fn temp_error(e: std::io::Error) -> Error {
    Error::io(&std::env::temp_dir(), e)
}

/// What the chunk path knows at COMMIT.
struct Chunks<'a> {
    page_size: u32,
    page_count: u32,
    held: u32,
    /// The held chunks' hashes, from the target.
    held_chunks: &'a [Hash],
    written: &'a Written,
    /// The hashes of the pages received.
    received: &'a mut Tree,
}

impl Chunks<'_> {
    /// Chunk `idx` of the result: held as it is when no page of it was sent and it
    /// covers the same pages, else made of its held page hashes (checked against the
    /// held chunk's hash) and the pages received.
    fn chunk(&mut self, target: &mut dyn PageTarget, idx: u32) -> Result<Chunk> {
        let pages = chunk_pages(idx, self.page_count);
        let held_pages = chunk_pages(idx, self.held);
        if held_pages == pages && !self.written.any(pages.clone()) {
            return Ok(Chunk::Held {
                idx,
                hash: self.held_chunks[idx as usize],
            });
        }
        let mut base = Vec::new();
        if !held_pages.is_empty() {
            target.held_chunk(idx, &mut base)?;
            if base.len() != held_pages.clone().count() * HASH_BYTES
                || sha256(&base) != self.held_chunks[idx as usize]
            {
                return Err(Error::Verification(format!(
                    "the replica's chunk {idx} of page hashes does not match its hash; nothing was committed"
                )));
            }
        }
        let lock_page = lock_byte_page(self.page_size);
        let mut hashes = Vec::with_capacity(pages.clone().count() * HASH_BYTES);
        for pgno in pages.clone() {
            if self.written.get(pgno) {
                hashes.extend_from_slice(&self.received.leaf(pgno)?);
            } else if held_pages.contains(&pgno) {
                let at = (pgno - held_pages.start()) as usize * HASH_BYTES;
                hashes.extend_from_slice(&base[at..at + HASH_BYTES]);
            } else if pgno == lock_page {
                hashes.extend_from_slice(&zero_page_hash(self.page_size));
            } else {
                return Err(Error::Protocol(format!("page {pgno} was never sent")));
            }
        }
        Ok(Chunk::New {
            idx,
            hash: sha256(&hashes),
            hashes,
        })
    }
}

/// Opens the version's seal for the replica and version `o` asked for, and checks
/// that its facts are of the session's size: page size and page count. A seal that
/// does not open was changed, moved from another version or replica, or made with
/// another key; facts of another size belong to another version than the pages sent
/// (a shortened or replayed manifest). Either is a verification error. Its digests are
/// for the caller to check.
fn open_seal(o: &Opening<'_>, seal: &[u8], page_size: u32, page_count: u32) -> Result<Facts> {
    let facts = Facts::decode(&o.key.open_version(o.replica, o.version, seal)?)?;
    if (facts.page_size, facts.page_count) != (page_size, page_count) {
        return Err(Error::Verification(format!(
            "the seal of version {} of {} names {} pages of {} bytes, but the pages sent \
             make {page_count} pages of {page_size} bytes; nothing was committed",
            o.version, o.replica, facts.page_count, facts.page_size
        )));
    }
    Ok(facts)
}

/// Writes a page the [`Opener`] opened and checked, and keeps its plaintext hash for
/// the seal's digest.
fn write_opened(target: &mut dyn PageTarget, plain: &mut Tree, page: Opened) -> Result<()> {
    target.write_page(page.pgno, page.data, &page.hash)?;
    plain.set_leaf(page.pgno, &page.hash)
}

fn session(
    target: &mut dyn PageTarget,
    link: &mut dyn Link,
    progress: &dyn Progress,
    opening: Option<&Opening<'_>>,
) -> Result<ReplicaDone> {
    let begin = match recv(link)? {
        Frame::Begin {
            version,
            page_size,
            page_count,
            base_version,
            flags,
        } => {
            if version != PROTOCOL_VERSION {
                return Err(Error::Protocol(format!(
                    "the origin speaks protocol version {version}; this side speaks {PROTOCOL_VERSION}"
                )));
            }
            // Unknown bits would mean a promise this side cannot keep: refuse them
            // rather than guess.
            let known = FLAG_KNOWN_BASE | FLAG_CHUNKED_DIGEST | FLAG_SEALED;
            if flags & !known != 0 {
                return Err(Error::Protocol(format!(
                    "BEGIN flags {flags:#04x} set bits this side does not know (known: {known:#04x})"
                )));
            }
            BeginInfo {
                page_size,
                page_count,
                base_version,
                known_base: flags & FLAG_KNOWN_BASE != 0,
                chunked_digest: flags & FLAG_CHUNKED_DIGEST != 0,
                sealed: flags & FLAG_SEALED != 0,
            }
        }
        other => {
            return Err(Error::Protocol(format!(
                "expected BEGIN, got {}",
                other.name()
            )));
        }
    };
    let (page_size, page_count) = (begin.page_size, begin.page_count);
    if page_count == 0 {
        return Err(Error::Protocol("BEGIN with zero pages".into()));
    }
    if begin.chunked_digest && !target.speaks_chunked_digest() {
        return Err(Error::Protocol(
            "the origin asked for the chunked digest, which this side did not offer or \
             agree to (a database file, and a server session whose CONFIG did not name \
             it, check digest 1); nothing was written"
                .into(),
        ));
    }
    match (begin.sealed, opening) {
        (true, None) if !target.keeps_sealed() => {
            // Worded for both sides it can happen on: a client pulling without the
            // replica's key, and a side (a server) that keeps no encrypted replica.
            return Err(Error::Auth(
                "the origin sealed its pages (an encrypted replica), and this side has no \
                 key to open them (--encryption-key-file, --passphrase-file or \
                 SQLFERRY_ENCRYPTION_KEY; in a daemon entry encryption_key_file or \
                 passphrase_file) and keeps no sealed pages; nothing was written"
                    .into(),
            ));
        }
        (false, Some(o)) => {
            return Err(Error::Auth(format!(
                "version {} of {} is not encrypted, and this side expected it sealed with key id {}; nothing was written",
                o.version,
                o.replica,
                o.key.id()
            )));
        }
        _ => {}
    }
    let held = target.begin(&begin)?;
    progress.start(Phase::Receiving, 0, page_size);
    // READY goes before hashing: the origin can then hash its own pages at the same
    // time and send the pages past `held` as it reads them.
    link.send(&Frame::Ready { page_count: held })?;
    let form = match begin.chunked_digest {
        true => DigestForm::Chunked,
        false => DigestForm::One,
    };
    // With the chunked digest and a known base, a target that keeps its chunk hashes is
    // read only where pages come (and wholly only if a WANT comes).
    let held_chunks = match begin.known_base && begin.chunked_digest && !begin.sealed {
        true => target.held_chunks()?,
        false => None,
    };
    if let Some(chunks) = &held_chunks
        && chunks.len() as u32 != chunk_count(held)
    {
        return Err(Error::Bug(format!(
            "the target holds {held} pages in {} chunks",
            chunks.len()
        )));
    }
    // With a known base the origin asks for no node unless it finds the replica is not
    // that base: the levels above the pages (a SHA-256 over every 16 page hashes) are
    // then built at the first WANT, before any page the build hashed was written (the
    // origin sends only pages past them before its descent starts).
    // A replica that opens a sealed session builds its tree on identities, and keeps
    // the plaintext page hashes beside it for the digest 1 the seal names.
    let key = opening.map(|o| o.key);
    let mut plain = match key {
        Some(_) => Some(Tree::sparse()?),
        None => None,
    };
    let mut tree = match held_chunks {
        Some(_) => Tree::sparse()?,
        None => {
            Tree::build_with(
                page_size,
                held,
                !begin.known_base,
                form,
                |f| match (key, plain.as_mut()) {
                    (Some(key), Some(plain)) => target.hashes(&mut |pgno, hash| {
                        plain.set_leaf(pgno, &hash)?;
                        f(pgno, key.page_identity(&hash))
                    }),
                    _ => target.hashes(f),
                },
                || {},
            )?
            .0
        }
    };
    let mut seal: Option<Vec<u8>> = None;
    // Whether `tree` holds the held pages' hashes (not only the pages received).
    let mut built = held_chunks.is_none();

    let lock_page = lock_byte_page(page_size);
    let mut written = Written::new(page_count);
    let mut pages_written = 0u32;
    let mut hash_bytes = 0u64;
    let mut hashes = Vec::new();
    // Sealed pages are opened and hashed on a thread of their own ([`Opener`]); every
    // page it holds is written before any other frame is handled.
    let mut opener = match (key, begin.sealed) {
        (Some(key), true) => Some(Opener::start(key, page_size)?),
        _ => None,
    };
    loop {
        let frame = recv(link)?;
        if let (Some(opener), Some(plain)) = (opener.as_mut(), plain.as_mut())
            && !matches!(frame, Frame::SealedPage { .. })
        {
            opener.finish(&mut |page| write_opened(target, plain, page))?;
        }
        match frame {
            Frame::Want { level, runs } => {
                if !built {
                    // The origin did not use its base after all: the tree as it would
                    // have been built at BEGIN, with the pages received since.
                    let (mut full, _) = Tree::build_with(
                        page_size,
                        held,
                        false,
                        form,
                        |f| target.hashes(f),
                        || {},
                    )?;
                    for pgno in (1..=page_count).filter(|&p| written.get(p)) {
                        full.set_leaf(pgno, &tree.leaf(pgno)?)?;
                    }
                    tree = full;
                    built = true;
                }
                tree.build_levels()?;
                hash_bytes += 4 + 8 * runs.len() as u64;
                // The receiver enforces the window: hashes not yet handed to the network
                // cannot have reached the origin, so with this WANT's they are what it
                // asked for and still waits for, at least.
                let asked: u64 = runs.iter().map(|r| u64::from(r.count)).sum();
                let unsent = u64::from(link.unsent_nodes());
                if unsent + asked > u64::from(WINDOW_NODES) {
                    return Err(Error::Protocol(format!(
                        "WANT for {asked} node hashes while {unsent} are still unread: \
                         more than the window of {WINDOW_NODES}"
                    )));
                }
                for run in runs {
                    let end = run.start + run.count; // no overflow: the codec checked it
                    if end > tree.len(level) {
                        return Err(Error::Protocol(format!(
                            "WANT for nodes {}..{end} of level {level}, which has {}",
                            run.start,
                            tree.len(level)
                        )));
                    }
                    let mut start = run.start;
                    while start < end {
                        let n = (end - start).min(MAX_NODES_PER_FRAME as u32);
                        hashes.clear();
                        tree.nodes(level, start, n, &mut hashes)?;
                        hash_bytes += 8 + u64::from(n) * 32;
                        link.send(&Frame::Nodes {
                            level,
                            start,
                            hashes: std::mem::take(&mut hashes),
                        })?;
                        start += n;
                    }
                }
            }
            Frame::Page { .. } if begin.sealed => {
                return Err(Error::Protocol(
                    "PAGE frame in a sealed session (the pages of an encrypted replica travel sealed)".into(),
                ));
            }
            Frame::SealedPage { .. } | Frame::Seal { .. } if !begin.sealed => {
                return Err(Error::Protocol(
                    "SPAGE or SEAL frame outside a sealed session".into(),
                ));
            }
            Frame::Seal { .. } if seal.is_some() => {
                return Err(Error::Protocol("a second SEAL frame".into()));
            }
            Frame::Seal { sealed } => seal = Some(sealed),
            Frame::SealedPage {
                pgno,
                identity,
                sealed,
            } => {
                if sealed.len() != page_size as usize + SEAL_OVERHEAD {
                    return Err(Error::Protocol(format!(
                        "sealed page {pgno} has {} bytes; this session's sealed pages have {}",
                        sealed.len(),
                        page_size as usize + SEAL_OVERHEAD
                    )));
                }
                if pgno > page_count || pgno == lock_page {
                    return Err(Error::Protocol(format!(
                        "page {pgno} is outside the database"
                    )));
                }
                if written.get(pgno) {
                    return Err(Error::Protocol(format!("page {pgno} was sent twice")));
                }
                match (opener.as_mut(), plain.as_mut()) {
                    // Opened under the identity it came with, and its identity made
                    // again from the plaintext (`opener::open_batch`); written when
                    // it comes back.
                    (Some(opener), Some(plain)) => {
                        written.set(pgno);
                        opener.add((pgno, identity, sealed), &mut |page| {
                            write_opened(target, plain, page)
                        })?;
                    }
                    // A store keeps what it cannot read, under the identity it came
                    // with: the side that opens it checks both.
                    _ => {
                        written.set(pgno);
                        target.write_page(pgno, sealed, &identity)?;
                    }
                }
                pages_written += 1;
                progress.advance(1);
                tree.set_leaf(pgno, &identity)?;
            }
            Frame::Page { pgno, data } => {
                if data.len() != page_size as usize {
                    return Err(Error::Protocol(format!(
                        "page {pgno} has {} bytes; this session's pages have {page_size}",
                        data.len()
                    )));
                }
                if pgno > page_count || pgno == lock_page {
                    return Err(Error::Protocol(format!(
                        "page {pgno} is outside the database"
                    )));
                }
                // A page sent twice would leave the first copy written but unused.
                if written.get(pgno) {
                    return Err(Error::Protocol(format!("page {pgno} was sent twice")));
                }
                written.set(pgno);
                pages_written += 1;
                progress.advance(1);
                // Hashed here, on the thread that writes it: the hash of the bytes
                // handed to the target is what the digest checks. With SHA-NI this
                // costs less than handing each page to another thread and back did.
                let hash = page_hash(pgno, &data);
                target.write_page(pgno, data, &hash)?;
                tree.set_leaf(pgno, &hash)?;
            }
            Frame::Commit {
                page_count: final_count,
                digest,
            } => {
                if final_count != page_count {
                    return Err(Error::Protocol(format!(
                        "COMMIT for {final_count} pages after BEGIN for {page_count}"
                    )));
                }
                if begin.sealed && seal.is_none() {
                    return Err(Error::Protocol(
                        "COMMIT of a sealed session without the version's SEAL".into(),
                    ));
                }
                for pgno in held + 1..=page_count {
                    if written.get(pgno) {
                        continue;
                    } else if pgno == lock_page {
                        if let (Some(key), Some(plain)) = (key, plain.as_mut()) {
                            let zero = zero_page_hash(page_size);
                            plain.set_leaf(pgno, &zero)?;
                            if built {
                                tree.set_leaf(pgno, &key.page_identity(&zero))?;
                            }
                        } else if built {
                            tree.set_leaf(pgno, &zero_page_hash(page_size))?;
                        }
                    } else {
                        return Err(Error::Protocol(format!("page {pgno} was never sent")));
                    }
                }
                let mut opened = None;
                let mismatch = |ours: &Hash| {
                    Error::Verification(format!(
                        "the replica's result has digest {} but the origin's is {}; nothing was committed",
                        hex(ours),
                        hex(&digest)
                    ))
                };
                let ours = match &held_chunks {
                    Some(held_chunks) if !built => {
                        let mut chunks = Chunks {
                            page_size,
                            page_count,
                            held,
                            held_chunks,
                            written: &written,
                            received: &mut tree,
                        };
                        // First the digest, keeping the chunks made on the way (in a
                        // temporary file, 32 bytes a page of the chunks made); then
                        // the commit, reading them back.
                        let mut made = HashSpill::writer().map_err(temp_error)?;
                        let mut order = Vec::new();
                        let mut d = ChunkedDigest::new(page_size, page_count);
                        for idx in 0..chunk_count(page_count) {
                            let chunk = chunks.chunk(target, idx)?;
                            d.push_chunk(chunk.hash());
                            match chunk {
                                Chunk::Held { .. } => order.push((idx, None)),
                                Chunk::New { hash, hashes, .. } => {
                                    let first = made.len();
                                    for h in hashes.chunks_exact(HASH_BYTES) {
                                        made.push(h.try_into().expect("32-byte slices"))
                                            .map_err(temp_error)?;
                                    }
                                    order.push((idx, Some((hash, first, made.len() - first))));
                                }
                            }
                        }
                        let ours = d.finish().expect("one hash a chunk was pushed");
                        if ours != digest {
                            return Err(mismatch(&ours));
                        }
                        let made = made.finish().map_err(temp_error)?;
                        let mut out = order.into_iter().map(|(idx, new)| match new {
                            None => Ok(Chunk::Held {
                                idx,
                                hash: held_chunks[idx as usize],
                            }),
                            Some((hash, first, count)) => {
                                let mut hashes = Vec::with_capacity(count as usize);
                                made.read_at(first, count, &mut hashes)
                                    .map_err(temp_error)?;
                                Ok(Chunk::New {
                                    idx,
                                    hash,
                                    hashes: hashes.concat(),
                                })
                            }
                        });
                        target.commit_chunks(page_count, &ours, &mut out)?;
                        ours
                    }
                    _ => match (opening, plain.as_mut(), seal) {
                        // A replica that opens the version checks the result by its
                        // plaintext: digest 1 over its page hashes must be the seal's,
                        // which the key that sealed it vouches for. Each identity is
                        // the HMAC of a page hash under that key, so the result's
                        // identities are then the version's. Where the seal names its
                        // digest over identities in the origin's form, that must be the
                        // origin's, and the result's is made from the tree only where
                        // the forms differ (a pull asks for digest 1 of a version pushed
                        // with the chunked digest): one digest over identities at most.
                        (Some(o), Some(plain), Some(seal)) => {
                            let facts = open_seal(o, &seal, page_size, page_count)?;
                            if facts.identity_form == form {
                                if facts.identity_digest != digest {
                                    return Err(Error::Verification(format!(
                                        "the seal of version {} of {} names identity digest {}, but the origin's is {}; nothing was committed",
                                        o.version,
                                        o.replica,
                                        hex(&facts.identity_digest),
                                        hex(&digest)
                                    )));
                                }
                            } else {
                                let ours = tree.digest(form, page_size, page_count)?;
                                if ours != digest {
                                    return Err(mismatch(&ours));
                                }
                            }
                            let plain_digest =
                                plain.digest(DigestForm::One, page_size, page_count)?;
                            if plain_digest != facts.digest {
                                return Err(Error::Verification(format!(
                                    "the pages of version {} of {} have digest {}, but its seal names {}; nothing was committed",
                                    o.version,
                                    o.replica,
                                    hex(&plain_digest),
                                    hex(&facts.digest)
                                )));
                            }
                            target.commit(
                                page_count,
                                &plain_digest,
                                &mut plain.leaves(page_count)?,
                            )?;
                            opened = Some(facts);
                            // Checked above to be the result's, one way or the other.
                            digest
                        }
                        (_, _, seal) => {
                            let ours = tree.digest(form, page_size, page_count)?;
                            if ours != digest {
                                return Err(mismatch(&ours));
                            }
                            if let Some(seal) = seal {
                                target.keep_seal(seal)?;
                            }
                            target.commit(page_count, &ours, &mut tree.leaves(page_count)?)?;
                            ours
                        }
                    },
                };
                link.send(&Frame::Done {
                    pages_written,
                    digest: ours,
                })?;
                return Ok(ReplicaDone {
                    page_size,
                    page_count,
                    pages_written,
                    hash_bytes,
                    digest: ours,
                    form,
                    opened,
                });
            }
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected {} frame",
                    other.name()
                )));
            }
        }
    }
}
