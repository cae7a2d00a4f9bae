//! What leaves the collector: detections as the threat-intelligence world reads them (STIX 2.1
//! sightings, a MISP event, ECS JSON lines for SIEMs), and the sharing policy that decides what
//! of each organisation may leave. The same functions serve `vedettectl export` and the
//! collector's export sinks, so a detection reads the same wherever it is sent.
//!
//! STIX identifiers are UUIDv5, derived from what they name (the detection id, the indicator,
//! the organisation): exporting the same detection twice gives the same objects, which a TAXII
//! server or a MISP instance then holds once.

pub mod ecs;
pub mod misp;
pub mod sharing;
pub mod stix;

use serde_json::Value;
use vedette_ops::output::rfc3339_ms;

/// The namespace of Vedette's STIX identifiers.
pub(crate) const NAMESPACE: uuid::Uuid = uuid::uuid!("3a1e0b52-6c1d-5b7e-9f00-766564657474");
/// The STIX 2.1 namespace for identifiers of cyber-observable objects (spec section 2.9).
pub(crate) const SCO_NAMESPACE: uuid::Uuid = uuid::uuid!("00abedb4-aa42-466c-9c01-fed23315a9b7");

/// The id of an SDO, SRO or process: a UUID of version 4 form (as STIX requires of them) whose
/// bits come from a name-based hash instead of a random source, so it is stable.
pub(crate) fn stix_id(kind: &str, name: &str) -> String {
    let v5 = uuid::Uuid::new_v5(&NAMESPACE, format!("{kind}|{name}").as_bytes());
    format!(
        "{kind}--{}",
        uuid::Builder::from_random_bytes(*v5.as_bytes()).into_uuid()
    )
}

/// An SCO id from its contributing properties, as the spec derives them.
pub(crate) fn sco_id(kind: &str, contributing: &Value) -> String {
    format!(
        "{kind}--{}",
        uuid::Uuid::new_v5(&SCO_NAMESPACE, contributing.to_string().as_bytes())
    )
}

/// A STIX timestamp (RFC 3339, UTC, milliseconds); the epoch for an unknown time.
pub(crate) fn ts(ms: i64) -> String {
    if ms <= 0 {
        "1970-01-01T00:00:00.000Z".into()
    } else {
        rfc3339_ms(ms)
    }
}
