//! Mistakes that no retry can fix end the worker at once, with one clear line on stderr and
//! exit code 78 (`EX_CONFIG`, the units' `RestartPreventExitStatus=`); a manager socket nobody
//! listens on ends it with 1, as it ends the daemon. Transient trouble (a daemon restart) is
//! logged with its reason in the message, at info when the first reconnection succeeds.

mod common;

use std::process::{Command, Stdio};

use common::{Broker, DEADLINE, Scene, Worker};
use watchkeeper_testkit::FakeManager;

const WORKER: &str = env!("CARGO_BIN_EXE_watchkeeper-worker");

/// Runs the worker with only `env` (and `PATH`) in its environment; returns the exit code and
/// stderr. Fails the test if it does not exit within the deadline.
fn run_alone(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(WORKER);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut pipe, &mut s).unwrap();
        s
    });
    let status = watchkeeper_testkit::wait_exit(&mut child, DEADLINE).unwrap();
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "the worker did not exit within {DEADLINE:?}; stderr:\n{}",
            reader.join().unwrap()
        );
    };
    (status.code(), reader.join().unwrap())
}

/// The last stderr line: the exit message.
fn last_line(stderr: &str) -> &str {
    stderr.lines().last().unwrap_or("")
}

#[test]
fn a_socket_path_too_long_for_a_unix_address_exits_78() {
    let scene = Scene::new();
    let long = scene.path(&"s".repeat(110));
    let (code, stderr) = run_alone(&["--socket", long.to_str().unwrap()], &[]);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        last_line(&stderr).starts_with("watchkeeper-worker: socket path ")
            && last_line(&stderr).contains("a Unix socket path holds at most 107 bytes"),
        "{stderr}"
    );
}

#[test]
fn a_heartbeat_directory_that_is_not_writable_exits_78_at_start() {
    // sysfs takes no new files, whatever the uid (a 0555 directory would not stop root).
    let probe = std::path::Path::new("/sys/watchkeeper-worker-test");
    if std::fs::write(probe, b"").is_ok() {
        let _ = std::fs::remove_file(probe);
        eprintln!("SKIPPED: /sys takes new files here; no read-only directory to test with");
        return;
    }
    let scene = Scene::new();
    let (code, stderr) = run_alone(
        &[
            "--socket",
            scene.socket().to_str().unwrap(),
            "--heartbeat",
            "/sys/heartbeat.json",
        ],
        &[],
    );
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        last_line(&stderr)
            .starts_with("watchkeeper-worker: heartbeat directory /sys is not writable: "),
        "{stderr}"
    );
}

#[test]
fn a_notify_socket_nobody_listens_on_exits_1() {
    let scene = Scene::new();
    let (code, stderr) = run_alone(
        &["--socket", scene.socket().to_str().unwrap()],
        &[("NOTIFY_SOCKET", "/nonexistent/notify")],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        last_line(&stderr).starts_with("watchkeeper-worker: cannot notify the service manager: ")
            && last_line(&stderr).contains("NOTIFY_SOCKET=/nonexistent/notify"),
        "{stderr}"
    );
}

#[test]
fn a_vsock_notify_socket_exits_78() {
    let scene = Scene::new();
    let _broker = Broker::start(&scene.socket());
    let (code, stderr) = run_alone(
        &["--socket", scene.socket().to_str().unwrap()],
        &[("NOTIFY_SOCKET", "vsock:2:1234")],
    );
    assert_eq!(code, Some(78), "{stderr}");
    assert_eq!(
        last_line(&stderr),
        "watchkeeper-worker: NOTIFY_SOCKET=vsock:2:1234: this address family is not supported; \
         the service manager would wait for READY=1 until its start timeout",
        "{stderr}"
    );
}

#[test]
fn a_toml_error_is_one_line() {
    let scene = Scene::new();
    let config = scene.path("worker.toml");
    std::fs::write(&config, "allowlist = [\"sh\"]\npoll_interval_ms = [\n").unwrap();
    let (code, stderr) = run_alone(
        &[
            "--socket",
            scene.socket().to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, Some(78), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "watchkeeper-worker: config file {}:2:",
            config.display()
        )) && stderr.contains("invalid TOML: "),
        "{stderr}"
    );
}

#[test]
fn a_daemon_restart_is_logged_with_its_reason_at_info() {
    let scene = Scene::new();
    let mut broker = Broker::start(&scene.socket());
    let manager = FakeManager::start().unwrap();
    let config = scene.config(&["sh"], "");
    let worker = Worker::start(&manager, None, &scene.args(&config));
    manager.wait_ready(DEADLINE).unwrap();

    // A planned restart: gone, and back before the first reconnection attempt is due.
    broker.down();
    broker.up();
    let deadline = std::time::Instant::now() + DEADLINE;
    while !worker.stderr().contains("reconnected to the daemon") {
        assert!(
            std::time::Instant::now() < deadline,
            "no reconnection; stderr:\n{}",
            worker.stderr()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let stderr = worker.stderr();
    let lost = stderr
        .lines()
        .find(|l| l.contains("daemon unreachable"))
        .unwrap_or_else(|| panic!("no line about the loss:\n{stderr}"));
    assert!(lost.contains(" INFO "), "{lost}");
    // The reason is in the message, not only in a field.
    let message = lost.split(" error=").next().unwrap();
    assert!(
        message.contains("daemon unreachable: ")
            && message.contains(scene.socket().to_str().unwrap()),
        "{lost}"
    );
    assert!(
        !stderr.contains(" WARN watchkeeper_worker::poll"),
        "{stderr}"
    );
    worker.signal(rustix::process::Signal::TERM);
    let (status, _) = worker.wait();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_refusal_by_the_daemon_stops_the_worker_with_78() {
    let scene = Scene::new();
    let broker = Broker::start(&scene.socket());
    broker.refuse_connections("uid 1001 is not allowed");
    let manager = FakeManager::start().unwrap();
    let config = scene.config(&["sh"], "");
    let worker = Worker::start(&manager, None, &scene.args(&config));
    let (status, stderr) = worker.wait();
    assert_eq!(status.code(), Some(78), "{stderr}");
    assert!(
        last_line(&stderr).starts_with("watchkeeper-worker: refused by the daemon: ")
            && last_line(&stderr).contains("uid 1001 is not allowed"),
        "{stderr}"
    );
    // Once: a refusal is not retried.
    assert_eq!(broker.refused_connections(), 1);
    assert!(
        manager
            .records()
            .iter()
            .all(|r| r.get("READY") != Some("1"))
    );
}
