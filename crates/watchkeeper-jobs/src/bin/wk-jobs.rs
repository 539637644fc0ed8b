//! `wk-jobs`: talk to the watchkeeper daemon: submit jobs, read stats, ping.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use watchkeeper_jobs::{Client, DEFAULT_JOB_TIMEOUT_SECS, JobSpec};

#[derive(Debug, clap::Parser)]
#[command(
    version,
    about = "Submit jobs to the watchkeeper daemon and read its counts"
)]
struct Options {
    /// The daemon's socket.
    #[arg(long, env = "WATCHKEEPER_SOCKET")]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Check that the daemon answers; prints its version.
    Ping,
    /// Queue a command (program and arguments, no shell); prints the job id.
    Submit {
        /// Kill the command after this many seconds.
        #[arg(long, default_value_t = DEFAULT_JOB_TIMEOUT_SECS)]
        timeout_secs: u64,
        /// Program and arguments.
        #[arg(required = true, trailing_var_arg = true)]
        command: Vec<String>,
    },
    /// Queue a job given as raw JSON (also malformed ones, to exercise quarantine).
    SubmitJson {
        /// The job as JSON.
        json: String,
    },
    /// Print the counts by state as JSON.
    Stats,
    /// Make the daemon re-read its configuration; returns once it has (for `ExecReload=`).
    Reload,
}

async fn run(opts: Options) -> anyhow::Result<()> {
    // Bad input is refused before connecting.
    let raw_job: Option<serde_json::Value> = match &opts.command {
        Command::SubmitJson { json } => {
            Some(serde_json::from_str(json).context("the job is not JSON")?)
        }
        _ => None,
    };
    let mut client = Client::connect(&opts.socket).await?;
    match opts.command {
        Command::Ping => println!("{}", client.ping().await?),
        Command::Submit {
            timeout_secs,
            command,
        } => {
            let spec = JobSpec {
                command,
                timeout_secs,
            };
            println!("{}", client.submit(spec.to_value()).await?);
        }
        Command::SubmitJson { .. } => {
            let value = raw_job.unwrap_or_default();
            println!("{}", client.submit(value).await?);
        }
        Command::Stats => println!("{}", serde_json::to_string(&client.stats().await?)?),
        Command::Reload => client.reload().await?,
    }
    Ok(())
}

fn main() -> ExitCode {
    let opts = Options::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wk-jobs: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wk-jobs: {e:#}");
            ExitCode::FAILURE
        }
    }
}
