//! Benchmark: `vedettectl rules publish` → N connected agents all reporting the new version.
//!
//! Runs a real collector (the built binary) on 127.0.0.1 and N agent connections simulated in
//! this one process: each enrolls with its own key and certificate, holds its own mutual-TLS
//! stream, and on a pushed bundle checks the signature and the content as the agent does, then
//! reports it applied. (Simulated agents do not compile the rules: a real agent's compile time
//! depends on the rules, not on the fleet size, and happens on every agent in parallel.)
//!
//! ```text
//! cargo build --release --bins
//! target/release/bundle-fanout --agents 1000 --rounds 3
//! ```
//! Prints, per round: the publish command's own time, the time until every connection had
//! received the bundle, and the time until the collector had recorded all N reports.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vedette_engine::bundle::{self, PublicKey};
use vedette_ops::client::{ClientTls, connect};
use vedette_proto::v1::admin_service_client::AdminServiceClient;
use vedette_proto::v1::agent_message::Msg;
use vedette_proto::v1::collector_message::Msg as Down;
use vedette_proto::v1::{AgentMessage, BundleRolloutRequest, BundleStatus};
use vedette_tests::{Collector, agent_stream, bench_arg as arg, enroll_simulated};

#[tokio::main]
async fn main() {
    let agents = arg("--agents", 1000);
    let rounds = arg("--rounds", 3);
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let ca_pem = c.file("ca.crt");
    let trusted = PublicKey::parse_pem(&c.file("maintainer.pub")).expect("maintainer key");
    let token = c.token(&["--uses", &agents.to_string()]);

    let t = Instant::now();
    let identities = enroll_simulated(&c, &token, agents)
        .await
        .into_iter()
        .map(|(_, tls)| tls)
        .collect::<Vec<_>>();
    println!("enrolled {agents} agents in {:.2?}", t.elapsed());

    // Received[v] counts connections that got bundle version v.
    let received: Arc<Vec<AtomicUsize>> =
        Arc::new((0..=rounds + 1).map(|_| AtomicUsize::new(0)).collect());
    let mut keep = Vec::new();
    for tls in identities {
        let (addr, trusted, received) = (c.addr.clone(), trusted.clone(), received.clone());
        let (up, mut down) = agent_stream(&addr, &tls).await.expect("agent stream");
        keep.push(tokio::spawn(async move {
            while let Ok(Some(m)) = down.message().await {
                let Some(Down::Bundle(b)) = m.msg else {
                    continue;
                };
                let ok = bundle::verify(&b.content, &b.signature, &b.signer_key, &trusted, false)
                    .is_ok()
                    && bundle::decode(&b.content).is_ok_and(|c| c.version == b.version);
                if let Some(n) = received.get(b.version as usize) {
                    n.fetch_add(1, Ordering::Relaxed);
                }
                let status = BundleStatus {
                    version: b.version,
                    applied: ok,
                    error: if ok {
                        String::new()
                    } else {
                        "bad bundle".into()
                    },
                };
                if up
                    .send(AgentMessage {
                        msg: Some(Msg::BundleStatus(status)),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }));
    }
    let connected = || c.agents().iter().filter(|a| a["connected"] == true).count();
    let deadline = Instant::now() + Duration::from_secs(120);
    while connected() < agents {
        assert!(Instant::now() < deadline, "agents did not all connect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("{agents} agent streams open");

    let operator = ClientTls {
        ca_pem: ca_pem.clone(),
        identity: Some((c.file("operator.crt"), c.file("operator.key"))),
    };
    let mut admin = AdminServiceClient::new(connect(&c.addr, &operator).await.expect("admin"));
    println!("round  publish-cmd  all-received  all-recorded");
    for round in 1..=rounds {
        let dir = tmp.path().join(format!("rules{round}"));
        std::fs::create_dir_all(&dir).expect("rules dir");
        std::fs::write(
            dir.join("fanout.yar"),
            format!(
                "rule fanout_{round} {{ strings: $a = \"VEDETTE-FANOUT-{round}\" condition: $a }}\n"
            ),
        )
        .expect("rule file");
        let t0 = Instant::now();
        let ctl = c.ctl_config();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(vedette_tests::bin("vedettectl"))
                .arg("--config")
                .arg(ctl)
                .args(["rules", "publish"])
                .arg(&dir)
                .output()
                .expect("vedettectl")
        })
        .await
        .expect("publish task");
        let cmd = t0.elapsed();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut all_received = None;
        loop {
            if all_received.is_none() && received[round].load(Ordering::Relaxed) >= agents {
                all_received = Some(t0.elapsed());
            }
            let r = admin
                .bundle_rollout(BundleRolloutRequest {
                    version: round as u64,
                })
                .await
                .expect("rollout")
                .into_inner();
            if r.on_version as usize >= agents {
                let recorded = t0.elapsed();
                println!(
                    "{round:>5}  {:>10.3}s  {:>11.3}s  {:>11.3}s",
                    cmd.as_secs_f64(),
                    all_received.unwrap_or(recorded).as_secs_f64(),
                    recorded.as_secs_f64()
                );
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "round {round} did not finish"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for k in keep {
        k.abort();
    }
}
