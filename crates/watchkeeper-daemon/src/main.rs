//! `watchkeeper-daemon`: the durable job broker. See the library's documentation and
//! `PROTOCOL.md`; this file only parses the options, runs the daemon and maps its error to an
//! exit code.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser as _;
use watchkeeper_daemon::{Options, run};

/// How long the runtime may take, after the graceful stop, for blocking store calls to end.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let opts = Options::parse();
    match serve(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, error)) => {
            // One line, each cause once (anyhow's `{:#}` repeats a cause that an error's own
            // message already includes).
            eprintln!("watchkeeper-daemon: {error}");
            ExitCode::from(code)
        }
    }
}

fn serve(opts: Options) -> Result<(), (u8, String)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| (1, format!("cannot start the tokio runtime: {e}")))?;
    let result = runtime.block_on(run(opts));
    // A wedged database call must not keep a stopped daemon alive.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    result.map_err(|e| (e.exit_code(), watchkeeper_daemon::error_chain(&e)))
}
