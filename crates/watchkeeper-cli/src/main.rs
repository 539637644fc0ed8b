//! `watchkeeper`: the operator's tool. The subcommands live in their own modules; this file
//! only parses the command line and turns the outcome into the documented exit code
//! ([`exit`]).

mod app;
mod backup;
mod cli;
mod doctor;
mod exit;
mod hb;
mod install;
mod layout;
mod metrics;
mod probe;
mod status;
mod systemd;

fn main() -> std::process::ExitCode {
    app::main()
}
