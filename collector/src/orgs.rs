//! Participating organisations: their names, and the sharing policy that decides what exports
//! carry about each (see README.md, "Sharing and privacy").
//!
//! An agent belongs to the organisation its enrollment token named; the organisation is written
//! into its certificate ([`crate::pki`]) and read back from there only ([`crate::identity`]).

use vedette_share::sharing::Sharing;

use crate::store::OrgRow;

/// The organisation every collector has from the start: agents enrolled without `--org`
/// belong to it. Its policy is `full`, so a single-organisation collector exports as before.
pub use vedette_share::sharing::DEFAULT_ORG;

/// Longest organisation name.
const MAX_NAME: usize = 64;

/// The STIX 2.1 industry sector vocabulary (`industry-sector-ov`).
pub const SECTORS: &[&str] = &[
    "agriculture",
    "aerospace",
    "automotive",
    "chemical",
    "commercial",
    "communications",
    "construction",
    "defense",
    "education",
    "energy",
    "entertainment",
    "financial-services",
    "government",
    "government-emergency-services",
    "government-local",
    "government-national",
    "government-public-services",
    "government-regional",
    "healthcare",
    "hospitality-leisure",
    "infrastructure",
    "infrastructure-dams",
    "infrastructure-nuclear",
    "infrastructure-water",
    "insurance",
    "manufacturing",
    "mining",
    "non-profit",
    "pharmaceuticals",
    "retail",
    "technology",
    "telecommunications",
    "transportation",
    "utilities",
];

/// Checks an organisation name: 1 to 64 ASCII letters, digits, `.`, `_` or `-`, starting with
/// a letter or digit (it is written into certificates as a URI).
pub fn check_name(name: &str) -> Result<(), OrgFieldError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(OrgFieldError::Name(clip(name)))
    }
}

/// Checks a sector: empty, or a value of the STIX industry sector vocabulary.
pub fn check_sector(sector: &str) -> Result<(), OrgFieldError> {
    if sector.is_empty() || SECTORS.contains(&sector) {
        Ok(())
    } else {
        Err(OrgFieldError::Sector(clip(sector)))
    }
}

/// A country as stored: empty, or an ISO 3166-1 alpha-2 code in upper case.
pub fn normalise_country(country: &str) -> Result<String, OrgFieldError> {
    let c = country.trim().to_ascii_uppercase();
    if c.is_empty() || (c.len() == 2 && c.chars().all(|ch| ch.is_ascii_uppercase())) {
        Ok(c)
    } else {
        Err(OrgFieldError::Country(clip(country)))
    }
}

/// What is wrong with an organisation's name, sector or country (the value, clipped to 80
/// characters).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OrgFieldError {
    #[error(
        "`{0}` is not an organisation name: use 1 to {MAX_NAME} letters, digits, `.`, `_` or `-`, starting with a letter or digit"
    )]
    Name(String),
    #[error("`{0}` is not a STIX industry sector; use one of: {sectors}", sectors = SECTORS.join(", "))]
    Sector(String),
    #[error("`{0}` is not an ISO 3166-1 alpha-2 country code (two letters, such as DE or FR)")]
    Country(String),
}

fn clip(value: &str) -> String {
    value.chars().take(80).collect()
}

/// A new STIX identity id for an organisation (random, kept in the store).
pub fn new_stix_id() -> String {
    format!("identity--{}", uuid::Uuid::new_v4())
}

/// The policy exports apply to an organisation's detections ([`Sharing::of_org`]).
pub fn sharing(row: &OrgRow, producer: &str) -> Sharing {
    let org = vedette_proto::v1::Org {
        name: row.name.clone(),
        stix_id: row.stix_id.clone(),
        sector: row.sector.clone(),
        country: row.country.clone(),
        share: row.share.clone(),
        tlp: row.tlp.clone(),
        ..Default::default()
    };
    Sharing::of_org(&org, producer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vedette_share::sharing::{Share, Tlp};

    #[test]
    fn names_sectors_and_countries_are_checked() {
        assert!(check_name("cert-eu.test_1").is_ok());
        for bad in ["", "-x", "a b", "ä", "a/b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_sector("energy").is_ok());
        assert!(check_sector("").is_ok());
        let e = check_sector("Energy").unwrap_err();
        assert_eq!(e, OrgFieldError::Sector("Energy".into()));
        assert!(e.to_string().contains("financial-services"), "{e}");
        assert_eq!(normalise_country("de").unwrap(), "DE");
        assert!(normalise_country("DEU").is_err());
        assert!(normalise_country("1X").is_err());
    }

    #[test]
    fn an_unreadable_policy_shares_nothing() {
        let row = OrgRow {
            name: "alpha".into(),
            share: "bogus".into(),
            tlp: "bogus".into(),
            ..OrgRow::default()
        };
        let s = sharing(&row, "CSIRT");
        assert_eq!(s.share, Share::None);
        assert_eq!(s.tlp, Tlp::Red);
    }
}
