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
        if hashes.is_empty() && name.is_empty() {
            return None;
        }
        let contributing = if hashes.is_empty() {
            json!({"name": name})
        } else {
            json!({"hashes": hashes})
        };
        let mut f = json!({"type": "file", "spec_version": "2.1",
            "id": sco_id("file", &contributing)});
        if !name.is_empty() {
            f["name"] = json!(name);
        }
        if !hashes.is_empty() {
            f["hashes"] = Value::Object(hashes);
        }
        if size > 0 {
            f["size"] = json!(size);
        }
        let id = f["id"].as_str().unwrap_or_default().to_string();
        objects.push(f);
        Some(id)
    };
    let base = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
    let top = match &d.target {
        Some(detection::Target::File(f)) => {
            file(&base(&f.path), &f.sha256, &f.md5, &f.sha1, f.size)
                .into_iter()
                .collect()
        }
        // Anonymised: no process is left, only its image's hash.
        Some(detection::Target::Process(p)) if p.pid == 0 && p.cmdline.is_empty() => {
            file("", &p.exe_sha256, "", "", 0).into_iter().collect()
        }
        Some(detection::Target::Process(p)) => {
            let image = file(&base(&p.exe), &p.exe_sha256, "", "", 0);
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

/// What exports carry about one participating organisation (`vedettectl orgs set --share`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// Everything the agent reported: host names, paths, users, process details.
    Full,
    /// The indicator, counts, first and last seen, and the organisation's sector and country;
    /// nothing that names a host, a path, a user, a command line or an internal address.
    Anonymised,
    /// Nothing about the organisation leaves the collector.
    None,
}

impl Share {
    pub const NAMES: &'static str = "full, anonymised or none";

    pub fn parse(s: &str) -> Option<Share> {
        match s {
            "full" => Some(Share::Full),
            "anonymised" | "anonymized" => Some(Share::Anonymised),
            "none" => Some(Share::None),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Share::Full => "full",
            Share::Anonymised => "anonymised",
            Share::None => "none",
        }
    }
}

/// A Traffic Light Protocol 2.0 level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tlp {
    Clear,
    Green,
    Amber,
    AmberStrict,
    Red,
}

impl Tlp {
    pub const NAMES: &'static str = "clear, green, amber, amber+strict or red";

    pub fn parse(s: &str) -> Option<Tlp> {
        match s.to_ascii_lowercase().trim_start_matches("tlp:") {
            "clear" | "white" => Some(Tlp::Clear),
            "green" => Some(Tlp::Green),
            "amber" => Some(Tlp::Amber),
            "amber+strict" => Some(Tlp::AmberStrict),
            "red" => Some(Tlp::Red),
            _ => None,
        }
    }

    /// As the TLP 2.0 STIX extension and MISP's `tlp` taxonomy write it: `amber+strict`.
    pub fn as_str(self) -> &'static str {
        match self {
            Tlp::Clear => "clear",
            Tlp::Green => "green",
            Tlp::Amber => "amber",
            Tlp::AmberStrict => "amber+strict",
            Tlp::Red => "red",
        }
    }

    /// The MISP tag (`tlp` taxonomy).
    pub fn misp_tag(self) -> String {
        format!("tlp:{}", self.as_str())
    }

    /// The id of the published STIX 2.1 marking definition of this TLP 2.0 level.
    pub fn marking_id(self) -> &'static str {
        match self {
            Tlp::Clear => "marking-definition--94868c89-83c2-464b-929b-a1a8aa3c8487",
            Tlp::Green => "marking-definition--bab4a63c-aed9-4cf5-a766-dfca5abac2bb",
            Tlp::Amber => "marking-definition--55d920b0-5e8b-4f79-9ee9-91f868d9b421",
            Tlp::AmberStrict => "marking-definition--939a9414-2ddd-4d32-a0cd-375ea402b003",
            Tlp::Red => "marking-definition--e828b379-4e03-4974-9ac4-e53a884c97c1",
        }
    }

    /// The marking definition itself, as the TLP 2.0 extension for STIX 2.1 publishes it.
    pub fn marking_definition(self) -> Value {
        json!({
            "type": "marking-definition",
            "spec_version": "2.1",
            "id": self.marking_id(),
            "created": "2022-10-01T00:00:00.000Z",
            "name": format!("TLP:{}", self.as_str().to_uppercase()),
            "extensions": {
                TLP_EXTENSION: {
                    "extension_type": "property-extension",
                    "tlp_2_0": self.as_str(),
                }
            }
        })
    }
}

/// The extension definition of TLP 2.0 markings in STIX 2.1.
const TLP_EXTENSION: &str = "extension-definition--60a3c5c5-0d10-413e-aab3-9e08dde9e88d";

/// An organisation's sharing policy, with what exports may say of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sharing {
    pub name: String,
    /// Its STIX identity id.
    pub stix_id: String,
    /// A STIX industry sector, or empty.
    pub sector: String,
    /// ISO 3166-1 alpha-2, or empty.
    pub country: String,
    pub share: Share,
    pub tlp: Tlp,
}

impl Sharing {
    /// The STIX objects naming who made the sightings: the organisation's identity (`full`),
    /// or one anonymous identity per sector and country (`anonymised`); with its location when
    /// the country is known. The first object is the identity.
    pub fn identity_objects(&self) -> Vec<Value> {
        let (id, name) = match self.share {
            Share::Full => (self.stix_id.clone(), self.name.clone()),
            _ => (
                stix_id(
                    "identity",
                    &format!("anonymous|{}|{}", self.sector, self.country),
                ),
                self.anonymous_name(),
            ),
        };
        let mut identity = json!({
            "type": "identity",
            "spec_version": "2.1",
            "id": id,
            "created": "2026-01-01T00:00:00.000Z",
            "modified": "2026-01-01T00:00:00.000Z",
            "name": name,
            "identity_class": "organization",
        });
        if !self.sector.is_empty() {
            identity["sectors"] = json!([self.sector]);
        }
        let mut out = vec![identity];
        if !self.country.is_empty() {
            let location = stix_id("location", &self.country);
            out.push(json!({
                "type": "location",
                "spec_version": "2.1",
                "id": location,
                "created": "2026-01-01T00:00:00.000Z",
                "modified": "2026-01-01T00:00:00.000Z",
                "country": self.country,
            }));
            out.push(json!({
                "type": "relationship",
                "spec_version": "2.1",
                "id": stix_id("relationship", &format!("{id}|located-at|{location}")),
                "created": "2026-01-01T00:00:00.000Z",
                "modified": "2026-01-01T00:00:00.000Z",
                "relationship_type": "located-at",
                "source_ref": id,
                "target_ref": location,
            }));
        }
        out
    }

    /// How an anonymised organisation is named: by its sector and country only.
    pub fn anonymous_name(&self) -> String {
        let what: Vec<&str> = [self.sector.as_str(), self.country.as_str()]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect();
        if what.is_empty() {
            "Anonymous participant".to_string()
        } else {
            format!("Anonymous participant ({})", what.join(", "))
        }
    }

    /// What `misp` sightings give as their source.
    pub fn sighting_source(&self) -> String {
        match self.share {
            Share::Full => self.name.clone(),
            _ => self.anonymous_name(),
        }
    }
}

/// A stored detection with everything that could name a host, a path, a user, a command line
/// or an internal address removed: what `anonymised` exports are made from. What stays is
/// the indicator (rule, its source and ids, techniques), the hashes and size of a file, the
/// remote address and port of a connection, and the times. The description goes too: it may
/// quote what was observed.
pub fn anonymise(s: &StoredDetection) -> StoredDetection {
    let mut d = s.detection.clone().unwrap_or_default();
    match &mut d.target {
        Some(detection::Target::File(f)) => {
            // A file name stays only when it is what matched (a file-name indicator).
            let name = if d.kind == DetectionKind::Filename as i32 {
                f.path.rsplit('/').next().unwrap_or_default().to_string()
            } else {
                String::new()
            };
            f.path = name;
            f.raw_path.clear();
        }
        Some(detection::Target::Process(p)) => {
            *p = crate::v1::ProcessTarget {
                exe_sha256: std::mem::take(&mut p.exe_sha256),
                ..Default::default()
            };
        }
        Some(detection::Target::Connection(c)) => {
            *c = crate::v1::ConnectionTarget {
                protocol: std::mem::take(&mut c.protocol),
                remote_addr: std::mem::take(&mut c.remote_addr),
                remote_port: c.remote_port,
                ..Default::default()
            };
        }
        None => {}
    }
    // A description may quote what was observed (a built-in finding names the process and
    // its executable, a memory match its region).
    d.description.clear();
    // Host-local rules are named by the host's own file.
    if d.bundle_version == 0 {
        d.source = "local".into();
        if let Some(i) = &mut d.indicator {
            i.origin = "local".into();
        }
    }
    StoredDetection {
        detection: Some(d),
        agent_id: String::new(),
        hostname: String::new(),
        received_at_ms: s.received_at_ms,
        seq: s.seq,
        org: String::new(),
    }
}

/// The STIX objects a sink sends for a batch of detections, each under its organisation's
/// policy (`policy` gives it by organisation name; an unknown one shares nothing): sightings
/// made by the organisation (or its anonymous stand-in), created by `producer` (the collector's
/// operator), marked with the organisation's TLP. Shared objects appear once.
pub fn stix_shared(
    detections: &[StoredDetection],
    policy: &dyn Fn(&str) -> Option<Sharing>,
    producer: &str,
) -> Vec<Value> {
    let who = identity(producer);
    let who_id = who["id"].as_str().unwrap_or_default().to_string();
    let mut objects = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut push = |objects: &mut Vec<Value>, o: Value| {
        if seen.insert(o["id"].as_str().unwrap_or_default().to_string()) {
            objects.push(o);
        }
    };
    for s in detections {
        let Some(policy) = policy(&s.org) else {
            continue;
        };
        let shared = match policy.share {
            Share::None => continue,
            Share::Full => s.clone(),
            Share::Anonymised => anonymise(s),
        };
        let marking = policy.tlp.marking_id();
        let made_by = policy.identity_objects();
        let by_id = made_by[0]["id"].as_str().unwrap_or_default().to_string();
        push(&mut objects, who.clone());
        push(&mut objects, policy.tlp.marking_definition());
        for o in made_by {
            push(&mut objects, o);
        }
        for mut o in stix_sighting(&shared, &by_id) {
            // Cyber-observables carry no created_by_ref.
            if !is_sco(&o) {
                o["created_by_ref"] = json!(who_id);
            }
            o["object_marking_refs"] = json!([marking]);
            push(&mut objects, o);
        }
    }
    objects
}

fn is_sco(o: &Value) -> bool {
    matches!(
        o["type"].as_str(),
        Some("file" | "process" | "ipv4-addr" | "ipv6-addr" | "network-traffic")
    )
}

/// The ECS document a sink writes for one detection under its organisation's policy; None
/// when the policy shares nothing.
pub fn ecs_shared(s: &StoredDetection, policy: &Sharing) -> Option<Value> {
    let mut v = match policy.share {
        Share::None => return None,
        Share::Full => {
            let mut v = ecs(s);
            v["organization"] = json!({"id": policy.stix_id, "name": policy.name});
            v
        }
        Share::Anonymised => {
            let mut v = ecs(&anonymise(s));
            // Of a process, only its image's hash stays.
            let image_hash = v["process"].get("hash").cloned();
            if let Some(m) = v.as_object_mut() {
                m.remove("host");
                m.remove("agent");
                m.remove("process");
                m.remove("user");
                m.remove("source");
            }
            if let Some(rule) = v.get_mut("rule").and_then(Value::as_object_mut) {
                rule.remove("description");
            }
            if let Some(file) = v.get_mut("file").and_then(Value::as_object_mut) {
                file.remove("path");
                if file.get("name").and_then(Value::as_str) == Some("") {
                    file.remove("name");
                }
            }
            if let Some(hash) = image_hash {
                v["process"] = json!({"hash": hash});
            }
            v["organization"] = json!({"name": policy.anonymous_name()});
            v
        }
    };
    v["threat"]["indicator"]["marking"] = json!({"tlp": policy.tlp.as_str().to_uppercase()});
    v["labels"]["tlp"] = json!(policy.tlp.as_str());
    if !policy.sector.is_empty() {
        v["labels"]["sector"] = json!(policy.sector);
    }
    if !policy.country.is_empty() {
        v["labels"]["country"] = json!(policy.country);
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{ConnectionTarget, FileTarget, IndicatorRef, ProcessTarget};

    fn policy(share: Share) -> Sharing {
        Sharing {
            name: "acme".into(),
            stix_id: "identity--00000000-0000-4000-8000-000000000001".into(),
            sector: "energy".into(),
            country: "DE".into(),
            share,
            tlp: Tlp::AmberStrict,
        }
    }

    fn stored(target: detection::Target, kind: DetectionKind) -> StoredDetection {
        StoredDetection {
            detection: Some(Detection {
                id: "d1".into(),
                kind: kind as i32,
                rule: "evil".into(),
                description: "process 42 runs /home/alice/x".into(),
                target: Some(target),
                indicator: Some(IndicatorRef {
                    source: "yara".into(),
                    id: "evil".into(),
                    origin: "/etc/vedette/rules/local.yar".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            agent_id: "agent-1".into(),
            hostname: "db01.acme.internal".into(),
            received_at_ms: 1,
            seq: 1,
            org: "acme".into(),
        }
    }

    const SECRETS: &[&str] = &[
        "db01.acme.internal",
        "agent-1",
        "/home/alice",
        "alice",
        "curl http://10.0.0.5",
        "10.0.0.9",
        "/etc/vedette/rules",
    ];

    fn all_kinds() -> Vec<StoredDetection> {
        vec![
            stored(
                detection::Target::File(FileTarget {
                    path: "/home/alice/payload.bin".into(),
                    sha256: "ab".repeat(32),
                    size: 3,
                    ..Default::default()
                }),
                DetectionKind::Yara,
            ),
            stored(
                detection::Target::Process(ProcessTarget {
                    pid: 42,
                    name: "curl".into(),
                    exe: "/home/alice/bin/curl".into(),
                    cmdline: "curl http://10.0.0.5".into(),
                    user: "alice".into(),
                    ..Default::default()
                }),
                DetectionKind::Process,
            ),
            stored(
                detection::Target::Connection(ConnectionTarget {
                    pid: 42,
                    exe: "/home/alice/bin/curl".into(),
                    protocol: "TCP".into(),
                    local_addr: "10.0.0.9".into(),
                    local_port: 5555,
                    remote_addr: "203.0.113.7".into(),
                    remote_port: 443,
                }),
                DetectionKind::Connection,
            ),
        ]
    }

    #[test]
    fn anonymised_exports_name_no_host_path_user_command_line_or_local_address() {
        let list = all_kinds();
        let p = policy(Share::Anonymised);
        let mut text = String::new();
        for s in &list {
            text.push_str(&ecs_shared(s, &p).unwrap().to_string());
        }
        text.push_str(&json!(stix_shared(&list, &|_| Some(p.clone()), "CSIRT")).to_string());
        for secret in SECRETS {
            assert!(!text.contains(secret), "`{secret}` in {text}");
        }
        // What stays: the indicator, the hash, the remote address, sector, country and TLP.
        for kept in [
            "evil",
            &"ab".repeat(32),
            "203.0.113.7",
            "Anonymous participant (energy, DE)",
            "amber+strict",
            "marking-definition--939a9414-2ddd-4d32-a0cd-375ea402b003",
        ] {
            assert!(text.contains(kept), "`{kept}` missing from {text}");
        }
    }

    #[test]
    fn full_exports_carry_the_host_and_none_exports_nothing() {
        let list = all_kinds();
        let full = ecs_shared(&list[1], &policy(Share::Full)).unwrap();
        assert_eq!(full["host"]["name"], "db01.acme.internal");
        assert_eq!(full["process"]["command_line"], "curl http://10.0.0.5");
        assert_eq!(full["organization"]["name"], "acme");
        assert_eq!(
            full["threat"]["indicator"]["marking"]["tlp"],
            "AMBER+STRICT"
        );
        for s in &list {
            assert!(ecs_shared(s, &policy(Share::None)).is_none());
        }
        assert!(stix_shared(&list, &|_| Some(policy(Share::None)), "CSIRT").is_empty());
        // An organisation without a policy shares nothing either.
        assert!(stix_shared(&list, &|_| None, "CSIRT").is_empty());
        let objects = stix_shared(&list, &|_| Some(policy(Share::Full)), "CSIRT");
        let sighting = objects.iter().find(|o| o["type"] == "sighting").unwrap();
        assert_eq!(
            sighting["where_sighted_refs"][0],
            "identity--00000000-0000-4000-8000-000000000001"
        );
        assert!(objects.iter().any(|o| o["type"] == "process"));
    }

    #[test]
    fn a_file_name_stays_only_when_it_is_the_indicator() {
        let file = |kind| {
            stored(
                detection::Target::File(FileTarget {
                    path: "/srv/www/shell.php".into(),
                    ..Default::default()
                }),
                kind,
            )
        };
        let p = policy(Share::Anonymised);
        let by_name = ecs_shared(&file(DetectionKind::Filename), &p).unwrap();
        assert_eq!(by_name["file"]["name"], "shell.php");
        assert!(by_name["file"].get("path").is_none());
        let by_yara = ecs_shared(&file(DetectionKind::Yara), &p).unwrap();
        assert!(by_yara["file"].get("name").is_none(), "{by_yara}");
        assert!(!by_yara.to_string().contains("shell.php"));
    }
}
