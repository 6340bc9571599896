CREATE INDEX transfers_from_id_created_at_idx ON transfers (from_id, created_at);
CREATE INDEX transfers_to_id_created_at_idx ON transfers (to_id, created_at);
DROP INDEX transfers_to_id_to_version_key;
DROP INDEX transfers_from_id_from_version_key;
ALTER TABLE transfers ALTER COLUMN to_balance_after DROP NOT NULL;
ALTER TABLE transfers ALTER COLUMN to_version DROP NOT NULL;
ALTER TABLE transfers ALTER COLUMN from_balance_after DROP NOT NULL;
ALTER TABLE transfers ALTER COLUMN from_version DROP NOT NULL;
