//! Benchmarks of watchkeeper's hot paths against a floor and against peer crates.
//!
//! Run with `cargo bench -p watchkeeper --bench hot_paths`; see `BENCHMARKS.md` at the
//! repository root for what each group measures and the latest numbers.
//!
//! * `notify_watchdog`: one `WATCHDOG=1` datagram to a real `AF_UNIX` datagram socket bound in a
//!   tempdir: a bare `UnixDatagram` connected once (`floor`), [`Notifier`] (`watchkeeper`), the
//!   `sd-notify` crate and the `libsystemd` crate.
//! * `progress_tick`: [`watchkeeper::Progress::tick`] on a registered loop.
//! * `heartbeat_write`: [`HeartbeatWriter::write`] against a hand-rolled atomic, durable write of
//!   the same document in the same directory.

use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use watchkeeper::heartbeat::{HealthStatus, Heartbeat, HeartbeatWriter};
use watchkeeper::{Delivery, Notification, Notifier, SystemdEnv, Watchdog};

/// Datagrams sent per timed batch. The receiver's queue holds `net.unix.max_dgram_qlen` (10 by
/// default) datagrams; watchkeeper's socket is non-blocking and reports a full queue as an
/// error, so every batch must fit in the queue, which is drained (untimed) between batches.
const BATCH: u64 = 8;

/// The payload every sender must deliver (`sd-notify` and `libsystemd` add a trailing `\n`).
const WATCHDOG: &[u8] = b"WATCHDOG=1";

/// The bound "manager" end of the notify socket.
struct Receiver {
    sock: UnixDatagram,
}

impl Receiver {
    fn bind(path: &Path) -> Self {
        let sock = UnixDatagram::bind(path).expect("bind the notify socket");
        // A lost datagram must fail the benchmark, not hang it.
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set a receive timeout");
        Receiver { sock }
    }

    /// Receives exactly `n` datagrams, checks that each is `WATCHDOG=1` and that nothing else
    /// is queued.
    fn drain(&self, n: u64) {
        let mut buf = [0u8; 64];
        for i in 0..n {
            let len = self
                .sock
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("datagram {i} of {n} not received: {e}"));
            let got = buf[..len].strip_suffix(b"\n").unwrap_or(&buf[..len]);
            assert_eq!(got, WATCHDOG, "unexpected payload {:?}", &buf[..len]);
        }
        match rustix::net::recv(&self.sock, &mut buf, rustix::net::RecvFlags::DONTWAIT) {
            Err(rustix::io::Errno::AGAIN) => {}
            other => panic!("more datagrams than sends: {other:?}"),
        }
    }

    /// Times `iters` calls of `send` in batches of at most [`BATCH`]; only the sends are timed.
    /// `send` must panic if the datagram was not sent.
    fn timed_batches(&self, iters: u64, mut send: impl FnMut()) -> Duration {
        let mut total = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            let n = left.min(BATCH);
            let start = Instant::now();
            for _ in 0..n {
                send();
            }
            total += start.elapsed();
            self.drain(n);
            left -= n;
        }
        total
    }
}

fn notify_watchdog(c: &mut Criterion, path: &Path) {
    let rx = Receiver::bind(path);
    let mut group = c.benchmark_group("notify_watchdog");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6))
        .sample_size(60);

    group.bench_function("floor", |b| {
        let tx = UnixDatagram::unbound().expect("socket");
        tx.connect(path).expect("connect");
        b.iter_custom(|iters| {
            rx.timed_batches(iters, || {
                let sent = tx.send(black_box(WATCHDOG)).expect("floor send failed");
                assert_eq!(sent, WATCHDOG.len(), "short send");
            })
        });
    });

    group.bench_function("watchkeeper", |b| {
        let env = SystemdEnv::from_vars([("NOTIFY_SOCKET", path)]);
        let notifier = Notifier::from_env(&env).expect("Notifier::from_env");
        assert!(notifier.is_supervised());
        b.iter_custom(|iters| {
            rx.timed_batches(iters, || {
                let delivery = notifier
                    .notify(black_box(&[Notification::Watchdog]))
                    .expect("watchkeeper notify failed");
                assert_eq!(delivery, Delivery::Sent);
            })
        });
    });

    group.bench_function("sd-notify", |b| {
        b.iter_custom(|iters| {
            rx.timed_batches(iters, || {
                sd_notify::notify(black_box(&[sd_notify::NotifyState::Watchdog]))
                    .expect("sd-notify notify failed");
            })
        });
    });

    group.bench_function("libsystemd", |b| {
        b.iter_custom(|iters| {
            rx.timed_batches(iters, || {
                let sent = libsystemd::daemon::notify(
                    false,
                    black_box(&[libsystemd::daemon::NotifyState::Watchdog]),
                )
                .expect("libsystemd notify failed");
                assert!(sent, "libsystemd saw no NOTIFY_SOCKET");
            })
        });
    });

    group.finish();
}

fn progress_tick(c: &mut Criterion) {
    let watchdog = Watchdog::new(Some(Duration::from_secs(10)));
    let progress = watchdog.register("bench-loop");
    let mut group = c.benchmark_group("progress_tick");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group.bench_function("tick", |b| b.iter(|| black_box(&progress).tick()));
    group.finish();
}

/// A heartbeat as a busy service writes it.
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

/// The same steps as `HeartbeatWriter::write`, written directly with std: encode, write a 0600
/// temporary file, `fsync` it, rename it over the target, `fsync` the directory.
struct HandRolled {
    dir: File,
    tmp: PathBuf,
    path: PathBuf,
}

impl HandRolled {
    fn open(dir: &Path, name: &str) -> io::Result<Self> {
        Ok(HandRolled {
            dir: File::open(dir)?,
            tmp: dir.join(format!(".{name}.tmp")),
            path: dir.join(name),
        })
    }

    fn write(&self, hb: &Heartbeat) -> io::Result<()> {
        let mut bytes = serde_json::to_vec(hb)?;
        // The same bytes as HeartbeatWriter writes.
        bytes.push(b'\n');
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path)?;
        self.dir.sync_all()
    }
}

fn heartbeat_write(c: &mut Criterion) {
    // Both writers use the same directory, on the filesystem that holds the target dir.
    let dir = tempfile::Builder::new()
        .prefix("heartbeat-bench-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tempdir under the target dir");
    let hb = sample_heartbeat();

    let mut group = c.benchmark_group("heartbeat_write");
    group
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6))
        .sample_size(20);

    group.bench_function("watchkeeper", |b| {
        let mut writer = HeartbeatWriter::open(dir.path().join("hb.json")).expect("open writer");
        b.iter(|| {
            writer
                .write(black_box(&hb))
                .expect("heartbeat write failed")
        });
    });

    group.bench_function("hand-rolled", |b| {
        let writer = HandRolled::open(dir.path(), "hand.json").expect("open hand-rolled");
        b.iter(|| {
            writer
                .write(black_box(&hb))
                .expect("hand-rolled write failed")
        });
    });

    group.finish();
    // Both files exist unless a filter skipped one of the benchmarks.
    if let (Ok(ours), Ok(theirs)) = (
        std::fs::read(dir.path().join("hb.json")),
        std::fs::read(dir.path().join("hand.json")),
    ) {
        assert_eq!(ours, theirs, "both writers must produce the same file");
    }
}

fn main() {
    let notify_dir = tempfile::tempdir().expect("tempdir for the notify socket");
    let notify_path = notify_dir.path().join("notify");
    // SAFETY: nothing has spawned a thread yet (criterion has not been built, no runtime
    // exists), so no other thread can be reading or writing the environment. The `sd-notify`
    // and `libsystemd` crates read `NOTIFY_SOCKET` from the process environment on every call.
    unsafe { std::env::set_var("NOTIFY_SOCKET", &notify_path) };

    let mut c = Criterion::default().configure_from_args();
    notify_watchdog(&mut c, &notify_path);
    progress_tick(&mut c);
    heartbeat_write(&mut c);
    c.final_summary();
}
