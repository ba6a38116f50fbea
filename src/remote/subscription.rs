//! A subscriber's line to its replica: what it hears (new versions, sync-now) and what
//! it tells (CHANGED, failure reports), over whichever store holds the replica.
//!
//! - A server: one WebSocket session (`OPEN` op `subscribe`), reconnected forever with
//!   jittered, capped backoff. The server pings every
//!   [`PING_INTERVAL`](crate::protocol::control::PING_INTERVAL); three intervals of
//!   silence count as a dead connection.
//! - The embedded store: a Unix socket other processes on this machine notify (see
//!   [`super::local`]).
//!
//! The subscriber reads [`Notice`]s from [`Subscription::notices`] and sends through
//! [`Subscription::send`]. Dropping the subscription closes the connection.
//!
//! A pull subscriber's APPLIED reports go only to a server whose CONFIG says it keeps
//! followers: an older server ends a session on a frame it does not know.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use super::{Server, Socket, blocking, connect, connect_small, local, open};
use crate::protocol::Frame;
use crate::protocol::control::{
    Applied, Control, FailureReport, Op, PING_INTERVAL, SubscriberRole,
};
use crate::store::ReplicaPath;
use crate::transport::ws::{Incoming, send_binary};
use crate::{Error, ErrorKind, Result};

/// How many messages to the server may wait while it is unreachable.
const OUTGOING_BACKLOG: usize = 8;

/// What a subscription hears.
#[derive(Debug)]
pub enum Notice {
    /// Connected (again). `key_type` is the kind of key the server accepted (`admin`,
    /// `push` or `pull`; empty for the embedded store).
    Connected {
        /// Whether the replica exists (`false`: no such replica yet; an admin key may
        /// still create it with a push).
        exists: bool,
        /// The replica's latest version (0: none yet).
        latest: u64,
        /// The key's kind.
        key_type: String,
    },
    /// The connection failed; the next attempt comes after `retry_in`.
    Disconnected {
        /// Why, one line.
        error: String,
        /// When the next attempt is.
        retry_in: Duration,
    },
    /// A new version of the replica landed.
    NewVersion(u64),
    /// Sync now, asked by `sqlferry sync-now` or the HTTP API.
    SyncNow,
    /// A refusal no retry can mend (a wrong or revoked key): the subscriber stops.
    Fatal(Error),
}

/// What a subscriber tells the server.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// CHANGED: the push planned in this many seconds.
    Changed(u32),
    /// REPORT: pushes have been failing.
    Report(FailureReport),
    /// APPLIED (pull subscribers): the local database now holds this version. Unlike
    /// the others it is not stale after a reconnect: the latest one is told again on
    /// every connection, to servers that keep followers (CONFIG's `followers`).
    Applied(Applied),
}

/// A running subscription; dropping it closes it (its task is aborted with it).
#[derive(Debug)]
pub struct Subscription {
    /// What the subscription hears, in order.
    pub notices: mpsc::UnboundedReceiver<Notice>,
    outgoing: Option<mpsc::Sender<Outgoing>>,
    task: Option<AbortOnDropHandle<()>>,
}

impl Subscription {
    /// Sends `message` when connected. While disconnected a few messages wait and are
    /// dropped on reconnect (a CHANGED would be stale by then); past those, new ones are
    /// dropped at once, so a long outage costs no memory.
    pub fn send(&self, message: Outgoing) {
        if let Some(outgoing) = &self.outgoing {
            let _ = outgoing.try_send(message);
        }
    }

    /// Closes the connection cleanly (a WebSocket close the server sees as the
    /// subscriber leaving), waiting at most a second for it.
    pub async fn close(mut self) {
        self.outgoing = None;
        if let Some(task) = self.task.take() {
            // Past the second the task is dropped, which aborts it.
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
    }
}

impl Server {
    /// Subscribes to `replica` as a `role` subscriber; the connection runs on a task of
    /// the caller's runtime.
    pub async fn subscribe(
        &self,
        replica: &ReplicaPath,
        role: SubscriberRole,
        key: Option<String>,
    ) -> Result<Subscription> {
        // An S3 store has no notifications between processes yet (no sockets beside
        // it, no server's hub): refused, not polled behind the user's back.
        self.refuse_on_s3("subscribers (--subscribe)")?;
        let (notices_tx, notices) = mpsc::unbounded_channel();
        let (outgoing, outgoing_rx) = mpsc::channel(OUTGOING_BACKLOG);
        let task = match self {
            Server::Embedded(store) => {
                // Binding the socket (and making its directory) and reading the store
                // are file and SQLite work: off the async threads.
                let (root, name) = (store.root().to_owned(), replica.as_str().to_owned());
                let listener = blocking(move || local::Listener::bind(&root, &name)).await?;
                let (exists, latest) = match self.versions(replica, None).await {
                    Ok(v) => (true, v.last().map_or(0, |v| v.number)),
                    Err(e) if e.kind() == ErrorKind::NotFound => (false, 0),
                    Err(e) => return Err(e),
                };
                let _ = notices_tx.send(Notice::Connected {
                    exists,
                    latest,
                    key_type: String::new(),
                });
                tokio::spawn(run_local(
                    listener,
                    store.clone(),
                    replica.clone(),
                    (latest, role == SubscriberRole::Pull),
                    notices_tx,
                    outgoing_rx,
                ))
            }
            Server::S3 { .. } => return Err(crate::store::not_with_s3("subscribers")),
            Server::Ws { url, .. } => tokio::spawn(run_ws(
                url.clone(),
                replica.clone(),
                role,
                key,
                notices_tx,
                outgoing_rx,
            )),
        };
        Ok(Subscription {
            notices,
            outgoing: Some(outgoing),
            task: Some(AbortOnDropHandle::new(task)),
        })
    }

    /// Asks every running subscriber of `replica` to sync now; returns how many were
    /// reached. Returns at once: it does not wait for their syncs. A replica that does
    /// not exist is an error ([`ErrorKind::NotFound`]), not "0 reached": a typo must
    /// not look like a sync-now that merely found nobody.
    pub async fn sync_now(&self, replica: &ReplicaPath, key: Option<&str>) -> Result<u64> {
        self.refuse_on_s3("sync-now")?;
        // Asked first, on its own session: the sync-now answer does not say whether the
        // replica exists.
        self.versions(replica, key).await?;
        match self {
            Server::Embedded(store) => {
                let reached =
                    local::notify(store.root(), replica.as_str(), local::Message::SyncNow).await;
                Ok(reached as u64)
            }
            Server::S3 { .. } => Err(crate::store::not_with_s3("sync-now")),
            Server::Ws { url, .. } => {
                let mut ws = connect(url, key).await?;
                let config = open(&mut ws, Op::SyncNow, replica, None, None, false, None).await?;
                Ok(config.reached.unwrap_or(0))
            }
        }
    }
}

/// How often a pull subscriber of the embedded store checks the latest version itself:
/// the safety net for a notification it missed (or a push by `sqlferry serve` on the
/// same directory, which notifies only its own subscribers). A push subscriber does not
/// follow versions and never polls (a daemon with 200 of them would open 20 replica
/// files a second for nothing).
const LOCAL_POLL: Duration = Duration::from_secs(10);

/// The embedded store's subscription: `(latest, poll)` is the latest version and
/// whether to poll for new ones ([`LOCAL_POLL`]).
async fn run_local(
    listener: local::Listener,
    store: crate::store::Store,
    replica: ReplicaPath,
    (mut latest, polls): (u64, bool),
    notices: mpsc::UnboundedSender<Notice>,
    mut outgoing: mpsc::Receiver<Outgoing>,
) {
    // The socket is read by a task of its own: a message half read is never dropped
    // by the select below.
    let (heard_tx, mut heard) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        loop {
            let message = listener.next().await;
            let failed = message.is_err();
            if heard_tx.send(message).is_err() || failed {
                return;
            }
        }
    });
    let _reader = AbortOnDropHandle::new(reader);
    let mut poll = tokio::time::interval(LOCAL_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll.reset();
    loop {
        let notice = tokio::select! {
            message = heard.recv() => match message {
                Some(Ok(local::Message::Version(n))) => {
                    latest = latest.max(n);
                    Notice::NewVersion(n)
                }
                Some(Ok(local::Message::SyncNow)) => Notice::SyncNow,
                Some(Err(e)) => Notice::Fatal(e),
                None => return,
            },
            _ = poll.tick(), if polls => {
                let (store, replica) = (store.clone(), replica.clone());
                let found = tokio::task::spawn_blocking(move || store.versions(&replica)).await;
                match found {
                    Ok(Ok(v)) if v.last().is_some_and(|v| v.number > latest) => {
                        latest = v.last().map_or(latest, |v| v.number);
                        tracing::debug!(latest, "a new version found by the poll");
                        Notice::NewVersion(latest)
                    }
                    _ => continue,
                }
            }
            // No server to tell: CHANGED and reports have no reader here.
            message = outgoing.recv() => match message {
                Some(_) => continue,
                None => return,
            },
        };
        let fatal = matches!(notice, Notice::Fatal(_));
        if notices.send(notice).is_err() || fatal {
            return;
        }
    }
}

async fn run_ws(
    url: String,
    replica: ReplicaPath,
    role: SubscriberRole,
    key: Option<String>,
    notices: mpsc::UnboundedSender<Notice>,
    mut outgoing: mpsc::Receiver<Outgoing>,
) {
    let mut backoff = crate::backoff::Reconnect::new();
    // The version the local database holds, told again on every connection.
    let mut applied: Option<Applied> = None;
    loop {
        let error = match session_open(&url, &replica, role, key.as_deref()).await {
            Ok((mut ws, opened)) => {
                backoff.reset();
                // Anything queued while disconnected is stale, but what was applied.
                while let Ok(message) = outgoing.try_recv() {
                    if let Outgoing::Applied(a) = message {
                        applied = Some(a);
                    }
                }
                if notices
                    .send(Notice::Connected {
                        exists: opened.exists,
                        latest: opened.latest,
                        key_type: opened.key_type,
                    })
                    .is_err()
                {
                    return;
                }
                let told = match (&applied, opened.followers) {
                    (Some(a), true) => {
                        send_binary(&mut ws, Control::Applied(a.clone()).to_bytes()).await
                    }
                    _ => Ok(()),
                };
                let result = match told {
                    Ok(()) => {
                        follow(
                            &mut ws,
                            &notices,
                            &mut outgoing,
                            opened.followers,
                            &mut applied,
                        )
                        .await
                    }
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => return,
                    Err(e) => e,
                }
            }
            Err(e) if e.kind() == ErrorKind::Auth => {
                let _ = notices.send(Notice::Fatal(e));
                return;
            }
            Err(e) => e,
        };
        let retry_in = backoff.next_delay(crate::backoff::jitter());
        let notice = Notice::Disconnected {
            error: error.to_string(),
            retry_in,
        };
        if notices.send(notice).is_err() {
            return;
        }
        tokio::time::sleep(retry_in).await;
    }
}

/// What the server's CONFIG said when a subscription opened.
struct Opened {
    /// Whether the replica exists.
    exists: bool,
    /// Its latest version (0: none).
    latest: u64,
    /// The kind of key accepted.
    key_type: String,
    /// Whether the server keeps followers (takes APPLIED).
    followers: bool,
}

async fn session_open(
    url: &str,
    replica: &ReplicaPath,
    role: SubscriberRole,
    key: Option<&str>,
) -> Result<(Socket, Opened)> {
    let opened = async {
        let mut ws = connect_small(url, key).await?;
        let config = open(
            &mut ws,
            Op::Subscribe,
            replica,
            None,
            None,
            false,
            Some(role),
        )
        .await?;
        // The server names the replica's id only when the replica exists.
        let opened = Opened {
            exists: !config.replica_id.is_empty(),
            latest: config.version,
            key_type: config.key_type,
            followers: config.followers,
        };
        Ok((ws, opened))
    };
    tokio::time::timeout(super::CONNECT_TIMEOUT, opened)
        .await
        .unwrap_or_else(|_| {
            Err(Error::Disconnected(format!(
                "{url} did not open the subscription within {}s",
                super::CONNECT_TIMEOUT.as_secs()
            )))
        })
}

/// Carries one connected session until it fails (`Err`) or the subscriber is gone
/// (`Ok`). APPLIED goes out only when the server keeps `followers`; the latest is kept
/// in `applied` either way.
async fn follow(
    ws: &mut Socket,
    notices: &mpsc::UnboundedSender<Notice>,
    outgoing: &mut mpsc::Receiver<Outgoing>,
    followers: bool,
    applied: &mut Option<Applied>,
) -> Result<()> {
    let silence = PING_INTERVAL * 3;
    loop {
        tokio::select! {
            message = tokio::time::timeout(silence, ws.next()) => {
                let bytes = match message {
                    Err(_) => {
                        return Err(Error::Disconnected(format!(
                            "no word from the server in {}s",
                            silence.as_secs()
                        )));
                    }
                    Ok(next) => match crate::transport::ws::classify(next)? {
                        Incoming::Frame(b) => b,
                        // Pings (answered by tungstenite) and pongs prove the line is alive.
                        Incoming::Alive => continue,
                        Incoming::Closed => {
                            return Err(Error::Disconnected(
                                "the server closed the connection".into(),
                            ));
                        }
                    },
                };
                let notice = match bytes.first() {
                    Some(&b) if Control::is_control(b) => {
                        match Control::decode(&bytes).map_err(|e| Error::Protocol(e.to_string()))? {
                            Control::NewReplicaVersion(v) => Notice::NewVersion(v.version),
                            Control::SyncNow => Notice::SyncNow,
                            other => {
                                return Err(Error::Protocol(format!("unexpected {other:?} from the server")));
                            }
                        }
                    }
                    _ => match Frame::decode(&bytes).map_err(|e| Error::Protocol(e.to_string()))? {
                        Frame::Error { code, message } => return Err(Error::Remote { code, message }),
                        Frame::Message { text, .. } => {
                            tracing::info!(server = %text, "server says");
                            continue;
                        }
                        other => {
                            return Err(Error::Protocol(format!("unexpected {} from the server", other.name())));
                        }
                    },
                };
                if notices.send(notice).is_err() {
                    return Ok(());
                }
            }
            message = outgoing.recv() => {
                let Some(message) = message else {
                    let _ = ws.close(None).await;
                    return Ok(());
                };
                let control = match message {
                    Outgoing::Changed(s) => Control::Changed(s),
                    Outgoing::Report(mut r) => {
                        // The server keeps no more than this; nor need the wire carry it.
                        r.cap_error();
                        Control::Report(r)
                    }
                    Outgoing::Applied(a) => {
                        *applied = Some(a.clone());
                        if !followers {
                            continue;
                        }
                        Control::Applied(a)
                    }
                };
                send_binary(ws, control.to_bytes()).await?;
            }
        }
    }
}
