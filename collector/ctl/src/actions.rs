//! `vedettectl actions`: request, approve, deny, undo and list response actions.

use vedette_ops::output::{action_json, printable, rfc3339_ms};
use vedette_proto::v1::{
    ActionInfo, DecideActionRequest, ListActionsRequest, RequestActionRequest, UndoActionRequest,
};

use crate::args::ActionsCmd;
use crate::client::{CtlConfig, status_error};

pub async fn run(cmd: ActionsCmd, cfg: &CtlConfig) -> anyhow::Result<()> {
    let mut c = cfg.client().await?;
    let done = match cmd {
        ActionsCmd::Request {
            kind,
            agent,
            pid,
            start,
            path,
            sha256,
            detection,
            expires,
            reason,
        } => {
            let req = RequestActionRequest {
                kind,
                agent_id: agent.unwrap_or_default(),
                pid: pid.unwrap_or(0),
                start_time: start.unwrap_or(0),
                path: path.unwrap_or_default(),
                sha256: sha256.unwrap_or_default(),
                detection_seq: detection.unwrap_or(0),
                expires_secs: expires.map_or(0, |d| d.as_secs().max(1)),
                reason,
            };
            c.request_action(req).await
        }
        ActionsCmd::Approve { id } => {
            c.decide_action(DecideActionRequest {
                id,
                approve: true,
                reason: String::new(),
            })
            .await
        }
        ActionsCmd::Deny { id, reason } => {
            c.decide_action(DecideActionRequest {
                id,
                approve: false,
                reason,
            })
            .await
        }
        ActionsCmd::Undo { id, reason } => c.undo_action(UndoActionRequest { id, reason }).await,
        ActionsCmd::List { agent, json } => {
            let list = c
                .list_actions(ListActionsRequest {
                    agent_id: agent.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .actions;
            print_list(&list, json);
            return Ok(());
        }
    };
    let a = done.map_err(status_error)?.into_inner();
    println!("{}", a.id);
    eprintln!("{}", summary(&a));
    if a.state == "pending" {
        eprintln!(
            "  waiting for a second operator until {}: vedettectl actions approve {}",
            rfc3339_ms(a.approve_by_ms),
            a.id
        );
    }
    Ok(())
}

/// One line about an action: its kind, agent, target and state.
fn summary(a: &ActionInfo) -> String {
    let target = match a.kind.as_str() {
        "kill" => format!(" pid {} (started {})", a.pid, a.start_time),
        "quarantine" | "restore" => format!(" {}", printable(&a.path)),
        _ => String::new(),
    };
    let undoes = if a.undoes.is_empty() {
        String::new()
    } else {
        format!(" (undoes {})", a.undoes)
    };
    format!(
        "{} {}{target} on {} ({}){undoes}: {}",
        a.id,
        a.kind,
        printable(&a.hostname),
        a.agent_id,
        a.state
    )
}

fn print_list(list: &[ActionInfo], json: bool) {
    if json {
        for a in list {
            println!("{}", action_json(a));
        }
        return;
    }
    if list.is_empty() {
        eprintln!("no actions");
        return;
    }
    for a in list {
        println!("{}", summary(a));
        let decided = if a.decided_by.is_empty() {
            String::new()
        } else {
            format!(", decided by {}", printable(&a.decided_by))
        };
        println!(
            "    requested by {} at {}{decided}: {}",
            printable(&a.requested_by),
            rfc3339_ms(a.requested_at_ms),
            printable(&a.reason)
        );
        if !a.detail.is_empty() {
            println!("    {}", printable(&a.detail));
        }
    }
}
