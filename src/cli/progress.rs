//! A progress bar on stderr for long syncs, built on indicatif.
//!
//! It stays hidden for work shorter than [`SHOW_AFTER`], when stderr is not a terminal,
//! and with `--quiet`, so scripts and cron see nothing but results.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::engine::{Phase, Progress};

/// Work that finishes sooner than this shows no bar at all.
const SHOW_AFTER: Duration = Duration::from_millis(400);

/// A [`Progress`] drawn as an indicatif bar.
pub struct Bar {
    bar: ProgressBar,
    enabled: bool,
    state: Mutex<State>,
}

struct State {
    started: Instant,
    shown: bool,
}

impl Bar {
    /// A bar that draws on stderr if `enabled` and stderr is a terminal.
    pub fn new(enabled: bool) -> Bar {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
        Bar {
            bar,
            enabled: enabled && std::io::stderr().is_terminal(),
            state: Mutex::new(State {
                started: Instant::now(),
                shown: false,
            }),
        }
    }
}

impl Progress for Bar {
    fn start(&self, phase: Phase, total: u64) {
        let label = match phase {
            Phase::Hashing => "hashing",
            Phase::Sending => "syncing",
        };
        let style = ProgressStyle::with_template(
            "{prefix:>8} [{bar:30}] {pos}/{len} pages ({percent}%) {per_sec} eta {eta}",
        )
        .expect("the template is valid")
        .progress_chars("=> ");
        self.bar.set_style(style);
        self.bar.set_prefix(label);
        self.bar.set_length(total);
        self.bar.set_position(0);
    }

    fn advance(&self, n: u64) {
        self.bar.inc(n);
        if self.enabled {
            let mut state = self
                .state
                .lock()
                .expect("no panics while holding the bar state");
            if !state.shown && state.started.elapsed() >= SHOW_AFTER {
                state.shown = true;
                self.bar.set_draw_target(ProgressDrawTarget::stderr());
            }
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
