//! Running one job's command: no shell, no supervision variables, bounded by its timeout.

use std::os::unix::process::ExitStatusExt as _;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use rustix::process::{Pid, Signal};
use tokio::io::AsyncWrite;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use watchkeeper::SystemdEnv;
use watchkeeper_jobs::JobSpec;

use crate::secrets::{self, Redactor, Secret};

/// What a job is told about itself, in its environment: `WK_JOB_ID`, `WK_JOB_ATTEMPT` and
/// `WK_WORKER`, so that it can make its effects idempotent (a job runs at least once, and may
/// run again after a worker is lost).
#[derive(Debug)]
pub(crate) struct JobContext {
    pub(crate) id: u64,
    pub(crate) attempt: u32,
    pub(crate) worker: String,
    /// The credentials it asked for, handed to it as files (see [`crate::secrets`]).
    pub(crate) secrets: Vec<Secret>,
}

/// How long the job's redacted output is still copied after the job ended (a process it left
/// behind may hold the pipe open).
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// The names of the variables a job gets from [`JobContext`].
pub(crate) const ENV_JOB_ID: &str = "WK_JOB_ID";
pub(crate) const ENV_JOB_ATTEMPT: &str = "WK_JOB_ATTEMPT";
pub(crate) const ENV_WORKER: &str = "WK_WORKER";

/// How a job's command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum JobEnd {
    /// It exited with this code.
    Exited(i32),
    /// A signal we did not send ended it.
    Signaled(i32),
    /// It ran past its `timeout_secs` and was killed.
    TimedOut(Duration),
    /// The worker is stopping and killed it after the grace period: the job is to be released.
    Stopped,
    /// It could not be started (e.g. the program does not exist).
    NotStarted(String),
}

impl JobEnd {
    /// The exit code for `complete`: `None` unless the command exited by itself.
    pub(crate) fn exit_code(&self) -> Option<i32> {
        match self {
            JobEnd::Exited(code) => Some(*code),
            _ => None,
        }
    }

    fn from_status(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => JobEnd::Exited(code),
            (None, Some(sig)) => JobEnd::Signaled(sig),
            // Neither: not possible for a waited-for child on Linux.
            (None, None) => JobEnd::Signaled(0),
        }
    }
}

impl std::fmt::Display for JobEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobEnd::Exited(code) => write!(f, "exited with code {code}"),
            JobEnd::Signaled(sig) => write!(f, "killed by signal {sig}"),
            JobEnd::TimedOut(after) => write!(f, "killed after its timeout of {after:?}"),
            JobEnd::Stopped => f.write_str("killed because the worker is stopping"),
            JobEnd::NotStarted(why) => write!(f, "not started: {why}"),
        }
    }
}

/// Runs `spec` to its end: `command[0]` with the rest as arguments (no shell), stdin from
/// `/dev/null`, without the supervision variables (`NOTIFY_SOCKET`, `WATCHDOG_*`, …) but with
/// the [`JobContext`] ones, in a process group of its own so that a timeout or a stop kills
/// whatever it started, too. Cancelling `stop` kills it.
///
/// A job with credentials gets each as a private file (its path in `WK_CREDENTIAL_<NAME>`),
/// and its stdout and stderr go through pipes that redact the secrets, to the worker's own.
pub(crate) async fn run(spec: JobSpec, ctx: JobContext, stop: CancellationToken) -> JobEnd {
    run_with_output(spec, ctx, stop, tokio::io::stdout(), tokio::io::stderr()).await
}

/// [`run`], with the redacted output of a job with credentials written to `out` and `err`.
pub(crate) async fn run_with_output<O, E>(
    spec: JobSpec,
    ctx: JobContext,
    stop: CancellationToken,
    out: O,
    err: E,
) -> JobEnd
where
    O: AsyncWrite + Unpin + Send + 'static,
    E: AsyncWrite + Unpin + Send + 'static,
{
    let Some((program, args)) = spec.command.split_first() else {
        return JobEnd::NotStarted("empty command".into());
    };
    let mut cmd = Command::new(program);
    cmd.args(args);
    SystemdEnv::scrub(cmd.as_std_mut());
    cmd.env(ENV_JOB_ID, ctx.id.to_string())
        .env(ENV_JOB_ATTEMPT, ctx.attempt.to_string())
        .env(ENV_WORKER, &ctx.worker);
    // Removed when this function returns, after the job ended.
    let files = if ctx.secrets.is_empty() {
        None
    } else {
        match secrets::JobFiles::write(&std::env::temp_dir(), ctx.id, &ctx.secrets) {
            Ok(files) => {
                for (var, path) in &files.env {
                    cmd.env(var, path);
                }
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
                Some(files)
            }
            Err(e) => {
                return JobEnd::NotStarted(format!(
                    "cannot write its credentials under {}: {e}",
                    std::env::temp_dir().display()
                ));
            }
        }
    };
    cmd.stdin(Stdio::null())
        .process_group(0)
        // If this task is dropped (the runtime shuts down), the command does not outlive it.
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return JobEnd::NotStarted(format!("cannot start {program:?}: {e}")),
    };
    let mut pumps = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        let redactor = Redactor::new(&ctx.secrets);
        pumps.push(tokio::spawn(secrets::pump(stdout, out, redactor)));
    }
    if let Some(stderr) = child.stderr.take() {
        let redactor = Redactor::new(&ctx.secrets);
        pumps.push(tokio::spawn(secrets::pump(stderr, err, redactor)));
    }
    let limit = Duration::from_secs(spec.timeout_secs);
    let end = supervise(&mut child, program, limit, &stop).await;
    let drained = async {
        for pump in pumps {
            let _ = pump.await;
        }
    };
    if tokio::time::timeout(OUTPUT_DRAIN, drained).await.is_err() {
        tracing::debug!(
            job = ctx.id,
            "the job's output is still open after it ended"
        );
    }
    drop(files);
    end
}

/// Waits for `child` to end, killing its group when `limit` passes or `stop` is cancelled. An
/// exit that happened before the kill counts: a job that succeeded is reported as such, not
/// as `Stopped` (which would release it to run again elsewhere) nor as `TimedOut`.
async fn supervise(
    child: &mut Child,
    program: &str,
    limit: Duration,
    stop: &CancellationToken,
) -> JobEnd {
    let waited = |status: std::io::Result<ExitStatus>| match status {
        Ok(status) => JobEnd::from_status(status),
        Err(e) => JobEnd::NotStarted(format!("cannot wait for {program:?}: {e}")),
    };
    let end = tokio::select! {
        // The child's exit first: when it already exited, it wins over a kill that is also due.
        biased;
        status = child.wait() => return waited(status),
        () = tokio::time::sleep(limit) => JobEnd::TimedOut(limit),
        () = stop.cancelled() => JobEnd::Stopped,
    };
    // It may have exited since it was last polled: then there is nothing to kill.
    match child.try_wait() {
        Ok(Some(status)) => return JobEnd::from_status(status),
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, "checking whether the job exited"),
    }
    kill_group(child).await;
    end
}

/// `SIGKILL` to the child's process group, then reaps the child. The child is not reaped before
/// the signal, so its pid (the group's id) cannot have been reused.
async fn kill_group(child: &mut Child) {
    let group = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(Pid::from_raw);
    let killed = group.is_some_and(|pgid| {
        rustix::process::kill_process_group(pgid, Signal::KILL)
            .inspect_err(|e| tracing::debug!(error = %e, "killing the job's process group"))
            .is_ok()
    });
    if !killed {
        let _ = child.start_kill();
    }
    if let Err(e) = child.wait().await {
        tracing::warn!(error = %e, "cannot reap a killed job");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> JobContext {
        JobContext {
            id: 42,
            attempt: 3,
            worker: "w1".into(),
            secrets: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_credential_is_a_private_file_and_redacted_from_the_output() {
        let creds_dir = tempfile::tempdir().unwrap();
        std::fs::write(creds_dir.path().join("github-token"), b"ghp_s3cr3t\n").unwrap();
        let creds = watchkeeper::credentials::Credentials::new(Some(creds_dir.path().into()));
        let secrets = secrets::read(&creds, &["github-token".into()]).unwrap();
        let report = tempfile::tempdir().unwrap();
        let script = r#"
            f="$WK_CREDENTIAL_GITHUB_TOKEN"
            echo "token: $(cat "$f")"
            echo "on stderr: $(cat "$f")" >&2
            stat -c %a "$f" "$(dirname "$f")" > "$1/modes"
            echo "$f" > "$1/path"
            { env; echo "$@"; } > "$1/env"
            exit 4
        "#;
        let (out_w, mut out_r) = tokio::io::duplex(1 << 16);
        let (err_w, mut err_r) = tokio::io::duplex(1 << 16);
        let end = run_with_output(
            spec(
                &["sh", "-c", script, "sh", report.path().to_str().unwrap()],
                10,
            ),
            JobContext { secrets, ..ctx() },
            CancellationToken::new(),
            out_w,
            err_w,
        )
        .await;
        assert_eq!(end, JobEnd::Exited(4));
        let mut out = String::new();
        let mut err = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut out_r, &mut out)
            .await
            .unwrap();
        tokio::io::AsyncReadExt::read_to_string(&mut err_r, &mut err)
            .await
            .unwrap();
        // The job could read it; its output does not show it.
        assert_eq!(out, "token: [redacted]\n");
        assert_eq!(err, "on stderr: [redacted]\n");
        let read = |name: &str| std::fs::read_to_string(report.path().join(name)).unwrap();
        assert_eq!(read("modes"), "600\n700\n");
        let env = read("env");
        assert!(!env.contains("ghp_s3cr3t"), "{env}");
        assert!(env.contains("WK_CREDENTIAL_GITHUB_TOKEN=/"), "{env}");
        // The file and its directory are gone once the job ended.
        let path = std::path::PathBuf::from(read("path").trim_end());
        assert!(
            !path.exists() && !path.parent().unwrap().exists(),
            "{path:?}"
        );
    }

    #[tokio::test]
    async fn the_job_knows_its_id_attempt_and_worker() {
        let end = run(
            spec(
                &[
                    "sh",
                    "-c",
                    r#"test "$WK_JOB_ID:$WK_JOB_ATTEMPT:$WK_WORKER" = 42:3:w1 && exit 9"#,
                ],
                10,
            ),
            ctx(),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(end, JobEnd::Exited(9));
    }

    fn spec(cmd: &[&str], timeout_secs: u64) -> JobSpec {
        JobSpec {
            command: cmd.iter().map(|s| s.to_string()).collect(),
            timeout_secs,
        }
    }

    #[tokio::test]
    async fn exit_codes_and_signals_are_reported() {
        let never = CancellationToken::new();
        assert_eq!(
            run(spec(&["sh", "-c", "exit 3"], 10), ctx(), never.clone()).await,
            JobEnd::Exited(3)
        );
        assert_eq!(
            run(
                spec(&["sh", "-c", "kill -TERM $$"], 10),
                ctx(),
                never.clone()
            )
            .await,
            JobEnd::Signaled(15)
        );
        let end = run(spec(&["/nonexistent/program"], 10), ctx(), never).await;
        assert!(
            matches!(&end, JobEnd::NotStarted(why) if why.contains("/nonexistent/program")),
            "{end:?}"
        );
        assert_eq!(end.exit_code(), None);
    }

    #[tokio::test]
    async fn arguments_reach_the_program_without_a_shell() {
        // The argument is passed as is: no shell expands it.
        let end = run(
            spec(
                &["sh", "-c", "test \"$0\" = '$HOME' && exit 7", "$HOME"],
                10,
            ),
            ctx(),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(end, JobEnd::Exited(7));
    }

    #[tokio::test]
    async fn stop_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(spec(&["sh", "-c", &script], 60), ctx(), stop.clone()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let pid: i32 = loop {
            if let Ok(s) = std::fs::read_to_string(&pidfile)
                && let Ok(p) = s.trim().parse()
            {
                break p;
            }
            assert!(tokio::time::Instant::now() < deadline, "no pid file");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        stop.cancel();
        assert_eq!(task.await.unwrap(), JobEnd::Stopped);
        // The grandchild got SIGKILL too: gone, or a zombie until init reaps it.
        wait_dead(pid).await;
    }

    /// Spawns `cmd` as `run` does and waits until it has exited, unreaped (a zombie).
    async fn exited_child(cmd: &str) -> Child {
        let child = Command::new("sh")
            .args(["-c", cmd])
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !is_zombie(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "pid {pid} did not exit"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        child
    }

    #[tokio::test]
    async fn an_exit_before_the_stop_counts() {
        // Without `biased`, the cancelled stop wins about two times out of three.
        for _ in 0..20 {
            let mut child = exited_child("exit 0").await;
            let stop = CancellationToken::new();
            stop.cancel();
            let end = supervise(&mut child, "sh", Duration::from_secs(60), &stop).await;
            assert_eq!(end, JobEnd::Exited(0));
        }
    }

    fn is_zombie(stat: &str) -> bool {
        stat.rsplit(')')
            .next()
            .unwrap()
            .trim_start()
            .starts_with('Z')
    }

    async fn wait_dead(pid: i32) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => return,
                Ok(stat)
                    if stat
                        .rsplit(')')
                        .next()
                        .unwrap()
                        .trim_start()
                        .starts_with('Z') =>
                {
                    return;
                }
                Ok(_) => {}
            }
            assert!(tokio::time::Instant::now() < deadline, "pid {pid} alive");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
