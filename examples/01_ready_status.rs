//! # Scenario: a slow start, then ready with a status line
//!
//! A service that needs a while to start (loading a cache, replaying a log) tells systemd to
//! wait longer with `EXTEND_TIMEOUT_USEC=` instead of raising `TimeoutStartSec=` for everyone,
//! reports what it is doing in `STATUS=`, and sends `READY=1` only once it can really serve.
//! Then it idles until `SIGTERM`, which it answers with `STOPPING=1` and a clean exit.
//!
//! A `SIGTERM` during the warm-up is a clean stop too: the warm-up ends early, `ready` sends
//! nothing (it returns `Delivery::Stopping`), `run` completes the stop, and the exit code is 0,
//! as systemd expects from a unit stopped while it was starting.
//!
//! ```text
//! cargo build --examples
//! wk-fake-manager --start-timeout-sec 1 --stop-after 1 -- target/debug/examples/01_ready_status --start-secs 3
//! ```

use std::time::Duration;

use watchkeeper::logging::{self, LogConfig};
use watchkeeper::{Service, SystemdEnv};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let start_secs: u64 = std::env::args()
        .skip_while(|a| a != "--start-secs")
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1);
    let env = SystemdEnv::from_env();
    logging::init(&LogConfig::from_rust_log("ready-status"), &env)?;
    let service = Service::builder("ready-status").env(env).build()?;
    let lifecycle = service.lifecycle();
    let stop = service.shutdown_token();

    for step in 1..=start_secs {
        lifecycle.status(&format!("warming up: step {step} of {start_secs}"))?;
        // Each step promises the next message within two seconds.
        lifecycle.extend_timeout(Duration::from_secs(2)).await?;
        tokio::select! {
            // Asked to stop: no need to finish warming up.
            () = stop.cancelled() => break,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    // Sends nothing and returns Ok(Delivery::Stopping) if a stop came first; `run` then
    // completes the stop.
    lifecycle.ready_with_status("ready; idle").await?;
    tracing::info!("ready");

    let report = service.run(watchkeeper::service::no_reload).await?;
    tracing::info!(?report, "bye");
    Ok(())
}
