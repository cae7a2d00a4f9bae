//! `vedettectl hunt`: start a hunt, list hunts, show one hunt's answers.

use std::path::Path;

use anyhow::Context;
use vedette_ops::output::{self, printable, rfc3339_ms};
use vedette_proto::v1::{GetHuntRequest, HuntInfo, ListHuntsRequest, StartHuntRequest};

use crate::args::{HuntAction, HuntCmd, HuntStart};
use crate::client::{CtlConfig, status_error};

pub async fn run(cmd: HuntCmd, cfg: &CtlConfig) -> anyhow::Result<()> {
    match cmd.action {
        None => start(cmd.start, cfg).await,
        Some(HuntAction::List { json }) => list(cfg, json).await,
        Some(HuntAction::Show { id, json }) => show(cfg, id, json).await,
    }
}

/// The digests of a list file (see [`vedette_ops::cli::digest_list`]).
fn read_list(path: &Path, req: &mut StartHuntRequest) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read `{}`", path.display()))?;
    let list = vedette_ops::cli::digest_list(&text)
        .map_err(|(line, why)| anyhow::anyhow!("{}:{line}: {why}", path.display()))?;
    req.sha256.extend(list.sha256);
    req.md5.extend(list.md5);
    req.sha1.extend(list.sha1);
    Ok(())
}

async fn start(s: HuntStart, cfg: &CtlConfig) -> anyhow::Result<()> {
    let mut req = StartHuntRequest {
        sha256: s.sha256,
        md5: s.md5,
        sha1: s.sha1,
        org: s.org.unwrap_or_default(),
        expires_secs: s.expires.map_or(0, |d| d.as_secs().max(1)),
    };
    if let Some(path) = &s.file {
        read_list(path, &mut req)?;
    }
    if req.sha256.is_empty() && req.md5.is_empty() && req.sha1.is_empty() {
        anyhow::bail!("nothing to hunt for: give --sha256, --md5, --sha1 or --file");
    }
    let mut c = cfg.client().await?;
    let h = c
        .start_hunt(req)
        .await
        .map_err(status_error)?
        .into_inner()
        .hunt
        .unwrap_or_default();
    println!("{}", h.id);
    eprintln!(
        "hunt {} started: {} digest(s) asked of {} agent(s), answered until {}\n  \
         follow it: vedettectl hunt show {}",
        h.id,
        h.sha256.len() + h.md5.len() + h.sha1.len(),
        h.asked,
        rfc3339_ms(h.expires_at_ms),
        h.id
    );
    Ok(())
}

async fn list(cfg: &CtlConfig, json: bool) -> anyhow::Result<()> {
    let mut c = cfg.client().await?;
    let hunts = c
        .list_hunts(ListHuntsRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .hunts;
    if json {
        for h in &hunts {
            println!("{}", output::hunt_json(h));
        }
        return Ok(());
    }
    println!(
        "{:<22} {:<24} {:<20} {:<12} {:>7} {:>9}  EXPIRES",
        "ID", "CREATED", "BY", "ORG", "DIGESTS", "ANSWERED"
    );
    for h in &hunts {
        println!(
            "{:<22} {:<24} {:<20} {:<12} {:>7} {:>9}  {}",
            h.id,
            rfc3339_ms(h.created_at_ms),
            printable(&h.created_by),
            if h.org.is_empty() { "(all)" } else { &h.org },
            digests(h),
            format!("{}/{}", h.answered, h.asked),
            rfc3339_ms(h.expires_at_ms)
        );
    }
    Ok(())
}

fn digests(h: &HuntInfo) -> usize {
    h.sha256.len() + h.md5.len() + h.sha1.len()
}

async fn show(cfg: &CtlConfig, id: String, json: bool) -> anyhow::Result<()> {
    let mut c = cfg.client().await?;
    let r = c
        .get_hunt(GetHuntRequest { id })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        println!("{}", output::hunt_detail_json(&r));
        return Ok(());
    }
    let h = r.hunt.clone().unwrap_or_default();
    let expired = h.expires_at_ms <= vedette_proto::now_ms();
    println!(
        "hunt {} by {}, {} digest(s); {} of {} agent(s) answered, {} hit(s); {} {}",
        h.id,
        printable(&h.created_by),
        digests(&h),
        h.answered,
        h.asked,
        h.hits,
        if expired { "expired" } else { "answered until" },
        rfc3339_ms(h.expires_at_ms)
    );
    for a in &r.agents {
        let who = format!("{} ({})", printable(&a.hostname), a.agent_id);
        let Some(answer) = a.answer.as_ref().filter(|_| a.answered_at_ms > 0) else {
            let state = if expired { "never answered" } else { "pending" };
            println!("{who}: {state}");
            continue;
        };
        if !answer.error.is_empty() {
            println!("{who}: could not answer: {}", printable(&answer.error));
            continue;
        }
        println!(
            "{who}: answered at {}, {} hit(s){}",
            rfc3339_ms(a.answered_at_ms),
            answer.hits_total,
            if answer.hits_total as usize > answer.hits.len() {
                format!(" (the {} most recent shown)", answer.hits.len())
            } else {
                String::new()
            }
        );
        for hit in &answer.hits {
            let ran = if hit.kind == "exec" {
                format!(", ran {} time(s) as {}", hit.runs, printable(&hit.user))
            } else {
                String::new()
            };
            println!(
                "  {:<4} {}  {}  seen {} to {}, {}{ran}",
                hit.kind,
                printable(&hit.path),
                hit.sha256,
                rfc3339_ms(hit.first_seen_ms),
                rfc3339_ms(hit.last_seen_ms),
                output::presence_name(hit.presence)
            );
        }
    }
    Ok(())
}
