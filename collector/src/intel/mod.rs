//! Intel in: threat intelligence at the collector. Indicators are checked and staged here
//! (`stage.rs`), whoever brings them: `vedettectl intel import`, or the collector's own polls
//! (`poll.rs`) of TAXII 2.1 collections (`taxii.rs`) and MISP feeds (`misp.rs`). Staged
//! indicators reach agents only inside a bundle a maintainer signs.

mod misp;
pub mod poll;
pub mod stage;
mod taxii;

pub use stage::{IntelBatch, StagingReport, stage};
