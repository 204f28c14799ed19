//! The wire form of the seed statistics: [`stats::Stat`] (computed by the `stats` crate, which
//! the coordinator's sweep summary and the CLI's report share) as `v1::Stat`.
//!
//! A field-by-field conversion only: the statistics themselves must not be computed here.

use crate::v1;

impl From<stats::Stat> for v1::Stat {
    fn from(s: stats::Stat) -> Self {
        v1::Stat {
            n: s.n,
            mean: s.mean,
            sd: s.sd,
            ci_low: s.ci_low,
            ci_high: s.ci_high,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_keeps_every_field_on_the_wire() {
        let wire = v1::Stat::from(stats::stat(&[1.0, 2.0, 3.0]));
        assert_eq!((wire.n, wire.mean, wire.sd), (3, 2.0, Some(1.0)));
        let half = stats::t_975(2) / 3f64.sqrt();
        assert_eq!(wire.ci_low, Some(2.0 - half));
        assert_eq!(wire.ci_high, Some(2.0 + half));
        assert_eq!(v1::Stat::from(stats::stat(&[])), v1::Stat::default());
    }
}
