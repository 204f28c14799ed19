//! Metric points: storing a worker's batch under its lease, the latest-value summary, pages of
//! series (keyset-paginated, optionally downsampled per series) and the WatchJob cursor.
//!
//! Must not store a point without holding the job row's lock under a current lease.

use std::collections::HashMap;

use proto::JobId;
use sqlx::{Acquire, PgConnection, PgExecutor, PgPool, Postgres};
use uuid::Uuid;

use super::attempts::{lock_if_current, refuse_lease};
use super::{point, uuids};
use crate::domain::{Lease, MetricPoint, MetricsPageToken, MetricsQuery};
use crate::error::Result;

/// What storing a batch of metric points did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredPoints {
    /// Points that were new.
    pub stored: u64,
    /// Points that repeat a stored (name, step), or an earlier point of the same batch, with a
    /// different value. They are not stored: a point's first value stays (a retried batch must
    /// not rewrite history), and the caller reports and logs how many were refused.
    pub conflicting: u64,
    /// The first conflicting point's (name, step), for the log.
    pub first_conflict: Option<(String, i64)>,
}

/// Stores a batch of metric points for the lease's attempt and says how many were new and how
/// many conflicted with a stored point.
///
/// One transaction: it locks the job row if (and only if) the lease is current, so the job
/// cannot be completed, cancelled or reaped half-way, and metric writes of one job are
/// serialised (which keeps `seq` in commit order per job, WatchJob's cursor relies on it).
/// Points already stored under the same (job, name, step) are skipped (counted as conflicting
/// when their value differs), and the latest-value summary moves only forward in step.
pub async fn record_metrics(
    pool: &PgPool,
    lease: &Lease,
    points: &[MetricPoint],
) -> Result<StoredPoints> {
    let mut tx = pool.begin().await?;
    if !lock_if_current(&mut tx, lease).await? {
        drop(tx);
        return Err(refuse_lease(pool, lease).await);
    }
    let stored = insert_points(&mut *tx, lease.job_id.as_uuid(), points).await?;
    tx.commit().await?;
    Ok(stored)
}

/// One multi-row insert (UNNEST over column arrays) of the points, then an upsert of the
/// latest-value summary from the points that were actually new, and a count of the points that
/// disagree with what is stored. The conflict check reads `metric_points` as it was before the
/// statement (a data-modifying CTE's rows are invisible to its siblings), plus the batch itself.
async fn insert_points(
    ex: impl PgExecutor<'_>,
    job_id: Uuid,
    points: &[MetricPoint],
) -> Result<StoredPoints> {
    if points.is_empty() {
        return Ok(StoredPoints::default());
    }
    let names: Vec<&str> = points.iter().map(|p| p.name.as_str()).collect();
    let steps: Vec<i64> = points.iter().map(|p| p.step).collect();
    let epochs: Vec<i32> = points.iter().map(|p| p.epoch).collect();
    let values: Vec<f64> = points.iter().map(|p| p.value).collect();
    let (stored, conflicting, conflict_name, conflict_step): (i64, i64, Option<String>, Option<i64>) =
        sqlx::query_as(
            "WITH input AS (
                 SELECT * FROM UNNEST($2::text[], $3::bigint[], $4::int[], $5::float8[])
                     WITH ORDINALITY AS p(name, step, epoch, value, ord)
             ), stored AS (
                 INSERT INTO metric_points (job_id, name, step, epoch, value)
                 SELECT $1, name, step, epoch, value FROM input ORDER BY ord
                 ON CONFLICT (job_id, name, step) DO NOTHING
                 RETURNING name, step, epoch, value
             ), newest AS (
                 SELECT DISTINCT ON (name) name, step, epoch, value FROM stored ORDER BY name, step DESC
             ), latest AS (
                 INSERT INTO job_metric_latest (job_id, name, step, epoch, value)
                 SELECT $1, name, step, epoch, value FROM newest
                 ON CONFLICT (job_id, name) DO UPDATE
                     SET step = EXCLUDED.step, epoch = EXCLUDED.epoch, value = EXCLUDED.value
                     WHERE job_metric_latest.step < EXCLUDED.step
             ), earlier AS (
                 -- Per point, the smallest and largest value of the batch's earlier points with
                 -- its key: one of them differs from it exactly when some earlier point does.
                 -- A window, not a self-join: a batch of 10,000 points stays linear.
                 SELECT name, step, ord, value,
                        min(value) OVER w AS low, max(value) OVER w AS high, count(*) OVER w AS n
                 FROM input
                 WINDOW w AS (PARTITION BY name, step ORDER BY ord
                              ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
             ), conflicting AS (
                 SELECT i.name, i.step, i.ord FROM earlier i
                 WHERE EXISTS (SELECT 1 FROM metric_points m
                               WHERE m.job_id = $1 AND m.name = i.name AND m.step = i.step
                                 AND m.value IS DISTINCT FROM i.value)
                    OR (i.n > 0 AND (i.low IS DISTINCT FROM i.value
                                     OR i.high IS DISTINCT FROM i.value))
             ), first_conflict AS (
                 SELECT name, step FROM conflicting ORDER BY ord LIMIT 1
             )
             SELECT (SELECT count(*) FROM stored), (SELECT count(*) FROM conflicting),
                    (SELECT name FROM first_conflict), (SELECT step FROM first_conflict)",
        )
        .bind(job_id)
        .bind(&names)
        .bind(&steps)
        .bind(&epochs)
        .bind(&values)
        .fetch_one(ex)
        .await?;
    Ok(StoredPoints {
        stored: stored.max(0) as u64,
        conflicting: conflicting.max(0) as u64,
        first_conflict: conflict_name.zip(conflict_step),
    })
}

/// The latest value of each of the job's metrics, by name. Reads the summary table only.
pub async fn latest_metrics(ex: impl PgExecutor<'_>, id: JobId) -> Result<Vec<MetricPoint>> {
    let rows: Vec<(String, i64, i32, f64)> = sqlx::query_as(
        "SELECT name, step, epoch, value FROM job_metric_latest WHERE job_id = $1 ORDER BY name",
    )
    .bind(id.as_uuid())
    .fetch_all(ex)
    .await?;
    Ok(rows.into_iter().map(point).collect())
}

/// [`latest_metrics`] for a page of jobs, in one query.
pub async fn latest_metrics_of(
    ex: impl PgExecutor<'_>,
    ids: &[JobId],
) -> Result<HashMap<JobId, Vec<MetricPoint>>> {
    let rows: Vec<(Uuid, String, i64, i32, f64)> = sqlx::query_as(
        "SELECT job_id, name, step, epoch, value FROM job_metric_latest WHERE job_id = ANY($1) ORDER BY job_id, name",
    )
    .bind(uuids(ids))
    .fetch_all(ex)
    .await?;
    let mut by_job = HashMap::<JobId, Vec<MetricPoint>>::new();
    for (id, n, s, e, v) in rows {
        by_job
            .entry(JobId::from(id))
            .or_default()
            .push(point((n, s, e, v)));
    }
    Ok(by_job)
}

/// One page of the job's points for `q`: at most `q.page_size` in (name, step) order strictly
/// after `q.after`, each series downsampled to at most `q.max_points` when that is set (see
/// [`series_selection`]), and the position the next page starts after (`None` when nothing
/// follows).
///
/// Keyset pagination on the primary key (job_id, name, step): every statement is an index range
/// scan of one series with a LIMIT, so a page costs the same at the start and the end of a
/// million points, and points stored meanwhile never shift a later page. Reads at most one page plus one point, or
/// one series' selection (at most `max_points`), at a time; never a whole series.
pub async fn metric_page<'c>(
    db: impl Acquire<'c, Database = Postgres>,
    q: &MetricsQuery,
) -> Result<(Vec<MetricPoint>, Option<MetricsPageToken>)> {
    let mut conn = db.acquire().await?;
    // One point more than the page: whether another page follows.
    let want = q.page_size as usize + 1;
    let (after_name, after_step) = match &q.after {
        Some(t) => (t.name.as_str(), t.step),
        // Names have at least one character and steps are never negative.
        None => ("", -1),
    };
    let mut points = Vec::with_capacity(want.min(4096));
    // Series by series, each read with its name fixed: (name, step) > (a, b) on its own would
    // start the scan at name a of the covering index (name, job_id, step) and filter its way to
    // step b, a cost that grows with the position in the series.
    for name in series_names(&mut *conn, q, after_name).await? {
        let after = if name == after_name { after_step } else { -1 };
        let left = want - points.len();
        let mut more = match q.max_points {
            None => series_after(&mut *conn, q.job_id, &name, after, left).await?,
            Some(k) => series_selection(&mut conn, q.job_id, &name, k, after, left).await?,
        };
        points.append(&mut more);
        if points.len() >= want {
            break;
        }
    }
    let next = if points.len() >= want {
        points.truncate(want - 1);
        points.last().map(|p| MetricsPageToken {
            name: p.name.clone(),
            step: p.step,
        })
    } else {
        None
    };
    Ok((points, next))
}

/// The names of the series a page goes over, from `after_name` on, in the order of the primary
/// key: the requested ones, or every metric the job has (from the latest-value summary, which
/// holds one row per series and is written in the same statement as the points).
async fn series_names(
    ex: impl PgExecutor<'_>,
    q: &MetricsQuery,
    after_name: &str,
) -> Result<Vec<String>> {
    let names: Vec<String> = if q.names.is_empty() {
        sqlx::query_scalar(
            "SELECT name FROM job_metric_latest WHERE job_id = $1 AND name >= $2 ORDER BY name",
        )
        .bind(q.job_id.as_uuid())
        .bind(after_name)
        .fetch_all(ex)
        .await?
    } else {
        // Sorted by Postgres, so the order is the index's (the same collation).
        sqlx::query_scalar(
            "SELECT DISTINCT n FROM unnest($1::text[]) AS n WHERE n >= $2 ORDER BY n",
        )
        .bind(&q.names)
        .bind(after_name)
        .fetch_all(ex)
        .await?
    };
    Ok(names)
}

/// Up to `limit` points of one series after `after_step`, in step order.
async fn series_after(
    ex: impl PgExecutor<'_>,
    id: JobId,
    name: &str,
    after_step: i64,
    limit: usize,
) -> Result<Vec<MetricPoint>> {
    let rows: Vec<(String, i64, i32, f64)> = sqlx::query_as(
        "SELECT name, step, epoch, value FROM metric_points
         WHERE job_id = $1 AND name = $2 AND step > $3
         ORDER BY step LIMIT $4",
    )
    .bind(id.as_uuid())
    .bind(name)
    .bind(after_step)
    .bind(limit as i64)
    .fetch_all(ex)
    .await?;
    Ok(rows.into_iter().map(point).collect())
}

/// Up to `limit` points after `after_step` of one series downsampled to at most `max_points`,
/// in step order: the whole series when it has at most `max_points` points; otherwise its
/// first and last points and, for `max_points - 2` evenly spaced step targets between them, the
/// first point at or after each target (once, when two targets meet the same point).
///
/// Each target is one index probe (`ORDER BY step LIMIT 1`), so the selection costs
/// `max_points` probes however long the series is, and the coordinator holds at most
/// `max_points` of its points. Recomputed on every page: pages of a growing series select from
/// the series as it is at each call.
async fn series_selection(
    conn: &mut PgConnection,
    id: JobId,
    name: &str,
    max_points: u32,
    after_step: i64,
    limit: usize,
) -> Result<Vec<MetricPoint>> {
    let (n, first, last): (i64, Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM (
                     SELECT 1 FROM metric_points WHERE job_id = $1 AND name = $2 LIMIT $3
                 ) AS c),
                (SELECT min(step) FROM metric_points WHERE job_id = $1 AND name = $2),
                (SELECT max(step) FROM metric_points WHERE job_id = $1 AND name = $2)",
    )
    .bind(id.as_uuid())
    .bind(name)
    .bind(i64::from(max_points) + 1)
    .fetch_one(&mut *conn)
    .await?;
    let (Some(first), Some(last)) = (first, last) else {
        return Ok(Vec::new());
    };
    if n <= i64::from(max_points) {
        return series_after(&mut *conn, id, name, after_step, limit).await;
    }
    // Target i of 0..k is first + floor((last - first) * i / (k - 1)) (exact in numeric): target
    // 0 is the first point, target k - 1 the last. A later page needs only the targets from the
    // last one at or before `after_step` on: an earlier target meets a point at or before it, or
    // the same point as that one.
    let rows: Vec<(i64, i32, f64)> = sqlx::query_as(
        "SELECT DISTINCT ON (p.step) p.step, p.epoch, p.value
         FROM generate_series($8, $3 - 1) AS i
         CROSS JOIN LATERAL (
             SELECT step, epoch, value FROM metric_points
             WHERE job_id = $1 AND name = $2
               AND step >= $4 + div(($5 - $4)::numeric * i, $3 - 1)::bigint
             ORDER BY step LIMIT 1
         ) AS p
         WHERE p.step > $6
         ORDER BY p.step
         LIMIT $7",
    )
    .bind(id.as_uuid())
    .bind(name)
    .bind(max_points as i32)
    .bind(first)
    .bind(last)
    .bind(after_step)
    .bind(limit as i64)
    .bind(first_target_after(first, last, max_points, after_step))
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(step, epoch, value)| point((name.to_owned(), step, epoch, value)))
        .collect())
}

/// The index of the last target (see [`series_selection`]) at or before `after_step`, or 0:
/// the largest i with first + floor((last - first) * i / (k - 1)) <= after_step. Needs
/// last > first and k >= 2.
fn first_target_after(first: i64, last: i64, k: u32, after_step: i64) -> i32 {
    if after_step < first {
        return 0;
    }
    let (span, gaps) = (i128::from(last - first), i128::from(k) - 1);
    let reach = i128::from(after_step - first) + 1;
    // floor(span * i / gaps) <= after - first  <=>  i < reach * gaps / span.
    let i = (reach * gaps + span - 1) / span - 1;
    i.clamp(0, gaps) as i32
}

/// Up to `limit` of the job's points stored after cursor `after_seq`, in storage order, each with
/// its `seq` (the next cursor).
pub async fn metrics_after(
    ex: impl PgExecutor<'_>,
    id: JobId,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<(i64, MetricPoint)>> {
    let rows: Vec<(i64, String, i64, i32, f64)> = sqlx::query_as(
        "SELECT seq, name, step, epoch, value FROM metric_points
         WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    )
    .bind(id.as_uuid())
    .bind(after_seq)
    .bind(limit)
    .fetch_all(ex)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(seq, n, s, e, v)| (seq, point((n, s, e, v))))
        .collect())
}

/// The job's highest metric `seq` so far (0 if none): where a new watcher's cursor starts.
pub async fn last_metric_seq(ex: impl PgExecutor<'_>, id: JobId) -> Result<i64> {
    let seq: Option<i64> =
        sqlx::query_scalar("SELECT max(seq) FROM metric_points WHERE job_id = $1")
            .bind(id.as_uuid())
            .fetch_one(ex)
            .await?;
    Ok(seq.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Target i of a selection, as the query computes it.
    fn target(first: i64, last: i64, k: u32, i: i32) -> i128 {
        i128::from(first) + i128::from(last - first) * i128::from(i) / (i128::from(k) - 1)
    }

    #[test]
    fn a_later_page_starts_at_the_last_target_at_or_before_its_cursor() {
        let cases = [
            (1, 1000, 10),
            (0, 2, 2),
            (5, 9, 3),
            (1, 1_000_000, 1000),
            (7, 7 + 9_999, 10_000),
            (0, i64::MAX, 10_000),
        ];
        for (first, last, k) in cases {
            let span = last - first;
            let afters = [
                first - 1,
                first,
                first + 1,
                first + span / 3,
                first + span / 2 + 1,
                last - 1,
                last,
            ];
            for after in afters {
                let got = first_target_after(first, last, k, after);
                let want = (0..k as i32)
                    .rev()
                    .find(|&i| target(first, last, k, i) <= i128::from(after))
                    .unwrap_or(0);
                assert_eq!(got, want, "first {first} last {last} k {k} after {after}");
            }
        }
    }
}
