//! The whole lifecycle in one value: [`Service`].
//!
//! Built inside a tokio runtime, a [`Service`] connects to the manager, starts the watchdog
//! keeper and turns signals into lifecycle events:
//!
//! * `SIGTERM`/`SIGINT` → `STOPPING=1`, then the [`shutdown token`](Service::shutdown_token) is
//!   cancelled; [`Service::run`] then waits for the tasks started with [`Service::spawn`], up to
//!   the stop timeout, sending `EXTEND_TIMEOUT_USEC=` while it waits;
//! * `SIGHUP` → `RELOADING=1` + `MONOTONIC_USEC=` at once (systemd 252's `ExecReload=kill -HUP`
//!   only waits for the reload if `RELOADING=1` arrives before `kill` exits), then the reload
//!   callback given to [`Service::run`], then `READY=1`.

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::{mpsc, oneshot};
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
    /// The graceful stop did not finish in time.
    #[error(
        "graceful stop did not finish within {timeout:?}: {still_running} task(s) still running"
    )]
    StopTimeout {
        /// The bound that was exceeded.
        timeout: Duration,
        /// Tasks that had not finished.
        still_running: usize,
    },
}

/// Builds a [`Service`]. Every setting has a default.
#[derive(Debug)]
#[must_use]
pub struct ServiceBuilder {
    name: String,
    env: Option<SystemdEnv>,
    stop_timeout: Duration,
    extend_interval: Duration,
    signals: bool,
}

impl ServiceBuilder {
    /// The environment to use. Default: [`SystemdEnv::from_env`], read once in `build`.
    pub fn env(mut self, env: SystemdEnv) -> Self {
        self.env = Some(env);
        self
    }

    /// Bound on the graceful stop. Default [`DEFAULT_STOP_TIMEOUT`]; keep it below the unit's
    /// `TimeoutStopSec=`.
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
        let notifier = match Notifier::from_env(&env) {
            Err(NotifyError::Unsupported { addr }) => {
                tracing::warn!(notify_socket = %addr, "NOTIFY_SOCKET address family not supported; running unsupervised");
                Notifier::disabled()
            }
            other => other?,
        };
        let notifier = Arc::new(notifier);
        let watchdog = Watchdog::new(env.watchdog(std::process::id())?);
        let lifecycle = Lifecycle::new(notifier.clone());
        let shutdown = CancellationToken::new();
        let (reload_tx, reload_rx) = mpsc::channel(4);
        let control = Control {
            stop_started: Arc::new(AtomicBool::new(false)),
            lifecycle: lifecycle.clone(),
            watchdog: watchdog.clone(),
            shutdown: shutdown.clone(),
            reload_tx,
        };

        let keeper = {
            let notifier = notifier.clone();
            let lc = lifecycle.clone();
            rt.spawn(watchdog.clone().keep(
                move |msgs| {
                    notifier.notify(msgs).map(drop).inspect_err(|e| {
                        if !matches!(e, NotifyError::QueueFull { .. }) {
                            notifier.log_failure("WATCHDOG", e);
                        }
                    })
                },
                move |stalled| {
                    let text = match stalled {
                        Some(names) => format!("stalled: no progress in {}", Names(names)),
                        None => lc.last_status().unwrap_or_else(|| "running".into()),
                    };
                    if let Ok(msg) = Notification::status(text) {
                        let _ = lc.notifier().notify(&[msg]).inspect_err(|e| {
                            lc.notifier().log_failure("STATUS", e);
                        });
                    }
                },
            ))
        };

        // When the Service is dropped its handlers go, but signal-hook leaves the process
        // ignoring these signals; this flag brings back their default action (terminate).
        let restore_defaults = Arc::new(AtomicBool::new(false));
        let signals = if self.signals {
            for sig in [SIGTERM, SIGINT, SIGHUP] {
                if let Err(e) =
                    signal_hook::flag::register_conditional_default(sig, restore_defaults.clone())
                {
                    tracing::warn!(signal = sig, error = %e, "cannot arrange the default action after drop");
                }
            }
            match signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP]) {
                Ok(signals) => {
                    let handle = signals.handle();
                    let task = rt.spawn(control.clone().handle_signals(signals));
                    Some((handle, task))
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
            restore_defaults,
            reload_rx,
            tracker: TaskTracker::new(),
            stop_timeout: self.stop_timeout,
            extend_interval: self.extend_interval,
        })
    }
}

/// A cloneable handle to ask a running [`Service`] to reload or stop, from anywhere (an admin
/// endpoint, a task that hit a fatal error), as `SIGHUP` and `SIGTERM` would.
#[derive(Debug, Clone)]
pub struct Controller {
    control: Control,
}

impl Controller {
    /// Starts a graceful stop, as `SIGTERM` would.
    pub async fn request_shutdown(&self) {
        self.control.shutdown("stop requested").await;
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

/// What the signal task and the public request methods share.
#[derive(Debug, Clone)]
struct Control {
    /// Set by the first stop request (signal, request, or the drain after a direct cancel).
    stop_started: Arc<AtomicBool>,
    lifecycle: Lifecycle,
    watchdog: Watchdog,
    shutdown: CancellationToken,
    reload_tx: mpsc::Sender<ReloadRequest>,
}

impl Control {
    async fn handle_signals(self, mut signals: signal_hook_tokio::Signals) {
        while let Some(sig) = signals.next().await {
            match sig {
                SIGHUP => self.reload().await,
                _ => {
                    self.shutdown(if sig == SIGINT { "SIGINT" } else { "SIGTERM" })
                        .await
                }
            }
        }
    }

    async fn shutdown(&self, why: &str) {
        if self.stop_started.swap(true, Ordering::SeqCst) {
            tracing::info!("{why} while already stopping; the stop continues within its bound");
            return;
        }
        tracing::info!("{why}: stopping");
        // The service may have sent STOPPING=1 itself through its Lifecycle; it is final, so
        // the stop goes on either way.
        let told = match self.lifecycle.stopping().await {
            Ok(_)
            | Err(LifecycleError::OutOfOrder {
                state: State::Stopping,
                ..
            }) => true,
            Err(e) => {
                tracing::warn!(error = %e, "STOPPING=1 not delivered; the watchdog stays armed");
                false
            }
        };
        // Pings end only once the manager knows we are stopping: until then it still enforces
        // the watchdog.
        if told {
            self.watchdog.set_stopping();
        }
        self.shutdown.cancel();
    }

    async fn reload(&self) {
        match self.lifecycle.reloading().await {
            Ok(_) => {
                // When the queue is full, a reload already queued covers this one.
                let _ = self.reload_tx.try_send(ReloadRequest::Signalled);
            }
            Err(e) => tracing::warn!(error = %e, "reload request ignored"),
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
///     service.spawn(async move {
///         while !stop.is_cancelled() {
///             // ... one unit of work ...
///             progress.tick();
///             tokio::time::sleep(Duration::from_millis(100)).await;
///         }
///     });
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
    signals: Option<(signal_hook_tokio::Handle, JoinHandle<()>)>,
    restore_defaults: Arc<AtomicBool>,
    reload_rx: mpsc::Receiver<ReloadRequest>,
    tracker: TaskTracker,
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
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            extend_interval: DEFAULT_EXTEND_INTERVAL,
            signals: true,
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

    /// Registers a work loop with the watchdog; see [`Progress`].
    pub fn register_loop(&self, name: impl Into<String>) -> Progress {
        self.control.watchdog.register(name)
    }

    /// Cancelled when the service starts stopping. Give a clone to every task.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.control.shutdown.clone()
    }

    /// Spawns a task that the graceful stop waits for.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
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

    /// Starts a graceful stop, as `SIGTERM` would.
    pub async fn request_shutdown(&self) {
        self.control.shutdown("stop requested").await;
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
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(request) = self.reload_rx.recv() => {
                    let reply = match request {
                        ReloadRequest::Signalled => None,
                        ReloadRequest::Awaited(reply) => {
                            match self.control.lifecycle.reloading().await {
                                // A signal's RELOADING=1 is already out: this reload covers it.
                                Ok(_) | Err(LifecycleError::OutOfOrder { state: State::Reloading, .. }) => {}
                                Err(e) => {
                                    let _ = reply.send(Err(ReloadError::Refused(e.to_string())));
                                    continue;
                                }
                            }
                            Some(reply)
                        }
                    };
                    let outcome = tokio::select! {
                        r = on_reload() => r.map_err(|e| e.to_string()),
                        () = shutdown.cancelled() => break,
                    };
                    let lc = &self.control.lifecycle;
                    let sent = match &outcome {
                        Ok(()) => {
                            tracing::info!("reloaded");
                            // Also replaces a "reload failed" status from an earlier attempt.
                            match lc.last_status() {
                                Some(status) => lc.ready_with_status(&status).await,
                                None => lc.ready().await,
                            }
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
        let deadline = started + self.stop_timeout;
        let lc = self.control.lifecycle.clone();
        if !self.control.stop_started.load(Ordering::SeqCst) {
            // Stopped through the token directly rather than a signal or request.
            self.control.shutdown("shutdown token cancelled").await;
        }
        self.tracker.close();
        let wait = self.tracker.wait();
        tokio::pin!(wait);
        loop {
            // The manager may wait until our own bound, plus a margin for the exit itself.
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = lc
                .extend_timeout(left + self.extend_interval)
                .await
                .inspect_err(|e| tracing::debug!(error = %e, "EXTEND_TIMEOUT_USEC not sent"));
            let tick = Instant::now() + self.extend_interval;
            tokio::select! {
                biased;
                () = &mut wait => {
                    let drained_in = started.elapsed();
                    tracing::info!(?drained_in, "stopped gracefully");
                    return Ok(StopReport { drained_in });
                }
                () = tokio::time::sleep_until(deadline.min(tick)) => {
                    if Instant::now() >= deadline && !self.tracker.is_empty() {
                        let still_running = self.tracker.len();
                        tracing::error!(still_running, timeout = ?self.stop_timeout, "graceful stop timed out");
                        return Err(ServiceError::StopTimeout {
                            timeout: self.stop_timeout,
                            still_running,
                        });
                    }
                }
            }
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.watchdog_keeper.abort();
        if let Some((handle, task)) = &self.signals {
            handle.close();
            task.abort();
            self.restore_defaults.store(true, Ordering::SeqCst);
        }
    }
}
