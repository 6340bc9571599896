//! Moving money: the body (one statement on a given connection, no transaction of its own) and
//! the runner (a transaction inside the retry loop, exactly once through the ledger, within a
//! deadline).
//!
//! The body is a single statement. It first locks both account rows with
//! `SELECT … ORDER BY id FOR UPDATE`, so every transfer takes its two row locks in key order
//! whatever plan the engine picks for the `UPDATE` (PostgreSQL's bitmap heap scan locks in heap
//! order, which deadlocked concurrent transfers at READ COMMITTED; `tests/promise.rs` shows the
//! order). Then one `UPDATE … CASE` moves both balances and a CTE inserts the ledger row.
//! Constraints check the rest: `CHECK (balance >= 0)` (23514), the ledger's foreign keys (23503),
//! its primary key (23505). The engine may check them in any order (PostgreSQL runs the
//! unreferenced ledger CTE after the `UPDATE`), so a refusal is never final until the ledger has
//! been asked whether this transfer id is already there. CockroachDB refuses two modifications of
//! one table in a statement; this one modifies two different tables.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use diesel::pg::{Pg, PgConnection};
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{BigInt, Uuid as SqlUuid};
use serde::Serialize;

use crate::db::Session;
use crate::error::{is_not_migrated, TransferError};
use crate::guard::{GaveUp, Ticket};
use crate::models::{NewTransfer, Transfer};
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
    pub timeout: u64,
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
            Cause::Timeout => self.timeout,
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
            Cause::Timeout => &mut self.timeout,
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
/// reason retrying cannot fix, or `policy` (attempts, deadline) is exhausted. After an ambiguous
/// outcome the ledger decides: the row is there (the earlier attempt committed) or the transfer
/// runs again; a failure is then final only when a rerun got past the transfer's row locks and
/// was refused on its merits, and anything else is reported as an unknown outcome.
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
    run_watched(session, t, mode, policy, retries, &Ticket::new())
}

/// `run` on a thread of its own, given up at the deadline even when the database never answers
/// (a frozen server). The session is consumed: one the caller gave up on is never used again.
pub fn run_guarded(
    mut session: Session,
    t: &NewTransfer,
    mode: Mode,
    policy: &RetryPolicy,
) -> Result<Receipt, TransferError> {
    validate(t)?;
    let ticket = Ticket::new();
    let (tx, rx) = mpsc::channel();
    let (t, policy, runner_ticket) = (*t, *policy, ticket.clone());
    let started = Instant::now();
    std::thread::spawn(move || {
        let result = run_watched(
            &mut session,
            &t,
            mode,
            &policy,
            &mut RetryCounts::default(),
            &runner_ticket,
        );
        let _ = tx.send(result);
    });
    // The runner watches the same deadline between attempts; the grace lets it report its own,
    // more precise, result when it is not stuck.
    let wait = policy.timeout + GRACE;
    match rx.recv_timeout(wait) {
        Ok(result) => result,
        Err(_) => match ticket.abandon() {
            None => rx
                .recv()
                .unwrap_or_else(|_| Err(gave_up(&t, GaveUp::Unknown, started))),
            Some(how) => Err(gave_up(&t, how, started)),
        },
    }
}

/// How long a caller waits past the deadline for the runner's own answer.
pub const GRACE: Duration = Duration::from_millis(200);

/// The error for a transfer its caller stopped waiting for.
pub fn gave_up(t: &NewTransfer, how: GaveUp, started: Instant) -> TransferError {
    let reason = format!(
        "no answer from the database within {:.1}s",
        started.elapsed().as_secs_f64()
    );
    match how {
        GaveUp::NotApplied => TransferError::NotApplied { id: t.id, reason },
        GaveUp::Unknown => TransferError::OutcomeUnknown { id: t.id, reason },
    }
}

/// `run_counted` reporting its progress on `ticket`, so that a caller on another thread can give
/// up on it and know what to report (see `guard`).
pub fn run_watched(
    session: &mut Session,
    t: &NewTransfer,
    mode: Mode,
    policy: &RetryPolicy,
    retries: &mut RetryCounts,
    ticket: &Ticket,
) -> Result<Receipt, TransferError> {
    validate(t)?;
    let started = Instant::now();
    let deadline = started.checked_add(policy.timeout);
    let mut rng = rand::rng();
    let mut attempts = 0;
    let mut ambiguous = false;
    let mut last = String::from("none");
    loop {
        if ticket.is_abandoned() {
            // Whatever happens now is nobody's result: stop touching the database.
            return Err(TransferError::Abandoned);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let reason = format!(
                "timed out after {:.1}s ({attempts} attempts); last error: {last}",
                started.elapsed().as_secs_f64()
            );
            return Err(unsettled(t, ambiguous, reason));
        }
        attempts += 1;
        log::debug!("transfer {}: attempt {attempts} ({mode:?})", t.id);
        let began = Instant::now();
        // A connection that was open before this attempt may have died while idle (a server
        // restart, a killed backend); losing it before COMMIT says nothing about this transfer.
        let reused = session.is_connected();
        match attempt(session, t, mode, ambiguous, ticket) {
            Ok(already_applied) => {
                log::debug!(
                    "transfer {}: attempt {attempts} committed in {:?}",
                    t.id,
                    began.elapsed()
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
                if ambiguous && !e.is_refusal() {
                    return Err(TransferError::OutcomeUnknown {
                        id: t.id,
                        reason: format!("an attempt's outcome was ambiguous, then: {e}"),
                    });
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
                if cause == Cause::Ambiguous {
                    ambiguous = true;
                    ticket.mark_ambiguous();
                }
                if cause.needs_reconnect() {
                    session.reset();
                }
                last = message;
                if cause == Cause::ConnectionLost && reused {
                    // Nothing was applied: retry at once on a fresh connection, without spending
                    // an attempt. Bounded: the next attempt's connection is new, so it counts.
                    attempts -= 1;
                    continue;
                }
                if attempts >= policy.max_attempts {
                    let reason = format!("gave up after {attempts} attempts; last error: {last}");
                    return Err(unsettled(t, ambiguous, reason));
                }
                let mut pause = policy.backoff(attempts, &mut rng);
                if let Some(d) = deadline {
                    pause = pause.min(d.saturating_duration_since(Instant::now()));
                }
                log::debug!("transfer {}: backing off {pause:?}", t.id);
                std::thread::sleep(pause);
            }
        }
    }
}

/// The error for a transfer given up on while it was not refused: not applied, unless an
/// attempt's outcome was ambiguous and never settled.
fn unsettled(t: &NewTransfer, ambiguous: bool, reason: String) -> TransferError {
    if ambiguous {
        TransferError::OutcomeUnknown { id: t.id, reason }
    } else {
        TransferError::NotApplied { id: t.id, reason }
    }
}

/// One attempt. `Ok(true)` when the ledger already had the transfer from an earlier run.
fn attempt(
    session: &mut Session,
    t: &NewTransfer,
    mode: Mode,
    after_ambiguous: bool,
    ticket: &Ticket,
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
        if let Some(found) = lookup(conn, t)? {
            log::debug!("transfer {}: found in the ledger, it committed", t.id);
            return resolve_duplicate(t, &found, false);
        }
        log::debug!("transfer {}: not in the ledger, running it again", t.id);
    }
    let mut committing = false;
    let result = match mode {
        Mode::Transaction => conn.build_transaction().serializable().run(|c| {
            apply(c, t)?;
            if !ticket.enter_commit() {
                return Err(BodyError::Abandoned);
            }
            committing = true;
            Ok::<_, BodyError>(())
        }),
        Mode::SingleStatement => {
            if !ticket.enter_commit() {
                return Err(abandoned());
            }
            committing = true;
            apply(conn, t)
        }
    };
    let outcome = match result {
        Ok(()) => Ok(false),
        Err(BodyError::Abandoned) => Err(abandoned()),
        Err(BodyError::Final(e)) => Err(AttemptError::Final(e)),
        // Refused, or the id is taken: the ledger has the last word on this id.
        Err(BodyError::Refused(e)) => match lookup(conn, t)? {
            Some(found) => {
                log::debug!("transfer {}: refused ({e}), but the ledger has it", t.id);
                resolve_duplicate(t, &found, !after_ambiguous)
            }
            None => Err(AttemptError::Final(e)),
        },
        Err(BodyError::DuplicateId) => match lookup(conn, t)? {
            Some(found) => resolve_duplicate(t, &found, !after_ambiguous),
            None => Err(AttemptError::Retry {
                cause: Cause::Serialization,
                message: format!("transfer {} was reported a duplicate but is absent", t.id),
            }),
        },
        Err(BodyError::Database(e)) => {
            // A COMMIT (or the statement that is its own commit) whose answer was lost may have
            // been applied; so may a COMMIT that failed in a way the classifier does not know.
            let phase = if committing {
                Phase::Commit
            } else {
                Phase::BeforeCommit
            };
            match classify(&e, phase) {
                Some(cause) => Err(AttemptError::Retry {
                    cause,
                    message: e.to_string(),
                }),
                None if is_not_migrated(&e) => Err(AttemptError::Final(TransferError::NotMigrated)),
                None if committing && mode == Mode::Transaction => Err(AttemptError::Retry {
                    cause: Cause::Ambiguous,
                    message: format!("COMMIT failed: {e}"),
                }),
                // The statement that is its own commit failed in a way nobody classified: the
                // server says it rolled back, but a middlebox may have said it instead. One
                // look at the ledger costs little and makes "applied" exact.
                None if committing => match lookup(conn, t)? {
                    Some(found) => {
                        log::debug!("transfer {}: failed ({e}), but the ledger has it", t.id);
                        resolve_duplicate(t, &found, false)
                    }
                    None => Err(AttemptError::Final(TransferError::Database(e))),
                },
                None => Err(AttemptError::Final(TransferError::Database(e))),
            }
        }
    };
    if committing {
        let maybe_applied = matches!(
            outcome,
            Ok(_)
                | Err(AttemptError::Retry {
                    cause: Cause::Ambiguous,
                    ..
                })
        );
        ticket.leave_commit(maybe_applied);
    }
    outcome
}

fn abandoned() -> AttemptError {
    AttemptError::Final(TransferError::Abandoned)
}

/// The ledger row of `t`'s id, if any. A failed lookup is retried like a lost connection: until
/// the ledger answers, no verdict can be given.
fn lookup(conn: &mut PgConnection, t: &NewTransfer) -> Result<Option<Transfer>, AttemptError> {
    repo::find_transfer(conn, t.id).map_err(|e| match classify(&e, Phase::BeforeCommit) {
        Some(cause) => AttemptError::Retry {
            cause,
            message: e.to_string(),
        },
        None if is_not_migrated(&e) => AttemptError::Final(TransferError::NotMigrated),
        None => AttemptError::Final(TransferError::Database(e)),
    })
}

fn resolve_duplicate(
    t: &NewTransfer,
    found: &Transfer,
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
