//! Named counters (files scanned, skipped by reason, detections, ...) and a few gauges (spool
//! size), shared by every stage and sent in heartbeats.

use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct Counters {
    map: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    pub fn add(&self, name: &str, n: u64) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match m.get_mut(name) {
            Some(v) => *v += n,
            None => {
                m.insert(name.to_string(), n);
            }
        }
    }

    /// Sets a gauge (a value that also goes down, like the spool size).
    pub fn set(&self, name: &str, v: u64) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(name.to_string(), v);
    }

    pub fn inc(&self, name: &str) {
        self.add(name, 1);
    }

    pub fn get(&self, name: &str) -> u64 {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.get(name).copied().unwrap_or(0)
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
