//! The `sqlferry` binary: parse, set up logging, run, map the error to an exit code.
//!
//! Exit 1 is for bugs only. A panic on the main thread prints one line saying it is a
//! bug, with where it happened, and the command exits 1. A panic on another thread (a
//! tokio task, a blocking thread) reaches `run` as a task that failed
//! ([`sqlferry::Error::Bug`], carrying the panic's message), which prints the one error
//! line and maps to 1 as well; where it happened is logged at debug level (`-vv`), so
//! the failure still reads as one line.

use std::panic::AssertUnwindSafe;
use std::process::ExitCode;

use clap::FromArgMatches as _;
use sqlferry::cli::{Cli, error_line, exit, exit_code, init_tracing};

fn main() -> ExitCode {
    // One line instead of Rust's default panic text: what happened, where, and that it
    // is ours to fix.
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        if std::thread::current().name() == Some("main") {
            eprintln!(
                "sqlferry: error: a bug in sqlferry, please report it: panicked{location}: {message}"
            );
        } else {
            tracing::debug!(%location, %message, "a thread panicked");
        }
    }));
    let parsed = sqlferry::cli::command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        // A usage error, in the one style of every error line: clap's explanation,
        // tip and usage follow.
        Err(e) if e.use_stderr() => {
            let text = e.render().to_string();
            let text = text.strip_prefix("error: ").unwrap_or(&text);
            eprint!("sqlferry: error: {text}");
            return ExitCode::from(exit::USAGE);
        }
        // --help and --version: printed on stdout, exit 0.
        Err(e) => e.exit(),
    };
    init_tracing(&cli.global);
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        debug_panic("main");
        cli.run()
    }));
    match result {
        Ok(Ok(code)) => code,
        Ok(Err(err)) => {
            eprintln!("sqlferry: error: {}", error_line(&err));
            exit_code(&err)
        }
        // The hook has said what and where.
        Err(_) => ExitCode::from(exit::FAILURE),
    }
}

/// Debug builds only: panics when `SQLFERRY_DEBUG_PANIC` names `place`, so the tests
/// can prove that a panic exits 1 and says it is a bug. Release builds ignore it.
fn debug_panic(place: &str) {
    if cfg!(debug_assertions) && std::env::var("SQLFERRY_DEBUG_PANIC").is_ok_and(|p| p == place) {
        panic!("SQLFERRY_DEBUG_PANIC={place}");
    }
}
