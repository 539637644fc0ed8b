//! Supervises one child like a `Type=notify` unit, with systemd 252's rules for what each
//! notification does (`watchkeeper_testkit::unit`), printing every notification and every
//! action of the manager as it happens.

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use watchkeeper_testkit::{
    ActiveState, ChildExt as _, FakeManager, UnitConfig, UnitResult, UnitStatus,
};

/// Command-line options.
#[derive(Debug, clap::Parser)]
#[command(
    version,
    about = "Run a service under a fake systemd manager: print its sd_notify messages, act on \
             them as systemd 252 does for a Type=notify unit (watchdog, start/stop/runtime \
             timeouts, EXTEND_TIMEOUT_USEC=, WATCHDOG_USEC=, WATCHDOG=trigger), check the \
             protocol's order, and exit with the unit's Result=.",
    after_help = "Exit status: 0 Result=success, 3 exit-code, 4 signal, 5 core-dump, \
                  6 watchdog, 7 timeout, 8 protocol (exited before READY=1), 9 the protocol \
                  checks failed on a successful run, 10 the service sent something the fake \
                  does not model; 2 an error of wk-fake-manager itself."
)]
pub(crate) struct Options {
    /// WatchdogSec= in seconds (0: no watchdog).
    #[arg(long, default_value_t = 2.0)]
    watchdog_sec: f64,
    /// TimeoutStartSec= in seconds (0: infinity); also the reload timeout.
    #[arg(long, default_value_t = 10.0)]
    start_timeout_sec: f64,
    /// TimeoutStopSec= in seconds (0: infinity).
    #[arg(long, default_value_t = 10.0)]
    stop_timeout_sec: f64,
    /// RuntimeMaxSec= in seconds (0: infinity).
    #[arg(long, default_value_t = 0.0)]
    runtime_max_sec: f64,
    /// Send SIGHUP this many seconds after READY=1 (repeatable).
    #[arg(long, value_name = "SECONDS")]
    reload_after: Vec<f64>,
    /// Stop the unit (SIGTERM, SIGKILL after TimeoutStopSec=) this many seconds after READY=1.
    #[arg(long, value_name = "SECONDS")]
    stop_after: Option<f64>,
    /// Bind NOTIFY_SOCKET at this path instead of a fresh @abstract name.
    #[arg(long, value_name = "PATH")]
    notify_socket: Option<std::path::PathBuf>,
    /// The service and its arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

/// How the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The unit's `Result=`.
    Result(UnitResult),
    /// `Result=success`, but the protocol checks failed.
    Protocol,
    /// The service sent something the model does not cover.
    Unsupported,
}

impl Outcome {
    pub(crate) fn exit_code(self) -> ExitCode {
        ExitCode::from(match self {
            Outcome::Result(UnitResult::Success) => 0,
            Outcome::Result(UnitResult::ExitCode) => 3,
            Outcome::Result(UnitResult::Signal) => 4,
            Outcome::Result(UnitResult::CoreDump) => 5,
            Outcome::Result(UnitResult::Watchdog) => 6,
            Outcome::Result(UnitResult::Timeout) => 7,
            Outcome::Result(UnitResult::Protocol) => 8,
            Outcome::Protocol => 9,
            Outcome::Unsupported => 10,
            // A result added to the model later.
            Outcome::Result(_) => 1,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Outcome::Result(r) => r.as_str(),
            Outcome::Protocol => "protocol-violation",
            Outcome::Unsupported => "not-modelled",
        }
    }
}

fn secs(s: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("--{what}: {s} is not a duration"))
}

pub(crate) fn run(opts: &Options) -> anyhow::Result<Outcome> {
    let cfg = UnitConfig::new()
        .watchdog(secs(opts.watchdog_sec, "watchdog-sec")?)
        .start_timeout(secs(opts.start_timeout_sec, "start-timeout-sec")?)
        .stop_timeout(secs(opts.stop_timeout_sec, "stop-timeout-sec")?)
        .runtime_max(secs(opts.runtime_max_sec, "runtime-max-sec")?);
    let mut reloads = opts
        .reload_after
        .iter()
        .map(|&s| secs(s, "reload-after"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    reloads.sort();
    let stop_after = opts.stop_after.map(|s| secs(s, "stop-after")).transpose()?;

    let manager = match &opts.notify_socket {
        Some(p) => FakeManager::start_unit_at(p, cfg.clone())
            .with_context(|| format!("cannot bind NOTIFY_SOCKET at {}", p.display()))?,
        None => {
            FakeManager::start_unit(cfg.clone()).context("cannot bind an abstract NOTIFY_SOCKET")?
        }
    };
    let Some((program, args)) = opts.command.split_first() else {
        bail!("no command given");
    };
    let mut cmd = manager.command(program, cfg.watchdog);
    cmd.args(args);
    let mut child = manager
        .spawn(&mut cmd)
        .with_context(|| format!("cannot start {}", program.to_string_lossy()))?;
    let say = |what: &str| {
        println!(
            "[{:>8.3}s] manager     {what}",
            manager.elapsed().as_secs_f64()
        )
    };
    say(&format!(
        "started {} as pid {}; NOTIFY_SOCKET={} WatchdogSec={} TimeoutStartSec={} \
         TimeoutStopSec={}",
        program.to_string_lossy(),
        child.id(),
        manager.notify_socket().to_string_lossy(),
        show(cfg.watchdog),
        show(cfg.start_timeout),
        show(cfg.stop_timeout),
    ));

    let (mut cursor, mut seen_events) = (0, 0);
    let mut ready_at: Option<Instant> = None;
    let mut stop_sent = false;
    let status: UnitStatus = loop {
        // Print whatever arrived and whatever the manager did, in order.
        let _ = manager.wait_for_since(cursor, "", Duration::from_millis(10), |_| true);
        print_new(&manager, &mut cursor, &mut seen_events);

        let status = manager.unit_status();
        if status.is_finished() {
            break status;
        }
        if ready_at.is_none() && status.active_state == ActiveState::Active {
            ready_at = Some(Instant::now());
        }
        if let Some(ready) = ready_at {
            let since_ready = ready.elapsed();
            if reloads.first().is_some_and(|&r| since_ready >= r) {
                reloads.remove(0);
                say("sending SIGHUP (reload)");
                if let Err(e) = child.hangup() {
                    say(&format!("cannot send SIGHUP: {e}"));
                }
            }
            if !stop_sent && stop_after.is_some_and(|s| since_ready >= s) {
                stop_sent = true;
                manager.stop_unit();
            }
        }
    };
    let exit = child.wait().context("cannot wait for the service")?;
    print_new(&manager, &mut cursor, &mut seen_events);
    say(&format!("service exited: {exit}; {status}"));

    let outcome = match manager.unit_result() {
        Err(e) => {
            say(&format!("{e}"));
            Outcome::Unsupported
        }
        Ok(UnitResult::Success) => match manager.check_protocol() {
            Ok(()) => Outcome::Result(UnitResult::Success),
            Err(e) => {
                say(&format!("protocol violation: {e}"));
                Outcome::Protocol
            }
        },
        Ok(r) => Outcome::Result(r),
    };
    let records = manager.records();
    say(&format!(
        "result: {} (ActiveState={} SubState={}; {} messages, {} watchdog pings)",
        outcome.name(),
        status.active_state,
        status.sub_state,
        records.len(),
        records.iter().filter(|r| r.is_ping()).count()
    ));
    Ok(outcome)
}

/// Prints the datagrams and the manager's actions since the last call, in time order.
fn print_new(manager: &FakeManager, cursor: &mut usize, seen_events: &mut usize) {
    let mut lines: Vec<(Duration, String)> = Vec::new();
    for r in manager.records().iter().skip(*cursor) {
        *cursor = r.seq + 1;
        lines.push((r.at, r.to_string()));
    }
    let events = manager.unit_events();
    for e in events.iter().skip(*seen_events) {
        lines.push((
            e.at,
            format!("[{:>8.3}s] manager     {}", e.at.as_secs_f64(), e.what),
        ));
    }
    *seen_events = events.len();
    lines.sort_by_key(|(at, _)| *at);
    for (_, l) in lines {
        println!("{l}");
    }
}

fn show(d: Option<Duration>) -> String {
    d.map_or("infinity".into(), |d| format!("{d:?}"))
}
