//! `examples/05_http_axum.rs` as a real child under the fake manager: READY=1 with the
//! address in `STATUS=`, `/health` answered 200 from the watchdog's view, pings while idle
//! (`accept()` waits in `Progress::idle`), and SIGTERM → STOPPING=1 and exit 0; and the same
//! service socket-activated, on a listener passed as fd 3 named as systemd names it.

mod common;

use std::io::{Read as _, Write as _};
use std::mem::ManuallyDrop;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::process::Stdio;
use std::time::Duration;

use common::{DEADLINE, Service};
use rustix::process::Signal;
use watchkeeper_testkit::{FakeManager, UnitResult};

/// One HTTP/1.1 request on a fresh connection; returns the status code and the body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    (code, body.to_owned())
}

/// The address from `STATUS=listening on ADDR (…)`.
fn listening_on(status: &str) -> SocketAddr {
    let rest = status
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("STATUS={status:?}"));
    rest.split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn health_is_served_idle_pings_continue_and_sigterm_stops_cleanly() {
    let watchdog = Duration::from_secs(1);
    let manager = FakeManager::start().unwrap();
    let service = Service::start(
        &manager,
        "05_http_axum",
        &["--listen", "127.0.0.1:0"],
        Some(watchdog),
        &[],
    );
    let ready = manager.wait_ready(DEADLINE).unwrap();
    let status = ready.get("STATUS").unwrap();
    assert!(status.ends_with("(bound by the service)"), "{status}");
    let addr = listening_on(status);

    let (code, body) = get(addr, "/health");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, body) = get(addr, "/");
    assert_eq!((code, body.as_str()), (200, "hello\n"));

    // No request from here on for several watchdog timeouts: the accept side waits in
    // `Progress::idle`, which keeps its loop alive without a tick, and with it the pings.
    let before = manager.records().iter().filter(|r| r.is_ping()).count();
    manager.wait_pings(before + 6, DEADLINE).unwrap();
    assert_eq!(manager.unit_result().unwrap(), UnitResult::Success);
    assert!(
        !manager
            .unit_events()
            .iter()
            .any(|e| e.what.contains("Watchdog timeout")),
        "{:?}",
        manager.unit_events()
    );
    assert!(
        !manager
            .records()
            .iter()
            .any(|r| r.get("STATUS").is_some_and(|s| s.starts_with("stalled"))),
        "{:?}",
        manager.records()
    );
    let (code, body) = get(addr, "/health");
    assert_eq!((code, body.as_str()), (200, "ok\n"));

    service.signal(Signal::TERM);
    let (exit, stderr) = service.wait();
    assert!(exit.success(), "{exit}\n{stderr}");
    assert!(stderr.contains("stopped"), "{stderr}");
    manager.wait_stopping(DEADLINE).unwrap();
    manager.check_stopped_cleanly().unwrap();
    // The listener is closed: nothing accepts any more.
    assert!(
        TcpStream::connect(addr).is_err(),
        "still accepting after the stop"
    );
}

/// A child killed if the test fails before it exits.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn a_socket_activated_start_serves_on_the_passed_listener() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let manager = FakeManager::start().unwrap();
    let example = watchkeeper_testkit::example_path("05_http_axum").unwrap();
    // systemd sets LISTEN_PID to the service's pid: `sh` knows its own and `exec`s the example
    // under it. `--listen` names a port nobody may bind, to show it is not used.
    let mut cmd = manager.command("sh", Some(Duration::from_secs(1)));
    cmd.args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\""])
        .arg(&example)
        .args(["--listen", "127.0.0.1:1"])
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "http.socket")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let src = listener.as_raw_fd();
    // SAFETY: between fork and exec only dup2 and fcntl run (async-signal-safe, no allocation);
    // `src` is the parent's listener, open in the child until exec; fd 3 is replaced by dup2 and
    // never closed through this handle.
    unsafe {
        cmd.pre_exec(move || {
            let src = BorrowedFd::borrow_raw(src);
            let mut three = ManuallyDrop::new(OwnedFd::from_raw_fd(3));
            rustix::io::dup2(src, &mut three)?;
            rustix::io::fcntl_setfd(three.as_fd(), rustix::io::FdFlags::empty())?;
            Ok(())
        });
    }
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    drop(listener);

    let ready = manager.wait_ready(DEADLINE).unwrap();
    assert_eq!(
        ready.get("STATUS"),
        Some(
            format!("listening on {addr} (socket activation, passed fd named \"http.socket\")")
                .as_str()
        )
    );
    let (code, body) = get(addr, "/health");
    assert_eq!((code, body.as_str()), (200, "ok\n"));

    let pid = rustix::process::Pid::from_raw(child.0.id() as i32).unwrap();
    rustix::process::kill_process(pid, Signal::TERM).unwrap();
    let status = watchkeeper_testkit::wait_exit(&mut child.0, DEADLINE)
        .unwrap()
        .expect("exits after SIGTERM");
    let mut stderr = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{status}\n{stderr}");
    manager.wait_stopping(DEADLINE).unwrap();
    manager.check_stopped_cleanly().unwrap();
}
