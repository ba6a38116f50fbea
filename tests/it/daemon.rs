//! `sqlferry daemon` as a service runs it: a real daemon process with a configuration
//! file of several databases, destinations on a real server and local copies, a watched
//! directory, SIGHUP reloads (good and bad files), a database that fails, systemd's
//! readiness datagrams, and SIGTERM.
//!
//! Every wait is on a line the daemon prints (or a datagram it sends), with a deadline.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;

use crate::server::{EXIT_USAGE, Machine, TestServer, signal};
use crate::subscribe::{Subscriber, commit_rows, max_id, writer_db};
use crate::util;

/// The configuration the test starts with: three databases (one of them pushed to the
/// server and copied), a fourth that does not exist yet, and a watched directory.
/// Every unit pushes at the first commit (`max_changes = 1`).
fn config(url: &str, extra: &str) -> String {
    format!(
        r#"# the daemon test's configuration
[defaults]
server = "{url}"
key_env = "SQLFERRY_KEY"
wait_idle = "10s"
max_changes = 1
poll = "1s"

[[push]]
database = "dbs/a.db"
to = ["acme/a.db", "./copies/a.db"]

[[push]]
database = "dbs/b.db"
to = ["acme/b.db"]

[[push]]
database = "dbs/c.db"
to = ["acme/c.db"]

[[push]]
database = "dbs/late.db"
to = ["acme/late.db"]

[[directory]]
path = "tenants"
namespace = "tenants"
{extra}"#
    )
}

/// The rows of the replica's latest version, pulled into a fresh file of `m`.
fn latest_rows(m: &Machine, server: &TestServer, replica: &str, into: &str) -> u64 {
    let out = m.run_on(
        server,
        ["pull", replica, into, "--key", &server.admin_key, "--force"],
    );
    assert_eq!(
        util::code(&out),
        0,
        "pull {replica}: {}",
        util::stderr(&out)
    );
    let path = m.path(into);
    assert_eq!(util::integrity(&path), "ok");
    max_id(&path)
}

#[test]
fn a_daemon_pushes_many_databases_reloads_and_stops_cleanly() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path());
    let mut m = Machine::new(dir.path(), "host");
    m.set_env("SQLFERRY_KEY", &server.admin_key);
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    m.set_env("NOTIFY_SOCKET", notify_path.to_str().unwrap());
    for dir in ["dbs", "copies", "tenants"] {
        std::fs::create_dir_all(m.path(dir)).unwrap();
    }
    for db in [
        "dbs/a.db",
        "dbs/b.db",
        "dbs/c.db",
        "tenants/t1.db",
        "tenants/t2.db",
    ] {
        writer_db(&m.path(db), 3);
    }
    let file = m.path("sqlferry.toml");
    std::fs::write(&file, config(&server.url, "")).unwrap();

    let mut daemon = Subscriber::start(&m, &["daemon", "--config", "sqlferry.toml"]);
    daemon.expect(&["config:", "6 subscribers starting"]);
    assert_eq!(datagram(&notify), "READY=1\nSTATUS=running");
    // Every unit at once (their lines interleave); a database that does not exist fails
    // on its own and is tried again, the others run on.
    daemon.expect_all(&[
        &["dbs/a.db -> acme/a.db", "push (start): version 1"],
        &["dbs/a.db -> ", "push (start): copy updated"],
        &["dbs/b.db -> acme/b.db", "push (start): version 1"],
        &["dbs/c.db -> acme/c.db", "push (start): version 1"],
        &["tenants/t1.db -> tenants/t1.db", "push (start): version 1"],
        &["tenants/t2.db -> tenants/t2.db", "push (start): version 1"],
        &[
            "dbs/late.db -> acme/late.db",
            "failed:",
            "starting again in",
        ],
    ]);
    // Once it exists, the next attempt pushes it.
    writer_db(&m.path("dbs/late.db"), 7);
    daemon.expect(&["dbs/late.db -> acme/late.db", "push (start): version 1"]);

    // Two databases change: both replicas, and a.db's copy, follow.
    commit_rows(&m.path("dbs/a.db"), 4..=5);
    commit_rows(&m.path("dbs/c.db"), 4..=9);
    daemon.expect_all(&[
        &["dbs/a.db -> acme/a.db", "version 2"],
        &["dbs/c.db -> acme/c.db", "version 2"],
        &["dbs/a.db -> ", "copy updated"],
    ]);
    assert_eq!(latest_rows(&m, &server, "acme/a.db", "check-a.db"), 5);
    assert_eq!(latest_rows(&m, &server, "acme/c.db", "check-c.db"), 9);
    assert_eq!(latest_rows(&m, &server, "acme/b.db", "check-b.db"), 3);
    assert_eq!(
        util::digest(&m.path("copies/a.db")),
        util::digest(&m.path("dbs/a.db"))
    );
    assert_eq!(server.version_numbers("acme/b.db"), [1], "b did not change");

    // A new database in the watched directory is found and pushed.
    writer_db(&m.path("tenants/t3.db"), 2);
    daemon.expect_all(&[
        &["tenants/*.db: found", "t3.db"],
        &["tenants/t3.db -> tenants/t3.db", "push (start): version 1"],
    ]);

    // A bad file is refused with its line; everything keeps running.
    let bad = config(
        &server.url,
        "\n[[push]]\ndatabase = \"dbs/b.db\"\nto = \"acme/x.db\"\n",
    );
    let line = bad.lines().position(|l| l == "to = \"acme/x.db\"").unwrap() + 1;
    std::fs::write(&file, bad).unwrap();
    signal(daemon.child(), "HUP");
    let refused = daemon.expect(&["config: reload refused, nothing changed:"]);
    assert!(
        refused.contains(&format!("sqlferry.toml:{line}: invalid type: string")),
        "{refused}"
    );
    assert_eq!(datagram(&notify), "RELOADING=1");
    assert_eq!(datagram(&notify), "READY=1\nSTATUS=running");
    commit_rows(&m.path("dbs/b.db"), 4..=4);
    daemon.expect(&["dbs/b.db -> acme/b.db", "version 2"]);

    // A database that leaves the watched directory is dropped.
    std::fs::remove_file(m.path("tenants/t2.db")).unwrap();
    daemon.expect_all(&[
        &["tenants/*.db:", "t2.db is gone"],
        &[
            "tenants/t2.db -> tenants/t2.db",
            "stopped: the database left the directory",
        ],
    ]);

    // A good one: c.db removed, b.db's timing changed, a copy of b.db added, the rest
    // untouched.
    let good = config(
        &server.url,
        "\n[[push]]\ndatabase = \"dbs/b.db\"\nto = [\"./copies/b.db\"]\n",
    )
    .replace(
        "[[push]]\ndatabase = \"dbs/c.db\"\nto = [\"acme/c.db\"]\n",
        "",
    )
    .replace(
        "to = [\"acme/b.db\"]\n",
        "to = [\"acme/b.db\"]\nmax_changes = 2\n",
    );
    std::fs::write(&file, good).unwrap();
    signal(daemon.child(), "HUP");
    daemon.expect_all(&[
        &["reloaded: 1 added, 1 removed, 1 changed, 4 unchanged"],
        &["dbs/b.db -> ", "copies/b.db", "push (start): copy updated"],
        &[
            "dbs/c.db -> acme/c.db",
            "stopped: removed from the configuration",
        ],
        &[
            "dbs/c.db -> acme/c.db",
            "stopped: every change seen is pushed",
        ],
        &[
            "dbs/b.db -> acme/b.db",
            "push subscriber:",
            "at once after 2 commits",
        ],
    ]);
    assert_eq!(datagram(&notify), "RELOADING=1");
    assert_eq!(datagram(&notify), "READY=1\nSTATUS=running");
    commit_rows(&m.path("dbs/c.db"), 10..=10);
    commit_rows(&m.path("dbs/a.db"), 6..=6);
    daemon.expect(&["dbs/a.db -> acme/a.db", "version 3"]);

    // SIGTERM: every unit stops after pushing what it saw; exit 0.
    assert_eq!(daemon.stop(), 0, "{}", daemon.output());
    let output = daemon.output();
    assert!(
        output.contains("daemon stopped (asked to): every change seen is pushed"),
        "{output}"
    );
    assert_eq!(datagram(&notify), "STOPPING=1");
    assert_eq!(
        server.version_numbers("acme/c.db"),
        [1, 2],
        "c.db left the configuration before its last commit"
    );
    assert_eq!(latest_rows(&m, &server, "acme/a.db", "check-a.db"), 6);
    assert!(!output.contains("panicked"), "{output}");

    // What the daemon did is in the sync log: `status --from SIDECAR` (the sidecar the
    // first push wrote) shows a.db's pushes.
    let out = m.run(["status", "--from", "dbs/a.db-sqlferry", "--json"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let status: serde_json::Value = serde_json::from_str(&util::stdout(&out)).unwrap();
    assert!(
        status
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["replica"] == "acme/a.db"),
        "{status}"
    );
    let out = m.run(["status", "--from", "dbs/nope.db-sqlferry"]);
    assert_eq!(util::code(&out), EXIT_USAGE, "{}", util::stderr(&out));
}

/// The next datagram on the notify socket, as text.
fn datagram(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("a datagram from the daemon");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn daemon_check_prints_what_it_would_run_and_refuses_a_bad_file_with_its_line() {
    let dir = TempDir::new().unwrap();
    let m = Machine::new(dir.path(), "host");
    let file = m.path("d.toml");
    std::fs::write(
        &file,
        "[defaults]\nwait_idle = \"1m\"\n\n[[push]]\ndatabase = \"app.db\"\n\
         to = [\"acme/app.db\", \"/backup/app.db\"]\nmax_interval = \"1h\"\n\n\
         [[pull]]\nreplica = \"acme/other.db\"\ninto = \"other.db\"\n",
    )
    .unwrap();
    let out = m.run(["daemon", "--config", "d.toml", "--check"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let text = util::stdout(&out);
    let work = m.work.display();
    assert!(
        text.contains(&format!(
            "push {work}/app.db -> acme/app.db, after 1m idle, at most every 30m, at least every 1h while changing"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("push {work}/app.db -> /backup/app.db")),
        "{text}"
    );
    assert!(
        text.contains(&format!("pull acme/other.db -> {work}/other.db")),
        "{text}"
    );
    assert!(text.contains("3 subscribers"), "{text}");
    assert!(
        !Path::new(&m.path("app.db")).exists(),
        "--check creates nothing"
    );

    std::fs::write(&file, "[defaults]\nwait_idle = \"1m\"\nmax_interval = \"30s\"\n[[push]]\ndatabase = \"app.db\"\nto = [\"app.db\"]\n").unwrap();
    let out = m.run(["daemon", "--config", "d.toml", "--check"]);
    assert_eq!(util::code(&out), EXIT_USAGE);
    let err = util::stderr(&out);
    assert!(
        err.contains("d.toml:4: [[push]]") && err.contains("invalid replica path"),
        "{err}"
    );
    // The same file refused at the start of a real daemon: nothing runs, exit 2.
    let out = m.run(["daemon", "--config", "d.toml"]);
    assert_eq!(util::code(&out), EXIT_USAGE, "{}", util::stderr(&out));
    assert!(
        util::stderr(&out).starts_with("sqlferry: error: "),
        "{}",
        util::stderr(&out)
    );
}

#[test]
fn daemon_examples_are_printed_and_the_config_one_checks() {
    let dir = TempDir::new().unwrap();
    let mut m = Machine::new(dir.path(), "host");
    m.set_env("SQLFERRY_KEY", "sfk_example");
    m.set_env("OFFSITE_KEY", "sfk_offsite");
    for (what, first) in [
        ("config", "# sqlferry daemon configuration"),
        ("systemd", "# systemd unit for `sqlferry daemon`"),
        ("cron", "# One-off backups from cron"),
    ] {
        let out = m.run(["daemon", "--example", what]);
        assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
        assert!(util::stdout(&out).starts_with(first), "{what}");
    }
    let out = m.run(["daemon", "--example", "config"]);
    std::fs::write(m.path("example.toml"), util::stdout(&out)).unwrap();
    let out = m.run(["daemon", "--config", "example.toml", "--check"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(
        util::stdout(&out).contains("6 subscribers"),
        "{}",
        util::stdout(&out)
    );
    // The unit file's Type=notify and reload line are what the daemon speaks.
    let out = m.run(["daemon", "--example", "systemd"]);
    let unit = util::stdout(&out);
    assert!(unit.contains("Type=notify") && unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
}
