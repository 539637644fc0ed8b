//! Reading small files that someone else controls (configurations, credentials) safely.
//!
//! [`read_regular_file_bounded`] never blocks in `open(2)` (a FIFO opened for reading would
//! wait for a writer, and a process stuck there ignores nothing but `SIGKILL`), never makes a
//! terminal its controlling one, never leaks the fd into a child, reads only regular files, and
//! never reads more than its limit: `/dev/zero` as a configuration is an error, not an
//! out-of-memory kill.
//!
//! ```
//! use watchkeeper::fsutil::read_regular_file_bounded;
//! let e = read_regular_file_bounded("/dev/zero", 1024).unwrap_err();
//! assert!(e.to_string().contains("/dev/zero is a character device, not a regular file"));
//! ```

use std::io::{self, Read as _};
use std::path::Path;

use rustix::fs::{FileType, Mode, OFlags};

/// Reads the regular file at `path`, at most `max_bytes` bytes.
///
/// The file is opened with `O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC`, then checked with
/// `fstat(2)` on the open fd (so that it cannot be swapped between the check and the read).
///
/// # Errors
///
/// The error of `open(2)` or `read(2)` as it is (its kind kept, e.g.
/// [`io::ErrorKind::NotFound`]; the caller names the file), or an error whose message names
/// `path`:
///
/// * [`io::ErrorKind::InvalidInput`]: not a regular file (a FIFO, a device, a directory, a
///   socket), e.g. "/dev/zero is a character device, not a regular file";
/// * [`io::ErrorKind::FileTooLarge`]: larger than `max_bytes`, e.g. "/etc/x.toml is larger
///   than 1048576 bytes".
pub fn read_regular_file_bounded(path: impl AsRef<Path>, max_bytes: u64) -> io::Result<Vec<u8>> {
    let path = path.as_ref();
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let stat = rustix::fs::fstat(&fd)?;
    let kind = FileType::from_raw_mode(stat.st_mode);
    if kind != FileType::RegularFile {
        let what = match kind {
            FileType::Directory => "a directory",
            FileType::Fifo => "a FIFO",
            FileType::CharacterDevice => "a character device",
            FileType::BlockDevice => "a block device",
            FileType::Socket => "a socket",
            _ => "not a plain file",
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is {what}, not a regular file", path.display()),
        ));
    }
    let mut file = std::fs::File::from(fd);
    let capacity = u64::try_from(stat.st_size).unwrap_or(0).min(max_bytes);
    let mut buf = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
    (&mut file)
        .take(max_bytes.saturating_add(1))
        .read_to_end(&mut buf)?;
    if buf.len() as u64 > max_bytes {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("{} is larger than {max_bytes} bytes", path.display()),
        ));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn reads_a_file_up_to_the_limit_inclusive() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("at");
        std::fs::write(&at, b"12345").unwrap();
        assert_eq!(read_regular_file_bounded(&at, 5).unwrap(), b"12345");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(read_regular_file_bounded(&empty, 0).unwrap(), b"");
    }

    #[test]
    fn an_oversize_file_names_the_path_and_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'x'; 4097]).unwrap();
        let e = read_regular_file_bounded(&big, 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge);
        assert_eq!(
            e.to_string(),
            format!("{} is larger than 4096 bytes", big.display())
        );
    }

    #[test]
    fn dev_zero_is_refused_without_reading_it() {
        let e = read_regular_file_bounded("/dev/zero", u64::MAX).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            e.to_string(),
            "/dev/zero is a character device, not a regular file"
        );
    }

    #[test]
    fn a_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_regular_file_bounded(dir.path(), 100).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(
            e.to_string()
                .ends_with("is a directory, not a regular file"),
            "{e}"
        );
    }

    #[test]
    fn a_fifo_without_a_writer_does_not_block_open() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        // On another thread, so that a blocking open fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(read_regular_file_bounded(&path, 100));
        });
        let result = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("open(2) of a FIFO blocked");
        let e = result.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            e.to_string(),
            format!("{} is a FIFO, not a regular file", fifo.display())
        );
    }

    #[test]
    fn a_missing_file_keeps_its_kind() {
        let e = read_regular_file_bounded("/nonexistent/wk", 100).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
