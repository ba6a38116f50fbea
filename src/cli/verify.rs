//! `sqlferry verify FILE`: the digest, page size, page count and integrity of a database.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use super::{Global, exit, expand_tilde, out};
use crate::engine::PageSource;
use crate::page::{JournalMode, Snapshot, hex, page_hash};

/// Arguments of `sqlferry verify`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry verify backup.db                   digest, page size, page count, integrity\n  \
sqlferry verify backup.db --json            the same as one JSON object\n  \
sqlferry verify -q backup.db && echo ok     only the exit status\n\n\
Exit status is 0 when the integrity check says ok, 7 when it does not (or SQLite finds the \
file damaged), 3 when FILE cannot be read as an SQLite database.\n\n\
Two databases with the same digest hold the same pages, byte for byte, whatever their \
journal mode. The digest is the one `push --json` prints and a replica is checked against.")]
pub struct VerifyArgs {
    /// The database file (read-only; a live database is fine).
    pub file: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What `verify` reports.
#[derive(Debug, serde::Serialize)]
struct Report {
    file: PathBuf,
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
        let mut snap = Snapshot::open(&path).context("cannot verify")?;
        let (page_size, page_count) = (snap.page_size(), snap.page_count());
        let mut digest = crate::page::Digest::new(page_size, page_count);
        // Every page is hashed afresh here: verify is the check, it trusts no cache.
        snap.for_each_page(&mut |pgno, data| {
            digest.push(&page_hash(pgno, data));
            Ok(())
        })?;
        let digest = digest
            .finish()
            .context("the page count changed while reading")?;
        let integrity = match snap.integrity_check() {
            Ok(lines) => lines,
            // SQLite could not even walk the file: that is the check's answer.
            Err(e) if e.kind() == crate::ErrorKind::Verification => vec![e.to_string()],
            Err(e) => return Err(e.into()),
        };
        let ok = integrity == ["ok"];
        let report = Report {
            file: path,
            digest: hex(&digest),
            page_size,
            page_count,
            journal_mode: snap.journal_mode(),
            integrity,
        };
        if self.json {
            out(format_args!("{}", serde_json::to_string(&report)?))?;
        } else if !global.quiet || !ok {
            out(format_args!("file:         {}", report.file.display()))?;
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
