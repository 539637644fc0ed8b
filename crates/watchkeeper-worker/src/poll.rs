//! The poll loop: one task that owns the connection to the daemon, claims jobs, reports their
//! outcomes, renews leases and writes the heartbeat, ticking the watchdog once per cycle. A
//! claimed job runs in a task beside it, so the loop keeps cycling (and ticking) while the job
//! runs and while the daemon is unreachable.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use tokio::task::{JoinError, JoinHandle};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use watchkeeper::heartbeat::HealthStatus;
use watchkeeper::{Lifecycle, Progress};
use watchkeeper_jobs::{ClaimedJob, Client, ClientError, JobSpec, Request, Response};

use crate::config::BACKOFF_INITIAL_MS;
use crate::heartbeat::{self, WorkerHeartbeat};
use crate::job::{self, JobEnd};

/// How long one request to the daemon (or a connection and its ping) may take. The loop
/// declares a busy window of this bound while it waits, so a slow answer does not stall the
/// watchdog, and a daemon that accepts but never answers counts as lost.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// After the grace period, how long a stopping worker keeps trying to report what it still
/// holds (the `release` of a killed job, outcomes kept through an outage).
pub(crate) const REPORT_GRACE: Duration = Duration::from_secs(3);

/// How often the slow-start drill sends `EXTEND_TIMEOUT_USEC=`, and by how much it extends.
const SLOW_START_STEP: Duration = Duration::from_secs(1);
const SLOW_START_EXTEND: Duration = Duration::from_secs(3);

/// How many outcomes refused after a lost lease are remembered, so that a job handed out again
/// is reported rather than run a second time.
const REMEMBERED_REFUSALS: usize = 256;

/// The shortest lease renewal period.
const MIN_RENEW_EVERY: Duration = Duration::from_millis(100);

/// Fault drills: off unless asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Drills {
    pub(crate) hang_after: Option<u64>,
    pub(crate) crash_after: Option<u64>,
    pub(crate) stale_heartbeat_after: Option<u64>,
    pub(crate) slow_start: Option<Duration>,
}

/// Everything the loop needs to know, resolved from the options and the configuration file.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) socket: PathBuf,
    pub(crate) name: String,
    pub(crate) config: crate::config::Config,
    pub(crate) poll_interval: Duration,
    /// The longest the loop sleeps between two ticks, whatever the poll interval: a quarter of
    /// the watchdog timeout, when there is one.
    pub(crate) max_sleep: Option<Duration>,
    pub(crate) drills: Drills,
    /// Where the credentials jobs ask for are read from (`$CREDENTIALS_DIRECTORY`).
    pub(crate) credentials: watchkeeper::credentials::Credentials,
}

/// The handles the loop gets from the service.
#[derive(Debug)]
pub(crate) struct Supervision {
    pub(crate) lifecycle: Lifecycle,
    pub(crate) progress: Progress,
    pub(crate) stop: CancellationToken,
    pub(crate) heartbeat: WorkerHeartbeat,
    /// To stop the service when the daemon refuses the worker for good.
    pub(crate) controller: Option<watchkeeper::service::Controller>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    /// Reported with `complete`, whatever the exit code.
    completed: u64,
    /// Of those, the ones that did not exit 0.
    failed: u64,
    denied: u64,
    quarantined: u64,
    released: u64,
    /// Killed because their lease was lost.
    lost: u64,
}

/// The job in flight.
#[derive(Debug)]
struct Running {
    id: u64,
    task: JoinHandle<JobEnd>,
    kill: CancellationToken,
    renew_every: Duration,
    next_renew: Instant,
    /// False once the daemon refused a renewal (the lease is gone).
    renewing: bool,
    /// The daemon refused a renewal: the job was killed at once (the daemon may have handed it
    /// to another worker already), and nothing is reported for it.
    lease_lost: bool,
}

/// Set when `SIGTERM` (or another stop request) arrives.
#[derive(Debug, Clone, Copy)]
struct Stopping {
    /// Until then a running job may finish by itself.
    grace_until: Instant,
    /// Until then outcomes still held are offered to the daemon.
    report_until: Instant,
}

/// Why a request got no usable answer.
#[derive(Debug)]
enum CallError {
    /// The daemon answered with an error: the request was refused, the connection is fine.
    Refused(String),
    /// No connection, or it was just lost (and dropped).
    Lost,
}

/// What ended a wait.
enum Wake {
    Stop,
    JobEnded(Result<JobEnd, JoinError>),
    Timer,
}

#[derive(Debug)]
pub(crate) struct PollLoop {
    settings: Settings,
    sup: Supervision,
    client: Option<Client>,
    /// `READY=1` was sent (or refused because the service was already stopping).
    ready: bool,
    /// Why the daemon is unreachable, while it is.
    daemon_error: Option<String>,
    /// When the daemon became unreachable, for the log line on reconnection.
    down_since: Option<Instant>,
    /// Failed attempts in a row since then.
    failures: u32,
    backoff: Duration,
    next_connect: Instant,
    next_poll: Instant,
    /// Claim again at once (the last claim returned a job that needed no running).
    again: bool,
    running: Option<Running>,
    /// Outcomes not yet acknowledged by the daemon, oldest first.
    unreported: VecDeque<Request>,
    /// `(job id, exit code)` of jobs that ran here but whose `complete` was refused.
    refused: VecDeque<(u64, Option<i32>)>,
    counters: Counters,
    stopping: Option<Stopping>,
    last_status: Option<String>,
    /// Why the worker stops itself: a permanent refusal by the daemon.
    fatal: Option<String>,
    /// The daemon answers `complete_and_claim` (false after it did not know it).
    combined_supported: bool,
}

impl PollLoop {
    pub(crate) fn new(settings: Settings, sup: Supervision) -> Self {
        let now = Instant::now();
        PollLoop {
            settings,
            sup,
            client: None,
            ready: false,
            daemon_error: None,
            down_since: None,
            failures: 0,
            backoff: Duration::from_millis(BACKOFF_INITIAL_MS),
            next_connect: now,
            next_poll: now,
            again: false,
            running: None,
            unreported: VecDeque::new(),
            refused: VecDeque::new(),
            counters: Counters::default(),
            stopping: None,
            last_status: None,
            fatal: None,
            combined_supported: true,
        }
    }

    /// Runs until the service stops and nothing is left to do (or to report within the bound).
    /// Returns why it stopped the service itself, if it did: the daemon refused the worker for
    /// good (a permanent error, see [`ClientError::is_permanent`]).
    pub(crate) async fn run(mut self) -> Option<String> {
        if let Some(delay) = self.settings.drills.slow_start {
            self.slow_start(delay).await;
        }
        loop {
            self.wait().await;
            let cycles = self.sup.heartbeat.cycles();
            if self.settings.drills.hang_after == Some(cycles) {
                // As for the crash drill below: the heartbeat freezes at this cycle.
                self.sup.heartbeat.flush().await;
                tracing::warn!(cycles, "drill: the poll loop hangs now");
                std::future::pending::<()>().await;
            }
            if self.settings.drills.crash_after == Some(cycles) {
                // The heartbeat is written at most once a second: make it show the cycle the
                // drill crashed at, as the drill promises.
                self.sup.heartbeat.flush().await;
                tracing::error!(cycles, "drill: crashing (abort)");
                std::process::abort();
            }
            self.cycle().await;
            if self.fatal.is_some() && self.stopping.is_none() {
                if let Some(controller) = &self.sup.controller {
                    controller.request_shutdown().await;
                }
                self.begin_stop();
            }
            self.sup.heartbeat.next_cycle();
            self.sup.progress.tick();
            self.publish().await;
            if self.finished() {
                break;
            }
        }
        self.finish().await;
        self.fatal.take()
    }

    /// The daemon refused the worker in a way no retry can change (its uid is not allowed, the
    /// socket cannot be used): no more connections, and the worker stops (exit 78).
    fn permanent(&mut self, e: &ClientError) {
        let text = match e {
            ClientError::NotAllowed { reason, .. } => format!("refused by the daemon: {reason}"),
            other => format!("cannot use the daemon's socket: {}", crate::chain(other)),
        };
        tracing::error!("{text}; stopping (a restart would not help)");
        self.client = None;
        self.daemon_error = Some(text.clone());
        // Never again: the stop below ends the loop.
        self.next_connect = Instant::now() + Duration::from_secs(86_400);
        self.fatal.get_or_insert(text);
    }

    /// The slow-start drill: waits `delay` before the first connection, asking the manager for
    /// more time every second, as a service with a long initialisation does.
    async fn slow_start(&mut self, delay: Duration) {
        tracing::warn!(?delay, "drill: slow start");
        let end = Instant::now() + delay;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            if let Err(e) = self.sup.lifecycle.extend_timeout(SLOW_START_EXTEND).await {
                tracing::warn!(error = %e, "EXTEND_TIMEOUT_USEC not sent");
            }
            self.set_status(format!(
                "starting: slow-start drill, {}s left",
                left.as_secs_f64().ceil()
            ))
            .await;
            self.sup.progress.tick();
            tokio::select! {
                () = self.sup.stop.cancelled() => {
                    self.begin_stop();
                    return;
                }
                () = tokio::time::sleep(left.min(SLOW_START_STEP)) => {}
            }
        }
    }

    /// Sleeps until the next thing to do: the next poll, a reconnection, a lease renewal, the
    /// end of the grace period, the job's end or a stop request.
    async fn wait(&mut self) {
        let mut wake = self.next_poll;
        if let Some(max) = self.settings.max_sleep {
            wake = wake.min(Instant::now() + max);
        }
        if self.client.is_none() {
            wake = wake.min(self.next_connect);
        }
        if let Some(r) = &self.running {
            if self.client.is_some() && r.renewing {
                wake = wake.min(r.next_renew);
            }
            if let Some(s) = &self.stopping
                && !r.kill.is_cancelled()
            {
                wake = wake.min(s.grace_until);
            }
        }
        // When stopping, the end of the reporting window ends the loop (see `finished`): a long
        // poll interval or backoff must not sleep past it, nor past the stop bound.
        if let Some(s) = &self.stopping {
            wake = wake.min(s.report_until);
        }
        let stop = self.sup.stop.clone();
        let stopping = self.stopping.is_some();
        let woke = {
            let job = async {
                match self.running.as_mut() {
                    Some(r) => (&mut r.task).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = stop.cancelled(), if !stopping => Wake::Stop,
                end = job => Wake::JobEnded(end),
                () = tokio::time::sleep_until(wake) => Wake::Timer,
            }
        };
        match woke {
            Wake::Stop => self.begin_stop(),
            Wake::JobEnded(end) => self.job_ended(end),
            Wake::Timer => {}
        }
    }

    fn begin_stop(&mut self) {
        let now = Instant::now();
        let grace = self.settings.config.grace();
        self.stopping = Some(Stopping {
            grace_until: now + grace,
            report_until: now + grace + REPORT_GRACE,
        });
        match &self.running {
            Some(r) => tracing::info!(
                job = r.id,
                ?grace,
                "stopping: no more claims; waiting for the running job"
            ),
            None => tracing::info!("stopping: no more claims"),
        }
    }

    /// One cycle: kill an overdue job when stopping, reconnect, report, renew, claim.
    async fn cycle(&mut self) {
        let now = Instant::now();
        if let (Some(s), Some(r)) = (&self.stopping, &self.running)
            && now >= s.grace_until
            && !r.kill.is_cancelled()
        {
            tracing::warn!(
                job = r.id,
                grace = ?self.settings.config.grace(),
                "job still running after the grace period: killing it to release it"
            );
            r.kill.cancel();
        }
        // A stopping worker connects only to report what it holds.
        let needed =
            self.stopping.is_none() || self.running.is_some() || !self.unreported.is_empty();
        if needed && self.client.is_none() && now >= self.next_connect {
            self.connect().await;
        }
        self.report().await;
        self.renew().await;
        // The stop request may have arrived after `wait` returned (on its timer): no claim then.
        let may_claim = self.stopping.is_none()
            && !self.sup.stop.is_cancelled()
            && self.running.is_none()
            && self.unreported.is_empty()
            && (self.again || now >= self.next_poll);
        self.again = false;
        if may_claim && self.client.is_some() {
            self.claim().await;
            // A denial or a quarantine is reported in the same cycle.
            self.report().await;
        }
        let now = Instant::now();
        if self.again {
            self.next_poll = now;
        } else if now >= self.next_poll {
            self.next_poll = now + self.settings.poll_interval;
        }
    }

    async fn connect(&mut self) {
        let socket = self.settings.socket.clone();
        let attempt = async {
            let mut client = Client::connect(&socket).await?;
            let version = client.ping().await?;
            Ok::<_, ClientError>((client, version))
        };
        let limit = self.request_timeout();
        let result = {
            let _busy = self.sup.progress.busy(limit + Duration::from_secs(1));
            tokio::time::timeout(limit, attempt).await
        };
        match result {
            Ok(Ok((client, version))) => {
                self.client = Some(client);
                self.backoff = Duration::from_millis(BACKOFF_INITIAL_MS);
                self.daemon_error = None;
                match self.down_since.take() {
                    Some(since) => tracing::info!(
                        %version,
                        outage = ?since.elapsed(),
                        unreported = self.unreported.len(),
                        "reconnected to the daemon after {:?}",
                        since.elapsed()
                    ),
                    None => {
                        tracing::info!(%version, socket = %socket.display(), "connected to the daemon")
                    }
                }
                if !self.ready {
                    self.ready = true;
                    if self.stopping.is_none() {
                        let status = self.status_text();
                        match self.sup.lifecycle.ready_with_status(&status).await {
                            Ok(_) => self.last_status = Some(status),
                            Err(e) => tracing::warn!(error = %e, "READY=1 not sent"),
                        }
                    }
                }
            }
            Ok(Err(e)) if e.is_permanent() => self.permanent(&e),
            Ok(Err(e)) => self.unreachable(crate::chain(&e)),
            Err(_) => self.unreachable(format!(
                "{}: no answer to ping within {limit:?}",
                socket.display()
            )),
        }
    }

    /// Records that the daemon cannot be reached and schedules the next attempt.
    ///
    /// The reason is in the message itself (the journal's usual view shows only the message).
    /// The first failure is logged at info: a planned restart of the daemon is over within the
    /// first backoff, and its reconnection too. Only a second failure in a row is a warning;
    /// later ones are debug.
    fn unreachable(&mut self, reason: String) {
        let now = Instant::now();
        let retry_in = self.backoff;
        match self.down_since {
            None => {
                self.down_since = Some(now);
                self.failures = 1;
                tracing::info!(
                    error = %reason,
                    "daemon unreachable: {reason}; reconnecting in {retry_in:?}"
                );
            }
            Some(since) => {
                self.failures += 1;
                if self.failures == 2 {
                    tracing::warn!(
                        error = %reason,
                        "daemon still unreachable after {:?}: {reason}; reconnecting with backoff \
                         up to {:?}",
                        since.elapsed(),
                        self.settings.config.backoff_max()
                    );
                } else {
                    tracing::debug!(error = %reason, ?retry_in, "daemon still unreachable: {reason}");
                }
            }
        }
        self.client = None;
        self.daemon_error = Some(reason);
        self.next_connect = now + self.backoff;
        self.backoff = (self.backoff * 2).min(self.settings.config.backoff_max());
    }

    /// Sends one request, bounded by [`REQUEST_TIMEOUT`]. A broken connection, a timeout or an
    /// answer out of protocol drops the connection (the stream can no longer be trusted).
    async fn call(&mut self, req: &Request) -> Result<Response, CallError> {
        let limit = self.request_timeout();
        let Some(client) = self.client.as_mut() else {
            return Err(CallError::Lost);
        };
        let result = {
            let _busy = self.sup.progress.busy(limit + Duration::from_secs(1));
            tokio::time::timeout(limit, client.call(req)).await
        };
        match result {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(ClientError::Refused { error, .. })) => Err(CallError::Refused(error)),
            Ok(Err(e)) if e.is_permanent() => {
                self.permanent(&e);
                Err(CallError::Lost)
            }
            Ok(Err(e)) => {
                self.unreachable(crate::chain(&e));
                Err(CallError::Lost)
            }
            Err(_) => {
                self.unreachable(format!(
                    "{}: no answer within {limit:?}",
                    self.settings.socket.display()
                ));
                Err(CallError::Lost)
            }
        }
    }

    /// The bound on the next request: [`REQUEST_TIMEOUT`], or less while stopping, so that a
    /// daemon that does not answer cannot delay the kill at the end of the grace period or the
    /// stop itself.
    fn request_timeout(&self) -> Duration {
        const FLOOR: Duration = Duration::from_millis(50);
        let Some(s) = &self.stopping else {
            return REQUEST_TIMEOUT;
        };
        let now = Instant::now();
        let deadline = match &self.running {
            Some(r) if !r.kill.is_cancelled() && now < s.grace_until => s.grace_until,
            _ => s.report_until,
        };
        deadline
            .saturating_duration_since(now)
            .clamp(FLOOR, REQUEST_TIMEOUT)
    }

    /// A call that must be answered by `done`.
    async fn call_done(&mut self, req: &Request) -> Result<(), CallError> {
        match self.call(req).await? {
            Response::Done => Ok(()),
            other => {
                self.unreachable(format!("unexpected answer {other:?} to {}", op(req)));
                Err(CallError::Lost)
            }
        }
    }

    /// Offers the outcomes held, oldest first, until one cannot be delivered.
    async fn report(&mut self) {
        while self.client.is_some()
            && let Some(req) = self.unreported.front().cloned()
        {
            if let Some(done) = self.complete_and_claim(&req).await {
                if done {
                    continue;
                }
                break;
            }
            match self.call_done(&req).await {
                Ok(()) => {
                    self.unreported.pop_front();
                    tracing::info!(job = job_id(&req), op = op(&req), "reported");
                }
                Err(CallError::Refused(error)) => self.outcome_refused(&req, &error),
                Err(CallError::Lost) => break,
            }
        }
    }

    /// The daemon refused the outcome at the front of the queue: it is dropped, and a job that
    /// ran here is remembered, so that it is reported, not run again, if it comes back.
    fn outcome_refused(&mut self, req: &Request, error: &str) {
        self.unreported.pop_front();
        tracing::warn!(
            job = job_id(req),
            op = op(req),
            %error,
            "the daemon refused the outcome (the lease may have expired); dropping it"
        );
        if let Request::Complete { id, exit_code, .. } = req {
            if self.refused.len() == REMEMBERED_REFUSALS {
                self.refused.pop_front();
            }
            self.refused.push_back((*id, *exit_code));
        }
    }

    /// Reports a job's outcome and claims the next one in one round trip (one commit in the
    /// daemon), when the outcome is the only one held and the worker would claim next anyway.
    /// `None`: not applicable, report `req` alone; `Some(true)`: reported (and the next job,
    /// if any, dispatched); `Some(false)`: the connection was lost.
    async fn complete_and_claim(&mut self, req: &Request) -> Option<bool> {
        let Request::Complete {
            id,
            worker,
            exit_code,
        } = req
        else {
            return None;
        };
        let would_claim = self.combined_supported
            && self.unreported.len() == 1
            && self.running.is_none()
            && self.stopping.is_none()
            && !self.sup.stop.is_cancelled();
        if !would_claim {
            return None;
        }
        let combined = Request::CompleteAndClaim {
            id: *id,
            worker: worker.clone(),
            exit_code: *exit_code,
        };
        match self.call(&combined).await {
            Ok(Response::Job { job }) => {
                self.unreported.pop_front();
                tracing::info!(job = id, op = "complete", "reported");
                match job {
                    Some(job) => self.dispatch(job),
                    None => {
                        // The claim is answered: nothing queued. Poll again after the interval.
                        self.again = false;
                        self.next_poll = Instant::now() + self.settings.poll_interval;
                    }
                }
                Some(true)
            }
            Ok(other) => {
                self.unreachable(format!("unexpected answer {other:?} to complete_and_claim"));
                Some(false)
            }
            // A daemon that predates the request: report alone, from now on.
            Err(CallError::Refused(error)) if error.contains("unknown variant") => {
                tracing::info!(%error, "the daemon has no complete_and_claim; reporting alone");
                self.combined_supported = false;
                None
            }
            // Refused like a `complete` (nothing was claimed): never offered twice.
            Err(CallError::Refused(error)) => {
                self.outcome_refused(req, &error);
                Some(true)
            }
            Err(CallError::Lost) => Some(false),
        }
    }

    async fn renew(&mut self) {
        let now = Instant::now();
        let Some(r) = &self.running else { return };
        if !r.renewing || r.kill.is_cancelled() || now < r.next_renew || self.client.is_none() {
            return;
        }
        let id = r.id;
        let req = Request::Renew {
            id,
            worker: self.settings.name.clone(),
        };
        let result = self.call_done(&req).await;
        let Some(r) = self.running.as_mut() else {
            return;
        };
        match result {
            Ok(()) => {
                tracing::debug!(job = id, "lease renewed");
                r.next_renew = Instant::now() + r.renew_every;
            }
            Err(CallError::Refused(error)) => {
                // The lease is gone: the daemon may already have handed the job to another
                // worker. Running on would run it twice at the same time.
                tracing::warn!(
                    job = id,
                    %error,
                    "lease lost: the daemon refused to renew it ({error}); killing the job's \
                     process group"
                );
                r.renewing = false;
                r.lease_lost = true;
                r.kill.cancel();
            }
            // Renewed after reconnecting: `next_renew` is still due.
            Err(CallError::Lost) => {}
        }
    }

    async fn claim(&mut self) {
        let req = Request::Claim {
            worker: self.settings.name.clone(),
        };
        match self.call(&req).await {
            Ok(Response::Job { job: None }) => {}
            Ok(Response::Job { job: Some(job) }) => self.dispatch(job),
            Ok(other) => self.unreachable(format!("unexpected answer {other:?} to claim")),
            Err(CallError::Refused(error)) => {
                tracing::warn!(%error, "the daemon refused the claim");
            }
            Err(CallError::Lost) => {}
        }
    }

    /// Decides what to do with a claimed job: report an outcome kept from before, quarantine,
    /// deny, or run it.
    fn dispatch(&mut self, job: ClaimedJob) {
        let id = job.id;
        let worker = self.settings.name.clone();
        if let Some(pos) = self.refused.iter().position(|(j, _)| *j == id) {
            let exit_code = self.refused.get(pos).and_then(|(_, code)| *code);
            self.refused.remove(pos);
            tracing::warn!(
                job = id,
                attempt = job.attempt,
                ?exit_code,
                "job handed out again after its outcome was refused; it already ran here, so \
                 reporting that outcome instead of running it twice"
            );
            self.unreported.push_back(Request::Complete {
                id,
                worker,
                exit_code,
            });
            self.again = true;
            return;
        }
        let parsed = crate::secrets::split_spec(&job.spec)
            .and_then(|(rest, names)| Ok((JobSpec::parse(&rest)?, names)));
        let (spec, wanted) = match parsed {
            Ok(parsed) => parsed,
            Err(reason) => {
                tracing::warn!(job = id, spec = %job.spec, %reason, "malformed job: quarantining it");
                self.counters.quarantined += 1;
                self.unreported
                    .push_back(Request::Quarantine { id, worker, reason });
                self.again = true;
                return;
            }
        };
        let program = spec.command.first().cloned().unwrap_or_default();
        if !self.settings.config.allows(&program) {
            let reason = format!("program {program:?} is not on the allowlist of worker {worker}");
            tracing::warn!(job = id, command = ?spec.command, "{reason}: denying the job");
            self.counters.denied += 1;
            self.unreported
                .push_back(Request::Deny { id, worker, reason });
            self.again = true;
            return;
        }
        let denied = wanted
            .iter()
            .find(|name| !self.settings.config.allows_credential(name))
            .map(|name| {
                format!("credential {name:?} is not on the credentials list of worker {worker}")
            });
        let secrets = match denied {
            Some(reason) => Err(reason),
            None => crate::secrets::read(&self.settings.credentials, &wanted).map_err(|why| {
                format!("worker {worker} cannot hand the job its credential: {why}")
            }),
        };
        let secrets = match secrets {
            Ok(secrets) => secrets,
            Err(reason) => {
                tracing::warn!(job = id, credentials = ?wanted, "{reason}: denying the job");
                self.counters.denied += 1;
                self.unreported
                    .push_back(Request::Deny { id, worker, reason });
                self.again = true;
                return;
            }
        };
        let renew_every = (Duration::from_secs(job.lease_secs) / 3).max(MIN_RENEW_EVERY);
        tracing::info!(
            job = id,
            attempt = job.attempt,
            command = ?spec.command,
            timeout_secs = spec.timeout_secs,
            lease_secs = job.lease_secs,
            credentials = ?wanted,
            "running job"
        );
        let kill = CancellationToken::new();
        let ctx = job::JobContext {
            id,
            attempt: job.attempt,
            worker,
            secrets,
        };
        let task = tokio::spawn(job::run(spec, ctx, kill.clone()));
        self.running = Some(Running {
            id,
            task,
            kill,
            renew_every,
            next_renew: Instant::now() + renew_every,
            renewing: true,
            lease_lost: false,
        });
    }

    fn job_ended(&mut self, end: Result<JobEnd, JoinError>) {
        let Some(r) = self.running.take() else { return };
        let worker = self.settings.name.clone();
        let end = end.unwrap_or_else(|e| {
            tracing::error!(job = r.id, error = %e, "the job's task failed");
            JobEnd::NotStarted(format!("the job's task failed: {e}"))
        });
        if r.lease_lost && end == JobEnd::Stopped {
            self.counters.lost += 1;
            tracing::warn!(
                job = r.id,
                "job killed after its lease was lost; not reported (the daemon queues it again)"
            );
            self.again = true;
            return;
        }
        let req = if end == JobEnd::Stopped {
            self.counters.released += 1;
            tracing::info!(
                job = r.id,
                "job killed at the end of the grace period: releasing it"
            );
            Request::Release { id: r.id, worker }
        } else {
            self.counters.completed += 1;
            let exit_code = end.exit_code();
            if exit_code != Some(0) {
                self.counters.failed += 1;
            }
            match exit_code {
                Some(0) => tracing::info!(job = r.id, "job {end}"),
                _ => tracing::warn!(job = r.id, "job {end}"),
            }
            Request::Complete {
                id: r.id,
                worker,
                exit_code,
            }
        };
        self.unreported.push_back(req);
        self.again = true;
    }

    fn health(&self) -> HealthStatus {
        if self.stopping.is_some() {
            HealthStatus::Stopping
        } else if !self.ready {
            HealthStatus::Starting
        } else if self.daemon_error.is_some() {
            HealthStatus::Degraded
        } else {
            HealthStatus::Ok
        }
    }

    fn counts(&self) -> String {
        let c = &self.counters;
        format!(
            "{} completed, {} denied, {} quarantined",
            c.completed, c.denied, c.quarantined
        )
    }

    /// The `STATUS=` line for the current state.
    fn status_text(&self) -> String {
        let counts = self.counts();
        let job = self.running.as_ref().map(|r| r.id);
        let held = self.unreported.len();
        if self.stopping.is_some() {
            return match self.running.as_ref() {
                Some(r) if r.kill.is_cancelled() => format!("stopping: killing job {}", r.id),
                Some(r) => format!(
                    "stopping: waiting up to {}s for job {}",
                    self.settings.config.grace_secs, r.id
                ),
                None if held > 0 => format!("stopping: reporting {held} outcome(s)"),
                None => format!("stopping; {counts}"),
            };
        }
        if let Some(error) = &self.daemon_error {
            let state = if self.ready { "degraded" } else { "starting" };
            let mut text = format!("{state}: daemon unreachable: {error}");
            if let Some(id) = job {
                text.push_str(&format!("; running job {id}"));
            }
            if held > 0 {
                text.push_str(&format!("; {held} outcome(s) to report"));
            }
            return text;
        }
        if self.client.is_none() {
            return format!(
                "starting: connecting to the daemon at {}",
                self.settings.socket.display()
            );
        }
        match job {
            Some(id) => format!("running job {id}; {counts}"),
            None => format!("idle; {counts}"),
        }
    }

    async fn set_status(&mut self, text: String) {
        if self.last_status.as_deref() == Some(text.as_str()) {
            return;
        }
        let line = text.replace(['\n', '\0'], " ");
        match self.sup.lifecycle.status(&line) {
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "STATUS not sent"),
        }
        self.last_status = Some(text);
    }

    /// `STATUS=` (when it changed) and the heartbeat; `degraded` while the heartbeat cannot be
    /// written.
    async fn publish(&mut self) {
        let failing = self.sup.heartbeat.check().map(str::to_owned);
        let mut text = self.status_text();
        let mut health = self.health();
        if let Some(error) = &failing
            && self.stopping.is_none()
        {
            text = heartbeat::degraded_status(&text, error);
            health = heartbeat::health(health, true);
        }
        self.set_status(text).await;
        self.write_heartbeat(health).await;
    }

    async fn write_heartbeat(&mut self, health: HealthStatus) {
        let c = self.counters;
        self.sup.heartbeat.publish(heartbeat::Snapshot {
            worker: &self.settings.name,
            health,
            completed: c.completed,
            failed: c.failed,
            denied: c.denied,
            quarantined: c.quarantined,
            released: c.released,
            running_job: self.running.as_ref().map(|r| r.id),
            unreported: self.unreported.len() as u64,
        });
    }

    fn finished(&self) -> bool {
        let Some(s) = &self.stopping else {
            return false;
        };
        self.running.is_none() && (self.unreported.is_empty() || Instant::now() >= s.report_until)
    }

    async fn finish(&mut self) {
        for req in &self.unreported {
            tracing::error!(
                job = job_id(req),
                op = op(req),
                "outcome not reported before stopping; the daemon will hand the job out again \
                 when its lease expires"
            );
        }
        self.set_status(format!("stopped; {}", self.counts())).await;
        self.write_heartbeat(HealthStatus::Stopping).await;
        self.sup.heartbeat.flush().await;
        tracing::info!(
            cycles = self.sup.heartbeat.cycles(),
            completed = self.counters.completed,
            denied = self.counters.denied,
            quarantined = self.counters.quarantined,
            released = self.counters.released,
            lease_lost = self.counters.lost,
            "poll loop finished"
        );
    }
}

fn op(req: &Request) -> &'static str {
    match req {
        Request::Ping => "ping",
        Request::Submit { .. } => "submit",
        Request::Claim { .. } => "claim",
        Request::Renew { .. } => "renew",
        Request::Complete { .. } => "complete",
        Request::CompleteAndClaim { .. } => "complete_and_claim",
        Request::Deny { .. } => "deny",
        Request::Quarantine { .. } => "quarantine",
        Request::Release { .. } => "release",
        Request::Stats => "stats",
        Request::Reload => "reload",
    }
}

fn job_id(req: &Request) -> Option<u64> {
    match req {
        Request::Renew { id, .. }
        | Request::Complete { id, .. }
        | Request::Deny { id, .. }
        | Request::Quarantine { id, .. }
        | Request::Release { id, .. } => Some(*id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
    use tokio::net::UnixListener;
    use watchkeeper::{Service, SystemdEnv};

    use super::*;

    /// A loop with no supervision (no `NOTIFY_SOCKET`, no heartbeat file). The service must be
    /// kept alive while the loop runs.
    fn poll_loop(socket: PathBuf, poll_interval: Duration) -> (PollLoop, Service) {
        let env = SystemdEnv::default();
        let service = Service::builder("test").env(env.clone()).build().unwrap();
        let settings = Settings {
            socket,
            name: "test".into(),
            config: crate::config::Config::default(),
            poll_interval,
            max_sleep: None,
            drills: Drills::default(),
            credentials: watchkeeper::credentials::Credentials::new(None),
        };
        let sup = Supervision {
            lifecycle: service.lifecycle(),
            progress: service.register_loop("poll"),
            stop: CancellationToken::new(),
            heartbeat: WorkerHeartbeat::new(
                watchkeeper::heartbeat::Heartbeat::new("test", &env),
                None,
                None,
            )
            .unwrap(),
            controller: None,
        };
        (PollLoop::new(settings, sup), service)
    }

    /// A broker that answers `ping`, has no job for `claim` and records the requests.
    fn broker(socket: &std::path::Path) -> Arc<Mutex<Vec<Request>>> {
        let listener = UnixListener::bind(socket).unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut lines = BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let req: Request = serde_json::from_str(&line).unwrap();
                        log.lock().unwrap().push(req.clone());
                        let response = match req {
                            Request::Ping => Response::Pong {
                                version: "test".into(),
                            },
                            Request::Claim { .. } => Response::Job { job: None },
                            _ => Response::Done,
                        };
                        let mut out = serde_json::to_vec(&response).unwrap();
                        out.push(b'\n');
                        if w.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        received
    }

    fn claims(received: &Mutex<Vec<Request>>) -> usize {
        let received = received.lock().unwrap();
        received
            .iter()
            .filter(|r| matches!(r, Request::Claim { .. }))
            .count()
    }

    #[tokio::test]
    async fn no_claim_after_a_stop_request_that_came_after_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("daemon.sock");
        let received = broker(&socket);

        // Control: a cycle claims.
        let (mut l, _service) = poll_loop(socket.clone(), Duration::from_secs(3600));
        l.cycle().await;
        assert!(l.client.is_some(), "{:?}", l.daemon_error);
        assert_eq!(claims(&received), 1);

        // `wait` returned on its timer, then SIGTERM: `stopping` is not set yet.
        let (mut l, _service) = poll_loop(socket, Duration::from_secs(3600));
        l.sup.stop.cancel();
        l.cycle().await;
        assert!(l.client.is_some(), "{:?}", l.daemon_error);
        assert_eq!(claims(&received), 1, "claimed after the stop request");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopping_loop_with_an_unreported_outcome_ends_within_the_stop_bound() {
        let dir = tempfile::tempdir().unwrap();
        let (mut l, _service) =
            poll_loop(dir.path().join("absent.sock"), Duration::from_secs(3600));
        let start = Instant::now();
        // The daemon is unreachable, its next attempt and the next poll far off; an outcome is
        // held.
        l.next_connect = start + Duration::from_secs(3600);
        l.next_poll = start + Duration::from_secs(3600);
        l.unreported.push_back(Request::Release {
            id: 1,
            worker: "test".into(),
        });
        l.sup.stop.cancel();
        let grace = l.settings.config.grace();
        l.run().await;
        let took = start.elapsed();
        assert!(took >= grace + REPORT_GRACE, "{took:?}");
        assert!(took < grace + crate::STOP_MARGIN, "{took:?}");
    }
}
