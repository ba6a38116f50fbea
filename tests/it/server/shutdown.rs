//! Stopping the server: SIGTERM or SIGINT with nothing in flight exits 0 at once and
//! closes the port; SIGTERM during a push lets it finish (or, past the grace period,
//! rolls it back), never leaving half a version; the data directory serves again after
//! a restart, with the same admin key.

use std::net::TcpStream;
use std::time::Duration;

use tempfile::TempDir;

use super::kill::{start_push, wait_mid_push, wal_len};
use super::{DbState, EXIT_NETWORK, Machine, TestServer, small_db, wait_for_exit};
use crate::util;

/// Sessions in flight get 10 s after the signal; then the server must be gone.
const GRACE_AND_MARGIN: Duration = Duration::from_secs(20);

#[test]
fn sigterm_or_sigint_with_no_session_in_flight_exits_0_promptly() {
    let dir = TempDir::new().expect("tempdir");
    let mut server = TestServer::start(dir.path());
    let a = Machine::new(dir.path(), "a");
    small_db(&a.path("app.db"), 64 << 10);
    let s1 = DbState::of(&a.path("app.db"));
    a.push(
        &server,
        "app.db",
        "acme/app.db",
        &["--key", &server.admin_key],
    );
    // A pull into the pushed database itself needs no key: the saved PUSH key serves.
    a.pull(&server, "acme/app.db", Some("app.db"), &[]);

    for signal in ["TERM", "INT"] {
        let (status, _) = server.stop(signal, GRACE_AND_MARGIN);
        assert_eq!(status.code(), Some(0), "SIG{signal}: {status}");
        // Promptly: it had nothing to wait for, so it did not wait out the grace.
        assert!(
            !server.log().contains(super::ABORTED_AT_GRACE),
            "SIG{signal}: waited out the grace:\n{}",
            server.log()
        );
        assert!(
            TcpStream::connect(server.addr()).is_err(),
            "SIG{signal}: the port is closed"
        );
        let out = a.run_on(&server, ["pull", "acme/app.db", "gone.db"]);
        assert_eq!(util::code(&out), EXIT_NETWORK, "{}", util::stderr(&out));
        assert!(util::stderr(&out).contains("cannot reach"));

        // Same data directory, same port, same admin key (none printed this time).
        server.restart();
        assert_eq!(server.version_numbers("acme/app.db"), [1]);
        let r = a.pull(&server, "acme/app.db", Some("app.db"), &[]);
        assert_eq!(r.digest(), s1.digest);
    }
}

#[test]
fn sigterm_during_a_push_ends_it_whole_or_not_at_all() {
    let dir = TempDir::new().expect("tempdir");
    let mut server = TestServer::start(dir.path());
    let a = Machine::new(dir.path(), "a");
    let src = a.path("app.db");
    small_db(&src, 64 << 10);
    let s1 = DbState::of(&src);
    a.push(
        &server,
        "app.db",
        "acme/app.db",
        &["--key", &server.admin_key],
    );
    util::fill(&util::open(&src), 32 << 20, 4000);
    util::checkpoint(&src);
    let big = DbState::of(&src);

    let mut push = start_push(&a, &server, "during shutdown");
    wait_mid_push(&server, &mut push, wal_len(&server));
    let (status, took) = server.stop("TERM", GRACE_AND_MARGIN);
    assert_eq!(status.code(), Some(0), "clean exit after SIGTERM: {status}");
    let pushed = wait_for_exit(&mut push, GRACE_AND_MARGIN).expect("the push ends");
    let out = push.wait_with_output().expect("push output");

    server.restart();
    let versions: Vec<(u64, String)> = server
        .versions("acme/app.db")
        .expect("exists")
        .into_iter()
        .map(|v| (v.number, v.digest))
        .collect();
    match pushed.code() {
        // Finished within the grace period: the version is whole.
        Some(0) => {
            assert_eq!(versions, [(1, s1.digest.clone()), (2, big.digest.clone())]);
        }
        // Aborted at the end of the grace period: nothing of it remains.
        Some(EXIT_NETWORK) => {
            assert!(took >= Duration::from_secs(10), "aborted early: {took:?}");
            assert!(
                server.log().contains(super::ABORTED_AT_GRACE),
                "{}",
                server.log()
            );
            assert_eq!(versions, [(1, s1.digest.clone())]);
        }
        other => panic!("push exit {other:?}: {}", util::stderr(&out)),
    }
    let b = Machine::new(dir.path(), "b");
    let r = b.pull(
        &server,
        "acme/app.db",
        Some("latest.db"),
        &["--key", &server.admin_key],
    );
    let want = if pushed.success() { &big } else { &s1 };
    assert_eq!(r.digest(), want.digest);
    want.assert_held_by(&b.path("latest.db"), "the latest version after shutdown");
}
