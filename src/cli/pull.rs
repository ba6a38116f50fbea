//! `sqlferry pull REMOTE[@N|@latest|@latest-N] [LOCAL]`: bring any version back.

use std::process::ExitCode;

use anyhow::Context;

use super::progress::Bar;
use super::{Global, ServerArg, exit, expand_tilde, human_bytes, out};
use crate::history::{self, LastSync};
use crate::store::Selector;

/// Arguments of `sqlferry pull`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry pull acme/app.db                    the latest version into ./app.db\n  \
sqlferry pull acme/app.db@3 restored.db      version 3\n  \
sqlferry pull acme/app.db@latest-1 prev.db   the version before the latest\n\n\
LOCAL changes in one transaction, after its digest has been checked against the version's: \
readers of LOCAL keep reading and see the old database or the new one, never a mix. Only \
the pages that differ are written. LOCAL keeps its journal mode; a new LOCAL takes the \
version's.")]
pub struct PullArgs {
    /// The replica, with an optional version: namespace/name[@N|@latest|@latest-N].
    pub remote: String,
    /// The database to write (default: the replica's last path segment, here).
    pub local: Option<String>,
    /// Print one JSON object with the figures on stdout.
    #[arg(long)]
    pub json: bool,
    /// The server.
    #[command(flatten)]
    pub server: ServerArg,
}

impl PullArgs {
    /// Runs the command.
    pub fn run(self, global: &Global) -> anyhow::Result<ExitCode> {
        let (replica, selector) = Selector::split(&self.remote)?;
        let local = expand_tilde(self.local.as_deref().unwrap_or(replica.name()));
        let server = self.server.resolve()?;
        let bar = Bar::new(!global.quiet && !self.json);
        let outcome = server
            .pull(&replica, selector, &local, &bar)
            .with_context(|| {
                format!("pull {replica}@{selector} into {} failed", local.display())
            })?;
        history::record(&LastSync {
            database: std::path::absolute(&local).unwrap_or(local.clone()),
            server: server.url(),
            replica: replica.to_string(),
            version: outcome.version.number,
            digest: outcome.version.digest.clone(),
            at: history::now(),
        });
        if self.json {
            let mut v = serde_json::to_value(&outcome.stats)?;
            v["replica"] = replica.as_str().into();
            v["version"] = outcome.version.number.into();
            out(format_args!("{v}"))?;
        } else if !global.quiet {
            let s = &outcome.stats;
            out(format_args!(
                "pulled {replica}@{} into {}: {} of {} pages written ({} received) in {:.2?}",
                outcome.version.number,
                local.display(),
                s.pages_sent,
                s.pages_total,
                human_bytes(s.bytes_sent),
                s.duration
            ))?;
        }
        Ok(ExitCode::from(exit::OK))
    }
}
