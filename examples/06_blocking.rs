//! # Scenario: a service on plain threads, without an async runtime
//!
//! A worker thread does one unit of work every `--interval-ms` (default 200) and ticks its
//! [`Progress`](watchkeeper::Progress); the watchdog keeper pings only while it does.
//! `SIGHUP` reloads (here: counts the reloads in the log), `SIGTERM` stops: the worker
//! sees the stop at once through its [`StopSignal`](watchkeeper::blocking::StopSignal), and
//! the process exits 0.
//!
//! `--hang-after N` makes the worker hang after N units (it waits forever, as a deadlocked
//! call would): the pings stop and `STATUS=` names the loop.
//!
//! ```text
//! cargo build --examples
//! wk-fake-manager --watchdog-sec 2 -- target/debug/examples/06_blocking --hang-after 15
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use watchkeeper::SystemdEnv;
use watchkeeper::blocking::BlockingService;
use watchkeeper::logging::{self, LogConfig};

fn main() -> anyhow::Result<()> {
    let mut interval = Duration::from_millis(200);
    let mut hang_after = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--interval-ms" => {
                interval = Duration::from_millis(value()?.parse().context("--interval-ms")?)
            }
            "--hang-after" => hang_after = Some(value()?.parse::<u64>().context("--hang-after")?),
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    let env = SystemdEnv::from_env();
    logging::init(&LogConfig::from_rust_log("blocking"), &env)?;
    let service = BlockingService::builder("blocking").env(env).build()?;

    let progress = service.register_loop("work");
    let stop = service.stop_signal();
    service.spawn_named("work", move || {
        let mut done = 0u64;
        while !stop.wait_timeout(interval) {
            if Some(done) == hang_after {
                tracing::warn!(done, "simulating a hung loop");
                loop {
                    std::thread::park();
                }
            }
            // ... one unit of work ...
            done += 1;
            progress.tick();
        }
        tracing::info!(done, "worker stopped");
    });

    service.ready_with_status("working")?;
    let reloads = Arc::new(AtomicU64::new(0));
    let report = service.run(move || {
        let n = reloads.fetch_add(1, Ordering::SeqCst) + 1;
        tracing::info!(n, "reload");
        Ok::<(), std::io::Error>(())
    })?;
    tracing::info!(?report, "stopped");
    Ok(())
}
