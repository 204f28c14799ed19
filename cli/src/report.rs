//! `trainq report`: turns a sweep's summary (GetSweepSummary) and its runs' metric series into a
//! Markdown report with learning curves (mean over seeds with a band of plus or minus one
//! standard deviation) and one verdict sentence per non-baseline arm.
//!
//! Pure functions of their inputs: fetching (GetSweep, GetSweepSummary, GetMetrics,
//! DownloadArtifact) and writing files is the caller's job, so everything here is tested on
//! hand-made inputs. The statistics themselves come from the coordinator; only the curves'
//! per-step means and standard deviations are computed here (with the `stats` crate, as the
//! coordinator does). The report.md text is [`crate::markdown`]'s; this module must not use it.

use crate::plot;

pub use proto::report::*;

/// The chart of one metric's curves: mean lines with a band of plus or minus one sd.
pub fn curves_chart(sweep_name: &str, metric: &str, curves: &[Curve]) -> plot::Chart {
    let series = curves
        .iter()
        .map(|c| plot::Series {
            label: c.arm.clone(),
            points: c.points.iter().map(|&(s, m, _)| (s as f64, m)).collect(),
            band: if c.points.iter().all(|p| p.2.is_some()) {
                c.points
                    .iter()
                    .map(|&(s, m, sd)| {
                        let sd = sd.unwrap_or(0.0);
                        (s as f64, m - sd, m + sd)
                    })
                    .collect()
            } else {
                Vec::new()
            },
        })
        .collect();
    plot::Chart {
        title: format!("{sweep_name}: {metric} (mean over seeds ± 1 sd)"),
        x_desc: "optimiser step (end of each epoch)".into(),
        y_desc: metric.into(),
        series,
    }
}

/// A file-name-safe form of a metric or arm name (`test/neg_elbo_nats` -> `test_neg_elbo_nats`).
pub fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+' | '=') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Paths (relative to the report folder) of a metric's figures.
pub fn figure_paths(metric: &str) -> (String, String) {
    let stem = file_stem(metric);
    (format!("curves/{stem}.png"), format!("curves/{stem}.svg"))
}

/// The sample grid shown for an arm: the run of its lowest succeeded seed.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleGrid {
    pub arm: String,
    pub seed: u64,
    pub job_id: String,
    /// Relative to the report folder; `None` when the run stored no sample grid.
    pub path: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{point, stat, sweep_and_summary};
    use proto::v1;

    #[test]
    fn a_difference_counts_only_when_its_interval_excludes_zero_on_the_better_side() {
        let d = stat(3, -2.0, Some(0.5), Some((-3.2, -0.8)));
        assert!(matches!(judge(Some(&d), true), Verdict::Better { .. }));
        assert!(matches!(judge(Some(&d), false), Verdict::Worse { .. }));
        let up = stat(3, 2.0, Some(0.5), Some((0.8, 3.2)));
        assert!(matches!(judge(Some(&up), true), Verdict::Worse { .. }));
        assert!(matches!(judge(Some(&up), false), Verdict::Better { .. }));
        let straddle = stat(3, -0.3, Some(1.0), Some((-2.8, 2.2)));
        assert!(matches!(
            judge(Some(&straddle), true),
            Verdict::NoDifference { .. }
        ));
        let one = stat(1, -5.0, None, None);
        assert_eq!(judge(Some(&one), true), Verdict::TooFewSeeds { n: 1 });
        assert_eq!(judge(None, true), Verdict::TooFewSeeds { n: 0 });
    }

    #[test]
    fn accuracy_is_the_only_metric_where_higher_is_better() {
        assert!(lower_is_better("test/neg_elbo_nats"));
        assert!(lower_is_better("test/bits_per_dim"));
        assert!(lower_is_better("test/recon"));
        assert!(!lower_is_better("test/accuracy"));
    }

    #[test]
    fn the_verdict_sentence_covers_the_end_and_the_start_of_training() {
        let m = v1::MetricSummary {
            name: "test/neg_elbo_nats".into(),
            early_diff: Some(stat(3, -0.5, Some(1.0), Some((-2.98, 1.98)))),
            last_diff: Some(stat(3, -4.0, Some(0.4), Some((-5.0, -3.0)))),
            ..Default::default()
        };
        let s = verdict_sentence("replicate", "random", &m);
        assert!(s.starts_with("Verdict for `replicate`"), "{s}");
        assert!(
            s.contains("at the end of training, transfer beat random init (`random`) beyond the noise (paired difference -4.0000, 95% CI [-5.0000, -3.0000], n = 3)"),
            "{s}"
        );
        assert!(
            s.contains("early in training (after epoch 1), no difference beyond the noise (CI [-2.9800, 1.9800] includes 0)"),
            "{s}"
        );
        let few = v1::MetricSummary {
            name: "test/neg_elbo_nats".into(),
            early_diff: Some(stat(1, -0.5, None, None)),
            last_diff: Some(stat(1, -0.5, None, None)),
            ..Default::default()
        };
        assert!(verdict_sentence("a", "random", &few).contains("too few seeds"));
    }

    #[test]
    fn curves_average_the_seeds_at_each_epoch_end_with_a_sample_sd() {
        let run = |arm: &str, seed, values: [f64; 2]| RunSeries {
            arm: arm.into(),
            seed,
            job_id: format!("{arm}-{seed}"),
            points: vec![
                // A mid-epoch point that must be ignored, and another metric.
                point("test/neg_elbo_nats", 5, 1, 999.0),
                point("test/neg_elbo_nats", 10, 1, values[0]),
                point("test/neg_elbo_nats", 20, 2, values[1]),
                point("test/kl", 20, 2, 1.0),
            ],
        };
        let runs = vec![
            run("random", 1, [10.0, 6.0]),
            run("random", 2, [12.0, 8.0]),
            run("transfer", 1, [9.0, 5.0]),
        ];
        let arms = vec!["random".to_string(), "transfer".into(), "empty".into()];
        let curves = mean_curves("test/neg_elbo_nats", &arms, &runs);
        assert_eq!(curves.len(), 2, "an arm without points has no curve");
        let sd = 2f64.sqrt();
        assert_eq!(
            curves[0].points,
            vec![(10, 11.0, Some(sd)), (20, 7.0, Some(sd))]
        );
        assert_eq!(curves[1].points, vec![(10, 9.0, None), (20, 5.0, None)]);
        let chart = curves_chart("study", "test/neg_elbo_nats", &curves);
        assert_eq!(
            chart.series[0].band,
            vec![(10.0, 11.0 - sd, 11.0 + sd), (20.0, 7.0 - sd, 7.0 + sd)]
        );
        assert!(chart.series[1].band.is_empty(), "no band with one seed");
        let dir = tempfile::tempdir().expect("dir");
        for ext in ["png", "svg"] {
            let path = dir.path().join(format!("c.{ext}"));
            plot::draw(&chart, &path).expect("draw");
            assert!(std::fs::metadata(&path).expect("written").len() > 100);
        }
    }

    #[test]
    fn each_arm_is_shown_by_its_lowest_succeeded_seed() {
        let (sweep, _) = sweep_and_summary();
        assert_eq!(
            sample_runs(&sweep),
            vec![
                ("random".into(), 1, "job-random-1".into()),
                ("replicate".into(), 2, "job-replicate-2".into())
            ]
        );
    }

    #[test]
    fn names_become_safe_file_names() {
        assert_eq!(file_stem("test/neg_elbo_nats"), "test_neg_elbo_nats");
        assert_eq!(file_stem("a,b=c d"), "a_b=c_d");
        assert_eq!(
            figure_paths("test/kl"),
            ("curves/test_kl.png".into(), "curves/test_kl.svg".into())
        );
    }
}
