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

/// Logs to stderr, filtered by `VEDETTE_LOG` (default `info`), coloured only on a terminal.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("VEDETTE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
