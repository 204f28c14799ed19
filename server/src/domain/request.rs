//! Idempotency keys of SubmitJob and SubmitSweep: the client's `request_id` and a digest of the
//! spec it came with, so that a repeat can be told from a reuse of the key for something else.
//!
//! Must not do I/O: the store keeps the keys (`submit_requests`) and decides who was first.

use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// Longest `request_id`, in characters (documented in the .proto).
pub const MAX_REQUEST_ID_CHARS: usize = 128;

/// Which RPC a key belongs to: the two RPCs' keys are separate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Job,
    Sweep,
}

impl RequestKind {
    /// The stored name (`submit_requests.kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Job => "job",
            RequestKind::Sweep => "sweep",
        }
    }
}

/// A checked `request_id` with the SHA-256 of its request's spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestKey {
    pub kind: RequestKind,
    /// 1..=[`MAX_REQUEST_ID_CHARS`] characters of `[A-Za-z0-9_.:-]`.
    pub id: String,
    /// Lowercase hex SHA-256 of the spec's proto3 JSON mapping as compact text. serde_json's
    /// objects keep their keys sorted (the workspace does not enable `preserve_order`) and pbjson
    /// leaves fields at their defaults out, so equal specs give equal digests however the
    /// client ordered its map entries.
    pub spec_sha256: String,
}

impl RequestKey {
    /// `None` for an empty `request_id` (no key); INVALID_ARGUMENT naming `field` when it is
    /// too long or has a character outside the set.
    pub fn parse(
        kind: RequestKind,
        field: &str,
        request_id: &str,
        spec_json: &serde_json::Value,
    ) -> Result<Option<RequestKey>> {
        if request_id.is_empty() {
            return Ok(None);
        }
        let ok = request_id.chars().count() <= MAX_REQUEST_ID_CHARS
            && request_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c));
        if !ok {
            return Err(Error::invalid(
                field,
                format!("must be 1..={MAX_REQUEST_ID_CHARS} characters of [A-Za-z0-9_.:-]"),
            ));
        }
        Ok(Some(RequestKey {
            kind,
            id: request_id.to_owned(),
            spec_sha256: hex::encode(Sha256::digest(spec_json.to_string().as_bytes())),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::invalid_field;

    fn key(id: &str, spec: serde_json::Value) -> Result<Option<RequestKey>> {
        RequestKey::parse(RequestKind::Job, "request_id", id, &spec)
    }

    #[test]
    fn an_empty_request_id_is_no_key_and_a_bad_one_is_invalid() {
        assert_eq!(key("", serde_json::json!({})).expect("ok"), None);
        for bad in ["a b", "é", "x/y", "\0", &"k".repeat(129)] {
            assert_eq!(invalid_field(key(bad, serde_json::json!({}))), "request_id");
        }
        let uuid = "0190aaaa-0000-7000-8000-000000000000";
        let ok = key(uuid, serde_json::json!({}))
            .expect("ok")
            .expect("a key");
        assert_eq!((ok.id.as_str(), ok.kind), (uuid, RequestKind::Job));
        assert!(key(&"k".repeat(128), serde_json::json!({}))
            .expect("ok")
            .is_some());
        assert!(key("A-z_0.9:x", serde_json::json!({}))
            .expect("ok")
            .is_some());
    }

    #[test]
    fn the_digest_depends_on_the_spec_and_not_on_the_order_of_its_keys() {
        let digest = |v: serde_json::Value| key("r", v).expect("ok").expect("key").spec_sha256;
        let a = digest(serde_json::json!({"name": "x", "labels": {"a": "1", "b": "2"}}));
        let b = digest(
            serde_json::from_str(r#"{"labels": {"b": "2", "a": "1"}, "name": "x"}"#).expect("json"),
        );
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        assert_ne!(
            a,
            digest(serde_json::json!({"name": "y", "labels": {"a": "1", "b": "2"}}))
        );
    }
}
