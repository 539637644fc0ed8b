//! The progress-gated watchdog.
//!
//! systemd restarts a service whose watchdog pings stop (`WatchdogSec=`, `Restart=on-watchdog`
//! or `on-failure`). A ping sent from a timer, whatever the service is doing, defeats that: a
//! hung loop keeps being reported alive. Here every work loop registers and gets a [`Progress`]
//! handle; the keeper task sends `WATCHDOG=1` every half `WATCHDOG_USEC` (as
//! `sd_watchdog_enabled(3)` advises) **only if every registered loop called
//! [`Progress::tick`] since the previous ping**, or is inside a declared, bounded
//! [`Progress::busy`] window. One stalled loop withholds the ping; the loop is named in a `warn`
//! log and in `STATUS=`, and systemd's watchdog fires.
//!
//! This is the same rule as `sd_event_set_watchdog()`, which pings only at the start of an event
//! loop iteration, extended to any number of loops and threads.
//!
//! # Caveats
//!
//! * A loop must tick at least once per half watchdog interval. A loop that legitimately waits
//!   longer (a long poll, a slow job) either ticks while it waits or declares a
//!   [`Progress::busy`] window with a bound.
//! * A loop whose [`Progress`] is dropped is no longer watched, unless it was dropped while its
//!   thread panicked: then it is reported as dead and the pings stop for good.
//! * With no loop registered the keeper pings as long as the runtime runs its timers.
//! * Once the service is stopping the keeper stops pinging: systemd disarms the watchdog when a
//!   service leaves its running state, and the stop is bounded by the stop timeout instead.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::notify::{Notification, NotifyError, usec};

/// The longest [`Progress::busy`] window: one hour. A loop busy for longer must tick (or open a
/// new window) within each hour, so that no window, `Duration::MAX` included, turns the
/// watchdog off for good.
pub const MAX_BUSY: Duration = Duration::from_secs(60 * 60);

/// State of one registered loop, shared between its [`Progress`] and the keeper.
#[derive(Debug)]
struct LoopState {
    name: String,
    /// Set by `tick`, taken by the keeper at each evaluation.
    advanced: AtomicBool,
    /// End of the declared busy window, in ms since the watchdog's epoch; 0 = not busy.
    busy_until_ms: AtomicU64,
    /// The loop's thread panicked while it held its `Progress`.
    dead: AtomicBool,
    /// The open [`Busy`] windows: how many, and the latest end among them (ms since the
    /// epoch). `busy_until_ms` mirrors that end while one is open. A lock, not atomics: two
    /// windows opening and closing at once must not lose an end, and this is not the hot path.
    busy_windows: Mutex<(u32, u64)>,
}

#[derive(Debug)]
struct Shared {
    loops: Mutex<Vec<Arc<LoopState>>>,
    /// Wakes the keeper: timeout changed, trigger requested, stopping.
    wake: Notify,
    /// Watchdog timeout in µs, 0 = no watchdog.
    timeout_usec: AtomicU64,
    trigger: Mutex<Option<String>>,
    stopping: AtomicBool,
    epoch: Instant,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn loops(&self) -> std::sync::MutexGuard<'_, Vec<Arc<LoopState>>> {
        // A panic while holding this lock cannot leave the Vec inconsistent.
        self.loops.lock().unwrap_or_else(PoisonError::into_inner)
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
    /// Every loop made progress (or is busy within its bound): ping.
    Healthy,
    /// These loops made no progress: withhold the ping.
    Stalled(Vec<String>),
}

impl Watchdog {
    /// A registry with the given timeout (`None`: no watchdog until
    /// [`Watchdog::set_timeout`]).
    pub fn new(timeout: Option<Duration>) -> Self {
        Watchdog {
            shared: Arc::new(Shared {
                loops: Mutex::new(Vec::new()),
                wake: Notify::new(),
                timeout_usec: AtomicU64::new(timeout.map_or(0, usec)),
                trigger: Mutex::new(None),
                stopping: AtomicBool::new(false),
                epoch: Instant::now(),
            }),
        }
    }

    /// Registers a work loop. Its first window is free: a loop registered just before an
    /// evaluation is not judged stalled by it.
    pub fn register(&self, name: impl Into<String>) -> Progress {
        let state = Arc::new(LoopState {
            name: name.into(),
            advanced: AtomicBool::new(true),
            busy_until_ms: AtomicU64::new(0),
            dead: AtomicBool::new(false),
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

    /// Records a new timeout (after `WATCHDOG_USEC=` was sent) and restarts the keeper's timer;
    /// `Duration::ZERO` means no watchdog.
    pub fn set_timeout(&self, timeout: Duration) {
        self.shared
            .timeout_usec
            .store(usec(timeout), Ordering::Relaxed);
        self.shared.wake.notify_one();
    }

    /// Names of the loops being watched.
    pub fn loop_names(&self) -> Vec<String> {
        self.shared.loops().iter().map(|l| l.name.clone()).collect()
    }

    /// What the keeper would decide now, without consuming the loops' progress marks (safe to
    /// call from a health endpoint).
    pub fn peek(&self) -> Verdict {
        self.judge(false)
    }

    /// Evaluates every loop and resets their progress marks: the keeper's decision.
    pub(crate) fn evaluate(&self) -> Verdict {
        self.judge(true)
    }

    fn judge(&self, consume: bool) -> Verdict {
        let now = self.shared.now_ms();
        let stalled: Vec<String> = self
            .shared
            .loops()
            .iter()
            .filter_map(|l| {
                let advanced = if consume {
                    l.advanced.swap(false, Ordering::Relaxed)
                } else {
                    l.advanced.load(Ordering::Relaxed)
                };
                if l.dead.load(Ordering::Relaxed) {
                    return Some(format!("{} (panicked)", l.name));
                }
                let busy = l.busy_until_ms.load(Ordering::Relaxed) > now;
                (!advanced && !busy).then(|| l.name.clone())
            })
            .collect();
        if stalled.is_empty() {
            Verdict::Healthy
        } else {
            Verdict::Stalled(stalled)
        }
    }

    /// Tells the keeper the service is stopping: it sends no more pings.
    pub(crate) fn set_stopping(&self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
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
    /// `send` delivers a notification; `report` is told about stalls and recoveries (to update
    /// `STATUS=`).
    pub(crate) async fn keep<S, R>(self, mut send: S, mut report: R)
    where
        S: FnMut(&[Notification]) -> Result<(), NotifyError>,
        R: FnMut(Option<&[String]>),
    {
        /// How soon a ping refused by a full queue is tried again.
        const RETRY: Duration = Duration::from_millis(10);
        let shared = self.shared.clone();
        let mut period = self.timeout().map(|t| t / 2);
        let mut next = period.map(|p| Instant::now() + p);
        let mut pending_ping = false;
        let mut pending_trigger: Option<String> = None;
        let mut stalled: Option<Vec<String>> = None;
        loop {
            if shared.stopping.load(Ordering::Relaxed) {
                return;
            }
            let retry_at =
                (pending_ping || pending_trigger.is_some()).then(|| Instant::now() + RETRY);
            let wake_at = match (next, retry_at) {
                (Some(n), Some(r)) => Some(n.min(r)),
                (n, r) => n.or(r),
            };
            tokio::select! {
                // Wake-ups first: a stop request must win over a ping due at the same time.
                biased;
                () = shared.wake.notified() => {
                    if let Some(reason) = self.take_trigger() {
                        tracing::error!(%reason, "watchdog trigger requested");
                        pending_trigger = Some(reason);
                    }
                    let new_period = self.timeout().map(|t| t / 2);
                    if new_period != period {
                        period = new_period;
                        next = period.map(|p| Instant::now() + p);
                    }
                }
                () = sleep_until_opt(wake_at) => {
                    let now = Instant::now();
                    if next.is_some_and(|n| now >= n) {
                        next = period.map(|p| now + p);
                        match self.evaluate() {
                            Verdict::Healthy => {
                                pending_ping = true;
                                if stalled.take().is_some() {
                                    tracing::info!("watchdog: every loop makes progress again; pinging");
                                    report(None);
                                }
                            }
                            Verdict::Stalled(names) => {
                                // A stalled window cancels a ping still pending from before.
                                pending_ping = false;
                                if stalled.as_ref() != Some(&names) {
                                    tracing::warn!(
                                        loops = %Names(&names),
                                        window = ?period.unwrap_or_default(),
                                        "watchdog: no progress; withholding WATCHDOG=1"
                                    );
                                    report(Some(&names));
                                    stalled = Some(names);
                                }
                            }
                        }
                    }
                    if pending_ping && shared.stopping.load(Ordering::Relaxed) {
                        return;
                    }
                    if pending_ping {
                        match send(&[Notification::Watchdog]) {
                            Ok(()) => pending_ping = false,
                            // Coalesced: one pending ping, retried until the next window.
                            Err(NotifyError::QueueFull { .. }) => {}
                            Err(_) => pending_ping = false,
                        }
                    }
                }
            }
            if let Some(reason) = &pending_trigger {
                let status = Notification::status(format!("watchdog trigger: {reason}"))
                    .unwrap_or(Notification::WatchdogTrigger);
                match send(&[status, Notification::WatchdogTrigger]) {
                    Ok(()) => pending_trigger = None,
                    // Kept and retried: a full queue must not cost the restart.
                    Err(NotifyError::QueueFull { .. }) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "could not send WATCHDOG=trigger");
                        pending_trigger = None;
                    }
                }
            }
        }
    }
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
/// Dropping it unregisters the loop, except during a panic: a loop that died is reported
/// as dead and the pings stop.
#[derive(Debug)]
pub struct Progress {
    state: Arc<LoopState>,
    shared: Arc<Shared>,
}

impl Progress {
    /// Marks one iteration done. One relaxed atomic store: no clock read, no syscall.
    #[inline]
    pub fn tick(&self) {
        self.state.advanced.store(true, Ordering::Relaxed);
    }

    /// The loop's name.
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Declares that the loop will not tick for up to `bound` (a slow job, a long wait) without
    /// being stalled. The window ends, with a tick, when the guard is dropped, or after `bound`,
    /// whichever comes first: past the bound the loop counts as stalled again.
    ///
    /// `bound` is capped at [`MAX_BUSY`]: a window is a promise to come back, and no promise
    /// outlives that. Windows nest: while several are open the loop is busy until the latest
    /// end among them, and it is the last guard dropped that ends it.
    pub fn busy(&self, bound: Duration) -> Busy<'_> {
        let bound = bound.min(MAX_BUSY);
        let until = self
            .shared
            .now_ms()
            .saturating_add(u64::try_from(bound.as_millis()).unwrap_or(u64::MAX))
            .max(1);
        let mut windows = self.state.windows();
        windows.0 = windows.0.saturating_add(1);
        windows.1 = windows.1.max(until);
        self.state.busy_until_ms.store(windows.1, Ordering::Relaxed);
        Busy { progress: self }
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
        if std::thread::panicking() {
            self.state.dead.store(true, Ordering::Relaxed);
        } else {
            self.shared.loops().retain(|l| !Arc::ptr_eq(l, &self.state));
        }
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

impl LoopState {
    fn windows(&self) -> std::sync::MutexGuard<'_, (u32, u64)> {
        // Two plain integers: a panic under the lock cannot leave them torn.
        self.busy_windows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_only_when_every_loop_ticked() {
        let wd = Watchdog::new(Some(Duration::from_secs(2)));
        let a = wd.register("a");
        let b = wd.register("b");
        // First window is free.
        assert_eq!(wd.evaluate(), Verdict::Healthy);
        a.tick();
        assert_eq!(wd.evaluate(), Verdict::Stalled(vec!["b".into()]));
        a.tick();
        b.tick();
        assert_eq!(wd.evaluate(), Verdict::Healthy);
        // Marks are consumed by the evaluation.
        assert_eq!(
            wd.evaluate(),
            Verdict::Stalled(vec!["a".into(), "b".into()])
        );
    }

    #[test]
    fn peek_does_not_consume_progress() {
        let wd = Watchdog::new(None);
        let a = wd.register("a");
        wd.evaluate();
        a.tick();
        assert_eq!(wd.peek(), Verdict::Healthy);
        assert_eq!(wd.peek(), Verdict::Healthy);
        assert_eq!(wd.evaluate(), Verdict::Healthy, "the tick is still there");
        assert_eq!(wd.peek(), Verdict::Stalled(vec!["a".into()]));
    }

    #[test]
    fn dropped_loop_is_unwatched() {
        let wd = Watchdog::new(None);
        let a = wd.register("a");
        {
            let _b = wd.register("b");
            assert_eq!(wd.loop_names(), ["a", "b"]);
        }
        assert_eq!(wd.loop_names(), ["a"]);
        wd.evaluate();
        a.tick();
        assert_eq!(wd.evaluate(), Verdict::Healthy);
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
        assert_eq!(
            wd.evaluate(),
            Verdict::Stalled(vec!["worker (panicked)".into()])
        );
        assert_eq!(
            wd.evaluate(),
            Verdict::Stalled(vec!["worker (panicked)".into()])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn busy_window_is_bounded() {
        let wd = Watchdog::new(None);
        let p = wd.register("slow");
        wd.evaluate();
        let guard = p.busy(Duration::from_secs(5));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(wd.evaluate(), Verdict::Healthy, "inside the window");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            wd.evaluate(),
            Verdict::Stalled(vec!["slow".into()]),
            "past the bound"
        );
        drop(guard);
        assert_eq!(wd.evaluate(), Verdict::Healthy, "guard drop ticks");
        assert_eq!(wd.evaluate(), Verdict::Stalled(vec!["slow".into()]));
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

#[cfg(test)]
mod busy_window_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_unbounded_busy_window_ends_at_the_cap() {
        let wd = Watchdog::new(None);
        let p = wd.register("compaction");
        wd.evaluate();
        let _guard = p.busy(Duration::MAX);
        tokio::time::advance(MAX_BUSY - Duration::from_secs(1)).await;
        assert_eq!(wd.evaluate(), Verdict::Healthy, "inside the capped window");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            wd.evaluate(),
            Verdict::Stalled(vec!["compaction".into()]),
            "Duration::MAX must not mean never stalled"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn nested_busy_windows_last_until_the_latest_end() {
        let wd = Watchdog::new(None);
        let p = wd.register("job");
        wd.evaluate();
        let outer = p.busy(Duration::from_secs(10));
        {
            let _inner = p.busy(Duration::from_secs(1));
        }
        // The inner guard's drop ticked; consume that tick.
        assert_eq!(wd.evaluate(), Verdict::Healthy);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            wd.evaluate(),
            Verdict::Healthy,
            "the outer window is still open"
        );
        // An inner window that outlasts the outer one keeps the loop busy until its own end.
        let inner = p.busy(Duration::from_secs(20));
        drop(outer);
        wd.evaluate();
        tokio::time::advance(Duration::from_secs(15)).await;
        assert_eq!(wd.evaluate(), Verdict::Healthy, "the inner window is open");
        drop(inner);
        wd.evaluate();
        assert_eq!(wd.evaluate(), Verdict::Stalled(vec!["job".into()]));
    }
}
