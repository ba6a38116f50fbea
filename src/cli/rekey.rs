//! `sqlferry rekey REMOTE --new-key-file FILE`: the next version of an encrypted replica,
//! under a new key (docs/security.md). The current key comes from
//! `--encryption-key-file` (more than once: the one the latest version names) or
//! `SQLFERRY_ENCRYPTION_KEY`; the workflow is [`crate::client::rekey`].
//!
//! Nothing is removed: the versions before the rekey stay sealed with the old key, and
//! open only with it, for as long as retention keeps them.

use std::process::ExitCode;
use std::sync::Arc;

use super::progress::Bar;
use super::{Global, RemoteArgs, exit, human_bytes, out, store_label};
use crate::client::ReplicaSource;
use crate::engine::Progress;
use crate::shutdown::Shutdown;
use crate::store::ReplicaPath;

/// Arguments of `sqlferry rekey`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry keygen ~/.config/sqlferry/acme-2027.key\n  \
sqlferry rekey acme/app.db --encryption-key-file ~/.config/sqlferry/acme.key \
--new-key-file ~/.config/sqlferry/acme-2027.key\n  \
sqlferry pull acme/app.db@1 old.db --encryption-key-file ~/.config/sqlferry/acme.key \
--encryption-key-file ~/.config/sqlferry/acme-2027.key\n  \
sqlferry rekey acme/app.db --passphrase-file old.pass --new-passphrase-file new.pass\n\n\
A passphrase (--passphrase-file, --new-passphrase-file) is stretched with the salt the \
replica keeps; all its passphrases share that one salt, so a version made with an old \
passphrase still opens with it. A rekey from a key file to a passphrase makes the salt.\n\n\
The latest version is pulled and opened with its key on this machine, sealed again with the \
new key, and pushed as the next version: every page's identity changes with the key, so \
nothing is shared with the old key's pages and the whole database is sent. Pushes after it \
take the new key. A rekey that fails or is stopped leaves the replica as it was.\n\n\
Old versions are not re-sealed and not removed (retention removes them): they stay readable \
with the old key only, as long as they are kept, so keep the old key file while any of them \
matters. Give both key files to pull, diff or versions --changes and each version opens with \
its own key.\n\n\
A lost key is lost data: the server never sees a key, and there is no back door and no \
recovery. A rekey does not bring back a version whose key is lost, and after a key leaked, \
the versions made with it stay readable to whoever has it until retention removes them.")]
pub struct RekeyArgs {
    /// The encrypted replica: namespace/name (its latest version is re-sealed).
    #[arg(value_name = "REMOTE")]
    pub remote: String,
    /// The new key, a file `sqlferry keygen FILE` wrote: the next version and every push
    /// after it are sealed with it.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "new_passphrase_file",
        conflicts_with = "new_passphrase_file"
    )]
    pub new_key_file: Option<String>,
    /// The new key as a passphrase file (one line): stretched with the salt the replica
    /// keeps (all its passphrases share it), or a new one this rekey records when the
    /// replica has none (it was under a key file).
    #[arg(long, value_name = "FILE")]
    pub new_passphrase_file: Option<String>,
    /// The new version's commit message [default: "rekey from key id OLD to NEW"].
    #[arg(short, long, value_name = "TEXT")]
    pub message: Option<String>,
    /// Print one JSON object instead of a line.
    #[arg(long)]
    pub json: bool,
    /// The server and the key.
    #[command(flatten)]
    pub connection: RemoteArgs,
    /// The current key.
    #[command(flatten)]
    pub encryption: super::encryption::EncryptionArgs,
}

impl RekeyArgs {
    /// Runs the command.
    pub async fn run(self, global: &Global, shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        let replica = ReplicaPath::parse(&self.remote)?;
        let quiet = global.quiet || self.json;
        let old = self.encryption.keys(quiet)?;
        let pass = self.encryption.passphrases(quiet)?;
        let new_pass = match &self.new_passphrase_file {
            Some(file) => super::encryption::read_passphrases(std::slice::from_ref(file), quiet)?,
            None => Vec::new(),
        };
        let source = ReplicaSource::resolve(&self.connection.options(), replica).await?;
        let stretched = |pass, making| {
            super::encryption::with_passphrases(
                &[],
                pass,
                &source.server,
                &source.replica,
                source.key.as_deref(),
                making,
            )
        };
        let old = [old, stretched(&pass, false).await?].concat();
        let new = match &self.new_key_file {
            Some(file) => super::encryption::read_given(file, quiet)?,
            None => stretched(&new_pass, true).await?.remove(0),
        };
        let source = source.with_encryption(super::encryption::keyring(&old));
        let work = async {
            let bar: Arc<dyn Progress> = Arc::new(Bar::new(!quiet));
            let done = crate::client::rekey(&source, &new.key, self.message.clone(), bar).await?;
            if self.json {
                let mut v = serde_json::to_value(&done.stats)?;
                v["replica"] = source.replica.as_str().into();
                v["store"] = source.server.url().into();
                v["version"] = done.version.into();
                v["from_version"] = done.from_version.into();
                v["from_encryption_key_id"] = done.from_key.to_string().into();
                v["encryption_key_id"] = done.key.to_string().into();
                out(format_args!("{v}"))?;
            } else if !global.quiet {
                let s = &done.stats;
                out(format_args!(
                    "rekeyed {}@{} from key id {} to {} on {}: version {}, {} pages sent ({}) in {:.2?}",
                    source.replica,
                    done.from_version,
                    done.from_key,
                    done.key,
                    store_label(&source.server),
                    done.version,
                    s.pages_sent,
                    human_bytes(s.bytes_sent),
                    s.duration
                ))?;
            }
            Ok(ExitCode::from(exit::OK))
        };
        let all: Vec<_> = old.iter().chain([&new]).cloned().collect();
        super::interruptible(shutdown, work)
            .await
            .map_err(|e| super::encryption::name_key(e, &all))
    }
}
