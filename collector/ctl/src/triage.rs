//! `alerts` and `exceptions`: triage from the command line.

use serde_json::json;
use vedette_ops::output::{alert_json, exception_json, rfc3339_ms, stored_json, verdict_json};
use vedette_proto::v1::{
    AddExceptionRequest, Alert, ExceptionInfo, GetAlertRequest, ListAlertsRequest,
    ListExceptionsRequest, RemoveExceptionRequest, SetAlertStatusRequest, Verdict,
};

use crate::args::{AlertsCmd, ExceptionsCmd};
use crate::client::{CtlConfig, status_error};
use crate::commands::{cut, print_detections, resolve_agent};

fn status_text(a: &Alert) -> String {
    match a.new_activity {
        true => format!("{} (new)", a.status),
        false => a.status.clone(),
    }
}

fn print_alerts(list: &[Alert]) {
    println!(
        "{:>6}  {:<18} {:<16} {:>5} {:>7}  {:<20}  {:<40}  SUBJECT",
        "ID", "STATUS", "ORG", "HOSTS", "DETECT", "LAST SEEN", "RULE"
    );
    for a in list {
        println!(
            "{:>6}  {:<18} {:<16} {:>5} {:>7}  {:<20}  {:<40}  {}",
            a.id,
            status_text(a),
            cut(&a.org, 16),
            a.hosts,
            a.detections,
            &rfc3339_ms(a.last_seen_ms)[..19.min(rfc3339_ms(a.last_seen_ms).len())],
            cut(&a.rule, 40),
            cut(&a.subject, 80),
        );
    }
    if list.is_empty() {
        println!("(no alerts match)");
    }
}

pub async fn alerts(cmd: AlertsCmd, cfg: &CtlConfig) -> anyhow::Result<()> {
    match cmd {
        AlertsCmd::List {
            status,
            org,
            limit,
            json,
        } => {
            let list = list_alerts(cfg, status, org, limit).await?;
            if json {
                for a in &list {
                    println!("{}", alert_json(a));
                }
            } else {
                print_alerts(&list);
            }
        }
        AlertsCmd::Show {
            id,
            detections,
            json,
        } => show_alert(cfg, id, detections, json).await?,
        AlertsCmd::Set {
            id,
            status,
            note,
            except,
            expires,
        } => {
            let mut c = cfg.client().await?;
            let r = c
                .set_alert_status(SetAlertStatusRequest {
                    id,
                    status,
                    note,
                    except,
                    except_ttl_seconds: expires.map_or(0, |d| d.as_secs().max(1)),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let a = r.alert.unwrap_or_default();
            println!("alert {} is now {}", a.id, a.status);
            if let Some(e) = r.exception {
                println!(
                    "exception {} added: detections of {} on {} in {} are suppressed from now on; \
                     agents drop them once the next bundle is published (rules publish or intel \
                     publish)",
                    e.id,
                    e.rule,
                    if e.sha256.is_empty() {
                        &e.path
                    } else {
                        &e.sha256
                    },
                    e.org
                );
            }
        }
    }
    Ok(())
}

async fn show_alert(cfg: &CtlConfig, id: u64, detections: u32, json: bool) -> anyhow::Result<()> {
    let mut c = cfg.client().await?;
    let r = c
        .get_alert(GetAlertRequest { id, detections })
        .await
        .map_err(status_error)?
        .into_inner();
    let alert = r.alert.unwrap_or_default();
    if json {
        let v = json!({
            "alert": alert_json(&alert),
            "verdicts": r.verdicts.iter().map(verdict_json).collect::<Vec<_>>(),
            "detections": r.detections.iter().map(stored_json).collect::<Vec<_>>(),
        });
        println!("{v}");
        return Ok(());
    }
    print_alert(&alert, &r.verdicts);
    println!();
    let mut oldest_first = r.detections;
    oldest_first.reverse();
    print_detections(&oldest_first);
    Ok(())
}

fn print_alert(a: &Alert, verdicts: &[Verdict]) {
    println!("alert {}: {}", a.id, status_text(a));
    println!("  organisation  {}", a.org);
    println!("  rule          {}", a.rule);
    println!("  subject       {}", a.subject);
    println!("  kind          {}", vedette_proto::kind_name(a.kind));
    println!("  score         {}", a.score);
    println!("  hosts         {}", a.hosts);
    println!("  detections    {}", a.detections);
    println!("  first seen    {}", rfc3339_ms(a.first_seen_ms));
    println!("  last seen     {}", rfc3339_ms(a.last_seen_ms));
    println!();
    if verdicts.is_empty() {
        println!("no verdict yet");
    }
    for v in verdicts {
        let ex = match v.exception_id.as_str() {
            "" => String::new(),
            id => format!(" [exception {id}]"),
        };
        println!(
            "{}  {:<16} by {}{ex}: {}",
            rfc3339_ms(v.at_ms),
            v.status,
            v.actor,
            cut(&v.note, 200)
        );
    }
}

async fn list_alerts(
    cfg: &CtlConfig,
    status: Option<String>,
    org: Option<String>,
    limit: usize,
) -> anyhow::Result<Vec<Alert>> {
    let mut c = cfg.client().await?;
    let mut out = Vec::new();
    let mut before_seq = 0;
    while out.len() < limit {
        let r = c
            .list_alerts(ListAlertsRequest {
                status: status.clone().unwrap_or_default(),
                org: org.clone().unwrap_or_default(),
                limit: (limit - out.len()).min(1_000) as u32,
                before_seq,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        out.extend(r.alerts);
        if r.next_before_seq == 0 {
            break;
        }
        before_seq = r.next_before_seq;
    }
    out.truncate(limit);
    Ok(out)
}

pub async fn exceptions(cmd: ExceptionsCmd, cfg: &CtlConfig) -> anyhow::Result<()> {
    let mut c = cfg.client().await?;
    match cmd {
        ExceptionsCmd::Add {
            rule,
            indicator,
            sha256,
            path,
            org,
            agent,
            expires,
            reason,
        } => {
            let agent = resolve_agent(cfg, agent).await?;
            let r = c
                .add_exception(AddExceptionRequest {
                    rule: rule.unwrap_or_default(),
                    indicator: indicator.unwrap_or_default(),
                    sha256: sha256.unwrap_or_default(),
                    path: path.unwrap_or_default(),
                    org: org.unwrap_or_default(),
                    agent,
                    ttl_seconds: expires.map_or(0, |d| d.as_secs().max(1)),
                    reason,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let e = r.exception.unwrap_or_default();
            println!(
                "exception {} added: the collector suppresses what it covers from now on; agents \
                 do once the next bundle is published (rules publish or intel publish)",
                e.id
            );
        }
        ExceptionsCmd::List { all, json } => {
            let list = c
                .list_exceptions(ListExceptionsRequest { all })
                .await
                .map_err(status_error)?
                .into_inner()
                .exceptions;
            if json {
                for e in &list {
                    println!("{}", exception_json(e));
                }
            } else {
                print_exceptions(&list);
            }
        }
        ExceptionsCmd::Remove { id } => {
            let r = c
                .remove_exception(RemoveExceptionRequest { id })
                .await
                .map_err(status_error)?
                .into_inner();
            let e = r.exception.unwrap_or_default();
            println!(
                "exception {} removed: what it covered is reported again (by agents once the \
                 next bundle is published)",
                e.id
            );
        }
    }
    Ok(())
}

fn print_exceptions(list: &[ExceptionInfo]) {
    println!(
        "{:<15}  {:<30} {:<16} {:<20}  {:<24}  REASON",
        "ID", "RULE / INDICATOR", "ORG", "EXPIRES", "COVERS"
    );
    for e in list {
        let named = if e.rule.is_empty() {
            &e.indicator
        } else {
            &e.rule
        };
        let mut covers = Vec::new();
        if !e.sha256.is_empty() {
            covers.push(format!("sha256 {}…", &e.sha256[..12.min(e.sha256.len())]));
        }
        if !e.path.is_empty() {
            covers.push(format!("path {}", e.path));
        }
        if !e.agent.is_empty() {
            covers.push(format!("agent {}", e.agent));
        }
        let expires = match (e.removed_at_ms, e.expires_at_ms) {
            (r, _) if r != 0 => "removed".to_string(),
            (_, 0) => "never".to_string(),
            (_, ms) => rfc3339_ms(ms)[..19.min(rfc3339_ms(ms).len())].to_string(),
        };
        println!(
            "{:<15}  {:<30} {:<16} {:<20}  {:<24}  {}",
            e.id,
            cut(named, 30),
            if e.org.is_empty() { "(all)" } else { &e.org },
            expires,
            cut(&covers.join(", "), 60),
            cut(&e.reason, 60)
        );
    }
    if list.is_empty() {
        println!("(no exceptions)");
    }
}

/// The false-positive verdicts on alerts of outside indicators (STIX or MISP), given at or
/// after `since`: what `export stix` turns into opinions.
pub async fn false_positives(
    cfg: &CtlConfig,
    since: Option<std::time::SystemTime>,
) -> anyhow::Result<Vec<vedette_share::sharing::FalsePositive>> {
    let since_ms = crate::client::epoch_ms(since);
    let alerts = list_alerts(cfg, Some("false-positive".into()), None, 10_000).await?;
    let mut c = cfg.client().await?;
    let mut out = Vec::new();
    for a in alerts {
        let r = c
            .get_alert(GetAlertRequest {
                id: a.id,
                detections: 1,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let indicator = r
            .detections
            .first()
            .and_then(|s| s.detection.as_ref())
            .and_then(|d| d.indicator.clone());
        let Some(ind) = indicator.filter(|i| matches!(i.source.as_str(), "stix" | "misp")) else {
            continue;
        };
        let judged = r
            .verdicts
            .iter()
            .filter(|v| v.status == "false-positive" && v.at_ms >= since_ms);
        for v in judged {
            out.push(vedette_share::sharing::FalsePositive {
                source: ind.source.clone(),
                indicator: ind.id.clone(),
                org: a.org.clone(),
                verdict: v.seq,
                at_ms: v.at_ms,
            });
        }
    }
    Ok(out)
}
