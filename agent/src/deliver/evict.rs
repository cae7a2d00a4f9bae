//! Which spooled detections go when the spool is over its cap or its disk is full.
//!
//! Detections group by what they say: the same rule (or indicator) and source, about the same
//! class of subject (a file, a process, a connection). The first of each group is its
//! representative; the others are repeats. Repeats go before any representative, and within
//! each of the two, the lowest score goes first, then the oldest. So a local user who writes
//! thousands of files matching one public, low-score rule pushes out only those repeats, never a
//! high-score detection made before or after them, and the first sighting of each thing stays.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use vedette_proto::v1::{Detection, detection::Target};

/// One spooled record that may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub id: u64,
    /// Bytes it takes in its segment, header included.
    pub bytes: u64,
    pub score: u32,
    /// What it says, as [`group_of`] folds it.
    pub group: u64,
}

/// The group a detection belongs to: its kind, rule, source and subject class.
pub(crate) fn group_of(d: &Detection) -> u64 {
    let class: u8 = match &d.target {
        None => 0,
        Some(Target::File(_)) => 1,
        Some(Target::Process(_)) => 2,
        Some(Target::Connection(_)) => 3,
        Some(Target::Dns(_)) => 4,
    };
    let mut h = DefaultHasher::new();
    (d.kind, d.rule.as_str(), d.source.as_str(), class).hash(&mut h);
    h.finish()
}

/// The ids to drop to free at least `need` bytes, ascending: repeats first, then
/// representatives; the lowest score, then the oldest, first within each. Repeats go on until
/// `goal` bytes (at least `need`: room made ahead, so the spool is reread seldom) are freed; a
/// representative goes only while fewer than `need` bytes are.
pub(crate) fn choose(candidates: &[Candidate], need: u64, goal: u64) -> Vec<u64> {
    let mut first: HashMap<u64, u64> = HashMap::new();
    for c in candidates {
        first
            .entry(c.group)
            .and_modify(|id| *id = (*id).min(c.id))
            .or_insert(c.id);
    }
    let mut order: Vec<&Candidate> = candidates.iter().collect();
    order.sort_unstable_by_key(|c| (first.get(&c.group) == Some(&c.id), c.score, c.id));
    let mut freed = 0u64;
    let mut out = Vec::new();
    for c in order {
        let first = first.get(&c.group) == Some(&c.id);
        if freed >= goal.max(need) || (first && freed >= need) {
            break;
        }
        freed += c.bytes;
        out.push(c.id);
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u64, score: u32, group: u64) -> Candidate {
        Candidate {
            id,
            bytes: 100,
            score,
            group,
        }
    }

    #[test]
    fn repeats_go_first_lowest_score_then_oldest_and_firsts_last() {
        // 1: a high-score single; 2..=6 a low-score flood; 7 a mid-score single; 8, 9 repeats
        // of a mid-score rule.
        let mut all = vec![c(1, 90, 1)];
        all.extend((2..=6).map(|id| c(id, 10, 2)));
        all.extend([c(7, 50, 3), c(8, 50, 4), c(9, 50, 4)]);
        assert_eq!(choose(&all, 300, 0), [3, 4, 5]);
        assert_eq!(choose(&all, 500, 0), [3, 4, 5, 6, 9]);
        // Then the representatives: the flood's first, the mid-score ones, the high score last.
        assert_eq!(choose(&all, 700, 0), [2, 3, 4, 5, 6, 7, 9]);
        assert_eq!(choose(&all, 900, 0), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert!(choose(&all, 0, 0).is_empty());
        // Room made ahead takes repeats only: no first sighting goes for a goal beyond the need.
        assert_eq!(choose(&all, 100, 900), [3, 4, 5, 6, 9]);
        assert_eq!(choose(&all, 600, 900), [2, 3, 4, 5, 6, 9]);
    }

    #[test]
    fn groups_are_rule_source_kind_and_subject_class() {
        use vedette_proto::v1::{FileTarget, ProcessTarget};
        let file = |rule: &str, path: &str| Detection {
            rule: rule.into(),
            source: "bundle".into(),
            target: Some(Target::File(FileTarget {
                path: path.into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        assert_eq!(group_of(&file("r", "/a")), group_of(&file("r", "/b")));
        assert_ne!(group_of(&file("r", "/a")), group_of(&file("s", "/a")));
        let process = Detection {
            target: Some(Target::Process(ProcessTarget::default())),
            ..file("r", "/a")
        };
        assert_ne!(group_of(&file("r", "/a")), group_of(&process));
    }
}
