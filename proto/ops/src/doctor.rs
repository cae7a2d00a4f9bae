//! What `doctor` subcommands report: findings, each problem with its fix.

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warning,
    Problem,
}

/// One thing checked.
#[derive(Debug, Clone)]
pub struct Finding {
    pub level: Level,
    /// What was checked (`config`, `certificate`, `collector`, ...).
    pub topic: &'static str,
    pub text: String,
    /// What to do about it (empty when fine).
    pub fix: String,
}

impl Finding {
    pub fn ok(topic: &'static str, text: impl Into<String>) -> Finding {
        Finding {
            level: Level::Ok,
            topic,
            text: text.into(),
            fix: String::new(),
        }
    }

    pub fn problem(
        topic: &'static str,
        text: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            level: Level::Problem,
            topic,
            text: text.into(),
            fix: fix.into(),
        }
    }

    pub fn warning(
        topic: &'static str,
        text: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            level: Level::Warning,
            ..Finding::problem(topic, text, fix)
        }
    }
}

/// Whether a private file or directory is closed to group and others: a problem with its
/// `chmod` when it is not; `unreadable_fix` when it cannot be read at all.
pub fn private_mode(path: &std::path::Path, what: &str, unreadable_fix: &str) -> Finding {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(m) => {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                let want = if m.is_dir() { "700" } else { "600" };
                Finding::problem(
                    "permissions",
                    format!(
                        "the {what} `{}` has mode {mode:04o}: other users can read it",
                        path.display()
                    ),
                    format!("chmod {want} {}", path.display()),
                )
            } else {
                Finding::ok(
                    "permissions",
                    format!("the {what} `{}` has mode {mode:04o}", path.display()),
                )
            }
        }
        Err(e) => Finding::problem(
            "permissions",
            format!("cannot read `{}`: {e}", path.display()),
            unreadable_fix,
        ),
    }
}

/// Prints the findings; true when none is a problem.
pub fn print(findings: &[Finding]) -> bool {
    for f in findings {
        let tag = match f.level {
            Level::Ok => "ok     ",
            Level::Warning => "WARNING",
            Level::Problem => "PROBLEM",
        };
        println!("{tag} {:<12} {}", f.topic, f.text);
        if !f.fix.is_empty() {
            println!("        {:<12} fix: {}", "", f.fix);
        }
    }
    let problems = findings
        .iter()
        .filter(|f| f.level == Level::Problem)
        .count();
    if problems == 0 {
        println!("healthy");
    } else {
        println!("{problems} problem(s)");
    }
    problems == 0
}
