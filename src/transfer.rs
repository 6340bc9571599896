//! Moving money: the body (one statement on a given connection, no transaction of its own) and
//! the runner (a serializable transaction inside the retry loop, exactly once through the ledger).
//!
//! The body is a single statement: the ledger row is inserted by a CTE and both balances move in
//! one `UPDATE … CASE … WHERE id IN (…)`. One round trip does the whole transfer, and the
//! constraints check it: `CHECK (balance >= 0)` rejects insufficient funds (23514), the ledger's
//! foreign keys reject an unknown account (23503) and its primary key a transfer id that was
//! already applied (23505). The `UPDATE` reaches its two rows through the primary key index in
//! key order, so two transfers always lock their rows in the same order. CockroachDB refuses two
//! modifications of one table in a statement; this statement modifies two different tables.

use std::time::Instant;

use diesel::pg::{Pg, PgConnection};
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{BigInt, Uuid as SqlUuid};
use serde::Serialize;

use crate::db::Session;
use crate::error::{is_not_migrated, TransferError};
use crate::models::NewTransfer;
use crate::repo;
use crate::retry::{classify, Cause, Phase, RetryPolicy};

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
        out.push_sql("WITH ledger AS (INSERT INTO transfers (id, from_id, to_id, amount) VALUES (");
        out.push_bind_param::<SqlUuid, _>(&t.id)?;
        out.push_sql(", ");
        out.push_bind_param::<SqlUuid, _>(&t.from_id)?;
        out.push_sql(", ");
        out.push_bind_param::<SqlUuid, _>(&t.to_id)?;
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&t.amount)?;
        out.push_sql(") RETURNING id) UPDATE accounts SET balance = balance + CASE WHEN id = ");
        out.push_bind_param::<SqlUuid, _>(&t.from_id)?;
        out.push_sql(" THEN -");
        out.push_bind_param::<BigInt, _>(&t.amount)?;
        out.push_sql(" ELSE ");
        out.push_bind_param::<BigInt, _>(&t.amount)?;
        out.push_sql(" END WHERE id IN (");
        out.push_bind_param::<SqlUuid, _>(&t.from_id)?;
        out.push_sql(", ");
        out.push_bind_param::<SqlUuid, _>(&t.to_id)?;
        out.push_sql(")");
        Ok(())
    }
}

impl RunQueryDsl<PgConnection> for TransferStatement {}

/// How a transfer reaches the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// BEGIN ISOLATION LEVEL SERIALIZABLE; the transfer statement; COMMIT.
    #[default]
    Transaction,
    /// The transfer statement alone, as an implicit transaction: one round trip. CockroachDB
    /// retries such statements on the server; the client loop still covers what reaches it.
    SingleStatement,
}

/// Checks a request before it reaches the database.
pub fn validate(t: &NewTransfer) -> Result<(), TransferError> {
    if t.amount <= 0 {
        return Err(TransferError::NonPositiveAmount(t.amount));
    }
    if t.from_id == t.to_id {
        return Err(TransferError::SameAccount(t.from_id));
    }
    Ok(())
}

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

/// What the body can fail with: a domain error, the ledger saying the id is taken, or a
/// database error for the runner to classify.
#[derive(Debug)]
pub enum BodyError {
    Final(TransferError),
    DuplicateId,
    Database(DieselError),
}

impl BodyError {
    fn from_db(e: DieselError, t: &NewTransfer) -> BodyError {
        let DieselError::DatabaseError(kind, info) = &e else {
            return BodyError::Database(e);
        };
        // The statement can violate only these: the ledger's primary key, the balance and amount
        // checks, the two foreign keys. Constraint names (set in the migrations, so both engines
        // report the same ones) tell the checks and the foreign keys apart.
        let constraint = info.constraint_name().unwrap_or_default();
        let text = format!("{} {}", info.message(), info.details().unwrap_or_default());
        let names = |name: &str| constraint == name || text.contains(name);
        match kind {
            DatabaseErrorKind::UniqueViolation => BodyError::DuplicateId,
            DatabaseErrorKind::CheckViolation if names("transfers_amount_positive") => {
                BodyError::Final(TransferError::NonPositiveAmount(t.amount))
            }
            DatabaseErrorKind::CheckViolation => {
                BodyError::Final(TransferError::InsufficientFunds {
                    account: t.from_id,
                    amount: t.amount,
                })
            }
            DatabaseErrorKind::ForeignKeyViolation
                if names("transfers_to_id_fkey") || text.contains("(to_id)") =>
            {
                BodyError::Final(TransferError::UnknownAccount(t.to_id))
            }
            DatabaseErrorKind::ForeignKeyViolation => {
                BodyError::Final(TransferError::UnknownAccount(t.from_id))
            }
            _ if is_not_migrated(&e) => BodyError::Final(TransferError::NotMigrated),
            _ => BodyError::Database(e),
        }
    }
}

impl From<DieselError> for BodyError {
    fn from(e: DieselError) -> Self {
        BodyError::Database(e)
    }
}

/// Retries of one transfer (or of a whole workload), by cause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RetryCounts {
    pub serialization: u64,
    pub deadlock: u64,
    pub ambiguous: u64,
    pub connection_lost: u64,
}

impl RetryCounts {
    pub fn add(&mut self, cause: Cause) {
        *self.slot(cause) += 1;
    }

    pub fn merge(&mut self, other: &RetryCounts) {
        for cause in Cause::ALL {
            *self.slot(cause) += other.get(cause);
        }
    }

    pub fn get(&self, cause: Cause) -> u64 {
        match cause {
            Cause::Serialization => self.serialization,
            Cause::Deadlock => self.deadlock,
            Cause::Ambiguous => self.ambiguous,
            Cause::ConnectionLost => self.connection_lost,
        }
    }

    pub fn total(&self) -> u64 {
        Cause::ALL.iter().map(|c| self.get(*c)).sum()
    }

    fn slot(&mut self, cause: Cause) -> &mut u64 {
        match cause {
            Cause::Serialization => &mut self.serialization,
            Cause::Deadlock => &mut self.deadlock,
            Cause::Ambiguous => &mut self.ambiguous,
            Cause::ConnectionLost => &mut self.connection_lost,
        }
    }
}

/// A transfer that is in the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub transfer: NewTransfer,
    /// Attempts this call made (1 when the first one committed).
    pub attempts: u32,
    /// The ledger already held this transfer before this call: it was applied by an earlier run
    /// with the same id, and this call changed nothing.
    pub already_applied: bool,
    pub retries: RetryCounts,
}

/// An attempt's failure, as the loop sees it.
enum AttemptError {
    Final(TransferError),
    Retry { cause: Cause, message: String },
}

/// Applies `t` exactly once: validates it, runs it (in `mode`) until it commits, fails for a
/// reason retrying cannot fix, or `policy` is exhausted. After an ambiguous outcome the ledger
/// decides: the row is there (the earlier attempt committed) or the transfer runs again.
pub fn run(
    session: &mut Session,
    t: &NewTransfer,
    mode: Mode,
    policy: &RetryPolicy,
) -> Result<Receipt, TransferError> {
    run_counted(session, t, mode, policy, &mut RetryCounts::default())
}

/// `run`, adding each retry to `retries` as it happens, so callers that count retries (the
/// workload) see those of failed transfers too.
pub fn run_counted(
    session: &mut Session,
    t: &NewTransfer,
    mode: Mode,
    policy: &RetryPolicy,
    retries: &mut RetryCounts,
) -> Result<Receipt, TransferError> {
    validate(t)?;
    let mut rng = rand::rng();
    let mut attempts = 0;
    let mut ambiguous = false;
    loop {
        attempts += 1;
        log::debug!("transfer {}: attempt {attempts} ({mode:?})", t.id);
        let started = Instant::now();
        // Once an attempt's outcome was ambiguous, a duplicate id is that attempt's own commit.
        // A connection that was open before this attempt may have died while idle (a server
        // restart, a killed backend); losing it before COMMIT says nothing about this transfer.
        let reused = session.is_connected();
        let outcome = attempt(session, t, mode, ambiguous);
        match outcome {
            Ok(already_applied) => {
                log::debug!(
                    "transfer {}: attempt {attempts} committed in {:?}",
                    t.id,
                    started.elapsed()
                );
                return Ok(Receipt {
                    transfer: *t,
                    attempts,
                    already_applied,
                    retries: *retries,
                });
            }
            Err(AttemptError::Final(e)) => {
                log::debug!("transfer {}: attempt {attempts} failed: {e}", t.id);
                if ambiguous {
                    return settle(session, t, attempts, retries, e);
                }
                return Err(e);
            }
            Err(AttemptError::Retry { cause, message }) => {
                log::debug!(
                    "transfer {}: attempt {attempts} failed ({}): {message}",
                    t.id,
                    cause.as_str()
                );
                retries.add(cause);
                ambiguous |= cause == Cause::Ambiguous;
                if cause.needs_reconnect() {
                    session.reset();
                }
                if cause == Cause::ConnectionLost && reused {
                    // Nothing was applied: retry at once on a fresh connection, without spending
                    // an attempt. Bounded: the next attempt's connection is new, so it counts.
                    attempts -= 1;
                    continue;
                }
                if attempts >= policy.max_attempts {
                    return Err(TransferError::RetriesExhausted {
                        id: t.id,
                        attempts,
                        last: message,
                        outcome_unknown: ambiguous,
                    });
                }
                let pause = policy.backoff(attempts, &mut rng);
                log::debug!("transfer {}: backing off {pause:?}", t.id);
                std::thread::sleep(pause);
            }
        }
    }
}

/// A later attempt failed for good after an earlier one's outcome was ambiguous. The earlier one
/// may still have committed (at READ COMMITTED, say, the rerun waits for its locks, then finds the
/// funds gone), so the ledger has the last word before a failure is reported.
fn settle(
    session: &mut Session,
    t: &NewTransfer,
    attempts: u32,
    retries: &RetryCounts,
    error: TransferError,
) -> Result<Receipt, TransferError> {
    if matches!(
        error,
        TransferError::IdConflict { .. } | TransferError::NotMigrated
    ) {
        return Err(error);
    }
    let found = session
        .conn()
        .map_err(|e| e.to_string())
        .and_then(|conn| repo::find_transfer(conn, t.id).map_err(|e| e.to_string()));
    match found {
        Ok(Some(row)) if t.matches(&row) => {
            log::debug!("transfer {}: an earlier attempt committed after all", t.id);
            Ok(Receipt {
                transfer: *t,
                attempts,
                already_applied: false,
                retries: *retries,
            })
        }
        Ok(_) => Err(error),
        Err(lookup) => Err(TransferError::RetriesExhausted {
            id: t.id,
            attempts,
            last: format!("{error}; the ledger could not be read: {lookup}"),
            outcome_unknown: true,
        }),
    }
}

/// One attempt. `Ok(true)` when the ledger already had the transfer from an earlier run.
fn attempt(
    session: &mut Session,
    t: &NewTransfer,
    mode: Mode,
    after_ambiguous: bool,
) -> Result<bool, AttemptError> {
    let conn = session.conn().map_err(|e| {
        if e.is_transient() {
            AttemptError::Retry {
                cause: Cause::ConnectionLost,
                message: e.message,
            }
        } else {
            AttemptError::Final(TransferError::Connect(e))
        }
    })?;
    if after_ambiguous {
        match repo::find_transfer(conn, t.id) {
            Ok(Some(found)) => {
                log::debug!("transfer {}: found in the ledger, it committed", t.id);
                return resolve_duplicate(t, &found, false);
            }
            Ok(None) => log::debug!("transfer {}: not in the ledger, running it again", t.id),
            Err(e) => return Err(retry_or_final(e, Phase::BeforeCommit)),
        }
    }
    let mut phase = match mode {
        Mode::Transaction => Phase::BeforeCommit,
        // The statement is its own commit: losing the connection during it is ambiguous.
        Mode::SingleStatement => Phase::Commit,
    };
    let result = match mode {
        Mode::Transaction => conn.build_transaction().serializable().run(|c| {
            apply(c, t)?;
            phase = Phase::Commit;
            Ok::<_, BodyError>(())
        }),
        Mode::SingleStatement => apply(conn, t),
    };
    match result {
        Ok(()) => Ok(false),
        Err(BodyError::Final(e)) => Err(AttemptError::Final(e)),
        Err(BodyError::Database(e)) => Err(retry_or_final(e, phase)),
        Err(BodyError::DuplicateId) => {
            let found = repo::find_transfer(conn, t.id)
                .map_err(|e| retry_or_final(e, Phase::BeforeCommit))?
                .ok_or_else(|| AttemptError::Retry {
                    cause: Cause::Serialization,
                    message: format!("transfer {} was reported a duplicate but is absent", t.id),
                })?;
            resolve_duplicate(t, &found, !after_ambiguous)
        }
    }
}

fn resolve_duplicate(
    t: &NewTransfer,
    found: &crate::models::Transfer,
    already_applied: bool,
) -> Result<bool, AttemptError> {
    if t.matches(found) {
        Ok(already_applied)
    } else {
        Err(AttemptError::Final(TransferError::IdConflict {
            id: found.id,
            from: found.from_id,
            to: found.to_id,
            amount: found.amount,
        }))
    }
}

fn retry_or_final(e: DieselError, phase: Phase) -> AttemptError {
    match classify(&e, phase) {
        Some(cause) => AttemptError::Retry {
            cause,
            message: e.to_string(),
        },
        None if is_not_migrated(&e) => AttemptError::Final(TransferError::NotMigrated),
        None => AttemptError::Final(TransferError::Database(e)),
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
                "WITH ledger AS (INSERT INTO transfers (id, from_id, to_id, amount) \
                 VALUES ($1, $2, $3, $4) RETURNING id) \
                 UPDATE accounts SET balance = balance + CASE WHEN id = $5 THEN -$6 ELSE $7 END \
                 WHERE id IN ($8, $9) -- binds: [00000000-0000-0000-0000-000000000000, \
                 {a}, {b}, 100, {a}, 100, 100, {a}, {b}]"
            )
        );
        // One modification per table: CockroachDB refuses two on the same table.
        assert_eq!(sql.matches("UPDATE accounts").count(), 1);
        assert_eq!(sql.matches("INSERT INTO transfers").count(), 1);
    }

    // A static query id is what makes Diesel cache the prepared statement per connection.
    const _: () = assert!(TransferStatement::HAS_STATIC_QUERY_ID);

    #[test]
    fn validation_rejects_bad_requests_before_the_database() {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        let t = |from, to, amount| NewTransfer {
            id: Uuid::nil(),
            from_id: from,
            to_id: to,
            amount,
        };
        assert!(matches!(
            validate(&t(a, b, 0)),
            Err(TransferError::NonPositiveAmount(0))
        ));
        assert!(matches!(
            validate(&t(a, b, -5)),
            Err(TransferError::NonPositiveAmount(-5))
        ));
        assert!(matches!(
            validate(&t(a, a, 5)),
            Err(TransferError::SameAccount(_))
        ));
        assert!(validate(&t(a, b, 5)).is_ok());
    }
}
