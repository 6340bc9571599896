//! The transfer statement and what its errors mean.
//!
//! One statement does the whole transfer. It first locks both account rows with
//! `SELECT … ORDER BY id FOR UPDATE`, so every transfer takes its two row locks in key order
//! whatever plan the engine picks for the `UPDATE` (PostgreSQL's bitmap heap scan locks in heap
//! order, which deadlocked concurrent transfers at READ COMMITTED; `tests/promise.rs` shows the
//! order). Then one `UPDATE … CASE` moves both balances and a CTE inserts the ledger row.
//! Constraints check the rest: `CHECK (balance >= 0)` (23514), the ledger's foreign keys (23503),
//! its primary key (23505). The engine may check them in any order (PostgreSQL runs the
//! unreferenced ledger CTE after the `UPDATE`), so a refusal is never final until the ledger has
//! been asked whether this transfer id is already there (see `runner`). CockroachDB refuses two
//! modifications of one table in a statement; this one modifies two different tables.

use diesel::pg::{Pg, PgConnection};
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{BigInt, Uuid as SqlUuid};

use crate::error::TransferError;
use crate::models::NewTransfer;

/// The statement that applies a transfer, as a query type of its own rather than `sql_query`:
/// Diesel prepares it once per connection and caches it (it never caches `sql_query`), so each
/// transfer sends only Bind/Execute and the server skips parsing and planning.
#[derive(Debug, Clone, Copy, QueryId)]
pub struct TransferStatement {
    t: NewTransfer,
}

impl TransferStatement {
    pub fn new(t: &NewTransfer) -> Self {
        TransferStatement { t: *t }
    }
}

impl QueryFragment<Pg> for TransferStatement {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let t = &self.t;
        out.push_sql("WITH locked AS (SELECT id FROM accounts WHERE id IN (");
        out.push_bind_param::<SqlUuid, _>(&t.from_id)?;
        out.push_sql(", ");
        out.push_bind_param::<SqlUuid, _>(&t.to_id)?;
        out.push_sql(") ORDER BY id FOR UPDATE), ");
        out.push_sql("ledger AS (INSERT INTO transfers (id, from_id, to_id, amount) VALUES (");
        out.push_bind_param::<SqlUuid, _>(&t.id)?;
        out.push_sql(", ");
        out.push_bind_param::<SqlUuid, _>(&t.from_id)?;
        out.push_sql(", ");
        out.push_bind_param::<SqlUuid, _>(&t.to_id)?;
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&t.amount)?;
        out.push_sql(
            ") RETURNING id) UPDATE accounts SET balance = accounts.balance + CASE WHEN accounts.id = ",
        );
        out.push_bind_param::<SqlUuid, _>(&t.from_id)?;
        out.push_sql(" THEN -");
        out.push_bind_param::<BigInt, _>(&t.amount)?;
        out.push_sql(" ELSE ");
        out.push_bind_param::<BigInt, _>(&t.amount)?;
        out.push_sql(" END FROM locked WHERE accounts.id = locked.id");
        Ok(())
    }
}

impl RunQueryDsl<PgConnection> for TransferStatement {}

/// The transfer body: applies `t` on `conn` in whatever transaction `conn` is in. Opens none.
pub fn apply(conn: &mut PgConnection, t: &NewTransfer) -> Result<(), BodyError> {
    let rows = TransferStatement::new(t)
        .execute(conn)
        .map_err(|e| BodyError::from_db(e, t))?;
    log::debug!("transfer {}: {rows} account rows updated", t.id);
    // The foreign keys guarantee both rows exist, so anything else is a bug in the statement:
    // refuse it, which rolls the transaction back (in single-statement mode it has committed,
    // and the error at least says so loudly).
    if rows != 2 {
        return Err(BodyError::Final(TransferError::Database(
            DieselError::QueryBuilderError(
                format!("transfer statement updated {rows} accounts, expected 2").into(),
            ),
        )));
    }
    Ok(())
}

/// What the body can fail with: the database refusing the transfer on its merits (final only
/// once the ledger has been asked about the id), another final error, the ledger saying the id
/// is taken, or a database error for the runner to classify.
#[derive(Debug)]
pub enum BodyError {
    Refused(TransferError),
    Final(TransferError),
    DuplicateId,
    Database(DieselError),
    /// The caller gave up before the COMMIT could be sent (see `guard`).
    Abandoned,
}

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
        match kind {
            DatabaseErrorKind::UniqueViolation => BodyError::DuplicateId,
            DatabaseErrorKind::CheckViolation if names("transfers_amount_positive") => {
                BodyError::Final(TransferError::NonPositiveAmount(t.amount))
            }
            DatabaseErrorKind::CheckViolation if names("transfers_distinct_accounts") => {
                BodyError::Final(TransferError::SameAccount(t.from_id))
            }
            DatabaseErrorKind::CheckViolation => {
                BodyError::Refused(TransferError::InsufficientFunds {
                    account: t.from_id,
                    amount: t.amount,
                })
            }
            DatabaseErrorKind::ForeignKeyViolation
                if names("transfers_to_id_fkey") || text.contains("(to_id)") =>
            {
                BodyError::Refused(TransferError::UnknownAccount(t.to_id))
            }
            DatabaseErrorKind::ForeignKeyViolation => {
                BodyError::Refused(TransferError::UnknownAccount(t.from_id))
            }
            // 22003: only the credited balance can leave INT8's range (the debit is checked).
            _ if info.message().contains("out of range") => {
                BodyError::Refused(TransferError::BalanceOverflow {
                    account: t.to_id,
                    amount: t.amount,
                })
            }
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
        let q = TransferStatement::new(&t);
        let sql = debug_query::<Pg, _>(&q).to_string();
        let (a, b) = (
            "00000000-0000-0000-0000-000000000001",
            "00000000-0000-0000-0000-000000000002",
        );
        assert_eq!(
            sql,
            format!(
                "WITH locked AS (SELECT id FROM accounts WHERE id IN ($1, $2) \
                 ORDER BY id FOR UPDATE), \
                 ledger AS (INSERT INTO transfers (id, from_id, to_id, amount) \
                 VALUES ($3, $4, $5, $6) RETURNING id) \
                 UPDATE accounts SET balance = accounts.balance + CASE WHEN accounts.id = $7 \
                 THEN -$8 ELSE $9 END FROM locked WHERE accounts.id = locked.id \
                 -- binds: [{a}, {b}, 00000000-0000-0000-0000-000000000000, \
                 {a}, {b}, 100, {a}, 100, 100]"
            )
        );
        // One modification per table: CockroachDB refuses two on the same table.
        assert_eq!(sql.matches("UPDATE accounts").count(), 1);
        assert_eq!(sql.matches("INSERT INTO transfers").count(), 1);
    }

    // A static query id is what makes Diesel cache the prepared statement per connection.
    const _: () = assert!(TransferStatement::HAS_STATIC_QUERY_ID);
}
