//! The subscriber loops driven in-process under `tokio::time::pause`, with test
//! implementations of their traits: a push or pull that reports each call and returns
//! what the test queued (or hangs until it does), notices and changes the test sends.
//! These test the loops' timing and shutdown; the real push and pull stay covered by
//! the integration tests that run `sqlferry` processes.
//!
//! Paused time advances only when every task waits, straight to the next timer, so a
//! wait of an hour costs nothing and every instant asserted is exact.

use std::time::Duration;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::action::{Notices, PullAction, PushAction};
use super::pull::{self, PullSubscriber, Pulled, Reason};
use super::push::{self, PushSubscriber, Pushed};
use super::{Event, NextPush, Seen, Timing, Trigger};
use crate::remote::{Notice, Outgoing};
use crate::shutdown::Shutdown;
use crate::{Error, ErrorKind, Result};

fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Longer than anything a loop would wait for on its own: "never", in paused time.
const NEVER: Duration = Duration::from_secs(100 * 24 * 3600);

struct TestNotices {
    rx: UnboundedReceiver<Notice>,
    sent: UnboundedSender<Outgoing>,
}

impl Notices for TestNotices {
    fn next(&mut self) -> impl Future<Output = Option<Notice>> + Send {
        self.rx.recv()
    }

    fn send(&mut self, message: Outgoing) {
        let _ = self.sent.send(message);
    }
}

/// A push that reports its trigger and time, then returns the next queued result.
#[derive(Debug)]
struct TestPush {
    start: Instant,
    calls: UnboundedSender<(Trigger, Duration)>,
    results: UnboundedReceiver<Result<Pushed>>,
}

impl PushAction for TestPush {
    fn push(&mut self, trigger: Trigger) -> impl Future<Output = Result<Pushed>> + Send {
        let _ = self.calls.send((trigger, self.start.elapsed()));
        async move {
            self.results
                .recv()
                .await
                .unwrap_or_else(|| Err(Error::Disconnected("test over".into())))
        }
    }
}

fn pushed(version: u64) -> Result<Pushed> {
    Ok(Pushed {
        version,
        copy: false,
        created: true,
        pages_sent: 1,
        pages_total: 2,
        bytes_sent: 4096,
        duration: Duration::ZERO,
        saved_keys: None,
        merged: None,
    })
}

fn refused() -> Result<Pushed> {
    Err(Error::Server("disk full".into()))
}

fn commit() -> Seen {
    Seen {
        commits: 1,
        by_poll: false,
    }
}

fn connected(latest: u64, key_type: &str) -> Notice {
    Notice::Connected {
        exists: true,
        latest,
        key_type: key_type.into(),
    }
}

/// A push subscriber running on its task, and the test's ends of everything it uses.
struct PushRig {
    start: Instant,
    notices: UnboundedSender<Notice>,
    sent: UnboundedReceiver<Outgoing>,
    changes: UnboundedSender<Seen>,
    calls: UnboundedReceiver<(Trigger, Duration)>,
    results: UnboundedSender<Result<Pushed>>,
    events: UnboundedReceiver<Event>,
    shutdown: Shutdown,
    ended: JoinHandle<Result<push::Ended<TestPush>>>,
}

impl PushRig {
    /// Starts a push subscriber with `timing` (wait idle, min, max interval); the server
    /// answers at once unless `silent`.
    fn start(timing: Timing, report_after: Duration, silent: bool) -> PushRig {
        let start = Instant::now();
        let (notices, rx) = unbounded_channel();
        let (sent_tx, sent) = unbounded_channel();
        let (changes, changes_rx) = unbounded_channel();
        let (calls_tx, calls) = unbounded_channel();
        let (results, results_rx) = unbounded_channel();
        let (events_tx, events) = unbounded_channel();
        if !silent {
            notices.send(connected(1, "push")).expect("open");
        }
        let shutdown = Shutdown::new();
        let stop = shutdown.clone();
        let subscriber = PushSubscriber {
            timing,
            shutdown_bound: push::SHUTDOWN_BOUND,
            follow_versions: false,
            report_after,
        };
        let action = TestPush {
            start,
            calls: calls_tx,
            results: results_rx,
        };
        let ended = tokio::spawn(async move {
            let mut notices = TestNotices { rx, sent: sent_tx };
            let watch = || async move { Ok(changes_rx) };
            subscriber
                .run(action, &mut notices, watch, &stop, move |e| {
                    let _ = events_tx.send(e);
                })
                .await
        });
        PushRig {
            start,
            notices,
            sent,
            changes,
            calls,
            results,
            events,
            shutdown,
            ended,
        }
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Waits for the next push; asserts its trigger and time.
    async fn push_at(&mut self, trigger: Trigger, at: Duration) {
        let call = self.calls.recv().await.expect("the loop runs");
        assert_eq!(call, (trigger, at));
    }

    /// Asserts that no push comes for a (paused) long while.
    async fn no_push(&mut self) {
        if let Ok(call) = tokio::time::timeout(NEVER, self.calls.recv()).await {
            panic!("unexpected push {call:?}");
        }
    }

    /// Waits for the next event that `pick` accepts; the ones before are skipped.
    async fn event<T>(&mut self, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
        loop {
            let e = self.events.recv().await.expect("the loop runs");
            if let Some(t) = pick(&e) {
                return t;
            }
        }
    }

    async fn ended(self) -> Result<push::Ended<TestPush>> {
        self.ended.await.expect("the loop did not panic")
    }
}

fn timing(wait_idle: u64, max_interval: Option<u64>) -> Timing {
    Timing::new(s(wait_idle), None, max_interval.map(s), None).expect("valid timing")
}

#[tokio::test(start_paused = true)]
async fn wait_idle_pushes_exactly_the_idle_time_after_the_last_change() {
    let mut rig = PushRig::start(timing(10, None), push::REPORT_FAILURES_AFTER, false);
    for v in 1..=3 {
        rig.results.send(pushed(v)).expect("open");
    }
    rig.push_at(Trigger::Start, s(0)).await;
    tokio::time::sleep(s(3)).await;
    rig.changes.send(commit()).expect("open");
    rig.push_at(Trigger::Idle, s(13)).await;
    // Each change restarts the wait.
    tokio::time::sleep(s(20)).await;
    rig.changes.send(commit()).expect("open");
    tokio::time::sleep(s(7)).await;
    rig.changes.send(commit()).expect("open");
    rig.push_at(Trigger::Idle, s(33 + 7 + 10)).await;
    let (trigger, version) = rig
        .event(|e| match e {
            Event::Pushed { trigger, pushed } if pushed.version == 3 => {
                Some((*trigger, pushed.version))
            }
            _ => None,
        })
        .await;
    assert_eq!((trigger, version), (Trigger::Idle, 3));
    rig.no_push().await;
}

#[tokio::test(start_paused = true)]
async fn the_plan_is_told_as_it_moves_for_status_to_show() {
    let mut rig = PushRig::start(timing(600, None), push::REPORT_FAILURES_AFTER, false);
    let planned = |e: &Event| match e {
        Event::Planned {
            after,
            trigger,
            running,
        } => Some((*after, *trigger, *running)),
        _ => None,
    };
    // The start push runs at once: told as running, then nothing planned.
    assert_eq!(rig.event(planned).await, (None, Some(Trigger::Start), true));
    rig.push_at(Trigger::Start, s(0)).await;
    rig.results.send(pushed(1)).expect("open");
    assert_eq!(rig.event(planned).await, (None, None, false));
    // A change plans an idle push 10 minutes on; a later one moves it.
    tokio::time::sleep(s(60)).await;
    rig.changes.send(commit()).expect("open");
    assert_eq!(
        rig.event(planned).await,
        (Some(s(600)), Some(Trigger::Idle), false)
    );
    tokio::time::sleep(s(120)).await;
    rig.changes.send(commit()).expect("open");
    assert_eq!(
        rig.event(planned).await,
        (Some(s(600)), Some(Trigger::Idle), false)
    );
    rig.push_at(Trigger::Idle, s(780)).await;
    assert_eq!(rig.event(planned).await, (None, Some(Trigger::Idle), true));
}

#[tokio::test(start_paused = true)]
async fn changes_that_never_stop_are_pushed_every_max_interval() {
    let mut rig = PushRig::start(timing(600, Some(3600)), push::REPORT_FAILURES_AFTER, false);
    for v in 1..=3 {
        rig.results.send(pushed(v)).expect("open");
    }
    rig.push_at(Trigger::Start, s(0)).await;
    let changes = rig.changes.clone();
    let _busy = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        loop {
            tokio::time::sleep(s(60)).await;
            if changes.send(commit()).is_err() {
                return;
            }
        }
    }));
    rig.push_at(Trigger::MaxInterval, s(3600)).await;
    rig.push_at(Trigger::MaxInterval, s(7200)).await;
}

#[tokio::test(start_paused = true)]
async fn failed_pushes_retry_after_5_10_20_40_80_seconds_then_wait_for_a_change() {
    let mut rig = PushRig::start(timing(10, None), push::REPORT_FAILURES_AFTER, false);
    rig.results.send(pushed(1)).expect("open");
    for _ in 0..6 {
        rig.results.send(refused()).expect("open");
    }
    rig.push_at(Trigger::Start, s(0)).await;
    rig.changes.send(commit()).expect("open");
    rig.push_at(Trigger::Idle, s(10)).await;
    let mut at = s(10);
    for delay in [5, 10, 20, 40, 80] {
        let next = rig
            .event(|e| match e {
                Event::PushFailed { next, .. } => Some(*next),
                _ => None,
            })
            .await;
        assert_eq!(next, NextPush::RetryIn(s(delay)));
        at += s(delay);
        rig.push_at(Trigger::Retry, at).await;
    }
    let next = rig
        .event(|e| match e {
            Event::PushFailed { next, .. } => Some(*next),
            _ => None,
        })
        .await;
    assert_eq!(next, NextPush::AtNextChange);
    rig.no_push().await;
    // The next change pushes, on the usual timing.
    rig.results.send(pushed(2)).expect("open");
    let t = rig.now();
    rig.changes.send(commit()).expect("open");
    rig.push_at(Trigger::Idle, t + s(10)).await;
}

#[tokio::test(start_paused = true)]
async fn the_server_hears_the_planned_push_and_failures_once_they_last() {
    let mut rig = PushRig::start(timing(10, None), s(3), false);
    rig.results.send(refused()).expect("open");
    rig.push_at(Trigger::Start, s(0)).await;
    match rig.sent.recv().await.expect("a report") {
        Outgoing::Report(report) => {
            assert_eq!((report.failing_for, report.attempts), (3, 1));
            assert!(report.error.contains("disk full"), "{}", report.error);
        }
        other => panic!("expected a report, got {other:?}"),
    }
    assert_eq!(rig.now(), s(3), "reported after exactly report_after");
    // The retry succeeds; a change is announced with the planned push's delay.
    rig.results.send(pushed(2)).expect("open");
    rig.push_at(Trigger::Retry, s(5)).await;
    tokio::time::sleep(s(1)).await;
    rig.changes.send(commit()).expect("open");
    match rig.sent.recv().await.expect("a notice") {
        Outgoing::Changed(seconds) => assert_eq!(seconds, 10),
        other => panic!("expected CHANGED, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_pushes_pending_changes_then_stops() {
    let mut rig = PushRig::start(timing(3600, None), push::REPORT_FAILURES_AFTER, false);
    rig.results.send(pushed(1)).expect("open");
    rig.push_at(Trigger::Start, s(0)).await;
    tokio::time::sleep(s(10)).await;
    rig.changes.send(commit()).expect("open");
    tokio::time::sleep(s(10)).await;
    rig.shutdown.begin();
    let bound = rig
        .event(|e| match e {
            Event::PushingBeforeStop { bound } => Some(*bound),
            _ => None,
        })
        .await;
    assert_eq!(bound, push::SHUTDOWN_BOUND);
    rig.push_at(Trigger::Shutdown, s(20)).await;
    rig.results.send(pushed(2)).expect("open");
    assert!(matches!(rig.ended().await, Ok(push::Ended::Shutdown)));
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_with_nothing_pending_stops_at_once() {
    let mut rig = PushRig::start(timing(10, None), push::REPORT_FAILURES_AFTER, false);
    rig.results.send(pushed(1)).expect("open");
    rig.push_at(Trigger::Start, s(0)).await;
    tokio::time::sleep(s(5)).await;
    rig.shutdown.begin();
    let start = rig.start;
    assert!(matches!(rig.ended().await, Ok(push::Ended::Shutdown)));
    assert_eq!(start.elapsed(), s(5));
}

#[tokio::test(start_paused = true)]
async fn a_final_push_that_outlasts_the_bound_leaves_the_changes_unpushed() {
    let mut rig = PushRig::start(timing(10, None), push::REPORT_FAILURES_AFTER, false);
    // The start push never ends.
    rig.push_at(Trigger::Start, s(0)).await;
    rig.shutdown.begin();
    let start = rig.start;
    match rig.ended().await {
        Ok(push::Ended::Unpushed(e)) => {
            assert_eq!(e.kind(), ErrorKind::Disconnected);
            assert!(e.to_string().contains("within 1m"), "{e}");
        }
        other => panic!("ended {other:?}"),
    }
    assert_eq!(start.elapsed(), push::SHUTDOWN_BOUND);
}

#[tokio::test(start_paused = true)]
async fn forced_shutdown_stops_at_once_and_pushes_nothing_more() {
    // A push in flight is dropped.
    let mut rig = PushRig::start(timing(10, None), push::REPORT_FAILURES_AFTER, false);
    rig.push_at(Trigger::Start, s(0)).await;
    rig.shutdown.begin();
    rig.event(|e| matches!(e, Event::PushingBeforeStop { .. }).then_some(()))
        .await;
    tokio::time::sleep(s(2)).await;
    rig.shutdown.force();
    rig.event(|e| matches!(e, Event::StoppingNow).then_some(()))
        .await;
    let start = rig.start;
    assert!(matches!(rig.ended().await, Ok(push::Ended::Interrupted)));
    assert_eq!(start.elapsed(), s(2));

    // Pending changes are not pushed.
    let mut rig = PushRig::start(timing(10, None), push::REPORT_FAILURES_AFTER, false);
    rig.results.send(pushed(1)).expect("open");
    rig.push_at(Trigger::Start, s(0)).await;
    rig.changes.send(commit()).expect("open");
    tokio::time::sleep(s(2)).await;
    rig.shutdown.force();
    let mut calls = std::mem::replace(&mut rig.calls, unbounded_channel().1);
    assert!(matches!(rig.ended().await, Ok(push::Ended::Interrupted)));
    assert!(calls.try_recv().is_err(), "no push after a forced stop");
}

#[tokio::test(start_paused = true)]
async fn a_silent_server_is_waited_for_five_seconds_then_watched_anyway() {
    let mut rig = PushRig::start(timing(10, None), push::REPORT_FAILURES_AFTER, true);
    rig.results.send(pushed(1)).expect("open");
    let waited = rig
        .event(|e| match e {
            Event::NoFirstWord { waited } => Some(*waited),
            _ => None,
        })
        .await;
    assert_eq!(waited, push::FIRST_WORD);
    rig.push_at(Trigger::Start, push::FIRST_WORD).await;
    // The server comes: it is announced.
    rig.notices.send(connected(1, "push")).expect("open");
    rig.event(|e| matches!(e, Event::ServerBack).then_some(()))
        .await;
}

#[tokio::test(start_paused = true)]
async fn a_pull_key_hands_the_push_back_without_pushing() {
    let (notices, rx) = unbounded_channel();
    notices.send(connected(1, "pull")).expect("open");
    let (calls, mut calls_rx) = unbounded_channel();
    let action = TestPush {
        start: Instant::now(),
        calls,
        results: unbounded_channel().1,
    };
    let subscriber = PushSubscriber {
        timing: timing(10, None),
        shutdown_bound: push::SHUTDOWN_BOUND,
        follow_versions: false,
        report_after: push::REPORT_FAILURES_AFTER,
    };
    let mut notices = TestNotices {
        rx,
        sent: unbounded_channel().0,
    };
    let watch = || async { Ok(unbounded_channel::<Seen>().1) };
    let ended = subscriber
        .run(action, &mut notices, watch, &Shutdown::new(), |_| {})
        .await;
    assert!(matches!(ended, Ok(push::Ended::PullKey(_))));
    assert!(calls_rx.try_recv().is_err());
}

/// A pull that reports its time, then returns the next queued result.
struct TestPull {
    start: Instant,
    calls: UnboundedSender<Duration>,
    results: UnboundedReceiver<Result<Pulled>>,
}

impl PullAction for TestPull {
    fn pull(
        &mut self,
        _reason: super::pull::Reason,
    ) -> impl Future<Output = Result<Pulled>> + Send {
        let _ = self.calls.send(self.start.elapsed());
        async move {
            self.results
                .recv()
                .await
                .unwrap_or_else(|| Err(Error::Disconnected("test over".into())))
        }
    }
}

fn pulled(version: u64) -> Result<Pulled> {
    Ok(Pulled {
        version,
        pages_written: 1,
        pages_total: 2,
        bytes_received: 4096,
        duration: Duration::ZERO,
    })
}

struct PullRig {
    start: Instant,
    notices: UnboundedSender<Notice>,
    calls: UnboundedReceiver<Duration>,
    results: UnboundedSender<Result<Pulled>>,
    events: UnboundedReceiver<Event>,
    shutdown: Shutdown,
    ended: JoinHandle<Result<pull::Ended>>,
}

impl PullRig {
    /// Starts a pull subscriber of a database holding `held`; jitter is 1 (the longest
    /// wait).
    fn start(held: Option<u64>) -> PullRig {
        let start = Instant::now();
        let (notices, rx) = unbounded_channel();
        let (calls_tx, calls) = unbounded_channel();
        let (results, results_rx) = unbounded_channel();
        let (events_tx, events) = unbounded_channel();
        let shutdown = Shutdown::new();
        let stop = shutdown.clone();
        let subscriber = PullSubscriber {
            held,
            jitter: || 1.0,
        };
        let action = TestPull {
            start,
            calls: calls_tx,
            results: results_rx,
        };
        let ended = tokio::spawn(async move {
            let mut notices = TestNotices {
                rx,
                sent: unbounded_channel().0,
            };
            subscriber
                .run(action, &mut notices, &stop, move |e| {
                    let _ = events_tx.send(e);
                })
                .await
        });
        PullRig {
            start,
            notices,
            calls,
            results,
            events,
            shutdown,
            ended,
        }
    }

    async fn pull_at(&mut self, at: Duration) {
        assert_eq!(self.calls.recv().await, Some(at));
    }

    async fn no_pull(&mut self) {
        if let Ok(call) = tokio::time::timeout(NEVER, self.calls.recv()).await {
            panic!("unexpected pull at {call:?}");
        }
    }

    /// The reasons of the next `n` pulls that ended well.
    async fn pulled(&mut self, n: usize) -> Vec<(Reason, u64)> {
        let mut got = Vec::new();
        while got.len() < n {
            if let Event::Pulled { reason, pulled } = self.events.recv().await.expect("runs") {
                got.push((reason, pulled.version));
            }
        }
        got
    }

    async fn ended(self) -> Result<pull::Ended> {
        self.ended.await.expect("the loop did not panic")
    }
}

#[tokio::test(start_paused = true)]
async fn new_versions_during_a_pull_are_coalesced_into_one_more_pull() {
    let mut rig = PullRig::start(Some(1));
    rig.notices.send(connected(1, "pull")).expect("open");
    rig.pull_at(s(0)).await;
    // While the start pull runs, three versions land.
    tokio::time::sleep(s(1)).await;
    for v in 2..=4 {
        rig.notices.send(Notice::NewVersion(v)).expect("open");
    }
    tokio::time::sleep(s(1)).await;
    rig.results.send(pulled(1)).expect("open");
    rig.pull_at(s(2)).await;
    rig.results.send(pulled(4)).expect("open");
    assert_eq!(
        rig.pulled(2).await,
        [(Reason::Start, 1), (Reason::NewVersion, 4)]
    );
    rig.no_pull().await;
    // An announcement the last pull already carried asks for nothing.
    rig.notices.send(Notice::NewVersion(4)).expect("open");
    rig.no_pull().await;
    // Sync-now always pulls.
    rig.notices.send(Notice::SyncNow).expect("open");
    let t = rig.start.elapsed();
    rig.pull_at(t).await;
}

#[tokio::test(start_paused = true)]
async fn failed_pulls_retry_after_1_2_4_8_seconds_until_one_works() {
    let mut rig = PullRig::start(None);
    rig.notices.send(connected(3, "pull")).expect("open");
    for _ in 0..4 {
        rig.results
            .send(Err(Error::Disconnected("cut".into())))
            .expect("open");
    }
    rig.results.send(pulled(3)).expect("open");
    for at in [0, 1, 3, 7, 15] {
        rig.pull_at(s(at)).await;
    }
    let mut waits = Vec::new();
    loop {
        match rig.events.recv().await.expect("runs") {
            Event::PullFailed { retry_in, .. } => waits.push(retry_in),
            Event::Pulled { reason, pulled } => {
                assert_eq!((reason, pulled.version), (Reason::Retry, 3));
                break;
            }
            _ => {}
        }
    }
    assert_eq!(waits, [1, 2, 4, 8].map(s));
    rig.no_pull().await;
}

#[tokio::test(start_paused = true)]
async fn local_changes_and_refused_keys_end_the_pull_subscriber() {
    for (error, kind) in [
        (
            Error::LocalChanges("written".into()),
            ErrorKind::LocalChanges,
        ),
        (Error::Auth("revoked".into()), ErrorKind::Auth),
    ] {
        let rig = PullRig::start(None);
        rig.notices.send(connected(1, "pull")).expect("open");
        rig.results.send(Err(error)).expect("open");
        let e = rig.ended().await.expect_err("no retry");
        assert_eq!(e.kind(), kind);
    }
    let rig = PullRig::start(None);
    rig.notices
        .send(Notice::Connected {
            exists: false,
            latest: 0,
            key_type: "pull".into(),
        })
        .expect("open");
    let e = rig.ended().await.expect_err("nothing to follow");
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_waits_for_the_pull_in_flight_forced_does_not() {
    let mut rig = PullRig::start(None);
    rig.notices.send(connected(1, "pull")).expect("open");
    rig.pull_at(s(0)).await;
    rig.shutdown.begin();
    loop {
        if rig.events.recv().await == Some(Event::PullingBeforeStop) {
            break;
        }
    }
    tokio::time::sleep(s(30)).await;
    assert!(!rig.ended.is_finished(), "the pull still runs");
    rig.results.send(pulled(1)).expect("open");
    assert_eq!(rig.pulled(1).await, [(Reason::Start, 1)]);
    assert_eq!(rig.ended().await.expect("ended"), pull::Ended::Shutdown);

    let mut rig = PullRig::start(None);
    rig.notices.send(connected(1, "pull")).expect("open");
    rig.pull_at(s(0)).await;
    rig.shutdown.begin();
    tokio::time::sleep(s(1)).await;
    rig.shutdown.force();
    let start = rig.start;
    assert_eq!(rig.ended().await.expect("ended"), pull::Ended::Interrupted);
    assert_eq!(start.elapsed(), s(1));
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_of_an_idle_pull_subscriber_stops_at_once() {
    let mut rig = PullRig::start(None);
    rig.notices.send(connected(0, "pull")).expect("open");
    assert_eq!(rig.events.recv().await, Some(Event::NoVersionYet));
    rig.shutdown.begin();
    assert_eq!(rig.ended().await.expect("ended"), pull::Ended::Shutdown);
}
