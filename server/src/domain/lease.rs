//! A worker's lease and what it writes under it: metric points, completions, metric reports.
//!
//! Must not do I/O, and must not check a metric name other than through
//! [`proto::MetricName::parse`].

use proto::{v1, JobId, MetricName};

use super::{parse_job_id, parse_worker_id, MAX_POINTS_PER_CALL};
use crate::error::{Error, Result};

/// A worker's claim on one attempt of a job. Every worker write carries one; the store refuses
/// writes whose lease is not the job's current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job_id: JobId,
    /// 1-based claim number (`jobs.attempt`).
    pub attempt: i32,
    pub worker_id: String,
}

impl TryFrom<Option<v1::JobLease>> for Lease {
    type Error = Error;

    fn try_from(lease: Option<v1::JobLease>) -> Result<Self> {
        let lease = lease.ok_or_else(|| Error::invalid("lease", "is required"))?;
        let job_id = parse_job_id("lease.job_id", &lease.job_id)?;
        let attempt = i32::try_from(lease.attempt)
            .ok()
            .filter(|a| *a >= 1)
            .ok_or_else(|| {
                Error::invalid(
                    "lease.attempt",
                    format!("must be a claimed attempt (>= 1), got {}", lease.attempt),
                )
            })?;
        let worker_id = parse_worker_id("lease.worker_id", &lease.worker_id)?;
        Ok(Lease {
            job_id,
            attempt,
            worker_id,
        })
    }
}

/// A metric point in the store's integer widths.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricPoint {
    pub name: String,
    pub step: i64,
    pub epoch: i32,
    /// Stored even when not finite: a NaN loss is information.
    pub value: f64,
}

impl From<MetricPoint> for v1::MetricPoint {
    fn from(p: MetricPoint) -> Self {
        // Both widths were checked on the way in, and the columns have CHECK (>= 0).
        v1::MetricPoint {
            name: p.name,
            step: p.step.max(0) as u64,
            epoch: p.epoch.max(0) as u32,
            value: p.value,
        }
    }
}

/// Parses a batch of points; field paths are `points[i].name` and so on.
pub fn parse_points(points: Vec<v1::MetricPoint>) -> Result<Vec<MetricPoint>> {
    if points.len() > MAX_POINTS_PER_CALL {
        return Err(Error::invalid(
            "points",
            format!(
                "at most {MAX_POINTS_PER_CALL} per call, got {}",
                points.len()
            ),
        ));
    }
    points
        .into_iter()
        .enumerate()
        .map(|(i, p)| parse_point(i, p))
        .collect()
}

fn parse_point(i: usize, p: v1::MetricPoint) -> Result<MetricPoint> {
    let name = MetricName::parse(&format!("points[{i}].name"), &p.name)?;
    let step = i64::try_from(p.step)
        .map_err(|_| Error::invalid(format!("points[{i}].step"), "is too large"))?;
    let epoch = i32::try_from(p.epoch)
        .map_err(|_| Error::invalid(format!("points[{i}].epoch"), "is too large"))?;
    Ok(MetricPoint {
        name: name.into_string(),
        step,
        epoch,
        value: p.value,
    })
}

/// A worker's report that its attempt succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub lease: Lease,
    /// Optimiser steps the job trained in all.
    pub final_step: i64,
}

impl TryFrom<v1::CompleteJobRequest> for Completion {
    type Error = Error;

    fn try_from(req: v1::CompleteJobRequest) -> Result<Self> {
        Ok(Completion {
            lease: Lease::try_from(req.lease)?,
            final_step: i64::try_from(req.final_step)
                .map_err(|_| Error::invalid("final_step", "is too large"))?,
        })
    }
}

/// A worker's batch of metric points for its current attempt.
#[derive(Debug, Clone)]
pub struct MetricsReport {
    pub lease: Lease,
    pub points: Vec<MetricPoint>,
}

impl TryFrom<v1::ReportMetricsRequest> for MetricsReport {
    type Error = Error;

    fn try_from(req: v1::ReportMetricsRequest) -> Result<Self> {
        Ok(MetricsReport {
            lease: Lease::try_from(req.lease)?,
            points: parse_points(req.points)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::invalid_field;
    use uuid::Uuid;

    #[test]
    fn a_lease_names_the_field_that_is_wrong() {
        let field = |l: Option<v1::JobLease>| invalid_field(Lease::try_from(l));
        let good = v1::JobLease {
            job_id: Uuid::nil().to_string(),
            attempt: 1,
            worker_id: "w".into(),
        };
        assert!(Lease::try_from(Some(good.clone())).is_ok());
        assert_eq!(field(None), "lease");
        assert_eq!(
            field(Some(v1::JobLease {
                job_id: "nope".into(),
                ..good.clone()
            })),
            "lease.job_id"
        );
        assert_eq!(
            field(Some(v1::JobLease {
                attempt: 0,
                ..good.clone()
            })),
            "lease.attempt"
        );
        assert_eq!(
            field(Some(v1::JobLease {
                worker_id: String::new(),
                ..good
            })),
            "lease.worker_id"
        );
    }

    #[test]
    fn a_lease_with_a_braced_or_urn_job_id_is_invalid() {
        let id = Uuid::now_v7();
        for text in [
            format!("{{{id}}}"),
            format!("urn:uuid:{id}"),
            id.simple().to_string(),
        ] {
            let lease = v1::JobLease {
                job_id: text.clone(),
                attempt: 1,
                worker_id: "w".into(),
            };
            assert_eq!(
                invalid_field(Lease::try_from(Some(lease))),
                "lease.job_id",
                "{text}"
            );
        }
    }

    #[test]
    fn metric_names_must_be_present_and_short_but_values_may_be_nan() {
        let p = |name: &str, value: f64| v1::MetricPoint {
            name: name.into(),
            step: 1,
            epoch: 1,
            value,
        };
        assert!(parse_points(vec![p("train/loss", f64::NAN)]).is_ok());
        assert!(matches!(parse_points(vec![p("a", 1.0), p("", 1.0)]),
            Err(Error::InvalidArgument { field, .. }) if field == "points[1].name"));
        assert!(parse_points(vec![p(&"x".repeat(129), 1.0)]).is_err());
        let too_many = vec![p("a", 1.0); MAX_POINTS_PER_CALL + 1];
        assert!(
            matches!(parse_points(too_many), Err(Error::InvalidArgument { field, .. }) if field == "points")
        );
    }

    #[test]
    fn a_metric_name_with_a_nul_is_invalid_naming_its_point() {
        let p = |name: &str| v1::MetricPoint {
            name: name.into(),
            step: 1,
            epoch: 1,
            value: 1.0,
        };
        assert_eq!(
            invalid_field(parse_points(vec![p("ok"), p("a\0b")])),
            "points[1].name"
        );
        assert_eq!(
            invalid_field(parse_points(vec![p("a\nb")])),
            "points[0].name"
        );
    }

    #[test]
    fn a_completion_carries_its_final_step_within_the_stores_range() {
        let lease = Some(v1::JobLease {
            job_id: Uuid::nil().to_string(),
            attempt: 1,
            worker_id: "w".into(),
        });
        let done = Completion::try_from(v1::CompleteJobRequest {
            lease: lease.clone(),
            final_step: 1234,
        })
        .expect("valid");
        assert_eq!(done.final_step, 1234);
        assert_eq!(
            invalid_field(Completion::try_from(v1::CompleteJobRequest {
                lease,
                final_step: u64::MAX,
            })),
            "final_step"
        );
    }
}
