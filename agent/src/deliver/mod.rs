//! Getting detections to the collector without losing one.
//!
//! ```text
//! detect ──bounded channel──► writer (thread: append + fdatasync) ──► spool (disk)
//!                                                                      │ read
//! collector ◄── DetectionBatch(seq) ── shipper (task) ◄───────────────┘
//!           ──► Ack(seq) ─────────────► spool.ack(last id of the batch): segments deleted
//! ```
//! A detection is durable before it is sent and deleted only after the collector acknowledged
//! it, after its store committed; the collector stores each detection id once.

pub(crate) mod evict;
pub(crate) mod inventory;
pub(crate) mod shipper;
pub mod spool;
pub(crate) mod writer;
