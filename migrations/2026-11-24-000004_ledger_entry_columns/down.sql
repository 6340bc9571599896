ALTER TABLE transfers DROP COLUMN to_balance_after;
ALTER TABLE transfers DROP COLUMN to_version;
ALTER TABLE transfers DROP COLUMN from_balance_after;
ALTER TABLE transfers DROP COLUMN from_version;
ALTER TABLE accounts DROP COLUMN created_at;
ALTER TABLE accounts DROP COLUMN version;
