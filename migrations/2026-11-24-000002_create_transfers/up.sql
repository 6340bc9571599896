-- The ledger. A row is written in the same transaction as the balance changes, and its id is the
-- transfer's idempotency key: a retry after an ambiguous commit finds the row (the first attempt
-- committed) or fails on the primary key, so no transfer is applied twice.
-- The foreign keys make an unknown account fail the transfer's statement itself (23503).
CREATE TABLE transfers (
    id UUID CONSTRAINT transfers_pkey PRIMARY KEY,
    from_id UUID NOT NULL CONSTRAINT transfers_from_id_fkey REFERENCES accounts (id),
    to_id UUID NOT NULL CONSTRAINT transfers_to_id_fkey REFERENCES accounts (id),
    amount INT8 NOT NULL CONSTRAINT transfers_amount_positive CHECK (amount > 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- "Transfers of an account, newest first" reads one of these per side.
CREATE INDEX transfers_from_id_created_at_idx ON transfers (from_id, created_at);
CREATE INDEX transfers_to_id_created_at_idx ON transfers (to_id, created_at);
