//! `wk-fake-manager`: run a service under a fake systemd manager and watch what it says.
//!
//! ```text
//! wk-fake-manager [--watchdog-sec S] [--start-timeout-sec S] [--stop-timeout-sec S]
//!                 [--runtime-max-sec S] [--reload-after S]... [--stop-after S]
//!                 [--notify-socket PATH] -- COMMAND [ARGS]...
//! ```
//!
//! The command runs as the main process of a `Type=notify` unit with these settings, under
//! `watchkeeper_testkit::FakeManager` and its model of systemd 252. Every datagram and every
//! action of the manager is printed as it happens; the exit status tells the unit's `Result=`:
//! 0 `success`, 3 `exit-code`, 4 `signal`, 5 `core-dump`, 6 `watchdog`, 7 `timeout`,
//! 8 `protocol`, 9 the protocol checks failed on a successful run, 10 the service sent
//! something the fake does not model, 2 an error of `wk-fake-manager` itself.
//!
//! Install with `cargo install --path crates/watchkeeper-testkit`.

// The only place this program exits; everything else returns errors.

#[doc(hidden)]
mod run;

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let opts = run::Options::parse();
    match run::run(&opts) {
        Ok(outcome) => outcome.exit_code(),
        Err(e) => {
            eprintln!("wk-fake-manager: error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
