//! Hunts: the collector asks which of some digests this host saw; the history answers in one
//! pass, no file is read, and only the hits leave the host (at most
//! [`MAX_HUNT_HITS`](vedette_proto::limits::MAX_HUNT_HITS), the total said).
//!
//! A hunt is answered once: the collector stores the first answer of each agent, and a hunt
//! sent again (after a reconnect) gets the answer already given. A hunt past its expiry is not
//! answered.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{info, warn};
use vedette_proto::limits::{MAX_HUNT_HASHES, MAX_HUNT_HITS};
use vedette_proto::v1::{HuntAnswer, HuntHit, HuntRequest};

use super::retro::Hit;
use super::{History, Kind, Record};
use crate::detect::procmon::Users;
use crate::telemetry::{Counter, Counters};

/// Answers kept to be given again when a hunt is sent again.
const REMEMBERED: usize = 32;

/// Answers hunts from `requests` on `answers` until either channel closes.
pub async fn run(
    history: Option<Arc<History>>,
    mut requests: mpsc::Receiver<HuntRequest>,
    answers: mpsc::Sender<HuntAnswer>,
    counters: Arc<Counters>,
) {
    let mut given: VecDeque<HuntAnswer> = VecDeque::new();
    while let Some(req) = requests.recv().await {
        if let Some(a) = given.iter().find(|a| a.id == req.id) {
            if answers.send(a.clone()).await.is_err() {
                return;
            }
            continue;
        }
        if req.expires_at_ms <= vedette_proto::now_ms() {
            counters.inc(Counter::HuntsExpired);
            info!(hunt = %req.id, "hunt expired before it could be answered; not answered");
            continue;
        }
        let h = history.clone();
        let Ok(answer) = tokio::task::spawn_blocking(move || answer(h.as_deref(), &req)).await
        else {
            continue;
        };
        counters.inc(Counter::HuntsAnswered);
        if answer.error.is_empty() {
            info!(hunt = %answer.id, hits = answer.hits_total, records = answer.records, "hunt answered from the history");
        } else {
            warn!(hunt = %answer.id, error = %answer.error, "hunt not answered");
        }
        if given.len() == REMEMBERED {
            given.pop_front();
        }
        given.push_back(answer.clone());
        if answers.send(answer).await.is_err() {
            return;
        }
    }
}

/// The digests a hunt asks about, decoded (malformed ones are ignored).
#[derive(Default)]
struct Wanted {
    sha256: HashSet<[u8; 32]>,
    md5: HashSet<[u8; 16]>,
    sha1: HashSet<[u8; 20]>,
}

fn decode<const N: usize>(hex_digests: &[String]) -> HashSet<[u8; N]> {
    hex_digests
        .iter()
        .take(MAX_HUNT_HASHES)
        .filter_map(|h| {
            let mut b = [0u8; N];
            super::unhex(Some(h.trim()), &mut b).then_some(b)
        })
        .collect()
}

impl Wanted {
    fn of(req: &HuntRequest) -> Wanted {
        Wanted {
            sha256: decode(&req.sha256),
            md5: decode(&req.md5),
            sha1: decode(&req.sha1),
        }
    }

    fn matches(&self, r: &Record) -> bool {
        let known = |b: &[u8]| b.iter().any(|x| *x != 0);
        (known(&r.sha256) && self.sha256.contains(&r.sha256))
            || (known(&r.md5) && self.md5.contains(&r.md5))
            || (known(&r.sha1) && self.sha1.contains(&r.sha1))
    }
}

/// The answer to one hunt, from `history` (an error when none is kept).
pub fn answer(history: Option<&History>, req: &HuntRequest) -> HuntAnswer {
    let mut out = HuntAnswer {
        id: req.id.clone(),
        hits_cap: MAX_HUNT_HITS as u32,
        ..HuntAnswer::default()
    };
    let Some(history) = history else {
        out.error = "no history is kept on this host (`history_max_bytes = \"off\"`)".into();
        return out;
    };
    let wanted = Wanted::of(req);
    let mut hits: HashMap<(Kind, PathBuf, [u8; 32]), Hit> = HashMap::new();
    let read = history.each(&mut |r: &Record| {
        out.records += 1;
        if !wanted.matches(r) {
            return;
        }
        let key = (r.kind, r.path.clone(), r.sha256);
        match hits.get_mut(&key) {
            Some(h) => h.merge(r),
            None => {
                hits.insert(key, Hit::of(r, Vec::new()));
            }
        }
    });
    if let Err(e) = read {
        out.error = format!("cannot read the history: {e}");
        return out;
    }
    let mut hits: Vec<Hit> = hits.into_values().collect();
    out.hits_total = hits.len() as u32;
    // The most recent first: what is cut is what was seen longest ago.
    hits.sort_by(|a, b| b.last_ms.cmp(&a.last_ms).then(a.path.cmp(&b.path)));
    hits.truncate(MAX_HUNT_HITS);
    let users = Users::load();
    out.hits = hits.iter().map(|h| hunt_hit(h, &users)).collect();
    out
}

fn hunt_hit(h: &Hit, users: &Users) -> HuntHit {
    let (md5, sha1, sha256) = h.digests.clone();
    HuntHit {
        kind: match h.kind {
            Kind::File => "file",
            Kind::Exec => "exec",
        }
        .into(),
        path: h.path.to_string_lossy().into_owned(),
        sha256: sha256.unwrap_or_default(),
        md5: md5.unwrap_or_default(),
        sha1: sha1.unwrap_or_default(),
        first_seen_ms: h.first_ms,
        last_seen_ms: h.last_ms,
        presence: h.presence() as i32,
        runs: h.runs,
        user: if h.kind == Kind::Exec {
            users.name(h.uid)
        } else {
            String::new()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::cache::Stamp;
    use std::path::Path;

    #[test]
    fn a_hunt_finds_files_and_runs_by_any_digest_and_says_what_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (h, _) = History::open(&dir.path().join("h"), 1 << 20).unwrap();
        let kept = dir.path().join("kept");
        std::fs::write(&kept, "x").unwrap();
        let meta = std::fs::metadata(&kept).unwrap();
        let stamp = Stamp::of(&meta);
        let report = vedette_engine::FileReport {
            size: 1,
            device: stamp.dev,
            inode: stamp.ino,
            mtime_ns: stamp.mtime_ns,
            ctime_ns: stamp.ctime_ns,
            md5: Some("11".repeat(16)),
            sha1: Some("22".repeat(20)),
            sha256: Some("33".repeat(32)),
            matches: Vec::new(),
        };
        h.file(&kept, &report);
        h.file(Path::new("/nonexistent/gone"), &report);
        h.exec(Path::new("/nonexistent/tool"), &"44".repeat(32), stamp, 0);
        h.exec(Path::new("/nonexistent/tool"), &"44".repeat(32), stamp, 0);
        let ask = |md5: &[&str], sha256: &[&str]| HuntRequest {
            id: "h".into(),
            md5: md5.iter().map(|s| s.to_string()).collect(),
            sha256: sha256.iter().map(|s| s.to_string()).collect(),
            expires_at_ms: i64::MAX,
            ..Default::default()
        };
        // By MD5, in upper case: both files.
        let a = answer(Some(&h), &ask(&[&"11".repeat(16).to_uppercase()], &[]));
        assert_eq!(a.hits_total, 2, "{a:?}");
        let kept_hit = a
            .hits
            .iter()
            .find(|x| x.path == kept.to_str().unwrap())
            .unwrap();
        assert_eq!(
            kept_hit.presence,
            vedette_proto::v1::Presence::Present as i32
        );
        let gone = a
            .hits
            .iter()
            .find(|x| x.path == "/nonexistent/gone")
            .unwrap();
        assert_eq!(gone.presence, vedette_proto::v1::Presence::Gone as i32);
        assert_eq!(gone.sha256, "33".repeat(32));
        // By SHA-256: the executable, its two runs, its user.
        let a = answer(Some(&h), &ask(&[], &[&"44".repeat(32), "not hex"]));
        assert_eq!(a.hits.len(), 1);
        assert_eq!((a.hits[0].kind.as_str(), a.hits[0].runs), ("exec", 2));
        assert_eq!(a.hits[0].user, "root");
        assert!(
            answer(Some(&h), &ask(&[], &[&"55".repeat(32)]))
                .hits
                .is_empty()
        );
        assert!(!answer(None, &ask(&[], &[])).error.is_empty());
    }
}
