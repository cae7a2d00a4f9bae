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
