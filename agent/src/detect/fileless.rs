//! The built-in finding `vedette.fileless_exec`: a process whose executable is not on disk,
//! deleted since it started or run from memory (`memfd:`).
//!
//! An image in a *sealed* memfd (no write, no shrink, no grow: its bytes can no longer change)
//! that is byte for byte an executable on disk is a copy of that executable, not fileless
//! malware: `runc` re-executes itself that way on every container host, and other tools do the
//! same. Such a process raises no finding of its own; its image is still judged by every rule
//! like any executable, so a copy of something an indicator lists is reported by that
//! indicator. The executable on disk is looked for where the process says it came from: its
//! `argv[0]` (relative to its working directory, or in its `PATH`), and its parent's
//! executable, all seen from the process's own root.

use std::fs::File;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::SealFlags;
use vedette_engine::{MatchKind, RuleMatch};

use crate::detect::procmon::{DELETED, ProcInfo};

/// The rule name of a process running an executable that is not on disk.
pub const FILELESS_RULE: &str = vedette_engine::findings::FILELESS_EXEC;

/// Images larger than this are not compared with files on disk (and so are reported).
const MAX_COMPARED: u64 = 512 << 20;

/// Where `argv[0]` is looked for when the process's own `PATH` cannot be read.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The built-in finding for a process whose executable is deleted or in memory (none for a
/// sealed copy of an executable on disk).
pub(crate) fn fileless(p: &ProcInfo) -> Option<RuleMatch> {
    if !p.exe_deleted {
        return None;
    }
    let exe = p.exe.as_deref().unwrap_or(Path::new("")).to_string_lossy();
    let what = if exe.starts_with("/memfd:") {
        if let Some(original) = sealed_copy_of(p.pid, p.ppid) {
            tracing::debug!(pid = p.pid, original = %original.display(), "sealed memfd copy of an executable on disk: not fileless");
            return None;
        }
        "runs from memory (memfd)"
    } else {
        "runs a deleted executable"
    };
    Some(RuleMatch {
        kind: MatchKind::Process,
        rule: FILELESS_RULE.into(),
        source: "vedette".into(),
        score: vedette_engine::findings::default_score(FILELESS_RULE),
        description: format!("process {} {what}: {exe} (deleted)", p.pid),
        author: String::new(),
        reference: String::new(),
        indicator: std::sync::Arc::new(vedette_engine::IndicatorRef {
            source: "vedette".into(),
            id: FILELESS_RULE.into(),
            origin: "built-in".into(),
            // Masquerading, reflective code loading.
            techniques: vec!["T1036".into(), "T1620".into()],
            ..Default::default()
        }),
    })
}

/// The executable on disk (as the process sees it) whose bytes the sealed memfd that process
/// `pid` runs equals; None when the image is not sealed or equals none of the candidates.
pub(crate) fn sealed_copy_of(pid: u32, ppid: u32) -> Option<PathBuf> {
    let image = File::open(format!("/proc/{pid}/exe")).ok()?;
    let seals = rustix::fs::fcntl_get_seals(&image).ok()?;
    if !seals.contains(SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW) {
        return None;
    }
    let len = image.metadata().ok()?.len();
    if len > MAX_COMPARED {
        return None;
    }
    candidates(pid, ppid).into_iter().find(|c| {
        File::open(c).is_ok_and(|f| {
            f.metadata()
                .is_ok_and(|m| m.is_file() && m.len() == len && m.permissions().mode() & 0o111 != 0)
                && same_bytes(&image, &f, len)
        })
    })
}

/// Where the process's image may have been copied from, as paths this agent can open.
fn candidates(pid: u32, ppid: u32) -> Vec<PathBuf> {
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let mut out = Vec::new();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let argv0 = Path::new(std::ffi::OsStr::from_bytes(argv0));
    if argv0.is_absolute() {
        out.push(inside(argv0));
    } else if argv0.components().count() > 1 {
        out.push(PathBuf::from(format!("/proc/{pid}/cwd")).join(argv0));
    } else if !argv0.as_os_str().is_empty() {
        let path = path_of(pid).unwrap_or_else(|| DEFAULT_PATH.to_string());
        out.extend(
            path.split(':')
                .filter(|d| d.starts_with('/'))
                .map(|d| inside(&Path::new(d).join(argv0))),
        );
    }
    let parent = PathBuf::from(format!("/proc/{ppid}/exe"));
    if ppid != 0
        && std::fs::read_link(&parent).is_ok_and(|l| !l.as_os_str().as_bytes().ends_with(DELETED))
    {
        out.push(parent);
    }
    out
}

/// The `PATH` a process was started with.
fn path_of(pid: u32) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0)
        .find_map(|v| v.strip_prefix(b"PATH="))
        .map(|v| {
            std::ffi::OsString::from_vec(v.to_vec())
                .to_string_lossy()
                .into_owned()
        })
}

/// Whether two open files of `len` bytes hold the same bytes.
fn same_bytes(a: &File, b: &File, len: u64) -> bool {
    const CHUNK: usize = 64 << 10;
    let (mut x, mut y) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut at = 0u64;
    while at < len {
        let n = CHUNK.min((len - at) as usize);
        if a.read_exact_at(&mut x[..n], at).is_err()
            || b.read_exact_at(&mut y[..n], at).is_err()
            || x[..n] != y[..n]
        {
            return false;
        }
        at += n as u64;
    }
    true
}
