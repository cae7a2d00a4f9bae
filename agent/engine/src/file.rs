//! Scanning one file: opened safely, read once, matched against every rule of a [`RuleSet`].
//!
//! Safety rules: the file is opened with `O_NOFOLLOW | O_NONBLOCK` and checked with `fstat` on
//! the open descriptor, so a FIFO, socket or device is never read (and never blocks us), and a
//! symlink swapped in after the directory walk is not followed. Files that vanish, shrink, grow or
//! cannot be read are skipped with a [`SkipReason`]; nothing here panics on file content.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use md5::Md5;
use rustix::fs::OFlags;
use rustix::io::Errno;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::digests::{DigestMemo, State, Wanted};
use crate::rules::{RuleMatch, RuleSet};

/// The largest executable hashed in full by [`FileScanner::scan_exec`]; a larger one is judged
/// by its name and its first `max_file_size` bytes only.
pub const MAX_EXEC_HASHED: u64 = 4 << 30;

/// The wanted digests of data read in pieces.
struct StreamDigests {
    md5: Option<Md5>,
    sha1: Option<Sha1>,
    sha256: Option<Sha256>,
}

impl StreamDigests {
    fn new(wanted: Wanted) -> StreamDigests {
        StreamDigests {
            md5: wanted.md5.then(Md5::new),
            sha1: wanted.sha1.then(Sha1::new),
            sha256: wanted.sha256.then(Sha256::new),
        }
    }

    fn update(&mut self, data: &[u8]) {
        if let Some(h) = self.md5.as_mut() {
            h.update(data);
        }
        if let Some(h) = self.sha1.as_mut() {
            h.update(data);
        }
        if let Some(h) = self.sha256.as_mut() {
            h.update(data);
        }
    }

    fn finish(self) -> (Option<String>, Option<String>, Option<String>) {
        (
            self.md5.map(|h| hex::encode(h.finalize())),
            self.sha1.map(|h| hex::encode(h.finalize())),
            self.sha256.map(|h| hex::encode(h.finalize())),
        )
    }
}

/// Limits applied to every file.
#[derive(Debug, Clone, Copy)]
pub struct ScanOptions {
    /// Larger files are skipped.
    pub max_file_size: u64,
    /// YARA time budget per file.
    pub timeout: Duration,
    /// Every file read gets all three digests (MD5, SHA-1, SHA-256), whatever the indicators
    /// need: the agent's history keeps them, so that a hash published later is answered
    /// without reading the file again.
    pub all_digests: bool,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            max_file_size: 64 * 1024 * 1024,
            timeout: Duration::from_secs(30),
            all_digests: false,
        }
    }
}

/// Why a file was not scanned. Counted by the caller under [`SkipReason::as_str`].
#[derive(Debug)]
pub enum SkipReason {
    /// Not a regular file (FIFO, socket, device, directory).
    NotRegular,
    /// A symlink at the last path component.
    Symlink,
    /// Larger than `max_file_size`.
    TooLarge(u64),
    /// Gone before it could be opened.
    Vanished,
    /// Permission denied or another I/O error.
    Unreadable(std::io::Error),
    /// YARA ran out of its time budget.
    Timeout,
}

impl SkipReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            SkipReason::NotRegular => "not_regular",
            SkipReason::Symlink => "symlink",
            SkipReason::TooLarge(_) => "too_large",
            SkipReason::Vanished => "vanished",
            SkipReason::Unreadable(_) => "unreadable",
            SkipReason::Timeout => "timeout",
        }
    }
}

/// What scanning one file found.
#[derive(Debug, Clone, Default)]
pub struct FileReport {
    pub size: u64,
    pub device: u64,
    pub inode: u64,
    /// Modification and status-change times of the file as opened, in nanoseconds: with the
    /// device, inode and size they identify one state of the file.
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    /// Set when something matched (the detection carries it).
    pub sha256: Option<String>,
    pub md5: Option<String>,
    pub sha1: Option<String>,
    pub matches: Vec<RuleMatch>,
}

/// Scans files against one rule set. One per worker thread; cheap to reuse across files.
pub struct FileScanner<'r> {
    rules: &'r RuleSet,
    /// One per set of the rules (see [`crate::classes`]), each made at the first file that
    /// needs it, dropped by [`FileScanner::release`].
    yara: Vec<Option<yara_x::Scanner<'r>>>,
    options: ScanOptions,
    buf: Vec<u8>,
    /// Digests computed ahead of the scan, taken from here when the file is unchanged.
    ahead: Option<&'r DigestMemo>,
}

impl<'r> FileScanner<'r> {
    pub fn new(rules: &'r RuleSet, options: ScanOptions) -> FileScanner<'r> {
        FileScanner {
            rules,
            yara: Vec::new(),
            options,
            buf: Vec::new(),
            ahead: None,
        }
    }

    /// Takes each file's digests from `memo` where they were computed ahead for its state.
    pub fn with_digests_ahead(mut self, memo: Option<&'r DigestMemo>) -> FileScanner<'r> {
        self.ahead = memo;
        self
    }

    /// The YARA scanner of the class of a file that starts with `head`, made on first use; None
    /// when the rule set has no YARA rules.
    fn yara(&mut self, head: &[u8]) -> Result<Option<&mut yara_x::Scanner<'r>>, SkipReason> {
        let rules: &'r RuleSet = self.rules;
        let Some(classes) = rules.yara.as_ref() else {
            return Ok(None);
        };
        let set = classes.set_for(head);
        if self.yara.len() < classes.len() {
            self.yara.resize_with(classes.len(), || None);
        }
        let slot = &mut self.yara[set];
        if slot.is_none() {
            let compiled = classes
                .set(set)
                .map_err(|e| SkipReason::Unreadable(std::io::Error::other(e)))?;
            let mut s = yara_x::Scanner::new(compiled);
            s.set_timeout(self.options.timeout);
            // A detection names the rules that matched, never where their patterns did: a
            // pattern that a condition only tests for presence stops being searched at its first
            // match (yara-x decides which ones; `#a > 3` keeps four, `@a[1]` keeps them all).
            s.fast_scan(true);
            *slot = Some(s);
        }
        Ok(slot.as_mut())
    }

    /// Frees what this scanner holds between files (the YARA scanner's memory, the read
    /// buffer); the next file makes them again.
    pub fn release(&mut self) {
        self.yara = Vec::new();
        self.buf = Vec::new();
    }

    pub fn rules(&self) -> &'r RuleSet {
        self.rules
    }

    /// Files larger than this are not read by [`FileScanner::scan_open`].
    pub fn max_file_size(&self) -> u64 {
        self.options.max_file_size
    }

    /// The YARA rules that match `data` (process memory, say: no file, so no digests and no
    /// names). A rule matches as [`MatchKind::Process`](crate::MatchKind::Process).
    pub fn scan_bytes(&mut self, data: &[u8]) -> Result<Vec<RuleMatch>, SkipReason> {
        let rules = self.rules;
        let Some(scanner) = self.yara(data)? else {
            return Ok(Vec::new());
        };
        for name in crate::rules::EXTERNALS {
            // Defined at compile time; memory has no file name, path or owner.
            let _ = scanner.set_global(name, "");
        }
        match scanner.scan(data) {
            Ok(results) => Ok(results
                .matching_rules()
                .map(|r| RuleMatch {
                    kind: crate::MatchKind::Process,
                    ..rules.yara_match(&r)
                })
                .collect()),
            Err(yara_x::ScanError::Timeout) => Err(SkipReason::Timeout),
            Err(e) => Err(SkipReason::Unreadable(std::io::Error::other(e.to_string()))),
        }
    }

    /// Opens, checks, reads and matches one file.
    pub fn scan_path(&mut self, path: &Path) -> Result<FileReport, SkipReason> {
        let file = open_regular(path)?;
        self.scan_open(file, path)
    }

    /// Reads and matches a file already open (through `/proc/PID/exe`, say, or an event's
    /// descriptor): no path is opened, so nothing can be swapped in between. `name` is the
    /// path that file-name indicators and YARA's external variables see.
    pub fn scan_open(&mut self, file: File, name: &Path) -> Result<FileReport, SkipReason> {
        let meta = file.metadata().map_err(SkipReason::Unreadable)?;
        if !is_regular(&meta.file_type()) {
            return Err(SkipReason::NotRegular);
        }
        let (path, iocs) = (name, &self.rules.iocs);
        let mut report = self.named_report(&meta, path);
        if meta.len() > self.options.max_file_size {
            // The name alone can still be a finding.
            iocs.match_intel_file(
                &path.to_string_lossy(),
                None,
                None,
                None,
                &mut report.matches,
            );
            return if report.matches.is_empty() {
                Err(SkipReason::TooLarge(meta.len()))
            } else {
                Ok(report)
            };
        }
        let limited = self.read_whole(file, meta.len())?;
        report.size = self.buf.len() as u64;
        self.digests(&mut report, &meta, limited.get_ref());
        match_digests(iocs, &mut report, path);
        let found = self.match_yara(path, &meta)?;
        report.matches.extend(found);
        // A detection carries the file's SHA-256, MD5 and SHA-1, whatever the indicators
        // needed.
        if !report.matches.is_empty() {
            let data = &self.buf;
            report
                .sha256
                .get_or_insert_with(|| hex::encode(Sha256::digest(data)));
            report
                .md5
                .get_or_insert_with(|| hex::encode(Md5::digest(data)));
            report
                .sha1
                .get_or_insert_with(|| hex::encode(Sha1::digest(data)));
        }
        // Large buffers are not kept between files.
        if self.buf.capacity() > 8 * 1024 * 1024 {
            self.buf = Vec::new();
        }
        Ok(report)
    }

    /// The report of a file in state `meta`, with what its name alone matches.
    fn named_report(&self, meta: &std::fs::Metadata, name: &Path) -> FileReport {
        let state = State::of(meta);
        let mut report = FileReport {
            size: meta.len(),
            device: meta.dev(),
            inode: meta.ino(),
            mtime_ns: state.mtime_ns,
            ctime_ns: state.ctime_ns,
            ..Default::default()
        };
        if self.rules.iocs.has_filenames() {
            self.rules
                .iocs
                .match_path(&name.to_string_lossy(), &mut report.matches);
        }
        report
    }

    /// Like [`FileScanner::scan_open`], for an executable: one larger than `max_file_size` is
    /// still judged, not skipped. It is hashed in full as it is read (up to
    /// [`MAX_EXEC_HASHED`]), and YARA matches its first `max_file_size` bytes, where an
    /// executable's code and headers are: padding a binary past the cap does not hide it.
    pub fn scan_exec(&mut self, file: File, name: &Path) -> Result<FileReport, SkipReason> {
        let meta = file.metadata().map_err(SkipReason::Unreadable)?;
        if !is_regular(&meta.file_type()) || meta.len() <= self.options.max_file_size {
            return self.scan_open(file, name);
        }
        let iocs = &self.rules.iocs;
        let mut report = self.named_report(&meta, name);
        self.buf.clear();
        let head = self.options.max_file_size;
        self.buf.reserve(head as usize);
        let mut reader = &file;
        reader
            .take(head)
            .read_to_end(&mut self.buf)
            .map_err(SkipReason::Unreadable)?;
        // SHA-256 always: a detection on the process carries the executable's.
        let wanted = Wanted {
            sha256: true,
            ..self.wanted()
        };
        let mut hashing = (meta.len() <= MAX_EXEC_HASHED).then(|| StreamDigests::new(wanted));
        if let Some(h) = hashing.as_mut() {
            h.update(&self.buf);
            let mut chunk = vec![0u8; 1 << 20];
            loop {
                let n = reader.read(&mut chunk).map_err(SkipReason::Unreadable)?;
                if n == 0 {
                    break;
                }
                h.update(&chunk[..n]);
            }
        }
        if let Some(h) = hashing {
            (report.md5, report.sha1, report.sha256) = h.finish();
        }
        match_digests(iocs, &mut report, name);
        let found = self.match_yara(name, &meta);
        self.buf = Vec::new();
        match found {
            Ok(found) => report.matches.extend(found),
            // What the digests and the name found stands without YARA.
            Err(e) if report.matches.is_empty() => return Err(e),
            Err(_) => {}
        }
        Ok(report)
    }

    /// Reads the file into the buffer: at most one byte past the cap, so a file that grew past
    /// it is skipped, not truncated into a partial scan. The reader, to look at the file again.
    fn read_whole(&mut self, file: File, expected: u64) -> Result<std::io::Take<File>, SkipReason> {
        self.buf.clear();
        // One allocation of the expected size: a `Take` reader gives no size hint.
        self.buf
            .reserve(expected.min(self.options.max_file_size) as usize + 1);
        let mut limited = file.take(self.options.max_file_size + 1);
        limited
            .read_to_end(&mut self.buf)
            .map_err(SkipReason::Unreadable)?;
        if self.buf.len() as u64 > self.options.max_file_size {
            return Err(SkipReason::TooLarge(self.buf.len() as u64));
        }
        Ok(limited)
    }

    /// Only the digests some indicator needs, computed now unless they were hashed ahead of
    /// the scan for this very state of the file (`before` and `file` as the read saw it).
    fn digests(&self, report: &mut FileReport, before: &std::fs::Metadata, file: &File) {
        let wanted = self.wanted();
        if !wanted.any() {
            return;
        }
        let ahead = self
            .ahead
            .and_then(|m| {
                let after = file.metadata().ok()?;
                m.take(before, &after)
            })
            .unwrap_or_default();
        let data = &self.buf;
        report.md5 = wanted
            .md5
            .then(|| ahead.md5.unwrap_or_else(|| hex::encode(Md5::digest(data))));
        report.sha1 = wanted.sha1.then(|| {
            ahead
                .sha1
                .unwrap_or_else(|| hex::encode(Sha1::digest(data)))
        });
        report.sha256 = wanted.sha256.then(|| {
            ahead
                .sha256
                .unwrap_or_else(|| hex::encode(Sha256::digest(data)))
        });
    }

    /// The digests to compute: those the indicators need, or all of them.
    fn wanted(&self) -> Wanted {
        if self.options.all_digests {
            Wanted {
                md5: true,
                sha1: true,
                sha256: true,
            }
        } else {
            Wanted::of(&self.rules.iocs)
        }
    }

    /// The YARA rules that match the buffer (none without YARA rules).
    fn match_yara(
        &mut self,
        path: &Path,
        meta: &std::fs::Metadata,
    ) -> Result<Vec<RuleMatch>, SkipReason> {
        let rules = self.rules;
        let buf = std::mem::take(&mut self.buf);
        let scanner = match self.yara(&buf) {
            Ok(s) => s,
            Err(e) => {
                self.buf = buf;
                return Err(e);
            }
        };
        let scanned = scanner.map(|scanner| {
            set_externals(scanner, path, meta);
            scanner.scan(&buf).map(|results| {
                results
                    .matching_rules()
                    .map(|r| rules.yara_match(&r))
                    .collect::<Vec<_>>()
            })
        });
        self.buf = buf;
        match scanned {
            None => Ok(Vec::new()),
            Some(Ok(found)) => Ok(found),
            Some(Err(yara_x::ScanError::Timeout)) => Err(SkipReason::Timeout),
            Some(Err(e)) => Err(SkipReason::Unreadable(std::io::Error::other(e.to_string()))),
        }
    }
}

/// Adds to `report` what its digests match: hash lists, and intel on the file (with its name).
fn match_digests(iocs: &crate::ioc::Iocs, report: &mut FileReport, name: &Path) {
    iocs.match_hashes(
        report.md5.as_deref(),
        report.sha1.as_deref(),
        report.sha256.as_deref(),
        &mut report.matches,
    );
    iocs.match_intel_file(
        &name.to_string_lossy(),
        report.md5.as_deref(),
        report.sha1.as_deref(),
        report.sha256.as_deref(),
        &mut report.matches,
    );
}

/// Opens `path` without following a final symlink and without blocking (a FIFO opened this way
/// does not wait for a writer); [`FileScanner::scan_open`] then refuses anything that is not a
/// regular file, judged on the open descriptor.
/// `flags` as `OpenOptionsExt::custom_flags` takes them (every open flag fits in 31 bits).
pub(crate) fn open_flags(flags: OFlags) -> i32 {
    i32::try_from(flags.bits()).unwrap_or(0)
}

pub(crate) fn open_regular(path: &Path) -> Result<File, SkipReason> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(open_flags(
            OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
        ))
        .open(path)
        .map_err(|e| match Errno::from_io_error(&e) {
            Some(Errno::LOOP) => SkipReason::Symlink,
            Some(Errno::NOENT | Errno::NOTDIR) => SkipReason::Vanished,
            Some(Errno::NXIO) => SkipReason::NotRegular,
            _ => SkipReason::Unreadable(e),
        })?;
    Ok(file)
}

pub(crate) fn is_regular(ft: &std::fs::FileType) -> bool {
    ft.is_file() && !(ft.is_fifo() || ft.is_socket() || ft.is_block_device() || ft.is_char_device())
}

/// Sets the legacy external variables for one file.
fn set_externals(scanner: &mut yara_x::Scanner<'_>, path: &Path, meta: &std::fs::Metadata) {
    let filename = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let filepath = path
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let extension = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy().to_lowercase()))
        .unwrap_or_default();
    let owner = owner_name(meta.uid());
    for (name, value) in [
        ("filename", filename),
        ("filepath", filepath),
        ("extension", extension),
        ("filetype", String::new()),
        ("owner", owner),
    ] {
        // Every name was defined when the rules were compiled; a failure here would only mean
        // the rules were built elsewhere, and the rule then sees the empty default.
        let _ = scanner.set_global(name, value);
    }
}

fn owner_name(uid: u32) -> String {
    if uid == 0 {
        "root".to_string()
    } else {
        uid.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RuleSetBuilder;

    fn rules(src: &str) -> RuleSet {
        let mut b = RuleSetBuilder::new();
        b.add_yara_source(Path::new("t.yar"), src.as_bytes());
        b.build_strict(0).unwrap()
    }

    #[test]
    fn a_matching_file_reports_rule_metadata_and_sha256() {
        let rs = rules(
            "rule evil { meta: score = 90 description = \"d\" strings: $a = \"EVIL\" condition: $a }",
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"xx EVIL xx").unwrap();
        let mut s = FileScanner::new(&rs, ScanOptions::default());
        let r = s.scan_path(&p).unwrap();
        assert_eq!(r.matches.len(), 1);
        assert_eq!(r.matches[0].rule, "evil");
        assert_eq!(r.matches[0].score, 90);
        assert_eq!(r.matches[0].description, "d");
        assert_eq!(
            r.sha256.as_deref(),
            Some(hex::encode(Sha256::digest(b"xx EVIL xx")).as_str())
        );
        std::fs::write(&p, b"clean").unwrap();
        assert!(s.scan_path(&p).unwrap().matches.is_empty());
    }

    /// The scanner stops searching for a pattern at its first match only where the verdict
    /// cannot change: rules that count, place or measure their matches judge as a full search.
    #[test]
    fn fast_scan_gives_the_verdicts_of_a_full_search() {
        let src = r#"
            rule present { strings: $a = "AB" condition: $a }
            rule more_than_three { strings: $a = "AB" condition: #a > 3 }
            rule exactly_five { strings: $a = "AB" condition: #a == 5 }
            rule third_at_8 { strings: $a = "AB" condition: @a[3] == 8 }
            rule in_tail { strings: $a = "AB" condition: $a in (filesize - 2 .. filesize) }
            rule all_of_them_twice { strings: $a = "AB" $b = "CD" condition: for all of them : (# >= 2) }
            rule any_at_zero { strings: $a = "AB" $b = "CD" condition: any of them at 0 }
            rule two_of { strings: $a = "AB" $b = "CD" $c = "EF" condition: 2 of them }
            rule longest { strings: $r = /A[B]+/ condition: !r[1] == 2 and #r == 5 }
        "#;
        let rs = rules(src);
        let inputs: [&[u8]; 6] = [
            b"",
            b"AB",
            b"ABxxABxxABxxABxxAB",
            b"ABxxABxxAB",
            b"CDxxCDxxABxxAB",
            b"xxEFxxCDxxAB",
        ];
        let mut fast = FileScanner::new(&rs, ScanOptions::default());
        let mut full = yara_x::Scanner::new(rs.yara.as_ref().unwrap().set(0).unwrap());
        let mut verdicts = Vec::new();
        for data in inputs {
            let mut got: Vec<String> = fast
                .scan_bytes(data)
                .unwrap()
                .into_iter()
                .map(|m| m.rule)
                .collect();
            got.sort();
            let mut want: Vec<String> = full
                .scan(data)
                .unwrap()
                .matching_rules()
                .map(|r| r.identifier().to_string())
                .collect();
            want.sort();
            assert_eq!(got, want, "on {:?}", String::from_utf8_lossy(data));
            verdicts.push(got.join(","));
        }
        // The inputs exercise each rule both ways.
        assert_eq!(
            verdicts[2],
            "any_at_zero,exactly_five,in_tail,longest,more_than_three,present,third_at_8"
        );
        assert_eq!(verdicts[3], "any_at_zero,in_tail,present,third_at_8");
        assert_eq!(
            verdicts[4],
            "all_of_them_twice,any_at_zero,in_tail,present,two_of"
        );
    }

    #[test]
    fn fifo_and_symlink_are_skipped_without_blocking() {
        let rs = rules("rule t { condition: true }");
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let mut s = FileScanner::new(&rs, ScanOptions::default());
        assert!(matches!(s.scan_path(&fifo), Err(SkipReason::NotRegular)));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        assert!(matches!(s.scan_path(&link), Err(SkipReason::Symlink)));
        assert!(matches!(
            s.scan_path(&dir.path().join("gone")),
            Err(SkipReason::Vanished)
        ));
    }

    #[test]
    fn externals_are_set_per_file() {
        let rs =
            rules("rule byname { condition: filename == \"x.php\" and extension == \".php\" }");
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("x.php"), dir.path().join("y.txt"));
        std::fs::write(&a, b"1").unwrap();
        std::fs::write(&b, b"1").unwrap();
        let mut s = FileScanner::new(&rs, ScanOptions::default());
        assert_eq!(s.scan_path(&a).unwrap().matches.len(), 1);
        assert!(s.scan_path(&b).unwrap().matches.is_empty());
    }

    #[test]
    fn hash_indicators_of_each_kind_match() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sample.bin");
        let data = b"vedette hash sample";
        std::fs::write(&p, data).unwrap();
        for (name, digest) in [
            ("md5", hex::encode(Md5::digest(data))),
            ("sha1", hex::encode(Sha1::digest(data))),
            ("sha256", hex::encode(Sha256::digest(data))),
        ] {
            let mut b = RuleSetBuilder::new();
            let list = format!("# {name}\n{};sample {name}\n", digest.to_uppercase());
            b.add_ioc_source(
                crate::IocKind::Hash,
                Path::new("hash-iocs.txt"),
                list.as_bytes(),
            );
            let rs = b.build_strict(0).unwrap();
            let mut s = FileScanner::new(&rs, ScanOptions::default());
            let r = s.scan_path(&p).unwrap();
            assert_eq!(r.matches.len(), 1, "{name}");
            assert_eq!(r.matches[0].rule, digest);
            assert_eq!(r.matches[0].description, format!("sample {name}"));
            assert_eq!(r.matches[0].kind, crate::MatchKind::Hash);
            // A match carries all three, for the detection.
            assert!(r.md5.is_some() && r.sha1.is_some() && r.sha256.is_some());
        }
    }

    #[test]
    fn filename_indicator_matches_even_a_file_too_large_to_read() {
        let mut b = RuleSetBuilder::new();
        b.add_ioc_source(
            crate::IocKind::Filename,
            Path::new("filename-iocs.txt"),
            b"\\\\mimikatz\\.exe$;85\n",
        );
        let rs = b.build_strict(0).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mimikatz.exe");
        std::fs::write(&p, vec![0u8; 100]).unwrap();
        let mut s = FileScanner::new(
            &rs,
            ScanOptions {
                max_file_size: 10,
                ..Default::default()
            },
        );
        let r = s.scan_path(&p).unwrap();
        assert_eq!(r.matches.len(), 1);
        assert_eq!(r.matches[0].score, 85);
    }

    #[test]
    fn too_large_files_are_skipped() {
        let rs = rules("rule t { condition: true }");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        std::fs::write(&p, vec![0u8; 100]).unwrap();
        let opts = ScanOptions {
            max_file_size: 10,
            ..Default::default()
        };
        let mut s = FileScanner::new(&rs, opts);
        assert!(matches!(s.scan_path(&p), Err(SkipReason::TooLarge(100))));
    }

    #[test]
    fn an_executable_past_the_size_cap_is_hashed_in_full_and_matched_on_its_head() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("padded");
        let mut data = b"MZ-HEAD-MARKER".to_vec();
        data.resize(100_000, 0x5a);
        std::fs::write(&p, &data).unwrap();
        let sha = hex::encode(Sha256::digest(&data));
        let mut b = RuleSetBuilder::new();
        b.add_yara_source(
            Path::new("head.yar"),
            "rule head { strings: $a = \"HEAD-MARKER\" condition: $a }\n\
             rule tail { strings: $a = { 5a 5a 5a 5a } condition: $a at 99996 }"
                .as_bytes(),
        );
        b.add_ioc_source(
            crate::IocKind::Hash,
            Path::new("hash-iocs.txt"),
            format!("{sha};padded\n").as_bytes(),
        );
        let rs = b.build_strict(0).unwrap();
        let opts = ScanOptions {
            max_file_size: 1024,
            ..Default::default()
        };
        let mut s = FileScanner::new(&rs, opts);
        // A file scan skips it; an exec scan judges it.
        assert!(matches!(
            s.scan_path(&p),
            Err(SkipReason::TooLarge(100_000))
        ));
        let r = s.scan_exec(open_regular(&p).unwrap(), &p).unwrap();
        let mut found: Vec<&str> = r.matches.iter().map(|m| m.rule.as_str()).collect();
        let mut expected = vec!["head", sha.as_str()];
        found.sort();
        expected.sort();
        assert_eq!(found, expected);
        assert_eq!(r.sha256.as_deref(), Some(sha.as_str()));
        assert_eq!(r.size, 100_000);
        // Within the cap it is an ordinary scan.
        let mut s = FileScanner::new(&rs, ScanOptions::default());
        let r = s.scan_exec(open_regular(&p).unwrap(), &p).unwrap();
        assert_eq!(r.matches.len(), 3);
    }
}
