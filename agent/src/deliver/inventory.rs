//! What the agent tells the collector about its host in Hello.

use vedette_proto::v1::Inventory;

pub fn collect() -> Inventory {
    Inventory {
        hostname: host_name(),
        os: sysinfo::System::long_os_version().unwrap_or_else(|_| std::env::consts::OS.to_string()),
        kernel: sysinfo::System::kernel_version().unwrap_or_default(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        arch: std::env::consts::ARCH.to_string(),
    }
}

/// The name the agent reports for its host: `VEDETTE_HOSTNAME` when set (containers and images
/// whose kernel host name is meaningless), else the system's host name.
pub fn host_name() -> String {
    match std::env::var("VEDETTE_HOSTNAME") {
        Ok(name) if !name.trim().is_empty() => name.trim().to_string(),
        _ => sysinfo::System::host_name().unwrap_or_default(),
    }
}
