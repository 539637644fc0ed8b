//! The notify transport against real sockets: abstract and path addresses, reconnection when
//! the manager re-creates its socket, a full queue, barriers.

use std::os::unix::net::UnixDatagram;
use std::sync::mpsc;
use std::time::Duration;

use watchkeeper::{Delivery, Notification, Notifier, NotifyAddr, NotifyError, SystemdEnv};
use watchkeeper_testkit::FakeManager;

const DEADLINE: Duration = Duration::from_secs(10);

#[test]
fn abstract_socket_receives_the_exact_bytes() {
    let manager = FakeManager::start().unwrap();
    assert!(matches!(manager.addr(), NotifyAddr::Abstract(_)));
    let value = manager.notify_socket();
    assert!(value.to_str().unwrap().starts_with('@'));
    let n = Notifier::from_env(&SystemdEnv::from_vars([("NOTIFY_SOCKET", &value)])).unwrap();
    let sent = n
        .notify(&[Notification::Ready, Notification::status("up").unwrap()])
        .unwrap();
    assert_eq!(sent, Delivery::Sent);
    let r = manager.wait_ready(DEADLINE).unwrap();
    assert_eq!(r.payload, "READY=1\nSTATUS=up");
}

#[test]
fn reconnects_when_the_manager_recreates_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let first = FakeManager::start_at(&path).unwrap();
    let n = Notifier::from_env(&first.env()).unwrap();
    n.notify(&[Notification::status("one").unwrap()]).unwrap();
    first
        .wait_for("one", DEADLINE, |r| r.payload == "STATUS=one")
        .unwrap();
    drop(first); // removes the socket file, like a manager going away

    let e = n
        .notify(&[Notification::status("lost").unwrap()])
        .unwrap_err();
    assert!(e.to_string().contains(path.to_str().unwrap()), "{e}");

    let second = FakeManager::start_at(&path).unwrap();
    n.notify(&[Notification::status("two").unwrap()]).unwrap();
    second
        .wait_for("two", DEADLINE, |r| r.payload == "STATUS=two")
        .unwrap();
    assert_eq!(second.len(), 1);
}

#[test]
fn full_queue_is_reported_at_once_not_blocked_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("never-read");
    let _rx = UnixDatagram::bind(&path).unwrap();
    let n = Notifier::connect(NotifyAddr::Path(path)).unwrap();
    // On another thread, so that a blocking send fails the test instead of hanging it.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = 0usize;
        let err = loop {
            match n.notify(&[Notification::Watchdog]) {
                Ok(_) => sent += 1,
                Err(e) => break e,
            }
            if sent > 100_000 {
                break NotifyError::Empty;
            }
        };
        let _ = tx.send((sent, err));
    });
    let (sent, err) = rx
        .recv_timeout(DEADLINE)
        .expect("send blocked on a full queue");
    assert!(matches!(err, NotifyError::QueueFull { .. }), "{err}");
    assert!(sent >= 1, "the queue took nothing");
}

#[test]
fn barrier_times_out_when_the_manager_does_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deaf");
    let _rx = UnixDatagram::bind(&path).unwrap();
    let n = Notifier::connect(NotifyAddr::Path(path)).unwrap();
    let e = n.barrier(Duration::from_millis(50)).unwrap_err();
    assert!(matches!(e, NotifyError::BarrierTimeout { .. }), "{e}");
}

#[tokio::test]
async fn async_barrier_returns_once_earlier_messages_are_processed() {
    let manager = FakeManager::start().unwrap();
    let n = Notifier::from_env(&manager.env()).unwrap();
    n.notify(&[Notification::status("before").unwrap()])
        .unwrap();
    assert_eq!(n.barrier_async(DEADLINE).await.unwrap(), Delivery::Sent);
    // The barrier is acknowledged only after everything before it was recorded.
    let records = manager.records();
    assert_eq!(records[0].payload, "STATUS=before");
    assert_eq!(records[1].payload, "BARRIER=1");
}
