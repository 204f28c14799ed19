\set j random(1, 64)
BEGIN;
SELECT attempt FROM jobs WHERE id = ('00000000-0000-0000-0000-' || lpad(:j::text, 12, '0'))::uuid FOR NO KEY UPDATE;
WITH b AS (SELECT nextval('bench_seq') * 1000 AS base),
input AS (SELECT 'train/loss'::text AS name, (b.base + g)::bigint AS step, 1 AS epoch, random() AS value, g AS ord FROM b, generate_series(1, 1000) g),
stored AS (
  INSERT INTO metric_points (job_id, name, step, epoch, value)
  SELECT ('00000000-0000-0000-0000-' || lpad(:j::text, 12, '0'))::uuid, name, step, epoch, value FROM input ORDER BY ord
  ON CONFLICT (job_id, name, step) DO NOTHING
  RETURNING name, step, epoch, value
), newest AS (
  SELECT DISTINCT ON (name) name, step, epoch, value FROM stored ORDER BY name, step DESC
), latest AS (
  INSERT INTO job_metric_latest (job_id, name, step, epoch, value)
  SELECT ('00000000-0000-0000-0000-' || lpad(:j::text, 12, '0'))::uuid, name, step, epoch, value FROM newest
  ON CONFLICT (job_id, name) DO UPDATE SET step = EXCLUDED.step, epoch = EXCLUDED.epoch, value = EXCLUDED.value
  WHERE job_metric_latest.step < EXCLUDED.step
), earlier AS (
  SELECT name, step, ord, value, min(value) OVER w AS low, max(value) OVER w AS high, count(*) OVER w AS n
  FROM input WINDOW w AS (PARTITION BY name, step ORDER BY ord ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
), conflicting AS (
  SELECT i.name, i.step, i.ord FROM earlier i
  WHERE EXISTS (SELECT 1 FROM metric_points m WHERE m.job_id = ('00000000-0000-0000-0000-' || lpad(:j::text, 12, '0'))::uuid AND m.name = i.name AND m.step = i.step AND m.value IS DISTINCT FROM i.value)
     OR (i.n > 0 AND (i.low IS DISTINCT FROM i.value OR i.high IS DISTINCT FROM i.value))
), first_conflict AS (SELECT name, step FROM conflicting ORDER BY ord LIMIT 1)
SELECT (SELECT count(*) FROM stored), (SELECT count(*) FROM conflicting), (SELECT name FROM first_conflict), (SELECT step FROM first_conflict);
COMMIT;
