//! The agent's self-limits: a memory ceiling (`max_rss`) it enforces on itself, and giving
//! freed memory back to the system.
//!
//! Resident memory is sampled every second ([`Governor::tick`]). Past the ceiling the agent
//! sheds and slows down rather than grow until something kills it:
//! - every scanner (pool workers, full scans, process and verdict threads) releases its YARA
//!   scanner and read buffer after its current file;
//! - files are then scanned one at a time ([`Governor::paced`]), so at most one file's bytes
//!   and one scanner's memory are in use;
//! - the allocator's free memory is given back to the system;
//! - so are the resident pages of the agent's executable (see below).
//!
//! It leaves that state below 90 % of the ceiling. Nothing is dropped: files wait in the scan
//! queue (whose bound slows the watcher down) and detections wait in the spool. The rules in
//! force are not shed: a ceiling below what they need keeps the agent in the slow state, and
//! the heartbeat shows it (`memory_over_limit`).
//!
//! Start-up runs code an idle agent never runs again (configuration, enrolment checks, loading
//! the rules, the first full scan and the first judgement of every process), and the kernel
//! keeps those pages of the executable mapped, so they count in the agent's resident memory.
//! Once the start-up work is done (and whenever the agent goes over its ceiling) the agent
//! asks the kernel to reclaim its executable's pages ([`release_code_pages`]): what it runs
//! afterwards is read back as it runs, the rest stays out.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use tracing::{debug, info, warn};

use crate::telemetry::{Counter, Counters};

/// Memory growth since the last trim that triggers another one.
const TRIM_AFTER_GROWTH: u64 = 16 << 20;
/// Ticks between trims in any case: memory freed after a trim that came at a peak (a burst of
/// scans, the first judgement of every process) is otherwise kept until the next growth.
const TRIM_EVERY_TICKS: u64 = 10;

/// The process-wide governor (resident memory is the process's).
pub fn governor() -> &'static Governor {
    static GOVERNOR: Governor = Governor::new();
    &GOVERNOR
}

/// Shared by every thread that scans.
pub struct Governor {
    /// The ceiling in bytes; 0: none.
    limit: AtomicU64,
    over: AtomicBool,
    /// Bumped when scanners must be released; a scanner made before is released after its
    /// current file.
    generation: AtomicU64,
    /// Held while scanning one file when over the ceiling.
    serial: Mutex<()>,
    /// Someone freed a lot (a rule set replaced, idle scanners released): trim at the next tick.
    trim_wanted: AtomicBool,
    /// Resident memory after the last trim.
    trimmed_at: AtomicU64,
    /// Samples taken.
    ticks: AtomicU64,
    /// Start-up jobs still running.
    startup: AtomicU32,
    /// Give the executable's pages back at the next tick.
    shed_code: AtomicBool,
}

/// What one sample changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Under the ceiling, or still over it.
    Stay,
    /// Just went over the ceiling.
    Over,
    /// Back under 90 % of it.
    Under,
}

/// The state change one sample of resident memory makes, with hysteresis.
pub fn step(over: bool, rss: u64, limit: u64) -> Step {
    if limit == 0 {
        return if over { Step::Under } else { Step::Stay };
    }
    if !over && rss > limit {
        Step::Over
    } else if over && rss < limit / 10 * 9 {
        Step::Under
    } else {
        Step::Stay
    }
}

impl Governor {
    const fn new() -> Governor {
        Governor {
            limit: AtomicU64::new(0),
            over: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            serial: Mutex::new(()),
            trim_wanted: AtomicBool::new(false),
            trimmed_at: AtomicU64::new(0),
            ticks: AtomicU64::new(0),
            startup: AtomicU32::new(0),
            shed_code: AtomicBool::new(false),
        }
    }

    /// Start-up is `jobs` jobs (the first full scan, the first walk of the processes), each
    /// of which calls [`Governor::startup_job_done`] once; when the last has, the executable's
    /// pages are given back at the next tick. Called before the jobs start.
    pub fn expect_startup(&self, jobs: u32) {
        self.startup.store(jobs, Ordering::Relaxed);
        if jobs == 0 {
            self.shed_code.store(true, Ordering::Relaxed);
        }
    }

    /// One start-up job has ended (a no-op once start-up is over).
    pub fn startup_job_done(&self) {
        let before = self
            .startup
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if before == Ok(1) {
            self.shed_code.store(true, Ordering::Relaxed);
        }
    }

    /// Sets the ceiling (0: none) and shows it in the counters.
    pub fn set_limit(&self, bytes: u64, counters: &Counters) {
        self.limit.store(bytes, Ordering::Relaxed);
        counters.set(Counter::MemoryLimitBytes, bytes);
        counters.set(Counter::MemoryOverLimit, 0);
    }

    /// Whether the agent is over its ceiling.
    pub fn over(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// The current generation: remember it when making a scanner.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Whether a scanner made at generation `made` must be released now; when it must, counts
    /// it and moves `made` to the current generation.
    pub fn release_due(&self, made: &mut u64, counters: &Counters) -> bool {
        let now = self.generation();
        if *made == now {
            return false;
        }
        *made = now;
        counters.inc(Counter::ScannersReleased);
        true
    }

    /// Runs one file's scan: at once under the ceiling, one at a time over it.
    pub fn paced<R>(&self, scan: impl FnOnce() -> R) -> R {
        if self.over() {
            let _one = self.serial.lock().unwrap_or_else(|p| p.into_inner());
            scan()
        } else {
            scan()
        }
    }

    /// Asks for the allocator's free memory to be given back at the next tick.
    pub fn want_trim(&self) {
        self.trim_wanted.store(true, Ordering::Relaxed);
    }

    /// One sample: resident memory against the ceiling. Called every second by the daemon.
    pub fn tick(&self, counters: &Counters) {
        counters.set(Counter::CpuUsedPercent, crate::budget::budget().sample());
        let Some(rss) = crate::telemetry::resident_bytes() else {
            return;
        };
        counters.set(Counter::RssBytes, rss);
        let limit = self.limit.load(Ordering::Relaxed);
        let tick = self.ticks.fetch_add(1, Ordering::Relaxed) + 1;
        let mut trim = self.trim_wanted.swap(false, Ordering::Relaxed)
            || rss > self.trimmed_at.load(Ordering::Relaxed) + TRIM_AFTER_GROWTH
            || tick.is_multiple_of(TRIM_EVERY_TICKS);
        let startup_over = self.shed_code.swap(false, Ordering::Relaxed);
        let mut shed_code = startup_over;
        match step(self.over(), rss, limit) {
            Step::Stay => {}
            Step::Over => {
                self.over.store(true, Ordering::Relaxed);
                self.generation.fetch_add(1, Ordering::Relaxed);
                counters.inc(Counter::MemoryLimitExceeded);
                counters.set(Counter::MemoryOverLimit, 1);
                warn!(
                    resident_mib = rss >> 20,
                    max_rss_mib = limit >> 20,
                    "over max_rss: releasing scanners, scanning one file at a time"
                );
                trim = true;
                shed_code = true;
            }
            Step::Under => {
                self.over.store(false, Ordering::Relaxed);
                counters.set(Counter::MemoryOverLimit, 0);
                info!(
                    resident_mib = rss >> 20,
                    "back under max_rss: scanning at full speed"
                );
            }
        }
        let released = shed_code.then(release_code_pages);
        if trim || shed_code {
            release_free_memory();
            let after = crate::telemetry::resident_bytes().unwrap_or(rss);
            self.trimmed_at.store(after, Ordering::Relaxed);
            counters.set(Counter::RssBytes, after);
            let released_mib = rss.saturating_sub(after) >> 20;
            match released {
                Some(Ok(_)) if startup_over => info!(
                    resident_mib = after >> 20,
                    released_mib, "start-up finished; the executable's pages given back"
                ),
                Some(Ok(_)) => debug!(released_mib, "the executable's pages given back"),
                Some(Err(e)) => {
                    debug!(error = %e, "cannot give the executable's pages back");
                    if startup_over {
                        info!(resident_mib = after >> 20, "start-up finished");
                    }
                }
                None => {}
            }
        }
    }
}

/// Buffers from this size up are mapped for themselves and unmapped when freed.
const MMAP_THRESHOLD: i32 = 8 << 20;
/// Free memory past this at the top of a heap is given back at once.
const TRIM_THRESHOLD: i32 = 2 << 20;

/// Fixes the allocator's thresholds for a long-running daemon. By default glibc raises both
/// after each large buffer is freed (up to 32 and 64 MiB): scanning one large file then
/// leaves tens of MiB free at the top of a thread's heap, which `malloc_trim` does not return
/// for heaps other than the main one.
#[allow(unsafe_code)]
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; it touches no allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Gives the allocator's free memory back to the system.
#[allow(unsafe_code)]
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions: it returns the free pages of every glibc heap
    // to the system and touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Asks the kernel to reclaim the resident pages of the agent's executable (its code and
/// read-only data: `MADV_PAGEOUT` on each read-only mapping of the file). They are read back
/// from the file as the agent runs them again; pages another process also maps are left.
/// Returns the bytes of mappings advised. Needs Linux 5.4; fails with `EINVAL` before.
#[allow(unsafe_code)]
pub fn release_code_pages() -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let exe = std::fs::metadata("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut advised = 0;
    for (start, end) in executable_mappings(&maps, exe.dev(), exe.ino()) {
        let len = end - start;
        // SAFETY: MADV_PAGEOUT is advice: the kernel may drop clean pages of this read-only
        // file mapping and reads them back from the file on the next access, so no memory
        // the program can see changes (also if the mapping were replaced meanwhile: any
        // page it reclaims is read back or swapped back with the same contents).
        let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_PAGEOUT) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        advised += len as u64;
    }
    Ok(advised)
}

/// The read-only mappings of the file `(dev, ino)` in `/proc/PID/maps` text: start and end.
fn executable_mappings(maps: &str, dev: u64, ino: u64) -> Vec<(usize, usize)> {
    let (major, minor) = (
        u64::from(rustix::fs::major(dev)),
        u64::from(rustix::fs::minor(dev)),
    );
    maps.lines()
        .filter_map(|line| {
            let mut f = line.split_ascii_whitespace();
            let (range, perms, _offset, device, inode) =
                (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
            let (start, end) = range.split_once('-')?;
            let (maj, min) = device.split_once(':')?;
            let same = inode.parse::<u64>().ok()? == ino
                && u64::from_str_radix(maj, 16).ok()? == major
                && u64::from_str_radix(min, 16).ok()? == minor;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            (same && !perms.contains('w') && end > start).then_some((start, end))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn over_the_ceiling_then_back_under_ninety_percent() {
        assert_eq!(step(false, 99 * MIB, 100 * MIB), Step::Stay);
        assert_eq!(step(false, 101 * MIB, 100 * MIB), Step::Over);
        assert_eq!(step(true, 120 * MIB, 100 * MIB), Step::Stay);
        // Hysteresis: under the ceiling is not enough.
        assert_eq!(step(true, 95 * MIB, 100 * MIB), Step::Stay);
        assert_eq!(step(true, 89 * MIB, 100 * MIB), Step::Under);
    }

    #[test]
    fn no_ceiling_never_sheds() {
        assert_eq!(step(false, u64::MAX, 0), Step::Stay);
        assert_eq!(step(true, 10, 0), Step::Under);
    }

    #[test]
    fn scanners_made_before_shedding_are_released_once() {
        let g = Governor::new();
        let counters = Counters::default();
        let mut made = g.generation();
        assert!(!g.release_due(&mut made, &counters));
        g.generation.fetch_add(1, Ordering::Relaxed);
        assert!(g.release_due(&mut made, &counters));
        assert!(!g.release_due(&mut made, &counters));
        assert_eq!(counters.get(Counter::ScannersReleased), 1);
    }

    #[test]
    fn a_tick_over_a_tiny_ceiling_sheds_and_counts() {
        let g = Governor::new();
        let counters = Counters::default();
        // Any process is over one byte.
        g.set_limit(1, &counters);
        let before = g.generation();
        g.tick(&counters);
        assert!(g.over());
        assert_eq!(g.generation(), before + 1);
        assert_eq!(counters.get(Counter::MemoryLimitExceeded), 1);
        assert_eq!(counters.get(Counter::MemoryOverLimit), 1);
        assert!(counters.get(Counter::RssBytes) > 0);
        // Still over: counted once.
        g.tick(&counters);
        assert_eq!(counters.get(Counter::MemoryLimitExceeded), 1);
        // paced still runs the scan while over.
        assert_eq!(g.paced(|| 7), 7);
        g.set_limit(0, &counters);
        g.tick(&counters);
        assert!(!g.over());
        assert_eq!(counters.get(Counter::MemoryOverLimit), 0);
    }

    #[test]
    fn the_executable_is_given_back_when_the_last_startup_job_ends() {
        let g = Governor::new();
        g.expect_startup(2);
        g.startup_job_done();
        assert!(!g.shed_code.load(Ordering::Relaxed));
        g.startup_job_done();
        assert!(g.shed_code.swap(false, Ordering::Relaxed));
        // Later calls (a second full scan, say) are not start-up.
        g.startup_job_done();
        assert!(!g.shed_code.load(Ordering::Relaxed));
        // Nothing to wait for: at the first tick.
        g.expect_startup(0);
        assert!(g.shed_code.load(Ordering::Relaxed));
    }

    #[test]
    fn only_read_only_mappings_of_the_executable_are_advised() {
        // makedev(254, 0) = 0xfe00; another file on the same device, another device, anonymous.
        let maps = "\
55d0a000-55d0b000 r--p 00000000 fe:00 42   /usr/bin/vedette-agent
55d0b000-55d0f000 r-xp 00001000 fe:00 42   /usr/bin/vedette-agent
55d0f000-55d10000 r--p 00005000 fe:00 42   /usr/bin/vedette-agent
55d10000-55d11000 rw-p 00006000 fe:00 42   /usr/bin/vedette-agent
55d11000-55d12000 rw-p 00000000 00:00 0    [heap]
7f000000-7f001000 r-xp 00000000 fe:00 43   /usr/lib/libc.so.6
7f001000-7f002000 r-xp 00000000 fe:01 42   /mnt/vedette-agent
7f002000-7f003000 r-xp 00000000 fe:00 42   /usr/bin/vedette-agent (deleted)
garbage line
";
        assert_eq!(
            executable_mappings(maps, 0xfe00, 42),
            [
                (0x55d0a000, 0x55d0b000),
                (0x55d0b000, 0x55d0f000),
                (0x55d0f000, 0x55d10000),
                (0x7f002000, 0x7f003000)
            ]
        );
        assert!(executable_mappings(maps, 0xfe00, 44).is_empty());
    }

    /// Resident bytes of this test program's read-only mappings of its executable.
    fn resident_code() -> u64 {
        use std::os::unix::fs::MetadataExt;
        let exe = std::fs::metadata("/proc/self/exe").unwrap();
        let ranges = executable_mappings(
            &std::fs::read_to_string("/proc/self/maps").unwrap(),
            exe.dev(),
            exe.ino(),
        );
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        let mut rss = 0;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((a, _)) = range.split_once('-')
                && let Ok(a) = usize::from_str_radix(a, 16)
            {
                inside = ranges.iter().any(|(s, _)| *s == a);
            } else if inside && let Some(kb) = line.strip_prefix("Rss:") {
                rss += kb.trim_end_matches("kB").trim().parse::<u64>().unwrap() << 10;
            }
        }
        rss
    }

    /// Runs in a process of its own (see the next test): in the test harness's process, other
    /// tests page the executable out too and run code meanwhile.
    #[test]
    #[ignore = "run in a process of its own by the_executables_resident_pages_go_back_to_the_kernel"]
    fn pageout_in_a_fresh_process() {
        let before = resident_code();
        let advised = release_code_pages().expect("MADV_PAGEOUT (Linux 5.4 or later)");
        let after = resident_code();
        println!("pageout: advised {advised} resident before {before} after {after}");
    }

    #[test]
    fn the_executables_resident_pages_go_back_to_the_kernel() {
        // A test program just linked is still dirty in the page cache, and the kernel does not
        // reclaim dirty pages on advice; an installed agent's executable is clean.
        let exe = std::env::current_exe().unwrap();
        std::fs::File::open(&exe).unwrap().sync_all().unwrap();
        let out = std::process::Command::new(&exe)
            .args(["--exact", "governor::tests::pageout_in_a_fresh_process"])
            .args(["--ignored", "--nocapture", "--test-threads", "1"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        let line = stdout
            .lines()
            .find_map(|l| l.split_once("pageout: ").map(|(_, figures)| figures))
            .unwrap_or_else(|| panic!("no figures in {stdout}"));
        let n: Vec<u64> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        let [advised, before, after] = n[..] else {
            panic!("{line}");
        };
        assert!(before > 1 << 20, "{line}");
        assert!(advised >= before, "{line}");
        // What runs between the two readings (the test itself) comes back.
        assert!(after < before / 3 * 2, "{line}");
    }
}
