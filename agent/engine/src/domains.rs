//! Domain names as indicators compare them, and an index that answers "which listed domains
//! cover this name" with one hash lookup per label of the name, however many are listed.
//!
//! Names are compared case-folded, without a trailing dot, and with every non-ASCII label in
//! its punycode form (`bücher.example` is `xn--bcher-kva.example`), which is how a name travels
//! in DNS. A listed domain reaches its subdomains unless it was listed as exact:
//!
//! | source | reach |
//! |---|---|
//! | Loki C2 list (`c2` in the file name) | the domain and its subdomains |
//! | MISP `domain`, `hostname` | the domain and its subdomains |
//! | STIX `[domain-name:value = 'x']` | exactly `x` |

use std::collections::HashMap;

/// Whether a listed domain covers its subdomains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    Exact,
    AndSubdomains,
}

/// Longest name DNS carries.
const MAX_NAME: usize = 253;

/// The one form of a domain name: trimmed, lowercase, no trailing dot, non-ASCII labels in
/// punycode (`xn--…`). None for what is no domain name (an empty label, a name too long).
pub fn normalise(name: &str) -> Option<String> {
    let name = name.trim().trim_end_matches('.');
    if name.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(name.len());
    for (i, label) in name.split('.').enumerate() {
        if label.is_empty() || label.len() > 63 * 4 {
            return None;
        }
        if i > 0 {
            out.push('.');
        }
        if label.is_ascii() {
            let at = out.len();
            out.push_str(label);
            out[at..].make_ascii_lowercase();
        } else {
            out.push_str("xn--");
            out.push_str(&punycode(&label.to_lowercase())?);
        }
    }
    (out.len() <= MAX_NAME).then_some(out)
}

/// Listed domains, each with what it stands for.
#[derive(Debug, Clone)]
pub struct DomainIndex<T> {
    names: HashMap<Box<str>, Listed<T>>,
}

/// What one name is listed as: mostly once (kept inline: a million names stay small).
#[derive(Debug, Clone)]
enum Listed<T> {
    Once(Reach, T),
    More(Vec<(Reach, T)>),
}

impl<T> Listed<T> {
    fn push(&mut self, reach: Reach, value: T) {
        let previous = std::mem::replace(self, Listed::More(Vec::new()));
        let mut all = match previous {
            Listed::Once(r, v) => vec![(r, v)],
            Listed::More(all) => all,
        };
        all.push((reach, value));
        *self = Listed::More(all);
    }

    fn iter(&self) -> impl Iterator<Item = (Reach, &T)> {
        let (once, more) = match self {
            Listed::Once(r, v) => (Some((*r, v)), &[][..]),
            Listed::More(all) => (None, all.as_slice()),
        };
        once.into_iter().chain(more.iter().map(|(r, v)| (*r, v)))
    }
}

impl<T> Default for DomainIndex<T> {
    fn default() -> Self {
        DomainIndex {
            names: HashMap::new(),
        }
    }
}

impl<T> DomainIndex<T> {
    /// Lists `name`; false (and nothing listed) when it is no domain name.
    pub fn insert(&mut self, name: &str, reach: Reach, value: T) -> bool {
        match normalise(name) {
            Some(n) => {
                match self.names.get_mut(n.as_str()) {
                    Some(listed) => listed.push(reach, value),
                    None => {
                        self.names
                            .insert(n.into_boxed_str(), Listed::Once(reach, value));
                    }
                }
                true
            }
            None => false,
        }
    }

    /// What covers `name`: the entries listed for it, and those listed with their subdomains
    /// for each domain above it. One lookup per label.
    pub fn lookup(&self, name: &str) -> Vec<&T> {
        match normalise(name) {
            Some(name) => self.lookup_normal(&name),
            None => Vec::new(),
        }
    }

    /// [`lookup`](Self::lookup) of a name already in the one form [`normalise`] gives.
    pub fn lookup_normal(&self, name: &str) -> Vec<&T> {
        let mut out = Vec::new();
        if self.names.is_empty() {
            return out;
        }
        let mut at = 0;
        loop {
            if let Some(listed) = self.names.get(&name[at..]) {
                out.extend(
                    listed
                        .iter()
                        .filter(|(reach, _)| at == 0 || *reach == Reach::AndSubdomains)
                        .map(|(_, v)| v),
                );
            }
            match name[at..].find('.') {
                Some(dot) => at += dot + 1,
                None => return out,
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// How many names are listed.
    pub fn len(&self) -> usize {
        self.names.len()
    }
}

/// RFC 3492 punycode of one label (without the `xn--` prefix).
fn punycode(label: &str) -> Option<String> {
    const BASE: u32 = 36;
    const T_MIN: u32 = 1;
    const T_MAX: u32 = 26;
    let code: Vec<u32> = label.chars().map(u32::from).collect();
    let mut out: String = label.chars().filter(char::is_ascii).collect();
    let basic = out.len() as u32;
    let mut handled = basic;
    if basic > 0 {
        out.push('-');
    }
    let (mut n, mut delta, mut bias) = (128u32, 0u32, 72u32);
    while (handled as usize) < code.len() {
        let m = code.iter().copied().filter(|&c| c >= n).min()?;
        delta = delta.checked_add((m - n).checked_mul(handled + 1)?)?;
        n = m;
        for &c in &code {
            if c < n {
                delta = delta.checked_add(1)?;
            }
            if c == n {
                let mut q = delta;
                let mut k = BASE;
                loop {
                    let t = k.saturating_sub(bias).clamp(T_MIN, T_MAX);
                    if q < t {
                        break;
                    }
                    out.push(digit(t + (q - t) % (BASE - t)));
                    q = (q - t) / (BASE - t);
                    k += BASE;
                }
                out.push(digit(q));
                bias = adapt(delta, handled + 1, handled == basic);
                delta = 0;
                handled += 1;
            }
        }
        delta = delta.checked_add(1)?;
        n += 1;
    }
    Some(out)
}

fn adapt(delta: u32, points: u32, first: bool) -> u32 {
    const BASE: u32 = 36;
    let mut delta = if first { delta / 700 } else { delta / 2 };
    delta += delta / points;
    let mut k = 0;
    while delta > ((BASE - 1) * 26) / 2 {
        delta /= BASE - 1;
        k += BASE;
    }
    k + (BASE * delta) / (delta + 38)
}

fn digit(d: u32) -> char {
    match d {
        0..=25 => char::from(b'a' + d as u8),
        _ => char::from(b'0' + (d - 26) as u8),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_case_folded_without_the_trailing_dot_and_idns_in_punycode() {
        assert_eq!(normalise("Evil.Example.").as_deref(), Some("evil.example"));
        // RFC 3492 and well-known registrations.
        assert_eq!(
            normalise("bücher.example").as_deref(),
            Some("xn--bcher-kva.example")
        );
        assert_eq!(
            normalise("MÜNCHEN.de").as_deref(),
            Some("xn--mnchen-3ya.de")
        );
        assert_eq!(
            normalise("例え.テスト").as_deref(),
            Some("xn--r8jz45g.xn--zckzah")
        );
        for bad in ["", ".", "a..b", &"a".repeat(254)] {
            assert_eq!(normalise(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_listed_domain_reaches_its_subdomains_unless_exact() {
        let mut idx = DomainIndex::default();
        assert!(idx.insert("evil.example", Reach::AndSubdomains, "loki"));
        assert!(idx.insert("c2.bad.example", Reach::Exact, "stix"));
        assert!(idx.insert("bücher.example", Reach::AndSubdomains, "idn"));
        assert_eq!(idx.lookup("EVIL.example."), [&"loki"]);
        assert_eq!(idx.lookup("a.b.evil.example"), [&"loki"]);
        assert!(idx.lookup("notevil.example").is_empty());
        assert!(idx.lookup("evil.example.org").is_empty());
        assert_eq!(idx.lookup("c2.bad.example"), [&"stix"]);
        assert!(idx.lookup("x.c2.bad.example").is_empty());
        assert_eq!(idx.lookup("www.xn--bcher-kva.example"), [&"idn"]);
        // One name listed twice, once exact: both for the name, one for its subdomains.
        assert!(idx.insert("Evil.Example", Reach::Exact, "misp"));
        assert_eq!(idx.lookup("evil.example"), [&"loki", &"misp"]);
        assert_eq!(idx.lookup("x.evil.example"), [&"loki"]);
        assert_eq!(idx.len(), 3);
    }
}
