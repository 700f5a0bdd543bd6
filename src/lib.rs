//! orgpulse: the API generated from `proto/orgpulse/v1` and the client library shared by the
//! `orgpulse` CLI and the end-to-end tests.

pub mod client;

/// Generated protobuf messages, gRPC clients and servers of package `orgpulse.v1`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("orgpulse.v1");

    /// The encoded `FileDescriptorSet` of the contract, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/orgpulse_descriptor.bin"));
}
