ALTER TABLE transfers DROP CONSTRAINT transfers_distinct_accounts;
