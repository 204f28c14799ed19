-- Pruning a job's old training states and checking an upload that was stored but not recorded
-- (`store::artifact_uri_in_use`) look artifacts up by their store URI; without an index each
-- lookup scanned the whole table.
CREATE INDEX artifacts_uri_idx ON artifacts (uri);
