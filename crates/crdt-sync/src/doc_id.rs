//! Document identities (`kind:name`) and node ids, with their validation.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// Longest document name, in bytes.
pub const DOC_NAME_BYTES_MAX: usize = 128;
/// Longest node id, in bytes.
pub const NODE_ID_BYTES_MAX: usize = 64;

/// The CRDT a document holds. A document's kind is part of its identity, so
/// two replicas can never create the same document as two different kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum DocKind {
    /// PN-counter, idempotent by op_id across replicas.
    Counter,
    /// Last-writer-wins register of versioned JSON values.
    Register,
    /// Observed-remove set of strings, add-wins.
    Set,
    /// Ordered list of strings (RGA).
    List,
}

impl DocKind {
    /// All kinds, in a fixed order.
    pub const ALL: [DocKind; 4] =
        [DocKind::Counter, DocKind::Register, DocKind::Set, DocKind::List];

    /// The kind's name as used in [`DocId`]'s string form.
    pub fn as_str(self) -> &'static str {
        match self {
            DocKind::Counter => "counter",
            DocKind::Register => "register",
            DocKind::Set => "set",
            DocKind::List => "list",
        }
    }
}

impl fmt::Display for DocKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A document's identity: its kind and its name. Its string form
/// `kind:name` (for example `counter:production`) is a single NATS subject
/// token.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DocId {
    kind: DocKind,
    name: String,
}

impl DocId {
    /// A document id; the name is 1 to [`DOC_NAME_BYTES_MAX`] bytes of
    /// `[A-Za-z0-9_-]`.
    pub fn new(kind: DocKind, name: &str) -> Result<DocId, Error> {
        validate_name("document name", name, DOC_NAME_BYTES_MAX)?;
        Ok(DocId { kind, name: name.to_owned() })
    }

    /// A counter document.
    pub fn counter(name: &str) -> Result<DocId, Error> {
        DocId::new(DocKind::Counter, name)
    }

    /// A register document.
    pub fn register(name: &str) -> Result<DocId, Error> {
        DocId::new(DocKind::Register, name)
    }

    /// A set document.
    pub fn set(name: &str) -> Result<DocId, Error> {
        DocId::new(DocKind::Set, name)
    }

    /// A list document.
    pub fn list(name: &str) -> Result<DocId, Error> {
        DocId::new(DocKind::List, name)
    }

    /// The document's kind.
    pub fn kind(&self) -> DocKind {
        self.kind
    }

    /// The document's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.name)
    }
}

impl FromStr for DocId {
    type Err = Error;

    fn from_str(s: &str) -> Result<DocId, Error> {
        let malformed = |reason: &str| Error::Malformed {
            what: "document id",
            reason: format!("{reason}: {s:?}"),
        };
        let (kind, name) = s.split_once(':').ok_or_else(|| malformed("no ':'"))?;
        let kind = DocKind::ALL
            .into_iter()
            .find(|k| k.as_str() == kind)
            .ok_or_else(|| malformed("unknown kind"))?;
        DocId::new(kind, name)
    }
}

/// Checks a node id: 1 to [`NODE_ID_BYTES_MAX`] bytes of `[A-Za-z0-9_-]`.
pub fn validate_node_id(node_id: &str) -> Result<(), Error> {
    validate_name("node id", node_id, NODE_ID_BYTES_MAX)
}

fn validate_name(what: &'static str, name: &str, max_bytes: usize) -> Result<(), Error> {
    let invalid = |reason| Error::InvalidName { what, name: name.to_owned(), reason };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() > max_bytes {
        return Err(Error::TooLong { what, len_bytes: name.len(), max_bytes });
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(invalid("only [A-Za-z0-9_-] allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doc_id_round_trips_through_its_string_form() {
        let id = DocId::counter("production").unwrap();
        assert_eq!(id.to_string(), "counter:production");
        assert_eq!("counter:production".parse::<DocId>().unwrap(), id);
    }

    #[test]
    fn bad_names_are_rejected() {
        assert!(DocId::counter("").is_err());
        assert!(DocId::counter("a.b").is_err());
        assert!(DocId::counter(&"x".repeat(DOC_NAME_BYTES_MAX + 1)).is_err());
        assert!("gauge:x".parse::<DocId>().is_err());
        assert!("counter".parse::<DocId>().is_err());
        assert!(validate_node_id("node#1").is_err());
        assert!(validate_node_id("node-1").is_ok());
    }
}
