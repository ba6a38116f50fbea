//! `sqlferry diff A B`: what changed from A to B, table by table and row by row.
//!
//! A and B are each a database file, a replica version (`REMOTE[@VERSION]`), or `-`:
//! the latest version of the replica the other side (a file) follows. Replica versions
//! are pulled into scratch files that are removed afterwards (also on an error or a
//! stop); a pull uses the other side as its base where it has one, so only the pages
//! that differ travel. The comparison itself is `rows::Pair`'s, on a blocking thread.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::{Global, Place, RemoteArgs, exit, out};
use crate::client::{ReplicaSource, Scratch};
use crate::rows::session::{Change, Op};
use crate::rows::{Pair, Summary, TableStatus, TableSummary, short_value, sql_literal, value_json};
use crate::shutdown::Shutdown;
use crate::store::Selector;

/// Arguments of `sqlferry diff`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry diff old.db new.db                       per table: rows inserted, updated, deleted\n  \
sqlferry diff app.db -                            app.db against the latest version of the replica it follows\n  \
sqlferry diff acme/app.db@3 acme/app.db@latest    two versions of a replica\n  \
sqlferry diff acme/app.db@latest-1 app.db --rows  every changed row, by primary key\n  \
sqlferry diff old.db new.db --changeset c.bin     the changes as a SQLite changeset (sqlferry apply c.bin old.db)\n  \
sqlferry diff old.db new.db --sql > c.sql         the same as SQL statements\n\n\
A and B are each a database file, a replica version REMOTE[@N|@latest|@latest-N|@TIME] \
(as pull takes it), or `-`: the latest version of the replica the other side, a file, \
follows (the replica of its last push or pull on this machine, else of its sidecar \
<file>-sqlferry). Versions are pulled into temporary files, removed afterwards; the other \
side is the base of the pull, so only the pages that differ travel. Nothing the user named \
is written, and files are read in one read transaction each (a writer is never blocked in \
WAL mode).\n\n\
The summary lists each table that changed: rows inserted, updated, deleted (by primary \
key; a table without one by rowid, which VACUUM may renumber), tables added or dropped \
(with their rows), tables altered (other columns or primary key: rows not compared), and \
indexes, views and triggers added, dropped or altered. Virtual tables and their shadow \
tables are named as not diffable. --rows lists each changed row: its key and the old and \
new values of the changed columns, shortened; --json gives whole values (a blob as \
{\"blob\": \"<hex>\"}).\n\n\
--changeset FILE writes the row changes of the tables whose columns did not change, in \
SQLite's changeset format (what sqldiff --changeset and the session extension write, and \
sqlite3changeset_apply reads): apply it with `sqlferry apply`. Schema changes cannot travel \
in a changeset; the command names the ones it left out. --sql prints a script that turns A \
into B, schema changes included (a table added or altered is created and filled whole).\n\n\
Memory: the summary is counted by SQLite queries, flat in the databases' size; --rows, \
--json with --rows, --changeset and --sql hold the changed rows of one table at a time.")]
pub struct DiffArgs {
    /// The "before": a database file, REMOTE[@VERSION], or - (see below).
    pub a: String,
    /// The "after": a database file, REMOTE[@VERSION], or - (see below).
    pub b: String,
    /// List each changed row: its primary key and the changed columns' old and new values.
    #[arg(long)]
    pub rows: bool,
    /// Print one JSON object (with --rows, every changed row with whole values).
    #[arg(long, conflicts_with = "sql")]
    pub json: bool,
    /// Write the row changes from A to B to FILE as a SQLite changeset.
    #[arg(long, value_name = "FILE")]
    pub changeset: Option<PathBuf>,
    /// Print SQL statements that turn A into B, instead of the summary.
    #[arg(long, conflicts_with = "rows")]
    pub sql: bool,
    /// The server and the key (for REMOTE sides).
    #[command(flatten)]
    pub connection: RemoteArgs,
    /// The encryption key, for a version of an encrypted replica.
    #[command(flatten)]
    pub encryption: super::encryption::EncryptionArgs,
}

/// One side of a diff, as named.
#[derive(Debug, Clone)]
enum Side {
    File(PathBuf),
    Version(String, Selector, Option<crate::store::ReplicaPath>),
    Followed,
}

fn side(arg: &str) -> crate::Result<Side> {
    if arg == "-" {
        return Ok(Side::Followed);
    }
    let place = Place::of(arg);
    if let Some(refusal) = place.refusal() {
        return Err(refusal);
    }
    Ok(match place {
        Place::Local(path) => Side::File(path),
        _ => {
            let (replica, selector) = Selector::split(arg)?;
            Side::Version(arg.to_owned(), selector, Some(replica))
        }
    })
}

/// What each side is, for the output.
struct Named {
    label: String,
    path: PathBuf,
    version: Option<u64>,
}

impl DiffArgs {
    /// Runs the command.
    pub async fn run(self, global: &Global, shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        let (a, b) = (side(&self.a)?, side(&self.b)?);
        let connection = self.connection.options();
        let key_given = self.encryption.keys(global.quiet || self.json)?;
        let pass = self.encryption.passphrases(global.quiet || self.json)?;
        // A passphrase is stretched with the salt of the replica each side pulls from.
        let keyed = |source: ReplicaSource| {
            let (key_given, pass) = (&key_given, &pass);
            async move {
                let keys = super::encryption::with_passphrases(
                    key_given,
                    pass,
                    &source.server,
                    &source.replica,
                    source.key.as_deref(),
                    false,
                )
                .await?;
                anyhow::Ok(source.with_encryption(super::encryption::keyring(&keys)))
            }
        };
        let followed = |file: &Side| match file {
            Side::File(path) => Ok(path.clone()),
            _ => Err(crate::Error::Usage(
                "`-` stands for the latest version of the replica the other side follows, so \
                 the other side must be a database file"
                    .into(),
            )),
        };
        let work = async {
            let scratch = Scratch::new()?;
            let mut named: Vec<Named> = Vec::new();
            for (i, (this, other)) in [(&a, &b), (&b, &a)].into_iter().enumerate() {
                let (source, selector, label) = match this {
                    Side::File(path) => {
                        named.push(Named {
                            label: path.display().to_string(),
                            path: path.clone(),
                            version: None,
                        });
                        continue;
                    }
                    Side::Followed => {
                        let file = followed(other)?;
                        let source =
                            keyed(ReplicaSource::followed_by(&connection, &file).await?).await?;
                        let label = format!("{}@latest", source.replica);
                        (source, Selector::Latest, label)
                    }
                    Side::Version(arg, selector, replica) => {
                        let replica = replica.clone().expect("parsed with the side");
                        let source =
                            keyed(ReplicaSource::resolve(&connection, replica).await?).await?;
                        (source, *selector, arg.clone())
                    }
                };
                // The other side's file, or the side pulled before, is the base.
                let base = match (other, named.first()) {
                    (Side::File(path), _) => Some(path.clone()),
                    (_, Some(first)) => Some(first.path.clone()),
                    _ => None,
                };
                let dest = scratch.path(if i == 0 { "a.db" } else { "b.db" });
                let version = source
                    .pull_into_scratch(selector, &dest, base.as_deref())
                    .await?;
                named.push(Named {
                    label,
                    path: dest,
                    version: Some(version),
                });
            }
            let [na, nb]: [Named; 2] = named.try_into().map_err(|_| {
                anyhow::anyhow!("a bug in sqlferry, please report it: a diff side went missing")
            })?;
            let opts = Options {
                rows: self.rows,
                json: self.json,
                sql: self.sql,
                changeset: self.changeset.clone(),
                quiet: global.quiet,
            };
            let code = tokio::task::spawn_blocking(move || report(&na, &nb, &opts)).await??;
            // The scratch files go only now, after the comparison read them.
            drop(scratch);
            Ok(code)
        };
        super::interruptible(shutdown, work)
            .await
            .map_err(|e| super::encryption::name_key(e, &key_given))
    }
}

struct Options {
    rows: bool,
    json: bool,
    sql: bool,
    changeset: Option<PathBuf>,
    quiet: bool,
}

/// The comparison and its output (on a blocking thread).
fn report(a: &Named, b: &Named, opts: &Options) -> anyhow::Result<ExitCode> {
    let pair = Pair::open(&a.path, &b.path)?;
    let summary = pair.summary()?;
    let changed: Vec<&TableSummary> = summary
        .tables
        .iter()
        .filter(|t| t.status == TableStatus::Changed && t.inserted + t.updated + t.deleted > 0)
        .collect();
    // The changeset file is written beside FILE and renamed into place: a FILE is
    // never half written.
    let mut changeset = match &opts.changeset {
        Some(path) => Some(AtomicFile::create(path)?),
        None => None,
    };
    if opts.sql {
        write_sql(&pair, &summary, changeset.as_mut())?;
    } else if opts.json {
        write_json(
            &pair,
            a,
            b,
            &summary,
            &changed,
            opts.rows,
            changeset.as_mut(),
        )?;
    } else {
        write_text(
            &pair,
            a,
            b,
            &summary,
            &changed,
            opts.rows,
            changeset.as_mut(),
        )?;
    }
    if let Some(file) = changeset {
        // Without --rows or --sql, the changes were not read yet.
        file.finish()?;
        if !opts.quiet {
            let left_out: Vec<String> = summary
                .tables
                .iter()
                .filter(|t| !matches!(t.status, TableStatus::Same | TableStatus::Changed))
                .map(|t| format!("table {} ({})", t.name, status_word(t)))
                .chain(
                    summary
                        .objects
                        .iter()
                        .map(|o| format!("{} {} ({})", o.kind, o.name, o.change)),
                )
                .collect();
            if !left_out.is_empty() {
                eprintln!(
                    "sqlferry: note: the changeset carries rows only; not in it: {} (--sql \
                     includes them)",
                    left_out.join(", ")
                );
            }
        }
    }
    Ok(ExitCode::from(exit::OK))
}

/// Writes `FILE.sqlferry-tmp`, renamed to FILE when complete, removed otherwise.
struct AtomicFile {
    tmp: PathBuf,
    path: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
}

impl AtomicFile {
    fn create(path: &Path) -> crate::Result<AtomicFile> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".sqlferry-tmp");
        let tmp = PathBuf::from(tmp);
        let file = std::fs::File::create(&tmp).map_err(|e| crate::Error::io(&tmp, e))?;
        Ok(AtomicFile {
            tmp,
            path: path.to_owned(),
            file: Some(std::io::BufWriter::new(file)),
        })
    }

    fn writer(&mut self) -> &mut dyn Write {
        self.file.as_mut().expect("open until finished")
    }

    fn finish(mut self) -> crate::Result<()> {
        let file = self.file.take().expect("open until finished");
        let file = file
            .into_inner()
            .map_err(|e| crate::Error::io(&self.tmp, e.into_error()))?;
        file.sync_all()
            .map_err(|e| crate::Error::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| crate::Error::io(&self.path, e))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The changes of each changed table: written to the changeset, handed to `each`.
fn each_change(
    pair: &Pair,
    tables: &[&TableSummary],
    mut changeset: Option<&mut AtomicFile>,
    each: &mut dyn FnMut(&TableSummary, &Change) -> anyhow::Result<()>,
    want_rows: bool,
) -> anyhow::Result<()> {
    for t in tables {
        let out = changeset.as_deref_mut().map(AtomicFile::writer);
        if !want_rows && out.is_none() {
            continue;
        }
        let mut failed = None;
        let mut f = |c: &Change| -> crate::Result<()> {
            if failed.is_none()
                && let Err(e) = each(t, c)
            {
                failed = Some(e);
            }
            Ok(())
        };
        let f: Option<crate::rows::EachChange<'_>> = match want_rows {
            true => Some(&mut f),
            false => None,
        };
        pair.changes(t, out, f)?;
        if let Some(e) = failed {
            return Err(e);
        }
    }
    Ok(())
}

fn status_word(t: &TableSummary) -> String {
    match t.status {
        TableStatus::Same => "same".into(),
        TableStatus::Changed => "changed".into(),
        TableStatus::Added => format!("added, {}", rows_word(t.rows)),
        TableStatus::Dropped => format!("dropped, {}", rows_word(t.rows)),
        TableStatus::Altered => "altered".into(),
        TableStatus::NotDiffable => "not diffable".into(),
    }
}

fn side_label(n: &Named) -> String {
    match n.version {
        Some(v) => format!("{} (version {v})", n.label),
        None => n.label.clone(),
    }
}

fn key_text(t: &TableSummary, c: &Change) -> String {
    let key = c.key();
    t.columns
        .iter()
        .zip(&t.pk)
        .filter(|(_, pk)| **pk)
        .zip(&key)
        .map(|((name, _), v)| format!("{name}={}", short_value(v)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn column_name(t: &TableSummary, i: usize) -> String {
    t.columns
        .get(i)
        .cloned()
        .unwrap_or_else(|| format!("column {i}"))
}

fn row_text(t: &TableSummary, c: &Change) -> String {
    let key = key_text(t, c);
    let cols = c
        .changed_columns()
        .into_iter()
        .filter(|&i| !c.pk.get(i).copied().unwrap_or(false));
    match c.op {
        Op::Update => {
            let parts: Vec<String> = cols
                .map(|i| {
                    let old = c.old[i].as_ref().map_or("?".into(), short_value);
                    let new = c.new[i].as_ref().map_or("?".into(), short_value);
                    format!("{}: {old} → {new}", column_name(t, i))
                })
                .collect();
            format!("  update {key}: {}", parts.join(", "))
        }
        Op::Insert | Op::Delete => {
            let side = if c.op == Op::Insert { &c.new } else { &c.old };
            let parts: Vec<String> = cols
                .map(|i| {
                    let v = side[i].as_ref().map_or("?".into(), short_value);
                    format!("{}={v}", column_name(t, i))
                })
                .collect();
            let op = if c.op == Op::Insert {
                "insert"
            } else {
                "delete"
            };
            format!("  {op} {key}: {}", parts.join(", "))
        }
    }
}

fn write_text(
    pair: &Pair,
    a: &Named,
    b: &Named,
    summary: &Summary,
    changed: &[&TableSummary],
    rows: bool,
    changeset: Option<&mut AtomicFile>,
) -> anyhow::Result<()> {
    out(format_args!("A: {}", side_label(a)))?;
    out(format_args!("B: {}", side_label(b)))?;
    if summary.is_empty() {
        out(format_args!("no differences"))?;
    }
    for t in summary.tables.iter().filter(|t| t.has_changes()) {
        let name = if t.by_rowid {
            format!("{} (by rowid)", t.name)
        } else {
            t.name.clone()
        };
        let line = match t.status {
            TableStatus::Changed => {
                let mut s = format!(
                    "table {name}: {} inserted, {} updated, {} deleted",
                    t.inserted, t.updated, t.deleted
                );
                if t.definition_changed {
                    s.push_str(" (its CREATE TABLE changed, same columns)");
                }
                s
            }
            TableStatus::Altered | TableStatus::NotDiffable => format!(
                "table {name}: {}: {}",
                status_word(t),
                t.reason.as_deref().unwrap_or("")
            ),
            _ => format!("table {name}: {}", status_word(t)),
        };
        out(format_args!("{line}"))?;
    }
    for o in &summary.objects {
        out(format_args!(
            "{} {} on {}: {}",
            o.kind, o.name, o.table, o.change
        ))?;
    }
    let mut current = String::new();
    each_change(
        pair,
        changed,
        changeset,
        &mut |t, c| {
            if rows && current != t.name {
                current = t.name.clone();
                out(format_args!("rows of {}:", t.name))?;
            }
            out(format_args!("{}", row_text(t, c)))
        },
        rows,
    )
}

fn change_json(t: &TableSummary, c: &Change) -> serde_json::Value {
    let mut key = serde_json::Map::new();
    for ((name, _), v) in t
        .columns
        .iter()
        .zip(&t.pk)
        .filter(|(_, pk)| **pk)
        .zip(c.key())
    {
        key.insert(name.clone(), value_json(&v));
    }
    let side = |values: &[Option<rusqlite::types::Value>]| {
        let mut m = serde_json::Map::new();
        for i in c.changed_columns() {
            if c.pk.get(i).copied().unwrap_or(false) {
                continue;
            }
            if let Some(Some(v)) = values.get(i) {
                m.insert(column_name(t, i), value_json(v));
            }
        }
        serde_json::Value::Object(m)
    };
    let mut v = serde_json::json!({ "table": t.name, "op": c.op, "key": key });
    if c.op != Op::Insert {
        v["old"] = side(&c.old);
    }
    if c.op != Op::Delete {
        v["new"] = side(&c.new);
    }
    v
}

fn write_json(
    pair: &Pair,
    a: &Named,
    b: &Named,
    summary: &Summary,
    changed: &[&TableSummary],
    rows: bool,
    changeset: Option<&mut AtomicFile>,
) -> anyhow::Result<()> {
    let side = |n: &Named| serde_json::json!({ "name": n.label, "version": n.version });
    let head = serde_json::json!({
        "a": side(a),
        "b": side(b),
        "tables": summary.tables.iter().filter(|t| t.has_changes()).collect::<Vec<_>>(),
        "objects": summary.objects,
    });
    // Streamed: the head, then each row as it is read, so --rows never builds the whole
    // list in memory.
    let mut stdout = std::io::stdout().lock();
    let head = serde_json::to_string(&head)?;
    let result = (|| -> anyhow::Result<()> {
        if !rows {
            each_change(pair, changed, changeset, &mut |_, _| Ok(()), false)?;
            writeln!(stdout, "{head}")?;
            return Ok(());
        }
        write!(stdout, "{},\"rows\":[", &head[..head.len() - 1])?;
        let mut first = true;
        each_change(
            pair,
            changed,
            changeset,
            &mut |t, c| {
                if !first {
                    write!(stdout, ",")?;
                }
                first = false;
                write!(stdout, "{}", change_json(t, c))?;
                Ok(())
            },
            true,
        )?;
        writeln!(stdout, "]}}")?;
        Ok(())
    })();
    match result {
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        other => other,
    }
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn change_sql(t: &TableSummary, c: &Change) -> String {
    let table = ident(&t.name);
    let key = c.key();
    let key_names: Vec<&String> = t
        .columns
        .iter()
        .zip(&t.pk)
        .filter(|(_, pk)| **pk)
        .map(|(n, _)| n)
        .collect();
    let filter = key_names
        .iter()
        .zip(&key)
        .map(|(n, v)| format!("{} = {}", ident(n), sql_literal(v)))
        .collect::<Vec<_>>()
        .join(" AND ");
    match c.op {
        Op::Insert => {
            let names: Vec<String> = t.columns.iter().map(|n| ident(n)).collect();
            let values: Vec<String> = c
                .new
                .iter()
                .map(|v| v.as_ref().map_or("NULL".into(), sql_literal))
                .collect();
            format!(
                "INSERT INTO {table}({}) VALUES({});",
                names.join(", "),
                values.join(", ")
            )
        }
        Op::Delete => format!("DELETE FROM {table} WHERE {filter};"),
        Op::Update => {
            let sets: Vec<String> = c
                .changed_columns()
                .into_iter()
                .filter_map(|i| {
                    let v = c.new.get(i)?.as_ref()?;
                    Some(format!(
                        "{} = {}",
                        ident(&column_name(t, i)),
                        sql_literal(v)
                    ))
                })
                .collect();
            format!("UPDATE {table} SET {} WHERE {filter};", sets.join(", "))
        }
    }
}

fn write_sql(
    pair: &Pair,
    summary: &Summary,
    changeset: Option<&mut AtomicFile>,
) -> anyhow::Result<()> {
    out(format_args!("BEGIN;"))?;
    let recreated: Vec<&TableSummary> = summary
        .tables
        .iter()
        .filter(|t| matches!(t.status, TableStatus::Added | TableStatus::Altered))
        .collect();
    // Drops first: objects dropped or altered, then tables dropped or altered (which
    // takes their indexes and triggers with them).
    for o in summary.objects.iter().filter(|o| o.change != "added") {
        out(format_args!(
            "DROP {} IF EXISTS {};",
            o.kind.to_uppercase(),
            ident(&o.name)
        ))?;
    }
    for t in summary
        .tables
        .iter()
        .filter(|t| matches!(t.status, TableStatus::Dropped | TableStatus::Altered))
    {
        out(format_args!("DROP TABLE {};", ident(&t.name)))?;
    }
    let mut created = Vec::new();
    for t in &recreated {
        if let Some(sql) = &t.sql.1 {
            out(format_args!("{sql};"))?;
        }
        // Its indexes and triggers in B, after its rows; the object list below then
        // skips them.
        created.extend(pair.create_statements_of_b(&t.name)?);
        pair.each_row_of_b(&t.name, &mut |names, values| {
            let names: Vec<String> = names.iter().map(|n| ident(n)).collect();
            let values: Vec<String> = values.iter().map(sql_literal).collect();
            out(format_args!(
                "INSERT INTO {}({}) VALUES({});",
                ident(&t.name),
                names.join(", "),
                values.join(", ")
            ))
            .map_err(|e| crate::Error::Usage(e.to_string()))
        })?;
    }
    for (_, sql) in &created {
        out(format_args!("{sql};"))?;
    }
    let changed: Vec<&TableSummary> = summary
        .tables
        .iter()
        .filter(|t| t.status == TableStatus::Changed && t.inserted + t.updated + t.deleted > 0)
        .collect();
    each_change(
        pair,
        &changed,
        changeset,
        &mut |t, c| out(format_args!("{}", change_sql(t, c))),
        true,
    )?;
    for o in summary
        .objects
        .iter()
        .filter(|o| o.change != "dropped" && !created.iter().any(|(n, _)| *n == o.name))
    {
        if let Some(sql) = &o.sql.1 {
            out(format_args!("{sql};"))?;
        }
    }
    for t in summary
        .tables
        .iter()
        .filter(|t| t.status == TableStatus::NotDiffable)
    {
        out(format_args!(
            "-- table {} not compared: {}",
            t.name,
            t.reason.as_deref().unwrap_or("")
        ))?;
    }
    out(format_args!("COMMIT;"))?;
    Ok(())
}

/// `1 row`, `3 rows`.
fn rows_word(n: Option<u64>) -> String {
    let n = n.unwrap_or(0);
    format!("{n} row{}", if n == 1 { "" } else { "s" })
}
