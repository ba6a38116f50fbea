//! The house rules of issue 9 that a grep or a process can check: one tokio runtime,
//! built by the command line, and one signal handler, which turns SIGINT and SIGTERM
//! into the one shutdown (a one-shot command then stops at once, exit 130).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::server::{signal, wait_for_exit};
use crate::util;

/// What builds or enters a runtime of its own.
const RUNTIME_BUILDERS: [&str; 4] = [
    "Runtime::new",
    "Builder::new_multi_thread",
    "Builder::new_current_thread",
    "block_on(",
];

/// The one place a runtime is built.
const THE_RUNTIME: &str = "src/cli.rs";

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

#[test]
fn no_runtime_is_built_below_the_command_line() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    assert!(files.len() > 20, "src/ was found: {files:?}");
    let mut offences = Vec::new();
    for path in files {
        let name = path
            .strip_prefix(root)
            .expect("under the crate")
            .to_string_lossy()
            .into_owned();
        if name == THE_RUNTIME {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read a source file");
        // Unit tests build runtimes of their own; they sit at the end of each file.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (n, line) in code.lines().enumerate() {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            if let Some(what) = RUNTIME_BUILDERS.iter().find(|b| line.contains(*b)) {
                offences.push(format!("{name}:{}: {what}", n + 1));
            }
        }
    }
    assert!(
        offences.is_empty(),
        "only {THE_RUNTIME} builds a runtime; the library awaits on it:\n{}",
        offences.join("\n")
    );
}

#[test]
fn a_one_shot_command_stopped_by_a_signal_exits_130_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // A "server" that accepts and never answers: the command waits for the upgrade's
    // answer (up to its 30 s connect limit) when the signal comes.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    silent.set_nonblocking(true).unwrap();
    let url = format!("ws://{}", silent.local_addr().unwrap());
    let mut child = util::sqlferry(dir.path())
        .args(["versions", "acme/app.db", "--server", &url, "--key", "k"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sqlferry");
    // Connected: its runtime, and with it the signal handler, is up.
    let mut held = None;
    let connected = util::wait_until(Duration::from_secs(60), Duration::from_millis(5), || {
        held = silent.accept().ok();
        held.is_some()
    });
    assert!(connected, "sqlferry never connected");
    signal(&child, "INT");
    let status = wait_for_exit(&mut child, Duration::from_secs(25))
        .expect("stops at the signal, not at the connect limit");
    assert_eq!(status.code(), Some(130), "{status}");
}
