//! A fake systemd manager for testing a service's lifecycle without systemd.
//!
//! [`FakeManager`] binds a real `AF_UNIX` datagram socket (an `@abstract` name by default, or a
//! path), hands out the environment that points a service at it, and records every datagram the
//! service sends, with its arrival time, the sender's pid (`SCM_CREDENTIALS`) and any file
//! descriptors. Barriers (`BARRIER=1` with a pipe) are acknowledged the way systemd does it: the
//! pipe is closed once every earlier message has been recorded.
//!
//! Checks cover what systemd cares about: `READY=1` within a deadline, watchdog pings at half
//! the timeout, no ping while a loop is stalled, `MONOTONIC_USEC=` with every `RELOADING=1`,
//! and nothing but status and timeout extensions after `STOPPING=1`.
//!
//! Beyond recording, the manager acts on the datagrams as systemd 252 does for a `Type=notify`
//! unit ([`mod@unit`]: the watchdog, including pings before `READY=1`; `WATCHDOG=trigger`;
//! `WATCHDOG_USEC=`; start, stop and runtime timeouts and `EXTEND_TIMEOUT_USEC=`; `STOPPING=1`;
//! reloads; exit codes), and tells the `Result=` systemd would end with
//! ([`FakeManager::wait_result`], [`FakeManager::unit_result`]). A child started with
//! [`FakeManager::spawn`] is the unit's main process and gets the manager's signals
//! (`SIGABRT` from the watchdog, `SIGTERM`, `SIGKILL`); [`ChildExt`] sends it `SIGTERM` or
//! `SIGHUP` from the test. `tests/conformance.rs` of the workspace checks the model against a
//! real systemd user manager.
//!
//! Every manager has its own socket, so tests using it run in parallel.
//!
//! ```
//! use std::time::Duration;
//! use watchkeeper::{Notification, Notifier};
//! use watchkeeper_testkit::FakeManager;
//!
//! let manager = FakeManager::start()?;
//! // In a real test the service under test builds this from `manager.env()`.
//! let notifier = Notifier::from_env(&manager.env())?;
//! notifier.notify(&[Notification::Ready, Notification::status("up")?])?;
//! let ready = manager.wait_ready(Duration::from_secs(5))?;
//! assert_eq!(ready.get("STATUS"), Some("up"));
//! assert_eq!(ready.pid, Some(std::process::id()));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! What systemd would do with a service that pings once before `READY=1`, then initialises
//! for longer than `WatchdogSec=` (here a service in this process: the manager's `SIGABRT` is
//! not delivered, the unit goes on as if it had been):
//!
//! ```
//! use std::time::Duration;
//! use watchkeeper::{Notification, Notifier};
//! use watchkeeper_testkit::{ActiveState, FakeManager, UnitConfig, UnitResult};
//!
//! let cfg = UnitConfig::new().watchdog(Duration::from_millis(200));
//! let manager = FakeManager::start_unit(cfg)?;
//! let notifier = Notifier::from_env(&manager.env())?;
//! notifier.notify(&[Notification::Watchdog])?;
//! // ... a long initialisation, no READY=1 ...
//! let status = manager.wait_result(Duration::from_secs(5))?;
//! assert_eq!(status.result, UnitResult::Watchdog);
//! assert_eq!(status.active_state, ActiveState::Failed);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The crate also has two commands, installed with
//! `cargo install --path crates/watchkeeper-testkit`: `wk-fake-manager`, which runs a service
//! under this manager and exits with its `Result=`, and `wk-notify-script`, a service that sends
//! a scripted sequence of datagrams (for testing managers).
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::os::fd::{AsFd as _, OwnedFd};
use std::process::Child;

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use rustix::process::{Pid, WaitId, WaitIdOptions};
use watchkeeper::env::{NOTIFY_SOCKET, WATCHDOG_PID, WATCHDOG_USEC};
use watchkeeper::{NotifyAddr, SystemdEnv};

pub mod unit;
pub use unit::{
    ActiveState, Exit, KillSignal, SubState, Unit, UnitConfig, UnitEvent, UnitResult, UnitStatus,
};

/// systemd's `NOTIFY_BUFFER_MAX` (`PIPE_BUF`): a datagram of this size or more is ignored whole.
const BUFFER_MAX: usize = 4096;
/// Most fds systemd accepts in one message.
const FDS_MAX: usize = 253;
/// How often the receiver wakes up at most without a datagram: the resolution of the model's
/// timers and of noticing the child's exit.
const TICK: Duration = Duration::from_millis(10);

/// One datagram the service sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Position in the log, from 0.
    pub seq: usize,
    /// Arrival, measured from the manager's start.
    pub at: Duration,
    /// The sender's pid, from `SCM_CREDENTIALS`.
    pub pid: Option<u32>,
    /// The payload as sent (lossy UTF-8).
    pub payload: String,
    /// How many file descriptors came with it.
    pub fds: usize,
}

impl Record {
    /// The `KEY=VALUE` assignments, in order (split at `\n` and `\r`, as systemd does).
    pub fn fields(&self) -> impl Iterator<Item = (&str, &str)> {
        self.payload
            .split(['\n', '\r'])
            .filter_map(|l| l.split_once('='))
    }

    /// The value of `key`, if assigned (the last assignment wins, as in systemd).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .last()
    }

    /// Whether `key=value` is among the assignments.
    pub fn has(&self, key: &str, value: &str) -> bool {
        self.fields().any(|(k, v)| k == key && v == value)
    }

    /// A `WATCHDOG=1` ping.
    pub fn is_ping(&self) -> bool {
        self.has("WATCHDOG", "1")
    }
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:>8.3}s]", self.at.as_secs_f64())?;
        match self.pid {
            Some(p) => write!(f, " pid {p:<7}")?,
            None => write!(f, " pid ?      ")?,
        }
        for (i, line) in self.payload.split('\n').enumerate() {
            f.write_str(if i == 0 { " " } else { "  " })?;
            f.write_str(line)?;
        }
        if self.fds > 0 {
            write!(f, "  (+{} fd)", self.fds)?;
        }
        Ok(())
    }
}

/// A check on the recorded messages failed, or a wait ran out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// Nothing matching arrived in time.
    #[error("no {what} within {timeout:?}; received:\n{log}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        timeout: Duration,
        /// Everything recorded so far.
        log: Log,
    },
    /// The recorded messages break a protocol rule.
    #[error("{rule}: {detail}; received:\n{log}")]
    Violation {
        /// The rule.
        rule: &'static str,
        /// What broke it.
        detail: String,
        /// Everything recorded.
        log: Log,
    },
    /// The service sent something the fake's model of systemd does not cover, so it cannot
    /// say what systemd would have done.
    #[error("the fake manager does not model {what}; received:\n{log}")]
    Unsupported {
        /// What is not modelled.
        what: String,
        /// Everything recorded.
        log: Log,
    },
}

/// A list of records that prints one per line (for error messages).
#[derive(Debug, Clone, Default)]
pub struct Log(pub Vec<Record>);

impl fmt::Display for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("  (nothing)");
        }
        for r in &self.0 {
            writeln!(f, "  {r}")?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct State {
    records: Vec<Record>,
    paused: bool,
    /// The receiver saw `paused` and is not reading.
    parked: bool,
    dropped: usize,
    cfg: UnitConfig,
    /// The model of the unit; starts with [`FakeManager::spawn`] or the first datagram.
    unit: Option<Unit>,
    /// The main process, when started by [`FakeManager::spawn`].
    child: Option<Supervised>,
    /// Signals the model sent, with the time since the manager's start.
    signals: Vec<(Duration, KillSignal)>,
    started: Instant,
}

fn to_rustix(sig: KillSignal) -> rustix::process::Signal {
    match sig {
        KillSignal::Term => rustix::process::Signal::TERM,
        KillSignal::Abort => rustix::process::Signal::ABORT,
        KillSignal::Kill => rustix::process::Signal::KILL,
    }
}

#[derive(Debug)]
struct Supervised {
    pid: u32,
    pidfd: OwnedFd,
}

impl State {
    fn new(cfg: UnitConfig, started: Instant) -> Self {
        State {
            records: Vec::new(),
            paused: false,
            parked: false,
            dropped: 0,
            cfg,
            unit: None,
            child: None,
            signals: Vec::new(),
            started,
        }
    }

    fn unit(&mut self) -> &mut Unit {
        let (cfg, started) = (&self.cfg, self.started);
        self.unit
            .get_or_insert_with(|| Unit::new(cfg.clone(), started))
    }

    /// Fires the model's timers up to `now` and delivers the signals it asks for: to the
    /// child if there is one, else (a service in this process, or one started without
    /// [`FakeManager::spawn`]) the unit acts as if the service died of the signal at once.
    fn drive(&mut self, now: Instant) {
        let Some(unit) = self.unit.as_mut() else {
            return;
        };
        unit.on_time(now);
        loop {
            let signals = unit.take_signals();
            if signals.is_empty() {
                break;
            }
            for sig in signals {
                self.signals
                    .push((now.saturating_duration_since(self.started), sig));
                match &self.child {
                    Some(c) => {
                        // The child is not reaped before the test waits for it (WNOWAIT), so
                        // the pidfd still names it.
                        let _ = rustix::process::pidfd_send_signal(&c.pidfd, to_rustix(sig));
                    }
                    None => unit.on_exit(
                        if sig == KillSignal::Abort {
                            Exit::Dumped(sig.as_raw())
                        } else {
                            Exit::Killed(sig.as_raw())
                        },
                        now,
                    ),
                }
            }
        }
    }

    /// The error for a message the model refused, if any.
    fn refused(&mut self) -> Option<CheckError> {
        let what = self.unit().refused()?.to_owned();
        Some(CheckError::Unsupported {
            what,
            log: Log(self.records.clone()),
        })
    }

    /// Whether the child has exited (without reaping it), and how.
    fn child_exit(&self) -> Option<Exit> {
        let c = self.child.as_ref()?;
        let st = rustix::process::waitid(
            WaitId::PidFd(c.pidfd.as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT,
        )
        .ok()??;
        if st.exited() {
            Some(Exit::Exited(st.exit_status().unwrap_or(0)))
        } else if st.dumped() {
            Some(Exit::Dumped(st.terminating_signal().unwrap_or(0)))
        } else if st.killed() {
            Some(Exit::Killed(st.terminating_signal().unwrap_or(0)))
        } else {
            None
        }
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The receiving end of a fake `NOTIFY_SOCKET`. Dropping it stops the receiver thread and, for
/// a path socket, removes the socket file.
#[derive(Debug)]
pub struct FakeManager {
    addr: NotifyAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    started: Instant,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

impl FakeManager {
    /// Binds a fresh `@abstract` socket, unique to this process and call, for a unit with the
    /// default settings ([`UnitConfig::default`]; a watchdog handed out by
    /// [`FakeManager::command`] or [`FakeManager::env_with_watchdog`] becomes its
    /// `WatchdogSec=`).
    pub fn start() -> io::Result<Self> {
        Self::start_unit(UnitConfig::default())
    }

    /// Binds a socket at `path` (the file must not exist).
    pub fn start_at(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::start_unit_at(path, UnitConfig::default())
    }

    /// Like [`FakeManager::start`], for a unit with the settings `cfg`.
    pub fn start_unit(cfg: UnitConfig) -> io::Result<Self> {
        let name = format!(
            "watchkeeper-testkit/{}/{}/{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed),
            watchkeeper::notify::monotonic_usec()
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
        let sock = UnixDatagram::bind_addr(&addr)?;
        Self::with_socket(sock, NotifyAddr::Abstract(name.into_bytes()), cfg)
    }

    /// Like [`FakeManager::start_at`], for a unit with the settings `cfg`.
    pub fn start_unit_at(path: impl AsRef<Path>, cfg: UnitConfig) -> io::Result<Self> {
        let path = path.as_ref();
        let sock = UnixDatagram::bind(path)?;
        Self::with_socket(sock, NotifyAddr::Path(path.to_owned()), cfg)
    }

    fn with_socket(sock: UnixDatagram, addr: NotifyAddr, cfg: UnitConfig) -> io::Result<Self> {
        rustix::net::sockopt::set_socket_passcred(&sock, true)?;
        // Wake up now and then to notice a stop request, a resume, a timer or the child's exit.
        sock.set_read_timeout(Some(TICK))?;
        let started = Instant::now();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(cfg, started)),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("fake-manager".into())
                .spawn(move || receive(&sock, &shared, started))?
        };
        Ok(FakeManager {
            addr,
            shared,
            thread: Some(thread),
            started,
        })
    }

    /// The socket's address.
    pub fn addr(&self) -> &NotifyAddr {
        &self.addr
    }

    /// The value for `NOTIFY_SOCKET` (`@name` or a path).
    pub fn notify_socket(&self) -> OsString {
        match &self.addr {
            NotifyAddr::Path(p) => p.clone().into_os_string(),
            other => OsString::from(other.to_string()),
        }
    }

    /// An environment with only `NOTIFY_SOCKET` pointing here.
    pub fn env(&self) -> SystemdEnv {
        SystemdEnv::default().with_var(NOTIFY_SOCKET, self.notify_socket())
    }

    /// An environment for a service in *this* process with a watchdog of `timeout`
    /// (`WATCHDOG_PID` is this process).
    pub fn env_with_watchdog(&self, timeout: Duration) -> SystemdEnv {
        self.set_watchdog(timeout);
        self.env()
            .with_var(WATCHDOG_USEC, timeout.as_micros().to_string())
            .with_var(WATCHDOG_PID, std::process::id().to_string())
    }

    /// A command for a child service: every supervision variable of ours removed, then
    /// `NOTIFY_SOCKET` (and `WATCHDOG_USEC` if given) set. `WATCHDOG_PID` is left unset, since
    /// the child's pid is not known before it starts; `sd_watchdog_enabled()` then accepts it.
    pub fn command(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        watchdog: Option<Duration>,
    ) -> Command {
        let mut cmd = Command::new(program);
        SystemdEnv::scrub(&mut cmd);
        cmd.env(NOTIFY_SOCKET, self.notify_socket());
        if let Some(t) = watchdog {
            self.set_watchdog(t);
            cmd.env(WATCHDOG_USEC, t.as_micros().to_string());
        }
        cmd
    }

    /// The watchdog handed to a service is the unit's `WatchdogSec=` (for a unit that has not
    /// started yet: the unit starts at [`FakeManager::spawn`] or with the first datagram).
    fn set_watchdog(&self, timeout: Duration) {
        let mut state = self.shared.lock();
        state.cfg.watchdog = (!timeout.is_zero()).then_some(timeout);
    }

    /// Starts `cmd` as the unit's main process (see [`FakeManager::command`] for one with the
    /// environment set): the unit (re)starts now, as systemd's does when it forks
    /// `ExecStart=`, and from now on the model's signals (the watchdog's SIGABRT, SIGTERM,
    /// SIGKILL after a timeout) go to this process, and only its datagrams count
    /// (`NotifyAccess=main`). The fake does not reap it: wait for it as usual.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
        let mut state = self.shared.lock();
        if let Some(c) = &state.child {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the fake manager already supervises pid {} (one main process per manager)",
                    c.pid
                ),
            ));
        }
        let child = cmd.spawn()?;
        let pidfd = match rustix::process::pidfd_open(
            Pid::from_child(&child),
            rustix::process::PidfdFlags::empty(),
        ) {
            Ok(fd) => fd,
            Err(e) => {
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                return Err(e.into());
            }
        };
        state.child = Some(Supervised {
            pid: child.id(),
            pidfd,
        });
        state.unit = Some(Unit::new(state.cfg.clone(), Instant::now()));
        drop(state);
        self.shared.changed.notify_all();
        Ok(child)
    }

    /// The unit's settings.
    pub fn unit_config(&self) -> UnitConfig {
        self.shared.lock().cfg.clone()
    }

    /// The unit's state now, as systemd would show it.
    pub fn unit_status(&self) -> UnitStatus {
        let mut state = self.shared.lock();
        state.drive(Instant::now());
        state.unit().status()
    }

    /// The unit's `Result=` now (`success` until something failed), or an error if the service
    /// sent something the model does not cover.
    pub fn unit_result(&self) -> Result<UnitResult, CheckError> {
        let mut state = self.shared.lock();
        state.drive(Instant::now());
        match state.refused() {
            Some(e) => Err(e),
            None => Ok(state.unit().status().result),
        }
    }

    /// What the manager did so far ("Watchdog timeout (limit 1s)!", state changes, signals),
    /// timed like [`Record::at`] (from the manager's start).
    pub fn unit_events(&self) -> Vec<UnitEvent> {
        let mut state = self.shared.lock();
        let origin = state.started;
        let unit = state.unit();
        let offset = unit.started().saturating_duration_since(origin);
        unit.events()
            .iter()
            .map(|e| UnitEvent {
                at: e.at + offset,
                what: e.what.clone(),
            })
            .collect()
    }

    /// The signals the manager sent, with the time since its start. Without a child started by
    /// [`FakeManager::spawn`] they are not delivered: the unit then goes on as if the service
    /// died of them at once.
    pub fn signals(&self) -> Vec<(Duration, KillSignal)> {
        self.shared.lock().signals.clone()
    }

    /// Asks the unit to stop, as `systemctl stop` does: SIGTERM, then SIGKILL after
    /// `TimeoutStopSec=`.
    pub fn stop_unit(&self) {
        let mut state = self.shared.lock();
        let now = Instant::now();
        state.unit().stop(now);
        state.drive(now);
        drop(state);
        self.shared.changed.notify_all();
    }

    /// Waits until the unit is `inactive` or `failed` and returns its final state; an error
    /// if it is not within `timeout` (with the datagrams and the manager's log), or if the
    /// service sent something the model does not cover.
    pub fn wait_result(&self, timeout: Duration) -> Result<UnitStatus, CheckError> {
        self.wait_until(
            timeout,
            |state| {
                state.drive(Instant::now());
                if let Some(e) = state.refused() {
                    return Some(Err(e));
                }
                Some(state.unit().status())
                    .filter(UnitStatus::is_finished)
                    .map(Ok)
            },
            |state| {
                let unit = state.unit();
                let events: Vec<String> = unit.events().iter().map(|e| e.to_string()).collect();
                format!(
                    "end of the unit (now {}); the manager's log:\n  {}\n",
                    unit.status(),
                    events.join("\n  ")
                )
            },
        )?
    }

    /// Time since the manager started (the clock of [`Record::at`]).
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Everything received so far.
    pub fn records(&self) -> Vec<Record> {
        self.shared.lock().records.clone()
    }

    /// How many messages were received so far; a cursor for [`FakeManager::wait_for_since`].
    pub fn len(&self) -> usize {
        self.shared.lock().records.len()
    }

    /// Datagrams ignored for being too large (4096 bytes or more), as systemd ignores them.
    pub fn dropped(&self) -> usize {
        self.shared.lock().dropped
    }

    /// Whether nothing was received yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops reading the socket, so that its queue fills up as a busy PID 1's does
    /// (`net.unix.max_dgram_qlen`). Returns once the receiver has stopped: nothing sent after
    /// this is read until [`FakeManager::resume`].
    pub fn pause(&self) {
        let mut state = self.shared.lock();
        state.paused = true;
        // The receiver may be inside a receive (it wakes up every 20 ms); wait until it parks.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !state.parked && Instant::now() < deadline {
            state = self
                .shared
                .changed
                .wait_timeout(state, Duration::from_millis(20))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Reads the socket again after [`FakeManager::pause`].
    pub fn resume(&self) {
        self.shared.lock().paused = false;
        self.shared.changed.notify_all();
    }

    /// Waits until a message matching `pred` has been received (at any time since start).
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Record) -> bool,
    ) -> Result<Record, CheckError> {
        self.wait_for_since(0, what, timeout, pred)
    }

    /// Waits until a message matching `pred`, with `seq >= since`, has been received.
    pub fn wait_for_since(
        &self,
        since: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Record) -> bool,
    ) -> Result<Record, CheckError> {
        self.wait_until(
            timeout,
            |state| state.records.iter().skip(since).find(|r| pred(r)).cloned(),
            |_| what.to_owned(),
        )
    }

    /// Waits until `check` finds what it wants in the state; on timeout, the error names
    /// `what` (given the state then) and carries the log.
    fn wait_until<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&mut State) -> Option<T>,
        what: impl FnOnce(&mut State) -> String,
    ) -> Result<T, CheckError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if let Some(v) = check(&mut state) {
                return Ok(v);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CheckError::Timeout {
                    what: what(&mut state),
                    timeout,
                    log: Log(state.records.clone()),
                });
            }
            // (The receiver wakes us at least every TICK, for the model's timers.)
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Waits for `READY=1`.
    pub fn wait_ready(&self, timeout: Duration) -> Result<Record, CheckError> {
        self.wait_for("READY=1", timeout, |r| r.has("READY", "1"))
    }

    /// Waits for `STOPPING=1`.
    pub fn wait_stopping(&self, timeout: Duration) -> Result<Record, CheckError> {
        self.wait_for("STOPPING=1", timeout, |r| r.has("STOPPING", "1"))
    }

    /// Waits for a `WATCHDOG=1` received at or after position `since`.
    pub fn wait_ping_since(&self, since: usize, timeout: Duration) -> Result<Record, CheckError> {
        self.wait_for_since(since, "WATCHDOG=1", timeout, Record::is_ping)
    }

    /// Waits until `n` `WATCHDOG=1` pings in all have been received, and returns them.
    pub fn wait_pings(&self, n: usize, timeout: Duration) -> Result<Vec<Record>, CheckError> {
        let pings = |state: &State| -> Vec<Record> {
            state
                .records
                .iter()
                .filter(|r| r.is_ping())
                .cloned()
                .collect()
        };
        self.wait_until(
            timeout,
            |state| Some(pings(state)).filter(|p| p.len() >= n),
            |state| format!("{n} WATCHDOG=1 pings (got {})", pings(state).len()),
        )
    }

    /// Succeeds if no `WATCHDOG=1` arrives, from now, for `window`: what a hung loop must
    /// look like. Returns the ping that broke the rule otherwise.
    pub fn expect_no_ping(&self, window: Duration) -> Result<(), CheckError> {
        let since = self.len();
        match self.wait_ping_since(since, window) {
            Err(CheckError::Timeout { .. }) => Ok(()),
            Err(e) => Err(e),
            Ok(ping) => Err(self.violation(
                "no ping while stalled",
                format!("WATCHDOG=1 at {:.3}s", ping.at.as_secs_f64()),
            )),
        }
    }

    fn violation(&self, rule: &'static str, detail: String) -> CheckError {
        CheckError::Violation {
            rule,
            detail,
            log: Log(self.records()),
        }
    }

    /// Checks that consecutive pings came `timeout / 2` apart, give or take `tolerance`, and that
    /// there were at least `min_pings` of them.
    pub fn check_ping_cadence(
        &self,
        timeout: Duration,
        tolerance: Duration,
        min_pings: usize,
    ) -> Result<(), CheckError> {
        let pings: Vec<Record> = self.records().into_iter().filter(Record::is_ping).collect();
        if pings.len() < min_pings {
            return Err(self.violation(
                "ping cadence",
                format!("{} ping(s), expected at least {min_pings}", pings.len()),
            ));
        }
        let half = timeout / 2;
        for w in pings.windows(2) {
            let gap = w[1].at.saturating_sub(w[0].at);
            if gap + tolerance < half || gap > half + tolerance {
                return Err(self.violation(
                    "ping cadence",
                    format!(
                        "pings #{} and #{} were {gap:?} apart, expected {half:?} ± {tolerance:?}",
                        w[0].seq, w[1].seq
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks the protocol's order over everything received:
    ///
    /// * every `RELOADING=1` carries `MONOTONIC_USEC=`;
    /// * `READY=1` never comes twice without a `RELOADING=1` between;
    /// * `RELOADING=1` only after `READY=1`;
    /// * after `STOPPING=1`, only `STATUS=`, `EXTEND_TIMEOUT_USEC=`, `ERRNO=`, `BUSERROR=` and
    ///   `X_…` assignments (no ping, no `READY=1`, no second `STOPPING=1`).
    pub fn check_protocol(&self) -> Result<(), CheckError> {
        let mut ready = false;
        let mut stopping_at: Option<usize> = None;
        for r in self.records() {
            if let Some(at) = stopping_at {
                if let Some((k, v)) = r.fields().find(|(k, _)| {
                    !matches!(*k, "STATUS" | "EXTEND_TIMEOUT_USEC" | "ERRNO" | "BUSERROR")
                        && !k.starts_with("X_")
                }) {
                    return Err(self.violation(
                        "STOPPING=1 is final",
                        format!("#{} sent {k}={v} after STOPPING=1 (#{at})", r.seq),
                    ));
                }
                continue;
            }
            if r.has("RELOADING", "1") {
                if r.get("MONOTONIC_USEC")
                    .and_then(|v| v.parse::<u64>().ok())
                    .is_none()
                {
                    return Err(self.violation(
                        "RELOADING=1 carries MONOTONIC_USEC=",
                        format!("#{} has none", r.seq),
                    ));
                }
                if !ready {
                    return Err(self.violation(
                        "RELOADING=1 only when ready",
                        format!("#{} came before READY=1", r.seq),
                    ));
                }
                ready = false;
            }
            if r.has("READY", "1") {
                if ready {
                    return Err(self.violation(
                        "READY=1 once per start or reload",
                        format!("#{} is a second READY=1", r.seq),
                    ));
                }
                ready = true;
            }
            if r.has("STOPPING", "1") {
                stopping_at = Some(r.seq);
            }
        }
        Ok(())
    }

    /// Checks that `STOPPING=1` was received and that the protocol held ([`check_protocol`]).
    ///
    /// [`check_protocol`]: FakeManager::check_protocol
    pub fn check_stopped_cleanly(&self) -> Result<(), CheckError> {
        if !self.records().iter().any(|r| r.has("STOPPING", "1")) {
            return Err(self.violation("STOPPING=1 sent", "never received".into()));
        }
        self.check_protocol()
    }
}

impl Drop for FakeManager {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.resume();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let NotifyAddr::Path(p) = &self.addr {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn receive(sock: &UnixDatagram, shared: &Shared, started: Instant) {
    let mut buf = vec![0u8; BUFFER_MAX + 1];
    let mut space = vec![
        MaybeUninit::<u8>::uninit();
        rustix::cmsg_space!(ScmRights(FDS_MAX), ScmCredentials(1))
    ];
    while !shared.stop.load(Ordering::Relaxed) {
        {
            let mut state = shared.lock();
            while state.paused && !shared.stop.load(Ordering::Relaxed) {
                if !state.parked {
                    state.parked = true;
                    shared.changed.notify_all();
                }
                state = shared
                    .changed
                    .wait_timeout(state, Duration::from_millis(20))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            state.parked = false;
        }
        let mut cmsg = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let msg = match rustix::net::recvmsg(sock, &mut iov, &mut cmsg, RecvFlags::CMSG_CLOEXEC) {
            Ok(m) => m,
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {
                // Nothing queued: the child's exit comes after every datagram it sent, as
                // systemd reads its notify socket before SIGCHLD.
                let now = Instant::now();
                let mut state = shared.lock();
                state.drive(now);
                if state.unit.is_some()
                    && let Some(exit) = state.child_exit()
                {
                    state.unit().on_exit(exit, now);
                    state.drive(now);
                }
                drop(state);
                shared.changed.notify_all();
                continue;
            }
            Err(_) => return,
        };
        let now = Instant::now();
        let at = now.saturating_duration_since(started);
        let mut pid = None;
        let mut fds = Vec::new();
        for m in cmsg.drain() {
            match m {
                RecvAncillaryMessage::ScmCredentials(c) => {
                    pid = Some(c.pid.as_raw_nonzero().get() as u32)
                }
                RecvAncillaryMessage::ScmRights(r) => fds.extend(r),
                _ => {}
            }
        }
        if msg.bytes >= BUFFER_MAX {
            // As PID 1: "exceeded maximum size. Ignoring." The fds are closed.
            shared.lock().dropped += 1;
            shared.changed.notify_all();
            continue;
        }
        let payload = String::from_utf8_lossy(&buf[..msg.bytes])
            .trim_end_matches('\n')
            .to_owned();
        let mut state = shared.lock();
        // What was due before this datagram arrived fires first.
        state.drive(now);
        let main = state.child.as_ref().map(|c| c.pid);
        if main.is_none() || main == pid {
            state.unit().on_message(&payload, now);
            state.drive(now);
        }
        let seq = state.records.len();
        state.records.push(Record {
            seq,
            at,
            pid,
            payload,
            fds: fds.len(),
        });
        drop(state);
        // Every earlier message is recorded: closing the fds acknowledges a BARRIER=1.
        drop(fds);
        shared.changed.notify_all();
    }
}

/// Signals for a child service, as a test sends them (`systemctl stop` or `kill -HUP`
/// would). Refuses, instead of signalling a pid that may be reused, once the child has been
/// reaped.
///
/// ```no_run
/// use std::time::Duration;
/// use watchkeeper_testkit::{ChildExt as _, FakeManager, wait_exit};
///
/// let manager = FakeManager::start()?;
/// let mut child = manager.spawn(&mut manager.command("my-service", None))?;
/// manager.wait_ready(Duration::from_secs(5))?;
/// child.hangup()?; // reload
/// child.terminate()?; // stop
/// let status = wait_exit(&mut child, Duration::from_secs(10))?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait ChildExt {
    /// Sends SIGTERM.
    fn terminate(&mut self) -> io::Result<()>;
    /// Sends SIGHUP.
    fn hangup(&mut self) -> io::Result<()>;
    /// Sends `signal`.
    fn signal(&mut self, signal: rustix::process::Signal) -> io::Result<()>;
}

impl ChildExt for Child {
    fn terminate(&mut self) -> io::Result<()> {
        self.signal(rustix::process::Signal::TERM)
    }

    fn hangup(&mut self) -> io::Result<()> {
        self.signal(rustix::process::Signal::HUP)
    }

    fn signal(&mut self, signal: rustix::process::Signal) -> io::Result<()> {
        // A child that exited but was not waited for is a zombie: its pid is still its own.
        // `try_wait` would reap it, so ask without reaping.
        let pid = Pid::from_child(self);
        let exited = rustix::process::waitid(
            WaitId::Pid(pid),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT,
        );
        match exited {
            Ok(Some(_)) => {
                // Exited, not reaped: nothing to signal; not an error for a stop.
                return Ok(());
            }
            Ok(None) => {}
            Err(rustix::io::Errno::CHILD) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("cannot send {signal:?} to pid {pid}: already reaped"),
                ));
            }
            Err(e) => return Err(e.into()),
        }
        rustix::process::kill_process(pid, signal).map_err(io::Error::from)
    }
}

/// Waits up to `timeout` for `child` to exit, without polling in a sleep loop (a pidfd is
/// waited on); `Ok(None)` if it is still running then. For tests that start a service and wait
/// for it to stop.
pub fn wait_exit(
    child: &mut std::process::Child,
    timeout: Duration,
) -> io::Result<Option<std::process::ExitStatus>> {
    let pid = rustix::process::Pid::from_child(child);
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?;
    let end = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let ts = rustix::time::Timespec {
            tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut fds = [rustix::event::PollFd::new(
            &pidfd,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The path of an example binary built by cargo next to the running test binary
/// (`target/<profile>/examples/<name>`), for tests that run examples as child processes.
/// `cargo test` builds the examples of a package before running its tests.
pub fn example_path(name: &str) -> io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test-binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| io::Error::other("cannot locate the target directory"))?;
    let path = profile_dir.join("examples").join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "example {} not built (run `cargo build --examples` or `cargo test`)",
                path.display()
            ),
        ))
    }
}

/// Builds the binary `name` of the workspace package `package` into the running test or bench
/// binary's own target directory and profile (`$CARGO build -p PACKAGE --bin NAME`, run in
/// `workspace_dir`), and returns its path (`target/<profile>/<name>`). Cargo builds no
/// binaries of other packages for a test or bench target; this is for those that run them as
/// child processes. Cargo only rebuilds what changed.
pub fn build_binary(package: &str, name: &str, workspace_dir: &Path) -> io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test-binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| io::Error::other("cannot locate the target directory"))?;
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| io::Error::other("cannot locate the target directory"))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        package,
        "--bin",
        name,
        "--target-dir",
    ])
    .arg(target_dir)
    .current_dir(workspace_dir);
    if profile_dir.ends_with("release") {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .map_err(|e| io::Error::new(e.kind(), format!("running {cmd:?}: {e}")))?;
    if !status.success() {
        return Err(io::Error::other(format!("{cmd:?} failed ({status})")));
    }
    let path = profile_dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} was not built by {cmd:?}", path.display()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use watchkeeper::{Notification, Notifier};

    #[test]
    fn records_fields_pid_and_order() {
        let m = FakeManager::start().unwrap();
        let n = Notifier::from_env(&m.env()).unwrap();
        n.notify(&[Notification::status("one").unwrap()]).unwrap();
        n.notify(&[Notification::Ready, Notification::status("two").unwrap()])
            .unwrap();
        let r = m.wait_ready(Duration::from_secs(5)).unwrap();
        assert_eq!(r.seq, 1);
        assert_eq!(r.get("STATUS"), Some("two"));
        assert_eq!(r.pid, Some(std::process::id()));
        assert_eq!(m.records()[0].payload, "STATUS=one");
    }

    #[test]
    fn path_socket_works_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        {
            let m = FakeManager::start_at(&path).unwrap();
            let n = Notifier::from_env(&m.env()).unwrap();
            n.notify(&[Notification::Ready]).unwrap();
            m.wait_ready(Duration::from_secs(5)).unwrap();
        }
        assert!(!path.exists());
    }

    #[test]
    fn barrier_is_acknowledged_after_earlier_messages() {
        let m = FakeManager::start().unwrap();
        let n = Notifier::from_env(&m.env()).unwrap();
        n.notify(&[Notification::status("before").unwrap()])
            .unwrap();
        n.barrier(Duration::from_secs(5)).unwrap();
        let recs = m.records();
        assert_eq!(recs[0].payload, "STATUS=before");
        assert_eq!(recs[1].payload, "BARRIER=1");
        assert_eq!(recs[1].fds, 1);
    }

    #[test]
    fn wait_times_out_with_the_log() {
        let m = FakeManager::start().unwrap();
        let n = Notifier::from_env(&m.env()).unwrap();
        n.notify(&[Notification::status("only").unwrap()]).unwrap();
        m.wait_for("STATUS", Duration::from_secs(5), |r| {
            r.get("STATUS").is_some()
        })
        .unwrap();
        let e = m.wait_ready(Duration::from_millis(30)).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("no READY=1"), "{text}");
        assert!(text.contains("STATUS=only"), "{text}");
    }

    fn fed(payloads: &[&str]) -> FakeManager {
        let m = FakeManager::start().unwrap();
        let n = Notifier::from_env(&m.env()).unwrap();
        for p in payloads {
            n.send_payload(p.as_bytes(), &[]).unwrap();
        }
        let last = payloads.len() - 1;
        m.wait_for("all", Duration::from_secs(5), |r| r.seq == last)
            .unwrap();
        m
    }

    #[test]
    fn protocol_checks_catch_violations() {
        fed(&[
            "READY=1",
            "RELOADING=1\nMONOTONIC_USEC=5",
            "READY=1",
            "STOPPING=1",
            "STATUS=bye",
            "EXTEND_TIMEOUT_USEC=1",
        ])
        .check_stopped_cleanly()
        .unwrap();
        let cases: [(&[&str], &str); 5] = [
            (&["READY=1", "RELOADING=1", "READY=1"], "MONOTONIC_USEC"),
            (&["RELOADING=1\nMONOTONIC_USEC=5"], "only when ready"),
            (&["READY=1", "READY=1"], "once per start"),
            (&["READY=1", "STOPPING=1", "WATCHDOG=1"], "final"),
            (&["READY=1", "STOPPING=1", "STOPPING=1"], "final"),
        ];
        for (payloads, rule) in cases {
            let e = fed(payloads).check_protocol().unwrap_err();
            assert!(e.to_string().contains(rule), "{payloads:?}: {e}");
        }
        let e = fed(&["READY=1"]).check_stopped_cleanly().unwrap_err();
        assert!(e.to_string().contains("never received"), "{e}");
    }

    #[test]
    fn cadence_check_uses_arrival_times() {
        let m = fed(&["WATCHDOG=1", "WATCHDOG=1"]);
        // Two pings sent back to back are far closer than 1 s apart.
        let e = m
            .check_ping_cadence(Duration::from_secs(2), Duration::from_millis(100), 2)
            .unwrap_err();
        assert!(e.to_string().contains("apart"), "{e}");
        let e = m
            .check_ping_cadence(Duration::from_secs(2), Duration::from_secs(2), 3)
            .unwrap_err();
        assert!(e.to_string().contains("2 ping(s)"), "{e}");
        m.check_ping_cadence(Duration::from_secs(2), Duration::from_secs(2), 2)
            .unwrap();
    }

    #[test]
    fn datagrams_of_4096_bytes_or_more_are_ignored_as_systemd_does() {
        let m = FakeManager::start().unwrap();
        let tx = UnixDatagram::unbound().unwrap();
        let addr =
            SocketAddr::from_abstract_name(&m.notify_socket().to_str().unwrap().as_bytes()[1..])
                .unwrap();
        tx.send_to_addr(&[b'X'; BUFFER_MAX], &addr).unwrap();
        tx.send_to_addr(b"READY=1", &addr).unwrap();
        m.wait_ready(Duration::from_secs(5)).unwrap();
        assert_eq!(m.dropped(), 1);
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn wait_exit_returns_the_status_or_none_on_timeout() {
        let mut quick = Command::new("sh").args(["-c", "exit 3"]).spawn().unwrap();
        let st = wait_exit(&mut quick, Duration::from_secs(10))
            .unwrap()
            .unwrap();
        assert_eq!(st.code(), Some(3));
        let mut slow = Command::new("sleep").arg("30").spawn().unwrap();
        assert_eq!(
            wait_exit(&mut slow, Duration::from_millis(50)).unwrap(),
            None
        );
        slow.kill().unwrap();
        let st = wait_exit(&mut slow, Duration::from_secs(10))
            .unwrap()
            .unwrap();
        assert!(!st.success());
    }

    #[test]
    fn wait_pings_counts_all_pings_and_names_the_shortfall() {
        let m = fed(&["WATCHDOG=1", "READY=1", "WATCHDOG=1"]);
        let pings = m.wait_pings(2, Duration::from_secs(5)).unwrap();
        assert_eq!(pings.iter().map(|r| r.seq).collect::<Vec<_>>(), [0, 2]);
        let e = m.wait_pings(3, Duration::from_millis(30)).unwrap_err();
        assert!(e.to_string().contains("3 WATCHDOG=1 pings (got 2)"), "{e}");
    }

    #[test]
    fn child_ext_sends_sigterm_and_sighup_and_refuses_a_reaped_child() {
        use std::os::unix::process::ExitStatusExt as _;
        for (send, signal) in [
            (ChildExt::terminate as fn(&mut Child) -> io::Result<()>, 15),
            (ChildExt::hangup, 1),
        ] {
            let mut child = Command::new("sleep").arg("30").spawn().unwrap();
            send(&mut child).unwrap();
            let st = wait_exit(&mut child, Duration::from_secs(10))
                .unwrap()
                .unwrap();
            assert_eq!(st.signal(), Some(signal));
            let e = child.terminate().unwrap_err();
            assert!(e.to_string().contains("already reaped"), "{e}");
        }
    }

    #[test]
    fn paused_manager_fills_its_queue() {
        let m = FakeManager::start().unwrap();
        m.pause();
        let n = Notifier::from_env(&m.env()).unwrap();
        let mut full = None;
        for i in 0..1000 {
            if let Err(e) = n.notify(&[Notification::Watchdog]) {
                full = Some((i, e));
                break;
            }
        }
        let (sent, e) = full.expect("queue never filled");
        assert_eq!(m.len(), 0, "nothing is read while paused");
        assert!(
            matches!(e, watchkeeper::NotifyError::QueueFull { .. }),
            "{e}"
        );
        m.resume();
        m.wait_for("all queued", Duration::from_secs(5), |r| r.seq + 1 == sent)
            .unwrap();
        assert_eq!(m.len(), sent);
    }
}
