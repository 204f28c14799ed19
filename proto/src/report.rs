//! What a sweep's summary says, shared by the CLI's `trainq report` and the coordinator's web
//! UI, so that both show the same verdicts and curves from the same code: the verdict of a paired
//! difference, the verdict sentence, the arms' mean curves over seeds and the run whose sample
//! grid represents each arm. Pure functions of GetSweep / GetSweepSummary / GetMetrics answers.
//! (Tested in the CLI's `report` module, which re-exports them.)

use std::collections::BTreeMap;

use crate::v1;

/// One succeeded run's points (of the summarised metrics).
#[derive(Debug, Clone, PartialEq)]
pub struct RunSeries {
    pub arm: String,
    pub seed: u64,
    pub job_id: String,
    pub points: Vec<v1::MetricPoint>,
}

/// Whether smaller values of a metric are better: true for losses, negative ELBO, bits per
/// dimension, reconstruction and KL terms; false for accuracies.
pub fn lower_is_better(metric: &str) -> bool {
    !metric.ends_with("accuracy")
}

/// What a paired difference (arm minus baseline) says.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The 95% interval lies entirely on the better side of 0.
    Better {
        mean: f64,
        low: f64,
        high: f64,
        n: u32,
    },
    /// The 95% interval lies entirely on the worse side of 0.
    Worse {
        mean: f64,
        low: f64,
        high: f64,
        n: u32,
    },
    /// The interval includes 0.
    NoDifference {
        mean: f64,
        low: f64,
        high: f64,
        n: u32,
    },
    /// Fewer than two paired seeds: no interval.
    TooFewSeeds { n: u32 },
}

/// Judges a paired difference (arm minus baseline) of a metric.
pub fn judge(diff: Option<&v1::Stat>, lower_is_better: bool) -> Verdict {
    let Some(d) = diff else {
        return Verdict::TooFewSeeds { n: 0 };
    };
    let (Some(low), Some(high)) = (d.ci_low, d.ci_high) else {
        return Verdict::TooFewSeeds { n: d.n };
    };
    if d.n < 2 {
        return Verdict::TooFewSeeds { n: d.n };
    }
    let (mean, n) = (d.mean, d.n);
    let below = high < 0.0;
    let above = low > 0.0;
    match (below, above) {
        (true, _) if lower_is_better => Verdict::Better { mean, low, high, n },
        (true, _) => Verdict::Worse { mean, low, high, n },
        (_, true) if lower_is_better => Verdict::Worse { mean, low, high, n },
        (_, true) => Verdict::Better { mean, low, high, n },
        _ => Verdict::NoDifference { mean, low, high, n },
    }
}

/// A number in the report: four decimals (the statistics are exact in summary.json).
pub fn num(v: f64) -> String {
    if v.is_finite() && v.abs() >= 1e5 {
        format!("{v:.1}")
    } else {
        format!("{v:.4}")
    }
}

fn clause(v: &Verdict, baseline: &str) -> String {
    match v {
        Verdict::Better { mean, low, high, n } => format!(
            "transfer beat random init (`{baseline}`) beyond the noise (paired difference {}, 95% CI [{}, {}], n = {n})",
            num(*mean),
            num(*low),
            num(*high)
        ),
        Verdict::Worse { mean, low, high, n } => format!(
            "transfer was worse than random init (`{baseline}`) beyond the noise (paired difference {}, 95% CI [{}, {}], n = {n})",
            num(*mean),
            num(*low),
            num(*high)
        ),
        Verdict::NoDifference { low, high, .. } => format!(
            "no difference beyond the noise (CI [{}, {}] includes 0)",
            num(*low),
            num(*high)
        ),
        Verdict::TooFewSeeds { n } => format!(
            "too few seeds to tell (n = {n} paired seeds; at least 2 are needed for an interval)"
        ),
    }
}

/// The verdict sentence of one non-baseline arm on one metric: at the end of training, then
/// early in training (after the first epoch). Starts with "Verdict for `arm`".
pub fn verdict_sentence(arm: &str, baseline: &str, m: &v1::MetricSummary) -> String {
    let lower = lower_is_better(&m.name);
    let last = judge(m.last_diff.as_ref(), lower);
    let early = judge(m.early_diff.as_ref(), lower);
    format!(
        "Verdict for `{arm}` on {} ({} is better): at the end of training, {}; early in training (after epoch 1), {}.",
        m.name,
        if lower { "lower" } else { "higher" },
        clause(&last, baseline),
        clause(&early, baseline)
    )
}

/// One arm's curve of one metric: (epoch-end step, mean over seeds, sample sd when n >= 2).
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    pub arm: String,
    pub points: Vec<(u64, f64, Option<f64>)>,
}

/// Mean and sample standard deviation (n - 1); no sd below two values. The coordinator's own
/// statistics ([`stats::stat`]), so curves and tables cannot disagree.
pub fn mean_sd(values: &[f64]) -> (f64, Option<f64>) {
    let s = stats::stat(values);
    (s.mean, s.sd)
}

/// Every arm's mean curve of `metric` over its runs, arms in the order given, steps ascending.
/// Arms without points get no curve. A metric reported several times in an epoch keeps only its
/// epoch-end points: the last point of each epoch.
pub fn mean_curves(metric: &str, arms: &[String], runs: &[RunSeries]) -> Vec<Curve> {
    let mut curves = Vec::new();
    for arm in arms {
        let mut by_step: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
        for run in runs.iter().filter(|r| &r.arm == arm) {
            let mut epoch_end: BTreeMap<u32, (u64, f64)> = BTreeMap::new();
            for p in run.points.iter().filter(|p| p.name == metric) {
                let e = epoch_end.entry(p.epoch).or_insert((p.step, p.value));
                if p.step >= e.0 {
                    *e = (p.step, p.value);
                }
            }
            for (step, value) in epoch_end.into_values() {
                by_step.entry(step).or_default().push(value);
            }
        }
        if by_step.is_empty() {
            continue;
        }
        let points = by_step
            .into_iter()
            .map(|(step, values)| {
                let (mean, sd) = mean_sd(&values);
                (step, mean, sd)
            })
            .collect();
        curves.push(Curve {
            arm: arm.clone(),
            points,
        });
    }
    curves
}

/// The run whose sample grid represents each arm: its lowest seed that succeeded.
pub fn sample_runs(sweep: &v1::Sweep) -> Vec<(String, u64, String)> {
    let mut out = Vec::new();
    for arm in &sweep.arms {
        let best = sweep
            .runs
            .iter()
            .filter(|r| !r.source && &r.arm == arm && r.state() == v1::JobState::Succeeded)
            .min_by_key(|r| r.seed);
        if let Some(r) = best {
            out.push((arm.clone(), r.seed, r.job_id.clone()));
        }
    }
    out
}
