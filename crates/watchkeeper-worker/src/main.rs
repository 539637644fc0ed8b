//! `watchkeeper-worker`: parses the options, runs [`watchkeeper_worker::run`] and turns its
//! error into an exit code (78 for a configuration to fix, 1 otherwise).

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use watchkeeper_worker::{Options, WorkerError, run};

fn main() -> ExitCode {
    let code = match Options::try_parse() {
        // Usage errors (2), and --help/--version (0).
        Err(usage) => {
            let _ = usage.print();
            u8::try_from(usage.exit_code()).unwrap_or(2)
        }
        Ok(opts) => match serve(opts) {
            Ok(()) => 0,
            Err((code, error)) => {
                let line = watchkeeper_worker::chain(error.as_ref());
                eprintln!("watchkeeper-worker: {line}");
                code
            }
        },
    };
    ExitCode::from(code)
}

fn serve(opts: Options) -> Result<(), (u8, anyhow::Error)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
        .map_err(|e| (1, e))?;
    runtime
        .block_on(run(opts))
        .map_err(|e: WorkerError| (e.exit_code(), e.into()))
}
