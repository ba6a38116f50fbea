//! `sqlferry verify FILE`: the digest, page size, page count and integrity of a database;
//! `sqlferry verify REMOTE --all-versions`: every stored version of a replica, one line
//! each and a summary (a bar on a terminal while it runs).

use std::process::ExitCode;

use super::encryption::{GivenKey, keyring, name_key};
use super::{Global, Place, RemoteArgs, exit, expand_tilde, out};
use crate::client::ReplicaSource;
use crate::crypt::Keys;
use crate::shutdown::Shutdown;

/// Arguments of `sqlferry verify`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry verify backup.db                   digest, page size, page count, integrity\n  \
sqlferry verify backup.db --json            the same as one JSON object\n  \
sqlferry verify -q backup.db && echo ok     only the exit status\n  \
sqlferry verify acme/app.db@3               a stored version, fetched whole and checked\n  \
sqlferry verify acme/app.db --all-versions  every stored version, one line each\n  \
sqlferry verify --replica backups/app.db@3  a stored version, though ./backups/ exists\n  \
sqlferry verify acme/app.db --encryption-key-file app.key\n                                              \
                                            an encrypted replica's latest version, opened\n\n\
FILE is a local file when it starts with /, ./, ../ or ~/, exists, or is a bare name \
(backup.db); a stored version when it has a / and its directory does not exist here. One \
such as backups/app.db while the directory backups/ exists here could be either: it is \
refused (exit 2); write ./backups/app.db for the file or --replica backups/app.db for the \
replica.\n\n\
Exit status is 0 when the integrity check says ok, 7 when it does not (or SQLite finds the \
file damaged, or FILE is not a valid SQLite database: a verification that failed), 3 when \
FILE is missing or cannot be read.\n\n\
Two databases with the same digest hold the same pages, byte for byte, whatever their \
journal mode. The digest is the one `push --json` prints and a replica is checked against. \
Each has two forms: digest 1 (64 hex digits) over every page hash, and the chunked digest \
(`c:` and 64 hex digits, the `chunked:` line, `digest2` in JSON) over the hashes of chunks \
of 1,024 page hashes; two digests are compared only in the same form.\n\n\
A stored version (namespace/name[@N|@latest|@latest-N|@TIME]) is fetched whole into a temporary \
file, every page hashed again, and the result compared with the digest the store recorded \
for it, in each form it recorded; the temporary file is deleted.\n\n\
A version of an encrypted replica is opened with its key, as `pull` opens it \
(--encryption-key-file FILE, SQLFERRY_ENCRYPTION_KEY or --passphrase-file FILE; more than \
once for a rekeyed replica): every page's seal is checked, the plaintext goes to a \
temporary directory only you may enter, its pages are hashed again and compared with the \
plaintext digest the version's seal records, and it is deleted. Without its key, or with \
a wrong one, verify exits 5 before anything is fetched.\n\n\
--all-versions checks every version of REMOTE (namespace/name, no @) that way, oldest first, \
through one temporary file (only the pages that changed from one version to the next travel; \
every page is still checked against its hash). A version that fails does not stop the others: \
each gets a line (`version 3  ok  <digest>` or `version 4  FAILED  <why>`), then a summary; \
the exit status is 7 when any version failed. --json prints one object: {\"replica\", \
\"versions\": [{\"version\", \"ok\", \"digest\", \"integrity\", \"error\"}], \"checked\", \
\"failed\"}.")]
pub struct VerifyArgs {
    /// The database file (read-only; a live database is fine), or a stored version:
    /// namespace/name[@N|@latest|@latest-N|@TIME].
    #[arg(required_unless_present_any = ["from", "replica"])]
    pub file: Option<String>,
    /// A stored version, namespace/name[@VERSION], whatever exists on this machine: for a
    /// name such as backups/app.db while a directory backups/ exists here. FILE is then
    /// left out.
    #[arg(long, value_name = "NAMESPACE/NAME", conflicts_with_all = ["file", "from"])]
    pub replica: Option<String>,
    /// FILE, or the stored version `--from` names (set by `run`).
    #[arg(skip)]
    target: String,
    /// The replica of a sidecar (a stored version; FILE is then left out, or @N).
    #[command(flatten)]
    pub from: super::FromArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Verify every stored version of the replica FILE names (namespace/name).
    #[arg(long)]
    pub all_versions: bool,
    /// The server and the key, for a stored version.
    #[command(flatten)]
    pub connection: RemoteArgs,
    /// The encryption key, for a stored version of an encrypted replica.
    #[command(flatten)]
    pub encryption: super::encryption::EncryptionArgs,
}

impl VerifyArgs {
    /// Runs the command.
    pub async fn run(mut self, global: &Global, shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        if self.from.from.is_some() {
            let (spec, connection) = self
                .from
                .resolve(self.file.as_deref(), self.connection.options())?;
            self.target = spec;
            self.connection.server = connection.server;
            self.connection.key = connection.key;
        } else if let Some(replica) = &self.replica {
            self.target = replica.clone();
        } else {
            self.target = self.file.clone().unwrap_or_default();
        }
        super::interruptible(shutdown, self.verify(global)).await
    }

    /// Whether the target is a stored version: named by --replica or --from, or by
    /// FILE under [`Place`]'s rule (a bare name is a file; an ambiguous name is refused).
    fn stored(&self) -> crate::Result<bool> {
        if self.replica.is_some() || self.from.from.is_some() {
            // Named as a replica: a bad path is its error, not a file's.
            crate::store::Selector::split(&self.target)?;
            return Ok(true);
        }
        match Place::of(&self.target) {
            Place::Local(_) | Place::BareName(_) => Ok(false),
            Place::Replica(_) => Ok(true),
            refused @ Place::Ambiguous(_) => {
                Err(refused.refusal().expect("an ambiguous name is refused"))
            }
        }
    }

    /// The encryption keys given (key files, `SQLFERRY_ENCRYPTION_KEY`, passphrases
    /// stretched with the salt the replica keeps), and how they were given, for
    /// messages.
    async fn keys(&self, global: &Global) -> anyhow::Result<(Option<Keys>, Vec<GivenKey>)> {
        let quiet = global.quiet || self.json;
        let given = self.encryption.keys(quiet)?;
        let pass = self.encryption.passphrases(quiet)?;
        if pass.is_empty() {
            return Ok((keyring(&given), given));
        }
        let replica = crate::store::Selector::split(&self.target)?.0;
        let source = ReplicaSource::resolve(&self.connection.options(), replica).await?;
        let all = super::encryption::with_passphrases(
            &given,
            &pass,
            &source.server,
            &source.replica,
            source.key.as_deref(),
            false,
        )
        .await
        .map_err(|e| name_key(e, &given))?;
        Ok((keyring(&all), all))
    }

    async fn verify(&self, global: &Global) -> anyhow::Result<ExitCode> {
        let keyed = !self.encryption.encryption_key_file.is_empty()
            || !self.encryption.passphrase_file.is_empty();
        if keyed && !self.stored()? {
            return Err(crate::Error::Usage(format!(
                "an encryption key opens a stored version of an encrypted replica; {} is a \
                 local file, verified as it is (leave the key out)",
                self.target
            ))
            .into());
        }
        if self.all_versions {
            return self.verify_all(global).await;
        }
        let path = expand_tilde(&self.target);
        let stored = match self.stored()? {
            false => None,
            true => {
                let (keys, given) = self.keys(global).await?;
                crate::client::verify_stored(
                    &self.connection.options(),
                    &self.target,
                    keys.as_ref(),
                )
                .await
                .map_err(|e| name_key(e.into(), &given))?
            }
        };
        let report = match stored {
            Some(report) => report,
            None => crate::client::verify_file(&path).await?,
        };
        let ok = report.is_ok();
        if self.json {
            out(format_args!("{}", serde_json::to_string(&report)?))?;
        } else if !global.quiet || !ok {
            match (&report.replica, report.version) {
                (Some(r), Some(v)) => out(format_args!("version:      {r}@{v}"))?,
                _ => out(format_args!("file:         {}", report.file.display()))?,
            }
            out(format_args!("digest:       {}", report.digest))?;
            out(format_args!("chunked:      {}", report.digest2))?;
            out(format_args!("page size:    {}", report.page_size))?;
            out(format_args!("page count:   {}", report.page_count))?;
            out(format_args!(
                "journal mode: {}",
                serde_json::to_value(report.journal_mode)?
                    .as_str()
                    .unwrap_or("?")
            ))?;
            out(format_args!(
                "integrity:    {}",
                report.integrity.join("\n              ")
            ))?;
        }
        Ok(ExitCode::from(if ok { exit::OK } else { exit::VERIFY }))
    }
}

impl VerifyArgs {
    /// `--all-versions`: every version, a line each as it is checked, then a summary.
    async fn verify_all(&self, global: &Global) -> anyhow::Result<ExitCode> {
        use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
        use std::io::IsTerminal as _;

        if !self.stored()? && matches!(Place::of(&self.target), Place::Local(_)) {
            return Err(crate::Error::Usage(format!(
                "--all-versions checks a stored replica (namespace/name); {} is a local file",
                self.target
            ))
            .into());
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
        if !global.quiet && std::io::stderr().is_terminal() {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("verifying [{bar:30}] {pos}/{len} versions {msg}")
                    .expect("the template is valid")
                    .progress_chars("=> "),
            );
        }
        let (json, quiet) = (self.json, global.quiet);
        let mut printed: anyhow::Result<()> = Ok(());
        let (keys, given) = self.keys(global).await?;
        let checks = crate::client::verify_all_versions(
            &self.connection.options(),
            &self.target,
            keys.as_ref(),
            |done, total, check| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                if json || (quiet && check.ok) || printed.is_err() {
                    return;
                }
                let line = match (&check.digest, &check.error) {
                    (_, Some(e)) => format!("version {}  FAILED  {e}", check.version),
                    (Some(d), None) => format!("version {}  ok  {d}", check.version),
                    (None, None) => format!("version {}  ok", check.version),
                };
                printed = bar.suspend(|| out(format_args!("{line}")));
            },
        )
        .await;
        bar.finish_and_clear();
        let checks = checks.map_err(|e| name_key(e.into(), &given))?;
        printed?;
        let failed = checks.iter().filter(|c| !c.ok).count();
        if json {
            let body = serde_json::json!({
                "replica": self.target,
                "versions": checks,
                "checked": checks.len(),
                "failed": failed,
            });
            out(format_args!("{body}"))?;
        } else if !quiet || failed > 0 {
            // The first few: every one had its own line above.
            let mut first_bad: Vec<String> = checks
                .iter()
                .filter(|c| !c.ok)
                .take(10)
                .map(|c| c.version.to_string())
                .collect();
            if failed > first_bad.len() {
                first_bad.push("…".into());
            }
            if failed == 0 {
                out(format_args!(
                    "{}: all {} versions ok",
                    self.target,
                    checks.len()
                ))?;
            } else {
                out(format_args!(
                    "{}: {failed} of {} versions FAILED (versions {})",
                    self.target,
                    checks.len(),
                    first_bad.join(", ")
                ))?;
            }
        }
        Ok(ExitCode::from(if failed == 0 {
            exit::OK
        } else {
            exit::VERIFY
        }))
    }
}
