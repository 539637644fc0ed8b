//! The worker binary against a fake broker, under a fake systemd manager: readiness, every job
//! outcome, the heartbeat, a daemon outage and the graceful stop.

mod common;

use std::time::{Duration, Instant};

use common::{
    Broker, DEADLINE, Scene, Worker, count, is_complete, read_hb, wait_dead, wait_file,
    wait_heartbeat,
};
use rustix::process::Signal;
use serde_json::json;
use watchkeeper::heartbeat::HealthStatus;
use watchkeeper_jobs::Request;
use watchkeeper_testkit::FakeManager;

fn status_starts(r: &watchkeeper_testkit::Record, prefix: &str) -> bool {
    r.get("STATUS").is_some_and(|s| s.starts_with(prefix))
}

fn count_pings(manager: &FakeManager, when: impl Fn(Duration) -> bool) -> usize {
    manager
        .records()
        .iter()
        .filter(|r| r.is_ping() && when(r.at))
        .count()
}

/// SIGTERM, exit 0, the protocol held.
fn stop_cleanly(manager: &FakeManager, worker: Worker) -> String {
    worker.signal(Signal::TERM);
    let (status, stderr) = worker.wait();
    assert!(status.success(), "{status}\n{stderr}");
    manager.wait_stopping(DEADLINE).unwrap();
    manager.check_stopped_cleanly().unwrap();
    stderr
}

#[test]
fn ready_only_after_the_daemon_answers() {
    let scene = Scene::new();
    let mut broker = Broker::absent(&scene.socket());
    let manager = FakeManager::start().unwrap();
    let config = scene.config(&["echo"], "backoff_max_ms = 200");
    let worker = Worker::start(&manager, None, &scene.args(&config));

    manager
        .wait_for("STATUS=starting: daemon unreachable", DEADLINE, |r| {
            status_starts(r, "starting: daemon unreachable: cannot connect to")
        })
        .unwrap();
    // The loop cycles (and retries) without the daemon, and says it is starting.
    let hb = wait_heartbeat(&scene.heartbeat(), "10 cycles", |hb| {
        hb.counter("cycle_count") >= 10
    });
    assert_eq!(hb.health_status, HealthStatus::Starting);
    assert!(
        !manager.records().iter().any(|r| r.has("READY", "1")),
        "READY=1 before the daemon answered: {:?}",
        manager.records()
    );
    assert!(broker.received().is_empty());

    broker.up();
    let ready = manager.wait_ready(DEADLINE).unwrap();
    assert_eq!(ready.pid, Some(worker.pid));
    assert_eq!(
        ready.get("STATUS"),
        Some("idle; 0 completed, 0 denied, 0 quarantined")
    );
    // The daemon had answered a ping before READY=1.
    assert_eq!(broker.received().first(), Some(&Request::Ping));
    wait_heartbeat(&scene.heartbeat(), "health ok", |hb| {
        hb.health_status == HealthStatus::Ok
    });
    stop_cleanly(&manager, worker);
}

#[test]
fn allowlisted_job_completes_with_its_exit_code() {
    let scene = Scene::new();
    let broker = Broker::start(&scene.socket());
    let manager = FakeManager::start().unwrap();
    let config = scene.config(&["sh"], "");
    let worker = Worker::start(&manager, Some(Duration::from_secs(2)), &scene.args(&config));
    manager.wait_ready(DEADLINE).unwrap();

    // Exit 9 if the job inherited the worker's supervision variables (it must not).
    let script = r#"test -z "${NOTIFY_SOCKET+x}${WATCHDOG_USEC+x}" || exit 9; exit 3"#;
    broker.push(
        1,
        json!({"command": ["sh", "-c", script], "timeout_secs": 10}),
        30,
    );
    let done = broker.wait_for("complete of job 1", |r| is_complete(r, 1).is_some());
    // Reported with the next claim in one round trip: nothing else is held.
    assert_eq!(
        done,
        Request::CompleteAndClaim {
            id: 1,
            worker: "w1".into(),
            exit_code: Some(3)
        }
    );
    manager
        .wait_for("STATUS idle, 1 completed", DEADLINE, |r| {
            r.get("STATUS") == Some("idle; 1 completed, 0 denied, 0 quarantined")
        })
        .unwrap();
    stop_cleanly(&manager, worker);
    assert_eq!(
        count(&broker.received(), |r| is_complete(r, 1).is_some()),
        1
    );
}

#[test]
fn job_not_on_the_allowlist_is_denied_and_not_run() {
    let scene = Scene::new();
    let broker = Broker::start(&scene.socket());
    let manager = FakeManager::start().unwrap();
    // Exact comparison: "/usr/bin/touch" does not allow "touch".
    let config = scene.config(&["/usr/bin/touch"], "");
    let worker = Worker::start(&manager, None, &scene.args(&config));
    manager.wait_ready(DEADLINE).unwrap();

    let marker = scene.path("marker");
    broker.push(2, json!({"command": ["touch", marker]}), 30);
    let denied = broker.wait_for("deny of job 2", |r| matches!(r, Request::Deny { .. }));
    let Request::Deny {
        id,
        worker: w,
        reason,
    } = denied
    else {
        unreachable!()
    };
    assert_eq!((id, w.as_str()), (2, "w1"));
    assert_eq!(
        reason,
        "program \"touch\" is not on the allowlist of worker w1"
    );
    wait_heartbeat(&scene.heartbeat(), "jobs_denied 1", |hb| {
        hb.counter("jobs_denied") == 1
    });
    stop_cleanly(&manager, worker);
    assert!(!marker.exists(), "a denied job ran");
    assert_eq!(
        count(&broker.received(), |r| is_complete(r, 2).is_some()),
        0
    );
}

#[test]
fn malformed_job_is_quarantined() {
    let scene = Scene::new();
    let broker = Broker::start(&scene.socket());
    let manager = FakeManager::start().unwrap();
    let config = scene.config(&["rm", "sh"], "");
    let worker = Worker::start(&manager, None, &scene.args(&config));
    manager.wait_ready(DEADLINE).unwrap();

    broker.push(3, json!({"command": "rm -rf /"}), 30);
    let q = broker.wait_for("quarantine of job 3", |r| {
        matches!(r, Request::Quarantine { .. })
    });
    let Request::Quarantine { id, reason, .. } = q else {
        unreachable!()
    };
    assert_eq!(id, 3);
    assert!(reason.contains("expected a sequence"), "{reason}");
    wait_heartbeat(&scene.heartbeat(), "jobs_quarantined 1", |hb| {
        hb.counter("jobs_quarantined") == 1
    });
    stop_cleanly(&manager, worker);
}

#[test]
fn job_past_its_timeout_is_killed_and_reported_failed() {
    let scene = Scene::new();
    let broker = Broker::start(&scene.socket());
    let manager = FakeManager::start().unwrap();
    let config = scene.config(&["sh"], "");
    let worker = Worker::start(&manager, Some(Duration::from_secs(1)), &scene.args(&config));
    manager.wait_ready(DEADLINE).unwrap();

    // A grandchild too: the whole process group is killed.
    let pidfile = scene.path("sleep.pid");
    let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
    let pushed = Instant::now();
    let pushed_at = manager.elapsed();
    broker.push(
        4,
        json!({"command": ["sh", "-c", script], "timeout_secs": 1}),
        30,
    );
    let sleeper: i32 = wait_file(&pidfile).trim().parse().unwrap();
    let done = broker.wait_for("complete of job 4", |r| is_complete(r, 4).is_some());
    let done_at = manager.elapsed();
    assert!(pushed.elapsed() >= Duration::from_secs(1));
    assert_eq!(is_complete(&done, 4), Some(None), "no exit code: killed");
    wait_dead(sleeper);
    let hb = wait_heartbeat(&scene.heartbeat(), "jobs_completed 1", |hb| {
        hb.counter("jobs_completed") == 1
    });
    assert_eq!(hb.extra["jobs_failed"], json!(1));
    // The loop kept ticking while the job ran: pings (every 0.5 s) went on.
    let pings = count_pings(&manager, |at| at > pushed_at && at < done_at);
    assert!(pings >= 1, "{:?}", manager.records());
    stop_cleanly(&manager, worker);
}

#[test]
fn heartbeat_counts_outcomes_and_names_the_worker() {
    let scene = Scene::new();
    let broker = Broker::start(&scene.socket());
    let manager = FakeManager::start().unwrap();
    let config = scene.config(&["sh", "/usr/bin/true"], "");
    let worker = Worker::start(&manager, None, &scene.args(&config));
    manager.wait_ready(DEADLINE).unwrap();

    broker.push(1, json!({"command": ["sh", "-c", "exit 0"]}), 30);
    broker.push(2, json!({"command": ["/usr/bin/true"]}), 30);
    broker.push(3, json!({"command": ["sh", "-c", "exit 1"]}), 30);
    broker.push(4, json!({"command": ["true"]}), 30);
    broker.push(5, json!({"command": []}), 30);
    broker.wait_until("five outcomes", |r| {
        count(r, |r| {
            matches!(
                r,
                Request::Complete { .. }
                    | Request::CompleteAndClaim { .. }
                    | Request::Deny { .. }
                    | Request::Quarantine { .. }
            )
        }) == 5
    });
    let hb = wait_heartbeat(&scene.heartbeat(), "the counters", |hb| {
        hb.counter("jobs_completed") == 3
            && hb.counter("jobs_denied") == 1
            && hb.counter("jobs_quarantined") == 1
    });
    assert_eq!(hb.service, "watchkeeper-worker");
    assert_eq!(hb.pid, worker.pid);
    assert_eq!(hb.health_status, HealthStatus::Ok);
    assert_eq!(hb.extra["worker"], json!("w1"));
    assert_eq!(hb.extra["jobs_failed"], json!(1));
    assert_eq!(hb.extra["unreported"], json!(0));
    assert!(hb.counter("cycle_count") >= 5, "{hb:?}");
    manager
        .wait_for("STATUS with the counters", DEADLINE, |r| {
            r.get("STATUS") == Some("idle; 3 completed, 1 denied, 1 quarantined")
        })
        .unwrap();
    let before = hb.counter("cycle_count");
    let later = wait_heartbeat(&scene.heartbeat(), "more cycles", |hb| {
        hb.counter("cycle_count") > before + 3
    });
    assert!(later.timestamp_unix >= hb.timestamp_unix);

    stop_cleanly(&manager, worker);
    let last = read_hb(&scene.heartbeat());
    assert_eq!(last.health_status, HealthStatus::Stopping);
    assert_eq!(last.counter("jobs_completed"), 3);
}

#[test]
fn outcome_held_through_a_daemon_outage_is_reported_after_reconnecting() {
    let scene = Scene::new();
    let mut broker = Broker::start(&scene.socket());
    let manager = FakeManager::start().unwrap();
    let config = scene.config(&["sh"], "backoff_max_ms = 400");
    let watchdog = Duration::from_secs(1);
    let worker = Worker::start(&manager, Some(watchdog), &scene.args(&config));
    manager.wait_ready(DEADLINE).unwrap();

    let gate = scene.path("gate");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.02; done; exit 4",
        gate.display()
    );
    broker.push(
        7,
        json!({"command": ["sh", "-c", script], "timeout_secs": 60}),
        3,
    );
    // Lease 3 s: renewed every second.
    broker.wait_for("renew of job 7", |r| {
        matches!(r, Request::Renew { id: 7, .. })
    });

    broker.down();
    let degraded = manager
        .wait_for("STATUS=degraded", DEADLINE, |r| {
            status_starts(r, "degraded: daemon unreachable: ")
        })
        .unwrap();
    assert!(
        degraded.get("STATUS").unwrap().ends_with("; running job 7"),
        "{degraded:?}"
    );
    std::fs::write(&gate, "").unwrap();
    // The job ended while the daemon was away: its outcome is held.
    let hb = wait_heartbeat(&scene.heartbeat(), "held outcome", |hb| {
        hb.counter("jobs_completed") == 1 && hb.extra["unreported"] == json!(1)
    });
    assert_eq!(hb.health_status, HealthStatus::Degraded);
    // Still making progress while the daemon is away: pings continue.
    let since = manager.len();
    manager.wait_ping_since(since, DEADLINE).unwrap();

    broker.up();
    let done = broker.wait_for("complete of job 7", |r| is_complete(r, 7).is_some());
    assert_eq!(is_complete(&done, 7), Some(Some(4)));
    manager
        .wait_for_since(degraded.seq, "STATUS idle again", DEADLINE, |r| {
            r.get("STATUS") == Some("idle; 1 completed, 0 denied, 0 quarantined")
        })
        .unwrap();
    wait_heartbeat(&scene.heartbeat(), "health ok", |hb| {
        hb.health_status == HealthStatus::Ok && hb.extra["unreported"] == json!(0)
    });
    stop_cleanly(&manager, worker);
    // Reported once, run once.
    let received = broker.received();
    assert_eq!(count(&received, |r| is_complete(r, 7).is_some()), 1);
}

#[test]
fn outcome_whose_report_was_cut_off_is_sent_again() {
    let scene = Scene::new();
    let broker = Broker::start(&scene.socket());
    let manager = FakeManager::start().unwrap();
    let config = scene.config(&["sh"], "");
    let worker = Worker::start(&manager, None, &scene.args(&config));
    manager.wait_ready(DEADLINE).unwrap();

    let runs = scene.path("runs");
    let script = format!("echo run >> {}; exit 5", runs.display());
    broker.hang_up_on_complete_once(11);
    broker.push(11, json!({"command": ["sh", "-c", script]}), 30);
    broker.wait_until("complete sent twice", |r| {
        count(r, |r| is_complete(r, 11) == Some(Some(5))) == 2
    });
    manager
        .wait_for("STATUS=degraded", DEADLINE, |r| {
            status_starts(r, "degraded: daemon unreachable: ")
                && r.get("STATUS").unwrap().contains("closed the connection")
        })
        .unwrap();
    wait_heartbeat(&scene.heartbeat(), "reported", |hb| {
        hb.health_status == HealthStatus::Ok
            && hb.counter("jobs_completed") == 1
            && hb.extra["unreported"] == json!(0)
    });
    stop_cleanly(&manager, worker);
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\n");
}

#[test]
fn refused_outcome_is_not_run_again_when_the_job_comes_back() {
    let scene = Scene::new();
    let broker = Broker::start(&scene.socket());
    let manager = FakeManager::start().unwrap();
    let config = scene.config(&["sh"], "");
    let worker = Worker::start(&manager, None, &scene.args(&config));
    manager.wait_ready(DEADLINE).unwrap();

    let runs = scene.path("runs");
    let script = format!("echo run >> {}; exit 2", runs.display());
    let spec = json!({"command": ["sh", "-c", script]});
    // As if the lease expired during an outage: the daemon refuses the outcome and hands the
    // job out again.
    broker.refuse_complete_once(8);
    broker.push(8, spec.clone(), 30);
    broker.wait_for("refused complete", |r| is_complete(r, 8).is_some());
    broker.push_attempt(8, spec, 30, 2);
    broker.wait_until("second complete", |r| {
        count(r, |r| is_complete(r, 8) == Some(Some(2))) == 2
    });
    let stderr = stop_cleanly(&manager, worker);
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\n", "{stderr}");
    assert!(stderr.contains("instead of running it twice"), "{stderr}");
}

#[test]
fn sigterm_releases_a_job_still_running_after_the_grace_period() {
    let scene = Scene::new();
    let broker = Broker::start(&scene.socket());
    let manager = FakeManager::start().unwrap();
    let config = scene.config(&["sh"], "grace_secs = 1");
    let worker = Worker::start(&manager, Some(Duration::from_secs(2)), &scene.args(&config));
    manager.wait_ready(DEADLINE).unwrap();

    let pidfile = scene.path("job.pid");
    let script = format!("echo $$ > {}; exec sleep 30", pidfile.display());
    broker.push(9, json!({"command": ["sh", "-c", script]}), 30);
    let job_pid: i32 = wait_file(&pidfile).trim().parse().unwrap();
    manager
        .wait_for("STATUS running job 9", DEADLINE, |r| {
            status_starts(r, "running job 9")
        })
        .unwrap();

    let term = Instant::now();
    worker.signal(Signal::TERM);
    manager.wait_stopping(DEADLINE).unwrap();
    manager
        .wait_for("STATUS waiting for the job", DEADLINE, |r| {
            r.get("STATUS") == Some("stopping: waiting up to 1s for job 9")
        })
        .unwrap();
    broker.wait_for("release of job 9", |r| {
        matches!(r, Request::Release { id: 9, .. })
    });
    assert!(
        term.elapsed() >= Duration::from_secs(1),
        "released before the grace period"
    );
    let (status, stderr) = worker.wait();
    assert!(status.success(), "{status}\n{stderr}");
    wait_dead(job_pid);
    manager.wait_stopping(DEADLINE).unwrap();
    manager.check_stopped_cleanly().unwrap();
    assert_eq!(
        count(&broker.received(), |r| is_complete(r, 9).is_some()),
        0
    );
    let hb = read_hb(&scene.heartbeat());
    assert_eq!(hb.health_status, HealthStatus::Stopping);
    assert_eq!(hb.extra["jobs_released"], json!(1));
}

#[test]
fn sigterm_lets_a_job_finish_within_the_grace_period() {
    let scene = Scene::new();
    let broker = Broker::start(&scene.socket());
    let manager = FakeManager::start().unwrap();
    let config = scene.config(&["sh"], "grace_secs = 30");
    let worker = Worker::start(&manager, None, &scene.args(&config));
    manager.wait_ready(DEADLINE).unwrap();

    let gate = scene.path("gate");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.02; done; exit 0",
        gate.display()
    );
    broker.push(10, json!({"command": ["sh", "-c", script]}), 30);
    manager
        .wait_for("STATUS running job 10", DEADLINE, |r| {
            status_starts(r, "running job 10")
        })
        .unwrap();
    worker.signal(Signal::TERM);
    manager
        .wait_for("STATUS waiting for the job", DEADLINE, |r| {
            r.get("STATUS") == Some("stopping: waiting up to 30s for job 10")
        })
        .unwrap();
    // No new claim once stopping.
    let claims = count(&broker.received(), |r| matches!(r, Request::Claim { .. }));
    std::fs::write(&gate, "").unwrap();
    let done = broker.wait_for("complete of job 10", |r| is_complete(r, 10).is_some());
    assert_eq!(is_complete(&done, 10), Some(Some(0)));
    let (status, stderr) = worker.wait();
    assert!(status.success(), "{status}\n{stderr}");
    manager.wait_stopping(DEADLINE).unwrap();
    manager.check_stopped_cleanly().unwrap();
    let received = broker.received();
    assert_eq!(
        count(&received, |r| matches!(r, Request::Claim { .. })),
        claims
    );
    assert_eq!(
        count(&received, |r| matches!(r, Request::Release { .. })),
        0
    );
}

#[test]
fn a_poll_interval_longer_than_the_watchdog_still_feeds_it() {
    let scene = Scene::new();
    let broker = Broker::start(&scene.socket());
    let manager = FakeManager::start().unwrap();
    let config = scene.config(&["sh"], "");
    let mut args = scene.args(&config);
    let at = args.iter().position(|a| a == "--poll-interval-ms").unwrap();
    args[at + 1] = "10000".into();
    let watchdog = Duration::from_secs(1);
    let worker = Worker::start(&manager, Some(watchdog), &args);
    manager.wait_ready(DEADLINE).unwrap();
    let mut since = manager.len();
    for _ in 0..4 {
        since = manager.wait_ping_since(since, DEADLINE).unwrap().seq + 1;
    }
    // The loop ticked every quarter of the watchdog timeout, but asked for work only once.
    assert_eq!(
        count(&broker.received(), |r| matches!(r, Request::Claim { .. })),
        1
    );
    assert!(
        !manager
            .records()
            .iter()
            .any(|r| r.get("STATUS").is_some_and(|s| s.starts_with("stalled"))),
        "{:?}",
        manager.records()
    );
    stop_cleanly(&manager, worker);
}

#[test]
fn bad_config_exits_78_naming_the_file_and_key() {
    let scene = Scene::new();
    let manager = FakeManager::start().unwrap();
    let config = scene.config(&["sh"], "poll_interval_ms = 0");
    let worker = Worker::start(&manager, None, &scene.args(&config));
    let (status, stderr) = worker.wait();
    assert_eq!(status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "config file {}: poll_interval_ms = 0",
            config.display()
        )),
        "{stderr}"
    );
    assert!(manager.is_empty(), "{:?}", manager.records());
}

#[test]
fn outcomes_and_claims_share_a_round_trip_and_an_older_daemon_gets_plain_reports() {
    let scene = Scene::new();
    let broker = Broker::start(&scene.socket());
    let manager = FakeManager::start().unwrap();
    let config = scene.config(&["sh"], "");
    for id in 1..=3 {
        broker.push(id, json!({"command": ["sh", "-c", "exit 0"]}), 30);
    }
    let worker = Worker::start(&manager, None, &scene.args(&config));
    broker.wait_until("three outcomes", |r| {
        (1..=3).all(|id| r.iter().any(|r| is_complete(r, id).is_some()))
    });
    let received = broker.received();
    // One claim for the first job; each outcome carries the claim of the next.
    assert_eq!(
        count(&received, |r| matches!(r, Request::Claim { .. })),
        1,
        "{received:#?}"
    );
    assert_eq!(
        count(&received, |r| matches!(r, Request::CompleteAndClaim { .. })),
        3,
        "{received:#?}"
    );

    // A daemon that does not know the request: the outcome is reported alone, not dropped.
    broker.without_complete_and_claim();
    broker.push(4, json!({"command": ["sh", "-c", "exit 5"]}), 30);
    broker.push(5, json!({"command": ["sh", "-c", "exit 6"]}), 30);
    broker.wait_until("plain completes of 4 and 5", |r| {
        r.iter().any(|r| {
            matches!(
                r,
                Request::Complete {
                    id: 4,
                    exit_code: Some(5),
                    ..
                }
            )
        }) && r.iter().any(|r| {
            matches!(
                r,
                Request::Complete {
                    id: 5,
                    exit_code: Some(6),
                    ..
                }
            )
        })
    });
    stop_cleanly(&manager, worker);
}
