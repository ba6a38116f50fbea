//! `sqlferry versions REMOTE`: every version of a replica.

use std::process::ExitCode;

use super::{Global, RemoteArgs, exit, human_bytes, out};
use crate::shutdown::Shutdown;
use crate::store::ReplicaPath;

/// Arguments of `sqlferry versions`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Pull any of them with `sqlferry pull REMOTE@N`.")]
pub struct VersionsArgs {
    /// The replica: namespace/name.
    pub remote: String,
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
        let replica = ReplicaPath::parse(&self.remote)?;
        let connection = self.connection.options();
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
            "{:>7}  {:<20}  {:>10}  message",
            "version", "time (UTC)", "size"
        ))?;
        for v in versions {
            out(format_args!(
                "{:>7}  {:<20}  {:>10}  {}",
                v.number,
                crate::epoch::rfc3339(v.created_at),
                human_bytes(v.size),
                v.message
            ))?;
        }
        Ok(ExitCode::from(exit::OK))
    }
}
