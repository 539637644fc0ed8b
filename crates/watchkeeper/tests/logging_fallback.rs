//! `logging::init` in a real child process: the test binary re-runs itself with
//! `WK_LOGGING_CHILD=<role>` and its stderr on a pipe the parent reads.
//!
//! In the fallback case the parent plays systemd: it sets `JOURNAL_STREAM` to the `dev:ino` of
//! the pipe it gives the child as stderr. With no journald socket on the machine, the child must
//! fall back to plain stderr without timestamps and say why in one warning.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::io::Errno;
use watchkeeper::SystemdEnv;
use watchkeeper::logging::{self, LogConfig, LogTarget, LoggingError};

const ROLE: &str = "WK_LOGGING_CHILD";
const DEADLINE: Duration = Duration::from_secs(60);
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
const INFO_MARKER: &str = "wk-child-info-event";

// ---------------------------------------------------------------------------------------------
// Parent side.

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `test` in a child with `role`, its stderr on a fresh pipe; `journal` makes the parent
/// announce that pipe in `JOURNAL_STREAM`, as systemd does for `StandardError=journal`.
fn run_child(test: &str, role: &str, journal: bool) -> Output {
    let (err_r, err_w) = rustix::pipe::pipe().unwrap();
    let st = rustix::fs::fstat(&err_w).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"]);
    SystemdEnv::scrub(&mut cmd);
    cmd.env_remove("RUST_LOG")
        .env(ROLE, role)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(err_w));
    if journal {
        cmd.env("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino));
    }
    let mut child = cmd.spawn().unwrap();
    // Close our copy of the write end, or reading stderr never ends.
    drop(cmd);
    let mut out = child.stdout.take().unwrap();
    let stdout: JoinHandle<String> = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let stderr: JoinHandle<String> = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::fs::File::from(err_r).read_to_string(&mut s);
        s
    });
    let (status, exited) = wait_with_deadline(&mut child);
    let out = Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    assert!(
        exited,
        "child still running after {DEADLINE:?}; killed\n{}\n{}",
        out.stdout, out.stderr
    );
    assert!(
        out.status.success() && out.stdout.contains(&format!("WK_CHILD_OK {role}")),
        "child failed: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    out
}

/// Polls a pidfd for the child's exit (no sleeps); kills it after [`DEADLINE`].
fn wait_with_deadline(child: &mut Child) -> (ExitStatus, bool) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).unwrap();
    let end = Instant::now() + DEADLINE;
    let exited = loop {
        let left = end.saturating_duration_since(Instant::now());
        let ts = rustix::time::Timespec {
            tv_sec: i64::try_from(left.as_secs()).unwrap(),
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut fds = [rustix::event::PollFd::new(
            &pidfd,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(n) => break n > 0,
            Err(Errno::INTR) => continue,
            Err(e) => panic!("poll(pidfd): {e}"),
        }
    };
    if !exited {
        let _ = child.kill();
    }
    (child.wait().unwrap(), exited)
}

fn info_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.contains(INFO_MARKER))
        .unwrap_or_else(|| panic!("no info line in child stderr:\n{stderr}"))
}

#[test]
fn parent_journal_unreachable_falls_back_to_plain_stderr() {
    let out = run_child("child_journal_fallback", "fallback", true);
    if Path::new(JOURNAL_SOCKET).exists() {
        // journald is running here: the child logged natively, nothing to see on stderr.
        assert!(out.stdout.contains("target=Journald"), "{}", out.stdout);
        return;
    }
    assert!(
        out.stdout.contains("target=Stderr { timestamps: false }"),
        "{}",
        out.stdout
    );
    let warnings: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("native journald logging unavailable"))
        .collect();
    assert_eq!(warnings.len(), 1, "exactly one warning:\n{}", out.stderr);
    // The reason is given: the socket is missing.
    assert!(
        warnings[0].contains("No such file or directory"),
        "{}",
        warnings[0]
    );
    let info = info_line(&out.stderr);
    assert!(
        info.trim_start().starts_with("INFO"),
        "no timestamp expected (the journal adds one): {info:?}"
    );
    assert!(!out.stderr.contains('\u{1b}'), "no ANSI on a pipe");
}

#[test]
fn parent_plain_stderr_has_timestamps() {
    let out = run_child("child_plain", "plain", false);
    assert!(
        out.stdout.contains("target=Stderr { timestamps: true }"),
        "{}",
        out.stdout
    );
    let info = info_line(&out.stderr);
    assert!(
        info.starts_with(|c: char| c.is_ascii_digit()),
        "timestamp expected: {info:?}"
    );
    assert!(!out.stderr.contains("journald"), "{}", out.stderr);
    assert!(!out.stderr.contains('\u{1b}'), "no ANSI on a pipe");
}

// ---------------------------------------------------------------------------------------------
// Child side: each returns at once unless it is the role this process was started for.

fn is_role(role: &str) -> bool {
    std::env::var_os(ROLE).is_some_and(|r| r == role)
}

/// `init`, a log event, then a second `init` that must be refused.
fn init_log_and_report(env: &SystemdEnv) -> LogTarget {
    let target = logging::init(&LogConfig::new("wk-logging-test"), env).unwrap();
    tracing::info!("{INFO_MARKER}");
    let again = logging::init(&LogConfig::new("wk-logging-test"), env);
    assert!(
        matches!(again, Err(LoggingError::AlreadyInitialized { .. })),
        "{again:?}"
    );
    target
}

#[test]
fn child_journal_fallback() {
    if !is_role("fallback") {
        return;
    }
    let env = SystemdEnv::from_env();
    assert!(
        logging::stderr_is_journal(&env),
        "JOURNAL_STREAM set by the parent must match the inherited stderr: {:?}",
        env.journal_stream()
    );
    assert_eq!(logging::choose_target(&env), LogTarget::Journald);
    let target = init_log_and_report(&env);
    if !Path::new(JOURNAL_SOCKET).exists() {
        assert_eq!(target, LogTarget::Stderr { timestamps: false });
    }
    println!("target={target:?}");
    println!("WK_CHILD_OK fallback");
}

#[test]
fn child_plain() {
    if !is_role("plain") {
        return;
    }
    let env = SystemdEnv::from_env();
    assert!(!logging::stderr_is_journal(&env));
    let target = init_log_and_report(&env);
    assert_eq!(target, LogTarget::Stderr { timestamps: true });
    println!("target={target:?}");
    println!("WK_CHILD_OK plain");
}
