//! Worker throughput: one real daemon and one real worker (release binaries, each under the
//! testkit's `FakeManager`, with a heartbeat file), N `/bin/true` jobs queued before the worker
//! starts; the clock runs from the worker's `READY=1` until the daemon counts all N completed.
//!
//! ```sh
//! cargo bench -p watchkeeper-worker --bench throughput
//! WK_BENCH_JOBS=5000 WK_BENCH_RUNS=5 cargo bench -p watchkeeper-worker --bench throughput
//! ```
//!
//! It prints jobs/s for each run and the median. Every outcome is durable when counted (the
//! daemon answers `complete` only once it is committed). The process exits non-zero if a
//! service does not start or the jobs do not all complete within the deadline; it asserts
//! nothing about the numbers (BENCHMARKS.md records them).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use watchkeeper_jobs::Client;
use watchkeeper_testkit::{ChildExt as _, FakeManager};

const READY_DEADLINE: Duration = Duration::from_secs(30);
/// For all the jobs of one run to complete, whatever N (a stuck worker ends the bench).
const RUN_DEADLINE: Duration = Duration::from_secs(600);
const STATS_EVERY: Duration = Duration::from_millis(50);

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    let jobs = env_number("WK_BENCH_JOBS", 2000);
    let runs = env_number("WK_BENCH_RUNS", 3);
    let daemon = binary("watchkeeper-daemon", "watchkeeper-daemon")?;
    let worker = PathBuf::from(env!("CARGO_BIN_EXE_watchkeeper-worker"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    println!("worker throughput: {jobs} /bin/true jobs per run, {runs} runs");
    let mut rates = Vec::new();
    for run in 1..=runs {
        let (elapsed, rate) = rt.block_on(one_run(&daemon, &worker, jobs))?;
        println!(
            "run {run}: {jobs} jobs in {:.3} s = {rate:.0} jobs/s",
            elapsed.as_secs_f64()
        );
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    println!("median: {median:.0} jobs/s");
    Ok(())
}

/// A child killed (SIGTERM, then waited for) on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.terminate();
        let _ = self.0.wait();
    }
}

async fn one_run(daemon: &Path, worker: &Path, jobs: u64) -> Result<(Duration, f64)> {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    let socket = dir.path().join("daemon.sock");
    let daemon_config = dir.path().join("daemon.toml");
    fs::write(&daemon_config, "")?;
    let daemon_manager = FakeManager::start()?;
    let mut cmd = daemon_manager.command(daemon, None);
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--config")
        .arg(&daemon_config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    let _daemon = Running(
        daemon_manager
            .spawn(&mut cmd)
            .context("spawning the daemon")?,
    );
    daemon_manager
        .wait_ready(READY_DEADLINE)
        .context("the daemon sent no READY=1")?;

    let mut client = Client::connect(&socket).await?;
    for _ in 0..jobs {
        client
            .submit(serde_json::json!({"command": ["/bin/true"], "timeout_secs": 10}))
            .await?;
    }
    let before = client.stats().await?;
    ensure!(before.queued == jobs, "queued: {before:?}");

    let worker_config = dir.path().join("worker.toml");
    fs::write(
        &worker_config,
        "allowlist = [\"/bin/true\"]\npoll_interval_ms = 50\n",
    )?;
    let manager = FakeManager::start()?;
    let mut cmd = manager.command(worker, Some(Duration::from_secs(10)));
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--name")
        .arg("bench")
        .arg("--config")
        .arg(&worker_config)
        .arg("--heartbeat")
        .arg(dir.path().join("heartbeat.json"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    let _worker = Running(manager.spawn(&mut cmd).context("spawning the worker")?);
    manager
        .wait_ready(READY_DEADLINE)
        .context("the worker sent no READY=1")?;
    let start = Instant::now();
    loop {
        let stats = client.stats().await?;
        if stats.completed + stats.failed >= jobs {
            ensure!(stats.failed == 0, "jobs failed: {stats:?}");
            break;
        }
        if start.elapsed() > RUN_DEADLINE {
            bail!("not all jobs completed within {RUN_DEADLINE:?}: {stats:?}");
        }
        tokio::time::sleep(STATS_EVERY).await;
    }
    let elapsed = start.elapsed();
    Ok((elapsed, jobs as f64 / elapsed.as_secs_f64()))
}

/// `target/PROFILE/NAME` next to this bench binary, built (or brought up to date) first:
/// cargo builds no binaries of other packages for a bench.
fn binary(name: &str, package: &str) -> Result<PathBuf> {
    Ok(watchkeeper_testkit::build_binary(
        package,
        name,
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")),
    )?)
}
