//! The fleet: each worker's latest report of itself (`workers`), and the reads behind
//! ListWorkers, GetWorker and a queued job's waiting reason.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use super::millis;
use super::state::state;
use crate::domain::worker::{Device, WorkerReport};
use crate::error::Result;

/// One worker as stored, with what is derived at read time.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRow {
    pub id: String,
    pub host: String,
    pub version: String,
    pub devices: Vec<Device>,
    pub slots_total: i32,
    pub slots_busy: i32,
    pub queues: Vec<String>,
    pub started_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    /// Reported within the lease timeout.
    pub live: bool,
    /// Its running jobs, by id.
    pub running: Vec<uuid::Uuid>,
}

fn devices_json(devices: &[Device]) -> serde_json::Value {
    devices
        .iter()
        .map(|d| {
            serde_json::json!({
                "name": d.name,
                "memory_total_bytes": d.memory_total_bytes,
                "memory_used_bytes": d.memory_used_bytes,
            })
        })
        .collect()
}

fn devices_of(json: &serde_json::Value) -> Vec<Device> {
    let items = json.as_array().map(Vec::as_slice).unwrap_or_default();
    items
        .iter()
        .map(|d| Device {
            name: d["name"].as_str().unwrap_or_default().to_string(),
            memory_total_bytes: d["memory_total_bytes"].as_u64().unwrap_or(0),
            memory_used_bytes: d["memory_used_bytes"].as_u64().unwrap_or(0),
        })
        .collect()
}

/// Stores a worker's report: a new worker, or a new instance of one (another `instance_id`:
/// it restarted), starts now; otherwise only what it reports changes, and `last_seen_at`.
pub async fn record_worker(ex: impl PgExecutor<'_>, report: &WorkerReport) -> Result<()> {
    sqlx::query(
        "INSERT INTO workers (id, instance_id, host, version, devices, slots_total, slots_busy, queues)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (id) DO UPDATE SET
             instance_id = EXCLUDED.instance_id, host = EXCLUDED.host,
             version = EXCLUDED.version, devices = EXCLUDED.devices,
             slots_total = EXCLUDED.slots_total, slots_busy = EXCLUDED.slots_busy,
             queues = EXCLUDED.queues,
             started_at = CASE WHEN workers.instance_id = EXCLUDED.instance_id
                               THEN workers.started_at ELSE now() END,
             last_seen_at = now()",
    )
    .bind(&report.worker_id)
    .bind(&report.instance_id)
    .bind(&report.host)
    .bind(&report.version)
    .bind(devices_json(&report.devices))
    .bind(report.slots_total as i32)
    .bind(report.slots_busy as i32)
    .bind(&report.queues)
    .execute(ex)
    .await?;
    Ok(())
}

type Row = (
    String,
    String,
    String,
    serde_json::Value,
    i32,
    i32,
    Vec<String>,
    DateTime<Utc>,
    DateTime<Utc>,
    bool,
    Vec<uuid::Uuid>,
);

fn worker_row(r: Row) -> WorkerRow {
    WorkerRow {
        id: r.0,
        host: r.1,
        version: r.2,
        devices: devices_of(&r.3),
        slots_total: r.4,
        slots_busy: r.5,
        queues: r.6,
        started_at: r.7,
        last_seen_at: r.8,
        live: r.9,
        running: r.10,
    }
}

/// The columns of [`Row`]; `$1` is the lease timeout in milliseconds.
const SELECT_WORKERS: &str = concat!(
    "SELECT w.id, w.host, w.version, w.devices, w.slots_total, w.slots_busy, w.queues,
            w.started_at, w.last_seen_at,
            w.last_seen_at > now() - $1 * interval '1 millisecond',
            coalesce((SELECT array_agg(j.id ORDER BY j.id) FROM jobs j
                      WHERE j.state = ",
    state!(running),
    " AND j.worker_id = w.id), '{}')
     FROM workers w"
);

/// Workers seen within `seen_within` (every one with `None`), live ones first, then by id.
pub async fn list_workers(
    ex: impl PgExecutor<'_>,
    lease_timeout: Duration,
    seen_within: Option<Duration>,
) -> Result<Vec<WorkerRow>> {
    let query = format!(
        "{SELECT_WORKERS}
         WHERE $2::float8 IS NULL OR w.last_seen_at > now() - $2 * interval '1 millisecond'
         ORDER BY 10 DESC, w.id"
    );
    let rows: Vec<Row> = sqlx::query_as(&query)
        .bind(millis(lease_timeout))
        .bind(seen_within.map(millis))
        .fetch_all(ex)
        .await?;
    Ok(rows.into_iter().map(worker_row).collect())
}

/// One worker by id.
pub async fn get_worker(
    ex: impl PgExecutor<'_>,
    lease_timeout: Duration,
    id: &str,
) -> Result<Option<WorkerRow>> {
    let query = format!("{SELECT_WORKERS} WHERE w.id = $2");
    let row: Option<Row> = sqlx::query_as(&query)
        .bind(millis(lease_timeout))
        .bind(id)
        .fetch_optional(ex)
        .await?;
    Ok(row.map(worker_row))
}

/// Each live worker's (one seen within `lease_timeout`) id with its slots busy and in all, by
/// id: what the coordinator's per-worker gauges show.
pub async fn live_worker_slots(
    ex: impl PgExecutor<'_>,
    lease_timeout: Duration,
) -> Result<Vec<(String, i64, i64)>> {
    Ok(sqlx::query_as(
        "SELECT id, slots_busy::int8, slots_total::int8 FROM workers
         WHERE last_seen_at > now() - $1 * interval '1 millisecond' ORDER BY id",
    )
    .bind(millis(lease_timeout))
    .fetch_all(ex)
    .await?)
}

/// Every queue that a live worker (one seen within `lease_timeout`) serves.
pub async fn live_queues(ex: impl PgExecutor<'_>, lease_timeout: Duration) -> Result<Vec<String>> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT DISTINCT unnest(queues) FROM workers
         WHERE last_seen_at > now() - $1 * interval '1 millisecond'",
    )
    .bind(millis(lease_timeout))
    .fetch_all(ex)
    .await?;
    Ok(rows.into_iter().map(|(q,)| q).collect())
}
