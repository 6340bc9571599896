//! The statement that applies a chunk of a transfer file in one go, exactly as applying its
//! lines one at a time in file order would.
//!
//! It takes the chunk as six arrays (line, id, from, to, amount, and the runner's guess that
//! the line is refused for insufficient funds, below), and as three more (id,
//! balance, version) the chunk's accounts as the runner locked them, in key order, with a
//! statement of its own just before (`repo::lock_accounts`; the order every transfer statement
//! locks in, so batches and single transfers never deadlock each other). Then, in SQL:
//! 1. `locked`: those accounts. Passed in rather than read again: the lock statement has just
//!    read them, and nobody else can change them until COMMIT (reading them again cost 2–3 ms
//!    of a 50 ms chunk of 1000 lines, `EXPLAIN ANALYZE`). Locked inside this statement instead,
//!    at READ COMMITTED, balances it read while it waited for the locks were older than the
//!    rows its UPDATE then moved. `moved` updates an account only if it still has the balance
//!    and version passed in, and the runner checks that every account moved, so a stale value
//!    cannot reach the ledger (`tests/batch.rs`, `a_stale_locked_balance_moves_nothing`);
//! 2. `verdicts`: decides the lines that move no money, as the one-by-one runner would: an id
//!    already in the ledger (`already_applied` with the same details, `id_conflict` without), an
//!    id that an earlier line of the chunk applies (the same two outcomes), a debited account
//!    that does not exist (`unknown_account`). The ledger is asked first, as the runner does;
//! 3. `running`: for every other line in file order, each account's running balance and version
//!    (window functions partitioned by account, ordered by line);
//! 4. `refused`: the first line whose debit would go below zero (`insufficient_funds`) or whose
//!    credit would leave INT8 (`balance_overflow`), or that the runner guessed short and is not.
//!    A line guessed short moves nothing (a "short" entry on its debited account), and is
//!    decided `insufficient_funds` when its account's running balance is indeed below its
//!    amount. Guesses are exact (`Chunk::guess_short` plays the lines from the balances just
//!    locked) except where the ledger has a line's id, which the runner may not know: every
//!    guess is checked here, and the first wrong one ends the statement undecided. By
//!    induction over file order, every line before the first refused or wrongly guessed line
//!    gets exactly its one-by-one verdict. A line whose credited account does not
//!    exist is refused as the one-transfer statement refuses it: for insufficient funds when the
//!    debit would fail first (that statement moves the debit before the ledger row finds the
//!    other side missing), else as `unknown_account`; so it takes part in the running balance
//!    as a "probe" that moves nothing (`tests/batch.rs` compares every line with that runner);
//! 5. `moved` and `inserted`: apply every line before that one: each account's balance and
//!    version move once by its lines' sum and count, and each ledger row carries both sides'
//!    version and balance after, exactly as one-by-one application writes them. The rows' time
//!    is one `clock_timestamp()`, taken after the lock statement, so that each account's entries
//!    are in time order as in version order (as in the one-transfer statement).
//!
//! A refused line that was not guessed changes nothing, so the lines after it need balances
//! the statement did not compute: the runner sends them again as the next statement. A chunk
//! whose refusals were all guessed is one statement (each refusal ended a statement before
//! the guesses: a file with one line in ten refused ran at a tenth of the speed). The result is one row per decided line (its verdict), plus two rows counting the
//! ledger rows inserted and the accounts moved, which the runner checks; the first also gives
//! the time the rows carry.
//!
//! Shaped for the planner, which cannot estimate the CTEs' row counts: each ledger row's two
//! sides are gathered by `GROUP BY` rather than a self-join (which became a nested loop over the
//! chunk squared).
//!
//! Valid on both engines: `unnest` of several arrays, data-modifying CTEs that modify each table
//! once (CockroachDB refuses two modifications of one table in a statement), window functions,
//! `DISTINCT ON`. The running sums are NUMERIC (SUM of INT8 on both), so an overflow is seen,
//! not raised.

use std::collections::{HashMap, HashSet};

use diesel::pg::{Pg, PgConnection};
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use uuid::Uuid;

use super::input::Line;
use crate::models::LockedAccount;

/// A chunk's lines as the statement binds them, built once for all the attempts at it.
#[derive(Debug, Clone)]
pub struct Chunk {
    lines: Vec<i64>,
    ids: Vec<Uuid>,
    from: Vec<Uuid>,
    to: Vec<Uuid>,
    amounts: Vec<i64>,
}

impl Chunk {
    pub fn new(lines: &[Line]) -> Self {
        Chunk {
            lines: lines.iter().map(|l| l.line as i64).collect(),
            ids: lines.iter().map(|l| l.transfer.id).collect(),
            from: lines.iter().map(|l| l.transfer.from_id).collect(),
            to: lines.iter().map(|l| l.transfer.to_id).collect(),
            amounts: lines.iter().map(|l| l.transfer.amount).collect(),
        }
    }

    /// For each line, whether applying the lines one at a time from the balances in `locked`
    /// refuses it for insufficient funds: the guesses the statement takes (and checks). The
    /// same rules as the statement's, with `in_ledger` for the ledger: a line whose id the
    /// ledger has moves no money. Without it (empty) such a line is taken for one that applies,
    /// so a guess can be wrong; the statement then stops at it. Guesses after a credit that
    /// would overflow are not made (the statement stops there).
    pub fn guess_short(&self, locked: &[LockedAccount], in_ledger: &HashSet<Uuid>) -> Vec<bool> {
        let mut balance: HashMap<Uuid, i128> = locked
            .iter()
            .map(|a| (a.id, i128::from(a.balance)))
            .collect();
        // Ids a line before has applied: a later line with one moves nothing.
        let mut applied: HashSet<Uuid> = HashSet::new();
        let mut short = vec![false; self.ids.len()];
        for (i, guess) in short.iter_mut().enumerate() {
            let (id, from, to) = (self.ids[i], self.from[i], self.to[i]);
            let amount = i128::from(self.amounts[i]);
            if applied.contains(&id) || in_ledger.contains(&id) {
                continue;
            }
            let Some(&debited) = balance.get(&from) else {
                continue;
            };
            if debited < amount {
                *guess = true;
                continue;
            }
            let Some(&credited) = balance.get(&to) else {
                continue;
            };
            if credited + amount > i128::from(i64::MAX) {
                break;
            }
            balance.insert(from, debited - amount);
            balance.insert(to, credited + amount);
            applied.insert(id);
        }
        short
    }

    /// The chunk statement over these lines and `locked`, the accounts this transaction has
    /// just locked, with `short`: for each line, whether the runner expects it refused for
    /// insufficient funds (see the module's comment; every guess is checked).
    pub fn statement<'a>(
        &'a self,
        locked: &[LockedAccount],
        short: Vec<bool>,
    ) -> BatchStatement<'a> {
        BatchStatement {
            chunk: self,
            short,
            account_ids: locked.iter().map(|a| a.id).collect(),
            balances: locked.iter().map(|a| a.balance).collect(),
            versions: locked.iter().map(|a| a.version).collect(),
        }
    }
}

#[derive(Debug)]
pub struct BatchStatement<'a> {
    chunk: &'a Chunk,
    short: Vec<bool>,
    account_ids: Vec<Uuid>,
    balances: Vec<i64>,
    versions: Vec<i64>,
}

/// Chunks of at most this many lines are the exception to the rule below: parsing and planning
/// were most of a one-line statement's time on the server (BENCHMARKS.md, `workload --batch 1`),
/// and a generic plan, which expects 10 lines, fits them.
const CACHED_UP_TO: usize = 10;

/// Not cached as a prepared statement, on purpose: PostgreSQL's generic plan for it (which a
/// cached statement gets after five runs) cannot know the arrays' lengths and took twice as long
/// per chunk as a plan made for each chunk's values (8.1k against 4.6k transfers/s, measured with
/// `plan_cache_mode = force_custom_plan`). Planning once per chunk costs little against the
/// chunk's thousand transfers. A query id alone does not keep Diesel from caching it (it then
/// caches by SQL text): `walk_ast` says so too, except for a short chunk (`CACHED_UP_TO`).
impl QueryId for BatchStatement<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for BatchStatement<'_> {
    /// (line, verdict, NULL), or (count, "inserted" | "moved", and for "inserted" the time the
    /// ledger rows carry: a run tells its own rows from another run's by it after a lost
    /// COMMIT). NULL when they carry more than one (a trigger of the database's setting
    /// `created_at`): the run then knows its rows by their details alone.
    type SqlType = (BigInt, Text, Nullable<Timestamptz>);
}

impl QueryFragment<Pg> for BatchStatement<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let chunk = self.chunk;
        if chunk.lines.len() > CACHED_UP_TO {
            out.unsafe_to_cache_prepared();
        }
        out.push_sql("WITH input AS (\n  SELECT * FROM unnest(");
        out.push_bind_param::<Array<BigInt>, _>(&chunk.lines)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<SqlUuid>, _>(&chunk.ids)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<SqlUuid>, _>(&chunk.from)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<SqlUuid>, _>(&chunk.to)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&chunk.amounts)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Bool>, _>(&self.short)?;
        out.push_sql(
            ") AS i (ord, id, from_id, to_id, amount, guess)\n), locked AS (\n  SELECT * FROM unnest(",
        );
        out.push_bind_param::<Array<SqlUuid>, _>(&self.account_ids)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&self.balances)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&self.versions)?;
        out.push_sql(") AS l (id, balance, version)");
        out.push_sql(TAIL);
        Ok(())
    }
}

impl RunQueryDsl<PgConnection> for BatchStatement<'_> {}

const TAIL: &str = "
), known AS (
  SELECT i.ord, i.id, i.from_id, i.to_id, i.amount, i.guess, p.id IS NOT NULL AS in_ledger,
         (p.from_id, p.to_id, p.amount) = (i.from_id, i.to_id, i.amount) AS same_as_ledger,
         f.id IS NOT NULL AS from_known, t.id IS NOT NULL AS to_known
  FROM input i
  LEFT JOIN transfers p ON p.id = i.id
  LEFT JOIN locked f ON f.id = i.from_id
  LEFT JOIN locked t ON t.id = i.to_id
), firsts AS (
  SELECT DISTINCT ON (id) id, ord, from_id, to_id, amount FROM known
  WHERE NOT in_ledger AND from_known AND to_known AND NOT guess ORDER BY id, ord
), verdicts AS (
  SELECT k.ord, k.id, k.from_id, k.to_id, k.amount,
    CASE
      WHEN k.in_ledger AND k.same_as_ledger THEN 'already_applied'
      WHEN k.in_ledger THEN 'id_conflict'
      WHEN f.ord < k.ord AND (f.from_id, f.to_id, f.amount) = (k.from_id, k.to_id, k.amount)
        THEN 'already_applied'
      WHEN f.ord < k.ord THEN 'id_conflict'
      WHEN NOT k.from_known THEN 'unknown_from'
    END AS verdict, k.to_known, k.guess
  FROM known k LEFT JOIN firsts f ON f.id = k.id
), entries AS (
  SELECT ord, id, from_id, to_id, from_id AS account,
         CASE WHEN to_known AND NOT guess THEN -amount ELSE 0 END AS delta,
         CASE WHEN guess THEN 'short' WHEN to_known THEN 'debit' ELSE 'probe' END AS kind, amount
  FROM verdicts WHERE verdict IS NULL
  UNION ALL
  SELECT ord, id, from_id, to_id, to_id, amount, 'credit', amount
  FROM verdicts WHERE verdict IS NULL AND to_known AND NOT guess
), running AS (
  SELECT e.ord, e.id, e.from_id, e.to_id, e.account, e.kind, e.delta, e.amount,
         a.balance AS balance_before, a.version AS version_before,
         a.balance + SUM(e.delta) OVER w AS balance_after,
         a.version + SUM(CASE WHEN e.kind IN ('debit', 'credit') THEN 1 ELSE 0 END) OVER w
           AS version_after
  FROM entries e JOIN locked a ON a.id = e.account
  WINDOW w AS (PARTITION BY e.account ORDER BY e.ord ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
), refused AS (
  SELECT ord, bool_or(kind <> 'credit') AS short, bool_or(kind = 'short') AS wrong_guess
  FROM running
  WHERE (kind = 'debit' AND balance_after < 0) OR (kind = 'probe' AND balance_after < amount)
     OR (kind = 'credit' AND balance_after > 9223372036854775807)
     OR (kind = 'short' AND balance_after >= amount)
  GROUP BY ord ORDER BY ord LIMIT 1
), applied AS (
  SELECT r.* FROM running r
  WHERE r.kind IN ('debit', 'credit') AND NOT EXISTS (SELECT 1 FROM refused s WHERE r.ord >= s.ord)
), moved AS (
  UPDATE accounts SET balance = accounts.balance + d.delta, version = accounts.version + d.n
  FROM (SELECT account, MIN(balance_before) AS balance, MIN(version_before) AS version,
               CAST(SUM(delta) AS INT8) AS delta, COUNT(*) AS n
        FROM applied GROUP BY account) AS d
  WHERE accounts.id = d.account AND accounts.balance = d.balance AND accounts.version = d.version
  RETURNING accounts.id,
    (accounts.balance = d.balance + d.delta AND accounts.version = d.version + d.n) AS as_asked
), inserted AS (
  INSERT INTO transfers (id, from_id, to_id, amount, from_version, from_balance_after, to_version, to_balance_after, created_at)
  SELECT id, from_id, to_id, amount,
         CAST(MAX(CASE WHEN kind = 'debit' THEN version_after END) AS INT8),
         CAST(MAX(CASE WHEN kind = 'debit' THEN balance_after END) AS INT8),
         CAST(MAX(CASE WHEN kind = 'credit' THEN version_after END) AS INT8),
         CAST(MAX(CASE WHEN kind = 'credit' THEN balance_after END) AS INT8),
         (SELECT clock_timestamp())
  FROM applied GROUP BY ord, id, from_id, to_id, amount
  RETURNING id, from_id, to_id, amount, created_at
)
SELECT v.ord, v.verdict, CAST(NULL AS TIMESTAMPTZ) FROM verdicts v
WHERE v.verdict IS NOT NULL AND NOT EXISTS (SELECT 1 FROM refused s WHERE v.ord >= s.ord)
UNION ALL
SELECT r.ord, CASE WHEN r.kind = 'probe' THEN 'unknown_to' ELSE 'short' END,
  CAST(NULL AS TIMESTAMPTZ) FROM running r
WHERE r.kind IN ('probe', 'short') AND NOT EXISTS (SELECT 1 FROM refused s WHERE r.ord >= s.ord)
UNION ALL
SELECT ord, CASE WHEN wrong_guess THEN 'not_short' WHEN short THEN 'insufficient_funds'
  ELSE 'balance_overflow' END, CAST(NULL AS TIMESTAMPTZ) FROM refused
UNION ALL
SELECT (SELECT COUNT(*) FROM (SELECT id, from_id, to_id, amount FROM inserted
          INTERSECT SELECT id, from_id, to_id, amount FROM applied WHERE kind = 'debit') AS x),
  'inserted',
  (SELECT CASE WHEN MIN(created_at) = MAX(created_at) THEN MIN(created_at) END FROM inserted)
UNION ALL
SELECT (SELECT COUNT(*) FROM moved WHERE as_asked), 'moved', CAST(NULL AS TIMESTAMPTZ)";

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::query_builder::QueryFragment;

    #[test]
    fn guesses_play_the_lines_as_the_statement_does() {
        let [a, b, ghost, x, y] = [1u128, 2, 3, 4, 5].map(Uuid::from_u128);
        let line = |n: u64, id: Uuid, from_id: Uuid, to_id: Uuid, amount: i64| Line {
            line: n,
            transfer: crate::models::NewTransfer {
                id,
                from_id,
                to_id,
                amount,
            },
        };
        let lines = [
            line(1, x, a, b, 6),                         // applies: a 4, b 6
            line(2, x, a, b, 6),                         // x applied by line 1: moves nothing
            line(3, y, a, ghost, 5), // a holds 4: short, though `to` does not exist
            line(4, y, a, ghost, 3), // unknown account: moves nothing
            line(5, y, b, a, 6),     // y's earlier lines applied nothing: b 0, a 10
            line(6, Uuid::from_u128(6), b, a, 1), // short
            line(7, Uuid::from_u128(7), a, b, i64::MAX), // short: a holds 10
            line(8, Uuid::from_u128(8), ghost, a, 1), // unknown `from`: nothing
        ];
        let locked = |balance_b| {
            vec![
                LockedAccount {
                    id: a,
                    balance: 10,
                    version: 0,
                },
                LockedAccount {
                    id: b,
                    balance: balance_b,
                    version: 0,
                },
            ]
        };
        let chunk = Chunk::new(&lines);
        let none = HashSet::new();
        assert_eq!(
            chunk.guess_short(&locked(0), &none),
            [false, false, true, false, false, true, true, false]
        );
        // x in the ledger: line 1 moves nothing, so a keeps 10 (line 3 is not short) and b
        // holds nothing (line 5 is).
        assert_eq!(
            chunk.guess_short(&locked(0), &HashSet::from([x])),
            [false, false, false, false, true, true, true, false]
        );
        // A credit that would overflow ends the guesses (the statement stops there).
        let rich = chunk.guess_short(&locked(i64::MAX - 1), &none);
        assert_eq!(rich, [false; 8]);
    }

    /// A statement Diesel may cache is prepared under a name, and PostgreSQL then plans it
    /// generically from its sixth run on (seen with auto_explain: 86 of a 100,000-line file's
    /// 96 chunks ran a plan that expected 10 lines). Uncached, each chunk is planned for its
    /// own arrays; only short chunks, which such a plan fits, are cached.
    #[test]
    fn only_a_short_chunk_statement_is_cached() {
        let lines: Vec<Line> = (0..=CACHED_UP_TO as u64)
            .map(|n| Line {
                line: n + 1,
                transfer: crate::models::NewTransfer {
                    id: Uuid::from_u128(n.into()),
                    from_id: Uuid::from_u128(1000),
                    to_id: Uuid::from_u128(1001),
                    amount: 1,
                },
            })
            .collect();
        let cached = |n: usize| {
            let chunk = Chunk::new(&lines[..n]);
            let statement = chunk.statement(&[], vec![false; n]);
            statement.is_safe_to_cache_prepared(&Pg).ok()
        };
        assert_eq!(cached(1), Some(true));
        assert_eq!(cached(CACHED_UP_TO), Some(true));
        assert_eq!(cached(CACHED_UP_TO + 1), Some(false));
    }
}
