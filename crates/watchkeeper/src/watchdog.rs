//! The progress-gated watchdog.
//!
//! systemd restarts a service whose watchdog pings stop (`WatchdogSec=`, `Restart=on-watchdog`
//! or `on-failure`). A ping sent from a timer, whatever the service is doing, defeats that: a
//! hung loop keeps being reported alive. Here every work loop registers and gets a [`Progress`]
//! handle, and the keeper task sends `WATCHDOG=1` **only when every registered loop has called
//! [`Progress::tick`] since the previous ping** (or is inside a declared, bounded
//! [`Progress::busy`] window, or awaits an outside event through [`Progress::idle`]).
//!
//! # When a ping goes out
//!
//! This is `sd-event`'s rule (`process_watchdog()` pings on the first loop iteration at least a
//! quarter of the timeout `T` after the last ping; `arm_watchdog()` wakes an idle loop between
//! `T/2` and `3T/4`), extended to any number of loops and threads:
//!
//! * no `WATCHDOG=1` before `READY=1`: systemd resets its watchdog on every ping, in any state,
//!   so a ping during the start would arm it while the unit is still activating. `READY=1`
//!   arms it (it counts as the first ping here too); a slow start sends
//!   `EXTEND_TIMEOUT_USEC=` instead ([`Lifecycle::extend_timeout`](crate::Lifecycle::extend_timeout));
//! * `T/2` after the last ping the keeper looks: if every loop ticked, it pings at once;
//! * otherwise it waits for the missing loops and pings **as soon as the last of them ticks**,
//!   not at a later window's edge. A loop whose iterations take almost `T` therefore survives,
//!   as it would under `sd-event`; one whose iterations take longer than `T` gets the service
//!   killed.
//!
//! A tick costs one relaxed atomic load when the loop already ticked since the last ping, and
//! one atomic `or` on the first tick after a ping; only when the keeper waits for that loop does
//! the tick wake it. A healthy service wakes the keeper once per `T/2`.
//!
//! # Stalls and dead loops
//!
//! A loop that has not ticked for `3T/4` after the last ping (`sd-event`'s latest wake-up) is
//! *stalled*: a `warn` log and `STATUS=` name it (`stalled: no progress in 'NAME'`, the service's
//! own status after it), until it ticks again. A loop whose [`Progress`] is dropped while the
//! service is not stopping is *dead* (its task returned, was aborted, or panicked): the pings
//! stop for good, and the log and `STATUS=` say so. A loop that ends on purpose says so with
//! [`Progress::retire`].
//!
//! [`Watchdog::peek`] gives the same judgement at any time, for a health endpoint, without
//! changing what the keeper sees.
//!
//! # Loops that wait on outside events
//!
//! An idle `accept()`, a channel receive or a long poll may wait longer than `T` for a reason
//! that is not a hang. Wrap that wait in [`Progress::idle`]: while the future is pending the loop
//! counts as alive, with no timer of its own and without being woken; it ticks when the future
//! completes. The work that follows is gated as usual.
//!
//! # Caveats
//!
//! * With no loop registered the keeper pings as long as the runtime runs its timers.
//! * Once the service is stopping the keeper stops pinging: systemd disarms the watchdog when a
//!   service leaves its running state, and the stop is bounded by the stop timeout instead.
//! * Without a watchdog (`WATCHDOG_USEC` unset) only dead loops are reported.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::lifecycle::State;
use crate::notify::{Notification, NotifyError, usec};

/// The longest [`Progress::busy`] window: one hour. A loop busy for longer must tick (or open a
/// new window) within each hour, so that no window, `Duration::MAX` included, turns the
/// watchdog off for good.
pub const MAX_BUSY: Duration = Duration::from_secs(60 * 60);

/// `LoopState::flags`: the loop ticked since the last ping.
const TICKED: u8 = 1;
/// `LoopState::flags`: the keeper waits for this loop's next tick.
const WAITING: u8 = 2;

/// `LoopState::fate`.
const ALIVE: u8 = 0;
const PANICKED: u8 = 1;
const ENDED: u8 = 2;
const RETIRED: u8 = 3;
const FAILED: u8 = 4;

/// State of one registered loop, shared between its [`Progress`] and the keeper.
#[derive(Debug)]
struct LoopState {
    name: String,
    /// `TICKED` set by `tick`, `WAITING` by the keeper; both cleared by the keeper's ping.
    flags: AtomicU8,
    /// When the loop was last known alive, in ms since the watchdog's epoch: its
    /// registration, `READY=1`, or the last ping that found it alive.
    seen_ms: AtomicU64,
    /// End of the declared busy window, in ms since the watchdog's epoch; 0 = not busy.
    busy_until_ms: AtomicU64,
    /// How many [`Idle`] futures of this loop are being awaited.
    idle: AtomicU32,
    /// `ALIVE`, `PANICKED`, `ENDED`, `RETIRED` or `FAILED`.
    fate: AtomicU8,
    /// The open [`Busy`] windows: how many, and the latest end among them (ms since the
    /// epoch). `busy_until_ms` mirrors that end while one is open. A lock, not atomics: two
    /// windows opening and closing at once must not lose an end, and this is not the hot path.
    busy_windows: Mutex<(u32, u64)>,
}

impl LoopState {
    fn windows(&self) -> std::sync::MutexGuard<'_, (u32, u64)> {
        // Two plain integers: a panic under the lock cannot leave them torn.
        self.busy_windows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// `NAME (panicked)`, `NAME (ended)` or `NAME (failed)` for a dead loop.
    fn dead_label(&self) -> Option<String> {
        match self.fate.load(Ordering::SeqCst) {
            PANICKED => Some(format!("{} (panicked)", self.name)),
            ENDED => Some(format!("{} (ended)", self.name)),
            FAILED => Some(format!("{} (failed)", self.name)),
            _ => None,
        }
    }

    /// Whether the loop vouches for itself now: it ticked since the last ping, is inside a busy
    /// window, or awaits an [`Idle`] future. With `wait`, a loop that does not is marked so that
    /// its next tick wakes the keeper (the mark and the check are one atomic step: no tick is
    /// missed between them).
    fn vouches(&self, now_ms: u64, wait: bool) -> bool {
        let flags = if wait {
            self.flags.fetch_or(WAITING, Ordering::SeqCst)
        } else {
            self.flags.load(Ordering::SeqCst)
        };
        flags & TICKED != 0
            || self.idle.load(Ordering::SeqCst) > 0
            || self.busy_until_ms.load(Ordering::Relaxed) > now_ms
    }
}

#[derive(Debug)]
struct Shared {
    loops: Mutex<Vec<Arc<LoopState>>>,
    /// Wakes the keeper: timeout changed, trigger requested, stopping, a loop died.
    wake: Notify,
    /// Wakes the keeper when a loop it waits for ticks.
    tick_wake: Notify,
    /// Watchdog timeout in µs, 0 = no watchdog.
    timeout_usec: AtomicU64,
    trigger: Mutex<Option<String>>,
    stopping: AtomicBool,
    /// The service's stop: a loop that ends once it is cancelled ends on purpose.
    shutdown: Option<CancellationToken>,
    epoch: Instant,
}

impl Shared {
    fn ms_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    fn loops(&self) -> std::sync::MutexGuard<'_, Vec<Arc<LoopState>>> {
        // A panic while holding this lock cannot leave the Vec inconsistent.
        self.loops.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
            || self
                .shutdown
                .as_ref()
                .is_some_and(CancellationToken::is_cancelled)
    }
}

/// The watchdog registry: hands out [`Progress`] handles and decides whether a ping is due.
///
/// Cloning gives another handle to the same registry.
#[derive(Debug, Clone)]
pub struct Watchdog {
    shared: Arc<Shared>,
}

/// What one evaluation found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every loop makes progress (or is busy within its bound, or idle): pings go out.
    Healthy,
    /// These loops are stalled or dead (`NAME (ended)`, `NAME (panicked)`): pings are withheld.
    Stalled(Vec<String>),
}

/// How long after the last ping a loop without a tick counts as stalled: `3T/4`, the latest
/// moment `sd-event`'s own timer wakes an idle loop to ping.
fn allowance(timeout: Duration) -> Duration {
    timeout / 4 * 3
}

impl Watchdog {
    /// A registry with the given timeout (`None`: no watchdog until
    /// [`Watchdog::set_timeout`]).
    pub fn new(timeout: Option<Duration>) -> Self {
        Self::build(timeout, None)
    }

    /// A registry for a service whose stop is `shutdown`: loops that end after it was
    /// cancelled end on purpose.
    pub(crate) fn with_shutdown(timeout: Option<Duration>, shutdown: CancellationToken) -> Self {
        Self::build(timeout, Some(shutdown))
    }

    fn build(timeout: Option<Duration>, shutdown: Option<CancellationToken>) -> Self {
        Watchdog {
            shared: Arc::new(Shared {
                loops: Mutex::new(Vec::new()),
                wake: Notify::new(),
                tick_wake: Notify::new(),
                timeout_usec: AtomicU64::new(timeout.map_or(0, usec)),
                trigger: Mutex::new(None),
                stopping: AtomicBool::new(false),
                shutdown,
                epoch: Instant::now(),
            }),
        }
    }

    /// Registers a work loop. Its first ping is free: a loop registered just before the keeper
    /// looks is not judged stalled by it.
    ///
    /// Keep the [`Progress`] for as long as the loop runs: dropping it while the service is not
    /// stopping reports the loop as dead and stops the pings for good (see
    /// [`Progress::retire`]).
    #[must_use = "dropping the Progress reports the loop as dead"]
    pub fn register(&self, name: impl Into<String>) -> Progress {
        let state = Arc::new(LoopState {
            name: name.into(),
            flags: AtomicU8::new(TICKED),
            seen_ms: AtomicU64::new(self.shared.now_ms()),
            busy_until_ms: AtomicU64::new(0),
            idle: AtomicU32::new(0),
            fate: AtomicU8::new(ALIVE),
            busy_windows: Mutex::new((0, 0)),
        });
        self.shared.loops().push(state.clone());
        Progress {
            state,
            shared: self.shared.clone(),
        }
    }

    /// The current timeout, if a watchdog is armed.
    pub fn timeout(&self) -> Option<Duration> {
        match self.shared.timeout_usec.load(Ordering::Relaxed) {
            0 => None,
            u => Some(Duration::from_micros(u)),
        }
    }

    /// Records a new timeout (after `WATCHDOG_USEC=` was sent); the keeper follows at once.
    /// `Duration::ZERO` means no watchdog.
    pub fn set_timeout(&self, timeout: Duration) {
        self.shared
            .timeout_usec
            .store(usec(timeout), Ordering::Relaxed);
        self.shared.wake.notify_one();
    }

    /// Names of the loops being watched (dead ones included).
    pub fn loop_names(&self) -> Vec<String> {
        self.shared.loops().iter().map(|l| l.name.clone()).collect()
    }

    /// Whether the loops are healthy now, judged as the keeper judges them, without changing
    /// what the keeper sees: safe to call as often as a health endpoint likes.
    ///
    /// A loop is stalled when it has not ticked (nor been busy or idle) for `3T/4` since it was
    /// last known alive, `T` being the watchdog timeout; a loop is known alive at its
    /// registration, at `READY=1` and at each ping that found it alive, so a loop that ticks
    /// more often than that is never reported, however the calls fall. Dead loops are always
    /// reported. Without a watchdog, only dead loops are.
    pub fn peek(&self) -> Verdict {
        self.judge(self.shared.now_ms())
    }

    fn judge(&self, now_ms: u64) -> Verdict {
        let allow = self.timeout().map(|t| millis(allowance(t)));
        let stalled: Vec<String> = self
            .shared
            .loops()
            .iter()
            .filter_map(|l| {
                if let Some(dead) = l.dead_label() {
                    return Some(dead);
                }
                let allow = allow?;
                let late = now_ms.saturating_sub(l.seen_ms.load(Ordering::SeqCst)) > allow;
                (late && !l.vouches(now_ms, false)).then(|| l.name.clone())
            })
            .collect();
        if stalled.is_empty() {
            Verdict::Healthy
        } else {
            Verdict::Stalled(stalled)
        }
    }

    /// The loops that do not vouch for themselves now, dead ones first in their order; with
    /// `wait`, each is marked so that its next tick wakes the keeper.
    fn missing(&self, now_ms: u64, wait: bool) -> Vec<Arc<LoopState>> {
        self.shared
            .loops()
            .iter()
            .filter(|l| l.fate.load(Ordering::SeqCst) != ALIVE || !l.vouches(now_ms, wait))
            .cloned()
            .collect()
    }

    /// A ping (or `READY=1`): every loop that vouches now is known alive at `now_ms`; the
    /// tick marks start again.
    fn consume(&self, now_ms: u64) {
        for l in self.shared.loops().iter() {
            if l.vouches(now_ms, false) {
                l.seen_ms.store(now_ms, Ordering::SeqCst);
            }
            l.flags.store(0, Ordering::SeqCst);
        }
    }

    /// Tells the keeper the service is stopping: it sends no more pings.
    pub(crate) fn set_stopping(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
    }

    /// Registers a loop that is dead already: a task that failed (`what` names it) while the
    /// service keeps running.
    pub(crate) fn mark_dead(&self, what: String) {
        let state = Arc::new(LoopState {
            name: what,
            flags: AtomicU8::new(0),
            seen_ms: AtomicU64::new(0),
            busy_until_ms: AtomicU64::new(0),
            idle: AtomicU32::new(0),
            fate: AtomicU8::new(FAILED),
            busy_windows: Mutex::new((0, 0)),
        });
        self.shared.loops().push(state);
        self.shared.wake.notify_one();
    }

    fn take_trigger(&self) -> Option<String> {
        self.shared
            .trigger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Runs the keeper until the service stops: pings, stall reports and triggers.
    ///
    /// `state` is the lifecycle's: no ping goes out while it is [`State::Starting`]. `send`
    /// delivers a notification; `report` is told about stalls and recoveries (to update
    /// `STATUS=`).
    pub(crate) async fn keep<S, R>(
        self,
        mut state: watch::Receiver<State>,
        mut send: S,
        mut report: R,
    ) where
        S: FnMut(&[Notification]) -> Result<(), NotifyError>,
        R: FnMut(Option<&[String]>),
    {
        /// How soon a ping refused by a full queue is tried again.
        const RETRY: Duration = Duration::from_millis(10);
        let shared = self.shared.clone();
        // None until READY=1: the manager arms its watchdog then.
        let mut last_ping: Option<Instant> = None;
        let mut pending_ping = false;
        let mut pending_trigger: Option<String> = None;
        let mut reported: Option<Vec<String>> = None;
        let mut state_open = true;
        loop {
            if shared.is_stopping() {
                return;
            }
            let now = Instant::now();
            let now_ms = shared.ms_at(now);
            let current = *state.borrow_and_update();
            if last_ping.is_none() && current != State::Starting {
                if current == State::Stopping {
                    return;
                }
                // READY=1 arms the manager's watchdog as a ping would.
                last_ping = Some(now);
                self.consume(now_ms);
            }
            let timeout = self.timeout();
            let mut wake_at: Option<Instant> = None;
            let mut wait_ticks = false;
            let mut stalled: Vec<String> = Vec::new();
            let mut judged = false;
            if let (Some(t), Some(base)) = (timeout, last_ping) {
                let due = base + t / 2;
                if pending_ping {
                    // Decided already; only the delivery is pending.
                } else if now < due {
                    wake_at = Some(due);
                } else {
                    judged = true;
                    let missing = self.missing(now_ms, true);
                    if missing.is_empty() {
                        self.consume(now_ms);
                        pending_ping = true;
                    } else {
                        wait_ticks = true;
                        let allow = millis(allowance(t));
                        for l in &missing {
                            if let Some(dead) = l.dead_label() {
                                stalled.push(dead);
                                continue;
                            }
                            let stall_at = l.seen_ms.load(Ordering::SeqCst).saturating_add(allow);
                            if now_ms > stall_at {
                                stalled.push(l.name.clone());
                            } else {
                                let at = shared.epoch
                                    + Duration::from_millis(stall_at.saturating_add(1));
                                wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
                            }
                        }
                    }
                }
            }
            if !judged {
                // Dead loops are reported whatever the watchdog does.
                stalled = self
                    .shared
                    .loops()
                    .iter()
                    .filter_map(|l| l.dead_label())
                    .collect();
            }
            if stalled.is_empty() {
                if reported.take().is_some() {
                    tracing::info!("watchdog: every loop makes progress again");
                    report(None);
                }
            } else if reported.as_ref() != Some(&stalled) {
                tracing::warn!(
                    loops = %Names(&stalled),
                    "watchdog: no progress; withholding WATCHDOG=1"
                );
                report(Some(&stalled));
                reported = Some(stalled);
            }
            if pending_ping {
                match send(&[Notification::Watchdog]) {
                    // Coalesced: one pending ping, retried until delivered.
                    Err(NotifyError::QueueFull { .. }) => {}
                    // Delivered (or lost for good): the next one is due from now.
                    _ => {
                        pending_ping = false;
                        last_ping = Some(Instant::now());
                        continue;
                    }
                }
            }
            if pending_ping {
                continue_retry(&mut wake_at, RETRY);
            }
            if let Some(reason) = &pending_trigger {
                let status = Notification::status(format!("watchdog trigger: {reason}"))
                    .unwrap_or(Notification::WatchdogTrigger);
                match send(&[status, Notification::WatchdogTrigger]) {
                    Ok(()) => pending_trigger = None,
                    // Kept and retried: a full queue must not cost the restart.
                    Err(NotifyError::QueueFull { .. }) => continue_retry(&mut wake_at, RETRY),
                    Err(e) => {
                        tracing::error!(error = %e, "could not send WATCHDOG=trigger");
                        pending_trigger = None;
                    }
                }
            }
            tokio::select! {
                // Wake-ups first: a stop request must win over a ping due at the same time.
                biased;
                () = shared.wake.notified() => {
                    if let Some(reason) = self.take_trigger() {
                        tracing::error!(%reason, "watchdog trigger requested");
                        pending_trigger = Some(reason);
                    }
                }
                changed = state.changed(), if state_open => state_open = changed.is_ok(),
                () = shared.tick_wake.notified(), if wait_ticks => {}
                () = sleep_until_opt(wake_at) => {}
            }
        }
    }
}

/// Makes the keeper wake within `retry` (a delivery refused by a full queue).
fn continue_retry(wake_at: &mut Option<Instant>, retry: Duration) {
    let at = Instant::now() + retry;
    *wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Formats loop names as `'a', 'b'`.
pub(crate) struct Names<'a>(pub(crate) &'a [String]);

impl fmt::Display for Names<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, n) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "'{n}'")?;
        }
        Ok(())
    }
}

/// A work loop's handle on the watchdog. Call [`Progress::tick`] once per iteration.
///
/// Dropping it while the service is not stopping reports the loop as dead (its task returned,
/// was aborted, or panicked): the pings stop for good, and the log and `STATUS=` name it. A
/// loop that ends on purpose calls [`Progress::retire`]; one that ends because the service
/// stops needs nothing.
#[derive(Debug)]
#[must_use = "dropping the Progress reports the loop as dead; keep it while the loop runs"]
pub struct Progress {
    state: Arc<LoopState>,
    shared: Arc<Shared>,
}

impl Progress {
    /// Marks one iteration done. Once the loop ticked since the last ping, this is one relaxed
    /// atomic load: no store, no clock read, no syscall.
    #[inline]
    pub fn tick(&self) {
        if self.state.flags.load(Ordering::Relaxed) & TICKED == 0 {
            self.first_tick();
        }
    }

    /// The first tick since the last ping: marks it, and wakes the keeper if it waits for it.
    #[cold]
    #[inline(never)]
    fn first_tick(&self) {
        let before = self.state.flags.fetch_or(TICKED, Ordering::SeqCst);
        if before & WAITING != 0 {
            self.shared.tick_wake.notify_one();
        }
    }

    /// The loop's name.
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Ends the loop on purpose: it is no longer watched, and the pings go on without it.
    pub fn retire(self) {
        self.state.fate.store(RETIRED, Ordering::SeqCst);
        drop(self);
    }

    /// Declares that the loop will not tick for up to `bound` (a slow job, a long wait) without
    /// being stalled. Opening the window counts as a tick. The window ends, with a tick, when
    /// the guard is dropped, or after `bound`, whichever comes first: past the bound the loop
    /// can stall again.
    ///
    /// `bound` is capped at [`MAX_BUSY`]: a window is a promise to come back, and no promise
    /// outlives that. Windows nest: while several are open the loop is busy until the latest
    /// end among them, and it is the last guard dropped that ends it.
    pub fn busy(&self, bound: Duration) -> Busy<'_> {
        let bound = bound.min(MAX_BUSY);
        let until = self.shared.now_ms().saturating_add(millis(bound)).max(1);
        let mut windows = self.state.windows();
        windows.0 = windows.0.saturating_add(1);
        windows.1 = windows.1.max(until);
        self.state.busy_until_ms.store(windows.1, Ordering::Relaxed);
        drop(windows);
        self.tick();
        Busy { progress: self }
    }

    /// Awaits `fut`, an outside event (an idle `accept()`, a channel receive, a long poll),
    /// with the loop counted as alive while it is pending; completing it counts as a tick.
    ///
    /// No timer and no wake-up for the loop: the keeper sees the wait as it judges the loops.
    /// Wrap only the wait, not the work that follows it: work is gated by its ticks as usual.
    ///
    /// ```no_run
    /// # #![allow(dead_code)]
    /// # async fn doc(service: &watchkeeper::Service, listener: tokio::net::TcpListener) {
    /// let progress = service.register_loop("accept");
    /// loop {
    ///     let Ok((conn, _)) = progress.idle(listener.accept()).await else { break };
    ///     // ... hand `conn` to a task ...
    /// #   drop(conn);
    ///     progress.tick();
    /// }
    /// # progress.retire();
    /// # }
    /// ```
    pub fn idle<F: Future>(&self, fut: F) -> Idle<'_, F> {
        Idle {
            fut,
            progress: self,
            entered: false,
        }
    }

    fn enter_idle(&self) {
        self.state.idle.fetch_add(1, Ordering::SeqCst);
        if self.state.flags.load(Ordering::SeqCst) & WAITING != 0 {
            self.shared.tick_wake.notify_one();
        }
    }

    fn leave_idle(&self) {
        self.state.idle.fetch_sub(1, Ordering::SeqCst);
        self.tick();
    }

    /// Asks the manager to act as if the watchdog expired, now (`WATCHDOG=trigger`): for a loop
    /// that knows it is broken beyond repair. `reason` goes to the log and `STATUS=`.
    pub fn trigger(&self, reason: &str) {
        *self
            .shared
            .trigger
            .lock()
            .unwrap_or_else(PoisonError::into_inner) =
            Some(format!("{}: {reason}", self.state.name).replace(['\n', '\r', '\0'], " "));
        self.shared.wake.notify_one();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        let retired = self.state.fate.load(Ordering::SeqCst) == RETIRED;
        if retired || (self.shared.is_stopping() && !std::thread::panicking()) {
            self.shared.loops().retain(|l| !Arc::ptr_eq(l, &self.state));
            return;
        }
        let (fate, how) = if std::thread::panicking() {
            (PANICKED, "panicked")
        } else {
            (ENDED, "ended")
        };
        self.state.fate.store(fate, Ordering::SeqCst);
        tracing::warn!(
            loop_name = %self.state.name,
            "watchdog: loop {how} while the service runs; no more WATCHDOG=1"
        );
        self.shared.wake.notify_one();
    }
}

/// A declared busy window; see [`Progress::busy`].
#[derive(Debug)]
#[must_use = "the busy window ends when this guard is dropped"]
pub struct Busy<'a> {
    progress: &'a Progress,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let state = &self.progress.state;
        let mut windows = state.windows();
        windows.0 = windows.0.saturating_sub(1);
        if windows.0 == 0 {
            *windows = (0, 0);
            state.busy_until_ms.store(0, Ordering::Relaxed);
        }
        drop(windows);
        self.progress.tick();
    }
}

pin_project_lite::pin_project! {
    /// A wait on an outside event, during which the loop counts as alive; see
    /// [`Progress::idle`].
    #[derive(Debug)]
    #[must_use = "futures do nothing unless awaited"]
    pub struct Idle<'a, F> {
        #[pin]
        fut: F,
        progress: &'a Progress,
        entered: bool,
    }

    impl<'a, F> PinnedDrop for Idle<'a, F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.entered {
                this.progress.leave_idle();
            }
        }
    }
}

impl<F: Future> Future for Idle<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if !*this.entered {
            *this.entered = true;
            this.progress.enter_idle();
        }
        match this.fut.poll(cx) {
            Poll::Ready(out) => {
                *this.entered = false;
                this.progress.leave_idle();
                Poll::Ready(out)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(2);

    /// A ping now: what the keeper does when it sends `WATCHDOG=1`.
    fn ping(wd: &Watchdog) {
        wd.consume(wd.shared.now_ms());
    }

    fn stalled(names: &[&str]) -> Verdict {
        Verdict::Stalled(names.iter().map(|n| (*n).to_owned()).collect())
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_is_missing_until_it_ticks_after_a_ping() {
        let wd = Watchdog::new(Some(T));
        let a = wd.register("a");
        let b = wd.register("b");
        // Registration counts as a tick: the first ping is free.
        assert!(wd.missing(0, false).is_empty());
        ping(&wd);
        a.tick();
        let missing: Vec<_> = wd
            .missing(0, false)
            .iter()
            .map(|l| l.name.clone())
            .collect();
        assert_eq!(missing, ["b"]);
        b.tick();
        assert!(wd.missing(0, false).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn peek_judges_by_time_since_the_loop_was_last_known_alive() {
        let wd = Watchdog::new(Some(T));
        let a = wd.register("a");
        ping(&wd);
        // Not ticked since the ping, but within 3T/4 of it: healthy, however often one asks.
        for _ in 0..14 {
            tokio::time::advance(Duration::from_millis(100)).await;
            assert_eq!(wd.peek(), Verdict::Healthy);
        }
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(wd.peek(), stalled(&["a"]), "1.6 s > 3T/4 without a tick");
        a.tick();
        assert_eq!(wd.peek(), Verdict::Healthy);
        assert_eq!(wd.peek(), Verdict::Healthy, "peek consumes nothing");
    }

    #[test]
    fn a_dropped_loop_is_dead_and_a_retired_one_is_gone() {
        let wd = Watchdog::new(None);
        let a = wd.register("a");
        let b = wd.register("b");
        drop(a);
        assert_eq!(wd.peek(), stalled(&["a (ended)"]));
        b.retire();
        assert_eq!(wd.loop_names(), ["a"]);
        assert_eq!(wd.peek(), stalled(&["a (ended)"]), "dead for good");
    }

    #[test]
    fn a_loop_dropped_after_the_stop_began_is_gone() {
        let token = CancellationToken::new();
        let wd = Watchdog::with_shutdown(None, token.clone());
        let a = wd.register("a");
        token.cancel();
        drop(a);
        assert!(wd.loop_names().is_empty());
        assert_eq!(wd.peek(), Verdict::Healthy);
    }

    #[test]
    fn panicked_loop_stays_dead() {
        let wd = Watchdog::new(None);
        let p = wd.register("worker");
        let r = std::thread::spawn(move || {
            let _p = p;
            panic!("job exploded");
        })
        .join();
        assert!(r.is_err());
        assert_eq!(wd.peek(), stalled(&["worker (panicked)"]));
        assert_eq!(wd.missing(0, true).len(), 1);
    }

    #[test]
    fn a_failed_task_is_a_dead_loop() {
        let wd = Watchdog::new(None);
        wd.mark_dead("fetch".into());
        assert_eq!(wd.peek(), stalled(&["fetch (failed)"]));
    }

    #[tokio::test(start_paused = true)]
    async fn busy_window_is_bounded() {
        let wd = Watchdog::new(Some(T));
        let p = wd.register("slow");
        ping(&wd);
        let guard = p.busy(Duration::from_secs(5));
        ping(&wd);
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(
            wd.missing(wd.shared.now_ms(), false).is_empty(),
            "inside the window"
        );
        ping(&wd);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            wd.missing(wd.shared.now_ms(), false).len(),
            1,
            "past the bound"
        );
        assert_eq!(wd.peek(), stalled(&["slow"]));
        drop(guard);
        assert_eq!(wd.peek(), Verdict::Healthy, "guard drop ticks");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unbounded_busy_window_ends_at_the_cap() {
        let wd = Watchdog::new(Some(T));
        let p = wd.register("compaction");
        let _guard = p.busy(Duration::MAX);
        ping(&wd);
        tokio::time::advance(MAX_BUSY - Duration::from_secs(1)).await;
        assert!(wd.missing(wd.shared.now_ms(), false).is_empty());
        ping(&wd);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            wd.missing(wd.shared.now_ms(), false).len(),
            1,
            "Duration::MAX must not mean never stalled"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn nested_busy_windows_last_until_the_latest_end() {
        let wd = Watchdog::new(Some(T));
        let p = wd.register("job");
        let outer = p.busy(Duration::from_secs(10));
        {
            let _inner = p.busy(Duration::from_secs(1));
        }
        ping(&wd);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(
            wd.missing(wd.shared.now_ms(), false).is_empty(),
            "outer open"
        );
        // An inner window that outlasts the outer one keeps the loop busy until its own end.
        let inner = p.busy(Duration::from_secs(20));
        drop(outer);
        ping(&wd);
        tokio::time::advance(Duration::from_secs(15)).await;
        assert!(
            wd.missing(wd.shared.now_ms(), false).is_empty(),
            "inner open"
        );
        drop(inner);
        ping(&wd);
        assert_eq!(wd.missing(wd.shared.now_ms(), false).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_wait_vouches_for_the_loop_and_its_end_ticks() {
        let wd = Watchdog::new(Some(T));
        let p = wd.register("accept");
        ping(&wd);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let waiter = async {
            let _ = p.idle(rx).await;
            // Consume the end's tick as a ping would: the loop is then missing again.
            ping(&wd);
            wd.missing(wd.shared.now_ms(), false).len()
        };
        let check = async {
            tokio::time::advance(Duration::from_secs(10)).await;
            assert!(wd.missing(wd.shared.now_ms(), false).is_empty(), "idle");
            assert_eq!(wd.peek(), Verdict::Healthy);
            let _ = tx.send(());
        };
        let (missing_after, ()) = tokio::join!(waiter, check);
        assert_eq!(missing_after, 1);
    }

    #[tokio::test]
    async fn an_idle_wait_dropped_unfinished_leaves_idle() {
        let wd = Watchdog::new(Some(T));
        let p = wd.register("recv");
        ping(&wd);
        {
            let mut idle = Box::pin(p.idle(std::future::pending::<()>()));
            let waker = futures_util::task::noop_waker();
            let mut cx = Context::from_waker(&waker);
            assert!(idle.as_mut().poll(&mut cx).is_pending());
            assert_eq!(p.state.idle.load(Ordering::SeqCst), 1);
        }
        assert_eq!(p.state.idle.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn set_timeout_updates() {
        let wd = Watchdog::new(None);
        assert_eq!(wd.timeout(), None);
        wd.set_timeout(Duration::from_millis(1500));
        assert_eq!(wd.timeout(), Some(Duration::from_millis(1500)));
    }

    #[test]
    fn names_format() {
        assert_eq!(
            Names(&["a".to_string(), "b".to_string()]).to_string(),
            "'a', 'b'"
        );
    }
}
