//! A cache of compiled YARA rules, so that loading a large, unchanged rule set (signature-base:
//! about 5 s of compilation) takes a fraction of a second.
//!
//! ```text
//! "VEDETTE-COMPILED-2\n" | fingerprint: 32 | files_with_errors: u64le | problems: u32le
//!   | per problem: path (u32le len + bytes) | line (u64le, 0 = none) | reason (u32le len + bytes)
//!   | rules: u64le len + the class sets (see `ClassRules::serialize`) | sha256 of everything before: 32
//! ```
//!
//! yara-x documents its serialized rules as unsafe to load from a source one does not trust.
//! So a cache is only ever read when it was written by this user: the file must be
//! owned by the process's effective user and writable by nobody else, like the rest of the
//! agent's state; and its checksum and fingerprint (SHA-256 of every source name and byte, and
//! of this engine's version) must match. Anything else is a miss, and the rules are compiled
//! from source again. Nothing compiled is ever received from the network.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use crate::classes::ClassRules;
use crate::codec::{Reader, Writer, unseal};
use crate::rules::YaraPart;
use crate::{Origin, Problem, ProblemKind};

const MAGIC: &[u8] = b"VEDETTE-COMPILED-2\n";

/// Whether a cache file, as its open descriptor shows it, may be trusted: owned by this
/// process's effective user, not writable by group or others.
fn trusted(meta: &std::fs::Metadata) -> Result<(), Untrusted> {
    // /proc/self belongs to the process's effective user: no unsafe call needed to learn it.
    let me = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .map_err(Untrusted::NoUser)?;
    if !meta.is_file() {
        return Err(Untrusted::NotAFile);
    }
    if meta.uid() != me {
        return Err(Untrusted::Owner {
            owner: meta.uid(),
            me,
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(Untrusted::Writable(meta.mode() & 0o777));
    }
    Ok(())
}

/// Why a compiled-rules cache file is not loaded.
#[derive(Debug, thiserror::Error)]
enum Untrusted {
    #[error("cannot learn this process's user: {0}")]
    NoUser(std::io::Error),
    #[error("cannot read its metadata: {0}")]
    Metadata(std::io::Error),
    #[error("not a regular file")]
    NotAFile,
    #[error("owned by uid {owner}, not by this user ({me})")]
    Owner { owner: u32, me: u32 },
    #[error("writable by others (mode {0:o})")]
    Writable(u32),
}

pub(crate) fn load(path: &Path, fingerprint: &[u8; 32]) -> Option<YaraPart> {
    // Opened without following a symlink, then checked and read through the same descriptor:
    // the file judged is the file loaded (loading deserialises native code).
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(crate::file::open_flags(rustix::fs::OFlags::NOFOLLOW))
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "compiled-rules cache not trusted; compiling from source");
            return None;
        }
    };
    if let Err(why) = file
        .metadata()
        .map_err(Untrusted::Metadata)
        .and_then(|m| trusted(&m))
    {
        warn!(path = %path.display(), reason = %why, "compiled-rules cache not trusted; compiling from source");
        return None;
    }
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut data).ok()?;
    match parse(&data, fingerprint) {
        Ok(hit) => {
            debug!(path = %path.display(), "compiled rules loaded from cache");
            Some(hit)
        }
        Err(why) => {
            debug!(path = %path.display(), reason = %why, "compiled-rules cache not used");
            None
        }
    }
}

/// Why a cache file was not used.
#[derive(Debug, thiserror::Error)]
enum Miss {
    #[error("not a compiled-rules cache")]
    Foreign,
    #[error("checksum mismatch")]
    Damaged,
    #[error("the rules changed")]
    Stale,
    #[error("truncated")]
    Truncated,
    #[error("built by another yara-x")]
    OtherYara,
}

fn parse(data: &[u8], fingerprint: &[u8; 32]) -> Result<YaraPart, Miss> {
    if data.len() < MAGIC.len() + 64 || !data.starts_with(MAGIC) {
        return Err(Miss::Foreign);
    }
    let body = unseal(data).ok_or(Miss::Damaged)?;
    let mut r = Reader(&body[MAGIC.len()..]);
    if r.take(32).ok_or(Miss::Truncated)? != fingerprint {
        return Err(Miss::Stale);
    }
    let (files_with_errors, problems, serialized) = parse_body(&mut r).ok_or(Miss::Truncated)?;
    let rules = ClassRules::deserialize(serialized).map_err(|_| Miss::OtherYara)?;
    Ok(YaraPart {
        rules: Some(rules),
        files_with_errors,
        problems,
        failure: None,
        slow_patterns: Vec::new(),
    })
}

/// The problems found when compiling, and the serialized rules; None when truncated.
pub(crate) fn parse_body<'a>(r: &mut Reader<'a>) -> Option<(usize, Vec<Problem>, &'a [u8])> {
    let files_with_errors = r.u64()? as usize;
    let count = r.u32()?;
    let mut problems = Vec::new();
    for _ in 0..count {
        let path = PathBuf::from(r.text()?);
        let line = match r.u64()? {
            0 => None,
            l => Some(l as usize),
        };
        let reason = r.text()?;
        // Only YARA problems are cached; the builder marks bundle origins after loading.
        problems.push(Problem {
            path,
            line,
            reason,
            kind: ProblemKind::Yara,
            origin: Origin::Local,
        });
    }
    Some((files_with_errors, problems, r.blob()?))
}

/// Writes what [`parse_body`] reads.
pub(crate) fn write_body(
    w: &mut Writer,
    files_with_errors: usize,
    problems: &[Problem],
    serialized: &[u8],
) {
    w.u64(files_with_errors as u64);
    w.u32(problems.len() as u32);
    for p in problems {
        w.text(&p.path.to_string_lossy());
        w.u64(p.line.unwrap_or(0) as u64);
        w.text(&p.reason);
    }
    w.blob(serialized);
}

pub(crate) fn save(path: &Path, fingerprint: &[u8; 32], part: &YaraPart) {
    let Some(Ok(serialized)) = part.rules.as_ref().map(ClassRules::serialize) else {
        return;
    };
    save_serialized(path, fingerprint, part, &serialized);
}

/// Like [`save`], with the rules already serialized.
pub(crate) fn save_serialized(
    path: &Path,
    fingerprint: &[u8; 32],
    part: &YaraPart,
    serialized: &[u8],
) {
    let mut w = Writer::default();
    w.bytes(MAGIC);
    w.bytes(fingerprint);
    write_body(&mut w, part.files_with_errors, &part.problems, serialized);
    let out = w.seal();
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&out).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        warn!(path = %path.display(), error = %e, "cannot save the compiled-rules cache");
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use crate::{FileScanner, RuleSetBuilder, ScanOptions};

    fn builder() -> RuleSetBuilder {
        let mut b = RuleSetBuilder::new();
        b.add_yara_source(
            std::path::Path::new("a.yar"),
            b"rule cached_rule { strings: $a = \"CACHED-MARKER\" condition: $a }",
        );
        b.add_yara_source(
            std::path::Path::new("bad.yar"),
            b"rule bad { condition: nope }",
        );
        b
    }

    #[test]
    fn a_cache_hit_matches_like_a_fresh_build_and_keeps_the_problems() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("rules.bin");
        let fresh = builder().build_cached(0, &cache);
        assert!(cache.exists());
        assert_eq!(
            std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let hit = builder().build_cached(0, &cache);
        assert_eq!(hit.fingerprint(), fresh.fingerprint());
        assert_eq!(hit.yara_rules(), 1);
        assert_eq!(hit.report().problems, fresh.report().problems);
        assert_eq!(hit.report().yara_files_with_errors, 1);
        let file = dir.path().join("sample");
        std::fs::write(&file, "xx CACHED-MARKER xx").unwrap();
        let mut s = FileScanner::new(&hit, ScanOptions::default());
        let r = s.scan_path(&file).unwrap();
        assert_eq!(r.matches[0].rule, "cached_rule");
    }

    #[test]
    fn a_damaged_or_foreign_writable_cache_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("rules.bin");
        builder().build_cached(0, &cache);
        let mut data = std::fs::read(&cache).unwrap();
        let mid = data.len() / 2;
        data[mid] ^= 0xff;
        std::fs::write(&cache, &data).unwrap();
        assert!(super::load(&cache, &builder().build(0).fingerprint()).is_none());
        // Rebuilt (and rewritten) from source.
        let set = builder().build_cached(0, &cache);
        assert_eq!(set.yara_rules(), 1);
        assert!(super::load(&cache, &set.fingerprint()).is_some());
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(super::load(&cache, &set.fingerprint()).is_none());
    }

    #[test]
    fn a_cache_reached_through_a_symlink_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.bin");
        let set = builder().build_cached(0, &real);
        assert!(super::load(&real, &set.fingerprint()).is_some());
        let link = dir.path().join("rules.bin");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(super::load(&link, &set.fingerprint()).is_none());
    }
}
