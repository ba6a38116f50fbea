//! `sqlferry push SRC DEST`: bring DEST up to date with SRC, sending only what differs.

use std::process::ExitCode;

use anyhow::Context;

use super::progress::Bar;
use super::{Global, exit, expand_tilde, is_local_path, out};
use crate::engine::sync_local;
use crate::page::{Snapshot, Writer};

/// Arguments of `sqlferry push`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry push app.db /backup/app.db        copy app.db, then only what changed\n  \
sqlferry push app.db ./copy.db --json      print figures as one JSON object\n\n\
DEST is a local file when it starts with /, ./, ../ or ~/, or already exists. A new DEST \
takes SRC's page size and journal mode; an existing DEST keeps its journal mode. SRC is \
only read, in one read transaction: an application writing it in WAL mode never waits. \
DEST changes in one transaction, after its digest has been checked against SRC's: \
readers of DEST see the old database or the new one, never a mix.")]
pub struct PushArgs {
    /// The database to copy (read-only; a live database is fine).
    pub src: String,
    /// Where the copy lives: a local path.
    pub dest: String,
    /// Print one JSON object with the figures on stdout.
    #[arg(long)]
    pub json: bool,
}

impl PushArgs {
    /// Runs the command.
    pub fn run(self, global: &Global) -> anyhow::Result<ExitCode> {
        if !is_local_path(&self.dest) {
            return Err(crate::Error::Usage(format!(
                "DEST '{}' is not a local path; write ./{} for a file in this directory",
                self.dest, self.dest
            ))
            .into());
        }
        let src = expand_tilde(&self.src);
        let dest = expand_tilde(&self.dest);
        if let (Ok(a), Ok(b)) = (src.canonicalize(), dest.canonicalize()) {
            if a == b {
                return Err(crate::Error::Usage(format!(
                    "SRC and DEST are the same file ({})",
                    a.display()
                ))
                .into());
            }
        }
        let mut source = Snapshot::open(&src).context("cannot read SRC")?;
        let mut target = Writer::open(&dest).context("cannot write DEST")?;
        let bar = Bar::new(!global.quiet && !self.json);
        let stats = sync_local(&mut source, &mut target, &bar)
            .with_context(|| format!("push {} to {} failed", src.display(), dest.display()))?;
        drop(source);
        drop(target);
        if self.json {
            out(format_args!("{}", serde_json::to_string(&stats)?))?;
        } else if !global.quiet {
            out(format_args!(
                "{} -> {}: {} of {} pages sent ({} bytes sent, {} received) in {:.2?}, digest {}",
                src.display(),
                dest.display(),
                stats.pages_sent,
                stats.pages_total,
                stats.bytes_sent,
                stats.bytes_received,
                stats.duration,
                stats.digest
            ))?;
        }
        Ok(ExitCode::from(exit::OK))
    }
}
