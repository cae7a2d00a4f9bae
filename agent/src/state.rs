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
//! DIR/scan-cache.bin  results of full scans, so unchanged files are not scanned again
//! ```

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

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

    /// Creates the directory (0700) if needed.
    pub fn create(&self) -> anyhow::Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("cannot create the state directory `{}`", self.dir.display()))
    }

    pub fn is_enrolled(&self) -> bool {
        self.cert().exists() && self.enrollment().exists()
    }

    /// Loads everything `run` needs; fails closed with the file at fault.
    pub fn load(&self) -> anyhow::Result<Credentials> {
        if !self.is_enrolled() {
            bail!(
                "`{}` holds no enrollment; run `vedette-agent enroll --state-dir {}` first",
                self.dir.display(),
                self.dir.display()
            );
        }
        let read = |p: PathBuf| {
            fs::read_to_string(&p).with_context(|| format!("cannot read `{}`", p.display()))
        };
        let text = read(self.enrollment())?;
        let enrollment: Enrollment = toml::from_str(&text)
            .with_context(|| format!("invalid `{}`", self.enrollment().display()))?;
        if enrollment.collectors.is_empty() {
            bail!("`{}` lists no collector", self.enrollment().display());
        }
        let key_path = self.key();
        let mode = fs::metadata(&key_path)
            .with_context(|| format!("cannot read `{}`", key_path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            bail!(
                "`{}` is readable by others (mode {:o}); run `chmod 600 {}`",
                key_path.display(),
                mode & 0o777,
                key_path.display()
            );
        }
        Ok(Credentials {
            enrollment,
            ca_pem: read(self.ca())?,
            cert_pem: read(self.cert())?,
            key_pem: read(key_path)?,
        })
    }
}

/// Writes `contents` to `path` atomically (temporary file, fsync, rename) with `mode`.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write `{}`", tmp.display()))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write `{}`", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write `{}`", path.display()))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}
