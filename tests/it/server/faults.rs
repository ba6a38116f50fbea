//! Faults named for what they are, and the server's own house.
//!
//! - A full disk under the server (a real tmpfs of a few MB, mounted by the test: CI
//!   runs as root; a test that cannot mount fails, it never skips) is the server's
//!   error: exit 10 on the client, never "refused the key" (5), while the API goes on
//!   answering reads (the replica's files are all there already); a
//!   restart on it says the disk is full; with space again, everything works. A push
//!   subscriber retries through it and pushes once there is room.
//! - A failure in the server's store reaches the client as the server's error, not as
//!   "connection lost", and is logged with the replica and key id, never the key.
//! - `serve` refuses a bad `--listen` (2), a data directory that is a file or cannot be
//!   made (3), a port in use (3), a data directory another server holds (3, naming it
//!   and the PID); a panic is a bug (exit 1), on the main thread or in a task.
//! - Keys are listed and revoked with the admin key, never printed; a revoked key is
//!   refused (5); an admin push to an existing replica mints no keys unless
//!   `--new-keys`; `server.db` is 0600, and tightened at start.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::{
    DbState, EXIT_AUTH, EXIT_USAGE, Machine, TestServer, assert_fails, exec, key_id,
    saved_push_key, sidecar_field, small_db, wait_for_exit,
};
use crate::util::{self, Tmpfs};

/// Exit code: a local file (data directory, port, lock).
const EXIT_LOCAL: i32 = 3;
/// Exit code: the server failed on its own side.
const EXIT_SERVER: i32 = 10;
/// Exit code: a bug.
const EXIT_BUG: i32 = 1;

/// How long a refused `serve` may take to exit.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(20);

/// One HTTP/1.1 GET with the key; the status and the body.
fn http_get(addr: &str, path: &str, key: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {key}\r\n\r\n"
    )
    .expect("send request");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read response");
    let status = response[9..12].parse().expect("status code");
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_owned())
}

/// `sqlferry serve ARGS` run to its (expected, prompt) end: exit code and stderr.
fn serve_refused(machine: &Machine, args: &[&std::ffi::OsStr]) -> (i32, String, String) {
    let mut child = machine
        .command()
        .arg("serve")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sqlferry serve");
    let Some(status) = wait_for_exit(&mut child, REFUSAL_TIMEOUT) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("sqlferry serve {args:?} did not refuse: it was still running");
    };
    let mut err = String::new();
    let mut out = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("stdout");
    (status.code().unwrap_or(-1), err, out)
}

/// Asserts one `sqlferry: error:` line containing every phrase, and the code.
fn assert_one_line(code: i32, err: &str, want: i32, phrases: &[&str]) {
    assert_eq!(code, want, "exit code; stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("sqlferry: error: "), "{err}");
    for p in phrases {
        assert!(err.contains(p), "the error says {p:?}: {err}");
    }
}

#[test]
fn a_full_disk_is_the_servers_error_never_a_refused_key() {
    let dir = TempDir::new().expect("tempdir");
    let data = dir.path().join("server-data");
    // Declared before the server: unmounted after it stops.
    let disk = Tmpfs::mount(&data, "4m");
    let mut server = TestServer::start(dir.path());
    let a = Machine::new(dir.path(), "a");
    let db = a.path("app.db");
    small_db(&db, 256 << 10);
    a.push(
        &server,
        "app.db",
        "acme/app.db",
        &["--key", &server.admin_key],
    );

    // A push larger than the room left fails half-way, in the store: the server's
    // error (10), not a local file of the client's (3).
    small_db(&a.path("big.db"), 6 << 20);
    let out = a.run_on(
        &server,
        ["push", "big.db", "acme/big.db", "--key", &server.admin_key],
    );
    assert_fails(
        &out,
        EXIT_SERVER,
        &format!("the disk holding {} is full", data.display()),
    );
    assert!(
        server.versions("acme/big.db").is_none(),
        "nothing half-done"
    );

    // The next push's writer gives back what the failed one left in the pack (a push
    // that changes nothing is enough); only then is the disk filled, so the push after
    // it cannot live on that room. Its change is larger than what the filler leaves
    // (it writes 16 KiB at a time).
    a.push(&server, "app.db", "acme/app.db", &[]);
    let filler = disk.fill();
    exec(
        &db,
        "INSERT INTO t(k, v) SELECT hex(randomblob(8)), randomblob(2000) FROM t LIMIT 50;",
    );
    let out = a.run_on(&server, ["push", "app.db", "acme/app.db"]);
    assert_fails(
        &out,
        EXIT_SERVER,
        &format!("the disk holding {} is full", data.display()),
    );
    // The API goes on answering reads, and never says the key was refused: a new
    // replica is left with its WAL and -shm (the one read that would need room).
    let (status, body) = http_get(
        server.addr(),
        "/api/replicas/acme/app.db",
        &server.admin_key,
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"latest_version\":1"), "{body}");
    assert!(
        server.log().contains("ERROR"),
        "logged at error level:\n{}",
        server.log()
    );

    // A restart on the full disk says so (exit 3), instead of "disk I/O error".
    let (status, _) = server.stop("TERM", Duration::from_secs(15));
    assert!(status.success(), "{status}");
    let (code, err, _) = serve_refused(
        &a,
        &[
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--data".as_ref(),
            data.as_os_str(),
        ],
    );
    assert_one_line(
        code,
        &err,
        EXIT_LOCAL,
        &[&format!("the disk holding {} is full", data.display())],
    );

    // With room again, the same push goes through, and the rows come back.
    std::fs::remove_file(&filler).expect("free the disk");
    server.restart();
    a.push(&server, "app.db", "acme/app.db", &[]);
    let b = Machine::new(dir.path(), "b");
    b.pull(
        &server,
        "acme/app.db",
        Some("copy.db"),
        &["--key", &server.admin_key],
    );
    DbState::of(&db).assert_held_by(&b.path("copy.db"), "pulled after the disk had room");
}

#[test]
fn a_store_failure_reaches_the_client_as_the_servers_error() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let a = Machine::new(dir.path(), "a");
    small_db(&a.path("app.db"), 64 << 10);
    // Something in the server's own house is broken: where the namespace's directory
    // belongs, there is a file.
    let replicas = dir.path().join("server-data/replicas");
    std::fs::create_dir_all(&replicas).expect("replicas dir");
    std::fs::write(replicas.join("acme"), b"in the way").expect("a file in the way");
    let replica = "acme/app.db";
    let out = a.run_on(
        &server,
        ["push", "app.db", replica, "--key", &server.admin_key],
    );
    let line = assert_fails(&out, EXIT_SERVER, "server error: ");
    assert!(
        line.contains("replicas/acme: File exists"),
        "the server's own words: {line}"
    );
    assert!(!line.contains("connection lost"), "{line}");
    // The client may hear the ERROR before the server has written its log line.
    util::wait_until(Duration::from_secs(10), Duration::from_millis(10), || {
        server.log().contains("session failed on the server's side")
    });
    let log = server.log();
    let logged = log
        .lines()
        .find(|l| l.contains("session failed on the server's side"))
        .unwrap_or_else(|| panic!("the server logs the failure:\n{log}"));
    assert!(logged.contains("ERROR"), "{logged}");
    assert!(logged.contains(replica), "names the replica: {logged}");
    assert!(
        logged.contains(key_id(&server.admin_key)),
        "names the key id: {logged}"
    );
    assert!(!log.contains(&server.admin_key[20..]), "never the key");
}

#[test]
fn serve_refuses_bad_starts_with_documented_codes() {
    let dir = TempDir::new().expect("tempdir");
    let m = Machine::new(dir.path(), "m");
    let data = dir.path().join("data");
    let listen = |l: &str, d: &Path| {
        serve_refused(
            &m,
            &[
                "--listen".as_ref(),
                l.as_ref(),
                "--data".as_ref(),
                d.as_os_str(),
            ],
        )
    };

    let (code, err, _) = listen("nonsense", &data);
    assert_one_line(
        code,
        &err,
        EXIT_USAGE,
        &["--listen nonsense", "127.0.0.1:7878"],
    );
    assert!(!data.exists(), "a bad flag creates nothing");

    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").expect("file");
    let (code, err, _) = listen("127.0.0.1:0", &file);
    assert_one_line(
        code,
        &err,
        EXIT_LOCAL,
        &[&file.display().to_string(), "is a file"],
    );
    let under = file.join("data");
    let (code, err, _) = listen("127.0.0.1:0", &under);
    assert_one_line(
        code,
        &err,
        EXIT_LOCAL,
        &[
            "cannot create the data directory",
            &under.display().to_string(),
        ],
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (code, err, out) = listen(&addr, &data);
    assert_one_line(code, &err, EXIT_LOCAL, &["cannot listen", &addr, "in use"]);
    assert!(
        out.is_empty(),
        "no admin key printed for a server that never ran: {out}"
    );
    assert!(!data.join("server.db").exists(), "no server.db either");
}

#[test]
fn a_second_server_on_one_data_directory_refuses() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::start(dir.path());
    let data = dir.path().join("server-data");
    let pid = std::fs::read_to_string(data.join("serve.lock")).expect("the lock file");
    let m = Machine::new(dir.path(), "m");
    let (code, err, out) = serve_refused(
        &m,
        &[
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--data".as_ref(),
            data.as_os_str(),
        ],
    );
    assert_one_line(
        code,
        &err,
        EXIT_LOCAL,
        &[
            &format!("(PID {})", pid.trim()),
            &data.display().to_string(),
            "another sqlferry serve",
        ],
    );
    assert!(out.is_empty(), "{out}");
    // The first one serves on.
    assert!(server.versions("acme/none.db").is_none());
}

#[test]
fn a_panic_is_a_bug_exit_1() {
    let dir = TempDir::new().expect("tempdir");
    let m = Machine::new(dir.path(), "m");
    small_db(&m.path("app.db"), 64 << 10);
    let out = m
        .command()
        .args(["verify", "app.db"])
        .env("SQLFERRY_DEBUG_PANIC", "main")
        .output()
        .expect("run");
    assert_fails(&out, EXIT_BUG, "a bug in sqlferry, please report it");

    // A task that panicked (the client's engine thread) is a bug too, not a network
    // failure (4).
    let server = TestServer::start(dir.path());
    let out = m
        .command()
        .args(["push", "app.db", "acme/app.db", "--server", &server.url])
        .args(["--key", &server.admin_key])
        .env("SQLFERRY_DEBUG_PANIC", "engine")
        .output()
        .expect("run");
    assert_fails(&out, EXIT_BUG, "a bug in sqlferry, please report it");
}

/// A `sqlferry serve` with an extra environment variable; killed on drop.
struct EnvServer {
    child: Child,
    url: String,
    admin_key: String,
}

impl EnvServer {
    fn start(data: &Path, env: (&str, &str)) -> EnvServer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sqlferry"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .env(env.0, env.1)
            .env("HOME", data.with_file_name("env-server-home"))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sqlferry serve");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let key = lines.next().expect("a line").expect("admin key line");
        let listening = lines.next().expect("a line").expect("listening line");
        let admin_key = key.rsplit(' ').next().expect("the key").to_owned();
        let url = listening
            .split_whitespace()
            .nth(2)
            .expect("the URL")
            .to_owned();
        EnvServer {
            child,
            url,
            admin_key,
        }
    }
}

impl Drop for EnvServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_panic_in_a_server_session_is_the_servers_error() {
    let dir = TempDir::new().expect("tempdir");
    let server = EnvServer::start(&dir.path().join("data"), ("SQLFERRY_DEBUG_PANIC", "engine"));
    let m = Machine::new(dir.path(), "m");
    small_db(&m.path("app.db"), 64 << 10);
    for _ in 0..2 {
        // Twice: the server survives its panicking session.
        let out = m.run([
            "push",
            "app.db",
            "acme/app.db",
            "--server",
            &server.url,
            "--key",
            &server.admin_key,
        ]);
        assert_fails(&out, EXIT_SERVER, "a bug in sqlferry, please report it");
    }
}

/// `keys list --json` on `server` with `key`: the parsed list (exit 0 asserted).
fn keys_json(
    m: &Machine,
    server: &TestServer,
    key: &str,
    filter: &[&str],
) -> Vec<serde_json::Value> {
    let out = m.run_on(
        server,
        ["keys", "list", "--json", "--key", key]
            .iter()
            .chain(filter.iter()),
    );
    assert_eq!(util::code(&out), 0, "keys list: {}", util::stderr(&out));
    assert!(
        !util::stdout(&out).contains(&server.admin_key[20..]),
        "no secret printed"
    );
    serde_json::from_slice(&out.stdout).expect("keys list --json prints JSON")
}

#[test]
fn keys_are_listed_and_revoked_and_minted_only_when_asked() {
    let dir = TempDir::new().expect("tempdir");
    let mut server = TestServer::start(dir.path());
    let a = Machine::new(dir.path(), "a");
    small_db(&a.path("app.db"), 128 << 10);
    a.push(
        &server,
        "app.db",
        "acme/app.db",
        &["--key", &server.admin_key],
    );
    let push_key = saved_push_key(&a, &a.path("app.db"));
    let pull_key = sidecar_field(&a.path("app.db-sqlferry"), "key");

    let all = keys_json(&a, &server, &server.admin_key, &[]);
    let ids: Vec<&str> = all.iter().map(|k| k["id"].as_str().expect("id")).collect();
    assert_eq!(
        ids,
        [
            key_id(&server.admin_key),
            key_id(&push_key),
            key_id(&pull_key)
        ]
    );
    assert_eq!(all[1]["kind"], "push");
    assert_eq!(all[1]["replica"], "acme/app.db");
    let table = a.run_on(&server, ["keys", "list", "--key", &server.admin_key]);
    let text = util::stdout(&table);
    assert!(
        text.contains(&format!("sfk_{}…", key_id(&pull_key))),
        "{text}"
    );
    for k in [&server.admin_key, &push_key, &pull_key] {
        assert!(!text.contains(&k[20..]), "no secret in the table: {text}");
    }

    // Only the admin key may list keys.
    let out = a.run_on(&server, ["keys", "list", "--key", &push_key]);
    assert_fails(&out, EXIT_AUTH, "only the admin key");

    // An admin push to the existing replica from another machine mints nothing…
    let b = Machine::new(dir.path(), "b");
    small_db(&b.path("b.db"), 64 << 10);
    b.push(
        &server,
        "b.db",
        "acme/app.db",
        &["--key", &server.admin_key, "--force"],
    );
    assert!(!b.path("b.db-sqlferry").exists(), "no sidecar: no new keys");
    let of_app = keys_json(&a, &server, &server.admin_key, &["acme/app.db"]);
    assert_eq!(of_app.len(), 2, "still the two keys: {of_app:?}");
    // …unless asked.
    exec(
        &b.path("b.db"),
        "INSERT INTO t(k, v) VALUES ('x', randomblob(100));",
    );
    b.push(
        &server,
        "b.db",
        "acme/app.db",
        &["--key", &server.admin_key, "--new-keys"],
    );
    assert!(b.path("b.db-sqlferry").exists(), "new keys asked for");
    assert_eq!(
        keys_json(&a, &server, &server.admin_key, &["acme/app.db"]).len(),
        4
    );

    // Only the admin key may ask for new keys.
    let out = a.run_on(
        &server,
        [
            "push",
            "app.db",
            "acme/app.db",
            "--new-keys",
            "--key",
            &push_key,
        ],
    );
    assert_fails(&out, EXIT_AUTH, "--new-keys needs the admin key");

    // Revoke the first PULL key: pulling with it is refused from then on.
    let out = a.run([
        "keys",
        "revoke",
        &server.url,
        key_id(&pull_key),
        "--key",
        &server.admin_key,
    ]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(
        util::stdout(&out).contains("revoked PULL key"),
        "{}",
        util::stdout(&out)
    );
    let out = a.run_on(
        &server,
        ["pull", "acme/app.db", "copy.db", "--key", &pull_key],
    );
    assert_fails(&out, EXIT_AUTH, "revoked");
    assert!(!a.path("copy.db").exists());
    let out = a.run_on(
        &server,
        [
            "keys",
            "revoke",
            key_id(&server.admin_key),
            "--key",
            &server.admin_key,
        ],
    );
    assert_fails(&out, EXIT_USAGE, "admin key");

    // server.db is owner-only, and one left wider is tightened at start.
    let db = dir.path().join("server-data/server.db");
    let mode = |p: &Path| std::fs::metadata(p).expect("exists").permissions().mode() & 0o777;
    assert_eq!(mode(&db), 0o600);
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    server.restart();
    assert_eq!(mode(&db), 0o600, "tightened at start");
}

/// A running process whose stdout and stderr lines arrive on a channel.
struct Lines {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    fn start(mut command: Command) -> Lines {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sqlferry");
        let (tx, lines) = std::sync::mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Lines {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (at most a minute: a retry comes after 5 s, then 10 s) for a line with
    /// every one of `parts`.
    fn expect(&mut self, parts: &[&str]) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if parts.iter().all(|p| line.contains(p)) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with {parts:?}; it printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_push_subscriber_keeps_retrying_while_the_servers_disk_is_full() {
    let dir = TempDir::new().expect("tempdir");
    let data = dir.path().join("server-data");
    let disk = Tmpfs::mount(&data, "4m");
    let server = TestServer::start(dir.path());
    let a = Machine::new(dir.path(), "a");
    let db = a.path("app.db");
    small_db(&db, 128 << 10);
    a.push(
        &server,
        "app.db",
        "acme/app.db",
        &["--key", &server.admin_key],
    );
    let mut command = a.command();
    command.args(["push", "app.db", "acme/app.db", "--server", &server.url]);
    command.args([
        "--subscribe",
        "--waitIdle",
        "10s",
        "--maxChanges",
        "1",
        "--poll",
        "1s",
    ]);
    let mut sub = Lines::start(command);
    sub.expect(&["push (start): no change"]);

    let filler = disk.fill();
    exec(
        &db,
        "INSERT INTO t(k, v) VALUES ('full', randomblob(2000));",
    );
    sub.expect(&[
        "push (changes) failed",
        "the disk holding",
        "is full",
        "retry in",
    ]);
    assert!(
        sub.child.try_wait().expect("try_wait").is_none(),
        "the subscriber keeps going: {}",
        sub.seen.join("\n")
    );
    std::fs::remove_file(&filler).expect("free the disk");
    sub.expect(&["version 2"]);
    assert_eq!(server.version_numbers("acme/app.db"), [1, 2]);
}
