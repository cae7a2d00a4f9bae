//! Who is using the console: a client certificate from the fleet CA, or an account with a
//! session cookie; and the CSRF token every state change must carry.
//!
//! Sessions are not stored: the cookie holds the account name, an expiry and a random nonce,
//! authenticated with a key derived from the CA key (so every collector sharing a store accepts
//! it). The MAC also covers the account's password hash: setting a new password or removing the
//! account ends its sessions.

use std::collections::BTreeSet;
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use ring::hmac;

use crate::peer::Peer;
use crate::pki::Role;
use crate::store::UserRow;

/// The session cookie. `__Host-`: only over HTTPS, for this host, path `/`.
pub const SESSION_COOKIE: &str = "__Host-vedette-session";
/// The cookie the login form's token is checked against (login CSRF).
pub const LOGIN_COOKIE: &str = "__Host-vedette-login";
/// How long a session lasts.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// Shortest password `users add` accepts.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Sign-in attempts within [`ATTEMPT_WINDOW`] before more are refused until the window ends:
/// of one account (a sign-in that succeeds starts it again), from one address, and in all (so
/// that guessing spread over many accounts and addresses stays bounded).
pub const MAX_PER_ACCOUNT: u64 = 10;
pub const MAX_PER_ADDRESS: u64 = 100;
pub const MAX_IN_ALL: u64 = 1000;
pub const ATTEMPT_WINDOW: Duration = Duration::from_secs(15 * 60);

/// The caller of a console request, as the authentication middleware established it.
#[derive(Debug, Clone)]
pub struct Who {
    pub peer: Peer,
    /// The CSRF token of this session or certificate.
    pub csrf: String,
    /// Signed in with an account (can sign out); false for a client certificate.
    pub account: bool,
}

impl Who {
    /// Whether the caller sees the whole collector (not one organisation).
    pub fn collector_wide(&self) -> bool {
        self.peer.scope().is_none()
    }
}

/// The console's secret keys, derived from the CA key.
pub struct Keys {
    key: hmac::Key,
}

impl Keys {
    pub fn from_ca_key(ca_key_pem: &[u8]) -> Keys {
        let root = hmac::Key::new(hmac::HMAC_SHA256, ca_key_pem);
        let derived = hmac::sign(&root, b"vedette console session key v1");
        Keys {
            key: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()),
        }
    }

    fn tag(&self, parts: &[&str]) -> String {
        hex::encode(hmac::sign(&self.key, parts.join("\n").as_bytes()).as_ref())
    }

    fn verify(&self, parts: &[&str], tag_hex: &str) -> bool {
        hex::decode(tag_hex)
            .is_ok_and(|tag| hmac::verify(&self.key, parts.join("\n").as_bytes(), &tag).is_ok())
    }

    /// A new session cookie value for `user`, valid until `expires_ms`, and its CSRF token.
    pub fn new_session(&self, user: &UserRow, expires_ms: i64) -> (String, String) {
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        let expires = expires_ms.to_string();
        let name = hex::encode(&user.name);
        let tag = self.tag(&["session", &name, &expires, &nonce, &user.password_hash]);
        let csrf = self.tag(&["csrf", &nonce]);
        (format!("{name}.{expires}.{nonce}.{tag}"), csrf)
    }

    /// The account name a session cookie claims, before its MAC is checked against the account.
    pub fn session_user(value: &str) -> Option<String> {
        let name = value.split('.').next()?;
        String::from_utf8(hex::decode(name).ok()?).ok()
    }

    /// The CSRF token of a valid, unexpired session of `user`, or None.
    pub fn check_session(&self, value: &str, user: &UserRow, now_ms: i64) -> Option<String> {
        let mut parts = value.split('.');
        let (name, expires, nonce, tag) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || hex::encode(&user.name) != name {
            return None;
        }
        if expires.parse::<i64>().ok()? <= now_ms {
            return None;
        }
        if !self.verify(&["session", name, expires, nonce, &user.password_hash], tag) {
            return None;
        }
        Some(self.tag(&["csrf", nonce]))
    }

    /// The CSRF token of requests authenticated by the certificate with this serial.
    pub fn cert_csrf(&self, serial: &str) -> String {
        self.tag(&["csrf-cert", serial])
    }

    /// A token for the login form, bound to the login cookie holding `nonce`.
    pub fn login_token(&self, nonce: &str) -> String {
        self.tag(&["login", nonce])
    }

    pub fn check_login_token(&self, nonce: &str, token: &str) -> bool {
        !nonce.is_empty() && self.verify(&["login", nonce], token)
    }
}

/// Constant-time comparison of two tokens.
pub fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The identity of an account.
pub fn account_peer(user: &UserRow) -> Peer {
    Peer::Client {
        name: user.name.clone(),
        roles: user
            .roles
            .split(',')
            .filter_map(Role::parse)
            .collect::<BTreeSet<_>>(),
        org: Some(user.org.clone()).filter(|o| !o.is_empty()),
    }
}

/// An argon2id hash (PHC string) of a new password.
pub fn hash_password(password: &str) -> Result<String, AccountError> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(AccountError::ShortPassword);
    }
    let salt = salt()?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(AccountError::Hash)
}

fn salt() -> Result<SaltString, AccountError> {
    SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(AccountError::Hash)
}

/// What is wrong with a new account's name or password.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("the password is too short: at least {MIN_PASSWORD_CHARS} characters")]
    ShortPassword,
    #[error("cannot hash the password: {0}")]
    Hash(argon2::password_hash::Error),
    #[error("`{0}` is not a valid account name: 1 to 64 letters, digits, `.`, `_`, `-` or `@`")]
    Name(String),
}

/// Whether `password` matches the PHC string `hash`.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// The hash checked when no such account exists, so that a wrong name takes as long as a
/// wrong password.
pub fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| {
        salt()
            .ok()
            .and_then(|salt| {
                Argon2::default()
                    .hash_password(b"no such account here", &salt)
                    .ok()
                    .map(|h| h.to_string())
            })
            .unwrap_or_default()
    })
}

/// Account names: what certificate names allow, 1 to 64 characters.
pub fn check_user_name(name: &str) -> Result<(), AccountError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if ok {
        Ok(())
    } else {
        Err(AccountError::Name(name.chars().take(80).collect()))
    }
}

/// The sign-in budgets an attempt of `user` from `ip` is counted against, in the order they
/// are counted: its address first (a client refused there spends nothing of the others), all
/// addresses, then the account.
pub fn attempt_budgets(user: &str, ip: std::net::IpAddr) -> Vec<(String, u64)> {
    vec![
        (format!("ip:{ip}"), MAX_PER_ADDRESS),
        ("all".to_string(), MAX_IN_ALL),
        (account_key(user), MAX_PER_ACCOUNT),
    ]
}

/// The key of an account's sign-in attempts.
pub fn account_key(user: &str) -> String {
    format!("user:{user}")
}

/// The value of cookie `name` in a request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

/// A `Set-Cookie` value: secure, HTTP only, same site, for this host.
pub fn set_cookie(name: &str, value: &str, max_age: Duration) -> String {
    format!(
        "{name}={value}; Secure; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        max_age.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(hash: &str) -> UserRow {
        UserRow {
            name: "alice".into(),
            password_hash: hash.into(),
            roles: "operator".into(),
            org: String::new(),
            created_at_ms: 1,
        }
    }

    #[test]
    fn session_survives_only_unchanged() {
        let keys = Keys::from_ca_key(b"a CA key");
        let alice = user("hash-1");
        let (cookie, csrf) = keys.new_session(&alice, 10_000);
        assert_eq!(Keys::session_user(&cookie).as_deref(), Some("alice"));
        assert_eq!(keys.check_session(&cookie, &alice, 5_000), Some(csrf));
        // Expired.
        assert_eq!(keys.check_session(&cookie, &alice, 10_000), None);
        // A new password ends it.
        assert_eq!(keys.check_session(&cookie, &user("hash-2"), 5_000), None);
        // Another collector fleet's key does not accept it.
        let other = Keys::from_ca_key(b"another CA key");
        assert_eq!(other.check_session(&cookie, &alice, 5_000), None);
        // A longer expiry written in does not verify.
        let forged = cookie.replacen(".10000.", ".99999.", 1);
        assert_eq!(keys.check_session(&forged, &alice, 5_000), None);
    }

    #[test]
    fn passwords_hash_and_verify() {
        assert!(hash_password("short").is_err());
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse battery!", &h));
        assert!(!verify_password("anything", "not a hash"));
    }

    #[test]
    fn an_address_is_counted_before_all_and_the_account_last() {
        let b = attempt_budgets("bob", "192.0.2.7".parse().unwrap());
        let keys: Vec<&str> = b.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["ip:192.0.2.7", "all", "user:bob"]);
        assert_eq!(b[2].1, MAX_PER_ACCOUNT);
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd"));
        assert!(!same_token("abc", "abcd"));
    }
}
