//! The one mapping between [`JobState`] / [`AttemptOutcome`] and their SQL text.
//!
//! Postgres keeps a state as its lowercase name (`jobs.state`, `job_attempts.outcome`). Values
//! travel to SQL as binds of [`JobState::as_str`]; constants inside query text come from the
//! [`state!`] and [`outcome!`] macros, used with `concat!`, because the partial indexes
//! (`WHERE state = 'queued'`, `'running'`) only serve queries whose text holds the literal.
//! Rows decode through `#[sqlx(try_from = "String")]`, or [`job_state`] for a state read into a
//! tuple.
//!
//! Must not hold queries of its own, and no other module of the server may spell a state's or
//! outcome's SQL literal.

use proto::JobState;

use crate::error::{Error, Result};

/// The SQL literal of a job state, for `concat!` into query text: `state!(queued)` is
/// `"'queued'"`.
macro_rules! state {
    (waiting) => {
        "'waiting'"
    };
    (queued) => {
        "'queued'"
    };
    (running) => {
        "'running'"
    };
    (succeeded) => {
        "'succeeded'"
    };
    (failed) => {
        "'failed'"
    };
    (cancelled) => {
        "'cancelled'"
    };
}

/// The SQL literal of an attempt outcome, for `concat!` into query text: `outcome!(running)`
/// is `"'running'"`.
macro_rules! outcome {
    (running) => {
        "'running'"
    };
    (succeeded) => {
        "'succeeded'"
    };
    (failed) => {
        "'failed'"
    };
    (lease_expired) => {
        "'lease_expired'"
    };
    (handed_back) => {
        "'handed_back'"
    };
    (cancelled) => {
        "'cancelled'"
    };
}

pub(crate) use {outcome, state};

/// A `state` column read as text, back into the enum (an unknown name is a broken schema).
pub(crate) fn job_state(text: String) -> Result<JobState> {
    JobState::try_from(text).map_err(|e| Error::Internal(anyhow::anyhow!("jobs.state: {e}")))
}

/// The stored names of these states, for a `text[]` bind.
pub(crate) fn names(states: &[JobState]) -> Vec<&'static str> {
    states.iter().map(|s| s.as_str()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::AttemptOutcome;

    /// The macro's text for a state given by its variant name.
    fn state_literal(s: JobState) -> &'static str {
        match s {
            JobState::Waiting => state!(waiting),
            JobState::Queued => state!(queued),
            JobState::Running => state!(running),
            JobState::Succeeded => state!(succeeded),
            JobState::Failed => state!(failed),
            JobState::Cancelled => state!(cancelled),
        }
    }

    fn outcome_literal(o: AttemptOutcome) -> &'static str {
        match o {
            AttemptOutcome::Running => outcome!(running),
            AttemptOutcome::Succeeded => outcome!(succeeded),
            AttemptOutcome::Failed => outcome!(failed),
            AttemptOutcome::LeaseExpired => outcome!(lease_expired),
            AttemptOutcome::HandedBack => outcome!(handed_back),
            AttemptOutcome::Cancelled => outcome!(cancelled),
        }
    }

    #[test]
    fn every_sql_literal_is_the_quoted_stored_name() {
        for &s in JobState::ALL {
            assert_eq!(state_literal(s), format!("'{}'", s.as_str()));
        }
        for &o in AttemptOutcome::ALL {
            assert_eq!(outcome_literal(o), format!("'{}'", o.as_str()));
        }
    }

    #[test]
    fn stored_names_decode_and_unknown_ones_are_internal() {
        for &s in JobState::ALL {
            assert_eq!(job_state(s.as_str().to_owned()).expect("known"), s);
        }
        assert!(matches!(
            job_state("Queued".into()),
            Err(Error::Internal(_))
        ));
        assert_eq!(
            names(&[JobState::Queued, JobState::Running]),
            ["queued", "running"]
        );
    }
}
