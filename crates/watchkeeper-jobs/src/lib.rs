//! The job protocol of the watchkeeper reference daemon.
//!
//! A client connects to the daemon's Unix stream socket and exchanges **newline-delimited JSON**:
//! one [`Request`] object per line, answered by exactly one [`Response`] object per line, in
//! order. A line longer than [`MAX_LINE`] bytes, or one that is not a valid request, is answered
//! with [`Response::Error`]; an oversized line also closes the connection (the stream cannot be
//! resynchronised cheaply).
//!
//! ```text
//! → {"op":"submit","job":{"command":["echo","hello"],"timeout_secs":30}}
//! ← {"result":"submitted","id":1}
//! → {"op":"claim","worker":"alpha"}
//! ← {"result":"job","job":{"id":1,"spec":{"command":["echo","hello"],"timeout_secs":30},"attempt":1,"lease_secs":60}}
//! → {"op":"complete","id":1,"worker":"alpha","exit_code":0}
//! ← {"result":"done"}
//! ```
//!
//! The broker stores a job's `spec` as the JSON the client gave, without interpreting it: a
//! malformed job is the worker's to quarantine ([`JobSpec::parse`]).
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Longest request or response line, newline excluded.
pub const MAX_LINE: usize = 64 * 1024;

/// Default job timeout when a spec gives none.
pub const DEFAULT_JOB_TIMEOUT_SECS: u64 = 60;

/// A request, one JSON object per line, tagged by `op`. Unknown fields are errors, also for
/// the requests without fields (`{"op":"ping","extra":1}` is refused).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "op",
    rename_all = "snake_case",
    deny_unknown_fields,
    from = "wire::Request"
)]
pub enum Request {
    /// Liveness check.
    Ping,
    /// Queue a job. `job` is stored as given; see [`JobSpec`] for the form workers run.
    Submit {
        /// The job.
        job: serde_json::Value,
    },
    /// Take the oldest queued job, if any, under a lease.
    Claim {
        /// The claiming worker's name.
        worker: String,
    },
    /// Extend the lease on a claimed job.
    Renew {
        /// The job.
        id: u64,
        /// The worker holding it.
        worker: String,
    },
    /// The job ran; `exit_code` 0 is success, anything else (or `null`: killed, timed out) a
    /// failure. `exit_code` must be present (`null` when there is none).
    Complete {
        /// The job.
        id: u64,
        /// The worker holding it.
        worker: String,
        /// The command's exit code, if it exited.
        exit_code: Option<i32>,
    },
    /// [`Request::Complete`] and then [`Request::Claim`] by the same worker, in one
    /// transaction and one round trip: answered by [`Response::Job`] (the next job, or none)
    /// once both are on disk. If the report is refused nothing changed and nothing was claimed.
    CompleteAndClaim {
        /// The job that ran.
        id: u64,
        /// The worker holding it, and claiming the next one.
        worker: String,
        /// The command's exit code, if it exited (`null` when there is none; must be present).
        exit_code: Option<i32>,
    },
    /// The job is not allowed to run here (not on the worker's allowlist).
    Deny {
        /// The job.
        id: u64,
        /// The worker holding it.
        worker: String,
        /// Why.
        reason: String,
    },
    /// The job is malformed and must not be retried.
    Quarantine {
        /// The job.
        id: u64,
        /// The worker holding it.
        worker: String,
        /// Why.
        reason: String,
    },
    /// Give the job back unrun (e.g. the worker is stopping); it does not count as an attempt.
    Release {
        /// The job.
        id: u64,
        /// The worker holding it.
        worker: String,
    },
    /// Counts by state.
    Stats,
    /// Re-read the daemon's configuration, answering once the reload is over (so that
    /// `ExecReload=` can wait for it): [`Response::Done`], or an error saying why it failed.
    Reload,
}

/// The form requests are read in. serde ignores unknown fields of an internally tagged *unit*
/// variant even under `deny_unknown_fields`, so the field-less requests are read as empty
/// struct variants here, which do refuse them.
mod wire {
    use serde::Deserialize;

    #[derive(Deserialize)]
    #[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
    pub(super) enum Request {
        Ping {},
        Submit {
            job: serde_json::Value,
        },
        Claim {
            worker: String,
        },
        Renew {
            id: u64,
            worker: String,
        },
        Complete {
            id: u64,
            worker: String,
            #[serde(deserialize_with = "super::required")]
            exit_code: Option<i32>,
        },
        CompleteAndClaim {
            id: u64,
            worker: String,
            #[serde(deserialize_with = "super::required")]
            exit_code: Option<i32>,
        },
        Deny {
            id: u64,
            worker: String,
            reason: String,
        },
        Quarantine {
            id: u64,
            worker: String,
            reason: String,
        },
        Release {
            id: u64,
            worker: String,
        },
        Stats {},
        Reload {},
    }
}

impl From<wire::Request> for Request {
    fn from(r: wire::Request) -> Self {
        use wire::Request as W;
        match r {
            W::Ping {} => Request::Ping,
            W::Submit { job } => Request::Submit { job },
            W::Claim { worker } => Request::Claim { worker },
            W::Renew { id, worker } => Request::Renew { id, worker },
            W::Complete {
                id,
                worker,
                exit_code,
            } => Request::Complete {
                id,
                worker,
                exit_code,
            },
            W::CompleteAndClaim {
                id,
                worker,
                exit_code,
            } => Request::CompleteAndClaim {
                id,
                worker,
                exit_code,
            },
            W::Deny { id, worker, reason } => Request::Deny { id, worker, reason },
            W::Quarantine { id, worker, reason } => Request::Quarantine { id, worker, reason },
            W::Release { id, worker } => Request::Release { id, worker },
            W::Stats {} => Request::Stats,
            W::Reload {} => Request::Reload,
        }
    }
}

/// A response, one JSON object per line, tagged by `result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Ping`].
    Pong {
        /// The daemon's version.
        version: String,
    },
    /// Answer to [`Request::Submit`]: the job is durably stored.
    Submitted {
        /// The new job's id.
        id: u64,
    },
    /// Answer to [`Request::Claim`]: a job, or none queued.
    Job {
        /// The claimed job.
        job: Option<ClaimedJob>,
    },
    /// Answer to renew, complete, deny, quarantine and release (durably recorded), and to
    /// reload (the new configuration is in effect).
    Done,
    /// Answer to [`Request::Stats`].
    Stats(Stats),
    /// The request failed; nothing changed.
    Error {
        /// What went wrong.
        error: String,
        /// The kind of failure, when it is not a refusal of the request itself (absent on the
        /// wire then).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<ErrorCode>,
    },
}

impl Response {
    /// [`Response::Error`] without a code: the request was refused.
    pub fn error(error: impl Into<String>) -> Self {
        Response::Error {
            error: error.into(),
            code: None,
        }
    }
}

/// What kind of failure a [`Response::Error`] reports, beyond a refusal of the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The connecting uid may not talk to the daemon; the daemon closes the connection.
    /// Permanent: another try is refused the same way.
    NotAllowed,
    /// The daemon cannot serve now (its store failed, e.g. the disk is full, or its
    /// configuration is broken); the request did not take effect. Try again later.
    Unavailable,
    /// A code this client does not know (from a newer daemon).
    #[serde(other)]
    Other,
}

/// `Option<T>` that must be present (possibly `null`): serde otherwise takes a missing
/// `Option` field for `None`.
fn required<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d)
}

/// A job handed to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimedJob {
    /// The job's id.
    pub id: u64,
    /// The job as submitted. The daemon sends the submitted text byte for byte; as a
    /// `serde_json::Value`, an integer beyond `i64`/`u64` is held as the nearest `f64` (which
    /// reads and writes back unchanged).
    pub spec: serde_json::Value,
    /// Which attempt this is, from 1.
    pub attempt: u32,
    /// The lease: report or renew within this many seconds, or the job is queued again.
    pub lease_secs: u64,
}

/// Job counts by state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Waiting to be claimed.
    pub queued: u64,
    /// Claimed, under lease.
    pub claimed: u64,
    /// Ran and exited 0.
    pub completed: u64,
    /// Ran and failed (non-zero exit, killed or timed out).
    pub failed: u64,
    /// Refused by a worker's allowlist.
    pub denied: u64,
    /// Malformed, or killed its workers too often (poison).
    pub quarantined: u64,
}

/// The form of job a worker runs: a command (program and arguments, no shell) and a timeout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Program and arguments.
    pub command: Vec<String>,
    /// Kill the command after this many seconds.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_timeout() -> u64 {
    DEFAULT_JOB_TIMEOUT_SECS
}

impl JobSpec {
    /// Reads a spec from a submitted job, or says why it is malformed.
    pub fn parse(value: &serde_json::Value) -> Result<Self, String> {
        let spec: JobSpec = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
        if spec.command.is_empty() || spec.command[0].is_empty() {
            return Err("empty command".into());
        }
        if spec.command.iter().any(|a| a.contains('\0')) {
            return Err("NUL byte in command".into());
        }
        if spec.timeout_secs == 0 {
            return Err("timeout_secs must be at least 1".into());
        }
        Ok(spec)
    }

    /// The spec as JSON, for [`Request::Submit`].
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::json!({ "command": self.command, "timeout_secs": self.timeout_secs })
    }
}

/// A client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Cannot connect to the socket.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The connection broke.
    #[error("connection to {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The daemon closed the connection before answering.
    #[error("{path}: the daemon closed the connection")]
    Closed {
        /// The socket path.
        path: PathBuf,
    },
    /// The answer is not a valid response.
    #[error("{path}: invalid response {line:?}: {source}")]
    BadResponse {
        /// The socket path.
        path: PathBuf,
        /// The line received (truncated).
        line: String,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// The daemon answered with an error.
    #[error("{path}: the daemon refused the request: {error}")]
    Refused {
        /// The socket path.
        path: PathBuf,
        /// The daemon's message.
        error: String,
    },
    /// The daemon does not serve this uid (see [`ErrorCode::NotAllowed`]). Permanent.
    #[error("{path}: the daemon does not serve us: {reason}")]
    NotAllowed {
        /// The socket path.
        path: PathBuf,
        /// The daemon's message, e.g. `uid 1001 is not allowed`.
        reason: String,
    },
    /// The daemon cannot serve now (see [`ErrorCode::Unavailable`]); the request did not take
    /// effect. Transient: retry later.
    #[error("{path}: the daemon is unavailable: {reason}")]
    Unavailable {
        /// The socket path.
        path: PathBuf,
        /// The daemon's message, e.g. `unavailable: the job store failed: database or disk is
        /// full`.
        reason: String,
    },
    /// The daemon answered with a response that does not fit the request.
    #[error("{path}: unexpected response {response:?}")]
    Unexpected {
        /// The socket path.
        path: PathBuf,
        /// What came back.
        response: Box<Response>,
    },
}

impl ClientError {
    /// Whether trying again (on this or a new connection) cannot succeed until someone changes
    /// the setup: the daemon refuses this uid ([`ClientError::NotAllowed`]), or the socket path
    /// cannot name a socket at all (longer than `sun_path`, not a socket, no permission).
    /// A daemon that is down, restarting or [unavailable](ClientError::Unavailable), a lost
    /// connection and a refused request are not permanent.
    pub fn is_permanent(&self) -> bool {
        match self {
            ClientError::NotAllowed { .. } => true,
            ClientError::Connect { source, .. } => {
                matches!(
                    source.kind(),
                    std::io::ErrorKind::InvalidInput | std::io::ErrorKind::PermissionDenied
                ) || matches!(
                    source.raw_os_error(),
                    // ENAMETOOLONG, ENOTSOCK (Linux numbers). ENOENT and ECONNREFUSED are not
                    // here: a daemon that is starting or restarting answers those.
                    Some(36 | 88)
                )
            }
            _ => false,
        }
    }
}

/// A connection to the daemon. Requests are answered in order, one at a time.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    line: String,
}

impl Client {
    /// Connects to the daemon's socket.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref().to_owned();
        let stream = UnixStream::connect(&path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.clone(),
                source,
            })?;
        let (r, w) = stream.into_split();
        Ok(Client {
            path,
            reader: BufReader::new(r),
            writer: w,
            line: String::new(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one request and reads its response. [`Response::Error`] is returned as
    /// [`ClientError::Refused`], or [`ClientError::NotAllowed`] / [`ClientError::Unavailable`]
    /// for those codes.
    ///
    /// If sending fails (the daemon refused the connection and may have closed its side),
    /// the line the daemon sent is still read: a refusal is reported as such, not as a broken
    /// pipe.
    pub async fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let out = serde_json::to_vec(req).map_err(|e| ClientError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        self.call_line(out).await
    }

    /// Sends one request line (`out`, without its newline) and reads its response.
    async fn call_line(&mut self, mut out: Vec<u8>) -> Result<Response, ClientError> {
        let path = self.path.clone();
        let io = |source| ClientError::Io {
            path: path.clone(),
            source,
        };
        out.push(b'\n');
        let sent = self.writer.write_all(&out).await;
        self.line.clear();
        let read = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_line(&mut self.line)
            .await;
        let n = match (sent, read) {
            (Ok(()), Ok(n)) => n,
            (Ok(()), Err(e)) => return Err(io(e)),
            // What the daemon said before the write failed explains the failure.
            (Err(_), Ok(n)) if n > 0 && self.line.ends_with('\n') => n,
            (Err(e), _) => return Err(io(e)),
        };
        if n == 0 {
            return Err(ClientError::Closed { path });
        }
        match serde_json::from_str(self.line.trim_end()) {
            Ok(Response::Error {
                error,
                code: Some(ErrorCode::NotAllowed),
            }) => Err(ClientError::NotAllowed {
                path,
                reason: error,
            }),
            Ok(Response::Error {
                error,
                code: Some(ErrorCode::Unavailable),
            }) => Err(ClientError::Unavailable {
                path,
                reason: error,
            }),
            Ok(Response::Error { error, .. }) => Err(ClientError::Refused { path, error }),
            Ok(r) => Ok(r),
            Err(source) => Err(ClientError::BadResponse {
                path,
                line: self.line.chars().take(200).collect(),
                source,
            }),
        }
    }

    fn unexpected(&self, response: Response) -> ClientError {
        ClientError::Unexpected {
            path: self.path.clone(),
            response: Box::new(response),
        }
    }

    /// `ping`: the daemon's version.
    pub async fn ping(&mut self) -> Result<String, ClientError> {
        match self.call(&Request::Ping).await? {
            Response::Pong { version } => Ok(version),
            r => Err(self.unexpected(r)),
        }
    }

    /// `submit`: the new job's id, once it is durably stored.
    pub async fn submit(&mut self, job: serde_json::Value) -> Result<u64, ClientError> {
        match self.call(&Request::Submit { job }).await? {
            Response::Submitted { id } => Ok(id),
            r => Err(self.unexpected(r)),
        }
    }

    /// `submit` of a job given as JSON text, which the daemon stores and hands out byte for
    /// byte (a [`serde_json::Value`] cannot carry every number exactly).
    pub async fn submit_raw(
        &mut self,
        job: &serde_json::value::RawValue,
    ) -> Result<u64, ClientError> {
        let mut out = br#"{"op":"submit","job":"#.to_vec();
        out.extend_from_slice(job.get().as_bytes());
        out.push(b'}');
        match self.call_line(out).await? {
            Response::Submitted { id } => Ok(id),
            r => Err(self.unexpected(r)),
        }
    }

    /// `claim`: the oldest queued job, if any.
    pub async fn claim(&mut self, worker: &str) -> Result<Option<ClaimedJob>, ClientError> {
        match self
            .call(&Request::Claim {
                worker: worker.to_owned(),
            })
            .await?
        {
            Response::Job { job } => Ok(job),
            r => Err(self.unexpected(r)),
        }
    }

    /// `complete_and_claim`: reports job `id`'s outcome and claims the next job, in one round
    /// trip and one transaction. `Ok(None)`: the report is recorded and nothing is queued.
    pub async fn complete_and_claim(
        &mut self,
        id: u64,
        worker: &str,
        exit_code: Option<i32>,
    ) -> Result<Option<ClaimedJob>, ClientError> {
        let req = Request::CompleteAndClaim {
            id,
            worker: worker.to_owned(),
            exit_code,
        };
        match self.call(&req).await? {
            Response::Job { job } => Ok(job),
            r => Err(self.unexpected(r)),
        }
    }

    /// A request answered by [`Response::Done`] (renew, complete, deny, quarantine, release).
    pub async fn report(&mut self, req: &Request) -> Result<(), ClientError> {
        match self.call(req).await? {
            Response::Done => Ok(()),
            r => Err(self.unexpected(r)),
        }
    }

    /// `reload`: returns once the daemon has reloaded.
    pub async fn reload(&mut self) -> Result<(), ClientError> {
        self.report(&Request::Reload).await
    }

    /// `stats`.
    pub async fn stats(&mut self) -> Result<Stats, ClientError> {
        match self.call(&Request::Stats).await? {
            Response::Stats(s) => Ok(s),
            r => Err(self.unexpected(r)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wire_forms() {
        let req: Request = serde_json::from_str(r#"{"op":"claim","worker":"alpha"}"#).unwrap();
        assert_eq!(
            req,
            Request::Claim {
                worker: "alpha".into()
            }
        );
        assert_eq!(
            serde_json::to_string(&Request::Ping).unwrap(),
            r#"{"op":"ping"}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::Submitted { id: 7 }).unwrap(),
            r#"{"result":"submitted","id":7}"#
        );
        let complete: Request =
            serde_json::from_str(r#"{"op":"complete","id":1,"worker":"a","exit_code":null}"#)
                .unwrap();
        assert_eq!(
            complete,
            Request::Complete {
                id: 1,
                worker: "a".into(),
                exit_code: None
            }
        );
        let next: Request = serde_json::from_str(
            r#"{"op":"complete_and_claim","id":1,"worker":"a","exit_code":0}"#,
        )
        .unwrap();
        assert_eq!(
            next,
            Request::CompleteAndClaim {
                id: 1,
                worker: "a".into(),
                exit_code: Some(0)
            }
        );
        assert_eq!(
            serde_json::to_string(&Response::error("no job 4")).unwrap(),
            r#"{"result":"error","error":"no job 4"}"#
        );
        let refusal: Response = serde_json::from_str(
            r#"{"result":"error","error":"uid 7 is not allowed","code":"not_allowed"}"#,
        )
        .unwrap();
        assert_eq!(
            refusal,
            Response::Error {
                error: "uid 7 is not allowed".into(),
                code: Some(ErrorCode::NotAllowed)
            }
        );
        let newer: Response =
            serde_json::from_str(r#"{"result":"error","error":"x","code":"from_the_future"}"#)
                .unwrap();
        assert!(matches!(
            newer,
            Response::Error {
                code: Some(ErrorCode::Other),
                ..
            }
        ));
        assert_eq!(
            serde_json::to_string(&Response::Stats(Stats::default())).unwrap(),
            r#"{"result":"stats","queued":0,"claimed":0,"completed":0,"failed":0,"denied":0,"quarantined":0}"#
        );
        for bad in [
            r#"{"op":"claim"}"#,
            r#"{"op":"nope"}"#,
            r#"{"op":"claim","worker":"a","extra":1}"#,
            r#"{"op":"ping","extra":1}"#,
            r#"{"op":"reload","force":true}"#,
            r#"{"op":"complete","id":1,"worker":"a"}"#,
            r#"{"op":"complete_and_claim","id":1,"worker":"a"}"#,
            r#"[1]"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn job_spec_validation() {
        let ok = JobSpec::parse(&json!({"command": ["echo", "hi"]})).unwrap();
        assert_eq!(ok.timeout_secs, DEFAULT_JOB_TIMEOUT_SECS);
        assert_eq!(JobSpec::parse(&ok.to_value()).unwrap(), ok);
        for bad in [
            json!({"command": "echo hi"}),
            json!({"command": []}),
            json!({"command": [""]}),
            json!({"command": ["echo", 1]}),
            json!({"command": ["echo"], "timeout_secs": 0}),
            json!({"command": ["echo"], "shell": true}),
            json!("echo"),
        ] {
            assert!(JobSpec::parse(&bad).is_err(), "{bad}");
        }
    }
}
