//! What systemd 252's PID 1 does with the notifications of a `Type=notify` service: a model of
//! `src/core/service.c` (v252), reduced to one main process, no `Exec{Start,Stop}{Pre,Post}=`,
//! `Restart=no`, `NotifyAccess=main`, `KillMode=` and `WatchdogSignal=` at their defaults.
//!
//! Each rule names the function of `service.c` it mirrors. [`Unit`] is a pure state machine: the
//! caller feeds it datagrams ([`Unit::on_message`]), the main process's exit
//! ([`Unit::on_exit`]) and the passing of time ([`Unit::on_time`]), and delivers the signals it
//! asks for ([`Unit::take_signals`]). [`FakeManager`](crate::FakeManager) runs one for the
//! service it supervises.
//!
//! What the model does not cover is refused, not ignored: a `MAINPID=`, an `FDSTORE=1` or
//! `FDSTOREREMOVE=1` (the fake keeps no fd store), and a datagram that carries
//! `EXTEND_TIMEOUT_USEC=` together with `WATCHDOG=` or `WATCHDOG_USEC=` (the order in which 252
//! applies them within one message is not modelled) make [`Unit::refused`] say why, and the
//! manager's result checks fail with it.

use std::fmt;
use std::time::{Duration, Instant};

/// systemd's `DefaultTimeoutStartSec=`/`DefaultTimeoutStopSec=` (90 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(90);

/// The unit's settings: what a unit file would say.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UnitConfig {
    /// `WatchdogSec=` (`None`: off).
    pub watchdog: Option<Duration>,
    /// `TimeoutStartSec=` (`None`: infinity); also the reload timeout.
    pub start_timeout: Option<Duration>,
    /// `TimeoutStopSec=` (`None`: infinity); also `TimeoutAbortSec=`, which defaults to it.
    pub stop_timeout: Option<Duration>,
    /// `RuntimeMaxSec=` (`None`: infinity).
    pub runtime_max: Option<Duration>,
}

impl Default for UnitConfig {
    fn default() -> Self {
        UnitConfig {
            watchdog: None,
            start_timeout: Some(DEFAULT_TIMEOUT),
            stop_timeout: Some(DEFAULT_TIMEOUT),
            runtime_max: None,
        }
    }
}

/// Zero means off or infinity, as in a unit file.
fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

impl UnitConfig {
    /// The defaults: no watchdog, 90 s start and stop timeouts, no runtime limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// `WatchdogSec=` (zero: off).
    pub fn watchdog(mut self, d: Duration) -> Self {
        self.watchdog = nonzero(d);
        self
    }

    /// `TimeoutStartSec=` (zero: infinity).
    pub fn start_timeout(mut self, d: Duration) -> Self {
        self.start_timeout = nonzero(d);
        self
    }

    /// `TimeoutStopSec=` (zero: infinity).
    pub fn stop_timeout(mut self, d: Duration) -> Self {
        self.stop_timeout = nonzero(d);
        self
    }

    /// `RuntimeMaxSec=` (zero: infinity).
    pub fn runtime_max(mut self, d: Duration) -> Self {
        self.runtime_max = nonzero(d);
        self
    }
}

/// systemd's `ActiveState=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ActiveState {
    /// `activating`
    Activating,
    /// `active`
    Active,
    /// `reloading`
    Reloading,
    /// `deactivating`
    Deactivating,
    /// `inactive`
    Inactive,
    /// `failed`
    Failed,
}

impl ActiveState {
    /// The name `systemctl show` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            ActiveState::Activating => "activating",
            ActiveState::Active => "active",
            ActiveState::Reloading => "reloading",
            ActiveState::Deactivating => "deactivating",
            ActiveState::Inactive => "inactive",
            ActiveState::Failed => "failed",
        }
    }
}

impl fmt::Display for ActiveState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// systemd's `SubState=` of a service (the states this model reaches).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SubState {
    /// `start`: the main process runs, `READY=1` has not come.
    Start,
    /// `running`
    Running,
    /// `reload`: after `RELOADING=1`, until `READY=1`.
    Reload,
    /// `stop-sigterm`: after `STOPPING=1` or a stop request.
    StopSigterm,
    /// `stop-watchdog`: the watchdog signal was sent.
    StopWatchdog,
    /// `stop-sigkill`
    StopSigkill,
    /// `dead`: stopped with `Result=success`.
    Dead,
    /// `failed`
    Failed,
}

impl SubState {
    /// The name `systemctl show` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            SubState::Start => "start",
            SubState::Running => "running",
            SubState::Reload => "reload",
            SubState::StopSigterm => "stop-sigterm",
            SubState::StopWatchdog => "stop-watchdog",
            SubState::StopSigkill => "stop-sigkill",
            SubState::Dead => "dead",
            SubState::Failed => "failed",
        }
    }

    /// `state_translation_table` of `service.c`.
    pub fn active_state(self) -> ActiveState {
        match self {
            SubState::Start => ActiveState::Activating,
            SubState::Running => ActiveState::Active,
            SubState::Reload => ActiveState::Reloading,
            SubState::StopSigterm | SubState::StopWatchdog | SubState::StopSigkill => {
                ActiveState::Deactivating
            }
            SubState::Dead => ActiveState::Inactive,
            SubState::Failed => ActiveState::Failed,
        }
    }

    fn is_final(self) -> bool {
        matches!(self, SubState::Dead | SubState::Failed)
    }

    /// `service_set_state()`: the watchdog runs only in these states (252 stops it when
    /// entering any other; a `WATCHDOG=1` still re-arms it, in any state).
    fn keeps_watchdog(self) -> bool {
        matches!(self, SubState::Running | SubState::Reload)
    }
}

impl fmt::Display for SubState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// systemd's `Result=` (`ServiceResult`; the values this model produces).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum UnitResult {
    /// `success`
    Success,
    /// `exit-code`: exited with a status other than 0.
    ExitCode,
    /// `signal`: killed by a signal other than SIGHUP, SIGINT, SIGTERM, SIGPIPE.
    Signal,
    /// `core-dump`
    CoreDump,
    /// `watchdog`: the watchdog expired or `WATCHDOG=trigger` came.
    Watchdog,
    /// `timeout`: a start, stop, reload or runtime timeout.
    Timeout,
    /// `protocol`: exited cleanly before `READY=1`.
    Protocol,
}

impl UnitResult {
    /// The name `systemctl show -p Result` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            UnitResult::Success => "success",
            UnitResult::ExitCode => "exit-code",
            UnitResult::Signal => "signal",
            UnitResult::CoreDump => "core-dump",
            UnitResult::Watchdog => "watchdog",
            UnitResult::Timeout => "timeout",
            UnitResult::Protocol => "protocol",
        }
    }
}

impl fmt::Display for UnitResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the main process ended (`waitid()`'s `si_code` and `si_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `CLD_EXITED` with this status.
    Exited(i32),
    /// `CLD_KILLED` by this signal.
    Killed(i32),
    /// `CLD_DUMPED` by this signal.
    Dumped(i32),
}

/// A signal the manager sends to the main process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KillSignal {
    /// SIGTERM (stop).
    Term,
    /// SIGABRT (`WatchdogSignal=`'s default).
    Abort,
    /// SIGKILL (after a stop timeout).
    Kill,
}

impl KillSignal {
    /// The signal's number.
    pub fn as_raw(self) -> i32 {
        match self {
            KillSignal::Term => 15,
            KillSignal::Abort => 6,
            KillSignal::Kill => 9,
        }
    }

    /// `SIGTERM`, `SIGABRT`, `SIGKILL`.
    pub fn name(self) -> &'static str {
        match self {
            KillSignal::Term => "SIGTERM",
            KillSignal::Abort => "SIGABRT",
            KillSignal::Kill => "SIGKILL",
        }
    }
}

/// `notify_state` of `service.c`: the last of `READY=1`, `RELOADING=1`, `STOPPING=1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotifyState {
    Unknown,
    Ready,
    Reloading,
    Stopping,
}

/// One line of the unit's log: what the manager did, in its own words where it logs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitEvent {
    /// Since the unit started.
    pub at: Duration,
    /// What happened.
    pub what: String,
}

impl fmt::Display for UnitEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:>8.3}s] {}", self.at.as_secs_f64(), self.what)
    }
}

/// A snapshot of the unit, as `systemctl show -p ActiveState,SubState,Result,...` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UnitStatus {
    /// `ActiveState=`
    pub active_state: ActiveState,
    /// `SubState=`
    pub sub_state: SubState,
    /// `Result=`
    pub result: UnitResult,
    /// `ReloadResult=`
    pub reload_result: UnitResult,
    /// `StatusText=`
    pub status_text: Option<String>,
    /// The watchdog timeout in force (`WatchdogUSec=`, after any `WATCHDOG_USEC=`).
    pub watchdog: Option<Duration>,
    /// How the main process ended, once it has.
    pub exit: Option<Exit>,
}

impl UnitStatus {
    /// Whether the unit is `inactive` or `failed`: nothing more will change.
    pub fn is_finished(&self) -> bool {
        self.sub_state.is_final()
    }
}

impl fmt::Display for UnitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ActiveState={} SubState={} Result={}",
            self.active_state, self.sub_state, self.result
        )?;
        if self.reload_result != UnitResult::Success {
            write!(f, " ReloadResult={}", self.reload_result)?;
        }
        if let Some(e) = self.exit {
            write!(f, " exit={e:?}")?;
        }
        Ok(())
    }
}

/// The state machine of one `Type=notify` service (see the module docs).
#[derive(Debug, Clone)]
pub struct Unit {
    cfg: UnitConfig,
    started: Instant,
    state: SubState,
    result: UnitResult,
    reload_result: UnitResult,
    notify_state: NotifyState,
    /// `timer_event_source`: the start, reload, runtime or stop deadline (`None`: off/infinity).
    timer: Option<Instant>,
    /// `watchdog_event_source`'s deadline while armed.
    watchdog_at: Option<Instant>,
    /// `WATCHDOG_USEC=`'s override (`Some(ZERO)`: watchdog off).
    watchdog_override: Option<Duration>,
    /// `active_enter_timestamp`, for `RuntimeMaxSec=`.
    active_enter: Option<Instant>,
    main_alive: bool,
    exit: Option<Exit>,
    status_text: Option<String>,
    signals: Vec<KillSignal>,
    events: Vec<UnitEvent>,
    refused: Option<String>,
}

impl Unit {
    /// Starts the unit at `now`: `service_enter_start()` forks the main process, arms the start
    /// timeout (`service_spawn()` with `timeout_start_usec`) and enters `start`, where
    /// `service_set_state()` keeps no watchdog.
    pub fn new(cfg: UnitConfig, now: Instant) -> Self {
        let mut u = Unit {
            timer: cfg.start_timeout.map(|t| now + t),
            cfg,
            started: now,
            state: SubState::Start,
            result: UnitResult::Success,
            reload_result: UnitResult::Success,
            notify_state: NotifyState::Unknown,
            watchdog_at: None,
            watchdog_override: None,
            active_enter: None,
            main_alive: true,
            exit: None,
            status_text: None,
            signals: Vec::new(),
            events: Vec::new(),
            refused: None,
        };
        u.log(now, "starting (activating/start)".into());
        u
    }

    /// When the unit started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The settings.
    pub fn config(&self) -> &UnitConfig {
        &self.cfg
    }

    /// The current state.
    pub fn status(&self) -> UnitStatus {
        UnitStatus {
            active_state: self.state.active_state(),
            sub_state: self.state,
            result: self.result,
            reload_result: self.reload_result,
            status_text: self.status_text.clone(),
            watchdog: self.watchdog_usec(),
            exit: self.exit,
        }
    }

    /// Why the model refused a message it does not cover, if it did.
    pub fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// What the manager did so far.
    pub fn events(&self) -> &[UnitEvent] {
        &self.events
    }

    /// The signals to deliver to the main process, oldest first (drained).
    pub fn take_signals(&mut self) -> Vec<KillSignal> {
        std::mem::take(&mut self.signals)
    }

    /// When [`Unit::on_time`] has something to do next.
    pub fn next_deadline(&self) -> Option<Instant> {
        match (self.timer, self.watchdog_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn log(&mut self, now: Instant, what: String) {
        self.events.push(UnitEvent {
            at: now.saturating_duration_since(self.started),
            what,
        });
    }

    fn refuse(&mut self, now: Instant, why: String) {
        self.log(now, format!("NOT MODELLED: {why}"));
        self.refused.get_or_insert(why);
    }

    /// `service_get_watchdog_usec()`: the override of `WATCHDOG_USEC=` if any, else
    /// `WatchdogSec=`; zero means off.
    fn watchdog_usec(&self) -> Option<Duration> {
        match self.watchdog_override {
            Some(o) => nonzero(o),
            None => self.cfg.watchdog,
        }
    }

    /// `service_reset_watchdog()` + `service_start_watchdog()`: the watchdog runs from now,
    /// whatever the state (252 checks none), or stops if the timeout is off.
    fn reset_watchdog(&mut self, now: Instant) {
        self.watchdog_at = self.watchdog_usec().map(|t| now + t);
    }

    /// `service_set_state()`: leaving the states with a watchdog stops it; a final state
    /// drops the timer.
    fn set_state(&mut self, state: SubState, now: Instant) {
        if !state.keeps_watchdog() {
            self.watchdog_at = None;
        }
        if state.is_final() {
            self.timer = None;
        }
        if state == SubState::Running && self.active_enter.is_none() {
            // unit_notify(): active_enter_timestamp, when the unit first becomes active.
            self.active_enter = Some(now);
        }
        if state != self.state {
            self.state = state;
            self.log(
                now,
                format!("state {}/{}", state.active_state(), state.as_str()),
            );
        }
    }

    /// `service_enter_signal()`: records the result, sends the state's signal (SIGABRT for
    /// `stop-watchdog`, SIGTERM for `stop-sigterm`, SIGKILL for `stop-sigkill`) and arms
    /// `TimeoutAbortSec=` (= `TimeoutStopSec=`) or `TimeoutStopSec=`; with no process left, goes
    /// on to the end (`service_enter_stop_post()` → `service_enter_dead()`).
    fn enter_signal(&mut self, state: SubState, f: UnitResult, now: Instant) {
        if self.result == UnitResult::Success {
            self.result = f;
        }
        if !self.main_alive {
            self.enter_dead(UnitResult::Success, now);
            return;
        }
        let sig = match state {
            SubState::StopWatchdog => KillSignal::Abort,
            SubState::StopSigkill => KillSignal::Kill,
            _ => KillSignal::Term,
        };
        self.log(now, format!("sending {} to the main process", sig.name()));
        self.signals.push(sig);
        self.timer = self.cfg.stop_timeout.map(|t| now + t);
        self.set_state(state, now);
    }

    /// `service_enter_dead()`: `failed` unless the result is success.
    fn enter_dead(&mut self, f: UnitResult, now: Instant) {
        if self.result == UnitResult::Success {
            self.result = f;
        }
        let state = if self.result == UnitResult::Success {
            SubState::Dead
        } else {
            SubState::Failed
        };
        self.set_state(state, now);
        if self.result != UnitResult::Success {
            self.log(now, format!("Failed with result '{}'.", self.result));
        }
    }

    /// `service_enter_stop()` (no `ExecStop=`): straight to `stop-sigterm`.
    fn enter_stop(&mut self, f: UnitResult, now: Instant) {
        self.enter_signal(SubState::StopSigterm, f, now);
    }

    /// `service_enter_start_post()` (no `ExecStartPost=`): the watchdog runs from now, then
    /// `service_enter_running()`.
    fn enter_start_post(&mut self, now: Instant) {
        self.reset_watchdog(now);
        self.enter_running(UnitResult::Success, now);
    }

    /// `service_enter_running()`: a failure stops the unit; a `RELOADING=1` or `STOPPING=1`
    /// that came before is acted on now; otherwise `running`, with `RuntimeMaxSec=` armed
    /// from the activation (`service_running_timeout()`); with the main process gone, stop.
    fn enter_running(&mut self, f: UnitResult, now: Instant) {
        if self.result == UnitResult::Success {
            self.result = f;
        }
        if self.result != UnitResult::Success {
            self.enter_signal(SubState::StopSigterm, f, now);
        } else if self.main_alive {
            match self.notify_state {
                NotifyState::Reloading => self.enter_reload_by_notify(now),
                NotifyState::Stopping => self.enter_stop_by_notify(now),
                _ => {
                    self.set_state(SubState::Running, now);
                    self.timer = match (self.cfg.runtime_max, self.active_enter) {
                        (Some(max), Some(at)) => Some(at + max),
                        _ => None,
                    };
                }
            }
        } else {
            self.enter_stop(UnitResult::Success, now);
        }
    }

    /// `service_enter_reload_by_notify()`: `reload`, with `TimeoutStartSec=` from now.
    fn enter_reload_by_notify(&mut self, now: Instant) {
        self.timer = self.cfg.start_timeout.map(|t| now + t);
        self.set_state(SubState::Reload, now);
    }

    /// `service_enter_stop_by_notify()`: "as if we SIGTERM'd it": `stop-sigterm` with
    /// `TimeoutStopSec=` from now, no signal sent.
    fn enter_stop_by_notify(&mut self, now: Instant) {
        self.timer = self.cfg.stop_timeout.map(|t| now + t);
        self.set_state(SubState::StopSigterm, now);
    }

    /// `service_extend_timeout()` + `service_extend_event_source_timeout()`: both the timer
    /// (start, reload, runtime or stop, whichever is current) and an armed watchdog are moved
    /// to `now + usec` if that is later; a timer at infinity (e.g. `running` without
    /// `RuntimeMaxSec=`) stays there. Zero is ignored.
    fn extend_timeout(&mut self, usec: u64, now: Instant) {
        if usec == 0 || usec == u64::MAX {
            return;
        }
        let extended = now + Duration::from_micros(usec);
        for deadline in [&mut self.timer, &mut self.watchdog_at] {
            if let Some(d) = deadline
                && *d < extended
            {
                *d = extended;
            }
        }
    }

    /// `service_force_watchdog()`: `WATCHDOG=trigger` acts at once, with or without
    /// `WatchdogSec=`.
    fn force_watchdog(&mut self, now: Instant) {
        let status = self.status_text.clone().unwrap_or_else(|| "<unset>".into());
        self.log(now, format!("Watchdog request (last status: {status})!"));
        self.enter_signal(SubState::StopWatchdog, UnitResult::Watchdog, now);
    }

    /// A datagram from the main process: `service_notify_message()`.
    pub fn on_message(&mut self, payload: &str, now: Instant) {
        // service_notify_message_authorized(): NotifyAccess=main drops what comes after the
        // main process is gone.
        if !self.main_alive || self.state.is_final() {
            return;
        }
        // strv_split_newlines(): lines; strv_find_startswith() takes the first match.
        let tags: Vec<&str> = payload.split(['\n', '\r']).collect();
        let first = |key: &str| tags.iter().find_map(|t| t.strip_prefix(key));
        let has = |tag: &str| tags.contains(&tag);

        if first("MAINPID=").is_some() {
            self.refuse(
                now,
                "MAINPID= (the fake supervises one main process)".into(),
            );
            return;
        }
        if has("FDSTORE=1") || has("FDSTOREREMOVE=1") {
            self.refuse(
                now,
                "FDSTORE=1/FDSTOREREMOVE=1 (the fake keeps no fd store)".into(),
            );
        }
        if first("EXTEND_TIMEOUT_USEC=").is_some()
            && (first("WATCHDOG=").is_some() || first("WATCHDOG_USEC=").is_some())
        {
            self.refuse(
                now,
                "EXTEND_TIMEOUT_USEC= with WATCHDOG= or WATCHDOG_USEC= in one datagram (their \
                 order within a message is not modelled): send them apart"
                    .into(),
            );
            return;
        }

        // "Interpret READY=/STOPPING=/RELOADING=. Last one wins." (252 walks the tags
        // backwards and acts on the first of the three it finds.)
        let last_state_tag = tags
            .iter()
            .rev()
            .find(|t| matches!(**t, "READY=1" | "RELOADING=1" | "STOPPING=1"));
        match last_state_tag.copied() {
            Some("READY=1") => {
                self.notify_state = NotifyState::Ready;
                if self.state == SubState::Start {
                    self.log(now, "READY=1: start complete".into());
                    self.enter_start_post(now);
                } else if self.state == SubState::Reload {
                    self.log(now, "READY=1: reload complete".into());
                    self.enter_running(UnitResult::Success, now);
                }
            }
            Some("RELOADING=1") => {
                self.notify_state = NotifyState::Reloading;
                if self.state == SubState::Running {
                    self.enter_reload_by_notify(now);
                }
            }
            Some("STOPPING=1") => {
                self.notify_state = NotifyState::Stopping;
                if self.state == SubState::Running {
                    self.enter_stop_by_notify(now);
                }
            }
            _ => {}
        }

        if let Some(s) = first("STATUS=") {
            self.status_text = (!s.is_empty()).then(|| s.to_owned());
        }

        match first("WATCHDOG=") {
            Some("1") => self.reset_watchdog(now),
            Some("trigger") => self.force_watchdog(now),
            Some(other) => self.log(
                now,
                format!("Passed WATCHDOG= field is invalid, ignoring ({other:?})."),
            ),
            None => {}
        }

        // service_override_watchdog_timeout(): a new timeout, running from now.
        if let Some(v) = first("WATCHDOG_USEC=") {
            match v.parse::<u64>() {
                Ok(usec) => {
                    self.watchdog_override = Some(Duration::from_micros(usec));
                    self.log(now, format!("watchdog timeout overridden: {usec} µs"));
                    self.reset_watchdog(now);
                }
                Err(_) => self.log(now, format!("Failed to parse WATCHDOG_USEC={v}")),
            }
        }

        if let Some(v) = first("EXTEND_TIMEOUT_USEC=") {
            match v.parse::<u64>() {
                Ok(usec) => self.extend_timeout(usec, now),
                Err(_) => self.log(now, format!("Failed to parse EXTEND_TIMEOUT_USEC={v}")),
            }
        }
    }

    /// A stop request (`systemctl stop`): `service_stop()` — `stop-sigterm` from `start`,
    /// `running` or `reload`; nothing while already stopping.
    pub fn stop(&mut self, now: Instant) {
        if matches!(
            self.state,
            SubState::Start | SubState::Running | SubState::Reload
        ) {
            self.log(now, "stop requested".into());
            self.enter_stop(UnitResult::Success, now);
        }
    }

    /// The main process ended: `service_sigchld_event()`. A daemon's clean exit is status 0 or
    /// death by SIGHUP, SIGINT, SIGTERM or SIGPIPE (`is_clean_exit()`, `EXIT_CLEAN_DAEMON`).
    pub fn on_exit(&mut self, exit: Exit, now: Instant) {
        if !self.main_alive {
            return;
        }
        self.main_alive = false;
        self.exit = Some(exit);
        let f = match exit {
            Exit::Exited(0) | Exit::Killed(1 | 2 | 13 | 15) => UnitResult::Success,
            Exit::Exited(_) => UnitResult::ExitCode,
            Exit::Killed(_) => UnitResult::Signal,
            Exit::Dumped(_) => UnitResult::CoreDump,
        };
        self.log(now, format!("main process exited: {exit:?}"));
        if self.result == UnitResult::Success {
            self.result = f;
        }
        match self.state {
            // Type=notify: only a notification enters running; a clean exit before it is a
            // protocol failure ("The service has never been and will never be active").
            SubState::Start => {
                let f = if f == UnitResult::Success {
                    UnitResult::Protocol
                } else {
                    f
                };
                self.enter_signal(SubState::StopSigterm, f, now);
            }
            SubState::Running => self.enter_running(f, now),
            // "If neither main nor control processes are running then the current state can
            // never exit cleanly, hence immediately terminate the service."
            SubState::Reload => self.enter_stop(f, now),
            SubState::StopSigterm | SubState::StopWatchdog | SubState::StopSigkill => {
                self.enter_dead(f, now)
            }
            SubState::Dead | SubState::Failed => {}
        }
    }

    /// Fires whatever is due at `now`, earliest first: `service_dispatch_watchdog()` and
    /// `service_dispatch_timer()`.
    pub fn on_time(&mut self, now: Instant) {
        while !self.state.is_final() {
            let watchdog_due = self.watchdog_at.filter(|&w| w <= now);
            let timer_due = self.timer.filter(|&t| t <= now);
            match (watchdog_due, timer_due) {
                (Some(w), t) if t.is_none_or(|t| w <= t) => self.dispatch_watchdog(w),
                (_, Some(t)) => self.dispatch_timer(t),
                _ => break,
            }
        }
    }

    /// `service_dispatch_watchdog()`: "Watchdog timeout (limit …)!", then the watchdog signal
    /// with `Result=watchdog`.
    fn dispatch_watchdog(&mut self, at: Instant) {
        self.watchdog_at = None;
        let limit = self.watchdog_usec().unwrap_or_default();
        self.log(at, format!("Watchdog timeout (limit {limit:?})!"));
        self.enter_signal(SubState::StopWatchdog, UnitResult::Watchdog, at);
    }

    /// `service_dispatch_timer()`, by state (`TimeoutStartFailureMode=`/
    /// `TimeoutStopFailureMode=terminate`, `SendSIGKILL=yes`).
    fn dispatch_timer(&mut self, at: Instant) {
        self.timer = None;
        match self.state {
            SubState::Start => {
                self.log(at, "start operation timed out. Terminating.".into());
                self.enter_signal(SubState::StopSigterm, UnitResult::Timeout, at);
            }
            SubState::Running => {
                self.log(at, "Service reached runtime time limit. Stopping.".into());
                self.enter_stop(UnitResult::Timeout, at);
            }
            SubState::Reload => {
                self.log(at, "Reload operation timed out.".into());
                self.reload_result = UnitResult::Timeout;
                self.enter_running(UnitResult::Success, at);
            }
            SubState::StopSigterm | SubState::StopWatchdog => {
                self.log(
                    at,
                    format!("State '{}' timed out. Killing.", self.state.as_str()),
                );
                self.enter_signal(SubState::StopSigkill, UnitResult::Timeout, at);
            }
            SubState::StopSigkill => {
                self.log(at, "Processes still around after SIGKILL. Ignoring.".into());
                self.enter_dead(UnitResult::Timeout, at);
            }
            SubState::Dead | SubState::Failed => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A unit with `WatchdogSec=1`, `TimeoutStartSec=10`, `TimeoutStopSec=1`, and a clock.
    fn unit() -> (Unit, Instant) {
        let t0 = Instant::now();
        let cfg = UnitConfig::new()
            .watchdog(T)
            .start_timeout(Duration::from_secs(10))
            .stop_timeout(T);
        (Unit::new(cfg, t0), t0)
    }

    fn state(u: &Unit) -> (ActiveState, UnitResult) {
        let s = u.status();
        (s.active_state, s.result)
    }

    #[test]
    fn a_ping_before_ready_arms_the_watchdog_during_the_start() {
        let (mut u, t0) = unit();
        u.on_message("WATCHDOG=1", t0 + ms(100));
        u.on_time(t0 + ms(1099));
        assert_eq!(state(&u), (ActiveState::Activating, UnitResult::Success));
        u.on_time(t0 + ms(1100));
        assert_eq!(u.take_signals(), [KillSignal::Abort]);
        assert_eq!(state(&u), (ActiveState::Deactivating, UnitResult::Watchdog));
        u.on_exit(Exit::Killed(6), t0 + ms(1150));
        assert_eq!(state(&u), (ActiveState::Failed, UnitResult::Watchdog));
    }

    #[test]
    fn without_a_ping_the_start_has_no_watchdog_and_ready_arms_it() {
        let (mut u, t0) = unit();
        u.on_time(t0 + ms(5000));
        assert_eq!(state(&u), (ActiveState::Activating, UnitResult::Success));
        u.on_message("READY=1", t0 + ms(5000));
        assert_eq!(u.next_deadline(), Some(t0 + ms(6000)));
        u.on_message("WATCHDOG=1", t0 + ms(5900));
        u.on_time(t0 + ms(6800));
        assert_eq!(state(&u), (ActiveState::Active, UnitResult::Success));
        u.on_time(t0 + ms(6900));
        assert_eq!(state(&u), (ActiveState::Deactivating, UnitResult::Watchdog));
    }

    #[test]
    fn start_timeout_terminates_with_result_timeout_unless_extended() {
        let (mut u, t0) = unit();
        u.on_message("EXTEND_TIMEOUT_USEC=12000000", t0 + ms(1000));
        u.on_time(t0 + ms(12_000));
        assert_eq!(state(&u), (ActiveState::Activating, UnitResult::Success));
        u.on_time(t0 + ms(13_000));
        assert_eq!(u.take_signals(), [KillSignal::Term]);
        assert_eq!(state(&u), (ActiveState::Deactivating, UnitResult::Timeout));
        // SIGTERM is a clean death for a daemon; the result stays.
        u.on_exit(Exit::Killed(15), t0 + ms(13_010));
        assert_eq!(state(&u), (ActiveState::Failed, UnitResult::Timeout));
    }

    #[test]
    fn extend_while_running_moves_an_armed_watchdog_not_an_infinite_timer() {
        let (mut u, t0) = unit();
        u.on_message("READY=1", t0);
        u.on_message("EXTEND_TIMEOUT_USEC=2500000", t0 + ms(300));
        u.on_time(t0 + ms(2700));
        assert_eq!(state(&u), (ActiveState::Active, UnitResult::Success));
        assert_eq!(u.next_deadline(), Some(t0 + ms(2800)));
        u.on_time(t0 + ms(2800));
        assert_eq!(state(&u), (ActiveState::Deactivating, UnitResult::Watchdog));
        // A later ping would have set it back to now + T instead.
        let (mut u, t0) = unit();
        u.on_message("READY=1", t0);
        u.on_message("EXTEND_TIMEOUT_USEC=2500000", t0 + ms(300));
        u.on_message("WATCHDOG=1", t0 + ms(400));
        assert_eq!(u.next_deadline(), Some(t0 + ms(1400)));
    }

    #[test]
    fn runtime_max_is_extended_while_running() {
        let t0 = Instant::now();
        let mut u = Unit::new(UnitConfig::new().runtime_max(T), t0);
        u.on_message("READY=1", t0);
        u.on_message("EXTEND_TIMEOUT_USEC=2000000", t0 + ms(500));
        u.on_time(t0 + ms(2400));
        assert_eq!(state(&u), (ActiveState::Active, UnitResult::Success));
        u.on_time(t0 + ms(2500));
        assert_eq!(u.take_signals(), [KillSignal::Term]);
        assert_eq!(state(&u), (ActiveState::Deactivating, UnitResult::Timeout));
    }

    #[test]
    fn stopping_then_hanging_is_killed_after_the_stop_timeout() {
        let (mut u, t0) = unit();
        u.on_message("READY=1", t0);
        u.on_message("STOPPING=1", t0 + ms(100));
        assert_eq!(u.status().sub_state, SubState::StopSigterm);
        assert!(u.take_signals().is_empty(), "STOPPING=1 sends no signal");
        // The watchdog stopped with the state change.
        u.on_time(t0 + ms(1099));
        assert_eq!(state(&u), (ActiveState::Deactivating, UnitResult::Success));
        u.on_time(t0 + ms(1100));
        assert_eq!(u.take_signals(), [KillSignal::Kill]);
        assert_eq!(state(&u), (ActiveState::Deactivating, UnitResult::Timeout));
        u.on_exit(Exit::Killed(9), t0 + ms(1110));
        assert_eq!(state(&u), (ActiveState::Failed, UnitResult::Timeout));
    }

    #[test]
    fn stopping_then_exit_0_is_success_and_stopping_during_start_waits_for_ready() {
        let (mut u, t0) = unit();
        u.on_message("STOPPING=1", t0 + ms(10));
        assert_eq!(u.status().sub_state, SubState::Start);
        u.on_message("READY=1", t0 + ms(20));
        // 252: the last of READY/RELOADING/STOPPING in a datagram wins, and a STOPPING=1 from
        // before is acted on when start completes.
        assert_eq!(u.status().sub_state, SubState::Running);
        u.on_message("STOPPING=1", t0 + ms(30));
        u.on_exit(Exit::Exited(0), t0 + ms(40));
        assert_eq!(state(&u), (ActiveState::Inactive, UnitResult::Success));
        // Only the last of the three in one datagram counts: this READY=1 is not seen.
        let (mut u, t0) = unit();
        u.on_message("READY=1\nSTOPPING=1", t0 + ms(20));
        assert_eq!(u.status().sub_state, SubState::Start);
    }

    #[test]
    fn trigger_works_without_watchdog_sec_and_override_sets_a_new_timeout() {
        let t0 = Instant::now();
        let mut u = Unit::new(UnitConfig::new(), t0);
        u.on_message("READY=1", t0);
        u.on_message("WATCHDOG=trigger", t0 + ms(10));
        assert_eq!(u.take_signals(), [KillSignal::Abort]);
        assert_eq!(state(&u), (ActiveState::Deactivating, UnitResult::Watchdog));

        let mut u = Unit::new(UnitConfig::new().watchdog(Duration::from_secs(30)), t0);
        u.on_message("READY=1", t0);
        u.on_message("WATCHDOG_USEC=500000", t0 + ms(100));
        assert_eq!(u.status().watchdog, Some(ms(500)));
        u.on_time(t0 + ms(600));
        assert_eq!(state(&u), (ActiveState::Deactivating, UnitResult::Watchdog));
    }

    #[test]
    fn exits_give_systemds_results() {
        for (exit, in_start, result) in [
            (Exit::Exited(3), false, UnitResult::ExitCode),
            (Exit::Exited(0), false, UnitResult::Success),
            (Exit::Killed(15), false, UnitResult::Success),
            (Exit::Killed(9), false, UnitResult::Signal),
            (Exit::Dumped(6), false, UnitResult::CoreDump),
            (Exit::Exited(0), true, UnitResult::Protocol),
            (Exit::Exited(1), true, UnitResult::ExitCode),
        ] {
            let (mut u, t0) = unit();
            if !in_start {
                u.on_message("READY=1", t0);
            }
            u.on_exit(exit, t0 + ms(10));
            let want = if result == UnitResult::Success {
                ActiveState::Inactive
            } else {
                ActiveState::Failed
            };
            assert_eq!(state(&u), (want, result), "{exit:?} in start: {in_start}");
        }
    }

    #[test]
    fn reload_goes_through_reloading_and_a_timeout_sets_reload_result() {
        let (mut u, t0) = unit();
        u.on_message("READY=1", t0);
        u.on_message("RELOADING=1", t0 + ms(10));
        assert_eq!(u.status().active_state, ActiveState::Reloading);
        u.on_message("WATCHDOG=1", t0 + ms(900));
        u.on_message("READY=1", t0 + ms(950));
        assert_eq!(u.status().active_state, ActiveState::Active);
        u.on_message("RELOADING=1", t0 + ms(1000));
        for i in 1..=11 {
            u.on_message("WATCHDOG=1", t0 + ms(1000 + i * 900));
        }
        u.on_time(t0 + ms(11_000));
        // service_enter_running() finds notify_state still RELOADING and reloads again.
        let s = u.status();
        assert_eq!(s.active_state, ActiveState::Reloading);
        assert_eq!(s.reload_result, UnitResult::Timeout);
        assert_eq!(s.result, UnitResult::Success);
        assert_eq!(u.next_deadline(), Some(t0 + ms(11_900)));
    }

    #[test]
    fn what_is_not_modelled_is_refused() {
        for payload in [
            "MAINPID=42",
            "FDSTORE=1",
            "EXTEND_TIMEOUT_USEC=1000\nWATCHDOG=1",
        ] {
            let (mut u, t0) = unit();
            u.on_message(payload, t0);
            assert!(u.refused().is_some(), "{payload}");
        }
        let (mut u, t0) = unit();
        u.on_message("NOTIFYACCESS=all\nMONOTONIC_USEC=1\nX_FOO=1", t0);
        assert_eq!(u.refused(), None, "keys 252 ignores are ignored");
    }
}
