//! `sqlferry serve --tls-cert --tls-key`, with a private CA and a server certificate
//! for `localhost` and `127.0.0.1` made in the test (rcgen). A client that trusts the CA
//! (`SQLFERRY_CA_FILE`) pushes and pulls over `wss://` and reads the API over
//! `https://`; a client that does not, or that speaks plain `ws://`, fails with exit 4
//! and one line saying why, and changes nothing on either side; a client that never
//! finishes its handshake holds up no one. Bad certificate or key files stop `serve`
//! before it creates anything.
//!
//! One test waits out the server's 10 s handshake limit on a stalled connection (it
//! reads until the server closes it: an event, not a sleep).

use std::io::Read;
use std::net::TcpStream as StdTcpStream;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    DbState, EXIT_NETWORK, Machine, TestServer, assert_fails, sidecar_field, small_db,
    wait_for_exit,
};
use crate::util;

/// Exit code: a local file (a certificate, a key, a CA file) cannot be used.
const EXIT_LOCAL: i32 = 3;

/// How long a test waits for something the server does at once (a log line, `serve`
/// refusing its flags); it only bounds a failing test.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// PEM files in a test's directory: a private CA, and a server certificate it signed
/// for `localhost` and `127.0.0.1` with its private key (PKCS#8).
#[derive(Debug, Clone)]
pub struct Certs {
    /// The CA's certificate: what a client trusts through `SQLFERRY_CA_FILE`.
    pub ca: PathBuf,
    /// The server's certificate chain (its own certificate, then the CA's).
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
}

impl Certs {
    /// Makes a CA and a server certificate, and writes them to `dir/tls/`.
    pub fn make(dir: &Path) -> Certs {
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls).expect("tls dir");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "sqlferry test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");

        let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &ca).expect("server certificate");

        let certs = Certs {
            ca: tls.join("ca.pem"),
            cert: tls.join("cert.pem"),
            key: tls.join("key.pem"),
        };
        std::fs::write(&certs.ca, ca.pem()).expect("write ca.pem");
        std::fs::write(&certs.cert, format!("{}{}", cert.pem(), ca.pem())).expect("cert.pem");
        std::fs::write(&certs.key, key.serialize_pem()).expect("write key.pem");
        certs
    }
}

/// `GET path` over HTTPS to `addr`, checking the certificate for `name` against the CA
/// at `ca`; the whole response (head and body) as text.
fn https_get(addr: &str, name: &str, ca: &Path, path: &str) -> String {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read ca.pem") {
        roots.add(cert.expect("a PEM certificate")).expect("a CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let server_name = ServerName::try_from(name.to_owned()).expect("a server name");
    super::raw::runtime().block_on(async {
        tokio::time::timeout(EVENT_TIMEOUT, async {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(server_name, tcp)
                .await
                .expect("TLS handshake");
            let request =
                format!("GET {path} HTTP/1.1\r\nhost: {name}\r\nconnection: close\r\n\r\n");
            tls.write_all(request.as_bytes()).await.expect("send");
            let mut response = Vec::new();
            tls.read_to_end(&mut response).await.expect("read");
            String::from_utf8(response).expect("UTF-8 response")
        })
        .await
        .expect("the server answers in time")
    })
}

/// `sqlferry serve ARGS` on `machine`, which must exit (with an error) within
/// [`EVENT_TIMEOUT`] instead of serving.
fn serve_refused(machine: &Machine, args: &[&Path]) -> Output {
    let mut child = machine
        .command()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sqlferry serve");
    if wait_for_exit(&mut child, EVENT_TIMEOUT).is_none() {
        let _ = child.kill();
        let out = child.wait_with_output().expect("output");
        panic!(
            "serve {args:?} kept running: {}{}",
            util::stdout(&out),
            util::stderr(&out)
        );
    }
    child.wait_with_output().expect("output")
}

#[test]
fn a_client_trusting_the_ca_pushes_and_pulls_over_wss() {
    let dir = TempDir::new().expect("tempdir");
    let certs = Certs::make(dir.path());
    let server = TestServer::start_tls(dir.path(), &certs);
    assert!(server.url.starts_with("wss://127.0.0.1:"), "{}", server.url);

    let mut a = Machine::new(dir.path(), "a");
    a.trust(&certs);
    let src = a.path("app.db");
    small_db(&src, 1 << 20);
    let state = DbState::of(&src);
    let r = a.push(
        &server,
        "app.db",
        "acme/app.db",
        &["-m", "over TLS", "--key", &server.admin_key],
    );
    assert_eq!(r.u64("version"), 1);
    assert_eq!(r.digest(), state.digest);
    let versions = server.versions("acme/app.db").expect("the replica exists");
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0].message, "over TLS");
    assert_eq!(versions[0].digest, state.digest);

    // The sidecar names the wss:// server; run on machine B, which trusts the same CA,
    // it pulls the version into a new database there.
    let sidecar = a.path("app.db-sqlferry");
    assert_eq!(sidecar_field(&sidecar, "server"), server.url);
    let mut b = Machine::new(dir.path(), "b");
    b.trust(&certs);
    std::fs::copy(&sidecar, b.path("app.db-sqlferry")).expect("copy the sidecar");
    let out = b.run(["pull", "--from", "app.db-sqlferry", "--json"]);
    assert_eq!(util::code(&out), 0, "pull: {}", util::stderr(&out));
    state.assert_held_by(&b.path("app.db"), "pulled over wss://");
    // And through `localhost`, the certificate's other name, into another file.
    let out = b.run([
        "pull",
        "acme/app.db",
        "copy.db",
        "--server",
        &server.url.replace("127.0.0.1", "localhost"),
        "--key",
        &server.admin_key,
    ]);
    assert_eq!(util::code(&out), 0, "pull: {}", util::stderr(&out));
    state.assert_held_by(&b.path("copy.db"), "pulled from wss://localhost");
}

#[test]
fn the_api_answers_over_https_for_both_names_of_the_certificate() {
    let dir = TempDir::new().expect("tempdir");
    let certs = Certs::make(dir.path());
    let server = TestServer::start_tls(dir.path(), &certs);
    for name in ["127.0.0.1", "localhost"] {
        let response = https_get(server.addr(), name, &certs.ca, "/api/health");
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        let (_, body) = response.split_once("\r\n\r\n").expect("a body");
        let body: serde_json::Value = serde_json::from_str(body).expect("JSON body");
        assert_eq!(body["status"], "ok", "{body}");
    }
}

#[test]
fn a_client_that_does_not_trust_the_certificate_fails_and_changes_nothing() {
    let dir = TempDir::new().expect("tempdir");
    let certs = Certs::make(dir.path());
    let server = TestServer::start_tls(dir.path(), &certs);
    let a = Machine::new(dir.path(), "a");
    let src = a.path("app.db");
    small_db(&src, 256 << 10);
    let before = (a.state(), DbState::of(&src).digest);

    let out = a.run_on(
        &server,
        ["push", "app.db", "acme/app.db", "--key", &server.admin_key],
    );
    let line = assert_fails(
        &out,
        EXIT_NETWORK,
        &format!(
            "cannot reach {}: invalid peer certificate: UnknownIssuer",
            server.url
        ),
    );
    assert!(line.contains("set SQLFERRY_CA_FILE"), "{line}");
    assert_eq!((a.state(), DbState::of(&src).digest), before);
    assert!(!a.path("app.db-sqlferry").exists(), "no sidecar");
    assert_eq!(server.versions("acme/app.db"), None, "no replica");
    assert_eq!(server.replica_files(), Vec::<PathBuf>::new());
    assert!(
        util::wait_until(EVENT_TIMEOUT, Duration::from_millis(10), || {
            server.log().contains("TLS handshake failed")
        }),
        "the server logs the failed handshake: {}",
        server.log()
    );

    // `versions` and `pull` fail the same way; the pull creates no file.
    let out = a.run_on(
        &server,
        ["versions", "acme/app.db", "--key", &server.admin_key],
    );
    assert_fails(
        &out,
        EXIT_NETWORK,
        "invalid peer certificate: UnknownIssuer",
    );
    let out = a.run_on(
        &server,
        ["pull", "acme/app.db", "copy.db", "--key", &server.admin_key],
    );
    assert_fails(
        &out,
        EXIT_NETWORK,
        "invalid peer certificate: UnknownIssuer",
    );
    assert!(!a.path("copy.db").exists());

    // A CA file that cannot be read is a local problem, named.
    let mut b = Machine::new(dir.path(), "b");
    let missing = dir.path().join("no-such-ca.pem");
    b.set_env("SQLFERRY_CA_FILE", missing.to_str().expect("UTF-8"));
    std::fs::copy(&src, b.path("app.db")).expect("copy");
    let out = b.run_on(
        &server,
        ["push", "app.db", "acme/app.db", "--key", &server.admin_key],
    );
    let line = assert_fails(&out, EXIT_LOCAL, &missing.display().to_string());
    assert!(line.contains("SQLFERRY_CA_FILE"), "{line}");
    assert_eq!(server.versions("acme/app.db"), None, "no replica");
}

#[test]
fn plain_clients_and_stalled_handshakes_do_not_stop_the_server() {
    let dir = TempDir::new().expect("tempdir");
    let certs = Certs::make(dir.path());
    let server = TestServer::start_tls(dir.path(), &certs);
    let mut a = Machine::new(dir.path(), "a");
    a.trust(&certs);
    let src = a.path("app.db");
    small_db(&src, 256 << 10);
    // A client that connects and never starts its handshake.
    let mut stalled = StdTcpStream::connect(server.addr()).expect("connect");

    // Plain ws:// on the TLS port: the answer is a TLS alert, not HTTP.
    let plain = format!("ws://{}", server.addr());
    let out = a.run([
        "push",
        "app.db",
        "acme/app.db",
        "--server",
        &plain,
        "--key",
        &server.admin_key,
    ]);
    let line = assert_fails(&out, EXIT_NETWORK, &format!("cannot reach {plain}"));
    assert!(line.contains("use wss://"), "{line}");
    assert_eq!(server.versions("acme/app.db"), None, "no replica");

    // The stalled client holds up no one: the wss:// push goes through while the server
    // still waits for that handshake (its connection is open, not timed out and closed,
    // as it would be had the push waited its turn).
    let state = DbState::of(&src);
    let r = a.push(
        &server,
        "app.db",
        "acme/app.db",
        &["--key", &server.admin_key],
    );
    assert_eq!((r.u64("version"), r.digest()), (1, state.digest.as_str()));
    assert_eq!(server.version_numbers("acme/app.db"), vec![1]);
    stalled.set_nonblocking(true).expect("nonblocking");
    let mut byte = [0u8; 1];
    match stalled.read(&mut byte) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the stalled connection ended before the push was served: {other:?}"),
    }

    // The other way round: wss:// against a plain server fails cleanly too.
    let plain_dir = dir.path().join("plain");
    std::fs::create_dir(&plain_dir).expect("dir");
    let plain_server = TestServer::start(&plain_dir);
    let out = a.run([
        "push",
        "app.db",
        "other/app.db",
        "--server",
        &format!("wss://{}", plain_server.addr()),
        "--key",
        &plain_server.admin_key,
    ]);
    let line = assert_fails(
        &out,
        EXIT_NETWORK,
        &format!("cannot reach wss://{}", plain_server.addr()),
    );
    assert!(
        line.contains("if the server does not use TLS, use ws://"),
        "{line}"
    );
    assert_eq!(plain_server.versions("other/app.db"), None, "no replica");

    // That the stalled handshake is then given up after 10 s (HEAD_TIMEOUT), the
    // server closing it and logging why, is checked in paused time:
    // `server::timing::a_stalled_tls_handshake_is_closed_after_10_s`.
    drop(stalled);
}

#[test]
fn serve_refuses_certificate_and_key_files_it_cannot_use() {
    let dir = TempDir::new().expect("tempdir");
    let certs = Certs::make(dir.path());
    let m = Machine::new(dir.path(), "server");
    let data = dir.path().join("data");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").expect("write");
    let missing = dir.path().join("missing-key.pem");
    let other_key = dir.path().join("other-key.pem");
    std::fs::write(
        &other_key,
        KeyPair::generate().expect("key").serialize_pem(),
    )
    .expect("write");
    let flags = |cert: &Path, key: &Path| -> Vec<PathBuf> {
        [
            Path::new("--data"),
            &data,
            Path::new("--tls-cert"),
            cert,
            Path::new("--tls-key"),
            key,
        ]
        .iter()
        .map(|p| p.to_path_buf())
        .collect()
    };
    let cases: [(Vec<PathBuf>, String); 4] = [
        (
            flags(&certs.cert, &missing),
            format!("cannot set up TLS: {}: No such file", missing.display()),
        ),
        (
            flags(&garbage, &certs.key),
            format!("{}: no certificate in it", garbage.display()),
        ),
        (
            flags(&certs.cert, &certs.cert),
            format!("{}: no private key in it", certs.cert.display()),
        ),
        (
            flags(&certs.cert, &other_key),
            format!(
                "{}: cannot be used with the certificate in {}",
                other_key.display(),
                certs.cert.display()
            ),
        ),
    ];
    for (args, phrase) in cases {
        let args: Vec<&Path> = args.iter().map(PathBuf::as_path).collect();
        let out = serve_refused(&m, &args);
        assert_fails(&out, EXIT_LOCAL, &phrase);
        assert!(!data.exists(), "nothing created for {args:?}");
    }

    // One without the other is a usage error.
    let out = serve_refused(
        &m,
        &[
            Path::new("--data"),
            &data,
            Path::new("--tls-cert"),
            &certs.cert,
        ],
    );
    assert_eq!(util::code(&out), 2, "{}", util::stderr(&out));
    assert!(
        util::stderr(&out).contains("--tls-key"),
        "{}",
        util::stderr(&out)
    );
    assert!(!data.exists());
}

#[test]
fn serve_help_teaches_tls() {
    let dir = TempDir::new().expect("tempdir");
    let out = util::run(
        dir.path(),
        &[
            std::ffi::OsStr::new("serve"),
            std::ffi::OsStr::new("--help"),
        ],
    );
    assert_eq!(util::code(&out), 0);
    let help = util::stdout(&out);
    for phrase in [
        "--tls-cert <CERT.pem>",
        "--tls-key <KEY.pem>",
        "--tls-cert cert.pem --tls-key key.pem",
        "wss://",
        "SQLFERRY_CA_FILE",
        "reverse proxy",
    ] {
        assert!(
            help.contains(phrase),
            "serve --help names {phrase:?}:\n{help}"
        );
    }
}
