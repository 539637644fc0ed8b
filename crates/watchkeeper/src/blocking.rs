//! The lifecycle for services without an async runtime: [`BlockingService`].
//!
//! Work runs on plain threads. The service sends `READY=1`, `STATUS=`, `RELOADING=1` and
//! `STOPPING=1` in the protocol's order, pings the watchdog from a keeper thread **only while
//! every registered loop makes progress** (the same [`Progress`] handles and rules as the async
//! [`Service`](crate::Service); see [`watchdog`](crate::watchdog)), and turns `SIGTERM`/`SIGINT`
//! and `SIGHUP` into a stop and reloads from a signal thread (`signal-hook`'s iterator).
//!
//! ```no_run
//! use std::time::Duration;
//! use watchkeeper::blocking::BlockingService;
//!
//! fn main() -> Result<(), watchkeeper::ServiceError> {
//!     let service = BlockingService::builder("my-service").build()?;
//!     let progress = service.register_loop("poll");
//!     let stop = service.stop_signal();
//!     service.spawn_named("poll", move || {
//!         // Returns true once the stop has begun: no sleep outlives it.
//!         while !stop.wait_timeout(Duration::from_millis(500)) {
//!             // ... one unit of work ...
//!             progress.tick();
//!         }
//!         Ok::<(), std::io::Error>(())
//!     });
//!     service.ready_with_status("polling")?;
//!     service.run(|| Ok::<(), std::io::Error>(()))?;
//!     Ok(())
//! }
//! ```
//!
//! Inside, one small tokio runtime (one worker thread, timers only) runs the watchdog keeper
//! and the manager-queue retries; the service's own code never sees it.

use std::fmt::Display;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::env::SystemdEnv;
use crate::lifecycle::{Lifecycle, LifecycleError, State};
use crate::notify::Delivery;
use crate::service::{
    DEFAULT_EXTEND_INTERVAL, DEFAULT_START_TIMEOUT, DEFAULT_STOP_TIMEOUT, ServiceError,
    SignalDefaults, SignalDefaultsGuard, StopReport, TaskFailure, TaskOutput, keeper,
    notifier_from_env,
};
use crate::watchdog::{Names, Progress, Watchdog};

/// Builds a [`BlockingService`]. Every setting has a default.
#[derive(Debug)]
#[must_use]
pub struct BlockingServiceBuilder {
    name: String,
    env: Option<SystemdEnv>,
    start_timeout: Duration,
    stop_timeout: Duration,
    extend_interval: Duration,
    signals: bool,
    on_task_failure: TaskFailure,
}

impl BlockingServiceBuilder {
    /// The environment to use. Default: [`SystemdEnv::from_env`], read once in `build`.
    pub fn env(mut self, env: SystemdEnv) -> Self {
        self.env = Some(env);
        self
    }

    /// How long the start may take (`READY=1` is retried this long on a full manager queue).
    /// Default [`DEFAULT_START_TIMEOUT`].
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Bound on the graceful stop: how long [`BlockingService::run`] waits for the threads
    /// started with [`BlockingService::spawn_named`]. Default [`DEFAULT_STOP_TIMEOUT`].
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

    /// Whether to handle `SIGTERM`, `SIGINT` and `SIGHUP`. Default `true`.
    pub fn handle_signals(mut self, yes: bool) -> Self {
        self.signals = yes;
        self
    }

    /// What to do when a thread started with [`BlockingService::spawn_named`] fails. Default
    /// [`TaskFailure::StopService`].
    pub fn on_task_failure(mut self, what: TaskFailure) -> Self {
        self.on_task_failure = what;
        self
    }

    /// Connects to the manager, starts the keeper and the signal thread.
    ///
    /// Fails on a malformed environment (`WATCHDOG_USEC=0`, a bad `WATCHDOG_PID`, a bad
    /// `NOTIFY_SOCKET`) or when the keeper's runtime cannot be started.
    pub fn build(self) -> Result<BlockingService, ServiceError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("watchkeeper-keeper")
            .enable_time()
            .build()
            .map_err(ServiceError::Runtime)?;
        let _enter = rt.enter();
        let env = self.env.unwrap_or_else(SystemdEnv::from_env);
        let notifier = notifier_from_env(&env)?;
        let watchdog = Watchdog::new(env.watchdog(std::process::id())?);
        let lifecycle =
            Lifecycle::with_bounds(notifier.clone(), self.start_timeout, self.stop_timeout);
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            lifecycle: lifecycle.clone(),
            watchdog: watchdog.clone(),
            rt: rt.handle().clone(),
            stop: StopSignal {
                inner: Arc::new((Mutex::new(false), Condvar::new())),
            },
            stop_started: AtomicBool::new(false),
            again: AtomicBool::new(false),
            requests: Mutex::new(tx),
            threads_done: Arc::new((Mutex::new(0), Condvar::new())),
            failure: Mutex::new(None),
            on_task_failure: self.on_task_failure,
        });
        rt.spawn(keeper(&watchdog, &lifecycle, notifier));
        let signals = if self.signals {
            match signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]) {
                Ok(mut signals) => {
                    let handle = signals.handle();
                    let shared = shared.clone();
                    let defaults = SignalDefaults::acquire();
                    match std::thread::Builder::new()
                        .name("watchkeeper-signals".into())
                        .spawn(move || {
                            for sig in signals.forever() {
                                match sig {
                                    SIGHUP => shared.reload(),
                                    SIGINT => shared.begin_stop("SIGINT"),
                                    _ => shared.begin_stop("SIGTERM"),
                                }
                            }
                        }) {
                        Ok(thread) => Some(SignalThread {
                            handle,
                            thread: Some(thread),
                            _defaults: defaults,
                        }),
                        Err(e) => {
                            handle.close();
                            tracing::error!(error = %e, "cannot start the signal thread; SIGTERM will kill the process without a graceful stop");
                            None
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot install signal handlers; SIGTERM will kill the process without a graceful stop");
                    None
                }
            }
        } else {
            None
        };
        drop(_enter);
        Ok(BlockingService {
            name: self.name,
            shared,
            requests: rx,
            threads: Mutex::new(Vec::new()),
            signals,
            stop_timeout: self.stop_timeout,
            extend_interval: self.extend_interval,
            rt: Some(rt),
        })
    }
}

/// Tells threads that the stop has begun; cheap to clone.
#[derive(Debug, Clone)]
pub struct StopSignal {
    inner: Arc<(Mutex<bool>, Condvar)>,
}

impl StopSignal {
    fn flag(&self) -> std::sync::MutexGuard<'_, bool> {
        // A plain bool: a panic under the lock cannot tear it.
        self.inner.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the stop has begun.
    pub fn is_stopping(&self) -> bool {
        *self.flag()
    }

    /// Waits up to `timeout` for the stop; returns whether it has begun. Use it as the loop's
    /// sleep: the thread wakes at once when the stop begins.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let mut stopping = self.flag();
        while !*stopping {
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                break;
            }
            stopping = self
                .inner
                .1
                .wait_timeout(stopping, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        *stopping
    }

    /// Waits for the stop, however long it takes.
    pub fn wait(&self) {
        while !self.wait_timeout(Duration::from_secs(3600)) {}
    }

    fn set(&self) {
        *self.flag() = true;
        self.inner.1.notify_all();
    }
}

#[derive(Debug)]
enum Request {
    /// `RELOADING=1` is out: run the reload.
    Reload,
    /// A reload requested during one: `RELOADING=1` again after its `READY=1`.
    Again,
    /// The stop began.
    Stop,
}

#[derive(Debug)]
struct Shared {
    lifecycle: Lifecycle,
    watchdog: Watchdog,
    rt: tokio::runtime::Handle,
    stop: StopSignal,
    stop_started: AtomicBool,
    again: AtomicBool,
    requests: Mutex<mpsc::Sender<Request>>,
    /// How many spawned threads have ended, to wait on with a deadline.
    threads_done: Arc<(Mutex<usize>, Condvar)>,
    failure: Mutex<Option<(String, String)>>,
    on_task_failure: TaskFailure,
}

impl Shared {
    fn send(&self, r: Request) {
        // The receiver lives in the BlockingService; once it is gone nobody waits.
        let _ = self
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(r);
    }

    /// Starts the stop, once: the stop signal, no more pings, `STOPPING=1`.
    fn begin_stop(&self, why: &str) {
        if self.stop_started.swap(true, Ordering::SeqCst) {
            tracing::info!("{why} while already stopping; the stop continues within its bound");
            return;
        }
        tracing::info!("{why}: stopping");
        self.lifecycle.request_stop();
        self.watchdog.set_stopping();
        self.stop.set();
        match self.rt.block_on(self.lifecycle.stopping()) {
            Ok(_)
            | Err(LifecycleError::OutOfOrder {
                state: State::Stopping,
                ..
            }) => {}
            Err(e) => tracing::warn!(error = %e, "STOPPING=1 not delivered"),
        }
        self.send(Request::Stop);
    }

    fn reload(&self) {
        match self.rt.block_on(self.lifecycle.reloading()) {
            Ok(_) => self.send(Request::Reload),
            Err(LifecycleError::OutOfOrder {
                state: State::Reloading,
                ..
            }) => {
                tracing::info!("reload requested during a reload: reloading once more after it");
                if !self.again.swap(true, Ordering::SeqCst) {
                    self.send(Request::Again);
                }
            }
            Err(e) => tracing::warn!(error = %e, "reload request ignored"),
        }
    }

    fn task_failed(&self, task: String, error: String, panicked: bool) {
        if self.stop_started.load(Ordering::SeqCst) && !panicked {
            tracing::warn!(task = %task, error = %error, "thread ended with an error during the stop");
            return;
        }
        tracing::error!(task = %task, error = %error, "thread failed");
        {
            let mut first = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
            if first.is_none() {
                *first = Some((task.clone(), error));
            }
        }
        if self.stop_started.load(Ordering::SeqCst) {
            return;
        }
        match self.on_task_failure {
            TaskFailure::KeepRunning => self.watchdog.mark_dead(task),
            _ => self.begin_stop("a thread failed"),
        }
    }
}

#[derive(Debug)]
struct SignalThread {
    handle: signal_hook::iterator::Handle,
    thread: Option<JoinHandle<()>>,
    _defaults: SignalDefaultsGuard,
}

/// A supervised service on plain threads: lifecycle, progress-gated watchdog, signals and a
/// bounded graceful stop. See [the module documentation](self).
#[derive(Debug)]
pub struct BlockingService {
    name: String,
    shared: Arc<Shared>,
    requests: mpsc::Receiver<Request>,
    threads: Mutex<Vec<(String, JoinHandle<()>)>>,
    signals: Option<SignalThread>,
    stop_timeout: Duration,
    extend_interval: Duration,
    /// The keeper's runtime; an `Option` so that `Drop` can shut it down without waiting.
    rt: Option<tokio::runtime::Runtime>,
}

impl BlockingService {
    /// Starts building a service called `name`.
    pub fn builder(name: impl Into<String>) -> BlockingServiceBuilder {
        BlockingServiceBuilder {
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

    /// Registers a work loop with the watchdog; see [`Progress`]. Keep the handle while the
    /// loop runs: dropping it while the service is not stopping reports the loop as dead.
    #[must_use = "dropping the Progress reports the loop as dead"]
    pub fn register_loop(&self, name: impl Into<String>) -> Progress {
        self.shared.watchdog.register(name)
    }

    /// The watchdog registry (for [`Watchdog::peek`]).
    pub fn watchdog(&self) -> &Watchdog {
        &self.shared.watchdog
    }

    /// Tells threads when the stop begins.
    pub fn stop_signal(&self) -> StopSignal {
        self.shared.stop.clone()
    }

    /// The lifecycle's state.
    pub fn state(&self) -> State {
        self.shared.lifecycle.state()
    }

    /// `READY=1`; see [`Lifecycle::ready`]. Blocks while the manager's queue is full, for as
    /// long as the start may take.
    pub fn ready(&self) -> Result<Delivery, LifecycleError> {
        self.shared.rt.block_on(self.shared.lifecycle.ready())
    }

    /// `READY=1` and `STATUS=`; see [`Lifecycle::ready_with_status`].
    pub fn ready_with_status(&self, status: &str) -> Result<Delivery, LifecycleError> {
        self.shared
            .rt
            .block_on(self.shared.lifecycle.ready_with_status(status))
    }

    /// `STATUS=`; never waits (see [`Lifecycle::status`]).
    pub fn status(&self, text: &str) -> Result<Delivery, LifecycleError> {
        let _enter = self.shared.rt.enter();
        self.shared.lifecycle.status(text)
    }

    /// `EXTEND_TIMEOUT_USEC=`: for a slow start, reload or stop.
    pub fn extend_timeout(&self, within: Duration) -> Result<Delivery, LifecycleError> {
        self.shared
            .rt
            .block_on(self.shared.lifecycle.extend_timeout(within))
    }

    /// Starts the graceful stop, as `SIGTERM` would; returns once `STOPPING=1` is out.
    pub fn request_stop(&self) {
        self.shared.begin_stop("stop requested");
    }

    /// Starts a thread that the graceful stop waits for. It returns `()` or `Result<(), E>`; an
    /// error or a panic is a failure (see [`BlockingServiceBuilder::on_task_failure`]).
    pub fn spawn_named<F, T>(&self, name: impl Into<String>, f: F)
    where
        F: FnOnce() -> T + Send + 'static,
        T: TaskOutput,
    {
        let name = name.into();
        let shared = self.shared.clone();
        let task = name.clone();
        let spawned = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let done = shared.threads_done.clone();
                match std::panic::catch_unwind(AssertUnwindSafe(f)) {
                    Ok(out) => {
                        if let Some(error) = out.failure() {
                            shared.task_failed(task, error, false);
                        }
                    }
                    Err(panic) => {
                        let msg = panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a panic".into());
                        shared.task_failed(task, format!("panicked: {msg}"), true);
                    }
                }
                *done.0.lock().unwrap_or_else(PoisonError::into_inner) += 1;
                done.1.notify_all();
            });
        match spawned {
            Ok(handle) => self
                .threads
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((name, handle)),
            Err(e) => self
                .shared
                .task_failed(name, format!("not started: {e}"), false),
        }
    }

    /// Serves reloads until the stop, then stops gracefully: waits for the threads started
    /// with [`BlockingService::spawn_named`] within the stop timeout, sending
    /// `EXTEND_TIMEOUT_USEC=` while it waits.
    ///
    /// `on_reload` runs for each `SIGHUP`, after `RELOADING=1`; `READY=1` follows whatever its
    /// outcome (a failure is logged and shown in `STATUS=`). A `SIGHUP` during a reload is
    /// followed by one more. Returns [`ServiceError::TaskFailed`] after a thread failed.
    pub fn run<F, E>(mut self, mut on_reload: F) -> Result<StopReport, ServiceError>
    where
        F: FnMut() -> Result<(), E>,
        E: Display,
    {
        loop {
            if self.shared.stop_started.load(Ordering::SeqCst) {
                break;
            }
            let Ok(request) = self.requests.recv() else {
                break;
            };
            let lc = &self.shared.lifecycle;
            match request {
                Request::Stop => break,
                Request::Again => {
                    self.shared.again.store(false, Ordering::SeqCst);
                    if let Err(e) = self.shared.rt.block_on(lc.reloading()) {
                        tracing::warn!(error = %e, "reload not started");
                        continue;
                    }
                }
                Request::Reload => {}
            }
            let sent = match on_reload() {
                Ok(()) => {
                    tracing::info!("reloaded");
                    self.shared.rt.block_on(lc.ready_after_reload())
                }
                Err(e) => {
                    let one_line: String = e
                        .to_string()
                        .replace(['\n', '\r', '\0'], " ")
                        .chars()
                        .take(512)
                        .collect();
                    tracing::error!(error = %one_line, "reload failed; keeping the previous configuration");
                    self.shared.rt.block_on(
                        lc.ready_with_transient_status(&format!("reload failed: {one_line}")),
                    )
                }
            };
            if let Err(e) = sent {
                tracing::warn!(error = %e, "READY=1 after reload not sent");
            }
        }
        self.drain()
    }

    fn drain(&mut self) -> Result<StopReport, ServiceError> {
        let started = Instant::now();
        if !self.shared.stop_started.load(Ordering::SeqCst) {
            self.shared.begin_stop("stopping");
        }
        let deadline = started.checked_add(self.stop_timeout);
        let total = self
            .threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        let (lock, cv) = &*self.shared.threads_done;
        let mut done = lock.lock().unwrap_or_else(PoisonError::into_inner);
        while *done < total {
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                drop(done);
                let unfinished: Vec<String> = self
                    .threads
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                    .filter(|(_, h)| !h.is_finished())
                    .map(|(n, _)| n.clone())
                    .collect();
                tracing::error!(unfinished = %Names(&unfinished), "graceful stop timed out");
                return Err(ServiceError::StopTimeout {
                    timeout: self.stop_timeout,
                    still_running: unfinished.len(),
                    unfinished,
                });
            }
            let left = deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(now));
            let _ = self
                .shared
                .lifecycle
                .try_extend_timeout(left.saturating_add(self.extend_interval));
            done = cv
                .wait_timeout(done, left.min(self.extend_interval))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        drop(done);
        for (_, handle) in self
            .threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            // Finished: the join returns at once (a panic was caught inside).
            let _ = handle.join();
        }
        if let Some((task, error)) = self
            .shared
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Err(ServiceError::TaskFailed { task, error });
        }
        let drained_in = started.elapsed();
        tracing::info!(?drained_in, "stopped gracefully");
        Ok(StopReport { drained_in })
    }
}

impl Drop for BlockingService {
    fn drop(&mut self) {
        if let Some(signals) = &mut self.signals {
            signals.handle.close();
            if let Some(t) = signals.thread.take() {
                let _ = t.join();
            }
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
