//! DNS packets off the wire: a packet socket (`AF_PACKET`, needs `CAP_NET_RAW`) on every
//! interface, `lo` included, with a classic BPF filter in the kernel that keeps only UDP
//! datagrams from or to port 53 (IPv4 unfragmented, IPv6 without extension headers), so the
//! agent is woken for DNS and nothing else. On `lo` each packet passes twice (sent and
//! received): the filter keeps the received copy only.
//!
//! Attaching the filter (`SO_ATTACH_FILTER`) and reading the socket's drop count
//! (`PACKET_STATISTICS`) have no safe wrapper in rustix: they are the two documented libc calls
//! of this file (see ARCHITECTURE.md).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use rustix::net::{AddressFamily, Protocol, RecvFlags, SocketType, recv, socket, sockopt};

/// `ETH_P_ALL`: every protocol (the filter picks).
const ETH_P_ALL: u16 = 0x0003;
/// Bytes of a packet the filter passes up: a DNS message over UDP is at most 64 KiB.
const SNAP: u32 = 65_535;
/// The ancillary data offsets of classic BPF (`SKF_AD_OFF` + `SKF_AD_PKTTYPE`, `IFINDEX`).
const SKF_AD_PKTTYPE: u32 = 0xffff_f000 + 4;
const SKF_AD_IFINDEX: u32 = 0xffff_f000 + 8;
/// `PACKET_OUTGOING`: a copy of a packet this host sends.
const PACKET_OUTGOING: u32 = 4;
/// The loopback interface's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// The socket's receive buffer: room for bursts while the reader is busy.
const RCVBUF: usize = 4 << 20;

// Classic BPF opcodes.
const LD_W_ABS: u16 = 0x20;
const LD_H_ABS: u16 = 0x28;
const LD_B_ABS: u16 = 0x30;
const LD_H_IND: u16 = 0x48;
const LDX_B_MSH: u16 = 0xb1;
const ALU_RSH_K: u16 = 0x74;
const JEQ_K: u16 = 0x15;
const JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;

/// One instruction: `(code, jump if true, jump if false, k)`.
type Insn = (u16, u8, u8, u32);

/// The filter, run on each packet from its network header (the socket is `SOCK_DGRAM`).
fn program() -> Vec<Insn> {
    const ACCEPT: u8 = 23;
    const DROP: u8 = 24;
    // Jumps are relative to the next instruction: `to(at, target)`.
    let to = |at: u8, target: u8| target - at - 1;
    vec![
        // The copy of a packet sent on lo: it is seen again as received.
        /* 0 */
        (LD_W_ABS, 0, 0, SKF_AD_PKTTYPE),
        /* 1 */ (JEQ_K, 0, to(1, 4), PACKET_OUTGOING),
        /* 2 */ (LD_W_ABS, 0, 0, SKF_AD_IFINDEX),
        /* 3 */ (JEQ_K, to(3, DROP), 0, LOOPBACK_IFINDEX),
        // The IP version.
        /* 4 */ (LD_B_ABS, 0, 0, 0),
        /* 5 */ (ALU_RSH_K, 0, 0, 4),
        /* 6 */ (JEQ_K, 0, to(6, 16), 4),
        // IPv4: UDP, not a later fragment, port 53 at either end.
        /* 7 */
        (LD_B_ABS, 0, 0, 9),
        /* 8 */ (JEQ_K, 0, to(8, DROP), 17),
        /* 9 */ (LD_H_ABS, 0, 0, 6),
        /* 10 */ (JSET_K, to(10, DROP), 0, 0x1fff),
        /* 11 */ (LDX_B_MSH, 0, 0, 0),
        /* 12 */ (LD_H_IND, 0, 0, 0),
        /* 13 */ (JEQ_K, to(13, ACCEPT), 0, 53),
        /* 14 */ (LD_H_IND, 0, 0, 2),
        /* 15 */ (JEQ_K, to(15, ACCEPT), to(15, DROP), 53),
        // IPv6: UDP as the next header, port 53 at either end.
        /* 16 */
        (JEQ_K, 0, to(16, DROP), 6),
        /* 17 */ (LD_B_ABS, 0, 0, 6),
        /* 18 */ (JEQ_K, 0, to(18, DROP), 17),
        /* 19 */ (LD_H_ABS, 0, 0, 40),
        /* 20 */ (JEQ_K, to(20, ACCEPT), 0, 53),
        /* 21 */ (LD_H_ABS, 0, 0, 42),
        /* 22 */ (JEQ_K, to(22, ACCEPT), to(22, DROP), 53),
        /* 23 */ (RET_K, 0, 0, SNAP),
        /* 24 */ (RET_K, 0, 0, 0),
    ]
}

/// A packet socket receiving DNS over UDP on every interface.
pub struct Capture {
    fd: OwnedFd,
}

/// One UDP datagram from or to port 53.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram<'a> {
    pub src: (IpAddr, u16),
    pub dst: (IpAddr, u16),
    pub payload: &'a [u8],
}

impl Capture {
    /// Opens the socket and attaches the filter; an error names what is missing (most often
    /// `CAP_NET_RAW`).
    pub fn open(timeout: Duration) -> io::Result<Capture> {
        let protocol = rustix::net::RawProtocol::new(u32::from(ETH_P_ALL.to_be()))
            .map(Protocol::from_raw)
            .ok_or_else(|| io::Error::other("no protocol"))?;
        let fd = socket(AddressFamily::PACKET, SocketType::DGRAM, Some(protocol))?;
        attach(&fd, &program())?;
        // A smaller buffer than asked is no reason to go without DNS.
        let _ = sockopt::set_socket_recv_buffer_size(&fd, RCVBUF);
        sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, Some(timeout))?;
        Ok(Capture { fd })
    }

    /// The next datagram into `buf`: waited for up to the timeout, or (`now_only`) only when
    /// one is there already. `Ok(None)` when none came; a packet this cannot read is skipped.
    pub fn next<'a>(&self, buf: &'a mut [u8], now_only: bool) -> io::Result<Option<Datagram<'a>>> {
        let flags = if now_only {
            RecvFlags::DONTWAIT
        } else {
            RecvFlags::empty()
        };
        loop {
            let n = match recv(&self.fd, &mut *buf, flags) {
                Ok((n, _)) => n.min(buf.len()),
                Err(e) if e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::INTR => {
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            };
            if parse_ip(&buf[..n]).is_some() {
                return Ok(parse_ip(&buf[..n]));
            }
        }
    }

    /// Packets the kernel dropped for want of room in the socket's buffer since the last
    /// call (the kernel resets its count when read).
    pub fn dropped(&self) -> u64 {
        let mut stats = libc::tpacket_stats {
            tp_packets: 0,
            tp_drops: 0,
        };
        let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: `stats` and `len` are valid for writes of the size given; the kernel writes
        // at most `len` bytes and updates `len`.
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&raw mut stats).cast(),
                &raw mut len,
            )
        };
        if r == 0 { u64::from(stats.tp_drops) } else { 0 }
    }
}

/// Attaches a classic BPF program to a socket (`SO_ATTACH_FILTER`).
fn attach(fd: &OwnedFd, insns: &[Insn]) -> io::Result<()> {
    let mut filter: Vec<libc::sock_filter> = insns
        .iter()
        .map(|&(code, jt, jf, k)| libc::sock_filter { code, jt, jf, k })
        .collect();
    let prog = libc::sock_fprog {
        len: u16::try_from(filter.len()).map_err(|_| io::Error::other("filter too long"))?,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: `prog` points at `filter`, which lives until the call returns; the kernel copies
    // the program and checks it before attaching it.
    #[allow(unsafe_code)]
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const prog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The UDP datagram in an IP packet, or None for anything else (the filter lets through only
/// UDP to or from port 53; this checks again, and every length).
pub fn parse_ip(p: &[u8]) -> Option<Datagram<'_>> {
    let version = p.first()? >> 4;
    let (src, dst, udp) = match version {
        4 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if ihl < 20 || p.get(9)? != &17 {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([*p.get(2)?, *p.get(3)?]));
            let src = Ipv4Addr::from(<[u8; 4]>::try_from(p.get(12..16)?).ok()?);
            let dst = Ipv4Addr::from(<[u8; 4]>::try_from(p.get(16..20)?).ok()?);
            (
                IpAddr::V4(src),
                IpAddr::V4(dst),
                p.get(ihl..total.min(p.len()))?,
            )
        }
        6 => {
            if p.get(6)? != &17 {
                return None;
            }
            let src = Ipv6Addr::from(<[u8; 16]>::try_from(p.get(8..24)?).ok()?);
            let dst = Ipv6Addr::from(<[u8; 16]>::try_from(p.get(24..40)?).ok()?);
            (IpAddr::V6(src), IpAddr::V6(dst), p.get(40..)?)
        }
        _ => return None,
    };
    let port = |at: usize| Some(u16::from_be_bytes([*udp.get(at)?, *udp.get(at + 1)?]));
    let (sport, dport) = (port(0)?, port(2)?);
    let len = usize::from(port(4)?);
    if len < 8 || (sport != 53 && dport != 53) {
        return None;
    }
    Some(Datagram {
        src: (src, sport),
        dst: (dst, dport),
        payload: udp.get(8..len.min(udp.len()))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the filter as the kernel would, on a packet from its network header, with the
    /// packet type and interface given.
    fn run(prog: &[Insn], p: &[u8], pkttype: u32, ifindex: u32) -> u32 {
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        let byte = |at: u32| u32::from(p.get(at as usize).copied().unwrap_or(0));
        let half = |at: u32| (byte(at) << 8) | byte(at + 1);
        loop {
            let (code, jt, jf, k) = prog[pc];
            pc += 1;
            match code {
                LD_W_ABS if k == SKF_AD_PKTTYPE => a = pkttype,
                LD_W_ABS if k == SKF_AD_IFINDEX => a = ifindex,
                LD_H_ABS => a = half(k),
                LD_B_ABS => a = byte(k),
                LD_H_IND => a = half(x + k),
                LDX_B_MSH => x = (byte(k) & 0x0f) * 4,
                ALU_RSH_K => a >>= k,
                JEQ_K => pc += usize::from(if a == k { jt } else { jf }),
                JSET_K => pc += usize::from(if a & k != 0 { jt } else { jf }),
                RET_K => return k,
                other => panic!("opcode {other:#x} not modelled"),
            }
        }
    }

    fn udp4(sport: u16, dport: u16, proto: u8, frag: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0];
        p.extend_from_slice(&frag.to_be_bytes());
        p.extend_from_slice(&[64, proto, 0, 0, 127, 0, 0, 1, 127, 0, 0, 53]);
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0, 12, 0, 0, 0xab, 0xcd, 1, 0]);
        let len = p.len() as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        p
    }

    fn udp6(sport: u16, dport: u16, next: u8) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, 12, next, 64];
        p.extend_from_slice(&[0u8; 15]);
        p.push(1);
        p.extend_from_slice(&[0u8; 15]);
        p.push(1);
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0, 12, 0, 0, 0xab, 0xcd, 1, 0]);
        p
    }

    #[test]
    fn the_filter_keeps_dns_over_udp_once_per_packet() {
        let prog = program();
        let keep = |p: &[u8], t: u32, i: u32| run(&prog, p, t, i) != 0;
        // Queries and answers, IPv4 and IPv6, on an interface and received on lo.
        for p in [udp4(40000, 53, 17, 0), udp4(53, 40000, 17, 0)] {
            assert!(keep(&p, 0, 2) && keep(&p, PACKET_OUTGOING, 2) && keep(&p, 0, 1));
            assert!(
                !keep(&p, PACKET_OUTGOING, 1),
                "lo's sent copy is the same packet"
            );
            assert!(parse_ip(&p).is_some());
        }
        for p in [udp6(40000, 53, 17), udp6(53, 40000, 17)] {
            assert!(keep(&p, 0, 2));
            assert!(parse_ip(&p).is_some());
        }
        // Not DNS, not UDP, a later fragment, an IPv6 extension header.
        for p in [
            udp4(40000, 443, 17, 0),
            udp4(40000, 53, 6, 0),
            udp4(40000, 53, 17, 0x0010),
            udp6(40000, 443, 17),
            udp6(40000, 53, 0),
        ] {
            assert!(!keep(&p, 0, 2), "{p:?}");
        }
        let packet = udp4(40000, 53, 17, 0);
        let d = parse_ip(&packet).unwrap();
        assert_eq!(d.src, ("127.0.0.1".parse().unwrap(), 40000));
        assert_eq!(d.dst, ("127.0.0.53".parse().unwrap(), 53));
        assert_eq!(d.payload, [0xab, 0xcd, 1, 0]);
    }

    #[test]
    fn truncated_or_foreign_packets_are_no_datagram() {
        let p = udp4(40000, 53, 17, 0);
        for cut in 0..28 {
            assert!(parse_ip(&p[..cut]).is_none(), "cut at {cut}");
        }
        assert!(parse_ip(&[0x75; 40]).is_none());
    }
}
