//! # Scenario: a poll loop whose progress feeds the watchdog
//!
//! A worker polls for work every `--interval-ms` (default 200). Each completed cycle ticks the
//! loop's [`Progress`](watchkeeper::Progress) handle and rewrites the heartbeat file
//! (`--heartbeat PATH`). The watchdog keeper pings systemd at half `WATCHDOG_USEC` only while the
//! loop makes progress.
//!
//! `--hang-after N` simulates a hung loop: after N cycles the loop stops (it waits forever, as a
//! deadlocked call would). The pings stop, the heartbeat goes stale, `STATUS=` names the loop,
//! and the manager's watchdog kills the service.
//!
//! `--cycles N` stops the service cleanly after N cycles. `--start-delay-ms N` simulates a slow
//! initialisation after the loop's first tick: `READY=1` comes N ms later (no watchdog ping goes
//! out before it); with `--extend-start` the start timeout is extended (`EXTEND_TIMEOUT_USEC=`)
//! every second meanwhile, for a start longer than `TimeoutStartSec=`.
//!
//! ```text
//! cargo build --examples
//! wk-fake-manager --watchdog-sec 2 -- target/debug/examples/02_poll_loop --hang-after 15
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use watchkeeper::heartbeat::{HealthStatus, Heartbeat, HeartbeatWriter};
use watchkeeper::logging::{self, LogConfig};
use watchkeeper::{Service, SystemdEnv};

#[derive(Debug, Default)]
struct Args {
    hang_after: Option<u64>,
    cycles: Option<u64>,
    start_delay: Option<Duration>,
    extend_start: bool,
    heartbeat: Option<PathBuf>,
    interval: Option<Duration>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--hang-after" => args.hang_after = Some(value()?.parse().context("--hang-after")?),
            "--heartbeat" => args.heartbeat = Some(value()?.into()),
            "--extend-start" => args.extend_start = true,
            "--cycles" => args.cycles = Some(value()?.parse().context("--cycles")?),
            "--start-delay-ms" => {
                args.start_delay = Some(Duration::from_millis(
                    value()?.parse().context("--start-delay-ms")?,
                ))
            }
            "--interval-ms" => {
                args.interval = Some(Duration::from_millis(
                    value()?.parse().context("--interval-ms")?,
                ))
            }
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let env = SystemdEnv::from_env();
    logging::init(&LogConfig::from_rust_log("poll-loop"), &env)?;
    let service = Service::builder("poll-loop").env(env.clone()).build()?;

    let mut writer = args.heartbeat.map(HeartbeatWriter::open).transpose()?;
    let mut heartbeat =
        Heartbeat::new("poll-loop", &env).with_counters(["cycle_count", "jobs_completed"])?;
    let progress = service.register_loop("poll");
    let stop = service.shutdown_token();
    let lifecycle = service.lifecycle();
    let hang_after = args.hang_after;
    let cycles = args.cycles;
    let controller = service.controller();

    if let Some(delay) = args.start_delay {
        // The loop made its first step; the rest of the start is slow.
        progress.tick();
        let end = tokio::time::Instant::now() + delay;
        while tokio::time::Instant::now() < end {
            if args.extend_start {
                lifecycle.extend_timeout(Duration::from_secs(3)).await?;
            }
            tokio::time::sleep(Duration::from_secs(1).min(end - tokio::time::Instant::now())).await;
        }
    }

    let mut interval = tokio::time::interval(args.interval.unwrap_or(Duration::from_millis(200)));
    service.spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = interval.tick() => {}
            }
            let so_far = heartbeat.counter("cycle_count");
            if Some(so_far) == hang_after {
                tracing::warn!(cycles = so_far, "simulating a hung loop");
                std::future::pending::<()>().await;
            }
            // One unit of (simulated) work. The names were checked by with_counters().
            let _ = heartbeat.add_counter("cycle_count", 1);
            let _ = heartbeat.add_counter("jobs_completed", 1);
            heartbeat.health_status = HealthStatus::Ok;
            heartbeat.touch();
            if let Some(w) = writer.as_mut()
                && let Err(e) = tokio::task::block_in_place(|| w.write(&heartbeat))
            {
                tracing::warn!(error = %e, "heartbeat not written");
            }
            progress.tick();
            let done = heartbeat.counter("cycle_count");
            if Some(done) == cycles {
                tracing::info!(cycles = done, "done; stopping");
                controller.request_shutdown().await;
                break;
            }
            if done % 10 == 0 {
                let _ = lifecycle.status(&format!("polling; {done} cycles"));
            }
        }
        heartbeat.health_status = HealthStatus::Stopping;
        heartbeat.touch();
        if let Some(w) = writer.as_mut() {
            let _ = tokio::task::block_in_place(|| w.write(&heartbeat));
        }
    });

    service.lifecycle().ready_with_status("polling").await?;
    let report = service.run(watchkeeper::service::no_reload).await?;
    tracing::info!(?report, "stopped");
    Ok(())
}
