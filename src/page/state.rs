//! What a snapshot of a WAL database can say about its state from a few constant-size
//! facts, without reading a page or a hash: enough to prove that the state a later
//! snapshot sees is the very state an earlier one saw (docs/engine.md, "A no-change
//! push that reads nothing").
//!
//! A [`SourceState`] exists only for a snapshot that holds *exactly* the frames up to a
//! known WAL position (the wal-index header read before and after its read transaction
//! started said the same thing, [`super::wal::observe`]). Two such snapshots with equal
//! states see the same database: the WAL is the same generation (same salts) up to the
//! same frame with the same cumulative checksum, so the same frames; and the database
//! file is the same file (device and inode), not written since (size, mtime and ctime
//! to the nanosecond; a checkpoint copying frames back changes them too, which only
//! costs the shortcut). The token is opaque to its keepers: compare, never interpret.

use std::os::unix::fs::MetadataExt;

use super::wal::{POSITION_BYTES, Position};

/// The format of [`SourceState::to_token`]; a token of another format is no state.
const TOKEN_FORMAT: &str = "s1";

/// Bytes of a state before hex: seven 8-byte file facts, two 4-byte page facts and a
/// WAL position.
const STATE_BYTES: usize = 7 * 8 + 2 * 4 + POSITION_BYTES;

/// The state of a WAL database as one snapshot saw it; equal states, equal contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceState {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    page_size: u32,
    page_count: u32,
    position: Position,
}

impl SourceState {
    /// The state of the database file `meta` describes, with `page_size`-byte pages and
    /// `page_count` pages, whose snapshot holds exactly the WAL frames up to `position`.
    pub(super) fn new(
        meta: &std::fs::Metadata,
        page_size: u32,
        page_count: u32,
        position: Position,
    ) -> SourceState {
        SourceState {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            page_size,
            page_count,
            position,
        }
    }

    /// Whether the WAL held no committed frame: the contents were the file's alone.
    pub fn file_only(&self) -> bool {
        self.position.frame == 0
    }

    /// Whether this state's database file is the one `written` describes and was not
    /// modified since: same device, inode, size and mtime (a hard link to it changes
    /// only its ctime).
    pub(super) fn same_written_file(&self, written: &std::fs::Metadata) -> bool {
        (self.dev, self.ino, self.size, self.mtime)
            == (
                written.dev(),
                written.ino(),
                written.len(),
                (written.mtime(), written.mtime_nsec()),
            )
    }

    /// The database's page size.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// The database's page count.
    pub fn page_count(&self) -> u32 {
        self.page_count
    }

    /// The state as a short string, to be kept beside a push's record and compared
    /// with a later snapshot's [`SourceState::to_token`].
    pub fn to_token(&self) -> String {
        let mut b = Vec::with_capacity(STATE_BYTES);
        for w in [
            self.dev,
            self.ino,
            self.size,
            self.mtime.0 as u64,
            self.mtime.1 as u64,
            self.ctime.0 as u64,
            self.ctime.1 as u64,
        ] {
            b.extend_from_slice(&w.to_be_bytes());
        }
        b.extend_from_slice(&self.page_size.to_be_bytes());
        b.extend_from_slice(&self.page_count.to_be_bytes());
        b.extend_from_slice(&self.position.to_bytes());
        format!("{TOKEN_FORMAT}:{}", crate::digest::hex(&b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(frame: u32) -> SourceState {
        SourceState {
            dev: 1,
            ino: 2,
            size: 4096 * 3,
            mtime: (1_700_000_000, 5),
            ctime: (1_700_000_001, 6),
            page_size: 4096,
            page_count: 3,
            position: Position {
                salt: [7, 8],
                frame,
                cksum: [9, 10],
            },
        }
    }

    #[test]
    fn tokens_differ_when_any_fact_does() {
        let base = state(4);
        assert_eq!(base.to_token(), state(4).to_token());
        assert!(base.to_token().starts_with("s1:"));
        assert_eq!(base.to_token().len(), 3 + 2 * STATE_BYTES);
        let variants = [
            SourceState { dev: 9, ..base },
            SourceState { ino: 9, ..base },
            SourceState { size: 9, ..base },
            SourceState {
                mtime: (1_700_000_000, 6),
                ..base
            },
            SourceState {
                ctime: (1_700_000_002, 6),
                ..base
            },
            SourceState {
                page_size: 1024,
                ..base
            },
            SourceState {
                page_count: 4,
                ..base
            },
            state(5),
            SourceState {
                position: Position {
                    salt: [8, 8],
                    ..base.position
                },
                ..base
            },
            SourceState {
                position: Position {
                    cksum: [9, 11],
                    ..base.position
                },
                ..base
            },
        ];
        for v in variants {
            assert_ne!(v.to_token(), base.to_token(), "{v:?}");
        }
    }
}
