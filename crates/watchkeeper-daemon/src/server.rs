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
//! The accept loop never stops accepting. At most [`MAX_CONNECTIONS`] connections are open at
//! once: at the cap, each new connection closes the one idle the longest (no request in
//! progress, whether it sends nothing or sends its request slowly), so that idle or slow
//! clients cannot lock out new ones; if every open connection is inside a request, the new one
//! is answered `unavailable: too many connections …` and closed.
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
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use watchkeeper::{Controller, Progress};
use watchkeeper_jobs::{ErrorCode, MAX_LINE, Request, Response};

use crate::config::{Config, NOBODY_UID};
use crate::error_chain;
use crate::store::{Claimed, SharedStore, StoreError, now_ms};

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

/// Default cap on open connections ([`Broker::with_connection_limits`]); at the cap, the one
/// idle the longest is closed for each new one.
pub const MAX_CONNECTIONS: usize = 4096;

/// At most one log line about shed connections per this interval.
pub const SHED_LOG_INTERVAL: Duration = Duration::from_secs(10);

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

    /// Keeps at most `max_connections` (at least 1) connections open, closing the one idle
    /// the longest to make room for a new one, and closes one that sends no complete request
    /// for `idle_timeout`. Defaults: [`MAX_CONNECTIONS`], [`IDLE_TIMEOUT`].
    #[must_use]
    pub fn with_connection_limits(
        mut self,
        max_connections: usize,
        idle_timeout: Duration,
    ) -> Self {
        self.max_connections = max_connections.max(1);
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
    ///
    /// `line` is the request's JSON text (without its newline): a submitted job is stored as
    /// the exact text it has in the line.
    pub async fn handle(&self, line: &[u8]) -> Answer {
        let request = match serde_json::from_slice::<Request>(line) {
            Ok(request) => request,
            Err(e) => {
                tracing::debug!(error = %e, "invalid request");
                return Answer::Plain(Response::error(truncate(format!("invalid request: {e}"))));
            }
        };
        let what = describe(&request);
        match self.dispatch(request, line).await {
            Ok(answer) => answer,
            Err(e) if e.is_refusal() => {
                let error = error_chain(&e);
                tracing::info!(request = %what, "refused: {error}");
                Answer::Plain(Response::error(truncate(error)))
            }
            Err(e) => {
                let error = error_chain(&e);
                tracing::error!(request = %what, "failed: {error}; answered as unavailable");
                Answer::Plain(unavailable(&error))
            }
        }
    }

    async fn dispatch(&self, request: Request, line: &[u8]) -> Result<Answer, StoreError> {
        let store = &self.store;
        Ok(Answer::Plain(match request {
            Request::Ping => Response::Pong {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            },
            Request::Submit { .. } => {
                /// The job's exact text in the line (the request already parsed, so this does).
                #[derive(serde::Deserialize)]
                struct RawSubmit<'a> {
                    #[serde(borrow)]
                    job: &'a serde_json::value::RawValue,
                }
                let text = serde_json::from_slice::<RawSubmit<'_>>(line)
                    .map(|r| r.job.get().to_owned())
                    .map_err(|e| StoreError::InvalidSpec {
                        reason: error_chain(&e),
                    })?;
                let id = store
                    .call("submit", move |s| s.submit_raw(&text, now_ms()))
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
                return Ok(Answer::Job(job));
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
                return Ok(Answer::Job(job));
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
        }))
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

/// The open connections, for shedding the one idle the longest when the cap is reached.
#[derive(Debug, Default)]
struct Registry {
    inner: std::sync::Mutex<RegistryInner>,
    /// Notified when a connection leaves, so that the accept loop publishes the counts again.
    closed: tokio::sync::Notify,
    /// Connections closed to make room since the start.
    shed: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct RegistryInner {
    next: u64,
    open: std::collections::HashMap<u64, Slot>,
}

#[derive(Debug)]
struct Slot {
    /// When the connection's last request was answered (or it connected).
    idle_since: Instant,
    /// Inside a request (read complete, answer not yet written): never shed then.
    busy: bool,
    /// Cancelled to shed the connection.
    shed: CancellationToken,
}

/// A connection's place in the [`Registry`]; leaves it on drop.
#[derive(Debug)]
struct Entry {
    id: u64,
    registry: Arc<Registry>,
    shed: CancellationToken,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, RegistryInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn open(&self) -> usize {
        self.lock().open.len()
    }

    fn enter(self: &Arc<Self>) -> Entry {
        let shed = CancellationToken::new();
        let mut inner = self.lock();
        let id = inner.next;
        inner.next += 1;
        inner.open.insert(
            id,
            Slot {
                idle_since: Instant::now(),
                busy: false,
                shed: shed.clone(),
            },
        );
        Entry {
            id,
            registry: self.clone(),
            shed,
        }
    }

    /// Closes the connection that has been idle the longest (not inside a request) and
    /// returns how long it was idle; `None` if every connection is inside a request. It leaves
    /// the registry at once.
    fn shed_one(&self) -> Option<Duration> {
        let mut inner = self.lock();
        let (&id, _) = inner
            .open
            .iter()
            .filter(|(_, slot)| !slot.busy)
            .min_by_key(|(_, slot)| slot.idle_since)?;
        let slot = inner.open.remove(&id)?;
        drop(inner);
        slot.shed.cancel();
        self.shed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(slot.idle_since.elapsed())
    }
}

impl Entry {
    fn set_busy(&self, busy: bool) {
        let mut inner = self.registry.lock();
        if let Some(slot) = inner.open.get_mut(&self.id) {
            slot.busy = busy;
            if !busy {
                slot.idle_since = Instant::now();
            }
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.registry.lock().open.remove(&self.id);
        self.registry.closed.notify_one();
    }
}

/// Connection counts for `STATUS=` and logs ([`accept_loop`] publishes them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Open connections.
    pub open: usize,
    /// The cap at which idle connections are shed.
    pub cap: usize,
    /// Connections closed to make room, since the start.
    pub shed: u64,
    /// Connections refused because every open one was inside a request, since the start.
    pub refused: u64,
}

/// Accepts connections until `stop` is cancelled, then waits for the open connections to
/// finish their current request. Ticks `progress` after every accept and waits for a client
/// in [`Progress::idle`], so that the watchdog sees the loop alive with no timer of its own.
///
/// The loop never stops accepting: at the connection cap, the connection idle the longest
/// (no request in progress: idle, or sending its request slowly) is closed to make room, so
/// that idle or slow clients cannot lock out a new one. If every open connection is inside a
/// request, the new one is answered `unavailable: too many connections …` and closed. Counts
/// go to `counts` (for `STATUS=`), shedding to the log (at most one line per
/// [`SHED_LOG_INTERVAL`]).
pub async fn accept_loop(
    listener: UnixListener,
    broker: Arc<Broker>,
    stop: CancellationToken,
    progress: Progress,
) {
    accept_loop_with_counts(listener, broker, stop, progress, None).await;
}

/// [`accept_loop`], publishing [`ConnectionStats`] to `counts` after every accept and every
/// connection that leaves.
pub async fn accept_loop_with_counts(
    listener: UnixListener,
    broker: Arc<Broker>,
    stop: CancellationToken,
    progress: Progress,
    counts: Option<watch::Sender<ConnectionStats>>,
) {
    let connections = TaskTracker::new();
    let registry = Arc::new(Registry::default());
    let cap = broker.max_connections;
    // Since when accept(2) has been failing without a success in between.
    let mut failing_since: Option<Instant> = None;
    let mut gave_up = false;
    let mut refused = 0u64;
    let mut shed_logged = (0u64, Instant::now() - SHED_LOG_INTERVAL);
    // The cap from the start: the watch's default (0 of 0) would read as "at the cap".
    if let Some(counts) = &counts {
        counts.send_replace(ConnectionStats {
            open: 0,
            cap,
            shed: 0,
            refused: 0,
        });
    }
    loop {
        let next = async {
            tokio::select! {
                accepted = listener.accept() => Some(accepted),
                // A connection left: only the counts below change.
                () = registry.closed.notified() => None,
            }
        };
        // Waiting for a client is not a stall: no timer and no wake-up while idle. Once accept
        // has failed for too long, the wait no longer counts as alive either.
        let accepted = if gave_up {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                accepted = next => accepted,
            }
        } else {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                accepted = progress.idle(next) => accepted,
            }
        };
        match accepted {
            None => {}
            Some(Ok((stream, _))) => {
                if failing_since.take().is_some() {
                    tracing::info!("accept works again");
                }
                let mut room = true;
                while registry.open() >= cap {
                    if registry.shed_one().is_none() {
                        room = false;
                        break;
                    }
                }
                if room {
                    let entry = registry.enter();
                    let (broker, stop) = (broker.clone(), stop.clone());
                    connections.spawn(serve_connection(stream, broker, stop, entry));
                } else {
                    refused += 1;
                    tracing::warn!(
                        cap,
                        "every connection is inside a request; refusing a new one"
                    );
                    connections.spawn(refuse_busy(stream, cap));
                }
            }
            Some(Err(e)) => {
                if failing_since.is_none() {
                    failing_since = Some(Instant::now());
                    tracing::warn!(error = %e, "accept failed; retrying every {ACCEPT_BACKOFF:?}");
                }
                // Out of fds: make room by closing an idle connection.
                if matches!(e.raw_os_error(), Some(code) if code == rustix::io::Errno::MFILE.raw_os_error() || code == rustix::io::Errno::NFILE.raw_os_error())
                {
                    registry.shed_one();
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
        let shed = registry.shed.load(std::sync::atomic::Ordering::Relaxed);
        if shed > shed_logged.0 && shed_logged.1.elapsed() >= SHED_LOG_INTERVAL {
            tracing::warn!(
                cap,
                shed_since_last = shed - shed_logged.0,
                shed_total = shed,
                "at the connection cap: closed the connections idle the longest to make room"
            );
            shed_logged = (shed, Instant::now());
        }
        if let Some(counts) = &counts {
            let now = ConnectionStats {
                open: registry.open(),
                cap,
                shed,
                refused,
            };
            counts.send_if_modified(|c| {
                let changed = *c != now;
                *c = now;
                changed
            });
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

/// The accept loop of a daemon whose configuration is broken (socket-activated; see
/// `PROTOCOL.md`): every connection is answered `unavailable: configuration error: WHY` and
/// closed, until `stop` is cancelled. Ticks `progress` like [`accept_loop`].
pub async fn config_error_loop(
    listener: UnixListener,
    why: String,
    stop: CancellationToken,
    progress: Progress,
) {
    let connections = TaskTracker::new();
    let response = unavailable(&format!("configuration error: {why}"));
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = progress.idle(listener.accept()) => match accepted {
                Ok((stream, _)) => {
                    let response = response.clone();
                    connections.spawn(async move { answer_and_close(stream, &response).await });
                }
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                }
            },
        }
        progress.tick();
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Answers a connection beyond the cap, when no open one can be shed.
async fn refuse_busy(mut stream: UnixStream, cap: usize) {
    let response = unavailable(&format!(
        "too many connections: all {cap} are inside a request; try again"
    ));
    let _ = write_response(&mut stream, &response).await;
    let _ = stream.shutdown().await;
}

/// Serves one connection until the peer closes it, a protocol error closes it, `stop` is
/// cancelled between requests, or it is shed for a new one while idle.
async fn serve_connection(
    stream: UnixStream,
    broker: Arc<Broker>,
    stop: CancellationToken,
    entry: Entry,
) {
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
            () = entry.shed.cancelled() => {
                tracing::debug!(uid, pid, "closing an idle connection to make room for a new one");
                let _ = write.shutdown().await;
                break;
            }
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
        entry.set_busy(true);
        let request = line
            .strip_suffix(b"\n")
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .unwrap_or(&line);
        let answer = broker.handle(request).await;
        if let Err(e) = write_line(&mut write, answer.encode()).await {
            tracing::debug!(uid, pid, error = %e, "cannot answer; closing");
            break;
        }
        entry.set_busy(false);
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
    let response = Response::Error {
        error,
        code: Some(ErrorCode::NotAllowed),
    };
    answer_and_close(stream, &response).await;
}

/// Writes `response`, shuts down the sending side, and drains what the client sends (at
/// most [`REFUSAL_LINGER`], [`MAX_LINE`] bytes) before closing: see [`refuse`].
async fn answer_and_close(stream: UnixStream, response: &Response) {
    let (mut read, mut write) = stream.into_split();
    if write_response(&mut write, response).await.is_err() {
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
    write_line(w, Answer::Plain(response.clone()).encode()).await
}

/// An answer to one request: a [`Response`], or a claim answer whose job spec is written as
/// the exact text it was submitted as.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Any response.
    Plain(Response),
    /// The answer to `claim` or `complete_and_claim`.
    Job(Option<Claimed>),
}

impl Answer {
    /// The answer's line, without its newline; an error line if it cannot be encoded or is
    /// longer than [`MAX_LINE`].
    pub fn encode(&self) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct JobLine<'a> {
            result: &'static str,
            job: Option<RawJob<'a>>,
        }
        #[derive(serde::Serialize)]
        struct RawJob<'a> {
            id: u64,
            spec: &'a serde_json::value::RawValue,
            attempt: u32,
            lease_secs: u64,
        }
        let encoded = match self {
            Answer::Plain(response) => serde_json::to_vec(response),
            Answer::Job(job) => serde_json::to_vec(&JobLine {
                result: "job",
                job: job.as_ref().map(|j| RawJob {
                    id: j.id,
                    spec: &j.spec,
                    attempt: j.attempt,
                    lease_secs: j.lease_secs,
                }),
            }),
        };
        match encoded {
            Ok(out) if out.len() <= MAX_LINE => out,
            Ok(out) => error_line(&format!(
                "response of {} bytes exceeds MAX_LINE {MAX_LINE}",
                out.len()
            )),
            Err(e) => error_line(&format!("cannot encode the response: {e}")),
        }
    }
}

/// Writes `out` and a newline, within [`WRITE_TIMEOUT`].
async fn write_line(w: &mut (impl AsyncWrite + Unpin), mut out: Vec<u8>) -> std::io::Result<()> {
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
