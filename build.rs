//! Compiles proto/orgpulse/v1 into Rust (messages, clients and servers) with protox, a pure-Rust
//! protobuf compiler, so no system `protoc` is needed. The encoded descriptor set is kept for
//! server reflection.
use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/orgpulse/v1/audience.proto",
    "proto/orgpulse/v1/job.proto",
    "proto/orgpulse/v1/notification.proto",
    "proto/orgpulse/v1/event.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("orgpulse_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
