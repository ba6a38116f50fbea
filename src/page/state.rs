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
//!
//! "Not written since" holds only where a write after the state was read is sure to
//! move the file's times: [`times_prove_unwritten`] says where (whole-second times, a
//! kernel before multigrain timestamps, a file system not known to have them: no state,
//! and whoever needed it reads instead).

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
    /// `None` when the file's times cannot prove that it was not written since
    /// ([`times_prove_unwritten`]): no state is better than one a write could hide from.
    pub(super) fn new(
        file: &std::fs::File,
        meta: &std::fs::Metadata,
        page_size: u32,
        page_count: u32,
        position: Position,
    ) -> Option<SourceState> {
        let facts = TimeFacts {
            kernel: kernel_version(),
            fs_type: fs_type(file),
            mtime_nsec: meta.mtime_nsec(),
            ctime_nsec: meta.ctime_nsec(),
        };
        if !times_prove_unwritten(&facts) {
            tracing::debug!(
                ?facts,
                "the file's times cannot prove it unwritten: no seal trusted"
            );
            return None;
        }
        Some(SourceState {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            page_size,
            page_count,
            position,
        })
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

/// What decides whether a file's times can prove it was not written since they were read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TimeFacts {
    /// The running kernel's (major, minor) version; `None` when unknown or not Linux.
    pub kernel: Option<(u32, u32)>,
    /// The file system's magic number (`statfs` `f_type`); `None` when unknown.
    pub fs_type: Option<u32>,
    /// The sub-second parts of the file's mtime and ctime, as read.
    pub mtime_nsec: i64,
    /// See `mtime_nsec`.
    pub ctime_nsec: i64,
}

/// Linux's first version with multigrain timestamps: once a file's ctime has been
/// read (a `stat`), its next change gets a fine-grained time, never the one read.
const MULTIGRAIN_KERNEL: (u32, u32) = (6, 13);

/// File systems that have multigrain timestamps from [`MULTIGRAIN_KERNEL`] on (they
/// set `FS_MGTIME`) and keep nanoseconds on disk: ext4, xfs, btrfs, tmpfs.
const MULTIGRAIN_FILE_SYSTEMS: [u32; 4] = [0xEF53, 0x5846_5342, 0x9123_683E, 0x0102_1994];

/// Whether a file whose times were read with these facts is sure to show other times
/// after any later write (docs/engine.md, "Why equal states mean equal contents"). A
/// write within the clock's granularity otherwise keeps the very times read, and an
/// application's commit and checkpoint would pass for "no change" (like git's "racily
/// clean" files). Only a kernel with multigrain timestamps on a file system that has
/// them guarantees a new time; and times with no sub-second part mean a file system
/// that keeps whole seconds (an ext4 with 128-byte inodes, FAT), whatever the kernel.
pub(super) fn times_prove_unwritten(facts: &TimeFacts) -> bool {
    let fine = facts.mtime_nsec != 0 && facts.ctime_nsec != 0;
    let kernel = facts.kernel.is_some_and(|k| k >= MULTIGRAIN_KERNEL);
    let fs = facts
        .fs_type
        .is_some_and(|t| MULTIGRAIN_FILE_SYSTEMS.contains(&t));
    fine && kernel && fs
}

/// `(major, minor)` of a kernel release string such as `6.13.2-arch1-1`.
fn parse_kernel_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split('.');
    let number = |p: Option<&str>| -> Option<u32> {
        let p = p?;
        let end = p.find(|c: char| !c.is_ascii_digit()).unwrap_or(p.len());
        p[..end].parse().ok()
    };
    Some((number(parts.next())?, number(parts.next())?))
}

/// The running kernel's version, read once.
#[cfg(target_os = "linux")]
fn kernel_version() -> Option<(u32, u32)> {
    static VERSION: std::sync::OnceLock<Option<(u32, u32)>> = std::sync::OnceLock::new();
    *VERSION.get_or_init(|| {
        // SAFETY: `uname` fills the zeroed struct it is given; its fields are
        // NUL-terminated strings within their arrays.
        let mut name: libc::utsname = unsafe { std::mem::zeroed() };
        if unsafe { libc::uname(&mut name) } != 0 {
            return None;
        }
        let release = unsafe { std::ffi::CStr::from_ptr(name.release.as_ptr()) };
        parse_kernel_release(&release.to_string_lossy())
    })
}

#[cfg(not(target_os = "linux"))]
fn kernel_version() -> Option<(u32, u32)> {
    None
}

/// The magic number of the file system holding `file`.
#[cfg(target_os = "linux")]
fn fs_type(file: &std::fs::File) -> Option<u32> {
    use std::os::fd::AsRawFd;
    // SAFETY: `fstatfs` fills the zeroed struct it is given from an open descriptor.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    // `f_type` is signed on some targets; the magic is its low 32 bits.
    Some(st.f_type as u32)
}

#[cfg(not(target_os = "linux"))]
fn fs_type(_file: &std::fs::File) -> Option<u32> {
    None
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
    fn only_fine_times_on_a_multigrain_kernel_and_file_system_prove_a_file_unwritten() {
        let trusted = TimeFacts {
            kernel: Some((6, 13)),
            fs_type: Some(0xEF53),
            mtime_nsec: 123_456_789,
            ctime_nsec: 987_654_321,
        };
        assert!(times_prove_unwritten(&trusted));
        for fs in [0xEF53, 0x5846_5342, 0x9123_683E, 0x0102_1994] {
            let facts = TimeFacts {
                fs_type: Some(fs),
                ..trusted
            };
            assert!(times_prove_unwritten(&facts), "{fs:#x}");
        }
        assert!(times_prove_unwritten(&TimeFacts {
            kernel: Some((7, 0)),
            ..trusted
        }));
        let refused = [
            // Whole seconds: an ext4 with 128-byte inodes, FAT.
            TimeFacts {
                mtime_nsec: 0,
                ..trusted
            },
            TimeFacts {
                ctime_nsec: 0,
                ..trusted
            },
            // Before multigrain timestamps, or unknown.
            TimeFacts {
                kernel: Some((6, 12)),
                ..trusted
            },
            TimeFacts {
                kernel: Some((5, 19)),
                ..trusted
            },
            TimeFacts {
                kernel: None,
                ..trusted
            },
            // vfat, exfat, NFS, overlayfs, unknown.
            TimeFacts {
                fs_type: Some(0x4d44),
                ..trusted
            },
            TimeFacts {
                fs_type: Some(0x2011_BAB0),
                ..trusted
            },
            TimeFacts {
                fs_type: Some(0x6969),
                ..trusted
            },
            TimeFacts {
                fs_type: Some(0x794C_7630),
                ..trusted
            },
            TimeFacts {
                fs_type: None,
                ..trusted
            },
        ];
        for facts in refused {
            assert!(!times_prove_unwritten(&facts), "{facts:?}");
        }
    }

    #[test]
    fn kernel_releases_parse_to_major_and_minor() {
        assert_eq!(parse_kernel_release("6.13.2-arch1-1"), Some((6, 13)));
        assert_eq!(parse_kernel_release("6.18.44-fc-v1098"), Some((6, 18)));
        assert_eq!(parse_kernel_release("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(parse_kernel_release("6.13-rc1"), Some((6, 13)));
        assert_eq!(parse_kernel_release("6"), None);
        assert_eq!(parse_kernel_release(""), None);
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
