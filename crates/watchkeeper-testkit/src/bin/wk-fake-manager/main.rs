//! `wk-fake-manager`: run a service under a fake systemd manager and watch what it says.
//!
//! The only place this program exits; everything else returns errors.

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
