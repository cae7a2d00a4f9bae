//! Participating organisations: agents enrolled into two organisations by their own tokens, an
//! operator certificate limited to one of them, and the exports of the same detections under
//! each sharing policy, checked against the README's statement of what leaves the collector,
//! by the STIX validator, and by searching every exported byte for what must not leave.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};
use vedette_tests::{
    Agent, Collector, bin, json_lines, output_text, vedettectl as ctl_as, wait_for, wait_until,
};

use crate::intel::{Helper, connection_to, detection, medallion_on, peer_tools, taxii_collection};

/// The STIX indicators both organisations' agents match: a dropped file's name and a command
/// line.
const FILE_INDICATOR: &str = "indicator--7e1a0000-0000-4000-8000-000000000001";
const PROCESS_INDICATOR: &str = "indicator--7e1a0000-0000-4000-8000-000000000002";
const DROPPED: &str = "tenancy-drop.bin";
/// A file-name pattern, and the host's own file it matches (alpha's only).
const PATTERN_INDICATOR: &str = "indicator--7e1a0000-0000-4000-8000-000000000003";
const PATTERNED: &str = "tenancy-rx-4242.dat";
/// An internal address alpha's host connects to.
const ADDRESS_INDICATOR: &str = "indicator--7e1a0000-0000-4000-8000-000000000004";
const INTERNAL: &str = "127.0.0.78";
/// A rule of alpha's host's own, loaded beside the bundle.
const LOCAL_RULE: &str = "alpha_host_rule_7e1a";
const MARKER: &str = "vedette-tenancy-marker";

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", output_text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn denied(out: Output, what: &str) {
    let text = output_text(&out);
    assert!(
        !out.status.success() && text.contains("permission denied"),
        "{what} should be refused with PERMISSION_DENIED: {text}"
    );
}

/// Every object of a TAXII collection (one page: the server here serves 10,000 per page).
fn taxii_objects(api_root: &str, collection: &str) -> Vec<Value> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, json, urllib.request, base64\n\
             r = urllib.request.Request(sys.argv[1], headers={'Accept': 'application/taxii+json;version=2.1',\n\
             \x20   'Authorization': 'Basic ' + base64.b64encode(b'vedette:s3cret').decode()})\n\
             v = json.loads(urllib.request.urlopen(r).read().decode())\n\
             assert not v.get('more'), 'more than one page'\n\
             print(json.dumps(v.get('objects', [])))",
        ])
        .arg(format!("{api_root}collections/{collection}/objects/"))
        .output()
        .expect("python3");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("reading the TAXII collection: {e}: {}", output_text(&out)))
}

/// The README's statement of what leaves the collector: for each ECS field (or STIX object
/// type) pattern, whether `full` and `anonymised` exports carry it.
struct Statement {
    /// (pattern, carried under full, carried under anonymised)
    ecs: Vec<(String, bool, bool)>,
    stix: Vec<(String, bool, bool)>,
}

fn readme_statement() -> Statement {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Sharing and privacy"))
        .expect("README.md has a \"Sharing and privacy\" section");
    let mut st = Statement {
        ecs: Vec::new(),
        stix: Vec::new(),
    };
    let mut table = None;
    for line in section.lines() {
        if let Some(h) = line.strip_prefix("### ") {
            table = if h.contains("ECS") {
                Some(true)
            } else if h.contains("STIX") {
                Some(false)
            } else {
                None
            };
            continue;
        }
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').collect();
        let (Some(ecs), true) = (table, line.starts_with("| `") && cells.len() >= 3) else {
            continue;
        };
        let carried = |cell: &str| {
            let c = cell.trim();
            !(c.starts_with('—') || c.starts_with("no"))
        };
        let (full, anonymised) = (carried(cells[1]), carried(cells[2]));
        for pattern in cells[0].split('`').skip(1).step_by(2) {
            let row = (pattern.trim_end_matches(".*").to_string(), full, anonymised);
            if ecs {
                st.ecs.push(row);
            } else {
                st.stix.push(row);
            }
        }
    }
    assert!(
        st.ecs.len() > 10 && st.stix.len() > 5,
        "README.md's tables were not found"
    );
    st
}

/// The leaf paths of a JSON object (arrays are leaves).
fn leaves(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(v, &p, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

/// Checks that every field of an ECS line is one the README says this policy carries (the most
/// specific row that names it decides).
fn check_ecs_against_readme(st: &Statement, line: &Value, anonymised: bool) {
    let mut paths = Vec::new();
    leaves(line, "", &mut paths);
    for p in paths {
        let row = st
            .ecs
            .iter()
            .filter(|(pat, _, _)| p == *pat || p.starts_with(&format!("{pat}.")))
            .max_by_key(|(pat, _, _)| pat.len())
            .unwrap_or_else(|| panic!("README.md does not say whether `{p}` is exported"));
        let carried = if anonymised { row.2 } else { row.1 };
        assert!(
            carried,
            "`{p}` is exported under {} but README.md says it is not: {line}",
            if anonymised { "anonymised" } else { "full" }
        );
    }
}

fn check_stix_against_readme(st: &Statement, objects: &[Value], anonymised: bool) {
    for o in objects {
        let t = o["type"].as_str().unwrap_or_default();
        let row = st
            .stix
            .iter()
            .find(|(pat, _, _)| pat == t)
            .unwrap_or_else(|| panic!("README.md does not say whether `{t}` objects are exported"));
        assert!(
            if anonymised { row.2 } else { row.1 },
            "a `{t}` object is exported but README.md says it is not: {o}"
        );
    }
}

/// Runs the STIX validator on the objects as a bundle; panics with its report on an error.
fn validate_stix(dir: &Path, name: &str, objects: &[Value]) {
    let path = dir.join(format!("{name}.json"));
    let bundle = json!({"type": "bundle", "id": "bundle--7e1a0000-0000-4000-8000-0000000000ff",
        "objects": objects});
    std::fs::write(&path, bundle.to_string()).unwrap();
    let (valid, report) = crate::intel::stix_validated(&path);
    assert!(valid, "{name}: {report}\n{bundle}");
}

/// Writes the collector's `[export]` section: a JSONL sink and a TAXII sink per policy run so
/// far (a sink new to the store starts from the first detection).
fn set_sinks(c: &Collector, base: &str, tmp: &Path, api_root: Option<&str>, runs: &[&str]) {
    let mut text = format!("{base}\n[export]\norganisation = \"CSIRT-Test\"\n");
    for run in runs {
        text.push_str(&format!(
            "\n[[export.jsonl]]\npath = \"{}\"\n",
            tmp.join(format!("{run}.jsonl")).display()
        ));
        if let Some(root) = api_root {
            text.push_str(&format!(
                "\n[[export.taxii]]\nurl = \"{root}\"\ncollection = \"{}\"\n\
                 username = \"vedette\"\npassword = \"s3cret\"\nallow_insecure = true\n",
                collection(run)
            ));
        }
    }
    std::fs::write(c.dir.join("collector.toml"), text).unwrap();
}

fn collection(run: &str) -> String {
    let n = match run {
        "anonymised" => 1,
        "none" => 2,
        _ => 3,
    };
    format!("7e1a0000-0000-4000-8000-00000000010{n}")
}

/// Waits until the sink for `run` has exported everything stored (backlog 0, no error).
fn drained(c: &Collector, run: &str) {
    let file = format!("{run}.jsonl");
    wait_until(
        Duration::from_secs(90),
        &format!("the {run} sinks drained"),
        || {
            let sinks: Vec<Value> = json_lines(&c.ctl_ok(&["intel", "status", "--json"]))
                .into_iter()
                .filter(|s| s["kind"] == "export")
                .collect();
            let mine: Vec<&Value> = sinks
                .iter()
                .filter(|s| {
                    let name = s["sink"].as_str().unwrap_or_default();
                    name.ends_with(&file) || name.contains(&collection(run))
                })
                .collect();
            let done = !mine.is_empty()
                && mine
                    .iter()
                    .all(|s| s["backlog"] == 0 && s["last_error"].is_null());
            if done {
                Ok(())
            } else {
                Err(format!("{mine:?}"))
            }
        },
    );
}

#[test]
fn organisations_scope_operators_and_each_sharing_policy_governs_what_is_exported() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let peers = peer_tools(&["stix2validator"], "stix2-validator");
    let taxii = if peers {
        medallion_on(
            tmp,
            vedette_tests::free_port(),
            json!(
                ["anonymised", "none", "full"]
                    .iter()
                    .map(|r| taxii_collection(&collection(r), &[]))
                    .collect::<Vec<_>>()
            ),
            10_000,
        )
    } else {
        None
    };
    let api_root = taxii.as_ref().map(|(_, root)| root.clone());
    let mut c = Collector::init(&tmp.join("collector"));
    let base = c.file("collector.toml");
    c.start();

    // Two organisations; a new one shares `anonymised` at TLP:AMBER unless told otherwise.
    let created = c.ctl_ok(&[
        "orgs",
        "create",
        "alpha",
        "--sector",
        "energy",
        "--country",
        "de",
    ]);
    assert!(created.contains("share anonymised, TLP:AMBER"), "{created}");
    c.ctl_ok(&[
        "orgs", "create", "bravo", "--share", "full", "--tlp", "green",
    ]);
    let again = c.ctl(&["orgs", "create", "alpha"]);
    assert!(
        !again.status.success() && output_text(&again).contains("exists already"),
        "{}",
        output_text(&again)
    );
    let bad = c.ctl(&["orgs", "create", "alpha2", "--sector", "Energy"]);
    assert!(
        output_text(&bad).contains("not a STIX industry sector"),
        "{}",
        output_text(&bad)
    );
    let orgs = json_lines(&c.ctl_ok(&["orgs", "list", "--json"]));
    let names: Vec<&str> = orgs.iter().filter_map(|o| o["name"].as_str()).collect();
    assert_eq!(names, ["alpha", "bravo", "default"]);
    let alpha_stix = orgs[0]["stix_id"].as_str().unwrap().to_string();
    assert!(alpha_stix.starts_with("identity--"), "{}", orgs[0]);
    assert_eq!(orgs[0]["country"], "DE");
    assert_eq!(
        orgs[2]["share"], "full",
        "the default organisation shares as before"
    );

    // A threat feed both organisations' agents match.
    let feed = tmp.join("feed.json");
    let indicator = |id: &str, pattern: &str| {
        json!({"type": "indicator", "spec_version": "2.1", "id": id, "name": "tenancy test",
            "created": "2026-11-01T00:00:00.000Z", "modified": "2026-11-01T00:00:00.000Z",
            "pattern_type": "stix", "valid_from": "2026-01-01T00:00:00Z", "pattern": pattern})
    };
    std::fs::write(
        &feed,
        json!({"type": "bundle", "id": "bundle--7e1a0000-0000-4000-8000-000000000000",
            "objects": [indicator(FILE_INDICATOR, &format!("[file:name = '{DROPPED}']")),
                indicator(PROCESS_INDICATOR, &format!("[process:command_line MATCHES '{MARKER}']")),
                indicator(PATTERN_INDICATOR, "[file:name MATCHES '^tenancy-rx-[0-9]+\\\\.dat$']"),
                indicator(ADDRESS_INDICATOR, &format!("[ipv4-addr:value = '{INTERNAL}']"))]})
        .to_string(),
    )
    .unwrap();
    c.ctl_ok(&["intel", "import", feed.to_str().unwrap()]);
    c.ctl_ok(&["intel", "publish"]);

    // One agent per organisation, each enrolled by its organisation's token, each with a host
    // name of its own. Only alpha's watches processes (both would see the same process).
    let mut agents = Vec::new();
    for org in ["alpha", "bravo"] {
        let token = c.token(&["--org", org]);
        let mut a = Agent::enroll_with_token(&c, &tmp.join(format!("agent-{org}")), &token, &[]);
        a.env
            .push(("VEDETTE_HOSTNAME".into(), format!("host-{org}-7e1a")));
        let watch = tmp.join(format!("watch-{org}"));
        std::fs::create_dir(&watch).unwrap();
        let config = tmp.join(format!("agent-{org}.toml"));
        let local = vedette_tests::rule_dir(&tmp.join(format!("rules-{org}")), LOCAL_RULE, MARKER);
        std::fs::write(
            &config,
            format!(
                "processes = {}\nrules = [{:?}]\n",
                org == "alpha",
                local.to_str().unwrap()
            ),
        )
        .unwrap();
        a.run(
            &c,
            &[
                "--config",
                config.to_str().unwrap(),
                "--watch",
                watch.to_str().unwrap(),
            ],
        );
        agents.push((a, watch));
    }
    let (alpha_id, bravo_id) = (agents[0].0.id.clone(), agents[1].0.id.clone());
    wait_for(Duration::from_secs(30), "both agents on bundle 1", || {
        let a = c.agents();
        (a.len() == 2 && a.iter().all(|a| a["bundle_version"] == 1)).then_some(())
    });
    let listed = c.agents();
    for (id, org) in [(&alpha_id, "alpha"), (&bravo_id, "bravo")] {
        let a = listed.iter().find(|a| a["id"] == id.as_str()).unwrap();
        assert_eq!(a["org"], org, "{a}");
    }
    // The organisation is in each agent's certificate, as the collector recorded it.
    let certs = json_lines(&c.ctl_ok(&["certs", "list", "--json"]));
    for (id, org) in [(&alpha_id, "alpha"), (&bravo_id, "bravo")] {
        assert!(
            certs
                .iter()
                .any(|x| x["subject"] == id.as_str() && x["org"] == org),
            "{certs:?}"
        );
    }

    // What the agents see: a dropped file each, and (alpha) a process whose command line
    // matches.
    for (_, watch) in &agents {
        std::fs::write(watch.join(DROPPED), "payload").unwrap();
    }
    std::fs::write(agents[0].1.join(PATTERNED), "payload").unwrap();
    std::fs::write(agents[0].1.join("notes.txt"), MARKER).unwrap();
    let _internal = connection_to(INTERNAL);
    let _shell = Helper(
        std::process::Command::new("sh")
            .args(["-c", &format!("sleep 120; : {MARKER}")])
            .spawn()
            .unwrap(),
    );
    for (org, indicator) in [
        ("alpha", FILE_INDICATOR),
        ("alpha", PROCESS_INDICATOR),
        ("alpha", PATTERN_INDICATOR),
        ("alpha", ADDRESS_INDICATOR),
        ("alpha", LOCAL_RULE),
        ("bravo", FILE_INDICATOR),
    ] {
        detection(&c, &format!("{indicator} seen by {org}"), |d| {
            d["org"] == org && d["indicator"]["id"] == indicator
        });
    }
    let all = c.detections();
    let alpha_path = agents[0].1.join(DROPPED).display().to_string();
    let process = all
        .iter()
        .find(|d| d["org"] == "alpha" && d["indicator"]["id"] == PROCESS_INDICATOR)
        .unwrap();
    let cmdline = process["cmdline"].as_str().unwrap().to_string();
    assert!(cmdline.contains(MARKER), "{process}");
    let user = process["user"].as_str().unwrap_or_default().to_string();
    let exe = process["path"].as_str().unwrap_or_default().to_string();

    // An operator limited to alpha.
    let issued = std::process::Command::new(bin("vedette-collector"))
        .args(["certs", "issue", "--config"])
        .arg(c.dir.join("collector.toml"))
        .args([
            "--name",
            "alpha-soc",
            "--role",
            "operator",
            "--org",
            "alpha",
            "--out",
        ])
        .arg(c.dir.join("alpha-soc"))
        .output()
        .unwrap();
    assert!(issued.status.success(), "{}", output_text(&issued));
    let typo = std::process::Command::new(bin("vedette-collector"))
        .args(["certs", "issue", "--config"])
        .arg(c.dir.join("collector.toml"))
        .args([
            "--name", "x", "--role", "operator", "--org", "alhpa", "--out",
        ])
        .arg(c.dir.join("typo"))
        .output()
        .unwrap();
    assert!(
        !typo.status.success() && output_text(&typo).contains("no organisation `alhpa`"),
        "{}",
        output_text(&typo)
    );
    let scoped = c.ctl_config_as("alpha-soc");

    // It lists only alpha's agents and detections...
    let seen = json_lines(&ok(
        ctl_as(&scoped, &["agents", "list", "--json"]),
        "agents",
    ));
    let ids: Vec<&str> = seen.iter().filter_map(|a| a["id"].as_str()).collect();
    assert_eq!(ids, [alpha_id.as_str()]);
    let dets = json_lines(&ok(
        ctl_as(&scoped, &["detections", "list", "--json"]),
        "detections",
    ));
    assert!(dets.len() >= 2, "{dets:?}");
    assert!(
        dets.iter()
            .all(|d| d["org"] == "alpha" && d["agent_id"] == alpha_id.as_str())
    );
    // ...and only its own organisation, not even the others' names.
    let orgs = ok(ctl_as(&scoped, &["orgs", "list", "--json"]), "orgs list");
    assert!(orgs.contains("alpha") && !orgs.contains("bravo") && !orgs.contains("default"));
    let certs = ok(ctl_as(&scoped, &["certs", "list", "--json"]), "certs list");
    assert!(
        !certs.contains(&bravo_id) && certs.contains(&alpha_id),
        "{certs}"
    );
    // It cannot act on bravo: revoke its agent, create its tokens, or list it by asking.
    denied(
        ctl_as(&scoped, &["agents", "revoke", &bravo_id]),
        "revoking bravo's agent",
    );
    denied(
        ctl_as(&scoped, &["token", "create", "--org", "bravo"]),
        "a token for bravo",
    );
    denied(
        ctl_as(&scoped, &["detections", "list", "--org", "bravo"]),
        "listing bravo's detections",
    );
    denied(
        ctl_as(&scoped, &["agents", "list", "--org", "bravo"]),
        "listing bravo's agents",
    );
    denied(
        ctl_as(&scoped, &["orgs", "set", "alpha", "--share", "full"]),
        "changing a policy",
    );
    denied(
        ctl_as(&scoped, &["intel", "status"]),
        "collector-wide intel",
    );
    assert!(c.agents().iter().all(|a| a["revoked"] == false));
    // A token it creates enrolls into alpha, whatever the enrolling host asks.
    let token = ok(ctl_as(&scoped, &["token", "create"]), "token")
        .trim()
        .to_string();
    let third = Agent::enroll_with_token(&c, &tmp.join("agent-third"), &token, &[]);
    let row = c
        .agents()
        .into_iter()
        .find(|a| a["id"] == third.id.as_str())
        .unwrap();
    assert_eq!(row["org"], "alpha");
    // And it revokes its own organisation's agent.
    ok(
        ctl_as(&scoped, &["agents", "revoke", &third.id]),
        "revoking alpha's agent",
    );

    // An export unfiltered by the policies is for the collector's own records: refused to the
    // scoped operator, allowed collector-wide and logged.
    c.ctl_ok(&["orgs", "set", "alpha", "--share", "none"]);
    denied(
        ctl_as(&scoped, &["export", "ecs", "--unfiltered"]),
        "an unfiltered export",
    );
    let unfiltered = c.ctl_ok(&["export", "ecs", "--unfiltered"]);
    assert!(unfiltered.contains("host-alpha-7e1a"), "{unfiltered}");
    assert!(
        !c.ctl_ok(&["export", "ecs"]).contains("host-alpha-7e1a"),
        "filtered by default"
    );
    let log = c.proc.as_ref().unwrap().log_text();
    assert!(
        log.contains("an export unfiltered by the organisations' sharing policies"),
        "{log}"
    );

    // Exports: the same detections under each of alpha's policies, bravo sharing in full.
    let st = readme_statement();
    let mut runs: Vec<&str> = Vec::new();
    for policy in ["anonymised", "none", "full"] {
        c.ctl_ok(&["orgs", "set", "alpha", "--share", policy]);
        c.stop();
        runs.push(policy);
        set_sinks(&c, &base, tmp, api_root.as_deref(), &runs);
        c.start();
        drained(&c, policy);
        let text = std::fs::read_to_string(tmp.join(format!("{policy}.jsonl"))).unwrap();
        let lines = json_lines(&text);
        let of = |host: &str| lines.iter().filter(|l| l["host"]["name"] == host).count();
        // bravo's detections are there in full each time, with its TLP.
        assert!(of("host-bravo-7e1a") >= 1, "{text}");
        assert!(
            lines
                .iter()
                .filter(|l| l["host"]["name"] == "host-bravo-7e1a")
                .all(|l| l["labels"]["tlp"] == "green")
        );
        let alpha_lines: Vec<&Value> = lines
            .iter()
            .filter(|l| l["host"]["name"] != "host-bravo-7e1a")
            .collect();
        let stix = api_root
            .as_deref()
            .map(|root| taxii_objects(root, &collection(policy)));
        // What an operator hands a partner: `vedettectl export`, under the same policies.
        let exported: String = ["stix", "misp", "ecs"]
            .iter()
            .map(|f| c.ctl_ok(&["export", f]))
            .collect();
        match policy {
            "anonymised" => {
                assert!(alpha_lines.len() >= 2, "{text}");
                // Not one byte of the export names alpha's host, paths, command line or user
                // (bravo, sharing in full, watches no processes).
                let everything = format!("{text}{}{exported}", json!(stix));
                for secret in [
                    "host-alpha-7e1a",
                    alpha_path.as_str(),
                    agents[0].1.to_str().unwrap(),
                    cmdline.as_str(),
                    alpha_id.as_str(),
                    // A pattern's match, a host's own rule and an internal address.
                    "tenancy-rx-4242",
                    LOCAL_RULE,
                    "rules-alpha",
                    INTERNAL,
                ] {
                    assert!(
                        !everything.contains(secret),
                        "the anonymised export contains `{secret}`: {everything}"
                    );
                }
                // User and executable names are common words ("root", "/usr/bin/dash"):
                // no JSON string is one of them.
                for name in [&user, &exe].into_iter().filter(|n| !n.is_empty()) {
                    let quoted = format!("\"{name}\"");
                    assert!(
                        !alpha_lines.iter().any(|l| l.to_string().contains(&quoted)),
                        "the anonymised export contains {quoted}"
                    );
                }
                for l in &alpha_lines {
                    assert_eq!(
                        l["organization"]["name"],
                        "Anonymous participant (energy, DE)"
                    );
                    assert_eq!(l["labels"]["tlp"], "amber");
                    assert_eq!(l["threat"]["indicator"]["marking"]["tlp"], "AMBER");
                    assert!(l["threat"]["indicator"]["reference"].is_string(), "{l}");
                    check_ecs_against_readme(&st, l, true);
                }
            }
            "none" => {
                // Nothing about alpha: no line that is not bravo's, and no alpha name anywhere.
                assert!(alpha_lines.is_empty(), "{alpha_lines:?}");
                let everything = format!("{text}{}{exported}", json!(stix));
                for secret in [
                    "host-alpha-7e1a",
                    alpha_stix.as_str(),
                    "Anonymous participant",
                ] {
                    assert!(!everything.contains(secret), "`{secret}` in: {everything}");
                }
            }
            _ => {
                assert!(exported.contains("host-alpha-7e1a"), "{exported}");
                assert_eq!(of("host-alpha-7e1a"), alpha_lines.len());
                assert!(of("host-alpha-7e1a") >= 2, "{text}");
                assert!(text.contains(&alpha_path), "{text}");
                for l in &alpha_lines {
                    assert_eq!(l["organization"]["id"], alpha_stix.as_str());
                    check_ecs_against_readme(&st, l, false);
                }
            }
        }
        let Some(objects) = stix else {
            continue;
        };
        validate_stix(tmp, policy, &objects);
        let sightings: Vec<&Value> = objects.iter().filter(|o| o["type"] == "sighting").collect();
        assert!(!sightings.is_empty());
        // Every sighting carries its organisation's TLP marking, defined in the export.
        for s in &sightings {
            let marking = s["object_marking_refs"][0].as_str().unwrap_or_default();
            assert!(
                objects.iter().any(|o| o["id"] == marking
                    && o["type"] == "marking-definition"
                    && o["name"].as_str().is_some_and(|n| n.starts_with("TLP:"))),
                "{s}"
            );
        }
        let by = |id: &str| {
            objects
                .iter()
                .find(|o| o["id"] == id)
                .cloned()
                .unwrap_or_default()
        };
        let alpha_sightings: Vec<&&Value> = sightings
            .iter()
            .filter(|s| {
                by(s["where_sighted_refs"][0].as_str().unwrap_or_default())["name"] != "bravo"
            })
            .collect();
        // What alpha's sightings refer to: who saw, what was seen, and its observables.
        let mut alpha_objects: Vec<Value> = Vec::new();
        for s in &alpha_sightings {
            alpha_objects.push((**s).clone());
            alpha_objects.push(by(s["where_sighted_refs"][0].as_str().unwrap_or_default()));
            for od in s["observed_data_refs"].as_array().into_iter().flatten() {
                let od = by(od.as_str().unwrap_or_default());
                for r in od["object_refs"].as_array().into_iter().flatten() {
                    alpha_objects.push(by(r.as_str().unwrap_or_default()));
                }
                alpha_objects.push(od);
            }
        }
        match policy {
            "anonymised" => {
                assert!(!alpha_sightings.is_empty());
                for s in &alpha_sightings {
                    let who = by(s["where_sighted_refs"][0].as_str().unwrap());
                    assert_eq!(who["name"], "Anonymous participant (energy, DE)");
                    assert_eq!(who["sectors"], json!(["energy"]));
                    assert_eq!(
                        s["object_marking_refs"][0],
                        "marking-definition--55d920b0-5e8b-4f79-9ee9-91f868d9b421"
                    );
                }
                assert!(
                    objects
                        .iter()
                        .any(|o| o["type"] == "location" && o["country"] == "DE")
                );
                assert!(alpha_objects.iter().all(|o| o["type"] != "process"));
                for name in [&user, &exe].into_iter().filter(|n| !n.is_empty()) {
                    let quoted = format!("\"{name}\"");
                    assert!(
                        !alpha_objects
                            .iter()
                            .any(|o| o.to_string().contains(&quoted)),
                        "the anonymised STIX export contains {quoted}"
                    );
                }
                check_stix_against_readme(&st, &alpha_objects, true);
            }
            "none" => assert!(alpha_sightings.is_empty(), "{alpha_sightings:?}"),
            _ => {
                assert!(
                    alpha_sightings
                        .iter()
                        .any(|s| s["where_sighted_refs"][0] == alpha_stix.as_str())
                );
                check_stix_against_readme(&st, &alpha_objects, false);
            }
        }
    }
}
