//! `vedette-collector init`: a new CA, server and operator certificates, and the two config files.

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::config::{RawConfig, RawStore, RawTls};
use crate::pki::{Ca, PkiError, Role, write_new};

/// What `init` made.
pub struct Initialized {
    /// A maintainer key was made on this host (`--with-maintainer-key`).
    pub generated_maintainer_key: bool,
    /// How many maintainer keys the collector trusts.
    pub maintainer_keys: usize,
    pub dir: PathBuf,
    pub fingerprint: String,
    pub client_address: String,
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("`{}` already holds a CA (`ca.key`); refusing to overwrite it. Use another --dir, or remove the old CA on purpose", dir.display())]
    CaExists { dir: PathBuf },
    #[error("cannot create `{}`: {source}", dir.display())]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("cannot encode a config file: {0}")]
    Encode(#[from] toml::ser::Error),
    #[error("`--store`: {0}")]
    Store(crate::store::StoreUrlError),
    #[error("--maintainer-key {0}")]
    MaintainerKey(String),
    #[error("cannot make the maintainer key: {0}")]
    Key(#[from] vedette_engine::bundle::BundleError),
}

/// What to run next, as `init` prints it.
pub fn next_steps(done: &Initialized) -> String {
    let (d, fp) = (done.dir.display(), &done.fingerprint);
    format!(
        "Created a new collector CA in {d}\n\
         CA SHA-256 fingerprint: {fp}\n\n\
         Next:\n  \
         vedette-collector serve --config {d}/collector.toml\n  \
         export VEDETTECTL_CONFIG={d}/vedettectl.toml\n  \
         TOKEN=$(vedettectl token create --ttl 1h)\n  \
         # on each server to protect:\n  \
         vedette-agent enroll --collector {} --token $TOKEN --ca-sha256 {fp} --state-dir /var/lib/vedette\n  \
         vedette-agent run --state-dir /var/lib/vedette --watch /srv --rules /etc/vedette/rules\n  \
         # publish signed rules to every agent:\n  \
         vedettectl rules publish /path/to/rules\n{}",
        done.client_address,
        maintainer_advice(done)
    )
}

fn maintainer_advice(done: &Initialized) -> String {
    let d = done.dir.display();
    if done.generated_maintainer_key {
        format!(
            "\nWARNING: the rule-signing key {d}/maintainer.key is on this host: whoever takes \
             the collector host can sign bundles every agent runs. Keep maintainer keys on the \
             maintainers' machines (vedettectl keys generate) and list their .pub files under \
             maintainer_keys instead.\n"
        )
    } else if done.maintainer_keys == 0 {
        format!(
            "\nNo rule maintainer is trusted yet: on each maintainer's machine run \
             `vedettectl keys generate --out NAME`, list NAME.pub under maintainer_keys in \
             {d}/collector.toml, and publish with `vedettectl rules publish --sign-key NAME.key`.\n"
        )
    } else {
        String::new()
    }
}

/// Creates everything in `dir`. `names` are extra DNS names or IP addresses for the server
/// certificate; `localhost` and `127.0.0.1` are always included.
/// Which rule maintainers the new collector trusts.
#[derive(Debug, Clone, Default)]
pub struct Maintainers {
    /// Public keys (`vedettectl keys generate` on each maintainer's machine) to trust.
    pub keys: Vec<std::path::PathBuf>,
    /// Also make a maintainer key pair here and trust it: one command to a working setup,
    /// with the signing key on the collector host.
    pub generate: bool,
}

pub fn init(
    dir: &Path,
    listen: SocketAddr,
    names: &[String],
    store: &str,
    maintainers: &Maintainers,
) -> Result<Initialized, InitError> {
    crate::store::StoreLocation::parse(store, dir).map_err(InitError::Store)?;
    // Read before anything is written: a bad key file leaves nothing behind.
    let mut given = String::new();
    for p in &maintainers.keys {
        let keys = vedette_engine::bundle::PublicKey::load(p)
            .map_err(|e| InitError::MaintainerKey(format!("{}: {e}", p.display())))?;
        for k in keys {
            given.push_str(&k.to_pem());
        }
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| InitError::Dir {
            dir: dir.to_owned(),
            source,
        })?;
    if dir.join("ca.key").exists() || dir.join("ca.crt").exists() {
        return Err(InitError::CaExists {
            dir: dir.to_owned(),
        });
    }
    let fingerprint = write_pki(dir, &server_names(listen, names))?;
    let mut trusted = Vec::new();
    if !given.is_empty() {
        write_new(&dir.join("maintainers.pub"), given.as_bytes(), 0o644)?;
        trusted.push("maintainers.pub");
    }
    if maintainers.generate {
        vedette_engine::bundle::write_key_pair(&dir.join("maintainer"))?;
        trusted.push("maintainer.pub");
    }
    write_collector_config(dir, listen, store, &trusted)?;
    let client_address = client_address(listen);
    write_ctl_config(dir, &client_address, maintainers.generate)?;
    Ok(Initialized {
        generated_maintainer_key: maintainers.generate,
        maintainer_keys: trusted.len(),
        dir: dir.to_owned(),
        fingerprint,
        client_address,
    })
}

/// The server certificate's names: the loopback names, the listen address unless it is
/// unspecified, then `extra` without repeats.
fn server_names(listen: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if !listen.ip().is_unspecified() {
        sans.push(listen.ip().to_string());
    }
    for n in extra {
        if !sans.contains(n) {
            sans.push(n.clone());
        }
    }
    sans
}

/// The CA, the server and operator certificates; returns the CA's fingerprint.
fn write_pki(dir: &Path, sans: &[String]) -> Result<String, InitError> {
    let (ca, ca_key) = Ca::generate("Vedette collector CA")?;
    // The key first, created exclusively: two concurrent inits cannot both succeed.
    write_new(&dir.join("ca.key"), ca_key.as_bytes(), 0o600)?;
    write_new(&dir.join("ca.crt"), ca.cert_pem().as_bytes(), 0o644)?;
    let server = ca.issue_server(sans)?;
    write_new(&dir.join("server.key"), server.key_pem.as_bytes(), 0o600)?;
    write_new(&dir.join("server.crt"), server.cert_pem.as_bytes(), 0o644)?;
    let operator = ca.issue_client("operator", &[Role::Operator, Role::Maintainer], None)?;
    write_new(
        &dir.join("operator.key"),
        operator.key_pem.as_bytes(),
        0o600,
    )?;
    write_new(
        &dir.join("operator.crt"),
        operator.cert_pem.as_bytes(),
        0o644,
    )?;
    Ok(ca.fingerprint())
}

fn write_collector_config(
    dir: &Path,
    listen: SocketAddr,
    store: &str,
    maintainer_keys: &[&str],
) -> Result<(), InitError> {
    let collector = RawConfig {
        listen: listen.to_string(),
        metrics_listen: Some(crate::config::DEFAULT_METRICS_LISTEN.into()),
        console_listen: None,
        store: Some(RawStore {
            url: store.to_string(),
            ca_cert: None,
        }),
        database: None,
        tls: RawTls {
            ca_cert: "ca.crt".into(),
            ca_key: "ca.key".into(),
            server_cert: "server.crt".into(),
            server_key: "server.key".into(),
        },
        shutdown_grace: Some("10s".into()),
        token_ttl: Some("1h".into()),
        retention: None,
        silent_after: None,
        stale_after: None,
        maintainer_keys: maintainer_keys.iter().map(|k| k.into()).collect(),
        insecure_allow_unsigned_bundles: false,
        intel: None,
        export: None,
        limits: None,
    };
    let text = format!(
        "# Vedette collector configuration, written by `vedette-collector init`.\n\
         # Relative paths are relative to this file's directory.\n{}",
        toml::to_string(&collector)?
    );
    write_new(&dir.join("collector.toml"), text.as_bytes(), 0o600)?;
    Ok(())
}

/// Where clients on this host reach a collector listening on `listen`.
pub(crate) fn client_address(listen: SocketAddr) -> String {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => format!("localhost:{}", listen.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => format!("localhost:{}", listen.port()),
        _ => listen.to_string(),
    }
}

fn write_ctl_config(dir: &Path, client_address: &str, sign_key: bool) -> Result<(), InitError> {
    // The keys vedettectl's config reads (see the vedette-ctl crate).
    let mut ctl = toml::Table::new();
    for (k, v) in [
        ("collector", client_address),
        ("ca_cert", "ca.crt"),
        ("cert", "operator.crt"),
        ("key", "operator.key"),
    ] {
        ctl.insert(k.into(), toml::Value::String(v.into()));
    }
    if sign_key {
        ctl.insert(
            "sign_key".into(),
            toml::Value::String("maintainer.key".into()),
        );
    }
    let text = format!(
        "# vedettectl configuration, written by `vedette-collector init`.\n\
         # Relative paths are relative to this file's directory.\n{}",
        toml::to_string(&ctl)?
    );
    write_new(&dir.join("vedettectl.toml"), text.as_bytes(), 0o600)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_private_and_a_second_init_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("c");
        let out = init(
            &d,
            "127.0.0.1:7443".parse().unwrap(),
            &["collector.example".into()],
            "sqlite:vedette.db",
            &Maintainers {
                keys: Vec::new(),
                generate: true,
            },
        )
        .unwrap();
        assert_eq!(out.fingerprint.len(), 64);
        for key in ["ca.key", "server.key", "operator.key", "maintainer.key"] {
            let mode = fs::metadata(d.join(key)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key}");
        }
        crate::config::Config::load(&d.join("collector.toml")).unwrap();
        // vedettectl's own tests load it; here: every key it needs is there.
        let ctl: toml::Table =
            toml::from_str(&fs::read_to_string(d.join("vedettectl.toml")).unwrap()).unwrap();
        for key in ["collector", "ca_cert", "cert", "key", "sign_key"] {
            assert!(ctl.contains_key(key), "{key}");
        }
        let before = fs::read(d.join("ca.key")).unwrap();
        assert!(matches!(
            init(
                &d,
                "127.0.0.1:7443".parse().unwrap(),
                &[],
                "sqlite:vedette.db",
                &Maintainers::default()
            ),
            Err(InitError::CaExists { .. })
        ));
        assert_eq!(fs::read(d.join("ca.key")).unwrap(), before);
    }
}
