//! SIGKILL half-way through a large push, of the pushing client and of the server:
//! no partial version ever appears, every earlier version comes back intact (after a
//! restart on the same data directory), and the replica takes new pushes.
//!
//! "Half-way" is an observable event, not a guess: the store's page packs grow while a
//! push appends its pages; the kill comes once they have grown by [`WAL_MID_PUSH`].

use std::process::{Child, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::{DbState, EXIT_NETWORK, Machine, TestServer, exec, small_db, wait_for_exit};
use crate::util;

/// The size of the database pushed and killed: large enough that a push takes a
/// while, small enough for CI.
const BIG_BYTES: u64 = 64 << 20;

/// How much the store's packs grow before the kill: well into the push, far from its
/// end (a 64 MB push appends about 64 MB).
const WAL_MID_PUSH: u64 = 8 << 20;

/// The most a push of the big database may take here (debug build, busy CI).
const PUSH_TIMEOUT: Duration = Duration::from_secs(120);

/// Starts `push app.db acme/app.db` on machine `m` in the background.
pub(crate) fn start_push(m: &Machine, server: &TestServer, message: &str) -> Child {
    m.command()
        .args(["push", "app.db", "acme/app.db", "--json", "-m", message])
        .args(["--server", &server.url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start push")
}

/// Waits until the store's packs have grown by [`WAL_MID_PUSH`] over `baseline` while
/// `push` still runs; panics if the push ends first.
pub(crate) fn wait_mid_push(server: &TestServer, push: &mut Child, baseline: u64) {
    let mut ended = None;
    let reached = util::wait_until(PUSH_TIMEOUT, Duration::from_millis(2), || {
        ended = push.try_wait().expect("try_wait");
        ended.is_some() || wal_len(server) >= baseline + WAL_MID_PUSH
    });
    assert!(reached, "the push never got half-way");
    assert!(
        ended.is_none(),
        "the push ended ({ended:?}) before it could be killed"
    );
}

/// The bytes of the store's page packs now (what a push appends to).
pub(crate) fn wal_len(server: &TestServer) -> u64 {
    let pages = server
        .replica_file("acme/app.db")
        .ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "replicas"))
        .and_then(std::path::Path::parent)
        .expect("replica files are under <data>/replicas")
        .join("pages");
    std::fs::read_dir(pages).map_or(0, |d| {
        d.flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".pack"))
            .map(|e| util::file_len(&e.path()))
            .sum()
    })
}

/// The versions as a user lists them: number, message, digest.
fn listed(server: &TestServer) -> Vec<(u64, String, String)> {
    server
        .versions("acme/app.db")
        .expect("the replica exists")
        .into_iter()
        .map(|v| (v.number, v.message, v.digest))
        .collect()
}

#[test]
fn sigkill_of_client_or_server_mid_push_leaves_every_version_intact() {
    let dir = TempDir::new().expect("tempdir");
    let mut server = TestServer::start(dir.path());
    let a = Machine::new(dir.path(), "a");
    let b = Machine::new(dir.path(), "b");
    let src = a.path("app.db");

    // Two small versions first.
    small_db(&src, 256 << 10);
    let s1 = DbState::of(&src);
    a.push(
        &server,
        "app.db",
        "acme/app.db",
        &["-m", "one", "--key", &server.admin_key],
    );
    exec(&src, "UPDATE t SET v = randomblob(300) WHERE id < 20");
    let s2 = DbState::of(&src);
    a.push(&server, "app.db", "acme/app.db", &["-m", "two"]);
    let before = listed(&server);
    assert_eq!(
        before
            .iter()
            .map(|(n, m, d)| (*n, m.as_str(), d.as_str()))
            .collect::<Vec<_>>(),
        [
            (1, "one", s1.digest.as_str()),
            (2, "two", s2.digest.as_str())
        ]
    );

    // Then the database grows large.
    util::fill(&util::open(&src), BIG_BYTES, 4000);
    util::checkpoint(&src);
    let big = DbState::of(&src);

    // 1. The client is killed half-way: nothing of its push remains.
    let mut push = start_push(&a, &server, "killed client");
    wait_mid_push(&server, &mut push, wal_len(&server));
    push.kill().expect("SIGKILL the push");
    let status = push.wait().expect("wait");
    assert!(status.code().is_none(), "killed by a signal: {status}");
    assert_eq!(listed(&server), before, "no version from the killed client");

    // 2. The server is killed half-way through the next push: the client says the
    // connection was lost, and the restarted server has every earlier version.
    let mut push = start_push(&a, &server, "killed server");
    wait_mid_push(&server, &mut push, wal_len(&server));
    server.sigkill();
    let status = wait_for_exit(&mut push, PUSH_TIMEOUT).expect("the push ends");
    let out = push.wait_with_output().expect("push output");
    let err = util::stderr(&out);
    assert_eq!(status.code(), Some(EXIT_NETWORK), "{err}");
    assert!(
        err.starts_with("sqlferry: error: ") && err.contains("acme/app.db"),
        "{err}"
    );
    server.restart();
    assert_eq!(listed(&server), before, "no version from the killed server");
    for (n, state) in [(1, &s1), (2, &s2)] {
        let local = format!("v{n}.db");
        let r = b.pull(
            &server,
            &format!("acme/app.db@{n}"),
            Some(&local),
            &["--key", &server.admin_key],
        );
        assert_eq!(r.digest(), state.digest);
        state.assert_held_by(&b.path(&local), &format!("version {n} after the kills"));
    }

    // 3. The replica takes the push now, with the saved key, based on version 2.
    let r = a.push(&server, "app.db", "acme/app.db", &["-m", "three"]);
    assert_eq!((r.u64("version"), r.digest()), (3, big.digest.as_str()));
    let r = b.pull(
        &server,
        "acme/app.db",
        Some("v2.db"),
        &["--key", &server.admin_key],
    );
    assert_eq!(r.u64("version"), 3);
    big.assert_held_by(&b.path("v2.db"), "version 3 pulled over version 2");
    let messages: Vec<String> = listed(&server).into_iter().map(|(_, m, _)| m).collect();
    assert_eq!(messages, ["one", "two", "three"]);
}
