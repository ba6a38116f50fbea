//! `sqlferry serve` as a user meets it: a server on a port-0 loopback listener (in this
//! test process, [`TestServer::in_process`], unless the test needs a real process: its
//! log, its memory, signals, kills, start-up flags), and real `sqlferry` client
//! processes, each "machine" with its own XDG directories (config, data, state, cache),
//! so keys, history and kept manifests never leak from one machine to another or into
//! the real home.
//!
//! - `roundtrip`: push and pull of every version selector, `versions`, and a pull into
//!   an existing database that sends only what differs.
//! - `api`: the HTTP API's answers: status codes, JSON bodies, `connection: close`.
//! - `auth`: the key matrix, the secrets file and the sidecar, `--dry-run` masking.
//! - `paths`: replica path rules, on the client and on the server.
//! - `raw`: a raw WebSocket client sending malformed, oversized and out-of-order frames.
//! - `kill`: SIGKILL of a client or of the server half-way through a large push.
//! - `fuzz`: arbitrary frame sequences (proptest) on real sessions change nothing, end,
//!   and leave the server serving.
//! - `concurrent`: two pushers racing for one replica, twenty pullers of one version.
//! - `digest_form`: the chunked digest agreed in OPEN/CONFIG: a push by chunks through
//!   a real server, an older client's digest 1, a flipped stored byte, a race.
//! - `faults`: a full disk (a real tmpfs), a failing store, a panic, bad starts and a
//!   second server on one data directory, each named for what it is; keys listed and
//!   revoked.
//! - `shutdown`: SIGTERM stops an idle server at once, and lets a push in flight end
//!   cleanly.
//! - `limits`: what a hostile client can cost: a WANT past the window, a flood from a
//!   client that does not read, wrong keys in a hurry, more sessions than the cap, a
//!   long REPORT: each bounded, and the server keeps serving.
//! - `timing`: the server's time bounds (no OPEN, the session wait, the shutdown
//!   grace) under `tokio::time::pause`, with the server in the test's own runtime.
//! - `drill`: `serve --drill-every` (a drill result in the API, kept across a restart;
//!   a damaged stored page fails it, logged at ERROR), `GET /metrics` parsed by a real
//!   Prometheus text-format parser, `verify --all-versions` against a server.
//! - `tls`: `serve --tls-cert --tls-key` with a private CA made in the test: wss:// and
//!   https:// work for a client that trusts the CA (`SQLFERRY_CA_FILE`) and fail cleanly
//!   for one that does not, or that speaks plain ws://; bad certificate files.
//! - `sealed`: an encrypted replica through a raw client: CONFIG's `encryption`, no
//!   compression, a pull relaying sealed pages and the seal, `--merge` refused.
//!
//! Every wait is on an event (a line on the server's stdout, a process exit, a file
//! growing), polled with a deadline, never a fixed sleep.

mod api;
mod auth;
mod compress;
mod concurrent;
mod digest_form;
pub(crate) mod drill;
mod faults;
mod fuzz;
pub(crate) mod kill;
mod limits;
mod paths;
pub(crate) mod raw;
mod roundtrip;
mod sealed;
mod shutdown;
mod timing;
mod tls;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rusqlite::types::Value;
use sqlferry::store::VersionInfo;

use crate::util;

/// Exit code: usage (bad replica path, bad version selector).
pub const EXIT_USAGE: i32 = 2;
/// Exit code: network or protocol failure.
pub const EXIT_NETWORK: i32 = 4;
/// Exit code: authentication.
pub const EXIT_AUTH: i32 = 5;
/// Exit code: VERSION_CONFLICT.
pub const EXIT_CONFLICT: i32 = 6;
/// Exit code: the replica or version does not exist.
pub const EXIT_NOT_FOUND: i32 = 8;

/// What the server logs when the grace after a stop signal ran out with sessions still
/// running: a stop that should have been prompt must not print it.
pub const ABORTED_AT_GRACE: &str = "aborting sessions still running";

/// How long a server may take to say it is listening (a debug build on a busy CI).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a server may take to exit after SIGTERM when dropped: sessions in flight
/// get 10 s (`SHUTDOWN_GRACE`), plus a margin.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A `sqlferry serve` process on `127.0.0.1`, with its own data directory. Dropping
/// it sends SIGTERM and waits (SIGKILL if it does not exit in time).
pub struct TestServer {
    child: Option<Child>,
    /// Set when the server runs in this test process instead ([`TestServer::in_process`]).
    local: Option<Local>,
    data: PathBuf,
    log: PathBuf,
    /// The certificate and key it serves TLS with, if any.
    tls: Option<tls::Certs>,
    /// `127.0.0.1:PORT`, kept across restarts so clients' saved keys and history (which
    /// name the server URL) stay valid.
    addr: String,
    /// `ws://127.0.0.1:PORT` (`wss://` with TLS).
    pub url: String,
    /// The admin key printed on first start.
    pub admin_key: String,
    /// `127.0.0.1:PORT` of the metrics listener (`serve --metrics-listen`), if any.
    pub metrics_addr: Option<String>,
    /// A machine of its own, for the admin's look-ups (`versions`).
    admin: Machine,
    /// Arguments added to `sqlferry serve` (kept for restarts).
    extra: Vec<String>,
}

impl TestServer {
    /// Starts a server on a free port with data in `dir/server-data`, and waits until it
    /// says it is listening.
    pub fn start(dir: &Path) -> TestServer {
        TestServer::start_with(dir, None)
    }

    /// Starts a server like [`TestServer::start`], serving TLS with `certs`' certificate
    /// and key; its admin machine trusts `certs`' CA.
    pub fn start_tls(dir: &Path, certs: &tls::Certs) -> TestServer {
        TestServer::start_with(dir, Some(certs.clone()))
    }

    /// A server in this test process (`sqlferry::server::serve` on its own runtime, on
    /// a port-0 loopback listener, data in `dir/server-data`): what the protocol, API,
    /// limits and path tests need, without starting a process. It stops on drop,
    /// through its `Shutdown`, and is waited for. It has no log of its own: tests that
    /// read the server's log, its memory, or send it signals use [`TestServer::start`].
    pub fn in_process(dir: &Path) -> TestServer {
        TestServer::in_process_with(dir, |state| state)
    }

    /// [`TestServer::in_process`] with at most `max_sessions` push and pull sessions
    /// running at once, and others waiting up to `wait` for a slot (`serve
    /// --max-sessions N --session-wait WAIT`).
    pub fn in_process_limited(dir: &Path, max_sessions: usize, wait: Duration) -> TestServer {
        TestServer::in_process_with(dir, |state| state.with_max_sessions(max_sessions, wait))
    }

    fn in_process_with(
        dir: &Path,
        limits: impl FnOnce(sqlferry::server::State) -> sqlferry::server::State,
    ) -> TestServer {
        let data = dir.join("server-data");
        let log = dir.join("server.log");
        let local = Local::start(&data, limits);
        let (addr, admin_key) = (local.addr.clone(), local.admin_key.clone());
        TestServer {
            child: None,
            local: Some(local),
            admin: Machine::new(dir, "server-admin"),
            url: format!("ws://{addr}"),
            data,
            log,
            tls: None,
            addr,
            admin_key,
            metrics_addr: None,
            extra: Vec::new(),
        }
    }

    fn start_with(dir: &Path, tls: Option<tls::Certs>) -> TestServer {
        TestServer::start_with_args(dir, tls, &[])
    }

    fn start_with_args(dir: &Path, tls: Option<tls::Certs>, extra: &[&str]) -> TestServer {
        TestServer::start_with_env(dir, tls, extra, &[])
    }

    /// [`TestServer::start`] with `extra` arguments to `sqlferry serve`, which a
    /// [`TestServer::restart_with`] replaces.
    pub fn start_args(dir: &Path, extra: &[&str]) -> TestServer {
        let mut server = TestServer::start_with_args(dir, None, extra);
        server.extra = extra.iter().map(|s| s.to_string()).collect();
        server
    }

    /// Restarts the server (as [`TestServer::restart`]) with `extra` arguments instead
    /// of the ones it had.
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.restart();
    }

    /// [`TestServer::start`] with environment variables set for the server process
    /// (not kept across [`TestServer::restart`]).
    pub fn start_env(dir: &Path, env: &[(&str, &str)]) -> TestServer {
        TestServer::start_with_env(dir, None, &[], env)
    }

    fn start_with_env(
        dir: &Path,
        tls: Option<tls::Certs>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> TestServer {
        let data = dir.join("server-data");
        let log = dir.join("server.log");
        let (child, addr, key, metrics_addr) =
            spawn(&data, &log, "127.0.0.1:0", tls.as_ref(), extra, env);
        let admin_key =
            key.unwrap_or_else(|| panic!("no admin key on first start; log:\n{}", read(&log)));
        assert!(
            admin_key.starts_with("sfk_") && admin_key.len() == 68,
            "admin key shape: {admin_key}"
        );
        let mut admin = Machine::new(dir, "server-admin");
        if let Some(certs) = &tls {
            admin.trust(certs);
        }
        TestServer {
            child: Some(child),
            local: None,
            admin,
            url: format!("{}://{addr}", if tls.is_some() { "wss" } else { "ws" }),
            data,
            log,
            tls,
            addr,
            admin_key,
            metrics_addr,
            extra: Vec::new(),
        }
    }

    /// One of several servers sharing the data directory `data` and the metadata store
    /// `meta` (`serve --meta URL`), with `extra` arguments: its log in `dir/NAME.log`,
    /// its admin machine `dir/NAME-admin`. The first server on a metadata store prints
    /// the admin key; the others are given it (`admin_key`) and must print none.
    pub fn start_sharing(
        dir: &Path,
        name: &str,
        data: &Path,
        meta: &str,
        admin_key: Option<&str>,
    ) -> TestServer {
        TestServer::start_named(dir, name, data, &["--meta", meta], &[], admin_key)
    }

    /// A server named `name` with data in `data`, `extra` arguments and `env` set
    /// (`env` not kept across restarts): its log in `dir/NAME.log`, its admin machine
    /// `dir/NAME-admin`. It must print an admin key unless one is given (`admin_key`:
    /// a server sharing another's metadata), and then must print none.
    pub fn start_named(
        dir: &Path,
        name: &str,
        data: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
        admin_key: Option<&str>,
    ) -> TestServer {
        let log = dir.join(format!("{name}.log"));
        let (child, addr, key, metrics_addr) = spawn(data, &log, "127.0.0.1:0", None, extra, env);
        let admin_key = match (admin_key, key) {
            (None, Some(key)) => key,
            (Some(given), None) => given.to_owned(),
            (given, printed) => panic!(
                "admin key: given {given:?}, printed {printed:?} (only the first server prints one); log:\n{}",
                read(&log)
            ),
        };
        TestServer {
            child: Some(child),
            local: None,
            admin: Machine::new(dir, &format!("{name}-admin")),
            url: format!("ws://{addr}"),
            data: data.to_owned(),
            log,
            tls: None,
            addr,
            admin_key,
            metrics_addr,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Its data directory (`--data`).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The server process's id (for its memory figures in `/proc`).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the server is running").id()
    }

    /// Everything the server logged on stderr so far (it runs with `-v`).
    pub fn log(&self) -> String {
        assert!(
            self.local.is_none(),
            "an in-process server has no log of its own: use TestServer::start"
        );
        read(&self.log)
    }

    /// The replica's file in the data directory.
    pub fn replica_file(&self, replica: &str) -> PathBuf {
        sqlferry::store::Store::new(&self.data)
            .replica_file(&sqlferry::store::ReplicaPath::parse(replica).expect("valid path"))
    }

    /// Every replica file (`*.sqlferry`) under the data directory's `replicas/`, sorted:
    /// what a failed request must not add to. (SQLite's `-wal` and `-shm` files beside
    /// them come and go with connections.)
    pub fn replica_files(&self) -> Vec<PathBuf> {
        util::files_under(&self.data.join("replicas"))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "sqlferry"))
            .collect()
    }

    /// `sqlferry versions REPLICA --json` with the admin key: `None` when the replica
    /// does not exist (exit 8).
    pub fn versions(&self, replica: &str) -> Option<Vec<VersionInfo>> {
        let out = self.admin.run([
            "versions",
            replica,
            "--json",
            "--server",
            &self.url,
            "--key",
            &self.admin_key,
        ]);
        if util::code(&out) == EXIT_NOT_FOUND {
            return None;
        }
        assert_eq!(
            util::code(&out),
            0,
            "versions {replica}: {}",
            util::stderr(&out)
        );
        Some(serde_json::from_slice(&out.stdout).expect("versions --json prints JSON"))
    }

    /// The version numbers of `replica` (empty when it does not exist).
    pub fn version_numbers(&self, replica: &str) -> Vec<u64> {
        self.versions(replica)
            .unwrap_or_default()
            .iter()
            .map(|v| v.number)
            .collect()
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends `SIG<name>` (TERM, INT) and waits for the exit (at most `timeout`); the
    /// exit status and how long it took. Panics if it does not exit in time (after
    /// killing it).
    pub fn stop(&mut self, name: &str, timeout: Duration) -> (ExitStatus, Duration) {
        let mut child = self.child.take().expect("the server is running");
        let started = Instant::now();
        signal(&child, name);
        match wait_for_exit(&mut child, timeout) {
            Some(status) => (status, started.elapsed()),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the server did not exit within {timeout:?} of SIG{name}; log:\n{}",
                    self.log()
                );
            }
        }
    }

    /// SIGKILL: the server dies at once, wherever it is.
    pub fn sigkill(&mut self) {
        let mut child = self.child.take().expect("the server is running");
        child.kill().expect("SIGKILL the server");
        let status = child.wait().expect("wait for the server");
        assert!(!status.success(), "killed: {status}");
    }

    /// Starts the server again on the same data directory and port (stopping it first
    /// with SIGTERM if it runs). It prints no admin key this time: the first one stays.
    pub fn restart(&mut self) {
        self.restart_env(&[]);
    }

    /// [`TestServer::restart`] with `env` set (a server over S3 needs its `AWS_*`).
    pub fn restart_env(&mut self, env: &[(&str, &str)]) {
        if self.child.is_some() {
            let (status, _) = self.stop("TERM", STOP_TIMEOUT);
            assert!(status.success(), "clean stop before restart: {status}");
        }
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let (child, addr, key, metrics_addr) = spawn(
            &self.data,
            &self.log,
            &self.addr,
            self.tls.as_ref(),
            &extra,
            env,
        );
        assert_eq!(addr, self.addr, "restarted on the same port");
        assert_eq!(key, None, "the admin key is shown only on first start");
        self.child = Some(child);
        self.metrics_addr = metrics_addr;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(local) = self.local.take() {
            local.stop();
        }
        if let Some(mut child) = self.child.take() {
            // A failing test gets the server's side of the story: whether it was still
            // running (a crash looks like "the server closed the session" to clients),
            // and the end of its log.
            if std::thread::panicking() {
                let state = match child.try_wait() {
                    Ok(Some(status)) => format!("had exited: {status}"),
                    Ok(None) => "was still running".to_owned(),
                    Err(e) => format!("could not be asked: {e}"),
                };
                let log = read(&self.log);
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                eprintln!(
                    "the test server {} {state}; the end of its log:\n{}",
                    self.url,
                    tail.join("\n")
                );
            }
            signal(&child, "TERM");
            if wait_for_exit(&mut child, STOP_TIMEOUT).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A server running in this process, on a runtime of its own (so the test's thread
/// may block on client processes while it serves).
struct Local {
    runtime: tokio::runtime::Runtime,
    shutdown: sqlferry::shutdown::Shutdown,
    served: tokio::task::JoinHandle<sqlferry::Result<()>>,
    addr: String,
    admin_key: String,
}

impl Local {
    fn start(
        data: &Path,
        limits: impl FnOnce(sqlferry::server::State) -> sqlferry::server::State,
    ) -> Local {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("server runtime");
        let state = limits(sqlferry::server::State::open(data).expect("open the server state"));
        let admin_key = state
            .auth
            .ensure_admin()
            .expect("admin key")
            .expect("a new data directory gets an admin key");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address").to_string();
        let shutdown = sqlferry::shutdown::Shutdown::new();
        let served = runtime.spawn(sqlferry::server::serve(
            listener,
            state,
            None,
            shutdown.clone(),
        ));
        Local {
            runtime,
            shutdown,
            served,
            addr,
            admin_key,
        }
    }

    /// Stops the server at once (a forced stop) and waits until it has.
    fn stop(self) {
        self.shutdown.force();
        self.runtime
            .block_on(self.served)
            .expect("the server task ends")
            .expect("the server stops cleanly");
    }
}

/// Starts `sqlferry serve` (with TLS when `tls` is given) and reads its stdout until it
/// says where it listens; the child, the address, the admin key if it printed one, and
/// the metrics listener's address if it has one.
fn spawn(
    data: &Path,
    log: &Path,
    listen: &str,
    tls: Option<&tls::Certs>,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Child, String, Option<String>, Option<String>) {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("server log file");
    let home = data.with_file_name("server-home");
    let mut command = Command::new(env!("CARGO_BIN_EXE_sqlferry"));
    command
        .args(["-v", "serve", "--listen", listen, "--data"])
        .arg(data);
    if let Some(certs) = tls {
        command
            .arg("--tls-cert")
            .arg(&certs.cert)
            .arg("--tls-key")
            .arg(&certs.key);
    }
    command.args(extra);
    command.env_remove("SQLFERRY_COMPRESS");
    command.envs(env.iter().copied());
    let mut child = command
        .env_remove("RUST_LOG")
        .env_remove("SQLFERRY_SERVER")
        .env_remove("SQLFERRY_KEY")
        .env_remove("SQLFERRY_CA_FILE")
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_DATA_HOME", home.join("data"))
        .env("XDG_STATE_HOME", home.join("state"))
        .env("XDG_CACHE_HOME", home.join("cache"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .expect("start sqlferry serve");
    // A thread reads stdout so the wait below can have a deadline; it ends at EOF.
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut key = None;
    let mut metrics = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "sqlferry serve never said it was listening ({e}; {status:?}); log:\n{}",
                    read(log)
                );
            }
        };
        if let Some(k) = line.strip_prefix("admin key (shown only this once; keep it secret): ") {
            key = Some(k.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("metrics on http://") {
            metrics = Some(rest.split('/').next().expect("an address").to_owned());
        } else if let Some(rest) = line.strip_prefix("listening on ") {
            let scheme = if tls.is_some() { "wss://" } else { "ws://" };
            let addr = rest
                .strip_prefix(scheme)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or_else(|| panic!("{line}: an address after {scheme}"))
                .to_owned();
            if tls.is_some() {
                assert!(rest.contains(&format!("https://{addr} (TLS; ")), "{line}");
            }
            // `(data in DIR)`, or `(data in DIR; pages and versions in s3://…)`.
            assert!(
                rest.contains(&format!("data in {})", data.display()))
                    || rest.contains(&format!("data in {}; ", data.display())),
                "{line}"
            );
            return (child, addr, key, metrics);
        } else {
            panic!("unexpected line from sqlferry serve: {line}");
        }
    }
}

/// Sends `SIG<name>` to a child with kill(1): no unsafe code, no extra dependency.
pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {}", child.id());
}

/// Waits for `child` to exit, at most `timeout`.
pub fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let mut status = None;
    util::wait_until(timeout, Duration::from_millis(5), || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    status
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// One client machine: a working directory (the commands' current directory) and its
/// own XDG config, data, state and cache directories, all inside the test's TempDir.
pub struct Machine {
    /// Where its databases live, and the current directory of its commands.
    pub work: PathBuf,
    home: PathBuf,
    env: Vec<(String, String)>,
}

impl Machine {
    /// A new machine in `root/name`.
    pub fn new(root: &Path, name: &str) -> Machine {
        let base = root.join(name);
        let work = base.join("work");
        std::fs::create_dir_all(&work).expect("machine work dir");
        Machine {
            work,
            home: base.join("home"),
            env: Vec::new(),
        }
    }

    /// Sets an environment variable for every command of this machine.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.push((name.to_owned(), value.to_owned()));
    }

    /// Makes this machine trust `certs`' CA: `SQLFERRY_CA_FILE` for every command.
    pub fn trust(&mut self, certs: &tls::Certs) {
        let ca = certs.ca.to_str().expect("UTF-8 path");
        self.set_env("SQLFERRY_CA_FILE", ca);
    }

    /// A file in the working directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }

    /// `$XDG_CONFIG_HOME/sqlferry/secrets.json`.
    pub fn secrets_file(&self) -> PathBuf {
        self.home.join("config/sqlferry/secrets.json")
    }

    /// Its `XDG_STATE_HOME` (the history and the sync log under `sqlferry/`).
    pub fn state_home(&self) -> PathBuf {
        self.home.join("state")
    }

    /// Every file under the machine's XDG directories, with its bytes: what a command
    /// that changes nothing must leave as it was. The sync log is left out: it records
    /// every attempt, failures included, by design (`sqlferry status` reads them).
    pub fn state(&self) -> Vec<(PathBuf, Vec<u8>)> {
        util::files_under(&self.home)
            .into_iter()
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("syncs.sqlite"))
            })
            .map(|p| {
                let bytes = std::fs::read(&p).unwrap_or_default();
                (p, bytes)
            })
            .collect()
    }

    /// `sqlferry` on this machine, not yet run.
    pub fn command(&self) -> Command {
        self.command_of(Path::new(env!("CARGO_BIN_EXE_sqlferry")))
    }

    /// `program` run on this machine (its directory, its XDG environment), not yet run.
    pub fn command_of(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.work)
            .env_remove("RUST_LOG")
            .env_remove("SQLFERRY_COMPRESS")
            .env_remove("SQLFERRY_SERVER")
            .env_remove("SQLFERRY_KEY")
            .env_remove("SQLFERRY_CA_FILE")
            .env_remove("SQLFERRY_ENCRYPTION_KEY")
            .env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", self.home.join("config"))
            .env("XDG_DATA_HOME", self.home.join("data"))
            .env("XDG_STATE_HOME", self.home.join("state"))
            .env("XDG_CACHE_HOME", self.home.join("cache"))
            .stdin(Stdio::null());
        for (name, value) in &self.env {
            cmd.env(name, value);
        }
        cmd
    }

    /// Runs `sqlferry ARGS` on this machine and waits for it.
    pub fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command().args(args).output().expect("run sqlferry")
    }

    /// Runs `sqlferry ARGS --server URL` and waits for it.
    pub fn run_on<I, S>(&self, server: &TestServer, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command()
            .args(args)
            .arg("--server")
            .arg(&server.url)
            .output()
            .expect("run sqlferry")
    }

    /// `sqlferry push LOCAL REPLICA --json ARGS…` on `server`, asserted to succeed; its
    /// JSON report.
    pub fn push(&self, server: &TestServer, local: &str, replica: &str, args: &[&str]) -> Report {
        let out = self.run_on(
            server,
            ["push", local, replica, "--json"].iter().chain(args.iter()),
        );
        Report::of(&out, &format!("push {local} {replica} {args:?}"))
    }

    /// `sqlferry pull SPEC [LOCAL] --json ARGS…` on `server`, asserted to succeed; its
    /// JSON report.
    pub fn pull(
        &self,
        server: &TestServer,
        spec: &str,
        local: Option<&str>,
        args: &[&str],
    ) -> Report {
        let out = self.run_on(
            server,
            ["pull", spec]
                .iter()
                .chain(local.iter())
                .chain(["--json"].iter())
                .chain(args.iter()),
        );
        Report::of(&out, &format!("pull {spec} {local:?} {args:?}"))
    }
}

/// What `push --json` or `pull --json` printed.
#[derive(Debug, Clone)]
pub struct Report(pub serde_json::Value);

impl Report {
    /// The report of a command that must have succeeded.
    pub fn of(out: &Output, what: &str) -> Report {
        assert_eq!(
            util::code(out),
            0,
            "{what} failed: {}{}",
            util::stderr(out),
            util::stdout(out)
        );
        let line = util::stdout(out);
        Report(
            serde_json::from_str(line.trim())
                .unwrap_or_else(|e| panic!("{what}: --json prints one JSON object: {e}: {line}")),
        )
    }

    /// A number field.
    pub fn u64(&self, field: &str) -> u64 {
        self.0[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field} in {}", self.0))
    }

    /// The digest field.
    pub fn digest(&self) -> &str {
        self.0["digest"].as_str().expect("a digest")
    }
}

/// Asserts a failure as a user sees it: exit `code`, exactly one stderr line
/// `sqlferry: error: …` containing `phrase`, nothing on stdout. Returns the line.
pub fn assert_fails(out: &Output, code: i32, phrase: &str) -> String {
    let err = util::stderr(out);
    assert_eq!(util::code(out), code, "exit code; stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one error line: {err:?}");
    assert!(err.starts_with("sqlferry: error: "), "{err}");
    assert!(err.contains(phrase), "the error says {phrase:?}: {err}");
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout: {:?}",
        util::stdout(out)
    );
    err.trim_end().to_owned()
}

/// What a user compares to tell two states of a database apart: its digest, its rows,
/// and (to count what a sync should send) its page hashes.
#[derive(Clone)]
pub struct DbState {
    /// `sqlferry verify`'s digest.
    pub digest: String,
    /// Every row of every table.
    pub rows: Vec<(String, Vec<Vec<Value>>)>,
    /// Page hashes in page order.
    pub hashes: Vec<[u8; 32]>,
}

impl DbState {
    /// The state of the database at `path` now.
    pub fn of(path: &Path) -> DbState {
        DbState {
            digest: util::digest(path),
            rows: util::dump(path),
            hashes: util::page_hashes(path),
        }
    }

    /// Asserts that the database at `path` holds exactly this state, the way a user
    /// would check: integrity check ok, same rows, same digest.
    pub fn assert_held_by(&self, path: &Path, what: &str) {
        assert_eq!(util::integrity(path), "ok", "{what}: integrity check");
        assert!(util::dump(path) == self.rows, "{what}: rows differ");
        assert_eq!(util::digest(path), self.digest, "{what}: digest");
    }

    /// How many pages a sync from `self` to `to` must write: those whose hashes differ,
    /// and those past `self`'s end.
    pub fn pages_differing(&self, to: &DbState) -> u64 {
        to.hashes
            .iter()
            .enumerate()
            .filter(|(i, h)| self.hashes.get(*i) != Some(h))
            .count() as u64
    }
}

/// A small database of about `bytes` bytes in `t`, 4096-byte pages, WAL.
pub fn small_db(path: &Path, bytes: u64) {
    let conn = util::create(path, 4096, util::Mode::Wal);
    util::fill(&conn, bytes, 300);
    drop(conn);
    util::checkpoint(path);
}

/// Runs `sql` on the database at `path`.
pub fn exec(path: &Path, sql: &str) {
    util::open(path)
        .execute_batch(sql)
        .unwrap_or_else(|e| panic!("{sql} on {}: {e}", path.display()));
}

/// The value of `name = "…"` in the sidecar file at `path`.
pub fn sidecar_field(path: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read sidecar {}: {e}", path.display()));
    let value = text
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once('=')?;
            (n.trim() == name).then(|| v.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no {name} in the sidecar:\n{text}"));
    serde_json::from_str(&value).expect("sidecar values are JSON strings")
}

/// The PUSH key the secrets file of `machine` keeps for the database at `db`.
pub fn saved_push_key(machine: &Machine, db: &Path) -> String {
    let text = std::fs::read_to_string(machine.secrets_file()).expect("a secrets file");
    let v: serde_json::Value = serde_json::from_str(&text).expect("secrets file is JSON");
    v["databases"][db.to_str().expect("UTF-8 path")]["key"]
        .as_str()
        .unwrap_or_else(|| panic!("no key for {} in {text}", db.display()))
        .to_owned()
}

/// The id part of a key (`sfk_` + 16 hex): what versions record as `key_id`.
pub fn key_id(key: &str) -> &str {
    &key[4..20]
}
