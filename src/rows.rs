//! Rows, not only pages: what changed between two SQLite databases, table by table and
//! row by row, as SQLite's changeset format (the one `sqldiff --changeset`, the session
//! extension and `sqlite3changeset_apply` speak), and applying such a changeset.
//!
//! - [`session`]: a small safe wrapper over the session extension (diff of two attached
//!   databases into a changeset, reading a changeset change by change, applying one
//!   with a conflict handler). The declarations it needs are in `rows/ffi.rs`, since
//!   rusqlite's `session` feature needs libclang at build time.
//! - [`Pair`]: two database files opened side by side in one read transaction each
//!   (readers: an application writing either is never blocked in WAL mode): their
//!   schemas compared, each table's rows counted as inserted, updated and deleted
//!   ([`Pair::summary`], plain SQL, memory flat in the databases' size), and the row
//!   changes themselves ([`Pair::changes`]: one session per table, so memory grows with
//!   the changed rows of the largest table, never with the database).
//! - [`apply`]: a changeset file onto a database, in one write transaction, with the
//!   conflicts it met; an abort (or a changeset that does not fit) changes nothing.
//!
//! A server-side merge builds on the same pieces: [`Pair::changes`] gives OLD→LATEST
//! and OLD→CANDIDATE, [`session::Change::key`] the primary keys each touches per table,
//! and [`apply_changeset`] applies one onto a copy with a handler deciding conflicts.
//!
//! Layering: a leaf-ish module; it uses rusqlite and `error` only.

mod diff;
mod ffi;
mod format;
pub mod session;

pub use diff::{EachChange, EachRow, ObjectChange, Pair, Summary, TableStatus, TableSummary};
pub use format::{SHORT_VALUE_CHARS, short_value, sql_literal, value_json};

use std::path::Path;

use crate::{Error, Result};
use session::{Applied, Change, Changes, Conflict, ConflictKind, Resolution};

/// What `apply` does when a change conflicts with the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnConflict {
    /// Stop at the first conflict: nothing changes.
    Abort,
    /// Leave that row as it is, apply the rest.
    Skip,
    /// Write the change over the row that is there (a missing row or a broken
    /// constraint cannot be replaced: that change is skipped, and listed).
    Replace,
}

/// One conflict met by [`apply`], and what became of it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MetConflict {
    /// The table (empty for a foreign key conflict, which is about the whole changeset).
    pub table: String,
    /// Why (`data`, `not-found`, `conflict`, `constraint`, `foreign-key`).
    pub kind: ConflictKind,
    /// The change's operation (none for a foreign key conflict).
    pub op: Option<session::Op>,
    /// The primary key of the row, as JSON values.
    pub key: Vec<serde_json::Value>,
    /// `skipped`, `replaced` or `aborted`.
    pub resolution: &'static str,
}

/// What [`apply`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ApplyReport {
    /// Changes read from the changeset.
    pub changes: u64,
    /// Whether they stayed applied (false: aborted, nothing changed).
    pub applied: bool,
    /// Every conflict met, in order.
    pub conflicts: Vec<MetConflict>,
}

/// The changes of a changeset per table: how many, and whether every change of a
/// table has the same column count and primary key (a well-formed changeset does).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChangesetTable {
    /// The table.
    pub table: String,
    /// Its column count in the changeset (a table tracked by rowid counts the rowid).
    pub columns: usize,
    /// Which columns are the primary key.
    pub pk: Vec<bool>,
    /// Rows inserted.
    pub inserted: u64,
    /// Rows updated.
    pub updated: u64,
    /// Rows deleted.
    pub deleted: u64,
}

/// Reads a whole changeset, change by change (memory: one change), and counts its
/// changes per table in the order tables first appear. An error if it is not a
/// well-formed changeset ([`Error::NotADatabase`] naming `path`).
pub fn inspect(path: &Path) -> Result<Vec<ChangesetTable>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    inspect_from(file, path)
}

/// [`inspect`] of the changeset read from `input` (the file at `path`).
fn inspect_from(input: impl std::io::Read, path: &Path) -> Result<Vec<ChangesetTable>> {
    let mut tables: Vec<ChangesetTable> = Vec::new();
    for_each_change_from(input, path, &mut |c| {
        let entry = match tables.iter().position(|t| t.table == c.table) {
            Some(i) => &mut tables[i],
            None => {
                tables.push(ChangesetTable {
                    table: c.table.clone(),
                    columns: c.pk.len(),
                    pk: c.pk.clone(),
                    ..Default::default()
                });
                tables.last_mut().expect("just pushed")
            }
        };
        if entry.pk != c.pk {
            return Err(not_a_changeset(
                path,
                &format!("table {} changes its primary key mid-way", c.table),
            ));
        }
        match c.op {
            session::Op::Insert => entry.inserted += 1,
            session::Op::Update => entry.updated += 1,
            session::Op::Delete => entry.deleted += 1,
        }
        Ok(())
    })?;
    Ok(tables)
}

/// Calls `f` with every change of the changeset file at `path`, streaming.
pub fn for_each_change(path: &Path, f: &mut dyn FnMut(&Change) -> Result<()>) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    for_each_change_from(file, path, f)
}

/// [`for_each_change`] of the changeset read from `input` (the file at `path`).
fn for_each_change_from(
    input: impl std::io::Read,
    path: &Path,
    f: &mut dyn FnMut(&Change) -> Result<()>,
) -> Result<()> {
    let mut input = std::io::BufReader::new(input);
    let mut changes = Changes::start(&mut input).map_err(|e| session_error(path, e))?;
    while let Some(change) = changes.next_change().map_err(|e| session_error(path, e))? {
        f(&change)?;
    }
    Ok(())
}

fn not_a_changeset(path: &Path, why: &str) -> Error {
    Error::NotADatabase {
        path: path.to_owned(),
        reason: format!("not a SQLite changeset: {why}; nothing was changed"),
    }
}

fn session_error(path: &Path, e: session::SessionError) -> Error {
    match e {
        session::SessionError::Io(e) => Error::io(path, e),
        e if e.is_corrupt() => not_a_changeset(path, "its bytes are not in the changeset format"),
        e => not_a_changeset(path, &e.to_string()),
    }
}

/// Applies the changeset at `changeset` to the database `db` in one write transaction
/// (`BEGIN IMMEDIATE`; readers keep reading, in WAL mode while it runs too), deciding
/// conflicts by `on_conflict`. Checked first, streaming, without writing: the file must
/// be a well-formed changeset whose every table exists in `db` with the same column
/// count and primary key (or, for a table tracked by rowid, no primary key); otherwise
/// nothing changes. With [`OnConflict::Abort`] the first conflict rolls everything back
/// and the report says `applied: false`.
pub fn apply(changeset: &Path, db: &Path, on_conflict: OnConflict) -> Result<ApplyReport> {
    use std::io::{Seek, SeekFrom};
    // Opened once: the bytes checked are the bytes applied.
    let mut file = open_changeset(changeset)?;
    let tables = inspect_from(&mut file, changeset)?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(changeset, e))?;
    let conn = open_for_apply(db)?;
    for t in &tables {
        check_fits(&conn, db, t)?;
    }
    let sqlite = |e: rusqlite::Error| Error::sqlite(db, e);
    conn.execute_batch("BEGIN IMMEDIATE").map_err(sqlite)?;
    let mut input = std::io::BufReader::new(file);
    let mut conflicts = Vec::new();
    let mut handler = |c: &Conflict| -> Resolution {
        let resolution = match (on_conflict, c.kind) {
            (OnConflict::Abort, _) => Resolution::Abort,
            (OnConflict::Replace, ConflictKind::Data | ConflictKind::Conflict) => {
                Resolution::Replace
            }
            _ => Resolution::Omit,
        };
        conflicts.push(MetConflict {
            table: c
                .change
                .as_ref()
                .map_or(String::new(), |ch| ch.table.clone()),
            kind: c.kind,
            op: c.change.as_ref().map(|ch| ch.op),
            key: c
                .change
                .as_ref()
                .map_or(Vec::new(), |ch| ch.key().iter().map(value_json).collect()),
            resolution: match resolution {
                Resolution::Abort => "aborted",
                Resolution::Replace => "replaced",
                // A foreign-key conflict "omitted" keeps the changes as they are.
                Resolution::Omit if c.kind == ConflictKind::ForeignKey => "kept",
                Resolution::Omit => "skipped",
            },
        });
        resolution
    };
    let applied = apply_changeset(&conn, &mut input, &mut handler);
    let applied = match applied {
        Ok(a) => a,
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(apply_error(changeset, db, e));
        }
    };
    let changes = tables
        .iter()
        .map(|t| t.inserted + t.updated + t.deleted)
        .sum();
    match applied {
        Applied::Done => conn.execute_batch("COMMIT").map_err(sqlite)?,
        Applied::Aborted => conn.execute_batch("ROLLBACK").map_err(sqlite)?,
    }
    Ok(ApplyReport {
        changes,
        applied: applied == Applied::Done,
        conflicts,
    })
}

/// The changeset at `path`, open for reading twice: a pipe (`apply <(…)`, `/dev/stdin`)
/// can be read only once, so it is copied into an unlinked temporary file first (read a
/// second time, it would have seemed empty, and nothing would have been applied).
fn open_changeset(path: &Path) -> Result<std::fs::File> {
    use std::io::{Seek, SeekFrom};
    let io = |e| Error::io(path, e);
    let mut file = std::fs::File::open(path).map_err(io)?;
    if file.metadata().map_err(io)?.is_file() {
        return Ok(file);
    }
    let mut spool = tempfile::tempfile().map_err(|e| Error::io(&std::env::temp_dir(), e))?;
    std::io::copy(&mut file, &mut spool).map_err(io)?;
    spool.seek(SeekFrom::Start(0)).map_err(io)?;
    Ok(spool)
}

/// An error met while applying a changeset that was already read through once: reading
/// it again (I/O, bytes that are not a changeset) is the changeset's fault; anything else
/// SQLite refused (a read-only file or directory, a full disk, a lock) is the database's.
fn apply_error(changeset: &Path, db: &Path, e: session::SessionError) -> Error {
    match e {
        session::SessionError::Sqlite { code, message }
            if code & 0xff != rusqlite::ffi::SQLITE_CORRUPT =>
        {
            Error::sqlite(
                db,
                rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(code),
                    Some(format!("{message}; nothing was changed")),
                ),
            )
        }
        e => session_error(changeset, e),
    }
}

/// [`session::apply`] re-exported for a caller holding its own connection and
/// transaction (a merge applying onto a copy).
pub fn apply_changeset(
    conn: &rusqlite::Connection,
    input: &mut dyn std::io::Read,
    handler: &mut dyn FnMut(&Conflict) -> Resolution,
) -> std::result::Result<Applied, session::SessionError> {
    session::apply(conn, input, handler)
}

fn open_for_apply(db: &Path) -> Result<rusqlite::Connection> {
    use rusqlite::OpenFlags;
    if !db.exists() {
        return Err(Error::io(
            db,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such database"),
        ));
    }
    let conn = rusqlite::Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| Error::sqlite(db, e))?;
    // A reader in rollback-journal mode holds its lock for the length of a read: wait
    // for it rather than fail at once.
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(|e| Error::sqlite(db, e))?;
    conn.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))
        .map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase) => Error::NotADatabase {
                path: db.to_owned(),
                reason: "not an SQLite database; nothing was changed".into(),
            },
            _ => Error::sqlite(db, e),
        })?;
    Ok(conn)
}

/// Refuses a changeset table that `db` lacks or holds with other columns: SQLite
/// would skip its changes without a word.
fn check_fits(conn: &rusqlite::Connection, db: &Path, t: &ChangesetTable) -> Result<()> {
    let columns = diff::table_columns(conn, "main", &t.table).map_err(|e| Error::sqlite(db, e))?;
    let refuse = |why: String| {
        Err(Error::Usage(format!(
            "{}: the changeset changes table {} but {why}; nothing was changed",
            db.display(),
            t.table
        )))
    };
    let Some(columns) = columns else {
        return refuse("the database has no such table".into());
    };
    let pk: Vec<bool> = columns.iter().map(|c| c.pk).collect();
    let by_rowid = !pk.iter().any(|&p| p);
    let fits = if by_rowid {
        t.columns == columns.len() + 1
            && t.pk.first() == Some(&true)
            && t.pk[1..].iter().all(|p| !p)
    } else {
        t.columns == columns.len() && t.pk == pk
    };
    if !fits {
        return refuse(format!(
            "its columns or primary key differ ({} columns in the changeset, {} in the table)",
            t.columns,
            columns.len()
        ));
    }
    Ok(())
}
