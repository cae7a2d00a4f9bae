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
use std::sync::mpsc;
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

/// Runs a program that speaks the compile protocol on its standard input and output.
#[derive(Debug, Clone)]
pub struct ChildCompiler {
    program: PathBuf,
    /// The name the child is shown with (`ps`), when not `program`.
    arg0: Option<OsString>,
    args: Vec<OsString>,
    deadline: Duration,
    max_answer: u64,
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
        }
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
                let late = matches!(
                    stopped.recv_timeout(self.deadline),
                    Err(mpsc::RecvTimeoutError::Timeout)
                );
                if late {
                    let _ = rustix::process::kill_process(pid, Signal::KILL);
                }
                late
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
            let timed_out = watchdog.join().unwrap_or(false);
            Run {
                answer,
                read,
                overflow,
                timed_out,
                exited,
            }
        })
    }
}

impl IsolatedCompiler for ChildCompiler {
    fn compile(&self, request: &[u8]) -> Result<Vec<u8>, IsolatedError> {
        let started = Instant::now();
        let (mut child, stdin, stdout, pid) = self.spawn()?;
        let run = self.exchange(request, stdin, stdout, pid);
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
