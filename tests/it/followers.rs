//! Followers as a user meets them: a real `sqlferry serve` process, a real pull
//! subscriber process on another "machine" (its own XDG directories, the PULL key of the
//! sidecar), and `push --wait-followers` run as a command.
//!
//! - The replica's API summary lists each connected pull subscriber with the version it
//!   applied and its lag; a killed subscriber's session ends and it leaves the list.
//! - `push --wait-followers 1` returns once the follower holds the version (its file
//!   already has the new rows when the push exits); with no follower and `--timeout 1s`
//!   it exits 12 saying the version WAS committed, and the version exists.
//! - `--wait-followers` without a server is a usage error that pushes nothing.
//! - The frames from a raw client (`server::raw`): a subscriber that never reports (as
//!   an older one) is listed with no version; a WAITFOLLOWERS is answered the moment a
//!   report reaches the count; a wait for 0 followers is refused.
//!
//! Every wait polls the server's API or the subscriber's output with a deadline.

use tempfile::TempDir;

use crate::server::{EXIT_NOT_FOUND, EXIT_USAGE, Machine, TestServer, assert_fails};
use crate::subscribe::{Subscriber, commit_rows, first_push, http, max_id, status_when, writer_db};
use crate::util;

/// Exit code: the push committed but too few followers applied it in time.
const EXIT_NOT_FOLLOWED: i32 = 12;

/// A server, an origin machine that pushed `acme/app.db` (version 1, rows 1..=2, its
/// PUSH key saved) and a follower machine holding the sidecar beside `replica.db`.
fn setup(dir: &TempDir) -> (TestServer, Machine, Machine) {
    let server = TestServer::start_args(dir.path(), &["--metrics-listen", "127.0.0.1:0"]);
    let origin = Machine::new(dir.path(), "origin");
    let follower = Machine::new(dir.path(), "follower");
    writer_db(&origin.path("app.db"), 2);
    first_push(&server, &origin, "app.db", "acme/app.db");
    std::fs::copy(
        origin.path("app.db-sqlferry"),
        follower.path("replica.db-sqlferry"),
    )
    .expect("copy the sidecar");
    (server, origin, follower)
}

/// `pull --from replica.db-sqlferry replica.db --subscribe` on `follower`, once it
/// pulled version 1.
fn follow(follower: &Machine) -> Subscriber {
    let mut pull = Subscriber::start(
        follower,
        &[
            "pull",
            "--from",
            "replica.db-sqlferry",
            "replica.db",
            "--subscribe",
        ],
    );
    pull.expect(&["pull (start): version 1"]);
    pull
}

/// The replica's followers, as the API lists them.
fn followers(status: &serde_json::Value) -> &Vec<serde_json::Value> {
    status["followers"]
        .as_array()
        .unwrap_or_else(|| panic!("a followers list: {status}"))
}

/// Whether the only follower holds `version` with no lag.
fn one_follower_at(status: &serde_json::Value, version: u64) -> bool {
    status["followers"].as_array().is_some_and(|f| {
        f.len() == 1 && f[0]["applied_version"] == version && f[0]["lag_seconds"] == 0
    })
}

#[test]
fn the_summary_shows_each_follower_with_its_version_and_lag_until_its_session_ends() {
    let dir = TempDir::new().unwrap();
    let (server, origin, follower) = setup(&dir);
    let started = crate::subscribe::unix_now();
    let pull = follow(&follower);

    let status = status_when(&server, "the follower reported version 1", |s| {
        one_follower_at(s, 1)
    });
    assert_eq!(status["pull_subscribers"], 1, "{status}");
    let applied_at = followers(&status)[0]["applied_at"]
        .as_i64()
        .unwrap_or_else(|| panic!("applied_at: {status}"));
    assert!(
        applied_at <= crate::subscribe::unix_now(),
        "applied_at {applied_at} is not in the future: {status}"
    );

    // A push: the follower pulls it, and reports it.
    commit_rows(&origin.path("app.db"), 3..=5);
    let report = origin.push(&server, "app.db", "acme/app.db", &[]);
    assert_eq!(report.u64("version"), 2);
    let status = status_when(&server, "the follower reported version 2", |s| {
        one_follower_at(s, 2) && s["latest_version"] == 2
    });
    let applied_at = followers(&status)[0]["applied_at"].as_i64().unwrap();
    assert!(
        applied_at >= started && applied_at >= status["latest_at"].as_i64().unwrap(),
        "applied after version 2 was made: {status}"
    );
    assert_eq!(max_id(&follower.path("replica.db")), 5);
    // The metrics carry the largest lag of the replica's followers.
    use crate::server::drill::{get, parse, value};
    let (code, text) = get(
        server.metrics_addr.as_deref().expect("metrics"),
        "/metrics",
        None,
    );
    assert_eq!(code, 200, "{text}");
    assert_eq!(
        value(
            &parse(&text),
            "sqlferry_replica_follower_lag_seconds",
            &[("replica", "acme/app.db")]
        ),
        0.0,
        "{text}"
    );

    // Killed: its connection closes, the server ends its session, and after the next
    // push the replica has no follower left.
    drop(pull);
    commit_rows(&origin.path("app.db"), 6..=6);
    assert_eq!(
        origin
            .push(&server, "app.db", "acme/app.db", &[])
            .u64("version"),
        3
    );
    let status = status_when(&server, "the killed follower left", |s| {
        s["latest_version"] == 3 && s["pull_subscribers"] == 0
    });
    assert_eq!(followers(&status).len(), 0, "{status}");
    assert_eq!(
        max_id(&follower.path("replica.db")),
        5,
        "nobody pulled version 3"
    );
}

#[test]
fn push_waits_until_a_follower_holds_the_new_rows() {
    let dir = TempDir::new().unwrap();
    let (server, origin, follower) = setup(&dir);
    let mut pull = follow(&follower);
    status_when(&server, "the follower reported version 1", |s| {
        one_follower_at(s, 1)
    });

    commit_rows(&origin.path("app.db"), 3..=7);
    let out = origin.run_on(
        &server,
        ["push", "app.db", "acme/app.db", "--wait-followers", "1"],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    // When the push returns, the other machine's file already holds the write.
    assert_eq!(max_id(&follower.path("replica.db")), 7);
    assert_eq!(util::integrity(&follower.path("replica.db")), "ok");
    let stdout = util::stdout(&out);
    assert!(stdout.contains("version 2"), "{stdout}");
    assert!(
        stdout.contains("followed: version 2 of acme/app.db is applied by 1 pull subscriber"),
        "{stdout}"
    );
    pull.expect(&["pull (new-version): version 2"]);

    // Nothing changed: the wait is for the latest version, which the follower holds.
    let out = origin.run_on(
        &server,
        [
            "push",
            "app.db",
            "acme/app.db",
            "--wait-followers",
            "1",
            "--json",
        ],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let report: serde_json::Value = serde_json::from_str(util::stdout(&out).trim()).unwrap();
    assert_eq!(report["created"], false, "{report}");
    assert_eq!(report["version"], 2, "{report}");
    assert_eq!(report["followers"], 1, "{report}");
    assert_eq!(report["followed"], true, "{report}");
    assert_eq!(server.version_numbers("acme/app.db"), [1, 2]);
}

#[test]
fn a_wait_no_follower_answers_exits_12_and_the_version_exists() {
    let dir = TempDir::new().unwrap();
    let (server, origin, _follower) = setup(&dir);
    commit_rows(&origin.path("app.db"), 3..=4);
    let out = origin.run_on(
        &server,
        [
            "push",
            "app.db",
            "acme/app.db",
            "--wait-followers",
            "1",
            "--timeout",
            "1s",
        ],
    );
    let err = util::stderr(&out);
    assert_eq!(util::code(&out), EXIT_NOT_FOLLOWED, "{err}");
    assert_eq!(
        err.trim(),
        "sqlferry: error: version 2 of acme/app.db WAS committed, but only 0 of 1 pull \
         subscriber reported having applied it within 1s; the server's API lists the \
         replica's followers and their lag"
    );
    assert!(
        util::stdout(&out).contains(&format!(
            "pushed app.db to acme/app.db on {}: version 2",
            server.url
        )),
        "the push line: {}",
        util::stdout(&out)
    );
    assert_eq!(server.version_numbers("acme/app.db"), [1, 2]);
    let (code, status) = http(
        &server,
        "GET",
        "/api/replicas/acme/app.db",
        &server.admin_key,
    );
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["followers"], serde_json::json!([]), "{status}");
    assert_eq!(status["latest_version"], 2, "{status}");
}

#[test]
fn wait_followers_needs_a_server_and_pushes_nothing_without_one() {
    let dir = TempDir::new().unwrap();
    let m = Machine::new(dir.path(), "m");
    writer_db(&m.path("app.db"), 2);
    // The embedded store: its pull subscribers are processes it does not know.
    let out = m.run(["push", "app.db", "acme/app.db", "--wait-followers", "1"]);
    assert_fails(&out, EXIT_USAGE, "--wait-followers needs a server");
    let out = m.run(["versions", "acme/app.db"]);
    assert_eq!(util::code(&out), EXIT_NOT_FOUND, "nothing was pushed");
    // A local copy has no followers either.
    let out = m.run(["push", "app.db", "./copy.db", "--wait-followers", "1"]);
    assert_fails(
        &out,
        EXIT_USAGE,
        "--wait-followers needs a replica on a server",
    );
    assert!(!m.path("copy.db").exists());
    // A timeout the server would not grant, and one without a wait.
    let out = m.run([
        "push",
        "app.db",
        "acme/app.db",
        "--wait-followers",
        "1",
        "--timeout",
        "2h",
    ]);
    assert_fails(&out, EXIT_USAGE, "from 1s to 1h");
    let out = m.run(["push", "app.db", "acme/app.db", "--timeout", "5s"]);
    assert_eq!(util::code(&out), EXIT_USAGE, "{}", util::stderr(&out));
    let out = m.run(["push", "app.db", "acme/app.db", "--wait-followers", "0"]);
    assert_eq!(util::code(&out), EXIT_USAGE, "{}", util::stderr(&out));
    let out = m.run(["versions", "acme/app.db"]);
    assert_eq!(util::code(&out), EXIT_NOT_FOUND, "nothing was pushed");
}

/// The frames themselves, from a raw WebSocket client: an older subscriber that never
/// reports is listed with no version; an APPLIED is shown; a wait is answered as soon
/// as a report brings the count to the one asked for (woken by the report, not by a
/// poll or its timeout), and a wait for 0 followers is refused.
#[test]
fn raw_frames_report_applied_versions_and_wake_a_waiter() {
    use crate::server::raw;

    let dir = TempDir::new().unwrap();
    let (server, _origin, _follower) = setup(&dir);
    let subscribe = serde_json::json!({
        "protocol": 1, "op": "subscribe", "replica": "acme/app.db", "role": "pull",
        "client_id": "raw@test",
    });
    let applied = |version: u64, at: i64| {
        let mut f = vec![0x58];
        f.extend_from_slice(
            serde_json::json!({"version": version, "applied_at": at})
                .to_string()
                .as_bytes(),
        );
        f
    };
    raw::runtime().block_on(async {
        // As an older subscriber: it subscribes and says nothing more.
        let mut old = raw::connect(&server, &server.admin_key).await;
        let config = raw::open(&mut old, subscribe.clone()).await;
        assert_eq!(config["followers"], true, "{config}");
        let status = status_when(&server, "the silent follower is listed", |s| {
            s["pull_subscribers"] == 1
        });
        assert_eq!(
            status["followers"],
            serde_json::json!([{"applied_version": null, "applied_at": null, "lag_seconds": null}])
        );

        // A subscriber that reports; its clock ahead of the server's is not believed.
        let mut new = raw::connect(&server, &server.admin_key).await;
        raw::open(&mut new, subscribe.clone()).await;
        let ahead = crate::subscribe::unix_now() + 3600;
        assert!(raw::send(&mut new, applied(1, ahead)).await);
        let status = status_when(&server, "the report is shown", |s| {
            s["followers"].as_array().is_some_and(|f| {
                f.len() == 2 && f[1]["applied_version"] == 1 && f[1]["lag_seconds"] == 0
            })
        });
        assert!(
            status["followers"][1]["applied_at"].as_i64().unwrap() < ahead,
            "{status}"
        );

        // A wait for 2 followers of version 1: one holds it now, the second report
        // ends the wait long before its 60 s.
        let mut wait = raw::connect(&server, &server.admin_key).await;
        let config = raw::open(
            &mut wait,
            serde_json::json!({"protocol": 1, "op": "wait-followers",
                "replica": "acme/app.db", "client_id": "raw@test"}),
        )
        .await;
        assert_eq!(
            (config["version"].clone(), config["followers"].clone()),
            (1.into(), true.into())
        );
        let ask = |count: u32| {
            let mut f = vec![0x59];
            f.extend_from_slice(
                serde_json::json!({"count": count, "version": 1, "timeout_ms": 60_000})
                    .to_string()
                    .as_bytes(),
            );
            f
        };
        assert!(raw::send(&mut wait, ask(2)).await);
        let followed = |frame: Option<Vec<u8>>| -> serde_json::Value {
            let frame = frame.expect("a FOLLOWED frame");
            assert_eq!(frame[0], 0x5a, "{:?}", String::from_utf8_lossy(&frame));
            serde_json::from_slice(&frame[1..]).expect("FOLLOWED is JSON")
        };
        assert_eq!(
            followed(raw::next(&mut wait).await),
            serde_json::json!({"count": 1, "version": 1, "done": false})
        );
        let asked = std::time::Instant::now();
        assert!(raw::send(&mut old, applied(1, crate::subscribe::unix_now())).await);
        assert_eq!(
            followed(raw::next(&mut wait).await),
            serde_json::json!({"count": 2, "version": 1, "done": true})
        );
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(30),
            "woken by the report, not the timeout"
        );
        assert_eq!(raw::next(&mut wait).await, None, "the session ends");

        // Zero followers is no wait: refused with ERROR 11 (bad request).
        let mut zero = raw::connect(&server, &server.admin_key).await;
        raw::open(
            &mut zero,
            serde_json::json!({"protocol": 1, "op": "wait-followers",
                "replica": "acme/app.db", "client_id": "raw@test"}),
        )
        .await;
        assert!(raw::send(&mut zero, ask(0)).await);
        let frame = raw::next(&mut zero).await.expect("an ERROR frame");
        assert_eq!(
            &frame[..3],
            [0x08, 0, 11],
            "{:?}",
            String::from_utf8_lossy(&frame)
        );
    });
}

#[test]
fn a_followers_sidecar_names_the_replica_for_versions_verify_and_sync_now() {
    let dir = TempDir::new().unwrap();
    let (server, _origin, follower) = setup(&dir);
    let out = follower.run(["versions", "--from", "replica.db-sqlferry", "--json"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let versions: serde_json::Value = serde_json::from_str(&util::stdout(&out)).unwrap();
    assert_eq!(versions[0]["number"], 1, "{versions}");

    let out = follower.run(["verify", "--from", "replica.db-sqlferry", "@1", "--json"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&util::stdout(&out)).unwrap();
    assert_eq!(
        (&report["replica"], &report["version"]),
        (&"acme/app.db".into(), &1.into()),
        "{report}"
    );
    let out = follower.run(["verify", "--from", "replica.db-sqlferry", "--all-versions"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(
        util::stdout(&out).contains("version 1  ok"),
        "{}",
        util::stdout(&out)
    );

    // sync-now needs a PUSH key: the sidecar's PULL key is refused, and says why.
    let out = follower.run(["sync-now", "--from", "replica.db-sqlferry"]);
    assert_eq!(util::code(&out), 5, "{}", util::stderr(&out));
    // A --key given wins over the sidecar's.
    let out = follower.run([
        "sync-now",
        "--from",
        "replica.db-sqlferry",
        "--key",
        server.admin_key.as_str(),
    ]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(
        util::stdout(&out).contains("0 subscribers reached"),
        "{}",
        util::stdout(&out)
    );

    // A replica path and --from at once: which one is meant is not guessed.
    let out = follower.run(["versions", "acme/app.db", "--from", "replica.db-sqlferry"]);
    assert_eq!(util::code(&out), 2, "{}", util::stderr(&out));
    assert!(
        util::stderr(&out).contains("with --from"),
        "{}",
        util::stderr(&out)
    );
}
