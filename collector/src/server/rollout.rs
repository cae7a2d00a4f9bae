//! Staged rollout: which bundle each agent is to run. A version published to a label
//! (`rules publish --to canary`) reaches only the agents with that label; the others stay on
//! the newest version published to every agent, until `rules promote` sends it to all. An
//! agent is due the newest version among those published to every agent and to its labels;
//! versions only go forward on each agent.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tracing::warn;
use vedette_proto::v1::RuleBundle;

use super::{State, blocking, rule_bundle};
use crate::store::{Store, StoreError};

/// What each agent is to run, as the store says now.
#[derive(Debug, Default)]
pub struct Rollout {
    /// The newest version published to every agent.
    pub all: Option<Arc<RuleBundle>>,
    /// For each label, the newest version published to it, when newer than `all`.
    pub labelled: BTreeMap<String, Arc<RuleBundle>>,
    /// The labels of each agent that has some.
    pub labels: HashMap<String, Vec<String>>,
}

impl Rollout {
    /// The bundle an agent with `labels` is due.
    pub fn due_for(&self, labels: &[String]) -> Option<&Arc<RuleBundle>> {
        labels
            .iter()
            .filter_map(|l| self.labelled.get(l))
            .chain(self.all.iter())
            .max_by_key(|b| b.version)
    }

    /// The bundle an agent is due.
    pub fn due(&self, agent: &str) -> Option<&Arc<RuleBundle>> {
        self.due_for(self.labels.get(agent).map_or(&[], Vec::as_slice))
    }

    /// An agent's labels (none when it has none).
    pub fn labels_of(&self, agent: &str) -> Vec<String> {
        self.labels.get(agent).cloned().unwrap_or_default()
    }

    /// The newest version anywhere (0: none).
    pub fn newest(&self) -> u64 {
        self.labelled
            .values()
            .chain(self.all.iter())
            .map(|b| b.version)
            .max()
            .unwrap_or(0)
    }
}

/// Reads the rollout from the store: the bundles published and the agents' labels.
pub fn load(store: &dyn Store) -> Result<Rollout, StoreError> {
    let bundles = store.list_bundles()?; // newest first
    let all_version = bundles
        .iter()
        .find(|b| b.target.is_empty())
        .map(|b| b.version);
    let mut wanted: BTreeMap<String, u64> = BTreeMap::new();
    for b in bundles.iter().filter(|b| !b.target.is_empty()) {
        if Some(b.version) > all_version {
            wanted.entry(b.target.clone()).or_insert(b.version);
        }
    }
    let content = |v: u64| -> Result<Option<Arc<RuleBundle>>, StoreError> {
        Ok(store.bundle(v)?.map(|row| Arc::new(rule_bundle(&row))))
    };
    let all = match all_version {
        Some(v) => content(v)?,
        None => None,
    };
    let mut labelled = BTreeMap::new();
    for (label, v) in wanted {
        if let Some(b) = content(v)? {
            labelled.insert(label, b);
        }
    }
    let labels = store
        .list_agents()?
        .into_iter()
        .filter(|a| !a.labels.is_empty())
        .map(|a| (a.id, a.labels))
        .collect();
    Ok(Rollout {
        all,
        labelled,
        labels,
    })
}

/// Reads the rollout again and hands it to every agent stream, which pushes what its agent is
/// now due. A failure is logged (the streams keep the rollout they have).
pub(crate) async fn refresh(state: &State) {
    match blocking(&state.store, |s| load(s)).await {
        Ok(r) => {
            state.rollout.send_replace(Arc::new(r));
        }
        Err(e) => warn!(error = %e.message(), "cannot read the rollout of bundles"),
    }
}
