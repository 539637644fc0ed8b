//! End to end, under a real `systemd --user` (systemd 252's `service.c`): the watchdog's
//! tolerance is systemd's, not half of it, and the start is not watched before `READY=1`.
//!
//! `examples/02_poll_loop` runs as three parallel `Type=notify` units:
//!
//! * iterations of 0.9 × `WatchdogSec=` survive 20 iterations, then the service stops cleanly
//!   (`Result=success`): the ping follows each late iteration at once;
//! * iterations of 1.2 × `WatchdogSec=` get the service killed (`Result=watchdog`);
//!   Each ping follows its iteration at once: no two pings are a whole `WatchdogSec=` apart
//!   (systemd's timer slack would forgive that, the margin would be gone);
//! * a loop that ticks once, then a start 2.5 × `WatchdogSec=` long, within `TimeoutStartSec=`:
//!   no ping before `READY=1` arms the watchdog during the start (a ping would get the unit
//!   killed while activating), so the unit becomes active and ends with `Result=success`;
//! * the same with `TimeoutStartSec=` shorter than the start, which the service extends
//!   (`EXTEND_TIMEOUT_USEC=`).

mod support;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use support::user_manager::UserManager;

const WATCHDOG_MS: u64 = 2_000;

struct Case {
    name: &'static str,
    args: &'static [&'static str],
    start_timeout_ms: u64,
    result: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "iterations-0-9-t",
        // 0.9 × 2 s; 20 iterations, then a clean stop.
        args: &["--interval-ms", "1800", "--cycles", "21"],
        start_timeout_ms: 10_000,
        result: "success",
    },
    Case {
        name: "iterations-1-2-t",
        args: &["--interval-ms", "2400", "--cycles", "6"],
        start_timeout_ms: 10_000,
        result: "watchdog",
    },
    Case {
        name: "slow-start-after-a-tick",
        args: &[
            "--start-delay-ms",
            "5000",
            "--interval-ms",
            "200",
            "--cycles",
            "25",
        ],
        start_timeout_ms: 10_000,
        result: "success",
    },
    Case {
        name: "extended-slow-start-after-a-tick",
        args: &[
            "--start-delay-ms",
            "5000",
            "--extend-start",
            "--interval-ms",
            "200",
            "--cycles",
            "25",
        ],
        start_timeout_ms: 3_000,
        result: "success",
    },
];

/// How long all cases may take together: the longest is 20 × 1.8 s.
const DEADLINE: Duration = Duration::from_secs(75);

fn example(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .context("the test binary is not in target/PROFILE/deps")?;
    let path = profile.join("examples").join(name);
    ensure!(
        path.is_file(),
        "{} is missing: build it with `cargo build --examples`",
        path.display()
    );
    Ok(path)
}

fn unit_name(case: &Case) -> String {
    format!("wk-tolerance-{}.service", case.name)
}

fn unit_file(case: &Case, exe: &Path, results: &Path) -> String {
    format!(
        "[Unit]\nDescription=watchkeeper watchdog tolerance: {}\n\n[Service]\nType=notify\n\
         ExecStart={} {}\nWatchdogSec={WATCHDOG_MS}ms\nTimeoutStartSec={}ms\n\
         TimeoutStopSec=5s\nRestart=no\nLimitCORE=0\n\
         ExecStopPost=/bin/sh -c 'echo \"$$SERVICE_RESULT\" > {}'\n",
        case.name,
        exe.display(),
        case.args.join(" "),
        case.start_timeout_ms,
        results.join(case.name).display()
    )
}

#[test]
fn systemd_tolerates_iterations_of_almost_its_timeout_and_does_not_watch_the_start() -> Result<()> {
    let Some(um) = UserManager::start()? else {
        return Ok(());
    };
    let exe = um.install_binary(&example("02_poll_loop")?);
    let results = um.state_dir().join("tolerance-results");
    fs::create_dir(&results).with_context(|| format!("creating {}", results.display()))?;
    std::os::unix::fs::chown(&results, Some(um.uid()), Some(um.gid()))?;
    let dir = um.unit_dir();
    fs::create_dir_all(&dir)?;
    let units: Vec<String> = CASES.iter().map(unit_name).collect();
    for (case, unit) in CASES.iter().zip(&units) {
        let path = dir.join(unit);
        um.claim(&path, false)?;
        fs::write(&path, unit_file(case, &exe, &results))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
        std::os::unix::fs::chown(&path, Some(um.uid()), Some(um.gid()))?;
    }
    um.systemctl_ok(["daemon-reload"])?;
    let t0 = Instant::now();
    let mut start = vec!["start".to_owned(), "--no-block".to_owned()];
    start.extend(units.iter().cloned());
    um.systemctl_ok(&start)?;

    let result_of = |case: &Case| {
        fs::read_to_string(results.join(case.name))
            .ok()
            .map(|r| r.trim().to_owned())
    };
    let mut seen: HashMap<&str, Vec<String>> = HashMap::new();
    // The 0.9 T case's pings, as systemd recorded them.
    let mut pings: Vec<u64> = Vec::new();
    loop {
        let mut done = true;
        for (case, unit) in CASES.iter().zip(&units) {
            let p = um.show(
                unit,
                &["ActiveState", "SubState", "WatchdogTimestampMonotonic"],
            );
            if case.name == "iterations-0-9-t" && p["SubState"] == "running" {
                let ts: u64 = p["WatchdogTimestampMonotonic"].parse().unwrap_or(0);
                if ts != 0 && pings.last() != Some(&ts) {
                    pings.push(ts);
                }
            }
            let state = format!("{}/{}", p["ActiveState"], p["SubState"]);
            let states = seen.entry(case.name).or_default();
            if states.last() != Some(&state) {
                states.push(state);
            }
            done &= result_of(case).is_some()
                && matches!(p["ActiveState"].as_str(), "inactive" | "failed");
        }
        if done {
            break;
        }
        if t0.elapsed() > DEADLINE {
            let journals: Vec<String> = units.iter().map(|u| um.journal(u)).collect();
            bail!(
                "not every case ended within {DEADLINE:?}: {seen:?}\n{}",
                journals.join("\n")
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
    let mut wrong = Vec::new();
    for (case, unit) in CASES.iter().zip(&units) {
        let result = result_of(case).unwrap_or_default();
        eprintln!(
            "{}: Result={result}, states {:?}",
            case.name, seen[case.name]
        );
        if result != case.result {
            wrong.push(format!(
                "{}: Result={result}, expected {}\n{}",
                case.name,
                case.result,
                um.journal(unit)
            ));
        }
    }
    ensure!(wrong.is_empty(), "{}", wrong.join("\n"));
    // The slow starts were activating, then running: never killed while activating.
    for name in [
        "slow-start-after-a-tick",
        "extended-slow-start-after-a-tick",
    ] {
        let slow = &seen[name];
        ensure!(
            slow.iter().any(|s| s == "active/running"),
            "{name} never ran: {slow:?}"
        );
    }
    // READY=1 and 20 pings; each ping follows its 1.8 s iteration, not a window's edge 2 s on.
    ensure!(pings.len() >= 20, "pings seen: {pings:?}");
    let gaps: Vec<u64> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    let max = gaps.iter().copied().max().unwrap_or(0);
    eprintln!(
        "0.9 T: {} pings, largest gap {:.3} s (WatchdogSec {:.1} s)",
        pings.len(),
        max as f64 / 1e6,
        WATCHDOG_MS as f64 / 1e3
    );
    ensure!(
        max < WATCHDOG_MS * 1000 * 95 / 100,
        "two pings {max} µs apart, more than 0.95 × WatchdogSec: {gaps:?}"
    );
    Ok(())
}
