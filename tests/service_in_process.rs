//! The Service without signals, driven through its request methods: reloads (including one that
//! fails with a multi-line error) and a stop that waits for nested tasks. The runtime has worker
//! threads of its own, since the fake manager's waits block the test's thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use watchkeeper::{Service, State};
use watchkeeper_testkit::FakeManager;

const WAIT: Duration = Duration::from_secs(10);

/// Sends a marker straight to the manager and waits for it: everything sent before has been
/// recorded.
fn settle(manager: &FakeManager) {
    let marker = watchkeeper::Notifier::from_env(&manager.env()).unwrap();
    marker
        .notify(&[watchkeeper::Notification::custom("X_MARK", "end").unwrap()])
        .unwrap();
    manager
        .wait_for("marker", WAIT, |r| r.get("X_MARK") == Some("end"))
        .unwrap();
}

/// A Service pointed at `manager`, without signal handlers (driven through its requests).
fn unsignalled(manager: &FakeManager) -> Service {
    Service::builder("t")
        .env(manager.env())
        .handle_signals(false)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_reload_with_a_multi_line_error_still_ends_with_ready() {
    let manager = FakeManager::start().unwrap();
    let service = unsignalled(&manager);
    service.lifecycle().ready().await.unwrap();
    let lifecycle = service.lifecycle();
    let calls = Arc::new(AtomicUsize::new(0));
    service.request_reload().await;
    let controller = service.controller();
    let counted = calls.clone();
    let run = tokio::spawn(service.run(move || {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            match n {
                0 => Err("config.toml:3:1: expected `=`\n  |\n3 | oops".to_string()),
                _ => Ok(()),
            }
        }
    }));
    let ready = manager
        .wait_for_since(1, "READY=1 after the reload", WAIT, |r| r.has("READY", "1"))
        .unwrap();
    assert_eq!(
        ready.get("STATUS"),
        Some("reload failed: config.toml:3:1: expected `=`   | 3 | oops")
    );
    // The state changes right after the datagram goes out: wait for it, bounded.
    let mut state = lifecycle.subscribe();
    tokio::time::timeout(WAIT, state.wait_for(|s| *s == State::Ready))
        .await
        .unwrap()
        .unwrap();
    controller.request_shutdown().await;
    run.await.unwrap().unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    manager.wait_stopping(WAIT).unwrap();
    manager.check_stopped_cleanly().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_waits_for_tasks_spawned_on_the_tracker_by_other_tasks() {
    let manager = FakeManager::start().unwrap();
    let service = unsignalled(&manager);
    let tracker = service.task_tracker();
    let stop = service.shutdown_token();
    let finished = Arc::new(AtomicUsize::new(0));
    let done = finished.clone();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    service.spawn(async move {
        // An "accept loop" that hands a "connection" to a task of its own.
        let stop2 = stop.clone();
        tracker.spawn(async move {
            let _ = started_tx.send(());
            stop2.cancelled().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            done.fetch_add(1, Ordering::SeqCst);
        });
        stop.cancelled().await;
    });
    service.lifecycle().ready().await.unwrap();
    started_rx.await.unwrap();
    service.request_shutdown().await;
    service.run(watchkeeper::service::no_reload).await.unwrap();
    assert_eq!(
        finished.load(Ordering::SeqCst),
        1,
        "the nested task was waited for"
    );
    manager.wait_stopping(WAIT).unwrap();
    manager.check_stopped_cleanly().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_reload_replaces_an_earlier_reload_failure_in_status() {
    let manager = FakeManager::start().unwrap();
    let service = unsignalled(&manager);
    service
        .lifecycle()
        .ready_with_status("serving v1")
        .await
        .unwrap();
    let controller = service.controller();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let run = tokio::spawn(service.run(move || {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Err("bad config".to_string())
            } else {
                Ok(())
            }
        }
    }));
    controller.request_reload().await;
    manager
        .wait_for("the failure", WAIT, |r| {
            r.get("STATUS") == Some("reload failed: bad config")
        })
        .unwrap();
    let since = manager.len();
    controller.request_reload().await;
    let ready = manager
        .wait_for_since(since, "READY=1 after the good reload", WAIT, |r| {
            r.has("READY", "1")
        })
        .unwrap();
    assert_eq!(ready.get("STATUS"), Some("serving v1"));
    controller.request_shutdown().await;
    run.await.unwrap().unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    manager.wait_stopping(WAIT).unwrap();
    manager.check_stopped_cleanly().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_request_after_the_service_sent_stopping_itself_still_stops() {
    let manager = FakeManager::start().unwrap();
    let service = unsignalled(&manager);
    service.lifecycle().ready().await.unwrap();
    service.lifecycle().stopping().await.unwrap();
    service.request_shutdown().await;
    let report = tokio::time::timeout(WAIT, service.run(watchkeeper::service::no_reload))
        .await
        .expect("run() must return once a stop was requested");
    report.unwrap();
    settle(&manager);
    let stops = manager
        .records()
        .iter()
        .filter(|r| r.has("STOPPING", "1"))
        .count();
    assert_eq!(stops, 1);
    manager.wait_stopping(WAIT).unwrap();
    manager.check_stopped_cleanly().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vsock_notify_socket_runs_unsupervised_instead_of_failing() {
    let env = watchkeeper::SystemdEnv::from_vars([("NOTIFY_SOCKET", "vsock:2:1234")]);
    let service = Service::builder("t")
        .env(env)
        .handle_signals(false)
        .build()
        .unwrap();
    assert_eq!(
        service.lifecycle().ready().await.unwrap(),
        watchkeeper::Delivery::NotSupervised
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_reload_waits_for_the_outcome() {
    let manager = FakeManager::start().unwrap();
    let service = unsignalled(&manager);
    service.lifecycle().ready_with_status("v1").await.unwrap();
    let controller = service.controller();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let run = tokio::spawn(service.run(move || {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 1 {
                Err("broken file".to_string())
            } else {
                Ok(())
            }
        }
    }));
    controller.reload().await.unwrap();
    // RELOADING=1, then READY=1 alone: "v1" is still showing, nothing to restore.
    let records = manager
        .wait_for("READY=1 after RELOADING=1", WAIT, |r| {
            r.seq == 2 && r.has("READY", "1")
        })
        .unwrap();
    assert_eq!(records.get("STATUS"), None);
    assert!(manager.records()[1].get("MONOTONIC_USEC").is_some());
    assert_eq!(
        controller.reload().await,
        Err(watchkeeper::ReloadError::Failed("broken file".into()))
    );
    controller.request_shutdown().await;
    run.await.unwrap().unwrap();
    assert_eq!(
        controller.reload().await,
        Err(watchkeeper::ReloadError::Stopping)
    );
    manager.wait_stopping(WAIT).unwrap();
    manager.check_stopped_cleanly().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_still_queued_when_the_stop_begins_is_answered_at_once() {
    let manager = FakeManager::start().unwrap();
    let service = Service::builder("t")
        .env(manager.env())
        .handle_signals(false)
        .stop_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    service.lifecycle().ready().await.unwrap();
    let controller = service.controller();
    // A tracked task (say, a connection) waits for a reload's answer, as the daemon's reload
    // request does; the stop waits for that task.
    let (queued_tx, queued) = tokio::sync::oneshot::channel();
    let waiter = {
        let controller = controller.clone();
        service.spawn(async move {
            let mut reload = Box::pin(controller.reload());
            // Polled once: the request is queued, then it waits for its answer.
            tokio::select! {
                biased;
                r = &mut reload => return r,
                () = std::future::ready(()) => {}
            }
            let _ = queued_tx.send(());
            reload.await
        })
    };
    queued.await.unwrap();
    // The stop begins before run() takes the reload from its queue.
    controller.request_shutdown().await;
    let report = tokio::time::timeout(WAIT, service.run(watchkeeper::service::no_reload))
        .await
        .unwrap();
    assert!(
        report.is_ok(),
        "the stop waited for the queued reload: {report:?}"
    );
    assert_eq!(
        waiter.await.unwrap(),
        Err(watchkeeper::ReloadError::Stopping)
    );
}

/// Stops the manager reading and fills its queue. Returns how many records the manager will
/// hold once it has read the queue, for [`resume_and_drain`].
fn fill_queue(manager: &FakeManager) -> usize {
    let filler = watchkeeper::Notifier::from_env(&manager.env()).unwrap();
    manager.pause();
    let mut queued = 0;
    while filler
        .notify(&[watchkeeper::Notification::custom("X_FILL", "1").unwrap()])
        .is_ok()
    {
        queued += 1;
        assert!(queued < 10_000, "queue never filled");
    }
    manager.len() + queued
}

/// Lets the manager read again and waits (blocking) until it has read the fillers.
fn resume_and_drain(manager: &FakeManager, filled: usize) {
    manager.resume();
    manager
        .wait_for("the queued datagrams", WAIT, |r| r.seq + 1 >= filled)
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_whose_request_was_dropped_still_happens_and_a_later_request_finds_it() {
    let manager = FakeManager::start().unwrap();
    let service = unsignalled(&manager);
    service.lifecycle().ready().await.unwrap();
    let stop = service.shutdown_token();
    let controller = service.controller();
    let run = tokio::spawn(service.run(watchkeeper::service::no_reload));

    // STOPPING=1 meets a full queue and the requester gives up waiting (a timeout around it).
    fill_queue(&manager);
    let gave_up =
        tokio::time::timeout(Duration::from_millis(50), controller.request_shutdown()).await;
    assert!(gave_up.is_err(), "STOPPING=1 cannot have gone out");
    // The stop went on without its requester: the tasks are told at once.
    tokio::time::timeout(WAIT, stop.cancelled())
        .await
        .expect("the shutdown token is cancelled although the request was dropped");

    // PID 1 reads again; a later request (a second SIGTERM) finds the stop under way.
    manager.resume();
    tokio::time::timeout(WAIT, controller.request_shutdown())
        .await
        .expect("the later request returns once STOPPING=1 is out");
    let report = tokio::time::timeout(WAIT, run)
        .await
        .expect("run() returns: the stop was not lost");
    report.unwrap().unwrap();
    manager.wait_stopping(WAIT).unwrap();
    manager.check_stopped_cleanly().unwrap();
}

/// READY=1 and STOPPING=1 wait for a full queue as long as the start or the stop may take
/// (sd_notify() would block), not 2 s. Under tokio's paused clock: the 5 s below pass at once.
#[tokio::test(start_paused = true)]
async fn ready_and_stopping_outlast_a_full_queue() {
    let manager = FakeManager::start().unwrap();
    let service = Service::builder("t")
        .env(manager.env())
        .handle_signals(false)
        .start_timeout(Duration::from_secs(60))
        .stop_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let lifecycle = service.lifecycle();

    let filled = fill_queue(&manager);
    let ready = tokio::spawn(async move { lifecycle.ready().await });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!ready.is_finished(), "READY=1 gave up: {:?}", ready.await);
    resume_and_drain(&manager, filled);
    assert_eq!(ready.await.unwrap().unwrap(), watchkeeper::Delivery::Sent);
    manager.wait_ready(WAIT).unwrap();

    let filled = fill_queue(&manager);
    let controller = service.controller();
    let stop = tokio::spawn(async move { controller.request_shutdown().await });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!stop.is_finished(), "STOPPING=1 gave up");
    resume_and_drain(&manager, filled);
    stop.await.unwrap();
    manager.wait_stopping(WAIT).unwrap();
    service.run(watchkeeper::service::no_reload).await.unwrap();
    manager.check_stopped_cleanly().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_never_waits_and_only_the_latest_text_reaches_a_busy_manager() {
    let manager = FakeManager::start().unwrap();
    let service = unsignalled(&manager);
    let lifecycle = service.lifecycle();
    service.lifecycle().ready().await.unwrap();

    let filled = fill_queue(&manager);
    for text in ["one", "two", "three"] {
        assert_eq!(
            lifecycle.status(text).unwrap(),
            watchkeeper::Delivery::Pending,
            "a full queue keeps the text for later"
        );
    }
    assert_eq!(lifecycle.last_status().as_deref(), Some("three"));
    resume_and_drain(&manager, filled);
    manager
        .wait_for("the latest status", WAIT, |r| {
            r.get("STATUS") == Some("three")
        })
        .unwrap();
    settle(&manager);
    let statuses: Vec<String> = manager
        .records()
        .iter()
        .filter_map(|r| r.get("STATUS").map(str::to_owned))
        .collect();
    assert_eq!(statuses, ["three"], "older pending texts were replaced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_after_a_good_reload_does_not_resend_an_older_status() {
    let manager = FakeManager::start().unwrap();
    let service = Service::builder("t")
        .env(manager.env_with_watchdog(Duration::from_millis(400)))
        .handle_signals(false)
        .build()
        .unwrap();
    // A loop that never ticks: the keeper shows the stall in STATUS=.
    let _stalled = service.register_loop("poll");
    service
        .lifecycle()
        .ready_with_status("serving")
        .await
        .unwrap();
    let controller = service.controller();
    let run = tokio::spawn(service.run(watchkeeper::service::no_reload));
    let stall = manager
        .wait_for("the stall in STATUS", WAIT, |r| {
            r.get("STATUS").is_some_and(|s| s.starts_with("stalled"))
        })
        .unwrap();
    controller.reload().await.unwrap();
    let ready = manager
        .wait_for_since(stall.seq, "READY=1 after the reload", WAIT, |r| {
            r.has("READY", "1")
        })
        .unwrap();
    assert_eq!(
        ready.get("STATUS"),
        None,
        "READY=1 must not put 'serving' over the stall report"
    );
    controller.request_shutdown().await;
    run.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_fails_stops_the_service_with_its_error() {
    let manager = FakeManager::start().unwrap();
    let service = unsignalled(&manager);
    service.lifecycle().ready().await.unwrap();
    let progress = service.register_loop("fetch");
    service.spawn_named("fetch", async move {
        progress.tick();
        Err::<(), _>(std::io::Error::other("upstream refused the connection"))
    });
    let r = tokio::time::timeout(WAIT, service.run(watchkeeper::service::no_reload))
        .await
        .unwrap();
    match r {
        Err(watchkeeper::ServiceError::TaskFailed { task, error }) => {
            assert_eq!(task, "fetch");
            assert_eq!(error, "upstream refused the connection");
        }
        other => panic!("a failed task must not end in a graceful stop: {other:?}"),
    }
    manager.wait_stopping(WAIT).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_panics_is_not_a_graceful_stop() {
    let manager = FakeManager::start().unwrap();
    let service = unsignalled(&manager);
    service.lifecycle().ready().await.unwrap();
    let fail = Arc::new(AtomicUsize::new(1));
    let handle = service.spawn(async move {
        if fail.load(Ordering::SeqCst) == 1 {
            panic!("index out of bounds");
        }
    });
    assert!(
        handle.await.unwrap_err().is_panic(),
        "the handle still sees the panic"
    );
    let r = tokio::time::timeout(WAIT, service.run(watchkeeper::service::no_reload))
        .await
        .unwrap();
    match r {
        Err(watchkeeper::ServiceError::TaskFailed { task, error }) => {
            assert!(task.starts_with("unnamed task"), "{task}");
            assert_eq!(error, "panicked: index out of bounds");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_running_withholds_the_pings_after_a_task_failed() {
    let manager = FakeManager::start().unwrap();
    let service = Service::builder("t")
        .env(manager.env_with_watchdog(Duration::from_millis(400)))
        .handle_signals(false)
        .on_task_failure(watchkeeper::TaskFailure::KeepRunning)
        .build()
        .unwrap();
    service.lifecycle().ready().await.unwrap();
    manager.wait_ping_since(0, WAIT).unwrap();
    let failed = service.spawn_named("sync", async { Err::<(), _>("disk full") });
    failed.await.unwrap().unwrap_err();
    let status = manager
        .wait_for("the dead task in STATUS=", WAIT, |r| {
            r.get("STATUS") == Some("stalled: no progress in 'sync (failed)'")
        })
        .unwrap();
    // The service runs on, without pings.
    manager.expect_no_ping(Duration::from_millis(800)).unwrap();
    assert!(
        manager.records()[status.seq..].iter().all(|r| !r.is_ping()),
        "{:#?}",
        manager.records()
    );
    let controller = service.controller();
    let run = tokio::spawn(service.run(watchkeeper::service::no_reload));
    controller.request_shutdown().await;
    match tokio::time::timeout(WAIT, run).await.unwrap().unwrap() {
        Err(watchkeeper::ServiceError::TaskFailed { task, error }) => {
            assert_eq!((task.as_str(), error.as_str()), ("sync", "disk full"));
        }
        other => panic!("{other:?}"),
    }
}
