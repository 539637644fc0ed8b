//! The fault drills, each as an operator would see it: a watchdog restart (hang), a crash
//! restart (abort), a stale heartbeat while active, and a service activating for a long time.

mod common;

use std::os::unix::process::ExitStatusExt as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Broker, DEADLINE, Scene, Worker, read_hb, wait_heartbeat};
use rustix::process::Signal;
use watchkeeper::heartbeat::{HealthStatus, read_heartbeat};
use watchkeeper_testkit::FakeManager;

const SIGABRT: i32 = 6;

fn with(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn hang_after_stops_the_pings_and_freezes_the_heartbeat() {
    let scene = Scene::new();
    let _broker = Broker::start(&scene.socket());
    let manager = FakeManager::start().unwrap();
    let config = scene.config(&["sh"], "");
    let watchdog = Duration::from_secs(1);
    let args = with(scene.args(&config), &["--drill-hang-after", "5"]);
    let worker = Worker::start(&manager, Some(watchdog), &args);
    manager.wait_ready(DEADLINE).unwrap();

    let stalled = manager
        .wait_for("STATUS=stalled", DEADLINE, |r| {
            r.get("STATUS")
                .is_some_and(|s| s.starts_with("stalled: no progress in 'poll'"))
        })
        .unwrap();
    let frozen = read_hb(&scene.heartbeat());
    assert_eq!(frozen.counter("cycle_count"), 5);
    assert_eq!(frozen.pid, worker.pid);

    // A whole watchdog timeout without a ping: systemd fires now.
    manager.expect_no_ping(watchdog).unwrap();
    assert!(
        manager.records()[stalled.seq..]
            .iter()
            .all(|r| !r.is_ping())
    );
    assert_eq!(read_hb(&scene.heartbeat()), frozen, "heartbeat advanced");
    assert!(
        worker.stderr().contains("drill: the poll loop hangs now"),
        "{}",
        worker.stderr()
    );

    // What systemd does when the watchdog fires.
    worker.signal(Signal::ABORT);
    let (status, _) = worker.wait();
    assert_eq!(status.signal(), Some(SIGABRT));
}

#[test]
fn crash_after_aborts_the_process() {
    let scene = Scene::new();
    let _broker = Broker::start(&scene.socket());
    let manager = FakeManager::start().unwrap();
    let config = scene.config(&["sh"], "");
    let args = with(scene.args(&config), &["--drill-crash-after", "3"]);
    let worker = Worker::start(&manager, None, &args);
    manager.wait_ready(DEADLINE).unwrap();
    let pid = worker.pid;

    let (status, stderr) = worker.wait();
    assert_eq!(status.signal(), Some(SIGABRT), "{status}\n{stderr}");
    assert!(stderr.contains("drill: crashing"), "{stderr}");
    // No orderly stop: a crash, which Restart=on-failure restarts.
    assert!(!manager.records().iter().any(|r| r.has("STOPPING", "1")));
    let last = read_hb(&scene.heartbeat());
    assert_eq!((last.counter("cycle_count"), last.pid), (3, pid));
    assert_eq!(last.health_status, HealthStatus::Ok);
}

#[test]
fn stale_heartbeat_while_the_pings_continue() {
    let scene = Scene::new();
    let _broker = Broker::start(&scene.socket());
    let manager = FakeManager::start().unwrap();
    let config = scene.config(&["sh"], "");
    let watchdog = Duration::from_secs(1);
    let args = with(scene.args(&config), &["--drill-stale-heartbeat-after", "3"]);
    let worker = Worker::start(&manager, Some(watchdog), &args);
    manager.wait_ready(DEADLINE).unwrap();

    let frozen = wait_heartbeat(&scene.heartbeat(), "3 cycles", |hb| {
        hb.counter("cycle_count") == 3
    });
    // Four pings: at least 1.5 s of a loop making progress.
    let mut since = manager.len();
    for _ in 0..4 {
        since = manager.wait_ping_since(since, DEADLINE).unwrap().seq + 1;
    }
    let now = SystemTime::now();
    let now_secs = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
    assert!(now_secs > frozen.timestamp_unix);
    let status = read_heartbeat(&scene.heartbeat(), Duration::ZERO, now).unwrap();
    assert_eq!(
        status.heartbeat.as_ref(),
        Some(&frozen),
        "heartbeat advanced"
    );
    assert!(!status.fresh);
    assert!(
        !manager
            .records()
            .iter()
            .any(|r| r.get("STATUS").is_some_and(|s| s.starts_with("stalled"))),
        "the loop is not stalled: {:?}",
        manager.records()
    );

    worker.signal(Signal::TERM);
    let (status, stderr) = worker.wait();
    assert!(status.success(), "{status}\n{stderr}");
    assert!(
        stderr.contains("drill: no longer writing the heartbeat"),
        "{stderr}"
    );
    assert_eq!(read_hb(&scene.heartbeat()), frozen);
    manager.wait_stopping(DEADLINE).unwrap();
    manager.check_stopped_cleanly().unwrap();
}

#[test]
fn slow_start_extends_the_start_timeout_before_ready() {
    let scene = Scene::new();
    let broker = Broker::start(&scene.socket());
    let manager = FakeManager::start().unwrap();
    let config = scene.config(&["sh"], "");
    let args = with(scene.args(&config), &["--drill-slow-start", "2"]);
    let worker = Worker::start(&manager, None, &args);

    let ready = manager.wait_ready(DEADLINE).unwrap();
    let records = manager.records();
    let extends: Vec<_> = records[..ready.seq]
        .iter()
        .filter(|r| r.get("EXTEND_TIMEOUT_USEC").is_some())
        .collect();
    assert!(extends.len() >= 2, "{records:?}");
    assert!(
        extends
            .iter()
            .all(|r| r.get("EXTEND_TIMEOUT_USEC") == Some("3000000")),
        "{extends:?}"
    );
    assert!(
        records[..ready.seq]
            .iter()
            .any(|r| r.get("STATUS") == Some("starting: slow-start drill, 2s left")),
        "{records:?}"
    );
    // READY=1 comes after the slow start.
    let waited = ready.at - extends[0].at;
    assert!(waited >= Duration::from_millis(1800), "{waited:?}");
    assert!(!broker.received().is_empty());

    worker.signal(Signal::TERM);
    let (status, stderr) = worker.wait();
    assert!(status.success(), "{status}\n{stderr}");
    manager.wait_stopping(DEADLINE).unwrap();
    manager.check_stopped_cleanly().unwrap();
}
