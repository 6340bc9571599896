//! `bank verify`: the invariants of a bank, checked against the ledger without changing anything.
//!
//! Every account's balance is non-negative and equals its opening balance plus the credits minus
//! the debits the ledger records for it, so money is neither created nor lost. And every
//! account's entries form an exact chain: versions 1, 2, 3, … without a gap, each entry's
//! balance-after equal to the one before (the opening balance before the first) plus or minus
//! its amount, and the last one equal to the account's current balance and version. A ledger row
//! changed by hand breaks its chain.
//!
//! One statement computes each account's status once and both the totals and the listed
//! violations from it, in one read-only snapshot.

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Nullable, Text, Uuid as SqlUuid};
use serde::Serialize;
use uuid::Uuid;

use crate::repo;

/// Accounts listed individually in a report; the counts cover the rest.
const MAX_LISTED: i64 = 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub ok: bool,
    pub accounts: i64,
    pub transfers: i64,
    /// Wider than a balance: accounts that each fit in INT8 may not together.
    pub total_balance: i128,
    pub total_opening_balance: i128,
    pub negative_balances: i64,
    pub mismatched_accounts: i64,
    /// Accounts whose chain of entries is broken (a gap, a wrong balance-after, or a last entry
    /// that does not match the account).
    pub broken_chains: i64,
    /// Up to 20 accounts whose balance is negative or disagrees with the ledger, or whose chain
    /// is broken.
    pub violations: Vec<Violation>,
    /// Whether more accounts than `violations` lists are in violation (the list stops at 20; a
    /// JSON reader could not tell).
    pub violations_truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub id: Uuid,
    /// `None` (JSON `null`) only for a NULL written by hand where the schema forbids one.
    pub balance: Option<i64>,
    /// opening balance + credits - debits. Wider than a balance: an amount edited by hand can
    /// take it past INT8. `None` (JSON `null`) when the account has no opening balance (a NULL
    /// written by hand), so the ledger explains no balance at all.
    pub expected: Option<i128>,
    pub chain_ok: bool,
    /// With a broken chain: the version of its first entry that does not follow the one before
    /// it (the opening balance before the first). `None` (JSON `null`) when every entry follows
    /// and the break is between the last entry and the account's own balance and version.
    pub chain_broken_at: Option<i64>,
    /// The version of the account's last entry (`None`: it has none), which the account's
    /// balance and version must match.
    pub last_entry_version: Option<i64>,
}

/// One row of the statement: the totals, and one listed violation (or none).
#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = BigInt)]
    accounts: i64,
    #[diesel(sql_type = BigInt)]
    transfers: i64,
    #[diesel(sql_type = Text)]
    total_balance: String,
    #[diesel(sql_type = Text)]
    total_opening_balance: String,
    #[diesel(sql_type = BigInt)]
    negative_balances: i64,
    #[diesel(sql_type = BigInt)]
    mismatched_accounts: i64,
    #[diesel(sql_type = BigInt)]
    broken_chains: i64,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    id: Option<Uuid>,
    #[diesel(sql_type = Nullable<BigInt>)]
    balance: Option<i64>,
    #[diesel(sql_type = Nullable<Text>)]
    expected: Option<String>,
    #[diesel(sql_type = Nullable<Bool>)]
    chain_ok: Option<bool>,
    #[diesel(sql_type = Nullable<BigInt>)]
    broken_at: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    last_version: Option<i64>,
}

/// Each entry (a transfer seen from one of its accounts) linked to the one before it, then each
/// account's status, then the totals and the first violations.
///
/// Every sum and difference of amounts and balances is taken in NUMERIC (DECIMAL on
/// CockroachDB): a row edited by hand (an amount or a balance-after near INT8's limits) made
/// INT8 arithmetic fail the whole statement with "bigint out of range", and a check that fails
/// reports nothing. What the ledger says an account should hold can then leave INT8; it comes
/// back as text, as the two totals do. NUMERIC arithmetic on every entry cost a quarter more
/// server CPU on 1.77M transfers, so each link is checked in INT8 when both its operands are within 2^62
/// of zero (their sum or difference then fits), and in NUMERIC only otherwise; the sums are
/// SUMs of INT8, which both engines accumulate exactly and return as NUMERIC.
///
/// An entry whose transfer the schema's CHECKs would refuse (an amount not above zero, an account
/// paying itself; the CHECKs dropped by hand) is a broken link, however well its balances chain:
/// such a row passed, and `history` showed an amount of -5 as a credit of 5.
///
/// A NULL where the schema says NOT NULL (a constraint dropped by hand) is a violation too:
/// `IS NOT TRUE` and `COALESCE(…, false)`, so that a comparison with NULL, which is neither true
/// nor false, is not taken for a pass. Versions: `version - 1` is computed only
/// once `version > prev_version`, so it cannot go below INT8's minimum.
const CHECK: &str = "\
WITH entries AS (
    SELECT from_id AS account, from_version AS version, from_balance_after AS after, amount,
           true AS debit, (amount > 0 AND from_id <> to_id) AS sound
    FROM transfers
    UNION ALL
    SELECT to_id, to_version, to_balance_after, amount, false, (amount > 0 AND from_id <> to_id)
    FROM transfers
    -- A fence: without it PostgreSQL reads both sides in (account, version) order through the
    -- two unique indexes, one heap fetch per entry, 1.6x slower than scanning and sorting.
    OFFSET 0
), links AS (
    SELECT account, version, after, amount, debit, sound,
           LAG(version) OVER w AS prev_version,
           LAG(after) OVER w AS prev_after,
           LEAD(version) OVER w IS NULL AS is_last
    FROM entries
    WINDOW w AS (PARTITION BY account ORDER BY version)
), judged_links AS (
    SELECT account, version, after, amount, debit, prev_version, is_last, (CASE
               WHEN sound IS NOT TRUE THEN false
               WHEN prev_version IS NULL THEN version = 1
               WHEN version > prev_version THEN version - 1 = prev_version AND CASE
                   WHEN after BETWEEN -4611686018427387904 AND 4611686018427387903
                        AND amount BETWEEN -4611686018427387904 AND 4611686018427387903
                   THEN CASE WHEN debit THEN after + amount ELSE after - amount END = prev_after
                   ELSE CASE WHEN debit THEN CAST(after AS NUMERIC) + amount
                             ELSE CAST(after AS NUMERIC) - amount END
                        = CAST(prev_after AS NUMERIC)
               END
               ELSE false
           END) IS NOT TRUE AS bad
    FROM links
), chains AS (
    SELECT account,
           SUM(amount) FILTER (WHERE NOT debit) AS credits,
           SUM(amount) FILTER (WHERE debit) AS debits,
           COUNT(*) FILTER (WHERE bad) AS bad_links,
           MIN(version) FILTER (WHERE bad) AS first_bad,
           MIN(version) AS first_version,
           MIN(CASE WHEN debit THEN CAST(after AS NUMERIC) + amount
                    ELSE CAST(after AS NUMERIC) - amount END)
               FILTER (WHERE prev_version IS NULL) AS first_before,
           MAX(after) FILTER (WHERE is_last) AS last_after,
           MAX(version) AS last_version
    FROM judged_links GROUP BY account
), status AS (
    SELECT a.id, a.balance, a.opening_balance, c.last_version,
           -- Where the chain first fails: the first entry when it does not start from the
           -- opening balance, else the first that does not follow the one before it; NULL when
           -- it fails only between its last entry and the account's row (or has no entries).
           CASE WHEN c.first_before IS DISTINCT FROM CAST(a.opening_balance AS NUMERIC)
                THEN c.first_version
                WHEN c.bad_links > 0 THEN c.first_bad
           END AS broken_at,
           CAST(a.opening_balance AS NUMERIC) + COALESCE(c.credits, 0) - COALESCE(c.debits, 0)
               AS expected,
           COALESCE(CASE WHEN c.account IS NULL THEN a.version = 0 AND a.balance = a.opening_balance
                ELSE c.bad_links = 0 AND c.first_before = CAST(a.opening_balance AS NUMERIC)
                     AND c.last_after = a.balance AND c.last_version = a.version
           END, false) AS chain_ok
    FROM accounts a LEFT JOIN chains c ON c.account = a.id
), judged AS (
    SELECT id, balance, opening_balance, expected, chain_ok, broken_at, last_version,
           (CAST(balance AS NUMERIC) = expected) IS NOT TRUE AS mismatched
    FROM status
), totals AS (
    SELECT CAST(COUNT(*) AS INT8) AS accounts,
           (SELECT CAST(COUNT(*) AS INT8) FROM transfers) AS transfers,
           CAST(COALESCE(SUM(balance), 0) AS TEXT) AS total_balance,
           CAST(COALESCE(SUM(opening_balance), 0) AS TEXT) AS total_opening_balance,
           CAST(COUNT(*) FILTER (WHERE balance < 0) AS INT8) AS negative_balances,
           CAST(COUNT(*) FILTER (WHERE mismatched) AS INT8) AS mismatched_accounts,
           CAST(COUNT(*) FILTER (WHERE NOT chain_ok) AS INT8) AS broken_chains
    FROM judged
), listed AS (
    SELECT id, balance, CAST(expected AS TEXT) AS expected, chain_ok, broken_at, last_version
    FROM judged
    WHERE balance < 0 OR mismatched OR NOT chain_ok
    ORDER BY id LIMIT $1
)
SELECT t.*, l.id, l.balance, l.expected, l.chain_ok, l.broken_at, l.last_version
FROM totals t LEFT JOIN listed l ON true
ORDER BY l.id";

/// Checks the invariants in one read-only serializable transaction (one consistent snapshot);
/// on a hot standby, which refuses SERIALIZABLE, in one read-only REPEATABLE READ transaction.
///
/// One snapshot is all the check needs. A transfer changes both balances and versions and
/// writes its ledger row in one transaction, and the transfers of one account are ordered by
/// that account's row (its row lock, at every isolation level), so any snapshot holds whole
/// transfers only, and of each account a prefix of its chain: each account's balance and chain
/// hold in it exactly when they hold in that account's history, and the totals, sums of
/// zero-sum transfers, hold in any set of whole transfers. What SERIALIZABLE adds for a
/// read-only transaction (no snapshot that no serial order of the writers could produce, the
/// read-only anomaly) is about orders between transfers that share no account, which no
/// invariant here relates. A standby's snapshot is, moreover, a state the primary had (WAL is
/// replayed in commit order). SERIALIZABLE stays wherever the server allows it: a primary, and
/// CockroachDB, whose transactions are all serializable and which never gives this refusal.
pub fn verify(conn: &mut PgConnection) -> QueryResult<Report> {
    // NOT DEFERRABLE: a role's or database's `default_transaction_deferrable = on` made this
    // snapshot wait for every serializable read-write transaction open on the server (another
    // application's, a client paused mid-transfer) to end, and `verify` ended at its deadline.
    // One snapshot of whole transfers is all it needs (above). CockroachDB takes it as a no-op.
    match conn
        .build_transaction()
        .read_only()
        .serializable()
        .not_deferrable()
        .run(check)
    {
        Err(e) if crate::db::refuses_serializable(&e) => conn
            .build_transaction()
            .read_only()
            .repeatable_read()
            .run(check),
        other => other,
    }
}

/// The check itself, in whatever transaction `verify` opened.
fn check(conn: &mut PgConnection) -> QueryResult<Report> {
    crate::db::wait_out_rewrites(conn, "accounts, transfers")?;
    let rows: Vec<Row> = diesel::sql_query(CHECK)
        // One more than is listed, to tell whether the list is whole.
        .bind::<BigInt, _>(MAX_LISTED + 1)
        .load(conn)?;
    let Some(first) = rows.first() else {
        return Err(diesel::result::Error::NotFound);
    };
    let mut report = Report {
        ok: false,
        accounts: first.accounts,
        transfers: first.transfers,
        total_balance: repo::whole_number(&first.total_balance)?,
        total_opening_balance: repo::whole_number(&first.total_opening_balance)?,
        negative_balances: first.negative_balances,
        mismatched_accounts: first.mismatched_accounts,
        broken_chains: first.broken_chains,
        violations: Vec::new(),
        violations_truncated: false,
    };
    // A row without an id is the totals' alone (no violation to list); a listed
    // account's balance and expectation may each be missing.
    for row in &rows {
        if let Some(id) = row.id {
            report.violations.push(Violation {
                id,
                balance: row.balance,
                expected: row
                    .expected
                    .as_deref()
                    .map(repo::whole_number)
                    .transpose()?,
                chain_ok: row.chain_ok.unwrap_or(false),
                chain_broken_at: row.broken_at,
                last_entry_version: row.last_version,
            });
        }
    }
    if report.violations.len() as i64 > MAX_LISTED {
        report.violations.truncate(MAX_LISTED as usize);
        report.violations_truncated = true;
    }
    report.ok = report.negative_balances == 0
        && report.mismatched_accounts == 0
        && report.broken_chains == 0
        && report.total_balance == report.total_opening_balance;
    Ok(report)
}

/// The human-readable report.
impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = |ok: bool| if ok { "ok" } else { "VIOLATED" };
        writeln!(f, "accounts: {}", self.accounts)?;
        writeln!(f, "transfers in the ledger: {}", self.transfers)?;
        writeln!(
            f,
            "total balance: {} (opening total {}): {}",
            self.total_balance,
            self.total_opening_balance,
            mark(self.total_balance == self.total_opening_balance)
        )?;
        writeln!(
            f,
            "negative balances: {}: {}",
            self.negative_balances,
            mark(self.negative_balances == 0)
        )?;
        writeln!(
            f,
            "balances that disagree with the ledger: {}: {}",
            self.mismatched_accounts,
            mark(self.mismatched_accounts == 0)
        )?;
        writeln!(
            f,
            "broken chains of entries: {}: {}",
            self.broken_chains,
            mark(self.broken_chains == 0)
        )?;
        for v in &self.violations {
            // Where it breaks, so that `bank history ACCOUNT` shows the entry to look at.
            let chain = match (v.chain_ok, v.chain_broken_at, v.last_entry_version) {
                (true, _, _) => String::new(),
                (false, Some(at), _) => format!(", chain broken at version {at}"),
                (false, None, Some(last)) => format!(
                    ", chain broken after its last entry (version {last}): the account's \
                     balance or version does not match it"
                ),
                (false, None, None) => {
                    ", chain broken: no entries, yet the account is not as opened".to_string()
                }
            };
            let balance = v
                .balance
                .map_or_else(|| "none (NULL)".to_string(), |b| b.to_string());
            let expected = v.expected.map_or_else(
                || "nothing (no opening balance)".to_string(),
                |e| e.to_string(),
            );
            writeln!(
                f,
                "  account {}: balance {balance}, ledger says {expected}{chain}",
                v.id
            )?;
        }
        // 30 bad accounts showed 20 lines and nothing said there were more.
        if self.violations_truncated {
            writeln!(
                f,
                "  (the first {MAX_LISTED} accounts only; the counts above are for all of them)"
            )?;
        }
        writeln!(
            f,
            "{}",
            if self.ok {
                "verify: ok"
            } else {
                "verify: FAILED"
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_cut_at_its_limit_says_so() {
        let v = Violation {
            id: Uuid::nil(),
            balance: Some(1),
            expected: Some(2),
            chain_ok: true,
            chain_broken_at: None,
            last_entry_version: None,
        };
        let mut report = Report {
            ok: false,
            accounts: 30,
            transfers: 0,
            total_balance: 30,
            total_opening_balance: 60,
            negative_balances: 0,
            mismatched_accounts: 30,
            broken_chains: 0,
            violations: vec![v.clone(); MAX_LISTED as usize],
            violations_truncated: true,
        };
        assert!(report.to_string().contains("the first 20 accounts only"));
        report.violations.truncate(3);
        report.violations_truncated = false;
        assert!(!report.to_string().contains("the first"));
    }
}
