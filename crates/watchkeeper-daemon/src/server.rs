//! The protocol's server side: the accept loop, one task per connection, and the [`Broker`]
//! that answers each [`Request`] from the store.
//!
//! A connection's peer is checked first (`SO_PEERCRED`): root, the daemon's own uid and the
//! allowed uids may talk; anyone else gets one error line (coded `not_allowed`), and the
//! connection is closed once the client closes or after [`REFUSAL_LINGER`], so that the client
//! reads the line instead of `EPIPE` or `ECONNRESET`. Then each line is one
//! request, answered by one line, in order:
//!
//! * a line longer than [`MAX_LINE`] is answered with an error and the connection is closed
//!   (the rest of the line cannot be skipped cheaply);
//! * a line that is not a valid request (bad JSON, unknown `op`, missing field) is answered with
//!   an error naming the problem, and the connection stays open;
//! * a mutating request is answered only after the store committed it;
//! * a request the store refused (unknown job, not the holder, …) is answered with an error and
//!   the connection stays open; a request the store FAILED (disk full, busy database, a lost
//!   store task) is answered with an error coded `unavailable` (`unavailable: WHY`): nothing
//!   changed, and the client retries later instead of taking the failure for a verdict;
//! * a connection that sends no complete request for [`IDLE_TIMEOUT`] is closed.
//!
//! At most [`MAX_CONNECTIONS`] connections are served at once; beyond that the accept loop
//! waits for one to close (the kernel's backlog holds the rest).
//!
//! On shutdown (the token is cancelled) the accept loop stops, and every connection finishes
//! the request it is in — answers it — but does not read another one.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{
    AsyncBufReadExt as _, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader,
};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use watchkeeper::{Controller, Progress};
use watchkeeper_jobs::{ErrorCode, MAX_LINE, Request, Response};

use crate::config::{Config, NOBODY_UID};
use crate::error_chain;
use crate::store::{SharedStore, StoreError, now_ms};

/// How often the accept loop ticks its watchdog [`Progress`] while no one connects.
pub const ACCEPT_TICK: Duration = Duration::from_millis(250);

/// How long writing one response may take before the connection is dropped (a peer that does
/// not read its answers).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a refused connection is kept open for its request to arrive, after the refusal
/// line was sent (see the module documentation).
pub const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Longest error message sent back, in bytes.
const MAX_ERROR: usize = 1024;

/// Pause after a failed `accept(2)` (e.g. `EMFILE`), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long `accept(2)` may fail without a success in between before the accept loop stops
/// ticking its watchdog [`Progress`], so that the watchdog restarts the daemon.
pub const ACCEPT_FAILING_LIMIT: Duration = Duration::from_secs(5);

/// Default cap on connections served at once ([`Broker::with_connection_limits`]).
pub const MAX_CONNECTIONS: usize = 256;

/// Default time a connection may go without a complete request before it is closed
/// ([`Broker::with_connection_limits`]).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Answers requests: the store, the live configuration and the access rule.
#[derive(Debug)]
pub struct Broker {
    store: SharedStore,
    config: watch::Receiver<Config>,
    extra_uids: Vec<u32>,
    own_uid: u32,
    controller: Option<Controller>,
    max_connections: usize,
    idle_timeout: Duration,
}

impl Broker {
    /// A broker over `store`, following `config` as it is reloaded. `extra_uids`
    /// (`--allow-uid`) may connect besides root, the daemon's own uid and the configuration's
    /// `allowed_uids`.
    pub fn new(store: SharedStore, config: watch::Receiver<Config>, extra_uids: Vec<u32>) -> Self {
        if extra_uids.contains(&NOBODY_UID) {
            tracing::error!(
                "ignoring allowed uid {NOBODY_UID}: {}",
                crate::config::NOBODY_PROBLEM
            );
        }
        Broker {
            store,
            config,
            extra_uids,
            own_uid: rustix::process::getuid().as_raw(),
            controller: None,
            max_connections: MAX_CONNECTIONS,
            idle_timeout: IDLE_TIMEOUT,
        }
    }

    /// Serves at most `max_connections` (at least 1) connections at once, and closes one that
    /// sends no complete request for `idle_timeout`. Defaults: [`MAX_CONNECTIONS`],
    /// [`IDLE_TIMEOUT`].
    #[must_use]
    pub fn with_connection_limits(
        mut self,
        max_connections: usize,
        idle_timeout: Duration,
    ) -> Self {
        self.max_connections = max_connections.clamp(1, Semaphore::MAX_PERMITS);
        self.idle_timeout = idle_timeout;
        self
    }

    /// Serves `reload` requests through `controller`, answering once the reload is over.
    #[must_use]
    pub fn with_controller(mut self, controller: Controller) -> Self {
        self.controller = Some(controller);
        self
    }

    /// Replaces the daemon's own uid in the access rule (for tests that cannot change uid).
    #[must_use]
    pub fn with_own_uid(mut self, uid: u32) -> Self {
        self.own_uid = uid;
        self
    }

    /// The store.
    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// Whether a peer with `uid` may talk to the daemon. Never [`NOBODY_UID`] (the overflow
    /// uid a user namespace shows unmapped users as: it could be anyone), even if configured.
    pub fn is_allowed(&self, uid: u32) -> bool {
        uid != NOBODY_UID
            && (uid == 0
                || uid == self.own_uid
                || self.extra_uids.contains(&uid)
                || self.config.borrow().allowed_uids.contains(&uid))
    }

    /// Answers one request: refusals become [`Response::Error`]; a store failure (not a
    /// refusal: disk full, a busy or broken database) is logged and answered with an error
    /// coded [`ErrorCode::Unavailable`] (`unavailable: …`), which tells the client that the
    /// request did not take effect and may be retried later.
    pub async fn handle(&self, request: Request) -> Response {
        let what = describe(&request);
        match self.dispatch(request).await {
            Ok(response) => response,
            Err(e) if e.is_refusal() => {
                let error = error_chain(&e);
                tracing::info!(request = %what, "refused: {error}");
                Response::error(truncate(error))
            }
            Err(e) => {
                let error = error_chain(&e);
                tracing::error!(request = %what, "failed: {error}; answered as unavailable");
                unavailable(&error)
            }
        }
    }

    async fn dispatch(&self, request: Request) -> Result<Response, StoreError> {
        let store = &self.store;
        Ok(match request {
            Request::Ping => Response::Pong {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            },
            Request::Submit { job } => {
                let id = store
                    .call("submit", move |s| s.submit(&job, now_ms()))
                    .await?;
                tracing::debug!(job = id, "submitted");
                Response::Submitted { id }
            }
            Request::Claim { worker } => {
                let policy = self.config.borrow().policy();
                let op = format!("claim by {worker}");
                let (job, worker) = store
                    .call(op, move |s| {
                        s.claim(&worker, policy, now_ms()).map(|j| (j, worker))
                    })
                    .await?;
                if let Some(j) = &job {
                    tracing::info!(job = j.id, %worker, attempt = j.attempt, "claimed");
                }
                Response::Job { job }
            }
            Request::Renew { id, worker } => {
                let lease = self.config.borrow().lease_secs;
                store
                    .call(format!("renew job {id}"), move |s| {
                        s.renew(id, &worker, lease, now_ms())
                    })
                    .await?;
                Response::Done
            }
            Request::Complete {
                id,
                worker,
                exit_code,
            } => {
                store
                    .call(format!("complete job {id}"), move |s| {
                        s.complete(id, &worker, exit_code, now_ms())
                            .map(|()| worker)
                    })
                    .await
                    .map(|worker| tracing::info!(job = id, %worker, ?exit_code, "completed"))?;
                Response::Done
            }
            Request::CompleteAndClaim {
                id,
                worker,
                exit_code,
            } => {
                let policy = self.config.borrow().policy();
                let (job, worker) = store
                    .call(format!("complete job {id} and claim"), move |s| {
                        s.complete_and_claim(id, &worker, exit_code, policy, now_ms())
                            .map(|j| (j, worker))
                    })
                    .await?;
                tracing::info!(job = id, %worker, ?exit_code, "completed");
                if let Some(j) = &job {
                    tracing::info!(job = j.id, %worker, attempt = j.attempt, "claimed");
                }
                Response::Job { job }
            }
            Request::Deny { id, worker, reason } => {
                store
                    .call(format!("deny job {id}"), move |s| {
                        s.deny(id, &worker, &reason, now_ms()).map(|()| reason)
                    })
                    .await
                    .map(|reason| tracing::info!(job = id, %reason, "denied"))?;
                Response::Done
            }
            Request::Quarantine { id, worker, reason } => {
                store
                    .call(format!("quarantine job {id}"), move |s| {
                        s.quarantine(id, &worker, &reason, now_ms())
                            .map(|()| reason)
                    })
                    .await
                    .map(|reason| tracing::warn!(job = id, %reason, "quarantined by its worker"))?;
                Response::Done
            }
            Request::Release { id, worker } => {
                store
                    .call(format!("release job {id}"), move |s| {
                        s.release(id, &worker, now_ms())
                    })
                    .await
                    .map(|()| tracing::info!(job = id, "released"))?;
                Response::Done
            }
            Request::Stats => Response::Stats(store.call("stats", |s| s.stats()).await?),
            Request::Reload => match &self.controller {
                Some(controller) => match controller.reload().await {
                    Ok(()) => Response::Done,
                    Err(e) => Response::error(truncate(error_chain(&e))),
                },
                None => Response::error("reload is not available here"),
            },
        })
    }
}

/// A short description of a request for logs (no job spec, no reason text).
fn describe(request: &Request) -> String {
    match request {
        Request::Ping => "ping".into(),
        Request::Submit { .. } => "submit".into(),
        Request::Claim { worker } => format!("claim by {worker}"),
        Request::Renew { id, worker } => format!("renew job {id} by {worker}"),
        Request::Complete { id, worker, .. } => format!("complete job {id} by {worker}"),
        Request::CompleteAndClaim { id, worker, .. } => {
            format!("complete job {id} and claim by {worker}")
        }
        Request::Deny { id, worker, .. } => format!("deny job {id} by {worker}"),
        Request::Quarantine { id, worker, .. } => format!("quarantine job {id} by {worker}"),
        Request::Release { id, worker } => format!("release job {id} by {worker}"),
        Request::Stats => "stats".into(),
        Request::Reload => "reload".into(),
    }
}

/// The answer to a request the daemon could not serve: `unavailable: WHY`, coded
/// [`ErrorCode::Unavailable`].
pub fn unavailable(why: &str) -> Response {
    Response::Error {
        error: truncate(format!("unavailable: {why}")),
        code: Some(ErrorCode::Unavailable),
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_ERROR {
        let mut end = MAX_ERROR;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Accepts connections until `stop` is cancelled, then waits for the open connections to
/// finish their current request. Ticks `progress` after every accept and every
/// [`ACCEPT_TICK`] while idle, so the watchdog sees the loop alive.
pub async fn accept_loop(
    listener: UnixListener,
    broker: Arc<Broker>,
    stop: CancellationToken,
    progress: Progress,
) {
    let connections = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(broker.max_connections));
    let mut idle = tokio::time::interval(ACCEPT_TICK);
    idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Since when accept(2) has been failing without a success in between.
    let mut failing_since: Option<Instant> = None;
    let mut gave_up = false;
    let mut permit = None;
    let mut full_logged = false;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            acquired = permits.clone().acquire_owned(), if permit.is_none() => {
                // The semaphore is never closed.
                permit = acquired.ok();
                full_logged = false;
            }
            accepted = listener.accept(), if permit.is_some() => match accepted {
                Ok((stream, _)) => {
                    if failing_since.take().is_some() {
                        tracing::info!("accept works again");
                    }
                    let permit = permit.take();
                    let (broker, stop) = (broker.clone(), stop.clone());
                    connections.spawn(async move {
                        serve_connection(stream, broker, stop).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    if failing_since.is_none() {
                        failing_since = Some(Instant::now());
                        tracing::warn!(error = %e, "accept failed; retrying every {ACCEPT_BACKOFF:?}");
                    }
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                }
            },
            _ = idle.tick() => {
                if permit.is_none() && !full_logged {
                    full_logged = true;
                    tracing::warn!(
                        max = broker.max_connections,
                        "too many connections; accepting again when one closes"
                    );
                }
            }
        }
        match failing_since {
            Some(since) if since.elapsed() > ACCEPT_FAILING_LIMIT => {
                if !gave_up {
                    gave_up = true;
                    tracing::error!(
                        "accept has been failing for more than {ACCEPT_FAILING_LIMIT:?}; \
                         no longer reporting progress, so that the watchdog restarts the daemon"
                    );
                }
            }
            _ => {
                gave_up = false;
                progress.tick();
            }
        }
    }
    drop(listener);
    connections.close();
    if !connections.is_empty() {
        tracing::info!(
            open = connections.len(),
            "stopped accepting; open connections finish their current request"
        );
    }
    connections.wait().await;
}

/// Serves one connection until the peer closes it, a protocol error closes it, or `stop` is
/// cancelled between requests.
pub async fn serve_connection(stream: UnixStream, broker: Arc<Broker>, stop: CancellationToken) {
    let peer = match rustix::net::sockopt::socket_peercred(&stream) {
        Ok(peer) => peer,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the peer's credentials (SO_PEERCRED); closing");
            return;
        }
    };
    let (uid, pid) = (peer.uid.as_raw(), peer.pid.as_raw_pid());
    if !broker.is_allowed(uid) {
        let error = format!("uid {uid} is not allowed");
        if uid == NOBODY_UID {
            tracing::warn!(
                uid,
                pid,
                "refused a connection: {}",
                crate::config::NOBODY_PROBLEM
            );
        } else {
            tracing::warn!(uid, pid, "refused a connection: {error}");
        }
        refuse(stream, error).await;
        return;
    }
    tracing::debug!(uid, pid, "connected");

    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::with_capacity(512);
    loop {
        line.clear();
        let mut limited = (&mut reader).take(MAX_LINE as u64 + 1);
        let read = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            read = tokio::time::timeout(broker.idle_timeout, limited.read_until(b'\n', &mut line)) => read,
        };
        let Ok(read) = read else {
            tracing::debug!(
                uid,
                pid,
                "no complete request in {:?}; closing",
                broker.idle_timeout
            );
            let _ = write.shutdown().await;
            break;
        };
        match read {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(uid, pid, error = %e, "read failed; closing");
                break;
            }
        }
        let terminated = line.last() == Some(&b'\n');
        if !terminated && line.len() > MAX_LINE {
            let error =
                format!("request line longer than {MAX_LINE} bytes; closing the connection");
            tracing::warn!(uid, pid, "{error}");
            let _ = write_response(&mut write, &Response::error(error)).await;
            let _ = write.shutdown().await;
            break;
        }
        let request = line
            .strip_suffix(b"\n")
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .unwrap_or(&line);
        let response = match serde_json::from_slice::<Request>(request) {
            Ok(request) => broker.handle(request).await,
            Err(e) => {
                tracing::debug!(uid, pid, error = %e, "invalid request");
                Response::error(truncate(format!("invalid request: {e}")))
            }
        };
        if let Err(e) = write_response(&mut write, &response).await {
            tracing::debug!(uid, pid, error = %e, "cannot answer; closing");
            break;
        }
        if !terminated {
            break; // the peer closed after an unterminated last line
        }
    }
    tracing::debug!(uid, pid, "disconnected");
}

/// Answers a connection the daemon does not serve with one line, coded `not_allowed`, and makes
/// sure the client can read it.
///
/// Closing right after writing would lose the line about as often as not: a client that
/// writes its request after the close gets `EPIPE`, and one whose request arrived before the
/// close gets `ECONNRESET` (the kernel resets a stream closed with unread data). So the daemon
/// writes the line, shuts down its sending side (the client reads the line, then the end of
/// the stream), and reads and drops what the client sends until the client closes, at most
/// [`REFUSAL_LINGER`] and [`MAX_LINE`] bytes, before closing.
async fn refuse(stream: UnixStream, error: String) {
    let (mut read, mut write) = stream.into_split();
    let response = Response::Error {
        error,
        code: Some(ErrorCode::NotAllowed),
    };
    if write_response(&mut write, &response).await.is_err() {
        return;
    }
    let _ = write.shutdown().await;
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut total = 0usize;
        while total <= MAX_LINE {
            match read.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, drain).await;
}

/// Writes one response line, within [`WRITE_TIMEOUT`].
async fn write_response(
    w: &mut (impl AsyncWrite + Unpin),
    response: &Response,
) -> std::io::Result<()> {
    let mut out = match serde_json::to_vec(response) {
        Ok(out) if out.len() <= MAX_LINE => out,
        Ok(out) => error_line(&format!(
            "response of {} bytes exceeds MAX_LINE {MAX_LINE}",
            out.len()
        )),
        Err(e) => error_line(&format!("cannot encode the response: {e}")),
    };
    out.push(b'\n');
    match tokio::time::timeout(WRITE_TIMEOUT, w.write_all(&out)).await {
        Ok(written) => written,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the peer did not read its response within {WRITE_TIMEOUT:?}"),
        )),
    }
}

fn error_line(error: &str) -> Vec<u8> {
    let response = Response::error(error);
    serde_json::to_vec(&response).unwrap_or_else(|_| br#"{"result":"error","error":"?"}"#.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_errors_are_cut_at_a_char_boundary() {
        let s = truncate("é".repeat(MAX_ERROR));
        assert!(s.len() <= MAX_ERROR + '…'.len_utf8());
        assert!(s.ends_with('…'));
        assert_eq!(truncate("short".into()), "short");
    }

    #[test]
    fn descriptions_leave_out_specs_and_reasons() {
        let d = describe(&Request::Deny {
            id: 4,
            worker: "w".into(),
            reason: "secret".into(),
        });
        assert_eq!(d, "deny job 4 by w");
    }
}
