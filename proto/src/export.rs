//! Detections as the threat-intelligence world reads them: STIX 2.1 sightings, a MISP event,
//! and ECS JSON lines for SIEMs. The same functions serve `vedettectl export` and the
//! collector's export sinks, so a detection reads the same wherever it is sent.
//!
//! STIX identifiers are UUIDv5, derived from what they name (the detection id, the indicator,
//! the organisation): exporting the same detection twice gives the same objects, which a TAXII
//! server or a MISP instance then holds once.

use serde_json::{Value, json};

use crate::output::{indicator_json, rfc3339_ms};
use crate::v1::{Detection, DetectionKind, StoredDetection, detection};
use crate::{action_name, kind_name};

/// The namespace of Vedette's STIX identifiers.
const NAMESPACE: uuid::Uuid = uuid::uuid!("3a1e0b52-6c1d-5b7e-9f00-766564657474");
/// The STIX 2.1 namespace for identifiers of cyber-observable objects (spec section 2.9).
const SCO_NAMESPACE: uuid::Uuid = uuid::uuid!("00abedb4-aa42-466c-9c01-fed23315a9b7");

/// The id of an SDO, SRO or process: a UUID of version 4 form (as STIX requires of them) whose
/// bits come from a name-based hash instead of a random source, so it is stable.
fn stix_id(kind: &str, name: &str) -> String {
    let v5 = uuid::Uuid::new_v5(&NAMESPACE, format!("{kind}|{name}").as_bytes());
    format!(
        "{kind}--{}",
        uuid::Builder::from_random_bytes(*v5.as_bytes()).into_uuid()
    )
}

/// An SCO id from its contributing properties, as the spec derives them.
fn sco_id(kind: &str, contributing: &Value) -> String {
    format!(
        "{kind}--{}",
        uuid::Uuid::new_v5(&SCO_NAMESPACE, contributing.to_string().as_bytes())
    )
}

/// A STIX timestamp (RFC 3339, UTC, milliseconds); the epoch for an unknown time.
fn ts(ms: i64) -> String {
    if ms <= 0 {
        "1970-01-01T00:00:00.000Z".into()
    } else {
        rfc3339_ms(ms)
    }
}

/// The organisation the sightings are made by.
pub fn identity(organisation: &str) -> Value {
    json!({
        "type": "identity",
        "spec_version": "2.1",
        "id": stix_id("identity", organisation),
        "created": "2026-01-01T00:00:00.000Z",
        "modified": "2026-01-01T00:00:00.000Z",
        "name": organisation,
        "identity_class": "organization",
    })
}

fn kill_chain(techniques: &[String]) -> Value {
    json!(
        techniques
            .iter()
            // STIX wants phase names in lower case.
            .map(|t| json!({"kill_chain_name": "mitre-attack", "phase_name": t.to_lowercase()}))
            .collect::<Vec<_>>()
    )
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// What a generated indicator's pattern says: the observed file by its hash, the process by
/// its command line, the remote address.
fn observed_pattern(d: &Detection) -> String {
    match &d.target {
        Some(detection::Target::File(f)) if !f.sha256.is_empty() => {
            format!("[file:hashes.'SHA-256' = {}]", quote(&f.sha256))
        }
        Some(detection::Target::File(f)) => {
            let name = f.path.rsplit('/').next().unwrap_or(&f.path);
            format!("[file:name = {}]", quote(name))
        }
        Some(detection::Target::Process(p)) if !p.exe_sha256.is_empty() => {
            format!("[file:hashes.'SHA-256' = {}]", quote(&p.exe_sha256))
        }
        Some(detection::Target::Process(p)) => {
            format!("[process:command_line = {}]", quote(&p.cmdline))
        }
        Some(detection::Target::Connection(c)) => {
            let kind = if c.remote_addr.contains(':') {
                "ipv6-addr"
            } else {
                "ipv4-addr"
            };
            format!("[{kind}:value = {}]", quote(&c.remote_addr))
        }
        None => format!("[file:name = {}]", quote(&d.rule)),
    }
}

/// The SCOs of what was observed, the ids of the top-level ones first.
fn observables(d: &Detection) -> (Vec<String>, Vec<Value>) {
    let mut objects = Vec::new();
    let mut file = |name: &str, sha256: &str, md5: &str, sha1: &str, size: u64| {
        let mut hashes = serde_json::Map::new();
        for (k, v) in [("SHA-256", sha256), ("MD5", md5), ("SHA-1", sha1)] {
            if !v.is_empty() {
                hashes.insert(k.into(), json!(v));
            }
        }
        let contributing = if hashes.is_empty() {
            json!({"name": name})
        } else {
            json!({"hashes": hashes})
        };
        let mut f = json!({"type": "file", "spec_version": "2.1",
            "id": sco_id("file", &contributing), "name": name});
        if !hashes.is_empty() {
            f["hashes"] = Value::Object(hashes);
        }
        if size > 0 {
            f["size"] = json!(size);
        }
        let id = f["id"].as_str().unwrap_or_default().to_string();
        objects.push(f);
        id
    };
    let base = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
    let top = match &d.target {
        Some(detection::Target::File(f)) => {
            vec![file(&base(&f.path), &f.sha256, &f.md5, &f.sha1, f.size)]
        }
        Some(detection::Target::Process(p)) => {
            let image = (!p.exe.is_empty()).then(|| file(&base(&p.exe), &p.exe_sha256, "", "", 0));
            let mut proc = json!({"type": "process", "spec_version": "2.1",
                "id": stix_id("process", &d.id), "pid": p.pid});
            if !p.cmdline.is_empty() {
                proc["command_line"] = json!(p.cmdline);
            }
            if let Some(image) = image {
                proc["image_ref"] = json!(image);
            }
            let id = proc["id"].as_str().unwrap_or_default().to_string();
            objects.push(proc);
            vec![id]
        }
        Some(detection::Target::Connection(c)) => {
            let kind = if c.remote_addr.contains(':') {
                "ipv6-addr"
            } else {
                "ipv4-addr"
            };
            let addr = json!({"type": kind, "spec_version": "2.1",
                "id": sco_id(kind, &json!({"value": c.remote_addr})), "value": c.remote_addr});
            let addr_id = addr["id"].clone();
            objects.push(addr);
            let protocol = if c.protocol.is_empty() {
                "tcp".to_string()
            } else {
                c.protocol.trim_end_matches('6').to_lowercase()
            };
            let mut traffic = json!({"type": "network-traffic", "spec_version": "2.1",
                "id": stix_id("network-traffic", &d.id), "dst_ref": addr_id,
                "dst_port": c.remote_port, "protocols": [protocol]});
            if !c.local_addr.is_empty() {
                let kind = if c.local_addr.contains(':') {
                    "ipv6-addr"
                } else {
                    "ipv4-addr"
                };
                let local = json!({"type": kind, "spec_version": "2.1",
                    "id": sco_id(kind, &json!({"value": c.local_addr})), "value": c.local_addr});
                traffic["src_ref"] = local["id"].clone();
                traffic["src_port"] = json!(c.local_port);
                objects.push(local);
            }
            let id = traffic["id"].as_str().unwrap_or_default().to_string();
            objects.push(traffic);
            vec![id]
        }
        None => Vec::new(),
    };
    (top, objects)
}

/// The STIX objects of one stored detection: a sighting of its indicator (the original STIX
/// indicator's id, or an indicator generated for the rule or IOC, included), by `identity_id`,
/// with the observed data it saw.
pub fn stix_sighting(s: &StoredDetection, identity_id: &str) -> Vec<Value> {
    let d = s.detection.clone().unwrap_or_default();
    let when = ts(d.observed_at_ms);
    let received = ts(s.received_at_ms);
    let ind = indicator_json(&d);
    let mut out = Vec::new();
    let indicator_ref = if ind["source"] == "stix"
        && ind["id"]
            .as_str()
            .is_some_and(|i| i.starts_with("indicator--"))
    {
        ind["id"].as_str().unwrap_or_default().to_string()
    } else {
        let source = ind["source"].as_str().unwrap_or_default();
        let name_id = ind["id"].as_str().unwrap_or_default();
        let pattern = observed_pattern(&d);
        let id = stix_id("indicator", &format!("{source}|{name_id}|{pattern}"));
        let mut refs = vec![json!({"source_name": format!("vedette-{source}"),
            "external_id": name_id})];
        if let Some(event) = ind.get("event").and_then(Value::as_str) {
            refs.push(json!({"source_name": "misp", "external_id": event,
                "description": "MISP event"}));
        }
        let mut i = json!({
            "type": "indicator",
            "spec_version": "2.1",
            "id": id,
            "created": when,
            "modified": when,
            "name": d.rule,
            "indicator_types": ["malicious-activity"],
            "pattern_type": "stix",
            "pattern": pattern,
            "valid_from": when,
            "external_references": refs,
        });
        if !d.description.is_empty() {
            i["description"] = json!(d.description);
        }
        if !d.techniques.is_empty() {
            i["kill_chain_phases"] = kill_chain(&d.techniques);
        }
        out.push(i);
        id
    };
    let (top, scos) = observables(&d);
    let mut observed_refs = Vec::new();
    if !top.is_empty() {
        let od_id = stix_id("observed-data", &d.id);
        out.push(json!({
            "type": "observed-data",
            "spec_version": "2.1",
            "id": od_id,
            "created": received,
            "modified": received,
            "first_observed": when,
            "last_observed": when,
            "number_observed": 1,
            "object_refs": scos.iter().map(|o| o["id"].clone()).collect::<Vec<_>>(),
        }));
        out.extend(scos);
        observed_refs.push(od_id);
    }
    let mut sighting = json!({
        "type": "sighting",
        "spec_version": "2.1",
        "id": stix_id("sighting", &d.id),
        "created": received,
        "modified": received,
        "first_seen": when,
        "last_seen": when,
        "count": 1,
        "sighting_of_ref": indicator_ref,
        "where_sighted_refs": [identity_id],
        "description": format!("{} detection by Vedette ({})", kind_name(d.kind), action_name(d.action)),
    });
    if !observed_refs.is_empty() {
        sighting["observed_data_refs"] = json!(observed_refs);
    }
    out.push(sighting);
    out
}

/// A STIX 2.1 bundle of sightings of the given detections, made by `organisation`.
pub fn stix_bundle(detections: &[StoredDetection], organisation: &str) -> Value {
    let who = identity(organisation);
    let who_id = who["id"].as_str().unwrap_or_default().to_string();
    let mut objects = vec![who];
    let mut seen = std::collections::HashSet::new();
    for s in detections {
        for o in stix_sighting(s, &who_id) {
            // Shared objects (a file seen twice, one generated indicator) appear once.
            if seen.insert(o["id"].as_str().unwrap_or_default().to_string()) {
                objects.push(o);
            }
        }
    }
    json!({
        "type": "bundle",
        "id": format!("bundle--{}", uuid::Uuid::new_v4()),
        "objects": objects,
    })
}

/// The MISP attributes of one detection: what was observed, each with a sighting.
fn misp_attributes(s: &StoredDetection) -> Vec<Value> {
    let d = s.detection.clone().unwrap_or_default();
    let secs = (d.observed_at_ms / 1000).max(0);
    let comment = format!(
        "{} detection by Vedette: {} on {}",
        kind_name(d.kind),
        d.rule,
        s.hostname
    );
    let mut out = Vec::new();
    let mut attr = |kind: &str, category: &str, value: &str| {
        if value.is_empty() {
            return;
        }
        out.push(json!({
            "uuid": uuid::Uuid::new_v5(&NAMESPACE, format!("misp|{}|{kind}|{value}", d.id).as_bytes()).to_string(),
            "type": kind,
            "category": category,
            "value": value,
            "to_ids": false,
            "comment": comment,
            "timestamp": secs.to_string(),
            "distribution": "5",
        }));
    };
    match &d.target {
        Some(detection::Target::File(f)) => {
            attr("sha256", "Artifacts dropped", &f.sha256);
            attr("md5", "Artifacts dropped", &f.md5);
            attr("sha1", "Artifacts dropped", &f.sha1);
            let name = f.path.rsplit('/').next().unwrap_or(&f.path);
            attr("filename", "Artifacts dropped", name);
        }
        Some(detection::Target::Process(p)) => {
            attr("sha256", "Artifacts dropped", &p.exe_sha256);
            attr("filename", "Artifacts dropped", &p.exe);
            attr("text", "Other", &p.cmdline);
        }
        Some(detection::Target::Connection(c)) => {
            attr("ip-dst", "Network activity", &c.remote_addr);
        }
        None => {}
    }
    if d.kind == DetectionKind::Yara as i32 {
        attr("text", "Other", &format!("YARA rule {}", d.rule));
    }
    out
}

/// A MISP event holding what the detections observed, tagged with their ATT&CK techniques.
pub fn misp_event(detections: &[StoredDetection], organisation: &str, now_ms: i64) -> Value {
    let mut attributes = Vec::new();
    let mut techniques: Vec<String> = Vec::new();
    for s in detections {
        attributes.extend(misp_attributes(s));
        if let Some(d) = &s.detection {
            techniques.extend(d.techniques.iter().cloned());
        }
    }
    techniques.sort();
    techniques.dedup();
    let date = rfc3339_ms(now_ms.max(1))
        .chars()
        .take(10)
        .collect::<String>();
    let mut tags = vec![json!({"name": "tlp:amber"})];
    for t in techniques {
        tags.push(json!({"name": format!("misp-galaxy:mitre-attack-pattern=\"{t}\"")}));
    }
    json!({"Event": {
        "uuid": uuid::Uuid::new_v4().to_string(),
        "info": format!("Vedette detections reported by {organisation}"),
        "date": date,
        "threat_level_id": "2",
        "analysis": "2",
        "distribution": "0",
        "published": false,
        "timestamp": (now_ms / 1000).to_string(),
        "Orgc": {"name": organisation},
        "Attribute": attributes,
        "Tag": tags,
    }})
}

/// One ECS document (Elastic Common Schema 8) per detection, for SIEMs.
pub fn ecs(s: &StoredDetection) -> Value {
    let d = s.detection.clone().unwrap_or_default();
    let ind = indicator_json(&d);
    let mut v = json!({
        "@timestamp": ts(d.observed_at_ms),
        "event": {
            "kind": "alert",
            "category": [match DetectionKind::try_from(d.kind) {
                Ok(DetectionKind::Connection) => "network",
                Ok(DetectionKind::Process) => "process",
                _ => "malware",
            }],
            "type": ["indicator"],
            "id": d.id,
            "action": action_name(d.action),
            "outcome": if action_name(d.action) == "blocked" { "failure" } else { "unknown" },
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
                    Ok(DetectionKind::Process) => "process",
                    _ => "file",
                },
                "reference": ind["id"],
            },
            "feed": {"name": ind["source"]},
        },
        "labels": {"bundle_version": d.bundle_version.to_string()},
    });
    if let Some(event) = ind.get("event") {
        v["threat"]["indicator"]["description"] =
            json!(format!("MISP event {}", event.as_str().unwrap_or("")));
    }
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
        }
        None => {}
    }
    v
}
