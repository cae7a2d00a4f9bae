//! What each `vedettectl` command takes.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vedettectl",
    version,
    about = "Administer a Vedette collector: enrollment tokens, agents, detections, rule bundles",
    after_help = "Examples:\n  vedettectl token create --ttl 1h\n  vedettectl agents list\n  \
        vedettectl orgs create acme --sector energy --country DE\n  \
        vedettectl token create --org acme\n  \
        vedettectl detections list --since 2026-11-25T00:00:00Z --json\n  \
        vedettectl rules publish /etc/vedette/fleet-rules\n  vedettectl rules status"
)]
pub struct Cli {
    /// vedettectl.toml (written by `vedette-collector init`).
    #[arg(
        long,
        env = "VEDETTECTL_CONFIG",
        default_value = "/etc/vedette/vedettectl.toml",
        global = true
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Enrollment tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Enrolled agents.
    #[command(subcommand)]
    Agents(AgentsCmd),
    /// Participating organisations and what exports share about each.
    #[command(subcommand)]
    Orgs(OrgsCmd),
    /// Stored detections.
    #[command(subcommand)]
    Detections(DetectionsCmd),
    /// Certificates of agents, operators and maintainers: list them, revoke one.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Rule bundles: publish signed YARA rules and indicators to every agent.
    #[command(subcommand)]
    Rules(RulesCmd),
    /// Maintainer signing keys (local; no collector needed).
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Shared threat intelligence: stage STIX 2.1 and MISP indicators, publish them to agents.
    #[command(subcommand)]
    Intel(IntelCmd),
    /// The audit log: every operator action, kept by the collector.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Alerts: detections grouped by organisation, rule and what was seen (a hash, an address,
    /// a path), one row however many hosts; and the verdicts operators give them.
    #[command(subcommand)]
    Alerts(AlertsCmd),
    /// Exceptions: what operators judged not worth reporting. The collector suppresses what
    /// they cover from the moment they are added; agents do once a maintainer publishes the
    /// next bundle (`rules publish` or `intel publish` carries them, signed).
    #[command(subcommand)]
    Exceptions(ExceptionsCmd),
    /// Retro-hunt: ask every agent in scope whether it saw files or ran executables with these
    /// digests, answered from each agent's history (no disk is read again, and nothing but
    /// the hits leaves a host). Agents offline now answer when they reconnect, until the hunt
    /// expires. `hunt list` and `hunt show ID` follow the answers.
    Hunt(HuntCmd),
    /// Response actions on one agent: kill a process, quarantine a file, isolate the host.
    /// The agent does only what its own `response` setting (agent.toml) allows; where the
    /// organisation requires it (`orgs set --response-approval two-person`), an action waits
    /// for a second operator's `actions approve`. Every step is in the audit log.
    #[command(subcommand)]
    Actions(ActionsCmd),
    /// Write detections for others to read: STIX 2.1 sightings, a MISP event, ECS JSON lines.
    /// Each organisation's sharing policy applies, as in the collector's own exports: nothing
    /// of an organisation that shares `none`, no host, path or user of an `anonymised` one.
    #[command(
        after_help = "Examples:\n  vedettectl export stix --since 2026-11-25T00:00:00Z > sightings.json\n  \
        vedettectl export misp --organisation CERT-XY > event.json\n  vedettectl export ecs | siem-ingest"
    )]
    Export {
        /// stix: a STIX 2.1 bundle of sightings; misp: a MISP event; ecs: one ECS object per
        /// line.
        #[arg(value_enum)]
        format: ExportFormat,
        /// Only detections received at or after this time (as `detections list --since`).
        #[arg(long, value_parser = when)]
        since: Option<std::time::SystemTime>,
        /// Only this agent's detections: its id, a unique start of it, or its host name.
        #[arg(long, value_name = "AGENT")]
        agent: Option<String>,
        /// Only the detections of this organisation's agents (under its sharing policy).
        #[arg(long, value_name = "NAME")]
        org: Option<String>,
        /// At most this many (the most recent), read page by page.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
        /// The organisation the sightings are made by (default: `organisation` in
        /// vedettectl.toml, or "Vedette").
        #[arg(long)]
        organisation: Option<String>,
        /// Everything stored, whatever the organisations' sharing policies say: for the
        /// collector's own records, never for a partner. Refused to an operator limited to
        /// organisations; the collector logs each use.
        #[arg(long)]
        unfiltered: bool,
        /// STIX: one sighting per indicator, organisation and window this long, counting its
        /// detections (as the collector's `[export] sighting_window`).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        window: Duration,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ExportFormat {
    Stix,
    Misp,
    Ecs,
}

#[derive(Subcommand)]
pub enum IntelCmd {
    /// Stage indicators from STIX 2.1 bundles, MISP event files or MISP feed directories
    /// (manifest.json plus event files). Prints accepted, skipped and rejected counts, with the
    /// id and reason of each one left out. Nothing reaches agents before `intel publish`.
    #[command(
        after_help = "Examples:\n  vedettectl intel import apt-bundle.json\n  \
        vedettectl intel import ./misp-feed/ lazarus-event.json\n  vedettectl intel publish"
    )]
    Import {
        /// STIX bundle (.json), MISP event (.json) or MISP feed directory.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Each source: last import or poll, counts, staged indicators and last error.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Build the next bundle from the latest one's files plus every staged indicator (as
    /// intel/indicators.jsonl), sign it with the maintainer key, and publish it.
    Publish {
        #[command(flatten)]
        sign: SignArgs,
    },
}

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Write a new Ed25519 maintainer key pair: PREFIX.key (0600) and PREFIX.pub. List the .pub
    /// file under `maintainer_keys` in collector.toml to trust it.
    Generate {
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
pub struct SignArgs {
    /// Maintainer private key (default: `sign_key` in vedettectl.toml).
    #[arg(long, value_name = "KEY")]
    pub sign_key: Option<PathBuf>,
    /// Who publishes, recorded in the bundle (default: $USER).
    #[arg(long)]
    pub publisher: Option<String>,
    /// Send the bundle unsigned. Agents and the collector refuse it unless they are configured
    /// to accept unsigned bundles.
    #[arg(long)]
    pub insecure_unsigned: bool,
}

#[derive(Subcommand)]
pub enum RulesCmd {
    /// Validate, sign and publish YARA files and indicator lists (files or directories) as the
    /// next bundle version; connected agents apply it within seconds.
    Publish {
        /// Bundle name (default: the previous bundle's name, or `rules`).
        #[arg(long)]
        name: Option<String>,
        /// Refuse indicator lines that do not parse and YARA patterns yara-x says may slow
        /// down every scan (default: report them; agents skip those lines, and run such rules).
        #[arg(long)]
        strict: bool,
        /// Leave out the indicators `intel publish` put in the latest bundle (by default they
        /// are carried forward: these paths replace only the rules).
        #[arg(long)]
        drop_intel: bool,
        /// Send this version only to agents with this label (`agents label ID --add LABEL`);
        /// the others stay on the version they have until `rules promote`.
        #[arg(long, value_name = "LABEL")]
        to: Option<String>,
        #[command(flatten)]
        sign: SignArgs,
        /// YARA files (.yar, .yara), indicator lists, or directories of them.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Check YARA files and indicator lists without publishing: every problem, yara-x's
    /// slow-pattern warnings, and with `--profile` the rules that cost the most on a corpus.
    /// Needs no collector.
    #[command(
        after_help = "Example:\n  vedettectl rules check rules/ --profile /srv/samples --top 5"
    )]
    Check {
        /// Fail on indicator lines that do not parse and on slow patterns too.
        #[arg(long)]
        strict: bool,
        /// Scan the files under this directory (or this file) with the rules, as agents scan,
        /// and print the slowest rules with their share of the time. Read into memory: a
        /// sample of a few megabytes is enough.
        #[arg(long, value_name = "CORPUS")]
        profile: Option<PathBuf>,
        /// How many of the slowest rules to print.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// YARA files (.yar, .yara), indicator lists, or directories of them.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// List published bundles, newest first.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one bundle: metadata and files.
    Show {
        version: u64,
        #[arg(long)]
        json: bool,
    },
    /// Send a version published with `--to LABEL` to every agent. Agents already on a newer
    /// version stay on it: versions only go forward.
    #[command(
        after_help = "Example (a canary first):\n  vedettectl agents label 3f2a --add canary\n  \
        vedettectl rules publish --to canary rules/\n  vedettectl rules status\n  \
        vedettectl rules promote 8"
    )]
    Promote { version: u64 },
    /// Publish the content of an older version again, as a new version.
    Rollback {
        version: u64,
        #[command(flatten)]
        sign: SignArgs,
    },
    /// How many agents run a version, are behind, or failed to apply it (default: the latest).
    Status {
        version: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// The rules that cost the most on the agents' own files, per bundle version: each agent
    /// times its rules on a sample of the files of its last full scan (`profile_rules` in
    /// agent.toml) and sends the costliest in its heartbeat.
    #[command(after_help = "Example:\n  vedettectl rules slow\n  vedettectl rules slow --json")]
    Slow {
        /// Only this version (default: every version agents measured).
        version: Option<u64>,
        /// An organisation's agents only (your own if your certificate is limited to one).
        #[arg(long, value_name = "NAME")]
        org: Option<String>,
        /// One JSON object per version.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a one-time enrollment token; prints only the token.
    Create {
        /// How long the token stays valid (e.g. 30m, 1h, 2d).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How many agents may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// The organisation the agents it enrolls belong to (default: yours if your
        /// certificate is limited to one, else `default`). Written into their certificates.
        #[arg(long, value_name = "NAME")]
        org: Option<String>,
    },
    /// List the tokens that can still enroll agents: id (the start of the token's SHA-256,
    /// never the token), organisation, uses left, expiry and creator.
    List {
        /// Expired, used-up and revoked tokens too.
        #[arg(long)]
        all: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: it enrolls no more agents (those it enrolled stay).
    Revoke {
        /// The token's id as `token list` shows it, or a unique start of it (6 digits or more).
        id: String,
    },
}

#[derive(Subcommand)]
pub enum AlertsCmd {
    /// Alerts, newest activity first: status, hosts, detections, first and last seen.
    #[command(
        after_help = "Examples:\n  vedettectl alerts list\n  vedettectl alerts list --status open --org acme\n  \
        vedettectl alerts show 12\n  \
        vedettectl alerts set 12 --status false-positive --note \"backup tool\" --except --expires 30d"
    )]
    List {
        /// Only alerts with this status.
        #[arg(long, value_parser = ["open", "acknowledged", "true-positive", "false-positive", "benign"])]
        status: Option<String>,
        /// Only this organisation's alerts.
        #[arg(long, value_name = "NAME")]
        org: Option<String>,
        /// At most this many, read page by page.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One alert: what it groups, its newest detections, and every verdict given on it.
    Show {
        id: u64,
        /// How many of its newest detections to show.
        #[arg(long, default_value_t = 20)]
        detections: u32,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Give an alert a verdict, kept with who gave it, when and the note. New detections keep
    /// an acknowledged or true-positive alert's status and flag it as new; a false-positive
    /// or benign alert stays closed.
    Set {
        id: u64,
        #[arg(long, value_parser = ["open", "acknowledged", "true-positive", "false-positive", "benign"])]
        status: String,
        /// Why: what was found, who was asked.
        #[arg(long, default_value = "")]
        note: String,
        /// With false-positive or benign: also add an exception for the alert's rule, hash (or
        /// path) and organisation, so its detections are suppressed from now on.
        #[arg(long)]
        except: bool,
        /// How long that exception lasts (30d, 12h); without it, it does not expire.
        #[arg(long, value_parser = humantime::parse_duration, requires = "except")]
        expires: Option<Duration>,
    },
}

#[derive(Subcommand)]
pub enum ExceptionsCmd {
    /// Add an exception. It names a rule or an indicator; a hash, a path glob, an organisation
    /// and an agent narrow it. A path alone is refused: whatever is dropped there would go
    /// unseen.
    #[command(
        after_help = "Examples:\n  vedettectl exceptions add --rule Backup_Agent_Packer --sha256 9f86d0... --reason \"our backup tool\"\n  \
        vedettectl exceptions add --rule Webshell_Generic --path '/srv/www/vendor/**' --org acme --expires 30d --reason \"vendor test fixtures\"\n  \
        vedettectl exceptions list"
    )]
    Add {
        /// The rule name detections carry (this or --indicator is required).
        #[arg(long)]
        rule: Option<String>,
        /// The indicator id detections carry (a STIX indicator id, a MISP attribute UUID).
        #[arg(long)]
        indicator: Option<String>,
        /// Only the file or executable with this SHA-256.
        #[arg(long, value_name = "HASH")]
        sha256: Option<String>,
        /// Only paths matching this glob (`*` stays within a directory, `**` crosses them).
        #[arg(long, value_name = "GLOB")]
        path: Option<String>,
        /// Only this organisation's agents (a certificate limited to one: its own).
        #[arg(long, value_name = "NAME")]
        org: Option<String>,
        /// Only this agent: its id, a unique start of it, or its host name.
        #[arg(long, value_name = "AGENT")]
        agent: Option<String>,
        /// How long it lasts (30d, 12h); without it, it does not expire.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
        /// Why this is not worth reporting.
        #[arg(long)]
        reason: String,
    },
    /// Exceptions in force (with --all, removed and expired ones too).
    List {
        #[arg(long)]
        all: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Remove an exception: detections it covered are reported again (by agents once the next
    /// bundle is published).
    Remove { id: String },
}

#[derive(clap::Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  vedettectl hunt --sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n  \
        vedettectl hunt --file lazarus-hashes.txt --org acme --expires 48h\n  \
        vedettectl hunt list\n  vedettectl hunt show hunt-5f0c2a9e1d3b4c7a --json"
)]
pub struct HuntCmd {
    #[command(subcommand)]
    pub action: Option<HuntAction>,
    #[command(flatten)]
    pub start: HuntStart,
}

/// What a new hunt asks.
#[derive(clap::Args)]
pub struct HuntStart {
    /// A SHA-256 to look for (repeatable).
    #[arg(long, value_name = "HASH")]
    pub sha256: Vec<String>,
    /// An MD5 to look for (repeatable).
    #[arg(long, value_name = "HASH")]
    pub md5: Vec<String>,
    /// A SHA-1 to look for (repeatable).
    #[arg(long, value_name = "HASH")]
    pub sha1: Vec<String>,
    /// A file of digests, one per line (MD5, SHA-1 or SHA-256 by length; `#` comments and a
    /// Loki-style `;comment` after the digest are allowed).
    #[arg(long, value_name = "LIST")]
    pub file: Option<PathBuf>,
    /// Only this organisation's agents (a certificate limited to one: its own).
    #[arg(long, value_name = "NAME")]
    pub org: Option<String>,
    /// How long agents offline now may still answer (24h by default, 30d at most).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub expires: Option<Duration>,
}

#[derive(Subcommand)]
pub enum HuntAction {
    /// Hunts, newest first: how many agents were asked and how many answered.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One hunt, per agent: what it saw (path, digests, first and last seen, whether it is
    /// still there; for executables, runs and user), or that it has not answered yet.
    Show {
        id: String,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum AuditCmd {
    /// The most recent operator actions, oldest first: who (cert:NAME, console:ACCOUNT,
    /// token:ID, local:USER), what, to what, and how it ended. A certificate limited to an
    /// organisation sees that organisation's entries only.
    List {
        /// Only entries at or after this time (as `detections list --since`).
        #[arg(long, value_parser = when)]
        since: Option<std::time::SystemTime>,
        /// At most this many (the most recent; the collector gives at most 10,000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum OrgsCmd {
    /// Create an organisation. Its STIX identity id is made now and kept. New organisations
    /// share `anonymised` at TLP:AMBER until `orgs set` says otherwise.
    #[command(
        after_help = "Examples:\n  vedettectl orgs create acme-energy --sector energy --country DE\n  \
        vedettectl token create --org acme-energy\n  \
        vedette-collector certs issue --config collector.toml --name acme-soc --role operator --org acme-energy --out acme-soc"
    )]
    Create {
        /// Letters, digits, `.`, `_` and `-` (at most 64).
        name: String,
        #[command(flatten)]
        fields: OrgFields,
    },
    /// List organisations (yours only, with a certificate limited to one).
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Change an organisation's sector, country or sharing policy; what is not given stays.
    /// The next export batch follows the new policy.
    #[command(
        after_help = "Examples:\n  vedettectl orgs set acme-energy --share full --tlp green\n  \
        vedettectl orgs set acme-energy --share none\n  \
        vedettectl orgs set acme-energy --response-approval two-person"
    )]
    Set {
        name: String,
        #[command(flatten)]
        fields: OrgFields,
        /// Whether a response action on its agents (kill, quarantine, isolate, restore) waits
        /// for a second operator with scope over it, never the requester.
        #[arg(long, value_parser = ["none", "two-person"])]
        response_approval: Option<String>,
    },
    /// Rename an organisation (its STIX identity stays). Refused while agents, console
    /// accounts or operator certificates belong to it; its tokens follow it.
    Rename { name: String, new_name: String },
    /// Remove an organisation; its unspent tokens are revoked. Refused while agents (removed
    /// ones too), console accounts or operator certificates belong to it.
    Remove { name: String },
}

/// What `orgs create` and `orgs set` may give of an organisation.
#[derive(clap::Args)]
pub struct OrgFields {
    /// A STIX industry sector: energy, financial-services, government-national, healthcare, ...
    #[arg(long)]
    pub sector: Option<String>,
    /// ISO 3166-1 alpha-2 country code (DE, FR, ...).
    #[arg(long)]
    pub country: Option<String>,
    /// What exports (TAXII, MISP, JSONL) carry about it. full: host names, paths, users,
    /// processes; anonymised: the indicator, counts, first and last seen, sector and country;
    /// none: nothing. See README.md, "Sharing and privacy".
    #[arg(long, value_parser = ["full", "anonymised", "none"])]
    pub share: Option<String>,
    /// The TLP 2.0 marking of everything exported about it.
    #[arg(long, value_parser = ["clear", "green", "amber", "amber+strict", "red"])]
    pub tlp: Option<String>,
}

impl OrgFields {
    /// Sector, country, share and tlp as a request carries them (empty: not given).
    pub fn into_request_fields(self) -> [String; 4] {
        [self.sector, self.country, self.share, self.tlp].map(Option::unwrap_or_default)
    }
}

#[derive(Subcommand)]
pub enum CertsCmd {
    /// List the certificates the collector issued or saw in use, with their serial numbers.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a certificate: every request made with it is refused from now on. For an agent,
    /// `agents revoke` also closes its stream and refuses it for good.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["serial", "cert"])))]
    Revoke {
        /// The serial number (hex, as `certs list` shows it).
        serial: Option<String>,
        /// Or the certificate file (PEM) to revoke.
        #[arg(long, value_name = "FILE")]
        cert: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum AgentsCmd {
    /// List enrolled agents.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Only this organisation's agents.
        #[arg(long, value_name = "NAME")]
        org: Option<String>,
        /// Removed agents too.
        #[arg(long)]
        removed: bool,
        /// Only agents with this label.
        #[arg(long, value_name = "LABEL")]
        label: Option<String>,
    },
    /// Add or remove an agent's labels (letters, digits, `.`, `_`, `-`): `rules publish --to
    /// LABEL` sends a version to the agents with that label only.
    Label {
        /// The agent: its id, a unique start of it, or its host name.
        agent: String,
        #[arg(long, value_name = "LABEL")]
        add: Vec<String>,
        #[arg(long, value_name = "LABEL")]
        remove: Vec<String>,
    },
    /// Revoke an agent: its open stream is closed and it can no longer connect.
    Revoke {
        /// The agent id (see `agents list`).
        id: String,
    },
    /// Remove an agent for good: revoked, and left out of `agents list` (but with
    /// `--removed`); its detections are kept.
    Remove {
        /// The agent id (see `agents list`).
        id: String,
    },
}

#[derive(Subcommand)]
pub enum DetectionsCmd {
    /// List the most recent detections, oldest first.
    List(Box<DetectionListArgs>),
    /// Which hosts saw a file or executable, by its SHA-256: each host once, with its first
    /// and last detection of it and how many there were.
    Hosts {
        /// The SHA-256 of the file or executable (64 hex digits).
        #[arg(long, value_name = "HASH")]
        sha256: String,
        /// Only this organisation's hosts.
        #[arg(long, value_name = "NAME")]
        org: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// At most this many detections read, the most recent first.
        #[arg(long, default_value_t = 100_000)]
        limit: usize,
    },
}

/// The filters of `detections list`.
#[derive(clap::Args)]
pub struct DetectionListArgs {
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Only this agent's detections: its id, a unique start of it, or its host name (an
    /// agent that matches none is an error).
    #[arg(long, value_name = "AGENT")]
    pub agent: Option<String>,
    /// Only the detections of agents with this host name (every enrollment of the host).
    #[arg(long, value_name = "NAME")]
    pub host: Option<String>,
    /// Only the detections of agents that have this label now (`agents label`).
    #[arg(long, value_name = "LABEL")]
    pub label: Option<String>,
    /// Only this organisation's detections.
    #[arg(long, value_name = "NAME")]
    pub org: Option<String>,
    /// Only detections received at or after this time: RFC 3339 (2026-11-25T10:00:00Z), a
    /// date (2026-11-25, midnight UTC), today, yesterday, or a time ago (24h, 7d).
    #[arg(long, value_parser = when)]
    pub since: Option<std::time::SystemTime>,
    /// Only detections received before this time (as `--since`).
    #[arg(long, value_parser = when)]
    pub until: Option<std::time::SystemTime>,
    /// Only this kind.
    #[arg(long, value_parser = ["yara", "hash", "filename", "process", "connection", "agent", "dns"])]
    pub kind: Option<String>,
    /// Only this rule or indicator.
    #[arg(long)]
    pub rule: Option<String>,
    /// Only detections whose path, process name or command line holds this text (any case).
    #[arg(long, value_name = "TEXT")]
    pub text: Option<String>,
    /// Only detections of the file or executable with this SHA-256 (64 hex digits).
    #[arg(long, value_name = "HASH")]
    pub sha256: Option<String>,
    /// Only detections of the file with this MD5 (32 hex digits; detections stored by a
    /// collector older than its MD5 index are not found by it).
    #[arg(long, value_name = "HASH")]
    pub md5: Option<String>,
    /// Detections an exception covers too (hidden by default).
    #[arg(long)]
    pub suppressed: bool,
    /// At most this many (the most recent), read page by page.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
}

/// A point in time for `--since` and `--until`: RFC 3339 (`2026-12-01T10:00:00Z`), a date
/// (`2026-12-01`, midnight UTC), `today` or `yesterday` (midnight UTC), or a time ago (`24h`,
/// `7d`, `90m`).
pub fn when(text: &str) -> Result<std::time::SystemTime, String> {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};
    let t = text.trim();
    let now = SystemTime::now();
    let midnight = |days_back: u64| {
        let days = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / 86_400);
        UNIX_EPOCH + Duration::from_secs(days.saturating_sub(days_back) * 86_400)
    };
    match t {
        "today" => return Ok(midnight(0)),
        "yesterday" => return Ok(midnight(1)),
        _ => {}
    }
    if let Ok(at) = humantime::parse_rfc3339_weak(t) {
        return Ok(at);
    }
    if t.len() == 10
        && let Ok(at) = humantime::parse_rfc3339_weak(&format!("{t}T00:00:00Z"))
    {
        return Ok(at);
    }
    if let Ok(ago) = humantime::parse_duration(t) {
        return now
            .checked_sub(ago)
            .ok_or_else(|| format!("`{t}` ago is before the epoch"));
    }
    Err(format!(
        "`{t}` is not a time: give RFC 3339 (2026-12-01T10:00:00Z), a date (2026-12-01), \
         today, yesterday, or a time ago (24h, 7d)"
    ))
}

#[cfg(test)]
mod tests {
    use super::when;
    use std::time::{SystemTime, UNIX_EPOCH};

    fn secs(t: SystemTime) -> u64 {
        t.duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    #[test]
    fn times_are_given_as_dates_days_durations_ago_or_rfc_3339() {
        assert_eq!(secs(when("2026-12-01").unwrap()), 1_796_083_200);
        assert_eq!(secs(when("2026-12-01T10:00:00Z").unwrap()), 1_796_119_200);
        let now = secs(SystemTime::now());
        let day_ago = secs(when("24h").unwrap());
        assert!(
            now - day_ago >= 86_400 && now - day_ago < 86_460,
            "{now} {day_ago}"
        );
        let week_ago = secs(when("7d").unwrap());
        assert!(now - week_ago >= 7 * 86_400 && now - week_ago < 7 * 86_400 + 60);
        let today = secs(when("today").unwrap());
        assert_eq!(today % 86_400, 0);
        assert!(now - today < 86_400);
        assert_eq!(secs(when("yesterday").unwrap()), today - 86_400);
        let e = when("last tuesday").unwrap_err();
        assert!(e.contains("`last tuesday` is not a time"), "{e}");
    }
}

#[derive(Subcommand)]
pub enum ActionsCmd {
    /// Ask an agent to act. Prints the action's id; `actions list` follows it.
    #[command(
        after_help = "Examples:\n  vedettectl actions request kill --agent 3f2a... --pid 4242 --start 1764979200 --reason \"miner\"\n  \
        vedettectl actions request quarantine --detection 1841 --reason \"webshell, INC-1234\"\n  \
        vedettectl actions request isolate --agent 3f2a... --expires 4h --reason \"Lazarus C2 beacon\""
    )]
    Request {
        /// kill, quarantine or isolate.
        #[arg(value_parser = ["kill", "quarantine", "isolate"])]
        kind: String,
        /// The agent (not needed with --detection).
        #[arg(long, value_name = "ID")]
        agent: Option<String>,
        /// kill: the process id...
        #[arg(long)]
        pid: Option<u32>,
        /// ...and its start time, seconds since the epoch (`start_time` in process detections):
        /// a pid reused by another process is not killed.
        #[arg(long, value_name = "SECONDS")]
        start: Option<i64>,
        /// quarantine: the file's absolute path...
        #[arg(long)]
        path: Option<String>,
        /// ...and its SHA-256: a file that changed is not quarantined.
        #[arg(long, value_name = "HASH")]
        sha256: Option<String>,
        /// Take the agent and the target from this stored detection (its SEQ in `detections
        /// list --json`).
        #[arg(long, value_name = "SEQ")]
        detection: Option<u64>,
        /// How long it may wait for an agent offline; an isolation ends then (24h by default,
        /// 7d at most).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
        /// Why (kept in the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Approve a pending action (a second operator: never the one who requested it).
    Approve { id: String },
    /// Deny a pending action (the requester may withdraw their own).
    Deny {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Undo a quarantine (the file is put back with its owner, mode and times) or an isolation
    /// (the agent's firewall table is removed): a new action.
    Undo {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Actions, newest first, with their state: pending, approved, sent, done, refused,
    /// failed, denied or expired.
    List {
        /// Only this agent's.
        #[arg(long, value_name = "ID")]
        agent: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}
