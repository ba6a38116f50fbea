//! `sqlferry versions REMOTE`: every version of a replica.

use std::process::ExitCode;

use super::{Global, RemoteArgs, exit, human_bytes, out};
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
    pub fn run(self, _global: &Global) -> anyhow::Result<ExitCode> {
        let replica = ReplicaPath::parse(&self.remote)?;
        let server = self.connection.resolve()?;
        // Any key saved for this replica will do: listing versions needs only pull rights.
        let key = self.connection.key_for(&server, &replica, None);
        let versions = server.versions(&replica, key.as_deref())?;
        if self.json {
            out(format_args!("{}", serde_json::to_string(&versions)?))?;
            return Ok(ExitCode::from(exit::OK));
        }
        out(format_args!(
            "{:>7}  {:<20}  {:>10}  message",
            "version", "time (UTC)", "size"
        ))?;
        for v in &versions {
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
