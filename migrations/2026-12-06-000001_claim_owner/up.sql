-- A single statement (single-statement mode) claims its id in the statement that writes its
-- ledger row, and marks the claim with a value of its run's own. After the statement's answer
-- was lost, the run finds the row and must tell whether it wrote it or another run of the same
-- transfer did while it backed off: the two rows are alike to the last detail but their time,
-- which a single statement cannot learn before its answer. The mark is its own claim's. Claims
-- written to say "not applied" (`repo::claim_ids`) carry none. Valid on both engines.
ALTER TABLE transfer_claims ADD COLUMN claimed_by UUID;
