//! `collector.toml`: read raw, then validated into a [`Config`] that names every problem at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
pub use vedette_ops::config::ConfigError;

use crate::store::StoreLocation;

/// Where the metrics endpoint listens when `metrics_listen` is absent.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// The file as written. Relative paths are relative to the file's own directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Address and port the gRPC server listens on, e.g. `0.0.0.0:7443`.
    pub listen: String,
    /// Where Prometheus scrapes `/metrics` (plain HTTP), or `off`. Default `127.0.0.1:9464`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// Where the web console and its JSON API (`/api/v1/`) listen, over HTTPS with the server
    /// certificate, e.g. `0.0.0.0:8443`. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_listen: Option<String>,
    /// Where detections and agents are kept (`[store] url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<RawStore>,
    /// A SQLite database file (the same as `[store] url = "sqlite:PATH"`; kept for configs
    /// written before `[store]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<PathBuf>,
    /// CA and server certificate files.
    pub tls: RawTls,
    /// How long a shutdown waits for open streams to finish, e.g. `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_grace: Option<String>,
    /// Detections received longer ago than this are deleted, e.g. `90d`; default: kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<String>,
    /// An agent that sends nothing for this long, without having said goodbye, becomes a
    /// `vedette.agent_silent` detection, e.g. `5m` (default); `0s`: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silent_after: Option<String>,
    /// An agent that still runs an older bundle this long after a newer one was published
    /// becomes a `vedette.agent_stale_bundle` detection, e.g. `1h` (default); `0s`: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_after: Option<String>,
    /// Default lifetime of enrollment tokens, e.g. `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ttl: Option<String>,
    /// Public keys (PEM files) of the maintainers whose signed rule bundles are accepted and
    /// pinned by agents at enrollment.
    #[serde(default)]
    pub maintainer_keys: Vec<PathBuf>,
    /// Accept bundles with no signature at all. Insecure: anyone with the maintainer role could
    /// push rules that agents (if they allow unsigned bundles too) run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_allow_unsigned_bundles: bool,
    /// Threat-intelligence sources the collector polls (`[[intel.taxii]]`,
    /// `[[intel.misp_feed]]`); what they hold is staged for `vedettectl intel publish`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intel: Option<RawIntel>,
    /// Where detections go besides the store: `[export] organisation`, `[[export.jsonl]]`,
    /// `[[export.taxii]]`. Each sink keeps a cursor in the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<RawExport>,
    /// Resource limits (`[limits]`); every key has a default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<RawLimits>,
}

/// `[limits]`: what one client may use of the collector.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Open connections at once, of every kind (default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Open connections without a client certificate (enrollments) at once (default 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unauthenticated_connections: Option<usize>,
    /// A connection without a client certificate is closed this long after its handshake
    /// (default `20s`): enough to enroll, not to hold the collector's resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unauthenticated_timeout: Option<String>,
    /// Detections one agent may send per second, sustained (default 1000). Beyond it the
    /// collector acknowledges later (the agent keeps the rest in its spool); nothing is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_detections_per_second: Option<u32>,
    /// Detections one agent may send at once above the sustained rate (default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_detections_burst: Option<u32>,
    /// Messages (batches, heartbeats, bundle statuses) one agent may send per second,
    /// sustained (default 50; five seconds' worth at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_messages_per_second: Option<u32>,
    /// Lifetime of the certificates agents get at enrollment and renewal (default `397d`).
    /// Agents renew theirs once two thirds of it have passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_cert_lifetime: Option<String>,
}

/// Checked `[limits]`.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_unauthenticated_connections: usize,
    pub unauthenticated_timeout: Duration,
    pub agent_detections_per_second: u32,
    pub agent_detections_burst: u32,
    pub agent_messages_per_second: u32,
    pub agent_cert_lifetime: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_unauthenticated_connections: 256,
            unauthenticated_timeout: Duration::from_secs(20),
            agent_detections_per_second: 1_000,
            agent_detections_burst: 10_000,
            agent_messages_per_second: 50,
            agent_cert_lifetime: Duration::from_secs(397 * 24 * 3600),
        }
    }
}

/// A `[limits]` count: the default when absent; 0 refused (it would refuse everything).
fn limit_count(key: &str, v: Option<u64>, default: u64, problems: &mut Vec<String>) -> u64 {
    match v {
        None => default,
        Some(0) => {
            problems.push(format!("`limits.{key}`: 0 would refuse everything"));
            default
        }
        Some(n) => n,
    }
}

/// A `[limits]` duration of at least `min`; the default when absent.
fn limit_duration(
    key: &str,
    v: Option<&str>,
    default: Duration,
    min: Duration,
    problems: &mut Vec<String>,
) -> Duration {
    match v.map(humantime::parse_duration) {
        None => default,
        Some(Ok(x)) if x >= min => x,
        Some(Ok(_)) => {
            problems.push(format!(
                "`limits.{key}`: shorter than {}",
                humantime::format_duration(min)
            ));
            default
        }
        Some(Err(e)) => {
            problems.push(format!(
                "`limits.{key}`: `{}` is not a duration like `20s` ({e})",
                v.unwrap_or_default()
            ));
            default
        }
    }
}

impl RawLimits {
    fn validate(&self, problems: &mut Vec<String>) -> Limits {
        let d = Limits::default();
        let mut count =
            |key: &str, v: Option<u64>, default: u64| limit_count(key, v, default, problems);
        let max_connections = count(
            "max_connections",
            self.max_connections.map(|n| n as u64),
            d.max_connections as u64,
        ) as usize;
        let max_unauthenticated_connections = count(
            "max_unauthenticated_connections",
            self.max_unauthenticated_connections.map(|n| n as u64),
            d.max_unauthenticated_connections as u64,
        ) as usize;
        let rate = count(
            "agent_detections_per_second",
            self.agent_detections_per_second.map(u64::from),
            u64::from(d.agent_detections_per_second),
        ) as u32;
        let burst = count(
            "agent_detections_burst",
            self.agent_detections_burst.map(u64::from),
            u64::from(d.agent_detections_burst),
        ) as u32;
        let messages = count(
            "agent_messages_per_second",
            self.agent_messages_per_second.map(u64::from),
            u64::from(d.agent_messages_per_second),
        ) as u32;
        let unauthenticated_timeout = limit_duration(
            "unauthenticated_timeout",
            self.unauthenticated_timeout.as_deref(),
            d.unauthenticated_timeout,
            Duration::from_secs(1),
            problems,
        );
        let agent_cert_lifetime = limit_duration(
            "agent_cert_lifetime",
            self.agent_cert_lifetime.as_deref(),
            d.agent_cert_lifetime,
            Duration::from_secs(30),
            problems,
        );
        if burst < rate {
            problems.push(format!(
                "`limits.agent_detections_burst`: {burst} is below the sustained rate {rate}"
            ));
        }
        Limits {
            max_connections,
            max_unauthenticated_connections,
            unauthenticated_timeout,
            agent_detections_per_second: rate,
            agent_detections_burst: burst.max(rate),
            agent_messages_per_second: messages,
            agent_cert_lifetime,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExport {
    /// The organisation sightings are made by (a STIX identity), e.g. "CERT-XY".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organisation: Option<String>,
    /// ECS JSON lines appended to a file, one per detection.
    #[serde(default)]
    pub jsonl: Vec<RawJsonlSink>,
    /// STIX 2.1 sightings sent to a TAXII 2.1 collection.
    #[serde(default)]
    pub taxii: Vec<RawTaxii>,
    /// MISP sightings (`POST /sightings/add`) of the attributes detections came from.
    #[serde(default)]
    pub misp: Vec<RawMispSink>,
    /// Each new alert posted once to an HTTP endpoint (a chat channel, a ticketing system).
    #[serde(default)]
    pub webhook: Vec<RawWebhookSink>,
    /// Each detection as an RFC 5424 syslog message over TCP or TLS, its ECS JSON the message.
    #[serde(default)]
    pub syslog: Vec<RawSyslogSink>,
    /// The audit log's entries go to every `[[export.jsonl]]` file too, as ECS events
    /// (`event.dataset` "vedette.audit").
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub audit: bool,
    /// One sighting per indicator, organisation and window this long (default `1h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sighting_window: Option<String>,
}

/// The default `[export] sighting_window`.
pub const SIGHTING_WINDOW: Duration = Duration::from_secs(3600);

/// `[export] sighting_window`: from a minute to a week.
fn sighting_window(v: Option<&str>, problems: &mut Vec<String>) -> i64 {
    let window = match v.map(humantime::parse_duration) {
        None => SIGHTING_WINDOW,
        Some(Ok(d)) if d >= Duration::from_secs(60) && d <= Duration::from_secs(7 * 86_400) => d,
        Some(Ok(_)) => {
            problems.push("`export.sighting_window`: from 1m to 7d".into());
            SIGHTING_WINDOW
        }
        Some(Err(e)) => {
            problems.push(format!(
                "`export.sighting_window`: `{}` is not a duration like `1h` ({e})",
                v.unwrap_or_default()
            ));
            SIGHTING_WINDOW
        }
    };
    window.as_millis() as i64
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMispSink {
    /// The MISP instance, e.g. `https://misp.example.org/`.
    pub url: String,
    /// An API key (sent in the `Authorization` header).
    pub key: Secret,
    /// CA certificate (PEM) of the instance; default: the public web PKI roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// Send the key over plain `http://` (a trusted network only); logged at start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_insecure: bool,
}

/// A credential from the configuration; its `Debug` form never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The credential itself, to send.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJsonlSink {
    pub path: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhookSink {
    /// Where alerts are posted; for chat webhooks the URL itself is the secret, and is never
    /// shown whole.
    pub url: Secret,
    /// Sent as `Authorization: Bearer TOKEN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// `json` (default: the alert and its first detection as ECS) or `slack` (`{"text": …}`,
    /// which Slack, Mattermost and Teams incoming webhooks take).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// CA certificate (PEM) of the endpoint; default: the public web PKI roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// Post over plain `http://` (a trusted network only); logged at start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_insecure: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSyslogSink {
    /// `HOST:PORT` of the receiver.
    pub address: String,
    /// TLS (RFC 5425) instead of plain TCP (RFC 6587).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
    /// With `tls`, the CA certificate (PEM) of the receiver; default: the public web PKI roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
}

/// A checked export sink.
#[derive(Debug, Clone)]
pub enum SinkConfig {
    /// With `audit`, the audit log's entries go to the file too.
    Jsonl { path: PathBuf, audit: bool },
    Taxii {
        api_root: String,
        collection: String,
        auth: HttpAuth,
        ca_cert: Option<PathBuf>,
        /// One sighting per indicator, organisation and window this long (ms).
        window_ms: i64,
    },
    Misp {
        /// Ends in `/`.
        url: String,
        key: Secret,
        ca_cert: Option<PathBuf>,
        /// One sighting per attribute, organisation and window this long (ms).
        window_ms: i64,
    },
    Webhook {
        url: Secret,
        token: Option<Secret>,
        slack: bool,
        ca_cert: Option<PathBuf>,
    },
    Syslog {
        /// `HOST:PORT`.
        address: String,
        tls: bool,
        ca_cert: Option<PathBuf>,
    },
}

impl SinkConfig {
    /// The sink's name, which keys its cursor in the store.
    pub fn name(&self) -> String {
        match self {
            SinkConfig::Jsonl { path, .. } => format!("jsonl:{}", path.display()),
            SinkConfig::Taxii {
                api_root,
                collection,
                ..
            } => format!("taxii:{api_root}collections/{collection}/"),
            SinkConfig::Misp { url, .. } => format!("misp:{url}"),
            SinkConfig::Webhook { url, .. } => webhook_name(url.expose()),
            SinkConfig::Syslog { address, tls, .. } => {
                format!("syslog{}:{address}", if *tls { "+tls" } else { "" })
            }
        }
    }
}

/// A webhook's name: its host and a digest of the whole URL (whose path is often the secret).
fn webhook_name(url: &str) -> String {
    use sha2::{Digest, Sha256};
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let digest = hex::encode(Sha256::digest(url.as_bytes()));
    format!("webhook:{host}#{}", &digest[..12])
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIntel {
    #[serde(default)]
    pub taxii: Vec<RawTaxii>,
    #[serde(default)]
    pub misp_feed: Vec<RawMispFeed>,
}

/// A TAXII 2.1 collection to poll.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTaxii {
    /// The API root, e.g. `https://taxii.example.org/api1/`.
    pub url: String,
    /// The collection id.
    pub collection: String,
    /// HTTP basic authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// Bearer token (instead of a username and password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// Send the credentials over plain `http://` (a trusted network only); logged at start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_insecure: bool,
    /// How often to poll, e.g. `15m` (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// CA certificate (PEM) of the server; default: the public web PKI roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
}

/// A MISP feed to poll: `manifest.json` plus one file per event.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMispFeed {
    /// `https://…/feed/` or a directory on this host.
    pub url: String,
    /// How often to poll, e.g. `1h`; default `15m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// CA certificate (PEM) of the server; default: the public web PKI roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
}

/// A checked intelligence source.
#[derive(Debug, Clone)]
pub struct IntelSourceConfig {
    pub kind: IntelSourceKind,
    pub interval: Duration,
    pub ca_cert: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub enum IntelSourceKind {
    Taxii {
        /// The API root, ending in `/`.
        api_root: String,
        collection: String,
        auth: HttpAuth,
    },
    MispFeed {
        /// A URL ending in `/`, or a directory.
        location: String,
    },
}

#[derive(Debug, Clone)]
pub enum HttpAuth {
    None,
    Basic { username: String, password: Secret },
    Bearer(Secret),
}

impl IntelSourceConfig {
    /// What the source is called in `intel status` and in indicators' provenance.
    pub fn origin(&self) -> String {
        match &self.kind {
            IntelSourceKind::Taxii {
                api_root,
                collection,
                ..
            } => format!("{api_root}collections/{collection}/"),
            IntelSourceKind::MispFeed { location } => location.clone(),
        }
    }

    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            IntelSourceKind::Taxii { .. } => "taxii",
            IntelSourceKind::MispFeed { .. } => "misp_feed",
        }
    }
}

/// Polling more often than this is refused.
const MIN_INTEL_INTERVAL: Duration = Duration::from_secs(1);

/// A poll interval: 15 minutes when absent, at least [`MIN_INTEL_INTERVAL`].
fn poll_interval(key: &str, v: Option<&str>, problems: &mut Vec<String>) -> Duration {
    match v {
        None => Duration::from_secs(15 * 60),
        Some(s) => match humantime::parse_duration(s) {
            Ok(d) if d >= MIN_INTEL_INTERVAL => d,
            Ok(_) => {
                problems.push(format!("`{key}`: `{s}` is shorter than one second"));
                MIN_INTEL_INTERVAL
            }
            Err(e) => {
                problems.push(format!("`{key}`: `{s}` is not a duration like `15m` ({e})"));
                MIN_INTEL_INTERVAL
            }
        },
    }
}

/// A CA certificate file, relative to `base`, that must exist.
fn ca_file(
    key: &str,
    base: &Path,
    p: Option<&PathBuf>,
    problems: &mut Vec<String>,
) -> Option<PathBuf> {
    p.map(|p| {
        let p = base.join(p);
        if !p.is_file() {
            problems.push(format!(
                "`{key}`: `{}` does not exist or is not a file",
                p.display()
            ));
        }
        p
    })
}

fn is_http(url: &str) -> bool {
    url.starts_with("https://") || url.starts_with("http://")
}

/// Problems of an http(s) URL that credentials are sent to, or that names a source in
/// `intel status` and, as indicators' origin, on every agent and in exports: it may hold no
/// user name, password, query string or fragment, and credentials go over `https://` only,
/// unless `allow_insecure` (then with a warning).
fn check_url(
    key: &str,
    url: &str,
    credentials: bool,
    allow_insecure: bool,
    problems: &mut Vec<String>,
) {
    let Some(rest) = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
    else {
        return;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        problems.push(format!(
            "`{key}.url`: holds a user name or password; give them as `username` and \
             `password` (or `token`, or `key`): the URL is shown in `intel status` and travels \
             to every agent as the indicators' origin"
        ));
    }
    if rest.contains(['?', '#']) {
        problems.push(format!(
            "`{key}.url`: holds a query string or fragment; an API root or feed location has \
             none, and a secret in it would travel to every agent as the indicators' origin"
        ));
    }
    if credentials && url.starts_with("http://") {
        if allow_insecure {
            tracing::warn!(
                key,
                url,
                "credentials are sent over plain http:// (`allow_insecure = true`)"
            );
        } else {
            problems.push(format!(
                "`{key}.url`: credentials would be sent in clear over http://; use https://, or \
                 set `{key}.allow_insecure = true` on a network you trust"
            ));
        }
    }
}

/// `url` ending in `/`, as API roots and feed locations are joined.
fn with_slash(url: &str) -> String {
    let mut u = url.to_string();
    if !u.ends_with('/') {
        u.push('/');
    }
    u
}

/// The keys every intel source has (`interval`, `ca_cert`), under `key`.
struct SourceKeys<'a> {
    key: &'a str,
    base: &'a Path,
    interval: Option<&'a str>,
    ca_cert: Option<&'a PathBuf>,
}

impl SourceKeys<'_> {
    fn source(&self, kind: IntelSourceKind, problems: &mut Vec<String>) -> IntelSourceConfig {
        let key = self.key;
        IntelSourceConfig {
            kind,
            interval: poll_interval(&format!("{key}.interval"), self.interval, problems),
            ca_cert: ca_file(&format!("{key}.ca_cert"), self.base, self.ca_cert, problems),
        }
    }
}

impl RawTaxii {
    /// `key` names this entry in problems (`intel.taxii[0]`, `export.taxii[1]`).
    fn validate(&self, key: &str, base: &Path, problems: &mut Vec<String>) -> IntelSourceConfig {
        if !is_http(&self.url) {
            problems.push(format!(
                "`{key}.url`: `{}` is not an http(s):// URL",
                self.url
            ));
        }
        if self.collection.trim().is_empty() || self.collection.contains(['/', '?', '#']) {
            problems.push(format!(
                "`{key}.collection`: `{}` is not a collection id",
                self.collection
            ));
        }
        check_url(
            key,
            &self.url,
            self.username.is_some() || self.password.is_some() || self.token.is_some(),
            self.allow_insecure,
            problems,
        );
        let auth = match (&self.username, &self.password, &self.token) {
            (None, None, None) => HttpAuth::None,
            (Some(u), Some(p), None) => HttpAuth::Basic {
                username: u.clone(),
                password: p.clone(),
            },
            (None, None, Some(tok)) => HttpAuth::Bearer(tok.clone()),
            _ => {
                problems.push(format!(
                    "`{key}`: give `username` and `password`, or `token`, or none"
                ));
                HttpAuth::None
            }
        };
        let kind = IntelSourceKind::Taxii {
            api_root: with_slash(&self.url),
            collection: self.collection.clone(),
            auth,
        };
        let keys = SourceKeys {
            key,
            base,
            interval: self.interval.as_deref(),
            ca_cert: self.ca_cert.as_ref(),
        };
        keys.source(kind, problems)
    }
}

impl RawMispFeed {
    fn validate(&self, key: &str, base: &Path, problems: &mut Vec<String>) -> IntelSourceConfig {
        let location = if is_http(&self.url) {
            check_url(key, &self.url, false, false, problems);
            with_slash(&self.url)
        } else {
            let p = base.join(&self.url);
            if !p.is_dir() {
                problems.push(format!(
                    "`{key}.url`: `{}` is neither an http(s):// URL nor a directory",
                    p.display()
                ));
            }
            p.display().to_string()
        };
        let keys = SourceKeys {
            key,
            base,
            interval: self.interval.as_deref(),
            ca_cert: self.ca_cert.as_ref(),
        };
        keys.source(IntelSourceKind::MispFeed { location }, problems)
    }
}

impl RawIntel {
    /// The `[intel]` table: its TAXII collections and MISP feeds.
    fn validate(&self, base: &Path, problems: &mut Vec<String>) -> Vec<IntelSourceConfig> {
        let taxii = self
            .taxii
            .iter()
            .enumerate()
            .map(|(i, t)| t.validate(&format!("intel.taxii[{i}]"), base, problems));
        let mut out: Vec<IntelSourceConfig> = taxii.collect();
        for (i, f) in self.misp_feed.iter().enumerate() {
            out.push(f.validate(&format!("intel.misp_feed[{i}]"), base, problems));
        }
        out
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// `sqlite:PATH` (or a path) for one collector, `postgres://USER@HOST/DB` for several.
    pub url: String,
    /// For PostgreSQL: the CA certificate (PEM) that signed the database server's
    /// certificate; when set, the connection uses TLS and verifies the server against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// The CA certificate (PEM) that issued every certificate of the fleet.
    pub ca_cert: PathBuf,
    /// The CA private key (PEM); needed to sign agent certificates at enrollment.
    pub ca_key: PathBuf,
    /// The collector's server certificate (PEM).
    pub server_cert: PathBuf,
    /// The server certificate's private key (PEM).
    pub server_key: PathBuf,
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// None: no metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// None: no console.
    pub console_listen: Option<SocketAddr>,
    pub store: StoreLocation,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub shutdown_grace: Duration,
    pub token_ttl: Duration,
    /// None: detections are kept.
    pub retention: Option<Duration>,
    /// None: silent agents are not reported.
    pub silent_after: Option<Duration>,
    /// None: agents behind on bundles are not reported.
    pub stale_after: Option<Duration>,
    pub maintainer_keys: Vec<vedette_engine::bundle::PublicKey>,
    pub insecure_allow_unsigned_bundles: bool,
    pub intel_sources: Vec<IntelSourceConfig>,
    /// Who exports name as the maker of sightings (`[export] organisation`): the collector's
    /// operator, a STIX identity. Not a participating organisation (an `org`).
    pub producer: String,
    pub sinks: Vec<SinkConfig>,
    pub limits: Limits,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = vedette_ops::config::read_toml(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        raw.validate(base)
            .map_err(|problems| ConfigError::new(Some(path), problems))
    }
}

/// The `[tls]` files, checked to exist.
struct TlsFiles {
    ca_cert: PathBuf,
    ca_key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl RawTls {
    fn validate(&self, base: &Path, problems: &mut Vec<String>) -> TlsFiles {
        let mut file = |key: &str, p: &Path| {
            let p = base.join(p);
            if !p.is_file() {
                problems.push(format!(
                    "`tls.{key}`: `{}` does not exist or is not a file",
                    p.display()
                ));
            }
            p
        };
        TlsFiles {
            ca_cert: file("ca_cert", &self.ca_cert),
            ca_key: file("ca_key", &self.ca_key),
            server_cert: file("server_cert", &self.server_cert),
            server_key: file("server_key", &self.server_key),
        }
    }
}

/// The addresses a collector serves on.
struct Addresses {
    listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
    console_listen: Option<SocketAddr>,
}

/// How long an agent may run an older bundle than the latest before it is reported
/// (`stale_after`).
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(3600);

/// How long an agent may send nothing before it is reported silent (`silent_after`).
pub const DEFAULT_SILENT_AFTER: Duration = Duration::from_secs(300);

/// The top-level durations.
struct Times {
    shutdown_grace: Duration,
    token_ttl: Duration,
    retention: Option<Duration>,
    silent_after: Option<Duration>,
    stale_after: Option<Duration>,
}

impl RawExport {
    /// The `[export]` table: its sinks.
    fn validate(&self, base: &Path, problems: &mut Vec<String>) -> Vec<SinkConfig> {
        let mut sinks = Vec::new();
        let window_ms = sighting_window(self.sighting_window.as_deref(), problems);
        for j in &self.jsonl {
            let p = base.join(&j.path);
            if !p.parent().is_some_and(Path::is_dir) {
                problems.push(format!(
                    "`export.jsonl.path`: the directory of `{}` does not exist",
                    p.display()
                ));
            }
            sinks.push(SinkConfig::Jsonl {
                path: p,
                audit: self.audit,
            });
        }
        for (i, t) in self.taxii.iter().enumerate() {
            let t = t.validate(&format!("export.taxii[{i}]"), base, problems);
            if let IntelSourceKind::Taxii {
                api_root,
                collection,
                auth,
            } = t.kind
            {
                sinks.push(SinkConfig::Taxii {
                    api_root,
                    collection,
                    auth,
                    ca_cert: t.ca_cert,
                    window_ms,
                });
            }
        }
        for (i, m) in self.misp.iter().enumerate() {
            sinks.push(m.validate(&format!("export.misp[{i}]"), base, problems, window_ms));
        }
        for (i, w) in self.webhook.iter().enumerate() {
            sinks.push(w.validate(&format!("export.webhook[{i}]"), base, problems));
        }
        for (i, s) in self.syslog.iter().enumerate() {
            sinks.push(s.validate(&format!("export.syslog[{i}]"), base, problems));
        }
        sinks
    }
}

impl RawMispSink {
    fn validate(
        &self,
        key: &str,
        base: &Path,
        problems: &mut Vec<String>,
        window_ms: i64,
    ) -> SinkConfig {
        if !is_http(&self.url) {
            problems.push(format!(
                "`{key}.url`: `{}` is not an http(s):// URL",
                self.url
            ));
        }
        if self.key.expose().trim().is_empty() {
            problems.push(format!("`{key}.key`: empty"));
        }
        check_url(key, &self.url, true, self.allow_insecure, problems);
        SinkConfig::Misp {
            url: with_slash(&self.url),
            key: self.key.clone(),
            ca_cert: ca_file(
                &format!("{key}.ca_cert"),
                base,
                self.ca_cert.as_ref(),
                problems,
            ),
            window_ms,
        }
    }
}

impl RawWebhookSink {
    fn validate(&self, key: &str, base: &Path, problems: &mut Vec<String>) -> SinkConfig {
        let url = self.url.expose();
        let shown = webhook_name(url);
        if !is_http(url) {
            problems.push(format!("`{key}.url`: {shown} is not an http(s):// URL"));
        } else if url.starts_with("http://") && !self.allow_insecure {
            problems.push(format!(
                "`{key}.url`: {shown} is plain http://; alerts and the URL (often the \
                 secret) would cross the network in clear; use https:// or set \
                 `allow_insecure = true` for a trusted network"
            ));
        } else if url.starts_with("http://") {
            tracing::warn!(key, "alerts are posted over plain http:// (allow_insecure)");
        }
        let slack = match self.format.as_deref() {
            None | Some("json") => false,
            Some("slack") => true,
            Some(other) => {
                problems.push(format!(
                    "`{key}.format`: `{other}` is neither `json` nor `slack`"
                ));
                false
            }
        };
        SinkConfig::Webhook {
            url: self.url.clone(),
            token: self.token.clone(),
            slack,
            ca_cert: ca_file(
                &format!("{key}.ca_cert"),
                base,
                self.ca_cert.as_ref(),
                problems,
            ),
        }
    }
}

impl RawSyslogSink {
    fn validate(&self, key: &str, base: &Path, problems: &mut Vec<String>) -> SinkConfig {
        let port_ok = self.address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !port_ok {
            problems.push(format!(
                "`{key}.address`: `{}` is not HOST:PORT",
                self.address
            ));
        }
        if self.ca_cert.is_some() && !self.tls {
            problems.push(format!("`{key}.ca_cert`: given without `tls = true`"));
        }
        SinkConfig::Syslog {
            address: self.address.clone(),
            tls: self.tls,
            ca_cert: ca_file(
                &format!("{key}.ca_cert"),
                base,
                self.ca_cert.as_ref(),
                problems,
            ),
        }
    }
}

impl RawConfig {
    /// Checks every key, resolving relative paths against `base`; returns all problems found.
    pub fn validate(self, base: &Path) -> Result<Config, Vec<String>> {
        let mut problems = Vec::new();
        let p = &mut problems;
        let addresses = self.addresses(p);
        let tls = self.tls.validate(base, p);
        let times = self.times(p);
        let store = store_location(self.store.as_ref(), self.database.as_ref(), base)
            .map_err(|e| p.push(e.to_string()))
            .ok();
        let mut maintainer_keys = Vec::new();
        for key in &self.maintainer_keys {
            match vedette_engine::bundle::PublicKey::load(&base.join(key)) {
                Ok(keys) => maintainer_keys.extend(keys),
                Err(e) => p.push(format!("`maintainer_keys`: {e}")),
            }
        }
        let intel_sources = self
            .intel
            .as_ref()
            .map(|i| i.validate(base, p))
            .unwrap_or_default();
        let export = self.export.clone().unwrap_or_default();
        let sinks = export.validate(base, p);
        let limits = self.limits.clone().unwrap_or_default().validate(p);
        let (Some(listen), Some(store), true) = (addresses.listen, store, problems.is_empty())
        else {
            return Err(problems);
        };
        Ok(Config {
            listen,
            metrics_listen: addresses.metrics_listen,
            console_listen: addresses.console_listen,
            store,
            ca_cert: tls.ca_cert,
            ca_key: tls.ca_key,
            server_cert: tls.server_cert,
            server_key: tls.server_key,
            shutdown_grace: times.shutdown_grace,
            token_ttl: times.token_ttl,
            retention: times.retention,
            silent_after: times.silent_after,
            stale_after: times.stale_after,
            maintainer_keys,
            insecure_allow_unsigned_bundles: self.insecure_allow_unsigned_bundles,
            intel_sources,
            producer: export.organisation.unwrap_or_else(|| "Vedette".into()),
            sinks,
            limits,
        })
    }

    /// `listen`, `metrics_listen` and `console_listen`.
    fn addresses(&self, problems: &mut Vec<String>) -> Addresses {
        let listen = self
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| {
                problems.push(format!(
                    "`listen`: `{}` is not an address:port ({e})",
                    self.listen
                ))
            })
            .ok();
        let metrics_listen = vedette_ops::metrics::parse_listen(
            self.metrics_listen
                .as_deref()
                .unwrap_or(DEFAULT_METRICS_LISTEN),
        )
        .unwrap_or_else(|e| {
            problems.push(format!("`metrics_listen`: {e}"));
            None
        });
        let console_listen = match self.console_listen.as_deref() {
            None => None,
            Some(text) => vedette_ops::metrics::parse_listen(text).unwrap_or_else(|e| {
                problems.push(format!("`console_listen`: {e}"));
                None
            }),
        };
        Addresses {
            listen,
            metrics_listen,
            console_listen,
        }
    }

    /// `shutdown_grace`, `token_ttl` and `retention` (at least an hour).
    fn times(&self, problems: &mut Vec<String>) -> Times {
        let mut duration = |key: &str, v: &Option<String>, default: Duration| match v {
            None => default,
            Some(s) => humantime::parse_duration(s).unwrap_or_else(|e| {
                problems.push(format!(
                    "`{key}`: `{s}` is not a duration like `10s` or `1h` ({e})"
                ));
                default
            }),
        };
        let shutdown_grace = duration(
            "shutdown_grace",
            &self.shutdown_grace,
            Duration::from_secs(10),
        );
        let token_ttl = duration("token_ttl", &self.token_ttl, Duration::from_secs(3600));
        let silent_after = duration("silent_after", &self.silent_after, DEFAULT_SILENT_AFTER);
        let silent_after = (!silent_after.is_zero()).then_some(silent_after);
        let stale_after = duration("stale_after", &self.stale_after, DEFAULT_STALE_AFTER);
        let stale_after = (!stale_after.is_zero()).then_some(stale_after);
        let retention = self
            .retention
            .as_ref()
            .and_then(|s| match humantime::parse_duration(s) {
                Ok(d) if d >= Duration::from_secs(3600) => Some(d),
                Ok(_) => {
                    problems.push(format!("`retention`: `{s}` is shorter than one hour"));
                    None
                }
                Err(e) => {
                    problems.push(format!(
                        "`retention`: `{s}` is not a duration like `90d` ({e})"
                    ));
                    None
                }
            });
        Times {
            shutdown_grace,
            token_ttl,
            retention,
            silent_after,
            stale_after,
        }
    }
}

/// The store a configuration names: `[store]`, or the older `database` key.
fn store_location(
    store: Option<&RawStore>,
    database: Option<&PathBuf>,
    base: &Path,
) -> Result<StoreLocation, StoreConfigError> {
    match (store, database) {
        (Some(_), Some(_)) => Err(StoreConfigError::Both),
        (None, None) => Err(StoreConfigError::Missing),
        (None, Some(db)) => Ok(StoreLocation::Sqlite(base.join(db))),
        (Some(s), None) => {
            let mut location = StoreLocation::parse(&s.url, base)?;
            match (&mut location, &s.ca_cert) {
                (StoreLocation::Postgres { ca_cert, .. }, Some(p)) => {
                    let p = base.join(p);
                    if !p.is_file() {
                        return Err(StoreConfigError::CaCert(p));
                    }
                    *ca_cert = Some(p);
                }
                (StoreLocation::Sqlite(_), Some(_)) => return Err(StoreConfigError::CaForSqlite),
                (StoreLocation::Postgres { url, .. }, None)
                    if url.contains("sslmode=require") || url.contains("sslmode=verify") =>
                {
                    return Err(StoreConfigError::TlsWithoutCa);
                }
                _ => {}
            }
            Ok(location)
        }
    }
}

/// What is wrong with the configuration's store.
#[derive(Debug, thiserror::Error)]
enum StoreConfigError {
    #[error("`database` and `[store]` both name a store: keep `[store]`")]
    Both,
    #[error("no store: add `[store]` with `url = \"sqlite:vedette.db\"` (or a `postgres://` URL)")]
    Missing,
    #[error("`store.url`: {0}")]
    Url(#[from] crate::store::StoreUrlError),
    #[error("`store.ca_cert`: `{}` does not exist or is not a file", .0.display())]
    CaCert(PathBuf),
    #[error("`store.ca_cert` is for PostgreSQL; the store is SQLite")]
    CaForSqlite,
    #[error(
        "`store.url` asks for TLS (`sslmode`): set `store.ca_cert` to the CA certificate that signed the database server's certificate"
    )]
    TlsWithoutCa,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "listen = \"nowhere\"\ndatabase = \"db\"\nshutdown_grace = \"soon\"\n[tls]\nca_cert = \"a\"\nca_key = \"b\"\nserver_cert = \"c\"\nserver_key = \"d\"\n",
        )
        .unwrap();
        let e = Config::load(&p).unwrap_err();
        let text = e.to_string();
        for key in [
            "`listen`",
            "`tls.ca_cert`",
            "`tls.server_key`",
            "`shutdown_grace`",
            "`soon`",
        ] {
            assert!(text.contains(key), "{key} missing from: {text}");
        }
    }

    #[test]
    fn credentials_go_over_https_only_and_never_in_a_url_or_a_debug_line() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["a", "b", "c", "d"] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        let tls =
            "[tls]\nca_cert = \"a\"\nca_key = \"b\"\nserver_cert = \"c\"\nserver_key = \"d\"\n";
        let load = |body: &str| {
            let p = dir.path().join("c.toml");
            std::fs::write(
                &p,
                format!("listen = \"127.0.0.1:1\"\ndatabase = \"db\"\n{body}{tls}"),
            )
            .unwrap();
            Config::load(&p)
        };
        let problems = |body: &str| load(body).unwrap_err().to_string();
        let plain = problems(
            "[[intel.taxii]]\nurl = \"http://t.example/api1/\"\ncollection = \"c\"\n\
             token = \"s3cret-token\"\n",
        );
        assert!(
            plain.contains("`intel.taxii[0].url`: credentials would be sent in clear")
                && plain.contains("allow_insecure"),
            "{plain}"
        );
        let misp = problems("[[export.misp]]\nurl = \"http://m.example/\"\nkey = \"k\"\n");
        assert!(misp.contains("`export.misp[0].url`: credentials"), "{misp}");
        let userinfo = problems(
            "[[intel.taxii]]\nurl = \"https://u:pw@t.example/api1/\"\ncollection = \"c\"\n",
        );
        assert!(
            userinfo.contains("holds a user name or password"),
            "{userinfo}"
        );
        let query = problems("[[intel.misp_feed]]\nurl = \"https://f.example/feed/?key=abc\"\n");
        assert!(
            query.contains("`intel.misp_feed[0].url`: holds a query"),
            "{query}"
        );
        // Allowed on purpose: accepted, and the secret stays out of any Debug line.
        let ok = load(
            "[[intel.taxii]]\nurl = \"http://t.example/api1/\"\ncollection = \"c\"\n\
             username = \"u\"\npassword = \"pw-s3cret\"\nallow_insecure = true\n\
             [[export.misp]]\nurl = \"https://m.example/\"\nkey = \"misp-s3cret\"\n",
        )
        .unwrap();
        let debug = format!("{ok:?}");
        assert!(
            !debug.contains("s3cret") && debug.contains("Secret(..)"),
            "{debug}"
        );
    }

    #[test]
    fn the_store_is_named_once_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let tls =
            "[tls]\nca_cert = \"a\"\nca_key = \"b\"\nserver_cert = \"c\"\nserver_key = \"d\"\n";
        let problems = |body: &str| {
            let p = dir.path().join("c.toml");
            std::fs::write(&p, format!("listen = \"127.0.0.1:1\"\n{body}{tls}")).unwrap();
            Config::load(&p).unwrap_err().to_string()
        };
        let both = problems("database = \"db\"\n[store]\nurl = \"sqlite:x.db\"\n");
        assert!(both.contains("keep `[store]`"), "{both}");
        let bad = problems("[store]\nurl = \"mysql://u:pw@h/db\"\n");
        assert!(bad.contains("`store.url`") && !bad.contains("pw@"), "{bad}");
        let none = problems("");
        assert!(none.contains("no store"), "{none}");
        let ca = problems("[store]\nurl = \"postgres://v@db/v\"\nca_cert = \"missing.crt\"\n");
        assert!(
            ca.contains("`store.ca_cert`") && ca.contains("missing.crt"),
            "{ca}"
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "listen = \"127.0.0.1:1\"\ndatabase = \"db\"\nlisten_port = 3\n[tls]\nca_cert = \"a\"\nca_key = \"b\"\nserver_cert = \"c\"\nserver_key = \"d\"\n").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("listen_port"), "{e}");
    }
}
