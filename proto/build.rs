//! Generates the vedette.v1 gRPC code from the .proto files with `protox` (no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["vedette/v1/agent.proto", "vedette/v1/admin.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    // No `connect` constructor on clients: it would clash with the `Connect` RPC, and every
    // client builds its own TLS channel anyway.
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
