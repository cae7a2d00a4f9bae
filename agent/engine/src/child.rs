//! The YARA compiler of a long-running process: its own executable, run as `PROGRAM
//! compile-rules` (`vedette-agent` for each rule set not in the compiled-rules cache,
//! `vedette-collector` for each bundle published and each YARA item of outside intel). The
//! caller writes the rule sources to the child's standard input and loads the compiled rules it
//! writes back (see [`crate::isolated`]), so the caller never holds the compiler: not its peak
//! memory (signature-base: over 100 MiB), not its code pages, and not a crash or an endless
//! compile on some rule file, which fails those rules while the caller keeps running.
//!
//! The child is `/proc/self/exe`, the very file the caller runs (even when a package upgrade
//! has replaced it on disk since), so the compiled rules always come from the same engine that
//! loads them. It gets nothing but the sources: no descriptor of the caller's, no argument from
//! the network. It is killed past its deadline, and when the caller dies.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::process::{Pid, Signal, WaitId, WaitIdOptions};
use tracing::debug;

use crate::{IsolatedCompiler, IsolatedError};

/// The subcommand a process runs itself with to compile.
pub const SUBCOMMAND: &str = "compile-rules";

/// Longest a compile may take; signature-base takes a few seconds.
const DEADLINE: Duration = Duration::from_secs(600);

/// Largest answer taken (compiled signature-base: about 40 MiB).
const MAX_ANSWER: u64 = 2 << 30;

/// How often a paced child's CPU time is read and charged.
const PACE_TICK: Duration = Duration::from_millis(100);

/// Charged the CPU time a child used since the last call; answers how long to pause it.
#[derive(Clone)]
pub struct Pacer(pub Arc<dyn Fn(Duration) -> Duration + Send + Sync>);

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pacer")
    }
}

/// Runs a program that speaks the compile protocol on its standard input and output.
#[derive(Debug, Clone)]
pub struct ChildCompiler {
    program: PathBuf,
    /// The name the child is shown with (`ps`), when not `program`.
    arg0: Option<OsString>,
    args: Vec<OsString>,
    deadline: Duration,
    max_answer: u64,
    pacer: Option<Pacer>,
}

impl ChildCompiler {
    /// This executable, as `PROGRAM compile-rules` (`program` is the name `ps` shows).
    pub fn this_executable(program: &str) -> ChildCompiler {
        ChildCompiler {
            arg0: Some(program.into()),
            ..ChildCompiler::new("/proc/self/exe", [SUBCOMMAND])
        }
    }

    pub fn new<I, S>(program: impl Into<PathBuf>, args: I) -> ChildCompiler
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        ChildCompiler {
            program: program.into(),
            arg0: None,
            args: args.into_iter().map(Into::into).collect(),
            deadline: DEADLINE,
            max_answer: MAX_ANSWER,
            pacer: None,
        }
    }

    /// Charges the child's CPU time to `pacer` as it runs (every [`PACE_TICK`]), and stops
    /// the child (`SIGSTOP`, then `SIGCONT`) for as long as the pacer answers: a compile kept
    /// within a CPU budget.
    pub fn with_pacer(
        mut self,
        pacer: Arc<dyn Fn(Duration) -> Duration + Send + Sync>,
    ) -> ChildCompiler {
        self.pacer = Some(Pacer(pacer));
        self
    }

    /// Kills the child when it has not finished within `deadline`.
    pub fn with_deadline(mut self, deadline: Duration) -> ChildCompiler {
        self.deadline = deadline;
        self
    }

    /// Kills the child when it writes more than `bytes`.
    pub fn with_max_answer(mut self, bytes: u64) -> ChildCompiler {
        self.max_answer = bytes;
        self
    }
}

/// What came of one run of the child.
struct Run {
    answer: Vec<u8>,
    read: std::io::Result<usize>,
    overflow: bool,
    timed_out: bool,
    exited: Result<(), Errno>,
    /// CPU time of the child charged to the pacer while it ran.
    charged: Duration,
}

impl ChildCompiler {
    /// The child, started with pipes to its standard input and output.
    fn spawn(&self) -> Result<(std::process::Child, ChildStdin, ChildStdout, Pid), IsolatedError> {
        let mut command = Command::new(&self.program);
        if let Some(name) = &self.arg0 {
            command.arg0(name);
        }
        let mut child = command
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                IsolatedError::Unavailable(format!("`{}`: {e}", self.program.display()))
            })?;
        let (Some(stdin), Some(stdout), Some(pid)) = (
            child.stdin.take(),
            child.stdout.take(),
            Pid::from_raw(child.id() as i32),
        ) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(IsolatedError::Unavailable("no pipe to the child".into()));
        };
        Ok((child, stdin, stdout, pid))
    }

    /// Writes the request, reads the answer (killing the child past `max_answer` bytes or
    /// its deadline), and waits until it has exited, leaving it unreaped.
    fn exchange(
        &self,
        request: &[u8],
        mut stdin: ChildStdin,
        mut stdout: ChildStdout,
        pid: Pid,
    ) -> Run {
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::scope(|s| {
            // The child reads all of its input before it writes: a writer of its own keeps a
            // child that reads slowly (or not at all) from blocking the reader below.
            s.spawn(move || {
                let _ = stdin.write_all(request);
            });
            // The child is reaped only after this thread has ended: its pid is its own until
            // then, whatever the kill below races with.
            let watchdog = s.spawn(move || {
                let mut charged = Duration::ZERO;
                let late = self.watch(&stopped, pid, &mut charged);
                if late {
                    let _ = rustix::process::kill_process(pid, Signal::KILL);
                }
                (late, charged)
            });
            let mut answer = Vec::new();
            let read = (&mut stdout)
                .take(self.max_answer.saturating_add(1))
                .read_to_end(&mut answer);
            let overflow = answer.len() as u64 > self.max_answer;
            if overflow {
                let _ = rustix::process::kill_process(pid, Signal::KILL);
            }
            drop(stdout);
            let exited = exited_unreaped(pid);
            let _ = stop.send(());
            let (timed_out, charged) = watchdog.join().unwrap_or((false, Duration::ZERO));
            Run {
                answer,
                read,
                overflow,
                timed_out,
                exited,
                charged,
            }
        })
    }
}

impl ChildCompiler {
    /// Waits for the child to be done (a message on `stopped`), pacing it meanwhile; true when
    /// its deadline came first. `charged` is the CPU time charged to the pacer so far.
    fn watch(&self, stopped: &mpsc::Receiver<()>, pid: Pid, charged: &mut Duration) -> bool {
        let until = Instant::now() + self.deadline;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            let Some(pacer) = &self.pacer else {
                return matches!(
                    stopped.recv_timeout(left),
                    Err(mpsc::RecvTimeoutError::Timeout)
                );
            };
            if !matches!(
                stopped.recv_timeout(left.min(PACE_TICK)),
                Err(mpsc::RecvTimeoutError::Timeout)
            ) {
                return false;
            }
            let used = cpu_time(pid);
            let pause = (pacer.0)(used.saturating_sub(*charged));
            *charged = (*charged).max(used);
            if pause.is_zero() {
                continue;
            }
            let _ = rustix::process::kill_process(pid, Signal::STOP);
            let done = stopped.recv_timeout(pause.min(left));
            let _ = rustix::process::kill_process(pid, Signal::CONT);
            if !matches!(done, Err(mpsc::RecvTimeoutError::Timeout)) {
                return false;
            }
        }
    }

    /// Charges the CPU time the child used after the last charge (it has exited, unreaped):
    /// a debt the scans that follow pay.
    fn charge_rest(&self, pid: Pid, charged: Duration) {
        if let Some(pacer) = &self.pacer {
            (pacer.0)(cpu_time(pid).saturating_sub(charged));
        }
    }
}

/// CPU time (user and system) of process `pid`, zero when unreadable.
fn cpu_time(pid: Pid) -> Duration {
    let stat =
        std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero())).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime (fields 14 and 15), in USER_HZ (100 a second).
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

impl IsolatedCompiler for ChildCompiler {
    fn compile(&self, request: &[u8]) -> Result<Vec<u8>, IsolatedError> {
        let started = Instant::now();
        let (mut child, stdin, stdout, pid) = self.spawn()?;
        let run = self.exchange(request, stdin, stdout, pid);
        self.charge_rest(pid, run.charged);
        let status = child.wait();
        debug!(
            pid = pid.as_raw_nonzero().get(),
            ms = started.elapsed().as_millis() as u64,
            bytes = run.answer.len(),
            "rule compiler finished"
        );
        let failed = |why: String| Err(IsolatedError::Failed(why));
        if run.timed_out {
            return failed(format!(
                "killed after its deadline of {}",
                humantime::format_duration(self.deadline)
            ));
        }
        if run.overflow {
            return failed(format!(
                "killed: its answer exceeds {} bytes",
                self.max_answer
            ));
        }
        if let Err(e) = run.exited {
            return failed(format!("cannot wait for it: {e}"));
        }
        match status {
            Ok(st) if st.success() => {}
            Ok(st) => return failed(describe(st)),
            Err(e) => return failed(format!("cannot wait for it: {e}")),
        }
        if let Err(e) = run.read {
            return failed(format!("cannot read its answer: {e}"));
        }
        Ok(run.answer)
    }
}

/// Waits until the child has exited, leaving it to be reaped.
fn exited_unreaped(pid: Pid) -> Result<(), Errno> {
    loop {
        match rustix::process::waitid(
            WaitId::Pid(pid),
            WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
        ) {
            Err(Errno::INTR) => continue,
            other => return other.map(|_| ()),
        }
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => {
            format!("it exited with status {code} (its messages are in the log)")
        }
        (None, Some(sig)) => format!("it was killed by signal {sig}"),
        _ => format!("it ended with {status}"),
    }
}

/// `PROGRAM compile-rules`: reads rule sources on standard input, writes the compiled rules on
/// standard output. Dies with the process that started it; runs without capabilities.
pub fn serve(program: &str) -> u8 {
    // Each step is a safeguard, not a condition for compiling (the caller compiles in its own
    // process where it cannot start this one): a step the kernel refuses is said on standard
    // error, which the caller's log keeps.
    let warn = |what: &str, e: Errno| eprintln!("{program} {SUBCOMMAND}: cannot {what}: {e}");
    // Killed with its parent, so that a compile never outlives the process that wants it.
    if let Err(e) = rustix::process::set_parent_process_death_signal(Some(Signal::KILL)) {
        warn("die with its parent", e);
    }
    // Compiling needs no privilege: whatever a rule file could make the compiler do, it does
    // without the caller's capabilities. The process has one thread yet, so every thread the
    // compiler starts inherits this.
    if let Err(e) = rustix::thread::set_no_new_privs(true) {
        warn("set no-new-privileges", e);
    }
    let none = rustix::thread::CapabilitySet::empty();
    if let Err(e) = rustix::thread::set_capabilities(
        None,
        rustix::thread::CapabilitySets {
            effective: none,
            permitted: none,
            inheritable: none,
        },
    ) {
        warn("drop its capabilities", e);
    }
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    match crate::isolated::serve(&mut stdin.lock(), &mut stdout.lock()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{program} {SUBCOMMAND}: {e}");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> ChildCompiler {
        ChildCompiler::new("/bin/sh", ["-c", script])
    }

    fn failure(c: &ChildCompiler) -> String {
        match c.compile(b"request") {
            Err(IsolatedError::Failed(why)) => why,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn the_request_goes_in_and_the_answer_comes_out_however_large() {
        // Larger than a pipe's buffer both ways: `cat` writes while it reads.
        let request: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
        let answer = ChildCompiler::new("/bin/cat", Vec::<String>::new())
            .compile(&request)
            .unwrap();
        assert_eq!(answer, request);
    }

    #[test]
    fn a_paced_child_is_stopped_for_what_the_pacer_says_and_every_cpu_second_is_charged() {
        use std::sync::Mutex;
        // The pacer asks for three times the CPU time charged as a pause: 25 % of a core.
        let charged = Arc::new(Mutex::new(Duration::ZERO));
        let total = charged.clone();
        let pacer = move |used: Duration| {
            *total.lock().unwrap() += used;
            used * 3
        };
        let started = Instant::now();
        let answer =
            sh("cat >/dev/null; i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; echo done")
                .with_pacer(Arc::new(pacer))
                .compile(b"x")
                .unwrap();
        assert_eq!(answer, b"done\n");
        let cpu = *charged.lock().unwrap();
        assert!(cpu >= Duration::from_millis(100), "charged {cpu:?}");
        // Paused three times what it used, less what its last tick and the clock's 10 ms
        // steps leave out.
        let wall = started.elapsed();
        assert!(
            wall >= (cpu * 3).saturating_sub(Duration::from_millis(400)) + cpu,
            "{wall:?} for {cpu:?} of CPU"
        );
    }

    #[test]
    fn a_child_that_fails_or_is_killed_is_a_failure_with_its_status() {
        let why = failure(&sh("cat >/dev/null; echo partial; exit 3"));
        assert!(why.contains("exited with status 3"), "{why}");
        let why = failure(&sh("kill -9 $$"));
        assert!(why.contains("killed by signal 9"), "{why}");
        // Exits without reading: the writer meets a closed pipe, the failure is the status.
        let why = failure(&sh("exit 4"));
        assert!(why.contains("status 4"), "{why}");
    }

    #[test]
    fn a_child_past_its_deadline_is_killed_and_reaped() {
        let started = Instant::now();
        let why = failure(&sh("exec sleep 600").with_deadline(Duration::from_millis(300)));
        assert!(why.contains("deadline of 300ms"), "{why}");
        assert!(started.elapsed() < Duration::from_secs(300));
        // Also when it closed its output and went on running.
        let why =
            failure(&sh("exec >&-; exec sleep 600").with_deadline(Duration::from_millis(300)));
        assert!(why.contains("deadline"), "{why}");
    }

    #[test]
    fn an_answer_past_the_cap_is_refused_and_its_writer_killed() {
        let why = failure(&sh("exec cat /dev/zero").with_max_answer(100_000));
        assert!(why.contains("exceeds 100000 bytes"), "{why}");
    }

    #[test]
    fn a_program_that_cannot_start_is_unavailable_not_failed() {
        let c = ChildCompiler::new("/nonexistent/vedette-agent", [SUBCOMMAND]);
        match c.compile(b"request") {
            Err(IsolatedError::Unavailable(why)) => {
                assert!(why.contains("/nonexistent/vedette-agent"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }
}
