//! Metric names: the shared contract's constants, and [`MetricName`], the one check of a name a
//! client or worker sends.
//!
//! The worker records these names, the coordinator's sweep summary reads them and the CLI plots
//! and reports them; all three use the constants here so a rename happens in one place (and in
//! the SQL views of `migrations/`, which name them too).
//!
//! Must not know about Postgres, Redis or libtorch.

use std::fmt;

use crate::spec::FieldViolation;

/// Training loss of the window since the last report (classifier: cross-entropy; CVAE: the
/// negative ELBO per image, reconstruction + beta * KL).
pub const TRAIN_LOSS: &str = "train/loss";
/// CVAE: reconstruction term of the training loss (BCE summed over pixels, per image).
pub const TRAIN_RECON: &str = "train/recon";
/// CVAE: KL term of the training loss, per image.
pub const TRAIN_KL: &str = "train/kl";
/// Classifier: training accuracy of the window.
pub const TRAIN_ACCURACY: &str = "train/accuracy";
/// Training throughput of the epoch, images per second.
pub const TRAIN_IMAGES_PER_S: &str = "train/images_per_s";
/// 1 when the epoch's last steps were replayed from a captured CUDA graph, else 0 (eager).
pub const TRAIN_GRAPH: &str = "train/graph";
/// 1 when the epoch trained in bf16 autocast (`training.precision`), else 0 (fp32).
pub const TRAIN_BF16: &str = "train/bf16";
/// Test loss at the end of an epoch.
pub const TEST_LOSS: &str = "test/loss";
/// Classifier: test accuracy at the end of an epoch.
pub const TEST_ACCURACY: &str = "test/accuracy";
/// CVAE: test negative ELBO in nats per image.
pub const TEST_NEG_ELBO_NATS: &str = "test/neg_elbo_nats";
/// CVAE: test negative ELBO in bits per dimension.
pub const TEST_BITS_PER_DIM: &str = "test/bits_per_dim";
/// CVAE: test reconstruction term.
pub const TEST_RECON: &str = "test/recon";
/// CVAE: test KL term.
pub const TEST_KL: &str = "test/kl";

/// Every name of the shared contract.
pub const CONTRACT: [&str; 13] = [
    TRAIN_LOSS,
    TRAIN_RECON,
    TRAIN_KL,
    TRAIN_ACCURACY,
    TRAIN_IMAGES_PER_S,
    TRAIN_GRAPH,
    TRAIN_BF16,
    TEST_LOSS,
    TEST_ACCURACY,
    TEST_NEG_ELBO_NATS,
    TEST_BITS_PER_DIM,
    TEST_RECON,
    TEST_KL,
];

/// Longest metric name, in characters (documented in the .proto).
pub const MAX_NAME_CHARS: usize = 128;

/// A metric name as a client or worker may send it: 1 to [`MAX_NAME_CHARS`] characters, none of
/// them a control character (Postgres refuses U+0000 in text; the rest would garble tables).
/// Names outside [`CONTRACT`] are allowed: a task may record metrics of its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MetricName(String);

impl MetricName {
    /// Checks `text`; `field` is its path in the request (`points[3].name`, `names[0]`).
    pub fn parse(field: &str, text: &str) -> Result<Self, FieldViolation> {
        let n = text.chars().count();
        if n == 0 || n > MAX_NAME_CHARS {
            return Err(FieldViolation::new(
                field,
                format!("must be 1 to {MAX_NAME_CHARS} characters, got {n}"),
            ));
        }
        if text.chars().any(char::is_control) {
            return Err(FieldViolation::new(
                field,
                "must not contain control characters (such as U+0000)",
            ));
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl AsRef<str> for MetricName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MetricName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for MetricName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_names_are_valid_and_distinct() {
        for name in CONTRACT {
            MetricName::parse("name", name).expect(name);
        }
        let mut sorted = CONTRACT.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), CONTRACT.len());
    }

    #[test]
    fn empty_long_and_control_character_names_are_refused_with_the_field() {
        let long = "m".repeat(MAX_NAME_CHARS + 1);
        for bad in ["", long.as_str(), "train/\0loss", "a\nb", "tab\there"] {
            let err = MetricName::parse("points[2].name", bad).expect_err(bad);
            assert_eq!(err.field, "points[2].name");
        }
        let longest = "é".repeat(MAX_NAME_CHARS);
        assert_eq!(
            MetricName::parse("n", &longest)
                .expect("128 chars")
                .as_str(),
            longest
        );
    }
}
