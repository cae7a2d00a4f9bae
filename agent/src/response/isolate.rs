//! Host isolation: an nftables table of the agent's own (`inet vedette_isolation`) that drops
//! every packet but loopback, the collectors' addresses, DNS to the resolvers of
//! /etc/resolv.conf, DHCP, and the networks of `isolation_allow`. Release deletes exactly that
//! table. What is in force is kept in the state directory, so a restarted agent (or a
//! rebooted host) applies it again, and it ends at its expiry without the collector.
//!
//! The rules are made from addresses the agent resolved and networks its own configuration
//! checked, never from text the collector sent, and handed to the system's `nft` program by
//! its absolute path.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{IpAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{Refusal, failed, refused};

/// The agent's table.
const TABLE: &str = "inet vedette_isolation";

/// Where Debian and others put `nft`.
const NFT: &[&str] = &["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"];

/// The isolation in force.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct InForce {
    id: String,
    until_ms: i64,
    /// The collectors' addresses when it began: after a reboot the names may not resolve
    /// before the network is up, and the table must still let the collectors through.
    #[serde(default)]
    collectors: Vec<IpAddr>,
}

pub struct Isolation {
    file: PathBuf,
    collectors: Vec<String>,
    allow: Vec<String>,
}

fn nft(script: &str) -> Result<(), String> {
    let Some(bin) = NFT.iter().find(|p| std::path::Path::new(p).exists()) else {
        return Err("nft (nftables) is not installed on this host".into());
    };
    let mut child = Command::new(bin)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {bin}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("cannot write to {bin}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{bin} did not finish: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{bin}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The name servers of /etc/resolv.conf.
fn resolvers() -> Vec<IpAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().split('%').next()?.parse().ok())
        .collect()
}

/// `{ a, b }`, or None when empty.
fn set<T: std::fmt::Display>(items: &BTreeSet<T>) -> Option<String> {
    (!items.is_empty()).then(|| {
        let list: Vec<String> = items.iter().map(ToString::to_string).collect();
        format!("{{ {} }}", list.join(", "))
    })
}

/// The table: one transaction that replaces any earlier one.
fn ruleset(collectors: &[IpAddr], resolvers: &[IpAddr], allow: &[String]) -> String {
    let (mut v4, mut v6) = (BTreeSet::new(), BTreeSet::new());
    for a in collectors {
        if a.is_ipv4() { &mut v4 } else { &mut v6 }.insert(a.to_string());
    }
    for n in allow {
        if n.contains(':') { &mut v6 } else { &mut v4 }.insert(n.clone());
    }
    let (mut dns4, mut dns6) = (BTreeSet::new(), BTreeSet::new());
    for a in resolvers {
        if a.is_ipv4() { &mut dns4 } else { &mut dns6 }.insert(a.to_string());
    }
    let mut out = String::from("        oifname \"lo\" accept\n");
    let mut inp = String::from("        iifname \"lo\" accept\n");
    for (family, hosts, dns) in [("ip", &v4, &dns4), ("ip6", &v6, &dns6)] {
        if let Some(s) = set(hosts) {
            out += &format!("        {family} daddr {s} accept\n");
            inp += &format!("        {family} saddr {s} accept\n");
        }
        if let Some(s) = set(dns) {
            out += &format!(
                "        {family} daddr {s} meta l4proto {{ tcp, udp }} th dport 53 accept\n"
            );
            inp += &format!(
                "        {family} saddr {s} meta l4proto {{ tcp, udp }} th sport 53 accept\n"
            );
        }
    }
    // The host keeps its address: DHCP, and IPv6 neighbour and router discovery.
    out += "        udp sport { 68, 546 } udp dport { 67, 547 } accept\n";
    inp += "        udp sport { 67, 547 } udp dport { 68, 546 } accept\n";
    let nd = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, \
              nd-router-advert } accept\n";
    out += &format!("        {nd}");
    inp += &format!("        {nd}");
    format!(
        "table {TABLE}\ndelete table {TABLE}\ntable {TABLE} {{\n\
         \x20   chain output {{\n        type filter hook output priority -10; policy drop;\n{out}    }}\n\
         \x20   chain input {{\n        type filter hook input priority -10; policy drop;\n{inp}    }}\n}}\n"
    )
}

impl Isolation {
    pub fn new(file: PathBuf, collectors: Vec<String>, allow: Vec<String>) -> Isolation {
        Isolation {
            file,
            collectors,
            allow,
        }
    }

    fn in_force(&self) -> Option<InForce> {
        serde_json::from_slice(&std::fs::read(&self.file).ok()?).ok()
    }

    /// When the isolation in force ends (None: none is).
    pub fn until(&self) -> Option<i64> {
        self.in_force().map(|f| f.until_ms)
    }

    /// The collectors' addresses, resolved now, and those `known` from before.
    fn collector_addrs(&self, known: &[IpAddr]) -> Result<Vec<IpAddr>, Refusal> {
        let addrs: BTreeSet<IpAddr> = self
            .collectors
            .iter()
            .filter_map(|c| c.to_socket_addrs().ok())
            .flatten()
            .map(|s| s.ip())
            .chain(known.iter().copied())
            .collect();
        if addrs.is_empty() {
            return Err(refused(
                "no collector address resolves: isolating would cut the agent off",
            ));
        }
        Ok(addrs.into_iter().collect())
    }

    fn apply(&self, collectors: &[IpAddr]) -> Result<(), Refusal> {
        let script = ruleset(collectors, &resolvers(), &self.allow);
        nft(&script).map_err(|e| failed(format!("cannot isolate: {e}")))
    }

    pub(super) fn isolate(&self, id: &str, until_ms: i64) -> Result<String, Refusal> {
        // Resolved before the network is cut.
        let collectors = self.collector_addrs(&[])?;
        let kept = InForce {
            id: id.to_string(),
            until_ms,
            collectors: collectors.clone(),
        };
        let bytes = serde_json::to_vec(&kept).unwrap_or_default();
        crate::state::write_atomic(&self.file, &bytes, 0o600)
            .map_err(|e| failed(format!("cannot record the isolation: {e}")))?;
        if let Err(e) = self.apply(&collectors) {
            let _ = std::fs::remove_file(&self.file);
            return Err(e);
        }
        Ok(format!(
            "isolated until {} (ms since the epoch): only the collectors, DNS, loopback{} are reachable",
            until_ms,
            if self.allow.is_empty() {
                String::new()
            } else {
                format!(" and {}", self.allow.join(", "))
            }
        ))
    }

    /// Deletes the agent's table (and forgets the isolation): a release asked for (`undoes`:
    /// the isolation it ends; empty at expiry).
    pub(super) fn release(&self, undoes: &str) -> Result<String, Refusal> {
        match self.in_force() {
            None => return Err(refused("the host is not isolated")),
            Some(f) if !undoes.is_empty() && f.id != undoes => {
                return Err(refused(format!(
                    "isolation {undoes} is not in force here ({} is)",
                    f.id
                )));
            }
            Some(_) => {}
        }
        nft(&format!("table {TABLE}\ndelete table {TABLE}\n"))
            .map_err(|e| failed(format!("cannot release: {e}")))?;
        let _ = std::fs::remove_file(&self.file);
        Ok("released: the agent's isolation table is deleted".into())
    }

    /// At start: the isolation kept is applied again, or released when past its expiry.
    /// When it ends, if one is in force.
    pub fn resume(&self) -> Option<i64> {
        let f = self.in_force()?;
        if f.until_ms <= vedette_proto::now_ms() {
            return self.expire();
        }
        match self
            .collector_addrs(&f.collectors)
            .and_then(|addrs| self.apply(&addrs))
        {
            Ok(()) => info!(action = %f.id, until_ms = f.until_ms, "isolation in force again"),
            Err(Refusal::Failed(e) | Refusal::Refused(e)) => {
                warn!(action = %f.id, error = %e, "cannot isolate the host again");
            }
        }
        Some(f.until_ms)
    }

    /// Releases the isolation in force if it has expired; when the one in force ends.
    pub fn expire(&self) -> Option<i64> {
        let f = self.in_force()?;
        if f.until_ms > vedette_proto::now_ms() {
            return Some(f.until_ms);
        }
        match self.release("") {
            Ok(_) => info!(action = %f.id, "isolation expired: released"),
            Err(Refusal::Failed(e) | Refusal::Refused(e)) => {
                warn!(action = %f.id, error = %e, "cannot release the expired isolation; retried in a minute");
                return Some(vedette_proto::now_ms() + 60_000);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_lets_through_only_what_it_names() {
        let c: Vec<IpAddr> = vec![
            "192.0.2.10".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
        ];
        let r: Vec<IpAddr> = vec!["198.51.100.53".parse().unwrap()];
        let s = ruleset(&c, &r, &["203.0.113.0/24".into()]);
        assert!(
            s.starts_with("table inet vedette_isolation\ndelete table inet vedette_isolation\n")
        );
        assert!(s.contains("policy drop;"), "{s}");
        assert!(
            s.contains("ip daddr { 192.0.2.10, 203.0.113.0/24 } accept"),
            "{s}"
        );
        assert!(s.contains("ip6 daddr { 2001:db8::1 } accept"), "{s}");
        assert!(
            s.contains("ip daddr { 198.51.100.53 } meta l4proto { tcp, udp } th dport 53 accept"),
            "{s}"
        );
        assert!(
            !s.contains("ct state"),
            "established connections are cut too: {s}"
        );
    }
}
