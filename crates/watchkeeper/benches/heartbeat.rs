//! The cost of handing a heartbeat to the coalescing writer from a hot loop.
//!
//! Run with `cargo bench -p watchkeeper --bench heartbeat`; see `BENCHMARKS.md`.
//!
//! * `heartbeat_update/coalescing`: [`CoalescingHeartbeat::update`] of a typical heartbeat
//!   (four counters, one `extra` field) while the writer thread writes it to a real file at
//!   most every 100 ms: what a work loop pays per cycle.
//! * `heartbeat_update/clone`: `Heartbeat::clone_from` of the same heartbeat, the floor of any
//!   hand-over that keeps the caller's copy.

use std::hint::black_box;
use std::time::Duration;

use criterion::Criterion;
use watchkeeper::SystemdEnv;
use watchkeeper::heartbeat::{HealthStatus, Heartbeat, HeartbeatWriter};

/// A heartbeat as a busy service writes it (the same as in `hot_paths`).
fn sample_heartbeat() -> Heartbeat {
    let env = SystemdEnv::from_vars([("INVOCATION_ID", "6f1c0d2e9a8b4c7d8e9f0a1b2c3d4e5f")]);
    let mut hb = Heartbeat::new("ingest", &env);
    hb.health_status = HealthStatus::Ok;
    for (name, value) in [
        ("cycle_count", 311),
        ("jobs_completed", 1200),
        ("jobs_denied", 3),
        ("jobs_quarantined", 1),
    ] {
        hb.set_counter(name, value).expect("a valid counter name");
    }
    hb.extra.insert("queue_depth".into(), 17.into());
    hb
}

fn heartbeat_update(c: &mut Criterion) {
    let dir = tempfile::Builder::new()
        .prefix("heartbeat-update-bench-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tempdir under the target dir");
    let mut hb = sample_heartbeat();
    let mut group = c.benchmark_group("heartbeat_update");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    group.bench_function("coalescing", |b| {
        let writer = HeartbeatWriter::open(dir.path().join("hb.json"))
            .expect("open writer")
            .spawn_coalescing(Duration::from_millis(100))
            .expect("start the writer thread");
        b.iter(|| {
            // A loop changes a counter each cycle.
            let _ = hb.add_counter("cycle_count", 1);
            writer.update(black_box(&hb));
        });
        let st = writer.status();
        assert!(!st.is_failing(), "{st:?}");
    });

    group.bench_function("clone", |b| {
        let mut copy = hb.clone();
        b.iter(|| {
            let _ = hb.add_counter("cycle_count", 1);
            copy.clone_from(black_box(&hb));
        });
        black_box(&copy);
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    heartbeat_update(&mut c);
    c.final_summary();
}
