//! Signals to services that are more than one `main`: a second `Service` in the same process,
//! and a `SIGHUP` that arrives while a reload runs. Each test runs this test binary again as the
//! child (selected by `WK_SIGNAL_CHILD`), under a fake manager, and sends it real signals.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use watchkeeper::logging::{self, LogConfig};
use watchkeeper::{Service, SystemdEnv};
use watchkeeper_testkit::FakeManager;

/// Generous bound for anything a test waits for; reached only when something is broken.
const DEADLINE: Duration = Duration::from_secs(20);
/// Set in the child: which test's child role to play.
const CHILD: &str = "WK_SIGNAL_CHILD";

/// This test binary, run again as the child of test `name`, pointed at `manager`; killed on
/// drop. Its stderr is read line by line as it comes.
struct ChildService {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl ChildService {
    fn start(manager: &FakeManager, name: &str) -> Self {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = manager.command(exe, None);
        cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, name)
            .env("RUST_LOG", "info")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        ChildService {
            child,
            stdin,
            lines,
            seen: Vec::new(),
        }
    }

    fn signal(&self, sig: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap()).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }

    /// Waits for a stderr line that matches `pred`.
    fn wait_line(&mut self, what: &str, pred: impl Fn(&str) -> bool) {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = pred(&line);
                    self.seen.push(line);
                    if hit {
                        return;
                    }
                }
                Err(_) => panic!(
                    "no {what} on the child's stderr within {DEADLINE:?}:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the exit; returns the status and the whole stderr.
    fn wait(mut self) -> (ExitStatus, String) {
        let Some(status) = watchkeeper_testkit::wait_exit(&mut self.child, DEADLINE).unwrap()
        else {
            panic!("the child did not exit:\n{}", self.seen.join("\n"))
        };
        // The reader thread ends at EOF, after the exit.
        self.seen.extend(self.lines.iter());
        (status, self.seen.join("\n"))
    }
}

impl Drop for ChildService {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The child's runtime, as a service's `main` would build it.
fn child_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_second_service_after_the_first_was_dropped_stops_gracefully_on_sigterm() {
    if std::env::var_os(CHILD).is_some() {
        return child_runtime().block_on(async {
            // A first Service (say, a start-up check) handled signals, then went away.
            let first = Service::builder("first")
                .env(SystemdEnv::default())
                .build()
                .unwrap();
            drop(first);
            let env = SystemdEnv::from_env();
            logging::init(&LogConfig::from_rust_log("second"), &env).unwrap();
            let service = Service::builder("second").env(env).build().unwrap();
            service.lifecycle().ready().await.unwrap();
            service.run(watchkeeper::service::no_reload).await.unwrap();
        });
    }
    let manager = FakeManager::start().unwrap();
    let child = ChildService::start(
        &manager,
        "a_second_service_after_the_first_was_dropped_stops_gracefully_on_sigterm",
    );
    manager.wait_ready(DEADLINE).unwrap();
    child.signal(Signal::TERM);
    let (status, stderr) = child.wait();
    assert!(
        status.success(),
        "SIGTERM must reach the live Service, not the first one's default action: {status}\n{stderr}"
    );
    assert!(stderr.contains("stopped gracefully"), "{stderr}");
    manager.wait_stopping(DEADLINE).unwrap();
    manager.check_stopped_cleanly().unwrap();
}

#[test]
fn a_sighup_during_a_reload_brings_one_more_reload() {
    if std::env::var_os(CHILD).is_some() {
        return child_runtime().block_on(async {
            let env = SystemdEnv::from_env();
            logging::init(&LogConfig::from_rust_log("reloader"), &env).unwrap();
            let service = Service::builder("reloader").env(env).build().unwrap();
            let lifecycle = service.lifecycle();
            lifecycle.ready_with_status("generation 0").await.unwrap();
            let generation = Arc::new(AtomicUsize::new(0));
            service
                .run(|| {
                    let n = generation.fetch_add(1, Ordering::SeqCst) + 1;
                    let lifecycle = lifecycle.clone();
                    async move {
                        // The configuration is read here; then the reload takes as long as
                        // the test wants: until it writes a line.
                        eprintln!("reload {n} waiting");
                        tokio::task::spawn_blocking(|| {
                            std::io::stdin().read_line(&mut String::new())
                        })
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?;
                        lifecycle
                            .status(&format!("generation {n}"))
                            .map_err(|e| e.to_string())?;
                        Ok::<(), String>(())
                    }
                })
                .await
                .unwrap();
        });
    }
    let manager = FakeManager::start().unwrap();
    let mut child =
        ChildService::start(&manager, "a_sighup_during_a_reload_brings_one_more_reload");
    manager.wait_ready(DEADLINE).unwrap();

    child.signal(Signal::HUP);
    child.wait_line("the first reload", |l| l == "reload 1 waiting");
    // The configuration changes again while the first reload runs, and systemd says so.
    child.signal(Signal::HUP);
    child.wait_line("the second SIGHUP handled", |l| {
        l.contains("during a reload") || l.contains("reload request ignored")
    });
    child.send_line("go");
    manager
        .wait_for("the first reload's status", DEADLINE, |r| {
            r.get("STATUS") == Some("generation 1")
        })
        .unwrap();
    child.wait_line("a second reload", |l| l == "reload 2 waiting");
    child.send_line("go");
    manager
        .wait_for("the second reload's status", DEADLINE, |r| {
            r.get("STATUS") == Some("generation 2")
        })
        .unwrap();

    child.signal(Signal::TERM);
    let (status, stderr) = child.wait();
    assert!(status.success(), "{status}\n{stderr}");
    let reloads = manager
        .records()
        .iter()
        .filter(|r| r.has("RELOADING", "1"))
        .count();
    assert_eq!(reloads, 2, "one RELOADING=1 per reload");
    manager.wait_stopping(DEADLINE).unwrap();
    manager.check_stopped_cleanly().unwrap();
}
