//! Conformance of the fake manager to systemd 252: one table of scenarios, each a
//! `Type=notify` service played by `wk-notify-script` (scripted datagrams with exact delays, no
//! watchkeeper library in between), run under
//!
//! * `FakeManager` (the testkit library),
//! * `wk-fake-manager` (the command; its result line and its exit status),
//! * the real systemd user manager (all scenarios as parallel units of one manager; skips
//!   loudly without one, fails with `CI=true`),
//!
//! and each must end with the table's `Result=` and `ActiveState=`.
//!
//! `WK_CONFORMANCE_FAKE_MANAGER=PATH` runs another `wk-fake-manager` build against the table.

mod support;

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use support::user_manager::UserManager;
use support::wk::built_binary;
use watchkeeper_testkit::{FakeManager, UnitConfig};

/// How long any one scenario may take, end to end, before the run fails.
const DEADLINE: Duration = Duration::from_secs(30);

/// One scenario: the unit's settings, the script, and what systemd 252 ends with.
#[derive(Debug)]
struct Scenario {
    name: &'static str,
    /// `WatchdogSec=` (0: off).
    watchdog_ms: u64,
    /// `TimeoutStartSec=`
    start_timeout_ms: u64,
    /// `TimeoutStopSec=`
    stop_timeout_ms: u64,
    /// `RuntimeMaxSec=` (0: infinity).
    runtime_max_ms: u64,
    /// `wk-notify-script`'s steps.
    script: &'static [&'static str],
    /// The final `Result=`.
    result: &'static str,
    /// The final `ActiveState=`.
    active_state: &'static str,
}

impl Scenario {
    fn config(&self) -> UnitConfig {
        UnitConfig::new()
            .watchdog(Duration::from_millis(self.watchdog_ms))
            .start_timeout(Duration::from_millis(self.start_timeout_ms))
            .stop_timeout(Duration::from_millis(self.stop_timeout_ms))
            .runtime_max(Duration::from_millis(self.runtime_max_ms))
    }

    fn unit_name(&self) -> String {
        format!("wk-conformance-{}.service", self.name.replace('_', "-"))
    }
}

const fn scenario(
    name: &'static str,
    watchdog_ms: u64,
    script: &'static [&'static str],
    result: &'static str,
) -> Scenario {
    Scenario {
        name,
        watchdog_ms,
        start_timeout_ms: 10_000,
        stop_timeout_ms: 2_000,
        runtime_max_ms: 0,
        script,
        result,
        active_state: if matches!(result.as_bytes(), b"success") {
            "inactive"
        } else {
            "failed"
        },
    }
}

/// Every scenario ends with a clean `STOPPING=1` + exit 0 unless the manager acts first.
const SCENARIOS: &[Scenario] = &[
    // A ping before READY=1 arms the watchdog during the start: killed while activating,
    // although TimeoutStartSec= is far away.
    scenario(
        "ping_before_ready",
        1_000,
        &["WATCHDOG=1", "sleep:3", "READY=1", "STOPPING=1", "exit:0"],
        "watchdog",
    ),
    // Without a ping the start has no watchdog; READY=1 arms it.
    scenario(
        "slow_start_without_ping",
        1_000,
        &[
            "sleep:2",
            "READY=1",
            "sleep:0.6",
            "WATCHDOG=1",
            "sleep:0.6",
            "STOPPING=1",
            "exit:0",
        ],
        "success",
    ),
    // Pings 0.9 T apart survive (T = 2 s here, for a 200 ms margin on a busy machine).
    scenario(
        "pings_at_0_9_t_survive",
        2_000,
        &["READY=1", "repeat:5:1.8:WATCHDOG=1", "STOPPING=1", "exit:0"],
        "success",
    ),
    // Pings 1.2 T apart: killed before the first.
    scenario(
        "pings_at_1_2_t_are_killed",
        1_000,
        &["READY=1", "repeat:3:1.2:WATCHDOG=1", "STOPPING=1", "exit:0"],
        "watchdog",
    ),
    // While running, EXTEND_TIMEOUT_USEC= moves the armed watchdog: 2 s without a ping
    // survive WatchdogSec=1.
    scenario(
        "extend_while_running",
        1_000,
        &[
            "READY=1",
            "sleep:0.3",
            "EXTEND_TIMEOUT_USEC=3000000",
            "sleep:2",
            "WATCHDOG=1",
            "STOPPING=1",
            "exit:0",
        ],
        "success",
    ),
    // ... and RuntimeMaxSec=: 2 s of running survive 1 s.
    Scenario {
        runtime_max_ms: 1_000,
        ..scenario(
            "extend_runtime_max",
            0,
            &[
                "READY=1",
                "sleep:0.5",
                "EXTEND_TIMEOUT_USEC=2000000",
                "sleep:1.5",
                "STOPPING=1",
                "exit:0",
            ],
            "success",
        )
    },
    // Without it: stopped (SIGTERM) at RuntimeMaxSec=, Result=timeout.
    Scenario {
        runtime_max_ms: 1_000,
        ..scenario(
            "runtime_max",
            0,
            &["READY=1", "sleep:2", "STOPPING=1", "exit:0"],
            "timeout",
        )
    },
    // During the start it moves TimeoutStartSec=: 2 s of start survive 1 s.
    Scenario {
        start_timeout_ms: 1_000,
        ..scenario(
            "extend_during_start",
            0,
            &[
                "EXTEND_TIMEOUT_USEC=1500000",
                "sleep:1",
                "EXTEND_TIMEOUT_USEC=1500000",
                "sleep:1",
                "READY=1",
                "STOPPING=1",
                "exit:0",
            ],
            "success",
        )
    },
    // Without it: SIGTERM after TimeoutStartSec=, Result=timeout.
    Scenario {
        start_timeout_ms: 1_000,
        ..scenario(
            "start_timeout",
            0,
            &["sleep:2.5", "READY=1", "STOPPING=1", "exit:0"],
            "timeout",
        )
    },
    // STOPPING=1, then hanging: SIGKILL after TimeoutStopSec=, Result=timeout.
    Scenario {
        stop_timeout_ms: 1_000,
        ..scenario(
            "stop_timeout",
            1_000,
            &["READY=1", "STOPPING=1", "hang"],
            "timeout",
        )
    },
    // During the stop it moves TimeoutStopSec=.
    Scenario {
        stop_timeout_ms: 1_000,
        ..scenario(
            "extend_during_stop",
            0,
            &[
                "READY=1",
                "STOPPING=1",
                "EXTEND_TIMEOUT_USEC=2500000",
                "sleep:1.6",
                "exit:0",
            ],
            "success",
        )
    },
    // WATCHDOG=trigger acts at once, also without WatchdogSec=.
    scenario(
        "trigger",
        0,
        &["READY=1", "sleep:0.2", "WATCHDOG=trigger", "hang"],
        "watchdog",
    ),
    // WATCHDOG_USEC= sets a new timeout, running from then.
    scenario(
        "watchdog_usec_override",
        30_000,
        &["READY=1", "sleep:0.2", "WATCHDOG_USEC=1000000", "hang"],
        "watchdog",
    ),
    // RELOADING=1 ... READY=1, with pings in between.
    scenario(
        "reload",
        1_000,
        &[
            "READY=1",
            "sleep:0.3",
            "reloading",
            "sleep:0.6",
            "WATCHDOG=1",
            "sleep:0.6",
            "READY=1",
            "sleep:0.3",
            "STOPPING=1",
            "exit:0",
        ],
        "success",
    ),
    scenario("exit_code", 0, &["READY=1", "exit:3"], "exit-code"),
    // A clean exit before READY=1.
    scenario("exit_before_ready", 0, &["exit:0"], "protocol"),
];

/// What a manager ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    result: String,
    active_state: String,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Result={} ActiveState={}",
            self.result, self.active_state
        )
    }
}

/// Runs `run` for every scenario in parallel threads; an error listing every scenario whose
/// outcome differs from the table (or that failed to run).
fn check_all(manager: &str, run: impl Fn(&Scenario) -> Result<Outcome> + Sync) -> Result<()> {
    let t0 = Instant::now();
    let outcomes: Vec<(&Scenario, Result<Outcome>)> = thread::scope(|s| {
        let handles: Vec<_> = SCENARIOS
            .iter()
            .map(|sc| (sc, s.spawn(|| run(sc))))
            .collect();
        handles
            .into_iter()
            .map(|(sc, h)| {
                let r = h
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the scenario's thread panicked")));
                (sc, r)
            })
            .collect()
    });
    compare(manager, &outcomes)?;
    eprintln!(
        "{manager}: {} scenarios as in the table, in {:?}",
        SCENARIOS.len(),
        t0.elapsed()
    );
    Ok(())
}

fn compare(manager: &str, outcomes: &[(&Scenario, Result<Outcome>)]) -> Result<()> {
    let mut wrong = Vec::new();
    for (sc, got) in outcomes {
        let want = Outcome {
            result: sc.result.to_owned(),
            active_state: sc.active_state.to_owned(),
        };
        match got {
            Ok(got) if *got == want => {}
            Ok(got) => wrong.push(format!("{}: got {got}, systemd 252 gives {want}", sc.name)),
            Err(e) => wrong.push(format!("{}: {e:#}", sc.name)),
        }
    }
    ensure!(
        wrong.is_empty(),
        "under {manager}, {} of {} scenarios end differently:\n  {}",
        wrong.len(),
        outcomes.len(),
        wrong.join("\n  ")
    );
    Ok(())
}

fn script_binary() -> Result<PathBuf> {
    built_binary("wk-notify-script")
}

#[test]
fn the_fake_manager_library_ends_each_scenario_as_systemd_252() -> Result<()> {
    let script = script_binary()?;
    check_all("FakeManager", |sc| {
        let cfg = sc.config();
        let manager = FakeManager::start_unit(cfg.clone())?;
        let mut cmd = manager.command(&script, cfg.watchdog);
        cmd.args(sc.script);
        cmd.stderr(std::process::Stdio::null());
        let mut child = manager.spawn(&mut cmd)?;
        let status = manager.wait_result(DEADLINE);
        // The model's SIGKILL ends a hung script; reap it either way.
        let _ = child.kill();
        let _ = child.wait();
        let status = status?;
        Ok(Outcome {
            result: status.result.as_str().to_owned(),
            active_state: status.active_state.as_str().to_owned(),
        })
    })
}

/// `wk-fake-manager`'s exit status for each `Result=`.
fn fake_manager_exit_code(result: &str) -> Option<i32> {
    Some(match result {
        "success" => 0,
        "exit-code" => 3,
        "signal" => 4,
        "core-dump" => 5,
        "watchdog" => 6,
        "timeout" => 7,
        "protocol" => 8,
        _ => return None,
    })
}

#[test]
fn the_fake_manager_command_ends_each_scenario_as_systemd_252() -> Result<()> {
    let script = script_binary()?;
    let fake = match std::env::var_os("WK_CONFORMANCE_FAKE_MANAGER") {
        Some(p) => PathBuf::from(p),
        None => built_binary("wk-fake-manager")?,
    };
    check_all("wk-fake-manager", |sc| {
        let secs = |ms: u64| format!("{}", ms as f64 / 1000.0);
        let out = Command::new(&fake)
            .args(["--watchdog-sec", &secs(sc.watchdog_ms)])
            .args(["--start-timeout-sec", &secs(sc.start_timeout_ms)])
            .args(["--stop-timeout-sec", &secs(sc.stop_timeout_ms)])
            .args(["--runtime-max-sec", &secs(sc.runtime_max_ms)])
            .arg("--")
            .arg(&script)
            .args(sc.script)
            .output()
            .with_context(|| format!("cannot run {}", fake.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        // "[   1.234s] manager     result: watchdog (ActiveState=failed SubState=failed; ...)"
        let line = stdout
            .lines()
            .rev()
            .find_map(|l| l.split_once("manager     result: ").map(|(_, r)| r))
            .with_context(|| format!("no result line ({}):\n{stdout}", out.status))?;
        let result = line.split_whitespace().next().unwrap_or("").to_owned();
        let active_state = line
            .split_once("ActiveState=")
            .and_then(|(_, r)| r.split([' ', ')']).next())
            .unwrap_or("?")
            .to_owned();
        ensure!(
            out.status.code() == fake_manager_exit_code(&result),
            "Result={result} but exit status {} (expected {:?}):\n{stdout}",
            out.status,
            fake_manager_exit_code(&result)
        );
        Ok(Outcome {
            result,
            active_state,
        })
    })
}

/// The unit file of a scenario. A user manager at `LogLevel=info` does not log a success, and
/// unloads an inactive unit at once (its properties then read as defaults), so
/// `ExecStopPost=` writes `$SERVICE_RESULT` (the `Result=` when the main process is gone) to
/// `results/NAME`.
fn unit_file(sc: &Scenario, script: &Path, results: &Path) -> Result<String> {
    let mut exec = script.display().to_string();
    for step in sc.script {
        // Nothing that a unit file would expand or split differently.
        ensure!(
            !step.contains(['%', '$', '\\', '"', '\'', ';', ' ']),
            "{}: step {step:?} needs quoting in a unit file",
            sc.name
        );
        exec.push(' ');
        exec.push_str(step);
    }
    Ok(format!(
        "[Unit]\nDescription=watchkeeper conformance: {}\n\n[Service]\nType=notify\n\
         ExecStart={exec}\nWatchdogSec={}ms\nTimeoutStartSec={}ms\nTimeoutStopSec={}ms\n\
         RuntimeMaxSec={}\nRestart=no\nLimitCORE=0\n\
         ExecStopPost=/bin/sh -c 'echo \"$$SERVICE_RESULT\" > {}'\n",
        sc.name,
        sc.watchdog_ms,
        sc.start_timeout_ms,
        sc.stop_timeout_ms,
        // (RuntimeMaxSec=0 would stop the unit at once.)
        match sc.runtime_max_ms {
            0 => "infinity".to_owned(),
            ms => format!("{ms}ms"),
        },
        results.join(sc.name).display()
    ))
}

/// `systemctl --user show -p ... UNIT...`: one map per unit, in order.
fn show_all(
    um: &UserManager,
    units: &[String],
    props: &[&str],
) -> Result<Vec<HashMap<String, String>>> {
    let mut args = vec!["show".to_owned()];
    for p in props {
        args.push(format!("--property={p}"));
    }
    args.extend(units.iter().cloned());
    let out = um.systemctl_ok(&args)?;
    let maps: Vec<HashMap<String, String>> = out
        .split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            b.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .collect();
    ensure!(
        maps.len() == units.len(),
        "systemctl show gave {} blocks for {} units:\n{out}",
        maps.len(),
        units.len()
    );
    Ok(maps)
}

#[test]
fn systemd_252_ends_each_scenario_as_in_the_table() -> Result<()> {
    let Some(um) = UserManager::start()? else {
        return Ok(());
    };
    let script = um.install_binary(&script_binary()?);
    let results = um.state_dir().join("results");
    fs::create_dir(&results).with_context(|| format!("creating {}", results.display()))?;
    std::os::unix::fs::chown(&results, Some(um.uid()), Some(um.gid()))?;
    let dir = um.unit_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let units: Vec<String> = SCENARIOS.iter().map(Scenario::unit_name).collect();
    for (sc, unit) in SCENARIOS.iter().zip(&units) {
        let path = dir.join(unit);
        um.claim(&path, false)?;
        fs::write(&path, unit_file(sc, &script, &results)?)
            .with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
        std::os::unix::fs::chown(&path, Some(um.uid()), Some(um.gid()))?;
    }
    um.systemctl_ok(["daemon-reload"])?;

    let t0 = Instant::now();
    let mut start = vec!["start".to_owned(), "--no-block".to_owned()];
    start.extend(units.iter().cloned());
    um.systemctl_ok(&start)?;
    // Each unit is done once `ExecStopPost=` wrote its result and it is inactive or failed.
    const PROPS: &[&str] = &["ActiveState", "Result", "SubState"];
    let result_of = |sc: &Scenario| {
        fs::read_to_string(results.join(sc.name))
            .ok()
            .map(|r| r.trim().to_owned())
    };
    let ended = |sc: &Scenario, m: &HashMap<String, String>| {
        result_of(sc).is_some()
            && matches!(
                m.get("ActiveState").map(String::as_str),
                Some("inactive" | "failed")
            )
    };
    let last = loop {
        let maps = show_all(&um, &units, PROPS)?;
        if SCENARIOS.iter().zip(&maps).all(|(sc, m)| ended(sc, m)) {
            break maps;
        }
        if t0.elapsed() > DEADLINE {
            let pending: Vec<String> = units
                .iter()
                .zip(SCENARIOS.iter().zip(&maps))
                .filter(|(_, (sc, m))| !ended(sc, m))
                .map(|(u, (_, m))| (u, m))
                .map(|(u, m)| format!("{u}: {m:?}\n{}", um.journal(u)))
                .collect();
            bail!(
                "not all scenario units ended within {DEADLINE:?}:\n{}",
                pending.join("\n")
            );
        }
        thread::sleep(Duration::from_millis(100));
    };
    let outcomes: Vec<(&Scenario, Result<Outcome>)> = SCENARIOS
        .iter()
        .zip(&last)
        .map(|(sc, m)| {
            (
                sc,
                Ok(Outcome {
                    result: result_of(sc).unwrap_or_default(),
                    active_state: m.get("ActiveState").cloned().unwrap_or_default(),
                }),
            )
        })
        .collect();
    let compared = compare("the systemd user manager", &outcomes);
    if compared.is_err() {
        for (sc, unit) in SCENARIOS.iter().zip(&units) {
            eprintln!("--- {} ({unit}):\n{}", sc.name, um.journal(unit));
        }
    }
    compared?;
    eprintln!(
        "systemd user manager: {} scenarios as in the table, in {:?}",
        SCENARIOS.len(),
        t0.elapsed()
    );
    Ok(())
}
