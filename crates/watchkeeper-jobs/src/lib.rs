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

/// A request, one JSON object per line, tagged by `op`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
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
    /// The job ran; `exit_code` 0 is success, anything else (or none: killed, timed out) a
    /// failure.
    Complete {
        /// The job.
        id: u64,
        /// The worker holding it.
        worker: String,
        /// The command's exit code, if it exited.
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
    },
}

/// A job handed to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimedJob {
    /// The job's id.
    pub id: u64,
    /// The job as submitted.
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
    /// The daemon answered with a response that does not fit the request.
    #[error("{path}: unexpected response {response:?}")]
    Unexpected {
        /// The socket path.
        path: PathBuf,
        /// What came back.
        response: Box<Response>,
    },
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
    /// [`ClientError::Refused`].
    pub async fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let io = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        let mut out = serde_json::to_vec(req).map_err(|e| io(std::io::Error::other(e)))?;
        out.push(b'\n');
        self.writer.write_all(&out).await.map_err(io)?;
        self.line.clear();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_line(&mut self.line)
            .await
            .map_err(io)?;
        if n == 0 {
            return Err(ClientError::Closed {
                path: self.path.clone(),
            });
        }
        match serde_json::from_str(self.line.trim_end()) {
            Ok(Response::Error { error }) => Err(ClientError::Refused {
                path: self.path.clone(),
                error,
            }),
            Ok(r) => Ok(r),
            Err(source) => Err(ClientError::BadResponse {
                path: self.path.clone(),
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
        assert_eq!(
            serde_json::to_string(&Response::Stats(Stats::default())).unwrap(),
            r#"{"result":"stats","queued":0,"claimed":0,"completed":0,"failed":0,"denied":0,"quarantined":0}"#
        );
        for bad in [
            r#"{"op":"claim"}"#,
            r#"{"op":"nope"}"#,
            r#"{"op":"claim","worker":"a","extra":1}"#,
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
