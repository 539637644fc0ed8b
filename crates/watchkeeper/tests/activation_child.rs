//! Socket activation with real fds: the test binary re-runs itself as the activated child.
//!
//! Each `parent_*` test binds a real listener, spawns this test binary with `--exact child_*`
//! and `WK_ACTIVATION_CHILD=<role>`, and puts the listener on fd 3 in `pre_exec`, as systemd
//! does. Without `WK_ACTIVATION_CHILD` the `child_*` tests return at once. The child prints a
//! marker line only when all its assertions passed, so a child that silently did nothing fails
//! the parent.

use std::io::{Read, Write};
use std::mem::ManuallyDrop;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::io::{Errno, FdFlags};
use watchkeeper::SystemdEnv;
use watchkeeper::activation::{self, ActivationError, ListenerSource};
use watchkeeper::env::{LISTEN_PID, LISTEN_PIDFDID};

const ROLE: &str = "WK_ACTIVATION_CHILD";
const DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Parent side.

/// How fd 3 looks in the child.
enum Fd3<'a> {
    /// `dup2(listener, 3)` with `FD_CLOEXEC` cleared.
    Listener(&'a UnixListener),
    /// The same with a TCP listener.
    Tcp(&'a TcpListener),
    /// Closed.
    Closed,
}

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    fn assert_ok(&self, marker: &str) {
        assert!(
            self.status.success() && self.stdout.contains(marker),
            "child failed or did not print {marker:?}: {}\n--- stdout\n{}\n--- stderr\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
    }
}

struct Running {
    child: Child,
    stdout: JoinHandle<String>,
    stderr: JoinHandle<String>,
}

fn spawn_child(test: &str, role: &str, fd3: Fd3<'_>, env: &[(&str, &str)]) -> Running {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"]);
    SystemdEnv::scrub(&mut cmd);
    cmd.env(ROLE, role)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let src: Option<RawFd> = match fd3 {
        Fd3::Listener(l) => Some(l.as_raw_fd()),
        Fd3::Tcp(l) => Some(l.as_raw_fd()),
        Fd3::Closed => None,
    };
    let setup_fd3 = move || {
        match src {
            Some(src) => {
                // SAFETY: `src` is the parent's listener, open in the forked child until exec.
                let src = unsafe { BorrowedFd::borrow_raw(src) };
                // SAFETY: fd 3 is replaced by dup2 and never closed through this handle
                // (ManuallyDrop).
                let mut three = ManuallyDrop::new(unsafe { OwnedFd::from_raw_fd(3) });
                rustix::io::dup2(src, &mut three)?;
                // dup2 onto itself keeps FD_CLOEXEC: clear it in every case.
                rustix::io::fcntl_setfd(three.as_fd(), FdFlags::empty())?;
            }
            None => {
                // SAFETY: nothing in the child between fork and exec uses fd 3; if it is not
                // open, close() fails harmlessly with EBADF.
                drop(unsafe { OwnedFd::from_raw_fd(3) });
            }
        }
        Ok(())
    };
    // SAFETY: the closure runs between fork and exec and only makes raw system calls (dup2,
    // fcntl, close), which are async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(setup_fd3);
    }
    let mut child = cmd.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let stdout = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    Running {
        child,
        stdout,
        stderr,
    }
}

impl Running {
    /// Waits for the child to exit, killing it after [`DEADLINE`] (a pidfd is polled: no sleeps).
    fn finish(mut self) -> Output {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id()).unwrap()).unwrap();
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
            let _ = self.child.kill();
        }
        let status = self.child.wait().unwrap();
        let out = Output {
            status,
            stdout: self.stdout.join().unwrap(),
            stderr: self.stderr.join().unwrap(),
        };
        assert!(
            exited,
            "child still running after {DEADLINE:?}; killed\n{}\n{}",
            out.stdout, out.stderr
        );
        out
    }
}

#[test]
fn parent_passes_listener_to_child() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let running = spawn_child(
        "child_serve",
        "serve",
        Fd3::Listener(&listener),
        &[("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "ctl")],
    );
    // Only the child holds the socket now: if it dies, the client sees EOF/ECONNREFUSED.
    drop(listener);

    let reply = (|| -> std::io::Result<String> {
        let mut c = UnixStream::connect(&path)?;
        c.set_read_timeout(Some(DEADLINE))?;
        c.write_all(b"ping\n")?;
        c.shutdown(Shutdown::Write)?;
        let mut reply = String::new();
        c.read_to_string(&mut reply)?;
        Ok(reply)
    })();
    let out = running.finish();
    out.assert_ok("WK_CHILD_OK serve");
    assert_eq!(reply.unwrap(), "pong ping\n");
}

/// A passed TCP listener named as systemd names it without `FileDescriptorName=`.
#[test]
fn parent_passes_tcp_listener_named_after_its_socket_unit() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let running = spawn_child(
        "child_tcp_or_bind",
        "tcp-or-bind",
        Fd3::Tcp(&listener),
        &[
            ("LISTEN_FDS", "1"),
            ("LISTEN_FDNAMES", "web.socket"),
            ("WK_EXPECT_ADDR", &addr.to_string()),
        ],
    );
    drop(listener);
    let reply = (|| -> std::io::Result<String> {
        let mut c = TcpStream::connect(addr)?;
        c.set_read_timeout(Some(DEADLINE))?;
        c.write_all(b"ping\n")?;
        c.shutdown(Shutdown::Write)?;
        let mut reply = String::new();
        c.read_to_string(&mut reply)?;
        Ok(reply)
    })();
    let out = running.finish();
    out.assert_ok("WK_CHILD_OK tcp-or-bind");
    assert!(
        out.stdout
            .contains("listening: socket activation, passed fd named \"web.socket\""),
        "{}",
        out.stdout
    );
    assert_eq!(reply.unwrap(), "pong ping\n");
}

/// Nothing passed: the same call binds, and fd 3 (open, but not passed) is left alone.
#[test]
fn parent_nothing_passed_binds() {
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("not-passed")).unwrap();
    let running = spawn_child(
        "child_bind_fallback",
        "bind-fallback",
        Fd3::Listener(&listener),
        &[(
            "WK_BIND_AT",
            dir.path().join("bound.sock").to_str().unwrap(),
        )],
    );
    running.finish().assert_ok("WK_CHILD_OK bind-fallback");
}

#[test]
fn parent_other_pid_leaves_fds_alone() {
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("s")).unwrap();
    // Our own pid can never be the child's.
    let me = std::process::id().to_string();
    let running = spawn_child(
        "child_other_pid",
        "other-pid",
        Fd3::Listener(&listener),
        &[
            ("LISTEN_PID", &me),
            ("LISTEN_FDS", "1"),
            ("LISTEN_FDNAMES", "ctl"),
        ],
    );
    running.finish().assert_ok("WK_CHILD_OK other-pid");
}

#[test]
fn parent_pidfdid_mismatch_is_not_for_us() {
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("s")).unwrap();
    let running = spawn_child(
        "child_pidfdid",
        "pidfdid",
        Fd3::Listener(&listener),
        &[("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "ctl")],
    );
    running.finish().assert_ok("WK_CHILD_OK pidfdid");
}

#[test]
fn parent_closed_fd_is_an_error_naming_it() {
    let running = spawn_child(
        "child_closed_fd",
        "closed-fd",
        Fd3::Closed,
        &[("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "gone")],
    );
    running.finish().assert_ok("WK_CHILD_OK closed-fd");
}

// ---------------------------------------------------------------------------------------------
// Child side: each returns at once unless it is the role this process was started for.

fn is_role(role: &str) -> bool {
    std::env::var_os(ROLE).is_some_and(|r| r == role)
}

/// The child's environment, with `LISTEN_PID` set to its own pid as systemd would (the parent
/// cannot know it before spawning).
fn own_env() -> SystemdEnv {
    SystemdEnv::from_env().with_var(LISTEN_PID, std::process::id().to_string())
}

fn fd3_flags() -> Result<FdFlags, Errno> {
    // SAFETY: fd 3 is not owned by anything in this process in the cases this is called; the
    // borrow ends within this function. If fd 3 is closed, fcntl fails with EBADF.
    rustix::io::fcntl_getfd(unsafe { BorrowedFd::borrow_raw(3) })
}

#[test]
fn child_serve() {
    if !is_role("serve") {
        return;
    }
    assert_eq!(
        fd3_flags().unwrap(),
        FdFlags::empty(),
        "fd 3 arrives without CLOEXEC"
    );
    let env = own_env();
    // SAFETY: nothing else in this process owns fd 3 (it was dup2'ed in by the parent).
    let mut fds = unsafe { activation::take(&env) }.unwrap();
    assert_eq!(fds.names().collect::<Vec<_>>(), ["ctl"]);
    assert!(fd3_flags().unwrap().contains(FdFlags::CLOEXEC));
    // SAFETY: as above; it must refuse rather than own fd 3 twice.
    let again = unsafe { activation::take(&env) };
    assert!(
        matches!(again, Err(ActivationError::AlreadyTaken)),
        "{again:?}"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = fds.take_unix_listener("ctl").unwrap();
        assert_eq!(listener.as_raw_fd(), 3);
        assert!(fds.is_empty());
        let (stream, _) = listener.accept().await.unwrap();
        let mut stream = stream.into_std().unwrap();
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut req = String::new();
        stream.read_to_string(&mut req).unwrap();
        write!(stream, "pong {req}").unwrap();
    });
    println!("WK_CHILD_OK serve");
}

#[test]
fn child_tcp_or_bind() {
    if !is_role("tcp-or-bind") {
        return;
    }
    let env = own_env();
    // SAFETY: nothing else in this process owns fd 3 (it was dup2'ed in by the parent).
    let mut fds = unsafe { activation::take(&env) }.unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    rt.block_on(async {
        // The service asks for its socket unit's name, and would bind port 0 without it.
        let (listener, source) = fds
            .tcp_listener_or_bind(Some("web"), "127.0.0.1:0")
            .unwrap();
        println!("listening: {source}");
        assert_eq!(
            source,
            ListenerSource::Activated {
                name: "web.socket".into()
            }
        );
        assert_eq!(listener.as_raw_fd(), 3);
        assert_eq!(
            listener.local_addr().unwrap().to_string(),
            std::env::var("WK_EXPECT_ADDR").unwrap()
        );
        let (stream, _) = listener.accept().await.unwrap();
        let mut stream = stream.into_std().unwrap();
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut req = String::new();
        stream.read_to_string(&mut req).unwrap();
        write!(stream, "pong {req}").unwrap();
    });
    println!("WK_CHILD_OK tcp-or-bind");
}

#[test]
fn child_bind_fallback() {
    if !is_role("bind-fallback") {
        return;
    }
    let env = own_env();
    // SAFETY: nothing else in this process owns fd 3; without LISTEN_FDS it is not taken.
    let mut fds = unsafe { activation::take(&env) }.unwrap();
    assert!(fds.is_empty());
    let path = std::env::var("WK_BIND_AT").unwrap();
    let (listener, source) = fds.std_unix_listener_or_bind(Some("ctl"), &path).unwrap();
    assert_eq!(source, ListenerSource::Bound);
    assert_ne!(listener.as_raw_fd(), 3, "took an fd that was not passed");
    assert_eq!(fd3_flags().unwrap(), FdFlags::empty(), "fd 3 was touched");
    drop(UnixStream::connect(&path).unwrap());
    listener.accept().unwrap();
    println!("WK_CHILD_OK bind-fallback");
}

#[test]
fn child_other_pid() {
    if !is_role("other-pid") {
        return;
    }
    // LISTEN_PID names the parent, not us.
    let env = SystemdEnv::from_env();
    assert_ne!(
        env.var(LISTEN_PID).and_then(|p| p.to_str()),
        Some(std::process::id().to_string().as_str())
    );
    for _ in 0..2 {
        // SAFETY: nothing else in this process owns fd 3.
        let fds = unsafe { activation::take(&env) }.unwrap();
        assert!(fds.is_empty(), "{fds:?}");
    }
    assert_eq!(
        fd3_flags().unwrap(),
        FdFlags::empty(),
        "fds not meant for us must not be touched"
    );
    println!("WK_CHILD_OK other-pid");
}

#[test]
fn child_pidfdid() {
    if !is_role("pidfdid") {
        return;
    }
    // Our pidfd inode id, computed independently of the library (pidfs only, Linux 6.9+).
    let pid = rustix::process::getpid();
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).unwrap();
    let on_pidfs = rustix::fs::fstatfs(&pidfd).unwrap().f_type == 0x5049_4446;
    let ino = rustix::fs::fstat(&pidfd).unwrap().st_ino;

    if on_pidfs {
        let wrong = own_env().with_var(LISTEN_PIDFDID, (ino + 1).to_string());
        // SAFETY: nothing else in this process owns fd 3.
        let fds = unsafe { activation::take(&wrong) }.unwrap();
        assert!(fds.is_empty(), "LISTEN_PIDFDID of another process: {fds:?}");
        assert_eq!(fd3_flags().unwrap(), FdFlags::empty());
    } else {
        println!("no pidfs on this kernel: only the matching case is checked");
    }
    let right = own_env().with_var(LISTEN_PIDFDID, ino.to_string());
    // SAFETY: as above.
    let fds = unsafe { activation::take(&right) }.unwrap();
    assert_eq!(fds.names().collect::<Vec<_>>(), ["ctl"]);
    println!("WK_CHILD_OK pidfdid");
}

#[test]
fn child_closed_fd() {
    if !is_role("closed-fd") {
        return;
    }
    assert_eq!(
        fd3_flags(),
        Err(Errno::BADF),
        "fd 3 was reopened before the test ran; cannot check"
    );
    let env = own_env();
    for _ in 0..2 {
        // SAFETY: fd 3 is closed and nothing else in this process owns it.
        let e = unsafe { activation::take(&env) }.unwrap_err();
        // A failed take does not count as taken: the second attempt fails the same way.
        assert!(
            matches!(&e, ActivationError::BadFd { fd: 3, name, .. } if name == "gone"),
            "{e:?}"
        );
        assert!(e.to_string().contains("fd 3"), "{e}");
    }
    println!("WK_CHILD_OK closed-fd");
}
