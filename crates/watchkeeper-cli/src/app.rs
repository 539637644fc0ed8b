//! Dispatch and the exit code.

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};

use crate::cli::{Cli, Command};
use crate::{backup, doctor, exit, install, metrics, probe, status};

pub(crate) fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("watchkeeper: {e:#}");
            ExitCode::from(exit::code_of(&e))
        }
    }
}

fn run(cmd: Command) -> anyhow::Result<u8> {
    match cmd {
        Command::Status(a) => status::run(&a),
        Command::Probe(a) => probe::run(&a),
        Command::Metrics(a) => metrics::run(&a),
        Command::Backup(a) => backup::backup(&a),
        Command::Restore(a) => backup::restore(&a),
        Command::Doctor(a) => doctor::run(&a),
        Command::Install(a) => install::install(&a),
        Command::Uninstall(a) => install::uninstall(&a),
        Command::Rollback(a) => install::rollback(&a),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "watchkeeper",
                &mut std::io::stdout(),
            );
            Ok(exit::OK)
        }
    }
}
