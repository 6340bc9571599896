-- INT8, not INT: INT is 8 bytes on CockroachDB but 4 on PostgreSQL.
-- Constraints are named so both engines report the same names (CockroachDB's defaults differ).
-- opening_balance is what the account was created with; `bank verify` checks
-- balance = opening_balance + credits - debits against the ledger.
CREATE TABLE accounts (
    id UUID CONSTRAINT accounts_pkey PRIMARY KEY,
    balance INT8 NOT NULL CONSTRAINT accounts_balance_nonnegative CHECK (balance >= 0),
    opening_balance INT8 NOT NULL DEFAULT 0
        CONSTRAINT accounts_opening_balance_nonnegative CHECK (opening_balance >= 0)
);
