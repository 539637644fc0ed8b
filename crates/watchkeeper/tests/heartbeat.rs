//! A reader racing a writer must only ever see whole heartbeats, in order.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use watchkeeper::SystemdEnv;
use watchkeeper::heartbeat::{HealthStatus, Heartbeat, HeartbeatWriter, check_heartbeat};

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
                assert!(
                    hb.cycle_count >= last,
                    "cycle_count went back from {last} to {}",
                    hb.cycle_count
                );
                last = hb.cycle_count;
                if hb.cycle_count > 0 {
                    let blob = hb.extra["blob"].as_str().expect("blob is a string");
                    assert_eq!(blob.len(), payload_len(hb.cycle_count));
                    assert!(
                        blob.bytes()
                            .all(|b| b == b'a' + (hb.cycle_count % 26) as u8)
                    );
                    assert_eq!(hb.extra["cycle"], hb.cycle_count);
                    assert_eq!(hb.jobs_completed, hb.cycle_count * 3);
                }
                seen.insert(hb.cycle_count);
                reads += 1;
                if finished {
                    return (seen, last, reads);
                }
            }
        })
    };

    for i in 1..=WRITES {
        hb.cycle_count = i;
        hb.jobs_completed = i * 3;
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
