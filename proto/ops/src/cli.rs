//! What every Vedette binary does at its edge: exit codes, log set-up, and waiting for the
//! signal that starts a graceful stop.

/// Exit codes shared by the binaries (sysexits where one fits).
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// A scan found something (like grep's 1).
    pub const MATCHED: u8 = 1;
    /// The operation failed at run time (network, disk, refused by the peer).
    pub const FAILURE: u8 = 1;
    /// A scan could not run (unusable rules or paths; like grep's 2).
    pub const SCAN_ERROR: u8 = 2;
    /// A usage or configuration error (EX_USAGE).
    pub const CONFIG: u8 = 64;
}

/// How log lines are written (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// JSON under systemd (stderr going to the journal, `JOURNAL_STREAM` set), text otherwise.
    #[default]
    Auto,
    /// Human-readable lines, coloured on a terminal.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the event's
    /// fields (`path`, `error`, `collector`, ...) as keys of their own.
    Json,
}

impl LogFormat {
    /// Whether lines are JSON, once `Auto` is resolved for this process.
    pub fn is_json(self) -> bool {
        match self {
            LogFormat::Json => true,
            LogFormat::Text => false,
            LogFormat::Auto => {
                std::env::var_os("JOURNAL_STREAM").is_some()
                    && !std::io::IsTerminal::is_terminal(&std::io::stderr())
            }
        }
    }
}

/// The `--log-format` argument every daemon takes (`#[command(flatten)]`).
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct LogArgs {
    /// Log lines as `text` or `json` (one object per line); `auto`: JSON under systemd
    /// (journal), text otherwise. Filter with VEDETTE_LOG (default `info`).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "auto",
        env = "VEDETTE_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
}

/// Logs to stderr in `format`, filtered by `VEDETTE_LOG` (default `info`; for example
/// `VEDETTE_LOG=debug` or `VEDETTE_LOG=vedette_agent=debug,info`).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("VEDETTE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format.is_json() {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

/// Thins out a warning that can repeat once per file or event: [`RateLimited::hit`] says
/// to log the 1st, 2nd, 4th, 8th, ... occurrence, and gives the count so far to put in the
/// line.
#[derive(Debug, Default)]
pub struct RateLimited(std::sync::atomic::AtomicU64);

impl RateLimited {
    pub const fn new() -> Self {
        RateLimited(std::sync::atomic::AtomicU64::new(0))
    }

    /// Counts one occurrence; `Some(n)` (n occurrences so far) when this one should be logged.
    pub fn hit(&self) -> Option<u64> {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        n.is_power_of_two().then_some(n)
    }
}

/// Returns on SIGTERM or SIGINT. Without signal handlers it never returns, and the process
/// still stops on the signals' default action.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}

/// Prints `error: …` to stderr and returns `code` as the exit status. Callers holding an
/// `anyhow::Error` pass `format!("{e:#}")` so that its causes are printed too.
pub fn fail(e: &dyn std::fmt::Display, code: u8) -> std::process::ExitCode {
    eprintln!("error: {e}");
    std::process::ExitCode::from(code)
}

/// Digests an operator listed, sorted by kind.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DigestList {
    pub sha256: Vec<String>,
    pub md5: Vec<String>,
    pub sha1: Vec<String>,
}

/// A list of digests, one per line: MD5, SHA-1 or SHA-256 by their length, in lower case;
/// blank lines, `#` comments and a Loki-style `;comment` after the digest are allowed. A line
/// that is none of them is an error: its number (from 1) and why.
pub fn digest_list(text: &str) -> Result<DigestList, (usize, String)> {
    let mut out = DigestList::default();
    for (i, line) in text.lines().enumerate() {
        let digest = line.split([';', '#']).next().unwrap_or("").trim();
        if digest.is_empty() {
            continue;
        }
        let hex = digest.bytes().all(|b| b.is_ascii_hexdigit());
        let into = match digest.len() {
            32 if hex => &mut out.md5,
            40 if hex => &mut out.sha1,
            64 if hex => &mut out.sha256,
            _ => {
                let shown: String = digest.chars().take(80).collect();
                return Err((
                    i + 1,
                    format!(
                        "`{}` is not an MD5, SHA-1 or SHA-256 (32, 40 or 64 hex digits)",
                        crate::output::printable(&shown)
                    ),
                ));
            }
        };
        into.push(digest.to_ascii_lowercase());
    }
    Ok(out)
}

#[cfg(test)]
mod digest_tests {
    use super::*;

    #[test]
    fn digests_are_sorted_by_length_and_a_bad_line_is_named() {
        let text = format!(
            "# Lazarus\n{};loader\n\n{}\n{}  # dropper\n",
            "A".repeat(64),
            "b".repeat(32),
            "c".repeat(40)
        );
        let l = digest_list(&text).unwrap();
        assert_eq!(l.sha256, ["a".repeat(64)]);
        assert_eq!((l.md5.len(), l.sha1.len()), (1, 1));
        let e = digest_list("ab\nnot-a-hash\n").unwrap_err();
        assert_eq!(e.0, 1);
        assert!(e.1.contains("`ab`"), "{}", e.1);
    }
}
