//! `sqlferry versions REMOTE`: every version of a replica.

use std::process::ExitCode;

use super::{FromArgs, Global, RemoteArgs, exit, human_bytes, out};
use crate::client::{ReplicaSource, Scratch};
use crate::rows::{Pair, TableStatus, TableSummary};
use crate::shutdown::Shutdown;
use crate::store::{ReplicaPath, Selector};

/// Arguments of `sqlferry versions`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Pull any of them with `sqlferry pull REMOTE@N`, `REMOTE@latest-N` (N \
before the latest) or `REMOTE@2026-12-01T10:00:00Z` (the version that was the latest at that \
time, UTC).\n\n\
`stored` is what each version added to the store: the bytes of the pages no earlier version \
of the replica uses (as stored, compressed where a page came compressed). The total is what \
the replica's versions keep stored; pages shared with other replicas are counted in each. \
In --json, each version's `stored_bytes`; their sum is the total.\n\n\
--changes adds, under each of the newest versions (10 unless --last N says otherwise; \
--last 0: all), the rows each table gained, changed and lost since the version before it, \
and tables added, dropped or altered (as `sqlferry diff` counts them; in --json, each \
version's `changes`, null where not looked at). Each version is pulled into a temporary \
file as a delta of the one before (removed afterwards), so the first costs a whole pull and \
each next one its changed pages.\n\n\
Examples:\n  \
sqlferry versions acme/app.db\n  \
sqlferry versions acme/app.db --changes             rows changed per table, last 10 versions\n  \
sqlferry versions acme/app.db --changes --last 50   the last 50"
)]
pub struct VersionsArgs {
    /// The replica: namespace/name.
    #[arg(required_unless_present = "from")]
    pub remote: Option<String>,
    /// The replica of a sidecar.
    #[command(flatten)]
    pub from: FromArgs,
    /// Print one JSON array of versions instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Show, per version, the rows changed in each table since the version before.
    #[arg(long)]
    pub changes: bool,
    /// With --changes: how many of the newest versions to look at (0: all).
    #[arg(long, value_name = "N", default_value_t = 10, requires = "changes")]
    pub last: usize,
    /// The server and the key.
    #[command(flatten)]
    pub connection: RemoteArgs,
    /// The encryption key, for --changes of an encrypted replica (the list itself
    /// needs none).
    #[command(flatten)]
    pub encryption: super::encryption::EncryptionArgs,
}

impl VersionsArgs {
    /// Runs the command.
    pub async fn run(self, global: &Global, shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        let (spec, connection) = self
            .from
            .resolve(self.remote.as_deref(), self.connection.options())?;
        let replica = ReplicaPath::parse(&spec)?;
        // Only --changes opens versions; the list is the server's record.
        let key_given = match self.changes {
            true => self.encryption.keys(global.quiet || self.json)?,
            false => Vec::new(),
        };
        let pass = match self.changes {
            true => self.encryption.passphrases(global.quiet || self.json)?,
            false => Vec::new(),
        };
        let listed = super::interruptible(shutdown, async {
            // A passphrase is stretched with the salt the replica keeps.
            let key_given = match pass.is_empty() {
                true => key_given.clone(),
                false => {
                    let source =
                        crate::client::ReplicaSource::resolve(&connection, replica.clone()).await?;
                    super::encryption::with_passphrases(
                        &key_given,
                        &pass,
                        &source.server,
                        &source.replica,
                        source.key.as_deref(),
                        false,
                    )
                    .await?
                }
            };
            let encryption = super::encryption::keyring(&key_given);
            let versions = crate::client::versions(&connection, &replica).await?;
            let changes = match self.changes {
                true => changes(&connection, &replica, &versions, self.last, encryption).await?,
                false => Changes::new(),
            };
            self.print(&versions, &changes)
        });
        listed
            .await
            .map_err(|e| super::encryption::name_key(e, &key_given))
    }

    fn print(
        &self,
        versions: &[crate::store::VersionInfo],
        changes: &Changes,
    ) -> anyhow::Result<ExitCode> {
        if self.json {
            if !self.changes {
                out(format_args!("{}", serde_json::to_string(&versions)?))?;
                return Ok(ExitCode::from(exit::OK));
            }
            let mut list = Vec::with_capacity(versions.len());
            for v in versions {
                let mut value = serde_json::to_value(v)?;
                value["changes"] = match changes.get(&v.number) {
                    Some(tables) => serde_json::to_value(tables)?,
                    None => serde_json::Value::Null,
                };
                list.push(value);
            }
            out(format_args!("{}", serde_json::Value::Array(list)))?;
            return Ok(ExitCode::from(exit::OK));
        }
        out(format_args!(
            "{:>7}  {:<20}  {:>10}  {:>10}  message",
            "version", "time (UTC)", "size", "stored"
        ))?;
        let stored = |v: &crate::store::VersionInfo| v.stored_bytes.map_or("-".into(), human_bytes);
        for v in versions {
            out(format_args!(
                "{:>7}  {:<20}  {:>10}  {:>10}  {}",
                v.number,
                crate::epoch::rfc3339(v.created_at),
                human_bytes(v.size),
                stored(v),
                v.message
            ))?;
            if let Some(tables) = changes.get(&v.number) {
                if tables.is_empty() {
                    out(format_args!("{:>9}no row changed", ""))?;
                }
                for t in tables {
                    out(format_args!("{:>9}{}", "", change_line(t)))?;
                }
            }
        }
        if versions.iter().all(|v| v.stored_bytes.is_some()) {
            let total: u64 = versions.iter().filter_map(|v| v.stored_bytes).sum();
            out(format_args!(
                "{} version{}, {} stored",
                versions.len(),
                if versions.len() == 1 { "" } else { "s" },
                human_bytes(total)
            ))?;
        }
        Ok(ExitCode::from(exit::OK))
    }
}

/// Per version number looked at: the tables that changed since the version before.
type Changes = std::collections::HashMap<u64, Vec<TableSummary>>;

/// One table's changes, for a line under its version.
fn change_line(t: &TableSummary) -> String {
    let rows = |n: Option<u64>| {
        let n = n.unwrap_or(0);
        format!("{n} row{}", if n == 1 { "" } else { "s" })
    };
    match t.status {
        TableStatus::Added => format!("{}: added, {}", t.name, rows(t.rows)),
        TableStatus::Dropped => format!("{}: dropped, {}", t.name, rows(t.rows)),
        TableStatus::Altered => format!("{}: altered (columns changed, rows not compared)", t.name),
        TableStatus::NotDiffable => format!("{}: not diffable", t.name),
        TableStatus::Same | TableStatus::Changed => format!(
            "{}: {} inserted, {} updated, {} deleted",
            t.name, t.inserted, t.updated, t.deleted
        ),
    }
}

/// The tables each of the `last` newest versions changed (all with 0): each version
/// pulled into one of two scratch files in turn, as a delta of the one that file held,
/// and compared with the version before it (the first version with an empty database).
/// A merge's candidate is left out (no entry): the merge is compared with the version
/// it was merged onto.
async fn changes(
    connection: &crate::client::Connection,
    replica: &ReplicaPath,
    versions: &[crate::store::VersionInfo],
    last: usize,
    encryption: Option<crate::crypt::Keys>,
) -> anyhow::Result<Changes> {
    let mut found = Changes::new();
    let start = match last {
        0 => 0,
        n => versions.len().saturating_sub(n),
    };
    if start == versions.len() {
        return Ok(found);
    }
    let source = ReplicaSource::resolve(connection, replica.clone())
        .await?
        .with_encryption(encryption);
    let scratch = Scratch::new()?;
    let files = [scratch.path("x.db"), scratch.path("y.db")];
    // The version before the first one looked at, if the replica keeps it.
    let empty = scratch.path("empty.db");
    let (mut before, mut next) = match versions[..start]
        .iter()
        .rev()
        .find(|v| v.merged_into.is_none())
    {
        Some(v) => {
            source
                .pull_into_scratch(Selector::Number(v.number), &files[0], None)
                .await?;
            (files[0].clone(), 1)
        }
        None => (scratch.empty("empty.db").await?, 0),
    };
    for v in &versions[start..] {
        if v.merged_into.is_some() {
            // A merge's candidate was never the replica's state: the merge after it is
            // compared with the version before both.
            continue;
        }
        let dest = files[next].clone();
        // A file not written yet starts as a copy of the version before: a delta.
        source
            .pull_into_scratch(
                Selector::Number(v.number),
                &dest,
                // The empty "before" of a first version is no base: its page size is
                // not the replica's.
                (before != empty).then_some(before.as_path()),
            )
            .await?;
        let (a, b) = (before.clone(), dest.clone());
        let summary = tokio::task::spawn_blocking(move || Pair::open(&a, &b)?.summary()).await??;
        let changed = summary
            .tables
            .into_iter()
            .filter(|t| t.has_changes())
            .collect();
        found.insert(v.number, changed);
        before = dest;
        next = 1 - next;
    }
    drop(scratch);
    Ok(found)
}
