//! Shared helpers for the tests that run the examples as child processes.
#![allow(dead_code, unreachable_pub)]

use std::io::Read as _;
use std::process::{Child, ExitStatus, Stdio};
use std::time::Duration;

use rustix::process::{Pid, Signal};
use watchkeeper_testkit::{FakeManager, example_path};

/// Generous bound for anything a test waits for; reached only when something is broken.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// An example running as a child of the test, under a fake manager. Killed on drop.
pub struct Service {
    child: Child,
    pub pid: u32,
}

impl Service {
    /// Starts example `name` with `args`, pointed at `manager`, with optional watchdog and extra
    /// environment (e.g. a malformed WATCHDOG_PID).
    pub fn start(
        manager: &FakeManager,
        name: &str,
        args: &[&str],
        watchdog: Option<Duration>,
        env: &[(&str, &str)],
    ) -> Self {
        let path = example_path(name).unwrap();
        let mut cmd = manager.command(path, watchdog);
        cmd.args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().unwrap();
        let pid = child.id();
        Service { child, pid }
    }

    pub fn signal(&self, sig: Signal) {
        let pid = Pid::from_raw(self.pid as i32).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }

    /// Waits for the child to exit, up to `DEADLINE`; returns its status and stderr.
    pub fn wait(mut self) -> (ExitStatus, String) {
        let Some(status) = watchkeeper_testkit::wait_exit(&mut self.child, DEADLINE).unwrap()
        else {
            panic!("pid {} did not exit within {DEADLINE:?}", self.pid)
        };
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            e.read_to_string(&mut stderr).unwrap();
        }
        (status, stderr)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
