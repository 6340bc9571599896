-- A transfer moves money between two different accounts. `bank` refuses from = to before it
-- reaches the database; this makes the ledger refuse it from any other client too.
ALTER TABLE transfers ADD CONSTRAINT transfers_distinct_accounts CHECK (from_id <> to_id);
