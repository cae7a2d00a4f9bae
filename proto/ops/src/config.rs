//! The one error a configuration file gives, in the agent and the collector alike: every
//! problem found, each naming its key and value, under the file's path.

use std::path::{Path, PathBuf};

/// Every problem found in a configuration.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid configuration{}:\n  {}",
    path.as_ref().map(|p| format!(" `{}`", p.display())).unwrap_or_default(),
    problems.join("\n  ")
)]
pub struct ConfigError {
    /// The file, when the configuration came from one.
    pub path: Option<PathBuf>,
    pub problems: Vec<String>,
}

impl ConfigError {
    pub fn new(path: Option<&Path>, problems: Vec<String>) -> ConfigError {
        ConfigError {
            path: path.map(Path::to_owned),
            problems,
        }
    }
}

/// Reads and parses a TOML file (unknown keys refused where the type says so); a problem
/// names the file, and TOML's own message the line and key.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let fail = |p: String| ConfigError::new(Some(path), vec![p]);
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    toml::from_str(&text).map_err(|e| fail(e.to_string()))
}
