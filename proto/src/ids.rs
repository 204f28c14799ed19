//! Typed identifiers, parsed once at the edge.
//!
//! The contract says ids are hyphenated UUIDs (`8-4-4-4-12` hex digits, either case); braced,
//! URN and simple (undashed) forms are refused everywhere with the same message. [`JobId`] and
//! [`SweepId`] are the only way the coordinator, the CLI and the worker turn text into an id, so
//! the strictness cannot drift between RPCs again.
//!
//! Must not know about Postgres, Redis or libtorch.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

use crate::spec::FieldViolation;

/// True when `text` is a UUID in the hyphenated form (36 characters, dashes at 8, 13, 18, 23).
fn is_hyphenated(text: &str) -> bool {
    text.len() == 36
        && text.bytes().enumerate().all(|(i, b)| {
            if [8, 13, 18, 23].contains(&i) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        })
}

/// Parses a hyphenated UUID; `what` names the kind of id in the message ("job id").
fn parse_hyphenated(field: &str, what: &str, text: &str) -> Result<Uuid, FieldViolation> {
    if text.is_empty() {
        return Err(FieldViolation::new(field, "is required"));
    }
    if !is_hyphenated(text) {
        return Err(FieldViolation::new(
            field,
            format!("must be a {what} (a hyphenated UUID), got {text:?}"),
        ));
    }
    Uuid::parse_str(text).map_err(|_| {
        FieldViolation::new(
            field,
            format!("must be a {what} (a hyphenated UUID), got {text:?}"),
        )
    })
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            /// Parses the id in `text`; `field` is its path in the request (`job_id`,
            /// `lease.job_id`, `spec.depends_on[2]`). Empty text is "is required".
            pub fn parse(field: &str, text: &str) -> Result<Self, FieldViolation> {
                parse_hyphenated(field, $what, text).map(Self)
            }

            /// A new random (v4) id.
            pub fn new_random() -> Self {
                Self(Uuid::new_v4())
            }

            pub const fn from_uuid(id: Uuid) -> Self {
                Self(id)
            }

            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Uuid {
                id.0
            }
        }

        /// The hyphenated lowercase form, as the wire carries it.
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }

        impl FromStr for $name {
            type Err = FieldViolation;

            fn from_str(text: &str) -> Result<Self, FieldViolation> {
                Self::parse("id", text)
            }
        }
    };
}

uuid_id!(
    /// A job's id (`jobs.id`).
    JobId,
    "job id"
);
uuid_id!(
    /// A sweep's id (`sweeps.id`).
    SweepId,
    "sweep id"
);
uuid_id!(
    /// A stored artifact's id (`artifacts.id`).
    ArtifactId,
    "artifact id"
);

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "67e55044-10b1-426f-9247-bb680e5fe0c8";

    #[test]
    fn hyphenated_ids_parse_in_either_case_and_print_lowercase() {
        let id = JobId::parse("job_id", ID).expect("valid");
        assert_eq!(id.to_string(), ID);
        let upper = JobId::parse("job_id", &ID.to_ascii_uppercase()).expect("upper case");
        assert_eq!(upper, id);
        assert_eq!(upper.to_string(), ID);
    }

    #[test]
    fn braced_urn_and_simple_forms_are_refused_with_the_field() {
        for text in [
            format!("{{{ID}}}"),
            format!("urn:uuid:{ID}"),
            ID.replace('-', ""),
            format!(" {ID}"),
            format!("{ID}\0"),
            "67e55044-10b1-426f-9247-bb680e5fe0cg".to_owned(),
            "67e55044+10b1-426f-9247-bb680e5fe0c8".to_owned(),
        ] {
            let err = JobId::parse("lease.job_id", &text).expect_err(&text);
            assert_eq!(err.field, "lease.job_id");
            assert!(err.description.contains("hyphenated UUID"), "{err}");
            let err = SweepId::parse("sweep_id", &text).expect_err(&text);
            assert!(err.description.contains("sweep id"), "{err}");
        }
    }

    #[test]
    fn an_empty_id_is_required() {
        let err = SweepId::parse("sweep_id", "").expect_err("empty");
        assert_eq!(err.to_string(), "sweep_id: is required");
    }
}
