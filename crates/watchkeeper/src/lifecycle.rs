//! The service's side of the protocol's order: starting → ready → (reloading → ready)* →
//! stopping.
//!
//! [`Lifecycle`] sends `READY=1`, `RELOADING=1`, `STOPPING=1` and `STATUS=` and refuses
//! messages out of order: `READY=1` exactly once per start or reload, `RELOADING=1` only when
//! ready, nothing after `STOPPING=1` but status and timeout extensions (since systemd 259,
//! `STOPPING=1` cannot be undone). State messages that meet a full manager queue are retried for
//! a bounded time, asynchronously, rather than lost.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use crate::notify::{Delivery, InvalidMessage, Notification, Notifier, NotifyError};

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

#[derive(Debug)]
struct Inner {
    notifier: Arc<Notifier>,
    /// Serializes lifecycle messages so they reach the manager in the order decided.
    order: tokio::sync::Mutex<()>,
    state: watch::Sender<State>,
    /// The last status the service set, restored after a watchdog stall clears.
    status: Mutex<Option<String>>,
}

/// Handle on the service's lifecycle; cheap to clone.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

/// How long a state message is retried while the manager's queue is full.
const QUEUE_FULL_BUDGET: Duration = Duration::from_secs(2);

impl Lifecycle {
    /// A lifecycle in [`State::Starting`] that sends through `notifier`.
    pub fn new(notifier: Arc<Notifier>) -> Self {
        Lifecycle {
            inner: Arc::new(Inner {
                notifier,
                order: tokio::sync::Mutex::new(()),
                state: watch::Sender::new(State::Starting),
                status: Mutex::new(None),
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

    /// `READY=1`: start-up (or a reload) is complete. Refused if already ready or stopping.
    pub async fn ready(&self) -> Result<Delivery, LifecycleError> {
        self.transition("READY=1", &[Notification::Ready], State::Ready, |s| {
            matches!(s, State::Starting | State::Reloading)
        })
        .await
    }

    /// `READY=1` and `STATUS=` in one datagram.
    pub async fn ready_with_status(&self, status: &str) -> Result<Delivery, LifecycleError> {
        let d = self.ready_with_transient_status(status).await?;
        self.remember_status(status);
        Ok(d)
    }

    /// `READY=1` with a status that is not remembered as the service's own (restored after a
    /// watchdog stall), e.g. a reload failure.
    pub(crate) async fn ready_with_transient_status(
        &self,
        status: &str,
    ) -> Result<Delivery, LifecycleError> {
        let st = Notification::status(status)?;
        self.transition("READY=1", &[Notification::Ready, st], State::Ready, |s| {
            matches!(s, State::Starting | State::Reloading)
        })
        .await
    }

    /// `RELOADING=1` + `MONOTONIC_USEC=`: a reload begins. Only when ready.
    pub async fn reloading(&self) -> Result<Delivery, LifecycleError> {
        self.transition(
            "RELOADING=1",
            &[Notification::reloading_now()],
            State::Reloading,
            |s| s == State::Ready,
        )
        .await
    }

    /// `STOPPING=1`: shutdown begins. Refused only if already stopping.
    pub async fn stopping(&self) -> Result<Delivery, LifecycleError> {
        self.transition(
            "STOPPING=1",
            &[Notification::Stopping],
            State::Stopping,
            |s| s != State::Stopping,
        )
        .await
    }

    /// `STATUS=`: one line for `systemctl status`, in any state.
    pub async fn status(&self, text: &str) -> Result<Delivery, LifecycleError> {
        let msg = Notification::status(text)?;
        let _order = self.inner.order.lock().await;
        // Remembered first, so that a watchdog recovery racing with this restores the newer text.
        self.remember_status(text);
        Ok(self.send_retrying(&[msg]).await?)
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
        let msg = Notification::status(status)?;
        let _order = self.inner.order.lock().await;
        Ok(self
            .send_retrying(&[Notification::Errno(errno), msg])
            .await?)
    }

    /// The last status set through this handle.
    pub fn last_status(&self) -> Option<String> {
        self.inner
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn remember_status(&self, text: &str) {
        *self
            .inner
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(text.to_owned());
    }

    async fn transition(
        &self,
        message: &'static str,
        msgs: &[Notification],
        to: State,
        allowed: impl Fn(State) -> bool,
    ) -> Result<Delivery, LifecycleError> {
        let _order = self.inner.order.lock().await;
        let state = self.state();
        if !allowed(state) {
            return Err(LifecycleError::OutOfOrder { state, message });
        }
        let d = self.send_retrying(msgs).await?;
        self.inner.state.send_replace(to);
        Ok(d)
    }

    /// Sends, retrying with backoff for up to [`QUEUE_FULL_BUDGET`] while the queue is full.
    /// Other failures are logged (once) and returned.
    pub(crate) async fn send_retrying(
        &self,
        msgs: &[Notification],
    ) -> Result<Delivery, NotifyError> {
        let notifier = &self.inner.notifier;
        let deadline = tokio::time::Instant::now() + QUEUE_FULL_BUDGET;
        let mut backoff = Duration::from_millis(1);
        loop {
            match notifier.notify(msgs) {
                Err(NotifyError::QueueFull { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(100));
                }
                Err(e) => {
                    notifier.log_failure(&describe(msgs), &e);
                    return Err(e);
                }
                Ok(d) => return Ok(d),
            }
        }
    }
}

fn describe(msgs: &[Notification]) -> String {
    msgs.first()
        .map(|m| {
            let s = m.to_string();
            s.split('=').next().unwrap_or_default().to_owned()
        })
        .unwrap_or_default()
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
        for r in [lc.ready().await, lc.reloading().await, lc.stopping().await] {
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
        lc.status("draining").await.unwrap();
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
