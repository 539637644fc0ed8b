//! Credentials for jobs, with the worker binary and a real credentials directory (what
//! systemd's `LoadCredential=` makes): a job that asks for one gets it as a file, its value
//! never shows in the job's logged output nor in the worker's; a job that asks for one the
//! worker may not hand out, or does not have, is denied with the reason.

mod common;

use std::os::unix::fs::PermissionsExt as _;

use common::{Broker, DEADLINE, Scene, Worker, wait_file};
use rustix::process::Signal;
use serde_json::json;
use watchkeeper_jobs::Request;
use watchkeeper_testkit::FakeManager;

const SECRET: &str = "ghp_e2eS3cretValue";

fn deny_reason(received: &[Request], job: u64) -> Option<String> {
    received.iter().find_map(|r| match r {
        Request::Deny { id, reason, .. } if *id == job => Some(reason.clone()),
        _ => None,
    })
}

#[test]
fn a_job_gets_its_credential_as_a_file_and_its_value_is_redacted() {
    let scene = Scene::new();
    let broker = Broker::start(&scene.socket());
    let manager = FakeManager::start().unwrap();
    let creds = scene.path("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("github-token"), format!("{SECRET}\n")).unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o500)).unwrap();
    let config = scene.config(&["sh"], r#"credentials = ["github-token", "absent-token"]"#);
    let copy = scene.path("copy");
    let script = format!(
        r#"cat "$WK_CREDENTIAL_GITHUB_TOKEN" > {copy}.tmp && mv {copy}.tmp {copy}
           echo "job stderr: $(cat "$WK_CREDENTIAL_GITHUB_TOKEN")" >&2
           echo "job stdout: $(cat "$WK_CREDENTIAL_GITHUB_TOKEN")"
           env | grep -qF "$(cat "$WK_CREDENTIAL_GITHUB_TOKEN")" && exit 3
           exit 0"#,
        copy = copy.display()
    );
    broker.push(
        1,
        json!({"command": ["sh", "-c", script], "credentials": ["github-token"]}),
        60,
    );
    broker.push(
        2,
        json!({"command": ["sh", "-c", "exit 0"], "credentials": ["other"]}),
        60,
    );
    broker.push(
        3,
        json!({"command": ["sh", "-c", "exit 0"], "credentials": ["absent-token"]}),
        60,
    );
    let worker = Worker::start_with_env(
        &manager,
        None,
        &scene.args(&config),
        &[("CREDENTIALS_DIRECTORY", creds.as_os_str())],
    );
    assert_eq!(wait_file(&copy), format!("{SECRET}\n"));
    broker.wait_for("job 1's outcome", |r| common::is_complete(r, 1).is_some());
    broker.wait_until("jobs 2 and 3 denied", |r| {
        deny_reason(r, 2).is_some() && deny_reason(r, 3).is_some()
    });
    let received = broker.received();
    assert_eq!(
        common::is_complete(
            received
                .iter()
                .find(|r| common::is_complete(r, 1).is_some())
                .unwrap(),
            1
        ),
        Some(Some(0)),
        "the secret was in the job's environment"
    );
    let r2 = deny_reason(&received, 2).unwrap();
    assert!(
        r2.contains("\"other\" is not on the credentials list of worker w1"),
        "{r2}"
    );
    let r3 = deny_reason(&received, 3).unwrap();
    assert!(
        r3.contains("\"absent-token\" not found") && r3.contains("LoadCredential="),
        "{r3}"
    );

    // The job's stderr comes through the worker's, redacted.
    let deadline = std::time::Instant::now() + DEADLINE;
    while !worker.stderr().contains("job stderr: ") {
        assert!(std::time::Instant::now() < deadline, "{}", worker.stderr());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    worker.signal(Signal::TERM);
    let (status, stderr) = worker.wait();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("job stderr: [redacted]\n"), "{stderr}");
    assert!(!stderr.contains(SECRET), "{stderr}");
    // The job's private copy is gone.
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("wk-job-1-"))
        .filter(|e| std::fs::read_dir(e.path()).is_ok_and(|mut d| d.next().is_some()))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
