//! Two databases side by side: their schemas compared, their tables' rows counted and
//! diffed.
//!
//! One read-only connection opens B as `main` and attaches A as `a`, and one read
//! transaction covers both for as long as the [`Pair`] lives: every figure is of one
//! snapshot of each, and a writer of either is never blocked in WAL mode (in rollback
//! mode it waits for the read, as it would for any reader).
//!
//! Memory: [`Pair::summary`] runs three counting queries per table (rows only in B,
//! only in A, in both with other values), which SQLite streams through the primary key
//! index: flat in the databases' size. [`Pair::changes`] diffs one table at a time into
//! its own session, which holds that table's changed rows (keys and changed values)
//! until the table's changeset is written: memory grows with the changed rows of the
//! largest table, never with the unchanged ones.

use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags};

use super::format::ident;
use super::session::{Change, Changes, Session, SessionError};
use crate::{Error, Result};

/// What [`Pair::changes`] hands each change to.
pub type EachChange<'f> = &'f mut dyn FnMut(&Change) -> Result<()>;

/// What [`Pair::each_row_of_b`] hands each row to: the column names and the values.
pub type EachRow<'f> = &'f mut dyn FnMut(&[String], &[Value]) -> Result<()>;

/// A column of a table, as `PRAGMA table_info` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Column {
    pub name: String,
    pub pk: bool,
    /// Position in the primary key (1-based; 0: not in it).
    pub pk_order: i64,
}

/// The columns of `db.table`, in order (`None`: no such table).
pub(crate) fn table_columns(
    conn: &Connection,
    db: &str,
    table: &str,
) -> rusqlite::Result<Option<Vec<Column>>> {
    let mut stmt = conn.prepare(&format!(
        "PRAGMA {}.table_info({})",
        ident(db),
        ident(table)
    ))?;
    let columns: Vec<Column> = stmt
        .query_map([], |r| {
            let pk: i64 = r.get(5)?;
            Ok(Column {
                name: r.get(1)?,
                pk: pk > 0,
                pk_order: pk,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok((!columns.is_empty()).then_some(columns))
}

/// What became of a table from A to B.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TableStatus {
    /// In both, same columns, same rows.
    Same,
    /// In both, same columns; rows inserted, updated or deleted.
    Changed,
    /// Only in B.
    Added,
    /// Only in A.
    Dropped,
    /// In both, with other columns or another primary key: rows not compared.
    Altered,
    /// A virtual table or a virtual table's shadow table: its rows are the virtual
    /// table's business, not compared.
    NotDiffable,
}

/// One table's changes from A to B.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableSummary {
    /// The table.
    pub name: String,
    /// What became of it.
    pub status: TableStatus,
    /// Compared by rowid: the table has no PRIMARY KEY (rowids of such tables are
    /// stable across ordinary writes, but `VACUUM` may renumber them).
    pub by_rowid: bool,
    /// Rows only in B.
    pub inserted: u64,
    /// Rows in both, with other values.
    pub updated: u64,
    /// Rows only in A.
    pub deleted: u64,
    /// For an added or dropped table: its rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    /// Its `CREATE TABLE` changed (a constraint, a default, the spelling) though the
    /// columns and the primary key did not.
    pub definition_changed: bool,
    /// Why it is altered or not diffable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The columns as a change lists them (`rowid` first for a table compared by rowid).
    #[serde(skip)]
    pub columns: Vec<String>,
    /// Which of `columns` are the primary key.
    #[serde(skip)]
    pub pk: Vec<bool>,
    /// Its `CREATE` statement in A and in B.
    #[serde(skip)]
    pub sql: (Option<String>, Option<String>),
}

impl TableSummary {
    /// Whether its rows changed.
    pub fn has_changes(&self) -> bool {
        self.status != TableStatus::Same
    }
}

/// An index, view or trigger added, dropped or altered.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ObjectChange {
    /// `index`, `view` or `trigger`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its name.
    pub name: String,
    /// The table it belongs to.
    pub table: String,
    /// `added`, `dropped` or `altered`.
    pub change: &'static str,
    /// Its `CREATE` statement in A and in B.
    #[serde(skip)]
    pub sql: (Option<String>, Option<String>),
}

/// What changed from A to B.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// Every table of A or B, by name.
    pub tables: Vec<TableSummary>,
    /// Indexes, views and triggers that differ.
    pub objects: Vec<ObjectChange>,
}

impl Summary {
    /// Whether A and B hold the same schema and rows.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty() && self.tables.iter().all(|t| !t.has_changes())
    }
}

/// Two databases opened side by side: B as `main`, A attached as `a`.
pub struct Pair {
    conn: Connection,
    a: PathBuf,
    b: PathBuf,
}

/// One table or other object of a schema.
struct Object {
    kind: String,
    name: String,
    table: String,
    sql: Option<String>,
    /// From `PRAGMA table_list`: table, virtual, shadow (tables only).
    table_type: Option<String>,
}

impl Pair {
    /// Opens A and B read-only, in one read transaction each, from now until the pair is
    /// dropped.
    pub fn open(a: &Path, b: &Path) -> Result<Pair> {
        for p in [a, b] {
            if !p.is_file() {
                return Err(Error::io(
                    p,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such database file"),
                ));
            }
        }
        let conn = Connection::open_with_flags(
            b,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| Error::sqlite(b, e))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| Error::sqlite(b, e))?;
        let check = |db: &str, path: &Path| {
            conn.query_row(
                &format!("SELECT count(*) FROM {db}.sqlite_schema"),
                [],
                |_| Ok(()),
            )
            .map_err(|e| not_a_database(path, e))
        };
        check("main", b)?;
        // Attached with the main database's flags: read-only too.
        conn.execute("ATTACH DATABASE ?1 AS a", [a.to_string_lossy()])
            .map_err(|e| not_a_database(a, e))?;
        check("a", a)?;
        let pair = Pair {
            conn,
            a: a.to_owned(),
            b: b.to_owned(),
        };
        pair.conn
            .execute_batch("BEGIN")
            .map_err(|e| Error::sqlite(b, e))?;
        // The first read of each starts its snapshot, and says if it is no database.
        for (db, path) in [("main", b), ("a", a)] {
            pair.conn
                .query_row(
                    &format!("SELECT count(*) FROM {db}.sqlite_schema"),
                    [],
                    |_| Ok(()),
                )
                .map_err(|e| not_a_database(path, e))?;
        }
        Ok(pair)
    }

    fn err(&self, db: &str) -> impl Fn(rusqlite::Error) -> Error + '_ {
        let path = if db == "a" {
            self.a.clone()
        } else {
            self.b.clone()
        };
        move |e| Error::sqlite(&path, e)
    }

    fn objects(&self, db: &str) -> Result<Vec<Object>> {
        let err = self.err(db);
        let mut types = std::collections::HashMap::new();
        let mut stmt = self
            .conn
            .prepare(&format!("PRAGMA {db}.table_list"))
            .map_err(&err)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(1)?, r.get::<_, String>(2)?)))
            .map_err(&err)?;
        for row in rows {
            let (name, kind) = row.map_err(&err)?;
            types.insert(name, kind);
        }
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT type, name, tbl_name, sql FROM {db}.sqlite_schema \
                 WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name"
            ))
            .map_err(&err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Object {
                    kind: r.get(0)?,
                    name: r.get(1)?,
                    table: r.get(2)?,
                    sql: r.get(3)?,
                    table_type: None,
                })
            })
            .map_err(&err)?;
        let mut out = Vec::new();
        for row in rows {
            let mut o = row.map_err(&err)?;
            if o.kind == "table" {
                o.table_type = types.get(&o.name).cloned();
            }
            out.push(o);
        }
        Ok(out)
    }

    /// The schemas compared and every table's rows counted. Memory flat in the
    /// databases' size (see the module's doc).
    pub fn summary(&self) -> Result<Summary> {
        let (olds, news) = (self.objects("a")?, self.objects("main")?);
        let find = |list: &[Object], o: &Object| -> Option<usize> {
            list.iter()
                .position(|x| x.name == o.name && (x.kind == "table") == (o.kind == "table"))
        };
        let mut tables = Vec::new();
        let mut objects = Vec::new();
        for new in &news {
            let old = find(&olds, new).map(|i| &olds[i]);
            if new.kind == "table" {
                tables.push(self.table_summary(old, Some(new))?);
                continue;
            }
            let change = match old {
                None => "added",
                Some(o) if o.sql != new.sql || o.kind != new.kind => "altered",
                Some(_) => continue,
            };
            // Objects without SQL (the indexes behind UNIQUE and PRIMARY KEY) come and
            // go with their table.
            if new.sql.is_some() || old.is_some_and(|o| o.sql.is_some()) {
                objects.push(ObjectChange {
                    kind: new.kind.clone(),
                    name: new.name.clone(),
                    table: new.table.clone(),
                    change,
                    sql: (old.and_then(|o| o.sql.clone()), new.sql.clone()),
                });
            }
        }
        for old in olds.iter().filter(|o| find(&news, o).is_none()) {
            if old.kind == "table" {
                tables.push(self.table_summary(Some(old), None)?);
            } else if old.sql.is_some() {
                objects.push(ObjectChange {
                    kind: old.kind.clone(),
                    name: old.name.clone(),
                    table: old.table.clone(),
                    change: "dropped",
                    sql: (old.sql.clone(), None),
                });
            }
        }
        tables.sort_by(|x, y| x.name.cmp(&y.name));
        objects.sort_by(|x, y| (x.kind.as_str(), &x.name).cmp(&(y.kind.as_str(), &y.name)));
        Ok(Summary { tables, objects })
    }

    fn table_summary(&self, old: Option<&Object>, new: Option<&Object>) -> Result<TableSummary> {
        let name = new.or(old).map(|o| o.name.clone()).unwrap_or_default();
        let mut t = TableSummary {
            name: name.clone(),
            status: TableStatus::Same,
            by_rowid: false,
            inserted: 0,
            updated: 0,
            deleted: 0,
            rows: None,
            definition_changed: false,
            reason: None,
            columns: Vec::new(),
            pk: Vec::new(),
            sql: (
                old.and_then(|o| o.sql.clone()),
                new.and_then(|o| o.sql.clone()),
            ),
        };
        let special =
            [old, new]
                .into_iter()
                .flatten()
                .find_map(|o| match o.table_type.as_deref() {
                    Some("virtual") => Some("a virtual table: its rows live in its module"),
                    Some("shadow") => Some("a shadow table of a virtual table"),
                    _ => None,
                });
        if let Some(why) = special {
            t.status = TableStatus::NotDiffable;
            t.reason = Some(why.into());
            return Ok(t);
        }
        let count = |db: &str| -> Result<u64> {
            self.conn
                .query_row(
                    &format!("SELECT count(*) FROM {db}.{}", ident(&name)),
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .map(|n| n as u64)
                .map_err(self.err(db))
        };
        let (old_cols, new_cols) = match (old, new) {
            (None, Some(_)) => {
                t.status = TableStatus::Added;
                t.rows = Some(count("main")?);
                return Ok(t);
            }
            (Some(_), None) => {
                t.status = TableStatus::Dropped;
                t.rows = Some(count("a")?);
                return Ok(t);
            }
            _ => (
                table_columns(&self.conn, "a", &name).map_err(self.err("a"))?,
                table_columns(&self.conn, "main", &name).map_err(self.err("main"))?,
            ),
        };
        let (Some(old_cols), Some(cols)) = (old_cols, new_cols) else {
            t.status = TableStatus::NotDiffable;
            t.reason = Some("its columns cannot be read".into());
            return Ok(t);
        };
        if old_cols != cols {
            t.status = TableStatus::Altered;
            t.reason = Some(format!(
                "its columns or primary key changed ({}) → ({}): rows not compared",
                column_list(&old_cols),
                column_list(&cols)
            ));
            return Ok(t);
        }
        t.definition_changed = t.sql.0 != t.sql.1;
        t.by_rowid = !cols.iter().any(|c| c.pk);
        let mut keys: Vec<&Column> = cols.iter().filter(|c| c.pk).collect();
        keys.sort_by_key(|c| c.pk_order);
        let rowid = rowid_name(&cols);
        let key_names: Vec<String> = match t.by_rowid {
            true => vec![rowid.clone()],
            false => keys.iter().map(|c| c.name.clone()).collect(),
        };
        let values: Vec<&Column> = cols.iter().filter(|c| !c.pk).collect();
        t.columns = match t.by_rowid {
            true => std::iter::once(rowid.clone())
                .chain(cols.iter().map(|c| c.name.clone()))
                .collect(),
            false => cols.iter().map(|c| c.name.clone()).collect(),
        };
        t.pk = match t.by_rowid {
            true => std::iter::once(true)
                .chain(cols.iter().map(|_| false))
                .collect(),
            false => cols.iter().map(|c| c.pk).collect(),
        };
        let table = ident(&name);
        let join = key_names
            .iter()
            .map(|k| format!("o.{k} = n.{k}", k = ident(k)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let q = |sql: String, db: &str| -> Result<u64> {
            self.conn
                .query_row(&sql, [], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
                .map_err(self.err(db))
        };
        // The outer scan goes in key order, so the lookups in the other database walk
        // its key b-tree in order too (a few page reads per leaf, not one per row):
        // left to itself SQLite may scan a smaller covering index in another order.
        let (scan_new, scan_old) = (self.key_order("main", &name)?, self.key_order("a", &name)?);
        t.inserted = q(
            format!(
                "SELECT count(*) FROM main.{table} AS n {scan_new} WHERE NOT EXISTS \
                 (SELECT 1 FROM a.{table} AS o WHERE {join})"
            ),
            "main",
        )?;
        t.deleted = q(
            format!(
                "SELECT count(*) FROM a.{table} AS o {scan_old} WHERE NOT EXISTS \
                 (SELECT 1 FROM main.{table} AS n WHERE {join})"
            ),
            "a",
        )?;
        if !values.is_empty() {
            // Compared as the session compares them: byte for byte (no collation) and
            // by type (1 and 1.0 differ).
            let differs = values
                .iter()
                .map(|c| {
                    let c = ident(&c.name);
                    format!("o.{c} IS NOT n.{c} COLLATE BINARY OR typeof(o.{c}) <> typeof(n.{c})")
                })
                .collect::<Vec<_>>()
                .join(" OR ");
            t.updated = q(
                format!(
                    "SELECT count(*) FROM main.{table} AS n {scan_new} JOIN a.{table} AS o \
                     ON {join} WHERE {differs}"
                ),
                "main",
            )?;
        }
        if t.inserted + t.updated + t.deleted > 0 || t.definition_changed {
            t.status = TableStatus::Changed;
        }
        Ok(t)
    }

    /// How to scan `db.table` in primary key order: by its primary key index
    /// (`INDEXED BY`), or, where the key is the rowid (or there is none), by the table
    /// itself (`NOT INDEXED`).
    fn key_order(&self, db: &str, table: &str) -> Result<String> {
        let err = self.err(db);
        let mut stmt = self
            .conn
            .prepare(&format!("PRAGMA {db}.index_list({})", ident(table)))
            .map_err(&err)?;
        let pk: Option<String> = stmt
            .query_map([], |r| Ok((r.get::<_, String>(1)?, r.get::<_, String>(3)?)))
            .map_err(&err)?
            .filter_map(|r| r.ok())
            .find(|(_, origin)| origin == "pk")
            .map(|(name, _)| name);
        Ok(match pk {
            Some(index) => format!("INDEXED BY {}", ident(&index)),
            None => "NOT INDEXED".into(),
        })
    }

    /// The row changes of table `t` (one the summary found [`TableStatus::Changed`]):
    /// the changeset of A→B for it is written to `out` if given, and each change is
    /// handed to `each` if given. One session for this table alone: memory grows with
    /// its changed rows.
    pub fn changes(
        &self,
        t: &TableSummary,
        out: Option<&mut dyn Write>,
        each: Option<EachChange<'_>>,
    ) -> Result<()> {
        let session_err = |e: SessionError| match e {
            SessionError::Io(e) => Error::io(Path::new("the changeset output"), e),
            e => Error::sqlite(
                &self.b,
                rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(match &e {
                        SessionError::Sqlite { code, .. } => *code,
                        SessionError::Io(_) => rusqlite::ffi::SQLITE_IOERR,
                    }),
                    Some(format!("diff of table {}: {e}", t.name)),
                ),
            ),
        };
        let bytes = {
            let mut session = Session::new(&self.conn, "main", t.by_rowid).map_err(session_err)?;
            session.diff("a", &t.name).map_err(session_err)?;
            session.changeset().map_err(session_err)?
        };
        if let Some(out) = out {
            out.write_all(&bytes)
                .map_err(|e| Error::io(Path::new("the changeset output"), e))?;
        }
        if let Some(each) = each {
            let mut input = &bytes[..];
            let mut changes = Changes::start(&mut input).map_err(session_err)?;
            while let Some(change) = changes.next_change().map_err(session_err)? {
                each(&change)?;
            }
        }
        Ok(())
    }

    /// The `CREATE` statements of B's indexes and triggers on `table` (name, SQL): what
    /// a script that re-creates the table must create again.
    pub fn create_statements_of_b(&self, table: &str) -> Result<Vec<(String, String)>> {
        let err = self.err("main");
        let mut stmt = self
            .conn
            .prepare(
                "SELECT name, sql FROM main.sqlite_schema WHERE tbl_name = ?1 \
                 AND type IN ('index', 'trigger') AND sql IS NOT NULL ORDER BY type, name",
            )
            .map_err(&err)?;
        let rows = stmt
            .query_map([table], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(&err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(&err)
    }

    /// Every row of table `t` in B, streaming (for `--sql` of a table added or
    /// altered), with its column names.
    pub fn each_row_of_b(&self, table: &str, f: EachRow<'_>) -> Result<()> {
        let err = self.err("main");
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT * FROM main.{}", ident(table)))
            .map_err(&err)?;
        let names: Vec<String> = stmt.column_names().map(str::to_owned).collect();
        let mut rows = stmt.query([]).map_err(&err)?;
        let mut values = Vec::with_capacity(names.len());
        while let Some(row) = rows.next().map_err(&err)? {
            values.clear();
            for i in 0..names.len() {
                values.push(row.get::<_, Value>(i).map_err(&err)?);
            }
            f(&names, &values)?;
        }
        Ok(())
    }
}

fn column_list(cols: &[Column]) -> String {
    cols.iter()
        .map(|c| {
            if c.pk {
                format!("{} pk", c.name)
            } else {
                c.name.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A name for the rowid that no column of the table takes.
fn rowid_name(cols: &[Column]) -> String {
    ["rowid", "_rowid_", "oid"]
        .into_iter()
        .find(|n| !cols.iter().any(|c| c.name.eq_ignore_ascii_case(n)))
        .unwrap_or("rowid")
        .to_owned()
}

fn not_a_database(path: &Path, e: rusqlite::Error) -> Error {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => Error::NotADatabase {
            path: path.to_owned(),
            reason: "not an SQLite database".into(),
        },
        _ => Error::sqlite(path, e),
    }
}
