//! Randomness on libtorch's process-wide generator: every seeded draw goes through [`seeded`],
//! every unseeded one through [`unseeded`], under one process-wide lock; each epoch's data
//! order is drawn under [`epoch_seed`] and each step's noise under [`step_seed`]. So what a job
//! draws depends only on its seed and its step, never on the jobs that train beside it in other
//! slots of the same worker, nor on where it resumed.
//!
//! A leaf: must not import anything of `train`, and must not hold the lock while blocking.

use std::sync::Mutex;

/// Serialises every seed-then-draw section on libtorch's process-wide generator.
static TORCH_RNG: Mutex<()> = Mutex::new(());

/// Runs `f` right after `tch::manual_seed(seed)`, holding the process-wide RNG lock, so that what
/// `f` draws depends only on `seed`. `f` must not block for long (other jobs wait on the lock).
pub fn seeded<T>(seed: i64, f: impl FnOnce() -> T) -> T {
    let _guard = TORCH_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    tch::manual_seed(seed);
    f()
}

/// Runs `f`, which draws from libtorch's process-wide generator without seeding it, holding the
/// same lock as [`seeded`], so that it cannot draw in the middle of another job's (or test's)
/// seeded section and change what that section draws. The lock is uncontended in a worker, which
/// trains one job at a time.
pub fn unseeded<T>(f: impl FnOnce() -> T) -> T {
    let _guard = TORCH_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    f()
}

/// Mixes the job's seed with the epoch into the seed of that epoch's permutation (splitmix64).
pub fn epoch_seed(seed: u64, epoch: u32) -> i64 {
    mix(seed ^ (u64::from(epoch)).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Mixes the job's seed with a global step (1-based) into the seed of that step's noise; a
/// different stream from [`epoch_seed`]'s for the same numbers.
pub fn step_seed(seed: u64, step: u64) -> i64 {
    mix(seed.rotate_left(29) ^ 0xD1B5_4A32_D192_ED03 ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// splitmix64's finaliser, to a non-negative seed.
fn mix(mut z: u64) -> i64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_seeds_differ_per_epoch_and_seed() {
        assert_ne!(epoch_seed(1, 1), epoch_seed(1, 2));
        assert_ne!(epoch_seed(1, 1), epoch_seed(2, 1));
        assert!(epoch_seed(u64::MAX, 1000) >= 0);
    }

    #[test]
    fn step_seeds_differ_per_step_and_seed_and_from_epoch_seeds() {
        assert_ne!(step_seed(1, 1), step_seed(1, 2));
        assert_ne!(step_seed(1, 1), step_seed(2, 1));
        assert_ne!(step_seed(1, 1), epoch_seed(1, 1));
        assert!(step_seed(u64::MAX, u64::MAX) >= 0);
    }
}
