//! SQLite page access: what a page is, how it is identified, and the two ends that read
//! and write whole databases page by page.
//!
//! - [`Snapshot`] reads a live database through one read transaction over
//!   `sqlite_dbpage`, so pages still in the WAL are seen, and never writes it.
//! - [`Writer`] changes a database in one `BEGIN IMMEDIATE` transaction through
//!   `sqlite_dbpage`: readers in other processes see the old database or the new one.
//!
//! Page identity and the database digest are computed in [`crate::digest`] (a leaf every
//! module may use); this module reads and writes the pages they are computed over, and
//! knows nothing of the sync engine: the engine implements its page source and target
//! over these two types (`engine/sqlite.rs`).

pub(crate) mod handles;
mod hashcache;
mod header;
mod scan;
mod snapshot;
mod writer;

pub use header::{Header, JournalMode};
pub use snapshot::Snapshot;
pub use writer::Writer;

// Page hashes and digests live in the `digest` leaf, so that modules below `page`
// (the protocol) and beside it use the same code; these names stay reachable here for
// code that still spells them `page::…`.
// TEMP(issue 9 merge): the lead switches the remaining `page::` users to `digest::`.
pub use crate::digest::{
    Digest, hex, legal_format_versions, lock_byte_page, page_hash, zero_page_hash,
};

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
