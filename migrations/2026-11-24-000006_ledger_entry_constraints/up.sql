-- Every entry now has both sides' versions and balances; history reads each side by account and
-- version (these replace the by-account, by-time indexes of 000002).
ALTER TABLE transfers ALTER COLUMN from_version SET NOT NULL;
ALTER TABLE transfers ALTER COLUMN from_balance_after SET NOT NULL;
ALTER TABLE transfers ALTER COLUMN to_version SET NOT NULL;
ALTER TABLE transfers ALTER COLUMN to_balance_after SET NOT NULL;
CREATE UNIQUE INDEX transfers_from_id_from_version_key ON transfers (from_id, from_version);
CREATE UNIQUE INDEX transfers_to_id_to_version_key ON transfers (to_id, to_version);
DROP INDEX transfers_from_id_created_at_idx;
DROP INDEX transfers_to_id_created_at_idx;
