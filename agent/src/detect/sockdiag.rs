//! Sockets with a remote end, from the kernel's socket diagnostics (netlink
//! `NETLINK_SOCK_DIAG`, `inet_diag`): one binary dump per family and protocol. Reading
//! `/proc/net/tcp` instead makes the kernel walk its whole established-connections table and
//! print it as text: on a host with much memory (a large table) that was most of the idle
//! agent's CPU time, polling every second. `/proc/net` stays the fallback.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType, recv, sendto, socket, sockopt};

use crate::detect::execmon::{NLMSG_DONE, NLMSG_HDR};
use crate::detect::procmon::Conn;

const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `inet_diag_req_v2`: family, protocol, extensions, pad, states, `inet_diag_sockid` (48).
const REQ_LEN: usize = 56;
/// `inet_diag_msg` up to and including `idiag_inode`.
const MSG_LEN: usize = 72;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// A dump that stalls this long is abandoned (the caller falls back to `/proc/net`).
const TIMEOUT: Duration = Duration::from_secs(2);

/// Every UDP socket, and every TCP socket when `tcp`, IPv4 and IPv6, with a remote address;
/// None when the kernel's socket diagnostics cannot be used (the caller then reads `/proc/net`).
pub fn connections(tcp: bool) -> Option<Vec<Conn>> {
    let mut out = Vec::new();
    let all = [
        (AF_INET, IPPROTO_UDP, "udp"),
        (AF_INET6, IPPROTO_UDP, "udp6"),
        (AF_INET, IPPROTO_TCP, "tcp"),
        (AF_INET6, IPPROTO_TCP, "tcp6"),
    ];
    dump(&all[..if tcp { 4 } else { 2 }], |c| {
        if !c.remote.0.is_unspecified() {
            out.push(c);
        }
    })?;
    Some(out)
}

/// The inode of the UDP socket bound to `local` (its port, on that address or on any),
/// connected or not: the socket a datagram from this host was sent from.
pub fn udp_socket(local: (IpAddr, u16)) -> Option<u64> {
    let mut exact = None;
    let mut any = None;
    dump(
        &[
            (AF_INET, IPPROTO_UDP, "udp"),
            (AF_INET6, IPPROTO_UDP, "udp6"),
        ],
        |c| {
            if c.local.1 != local.1 {
                return;
            }
            let on = |a: IpAddr| match a {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
                v4 => v4,
            };
            if on(c.local.0) == on(local.0) {
                exact.get_or_insert(c.inode);
            } else if c.local.0.is_unspecified() {
                any.get_or_insert(c.inode);
            }
        },
    )?;
    exact.or(any)
}

/// Dumps every socket of the families and protocols given, handing each to `each`; None when
/// the kernel's socket diagnostics cannot be used.
fn dump(kinds: &[(u8, u8, &'static str)], mut each: impl FnMut(Conn)) -> Option<()> {
    let sock = socket(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        Some(netlink::SOCK_DIAG),
    )
    .ok()?;
    sockopt::set_socket_timeout(&sock, sockopt::Timeout::Recv, Some(TIMEOUT)).ok()?;
    let kernel = SocketAddrNetlink::new(0, 0);
    let mut buf = vec![0u8; 64 * 1024];
    for &(family, protocol, name) in kinds {
        sendto(
            &sock,
            &request(family, protocol),
            SendFlags::empty(),
            &kernel,
        )
        .ok()?;
        'dump: loop {
            let (n, _) = recv(&sock, &mut buf[..], RecvFlags::empty()).ok()?;
            let mut rest = buf.get(..n)?;
            if rest.is_empty() {
                return None;
            }
            while rest.len() >= NLMSG_HDR {
                let len = u32::from_ne_bytes(rest[0..4].try_into().ok()?) as usize;
                let kind = u16::from_ne_bytes(rest[4..6].try_into().ok()?);
                if len < NLMSG_HDR || len > rest.len() {
                    return None;
                }
                match kind {
                    NLMSG_DONE => break 'dump,
                    NLMSG_ERROR => return None,
                    SOCK_DIAG_BY_FAMILY => {
                        if let Some(c) = parse(&rest[NLMSG_HDR..len], name) {
                            each(c);
                        }
                    }
                    _ => {}
                }
                // Messages are 4-byte aligned.
                let next = (len + 3) & !3;
                rest = rest.get(next.min(rest.len())..)?;
            }
        }
    }
    Some(())
}

/// A dump request for every socket of one family and protocol, in any state.
fn request(family: u8, protocol: u8) -> Vec<u8> {
    let total = NLMSG_HDR + REQ_LEN;
    let mut m = Vec::with_capacity(total);
    m.extend_from_slice(&(total as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel assigns it
    m.extend_from_slice(&[family, protocol, 0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    m.resize(total, 0); // an empty socket id: no filter
    m
}

/// One `inet_diag_msg`: the socket's addresses (ports big-endian, addresses in network
/// order) and inode (the remote address unspecified for a socket with no remote end).
fn parse(msg: &[u8], protocol: &'static str) -> Option<Conn> {
    if msg.len() < MSG_LEN {
        return None;
    }
    let family = msg[0];
    let port = |at: usize| u16::from_be_bytes([msg[at], msg[at + 1]]);
    let addr = |at: usize| -> Option<IpAddr> {
        Some(match family {
            AF_INET => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&msg[at..at + 4]).ok()?)),
            AF_INET6 => IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(&msg[at..at + 16]).ok()?,
            )),
            _ => return None,
        })
    };
    let local = (addr(8)?, port(4));
    let remote = (addr(24)?, port(6));
    let inode = u64::from(u32::from_ne_bytes(msg[68..72].try_into().ok()?));
    (inode != 0).then_some(Conn {
        protocol,
        local,
        remote,
        inode,
    })
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    #[test]
    fn finds_a_loopback_connection_as_proc_net_does() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = TcpStream::connect(server).unwrap();
        let (_accepted, _) = listener.accept().unwrap();
        let Some(diag) = connections(true) else {
            eprintln!("skipped: the kernel's socket diagnostics are not available here");
            return;
        };
        let mine = |c: &&Conn| {
            c.protocol == "tcp"
                && c.remote == (server.ip(), server.port())
                && c.local.1 == client.local_addr().unwrap().port()
        };
        let found = diag.iter().find(mine).expect("the connection in the dump");
        let proc = crate::detect::procmon::proc_net_connections(true);
        let same = proc
            .iter()
            .find(mine)
            .expect("the connection in /proc/net/tcp");
        assert_eq!(found.inode, same.inode);
        assert_eq!(found.local, same.local);
    }

    #[test]
    fn finds_the_unconnected_udp_socket_a_datagram_left_from() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let local = sock.local_addr().unwrap();
        let inode = udp_socket((local.ip(), local.port())).expect("the socket in the dump");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        assert_eq!(link.to_string_lossy(), format!("socket:[{inode}]"));
        let unbound = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = unbound.local_addr().unwrap().port();
        assert!(udp_socket(("127.0.0.1".parse().unwrap(), port)).is_some());
    }

    #[test]
    fn a_short_or_foreign_message_is_no_connection() {
        assert!(parse(&[0u8; 10], "tcp").is_none());
        let mut msg = [0u8; MSG_LEN];
        msg[0] = 99;
        assert!(parse(&msg, "tcp").is_none());
    }
}
