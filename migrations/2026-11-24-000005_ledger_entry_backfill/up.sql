-- Ledger rows written before 000004 get their versions and balances by replaying each account's
-- ledger in (created_at, id) order from its opening balance; each account's version becomes
-- its number of entries, and its creation time no later than its first transfer.
WITH entries AS (
    SELECT id AS transfer_id, from_id AS account, -amount AS delta, created_at FROM transfers
    UNION ALL
    SELECT id, to_id, amount, created_at FROM transfers
), replayed AS (
    SELECT e.transfer_id, e.account,
           ROW_NUMBER() OVER w AS version,
           CAST(a.opening_balance + SUM(e.delta) OVER w AS INT8) AS balance_after
    FROM entries e JOIN accounts a ON a.id = e.account
    WINDOW w AS (PARTITION BY e.account ORDER BY e.created_at, e.transfer_id
                 ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
)
UPDATE transfers SET
    from_version = f.version, from_balance_after = f.balance_after,
    to_version = t.version, to_balance_after = t.balance_after
FROM replayed f, replayed t
WHERE f.transfer_id = transfers.id AND f.account = transfers.from_id
  AND t.transfer_id = transfers.id AND t.account = transfers.to_id;

UPDATE accounts SET
    version = (SELECT COUNT(*) FROM transfers t WHERE t.from_id = accounts.id OR t.to_id = accounts.id),
    created_at = LEAST(accounts.created_at, COALESCE(
        (SELECT MIN(t.created_at) FROM transfers t WHERE t.from_id = accounts.id OR t.to_id = accounts.id),
        accounts.created_at));
