//! Idle wakeups of the reference daemon and worker, with and without a watchdog.
//!
//! An idle service should wake only for its pings (and for the work it was configured to do,
//! such as the worker's poll of the daemon). This bench runs the release binaries as real child
//! processes under the testkit's `FakeManager` (a real notify socket), waits for `READY=1`, lets
//! them settle, then counts the context switches of all their threads (the sum of
//! `voluntary_ctxt_switches` and `nonvoluntary_ctxt_switches` of every
//! `/proc/PID/task/*/status`) over a window. A thread that
//! blocks and is woken again switches once, so the count is the number of wakeups.
//!
//! ```sh
//! cargo bench --bench idle_wakeups            # 10 s windows
//! WK_IDLE_WINDOW_SECS=30 cargo bench --bench idle_wakeups
//! ```
//!
//! It prints, per configuration, wakeups per second, the pings the manager received in the
//! window, and wakeups per ping window (`WATCHDOG_USEC / 2`). The process exits non-zero if a
//! service does not start; it asserts nothing about the numbers (they are reported, and
//! BENCHMARKS.md records them).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use watchkeeper_testkit::{ChildExt as _, FakeManager};

const READY_DEADLINE: Duration = Duration::from_secs(30);
/// Time after READY=1 before counting: the start's own work (store open, first claim) is done.
const SETTLE: Duration = Duration::from_secs(2);
const WATCHDOG: Duration = Duration::from_secs(2);

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; a filter argument is accepted and ignored.
    let window = std::env::var("WK_IDLE_WINDOW_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(10), Duration::from_secs);
    let daemon = binary("watchkeeper-daemon", "watchkeeper-daemon")?;
    let worker = binary("watchkeeper-worker", "watchkeeper-worker")?;
    println!(
        "idle wakeups over {} s windows (watchdog: WATCHDOG_USEC = {} s, a ping window = {} ms)",
        window.as_secs(),
        WATCHDOG.as_secs(),
        WATCHDOG.as_millis() / 2
    );
    println!(
        "{:<8} {:<9} {:>12} {:>7} {:>18}",
        "service", "watchdog", "wakeups/s", "pings", "wakeups/ping window"
    );
    for watchdog in [None, Some(WATCHDOG)] {
        let m = measure_daemon(&daemon, watchdog, window)?;
        m.print("daemon", watchdog);
    }
    for watchdog in [None, Some(WATCHDOG)] {
        let m = measure_worker(&daemon, &worker, watchdog, window)?;
        m.print("worker", watchdog);
    }
    Ok(())
}

struct Measured {
    wakeups: u64,
    pings: usize,
    window: Duration,
}

impl Measured {
    fn print(&self, service: &str, watchdog: Option<Duration>) {
        let per_sec = self.wakeups as f64 / self.window.as_secs_f64();
        let (wd, per_window) = match watchdog {
            None => ("off".to_owned(), "-".to_owned()),
            Some(t) => {
                let windows = self.window.as_secs_f64() / (t.as_secs_f64() / 2.0);
                (
                    format!("{} s", t.as_secs()),
                    format!("{:.2}", self.wakeups as f64 / windows),
                )
            }
        };
        println!(
            "{service:<8} {wd:<9} {per_sec:>12.2} {:>7} {per_window:>18}",
            self.pings
        );
    }
}

/// A daemon with its tempdir; killed on drop.
struct Running {
    child: Child,
    _dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.terminate();
        let _ = self.child.wait();
    }
}

fn start_daemon(
    manager: &FakeManager,
    daemon: &Path,
    watchdog: Option<Duration>,
) -> Result<Running> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("daemon.sock");
    let config = dir.path().join("daemon.toml");
    fs::write(&config, "")?;
    let mut cmd = manager.command(daemon, watchdog);
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    let child = manager.spawn(&mut cmd).context("spawning the daemon")?;
    let running = Running {
        child,
        _dir: dir,
        socket,
    };
    manager
        .wait_ready(READY_DEADLINE)
        .context("the daemon sent no READY=1")?;
    Ok(running)
}

fn measure_daemon(daemon: &Path, watchdog: Option<Duration>, window: Duration) -> Result<Measured> {
    let manager = FakeManager::start()?;
    let mut running = start_daemon(&manager, daemon, watchdog)?;
    let m = count(&manager, &mut running.child, window)?;
    Ok(m)
}

fn measure_worker(
    daemon: &Path,
    worker: &Path,
    watchdog: Option<Duration>,
    window: Duration,
) -> Result<Measured> {
    let daemon_manager = FakeManager::start()?;
    let running = start_daemon(&daemon_manager, daemon, None)?;
    let dir = tempfile::tempdir()?;
    let manager = FakeManager::start()?;
    let mut cmd = manager.command(worker, watchdog);
    cmd.arg("--socket")
        .arg(&running.socket)
        .arg("--heartbeat")
        .arg(dir.path().join("heartbeat.json"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    let mut child = manager.spawn(&mut cmd).context("spawning the worker")?;
    let result = manager
        .wait_ready(READY_DEADLINE)
        .context("the worker sent no READY=1")
        .and_then(|_| count(&manager, &mut child, window));
    let _ = child.terminate();
    let _ = child.wait();
    drop(running);
    result
}

fn count(manager: &FakeManager, child: &mut Child, window: Duration) -> Result<Measured> {
    std::thread::sleep(SETTLE);
    let pid = child.id();
    let pings_before = manager.records().iter().filter(|r| r.is_ping()).count();
    let before = context_switches(pid)?;
    let start = Instant::now();
    std::thread::sleep(window);
    let after = context_switches(pid)?;
    let window = start.elapsed();
    let pings = manager.records().iter().filter(|r| r.is_ping()).count() - pings_before;
    ensure!(
        child.try_wait()?.is_none(),
        "the service exited during the measurement"
    );
    Ok(Measured {
        wakeups: after.saturating_sub(before),
        pings,
        window,
    })
}

/// Context switches of all threads of `pid`, summed. A thread that exits in between takes its
/// count with it; the services keep a fixed set of threads while idle.
fn context_switches(pid: u32) -> Result<u64> {
    let mut total = 0;
    for task in fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = match fs::read_to_string(task?.path().join("status")) {
            Ok(s) => s,
            Err(_) => continue, // the thread ended
        };
        for line in status.lines() {
            if let Some(rest) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += rest.trim().parse::<u64>().context("ctxt_switches")?;
            }
        }
    }
    Ok(total)
}

/// `target/PROFILE/NAME` next to this bench binary, built (or brought up to date) first:
/// cargo builds no binaries of other packages for a bench.
fn binary(name: &str, package: &str) -> Result<PathBuf> {
    Ok(watchkeeper_testkit::build_binary(
        package,
        name,
        Path::new(env!("CARGO_MANIFEST_DIR")),
    )?)
}
