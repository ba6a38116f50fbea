//! Reading every page of a database quickly, exactly as an open transaction sees it.
//!
//! `sqlite_dbpage` costs a syscall, a virtual-table row and a copy per page. Most pages,
//! though, are simply in the database file: every page that no WAL frame mentions is,
//! for the transaction the caller holds open, exactly the bytes in the main file. Those
//! are read straight from the file in large blocks; the pages that any frame of the
//! `-wal` file mentions (a superset of the ones whose current version lives in the WAL)
//! are read through `sqlite_dbpage`, which resolves them.
//!
//! Why the file cannot change under us: in rollback mode the caller's shared (or
//! reserved) lock keeps every writer out of the file; in WAL mode only a checkpoint
//! writes the file, and it never copies frames past the read mark of an open reader, so
//! it only writes pages to the versions this transaction already sees, and those pages
//! are in the WAL set, read through SQLite.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rusqlite::Connection;

use crate::digest::lock_byte_page;
use crate::{Error, Result};

/// Bytes read from the database file per block.
const BLOCK_BYTES: usize = 1024 * 1024;

const WAL_HEADER_BYTES: u64 = 32;
const WAL_FRAME_HEADER_BYTES: u64 = 24;
const WAL_MAGIC: [u32; 2] = [0x377f_0682, 0x377f_0683];

/// Page numbers (up to `page_count`) that any frame of the current WAL generation of
/// `db` names. An absent or empty `-wal` gives an empty set.
fn wal_pages(db: &Path, page_size: u32, page_count: u32) -> Result<Vec<u64>> {
    let mut set = vec![0u64; (page_count as usize).div_ceil(64)];
    // Beside the file a symbolic link points to, where SQLite keeps it: beside the
    // link there is none, and every page would be taken from the file.
    let wal_path = super::sqlite_sibling(db, "-wal");
    let wal = match File::open(&wal_path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(set),
        Err(e) => return Err(Error::io(&wal_path, e)),
    };
    let len = wal.metadata().map_err(|e| Error::io(&wal_path, e))?.len();
    let mut header = [0u8; WAL_HEADER_BYTES as usize];
    if len < WAL_HEADER_BYTES || wal.read_exact_at(&mut header, 0).is_err() {
        return Ok(set);
    }
    let word = |b: &[u8], i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    if !WAL_MAGIC.contains(&word(&header, 0)) || word(&header, 8) != page_size {
        // Not a WAL of this database at this page size: SQLite ignores it, but stay safe
        // and read every page through SQLite.
        set.iter_mut().for_each(|w| *w = u64::MAX);
        return Ok(set);
    }
    let salts = &header[16..24];
    let stride = WAL_FRAME_HEADER_BYTES + u64::from(page_size);
    let mut frame = [0u8; WAL_FRAME_HEADER_BYTES as usize];
    let mut at = WAL_HEADER_BYTES;
    while at + stride <= len {
        if wal.read_exact_at(&mut frame, at).is_err() {
            break;
        }
        if &frame[8..16] == salts {
            let pgno = word(&frame, 0);
            if (1..=page_count).contains(&pgno) {
                let i = (pgno - 1) as usize;
                set[i / 64] |= 1 << (i % 64);
            }
        }
        at += stride;
    }
    Ok(set)
}

/// Where a scan finds the pages: the set of pages some WAL frame names (those are read
/// through the connection), and the main file's length.
fn layout(file: &File, path: &Path, page_size: u32, page_count: u32) -> Result<(Vec<u64>, u64)> {
    let in_wal = wal_pages(path, page_size, page_count)?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    Ok((in_wal, file_len))
}

/// Calls `f` with every page of the database at `path`, as the transaction open on
/// `conn` sees it, in page order. The lock-byte page is passed as zeros.
///
/// `file` is the database file, opened by the caller for as long as `conn` lives:
/// SQLite locks with POSIX record locks, which a process loses on *all* its handles
/// when it closes *any* handle of the file, so a handle opened and closed here would
/// silently drop `conn`'s locks.
pub(super) fn for_each_page(
    conn: &Connection,
    file: &File,
    path: &Path,
    page_size: u32,
    page_count: u32,
    f: &mut dyn FnMut(u32, &[u8]) -> Result<()>,
) -> Result<()> {
    let (in_wal, file_len) = layout(file, path, page_size, page_count)?;
    pages(
        Some(conn),
        &in_wal,
        file,
        file_len,
        path,
        page_size,
        page_count,
        f,
    )
}

/// [`for_each_page`], with `check` run on `conn` on a second thread at the same time
/// when this scan will not need the connection at all: no frame of the WAL names any
/// page and the main file holds every page (a database whose WAL is empty or gone, or
/// a rollback-journal database), so every page comes straight from the file. Then the
/// check's answer is returned; `None` when the scan needed the connection, and the
/// caller runs its check after the scan as before. Either way the check runs on the
/// caller's connection, inside its read transaction: it checks exactly the state the
/// scan reads.
#[allow(clippy::too_many_arguments)]
pub(super) fn for_each_page_beside<R: Send>(
    conn: &Connection,
    file: &File,
    path: &Path,
    page_size: u32,
    page_count: u32,
    f: &mut dyn FnMut(u32, &[u8]) -> Result<()>,
    check: impl FnOnce(&Connection) -> R + Send,
) -> (Result<()>, Option<R>) {
    let (in_wal, file_len) = match layout(file, path, page_size, page_count) {
        Ok(p) => p,
        Err(e) => return (Err(e), None),
    };
    let whole = file_len >= u64::from(page_count) * u64::from(page_size);
    if !whole || in_wal.iter().any(|&w| w != 0) {
        let scanned = pages(
            Some(conn),
            &in_wal,
            file,
            file_len,
            path,
            page_size,
            page_count,
            f,
        );
        return (scanned, None);
    }
    /// The connection, lent to the checking thread.
    struct Lent<'a>(&'a Connection);
    // SAFETY: a connection may be used from another thread as long as no two threads
    // use it at once (SQLite's multi-thread mode). This thread does not use it until
    // the checking thread is joined: the scan below is given no connection, and every
    // page it reads comes from the file (checked just above).
    unsafe impl Send for Lent<'_> {}
    let lent = Lent(conn);
    std::thread::scope(|s| {
        let checker = s.spawn(move || {
            let lent = lent;
            check(lent.0)
        });
        let scanned = pages(
            None, &in_wal, file, file_len, path, page_size, page_count, f,
        );
        let checked = checker
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (scanned, Some(checked))
    })
}

/// The page loop of [`for_each_page`]: pages the WAL names or the file lacks come
/// through `conn`, which a scan without one never needs (see
/// [`for_each_page_beside`]).
#[allow(clippy::too_many_arguments)]
fn pages(
    conn: Option<&Connection>,
    in_wal: &[u64],
    file: &File,
    file_len: u64,
    path: &Path,
    page_size: u32,
    page_count: u32,
    f: &mut dyn FnMut(u32, &[u8]) -> Result<()>,
) -> Result<()> {
    let ps = page_size as usize;
    let lock_page = lock_byte_page(page_size);
    let pages_per_block = (BLOCK_BYTES / ps).max(1) as u32;
    let mut block = vec![0u8; pages_per_block as usize * ps];
    let mut single = Vec::with_capacity(ps);
    let mut first = 1u32;
    while first <= page_count {
        let n = pages_per_block.min(page_count - first + 1);
        let offset = u64::from(first - 1) * u64::from(page_size);
        // Bytes of this block the main file holds; pages past its end live in the WAL.
        let in_file = (file_len.saturating_sub(offset)).min(u64::from(n) * ps as u64) as usize;
        let in_file = in_file - in_file % ps;
        file.read_exact_at(&mut block[..in_file], offset)
            .map_err(|e| Error::io(path, e))?;
        for k in 0..n {
            let pgno = first + k;
            let i = (pgno - 1) as usize;
            let start = k as usize * ps;
            if pgno == lock_page {
                single.clear();
                single.resize(ps, 0);
                f(pgno, &single)?;
            } else if in_wal[i / 64] & (1 << (i % 64)) != 0 || start + ps > in_file {
                let conn = conn.ok_or_else(|| {
                    Error::Bug(format!("page {pgno} is not in the file of a scan lent out"))
                })?;
                read_page(conn, path, pgno, page_size, &mut single)?;
                f(pgno, &single)?;
            } else {
                f(pgno, &block[start..start + ps])?;
            }
        }
        first += n;
    }
    Ok(())
}

/// Reads one page through `sqlite_dbpage` into `buf`.
pub(super) fn read_page(
    conn: &Connection,
    path: &Path,
    pgno: u32,
    page_size: u32,
    buf: &mut Vec<u8>,
) -> Result<()> {
    let mut stmt = conn
        .prepare_cached("SELECT data FROM sqlite_dbpage WHERE pgno = ?1")
        .map_err(|e| Error::sqlite(path, e))?;
    let mut rows = stmt.query([pgno]).map_err(|e| Error::sqlite(path, e))?;
    let row = rows.next().map_err(|e| Error::sqlite(path, e))?;
    let data = match row {
        Some(row) => row
            .get_ref(0)
            .and_then(|v| v.as_blob().map_err(Into::into))
            .ok(),
        None => None,
    };
    match data {
        Some(data) if data.len() == page_size as usize => {
            buf.clear();
            buf.extend_from_slice(data);
            Ok(())
        }
        _ => Err(Error::NotADatabase {
            path: path.to_owned(),
            reason: format!("page {pgno} could not be read"),
        }),
    }
}
