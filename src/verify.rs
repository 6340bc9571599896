//! `bank verify`: the invariants of a bank, checked against the ledger without changing anything.
//! Every account's balance is non-negative and equals its opening balance plus the credits minus
//! the debits the ledger records for it, so money is neither created nor lost.

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Uuid as SqlUuid};
use serde::Serialize;
use uuid::Uuid;

/// Accounts listed individually in a report; the counts cover the rest.
const MAX_LISTED: i64 = 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub ok: bool,
    pub accounts: i64,
    pub transfers: i64,
    pub total_balance: i64,
    pub total_opening_balance: i64,
    pub negative_balances: i64,
    pub mismatched_accounts: i64,
    /// Up to 20 accounts whose balance is negative or disagrees with the ledger.
    pub violations: Vec<Violation>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, QueryableByName)]
pub struct Violation {
    #[diesel(sql_type = SqlUuid)]
    pub id: Uuid,
    #[diesel(sql_type = BigInt)]
    pub balance: i64,
    /// opening balance + credits - debits
    #[diesel(sql_type = BigInt)]
    pub expected: i64,
}

#[derive(QueryableByName)]
struct Totals {
    #[diesel(sql_type = BigInt)]
    accounts: i64,
    #[diesel(sql_type = BigInt)]
    transfers: i64,
    #[diesel(sql_type = BigInt)]
    total_balance: i64,
    #[diesel(sql_type = BigInt)]
    total_opening_balance: i64,
    #[diesel(sql_type = BigInt)]
    negative_balances: i64,
    #[diesel(sql_type = BigInt)]
    mismatched_accounts: i64,
}

/// Each account with what the ledger says its balance should be. SUM of INT8 is NUMERIC on
/// PostgreSQL and DECIMAL on CockroachDB: cast back to INT8 on both.
const EXPECTED: &str = "SELECT a.id, a.balance, a.opening_balance, \
CAST(a.opening_balance + COALESCE(c.total, 0) - COALESCE(d.total, 0) AS INT8) AS expected \
FROM accounts a \
LEFT JOIN (SELECT to_id AS id, SUM(amount) AS total FROM transfers GROUP BY to_id) c ON c.id = a.id \
LEFT JOIN (SELECT from_id AS id, SUM(amount) AS total FROM transfers GROUP BY from_id) d ON d.id = a.id";

/// Checks the invariants in one read-only serializable transaction (one consistent snapshot).
pub fn verify(conn: &mut PgConnection) -> QueryResult<Report> {
    conn.build_transaction()
        .read_only()
        .serializable()
        .run(|conn| {
            let totals: Totals = diesel::sql_query(format!(
                "SELECT CAST(COUNT(*) AS INT8) AS accounts, \
                 (SELECT CAST(COUNT(*) AS INT8) FROM transfers) AS transfers, \
                 CAST(COALESCE(SUM(balance), 0) AS INT8) AS total_balance, \
                 CAST(COALESCE(SUM(opening_balance), 0) AS INT8) AS total_opening_balance, \
                 CAST(COUNT(*) FILTER (WHERE balance < 0) AS INT8) AS negative_balances, \
                 CAST(COUNT(*) FILTER (WHERE balance <> expected) AS INT8) AS mismatched_accounts \
                 FROM ({EXPECTED}) e"
            ))
            .get_result(conn)?;
            let violations: Vec<Violation> = diesel::sql_query(format!(
                "SELECT id, balance, expected FROM ({EXPECTED}) e \
                 WHERE balance < 0 OR balance <> expected ORDER BY id LIMIT $1"
            ))
            .bind::<BigInt, _>(MAX_LISTED)
            .load(conn)?;
            let ok = totals.negative_balances == 0
                && totals.mismatched_accounts == 0
                && totals.total_balance == totals.total_opening_balance;
            Ok(Report {
                ok,
                accounts: totals.accounts,
                transfers: totals.transfers,
                total_balance: totals.total_balance,
                total_opening_balance: totals.total_opening_balance,
                negative_balances: totals.negative_balances,
                mismatched_accounts: totals.mismatched_accounts,
                violations,
            })
        })
}

impl Report {
    /// The human-readable report.
    pub fn render(&self) -> String {
        let mark = |ok: bool| if ok { "ok" } else { "VIOLATED" };
        let mut out = format!(
            "accounts: {}\ntransfers in the ledger: {}\n\
             total balance: {} (opening total {}): {}\n\
             negative balances: {}: {}\n\
             balances that disagree with the ledger: {}: {}\n",
            self.accounts,
            self.transfers,
            self.total_balance,
            self.total_opening_balance,
            mark(self.total_balance == self.total_opening_balance),
            self.negative_balances,
            mark(self.negative_balances == 0),
            self.mismatched_accounts,
            mark(self.mismatched_accounts == 0),
        );
        for v in &self.violations {
            out.push_str(&format!(
                "  account {}: balance {}, ledger says {}\n",
                v.id, v.balance, v.expected
            ));
        }
        out.push_str(if self.ok {
            "verify: ok\n"
        } else {
            "verify: FAILED\n"
        });
        out
    }
}
