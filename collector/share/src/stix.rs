//! STIX 2.1: sightings of the indicators that matched, with what was observed.

use serde_json::{Value, json};
use vedette_ops::output::indicator_json;
use vedette_proto::v1::{ConnectionTarget, Detection, ProcessTarget, StoredDetection, detection};
use vedette_proto::{action_name, kind_name};

use crate::{sco_id, stix_id, ts};

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
    let rule = || format!("[x-vedette-rule:name = {}]", quote(&d.rule));
    match &d.target {
        Some(detection::Target::File(f)) if !f.sha256.is_empty() => {
            format!("[file:hashes.'SHA-256' = {}]", quote(&f.sha256))
        }
        // What an anonymised export keeps of a file may be nothing but the rule that matched.
        Some(detection::Target::File(f)) if f.path.is_empty() => rule(),
        Some(detection::Target::File(f)) => {
            let name = f.path.rsplit('/').next().unwrap_or(&f.path);
            format!("[file:name = {}]", quote(name))
        }
        Some(detection::Target::Process(p)) if !p.exe_sha256.is_empty() => {
            format!("[file:hashes.'SHA-256' = {}]", quote(&p.exe_sha256))
        }
        Some(detection::Target::Process(p)) if p.cmdline.is_empty() => rule(),
        Some(detection::Target::Process(p)) => {
            format!("[process:command_line = {}]", quote(&p.cmdline))
        }
        // Anonymised: an internal remote address is not shared.
        Some(detection::Target::Connection(c)) if c.remote_addr.is_empty() => rule(),
        Some(detection::Target::Connection(c)) => {
            let kind = if c.remote_addr.contains(':') {
                "ipv6-addr"
            } else {
                "ipv4-addr"
            };
            format!("[{kind}:value = {}]", quote(&c.remote_addr))
        }
        Some(detection::Target::Dns(q)) => format!("[domain-name:value = {}]", quote(&q.name)),
        // About the agent itself (gone silent): nothing observed but the rule.
        None => rule(),
    }
}

/// A `domain-name` SCO pushed to `objects`, with the addresses it resolved to (each an SCO
/// pushed too); its id.
fn domain_sco(objects: &mut Vec<Value>, name: &str, answers: &[String]) -> String {
    let mut refs = Vec::new();
    for a in answers
        .iter()
        .filter(|a| a.parse::<std::net::IpAddr>().is_ok())
    {
        let addr = address_sco(a);
        refs.push(addr["id"].clone());
        objects.push(addr);
    }
    let mut sco = json!({"type": "domain-name", "spec_version": "2.1",
        "id": sco_id("domain-name", &json!({"value": name})), "value": name});
    if !refs.is_empty() {
        sco["resolves_to_refs"] = json!(refs);
    }
    let id = sco["id"].as_str().unwrap_or_default().to_string();
    objects.push(sco);
    id
}

/// A file SCO by its hashes (or, without any, its name) pushed to `objects`; its id, or None
/// when there is nothing to name it by.
fn file_sco(
    objects: &mut Vec<Value>,
    name: &str,
    hashes: [(&str, &str); 3],
    size: u64,
) -> Option<String> {
    let mut known = serde_json::Map::new();
    for (k, v) in hashes {
        if !v.is_empty() {
            known.insert(k.into(), json!(v));
        }
    }
    if known.is_empty() && name.is_empty() {
        return None;
    }
    let contributing = if known.is_empty() {
        json!({"name": name})
    } else {
        json!({"hashes": known})
    };
    let mut f = json!({"type": "file", "spec_version": "2.1",
        "id": sco_id("file", &contributing)});
    if !name.is_empty() {
        f["name"] = json!(name);
    }
    if !known.is_empty() {
        f["hashes"] = Value::Object(known);
    }
    if size > 0 {
        f["size"] = json!(size);
    }
    let id = f["id"].as_str().unwrap_or_default().to_string();
    objects.push(f);
    Some(id)
}

/// An address SCO (`ipv4-addr` or `ipv6-addr`).
fn address_sco(addr: &str) -> Value {
    let kind = if addr.contains(':') {
        "ipv6-addr"
    } else {
        "ipv4-addr"
    };
    json!({"type": kind, "spec_version": "2.1",
        "id": sco_id(kind, &json!({"value": addr})), "value": addr})
}

fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The process and its image; the process's id.
fn process_scos(objects: &mut Vec<Value>, d: &Detection, p: &ProcessTarget) -> String {
    let image = file_sco(
        objects,
        base_name(&p.exe),
        [
            ("SHA-256", p.exe_sha256.as_str()),
            ("MD5", ""),
            ("SHA-1", ""),
        ],
        0,
    );
    let mut proc = json!({"type": "process", "spec_version": "2.1",
        "id": stix_id("process", &d.id)});
    if p.pid != 0 {
        proc["pid"] = json!(p.pid);
    }
    if !p.cmdline.is_empty() {
        proc["command_line"] = json!(p.cmdline);
    }
    if let Some(image) = image {
        proc["image_ref"] = json!(image);
    }
    let id = proc["id"].as_str().unwrap_or_default().to_string();
    objects.push(proc);
    id
}

/// The network traffic and its addresses; the traffic's id.
fn connection_scos(objects: &mut Vec<Value>, d: &Detection, c: &ConnectionTarget) -> String {
    let addr = address_sco(&c.remote_addr);
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
        let local = address_sco(&c.local_addr);
        traffic["src_ref"] = local["id"].clone();
        traffic["src_port"] = json!(c.local_port);
        objects.push(local);
    }
    let id = traffic["id"].as_str().unwrap_or_default().to_string();
    objects.push(traffic);
    id
}

/// The SCOs of what was observed, the ids of the top-level ones first.
fn observables(d: &Detection) -> (Vec<String>, Vec<Value>) {
    let mut objects = Vec::new();
    let top = match &d.target {
        Some(detection::Target::File(f)) => {
            let hashes = [
                ("SHA-256", f.sha256.as_str()),
                ("MD5", f.md5.as_str()),
                ("SHA-1", f.sha1.as_str()),
            ];
            file_sco(&mut objects, base_name(&f.path), hashes, f.size)
                .into_iter()
                .collect()
        }
        // Anonymised: no process is left, only its image's hash.
        Some(detection::Target::Process(p)) if p.pid == 0 && p.cmdline.is_empty() => {
            let hashes = [
                ("SHA-256", p.exe_sha256.as_str()),
                ("MD5", ""),
                ("SHA-1", ""),
            ];
            file_sco(&mut objects, "", hashes, 0).into_iter().collect()
        }
        Some(detection::Target::Process(p)) => vec![process_scos(&mut objects, d, p)],
        Some(detection::Target::Connection(c)) if c.remote_addr.is_empty() => Vec::new(),
        Some(detection::Target::Connection(c)) => {
            let mut top = vec![connection_scos(&mut objects, d, c)];
            if !c.domain.is_empty() {
                let answers = [c.remote_addr.clone()];
                top.push(domain_sco(&mut objects, &c.domain, &answers));
            }
            top
        }
        Some(detection::Target::Dns(q)) if q.name.is_empty() => Vec::new(),
        Some(detection::Target::Dns(q)) => vec![domain_sco(&mut objects, &q.name, &q.answers)],
        None => Vec::new(),
    };
    (top, objects)
}

/// The indicator generated for a rule or IOC that is not a STIX indicator itself: its id
/// (stable for the same rule and observation pattern) and the object.
fn generated_indicator(d: &Detection, ind: &Value, when: &str) -> (String, Value) {
    let source = ind["source"].as_str().unwrap_or_default();
    let name_id = ind["id"].as_str().unwrap_or_default();
    let pattern = observed_pattern(d);
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
    (id, i)
}

/// The STIX objects of one stored detection: a sighting of its indicator (the original STIX
/// indicator's id, or an indicator generated for the rule or IOC, included), by `identity_id`,
/// with the observed data it saw.
pub fn sighting(s: &StoredDetection, identity_id: &str) -> Vec<Value> {
    let d = s.detection.clone().unwrap_or_default();
    let when = ts(d.observed_at_ms);
    // Found in an agent's history: seen from its first to its last sighting there.
    let (first, last) = match &d.retro {
        Some(r) if r.first_seen_ms > 0 => (ts(r.first_seen_ms), ts(r.last_seen_ms)),
        _ => (when.clone(), when.clone()),
    };
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
        let (id, indicator) = generated_indicator(&d, &ind, &when);
        out.push(indicator);
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
            "first_observed": first,
            "last_observed": last,
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
        "first_seen": first,
        "last_seen": last,
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

/// An analyst's judgement that detections of a STIX indicator were a false positive: an
/// `opinion` (`strongly-disagree`) whose `object_refs` name the indicator, made by
/// `identity_id`, for verdict `verdict` (which makes its id) given at `at_ms`. No note: what an
/// analyst wrote stays at the collector.
pub fn false_positive_opinion(
    indicator: &str,
    verdict: u64,
    at_ms: i64,
    identity_id: &str,
) -> Value {
    let when = ts(at_ms);
    json!({
        "type": "opinion",
        "spec_version": "2.1",
        "id": stix_id("opinion", &format!("{verdict}|{indicator}")),
        "created": when,
        "modified": when,
        "created_by_ref": identity_id,
        "opinion": "strongly-disagree",
        "explanation": "An analyst judged detections of this indicator a false positive.",
        "object_refs": [indicator],
    })
}

/// A STIX 2.1 bundle of sightings of the given detections, made by `organisation`.
pub fn bundle(detections: &[StoredDetection], organisation: &str) -> Value {
    let who = identity(organisation);
    let who_id = who["id"].as_str().unwrap_or_default().to_string();
    let mut objects = vec![who];
    let mut seen = std::collections::HashSet::new();
    for s in detections {
        for o in sighting(s, &who_id) {
            // Shared objects (a file seen twice, one generated indicator) appear once.
            if seen.insert(o["id"].as_str().unwrap_or_default().to_string()) {
                objects.push(o);
            }
        }
    }
    bundle_of(objects)
}

/// A STIX 2.1 bundle of `objects`.
pub fn bundle_of(objects: Vec<Value>) -> Value {
    json!({
        "type": "bundle",
        "id": format!("bundle--{}", uuid::Uuid::new_v4()),
        "objects": objects,
    })
}
