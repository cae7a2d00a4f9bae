//! MISP: an event holding what detections observed, each attribute with its sighting.

use serde_json::{Value, json};
use vedette_ops::output::rfc3339_ms;
use vedette_proto::kind_name;
use vedette_proto::v1::{DetectionKind, StoredDetection, detection};

use crate::NAMESPACE;

/// The MISP attributes of one detection: what was observed, each with a sighting.
fn attributes_of(s: &StoredDetection) -> Vec<Value> {
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
            attr("domain", "Network activity", &c.domain);
        }
        Some(detection::Target::Dns(q)) => {
            attr("domain", "Network activity", &q.name);
            for a in q
                .answers
                .iter()
                .filter(|a| a.parse::<std::net::IpAddr>().is_ok())
            {
                attr("ip-dst", "Network activity", a);
            }
        }
        None => {}
    }
    if d.kind == DetectionKind::Yara as i32 {
        attr("text", "Other", &format!("YARA rule {}", d.rule));
    }
    out
}

/// A MISP event holding what the detections observed, tagged with their ATT&CK techniques.
pub fn event(detections: &[StoredDetection], organisation: &str, now_ms: i64) -> Value {
    let mut attributes = Vec::new();
    let mut techniques: Vec<String> = Vec::new();
    for s in detections {
        attributes.extend(attributes_of(s));
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
