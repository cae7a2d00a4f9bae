//! What each `vedette-collector` subcommand does, once its arguments are parsed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use vedette_ops::cli::{exit, fail};

use super::{CertsCmd, Command, UsersCmd, doctor, init, users};
use crate::config::Config;
use crate::peer::Peer;
use crate::{pki, server, store};

/// Runs one subcommand; its exit status.
pub fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::Init {
            dir,
            listen,
            sans,
            store,
            maintainer_keys,
            with_maintainer_key,
        } => {
            let maintainers = init::Maintainers {
                keys: maintainer_keys,
                generate: with_maintainer_key,
            };
            match init::init(&dir, listen, &sans, &store, &maintainers) {
                Ok(done) => {
                    print!("{}", init::next_steps(&done));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e, exit::FAILURE),
            }
        }
        Command::Certs(cmd) => certs(cmd),
        Command::Users(cmd) => users_command(cmd),
        Command::Doctor { config } => {
            if vedette_ops::doctor::print(&doctor::run(&config)) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(exit::FAILURE)
            }
        }
        Command::Serve {
            config,
            listen,
            metrics_listen,
        } => serve(&config, listen, metrics_listen.as_deref()),
        Command::CompileRules => ExitCode::from(vedette_engine::child::serve("vedette-collector")),
    }
}

/// `vedette-collector serve`: the config, with the command line's overrides.
fn serve(path: &Path, listen: Option<std::net::SocketAddr>, metrics: Option<&str>) -> ExitCode {
    let mut config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return fail(&e, exit::CONFIG),
    };
    config.listen = listen.unwrap_or(config.listen);
    if let Some(m) = metrics {
        match vedette_ops::metrics::parse_listen(m) {
            Ok(m) => config.metrics_listen = m,
            Err(e) => return fail(&format!("--metrics-listen: {e}"), exit::CONFIG),
        }
    }
    // Bundles published and YARA items of outside intel are compiled in a child of this
    // executable: a hostile rule can crash or stall that child, not the collector.
    let compiler = vedette_engine::child::ChildCompiler::this_executable("vedette-collector");
    vedette_engine::isolated::compile_outside_rules_with(std::sync::Arc::new(compiler));
    server::run_until_signal(config)
}

/// `vedette-collector certs issue`.
fn certs(cmd: CertsCmd) -> ExitCode {
    let CertsCmd::Issue {
        config,
        name,
        roles,
        org,
        csr,
        ctl_config,
        out,
    } = cmd;
    let config = match Config::load(&config) {
        Ok(c) => c,
        Err(e) => return fail(&e, exit::CONFIG),
    };
    if let Some(org) = &org
        && let Err(e) = check_org(&config, org)
    {
        return fail(&e, exit::CONFIG);
    }
    let issued = match &csr {
        Some(csr) => pki::sign_csr_file(
            (&config.ca_cert, &config.ca_key),
            csr,
            &name,
            &roles,
            org.as_deref(),
            &out,
        )
        .inspect(|crt| println!("wrote {} (signed from {})", crt.display(), csr.display())),
        None => pki::issue_files(
            &config.ca_cert,
            &config.ca_key,
            &name,
            &roles,
            org.as_deref(),
            &out,
        )
        .map(|(crt, key)| {
            println!("wrote {} and {} (0600)", crt.display(), key.display());
            crt
        }),
    };
    let crt = match issued {
        Ok(crt) => crt,
        Err(e) => return fail(&format!("{e:#}"), exit::FAILURE),
    };
    record_issued(&config, &crt);
    if ctl_config {
        match write_ctl_config(&config, &out) {
            Ok(path) => println!(
                "wrote {} (with {}): vedettectl --config {} agents list",
                path.display(),
                pki::with_suffix(&out, ".ca.crt").display(),
                path.display()
            ),
            Err(e) => return fail(&format!("{e:#}"), exit::FAILURE),
        }
    }
    ExitCode::SUCCESS
}

/// `certs issue --ctl-config`: PREFIX.ca.crt (the CA certificate) and PREFIX.vedettectl.toml
/// naming it, PREFIX.crt and PREFIX.key by file name, so the files work together wherever
/// they are copied.
fn write_ctl_config(config: &Config, out: &Path) -> Result<PathBuf, pki::PkiError> {
    let file_name = |suffix: &str| {
        pki::with_suffix(out, suffix)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let ca = std::fs::read(&config.ca_cert).map_err(|source| pki::PkiError::Read {
        path: config.ca_cert.clone(),
        source,
    })?;
    pki::write_new(&pki::with_suffix(out, ".ca.crt"), &ca, 0o644)?;
    let mut ctl = toml::Table::new();
    for (k, v) in [
        ("collector", super::init::client_address(config.listen)),
        ("ca_cert", file_name(".ca.crt")),
        ("cert", file_name(".crt")),
        ("key", file_name(".key")),
    ] {
        ctl.insert(k.into(), toml::Value::String(v));
    }
    let text = format!(
        "# vedettectl configuration, written by `vedette-collector certs issue --ctl-config`.\n\
         # Relative paths are relative to this file's directory; `collector` is this\n\
         # collector's address as seen from its own host: change it for another host.\n{}",
        toml::to_string(&ctl).unwrap_or_default()
    );
    let path = pki::with_suffix(out, ".vedettectl.toml");
    pki::write_new(&path, text.as_bytes(), 0o600)?;
    Ok(path)
}

/// `vedette-collector users ...`.
fn users_command(cmd: UsersCmd) -> ExitCode {
    let path = match &cmd {
        UsersCmd::Add { config, .. }
        | UsersCmd::List { config }
        | UsersCmd::Remove { config, .. } => config.clone(),
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => return fail(&e, exit::CONFIG),
    };
    let result = match cmd {
        UsersCmd::Add {
            name, roles, org, ..
        } => org
            .as_deref()
            .map_or(Ok(()), |o| check_org(&config, o))
            .map_err(users::UsersError::from)
            .and_then(|()| users::add(&config, &name, &roles, org.as_deref())),
        UsersCmd::List { .. } => users::list(&config),
        UsersCmd::Remove { name, .. } => users::remove(&config, &name),
    };
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e, exit::FAILURE),
    }
}

/// Refuses to limit a certificate to an organisation the store does not know (a typo would
/// make a certificate that sees nothing).
fn check_org(config: &Config, org: &str) -> Result<(), OrgCheckError> {
    crate::orgs::check_name(org)?;
    let orgs = store::open_as(&config.store, store::Opener::Tool)
        .and_then(|store| store.list_orgs())
        .map_err(OrgCheckError::Store)?;
    if orgs.iter().any(|o| o.name == org) {
        Ok(())
    } else {
        Err(OrgCheckError::Unknown(org.to_string()))
    }
}

/// Why `--org` was refused.
#[derive(Debug, thiserror::Error)]
pub enum OrgCheckError {
    #[error("--org: {0}")]
    Name(#[from] crate::orgs::OrgFieldError),
    #[error("--org: cannot check the organisation: {0}")]
    Store(store::StoreError),
    #[error(
        "--org: no organisation `{0}` in the store; create it first with `vedettectl orgs create {0}`"
    )]
    Unknown(String),
}

/// Records a certificate just issued in the store, for `vedettectl certs list`; a failure is a
/// warning (the collector records a certificate at its first use anyway).
fn record_issued(config: &Config, crt: &Path) {
    let row = std::fs::read(crt).ok().and_then(|pem| {
        let der = CertificateDer::from_pem_slice(&pem).ok()?;
        Peer::cert_row(der.as_ref(), vedette_proto::now_ms())
    });
    let Some(row) = row else {
        eprintln!("warning: cannot read back `{}` to record it", crt.display());
        return;
    };
    println!("serial number {}", row.serial);
    let recorded = store::open_as(&config.store, store::Opener::Tool)
        .map_err(|e| e.to_string())
        .and_then(|store| {
            store.record_cert(&row).map_err(|e| e.to_string())?;
            let mut act = crate::server::audit::Act::local("cert.issue")
                .target(row.serial.clone())
                .org(row.org.clone());
            act.detail = format!("{} ({})", row.subject, row.roles);
            act.record_local(store.as_ref());
            Ok(())
        });
    if let Err(e) = recorded {
        eprintln!(
            "warning: the certificate is not recorded in the store ({e}); the collector records it at its first use"
        );
    }
}
