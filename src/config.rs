//! Where sqlferry keeps its files, following the XDG base directory rules.
//!
//! - config: the settings file and the secrets file (saved PUSH keys, with the id of
//!   the server each is for);
//! - cache: page-hash caches, safe to delete at any time (the next sync recomputes them);
//! - data: the embedded store, when no server is named;
//! - state: the version each local database was last pushed or pulled as.

use std::path::PathBuf;

/// `$XDG_CACHE_HOME/sqlferry`, else `~/.cache/sqlferry`; `None` when neither is set.
pub fn cache_dir() -> Option<PathBuf> {
    xdg_dir("XDG_CACHE_HOME", ".cache")
}

/// `$XDG_DATA_HOME/sqlferry`, else `~/.local/share/sqlferry`: the embedded store.
pub fn data_dir() -> Option<PathBuf> {
    xdg_dir("XDG_DATA_HOME", ".local/share")
}

/// `$XDG_STATE_HOME/sqlferry`, else `~/.local/state/sqlferry`: what each local
/// database was last synced with.
pub fn state_dir() -> Option<PathBuf> {
    xdg_dir("XDG_STATE_HOME", ".local/state")
}

/// Whether a command-line or configuration argument says it is a local path by how it
/// starts: `/`, `./`, `../` or `~/`. The one spelling rule of the command line's
/// LOCAL/REMOTE arguments and the daemon's destinations.
pub fn names_local_path(arg: &str) -> bool {
    ["/", "./", "../", "~/"].iter().any(|p| arg.starts_with(p))
}

/// The name a local database is known by in the secrets file and the sync history:
/// its directory with symbolic links resolved, then its file name (the file itself
/// need not exist yet). The same database reached through a link gets the same name.
pub fn database_key(path: &std::path::Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    match (abs.parent(), abs.file_name()) {
        (Some(dir), Some(name)) => dir
            .canonicalize()
            .map(|d| d.join(name))
            .unwrap_or_else(|_| abs.clone()),
        _ => abs,
    }
}

/// `$var/sqlferry` when `var` is set and not empty, else `$HOME/fallback/sqlferry`,
/// else `None`. Written out rather than taken from `etcetera`'s XDG strategy, which
/// differs in two ways users would notice: it ignores a relative `XDG_*` value, and it
/// needs a home directory (falling back to the password database) even when `XDG_*`
/// is set.
fn xdg_dir(var: &str, fallback: &str) -> Option<PathBuf> {
    let base = match std::env::var_os(var) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME").filter(|h| !h.is_empty())?).join(fallback),
    };
    Some(base.join("sqlferry"))
}

/// `$XDG_CONFIG_HOME/sqlferry`, else `~/.config/sqlferry`: the secrets file.
pub fn config_dir() -> Option<PathBuf> {
    xdg_dir("XDG_CONFIG_HOME", ".config")
}

/// The settings file, `$XDG_CONFIG_HOME/sqlferry/config.toml`. Precedence, lowest
/// first: built-in defaults, this file, `SQLFERRY_*` environment variables, flags.
///
/// ```toml
/// server = "ws://backup.example.com:7878"   # the default --server
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// The default server URL (`ws://…`, `wss://…` or `file:///…`).
    pub server: Option<String>,
}

impl Settings {
    /// Where the settings file lives.
    pub fn path() -> Option<PathBuf> {
        Some(config_dir()?.join("config.toml"))
    }

    /// Reads the settings file; an absent file gives the defaults. A file that does not
    /// parse, or has a setting sqlferry does not know, is an error naming the file.
    pub fn load() -> crate::Result<Settings> {
        let Some(path) = Self::path() else {
            return Ok(Settings::default());
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text)
                .map_err(|e| crate::Error::Usage(format!("{}: {}", path.display(), e.message()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Settings::default()),
            Err(e) => Err(crate::Error::io(&path, e)),
        }
    }
}

/// One database's entry in the secrets file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Secret {
    /// The server URL.
    pub server: String,
    /// The replica path.
    pub replica: String,
    /// The PUSH key for that replica.
    pub key: String,
    /// The server's id, as its CONFIG told it when the key was saved (or at the first
    /// push after that, for entries an older sqlferry wrote). Another URL of the same
    /// server (`ws://localhost:7878` for `ws://127.0.0.1:7878`) finds the key through
    /// it ([`Secrets::key_for_server_id`]). Absent: matched by URL only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_id: Option<String>,
}

/// The secrets file: PUSH keys by database absolute path, so a push from cron needs no
/// flag. JSON, mode 0600, replaced atomically on every change; every change is a
/// read-modify-write under an exclusive lock ([`Secrets::update`]), so concurrent
/// first pushes on one machine never lose one another's keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Secrets {
    /// Keys by absolute database path.
    #[serde(default)]
    pub databases: std::collections::BTreeMap<String, Secret>,
}

impl Secrets {
    /// Where the secrets file lives.
    pub fn path() -> Option<PathBuf> {
        Some(config_dir()?.join("secrets.json"))
    }

    /// Reads the secrets file; an absent file is empty.
    pub fn load() -> crate::Result<Secrets> {
        let Some(path) = Self::path() else {
            return Ok(Secrets::default());
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| crate::Error::NotADatabase {
                path: path.clone(),
                reason: format!("not a valid secrets file: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Secrets::default()),
            Err(e) => Err(crate::Error::io(&path, e)),
        }
    }

    /// Writes the secrets file: a new file with mode 0600, renamed over the old one, so
    /// no reader ever sees it half-written or readable by others. To change what is
    /// saved, use [`Secrets::update`], which also keeps other processes' changes.
    pub fn save(&self) -> crate::Result<PathBuf> {
        let path = Self::path().ok_or_else(|| {
            crate::Error::Usage("no config directory: set HOME or XDG_CONFIG_HOME".into())
        })?;
        let dir = path.parent().expect("the secrets path has a directory");
        write_private(
            dir,
            &path,
            serde_json::to_string_pretty(self)
                .expect("secrets serialise")
                .as_bytes(),
            0o600,
        )?;
        Ok(path)
    }

    /// The lock file that serializes changes of the secrets file: beside it, with
    /// `.lock` appended. It is never removed (removing it would let two processes lock
    /// two different files).
    fn lock_path() -> Option<PathBuf> {
        Some(config_dir()?.join("secrets.json.lock"))
    }

    /// Changes the secrets file: takes an exclusive lock on its lock file (waiting for
    /// other processes doing the same), reads the file, applies `change`, writes it
    /// atomically, and releases the lock. Returns the file's path. Without the lock,
    /// two processes that read it at once each write their own key only, and one key
    /// is lost.
    pub fn update(change: impl FnOnce(&mut Secrets)) -> crate::Result<PathBuf> {
        let lock_path = Self::lock_path().ok_or_else(|| {
            crate::Error::Usage("no config directory: set HOME or XDG_CONFIG_HOME".into())
        })?;
        let dir = lock_path.parent().expect("the lock path has a directory");
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
        let lock = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&lock_path)
                .map_err(|e| crate::Error::io(&lock_path, e))?
        };
        // flock(2): released when `lock` is closed, also if this process dies.
        lock.lock().map_err(|e| crate::Error::io(&lock_path, e))?;
        let mut secrets = Secrets::load()?;
        change(&mut secrets);
        let path = secrets.save();
        drop(lock);
        path
    }

    /// The saved key for `replica` on `server` (its URL as written): the one saved for
    /// `database` if given and matching, else any saved for that replica (a PUSH key
    /// also pulls).
    pub fn key_for(
        &self,
        server: &str,
        replica: &str,
        database: Option<&std::path::Path>,
    ) -> Option<String> {
        self.entry_for(server, replica, database)
            .map(|s| s.key.clone())
    }

    /// The saved entry [`Secrets::key_for`] takes its key from.
    pub fn entry_for(
        &self,
        server: &str,
        replica: &str,
        database: Option<&std::path::Path>,
    ) -> Option<&Secret> {
        self.entry_where(database, |s| s.server == server && s.replica == replica)
    }

    /// The saved entry for `replica` on the server whose id is `server_id`, whatever
    /// URL it was saved under: the one saved for `database` if given and matching,
    /// else any saved for that replica. Entries saved without an id never match.
    pub fn key_for_server_id(
        &self,
        server_id: &str,
        replica: &str,
        database: Option<&std::path::Path>,
    ) -> Option<&Secret> {
        self.entry_where(database, |s| {
            s.server_id.as_deref() == Some(server_id) && s.replica == replica
        })
    }

    /// Whether some entry for `replica` was saved under a URL other than `server` with
    /// the server's id: only then can asking `server` for its id find a key.
    pub fn may_know_by_id(&self, server: &str, replica: &str) -> bool {
        self.databases
            .values()
            .any(|s| s.replica == replica && s.server != server && s.server_id.is_some())
    }

    fn entry_where(
        &self,
        database: Option<&std::path::Path>,
        matches: impl Fn(&Secret) -> bool,
    ) -> Option<&Secret> {
        database
            .and_then(|db| self.for_database(db))
            .filter(|s| matches(s))
            .or_else(|| self.databases.values().find(|s| matches(s)))
    }

    /// The entry for `database` (absolute), if any.
    pub fn for_database(&self, database: &std::path::Path) -> Option<&Secret> {
        self.databases.get(&database.to_string_lossy().into_owned())
    }
}

/// Writes `bytes` to `path` atomically with `mode`: a temporary file in `dir` (created
/// 0600 by tempfile), its mode set, then renamed over `path`.
pub fn write_private(
    dir: &std::path::Path,
    path: &std::path::Path,
    bytes: &[u8],
    mode: u32,
) -> crate::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| crate::Error::io(dir, e))?;
    tmp.write_all(bytes)
        .map_err(|e| crate::Error::io(path, e))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| crate::Error::io(path, e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| crate::Error::io(path, e))?;
    tmp.persist(path)
        .map_err(|e| crate::Error::io(path, e.error))?;
    Ok(())
}

/// The sidecar file beside a database, `<db>-sqlferry`: the server, the replica and a
/// PULL key. It is an executable script whose other lines are `name = "value"`, which
/// makes it a TOML file too (the interpreter line is a comment); running it pulls the
/// replica next to it. The interpreter line ([`Sidecar::interpreter_line`]) runs the
/// `sqlferry` on PATH, else the binary that wrote the file, by its absolute path, so
/// the file works from cron, systemd or `env -i` too. The format is in
/// `docs/server.md` ("The sidecar file").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sidecar {
    /// The server URL.
    pub server: String,
    /// The replica path.
    pub replica: String,
    /// The PULL key.
    pub key: String,
}

/// The suffix that makes a database path into its sidecar's path.
pub const SIDECAR_SUFFIX: &str = "-sqlferry";

impl Sidecar {
    /// The sidecar path of `database`.
    pub fn path_for(database: &std::path::Path) -> PathBuf {
        let mut p = database.as_os_str().to_owned();
        p.push(SIDECAR_SUFFIX);
        PathBuf::from(p)
    }

    /// The database a sidecar belongs to: its path without the suffix.
    pub fn database_for(sidecar: &std::path::Path) -> Option<PathBuf> {
        let s = sidecar.to_str()?;
        s.strip_suffix(SIDECAR_SUFFIX)
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
    }

    /// The file's text, its interpreter line naming this process's binary as the
    /// fallback ([`Sidecar::render_with`]).
    pub fn render(&self) -> String {
        self.render_with(std::env::current_exe().ok().as_deref())
    }

    /// The file's text, with `program` (the absolute path of a `sqlferry` binary) as
    /// the fallback when no `sqlferry` is on PATH.
    pub fn render_with(&self, program: Option<&std::path::Path>) -> String {
        let q = |s: &str| serde_json::to_string(s).expect("strings serialise");
        format!(
            "{}\n\
             # sqlferry sidecar: run this file to pull the replica into the database beside it,\n\
             # or run it with --subscribe to follow every new version. It holds a PULL key only.\n\
             server = {}\nreplica = {}\nkey = {}\n",
            Self::interpreter_line(program),
            q(&self.server),
            q(&self.replica),
            q(&self.key)
        )
    }

    /// The `#!` line of a sidecar. With `program` (an absolute path whose file name is
    /// `sqlferry`) it runs, through `sh`, the `sqlferry` on PATH if there is one, else
    /// `program`:
    ///
    /// ```text
    /// #!/usr/bin/env -S sh -c 'p=$(command -v sqlferry) || p=\'/opt/sqlferry/bin/sqlferry\'; exec "$p" pull --from "$0" "$@"'
    /// ```
    ///
    /// `env -S` splits the rest of the line into `sh`, `-c` and the script (in its
    /// single quotes only `\\` and `\'` are escapes); the kernel appends the sidecar's
    /// path (`$0` of the script) and the arguments it was run with. Without a usable
    /// `program` (none, not named `sqlferry`, not UTF-8, holding a control character, or
    /// too long for the kernel's 256-byte limit on this line) the line is the plain
    /// `#!/usr/bin/env -S sqlferry pull --from`, which needs `sqlferry` on PATH.
    pub fn interpreter_line(program: Option<&std::path::Path>) -> String {
        const PLAIN: &str = "#!/usr/bin/env -S sqlferry pull --from";
        // Linux reads at most 256 bytes of a script's first line (BINPRM_BUF_SIZE).
        const SHEBANG_MAX_BYTES: usize = 255;
        let Some(path) = program
            .filter(|p| p.is_absolute() && p.file_name().is_some_and(|n| n == "sqlferry"))
            .and_then(|p| p.to_str())
            .filter(|p| !p.chars().any(char::is_control))
        else {
            return PLAIN.to_owned();
        };
        let quoted = format!("'{}'", path.replace('\'', r"'\''"));
        let script =
            format!(r#"p=$(command -v sqlferry) || p={quoted}; exec "$p" pull --from "$0" "$@""#);
        let escaped = script.replace('\\', r"\\").replace('\'', r"\'");
        let line = format!("#!/usr/bin/env -S sh -c '{escaped}'");
        if line.len() > SHEBANG_MAX_BYTES {
            return PLAIN.to_owned();
        }
        line
    }

    /// Parses a sidecar's text. The file is TOML: the interpreter line is a comment,
    /// and the JSON-quoted strings [`Sidecar::render`] writes are TOML basic strings.
    /// The three settings are required and nothing else is allowed.
    pub fn parse(text: &str) -> std::result::Result<Sidecar, String> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            server: String,
            replica: String,
            key: String,
        }
        let file: File = toml::from_str(text).map_err(|e| {
            let message = e.message().trim_end();
            match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}: {message}")
                }
                None => message.to_owned(),
            }
        })?;
        Ok(Sidecar {
            server: file.server,
            replica: file.replica,
            key: file.key,
        })
    }

    /// Reads the sidecar at `path`.
    pub fn load(path: &std::path::Path) -> crate::Result<Sidecar> {
        let text = std::fs::read_to_string(path).map_err(|e| crate::Error::io(path, e))?;
        Sidecar::parse(&text).map_err(|reason| crate::Error::NotADatabase {
            path: path.to_owned(),
            reason: format!("not a sqlferry sidecar: {reason}"),
        })
    }

    /// Writes the sidecar beside `database`: executable by its owner only (it holds a
    /// key), replaced atomically.
    pub fn save(&self, database: &std::path::Path) -> crate::Result<PathBuf> {
        let path = Self::path_for(database);
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        write_private(&dir, &path, self.render().as_bytes(), 0o700)?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_strictly() {
        let s: Settings = toml::from_str("server = \"ws://h:1\"").expect("valid");
        assert_eq!(s.server.as_deref(), Some("ws://h:1"));
        assert_eq!(
            toml::from_str::<Settings>("").expect("empty is fine"),
            Settings::default()
        );
        assert!(
            toml::from_str::<Settings>("sever = \"x\"").is_err(),
            "typos are refused"
        );
    }

    #[test]
    fn saved_keys_are_found_by_url_then_by_server_id() {
        // A secrets file an older sqlferry wrote: no server ids. It still loads, and
        // matches by URL only.
        let old = r#"{"databases": {
            "/w/app.db": {"server": "ws://127.0.0.1:7878", "replica": "acme/app.db", "key": "sfk_app"},
            "/w/other.db": {"server": "ws://10.0.0.2:7878", "replica": "acme/other.db", "key": "sfk_other"}
        }}"#;
        let mut secrets: Secrets = serde_json::from_str(old).expect("an old file loads");
        let app = std::path::Path::new("/w/app.db");
        assert_eq!(
            secrets.key_for("ws://127.0.0.1:7878", "acme/app.db", Some(app)),
            Some("sfk_app".into())
        );
        assert_eq!(
            secrets.key_for("ws://localhost:7878", "acme/app.db", Some(app)),
            None
        );
        assert!(
            !secrets.may_know_by_id("ws://localhost:7878", "acme/app.db"),
            "no id saved: nothing to ask the server for"
        );
        assert_eq!(
            secrets.key_for_server_id("s1", "acme/app.db", Some(app)),
            None
        );
        // The first push that learns the id writes it in; the file keeps every other
        // field, and a file without ids serialises as it was (no `server-id: null`).
        assert!(
            !serde_json::to_string(&secrets)
                .unwrap()
                .contains("server-id")
        );
        secrets
            .databases
            .get_mut("/w/app.db")
            .expect("the entry")
            .server_id = Some("s1".into());
        let text = serde_json::to_string_pretty(&secrets).expect("serialise");
        assert!(text.contains(r#""server-id": "s1""#), "{text}");
        let secrets: Secrets = serde_json::from_str(&text).expect("round trip");
        assert!(secrets.may_know_by_id("ws://localhost:7878", "acme/app.db"));
        assert!(!secrets.may_know_by_id("ws://127.0.0.1:7878", "acme/app.db"));
        assert!(!secrets.may_know_by_id("ws://localhost:7878", "acme/other.db"));
        let found = secrets
            .key_for_server_id("s1", "acme/app.db", Some(app))
            .expect("found by id");
        assert_eq!(
            (found.key.as_str(), found.server.as_str()),
            ("sfk_app", "ws://127.0.0.1:7878")
        );
        // Found by id from another database too (a PUSH key also pulls), but never
        // for another server's id or another replica.
        assert!(
            secrets
                .key_for_server_id("s1", "acme/app.db", None)
                .is_some()
        );
        assert!(
            secrets
                .key_for_server_id("s2", "acme/app.db", Some(app))
                .is_none()
        );
        assert!(
            secrets
                .key_for_server_id("s1", "acme/other.db", None)
                .is_none()
        );
        // Unknown fields are still refused: a typo is not silently dropped.
        assert!(
            serde_json::from_str::<Secrets>(
                r#"{"databases": {"/a": {"server": "s", "replica": "r", "key": "k", "sever-id": "x"}}}"#
            )
            .is_err()
        );
    }

    #[test]
    fn a_sidecar_names_the_binary_that_wrote_it_as_its_fallback() {
        let s = Sidecar {
            server: "ws://127.0.0.1:7878".into(),
            replica: "acme/app.db".into(),
            key: "sfk_x".into(),
        };
        let text = s.render_with(Some(std::path::Path::new("/opt/sf/bin/sqlferry")));
        assert_eq!(
            text.lines().next(),
            Some(
                r#"#!/usr/bin/env -S sh -c 'p=$(command -v sqlferry) || p=\'/opt/sf/bin/sqlferry\'; exec "$p" pull --from "$0" "$@"'"#
            )
        );
        assert_eq!(Sidecar::parse(&text), Ok(s.clone()), "still TOML");
        // A quote and a backslash in the path are escaped for env -S, then for sh.
        let odd = s.render_with(Some(std::path::Path::new("/o'p\\t/sqlferry")));
        assert!(
            odd.starts_with(r"#!/usr/bin/env -S sh -c 'p=$(command -v sqlferry) || p=\'/o\'\\\'\'p\\t/sqlferry\';"),
            "{odd}"
        );
        assert_eq!(Sidecar::parse(&odd), Ok(s.clone()));
        // No usable fallback: the plain line, which needs sqlferry on PATH.
        let plain = "#!/usr/bin/env -S sqlferry pull --from";
        for program in [
            "relative/sqlferry",
            "/usr/bin/sqlferry-demo",
            "/a\nb/sqlferry",
            &format!("/{}/sqlferry", "x".repeat(200)),
        ] {
            let text = s.render_with(Some(std::path::Path::new(program)));
            assert_eq!(text.lines().next(), Some(plain), "{program:?}");
        }
        // A sidecar an older sqlferry wrote still loads.
        let old = "#!/usr/bin/env -S sqlferry pull --from\n\
                   # sqlferry sidecar: run this file to pull the replica into the database beside it,\n\
                   # or run it with --subscribe to follow every new version. It holds a PULL key only.\n\
                   server = \"ws://127.0.0.1:7878\"\nreplica = \"acme/app.db\"\nkey = \"sfk_x\"\n";
        assert_eq!(Sidecar::parse(old), Ok(s));
    }

    #[test]
    fn sidecar_round_trips_and_refuses_junk() {
        let s = Sidecar {
            server: "ws://127.0.0.1:7878".into(),
            replica: "acme/app.db".into(),
            key: "sfk_x\"y".into(),
        };
        assert_eq!(Sidecar::parse(&s.render()), Ok(s.clone()));
        assert!(
            s.render_with(None)
                .starts_with("#!/usr/bin/env -S sqlferry pull --from\n")
        );
        assert!(
            Sidecar::parse("server = \"a\"\nreplica = \"b\"").is_err(),
            "no key"
        );
        assert!(Sidecar::parse("color = \"red\"").is_err());
        assert!(Sidecar::parse("server = a").is_err());
        let unknown = "server = \"a\"\nreplica = \"b\"\nkey = \"c\"\ncolor = \"red\"\n";
        let e = Sidecar::parse(unknown).expect_err("an unknown setting");
        assert!(e.starts_with("line 4: ") && e.contains("color"), "{e}");
        // Every character a value may hold comes back as it was written.
        let odd = Sidecar {
            server: "ws://h:1/\\path".into(),
            replica: "a/b c\u{e9}\u{1}\t".into(),
            key: "sfk_'\"".into(),
        };
        assert_eq!(Sidecar::parse(&odd.render()), Ok(odd));
        assert_eq!(
            Sidecar::path_for(std::path::Path::new("/x/app.db")),
            PathBuf::from("/x/app.db-sqlferry")
        );
        assert_eq!(
            Sidecar::database_for(std::path::Path::new("app.db-sqlferry")),
            Some(PathBuf::from("app.db"))
        );
        assert_eq!(Sidecar::database_for(std::path::Path::new("app.db")), None);
    }
}
