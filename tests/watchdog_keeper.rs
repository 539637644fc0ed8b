//! The watchdog keeper against a fake manager, under tokio's paused clock: cadence, gating on
//! progress, no ping before `READY=1`, a ping as soon as a late loop ticks, dead loops, busy and
//! idle windows, `peek`, triggers, run-time timeout changes and coalescing when the manager's
//! queue is full. Every count below is exact: time only moves when the runtime is idle, and each
//! ping is a synchronous send that completes before the keeper sleeps again.

use std::time::Duration;

use watchkeeper::watchdog::Verdict;
use watchkeeper::{Notification, Notifier, Service};
use watchkeeper_testkit::{FakeManager, Record};

const WATCHDOG: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(10);

/// Sends a marker straight to the manager and waits for it (in real time), so that everything
/// the keeper sent before it has been recorded.
fn settle(manager: &FakeManager, notifier: &Notifier, tag: &str) -> Vec<Record> {
    let marker = Notification::custom("X_MARK", tag).unwrap();
    // The paused clock lets the keeper send faster than the manager's thread reads: wait (in
    // real time, bounded) for room in its queue.
    let deadline = std::time::Instant::now() + WAIT;
    while let Err(e) = notifier.notify(std::slice::from_ref(&marker)) {
        assert!(
            matches!(e, watchkeeper::NotifyError::QueueFull { .. })
                && std::time::Instant::now() < deadline,
            "{e}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
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

/// A service that sent `READY=1` at the (paused) clock's now; the keeper has seen it.
async fn ready_service(manager: &FakeManager) -> Service {
    let service = service(manager);
    service.lifecycle().ready().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    service
}

fn statuses(records: &[Record]) -> Vec<&str> {
    records.iter().filter_map(|r| r.get("STATUS")).collect()
}

#[tokio::test(start_paused = true)]
async fn pings_every_half_timeout_while_the_loop_ticks_and_stop_when_it_hangs() {
    let manager = FakeManager::start().unwrap();
    let marker = Notifier::from_env(&manager.env()).unwrap();
    let service = ready_service(&manager).await;
    let progress = service.register_loop("poll");
    let ticker = tokio::spawn(async move {
        // Ticks at 0.05 s, 0.15 s, …, 9.95 s (never on a ping's instant), then hangs: keeps its
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
    // READY=1 at 0; pings at 1 s, 2 s, …, 10 s.
    assert_eq!(pings(&healthy), 10, "{healthy:#?}");

    tokio::time::sleep(Duration::from_secs(10)).await;
    let all = settle(&manager, &marker, "hung");
    assert_eq!(
        pings(&all),
        10,
        "a hung loop must withhold every later ping"
    );
    let stalled: Vec<_> = statuses(&all)
        .into_iter()
        .filter(|s| s.starts_with("stalled"))
        .collect();
    assert_eq!(stalled, ["stalled: no progress in 'poll'"], "reported once");
    ticker.abort();
}

#[tokio::test(start_paused = true)]
async fn no_ping_before_ready_and_ready_arms_the_cadence() {
    let manager = FakeManager::start().unwrap();
    let marker = Notifier::from_env(&manager.env()).unwrap();
    let service = service(&manager);
    let progress = service.register_loop("init");
    let ticker = tokio::spawn(async move {
        loop {
            progress.tick();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // A slow start: 5 s, two and a half timeouts, with the loop ticking all along.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let starting = settle(&manager, &marker, "starting");
    assert_eq!(
        pings(&starting),
        0,
        "WATCHDOG=1 before READY=1: {starting:#?}"
    );
    service.lifecycle().ready().await.unwrap();
    tokio::time::sleep(Duration::from_millis(999)).await;
    assert_eq!(pings(&settle(&manager, &marker, "just before")), 0);
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert_eq!(
        pings(&settle(&manager, &marker, "half after ready")),
        1,
        "the first ping half a timeout after READY=1"
    );
    ticker.abort();
}

#[tokio::test(start_paused = true)]
async fn a_late_iteration_is_pinged_as_soon_as_it_ends() {
    let manager = FakeManager::start().unwrap();
    let marker = Notifier::from_env(&manager.env()).unwrap();
    let service = service(&manager);
    let progress = service.register_loop("slow");
    service.lifecycle().ready().await.unwrap();
    // Iterations of 0.9 T: each tick must be followed by a ping at once, never at a later
    // window's edge (which would leave more than T between two pings).
    for i in 1..=20 {
        tokio::time::sleep(WATCHDOG * 9 / 10).await;
        let before = pings(&settle(&manager, &marker, &format!("before {i}")));
        assert_eq!(before, i - 1, "iteration {i}: a ping without a tick");
        progress.tick();
        tokio::time::sleep(Duration::from_millis(1)).await;
        let r = settle(&manager, &marker, &format!("iteration {i}"));
        assert_eq!(
            pings(&r),
            i,
            "iteration {i}: no ping right after the tick: {r:#?}"
        );
    }
    progress.retire();
}

#[tokio::test(start_paused = true)]
async fn a_loop_that_ends_stops_the_pings_unless_it_retires() {
    let manager = FakeManager::start().unwrap();
    let marker = Notifier::from_env(&manager.env()).unwrap();
    let service = ready_service(&manager).await;
    let ended = service.register_loop("poll");
    let retired = service.register_loop("setup");
    // The loop's task returns (an error through `?`, say): its Progress is dropped.
    let task = service.spawn(async move {
        drop(ended);
    });
    task.await.unwrap();
    retired.retire();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let r = settle(&manager, &marker, "ended");
    assert_eq!(
        pings(&r),
        0,
        "a service whose loop ended must not ping: {r:#?}"
    );
    assert_eq!(statuses(&r), ["stalled: no progress in 'poll (ended)'"]);
    assert_eq!(
        service.watchdog().peek(),
        Verdict::Stalled(vec!["poll (ended)".into()])
    );
}

#[tokio::test(start_paused = true)]
async fn a_retired_loop_leaves_the_pings_going() {
    let manager = FakeManager::start().unwrap();
    let marker = Notifier::from_env(&manager.env()).unwrap();
    let service = ready_service(&manager).await;
    service.register_loop("setup").retire();
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let r = settle(&manager, &marker, "retired");
    assert_eq!(pings(&r), 3, "{r:#?}");
    assert!(statuses(&r).is_empty(), "{r:#?}");
}

#[tokio::test(start_paused = true)]
async fn peek_does_not_flap_on_a_healthy_loop() {
    let manager = FakeManager::start().unwrap();
    let service = ready_service(&manager).await;
    let progress = service.register_loop("poll");
    let ticker = tokio::spawn(async move {
        // Ticks at 0.25 s, 0.75 s, …: never at a ping's instant.
        tokio::time::sleep(Duration::from_millis(250)).await;
        loop {
            progress.tick();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let mut verdicts = Vec::new();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(130)).await;
        verdicts.push(service.watchdog().peek());
    }
    let stalled = verdicts.iter().filter(|v| **v != Verdict::Healthy).count();
    assert_eq!(stalled, 0, "{verdicts:?}");
    ticker.abort();
}

#[tokio::test(start_paused = true)]
async fn a_stall_stays_visible_before_the_services_own_status() {
    let manager = FakeManager::start().unwrap();
    let marker = Notifier::from_env(&manager.env()).unwrap();
    let service = ready_service(&manager).await;
    let lc = service.lifecycle();
    lc.status("serving").unwrap();
    let progress = service.register_loop("db");
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The service updates its own status while the loop is stalled: the stall stays first.
    lc.status("serving 3 clients").unwrap();
    let r = settle(&manager, &marker, "stalled");
    assert_eq!(
        statuses(&r),
        [
            "serving",
            "stalled: no progress in 'db' \u{2014} serving",
            "stalled: no progress in 'db' \u{2014} serving 3 clients",
        ]
    );
    progress.tick();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let r = settle(&manager, &marker, "recovered");
    assert_eq!(statuses(&r).last(), Some(&"serving 3 clients"));
    assert_eq!(lc.last_status().as_deref(), Some("serving 3 clients"));
    progress.retire();
}

#[tokio::test(start_paused = true)]
async fn one_stalled_loop_of_two_withholds_the_ping_and_recovery_restores_status() {
    let manager = FakeManager::start().unwrap();
    let marker = Notifier::from_env(&manager.env()).unwrap();
    let service = service(&manager);
    let a = service.register_loop("accept");
    let b = service.register_loop("store");
    service
        .lifecycle()
        .ready_with_status("serving")
        .await
        .unwrap();
    // Only `accept` ticks: no ping; `store` is reported 3T/4 (1.5 s) after READY=1.
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.tick();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let r = settle(&manager, &marker, "stalled");
    assert_eq!(pings(&r), 0);
    assert_eq!(
        statuses(&r).last(),
        Some(&"stalled: no progress in 'store' \u{2014} serving")
    );
    // `store` ticks: the ping goes out at once and the service's own status comes back.
    b.tick();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let r = settle(&manager, &marker, "recovered");
    assert_eq!(pings(&r), 1);
    assert_eq!(statuses(&r).last(), Some(&"serving"));
}

#[tokio::test(start_paused = true)]
async fn busy_window_covers_a_slow_job_only_up_to_its_bound() {
    let manager = FakeManager::start().unwrap();
    let marker = Notifier::from_env(&manager.env()).unwrap();
    let service = ready_service(&manager).await;
    let p = service.register_loop("worker");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let busy = p.busy(Duration::from_millis(2800));
    // Pings at 1, 2, 3 s are inside the bound (ends 3.3 s); none after it.
    tokio::time::sleep(Duration::from_millis(3_700)).await;
    let r = settle(&manager, &marker, "busy");
    assert_eq!(pings(&r), 3, "{r:#?}");
    drop(busy);
    // The guard's drop at 4.2 s is the awaited tick: a ping at once.
    tokio::time::sleep(Duration::from_millis(1)).await;
    let r = settle(&manager, &marker, "done");
    assert_eq!(pings(&r), 4, "the guard's drop counts as progress");
}

#[tokio::test(start_paused = true)]
async fn an_idle_loop_keeps_the_pings_going_without_being_woken() {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};

    /// An outside event that never comes, counting its polls.
    struct Never(Arc<AtomicUsize>);
    impl Future for Never {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Poll::Pending
        }
    }

    let manager = FakeManager::start().unwrap();
    let marker = Notifier::from_env(&manager.env()).unwrap();
    let service = ready_service(&manager).await;
    let progress = service.register_loop("accept");
    let polls = Arc::new(AtomicUsize::new(0));
    let idle = tokio::spawn({
        let polls = polls.clone();
        async move {
            progress.idle(Never(polls)).await;
            progress.retire();
        }
    });
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    let r = settle(&manager, &marker, "idle");
    assert_eq!(pings(&r), 10, "{r:#?}");
    assert!(statuses(&r).is_empty(), "{r:#?}");
    assert_eq!(polls.load(Ordering::SeqCst), 1, "the idle loop was woken");
    idle.abort();
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
    let service = ready_service(&manager).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    service
        .set_watchdog_timeout(Duration::from_millis(400))
        .await
        .unwrap();
    // A ping at 1 s; from 1.5 s, pings every 200 ms after the last: at once (1.5 s, more than
    // 200 ms after the last), then 1.7, 1.9, 2.1, 2.3 s.
    tokio::time::sleep(Duration::from_millis(850)).await;
    let r = settle(&manager, &marker, "changed");
    assert_eq!(
        r.iter()
            .filter(|r| r.has("WATCHDOG_USEC", "400000"))
            .count(),
        1
    );
    assert_eq!(pings(&r), 1 + 1 + 4, "{r:#?}");
}

#[tokio::test(start_paused = true)]
async fn full_queue_coalesces_pending_pings() {
    let manager = FakeManager::start().unwrap();
    let filler = Notifier::from_env(&manager.env()).unwrap();
    let service = ready_service(&manager).await;
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
    let service = ready_service(&manager).await;
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
