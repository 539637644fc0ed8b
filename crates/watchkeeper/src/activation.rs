//! Socket activation: the listening sockets systemd passes as fds 3, 4, … (`LISTEN_FDS`).
//!
//! [`take`] follows `sd_listen_fds_with_names()` from `sd-daemon.c` (see
//! [sd_listen_fds(3)](https://www.freedesktop.org/software/systemd/man/latest/sd_listen_fds.html),
//! [systemd.socket(5)](https://www.freedesktop.org/software/systemd/man/latest/systemd.socket.html)
//! and the `LISTEN_*` variables in
//! [systemd.exec(5)](https://www.freedesktop.org/software/systemd/man/latest/systemd.exec.html#%24LISTEN_FDS)):
//!
//! 1. `LISTEN_PID` unset: nothing was passed. Set but not a valid pid: error. Another process's
//!    pid: the fds are not for us, nothing is taken.
//! 2. `LISTEN_PIDFDID` (systemd 258+), if set, must be a decimal number (else error) and, when
//!    the kernel exposes pidfd inode ids (pidfs, Linux 6.9+), equal the inode of a pidfd for
//!    our process; otherwise the fds are not for us. Without pidfs the check is skipped, as in
//!    `sd-daemon.c`.
//! 3. `LISTEN_FDS` unset: nothing was passed. `0`, not a decimal number, or too large: error
//!    (`-EINVAL` in `sd-daemon.c`).
//! 4. `LISTEN_FDNAMES`, if set, is split at `:` with empty fields kept and must have exactly
//!    `LISTEN_FDS` entries (else error). Unset, every fd is named [`UNNAMED_FD`] (`unknown`).
//!    systemd always sets it: an fd is named after `FileDescriptorName=` or, without one, after
//!    its socket unit (`web.socket`).
//! 5. Every fd from [`SD_LISTEN_FDS_START`] on must be open and gets `FD_CLOEXEC`, so that the
//!    sockets do not leak into children.
//!
//! The result is a [`ListenFds`]: named [`OwnedFd`]s, with helpers that check an fd really is a
//! listening stream socket of the right family before turning it into a (tokio or std)
//! listener.
//!
//! ```no_run
//! # #[allow(dead_code)]
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use watchkeeper::{SystemdEnv, activation};
//! let env = SystemdEnv::from_env();
//! // SAFETY: called first thing in main; nothing else owns fds 3.. yet.
//! let mut fds = unsafe { activation::take(&env)? };
//! if !fds.is_empty() {
//!     let listener = fds.take_unix_listener("ctl")?;
//!     let (_stream, _addr) = listener.accept().await?;
//! }
//! # Ok(()) }
//! ```
//!
//! # Safety
//!
//! Taking the fds makes this crate their owner: [`take`] and [`take_for_pid`] are `unsafe`
//! because the caller must guarantee that nothing else in the process owns, uses or closes fds
//! `3..3+LISTEN_FDS` (call them early in `main`, before libraries open files). A process-wide
//! flag makes a second successful take return [`ActivationError::AlreadyTaken`], so the same
//! fds are never owned twice through this module.
//!
//! # Caveats
//!
//! - The environment is never modified (this crate does not call `unsetenv`): start child
//!   processes with [`SystemdEnv::scrub`](crate::SystemdEnv::scrub) so they do not try to take
//!   fds that are not theirs.
//! - `LISTEN_FDS=0` is an error, as `sd_listen_fds()` returns `-EINVAL` for it; systemd itself
//!   never sets it to 0.
//! - Numbers are parsed strictly (ASCII digits only), where `sd-daemon.c` uses `safe_atoi()`.
//! - With `StandardInput=socket` systemd sets no `LISTEN_*` variables at all: the socket is on
//!   fd 0 and this module does not see it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::io::{Errno, FdFlags};
use rustix::net::{AddressFamily, SocketType};

use crate::SystemdEnv;
use crate::env::{
    EnvError, LISTEN_FDNAMES, LISTEN_FDS, LISTEN_PID, LISTEN_PIDFDID, parse_decimal_u64, parse_pid,
};

/// The first passed fd (`SD_LISTEN_FDS_START` in `sd-daemon.h`).
pub const SD_LISTEN_FDS_START: RawFd = 3;

/// The name `sd_listen_fds_with_names()` reports for every fd when `LISTEN_FDNAMES` is unset.
///
/// systemd itself (227+) always sets `LISTEN_FDNAMES` when it passes sockets: each fd is named
/// after `FileDescriptorName=` of its `.socket` unit or, when that is unset, after the socket
/// unit itself, suffix included (`web.socket`; `socket_fdname()` in `src/core/socket.c`). Only
/// other launchers (`systemd-socket-activate` without `--fdname`, older managers) leave the
/// names unset, and then every fd is called `unknown`. The `*_or_bind` helpers treat fds of
/// this name as unnamed: a name asked for does not match them, and the only listener of the
/// requested kind is taken instead.
pub const UNNAMED_FD: &str = "unknown";

/// The former name of [`UNNAMED_FD`]. It is not a name systemd gives: see [`UNNAMED_FD`].
#[deprecated(note = "use UNNAMED_FD; systemd names fds after the socket unit, see its docs")]
pub const DEFAULT_FD_NAME: &str = UNNAMED_FD;

/// The suffix of a socket unit's name, which systemd uses as the fd name when
/// `FileDescriptorName=` is unset.
const SOCKET_UNIT_SUFFIX: &str = ".socket";

/// `PID_FS_MAGIC` from `linux/magic.h`: the file system of pidfds on Linux 6.9+.
const PID_FS_MAGIC: u64 = 0x5049_4446;

/// Set once the passed fds have been taken, so they are never owned twice.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Why the passed fds could not be taken or converted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ActivationError {
    /// `LISTEN_PID`, `LISTEN_PIDFDID`, `LISTEN_FDS` or `LISTEN_FDNAMES` is malformed; the error
    /// names the variable and its value.
    #[error(transparent)]
    Env(#[from] EnvError),
    /// `LISTEN_FDNAMES` does not have one name per fd.
    #[error("LISTEN_FDNAMES={value:?} has {names} names but LISTEN_FDS={fds}")]
    NameCountMismatch {
        /// The value of `LISTEN_FDNAMES`.
        value: String,
        /// How many `:`-separated names it holds.
        names: usize,
        /// The value of `LISTEN_FDS`.
        fds: usize,
    },
    /// A passed fd is not open, or `FD_CLOEXEC` could not be set on it.
    #[error("passed fd {fd} ({name:?}) from LISTEN_FDS is not usable: {source}")]
    BadFd {
        /// The fd number.
        fd: RawFd,
        /// Its name from `LISTEN_FDNAMES`.
        name: String,
        /// What `fcntl(2)` said.
        #[source]
        source: io::Error,
    },
    /// The passed fds were already taken by an earlier call in this process.
    #[error(
        "the socket-activation fds (LISTEN_FDS, from fd 3) were already taken in this process; \
         take them once, early in main, and pass the ListenFds around"
    )]
    AlreadyTaken,
    /// No passed fd has the requested name.
    #[error("no passed fd is named {name:?} (LISTEN_FDNAMES; still available: {available:?})")]
    NotFound {
        /// The requested name.
        name: String,
        /// The names of the fds that have not been taken yet.
        available: Vec<String>,
    },
    /// The fd is not the kind of socket asked for.
    #[error("passed fd {fd} ({name:?}) is {found}, expected {expected}")]
    WrongKind {
        /// Its name from `LISTEN_FDNAMES`.
        name: String,
        /// The fd number.
        fd: RawFd,
        /// What was asked for, e.g. `a listening AF_UNIX stream socket`.
        expected: &'static str,
        /// What the fd is instead.
        found: String,
    },
    /// A system call on a passed fd failed.
    #[error("{op} on passed fd {fd} ({name:?}) failed: {source}")]
    Io {
        /// Its name from `LISTEN_FDNAMES`.
        name: String,
        /// The fd number.
        fd: RawFd,
        /// The operation, e.g. `getsockname`.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// More than one passed fd could be the listener asked for, and no name picks one.
    #[error(
        "{count} passed fds are {expected} ({names:?}); name the one to use \
         (FileDescriptorName= in the .socket unit)"
    )]
    Ambiguous {
        /// What was asked for.
        expected: &'static str,
        /// How many fds qualify.
        count: usize,
        /// Their names.
        names: Vec<String>,
    },
    /// No suitable fd was passed, and binding the fallback address failed.
    #[error("no passed fd {wanted}, and binding {addr} failed: {source}")]
    Bind {
        /// Which fd was looked for, e.g. `named "web" or "web.socket"`.
        wanted: String,
        /// The address that was bound instead.
        addr: String,
        /// What `bind(2)` or `listen(2)` said.
        #[source]
        source: io::Error,
    },
    /// A tokio listener was asked for outside a tokio runtime, before any fd was taken or any
    /// address bound.
    #[error("{what} cannot become a tokio listener outside a tokio runtime; use the std_* variant")]
    NotInRuntime {
        /// The listener asked for, e.g. `a listener on "127.0.0.1:8080"`.
        what: String,
    },
    /// A tokio listener was asked for outside a tokio runtime.
    #[error(
        "passed fd {fd} ({name:?}) cannot become a tokio listener outside a tokio runtime; \
         call this from within the runtime or use the take_std_* variant"
    )]
    NoRuntime {
        /// Its name from `LISTEN_FDNAMES`.
        name: String,
        /// The fd number.
        fd: RawFd,
    },
}

/// The fds systemd passed, each with its name from `LISTEN_FDNAMES`, in fd order.
///
/// Obtained from [`take`]; an empty value means nothing was passed to this process.
#[derive(Debug, Default)]
pub struct ListenFds {
    fds: Vec<(String, OwnedFd)>,
}

/// Takes ownership of the fds systemd passed to this process (`LISTEN_PID` must be
/// [`std::process::id`]). See the [module documentation](self) for the rules.
///
/// # Safety
///
/// The caller guarantees that nothing else in the process owns, uses or closes fds
/// `3..3+LISTEN_FDS`: call this early in `main`.
///
/// # Errors
///
/// A malformed variable, a name count that does not match, a passed fd that is not open, or
/// fds already taken by an earlier call ([`ActivationError::AlreadyTaken`]).
pub unsafe fn take(env: &SystemdEnv) -> Result<ListenFds, ActivationError> {
    // SAFETY: forwarded: the caller upholds the same contract.
    unsafe { take_for_pid(env, std::process::id()) }
}

/// [`take`] with an explicit pid instead of [`std::process::id`] (e.g. for tests).
///
/// `LISTEN_PID` must equal `pid`, and `LISTEN_PIDFDID`, if set, is compared with a pidfd for
/// `pid`.
///
/// # Safety
///
/// As for [`take`]: nothing else in the process owns, uses or closes fds `3..3+LISTEN_FDS`.
///
/// # Errors
///
/// As for [`take`].
pub unsafe fn take_for_pid(env: &SystemdEnv, pid: u32) -> Result<ListenFds, ActivationError> {
    let Some(plan) = plan(env, pid, pidfd_inode_id)? else {
        return Ok(ListenFds::default());
    };
    if TAKEN.swap(true, Ordering::AcqRel) {
        return Err(ActivationError::AlreadyTaken);
    }
    if let Err(e) = check_fds(&plan, |fd| {
        // SAFETY: `fd` is at least 3, so not -1. The caller guarantees nothing else owns it, so
        // it cannot be closed while this borrow lives; if it is not open at all, fcntl() only
        // fails with EBADF. The borrow does not outlive this closure.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        set_cloexec(fd)
    }) {
        TAKEN.store(false, Ordering::Release);
        return Err(e);
    }
    let fds = plan
        .fds()
        .map(|(name, fd)| {
            // SAFETY: `fd` was just checked to be open, and the caller guarantees that nothing
            // else owns it; TAKEN ensures this module hands it out only once.
            (name.to_owned(), unsafe { OwnedFd::from_raw_fd(fd) })
        })
        .collect();
    Ok(ListenFds { fds })
}

/// `fcntl(F_GETFD)`, then `F_SETFD` with `FD_CLOEXEC` added.
fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = rustix::io::fcntl_getfd(fd)?;
    if !flags.contains(FdFlags::CLOEXEC) {
        rustix::io::fcntl_setfd(fd, flags | FdFlags::CLOEXEC)?;
    }
    Ok(())
}

/// What was passed to a process: `n` fds from [`SD_LISTEN_FDS_START`] on, and their names.
#[derive(Debug)]
struct Plan {
    n: usize,
    /// `LISTEN_FDNAMES`, already checked to hold `n` names; `None` means all are `unknown`.
    /// (Kept lazy so that a huge `LISTEN_FDS` fails on the first closed fd, not on allocation.)
    names: Option<Vec<String>>,
}

impl Plan {
    /// `(name, fd number)` for every passed fd, in order.
    fn fds(&self) -> impl Iterator<Item = (&str, RawFd)> + '_ {
        (0..self.n).zip(SD_LISTEN_FDS_START..).map(|(i, fd)| {
            let name = self
                .names
                .as_ref()
                .and_then(|names| names.get(i))
                .map_or(UNNAMED_FD, String::as_str);
            (name, fd)
        })
    }
}

/// The pure part of `sd_listen_fds_with_names()`: what was passed to `pid`, `None` when
/// nothing was.
///
/// `own_pidfd_id(pid)` gives the pidfd inode id of `pid`, or `None` when the kernel cannot tell
/// (then `LISTEN_PIDFDID` is only checked for syntax).
fn plan(
    env: &SystemdEnv,
    pid: u32,
    own_pidfd_id: impl FnOnce(u32) -> Option<u64>,
) -> Result<Option<Plan>, ActivationError> {
    let Some(raw_pid) = env.var(LISTEN_PID) else {
        return Ok(None);
    };
    let listen_pid = parse_pid(raw_pid).ok_or_else(|| EnvError {
        var: LISTEN_PID,
        value: raw_pid.to_string_lossy().into_owned(),
        reason: "not a valid pid",
    })?;
    if listen_pid != pid {
        return Ok(None);
    }
    if let Some(raw) = env.var(LISTEN_PIDFDID) {
        let want = parse_decimal_u64(raw).ok_or_else(|| EnvError {
            var: LISTEN_PIDFDID,
            value: raw.to_string_lossy().into_owned(),
            reason: "not a decimal pidfd inode id",
        })?;
        if let Some(own) = own_pidfd_id(pid) {
            if own != want {
                return Ok(None);
            }
        }
    }
    let Some(raw_n) = env.var(LISTEN_FDS) else {
        return Ok(None);
    };
    let fds_err = |reason| EnvError {
        var: LISTEN_FDS,
        value: raw_n.to_string_lossy().into_owned(),
        reason,
    };
    let n = parse_decimal_u64(raw_n).ok_or_else(|| fds_err("not a decimal number of fds"))?;
    // sd-daemon.c: n > INT_MAX - SD_LISTEN_FDS_START is -EINVAL.
    let max = u64::from((i32::MAX - SD_LISTEN_FDS_START).unsigned_abs());
    if n > max {
        return Err(fds_err("more fds than fit after fd 3").into());
    }
    let n = usize::try_from(n).map_err(|_| fds_err("more fds than this platform can address"))?;
    if n == 0 {
        // sd-daemon.c: n <= 0 is -EINVAL.
        return Err(fds_err("must be at least 1").into());
    }
    let names = match env.var(LISTEN_FDNAMES) {
        None => None,
        Some(raw) => {
            let value = raw.to_str().ok_or_else(|| EnvError {
                var: LISTEN_FDNAMES,
                value: raw.to_string_lossy().into_owned(),
                reason: "not UTF-8",
            })?;
            let names: Vec<String> = value.split(':').map(str::to_owned).collect();
            if names.len() != n {
                return Err(ActivationError::NameCountMismatch {
                    value: value.to_owned(),
                    names: names.len(),
                    fds: n,
                });
            }
            Some(names)
        }
    };
    Ok(Some(Plan { n, names }))
}

/// Runs `check` on every planned fd, stopping at the first failure, which names the fd.
fn check_fds(
    plan: &Plan,
    mut check: impl FnMut(RawFd) -> io::Result<()>,
) -> Result<(), ActivationError> {
    for (name, fd) in plan.fds() {
        check(fd).map_err(|source| ActivationError::BadFd {
            fd,
            name: name.to_owned(),
            source,
        })?;
    }
    Ok(())
}

/// The pidfd inode id of `pid`, as `pidfd_get_inode_id()` in systemd: only on pidfs, where
/// inode ids identify a process; `None` when unsupported or on any error.
fn pidfd_inode_id(pid: u32) -> Option<u64> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
    let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()?;
    let fs = rustix::fs::fstatfs(&fd).ok()?;
    #[allow(clippy::useless_conversion)] // `f_type`'s type differs between architectures.
    let f_type = u64::try_from(fs.f_type).ok()?;
    if f_type != PID_FS_MAGIC {
        return None;
    }
    let st = rustix::fs::fstat(&fd).ok()?;
    #[allow(clippy::useless_conversion)] // `st_ino`'s type differs between architectures.
    let ino = u64::try_from(st.st_ino).ok()?;
    Some(ino)
}

/// The family a listener must have.
#[derive(Clone, Copy)]
enum Family {
    Unix,
    Inet,
}

impl Family {
    fn expected(self) -> &'static str {
        match self {
            Family::Unix => "a listening AF_UNIX stream socket",
            Family::Inet => "a listening AF_INET/AF_INET6 stream (TCP) socket",
        }
    }

    fn matches(self, family: AddressFamily) -> bool {
        match self {
            Family::Unix => family == AddressFamily::UNIX,
            Family::Inet => family == AddressFamily::INET || family == AddressFamily::INET6,
        }
    }
}

fn family_name(family: AddressFamily) -> String {
    match family {
        AddressFamily::UNIX => "AF_UNIX".to_owned(),
        AddressFamily::INET => "AF_INET".to_owned(),
        AddressFamily::INET6 => "AF_INET6".to_owned(),
        AddressFamily::NETLINK => "AF_NETLINK".to_owned(),
        AddressFamily::VSOCK => "AF_VSOCK".to_owned(),
        other => format!("address family {}", other.as_raw()),
    }
}

fn type_name(ty: SocketType) -> String {
    match ty {
        SocketType::STREAM => "SOCK_STREAM".to_owned(),
        SocketType::DGRAM => "SOCK_DGRAM".to_owned(),
        SocketType::SEQPACKET => "SOCK_SEQPACKET".to_owned(),
        SocketType::RAW => "SOCK_RAW".to_owned(),
        other => format!("socket type {}", other.as_raw()),
    }
}

impl ListenFds {
    /// Wraps fds obtained elsewhere, e.g. listeners a test binds itself, so that code written
    /// against [`ListenFds`] can run without systemd.
    pub fn from_fds(fds: Vec<(String, OwnedFd)>) -> Self {
        Self { fds }
    }

    /// How many fds are left.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// Whether no fds are left (or none were passed).
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// The names of the fds that are left, in fd order (duplicates included).
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.fds.iter().map(|(name, _)| name.as_str())
    }

    /// Removes and returns the first fd named `name`, whatever it is.
    pub fn take_fd(&mut self, name: &str) -> Option<OwnedFd> {
        let i = self.fds.iter().position(|(n, _)| n == name)?;
        Some(self.fds.remove(i).1)
    }

    /// All the fds that are left, with their names, in fd order.
    pub fn into_fds(self) -> Vec<(String, OwnedFd)> {
        self.fds
    }

    /// Takes the first fd named `name` as a tokio [`UnixListener`](tokio::net::UnixListener),
    /// after checking that it is a listening `AF_UNIX` `SOCK_STREAM` socket. It is switched to
    /// non-blocking mode.
    ///
    /// # Errors
    ///
    /// [`ActivationError::NotFound`], [`ActivationError::WrongKind`] (the fd then stays in
    /// `self`), [`ActivationError::NoRuntime`] outside a tokio runtime, or
    /// [`ActivationError::Io`].
    pub fn take_unix_listener(
        &mut self,
        name: &str,
    ) -> Result<tokio::net::UnixListener, ActivationError> {
        let (fd, name) = self.take_listener(name, Family::Unix, true)?;
        let raw = fd.as_raw_fd();
        tokio::net::UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))
            .map_err(|source| io_err(name, raw, "registering with tokio", source))
    }

    /// Takes the first fd named `name` as a tokio [`TcpListener`](tokio::net::TcpListener),
    /// after checking that it is a listening `AF_INET` or `AF_INET6` `SOCK_STREAM` socket. It is
    /// switched to non-blocking mode.
    ///
    /// # Errors
    ///
    /// As for [`ListenFds::take_unix_listener`].
    pub fn take_tcp_listener(
        &mut self,
        name: &str,
    ) -> Result<tokio::net::TcpListener, ActivationError> {
        let (fd, name) = self.take_listener(name, Family::Inet, true)?;
        let raw = fd.as_raw_fd();
        tokio::net::TcpListener::from_std(std::net::TcpListener::from(fd))
            .map_err(|source| io_err(name, raw, "registering with tokio", source))
    }

    /// Takes the first fd named `name` as a std
    /// [`UnixListener`](std::os::unix::net::UnixListener), after the checks of
    /// [`ListenFds::take_unix_listener`]. It is switched to blocking mode.
    ///
    /// # Errors
    ///
    /// [`ActivationError::NotFound`], [`ActivationError::WrongKind`] (the fd then stays in
    /// `self`) or [`ActivationError::Io`].
    pub fn take_std_unix_listener(
        &mut self,
        name: &str,
    ) -> Result<std::os::unix::net::UnixListener, ActivationError> {
        let (fd, _) = self.take_listener(name, Family::Unix, false)?;
        Ok(std::os::unix::net::UnixListener::from(fd))
    }

    /// Takes the first fd named `name` as a std [`TcpListener`](std::net::TcpListener), after
    /// the checks of [`ListenFds::take_tcp_listener`]. It is switched to blocking mode.
    ///
    /// # Errors
    ///
    /// As for [`ListenFds::take_std_unix_listener`].
    pub fn take_std_tcp_listener(
        &mut self,
        name: &str,
    ) -> Result<std::net::TcpListener, ActivationError> {
        let (fd, _) = self.take_listener(name, Family::Inet, false)?;
        Ok(std::net::TcpListener::from(fd))
    }

    /// The passed TCP listener named `name`, or the only one, or else a listener bound to
    /// `addr`, as a tokio [`TcpListener`](tokio::net::TcpListener) (non-blocking), and where it
    /// came from, for the service to log.
    ///
    /// This is how a service runs both socket-activated and stand-alone with one code path.
    /// The passed fd is chosen as follows:
    ///
    /// 1. With `Some(name)`: the fd named `name`, or else the one named `name.socket` — the name
    ///    systemd gives the fd of `name.socket` when that unit sets no `FileDescriptorName=`.
    ///    An fd of that name that is not a listening TCP socket is an error
    ///    ([`ActivationError::WrongKind`]), not a reason to bind.
    /// 2. Otherwise the only listening TCP socket among the fds left: with `Some(name)` only
    ///    among fds without a name ([`UNNAMED_FD`], a launcher that set no `LISTEN_FDNAMES`), so
    ///    that the listener of another socket unit is never taken by mistake; with `None`
    ///    among all. Two or more candidates are [`ActivationError::Ambiguous`].
    /// 3. No candidate: `addr` is bound (with `SO_REUSEADDR`, as [`std::net::TcpListener::bind`]
    ///    does) and [`ListenerSource::Bound`] returned.
    ///
    /// # Errors
    ///
    /// [`ActivationError::WrongKind`], [`ActivationError::Ambiguous`],
    /// [`ActivationError::Bind`] (naming the address), [`ActivationError::NotInRuntime`]
    /// outside a tokio runtime (checked before anything is taken or bound), or
    /// [`ActivationError::Io`].
    pub fn tcp_listener_or_bind(
        &mut self,
        name: Option<&str>,
        addr: impl std::net::ToSocketAddrs + std::fmt::Debug,
    ) -> Result<(tokio::net::TcpListener, ListenerSource), ActivationError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ActivationError::NotInRuntime {
                what: format!("a TCP listener (passed, or bound to {addr:?})"),
            });
        }
        let label = format!("{addr:?}");
        let (listener, source) = self.std_tcp_listener_or_bind(name, addr)?;
        let (raw, label) = (listener.as_raw_fd(), source.label(label));
        listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(listener))
            .map(|l| (l, source))
            .map_err(|e| io_err(label, raw, "registering with tokio", e))
    }

    /// [`ListenFds::tcp_listener_or_bind`] for an `AF_UNIX` stream socket bound at `path`. A
    /// socket file left at `path` by an earlier run is not removed: binding then fails with
    /// `EADDRINUSE` ([`ActivationError::Bind`]); remove a stale socket first if that is safe.
    ///
    /// # Errors
    ///
    /// As for [`ListenFds::tcp_listener_or_bind`].
    pub fn unix_listener_or_bind(
        &mut self,
        name: Option<&str>,
        path: impl AsRef<Path>,
    ) -> Result<(tokio::net::UnixListener, ListenerSource), ActivationError> {
        let path = path.as_ref();
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ActivationError::NotInRuntime {
                what: format!("an AF_UNIX listener (passed, or bound at {path:?})"),
            });
        }
        let (listener, source) = self.std_unix_listener_or_bind(name, path)?;
        let (raw, label) = (listener.as_raw_fd(), source.label(format!("{path:?}")));
        listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixListener::from_std(listener))
            .map(|l| (l, source))
            .map_err(|e| io_err(label, raw, "registering with tokio", e))
    }

    /// [`ListenFds::tcp_listener_or_bind`] without tokio: a blocking std
    /// [`TcpListener`](std::net::TcpListener).
    ///
    /// # Errors
    ///
    /// As for [`ListenFds::tcp_listener_or_bind`], except [`ActivationError::NotInRuntime`].
    pub fn std_tcp_listener_or_bind(
        &mut self,
        name: Option<&str>,
        addr: impl std::net::ToSocketAddrs + std::fmt::Debug,
    ) -> Result<(std::net::TcpListener, ListenerSource), ActivationError> {
        if let Some(i) = self.find_listener(name, Family::Inet)? {
            let (fd, name) = self.take_at(i, Family::Inet, false)?;
            return Ok((fd.into(), ListenerSource::Activated { name }));
        }
        std::net::TcpListener::bind(&addr)
            .map(|l| (l, ListenerSource::Bound))
            .map_err(|source| ActivationError::Bind {
                wanted: wanted(name, Family::Inet),
                addr: format!("{addr:?}"),
                source,
            })
    }

    /// [`ListenFds::unix_listener_or_bind`] without tokio: a blocking std
    /// [`UnixListener`](std::os::unix::net::UnixListener).
    ///
    /// # Errors
    ///
    /// As for [`ListenFds::tcp_listener_or_bind`], except [`ActivationError::NotInRuntime`].
    pub fn std_unix_listener_or_bind(
        &mut self,
        name: Option<&str>,
        path: impl AsRef<Path>,
    ) -> Result<(std::os::unix::net::UnixListener, ListenerSource), ActivationError> {
        let path = path.as_ref();
        if let Some(i) = self.find_listener(name, Family::Unix)? {
            let (fd, name) = self.take_at(i, Family::Unix, false)?;
            return Ok((fd.into(), ListenerSource::Activated { name }));
        }
        std::os::unix::net::UnixListener::bind(path)
            .map(|l| (l, ListenerSource::Bound))
            .map_err(|source| ActivationError::Bind {
                wanted: wanted(name, Family::Unix),
                addr: format!("{path:?}"),
                source,
            })
    }

    /// The index of the fd the `*_or_bind` helpers take (see
    /// [`ListenFds::tcp_listener_or_bind`]), `None` when they should bind.
    fn find_listener(
        &self,
        name: Option<&str>,
        family: Family,
    ) -> Result<Option<usize>, ActivationError> {
        if let Some(name) = name {
            let unit = format!("{name}{SOCKET_UNIT_SUFFIX}");
            let named = self
                .fds
                .iter()
                .position(|(n, _)| n == name)
                .or_else(|| self.fds.iter().position(|(n, _)| *n == unit));
            if named.is_some() {
                return Ok(named);
            }
        }
        let candidates: Vec<usize> = self
            .fds
            .iter()
            .enumerate()
            .filter(|(_, (n, _))| name.is_none() || n == UNNAMED_FD)
            .filter(|(_, (n, fd))| check_listener(fd.as_fd(), n, family).is_ok())
            .map(|(i, _)| i)
            .collect();
        match candidates.as_slice() {
            [] => Ok(None),
            [only] => Ok(Some(*only)),
            more => Err(ActivationError::Ambiguous {
                expected: family.expected(),
                count: more.len(),
                names: more.iter().map(|&i| self.fds[i].0.clone()).collect(),
            }),
        }
    }

    /// Finds, checks, sets the blocking mode of, and only then removes the fd named `name`.
    fn take_listener(
        &mut self,
        name: &str,
        family: Family,
        nonblocking: bool,
    ) -> Result<(OwnedFd, String), ActivationError> {
        let Some(i) = self.fds.iter().position(|(n, _)| n == name) else {
            return Err(ActivationError::NotFound {
                name: name.to_owned(),
                available: self.names().map(str::to_owned).collect(),
            });
        };
        self.take_at(i, family, nonblocking)
    }

    /// Checks, sets the blocking mode of, and only then removes the fd at index `i`.
    fn take_at(
        &mut self,
        i: usize,
        family: Family,
        nonblocking: bool,
    ) -> Result<(OwnedFd, String), ActivationError> {
        let (name, fd) = &self.fds[i];
        let (name, fd) = (name.as_str(), fd.as_fd());
        check_listener(fd, name, family)?;
        if nonblocking && tokio::runtime::Handle::try_current().is_err() {
            return Err(ActivationError::NoRuntime {
                name: name.to_owned(),
                fd: fd.as_raw_fd(),
            });
        }
        rustix::io::ioctl_fionbio(fd, nonblocking)
            .map_err(|e| io_err(name.to_owned(), fd.as_raw_fd(), "ioctl(FIONBIO)", e.into()))?;
        let (name, fd) = self.fds.remove(i);
        Ok((fd, name))
    }
}

/// Where a listener from one of the `*_or_bind` helpers of [`ListenFds`] came from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListenerSource {
    /// Passed by the manager (socket activation).
    Activated {
        /// Its name from `LISTEN_FDNAMES` (e.g. `web.socket` or a `FileDescriptorName=`), or
        /// [`UNNAMED_FD`].
        name: String,
    },
    /// No suitable fd was passed: the given address was bound.
    Bound,
}

impl std::fmt::Display for ListenerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenerSource::Activated { name } => {
                write!(f, "socket activation, passed fd named {name:?}")
            }
            ListenerSource::Bound => f.write_str("bound by the service"),
        }
    }
}

/// What the `*_or_bind` helpers looked for, for [`ActivationError::Bind`].
fn wanted(name: Option<&str>, family: Family) -> String {
    match name {
        Some(name) => format!("named {name:?} or \"{name}{SOCKET_UNIT_SUFFIX}\""),
        None => format!("that is {}", family.expected()),
    }
}

impl ListenerSource {
    /// The fd's name, or the bound address, for an error message.
    fn label(&self, addr: String) -> String {
        match self {
            ListenerSource::Activated { name } => name.clone(),
            ListenerSource::Bound => addr,
        }
    }
}

fn io_err(name: String, fd: RawFd, op: &'static str, source: io::Error) -> ActivationError {
    ActivationError::Io {
        name,
        fd,
        op,
        source,
    }
}

/// `sd_is_socket(fd, family, SOCK_STREAM, 1)`, with an error saying what the fd is instead.
fn check_listener(fd: BorrowedFd<'_>, name: &str, family: Family) -> Result<(), ActivationError> {
    let raw = fd.as_raw_fd();
    let wrong = |found: String| ActivationError::WrongKind {
        name: name.to_owned(),
        fd: raw,
        expected: family.expected(),
        found,
    };
    let ty = match rustix::net::sockopt::socket_type(fd) {
        Ok(ty) => ty,
        Err(Errno::NOTSOCK) => return Err(wrong(describe_non_socket(fd))),
        Err(e) => {
            return Err(io_err(
                name.to_owned(),
                raw,
                "getsockopt(SO_TYPE)",
                e.into(),
            ));
        }
    };
    let addr = rustix::net::getsockname(fd)
        .map_err(|e| io_err(name.to_owned(), raw, "getsockname", e.into()))?;
    let af = addr.address_family();
    if ty != SocketType::STREAM || !family.matches(af) {
        return Err(wrong(format!(
            "a socket of family {} and type {}",
            family_name(af),
            type_name(ty)
        )));
    }
    let listening = rustix::net::sockopt::socket_acceptconn(fd)
        .map_err(|e| io_err(name.to_owned(), raw, "getsockopt(SO_ACCEPTCONN)", e.into()))?;
    if !listening {
        return Err(wrong(format!(
            "a {} stream socket that is not listening",
            family_name(af)
        )));
    }
    Ok(())
}

fn describe_non_socket(fd: BorrowedFd<'_>) -> String {
    use rustix::fs::FileType;
    let Ok(st) = rustix::fs::fstat(fd) else {
        return "not a socket".to_owned();
    };
    let kind = match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symlink",
        FileType::Fifo => "a FIFO (pipe)",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        _ => "not a socket",
    };
    kind.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};

    const ME: u32 = 4242;

    fn env(pairs: &[(&str, &str)]) -> SystemdEnv {
        SystemdEnv::from_vars(pairs.iter().copied())
    }

    /// The planned `(name, fd)` pairs; empty when nothing was passed.
    fn planned(
        env: &SystemdEnv,
        own: Option<u64>,
    ) -> Result<Vec<(String, RawFd)>, ActivationError> {
        Ok(plan(env, ME, |pid| {
            assert_eq!(pid, ME);
            own
        })?
        .map(|p| p.fds().map(|(n, fd)| (n.to_owned(), fd)).collect())
        .unwrap_or_default())
    }

    fn plan_of(pairs: &[(&str, &str)]) -> Result<Vec<(String, RawFd)>, ActivationError> {
        planned(&env(pairs), None)
    }

    fn names_of(pairs: &[(&str, &str)]) -> Vec<String> {
        plan_of(pairs)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    fn env_var(e: ActivationError) -> &'static str {
        match e {
            ActivationError::Env(e) => e.var,
            other => panic!("expected an env error, got {other:?}"),
        }
    }

    #[test]
    fn unset_listen_pid_is_empty() {
        assert!(plan(&env(&[]), ME, |_| None).unwrap().is_none());
        assert!(plan_of(&[("LISTEN_FDS", "2")]).unwrap().is_empty());
    }

    #[test]
    fn malformed_listen_pid_is_error_naming_it() {
        for bad in ["", "0", "-1", "abc", "12x", "2147483648"] {
            let e = plan_of(&[("LISTEN_PID", bad), ("LISTEN_FDS", "1")]).unwrap_err();
            assert!(e.to_string().contains("LISTEN_PID"), "{bad:?}: {e}");
            assert_eq!(env_var(e), "LISTEN_PID", "{bad:?}");
        }
    }

    #[test]
    fn other_pid_is_empty_even_with_bad_fds() {
        // Not for us: the rest is not even looked at, as in sd-daemon.c.
        let got = plan_of(&[("LISTEN_PID", "1"), ("LISTEN_FDS", "x")]).unwrap();
        assert!(got.is_empty());
        let got = plan_of(&[("LISTEN_PID", "4243"), ("LISTEN_FDS", "1")]).unwrap();
        assert!(got.is_empty());
    }

    #[test]
    fn unset_listen_fds_is_empty_and_zero_is_einval() {
        assert!(plan_of(&[("LISTEN_PID", "4242")]).unwrap().is_empty());
        // sd_listen_fds(): n <= 0 is -EINVAL.
        let e = plan_of(&[("LISTEN_PID", "4242"), ("LISTEN_FDS", "0")]).unwrap_err();
        assert_eq!(env_var(e), "LISTEN_FDS");
    }

    #[test]
    fn malformed_listen_fds_is_error_naming_it() {
        for bad in [
            "",
            "-1",
            "+1",
            " 1",
            "1 ",
            "x",
            "0x1",
            "2147483645",
            "99999999999999999999",
        ] {
            let e = plan_of(&[("LISTEN_PID", "4242"), ("LISTEN_FDS", bad)]).unwrap_err();
            assert!(e.to_string().contains("LISTEN_FDS"), "{bad:?}: {e}");
            assert_eq!(env_var(e), "LISTEN_FDS", "{bad:?}");
        }
    }

    #[test]
    fn huge_listen_fds_is_lazy_and_stops_at_first_closed_fd() {
        // INT_MAX - 3 is the largest count sd-daemon.c accepts; nothing is allocated per fd.
        let p = plan(
            &env(&[("LISTEN_PID", "4242"), ("LISTEN_FDS", "2147483644")]),
            ME,
            |_| None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.n, 2_147_483_644);
        let mut checked = 0;
        let e = check_fds(&p, |fd| {
            checked += 1;
            if fd < 10 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(9))
            }
        })
        .unwrap_err();
        assert_eq!(checked, 8);
        assert!(matches!(e, ActivationError::BadFd { fd: 10, .. }), "{e:?}");
    }

    #[test]
    fn default_names_are_unknown_from_fd_3() {
        let got = plan_of(&[("LISTEN_PID", "4242"), ("LISTEN_FDS", "3")]).unwrap();
        let want: Vec<(String, RawFd)> = vec![
            ("unknown".into(), 3),
            ("unknown".into(), 4),
            ("unknown".into(), 5),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn fdnames_split_keeps_empty_fields() {
        let got = names_of(&[
            ("LISTEN_PID", "4242"),
            ("LISTEN_FDS", "4"),
            ("LISTEN_FDNAMES", "a::b:"),
        ]);
        assert_eq!(got, ["a", "", "b", ""]);
        let got = names_of(&[
            ("LISTEN_PID", "4242"),
            ("LISTEN_FDS", "1"),
            ("LISTEN_FDNAMES", ""),
        ]);
        assert_eq!(got, [""]);
    }

    #[test]
    fn fdnames_count_mismatch_is_error() {
        for (n, names) in [("1", "a:b"), ("3", "a:b"), ("2", "")] {
            let e = plan_of(&[
                ("LISTEN_PID", "4242"),
                ("LISTEN_FDS", n),
                ("LISTEN_FDNAMES", names),
            ])
            .unwrap_err();
            assert!(
                matches!(&e, ActivationError::NameCountMismatch { value, fds, .. }
                    if value == names && fds.to_string() == n),
                "{n} {names:?}: {e:?}"
            );
            assert!(e.to_string().contains("LISTEN_FDNAMES"), "{e}");
        }
    }

    #[test]
    fn fdnames_not_utf8_is_error() {
        use std::os::unix::ffi::OsStrExt;
        let env = env(&[("LISTEN_PID", "4242"), ("LISTEN_FDS", "1")])
            .with_var(LISTEN_FDNAMES, OsStr::from_bytes(b"\xff"));
        let e = planned(&env, None).unwrap_err();
        assert_eq!(env_var(e), "LISTEN_FDNAMES");
    }

    #[test]
    fn pidfdid_checked_when_kernel_tells() {
        let base = env(&[
            ("LISTEN_PID", "4242"),
            ("LISTEN_FDS", "1"),
            ("LISTEN_PIDFDID", "777"),
        ]);
        assert_eq!(planned(&base, Some(777)).unwrap().len(), 1);
        assert!(planned(&base, Some(778)).unwrap().is_empty());
        // Without pidfs the id cannot be checked and is ignored, as in sd-daemon.c.
        assert_eq!(planned(&base, None).unwrap().len(), 1);
    }

    #[test]
    fn malformed_pidfdid_is_error_naming_it() {
        let bad = env(&[
            ("LISTEN_PID", "4242"),
            ("LISTEN_FDS", "1"),
            ("LISTEN_PIDFDID", "x1"),
        ]);
        assert_eq!(
            env_var(planned(&bad, Some(1)).unwrap_err()),
            "LISTEN_PIDFDID"
        );
    }

    #[test]
    fn check_fds_names_the_first_bad_fd() {
        let p = plan(
            &env(&[
                ("LISTEN_PID", "4242"),
                ("LISTEN_FDS", "3"),
                ("LISTEN_FDNAMES", "a:b:c"),
            ]),
            ME,
            |_| None,
        )
        .unwrap()
        .unwrap();
        let mut seen = Vec::new();
        let e = check_fds(&p, |fd| {
            seen.push(fd);
            if fd == 4 {
                Err(io::Error::from_raw_os_error(9))
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert_eq!(seen, [3, 4]);
        match &e {
            ActivationError::BadFd { fd, name, .. } => assert_eq!((*fd, name.as_str()), (4, "b")),
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("fd 4"), "{e}");
        let mut all = Vec::new();
        check_fds(&p, |fd| {
            all.push(fd);
            Ok(())
        })
        .unwrap();
        assert_eq!(all, [3, 4, 5]);
    }

    #[test]
    fn own_pidfd_inode_id_is_stable_when_supported() {
        let a = pidfd_inode_id(std::process::id());
        let b = pidfd_inode_id(std::process::id());
        assert_eq!(a, b);
        if let Some(init) = pidfd_inode_id(1) {
            assert_ne!(
                Some(init),
                a,
                "pid 1 and this process share a pidfd inode id"
            );
        }
    }

    #[test]
    fn set_cloexec_sets_the_flag() {
        let (a, _b) = UnixStream::pair().unwrap();
        // std opens with CLOEXEC; clear it first so that the test can fail.
        rustix::io::fcntl_setfd(&a, FdFlags::empty()).unwrap();
        set_cloexec(a.as_fd()).unwrap();
        assert!(
            rustix::io::fcntl_getfd(&a)
                .unwrap()
                .contains(FdFlags::CLOEXEC)
        );
    }

    fn fds_with(name: &str, fd: impl Into<OwnedFd>) -> ListenFds {
        ListenFds::from_fds(vec![
            ("other".into(), UnixStream::pair().unwrap().0.into()),
            (name.into(), fd.into()),
        ])
    }

    #[test]
    fn take_fd_and_names() {
        let mut fds = fds_with("x", UnixStream::pair().unwrap().0);
        assert_eq!(fds.names().collect::<Vec<_>>(), ["other", "x"]);
        assert!(fds.take_fd("nope").is_none());
        assert!(fds.take_fd("x").is_some());
        assert_eq!(fds.len(), 1);
        assert_eq!(fds.into_fds().len(), 1);
    }

    #[test]
    fn not_found_lists_available_names() {
        let mut fds = fds_with("ctl", UnixStream::pair().unwrap().0);
        let e = fds.take_std_unix_listener("web").unwrap_err();
        match &e {
            ActivationError::NotFound { name, available } => {
                assert_eq!(name, "web");
                assert_eq!(available, &["other", "ctl"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("\"web\""), "{e}");
    }

    #[test]
    fn wrong_kinds_are_rejected_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("f")).unwrap();
        let dgram = UnixDatagram::bind(dir.path().join("d")).unwrap();
        let connected = UnixStream::pair().unwrap().0;
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let unix = UnixListener::bind(dir.path().join("l")).unwrap();
        let cases: Vec<(OwnedFd, Family, &str)> = vec![
            (file.into(), Family::Unix, "a regular file"),
            (dgram.into(), Family::Unix, "SOCK_DGRAM"),
            (connected.into(), Family::Unix, "not listening"),
            (
                tcp.into(),
                Family::Unix,
                "family AF_INET and type SOCK_STREAM",
            ),
            (
                unix.into(),
                Family::Inet,
                "family AF_UNIX and type SOCK_STREAM",
            ),
        ];
        for (fd, family, want) in cases {
            let raw = fd.as_raw_fd();
            let mut fds = ListenFds::from_fds(vec![("s".into(), fd)]);
            let e = fds.take_listener("s", family, false).unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(e, ActivationError::WrongKind { fd, .. } if fd == raw),
                "{msg}"
            );
            assert!(msg.contains(want), "{want:?} not in {msg:?}");
            assert!(
                msg.contains(&format!("fd {raw}")) && msg.contains("\"s\""),
                "{msg}"
            );
            assert_eq!(fds.len(), 1, "a rejected fd stays available");
        }
    }

    #[test]
    fn tokio_listener_outside_runtime_is_error() {
        let dir = tempfile::tempdir().unwrap();
        let unix = UnixListener::bind(dir.path().join("l")).unwrap();
        let mut fds = fds_with("ctl", unix);
        let e = fds.take_unix_listener("ctl").unwrap_err();
        assert!(matches!(e, ActivationError::NoRuntime { .. }), "{e:?}");
        assert_eq!(fds.len(), 2);
    }

    #[test]
    fn std_listener_is_blocking_and_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let unix = UnixListener::bind(&path).unwrap();
        unix.set_nonblocking(true).unwrap();
        let mut fds = fds_with("ctl", unix);
        let l = fds.take_std_unix_listener("ctl").unwrap();
        let flags = rustix::fs::fcntl_getfl(&l).unwrap();
        assert!(!flags.contains(rustix::fs::OFlags::NONBLOCK));
        let _c = UnixStream::connect(&path).unwrap();
        l.accept().unwrap();
        assert_eq!(fds.names().collect::<Vec<_>>(), ["other"]);
    }

    fn tcp() -> std::net::TcpListener {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap()
    }

    fn addr_of(fd: &impl AsFd) -> rustix::net::SocketAddrAny {
        rustix::net::getsockname(fd).unwrap()
    }

    #[test]
    fn or_bind_takes_the_fd_named_after_the_socket_unit() {
        let passed = tcp();
        let want = addr_of(&passed);
        let dir = tempfile::tempdir().unwrap();
        let unix = UnixListener::bind(dir.path().join("l")).unwrap();
        // systemd's name for the fd of web.socket without FileDescriptorName=.
        let mut fds = ListenFds::from_fds(vec![
            ("ctl.socket".into(), unix.into()),
            ("web.socket".into(), passed.into()),
        ]);
        let (l, source) = fds
            .std_tcp_listener_or_bind(Some("web"), "127.0.0.1:0")
            .unwrap();
        assert_eq!(
            source,
            ListenerSource::Activated {
                name: "web.socket".into()
            }
        );
        assert_eq!(addr_of(&l), want);
        assert_eq!(fds.names().collect::<Vec<_>>(), ["ctl.socket"]);
        // The exact name works as well, and wins over `NAME.socket`.
        let mut fds = ListenFds::from_fds(vec![
            ("web.socket".into(), tcp().into()),
            ("web".into(), tcp().into()),
        ]);
        let (_, source) = fds
            .std_tcp_listener_or_bind(Some("web"), "127.0.0.1:0")
            .unwrap();
        assert_eq!(source, ListenerSource::Activated { name: "web".into() });
    }

    #[test]
    fn or_bind_without_a_name_takes_the_only_fd_of_the_kind() {
        let dir = tempfile::tempdir().unwrap();
        let passed = tcp();
        let want = addr_of(&passed);
        let unix = UnixListener::bind(dir.path().join("l")).unwrap();
        let mut fds = ListenFds::from_fds(vec![
            ("ctl".into(), unix.into()),
            ("whatever".into(), passed.into()),
        ]);
        let (l, source) = fds.std_tcp_listener_or_bind(None, "127.0.0.1:0").unwrap();
        assert_eq!(
            source,
            ListenerSource::Activated {
                name: "whatever".into()
            }
        );
        assert_eq!(addr_of(&l), want);
        let (_, source) = fds
            .std_unix_listener_or_bind(None, dir.path().join("other"))
            .unwrap();
        assert_eq!(source, ListenerSource::Activated { name: "ctl".into() });
        assert!(fds.is_empty());
        assert!(!dir.path().join("other").exists(), "bound although passed");
    }

    #[test]
    fn or_bind_with_unset_names_takes_the_only_fd_of_the_kind() {
        // LISTEN_FDNAMES unset (not systemd): a name cannot match, the kind decides.
        let passed = tcp();
        let want = addr_of(&passed);
        let mut fds = ListenFds::from_fds(vec![
            (UNNAMED_FD.into(), UnixStream::pair().unwrap().0.into()),
            (UNNAMED_FD.into(), passed.into()),
        ]);
        let (l, source) = fds
            .std_tcp_listener_or_bind(Some("web"), "127.0.0.1:0")
            .unwrap();
        assert_eq!(
            source,
            ListenerSource::Activated {
                name: UNNAMED_FD.into()
            }
        );
        assert_eq!(addr_of(&l), want);
    }

    #[test]
    fn or_bind_binds_when_nothing_fits_and_leaves_other_units_fds_alone() {
        let other = tcp();
        let other_addr = addr_of(&other);
        let mut fds = ListenFds::from_fds(vec![("admin.socket".into(), other.into())]);
        let (l, source) = fds
            .std_tcp_listener_or_bind(Some("web"), "127.0.0.1:0")
            .unwrap();
        assert_eq!(source, ListenerSource::Bound);
        assert_ne!(addr_of(&l), other_addr);
        assert_eq!(fds.names().collect::<Vec<_>>(), ["admin.socket"]);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let (l, source) = ListenFds::default()
            .std_unix_listener_or_bind(None, &path)
            .unwrap();
        assert_eq!(source, ListenerSource::Bound);
        drop(UnixStream::connect(&path).unwrap());
        l.accept().unwrap();
    }

    #[test]
    fn or_bind_errors_name_what_went_wrong() {
        // Two candidates and no name to choose.
        let mut fds =
            ListenFds::from_fds(vec![("a".into(), tcp().into()), ("b".into(), tcp().into())]);
        let e = fds
            .std_tcp_listener_or_bind(None, "127.0.0.1:0")
            .unwrap_err();
        assert!(
            matches!(&e, ActivationError::Ambiguous { count: 2, names, .. } if names == &["a", "b"]),
            "{e:?}"
        );
        assert_eq!(fds.len(), 2);

        // The named fd is of another kind: an error, not a silent bind.
        let dir = tempfile::tempdir().unwrap();
        let unix = UnixListener::bind(dir.path().join("l")).unwrap();
        let mut fds = ListenFds::from_fds(vec![("web.socket".into(), unix.into())]);
        let e = fds
            .std_tcp_listener_or_bind(Some("web"), "127.0.0.1:0")
            .unwrap_err();
        assert!(matches!(e, ActivationError::WrongKind { .. }), "{e:?}");
        assert_eq!(fds.len(), 1);

        // Nothing passed and the address is taken.
        let busy = tcp();
        let addr = busy.local_addr().unwrap();
        let e = ListenFds::default()
            .std_tcp_listener_or_bind(Some("web"), addr)
            .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ActivationError::Bind { .. }), "{e:?}");
        assert!(
            msg.contains(&addr.to_string()) && msg.contains("web.socket"),
            "{msg}"
        );
        let missing = dir.path().join("no/such/dir/s");
        let e = ListenFds::default()
            .std_unix_listener_or_bind(None, &missing)
            .unwrap_err();
        assert!(e.to_string().contains("no/such/dir"), "{e}");
    }

    #[test]
    fn tokio_or_bind_outside_a_runtime_takes_nothing() {
        let mut fds = ListenFds::from_fds(vec![("web".into(), tcp().into())]);
        let e = fds
            .tcp_listener_or_bind(Some("web"), "127.0.0.1:0")
            .unwrap_err();
        assert!(matches!(e, ActivationError::NotInRuntime { .. }), "{e:?}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let e = fds.unix_listener_or_bind(None, &path).unwrap_err();
        assert!(matches!(e, ActivationError::NotInRuntime { .. }), "{e:?}");
        assert_eq!(fds.len(), 1);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn tokio_or_bind_gives_nonblocking_listeners_that_accept() {
        let passed = tcp();
        let addr = passed.local_addr().unwrap();
        let mut fds = ListenFds::from_fds(vec![("web.socket".into(), passed.into())]);
        let (l, source) = fds
            .tcp_listener_or_bind(Some("web"), "127.0.0.1:0")
            .unwrap();
        assert!(matches!(source, ListenerSource::Activated { .. }));
        let fl = rustix::fs::fcntl_getfl(&l).unwrap();
        assert!(fl.contains(rustix::fs::OFlags::NONBLOCK));
        let _c = std::net::TcpStream::connect(addr).unwrap();
        l.accept().await.unwrap();

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let (l, source) = fds.unix_listener_or_bind(Some("ctl"), &path).unwrap();
        assert_eq!(source, ListenerSource::Bound);
        assert_eq!(source.to_string(), "bound by the service");
        let _c = UnixStream::connect(&path).unwrap();
        l.accept().await.unwrap();
    }

    #[tokio::test]
    async fn tokio_unix_and_tcp_listeners_accept() {
        use std::io::Read;
        let deadline = Some(std::time::Duration::from_secs(10));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let unix = UnixListener::bind(&path).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_addr = tcp.local_addr().unwrap();
        let mut fds = ListenFds::from_fds(vec![
            ("ctl".into(), unix.into()),
            ("web".into(), tcp.into()),
        ]);
        let ul = fds.take_unix_listener("ctl").unwrap();
        let tl = fds.take_tcp_listener("web").unwrap();
        assert!(fds.is_empty());
        for fd in [ul.as_fd(), tl.as_fd()] {
            let fl = rustix::fs::fcntl_getfl(fd).unwrap();
            assert!(fl.contains(rustix::fs::OFlags::NONBLOCK));
        }

        // Clients are blocking std sockets: connecting succeeds through the backlog.
        let mut c = UnixStream::connect(&path).unwrap();
        c.set_read_timeout(deadline).unwrap();
        let (s, _) = ul.accept().await.unwrap();
        // Without tokio's `io-util` feature: wait for writability, then write.
        s.writable().await.unwrap();
        assert_eq!(s.try_write(b"u").unwrap(), 1);
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"u");

        let mut c = std::net::TcpStream::connect(tcp_addr).unwrap();
        c.set_read_timeout(deadline).unwrap();
        let (s, _) = tl.accept().await.unwrap();
        s.writable().await.unwrap();
        assert_eq!(s.try_write(b"t").unwrap(), 1);
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"t");
    }
}
