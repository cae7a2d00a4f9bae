//! Staging: every intel line is checked again (it may come from another machine) and what
//! passes is staged in the store, with the source's counts and cursor, in one transaction.

use vedette_engine::import;
use vedette_engine::intel::IntelLine;

pub use crate::store::IntelBatch;
use crate::store::{StagedLine, StagingCounts, Store, StoreError};

/// What staging one batch did.
#[derive(Debug, Default)]
pub struct StagingReport {
    pub counts: StagingCounts,
    /// Lines refused here, as `id: reason`.
    pub refused: Vec<String>,
}

/// Checks every line again (it may come from another machine) and stages those that pass.
pub fn stage(
    store: &dyn Store,
    batch: IntelBatch<'_, String>,
    now_ms: i64,
) -> Result<StagingReport, StoreError> {
    let mut refused = Vec::new();
    let mut staged = Vec::with_capacity(batch.lines.len());
    for text in batch.lines {
        let checked = IntelLine::parse(text).and_then(|l| match import::check(&l) {
            Ok(()) => Ok(l),
            Err(e) => Err(format!("{}: {e}", l.id).into()),
        });
        match checked {
            Ok(l) => staged.push(StagedLine {
                source: l.source.clone(),
                id: l.id.clone(),
                // The source that staged it (what `intel status` counts per source).
                origin: batch.origin.to_string(),
                // Re-serialised: what is staged is exactly what was checked.
                line: l.to_json(),
            }),
            Err(e) => refused.push(e.to_string()),
        }
    }
    let counts = store.stage_intel(
        &IntelBatch {
            rejected: batch.rejected + refused.len() as u64,
            ..batch.with_lines(&staged)
        },
        now_ms,
    )?;
    Ok(StagingReport { counts, refused })
}
