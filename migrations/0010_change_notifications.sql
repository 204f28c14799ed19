-- Change notifications: every write that changes what a watcher shows sends a NOTIFY on the
-- channel `trainq_changes` from the writing transaction itself, so that every coordinator
-- replica (each LISTENs on one connection of its own, `server/src/changes.rs`) wakes its
-- watchers of that job when the transaction commits, whichever replica (or psql session) wrote.
-- Postgres delivers a notification only on commit, drops it with a rollback, and merges
-- identical ones within a transaction.
--
-- The payload is one letter and the job id: `s<uuid>` when the job row changed in a way a
-- watcher shows (the same version the watchers compare: `updated_at`, which every state change
-- sets, or `attempt`), `p<uuid>` when metric points were stored for it. A lease renewal (a
-- heartbeat) or a dispatch mark changes neither, so it notifies nobody.

CREATE FUNCTION trainq_notify_job_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('trainq_changes', 's' || NEW.id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_notify_changed
    AFTER UPDATE ON jobs
    FOR EACH ROW
    WHEN (OLD.updated_at IS DISTINCT FROM NEW.updated_at OR OLD.attempt IS DISTINCT FROM NEW.attempt)
    EXECUTE FUNCTION trainq_notify_job_changed();

-- One statement stores a batch of points (for one job, from ReportMetrics): one notification
-- per job in the statement, read from the rows it really inserted (ON CONFLICT DO NOTHING
-- leaves repeats out of the transition table).
CREATE FUNCTION trainq_notify_points_stored() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('trainq_changes', 'p' || job_id::text)
    FROM (SELECT DISTINCT job_id FROM stored_points) AS jobs;
    RETURN NULL;
END
$$;

CREATE TRIGGER metric_points_notify_stored
    AFTER INSERT ON metric_points
    REFERENCING NEW TABLE AS stored_points
    FOR EACH STATEMENT
    EXECUTE FUNCTION trainq_notify_points_stored();

COMMENT ON FUNCTION trainq_notify_job_changed() IS
    'NOTIFY trainq_changes, ''s<job id>'': a job''s state (updated_at) or attempt changed. Coordinators LISTEN to wake their watchers.';
COMMENT ON FUNCTION trainq_notify_points_stored() IS
    'NOTIFY trainq_changes, ''p<job id>'' once per job whose metric points a statement stored.';
