//! The daemon's listening socket: taken from systemd (socket activation) or bound at a path.
//!
//! Binding a path is done the careful way:
//!
//! 1. the parent directory is created with mode 0700 if it is missing;
//! 2. `PATH.lock` is locked (`flock`), so that two daemons never fight over one path;
//! 3. an existing file at the path is removed only if it is a socket that nobody answers on
//!    (`ECONNREFUSED`): a stale socket from a daemon that died. Anything else is an error;
//! 4. the socket is bound, then given its group and mode (0600, or 0660 with a group)
//!    explicitly, whatever the umask, and only then starts listening: until `listen(2)` a
//!    connection is refused, so nobody can connect through the looser mode `bind(2)` created.
//!
//! The returned [`SocketFile`] removes the socket on drop, if it is still the one bound and
//! nobody answers on it any more, and the lock file. A failed bind removes the lock file too.

use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, Mode};
use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use watchkeeper::activation::{ActivationError, ListenFds};

/// The `FileDescriptorName=` the daemon looks for in a socket-activated start.
pub const ACTIVATION_NAME: &str = "daemon";

/// `listen(2)` backlog (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 1024;

/// The socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenerError {
    /// A passed fd could not be used as the listener.
    #[error("socket activation")]
    Activation(#[source] ActivationError),
    /// Several fds were passed and none is named [`ACTIVATION_NAME`].
    #[error(
        "socket activation passed {count} fds named {names:?} and none is named {ACTIVATION_NAME:?} (FileDescriptorName= in the .socket unit)"
    )]
    NoDaemonFd {
        /// How many.
        count: usize,
        /// Their names.
        names: Vec<String>,
    },
    /// The socket's directory could not be created.
    #[error("cannot create the socket directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The lock file could not be opened or locked.
    #[error("cannot lock {path}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another daemon holds the lock.
    #[error("another watchkeeper-daemon holds {path}; is it already running on {socket}?")]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// The socket path.
        socket: PathBuf,
    },
    /// Something answers on the socket.
    #[error("{path} is in use: something answers on it")]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The path exists and is not a socket.
    #[error("{path} exists and is not a socket; not removing it")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A system call on the socket path failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The group for the socket does not exist.
    #[error("unknown group {name:?} (--socket-group)")]
    UnknownGroup {
        /// The name given.
        name: String,
    },
    /// The group database could not be read.
    #[error("cannot look up group {name:?} (--socket-group)")]
    GroupLookup {
        /// The name given.
        name: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ListenerError + use<> {
    let path = path.to_owned();
    move |source| ListenerError::Io { op, path, source }
}

fn errno_err(op: &'static str, path: &Path) -> impl FnOnce(Errno) -> ListenerError + use<> {
    let io = io_err(op, path);
    move |e| io(e.into())
}

/// Resolves `--socket-group`: a group name (through NSS, as `getgrnam(3)`) or a numeric gid.
pub fn resolve_group(name: &str) -> Result<u32, ListenerError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(ListenerError::UnknownGroup {
            name: name.to_owned(),
        }),
        Err(e) => Err(ListenerError::GroupLookup {
            name: name.to_owned(),
            source: e.into(),
        }),
    }
}

/// Takes the listener from socket-activation fds: the one named [`ACTIVATION_NAME`], or the
/// only one. `Ok(None)` when no fds were passed. Other passed fds stay in `fds`.
///
/// Must be called inside a tokio runtime.
pub fn from_activation(
    fds: &mut ListenFds,
) -> Result<Option<tokio::net::UnixListener>, ListenerError> {
    if fds.is_empty() {
        return Ok(None);
    }
    let name = if fds.names().any(|n| n == ACTIVATION_NAME) {
        ACTIVATION_NAME.to_owned()
    } else if let (1, Some(only)) = (fds.len(), fds.names().next()) {
        only.to_owned()
    } else {
        return Err(ListenerError::NoDaemonFd {
            count: fds.len(),
            names: fds.names().map(str::to_owned).collect(),
        });
    };
    fds.take_unix_listener(&name)
        .map(Some)
        .map_err(ListenerError::Activation)
}

/// A socket file this process bound: removed on drop if it is still the same file. Holds the
/// `PATH.lock` lock.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
    _lock: LockFile,
}

/// The locked `PATH.lock`: removed (while still locked) on drop, so that no lock file is left
/// behind, whether the daemon stops or fails to set up its socket.
#[derive(Debug)]
struct LockFile {
    path: PathBuf,
    _fd: OwnedFd,
}

impl Drop for LockFile {
    fn drop(&mut self) {
        // Still holding the lock: a daemon starting now either locked nothing yet (and creates
        // a fresh file) or fails on our lock, as it would have anyway.
        let _ = std::fs::remove_file(&self.path);
    }
}

impl SocketFile {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Ours (same inode) and dead (the listener is closed by now): an inode number can be
        // reused, so a live socket someone else bound there is left alone.
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && m.dev() == self.dev
            && m.ino() == self.ino
            && matches!(probe(&self.path), Ok(Probe::Refused))
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The lock file next to `socket`.
pub fn lock_path(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Binds and listens at `path` as the [module documentation](self) describes: mode 0600, or
/// 0660 and group `group` when given. Must be called inside a tokio runtime.
pub fn bind(
    path: &Path,
    group: Option<u32>,
) -> Result<(tokio::net::UnixListener, SocketFile), ListenerError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| ListenerError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
    }
    let lock = take_lock(path)?;
    remove_stale(path)?;

    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(errno_err("cannot create a socket for", path))?;
    let addr = SocketAddrUnix::new(path).map_err(errno_err("invalid socket path", path))?;
    rustix::net::bind(&fd, &addr).map_err(errno_err("cannot bind", path))?;
    let meta = std::fs::symlink_metadata(path).map_err(io_err("cannot stat", path))?;
    // From here on, the file is ours: removed on any error below.
    let file = SocketFile {
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
        _lock: lock,
    };
    let mode = match group {
        Some(gid) => {
            rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid)))
                .map_err(errno_err("cannot change the group of", path))?;
            0o660
        }
        None => 0o600,
    };
    rustix::fs::chmod(path, Mode::from_raw_mode(mode))
        .map_err(errno_err("cannot set the mode of", path))?;
    rustix::net::listen(&fd, BACKLOG).map_err(errno_err("cannot listen on", path))?;
    let listener = tokio::net::UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))
        .map_err(io_err("cannot register with tokio", path))?;
    Ok((listener, file))
}

fn take_lock(socket: &Path) -> Result<LockFile, ListenerError> {
    let path = lock_path(socket);
    let lock_err = |source| ListenerError::Lock {
        path: path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(lock_err)?;
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(LockFile {
            path,
            _fd: file.into(),
        }),
        Err(Errno::WOULDBLOCK) => Err(ListenerError::Locked {
            path: path.clone(),
            socket: socket.to_owned(),
        }),
        Err(e) => Err(lock_err(e.into())),
    }
}

/// Removes a stale socket at `path`; see the [module documentation](self).
fn remove_stale(path: &Path) -> Result<(), ListenerError> {
    use std::os::unix::fs::FileTypeExt as _;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("cannot stat", path)(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ListenerError::NotASocket {
            path: path.to_owned(),
        });
    }
    match probe(path) {
        Ok(Probe::Answers) => Err(ListenerError::InUse {
            path: path.to_owned(),
        }),
        Ok(Probe::Refused) => {
            tracing::info!(path = %path.display(), "removing a stale socket nobody answers on");
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_err("cannot remove the stale socket", path)(e)),
            }
        }
        Ok(Probe::Gone) => Ok(()),
        Err(e) => Err(errno_err("cannot probe the existing socket", path)(e)),
    }
}

/// What connecting to a socket path found.
enum Probe {
    /// Something listens (or its backlog is full).
    Answers,
    /// A socket file nobody listens on.
    Refused,
    /// No such file.
    Gone,
}

/// Connects to `path` without blocking: a live daemon with a full backlog answers `EAGAIN`
/// rather than making the probe wait.
fn probe(path: &Path) -> Result<Probe, Errno> {
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    match rustix::net::connect(&fd, &SocketAddrUnix::new(path)?) {
        Ok(()) | Err(Errno::AGAIN) | Err(Errno::INPROGRESS) => Ok(Probe::Answers),
        Err(Errno::CONNREFUSED) => Ok(Probe::Refused),
        Err(Errno::NOENT) => Ok(Probe::Gone),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn binds_0600_whatever_the_umask_and_removes_the_file_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/sub/daemon.sock");
        let old = rustix::process::umask(Mode::from_raw_mode(0));
        let bound = bind(&path, None);
        rustix::process::umask(old);
        let (listener, file) = bound.unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("run/sub")), 0o700);
        let client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let (_server, _) = listener.accept().await.unwrap();
        drop(client);
        // A second bind on the same path is refused by the lock.
        let e = bind(&path, None).unwrap_err();
        assert!(matches!(e, ListenerError::Locked { .. }), "{e}");
        drop(listener);
        drop(file);
        assert!(!path.exists());
        assert!(!lock_path(&path).exists(), "the lock file stays");
    }

    #[tokio::test]
    async fn a_failed_bind_leaves_no_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.sock");
        std::fs::write(&path, "not a socket").unwrap();
        let e = bind(&path, None).unwrap_err();
        assert!(matches!(e, ListenerError::NotASocket { .. }), "{e}");
        assert!(!lock_path(&path).exists(), "the lock file stays");
    }

    #[tokio::test]
    async fn socket_group_gives_0660_and_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.sock");
        let gid = rustix::process::getgid().as_raw();
        let (_l, _f) = bind(&path, Some(gid)).unwrap();
        assert_eq!(mode(&path), 0o660);
        assert_eq!(std::fs::metadata(&path).unwrap().gid(), gid);
        assert_eq!(resolve_group(&gid.to_string()).unwrap(), gid);
        assert_eq!(resolve_group("root").unwrap(), 0);
        let e = resolve_group("no-such-group-wk").unwrap_err();
        assert!(e.to_string().contains("no-such-group-wk"), "{e}");
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_a_live_one_or_a_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.sock");
        // Stale: bound, never listening, and closed: connecting is refused.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (l, f) = bind(&path, None).unwrap();
        drop((l, f));

        // Live: something answers, and it has no lock (another program).
        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let e = bind(&path, None).unwrap_err();
        assert!(matches!(e, ListenerError::InUse { .. }), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        drop(live);
        std::fs::remove_file(&path).unwrap();

        // A regular file is never removed.
        std::fs::write(&path, "precious").unwrap();
        let e = bind(&path, None).unwrap_err();
        assert!(matches!(e, ListenerError::NotASocket { .. }), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }

    #[tokio::test]
    async fn drop_leaves_a_socket_that_replaced_ours_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.sock");
        let (l, f) = bind(&path, None).unwrap();
        drop(l);
        std::fs::remove_file(&path).unwrap();
        let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(f);
        assert!(path.exists());
        drop(other);
    }

    #[tokio::test]
    async fn activation_takes_the_named_or_the_only_fd() {
        use std::os::fd::OwnedFd;
        let dir = tempfile::tempdir().unwrap();
        let listener = |name: &str| {
            let l = std::os::unix::net::UnixListener::bind(dir.path().join(name)).unwrap();
            (name.to_owned(), OwnedFd::from(l))
        };
        assert!(
            from_activation(&mut ListenFds::default())
                .unwrap()
                .is_none()
        );
        let mut only = ListenFds::from_fds(vec![listener("whatever")]);
        assert!(from_activation(&mut only).unwrap().is_some());
        let mut named = ListenFds::from_fds(vec![listener("metrics"), listener("daemon")]);
        assert!(from_activation(&mut named).unwrap().is_some());
        assert_eq!(named.names().collect::<Vec<_>>(), ["metrics"]);
        let mut neither = ListenFds::from_fds(vec![listener("a"), listener("b")]);
        let e = from_activation(&mut neither).unwrap_err();
        assert!(
            matches!(e, ListenerError::NoDaemonFd { count: 2, .. }),
            "{e}"
        );
    }
}
