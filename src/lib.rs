//! orgpulse: the API generated from `proto/orgpulse/v1` and the client library shared by the
//! `orgpulse` CLI and the end-to-end tests.

pub mod client;

/// The machine-readable marker the server adds, as trailing metadata, to a status a client should
/// act on by its meaning rather than its message (docs/api.md "Error markers").
pub mod error_marker {
    /// The metadata key (a trailer, so grpc-web clients see it too).
    pub const KEY: &str = "orgpulse-error";
    /// The token's `exp` passed: the call was refused or the stream ended with UNAUTHENTICATED, and
    /// the same call with a fresh token succeeds.
    pub const TOKEN_EXPIRED: &str = "token-expired";
}

/// Generated protobuf messages, gRPC clients and servers of package `orgpulse.v1`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("orgpulse.v1");

    /// The encoded `FileDescriptorSet` of the contract, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/orgpulse_descriptor.bin"));
}
