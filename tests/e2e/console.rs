//! The web console and its JSON API: a real collector serving HTTPS with certificates from
//! `init`, real agents reporting real detections, the API used with an operator client
//! certificate and with an account's session cookie, and the pages driven in Debian's headless
//! Chromium through chromedriver.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use vedette_tests::web::{Browser, Https, Reply, chromium};
use vedette_tests::{Agent, Collector, bin, free_port, missing_peer, rule_dir, wait_for};

const PASSWORD: &str = "a long enough console password";

/// A collector with the console on a fresh port and an operator account `alice`; returns it
/// and the console's base URL.
fn console_collector(dir: &Path) -> (Collector, String) {
    let mut c = Collector::init(dir);
    let port = free_port();
    let toml = c.file("collector.toml");
    std::fs::write(
        dir.join("collector.toml"),
        format!("console_listen = \"127.0.0.1:{port}\"\n{toml}"),
    )
    .unwrap();
    add_user(&c, "alice", PASSWORD);
    c.start();
    let base = format!("https://127.0.0.1:{port}");
    wait_for(Duration::from_secs(10), "the console to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    (c, base)
}

fn add_user(c: &Collector, name: &str, password: &str) {
    add_user_in(c, name, password, None);
}

fn add_user_in(c: &Collector, name: &str, password: &str, org: Option<&str>) {
    let mut cmd = Command::new(bin("vedette-collector"));
    cmd.args(["users", "add", "--config"])
        .arg(c.dir.join("collector.toml"))
        .args([name, "--role", "operator"]);
    if let Some(org) = org {
        cmd.args(["--org", org]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "users add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The operator certificate `init` wrote.
fn operator(c: &Collector, base: &str) -> Https {
    Https::new(
        base,
        &c.dir.join("ca.crt"),
        Some((&c.dir.join("operator.crt"), &c.dir.join("operator.key"))),
    )
}

fn anonymous(c: &Collector, base: &str) -> Https {
    Https::new(base, &c.dir.join("ca.crt"), None)
}

/// An agent named `host` watching its own directory with a rule matching `marker`.
fn watching_agent(
    c: &Collector,
    dir: &Path,
    host: &str,
    marker: &str,
) -> (Agent, std::path::PathBuf) {
    let mut agent = Agent::enroll(c, &dir.join(format!("agent-{host}")));
    agent.env.push(("VEDETTE_HOSTNAME".into(), host.into()));
    let watch = dir.join(format!("watch-{host}"));
    std::fs::create_dir_all(&watch).unwrap();
    let rules = rule_dir(&dir.join("rules"), "console_marker", marker);
    agent.run_watching(c, &watch, &rules);
    (agent, watch)
}

fn detections_via_ctl(c: &Collector) -> Vec<Value> {
    c.detections()
        .into_iter()
        .filter(|d| d["rule"] == "console_marker")
        .collect()
}

/// Every path of the OpenAPI document in the repository, with its methods.
fn openapi_routes() -> Vec<(String, String)> {
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../collector/openapi.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in ["get", "post", "put", "patch", "delete"] {
            if item.get(method).is_some() {
                out.push((method.to_string(), path.clone()));
            }
        }
    }
    out
}

fn assert_strict_headers(r: &Reply, what: &str) {
    let csp = r
        .header("content-security-policy")
        .unwrap_or_else(|| panic!("{what}: no CSP"));
    assert!(csp.contains("script-src 'self'"), "{what}: {csp}");
    assert!(!csp.contains("unsafe-inline"), "{what}: {csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{what}: {csp}");
    assert!(r.header("strict-transport-security").is_some(), "{what}");
    assert_eq!(
        r.header("x-content-type-options"),
        Some("nosniff"),
        "{what}"
    );
}

/// The value of the hidden `token` field of the sign-in form.
fn login_token(html: &str) -> String {
    let at = html.find("name=\"token\" value=\"").expect("token field") + 20;
    html[at..].split('"').next().unwrap().to_string()
}

/// Signs in through the form; the session cookie (`name=value`) for later requests.
fn sign_in(anon: &Https, user: &str, password: &str) -> String {
    let form = anon.get("/login", &[]);
    let nonce = form.cookie("__Host-vedette-login").expect("login cookie");
    let body = format!(
        "user={user}&password={}&token={}",
        password.replace(' ', "+"),
        login_token(&form.body)
    );
    let r = anon.post(
        "/login",
        &[("cookie", &format!("__Host-vedette-login={nonce}"))],
        "application/x-www-form-urlencoded",
        &body,
    );
    assert_eq!(r.status, 303, "sign-in of {user}: {}", r.body);
    format!(
        "__Host-vedette-session={}",
        r.cookie("__Host-vedette-session").expect("session cookie")
    )
}

#[test]
fn console_api_requires_authentication_and_csrf_and_matches_its_openapi_document() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, base) = console_collector(&tmp.path().join("collector"));
    let (agent, watch) = watching_agent(&c, tmp.path(), "web-one", "VEDETTE-CONSOLE-MARKER");
    std::fs::write(watch.join("dropper.sh"), "echo VEDETTE-CONSOLE-MARKER\n").unwrap();
    let stored = wait_for(Duration::from_secs(15), "the detection", || {
        let d = detections_via_ctl(&c);
        (!d.is_empty()).then_some(d)
    });
    // A bundle, so that its rollout can be read.
    let bundle_dir = rule_dir(
        &tmp.path().join("bundle"),
        "bundled_rule",
        "VEDETTE-BUNDLED",
    );
    c.ctl_ok(&["rules", "publish", bundle_dir.to_str().unwrap()]);

    let anon = anonymous(&c, &base);
    let op = operator(&c, &base);
    let routes = openapi_routes();
    assert!(routes.len() >= 9, "{routes:?}");

    // No credentials: 401 everywhere (JSON for the API, the sign-in page for pages), with
    // the strict headers on every answer.
    for (method, path) in &routes {
        let concrete = path
            .replace("{seq}", "1")
            .replace("{id}", &agent.id)
            .replace("{version}", "0");
        let r = if method == "get" {
            anon.get(&concrete, &[])
        } else {
            anon.post(&concrete, &[], "application/json", "{}")
        };
        assert_eq!(r.status, 401, "{method} {concrete}: {}", r.body);
        assert!(r.json()["error"].is_string(), "{concrete}");
        assert_strict_headers(&r, &concrete);
    }
    for page in ["/", "/detections", "/agents", "/rules", "/intel", "/chart"] {
        let r = anon.get(page, &[]);
        assert_eq!(r.status, 401, "{page}");
        assert!(r.body.contains("Sign in"), "{page}: {}", r.body);
        assert_strict_headers(&r, page);
    }
    let js = anon.get("/static/console.js", &[]);
    assert_eq!(js.status, 200);
    assert_strict_headers(&js, "console.js");

    // With the operator certificate: every documented route is served (and nothing else).
    let session = op.get("/api/v1/session", &[]).json();
    assert_eq!(session["name"], "operator");
    assert_eq!(session["account"], false);
    let csrf = session["csrf"].as_str().unwrap().to_string();
    let seq = stored[0]["seq"].as_u64().unwrap();
    let alerts = op.get("/api/v1/alerts", &[]).json();
    let alert = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["rule"] == "console_marker")
        .expect("the marker's alert")
        .clone();
    assert_eq!(
        (alert["hosts"].as_u64(), alert["status"].as_str()),
        (Some(1), Some("open"))
    );
    // A hunt for the detection's file, started through the API: the agent answers it.
    let body = serde_json::json!({ "sha256": [stored[0]["sha256"]] }).to_string();
    let started = op.post(
        "/api/v1/hunts",
        &[("x-csrf-token", &csrf)],
        "application/json",
        &body,
    );
    assert_eq!(started.status, 200, "{}", started.body);
    let hunt_id = started.json()["hunt"]["id"].as_str().unwrap().to_string();
    let hunt = wait_for(Duration::from_secs(20), "the hunt's answer", || {
        let h = op.get(&format!("/api/v1/hunts/{hunt_id}"), &[]).json();
        (h["hunt"]["answered"] == 1).then_some(h)
    });
    let hit = &hunt["agents"][0]["hits"][0];
    assert!(
        hit["path"].as_str().unwrap().ends_with("dropper.sh"),
        "{hunt}"
    );
    assert_eq!(hit["presence"], "present", "{hunt}");
    for (method, path) in routes.iter().filter(|(m, _)| m == "get") {
        let concrete = path
            .replace("/alerts/{id}", &format!("/alerts/{}", alert["id"]))
            .replace("/hunts/{id}", &format!("/hunts/{hunt_id}"))
            .replace("{seq}", &seq.to_string())
            .replace("{version}", "0");
        let r = op.get(&concrete, &[]);
        assert_eq!(r.status, 200, "{method} {concrete}: {}", r.body);
        assert_strict_headers(&r, &concrete);
    }
    assert_eq!(op.get("/api/v1/nothing-here", &[]).status, 404);

    // The detection as the agent sent it, found by every filter that should find it.
    let one = op.get(&format!("/api/v1/detections/{seq}"), &[]).json();
    assert_eq!(one["rule"], "console_marker");
    assert_eq!(one["agent_id"], agent.id.as_str());
    assert_eq!(one["hostname"], "web-one");
    assert_eq!(one["indicator"]["source"], "yara");
    let count = |query: &str| {
        let r = op.get(&format!("/api/v1/detections?{query}"), &[]);
        assert_eq!(r.status, 200, "{query}: {}", r.body);
        r.json()["detections"].as_array().unwrap().len()
    };
    assert_eq!(count(&format!("agent={}&rule=console_marker", agent.id)), 1);
    assert_eq!(count("agent=someone-else"), 0);
    assert_eq!(count("kind=yara&rule=console_marker"), 1);
    assert_eq!(count("kind=hash"), 0);
    assert_eq!(count("q=DROPPER.SH"), 1);
    assert_eq!(count("q=not-in-any-path"), 0);
    assert_eq!(
        count("rule=console_marker&since=2000-01-01T00:00:00Z&until=2999-01-01T00:00"),
        1
    );
    assert_eq!(count("until=2000-01-01T00:00:00Z"), 0);
    // By the file's SHA-256, in either case; an unknown one finds nothing, a malformed one is
    // refused with the parameter named.
    let sha = one["sha256"]
        .as_str()
        .expect("the file's SHA-256")
        .to_string();
    assert_eq!(count(&format!("sha256={sha}")), 1);
    assert_eq!(count(&format!("sha256={}", sha.to_uppercase())), 1);
    assert_eq!(count(&format!("sha256={}", "0".repeat(64))), 0);
    let bad = op.get("/api/v1/detections?sha256=abc", &[]);
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("`sha256`"), "{}", bad.body);
    // The console's search box takes either digest; the page lists what it finds.
    let md5 = one["md5"].as_str().expect("the file's MD5").to_string();
    assert_eq!(count(&format!("hash={sha}")), 1);
    assert_eq!(count(&format!("hash={md5}")), 1);
    assert_eq!(count(&format!("md5={}", md5.to_uppercase())), 1);
    assert_eq!(count(&format!("hash={}", "0".repeat(32))), 0);
    let bad = op.get("/api/v1/detections?hash=abc", &[]);
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("`hash`"), "{}", bad.body);
    let page = op.get(&format!("/detections?hash={md5}"), &[]);
    assert_eq!(page.status, 200);
    assert!(page.body.contains(r#"id="hash""#), "the search box");
    assert!(page.body.contains("console_marker"), "{}", page.body);
    let page = op.get(&format!("/detections?hash={}", "0".repeat(64)), &[]);
    assert!(page.body.contains("No detections match."), "{}", page.body);
    // vedettectl takes the same filters.
    let listed = |args: &[&str]| {
        let mut all = vec!["detections", "list", "--json"];
        all.extend_from_slice(args);
        vedette_tests::json_lines(&c.ctl_ok(&all)).len()
    };
    assert_eq!(listed(&["--text", "DROPPER.SH"]), 1);
    assert_eq!(listed(&["--sha256", &sha]), 1);
    assert_eq!(listed(&["--kind", "yara", "--rule", "console_marker"]), 1);
    assert_eq!(listed(&["--kind", "hash"]), 0);
    assert_eq!(
        listed(&[
            "--rule",
            "console_marker",
            "--until",
            "2000-01-01T00:00:00Z"
        ]),
        0
    );
    let bad = op.get("/api/v1/detections?kind=worm", &[]);
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["error"].as_str().unwrap().contains("`kind`"),
        "{}",
        bad.body
    );
    let bad = op.get("/api/v1/detections?since=yesterday", &[]);
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("`since`"), "{}", bad.body);
    let rollout = op.get("/api/v1/bundles/0/rollout", &[]).json();
    assert!(rollout["version"].as_u64().unwrap() >= 1, "{rollout}");
    let agents = op.get("/api/v1/agents?limit=1", &[]).json();
    assert_eq!(agents["agents"][0]["id"], agent.id.as_str());

    // A state change without the CSRF token, or with a wrong one, is refused and changes
    // nothing; with it, it happens.
    let revoke = format!("/api/v1/agents/{}/revoke", agent.id);
    let r = op.post(&revoke, &[], "application/json", "{}");
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("CSRF"), "{}", r.body);
    let r = op.post(
        &revoke,
        &[("x-csrf-token", "00ff")],
        "application/json",
        "{}",
    );
    assert_eq!(r.status, 403);
    let r = op.post(
        &revoke,
        &[],
        "application/x-www-form-urlencoded",
        "csrf=wrong",
    );
    assert_eq!(r.status, 403);
    let state = |c: &Collector| {
        c.agents()
            .into_iter()
            .find(|a| a["id"] == agent.id.as_str())
            .unwrap()["revoked"]
            .clone()
    };
    assert_eq!(state(&c), false);
    let r = op.post(
        &revoke,
        &[("x-csrf-token", &csrf)],
        "application/json",
        "{}",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["revoked"], true);
    assert_eq!(state(&c), true);

    // Accounts: the sign-in form's token is bound to its cookie; a wrong password is 401; the
    // session cookie is Secure, HttpOnly and SameSite; signing out needs the CSRF token.
    let form = anon.get("/login", &[]);
    assert_eq!(form.status, 200);
    let nonce = form.cookie("__Host-vedette-login").expect("login cookie");
    let token = login_token(&form.body);
    let login_cookie = format!("__Host-vedette-login={nonce}");
    let post_login = |user: &str, password: &str, cookie: &str| {
        let body = format!(
            "user={user}&password={}&token={token}",
            password.replace(' ', "+")
        );
        anon.post(
            "/login",
            &[("cookie", cookie)],
            "application/x-www-form-urlencoded",
            &body,
        )
    };
    assert_eq!(
        post_login("alice", PASSWORD, "").status,
        403,
        "no login cookie"
    );
    assert_eq!(
        post_login("alice", "wrong password here", &login_cookie).status,
        401
    );
    assert_eq!(post_login("mallory", PASSWORD, &login_cookie).status, 401);
    let ok = post_login("alice", PASSWORD, &login_cookie);
    assert_eq!(ok.status, 303, "{}", ok.body);
    let set = ok
        .headers_named("set-cookie")
        .into_iter()
        .find(|c| c.starts_with("__Host-vedette-session="))
        .expect("session cookie")
        .to_string();
    for attr in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{set}");
    }
    let session_cookie = format!(
        "__Host-vedette-session={}",
        ok.cookie("__Host-vedette-session").unwrap()
    );
    let me = anon
        .get("/api/v1/session", &[("cookie", &session_cookie)])
        .json();
    assert_eq!(me["name"], "alice");
    assert_eq!(me["account"], true);
    let page = anon.get("/detections", &[("cookie", &session_cookie)]);
    assert_eq!(page.status, 200);
    assert!(page.body.contains("console_marker"), "{}", page.body);
    assert!(!page.body.contains("<script>"), "no inline script");
    let forged = session_cookie.replacen("vedette-session=", "vedette-session=00", 1);
    assert_eq!(
        anon.get("/api/v1/session", &[("cookie", &forged)]).status,
        401
    );
    let out = anon.post(
        "/logout",
        &[("cookie", &session_cookie)],
        "application/x-www-form-urlencoded",
        "",
    );
    assert_eq!(out.status, 403);
    // A new password ends the session.
    add_user(&c, "alice", "another long enough password");
    assert_eq!(
        anon.get("/api/v1/session", &[("cookie", &session_cookie)])
            .status,
        401
    );

    // An account limited to another organisation sees none of this one's detections or
    // agents, nor the collector-wide intel, and cannot revoke its agents.
    c.ctl_ok(&["orgs", "create", "cert-fr"]);
    add_user_in(&c, "carol", PASSWORD, Some("cert-fr"));
    let carol = sign_in(&anon, "carol", PASSWORD);
    let scoped = [("cookie", carol.as_str())];
    let me = anon.get("/api/v1/session", &scoped).json();
    assert_eq!(me["org"], "cert-fr");
    let seen = anon.get("/api/v1/detections", &scoped).json();
    assert_eq!(seen["detections"].as_array().unwrap().len(), 0, "{seen}");
    assert_eq!(
        anon.get("/api/v1/agents", &scoped).json()["agents"],
        serde_json::json!([])
    );
    assert_eq!(
        anon.get(&format!("/api/v1/detections/{seq}"), &scoped)
            .status,
        404
    );
    assert_eq!(anon.get("/api/v1/intel", &scoped).status, 403);
    let carol_csrf = me["csrf"].as_str().unwrap().to_string();
    let r = anon.post(
        &revoke,
        &[("cookie", carol.as_str()), ("x-csrf-token", &carol_csrf)],
        "application/json",
        "{}",
    );
    assert_eq!(r.status, 403, "{}", r.body);

    // The document is valid OpenAPI, by a validator from PyPI.
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../collector/openapi.json");
    match Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&doc)
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) if String::from_utf8_lossy(&out.stderr).contains("No module named") => {
            missing_peer(
                "openapi-spec-validator",
                "pip install openapi-spec-validator",
            );
        }
        other => panic!("openapi-spec-validator: {other:?}"),
    }
}

#[test]
fn console_in_chromium_shows_live_detections_filters_opens_details_and_revokes() {
    if chromium().is_none() {
        missing_peer(
            "chromium and chromedriver",
            "apt-get install chromium chromium-driver",
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (c, base) = console_collector(&tmp.path().join("collector"));
    let (one, watch_one) = watching_agent(&c, tmp.path(), "web-one", "VEDETTE-BROWSER-MARKER");
    let (two, watch_two) = watching_agent(&c, tmp.path(), "web-two", "VEDETTE-BROWSER-MARKER");
    let shots = std::env::var_os("VEDETTE_SCREENSHOTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("vedette-console-screenshots"));
    let b = Browser::start(&tmp.path().join("browser"), &shots);

    // Without a session the console shows the sign-in form.
    b.goto(&format!("{base}/detections"));
    b.find("form#login");
    b.type_into("#user", "alice");
    b.type_into("#password", PASSWORD);
    b.screenshot("login");
    b.click("#signin");
    wait_for(Duration::from_secs(10), "the detections page", || {
        b.url().ends_with("/detections").then_some(())
    });
    b.find("table#detections");

    // Files written now appear on the open page, without reloading it.
    let rows = |b: &Browser| {
        b.find_all("table#detections tbody tr")
            .iter()
            .map(|r| b.text_of(r))
            .collect::<Vec<_>>()
    };
    std::fs::write(watch_one.join("first.sh"), "echo VEDETTE-BROWSER-MARKER\n").unwrap();
    std::fs::write(watch_two.join("second.sh"), "echo VEDETTE-BROWSER-MARKER\n").unwrap();
    let seen = wait_for(
        Duration::from_secs(15),
        "both detections on the page",
        || {
            let r = rows(&b);
            (r.iter().any(|t| t.contains("first.sh")) && r.iter().any(|t| t.contains("second.sh")))
                .then_some(r)
        },
    );
    // (Agents also report what they see of this machine's processes: only the files count here.)
    assert!(
        seen.iter()
            .filter(|t| t.contains(".sh "))
            .all(|t| t.contains("console_marker")),
        "{seen:?}"
    );
    b.screenshot("detections");

    // Filter by agent.
    b.click(&format!("#agent option[value=\"{}\"]", one.id));
    b.click("#apply");
    wait_for(Duration::from_secs(10), "the filtered page", || {
        b.url().contains(&format!("agent={}", one.id)).then_some(())
    });
    let filtered = wait_for(Duration::from_secs(10), "filtered rows", || {
        let r = rows(&b);
        (!r.is_empty()).then_some(r)
    });
    assert!(
        filtered.iter().all(|t| t.contains("web-one")),
        "{filtered:?}"
    );
    assert!(
        filtered.iter().all(|t| !t.contains("second.sh")),
        "{filtered:?}"
    );
    b.screenshot("detections-filtered");

    // The detail page: everything the agent sent, and the indicator's provenance.
    b.click("table#detections tbody tr a.rule");
    b.find("section#provenance");
    let detail = b.page_text();
    assert!(detail.contains("first.sh"), "{detail}");
    assert!(detail.contains("sha256"), "{detail}");
    assert!(detail.contains(&one.id), "{detail}");
    assert!(detail.contains("yara"), "{detail}");
    b.screenshot("detection-detail");

    // The search box: a file's MD5 finds that file on both hosts, and nothing else.
    let sum = std::process::Command::new("md5sum")
        .arg(watch_one.join("first.sh"))
        .output()
        .expect("run md5sum");
    let md5 = String::from_utf8_lossy(&sum.stdout)[..32].to_string();
    b.goto(&format!("{base}/detections"));
    b.type_into("#hash", &md5);
    b.click("#apply");
    wait_for(Duration::from_secs(10), "the search's page", || {
        b.url().contains(&format!("hash={md5}")).then_some(())
    });
    let found = wait_for(Duration::from_secs(10), "the file on both hosts", || {
        let r = rows(&b);
        (r.len() == 2).then_some(r)
    });
    assert!(found.iter().any(|t| t.contains("first.sh")), "{found:?}");
    assert!(found.iter().any(|t| t.contains("second.sh")), "{found:?}");
    b.screenshot("detections-by-hash");

    // The console opens on its Alerts page: the file on both hosts is one alert of two hosts.
    b.goto(&format!("{base}/"));
    wait_for(Duration::from_secs(10), "the alerts page", || {
        b.url().ends_with("/alerts").then_some(())
    });
    let row = wait_for(Duration::from_secs(10), "the file's alert", || {
        b.find_all("table#alerts tbody tr")
            .iter()
            .map(|r| b.text_of(r))
            .find(|t| t.contains("console_marker") && t.contains("sha256:"))
    });
    assert!(row.contains("open default 2 2"), "{row}");
    b.screenshot("alerts");
    let id: String = row
        .trim_start_matches('#')
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    b.goto(&format!("{base}/alerts/{id}"));
    b.find("form#verdict");
    assert!(b.page_text().contains("first.sh"), "its detections");
    // A verdict given there is in its history, with the exception made with it.
    b.click("#status option[value=\"false-positive\"]");
    b.type_into("#note", "our deploy script");
    b.click("#except");
    b.click("#judge");
    let history = wait_for(
        Duration::from_secs(10),
        "the verdict in the history",
        || {
            let t = b.text_now("table#verdicts")?;
            t.contains("false-positive").then_some(t)
        },
    );
    assert!(
        history.contains("console:alice") && history.contains("our deploy script"),
        "{history}"
    );
    assert!(
        history.contains("ex-"),
        "the exception made with it: {history}"
    );
    b.screenshot("alert-judged");
    // That exception suppresses the file's next detection at the collector.
    std::fs::write(watch_one.join("third.sh"), "echo VEDETTE-BROWSER-MARKER\n").unwrap();
    let suppressed = wait_for(Duration::from_secs(15), "the suppressed detection", || {
        let out = c.ctl_ok(&[
            "detections",
            "list",
            "--json",
            "--suppressed",
            "--rule",
            "console_marker",
        ]);
        vedette_tests::json_lines(&out)
            .into_iter()
            .find(|d| d["path"].as_str().is_some_and(|p| p.ends_with("third.sh")))
    });
    assert!(
        suppressed["exception_id"]
            .as_str()
            .is_some_and(|e| e.starts_with("ex-")),
        "{suppressed}"
    );
    assert!(
        !detections_via_ctl(&c)
            .iter()
            .any(|d| d["path"].as_str().is_some_and(|p| p.ends_with("third.sh"))),
        "hidden from the default listing"
    );

    // The other pages render.
    for (path, name, marker) in [
        ("/chart", "chart", "svg#chart"),
        ("/intel", "intel", "section#sources"),
    ] {
        b.goto(&format!("{base}{path}"));
        b.find(marker);
        b.screenshot(name);
    }

    // Two bundles, the second to the canary label only: the rules page shows the rollout per
    // label and the diff between them.
    let v1 = rule_dir(
        &tmp.path().join("bundle-v1"),
        "fleet_rule_one",
        "VEDETTE-FLEET-ONE",
    );
    c.ctl_ok(&["rules", "publish", v1.to_str().unwrap()]);
    c.ctl_ok(&["agents", "label", &one.id, "--add", "canary"]);
    let v2 = tmp.path().join("bundle-v2");
    rule_dir(&v2, "fleet_rule_one", "VEDETTE-FLEET-ONE");
    rule_dir(&v2, "fleet_rule_two", "VEDETTE-FLEET-TWO");
    c.ctl_ok(&["rules", "publish", "--to", "canary", v2.to_str().unwrap()]);
    b.goto(&format!("{base}/rules"));
    b.find("section#rollout");
    let labels = b.text_of(&b.find("table#by-label"));
    let line = |label: &str| {
        labels
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no row for {label}: {labels}"))
            .to_string()
    };
    assert!(line("canary").contains("canary 1 2"), "{labels}");
    assert!(line("(no label)").contains("(no label) 1 1"), "{labels}");
    assert!(
        b.page_text().contains("label canary"),
        "the history says where v2 went"
    );
    b.screenshot("rules");
    b.click("#diff");
    b.find("section.diff");
    let diff = b.page_text();
    assert!(diff.contains("fleet_rule_two.yar"), "{diff}");
    assert!(diff.contains("added"), "{diff}");
    assert!(diff.contains("+rule fleet_rule_two"), "{diff}");
    assert!(
        !diff.contains("fleet_rule_one.yar"),
        "unchanged file shown: {diff}"
    );
    b.screenshot("rules-diff");

    // Detections by label: only the canary's host.
    b.goto(&format!("{base}/detections?label=canary"));
    b.find("table#detections");
    let hosts: std::collections::BTreeSet<String> = b
        .find_all("table#detections tbody tr td:nth-child(2)")
        .iter()
        .map(|e| b.text_of(e))
        .collect();
    assert_eq!(
        hosts.into_iter().collect::<Vec<_>>(),
        ["web-one"],
        "only the canary's detections"
    );
    assert!(b.text_of(&b.find("#label")).contains("canary"));

    // A hunt started from the form: the page fills in as the agents answer.
    let found = detections_via_ctl(&c);
    let sha = found
        .iter()
        .find_map(|d| d["sha256"].as_str())
        .expect("a detection with a digest")
        .to_string();
    b.goto(&format!("{base}/hunts"));
    b.find("form#start-hunt");
    b.type_into("#digests", &sha);
    b.click("#hunt");
    wait_for(Duration::from_secs(10), "the hunt's page", || {
        b.url().contains("/hunts/hunt-").then_some(())
    });
    let answered = wait_for(Duration::from_secs(30), "both agents' answers", || {
        let text = b.page_text();
        text.contains("2 of 2 agent(s) answered").then_some(text)
    });
    assert!(answered.contains("present"), "{answered}");
    b.screenshot("hunt");

    // Revoke the second agent, after confirming.
    b.goto(&format!("{base}/agents"));
    b.find("table#agents");
    let agents = b.page_text();
    assert!(
        agents.contains("web-one") && agents.contains("web-two"),
        "{agents}"
    );
    assert!(agents.contains("labels: canary"), "{agents}");
    b.screenshot("agents");
    b.click(&format!("tr[data-agent=\"{}\"] a.revoke", two.id));
    b.find("form#confirm-revoke");
    b.screenshot("revoke-confirm");
    assert!(
        !c.agents()
            .iter()
            .any(|a| a["id"] == two.id.as_str() && a["revoked"] == true),
        "revoked before confirming"
    );
    b.click("#confirm");
    wait_for(
        Duration::from_secs(10),
        "the agent page after revoking",
        || {
            b.url()
                .ends_with(&format!("/agents/{}", two.id))
                .then_some(())
        },
    );
    let after = b.page_text();
    assert!(after.contains("revoked"), "{after}");
    b.screenshot("agent-revoked");
    let row = c
        .agents()
        .into_iter()
        .find(|a| a["id"] == two.id.as_str())
        .unwrap();
    assert_eq!(row["revoked"], true);
    let other = c
        .agents()
        .into_iter()
        .find(|a| a["id"] == one.id.as_str())
        .unwrap();
    assert_eq!(other["revoked"], false);

    // The Audit page: the sign-in and the revocation, by the console account, newest first.
    b.goto(&format!("{base}/audit"));
    let table = b.find("table#audit");
    let text = b.text_of(&table);
    let revoked_at = text
        .find("agent.revoke")
        .expect("the revocation in the audit log");
    let signed_in_at = text
        .find("console.sign_in")
        .expect("the sign-in in the audit log");
    assert!(revoked_at < signed_in_at, "newest first: {text}");
    assert!(
        text.contains("console:alice") && text.contains(two.id.as_str()),
        "{text}"
    );
    b.screenshot("audit");
}

/// Sign-in guessing is counted before any password is checked, one address cannot take every
/// connection, and a request body that does not arrive in time ends its connection.
#[test]
fn guessing_and_slow_or_greedy_clients_are_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, base) = console_collector(tmp.path());
    let anon = anonymous(&c, &base);
    let form = anon.get("/login", &[]);
    let nonce = form.cookie("__Host-vedette-login").expect("login cookie");
    let body = format!(
        "user=alice&password=not+the+password&token={}",
        login_token(&form.body)
    );
    // 300 wrong passwords at once (12 connections: under the per-address cap of 16 with room
    // for connections the client closed and the server has not yet seen go).
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..12)
            .map(|_| {
                let (anon, nonce, body) = (&anon, &nonce, &body);
                scope.spawn(move || {
                    (0..25)
                        .map(|_| {
                            anon.post(
                                "/login",
                                &[("cookie", &format!("__Host-vedette-login={nonce}"))],
                                "application/x-www-form-urlencoded",
                                body,
                            )
                            .status
                        })
                        .collect::<Vec<u16>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
    let log = c.proc.as_ref().unwrap().log_text();
    let verified = log.matches("console sign-in failed").count();
    let refused = log.matches("console sign-in refused").count();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("sign-in")).collect();
    assert_eq!(verified, 10, "passwords checked: {verified}: {lines:#?}");
    assert_eq!(refused, 290, "refused unchecked: {refused}");

    // One address holding 16 connections (no handshake): its next one is closed at once.
    let port = base.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let held: Vec<std::net::TcpStream> = (0..16)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let closed_at_once = |from: &str| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            use tokio::io::AsyncReadExt;
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
            let mut s = sock
                .connect(format!("127.0.0.1:{port}").parse().unwrap())
                .await
                .unwrap();
            let mut b = [0u8; 1];
            // Closed: end of stream at once. Served: the server waits for the handshake.
            match tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => true,
                Ok(Ok(_)) | Err(_) => false,
            }
        })
    };
    assert!(
        closed_at_once("127.0.0.1"),
        "a 17th connection from one address"
    );
    assert!(!closed_at_once("127.0.0.2"), "another address is served");
    drop(held);
    wait_for(Duration::from_secs(10), "the address served again", || {
        (!closed_at_once("127.0.0.1")).then_some(())
    });

    // A body trickled one byte a second: the server ends it at its body deadline (10 s), well
    // before the client would give up (20 s).
    let started = std::time::Instant::now();
    let slow = anon.post_trickled("/login", 1000, Duration::from_secs(1));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(16) && slow != Ok(303),
        "a trickled body held the connection {took:?}: {slow:?}"
    );
}

/// Signs `user` in on a browser of its own, at `base`.
fn browser_as(tmp: &Path, base: &str, user: &str) -> Browser {
    let shots = std::env::var_os("VEDETTE_SCREENSHOTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("vedette-console-screenshots"));
    let b = Browser::start(&tmp.join(format!("browser-{user}")), &shots);
    b.goto(&format!("{base}/login"));
    b.find("form#login");
    b.type_into("#user", user);
    b.type_into("#password", PASSWORD);
    b.click("#signin");
    wait_for(Duration::from_secs(10), "the console after sign-in", || {
        b.url().ends_with("/detections").then_some(())
    });
    b.goto(&format!("{base}/actions"));
    b.find("table#actions");
    b
}

/// The text of the row of action `id` on the response page, once it says `state`.
fn action_row(b: &Browser, id: &str, state: &str) -> String {
    vedette_tests::wait_until(
        Duration::from_secs(30),
        &format!("{id} {state} on the page"),
        || {
            // Read apart, the row and its state cell may come from two loads of the page.
            let row = b.text_now(&format!("tr#{id}")).unwrap_or_default();
            match b.text_now(&format!("tr#{id} td.state")) {
                Some(s) if s.starts_with(state) && row.contains(&format!(" {state}")) => Ok(row),
                _ => Err(row),
            }
        },
    )
}

#[test]
fn in_chromium_one_operator_requests_a_quarantine_another_approves_and_both_see_it_done() {
    if chromium().is_none() {
        missing_peer(
            "chromium and chromedriver",
            "apt-get install chromium chromium-driver",
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (c, base) = console_collector(&tmp.path().join("collector"));
    add_user(&c, "bob", PASSWORD);
    c.ctl_ok(&[
        "orgs",
        "set",
        "default",
        "--response-approval",
        "two-person",
    ]);
    let mut agent = Agent::enroll(&c, &tmp.path().join("agent"));
    let watch = tmp.path().join("watch");
    std::fs::create_dir_all(&watch).unwrap();
    let rules = rule_dir(
        &tmp.path().join("rules"),
        "console_marker",
        "VEDETTE-RESPOND-MARKER",
    );
    let config = tmp.path().join("agent.toml");
    vedette_tests::watch_config(&config, &watch, &rules, "response = [\"quarantine\"]");
    agent.run(&c, &["--config", config.to_str().unwrap()]);
    let file = watch.join("webshell.php");
    std::fs::write(&file, "<?php // VEDETTE-RESPOND-MARKER\n").unwrap();
    let seq = wait_for(Duration::from_secs(30), "the detection", || {
        detections_via_ctl(&c)
            .into_iter()
            .find(|d| d["path"] == file.to_str().unwrap())
            .and_then(|d| d["seq"].as_u64())
    });

    // Alice asks for the quarantine from the detection's page; it waits for a second operator.
    let alice = browser_as(tmp.path(), &base, "alice");
    alice.goto(&format!("{base}/detections/{seq}"));
    alice.type_into("form#request-quarantine input.reason", "webshell, INC-77");
    alice.click("form#request-quarantine button");
    wait_for(Duration::from_secs(10), "the response page", || {
        alice.url().contains("/actions").then_some(())
    });
    let id = wait_for(Duration::from_secs(10), "the action's row", || {
        alice
            .text_now("table#actions tbody tr.action")
            .and_then(|t| t.split_whitespace().next().map(str::to_string))
    });
    let row = action_row(&alice, &id, "pending");
    assert!(row.contains("console:alice"), "{row}");
    assert!(file.exists(), "nothing done while pending");
    // Her own approval is refused.
    alice.click(&format!("tr#{id} button.approve"));
    wait_for(Duration::from_secs(10), "the refusal", || {
        alice
            .text_now("main")
            .filter(|t| t.contains("second operator"))
    });
    alice.screenshot("action-own-approval-refused");

    // Bob, in a session of his own, approves it; both pages then show it done.
    let bob = browser_as(tmp.path(), &base, "bob");
    action_row(&bob, &id, "pending");
    bob.click(&format!("tr#{id} button.approve"));
    let row = action_row(&bob, &id, "done");
    assert!(row.contains("console:bob"), "decided by bob: {row}");
    assert!(row.contains("quarantined"), "the agent's words: {row}");
    bob.screenshot("action-approved-done");
    alice.goto(&format!("{base}/actions"));
    action_row(&alice, &id, "done");
    assert!(!file.exists(), "quarantined");
    alice.goto(&format!("{base}/detections/{seq}"));
    wait_for(Duration::from_secs(10), "the detection marked", || {
        alice
            .text_now("#response")
            .filter(|t| t.contains("quarantined"))
    });
}

#[test]
fn agents_time_their_rules_on_their_own_files_and_the_rules_page_names_the_slowest_per_version() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, base) = console_collector(&tmp.path().join("collector"));
    c.ctl_ok(&["orgs", "create", "bravo"]);
    // Version 1: forty quick rules, and one whose regex has no atoms.
    let bundle = vedette_tests::rules_with_a_slow_one(&tmp.path().join("bundle"));
    c.ctl_ok(&["rules", "publish", bundle.to_str().unwrap()]);
    // A host whose files that rule is slow on; it scans them once it has the bundle.
    let mut agent = Agent::enroll(&c, &tmp.path().join("agent"));
    agent
        .env
        .push(("VEDETTE_HOSTNAME".into(), "slow-host".into()));
    let watch = tmp.path().join("watch");
    let local = tmp.path().join("local-rules");
    std::fs::create_dir_all(&watch).unwrap();
    std::fs::create_dir_all(&local).unwrap();
    // Letters, digits, letters, and never the digit after: the regex is tried at every byte
    // and never matches (a match would end its search early).
    for i in 0..5 {
        std::fs::write(
            watch.join(format!("notes-{i}.txt")),
            "abcdefgh12345ijklmnop ".repeat(5_000),
        )
        .unwrap();
    }
    let config = tmp.path().join("agent.toml");
    vedette_tests::watch_config(&config, &watch, &local, "");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("scan_on_start = false", "scan_on_start = true"),
    )
    .unwrap();
    agent.run(&c, &["--config", config.to_str().unwrap()]);

    let version = wait_for(
        Duration::from_secs(120),
        "the agent's timing of version 1",
        || {
            vedette_tests::json_lines(&c.ctl_ok(&["rules", "slow", "--json"]))
                .into_iter()
                .find(|v| v["version"] == 1 && v["rules"].as_array().is_some_and(|r| !r.is_empty()))
        },
    );
    assert_eq!(version["agents"], 1, "{version}");
    let first = &version["rules"][0];
    assert_eq!(first["rule"], "no_atoms", "{version}");
    assert!(
        first["file"].as_str().unwrap().ends_with("mixed.yar"),
        "{version}"
    );
    assert_eq!(first["line"], 2, "{version}");
    assert_eq!(first["hostname"], "slow-host", "{version}");
    assert_eq!(first["agent_id"], agent.id.as_str(), "{version}");
    assert!(first["share_percent"].as_f64().unwrap() > 50.0, "{version}");
    let text = c.ctl_ok(&["rules", "slow", "1"]);
    assert!(
        text.starts_with("version 1, measured by 1 agent(s):"),
        "{text}"
    );
    assert!(text.lines().nth(1).unwrap().contains("no_atoms"), "{text}");

    // The console's Rules page names it under its version, and the API says the same.
    let op = operator(&c, &base);
    let page = op.get("/rules", &[]);
    assert_eq!(page.status, 200);
    let section = &page.body[page.body.find("id=\"slow-rules\"").expect("the section")..];
    assert!(section.contains("Version 1 · 1 agent(s)"), "{section}");
    let row = &section[section.find("no_atoms").expect("the rule")..];
    assert!(row.contains("slow-host"), "{section}");
    let api = op.get("/api/v1/rules/slow", &[]).json();
    assert_eq!(api["versions"][0]["rules"][0]["rule"], "no_atoms", "{api}");

    // Another organisation's operator sees none of it.
    let bravo = crate::hunts::scoped_operator(&c, "bravo-soc", "bravo");
    let theirs = vedette_tests::vedettectl(&bravo, &["rules", "slow", "--json"]);
    assert!(
        theirs.status.success(),
        "{}",
        vedette_tests::output_text(&theirs)
    );
    assert!(
        theirs.stdout.is_empty(),
        "{}",
        vedette_tests::output_text(&theirs)
    );
}
