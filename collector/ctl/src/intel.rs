//! `vedettectl intel`: stage shared threat intelligence at the collector, see what is staged,
//! and publish it to agents in a signed bundle.

use std::path::PathBuf;

use anyhow::{Context, bail};
use vedette_engine::bundle::BundleContent;
use vedette_engine::import::{self, Imported};
use vedette_ops::output::{printable, rfc3339_ms};
use vedette_proto::now_ms;
use vedette_proto::v1::{
    BundleFile, IntelStatusRequest, IntelStatusResponse, ListIntelRequest, PublishBundleResponse,
    StageIntelRequest,
};

use crate::client::{CtlConfig, status_error};
use crate::rules::{self, PublishOptions};

/// The bundle file that carries staged indicators; `intel publish` replaces it.
pub const INTEL_FILE: &str = "intel/indicators.jsonl";

/// Requests stay well under the collector's message cap.
const CHUNK_BYTES: usize = 4 << 20;

/// What one `intel import` of one path did.
pub struct ImportReport {
    pub path: PathBuf,
    pub imported: Imported,
    pub added: u64,
    pub updated: u64,
    pub removed: u64,
    pub refused: Vec<String>,
}

/// Parses each path (a STIX bundle, a MISP event, or a MISP feed directory) and stages what it
/// holds at the collector, in requests of at most a few MiB.
pub async fn import(cfg: &CtlConfig, paths: &[PathBuf]) -> anyhow::Result<Vec<ImportReport>> {
    let mut reports = Vec::new();
    let mut client = cfg.client().await?;
    for path in paths {
        let imported = import::path(path, now_ms()).map_err(anyhow::Error::msg)?;
        let origin = std::fs::canonicalize(path)
            .unwrap_or_else(|_| path.clone())
            .display()
            .to_string();
        let lines: Vec<String> = imported
            .accepted
            .iter()
            .map(vedette_engine::intel::IntelLine::to_json)
            .collect();
        let mut report = ImportReport {
            path: path.clone(),
            imported,
            added: 0,
            updated: 0,
            removed: 0,
            refused: Vec::new(),
        };
        let mut chunks: Vec<Vec<String>> = vec![Vec::new()];
        let mut size = 0;
        for l in lines {
            if size + l.len() > CHUNK_BYTES && !chunks.last().is_some_and(Vec::is_empty) {
                chunks.push(Vec::new());
                size = 0;
            }
            size += l.len();
            if let Some(c) = chunks.last_mut() {
                c.push(l);
            }
        }
        for (i, chunk) in chunks.into_iter().enumerate() {
            let first = i == 0;
            let r = client
                .stage_intel(StageIntelRequest {
                    origin: origin.clone(),
                    kind: "import".into(),
                    lines: chunk,
                    revoked: if first {
                        report.imported.revoked.clone()
                    } else {
                        Vec::new()
                    },
                    skipped: if first {
                        report.imported.skipped.len() as u64
                    } else {
                        0
                    },
                    rejected: if first {
                        report.imported.rejected.len() as u64
                    } else {
                        0
                    },
                    continued: !first,
                })
                .await
                .map_err(status_error)
                .with_context(|| format!("staging {}", path.display()))?
                .into_inner();
            report.added += r.added;
            report.updated += r.updated;
            report.removed += r.removed;
            report.refused.extend(r.refused);
        }
        reports.push(report);
    }
    Ok(reports)
}

pub fn print_import(r: &ImportReport) {
    let i = &r.imported;
    println!(
        "{}: accepted {}, skipped {}, rejected {}, revoked {} (staged: {} new, {} changed, {} \
         removed)",
        printable(&r.path.display().to_string()),
        i.accepted.len() - r.refused.len(),
        i.skipped.len(),
        i.rejected.len() + r.refused.len(),
        i.revoked.len(),
        r.added,
        r.updated,
        r.removed
    );
    for (id, why) in &i.skipped {
        println!("  skipped  {}: {}", printable(id), printable(why));
    }
    for (id, why) in &i.rejected {
        println!("  rejected {}: {}", printable(id), printable(why));
    }
    for line in &r.refused {
        println!("  rejected {}", printable(line));
    }
    for id in &i.revoked {
        println!("  revoked  {}", printable(id));
    }
}

pub async fn status(cfg: &CtlConfig) -> anyhow::Result<IntelStatusResponse> {
    let mut c = cfg.client().await?;
    Ok(c.intel_status(IntelStatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner())
}

pub fn print_status(r: &IntelStatusResponse) {
    println!("{} indicator(s) staged", r.staged);
    for s in &r.sources {
        println!(
            "{} [{}]: last {}; accepted {}, skipped {}, rejected {}, revoked {}; staged {}{}",
            printable(&s.origin),
            s.kind,
            if s.last_poll_ms > 0 {
                rfc3339_ms(s.last_poll_ms)
            } else {
                "never".into()
            },
            s.accepted,
            s.skipped,
            s.rejected,
            s.revoked,
            s.staged,
            if s.last_error.is_empty() {
                String::new()
            } else {
                format!("; last error: {}", printable(&s.last_error))
            }
        );
    }
    for s in &r.sinks {
        println!(
            "export {}: exported {}, backlog {}{}",
            printable(&s.sink),
            s.exported,
            s.backlog,
            if s.last_error.is_empty() {
                String::new()
            } else {
                format!("; last error: {}", printable(&s.last_error))
            }
        );
    }
}

/// Every staged indicator line, page by page.
async fn staged_lines(cfg: &CtlConfig) -> anyhow::Result<Vec<String>> {
    let mut c = cfg.client().await?;
    let mut out = Vec::new();
    let (mut after_source, mut after_id) = (String::new(), String::new());
    loop {
        let page = c
            .list_intel(ListIntelRequest {
                after_source,
                after_id,
                limit: 0,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        out.extend(page.lines);
        if page.next_id.is_empty() {
            return Ok(out);
        }
        (after_source, after_id) = (page.next_source, page.next_id);
    }
}

/// The staged lines still valid at `now_ms`: an indicator past its `valid_until` is not
/// published again (agents would ignore it anyway).
fn current(lines: Vec<String>, now_ms: i64) -> Vec<String> {
    lines
        .into_iter()
        .filter(|l| {
            vedette_engine::intel::IntelLine::parse(l)
                .map(|l| l.valid_until_ms.is_none_or(|t| t > now_ms))
                .unwrap_or(true)
        })
        .collect()
}

/// `intel publish`: the latest bundle's files with the staged indicators in place of its
/// intel file, checked, signed and published as the next version.
pub async fn publish(
    cfg: &CtlConfig,
    opts: &PublishOptions,
) -> anyhow::Result<(PublishBundleResponse, usize)> {
    let lines = current(staged_lines(cfg).await?, now_ms());
    if lines.is_empty() {
        bail!("nothing is staged: import indicators first (`vedettectl intel import FILE`)");
    }
    let mut files: Vec<BundleFile> = match rules::latest_content(cfg).await? {
        Some(c) => c.files,
        None => Vec::new(),
    };
    files.retain(|f| f.path != INTEL_FILE);
    let mut data = lines.join("\n").into_bytes();
    data.push(b'\n');
    files.push(BundleFile {
        path: INTEL_FILE.into(),
        data,
    });
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let content = BundleContent {
        files,
        ..Default::default()
    };
    // The same checks as `rules publish`: the rules carried forward as they were accepted.
    for w in rules::check(&content, false)? {
        eprintln!("warning: {w} (line skipped by agents)");
    }
    Ok((rules::send(cfg, content, opts, None).await?, lines.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn expired_indicators_are_not_published_again() {
        let line = |id: &str, until: Option<i64>| {
            let mut v = json!({"source": "stix", "id": id, "pattern_type": "stix",
                "pattern": "[file:name = 'x']"});
            if let Some(t) = until {
                v["valid_until_ms"] = json!(t);
            }
            v.to_string()
        };
        let kept = current(
            vec![
                line("a", None),
                line("b", Some(999)),
                line("c", Some(2_000)),
            ],
            1_000,
        );
        assert_eq!(kept, vec![line("a", None), line("c", Some(2_000))]);
    }
}
