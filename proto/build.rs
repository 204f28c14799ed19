//! Compiles proto/trainq/v1/*.proto into Rust (prost + tonic), writes the file descriptor set that
//! the coordinator serves through gRPC reflection, and generates the proto3 JSON mapping (pbjson)
//! used for spec files and for storing specs as JSON in Postgres.
//!
//! protoc comes from the `protoc-bin-vendored` crate so a fresh machine needs no system protoc.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let include = protoc_bin_vendored::include_path()?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor = out.join("trainq_descriptor.bin");
    let protos = [PathBuf::from("proto/trainq/v1/trainq.proto")];

    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        // Decode errors are INVALID_ARGUMENT, not INTERNAL (src/codec.rs).
        .codec_path("crate::codec::Codec")
        .compile_protos(&protos, &[PathBuf::from("proto"), include])?;

    let set = std::fs::read(&descriptor)?;
    pbjson_build::Builder::new()
        .register_descriptors(&set)?
        .build(&[".trainq.v1"])?;

    for p in protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    Ok(())
}
