//! The service's side of the protocol's order: starting → ready → (reloading → ready)* →
//! stopping.
//!
//! [`Lifecycle`] sends `READY=1`, `RELOADING=1`, `STOPPING=1` and `STATUS=` and refuses
//! messages out of order: `READY=1` exactly once per start or reload, `RELOADING=1` only when
//! ready, nothing after `STOPPING=1` but status and timeout extensions (since systemd 259,
//! `STOPPING=1` cannot be undone).
//!
//! # A full manager queue
//!
//! `sd_notify()` blocks when the manager's queue is full (`sd-daemon.c` sends on a blocking
//! socket, `sendmsg(…, MSG_NOSIGNAL)` without `MSG_DONTWAIT` or a send timeout), so a C service
//! waits as long as PID 1 needs. Here nothing blocks a runtime thread; instead:
//!
//! * `READY=1` is retried for as long as the start may take (the start timeout, default
//!   90 s as systemd's `DefaultTimeoutStartSec=`), and given up at once when a stop begins;
//! * `STOPPING=1` is retried for as long as the stop may take (the stop timeout);
//! * `STATUS=` never waits: [`Lifecycle::status`] returns at once, and on a full queue the
//!   newest text is kept (one, not a queue of them) and delivered by a background retry;
//! * other messages (`RELOADING=1`, `EXTEND_TIMEOUT_USEC=`, …) are retried for up to 2 s.
//!
//! # A stop during the start
//!
//! A service asked to stop before it sent `READY=1` has nothing to be ready for:
//! [`Lifecycle::ready`] then sends nothing and returns `Ok(`[`Delivery::Stopping`]`)`, so that
//! the natural code, `lifecycle.ready().await?` followed by
//! [`Service::run`](crate::Service::run), completes the stop and exits 0, as systemd expects
//! from a unit stopped while it was activating.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::notify::{Delivery, InvalidMessage, Notification, Notifier, NotifyError};
use crate::service::{DEFAULT_START_TIMEOUT, DEFAULT_STOP_TIMEOUT};

/// Where a service is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Started, not yet ready.
    Starting,
    /// `READY=1` was sent.
    Ready,
    /// `RELOADING=1` was sent; `READY=1` ends it.
    Reloading,
    /// `STOPPING=1` was sent. Final.
    Stopping,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Reloading => "reloading",
            State::Stopping => "stopping",
        })
    }
}

/// A lifecycle message that was refused or not delivered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LifecycleError {
    /// The message is out of the protocol's order; nothing was sent.
    #[error("cannot send {message} while {state}")]
    OutOfOrder {
        /// The state the service is in.
        state: State,
        /// The refused message, e.g. `READY=1`.
        message: &'static str,
    },
    /// A value could not be encoded; nothing was sent.
    #[error(transparent)]
    Invalid(#[from] InvalidMessage),
    /// The manager could not be told; the state did not change.
    #[error(transparent)]
    Notify(#[from] NotifyError),
}

/// How long other state messages are retried while the manager's queue is full.
const QUEUE_FULL_BUDGET: Duration = Duration::from_secs(2);

/// Longest pause between two attempts on a full queue.
const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// The `STATUS=` text: the service's own, and what is on its way.
#[derive(Debug, Default)]
struct StatusSlot {
    /// The last status the service set, restored after a watchdog stall or a failed reload.
    own: Option<String>,
    /// The watchdog's stall report (`stalled: no progress in 'NAME'`), shown before any other
    /// text while a loop is stalled.
    stall: Option<String>,
    /// The newest `STATUS=` a full queue refused, for the background retry.
    pending: Option<Notification>,
    /// Whether the background retry runs.
    retrying: bool,
    /// The text last delivered was not the service's own (a reload failure): the `READY=1` that
    /// ends the next good reload puts the own text back.
    transient_shown: bool,
}

#[derive(Debug)]
struct Inner {
    notifier: Arc<Notifier>,
    /// Serializes state messages so they reach the manager in the order decided.
    order: tokio::sync::Mutex<()>,
    state: watch::Sender<State>,
    status: Mutex<StatusSlot>,
    /// A stop was requested: `READY=1` is no longer due (set before `STOPPING=1` goes out).
    stop_requested: AtomicBool,
    ready_budget: Duration,
    stop_budget: Duration,
    /// Where the status retry runs when `status` is called outside a runtime.
    runtime: Option<tokio::runtime::Handle>,
}

impl Inner {
    fn slot(&self) -> MutexGuard<'_, StatusSlot> {
        // Every update of the slot is a plain assignment: a panic cannot leave it torn.
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl StatusSlot {
    /// `text` as `STATUS=` shows it: after the stall report while a loop is stalled.
    fn shown(&self, text: Option<&str>) -> Option<String> {
        match (&self.stall, text) {
            (Some(stall), Some(text)) => Some(format!("{stall} \u{2014} {text}")),
            (Some(stall), None) => Some(stall.clone()),
            (None, text) => text.map(str::to_owned),
        }
    }
}

/// Handle on the service's lifecycle; cheap to clone.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

/// The `STATUS=` that goes with a state message.
#[derive(Debug, Clone, Copy)]
enum WithStatus<'a> {
    /// None.
    No,
    /// The service's own text, as it is at the moment of sending (never an older one).
    Own,
    /// The service's own text, only if a transient one is showing.
    RestoreOwn,
    /// A text that is not remembered as the service's own.
    Transient(&'a str),
}

/// How long a state message is retried on a full queue.
#[derive(Debug, Clone, Copy)]
enum Budget {
    /// Up to this long.
    For(Duration),
    /// `READY=1`: up to this long, and not once a stop was requested.
    UntilStop(Duration),
}

impl Lifecycle {
    /// A lifecycle in [`State::Starting`] that sends through `notifier`, with the default
    /// start and stop bounds ([`DEFAULT_START_TIMEOUT`], [`DEFAULT_STOP_TIMEOUT`]).
    pub fn new(notifier: Arc<Notifier>) -> Self {
        Self::with_bounds(notifier, DEFAULT_START_TIMEOUT, DEFAULT_STOP_TIMEOUT)
    }

    /// A lifecycle whose `READY=1` is retried for up to `start_timeout` and `STOPPING=1` for
    /// up to `stop_timeout` while the manager's queue is full.
    pub fn with_bounds(
        notifier: Arc<Notifier>,
        start_timeout: Duration,
        stop_timeout: Duration,
    ) -> Self {
        Lifecycle {
            inner: Arc::new(Inner {
                notifier,
                order: tokio::sync::Mutex::new(()),
                state: watch::Sender::new(State::Starting),
                status: Mutex::new(StatusSlot::default()),
                stop_requested: AtomicBool::new(false),
                ready_budget: start_timeout,
                stop_budget: stop_timeout,
                runtime: tokio::runtime::Handle::try_current().ok(),
            }),
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        *self.inner.state.borrow()
    }

    /// Watches state changes.
    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.inner.state.subscribe()
    }

    /// The transport, for messages this type does not model (`FDSTORE=1`, `MAINPID=`, …).
    /// Do not send `READY=1`, `RELOADING=1` or `STOPPING=1` through it: the order checks here
    /// would not see them.
    pub fn notifier(&self) -> &Notifier {
        &self.inner.notifier
    }

    /// Whether a stop was requested (a signal, a request, or [`Lifecycle::stopping`]), even if
    /// `STOPPING=1` is still on its way.
    pub fn is_stopping(&self) -> bool {
        self.inner.stop_requested.load(Ordering::SeqCst) || self.state() == State::Stopping
    }

    /// `READY=1`: start-up (or a reload) is complete. Refused if already ready.
    ///
    /// Once a stop was requested it sends nothing and returns `Ok(`[`Delivery::Stopping`]`)`:
    /// a stop during the start is a clean stop, so go on to [`Service::run`](crate::Service::run)
    /// as usual. On a full manager queue it is retried for as long as the start may take.
    pub async fn ready(&self) -> Result<Delivery, LifecycleError> {
        self.ready_inner(WithStatus::No).await
    }

    /// `READY=1` and `STATUS=` in one datagram; see [`Lifecycle::ready`]. The status is
    /// remembered as the service's own either way.
    pub async fn ready_with_status(&self, status: &str) -> Result<Delivery, LifecycleError> {
        Notification::status(status)?;
        self.remember_status(status);
        self.ready_inner(WithStatus::Own).await
    }

    /// `READY=1` with a status that is not remembered as the service's own (restored after a
    /// watchdog stall or the next good reload), e.g. a reload failure.
    pub(crate) async fn ready_with_transient_status(
        &self,
        status: &str,
    ) -> Result<Delivery, LifecycleError> {
        Notification::status(status)?;
        self.ready_inner(WithStatus::Transient(status)).await
    }

    /// `READY=1` that ends a good reload: with the service's own status only if a transient one
    /// (a reload failure) is showing, so that it never resends a text older than the screen's.
    pub(crate) async fn ready_after_reload(&self) -> Result<Delivery, LifecycleError> {
        self.ready_inner(WithStatus::RestoreOwn).await
    }

    async fn ready_inner(&self, status: WithStatus<'_>) -> Result<Delivery, LifecycleError> {
        if self.is_stopping() {
            return Ok(Delivery::Stopping);
        }
        self.transition(
            "READY=1",
            Notification::Ready,
            status,
            State::Ready,
            Budget::UntilStop(self.inner.ready_budget),
            |s| matches!(s, State::Starting | State::Reloading),
        )
        .await
    }

    /// `RELOADING=1` + `MONOTONIC_USEC=`: a reload begins. Only when ready.
    pub async fn reloading(&self) -> Result<Delivery, LifecycleError> {
        self.transition(
            "RELOADING=1",
            Notification::reloading_now(),
            WithStatus::No,
            State::Reloading,
            Budget::For(QUEUE_FULL_BUDGET),
            |s| s == State::Ready,
        )
        .await
    }

    /// `STOPPING=1`: shutdown begins. Refused only if already stopping. On a full manager queue
    /// it is retried for as long as the stop may take.
    pub async fn stopping(&self) -> Result<Delivery, LifecycleError> {
        self.request_stop();
        self.transition(
            "STOPPING=1",
            Notification::Stopping,
            WithStatus::No,
            State::Stopping,
            Budget::For(self.inner.stop_budget),
            |s| s != State::Stopping,
        )
        .await
    }

    /// Marks the stop as requested: `READY=1` is no longer sent (nor waited for).
    pub(crate) fn request_stop(&self) {
        self.inner.stop_requested.store(true, Ordering::SeqCst);
    }

    /// `STATUS=`: one line for `systemctl status`, in any state. Never waits.
    ///
    /// When the manager's queue is full the text is kept and a background retry delivers it
    /// (`Ok(`[`Delivery::Pending`]`)`); a newer text replaces a pending one, so only the latest
    /// goes out. The retry needs a tokio runtime (the current one, or the one this lifecycle
    /// was created in); without one, a pending text goes out with the next message that
    /// carries a status.
    pub fn status(&self, text: &str) -> Result<Delivery, LifecycleError> {
        Notification::status(text)?;
        let mut slot = self.inner.slot();
        slot.own = Some(text.to_owned());
        let shown = slot.shown(Some(text)).unwrap_or_default();
        let msg = Notification::status(shown)?;
        self.send_status(slot, msg)
    }

    /// Shows the watchdog's stall report before the service's own status (`None`: the loops
    /// recovered, the own status alone comes back). Never waits, as [`Lifecycle::status`].
    pub(crate) fn set_stall(&self, stall: Option<String>) -> Result<Delivery, LifecycleError> {
        let mut slot = self.inner.slot();
        slot.stall = stall;
        let own = slot.own.clone();
        let shown = slot
            .shown(own.as_deref())
            .unwrap_or_else(|| "running".into());
        let msg = Notification::status(shown)?;
        self.send_status(slot, msg)
    }

    /// Sends `msg` (a `STATUS=`) under the status lock; on a full queue, keeps it for the
    /// background retry.
    fn send_status(
        &self,
        mut slot: MutexGuard<'_, StatusSlot>,
        msg: Notification,
    ) -> Result<Delivery, LifecycleError> {
        match self.inner.notifier.notify(std::slice::from_ref(&msg)) {
            Ok(d) => {
                slot.pending = None;
                slot.transient_shown = false;
                Ok(d)
            }
            Err(NotifyError::QueueFull { .. }) => {
                slot.pending = Some(msg);
                if !slot.retrying {
                    let runtime = tokio::runtime::Handle::try_current()
                        .ok()
                        .or_else(|| self.inner.runtime.clone());
                    if let Some(rt) = runtime {
                        slot.retrying = true;
                        rt.spawn(retry_status(self.inner.clone()));
                    }
                }
                Ok(Delivery::Pending)
            }
            Err(e) => {
                slot.pending = None;
                self.inner.notifier.log_failure("STATUS", &e);
                Err(e.into())
            }
        }
    }

    /// `EXTEND_TIMEOUT_USEC=`: the manager must hear from us again within `within`
    /// (during start-up, a reload or stop; a deadline from now, not an addition).
    pub async fn extend_timeout(&self, within: Duration) -> Result<Delivery, LifecycleError> {
        let _order = self.inner.order.lock().await;
        Ok(self
            .send_retrying(&[Notification::extend_timeout(within)])
            .await?)
    }

    /// `ERRNO=` and `STATUS=`: the reason for a failure, before the process exits non-zero.
    pub async fn failure(&self, errno: u32, status: &str) -> Result<Delivery, LifecycleError> {
        Notification::status(status)?;
        let _order = self.inner.order.lock().await;
        Ok(self
            .send_state(
                &Notification::Errno(errno),
                WithStatus::Transient(status),
                Budget::For(QUEUE_FULL_BUDGET),
            )
            .await?)
    }

    /// `EXTEND_TIMEOUT_USEC=` once, without waiting for the order lock or a full queue (the
    /// stop's repeated extensions: the next one follows soon).
    pub(crate) fn try_extend_timeout(&self, within: Duration) -> Result<Delivery, NotifyError> {
        self.inner
            .notifier
            .notify(&[Notification::extend_timeout(within)])
    }

    /// The last status set through this handle.
    pub fn last_status(&self) -> Option<String> {
        self.inner.slot().own.clone()
    }

    fn remember_status(&self, text: &str) {
        self.inner.slot().own = Some(text.to_owned());
    }

    async fn transition(
        &self,
        message: &'static str,
        head: Notification,
        status: WithStatus<'_>,
        to: State,
        budget: Budget,
        allowed: impl Fn(State) -> bool,
    ) -> Result<Delivery, LifecycleError> {
        let _order = self.inner.order.lock().await;
        let state = self.state();
        if !allowed(state) {
            return Err(LifecycleError::OutOfOrder { state, message });
        }
        let d = self.send_state(&head, status, budget).await?;
        if d != Delivery::Stopping {
            self.inner.state.send_replace(to);
        }
        Ok(d)
    }

    /// One attempt: `head` with its status, composed and sent under the status lock so that a
    /// pending status never overtakes it (and it never carries a text older than the pending
    /// one).
    fn attempt(
        &self,
        head: &Notification,
        status: WithStatus<'_>,
    ) -> Result<Delivery, NotifyError> {
        let mut slot = self.inner.slot();
        let own = match status {
            WithStatus::Own => slot.own.clone(),
            WithStatus::RestoreOwn if slot.transient_shown => slot.own.clone(),
            _ => None,
        };
        let own = own
            .and_then(|t| slot.shown(Some(&t)))
            .and_then(|t| Notification::status(t).ok());
        let transient = match status {
            WithStatus::Transient(t) => slot
                .shown(Some(t))
                .and_then(|t| Notification::status(t).ok()),
            _ => None,
        };
        let carried = match status {
            WithStatus::Transient(_) => transient.as_ref(),
            _ => own.as_ref(),
        };
        let d = match carried {
            Some(st) => self.inner.notifier.notify(&[head.clone(), st.clone()]),
            None => self.inner.notifier.notify(std::slice::from_ref(head)),
        }?;
        if carried.is_some() {
            slot.pending = None;
            slot.transient_shown = matches!(status, WithStatus::Transient(_));
        }
        Ok(d)
    }

    /// Sends `head` (and its status), retrying with backoff while the queue is full, within
    /// `budget`. Other failures are logged (once) and returned.
    async fn send_state(
        &self,
        head: &Notification,
        status: WithStatus<'_>,
        budget: Budget,
    ) -> Result<Delivery, NotifyError> {
        let (limit, until_stop) = match budget {
            Budget::For(d) => (d, false),
            Budget::UntilStop(d) => (d, true),
        };
        // No deadline when it does not fit an Instant (e.g. Duration::MAX).
        let deadline = Instant::now().checked_add(limit);
        let mut backoff = Duration::from_millis(1);
        loop {
            match self.attempt(head, status) {
                Err(NotifyError::QueueFull { .. })
                    if deadline.is_none_or(|d| Instant::now() < d) =>
                {
                    if until_stop && self.inner.stop_requested.load(Ordering::SeqCst) {
                        return Ok(Delivery::Stopping);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => {
                    self.inner.notifier.log_failure(&describe(head), &e);
                    return Err(e);
                }
                Ok(d) => return Ok(d),
            }
        }
    }

    /// Sends `msgs`, retrying with backoff for up to 2 s while the queue is full. Other
    /// failures are logged (once) and returned.
    pub(crate) async fn send_retrying(
        &self,
        msgs: &[Notification],
    ) -> Result<Delivery, NotifyError> {
        let notifier = &self.inner.notifier;
        let deadline = Instant::now().checked_add(QUEUE_FULL_BUDGET);
        let mut backoff = Duration::from_millis(1);
        loop {
            match notifier.notify(msgs) {
                Err(NotifyError::QueueFull { .. })
                    if deadline.is_none_or(|d| Instant::now() < d) =>
                {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => {
                    if let Some(first) = msgs.first() {
                        notifier.log_failure(&describe(first), &e);
                    }
                    return Err(e);
                }
                Ok(d) => return Ok(d),
            }
        }
    }
}

/// Delivers the pending `STATUS=` once the manager's queue has room; ends when nothing is
/// pending. A newer text set meanwhile replaces the pending one.
async fn retry_status(inner: Arc<Inner>) {
    let mut backoff = Duration::from_millis(5);
    loop {
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        let mut slot = inner.slot();
        let Some(msg) = slot.pending.take() else {
            slot.retrying = false;
            return;
        };
        match inner.notifier.notify(std::slice::from_ref(&msg)) {
            Ok(_) => {
                slot.transient_shown = false;
                slot.retrying = false;
                return;
            }
            Err(NotifyError::QueueFull { .. }) => slot.pending = Some(msg),
            Err(e) => {
                inner.notifier.log_failure("STATUS", &e);
                slot.retrying = false;
                return;
            }
        }
    }
}

fn describe(msg: &Notification) -> String {
    let s = msg.to_string();
    s.split('=').next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::NotifyAddr;
    use std::os::unix::net::UnixDatagram;

    fn pair() -> (tempfile::TempDir, UnixDatagram, Lifecycle) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_nonblocking(true).unwrap();
        let n = Notifier::connect(NotifyAddr::Path(path)).unwrap();
        (dir, rx, Lifecycle::new(Arc::new(n)))
    }

    fn recv(rx: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = rx.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[tokio::test]
    async fn protocol_order_is_enforced() {
        let (_d, rx, lc) = pair();
        assert_eq!(lc.state(), State::Starting);
        assert!(matches!(
            lc.reloading().await,
            Err(LifecycleError::OutOfOrder {
                state: State::Starting,
                message: "RELOADING=1"
            })
        ));
        assert_eq!(lc.ready_with_status("up").await.unwrap(), Delivery::Sent);
        assert_eq!(recv(&rx), "READY=1\nSTATUS=up");
        assert!(matches!(
            lc.ready().await,
            Err(LifecycleError::OutOfOrder {
                state: State::Ready,
                ..
            })
        ));
        lc.reloading().await.unwrap();
        let msg = recv(&rx);
        let usec: u64 = msg
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap()
            .parse()
            .unwrap();
        assert!(usec > 0);
        lc.ready().await.unwrap();
        assert_eq!(recv(&rx), "READY=1");
        lc.stopping().await.unwrap();
        assert_eq!(recv(&rx), "STOPPING=1");
        // READY=1 after a stop began is not an error: nothing is due (a stop during the start).
        assert_eq!(lc.ready().await.unwrap(), Delivery::Stopping);
        for r in [lc.reloading().await, lc.stopping().await] {
            assert!(
                matches!(
                    r,
                    Err(LifecycleError::OutOfOrder {
                        state: State::Stopping,
                        ..
                    })
                ),
                "{r:?}"
            );
        }
        // Status and extensions still go out while stopping.
        lc.status("draining").unwrap();
        assert_eq!(recv(&rx), "STATUS=draining");
        lc.extend_timeout(Duration::from_secs(3)).await.unwrap();
        assert_eq!(recv(&rx), "EXTEND_TIMEOUT_USEC=3000000");
        assert_eq!(lc.last_status().as_deref(), Some("draining"));
        // Nothing else was sent.
        assert!(rx.recv(&mut [0u8; 16]).is_err());
    }

    #[tokio::test]
    async fn invalid_status_sends_nothing() {
        let (_d, rx, lc) = pair();
        assert!(matches!(
            lc.ready_with_status("a\nb").await,
            Err(LifecycleError::Invalid(_))
        ));
        assert_eq!(lc.state(), State::Starting);
        assert!(rx.recv(&mut [0u8; 16]).is_err());
    }

    #[tokio::test]
    async fn failed_delivery_keeps_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone");
        let lc = Lifecycle::new(Arc::new(Notifier::connect(NotifyAddr::Path(path)).unwrap()));
        let e = lc.ready().await.unwrap_err();
        assert!(e.to_string().contains("gone"), "{e}");
        assert_eq!(lc.state(), State::Starting);
    }

    #[tokio::test]
    async fn unsupervised_still_tracks_order() {
        let lc = Lifecycle::new(Arc::new(Notifier::disabled()));
        assert_eq!(lc.ready().await.unwrap(), Delivery::NotSupervised);
        assert_eq!(lc.state(), State::Ready);
        assert!(lc.ready().await.is_err());
    }
}
