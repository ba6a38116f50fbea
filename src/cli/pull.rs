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
sqlferry pull acme/app.db@latest-1 prev.db   the version before the latest\n  \
sqlferry pull acme/app.db --subscribe        keep going: pull each new version as it lands\n\n\
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
    /// Keep going: pull each new version as it lands (until SIGINT or SIGTERM).
    #[arg(long, conflicts_with = "json")]
    pub subscribe: bool,
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
        // With --from, one positional is LOCAL unless it is a version (@3).
        let (remote, local_arg) = match (&self.remote, &self.local, &sidecar) {
            (Some(r), None, Some(_)) if !r.starts_with('@') => (None, Some(r.clone())),
            (r, l, _) => (r.clone(), l.clone()),
        };
        let spec = match (&remote, &sidecar) {
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
        let local = match (&local_arg, &sidecar) {
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
        let database = crate::config::database_key(&local);
        // --key or SQLFERRY_KEY, else the sidecar's PULL key, else a saved key.
        let key = match (&self.connection.key, &sidecar) {
            (None, Some((s, _))) => Some(s.key.clone()),
            _ => self.connection.key_for(&server, &replica, Some(&database)),
        };
        let puller = Puller {
            server,
            replica,
            local,
            database,
            key,
        };
        if self.subscribe {
            if !matches!(selector, Selector::Latest) {
                return Err(crate::Error::Usage(format!(
                    "--subscribe follows the latest version; drop @{selector}"
                ))
                .into());
            }
            return super::subscribe::run_pull(puller, global);
        }
        let bar: Arc<dyn Progress> = Arc::new(Bar::new(!global.quiet && !self.json));
        let outcome = puller.pull(selector, bar)?;
        let (replica, local) = (&puller.replica, &puller.local);
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

/// One replica pulled into one database: `pull` and the pull subscriber share it.
#[derive(Debug, Clone)]
pub struct Puller {
    /// Where the replica lives.
    pub server: crate::remote::Server,
    /// The replica.
    pub replica: crate::store::ReplicaPath,
    /// The database, as given.
    pub local: std::path::PathBuf,
    /// The database, absolute: the key of its history.
    pub database: std::path::PathBuf,
    /// The key (none for the embedded store).
    pub key: Option<String>,
}

impl Puller {
    /// Pulls the version `selector` names; records it in the local history.
    pub fn pull(
        &self,
        selector: Selector,
        progress: Arc<dyn Progress>,
    ) -> anyhow::Result<crate::remote::PullOutcome> {
        let (replica, local) = (&self.replica, &self.local);
        let outcome = self
            .server
            .pull(replica, selector, local, self.key.as_deref(), progress)
            .with_context(|| {
                format!("pull {replica}@{selector} into {} failed", local.display())
            })?;
        self.record(&outcome);
        Ok(outcome)
    }

    /// Pulls the latest version through the writer `kept` from the previous pull, if it
    /// can serve again, else a new one; keeps the writer for the next pull. A writer
    /// kept across pulls knows the pages it committed, so as long as no one else writes
    /// LOCAL a pull does not read the whole file (see [`Writer::keep_committed_hashes`]).
    pub fn pull_latest_kept(
        &self,
        kept: &mut Option<crate::page::Writer>,
    ) -> anyhow::Result<crate::remote::PullOutcome> {
        let (replica, local) = (&self.replica, &self.local);
        let context = || format!("pull {replica} into {} failed", local.display());
        let open = || -> anyhow::Result<crate::page::Writer> {
            Ok(crate::page::Writer::open(local)
                .with_context(context)?
                .keep_committed_hashes())
        };
        // A writer that fails to get ready is dropped: the next pull opens a new one.
        let writer = match kept.take() {
            Some(mut w) => match w.ready_again().with_context(context)? {
                true => w,
                // Closed before the new one opens the file: a handle closed under a
                // live connection would drop that connection's locks.
                false => {
                    drop(w);
                    open()?
                }
            },
            None => open()?,
        };
        let (outcome, writer) = self
            .server
            .pull_into(
                replica,
                Selector::Latest,
                writer,
                self.key.as_deref(),
                crate::remote::no_progress(),
            )
            .with_context(context)?;
        *kept = Some(writer);
        self.record(&outcome);
        Ok(outcome)
    }

    fn record(&self, outcome: &crate::remote::PullOutcome) {
        history::record(&LastSync::now(
            &self.database,
            self.server.url(),
            self.replica.as_str(),
            outcome.version,
            &outcome.stats.digest,
            "pull",
        ));
    }
}
