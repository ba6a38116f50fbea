//! `sqlferry keys list|revoke`: the server's keys, seen and revoked with the admin key.
//!
//! REMOTE is the server (`ws://HOST:PORT`, `wss://HOST:PORT`; or `--server`, the
//! environment, the settings file) or a replica path, which keeps to that replica's
//! keys. Only ids are ever printed (`sfk_<id>…`), never a key: the server does not
//! keep secrets, and this command would not print one if it did.

use std::process::ExitCode;

use super::{Global, RemoteArgs, exit, out};
use crate::protocol::control::KeyInfo;
use crate::shutdown::Shutdown;

/// Arguments of `sqlferry keys`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry keys list --server ws://HOST:7878 --key ADMIN_KEY\n  \
sqlferry keys list acme/app.db --json                     the keys of one replica\n  \
sqlferry keys revoke ws://HOST:7878 1a2b3c4d5e6f7a8b      revoke a key by its id\n\n\
The admin key is needed (SQLFERRY_KEY or --key). A revoked key is refused from then on \
(exit 5); the admin key cannot be revoked.")]
pub struct KeysArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: KeysAction,
}

/// `keys list` or `keys revoke`.
#[derive(Debug, clap::Subcommand)]
pub enum KeysAction {
    /// List the server's keys (not revoked): id, kind, replica, created, last used.
    List(ListArgs),
    /// Revoke a PUSH or PULL key: sessions with it are refused from then on.
    Revoke(RevokeArgs),
}

/// Arguments of `sqlferry keys list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// The server (ws://HOST:PORT) or a replica (namespace/name) whose keys to list.
    pub remote: Option<String>,
    /// Print one JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The server and the admin key.
    #[command(flatten)]
    pub connection: RemoteArgs,
}

/// Arguments of `sqlferry keys revoke`.
#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    /// [REMOTE] KEYID: the server (ws://HOST:PORT) or the replica the key is for
    /// (optional), then the key's id (16 hex digits, as `keys list` and `versions`
    /// show it; `sfk_<id>…` works too).
    #[arg(value_name = "ARG", num_args = 1..=2, required = true)]
    pub args: Vec<String>,
    /// Print the revoked key as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// The server and the admin key.
    #[command(flatten)]
    pub connection: RemoteArgs,
}

impl KeysArgs {
    /// Runs the command.
    pub async fn run(self, _global: &Global, shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        super::interruptible(shutdown, self.action.run()).await
    }
}

impl KeysAction {
    async fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            KeysAction::List(args) => {
                let connection = args.connection.options();
                let keys = crate::client::keys(&connection, args.remote.as_deref()).await?;
                if args.json {
                    out(format_args!("{}", serde_json::to_string(&keys)?))?;
                    return Ok(ExitCode::from(exit::OK));
                }
                out(format_args!(
                    "{:<22}  {:<5}  {:<20}  {:<20}  replica",
                    "key", "kind", "created (UTC)", "last used (UTC)"
                ))?;
                for k in &keys {
                    out(format_args!(
                        "{:<22}  {:<5}  {:<20}  {:<20}  {}",
                        format!("sfk_{}…", k.id),
                        k.kind,
                        time(Some(k.created_at)),
                        time(k.last_used_at),
                        k.replica.as_deref().unwrap_or("(all)")
                    ))?;
                }
                Ok(ExitCode::from(exit::OK))
            }
            KeysAction::Revoke(args) => {
                let (remote, id) = match args.args.as_slice() {
                    [id] => (None, id),
                    [remote, id] => (Some(remote.as_str()), id),
                    _ => unreachable!("clap takes one or two"),
                };
                let id = crate::server::key_id_of(id).ok_or_else(|| {
                    crate::Error::Usage(
                        "KEYID: expected a key id, 16 hex digits (as `sqlferry keys list` shows it)"
                            .into(),
                    )
                })?;
                let connection = args.connection.options();
                let key = crate::client::revoke_key(&connection, remote, &id).await?;
                if args.json {
                    out(format_args!("{}", serde_json::to_string(&key)?))?;
                } else {
                    out(format_args!("{}", revoked_line(&key)))?;
                }
                Ok(ExitCode::from(exit::OK))
            }
        }
    }
}

fn revoked_line(key: &KeyInfo) -> String {
    format!(
        "revoked {} key sfk_{}…{}: sessions with it are refused from now on",
        key.kind.to_uppercase(),
        key.id,
        key.replica
            .as_deref()
            .map(|r| format!(" of {r}"))
            .unwrap_or_default()
    )
}

fn time(at: Option<i64>) -> String {
    match at {
        Some(at) => crate::epoch::rfc3339(at),
        None => "never".into(),
    }
}
