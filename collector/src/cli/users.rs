//! `vedette-collector users`: console accounts, kept in the store.

use std::io::BufRead;

use crate::config::Config;
use crate::pki::Role;
use crate::server::audit::Act;
use crate::server::console::auth::{AccountError, check_user_name, hash_password};
use crate::store::{StoreError, UserRow};

/// Creates or updates an account with a password read from standard input.
pub fn add(
    config: &Config,
    name: &str,
    roles: &[Role],
    org: Option<&str>,
) -> Result<String, UsersError> {
    check_user_name(name)?;
    let password = read_password(&format!("password for {name}: "))?;
    let password_hash = hash_password(&password)?;
    let mut roles: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    roles.sort_unstable();
    roles.dedup();
    let store = crate::store::open_as(&config.store, crate::store::Opener::Tool)?;
    let created = store.put_user(&UserRow {
        name: name.to_string(),
        password_hash,
        roles: roles.join(","),
        org: org.unwrap_or_default().to_string(),
        created_at_ms: crate::store::now_ms(),
    })?;
    let mut act = Act::local("user.add")
        .target(name)
        .org(org.unwrap_or_default());
    act.detail = format!(
        "{} {}",
        if created { "created" } else { "updated" },
        roles.join(",")
    );
    act.record_local(store.as_ref());
    let scope = org.map_or_else(
        || "collector-wide".to_string(),
        |o| format!("organisation {o}"),
    );
    Ok(format!(
        "{} account `{name}` ({}, {scope})\n",
        if created { "created" } else { "updated" },
        roles.join(", ")
    ))
}

pub fn list(config: &Config) -> Result<String, UsersError> {
    let store = crate::store::open_as(&config.store, crate::store::Opener::Tool)?;
    let users = store.list_users()?;
    let mut out = String::new();
    for u in &users {
        let org = if u.org.is_empty() {
            "collector-wide"
        } else {
            &u.org
        };
        out.push_str(&format!(
            "{}\t{}\t{org}\tcreated {}\n",
            u.name,
            u.roles,
            vedette_ops::output::rfc3339_ms(u.created_at_ms)
        ));
    }
    if users.is_empty() {
        out.push_str(
            "no accounts: add one with `vedette-collector users add NAME --role operator`\n",
        );
    }
    Ok(out)
}

pub fn remove(config: &Config, name: &str) -> Result<String, UsersError> {
    let store = crate::store::open_as(&config.store, crate::store::Opener::Tool)?;
    if store.remove_user(name)? {
        Act::local("user.remove")
            .target(name)
            .record_local(store.as_ref());
        Ok(format!("removed account `{name}`\n"))
    } else {
        Err(UsersError::NoSuchAccount(name.to_string()))
    }
}

/// One line of standard input, without echo when it is a terminal.
fn read_password(prompt: &str) -> Result<String, UsersError> {
    use rustix::termios::{LocalModes, OptionalActions, isatty, tcgetattr, tcsetattr};
    let stdin = std::io::stdin();
    let mut saved = None;
    if isatty(&stdin) {
        eprint!("{prompt}");
        if let Ok(t) = tcgetattr(&stdin) {
            let mut quiet = t.clone();
            quiet.local_modes.remove(LocalModes::ECHO);
            if tcsetattr(&stdin, OptionalActions::Now, &quiet).is_ok() {
                saved = Some(t);
            }
        }
    }
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if let Some(t) = saved {
        let _ = tcsetattr(&stdin, OptionalActions::Now, &t);
        eprintln!();
    }
    read.map_err(UsersError::ReadPassword)?;
    let password = line.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        return Err(UsersError::NoPassword);
    }
    Ok(password)
}

/// Why a `users` command failed.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error(transparent)]
    Account(#[from] AccountError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Org(#[from] super::commands::OrgCheckError),
    #[error("cannot read the password: {0}")]
    ReadPassword(std::io::Error),
    #[error("no password given on standard input")]
    NoPassword,
    #[error("no account `{0}`")]
    NoSuchAccount(String),
}
