//! Killing a process named by pid and start time: the pid is pinned with a pidfd first, then
//! its start time checked, then the signal sent through that pidfd, so a pid reused by another
//! process in between is never killed.

use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};

use super::{Refusal, failed, refused};
use crate::detect::procmon;

pub(super) fn kill(pid: u32, start_time: i64) -> Result<String, Refusal> {
    if pid <= 1 {
        return Err(refused(format!("pid {pid} is never killed")));
    }
    if pid == std::process::id() {
        return Err(refused("the agent does not kill itself"));
    }
    let Some(id) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return Err(refused(format!("{pid} is not a pid")));
    };
    let fd = pidfd_open(id, PidfdFlags::empty())
        .map_err(|e| refused(format!("no process {pid} ({e})")))?;
    // The pidfd holds this very process: what /proc says of the pid now is about it, as long
    // as it has not exited (then the signal below fails).
    let info = procmon::read(pid).ok_or_else(|| refused(format!("no process {pid}")))?;
    let started = procmon::start_time_secs(info.start_ticks);
    if started != start_time {
        return Err(refused(format!(
            "pid {pid} is another process now ({}): it started at {started}, not {start_time}",
            info.name
        )));
    }
    pidfd_send_signal(&fd, Signal::KILL)
        .map_err(|e| failed(format!("cannot signal pid {pid}: {e}")))?;
    Ok(format!(
        "killed pid {pid} ({}, started at {started})",
        info.name
    ))
}
