//! The client library's error type and its classification into the classes a caller (and the
//! CLI's exit codes) care about: usage, auth, not found, conflict, unavailable, other.
use std::fmt;

use tonic::{Code, Status};

/// What kind of failure an [`Error`] is, independent of how it was reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request itself is wrong (INVALID_ARGUMENT, OUT_OF_RANGE, bad configuration).
    Usage,
    /// Missing, invalid or expired credentials, or not allowed (UNAUTHENTICATED, PERMISSION_DENIED).
    Auth,
    /// The object does not exist (NOT_FOUND).
    NotFound,
    /// The object's state forbids it (ABORTED, FAILED_PRECONDITION, ALREADY_EXISTS).
    Conflict,
    /// No server could be reached or it gave up (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED).
    Unavailable,
    /// Anything else (INTERNAL, UNKNOWN, ...).
    Other,
}

/// A failed call or watch.
#[derive(Debug)]
pub enum Error {
    /// The server (or the transport) answered with a gRPC status.
    Status(Status),
    /// The token source could not produce a token.
    Token(String),
    /// The client was configured wrongly (no endpoint, a malformed URL, ...).
    Config(String),
}

impl Error {
    /// The class of this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Token(_) => ErrorClass::Auth,
            Error::Config(_) => ErrorClass::Usage,
            Error::Status(s) => match s.code() {
                Code::InvalidArgument | Code::OutOfRange => ErrorClass::Usage,
                Code::Unauthenticated | Code::PermissionDenied => ErrorClass::Auth,
                Code::NotFound => ErrorClass::NotFound,
                Code::Aborted | Code::FailedPrecondition | Code::AlreadyExists => {
                    ErrorClass::Conflict
                }
                Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => {
                    ErrorClass::Unavailable
                }
                _ => ErrorClass::Other,
            },
        }
    }
}

/// True when the server refused the token only because its `exp` passed: a fresh token fixes it.
/// The server marks that status with `orgpulse-error: token-expired` (docs/api.md "Error markers").
pub fn is_token_expired(status: &Status) -> bool {
    use crate::error_marker::{KEY, TOKEN_EXPIRED};
    status.code() == Code::Unauthenticated
        && status
            .metadata()
            .get(KEY)
            .is_some_and(|v| v.to_str().ok() == Some(TOKEN_EXPIRED))
}

/// True when an idempotent call may succeed by sending it again (possibly to another endpoint):
/// the server could not be reached or the connection broke before the reply.
pub(crate) fn is_retryable_call(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// True when the call failed before it reached a server (the connection was refused or could not
/// be routed), so even a non-idempotent call can safely go to the next endpoint.
pub(crate) fn never_sent(status: &Status) -> bool {
    use std::io::ErrorKind::*;
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ConnectionRefused | HostUnreachable | NetworkUnreachable | AddrNotAvailable
            );
        }
        source = cause.source();
    }
    false
}

/// True when an ended `Subscribe` stream should be resumed from its cursor. Only errors that
/// another attempt cannot fix end a watch: an invalid token, a forbidden org, a bad request.
pub(crate) fn is_resumable_stream(status: &Status) -> bool {
    match status.code() {
        Code::Unauthenticated => is_token_expired(status),
        Code::PermissionDenied
        | Code::InvalidArgument
        | Code::NotFound
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented => false,
        _ => true,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Status(s) => {
                let what = match s.code() {
                    Code::Unauthenticated => "unauthenticated",
                    Code::PermissionDenied => "permission denied",
                    Code::NotFound => "not found",
                    Code::InvalidArgument => "invalid argument",
                    Code::FailedPrecondition => "failed precondition",
                    Code::Aborted => "conflict",
                    Code::AlreadyExists => "already exists",
                    Code::Unavailable => "server unavailable",
                    Code::DeadlineExceeded => "deadline exceeded",
                    Code::ResourceExhausted => "resource exhausted",
                    Code::OutOfRange => "out of range",
                    Code::Unimplemented => "unimplemented",
                    _ => "server error",
                };
                // Transport failures keep their cause (e.g. "connection refused") in the source
                // chain, whose layers often repeat each other: print each text once.
                let mut parts = vec![what.to_string()];
                let mut next = Some(s.message().trim().to_string());
                let mut source = std::error::Error::source(s);
                while let Some(text) = next {
                    if !text.is_empty() && !parts.contains(&text) {
                        parts.push(text);
                    }
                    next = source.map(|c| c.to_string());
                    source = source.and_then(|c| c.source());
                }
                f.write_str(&parts.join(": "))
            }
            Error::Token(m) => write!(f, "token: {m}"),
            Error::Config(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

impl From<Status> for Error {
    fn from(s: Status) -> Self {
        Error::Status(s)
    }
}

#[cfg(test)]
mod tests {
    use tonic::metadata::MetadataValue;

    use super::*;
    use crate::error_marker::{KEY, TOKEN_EXPIRED};

    fn marked(code: Code, message: &str, marker: &'static str) -> Status {
        let mut s = Status::new(code, message);
        s.metadata_mut()
            .insert(KEY, MetadataValue::from_static(marker));
        s
    }

    #[test]
    fn token_expiry_is_read_from_the_marker_not_the_message() {
        assert!(is_token_expired(&marked(
            Code::Unauthenticated,
            "token expired",
            TOKEN_EXPIRED
        )));
        assert!(is_token_expired(&marked(
            Code::Unauthenticated,
            "",
            TOKEN_EXPIRED
        )));
        assert!(!is_token_expired(&Status::unauthenticated("token expired")));
        assert!(!is_token_expired(&marked(
            Code::Unauthenticated,
            "x",
            "other"
        )));
        assert!(!is_token_expired(&marked(
            Code::PermissionDenied,
            "x",
            TOKEN_EXPIRED
        )));
    }
}
