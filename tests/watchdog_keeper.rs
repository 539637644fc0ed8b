//! The watchdog keeper against a fake manager, under tokio's paused clock: cadence, gating on
//! progress, busy windows, triggers, run-time timeout changes and coalescing when the manager's
//! queue is full. Every count below is exact: time only moves when the runtime is idle, and each
//! ping is a synchronous send that completes before the keeper sleeps again.

use std::time::Duration;

use watchkeeper::{Notification, Notifier, Service};
use watchkeeper_testkit::{FakeManager, Record};

const WATCHDOG: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(10);

/// Sends a marker straight to the manager and waits for it (in real time), so that everything
/// the keeper sent before it has been recorded.
fn settle(manager: &FakeManager, notifier: &Notifier, tag: &str) -> Vec<Record> {
    let marker = Notification::custom("X_MARK", tag).unwrap();
    notifier.notify(&[marker]).unwrap();
    manager
        .wait_for(tag, WAIT, |r| r.get("X_MARK") == Some(tag))
        .unwrap();
    let records = manager.records();
    let end = records
        .iter()
        .position(|r| r.get("X_MARK") == Some(tag))
        .unwrap();
    records[..end].to_vec()
}

/// Stops the manager reading and fills its queue; returns how many datagrams it holds.
fn fill_queue(manager: &FakeManager, filler: &Notifier) -> usize {
    manager.pause();
    let mut queued = 0;
    while filler
        .notify(&[Notification::custom("X_FILL", "1").unwrap()])
        .is_ok()
    {
        queued += 1;
        assert!(queued < 10_000, "queue never filled");
    }
    queued
}

fn pings(records: &[Record]) -> usize {
    records.iter().filter(|r| r.is_ping()).count()
}

fn service(manager: &FakeManager) -> Service {
    Service::builder("test")
        .env(manager.env_with_watchdog(WATCHDOG))
        .handle_signals(false)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn pings_every_half_timeout_while_the_loop_ticks_and_stop_when_it_hangs() {
    let manager = FakeManager::start().unwrap();
    let marker = Notifier::from_env(&manager.env()).unwrap();
    let service = service(&manager);
    let progress = service.register_loop("poll");
    let ticker = tokio::spawn(async move {
        // Ticks at 0.05 s, 0.15 s, …, 9.95 s (never on a window's edge), then hangs: keeps its
        // handle and never ticks again.
        tokio::time::sleep(Duration::from_millis(50)).await;
        for _ in 0..100 {
            progress.tick();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        std::future::pending::<()>().await;
        drop(progress);
    });
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    let healthy = settle(&manager, &marker, "healthy");
    // Windows end at 1 s, 2 s, …, 10 s: ten pings.
    assert_eq!(pings(&healthy), 10, "{healthy:#?}");

    tokio::time::sleep(Duration::from_secs(10)).await;
    let all = settle(&manager, &marker, "hung");
    assert_eq!(
        pings(&all),
        10,
        "a hung loop must withhold every later ping"
    );
    let stalled: Vec<_> = all
        .iter()
        .filter_map(|r| r.get("STATUS"))
        .filter(|s| s.starts_with("stalled"))
        .collect();
    assert_eq!(stalled, ["stalled: no progress in 'poll'"], "reported once");
    ticker.abort();
}

#[tokio::test(start_paused = true)]
async fn one_stalled_loop_of_two_withholds_the_ping_and_recovery_restores_status() {
    let manager = FakeManager::start().unwrap();
    let marker = Notifier::from_env(&manager.env()).unwrap();
    let service = service(&manager);
    service
        .lifecycle()
        .ready_with_status("serving")
        .await
        .unwrap();
    let a = service.register_loop("accept");
    let b = service.register_loop("store");
    // Window 1 is free for new loops. Window 2: only `accept` ticks.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.tick();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let w2 = settle(&manager, &marker, "w2");
    assert_eq!(pings(&w2), 1);
    assert_eq!(
        w2.last().unwrap().get("STATUS"),
        Some("stalled: no progress in 'store'")
    );
    // Window 3: both tick; the ping resumes and the service's own status comes back.
    a.tick();
    b.tick();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let w3 = settle(&manager, &marker, "w3");
    assert_eq!(pings(&w3), 2);
    let last_status = w3.iter().filter_map(|r| r.get("STATUS")).next_back();
    assert_eq!(last_status, Some("serving"));
}

#[tokio::test(start_paused = true)]
async fn busy_window_covers_a_slow_job_only_up_to_its_bound() {
    let manager = FakeManager::start().unwrap();
    let marker = Notifier::from_env(&manager.env()).unwrap();
    let service = service(&manager);
    let p = service.register_loop("worker");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let busy = p.busy(Duration::from_millis(2800));
    // Windows at 1, 2, 3 s are inside the bound (ends 3.3 s); 4 s is past it.
    tokio::time::sleep(Duration::from_millis(3_700)).await;
    let r = settle(&manager, &marker, "busy");
    assert_eq!(pings(&r), 3, "{r:#?}");
    drop(busy);
    // Next window ends at 5 s.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let r = settle(&manager, &marker, "done");
    assert_eq!(pings(&r), 4, "the guard's drop counts as progress");
}

#[tokio::test(start_paused = true)]
async fn trigger_is_sent_at_once_with_the_reason() {
    let manager = FakeManager::start().unwrap();
    let service = service(&manager);
    let p = service.register_loop("db");
    p.trigger("connection pool poisoned");
    // Let the keeper run before blocking this thread on the manager.
    tokio::time::sleep(Duration::from_millis(1)).await;
    let r = manager
        .wait_for("WATCHDOG=trigger", WAIT, |r| r.has("WATCHDOG", "trigger"))
        .unwrap();
    assert_eq!(
        r.get("STATUS"),
        Some("watchdog trigger: db: connection pool poisoned")
    );
    assert_eq!(pings(&manager.records()), 0);
}

#[tokio::test(start_paused = true)]
async fn runtime_watchdog_usec_change_is_sent_and_followed() {
    let manager = FakeManager::start().unwrap();
    let marker = Notifier::from_env(&manager.env()).unwrap();
    let service = service(&manager);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    service
        .set_watchdog_timeout(Duration::from_millis(400))
        .await
        .unwrap();
    // New windows of 200 ms from 1.5 s: 1.7, 1.9, 2.1, 2.3 s.
    tokio::time::sleep(Duration::from_millis(850)).await;
    let r = settle(&manager, &marker, "changed");
    assert_eq!(
        r.iter()
            .filter(|r| r.has("WATCHDOG_USEC", "400000"))
            .count(),
        1
    );
    assert_eq!(pings(&r), 1 + 4, "{r:#?}");
}

#[tokio::test(start_paused = true)]
async fn full_queue_coalesces_pending_pings() {
    let manager = FakeManager::start().unwrap();
    let filler = Notifier::from_env(&manager.env()).unwrap();
    let service = service(&manager);
    let queued = fill_queue(&manager, &filler);
    // Three windows pass while the queue stays full: each ping is refused and kept pending.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    manager.resume();
    // Wait until every filler is in.
    manager
        .wait_for("fillers", WAIT, |r| {
            r.get("X_FILL").is_some() && r.seq + 1 >= queued
        })
        .unwrap();
    // The next retry (within 10 ms) sends the one pending ping.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let r = settle(&manager, &filler, "drained");
    assert_eq!(
        pings(&r),
        1,
        "pending pings are coalesced, not stacked: {r:#?}"
    );
    drop(service);
}

#[tokio::test(start_paused = true)]
async fn zero_timeout_turns_the_watchdog_off() {
    let manager = FakeManager::start().unwrap();
    let marker = Notifier::from_env(&manager.env()).unwrap();
    let service = service(&manager);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    service.set_watchdog_timeout(Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let r = settle(&manager, &marker, "off");
    assert_eq!(r.iter().filter(|r| r.has("WATCHDOG_USEC", "0")).count(), 1);
    assert_eq!(pings(&r), 1, "only the ping at 1 s: {r:#?}");
}

#[tokio::test(start_paused = true)]
async fn a_trigger_refused_by_a_full_queue_is_retried() {
    let manager = FakeManager::start().unwrap();
    let filler = Notifier::from_env(&manager.env()).unwrap();
    let service = service(&manager);
    let p = service.register_loop("db");
    let queued = fill_queue(&manager, &filler);
    p.trigger("wedged");
    // The keeper tries at once and every 10 ms while the queue is full.
    tokio::time::sleep(Duration::from_millis(200)).await;
    manager.resume();
    manager
        .wait_for("fillers", WAIT, |r| {
            r.get("X_FILL").is_some() && r.seq + 1 >= queued
        })
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let r = manager
        .wait_for("WATCHDOG=trigger", WAIT, |r| r.has("WATCHDOG", "trigger"))
        .unwrap();
    assert_eq!(r.get("STATUS"), Some("watchdog trigger: db: wedged"));
}
