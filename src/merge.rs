//! Three-way merge of row changes: a push made from an older version (OLD) merged onto
//! the replica's latest version (LATEST) instead of being refused as a conflict.
//!
//! [`merge`] takes three database files, OLD, CANDIDATE (the push) and LATEST, and
//! writes the merged database to a fourth:
//!
//! 1. OLD→CANDIDATE ("ours") and OLD→LATEST ("theirs") are compared with
//!    [`Pair::summary`]: a schema change on either side (a table or index added,
//!    dropped or altered, a `CREATE TABLE` changed) or a virtual table refuses the merge
//!    with its reason. Schemas are never merged.
//! 2. The row changes of ours come from [`Pair::changes`], one session per table, into a
//!    changeset file; for each table changed on both sides, the primary keys each side
//!    touched go into a scratch SQLite file (tables without a primary key: by rowid).
//! 3. A key touched on both sides is a **conflict** when the two sides left different
//!    rows (both deleting it, or making it the same row, is no conflict; and two rows
//!    appended on both sides to a table without a primary key, which SQLite gave the
//!    same rowid, are both kept, ours under a new rowid). `refuse`
//!    stops here and lists them; `ours`, `theirs` and `newer` (the row whose
//!    `--lww-column` is greater; a side that deleted the row counts with the base row's
//!    value, and a tie keeps theirs) decide each one.
//! 4. LATEST is copied to the output page for page (through the engine, so the merged
//!    version shares LATEST's unchanged pages), ours' changeset applied onto it in one
//!    transaction with triggers off (the rows a trigger wrote are in the changeset
//!    already), each conflicting row then written as the side that won has it, and
//!    `PRAGMA integrity_check` and `foreign_key_check` run before COMMIT. A change
//!    breaking a UNIQUE, NOT NULL or CHECK constraint, or foreign keys broken by the
//!    merge though neither side broke them, refuses the merge.
//!
//! Memory does not grow with the databases: keys and changesets are files in the
//! caller's scratch directory, rows are read one at a time, and the session holds the
//! changed rows of one table at a time (as `rows` does). At most
//! [`MAX_LISTED_CONFLICTS`] conflicting rows are kept for the report; all are counted.
//!
//! [`merge_into_store`] is what both stores run (the embedded one in-process, a server
//! in its session): OLD and LATEST materialized from the store into scratch files, the
//! merge, then the candidate and the merged file stored as two versions in one
//! transaction (the candidate based on OLD and never the latest, the merge based on
//! LATEST: see [`crate::store::VersionWriter::stage_candidate`]); if the replica moved
//! again meanwhile, it merges again, at most [`MAX_MERGE_ATTEMPTS`] times.
//!
//! Layering: above `rows`, `store`, `engine` and `page`; below `remote` and `server`,
//! which share it.

use std::cmp::Ordering;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use rusqlite::config::DbConfig;
use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, params_from_iter};

use crate::engine::{NoProgress, sync_local};
use crate::page::{Snapshot, Writer};
use crate::protocol::MAX_TEXT_BYTES;
use crate::protocol::control::{MAX_LISTED_CONFLICTS, MergeRequest, MergeResult, RowConflict};
use crate::rows::session::{Applied, Conflict, ConflictKind, Resolution};
use crate::rows::{Pair, Summary, TableStatus, TableSummary, value_json};
use crate::store::{PushOptions, ReplicaPath, Selector, Store, VersionInfo};
use crate::{Error, ErrorKind, Result};

/// The directory under a server's data directory where its merges keep their scratch
/// files, one directory per merge; whatever a killed server left there is removed
/// when it starts again ([`remove_scratch`]).
pub const SCRATCH_DIR: &str = "merging";

/// A new scratch directory for one merge under `root/`[`SCRATCH_DIR`], removed when
/// the returned value is dropped.
pub fn scratch_in(root: &Path) -> Result<tempfile::TempDir> {
    let parent = root.join(SCRATCH_DIR);
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    tempfile::Builder::new()
        .prefix("merge-")
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))
}

/// Removes what merges left under `root/`[`SCRATCH_DIR`] (a server killed while
/// merging); only for the one process that owns `root` (a server, holding its lock).
/// Whether anything was there.
pub fn remove_scratch(root: &Path) -> bool {
    let dir = root.join(SCRATCH_DIR);
    let found = dir.exists();
    if found && let Err(e) = std::fs::remove_dir_all(&dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "could not remove the scratch files of merges");
    }
    found
}

/// How many times [`merge_into_store`] merges when the replica keeps moving while it
/// merges (each attempt merges onto the newest version).
pub const MAX_MERGE_ATTEMPTS: u32 = 3;

/// How rows changed on both sides to different values are decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnConflict {
    /// The merge is refused, the rows listed.
    Refuse,
    /// This push's row wins.
    Ours,
    /// The latest version's row stays.
    Theirs,
    /// The row whose value of this column is greater wins (last writer wins).
    Newer(String),
}

impl OnConflict {
    /// From `--on-conflict` and `--lww-column`.
    pub fn parse(on_conflict: &str, lww_column: Option<&str>) -> Result<OnConflict> {
        let usage = |m: String| Err(Error::Usage(m));
        match (on_conflict, lww_column) {
            ("newer", Some(c)) if !c.is_empty() => Ok(OnConflict::Newer(c.to_owned())),
            ("newer", _) => usage(
                "--on-conflict newer needs --lww-column COL: the column whose greater value \
                 wins (updated_at, say)"
                    .into(),
            ),
            (_, Some(_)) => usage("--lww-column goes with --on-conflict newer".into()),
            ("refuse", None) => Ok(OnConflict::Refuse),
            ("ours", None) => Ok(OnConflict::Ours),
            ("theirs", None) => Ok(OnConflict::Theirs),
            (other, None) => usage(format!(
                "--on-conflict {other}: expected refuse, ours, theirs or newer"
            )),
        }
    }

    /// From a protocol request.
    pub fn from_request(request: &MergeRequest) -> Result<OnConflict> {
        OnConflict::parse(&request.on_conflict, request.lww_column.as_deref())
    }

    /// As a protocol request.
    pub fn request(&self) -> MergeRequest {
        let (name, column) = match self {
            OnConflict::Refuse => ("refuse", None),
            OnConflict::Ours => ("ours", None),
            OnConflict::Theirs => ("theirs", None),
            OnConflict::Newer(c) => ("newer", Some(c.clone())),
        };
        MergeRequest {
            on_conflict: name.into(),
            lww_column: column,
        }
    }
}

/// A table changed on both sides.
struct Both {
    /// Its index in the key tables' names (`ours_N`, `theirs_N`, `win_N`).
    n: usize,
    table: TableSummary,
    /// The key columns' names, in the changeset's column order.
    keys: Vec<String>,
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl Both {
    /// `k0 IS ?1 AND k1 IS ?2 …` over this table's key columns, with `prefix`.
    fn key_match(&self, prefix: &str) -> String {
        self.keys
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{prefix}{} IS ?{}", ident(k), i + 1))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    fn column_list(&self) -> String {
        self.table
            .columns
            .iter()
            .map(|c| ident(c))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The key table columns `k0, k1, …`.
    fn key_columns(&self) -> String {
        (0..self.keys.len())
            .map(|i| format!("k{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The key column names of a changed table, in its changes' column order (the rowid's
/// name for a table compared by rowid).
fn key_names(t: &TableSummary) -> Vec<String> {
    t.columns
        .iter()
        .zip(&t.pk)
        .filter(|(_, pk)| **pk)
        .map(|(c, _)| c.clone())
        .collect()
}

/// Why `summary` (of `side`) cannot be merged, if it cannot: a schema change or a
/// table whose rows cannot be compared.
fn schema_refusal(summary: &Summary, side: &str) -> Option<String> {
    for t in &summary.tables {
        let why = match t.status {
            TableStatus::Added => format!("table {} was added by {side}", t.name),
            TableStatus::Dropped => format!("table {} was dropped by {side}", t.name),
            TableStatus::Altered => format!(
                "table {} was altered by {side} ({})",
                t.name,
                t.reason.as_deref().unwrap_or("its columns changed")
            ),
            TableStatus::NotDiffable => format!(
                "table {} is {}: its rows cannot be compared, so they cannot be merged",
                t.name,
                t.reason.as_deref().unwrap_or("not diffable")
            ),
            TableStatus::Changed | TableStatus::Same if t.definition_changed => {
                format!("the CREATE TABLE of {} was changed by {side}", t.name)
            }
            TableStatus::Changed | TableStatus::Same => continue,
        };
        return Some(why);
    }
    summary
        .objects
        .first()
        .map(|o| format!("{} {} was {} by {side}", o.kind, o.name, o.change))
}

fn sql(path: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |e| Error::sqlite(path, e)
}

/// One row of `db.table` by key: its values in `both`'s column order, or `None`.
fn row(
    conn: &Connection,
    db: &str,
    both: &Both,
    key: &[Value],
) -> rusqlite::Result<Option<Vec<Value>>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {} FROM {db}.{} WHERE {}",
        both.column_list(),
        ident(&both.table.name),
        both.key_match("")
    ))?;
    let n = both.table.columns.len();
    let mut rows = stmt.query(params_from_iter(key))?;
    match rows.next()? {
        Some(r) => {
            let mut values = Vec::with_capacity(n);
            for i in 0..n {
                values.push(r.get::<_, Value>(i)?);
            }
            Ok(Some(values))
        }
        None => Ok(None),
    }
}

fn row_json(
    both: &Both,
    row: &Option<Vec<Value>>,
) -> Option<serde_json::Map<String, serde_json::Value>> {
    row.as_ref().map(|values| {
        both.table
            .columns
            .iter()
            .zip(values)
            .map(|(c, v)| (c.clone(), value_json(v)))
            .collect()
    })
}

/// SQLite's order of values: NULL, then numbers (INTEGER and REAL by value), then
/// text (byte order, as `BINARY` collation), then blobs.
fn compare(a: &Value, b: &Value) -> Ordering {
    fn class(v: &Value) -> u8 {
        match v {
            Value::Null => 0,
            Value::Integer(_) | Value::Real(_) => 1,
            Value::Text(_) => 2,
            Value::Blob(_) => 3,
        }
    }
    match (a, b) {
        (Value::Integer(x), Value::Integer(y)) => x.cmp(y),
        (Value::Integer(x), Value::Real(y)) => (*x as f64).total_cmp(y),
        (Value::Real(x), Value::Integer(y)) => x.total_cmp(&(*y as f64)),
        (Value::Real(x), Value::Real(y)) => x.total_cmp(y),
        (Value::Text(x), Value::Text(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Value::Blob(x), Value::Blob(y)) => x.cmp(y),
        _ => class(a).cmp(&class(b)),
    }
}

/// Copies the database at `from` to `to` page for page, through a consistent snapshot
/// of `from`; returns the copy's digest.
pub fn copy_database(from: &Path, to: &Path) -> Result<String> {
    let mut source = Snapshot::open(from)?;
    // Scratch files have no place in the page-hash cache.
    let mut target = Writer::open(to)?.with_hash_cache(None);
    Ok(sync_local(&mut source, &mut target, &NoProgress)?.digest)
}

/// Removes a database file and its journals, if there.
fn remove_database(path: &Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

/// Merges the row changes OLD→CANDIDATE onto LATEST into `out` (which must not exist;
/// it is left with nothing to keep when the merge is refused), deciding rows changed on
/// both sides by `on_conflict`. `scratch` is a directory for the merge's own files.
///
/// `Ok` with `refused` set when the merge cannot be made (schema changes, conflicting
/// rows with [`OnConflict::Refuse`], a broken constraint); the result's `base`, `onto`
/// and `version` are the caller's to fill in.
pub fn merge(
    old: &Path,
    candidate: &Path,
    latest: &Path,
    out: &Path,
    scratch: &Path,
    on_conflict: &OnConflict,
) -> Result<MergeResult> {
    let mut result = MergeResult::default();
    let ours_pair = Pair::open(old, candidate)?;
    let ours = ours_pair.summary()?;
    let theirs_pair = Pair::open(old, latest)?;
    let theirs = theirs_pair.summary()?;
    if let Some(why) =
        schema_refusal(&ours, "this push").or_else(|| schema_refusal(&theirs, "the latest version"))
    {
        result.refused = Some(format!("schema changes are never merged: {why}"));
        return Ok(result);
    }

    // The key sets and ours' changeset, in the scratch directory.
    let keys_path = scratch.join("keys.db");
    remove_database(&keys_path);
    let keys = Connection::open(&keys_path).map_err(sql(&keys_path))?;
    keys.execute_batch("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; BEGIN")
        .map_err(sql(&keys_path))?;
    let changeset_path = scratch.join("ours.changeset");
    let file = std::fs::File::create(&changeset_path).map_err(|e| Error::io(&changeset_path, e))?;
    let mut changeset = BufWriter::new(file);
    let mut both = Vec::new();
    for t in ours
        .tables
        .iter()
        .filter(|t| t.status == TableStatus::Changed)
    {
        let other = theirs
            .tables
            .iter()
            .find(|x| x.name == t.name && x.status == TableStatus::Changed);
        let entry = other.map(|_| Both {
            n: both.len(),
            table: t.clone(),
            keys: key_names(t),
        });
        let mut insert = match &entry {
            Some(b) => {
                let columns = b.key_columns();
                let params = (1..=b.keys.len())
                    .map(|i| format!("?{i}"))
                    .collect::<Vec<_>>();
                keys.execute_batch(&format!(
                    "CREATE TABLE ours_{n}({columns}, PRIMARY KEY({columns}));
                     CREATE TABLE theirs_{n}({columns}, PRIMARY KEY({columns}));
                     CREATE TABLE win_{n}({columns}, side TEXT NOT NULL);",
                    n = b.n
                ))
                .map_err(sql(&keys_path))?;
                Some(
                    keys.prepare(&format!(
                        "INSERT OR IGNORE INTO ours_{}({columns}) VALUES ({})",
                        b.n,
                        params.join(", ")
                    ))
                    .map_err(sql(&keys_path))?,
                )
            }
            None => None,
        };
        let mut count = 0u64;
        ours_pair.changes(
            t,
            Some(&mut changeset),
            Some(&mut |c| {
                count += 1;
                if let Some(stmt) = insert.as_mut() {
                    stmt.execute(params_from_iter(c.key()))
                        .map_err(sql(&keys_path))?;
                }
                Ok(())
            }),
        )?;
        drop(insert);
        result.changes += count;
        if let (Some(b), Some(other)) = (entry, other) {
            let columns = b.key_columns();
            let params = (1..=b.keys.len())
                .map(|i| format!("?{i}"))
                .collect::<Vec<_>>();
            let mut insert = keys
                .prepare(&format!(
                    "INSERT OR IGNORE INTO theirs_{}({columns}) VALUES ({})",
                    b.n,
                    params.join(", ")
                ))
                .map_err(sql(&keys_path))?;
            theirs_pair.changes(
                other,
                None,
                Some(&mut |c| {
                    insert
                        .execute(params_from_iter(c.key()))
                        .map(drop)
                        .map_err(sql(&keys_path))
                }),
            )?;
            drop(insert);
            both.push(b);
        }
    }
    changeset
        .flush()
        .map_err(|e| Error::io(&changeset_path, e))?;
    drop(changeset);
    keys.execute_batch("COMMIT").map_err(sql(&keys_path))?;
    drop((ours_pair, theirs_pair));

    // The conflicts: keys touched on both sides that the two sides left different.
    for (db, path) in [("o", old), ("c", candidate), ("l", latest)] {
        keys.execute(
            &format!("ATTACH DATABASE ?1 AS {db}"),
            [path.to_string_lossy()],
        )
        .map_err(sql(path))?;
    }
    keys.execute_batch("BEGIN").map_err(sql(&keys_path))?;
    for b in &both {
        let lww = match on_conflict {
            OnConflict::Newer(column) => b.table.columns.iter().position(|c| c == column),
            _ => None,
        };
        let columns = b.key_columns();
        let on = (0..b.keys.len())
            .map(|i| format!("x.k{i} IS y.k{i}"))
            .collect::<Vec<_>>()
            .join(" AND ");
        let mut pairs = keys
            .prepare(&format!(
                "SELECT {} FROM ours_{n} AS x JOIN theirs_{n} AS y ON {on}",
                (0..b.keys.len())
                    .map(|i| format!("x.k{i}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                n = b.n
            ))
            .map_err(sql(&keys_path))?;
        let mut win = keys
            .prepare(&format!(
                "INSERT INTO win_{}({columns}, side) VALUES ({}, ?{})",
                b.n,
                (1..=b.keys.len())
                    .map(|i| format!("?{i}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                b.keys.len() + 1
            ))
            .map_err(sql(&keys_path))?;
        let mut rows = pairs.query([]).map_err(sql(&keys_path))?;
        while let Some(r) = rows.next().map_err(sql(&keys_path))? {
            let key: Vec<Value> = (0..b.keys.len())
                .map(|i| r.get::<_, Value>(i))
                .collect::<rusqlite::Result<_>>()
                .map_err(sql(&keys_path))?;
            let ours_row = row(&keys, "c", b, &key).map_err(sql(candidate))?;
            let theirs_row = row(&keys, "l", b, &key).map_err(sql(latest))?;
            if ours_row == theirs_row {
                continue; // the same row on both sides: no conflict
            }
            let base_row = row(&keys, "o", b, &key).map_err(sql(old))?;
            if b.table.by_rowid && base_row.is_none() && ours_row.is_some() && theirs_row.is_some()
            {
                // Both sides appended a row to a table without a primary key and SQLite
                // gave both the same rowid, which names no row the user chose: both
                // rows are kept, ours under a new rowid.
                let mut params = key.clone();
                params.push(Value::Text("append".into()));
                win.execute(params_from_iter(params))
                    .map_err(sql(&keys_path))?;
                continue;
            }
            let side = match on_conflict {
                OnConflict::Refuse => "refused",
                OnConflict::Ours => "ours",
                OnConflict::Theirs => "theirs",
                OnConflict::Newer(column) => {
                    let Some(i) = lww else {
                        result.refused = Some(format!(
                            "--lww-column {column}: table {} has no such column, so its rows \
                             changed on both sides cannot be decided",
                            b.table.name
                        ));
                        return Ok(result);
                    };
                    // A side that deleted the row counts with the base row's value.
                    let value = |r: &Option<Vec<Value>>| {
                        r.as_ref()
                            .or(base_row.as_ref())
                            .map_or(Value::Null, |r| r[i].clone())
                    };
                    match compare(&value(&ours_row), &value(&theirs_row)) {
                        Ordering::Greater => "ours",
                        _ => "theirs",
                    }
                }
            };
            result.conflicts_total += 1;
            if result.conflicts.len() < MAX_LISTED_CONFLICTS {
                result.conflicts.push(RowConflict {
                    table: b.table.name.clone(),
                    key_columns: b.keys.clone(),
                    key: key.iter().map(value_json).collect(),
                    base: row_json(b, &base_row),
                    theirs: row_json(b, &theirs_row),
                    ours: row_json(b, &ours_row),
                    resolution: side.into(),
                });
            }
            if side != "refused" {
                let mut params = key.clone();
                params.push(Value::Text(side.into()));
                win.execute(params_from_iter(params))
                    .map_err(sql(&keys_path))?;
            }
        }
    }
    keys.execute_batch("COMMIT").map_err(sql(&keys_path))?;
    drop(keys);
    if on_conflict == &OnConflict::Refuse && result.conflicts_total > 0 {
        result.refused = Some(format!(
            "{} row{} changed both by this push and in the latest version, to other values",
            result.conflicts_total,
            if result.conflicts_total == 1 {
                " was"
            } else {
                "s were"
            }
        ));
        return Ok(result);
    }

    // LATEST copied page for page, ours applied onto it, the conflicts decided.
    remove_database(out);
    copy_database(latest, out)?;
    let refused = apply(out, candidate, latest, &keys_path, &changeset_path, &both)?;
    result.refused = refused;
    Ok(result)
}

/// Applies ours' changeset onto `out` (a copy of LATEST), writes the winners of the
/// conflicts, and checks the result, in one transaction. `Some(why)` when refused
/// (nothing committed).
fn apply(
    out: &Path,
    candidate: &Path,
    latest: &Path,
    keys_path: &Path,
    changeset_path: &Path,
    both: &[Both],
) -> Result<Option<String>> {
    let conn = Connection::open(out).map_err(sql(out))?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(sql(out))?;
    // The rows triggers wrote on either side are in the changesets already; foreign
    // keys are checked once, at the end.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER, false)
        .map_err(sql(out))?;
    conn.execute_batch("PRAGMA foreign_keys = OFF")
        .map_err(sql(out))?;
    for (db, path) in [("c", candidate), ("l", latest), ("k", keys_path)] {
        conn.execute(
            &format!("ATTACH DATABASE ?1 AS {db}"),
            [path.to_string_lossy()],
        )
        .map_err(sql(path))?;
    }
    // The conflict handler asks a connection of its own whether a key was touched by
    // theirs too (the applying connection is busy applying).
    let lookup = Connection::open_with_flags(
        keys_path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql(keys_path))?;
    conn.execute_batch("BEGIN IMMEDIATE").map_err(sql(out))?;
    let mut refused: Option<String> = None;
    let mut handler = |c: &Conflict| -> Resolution {
        let Some(change) = &c.change else {
            // Foreign keys are off while applying; they are checked at the end.
            return Resolution::Omit;
        };
        let key = change.key();
        let shown = key
            .iter()
            .map(crate::rows::short_value)
            .collect::<Vec<_>>()
            .join(", ");
        match c.kind {
            ConflictKind::Data | ConflictKind::NotFound | ConflictKind::Conflict => {
                // A row theirs touched too: decided (or the same row) below.
                let touched = both.iter().find(|b| b.table.name == change.table).map(|b| {
                    lookup
                        .query_row(
                            &format!(
                                "SELECT 1 FROM theirs_{} WHERE {}",
                                b.n,
                                (0..b.keys.len())
                                    .map(|i| format!("k{i} IS ?{}", i + 1))
                                    .collect::<Vec<_>>()
                                    .join(" AND ")
                            ),
                            params_from_iter(&key),
                            |_| Ok(()),
                        )
                        .is_ok()
                });
                if touched == Some(true) {
                    return Resolution::Omit;
                }
                refused = Some(format!(
                    "this push's change to table {} key ({shown}) does not fit the latest \
                     version, though the latest version did not change that row",
                    change.table
                ));
                Resolution::Abort
            }
            ConflictKind::Constraint => {
                refused = Some(format!(
                    "this push's change to table {} key ({shown}) breaks a UNIQUE, NOT NULL or \
                     CHECK constraint once merged with the latest version",
                    change.table
                ));
                Resolution::Abort
            }
            ConflictKind::ForeignKey => Resolution::Omit,
        }
    };
    let file = std::fs::File::open(changeset_path).map_err(|e| Error::io(changeset_path, e))?;
    let mut input = BufReader::new(file);
    let applied = crate::rows::apply_changeset(&conn, &mut input, &mut handler);
    let rollback = |conn: &Connection| {
        let _ = conn.execute_batch("ROLLBACK");
    };
    match applied {
        Ok(Applied::Done) => {}
        Ok(Applied::Aborted) => {
            rollback(&conn);
            return Ok(Some(refused.unwrap_or_else(|| {
                "applying this push's changes was aborted".into()
            })));
        }
        Err(e) => {
            rollback(&conn);
            return Err(Error::sqlite(
                out,
                rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
                    Some(format!(
                        "applying this push's changes onto the latest version: {e}"
                    )),
                ),
            ));
        }
    }
    drop(lookup);
    if let Err(e) = write_winners(&conn, both) {
        rollback(&conn);
        return Ok(Some(match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::ConstraintViolation) => format!(
                "a conflicting row, once decided, breaks a UNIQUE, NOT NULL or CHECK constraint: {e}"
            ),
            _ => return Err(Error::sqlite(out, e)),
        }));
    }
    let problems: Vec<String> = conn
        .prepare("PRAGMA main.integrity_check")
        .and_then(|mut s| s.query_map([], |r| r.get::<_, String>(0))?.collect())
        .map_err(sql(out))?;
    if problems != ["ok"] {
        rollback(&conn);
        return Err(Error::Verification(format!(
            "the merged database fails PRAGMA integrity_check ({}); nothing was stored",
            problems.join("; ")
        )));
    }
    let violations = |db: &str| -> Result<u64> {
        let mut stmt = conn
            .prepare(&format!("PRAGMA {db}.foreign_key_check"))
            .map_err(sql(out))?;
        let mut rows = stmt.query([]).map_err(sql(out))?;
        let mut n = 0;
        while rows.next().map_err(sql(out))?.is_some() {
            n += 1;
        }
        Ok(n)
    };
    let broken = violations("main")?;
    if broken > 0 && violations("c")? == 0 && violations("l")? == 0 {
        rollback(&conn);
        return Ok(Some(format!(
            "the merged rows break foreign keys ({broken} row(s) in PRAGMA foreign_key_check) \
             though neither this push nor the latest version does"
        )));
    }
    conn.execute_batch("COMMIT").map_err(sql(out))?;
    Ok(None)
}

/// Writes each decided conflict as the winning side has the row: removed, then copied
/// from that side (none there: it stays removed).
fn write_winners(conn: &Connection, both: &[Both]) -> rusqlite::Result<()> {
    for b in both {
        let table = ident(&b.table.name);
        let columns = b.column_list();
        let matching = b.key_match("");
        let mut delete = conn.prepare(&format!("DELETE FROM main.{table} WHERE {matching}"))?;
        let copy = |db: &str| {
            format!(
                "INSERT INTO main.{table}({columns}) SELECT {columns} FROM {db}.{table} WHERE {matching}"
            )
        };
        let mut from_ours = conn.prepare(&copy("c"))?;
        let mut from_theirs = conn.prepare(&copy("l"))?;
        // A row both sides appended to a table without a primary key: ours gets the
        // next rowid.
        let values = match b.table.by_rowid {
            true => b.table.columns[1..]
                .iter()
                .map(|c| ident(c))
                .collect::<Vec<_>>()
                .join(", "),
            false => columns.clone(),
        };
        let mut append = conn.prepare(&format!(
            "INSERT INTO main.{table}({values}) SELECT {values} FROM c.{table} WHERE {matching}"
        ))?;
        let mut winners = conn.prepare(&format!(
            "SELECT {}, side FROM k.win_{}",
            b.key_columns(),
            b.n
        ))?;
        let mut rows = winners.query([])?;
        while let Some(r) = rows.next()? {
            let key: Vec<Value> = (0..b.keys.len())
                .map(|i| r.get::<_, Value>(i))
                .collect::<rusqlite::Result<_>>()?;
            let side: String = r.get(b.keys.len())?;
            if side == "append" {
                append.execute(params_from_iter(&key))?;
                continue;
            }
            delete.execute(params_from_iter(&key))?;
            match side.as_str() {
                "ours" => from_ours.execute(params_from_iter(&key))?,
                _ => from_theirs.execute(params_from_iter(&key))?,
            };
        }
    }
    Ok(())
}

/// What [`merge_into_store`] needs to know of the push.
#[derive(Debug, Clone)]
pub struct Request {
    /// The replica.
    pub replica: ReplicaPath,
    /// The version the push was based on (OLD).
    pub base: u64,
    /// How conflicts are decided.
    pub on_conflict: OnConflict,
    /// The push's own commit message (may be empty).
    pub message: String,
    /// Who pushed.
    pub client_id: String,
    /// With which key.
    pub key_id: String,
}

/// What [`merge_into_store`] made.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The merge's report (`refused` unset).
    pub result: MergeResult,
    /// The version now latest (the merge's, or the unchanged latest one).
    pub version: VersionInfo,
    /// Whether the merge made it (`false`: the push held the latest version, or no row
    /// change of its own, so nothing was stored).
    pub created: bool,
}

/// The commit message of a merge: `merge of v10 (this push, based on v7) onto v9`,
/// then the push's own message, within the protocol's limit. `candidate` is the
/// version that holds what the push sent.
pub fn message(candidate: u64, base: u64, onto: u64, own: &str) -> String {
    within_limit(
        format!("merge of v{candidate} (this push, based on v{base}) onto v{onto}"),
        own,
    )
}

/// The commit message of a merge's candidate: `push based on v7, merged in v11`, then
/// the push's own message, within the protocol's limit.
pub fn candidate_message(base: u64, merged_into: u64, own: &str) -> String {
    within_limit(
        format!("push based on v{base}, merged in v{merged_into}"),
        own,
    )
}

fn within_limit(mut m: String, own: &str) -> String {
    if !own.is_empty() {
        m.push_str(": ");
        m.push_str(own);
    }
    if m.len() > MAX_TEXT_BYTES {
        let mut end = MAX_TEXT_BYTES;
        while !m.is_char_boundary(end) {
            end -= 1;
        }
        m.truncate(end);
    }
    m
}

/// Writes version `number` of `replica` into the database file `path` (a delta when
/// `path` holds another version already).
pub fn materialize(
    store: &Store,
    replica: &ReplicaPath,
    number: u64,
    path: &Path,
) -> Result<VersionInfo> {
    let mut reader = store.read(replica, Selector::Number(number))?;
    let info = reader.info().clone();
    let mut writer = Writer::open(path)?.with_hash_cache(None);
    sync_local(&mut reader, &mut writer, &NoProgress)?;
    Ok(info)
}

/// The answer of a merge that stores nothing: the push is at `latest` (version `onto`).
fn at_latest(mut result: MergeResult, onto: u64, latest: VersionInfo) -> Stored {
    result.version = onto;
    result.digest = latest.digest.clone();
    Stored {
        result,
        version: latest,
        created: false,
    }
}

/// The error of a refused merge: [`Error::MergeRefused`], its message naming the
/// versions and the reason, the first conflicting rows after it.
pub fn refusal(replica: &ReplicaPath, result: &MergeResult) -> Error {
    let why = result.refused.as_deref().unwrap_or("refused");
    let advice = if result.conflicts_total > 0 {
        "; nothing was stored. Decide them with --on-conflict ours, theirs or newer \
         --lww-column COL, or pull the replica into another file and compare"
    } else {
        "; nothing was stored. Pull the replica into another file and compare, or push \
         with --force to replace the latest version"
    };
    Error::MergeRefused {
        message: format!(
            "VERSION_CONFLICT: {replica} moved from version {} (this push's base) to {}, and \
             the merge was refused: {why}{advice}",
            result.base, result.onto
        ),
        report: Box::new(serde_json::to_value(result).unwrap_or_default()),
    }
}

/// Merges the push whose rows are in the database file `candidate` (based on
/// `request.base`; its digest `candidate_digest`) onto `replica`'s latest version and
/// stores, in one transaction, the candidate as a version of its own (`v10: push based
/// on v7, merged in v11`) and the merge (`v11: merge of v10 (this push, based on v7)
/// onto v9`), as a merge commit records both parents: the pushing client whose LOCAL
/// kept later changes then bases its next push on the candidate, and its three-way diff
/// sees only what changed since. The latest version goes from v9 to v11 at once; the
/// candidate is never the latest. A candidate that holds exactly the latest version
/// merges nothing and stores nothing.
///
/// Scratch files go to `scratch` (the caller removes it). A refused merge is
/// [`Error::MergeRefused`]; OLD no longer stored is [`Error::NotFound`] with the
/// reason. Blocking.
pub fn merge_into_store(
    store: &Store,
    request: &Request,
    candidate: &Path,
    candidate_digest: &str,
    scratch: &Path,
) -> Result<Stored> {
    let replica = &request.replica;
    let old = scratch.join("old.db");
    materialize(store, replica, request.base, &old).map_err(|e| match e.kind() {
        ErrorKind::NotFound => Error::NotFound(format!(
            "cannot merge: version {} of {replica}, the one this push is based on, is no \
             longer stored ({e}); nothing was stored. Pull the replica into another file and \
             compare (`sqlferry diff`); `push --force` would replace the latest version with \
             this push, leaving the rows others pushed since only in older versions",
            request.base
        )),
        _ => e.context(format!(
            "cannot merge: reading version {} of {replica}",
            request.base
        )),
    })?;
    let latest_path = scratch.join("latest.db");
    let out = scratch.join("merged.db");
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut latest = store
            .latest(replica)?
            .ok_or_else(|| Error::NotFound(format!("replica {replica} does not exist")))?
            .version;
        // A latest version made by chunks may record no digest 1, which the merge
        // compares with the candidate's and the merge's: made from its manifest.
        store.fill_digest1(replica, &mut latest)?;
        if latest.digest == candidate_digest {
            // The push holds exactly the latest version: nothing to merge or store.
            let result = MergeResult {
                base: request.base,
                onto: latest.number,
                version: latest.number,
                digest: latest.digest.clone(),
                candidate: latest.number,
                ..MergeResult::default()
            };
            return Ok(Stored {
                result,
                version: latest,
                created: false,
            });
        }
        let onto = latest.number;
        materialize(store, replica, onto, &latest_path)?;
        let mut result = merge(
            &old,
            candidate,
            &latest_path,
            &out,
            scratch,
            &request.on_conflict,
        )?;
        result.base = request.base;
        result.onto = onto;
        if result.refused.is_some() {
            return Err(refusal(replica, &result));
        }
        if result.changes == 0 {
            // No row of this push differs from its base (a subscriber following the
            // other side's versions, say): the merge is the latest version as it is.
            // Nothing is stored, so that two such subscribers do not answer each
            // other's versions with versions of their own, for ever.
            return Ok(at_latest(result, onto, latest));
        }
        let merged_digest = {
            let mut snap = Snapshot::open(&out)?.with_hash_cache(None);
            crate::digest::hex(&snap.digest(true)?)
        };
        if merged_digest == latest.digest {
            // The latest version holds this push's rows already (the same push, its
            // merge committed and the answer lost, retried; or another push making
            // the same rows): the merge adds nothing, so nothing is stored and the
            // push is at the latest version. Storing the candidate with an unchanged
            // merge would only grow the history.
            return Ok(at_latest(result, onto, latest));
        }
        // The candidate is numbered onto + 1 and the merge onto + 2: the writer stores
        // them only onto `onto` (else VERSION_CONFLICT, and this merges again).
        let (numbered, merged) = (onto + 1, onto + 2);
        let options = PushOptions {
            base: Some(onto),
            force: false,
            message: message(numbered, request.base, onto, &request.message),
            client_id: request.client_id.clone(),
            key_id: request.key_id.clone(),
            encryption: None,
            rekey_from: None,
            passphrase: None,
        };
        let mut writer = store.push(replica, options)?;
        writer.stage_candidate(
            request.base,
            candidate_message(request.base, merged, &request.message),
        );
        let sync = |path: &Path, writer: &mut crate::store::VersionWriter| {
            Snapshot::open(path).and_then(|source| {
                let mut source = source.with_hash_cache(None);
                sync_local(&mut source, writer, &NoProgress)
            })
        };
        let pushed = sync(candidate, &mut writer).and_then(|_| sync(&out, &mut writer));
        match pushed {
            Ok(_) => {
                let (version, created) = writer
                    .outcome()
                    .map(|(v, c)| (v.clone(), c))
                    .expect("a successful sync leaves an outcome");
                result.candidate = writer.candidate().unwrap_or(0);
                let removed = writer.removed().to_vec();
                drop(writer);
                store.collect_after_removal(replica, &removed);
                result.version = version.number;
                result.digest = version.digest.clone();
                tracing::info!(%replica, base = request.base, onto, candidate = result.candidate,
                    version = version.number, changes = result.changes,
                    conflicts = result.conflicts_total, "merged a push");
                return Ok(Stored {
                    result,
                    version,
                    created,
                });
            }
            // Another push landed while this one merged: merge onto it.
            Err(e) if e.kind() == ErrorKind::Conflict && attempt < MAX_MERGE_ATTEMPTS => {
                tracing::info!(%replica, attempt, "the replica moved while merging: merging again");
                drop(writer);
                remove_database(&out);
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const SCHEMA: &str = "CREATE TABLE t(id INTEGER PRIMARY KEY, a INTEGER, b TEXT);
        CREATE TABLE log(msg TEXT);";

    fn db(path: &Path, sql: &str) {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(sql).unwrap();
    }

    fn rows(path: &Path) -> Vec<(i64, Option<i64>, Option<String>)> {
        let conn = Connection::open(path).unwrap();
        conn.prepare("SELECT id, a, b FROM t ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    struct Three {
        dir: tempfile::TempDir,
    }

    impl Three {
        /// OLD from `base`, then CANDIDATE and LATEST as copies with `ours` and
        /// `theirs` run on them.
        fn new(base: &str, ours: &str, theirs: &str) -> Three {
            let dir = tempfile::tempdir().unwrap();
            let three = Three { dir };
            db(&three.path("old.db"), &format!("{SCHEMA}{base}"));
            for (name, sql) in [("ours.db", ours), ("theirs.db", theirs)] {
                copy_database(&three.path("old.db"), &three.path(name)).unwrap();
                db(&three.path(name), sql);
            }
            std::fs::create_dir(three.path("scratch")).unwrap();
            three
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn merge(&self, mode: &OnConflict) -> MergeResult {
            remove_database(&self.path("out.db"));
            merge(
                &self.path("old.db"),
                &self.path("ours.db"),
                &self.path("theirs.db"),
                &self.path("out.db"),
                &self.path("scratch"),
                mode,
            )
            .unwrap()
        }
    }

    const BASE: &str = "INSERT INTO t VALUES (1, 10, 'one'), (2, 20, 'two'), (3, 30, 'three');
        INSERT INTO log VALUES ('a'), ('b');";

    #[test]
    fn disjoint_edits_merge_with_every_row_of_both() {
        let three = Three::new(
            BASE,
            "UPDATE t SET a = 11 WHERE id = 1; INSERT INTO t VALUES (4, 40, 'four');
             INSERT INTO log VALUES ('ours');",
            "DELETE FROM t WHERE id = 3; INSERT INTO t VALUES (5, 50, 'five');
             UPDATE log SET msg = 'B' WHERE msg = 'b'; INSERT INTO log VALUES ('theirs');",
        );
        let r = three.merge(&OnConflict::Refuse);
        assert_eq!(r.refused, None);
        assert_eq!(r.conflicts_total, 0);
        assert_eq!(r.changes, 3);
        assert_eq!(
            rows(&three.path("out.db")),
            vec![
                (1, Some(11), Some("one".into())),
                (2, Some(20), Some("two".into())),
                (4, Some(40), Some("four".into())),
                (5, Some(50), Some("five".into())),
            ]
        );
        let conn = Connection::open(three.path("out.db")).unwrap();
        let log: Vec<String> = conn
            .prepare("SELECT msg FROM log ORDER BY rowid")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(log, ["a", "B", "theirs", "ours"], "both appended rows kept");
        let ok: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
    }

    #[test]
    fn overlapping_edits_are_refused_with_the_three_rows() {
        let three = Three::new(
            BASE,
            "UPDATE t SET a = 11 WHERE id = 1; UPDATE t SET a = 22 WHERE id = 2;",
            "UPDATE t SET b = 'uno' WHERE id = 1; UPDATE t SET a = 22 WHERE id = 2;",
        );
        let r = three.merge(&OnConflict::Refuse);
        assert!(
            r.refused.as_deref().unwrap().contains("1 row was changed"),
            "{r:?}"
        );
        assert_eq!(
            r.conflicts_total, 1,
            "row 2 changed the same way on both sides"
        );
        let c = &r.conflicts[0];
        assert_eq!(
            (c.table.as_str(), c.key.clone()),
            ("t", vec![serde_json::json!(1)])
        );
        assert_eq!(c.key_columns, ["id"]);
        assert_eq!(c.base.as_ref().unwrap()["a"], 10);
        assert_eq!(c.ours.as_ref().unwrap()["a"], 11);
        assert_eq!(c.theirs.as_ref().unwrap()["b"], "uno");
        assert_eq!(c.resolution, "refused");
        assert!(!three.path("out.db").exists(), "nothing written");
    }

    #[test]
    fn each_mode_decides_conflicts_its_way() {
        let base = "INSERT INTO t VALUES (1, 10, 'one'), (2, 20, 'two'), (3, 30, 'three');";
        // Row 1: both update (ours a newer a=15, theirs a=12); row 2: ours deletes,
        // theirs updates to a=25; row 3: ours updates to a=5, theirs deletes.
        let three = Three::new(
            base,
            "UPDATE t SET a = 15 WHERE id = 1; DELETE FROM t WHERE id = 2;
             UPDATE t SET a = 5 WHERE id = 3;",
            "UPDATE t SET a = 12 WHERE id = 1; UPDATE t SET a = 25 WHERE id = 2;
             DELETE FROM t WHERE id = 3;",
        );
        let ours = three.merge(&OnConflict::Ours);
        assert_eq!((ours.refused.clone(), ours.conflicts_total), (None, 3));
        assert_eq!(
            rows(&three.path("out.db")),
            vec![
                (1, Some(15), Some("one".into())),
                (3, Some(5), Some("three".into()))
            ]
        );
        let theirs = three.merge(&OnConflict::Theirs);
        assert_eq!(theirs.refused, None);
        assert_eq!(
            rows(&three.path("out.db")),
            vec![
                (1, Some(12), Some("one".into())),
                (2, Some(25), Some("two".into()))
            ]
        );
        // Newer by `a`: row 1 ours (15 > 12); row 2 theirs (25 > the base's 20 that
        // the delete counts with); row 3: ours 5 < the base's 30: theirs (deleted).
        let newer = three.merge(&OnConflict::Newer("a".into()));
        assert_eq!(newer.refused, None);
        assert_eq!(
            rows(&three.path("out.db")),
            vec![
                (1, Some(15), Some("one".into())),
                (2, Some(25), Some("two".into()))
            ]
        );
        let resolutions: Vec<&str> = newer
            .conflicts
            .iter()
            .map(|c| c.resolution.as_str())
            .collect();
        assert_eq!(resolutions.len(), 3);
        let missing = three.merge(&OnConflict::Newer("updated_at".into()));
        assert!(
            missing
                .refused
                .as_deref()
                .unwrap()
                .contains("no such column"),
            "{missing:?}"
        );
    }

    #[test]
    fn schema_changes_are_refused_with_their_reason() {
        let three = Three::new(BASE, "ALTER TABLE t ADD COLUMN c;", "UPDATE t SET a = 1;");
        let r = three.merge(&OnConflict::Ours);
        let why = r.refused.unwrap();
        assert!(why.contains("schema changes are never merged"), "{why}");
        assert!(why.contains("table t was altered by this push"), "{why}");
        let three = Three::new(BASE, "", "CREATE INDEX t_a ON t(a);");
        let why = three.merge(&OnConflict::Refuse).refused.unwrap();
        assert!(
            why.contains("index t_a was added by the latest version"),
            "{why}"
        );
    }

    #[test]
    fn a_broken_unique_constraint_refuses() {
        let three = Three::new(
            "CREATE UNIQUE INDEX t_b ON t(b); INSERT INTO t VALUES (1, 1, 'x');",
            "INSERT INTO t VALUES (2, 2, 'y');",
            "INSERT INTO t VALUES (3, 3, 'y');",
        );
        let why = three.merge(&OnConflict::Refuse).refused.unwrap();
        assert!(why.contains("UNIQUE"), "{why}");
    }

    #[test]
    fn without_rowid_tables_merge_by_key_and_broken_foreign_keys_refuse() {
        let three = Three::new(
            "CREATE TABLE kv(k TEXT PRIMARY KEY, v) WITHOUT ROWID;
             INSERT INTO kv VALUES ('a', 1), ('b', 2);",
            "UPDATE kv SET v = 10 WHERE k = 'a';",
            "INSERT INTO kv VALUES ('z', 26); DELETE FROM kv WHERE k = 'b';",
        );
        assert_eq!(three.merge(&OnConflict::Refuse).refused, None);
        let conn = Connection::open(three.path("out.db")).unwrap();
        let kv: Vec<(String, i64)> = conn
            .prepare("SELECT k, v FROM kv ORDER BY k")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(kv, [("a".into(), 10), ("z".into(), 26)]);

        // Ours adds a child of parent 1, theirs deletes parent 1: each side is sound,
        // the merge is not.
        let three = Three::new(
            "CREATE TABLE parent(id INTEGER PRIMARY KEY);
             CREATE TABLE child(id INTEGER PRIMARY KEY, p INTEGER REFERENCES parent(id));
             INSERT INTO parent VALUES (1), (2);",
            "INSERT INTO child VALUES (1, 1);",
            "DELETE FROM parent WHERE id = 1;",
        );
        let why = three.merge(&OnConflict::Refuse).refused.unwrap();
        assert!(why.contains("break foreign keys"), "{why}");
    }

    #[test]
    fn values_order_as_sqlite_orders_them() {
        use Value::*;
        assert_eq!(compare(&Null, &Integer(0)), Ordering::Less);
        assert_eq!(compare(&Integer(2), &Real(1.5)), Ordering::Greater);
        assert_eq!(compare(&Real(9e9), &Text("0".into())), Ordering::Less);
        assert_eq!(
            compare(&Text("b".into()), &Text("a".into())),
            Ordering::Greater
        );
        assert_eq!(compare(&Blob(vec![]), &Text("z".into())), Ordering::Greater);
    }

    #[test]
    fn modes_parse_and_refuse_what_does_not_go_together() {
        assert_eq!(OnConflict::parse("ours", None).unwrap(), OnConflict::Ours);
        assert_eq!(
            OnConflict::parse("newer", Some("at")).unwrap(),
            OnConflict::Newer("at".into())
        );
        assert!(
            OnConflict::parse("newer", None)
                .unwrap_err()
                .to_string()
                .contains("--lww-column")
        );
        assert!(OnConflict::parse("ours", Some("at")).is_err());
        assert!(OnConflict::parse("mine", None).is_err());
        let r = OnConflict::Newer("at".into()).request();
        assert_eq!(
            OnConflict::from_request(&r).unwrap(),
            OnConflict::Newer("at".into())
        );
        assert_eq!(
            message(10, 7, 9, ""),
            "merge of v10 (this push, based on v7) onto v9"
        );
        assert_eq!(
            message(10, 7, 9, "x"),
            "merge of v10 (this push, based on v7) onto v9: x"
        );
        assert_eq!(
            candidate_message(7, 11, "x"),
            "push based on v7, merged in v11: x"
        );
        assert!(message(1, 1, 2, &"é".repeat(4000)).len() <= MAX_TEXT_BYTES);
        assert!(candidate_message(1, 3, &"é".repeat(4000)).len() <= MAX_TEXT_BYTES);
    }

    /// One edit of one side: on key `id` (1..=12), insert-or-replace a row, or delete.
    #[derive(Debug, Clone)]
    enum Edit {
        Put(i64, i64),
        Delete(i64),
    }

    fn edits() -> impl Strategy<Value = Vec<Edit>> {
        proptest::collection::vec(
            prop_oneof![
                (1i64..=12, 0i64..4).prop_map(|(id, a)| Edit::Put(id, a)),
                (1i64..=12).prop_map(Edit::Delete),
            ],
            0..8,
        )
    }

    fn script(edits: &[Edit]) -> String {
        edits
            .iter()
            .map(|e| match e {
                Edit::Put(id, a) => format!("INSERT OR REPLACE INTO t VALUES ({id}, {a}, 'v{a}');"),
                Edit::Delete(id) => format!("DELETE FROM t WHERE id = {id};"),
            })
            .collect()
    }

    type Rows = BTreeMap<i64, (Option<i64>, Option<String>)>;

    fn as_map(rows: Vec<(i64, Option<i64>, Option<String>)>) -> Rows {
        rows.into_iter().map(|(id, a, b)| (id, (a, b))).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Random edits on two sides of one base: refused with exactly the keys the two
        /// sides left different, or merged to exactly the rows of both edit sets (ours
        /// where it changed a row, else theirs; conflicts decided by the mode).
        #[test]
        fn a_merge_is_both_edit_sets_or_refuses_exactly_the_conflicts(
            base in proptest::collection::vec((1i64..=12, 0i64..4), 0..8),
            ours in edits(),
            theirs in edits(),
            mode in 0u8..3,
        ) {
            let base_sql: String = base
                .iter()
                .map(|(id, a)| format!("INSERT OR REPLACE INTO t VALUES ({id}, {a}, 'v{a}');"))
                .collect();
            let three = Three::new(&base_sql, &script(&ours), &script(&theirs));
            let (o, c, l) = (
                as_map(rows(&three.path("old.db"))),
                as_map(rows(&three.path("ours.db"))),
                as_map(rows(&three.path("theirs.db"))),
            );
            let mut expected = Rows::new();
            let mut conflicts = Vec::new();
            for id in 1..=12 {
                let (ov, cv, lv) = (o.get(&id), c.get(&id), l.get(&id));
                let (ours_changed, theirs_changed) = (cv != ov, lv != ov);
                if ours_changed && theirs_changed && cv != lv {
                    conflicts.push(id);
                }
                let pick = match (ours_changed, theirs_changed) {
                    (true, true) if mode == 2 => lv, // theirs
                    (true, _) => cv,
                    (false, _) => lv,
                };
                if let Some(v) = pick {
                    expected.insert(id, v.clone());
                }
            }
            let on_conflict = [OnConflict::Refuse, OnConflict::Ours, OnConflict::Theirs][mode as usize].clone();
            let r = three.merge(&on_conflict);
            let mut listed: Vec<i64> = r.conflicts.iter().map(|c| c.key[0].as_i64().unwrap()).collect();
            listed.sort();
            prop_assert_eq!(&listed, &conflicts);
            if mode == 0 && !conflicts.is_empty() {
                prop_assert!(r.refused.is_some());
            } else {
                prop_assert_eq!(r.refused.clone(), None);
                prop_assert_eq!(as_map(rows(&three.path("out.db"))), expected);
            }
        }
    }
}
