-- Each answer "not applied" (a refusal on the merits, a run held up and settled) bumps its id's
-- generation. A run that retries in a transaction reads it after its first attempt and again in
-- every later one: a change means another run answered the id since this one began, and this
-- run must not apply it after that answer. Valid on both engines.
ALTER TABLE transfer_claims ADD COLUMN generation INT8 NOT NULL DEFAULT 1;
