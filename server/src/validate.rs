//! Input validation shared by the services: identifiers, text limits and page sizes of docs/api.md.
use tonic::Status;

pub const MAX_PAGE_SIZE: i32 = 500;
pub const DEFAULT_PAGE_SIZE: i32 = 50;

/// A user or org id: 1-64 characters of `[A-Za-z0-9._:@-]`.
pub fn id(field: &str, v: &str) -> Result<(), Status> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "{field} must be 1-64 characters of [A-Za-z0-9._:@-]"
        )))
    }
}

/// A server-generated object id (a ULID).
pub fn object_id(field: &str, v: &str) -> Result<(), Status> {
    if v.len() == 26 && ulid::Ulid::from_string(v).is_ok() {
        Ok(())
    } else if v.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Err(Status::invalid_argument(format!(
            "{field} {v:?} is not a valid id"
        )))
    }
}

/// Text of `min..=max` characters (Unicode scalar values).
pub fn text(field: &str, v: &str, min: usize, max: usize) -> Result<(), Status> {
    let n = v.chars().count();
    if n < min {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    if n > max {
        return Err(Status::invalid_argument(format!(
            "{field} is {n} characters; at most {max} allowed"
        )));
    }
    Ok(())
}

/// `page_size` with its default; negative or above 500 is INVALID_ARGUMENT.
pub fn page_size(v: i32) -> Result<usize, Status> {
    match v {
        0 => Ok(DEFAULT_PAGE_SIZE as usize),
        1..=MAX_PAGE_SIZE => Ok(v as usize),
        _ => Err(Status::invalid_argument(format!(
            "page_size must be between 0 (default {DEFAULT_PAGE_SIZE}) and {MAX_PAGE_SIZE}"
        ))),
    }
}

/// An idempotency key: empty (none) or 1-128 printable ASCII characters.
pub fn request_id(v: &str) -> Result<(), Status> {
    if v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(Status::invalid_argument(
            "request_id must be at most 128 printable ASCII characters",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_limits() {
        assert!(id("org_id", "acme.eu:1@x-y_z").is_ok());
        assert!(id("org_id", "").is_err());
        assert!(id("org_id", "a b").is_err());
        assert!(id("org_id", &"a".repeat(65)).is_err());
        assert!(text("title", "", 1, 200).is_err());
        assert!(text("title", &"é".repeat(200), 1, 200).is_ok());
        assert!(page_size(501).is_err());
        assert!(page_size(-1).is_err());
        assert_eq!(page_size(0).unwrap(), 50);
        assert!(object_id("job_id", "nope").is_err());
        assert!(object_id("job_id", &ulid::Ulid::new().to_string()).is_ok());
    }
}
