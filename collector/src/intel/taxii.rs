//! Polling a TAXII 2.1 collection: every object added after the cursor, page by page.

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;
use vedette_engine::import;

use super::poll::{PollError, stage_imported};
use crate::config::{HttpAuth, IntelSourceConfig};
use crate::http::{TAXII, get, json};
use crate::store::{Store, now_ms};

/// Most pages one TAXII poll follows.
const MAX_PAGES: usize = 10_000;
/// Objects asked for per TAXII page (`limit`; a server may send fewer). Sent on every request,
/// the `next` ones included: some servers (medallion 3) fail a `next` request without it.
const TAXII_PAGE: usize = 1_000;

/// One poll of the collection at `api_root`; how many indicators were accepted.
pub(super) fn poll(
    store: &dyn Store,
    source: &IntelSourceConfig,
    api_root: &str,
    auth: &HttpAuth,
    cursor: String,
) -> Result<u64, PollError> {
    let origin = source.origin();
    let agent = crate::http::agent(source.ca_cert.as_deref())?;
    // The API root must speak TAXII 2.1.
    let (info, _) = get(&agent, api_root, TAXII, auth)?;
    let info = json(&info, api_root)?;
    let speaks = info["versions"].as_array().is_some_and(|v| {
        v.iter()
            .any(|v| v.as_str().is_some_and(|s| s.contains("version=2.1")))
    });
    if !speaks {
        return Err(PollError::NotTaxii(api_root.to_string()));
    }
    let mut accepted = 0;
    let mut next: Option<String> = None;
    let mut cursor = cursor;
    for page in 0..MAX_PAGES {
        let mut url = format!("{origin}objects/?limit={TAXII_PAGE}&");
        if !cursor.is_empty() {
            url.push_str(&format!("added_after={}&", encode(&cursor)));
        }
        if let Some(n) = &next {
            url.push_str(&format!("next={}&", encode(n)));
        }
        let (body, last) = get(&agent, url.trim_end_matches(['&', '?']), TAXII, auth)?;
        let envelope = if body.is_empty() {
            Value::Null
        } else {
            json(&body, &url)?
        };
        let objects = envelope["objects"].as_array().cloned().unwrap_or_default();
        let imported = import::stix_objects(&objects, &origin, now_ms());
        accepted += stage_imported(
            store,
            source,
            &imported,
            page > 0,
            last.as_deref().unwrap_or(""),
        )?;
        let more = envelope["more"].as_bool().unwrap_or(false);
        next = envelope["next"].as_str().map(str::to_string);
        if !more {
            break;
        }
        if next.is_none() {
            // Without `next`, the following page starts after the last one seen.
            match last {
                Some(l) => cursor = l,
                None => return Err(PollError::NoNextPage(url)),
            }
        }
    }
    Ok(accepted)
}

/// Percent-encodes a query value (RFC 3986: all but unreserved characters).
fn encode(s: &str) -> String {
    const QUERY: &percent_encoding::AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    utf8_percent_encode(s, QUERY).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            encode("2026-11-26T10:00:00.000Z"),
            "2026-11-26T10%3A00%3A00.000Z"
        );
        assert_eq!(encode("a b/c+d~e"), "a%20b%2Fc%2Bd~e");
    }
}
