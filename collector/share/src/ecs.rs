//! ECS (Elastic Common Schema 8): one JSON document per detection, for SIEMs.

use serde_json::{Value, json};
use vedette_ops::output::indicator_json;
use vedette_proto::v1::{Detection, DetectionKind, StoredDetection, detection};
use vedette_proto::{action_name, kind_name};

use crate::ts;

/// The ECS `event.category` of a detection kind.
fn category(kind: i32) -> &'static str {
    match DetectionKind::try_from(kind) {
        Ok(DetectionKind::Connection | DetectionKind::Dns) => "network",
        Ok(DetectionKind::Process) => "process",
        Ok(DetectionKind::Agent) => "host",
        _ => "malware",
    }
}

/// `event.outcome`: the exec was refused; the exec ran before it was judged; a detection only.
fn outcome(action: i32) -> &'static str {
    match action_name(action) {
        "blocked" => "failure",
        "late" => "success",
        _ => "unknown",
    }
}

/// One ECS document (Elastic Common Schema 8) per detection, for SIEMs.
pub fn document(s: &StoredDetection) -> Value {
    let d = s.detection.clone().unwrap_or_default();
    let ind = indicator_json(&d);
    let mut v = json!({
        "@timestamp": ts(d.observed_at_ms),
        "event": {
            "kind": "alert",
            "category": [category(d.kind)],
            "type": ["indicator"],
            "id": d.id,
            "action": action_name(d.action),
            "outcome": outcome(d.action),
            "created": ts(s.received_at_ms),
            "risk_score": d.score,
            "module": "vedette",
            "dataset": format!("vedette.{}", kind_name(d.kind)),
        },
        "host": {"name": s.hostname, "id": s.agent_id},
        "agent": {"id": s.agent_id, "type": "vedette"},
        "rule": {
            "name": d.rule,
            "ruleset": d.source,
            "description": d.description,
            "id": ind["id"],
        },
        "threat": {
            "framework": "MITRE ATT&CK",
            "technique": {"id": d.techniques},
            "indicator": {
                "provider": ind["origin"],
                "type": match DetectionKind::try_from(d.kind) {
                    Ok(DetectionKind::Connection) => "ipv4-addr",
                    Ok(DetectionKind::Dns) => "domain-name",
                    Ok(DetectionKind::Process) => "process",
                    _ => "file",
                },
                "reference": ind["id"],
            },
            "feed": {"name": ind["source"]},
        },
        "labels": {"bundle_version": d.bundle_version.to_string()},
    });
    if s.alert_id != 0 {
        // The alert the detection joined at the collector, and the verdict on it.
        v["vedette"] = json!({"alert": {"id": s.alert_id, "status": s.alert_status}});
    }
    if let Some(r) = &d.retro {
        // Found in the agent's history by an indicator published later.
        v["vedette"]["retro"] = vedette_ops::output::retro_json(r);
        v["event"]["start"] = json!(ts(r.first_seen_ms));
        v["event"]["end"] = json!(ts(r.last_seen_ms));
    }
    if let Some(event) = ind.get("event") {
        v["threat"]["indicator"]["description"] =
            json!(format!("MISP event {}", event.as_str().unwrap_or("")));
    }
    target_fields(&mut v, &d);
    v
}

/// The fields of what the detection is about: a file, a process, a connection, a DNS query.
fn target_fields(v: &mut Value, d: &Detection) {
    match &d.target {
        Some(detection::Target::File(f)) => {
            let name = f.path.rsplit('/').next().unwrap_or(&f.path);
            let mut hash = serde_json::Map::new();
            for (k, h) in [("sha256", &f.sha256), ("md5", &f.md5), ("sha1", &f.sha1)] {
                if !h.is_empty() {
                    hash.insert(k.into(), json!(h));
                }
            }
            v["file"] = json!({"path": f.path, "name": name, "size": f.size, "hash": hash});
        }
        Some(detection::Target::Process(p)) => {
            v["process"] = json!({"pid": p.pid, "parent": {"pid": p.ppid}, "name": p.name,
                "executable": p.exe, "command_line": p.cmdline});
            if !p.exe_sha256.is_empty() {
                v["process"]["hash"] = json!({"sha256": p.exe_sha256});
            }
            if !p.user.is_empty() {
                v["user"] = json!({"name": p.user});
            }
        }
        Some(detection::Target::Connection(c)) => {
            v["process"] = json!({"pid": c.pid, "executable": c.exe});
            v["destination"] = json!({"ip": c.remote_addr, "port": c.remote_port});
            v["source"] = json!({"ip": c.local_addr, "port": c.local_port});
            v["network"] = json!({"transport": c.protocol.to_lowercase()});
            if !c.domain.is_empty() {
                v["destination"]["domain"] = json!(c.domain);
                v["dns"] = json!({"question": {"name": c.domain}, "resolved_ip": [c.remote_addr]});
            }
        }
        Some(detection::Target::Dns(q)) => {
            let resolved: Vec<&String> = q
                .answers
                .iter()
                .filter(|a| a.parse::<std::net::IpAddr>().is_ok())
                .collect();
            v["dns"] = json!({"type": "query", "question": {"name": q.name, "type": q.qtype},
                "resolved_ip": resolved, "count": q.count});
            v["destination"] = json!({"ip": q.resolver_addr, "port": 53});
            v["network"] = json!({"transport": "udp", "protocol": "dns"});
            if q.attributed {
                v["process"] = json!({"pid": q.pid, "executable": q.exe,
                    "command_line": q.cmdline});
            }
            if !q.local_addr.is_empty() {
                v["source"] = json!({"ip": q.local_addr, "port": q.local_port});
            }
            if !q.user.is_empty() {
                v["user"] = json!({"name": q.user});
            }
        }
        None => {}
    }
}
