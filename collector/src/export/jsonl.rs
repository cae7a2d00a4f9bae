//! The JSON lines sink (`[[export.jsonl]]`): one ECS document per line, each with its
//! `event.sequence`, so a batch delivered twice is found in the file and skipped.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde_json::{Value, json};
use vedette_proto::v1::StoredDetection;
use vedette_share::sharing::{self, Share, Sharing};

use crate::store::AuditRow;

use super::ExportError;

fn file_error(path: &Path, source: std::io::Error) -> ExportError {
    ExportError::File {
        path: path.to_owned(),
        source,
    }
}

/// Which lines of a file: detections, or the audit log's entries (`event.dataset`
/// "vedette.audit").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lines {
    Detections,
    Audit,
}

const AUDIT_DATASET: &str = "vedette.audit";

/// The `event.sequence` of the file's last complete line of that kind in its last MiB (0 for
/// none); a partial last line (a write cut short) is cut off, to be written again whole.
pub(super) fn last_sequence(path: &Path, which: Lines) -> Result<u64, ExportError> {
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(file_error(path, e)),
    };
    let len = f.metadata().map_err(|e| file_error(path, e))?.len();
    let tail_len = len.min(1 << 20);
    f.seek(SeekFrom::Start(len - tail_len))
        .map_err(|e| file_error(path, e))?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).map_err(|e| file_error(path, e))?;
    let complete = match tail.iter().rposition(|b| *b == b'\n') {
        Some(i) => i + 1,
        None => 0,
    };
    if complete < tail.len() {
        f.set_len(len - tail_len + complete as u64)
            .map_err(|e| file_error(path, e))?;
    }
    let text = String::from_utf8_lossy(&tail[..complete]);
    Ok(text
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| (v["event"]["dataset"] == AUDIT_DATASET) == (which == Lines::Audit))
        .and_then(|v| v["event"]["sequence"].as_u64())
        .unwrap_or(0))
}

/// An audit entry as an ECS event. For an organisation that shares `anonymised` (or no longer
/// exists: renamed or removed since), its detail (which may name a host) is left out; one that
/// shares `none` has nothing exported.
fn audit_document(e: &AuditRow, policy: &dyn Fn(&str) -> Option<Sharing>) -> Option<Value> {
    let anonymised = if e.org.is_empty() {
        false
    } else {
        match policy(&e.org).map(|p| p.share) {
            Some(Share::None) => return None,
            Some(Share::Anonymised) | None => true,
            Some(Share::Full) => false,
        }
    };
    let ok = e.outcome == "ok";
    let mut v = json!({
        "@timestamp": vedette_ops::output::rfc3339_ms(e.at_ms),
        "event": {
            "kind": "event",
            "category": ["configuration"],
            "type": ["change"],
            "action": e.action,
            "outcome": if ok { "success" } else { "failure" },
            "dataset": AUDIT_DATASET,
            "sequence": e.seq,
        },
        "user": { "name": e.actor },
        "message": format!("{} {} {}: {}", e.actor, e.action, e.target, e.outcome),
        "vedette": { "audit": { "target": e.target, "outcome": e.outcome } },
    });
    if !ok {
        v["event"]["reason"] = json!(e.outcome);
    }
    if !e.org.is_empty() {
        v["organization"] = json!({ "name": e.org });
    }
    if !anonymised && !e.detail.is_empty() {
        v["vedette"]["audit"]["detail"] = json!(e.detail);
    }
    Some(v)
}

/// Appends the audit entries as ECS lines and syncs the file.
pub(super) fn append_audit(
    path: &Path,
    batch: &[AuditRow],
    policy: &dyn Fn(&str) -> Option<Sharing>,
) -> Result<(), ExportError> {
    let mut text = String::new();
    for e in batch {
        if let Some(v) = audit_document(e, policy) {
            text.push_str(&v.to_string());
            text.push('\n');
        }
    }
    write_lines(path, &text)
}

/// Appends the batch's ECS lines (under each organisation's policy) and syncs the file.
pub(super) fn append(
    path: &Path,
    batch: &[(u64, StoredDetection)],
    policy: &dyn Fn(&str) -> Option<Sharing>,
) -> Result<(), ExportError> {
    let mut text = String::new();
    for (seq, d) in batch {
        let Some(mut v) = policy(&d.org).and_then(|p| sharing::ecs_document(d, &p)) else {
            continue;
        };
        v["event"]["sequence"] = json!(seq);
        text.push_str(&v.to_string());
        text.push('\n');
    }
    write_lines(path, &text)
}

/// Appends whole lines to the file and syncs it.
fn write_lines(path: &Path, text: &str) -> Result<(), ExportError> {
    if text.is_empty() {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| file_error(path, e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_data())
        .map_err(|e| file_error(path, e))
}
