//! Supervises one child like a `Type=notify` unit with `WatchdogSec=`, printing every
//! notification as it arrives.

use std::ffi::OsString;
use std::process::{Child, ExitCode, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rustix::process::{Pid, Signal};
use watchkeeper_testkit::{FakeManager, Record};

/// Command-line options.
#[derive(Debug, clap::Parser)]
#[command(
    version,
    about = "Run a service under a fake systemd manager: print its sd_notify messages, \
             enforce start/stop timeouts and the watchdog like a Type=notify unit, \
             and check the protocol's order."
)]
pub(crate) struct Options {
    /// WatchdogSec= in seconds (0: no watchdog).
    #[arg(long, default_value_t = 2.0)]
    watchdog_sec: f64,
    /// TimeoutStartSec= in seconds: READY=1 must arrive within it (EXTEND_TIMEOUT_USEC= honoured).
    #[arg(long, default_value_t = 10.0)]
    start_timeout_sec: f64,
    /// TimeoutStopSec= in seconds: after SIGTERM the service must exit within it.
    #[arg(long, default_value_t = 10.0)]
    stop_timeout_sec: f64,
    /// Send SIGHUP this many seconds after READY=1 (repeatable).
    #[arg(long, value_name = "SECONDS")]
    reload_after: Vec<f64>,
    /// Send SIGTERM this many seconds after READY=1.
    #[arg(long, value_name = "SECONDS")]
    stop_after: Option<f64>,
    /// Bind NOTIFY_SOCKET at this path instead of a fresh @abstract name.
    #[arg(long, value_name = "PATH")]
    notify_socket: Option<std::path::PathBuf>,
    /// The service and its arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

/// How the run ended, as systemd's `Result=` would say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    ExitCode,
    Signal,
    Watchdog,
    Timeout,
    Protocol,
}

impl Outcome {
    pub(crate) fn exit_code(self) -> ExitCode {
        match self {
            Outcome::Success => ExitCode::SUCCESS,
            _ => ExitCode::FAILURE,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::ExitCode => "exit-code",
            Outcome::Signal => "signal",
            Outcome::Watchdog => "watchdog",
            Outcome::Timeout => "timeout",
            Outcome::Protocol => "protocol-violation",
        }
    }
}

fn secs(s: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("--{what}: {s} is not a duration"))
}

/// What the supervisor is waiting for.
#[derive(Debug)]
enum Phase {
    Starting { deadline: Instant },
    Running,
    Stopping { deadline: Instant },
}

pub(crate) fn run(opts: &Options) -> anyhow::Result<Outcome> {
    let watchdog = match secs(opts.watchdog_sec, "watchdog-sec")? {
        d if d.is_zero() => None,
        d => Some(d),
    };
    let start_timeout = secs(opts.start_timeout_sec, "start-timeout-sec")?;
    let stop_timeout = secs(opts.stop_timeout_sec, "stop-timeout-sec")?;
    let mut reloads = opts
        .reload_after
        .iter()
        .map(|&s| secs(s, "reload-after"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    reloads.sort();
    let stop_after = opts.stop_after.map(|s| secs(s, "stop-after")).transpose()?;

    let manager = match &opts.notify_socket {
        Some(p) => FakeManager::start_at(p)
            .with_context(|| format!("cannot bind NOTIFY_SOCKET at {}", p.display()))?,
        None => FakeManager::start().context("cannot bind an abstract NOTIFY_SOCKET")?,
    };
    let Some((program, args)) = opts.command.split_first() else {
        bail!("no command given");
    };
    let mut child = manager
        .command(program, watchdog)
        .args(args)
        .spawn()
        .with_context(|| format!("cannot start {}", program.to_string_lossy()))?;
    let pid = Pid::from_child(&child);
    let say = |what: &str| {
        println!(
            "[{:>8.3}s] manager     {what}",
            manager.elapsed().as_secs_f64()
        )
    };
    say(&format!(
        "started {} as pid {pid}; NOTIFY_SOCKET={} WatchdogSec={}",
        program.to_string_lossy(),
        manager.notify_socket().to_string_lossy(),
        watchdog.map_or("off".into(), |w| format!("{w:?}"))
    ));

    let mut phase = Phase::Starting {
        deadline: Instant::now() + start_timeout,
    };
    let mut watchdog_limit = watchdog;
    let mut last_ping: Option<Instant> = None;
    let mut ready_at: Option<Instant> = None;
    let mut cursor = 0;
    let mut outcome: Option<Outcome> = None;
    let signal = |sig: Signal, name: &str| {
        say(&format!("sending {name} to pid {pid}"));
        if let Err(e) = rustix::process::kill_process(pid, sig) {
            say(&format!("cannot send {name}: {e}"));
        }
    };

    let status: ExitStatus = loop {
        // Print and act on whatever arrived.
        let _ = manager.wait_for_since(cursor, "", Duration::from_millis(10), |_| true);
        let mut new: Vec<Record> = manager.records();
        let new = new.split_off(cursor.min(new.len()));
        for r in &new {
            cursor = r.seq + 1;
            println!("{r}");
            let now = Instant::now();
            if let Some(u) = r
                .get("EXTEND_TIMEOUT_USEC")
                .and_then(|v| v.parse::<u64>().ok())
            {
                let until = now + Duration::from_micros(u);
                match &mut phase {
                    Phase::Starting { deadline } | Phase::Stopping { deadline } => {
                        *deadline = (*deadline).max(until);
                    }
                    Phase::Running => {}
                }
            }
            if let Some(u) = r.get("WATCHDOG_USEC").and_then(|v| v.parse::<u64>().ok()) {
                watchdog_limit = (u > 0).then(|| Duration::from_micros(u));
                last_ping = Some(now);
                say(&format!("watchdog timeout changed to {:?}", watchdog_limit));
            }
            if r.is_ping() {
                last_ping = Some(now);
            }
            if r.has("READY", "1") && matches!(phase, Phase::Starting { .. }) {
                phase = Phase::Running;
                ready_at = Some(now);
                last_ping = Some(now);
                say("service is active (running)");
            }
            if r.has("STOPPING", "1") && !matches!(phase, Phase::Stopping { .. }) {
                phase = Phase::Stopping {
                    deadline: now + stop_timeout,
                };
                say("service is deactivating");
            }
            if r.has("WATCHDOG", "trigger") && outcome.is_none() {
                say("watchdog trigger requested");
                outcome = Some(Outcome::Watchdog);
                signal(Signal::ABORT, "SIGABRT");
            }
        }

        if let Some(st) = child.try_wait().context("cannot wait for the service")? {
            break st;
        }
        let now = Instant::now();
        match &phase {
            Phase::Starting { deadline } if now >= *deadline && outcome.is_none() => {
                say("start operation timed out");
                outcome = Some(Outcome::Timeout);
                signal(Signal::TERM, "SIGTERM");
                phase = Phase::Stopping {
                    deadline: now + stop_timeout,
                };
            }
            Phase::Running => {
                if let (Some(limit), Some(last)) = (watchdog_limit, last_ping)
                    && now.duration_since(last) >= limit
                    && outcome.is_none()
                {
                    say(&format!("watchdog timeout (limit {limit:?})!"));
                    outcome = Some(Outcome::Watchdog);
                    signal(Signal::ABORT, "SIGABRT");
                    phase = Phase::Stopping {
                        deadline: now + stop_timeout,
                    };
                }
                let since_ready = ready_at.map_or(Duration::ZERO, |r| now.duration_since(r));
                if reloads.first().is_some_and(|&r| since_ready >= r) {
                    reloads.remove(0);
                    signal(Signal::HUP, "SIGHUP");
                }
                if stop_after.is_some_and(|s| since_ready >= s) && outcome.is_none() {
                    signal(Signal::TERM, "SIGTERM");
                    phase = Phase::Stopping {
                        deadline: now + stop_timeout,
                    };
                }
            }
            Phase::Stopping { deadline } if now >= *deadline => {
                say("stop operation timed out; killing");
                outcome.get_or_insert(Outcome::Timeout);
                signal(Signal::KILL, "SIGKILL");
                break wait(&mut child)?;
            }
            _ => {}
        }
    };

    // Print what arrived after the last look.
    for r in manager.records().iter().skip(cursor) {
        println!("{r}");
    }
    say(&format!("service exited: {status}"));
    let outcome = outcome.unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt as _;
        match (status.code(), status.signal()) {
            (Some(0), _) => Outcome::Success,
            (Some(_), _) => Outcome::ExitCode,
            _ => Outcome::Signal,
        }
    });
    let outcome = match manager.check_protocol() {
        Ok(()) => outcome,
        Err(e) => {
            say(&format!("protocol violation: {e}"));
            if outcome == Outcome::Success {
                Outcome::Protocol
            } else {
                outcome
            }
        }
    };
    let records = manager.records();
    say(&format!(
        "result: {} ({} messages, {} watchdog pings)",
        outcome.name(),
        records.len(),
        records.iter().filter(|r| r.is_ping()).count()
    ));
    Ok(outcome)
}

fn wait(child: &mut Child) -> anyhow::Result<ExitStatus> {
    child.wait().context("cannot wait for the service")
}
