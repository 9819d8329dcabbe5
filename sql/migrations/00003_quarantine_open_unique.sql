-- postgres-migrations disable-transaction
-- At most one open quarantine entry per value. CONCURRENTLY: the table stays writable
-- while the index builds, so this cannot run in a transaction, and the file holds this one
-- statement only (a multi-statement string would run as one implicit transaction). A
-- failed build leaves an INVALID index that `keyring migrate` drops before it re-runs.
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS quarantine_open_uq ON keyring.quarantine (column_id, row_key) WHERE resolved_at IS NULL;
