//! A reader racing a writer must only ever see whole heartbeats, in order; the coalescing
//! writer writes the latest heartbeat, rarely, and reports and retries failed writes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use watchkeeper::SystemdEnv;
use watchkeeper::heartbeat::{
    CoalescingHeartbeat, HealthStatus, Heartbeat, HeartbeatError, HeartbeatWriter, WriterStatus,
    check_heartbeat,
};

const WRITES: u64 = 2000;

/// A payload whose length swings between 0 and several KiB, so that consecutive files differ in
/// size and a torn read would show up as a length mismatch or a parse error.
fn payload_len(i: u64) -> usize {
    ((i * 7919) % 97) as usize * 64
}

#[test]
fn concurrent_reader_never_sees_a_torn_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/heartbeat.json");
    let mut writer = HeartbeatWriter::open(&path).unwrap();
    let mut hb = Heartbeat::new("race", &SystemdEnv::default());
    hb.health_status = HealthStatus::Ok;
    writer.write(&hb).unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let path = path.clone();
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut seen = BTreeSet::new();
            let mut last = 0;
            let mut reads = 0u64;
            loop {
                // Read once more after the writer finished, so the last version is seen too.
                let finished = done.load(Ordering::Acquire);
                let st = check_heartbeat(&path, Duration::MAX)
                    .unwrap_or_else(|e| panic!("read {reads} failed: {e:?}"));
                let hb = st.heartbeat.expect("the file always exists");
                assert!(st.found && st.fresh);
                let cycles = hb.counter("cycle_count");
                assert!(
                    cycles >= last,
                    "cycle_count went back from {last} to {cycles}"
                );
                last = cycles;
                if cycles > 0 {
                    let blob = hb.extra["blob"].as_str().expect("blob is a string");
                    assert_eq!(blob.len(), payload_len(cycles));
                    assert!(blob.bytes().all(|b| b == b'a' + (cycles % 26) as u8));
                    assert_eq!(hb.extra["cycle"], cycles);
                    assert_eq!(hb.counter("jobs_completed"), cycles * 3);
                }
                seen.insert(cycles);
                reads += 1;
                if finished {
                    return (seen, last, reads);
                }
            }
        })
    };

    for i in 1..=WRITES {
        hb.set_counter("cycle_count", i).unwrap();
        hb.set_counter("jobs_completed", i * 3).unwrap();
        hb.extra.clear();
        hb.extra.insert("cycle".into(), i.into());
        let fill = char::from(b'a' + (i % 26) as u8);
        hb.extra.insert(
            "blob".into(),
            std::iter::repeat_n(fill, payload_len(i))
                .collect::<String>()
                .into(),
        );
        hb.touch();
        writer.write(&hb).unwrap();
    }
    done.store(true, Ordering::Release);

    let (seen, last, reads) = reader.join().expect("reader thread panicked");
    assert_eq!(last, WRITES, "the final read must see the final heartbeat");
    assert!(
        seen.len() > 1,
        "reader saw only {seen:?} in {reads} reads: it never overlapped the writer"
    );
    let entries: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, ["heartbeat.json"], "temporary file left behind");
}

// ---------------------------------------------------------------------------------------------
// The coalescing writer

const DEADLINE: Duration = Duration::from_secs(20);

fn read(path: &std::path::Path) -> Heartbeat {
    check_heartbeat(path, Duration::MAX)
        .unwrap()
        .heartbeat
        .expect("heartbeat file exists")
}

fn counting(service: &str) -> Heartbeat {
    Heartbeat::new(service, &SystemdEnv::default())
        .with_counters(["cycle_count"])
        .unwrap()
}

/// Waits until the writer's status satisfies `pred`, failing after [`DEADLINE`].
async fn wait_status(
    hb: &CoalescingHeartbeat,
    what: &str,
    pred: impl FnMut(&WriterStatus) -> bool,
) -> WriterStatus {
    let mut rx = hb.subscribe();
    match tokio::time::timeout(DEADLINE, rx.wait_for(pred)).await {
        Ok(Ok(s)) => s.clone(),
        Ok(Err(e)) => panic!("{what}: writer gone: {e}"),
        Err(_) => panic!("{what}: not within {DEADLINE:?}; last {:?}", hb.status()),
    }
}

#[tokio::test]
async fn a_hot_loop_is_written_at_most_once_per_interval_and_the_latest_wins() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hb.json");
    let interval = Duration::from_millis(100);
    let writer = HeartbeatWriter::open(&path)
        .unwrap()
        .spawn_coalescing(interval)
        .unwrap();
    let mut hb = counting("hot");
    let start = Instant::now();
    let mut i = 0u64;
    // Until the writer has written a few times: the loop hands over every cycle.
    while writer.status().writes < 3 {
        i = hb.add_counter("cycle_count", 1).unwrap();
        writer.update(&hb);
        assert!(start.elapsed() < DEADLINE, "{:?}", writer.status());
        if i % 1024 == 0 {
            tokio::task::yield_now().await;
        }
    }
    writer.flush().await.unwrap();
    let elapsed = start.elapsed();
    let st = writer.status();
    assert_eq!(
        read(&path).counter("cycle_count"),
        i,
        "flush wrote the latest"
    );
    // One write at once, then one per interval, plus the flush.
    let bound = 2 + (elapsed.as_nanos() / interval.as_nanos()) as u64;
    assert!(
        st.writes <= bound,
        "{} writes in {elapsed:?} for {i} updates (bound {bound})",
        st.writes
    );
    assert!(i > st.writes * 10, "{i} updates for {} writes", st.writes);
    assert_eq!((st.failures, st.is_failing()), (0, false));
    writer.close().await.unwrap();
    assert_eq!(read(&path).counter("cycle_count"), i);
}

#[tokio::test]
async fn drop_writes_the_latest_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hb.json");
    // An interval far longer than the test: only the drop can write the second heartbeat.
    let writer = HeartbeatWriter::open(&path)
        .unwrap()
        .spawn_coalescing(Duration::from_secs(3600))
        .unwrap();
    let mut hb = counting("dropped");
    writer.update(&hb);
    wait_status(&writer, "first write", |s| s.writes == 1).await;
    hb.set_counter("cycle_count", 41).unwrap();
    writer.update(&hb);
    hb.set_counter("cycle_count", 42).unwrap();
    hb.health_status = HealthStatus::Stopping;
    writer.update(&hb);
    assert_eq!(
        read(&path).counter("cycle_count"),
        0,
        "written before its time"
    );
    drop(writer);
    let got = read(&path);
    assert_eq!(
        (got.counter("cycle_count"), got.health_status),
        (42, HealthStatus::Stopping)
    );
}

#[tokio::test]
async fn a_failed_write_is_reported_then_retried_until_it_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hb.json");
    let writer = HeartbeatWriter::open(&path)
        .unwrap()
        .spawn_coalescing(Duration::from_millis(20))
        .unwrap();
    let mut hb = counting("flaky");
    writer.update(&hb);
    writer.flush().await.unwrap();

    // A directory squatting on the temporary file's name makes every write fail.
    let squatter = dir.path().join(".hb.json.tmp");
    std::fs::create_dir(&squatter).unwrap();
    hb.set_counter("cycle_count", 7).unwrap();
    writer.update(&hb);
    let e = writer.flush().await.unwrap_err();
    assert!(
        matches!(
            &*e,
            HeartbeatError::Io {
                op: "remove stale temporary file",
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.path(), path);
    let st = writer.status();
    assert!(st.is_failing() && st.failures >= 1, "{st:?}");
    assert_eq!(
        read(&path).counter("cycle_count"),
        0,
        "previous heartbeat kept"
    );
    // Retried without another update.
    let failures = st.failures;
    wait_status(&writer, "a retry", |s| s.failures > failures).await;

    std::fs::remove_dir(&squatter).unwrap();
    let st = wait_status(&writer, "recovery", |s| !s.is_failing()).await;
    assert_eq!(st.writes, 2, "{st:?}");
    assert_eq!(read(&path).counter("cycle_count"), 7);
    writer.close().await.unwrap();
}

#[test]
fn works_without_a_runtime_until_an_async_call() {
    // update() and drop need no runtime: a blocking service can use the writer too.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hb.json");
    let writer = HeartbeatWriter::open(&path)
        .unwrap()
        .spawn_coalescing(Duration::from_secs(3600))
        .unwrap();
    let mut hb = counting("blocking");
    hb.set_counter("cycle_count", 3).unwrap();
    writer.update(&hb);
    assert_eq!(writer.path(), path);
    drop(writer);
    assert_eq!(read(&path).counter("cycle_count"), 3);
}
