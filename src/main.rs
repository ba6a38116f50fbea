//! The `sqlferry` binary: parse, set up logging, run, map the error to an exit code.

use std::process::ExitCode;

use clap::Parser;
use sqlferry::cli::{Cli, error_line, exit_code, init_tracing};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.global);
    match cli.run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("sqlferry: error: {}", error_line(&err));
            exit_code(&err)
        }
    }
}
