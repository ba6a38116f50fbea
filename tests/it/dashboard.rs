//! The dashboard at `/` in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, driven by Python selenium: `helpers/dashboard.py`), against a real
//! `sqlferry serve` process with real pushes and a real `pull --subscribe` process.
//!
//! The Sync now button is proven on the replica file: a version is added to the
//! server's store by a second process that writes the data directory directly
//! (`push --server file://DATA`), so the server's hub never hears of it and the running
//! pull subscriber is not told; only the click makes it pull, and the new rows in its
//! file show the click reached it.
//!
//! `.ci/run` installs chromium, chromium-driver and selenium; a missing one fails this
//! test, never skips it. With `SQLFERRY_SCREENSHOTS=DIR` set, the test saves the
//! screenshots docs/server.md shows (`SQLFERRY_SCREENSHOTS=docs/images cargo test --test it
//! dashboard`); CI leaves it unset, so it rewrites nothing.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::server::{Machine, TestServer, small_db};
use crate::subscribe::{Subscriber, max_id};
use crate::util;

/// How long the subscriber may take to pull once asked (a debug build on a busy CI).
const PULL_TIMEOUT: Duration = Duration::from_secs(30);

/// A database with the subscribe tests' table `w` and ids 1..=`rows`.
fn rows_db(path: &Path, rows: u64) {
    let conn = util::create(path, 4096, util::Mode::Wal);
    conn.execute_batch("CREATE TABLE w(id INTEGER PRIMARY KEY, at INTEGER NOT NULL)")
        .expect("schema");
    drop(conn);
    add_rows(path, 1..=rows);
}

fn add_rows(path: &Path, ids: std::ops::RangeInclusive<u64>) {
    let conn = util::open(path);
    for id in ids {
        conn.execute("INSERT INTO w(id, at) VALUES (?1, 1)", [id as i64])
            .expect("insert");
    }
    drop(conn);
    util::checkpoint(path);
}

/// `sqlferry push LOCAL REPLICA -m MESSAGE` on `server` with the admin key.
fn push(m: &Machine, server: &TestServer, local: &str, replica: &str, message: &str) {
    m.push(
        server,
        local,
        replica,
        &["--key", &server.admin_key, "-m", message],
    );
}

#[test]
fn the_dashboard_lists_replicas_syncs_a_subscriber_and_refuses_a_wrong_key() {
    let dir = TempDir::new().expect("tempdir");
    // Drills every second: the board shows the last one.
    let server = TestServer::start_args(dir.path(), &["--drill-every", "1s"]);
    let data = dir.path().join("server-data");
    let origin = Machine::new(dir.path(), "origin");
    let follower = Machine::new(dir.path(), "follower");

    // acme/app.db: two versions through the server.
    rows_db(&origin.path("app.db"), 10);
    push(&origin, &server, "app.db", "acme/app.db", "first rows");
    add_rows(&origin.path("app.db"), 11..=20);
    push(&origin, &server, "app.db", "acme/app.db", "ten more rows");
    // Other replicas: a fresh one, and one whose file is damaged (failing).
    let users = origin.path("users.db");
    small_db(&users, 40_000);
    push(
        &origin,
        &server,
        "users.db",
        "acme/eu/users.db",
        "nightly import",
    );
    let damaged = server.replica_file("acme/legacy.db");
    std::fs::write(&damaged, vec![0x5a; 8192]).expect("write a damaged replica file");

    let key = server.admin_key.as_str();
    let mut pull = Subscriber::start(
        &follower,
        &[
            "pull",
            "acme/app.db",
            "replica.db",
            "--subscribe",
            "--server",
            &server.url,
            "--key",
            key,
        ],
    );
    pull.expect(&["pull (start): version 2"]);
    assert_eq!(max_id(&follower.path("replica.db")), 20);

    // Version 3, written beside the server: its hub hears nothing, so the pull
    // subscriber is not told. (--force: this store has no record of app.db's base.)
    add_rows(&origin.path("app.db"), 21..=30);
    let out = origin.run([
        "push",
        "app.db",
        "acme/app.db",
        "--force",
        "-m",
        "written beside the server",
        "--server",
        &format!("file://{}", data.display()),
    ]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert_eq!(server.version_numbers("acme/app.db"), [1, 2, 3]);
    assert_eq!(
        max_id(&follower.path("replica.db")),
        20,
        "not pulled before the click"
    );

    // A drill of version 3 has passed and the follower has reported version 2, a
    // second or more behind version 3.
    crate::subscribe::status_when(&server, "a drill of version 3 and the follower", |s| {
        s["last_drill"]["version"] == 3
            && s["last_drill"]["ok"] == true
            && s["followers"][0]["applied_version"] == 2
            && s["followers"][0]["lag_seconds"].as_u64() >= Some(1)
    });
    let screenshots = std::env::var_os("SQLFERRY_SCREENSHOTS");
    if let Some(shots) = &screenshots {
        std::fs::create_dir_all(shots).expect("screenshot directory");
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/helpers/dashboard.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(format!("http://{}", server.addr()))
        .arg(key)
        .arg("acme/app.db")
        .args(screenshots.iter())
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "the browser test failed (chromium, chromium-driver and selenium come from \
         .ci/run):\n{}{}",
        util::stderr(&out),
        util::stdout(&out)
    );
    let seen: serde_json::Value =
        serde_json::from_str(util::stdout(&out).trim()).expect("dashboard.py prints JSON");

    // A wrong key: the server's refusal shown, no board, nothing kept.
    let error = seen["login_error"].as_str().expect("a login error");
    assert!(
        error.contains("refused this key") && error.contains("wrong key"),
        "{seen}"
    );
    assert_eq!(seen["board_shown_after_wrong_key"], false, "{seen}");
    assert_eq!(
        seen["kept_after_wrong_key"],
        serde_json::Value::Null,
        "{seen}"
    );
    // The admin key: every replica, worst first, the key in the tab's sessionStorage
    // only, never in the URL.
    assert_eq!(
        seen["replicas"],
        serde_json::json!(["acme/legacy.db", "acme/app.db", "acme/eu/users.db"]),
        "{seen}"
    );
    assert_eq!(seen["health"], "fresh", "{seen}");
    assert_eq!(
        seen["healths"],
        serde_json::json!({
            "failing": "Cannot read the replica's file · The last restore drill failed"
        }),
        "only the damaged replica is not fresh, and its drill failed too: {seen}"
    );
    assert_eq!(seen["version_count"], "3", "{seen}");
    assert_eq!(seen["subscribers"], "1 pull", "{seen}");
    assert!(
        seen["drill"]
            .as_str()
            .is_some_and(|d| d.starts_with("passed ")),
        "{seen}"
    );
    assert!(
        seen["stored"]
            .as_str()
            .is_some_and(|b| b.ends_with('B') && b != "—"),
        "{seen}"
    );
    assert!(
        // Version 3 was written beside the server, so the follower's lag is at least
        // its age, not 0.
        seen["followers"][0]
            .as_str()
            .is_some_and(|f| f.starts_with("v2 · lag ") && f != "v2 · lag 0 s"),
        "{seen}"
    );
    assert_eq!(seen["failing_count"], "1", "{seen}");
    assert_eq!(seen["login_error_after_sign_in"], "", "{seen}");
    assert_eq!(seen["session_key_kept"], true, "{seen}");
    let url = seen["url"].as_str().expect("a URL");
    assert!(!url.contains(key) && !url.contains('?'), "{url}");
    let local = seen["local_storage"].as_str().expect("localStorage");
    assert!(
        !local.contains(key),
        "the key is never in localStorage: {local}"
    );

    // Sync now reached the subscriber, which pulled version 3 into its file.
    assert_eq!(seen["sync_result"], "Reached 1 subscriber", "{seen}");
    pull.expect(&["pull (sync-now): version 3"]);
    assert!(
        util::wait_until(PULL_TIMEOUT, Duration::from_millis(20), || max_id(
            &follower.path("replica.db")
        ) == 30),
        "the replica file has version 3's rows; it has {}",
        max_id(&follower.path("replica.db"))
    );
    assert_eq!(util::integrity(&follower.path("replica.db")), "ok");
    assert_eq!(
        seen["version_rows"],
        serde_json::json!(["3", "2", "1"]),
        "{seen}"
    );

    assert_eq!(pull.stop(), 0, "{}", pull.output());
}
