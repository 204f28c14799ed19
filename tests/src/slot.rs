//! The training slot: one training test at a time on a 2-core machine.
//!
//! Must not be taken after anything else is locked (see [`TrainingSlot`]).

use std::sync::{Mutex, MutexGuard};

static TRAINING: Mutex<()> = Mutex::new(());

/// The right to train: tests that train hold it for their whole run, so that only one trains at
/// a time on a 2-core machine. It is meant to be held across `.await`s: it is taken once, at the
/// start of a test, before anything else is locked, and each test runs on its own runtime, so
/// holding it while awaiting cannot deadlock; it only makes the other training tests wait.
pub struct TrainingSlot {
    _guard: MutexGuard<'static, ()>,
}

/// Waits for the [`TrainingSlot`] (a test that panicked while holding it does not poison it).
pub fn training_lock() -> TrainingSlot {
    TrainingSlot {
        _guard: TRAINING
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    }
}
