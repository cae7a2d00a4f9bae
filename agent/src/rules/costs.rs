//! Which YARA rules cost the most on this host's own files: after a full scan, the rules that
//! run are timed on a sample of the files it read (see `vedette_engine::profile`), in the rule
//! compiler process (this one neither compiles nor holds the compiler), paced within
//! `max_cpu_percent` like every compile. The costliest go to the collector in the heartbeat,
//! so that a rule slow on some hosts' files is seen before it is felt.
//!
//! The sample is drawn uniformly from every file the scan read or answered from its cache
//! (reservoir sampling), each file read up to [`MAX_FILE_BYTES`], the whole at most
//! [`MAX_SAMPLE_BYTES`]: what it costs grows with rules × sample, not with the host's files.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use tracing::{info, warn};
use vedette_engine::RuleSetBuilder;
use vedette_engine::profile::Profile;
use vedette_proto::v1::{RuleCost, RuleProfile};

use super::ActiveRules;

/// Files kept in the sample.
pub const SAMPLE_FILES: usize = 64;
/// Most bytes read of one file of the sample.
const MAX_FILE_BYTES: u64 = 1 << 20;
/// Most bytes of the whole sample.
const MAX_SAMPLE_BYTES: u64 = 4 << 20;
/// Rules named in a profile.
const TOP: usize = 10;

/// A uniform sample of the files a scan saw, of at most [`SAMPLE_FILES`].
#[derive(Debug, Default)]
pub struct Sample {
    seen: u64,
    files: Vec<PathBuf>,
    /// State of the generator that picks which file a new one replaces.
    state: u64,
}

impl Sample {
    pub fn new(seed: u64) -> Sample {
        Sample {
            state: seed | 1,
            ..Default::default()
        }
    }

    /// Offers one file: kept with probability `SAMPLE_FILES / seen`.
    pub fn offer(&mut self, path: &Path) {
        self.seen += 1;
        if self.files.len() < SAMPLE_FILES {
            self.files.push(path.to_owned());
            return;
        }
        let pick = self.next() % self.seen;
        if let Some(slot) = self.files.get_mut(pick as usize) {
            *slot = path.to_owned();
        }
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// xorshift64*: enough to pick uniformly, no secret involved.
    fn next(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A sampler shared by a scan's threads.
pub type SharedSample = Mutex<Sample>;

/// Reads the sample's files: each up to [`MAX_FILE_BYTES`], all up to [`MAX_SAMPLE_BYTES`];
/// files gone or unreadable since are left out.
fn read_sample(files: &[PathBuf]) -> Vec<Vec<u8>> {
    let mut left = MAX_SAMPLE_BYTES;
    let mut corpus = Vec::new();
    for path in files {
        if left == 0 {
            break;
        }
        let Ok(file) = std::fs::File::open(path) else {
            continue;
        };
        let mut data = Vec::new();
        if file
            .take(MAX_FILE_BYTES.min(left))
            .read_to_end(&mut data)
            .is_ok()
            && !data.is_empty()
        {
            left -= data.len() as u64;
            corpus.push(data);
        }
    }
    corpus
}

impl ActiveRules {
    /// Times the rules that run now on `files` and keeps the costliest for the heartbeat.
    /// Nothing is kept when there is no YARA rule, no file could be read, or the compiler
    /// process failed (said in the log).
    pub fn measure_costs(&self, files: &[PathBuf]) {
        let rules = self.current.load_full();
        if rules.yara_rules() == 0 {
            return;
        }
        let version = rules.bundle_version;
        let corpus = read_sample(files);
        if corpus.is_empty() {
            return;
        }
        let Some(builder) = self.builder_of(version) else {
            return;
        };
        let measured = match &self.compiler {
            Some(c) => builder.profile_with(c.as_ref(), &corpus, TOP),
            None => Ok(builder.profile(&corpus, TOP)),
        };
        let profile = match measured {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot time the rules on this host's files");
                return;
            }
        };
        let profile = to_proto(&profile, version);
        if let Some(first) = profile.rules.first() {
            info!(
                rule = %first.rule,
                file = %first.file,
                share_percent = f64::from(first.share_ppm) / 10_000.0,
                files = profile.files,
                "rules timed on this host's files; the costliest goes to the collector"
            );
        }
        *self.costs.lock().unwrap_or_else(|p| p.into_inner()) = Some(profile);
    }

    /// The last profile measured, for the heartbeat.
    pub fn costs(&self) -> Option<RuleProfile> {
        self.costs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The sources of the rules that run: host-local ones and the bundle of `version` (None
    /// when that bundle is no longer the last good one: a newer one came meanwhile).
    fn builder_of(&self, version: u64) -> Option<RuleSetBuilder> {
        let content = match version {
            0 => None,
            _ => match self.read_last_good() {
                Ok(Some(c))
                    if c.version == version && self.applied.load(Ordering::Relaxed) == version =>
                {
                    Some(c)
                }
                Ok(_) => return None,
                Err(e) => {
                    warn!(error = %e, "cannot read the bundle to time its rules");
                    return None;
                }
            },
        };
        self.sources(content.as_ref())
            .inspect_err(|e| warn!(error = %e, "cannot read the rules to time them"))
            .ok()
    }
}

fn to_proto(p: &Profile, version: u64) -> RuleProfile {
    let us = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    RuleProfile {
        bundle_version: version,
        measured_at_ms: vedette_proto::now_ms(),
        files: u32::try_from(p.files).unwrap_or(u32::MAX),
        bytes: p.bytes,
        total_us: us(p.total),
        rules: p
            .rules
            .iter()
            .map(|r| RuleCost {
                rule: r.rule.clone(),
                file: r.file.display().to_string(),
                line: u32::try_from(r.line).unwrap_or(u32::MAX),
                time_us: us(r.time),
                share_ppm: (r.share.clamp(0.0, 1.0) * 1e6).round() as u32,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_keeps_every_file_until_full_then_a_uniform_share() {
        let mut s = Sample::new(7);
        for i in 0..SAMPLE_FILES {
            s.offer(Path::new(&format!("/f{i}")));
        }
        assert_eq!(s.files().len(), SAMPLE_FILES);
        assert!(
            s.files()
                .iter()
                .enumerate()
                .all(|(i, p)| *p == Path::new(&format!("/f{i}")))
        );
        // 100 times as many files: about 1 % of the first ones stay, and the sample stays full.
        for i in 0..SAMPLE_FILES * 99 {
            s.offer(Path::new(&format!("/g{i}")));
        }
        assert_eq!(s.files().len(), SAMPLE_FILES);
        let first = s.files().iter().filter(|p| p.starts_with("/f")).count();
        assert!(first <= 8, "{first} of the first {SAMPLE_FILES} stayed");
    }

    #[test]
    fn the_sample_is_read_within_its_bounds_and_skips_what_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; (MAX_FILE_BYTES + 10) as usize]).unwrap();
        let small = dir.path().join("small");
        std::fs::write(&small, "text").unwrap();
        let corpus = read_sample(&[big, dir.path().join("gone"), small]);
        assert_eq!(
            corpus.iter().map(Vec::len).collect::<Vec<_>>(),
            [MAX_FILE_BYTES as usize, 4]
        );
    }
}
