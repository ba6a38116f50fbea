//! `sqlferry versions REMOTE`: every version of a replica.

use std::process::ExitCode;

use super::{FromArgs, Global, RemoteArgs, exit, human_bytes, out};
use crate::shutdown::Shutdown;
use crate::store::ReplicaPath;

/// Arguments of `sqlferry versions`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Pull any of them with `sqlferry pull REMOTE@N`, `REMOTE@latest-N` (N \
before the latest) or `REMOTE@2026-12-01T10:00:00Z` (the version that was the latest at that \
time, UTC).\n\n\
`stored` is what each version added to the store: the bytes of the pages no earlier version \
of the replica uses (as stored, compressed where a page came compressed). The total is what \
the replica's versions keep stored; pages shared with other replicas are counted in each. \
In --json, each version's `stored_bytes`; their sum is the total."
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
    /// The server and the key.
    #[command(flatten)]
    pub connection: RemoteArgs,
}

impl VersionsArgs {
    /// Runs the command.
    pub async fn run(self, _global: &Global, shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        let (spec, connection) = self
            .from
            .resolve(self.remote.as_deref(), self.connection.options())?;
        let replica = ReplicaPath::parse(&spec)?;
        let listed = super::interruptible(shutdown, async {
            let versions = crate::client::versions(&connection, &replica).await?;
            self.print(&versions)
        });
        listed.await
    }

    fn print(&self, versions: &[crate::store::VersionInfo]) -> anyhow::Result<ExitCode> {
        if self.json {
            out(format_args!("{}", serde_json::to_string(&versions)?))?;
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
