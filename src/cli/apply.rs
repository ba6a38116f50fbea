//! `sqlferry apply CHANGESET DB`: a SQLite changeset applied to a database in one
//! transaction, with the conflicts it met listed.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{Global, exit, expand_tilde, out};
use crate::rows::session::ConflictKind;
use crate::rows::{ApplyReport, MetConflict, OnConflict};
use crate::shutdown::Shutdown;

/// What to do when a change conflicts with DB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConflictMode {
    /// Stop at the first conflict: DB is left as it was (exit 6).
    Abort,
    /// Leave the conflicting row as it is, apply the rest.
    Skip,
    /// Write the change over the conflicting row (a missing row or a broken constraint
    /// cannot be replaced: that change is skipped).
    Replace,
}

/// Arguments of `sqlferry apply`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry diff old.db new.db --changeset c.bin && sqlferry apply c.bin copy-of-old.db\n  \
sqlferry apply c.bin app.db --on-conflict skip      apply what fits, list the rest\n  \
sqlferry apply c.bin app.db --json                  the conflicts as JSON\n\n\
CHANGESET is a SQLite changeset (sqlferry diff --changeset, sqldiff --changeset, or the \
session extension's sqlite3session_changeset), a file or a pipe (copied to a temporary file \
first). It is read twice, streaming: first whole, \
to check it is a changeset and that every table it changes exists in DB with the same \
columns and primary key (a table without one by rowid), then applied in one write \
transaction (BEGIN IMMEDIATE): readers of DB keep reading and see it before or after, \
never half applied; DB may be in WAL or rollback-journal mode.\n\n\
A conflict is a change that does not fit DB as it is: an update or delete of a row whose \
values are not the changeset's old values (data) or that is missing (not-found), an insert \
of a key that is already there (conflict; the line says \"key exists\"), a broken constraint (constraint), or, with \
PRAGMA foreign_keys on, foreign keys violated at the end (foreign-key). Each conflict met \
is listed, with what became of it. --on-conflict abort (the default) stops at the first \
and changes nothing (exit 6); skip leaves those rows as they are; replace writes the \
change over them.\n\n\
A file that is not a changeset, or a changeset that does not fit DB, changes nothing \
(exit 3 and 2).")]
pub struct ApplyArgs {
    /// The changeset file.
    pub changeset: String,
    /// The database to change.
    pub db: String,
    /// What to do when a change conflicts with DB.
    #[arg(long, value_enum, default_value = "abort", value_name = "MODE")]
    pub on_conflict: ConflictMode,
    /// Print one JSON object: changes, applied, and every conflict.
    #[arg(long)]
    pub json: bool,
}

fn conflict_line(c: &MetConflict) -> String {
    let key: Vec<String> = c.key.iter().map(|v| v.to_string()).collect();
    // The JSON's kind `conflict` (SQLite's name) would read "conflict: conflict, …".
    let kind = match c.kind {
        ConflictKind::Conflict => "key exists".to_owned(),
        kind => serde_json::to_value(kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
    };
    match &c.op {
        None => format!("conflict: {kind} (foreign keys violated): {}", c.resolution),
        Some(op) => {
            let op = serde_json::to_value(op)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            format!(
                "conflict: {kind}, {op} {} key ({}): {}",
                c.table,
                key.join(", "),
                c.resolution
            )
        }
    }
}

impl ApplyArgs {
    /// Runs the command.
    pub async fn run(self, global: &Global, shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        let changeset: PathBuf = expand_tilde(&self.changeset);
        let db: PathBuf = expand_tilde(&self.db);
        let mode = match self.on_conflict {
            ConflictMode::Abort => OnConflict::Abort,
            ConflictMode::Skip => OnConflict::Skip,
            ConflictMode::Replace => OnConflict::Replace,
        };
        let (c, d) = (changeset.clone(), db.clone());
        let work = async move {
            let report = tokio::task::spawn_blocking(move || crate::rows::apply(&c, &d, mode))
                .await?
                .map_err(|e| {
                    e.context(format!(
                        "apply {} to {} failed",
                        changeset.display(),
                        db.display()
                    ))
                })?;
            self.print(&report, &changeset, &db, global)
        };
        super::interruptible(shutdown, work).await
    }

    fn print(
        &self,
        report: &ApplyReport,
        changeset: &std::path::Path,
        db: &std::path::Path,
        global: &Global,
    ) -> anyhow::Result<ExitCode> {
        let code = if report.applied {
            exit::OK
        } else {
            exit::CONFLICT
        };
        if self.json {
            out(format_args!("{}", serde_json::to_string(report)?))?;
            return Ok(ExitCode::from(code));
        }
        if !report.applied {
            for c in &report.conflicts {
                eprintln!("{}", conflict_line(c));
            }
            eprintln!(
                "sqlferry: error: apply {} to {}: a conflict with --on-conflict abort: nothing \
                 was changed; apply with --on-conflict skip to leave those rows as they are, or \
                 replace to overwrite them",
                changeset.display(),
                db.display()
            );
            return Ok(ExitCode::from(code));
        }
        if !global.quiet {
            for c in &report.conflicts {
                out(format_args!("{}", conflict_line(c)))?;
            }
            out(format_args!(
                "applied {} to {}: {} change{}, {} conflict{}",
                changeset.display(),
                db.display(),
                report.changes,
                if report.changes == 1 { "" } else { "s" },
                report.conflicts.len(),
                if report.conflicts.len() == 1 { "" } else { "s" },
            ))?;
        }
        Ok(ExitCode::from(code))
    }
}
