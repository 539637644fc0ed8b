//! The whole lifecycle in one value: [`Service`].
//!
//! Built inside a tokio runtime, a [`Service`] connects to the manager, starts the watchdog
//! keeper and turns signals into lifecycle events:
//!
//! * `SIGTERM`/`SIGINT` → the stop begins: the [`shutdown token`](Service::shutdown_token) is
//!   cancelled and `STOPPING=1` goes out (retried on a full manager queue for as long as the
//!   stop may take); [`Service::run`] then waits for the tasks started with [`Service::spawn`],
//!   up to the stop timeout, sending `EXTEND_TIMEOUT_USEC=` while it waits;
//! * `SIGHUP` → `RELOADING=1` + `MONOTONIC_USEC=` at once (systemd 252's `ExecReload=kill -HUP`
//!   only waits for the reload if `RELOADING=1` arrives before `kill` exits), then the reload
//!   callback given to [`Service::run`], then `READY=1`. A `SIGHUP` during a reload is
//!   remembered: one more reload follows that one's `READY=1`.
//!
//! The stop is idempotent and cannot be cancelled: it runs in a task of its own, so a caller
//! that drops the future of [`Service::request_shutdown`] (a timeout around it) does not lose
//! it, and every later request finds it under way.
//!
//! # A stop during the start
//!
//! `SIGTERM` before `READY=1` is a clean stop, as systemd sees a unit stopped while activating.
//! [`Lifecycle::ready`] then sends nothing and returns `Ok(`[`Delivery::Stopping`]`)`, and
//! [`Service::run`] completes the stop and returns `Ok`, so this exits 0:
//!
//! ```no_run
//! # async fn start_up() {}
//! # #[tokio::main]
//! # async fn main() -> Result<(), watchkeeper::ServiceError> {
//! let service = watchkeeper::Service::builder("demo").build()?;
//! let stop = service.shutdown_token();
//! tokio::select! {
//!     () = start_up() => {}
//!     () = stop.cancelled() => {} // no need to finish starting
//! }
//! service.lifecycle().ready().await?; // Ok(Delivery::Stopping) if the stop came first
//! service.run(watchkeeper::service::no_reload).await?;
//! # Ok(())
//! # }
//! ```
//!
//! [`Delivery::Stopping`]: crate::Delivery::Stopping

use std::collections::BTreeMap;
use std::fmt::{self, Display};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use std::panic::AssertUnwindSafe;

use futures_util::{FutureExt as _, StreamExt as _};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::env::{EnvError, SystemdEnv};
use crate::lifecycle::{Lifecycle, LifecycleError, State};
use crate::notify::{Notification, Notifier, NotifyError};
use crate::watchdog::{Names, Progress, Watchdog};

/// Default bound on a graceful stop; below systemd's default `TimeoutStopSec=` of 90 s.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Default bound on the start, for the retries of `READY=1` on a full manager queue: systemd's
/// `DefaultTimeoutStartSec=`.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(90);

/// How often `EXTEND_TIMEOUT_USEC=` is repeated during a stop, by default.
pub const DEFAULT_EXTEND_INTERVAL: Duration = Duration::from_secs(1);

/// A service could not be set up or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// [`ServiceBuilder::build`] was called outside a tokio runtime.
    #[error("watchkeeper needs a tokio runtime: build the Service inside one")]
    NoRuntime,
    /// A supervision variable is malformed (e.g. `WATCHDOG_USEC=0`).
    #[error(transparent)]
    Env(#[from] EnvError),
    /// The notify socket cannot be used.
    #[error(transparent)]
    Notify(#[from] NotifyError),
    /// A lifecycle message was refused or lost.
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    /// A task started with [`Service::spawn`] or [`Service::spawn_named`] failed (returned an
    /// error or panicked) while the service ran; see [`ServiceBuilder::on_task_failure`].
    #[error("task '{task}' failed: {error}")]
    TaskFailed {
        /// The task's name (`unnamed task #N` for [`Service::spawn`]).
        task: String,
        /// Its error, or the panic's message.
        error: String,
    },
    /// The runtime behind a [`BlockingService`](crate::blocking::BlockingService)'s keeper could
    /// not be started.
    #[error("cannot start the watchdog keeper's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The graceful stop did not finish in time.
    #[error(
        "graceful stop did not finish within {timeout:?}: {still_running} task(s) still running{}",
        UnfinishedNames(unfinished)
    )]
    StopTimeout {
        /// The bound that was exceeded.
        timeout: Duration,
        /// Tasks that had not finished, named or not.
        still_running: usize,
        /// The names of the unfinished tasks started with [`Service::spawn_named`], in the
        /// order they were spawned.
        unfinished: Vec<String>,
    },
}

/// `: 'a', 'b'` after the count, or nothing.
struct UnfinishedNames<'a>(&'a [String]);

impl Display for UnfinishedNames<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return Ok(());
        }
        write!(f, ": {}", Names(self.0))
    }
}

/// What a service does when one of its tasks fails (returns an error or panics) while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TaskFailure {
    /// Stop the service gracefully; [`Service::run`] returns [`ServiceError::TaskFailed`].
    /// The default.
    #[default]
    StopService,
    /// Keep running without the task: it counts as a dead loop, so the watchdog pings stop
    /// and the manager's watchdog restarts the service (if it has one). [`Service::run`]
    /// still returns [`ServiceError::TaskFailed`] when the service stops.
    KeepRunning,
}

/// What a task given to [`Service::spawn`] returns: `()`, or `Result<(), E>` where an `Err` is
/// a failure (see [`TaskFailure`]).
pub trait TaskOutput: Send + 'static {
    /// The failure's description, if this output is one.
    fn failure(&self) -> Option<String>;
}

impl TaskOutput for () {
    fn failure(&self) -> Option<String> {
        None
    }
}

impl<E: Display + Send + 'static> TaskOutput for Result<(), E> {
    fn failure(&self) -> Option<String> {
        self.as_ref().err().map(ToString::to_string)
    }
}

/// The notifier of `env`; an address family this crate cannot reach (e.g. `vsock:`) runs
/// unsupervised, with a warning.
pub(crate) fn notifier_from_env(env: &SystemdEnv) -> Result<Arc<Notifier>, ServiceError> {
    let notifier = match Notifier::from_env(env) {
        Err(NotifyError::Unsupported { addr }) => {
            tracing::warn!(notify_socket = %addr, "NOTIFY_SOCKET address family not supported; running unsupervised");
            Notifier::disabled()
        }
        other => other?,
    };
    Ok(Arc::new(notifier))
}

/// The watchdog keeper of a service: pings through `notifier` as the lifecycle allows, and
/// puts a stalled loop's name into `STATUS=`.
pub(crate) fn keeper(
    watchdog: &Watchdog,
    lifecycle: &Lifecycle,
    notifier: Arc<Notifier>,
) -> impl Future<Output = ()> + Send + 'static {
    let lc = lifecycle.clone();
    watchdog.clone().keep(
        lifecycle.subscribe(),
        move |msgs| {
            notifier.notify(msgs).map(drop).inspect_err(|e| {
                if !matches!(e, NotifyError::QueueFull { .. }) {
                    notifier.log_failure("WATCHDOG", e);
                }
            })
        },
        move |stalled| {
            let stall = stalled.map(|names| format!("stalled: no progress in {}", Names(names)));
            // Never waits; failures are logged by the lifecycle.
            let _ = lc.set_stall(stall);
        },
    )
}

/// Builds a [`Service`]. Every setting has a default.
#[derive(Debug)]
#[must_use]
pub struct ServiceBuilder {
    name: String,
    env: Option<SystemdEnv>,
    start_timeout: Duration,
    stop_timeout: Duration,
    extend_interval: Duration,
    signals: bool,
    on_task_failure: TaskFailure,
}

impl ServiceBuilder {
    /// What to do when a spawned task fails while the service runs. Default
    /// [`TaskFailure::StopService`].
    pub fn on_task_failure(mut self, what: TaskFailure) -> Self {
        self.on_task_failure = what;
        self
    }

    /// The environment to use. Default: [`SystemdEnv::from_env`], read once in `build`.
    pub fn env(mut self, env: SystemdEnv) -> Self {
        self.env = Some(env);
        self
    }

    /// How long the start may take; keep it at the unit's `TimeoutStartSec=`. `READY=1` is
    /// retried this long while the manager's queue is full (`sd_notify()` would block).
    /// Default [`DEFAULT_START_TIMEOUT`].
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Bound on the graceful stop. Default [`DEFAULT_STOP_TIMEOUT`]; keep it below the unit's
    /// `TimeoutStopSec=`. `STOPPING=1` is retried this long on a full manager queue.
    /// `Duration::MAX` means no bound.
    pub fn stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }

    /// How often `EXTEND_TIMEOUT_USEC=` is repeated while stopping. Default
    /// [`DEFAULT_EXTEND_INTERVAL`].
    pub fn extend_interval(mut self, interval: Duration) -> Self {
        self.extend_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Whether to handle `SIGTERM`, `SIGINT` and `SIGHUP`. Default `true`. Without it, call
    /// [`Service::request_shutdown`] and [`Service::request_reload`] yourself.
    pub fn handle_signals(mut self, yes: bool) -> Self {
        self.signals = yes;
        self
    }

    /// Connects to the manager, arms the watchdog keeper and installs the signal handlers.
    ///
    /// Fails on a malformed environment (`WATCHDOG_USEC=0`, a bad `WATCHDOG_PID`, a bad
    /// `NOTIFY_SOCKET`) and outside a tokio runtime.
    pub fn build(self) -> Result<Service, ServiceError> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| ServiceError::NoRuntime)?;
        let env = self.env.unwrap_or_else(SystemdEnv::from_env);
        let notifier = notifier_from_env(&env)?;
        let shutdown = CancellationToken::new();
        let watchdog = Watchdog::with_shutdown(env.watchdog(std::process::id())?, shutdown.clone());
        let lifecycle =
            Lifecycle::with_bounds(notifier.clone(), self.start_timeout, self.stop_timeout);
        let (reload_tx, reload_rx) = mpsc::channel(4);
        let control = Control {
            stop: Arc::new(StopState {
                started: AtomicBool::new(false),
                told: watch::Sender::new(false),
            }),
            again_queued: Arc::new(AtomicBool::new(false)),
            lifecycle: lifecycle.clone(),
            watchdog: watchdog.clone(),
            shutdown: shutdown.clone(),
            reload_tx,
            runtime: rt.clone(),
            failure: Arc::new(Mutex::new(None)),
            on_task_failure: self.on_task_failure,
        };

        let keeper = rt.spawn(keeper(&watchdog, &lifecycle, notifier.clone()));

        let signals = if self.signals {
            match signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP]) {
                Ok(signals) => {
                    let handle = signals.handle();
                    let task = rt.spawn(control.clone().handle_signals(signals));
                    Some(SignalTask {
                        handle,
                        task,
                        _defaults: SignalDefaults::acquire(),
                    })
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot install signal handlers; SIGTERM will kill the process without a graceful stop");
                    None
                }
            }
        } else {
            None
        };

        Ok(Service {
            name: self.name,
            env,
            control,
            watchdog_keeper: keeper,
            signals,
            reload_rx,
            tracker: TaskTracker::new(),
            named: NamedTasks::default(),
            stop_timeout: self.stop_timeout,
            extend_interval: self.extend_interval,
        })
    }
}

/// The process-wide default action for the handled signals.
///
/// Once signal-hook has installed its handler for a signal it stays installed; with no
/// [`Service`] left to read the signals they would be ignored. One conditional default action
/// per signal, registered once for the process, brings back the default action (terminate)
/// whenever no Service handles signals. (One per Service, with its `SigId` discarded, let a
/// dropped Service's default action kill the process when a later Service got `SIGTERM`;
/// unregistering it on drop instead would leave the signals ignored after the last Service.)
#[derive(Debug)]
pub(crate) struct SignalDefaults {
    /// Services that handle signals now.
    live: usize,
    /// Whether the conditional defaults are registered.
    registered: bool,
    /// True while no Service handles signals: the default action runs.
    restore: Arc<AtomicBool>,
}

static SIGNAL_DEFAULTS: LazyLock<Mutex<SignalDefaults>> = LazyLock::new(|| {
    Mutex::new(SignalDefaults {
        live: 0,
        registered: false,
        restore: Arc::new(AtomicBool::new(false)),
    })
});

/// A live Service's share of [`SignalDefaults`]; dropping it may restore the defaults.
#[derive(Debug)]
pub(crate) struct SignalDefaultsGuard;

impl SignalDefaults {
    pub(crate) fn acquire() -> SignalDefaultsGuard {
        // A panic under this lock leaves two plain fields; the counts stay usable.
        let mut d = SIGNAL_DEFAULTS
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !d.registered {
            d.registered = true;
            for sig in [SIGTERM, SIGINT, SIGHUP] {
                if let Err(e) =
                    signal_hook::flag::register_conditional_default(sig, d.restore.clone())
                {
                    tracing::warn!(signal = sig, error = %e, "cannot arrange the default action after drop");
                }
            }
        }
        d.live += 1;
        d.restore.store(false, Ordering::SeqCst);
        SignalDefaultsGuard
    }
}

impl Drop for SignalDefaultsGuard {
    fn drop(&mut self) {
        let mut d = SIGNAL_DEFAULTS
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        d.live = d.live.saturating_sub(1);
        if d.live == 0 {
            d.restore.store(true, Ordering::SeqCst);
        }
    }
}

/// The signal task of a Service that handles signals.
#[derive(Debug)]
struct SignalTask {
    handle: signal_hook_tokio::Handle,
    task: JoinHandle<()>,
    /// Dropped after the handle is closed (see `Drop for Service`).
    _defaults: SignalDefaultsGuard,
}

/// Cancelled when the service starts stopping: by a signal, [`Service::request_shutdown`] or
/// a [`Controller`]. Cheap to clone; give one to every task.
///
/// It only observes the stop; to start one, use a [`Controller`]. For code that takes a
/// `tokio_util` `CancellationToken`, `CancellationToken::from(token)` gives a child token
/// (cancelled with this one; cancelling it does not stop the service).
#[derive(Debug, Clone)]
pub struct ShutdownToken(CancellationToken);

impl ShutdownToken {
    /// Completes once the stop has begun (at once if it has). Cancellation safe: use it in
    /// `tokio::select!`.
    pub async fn cancelled(&self) {
        self.0.cancelled().await;
    }

    /// [`ShutdownToken::cancelled`] as a `'static` future that owns the token.
    pub fn cancelled_owned(self) -> impl Future<Output = ()> + Send + 'static {
        self.0.cancelled_owned()
    }

    /// Whether the stop has begun.
    pub fn is_cancelled(&self) -> bool {
        self.0.is_cancelled()
    }
}

impl From<ShutdownToken> for CancellationToken {
    fn from(token: ShutdownToken) -> Self {
        token.0.child_token()
    }
}

/// A cloneable handle to ask a running [`Service`] to reload or stop, from anywhere (an admin
/// endpoint, a task that hit a fatal error), as `SIGHUP` and `SIGTERM` would.
#[derive(Debug, Clone)]
pub struct Controller {
    control: Control,
}

impl Controller {
    /// Starts a graceful stop, as `SIGTERM` would; see [`Service::request_shutdown`].
    pub async fn request_shutdown(&self) {
        self.control.request_stop("stop requested").await;
    }

    /// Starts a reload, as `SIGHUP` would.
    pub async fn request_reload(&self) {
        self.control.reload().await;
    }

    /// Reloads and waits for the outcome: `RELOADING=1`, the reload callback, `READY=1`.
    ///
    /// This is how to make `systemctl reload` synchronous on systemd before 253 (no
    /// `Type=notify-reload`): let `ExecReload=` run a command that asks the service, e.g. over
    /// its control socket, to call this and answers when it returns. With
    /// `ExecReload=kill -HUP $MAINPID`, systemd 252 waits for `READY=1` only if `RELOADING=1`
    /// arrives before `kill` exits, which a loaded machine does not guarantee.
    pub async fn reload(&self) -> Result<(), ReloadError> {
        self.control.reload_and_wait().await
    }
}

/// The stop, shared by every path that can start it.
#[derive(Debug)]
struct StopState {
    /// Set, once, by the first stop request (signal, request, or the drain after a direct
    /// cancel); the stop task it starts cannot be cancelled by the requester.
    started: AtomicBool,
    /// True once `STOPPING=1` is out, or given up.
    told: watch::Sender<bool>,
}

/// What the signal task and the public request methods share.
#[derive(Debug, Clone)]
struct Control {
    stop: Arc<StopState>,
    /// A reload to follow the current one is queued (a `SIGHUP` during a reload).
    again_queued: Arc<AtomicBool>,
    lifecycle: Lifecycle,
    watchdog: Watchdog,
    shutdown: CancellationToken,
    reload_tx: mpsc::Sender<ReloadRequest>,
    runtime: tokio::runtime::Handle,
    /// The first task failure: (task, error).
    failure: Arc<Mutex<Option<(String, String)>>>,
    on_task_failure: TaskFailure,
}

impl Control {
    /// A spawned task failed: remembered for [`Service::run`]'s result, and acted on. An error
    /// returned once the stop has begun is only logged (it is often the stop's own doing, e.g.
    /// a request refused because the service stops); a panic always counts.
    fn task_failed(&self, task: String, error: String, panicked: bool) {
        let stopping = self.stop.started.load(Ordering::SeqCst) || self.shutdown.is_cancelled();
        if stopping && !panicked {
            tracing::warn!(task = %task, error = %error, "task ended with an error during the stop");
            return;
        }
        tracing::error!(task = %task, error = %error, "task failed");
        {
            let mut first = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
            if first.is_none() {
                *first = Some((task.clone(), error));
            }
        }
        if stopping {
            return;
        }
        match self.on_task_failure {
            TaskFailure::StopService => self.begin_stop("a task failed"),
            TaskFailure::KeepRunning => self.watchdog.mark_dead(task),
        }
    }

    fn first_failure(&self) -> Option<(String, String)> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn handle_signals(self, mut signals: signal_hook_tokio::Signals) {
        while let Some(sig) = signals.next().await {
            match sig {
                // In a task of its own: a RELOADING=1 that meets a full queue must not hold
                // up a SIGTERM read after it.
                SIGHUP => drop(self.runtime.spawn({
                    let control = self.clone();
                    async move { control.reload().await }
                })),
                SIGINT => self.begin_stop("SIGINT"),
                _ => self.begin_stop("SIGTERM"),
            }
        }
    }

    /// Starts the stop, once; synchronous, so that no caller can cancel it half-way.
    ///
    /// The shutdown token is cancelled at once, whatever the manager's queue: the stop's time
    /// runs from the request. `STOPPING=1` goes out from a task of its own, retried on a full
    /// queue for as long as the stop may take. The keeper stops pinging at once too: a manager
    /// that sent `SIGTERM` has disarmed the watchdog already, and a full queue that holds up
    /// `STOPPING=1` would hold up the pings just the same.
    fn begin_stop(&self, why: &str) {
        if self.stop.started.swap(true, Ordering::SeqCst) {
            tracing::info!("{why} while already stopping; the stop continues within its bound");
            return;
        }
        tracing::info!("{why}: stopping");
        self.lifecycle.request_stop();
        self.watchdog.set_stopping();
        let lifecycle = self.lifecycle.clone();
        let stop = self.stop.clone();
        drop(self.runtime.spawn(async move {
            // The service may have sent STOPPING=1 itself through its Lifecycle; it is final,
            // so the stop goes on either way.
            match lifecycle.stopping().await {
                Ok(_)
                | Err(LifecycleError::OutOfOrder {
                    state: State::Stopping,
                    ..
                }) => {}
                Err(e) => tracing::warn!(error = %e, "STOPPING=1 not delivered"),
            }
            stop.told.send_replace(true);
        }));
        self.shutdown.cancel();
    }

    /// Starts the stop and waits until `STOPPING=1` is out (or given up). Dropping the
    /// future does not cancel the stop.
    async fn request_stop(&self, why: &str) {
        self.begin_stop(why);
        let mut told = self.stop.told.subscribe();
        let _ = told.wait_for(|t| *t).await;
    }

    async fn reload(&self) {
        match self.lifecycle.reloading().await {
            Ok(_) => {
                if self.reload_tx.try_send(ReloadRequest::Signalled).is_err() {
                    // RELOADING=1 is out: a reload must follow it.
                    self.reload_again();
                }
            }
            Err(LifecycleError::OutOfOrder {
                state: State::Reloading,
                ..
            }) => {
                // The reload under way may have read its configuration already.
                tracing::info!("reload requested during a reload: reloading once more after it");
                self.reload_again();
            }
            Err(e) => tracing::warn!(error = %e, "reload request ignored"),
        }
    }

    /// Queues one reload to follow the current one; more requests meanwhile share it.
    fn reload_again(&self) {
        if !self.again_queued.swap(true, Ordering::SeqCst)
            && self.reload_tx.try_send(ReloadRequest::Again).is_err()
        {
            // The queue is full of reloads still to come: they cover this one.
            self.again_queued.store(false, Ordering::SeqCst);
        }
    }

    async fn reload_and_wait(&self) -> Result<(), ReloadError> {
        let (tx, rx) = oneshot::channel();
        if self.shutdown.is_cancelled()
            || self
                .reload_tx
                .send(ReloadRequest::Awaited(tx))
                .await
                .is_err()
        {
            return Err(ReloadError::Stopping);
        }
        rx.await.map_err(|_| ReloadError::Stopping)?
    }
}

/// A queued reload.
#[derive(Debug)]
enum ReloadRequest {
    /// From `SIGHUP` or [`Controller::request_reload`]: `RELOADING=1` was already sent.
    Signalled,
    /// A reload requested while one ran: `run` sends `RELOADING=1` after that one's `READY=1`.
    Again,
    /// From [`Controller::reload`]: `run` sends `RELOADING=1` and reports the outcome.
    Awaited(oneshot::Sender<Result<(), ReloadError>>),
}

/// A reload that did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// The reload callback failed; the previous configuration stays.
    #[error("reload failed: {0}")]
    Failed(String),
    /// `RELOADING=1` was refused (e.g. the service is not ready yet).
    #[error("reload refused: {0}")]
    Refused(String),
    /// The service is stopping (or stopped) and will not reload.
    #[error("the service is stopping")]
    Stopping,
}

/// The names of the tasks started with [`Service::spawn_named`] that have not finished.
#[derive(Debug, Clone, Default)]
struct NamedTasks {
    inner: Arc<NamedInner>,
}

#[derive(Debug, Default)]
struct NamedInner {
    next: AtomicU64,
    running: Mutex<BTreeMap<u64, String>>,
}

/// Removes its task's name when the task ends, is aborted or dropped.
#[derive(Debug)]
struct NamedGuard {
    id: u64,
    tasks: Arc<NamedInner>,
}

impl NamedTasks {
    fn enter(&self, name: String) -> NamedGuard {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        self.inner.lock().insert(id, name);
        NamedGuard {
            id,
            tasks: self.inner.clone(),
        }
    }

    fn running(&self) -> Vec<String> {
        self.inner.lock().values().cloned().collect()
    }
}

impl NamedInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, String>> {
        // Inserts and removes only: a panic cannot leave the map torn.
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for NamedGuard {
    fn drop(&mut self) {
        self.tasks.lock().remove(&self.id);
    }
}

/// A supervised service: lifecycle, watchdog, signals and graceful stop.
///
/// ```no_run
/// use std::time::Duration;
/// use watchkeeper::Service;
///
/// #[tokio::main]
/// async fn main() -> Result<(), watchkeeper::ServiceError> {
///     let service = Service::builder("demo").build()?;
///     let progress = service.register_loop("poll");
///     let stop = service.shutdown_token();
///     service.spawn_named("poll", async move {
///         while !stop.is_cancelled() {
///             // ... one unit of work ...
///             progress.tick();
///             tokio::time::sleep(Duration::from_millis(100)).await;
///         }
///     });
///     // Ok(Delivery::Stopping) without sending anything if a stop came first.
///     service.lifecycle().ready_with_status("polling").await?;
///     service.run(watchkeeper::service::no_reload).await?;
///     Ok(())
/// }
/// ```
#[derive(Debug)]
pub struct Service {
    name: String,
    env: SystemdEnv,
    control: Control,
    watchdog_keeper: JoinHandle<()>,
    signals: Option<SignalTask>,
    reload_rx: mpsc::Receiver<ReloadRequest>,
    tracker: TaskTracker,
    named: NamedTasks,
    stop_timeout: Duration,
    extend_interval: Duration,
}

/// A reload callback for services without a configuration to reload: `SIGHUP` then only
/// sends `RELOADING=1` and `READY=1`.
pub async fn no_reload() -> Result<(), std::convert::Infallible> {
    Ok(())
}

/// How a graceful stop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopReport {
    /// From the stop request to the last task's end.
    pub drained_in: Duration,
}

impl Service {
    /// Starts building a service called `name` (used in logs and heartbeats).
    pub fn builder(name: impl Into<String>) -> ServiceBuilder {
        ServiceBuilder {
            name: name.into(),
            env: None,
            start_timeout: DEFAULT_START_TIMEOUT,
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            extend_interval: DEFAULT_EXTEND_INTERVAL,
            signals: true,
            on_task_failure: TaskFailure::default(),
        }
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The environment snapshot it was built from.
    pub fn env(&self) -> &SystemdEnv {
        &self.env
    }

    /// The lifecycle handle: `READY=1`, `STATUS=`, `EXTEND_TIMEOUT_USEC=`, ….
    pub fn lifecycle(&self) -> Lifecycle {
        self.control.lifecycle.clone()
    }

    /// The watchdog registry.
    pub fn watchdog(&self) -> &Watchdog {
        &self.control.watchdog
    }

    /// Registers a work loop with the watchdog; see [`Progress`]. Keep the handle while the
    /// loop runs: dropping it while the service is not stopping reports the loop as dead.
    #[must_use = "dropping the Progress reports the loop as dead"]
    pub fn register_loop(&self, name: impl Into<String>) -> Progress {
        self.control.watchdog.register(name)
    }

    /// Cancelled when the service starts stopping. Give a clone to every task.
    pub fn shutdown_token(&self) -> ShutdownToken {
        ShutdownToken(self.control.shutdown.clone())
    }

    /// Spawns a task that the graceful stop waits for. Prefer [`Service::spawn_named`]: a stop
    /// that times out names the tasks it waited for in vain.
    ///
    /// The task returns `()` or `Result<(), E>`. If it returns an error or panics, the service
    /// acts as [`ServiceBuilder::on_task_failure`] says, and [`Service::run`] returns
    /// [`ServiceError::TaskFailed`] instead of a graceful stop. The returned handle gives the
    /// task's output (a panic stays a panic for it).
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: TaskOutput,
    {
        let id = self.named.inner.next.fetch_add(1, Ordering::Relaxed);
        self.tracker.spawn(watch_task(
            format!("unnamed task #{id}"),
            self.control.clone(),
            task,
        ))
    }

    /// Spawns a task that the graceful stop waits for, under a name: if the stop times out,
    /// [`ServiceError::StopTimeout`] lists the names of the tasks still running, and a failure
    /// names it too (see [`Service::spawn`]).
    pub fn spawn_named<F>(&self, name: impl Into<String>, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: TaskOutput,
    {
        let name = name.into();
        let guard = self.named.enter(name.clone());
        let task = watch_task(name, self.control.clone(), task);
        self.tracker.spawn(async move {
            let _guard = guard;
            task.await
        })
    }

    /// The tracker behind [`Service::spawn`], to clone into tasks that spawn tasks of their own
    /// (an accept loop spawning one task per connection): whatever is spawned on it, the graceful
    /// stop waits for.
    pub fn task_tracker(&self) -> TaskTracker {
        self.tracker.clone()
    }

    /// Runs a blocking closure on tokio's blocking pool; the graceful stop waits for it too.
    pub fn spawn_blocking<F, T>(&self, f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.tracker.spawn_blocking(f)
    }

    /// Changes the watchdog timeout at run time (`WATCHDOG_USEC=`); the keeper follows.
    /// `Duration::ZERO` turns the watchdog off (`WATCHDOG_USEC=0`).
    pub async fn set_watchdog_timeout(&self, timeout: Duration) -> Result<(), ServiceError> {
        self.control
            .lifecycle
            .send_retrying(&[Notification::WatchdogUsec(crate::notify::usec(timeout))])
            .await?;
        self.control.watchdog.set_timeout(timeout);
        Ok(())
    }

    /// A cloneable handle for reload and stop requests, usable while [`Service::run`] runs.
    pub fn controller(&self) -> Controller {
        Controller {
            control: self.control.clone(),
        }
    }

    /// Starts a graceful stop, as `SIGTERM` would, and returns once `STOPPING=1` is out (or
    /// given up). Idempotent, and cancellation safe: the stop runs on even if this future is
    /// dropped, and a later request finds it under way.
    pub async fn request_shutdown(&self) {
        self.control.request_stop("stop requested").await;
    }

    /// Starts a reload, as `SIGHUP` would.
    pub async fn request_reload(&self) {
        self.control.reload().await;
    }

    /// Serves reload requests until the service is asked to stop, then stops gracefully:
    /// waits for every task started with [`Service::spawn`] within the stop timeout,
    /// sending `EXTEND_TIMEOUT_USEC=` while it waits.
    ///
    /// `on_reload` runs for each `SIGHUP`, after `RELOADING=1`; `READY=1` follows whatever its
    /// outcome (a failed reload is logged and shown in `STATUS=`; the old configuration stays).
    /// A reload requested while one runs is not lost: one more follows.
    ///
    /// Returns `Ok` after a stop during the start too (see
    /// [the module documentation](self#a-stop-during-the-start)).
    ///
    /// A reload callback with state: the configuration lives behind an `Arc<RwLock<_>>` shared
    /// with the work loop; each call clones the handle into its future, reads the new
    /// configuration first and swaps it in only when that worked.
    ///
    /// ```no_run
    /// use std::sync::{Arc, RwLock};
    /// use std::time::Duration;
    /// use watchkeeper::{Service, SystemdEnv};
    ///
    /// #[derive(Debug)]
    /// struct Config {
    ///     greeting: String,
    ///     reloads: u64,
    /// }
    ///
    /// fn read_greeting() -> std::io::Result<String> {
    ///     std::fs::read_to_string("/etc/my-service/greeting")
    /// }
    ///
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// let service = Service::builder("my-service").env(SystemdEnv::from_env()).build()?;
    /// let config = Arc::new(RwLock::new(Config { greeting: read_greeting()?, reloads: 0 }));
    ///
    /// let seen = config.clone();
    /// let stop = service.shutdown_token();
    /// service.spawn(async move {
    ///     while !stop.is_cancelled() {
    ///         let greeting = seen.read().map(|c| c.greeting.clone()).unwrap_or_default();
    ///         println!("{greeting}");
    ///         tokio::time::sleep(Duration::from_secs(1)).await;
    ///     }
    /// });
    ///
    /// service.lifecycle().ready().await?;
    /// let report = service
    ///     .run(move || {
    ///         let config = config.clone();
    ///         async move {
    ///             // A file that cannot be read fails the reload; the old greeting stays.
    ///             let greeting = read_greeting()?;
    ///             let mut c = config
    ///                 .write()
    ///                 .map_err(|_| std::io::Error::other("configuration lock poisoned"))?;
    ///             c.greeting = greeting;
    ///             c.reloads += 1;
    ///             Ok::<(), std::io::Error>(())
    ///         }
    ///     })
    ///     .await?;
    /// println!("stopped: {report:?}");
    /// # Ok(())
    /// # }
    /// # fn main() { let _ = doc(); }
    /// ```
    pub async fn run<F, Fut, E>(mut self, mut on_reload: F) -> Result<StopReport, ServiceError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Display,
    {
        let shutdown = self.control.shutdown.clone();
        loop {
            let request = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(request) = self.reload_rx.recv() => request,
            };
            let lc = &self.control.lifecycle;
            let reply = match request {
                ReloadRequest::Signalled => None,
                ReloadRequest::Again | ReloadRequest::Awaited(_) => {
                    let reply = match request {
                        ReloadRequest::Awaited(reply) => Some(reply),
                        _ => {
                            self.control.again_queued.store(false, Ordering::SeqCst);
                            None
                        }
                    };
                    match lc.reloading().await {
                        // A signal's RELOADING=1 is already out: this reload covers it.
                        Ok(_)
                        | Err(LifecycleError::OutOfOrder {
                            state: State::Reloading,
                            ..
                        }) => {}
                        Err(e) => {
                            match reply {
                                Some(reply) => {
                                    let _ = reply.send(Err(ReloadError::Refused(e.to_string())));
                                }
                                None => tracing::warn!(error = %e, "reload not started"),
                            }
                            continue;
                        }
                    }
                    reply
                }
            };
            let outcome = tokio::select! {
                r = on_reload() => r.map_err(|e| e.to_string()),
                () = shutdown.cancelled() => break,
            };
            let sent = match &outcome {
                Ok(()) => {
                    tracing::info!("reloaded");
                    // Also replaces a "reload failed" status from an earlier attempt.
                    lc.ready_after_reload().await
                }
                Err(e) => {
                    tracing::error!(error = %e, "reload failed; keeping the previous configuration");
                    // STATUS= is one line: an error that spans several must not cost
                    // the READY=1 that ends the reload.
                    let one_line: String = e
                        .replace(['\n', '\r', '\0'], " ")
                        .chars()
                        .take(512)
                        .collect();
                    lc.ready_with_transient_status(&format!("reload failed: {one_line}"))
                        .await
                }
            };
            if let Err(e) = sent {
                tracing::warn!(error = %e, "READY=1 after reload not sent");
            }
            if let Some(reply) = reply {
                let _ = reply.send(outcome.map_err(ReloadError::Failed));
            }
        }
        self.drain().await
    }

    async fn drain(mut self) -> Result<StopReport, ServiceError> {
        // No reload runs from here on: waiting `Controller::reload` callers learn it now, not
        // when the stop is over (a connection waiting for its answer would hold up the drain).
        self.reload_rx.close();
        while self.reload_rx.try_recv().is_ok() {}
        let started = Instant::now();
        // No bound when it does not fit an Instant (e.g. Duration::MAX).
        let deadline = started.checked_add(self.stop_timeout);
        let lc = self.control.lifecycle.clone();
        if !self.control.stop.started.load(Ordering::SeqCst) {
            // Stopped through the token directly rather than a signal or request.
            self.control.begin_stop("shutdown token cancelled");
        }
        self.tracker.close();
        let wait = self.tracker.wait();
        tokio::pin!(wait);
        let mut told = self.control.stop.told.subscribe();
        let mut tasks_done = false;
        let mut stopping_out = false;
        let mut next_extend = Some(started);
        loop {
            if tasks_done && stopping_out {
                if let Some((task, error)) = self.control.first_failure() {
                    tracing::error!(task = %task, "stopped after a task failed");
                    return Err(ServiceError::TaskFailed { task, error });
                }
                let drained_in = started.elapsed();
                tracing::info!(?drained_in, "stopped gracefully");
                return Ok(StopReport { drained_in });
            }
            let now = Instant::now();
            // Extensions follow STOPPING=1: before it, the manager may still count them
            // against a running unit.
            if stopping_out && next_extend.is_some_and(|at| now >= at) {
                // The manager may wait until our own bound, plus a margin for the exit itself.
                let left = deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(now));
                let _ = lc
                    .try_extend_timeout(left.saturating_add(self.extend_interval))
                    .inspect_err(|e| tracing::debug!(error = %e, "EXTEND_TIMEOUT_USEC not sent"));
                next_extend = now.checked_add(self.extend_interval);
            }
            let wake = match (deadline, next_extend.filter(|_| stopping_out)) {
                (Some(d), Some(e)) => Some(d.min(e)),
                (d, e) => d.or(e),
            };
            tokio::select! {
                biased;
                () = &mut wait, if !tasks_done => tasks_done = true,
                _ = told.wait_for(|t| *t), if !stopping_out => stopping_out = true,
                () = sleep_until_opt(wake) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        if tasks_done {
                            tracing::warn!("STOPPING=1 still not delivered at the stop bound; exiting anyway");
                            stopping_out = true;
                            continue;
                        }
                        let still_running = self.tracker.len();
                        let unfinished = self.named.running();
                        tracing::error!(
                            still_running,
                            unfinished = %Names(&unfinished),
                            timeout = ?self.stop_timeout,
                            "graceful stop timed out"
                        );
                        return Err(ServiceError::StopTimeout {
                            timeout: self.stop_timeout,
                            still_running,
                            unfinished,
                        });
                    }
                }
            }
        }
    }
}

/// Runs `task`, reporting a failure (an error it returns, or a panic) to the service.
async fn watch_task<F>(what: String, control: Control, task: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: TaskOutput,
{
    match AssertUnwindSafe(task).catch_unwind().await {
        Ok(out) => {
            if let Some(error) = out.failure() {
                control.task_failed(what, error, false);
            }
            out
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            control.task_failed(what, format!("panicked: {msg}"), true);
            // The task's own handle still sees the panic, as with tokio::spawn.
            std::panic::resume_unwind(panic)
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.watchdog_keeper.abort();
        if let Some(signals) = &self.signals {
            signals.handle.close();
            signals.task.abort();
        }
        // The signal task's share of the process-wide defaults goes with `self.signals`,
        // after its handle was closed above.
    }
}
