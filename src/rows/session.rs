//! A safe wrapper over SQLite's session extension: the diff of two attached databases'
//! tables into a changeset, reading a changeset change by change, and applying one with
//! a conflict handler.
//!
//! Every raw handle is owned by a Rust value whose `Drop` frees it (a session, an
//! iterator), so an early return on any error path leaks nothing. Changesets travel as
//! streams ([`std::io::Read`] in, [`std::io::Write`] out) through SQLite's `_strm`
//! functions: reading or applying one never holds it whole in memory. A session's
//! diff does: it keeps every changed row of the tables diffed into it until it is
//! dropped (see [`Session::memory_used`]), which is why callers diff one table per
//! session.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::io::{Read, Write};
use std::panic::AssertUnwindSafe;
use std::ptr::{self, NonNull};

use rusqlite::Connection;
use rusqlite::ffi as sql;
use rusqlite::types::Value;

use super::ffi;

/// A failure of the session extension.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// SQLite refused: its result code and its explanation.
    #[error("{message}")]
    Sqlite {
        /// The (extended) result code.
        code: c_int,
        /// What SQLite said.
        message: String,
    },
    /// Reading the changeset or writing it failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl SessionError {
    /// Whether the changeset read was not a well-formed changeset.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, SessionError::Sqlite { code, .. } if code & 0xff == sql::SQLITE_CORRUPT)
    }

    fn code(code: c_int, detail: Option<String>) -> Self {
        // SAFETY: sqlite3_errstr returns a pointer to a static, NUL-terminated string
        // for any code.
        let generic = unsafe { CStr::from_ptr(sql::sqlite3_errstr(code)) }
            .to_string_lossy()
            .into_owned();
        SessionError::Sqlite {
            code,
            message: match detail {
                Some(d) if !d.is_empty() && d != generic => format!("{d} ({generic})"),
                _ => generic,
            },
        }
    }
}

/// The result type of this module.
pub type Result<T, E = SessionError> = std::result::Result<T, E>;

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| SessionError::Sqlite {
        code: sql::SQLITE_MISUSE,
        message: format!("a name with a NUL byte: {s:?}"),
    })
}

/// A session on one database of a connection: collects the differences of its tables
/// from the same tables in another attached database ([`Session::diff`]).
pub struct Session<'c> {
    raw: NonNull<ffi::sqlite3_session>,
    _conn: &'c Connection,
}

impl<'c> Session<'c> {
    /// A session on database `db` (`main`, or an attached name) of `conn`. With
    /// `by_rowid`, tables without a PRIMARY KEY are tracked by their rowid (as if they
    /// had a leftmost column `_rowid_ INTEGER PRIMARY KEY`); without it they are ignored.
    pub fn new(conn: &'c Connection, db: &str, by_rowid: bool) -> Result<Session<'c>> {
        let db = cstring(db)?;
        let mut raw = ptr::null_mut();
        // SAFETY: the connection handle is valid for 'c (the session borrows the
        // connection for as long as it lives); `db` is NUL-terminated; `raw` is an out
        // pointer SQLite sets.
        let rc = unsafe { ffi::sqlite3session_create(conn.handle(), db.as_ptr(), &mut raw) };
        if rc != sql::SQLITE_OK {
            return Err(SessionError::code(rc, None));
        }
        let raw = NonNull::new(raw).ok_or_else(|| SessionError::code(sql::SQLITE_NOMEM, None))?;
        let session = Session { raw, _conn: conn };
        if by_rowid {
            let mut on: c_int = 1;
            // SAFETY: the session is valid and no table is attached yet (the only time
            // this option may be set); the argument points at an int, as documented.
            let rc = unsafe {
                ffi::sqlite3session_object_config(
                    session.raw.as_ptr(),
                    ffi::SQLITE_SESSION_OBJCONFIG_ROWID,
                    (&mut on as *mut c_int).cast(),
                )
            };
            if rc != sql::SQLITE_OK {
                return Err(SessionError::code(rc, None));
            }
        }
        Ok(session)
    }

    /// Adds the changes that turn table `table` of database `from_db` into the same
    /// table of this session's database: an INSERT for each primary key only here, a
    /// DELETE for each one only in `from_db`, an UPDATE for each one in both with other
    /// values. Both tables must have the same columns in the same order and the same
    /// primary key (SQLite says "table schemas do not match" otherwise).
    pub fn diff(&mut self, from_db: &str, table: &str) -> Result<()> {
        let (from_db, table) = (cstring(from_db)?, cstring(table)?);
        let mut err: *mut c_char = ptr::null_mut();
        // SAFETY: the session is valid, both names are NUL-terminated, and `err` is an
        // out pointer SQLite may set to a string we must free with sqlite3_free.
        let rc = unsafe {
            ffi::sqlite3session_diff(
                self.raw.as_ptr(),
                from_db.as_ptr(),
                table.as_ptr(),
                &mut err,
            )
        };
        let detail = (!err.is_null()).then(|| {
            // SAFETY: SQLite set `err` to a NUL-terminated string it allocated; it is
            // read once here and freed right after.
            let text = unsafe { CStr::from_ptr(err) }
                .to_string_lossy()
                .into_owned();
            // SAFETY: allocated by sqlite3_mprintf, freed exactly once.
            unsafe { sql::sqlite3_free(err.cast()) };
            text
        });
        match rc {
            sql::SQLITE_OK => Ok(()),
            rc => Err(SessionError::code(rc, detail)),
        }
    }

    /// The changeset of everything collected so far, written to `out` in chunks.
    pub fn write_changeset(&self, out: &mut dyn Write) -> Result<()> {
        let mut sink = Sink { out, error: None };
        // SAFETY: the session is valid; `sink` outlives the call, and `write_chunk`
        // is given exactly that pointer back.
        let rc = unsafe {
            ffi::sqlite3session_changeset_strm(
                self.raw.as_ptr(),
                write_chunk,
                (&mut sink as *mut Sink<'_>).cast(),
            )
        };
        if let Some(e) = sink.error {
            return Err(SessionError::Io(e));
        }
        match rc {
            sql::SQLITE_OK => Ok(()),
            rc => Err(SessionError::code(rc, None)),
        }
    }

    /// The changeset collected so far, in memory.
    pub fn changeset(&self) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.write_changeset(&mut bytes)?;
        Ok(bytes)
    }

    /// The heap memory the session holds now, in bytes: it grows with the changed rows
    /// diffed into it (their keys and values), not with the tables' size.
    pub fn memory_used(&self) -> i64 {
        // SAFETY: the session is valid.
        unsafe { ffi::sqlite3session_memory_used(self.raw.as_ptr()) }
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        // SAFETY: the session was created by sqlite3session_create, is deleted once,
        // and the connection it belongs to is still open (borrowed for 'c).
        unsafe { ffi::sqlite3session_delete(self.raw.as_ptr()) }
    }
}

/// Where a changeset being written goes, and the first write error.
struct Sink<'w> {
    out: &'w mut dyn Write,
    error: Option<std::io::Error>,
}

unsafe extern "C" fn write_chunk(ctx: *mut c_void, data: *const c_void, n: c_int) -> c_int {
    // SAFETY: `ctx` is the `Sink` passed to sqlite3session_changeset_strm, alive for
    // the whole call and used by nothing else meanwhile.
    let sink = unsafe { &mut *ctx.cast::<Sink<'_>>() };
    let bytes = match (data.is_null(), usize::try_from(n)) {
        (false, Ok(n)) if n > 0 => {
            // SAFETY: SQLite hands `n` readable bytes at `data` for this call.
            unsafe { std::slice::from_raw_parts(data.cast::<u8>(), n) }
        }
        _ => return sql::SQLITE_OK,
    };
    match std::panic::catch_unwind(AssertUnwindSafe(|| sink.out.write_all(bytes))) {
        Ok(Ok(())) => sql::SQLITE_OK,
        Ok(Err(e)) => {
            sink.error = Some(e);
            sql::SQLITE_IOERR
        }
        Err(_) => {
            sink.error = Some(std::io::Error::other("the changeset writer panicked"));
            sql::SQLITE_IOERR
        }
    }
}

/// Where a changeset being read comes from, and the first read error.
struct Source<'r> {
    input: &'r mut dyn Read,
    error: Option<std::io::Error>,
}

unsafe extern "C" fn read_chunk(ctx: *mut c_void, data: *mut c_void, n: *mut c_int) -> c_int {
    // SAFETY: `ctx` is the boxed `Source` of a `Changes` or of `apply`, alive for as
    // long as SQLite may call this, and used by nothing else meanwhile.
    let source = unsafe { &mut *ctx.cast::<Source<'_>>() };
    // SAFETY: SQLite passes a valid pointer to the capacity of `data`.
    let want = usize::try_from(unsafe { *n }).unwrap_or(0);
    if want == 0 || data.is_null() {
        // SAFETY: as above; nothing read.
        unsafe { *n = 0 };
        return sql::SQLITE_OK;
    }
    // SAFETY: SQLite hands a buffer of `want` writable bytes.
    let buf = unsafe { std::slice::from_raw_parts_mut(data.cast::<u8>(), want) };
    let read = std::panic::catch_unwind(AssertUnwindSafe(|| {
        loop {
            match source.input.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        }
    }));
    match read {
        Ok(Ok(got)) => {
            // SAFETY: as above; `got <= want`, which fits a c_int.
            unsafe { *n = got as c_int };
            sql::SQLITE_OK
        }
        Ok(Err(e)) => {
            source.error = Some(e);
            sql::SQLITE_IOERR
        }
        Err(_) => {
            source.error = Some(std::io::Error::other("the changeset reader panicked"));
            sql::SQLITE_IOERR
        }
    }
}

/// What a change does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// A new row.
    Insert,
    /// A row's values changed.
    Update,
    /// A row removed.
    Delete,
}

/// One change of a changeset, owned.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The table.
    pub table: String,
    /// What it does.
    pub op: Op,
    /// Whether the change was marked indirect.
    pub indirect: bool,
    /// Per column: whether it is part of the primary key (for a table tracked by rowid,
    /// column 0 is the rowid and the only key column).
    pub pk: Vec<bool>,
    /// Per column, the old values: all of them for a DELETE, the key and the changed
    /// columns for an UPDATE (`None` for the others), none for an INSERT.
    pub old: Vec<Option<Value>>,
    /// Per column, the new values: all for an INSERT, the changed columns for an UPDATE
    /// (`None` for the others and for key columns), none for a DELETE.
    pub new: Vec<Option<Value>>,
}

impl Change {
    /// The primary key's values, in column order: what identifies the row.
    pub fn key(&self) -> Vec<Value> {
        let side = match self.op {
            Op::Insert => &self.new,
            Op::Update | Op::Delete => &self.old,
        };
        self.pk
            .iter()
            .zip(side)
            .filter(|(pk, _)| **pk)
            .map(|(_, v)| v.clone().unwrap_or(Value::Null))
            .collect()
    }

    /// The columns an UPDATE changes (their indexes); every column for an INSERT or a
    /// DELETE.
    pub fn changed_columns(&self) -> Vec<usize> {
        match self.op {
            Op::Update => (0..self.new.len())
                .filter(|&i| self.new[i].is_some() && !self.pk[i])
                .collect(),
            Op::Insert | Op::Delete => (0..self.pk.len()).collect(),
        }
    }
}

/// Reads an owned `sqlite3_value` (`None` for a null pointer: a value the change does
/// not carry).
///
/// # Safety
/// `v` is null or a value SQLite handed out that stays valid during this call.
unsafe fn value_of(v: *mut sql::sqlite3_value) -> Option<Value> {
    if v.is_null() {
        return None;
    }
    // SAFETY (all calls below): `v` is a valid value per this function's contract; the
    // pointers text/blob return stay valid until the next call on `v`, and are copied
    // at once with the length sqlite3_value_bytes gives.
    unsafe {
        Some(match sql::sqlite3_value_type(v) {
            sql::SQLITE_INTEGER => Value::Integer(sql::sqlite3_value_int64(v)),
            sql::SQLITE_FLOAT => Value::Real(sql::sqlite3_value_double(v)),
            sql::SQLITE_TEXT => {
                let p = sql::sqlite3_value_text(v);
                let n = usize::try_from(sql::sqlite3_value_bytes(v)).unwrap_or(0);
                let bytes = if p.is_null() {
                    &[][..]
                } else {
                    std::slice::from_raw_parts(p, n)
                };
                Value::Text(String::from_utf8_lossy(bytes).into_owned())
            }
            sql::SQLITE_BLOB => {
                let p = sql::sqlite3_value_blob(v);
                let n = usize::try_from(sql::sqlite3_value_bytes(v)).unwrap_or(0);
                let bytes = if p.is_null() {
                    &[][..]
                } else {
                    std::slice::from_raw_parts(p.cast::<u8>(), n)
                };
                Value::Blob(bytes.to_vec())
            }
            _ => Value::Null,
        })
    }
}

type ValueFn = unsafe extern "C" fn(
    *mut ffi::sqlite3_changeset_iter,
    c_int,
    *mut *mut sql::sqlite3_value,
) -> c_int;

/// The values of all `n` columns through `get` (old, new or conflict).
///
/// # Safety
/// `iter` points at a current change (after a successful next, or in a conflict
/// handler) with `n` columns.
unsafe fn values(
    iter: *mut ffi::sqlite3_changeset_iter,
    n: c_int,
    get: ValueFn,
) -> Vec<Option<Value>> {
    (0..n)
        .map(|i| {
            let mut v = ptr::null_mut();
            // SAFETY: per the contract, `iter` is valid with `n` columns; on an error
            // (SQLITE_MISUSE for a side the op has not) `v` stays null.
            let rc = unsafe { get(iter, i, &mut v) };
            // SAFETY: `v` is null or valid until the iterator moves.
            if rc == sql::SQLITE_OK {
                unsafe { value_of(v) }
            } else {
                None
            }
        })
        .collect()
}

/// Reads the change `iter` points at.
///
/// # Safety
/// `iter` points at a current change (after a successful next, or in a conflict
/// handler).
unsafe fn read_change(iter: *mut ffi::sqlite3_changeset_iter) -> Result<Change> {
    let (mut table, mut n, mut op, mut indirect) = (ptr::null(), 0, 0, 0);
    // SAFETY: per the contract `iter` is current; the out pointers are valid locals.
    let rc = unsafe { ffi::sqlite3changeset_op(iter, &mut table, &mut n, &mut op, &mut indirect) };
    if rc != sql::SQLITE_OK {
        return Err(SessionError::code(rc, None));
    }
    let (mut pk, mut npk) = (ptr::null_mut(), 0);
    // SAFETY: as above.
    let rc = unsafe { ffi::sqlite3changeset_pk(iter, &mut pk, &mut npk) };
    if rc != sql::SQLITE_OK {
        return Err(SessionError::code(rc, None));
    }
    let table = if table.is_null() {
        String::new()
    } else {
        // SAFETY: SQLite hands a NUL-terminated table name valid until the iterator
        // moves; it is copied at once.
        unsafe { CStr::from_ptr(table) }
            .to_string_lossy()
            .into_owned()
    };
    let pk = match (pk.is_null(), usize::try_from(npk)) {
        // SAFETY: SQLite hands `npk` flags at `pk`, valid until the iterator moves.
        (false, Ok(npk)) => unsafe { std::slice::from_raw_parts(pk, npk) }
            .iter()
            .map(|&b| b != 0)
            .collect(),
        _ => Vec::new(),
    };
    let op = match op {
        sql::SQLITE_INSERT => Op::Insert,
        sql::SQLITE_UPDATE => Op::Update,
        sql::SQLITE_DELETE => Op::Delete,
        other => {
            return Err(SessionError::code(
                sql::SQLITE_CORRUPT,
                Some(format!("unknown change type {other}")),
            ));
        }
    };
    // SAFETY: `iter` is current with `n` columns; each side is read only where the op
    // has it (old: UPDATE, DELETE; new: INSERT, UPDATE).
    let old = match op {
        Op::Insert => vec![None; n as usize],
        _ => unsafe { values(iter, n, ffi::sqlite3changeset_old) },
    };
    // SAFETY: as above.
    let new = match op {
        Op::Delete => vec![None; n as usize],
        _ => unsafe { values(iter, n, ffi::sqlite3changeset_new) },
    };
    Ok(Change {
        table,
        op,
        indirect: indirect != 0,
        pk,
        old,
        new,
    })
}

/// A changeset read change by change from a stream: memory stays that of one change
/// (and SQLite's read buffer) whatever the changeset's size.
pub struct Changes<'r> {
    iter: NonNull<ffi::sqlite3_changeset_iter>,
    // Boxed so its address stays put while SQLite holds it; dropped after the iterator
    // (see Drop).
    source: Box<Source<'r>>,
}

impl<'r> Changes<'r> {
    /// Starts reading a changeset from `input`.
    pub fn start(input: &'r mut dyn Read) -> Result<Changes<'r>> {
        let mut source = Box::new(Source { input, error: None });
        let mut iter = ptr::null_mut();
        // SAFETY: `source` is boxed and lives in the returned value as long as the
        // iterator (finalized first in Drop); `read_chunk` gets that pointer back.
        let rc = unsafe {
            ffi::sqlite3changeset_start_strm(
                &mut iter,
                read_chunk,
                (&mut *source as *mut Source<'_>).cast(),
            )
        };
        if rc != sql::SQLITE_OK {
            if !iter.is_null() {
                // SAFETY: a handle SQLite gave out on a failed start is finalized once.
                unsafe { ffi::sqlite3changeset_finalize(iter) };
            }
            return Err(source
                .error
                .take()
                .map_or_else(|| SessionError::code(rc, None), SessionError::Io));
        }
        let iter = NonNull::new(iter).ok_or_else(|| SessionError::code(sql::SQLITE_NOMEM, None))?;
        Ok(Changes { iter, source })
    }

    /// The next change, or `None` at the end. A changeset that is not well formed is
    /// an error for which [`SessionError::is_corrupt`] is true.
    pub fn next_change(&mut self) -> Result<Option<Change>> {
        // SAFETY: the iterator is valid until Drop.
        let rc = unsafe { ffi::sqlite3changeset_next(self.iter.as_ptr()) };
        match rc {
            sql::SQLITE_ROW => {
                // SAFETY: after SQLITE_ROW the iterator points at a current change.
                unsafe { read_change(self.iter.as_ptr()) }.map(Some)
            }
            sql::SQLITE_DONE => Ok(None),
            rc => Err(match self.source.error.take() {
                Some(e) => SessionError::Io(e),
                None => SessionError::code(rc, None),
            }),
        }
    }
}

impl Drop for Changes<'_> {
    fn drop(&mut self) {
        // SAFETY: the iterator is finalized exactly once, before `source` is dropped.
        unsafe { ffi::sqlite3changeset_finalize(self.iter.as_ptr()) };
    }
}

/// Why the conflict handler is called (SQLite's `SQLITE_CHANGESET_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictKind {
    /// UPDATE or DELETE: the row is there, but its values are not the change's old
    /// values.
    Data,
    /// UPDATE or DELETE: no row with that primary key.
    NotFound,
    /// INSERT: a row with that primary key is already there.
    Conflict,
    /// The change breaks a constraint (UNIQUE, NOT NULL, CHECK).
    Constraint,
    /// At the end: foreign keys are violated (only with `PRAGMA foreign_keys=ON`).
    ForeignKey,
}

/// What to do about a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Skip the change (for a foreign-key conflict: keep the changes anyway).
    Omit,
    /// Write the change over the row that is there. Only for [`ConflictKind::Data`]
    /// and [`ConflictKind::Conflict`]; anywhere else it is taken as [`Resolution::Omit`].
    Replace,
    /// Stop: nothing of the changeset stays applied.
    Abort,
}

/// A conflict met while applying.
#[derive(Debug, Clone)]
pub struct Conflict {
    /// Why.
    pub kind: ConflictKind,
    /// The change (none for [`ConflictKind::ForeignKey`]).
    pub change: Option<Change>,
    /// The row in the database that conflicts (for `Data` and `Conflict`).
    pub current: Option<Vec<Option<Value>>>,
    /// For `ForeignKey`: how many foreign key constraints are violated.
    pub foreign_keys: i32,
}

/// How an [`apply`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Every change was applied or resolved.
    Done,
    /// The handler said [`Resolution::Abort`]: nothing of this call stays applied.
    Aborted,
}

struct ApplyCtx<'h> {
    handler: &'h mut dyn FnMut(&Conflict) -> Resolution,
    error: Option<SessionError>,
}

unsafe extern "C" fn on_conflict(
    ctx: *mut c_void,
    kind: c_int,
    iter: *mut ffi::sqlite3_changeset_iter,
) -> c_int {
    // SAFETY: `ctx` is the `ApplyCtx` passed to apply, alive for the whole call.
    let ctx = unsafe { &mut *ctx.cast::<ApplyCtx<'_>>() };
    let kind = match kind {
        ffi::SQLITE_CHANGESET_DATA => ConflictKind::Data,
        ffi::SQLITE_CHANGESET_NOTFOUND => ConflictKind::NotFound,
        ffi::SQLITE_CHANGESET_CONFLICT => ConflictKind::Conflict,
        ffi::SQLITE_CHANGESET_CONSTRAINT => ConflictKind::Constraint,
        ffi::SQLITE_CHANGESET_FOREIGN_KEY => ConflictKind::ForeignKey,
        // No other kind exists; one added by a later SQLite is met safely by aborting.
        _ => return ffi::SQLITE_CHANGESET_ABORT,
    };
    let conflict = if kind == ConflictKind::ForeignKey {
        let mut n = 0;
        // SAFETY: in a FOREIGN_KEY conflict `iter` is valid for this call.
        unsafe { ffi::sqlite3changeset_fk_conflicts(iter, &mut n) };
        Conflict {
            kind,
            change: None,
            current: None,
            foreign_keys: n,
        }
    } else {
        // SAFETY: in the handler `iter` points at the conflicting change.
        let change = match unsafe { read_change(iter) } {
            Ok(change) => change,
            Err(e) => {
                ctx.error = Some(e);
                return ffi::SQLITE_CHANGESET_ABORT;
            }
        };
        let current = matches!(kind, ConflictKind::Data | ConflictKind::Conflict).then(|| {
            // SAFETY: for DATA and CONFLICT the conflicting row's values are readable
            // through sqlite3changeset_conflict during this call.
            unsafe {
                values(
                    iter,
                    change.pk.len() as c_int,
                    ffi::sqlite3changeset_conflict,
                )
            }
        });
        Conflict {
            kind,
            change: Some(change),
            current,
            foreign_keys: 0,
        }
    };
    let resolution = std::panic::catch_unwind(AssertUnwindSafe(|| (ctx.handler)(&conflict)))
        .unwrap_or(Resolution::Abort);
    match resolution {
        Resolution::Abort => ffi::SQLITE_CHANGESET_ABORT,
        Resolution::Replace if matches!(kind, ConflictKind::Data | ConflictKind::Conflict) => {
            ffi::SQLITE_CHANGESET_REPLACE
        }
        Resolution::Replace | Resolution::Omit => ffi::SQLITE_CHANGESET_OMIT,
    }
}

/// Applies the changeset read from `input` to the `main` database of `conn`, calling
/// `handler` for each conflict. Inside one savepoint: on an abort or an error nothing
/// of it stays applied. Tables of the changeset the database lacks (or holds with
/// other columns) are skipped by SQLite: check them first (the caller's job, see
/// `rows::apply`).
pub fn apply(
    conn: &Connection,
    input: &mut dyn Read,
    handler: &mut dyn FnMut(&Conflict) -> Resolution,
) -> Result<Applied> {
    let mut source = Box::new(Source { input, error: None });
    let mut ctx = ApplyCtx {
        handler,
        error: None,
    };
    // SAFETY: the connection handle is valid for the call; `source` and `ctx` outlive
    // it and are handed back unchanged to `read_chunk` and `on_conflict`; no rebase
    // buffer is asked for (null out pointers are allowed).
    let rc = unsafe {
        ffi::sqlite3changeset_apply_v2_strm(
            conn.handle(),
            read_chunk,
            (&mut *source as *mut Source<'_>).cast(),
            None,
            Some(on_conflict),
            (&mut ctx as *mut ApplyCtx<'_>).cast(),
            ptr::null_mut(),
            ptr::null_mut(),
            0,
        )
    };
    if let Some(e) = ctx.error {
        return Err(e);
    }
    if let Some(e) = source.error {
        return Err(SessionError::Io(e));
    }
    match rc {
        sql::SQLITE_OK => Ok(Applied::Done),
        sql::SQLITE_ABORT => Ok(Applied::Aborted),
        rc => {
            // SAFETY: the handle is valid; the message is copied at once.
            let msg = unsafe { CStr::from_ptr(sql::sqlite3_errmsg(conn.handle())) }
                .to_string_lossy()
                .into_owned();
            Err(SessionError::code(rc, Some(msg)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(sql_a: &str, sql_b: &str) -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(sql_b).unwrap();
        conn.execute("ATTACH ':memory:' AS a", []).unwrap();
        let a = sql_a
            .replace("TABLE ", "TABLE a.")
            .replace("INTO ", "INTO a.");
        conn.execute_batch(&a).unwrap();
        conn
    }

    fn changes(bytes: &[u8]) -> Vec<Change> {
        let mut input = bytes;
        let mut changes = Changes::start(&mut input).unwrap();
        let mut out = Vec::new();
        while let Some(c) = changes.next_change().unwrap() {
            out.push(c);
        }
        out
    }

    const A: &str = "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, b BLOB, r REAL);
        INSERT INTO t VALUES(1,'one',x'00ff',1.5),(2,'two',NULL,2.0),(3,'three',x'',NULL);";
    const B: &str = "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, b BLOB, r REAL);
        INSERT INTO t VALUES(1,'one',x'00ff',1.5),(2,'TWO',NULL,2.0),(4,'four',x'01',-0.25);";

    #[test]
    fn a_diff_lists_inserts_updates_and_deletes_with_their_values() {
        let conn = pair(A, B);
        let mut s = Session::new(&conn, "main", false).unwrap();
        s.diff("a", "t").unwrap();
        assert!(s.memory_used() > 0);
        let mut all = changes(&s.changeset().unwrap());
        all.sort_by_key(|c| c.key().first().cloned().map(|v| format!("{v:?}")));
        let ops: Vec<_> = all.iter().map(|c| (c.op, c.key())).collect();
        assert_eq!(
            ops,
            vec![
                (Op::Update, vec![Value::Integer(2)]),
                (Op::Delete, vec![Value::Integer(3)]),
                (Op::Insert, vec![Value::Integer(4)]),
            ]
        );
        assert_eq!(all[0].changed_columns(), vec![1]);
        assert_eq!(all[0].old[1], Some(Value::Text("two".into())));
        assert_eq!(all[0].new[1], Some(Value::Text("TWO".into())));
        assert_eq!(all[0].new[2], None, "unchanged columns are not carried");
        assert_eq!(all[1].old[2], Some(Value::Blob(vec![])));
        assert_eq!(all[2].new[3], Some(Value::Real(-0.25)));
    }

    #[test]
    fn a_changeset_applied_turns_a_into_b() {
        let conn = pair(A, B);
        let mut s = Session::new(&conn, "main", false).unwrap();
        s.diff("a", "t").unwrap();
        let bytes = s.changeset().unwrap();
        drop(s);
        let target = Connection::open_in_memory().unwrap();
        target.execute_batch(A).unwrap();
        let mut met = Vec::new();
        let applied = apply(&target, &mut &bytes[..], &mut |c| {
            met.push(c.kind);
            Resolution::Abort
        })
        .unwrap();
        assert_eq!(applied, Applied::Done);
        assert!(met.is_empty());
        let rows = |c: &Connection, t: &str| -> Vec<String> {
            c.prepare(&format!(
                "SELECT quote(id)||quote(v)||quote(b)||quote(r) FROM {t} ORDER BY id"
            ))
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
        };
        assert_eq!(rows(&target, "t"), rows(&conn, "main.t"));
    }

    #[test]
    fn tables_without_a_primary_key_are_diffed_by_rowid_when_asked() {
        let a = "CREATE TABLE log(msg TEXT); INSERT INTO log VALUES('x'),('y');";
        let b = "CREATE TABLE log(msg TEXT); INSERT INTO log VALUES('x'),('z'),('w');";
        let conn = pair(a, b);
        let mut plain = Session::new(&conn, "main", false).unwrap();
        plain.diff("a", "log").unwrap();
        assert!(
            changes(&plain.changeset().unwrap()).is_empty(),
            "ignored without rowid"
        );
        let mut s = Session::new(&conn, "main", true).unwrap();
        s.diff("a", "log").unwrap();
        let all = changes(&s.changeset().unwrap());
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(all.iter().all(|c| c.pk == vec![true, false]), "{all:?}");
    }

    #[test]
    fn conflicts_reach_the_handler_and_abort_undoes_everything() {
        let conn = pair(A, B);
        let mut s = Session::new(&conn, "main", false).unwrap();
        s.diff("a", "t").unwrap();
        let bytes = s.changeset().unwrap();
        drop(s);
        let target = Connection::open_in_memory().unwrap();
        target.execute_batch(A).unwrap();
        // Row 2 changed here too, row 3 is gone already.
        target
            .execute_batch("UPDATE t SET v='deux' WHERE id=2; DELETE FROM t WHERE id=3;")
            .unwrap();
        let mut met = Vec::new();
        let applied = apply(&target, &mut &bytes[..], &mut |c| {
            met.push((c.kind, c.current.clone().map(|r| r[1].clone())));
            Resolution::Omit
        })
        .unwrap();
        assert_eq!(applied, Applied::Done);
        met.sort_by_key(|m| format!("{m:?}"));
        assert_eq!(
            met,
            vec![
                (ConflictKind::Data, Some(Some(Value::Text("deux".into())))),
                (ConflictKind::NotFound, None),
            ]
        );
        let count: i64 = target
            .query_row("SELECT count(*) FROM t WHERE id=4", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 1, "the rest was applied");
        // Abort: the insert of row 4 is undone with the rest.
        target.execute_batch("DELETE FROM t WHERE id=4").unwrap();
        let applied = apply(&target, &mut &bytes[..], &mut |_| Resolution::Abort).unwrap();
        assert_eq!(applied, Applied::Aborted);
        let count: i64 = target
            .query_row("SELECT count(*) FROM t WHERE id=4", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 0);
    }

    #[test]
    fn garbage_is_not_a_changeset() {
        let garbage = b"SQLite format 3\0 this is no changeset at all".repeat(10);
        let mut input = &garbage[..];
        let err = Changes::start(&mut input)
            .and_then(|mut c| {
                while c.next_change()?.is_some() {}
                Ok(())
            })
            .expect_err("garbage is refused");
        assert!(err.is_corrupt(), "{err:?}");
    }

    #[test]
    fn a_failing_reader_is_an_io_error() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk on fire"))
            }
        }
        let mut input = Broken;
        let err = Changes::start(&mut input)
            .and_then(|mut c| c.next_change().map(|_| ()))
            .expect_err("the read fails");
        assert!(matches!(err, SessionError::Io(_)), "{err:?}");
    }

    #[test]
    fn schemas_that_differ_are_refused_by_name() {
        let conn = pair(
            "CREATE TABLE t(id INTEGER PRIMARY KEY, v);",
            "CREATE TABLE t(id INTEGER PRIMARY KEY, v, w);",
        );
        let mut s = Session::new(&conn, "main", false).unwrap();
        let err = s.diff("a", "t").expect_err("columns differ");
        assert!(
            err.to_string().contains("table schemas do not match"),
            "{err}"
        );
    }
}
