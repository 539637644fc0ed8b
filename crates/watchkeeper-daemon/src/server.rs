//! The protocol's server side: the accept loop, one task per connection, and the [`Broker`]
//! that answers each [`Request`] from the store.
//!
//! A connection's peer is checked first (`SO_PEERCRED`): root, the daemon's own uid and the
//! allowed uids may talk; anyone else gets one error line and is closed. Then each line is one
//! request, answered by one line, in order:
//!
//! * a line longer than [`MAX_LINE`] is answered with an error and the connection is closed
//!   (the rest of the line cannot be skipped cheaply);
//! * a line that is not a valid request (bad JSON, unknown `op`, missing field) is answered with
//!   an error naming the problem, and the connection stays open;
//! * a mutating request is answered only after the store committed it.
//!
//! On shutdown (the token is cancelled) the accept loop stops, and every connection finishes
//! the request it is in — answers it — but does not read another one.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{
    AsyncBufReadExt as _, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader,
};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use watchkeeper::{Controller, Progress};
use watchkeeper_jobs::{MAX_LINE, Request, Response};

use crate::config::Config;
use crate::error_chain;
use crate::store::{SharedStore, StoreError, now_ms};

/// How often the accept loop ticks its watchdog [`Progress`] while no one connects.
pub const ACCEPT_TICK: Duration = Duration::from_millis(250);

/// How long writing one response may take before the connection is dropped (a peer that does
/// not read its answers).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest error message sent back, in bytes.
const MAX_ERROR: usize = 1024;

/// Pause after a failed `accept(2)` (e.g. `EMFILE`), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Answers requests: the store, the live configuration and the access rule.
#[derive(Debug)]
pub struct Broker {
    store: SharedStore,
    config: watch::Receiver<Config>,
    extra_uids: Vec<u32>,
    own_uid: u32,
    controller: Option<Controller>,
}

impl Broker {
    /// A broker over `store`, following `config` as it is reloaded. `extra_uids`
    /// (`--allow-uid`) may connect besides root, the daemon's own uid and the configuration's
    /// `allowed_uids`.
    pub fn new(store: SharedStore, config: watch::Receiver<Config>, extra_uids: Vec<u32>) -> Self {
        Broker {
            store,
            config,
            extra_uids,
            own_uid: rustix::process::getuid().as_raw(),
            controller: None,
        }
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

    /// Whether a peer with `uid` may talk to the daemon.
    pub fn is_allowed(&self, uid: u32) -> bool {
        uid == 0
            || uid == self.own_uid
            || self.extra_uids.contains(&uid)
            || self.config.borrow().allowed_uids.contains(&uid)
    }

    /// Answers one request. Store failures and refusals become [`Response::Error`].
    pub async fn handle(&self, request: Request) -> Response {
        let what = describe(&request);
        match self.dispatch(request).await {
            Ok(response) => response,
            Err(e) => {
                let error = error_chain(&e);
                if e.is_refusal() {
                    tracing::info!(request = %what, "refused: {error}");
                } else {
                    tracing::error!(request = %what, "failed: {error}");
                }
                Response::Error {
                    error: truncate(error),
                }
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
                    Err(e) => Response::Error {
                        error: e.to_string(),
                    },
                },
                None => Response::Error {
                    error: "reload is not available here".into(),
                },
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
        Request::Deny { id, worker, .. } => format!("deny job {id} by {worker}"),
        Request::Quarantine { id, worker, .. } => format!("quarantine job {id} by {worker}"),
        Request::Release { id, worker } => format!("release job {id} by {worker}"),
        Request::Stats => "stats".into(),
        Request::Reload => "reload".into(),
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
    let mut idle = tokio::time::interval(ACCEPT_TICK);
    idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    failing = false;
                    connections.spawn(serve_connection(stream, broker.clone(), stop.clone()));
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "accept failed; retrying every {ACCEPT_BACKOFF:?}");
                    }
                    failing = true;
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                }
            },
            _ = idle.tick() => {}
        }
        progress.tick();
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
        tracing::warn!(uid, pid, "refused a connection: {error}");
        let mut stream = stream;
        let _ = write_response(&mut stream, &Response::Error { error }).await;
        let _ = stream.shutdown().await;
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
            read = limited.read_until(b'\n', &mut line) => read,
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
            let _ = write_response(&mut write, &Response::Error { error }).await;
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
                Response::Error {
                    error: truncate(format!("invalid request: {e}")),
                }
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
    let response = Response::Error {
        error: error.to_owned(),
    };
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
