//! `sqlferry verify FILE`: the digest, page size, page count and integrity of a database.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use super::{Global, RemoteArgs, exit, expand_tilde, is_local_path, out};
use crate::page::{JournalMode, Snapshot, hex};

/// Arguments of `sqlferry verify`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry verify backup.db                   digest, page size, page count, integrity\n  \
sqlferry verify backup.db --json            the same as one JSON object\n  \
sqlferry verify -q backup.db && echo ok     only the exit status\n  \
sqlferry verify acme/app.db@3               a stored version, fetched whole and checked\n\n\
Exit status is 0 when the integrity check says ok, 7 when it does not (or SQLite finds the \
file damaged, or FILE is not a valid SQLite database: a verification that failed), 3 when \
FILE is missing or cannot be read.\n\n\
Two databases with the same digest hold the same pages, byte for byte, whatever their \
journal mode. The digest is the one `push --json` prints and a replica is checked against.\n\n\
A stored version (namespace/name[@N|@latest|@latest-N]) is fetched whole into a temporary \
file, every page hashed again, and the result compared with the digest the store recorded \
for it; the temporary file is deleted.")]
pub struct VerifyArgs {
    /// The database file (read-only; a live database is fine), or a stored version:
    /// namespace/name[@N|@latest|@latest-N].
    pub file: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// The server and the key, for a stored version.
    #[command(flatten)]
    pub connection: RemoteArgs,
}

/// What `verify` reports.
#[derive(Debug, serde::Serialize)]
struct Report {
    file: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    replica: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
    digest: String,
    page_size: u32,
    page_count: u32,
    journal_mode: JournalMode,
    integrity: Vec<String>,
}

impl VerifyArgs {
    /// Runs the command.
    pub fn run(self, global: &Global) -> anyhow::Result<ExitCode> {
        let path = expand_tilde(&self.file);
        let report = match self.stored_version()? {
            Some(report) => report,
            None => check(&path)?,
        };
        let ok = report.integrity == ["ok"];
        if self.json {
            out(format_args!("{}", serde_json::to_string(&report)?))?;
        } else if !global.quiet || !ok {
            match (&report.replica, report.version) {
                (Some(r), Some(v)) => out(format_args!("version:      {r}@{v}"))?,
                _ => out(format_args!("file:         {}", report.file.display()))?,
            }
            out(format_args!("digest:       {}", report.digest))?;
            out(format_args!("page size:    {}", report.page_size))?;
            out(format_args!("page count:   {}", report.page_count))?;
            out(format_args!(
                "journal mode: {}",
                serde_json::to_value(report.journal_mode)?
                    .as_str()
                    .unwrap_or("?")
            ))?;
            out(format_args!(
                "integrity:    {}",
                report.integrity.join("\n              ")
            ))?;
        }
        Ok(ExitCode::from(if ok { exit::OK } else { exit::VERIFY }))
    }
}

impl VerifyArgs {
    /// Verifies FILE as a stored version when it names one; `None` when FILE is a local
    /// path (or names nothing else).
    fn stored_version(&self) -> anyhow::Result<Option<Report>> {
        if is_local_path(&self.file) {
            return Ok(None);
        }
        let Ok((replica, selector)) = crate::store::Selector::split(&self.file) else {
            return Ok(None);
        };
        let server = self.connection.resolve()?;
        let key = self.connection.key_for(&server, &replica, None);
        let versions = server.versions(&replica, key.as_deref()).map_err(|e| {
            let hint = format!("no file {} here either", self.file);
            anyhow::Error::from(e).context(hint)
        })?;
        let tmp = tempfile::tempdir().context("cannot make a temporary directory")?;
        let copy = tmp.path().join("version.db");
        let pulled = server
            .pull(
                &replica,
                selector,
                &copy,
                key.as_deref(),
                crate::remote::no_progress(),
            )
            .with_context(|| format!("cannot fetch {replica}@{selector}"))?;
        let mut report = check(&copy)?;
        let recorded = versions
            .iter()
            .find(|v| v.number == pulled.version)
            .map(|v| v.digest.clone())
            .unwrap_or_default();
        if recorded != report.digest {
            report.integrity.push(format!(
                "digest {} differs from the one recorded for version {}: {recorded}",
                report.digest, pulled.version
            ));
        }
        report.file = PathBuf::from(format!("{replica}@{}", pulled.version));
        report.replica = Some(replica.to_string());
        report.version = Some(pulled.version);
        Ok(Some(report))
    }
}

/// Hashes every page of the database at `path` afresh and runs its integrity check.
fn check(path: &std::path::Path) -> anyhow::Result<Report> {
    let mut snap = match Snapshot::open(path) {
        Ok(snap) => snap,
        // A file that is there and readable but is no valid database failed the
        // verification (7); a missing or unreadable one stays a local error (3).
        Err(e) if e.kind() == crate::ErrorKind::NotADatabase => {
            return Err(anyhow::Error::from(crate::Error::Verification(format!(
                "not a valid SQLite database: {e}"
            ))));
        }
        Err(e) => return Err(anyhow::Error::from(e).context("cannot verify")),
    };
    let (page_size, page_count) = (snap.page_size(), snap.page_count());
    // Every page is hashed afresh here: verify is the check, it trusts no cache.
    let digest = snap.digest(true)?;
    let integrity = match snap.integrity_check() {
        Ok(lines) => lines,
        // SQLite could not even walk the file: that is the check's answer.
        Err(e) if e.kind() == crate::ErrorKind::Verification => vec![e.to_string()],
        Err(e) => return Err(e.into()),
    };
    Ok(Report {
        file: path.to_owned(),
        replica: None,
        version: None,
        digest: hex(&digest),
        page_size,
        page_count,
        journal_mode: snap.journal_mode(),
        integrity,
    })
}
