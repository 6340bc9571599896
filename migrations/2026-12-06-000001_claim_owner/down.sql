ALTER TABLE transfer_claims DROP COLUMN claimed_by;
