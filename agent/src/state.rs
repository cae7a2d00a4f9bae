//! The agent's state directory: its key, certificate, the collector's CA and where to reach it.
//!
//! ```text
//! DIR/agent.key    private key, 0600, made on this host, never sent anywhere
//! DIR/agent.crt    certificate signed by the collector's CA at enrollment
//! DIR/ca.crt       the collector's CA, pinned at enrollment
//! DIR/agent.toml   agent id and collector addresses
//! DIR/maintainers.pem  maintainer public keys pinned at enrollment (signers of rule bundles)
//! DIR/bundle.bin   the last rule bundle applied (signed; checked again at every start)
//! DIR/spool/       detections waiting for the collector's ack (see `spool`)
//! DIR/scan-cache.bin  scan results (full scans and real time): unchanged files are not scanned,
//!                  and their matches not reported, again
//! ```

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What can go wrong with a state directory; every variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("`{dir}` holds no enrollment; run `vedette-agent enroll --state-dir {dir}` first", dir = .0.display())]
    NotEnrolled(PathBuf),
    #[error("cannot read `{}`: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write `{}`: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the state directory `{}`: {source}", path.display())]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid `{}`: {source}", path.display())]
    Invalid {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("`{}` lists no collector", .0.display())]
    NoCollector(PathBuf),
    #[error("the state directory `{}` {why}: whoever can write there can change what this agent trusts and loads; {fix}", path.display())]
    DirUnsafe {
        path: PathBuf,
        why: String,
        fix: String,
    },
    #[error("`{path}` is readable by others (mode {mode:o}); run `chmod 600 {path}`", path = path.display())]
    KeyMode { path: PathBuf, mode: u32 },
}

/// `DIR/agent.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrollment {
    /// The id the collector assigned (also in the certificate).
    pub agent_id: String,
    /// Collector addresses (`host:port`), tried in order.
    pub collectors: Vec<String>,
}

/// Paths inside a state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub dir: PathBuf,
}

/// What `run` needs from the state directory, loaded and checked.
pub struct Credentials {
    pub enrollment: Enrollment,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl StateDir {
    pub fn new(dir: &Path) -> StateDir {
        StateDir {
            dir: dir.to_owned(),
        }
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("agent.key")
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.join("agent.crt")
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn enrollment(&self) -> PathBuf {
        self.dir.join("agent.toml")
    }
    pub fn spool(&self) -> PathBuf {
        self.dir.join("spool")
    }
    pub fn maintainers(&self) -> PathBuf {
        self.dir.join("maintainers.pem")
    }
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle.bin")
    }
    pub fn scan_cache(&self) -> PathBuf {
        self.dir.join("scan-cache.bin")
    }
    pub fn history(&self) -> PathBuf {
        self.dir.join("history")
    }

    /// Creates the directory (0700) if needed.
    pub fn create(&self) -> Result<(), StateError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|source| StateError::Create {
                path: self.dir.clone(),
                source,
            })
    }

    pub fn is_enrolled(&self) -> bool {
        self.cert().exists() && self.enrollment().exists()
    }

    /// Replaces the key and certificate with renewed ones. Both are written beside the old
    /// ones first; the key is renamed into place, then the certificate. A stop between the two
    /// renames is finished by [`load`](Self::load), one before them leaves the old pair.
    pub fn replace_credentials(&self, cert_pem: &str, key_pem: &str) -> Result<(), StateError> {
        let (new_key, new_cert) = (
            self.key().with_extension("key.new"),
            self.cert().with_extension("crt.new"),
        );
        write_atomic(&new_cert, cert_pem.as_bytes(), 0o644)?;
        write_atomic(&new_key, key_pem.as_bytes(), 0o600)?;
        fs::rename(&new_key, self.key()).map_err(|source| StateError::Write {
            path: self.key(),
            source,
        })?;
        fs::rename(&new_cert, self.cert()).map_err(|source| StateError::Write {
            path: self.cert(),
            source,
        })?;
        if let Ok(d) = fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Finishes or forgets a renewal a stop interrupted (see
    /// [`replace_credentials`](Self::replace_credentials)).
    fn finish_renewal(&self) -> Result<(), StateError> {
        let (new_key, new_cert) = (
            self.key().with_extension("key.new"),
            self.cert().with_extension("crt.new"),
        );
        match (new_key.exists(), new_cert.exists()) {
            // The new key is in place already: its certificate must follow.
            (false, true) => {
                fs::rename(&new_cert, self.cert()).map_err(|source| StateError::Write {
                    path: self.cert(),
                    source,
                })
            }
            // Nothing was renamed: the old pair is whole.
            (true, _) => {
                let _ = fs::remove_file(&new_key);
                let _ = fs::remove_file(&new_cert);
                Ok(())
            }
            (false, false) => Ok(()),
        }
    }

    /// Loads everything `run` needs; fails closed with the file at fault.
    /// This agent's id and organisation, as enrolled (empty when not enrolled): read from
    /// `agent.toml` and the certificate, changing nothing.
    pub fn identity(&self) -> (String, String) {
        let id = std::fs::read_to_string(self.enrollment())
            .ok()
            .and_then(|t| toml::from_str::<Enrollment>(&t).ok())
            .map(|e| e.agent_id)
            .unwrap_or_default();
        let org = std::fs::read_to_string(self.cert())
            .map(|pem| org_of_cert(&pem))
            .unwrap_or_default();
        (id, org)
    }

    pub fn load(&self) -> Result<Credentials, StateError> {
        if !self.is_enrolled() {
            return Err(StateError::NotEnrolled(self.dir.clone()));
        }
        self.check_private()?;
        self.finish_renewal()?;
        let text = read(&self.enrollment())?;
        let enrollment: Enrollment =
            toml::from_str(&text).map_err(|source| StateError::Invalid {
                path: self.enrollment(),
                source,
            })?;
        if enrollment.collectors.is_empty() {
            return Err(StateError::NoCollector(self.enrollment()));
        }
        let key_path = self.key();
        let mode = fs::metadata(&key_path)
            .map_err(|source| StateError::Read {
                path: key_path.clone(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(StateError::KeyMode {
                path: key_path,
                mode: mode & 0o777,
            });
        }
        Ok(Credentials {
            enrollment,
            ca_pem: read(&self.ca())?,
            cert_pem: read(&self.cert())?,
            key_pem: read(&key_path)?,
        })
    }
}

fn read(path: &Path) -> Result<String, StateError> {
    fs::read_to_string(path).map_err(|source| StateError::Read {
        path: path.to_owned(),
        source,
    })
}

impl StateDir {
    /// The directory must be a real directory, owned by this process's user and writable by
    /// no one else: it holds the key, the pinned keys and the compiled rules the agent loads.
    fn check_private(&self) -> Result<(), StateError> {
        use std::os::unix::fs::MetadataExt;
        let path = self.dir.clone();
        let meta = fs::symlink_metadata(&path).map_err(|source| StateError::Read {
            path: path.clone(),
            source,
        })?;
        let me = fs::metadata("/proc/self")
            .map(|m| m.uid())
            .unwrap_or(u32::MAX);
        let unsafe_dir = |why: String, fix: String| StateError::DirUnsafe {
            path: path.clone(),
            why,
            fix,
        };
        if !meta.is_dir() {
            return Err(unsafe_dir(
                "is not a directory (a symlink?)".into(),
                "use the real directory".into(),
            ));
        }
        if meta.uid() != me {
            return Err(unsafe_dir(
                format!("is owned by uid {}, not by this user ({me})", meta.uid()),
                format!("run `chown {me} {}`", path.display()),
            ));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(unsafe_dir(
                format!("is writable by others (mode {:o})", meta.mode() & 0o777),
                format!("run `chmod 700 {}`", path.display()),
            ));
        }
        Ok(())
    }
}

/// Writes `contents` to `path` atomically (temporary file, fsync, rename) with `mode`.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let failed = |path: &Path| {
        let path = path.to_owned();
        move |source| StateError::Write { path, source }
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(failed(&tmp))?;
    if let Err(e) = f.write_all(contents).and_then(|()| f.sync_all()) {
        // A full disk is not made fuller by a half-written copy; the old file stays whole.
        let _ = fs::remove_file(&tmp);
        return Err(failed(&tmp)(e));
    }
    fs::rename(&tmp, path).map_err(failed(path))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The organisation a certificate (PEM) names (`vedette:org:NAME` URI), or `default`, as the
/// collector reads it.
pub fn org_of_cert(cert_pem: &str) -> String {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let named = pem::parse_many(cert_pem)
        .ok()
        .and_then(|b| b.into_iter().find(|b| b.tag() == "CERTIFICATE"))
        .and_then(|block| {
            let (_, cert) = X509Certificate::from_der(block.contents()).ok()?;
            let san = cert.subject_alternative_name().ok()??;
            san.value.general_names.iter().find_map(|n| match n {
                GeneralName::URI(u) => u.strip_prefix("vedette:org:").map(str::to_string),
                _ => None,
            })
        });
    named.unwrap_or_else(|| "default".to_string())
}
