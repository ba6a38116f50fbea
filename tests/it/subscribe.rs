//! Subscribers as a user runs them: real `sqlferry push --subscribe` and
//! `pull --subscribe` processes, a real writer process (`helpers/writer.py`), real
//! readers of the follower (`helpers/follower.py`), a real server, or the embedded
//! store shared by processes of one machine.
//!
//! Every wait is on an event: a line a subscriber prints, a row count reached, a
//! process exit, each polled with a deadline. How long the loops wait (idle, backoff,
//! shutdown bounds) is tested in-process under paused time (`subscribe::tests` in the
//! library), not here.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::live::Helper;
use crate::server::{EXIT_AUTH, EXIT_USAGE, Machine, TestServer, signal, wait_for_exit};
use crate::util;

/// How long a subscriber may take to print an expected line (a debug build on a busy
/// CI).
const LINE_TIMEOUT: Duration = Duration::from_secs(30);

/// A running subscriber: its stdout and stderr lines arrive on a channel as printed.
pub(crate) struct Subscriber {
    name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Subscriber {
    pub(crate) fn start(machine: &Machine, args: &[&str]) -> Subscriber {
        let mut child = machine
            .command()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sqlferry");
        let (tx, lines) = mpsc::channel();
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
        Subscriber {
            name: args.join(" "),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing every one of `parts`; returns it.
    pub(crate) fn expect(&mut self, parts: &[&str]) -> String {
        let deadline = Instant::now() + LINE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if parts.iter().all(|p| line.contains(p)) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "`sqlferry {}` printed no line with {parts:?}; it printed:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits until, for each of `wanted`, a line containing all its parts has come, in
    /// any order (lines of concurrent work interleave); returns them in `wanted`'s order.
    pub(crate) fn expect_all(&mut self, wanted: &[&[&str]]) -> Vec<String> {
        let deadline = Instant::now() + LINE_TIMEOUT;
        let mut found: Vec<Option<String>> = vec![None; wanted.len()];
        while found.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Some(i) = (0..wanted.len())
                        .find(|&i| found[i].is_none() && wanted[i].iter().all(|p| line.contains(p)))
                    {
                        found[i] = Some(line);
                    }
                }
                Err(_) => panic!(
                    "`sqlferry {}` printed no line with {:?}; it printed:\n{}",
                    self.name,
                    wanted
                        .iter()
                        .zip(&found)
                        .filter(|(_, f)| f.is_none())
                        .map(|(w, _)| w)
                        .collect::<Vec<_>>(),
                    self.seen.join("\n")
                ),
            }
        }
        found.into_iter().flatten().collect()
    }

    /// Sends SIGTERM and waits for the exit code.
    pub(crate) fn stop(&mut self) -> i32 {
        signal(&self.child, "TERM");
        let status = wait_for_exit(&mut self.child, LINE_TIMEOUT)
            .unwrap_or_else(|| panic!("`sqlferry {}` did not exit after SIGTERM", self.name));
        // The rest of its output, for the caller's asserts.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(line);
        }
        status.code().unwrap_or(-1)
    }

    /// Waits for it to exit on its own (no signal); its exit code.
    pub(crate) fn wait(&mut self) -> i32 {
        let status = wait_for_exit(&mut self.child, LINE_TIMEOUT)
            .unwrap_or_else(|| panic!("`sqlferry {}` did not exit on its own", self.name));
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(line);
        }
        status.code().unwrap_or(-1)
    }

    /// The process, for signals.
    pub(crate) fn child(&self) -> &Child {
        &self.child
    }

    /// Everything it printed so far.
    pub(crate) fn output(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sqlferry push app.db acme/app.db --server URL --subscribe TIMING…` on `m`.
pub(crate) fn push_subscriber(m: &Machine, server: &TestServer, timing: &[&str]) -> Subscriber {
    let mut args = vec![
        "push",
        "app.db",
        "acme/app.db",
        "--server",
        &server.url,
        "--subscribe",
    ];
    args.extend_from_slice(timing);
    Subscriber::start(m, &args)
}

/// A WAL database with the writer's table and `rows` rows.
pub(crate) fn writer_db(path: &Path, rows: u64) {
    let conn = util::create(path, 4096, util::Mode::Wal);
    conn.execute_batch("CREATE TABLE w(id INTEGER PRIMARY KEY, at REAL)")
        .expect("create w");
    for id in 1..=rows {
        conn.execute("INSERT INTO w(id, at) VALUES (?1, 0)", [id as i64])
            .expect("insert");
    }
}

pub(crate) fn max_id(path: &Path) -> u64 {
    rusqlite::Connection::open(path)
        .and_then(|c| {
            c.query_row("SELECT coalesce(max(id), 0) FROM w", [], |r| {
                r.get::<_, i64>(0)
            })
        })
        .map_or(0, |n| n as u64)
}

pub(crate) fn commit_rows(path: &Path, ids: std::ops::RangeInclusive<u64>) {
    let conn = util::open(path);
    for id in ids {
        conn.execute("INSERT INTO w(id, at) VALUES (?1, 1)", [id as i64])
            .expect("insert");
    }
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
}

/// One HTTP/1.1 request to the server; the status and the JSON body.
pub(crate) fn http(
    server: &TestServer,
    method: &str,
    path: &str,
    key: &str,
) -> (u16, serde_json::Value) {
    let mut s = std::net::TcpStream::connect(server.addr()).expect("connect");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {key}\r\ncontent-length: 0\r\n\r\n",
        server.addr()
    )
    .expect("send request");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read response");
    let status = response[9..12].parse().expect("status code");
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (
        status,
        serde_json::from_str(body).unwrap_or_else(|e| panic!("JSON body: {e}: {response}")),
    )
}

/// Polls the replica's status (`GET /api/replicas/acme/app.db`, admin key) until
/// `ready` holds, and returns it; fails saying `what` was awaited.
pub(crate) fn status_when(
    server: &TestServer,
    what: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut status = serde_json::Value::Null;
    let met = util::wait_until(LINE_TIMEOUT, Duration::from_millis(20), || {
        status = http(
            server,
            "GET",
            "/api/replicas/acme/app.db",
            &server.admin_key,
        )
        .1;
        ready(&status)
    });
    assert!(met, "{what}: {status}");
    status
}

/// A first push with the admin key: the PUSH key is saved, the sidecar written.
pub(crate) fn first_push(server: &TestServer, m: &Machine, db: &str, replica: &str) {
    let out = m
        .command()
        .args([
            "push",
            db,
            replica,
            "--server",
            &server.url,
            "--key",
            &server.admin_key,
        ])
        .output()
        .expect("push");
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
}

#[test]
fn a_follower_ends_with_the_writers_rows_and_its_readers_never_fail() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path());
    let origin = Machine::new(dir.path(), "origin");
    let follower = Machine::new(dir.path(), "follower");
    // The writer adds ids 1, 2, 3…: the table starts empty.
    writer_db(&origin.path("app.db"), 0);
    first_push(&server, &origin, "app.db", "acme/app.db");
    // The sidecar travels to the other machine, beside the database it names.
    std::fs::copy(
        origin.path("app.db-sqlferry"),
        follower.path("replica.db-sqlferry"),
    )
    .unwrap();

    let mut pull = Subscriber::start(
        &follower,
        // LOCAL given after --from: the one positional is the database, not a replica.
        &[
            "pull",
            "--from",
            "replica.db-sqlferry",
            "replica.db",
            "--subscribe",
        ],
    );
    pull.expect(&["pull (start): version 1"]);
    let reader = Helper::start("follower.py", &[follower.path("replica.db").as_os_str()]);
    let mut push = push_subscriber(
        &origin,
        &server,
        &["--waitIdle", "10s", "--maxChanges", "1", "--poll", "1s"],
    );
    push.expect(&["push (start): no change, still version 1"]);

    let writer = Helper::start(
        "writer.py",
        &[
            origin.path("app.db").as_os_str(),
            "50".as_ref(),
            "1000".as_ref(),
        ],
    );
    assert!(
        util::wait_until(LINE_TIMEOUT, Duration::from_millis(20), || max_id(
            &follower.path("replica.db")
        ) >= 20),
        "the follower reached 20 rows; push:\n{}\npull:\n{}",
        push.output(),
        pull.output()
    );
    let written = writer.finish()["commits"].as_u64().expect("commits");
    // The last commits are pushed (changes) and pulled (new-version) too.
    assert!(
        util::wait_until(LINE_TIMEOUT, Duration::from_millis(20), || max_id(
            &follower.path("replica.db")
        ) == written),
        "the follower ends with all {written} rows, has {}",
        max_id(&follower.path("replica.db"))
    );
    let report = reader.finish();
    assert_eq!(report["errors"], serde_json::json!([]), "{report}");
    assert_eq!(report["mismatches"], serde_json::json!([]), "{report}");
    assert!(report["reads"].as_u64().unwrap() > 10, "{report}");
    assert_eq!(util::integrity(&follower.path("replica.db")), "ok");
    assert_eq!(
        util::dump(&origin.path("app.db")),
        util::dump(&follower.path("replica.db"))
    );
    let pushes = push.output().matches("push (changes): version").count();
    assert!(pushes >= 2, "pushes by --maxChanges 1:\n{}", push.output());
    assert!(
        pull.output().contains("pull (new-version): version"),
        "{}",
        pull.output()
    );

    // sync-now reaches both subscribers, through the server.
    let out = origin.run_on(&server, ["sync-now", "acme/app.db"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert_eq!(
        util::stdout(&out).trim(),
        "sync-now acme/app.db: 2 subscribers reached"
    );
    push.expect(&["push (sync-now): no change"]);
    pull.expect(&["pull (sync-now): version"]);
    // A PULL key may not ask for it.
    let sidecar = std::fs::read_to_string(follower.path("replica.db-sqlferry")).unwrap();
    let pull_key = sidecar
        .lines()
        .find_map(|l| l.strip_prefix("key = "))
        .map(|k| k.trim_matches('"').to_owned())
        .expect("a key in the sidecar");
    let (status, body) = http(&server, "POST", "/api/replicas/acme/app.db/sync", &pull_key);
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("PULL key"),
        "{body}"
    );

    assert_eq!(push.stop(), 0, "{}", push.output());
    assert_eq!(pull.stop(), 0, "{}", pull.output());
}

#[test]
fn the_server_shows_the_planned_push_and_sync_now_pushes_it() {
    let dir = TempDir::new().unwrap();
    let mut server = TestServer::start(dir.path());
    let m = Machine::new(dir.path(), "m");
    writer_db(&m.path("app.db"), 3);
    first_push(&server, &m, "app.db", "acme/app.db");
    let mut push = push_subscriber(&m, &server, &["--waitIdle", "1h", "--poll", "1s", "-v"]);
    push.expect(&["push (start): no change"]);
    let before = unix_now();
    commit_rows(&m.path("app.db"), 4..=4);
    push.expect(&["push planned"]);
    let status = status_when(&server, "the server heard CHANGED", |s| {
        !s["expected_push_at"].is_null()
    });
    let at = status["expected_push_at"].as_i64().unwrap();
    assert!(
        (before + 3590..=before + 3610).contains(&at),
        "an hour from now: {status}"
    );
    assert_eq!(status["push_subscribers"], 1, "{status}");
    assert_eq!(status["latest_version"], 1, "{status}");
    // This machine's `status` names the running subscriber and its plan.
    let local_status = || {
        let out = m.command().arg("status").output().expect("run status");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut text = String::new();
    let planned = util::wait_until(LINE_TIMEOUT, Duration::from_millis(100), || {
        text = local_status();
        text.contains(": idle 1h")
    });
    assert!(planned, "status shows no planned push:\n{text}");
    assert!(text.contains("push subscriber running (pid "), "{text}");
    assert!(
        ["in 1h: idle 1h", "in 60m: idle 1h", "in 59m: idle 1h"]
            .iter()
            .any(|t| text.contains(&format!("next push {t}"))),
        "{text}"
    );

    let (code, body) = http(
        &server,
        "POST",
        "/api/replicas/acme/app.db/sync",
        &server.admin_key,
    );
    assert_eq!(
        (code, &body["reached"]),
        (200, &serde_json::json!(1)),
        "{body}"
    );
    push.expect(&["push (sync-now): version 2"]);
    assert_eq!(server.version_numbers("acme/app.db"), [1, 2]);
    status_when(&server, "a commit clears the expected push", |s| {
        s["expected_push_at"].is_null()
    });
    // A server with a subscriber connected still stops at once on SIGTERM: the
    // subscribe session is closed, not waited for.
    let (status, _) = server.stop("TERM", Duration::from_secs(30));
    assert!(status.success(), "{status}");
    assert!(
        !server.log().contains(crate::server::ABORTED_AT_GRACE),
        "the subscribe session held the stop up for the grace:\n{}",
        server.log()
    );
    push.expect(&["lost the server"]);
    assert_eq!(push.stop(), 0);
    assert!(
        push.output()
            .contains("stopped (asked to): every change seen is pushed"),
        "a clean stop says so:\n{}",
        push.output()
    );
    let text = local_status();
    assert!(text.contains("push"), "{text}");
    assert!(
        !text.contains("subscriber running"),
        "a stopped subscriber is not shown running:\n{text}"
    );
}

#[test]
fn pending_changes_are_pushed_after_the_server_comes_back_and_on_sigterm() {
    let dir = TempDir::new().unwrap();
    let mut server = TestServer::start(dir.path());
    let m = Machine::new(dir.path(), "m");
    writer_db(&m.path("app.db"), 3);
    first_push(&server, &m, "app.db", "acme/app.db");
    let mut push = push_subscriber(
        &m,
        &server,
        &["--waitIdle", "10s", "--maxChanges", "1", "--poll", "1s"],
    );
    push.expect(&["push (start): no change"]);
    // A follower on another machine, with the sidecar's PULL key.
    let other = Machine::new(dir.path(), "other");
    std::fs::copy(m.path("app.db-sqlferry"), other.path("copy.db-sqlferry")).unwrap();
    let mut pull = Subscriber::start(&other, &["subscribe", "copy.db-sqlferry"]);
    pull.expect(&["pull (start): version 1"]);
    server.sigkill();
    push.expect(&["lost the server"]);
    pull.expect(&["lost the server", "reconnecting in"]);
    commit_rows(&m.path("app.db"), 4..=6);
    push.expect(&["push (changes) failed"]);
    server.restart();
    push.expect(&["server reachable again"]);
    push.expect(&["version 2"]);
    // The follower reconnects on its own and ends with what was pushed meanwhile.
    pull.expect(&["connected again"]);
    pull.expect(&["version 2"]);
    assert_eq!(max_id(&other.path("copy.db")), 6);
    assert_eq!(pull.stop(), 0);
    let versions = server.versions("acme/app.db").expect("versions");
    assert_eq!(versions.last().unwrap().number, 2);
    let restored = m.path("restored.db");
    m.pull(
        &server,
        "acme/app.db",
        Some("restored.db"),
        &["--key", &server.admin_key],
    );
    assert_eq!(max_id(&restored), 6);

    // Changes pending at SIGTERM are pushed before the subscriber exits.
    let mut idle = push_subscriber(&m, &server, &["--waitIdle", "1h", "--poll", "1s"]);
    drop(push);
    idle.expect(&["push (start): no change, still version 2"]);
    commit_rows(&m.path("app.db"), 7..=7);
    status_when(&server, "the subscriber saw the commit", |s| {
        s["expected_push_at"].is_i64()
    });
    assert_eq!(idle.stop(), 0, "{}", idle.output());
    assert!(
        idle.output().contains("push (shutdown): version 3"),
        "{}",
        idle.output()
    );
    assert_eq!(server.version_numbers("acme/app.db"), [1, 2, 3]);
}

#[test]
fn subscribers_of_the_embedded_store_reach_each_other_without_a_server() {
    let dir = TempDir::new().unwrap();
    let m = Machine::new(dir.path(), "m");
    writer_db(&m.path("app.db"), 2);
    let out = m.run(["push", "app.db", "acme/app.db"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let mut pull = Subscriber::start(&m, &["pull", "acme/app.db", "copy.db", "--subscribe"]);
    pull.expect(&["pull (start): version 1"]);
    // `subscribe DB` picks the push subscriber: app.db was pushed last.
    let mut push = Subscriber::start(
        &m,
        &[
            "subscribe",
            "app.db",
            "--waitIdle",
            "10s",
            "--maxChanges",
            "1",
            "--poll",
            "1s",
        ],
    );
    push.expect(&["push (start): no change"]);
    commit_rows(&m.path("app.db"), 3..=5);
    assert!(
        util::wait_until(LINE_TIMEOUT, Duration::from_millis(20), || max_id(
            &m.path("copy.db")
        ) == 5),
        "the pull subscriber follows; push:\n{}\npull:\n{}",
        push.output(),
        pull.output()
    );
    let out = m.run(["sync-now", "acme/app.db"]);
    assert_eq!(
        util::stdout(&out).trim(),
        "sync-now acme/app.db: 2 subscribers reached",
        "{}",
        util::stderr(&out)
    );
    push.expect(&["push (sync-now)"]);
    pull.expect(&["pull (sync-now)"]);
    assert_eq!(push.stop(), 0);
    assert_eq!(pull.stop(), 0);
    // Stopped subscribers are no longer reached.
    let out = m.run(["sync-now", "acme/app.db"]);
    assert_eq!(
        util::stdout(&out).trim(),
        "sync-now acme/app.db: 0 subscribers reached"
    );
    assert_eq!(
        util::dump(&m.path("app.db")),
        util::dump(&m.path("copy.db"))
    );
    // The sync log saw each sync with the trigger that started it.
    let out = m.run(["history", "--json"]);
    let days: serde_json::Value = serde_json::from_str(&util::stdout(&out)).unwrap();
    let triggers = &days[0]["triggers"];
    for t in ["manual", "start", "sync-now", "new-version"] {
        assert!(triggers[t].as_u64().unwrap_or(0) >= 1, "{t} in {triggers}");
    }
    let out = m.run(["status", "copy.db"]);
    assert_eq!(util::code(&out), 0, "{}", util::stdout(&out));
    assert!(
        util::stdout(&out).contains("ok       pull"),
        "{}",
        util::stdout(&out)
    );
}

#[test]
fn a_pull_key_makes_push_subscribe_follow_instead() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path());
    let origin = Machine::new(dir.path(), "origin");
    writer_db(&origin.path("app.db"), 2);
    first_push(&server, &origin, "app.db", "acme/app.db");
    let other = Machine::new(dir.path(), "other");
    std::fs::copy(
        origin.path("app.db-sqlferry"),
        other.path("app.db-sqlferry"),
    )
    .unwrap();
    let mut sub = push_subscriber(&other, &server, &["--waitIdle", "10m"]);
    sub.expect(&["is a PULL key", "pull subscriber instead"]);
    sub.expect(&["pull (start): version 1"]);
    assert_eq!(sub.stop(), 0);
    assert_eq!(
        util::dump(&origin.path("app.db")),
        util::dump(&other.path("app.db"))
    );

    // On the origin, with changes not pushed yet, a PULL key never turns the push
    // subscriber into a follower that would overwrite them.
    commit_rows(&origin.path("app.db"), 3..=5);
    let sidecar = std::fs::read_to_string(origin.path("app.db-sqlferry")).unwrap();
    let pull_key = sidecar
        .lines()
        .find_map(|l| l.strip_prefix("key = "))
        .map(|k| k.trim_matches('"').to_owned())
        .expect("a key in the sidecar");
    let out = origin.run_on(
        &server,
        [
            "push",
            "app.db",
            "acme/app.db",
            "--subscribe",
            "--waitIdle",
            "10m",
            "--key",
            &pull_key,
        ],
    );
    assert_eq!(util::code(&out), EXIT_AUTH, "{}", util::stderr(&out));
    assert!(
        util::stderr(&out).contains("would overwrite it"),
        "{}",
        util::stderr(&out)
    );
    assert_eq!(
        max_id(&origin.path("app.db")),
        5,
        "the origin's rows are intact"
    );

    // The same database through a symbolic link still finds its saved PUSH key.
    std::os::unix::fs::symlink(&origin.work, dir.path().join("link")).unwrap();
    let linked = dir.path().join("link/app.db");
    let mut push = Subscriber::start(
        &origin,
        &[
            "push",
            linked.to_str().unwrap(),
            "acme/app.db",
            "--server",
            &server.url,
            "--subscribe",
            "--waitIdle",
            "10m",
        ],
    );
    push.expect(&["push (start): version 2"]);
    assert_eq!(push.stop(), 0);
    assert_eq!(max_id(&origin.path("app.db")), 5);
}

#[test]
fn timing_flags_are_checked_before_anything_runs() {
    let dir = TempDir::new().unwrap();
    let m = Machine::new(dir.path(), "m");
    writer_db(&m.path("app.db"), 1);
    let cases: [(&[&str], &str); 6] = [
        (&["--subscribe", "--waitIdle", "5s"], "at least 10s"),
        (&["--subscribe", "--waitIdle", "25d"], "24d"),
        (&["--subscribe", "--waitIdle", "1mo"], "months"),
        (&["--subscribe", "--waitIdle", "10"], "unit"),
        (
            &[
                "--subscribe",
                "--wait-idle",
                "10m",
                "--min-interval",
                "2h",
                "--max-interval",
                "1h",
            ],
            "--min-interval 2h: may not exceed --max-interval 1h",
        ),
        (&["--waitIdle", "10m"], "--subscribe"),
    ];
    for (flags, phrase) in cases {
        let out = m.run(["push", "app.db", "acme/app.db"].iter().chain(flags));
        assert_eq!(
            util::code(&out),
            EXIT_USAGE,
            "{flags:?}: {}",
            util::stderr(&out)
        );
        assert!(
            util::stderr(&out).contains(phrase),
            "{flags:?}: {}",
            util::stderr(&out)
        );
    }
    let out = m.run(["push", "app.db", "acme/app.db", "--subscribe"]);
    assert_eq!(util::code(&out), EXIT_USAGE);
    assert!(
        util::stderr(&out).contains("--wait-idle"),
        "{}",
        util::stderr(&out)
    );
    // Nothing ran: no replica in the embedded store.
    let out = m.run(["versions", "acme/app.db"]);
    assert_eq!(
        util::code(&out),
        crate::server::EXIT_NOT_FOUND,
        "{}",
        util::stderr(&out)
    );
}

#[test]
fn failing_pushes_are_reported_to_the_server() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path());
    let a = Machine::new(dir.path(), "a");
    let b = Machine::new(dir.path(), "b");
    writer_db(&a.path("app.db"), 3);
    writer_db(&b.path("other.db"), 9);
    first_push(&server, &a, "app.db", "acme/app.db");
    let mut push = push_subscriber(
        &a,
        &server,
        &[
            "--waitIdle",
            "10s",
            "--maxChanges",
            "1",
            "--poll",
            "1s",
            "--report-failures-after",
            "1s",
        ],
    );
    push.expect(&["push (start): no change"]);
    // Someone else moves the replica on: a's pushes now conflict, retry after retry.
    let out = b.run_on(
        &server,
        [
            "push",
            "other.db",
            "acme/app.db",
            "--force",
            "--key",
            &server.admin_key,
        ],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    commit_rows(&a.path("app.db"), 4..=4);
    let failed = push.expect(&["push (changes) failed"]);
    assert!(failed.contains("retry in 5s"), "{failed}");
    let status = status_when(&server, "the failure reached the server", |s| {
        !s["failure"].is_null()
    });
    let failure = &status["failure"];
    assert_eq!(failure["attempts"], 1, "{status}");
    assert!(
        failure["error"]
            .as_str()
            .unwrap()
            .contains("VERSION_CONFLICT"),
        "{status}"
    );
    assert!(failure["failing_since"].as_i64().unwrap() <= failure["reported_at"].as_i64().unwrap());
    assert_eq!(
        server.version_numbers("acme/app.db"),
        [1, 2],
        "nothing else landed"
    );
    // Stopped with the change still not pushed: the exit code says why (conflict).
    assert_eq!(
        push.stop(),
        crate::server::EXIT_CONFLICT,
        "{}",
        push.output()
    );
    let out = push.output();
    assert!(out.contains("push (shutdown) failed"), "{out}");
    assert!(out.contains("stopped with changes not pushed"), "{out}");
    // status says so too, for cron: failing, and why.
    let out = a.run(["status", "app.db"]);
    assert_eq!(util::code(&out), 11, "{}", util::stdout(&out));
    let text = util::stdout(&out);
    assert!(text.starts_with("FAILING  push"), "{text}");
    assert!(text.contains("VERSION_CONFLICT"), "{text}");
    assert!(
        text.contains("trigger start"),
        "the start push was the last success: {text}"
    );
}

#[test]
fn a_second_signal_stops_a_subscriber_at_once() {
    let dir = TempDir::new().unwrap();
    let m = Machine::new(dir.path(), "m");
    writer_db(&m.path("app.db"), 3);
    // A server that accepts connections and never answers: the start push hangs.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}", black_hole.local_addr().unwrap());
    let mut push = Subscriber::start(
        &m,
        &[
            "push",
            "app.db",
            "acme/app.db",
            "--server",
            &url,
            "--key",
            "sfk_x",
            "--subscribe",
            "--waitIdle",
            "10s",
        ],
    );
    // A stop request ends the wait for the server's first word at once; the start
    // push has begun by then, and hangs.
    push.expect(&["push subscriber:"]);
    signal(&push.child, "TERM");
    push.expect(&["stopping: pushing pending changes first"]);
    // How soon a forced stop ends the subscriber is a paused-time test
    // (`subscribe::tests::forced_shutdown_stops_at_once_and_pushes_nothing_more`); here
    // the process exits on its own with the interrupted code.
    signal(&push.child, "INT");
    let status = wait_for_exit(&mut push.child, LINE_TIMEOUT).expect("exits");
    assert_eq!(status.code(), Some(130), "{}", push.output());
    assert!(push.output().contains("second signal: stopping now"));
    drop(black_hole);
}

#[test]
fn a_push_subscriber_sees_every_commit_of_an_app_that_closes_its_connection() {
    // An application that opens, commits and closes each time: the last connection
    // to close checkpoints and removes the WAL unless the subscriber's own connection
    // still holds its lock, which a handle closed carelessly in the same process
    // would have dropped (the watcher then went blind after the first push).
    let dir = TempDir::new().unwrap();
    let m = Machine::new(dir.path(), "m");
    writer_db(&m.path("app.db"), 1);
    let mut push = Subscriber::start(
        &m,
        &[
            "push",
            "app.db",
            "acme/app.db",
            "--subscribe",
            "--waitIdle",
            "10s",
            "--maxChanges",
            "1",
        ],
    );
    push.expect(&["push (start): version 1"]);
    for id in 2..=4 {
        util::python(
            "import sqlite3,sys;c=sqlite3.connect(sys.argv[1]);c.execute('INSERT INTO w(id, at) VALUES (?, 0)', (int(sys.argv[2]),));c.commit();c.close()",
            &[m.path("app.db").into_os_string(), id.to_string().into()],
        );
        push.expect(&[&format!("push (changes): version {id}")]);
    }
    assert_eq!(push.stop(), 0);
}
