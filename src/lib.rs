//! sqlferry pushes and pulls live SQLite databases page by page, checked end to end.
//!
//! The library holds everything; the `sqlferry` binary only parses its arguments, calls
//! [`cli::Cli::run`] and maps the error to an exit code. See `docs/` for the design, the
//! protocol and the exit codes.
//!
//! Modules: [`page`] reads and writes SQLite pages, [`protocol`] is the frame codec,
//! [`engine`] is the sync algorithm over any transport, [`subscribe`] holds the pieces
//! that keep a replica fresh on its own, [`cli`] is the command line.

pub mod cli;
pub mod config;
pub mod digest;
pub mod engine;
pub mod epoch;
mod error;
pub mod history;
pub mod page;
pub mod protocol;
pub mod remote;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod subscribe;

pub use error::{Error, ErrorKind, Result};
