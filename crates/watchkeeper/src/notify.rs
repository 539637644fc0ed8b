//! `sd_notify(3)` messages and the datagram transport that carries them.
//!
//! [`Notification`] is the protocol: its `Display` *is* the wire format, one `KEY=VALUE` line
//! per assignment. [`Notifier`] is the transport: one `SOCK_DGRAM | SOCK_CLOEXEC` socket per
//! process, connected once to `$NOTIFY_SOCKET` (a `/path` or an `@abstract` name), kept for the
//! life of the process and reconnected if the manager re-creates its socket.
//!
//! # Why not the `sd-notify` crate
//!
//! The transport follows `sd-daemon.c` rather than the `sd-notify` crate, which opens a socket
//! per call, cannot reach `@abstract` addresses and blocks when the manager's queue is full. Here
//! the socket is non-blocking: a full queue (`net.unix.max_dgram_qlen`, 10 by default) is reported
//! at once as [`NotifyError::QueueFull`] and never stalls a runtime thread; callers retry (the
//! watchdog keeper coalesces a pending ping rather than stacking them).
//!
//! # Caveats
//!
//! * `vsock:CID:PORT` addresses (systemd 253+, VM guests) are parsed but not supported:
//!   [`Notifier::from_env`] reports [`NotifyError::Unsupported`].
//! * Credentials (`SCM_CREDENTIALS`) are attached by the kernel; this crate never sends on
//!   behalf of another pid, so it never attaches them explicitly (as `sd-daemon.c` does only
//!   when the pid or ids differ).

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

use crate::env::{EnvError, NotifyAddr, SystemdEnv};

/// Longest file descriptor name systemd accepts (`FDNAME_MAX`).
const FDNAME_MAX: usize = 255;

/// The largest datagram the manager reads: systemd ignores whole any message of
/// `NOTIFY_BUFFER_MAX` (`PIPE_BUF`, 4096) bytes or more.
pub const DATAGRAM_MAX: usize = 4095;

/// The longest single value accepted, so that a few of them still fit one datagram.
const LINE_MAX: usize = 2048;

/// The send buffer `sd-daemon.c` asks for (`fd_inc_sndbuf(fd, 8 MiB)`).
const SNDBUF: usize = 8 * 1024 * 1024;

/// A value that cannot be put into a notification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} {value:?}: {reason}")]
pub struct InvalidMessage {
    /// The assignment the value was meant for, e.g. `STATUS`.
    pub field: &'static str,
    /// The value (lossy, for the message).
    pub value: String,
    /// Why it cannot be sent.
    pub reason: &'static str,
}

/// A single-line value: no newline or carriage return (the manager splits datagrams at both,
/// so either would start a new assignment) and no NUL (the manager would cut the datagram
/// there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line(String);

impl Line {
    /// Checks `value` for use as the value of assignment `field`.
    pub fn new(field: &'static str, value: impl Into<String>) -> Result<Self, InvalidMessage> {
        let value = value.into();
        if value.contains(['\n', '\r', '\0']) {
            return Err(InvalidMessage {
                field,
                value,
                reason: "must be a single line (no \\n or \\r) without NUL",
            });
        }
        if value.len() > LINE_MAX {
            return Err(InvalidMessage {
                field,
                value: value.chars().take(64).collect::<String>() + "…",
                reason: "longer than 2048 bytes",
            });
        }
        Ok(Line(value))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A file descriptor name as `fdname_is_valid()` accepts it: 1–255 ASCII characters, no control
/// characters and no `:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdName(String);

impl FdName {
    /// Checks `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidMessage> {
        let name = name.into();
        let bad = |reason| InvalidMessage {
            field: "FDNAME",
            value: name.clone(),
            reason,
        };
        if name.is_empty() || name.len() > FDNAME_MAX {
            return Err(bad("must be 1 to 255 characters"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii() && !b.is_ascii_control() && b != b':')
        {
            return Err(bad("must be ASCII without control characters or ':'"));
        }
        Ok(FdName(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One `sd_notify(3)` message. `Display` writes its wire form.
///
/// ```
/// use watchkeeper::notify::Notification;
/// assert_eq!(Notification::Ready.to_string(), "READY=1");
/// assert_eq!(
///     Notification::Reloading { monotonic_usec: 42 }.to_string(),
///     "RELOADING=1\nMONOTONIC_USEC=42"
/// );
/// assert!(Notification::status("two\nlines").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notification {
    /// `READY=1`: start-up or a reload is finished.
    Ready,
    /// `RELOADING=1` with `MONOTONIC_USEC=`: a reload begins (`Type=notify-reload` needs the
    /// timestamp; older managers ignore it).
    Reloading {
        /// `CLOCK_MONOTONIC` in µs when the reload began; see [`monotonic_usec`].
        monotonic_usec: u64,
    },
    /// `STOPPING=1`: shutdown begins. Final: since systemd 259 it cannot be undone.
    Stopping,
    /// `STATUS=`: one line for `systemctl status`.
    Status(Line),
    /// `ERRNO=`: the failure as an errno number.
    Errno(u32),
    /// `BUSERROR=`: the failure as a D-Bus error name.
    BusError(Line),
    /// `MAINPID=`: the main process changed.
    MainPid(u32),
    /// `WATCHDOG=1`: the keep-alive ping.
    Watchdog,
    /// `WATCHDOG=trigger`: ask the manager to act as if the watchdog expired, now.
    WatchdogTrigger,
    /// `WATCHDOG_USEC=`: change the watchdog timeout at run time.
    WatchdogUsec(u64),
    /// `EXTEND_TIMEOUT_USEC=`: the manager must hear from us again within this many µs (a deadline
    /// from now, not an addition), during start-up, reload or stop.
    ExtendTimeoutUsec(u64),
    /// `FDSTORE=1` (with `FDNAME=` if named): store the fds sent along with this message.
    FdStore {
        /// Name for the stored fds; systemd calls unnamed ones `stored`.
        name: Option<FdName>,
    },
    /// `FDSTOREREMOVE=1` + `FDNAME=`: drop the stored fds of that name.
    FdStoreRemove {
        /// Which fds to remove.
        name: FdName,
    },
    /// `FDPOLL=0`: do not drop stored fds on `EPOLLHUP`/`EPOLLERR`.
    FdPollDisable,
    /// A private `X_…=` assignment (unknown keys are ignored by the manager).
    Custom {
        /// The key, `X_` followed by upper-case letters, digits or `_`.
        key: String,
        /// The value.
        value: Line,
    },
}

impl Notification {
    /// `STATUS=text`, refusing text with a newline.
    pub fn status(text: impl Into<String>) -> Result<Self, InvalidMessage> {
        Line::new("STATUS", text).map(Notification::Status)
    }

    /// `BUSERROR=name`.
    pub fn bus_error(name: impl Into<String>) -> Result<Self, InvalidMessage> {
        Line::new("BUSERROR", name).map(Notification::BusError)
    }

    /// `RELOADING=1` stamped with the current `CLOCK_MONOTONIC`.
    pub fn reloading_now() -> Self {
        Notification::Reloading {
            monotonic_usec: monotonic_usec(),
        }
    }

    /// `EXTEND_TIMEOUT_USEC=` from a [`Duration`].
    pub fn extend_timeout(by: Duration) -> Self {
        Notification::ExtendTimeoutUsec(usec(by))
    }

    /// `X_KEY=value` for private extensions.
    pub fn custom(
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Self, InvalidMessage> {
        let key = key.into();
        let valid = key.len() > 2
            && key.starts_with("X_")
            && key
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(InvalidMessage {
                field: "key",
                value: key,
                reason: "private keys are X_ followed by A-Z, 0-9 or _",
            });
        }
        Ok(Notification::Custom {
            key,
            value: Line::new("X_ value", value)?,
        })
    }

    /// The wire form of messages that carry no data, without allocating.
    fn static_wire(&self) -> Option<&'static str> {
        Some(match self {
            Notification::Ready => "READY=1",
            Notification::Stopping => "STOPPING=1",
            Notification::Watchdog => "WATCHDOG=1",
            Notification::WatchdogTrigger => "WATCHDOG=trigger",
            Notification::FdPollDisable => "FDPOLL=0",
            _ => return None,
        })
    }
}

impl fmt::Display for Notification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(s) = self.static_wire() {
            return f.write_str(s);
        }
        match self {
            Notification::Reloading { monotonic_usec } => {
                write!(f, "RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")
            }
            Notification::Status(s) => write!(f, "STATUS={}", s.0),
            Notification::Errno(e) => write!(f, "ERRNO={e}"),
            Notification::BusError(s) => write!(f, "BUSERROR={}", s.0),
            Notification::MainPid(p) => write!(f, "MAINPID={p}"),
            Notification::WatchdogUsec(u) => write!(f, "WATCHDOG_USEC={u}"),
            Notification::ExtendTimeoutUsec(u) => write!(f, "EXTEND_TIMEOUT_USEC={u}"),
            Notification::FdStore { name: None } => f.write_str("FDSTORE=1"),
            Notification::FdStore { name: Some(n) } => write!(f, "FDSTORE=1\nFDNAME={}", n.0),
            Notification::FdStoreRemove { name } => {
                write!(f, "FDSTOREREMOVE=1\nFDNAME={}", name.0)
            }
            Notification::Custom { key, value } => write!(f, "{key}={}", value.0),
            // Covered by static_wire above.
            Notification::Ready
            | Notification::Stopping
            | Notification::Watchdog
            | Notification::WatchdogTrigger
            | Notification::FdPollDisable => Ok(()),
        }
    }
}

/// Encodes messages as one datagram payload: assignments joined by `\n`.
pub fn encode(msgs: &[Notification]) -> Cow<'static, [u8]> {
    if let [one] = msgs
        && let Some(s) = one.static_wire()
    {
        return Cow::Borrowed(s.as_bytes());
    }
    let mut out = String::with_capacity(32 * msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        use fmt::Write as _;
        // Writing into a String cannot fail.
        let _ = write!(out, "{m}");
    }
    Cow::Owned(out.into_bytes())
}

/// `CLOCK_MONOTONIC` now, in µs, as `MONOTONIC_USEC=` wants it.
pub fn monotonic_usec() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(ts.tv_nsec as u64 / 1_000)
}

/// A [`Duration`] in whole µs, saturating at `u64::MAX - 1` (`u64::MAX` is systemd's infinity).
pub(crate) fn usec(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .min(u64::MAX - 1)
}

/// What happened to a notification that did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Delivery {
    /// The datagram was queued at the manager's socket.
    Sent,
    /// `NOTIFY_SOCKET` is unset: no manager listens, nothing was sent (not an error).
    NotSupervised,
    /// The manager's queue is full: the message is kept and a background retry delivers it
    /// (only [`Lifecycle::status`](crate::Lifecycle::status), latest text wins).
    Pending,
    /// Nothing was sent because the service is stopping: `READY=1` requested after a stop
    /// began (a stop during the start). Not an error: go on to
    /// [`Service::run`](crate::Service::run), which completes the stop.
    Stopping,
}

/// A notification that could not be delivered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotifyError {
    /// `NOTIFY_SOCKET` does not parse.
    #[error(transparent)]
    Env(#[from] EnvError),
    /// The address form is valid but this transport cannot use it.
    #[error("NOTIFY_SOCKET={addr}: this address family is not supported")]
    Unsupported {
        /// The address.
        addr: NotifyAddr,
    },
    /// The socket could not be created or connected.
    #[error("NOTIFY_SOCKET={addr}: cannot connect: {source}")]
    Connect {
        /// The address.
        addr: NotifyAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The manager's receive queue is full; the message was not sent. Retry later.
    #[error("NOTIFY_SOCKET={addr}: the manager's queue is full, message not sent")]
    QueueFull {
        /// The address.
        addr: NotifyAddr,
    },
    /// `sendmsg` failed.
    #[error("NOTIFY_SOCKET={addr}: send failed: {source}")]
    Send {
        /// The address.
        addr: NotifyAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Fewer bytes went out than the datagram held (`-EIO` in `sd-daemon.c`).
    #[error("NOTIFY_SOCKET={addr}: short send, {sent} of {len} bytes")]
    ShortSend {
        /// The address.
        addr: NotifyAddr,
        /// Bytes sent.
        sent: usize,
        /// Bytes in the datagram.
        len: usize,
    },
    /// The barrier pipe was not closed by the manager in time.
    #[error("NOTIFY_SOCKET={addr}: barrier not acknowledged within {timeout:?}")]
    BarrierTimeout {
        /// The address.
        addr: NotifyAddr,
        /// How long we waited.
        timeout: Duration,
    },
    /// Setting up or waiting on the barrier pipe failed.
    #[error("NOTIFY_SOCKET={addr}: barrier: {source}")]
    Barrier {
        /// The address.
        addr: NotifyAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Nothing to send.
    #[error("empty notification")]
    Empty,
    /// The datagram is larger than the manager reads; it would be dropped whole.
    #[error("notification of {len} bytes exceeds the manager's limit of {DATAGRAM_MAX} bytes")]
    TooLarge {
        /// Bytes in the datagram.
        len: usize,
    },
}

#[derive(Debug)]
struct Connection {
    addr: NotifyAddr,
    sockaddr: SocketAddr,
    sock: UnixDatagram,
}

/// The sending end of `$NOTIFY_SOCKET`.
///
/// Cheap to share (`&Notifier` is `Sync`); build one per process and keep it.
#[derive(Debug)]
pub struct Notifier {
    conn: Option<Connection>,
    /// Whether a failure has been logged at `warn` since the last success.
    warned: AtomicBool,
}

impl Notifier {
    /// A notifier that sends nothing and answers [`Delivery::NotSupervised`].
    pub fn disabled() -> Self {
        Notifier {
            conn: None,
            warned: AtomicBool::new(false),
        }
    }

    /// Connects to `NOTIFY_SOCKET` from the snapshot, or returns a disabled notifier when it is
    /// unset.
    pub fn from_env(env: &SystemdEnv) -> Result<Self, NotifyError> {
        match env.notify_socket()? {
            None => Ok(Self::disabled()),
            Some(addr) => Self::connect(addr),
        }
    }

    /// Connects to `addr`. A manager socket that does not exist yet is not an error here: the
    /// first send reports it (and tries to connect again).
    pub fn connect(addr: NotifyAddr) -> Result<Self, NotifyError> {
        let sockaddr = match &addr {
            NotifyAddr::Path(p) => SocketAddr::from_pathname(p),
            NotifyAddr::Abstract(name) => SocketAddr::from_abstract_name(name),
            NotifyAddr::Vsock { .. } => return Err(NotifyError::Unsupported { addr }),
        };
        let sockaddr = match sockaddr {
            Ok(a) => a,
            Err(source) => return Err(NotifyError::Connect { addr, source }),
        };
        let sock = match UnixDatagram::unbound().and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        }) {
            Ok(s) => s,
            Err(source) => return Err(NotifyError::Connect { addr, source }),
        };
        // Best effort, as in sd-daemon.c: a larger buffer only matters for large payloads.
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&sock, SNDBUF);
        if let Err(e) = sock.connect_addr(&sockaddr) {
            tracing::debug!(notify_socket = %addr, error = %e, "notify socket not reachable yet");
        }
        Ok(Notifier {
            conn: Some(Connection {
                addr,
                sockaddr,
                sock,
            }),
            warned: AtomicBool::new(false),
        })
    }

    /// Whether a manager listens (`NOTIFY_SOCKET` was set).
    pub fn is_supervised(&self) -> bool {
        self.conn.is_some()
    }

    /// The manager's address, if supervised.
    pub fn addr(&self) -> Option<&NotifyAddr> {
        self.conn.as_ref().map(|c| &c.addr)
    }

    /// Sends `msgs` as one datagram. Never blocks.
    pub fn notify(&self, msgs: &[Notification]) -> Result<Delivery, NotifyError> {
        self.notify_with_fds(msgs, &[])
    }

    /// Sends `msgs` as one datagram with `fds` attached (`SCM_RIGHTS`), e.g. for
    /// [`Notification::FdStore`]. Never blocks.
    pub fn notify_with_fds(
        &self,
        msgs: &[Notification],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Delivery, NotifyError> {
        if msgs.is_empty() {
            return Err(NotifyError::Empty);
        }
        self.send_payload(&encode(msgs), fds)
    }

    /// Sends a pre-encoded payload (see [`encode`]).
    pub fn send_payload(
        &self,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Delivery, NotifyError> {
        let Some(conn) = &self.conn else {
            return Ok(Delivery::NotSupervised);
        };
        if payload.len() > DATAGRAM_MAX {
            return Err(NotifyError::TooLarge { len: payload.len() });
        }
        let result = match conn.send(payload, fds) {
            Err(e) if is_disconnected(&e) => {
                // The manager re-created its socket (daemon-reexec) or was not there at start:
                // connect again, once, and retry.
                conn.sock
                    .connect_addr(&conn.sockaddr)
                    .map_err(|source| NotifyError::Connect {
                        addr: conn.addr.clone(),
                        source,
                    })
                    .and_then(|()| conn.send(payload, fds).map_err(|e| conn.send_error(e)))
            }
            other => other.map_err(|e| conn.send_error(e)),
        };
        let sent = result?;
        if sent != payload.len() {
            return Err(NotifyError::ShortSend {
                addr: conn.addr.clone(),
                sent,
                len: payload.len(),
            });
        }
        self.warned.store(false, Ordering::Relaxed);
        Ok(Delivery::Sent)
    }

    /// Logs a failed notification: the first failure since the last success at `warn`, the
    /// following ones at `debug`, so that a manager that went away does not flood the log but
    /// no failure goes unrecorded.
    pub fn log_failure(&self, what: &str, err: &NotifyError) {
        if self.warned.swap(true, Ordering::Relaxed) {
            tracing::debug!(error = %err, "sd_notify {what} failed");
        } else {
            tracing::warn!(error = %err, "sd_notify {what} failed");
        }
    }

    /// `sd_notify_barrier(3)`: sends `BARRIER=1` with the write end of a fresh pipe and waits, up
    /// to `timeout`, until the manager closes it, i.e. has processed every message sent before.
    ///
    /// Blocks the calling thread; in async code use [`Notifier::barrier_async`].
    pub fn barrier(&self, timeout: Duration) -> Result<Delivery, NotifyError> {
        let Some(conn) = &self.conn else {
            return Ok(Delivery::NotSupervised);
        };
        let read_end = self.send_barrier(conn)?;
        // No deadline (wait forever) when it does not fit an Instant, e.g. Duration::MAX.
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let ts = deadline.map(|d| {
                let left = d.saturating_duration_since(Instant::now());
                rustix::time::Timespec {
                    tv_sec: left.as_secs().try_into().unwrap_or(i64::MAX),
                    tv_nsec: left.subsec_nanos().into(),
                }
            });
            let mut fds = [PollFd::new(&read_end, PollFlags::empty())];
            match rustix::event::poll(&mut fds, ts.as_ref()) {
                Ok(0) => {
                    return Err(NotifyError::BarrierTimeout {
                        addr: conn.addr.clone(),
                        timeout,
                    });
                }
                Ok(_) if fds[0].revents().contains(PollFlags::HUP) => return Ok(Delivery::Sent),
                Ok(_) | Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    return Err(NotifyError::Barrier {
                        addr: conn.addr.clone(),
                        source: e.into(),
                    });
                }
            }
        }
    }

    /// [`Notifier::barrier`] without blocking a runtime thread.
    pub async fn barrier_async(&self, timeout: Duration) -> Result<Delivery, NotifyError> {
        let Some(conn) = &self.conn else {
            return Ok(Delivery::NotSupervised);
        };
        let read_end = self.send_barrier(conn)?;
        let barrier_err = |source: io::Error| NotifyError::Barrier {
            addr: conn.addr.clone(),
            source,
        };
        // epoll reports EPOLLHUP on the read end once every write end is closed, which tokio
        // reports as readable.
        let pipe =
            tokio::net::unix::pipe::Receiver::from_owned_fd(read_end).map_err(barrier_err)?;
        match tokio::time::timeout(timeout, pipe.readable()).await {
            Ok(Ok(())) => Ok(Delivery::Sent),
            Ok(Err(e)) => Err(barrier_err(e)),
            Err(_) => Err(NotifyError::BarrierTimeout {
                addr: conn.addr.clone(),
                timeout,
            }),
        }
    }

    fn send_barrier(&self, conn: &Connection) -> Result<std::os::fd::OwnedFd, NotifyError> {
        let (read_end, write_end) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| NotifyError::Barrier {
                addr: conn.addr.clone(),
                source: e.into(),
            })?;
        self.send_payload(b"BARRIER=1", &[write_end.as_fd()])?;
        // Our copy of the write end must be closed, or the pipe never hangs up.
        drop(write_end);
        Ok(read_end)
    }
}

impl Connection {
    fn send(&self, payload: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
        if fds.is_empty() {
            return self.sock.send(payload);
        }
        let mut space =
            vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many file descriptors for one message",
            ));
        }
        let iov = [io::IoSlice::new(payload)];
        Ok(rustix::net::sendmsg(
            &self.sock,
            &iov,
            &mut control,
            SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
        )?)
    }

    fn send_error(&self, source: io::Error) -> NotifyError {
        if source.kind() == io::ErrorKind::WouldBlock {
            NotifyError::QueueFull {
                addr: self.addr.clone(),
            }
        } else {
            NotifyError::Send {
                addr: self.addr.clone(),
                source,
            }
        }
    }
}

fn is_disconnected(e: &io::Error) -> bool {
    matches!(
        rustix::io::Errno::from_io_error(e),
        Some(
            rustix::io::Errno::NOTCONN | rustix::io::Errno::CONNREFUSED | rustix::io::Errno::NOENT
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn wire_format_of_every_message() {
        let name = FdName::new("state").unwrap();
        let cases: Vec<(Notification, &str)> = vec![
            (Notification::Ready, "READY=1"),
            (
                Notification::Reloading { monotonic_usec: 7 },
                "RELOADING=1\nMONOTONIC_USEC=7",
            ),
            (Notification::Stopping, "STOPPING=1"),
            (
                Notification::status("serving 3 jobs").unwrap(),
                "STATUS=serving 3 jobs",
            ),
            (Notification::Errno(42), "ERRNO=42"),
            (
                Notification::bus_error("org.freedesktop.DBus.Error.Failed").unwrap(),
                "BUSERROR=org.freedesktop.DBus.Error.Failed",
            ),
            (Notification::MainPid(1234), "MAINPID=1234"),
            (Notification::Watchdog, "WATCHDOG=1"),
            (Notification::WatchdogTrigger, "WATCHDOG=trigger"),
            (
                Notification::WatchdogUsec(7_200_000_000),
                "WATCHDOG_USEC=7200000000",
            ),
            (
                Notification::extend_timeout(Duration::from_millis(1500)),
                "EXTEND_TIMEOUT_USEC=1500000",
            ),
            (Notification::FdStore { name: None }, "FDSTORE=1"),
            (
                Notification::FdStore {
                    name: Some(name.clone()),
                },
                "FDSTORE=1\nFDNAME=state",
            ),
            (
                Notification::FdStoreRemove { name },
                "FDSTOREREMOVE=1\nFDNAME=state",
            ),
            (Notification::FdPollDisable, "FDPOLL=0"),
            (Notification::custom("X_GEN", "7").unwrap(), "X_GEN=7"),
        ];
        for (msg, wire) in cases {
            assert_eq!(msg.to_string(), wire);
            assert_eq!(&*encode(std::slice::from_ref(&msg)), wire.as_bytes());
        }
        assert_eq!(
            &*encode(&[Notification::Ready, Notification::status("up").unwrap()]),
            b"READY=1\nSTATUS=up"
        );
    }

    #[test]
    fn invalid_values_are_refused() {
        assert_eq!(
            Notification::status("a\nREADY=1").unwrap_err().field,
            "STATUS"
        );
        // PID 1 splits at \r too: "x\rWATCHDOG=trigger" would fire the watchdog.
        assert!(Notification::status("x\rWATCHDOG=trigger").is_err());
        assert!(Notification::custom("X_A", "b\rREADY=1").is_err());
        assert!(Notification::status("s".repeat(2049)).is_err());
        assert!(Notification::status("s".repeat(2048)).is_ok());
        assert!(Notification::status("nul\0").is_err());
        assert!(Notification::bus_error("x\ny").is_err());
        for bad in ["", "a:b", "tab\t", "é", &"x".repeat(256)] {
            assert!(FdName::new(bad).is_err(), "{bad:?}");
        }
        assert!(FdName::new("x".repeat(255)).is_ok());
        for bad in ["GEN", "X_", "X_lower", "X_A=B", "READY"] {
            assert!(Notification::custom(bad, "v").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn extend_timeout_saturates_below_infinity() {
        assert_eq!(
            Notification::extend_timeout(Duration::MAX),
            Notification::ExtendTimeoutUsec(u64::MAX - 1)
        );
    }

    #[test]
    fn monotonic_usec_is_monotonic_and_matches_clock() {
        let a = monotonic_usec();
        let b = monotonic_usec();
        assert!(b >= a);
        assert!(a > 0);
    }

    #[test]
    fn unsupervised_sends_nothing() {
        let n = Notifier::from_env(&SystemdEnv::default()).unwrap();
        assert!(!n.is_supervised());
        assert_eq!(
            n.notify(&[Notification::Ready]).unwrap(),
            Delivery::NotSupervised
        );
        assert_eq!(
            n.barrier(Duration::from_secs(1)).unwrap(),
            Delivery::NotSupervised
        );
    }

    #[test]
    fn vsock_is_reported_unsupported() {
        let env = SystemdEnv::from_vars([("NOTIFY_SOCKET", "vsock:2:1234")]);
        let e = Notifier::from_env(&env).unwrap_err();
        assert!(matches!(e, NotifyError::Unsupported { .. }), "{e}");
        assert!(e.to_string().contains("vsock:2:1234"), "{e}");
    }

    #[test]
    fn bad_notify_socket_names_the_variable() {
        let env = SystemdEnv::from_vars([("NOTIFY_SOCKET", "relative")]);
        let e = Notifier::from_env(&env).unwrap_err();
        assert!(e.to_string().contains("NOTIFY_SOCKET"), "{e}");
    }

    #[test]
    fn empty_message_is_refused() {
        let n = Notifier::disabled();
        assert!(matches!(n.notify(&[]), Err(NotifyError::Empty)));
    }

    #[test]
    fn datagram_beyond_the_managers_buffer_is_refused_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_nonblocking(true).unwrap();
        let n = Notifier::connect(NotifyAddr::Path(path)).unwrap();
        let line = "s".repeat(2048);
        let msgs = [
            Notification::status(line.clone()).unwrap(),
            Notification::custom("X_MORE", line).unwrap(),
        ];
        let e = n.notify(&msgs).unwrap_err();
        assert!(
            matches!(e, NotifyError::TooLarge { len } if len > DATAGRAM_MAX),
            "{e}"
        );
        assert!(rx.recv(&mut [0u8; 16]).is_err(), "nothing may be sent");
        // The largest datagram the manager still reads goes through.
        let payload = vec![b'X'; DATAGRAM_MAX];
        n.send_payload(&payload, &[]).unwrap();
        assert_eq!(rx.recv(&mut [0u8; 8192]).unwrap(), DATAGRAM_MAX);
    }

    #[test]
    fn barrier_without_a_deadline_does_not_overflow() {
        let m = tempfile::tempdir().unwrap();
        let path = m.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::connect(NotifyAddr::Path(path)).unwrap();
        // The "manager" reads the barrier and closes the fd it carried.
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut cmsg = rustix::net::RecvAncillaryBuffer::new(&mut space);
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            rustix::net::recvmsg(
                &rx,
                &mut iov,
                &mut cmsg,
                rustix::net::RecvFlags::CMSG_CLOEXEC,
            )
            .unwrap();
            // Dropping the received fds closes the barrier pipe.
            cmsg.drain().for_each(drop);
        });
        assert_eq!(n.barrier(Duration::MAX).unwrap(), Delivery::Sent);
        reader.join().unwrap();
    }

    #[test]
    fn fds_travel_with_the_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::connect(NotifyAddr::Path(path)).unwrap();
        let (r, w) = rustix::pipe::pipe().unwrap();
        let msg = Notification::FdStore {
            name: Some(FdName::new("pipe").unwrap()),
        };
        assert_eq!(
            n.notify_with_fds(&[msg], &[w.as_fd()]).unwrap(),
            Delivery::Sent
        );
        drop(w);
        let mut buf = [0u8; 64];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
        let mut cmsg = rustix::net::RecvAncillaryBuffer::new(&mut space);
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let got = rustix::net::recvmsg(
            &rx,
            &mut iov,
            &mut cmsg,
            rustix::net::RecvFlags::CMSG_CLOEXEC,
        )
        .unwrap();
        assert_eq!(&buf[..got.bytes], b"FDSTORE=1\nFDNAME=pipe");
        let fds: Vec<_> = cmsg
            .drain()
            .flat_map(|m| match m {
                rustix::net::RecvAncillaryMessage::ScmRights(fds) => fds.collect::<Vec<_>>(),
                _ => vec![],
            })
            .collect();
        assert_eq!(fds.len(), 1);
        // The received fd is the pipe's write end: writing into it reaches our read end.
        rustix::io::write(&fds[0], b"x").unwrap();
        let mut one = [0u8; 1];
        assert_eq!(rustix::io::read(&r, &mut one).unwrap(), 1);
        assert!(fds[0].as_raw_fd() >= 0);
    }
}
