//! Rules by file class: a file is judged only by the rules that can match a file of its class.
//!
//! With signature-base, a one-line text file costs the evaluation of 5,883 conditions, and 3,306
//! of them start with `uint16(0) == 0x5a4d`: they cannot match anything but a file that starts
//! with `MZ`. At compile time each rule's condition is read from its syntax tree (yara-x's own
//! parser): a top-level conjunct that pins the file's first bytes (`uint16(0) == 0x5a4d`,
//! `uint32(0) == 0x464c457f`, `uint16be(0) == …`, `pe.is_pe`) restricts the rule to the class of
//! those bytes; a disjunction restricts it to the union of its operands' classes. The class of a
//! file is read from its first two bytes, the bytes every such conjunct tests:
//!
//! | class | first bytes |
//! |---|---|
//! | PE | `MZ` |
//! | ELF | `7f 45` (`\x7fE`) |
//! | Mach-O | `ce fa`, `cf fa`, `fe ed`, `ca fe`, `be ba` (thin and fat, both byte orders) |
//! | other | anything else, and files shorter than two bytes |
//!
//! So a rule pinned to any other magic (OLE's `d0 cf`, ZIP's `PK`) belongs to "other" alone.
//! A rule the analysis cannot prove restricted belongs to every class, and so do global rules
//! (they gate their whole namespace), rules that any condition names (by name: a private
//! helper, or a rule another rule references), and every rule of a file the parser reports an
//! error in. One compiled set is built per class that has rules of its own; the classes that do
//! not share one set of the unrestricted rules. A file is scanned with its class's set: the
//! rules left out of that set are exactly those that cannot match it, so the result is the
//! whole set's (the engine's differential tests check it on corpora and at class boundaries).

use std::borrow::Cow;
use std::collections::HashSet;
use std::ops::Range;
use std::sync::{Mutex, OnceLock};

use yara_x_parser::Parser;
use yara_x_parser::ast::dfs::{DFSEvent, DFSIter};
use yara_x_parser::ast::{AST, Expr, RuleFlags};
use yara_x_parser::cst::SyntaxKind;

use crate::codec::{Reader, Writer};

/// What kind of file a scan sees, from its first two bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileClass {
    Pe = 0,
    Elf = 1,
    MachO = 2,
    Other = 3,
}

/// A set of classes, one bit each.
type Mask = u8;
const EVERY: Mask = 0b1111;
const CLASSES: usize = 4;

impl FileClass {
    pub const ALL: [FileClass; CLASSES] = [
        FileClass::Pe,
        FileClass::Elf,
        FileClass::MachO,
        FileClass::Other,
    ];

    /// The class of a file that starts with `head`.
    pub fn of(head: &[u8]) -> FileClass {
        match head {
            [0x4d, 0x5a, ..] => FileClass::Pe,
            [0x7f, 0x45, ..] => FileClass::Elf,
            [0xce | 0xcf, 0xfa, ..] | [0xfe, 0xed, ..] | [0xca, 0xfe, ..] | [0xbe, 0xba, ..] => {
                FileClass::MachO
            }
            _ => FileClass::Other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FileClass::Pe => "pe",
            FileClass::Elf => "elf",
            FileClass::MachO => "macho",
            FileClass::Other => "other",
        }
    }

    fn bit(self) -> Mask {
        1 << self as u8
    }
}

/// Compiled YARA rules, one set per class that has rules of its own. A set read back from its
/// serialized form (the compiled-rules cache, the compiler process) is loaded when the first
/// file of its class needs it: a host that never sees a PE file never holds the PE rules, and a
/// scan of text files loads only the rules text can match.
pub struct ClassRules {
    sets: Vec<Set>,
    /// The set each class is scanned with, by [`FileClass`] index.
    pick: [u8; CLASSES],
    /// Distinct rules over every set.
    count: usize,
}

/// One compiled set, loaded or still serialized.
struct Set {
    rules: OnceLock<Result<yara_x::Rules, String>>,
    /// The serialized form, until loaded.
    serialized: Mutex<Option<Vec<u8>>>,
    count: usize,
}

impl Set {
    fn loaded(rules: yara_x::Rules) -> Set {
        let count = rules.iter().len();
        Set {
            rules: OnceLock::from(Ok(rules)),
            serialized: Mutex::new(None),
            count,
        }
    }

    fn get(&self) -> Result<&yara_x::Rules, String> {
        self.rules
            .get_or_init(|| {
                let bytes = self.serialized.lock().ok().and_then(|mut b| b.take());
                let bytes = bytes.ok_or_else(|| "no serialized rules".to_string())?;
                yara_x::Rules::deserialize(&bytes).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| format!("compiled rules do not load: {e}"))
    }
}

impl ClassRules {
    pub(crate) fn new(sets: Vec<yara_x::Rules>, pick: [u8; CLASSES]) -> ClassRules {
        let count = match sets.as_slice() {
            [one] => one.iter().len(),
            _ => {
                let mut seen = HashSet::new();
                for rule in sets.iter().flat_map(|s| s.iter()) {
                    seen.insert((rule.namespace().to_string(), rule.identifier().to_string()));
                }
                seen.len()
            }
        };
        let sets = sets.into_iter().map(Set::loaded).collect();
        ClassRules { sets, pick, count }
    }

    /// The index of the set a file starting with `head` is scanned with.
    pub fn set_for(&self, head: &[u8]) -> usize {
        self.pick[FileClass::of(head) as usize] as usize
    }

    /// How many sets there are.
    pub fn len(&self) -> usize {
        self.sets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// Set `i`, loaded now if it was not; an error says why it cannot be (never expected: the
    /// serialized rules were checked before they were kept).
    pub fn set(&self, i: usize) -> Result<&yara_x::Rules, String> {
        self.sets
            .get(i)
            .ok_or_else(|| format!("no rule set {i}"))?
            .get()
    }

    /// The rules `class` is judged by.
    pub fn of_class(&self, class: FileClass) -> Result<&yara_x::Rules, String> {
        self.set(self.pick[class as usize] as usize)
    }

    /// Loads the sets of `classes` now, so that the first file of each does not wait for it.
    pub fn preload(&self, classes: &[FileClass]) -> Result<(), String> {
        for &c in classes {
            self.of_class(c)?;
        }
        Ok(())
    }

    /// The number of distinct rules over every set.
    pub fn count(&self) -> usize {
        self.count
    }

    /// How many rules judge each class, as `pe 5517, elf 2625, macho 2507, other 2724`.
    pub fn summary(&self) -> String {
        FileClass::ALL
            .iter()
            .map(|&c| {
                let n = self.sets[self.pick[c as usize] as usize].count;
                format!("{} {n}", c.name())
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Every set in yara-x's serialized form, with which class uses which:
    ///
    /// ```text
    /// set of each class: [u8; 4] (PE, ELF, Mach-O, other) | sets: u8 | distinct rules: u64le
    ///   | per set: rules: u64le | u64le len + yara-x serialized rules
    /// ```
    pub fn serialize(&self) -> Result<Vec<u8>, String> {
        let mut w = Writer::default();
        w.bytes(&self.pick);
        w.u8(self.sets.len() as u8);
        w.u64(self.count as u64);
        for set in &self.sets {
            w.u64(set.count as u64);
            let kept = set.serialized.lock().ok().and_then(|b| b.clone());
            match kept {
                Some(bytes) => w.blob(&bytes),
                None => w.blob(&set.get()?.serialize().map_err(|e| e.to_string())?),
            }
        }
        Ok(w.0)
    }

    /// What [`ClassRules::serialize`] wrote; each set is loaded when first used.
    pub fn deserialize(data: &[u8]) -> Result<ClassRules, String> {
        let mut r = Reader(data);
        let truncated = || "truncated".to_string();
        let pick: [u8; CLASSES] = r
            .take(CLASSES)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(truncated)?;
        let n = r.u8().ok_or_else(truncated)? as usize;
        if n == 0 || pick.iter().any(|&p| p as usize >= n) {
            return Err(format!("no set for a class ({n} sets)"));
        }
        let count = r.u64().ok_or_else(truncated)? as usize;
        let mut sets = Vec::with_capacity(n);
        for _ in 0..n {
            let rules = r.u64().ok_or_else(truncated)? as usize;
            let bytes = r.blob().ok_or_else(truncated)?;
            sets.push(Set {
                rules: OnceLock::new(),
                serialized: Mutex::new(Some(bytes.to_vec())),
                count: rules,
            });
        }
        Ok(ClassRules { sets, pick, count })
    }
}

/// The sources of each set to compile, and the set each class uses.
pub(crate) struct Plan<'s> {
    /// Per set, per source: its text, with the rules left out of the set blanked (lines kept).
    pub sets: Vec<Vec<Cow<'s, [u8]>>>,
    pub pick: [u8; CLASSES],
}

impl<'s> Plan<'s> {
    /// One set of every rule, for every class.
    pub(crate) fn whole(sources: &'s [(std::path::PathBuf, Vec<u8>)]) -> Plan<'s> {
        Plan {
            sets: vec![sources.iter().map(|(_, b)| Cow::Borrowed(&b[..])).collect()],
            pick: [0; CLASSES],
        }
    }
}

/// One rule of a source: where its declaration is and the classes it can match.
struct Declared {
    span: Range<usize>,
    mask: Mask,
    name: String,
}

/// Splits `sources` into one set per class that has rules of its own.
pub(crate) fn plan(sources: &[(std::path::PathBuf, Vec<u8>)]) -> Plan<'_> {
    let mut declared: Vec<Vec<Declared>> = Vec::with_capacity(sources.len());
    let mut named = HashSet::new();
    for (_, bytes) in sources {
        declared.push(
            std::str::from_utf8(bytes)
                .ok()
                .and_then(|text| analyse(text, &mut named))
                .unwrap_or_default(),
        );
    }
    for rules in &mut declared {
        widen_named(rules, &named);
    }
    let restricted = |c: FileClass| {
        declared
            .iter()
            .flatten()
            .any(|r| r.mask != EVERY && r.mask & c.bit() != 0)
    };
    let own: Vec<FileClass> = FileClass::ALL
        .into_iter()
        .filter(|&c| restricted(c))
        .collect();
    if own.is_empty() {
        return Plan::whole(sources);
    }
    let keep = |wanted: &dyn Fn(Mask) -> bool| -> Vec<Cow<'_, [u8]>> {
        sources
            .iter()
            .zip(&declared)
            .map(|((_, bytes), rules)| blank(bytes, rules, wanted))
            .collect()
    };
    let mut sets = Vec::new();
    let mut pick = [u8::MAX; CLASSES];
    for &c in &own {
        pick[c as usize] = sets.len() as u8;
        sets.push(keep(&|m| m & c.bit() != 0));
    }
    if own.len() < CLASSES {
        let common = sets.len() as u8;
        sets.push(keep(&|m| m == EVERY));
        for p in pick.iter_mut().filter(|p| **p == u8::MAX) {
            *p = common;
        }
    }
    Plan { sets, pick }
}

/// A rule whose name a condition uses belongs to every class: whoever names it must find it.
fn widen_named(rules: &mut [Declared], named: &HashSet<String>) {
    for rule in rules.iter_mut().filter(|r| named.contains(&r.name)) {
        rule.mask = EVERY;
    }
}

/// `bytes` with the declarations of the rules not `wanted` blanked (see [`blanked`]).
fn blank<'s>(bytes: &'s [u8], rules: &[Declared], wanted: &dyn Fn(Mask) -> bool) -> Cow<'s, [u8]> {
    let mut out = rules.iter().filter(|r| !wanted(r.mask)).peekable();
    match out.peek() {
        None => Cow::Borrowed(bytes),
        Some(_) => Cow::Owned(blanked(bytes, out.map(|r| &r.span))),
    }
}

/// `bytes` with each of `spans` turned to spaces, newlines kept: a problem's line is the same
/// whichever rules are left out.
pub(crate) fn blanked<'a>(bytes: &[u8], spans: impl Iterator<Item = &'a Range<usize>>) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for span in spans {
        for b in &mut out[span.clone()] {
            if *b != b'\n' {
                *b = b' ';
            }
        }
    }
    out
}

/// The rules of one source with their classes, and every name its conditions use (added to
/// `named`). None when the source does not parse cleanly: all its rules then belong to every
/// class, and a name they use cannot be known, so nothing of it is restricted.
fn analyse(text: &str, named: &mut HashSet<String>) -> Option<Vec<Declared>> {
    let ast = AST::from(text);
    if !ast.errors().is_empty() {
        return None;
    }
    let spans = declarations(text)?;
    let pe = ast.imports().any(|i| i.module_name == "pe");
    let rules: Vec<_> = ast.rules().collect();
    if rules.len() != spans.len() {
        return None;
    }
    let mut out = Vec::with_capacity(rules.len());
    for (rule, (span, name)) in rules.into_iter().zip(spans) {
        if rule.identifier.name != name {
            return None;
        }
        for event in DFSIter::new(&rule.condition) {
            if let DFSEvent::Enter(Expr::Ident(ident)) = event {
                named.insert(ident.name.to_string());
            }
        }
        let mask = match rule.flags.contains(RuleFlags::Global) {
            true => EVERY,
            false => match condition_mask(&rule.condition, pe) {
                0 => EVERY,
                m => m,
            },
        };
        out.push(Declared { span, mask, name });
    }
    // A name declared twice is an error of the whole set; each set must meet it.
    let mut seen = HashSet::new();
    let twice: HashSet<String> = out
        .iter()
        .filter(|r| !seen.insert(r.name.as_str()))
        .map(|r| r.name.clone())
        .collect();
    for r in out.iter_mut().filter(|r| twice.contains(&r.name)) {
        r.mask = EVERY;
    }
    Some(out)
}

/// The rule declarations of `text` (where, and the name) and every name its conditions use;
/// None when it does not parse cleanly.
pub(crate) type Declarations = (Vec<(Range<usize>, String)>, HashSet<String>);

pub(crate) fn declared_rules(text: &str) -> Option<Declarations> {
    let mut named = HashSet::new();
    let rules = analyse(text, &mut named)?;
    Some((rules.into_iter().map(|r| (r.span, r.name)).collect(), named))
}

/// Where each rule declaration of `text` is, with its name, from yara-x's concrete syntax tree.
fn declarations(text: &str) -> Option<Vec<(Range<usize>, String)>> {
    let cst = Parser::new(text.as_bytes()).try_into_cst().ok()?;
    let mut out = Vec::new();
    for node in cst.root().children() {
        if node.kind() != SyntaxKind::RULE_DECL {
            continue;
        }
        let span = node.span();
        let name = node
            .children_with_tokens()
            .filter_map(|n| n.into_token())
            .find(|t| t.kind() == SyntaxKind::IDENT)?
            .text()
            .to_string();
        out.push((span.start()..span.end(), name));
    }
    Some(out)
}

/// The classes a condition can be true for.
fn condition_mask(expr: &Expr<'_>, pe: bool) -> Mask {
    match expr {
        Expr::And(all) => all.operands().fold(EVERY, |m, e| m & condition_mask(e, pe)),
        Expr::Or(any) => any.operands().fold(0, |m, e| m | condition_mask(e, pe)),
        Expr::Eq(eq) => pinned(&eq.lhs, &eq.rhs)
            .or_else(|| pinned(&eq.rhs, &eq.lhs))
            .unwrap_or(EVERY),
        Expr::FieldAccess(path) if pe => match path.operands.as_slice() {
            // The pe module sets `is_pe` only after reading `MZ` at offset 0.
            [Expr::Ident(module), Expr::Ident(field)]
                if module.name == "pe" && field.name == "is_pe" =>
            {
                FileClass::Pe.bit()
            }
            _ => EVERY,
        },
        _ => EVERY,
    }
}

/// The class of `read == value` when `read` reads at least the first two bytes of the file
/// (`uint16(0)`, `uint32(0)`, or their big-endian forms): the file's first bytes are then known.
fn pinned(read: &Expr<'_>, value: &Expr<'_>) -> Option<Mask> {
    let (Expr::FuncCall(call), Expr::LiteralInteger(v)) = (read, value) else {
        return None;
    };
    let [Expr::LiteralInteger(offset)] = call.args.as_slice() else {
        return None;
    };
    if call.object.is_some() || offset.value != 0 || v.is_unsigned || v.value < 0 {
        return None;
    }
    let v = v.value as u64;
    let head = match call.identifier.name {
        "uint16" if v <= 0xffff => [v as u8, (v >> 8) as u8],
        "uint16be" if v <= 0xffff => [(v >> 8) as u8, v as u8],
        "uint32" if v <= 0xffff_ffff => [v as u8, (v >> 8) as u8],
        "uint32be" if v <= 0xffff_ffff => [(v >> 24) as u8, (v >> 16) as u8],
        _ => return None,
    };
    Some(FileClass::of(&head).bit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masks(src: &str) -> Vec<(String, Mask)> {
        let mut named = HashSet::new();
        let mut rules = analyse(src, &mut named).expect("parses");
        widen_named(&mut rules, &named);
        rules.into_iter().map(|r| (r.name, r.mask)).collect()
    }

    #[test]
    fn the_class_of_a_file_is_read_from_its_first_two_bytes() {
        assert_eq!(FileClass::of(b"MZ\x90\x00"), FileClass::Pe);
        assert_eq!(FileClass::of(b"\x7fELF\x02"), FileClass::Elf);
        assert_eq!(FileClass::of(b"\x7fE"), FileClass::Elf);
        assert_eq!(FileClass::of(b"\xcf\xfa\xed\xfe"), FileClass::MachO);
        assert_eq!(FileClass::of(b"\xca\xfe\xba\xbe"), FileClass::MachO);
        assert_eq!(FileClass::of(b"M"), FileClass::Other);
        assert_eq!(FileClass::of(b""), FileClass::Other);
        assert_eq!(FileClass::of(b"#!/bin/sh"), FileClass::Other);
    }

    #[test]
    fn conditions_that_pin_the_first_bytes_restrict_a_rule_to_their_class() {
        let src = r#"
            import "pe"
            rule mz { condition: uint16(0) == 0x5a4d and filesize < 1MB }
            rule mz_be { condition: 0x4d5a == uint16be(0) }
            rule pe_module { condition: pe.is_pe and pe.number_of_sections > 2 }
            rule elf { condition: uint32(0) == 0x464c457f }
            rule elf16 { condition: uint16(0) == 0x457f and true }
            rule macho { condition: uint32(0) == 0xfeedfacf or uint32(0) == 0xbebafeca }
            rule either { condition: uint16(0) == 0x5a4d or uint32be(0) == 0x7f454c46 }
            rule ole { condition: uint16(0) == 0xcfd0 }
            rule loose { strings: $a = "x" condition: $a }
            rule negated { condition: not (uint16(0) == 0x5a4d) }
            rule in_or { condition: uint16(0) == 0x5a4d or filesize < 10 }
            rule nested { condition: filesize < 9 and (uint16(0) == 0x5a4d and true) }
            rule at_one { condition: uint16(1) == 0x5a4d }
            rule never { condition: uint16(0) == 0x5a4d and uint16(0) == 0x457f }
        "#;
        let pe = FileClass::Pe.bit();
        let elf = FileClass::Elf.bit();
        let expected = [
            ("mz", pe),
            ("mz_be", pe),
            ("pe_module", pe),
            ("elf", elf),
            ("elf16", elf),
            ("macho", FileClass::MachO.bit()),
            ("either", pe | elf),
            ("ole", FileClass::Other.bit()),
            ("loose", EVERY),
            ("negated", EVERY),
            ("in_or", EVERY),
            ("nested", pe),
            ("at_one", EVERY),
            ("never", EVERY),
        ];
        let got = masks(src);
        let want: Vec<(String, Mask)> = expected.iter().map(|(n, m)| (n.to_string(), *m)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn global_rules_rules_named_elsewhere_and_pe_without_its_import_belong_to_every_class() {
        let src = r#"
            global rule gate { condition: uint16(0) == 0x5a4d }
            private rule helper { condition: uint16(0) == 0x5a4d }
            rule user { condition: helper and filesize > 0 }
            rule no_import { condition: pe.is_pe }
        "#;
        let got = masks(src);
        assert!(got.iter().all(|(_, m)| *m == EVERY), "{got:?}");
    }

    #[test]
    fn a_source_with_a_syntax_error_is_not_analysed() {
        let mut named = HashSet::new();
        assert!(analyse("rule a { condition: uint16(0) == 0x5a4d and }", &mut named).is_none());
    }

    #[test]
    fn a_plan_blanks_the_rules_a_class_cannot_match_and_keeps_every_line() {
        let src =
            "rule mz {\n condition: uint16(0) == 0x5a4d\n}\nrule anything { condition: true }\n";
        let sources = vec![(std::path::PathBuf::from("a.yar"), src.as_bytes().to_vec())];
        let plan = plan(&sources);
        assert_eq!(plan.sets.len(), 2);
        let pe = &plan.sets[plan.pick[FileClass::Pe as usize] as usize][0];
        let other = &plan.sets[plan.pick[FileClass::Other as usize] as usize][0];
        assert_eq!(&pe[..], src.as_bytes());
        let other = std::str::from_utf8(other).unwrap();
        assert!(
            !other.contains("mz") && other.contains("rule anything"),
            "{other}"
        );
        assert_eq!(other.lines().count(), src.lines().count());
        assert_eq!(
            plan.pick[FileClass::Elf as usize],
            plan.pick[FileClass::Other as usize]
        );
    }
}
