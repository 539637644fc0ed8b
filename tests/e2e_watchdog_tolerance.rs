//! End to end, under a real `systemd --user` (systemd 252's `service.c`): the watchdog's
//! tolerance is systemd's, not half of it, and the start is not watched before `READY=1`.
//!
//! `examples/02_poll_loop` runs as three parallel `Type=notify` units:
//!
//! * iterations of 0.9 × `WatchdogSec=` survive 20 iterations, then the service stops cleanly
//!   (`Result=success`): the ping follows each late iteration at once;
//! * iterations of 1.2 × `WatchdogSec=` get the service killed (`Result=watchdog`);
//! * a loop that ticks once, then a start 2.5 × `WatchdogSec=` long that extends its start
//!   timeout (`TimeoutStartSec=` shorter than the start): no ping before `READY=1` arms the
//!   watchdog during the start, so the unit becomes active and ends with `Result=success`.

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
    loop {
        let mut done = true;
        for (case, unit) in CASES.iter().zip(&units) {
            let p = um.show(unit, &["ActiveState", "SubState"]);
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
    // The slow start was activating, then running: never killed while activating.
    let slow = &seen["slow-start-after-a-tick"];
    ensure!(
        slow.iter().any(|s| s == "active/running"),
        "the slow start never ran: {slow:?}"
    );
    Ok(())
}
