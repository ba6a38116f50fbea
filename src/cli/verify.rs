//! `sqlferry verify FILE`: the digest, page size, page count and integrity of a database.

use std::process::ExitCode;

use super::{Global, RemoteArgs, exit, expand_tilde, is_local_path, out};
use crate::shutdown::Shutdown;

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
A stored version (namespace/name[@N|@latest|@latest-N|@TIME]) is fetched whole into a temporary \
file, every page hashed again, and the result compared with the digest the store recorded \
for it; the temporary file is deleted.")]
pub struct VerifyArgs {
    /// The database file (read-only; a live database is fine), or a stored version:
    /// namespace/name[@N|@latest|@latest-N|@TIME].
    pub file: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// The server and the key, for a stored version.
    #[command(flatten)]
    pub connection: RemoteArgs,
}

impl VerifyArgs {
    /// Runs the command.
    pub async fn run(self, global: &Global, shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        super::interruptible(shutdown, self.verify(global)).await
    }

    async fn verify(&self, global: &Global) -> anyhow::Result<ExitCode> {
        let path = expand_tilde(&self.file);
        // FILE is a stored version when it is no local path and names one.
        let stored = match is_local_path(&self.file) {
            true => None,
            false => crate::client::verify_stored(&self.connection.options(), &self.file).await?,
        };
        let report = match stored {
            Some(report) => report,
            None => crate::client::verify_file(&path).await?,
        };
        let ok = report.is_ok();
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
