//! # Scenario: reload the configuration on SIGHUP
//!
//! `systemctl reload` (or `kill -HUP`) asks the service to re-read its configuration. The
//! service answers `RELOADING=1` with `MONOTONIC_USEC=` right away, re-reads the file given
//! with `--config PATH` (one line: a greeting), and sends `READY=1` when done. A file that
//! cannot be read or is empty fails the reload: the old configuration stays, the failure shows
//! in `STATUS=`, and `READY=1` still follows so that the manager does not wait forever.
//!
//! ```text
//! echo hello > /tmp/greeting
//! wk-fake-manager --reload-after 1 --stop-after 2 -- target/debug/examples/03_reload --config /tmp/greeting
//! ```

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use watchkeeper::logging::{self, LogConfig};
use watchkeeper::{Service, SystemdEnv};

fn load(path: &PathBuf) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let line = text.lines().next().unwrap_or_default().trim().to_owned();
    if line.is_empty() {
        return Err(format!("{}: empty configuration", path.display()));
    }
    Ok(line)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path: PathBuf = std::env::args()
        .skip_while(|a| a != "--config")
        .nth(1)
        .context("usage: 03_reload --config PATH")?
        .into();
    let env = SystemdEnv::from_env();
    logging::init(&LogConfig::from_rust_log("reload"), &env)?;
    let service = Service::builder("reload").env(env).build()?;
    let config = Arc::new(Mutex::new(load(&path).map_err(anyhow::Error::msg)?));

    let lifecycle = service.lifecycle();
    let greeting = config.lock().map(|c| c.clone()).unwrap_or_default();
    lifecycle
        .ready_with_status(&format!("config: {greeting}"))
        .await?;

    let report = service
        .run(|| {
            let (config, path, lifecycle) = (config.clone(), path.clone(), lifecycle.clone());
            async move {
                let new = load(&path)?;
                tracing::info!(config = %new, "configuration reloaded");
                if let Ok(mut c) = config.lock() {
                    *c = new.clone();
                }
                lifecycle
                    .status(&format!("config: {new}"))
                    .map_err(|e| e.to_string())?;
                Ok::<(), String>(())
            }
        })
        .await?;
    tracing::info!(?report, "stopped");
    Ok(())
}
