//! The broker under load, through its real socket and the `watchkeeper-jobs` client:
//!
//! * `submit/{group_commit,one_at_a_time}/{1,32}`: acknowledged submits per second with 1 and
//!   32 concurrent producers (one connection each), group commit (batches up to 1024) against
//!   one commit per submit (`SharedStore::with_max_batch(1)`);
//! * `connect/with_1000_idle`: a new client's connect and `ping` while 1,000 idle connections
//!   are open;
//! * `million/{stats,claim_complete}`: with 1,000,000 stored jobs, the counts by state, and one
//!   claim plus its `complete`.
//!
//! The store lives in a tempdir on the real file system (`TMPDIR`), so every commit is a real
//! `fsync`. `cargo bench -p watchkeeper-daemon --bench broker`; see BENCHMARKS.md.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use serde_json::json;
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use watchkeeper::Watchdog;
use watchkeeper_daemon::config::Config;
use watchkeeper_daemon::listener::{self, SocketFile};
use watchkeeper_daemon::server::{self, Broker};
use watchkeeper_daemon::store::{Policy, SharedStore, Store};
use watchkeeper_jobs::Client;

struct Server {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    stop: CancellationToken,
    _file: SocketFile,
    _config: watch::Sender<Config>,
}

fn start(rt: &Runtime, max_batch: usize) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.sock");
    let store = Store::open_in(&dir.path().join("state")).unwrap();
    let store = SharedStore::with_max_batch(store, max_batch);
    let (config, config_rx) = watch::channel(Config::default());
    let stop = CancellationToken::new();
    let file = rt.block_on(async {
        let (listener, file) = listener::bind(&path, None).unwrap();
        let (_, nofile) = watchkeeper_daemon::raise_nofile_limit();
        let broker = Broker::new(store, config_rx, vec![]).with_connection_limits(
            watchkeeper_daemon::connection_cap(nofile),
            server::IDLE_TIMEOUT,
        );
        tokio::spawn(server::accept_loop(
            listener,
            Arc::new(broker),
            stop.clone(),
            Watchdog::new(None).register("accept"),
        ));
        file
    });
    Server {
        _dir: dir,
        path,
        stop,
        _file: file,
        _config: config,
    }
}

async fn clients(path: &Path, n: usize) -> Vec<Client> {
    let mut all = Vec::with_capacity(n);
    for _ in 0..n {
        all.push(Client::connect(path).await.unwrap());
    }
    all
}

/// `total` submits spread over the producers, all at once; the time until the last is
/// acknowledged.
async fn submit_all(producers: &mut Vec<Client>, total: u64) -> Duration {
    let n = producers.len() as u64;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut c) in producers.drain(..).enumerate() {
        let mine = total / n + u64::from((i as u64) < total % n);
        tasks.spawn(async move {
            for k in 0..mine {
                c.submit(json!({"command": ["true"], "k": k}))
                    .await
                    .unwrap();
            }
            c
        });
    }
    while let Some(c) = tasks.join_next().await {
        producers.push(c.unwrap());
    }
    started.elapsed()
}

fn submit(c: &mut Criterion, rt: &Runtime) {
    let mut group = c.benchmark_group("submit");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(1));
    for (name, max_batch) in [("group_commit", 1024), ("one_at_a_time", 1)] {
        for producers in [1usize, 32] {
            let server = start(rt, max_batch);
            let mut clients = rt.block_on(clients(&server.path, producers));
            group.bench_function(format!("{name}/{producers}"), |b| {
                b.iter_custom(|iters| rt.block_on(submit_all(&mut clients, iters)));
            });
            server.stop.cancel();
        }
    }
    group.finish();
}

fn connect(c: &mut Criterion, rt: &Runtime) {
    let server = start(rt, 1024);
    let idle: Vec<_> = rt.block_on(async {
        let mut idle = Vec::new();
        for _ in 0..1000 {
            idle.push(tokio::net::UnixStream::connect(&server.path).await.unwrap());
        }
        idle
    });
    let mut group = c.benchmark_group("connect");
    group.sample_size(50);
    group.bench_function("with_1000_idle", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut c = Client::connect(&server.path).await.unwrap();
                c.ping().await.unwrap();
            })
        });
    });
    group.finish();
    drop(idle);
    server.stop.cancel();
}

/// A store with `n` finished jobs and 1,000 queued ones, written directly.
fn million(c: &mut Criterion) {
    const N: i64 = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open_in(dir.path()).unwrap());
    let started = Instant::now();
    let db =
        rusqlite::Connection::open(dir.path().join(watchkeeper_daemon::store::FILE_NAME)).unwrap();
    db.execute_batch(&format!(
        "BEGIN;
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {N})
         INSERT INTO jobs (spec, state, attempts, created_ms, updated_ms, exit_code)
             SELECT '{{\"command\":[\"true\"]}}', 'completed', 1, i, i, 0 FROM n;
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000)
         INSERT INTO jobs (spec, state, attempts, created_ms, updated_ms)
             SELECT '{{\"command\":[\"true\"]}}', 'queued', 0, i, i FROM n;
         COMMIT;"
    ))
    .unwrap();
    drop(db);
    let mut store = Store::open_in(dir.path()).unwrap();
    eprintln!("filled {N} jobs in {:?}", started.elapsed());
    let policy = Policy {
        lease_secs: 60,
        max_attempts: 3,
    };
    let mut group = c.benchmark_group("million");
    group.sample_size(20);
    group.bench_function("stats", |b| b.iter(|| store.stats().unwrap()));
    let now = watchkeeper_daemon::store::now_ms();
    group.bench_function("claim_complete", |b| {
        b.iter(|| {
            let job = store.claim("bench", policy, now).unwrap().unwrap();
            store.complete(job.id, "bench", Some(0), now).unwrap();
            // Keep the queue from running dry.
            store.submit(&json!({"command": ["true"]}), now).unwrap();
        })
    });
    group.finish();
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut c = Criterion::default().configure_from_args();
    submit(&mut c, &rt);
    connect(&mut c, &rt);
    million(&mut c);
    c.final_summary();
}
