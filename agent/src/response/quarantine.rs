//! Quarantine: a file named by path and SHA-256 is copied into the state directory (readable
//! by root alone, executable by no one) while it is hashed, removed from its path only if the
//! hash is the one named and the path still leads to the very file read; its owner, mode and
//! times are kept beside it. Restore puts the same bytes back with that metadata, and never
//! over a file that is at the path by then.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{Gid, Mode, OFlags, Timespec, Timestamps, Uid};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Refusal, failed, refused};

/// What is kept of a quarantined file, to put it back as it was.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    path: PathBuf,
    uid: u32,
    gid: u32,
    mode: u32,
    atime: (i64, i64),
    mtime: (i64, i64),
    size: u64,
    sha256: String,
}

/// Copies everything from `from` to `to`, and the SHA-256 of it.
fn copy_hashing(from: &mut File, to: &mut File) -> std::io::Result<String> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        to.write_all(&buf[..n])?;
    }
    to.sync_all()?;
    Ok(hex::encode(hash.finalize()))
}

fn open_nofollow(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags((OFlags::NOFOLLOW | OFlags::NONBLOCK).bits() as i32)
        .open(path)
}

/// A new file, only if nothing is at `path` (symbolic links included), private to root.
fn create_new(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

pub(super) fn quarantine(
    store: &Path,
    id: &str,
    path: &str,
    sha256: &str,
) -> Result<String, Refusal> {
    let path = Path::new(path);
    let mut src =
        open_nofollow(path).map_err(|e| refused(format!("cannot open {}: {e}", path.display())))?;
    let meta = src
        .metadata()
        .map_err(|e| failed(format!("cannot stat {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(refused(format!("{} is not a regular file", path.display())));
    }
    let dir = store.join(id);
    std::fs::create_dir_all(store)
        .and_then(|()| {
            std::fs::set_permissions(store, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        })
        .and_then(|()| std::fs::create_dir(&dir))
        .map_err(|e| failed(format!("cannot make {}: {e}", dir.display())))?;
    let undo = |r: Refusal| {
        let _ = std::fs::remove_dir_all(&dir);
        r
    };
    let data = dir.join("file");
    let mut copy = create_new(&data)
        .map_err(|e| undo(failed(format!("cannot write {}: {e}", data.display()))))?;
    let found = copy_hashing(&mut src, &mut copy)
        .map_err(|e| undo(failed(format!("cannot copy {}: {e}", path.display()))))?;
    if found != sha256 {
        return Err(undo(refused(format!(
            "{} has SHA-256 {found}, not {sha256}: not quarantined",
            path.display()
        ))));
    }
    let _ = std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o400));
    let kept = Meta {
        path: path.to_path_buf(),
        uid: meta.uid(),
        gid: meta.gid(),
        mode: meta.mode() & 0o7777,
        atime: (meta.atime(), meta.atime_nsec()),
        mtime: (meta.mtime(), meta.mtime_nsec()),
        size: meta.len(),
        sha256: found,
    };
    let text = serde_json::to_vec_pretty(&kept).unwrap_or_default();
    crate::state::write_atomic(&dir.join("meta.json"), &text, 0o600)
        .map_err(|e| undo(failed(format!("cannot record the file's metadata: {e}"))))?;
    // Removed only if the path still leads to the file read.
    let now = std::fs::symlink_metadata(path);
    if !now.is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino()) {
        return Err(undo(failed(format!(
            "{} changed while it was copied; left in place",
            path.display()
        ))));
    }
    std::fs::remove_file(path)
        .map_err(|e| undo(failed(format!("cannot remove {}: {e}", path.display()))))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent);
    }
    Ok(format!(
        "quarantined {} ({} bytes, SHA-256 {sha256})",
        path.display(),
        kept.size
    ))
}

pub(super) fn restore(store: &Path, undoes: &str) -> Result<String, Refusal> {
    let safe = !undoes.is_empty()
        && undoes
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    let dir = store.join(undoes);
    let text = std::fs::read(dir.join("meta.json"))
        .ok()
        .filter(|_| safe)
        .ok_or_else(|| {
            refused(format!(
                "no file quarantined by action {undoes} is kept here"
            ))
        })?;
    let meta: Meta = serde_json::from_slice(&text).map_err(|e| {
        failed(format!(
            "the quarantine record of {undoes} cannot be read: {e}"
        ))
    })?;
    let mut data = File::open(dir.join("file"))
        .map_err(|e| failed(format!("the quarantined copy cannot be read: {e}")))?;
    let mut out = create_new(&meta.path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => refused(format!(
            "a file is at {} already; it is not overwritten",
            meta.path.display()
        )),
        _ => failed(format!("cannot create {}: {e}", meta.path.display())),
    })?;
    let remove = |r: Refusal| {
        let _ = std::fs::remove_file(&meta.path);
        r
    };
    let found = copy_hashing(&mut data, &mut out)
        .map_err(|e| remove(failed(format!("cannot write {}: {e}", meta.path.display()))))?;
    if found != meta.sha256 {
        return Err(remove(failed(format!(
            "the quarantined copy has SHA-256 {found}, not {}: not restored",
            meta.sha256
        ))));
    }
    // Owner first: a change of owner clears the set-user-id bits the mode then sets again.
    rustix::fs::fchown(
        &out,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
    )
    .and_then(|()| rustix::fs::fchmod(&out, Mode::from_raw_mode(meta.mode)))
    .and_then(|()| {
        let at = |(s, ns): (i64, i64)| Timespec {
            tv_sec: s,
            tv_nsec: ns,
        };
        rustix::fs::futimens(
            &out,
            &Timestamps {
                last_access: at(meta.atime),
                last_modification: at(meta.mtime),
            },
        )
    })
    .and_then(|()| rustix::fs::fsync(&out))
    .map_err(|e| {
        remove(failed(format!(
            "cannot set the owner, mode or times of {}: {e}",
            meta.path.display()
        )))
    })?;
    if let Some(parent) = meta.path.parent() {
        sync_dir(parent);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(format!(
        "restored {} ({} bytes, SHA-256 {})",
        meta.path.display(),
        meta.size,
        meta.sha256
    ))
}
