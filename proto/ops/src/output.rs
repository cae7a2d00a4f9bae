//! How detections are printed: one JSON object per detection (`--json`) or one line of text.
//! `vedette-agent scan` and `vedettectl detections list` both print through here, so a field
//! has the same name and the same value format wherever a detection is shown.
//!
//! Absent values are `null` (an empty hash, description or path), never `""`; IPv6 addresses
//! are bracketed before the port; times are RFC 3339 with milliseconds in UTC.

use serde_json::{Value, json};

use vedette_proto::v1::{
    AgentInfo, Alert, AuditEntry, BundleInfo, BundleRolloutResponse, Detection, ExceptionInfo,
    ExportSink, IntelSource, StoredDetection, TokenInfo, Verdict, VersionRuleCosts, detection,
};
use vedette_proto::{action_name, kind_name};

/// RFC 3339 text of a millisecond timestamp, or an empty string for 0 (never happened).
pub fn rfc3339_ms(ms: i64) -> String {
    if ms <= 0 {
        return String::new();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.unsigned_abs());
    humantime::format_rfc3339_millis(t).to_string()
}

fn nonempty(s: &str) -> Value {
    if s.is_empty() { Value::Null } else { json!(s) }
}

/// `addr:port`, with an IPv6 address in brackets.
pub fn socket_text(addr: &str, port: u32) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

/// The JSON form of a detection as the agent made it.
pub fn detection_json(d: &Detection) -> Value {
    let mut v = json!({
        "id": d.id,
        "kind": kind_name(d.kind),
        "rule": d.rule,
        "source": d.source,
        "score": d.score,
        "description": nonempty(&d.description),
        "bundle_version": d.bundle_version,
        "action": action_name(d.action),
        "observed_at": rfc3339_ms(d.observed_at_ms),
        "path": null,
        "sha256": null,
        "pid": null,
    });
    match &d.target {
        Some(detection::Target::File(f)) => {
            v["path"] = json!(f.path);
            v["size"] = json!(f.size);
            v["sha256"] = nonempty(&f.sha256);
            v["md5"] = nonempty(&f.md5);
            v["sha1"] = nonempty(&f.sha1);
        }
        Some(detection::Target::Process(p)) => {
            v["path"] = nonempty(&p.exe);
            v["pid"] = json!(p.pid);
            v["ppid"] = json!(p.ppid);
            v["name"] = json!(p.name);
            v["cmdline"] = json!(p.cmdline);
            v["user"] = json!(p.user);
            v["sha256"] = nonempty(&p.exe_sha256);
        }
        Some(detection::Target::Connection(c)) => {
            v["path"] = nonempty(&c.exe);
            v["pid"] = json!(c.pid);
            v["protocol"] = json!(c.protocol);
            v["remote"] = json!(socket_text(&c.remote_addr, c.remote_port));
            v["domain"] = nonempty(&c.domain);
        }
        Some(detection::Target::Dns(q)) => {
            v["domain"] = json!(q.name);
            v["qtype"] = json!(q.qtype);
            v["answers"] = json!(q.answers);
            v["resolver"] = json!(q.resolver_addr);
            v["attributed"] = json!(q.attributed);
            v["pid"] = json!(q.pid);
            v["path"] = nonempty(&q.exe);
            v["cmdline"] = json!(q.cmdline);
            v["user"] = json!(q.user);
            v["count"] = json!(q.count);
        }
        None => {}
    }
    v["indicator"] = indicator_json(d);
    v["techniques"] = json!(d.techniques);
    if let Some(r) = &d.retro {
        v["retro"] = retro_json(r);
    }
    v
}

/// A hunt as `vedettectl hunt list --json` and the console API show it.
pub fn hunt_json(h: &vedette_proto::v1::HuntInfo) -> Value {
    json!({
        "id": h.id,
        "org": nonempty(&h.org),
        "created_by": h.created_by,
        "created_at": rfc3339_ms(h.created_at_ms),
        "expires_at": rfc3339_ms(h.expires_at_ms),
        "expired": h.expires_at_ms <= vedette_proto::now_ms(),
        "sha256": h.sha256,
        "md5": h.md5,
        "sha1": h.sha1,
        "asked": h.asked,
        "answered": h.answered,
        "pending": h.asked.saturating_sub(h.answered),
    })
}

/// A hunt with every agent it asked and what each answered (`hunt show --json`).
pub fn hunt_detail_json(r: &vedette_proto::v1::GetHuntResponse) -> Value {
    let agents: Vec<Value> = r
        .agents
        .iter()
        .map(|a| {
            let answer = a.answer.clone().unwrap_or_default();
            let hits: Vec<Value> = answer.hits.iter().map(hunt_hit_json).collect();
            json!({
                "agent_id": a.agent_id,
                "hostname": a.hostname,
                "org": a.org,
                "answered": a.answered_at_ms > 0,
                "answered_at": (a.answered_at_ms > 0).then(|| rfc3339_ms(a.answered_at_ms)),
                "hits": hits,
                "hits_total": answer.hits_total,
                "hits_cap": answer.hits_cap,
                "error": nonempty(&answer.error),
            })
        })
        .collect();
    let mut hunt = r.hunt.as_ref().map(hunt_json).unwrap_or_default();
    hunt["hits"] = json!(r.hunt.as_ref().map_or(0, |h| h.hits));
    json!({ "hunt": hunt, "agents": agents })
}

/// One file or executable a hunt found.
pub fn hunt_hit_json(h: &vedette_proto::v1::HuntHit) -> Value {
    json!({
        "kind": h.kind,
        "path": h.path,
        "sha256": nonempty(&h.sha256),
        "md5": nonempty(&h.md5),
        "sha1": nonempty(&h.sha1),
        "first_seen": rfc3339_ms(h.first_seen_ms),
        "last_seen": rfc3339_ms(h.last_seen_ms),
        "presence": presence_name(h.presence),
        "runs": h.runs,
        "user": nonempty(&h.user),
    })
}

/// When a match found in an agent's history was seen, and whether it is still there.
pub fn retro_json(r: &vedette_proto::v1::Retro) -> Value {
    json!({
        "first_seen": rfc3339_ms(r.first_seen_ms),
        "last_seen": rfc3339_ms(r.last_seen_ms),
        "first_seen_ms": r.first_seen_ms,
        "last_seen_ms": r.last_seen_ms,
        "presence": presence_name(r.presence),
        "runs": r.runs,
    })
}

/// `present`, `gone`, `changed` (or `unknown`).
pub fn presence_name(p: i32) -> &'static str {
    use vedette_proto::v1::Presence;
    match Presence::try_from(p) {
        Ok(Presence::Present) => "present",
        Ok(Presence::Gone) => "gone",
        Ok(Presence::Changed) => "changed",
        _ => "unknown",
    }
}

/// Where what matched came from. Detections stored before agents sent it get it from their
/// kind, rule and source.
pub fn indicator_json(d: &Detection) -> Value {
    match &d.indicator {
        Some(i) if !i.source.is_empty() => {
            let mut v = json!({"source": i.source, "id": i.id, "origin": i.origin});
            if !i.event.is_empty() {
                v["event"] = json!(i.event);
            }
            v
        }
        _ => {
            let yara = d.kind == vedette_proto::v1::DetectionKind::Yara as i32;
            let origin = if d.bundle_version > 0 {
                "bundle"
            } else {
                "local"
            };
            json!({
                "source": if yara { "yara" } else { "loki" },
                "id": if yara { &d.rule } else { &d.source },
                "origin": origin,
            })
        }
    }
}

/// The JSON form of a stored detection: the detection's fields plus where and when it arrived.
pub fn stored_json(s: &StoredDetection) -> Value {
    let mut v = detection_json(&s.detection.clone().unwrap_or_default());
    v["agent_id"] = json!(s.agent_id);
    v["hostname"] = json!(s.hostname);
    v["org"] = json!(s.org);
    v["received_at"] = json!(rfc3339_ms(s.received_at_ms));
    v["seq"] = json!(s.seq);
    if s.alert_id != 0 {
        v["alert_id"] = json!(s.alert_id);
        v["alert_status"] = json!(s.alert_status);
    }
    if !s.exception_id.is_empty() {
        v["exception_id"] = json!(s.exception_id);
    }
    if !s.response.is_empty() {
        v["response"] = json!(s.response);
    }
    v
}

/// Text from agents (paths, command lines, host names, errors) made safe for a terminal:
/// control characters (C0, DEL, C1: escape sequences start with them) and the bidirectional
/// overrides that reorder what is shown are written as `\x1b` or `\u{202e}`. Everything else,
/// accented letters included, is kept. JSON output needs none of this: it escapes by itself.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char =
        |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !s.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            c if !unsafe_char(c) => out.push(c),
            c if (c as u32) < 0x100 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// What a detection is about, in a few words: a path, or a process and what it did (made
/// [`printable`]).
pub fn target_text(d: &Detection) -> String {
    let text = match &d.target {
        Some(detection::Target::File(f)) => f.path.clone(),
        // An executable found in an agent's history: no process to name.
        Some(detection::Target::Process(p)) if p.pid == 0 => format!("{} run as {}", p.exe, p.user),
        Some(detection::Target::Process(p)) => format!("pid {} {} ({})", p.pid, p.exe, p.cmdline),
        Some(detection::Target::Connection(c)) => {
            format!(
                "pid {} {} -> {}",
                c.pid,
                c.exe,
                socket_text(&c.remote_addr, c.remote_port)
            ) + &if c.domain.is_empty() {
                String::new()
            } else {
                format!(" ({})", c.domain)
            }
        }
        Some(detection::Target::Dns(q)) if q.attributed => {
            format!("pid {} {} asked {} {}", q.pid, q.exe, q.qtype, q.name)
        }
        Some(detection::Target::Dns(q)) => format!("unattributed: asked {} {}", q.qtype, q.name),
        None => String::new(),
    };
    printable(&text).into_owned()
}

/// The text form of a detection: kind, score, rule, target (and `BLOCKED` for a denied exec).
pub fn detection_line(d: &Detection) -> String {
    let blocked = if d.action == vedette_proto::v1::DetectionAction::Blocked as i32 {
        "BLOCKED "
    } else {
        ""
    };
    let retro = d.retro.as_ref().map_or(String::new(), |r| {
        format!(
            "  [retro: seen {} to {}, {}]",
            rfc3339_ms(r.first_seen_ms),
            rfc3339_ms(r.last_seen_ms),
            presence_name(r.presence)
        )
    });
    format!(
        "{:<10} {:>3}  {}  {blocked}{}{retro}",
        kind_name(d.kind),
        d.score,
        printable(&d.rule),
        target_text(d)
    )
}

/// An agent as `vedettectl agents list --json` and the console API show it.
pub fn agent_json(a: &AgentInfo) -> serde_json::Value {
    json!({
        "id": a.id,
        "org": a.org,
        "hostname": a.hostname,
        "os": a.os,
        "kernel": a.kernel,
        "arch": a.arch,
        "agent_version": a.agent_version,
        "state": agent_state(a),
        "connected": a.connected,
        "revoked": a.revoked,
        "enrolled_at": rfc3339_ms(a.enrolled_at_ms),
        "first_seen": rfc3339_ms(a.first_seen_ms),
        "last_seen": rfc3339_ms(a.last_seen_ms),
        "bundle_version": a.bundle_version,
        "bundle_applied_at": rfc3339_ms(a.bundle_applied_at_ms),
        "bundle_failed_version": a.bundle_failed_version,
        "bundle_error": a.bundle_error,
        "dropped_total": a.dropped_total,
        "counters": a.counters.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "clock_skew_ms": a.clock_skew_ms,
        "stopped_at": (a.stopped_at_ms != 0).then(|| rfc3339_ms(a.stopped_at_ms)),
        "removed_at": (a.removed_at_ms != 0).then(|| rfc3339_ms(a.removed_at_ms)),
        "labels": a.labels,
    })
}

/// Clock skew worth telling: past this, `agents list` and the console say how far an agent's
/// clock is from the collector's.
pub const SHOWN_SKEW_MS: i64 = 30_000;

/// `clock 1h 0m 3s ahead` (or `behind`) when an agent's clock is more than [`SHOWN_SKEW_MS`]
/// from the collector's.
pub fn clock_skew(a: &AgentInfo) -> Option<String> {
    let skew = a.clock_skew_ms;
    if skew.unsigned_abs() <= SHOWN_SKEW_MS.unsigned_abs() {
        return None;
    }
    let secs = skew.unsigned_abs() / 1000;
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let how = if h > 0 {
        format!("{h}h {m}m {s}s")
    } else {
        format!("{m}m {s}s")
    };
    let way = if skew > 0 { "ahead" } else { "behind" };
    Some(format!("clock {how} {way}"))
}

/// connected, stopped (said goodbye), disconnected, never-seen or revoked.
pub fn agent_state(a: &AgentInfo) -> &'static str {
    if a.removed_at_ms != 0 {
        "removed"
    } else if a.revoked {
        "revoked"
    } else if a.connected {
        "connected"
    } else if a.stopped_at_ms != 0 {
        "stopped"
    } else if a.first_seen_ms == 0 {
        "never-seen"
    } else {
        "disconnected"
    }
}

/// An enrollment token (by its id, never the token).
pub fn token_json(t: &TokenInfo) -> serde_json::Value {
    json!({
        "id": t.id,
        "org": t.org,
        "uses_left": t.uses_left,
        "created_at": rfc3339_ms(t.created_at_ms),
        "expires_at": rfc3339_ms(t.expires_at_ms),
        "created_by": t.created_by,
        "revoked_at": (t.revoked_at_ms != 0).then(|| rfc3339_ms(t.revoked_at_ms)),
    })
}

/// An entry of the audit log.
pub fn audit_json(e: &AuditEntry) -> serde_json::Value {
    json!({
        "seq": e.seq,
        "at": rfc3339_ms(e.at_ms),
        "actor": e.actor,
        "action": e.action,
        "target": e.target,
        "outcome": e.outcome,
        "org": e.org,
        "detail": e.detail,
    })
}

/// A published bundle (without its content).
pub fn bundle_json(b: &BundleInfo) -> serde_json::Value {
    json!({
        "version": b.version,
        "name": b.name,
        "created_at": rfc3339_ms(b.created_at_ms),
        "publisher": b.publisher,
        "published_by": b.published_by,
        "published_at": rfc3339_ms(b.published_at_ms),
        "digest": b.digest,
        "signer_key": b.signer_key,
        "files": b.files,
        "size": b.size,
        "to_label": (!b.target.is_empty()).then_some(&b.target),
    })
}

/// Which agents run a bundle version.
pub fn rollout_json(r: &BundleRolloutResponse) -> serde_json::Value {
    json!({
        "version": r.version,
        "on_version": r.on_version,
        "behind": r.behind,
        "failed": r.failed,
        "ahead": r.ahead,
        "not_due": r.not_due,
        "to_label": (!r.target.is_empty()).then_some(&r.target),
        "agents": r.agents.iter().map(|a| json!({
            "agent_id": a.agent_id,
            "hostname": a.hostname,
            "applied_version": a.applied_version,
            "applied_at": rfc3339_ms(a.applied_at_ms),
            "failed_version": a.failed_version,
            "error": a.error,
            "connected": a.connected,
            "labels": a.labels,
            "due_version": a.due_version,
        })).collect::<Vec<_>>(),
    })
}

/// The costliest rules of a bundle version, as its agents measured them.
pub fn rule_costs_json(v: &VersionRuleCosts) -> serde_json::Value {
    json!({
        "version": v.bundle_version,
        "agents": v.agents,
        "rules": v.rules.iter().map(|r| json!({
            "rule": r.rule,
            "file": r.file,
            "line": r.line,
            "share_percent": f64::from(r.max_share_ppm) / 10_000.0,
            "time_us": r.max_time_us,
            "agent_id": r.agent_id,
            "hostname": r.hostname,
            "agents": r.agents,
        })).collect::<Vec<_>>(),
    })
}

/// An intel source's import figures.
pub fn source_json(s: &IntelSource) -> serde_json::Value {
    json!({
        "origin": s.origin,
        "kind": s.kind,
        "last_poll": (s.last_poll_ms > 0).then(|| rfc3339_ms(s.last_poll_ms)),
        "accepted": s.accepted,
        "skipped": s.skipped,
        "rejected": s.rejected,
        "revoked": s.revoked,
        "staged": s.staged,
        "last_error": (!s.last_error.is_empty()).then_some(&s.last_error),
    })
}

/// An export sink's progress.
pub fn sink_json(s: &ExportSink) -> serde_json::Value {
    json!({
        "sink": s.sink,
        "kind": "export",
        "exported": s.exported,
        "backlog": s.backlog,
        "last_attempt": (s.last_attempt_ms > 0).then(|| rfc3339_ms(s.last_attempt_ms)),
        "last_error": (!s.last_error.is_empty()).then_some(&s.last_error),
    })
}

/// An alert as `vedettectl alerts list --json` and `/api/v1/alerts` write it.
pub fn alert_json(a: &Alert) -> Value {
    json!({
        "id": a.id,
        "org": a.org,
        "rule": a.rule,
        "subject": a.subject,
        "kind": kind_name(a.kind),
        "score": a.score,
        "status": a.status,
        "new_activity": a.new_activity,
        "hosts": a.hosts,
        "detections": a.detections,
        "first_seen": rfc3339_ms(a.first_seen_ms),
        "last_seen": rfc3339_ms(a.last_seen_ms),
        "updated_at": rfc3339_ms(a.updated_at_ms),
    })
}

/// A verdict on an alert.
pub fn verdict_json(v: &Verdict) -> Value {
    json!({
        "at": rfc3339_ms(v.at_ms),
        "by": v.actor,
        "status": v.status,
        "note": v.note,
        "exception_id": v.exception_id,
    })
}

/// An exception as `vedettectl exceptions list --json` writes it.
pub fn exception_json(e: &ExceptionInfo) -> Value {
    let when = |ms: i64| match ms {
        0 => Value::Null,
        ms => json!(rfc3339_ms(ms)),
    };
    json!({
        "id": e.id,
        "rule": e.rule,
        "indicator": e.indicator,
        "sha256": e.sha256,
        "path": e.path,
        "org": e.org,
        "agent": e.agent,
        "expires_at": when(e.expires_at_ms),
        "reason": e.reason,
        "created_at": rfc3339_ms(e.created_at_ms),
        "created_by": e.created_by,
        "removed_at": when(e.removed_at_ms),
        "removed_by": e.removed_by,
    })
}

/// An action as one JSON object.
pub fn action_json(a: &vedette_proto::v1::ActionInfo) -> Value {
    let when = |ms: i64| (ms > 0).then(|| rfc3339_ms(ms));
    json!({
        "id": a.id,
        "kind": a.kind,
        "agent_id": a.agent_id,
        "hostname": a.hostname,
        "org": a.org,
        "pid": a.pid,
        "start_time": a.start_time,
        "path": a.path,
        "sha256": a.sha256,
        "detection_seq": a.detection_seq,
        "reason": a.reason,
        "state": a.state,
        "requested_by": a.requested_by,
        "requested_at": when(a.requested_at_ms),
        "decided_by": a.decided_by,
        "decided_at": when(a.decided_at_ms),
        "approve_by": when(a.approve_by_ms),
        "expires_at": when(a.expires_at_ms),
        "sent_at": when(a.sent_at_ms),
        "finished_at": when(a.finished_at_ms),
        "detail": a.detail,
        "undoes": a.undoes,
        "undone_by": a.undone_by,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_skew_is_told_past_thirty_seconds_either_way() {
        let at = |ms| AgentInfo {
            clock_skew_ms: ms,
            ..Default::default()
        };
        assert_eq!(clock_skew(&at(29_000)), None);
        assert_eq!(clock_skew(&at(-30_000)), None);
        assert_eq!(
            clock_skew(&at(3_603_500)).as_deref(),
            Some("clock 1h 0m 3s ahead")
        );
        assert_eq!(
            clock_skew(&at(-95_000)).as_deref(),
            Some("clock 1m 35s behind")
        );
    }

    #[test]
    fn escape_sequences_and_bidi_overrides_are_shown_not_obeyed() {
        assert_eq!(printable("/srv/café.txt"), "/srv/café.txt");
        let evil = "/tmp/a\u{1b}[2J\u{1b}]0;pwned\u{7}b\u{9b}c\u{202e}gpj.exe\n";
        let shown = printable(evil);
        assert_eq!(
            shown,
            "/tmp/a\\x1b[2J\\x1b]0;pwned\\x07b\\x9bc\\u{202e}gpj.exe\\x0a"
        );
        let d = Detection {
            rule: "r\u{1b}[31m".into(),
            target: Some(detection::Target::File(vedette_proto::v1::FileTarget {
                path: evil.into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let line = detection_line(&d);
        assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
        assert!(
            line.contains("\\x1b[31m") && line.contains("\\x1b[2J"),
            "{line}"
        );
    }
    use vedette_proto::v1::{ConnectionTarget, DetectionKind};

    #[test]
    fn ipv6_remotes_are_bracketed_and_empty_values_are_null() {
        let d = Detection {
            kind: DetectionKind::Connection as i32,
            target: Some(detection::Target::Connection(ConnectionTarget {
                pid: 7,
                remote_addr: "2001:db8::1".into(),
                remote_port: 443,
                ..Default::default()
            })),
            ..Default::default()
        };
        let v = detection_json(&d);
        assert_eq!(v["remote"], "[2001:db8::1]:443");
        assert!(v["description"].is_null() && v["path"].is_null());
        assert!(detection_line(&d).ends_with("-> [2001:db8::1]:443"));
    }
}
