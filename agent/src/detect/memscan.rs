//! Process memory YARA (opt-in): the readable private regions of a process (heap, stack,
//! anonymous and copy-on-write mappings), read through `/proc/PID/mem` and matched region by
//! region, within a byte budget per region and per process. Shared mappings and the kernel's
//! special regions (`[vvar]`, `[vsyscall]`) are left out: they hold nothing the process wrote.
//! So are mappings of files on FUSE and network file systems: a page not yet read would be
//! asked of their daemon or server, which may never answer.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vedette_engine::{FileScanner, RuleMatch};

use crate::detect::mounts::Mounts;

/// How much memory is read.
#[derive(Debug, Clone, Copy)]
pub struct MemScanLimits {
    /// Bytes read of one region at most (its start).
    pub per_region: u64,
    /// Bytes read of one process at most.
    pub per_process: u64,
}

impl Default for MemScanLimits {
    fn default() -> MemScanLimits {
        MemScanLimits {
            per_region: 64 << 20,
            per_process: 256 << 20,
        }
    }
}

/// One mapping from `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub name: String,
    /// The device of the mapped file (0 for anonymous memory).
    pub dev: u64,
}

impl std::fmt::Display for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}-{:x} {}", self.start, self.end, self.perms)?;
        if !self.name.is_empty() {
            write!(f, " {}", self.name)?;
        }
        Ok(())
    }
}

/// The regions worth reading: readable and private, not the kernel's special mappings.
pub fn regions(maps: &str) -> Vec<Region> {
    maps.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (range, perms) = (f.next()?, f.next()?);
            let dev = f.nth(1).and_then(crate::detect::mounts::maps_device)?;
            let name = f.nth(1).unwrap_or("").to_string();
            let (start, end) = range.split_once('-')?;
            let region = Region {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                perms: perms.to_string(),
                name,
                dev,
            };
            let readable_private = perms.starts_with('r') && perms.get(3..4) == Some("p");
            let special = matches!(
                region.name.as_str(),
                "[vvar]" | "[vsyscall]" | "[vvar_vclock]"
            );
            (readable_private && !special && region.end > region.start).then_some(region)
        })
        .collect()
}

/// YARA matches in the memory of `pid`, each with the region it was found in. A process that
/// is gone or unreadable gives nothing; regions of files on `mounts` that may hang are skipped.
pub(crate) fn scan(
    scanner: &mut FileScanner<'_>,
    pid: u32,
    limits: MemScanLimits,
    mounts: &Mounts,
) -> Vec<(RuleMatch, Region)> {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return Vec::new();
    };
    let Ok(mem) = File::open(format!("/proc/{pid}/mem")) else {
        return Vec::new();
    };
    let mut budget = limits.per_process;
    let mut buf = Vec::new();
    let mut out: Vec<(RuleMatch, Region)> = Vec::new();
    for region in regions(&maps) {
        if region.dev != 0 && mounts.may_hang(region.dev) {
            continue;
        }
        if budget == 0 {
            break;
        }
        let len = (region.end - region.start)
            .min(limits.per_region)
            .min(budget);
        budget -= len;
        buf.resize(len as usize, 0);
        let Ok(n) = read_region(&mem, region.start, &mut buf) else {
            continue;
        };
        let Ok(found) = scanner.scan_bytes(&buf[..n]) else {
            continue;
        };
        for m in found {
            // Once per rule: the first region it matched in.
            if !out
                .iter()
                .any(|(o, _)| o.rule == m.rule && o.source == m.source)
            {
                out.push((m, region.clone()));
            }
        }
    }
    out
}

/// Reads as much of the region as can be read from its start (a guard page or an unmapped
/// hole ends it early).
fn read_region(mem: &File, start: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match mem.read_at(&mut buf[done..], start + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if done == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_readable_private_regions_are_read() {
        let maps = "\
55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0                          [heap]
7f1c2a000000-7f1c2a021000 rw-s 00000000 00:05 1234                       /dev/shm/x
7f1c2b000000-7f1c2b001000 ---p 00000000 00:00 0
7f1c2c000000-7f1c2c010000 r-xp 00000000 08:01 42                         /usr/lib/libc.so.6
7ffd1e1f0000-7ffd1e1f4000 r--p 00000000 00:00 0                          [vvar]
";
        let r = regions(maps);
        let names: Vec<&str> = r.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, vec!["[heap]", "/usr/lib/libc.so.6"]);
        assert_eq!(r[0].start, 0x55d0c0a00000);
        assert_eq!(r[0].to_string(), "55d0c0a00000-55d0c0a21000 rw-p [heap]");
        assert_eq!(r[0].dev, 0);
        assert_eq!(r[1].dev, crate::detect::mounts::makedev(8, 1));
    }
}
