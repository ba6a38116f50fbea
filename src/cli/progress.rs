//! A progress bar on stderr for long syncs, built on indicatif.
//!
//! It stays hidden for work shorter than [`SHOW_AFTER`], when stderr is not a terminal,
//! and with `--quiet`, so scripts and cron see nothing but results.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::engine::{Phase, Progress};

/// A phase with a known total: a bar with pages, bytes, rate and time left.
const BAR: &str = "{prefix:>9} [{bar:30}] {pos}/{len} pages ({msg}) {percent}% eta {eta}";

/// A phase without a known total: pages and bytes so far.
const SPINNER: &str = "{prefix:>9} {spinner} {pos} pages ({msg}) {per_sec}";

/// The byte count in the message is refreshed every this many pages.
const MESSAGE_EVERY_PAGES: u64 = 64;

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
    page_size: u64,
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
                page_size: 0,
            }),
        }
    }
}

impl Progress for Bar {
    fn start(&self, phase: Phase, total: u64, page_size: u32) {
        let (label, template) = match phase {
            Phase::Hashing => ("reading", BAR),
            Phase::Sending => ("syncing", BAR),
            Phase::Receiving => ("receiving", SPINNER),
        };
        let style = ProgressStyle::with_template(template)
            .expect("the template is valid")
            .progress_chars("=> ");
        self.bar.set_style(style);
        self.bar.set_prefix(label);
        self.bar.set_length(total);
        self.bar.set_position(0);
        self.bar.set_message(String::new());
        self.state
            .lock()
            .expect("no panics while holding the bar state")
            .page_size = u64::from(page_size);
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
            let pos = self.bar.position();
            if state.shown && pos.is_multiple_of(MESSAGE_EVERY_PAGES) {
                self.bar
                    .set_message(crate::cli::human_bytes(pos * state.page_size));
            }
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
