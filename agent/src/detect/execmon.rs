//! Exec events from the kernel's process connector (netlink, `NETLINK_CONNECTOR`): the pid of
//! every process on the host that completes an `execve`, as it happens. The process monitor
//! judges each one at once instead of at its next poll of `/proc`, so short-lived processes are
//! seen too, on every file system (fanotify only covers the marked ones). A process that exits
//! before its `/proc` entry is read is missed here; fanotify's exec events, which carry the
//! executable's descriptor, cover that on the watched file systems.
//!
//! Needs CAP_NET_ADMIN; without it the monitor polls `/proc` only, and the log says so. Events
//! lost to a full socket buffer (ENOBUFS) are counted; the next poll still finds the processes
//! that are alive.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{
    AddressFamily, RecvFlags, SendFlags, SocketType, bind, recvfrom, send, socket, sockopt,
};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::telemetry::{Counter, Counters};

/// The connector's process events (`CN_IDX_PROC`, `CN_VAL_PROC` in linux/connector.h).
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
/// `PROC_CN_MCAST_LISTEN` (linux/cn_proc.h).
const PROC_CN_MCAST_LISTEN: u32 = 1;
/// `PROC_EVENT_EXEC` (linux/cn_proc.h).
const PROC_EVENT_EXEC: u32 = 2;
/// `NLMSG_DONE`: the type of a message to the connector, and of the end of a dump.
pub(crate) const NLMSG_DONE: u16 = 3;
/// `struct nlmsghdr` and `struct cn_msg`.
pub(crate) const NLMSG_HDR: usize = 16;
const CN_MSG_HDR: usize = 20;

/// Pids waiting for the process monitor; past this, events are dropped and counted.
const PENDING: usize = 4096;

/// How often the reader looks at the stop token while no event comes.
const STOP_CHECK: Duration = Duration::from_millis(250);

/// Why exec events are unavailable.
#[derive(Debug, thiserror::Error)]
pub enum ExecMonError {
    #[error("cannot open the process connector: {0}")]
    Socket(Errno),
    #[error("cannot subscribe to process events: {0} (it needs CAP_NET_ADMIN)")]
    Subscribe(Errno),
    #[error("cannot start the exec-events thread: {0}")]
    Thread(std::io::Error),
}

/// Subscribes to exec events; the pids arrive on the receiver until `stop` fires (then the
/// thread returns and the receiver disconnects).
pub fn start(
    stop: CancellationToken,
    counters: Arc<Counters>,
) -> Result<(Receiver<u32>, JoinHandle<()>), ExecMonError> {
    let sock = subscribe()?;
    let (tx, rx) = sync_channel(PENDING);
    let thread = std::thread::Builder::new()
        .name("exec-events".into())
        .spawn(move || {
            let mut buf = vec![0u8; 8192];
            while !stop.is_cancelled() {
                let n = match recvfrom(&sock, &mut buf[..], RecvFlags::empty()) {
                    // Only the kernel (port 0) speaks for the process connector: a message
                    // another process sent to this socket is dropped unread.
                    Ok((_, n, Some(from)))
                        if SocketAddrNetlink::try_from(from.clone())
                            .is_ok_and(|a| a.pid() == 0) =>
                    {
                        n
                    }
                    Ok(_) => continue,
                    Err(Errno::AGAIN | Errno::INTR) => continue,
                    Err(Errno::NOBUFS) => {
                        counters.inc(Counter::ExecEventsLost);
                        continue;
                    }
                    Err(e) => {
                        warn!(error = %e, "process connector failed; processes are polled only");
                        return;
                    }
                };
                for pid in exec_pids(buf.get(..n).unwrap_or_default()) {
                    match tx.try_send(pid) {
                        Ok(()) => {}
                        Err(TrySendError::Full(_)) => counters.inc(Counter::ExecEventsLost),
                        Err(TrySendError::Disconnected(_)) => return,
                    }
                }
            }
        })
        .map_err(ExecMonError::Thread)?;
    Ok((rx, thread))
}

/// A connector socket bound to the process events group, listening.
fn subscribe() -> Result<OwnedFd, ExecMonError> {
    let sock = socket(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        Some(netlink::CONNECTOR),
    )
    .map_err(ExecMonError::Socket)?;
    bind(&sock, &SocketAddrNetlink::new(0, CN_IDX_PROC)).map_err(ExecMonError::Subscribe)?;
    // A larger buffer absorbs bursts of execs; failing to get one only makes drops likelier.
    let _ = sockopt::set_socket_recv_buffer_size(&sock, 4 << 20);
    sockopt::set_socket_timeout(&sock, sockopt::Timeout::Recv, Some(STOP_CHECK))
        .map_err(ExecMonError::Socket)?;
    send(&sock, &listen_message(), SendFlags::empty()).map_err(ExecMonError::Subscribe)?;
    Ok(sock)
}

/// `nlmsghdr` + `cn_msg` + `PROC_CN_MCAST_LISTEN`, in the host's byte order.
fn listen_message() -> Vec<u8> {
    let total = NLMSG_HDR + CN_MSG_HDR + 4;
    let mut m = Vec::with_capacity(total);
    m.extend_from_slice(&(total as u32).to_ne_bytes());
    m.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
    m.extend_from_slice(&0u16.to_ne_bytes()); // flags
    m.extend_from_slice(&0u32.to_ne_bytes()); // seq
    m.extend_from_slice(&std::process::id().to_ne_bytes());
    m.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
    m.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // ack
    m.extend_from_slice(&4u16.to_ne_bytes()); // payload length
    m.extend_from_slice(&0u16.to_ne_bytes()); // flags
    m.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
    m
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at + 4)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

/// The process ids (tgid) of the exec events in one datagram; anything else is skipped, and
/// a short or malformed message ends the parse.
fn exec_pids(mut b: &[u8]) -> Vec<u32> {
    let mut out = Vec::new();
    while let Some(len) = u32_at(b, 0) {
        let len = len as usize;
        if len < NLMSG_HDR || len > b.len() {
            break;
        }
        let msg = &b[NLMSG_HDR..len];
        // cn_msg: id.idx, id.val, seq, ack, len (u16), flags (u16); then struct proc_event:
        // what, cpu, timestamp_ns (u64), then for exec: process_pid, process_tgid.
        let ev = CN_MSG_HDR;
        if u32_at(msg, 0) == Some(CN_IDX_PROC)
            && u32_at(msg, ev) == Some(PROC_EVENT_EXEC)
            && let Some(tgid) = u32_at(msg, ev + 20)
        {
            out.push(tgid);
        }
        // Messages are aligned to 4 bytes.
        let next = (len + 3) & !3;
        b = b.get(next..).unwrap_or_default();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec_event(pid: u32, tgid: u32, what: u32) -> Vec<u8> {
        let mut m = Vec::new();
        let total = (NLMSG_HDR + CN_MSG_HDR + 24) as u32;
        m.extend_from_slice(&total.to_ne_bytes());
        m.extend_from_slice(&[0u8; 12]);
        m.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        m.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        m.extend_from_slice(&[0u8; 12]);
        m.extend_from_slice(&what.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&0u64.to_ne_bytes());
        m.extend_from_slice(&pid.to_ne_bytes());
        m.extend_from_slice(&tgid.to_ne_bytes());
        m
    }

    #[test]
    fn exec_events_give_their_process_id_and_others_are_skipped() {
        let mut b = exec_event(41, 40, PROC_EVENT_EXEC);
        b.extend(exec_event(7, 7, 1)); // a fork
        b.extend(exec_event(9, 9, PROC_EVENT_EXEC));
        assert_eq!(exec_pids(&b), vec![40, 9]);
        // Cut short, or a length past the end: what is whole is kept, nothing panics.
        assert_eq!(exec_pids(&b[..b.len() - 3]), vec![40]);
        let mut bad = exec_event(1, 1, PROC_EVENT_EXEC);
        bad[0] = 0xff;
        assert!(exec_pids(&bad).is_empty());
        assert!(exec_pids(&[1, 2]).is_empty());
    }

    #[test]
    fn the_listen_message_has_the_connector_layout() {
        let m = listen_message();
        assert_eq!(m.len(), 40);
        assert_eq!(u32_at(&m, 0), Some(40));
        assert_eq!(u32_at(&m, 16), Some(CN_IDX_PROC));
        assert_eq!(u32_at(&m, 36), Some(PROC_CN_MCAST_LISTEN));
    }
}
