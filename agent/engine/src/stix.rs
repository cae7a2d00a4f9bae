//! STIX 2.1 patterns (`pattern_type: stix`): the part of the language a host can evaluate on its
//! own, compiled to alternatives of comparisons.
//!
//! Evaluated:
//! - `file:hashes.MD5`, `file:hashes.'SHA-1'`, `file:hashes.'SHA-256'` (spellings without the
//!   dash too), `file:name`;
//! - `ipv4-addr:value`, `ipv6-addr:value` (an address or a CIDR network),
//!   `network-traffic:dst_ref.value`, `domain-name:value`;
//! - `process:name`, `process:command_line`;
//! - with `=`, `IN (…)`, `LIKE`, `MATCHES` (texts) and `ISSUBSET` (addresses);
//! - comparisons joined by `AND` and `OR` inside an observation (`[…]`), and observations joined
//!   by `OR`.
//!
//! Everything else is refused with the reason: a negation (`NOT`, `!=`), other properties,
//! observations joined by `AND` or `FOLLOWEDBY` and qualifiers (`WITHIN`, `REPEATS`,
//! `START`/`STOP`), which need correlation over time that one host's view does not give. A
//! refused pattern is reported by whoever imports it, never dropped silently.

use std::net::IpAddr;

use crate::ParseError;

/// What a comparison looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    Md5,
    Sha1,
    Sha256,
    FileName,
    /// An IPv4 or IPv6 address of a connection's remote end.
    Address,
    Domain,
    ProcessName,
    CommandLine,
}

/// The kind of object a conjunction is about: all its comparisons must be on one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    File,
    Process,
    Network,
    Domain,
}

impl Field {
    pub fn subject(self) -> Subject {
        match self {
            Field::Md5 | Field::Sha1 | Field::Sha256 | Field::FileName => Subject::File,
            Field::Address => Subject::Network,
            Field::Domain => Subject::Domain,
            Field::ProcessName | Field::CommandLine => Subject::Process,
        }
    }
}

/// How a comparison matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Test {
    /// Equal to one of these (hashes: lowercase hex; domains: lowercase, no trailing dot).
    Equals(Vec<String>),
    /// Inside one of these networks (an address is a network of its full length).
    Network(Vec<(IpAddr, u8)>),
    /// A regular expression (`MATCHES`, or `LIKE` translated), matched anywhere.
    Regex(String),
}

/// One comparison: a field and its test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    pub field: Field,
    pub test: Test,
}

/// A compiled pattern: it matches when every comparison of any one alternative matches the same
/// object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    pub alternatives: Vec<Vec<Comparison>>,
}

/// At most this many alternatives after expanding `(a OR b) AND (c OR d)`.
const MAX_ALTERNATIVES: usize = 256;
/// Patterns longer than this are refused before parsing.
pub const MAX_PATTERN_BYTES: usize = 64 * 1024;
/// Nesting deeper than this is refused (no stack exhaustion on hostile input).
const MAX_DEPTH: usize = 64;

/// Parses and compiles a STIX 2.1 pattern, or says why Vedette cannot evaluate it.
pub fn parse(text: &str) -> Result<Pattern, ParseError> {
    if text.len() > MAX_PATTERN_BYTES {
        return Err(ParseError::too_long(
            "pattern",
            text.len(),
            MAX_PATTERN_BYTES,
        ));
    }
    let tokens = lex(text)?;
    let mut p = Parser {
        tokens,
        at: 0,
        depth: 0,
    };
    let alternatives = p.observations()?;
    if let Some(t) = p.peek() {
        return Err(match t {
            Tok::Word(w) if is_qualifier(w) => format!(
                "qualifier {} is not evaluated (it needs correlation over time)",
                w.to_uppercase()
            ),
            other => format!("unexpected {} after the pattern", other.describe()),
        }
        .into());
    }
    if alternatives.is_empty() {
        return Err("empty pattern".into());
    }
    Ok(Pattern { alternatives })
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    LBracket,
    RBracket,
    LParen,
    RParen,
    Comma,
    Op(&'static str),
    Word(String),
    Str(String),
    /// A typed literal such as `t'…'`, `h'…'` or `b'…'`.
    Typed(char, String),
    Number(String),
    Path(String),
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::LBracket => "`[`".into(),
            Tok::RBracket => "`]`".into(),
            Tok::LParen => "`(`".into(),
            Tok::RParen => "`)`".into(),
            Tok::Comma => "`,`".into(),
            Tok::Op(o) => format!("`{o}`"),
            Tok::Word(w) => format!("`{w}`"),
            Tok::Str(s) => format!("string '{}'", clip(s)),
            Tok::Typed(c, s) => format!("{c}'{}'", clip(s)),
            Tok::Number(n) => format!("number {n}"),
            Tok::Path(p) => format!("`{p}`"),
        }
    }
}

fn clip(s: &str) -> String {
    s.chars().take(60).collect()
}

fn is_qualifier(w: &str) -> bool {
    ["WITHIN", "REPEATS", "START", "STOP"]
        .iter()
        .any(|q| q.eq_ignore_ascii_case(w))
}

fn lex(text: &str) -> Result<Vec<Tok>, ParseError> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if let Some((tok, len)) = punctuation(c, chars.get(i + 1).copied()) {
            out.push(tok);
            i += len;
            continue;
        }
        match c {
            c if c.is_whitespace() => i += 1,
            '\'' => {
                let (s, next) = string_at(&chars, i)?;
                out.push(Tok::Str(s));
                i = next;
            }
            c if c.is_ascii_digit()
                || (c == '-' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())) =>
            {
                let start = i;
                i += 1;
                while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                    i += 1;
                }
                out.push(Tok::Number(chars[start..i].iter().collect()));
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                // A typed literal (t'…', h'…', b'…'), a keyword, or an object path.
                if matches!(c, 't' | 'h' | 'b') && chars.get(i + 1) == Some(&'\'') {
                    let (s, next) = string_at(&chars, i + 1)?;
                    out.push(Tok::Typed(c, s));
                    i = next;
                    continue;
                }
                let start = i;
                i = name_end(&chars, i);
                if chars.get(i) != Some(&':') {
                    out.push(Tok::Word(chars[start..i].iter().collect()));
                    continue;
                }
                let (path, next) = object_path(&chars, start, i)?;
                out.push(Tok::Path(path));
                i = next;
            }
            other => return Err(format!("unexpected character `{other}`").into()),
        }
    }
    Ok(out)
}

/// A bracket, comma or comparison operator starting with `c` (then `next`): its token and
/// length in characters.
fn punctuation(c: char, next: Option<char>) -> Option<(Tok, usize)> {
    let tok = match (c, next) {
        ('[', _) => Tok::LBracket,
        (']', _) => Tok::RBracket,
        ('(', _) => Tok::LParen,
        (')', _) => Tok::RParen,
        (',', _) => Tok::Comma,
        ('=', _) => Tok::Op("="),
        ('!', Some('=')) | ('<', Some('>')) => return Some((Tok::Op("!="), 2)),
        ('<', Some('=')) => return Some((Tok::Op("<="), 2)),
        ('>', Some('=')) => return Some((Tok::Op(">="), 2)),
        ('<', _) => Tok::Op("<"),
        ('>', _) => Tok::Op(">"),
        _ => return None,
    };
    Some((tok, 1))
}

/// Where a name (letters, digits, `_`, `-`) starting at `i` ends.
fn name_end(chars: &[char], mut i: usize) -> usize {
    while i < chars.len() && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | '-')) {
        i += 1;
    }
    i
}

/// An object path whose type runs from `start` to the `:` at `colon`:
/// `object-type ':' property ( '.' name | '.' 'quoted' | '[' index ']' )*`; the path and the
/// index after it.
fn object_path(chars: &[char], start: usize, colon: usize) -> Result<(String, usize), ParseError> {
    let mut path: String = chars[start..=colon].iter().collect();
    let mut i = colon + 1;
    let mut expect_name = true;
    loop {
        if expect_name {
            if chars.get(i) == Some(&'\'') {
                let (s, next) = string_at(chars, i)?;
                path.push('\'');
                path.push_str(&s);
                path.push('\'');
                i = next;
            } else {
                let s = i;
                i = name_end(chars, i);
                if s == i {
                    return Err(format!("object path `{path}` ends without a property").into());
                }
                path.extend(&chars[s..i]);
            }
            expect_name = false;
        } else if chars.get(i) == Some(&'.') {
            path.push('.');
            i += 1;
            expect_name = true;
        } else if chars.get(i) == Some(&'[') {
            let s = i;
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            if i == chars.len() {
                return Err(format!("unclosed `[` in object path `{path}`").into());
            }
            i += 1;
            path.extend(&chars[s..i]);
        } else {
            return Ok((path, i));
        }
    }
}

/// A quoted string starting at `chars[at] == '\''`: its text (`\'` and `\\` unescaped) and the
/// index after its closing quote.
fn string_at(chars: &[char], at: usize) -> Result<(String, usize), ParseError> {
    let mut s = String::new();
    let mut i = at + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' => {
                match chars.get(i + 1) {
                    Some(&c @ ('\'' | '\\')) => s.push(c),
                    Some(_) => {
                        return Err("a string escapes something other than `'` or `\\`".into());
                    }
                    None => break,
                }
                i += 2;
            }
            '\'' => return Ok((s, i + 1)),
            c => {
                s.push(c);
                i += 1
            }
        }
    }
    Err("unterminated string".into())
}

struct Parser {
    tokens: Vec<Tok>,
    at: usize,
    depth: usize,
}

/// Alternatives of conjunctions (disjunctive normal form).
type Dnf = Vec<Vec<Comparison>>;

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.tokens.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn keyword(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(w)) if w.eq_ignore_ascii_case(word))
    }

    fn deeper(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("nested deeper than {MAX_DEPTH} levels").into());
        }
        Ok(())
    }

    /// observations := observation ( OR observation )*
    fn observations(&mut self) -> Result<Dnf, ParseError> {
        self.deeper()?;
        let mut out = self.observation()?;
        loop {
            if self.keyword("OR") {
                self.at += 1;
                out.extend(self.observation()?);
                if out.len() > MAX_ALTERNATIVES {
                    return Err(format!("more than {MAX_ALTERNATIVES} alternatives").into());
                }
            } else if self.keyword("AND") {
                return Err(
                    "observations joined by AND are not evaluated (they need correlation \
                            of separate events)"
                        .into(),
                );
            } else if self.keyword("FOLLOWEDBY") {
                return Err("FOLLOWEDBY is not evaluated (it needs correlation over time)".into());
            } else {
                break;
            }
        }
        self.depth -= 1;
        Ok(out)
    }

    /// observation := '[' comparisons ']' | '(' observations ')'
    fn observation(&mut self) -> Result<Dnf, ParseError> {
        let dnf = match self.next() {
            Some(Tok::LBracket) => {
                let dnf = self.comparisons()?;
                match self.next() {
                    Some(Tok::RBracket) => dnf,
                    Some(t) => return Err(format!("expected `]`, found {}", t.describe()).into()),
                    None => return Err("missing `]`".into()),
                }
            }
            Some(Tok::LParen) => {
                let dnf = self.observations()?;
                match self.next() {
                    Some(Tok::RParen) => dnf,
                    Some(t) => return Err(format!("expected `)`, found {}", t.describe()).into()),
                    None => return Err("missing `)`".into()),
                }
            }
            Some(t) => return Err(format!("expected `[`, found {}", t.describe()).into()),
            None => return Err("expected `[`, found the end".into()),
        };
        if let Some(Tok::Word(w)) = self.peek()
            && is_qualifier(w)
        {
            return Err(format!(
                "qualifier {} is not evaluated (it needs correlation over time)",
                w.to_uppercase()
            )
            .into());
        }
        Ok(dnf)
    }

    /// comparisons := conjunction ( OR conjunction )*
    fn comparisons(&mut self) -> Result<Dnf, ParseError> {
        self.deeper()?;
        let mut out = self.conjunction()?;
        while self.keyword("OR") {
            self.at += 1;
            out.extend(self.conjunction()?);
            if out.len() > MAX_ALTERNATIVES {
                return Err(format!("more than {MAX_ALTERNATIVES} alternatives").into());
            }
        }
        self.depth -= 1;
        Ok(out)
    }

    /// conjunction := unit ( AND unit )*, expanded to alternatives.
    fn conjunction(&mut self) -> Result<Dnf, ParseError> {
        let mut out = self.unit()?;
        while self.keyword("AND") {
            self.at += 1;
            let right = self.unit()?;
            if out.len() * right.len() > MAX_ALTERNATIVES {
                return Err(format!("more than {MAX_ALTERNATIVES} alternatives").into());
            }
            let mut product = Vec::with_capacity(out.len() * right.len());
            for l in &out {
                for r in &right {
                    let mut both = l.clone();
                    both.extend(r.iter().cloned());
                    product.push(both);
                }
            }
            out = product;
        }
        for alt in &out {
            let first = alt[0].field.subject();
            if let Some(other) = alt.iter().find(|c| c.field.subject() != first) {
                return Err(format!(
                    "AND joins comparisons on different objects ({:?} and {:?}) in one \
                     observation",
                    first, other.field
                )
                .into());
            }
        }
        Ok(out)
    }

    /// unit := '(' comparisons ')' | path [NOT] op value
    fn unit(&mut self) -> Result<Dnf, ParseError> {
        match self.next() {
            Some(Tok::LParen) => {
                let dnf = self.comparisons()?;
                match self.next() {
                    Some(Tok::RParen) => Ok(dnf),
                    Some(t) => Err(format!("expected `)`, found {}", t.describe()).into()),
                    None => Err("missing `)`".into()),
                }
            }
            Some(Tok::Path(path)) => Ok(vec![vec![self.comparison(&path)?]]),
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("EXISTS") => {
                Err("EXISTS is not evaluated".into())
            }
            Some(t) => Err(format!("expected an object path, found {}", t.describe()).into()),
            None => Err("expected a comparison, found the end".into()),
        }
    }

    fn comparison(&mut self, path: &str) -> Result<Comparison, ParseError> {
        if self.keyword("NOT") {
            return Err(format!("negated comparison on `{path}` is not evaluated").into());
        }
        let op = match self.next() {
            Some(Tok::Op(o)) => o.to_string(),
            Some(Tok::Word(w)) => w.to_uppercase(),
            Some(t) => {
                return Err(format!(
                    "expected an operator after `{path}`, found {}",
                    t.describe()
                )
                .into());
            }
            None => return Err(format!("expected an operator after `{path}`").into()),
        };
        let field = field_of(path)?;
        let values = self.values(&op)?;
        let test = match op.as_str() {
            "=" | "IN" => equals(field, &values)?,
            "ISSUBSET" if field == Field::Address => equals(field, &values)?,
            "MATCHES" | "LIKE" if is_text(field) => {
                let [v] = values.as_slice() else {
                    return Err(format!("{op} takes one string").into());
                };
                let re = if op == "LIKE" {
                    like_to_regex(v)
                } else {
                    v.clone()
                };
                if let Err(e) = regex::RegexBuilder::new(&re).size_limit(8 << 20).build() {
                    return Err(format!(
                        "regex `{}` does not compile: {}",
                        clip(&re),
                        e.to_string().lines().last().unwrap_or("").trim()
                    )
                    .into());
                }
                Test::Regex(re)
            }
            "!=" => return Err(format!("negated comparison on `{path}` is not evaluated").into()),
            other => {
                return Err(format!("operator {other} on `{path}` is not evaluated").into());
            }
        };
        Ok(Comparison { field, test })
    }

    /// One value, or `( v, … )` after IN.
    fn values(&mut self, op: &str) -> Result<Vec<String>, ParseError> {
        let one = |t: Option<Tok>| -> Result<String, ParseError> {
            match t {
                Some(Tok::Str(s)) => Ok(s),
                Some(t @ (Tok::Typed(..) | Tok::Number(_) | Tok::Word(_))) => {
                    Err(format!("{} is not a string value", t.describe()).into())
                }
                Some(t) => Err(format!("expected a value, found {}", t.describe()).into()),
                None => Err("expected a value, found the end".into()),
            }
        };
        if op != "IN" {
            return Ok(vec![one(self.next())?]);
        }
        if self.next() != Some(Tok::LParen) {
            return Err("IN takes a list: ( 'a', 'b' )".into());
        }
        let mut out = Vec::new();
        loop {
            out.push(one(self.next())?);
            match self.next() {
                Some(Tok::Comma) => continue,
                Some(Tok::RParen) => break,
                Some(t) => {
                    return Err(format!("expected `,` or `)`, found {}", t.describe()).into());
                }
                None => return Err("missing `)` after IN list".into()),
            }
        }
        Ok(out)
    }
}

fn is_text(f: Field) -> bool {
    matches!(
        f,
        Field::FileName | Field::ProcessName | Field::CommandLine | Field::Domain
    )
}

fn field_of(path: &str) -> Result<Field, ParseError> {
    let (object, property) = path.split_once(':').unwrap_or((path, ""));
    let object = object.to_ascii_lowercase();
    let unquoted = property.replace('\'', "");
    let field = match (object.as_str(), unquoted.as_str()) {
        ("file", p) if p.eq_ignore_ascii_case("name") => Field::FileName,
        ("file", p) if p.len() > 7 && p[..7].eq_ignore_ascii_case("hashes.") => {
            match p[7..].to_ascii_uppercase().replace('-', "").as_str() {
                "MD5" => Field::Md5,
                "SHA1" => Field::Sha1,
                "SHA256" => Field::Sha256,
                other => return Err(format!("hash {other} in `{path}` is not evaluated").into()),
            }
        }
        ("ipv4-addr" | "ipv6-addr", "value") => Field::Address,
        ("network-traffic", "dst_ref.value") => Field::Address,
        ("domain-name", "value") => Field::Domain,
        ("process", "name") => Field::ProcessName,
        ("process", "command_line") => Field::CommandLine,
        _ => return Err(format!("`{path}` is not evaluated").into()),
    };
    Ok(field)
}

fn equals(field: Field, values: &[String]) -> Result<Test, ParseError> {
    match field {
        Field::Md5 | Field::Sha1 | Field::Sha256 => {
            let len = match field {
                Field::Md5 => 32,
                Field::Sha1 => 40,
                _ => 64,
            };
            let mut out = Vec::new();
            for v in values {
                let h = v.trim().to_ascii_lowercase();
                if h.len() != len || !h.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(format!("`{}` is not a {:?} digest", clip(v), field).into());
                }
                out.push(h);
            }
            Ok(Test::Equals(out))
        }
        Field::Address => {
            let mut out = Vec::new();
            for v in values {
                out.push(
                    network(v)
                        .ok_or_else(|| format!("`{}` is not an IP address or network", clip(v)))?,
                );
            }
            Ok(Test::Network(out))
        }
        Field::Domain => {
            let mut out = Vec::new();
            for v in values {
                let d = v.trim().trim_end_matches('.').to_ascii_lowercase();
                if !is_domain(&d) {
                    return Err(format!("`{}` is not a domain name", clip(v)).into());
                }
                out.push(d);
            }
            Ok(Test::Equals(out))
        }
        Field::FileName | Field::ProcessName | Field::CommandLine => {
            Ok(Test::Equals(values.to_vec()))
        }
    }
}

/// `10.0.0.1`, `10.0.0.0/8`, `2001:db8::/32`.
pub fn network(text: &str) -> Option<(IpAddr, u8)> {
    let text = text.trim();
    match text.split_once('/') {
        None => {
            let ip: IpAddr = text.parse().ok()?;
            Some((ip, if ip.is_ipv4() { 32 } else { 128 }))
        }
        Some((ip, bits)) => {
            let ip: IpAddr = ip.parse().ok()?;
            let bits: u8 = bits.parse().ok()?;
            (bits <= if ip.is_ipv4() { 32 } else { 128 }).then_some((ip, bits))
        }
    }
}

pub(crate) fn is_domain(s: &str) -> bool {
    s.contains('.')
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

/// SQL `LIKE` (`%` any run, `_` one character) as an anchored regex.
fn like_to_regex(like: &str) -> String {
    let mut re = String::from("^");
    for c in like.chars() {
        match c {
            '%' => re.push_str(".*"),
            '_' => re.push('.'),
            c => re.push_str(&regex::escape(&c.to_string())),
        }
    }
    re.push('$');
    re
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(p: &str) -> Vec<Comparison> {
        let mut alts = parse(p).unwrap_or_else(|e| panic!("{p}: {e}")).alternatives;
        assert_eq!(alts.len(), 1, "{p}");
        alts.remove(0)
    }

    #[test]
    fn every_field_the_issue_names() {
        let sha = "A".repeat(64);
        let c = one(&format!("[file:hashes.'SHA-256' = '{sha}']"));
        assert_eq!(c[0].field, Field::Sha256);
        assert_eq!(c[0].test, Test::Equals(vec!["a".repeat(64)]));
        assert_eq!(
            one(&format!("[file:hashes.MD5 = '{}']", "b".repeat(32)))[0].field,
            Field::Md5
        );
        assert_eq!(
            one(&format!("[file:hashes.'SHA-1' = '{}']", "c".repeat(40)))[0].field,
            Field::Sha1
        );
        assert_eq!(one("[file:name = 'evil.exe']")[0].field, Field::FileName);
        assert_eq!(
            one("[ipv4-addr:value = '198.51.100.0/24']")[0].test,
            Test::Network(vec![("198.51.100.0".parse().unwrap(), 24)])
        );
        assert_eq!(
            one("[ipv6-addr:value = '2001:db8::1']")[0].field,
            Field::Address
        );
        assert_eq!(
            one("[domain-name:value = 'Evil.Example.']")[0].test,
            Test::Equals(vec!["evil.example".into()])
        );
        assert_eq!(one("[process:name = 'xmrig']")[0].field, Field::ProcessName);
        assert_eq!(
            one("[process:command_line MATCHES '^nc -e ']")[0].test,
            Test::Regex("^nc -e ".into())
        );
    }

    #[test]
    fn or_and_and_within_one_observation_and_or_between_observations() {
        let p = parse(
            "[file:name = 'a' AND (file:hashes.MD5 = 'd41d8cd98f00b204e9800998ecf8427e' OR \
             file:hashes.MD5 = '00000000000000000000000000000000')] OR [process:name = 'x']",
        )
        .unwrap();
        assert_eq!(p.alternatives.len(), 3);
        assert!(p.alternatives[..2].iter().all(|a| a.len() == 2));
        assert_eq!(p.alternatives[2][0].field, Field::ProcessName);
    }

    #[test]
    fn what_cannot_be_evaluated_says_why() {
        for (p, why) in [
            (
                "[file:name = 'a'] AND [file:name = 'b']",
                "observations joined by AND",
            ),
            (
                "[file:name = 'a'] FOLLOWEDBY [file:name = 'b']",
                "FOLLOWEDBY",
            ),
            ("[file:name = 'a'] WITHIN 5 SECONDS", "WITHIN"),
            ("[file:size > 10]", "`file:size` is not evaluated"),
            ("[file:name != 'a']", "negated"),
            ("[file:name NOT = 'a']", "negated"),
            (
                "[file:name = 'a' AND process:name = 'b']",
                "different objects",
            ),
            ("[file:hashes.MD5 = 'xyz']", "not a Md5 digest"),
            ("[file:name MATCHES '(']", "does not compile"),
            ("[file:name = 'a'", "missing `]`"),
            ("[file:name = 'a]", "unterminated"),
            ("", "expected `[`"),
        ] {
            let e = parse(p).expect_err(p);
            assert!(e.0.contains(why), "{p}: {e}");
        }
    }

    #[test]
    fn like_in_and_escapes() {
        assert_eq!(
            one("[file:name LIKE 'inv%.e_e']")[0].test,
            Test::Regex("^inv.*\\.e.e$".into())
        );
        assert_eq!(
            one("[file:name IN ('a', 'b\\'c')]")[0].test,
            Test::Equals(vec!["a".into(), "b'c".into()])
        );
    }

    #[test]
    fn hostile_nesting_is_refused_not_overflowing() {
        let deep = format!(
            "{}[file:name = 'a']{}",
            "(".repeat(10_000),
            ")".repeat(10_000)
        );
        assert!(parse(&deep).unwrap_err().0.contains("nested deeper"));
        let wide = (0..20)
            .map(|i| format!("(file:name = '{i}' OR file:name = 'x{i}')"))
            .collect::<Vec<_>>()
            .join(" AND ");
        assert!(
            parse(&format!("[{wide}]"))
                .unwrap_err()
                .0
                .contains("alternatives")
        );
    }
}
