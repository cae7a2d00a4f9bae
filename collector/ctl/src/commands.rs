//! Running each `vedettectl` command and printing its result.

use std::collections::HashMap;

use vedette_ops::output::{self, printable, rfc3339_ms, stored_json};

use vedette_proto::v1::{
    AgentInfo, CreateOrgRequest, ListDetectionsRequest, Org, SetOrgRequest, StoredDetection,
};
use vedette_share::sharing::{self, Sharing};
use vedette_share::{ecs, misp, stix};

use crate::args::{
    AgentsCmd, AuditCmd, CertsCmd, Command, DetectionListArgs, DetectionsCmd, ExportFormat,
    IntelCmd, OrgsCmd, RulesCmd, SignArgs, TokenCmd,
};
use crate::client::{self, CtlConfig};
use crate::rules::{self, PublishOptions};

pub async fn run(command: Command, cfg: CtlConfig) -> anyhow::Result<()> {
    match command {
        Command::Token(cmd) => token(cmd, &cfg).await?,
        Command::Audit(AuditCmd::List { since, limit, json }) => {
            let entries = client::audit_list(&cfg, since, limit).await?;
            if json {
                for e in &entries {
                    println!("{}", output::audit_json(e));
                }
            } else {
                print_audit(&entries);
            }
        }
        Command::Orgs(cmd) => orgs(cmd, &cfg).await?,
        Command::Alerts(cmd) => crate::triage::alerts(cmd, &cfg).await?,
        Command::Exceptions(cmd) => crate::triage::exceptions(cmd, &cfg).await?,
        Command::Hunt(cmd) => crate::hunt::run(cmd, &cfg).await?,
        Command::Actions(cmd) => crate::actions::run(cmd, &cfg).await?,
        Command::Agents(cmd) => agents(cmd, &cfg).await?,
        Command::Certs(cmd) => certs(cmd, &cfg).await?,
        Command::Keys(_) => {}
        Command::Rules(cmd) => rules(cmd, &cfg).await?,
        Command::Intel(cmd) => intel(cmd, &cfg).await?,
        Command::Export {
            format,
            since,
            agent,
            org,
            limit,
            organisation,
            unfiltered,
            window,
        } => {
            let filter = ListDetectionsRequest {
                agent_id: resolve_agent(&cfg, agent).await?,
                org: org.unwrap_or_default(),
                since_ms: client::epoch_ms(since),
                unfiltered_export: unfiltered,
                ..Default::default()
            };
            let list = client::detections_list(&cfg, filter, limit).await?;
            let producer = organisation
                .or_else(|| cfg.organisation.clone())
                .unwrap_or_else(|| "Vedette".into());
            if unfiltered {
                export(format, &list, &producer);
            } else {
                let policies: HashMap<String, Sharing> = client::orgs_list(&cfg)
                    .await?
                    .iter()
                    .map(|o| (o.name.clone(), Sharing::of_org(o, &producer)))
                    .collect();
                let window_ms = window.as_millis() as i64;
                let policy = |org: &str| policies.get(org).cloned();
                let judged = match format {
                    ExportFormat::Stix => crate::triage::false_positives(&cfg, since).await?,
                    _ => Vec::new(),
                };
                shared_export(format, &list, &policy, (&producer, window_ms, &judged));
            }
        }
        Command::Detections(cmd) => detections(cmd, &cfg).await?,
    }
    Ok(())
}

/// `vedettectl export`: the detections in `format`, as made by `producer`.
fn export(format: ExportFormat, list: &[StoredDetection], producer: &str) {
    match format {
        ExportFormat::Stix => println!("{}", stix::bundle(list, producer)),
        ExportFormat::Misp => {
            println!("{}", misp::event(list, producer, vedette_proto::now_ms()));
        }
        ExportFormat::Ecs => {
            for d in list {
                println!("{}", ecs::document(d));
            }
        }
    }
}

/// `vedettectl export` under each organisation's policy (`policy` gives it by name; one
/// without a policy shares nothing), as the collector's sinks write it.
fn shared_export(
    format: ExportFormat,
    list: &[StoredDetection],
    policy: &dyn Fn(&str) -> Option<Sharing>,
    (producer, window_ms, judged): (&str, i64, &[sharing::FalsePositive]),
) {
    match format {
        ExportFormat::Stix => {
            let now = vedette_proto::now_ms();
            let mut objects = sharing::stix_objects(list, policy, producer, window_ms, now);
            // False-positive verdicts on STIX indicators, as opinions (identities and markings
            // already there are not repeated).
            for o in sharing::opinion_objects(judged, policy, producer) {
                if !objects.iter().any(|x| x["id"] == o["id"]) {
                    objects.push(o);
                }
            }
            println!("{}", stix::bundle_of(objects));
        }
        ExportFormat::Misp => {
            let shared = sharing::shared_detections(list, policy);
            println!(
                "{}",
                misp::event(&shared, producer, vedette_proto::now_ms())
            );
        }
        ExportFormat::Ecs => {
            for d in list {
                if let Some(v) = policy(&d.org).and_then(|p| sharing::ecs_document(d, &p)) {
                    println!("{v}");
                }
            }
        }
    }
}

async fn detections(cmd: DetectionsCmd, cfg: &CtlConfig) -> anyhow::Result<()> {
    let (filter, json, limit) = match cmd {
        DetectionsCmd::Hosts {
            sha256,
            org,
            json,
            limit,
        } => return hosts(cfg, sha256, org, json, limit).await,
        DetectionsCmd::List(args) => {
            let DetectionListArgs {
                json,
                agent,
                host,
                label,
                org,
                since,
                until,
                kind,
                rule,
                text,
                sha256,
                md5,
                suppressed,
                limit,
            } = *args;
            (
                ListDetectionsRequest {
                    agent_id: resolve_agent(cfg, agent).await?,
                    host: host.unwrap_or_default(),
                    label: label.unwrap_or_default(),
                    md5: md5.unwrap_or_default(),
                    org: org.unwrap_or_default(),
                    since_ms: client::epoch_ms(since),
                    until_ms: client::epoch_ms(until),
                    kind: kind
                        .as_deref()
                        .and_then(vedette_proto::kind_from_name)
                        .unwrap_or(0),
                    rule: rule.unwrap_or_default(),
                    text: text.unwrap_or_default(),
                    sha256: sha256.unwrap_or_default(),
                    suppressed,
                    ..Default::default()
                },
                json,
                limit,
            )
        }
    };
    let list = client::detections_list(cfg, filter, limit).await?;
    if json {
        for d in &list {
            println!("{}", stored_json(d));
        }
    } else {
        print_detections(&list);
    }
    Ok(())
}

/// Longest rule or target shown in a `detections list` row; `--json` has them whole.
const CELL: usize = 60;

/// `text` on one line, cut to `max` characters with `…`.
pub(crate) fn cut(text: &str, max: usize) -> String {
    let text = printable(text);
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max - 1).collect();
    out.push('…');
    out
}

/// `detections list` as a table: a hash indicator by its list's comment (what the sample is),
/// not the bare digest; long command lines and paths cut.
pub(crate) fn print_detections(list: &[vedette_proto::v1::StoredDetection]) {
    println!(
        "{:<24}  {:<16} {:<20} {:<10} {:>5}  {:<CELL$}  TARGET",
        "RECEIVED", "ORG", "HOST", "KIND", "SCORE", "RULE"
    );
    for s in list {
        let d = s.detection.clone().unwrap_or_default();
        let rule = if d.kind == vedette_proto::v1::DetectionKind::Hash as i32
            && !d.description.is_empty()
        {
            format!("{} ({})", d.description, d.rule)
        } else {
            d.rule.clone()
        };
        let blocked = if d.action == vedette_proto::v1::DetectionAction::Blocked as i32 {
            "BLOCKED "
        } else {
            ""
        };
        println!(
            "{:<24}  {:<16} {:<20} {:<10} {:>5}  {:<CELL$}  {blocked}{}",
            rfc3339_ms(s.received_at_ms),
            cut(&s.org, 16),
            cut(&s.hostname, 20),
            vedette_proto::kind_name(d.kind),
            d.score,
            cut(&rule, CELL),
            cut(&output::target_text(&d), 2 * CELL),
        );
    }
    if list.is_empty() {
        println!("(no detections match)");
    }
}

/// The agent `--agent` names: its id, a unique start of it, or its host name ("" for none).
/// One that matches no agent, or several, is an error that says which.
pub(crate) async fn resolve_agent(
    cfg: &CtlConfig,
    given: Option<String>,
) -> anyhow::Result<String> {
    let Some(given) = given
        .map(|g| g.trim().to_string())
        .filter(|g| !g.is_empty())
    else {
        return Ok(String::new());
    };
    let agents = client::agents_list(cfg, None, true, None).await?;
    if agents.iter().any(|a| a.id == given) {
        return Ok(given);
    }
    let mut found: Vec<_> = agents
        .iter()
        .filter(|a| a.id.starts_with(&given) || a.hostname == given)
        .collect();
    found.dedup_by(|a, b| a.id == b.id);
    match found.as_slice() {
        [one] => Ok(one.id.clone()),
        [] => anyhow::bail!(
            "no agent is `{given}`: give its id, a unique start of it, or its host name (see \
             `vedettectl agents list`)"
        ),
        many => {
            let names: Vec<String> = many
                .iter()
                .map(|a| format!("{} ({})", a.id, a.hostname))
                .collect();
            anyhow::bail!(
                "`{given}` names {} agents: {}; give more of the id",
                many.len(),
                names.join(", ")
            )
        }
    }
}

/// One host's sightings of a file: `detections hosts`.
struct Sightings {
    hostname: String,
    org: String,
    count: u64,
    first_ms: i64,
    last_ms: i64,
}

/// `detections hosts --sha256 H`: the detections of that file, folded by agent.
async fn hosts(
    cfg: &CtlConfig,
    sha256: String,
    org: Option<String>,
    json: bool,
    limit: usize,
) -> anyhow::Result<()> {
    let filter = ListDetectionsRequest {
        sha256: sha256.clone(),
        org: org.unwrap_or_default(),
        ..Default::default()
    };
    let list = client::detections_list(cfg, filter, limit).await?;
    let mut by_agent: std::collections::BTreeMap<String, Sightings> = Default::default();
    for d in &list {
        let at = d
            .detection
            .as_ref()
            .map_or(d.received_at_ms, |x| x.observed_at_ms);
        let s = by_agent.entry(d.agent_id.clone()).or_insert(Sightings {
            hostname: d.hostname.clone(),
            org: d.org.clone(),
            count: 0,
            first_ms: at,
            last_ms: at,
        });
        s.count += 1;
        s.first_ms = s.first_ms.min(at);
        s.last_ms = s.last_ms.max(at);
    }
    for (agent, s) in &by_agent {
        let (first, last) = (
            output::rfc3339_ms(s.first_ms),
            output::rfc3339_ms(s.last_ms),
        );
        if json {
            let v = serde_json::json!({
                "agent_id": agent, "hostname": s.hostname, "org": s.org, "sha256": sha256,
                "detections": s.count, "first_seen": first, "last_seen": last,
            });
            println!("{v}");
        } else {
            println!(
                "{}\t{agent}\t{}\t{first}\t{last}\t{} detection(s)",
                s.hostname, s.org, s.count
            );
        }
    }
    if by_agent.is_empty() && !json {
        eprintln!("no host saw {sha256} (within what you may see)");
    }
    Ok(())
}

async fn agents(cmd: AgentsCmd, cfg: &CtlConfig) -> anyhow::Result<()> {
    match cmd {
        AgentsCmd::Label { agent, add, remove } => {
            if add.is_empty() && remove.is_empty() {
                anyhow::bail!("nothing to change: give --add LABEL or --remove LABEL");
            }
            let id = resolve_agent(cfg, Some(agent)).await?;
            let labels = client::agents_label(cfg, &id, add, remove).await?;
            println!(
                "{id}: labels {}",
                if labels.is_empty() {
                    "(none)".to_string()
                } else {
                    labels.join(", ")
                }
            );
        }
        AgentsCmd::List {
            json,
            org,
            removed,
            label,
        } => {
            let agents = client::agents_list(cfg, org, removed, label).await?;
            if json {
                for a in &agents {
                    println!("{}", output::agent_json(a));
                }
            } else {
                print_agents(&agents);
            }
        }
        AgentsCmd::Revoke { id } => {
            let disconnected = client::agents_revoke(cfg, &id).await?;
            if disconnected {
                println!("revoked {id}; its open stream was closed");
            } else {
                println!("revoked {id}");
            }
        }
        AgentsCmd::Remove { id } => {
            let disconnected = client::agents_remove(cfg, &id).await?;
            let closed = if disconnected {
                "; its open stream was closed"
            } else {
                ""
            };
            println!(
                "removed {id} (revoked, listed only with `agents list --removed`; its detections are kept){closed}"
            );
        }
    }
    Ok(())
}

/// `agents list` as a table.
fn print_agents(agents: &[AgentInfo]) {
    println!(
        "{:<36}  {:<16} {:<20} {:<12} {:<24} {:>6} {:<24} {:>8}  VERSION",
        "ID", "ORG", "HOSTNAME", "STATE", "LAST SEEN", "BUNDLE", "APPLIED", "DROPPED"
    );
    for a in agents {
        let bundle = if a.bundle_failed_version > a.bundle_version {
            format!("{}!", a.bundle_version)
        } else {
            a.bundle_version.to_string()
        };
        println!(
            "{:<36}  {:<16} {:<20} {:<12} {:<24} {:>6} {:<24} {:>8}  {}",
            a.id,
            printable(&a.org),
            printable(&a.hostname),
            output::agent_state(a),
            rfc3339_ms(a.last_seen_ms),
            bundle,
            rfc3339_ms(a.bundle_applied_at_ms),
            a.dropped_total,
            printable(&a.agent_version)
        );
    }
    if agents
        .iter()
        .any(|a| a.bundle_failed_version > a.bundle_version)
    {
        println!("! a newer bundle failed to apply: see `vedettectl rules status`");
    }
    for a in agents {
        if let Some(skew) = output::clock_skew(a) {
            println!(
                "! {} ({}): {skew} of the collector's; detections keep the agent's time as \
                 observed_at and the collector's as received_at",
                printable(&a.hostname),
                a.id
            );
        }
    }
}

async fn certs(cmd: CertsCmd, cfg: &CtlConfig) -> anyhow::Result<()> {
    match cmd {
        CertsCmd::List { json } => {
            let certs = client::certs_list(cfg).await?;
            if json {
                for c in &certs {
                    println!("{}", client::cert_json(c));
                }
                return Ok(());
            }
            println!(
                "{:<32}  {:<6}  {:<36}  {:<20}  {:<24}  REVOKED",
                "SERIAL", "KIND", "SUBJECT", "ROLES", "EXPIRES"
            );
            for c in &certs {
                println!(
                    "{:<32}  {:<6}  {:<36}  {:<20}  {:<24}  {}",
                    c.serial,
                    printable(&c.kind),
                    printable(&c.subject),
                    printable(&c.roles.join(",")),
                    rfc3339_ms(c.not_after_ms),
                    if c.revoked_at_ms == 0 {
                        "-".to_string()
                    } else {
                        rfc3339_ms(c.revoked_at_ms)
                    }
                );
            }
        }
        CertsCmd::Revoke { serial, cert } => {
            let serial = match (serial, cert) {
                (Some(s), _) => s,
                (None, Some(path)) => client::serial_of_file(&path)?,
                (None, None) => anyhow::bail!("give a serial number or --cert FILE"),
            };
            let (newly, info) = client::certs_revoke(cfg, &serial).await?;
            let who = if info.subject.is_empty() {
                String::from("a certificate this collector never saw")
            } else {
                format!("{} `{}`", info.kind, printable(&info.subject))
            };
            if newly {
                println!("revoked {} ({who})", info.serial);
            } else {
                println!("{} ({who}) was revoked already", info.serial);
            }
        }
    }
    Ok(())
}

/// One organisation, on one line.
fn show_org(o: &Org) {
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    println!(
        "{}: share {}, TLP:{}, sector {}, country {}, response approval {}, STIX {}",
        printable(&o.name),
        o.share,
        o.tlp.to_uppercase(),
        or_dash(&o.sector),
        or_dash(&o.country),
        o.response_approval,
        o.stix_id
    );
}

async fn token(cmd: TokenCmd, cfg: &CtlConfig) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create { ttl, uses, org } => {
            println!("{}", client::token_create(cfg, ttl, uses, org).await?);
        }
        TokenCmd::List { all, json } => {
            let tokens = client::tokens_list(cfg, all).await?;
            if json {
                for t in &tokens {
                    println!("{}", output::token_json(t));
                }
                return Ok(());
            }
            println!(
                "{:<16}  {:<16} {:>9}  {:<24} {:<24} CREATED BY",
                "ID", "ORG", "USES LEFT", "EXPIRES", "REVOKED"
            );
            for t in &tokens {
                let revoked = if t.revoked_at_ms == 0 {
                    "-".to_string()
                } else {
                    output::rfc3339_ms(t.revoked_at_ms)
                };
                println!(
                    "{:<16}  {:<16} {:>9}  {:<24} {:<24} {}",
                    t.id,
                    printable(&t.org),
                    t.uses_left,
                    output::rfc3339_ms(t.expires_at_ms),
                    revoked,
                    printable(&t.created_by)
                );
            }
            if tokens.is_empty() {
                println!(
                    "(no tokens{})",
                    if all {
                        ""
                    } else {
                        " that can still enroll; --all shows the others"
                    }
                );
            }
        }
        TokenCmd::Revoke { id } => {
            let t = client::token_revoke(cfg, &id).await?;
            println!(
                "revoked token {} of organisation {} ({} uses were left)",
                t.id, t.org, t.uses_left
            );
        }
    }
    Ok(())
}

/// `audit list` as a table.
fn print_audit(entries: &[vedette_proto::v1::AuditEntry]) {
    println!(
        "{:<24}  {:<24} {:<16} {:<38} {:<16} OUTCOME",
        "AT", "ACTOR", "ACTION", "TARGET", "ORG"
    );
    for e in entries {
        println!(
            "{:<24}  {:<24} {:<16} {:<38} {:<16} {}",
            output::rfc3339_ms(e.at_ms),
            printable(&e.actor),
            printable(&e.action),
            printable(&e.target),
            printable(&e.org),
            printable(&e.outcome)
        );
    }
}

async fn orgs(cmd: OrgsCmd, cfg: &CtlConfig) -> anyhow::Result<()> {
    match cmd {
        OrgsCmd::Rename { name, new_name } => {
            let o = client::orgs_rename(cfg, &name, &new_name).await?;
            println!("renamed organisation {name} to {} ({})", o.name, o.stix_id);
        }
        OrgsCmd::Remove { name } => {
            let n = client::orgs_remove(cfg, &name).await?;
            println!("removed organisation {name}; {n} unspent tokens of it revoked");
        }
        OrgsCmd::Create { name, fields } => {
            let [sector, country, share, tlp] = fields.into_request_fields();
            let request = CreateOrgRequest {
                name,
                sector,
                country,
                share,
                tlp,
            };
            show_org(&client::orgs_create(cfg, request).await?);
        }
        OrgsCmd::Set {
            name,
            fields,
            response_approval,
        } => {
            let [sector, country, share, tlp] = fields.into_request_fields();
            let response_approval = response_approval.unwrap_or_default();
            if [&sector, &country, &share, &tlp, &response_approval]
                .iter()
                .all(|f| f.is_empty())
            {
                anyhow::bail!(
                    "nothing to change: give --share, --tlp, --sector, --country or \
                     --response-approval"
                );
            }
            let request = SetOrgRequest {
                name,
                sector,
                country,
                share,
                tlp,
                response_approval,
            };
            show_org(&client::orgs_set(cfg, request).await?);
        }
        OrgsCmd::List { json } => {
            let orgs = client::orgs_list(cfg).await?;
            if json {
                for o in &orgs {
                    println!("{}", client::org_json(o));
                }
                return Ok(());
            }
            println!(
                "{:<24} {:<10} {:<14} {:<26} {:<7} {:>6}  STIX IDENTITY",
                "NAME", "SHARE", "TLP", "SECTOR", "COUNTRY", "AGENTS"
            );
            for o in &orgs {
                println!(
                    "{:<24} {:<10} {:<14} {:<26} {:<7} {:>6}  {}",
                    printable(&o.name),
                    o.share,
                    o.tlp,
                    o.sector,
                    o.country,
                    o.agents,
                    o.stix_id
                );
            }
        }
    }
    Ok(())
}

fn sign_options(a: SignArgs) -> PublishOptions {
    PublishOptions {
        sign_key: a.sign_key,
        insecure_unsigned: a.insecure_unsigned,
        publisher: a.publisher,
        to_label: None,
    }
}

async fn rules(cmd: RulesCmd, cfg: &CtlConfig) -> anyhow::Result<()> {
    match cmd {
        RulesCmd::Publish {
            name,
            strict,
            drop_intel,
            to,
            sign,
            paths,
        } => {
            let opts = PublishOptions {
                to_label: to.clone(),
                ..sign_options(sign)
            };
            let p = rules::publish(cfg, &paths, name, strict, drop_intel, &opts).await?;
            for w in &p.warnings {
                eprintln!("warning: {w}");
            }
            let r = &p.response;
            let intel = match (p.kept_intel, drop_intel) {
                (true, _) => "; the published intel indicators are kept",
                (false, true) => "; without intel indicators (--drop-intel)",
                (false, false) => "",
            };
            let only = to.map(|l| format!(" with label {l}")).unwrap_or_default();
            println!(
                "published version {} (sha256 {}){intel}; pushed to {} connected agent(s){only}",
                r.version, r.digest, r.agents_notified
            );
        }
        RulesCmd::Promote { version } => {
            let n = client::promote(cfg, version).await?;
            println!("version {version} goes to every agent now; pushed to {n} connected agent(s)");
        }
        RulesCmd::Rollback { version, sign } => {
            let r = rules::rollback(cfg, version, &sign_options(sign)).await?;
            println!(
                "published the content of version {version} as version {} (sha256 {}); pushed to {} connected agent(s)",
                r.version, r.digest, r.agents_notified
            );
        }
        RulesCmd::Check { .. } => anyhow::bail!("rules check runs without a collector"),
        RulesCmd::List { json } => list(cfg, json).await?,
        RulesCmd::Show { version, json } => show(cfg, version, json).await?,
        RulesCmd::Status { version, json } => status(cfg, version, json).await?,
        RulesCmd::Slow { version, org, json } => slow(cfg, version, org, json).await?,
    }
    Ok(())
}

async fn list(cfg: &CtlConfig, json: bool) -> anyhow::Result<()> {
    let list = rules::list(cfg).await?;
    if json {
        for b in &list {
            println!("{}", output::bundle_json(b));
        }
    } else {
        println!(
            "{:>7}  {:<20} {:<24} {:<16} {:>5}  SHA-256",
            "VERSION", "NAME", "PUBLISHED", "PUBLISHER", "FILES"
        );
        for b in &list {
            println!(
                "{:>7}  {:<20} {:<24} {:<16} {:>5}  {}",
                b.version,
                b.name,
                rfc3339_ms(b.published_at_ms),
                b.publisher,
                b.files,
                &b.digest[..16.min(b.digest.len())]
            );
        }
    }
    Ok(())
}

async fn show(cfg: &CtlConfig, version: u64, json: bool) -> anyhow::Result<()> {
    let (info, content) = rules::fetch(cfg, version).await?;
    if json {
        let mut v = output::bundle_json(&info);
        v["paths"] = content
            .files
            .iter()
            .map(|f| serde_json::json!({"path": f.path, "size": f.data.len()}))
            .collect();
        println!("{v}");
    } else {
        println!("version:      {}", info.version);
        println!("name:         {}", info.name);
        println!(
            "publisher:    {} (certificate {})",
            info.publisher, info.published_by
        );
        println!("created:      {}", rfc3339_ms(info.created_at_ms));
        println!("published:    {}", rfc3339_ms(info.published_at_ms));
        println!("sha256:       {}", info.digest);
        println!("signed by:    {}", signer(&info.signer_key));
        println!("files:");
        for f in &content.files {
            println!("  {:>10}  {}", f.data.len(), f.path);
        }
    }
    Ok(())
}

/// A signer as `keys generate` names it: the key id and its SHA-256 (from the raw key in hex).
fn signer(raw_hex: &str) -> String {
    if raw_hex.is_empty() {
        return "nobody (unsigned)".into();
    }
    match hex::decode(raw_hex)
        .ok()
        .and_then(|b| vedette_engine::bundle::PublicKey::from_bytes(&b))
    {
        Some(k) => format!("key id {} (SHA-256 {})", k.id(), k.sha256()),
        None => format!("an unreadable key ({raw_hex})"),
    }
}

async fn slow(
    cfg: &CtlConfig,
    version: Option<u64>,
    org: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let versions: Vec<_> = rules::slow(cfg, org.unwrap_or_default())
        .await?
        .into_iter()
        .filter(|v| version.is_none_or(|want| v.bundle_version == want))
        .collect();
    if json {
        for v in &versions {
            println!("{}", output::rule_costs_json(v));
        }
        return Ok(());
    }
    if versions.is_empty() {
        println!(
            "no agent has timed its rules yet: each does after a full scan (`profile_rules` in agent.toml)"
        );
    }
    for v in &versions {
        let what = match v.bundle_version {
            0 => "host-local rules only".to_string(),
            n => format!("version {n}"),
        };
        println!("{what}, measured by {} agent(s):", v.agents);
        for r in &v.rules {
            println!(
                "  {:>5.1} %  {}  {}:{}  (on {}; named by {} agent(s))",
                f64::from(r.max_share_ppm) / 10_000.0,
                printable(&r.rule),
                printable(&r.file),
                r.line,
                printable(&r.hostname),
                r.agents
            );
        }
    }
    Ok(())
}

async fn status(cfg: &CtlConfig, version: Option<u64>, json: bool) -> anyhow::Result<()> {
    let r = rules::rollout(cfg, version.unwrap_or(0)).await?;
    if json {
        println!("{}", output::rollout_json(&r));
    } else {
        println!(
            "version {}{}: {} on it, {} behind, {} failed, {} ahead, {} not due it",
            r.version,
            if r.target.is_empty() {
                String::new()
            } else {
                format!(" (to label {})", r.target)
            },
            r.on_version,
            r.behind,
            r.failed,
            r.ahead,
            r.not_due
        );
        for a in r
            .agents
            .iter()
            .filter(|a| a.applied_version != r.version && a.due_version >= r.version)
        {
            let what = if a.failed_version == r.version {
                format!("failed: {}", printable(&a.error))
            } else {
                format!("runs version {}", a.applied_version)
            };
            println!("  {} ({}): {what}", a.agent_id, printable(&a.hostname));
        }
    }
    Ok(())
}

async fn intel(cmd: IntelCmd, cfg: &CtlConfig) -> anyhow::Result<()> {
    match cmd {
        IntelCmd::Import { paths } => {
            for r in crate::intel::import(cfg, &paths).await? {
                crate::intel::print_import(&r);
            }
        }
        IntelCmd::Status { json } => {
            let r = crate::intel::status(cfg).await?;
            if json {
                for s in &r.sources {
                    println!("{}", output::source_json(s));
                }
                for s in &r.sinks {
                    println!("{}", output::sink_json(s));
                }
            } else {
                crate::intel::print_status(&r);
            }
        }
        IntelCmd::Publish { sign } => {
            let (r, n) = crate::intel::publish(cfg, &sign_options(sign)).await?;
            println!(
                "published bundle version {} with {n} staged indicator(s); {} connected agent(s) notified",
                r.version, r.agents_notified
            );
        }
    }
    Ok(())
}
