//! The delivery guarantee as a job sees it: a job whose lease is lost is killed at once (the
//! daemon may already have handed it to another worker), and every job knows its id, attempt
//! and worker for idempotence.

mod common;

use common::{Broker, Scene, Worker, count, wait_dead, wait_file};
use rustix::process::Signal;
use serde_json::json;
use watchkeeper_jobs::Request;
use watchkeeper_testkit::FakeManager;

#[test]
fn a_job_whose_lease_is_lost_is_killed_with_its_process_group() {
    let scene = Scene::new();
    let broker = Broker::start(&scene.socket());
    let manager = FakeManager::start().unwrap();
    let config = scene.config(&["sh"], "");
    let pids = scene.path("pids");
    // The job and a grandchild in its group, both sleeping far beyond the test.
    let script = format!(
        "sleep 300 & echo \"$$ $!\" > {}.tmp && mv {0}.tmp {0}; wait",
        pids.display()
    );
    // A lease of 1 s: the first renewal is due after a third of it.
    broker.push(
        1,
        json!({"command": ["sh", "-c", script], "timeout_secs": 600}),
        1,
    );
    broker.lose_lease(1);
    let worker = Worker::start(&manager, None, &scene.args(&config));
    let text = wait_file(&pids);
    let mut it = text.split_whitespace().map(|p| p.parse::<i32>().unwrap());
    let (job, grandchild) = (it.next().unwrap(), it.next().unwrap());

    broker.wait_for("a renewal", |r| matches!(r, Request::Renew { id: 1, .. }));
    wait_dead(job);
    wait_dead(grandchild);
    // The line is logged before the kill; stderr is read by a thread: wait for it.
    let deadline = std::time::Instant::now() + common::DEADLINE;
    while !worker.stderr().contains("lease lost") {
        assert!(std::time::Instant::now() < deadline, "{}", worker.stderr());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }

    // Nothing is reported for it: the daemon queues it again by itself.
    worker.signal(Signal::TERM);
    let (status, stderr) = worker.wait();
    assert_eq!(status.code(), Some(0), "{stderr}");
    let received = broker.received();
    assert_eq!(
        count(&received, |r| matches!(
            r,
            Request::Complete { id: 1, .. }
                | Request::CompleteAndClaim { id: 1, .. }
                | Request::Release { id: 1, .. }
        )),
        0,
        "{received:#?}"
    );
}

#[test]
fn a_job_gets_its_id_attempt_and_worker_in_its_environment() {
    let scene = Scene::new();
    let broker = Broker::start(&scene.socket());
    let manager = FakeManager::start().unwrap();
    let config = scene.config(&["sh"], "");
    let out = scene.path("env");
    let script = format!(
        "echo \"$WK_JOB_ID $WK_JOB_ATTEMPT $WK_WORKER\" > {}.tmp && mv {0}.tmp {0}",
        out.display()
    );
    broker.push_attempt(17, json!({"command": ["sh", "-c", script]}), 60, 2);
    let worker = Worker::start(&manager, None, &scene.args(&config));
    assert_eq!(wait_file(&out), "17 2 w1\n");
    broker.wait_for("the outcome", |r| {
        common::is_complete(r, 17) == Some(Some(0))
    });
    worker.signal(Signal::TERM);
    let (status, _) = worker.wait();
    assert_eq!(status.code(), Some(0));
}
