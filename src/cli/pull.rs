//! `sqlferry pull REMOTE[@N|@latest|@latest-N] [LOCAL]`: bring any version back.

use std::process::ExitCode;

use anyhow::Context;

use super::progress::Bar;
use std::sync::Arc;

use super::{Global, RemoteArgs, exit, expand_tilde, human_bytes, out};
use crate::config::Sidecar;
use crate::engine::Progress;
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
version's.\n\n\
Keys (servers only): --key, SQLFERRY_KEY, the sidecar's PULL key with --from, or the key \
saved for LOCAL by an earlier push.")]
pub struct PullArgs {
    /// The replica, with an optional version: namespace/name[@N|@latest|@latest-N].
    #[arg(required_unless_present = "from")]
    pub remote: Option<String>,
    /// Take the server, the replica and the key from a sidecar file (`<db>-sqlferry`);
    /// LOCAL then defaults to the database beside it.
    #[arg(long, value_name = "SIDECAR", conflicts_with = "server")]
    pub from: Option<String>,
    /// The database to write (default: the replica's last path segment, here).
    pub local: Option<String>,
    /// Print one JSON object with the figures on stdout.
    #[arg(long)]
    pub json: bool,
    /// The server and the key.
    #[command(flatten)]
    pub connection: RemoteArgs,
}

impl PullArgs {
    /// Runs the command.
    pub fn run(self, global: &Global) -> anyhow::Result<ExitCode> {
        let sidecar = match &self.from {
            Some(path) => {
                let path = expand_tilde(path);
                Some((Sidecar::load(&path)?, path))
            }
            None => None,
        };
        let spec = match (&self.remote, &sidecar) {
            (Some(remote), Some((s, _))) if remote.starts_with('@') => {
                format!("{}{remote}", s.replica)
            }
            (Some(_), Some(_)) => {
                return Err(crate::Error::Usage(
                    "with --from, give the version alone (for example @3), or nothing for the latest".into(),
                )
                .into());
            }
            (Some(remote), None) => remote.clone(),
            (None, Some((s, _))) => s.replica.clone(),
            (None, None) => unreachable!("clap requires REMOTE unless --from is given"),
        };
        let (replica, selector) = Selector::split(&spec)?;
        let local = match (&self.local, &sidecar) {
            (Some(l), _) => expand_tilde(l),
            (None, Some((_, path))) => Sidecar::database_for(path).ok_or_else(|| {
                crate::Error::Usage(format!(
                    "{} does not end in -sqlferry: name LOCAL",
                    path.display()
                ))
            })?,
            (None, None) => expand_tilde(replica.name()),
        };
        let server = match &sidecar {
            Some((s, _)) => crate::remote::Server::parse(Some(&s.server))?,
            None => self.connection.resolve()?,
        };
        let database = std::path::absolute(&local).unwrap_or(local.clone());
        // --key or SQLFERRY_KEY, else the sidecar's PULL key, else a saved key.
        let key = match (&self.connection.key, &sidecar) {
            (None, Some((s, _))) => Some(s.key.clone()),
            _ => self.connection.key_for(&server, &replica, Some(&database)),
        };
        let bar: Arc<dyn Progress> = Arc::new(Bar::new(!global.quiet && !self.json));
        let outcome = server
            .pull(&replica, selector, &local, key.as_deref(), bar)
            .with_context(|| {
                format!("pull {replica}@{selector} into {} failed", local.display())
            })?;
        history::record(&LastSync {
            database,
            server: server.url(),
            replica: replica.to_string(),
            version: outcome.version,
            digest: outcome.stats.digest.clone(),
            at: history::now(),
        });
        if self.json {
            let mut v = serde_json::to_value(&outcome.stats)?;
            v["replica"] = replica.as_str().into();
            v["version"] = outcome.version.into();
            out(format_args!("{v}"))?;
        } else if !global.quiet {
            let s = &outcome.stats;
            out(format_args!(
                "pulled {replica}@{} into {}: {} of {} pages written ({} received) in {:.2?}",
                outcome.version,
                local.display(),
                s.pages_sent,
                s.pages_total,
                human_bytes(s.bytes_received),
                s.duration
            ))?;
        }
        Ok(ExitCode::from(exit::OK))
    }
}
