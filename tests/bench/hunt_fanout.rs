//! Benchmark: `vedettectl hunt` → N connected agents all answered and recorded.
//!
//! Runs a real collector (the built binary) on 127.0.0.1 and N agent connections simulated in
//! this one process, as `bundle-fanout` does: each enrolls with its own key and certificate and
//! holds its own mutual-TLS stream; on a hunt it answers at once with one hit. (A real agent's
//! answer costs one pass over its own history, in parallel on every host: see `retro-hunt`.)
//! Each round also publishes a bundle to the same fleet, the peer operation on the same
//! streams, so the two are compared in the same run.
//!
//! ```text
//! cargo build --release --bins
//! target/release/hunt-fanout --agents 1000 --rounds 3
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vedette_ops::client::{ClientTls, connect};
use vedette_proto::v1::admin_service_client::AdminServiceClient;
use vedette_proto::v1::agent_message::Msg;
use vedette_proto::v1::collector_message::Msg as Down;
use vedette_proto::v1::{
    AgentMessage, BundleRolloutRequest, BundleStatus, GetHuntRequest, HuntAnswer, HuntHit,
};
use vedette_tests::{Collector, agent_stream, bench_arg as arg, enroll_simulated};

/// One simulated agent: answers each hunt with one hit, reports each bundle applied.
async fn simulate(
    up: tokio::sync::mpsc::Sender<AgentMessage>,
    mut down: tonic::Streaming<vedette_proto::v1::CollectorMessage>,
    hunts: Arc<AtomicUsize>,
) {
    while let Ok(Some(m)) = down.message().await {
        let msg = match m.msg {
            Some(Down::Hunt(h)) => {
                hunts.fetch_add(1, Ordering::Relaxed);
                Msg::HuntAnswer(HuntAnswer {
                    id: h.id,
                    hits: vec![HuntHit {
                        kind: "file".into(),
                        path: "/srv/www/uploads/invoice.pdf.exe".into(),
                        sha256: h.sha256.first().cloned().unwrap_or_default(),
                        first_seen_ms: 1,
                        last_seen_ms: 2,
                        presence: 1,
                        ..Default::default()
                    }],
                    hits_total: 1,
                    hits_cap: 1000,
                    records: 100_000,
                    error: String::new(),
                })
            }
            Some(Down::Bundle(b)) => Msg::BundleStatus(BundleStatus {
                version: b.version,
                applied: true,
                error: String::new(),
            }),
            _ => continue,
        };
        if up.send(AgentMessage { msg: Some(msg) }).await.is_err() {
            return;
        }
    }
}

fn ctl(c: &Collector, args: Vec<String>) -> std::process::Output {
    std::process::Command::new(vedette_tests::bin("vedettectl"))
        .arg("--config")
        .arg(c.ctl_config())
        .args(args)
        .output()
        .expect("vedettectl")
}

#[tokio::main]
async fn main() {
    let agents = arg("--agents", 1000);
    let rounds = arg("--rounds", 3);
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let token = c.token(&["--uses", &agents.to_string()]);
    let t = Instant::now();
    let identities = enroll_simulated(&c, &token, agents).await;
    println!("enrolled {agents} agents in {:.2?}", t.elapsed());
    let hunts = Arc::new(AtomicUsize::new(0));
    let mut keep = Vec::new();
    for (_, tls) in identities {
        let (up, down) = agent_stream(&c.addr, &tls).await.expect("agent stream");
        keep.push(tokio::spawn(simulate(up, down, hunts.clone())));
    }
    let connected = || c.agents().iter().filter(|a| a["connected"] == true).count();
    let deadline = Instant::now() + Duration::from_secs(120);
    while connected() < agents {
        assert!(Instant::now() < deadline, "agents did not all connect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("{agents} agent streams open");
    let operator = ClientTls {
        ca_pem: c.file("ca.crt"),
        identity: Some((c.file("operator.crt"), c.file("operator.key"))),
    };
    let mut admin = AdminServiceClient::new(connect(&c.addr, &operator).await.expect("admin"));
    println!("round  hunt-cmd  all-received  all-recorded  |  bundle: all-recorded  ratio");
    for round in 1..=rounds {
        let sha = format!("{round:064x}");
        let before = hunts.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let out = {
            let c = &c;
            tokio::task::block_in_place(|| ctl(c, vec!["hunt".into(), "--sha256".into(), sha]))
        };
        let cmd = t0.elapsed();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let mut received = None;
        let recorded = loop {
            if received.is_none() && hunts.load(Ordering::Relaxed) - before >= agents {
                received = Some(t0.elapsed());
            }
            let h = admin
                .get_hunt(GetHuntRequest { id: id.clone() })
                .await
                .expect("hunt")
                .into_inner();
            if h.hunt.is_some_and(|h| h.answered as usize >= agents) {
                break t0.elapsed();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "round {round} did not finish"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        // The peer operation on the same fleet: a bundle to every agent, all reports recorded.
        let dir = tmp.path().join(format!("rules{round}"));
        std::fs::create_dir_all(&dir).expect("rules dir");
        std::fs::write(
            dir.join("fanout.yar"),
            format!("rule fanout_{round} {{ strings: $a = \"VEDETTE-{round}\" condition: $a }}\n"),
        )
        .expect("rule file");
        let t1 = Instant::now();
        let out = {
            let c = &c;
            let dir = dir.to_string_lossy().into_owned();
            tokio::task::block_in_place(|| ctl(c, vec!["rules".into(), "publish".into(), dir]))
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bundle = loop {
            let r = admin
                .bundle_rollout(BundleRolloutRequest {
                    version: round as u64,
                })
                .await
                .expect("rollout")
                .into_inner();
            if r.on_version as usize >= agents {
                break t1.elapsed();
            }
            assert!(
                t1.elapsed() < Duration::from_secs(120),
                "bundle {round} did not finish"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        println!(
            "{round:>5}  {:>7.3}s  {:>11.3}s  {:>11.3}s  |  {:>20.3}s  {:>5.2}",
            cmd.as_secs_f64(),
            received.unwrap_or(recorded).as_secs_f64(),
            recorded.as_secs_f64(),
            bundle.as_secs_f64(),
            recorded.as_secs_f64() / bundle.as_secs_f64()
        );
    }
    for k in keep {
        k.abort();
    }
}
