//! The durable job store: one SQLite file, [`FILE_NAME`], in the daemon's state directory.
//!
//! Every function is synchronous and takes the time (`now_ms`, milliseconds since the Unix
//! epoch) as an argument, so that lease expiry can be tested with an injected clock. The daemon
//! runs them on tokio's blocking pool through [`SharedStore`].
//!
//! # Durability
//!
//! The database is opened with `journal_mode=WAL` and `synchronous=FULL`: a commit returns only
//! once its WAL frames are on disk. Every mutating function commits before it returns, and the
//! daemon answers a request only after that, so an acknowledged change survives `kill -9` (and
//! a power cut, as far as the disk honours `fsync`).
//!
//! # Job states
//!
//! ```text
//!            submit              claim (attempts+1, lease)
//!   ───────────────▶ queued ─────────────────────────────▶ claimed
//!                      ▲  ◀──── release (attempts-1) ────── │ │ │
//!                      └─────── lease expired, ──────────── ┘ │ │ complete / deny / quarantine
//!                               attempts < max_attempts       │ └──▶ completed | failed | denied | quarantined
//!                                                             └────▶ quarantined (lease expired
//!                                                                    max_attempts times: poison)
//! ```
//!
//! A claim's lease runs out at `lease_until_ms`. Expired leases are swept (the job queued again,
//! or quarantined once it has used `max_attempts` attempts) at the start of every claim and by
//! the daemon's maintenance task, about every 500 ms. A worker's report on a job whose lease has
//! run out is refused, even before the sweep: the job is no longer the worker's.
//!
//! Times are wall-clock milliseconds, because leases must survive a restart; a clock step moves
//! every deadline with it.

use std::fmt;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension as _, Transaction, TransactionBehavior, params};
use serde_json::value::RawValue;
use watchkeeper_jobs::{ClaimedJob, MAX_LINE, Response, Stats};

/// The database file's name inside the state directory.
pub const FILE_NAME: &str = "jobs.sqlite3";

/// The schema version this daemon writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 3;

/// How long a statement waits for a lock held by another connection (`PRAGMA busy_timeout`).
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest worker name accepted by [`Store::claim`], in bytes.
pub const MAX_WORKER_NAME: usize = 256;

/// Version 2: ids are `AUTOINCREMENT` (never reused, even after the highest row is deleted),
/// and `lease_secs` records the lease a job was claimed with (renewals never shorten it).
/// Version 1 had neither.
const JOBS_TABLE_V2: &str = "
CREATE TABLE jobs (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    spec           TEXT    NOT NULL,
    state          TEXT    NOT NULL CHECK (state IN
                       ('queued', 'claimed', 'completed', 'failed', 'denied', 'quarantined')),
    attempts       INTEGER NOT NULL DEFAULT 0,
    worker         TEXT,
    lease_until_ms INTEGER,
    created_ms     INTEGER NOT NULL,
    updated_ms     INTEGER NOT NULL,
    reason         TEXT,
    exit_code      INTEGER,
    lease_secs     INTEGER
);
";

const INDEXES_V2: &str = "
CREATE INDEX jobs_by_state ON jobs (state, id);
CREATE INDEX jobs_by_lease ON jobs (lease_until_ms) WHERE state = 'claimed';
";

/// Version 3: counts by state kept in `job_counts` by triggers, so that the periodic counts
/// read six rows instead of scanning the table; and an index on the finished jobs' age for
/// retention. Applied on top of version 2.
const COUNTS_V3: &str = "
CREATE TABLE job_counts (state TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO job_counts (state, n) VALUES
    ('queued', 0), ('claimed', 0), ('completed', 0), ('failed', 0), ('denied', 0),
    ('quarantined', 0);
UPDATE job_counts SET n = (SELECT COUNT(*) FROM jobs WHERE jobs.state = job_counts.state);
CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs BEGIN
    UPDATE job_counts SET n = n + 1 WHERE state = NEW.state;
END;
CREATE TRIGGER jobs_count_update AFTER UPDATE OF state ON jobs WHEN OLD.state <> NEW.state BEGIN
    UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
    UPDATE job_counts SET n = n + 1 WHERE state = NEW.state;
END;
CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs BEGIN
    UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
END;
CREATE INDEX jobs_finished ON jobs (updated_ms)
    WHERE state IN ('completed', 'failed', 'denied', 'quarantined');
";

/// Version 1 to 2, inside the schema transaction: the table is recreated with its rows (and so
/// its highest id, which seeds `sqlite_sequence`); claims from version 1 have no recorded lease
/// (`lease_secs` NULL), so their renewals use the configured one.
/// Version 1 to 2, inside the schema transaction: the old table is set aside, the new one
/// created from [`JOBS_TABLE_V2`], and the rows copied (and so its highest id, which seeds
/// `sqlite_sequence`); claims from version 1 have no recorded lease (`lease_secs` NULL), so
/// their renewals use the configured one.
const MIGRATE_V1_SET_ASIDE: &str = "
ALTER TABLE jobs RENAME TO jobs_v1;
DROP INDEX IF EXISTS jobs_by_state;
DROP INDEX IF EXISTS jobs_by_lease;
";

/// The rest of the version 1 to 2 migration, after [`JOBS_TABLE_V2`].
const MIGRATE_V1_COPY: &str = "
INSERT INTO jobs (id, spec, state, attempts, worker, lease_until_ms, created_ms, updated_ms,
                  reason, exit_code)
    SELECT id, spec, state, attempts, worker, lease_until_ms, created_ms, updated_ms, reason,
           exit_code
    FROM jobs_v1 ORDER BY id;
DROP TABLE jobs_v1;
";

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Waiting to be claimed.
    Queued,
    /// Held by a worker under a lease.
    Claimed,
    /// Ran and exited 0.
    Completed,
    /// Ran and failed: non-zero exit, killed or timed out.
    Failed,
    /// Refused by a worker's allowlist.
    Denied,
    /// Malformed, or its lease expired `max_attempts` times (poison).
    Quarantined,
}

impl JobState {
    /// Every state, in the order of [`Stats`].
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Claimed,
        JobState::Completed,
        JobState::Failed,
        JobState::Denied,
        JobState::Quarantined,
    ];

    /// The name stored in the `state` column.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Claimed => "claimed",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Denied => "denied",
            JobState::Quarantined => "quarantined",
        }
    }

    /// The state stored as `name`, if it is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The lease rules a claim and a sweep follow (from the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// A claim's (and a renewal's) lease, in seconds.
    pub lease_secs: u64,
    /// A job whose lease expires with this many attempts used is quarantined as poison.
    pub max_attempts: u32,
}

/// A claim whose lease ran out, as found by a sweep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// The job.
    pub id: u64,
    /// The worker that held it.
    pub worker: Option<String>,
    /// Attempts used so far.
    pub attempts: u32,
    /// Whether it was quarantined (poison) rather than queued again.
    pub quarantined: bool,
}

/// One row of the `jobs` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    /// The job's id.
    pub id: u64,
    /// The job as submitted, JSON text.
    pub spec: String,
    /// Where it is.
    pub state: JobState,
    /// Claims that were not given back with `release`.
    pub attempts: u32,
    /// The worker holding it (claimed) or that last held it.
    pub worker: Option<String>,
    /// End of the current lease, while claimed.
    pub lease_until_ms: Option<i64>,
    /// When it was submitted.
    pub created_ms: i64,
    /// When it last changed.
    pub updated_ms: i64,
    /// Why it is where it is (failure, denial, quarantine, expiry, release).
    pub reason: Option<String>,
    /// The exit code a worker reported.
    pub exit_code: Option<i32>,
}

/// Reads an existing database file's header (the first 100 bytes, read-only, before any SQLite
/// connection exists) and refuses a file that is not an SQLite database or whose schema
/// version (`PRAGMA user_version`, big-endian at offset 60) is newer than ours. A missing or
/// empty file passes: it is about to be created.
///
/// The header can be behind the `-wal` file of a daemon that crashed; the version is checked
/// again, on the open connection, before any change.
fn check_header(path: &Path) -> Result<(), StoreError> {
    use std::io::Read as _;
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(StoreError::CreateFile {
                path: path.to_owned(),
                source,
            });
        }
    };
    let not_db = |why: &str| StoreError::NotADatabase {
        path: path.to_owned(),
        why: why.to_owned(),
    };
    let meta = file.metadata().map_err(|source| StoreError::CreateFile {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(not_db("not a regular file"));
    }
    let mut header = Vec::with_capacity(100);
    (&mut file)
        .take(100)
        .read_to_end(&mut header)
        .map_err(|source| StoreError::CreateFile {
            path: path.to_owned(),
            source,
        })?;
    if header.is_empty() {
        return Ok(());
    }
    if header.len() < 100 || !header.starts_with(b"SQLite format 3\0") {
        return Err(not_db("no SQLite header"));
    }
    let found = i64::from(u32::from_be_bytes([
        header[60], header[61], header[62], header[63],
    ]));
    if found > SCHEMA_VERSION {
        return Err(StoreError::UnknownSchema {
            path: path.to_owned(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

/// A job handed to a worker, its spec as the JSON text it was submitted as.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The job's id.
    pub id: u64,
    /// The job as submitted, byte for byte.
    pub spec: Box<RawValue>,
    /// Which attempt this is, from 1.
    pub attempt: u32,
    /// The lease in seconds.
    pub lease_secs: u64,
}

impl Claimed {
    /// As the protocol type (the spec parsed into a `Value`).
    pub fn to_claimed_job(&self) -> ClaimedJob {
        ClaimedJob {
            id: self.id,
            spec: serde_json::from_str(self.spec.get()).unwrap_or(serde_json::Value::Null),
            attempt: self.attempt,
            lease_secs: self.lease_secs,
        }
    }
}

impl PartialEq for Claimed {
    fn eq(&self, other: &Self) -> bool {
        (self.id, self.spec.get(), self.attempt, self.lease_secs)
            == (other.id, other.spec.get(), other.attempt, other.lease_secs)
    }
}

/// A store operation failed or was refused. Nothing changed in either case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The state directory could not be created.
    #[error("cannot create the state directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The database file could not be created with mode 0600.
    #[error("cannot create the job store {path}")]
    CreateFile {
        /// The database file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// SQLite refused to open the file.
    #[error("cannot open the job store {path}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The file exists and is not an SQLite database.
    #[error("{path} is not an SQLite database ({why}); leaving it alone")]
    NotADatabase {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// WAL mode could not be enabled (e.g. a file system without shared memory support).
    #[error("{path}: journal_mode is {mode:?} after asking for WAL")]
    NotWal {
        /// The database file.
        path: PathBuf,
        /// The mode SQLite reports.
        mode: String,
    },
    /// The file was written by a newer (or unknown) schema.
    #[error(
        "{path} has schema version {found} (PRAGMA user_version); this daemon knows versions 0 to {supported}, so it leaves the file alone"
    )]
    UnknownSchema {
        /// The database file.
        path: PathBuf,
        /// The version found.
        found: i64,
        /// [`SCHEMA_VERSION`].
        supported: i64,
    },
    /// A statement failed.
    #[error("{path}: {op} failed")]
    Sql {
        /// The database file.
        path: PathBuf,
        /// What was being done, with the request's details (job id, worker).
        op: String,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// No job has this id.
    #[error("no job {id}")]
    NoSuchJob {
        /// The id asked for.
        id: u64,
    },
    /// The job is not (or no longer) held by this worker.
    #[error("job {id} is not claimed by {worker}: {why}")]
    NotClaimed {
        /// The job.
        id: u64,
        /// The worker that asked.
        worker: String,
        /// Where the job is instead.
        why: String,
    },
    /// A job spec too large to be handed out again in a claim response.
    #[error(
        "job spec is {len} bytes of JSON; at most {max} fit in a claim response line (MAX_LINE {MAX_LINE})"
    )]
    SpecTooLarge {
        /// The spec's length.
        len: usize,
        /// [`max_spec_len`].
        max: usize,
    },
    /// A job spec that is not JSON.
    #[error("job spec is not JSON: {reason}")]
    InvalidSpec {
        /// Why.
        reason: String,
    },
    /// A worker name that is empty or longer than [`MAX_WORKER_NAME`].
    #[error("worker name must be 1 to {MAX_WORKER_NAME} bytes, not {len}")]
    InvalidWorker {
        /// The name's length.
        len: usize,
    },
    /// A batch of calls could not be committed; this call did not take effect.
    #[error("{path}: {message}")]
    Commit {
        /// The database file.
        path: PathBuf,
        /// Why, on one line.
        message: String,
    },
    /// The store's writer did not answer the call (it panicked, or the store is gone).
    #[error("the job store did not answer {op}")]
    Lost {
        /// The call.
        op: String,
    },
    /// The blocking task running a store call did not finish (it panicked or was cancelled).
    #[error("store task for {op} did not finish")]
    Task {
        /// The call.
        op: String,
        /// Why.
        #[source]
        source: tokio::task::JoinError,
    },
}

impl StoreError {
    /// Whether the request was refused for what it asked (wrong worker, unknown job, too large),
    /// as opposed to the store failing.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            StoreError::NoSuchJob { .. }
                | StoreError::NotClaimed { .. }
                | StoreError::SpecTooLarge { .. }
                | StoreError::InvalidSpec { .. }
                | StoreError::InvalidWorker { .. }
        )
    }
}

/// Wall-clock milliseconds since the Unix epoch: the daemon's clock for [`Store`] calls.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The longest spec (serialized JSON) whose claim response still fits in [`MAX_LINE`], with the
/// largest id, attempt and lease the response can carry.
pub fn max_spec_len() -> usize {
    let widest = Response::Job {
        job: Some(ClaimedJob {
            id: u64::MAX,
            spec: serde_json::Value::Null,
            attempt: u32::MAX,
            lease_secs: u64::MAX,
        }),
    };
    let overhead = serde_json::to_string(&widest)
        .map(|s| s.len() - "null".len())
        .unwrap_or(256);
    MAX_LINE.saturating_sub(overhead)
}

fn sql_err(path: &Path, op: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> StoreError {
    let path = path.to_owned();
    let op = op.into();
    move |source| StoreError::Sql { path, op, source }
}

fn to_u32(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

fn lease_end(now_ms: i64, lease_secs: u64) -> i64 {
    let ms = i64::try_from(lease_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    now_ms.saturating_add(ms)
}

/// The job store: one SQLite connection. Not `Sync`; share it through [`SharedStore`].
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// Inside a [`SharedStore`] batch: each call's transaction is a savepoint of the batch's.
    in_batch: bool,
}

/// A call's transaction: its own (`BEGIN IMMEDIATE`), or a savepoint inside a batch.
enum Tx<'a> {
    Top(Transaction<'a>),
    Nested(rusqlite::Savepoint<'a>),
}

impl std::ops::Deref for Tx<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        match self {
            Tx::Top(t) => t,
            Tx::Nested(s) => s,
        }
    }
}

impl Tx<'_> {
    /// Commits (or, inside a batch, releases the savepoint: the batch commits it). Dropped
    /// uncommitted, it rolls back.
    fn commit(self) -> rusqlite::Result<()> {
        match self {
            Tx::Top(t) => t.commit(),
            Tx::Nested(s) => s.commit(),
        }
    }
}

fn begin(conn: &mut Connection, in_batch: bool) -> rusqlite::Result<Tx<'_>> {
    if in_batch {
        conn.savepoint().map(Tx::Nested)
    } else {
        conn.transaction_with_behavior(TransactionBehavior::Immediate)
            .map(Tx::Top)
    }
}

impl Store {
    /// Opens (or creates) [`FILE_NAME`] in `dir`, creating `dir` with mode 0700 if it is missing.
    pub fn open_in(dir: &Path) -> Result<Self, StoreError> {
        if !dir.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| StoreError::CreateDir {
                    path: dir.to_owned(),
                    source,
                })?;
        }
        Self::open(&dir.join(FILE_NAME))
    }

    /// Opens (or creates) the database at `path`: WAL, `synchronous=FULL`, [`BUSY_TIMEOUT`],
    /// and the schema created or checked.
    ///
    /// An existing file is checked before SQLite touches it: a file that is not an SQLite
    /// database, or one with a newer schema version than [`SCHEMA_VERSION`], is refused
    /// without a byte of it (or a `-wal`/`-shm` file next to it) changing.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        check_header(path)?;
        // Create the file ourselves, 0600: job specs are commands. SQLite gives its -wal and
        // -shm files the database file's mode.
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|source| StoreError::CreateFile {
                path: path.to_owned(),
                source,
            })?;
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(sql_err(path, "PRAGMA journal_mode = WAL"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NotWal {
                path: path.to_owned(),
                mode,
            });
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql_err(path, "PRAGMA synchronous = FULL"))?;
        let mut store = Store {
            conn,
            path: path.to_owned(),
            in_batch: false,
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let path = &self.path;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql_err(path, "begin schema check"))?;
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql_err(path, "PRAGMA user_version"))?;
        match version {
            0 => {
                tx.execute_batch(JOBS_TABLE_V2)
                    .and_then(|()| tx.execute_batch(INDEXES_V2))
                    .and_then(|()| tx.execute_batch(COUNTS_V3))
                    .map_err(sql_err(path, "create schema version 3"))?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                    .map_err(sql_err(path, "set PRAGMA user_version"))?;
                tracing::info!(path = %path.display(), version = SCHEMA_VERSION, "created the job store");
            }
            1 => {
                tx.execute_batch(MIGRATE_V1_SET_ASIDE)
                    .and_then(|()| tx.execute_batch(JOBS_TABLE_V2))
                    .and_then(|()| tx.execute_batch(MIGRATE_V1_COPY))
                    .and_then(|()| tx.execute_batch(INDEXES_V2))
                    .and_then(|()| tx.execute_batch(COUNTS_V3))
                    .map_err(sql_err(path, "migrate schema version 1 to 3"))?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                    .map_err(sql_err(path, "set PRAGMA user_version"))?;
                tracing::info!(path = %path.display(), version = SCHEMA_VERSION, "migrated the job store from schema version 1");
            }
            2 => {
                tx.execute_batch(COUNTS_V3)
                    .map_err(sql_err(path, "migrate schema version 2 to 3"))?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                    .map_err(sql_err(path, "set PRAGMA user_version"))?;
                tracing::info!(path = %path.display(), version = SCHEMA_VERSION, "migrated the job store from schema version 2");
            }
            SCHEMA_VERSION => {}
            found => {
                return Err(StoreError::UnknownSchema {
                    path: path.clone(),
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
        }
        tx.commit().map_err(sql_err(path, "commit schema"))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version stored in the file (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql_err(&self.path, "PRAGMA user_version"))
    }

    /// Queues a job, committed before this returns. The spec is stored as JSON text, without
    /// interpretation; it must fit in a claim response ([`max_spec_len`]).
    pub fn submit(&mut self, spec: &serde_json::Value, now_ms: i64) -> Result<u64, StoreError> {
        // `Value`'s `Display` is its compact JSON.
        self.submit_raw(&spec.to_string(), now_ms)
    }

    /// Queues a job given as JSON text, stored and handed out byte for byte as given (numbers,
    /// key order and white space included). Committed before this returns.
    pub fn submit_raw(&mut self, text: &str, now_ms: i64) -> Result<u64, StoreError> {
        let text = text.trim_matches(|c: char| c.is_ascii_whitespace());
        if let Err(e) = serde_json::from_str::<&RawValue>(text) {
            return Err(StoreError::InvalidSpec {
                reason: crate::error_chain(&e),
            });
        }
        let max = max_spec_len();
        if text.len() > max {
            return Err(StoreError::SpecTooLarge {
                len: text.len(),
                max,
            });
        }
        self.conn
            .execute(
                "INSERT INTO jobs (spec, state, attempts, created_ms, updated_ms)
                 VALUES (?1, 'queued', 0, ?2, ?2)",
                params![text, now_ms],
            )
            .map_err(sql_err(&self.path, "submit"))?;
        Ok(self.conn.last_insert_rowid().unsigned_abs())
    }

    /// Sweeps expired leases (see [`Store::sweep`]), then hands the oldest queued job to
    /// `worker` under a lease of `policy.lease_secs`, in one transaction: attempts + 1.
    ///
    /// If `worker` already holds an unexpired claim, that job is handed out again instead,
    /// without counting an attempt, its lease restarted at `policy.lease_secs` from now: workers
    /// do not claim while they hold a job, so a claim by a holder means its earlier claim answer
    /// was lost (a timeout, a broken connection) and it does not know it holds the job.
    pub fn claim(
        &mut self,
        worker: &str,
        policy: Policy,
        now_ms: i64,
    ) -> Result<Option<Claimed>, StoreError> {
        if worker.is_empty() || worker.len() > MAX_WORKER_NAME {
            return Err(StoreError::InvalidWorker { len: worker.len() });
        }
        let path = &self.path;
        let op = || format!("claim by {worker}");
        let tx = begin(&mut self.conn, self.in_batch).map_err(sql_err(path, op()))?;
        let job = claim_tx(&tx, path, worker, policy, now_ms)?;
        tx.commit().map_err(sql_err(path, op()))?;
        Ok(job)
    }

    /// [`Store::complete`] and then [`Store::claim`] by `worker`, in one transaction: the
    /// outcome is recorded and the next job claimed, or, if the report is refused, neither.
    pub fn complete_and_claim(
        &mut self,
        id: u64,
        worker: &str,
        exit_code: Option<i32>,
        policy: Policy,
        now_ms: i64,
    ) -> Result<Option<Claimed>, StoreError> {
        if worker.is_empty() || worker.len() > MAX_WORKER_NAME {
            return Err(StoreError::InvalidWorker { len: worker.len() });
        }
        let path = &self.path;
        let op = || format!("complete job {id} and claim by {worker}");
        let tx = begin(&mut self.conn, self.in_batch).map_err(sql_err(path, op()))?;
        let rid = check_holder(&tx, path, id, worker, "complete", now_ms)?;
        let (state, reason) = outcome(exit_code);
        settle_tx(&tx, rid, state, reason, exit_code, now_ms).map_err(sql_err(path, op()))?;
        let job = claim_tx(&tx, path, worker, policy, now_ms)?;
        tx.commit().map_err(sql_err(path, op()))?;
        Ok(job)
    }

    /// Ends every lease that ran out by `now_ms`: a job that has used `max_attempts` attempts is
    /// quarantined ("lease expired N times: poison job"), the others are queued again.
    pub fn sweep(&mut self, max_attempts: u32, now_ms: i64) -> Result<Vec<Expired>, StoreError> {
        let path = &self.path;
        let tx =
            begin(&mut self.conn, self.in_batch).map_err(sql_err(path, "sweep expired leases"))?;
        let expired = sweep_tx(&tx, path, max_attempts, now_ms)?;
        tx.commit().map_err(sql_err(path, "sweep expired leases"))?;
        Ok(expired)
    }

    /// Extends `worker`'s lease on job `id` to `lease_secs` (the configured lease) from now,
    /// or to the lease the job was claimed with if that is longer: the worker renews on the
    /// schedule of the lease it was given, so a reload that shortens the lease must not let
    /// its running job expire between renewals.
    pub fn renew(
        &mut self,
        id: u64,
        worker: &str,
        lease_secs: u64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.finish(id, worker, "renew", now_ms, |tx, rid| {
            let claimed: Option<i64> =
                tx.query_row("SELECT lease_secs FROM jobs WHERE id = ?1", [rid], |r| {
                    r.get(0)
                })?;
            let claimed = claimed.map_or(0, i64::unsigned_abs);
            let until = lease_end(now_ms, lease_secs.max(claimed));
            tx.execute(
                "UPDATE jobs SET lease_until_ms = ?2, updated_ms = ?3 WHERE id = ?1",
                params![rid, until, now_ms],
            )
        })
    }

    /// Records the outcome of a run: `Some(0)` → completed, anything else → failed.
    pub fn complete(
        &mut self,
        id: u64,
        worker: &str,
        exit_code: Option<i32>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let (state, reason) = outcome(exit_code);
        self.settle(id, worker, "complete", state, reason, exit_code, now_ms)
    }

    /// Records that `worker` may not run the job (its allowlist refused it).
    pub fn deny(
        &mut self,
        id: u64,
        worker: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let reason = Some(reason.to_owned());
        self.settle(id, worker, "deny", JobState::Denied, reason, None, now_ms)
    }

    /// Records that the job is malformed and must not be retried.
    pub fn quarantine(
        &mut self,
        id: u64,
        worker: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let reason = Some(reason.to_owned());
        let state = JobState::Quarantined;
        self.settle(id, worker, "quarantine", state, reason, None, now_ms)
    }

    /// Gives the job back unrun: queued again, and the attempt does not count.
    pub fn release(&mut self, id: u64, worker: &str, now_ms: i64) -> Result<(), StoreError> {
        let reason = format!("released by {worker}");
        self.finish(id, worker, "release", now_ms, |tx, rid| {
            tx.execute(
                "UPDATE jobs SET state = 'queued', attempts = MAX(attempts - 1, 0),
                        lease_until_ms = NULL, reason = ?2, updated_ms = ?3
                 WHERE id = ?1",
                params![rid, reason, now_ms],
            )
        })
    }

    /// When the first lease of a claimed job runs out (ms since the epoch), if any job is
    /// claimed: what the next [`Store::sweep`] waits for. One probe of the lease index.
    pub fn next_lease_end(&self) -> Result<Option<i64>, StoreError> {
        self.conn
            .query_row(
                "SELECT MIN(lease_until_ms) FROM jobs WHERE state = 'claimed'",
                [],
                |r| r.get::<_, Option<i64>>(0),
            )
            .map_err(sql_err(&self.path, "find the next lease end"))
    }

    /// Counts jobs by state: six rows of `job_counts`, kept by triggers, not a scan.
    pub fn stats(&self) -> Result<Stats, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT state, n FROM job_counts")
            .map_err(sql_err(&self.path, "stats"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(sql_err(&self.path, "stats"))?;
        let mut stats = Stats::default();
        for row in rows {
            let (state, n) = row.map_err(sql_err(&self.path, "stats"))?;
            let n = n.unsigned_abs();
            match JobState::from_name(&state) {
                Some(JobState::Queued) => stats.queued = n,
                Some(JobState::Claimed) => stats.claimed = n,
                Some(JobState::Completed) => stats.completed = n,
                Some(JobState::Failed) => stats.failed = n,
                Some(JobState::Denied) => stats.denied = n,
                Some(JobState::Quarantined) => stats.quarantined = n,
                None => {} // excluded by the CHECK constraint
            }
        }
        Ok(stats)
    }

    /// Deletes at most `step` finished jobs (completed, failed, denied, quarantined), oldest
    /// first by when they finished: those finished more than `keep_secs` ago, then, if more
    /// than `keep_max` finished jobs remain, the oldest beyond that. `0` turns either rule off.
    /// Returns how many were deleted. Small steps keep each commit short.
    pub fn prune(
        &mut self,
        keep_secs: u64,
        keep_max: u64,
        step: u64,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        const FINISHED: &str = "state IN ('completed', 'failed', 'denied', 'quarantined')";
        let path = &self.path;
        let op = "prune finished jobs";
        let tx = begin(&mut self.conn, self.in_batch).map_err(sql_err(path, op))?;
        let step = i64::try_from(step).unwrap_or(i64::MAX);
        let mut deleted = 0i64;
        if keep_secs > 0 {
            let cutoff = now_ms
                .saturating_sub(i64::try_from(keep_secs.saturating_mul(1000)).unwrap_or(i64::MAX));
            let n = tx
                .prepare_cached(&format!(
                    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE {FINISHED}
                     AND updated_ms < ?1 ORDER BY updated_ms LIMIT ?2)"
                ))
                .and_then(|mut st| st.execute(params![cutoff, step]))
                .map_err(sql_err(path, op))?;
            deleted += i64::try_from(n).unwrap_or(i64::MAX);
        }
        if keep_max > 0 && deleted < step {
            let finished: i64 = tx
                .query_row(
                    "SELECT COALESCE(SUM(n), 0) FROM job_counts
                     WHERE state IN ('completed', 'failed', 'denied', 'quarantined')",
                    [],
                    |r| r.get(0),
                )
                .map_err(sql_err(path, op))?;
            let keep = i64::try_from(keep_max).unwrap_or(i64::MAX);
            let excess = (finished - keep).min(step - deleted);
            if excess > 0 {
                let n = tx
                    .prepare_cached(&format!(
                        "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE {FINISHED}
                         ORDER BY updated_ms LIMIT ?1)"
                    ))
                    .and_then(|mut st| st.execute(params![excess]))
                    .map_err(sql_err(path, op))?;
                deleted += i64::try_from(n).unwrap_or(i64::MAX);
            }
        }
        tx.commit().map_err(sql_err(path, op))?;
        Ok(deleted.unsigned_abs())
    }

    /// One job's row, if it exists.
    pub fn job(&self, id: u64) -> Result<Option<JobRecord>, StoreError> {
        let Ok(rid) = i64::try_from(id) else {
            return Ok(None);
        };
        let op = || format!("read job {id}");
        let row = self
            .conn
            .query_row(
                "SELECT id, spec, state, attempts, worker, lease_until_ms, created_ms,
                        updated_ms, reason, exit_code
                 FROM jobs WHERE id = ?1",
                [rid],
                |r| {
                    Ok((
                        JobRecord {
                            id,
                            spec: r.get(1)?,
                            state: JobState::Queued,
                            attempts: to_u32(r.get(3)?),
                            worker: r.get(4)?,
                            lease_until_ms: r.get(5)?,
                            created_ms: r.get(6)?,
                            updated_ms: r.get(7)?,
                            reason: r.get(8)?,
                            exit_code: r.get(9)?,
                        },
                        r.get::<_, String>(2)?,
                    ))
                },
            )
            .optional()
            .map_err(sql_err(&self.path, op()))?;
        Ok(row.map(|(mut rec, state)| {
            rec.state = JobState::from_name(&state).unwrap_or(JobState::Quarantined);
            rec
        }))
    }

    /// Ends a claim in a final state.
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &mut self,
        id: u64,
        worker: &str,
        what: &str,
        state: JobState,
        reason: Option<String>,
        exit_code: Option<i32>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.finish(id, worker, what, now_ms, |tx, rid| {
            settle_tx(tx, rid, state, reason, exit_code, now_ms)
        })
    }

    /// Runs `update` in a transaction if, and only if, `worker` holds an unexpired claim on `id`.
    fn finish(
        &mut self,
        id: u64,
        worker: &str,
        what: &str,
        now_ms: i64,
        update: impl FnOnce(&Connection, i64) -> rusqlite::Result<usize>,
    ) -> Result<(), StoreError> {
        let path = &self.path;
        let op = || format!("{what} job {id} by {worker}");
        let tx = begin(&mut self.conn, self.in_batch).map_err(sql_err(path, op()))?;
        let rid = check_holder(&tx, path, id, worker, what, now_ms)?;
        update(&tx, rid).map_err(sql_err(path, op()))?;
        tx.commit().map_err(sql_err(path, op()))
    }
}

/// The job's row id if, and only if, `worker` holds an unexpired claim on `id`.
fn check_holder(
    tx: &Connection,
    path: &Path,
    id: u64,
    worker: &str,
    what: &str,
    now_ms: i64,
) -> Result<i64, StoreError> {
    let op = || format!("{what} job {id} by {worker}");
    let rid = i64::try_from(id).map_err(|_| StoreError::NoSuchJob { id })?;
    let row: Option<(String, Option<String>, Option<i64>)> = tx
        .query_row(
            "SELECT state, worker, lease_until_ms FROM jobs WHERE id = ?1",
            [rid],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
        .map_err(sql_err(path, op()))?;
    let Some((state, holder, lease_until)) = row else {
        return Err(StoreError::NoSuchJob { id });
    };
    let refuse = |why: String| StoreError::NotClaimed {
        id,
        worker: worker.to_owned(),
        why,
    };
    if state != JobState::Claimed.as_str() {
        return Err(refuse(format!("it is {state}")));
    }
    match holder {
        Some(h) if h == worker => {}
        Some(h) => return Err(refuse(format!("it is claimed by {h}"))),
        None => return Err(refuse("it has no worker".to_owned())),
    }
    if lease_until.is_none_or(|until| until <= now_ms) {
        return Err(refuse("its lease expired".to_owned()));
    }
    Ok(rid)
}

/// A run's final state and reason: `Some(0)` → completed, anything else → failed.
fn outcome(exit_code: Option<i32>) -> (JobState, Option<String>) {
    match exit_code {
        Some(0) => (JobState::Completed, None),
        Some(code) => (JobState::Failed, Some(format!("exited with code {code}"))),
        None => (
            JobState::Failed,
            Some("no exit code (killed or timed out)".to_owned()),
        ),
    }
}

/// Ends a claim in a final state, inside the caller's transaction.
fn settle_tx(
    tx: &Connection,
    rid: i64,
    state: JobState,
    reason: Option<String>,
    exit_code: Option<i32>,
    now_ms: i64,
) -> rusqlite::Result<usize> {
    tx.execute(
        "UPDATE jobs SET state = ?2, reason = ?3, exit_code = ?4, lease_until_ms = NULL,
                updated_ms = ?5
         WHERE id = ?1",
        params![rid, state.as_str(), reason, exit_code, now_ms],
    )
}

/// The claim, inside the caller's transaction: sweep, then the held job or the oldest queued.
fn claim_tx(
    tx: &Connection,
    path: &Path,
    worker: &str,
    policy: Policy,
    now_ms: i64,
) -> Result<Option<Claimed>, StoreError> {
    let op = || format!("claim by {worker}");
    sweep_tx(tx, path, policy.max_attempts, now_ms)?;
    let lease_secs = i64::try_from(policy.lease_secs).unwrap_or(i64::MAX);
    let held: Option<(i64, String, i64)> = tx
        .query_row(
            "SELECT id, spec, attempts FROM jobs
             WHERE state = 'claimed' AND worker = ?1 AND lease_until_ms > ?2
             ORDER BY id LIMIT 1",
            params![worker, now_ms],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
        .map_err(sql_err(path, op()))?;
    if let Some((id, text, attempts)) = held {
        // The spec was read when the job was first handed out; a file edited by hand since
        // then falls through to the ordinary claim and the job runs out its lease.
        if let Ok(spec) = serde_json::from_str::<Box<RawValue>>(&text) {
            tracing::warn!(
                job = id,
                worker,
                attempts,
                "claim by the job's holder: handing it out again (its claim answer was lost)"
            );
            tx.execute(
                "UPDATE jobs SET lease_until_ms = ?2, lease_secs = ?3, updated_ms = ?4
                 WHERE id = ?1",
                params![id, lease_end(now_ms, policy.lease_secs), lease_secs, now_ms],
            )
            .map_err(sql_err(path, op()))?;
            return Ok(Some(Claimed {
                id: id.unsigned_abs(),
                spec,
                attempt: to_u32(attempts),
                lease_secs: policy.lease_secs,
            }));
        }
    }
    loop {
        let next: Option<(i64, String, i64)> = tx
            .query_row(
                "SELECT id, spec, attempts FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(sql_err(path, op()))?;
        let Some((id, text, attempts)) = next else {
            return Ok(None);
        };
        let spec = match serde_json::from_str::<Box<RawValue>>(&text) {
            Ok(spec) => spec,
            Err(e) => {
                // Only possible if the file was edited by hand; do not let it block the queue.
                let reason = format!("stored spec is not valid JSON: {e}");
                tracing::warn!(job = id, %reason, "quarantining a job at claim");
                tx.execute(
                    "UPDATE jobs SET state = 'quarantined', reason = ?2, updated_ms = ?3
                     WHERE id = ?1",
                    params![id, reason, now_ms],
                )
                .map_err(sql_err(path, op()))?;
                continue;
            }
        };
        let attempt = attempts.saturating_add(1);
        tx.execute(
            "UPDATE jobs SET state = 'claimed', attempts = ?2, worker = ?3,
                    lease_until_ms = ?4, updated_ms = ?5, lease_secs = ?6
             WHERE id = ?1",
            params![
                id,
                attempt,
                worker,
                lease_end(now_ms, policy.lease_secs),
                now_ms,
                lease_secs
            ],
        )
        .map_err(sql_err(path, op()))?;
        return Ok(Some(Claimed {
            id: id.unsigned_abs(),
            spec,
            attempt: to_u32(attempt),
            lease_secs: policy.lease_secs,
        }));
    }
}

/// The sweep, inside the caller's transaction.
fn sweep_tx(
    tx: &Connection,
    path: &Path,
    max_attempts: u32,
    now_ms: i64,
) -> Result<Vec<Expired>, StoreError> {
    let op = "sweep expired leases";
    let rows: Vec<(i64, Option<String>, i64)> = {
        let mut stmt = tx
            .prepare_cached(
                "SELECT id, worker, attempts FROM jobs
                 WHERE state = 'claimed' AND lease_until_ms <= ?1 ORDER BY id",
            )
            .map_err(sql_err(path, op))?;
        stmt.query_map([now_ms], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .and_then(|rows| rows.collect::<rusqlite::Result<_>>())
            .map_err(sql_err(path, op))?
    };
    let mut expired = Vec::with_capacity(rows.len());
    for (id, worker, attempts) in rows {
        let attempts = to_u32(attempts);
        let who = worker.as_deref().unwrap_or("?");
        let quarantined = attempts >= max_attempts;
        if quarantined {
            let reason = format!("lease expired {attempts} times: poison job");
            tracing::warn!(job = id, worker = who, attempts, "{reason}; quarantined");
            tx.execute(
                "UPDATE jobs SET state = 'quarantined', reason = ?2, lease_until_ms = NULL,
                        updated_ms = ?3
                 WHERE id = ?1",
                params![id, reason, now_ms],
            )
            .map_err(sql_err(path, op))?;
        } else {
            let reason = format!("lease expired (attempt {attempts}, worker {who})");
            tracing::warn!(
                job = id,
                worker = who,
                attempts,
                "lease expired; queued again"
            );
            tx.execute(
                "UPDATE jobs SET state = 'queued', reason = ?2, lease_until_ms = NULL,
                        updated_ms = ?3
                 WHERE id = ?1",
                params![id, reason, now_ms],
            )
            .map_err(sql_err(path, op))?;
        }
        expired.push(Expired {
            id: id.unsigned_abs(),
            worker,
            attempts,
            quarantined,
        });
    }
    Ok(expired)
}

/// Default largest batch of calls [`SharedStore`] commits together.
pub const DEFAULT_MAX_BATCH: usize = 1024;

/// What a call's result does once its batch has committed (`None`) or failed to.
type Finish = Box<dyn FnOnce(Option<&CommitFailure>) + Send>;
/// A call queued for the writer.
type Op = Box<dyn FnOnce(&mut Store) -> Finish + Send>;

/// A batch's commit failed: every call in it is answered with this.
#[derive(Debug, Clone)]
struct CommitFailure {
    path: PathBuf,
    message: String,
}

/// A [`Store`] shared by the daemon's tasks, with **group commit**: one writer thread owns the
/// store and runs the calls in the order they come. Calls that arrive while it is busy are
/// run together as one batch, in one transaction (each call in a savepoint of its own, so a
/// refused call changes nothing), committed with one `fsync`; each call's result is handed
/// back only once its batch is on disk. So concurrent requests share a commit instead of
/// queueing for one each, and the async tasks never wait on SQLite or `fsync`.
///
/// A failed commit fails every call of its batch, with the reason. A batch that SQLite rolled
/// back on its own (disk full, I/O error) mid-way fails the calls run so far; the rest are run
/// one by one.
#[derive(Debug, Clone)]
pub struct SharedStore {
    ops: std::sync::mpsc::Sender<Op>,
    pending: Arc<AtomicUsize>,
    commits: Arc<std::sync::atomic::AtomicU64>,
    /// The commit count, published after every batch: lets tasks wait for "something was
    /// written" instead of polling.
    committed: tokio::sync::watch::Receiver<u64>,
    trouble: Arc<std::sync::Mutex<Option<String>>>,
}

/// Counts a call from its start until its result is handed back (or it is dropped unrun).
struct PendingGuard(Arc<AtomicUsize>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl SharedStore {
    /// Shares `store`, committing batches of up to [`DEFAULT_MAX_BATCH`] calls.
    pub fn new(store: Store) -> Self {
        Self::with_max_batch(store, DEFAULT_MAX_BATCH)
    }

    /// Shares `store`, committing batches of up to `max_batch` calls (at least 1; 1 commits
    /// every call on its own).
    pub fn with_max_batch(store: Store, max_batch: usize) -> Self {
        let (ops, queue) = std::sync::mpsc::channel::<Op>();
        let max_batch = max_batch.max(1);
        let commits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = commits.clone();
        let (published, committed) = tokio::sync::watch::channel(0);
        // A thread rather than a blocking-pool task: it lives as long as the store, and a
        // runtime shutting down does not wait for it.
        let spawned = std::thread::Builder::new()
            .name("wk-store".into())
            .spawn(move || writer(store, &queue, max_batch, &counter, &published));
        if let Err(e) = spawned {
            // Every call then fails with StoreError::Lost.
            tracing::error!(error = %e, "cannot start the store's writer thread");
        }
        SharedStore {
            ops,
            pending: Arc::new(AtomicUsize::new(0)),
            commits,
            committed,
            trouble: Arc::default(),
        }
    }

    /// A receiver that changes after every batch the writer ran (its value: [`Self::commits`]
    /// then), failed ones included.
    pub fn subscribe_commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Runs `f` on the store on the writer thread and waits until its batch is committed.
    /// `op` names the call in errors.
    pub async fn call<T, F>(&self, op: impl Into<String>, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let op = op.into();
        self.pending.fetch_add(1, Ordering::AcqRel);
        let guard = PendingGuard(self.pending.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Op = Box::new(move |store: &mut Store| {
            let result = f(store);
            Box::new(move |failed: Option<&CommitFailure>| {
                let result = match (result, failed) {
                    (Ok(_), Some(f)) => Err(StoreError::Commit {
                        path: f.path.clone(),
                        message: f.message.clone(),
                    }),
                    (result, _) => result,
                };
                drop(guard);
                let _ = tx.send(result);
            })
        });
        let result = if self.ops.send(job).is_err() {
            Err(StoreError::Lost { op })
        } else {
            rx.await.unwrap_or_else(|_| Err(StoreError::Lost { op }))
        };
        let mut trouble = self
            .trouble
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &result {
            Err(e) if !e.is_refusal() => *trouble = Some(crate::error_chain(e)),
            Ok(_) if trouble.is_some() => *trouble = None,
            _ => {}
        }
        result
    }

    /// The failure of the last call, if it failed (not a refusal): cleared by the next call
    /// that succeeds. For `STATUS=`.
    pub fn trouble(&self) -> Option<String> {
        self.trouble
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Calls started and not yet answered, the running ones included: for diagnostics and
    /// tests.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Batches run so far (a call run on its own counts as one): for diagnostics, tests and
    /// benchmarks.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Acquire)
    }
}

/// The writer thread: runs batches until every [`SharedStore`] is dropped.
fn writer(
    mut store: Store,
    queue: &std::sync::mpsc::Receiver<Op>,
    max_batch: usize,
    commits: &std::sync::atomic::AtomicU64,
    published: &tokio::sync::watch::Sender<u64>,
) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        run_batch(&mut store, batch, commits);
        published.send_replace(commits.load(Ordering::Acquire));
    }
}

/// Runs one call on its own, catching a panic (its result is then dropped: the caller gets
/// [`StoreError::Lost`]).
fn run_alone(store: &mut Store, op: Op, commits: &std::sync::atomic::AtomicU64) {
    store.in_batch = false;
    let finish = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| op(store)));
    commits.fetch_add(1, Ordering::AcqRel);
    if let Ok(finish) = finish {
        finish(None);
    }
}

fn run_batch(store: &mut Store, batch: Vec<Op>, commits: &std::sync::atomic::AtomicU64) {
    if batch.len() == 1 {
        for op in batch {
            run_alone(store, op, commits);
        }
        return;
    }
    if let Err(e) = store.conn.execute_batch("BEGIN IMMEDIATE") {
        tracing::debug!(error = %e, "cannot begin a batch; running its calls one by one");
        for op in batch {
            run_alone(store, op, commits);
        }
        return;
    }
    store.in_batch = true;
    let mut finishes = Vec::with_capacity(batch.len());
    let mut ops = batch.into_iter();
    let mut rolled_back = false;
    for op in ops.by_ref() {
        // A call that panicked rolled its savepoint back as it unwound; its caller gets Lost.
        if let Ok(finish) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| op(store))) {
            finishes.push(finish);
        }
        if store.conn.is_autocommit() {
            // SQLite rolled the whole transaction back (disk full, I/O error).
            rolled_back = true;
            break;
        }
    }
    store.in_batch = false;
    let failure = if rolled_back {
        Some("the batch's transaction was rolled back by SQLite".to_owned())
    } else {
        match store.conn.execute_batch("COMMIT") {
            Ok(()) => None,
            Err(e) => {
                let _ = store.conn.execute_batch("ROLLBACK");
                Some(format!("commit failed: {}", crate::error_chain(&e)))
            }
        }
    };
    let failure = failure.map(|message| CommitFailure {
        path: store.path.clone(),
        message,
    });
    commits.fetch_add(1, Ordering::AcqRel);
    for finish in finishes {
        finish(failure.as_ref());
    }
    for op in ops {
        run_alone(store, op, commits);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const T0: i64 = 1_700_000_000_000;
    const POLICY: Policy = Policy {
        lease_secs: 60,
        max_attempts: 3,
    };

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_in(&dir.path().join("state")).unwrap();
        (dir, store)
    }

    fn stats(q: u64, c: u64, done: u64, failed: u64, denied: u64, quar: u64) -> Stats {
        Stats {
            queued: q,
            claimed: c,
            completed: done,
            failed,
            denied,
            quarantined: quar,
        }
    }

    #[test]
    fn opens_in_wal_with_full_sync_and_a_versioned_schema() {
        let (dir, store) = open();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        let mode: String = store
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = store
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "synchronous=FULL");
        let busy: i64 = store
            .conn
            .query_row("PRAGMA busy_timeout", [], |r| r.get(0))
            .unwrap();
        assert_eq!(busy, 5000);
        use std::os::unix::fs::PermissionsExt as _;
        let state = dir.path().join("state");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join(FILE_NAME)), 0o600);
    }

    #[test]
    fn a_newer_schema_in_wal_mode_is_refused_without_a_byte_changing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        // A newer daemon's file: rollback journal (as a version we do not know may use),
        // user_version above ours.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE future (x); INSERT INTO future VALUES (1);")
            .unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        let before = std::fs::read(&path).unwrap();
        let e = Store::open(&path).unwrap_err();
        assert!(matches!(e, StoreError::UnknownSchema { .. }), "{e}");
        assert!(std::fs::read(&path).unwrap() == before, "the file changed");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE_NAME], "files appeared next to it");
        // Not a database at all: untouched too.
        std::fs::write(&path, b"precious notes").unwrap();
        let e = Store::open(&path).unwrap_err();
        assert!(matches!(e, StoreError::NotADatabase { .. }), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious notes");
    }

    #[test]
    fn an_unknown_schema_version_is_refused_untouched() {
        let (dir, store) = open();
        store
            .conn
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(store);
        let path = dir.path().join("state").join(FILE_NAME);
        let e = Store::open(&path).unwrap_err();
        assert!(
            matches!(e, StoreError::UnknownSchema { found, .. } if found == SCHEMA_VERSION + 1),
            "{e}"
        );
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn a_file_that_is_not_a_database_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, vec![b'x'; 4096]).unwrap();
        let e = Store::open(&path).unwrap_err();
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn claims_hand_out_the_oldest_job_first() {
        let (_d, mut s) = open();
        let a = s.submit(&json!({"n": 1}), T0).unwrap();
        let b = s.submit(&json!({"n": 2}), T0).unwrap();
        let c = s.submit(&json!({"n": 3}), T0).unwrap();
        assert!(a < b && b < c);
        let first = s.claim("w1", POLICY, T0).unwrap().unwrap();
        assert_eq!(first.id, a);
        assert_eq!(first.spec.get(), r#"{"n":1}"#);
        assert_eq!(first.attempt, 1);
        assert_eq!(first.lease_secs, 60);
        assert_eq!(s.claim("w2", POLICY, T0).unwrap().unwrap().id, b);
        assert_eq!(s.claim("w3", POLICY, T0).unwrap().unwrap().id, c);
        assert_eq!(s.claim("w4", POLICY, T0).unwrap(), None);
        let rec = s.job(a).unwrap().unwrap();
        assert_eq!(rec.state, JobState::Claimed);
        assert_eq!(rec.worker.as_deref(), Some("w1"));
        assert_eq!(rec.lease_until_ms, Some(T0 + 60_000));
        assert_eq!(s.stats().unwrap(), stats(0, 3, 0, 0, 0, 0));
    }

    #[test]
    fn an_expired_lease_queues_the_job_again() {
        let (_d, mut s) = open();
        let id = s.submit(&json!("x"), T0).unwrap();
        s.claim("w1", POLICY, T0).unwrap().unwrap();
        // One millisecond before the end: still held, nothing swept.
        assert!(s.sweep(3, T0 + 59_999).unwrap().is_empty());
        assert_eq!(s.claim("w2", POLICY, T0 + 59_999).unwrap(), None);
        // At the end, the next claim sweeps first and gets it back.
        let again = s.claim("w2", POLICY, T0 + 60_000).unwrap().unwrap();
        assert_eq!((again.id, again.attempt), (id, 2));
        // The first worker's late report is refused.
        let e = s.complete(id, "w1", Some(0), T0 + 60_001).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("job {id} is not claimed by w1: it is claimed by w2")
        );
    }

    #[test]
    fn a_report_after_the_lease_ran_out_is_refused_even_before_a_sweep() {
        let (_d, mut s) = open();
        let id = s.submit(&json!("x"), T0).unwrap();
        s.claim("w1", POLICY, T0).unwrap().unwrap();
        let e = s.renew(id, "w1", 60, T0 + 60_000).unwrap_err();
        assert!(e.to_string().ends_with("its lease expired"), "{e}");
        assert!(e.is_refusal());
        assert_eq!(s.job(id).unwrap().unwrap().state, JobState::Claimed);
    }

    /// The counts by a full scan, to check the maintained ones against.
    fn scanned(s: &Store) -> Stats {
        let mut stats = Stats::default();
        let mut st = s
            .conn
            .prepare("SELECT state, COUNT(*) FROM jobs GROUP BY state")
            .unwrap();
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .unwrap();
        for row in rows {
            let (state, n) = row.unwrap();
            let n = n.unsigned_abs();
            match state.as_str() {
                "queued" => stats.queued = n,
                "claimed" => stats.claimed = n,
                "completed" => stats.completed = n,
                "failed" => stats.failed = n,
                "denied" => stats.denied = n,
                _ => stats.quarantined = n,
            }
        }
        stats
    }

    #[test]
    fn maintained_counts_match_a_scan_through_every_change_and_retention_prunes_in_steps() {
        let (_d, mut s) = open();
        for n in 0..20 {
            s.submit(&json!(n), T0).unwrap();
        }
        for n in 0..10 {
            let job = s.claim("w", POLICY, T0 + n).unwrap().unwrap();
            match n % 4 {
                0 => s.complete(job.id, "w", Some(0), T0 + n).unwrap(),
                1 => s.complete(job.id, "w", Some(1), T0 + n).unwrap(),
                2 => s.deny(job.id, "w", "no", T0 + n).unwrap(),
                _ => s.release(job.id, "w", T0 + n).unwrap(),
            }
        }
        s.claim("x", POLICY, T0 + 20).unwrap().unwrap();
        assert_eq!(s.stats().unwrap(), scanned(&s));
        let finished = 3 + 3 + 2; // n = 0..10: 0,4,8 / 1,5,9 / 2,6
        let before = s.stats().unwrap();
        assert_eq!(before.completed + before.failed + before.denied, finished);
        // By count: keep 5 finished, 2 per step.
        assert_eq!(s.prune(0, 5, 2, T0 + 100).unwrap(), 2);
        assert_eq!(s.prune(0, 5, 2, T0 + 100).unwrap(), 1);
        assert_eq!(s.prune(0, 5, 2, T0 + 100).unwrap(), 0);
        let after = s.stats().unwrap();
        assert_eq!(after.completed + after.failed + after.denied, 5);
        assert_eq!(after, scanned(&s));
        // The oldest went first: job 1 (finished at T0) is gone.
        assert!(s.job(1).unwrap().is_none());
        // By age: everything finished more than 1 s before T0 + 2_000 + 10 ms.
        assert_eq!(s.prune(1, 0, 100, T0 + 1_010).unwrap(), 5);
        assert_eq!(s.stats().unwrap(), scanned(&s));
        assert_eq!(
            s.stats().unwrap().queued + s.stats().unwrap().claimed,
            20 - finished
        );
        // Queued and claimed jobs are never pruned; ids are not reused.
        let id = s.submit(&json!("new"), T0).unwrap();
        assert_eq!(id, 21);
    }

    #[test]
    fn a_version_2_store_gets_its_counts_seeded() {
        let (dir, mut s) = open();
        s.submit(&json!(1), T0).unwrap();
        s.submit(&json!(2), T0).unwrap();
        s.conn
            .execute_batch(
                "DROP TRIGGER jobs_count_insert; DROP TRIGGER jobs_count_update;
                 DROP TRIGGER jobs_count_delete; DROP INDEX jobs_finished; DROP TABLE job_counts;
                 PRAGMA user_version = 2;",
            )
            .unwrap();
        drop(s);
        let mut s = Store::open(&dir.path().join("state").join(FILE_NAME)).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(s.stats().unwrap().queued, 2);
        s.submit(&json!(3), T0).unwrap();
        assert_eq!(s.stats().unwrap(), scanned(&s));
    }

    #[test]
    fn complete_and_claim_is_one_transaction() {
        let (_d, mut s) = open();
        let a = s.submit(&serde_json::json!("a"), T0).unwrap();
        let b = s.submit(&serde_json::json!("b"), T0).unwrap();
        assert_eq!(s.claim("w", POLICY, T0).unwrap().unwrap().id, a);
        let next = s
            .complete_and_claim(a, "w", Some(0), POLICY, T0 + 1)
            .unwrap();
        assert_eq!(next.map(|j| j.id), Some(b));
        // Refused: not the holder. Nothing changes, nothing is claimed.
        let e = s
            .complete_and_claim(b, "other", Some(0), POLICY, T0 + 2)
            .unwrap_err();
        assert!(e.is_refusal(), "{e}");
        assert_eq!(s.stats().unwrap(), stats(0, 1, 1, 0, 0, 0));
        assert_eq!(s.job(b).unwrap().unwrap().worker.as_deref(), Some("w"));
        assert_eq!(
            s.complete_and_claim(b, "w", None, POLICY, T0 + 3).unwrap(),
            None
        );
        assert_eq!(s.stats().unwrap(), stats(0, 0, 1, 1, 0, 0));
    }

    #[test]
    fn renew_extends_the_lease() {
        let (_d, mut s) = open();
        let id = s.submit(&json!("x"), T0).unwrap();
        s.claim("w1", POLICY, T0).unwrap().unwrap();
        s.renew(id, "w1", 60, T0 + 50_000).unwrap();
        assert_eq!(
            s.job(id).unwrap().unwrap().lease_until_ms,
            Some(T0 + 110_000)
        );
        assert!(s.sweep(3, T0 + 100_000).unwrap().is_empty());
        s.complete(id, "w1", Some(0), T0 + 100_000).unwrap();
        assert_eq!(s.stats().unwrap(), stats(0, 0, 1, 0, 0, 0));
    }

    #[test]
    fn a_job_whose_lease_expires_max_attempts_times_is_quarantined_as_poison() {
        let (_d, mut s) = open();
        let id = s.submit(&json!("poison"), T0).unwrap();
        let mut now = T0;
        for attempt in 1..=3 {
            let job = s.claim("w", POLICY, now).unwrap().unwrap();
            assert_eq!((job.id, job.attempt), (id, attempt));
            now += 60_000;
            let expired = s.sweep(3, now).unwrap();
            assert_eq!(
                expired,
                vec![Expired {
                    id,
                    worker: Some("w".into()),
                    attempts: attempt,
                    quarantined: attempt == 3,
                }]
            );
        }
        let rec = s.job(id).unwrap().unwrap();
        assert_eq!(rec.state, JobState::Quarantined);
        assert_eq!(
            rec.reason.as_deref(),
            Some("lease expired 3 times: poison job")
        );
        assert_eq!(s.claim("w", POLICY, now).unwrap(), None);
        assert_eq!(s.stats().unwrap(), stats(0, 0, 0, 0, 0, 1));
    }

    #[test]
    fn release_gives_the_job_back_without_counting_an_attempt() {
        let (_d, mut s) = open();
        let id = s.submit(&json!("x"), T0).unwrap();
        for _ in 0..5 {
            let job = s.claim("w", POLICY, T0).unwrap().unwrap();
            assert_eq!(job.attempt, 1);
            s.release(id, "w", T0).unwrap();
        }
        let rec = s.job(id).unwrap().unwrap();
        assert_eq!((rec.state, rec.attempts), (JobState::Queued, 0));
        assert_eq!(rec.reason.as_deref(), Some("released by w"));
        // Released five times, and still not poison.
        let policy = Policy {
            max_attempts: 1,
            ..POLICY
        };
        assert_eq!(s.claim("w", policy, T0).unwrap().unwrap().attempt, 1);
    }

    #[test]
    fn reports_from_another_worker_or_on_other_jobs_are_refused_and_change_nothing() {
        let (_d, mut s) = open();
        let id = s.submit(&json!("x"), T0).unwrap();
        let queued = s.submit(&json!("y"), T0).unwrap();
        s.claim("w1", POLICY, T0).unwrap().unwrap();
        let before = s.job(id).unwrap();
        let not_w2 = format!("job {id} is not claimed by w2: it is claimed by w1");
        let refusals = [
            s.renew(id, "w2", 60, T0).unwrap_err(),
            s.complete(id, "w2", Some(0), T0).unwrap_err(),
            s.deny(id, "w2", "no", T0).unwrap_err(),
            s.quarantine(id, "w2", "no", T0).unwrap_err(),
            s.release(id, "w2", T0).unwrap_err(),
        ];
        for e in refusals {
            assert_eq!(e.to_string(), not_w2);
        }
        assert_eq!(s.job(id).unwrap(), before);
        let e = s.complete(queued, "w1", Some(0), T0).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("job {queued} is not claimed by w1: it is queued")
        );
        let e = s.complete(999, "w1", Some(0), T0).unwrap_err();
        assert_eq!(e.to_string(), "no job 999");
        let e = s.complete(u64::MAX, "w1", Some(0), T0).unwrap_err();
        assert!(matches!(e, StoreError::NoSuchJob { .. }), "{e}");
        // Finished jobs cannot be reported twice.
        s.complete(id, "w1", Some(0), T0).unwrap();
        let e = s.complete(id, "w1", Some(0), T0).unwrap_err();
        assert!(e.to_string().ends_with("it is completed"), "{e}");
    }

    #[test]
    fn outcomes_record_state_reason_and_exit_code_and_stats_count_them() {
        let (_d, mut s) = open();
        let ids: Vec<u64> = (0..6)
            .map(|i| s.submit(&json!({ "i": i }), T0).unwrap())
            .collect();
        for _ in &ids {
            s.claim("w", POLICY, T0).unwrap().unwrap();
            // One job at a time per worker: hand the rest to others, keeping the ids in order.
            s.conn
                .execute(
                    "UPDATE jobs SET worker = 'parked' WHERE state = 'claimed' AND worker = 'w'",
                    [],
                )
                .unwrap();
        }
        s.conn
            .execute("UPDATE jobs SET worker = 'w' WHERE worker = 'parked'", [])
            .unwrap();
        s.complete(ids[0], "w", Some(0), T0).unwrap();
        s.complete(ids[1], "w", Some(3), T0).unwrap();
        s.complete(ids[2], "w", None, T0).unwrap();
        s.deny(ids[3], "w", "not on the allowlist", T0).unwrap();
        s.quarantine(ids[4], "w", "empty command", T0).unwrap();
        let rec = |id| s.job(id).unwrap().unwrap();
        let r = rec(ids[0]);
        assert_eq!(
            (r.state, r.exit_code, r.reason),
            (JobState::Completed, Some(0), None)
        );
        let r = rec(ids[1]);
        assert_eq!((r.state, r.exit_code), (JobState::Failed, Some(3)));
        let r = rec(ids[2]);
        assert_eq!((r.state, r.exit_code), (JobState::Failed, None));
        assert_eq!(
            r.reason.as_deref(),
            Some("no exit code (killed or timed out)")
        );
        let r = rec(ids[3]);
        assert_eq!(r.state, JobState::Denied);
        assert_eq!(r.reason.as_deref(), Some("not on the allowlist"));
        let r = rec(ids[4]);
        assert_eq!(r.state, JobState::Quarantined);
        assert_eq!(r.reason.as_deref(), Some("empty command"));
        assert_eq!(r.lease_until_ms, None);
        s.submit(&json!("new"), T0).unwrap();
        assert_eq!(s.stats().unwrap(), stats(1, 1, 1, 2, 1, 1));
    }

    #[test]
    fn reopening_keeps_every_job_and_claim() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut s = Store::open_in(&state).unwrap();
        let a = s.submit(&json!({"keep": "me"}), T0).unwrap();
        let b = s.submit(&json!(2), T0).unwrap();
        s.claim("w", POLICY, T0).unwrap().unwrap();
        drop(s);
        let mut s = Store::open_in(&state).unwrap();
        assert_eq!(s.stats().unwrap(), stats(1, 1, 0, 0, 0, 0));
        assert_eq!(s.job(a).unwrap().unwrap().spec, r#"{"keep":"me"}"#);
        s.complete(a, "w", Some(0), T0 + 1).unwrap();
        assert_eq!(s.claim("w", POLICY, T0).unwrap().unwrap().id, b);
        let c = s.submit(&json!(3), T0).unwrap();
        assert!(c > b, "ids are not reused");
    }

    #[test]
    fn oversized_specs_and_bad_worker_names_are_refused() {
        let (_d, mut s) = open();
        let max = max_spec_len();
        // A JSON string of max bytes: the quotes count.
        let fits = json!("a".repeat(max - 2));
        let id = s.submit(&fits, T0).unwrap();
        let e = s.submit(&json!("a".repeat(max - 1)), T0).unwrap_err();
        assert!(matches!(e, StoreError::SpecTooLarge { .. }), "{e}");
        // The largest spec still comes back in a line within MAX_LINE.
        let job = s.claim("w", POLICY, T0).unwrap().unwrap();
        assert_eq!(job.id, id);
        let line = serde_json::to_string(&Response::Job {
            job: Some(job.to_claimed_job()),
        })
        .unwrap();
        assert!(line.len() <= MAX_LINE, "{}", line.len());

        for bad in [String::new(), "w".repeat(MAX_WORKER_NAME + 1)] {
            let e = s.claim(&bad, POLICY, T0).unwrap_err();
            assert!(matches!(e, StoreError::InvalidWorker { .. }), "{e}");
        }
        assert!(s.claim(&"w".repeat(MAX_WORKER_NAME), POLICY, T0).is_ok());
    }

    #[test]
    fn a_corrupt_stored_spec_is_quarantined_instead_of_blocking_the_queue() {
        let (_d, mut s) = open();
        let bad = s.submit(&json!("x"), T0).unwrap();
        let good = s.submit(&json!("y"), T0).unwrap();
        s.conn
            .execute("UPDATE jobs SET spec = '{nope' WHERE id = ?1", [bad as i64])
            .unwrap();
        assert_eq!(s.claim("w", POLICY, T0).unwrap().unwrap().id, good);
        assert_eq!(s.job(bad).unwrap().unwrap().state, JobState::Quarantined);
    }

    #[test]
    fn a_claim_by_the_holder_hands_its_job_out_again_without_counting_an_attempt() {
        let (_d, mut s) = open();
        let id = s.submit(&json!("x"), T0).unwrap();
        let other = s.submit(&json!("y"), T0).unwrap();
        let first = s.claim("w", POLICY, T0).unwrap().unwrap();
        assert_eq!((first.id, first.attempt), (id, 1));
        // The answer was lost; the worker claims again: the same job, same attempt, new lease.
        for k in 1..=3 {
            let now = T0 + k * 50_000;
            let again = s.claim("w", POLICY, now).unwrap().unwrap();
            assert_eq!(
                (again.id, again.attempt, again.spec.get()),
                (id, 1, r#""x""#)
            );
            assert_eq!(again.lease_secs, 60);
            let rec = s.job(id).unwrap().unwrap();
            assert_eq!((rec.attempts, rec.lease_until_ms), (1, Some(now + 60_000)));
        }
        // Another worker gets the next job; the holder can report.
        assert_eq!(s.claim("v", POLICY, T0).unwrap().unwrap().id, other);
        s.complete(other, "v", Some(0), T0 + 1).unwrap();
        s.complete(id, "w", Some(0), T0 + 150_001).unwrap();
        // An expired claim is not handed back: it is swept and counted as before.
        let third = s.submit(&json!("z"), T0).unwrap();
        s.claim("u", POLICY, T0).unwrap().unwrap();
        let swept = s.claim("u", POLICY, T0 + 60_000).unwrap().unwrap();
        assert_eq!((swept.id, swept.attempt), (third, 2));
    }

    #[test]
    fn renew_never_shortens_the_lease_the_job_was_claimed_with() {
        let (_d, mut s) = open();
        let id = s.submit(&json!("x"), T0).unwrap();
        let long = Policy {
            lease_secs: 300,
            max_attempts: 3,
        };
        assert_eq!(s.claim("w", long, T0).unwrap().unwrap().lease_secs, 300);
        // A reload shortened the lease to 30 s; the worker still renews every 100 s.
        s.renew(id, "w", 30, T0 + 100_000).unwrap();
        let until = s.job(id).unwrap().unwrap().lease_until_ms.unwrap();
        assert!(until >= T0 + 100_000 + 300_000, "{until}");
        // A longer configured lease still wins.
        s.renew(id, "w", 600, T0 + 200_000).unwrap();
        let until = s.job(id).unwrap().unwrap().lease_until_ms.unwrap();
        assert_eq!(until, T0 + 200_000 + 600_000);
    }

    #[test]
    fn ids_are_never_reused_even_after_the_highest_row_is_deleted() {
        let (_d, mut s) = open();
        let a = s.submit(&json!(1), T0).unwrap();
        let b = s.submit(&json!(2), T0).unwrap();
        s.conn
            .execute("DELETE FROM jobs WHERE id = ?1", [b as i64])
            .unwrap();
        let c = s.submit(&json!(3), T0).unwrap();
        assert!(c > b && b > a, "{a} {b} {c}");
    }

    /// The version 1 schema, as earlier daemons created it.
    const SCHEMA_V1: &str = "
        CREATE TABLE jobs (
            id             INTEGER PRIMARY KEY,
            spec           TEXT    NOT NULL,
            state          TEXT    NOT NULL CHECK (state IN
                ('queued', 'claimed', 'completed', 'failed', 'denied', 'quarantined')),
            attempts       INTEGER NOT NULL DEFAULT 0,
            worker         TEXT,
            lease_until_ms INTEGER,
            created_ms     INTEGER NOT NULL,
            updated_ms     INTEGER NOT NULL,
            reason         TEXT,
            exit_code      INTEGER
        );
        CREATE INDEX jobs_by_state ON jobs (state, id);
        CREATE INDEX jobs_by_lease ON jobs (lease_until_ms) WHERE state = 'claimed';
        PRAGMA user_version = 1;
    ";

    #[test]
    fn a_version_1_store_is_migrated_keeping_its_rows_and_highest_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            conn.execute_batch(&format!(
                "INSERT INTO jobs (id, spec, state, attempts, created_ms, updated_ms)
                     VALUES (1, '\"a\"', 'completed', 1, {T0}, {T0});
                 INSERT INTO jobs (id, spec, state, attempts, worker, lease_until_ms,
                                   created_ms, updated_ms)
                     VALUES (7, '\"b\"', 'claimed', 1, 'w', {}, {T0}, {T0});
                 INSERT INTO jobs (id, spec, state, attempts, created_ms, updated_ms)
                     VALUES (9, '\"c\"', 'queued', 0, {T0}, {T0});",
                T0 + 60_000
            ))
            .unwrap();
        }
        let mut s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(s.stats().unwrap(), stats(1, 1, 1, 0, 0, 0));
        let held = s.job(7).unwrap().unwrap();
        assert_eq!(
            (held.worker.as_deref(), held.lease_until_ms),
            (Some("w"), Some(T0 + 60_000))
        );
        // A claim from version 1 (no recorded lease) renews with the configured one.
        s.renew(7, "w", 60, T0 + 1).unwrap();
        assert_eq!(s.job(7).unwrap().unwrap().lease_until_ms, Some(T0 + 60_001));
        // The highest id is kept, and not reused after its row is deleted.
        s.conn.execute("DELETE FROM jobs WHERE id = 9", []).unwrap();
        assert_eq!(s.submit(&json!("d"), T0).unwrap(), 10);
        let indexes: i64 = s
            .conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = 'jobs'
                 AND name IN ('jobs_by_state', 'jobs_by_lease')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexes, 2);
        drop(s);
        // Reopening a migrated file changes nothing.
        let s = Store::open(&path).unwrap();
        assert_eq!(s.stats().unwrap(), stats(1, 1, 1, 0, 0, 0));
        assert_eq!(s.job(10).unwrap().unwrap().spec, r#""d""#);
    }

    #[test]
    fn specs_come_back_byte_for_byte() {
        let (_d, mut s) = open();
        let text =
            r#"{"command": ["echo"], "n":18446744073709551616123, "f":1.10, "b":{"z":1,"a":2}}"#;
        let id = s.submit_raw(text, T0).unwrap();
        assert_eq!(s.claim("w", POLICY, T0).unwrap().unwrap().spec.get(), text);
        assert_eq!(s.job(id).unwrap().unwrap().spec, text);
        let e = s.submit_raw("{nope", T0).unwrap_err();
        assert!(
            e.is_refusal() && e.to_string().starts_with("job spec is not JSON"),
            "{e}"
        );
    }

    /// A call that holds the store until the returned sender sends; returns once it holds it.
    fn hold(
        shared: &SharedStore,
    ) -> (
        std::sync::mpsc::Sender<()>,
        tokio::task::JoinHandle<Result<(), StoreError>>,
    ) {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let blocker = {
            let shared = shared.clone();
            tokio::spawn(async move {
                shared
                    .call("block", move |_| {
                        let _ = started_tx.send(());
                        let _ = wait.recv();
                        Ok(())
                    })
                    .await
            })
        };
        started
            .recv_timeout(Duration::from_secs(10))
            .expect("the blocking call never started");
        (release, blocker)
    }

    /// Waits (10 s at most) until `n` calls are pending.
    async fn wait_pending(shared: &SharedStore, n: usize, what: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while shared.pending() < n {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_commit_together_and_a_refused_one_changes_nothing() {
        let (_d, s) = open();
        let shared = SharedStore::new(s);
        let (release, blocker) = hold(&shared);
        let commits_before = shared.commits();
        // 50 submits and a refused report queue up behind the blocker: one batch.
        let mut calls = Vec::new();
        for n in 0..50 {
            let shared = shared.clone();
            calls.push(tokio::spawn(async move {
                shared
                    .call("submit", move |s| s.submit(&json!(n), T0))
                    .await
            }));
        }
        let refused = {
            let shared = shared.clone();
            tokio::spawn(async move {
                shared
                    .call("complete", |s| s.complete(4242, "w", Some(0), T0))
                    .await
            })
        };
        wait_pending(&shared, 52, "calls never queued").await;
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        let mut ids = Vec::new();
        for call in calls {
            ids.push(call.await.unwrap().unwrap());
        }
        assert!(matches!(
            refused.await.unwrap(),
            Err(StoreError::NoSuchJob { id: 4242 })
        ));
        assert_eq!(
            shared.commits() - commits_before,
            2,
            "the blocker, then one batch"
        );
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 50);
        let stats = shared.call("stats", |s| s.stats()).await.unwrap();
        assert_eq!(stats.queued, 50);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_max_batch_1_every_call_commits_alone() {
        let (_d, s) = open();
        let shared = SharedStore::with_max_batch(s, 1);
        let before = shared.commits();
        let calls: Vec<_> = (0..10)
            .map(|n| {
                let shared = shared.clone();
                tokio::spawn(async move {
                    shared
                        .call("submit", move |s| s.submit(&json!(n), T0))
                        .await
                })
            })
            .collect();
        for call in calls {
            call.await.unwrap().unwrap();
        }
        assert_eq!(shared.commits() - before, 10);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shared_store_runs_calls_one_at_a_time_and_counts_them() {
        let (_d, s) = open();
        let shared = SharedStore::new(s);
        // The blocker holds the store before the submit is issued.
        let (release, blocker) = hold(&shared);
        let submit = {
            let shared = shared.clone();
            tokio::spawn(async move { shared.call("submit", |s| s.submit(&json!("x"), T0)).await })
        };
        wait_pending(&shared, 2, "calls never started").await;
        assert!(!submit.is_finished());
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        let id = submit.await.unwrap().unwrap();
        assert_eq!(shared.pending(), 0);
        let rec = shared.call("read", move |s| s.job(id)).await.unwrap();
        assert_eq!(rec.unwrap().state, JobState::Queued);
    }
}
