//! The JSON lines sink (`[[export.jsonl]]`): one ECS document per line, each with its
//! `event.sequence`, so a batch delivered twice is found in the file and skipped.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde_json::{Value, json};
use vedette_proto::v1::StoredDetection;
use vedette_share::sharing::{self, Sharing};

use super::ExportError;

fn file_error(path: &Path, source: std::io::Error) -> ExportError {
    ExportError::File {
        path: path.to_owned(),
        source,
    }
}

/// The `event.sequence` of the file's last complete line (0 for none); a partial last line (a
/// write cut short) is cut off, to be written again whole.
pub(super) fn last_sequence(path: &Path) -> Result<u64, ExportError> {
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
    let last = text.lines().rev().find(|l| !l.trim().is_empty());
    Ok(last
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
        .and_then(|v| v["event"]["sequence"].as_u64())
        .unwrap_or(0))
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
