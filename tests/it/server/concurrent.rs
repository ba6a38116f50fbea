//! Many clients at once: two machines pushing different content to one replica from
//! the same version (one version lands, the other is told VERSION_CONFLICT with the
//! latest version, and `--force` then replaces it), and twenty pulls of one version
//! while a push lands.

use std::process::{Child, Output, Stdio};

use tempfile::TempDir;

use super::{DbState, EXIT_CONFLICT, Machine, Report, TestServer, exec, saved_push_key, small_db};
use crate::util;

fn spawn(m: &Machine, server: &TestServer, args: &[&str]) -> Child {
    m.command()
        .args(args)
        .args(["--server", &server.url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sqlferry")
}

fn finish(child: Child) -> Output {
    child.wait_with_output().expect("wait for sqlferry")
}

#[test]
fn two_pushers_from_one_version_one_lands_the_other_gets_version_conflict() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let mut a = Machine::new(dir.path(), "a");
    let mut b = Machine::new(dir.path(), "b");
    let c = Machine::new(dir.path(), "c");
    small_db(&a.path("app.db"), 1 << 20);
    a.push(
        &server,
        "app.db",
        "acme/app.db",
        &["--key", &server.admin_key],
    );
    // Both machines push with the replica's PUSH key; B starts from a pull.
    let push_key = saved_push_key(&a, &a.path("app.db"));
    a.set_env("SQLFERRY_KEY", &push_key);
    b.set_env("SQLFERRY_KEY", &push_key);
    b.pull(&server, "acme/app.db", None, &[]);

    // Three rounds: the interleaving differs from run to run; the outcome may not.
    for round in 1..=3u64 {
        let base = round;
        exec(
            &a.path("app.db"),
            &format!(
                "UPDATE t SET v = randomblob(300) WHERE id % 3 = {}",
                round % 3
            ),
        );
        exec(
            &b.path("app.db"),
            "DELETE FROM t WHERE id IN (SELECT id FROM t ORDER BY random() LIMIT 300);
             INSERT INTO t(k, v) SELECT hex(randomblob(8)), randomblob(300) FROM t LIMIT 300;",
        );
        let states = [
            DbState::of(&a.path("app.db")),
            DbState::of(&b.path("app.db")),
        ];
        assert_ne!(states[0].digest, states[1].digest);
        let args = ["push", "app.db", "acme/app.db", "--json"];
        let pushes = [spawn(&a, &server, &args), spawn(&b, &server, &args)];
        let outs = pushes.map(finish);

        let codes: Vec<i32> = outs.iter().map(util::code).collect();
        let winner = match codes.as_slice() {
            [0, EXIT_CONFLICT] => 0,
            [EXIT_CONFLICT, 0] => 1,
            _ => panic!(
                "round {round}: exit codes {codes:?}: {} / {}",
                util::stderr(&outs[0]),
                util::stderr(&outs[1])
            ),
        };
        let loser = 1 - winner;
        let r = Report::of(&outs[winner], "winning push");
        assert_eq!(r.u64("version"), base + 1, "round {round}");
        assert_eq!(r.digest(), states[winner].digest);
        let err = util::stderr(&outs[loser]);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("VERSION_CONFLICT")
                && err.contains(&format!("acme/app.db is at version {}", base + 1))
                && err.contains(&format!("based on version {base}"))
                && err.contains("--force")
                && err.contains("into another file")
                && !err.contains("pull first"),
            "round {round}: {err}"
        );
        assert!(outs[loser].stdout.is_empty());

        // One version landed, and it is the winner's; the loser's file is untouched.
        let versions = server.versions("acme/app.db").expect("exists");
        assert_eq!(versions.len() as u64, base + 1, "round {round}");
        assert_eq!(versions[base as usize].digest, states[winner].digest);
        let machines = [&a, &b];
        assert_eq!(
            util::digest(&machines[loser].path("app.db")),
            states[loser].digest
        );
        let r = c.pull(
            &server,
            "acme/app.db",
            Some("latest.db"),
            &["--key", &push_key],
        );
        assert_eq!(r.u64("version"), base + 1);
        states[winner].assert_held_by(&c.path("latest.db"), "the pulled winner");

        // The loser catches up for the next round, discarding its changes knowingly: a
        // plain pull refuses to overwrite them (exit 9).
        let out = machines[loser].run_on(&server, ["pull", "acme/app.db"]);
        assert_eq!(util::code(&out), 9, "{}", util::stderr(&out));
        machines[loser].pull(&server, "acme/app.db", None, &["--force"]);
        states[winner].assert_held_by(&machines[loser].path("app.db"), "the loser, pulled");
    }

    // --force makes a copy based on an old version the new latest version anyway.
    exec(&b.path("app.db"), "DELETE FROM t WHERE id % 2 = 0");
    let b_state = DbState::of(&b.path("app.db"));
    exec(&a.path("app.db"), "DELETE FROM t WHERE id % 2 = 1");
    a.push(&server, "app.db", "acme/app.db", &[]);
    let out = b.run_on(&server, ["push", "app.db", "acme/app.db"]);
    assert_eq!(util::code(&out), EXIT_CONFLICT, "{}", util::stderr(&out));
    let r = b.push(&server, "app.db", "acme/app.db", &["--force"]);
    assert_eq!((r.u64("version"), r.digest()), (6, b_state.digest.as_str()));
    c.pull(
        &server,
        "acme/app.db",
        Some("latest.db"),
        &["--key", &push_key],
    );
    b_state.assert_held_by(&c.path("latest.db"), "the forced version");
}

#[test]
fn twenty_concurrent_pulls_of_one_version_all_get_it_whole() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let a = Machine::new(dir.path(), "a");
    let src = a.path("app.db");
    small_db(&src, 2 << 20);
    let s1 = DbState::of(&src);
    a.push(
        &server,
        "app.db",
        "acme/app.db",
        &["--key", &server.admin_key],
    );
    let mut p = Machine::new(dir.path(), "p");
    p.set_env("SQLFERRY_KEY", &server.admin_key);

    let names: Vec<String> = (0..20).map(|i| format!("copy{i}.db")).collect();
    let pulls: Vec<Child> = names
        .iter()
        .map(|n| spawn(&p, &server, &["pull", "acme/app.db@1", n, "--json"]))
        .collect();
    // A push lands meanwhile: the pulls asked for version 1 and get it.
    exec(&src, "UPDATE t SET v = randomblob(300) WHERE id < 100");
    let r = a.push(&server, "app.db", "acme/app.db", &[]);
    assert_eq!(r.u64("version"), 2);

    for (name, child) in names.iter().zip(pulls) {
        let r = Report::of(&finish(child), name);
        assert_eq!(r.u64("version"), 1, "{name}");
        assert_eq!(r.digest(), s1.digest, "{name}");
        s1.assert_held_by(&p.path(name), name);
    }
}
