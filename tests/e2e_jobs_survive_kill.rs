//! End to end, under a real `systemd --user`: jobs submitted to the daemon survive `kill -9`
//! of the daemon while work is in flight and `kill -9` of a worker in the middle of a job:
//! with a short lease, every job ends `completed`, none is lost, quarantined or left claimed.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use support::wk::{DAEMON, SOCKET, Wk, field, message, read_contrib};

const DEADLINE: Duration = Duration::from_secs(20);
/// How long the whole queue may take to drain, kills and lease expiries included.
const DRAIN_DEADLINE: Duration = Duration::from_secs(60);
/// Each job sleeps 1 s: long enough that a kill after reading `running job N` from StatusText
/// usually lands while job N still runs (a worker claims its next job at once).
const JOBS: u64 = 16;
const WORKERS: &[&str] = &[
    "watchkeeper-worker@alpha.service",
    "watchkeeper-worker@beta.service",
];

fn kill_9(wk: &Wk, unit: &str) -> Result<()> {
    let pid = wk.main_pid(unit);
    wk.systemctl_ok(["kill", "-s", "KILL", unit])?;
    wk.poll(&format!("{unit} restarted"), unit, DEADLINE, || {
        let p = wk.try_show(unit, &["ActiveState", "MainPID", "NRestarts"])?;
        let back = p["ActiveState"] == "active"
            && p["MainPID"] != "0"
            && p["MainPID"] != pid.to_string()
            && p["NRestarts"] != "0";
        Ok(back.then_some(()))
    })
}

#[test]
fn jobs_survive_kill_9_of_the_daemon_and_of_a_worker() -> Result<()> {
    let daemon_toml = read_contrib("config/daemon.toml")?;
    ensure!(
        daemon_toml.contains("lease_secs = 60"),
        "shipped daemon.toml changed"
    );
    let Some(wk) = Wk::start(
        Some(&daemon_toml.replace("lease_secs = 60", "lease_secs = 2")),
        None,
    )?
    else {
        return Ok(());
    };
    wk.systemctl_ok(["start", SOCKET])?;
    wk.systemctl_ok(["start", WORKERS[0], WORKERS[1]])?;

    let t0 = Instant::now();
    let script = format!(
        "for i in $(seq {JOBS}); do {}/.local/bin/wk-jobs --socket {} submit sleep 1 || exit 1; done",
        wk.user_home().display(),
        wk.socket_path()
    );
    let out = wk.run("sh", ["-c", &script]);
    ensure!(
        out.status.success(),
        "submitting: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    ensure!(ids == (1..=JOBS).collect::<Vec<_>>(), "ids: {ids:?}");
    eprintln!("{JOBS} jobs submitted in {:?}", t0.elapsed());

    // kill -9 of the daemon with jobs claimed and some done.
    let s = wk.poll("work in flight", DAEMON, DEADLINE, || {
        let s = wk.stats()?;
        Ok((s["claimed"] >= 1 && s["completed"] >= 2).then_some(s))
    })?;
    eprintln!("killing the daemon at {s:?}");
    kill_9(&wk, DAEMON)?;
    eprintln!("daemon back at {:?}", wk.stats()?);

    // kill -9 of a worker in the middle of a job: its cgroup (the job too) dies, the lease
    // expires and the job goes to another worker. Whether the job was still running when the
    // kill came is read back from the killed process's own journal lines; if it had just
    // finished, the next running job is tried.
    let mut killed_mid_job = None;
    for _ in 0..5 {
        let (unit, pid, job) = wk.poll("a worker running a job", WORKERS[0], DEADLINE, || {
            for unit in WORKERS {
                let st = wk.try_show(unit, &["StatusText", "MainPID"])?;
                if let Some(rest) = st["StatusText"].strip_prefix("running job ") {
                    let job = rest.split(';').next().unwrap_or("").to_owned();
                    return Ok(Some((*unit, st["MainPID"].clone(), job)));
                }
            }
            Ok(None)
        })?;
        kill_9(&wk, unit)?;
        let lines: Vec<String> = wk
            .journal_json(unit)?
            .iter()
            .filter(|e| field(e, "_PID") == pid && field(e, "F_JOB") == job)
            .map(message)
            .collect();
        eprintln!("killed {unit} (pid {pid}) at job {job}: its lines for the job: {lines:?}");
        ensure!(
            lines.iter().any(|m| m == "running job"),
            "no `running job` line: {lines:?}"
        );
        if lines.len() == 1 {
            killed_mid_job = Some((unit, job));
            break;
        }
    }
    let (unit, job) = killed_mid_job.context("never killed a worker in the middle of a job")?;
    eprintln!(
        "{unit} was killed while running job {job}; {:?}",
        wk.stats()?
    );

    // Every job ends completed: none lost, none left claimed or queued, none poisoned.
    let mut last = HashMap::new();
    let done = wk.poll("the queue drains", unit, DRAIN_DEADLINE, || {
        let s = wk.stats()?;
        last = s.clone();
        Ok((s["queued"] == 0 && s["claimed"] == 0).then_some(s))
    });
    let s = done.map_err(|e| e.context(format!("last stats {last:?}")))?;
    eprintln!("queue drained {:?} after submitting: {s:?}", t0.elapsed());
    ensure!(
        s["completed"] == JOBS && s["failed"] == 0 && s["denied"] == 0 && s["quarantined"] == 0,
        "jobs lost or not completed: {s:?}"
    );
    for unit in WORKERS {
        wk.assert_running(unit)?;
    }
    wk.assert_running(DAEMON)?;
    Ok(())
}
