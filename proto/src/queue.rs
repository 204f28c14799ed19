//! The Redis key layout: the one place that names Redis keys.
//!
//! Redis carries only job ids (and wake-ups); Postgres is the truth. The coordinator pushes a job
//! id onto the ready list when the job becomes queued; workers pop ids and then claim the job over
//! gRPC. Losing every key loses nothing: the coordinator's reconciler pushes queued jobs again.
//! Must not hold any job data.

/// Default prefix for every key, so several deployments (or tests) can share one Redis.
pub const DEFAULT_PREFIX: &str = "trainq:";

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

    /// List of ready job ids: the coordinator `RPUSH`es, workers `BLPOP`.
    pub fn ready_queue(&self) -> String {
        format!("{}queue:ready", self.prefix)
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
        assert!(keys.ready_queue().starts_with("t1:"));
        assert!(keys.alive_marker().starts_with("t1:"));
        assert_ne!(keys.ready_queue(), keys.alive_marker());
        assert_eq!(Keys::default().ready_queue(), "trainq:queue:ready");
    }
}
