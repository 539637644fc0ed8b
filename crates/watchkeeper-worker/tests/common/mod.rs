//! Test helpers: a fake broker speaking the watchkeeper-jobs protocol on a real Unix socket, and
//! the worker binary running under a fake systemd manager.
#![allow(dead_code, unreachable_pub)]

use std::collections::{HashSet, VecDeque};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use rustix::process::{Pid, Signal};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use watchkeeper::heartbeat::{Heartbeat, read_heartbeat};
use watchkeeper_jobs::{ClaimedJob, Request, Response};
use watchkeeper_testkit::FakeManager;

/// Generous bound for anything a test waits for; reached only when something is broken.
pub const DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// The fake broker

#[derive(Debug, Default)]
struct BrokerState {
    queue: VecDeque<ClaimedJob>,
    received: Vec<Request>,
    /// `complete` for these ids is refused once ("lease expired").
    refuse_complete: HashSet<u64>,
    /// `complete` for these ids is recorded once, then the connection is closed unanswered.
    hang_up_on_complete: HashSet<u64>,
    /// `renew` and `complete` for these ids are refused ("lease lost").
    lease_lost: HashSet<u64>,
    /// Every connection gets this refusal line at once and is closed, as the daemon answers a
    /// uid it does not allow.
    refuse_connections: Option<String>,
    /// Connections refused so far.
    refused_connections: usize,
    /// Answers `complete_and_claim` as a daemon that predates it does.
    old_daemon: bool,
}

#[derive(Debug, Default)]
struct BrokerShared {
    state: Mutex<BrokerState>,
    changed: Condvar,
}

impl BrokerShared {
    fn lock(&self) -> MutexGuard<'_, BrokerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `req`, then decides the answer (so a test that saw the request knows the worker
    /// has not had the answer before). `None`: close the connection without answering.
    fn handle(&self, req: Request) -> Option<Response> {
        let mut state = self.lock();
        state.received.push(req.clone());
        // `complete_and_claim` is a `complete`, then (if it was done) a `claim`, as in the daemon.
        let (req, and_claim) = match req {
            Request::CompleteAndClaim { .. } if state.old_daemon => {
                drop(state);
                self.changed.notify_all();
                return Some(Response::error(
                    "invalid request: unknown variant `complete_and_claim`, expected one of `ping`, `claim`",
                ));
            }
            Request::CompleteAndClaim {
                id,
                worker,
                exit_code,
            } => (
                Request::Complete {
                    id,
                    worker,
                    exit_code,
                },
                true,
            ),
            other => (other, false),
        };
        let response = match req {
            Request::Ping => Response::Pong {
                version: "fake-broker".into(),
            },
            Request::Claim { .. } => Response::Job {
                job: state.queue.pop_front(),
            },
            Request::Complete { id, .. } if state.hang_up_on_complete.remove(&id) => {
                drop(state);
                self.changed.notify_all();
                return None;
            }
            Request::Complete { id, .. } if state.refuse_complete.remove(&id) => {
                Response::error(format!("job {id} is not leased to you (lease expired)"))
            }
            Request::Renew { id, .. } | Request::Complete { id, .. }
                if state.lease_lost.contains(&id) =>
            {
                Response::error(format!("job {id} is not leased to you"))
            }
            Request::Renew { .. }
            | Request::Complete { .. }
            | Request::Deny { .. }
            | Request::Quarantine { .. }
            | Request::Release { .. } => Response::Done,
            Request::Submit { .. }
            | Request::CompleteAndClaim { .. }
            | Request::Stats
            | Request::Reload => Response::error("not supported by the fake broker"),
        };
        let response = if and_claim && response == Response::Done {
            Response::Job {
                job: state.queue.pop_front(),
            }
        } else {
            response
        };
        drop(state);
        self.changed.notify_all();
        Some(response)
    }
}

/// A broker on a Unix socket that can disappear (socket removed, connections closed) and come
/// back at the same path.
pub struct Broker {
    rt: tokio::runtime::Runtime,
    path: PathBuf,
    shared: Arc<BrokerShared>,
    online: Option<(CancellationToken, TaskTracker)>,
}

impl Broker {
    /// A broker not listening yet: the socket does not exist.
    pub fn absent(path: &Path) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        Broker {
            rt,
            path: path.to_owned(),
            shared: Arc::default(),
            online: None,
        }
    }

    /// A broker listening at `path`.
    pub fn start(path: &Path) -> Self {
        let mut b = Self::absent(path);
        b.up();
        b
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts listening.
    pub fn up(&mut self) {
        assert!(self.online.is_none(), "already up");
        let listener = {
            let _rt = self.rt.enter();
            UnixListener::bind(&self.path).unwrap()
        };
        let token = CancellationToken::new();
        let tracker = TaskTracker::new();
        let shared = self.shared.clone();
        let (t, tr) = (token.clone(), tracker.clone());
        tracker.spawn_on(
            async move {
                loop {
                    let stream = tokio::select! {
                        () = t.cancelled() => return,
                        s = listener.accept() => match s {
                            Ok((s, _)) => s,
                            Err(_) => return,
                        },
                    };
                    tr.spawn(serve(stream, shared.clone(), t.clone()));
                }
            },
            self.rt.handle(),
        );
        self.online = Some((token, tracker));
    }

    /// Disappears: stops listening, closes every connection, removes the socket. Returns once
    /// every connection is closed.
    pub fn down(&mut self) {
        let (token, tracker) = self.online.take().expect("already down");
        token.cancel();
        tracker.close();
        self.rt.block_on(tracker.wait());
        std::fs::remove_file(&self.path).unwrap();
    }

    /// Queues a job; `spec` is handed out as is.
    pub fn push(&self, id: u64, spec: serde_json::Value, lease_secs: u64) {
        self.push_attempt(id, spec, lease_secs, 1);
    }

    pub fn push_attempt(&self, id: u64, spec: serde_json::Value, lease_secs: u64, attempt: u32) {
        self.shared.lock().queue.push_back(ClaimedJob {
            id,
            spec,
            attempt,
            lease_secs,
        });
    }

    /// The next `complete` of job `id` is refused.
    pub fn refuse_complete_once(&self, id: u64) {
        self.shared.lock().refuse_complete.insert(id);
    }

    /// From now on every connection is answered with `error` (code `not_allowed`) and closed
    /// at once, as the daemon does for a uid it does not allow.
    pub fn refuse_connections(&self, error: &str) {
        self.shared.lock().refuse_connections = Some(error.to_owned());
    }

    /// From now on `complete_and_claim` is refused as an unknown request, as by an older
    /// daemon.
    pub fn without_complete_and_claim(&self) {
        self.shared.lock().old_daemon = true;
    }

    /// How many connections were refused.
    pub fn refused_connections(&self) -> usize {
        self.shared.lock().refused_connections
    }

    /// From now on, `renew` and `complete` of job `id` are refused: its lease is lost.
    pub fn lose_lease(&self, id: u64) {
        self.shared.lock().lease_lost.insert(id);
    }

    /// The next `complete` of job `id` is received, but the connection closes before the answer.
    pub fn hang_up_on_complete_once(&self, id: u64) {
        self.shared.lock().hang_up_on_complete.insert(id);
    }

    pub fn received(&self) -> Vec<Request> {
        self.shared.lock().received.clone()
    }

    /// Waits until `pred` holds for everything received so far.
    pub fn wait_until(&self, what: &str, pred: impl Fn(&[Request]) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        let mut state = self.shared.lock();
        while !pred(&state.received) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "broker: no {what} within {DEADLINE:?}; received {:#?}",
                state.received
            );
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Waits for a request matching `pred`, and returns it.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&Request) -> bool) -> Request {
        self.wait_until(what, |r| r.iter().any(&pred));
        self.received().into_iter().find(pred).unwrap()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some((token, _)) = self.online.take() {
            token.cancel();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn serve(stream: UnixStream, shared: Arc<BrokerShared>, stop: CancellationToken) {
    let (r, mut w) = stream.into_split();
    let refusal = {
        let mut state = shared.lock();
        let refusal = state.refuse_connections.clone();
        if refusal.is_some() {
            state.refused_connections += 1;
        }
        refusal
    };
    if let Some(error) = refusal {
        shared.changed.notify_all();
        let response = Response::Error {
            error,
            code: Some(watchkeeper_jobs::ErrorCode::NotAllowed),
        };
        let mut out = serde_json::to_vec(&response).unwrap();
        out.push(b'\n');
        let _ = w.write_all(&out).await;
        return;
    }
    let mut lines = BufReader::new(r).lines();
    loop {
        let line = tokio::select! {
            () = stop.cancelled() => return,
            l = lines.next_line() => l,
        };
        let Ok(Some(line)) = line else { return };
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(req) => match shared.handle(req) {
                Some(response) => response,
                None => return,
            },
            Err(e) => Response::error(e.to_string()),
        };
        let mut out = serde_json::to_vec(&response).unwrap();
        out.push(b'\n');
        if w.write_all(&out).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Matching requests

/// The exit code reported for `job` by `req`: a `complete` or a `complete_and_claim`.
pub fn is_complete(req: &Request, job: u64) -> Option<Option<i32>> {
    match req {
        Request::Complete { id, exit_code, .. }
        | Request::CompleteAndClaim { id, exit_code, .. }
            if *id == job =>
        {
            Some(*exit_code)
        }
        _ => None,
    }
}

pub fn count(received: &[Request], pred: impl Fn(&Request) -> bool) -> usize {
    received.iter().filter(|r| pred(r)).count()
}

// ---------------------------------------------------------------------------------------------
// The worker under a fake manager

/// A scratch directory with the broker's socket, the config file and the heartbeat.
pub struct Scene {
    pub dir: tempfile::TempDir,
}

impl Scene {
    pub fn new() -> Self {
        Scene {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn socket(&self) -> PathBuf {
        self.path("daemon.sock")
    }

    pub fn heartbeat(&self) -> PathBuf {
        self.path("state/heartbeat.json")
    }

    /// Writes `worker.toml` with `allowlist` and extra lines; returns its path.
    pub fn config(&self, allowlist: &[&str], extra: &str) -> PathBuf {
        let path = self.path("worker.toml");
        let list: Vec<String> = allowlist.iter().map(|p| format!("{p:?}")).collect();
        std::fs::write(
            &path,
            format!("allowlist = [{}]\n{extra}\n", list.join(", ")),
        )
        .unwrap();
        path
    }

    /// The usual arguments: socket, name `w1`, config, heartbeat, 50 ms polls.
    pub fn args(&self, config: &Path) -> Vec<String> {
        [
            "--socket",
            self.socket().to_str().unwrap(),
            "--name",
            "w1",
            "--config",
            config.to_str().unwrap(),
            "--heartbeat",
            self.heartbeat().to_str().unwrap(),
            "--poll-interval-ms",
            "50",
        ]
        .map(String::from)
        .to_vec()
    }
}

/// The worker binary running as a child of the test. Killed on drop.
pub struct Worker {
    child: Child,
    pub pid: u32,
    stderr: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    pub fn start(manager: &FakeManager, watchdog: Option<Duration>, args: &[String]) -> Self {
        Self::start_with_env(manager, watchdog, args, &[])
    }

    /// [`Worker::start`] with extra environment variables.
    pub fn start_with_env(
        manager: &FakeManager,
        watchdog: Option<Duration>,
        args: &[String],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Self {
        let mut cmd = manager.command(env!("CARGO_BIN_EXE_watchkeeper-worker"), watchdog);
        cmd.envs(env.iter().copied());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("WATCHKEEPER_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let pid = child.id();
        let stderr = Arc::new(Mutex::new(String::new()));
        // Drained continuously, so the worker never blocks on a full pipe.
        let reader = {
            let mut pipe = child.stderr.take().unwrap();
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    stderr
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            })
        };
        Worker {
            child,
            pid,
            stderr,
            reader: Some(reader),
        }
    }

    pub fn signal(&self, sig: Signal) {
        let pid = Pid::from_raw(self.pid as i32).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for the worker to exit, up to `DEADLINE`; returns its status and stderr.
    pub fn wait(mut self) -> (ExitStatus, String) {
        let Some(status) = watchkeeper_testkit::wait_exit(&mut self.child, DEADLINE).unwrap()
        else {
            panic!(
                "worker {} did not exit within {DEADLINE:?}; stderr:\n{}",
                self.pid,
                self.stderr()
            )
        };
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        (status, self.stderr())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Files

/// Waits until the heartbeat at `path` satisfies `pred`; returns it.
pub fn wait_heartbeat(path: &Path, what: &str, pred: impl Fn(&Heartbeat) -> bool) -> Heartbeat {
    let deadline = Instant::now() + DEADLINE;
    let mut last = None;
    loop {
        if let Ok(status) = read_heartbeat(path, Duration::from_secs(120), SystemTime::now())
            && let Some(hb) = status.heartbeat
        {
            if pred(&hb) {
                return hb;
            }
            last = Some(hb);
        }
        assert!(
            Instant::now() < deadline,
            "no heartbeat with {what} within {DEADLINE:?}; last: {last:#?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn read_hb(path: &Path) -> Heartbeat {
    read_heartbeat(path, Duration::from_secs(120), SystemTime::now())
        .unwrap()
        .heartbeat
        .unwrap()
}

/// Waits until `path` exists and returns its contents.
pub fn wait_file(path: &Path) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && s.ends_with('\n')
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{} not written within {DEADLINE:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until process `pid` is gone (or a zombie waiting to be reaped by someone else).
pub fn wait_dead(pid: i32) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            Ok(stat)
                if stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|rest| rest.trim_start().starts_with('Z')) =>
            {
                return;
            }
            Ok(_) => {}
        }
        assert!(Instant::now() < deadline, "process {pid} still alive");
        std::thread::sleep(Duration::from_millis(10));
    }
}
