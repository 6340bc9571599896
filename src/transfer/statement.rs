//! The transfer statement and what its errors mean.
//!
//! One statement does the whole transfer:
//! 1. `locked` takes both account rows with `SELECT … ORDER BY id FOR UPDATE`, so every transfer
//!    locks its two rows in key order whatever plan the engine picks (PostgreSQL's bitmap heap
//!    scan locks in heap order, which deadlocked concurrent transfers at READ COMMITTED;
//!    `tests/promise.rs` shows the order);
//! 2. `moved` moves both balances and advances both accounts' versions in one `UPDATE … CASE`,
//!    returning the new values;
//! 3. the `INSERT` writes the ledger row with each side's version and balance after, so every
//!    entry describes itself and each account's entries form an exact chain.
//!
//! Constraints check the rest: `CHECK (balance >= 0)` (23514; the statement checks the debited
//! balance itself too, in case the CHECK was dropped), the ledger's primary key
//! (23505), NOT NULL on an entry's side when its account does not exist (23502). A credit past
//! INT8's range fails by a cast naming it (22P02), since the engine's own overflow (22003) names
//! no column. The engine may check them in any order, so a refusal is never final until the ledger
//! has been asked whether this transfer id is already there (see `runner`). CockroachDB refuses
//! two modifications of one table in a statement; this one modifies `accounts` once and
//! `transfers` once (and, in single-statement mode, `transfer_claims` once).

use diesel::pg::{Pg, PgConnection};
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{BigInt, Uuid as SqlUuid};

use crate::error::TransferError;
use crate::models::NewTransfer;

/// The statement that applies a transfer, as a query type of its own rather than `sql_query`:
/// Diesel prepares it once per connection and caches it (it never caches `sql_query`), so each
/// transfer sends only Bind/Execute and the server skips parsing and planning. `CLAIM`: the
/// statement also claims its id in `transfer_claims` (single-statement mode, see `apply_claiming`);
/// the two are two types, so that each is cached under its own id.
#[derive(Debug, Clone, Copy)]
pub struct TransferStatement<const CLAIM: bool = false> {
    t: NewTransfer,
    /// What the claim is marked with (`CLAIM` only): the run's own mark.
    mark: uuid::Uuid,
}

impl<const CLAIM: bool> QueryId for TransferStatement<CLAIM> {
    type QueryId = TransferStatement<CLAIM>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<const CLAIM: bool> TransferStatement<CLAIM> {
    pub fn new(t: &NewTransfer) -> Self {
        TransferStatement {
            t: *t,
            mark: uuid::Uuid::nil(),
        }
    }
}

impl<const CLAIM: bool> QueryFragment<Pg> for TransferStatement<CLAIM> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let t = &self.t;
        // 1. Both rows locked, in key order.
        out.push_sql("WITH locked AS (SELECT id, balance, version FROM accounts WHERE id IN (");
        out.push_bind_param::<SqlUuid, _>(&t.from_id)?;
        out.push_sql(", ");
        out.push_bind_param::<SqlUuid, _>(&t.to_id)?;
        out.push_sql(") ORDER BY id FOR UPDATE), ");
        // 2. Both balances move and both versions advance; the new values come back.
        // From the balance `locked` returned: at READ COMMITTED the UPDATE computes its SET on
        // the row as the statement's snapshot had it, before the update it waited for, and a
        // credit that fit the balance it met was refused, or its stale sum overflowed (found by a
        // reviewer). The lock keeps the row as `locked` returned it.
        out.push_sql("moved AS (UPDATE accounts SET balance = locked.balance + ");
        push_move(&mut out, t, true)?;
        // Whether each row was written as asked: a DBA's trigger that kept the old balance
        // (`NEW.balance := OLD.balance`) let bank say "moved" while no money moved (found by a
        // fault-injecting helper). `locked` holds the row as locked, the latest version at
        // READ COMMITTED as the update's own.
        out.push_sql(
            ", version = accounts.version + 1 FROM locked WHERE accounts.id = locked.id \
             RETURNING accounts.id, accounts.balance, accounts.version, \
             (accounts.version = locked.version + 1 AND accounts.balance = locked.balance + ",
        );
        push_move(&mut out, t, false)?;
        out.push_sql(") AS as_asked), ");
        // 3. The ledger row, with both sides' version and balance after. An unknown account has
        // no `moved` row: its side is NULL, which the NOT NULL columns refuse. Its time is taken
        // once both rows are locked (`clock_timestamp()`, not the transaction's start, `now()`):
        // each account's entries are then in time order as in version order, which
        // `balances --as-of` needs for its totals to add up (`tests/ledger.rs`).
        out.push_sql(
            "inserted AS (INSERT INTO transfers (id, from_id, to_id, amount, from_version, \
             from_balance_after, to_version, to_balance_after, created_at) SELECT ",
        );
        out.push_bind_param::<SqlUuid, _>(&t.id)?;
        out.push_sql(", ");
        out.push_bind_param::<SqlUuid, _>(&t.from_id)?;
        out.push_sql(", ");
        out.push_bind_param::<SqlUuid, _>(&t.to_id)?;
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&t.amount)?;
        out.push_sql(
            ", f.version, f.balance, t.version, t.balance, clock_timestamp() FROM (SELECT 1) AS one \
             LEFT JOIN moved f ON f.id = ",
        );
        out.push_bind_param::<SqlUuid, _>(&t.from_id)?;
        out.push_sql(" LEFT JOIN moved t ON t.id = ");
        out.push_bind_param::<SqlUuid, _>(&t.to_id)?;
        // 4. The statement fails unless its ledger row was written, so that its balances never
        // commit without it: a trigger on `transfers` that skips the row (BEFORE INSERT returning
        // NULL) left the money moved in single-statement mode, and every rerun of the id moved
        // it again. The failure is a cast both engines refuse (22P02), naming the reason. A row
        // a trigger changed (another amount, another id) counts as none: bank said "moved 5"
        // where the ledger said 10, and a rerun then called the id taken, or with another id
        // applied it again (found by a fault-injecting helper).
        out.push_sql(" RETURNING from_balance_after AS debited, (id = ");
        out.push_bind_param::<SqlUuid, _>(&t.id)?;
        out.push_sql(" AND from_id = ");
        out.push_bind_param::<SqlUuid, _>(&t.from_id)?;
        out.push_sql(" AND to_id = ");
        out.push_bind_param::<SqlUuid, _>(&t.to_id)?;
        out.push_sql(" AND amount = ");
        out.push_bind_param::<BigInt, _>(&t.amount)?;
        out.push_sql(") AS as_asked) ");
        // 5. Single-statement mode: the id claimed, so that this statement fails (23505 on
        // transfer_claims_pkey) if it reaches the server after a rerun claimed the id to say
        // "not applied" (see the migration). Unread, so it runs after the rest, locks held.
        if CLAIM {
            out.push_sql(", claimed AS (INSERT INTO transfer_claims (id, claimed_by) VALUES (");
            out.push_bind_param::<SqlUuid, _>(&t.id)?;
            out.push_sql(", ");
            out.push_bind_param::<SqlUuid, _>(&self.mark)?;
            out.push_sql(") RETURNING id) ");
        }
        // 6. Nor with the debited balance below zero: the CHECK on `accounts` refuses that first,
        // but one dropped by hand let a transfer overdraw (found by a fault-injecting helper).
        out.push_sql("SELECT CAST(CASE WHEN MIN(debited) < 0 THEN '");
        out.push_sql(BELOW_ZERO);
        out.push_sql("' WHEN EXISTS (SELECT 1 FROM moved WHERE NOT as_asked) THEN '");
        out.push_sql(BALANCES_NOT_AS_ASKED);
        out.push_sql(
            "' WHEN COUNT(*) = 1 AND MIN(CASE WHEN as_asked THEN 1 ELSE 0 END) = 1 THEN '1' ELSE '",
        );
        out.push_sql(NO_LEDGER_ROW);
        out.push_sql("' END AS INT8) FROM inserted");
        Ok(())
    }
}

impl<const CLAIM: bool> RunQueryDsl<PgConnection> for TransferStatement<CLAIM> {}

/// What `t` adds to the balance of the account row at hand: `-amount` to the debited one,
/// `amount` to the credited one. Written where the balance moves and where that is checked.
/// `within_range`: where it moves, the credit fails with `PAST_MAX` when it would take the
/// balance past INT8's largest value. The engine's own overflow (22003) named no reason: the
/// runner read the balances again to find one, and another client had often moved them since,
/// so a refusal was reported as the database's "bigint out of range" (found by a helper playing
/// a new user). Non-constant (it names the row), so that no engine folds the failing cast when
/// it plans.
fn push_move<'b>(
    out: &mut AstPass<'_, 'b, Pg>,
    t: &'b NewTransfer,
    within_range: bool,
) -> QueryResult<()> {
    out.push_sql("CASE WHEN accounts.id = ");
    out.push_bind_param::<SqlUuid, _>(&t.from_id)?;
    out.push_sql(" THEN -");
    out.push_bind_param::<BigInt, _>(&t.amount)?;
    if within_range {
        out.push_sql(" WHEN locked.balance <= 9223372036854775807 - ");
        out.push_bind_param::<BigInt, _>(&t.amount)?;
        out.push_sql(" THEN ");
        out.push_bind_param::<BigInt, _>(&t.amount)?;
        out.push_sql(" ELSE CAST('");
        out.push_sql(PAST_MAX);
        out.push_sql(" ' || CAST(accounts.id AS TEXT) AS INT8) END");
    } else {
        out.push_sql(" ELSE ");
        out.push_bind_param::<BigInt, _>(&t.amount)?;
        out.push_sql(" END");
    }
    Ok(())
}

/// The text of the error the statement raises when the credit would pass the largest balance.
const PAST_MAX: &str = "the credited balance would pass the largest one";

/// The text of the error the statement raises when its ledger row was not written.
const NO_LEDGER_ROW: &str = "the ledger row was not written";

/// The text of the error the statement raises when an account's row was not written as asked.
const BALANCES_NOT_AS_ASKED: &str = "the balances were not written as asked";

/// The text of the error the statement raises when the debit took a balance below zero.
const BELOW_ZERO: &str = "the debited balance would be below zero";

/// The transfer body: applies `t` on `conn` in whatever transaction `conn` is in. Opens none.
pub fn apply(conn: &mut PgConnection, t: &NewTransfer) -> Result<(), BodyError> {
    let rows = TransferStatement::<false>::new(t)
        .execute(conn)
        .map_err(|e| BodyError::from_db(e, t))?;
    checked(t, rows)
}

/// `apply` as single-statement mode sends it, outside any transaction: the statement also claims
/// its id, marked with `mark` (its run's: `repo::claim_mark` tells the run's own row from another
/// run's after the answer was lost), and fails with `BodyError::Claimed` if a rerun has claimed
/// it first.
pub fn apply_claiming(
    conn: &mut PgConnection,
    t: &NewTransfer,
    mark: uuid::Uuid,
) -> Result<(), BodyError> {
    let rows = TransferStatement::<true> { t: *t, mark }
        .execute(conn)
        .map_err(|e| BodyError::from_db(e, t))?;
    checked(t, rows)
}

fn checked(t: &NewTransfer, rows: usize) -> Result<(), BodyError> {
    log::debug!("transfer {}: {rows} ledger rows inserted", t.id);
    // The statement inserts its one row or fails, so anything else is a bug in it: refuse it,
    // which rolls the transaction back (in single-statement mode it has committed, and the
    // error at least says so loudly).
    if rows != 1 {
        return Err(BodyError::Final(TransferError::Database(
            DieselError::QueryBuilderError(
                format!("transfer statement inserted {rows} ledger rows, expected 1").into(),
            ),
        )));
    }
    Ok(())
}

/// A unique violation that names an index other than the ledger's primary key: each account's
/// (account, version) index (a version set back by hand), or a DBA's own. Not a reused id, which
/// the ledger would show: taken for one, it was retried until the deadline. One that names no
/// index is still taken for the id, as before names were read.
pub(crate) fn other_unique_index(constraint: &str, text: &str) -> bool {
    let named = !constraint.is_empty() || text.contains("unique constraint \"");
    named && constraint != "transfers_pkey" && !text.contains("\"transfers_pkey\"")
}

/// What the body can fail with: the database refusing the transfer on its merits (final only
/// once the ledger has been asked about the id), another final error, the ledger saying the id
/// is taken, or a database error for the runner to classify.
#[derive(Debug)]
pub enum BodyError {
    Refused(TransferError),
    /// 22003, a value out of range: a DBA's trigger overflowing a column of its own ("integer
    /// out of range", as CockroachDB words INT8's too). The statement names its own credit
    /// past INT8 (`PAST_MAX`); the balances read afterwards are asked all the same.
    OutOfRange(DieselError),
    Final(TransferError),
    DuplicateId,
    /// Single-statement mode: the id is claimed already (`apply_claiming`).
    Claimed,
    Database(DieselError),
    /// The caller gave up before the COMMIT could be sent (see `guard`).
    Abandoned,
}

/// The ledger's columns that are NULL when an account the transfer names does not exist (it
/// moved nothing, so its side of the entry is empty), and the two ids (never NULL: bound).
const ENTRY_COLUMNS: [&str; 6] = [
    "from_id",
    "to_id",
    "from_version",
    "from_balance_after",
    "to_version",
    "to_balance_after",
];

/// The ledger's foreign keys to the two accounts (named in the migrations).
const ACCOUNT_KEYS: [&str; 2] = ["transfers_from_id_fkey", "transfers_to_id_fkey"];

impl BodyError {
    fn from_db(e: DieselError, t: &NewTransfer) -> BodyError {
        let DieselError::DatabaseError(kind, info) = &e else {
            return BodyError::Database(e);
        };
        // The statement can violate only these: the ledger's primary key, the balance and amount
        // checks, the two foreign keys, the ledger's "two accounts" check, and the INT8 range.
        // Constraint names (set in the migrations, so both engines report the same ones) tell
        // the checks and the foreign keys apart.
        let constraint = info.constraint_name().unwrap_or_default();
        let text = format!("{} {}", info.message(), info.details().unwrap_or_default());
        let names = |name: &str| constraint == name || text.contains(name);
        // A NOT NULL or a foreign key of a DBA's table (an audit row a trigger writes) is not
        // one of the ledger's: its words are the answer, not "unknown account" (found by a
        // fault-injecting helper: "left unchanged by a trigger" hid a NOT NULL of audit2's).
        // Nor is one a DBA added to `transfers` itself (a column `approved_by NOT NULL`, a
        // tenant's foreign key): only the entry's columns and the two accounts' keys are the
        // ledger's (a helper playing a new user: "account … exists, but the database left it
        // unchanged (a trigger or rule …)" hid "null value in column \"approved_by\"", where
        // `transfer --file` gave those words).
        let own = match kind {
            DatabaseErrorKind::NotNullViolation => match info.column_name() {
                Some(column) => ENTRY_COLUMNS.contains(&column),
                None => {
                    !text.contains("column \"")
                        || ENTRY_COLUMNS
                            .iter()
                            .any(|c| text.contains(&format!("column \"{c}\"")))
                }
            },
            DatabaseErrorKind::ForeignKeyViolation => {
                constraint.is_empty() || ACCOUNT_KEYS.contains(&constraint)
            }
            _ => true,
        };
        let ledgers = own && info.table_name().is_none_or(|t| t == "transfers");
        match kind {
            DatabaseErrorKind::UniqueViolation if names("transfer_claims_pkey") => {
                BodyError::Claimed
            }
            DatabaseErrorKind::UniqueViolation if other_unique_index(constraint, &text) => {
                BodyError::Final(TransferError::Database(e))
            }
            DatabaseErrorKind::UniqueViolation => BodyError::DuplicateId,
            DatabaseErrorKind::CheckViolation if names("transfers_amount_positive") => {
                BodyError::Final(TransferError::NonPositiveAmount(t.amount))
            }
            DatabaseErrorKind::CheckViolation if names("transfers_distinct_accounts") => {
                BodyError::Final(TransferError::SameAccount(t.from_id))
            }
            DatabaseErrorKind::CheckViolation if names("accounts_balance_nonnegative") => {
                BodyError::Refused(TransferError::InsufficientFunds {
                    account: t.from_id,
                    amount: t.amount,
                })
            }
            DatabaseErrorKind::ForeignKeyViolation | DatabaseErrorKind::NotNullViolation
                if !ledgers =>
            {
                BodyError::Final(TransferError::Database(e))
            }
            DatabaseErrorKind::ForeignKeyViolation
                if names("transfers_to_id_fkey") || text.contains("(to_id)") =>
            {
                BodyError::Refused(TransferError::UnknownAccount(t.to_id))
            }
            DatabaseErrorKind::ForeignKeyViolation => {
                BodyError::Refused(TransferError::UnknownAccount(t.from_id))
            }
            // An account that does not exist moved nothing, so its side of the entry is NULL.
            DatabaseErrorKind::NotNullViolation
                if info.column_name().is_some_and(|c| c.starts_with("to_"))
                    || text.contains("\"to_") =>
            {
                BodyError::Refused(TransferError::UnknownAccount(t.to_id))
            }
            DatabaseErrorKind::NotNullViolation => {
                BodyError::Refused(TransferError::UnknownAccount(t.from_id))
            }
            // A check of someone else's (a DBA's cap on balances, say): not insufficient funds,
            // which every check was taken for; the database's words say which.
            DatabaseErrorKind::CheckViolation => BodyError::Final(TransferError::Database(e)),
            _ if info.message().contains(NO_LEDGER_ROW) => {
                BodyError::Final(TransferError::NoLedgerRow)
            }
            _ if info.message().contains(BALANCES_NOT_AS_ASKED) => {
                BodyError::Final(TransferError::AccountNotUpdated(None))
            }
            _ if info.message().contains(PAST_MAX) => {
                BodyError::Refused(TransferError::BalanceOverflow {
                    account: t.to_id,
                    amount: t.amount,
                })
            }
            _ if info.message().contains(BELOW_ZERO) => {
                BodyError::Refused(TransferError::InsufficientFunds {
                    account: t.from_id,
                    amount: t.amount,
                })
            }
            // 22003: none of the statement's own values (the credit is checked, as the debit).
            _ if info.message().contains("out of range") => BodyError::OutOfRange(e),
            _ => match TransferError::from(e) {
                TransferError::Database(e) => BodyError::Database(e),
                domain => BodyError::Final(domain),
            },
        }
    }
}

impl From<DieselError> for BodyError {
    fn from(e: DieselError) -> Self {
        BodyError::Database(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::debug_query;
    use uuid::Uuid;

    #[test]
    fn the_transfer_is_one_statement_on_two_tables_with_binds_only() {
        let t = NewTransfer {
            id: Uuid::nil(),
            from_id: Uuid::from_u128(1),
            to_id: Uuid::from_u128(2),
            amount: 100,
        };
        let q = TransferStatement::<false>::new(&t);
        let sql = debug_query::<Pg, _>(&q).to_string();
        let (a, b) = (
            "00000000-0000-0000-0000-000000000001",
            "00000000-0000-0000-0000-000000000002",
        );
        assert_eq!(
            sql,
            format!(
                "WITH locked AS (SELECT id, balance, version FROM accounts WHERE id IN ($1, $2) \
                 ORDER BY id FOR UPDATE), \
                 moved AS (UPDATE accounts SET balance = locked.balance + CASE WHEN \
                 accounts.id = $3 THEN -$4 WHEN locked.balance <= 9223372036854775807 - $5 \
                 THEN $6 ELSE CAST('the credited balance would pass the largest one ' || \
                 CAST(accounts.id AS TEXT) AS INT8) END, version = accounts.version + 1 \
                 FROM locked WHERE accounts.id = locked.id \
                 RETURNING accounts.id, accounts.balance, accounts.version, \
                 (accounts.version = locked.version + 1 AND accounts.balance = locked.balance + \
                 CASE WHEN accounts.id = $7 THEN -$8 ELSE $9 END) AS as_asked), \
                 inserted AS (INSERT INTO transfers (id, from_id, to_id, amount, from_version, \
                 from_balance_after, to_version, to_balance_after, created_at) \
                 SELECT $10, $11, $12, $13, f.version, f.balance, t.version, t.balance, \
                 clock_timestamp() FROM (SELECT 1) AS one LEFT JOIN moved f ON f.id = $14 \
                 LEFT JOIN moved t ON t.id = $15 RETURNING from_balance_after AS debited, \
                 (id = $16 AND from_id = $17 AND to_id = $18 AND amount = $19) AS as_asked) \
                 SELECT CAST(CASE WHEN MIN(debited) < 0 THEN 'the debited balance would be \
                 below zero' WHEN EXISTS (SELECT 1 FROM moved WHERE NOT as_asked) THEN 'the \
                 balances were not written as asked' WHEN COUNT(*) = 1 AND MIN(CASE WHEN \
                 as_asked THEN 1 ELSE 0 END) = 1 THEN '1' ELSE 'the ledger row was not written' \
                 END AS INT8) FROM inserted \
                 -- binds: [{a}, {b}, {a}, 100, 100, 100, {a}, 100, 100, \
                 00000000-0000-0000-0000-000000000000, {a}, {b}, 100, {a}, {b}, \
                 00000000-0000-0000-0000-000000000000, {a}, {b}, 100]"
            )
        );
        // One modification per table: CockroachDB refuses two on the same table.
        assert_eq!(sql.matches("UPDATE accounts").count(), 1);
        assert_eq!(sql.matches("INSERT INTO transfers").count(), 1);
    }

    #[test]
    fn single_statement_mode_claims_its_id_in_the_same_statement() {
        let t = NewTransfer {
            id: Uuid::nil(),
            from_id: Uuid::from_u128(1),
            to_id: Uuid::from_u128(2),
            amount: 100,
        };
        let sql = debug_query::<Pg, _>(&TransferStatement::<true>::new(&t)).to_string();
        assert!(
            sql.contains(
                "AS as_asked) , claimed AS (INSERT INTO transfer_claims (id, claimed_by) \
                 VALUES ($20, $21) RETURNING id) SELECT CAST"
            ),
            "{sql}"
        );
        assert_eq!(sql.matches("INSERT INTO transfer_claims").count(), 1);
        assert_ne!(
            std::any::TypeId::of::<<TransferStatement<true> as QueryId>::QueryId>(),
            std::any::TypeId::of::<<TransferStatement<false> as QueryId>::QueryId>(),
            "cached under different ids"
        );
    }

    // A static query id is what makes Diesel cache the prepared statement per connection.
    const _: () = assert!(TransferStatement::<false>::HAS_STATIC_QUERY_ID);
    const _: () = assert!(TransferStatement::<true>::HAS_STATIC_QUERY_ID);
}
