//! A real PostgreSQL for the tests of `serve --meta`: `initdb` into a temporary
//! directory, `pg_ctl start` on 127.0.0.1 at a free port (and a Unix socket in that
//! directory), one cluster shared by every test of a run ([`shared`]), one database per
//! test ([`Postgres::database`]: `CREATE DATABASE`). A test that stops PostgreSQL on
//! purpose starts a cluster of its own ([`Postgres::start`]), so the others never see
//! the outage.
//!
//! - Binaries: `initdb`, `pg_ctl` and `psql` from PATH, else the newest
//!   `/usr/lib/postgresql/*/bin` (Debian's layout). None found: the test fails, saying
//!   what to install (`apt-get install -y postgresql-15`, or Debian's `postgresql`);
//!   it never skips.
//! - Root: `initdb` refuses to run as root, and so does the server. When the tests run
//!   as root (as CI here does), the cluster's directory is given to the `postgres`
//!   user the package created, and `initdb` and `pg_ctl` run as that user through
//!   `runuser -u postgres --`; the tests connect over TCP with trust authentication
//!   for the `postgres` role (a throwaway cluster on 127.0.0.1 only).
//! - Stopping: a watcher process (`sh`, in a process group of its own) reads a pipe
//!   whose other end only this test process holds; when the process ends, however it
//!   ends, the pipe closes, and the watcher runs `pg_ctl stop -m immediate` and
//!   removes the directory. No polling, nothing left running after the run.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// A PostgreSQL cluster started for the tests.
pub struct Postgres {
    /// The temporary directory: the data directory `data/`, the socket, the log.
    dir: PathBuf,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    bin: PathBuf,
    /// Whether commands run as the `postgres` user (the tests run as root).
    as_postgres: bool,
    /// The watcher and the end of its pipe that keeps it waiting.
    watcher: Option<(Child, ChildStdin)>,
}

impl Drop for Postgres {
    // The shared cluster is never dropped (a static): its watcher acts at exit.
    fn drop(&mut self) {
        if let Some((mut child, stdin)) = self.watcher.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }
}

/// What to install when PostgreSQL is missing.
const INSTALL_HINT: &str = "PostgreSQL 15 is needed for the `serve --meta` tests: \
    install it (`apt-get install -y postgresql-15`, or Debian's `postgresql`), which \
    puts initdb and pg_ctl in /usr/lib/postgresql/15/bin; .ci/run does this when \
    initdb is missing";

/// The cluster every test of this run shares.
pub fn shared() -> &'static Postgres {
    static SHARED: OnceLock<Postgres> = OnceLock::new();
    SHARED.get_or_init(Postgres::start)
}

/// The directory holding `initdb`, `pg_ctl` and `psql`.
fn bin_dir() -> PathBuf {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                // A link (Debian's /usr/local/bin/initdb style) leads to the directory
                // that also holds psql.
                return std::fs::canonicalize(dir.join("initdb"))
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                    .unwrap_or(dir);
            }
        }
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!("no initdb on PATH nor in /usr/lib/postgresql/*/bin. {INSTALL_HINT}")
    })
}

/// Whether this process runs as root: the owner of a file it just made.
fn running_as_root(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(dir).expect("the cluster directory").uid() == 0
}

/// A port on 127.0.0.1 free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

impl Postgres {
    /// Initialises and starts a cluster of its own; stopped and removed when this
    /// process ends (or when dropped).
    pub fn start() -> Postgres {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("sqlferry-pg-")
            .tempdir()
            .expect("a temporary directory for PostgreSQL")
            .keep();
        let as_postgres = running_as_root(&dir);
        if as_postgres {
            let out = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .output()
                .expect("run chown");
            assert!(
                out.status.success(),
                "running as root, the cluster must belong to the `postgres` user (made by the PostgreSQL package): {}. {INSTALL_HINT}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let data = dir.join("data");
        // The watcher first: whatever fails below, the directory goes at exit.
        let watcher = watcher(&bin, &dir, &data, as_postgres);
        let pg = |program: &str| -> Command {
            let mut cmd = if as_postgres {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(bin.join(program));
                c
            } else {
                Command::new(bin.join(program))
            };
            // Its own process group: a Ctrl-C in the terminal running the tests
            // reaches the watcher's stop, not PostgreSQL in the middle of it.
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
            cmd.stdin(Stdio::null());
            cmd
        };
        let out = pg("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let postgres = Postgres {
            dir,
            port,
            bin,
            as_postgres,
            watcher: Some(watcher),
        };
        postgres.start_again();
        postgres
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join(program));
            c
        } else {
            Command::new(self.bin.join(program))
        };
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// `pg_ctl start` on the cluster's port, waiting until it accepts connections.
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -h 127.0.0.1 -k {} -c fsync=off -c max_connections=400 -c shared_buffers=16MB",
            self.port,
            self.dir.display()
        );
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-w", "-t", "60", "-o", &options, "-l"])
            .arg(self.dir.join("log"))
            .arg("start")
            .stdout(Stdio::null())
            .output()
            .expect("run pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}; log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        );
    }

    /// `pg_ctl stop -m fast`: connections are closed at once, the cluster stops.
    pub fn stop(&self) {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-w", "-m", "fast", "stop"])
            .output()
            .expect("run pg_ctl stop");
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A new, empty database of its own for one test; its connection URL.
    pub fn database(&self) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// The connection URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// A psql session on database `db` that reads SQL from its stdin and writes
    /// results (unaligned, tuples only) to its stdout, both piped: a session of the
    /// test's own that stays open (holding a lock, say) until its stdin is closed.
    pub fn session(&self, db: &str) -> std::process::Child {
        Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-h", "127.0.0.1", "-U", "postgres"])
            .args(["-p", &self.port.to_string(), "-d", db])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run psql")
    }

    /// `pg_dump` of database `db`: every row of every table, as SQL text.
    pub fn dump(&self, db: &str) -> Vec<u8> {
        let out = Command::new(self.bin.join("pg_dump"))
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-p",
                &self.port.to_string(),
                db,
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run pg_dump");
        assert!(
            out.status.success(),
            "pg_dump {db}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Runs `sql` in database `db` with psql; its output (unaligned, tuples only).
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
            ])
            .args(["-p", &self.port.to_string(), "-d", db, "-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// The process that stops the cluster in `dir` and removes `dir` once this test
/// process is gone (its pipe closes).
fn watcher(bin: &Path, dir: &Path, data: &Path, as_postgres: bool) -> (Child, ChildStdin) {
    let pg_ctl = bin.join("pg_ctl");
    let stop = if as_postgres {
        format!("runuser -u postgres -- '{}'", pg_ctl.display())
    } else {
        format!("'{}'", pg_ctl.display())
    };
    let script = format!(
        "cat >/dev/null; {stop} -D '{}' -m immediate stop >/dev/null 2>&1; rm -rf '{}'",
        data.display(),
        dir.display()
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().expect("start the PostgreSQL watcher");
    let stdin = child.stdin.take().expect("piped stdin");
    (child, stdin)
}
