//! Imports shared threat intelligence into intel lines (see [`crate::intel`]): STIX 2.1 bundles
//! and TAXII envelopes, MISP events and MISP feeds.
//!
//! Each indicator keeps where it came from. What is not imported is said, with its id and the
//! reason: `skipped` for what is deliberately left out (an attribute not marked `to_ids`, an
//! indicator past its `valid_until`), `rejected` for what cannot be evaluated (an unknown MISP
//! type, a STIX pattern outside what [`crate::stix`] evaluates, a YARA rule that does not
//! compile). `revoked` lists STIX indicators withdrawn by their producer.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use crate::ParseError;
use crate::intel::IntelLine;
use crate::rules::technique_id;

/// What an import found.
#[derive(Debug, Default)]
pub struct Imported {
    pub accepted: Vec<IntelLine>,
    pub skipped: Vec<(String, String)>,
    pub rejected: Vec<(String, String)>,
    pub revoked: Vec<String>,
}

impl Imported {
    pub fn extend(&mut self, other: Imported) {
        self.accepted.extend(other.accepted);
        self.skipped.extend(other.skipped);
        self.rejected.extend(other.rejected);
        self.revoked.extend(other.revoked);
    }
}

/// A document of either kind, told apart by its shape: a STIX bundle (`"type": "bundle"`), a
/// TAXII envelope (`"objects": […]`), a MISP event (`{"Event": …}`, or a list of them as MISP's
/// REST API returns).
pub fn document(doc: &Value, origin: &str, now_ms: i64) -> Result<Imported, ParseError> {
    if doc.get("type").and_then(Value::as_str) == Some("bundle") || doc.get("objects").is_some() {
        let objects = doc
            .get("objects")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        return Ok(stix_objects(objects, origin, now_ms));
    }
    if doc.get("Event").is_some() {
        return misp_event(doc, origin);
    }
    if let Some(list) = doc
        .get("response")
        .and_then(Value::as_array)
        .or(doc.as_array())
    {
        let mut all = Imported::default();
        for e in list {
            all.extend(misp_event(e, origin)?);
        }
        return Ok(all);
    }
    Err("neither a STIX 2.1 bundle, a TAXII envelope nor a MISP event".into())
}

/// STIX objects (a bundle's or a TAXII page's): the indicators among them.
pub fn stix_objects(objects: &[Value], origin: &str, now_ms: i64) -> Imported {
    let mut out = Imported::default();
    let mut indicates = indicated_techniques(objects);
    for o in objects {
        if o.get("type").and_then(Value::as_str) != Some("indicator") {
            continue;
        }
        let id = o
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let extra = indicates.remove(id.as_str()).unwrap_or_default();
        match stix_indicator(o, id, origin, now_ms, extra) {
            Ok(line) => out.accepted.push(line),
            Err(Refused::Revoked(id)) => out.revoked.push(id),
            Err(Refused::Skipped(id, why)) => out.skipped.push((id, why)),
            Err(Refused::Rejected(id, why)) => out.rejected.push((id, why)),
        }
    }
    out
}

/// Why an indicator is not imported.
enum Refused {
    Revoked(String),
    Skipped(String, String),
    Rejected(String, String),
}

/// The techniques of attack patterns that `indicates` relationships in the same objects tie
/// to an indicator, by the indicator's id.
fn indicated_techniques(objects: &[Value]) -> HashMap<&str, Vec<String>> {
    let mut patterns: HashMap<&str, String> = HashMap::new();
    for o in objects {
        if o.get("type").and_then(Value::as_str) == Some("attack-pattern")
            && let Some(id) = o.get("id").and_then(Value::as_str)
            && let Some(t) = attack_pattern_technique(o)
        {
            patterns.insert(id, t);
        }
    }
    let mut indicates: HashMap<&str, Vec<String>> = HashMap::new();
    for o in objects {
        if o.get("type").and_then(Value::as_str) == Some("relationship")
            && o.get("relationship_type").and_then(Value::as_str) == Some("indicates")
            && let (Some(src), Some(dst)) = (
                o.get("source_ref").and_then(Value::as_str),
                o.get("target_ref").and_then(Value::as_str),
            )
            && let Some(t) = patterns.get(dst)
        {
            indicates.entry(src).or_default().push(t.clone());
        }
    }
    indicates
}

/// One STIX indicator as an intel line, with `extra` techniques from relationships.
fn stix_indicator(
    o: &Value,
    id: String,
    origin: &str,
    now_ms: i64,
    extra: Vec<String>,
) -> Result<IntelLine, Refused> {
    if !id.starts_with("indicator--") {
        return Err(Refused::Rejected(id, "indicator without a valid id".into()));
    }
    if o.get("revoked").and_then(Value::as_bool) == Some(true) {
        return Err(Refused::Revoked(id));
    }
    let valid_until_ms = match o.get("valid_until").and_then(Value::as_str) {
        Some(t) => match rfc3339_ms(t) {
            Some(ms) => Some(ms),
            None => {
                let why = format!("valid_until `{t}` is not a timestamp");
                return Err(Refused::Rejected(id, why));
            }
        },
        None => None,
    };
    if valid_until_ms.is_some_and(|t| t <= now_ms) {
        return Err(Refused::Skipped(id, "expired (valid_until is past)".into()));
    }
    let pattern_type = o.get("pattern_type").and_then(Value::as_str).unwrap_or("");
    let Some(pattern) = o.get("pattern").and_then(Value::as_str) else {
        return Err(Refused::Rejected(id, "indicator without a pattern".into()));
    };
    let mut techniques = Vec::new();
    if let Some(phases) = o.get("kill_chain_phases").and_then(Value::as_array) {
        for p in phases {
            if p.get("kill_chain_name").and_then(Value::as_str) == Some("mitre-attack")
                && let Some(t) = p
                    .get("phase_name")
                    .and_then(Value::as_str)
                    .and_then(technique_id)
            {
                techniques.push(t);
            }
        }
    }
    techniques.extend(extra);
    techniques.sort();
    techniques.dedup();
    let line = IntelLine {
        source: "stix".into(),
        id: id.clone(),
        event: String::new(),
        origin: origin.into(),
        name: text(o, "name"),
        description: text(o, "description"),
        score: o
            .get("confidence")
            .and_then(Value::as_u64)
            .map(|c| c.min(100) as u32),
        techniques,
        valid_until_ms,
        pattern_type: pattern_type.into(),
        pattern: pattern.into(),
    };
    match check(&line) {
        Ok(()) => Ok(line),
        Err(reason) => Err(Refused::Rejected(id, reason.to_string())),
    }
}

/// Whether the engine can evaluate the line's pattern, and why not. A YARA pattern is
/// compiled by the compiler [`crate::isolated::compile_outside_rules_with`] set, if any.
pub fn check(line: &IntelLine) -> Result<(), ParseError> {
    check_with(line, crate::isolated::outside())
}

/// [`check`], compiling a YARA pattern through `compiler` (in this process without one).
pub fn check_with(
    line: &IntelLine,
    compiler: Option<std::sync::Arc<dyn crate::IsolatedCompiler>>,
) -> Result<(), ParseError> {
    match line.pattern_type.as_str() {
        "stix" => crate::stix::parse(&line.pattern).map(|_| ()),
        "yara" => {
            let mut b = crate::RuleSetBuilder::new();
            b.add_yara_source(Path::new(&line.id), line.pattern.as_bytes());
            if let Some(c) = compiler {
                b = b.compile_with(c);
            }
            let set = b.build(0);
            match set.report().problems.first() {
                Some(p) => Err(format!("YARA rule does not compile: {}", p.reason).into()),
                None if set.yara_rules() == 0 => Err("YARA pattern holds no rule".into()),
                None => Ok(()),
            }
        }
        other => Err(format!("pattern type `{other}` is not evaluated (stix and yara are)").into()),
    }
}

fn text(o: &Value, key: &str) -> String {
    o.get(key).and_then(Value::as_str).unwrap_or("").to_string()
}

fn attack_pattern_technique(o: &Value) -> Option<String> {
    o.get("external_references")?
        .as_array()?
        .iter()
        .filter(|r| {
            r.get("source_name")
                .and_then(Value::as_str)
                .is_some_and(|s| s.starts_with("mitre"))
        })
        .find_map(|r| {
            r.get("external_id")
                .and_then(Value::as_str)
                .and_then(technique_id)
        })
}

/// The attribute types taken from MISP, and how each becomes a STIX pattern.
pub const MISP_TYPES: [&str; 16] = [
    "md5",
    "sha1",
    "sha256",
    "filename",
    "filename|md5",
    "filename|sha1",
    "filename|sha256",
    "ip-src",
    "ip-dst",
    "ip-src|port",
    "ip-dst|port",
    "domain",
    "hostname",
    "domain|ip",
    "url",
    "yara",
];

/// The indicators of one MISP event (`{"Event": {…}}`): its attributes and its objects'
/// attributes marked `to_ids`.
pub fn misp_event(doc: &Value, origin: &str) -> Result<Imported, ParseError> {
    let event = doc.get("Event").unwrap_or(doc);
    let event_uuid = event
        .get("uuid")
        .and_then(Value::as_str)
        .ok_or("MISP event without a uuid")?;
    let info = text(event, "info");
    let event_techniques = tag_techniques(event);
    let mut out = Imported::default();
    let mut attributes: Vec<&Value> = Vec::new();
    if let Some(list) = event.get("Attribute").and_then(Value::as_array) {
        attributes.extend(list);
    }
    if let Some(objects) = event.get("Object").and_then(Value::as_array) {
        for o in objects {
            if let Some(list) = o.get("Attribute").and_then(Value::as_array) {
                attributes.extend(list);
            }
        }
    }
    for a in attributes {
        let uuid = text(a, "uuid");
        if uuid.is_empty() {
            out.rejected
                .push((format!("{event_uuid}/?"), "attribute without a uuid".into()));
            continue;
        }
        if truthy(a.get("deleted")) {
            out.skipped.push((uuid, "deleted".into()));
            continue;
        }
        let kind = text(a, "type");
        let value = text(a, "value");
        let pattern = match misp_pattern(&kind, &value) {
            Ok(p) => p,
            Err(reason) => {
                out.rejected.push((uuid, reason.to_string()));
                continue;
            }
        };
        if !truthy(a.get("to_ids")) {
            out.skipped.push((uuid, format!("{kind}: to_ids is false")));
            continue;
        }
        let mut techniques = event_techniques.clone();
        techniques.extend(tag_techniques(a));
        techniques.sort();
        techniques.dedup();
        let (pattern_type, pattern) = pattern;
        let line = IntelLine {
            source: "misp".into(),
            id: uuid.clone(),
            event: event_uuid.into(),
            origin: origin.into(),
            name: if info.is_empty() {
                kind.clone()
            } else {
                format!("{info} ({kind})")
            },
            description: text(a, "comment"),
            score: None,
            techniques,
            valid_until_ms: None,
            pattern_type: pattern_type.into(),
            pattern,
        };
        match check(&line) {
            Ok(()) => out.accepted.push(line),
            Err(reason) => out.rejected.push((uuid, reason.to_string())),
        }
    }
    Ok(out)
}

/// `to_ids` and `deleted` come as booleans, or as "1"/"0" from older instances.
fn truthy(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "1" || s.eq_ignore_ascii_case("true"),
        Some(Value::Number(n)) => n.as_u64() == Some(1),
        _ => false,
    }
}

/// A STIX pattern string literal.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The pattern type and pattern of a MISP attribute.
fn misp_pattern(kind: &str, value: &str) -> Result<(&'static str, String), ParseError> {
    let hash = |algo: &str, h: &str| format!("file:hashes.{algo} = {}", quote(h.trim()));
    let algo = |k: &str| match k {
        "md5" => "MD5",
        "sha1" => "'SHA-1'",
        _ => "'SHA-256'",
    };
    let address = |v: &str| {
        let ip = v.trim();
        let bare = ip.split('/').next().unwrap_or(ip);
        let object = if bare.contains(':') {
            "ipv6-addr"
        } else {
            "ipv4-addr"
        };
        format!("[{object}:value = {}]", quote(ip))
    };
    Ok(match kind {
        "md5" | "sha1" | "sha256" => ("stix", format!("[{}]", hash(algo(kind), value))),
        "filename" => ("stix", format!("[file:name = {}]", quote(value))),
        "filename|md5" | "filename|sha1" | "filename|sha256" => {
            let (name, h) = value
                .rsplit_once('|')
                .ok_or_else(|| format!("{kind} value `{}` has no `|`", clip(value)))?;
            let algo = algo(&kind["filename|".len()..]);
            (
                "stix",
                format!("[file:name = {} AND {}]", quote(name), hash(algo, h)),
            )
        }
        "ip-src" | "ip-dst" => ("stix", address(value)),
        "ip-src|port" | "ip-dst|port" => {
            let ip = value.rsplit_once('|').map(|(ip, _)| ip).unwrap_or(value);
            ("stix", address(ip))
        }
        "domain" | "hostname" => (
            "stix",
            format!("[domain-name:value = {}]", quote(value.trim())),
        ),
        // The name, or the address it was seen at.
        "domain|ip" => {
            let (name, ip) = value
                .split_once('|')
                .ok_or_else(|| format!("domain|ip value `{}` has no `|`", clip(value)))?;
            (
                "stix",
                format!(
                    "[domain-name:value = {}] OR {}",
                    quote(name.trim()),
                    address(ip)
                ),
            )
        }
        // The host part: where the URL leads, as a domain (an address host is no domain).
        "url" => {
            let host = url_host(value)
                .filter(|h| crate::stix::is_domain(h) && h.chars().any(|c| c.is_ascii_alphabetic()))
                .ok_or_else(|| format!("url `{}` names no host", clip(value)))?;
            ("stix", format!("[domain-name:value = {}]", quote(host)))
        }
        "yara" => ("yara", value.to_string()),
        other => return Err(format!("MISP type `{other}` is not imported").into()),
    })
}

/// The host of a URL (`https://user@Host:8443/path` is `Host`).
fn url_host(url: &str) -> Option<&str> {
    let rest = url.trim().split_once("://").map_or(url.trim(), |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next()?;
    let host = authority.rsplit('@').next()?;
    let host = host.split(':').next()?;
    (!host.is_empty()).then_some(host)
}

fn clip(s: &str) -> String {
    s.chars().take(60).collect()
}

/// ATT&CK technique ids in `misp-galaxy:mitre-attack-pattern="Name - T1190"` tags.
fn tag_techniques(o: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for tag in o.get("Tag").and_then(Value::as_array).into_iter().flatten() {
        let name = tag.get("name").and_then(Value::as_str).unwrap_or("");
        if !name.starts_with("misp-galaxy:mitre-attack-pattern=") {
            continue;
        }
        let inner = name.rsplit('=').next().unwrap_or("").trim_matches('"');
        if let Some(t) = inner.rsplit([' ', '-']).find_map(technique_id) {
            out.push(t);
        }
    }
    out
}

/// A MISP feed on disk: `manifest.json` lists the events, each in `<uuid>.json`.
pub fn misp_feed_dir(dir: &Path, origin: &str) -> Result<Imported, ParseError> {
    let manifest_path = dir.join("manifest.json");
    let manifest = read_json(&manifest_path)?;
    let uuids = feed_events(&manifest).map_err(|e| format!("{}: {e}", manifest_path.display()))?;
    let mut all = Imported::default();
    for uuid in uuids {
        let path = dir.join(format!("{uuid}.json"));
        let doc = read_json(&path)?;
        all.extend(misp_event(&doc, origin).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    Ok(all)
}

/// Event UUIDs a feed manifest lists (safe as file names: hex and dashes only).
pub fn feed_events(manifest: &Value) -> Result<Vec<String>, ParseError> {
    let map = manifest
        .as_object()
        .ok_or("a feed manifest is a JSON object of event UUIDs")?;
    let mut out = Vec::new();
    for uuid in map.keys() {
        if uuid.is_empty()
            || uuid.len() > 64
            || !uuid.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        {
            return Err(format!("`{}` is not an event UUID", clip(uuid)).into());
        }
        out.push(uuid.clone());
    }
    out.sort();
    Ok(out)
}

/// Files larger than this are refused.
pub const MAX_DOCUMENT_BYTES: u64 = 256 << 20;

fn read_json(path: &Path) -> Result<Value, ParseError> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > MAX_DOCUMENT_BYTES {
        return Err(format!(
            "{}: {} bytes is more than the {MAX_DOCUMENT_BYTES} a document may hold",
            path.display(),
            meta.len()
        )
        .into());
    }
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: not JSON: {e}", path.display()).into())
}

/// A file or a feed directory, told apart by what it is.
pub fn path(path: &Path, now_ms: i64) -> Result<Imported, ParseError> {
    let origin = path.display().to_string();
    if path.is_dir() {
        return misp_feed_dir(path, &origin);
    }
    let doc = read_json(path)?;
    document(&doc, &origin, now_ms).map_err(|e| format!("{origin}: {e}").into())
}

/// Milliseconds since the epoch of an RFC 3339 UTC timestamp (`2026-11-26T10:00:00.123Z`).
pub fn rfc3339_ms(t: &str) -> Option<i64> {
    let b = t.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = t.get(r)?;
        s.chars()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (y, mo, d, h, mi, s) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let rest = &t[19..];
    let (frac, zone) = match rest.strip_prefix('.') {
        Some(r) => {
            let n = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
            (&r[..n], &r[n..])
        }
        None => ("", rest),
    };
    if !matches!(zone, "Z" | "z") {
        return None;
    }
    let ms: i64 = format!("{:0<3}", &frac[..frac.len().min(3)]).parse().ok()?;
    // Days from the civil date (proleptic Gregorian).
    let (y, m) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + h) * 60 + mi) * 60_000 + s * 1000 + ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_yara_item_whose_compiler_crashes_or_hangs_is_refused_and_this_process_goes_on() {
        use crate::child::ChildCompiler;
        let line = IntelLine::parse(
            r#"{"source":"misp","id":"y1","pattern_type":"yara","pattern":"rule y { condition: true }"}"#,
        )
        .unwrap();
        let sh = |script: &str| ChildCompiler::new("/bin/sh", ["-c", script]);
        let crashes: std::sync::Arc<dyn crate::IsolatedCompiler> =
            std::sync::Arc::new(sh("cat >/dev/null; kill -9 $$"));
        let why = check_with(&line, Some(crashes)).unwrap_err().to_string();
        assert!(why.contains("killed by signal 9"), "{why}");
        let hangs: std::sync::Arc<dyn crate::IsolatedCompiler> = std::sync::Arc::new(
            sh("exec sleep 600").with_deadline(std::time::Duration::from_millis(300)),
        );
        let why = check_with(&line, Some(hangs)).unwrap_err().to_string();
        assert!(why.contains("deadline"), "{why}");
        // The same item compiles where the compiler works.
        assert!(check_with(&line, None).is_ok());
    }
    use serde_json::json;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            rfc3339_ms("2026-11-26T14:00:00.5Z"),
            Some(1_795_701_600_500)
        );
        assert_eq!(rfc3339_ms("2026-11-26T14:00:00+01:00"), None);
        assert_eq!(rfc3339_ms("yesterday"), None);
    }

    #[test]
    fn stix_bundle_indicators_with_techniques_revocation_and_reasons() {
        let bundle = json!({"type": "bundle", "id": "bundle--1", "objects": [
            {"type": "indicator", "id": "indicator--a", "name": "webshell", "pattern_type": "stix",
             "pattern": "[file:name = 'shell.aspx']", "valid_from": "2026-01-01T00:00:00Z",
             "kill_chain_phases": [{"kill_chain_name": "mitre-attack", "phase_name": "t1505.003"}]},
            {"type": "indicator", "id": "indicator--b", "pattern_type": "stix",
             "pattern": "[file:size > 3]"},
            {"type": "indicator", "id": "indicator--c", "pattern_type": "sigma", "pattern": "x"},
            {"type": "indicator", "id": "indicator--d", "pattern_type": "stix", "revoked": true,
             "pattern": "[file:name = 'x']"},
            {"type": "indicator", "id": "indicator--e", "pattern_type": "stix",
             "pattern": "[file:name = 'old']", "valid_until": "2001-01-01T00:00:00Z"},
            {"type": "indicator", "id": "indicator--f", "pattern_type": "yara",
             "pattern": "rule lazarus { strings: $a = \"x\" condition: $a }"},
            {"type": "attack-pattern", "id": "attack-pattern--1",
             "external_references": [{"source_name": "mitre-attack", "external_id": "T1190"}]},
            {"type": "relationship", "id": "relationship--1", "relationship_type": "indicates",
             "source_ref": "indicator--f", "target_ref": "attack-pattern--1"},
        ]});
        let got = document(&bundle, "feed.json", 1_800_000_000_000).unwrap();
        let ids: Vec<_> = got.accepted.iter().map(|l| l.id.as_str()).collect();
        assert_eq!(ids, ["indicator--a", "indicator--f"]);
        assert_eq!(got.accepted[0].techniques, ["T1505.003"]);
        assert_eq!(got.accepted[1].techniques, ["T1190"]);
        assert_eq!(got.accepted[0].origin, "feed.json");
        assert_eq!(got.revoked, ["indicator--d"]);
        assert_eq!(got.skipped[0].0, "indicator--e");
        let rejected: Vec<_> = got.rejected.iter().map(|(i, _)| i.as_str()).collect();
        assert_eq!(rejected, ["indicator--b", "indicator--c"]);
        assert!(
            got.rejected[0].1.contains("file:size"),
            "{:?}",
            got.rejected
        );
    }

    #[test]
    fn misp_event_honours_to_ids_and_lists_unknown_types() {
        let event = json!({"Event": {"uuid": "ev-1", "info": "Lazarus crypto theft",
            "Tag": [{"name": "misp-galaxy:mitre-attack-pattern=\"Exploit Public-Facing Application - T1190\""}],
            "Attribute": [
                {"uuid": "a1", "type": "sha256", "value": "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855", "to_ids": true},
                {"uuid": "a2", "type": "filename|md5", "value": "o'neil.exe|d41d8cd98f00b204e9800998ecf8427e", "to_ids": "1"},
                {"uuid": "a3", "type": "ip-dst", "value": "2001:db8::7", "to_ids": true},
                {"uuid": "a4", "type": "domain", "value": "evil.example", "to_ids": false},
                {"uuid": "a5", "type": "btc", "value": "1abc", "to_ids": true},
            ],
            "Object": [{"Attribute": [{"uuid": "a6", "type": "hostname", "value": "c2.evil.example", "to_ids": true}]}],
        }});
        let got = document(&event, "feed", 0).unwrap();
        let ids: Vec<_> = got.accepted.iter().map(|l| l.id.as_str()).collect();
        assert_eq!(ids, ["a1", "a2", "a3", "a6"]);
        assert!(
            got.accepted
                .iter()
                .all(|l| l.event == "ev-1" && l.techniques == ["T1190"])
        );
        assert_eq!(
            got.accepted[1].pattern,
            "[file:name = 'o\\'neil.exe' AND file:hashes.MD5 = 'd41d8cd98f00b204e9800998ecf8427e']"
        );
        assert_eq!(got.accepted[2].pattern, "[ipv6-addr:value = '2001:db8::7']");
        assert_eq!(
            got.skipped,
            [("a4".to_string(), "domain: to_ids is false".to_string())]
        );
        assert_eq!(got.rejected[0].0, "a5");
        assert!(got.rejected[0].1.contains("btc"));
    }

    /// `domain|ip` is the name or the address; `url` is its host, as a domain.
    #[test]
    fn misp_domain_ip_and_url_become_domains() {
        let event = json!({"Event": {"uuid": "ev-2", "Attribute": [
            {"uuid": "b1", "type": "domain|ip", "value": "c2.lazarus.example|203.0.113.9", "to_ids": true},
            {"uuid": "b2", "type": "url", "value": "https://drop:pw@Files.Lazarus.example:8443/a?b", "to_ids": true},
            {"uuid": "b3", "type": "url", "value": "http://203.0.113.9/x", "to_ids": true},
            {"uuid": "b4", "type": "domain|ip", "value": "no-bar.example", "to_ids": true},
        ]}});
        let got = document(&event, "feed", 0).unwrap();
        let patterns: Vec<_> = got.accepted.iter().map(|l| l.pattern.as_str()).collect();
        assert_eq!(
            patterns,
            [
                "[domain-name:value = 'c2.lazarus.example'] OR [ipv4-addr:value = '203.0.113.9']",
                "[domain-name:value = 'Files.Lazarus.example']",
            ]
        );
        let rejected: Vec<_> = got.rejected.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(rejected, ["b3", "b4"]);
    }
}
