//! How many of the worker's slots may take a new job now. A job that ran out of memory while
//! others trained beside it is a sign the device is over-committed: each such failure takes one
//! slot out of service (the highest-numbered still serving) for [`OOM_PAUSE`], down to one slot.
//! The job itself fails retryably, so the coordinator queues it again. Pure bookkeeping; the
//! serve loop asks [`Concurrency::allows`] before each pop.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a slot taken out of service after an out-of-memory failure stays out.
pub const OOM_PAUSE: Duration = Duration::from_secs(60);

pub struct Concurrency {
    slots: u32,
    /// When each slot taken out of service comes back, soonest last (a stack).
    paused_until: Mutex<Vec<Instant>>,
}

impl Concurrency {
    pub fn new(slots: u32) -> Self {
        Self {
            slots: slots.max(1),
            paused_until: Mutex::new(Vec::new()),
        }
    }

    fn live(&self, now: Instant) -> std::sync::MutexGuard<'_, Vec<Instant>> {
        let mut paused = self
            .paused_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        paused.retain(|until| *until > now);
        paused
    }

    /// Slots in service at `now`.
    pub fn in_service(&self, now: Instant) -> u32 {
        self.slots - self.live(now).len() as u32
    }

    /// Whether slot `slot` (0-based) may take a job at `now`.
    pub fn allows(&self, slot: u32, now: Instant) -> bool {
        slot < self.in_service(now)
    }

    /// A job ran out of memory at `now` while `busy` slots (itself included) were training:
    /// with others beside it, one more slot goes out of service for [`OOM_PAUSE`] (never the
    /// last one). Returns the slots in service afterwards.
    pub fn out_of_memory(&self, busy: u32, now: Instant) -> u32 {
        let mut paused = self.live(now);
        if busy > 1 && (paused.len() as u32) < self.slots - 1 {
            paused.push(now + OOM_PAUSE);
        }
        self.slots - paused.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_beside_others_lowers_concurrency_for_a_while_never_below_one() {
        let c = Concurrency::new(3);
        let t0 = Instant::now();
        assert!((0..3).all(|s| c.allows(s, t0)));
        assert_eq!(
            c.out_of_memory(1, t0),
            3,
            "alone: the job was simply too big"
        );
        assert_eq!(c.out_of_memory(3, t0), 2);
        assert!(c.allows(1, t0) && !c.allows(2, t0));
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(c.out_of_memory(2, t1), 1);
        assert_eq!(c.out_of_memory(2, t1), 1, "never below one slot");
        assert!(c.allows(0, t1) && !c.allows(1, t1));
        assert_eq!(c.in_service(t0 + OOM_PAUSE + Duration::from_secs(1)), 2);
        assert_eq!(c.in_service(t1 + OOM_PAUSE + Duration::from_secs(1)), 3);
    }
}
