//! What the agent tells the collector about its host in Hello.

use vedette_proto::v1::Inventory;

pub fn collect() -> Inventory {
    Inventory {
        hostname: sysinfo::System::host_name().unwrap_or_default(),
        os: sysinfo::System::long_os_version().unwrap_or_else(|_| std::env::consts::OS.to_string()),
        kernel: sysinfo::System::kernel_version().unwrap_or_default(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        arch: std::env::consts::ARCH.to_string(),
    }
}
