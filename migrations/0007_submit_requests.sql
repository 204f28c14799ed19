-- Idempotent submission: the client-chosen `request_id` of SubmitJob and SubmitSweep, with a
-- digest of the spec it came with. A row is written in the transaction that stores the job or the
-- sweep, before them, so of two concurrent submits with one key the second waits on the first's
-- row and then answers with the first's job or sweep (or ALREADY_EXISTS when its spec differs).
-- Rows are kept as long as their job or sweep (forever, as jobs are never deleted): a key names
-- one job or sweep for good.
CREATE TABLE submit_requests (
    -- 'job' (SubmitJob) or 'sweep' (SubmitSweep): the two RPCs' keys are separate.
    kind        text        NOT NULL CHECK (kind IN ('job', 'sweep')),
    -- 1..=128 characters of [A-Za-z0-9_.:-] (checked by the coordinator).
    request_id  text        NOT NULL CHECK (char_length(request_id) BETWEEN 1 AND 128),
    -- Lowercase hex SHA-256 of the spec's proto3 JSON mapping (compact, keys sorted).
    spec_sha256 text        NOT NULL CHECK (spec_sha256 ~ '^[0-9a-f]{64}$'),
    -- What the first submit created: a job for kind 'job', a sweep for kind 'sweep'. The
    -- references are checked at commit, so the row can be written before what it names.
    job_id      uuid        REFERENCES jobs (id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
    sweep_id    uuid        REFERENCES sweeps (id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, request_id),
    CHECK ((kind = 'job') = (job_id IS NOT NULL) AND (kind = 'sweep') = (sweep_id IS NOT NULL))
);

COMMENT ON TABLE submit_requests IS
    'Idempotency keys (request_id) of SubmitJob and SubmitSweep: what each key created and a digest of its spec.';
COMMENT ON COLUMN submit_requests.kind IS 'job (SubmitJob) or sweep (SubmitSweep).';
COMMENT ON COLUMN submit_requests.request_id IS 'The client''s request_id.';
COMMENT ON COLUMN submit_requests.spec_sha256 IS 'SHA-256 (hex) of the spec''s JSON mapping; a repeat with another spec is ALREADY_EXISTS.';
COMMENT ON COLUMN submit_requests.job_id IS 'The job the first SubmitJob with this key created.';
COMMENT ON COLUMN submit_requests.sweep_id IS 'The sweep the first SubmitSweep with this key created.';
COMMENT ON COLUMN submit_requests.created_at IS 'When the first submit with this key was stored.';
