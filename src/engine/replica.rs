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

use super::origin::{FLAG_KNOWN_BASE, recv};
use super::tree::Tree;
use super::{BeginInfo, Link, PageTarget, Phase, Progress, WINDOW_NODES};
use crate::digest::{Hash, hex, lock_byte_page, page_hash, zero_page_hash};
use crate::protocol::{ErrorCode, Frame, MAX_NODES_PER_FRAME, PROTOCOL_VERSION};
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
    /// The digest verified before commit.
    pub digest: Hash,
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
    let result = session(target, link, progress);
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
}

fn session(
    target: &mut dyn PageTarget,
    link: &mut dyn Link,
    progress: &dyn Progress,
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
            if flags & !FLAG_KNOWN_BASE != 0 {
                return Err(Error::Protocol(format!(
                    "BEGIN flags {flags:#04x} set bits this side does not know (known: {FLAG_KNOWN_BASE:#04x})"
                )));
            }
            BeginInfo {
                page_size,
                page_count,
                base_version,
                known_base: flags & FLAG_KNOWN_BASE != 0,
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
    let held = target.begin(&begin)?;
    progress.start(Phase::Receiving, 0, page_size);
    // READY goes before hashing: the origin can then hash its own pages at the same
    // time and send the pages past `held` as it reads them.
    link.send(&Frame::Ready { page_count: held })?;
    // With a known base the origin asks for no node unless it finds the replica is not
    // that base: the levels above the pages (a SHA-256 over every 16 page hashes) are
    // then built at the first WANT, before any page the build hashed was written (the
    // origin sends only pages past them before its descent starts).
    let (mut tree, _) = Tree::build_with(
        page_size,
        held,
        !begin.known_base,
        |f| target.hashes(f),
        || {},
    )?;

    let lock_page = lock_byte_page(page_size);
    let mut written = Written::new(page_count);
    let mut pages_written = 0u32;
    let mut hash_bytes = 0u64;
    let mut hashes = Vec::new();
    loop {
        match recv(link)? {
            Frame::Want { level, runs } => {
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
                for pgno in held + 1..=page_count {
                    if written.get(pgno) {
                        continue;
                    } else if pgno == lock_page {
                        tree.set_leaf(pgno, &zero_page_hash(page_size))?;
                    } else {
                        return Err(Error::Protocol(format!("page {pgno} was never sent")));
                    }
                }
                let ours = tree.digest(page_size, page_count)?;
                if ours != digest {
                    return Err(Error::Verification(format!(
                        "the replica's result has digest {} but the origin's is {}; nothing was committed",
                        hex(&ours),
                        hex(&digest)
                    )));
                }
                target.commit(page_count, &ours, &mut tree.leaves(page_count)?)?;
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
