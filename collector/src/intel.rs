//! Threat intelligence at the collector: indicators are checked and staged here, whoever brings
//! them (`vedettectl intel import`, or the collector's own polls of MISP feeds and TAXII
//! collections). Staged indicators reach agents only inside a bundle a maintainer signs.

use vedette_engine::import;
use vedette_engine::intel::IntelLine;

use crate::store::{IntelBatch, IntelStaged, StagedIntel, Store, StoreError};

/// What staging one batch did.
#[derive(Debug, Default)]
pub struct Staged {
    pub counts: IntelStaged,
    /// Lines refused here, as `id: reason`.
    pub refused: Vec<String>,
}

/// One import or poll of a source, as it arrives.
pub struct Incoming<'a> {
    pub origin: &'a str,
    pub kind: &'a str,
    pub lines: &'a [String],
    pub revoked: &'a [String],
    pub skipped: u64,
    pub rejected: u64,
    pub continued: bool,
    pub cursor: &'a str,
}

/// Checks every line again (it may come from another machine) and stages those that pass.
pub fn stage(store: &dyn Store, batch: Incoming<'_>, now_ms: i64) -> Result<Staged, StoreError> {
    let mut refused = Vec::new();
    let mut staged = Vec::with_capacity(batch.lines.len());
    for text in batch.lines {
        let checked = IntelLine::parse(text).and_then(|l| match import::check(&l) {
            Ok(()) => Ok(l),
            Err(e) => Err(format!("{}: {e}", l.id)),
        });
        match checked {
            Ok(l) => staged.push(StagedIntel {
                source: l.source.clone(),
                id: l.id.clone(),
                // The source that staged it (what `intel status` counts per source).
                origin: batch.origin.to_string(),
                // Re-serialised: what is staged is exactly what was checked.
                line: l.to_json(),
            }),
            Err(e) => refused.push(e),
        }
    }
    let counts = store.stage_intel(&IntelBatch {
        origin: batch.origin,
        kind: batch.kind,
        lines: &staged,
        revoked: batch.revoked,
        skipped: batch.skipped,
        rejected: batch.rejected + refused.len() as u64,
        continued: batch.continued,
        cursor: batch.cursor,
        now_ms,
    })?;
    Ok(Staged { counts, refused })
}
