//! `sqlferry keygen FILE`, and the encryption key `push`, `pull` and their subscribers take
//! (`--encryption-key-file FILE`, else `SQLFERRY_ENCRYPTION_KEY`): end-to-end
//! encryption, docs/security.md.
//!
//! The key never leaves this machine: it seals pages and versions here, and the server
//! (or the embedded store's directory) keeps only what it cannot read. A lost key is
//! lost data, so `keygen` never overwrites a file and says so when it writes one.

use std::process::ExitCode;

use super::{Global, exit, expand_tilde, out};
use crate::crypt::EncryptionKey;
use crate::shutdown::Shutdown;

/// The environment variable holding the key itself (base64), for where a file is
/// awkward (a container's secret); `--encryption-key-file` wins over it.
pub const KEY_ENV: &str = "SQLFERRY_ENCRYPTION_KEY";

/// Arguments of `sqlferry keygen`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry keygen ~/.config/sqlferry/acme.key\n  \
sqlferry push app.db acme/app.db --encryption-key-file ~/.config/sqlferry/acme.key\n  \
sqlferry pull acme/app.db restored.db --encryption-key-file ~/.config/sqlferry/acme.key\n\n\
The key is 32 random bytes in base64, written with mode 0600 to a file that must not exist \
yet: a key is never overwritten (every version made with it would be lost). Keep a copy \
where the database's own backups are not (a password manager, another machine): the server \
never sees the key, keeps only what it cannot read, and nothing can decrypt a version \
without it. There is no back door and no recovery: a lost key is lost data.")]
pub struct KeygenArgs {
    /// Where to write the new key (must not exist).
    #[arg(value_name = "FILE")]
    pub file: String,
}

impl KeygenArgs {
    /// Writes the key and says where it is and what losing it means.
    pub async fn run(self, global: &Global, _shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        let path = expand_tilde(&self.file);
        let written = path.clone();
        let id =
            crate::remote::blocking(move || crate::crypt::write_new_key_file(&written)).await?;
        out(format_args!(
            "wrote a new encryption key to {} (key id {id}, mode 0600)",
            path.display()
        ))?;
        if !global.quiet {
            eprintln!(
                "sqlferry: note: keep a copy of {} where the database's own backups are not. \
                 The server never sees this key and nothing can decrypt a version without it: \
                 if it is lost, the encrypted versions are lost (there is no back door and no \
                 recovery). Use it with push and pull: --encryption-key-file {}",
                path.display(),
                path.display()
            );
        }
        Ok(ExitCode::from(exit::OK))
    }
}

/// The encryption keys of `push`, `pull`, `diff` and `versions --changes`.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Encryption")]
pub struct EncryptionArgs {
    /// The replica's encryption key, a file `sqlferry keygen FILE` wrote (else
    /// SQLFERRY_ENCRYPTION_KEY, the key itself in base64). Pages, commit messages and
    /// digests are sealed on this machine: the server never sees the key or the content.
    /// A replica is encrypted or not from its first version on. Give it more than once
    /// for a replica that was rekeyed: each version is opened with the key whose id it
    /// names, and a push uses the key of the latest version. A lost key is lost data:
    /// there is no back door.
    #[arg(long, value_name = "FILE", action = clap::ArgAction::Append)]
    pub encryption_key_file: Vec<String>,
    /// A file holding the replica's passphrase (one line; its line ending is not part
    /// of it), instead of a key file: stretched with Argon2id (64 MiB, 3 passes) and the
    /// salt the replica keeps in clear, made by the first push with a passphrase. A
    /// passphrase and a key file are different keys. There is no SQLFERRY_PASSPHRASE and
    /// no passphrase on the command line: both are readable by other processes. May be
    /// given more than once, like --encryption-key-file. A lost passphrase is lost data.
    #[arg(long, value_name = "FILE", action = clap::ArgAction::Append)]
    pub passphrase_file: Vec<String>,
}

/// A passphrase as read from its file, and where it came from (for messages; `Debug`
/// never shows the passphrase). Stretched into a key ([`stretch`]) once the replica's
/// salt is known.
#[derive(Clone)]
pub struct GivenPassphrase {
    passphrase: Vec<u8>,
    /// `--passphrase-file PATH`.
    pub source: String,
}

impl std::fmt::Debug for GivenPassphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GivenPassphrase")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// The passphrases in the files `files` name (`~` expanded), read now so that a missing
/// or empty file is refused before anything else; each file that group or others may
/// read is used with a warning (unless `quiet`), as a key file is.
pub fn read_passphrases(files: &[String], quiet: bool) -> anyhow::Result<Vec<GivenPassphrase>> {
    let mut out = Vec::with_capacity(files.len());
    for file in files {
        let path = expand_tilde(file);
        let (passphrase, mode) = crate::crypt::read_passphrase_file(&path)?;
        warn_readable("the passphrase file", &path, mode, quiet);
        out.push(GivenPassphrase {
            passphrase,
            source: format!("--passphrase-file {}", path.display()),
        });
    }
    Ok(out)
}

/// The keys `passphrases` give for `replica` on `server`: its salt and cost asked for
/// first (a server too old to keep them is refused). A replica that keeps none is
/// refused (exit 5: it was not made with a passphrase) unless `making`: a push, or the
/// new key of a rekey, then makes a new random salt at the default cost, which the
/// push records with the replica (docs/security.md, "Keys"). Each stretch takes about
/// a third of a second, on a blocking thread.
pub async fn stretch(
    passphrases: &[GivenPassphrase],
    server: &crate::remote::Server,
    replica: &crate::store::ReplicaPath,
    key: Option<&str>,
    making: bool,
) -> anyhow::Result<Vec<GivenKey>> {
    if passphrases.is_empty() {
        return Ok(Vec::new());
    }
    let salted = match server.passphrase(replica, key, making).await? {
        Some(salted) => salted,
        None if making => crate::crypt::PassphraseSalt::new()?,
        None => {
            return Err(crate::Error::Auth(format!(
                "{replica} keeps no passphrase salt: it was not made with a passphrase (it \
                 is plaintext, under a key file, or has no version); give its key file \
                 (--encryption-key-file); nothing was sent"
            ))
            .into());
        }
    };
    let mut keys = Vec::with_capacity(passphrases.len());
    for given in passphrases {
        let passphrase = given.passphrase.clone();
        let key = crate::remote::blocking(move || salted.derive(&passphrase)).await?;
        keys.push(GivenKey {
            key,
            source: given.source.clone(),
        });
    }
    Ok(keys)
}

/// `keys` and the keys `passphrases` give ([`stretch`]), in that order.
pub async fn with_passphrases(
    keys: &[GivenKey],
    passphrases: &[GivenPassphrase],
    server: &crate::remote::Server,
    replica: &crate::store::ReplicaPath,
    key: Option<&str>,
    making: bool,
) -> anyhow::Result<Vec<GivenKey>> {
    let mut all = keys.to_vec();
    all.extend(stretch(passphrases, server, replica, key, making).await?);
    Ok(all)
}

/// A key as given, and where it came from (for messages; never the key itself).
#[derive(Debug, Clone)]
pub struct GivenKey {
    /// The key.
    pub key: EncryptionKey,
    /// `--encryption-key-file PATH` or `SQLFERRY_ENCRYPTION_KEY`.
    pub source: String,
}

impl EncryptionArgs {
    /// The keys given, in order: the files, else the environment's one key (none:
    /// empty). A file that group or others may read is used with a warning on stderr
    /// (unless `quiet`): refusing it would stop a backup over a permission a `chmod
    /// 600` fixes.
    pub fn keys(&self, quiet: bool) -> anyhow::Result<Vec<GivenKey>> {
        if self.encryption_key_file.is_empty() && !self.passphrase_file.is_empty() {
            return Ok(Vec::new());
        }
        if self.encryption_key_file.is_empty() {
            return Ok(env_key()?
                .map(|key| GivenKey {
                    key,
                    source: KEY_ENV.to_owned(),
                })
                .into_iter()
                .collect());
        }
        let mut keys = Vec::with_capacity(self.encryption_key_file.len());
        for file in &self.encryption_key_file {
            keys.push(read_given(file, quiet)?);
        }
        Ok(keys)
    }

    /// The passphrases given (`--passphrase-file`), read now ([`read_passphrases`]).
    pub fn passphrases(&self, quiet: bool) -> anyhow::Result<Vec<GivenPassphrase>> {
        read_passphrases(&self.passphrase_file, quiet)
    }
}

/// The key in the file `file` names (`~` expanded), warning (unless `quiet`) when group
/// or others may read it.
pub fn read_given(file: &str, quiet: bool) -> anyhow::Result<GivenKey> {
    let path = expand_tilde(file);
    let (key, mode) = crate::crypt::read_key_file(&path)?;
    warn_readable("the encryption key", &path, mode, quiet);
    Ok(GivenKey {
        key,
        source: format!("--encryption-key-file {}", path.display()),
    })
}

/// Warns (unless `quiet`) that `what` at `path` may be read by group or others (its
/// `mode`): used all the same, since refusing would stop a backup over a permission a
/// `chmod 600` fixes.
fn warn_readable(what: &str, path: &std::path::Path, mode: u32, quiet: bool) {
    if mode & 0o077 != 0 && !quiet {
        eprintln!(
            "sqlferry: warning: {what} {} may be read by other users (mode {mode:04o}): \
             whoever reads it reads every version made with it; chmod 600 {}",
            path.display(),
            path.display()
        );
    }
}

/// The keys given, as the library takes them (`None`: none given).
pub fn keyring(given: &[GivenKey]) -> Option<crate::crypt::Keys> {
    crate::crypt::Keys::new(given.iter().map(|g| g.key.clone()).collect())
}

/// The key in `SQLFERRY_ENCRYPTION_KEY`, if it is set (and not empty).
pub fn env_key() -> crate::Result<Option<EncryptionKey>> {
    match std::env::var(KEY_ENV) {
        Ok(text) if !text.trim().is_empty() => {
            crate::crypt::parse_key_text(&text, KEY_ENV).map(Some)
        }
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(crate::Error::Usage(format!(
            "{KEY_ENV} is not a key: it must hold 32 bytes in base64 (sqlferry keygen FILE writes one)"
        ))),
    }
}

/// Whether `SQLFERRY_ENCRYPTION_KEY` is set (not empty): for the daemon, which takes a
/// key per entry of its file and refuses one for all rather than ignore it.
pub fn env_key_set() -> bool {
    std::env::var_os(KEY_ENV).is_some_and(|v| !v.is_empty())
}

/// Names the keys given in an authentication error (a key refused as another
/// replica's, or a replica that is encrypted or not): which keys, from where, with
/// their ids. Other errors pass as they are.
pub fn name_key(e: anyhow::Error, keys: &[GivenKey]) -> anyhow::Error {
    let auth = e
        .chain()
        .find_map(|c| c.downcast_ref::<crate::Error>())
        .is_some_and(|c| c.kind() == crate::ErrorKind::Auth);
    let named = |k: &GivenKey| format!("{} (key id {})", k.source, k.key.id());
    match keys {
        [key] if auth => e.context(format!("with the encryption key from {}", named(key))),
        [_, ..] if auth => e.context(format!(
            "with the encryption keys from {}",
            keys.iter().map(named).collect::<Vec<_>>().join(", ")
        )),
        _ => e,
    }
}
