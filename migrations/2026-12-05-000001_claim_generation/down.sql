ALTER TABLE transfer_claims DROP COLUMN generation;
