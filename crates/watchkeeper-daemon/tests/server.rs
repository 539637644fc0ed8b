//! The server side of the protocol, in process: a real socket in a tempdir, the real store and
//! the `watchkeeper-jobs` client (or raw lines where the client would not send them).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use watchkeeper::Watchdog;
use watchkeeper_daemon::config::Config;
use watchkeeper_daemon::listener::{self, SocketFile};
use watchkeeper_daemon::server::{self, Broker};
use watchkeeper_daemon::store::{JobState, SharedStore, Store};
use watchkeeper_jobs::{Client, ClientError, ErrorCode, MAX_LINE, Request, Response, Stats};

const DEADLINE: Duration = Duration::from_secs(20);

struct Server {
    dir: tempfile::TempDir,
    path: PathBuf,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    store: SharedStore,
    config: watch::Sender<Config>,
    _file: SocketFile,
}

#[derive(Default)]
struct Setup {
    config: Config,
    own_uid: Option<u32>,
    extra_uids: Vec<u32>,
    group: Option<u32>,
    /// Connection cap and idle timeout, instead of the defaults.
    limits: Option<(usize, Duration)>,
    /// The store's directory, instead of one in the tempdir.
    state: Option<PathBuf>,
}

impl Server {
    async fn start() -> Server {
        Self::start_with(Setup::default()).await
    }

    async fn start_with(setup: Setup) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/daemon.sock");
        let state = setup
            .state
            .clone()
            .unwrap_or_else(|| dir.path().join("state"));
        let store = SharedStore::new(Store::open_in(&state).unwrap());
        let (listener, file) = listener::bind(&path, setup.group).unwrap();
        let (config, config_rx) = watch::channel(setup.config);
        let mut broker = Broker::new(store.clone(), config_rx, setup.extra_uids);
        if let Some(uid) = setup.own_uid {
            broker = broker.with_own_uid(uid);
        }
        if let Some((max, idle)) = setup.limits {
            broker = broker.with_connection_limits(max, idle);
        }
        let stop = CancellationToken::new();
        let progress = Watchdog::new(None).register("accept");
        let task = tokio::spawn(server::accept_loop(
            listener,
            Arc::new(broker),
            stop.clone(),
            progress,
        ));
        Server {
            dir,
            path,
            stop,
            task: Some(task),
            store,
            config,
            _file: file,
        }
    }

    async fn client(&self) -> Client {
        Client::connect(&self.path).await.unwrap()
    }

    async fn raw(&self) -> Raw {
        let stream = UnixStream::connect(&self.path).await.unwrap();
        let (r, w) = stream.into_split();
        Raw {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    /// Stops the server and waits for the accept loop and every connection to end.
    async fn stop(mut self) {
        self.stop.cancel();
        let task = self.task.take().unwrap();
        tokio::time::timeout(DEADLINE, task)
            .await
            .expect("the server did not stop")
            .unwrap();
    }
}

/// A connection that sends raw bytes.
struct Raw {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Raw {
    async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    /// The next response line; `None` at end of stream (or a reset after it).
    async fn recv(&mut self) -> Option<Response> {
        let mut line = String::new();
        let read = tokio::time::timeout(DEADLINE, self.reader.read_line(&mut line))
            .await
            .expect("no answer in time");
        match read {
            Ok(0) | Err(_) => None,
            Ok(_) => {
                assert!(line.ends_with('\n'), "unterminated response {line:?}");
                assert!(line.len() <= MAX_LINE + 1);
                Some(serde_json::from_str(&line).unwrap())
            }
        }
    }

    async fn call(&mut self, bytes: &[u8]) -> Response {
        self.send(bytes).await;
        self.recv().await.expect("the connection closed")
    }
}

fn error_text(response: &Response) -> &str {
    match response {
        Response::Error { error, .. } => error,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn full_round_trip_submit_claim_complete_stats() {
    let server = Server::start().await;
    let mut producer = server.client().await;
    let mut worker = server.client().await;
    assert_eq!(producer.ping().await.unwrap(), env!("CARGO_PKG_VERSION"));
    let spec = json!({"command": ["echo", "hello"], "timeout_secs": 30});
    let id = producer.submit(spec.clone()).await.unwrap();
    let other = producer.submit(json!({"command": ["true"]})).await.unwrap();
    assert!(other > id);

    let job = worker.claim("alpha").await.unwrap().unwrap();
    assert_eq!((job.id, job.attempt, job.lease_secs), (id, 1, 60));
    assert_eq!(job.spec, spec);
    worker
        .report(&Request::Renew {
            id,
            worker: "alpha".into(),
        })
        .await
        .unwrap();
    worker
        .report(&Request::Complete {
            id,
            worker: "alpha".into(),
            exit_code: Some(0),
        })
        .await
        .unwrap();
    let second = worker.claim("alpha").await.unwrap().unwrap();
    worker
        .report(&Request::Release {
            id: second.id,
            worker: "alpha".into(),
        })
        .await
        .unwrap();
    let again = worker.claim("beta").await.unwrap().unwrap();
    assert_eq!(
        (again.id, again.attempt),
        (other, 1),
        "a release is not an attempt"
    );
    worker
        .report(&Request::Deny {
            id: other,
            worker: "beta".into(),
            reason: "not allowlisted".into(),
        })
        .await
        .unwrap();
    assert_eq!(worker.claim("alpha").await.unwrap(), None);

    assert_eq!(
        producer.stats().await.unwrap(),
        Stats {
            completed: 1,
            denied: 1,
            ..Stats::default()
        }
    );
    let record = server
        .store
        .call("read", move |s| s.job(other))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.state, JobState::Denied);
    assert_eq!(record.reason.as_deref(), Some("not allowlisted"));
    server.stop().await;
}

#[tokio::test]
async fn complete_and_claim_reports_and_hands_out_the_next_job_in_one_round_trip() {
    let server = Server::start().await;
    let mut c = server.client().await;
    let first = c.submit(json!({"command": ["true"]})).await.unwrap();
    let second = c.submit(json!({"command": ["false"]})).await.unwrap();
    let job = c.claim("alpha").await.unwrap().unwrap();
    assert_eq!(job.id, first);
    let next = c.complete_and_claim(first, "alpha", Some(0)).await.unwrap();
    assert_eq!(next.as_ref().map(|j| (j.id, j.attempt)), Some((second, 1)));
    // A refused report claims nothing.
    let e = c
        .complete_and_claim(first, "alpha", Some(0))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Refused { error, .. } if error == &format!("job {first} is not claimed by alpha: it is completed")),
        "{e:?}"
    );
    assert_eq!(c.stats().await.unwrap().claimed, 1);
    assert_eq!(
        c.complete_and_claim(second, "alpha", Some(1))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        c.stats().await.unwrap(),
        Stats {
            completed: 1,
            failed: 1,
            ..Stats::default()
        }
    );
    server.stop().await;
}

#[tokio::test]
async fn a_job_comes_back_byte_for_byte_and_unknown_or_missing_fields_are_errors() {
    let server = Server::start().await;
    let mut raw = server.raw().await;
    let job = r#"{"command":["echo"],  "big":18446744073709551616123,"f":1.10,"b":{"z":1,"a":2}}"#;
    let submitted = raw
        .call(format!("{{\"op\":\"submit\",\"job\":{job}}}\n").as_bytes())
        .await;
    assert!(
        matches!(submitted, Response::Submitted { .. }),
        "{submitted:?}"
    );
    raw.send(b"{\"op\":\"claim\",\"worker\":\"w\"}\n").await;
    let mut line = String::new();
    raw.reader.read_line(&mut line).await.unwrap();
    assert!(line.contains(&format!(r#""spec":{job},"#)), "{line}");
    // Through the client, from text.
    let mut c = server.client().await;
    let text =
        serde_json::value::RawValue::from_string(r#"{"n":123456789012345678901234567890}"#.into())
            .unwrap();
    assert!(c.submit_raw(&text).await.is_ok());

    for (bad, problem) in [
        (r#"{"op":"ping","extra":1}"#, "unknown field `extra`"),
        (r#"{"op":"reload","force":true}"#, "unknown field `force`"),
        (r#"{"op":"stats","x":null}"#, "unknown field `x`"),
        (
            r#"{"op":"complete","id":1,"worker":"w"}"#,
            "missing field `exit_code`",
        ),
    ] {
        let response = raw.call(format!("{bad}\n").as_bytes()).await;
        let error = error_text(&response);
        assert!(
            error.starts_with("invalid request: ") && error.contains(problem),
            "{bad}: {error}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn a_report_from_the_wrong_worker_is_refused_with_the_reason() {
    let server = Server::start().await;
    let mut c = server.client().await;
    let id = c.submit(json!("x")).await.unwrap();
    c.claim("alpha").await.unwrap().unwrap();
    let e = c
        .report(&Request::Complete {
            id,
            worker: "mallory".into(),
            exit_code: Some(0),
        })
        .await
        .unwrap_err();
    match e {
        ClientError::Refused { error, .. } => assert_eq!(
            error,
            format!("job {id} is not claimed by mallory: it is claimed by alpha")
        ),
        other => panic!("{other:?}"),
    }
    let e = c
        .report(&Request::Release {
            id: 4242,
            worker: "alpha".into(),
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no job 4242"), "{e}");
    // Nothing changed, and the connection still works.
    assert_eq!(c.stats().await.unwrap().claimed, 1);
    server.stop().await;
}

#[tokio::test]
async fn malformed_lines_get_an_error_and_the_connection_still_works() {
    let server = Server::start().await;
    let mut raw = server.raw().await;
    let cases: [(&[u8], &str); 6] = [
        (b"this is not json\n", "invalid request: expected"),
        (b"\n", "invalid request: EOF"),
        (b"[1, 2]\n", "invalid request:"),
        (b"{\"op\":\"claim\"}\n", "missing field `worker`"),
        (
            b"{\"op\":\"claim\",\"worker\":\"a\",\"extra\":1}\n",
            "unknown field `extra`",
        ),
        (b"\xff\xfe{\n", "invalid request:"),
    ];
    for (line, expected) in cases {
        let response = raw.call(line).await;
        let error = error_text(&response);
        assert!(error.contains(expected), "{line:?} → {error:?}");
    }
    // CRLF line endings are accepted.
    let pong = raw.call(b"{\"op\":\"ping\"}\r\n").await;
    assert!(matches!(pong, Response::Pong { .. }), "{pong:?}");
    server.stop().await;
}

#[tokio::test]
async fn an_unknown_op_is_named_in_the_error() {
    let server = Server::start().await;
    let mut raw = server.raw().await;
    let response = raw.call(b"{\"op\":\"frobnicate\",\"id\":1}\n").await;
    let error = error_text(&response);
    assert!(
        error.contains("unknown variant `frobnicate`") && error.contains("`claim`"),
        "{error}"
    );
    let stats = raw.call(b"{\"op\":\"stats\"}\n").await;
    assert_eq!(stats, Response::Stats(Stats::default()));
    server.stop().await;
}

#[tokio::test]
async fn a_line_of_max_line_bytes_is_read_and_one_byte_more_closes_the_connection() {
    let server = Server::start().await;
    let mut raw = server.raw().await;

    // Exactly MAX_LINE bytes before the newline: a valid ping padded with spaces.
    let mut line = b"{\"op\":\"ping\"".to_vec();
    line.resize(MAX_LINE - 1, b' ');
    line.extend_from_slice(b"}\n");
    assert_eq!(line.len(), MAX_LINE + 1);
    assert!(matches!(raw.call(&line).await, Response::Pong { .. }));

    // One byte more: an error, then the end of the stream.
    let mut long = b"{\"op\":\"ping\"".to_vec();
    long.resize(MAX_LINE, b' ');
    long.extend_from_slice(b"}\n");
    let writer = {
        let mut w = raw.writer;
        tokio::spawn(async move {
            let _ = w.write_all(&long).await;
            w
        })
    };
    let mut line = String::new();
    raw.reader.read_line(&mut line).await.unwrap();
    let response: Response = serde_json::from_str(&line).unwrap();
    let error = error_text(&response);
    assert!(
        error.contains(&format!("longer than {MAX_LINE} bytes")),
        "{error}"
    );
    let mut rest = Vec::new();
    let end = tokio::time::timeout(DEADLINE, raw.reader.read_to_end(&mut rest))
        .await
        .expect("the connection was not closed");
    // EOF, or a reset because the server dropped the unread rest of the line.
    assert!(end.is_err() || rest.is_empty(), "{rest:?}");
    drop(writer.await.unwrap());

    // The server itself is fine.
    assert!(server.client().await.ping().await.is_ok());
    server.stop().await;
}

#[tokio::test]
async fn a_spec_too_large_for_a_claim_response_is_refused() {
    let server = Server::start().await;
    let mut c = server.client().await;
    let max = watchkeeper_daemon::store::max_spec_len();
    let e = c.submit(json!("x".repeat(max))).await.unwrap_err();
    assert!(e.to_string().contains("fit in a claim response"), "{e}");
    let id = c.submit(json!("x".repeat(max - 2))).await.unwrap();
    // The claim of the largest spec still reads back through the client's line limit.
    assert_eq!(c.claim("w").await.unwrap().unwrap().id, id);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_each_job_is_claimed_exactly_once() {
    let server = Arc::new(Server::start().await);
    const PRODUCERS: usize = 16;
    const PER: usize = 10;
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let server = server.clone();
        producers.push(tokio::spawn(async move {
            let mut c = server.client().await;
            let mut ids = Vec::new();
            for i in 0..PER {
                ids.push(c.submit(json!({"p": p, "i": i})).await.unwrap());
            }
            ids
        }));
    }
    let mut submitted = BTreeSet::new();
    for p in producers {
        submitted.extend(p.await.unwrap());
    }
    assert_eq!(submitted.len(), PRODUCERS * PER);

    let mut workers = Vec::new();
    for w in 0..8 {
        let server = server.clone();
        workers.push(tokio::spawn(async move {
            let name = format!("w{w}");
            let mut c = server.client().await;
            let mut got = Vec::new();
            while let Some(job) = c.claim(&name).await.unwrap() {
                c.report(&Request::Complete {
                    id: job.id,
                    worker: name.clone(),
                    exit_code: Some(0),
                })
                .await
                .unwrap();
                got.push(job.id);
            }
            got
        }));
    }
    let mut claimed = Vec::new();
    for w in workers {
        claimed.extend(w.await.unwrap());
    }
    let unique: BTreeSet<u64> = claimed.iter().copied().collect();
    assert_eq!(claimed.len(), unique.len(), "a job was handed out twice");
    assert_eq!(unique, submitted);
    let stats = server.client().await.stats().await.unwrap();
    assert_eq!(stats.completed, (PRODUCERS * PER) as u64);
    assert_eq!(stats.queued + stats.claimed, 0);
    Arc::into_inner(server).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_shutdown_a_connection_answers_the_request_it_is_in_then_closes() {
    let server = Server::start().await;
    let mut client = server.client().await;
    client.ping().await.unwrap();

    // Wedge the store (hold its lock) so that the next request stays in flight.
    let (release, wait) = std::sync::mpsc::channel::<()>();
    let (locked, is_locked) = tokio::sync::oneshot::channel::<()>();
    let store = server.store.clone();
    let blocker = tokio::spawn(async move {
        store
            .call("wedge", move |_| {
                let _ = locked.send(());
                let _ = wait.recv();
                Ok(())
            })
            .await
    });
    is_locked.await.unwrap();
    let in_flight = tokio::spawn(async move {
        let id = client.submit(json!("in flight")).await;
        (id, client)
    });
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while server.store.pending() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the submit never reached the store"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    server.stop.cancel();
    assert!(!in_flight.is_finished());
    assert!(
        !server.task.as_ref().unwrap().is_finished(),
        "stopped before answering"
    );
    release.send(()).unwrap();
    blocker.await.unwrap().unwrap();
    let (id, mut client) = tokio::time::timeout(DEADLINE, in_flight)
        .await
        .unwrap()
        .unwrap();
    let id = id.expect("the request in flight was answered");
    // No further request is read.
    assert!(matches!(
        client.ping().await,
        Err(ClientError::Closed { .. } | ClientError::Io { .. })
    ));
    let store = server.store.clone();
    server.stop().await;
    let record = store.call("read", move |s| s.job(id)).await.unwrap();
    assert_eq!(record.unwrap().state, JobState::Queued);
}

#[tokio::test]
async fn allowed_uids_follow_the_configuration() {
    let server = Server::start_with(Setup {
        extra_uids: vec![1234],
        ..Setup::default()
    })
    .await;
    // The broker itself, without a socket: root and own uid always, then the lists.
    let config = server.config.subscribe();
    let broker = Broker::new(server.store.clone(), config, vec![1234]).with_own_uid(999);
    assert!(broker.is_allowed(0) && broker.is_allowed(999) && broker.is_allowed(1234));
    assert!(!broker.is_allowed(5678));
    server.config.send_modify(|c| c.allowed_uids = vec![5678]);
    assert!(broker.is_allowed(5678));
    // The overflow uid never, however it is configured.
    server
        .config
        .send_modify(|c| c.allowed_uids = vec![5678, NOBODY]);
    let config = server.config.subscribe();
    let broker = Broker::new(server.store.clone(), config, vec![NOBODY]).with_own_uid(NOBODY);
    assert!(!broker.is_allowed(NOBODY));
    assert!(broker.is_allowed(0) && broker.is_allowed(5678));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failure_is_answered_as_unavailable_with_the_reason() {
    let server = Server::start().await;
    let mut c = server.client().await;
    let id = c.submit(json!("x")).await.unwrap();
    c.claim("w").await.unwrap().unwrap();
    // A refusal is still an answer, and the connection stays.
    let e = c
        .report(&Request::Complete {
            id: 4242,
            worker: "w".into(),
            exit_code: Some(0),
        })
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Refused { .. }), "{e:?}");

    // Break the store under the daemon: every statement on `jobs` now fails.
    let db = server.dir.path().join("state").join("jobs.sqlite3");
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("DROP TABLE jobs")
        .unwrap();
    let mut raw = server.raw().await;
    let response = raw
        .call(
            format!("{{\"op\":\"complete\",\"id\":{id},\"worker\":\"w\",\"exit_code\":0}}\n")
                .as_bytes(),
        )
        .await;
    let Response::Error { error, code } = response else {
        panic!("{response:?}")
    };
    assert_eq!(code, Some(ErrorCode::Unavailable));
    assert!(
        error.starts_with("unavailable: ") && error.contains("no such table: jobs"),
        "{error}"
    );
    assert!(!error.contains('\n'));
    // Through the client: unavailable, not a refusal, so the worker keeps the outcome; and
    // the connection stays usable.
    let e = c
        .report(&Request::Complete {
            id,
            worker: "w".into(),
            exit_code: Some(0),
        })
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Unavailable { .. }), "{e:?}");
    assert!(!e.is_permanent());
    assert!(c.ping().await.is_ok());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_the_connection_idle_the_longest_is_closed_for_a_new_one() {
    let server = Server::start_with(Setup {
        limits: Some((3, DEADLINE * 3)),
        ..Setup::default()
    })
    .await;
    let ping = b"{\"op\":\"ping\"}\n";
    let mut a = server.raw().await;
    let mut b = server.raw().await;
    let mut c = server.raw().await;
    for conn in [&mut a, &mut b, &mut c] {
        assert!(matches!(conn.call(ping).await, Response::Pong { .. }));
    }
    // `b` sends half a request, slowly: that does not make it busy.
    b.send(b"{\"op\":").await;
    assert!(matches!(a.call(ping).await, Response::Pong { .. }));
    // Last answered, oldest first: b, c, a. So b goes first, then c.
    let mut d = server.raw().await;
    assert!(matches!(d.call(ping).await, Response::Pong { .. }));
    assert_eq!(
        b.recv().await,
        None,
        "the longest idle connection stays open"
    );
    let mut e = server.raw().await;
    assert!(matches!(e.call(ping).await, Response::Pong { .. }));
    assert_eq!(c.recv().await, None, "the next longest idle stays open");
    for conn in [&mut a, &mut d, &mut e] {
        assert!(matches!(conn.call(ping).await, Response::Pong { .. }));
    }
    server.stop().await;
}

/// Opens `n` connections that never send anything.
async fn idle_connections(path: &Path, n: usize) -> Vec<UnixStream> {
    let mut idle = Vec::with_capacity(n);
    for _ in 0..n {
        idle.push(UnixStream::connect(path).await.unwrap());
    }
    idle
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_do_not_lock_out_a_new_client() {
    let (_, nofile) = watchkeeper_daemon::raise_nofile_limit();
    assert!(
        nofile >= 2 * 1100 + 100,
        "RLIMIT_NOFILE {nofile} too low for this test"
    );
    // The daemon's defaults.
    let server = Server::start_with(Setup {
        limits: Some((
            watchkeeper_daemon::connection_cap(nofile),
            server::IDLE_TIMEOUT,
        )),
        ..Setup::default()
    })
    .await;
    let idle = idle_connections(&server.path, 1000).await;
    let mut c = tokio::time::timeout(DEADLINE, server.client())
        .await
        .expect("cannot connect");
    let version = tokio::time::timeout(DEADLINE, c.ping())
        .await
        .expect("a new client is locked out by idle connections");
    assert!(version.is_ok(), "{version:?}");
    drop(idle);
    server.stop().await;

    // With a cap below the number of idle connections, the oldest are closed.
    let server = Server::start_with(Setup {
        limits: Some((100, server::IDLE_TIMEOUT)),
        ..Setup::default()
    })
    .await;
    let mut idle = idle_connections(&server.path, 1000).await;
    let mut c = server.client().await;
    let version = tokio::time::timeout(DEADLINE, c.ping())
        .await
        .expect("a new client is locked out by idle connections");
    assert!(version.is_ok(), "{version:?}");
    // The first 900 or more were closed to make room (each sees the end of the stream).
    let mut closed = 0;
    for conn in idle.iter_mut().take(900) {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(DEADLINE, conn.read(&mut byte))
            .await
            .expect("an idle connection beyond the cap stays open");
        if matches!(read, Ok(0) | Err(_)) {
            closed += 1;
        }
    }
    assert_eq!(closed, 900);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed() {
    let idle = Duration::from_millis(300);
    let server = Server::start_with(Setup {
        limits: Some((16, idle)),
        ..Setup::default()
    })
    .await;
    let ping = b"{\"op\":\"ping\"}\n";
    let mut raw = server.raw().await;
    // Requests within the timeout keep the connection.
    for _ in 0..3 {
        tokio::time::sleep(idle / 3).await;
        assert!(matches!(raw.call(ping).await, Response::Pong { .. }));
    }
    let quiet = tokio::time::Instant::now();
    assert_eq!(raw.recv().await, None, "an idle connection stays open");
    assert!(quiet.elapsed() >= idle - Duration::from_millis(50));
    // Half a request does not count as activity.
    let mut partial = server.raw().await;
    partial.send(b"{\"op\":").await;
    assert_eq!(partial.recv().await, None);
    server.stop().await;
}

const PEER_ROLE: &str = "WK_DAEMON_PEER_SOCKET";
const PEER_MODE: &str = "WK_DAEMON_PEER_MODE";
const NOBODY: u32 = 65534;

/// Runs as uid 65534 in a child of `a_peer_whose_uid_is_not_allowed_gets_one_error_line`:
/// connects, sends a ping and prints what came back.
#[test]
fn peer_helper() {
    let Some(path) = std::env::var_os(PEER_ROLE) else {
        return; // not the child
    };
    use std::io::{BufRead as _, Write as _};
    match std::env::var(PEER_MODE).as_deref() {
        Ok("client") => {
            // The job client, 20 times: what a worker under this uid sees.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut seen = Vec::new();
            for _ in 0..20 {
                let result = runtime.block_on(async {
                    let mut c = Client::connect(&path).await?;
                    c.ping().await
                });
                seen.push(match result {
                    Err(ClientError::NotAllowed { reason, .. }) => format!("not_allowed:{reason}"),
                    other => format!("{other:?}"),
                });
            }
            println!("REPLY:{}", seen.join("|"));
            return;
        }
        Ok("late") => {
            // Reads the refusal and the end of the stream first, then sends its request (as a
            // client that connects and writes later would): 20 times, the write must not fail.
            let mut seen = Vec::new();
            for _ in 0..20 {
                let stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let mut rest = String::new();
                let end = reader.read_line(&mut rest);
                // A daemon that closed its socket (instead of only its sending side) shows up
                // as POLLHUP: give it the chance to, so that the write below meets it.
                let mut fds = [rustix::event::PollFd::new(
                    &stream,
                    rustix::event::PollFlags::empty(),
                )];
                let timeout = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 100_000_000,
                };
                let _ = rustix::event::poll(&mut fds, Some(&timeout));
                let written = (&stream).write_all(b"{\"op\":\"ping\"}\n");
                seen.push(format!(
                    "{}|then:{:?}|write:{}",
                    line.trim_end(),
                    end.map_err(|e| e.kind()),
                    match written {
                        Ok(()) => "ok".to_owned(),
                        Err(e) => format!("{:?}", e.kind()),
                    },
                ));
            }
            seen.dedup();
            println!("REPLY:{}", seen.join(" "));
            return;
        }
        _ => {}
    }
    let mut stream = std::os::unix::net::UnixStream::connect(path).unwrap();
    // The daemon may have closed already: the answer is still there to read.
    let _ = stream.write_all(b"{\"op\":\"ping\"}\n");
    let mut line = String::new();
    let _ = std::io::BufReader::new(stream).read_line(&mut line);
    println!("REPLY:{}", line.trim_end());
}

/// Runs `peer_helper` as `uid` (group [`NOBODY`], which the socket is given) and returns the
/// line it got.
fn reply_as(uid: u32, path: &Path) -> String {
    reply_as_in(uid, path, "raw")
}

/// [`reply_as`] with a [`PEER_MODE`].
fn reply_as_in(uid: u32, path: &Path, mode: &str) -> String {
    use std::os::unix::process::CommandExt as _;
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "peer_helper", "--nocapture", "--test-threads=1"])
        .env(PEER_ROLE, path)
        .env(PEER_MODE, mode)
        .uid(uid)
        .gid(NOBODY)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The harness prints "test peer_helper ... " on the same line.
    let (_, reply) = stdout
        .split_once("REPLY:")
        .unwrap_or_else(|| panic!("no reply: {stdout}"));
    reply.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_uid_is_not_allowed_gets_one_error_line_and_is_closed() {
    if !rustix::process::getuid().is_root() {
        // Without root, pretend the daemon runs as another user: this process is then a
        // stranger.
        let server = Server::start_with(Setup {
            own_uid: Some(NOBODY - 1),
            ..Setup::default()
        })
        .await;
        let mut raw = server.raw().await;
        let uid = rustix::process::getuid().as_raw();
        let response = raw.recv().await.expect("an error line");
        assert_eq!(error_text(&response), format!("uid {uid} is not allowed"));
        assert!(raw.recv().await.is_none(), "not closed");
        server.stop().await;
        return;
    }
    // As root: a real child running as nobody, reaching the socket through --socket-group.
    let server = Server::start_with(Setup {
        group: Some(NOBODY),
        ..Setup::default()
    })
    .await;
    for dir in [server.dir.path().to_owned(), server.dir.path().join("run")] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    const PEER: u32 = NOBODY - 1;
    let reply_as = |uid: u32| {
        let path = server.path.clone();
        tokio::task::spawn_blocking(move || reply_as(uid, &path))
    };
    let refused = |uid: u32| {
        format!(r#"{{"result":"error","error":"uid {uid} is not allowed","code":"not_allowed"}}"#)
    };
    assert_eq!(reply_as(PEER).await.unwrap(), refused(PEER));
    assert_eq!(reply_as(NOBODY).await.unwrap(), refused(NOBODY));
    // Allowed through the (reloadable) configuration, the same peer is served...
    server
        .config
        .send_modify(|c| c.allowed_uids = vec![PEER, NOBODY]);
    let reply = reply_as(PEER).await.unwrap();
    assert!(reply.starts_with(r#"{"result":"pong""#), "{reply}");
    // ...but never nobody, the overflow uid: it could be any user of another namespace.
    assert_eq!(reply_as(NOBODY).await.unwrap(), refused(NOBODY));
    server.stop().await;
}

/// A server reachable by uid [`NOBODY`] - 1 (through the socket group), which is not allowed.
async fn server_for_a_stranger() -> Server {
    let server = Server::start_with(Setup {
        group: Some(NOBODY),
        ..Setup::default()
    })
    .await;
    for dir in [server.dir.path().to_owned(), server.dir.path().join("run")] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_reads_the_refusal_every_time_not_a_broken_pipe() {
    if !rustix::process::getuid().is_root() {
        eprintln!("SKIPPED: needs root to run a peer under another uid");
        return;
    }
    let server = server_for_a_stranger().await;
    const PEER: u32 = NOBODY - 1;
    let path = server.path.clone();
    let seen = tokio::task::spawn_blocking(move || reply_as_in(PEER, &path, "client"))
        .await
        .unwrap();
    let expected = vec![format!("not_allowed:uid {PEER} is not allowed"); 20].join("|");
    assert_eq!(seen, expected);
    let e = ClientError::NotAllowed {
        path: server.path.clone(),
        reason: String::new(),
    };
    assert!(e.is_permanent());

    // A client that writes only after the refusal arrived still can, every time: the daemon
    // keeps its receiving side open for a while, the client sees the line and the end.
    let path = server.path.clone();
    let late = tokio::task::spawn_blocking(move || reply_as_in(PEER, &path, "late"))
        .await
        .unwrap();
    assert_eq!(
        late,
        format!(
            r#"{{"result":"error","error":"uid {PEER} is not allowed","code":"not_allowed"}}|then:Ok(0)|write:ok"#
        )
    );
    server.stop().await;
}

/// Unmounts on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_answered_unavailable_and_shown_as_the_stores_trouble() {
    let mnt = tempfile::tempdir().unwrap();
    let mounted = rustix::process::getuid().is_root()
        && std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs"])
            .arg(mnt.path())
            .status()
            .is_ok_and(|s| s.success());
    if !mounted {
        assert!(
            std::env::var_os("CI").is_none(),
            "needs root and tmpfs to fill a disk"
        );
        eprintln!("SKIPPED: needs root and a tmpfs mount to fill a disk");
        return;
    }
    let _mount = Mount(mnt.path().to_owned());
    let server = Server::start_with(Setup {
        state: Some(mnt.path().join("state")),
        ..Setup::default()
    })
    .await;
    let mut c = server.client().await;
    c.submit(json!("before")).await.unwrap();
    // Fill the file system.
    let filler = mnt.path().join("filler");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 16 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    let big = "x".repeat(32 * 1024);
    let mut seen = None;
    for _ in 0..200 {
        match c.submit(json!(big)).await {
            Ok(_) => continue,
            Err(e) => {
                seen = Some(e);
                break;
            }
        }
    }
    let e = seen.expect("submits kept succeeding on a full disk");
    match &e {
        ClientError::Unavailable { reason, .. } => {
            assert!(
                reason.starts_with("unavailable: ") && reason.contains("full"),
                "{reason}"
            );
            assert!(!reason.contains('\n'), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let trouble = server.store.trouble().expect("no trouble recorded");
    assert!(trouble.contains("full"), "{trouble}");
    // The connection still works, and the store recovers once there is room.
    assert!(c.ping().await.is_ok());
    std::fs::remove_file(&filler).unwrap();
    c.submit(json!("after")).await.unwrap();
    assert_eq!(server.store.trouble(), None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_counts_follow_connections_that_leave_without_a_new_accept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/daemon.sock");
    let store = SharedStore::new(Store::open_in(&dir.path().join("state")).unwrap());
    let (listener, _file) = listener::bind(&path, None).unwrap();
    let (_config, config_rx) = watch::channel(Config::default());
    let broker = Broker::new(store, config_rx, Vec::new());
    let stop = CancellationToken::new();
    let (counts_tx, mut counts) = watch::channel(server::ConnectionStats::default());
    let task = tokio::spawn(server::accept_loop_with_counts(
        listener,
        Arc::new(broker),
        stop.clone(),
        Watchdog::new(None).register("accept"),
        Some(counts_tx),
    ));
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut client = Client::connect(&path).await.unwrap();
        client.ping().await.unwrap();
        open.push(client);
    }
    async fn wait_for(n: usize, counts: &mut watch::Receiver<server::ConnectionStats>) -> usize {
        let waited = tokio::time::timeout(DEADLINE, counts.wait_for(|c| c.open == n))
            .await
            .map(|seen| seen.map(|c| c.open));
        match waited {
            Ok(open) => open.unwrap(),
            Err(_) => panic!("open never became {n}: {:?}", *counts.borrow()),
        }
    }
    assert_eq!(wait_for(3, &mut counts).await, 3);
    // They leave; nobody connects after them.
    drop(open);
    assert_eq!(wait_for(0, &mut counts).await, 0);
    stop.cancel();
    tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
}
