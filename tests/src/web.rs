//! Clients for the collector's web console: an HTTPS client (trusting the collector's CA,
//! optionally presenting a client certificate) and a minimal W3C WebDriver client driving
//! Debian's headless Chromium through chromedriver.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

use crate::{Proc, free_port, wait_until};

/// A response: status, headers (lower-case names) and body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name`.
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    /// The value a `Set-Cookie` header gives cookie `name`.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.headers_named("set-cookie").into_iter().find_map(|c| {
            let first = c.split(';').next()?;
            let (k, v) = first.split_once('=')?;
            (k == name).then(|| v.to_string())
        })
    }
}

/// An HTTPS client for the console at `base` (`https://127.0.0.1:PORT`).
pub struct Https {
    agent: ureq::Agent,
    pub base: String,
}

impl Https {
    /// Trusts `ca` (PEM); presents the certificate and key in `client` when given.
    pub fn new(base: &str, ca: &Path, client: Option<(&Path, &Path)>) -> Https {
        use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};
        let ca_pem = std::fs::read(ca).expect("CA certificate");
        let root = Certificate::from_pem(&ca_pem).expect("CA PEM");
        let mut tls = TlsConfig::builder().root_certs(RootCerts::new_with_certs(&[root]));
        if let Some((crt, key)) = client {
            let crt = Certificate::from_pem(&std::fs::read(crt).expect("client certificate"))
                .expect("client certificate PEM");
            let key = PrivateKey::from_pem(&std::fs::read(key).expect("client key"))
                .expect("client key PEM");
            tls = tls.client_cert(Some(ClientCert::new_with_certs(&[crt], key)));
        }
        let config = ureq::Agent::config_builder()
            .tls_config(tls.build())
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(Duration::from_secs(20)))
            .build();
        Https {
            agent: config.into(),
            base: base.to_string(),
        }
    }

    fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
        let mut r = r.unwrap_or_else(|e| panic!("HTTPS request failed: {e}"));
        let headers = r
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    v.to_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        Reply {
            status: r.status().as_u16(),
            headers,
            body: r.body_mut().read_to_string().unwrap_or_default(),
        }
    }

    /// `GET PATH` with these extra headers (`cookie`, ...).
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Https::reply(req.call())
    }

    /// `POST PATH` with a body of `content_type`.
    pub fn post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        content_type: &str,
        body: &str,
    ) -> Reply {
        let mut req = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("content-type", content_type);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Https::reply(req.send(body))
    }
}

impl Https {
    /// `POST PATH` announcing a body of `len` bytes and sending one byte every `every`: a slow
    /// client. The status the server answered with, or why the request ended without one.
    pub fn post_trickled(&self, path: &str, len: usize, every: Duration) -> Result<u16, String> {
        /// Yields `left` bytes, one per read, each after `every` (the fault under test).
        struct Trickle {
            left: usize,
            every: Duration,
        }
        impl std::io::Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.left == 0 || buf.is_empty() {
                    return Ok(0);
                }
                std::thread::sleep(self.every);
                buf[0] = b'a';
                self.left -= 1;
                Ok(1)
            }
        }
        let mut body = Trickle { left: len, every };
        self.agent
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("content-length", len.to_string())
            .send(ureq::SendBody::from_reader(&mut body))
            .map(|r| r.status().as_u16())
            .map_err(|e| e.to_string())
    }
}

/// A headless Chromium session through chromedriver.
pub struct Browser {
    driver: Proc,
    base: String,
    session: String,
    http: ureq::Agent,
    /// Where screenshots go.
    pub shots: PathBuf,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Where Debian puts Chromium and chromedriver, if both are here.
pub fn chromium() -> Option<(PathBuf, PathBuf)> {
    let browser = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())?;
    let driver = PathBuf::from("/usr/bin/chromedriver");
    driver.exists().then_some((browser, driver))
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session that accepts the collector's
    /// certificate. `dir` holds the browser profile and the driver's log.
    pub fn start(dir: &Path, shots: &Path) -> Browser {
        let (chromium, chromedriver) = chromium().expect("chromium and chromedriver");
        std::fs::create_dir_all(dir).expect("browser dir");
        std::fs::create_dir_all(shots).expect("screenshot dir");
        let port = free_port();
        let mut cmd = std::process::Command::new(chromedriver);
        cmd.arg(format!("--port={port}"));
        let driver = Proc::spawn("chromedriver", &mut cmd, dir.join("chromedriver.log"));
        let base = format!("http://127.0.0.1:{port}");
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        wait_until(Duration::from_secs(20), "chromedriver to answer", || {
            http.get(format!("{base}/status"))
                .call()
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        let profile = dir.join("profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1366,1000",
                         format!("--user-data-dir={}", profile.display())],
            },
        }}});
        let mut b = Browser {
            driver,
            base,
            session: String::new(),
            http,
            shots: shots.to_owned(),
        };
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        b
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, text) = self.request(method, path, body);
        if status >= 400 {
            panic!(
                "webdriver {method} {path}: {status} {text}\n{}",
                self.driver.log_text()
            );
        }
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        v["value"].clone()
    }

    /// A WebDriver request: its status and body.
    fn request(&self, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
        let url = format!("{}{path}", self.base);
        let r = match method {
            "GET" => self.http.get(&url).call(),
            "DELETE" => self.http.delete(&url).call(),
            _ => self
                .http
                .post(&url)
                .header("content-type", "application/json")
                .send(body.unwrap_or(json!({})).to_string()),
        };
        let mut r = r.unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}"));
        let text = r.body_mut().read_to_string().unwrap_or_default();
        (r.status().as_u16(), text)
    }

    fn s(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", &self.s("/url"), Some(json!({ "url": url })));
    }

    pub fn url(&self) -> String {
        self.call("GET", &self.s("/url"), None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The element ids matching a CSS selector (none: empty).
    pub fn find_all(&self, css: &str) -> Vec<String> {
        self.call(
            "POST",
            &self.s("/elements"),
            Some(json!({"using": "css selector", "value": css})),
        )
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e[ELEMENT].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
    }

    /// The first element matching `css`, waiting up to 10 s for it.
    pub fn find(&self, css: &str) -> String {
        wait_until(Duration::from_secs(10), &format!("element `{css}`"), || {
            self.find_all(css)
                .into_iter()
                .next()
                .ok_or_else(|| format!("none on {}", self.url()))
        })
    }

    pub fn click(&self, css: &str) {
        let el = self.find(css);
        self.call("POST", &self.s(&format!("/element/{el}/click")), None);
    }

    pub fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css);
        self.call(
            "POST",
            &self.s(&format!("/element/{el}/value")),
            Some(json!({ "text": text })),
        );
    }

    pub fn text_of(&self, element: &str) -> String {
        self.call("GET", &self.s(&format!("/element/{element}/text")), None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The text of the first element matching `css` now; None when there is none yet, or when
    /// a page load replaced it meanwhile (after a form is sent, say).
    pub fn text_now(&self, css: &str) -> Option<String> {
        let el = self.find_all(css).into_iter().next()?;
        let (status, text) = self.request("GET", &self.s(&format!("/element/{el}/text")), None);
        let v: Value = serde_json::from_str(&text).ok()?;
        (status < 400).then(|| v["value"].as_str().map(str::to_string))?
    }

    /// The visible text of the page.
    pub fn page_text(&self) -> String {
        let body = self.find("body");
        self.text_of(&body)
    }

    /// Saves a PNG screenshot of the page as `NAME.png`, prints and returns its path.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        let b64 = self.call("GET", &self.s("/screenshot"), None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap_or_default())
            .expect("the screenshot is base64");
        assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        // Straight to standard error, past the test harness's capture: the path is in the log
        // of a passing run too.
        let _ = writeln!(
            std::io::stderr(),
            "screenshot of {name}: {}",
            path.display()
        );
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self
                .http
                .delete(format!("{}/session/{}", self.base, self.session))
                .call();
        }
    }
}
