//! The real `watchkeeper-daemon` binary as a child process under a fake systemd manager: start
//! and READY, durability across `kill -9`, SIGTERM, SIGHUP reloads, lease expiry, socket
//! activation, and the watchdog gated on the store.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::io::FdFlags;
use rustix::process::{Pid, Signal};
use serde_json::json;
use watchkeeper_daemon::store::{JobState, Store};
use watchkeeper_jobs::{Client, ClientError, Stats};
use watchkeeper_testkit::FakeManager;

/// Generous bound for anything a test waits for; reached only when something is broken.
const DEADLINE: Duration = Duration::from_secs(20);
const EXE: &str = env!("CARGO_BIN_EXE_watchkeeper-daemon");
/// Variables the daemon reads that the test's own environment must not leak in.
const OWN_VARS: [&str; 7] = [
    "RUNTIME_DIRECTORY",
    "STATE_DIRECTORY",
    "WATCHKEEPER_SOCKET",
    "WATCHKEEPER_STATE_DIR",
    "WATCHKEEPER_CONFIG",
    "WATCHKEEPER_SOCKET_GROUP",
    "WATCHKEEPER_ALLOW_UIDS",
];

/// A tempdir with the daemon's paths.
struct Dirs {
    dir: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Self {
        Dirs {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn socket(&self) -> PathBuf {
        self.dir.path().join("run/daemon.sock")
    }
    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    fn config(&self) -> PathBuf {
        self.dir.path().join("daemon.toml")
    }
    fn write_config(&self, text: &str) {
        std::fs::write(self.config(), text).unwrap();
    }
    /// `--socket`, `--state-dir` and `--config`.
    fn args(&self) -> Vec<PathBuf> {
        vec![
            "--socket".into(),
            self.socket(),
            "--state-dir".into(),
            self.state(),
            "--config".into(),
            self.config(),
        ]
    }
}

/// The daemon as a child; killed on drop. Its stderr goes to a file, read on failure.
struct Daemon {
    child: Child,
    stderr: PathBuf,
}

impl Daemon {
    fn command(manager: &FakeManager, program: &str, watchdog: Option<Duration>) -> Command {
        let mut cmd = manager.command(program, watchdog);
        for var in OWN_VARS {
            cmd.env_remove(var);
        }
        cmd.env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        cmd
    }

    fn spawn(mut cmd: Command, dirs: &Dirs) -> Daemon {
        let n = std::fs::read_dir(dirs.dir.path()).unwrap().count();
        let stderr = dirs.dir.path().join(format!("stderr.{n}.log"));
        cmd.stderr(std::fs::File::create(&stderr).unwrap());
        Daemon {
            child: cmd.spawn().unwrap(),
            stderr,
        }
    }

    fn start(
        manager: &FakeManager,
        dirs: &Dirs,
        args: &[&OsStr],
        watchdog: Option<Duration>,
    ) -> Daemon {
        let mut cmd = Self::command(manager, EXE, watchdog);
        cmd.args(dirs.args()).args(args);
        Self::spawn(cmd, dirs)
    }

    fn signal(&self, sig: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap()).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for the exit, up to [`DEADLINE`], on a pidfd (no sleeps); returns the status and
    /// stderr.
    fn wait(mut self) -> (ExitStatus, String) {
        let Some(status) = watchkeeper_testkit::wait_exit(&mut self.child, DEADLINE).unwrap()
        else {
            panic!(
                "the daemon did not exit within {DEADLINE:?}:\n{}",
                self.log()
            )
        };
        let log = self.log();
        (status, log)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Polls `stats` until `done` holds, within [`DEADLINE`]: for changes only the daemon's own
/// timers make (lease expiry), which send nothing to wait on.
async fn wait_for_stats(client: &mut Client, what: &str, done: impl Fn(&Stats) -> bool) -> Stats {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let stats = client.stats().await.unwrap();
        if done(&stats) {
            return stats;
        }
        assert!(tokio::time::Instant::now() < end, "{what}: still {stats:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const EMPTY: &str = "queued 0, claimed 0, completed 0, failed 0, denied 0, quarantined 0";

#[test]
fn ready_only_once_the_socket_answers_with_counts_in_status_then_sigterm_stops_cleanly() {
    let dirs = Dirs::new();
    dirs.write_config("status_interval_secs = 1\n");
    let manager = FakeManager::start().unwrap();
    let spawned_at = manager.elapsed();
    let daemon = Daemon::start(&manager, &dirs, &[], Some(Duration::from_secs(2)));
    let ready = manager.wait_ready(DEADLINE).unwrap();
    let rt = runtime();
    // Connect at once, no retry: READY=1 promises the socket answers.
    let mut client = rt
        .block_on(Client::connect(dirs.socket()))
        .unwrap_or_else(|e| panic!("connect right after READY=1: {e}\n{}", daemon.log()));
    eprintln!(
        "startup to READY=1: {:?} (spawn at {:?}, READY at {:?})",
        ready.at.saturating_sub(spawned_at),
        spawned_at,
        ready.at
    );
    assert_eq!(ready.get("STATUS"), Some(EMPTY));
    assert_eq!(ready.pid, Some(daemon.child.id()));
    assert!(rt.block_on(client.ping()).is_ok());

    // The socket and the store: private.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dirs.socket()), 0o600);
    assert_eq!(mode(&dirs.state()), 0o700);
    assert_eq!(mode(dirs.socket().parent().unwrap()), 0o700);

    // The watchdog pings while idle: both loops tick.
    let since = manager.len();
    manager.wait_ping_since(since, DEADLINE).unwrap();
    let ping = manager.wait_ping_since(manager.len(), DEADLINE).unwrap();
    assert!(ping.seq > since);

    // STATUS= follows the counts.
    let since = manager.len();
    for i in 0..3 {
        rt.block_on(client.submit(json!({ "i": i }))).unwrap();
    }
    let queued = "queued 3, claimed 0, completed 0, failed 0, denied 0, quarantined 0";
    manager
        .wait_for_since(since, "STATUS with 3 queued", DEADLINE, |r| {
            r.get("STATUS") == Some(queued)
        })
        .unwrap();

    // SIGTERM with a connection open: STOPPING=1, exit 0, the socket file removed.
    daemon.signal(Signal::TERM);
    manager.wait_stopping(DEADLINE).unwrap();
    let (status, log) = daemon.wait();
    assert!(status.success(), "{status}\n{log}");
    manager.wait_stopping(DEADLINE).unwrap();
    manager.check_stopped_cleanly().unwrap();
    assert!(
        matches!(
            rt.block_on(client.ping()),
            Err(ClientError::Closed { .. } | ClientError::Io { .. })
        ),
        "the connection outlived the daemon"
    );
    assert!(!dirs.socket().exists(), "socket file left behind");
    assert!(log.contains("stopped"), "{log}");
}

#[test]
fn acknowledged_jobs_survive_kill_9() {
    let dirs = Dirs::new();
    dirs.write_config("");
    let manager = FakeManager::start().unwrap();
    let daemon = Daemon::start(&manager, &dirs, &[], None);
    manager.wait_ready(DEADLINE).unwrap();
    let rt = runtime();
    let mut client = rt.block_on(Client::connect(dirs.socket())).unwrap();
    let mut acked = BTreeSet::new();
    for i in 0..50 {
        acked.insert(rt.block_on(client.submit(json!({ "n": i }))).unwrap());
    }
    // Right after the last acknowledgement.
    daemon.signal(Signal::KILL);
    let (status, log) = daemon.wait();
    assert_eq!(status.signal(), Some(Signal::KILL.as_raw()), "{log}");
    assert!(
        dirs.socket().exists(),
        "a killed daemon leaves its socket behind"
    );

    // A new daemon on the same state dir and socket path (the stale socket is replaced).
    let manager = FakeManager::start().unwrap();
    let daemon = Daemon::start(&manager, &dirs, &[], None);
    let ready = manager.wait_ready(DEADLINE).unwrap();
    assert_eq!(
        ready.get("STATUS"),
        Some("queued 50, claimed 0, completed 0, failed 0, denied 0, quarantined 0"),
        "{}",
        daemon.log()
    );
    let mut client = rt.block_on(Client::connect(dirs.socket())).unwrap();
    let stats = rt.block_on(client.stats()).unwrap();
    assert_eq!(
        stats,
        Stats {
            queued: 50,
            ..Stats::default()
        }
    );
    let mut claimed = BTreeSet::new();
    // One worker name per job: a worker holding a job would get that one back.
    while let Some(job) = rt
        .block_on(client.claim(&format!("after-crash-{}", claimed.len())))
        .unwrap()
    {
        assert_eq!(job.spec, json!({ "n": claimed.len() }), "in order");
        claimed.insert(job.id);
    }
    assert_eq!(claimed, acked);
    assert!(
        daemon.log().contains("removing a stale socket"),
        "{}",
        daemon.log()
    );
    daemon.signal(Signal::TERM);
    let (status, log) = daemon.wait();
    assert!(status.success(), "{status}\n{log}");
}

#[test]
fn sighup_with_a_new_config_applies_the_new_lease_to_the_next_claim() {
    let dirs = Dirs::new();
    dirs.write_config("lease_secs = 30\n");
    let manager = FakeManager::start().unwrap();
    let daemon = Daemon::start(&manager, &dirs, &[], None);
    manager.wait_ready(DEADLINE).unwrap();
    let rt = runtime();
    let mut client = rt.block_on(Client::connect(dirs.socket())).unwrap();
    for i in 0..2 {
        rt.block_on(client.submit(json!(i))).unwrap();
    }
    let job = rt.block_on(client.claim("w")).unwrap().unwrap();
    assert_eq!(job.lease_secs, 30);

    dirs.write_config("lease_secs = 7\nmax_attempts = 5\n");
    let since = manager.len();
    daemon.signal(Signal::HUP);
    let reloading = manager
        .wait_for_since(since, "RELOADING=1", DEADLINE, |r| r.has("RELOADING", "1"))
        .unwrap();
    assert!(reloading.get("MONOTONIC_USEC").is_some());
    manager
        .wait_for_since(reloading.seq, "READY=1 after the reload", DEADLINE, |r| {
            r.has("READY", "1")
        })
        .unwrap();
    // Another worker: "w" still holds the first job, and would get it back.
    let job = rt.block_on(client.claim("w2")).unwrap().unwrap();
    assert_eq!(job.lease_secs, 7, "{}", daemon.log());
    // The renewal uses the new lease too (the stored deadline is checked below).
    let before = watchkeeper_daemon::store::now_ms();
    rt.block_on(client.report(&watchkeeper_jobs::Request::Renew {
        id: job.id,
        worker: "w2".into(),
    }))
    .unwrap();

    daemon.signal(Signal::TERM);
    let (status, log) = daemon.wait();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("configuration reloaded"), "{log}");
    manager.wait_stopping(DEADLINE).unwrap();
    manager.check_stopped_cleanly().unwrap();
    let store = Store::open_in(&dirs.state()).unwrap();
    let until = store.job(job.id).unwrap().unwrap().lease_until_ms.unwrap();
    assert!(
        (before + 7_000..before + 8_000).contains(&until),
        "{until} vs {before}"
    );
}

#[test]
fn sighup_with_a_broken_config_reports_it_and_keeps_the_old_one() {
    let dirs = Dirs::new();
    dirs.write_config("lease_secs = 30\n");
    let manager = FakeManager::start().unwrap();
    let daemon = Daemon::start(&manager, &dirs, &[], None);
    manager.wait_ready(DEADLINE).unwrap();

    dirs.write_config("lease_secs = 5\nbogus = true\n");
    let since = manager.len();
    daemon.signal(Signal::HUP);
    let ready = manager
        .wait_for_since(since, "READY=1 after the failed reload", DEADLINE, |r| {
            r.has("READY", "1")
        })
        .unwrap();
    let status = ready.get("STATUS").unwrap_or_default();
    let config = dirs.config().display().to_string();
    assert!(
        status.starts_with(&format!(
            "reload failed: {config}:2:1: unknown field `bogus`"
        )),
        "{status}"
    );

    let rt = runtime();
    let mut client = rt.block_on(Client::connect(dirs.socket())).unwrap();
    rt.block_on(client.submit(json!("x"))).unwrap();
    let job = rt.block_on(client.claim("w")).unwrap().unwrap();
    assert_eq!(job.lease_secs, 30, "the old configuration stays");

    // The failure stays visible next to the counts.
    let since = manager.len();
    manager
        .wait_for_since(
            since,
            "STATUS with the counts and the failure",
            DEADLINE,
            |r| {
                r.get("STATUS").is_some_and(|s| {
                    s.starts_with("queued 0, claimed 1,") && s.contains("; reload failed:")
                })
            },
        )
        .unwrap();
    daemon.signal(Signal::TERM);
    let (status, log) = daemon.wait();
    assert!(status.success(), "{status}\n{log}");
    manager.wait_stopping(DEADLINE).unwrap();
    manager.check_stopped_cleanly().unwrap();
}

#[test]
fn a_vanished_workers_job_is_queued_again_then_quarantined_as_poison() {
    let dirs = Dirs::new();
    dirs.write_config("lease_secs = 1\nmax_attempts = 2\n");
    let manager = FakeManager::start().unwrap();
    let daemon = Daemon::start(&manager, &dirs, &[], None);
    manager.wait_ready(DEADLINE).unwrap();
    let rt = runtime();
    let mut observer = rt.block_on(Client::connect(dirs.socket())).unwrap();
    let id = rt
        .block_on(observer.submit(json!("crashes its worker")))
        .unwrap();

    for attempt in 1..=2 {
        // A worker claims the job, then vanishes (its connection closes, it never reports).
        let claimed_at = Instant::now();
        {
            let mut worker = rt.block_on(Client::connect(dirs.socket())).unwrap();
            let job = rt.block_on(worker.claim("doomed")).unwrap().unwrap();
            assert_eq!((job.id, job.attempt, job.lease_secs), (id, attempt, 1));
        }
        let stats = rt.block_on(wait_for_stats(&mut observer, "lease expiry", |s| {
            s.claimed == 0
        }));
        // Only the maintenance task's sweep can have done it: nobody claimed meanwhile.
        assert!(claimed_at.elapsed() >= Duration::from_secs(1));
        if attempt < 2 {
            assert_eq!(stats.queued, 1, "queued again after attempt {attempt}");
        } else {
            assert_eq!((stats.queued, stats.quarantined), (0, 1));
        }
    }
    assert_eq!(rt.block_on(observer.claim("next")).unwrap(), None);
    daemon.signal(Signal::TERM);
    let (status, log) = daemon.wait();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("lease expired"), "{log}");
    let store = Store::open_in(&dirs.state()).unwrap();
    let record = store.job(id).unwrap().unwrap();
    assert_eq!(record.state, JobState::Quarantined);
    assert_eq!(
        record.reason.as_deref(),
        Some("lease expired 2 times: poison job")
    );
}

#[test]
fn a_wedged_database_withholds_the_watchdog_pings() {
    let dirs = Dirs::new();
    dirs.write_config("");
    let manager = FakeManager::start().unwrap();
    let watchdog = Duration::from_secs(2);
    let daemon = Daemon::start(&manager, &dirs, &[], Some(watchdog));
    manager.wait_ready(DEADLINE).unwrap();
    manager.wait_ping_since(manager.len(), DEADLINE).unwrap();

    // Another process-level connection holds the write lock: the maintenance sweep waits.
    let db = rusqlite::Connection::open(dirs.state().join("jobs.sqlite3")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let stalled = manager
        .wait_for_since(
            manager.len(),
            "STATUS naming the store loop",
            DEADLINE,
            |r| {
                r.get("STATUS")
                    .is_some_and(|s| s.starts_with("stalled: no progress in 'store'"))
            },
        )
        .unwrap();
    // From the stall on, no ping for a whole watchdog period.
    assert!(
        stalled.seq + 1 >= manager.len()
            || !manager.records()[stalled.seq..].iter().any(|r| r.is_ping())
    );
    manager.expect_no_ping(watchdog).unwrap();

    // Released: the pings and the daemon's own status come back.
    db.execute_batch("COMMIT").unwrap();
    let since = manager.len();
    manager.wait_ping_since(since, DEADLINE).unwrap();
    manager
        .wait_for_since(since, "the counts back in STATUS", DEADLINE, |r| {
            r.get("STATUS") == Some(EMPTY)
        })
        .unwrap();
    daemon.signal(Signal::TERM);
    let (status, log) = daemon.wait();
    assert!(status.success(), "{status}\n{log}");
}

/// The daemon as systemd starts it socket-activated: `listener` as fd 3, named `daemon`,
/// `LISTEN_PID` its own pid (the shell sets it to its own, then execs), plus `extra` args.
fn activated_command(
    manager: &FakeManager,
    dirs: &Dirs,
    listener: &std::os::unix::net::UnixListener,
    extra: &[&OsStr],
) -> Command {
    let mut cmd = Daemon::command(manager, "sh", None);
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
        .arg(EXE)
        .args([OsStr::new("--state-dir"), dirs.state().as_os_str()])
        .args(extra)
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "daemon");
    let src = listener.as_raw_fd();
    let setup_fd3 = move || {
        // SAFETY: `src` is the test's listener, open in the forked child until exec.
        let src = unsafe { BorrowedFd::borrow_raw(src) };
        // SAFETY: fd 3 is replaced by dup2 and never closed through this handle.
        let mut three = std::mem::ManuallyDrop::new(unsafe { OwnedFd::from_raw_fd(3) });
        rustix::io::dup2(src, &mut three)?;
        rustix::io::fcntl_setfd(three.as_fd(), FdFlags::empty())?;
        Ok(())
    };
    // SAFETY: the closure only makes async-signal-safe system calls (dup2, fcntl) between fork
    // and exec, and allocates nothing.
    unsafe {
        cmd.pre_exec(setup_fd3);
    }
    cmd
}

#[test]
fn socket_activation_takes_the_fd_named_daemon() {
    let dirs = Dirs::new();
    dirs.write_config("");
    let path = dirs.dir.path().join("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let manager = FakeManager::start().unwrap();
    // LISTEN_PID must be the daemon's pid: the shell sets it to its own, then execs.
    let cmd = activated_command(&manager, &dirs, &listener, &[]);
    let daemon = Daemon::spawn(cmd, &dirs);
    drop(listener);
    manager
        .wait_ready(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let rt = runtime();
    let mut client = rt.block_on(Client::connect(&path)).unwrap();
    assert!(rt.block_on(client.ping()).is_ok());
    assert!(!dirs.socket().exists(), "bound a socket of its own");
    daemon.signal(Signal::TERM);
    let (status, log) = daemon.wait();
    assert!(status.success(), "{status}\n{log}");
    assert!(
        path.exists(),
        "the activated socket belongs to systemd, not the daemon"
    );
}

#[test]
fn without_a_state_directory_it_exits_2_naming_both_sources() {
    let dirs = Dirs::new();
    let manager = FakeManager::start().unwrap();
    let mut cmd = Daemon::command(&manager, EXE, None);
    cmd.arg("--socket").arg(dirs.socket());
    let daemon = Daemon::spawn(cmd, &dirs);
    let (status, log) = daemon.wait();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("watchkeeper-daemon: no state directory")
            && log.contains("--state-dir")
            && log.contains("STATE_DIRECTORY"),
        "{log}"
    );
    assert!(!dirs.socket().exists());
    assert!(manager.records().iter().all(|r| !r.has("READY", "1")));
}

#[test]
fn a_broken_config_at_start_exits_6_naming_the_file() {
    let dirs = Dirs::new();
    dirs.write_config("max_attempts = 0\n");
    let manager = FakeManager::start().unwrap();
    let daemon = Daemon::start(&manager, &dirs, &[], None);
    let (status, log) = daemon.wait();
    assert_eq!(status.code(), Some(6), "{log}");
    let config = dirs.config().display().to_string();
    assert!(
        log.contains(&format!("{config}: max_attempts = 0 is invalid")),
        "{log}"
    );
    let failed = manager
        .wait_for("STATUS with the failure", DEADLINE, |r| {
            r.get("STATUS")
                .is_some_and(|s| s.starts_with("failed to start:"))
        })
        .unwrap();
    assert!(failed.get("STATUS").unwrap().contains(&config));
}

#[test]
fn reload_request_answers_once_the_reload_is_over_and_reports_a_refusal() {
    let dirs = Dirs::new();
    dirs.write_config("lease_secs = 30\n");
    let manager = FakeManager::start().unwrap();
    let daemon = Daemon::start(&manager, &dirs, &[], None);
    manager.wait_ready(DEADLINE).unwrap();
    let rt = runtime();
    let mut client = rt.block_on(Client::connect(dirs.socket())).unwrap();
    rt.block_on(client.submit(json!(1))).unwrap();

    dirs.write_config("lease_secs = 9\n");
    let since = manager.len();
    rt.block_on(client.reload()).unwrap();
    // Answered after READY=1 went out: a marker sent now lands after it.
    let marker = watchkeeper::Notifier::from_env(&manager.env()).unwrap();
    marker
        .notify(&[watchkeeper::Notification::custom("X_MARK", "after").unwrap()])
        .unwrap();
    let mark = manager
        .wait_for("marker", DEADLINE, |r| r.get("X_MARK") == Some("after"))
        .unwrap();
    let seq = |what: &str, pred: &dyn Fn(&watchkeeper_testkit::Record) -> bool| {
        manager.records()[since..mark.seq]
            .iter()
            .find(|r| pred(r))
            .unwrap_or_else(|| panic!("no {what} before the answer: {:?}", manager.records()))
            .seq
    };
    let reloading = seq("RELOADING=1", &|r| r.has("RELOADING", "1"));
    let ready = seq("READY=1", &|r| r.has("READY", "1"));
    assert!(reloading < ready);
    let job = rt.block_on(client.claim("w")).unwrap().unwrap();
    assert_eq!(job.lease_secs, 9);

    dirs.write_config("lease_secs = 0\n");
    let e = rt.block_on(client.reload()).unwrap_err();
    assert!(e.to_string().contains("reload failed"), "{e}");
    assert!(e.to_string().contains("lease_secs"), "{e}");

    daemon.signal(Signal::TERM);
    let (status, log) = daemon.wait();
    assert!(status.success(), "{status}\n{log}");
    manager.wait_stopping(DEADLINE).unwrap();
    manager.check_stopped_cleanly().unwrap();
}

#[test]
fn sigterm_during_the_start_is_a_clean_stop() {
    let dirs = Dirs::new();
    dirs.write_config("");
    let manager = FakeManager::start().unwrap();
    // A first run creates the store; then another connection holds its write lock, so that
    // the next start waits in the store's recovery sweep.
    let first = Daemon::start(&manager, &dirs, &[], None);
    manager.wait_ready(DEADLINE).unwrap();
    first.signal(Signal::TERM);
    let (status, log) = first.wait();
    assert!(status.success(), "{status}\n{log}");
    let db = rusqlite::Connection::open(dirs.state().join("jobs.sqlite3")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();

    let manager = FakeManager::start().unwrap();
    let daemon = Daemon::start(&manager, &dirs, &[], None);
    manager
        .wait_for("the start under way", DEADLINE, |r| {
            r.get("STATUS") == Some("starting: opening the job store")
        })
        .unwrap();
    daemon.signal(Signal::TERM);
    manager.wait_stopping(DEADLINE).unwrap();
    // The start may now finish; nothing is announced as ready.
    db.execute_batch("COMMIT").unwrap();
    let (status, log) = daemon.wait();
    assert!(
        status.success(),
        "a stop during the start is a clean stop: {status}\n{log}"
    );
    assert!(
        !manager.records().iter().any(|r| r.has("READY", "1")),
        "READY=1 after the stop began:\n{log}"
    );
    manager.check_stopped_cleanly().unwrap();
    assert!(!dirs.socket().exists(), "socket file left behind");
}

#[test]
fn an_unusable_socket_path_fails_the_start_before_the_store_is_created_and_leaves_no_lock() {
    let dirs = Dirs::new();
    dirs.write_config("");
    std::fs::create_dir_all(dirs.socket().parent().unwrap()).unwrap();
    std::fs::write(dirs.socket(), "not a socket").unwrap();
    let manager = FakeManager::start().unwrap();
    let daemon = Daemon::start(&manager, &dirs, &[], None);
    let (status, log) = daemon.wait();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("exists and is not a socket"), "{log}");
    assert!(!dirs.state().exists(), "the store was created: {log}");
    let lock = PathBuf::from(format!("{}.lock", dirs.socket().display()));
    assert!(!lock.exists(), "{} left behind", lock.display());
    assert_eq!(
        std::fs::read_to_string(dirs.socket()).unwrap(),
        "not a socket"
    );
}

#[test]
fn a_clean_stop_leaves_no_lock_file() {
    let dirs = Dirs::new();
    dirs.write_config("");
    let manager = FakeManager::start().unwrap();
    let daemon = Daemon::start(&manager, &dirs, &[], None);
    manager
        .wait_for("READY=1", DEADLINE, |r| r.has("READY", "1"))
        .unwrap();
    daemon.signal(Signal::TERM);
    let (status, log) = daemon.wait();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(!dirs.socket().exists());
    let lock = PathBuf::from(format!("{}.lock", dirs.socket().display()));
    assert!(!lock.exists(), "{} left behind", lock.display());
}

#[test]
fn socket_activated_with_a_broken_config_it_stays_up_answering_the_error_then_exits_6() {
    let dirs = Dirs::new();
    dirs.write_config("max_attempts = 0\n");
    let path = dirs.dir.path().join("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    // A connection already queued, as the one that triggered the start.
    let queued = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let manager = FakeManager::start().unwrap();
    let cmd = activated_command(
        &manager,
        &dirs,
        &listener,
        &[OsStr::new("--config"), dirs.config().as_os_str()],
    );
    let daemon = Daemon::spawn(cmd, &dirs);
    drop(listener);
    let ready = manager
        .wait_for("READY=1", DEADLINE, |r| r.has("READY", "1"))
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let config = dirs.config().display().to_string();
    let status = ready.get("STATUS").unwrap_or_default().to_owned();
    assert!(
        status.starts_with("configuration error: ") && status.contains(&config),
        "{status}"
    );
    // The queued connection and every new one get the reason; the daemon keeps running.
    use std::io::BufRead as _;
    let mut line = String::new();
    std::io::BufReader::new(queued)
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains(r#""code":"unavailable""#), "{line}");
    let rt = runtime();
    for _ in 0..3 {
        let mut client = rt.block_on(Client::connect(&path)).unwrap();
        let e = rt.block_on(client.ping()).unwrap_err();
        match &e {
            ClientError::Unavailable { reason, .. } => assert!(
                reason.starts_with("unavailable: configuration error: ")
                    && reason.contains(&format!("{config}: max_attempts = 0 is invalid")),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
    }
    assert!(!dirs.state().exists(), "a store was created");
    daemon.signal(Signal::TERM);
    let (status, log) = daemon.wait();
    assert_eq!(status.code(), Some(6), "{log}");
}

#[test]
fn a_fifo_or_dev_zero_as_config_fails_the_start_at_once_in_one_line() {
    let dirs = Dirs::new();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        dirs.config(),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let manager = FakeManager::start().unwrap();
    let daemon = Daemon::start(&manager, &dirs, &[], None);
    let (status, log) = daemon.wait();
    assert_eq!(status.code(), Some(6), "{log}");
    let config = dirs.config().display().to_string();
    let line = log
        .lines()
        .find(|l| l.starts_with("watchkeeper-daemon: "))
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(
        line,
        format!(
            "watchkeeper-daemon: configuration: cannot read the configuration {config}: {config} is a FIFO, not a regular file"
        )
    );

    let mut cmd = Daemon::command(&manager, EXE, None);
    cmd.args(["--socket", &dirs.socket().display().to_string()])
        .args(["--state-dir", &dirs.state().display().to_string()])
        .args(["--config", "/dev/zero"]);
    let (status, log) = Daemon::spawn(cmd, &dirs).wait();
    assert_eq!(status.code(), Some(6), "{log}");
    assert!(
        log.contains("/dev/zero is a character device, not a regular file"),
        "{log}"
    );
}
