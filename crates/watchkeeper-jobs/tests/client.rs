//! The client and the `wk-jobs` command against a scripted server on a real Unix socket: what
//! each answer turns into, and what goes over the wire.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::thread::JoinHandle;

use watchkeeper_jobs::{Client, ClientError, JobSpec, Request, Stats};

/// Serves one connection: for each request line received, writes the next scripted answer
/// (`None`: close instead). Returns the request lines it got.
fn serve(path: &Path, answers: Vec<Option<&'static str>>) -> JoinHandle<Vec<String>> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        let mut got = Vec::new();
        for answer in answers {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 {
                break;
            }
            got.push(line.trim_end().to_owned());
            match answer {
                Some(a) => writeln!(writer, "{a}").unwrap(),
                None => break,
            }
        }
        got
    })
}

#[tokio::test]
async fn each_answer_maps_to_its_result() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("d.sock");
    let server = serve(
        &sock,
        vec![
            Some(r#"{"result":"pong","version":"9.9"}"#),
            Some(r#"{"result":"submitted","id":41}"#),
            Some(r#"{"result":"job","job":null}"#),
            Some(r#"{"result":"error","error":"job 3 is not claimed by w"}"#),
            Some(r#"{"result":"done"}"#),
            Some(r#"{"result":"pong","version":"x"}"#),
            Some("not json"),
        ],
    );
    let mut c = Client::connect(&sock).await.unwrap();
    assert_eq!(c.ping().await.unwrap(), "9.9");
    let spec = JobSpec {
        command: vec!["echo".into(), "hi".into()],
        timeout_secs: 5,
    };
    assert_eq!(c.submit(spec.to_value()).await.unwrap(), 41);
    assert_eq!(c.claim("w").await.unwrap(), None);
    let release = Request::Release {
        id: 3,
        worker: "w".into(),
    };
    let e = c.report(&release).await.unwrap_err();
    assert!(
        matches!(&e, ClientError::Refused { error, .. } if error == "job 3 is not claimed by w"),
        "{e}"
    );
    c.report(&release).await.unwrap();
    // An answer that does not fit the request.
    let e = c.stats().await.unwrap_err();
    assert!(matches!(e, ClientError::Unexpected { .. }), "{e}");
    let e = c.ping().await.unwrap_err();
    assert!(matches!(e, ClientError::BadResponse { .. }), "{e}");
    assert!(e.to_string().contains("not json"), "{e}");

    let got = server.join().unwrap();
    assert_eq!(got[0], r#"{"op":"ping"}"#);
    assert_eq!(
        got[1],
        r#"{"op":"submit","job":{"command":["echo","hi"],"timeout_secs":5}}"#
    );
    assert_eq!(got[2], r#"{"op":"claim","worker":"w"}"#);
    assert_eq!(got[3], r#"{"op":"release","id":3,"worker":"w"}"#);
}

#[tokio::test]
async fn a_closed_connection_and_a_missing_socket_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("d.sock");
    let server = serve(&sock, vec![None]);
    let mut c = Client::connect(&sock).await.unwrap();
    let e = c.ping().await.unwrap_err();
    assert!(matches!(e, ClientError::Closed { .. }), "{e}");
    server.join().unwrap();

    let missing = dir.path().join("nobody-home.sock");
    let e = Client::connect(&missing).await.unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    assert!(e.to_string().contains("nobody-home.sock"), "{e}");
}

#[test]
fn wk_jobs_submits_and_prints() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("d.sock");
    let stats = Stats {
        queued: 2,
        completed: 5,
        ..Stats::default()
    };
    let stats_line: &'static str = Box::leak(
        format!(
            r#"{{"result":"stats",{}"#,
            &serde_json::to_string(&stats).unwrap()[1..]
        )
        .into_boxed_str(),
    );
    let exe = env!("CARGO_BIN_EXE_wk-jobs");

    let server = serve(&sock, vec![Some(r#"{"result":"submitted","id":7}"#)]);
    let out = Command::new(exe)
        .args([
            "--socket",
            sock.to_str().unwrap(),
            "submit",
            "--timeout-secs",
            "9",
        ])
        .args(["--", "sleep", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "7\n");
    assert_eq!(
        server.join().unwrap(),
        [r#"{"op":"submit","job":{"command":["sleep","1"],"timeout_secs":9}}"#]
    );
    std::fs::remove_file(&sock).unwrap();

    let server = serve(&sock, vec![Some(stats_line)]);
    let out = Command::new(exe)
        .env("WATCHKEEPER_SOCKET", &sock)
        .arg("stats")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed: Stats = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, stats);
    server.join().unwrap();
    std::fs::remove_file(&sock).unwrap();

    // A refusal is an error naming the daemon's reason, on stderr, exit 1.
    let server = serve(
        &sock,
        vec![Some(r#"{"result":"error","error":"spec too large"}"#)],
    );
    let out = Command::new(exe)
        .args([
            "--socket",
            sock.to_str().unwrap(),
            "submit-json",
            r#"{"command":["x"]}"#,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spec too large"),
        "{out:?}"
    );
    server.join().unwrap();

    // Bad JSON is refused before connecting.
    let out = Command::new(exe)
        .args(["--socket", "/nonexistent.sock", "submit-json", "{oops"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the job is not JSON"), "{stderr}");

    // No daemon: the error names the socket.
    let out = Command::new(exe)
        .args(["--socket", "/nonexistent.sock", "ping"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent.sock"), "{stderr}");
}

#[tokio::test]
async fn codes_map_to_not_allowed_and_unavailable_and_permanence() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("d.sock");
    let server = serve(
        &sock,
        vec![
            Some(
                r#"{"result":"error","error":"unavailable: the disk is full","code":"unavailable"}"#,
            ),
            Some(r#"{"result":"error","error":"uid 7 is not allowed","code":"not_allowed"}"#),
        ],
    );
    let mut c = Client::connect(&sock).await.unwrap();
    let e = c.ping().await.unwrap_err();
    assert!(
        matches!(&e, ClientError::Unavailable { reason, .. } if reason == "unavailable: the disk is full"),
        "{e:?}"
    );
    assert!(!e.is_permanent());
    let e = c.ping().await.unwrap_err();
    assert!(
        matches!(&e, ClientError::NotAllowed { reason, .. } if reason == "uid 7 is not allowed"),
        "{e:?}"
    );
    assert!(e.is_permanent());
    server.join().unwrap();

    // A path that cannot be a socket address is permanent; a missing socket is not.
    let long = dir.path().join("x".repeat(200));
    let e = Client::connect(&long).await.unwrap_err();
    assert!(e.is_permanent(), "{e:?}");
    let e = Client::connect(dir.path().join("missing.sock"))
        .await
        .unwrap_err();
    assert!(!e.is_permanent(), "{e:?}");
}
