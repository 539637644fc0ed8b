//! # Scenario: a bounded graceful stop
//!
//! On `SIGTERM` the service sends `STOPPING=1`, stops taking new work and lets in-flight jobs
//! finish, but only within `--stop-timeout-ms` (default 5000; `none` for no bound): a job that
//! takes longer is not waited for, and the service exits non-zero so that the unit shows the
//! failed stop, naming the jobs that did not finish. While it waits it sends
//! `EXTEND_TIMEOUT_USEC=` so that a manager with a shorter `TimeoutStopSec=` knows it is still
//! making its way out.
//!
//! Each of `--jobs N` (default 3) workers takes `--job-ms` (default 1500) to finish its job
//! after the stop request.
//!
//! ```text
//! wk-fake-manager --stop-after 1 --stop-timeout-sec 1 -- target/debug/examples/04_graceful_stop --job-ms 2500
//! ```

use std::time::Duration;

use anyhow::Context as _;
use watchkeeper::logging::{self, LogConfig};
use watchkeeper::{Service, SystemdEnv};

fn flag(name: &str, default: u64) -> anyhow::Result<u64> {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .map(|v| v.parse().with_context(|| format!("{name} {v:?}")))
        .transpose()
        .map(|v| v.unwrap_or(default))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let jobs = flag("--jobs", 3)?;
    let job = Duration::from_millis(flag("--job-ms", 1500)?);
    // `--stop-timeout-ms none`: no bound at all.
    let stop_timeout = if std::env::args().any(|a| a == "none") {
        Duration::MAX
    } else {
        Duration::from_millis(flag("--stop-timeout-ms", 5000)?)
    };
    let env = SystemdEnv::from_env();
    logging::init(&LogConfig::from_rust_log("graceful-stop"), &env)?;
    let service = Service::builder("graceful-stop")
        .env(env)
        .stop_timeout(stop_timeout)
        .build()?;

    for n in 0..jobs {
        let stop = service.shutdown_token();
        let progress = service.register_loop(format!("job-{n}"));
        // Named: a stop that times out says which jobs it waited for in vain.
        service.spawn_named(format!("job-{n}"), async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = tick.tick() => progress.tick(),
                }
            }
            tracing::info!(job = n, "finishing in-flight work");
            tokio::time::sleep(job).await;
            tracing::info!(job = n, "done");
        });
    }
    service
        .lifecycle()
        .ready_with_status(&format!("{jobs} workers busy"))
        .await?;
    let report = service.run(watchkeeper::service::no_reload).await?;
    tracing::info!(drained_in = ?report.drained_in, "stopped gracefully");
    Ok(())
}
