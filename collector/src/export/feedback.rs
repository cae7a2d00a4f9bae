//! False-positive feedback to an indicator's producer. A `false-positive` verdict on an alert
//! whose indicator came from STIX or MISP goes back the way such indicators are shared: an
//! `opinion` (`strongly-disagree`, naming the indicator) to a TAXII sink's collection, a MISP
//! sighting of type `1` (false positive) of the attribute to a MISP sink. Each sink keeps a
//! cursor of its own over the verdicts (`feedback:` and its name), and each organisation's
//! sharing policy applies (`none` sends nothing).

use vedette_share::sharing::{self, FalsePositive, Sharing};

use super::{ExportError, misp, moved, policies, taxii};
use crate::config::SinkConfig;
use crate::store::{DetectionFilter, Store, VerdictRow};

/// Verdicts read per TAXII delivery (opinions go in one request; their ids make a resend
/// harmless). A MISP sink takes one at a time, its cursor moved after each.
const TAXII_BATCH: u32 = 100;

/// Sends the feedback of the next verdicts through `sink`; how many false positives it sent.
pub(super) fn deliver(
    store: &dyn Store,
    sink: &SinkConfig,
    producer: &str,
) -> Result<u64, ExportError> {
    let limit = match sink {
        SinkConfig::Taxii { .. } => TAXII_BATCH,
        SinkConfig::Misp { .. } => 1,
        SinkConfig::Jsonl { .. } | SinkConfig::Webhook { .. } | SinkConfig::Syslog { .. } => {
            return Ok(0);
        }
    };
    let name = format!("feedback:{}", sink.name());
    let cursor = store.export_state(&name)?.seq;
    let verdicts = store.verdicts_after(cursor, limit)?;
    let Some(last) = verdicts.last().map(|v| v.seq) else {
        return Ok(0);
    };
    let found = false_positives(store, &verdicts)?;
    let policies = policies(store, producer)?;
    let policy = |org: &str| policies.get(org).cloned();
    let delivered = match sink {
        SinkConfig::Taxii {
            api_root,
            collection,
            auth,
            ca_cert,
            ..
        } => {
            let objects = sharing::opinion_objects(&found, &policy, producer);
            match objects.is_empty() {
                true => Ok(()),
                false => taxii::deliver(api_root, collection, auth, ca_cert.as_deref(), objects),
            }
        }
        SinkConfig::Misp {
            url, key, ca_cert, ..
        } => misp_false_positives(url, key.expose(), ca_cert.as_deref(), &found, &policy),
        SinkConfig::Jsonl { .. } | SinkConfig::Webhook { .. } | SinkConfig::Syslog { .. } => Ok(()),
    };
    moved(store, &name, (cursor, last), found.len() as u64, delivered)
}

/// The false-positive verdicts among `verdicts` on alerts of an outside indicator (STIX or
/// MISP), each with that indicator, read from the alert's newest detection.
fn false_positives(
    store: &dyn Store,
    verdicts: &[VerdictRow],
) -> Result<Vec<FalsePositive>, ExportError> {
    let mut out = Vec::new();
    for v in verdicts.iter().filter(|v| v.status == "false-positive") {
        let Some(alert) = store.alert(v.alert_id)? else {
            continue;
        };
        let newest = store.list_detections(&DetectionFilter {
            alert_id: Some(alert.id),
            limit: 1,
            max_bytes: 1 << 20,
            ..Default::default()
        })?;
        let indicator = newest
            .detections
            .last()
            .and_then(|s| s.detection.as_ref())
            .and_then(|d| d.indicator.clone());
        let Some(ind) = indicator else {
            continue;
        };
        if matches!(ind.source.as_str(), "stix" | "misp") && !ind.id.is_empty() {
            out.push(FalsePositive {
                source: ind.source,
                indicator: ind.id,
                org: alert.org,
                verdict: v.seq,
                at_ms: v.at_ms,
            });
        }
    }
    Ok(out)
}

/// A MISP sighting of type `1` (false positive) for each MISP attribute judged so, as PyMISP's
/// `add_sighting` sends it.
fn misp_false_positives(
    url: &str,
    key: &str,
    ca_cert: Option<&std::path::Path>,
    found: &[FalsePositive],
    policy: &dyn Fn(&str) -> Option<Sharing>,
) -> Result<(), ExportError> {
    let agent = crate::http::agent(ca_cert)?;
    let target = format!("{url}sightings/add");
    for fp in found.iter().filter(|f| f.source == "misp") {
        let Some(shared) = policy(&fp.org).filter(|p| p.share != sharing::Share::None) else {
            continue;
        };
        let body = misp::sighting_body(&fp.indicator, fp.at_ms, &shared.sighting_source(), "1");
        misp::post(&agent, &target, key, &body)?;
    }
    Ok(())
}
