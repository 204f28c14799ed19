//! Job, attempt and sweep states as Rust enums: the one definition of their names and of which
//! states are final.
//!
//! The coordinator stores a state as its lowercase name ([`JobState::as_str`]), the same text
//! people see in SQL and in the CLI; the wire carries the generated `v1` enums. Every conversion
//! between the three forms is here, and so is the one [`JobState::is_terminal`].
//!
//! Must not know about Postgres, Redis or libtorch (the store maps these names to SQL).

use std::fmt;

use crate::v1;

macro_rules! named_enum {
    (
        $(#[$doc:meta])*
        $name:ident => $wire:ident {
            $($(#[$vdoc:meta])* $variant:ident = $text:literal,)+
        }
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every value, in the order of the .proto.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The lowercase name: the form stored in Postgres and shown to people.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// The inverse of [`Self::as_str`].
            pub fn from_name(name: &str) -> Option<Self> {
                match name {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl From<$name> for v1::$wire {
            fn from(value: $name) -> Self {
                match value {
                    $($name::$variant => v1::$wire::$variant,)+
                }
            }
        }

        /// `UNSPECIFIED` has no domain form.
        impl TryFrom<v1::$wire> for $name {
            type Error = UnknownState;

            fn try_from(value: v1::$wire) -> Result<Self, UnknownState> {
                match value {
                    $(v1::$wire::$variant => Ok($name::$variant),)+
                    #[allow(unreachable_patterns)]
                    _ => Err(UnknownState(format!("{value:?}"))),
                }
            }
        }

        /// The stored name (a text column) back into the enum.
        impl TryFrom<String> for $name {
            type Error = UnknownState;

            fn try_from(name: String) -> Result<Self, UnknownState> {
                Self::from_name(&name).ok_or(UnknownState(name))
            }
        }

        impl TryFrom<&str> for $name {
            type Error = UnknownState;

            fn try_from(name: &str) -> Result<Self, UnknownState> {
                Self::from_name(name).ok_or_else(|| UnknownState(name.to_owned()))
            }
        }
    };
}

/// A state name (or wire value) that is not one of the enum's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown state {0:?}")]
pub struct UnknownState(pub String);

named_enum! {
    /// Where a job is in its life (`jobs.state`).
    JobState => JobState {
        /// Waiting for the jobs it depends on.
        Waiting = "waiting",
        /// Ready and dispatched; no worker holds it.
        Queued = "queued",
        /// A worker holds a lease on it.
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

impl JobState {
    /// The states a job never leaves.
    pub const TERMINAL: [JobState; 3] =
        [JobState::Succeeded, JobState::Failed, JobState::Cancelled];

    /// True for `succeeded`, `failed` and `cancelled`: the job will not change again.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl v1::JobState {
    /// True for the wire values of [`JobState::TERMINAL`] (never for `UNSPECIFIED`).
    pub fn is_terminal(self) -> bool {
        JobState::try_from(self).is_ok_and(JobState::is_terminal)
    }
}

named_enum! {
    /// How one attempt (one claim) of a job ended (`job_attempts.outcome`).
    AttemptOutcome => AttemptOutcome {
        /// The attempt is still running.
        Running = "running",
        Succeeded = "succeeded",
        /// The worker reported a failure.
        Failed = "failed",
        /// The worker stopped heartbeating; the coordinator took the job back.
        LeaseExpired = "lease_expired",
        /// The worker handed the job back (it was shutting down); not a failure.
        HandedBack = "handed_back",
        /// The job was cancelled while this attempt ran.
        Cancelled = "cancelled",
    }
}

impl AttemptOutcome {
    /// True once the attempt has ended (every outcome but `running`).
    pub const fn is_terminal(self) -> bool {
        !matches!(self, AttemptOutcome::Running)
    }

    /// True for the outcomes counted against `max_attempts`.
    pub const fn counts_as_failure(self) -> bool {
        matches!(self, AttemptOutcome::Failed | AttemptOutcome::LeaseExpired)
    }
}

named_enum! {
    /// A sweep's state, derived from its jobs at every read.
    SweepState => SweepState {
        /// Some job has not ended.
        Running = "running",
        /// Every job succeeded.
        Succeeded = "succeeded",
        /// Every job ended and some failed or were cancelled.
        Partial = "partial",
        /// CancelSweep was called.
        Cancelled = "cancelled",
    }
}

impl SweepState {
    /// True once no job of the sweep will change again.
    pub const fn is_terminal(self) -> bool {
        !matches!(self, SweepState::Running)
    }

    /// The state of a sweep from whether it was cancelled and its jobs' states.
    pub fn derive(cancelled: bool, jobs: impl IntoIterator<Item = JobState>) -> SweepState {
        if cancelled {
            return SweepState::Cancelled;
        }
        let mut all_succeeded = true;
        for state in jobs {
            if !state.is_terminal() {
                return SweepState::Running;
            }
            all_succeeded &= state == JobState::Succeeded;
        }
        if all_succeeded {
            SweepState::Succeeded
        } else {
            SweepState::Partial
        }
    }
}

impl v1::SweepState {
    /// True for the wire values of a sweep that will not change again.
    pub fn is_terminal(self) -> bool {
        SweepState::try_from(self).is_ok_and(SweepState::is_terminal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_round_trips_through_its_name_and_the_wire() {
        for &s in JobState::ALL {
            assert_eq!(JobState::from_name(s.as_str()), Some(s));
            assert_eq!(JobState::try_from(v1::JobState::from(s)), Ok(s));
            assert_eq!(v1::JobState::from(s).is_terminal(), s.is_terminal());
        }
        for &o in AttemptOutcome::ALL {
            assert_eq!(AttemptOutcome::try_from(o.as_str()), Ok(o));
            assert_eq!(AttemptOutcome::try_from(v1::AttemptOutcome::from(o)), Ok(o));
        }
        for &s in SweepState::ALL {
            assert_eq!(SweepState::try_from(s.to_string()), Ok(s));
            assert_eq!(SweepState::try_from(v1::SweepState::from(s)), Ok(s));
        }
    }

    #[test]
    fn names_are_the_stored_ones() {
        let names: Vec<_> = JobState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "waiting",
                "queued",
                "running",
                "succeeded",
                "failed",
                "cancelled"
            ]
        );
        assert_eq!(AttemptOutcome::LeaseExpired.as_str(), "lease_expired");
        assert_eq!(AttemptOutcome::HandedBack.as_str(), "handed_back");
    }

    #[test]
    fn only_succeeded_failed_and_cancelled_are_terminal() {
        let terminal: Vec<_> = JobState::ALL
            .iter()
            .copied()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(terminal, JobState::TERMINAL);
        assert!(!v1::JobState::Unspecified.is_terminal());
        assert!(JobState::try_from(v1::JobState::Unspecified).is_err());
        assert!(JobState::from_name("Queued").is_none());
    }

    #[test]
    fn a_sweep_state_follows_its_jobs() {
        use JobState::*;
        assert_eq!(
            SweepState::derive(false, [Succeeded, Succeeded]),
            SweepState::Succeeded
        );
        assert_eq!(
            SweepState::derive(false, [Succeeded, Running]),
            SweepState::Running
        );
        assert_eq!(
            SweepState::derive(false, [Succeeded, Failed]),
            SweepState::Partial
        );
        assert_eq!(
            SweepState::derive(true, [Succeeded, Running]),
            SweepState::Cancelled
        );
        assert!(SweepState::Partial.is_terminal());
        assert!(!SweepState::Running.is_terminal());
    }

    #[test]
    fn failures_count_only_when_the_worker_failed_or_went_silent() {
        let counted: Vec<_> = AttemptOutcome::ALL
            .iter()
            .copied()
            .filter(|o| o.counts_as_failure())
            .collect();
        assert_eq!(
            counted,
            [AttemptOutcome::Failed, AttemptOutcome::LeaseExpired]
        );
    }
}
