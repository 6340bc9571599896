-- Ids that a single-statement transfer, or a rerun's final "not applied", has claimed. A transfer
-- sent in single-statement mode is its own commit, so one held up in the network can reach the
-- server after a rerun of its id said "not applied" or refused it on its merits. Each such
-- statement inserts its id here, and a rerun claims the id before it gives that answer: the
-- statement that comes late then fails on this primary key and applies nothing. A unique index,
-- not a lookup: it sees rows committed after the statement's snapshot and waits for those
-- still being written, at every isolation level.
CREATE TABLE transfer_claims (
    id UUID CONSTRAINT transfer_claims_pkey PRIMARY KEY
);
