//! Input validation shared by the services, the Hub's filters and the outbox: identifiers, text
//! limits, page sizes, Struct depth and entity changes of docs/api.md, and every API limit, named
//! once here. It speaks [`Invalid`]; the services turn that into INVALID_ARGUMENT.
use orgpulse::proto::EntityChanged;
use prost::Message;
use prost_types::{Struct, Value, value::Kind};

/// Largest `page_size`.
pub const MAX_PAGE_SIZE: i32 = 500;
/// `page_size` 0 means this many.
pub const DEFAULT_PAGE_SIZE: i32 = 50;
/// Largest `EntityChanged.data`, encoded.
pub const MAX_ENTITY_DATA: usize = 64 * 1024;
/// Longest user or org id, entity type or action.
pub const MAX_ID: usize = 64;
/// Longest entity id.
pub const MAX_ENTITY_ID: usize = 128;
/// Longest `request_id`.
pub const MAX_REQUEST_ID: usize = 128;
/// Longest job or notification title (characters).
pub const MAX_TITLE: usize = 200;
/// Most labels of a job, and their longest keys and values (characters).
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_KEY: usize = 64;
pub const MAX_LABEL_VALUE: usize = 256;
/// Longest job message (characters).
pub const MAX_MESSAGE: usize = 1000;
/// Longest notification body (characters).
pub const MAX_BODY: usize = 4000;
/// Highest job progress.
pub const MAX_PROGRESS: u32 = 100;
/// Most notification ids one `MarkRead` takes.
pub const MAX_MARK: usize = 1000;
/// Most entity types one subscription may name.
pub const MAX_ENTITY_TYPES: usize = 100;
/// Most events one `Poll` answers with, and how many when it does not say.
pub const MAX_POLL_EVENTS: u32 = 1000;
pub const DEFAULT_POLL_EVENTS: u32 = 100;
/// Longest a `Poll` waits for an event.
pub const MAX_POLL_WAIT_MS: u32 = 30_000;
/// Largest request message, encoded.
pub const MAX_REQUEST: usize = 1024 * 1024;

/// Input that breaks a rule of docs/api.md (INVALID_ARGUMENT), and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl Invalid {
    pub fn new(why: impl Into<String>) -> Invalid {
        Invalid(why.into())
    }
}
/// Deepest `Struct` the API takes (the Struct itself is level 1; a list counts as a level like an
/// object): an event carrying it stays within stock protobuf runtimes' 100-level decoding limit in
/// any response (a level is up to three messages deep: map entry, Value, Struct).
pub const MAX_STRUCT_DEPTH: usize = 32;

/// 1-`max` bytes, each `allowed`; the error names the field and the character class `class`.
fn word(
    field: &str,
    v: &str,
    max: usize,
    class: &str,
    allowed: fn(u8) -> bool,
) -> Result<(), Invalid> {
    if !v.is_empty() && v.len() <= max && v.bytes().all(allowed) {
        Ok(())
    } else {
        Err(Invalid::new(format!(
            "{field} must be 1-{max} characters of {class}"
        )))
    }
}

/// A user or org id: 1-64 characters of `[A-Za-z0-9._:@-]`.
pub fn id(field: &str, v: &str) -> Result<(), Invalid> {
    word(field, v, MAX_ID, "[A-Za-z0-9._:@-]", |b| {
        b.is_ascii_alphanumeric() || b"._:@-".contains(&b)
    })
}

/// An entity type or action: 1-64 characters of `[a-z0-9_.-]`.
pub fn entity_name(field: &str, v: &str) -> Result<(), Invalid> {
    word(field, v, MAX_ID, "[a-z0-9_.-]", |b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b)
    })
}

/// An entity change as docs/api.md limits it: type, id, action, data size and addressee.
pub fn entity_change(c: &EntityChanged) -> Result<(), Invalid> {
    entity_name("entity_type", &c.entity_type)?;
    word(
        "entity_id",
        &c.entity_id,
        MAX_ENTITY_ID,
        "[A-Za-z0-9._:@/-]",
        |b| b.is_ascii_alphanumeric() || b"._:@/-".contains(&b),
    )?;
    entity_name("action", &c.action)?;
    if let Some(data) = &c.data {
        struct_depth("data", data)?;
    }
    let size = c.data.as_ref().map_or(0, Message::encoded_len);
    if size > MAX_ENTITY_DATA {
        return Err(Invalid::new(format!(
            "data is {size} bytes encoded; at most {MAX_ENTITY_DATA} allowed"
        )));
    }
    if !c.user_id.is_empty() {
        id("user_id", &c.user_id)?;
    }
    Ok(())
}

/// A Struct nested at most [`MAX_STRUCT_DEPTH`] levels.
pub fn struct_depth(field: &str, s: &Struct) -> Result<(), Invalid> {
    /// Whether `s` fits in `levels` levels (stops as soon as it does not).
    fn fits(s: &Struct, levels: usize) -> bool {
        levels > 0 && s.fields.values().all(|v| value_fits(v, levels - 1))
    }
    fn value_fits(v: &Value, levels: usize) -> bool {
        match &v.kind {
            Some(Kind::StructValue(s)) => fits(s, levels),
            Some(Kind::ListValue(l)) => {
                levels > 0 && l.values.iter().all(|v| value_fits(v, levels - 1))
            }
            _ => true,
        }
    }
    if fits(s, MAX_STRUCT_DEPTH) {
        Ok(())
    } else {
        Err(Invalid::new(format!(
            "{field} nests deeper than {MAX_STRUCT_DEPTH} levels; at most {MAX_STRUCT_DEPTH} allowed"
        )))
    }
}

/// A server-generated object id (a ULID).
pub fn object_id(field: &str, v: &str) -> Result<(), Invalid> {
    if v.len() == 26 && ulid::Ulid::from_string(v).is_ok() {
        Ok(())
    } else if v.is_empty() {
        Err(Invalid::new(format!("{field} is required")))
    } else {
        Err(Invalid::new(format!("{field} {v:?} is not a valid id")))
    }
}

/// Text of `min..=max` characters (Unicode scalar values).
pub fn text(field: &str, v: &str, min: usize, max: usize) -> Result<(), Invalid> {
    let n = v.chars().count();
    if n < min {
        return Err(Invalid::new(format!("{field} is required")));
    }
    if n > max {
        return Err(Invalid::new(format!(
            "{field} is {n} characters; at most {max} allowed"
        )));
    }
    Ok(())
}

/// `page_size` with its default; negative or above 500 is INVALID_ARGUMENT.
pub fn page_size(v: i32) -> Result<usize, Invalid> {
    match v {
        0 => Ok(DEFAULT_PAGE_SIZE as usize),
        1..=MAX_PAGE_SIZE => Ok(v as usize),
        _ => Err(Invalid::new(format!(
            "page_size must be between 0 (default {DEFAULT_PAGE_SIZE}) and {MAX_PAGE_SIZE}"
        ))),
    }
}

/// An idempotency key: empty (none) or 1-128 printable ASCII characters.
pub fn request_id(v: &str) -> Result<(), Invalid> {
    if v.len() <= MAX_REQUEST_ID && v.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(Invalid::new(format!(
            "request_id must be at most {MAX_REQUEST_ID} printable ASCII characters"
        )))
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
        assert!(entity_name("entity_type", "sales.invoice_v2-x").is_ok());
        assert!(entity_name("entity_type", "Invoice").is_err());
        assert!(entity_name("action", &"a".repeat(65)).is_err());
    }

    /// `{"a": ... {"a": leaf}}` with `levels` Structs, or with a list in place of every other one.
    fn nested(levels: usize, lists: bool) -> Struct {
        let mut v = Value {
            kind: Some(Kind::NumberValue(1.0)),
        };
        for level in 1..levels {
            let kind = if lists && level % 2 == 1 {
                Kind::ListValue(prost_types::ListValue { values: vec![v] })
            } else {
                Kind::StructValue(Struct {
                    fields: [("a".to_string(), v)].into(),
                })
            };
            v = Value { kind: Some(kind) };
        }
        Struct {
            fields: [("a".to_string(), v)].into(),
        }
    }

    #[test]
    fn structs_nest_at_most_32_levels_lists_included() {
        assert!(struct_depth("data", &Struct::default()).is_ok());
        for lists in [false, true] {
            assert!(struct_depth("data", &nested(1, lists)).is_ok());
            assert!(struct_depth("data", &nested(32, lists)).is_ok(), "{lists}");
            let err = struct_depth("data", &nested(33, lists)).unwrap_err();
            assert_eq!(
                err.to_string(),
                "data nests deeper than 32 levels; at most 32 allowed"
            );
        }
    }
}
