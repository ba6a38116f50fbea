//! A server is known by its id, not by the spelling of its URL, and a sidecar runs
//! without `sqlferry` on PATH: real `sqlferry serve` processes, real `sqlferry`
//! commands on their own machines, and what a user checks (exit codes, rows, digests,
//! the secrets file, `GET /api/health`).
//!
//! - A key saved by a push to `ws://127.0.0.1:P` is found by a push and a pull to
//!   `ws://localhost:P` with no `--key`; another server on `localhost` does not get it.
//! - The server's id survives a restart on the same data directory.
//! - A secrets file an older sqlferry wrote (no ids) keeps working by URL, and learns
//!   the id at its next push.
//! - A sidecar runs with `PATH=/usr/bin:/bin` (no `sqlferry` there) through the binary
//!   that wrote it; one in the old format fails there with 127, as documented.
//! - `serve --help` holds what it used to send the reader to docs/server.md for.

use std::io::{Read as _, Write as _};
use std::path::Path;

use tempfile::TempDir;

use crate::server::{
    DbState, Machine, TestServer, assert_fails, exec, key_id, saved_push_key, small_db,
};
use crate::util;

/// Exit code: no key, or a key refused.
const EXIT_AUTH: i32 = 5;

/// The `server_id` of `GET /api/health` at `addr` (`127.0.0.1:PORT`), as `curl` shows it.
fn health_id(addr: &str) -> String {
    let mut tcp = std::net::TcpStream::connect(addr).expect("connect to the server");
    tcp.write_all(b"GET /api/health HTTP/1.0\r\nHost: test\r\n\r\n")
        .expect("send the request");
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).expect("read the answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("head and body");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    let v: serde_json::Value = serde_json::from_str(body).expect("JSON");
    let id = v["server_id"].as_str().expect("a server_id").to_owned();
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "32 hex digits: {id}"
    );
    id
}

/// The `localhost` spelling of a `ws://127.0.0.1:PORT` URL.
fn via_localhost(server: &TestServer) -> String {
    let url = server.url.replace("://127.0.0.1:", "://localhost:");
    assert_ne!(url, server.url, "the server listens on 127.0.0.1");
    url
}

/// The secrets file of `machine` as JSON.
fn secrets(machine: &Machine) -> serde_json::Value {
    let text = std::fs::read_to_string(machine.secrets_file()).expect("a secrets file");
    serde_json::from_str(&text).expect("the secrets file is JSON")
}

/// `sqlferry ARGS --json` on `machine`, asserted to succeed: its JSON report.
fn run_json(machine: &Machine, args: &[&str]) -> serde_json::Value {
    let out = machine.run(args.iter().chain(["--json"].iter()));
    assert_eq!(
        util::code(&out),
        0,
        "{args:?}: {}{}",
        util::stderr(&out),
        util::stdout(&out)
    );
    serde_json::from_str(util::stdout(&out).trim()).expect("one JSON object")
}

#[test]
fn a_key_saved_under_one_url_is_found_under_another_of_the_same_server() {
    let dir = TempDir::new().expect("tempdir");
    let mut server = TestServer::start(dir.path());
    let id = health_id(server.addr());
    let (by_ip, by_name) = (server.url.clone(), via_localhost(&server));
    let a = Machine::new(dir.path(), "a");
    let src = a.path("app.db");
    small_db(&src, 64 * 1024);

    // The first push, with the admin key, to 127.0.0.1: the PUSH key is saved with
    // the server's id.
    let r = run_json(
        &a,
        &[
            "push",
            "app.db",
            "acme/app.db",
            "--server",
            &by_ip,
            "--key",
            &server.admin_key,
        ],
    );
    assert_eq!(r["version"], 1);
    let entry = &secrets(&a)["databases"][src.to_str().expect("UTF-8")];
    assert_eq!(entry["server"], by_ip.as_str());
    assert_eq!(entry["server-id"], id.as_str(), "{entry}");
    let push_key = saved_push_key(&a, &src);

    // A change, pushed to localhost with no key: the saved PUSH key is found by the
    // server's id, and the base version too (no conflict).
    exec(&src, "UPDATE t SET v = randomblob(300) WHERE id = 3");
    let v2 = DbState::of(&src);
    let r = run_json(&a, &["push", "app.db", "acme/app.db", "--server", &by_name]);
    assert_eq!(r["version"], 2, "{r}");
    let list = server.versions("acme/app.db").expect("the replica exists");
    assert_eq!(list.len(), 2);
    assert_eq!(
        list[1].key_id,
        key_id(&push_key),
        "pushed with the saved PUSH key"
    );

    // A pull and `versions` through localhost find it too.
    run_json(
        &a,
        &["pull", "acme/app.db", "copy.db", "--server", &by_name],
    );
    v2.assert_held_by(&a.path("copy.db"), "pulled through localhost");
    let versions = run_json(&a, &["versions", "acme/app.db", "--server", &by_name]);
    assert_eq!(versions.as_array().map(Vec::len), Some(2), "{versions}");

    // Another server on localhost has another id: the key is not sent there.
    let other_dir = TempDir::new().expect("tempdir");
    let other = TestServer::in_process(other_dir.path());
    assert_ne!(health_id(other.addr()), id);
    let out = a.run([
        "push",
        "app.db",
        "acme/app.db",
        "--server",
        &via_localhost(&other),
    ]);
    assert_fails(&out, EXIT_AUTH, "no key for acme/app.db");
    assert!(
        other.versions("acme/app.db").is_none(),
        "nothing reached it"
    );

    // Restarted on the same data directory: the same id, and localhost still works.
    server.restart();
    assert_eq!(health_id(server.addr()), id, "the id survives a restart");
    exec(&src, "UPDATE t SET v = randomblob(300) WHERE id = 5");
    let v3 = DbState::of(&src);
    let r = run_json(&a, &["push", "app.db", "acme/app.db", "--server", &by_name]);
    assert_eq!(r["version"], 3, "{r}");
    // (A new file: a pull's record of what LOCAL was synced as is kept per URL, so
    // copy.db, pulled through localhost, is "never synced" with 127.0.0.1.)
    run_json(&a, &["pull", "acme/app.db", "copy3.db", "--server", &by_ip]);
    v3.assert_held_by(
        &a.path("copy3.db"),
        "pulled through 127.0.0.1 after the restart",
    );
}

#[test]
fn a_secrets_file_without_ids_matches_by_url_and_learns_the_id() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let id = health_id(server.addr());
    let (by_ip, by_name) = (server.url.clone(), via_localhost(&server));
    let a = Machine::new(dir.path(), "a");
    let src = a.path("app.db");
    small_db(&src, 32 * 1024);
    run_json(
        &a,
        &[
            "push",
            "app.db",
            "acme/app.db",
            "--server",
            &by_ip,
            "--key",
            &server.admin_key,
        ],
    );

    // What an older sqlferry wrote: the same entry without the id.
    let name = src.to_str().expect("UTF-8");
    let mut old = secrets(&a);
    let entry = old["databases"][name].as_object_mut().expect("the entry");
    assert!(entry.remove("server-id").is_some());
    std::fs::write(a.secrets_file(), old.to_string()).expect("write the old file");

    // Without the id, localhost finds nothing (and says how to go on) ...
    exec(&src, "UPDATE t SET v = randomblob(300) WHERE id = 2");
    let out = a.run(["push", "app.db", "acme/app.db", "--server", &by_name]);
    assert_fails(&out, EXIT_AUTH, "no key for acme/app.db");
    // ... the URL it was saved under still works, and that push writes the id in ...
    let r = run_json(&a, &["push", "app.db", "acme/app.db", "--server", &by_ip]);
    assert_eq!(r["version"], 2);
    let now = secrets(&a);
    assert_eq!(now["databases"][name]["server-id"], id.as_str(), "{now}");
    assert_eq!(
        now["databases"][name]["key"], old["databases"][name]["key"],
        "the key itself is kept"
    );
    // ... after which localhost finds the key.
    exec(&src, "UPDATE t SET v = randomblob(300) WHERE id = 4");
    let r = run_json(&a, &["push", "app.db", "acme/app.db", "--server", &by_name]);
    assert_eq!(r["version"], 3);
    assert_eq!(server.version_numbers("acme/app.db"), [1, 2, 3]);
}

#[test]
fn a_sidecar_runs_without_sqlferry_on_path() {
    // What `env -i PATH=/usr/bin:/bin` leaves: no sqlferry there (else this proves
    // nothing).
    for dir in ["/usr/bin", "/bin"] {
        assert!(
            !Path::new(dir).join("sqlferry").exists(),
            "{dir}/sqlferry exists: this test needs a PATH without sqlferry"
        );
    }
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let a = Machine::new(dir.path(), "a");
    let src = a.path("app.db");
    small_db(&src, 32 * 1024);
    let v1 = DbState::of(&src);
    run_json(
        &a,
        &[
            "push",
            "app.db",
            "acme/app.db",
            "--server",
            &server.url,
            "--key",
            &server.admin_key,
        ],
    );
    let sidecar = a.path("app.db-sqlferry");
    let text = std::fs::read_to_string(&sidecar).expect("the sidecar");
    let exe = Path::new(env!("CARGO_BIN_EXE_sqlferry"))
        .canonicalize()
        .expect("the binary");
    assert!(
        text.lines()
            .next()
            .is_some_and(|l| l.contains(exe.to_str().expect("UTF-8"))),
        "the interpreter line names the binary that wrote it:\n{text}"
    );

    // Machine B holds a copy and runs it with a PATH that has no sqlferry.
    let b = Machine::new(dir.path(), "b");
    let copied = b.path("app.db-sqlferry");
    std::fs::copy(&sidecar, &copied).expect("copy the sidecar");
    let out = b
        .command_of(&copied)
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("run the sidecar");
    assert_eq!(util::code(&out), 0, "sidecar: {}", util::stderr(&out));
    assert!(
        util::stdout(&out).contains("acme/app.db@1"),
        "{}",
        util::stdout(&out)
    );
    v1.assert_held_by(&b.path("app.db"), "pulled by running the sidecar");

    // The same file in the old format needs sqlferry on PATH: the shell's 127.
    let old = text.replacen(
        text.lines().next().expect("a first line"),
        "#!/usr/bin/env -S sqlferry pull --from",
        1,
    );
    let old_path = b.path("old.db-sqlferry");
    std::fs::write(&old_path, &old).expect("write the old sidecar");
    std::fs::set_permissions(
        &old_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("chmod");
    let out = b
        .command_of(&old_path)
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("run the old sidecar");
    assert_eq!(util::code(&out), 127, "{}", util::stderr(&out));
    assert!(!b.path("old.db").exists(), "nothing was pulled");
    // It still loads: `pull --from` reads it.
    let r = run_json(
        &b,
        &["pull", "--from", old_path.to_str().expect("UTF-8"), "@1"],
    );
    assert_eq!(r["version"], 1, "{r}");
    v1.assert_held_by(&b.path("old.db"), "pulled with --from an old sidecar");
}

#[test]
fn serve_help_carries_what_it_used_to_point_to_in_docs() {
    let dir = TempDir::new().expect("tempdir");
    let out = util::run(dir.path(), &["serve".as_ref(), "--help".as_ref()]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let help = util::stdout(&out);
    assert!(
        !help.contains("docs/"),
        "no pointer to a file an installed binary lacks:\n{help}"
    );
    for needed in [
        "openssl req -x509",
        "SQLFERRY_CA_FILE=ca.pem",
        "GET /api/replicas",
        "scrape_configs",
    ] {
        assert!(help.contains(needed), "{needed:?} in serve --help:\n{help}");
    }
}
