//! Keeping a replica fresh on its own (`--subscribe`): the pieces a subscriber loop is
//! made of.
//!
//! - [`duration`] parses and prints the flag values (`10m`, `1h30m`, `2w`).
//! - [`backoff`] holds the pure delay sequences: push retries and pull reconnects.
//!
//! Everything here is pure: time is a [`Time`] since the subscriber started,
//! given by the caller, so the rules are tested with injected instants and never sleep.
//! The loop that carries out their answers owns the clock, the sockets and the tasks.

pub mod backoff;
pub mod duration;

/// A point in a subscriber's life: the time elapsed since it started.
pub type Time = std::time::Duration;
