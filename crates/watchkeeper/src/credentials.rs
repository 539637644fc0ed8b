//! Service credentials from `$CREDENTIALS_DIRECTORY`.
//!
//! A unit's `LoadCredential=`, `LoadCredentialEncrypted=`, `SetCredential=` and
//! `ImportCredential=` settings make systemd place one file per credential in a private,
//! read-only directory and pass its path as `$CREDENTIALS_DIRECTORY` (see
//! [systemd.exec(5)](https://www.freedesktop.org/software/systemd/man/latest/systemd.exec.html#Credentials)
//! and [systemd.creds](https://systemd.io/CREDENTIALS/)). [`Credentials`] reads them by name:
//!
//! ```
//! use watchkeeper::{SystemdEnv, credentials::{Credentials, CredentialError}};
//! let creds = Credentials::from_env(&SystemdEnv::from_vars([("PATH", "/bin")]));
//! // Not running under a unit with credentials: the error says what to add to the unit.
//! let err = creds.read_trimmed("db-password").unwrap_err();
//! assert!(matches!(err, CredentialError::NotConfigured { .. }));
//! assert!(err.to_string().contains("LoadCredential="));
//! ```
//!
//! # Caveats
//!
//! - A credential is read whole into memory and is not zeroed when dropped; reads are capped at
//!   [`MAX_CREDENTIAL_SIZE`] (1 MiB, systemd's limit per credential in v252), and only regular
//!   files are read: a FIFO or a device is an error, never a read that blocks or does not end
//!   ([`crate::fsutil::read_regular_file_bounded`]).
//! - Errors name the credential and the directory, never the content.
//! - Secrets are often written with `echo` and end in a newline: [`Credentials::read_trimmed`]
//!   removes exactly one trailing `\n` or `\r\n`, [`Credentials::read_string`] keeps it.

use std::io;
use std::path::{Path, PathBuf};

use crate::SystemdEnv;

/// The largest credential [`Credentials::read`] accepts, in bytes (1 MiB).
pub const MAX_CREDENTIAL_SIZE: u64 = 1024 * 1024;

/// Longest credential name systemd accepts (`NAME_MAX`).
const NAME_MAX: usize = 255;

/// Why a credential could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// `$CREDENTIALS_DIRECTORY` is not set: the unit passes no credentials.
    #[error(
        "credential {name:?} requested but $CREDENTIALS_DIRECTORY is not set; pass it from the \
         unit with LoadCredential={name}:/path/to/file or SetCredential={name}:value \
         (systemd.exec(5))"
    )]
    NotConfigured {
        /// The credential's name.
        name: String,
    },
    /// The name is empty, longer than 255 bytes, contains `/`, or is `.` or `..`.
    #[error(
        "invalid credential name {name:?}: must be 1 to 255 bytes, without '/', and not . or .."
    )]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// No credential of that name was passed.
    #[error(
        "credential {name:?} not found in {dir}; is LoadCredential={name}:… or SetCredential=\
         {name}:… in the unit?",
        dir = dir.display()
    )]
    NotFound {
        /// The credential's name.
        name: String,
        /// The credentials directory.
        dir: PathBuf,
    },
    /// The credential is larger than the limit.
    #[error("credential {name:?} is larger than {limit} bytes")]
    TooLarge {
        /// The credential's name.
        name: String,
        /// The limit, in bytes.
        limit: u64,
    },
    /// [`Credentials::read_string`] or [`Credentials::read_trimmed`] found bytes that are not
    /// UTF-8.
    #[error("credential {name:?} is not valid UTF-8")]
    NotUtf8 {
        /// The credential's name.
        name: String,
    },
    /// Opening or reading the file failed.
    #[error("cannot read credential {name:?} from {path}", path = path.display())]
    Io {
        /// The credential's name.
        name: String,
        /// The credential's file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// The credentials passed to this service, looked up by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    dir: Option<PathBuf>,
}

/// Whether systemd would accept `name` as a credential name (`credential_name_valid()`): a
/// valid file name of at most 255 bytes.
fn name_valid(name: &str) -> bool {
    !name.is_empty() && name.len() <= NAME_MAX && !name.contains('/') && name != "." && name != ".."
}

impl Credentials {
    /// The credentials in `$CREDENTIALS_DIRECTORY`, if it is set.
    pub fn from_env(env: &SystemdEnv) -> Self {
        Self::new(env.credentials_directory().map(Path::to_path_buf))
    }

    /// The credentials in `dir`; `None` behaves as an unset `$CREDENTIALS_DIRECTORY`.
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    /// The credentials directory, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The path of credential `name`, e.g. for a library that wants a key file. Whether the file
    /// exists is not checked.
    ///
    /// # Errors
    ///
    /// [`CredentialError::InvalidName`] or [`CredentialError::NotConfigured`].
    pub fn path(&self, name: &str) -> Result<PathBuf, CredentialError> {
        if !name_valid(name) {
            return Err(CredentialError::InvalidName {
                name: name.to_owned(),
            });
        }
        let dir = self
            .dir
            .as_deref()
            .ok_or_else(|| CredentialError::NotConfigured {
                name: name.to_owned(),
            })?;
        Ok(dir.join(name))
    }

    /// The exact bytes of credential `name`.
    ///
    /// # Errors
    ///
    /// [`CredentialError::InvalidName`], [`CredentialError::NotConfigured`],
    /// [`CredentialError::NotFound`], [`CredentialError::TooLarge`] (over
    /// [`MAX_CREDENTIAL_SIZE`]) or [`CredentialError::Io`].
    pub fn read(&self, name: &str) -> Result<Vec<u8>, CredentialError> {
        let path = self.path(name)?;
        let io_err = |path: PathBuf, source| CredentialError::Io {
            name: name.to_owned(),
            path,
            source,
        };
        // Bounded and non-blocking: a FIFO or a device in the directory is an error, not a
        // hang or an unbounded read.
        match crate::fsutil::read_regular_file_bounded(&path, MAX_CREDENTIAL_SIZE) {
            Ok(buf) => Ok(buf),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(CredentialError::NotFound {
                name: name.to_owned(),
                dir: self.dir.clone().unwrap_or_default(),
            }),
            Err(e) if e.kind() == io::ErrorKind::FileTooLarge => Err(CredentialError::TooLarge {
                name: name.to_owned(),
                limit: MAX_CREDENTIAL_SIZE,
            }),
            Err(e) => Err(io_err(path, e)),
        }
    }

    /// The exact content of credential `name`, which must be UTF-8.
    ///
    /// # Errors
    ///
    /// Those of [`Credentials::read`], and [`CredentialError::NotUtf8`].
    pub fn read_string(&self, name: &str) -> Result<String, CredentialError> {
        String::from_utf8(self.read(name)?).map_err(|_| CredentialError::NotUtf8 {
            name: name.to_owned(),
        })
    }

    /// The content of credential `name` without one trailing `\n` or `\r\n`, the way a secret
    /// written with `echo` is meant. Other white space is kept.
    ///
    /// # Errors
    ///
    /// As for [`Credentials::read_string`].
    pub fn read_trimmed(&self, name: &str) -> Result<String, CredentialError> {
        let mut s = self.read_string(name)?;
        if s.ends_with('\n') {
            s.pop();
            if s.ends_with('\r') {
                s.pop();
            }
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds_with(files: &[(&str, &[u8])]) -> (tempfile::TempDir, Credentials) {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        let env = SystemdEnv::from_vars([("CREDENTIALS_DIRECTORY", dir.path())]);
        let creds = Credentials::from_env(&env);
        assert_eq!(creds.dir(), Some(dir.path()));
        (dir, creds)
    }

    #[test]
    fn reads_exact_bytes_string_and_trimmed() {
        let (_d, c) = creds_with(&[
            ("pw", b"s3cret\n"),
            ("crlf", b"tok\r\n"),
            ("two", b"a\n\n"),
            ("raw", b"\x00\xffbin"),
            ("spaces", b" x \n"),
            ("empty", b""),
        ]);
        assert_eq!(c.read("pw").unwrap(), b"s3cret\n");
        assert_eq!(c.read_string("pw").unwrap(), "s3cret\n");
        assert_eq!(c.read_trimmed("pw").unwrap(), "s3cret");
        assert_eq!(c.read_trimmed("crlf").unwrap(), "tok");
        assert_eq!(c.read_trimmed("two").unwrap(), "a\n");
        assert_eq!(c.read_trimmed("spaces").unwrap(), " x ");
        assert_eq!(c.read_trimmed("empty").unwrap(), "");
        assert_eq!(c.read("raw").unwrap(), b"\x00\xffbin");
    }

    #[test]
    fn not_utf8_names_the_credential() {
        let (_d, c) = creds_with(&[("raw", b"\xff\xfe")]);
        let e = c.read_string("raw").unwrap_err();
        assert!(
            matches!(&e, CredentialError::NotUtf8 { name } if name == "raw"),
            "{e:?}"
        );
        assert!(e.to_string().contains("\"raw\""), "{e}");
        assert!(matches!(
            c.read_trimmed("raw"),
            Err(CredentialError::NotUtf8 { .. })
        ));
    }

    #[test]
    fn not_configured_says_what_to_add_to_the_unit() {
        let c = Credentials::from_env(&SystemdEnv::default());
        assert_eq!(c.dir(), None);
        let e = c.read("db").unwrap_err();
        assert!(matches!(&e, CredentialError::NotConfigured { name } if name == "db"));
        let msg = e.to_string();
        assert!(msg.contains("CREDENTIALS_DIRECTORY"), "{msg}");
        assert!(msg.contains("LoadCredential=db:"), "{msg}");
        assert!(msg.contains("SetCredential=db:"), "{msg}");
    }

    #[test]
    fn invalid_names_are_rejected_before_touching_the_disk() {
        let (_d, c) = creds_with(&[("ok", b"x")]);
        let long = "a".repeat(256);
        for bad in ["", ".", "..", "a/b", "/etc/passwd", "../ok", long.as_str()] {
            let e = c.read(bad).unwrap_err();
            assert!(
                matches!(&e, CredentialError::InvalidName { name } if name == bad),
                "{bad:?}: {e:?}"
            );
        }
        // Invalid even when no directory is configured.
        assert!(matches!(
            Credentials::new(None).read("a/b"),
            Err(CredentialError::InvalidName { .. })
        ));
        // 255 bytes and dots inside a name are fine.
        assert!(matches!(
            c.read(&"a".repeat(255)),
            Err(CredentialError::NotFound { .. })
        ));
        assert!(matches!(
            c.read("..."),
            Err(CredentialError::NotFound { .. })
        ));
    }

    #[test]
    fn missing_names_credential_and_directory() {
        let (d, c) = creds_with(&[]);
        let e = c.read("tls.key").unwrap_err();
        match &e {
            CredentialError::NotFound { name, dir } => {
                assert_eq!(name, "tls.key");
                assert_eq!(dir, d.path());
            }
            other => panic!("{other:?}"),
        }
        let msg = e.to_string();
        assert!(msg.contains("tls.key") && msg.contains(&d.path().display().to_string()));
    }

    #[test]
    fn size_limit_is_inclusive() {
        let limit = usize::try_from(MAX_CREDENTIAL_SIZE).unwrap();
        let at = vec![b'a'; limit];
        let over = vec![b'a'; limit + 1];
        let (_d, c) = creds_with(&[("at", &at), ("over", &over)]);
        assert_eq!(c.read("at").unwrap().len(), limit);
        let e = c.read("over").unwrap_err();
        assert!(
            matches!(&e, CredentialError::TooLarge { name, limit } if name == "over" && *limit == MAX_CREDENTIAL_SIZE),
            "{e:?}"
        );
    }

    #[test]
    fn directory_instead_of_file_is_io_error_with_path() {
        let (d, c) = creds_with(&[]);
        std::fs::create_dir(d.path().join("sub")).unwrap();
        let e = c.read("sub").unwrap_err();
        match &e {
            CredentialError::Io { name, path, .. } => {
                assert_eq!(name, "sub");
                assert_eq!(path, &d.path().join("sub"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_fifo_or_a_device_is_refused_without_blocking_or_reading_forever() {
        let (d, c) = creds_with(&[]);
        let fifo = d.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        std::os::unix::fs::symlink("/dev/zero", d.path().join("zero")).unwrap();
        // On another thread, so that a blocking open fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send((c.read("fifo"), c.read("zero")));
        });
        let (fifo, zero) = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("reading a FIFO credential blocked");
        for (e, what) in [
            (fifo.unwrap_err(), "a FIFO"),
            (zero.unwrap_err(), "a character device"),
        ] {
            match &e {
                CredentialError::Io { source, .. } => {
                    assert_eq!(source.kind(), io::ErrorKind::InvalidInput, "{e}");
                    assert!(source.to_string().contains(what), "{source}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn path_joins_without_checking_existence() {
        let c = Credentials::new(Some("/run/credentials/x.service".into()));
        assert_eq!(
            c.path("key").unwrap(),
            Path::new("/run/credentials/x.service/key")
        );
        assert!(matches!(
            Credentials::new(None).path("key"),
            Err(CredentialError::NotConfigured { .. })
        ));
    }
}
