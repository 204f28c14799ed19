//! The Redis key layout and the queue names: the one place that names Redis keys.
//!
//! Redis carries only job ids (and wake-ups); Postgres is the truth. Each queue is a sorted set
//! (`<prefix>queue:ready:<queue>`) of job ids scored by [`score`] (minus the job's priority), so
//! `BZPOPMIN` over a worker's queues, in the order it serves them, takes the highest priority
//! first and, within one priority, the lowest id: job ids are UUID v7, whose text sorts by
//! creation time, so that is the oldest job. The coordinator adds a job's id when the job becomes
//! queued; workers pop ids and then claim the job over gRPC. Adding an id twice leaves it there
//! once. Losing every key loses nothing: the coordinator's reconciler adds queued jobs again.
//! Must not hold any job data.

use uuid::Uuid;

use crate::spec::FieldViolation;

/// Default prefix for every key, so several deployments (or tests) can share one Redis.
pub const DEFAULT_PREFIX: &str = "trainq:";

/// The queue of a job whose spec names none, and the one a worker serves by default.
pub const DEFAULT_QUEUE: &str = "default";
/// Longest queue name.
pub const MAX_QUEUE_CHARS: usize = 32;
/// Job priorities lie in `-MAX_PRIORITY..=MAX_PRIORITY`.
pub const MAX_PRIORITY: i32 = 1000;

/// Checks a queue name: 1..=32 characters of `[a-z0-9-]`. `field` names it in the error
/// (`spec.queue`, `--queues`).
pub fn check_queue_name(field: &str, name: &str) -> Result<(), FieldViolation> {
    let n = name.chars().count();
    if n == 0 || n > MAX_QUEUE_CHARS {
        return Err(FieldViolation::new(
            field,
            format!("a queue name has 1 to {MAX_QUEUE_CHARS} characters, got {n}"),
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(FieldViolation::new(
            field,
            format!("queue names may contain only a-z 0-9 and -, got {name:?}"),
        ));
    }
    Ok(())
}

/// Parses a worker's `--queues` list (`gpu-large,default`): names in the order they are served,
/// no repeats, at least one.
pub fn parse_queue_list(field: &str, list: &str) -> Result<Vec<String>, FieldViolation> {
    let mut queues: Vec<String> = Vec::new();
    for name in list.split(',').map(str::trim) {
        check_queue_name(field, name)?;
        if queues.iter().any(|q| q == name) {
            return Err(FieldViolation::new(
                field,
                format!("queue {name:?} is listed twice"),
            ));
        }
        queues.push(name.to_string());
    }
    Ok(queues)
}

/// A queued job as the dispatcher adds it: where it waits, and in which order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub id: Uuid,
    pub queue: String,
    pub priority: i32,
}

/// The sorted-set score of a job with `priority`: lower pops first, so higher priorities get
/// lower scores. Ties (one priority) pop in member order, the ids' creation order.
pub fn score(priority: i32) -> f64 {
    -f64::from(priority)
}

/// Key names under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The sorted set of ready job ids of one queue: the coordinator `ZADD`s, workers
    /// `BZPOPMIN`.
    pub fn ready(&self, queue: &str) -> String {
        format!("{}queue:ready:{queue}", self.prefix)
    }

    /// A pattern (`SCAN MATCH`) that matches every queue's ready set and nothing else.
    pub fn ready_pattern(&self) -> String {
        format!("{}queue:ready:*", self.prefix)
    }

    /// A marker the coordinator sets (`SET NX`) and checks at every reconcile. When it is gone,
    /// Redis lost its keys (FLUSHALL, a restart without persistence): every queued job is pushed
    /// again at once instead of after the re-dispatch delay.
    pub fn alive_marker(&self) -> String {
        format!("{}queue:alive", self.prefix)
    }
}

impl Default for Keys {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_lives_under_the_prefix() {
        let keys = Keys::new("t1:");
        assert!(keys.ready("default").starts_with("t1:"));
        assert!(keys.alive_marker().starts_with("t1:"));
        assert_ne!(keys.ready("default"), keys.alive_marker());
        assert_ne!(keys.ready("a"), keys.ready("b"));
        assert_eq!(
            Keys::default().ready(DEFAULT_QUEUE),
            "trainq:queue:ready:default"
        );
        assert!(!keys.alive_marker().starts_with("t1:queue:ready:"));
        assert!(keys.ready("gpu").starts_with("t1:queue:ready:"));
    }

    #[test]
    fn queue_names_are_short_lowercase_words_and_errors_name_the_field() {
        for good in ["default", "gpu-large", "a", "0", &"q".repeat(32)] {
            check_queue_name("spec.queue", good).expect(good);
        }
        for bad in [
            "",
            "GPU",
            "gpu_large",
            "gpu large",
            "ü",
            &"q".repeat(33),
            "a:b",
        ] {
            let e = check_queue_name("spec.queue", bad).expect_err(bad);
            assert_eq!(e.field, "spec.queue");
        }
    }

    #[test]
    fn a_queue_list_keeps_its_order_and_refuses_repeats_and_empties() {
        assert_eq!(
            parse_queue_list("--queues", "gpu-large, default").expect("valid"),
            ["gpu-large", "default"]
        );
        for bad in ["", "a,,b", "a,a", "a,B"] {
            let e = parse_queue_list("--queues", bad).expect_err(bad);
            assert_eq!(e.field, "--queues");
        }
    }

    #[test]
    fn higher_priorities_score_lower() {
        assert!(score(5) < score(0));
        assert!(score(0) < score(-5));
        assert_eq!(score(MAX_PRIORITY), -1000.0);
    }
}
