//! The hash tree one side builds over its pages.
//!
//! Level 0 is the page hashes; node `i` of level `k` is the SHA-256 of the hashes of
//! nodes `i·F .. i·F+F` of level `k-1` that exist (F = [`FANOUT`]). Both sides compute
//! the same function, so equal subtrees have equal node hashes.
//!
//! Memory stays flat: the page hashes (32 bytes a page) go to an unlinked temporary
//! file; only levels 1 and up, 2 bytes a page together, stay in memory.

use super::FANOUT;
use crate::digest::{DigestForm, Digester, HASH_BYTES, Hash, HashSpill, node_hash};
use crate::{Error, Result};

/// The hash tree of one side.
pub(crate) struct Tree {
    leaves: HashSpill,
    /// Leaf updates not yet written: consecutive hashes from page `.0`, flushed as one
    /// write (a sync writes runs of pages; a write per page would cost a syscall each).
    dirty: (u32, Vec<u8>),
    /// Pages hashed when the tree was built.
    leaf_count: u32,
    /// `levels[k - 1]` holds level `k`.
    levels: Vec<Vec<Hash>>,
}

/// The most leaf updates buffered before they are written out.
const DIRTY_BYTES: usize = 64 * 1024;

fn temp_error(e: std::io::Error) -> Error {
    Error::io(&std::env::temp_dir(), e)
}

impl Tree {
    /// Builds the tree of `page_count` pages whose hashes `scan` produces in order, and
    /// the database digest in `form` along the way; the levels above the pages only if `levels`:
    /// a side that may never be asked for a node (with a known base manifest) keeps the
    /// page hashes and the digest, and saves a SHA-256 over every 16 page hashes until
    /// [`Tree::build_levels`]. Without levels, [`Tree::nodes`] knows level 0 only.
    pub(crate) fn build_with(
        page_size: u32,
        page_count: u32,
        levels: bool,
        form: DigestForm,
        scan: impl FnOnce(&mut dyn FnMut(u32, Hash) -> Result<()>) -> Result<()>,
        mut on_page: impl FnMut(),
    ) -> Result<(Tree, Option<Hash>)> {
        let with_levels = levels;
        let mut out = HashSpill::writer().map_err(temp_error)?;
        let mut digest = Digester::new(form, page_size, page_count);
        let mut level1 = Vec::with_capacity(match with_levels {
            true => page_count.div_ceil(FANOUT) as usize,
            false => 0,
        });
        let mut group = Vec::with_capacity(FANOUT as usize);
        let mut next = 1u32;
        let mut io_error = None;
        scan(&mut |pgno, hash| {
            if pgno != next {
                return Err(Error::Protocol(format!(
                    "page {pgno} came out of order (expected {next})"
                )));
            }
            next += 1;
            if let Err(e) = out.push(&hash) {
                io_error = Some(e);
                return Err(Error::Disconnected(String::new()));
            }
            digest.push(&hash);
            if !with_levels {
                on_page();
                return Ok(());
            }
            group.push(hash);
            if group.len() == FANOUT as usize {
                level1.push(node_hash(&group));
                group.clear();
            }
            on_page();
            Ok(())
        })
        .map_err(|e| io_error.take().map(temp_error).unwrap_or(e))?;
        if !group.is_empty() {
            level1.push(node_hash(&group));
        }
        let leaves = out.finish().map_err(temp_error)?;
        let leaf_count = next - 1;
        let mut levels = Vec::new();
        if leaf_count > 0 && with_levels {
            levels.push(level1);
            while levels.last().is_some_and(|l| l.len() > 1) {
                let below = levels.last().expect("checked above");
                let up = below.chunks(FANOUT as usize).map(node_hash).collect();
                levels.push(up);
            }
        }
        Ok((
            Tree {
                leaves,
                dirty: (0, Vec::new()),
                leaf_count,
                levels,
            },
            digest.finish(),
        ))
    }

    /// A tree of no pages: a place for the hashes of pages written ([`Tree::set_leaf`],
    /// read back with [`Tree::leaf`]), for a replica that builds its tree only if it is
    /// asked for nodes.
    pub(crate) fn sparse() -> Result<Tree> {
        Ok(Tree {
            leaves: HashSpill::writer()
                .and_then(|w| w.finish())
                .map_err(temp_error)?,
            dirty: (0, Vec::new()),
            leaf_count: 0,
            levels: Vec::new(),
        })
    }

    /// The hash of page `pgno` as it now stands; the caller knows it was built or set.
    pub(crate) fn leaf(&mut self, pgno: u32) -> Result<Hash> {
        self.flush()?;
        let mut out = Vec::with_capacity(1);
        self.leaves
            .read_at(pgno - 1, 1, &mut out)
            .map_err(temp_error)?;
        Ok(out[0])
    }

    /// Builds the levels above the pages of a tree built without them, from its page
    /// hashes as built: for a side that learns only after the build that it will be
    /// asked for nodes (the replica whose origin did not use its known base). The
    /// caller has changed no page the build hashed ([`Tree::set_leaf`] of pages past
    /// them only), so the levels describe the state the tree was built from. Does
    /// nothing on a tree that has its levels.
    pub(crate) fn build_levels(&mut self) -> Result<()> {
        if !self.levels.is_empty() || self.leaf_count == 0 {
            return Ok(());
        }
        self.flush()?;
        let mut level1 = Vec::with_capacity(self.leaf_count.div_ceil(FANOUT) as usize);
        let mut group = Vec::with_capacity(FANOUT as usize);
        for h in self.leaves.iter(self.leaf_count) {
            group.push(h.map_err(temp_error)?);
            if group.len() == FANOUT as usize {
                level1.push(node_hash(&group));
                group.clear();
            }
        }
        if !group.is_empty() {
            level1.push(node_hash(&group));
        }
        self.levels.push(level1);
        while self.levels.last().is_some_and(|l| l.len() > 1) {
            let below = self.levels.last().expect("checked above");
            let up = below.chunks(FANOUT as usize).map(node_hash).collect();
            self.levels.push(up);
        }
        Ok(())
    }

    /// Number of nodes at `level` (level 0: pages hashed at build time).
    pub(crate) fn len(&self, level: u8) -> u32 {
        match level {
            0 => self.leaf_count,
            k => self
                .levels
                .get(usize::from(k) - 1)
                .map_or(0, |l| l.len() as u32),
        }
    }

    /// Appends the hashes of nodes `start .. start + count` of `level` to `out`.
    /// The caller checks the range against [`Tree::len`].
    pub(crate) fn nodes(
        &mut self,
        level: u8,
        start: u32,
        count: u32,
        out: &mut Vec<Hash>,
    ) -> Result<()> {
        if level == 0 {
            self.flush()?;
            self.leaves.read_at(start, count, out).map_err(temp_error)?;
        } else {
            let l = &self.levels[usize::from(level) - 1];
            out.extend_from_slice(&l[start as usize..(start + count) as usize]);
        }
        Ok(())
    }

    /// Replaces the hash of page `pgno` (1-based), for pages written after the build.
    /// Upper levels are not updated: they describe the state the tree was built from.
    pub(crate) fn set_leaf(&mut self, pgno: u32, hash: &Hash) -> Result<()> {
        let (first, buf) = &self.dirty;
        let next = *first + (buf.len() / HASH_BYTES) as u32;
        if buf.is_empty() || pgno != next || buf.len() >= DIRTY_BYTES {
            self.flush()?;
            self.dirty.0 = pgno;
        }
        self.dirty.1.extend_from_slice(hash);
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let (first, buf) = &mut self.dirty;
        if !buf.is_empty() {
            self.leaves.write_at(*first - 1, buf).map_err(temp_error)?;
            buf.clear();
        }
        Ok(())
    }

    /// The first `page_count` page hashes as they now stand, in page order.
    pub(crate) fn leaves(
        &mut self,
        page_count: u32,
    ) -> Result<impl Iterator<Item = Result<Hash>> + '_> {
        self.flush()?;
        Ok(self.leaves.iter(page_count).map(|h| h.map_err(temp_error)))
    }

    /// The digest in `form` of the first `page_count` page hashes as they now stand.
    pub(crate) fn digest(
        &mut self,
        form: DigestForm,
        page_size: u32,
        page_count: u32,
    ) -> Result<Hash> {
        let mut digest = Digester::new(form, page_size, page_count);
        for h in self.leaves(page_count)? {
            digest.push(&h?);
        }
        Ok(digest
            .finish()
            .expect("exactly page_count hashes were pushed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(i: u32) -> Hash {
        crate::digest::sha256(&i.to_be_bytes())
    }

    fn build(n: u32) -> (Tree, Hash) {
        let (tree, digest) = Tree::build_with(
            4096,
            n,
            true,
            DigestForm::One,
            |f| (1..=n).try_for_each(|i| f(i, leaf(i))),
            || {},
        )
        .expect("builds");
        (tree, digest.expect("all pages hashed"))
    }

    #[test]
    fn levels_shrink_by_fanout_to_one_root() {
        for (n, lens) in [
            (1, vec![1, 1]),
            (16, vec![16, 1]),
            (17, vec![17, 2, 1]),
            (256, vec![256, 16, 1]),
            (257, vec![257, 17, 2, 1]),
        ] {
            let (tree, _) = build(n);
            let got: Vec<u32> = (0..lens.len() as u8).map(|l| tree.len(l)).collect();
            assert_eq!(got, lens, "{n} pages");
            assert_eq!(tree.len(lens.len() as u8), 0);
        }
    }

    #[test]
    fn nodes_are_hashes_of_their_children() {
        let (mut tree, _) = build(40);
        let mut leaves = Vec::new();
        tree.nodes(0, 32, 8, &mut leaves).expect("reads");
        assert_eq!(leaves[0], leaf(33));
        let mut ones = Vec::new();
        tree.nodes(1, 2, 1, &mut ones).expect("reads");
        assert_eq!(ones[0], node_hash(&leaves));
    }

    #[test]
    fn digest_follows_leaf_updates() {
        let (mut tree, built) = build(20);
        let one = DigestForm::One;
        assert_eq!(tree.digest(one, 4096, 20).expect("digest"), built);
        tree.set_leaf(21, &leaf(21)).expect("extends");
        assert_eq!(tree.digest(one, 4096, 21).expect("digest"), build(21).1);
        assert_eq!(tree.digest(one, 4096, 3).expect("digest"), build(3).1);
        // The chunked form over the same leaves, as a digest built from them says.
        let mut chunked = Digester::new(DigestForm::Chunked, 4096, 21);
        (1..=21).for_each(|i| chunked.push(&leaf(i)));
        assert_eq!(
            tree.digest(DigestForm::Chunked, 4096, 21).expect("digest"),
            chunked.finish().expect("21 pages")
        );
        // A sparse tree gives back the leaves set, wherever they are.
        let mut sparse = Tree::sparse().expect("a temporary file");
        sparse.set_leaf(5000, &leaf(5000)).expect("sets");
        sparse.set_leaf(3, &leaf(3)).expect("sets");
        assert_eq!(sparse.leaf(5000).expect("reads"), leaf(5000));
        assert_eq!(sparse.leaf(3).expect("reads"), leaf(3));
    }

    #[test]
    fn a_tree_without_levels_has_the_same_leaves_and_digest() {
        let (mut full, digest) = build(40);
        let (mut bare, bare_digest) = Tree::build_with(
            4096,
            40,
            false,
            DigestForm::One,
            |f| (1..=40).try_for_each(|i| f(i, leaf(i))),
            || {},
        )
        .expect("builds");
        assert_eq!(bare_digest, Some(digest));
        assert_eq!(bare.len(0), 40);
        assert_eq!(bare.len(1), 0);
        let a: Vec<Hash> = full.leaves(40).unwrap().map(|h| h.unwrap()).collect();
        let b: Vec<Hash> = bare.leaves(40).unwrap().map(|h| h.unwrap()).collect();
        assert_eq!(a, b);
        bare.build_levels().expect("levels");
        assert_eq!((bare.len(3), full.len(3)), (0, 0));
        for level in 0..3u8 {
            assert_eq!(bare.len(level), full.len(level), "level {level}");
            let (mut x, mut y) = (Vec::new(), Vec::new());
            full.nodes(level, 0, full.len(level), &mut x)
                .expect("nodes");
            bare.nodes(level, 0, bare.len(level), &mut y)
                .expect("nodes");
            assert_eq!(x, y, "level {level}");
        }
    }

    #[test]
    fn out_of_order_pages_are_refused() {
        let r = Tree::build_with(4096, 2, true, DigestForm::One, |f| f(2, leaf(2)), || {});
        assert!(r.is_err());
    }
}
