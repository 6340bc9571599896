-- Every ledger entry describes itself (as pgledger's and TigerBeetle's do): for both sides, the
-- account's version and balance after the transfer. The transfer statement writes them in the
-- same statement that moves the money; accounts count their balance changes in `version`.
-- Columns only here: CockroachDB does not let a transaction write to a column it added, so the
-- backfill (000005) and the constraints (000006) are migrations of their own.
ALTER TABLE accounts ADD COLUMN version INT8 NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN created_at TIMESTAMPTZ NOT NULL DEFAULT now();
ALTER TABLE transfers ADD COLUMN from_version INT8;
ALTER TABLE transfers ADD COLUMN from_balance_after INT8;
ALTER TABLE transfers ADD COLUMN to_version INT8;
ALTER TABLE transfers ADD COLUMN to_balance_after INT8;
