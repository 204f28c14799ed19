//! Statistics of one quantity over random seeds: n, mean, sample standard deviation (n - 1) and
//! the two-sided 95% Student-t interval of the mean ([`stat`]), and the Student-t quantile that
//! interval needs ([`t_975`], from the exact CDF for integer degrees of freedom).
//!
//! The coordinator's sweep summary and the CLI's report both compute through here, so their
//! numbers cannot disagree; [`t_975`] is pinned to the `student_t_975` table of migration 0005,
//! which the `sweep_summary` SQL view uses.
//!
//! Pure arithmetic: no dependencies, no I/O, and no wire types (the proto crate converts a
//! [`Stat`] into its `v1::Stat`).

/// The normal distribution's 97.5% quantile: the limit of [`t_975`] as df grows.
pub const Z_975: f64 = 1.959963984540054;

/// n, mean, sample sd (n - 1) and the 95% interval of the mean; sd and the interval only with
/// n >= 2. The fields of the wire `Stat`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Stat {
    pub n: u32,
    pub mean: f64,
    pub sd: Option<f64>,
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
}

/// P(|T| <= t) for Student's t with `df` (>= 1) degrees of freedom, by the finite series of
/// Abramowitz & Stegun 26.7.3 (exact for integer df).
fn t_two_sided_cdf(t: f64, df: u32) -> f64 {
    let theta = (t / f64::from(df).sqrt()).atan();
    let (s, c) = theta.sin_cos();
    let c2 = c * c;
    if df % 2 == 1 {
        // (2/pi)[theta + sin(theta)(cos + 2/3 cos^3 + 2*4/(3*5) cos^5 + ...)], up to cos^(df-2).
        let mut sum = 0.0;
        if df > 1 {
            let mut term = c;
            sum = term;
            let mut k = 3;
            while k < df {
                term *= c2 * f64::from(k - 1) / f64::from(k);
                sum += term;
                k += 2;
            }
        }
        2.0 / std::f64::consts::PI * (theta + s * sum)
    } else {
        // sin(theta)[1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...], up to cos^(df-2).
        let mut term = 1.0;
        let mut sum = 1.0;
        let mut k = 2;
        while k <= df - 2 {
            term *= c2 * f64::from(k - 1) / f64::from(k);
            sum += term;
            k += 2;
        }
        s * sum
    }
}

/// The 97.5% quantile of Student's t with `df` degrees of freedom (the factor of a two-sided
/// 95% interval): bisection on the exact CDF for df <= 100, the normal quantile beyond (as in
/// the `student_t_975` table of migration 0005).
pub fn t_975(df: u32) -> f64 {
    assert!(df >= 1, "Student's t needs at least one degree of freedom");
    if df > 100 {
        return Z_975;
    }
    let (mut lo, mut hi) = (0.0_f64, 100.0_f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if t_two_sided_cdf(mid, df) < 0.95 {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo <= f64::EPSILON * hi {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// Statistics of one quantity over seeds: n, mean, sample sd (n - 1) and the two-sided 95%
/// Student-t interval of the mean; sd and the interval only with n >= 2.
pub fn stat(values: &[f64]) -> Stat {
    let n = values.len();
    if n == 0 {
        return Stat::default();
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return Stat {
            n: 1,
            mean,
            ..Default::default()
        };
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let sd = var.sqrt();
    let half = t_975((n - 1) as u32) * sd / (n as f64).sqrt();
    Stat {
        n: n as u32,
        mean,
        sd: Some(sd),
        ci_low: Some(mean - half),
        ci_high: Some(mean + half),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn student_t_quantiles_match_tables() {
        for (df, t) in [
            (1, 12.7062),
            (2, 4.3027),
            (4, 2.7764),
            (29, 2.0452),
            (100, 1.9840),
        ] {
            assert!((t_975(df) - t).abs() < 5e-5, "df {df}: {}", t_975(df));
        }
        // The values migration 0005 stores in student_t_975 (mpmath, 50 digits).
        for (df, t) in [
            (1, 12.706204736174705),
            (2, 4.302652729749464),
            (3, 3.1824463052837095),
            (29, 2.0452296421327043),
            (100, 1.9839715185235522),
        ] {
            assert!((t_975(df) - t).abs() < 1e-12 * t, "df {df}: {}", t_975(df));
        }
        assert_eq!(t_975(101), Z_975);
    }

    #[test]
    fn stats_use_the_sample_sd_and_the_t_interval() {
        let s = stat(&[1.0, 2.0, 3.0]);
        assert_eq!(s.n, 3);
        assert_eq!(s.mean, 2.0);
        assert_eq!(s.sd, Some(1.0));
        let half = 4.302652729749464 / 3f64.sqrt();
        assert!((s.ci_low.expect("low") - (2.0 - half)).abs() < 1e-9);
        assert!((s.ci_high.expect("high") - (2.0 + half)).abs() < 1e-9);
        let one = stat(&[5.0]);
        assert_eq!((one.n, one.mean, one.sd, one.ci_low), (1, 5.0, None, None));
        assert_eq!(stat(&[]).n, 0);
    }
}
