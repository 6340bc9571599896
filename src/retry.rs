//! When to try again, how long to wait first, and the one loop that does it: transfers, `verify`,
//! `reset` and the workload's final check all run through `retry`. Its shape is sqlx-cli's
//! `retry_connect_errors`: each attempt says whether its failure is transient (try again, with
//! its cause) or permanent, and the loop owns the rest (backoff, attempts, deadline, counts).
//!
//! Diesel 2.3 exposes no SQLSTATE, only an error kind (40001 is `SerializationFailure`; 40P01,
//! 40003 and 57P01 are all `Unknown`) and the server's message, so the classifier uses the kind
//! where Diesel maps it and the message where it does not. Messages are the same on PostgreSQL and
//! CockroachDB for the errors matched here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use rand::Rng;
use serde::Serialize;

/// Why an attempt is retried. Reported by `transfer -v` and counted by `workload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// 40001: the transaction was aborted and not applied; run it again.
    Serialization,
    /// 40P01 (PostgreSQL). Transfers lock their two rows in key order, which rules deadlocks out
    /// between transfers, but another client's statements may still lock rows in any order, and
    /// the victim's transaction was rolled back, so a retry is safe.
    Deadlock,
    /// 40003, or the connection was lost while COMMIT was in flight: the transaction may or may
    /// not have been applied. Resolve it through the ledger before running it again.
    Ambiguous,
    /// The connection was lost (or could not be opened) before COMMIT was sent: nothing was
    /// applied. Reconnect and run it again.
    ConnectionLost,
    /// 55P03 (`lock_timeout`) or 57014 (`statement_timeout`, a cancel): the server cancelled the
    /// statement and rolled its transaction back. Waiting on another transaction's locks is
    /// normal under contention, and those locks may belong to an orphaned attempt of this very
    /// transfer whose COMMIT has not arrived yet, so run it again.
    Timeout,
}

impl Cause {
    /// The attempt was held up rather than refused: it waited on another transaction's locks
    /// (a lock or statement timeout) or lost its server. The holder may be an earlier attempt of
    /// the same transfer still on its way to commit, so giving up after it proves nothing.
    pub fn is_held_up(self) -> bool {
        matches!(self, Cause::Timeout | Cause::ConnectionLost)
    }

    pub const ALL: [Cause; 5] = [
        Cause::Serialization,
        Cause::Deadlock,
        Cause::Ambiguous,
        Cause::ConnectionLost,
        Cause::Timeout,
    ];

    /// Whether the connection must be replaced before the next attempt.
    pub fn needs_reconnect(self) -> bool {
        matches!(self, Cause::Ambiguous | Cause::ConnectionLost)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Serialization => "serialization",
            Cause::Deadlock => "deadlock",
            Cause::Ambiguous => "ambiguous",
            Cause::ConnectionLost => "connection_lost",
            Cause::Timeout => "timeout",
        }
    }
}

/// Where in the transaction an error happened. A lost connection means "not applied" before
/// COMMIT was sent and "unknown" once it was (or for an implicit, single-statement transaction,
/// whose statement is its commit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    BeforeCommit,
    Commit,
}

/// Whether `--inject-retries` has shown enough: after this attempt's retry error, the session
/// turns CockroachDB's `inject_retry_errors_enabled` off. CockroachDB stops injecting after the
/// third retry only for clients that retry through its `cockroach_restart` savepoint; `bank`
/// rolls back and begins again, which CockroachDB keeps failing until the variable is off
/// (its session-variables documentation).
pub fn stop_injecting(attempt: u32, cause: Cause) -> bool {
    cause == Cause::Serialization && attempt >= 3
}

/// Classifies a Diesel error: `Some(cause)` when the transaction may be tried again, `None` when
/// the error is final.
pub fn classify(err: &DieselError, phase: Phase) -> Option<Cause> {
    let lost = match phase {
        Phase::BeforeCommit => Cause::ConnectionLost,
        Phase::Commit => Cause::Ambiguous,
    };
    match err {
        DieselError::DatabaseError(kind, info) => classify_database(kind, info.message(), lost),
        // COMMIT failed and so did the ROLLBACK after it: the connection is broken and whether the
        // COMMIT took effect is unknown.
        DieselError::RollbackErrorOnCommit { .. } => Some(Cause::Ambiguous),
        DieselError::BrokenTransactionManager => Some(lost),
        _ => None,
    }
}

/// Whether `e` rolled its transaction back for a conflict of the moment (a serialization
/// failure, a deadlock, a lock or statement timeout): the same work may simply run again.
pub fn rolled_back_by_conflict(e: &DieselError) -> bool {
    conflict(e).is_some()
}

/// Whether `retry_rolled_back` gave `e` back because Ctrl-C (or SIGTERM) stopped the next
/// attempt of a step a conflict of the moment had rolled back: its caller says it was
/// interrupted, not the conflict's words (a seed, a reset, a demo said the lock's).
pub fn stopped_by_ctrl_c(e: &DieselError) -> bool {
    rolled_back_by_conflict(e) && crate::interrupt::interrupted()
}

/// The conflict of the moment that rolled back the step that failed with `e` (a serialization
/// failure, a deadlock, a lock or statement timeout), if it was one: such a step applied
/// nothing and may run again.
fn conflict(e: &DieselError) -> Option<Cause> {
    classify(e, Phase::BeforeCommit)
        .filter(|c| matches!(c, Cause::Serialization | Cause::Deadlock | Cause::Timeout))
}

/// Whether a statement at a commit point (a COMMIT, or a statement that is its own commit) that
/// failed with `e` may have taken effect. Only failures known to roll back say it did not: a
/// conflict (serialization, deadlock, a lock or statement timeout), and the server's own
/// refusals of the statement (a CHECK, NOT NULL or foreign key, a read-only transaction, a
/// missing privilege: a demo refused its INSERT by a SELECT-only role named accounts "if it
/// created them"). A lost answer may hide a commit, and so may an error nobody classified (a
/// middlebox's, sent after the server committed). Callers that can ask the database (the
/// ledger, the rows' ids) should; the rest say "may have".
pub fn may_have_committed(e: &DieselError) -> bool {
    let refused = match e {
        DieselError::DatabaseError(kind, info) => {
            // Not a unique violation: a retry of work whose first COMMIT landed unanswered
            // meets its own rows (the workload's setup runs a chunk again with the same ids).
            matches!(
                kind,
                DatabaseErrorKind::ForeignKeyViolation
                    | DatabaseErrorKind::CheckViolation
                    | DatabaseErrorKind::NotNullViolation
                    | DatabaseErrorKind::RestrictViolation
                    | DatabaseErrorKind::ReadOnlyTransaction
            ) || crate::error::is_privilege_denied(info.message())
                // The server stopped the statement for its temporary files: rolled back (a
                // reset said its batch in flight "may or may not have been done").
                || crate::error::is_temp_file_limit(info.message())
        }
        _ => false,
    };
    match classify(e, Phase::Commit) {
        // A connection lost at the commit point is one lost before the commit was run (the
        // server ended the session while idle, `ended_while_idle`).
        Some(Cause::Serialization | Cause::Deadlock | Cause::Timeout | Cause::ConnectionLost) => {
            false
        }
        // Ambiguous or lost first, whatever words it quotes: CockroachDB's 40003 may wrap a
        // network error that reads "permission denied" (a reviewer's point).
        Some(_) => true,
        None => !refused,
    }
}

fn classify_database(kind: &DatabaseErrorKind, message: &str, lost: Cause) -> Option<Cause> {
    match kind {
        DatabaseErrorKind::SerializationFailure => Some(Cause::Serialization),
        _ if ended_while_idle(message) => Some(Cause::ConnectionLost),
        DatabaseErrorKind::ClosedConnection => Some(lost),
        _ => classify_message(message, lost),
    }
}

/// Words of a connection lost: the server's as it ends a session, or libpq's.
const LOST: [&str; 12] = [
    "terminating connection",       // 57P01 admin shutdown, pg_terminate_backend
    "server closed the connection", // libpq: the socket closed
    "no connection to the server",  // libpq: used after the socket closed
    "connection to server",         // libpq: "connection to server ... lost/failed"
    "could not receive data from server", // libpq: reset by peer
    "could not send data to server", // libpq: broken pipe
    "ssl syscall error",            // libpq over TLS: EOF or reset
    "ssl connection has been closed", // libpq over TLS: closed by the peer
    "the database system is shutting down",
    "the database system is starting up",
    "server is shutting down", // CockroachDB 57P01: a draining node closes the session
    "server is not accepting clients", // CockroachDB 57P01: a draining node refuses it
];

/// Whether `message` is the server's word that it ended a session idle (PostgreSQL's
/// "terminating connection due to idle-in-transaction timeout", 25P03, or "... due to
/// idle-session timeout", 57P05): the backend was waiting for the client's next statement when it
/// ended, so it never ran what was sent after (a COMMIT, or a statement that is its own commit):
/// a connection lost before the commit, in any phase. Taken for a COMMIT whose answer was lost, a
/// transfer whose session the server ended between its statement and its COMMIT was reported of
/// unknown outcome (exit 3).
pub fn ended_while_idle(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("due to idle-in-transaction timeout") || m.contains("due to idle-session timeout")
}

/// Whether `message` reads as a lost connection (`LOST`).
pub fn reads_as_lost_connection(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    LOST.iter().any(|s| m.contains(s))
}

/// The server messages of retryable errors Diesel maps to `Unknown`.
fn classify_message(message: &str, lost: Cause) -> Option<Cause> {
    let m = message.to_ascii_lowercase();
    if m.contains("result is ambiguous") {
        Some(Cause::Ambiguous)
    } else if m.contains("restart transaction") || m.contains("could not serialize access") {
        Some(Cause::Serialization)
    } else if m.contains("deadlock detected") {
        Some(Cause::Deadlock)
    } else if m.contains("lock timeout") {
        // "canceling statement due to lock timeout" (55P03): it waited for a row, before any
        // commit.
        Some(Cause::Timeout)
    } else if m.contains("query execution canceled") {
        // CockroachDB's statement timeout or cancel (57014), "query execution canceled [due to
        // statement timeout]". At the commit point (a COMMIT, or the statement that is its own
        // commit) it may have taken effect: its docs list timeouts among the causes of an
        // ambiguous commit.
        Some(match lost {
            Cause::Ambiguous => Cause::Ambiguous,
            _ => Cause::Timeout,
        })
    } else if m.contains("statement timeout")
        || m.contains("canceling statement due to user request")
    {
        // PostgreSQL's "canceling statement due to statement timeout" or "… user request"
        // (57014): it turns the statement timeout off before a commit starts and holds cancels
        // while it commits, so the error means nothing committed, at the commit point too.
        Some(Cause::Timeout)
    } else if reads_as_lost_connection(&m) {
        Some(lost)
    } else {
        None
    }
}

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Backoff before the first retry (before jitter).
    pub base: Duration,
    /// Longest backoff.
    pub cap: Duration,
    /// How long one call (a transfer with all its attempts) may take in all.
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 31,
            base: Duration::from_millis(2),
            cap: Duration::from_secs(1),
            timeout: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1 for the first retry): capped exponential growth,
    /// with "equal jitter" (half fixed, half random) so that clients that collided spread out
    /// but none retries immediately.
    pub fn backoff(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        let exp = self
            .base
            .saturating_mul(2u32.saturating_pow(retry.saturating_sub(1)));
        let ceiling = exp.min(self.cap);
        let half = ceiling / 2;
        let jitter_nanos = rng.random_range(0..=half.as_nanos().min(u64::MAX as u128) as u64);
        half + Duration::from_nanos(jitter_nanos)
    }
}

/// "1 attempt", "3 attempts": how messages count the attempts at a transfer.
pub fn attempts(n: u32) -> String {
    if n == 1 {
        "1 attempt".to_string()
    } else {
        format!("{n} attempts")
    }
}

/// Retries by cause: of one transfer, or of a whole workload.
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

    /// The retries counted since `earlier`, a snapshot of the same counts.
    pub fn since(&self, earlier: &RetryCounts) -> RetryCounts {
        let mut d = RetryCounts::default();
        for cause in Cause::ALL {
            *d.slot(cause) = self.get(cause).saturating_sub(earlier.get(cause));
        }
        d
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

/// Retries by cause as they happen, readable from other threads while a transfer is still
/// retrying: the workload's per-second figures place a retry in the second it happened, not in
/// the one its transfer ended.
#[derive(Debug, Default)]
pub struct SharedRetryCounts([AtomicU64; Cause::ALL.len()]);

impl SharedRetryCounts {
    pub fn add(&self, cause: Cause) {
        self.0[cause as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> RetryCounts {
        let mut counts = RetryCounts::default();
        for cause in Cause::ALL {
            *counts.slot(cause) = self.0[cause as usize].load(Ordering::Relaxed);
        }
        counts
    }
}

impl std::ops::AddAssign for RetryCounts {
    fn add_assign(&mut self, other: RetryCounts) {
        for cause in Cause::ALL {
            *self.slot(cause) += other.get(cause);
        }
    }
}

/// What one attempt came to.
#[derive(Debug)]
pub enum Attempt<T, E> {
    Done(T),
    /// Permanent: retrying cannot help.
    Fail(E),
    /// Transient: try again after a backoff; it counts as an attempt.
    Retry {
        cause: Cause,
        message: String,
    },
    /// Transient and free: try again at once without spending an attempt (a connection that
    /// died while idle says nothing about the work). The deadline still bounds it.
    RetryNow {
        cause: Cause,
        message: String,
    },
}

impl<T, E> Attempt<T, E> {
    /// The retry a statement's error calls for, if `classify` finds it transient; `committing`:
    /// the error came from a COMMIT (or a statement that is its own commit).
    pub fn retry_for(e: &DieselError, committing: bool) -> Option<Self> {
        let phase = match committing {
            true => Phase::Commit,
            false => Phase::BeforeCommit,
        };
        classify(e, phase).map(|cause| Attempt::Retry {
            cause,
            message: e.to_string(),
        })
    }
}

/// Why the loop stopped without a result.
#[derive(Debug)]
pub enum Stop<E> {
    Failed(E),
    /// Out of attempts or out of time; the last transient failure's message and cause (none
    /// when the time ran out before the first attempt).
    Exhausted {
        attempts: u32,
        last: String,
        cause: Option<Cause>,
        timed_out: bool,
    },
}

/// Runs `attempt` (given the attempt's number, from 1) until it is done or fails for good, or
/// `policy` runs out of attempts or time; counts each retry in `counts` as it happens.
pub fn retry<T, E>(
    policy: &RetryPolicy,
    counts: &mut RetryCounts,
    attempt: impl FnMut(u32) -> Attempt<T, E>,
) -> Result<T, Stop<E>> {
    retry_counted(policy, counts, None, attempt)
}

/// `retry`, counting each retry in `live` too (the workload's figures of the moment). A retry
/// counts when it is made, as the next attempt starts: a transient failure the loop does not
/// try again (out of attempts, `--max-retries 0`, or out of time) is no retry, and its caller
/// counts how it ended (given up, unknown). Counted as it came, a workload with
/// `--max-retries 0` reported "retries: 120" with none made (found by a helper).
pub fn retry_counted<T, E>(
    policy: &RetryPolicy,
    counts: &mut RetryCounts,
    live: Option<&SharedRetryCounts>,
    attempt: impl FnMut(u32) -> Attempt<T, E>,
) -> Result<T, Stop<E>> {
    retry_counted_unless(policy, counts, live, || false, attempt)
}

/// `retry_counted` for an attempt whose caller may give up on it (`guard::Ticket`): a retry is
/// made only if its attempt starts, so one whose caller `gave_up` while it backed off (its
/// deadline, Ctrl-C) is not counted, as its attempt ends at once with nothing sent (the
/// transfer's retries and a workload's counted one more than were made).
pub fn retry_counted_unless<T, E>(
    policy: &RetryPolicy,
    counts: &mut RetryCounts,
    live: Option<&SharedRetryCounts>,
    gave_up: impl Fn() -> bool,
    mut attempt: impl FnMut(u32) -> Attempt<T, E>,
) -> Result<T, Stop<E>> {
    let deadline = Instant::now().checked_add(policy.timeout);
    let mut rng = rand::rng();
    let mut attempts = 0;
    // Free ones included: a deadline reached after one attempt whose idle connection had died
    // (a process paused past the server's idle timeout) said "0 attempts" of a run that made one.
    let mut made = 0;
    let mut last = String::from("none");
    let mut last_cause = None;
    // The cause of the failure the next attempt retries.
    let mut retrying = None;
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Stop::Exhausted {
                attempts: made,
                last,
                cause: last_cause,
                timed_out: true,
            });
        }
        if let Some(cause) = retrying.take().filter(|_| !gave_up()) {
            counts.add(cause);
            if let Some(live) = live {
                live.add(cause);
            }
        }
        attempts += 1;
        made += 1;
        let (cause, message, free) = match attempt(attempts) {
            Attempt::Done(value) => return Ok(value),
            Attempt::Fail(e) => return Err(Stop::Failed(e)),
            Attempt::Retry { cause, message } => (cause, message, false),
            Attempt::RetryNow { cause, message } => (cause, message, true),
        };
        log::debug!("attempt {attempts} failed ({}): {message}", cause.as_str());
        retrying = Some(cause);
        last = message;
        last_cause = Some(cause);
        if free {
            attempts -= 1;
            continue;
        }
        if attempts >= policy.max_attempts {
            return Err(Stop::Exhausted {
                attempts,
                last,
                cause: last_cause,
                timed_out: false,
            });
        }
        let mut pause = policy.backoff(attempts, &mut rng);
        if let Some(d) = deadline {
            pause = pause.min(d.saturating_duration_since(Instant::now()));
        }
        log::debug!("backing off {pause:?}");
        std::thread::sleep(pause);
    }
}

/// Runs `f`, a whole transaction that is safe to run again (read-only or idempotent), until it
/// is not rolled back by a conflict of the moment (serialization failure, deadlock, lock or
/// statement timeout), or `policy` runs out of attempts or time. Unlike `retry_rolled_back`, it
/// goes on after Ctrl-C: its callers clean up or check what a run stopped by one left (the
/// demo's rows, a workload's setup and final check).
pub fn retry_transaction<T>(
    policy: &RetryPolicy,
    f: impl FnMut() -> Result<T, DieselError>,
) -> Result<T, DieselError> {
    run_again(policy, AfterCtrlC::GoOn, f, itself)
}

/// What a step run again does once Ctrl-C (or SIGTERM) has come.
#[derive(Clone, Copy, PartialEq)]
enum AfterCtrlC {
    /// No new attempt: the caller says it was interrupted.
    Stop,
    /// Attempts go on, as the policy allows.
    GoOn,
}

/// Statement timeouts (the server's, `is_cancel`) after which a step is run again (`retry_rolled_back`,
/// `retry_transaction`), at most:
/// a lock held for a moment makes a lock timeout, which is retried until the deadline, but a
/// step that the server's `statement_timeout` cancels again and again is longer than the server
/// allows (a read of every balance), and running it again until the deadline only made the user
/// wait for the same error.
pub const STATEMENT_TIMEOUTS_RETRIED: u32 = 2;

/// Whether `e` is a cancel for the server's `statement_timeout` (PostgreSQL's "canceling
/// statement due to statement timeout", 57014; CockroachDB's "query execution canceled due to
/// statement timeout"), rather than a lock timeout (55P03) or a cancel by someone else (a DBA's
/// `pg_cancel_backend`, "due to user request", the same 57014): only the server's limit comes
/// back the same on every attempt. Counting every cancel, a DBA's cancels ended a read (`verify`,
/// a workload's final check) at the third, within half a second of a cancel storm, and a
/// workload's setup blamed the server's statement_timeout for them (found by a helper).
pub fn is_cancel(e: &DieselError) -> bool {
    let m = e.to_string().to_ascii_lowercase();
    matches!(classify(e, Phase::BeforeCommit), Some(Cause::Timeout))
        && m.contains("statement timeout")
}

/// Runs `step` until it is done, or fails in a way that `rerunnable` does not hand back as a
/// database error that rolled it back for a conflict of the moment (a serialization failure, a
/// deadlock, a lock timeout; a statement timeout only `STATEMENT_TIMEOUTS_RETRIED` times), or
/// `timeout` has passed: for a read that has written nothing yet, or a statement known to have
/// applied nothing. Such a step of `balances`, `history`, `lookup`, `verify`, the demo, a
/// workload's setup failed at once on the server's `lock_timeout` (another session's lock held
/// for a moment), or a serialization failure, where every transaction of bank's is run again.
/// Each attempt is a sign of life (`guard::tick`): an answer came, and the command's watch is
/// for a server that gives none. None starts after Ctrl-C (`interrupt::interrupted`). The last
/// error is returned as it was.
pub fn retry_rolled_back<T, E: std::fmt::Display>(
    timeout: Duration,
    step: impl FnMut() -> Result<T, E>,
    rerunnable: impl Fn(&E) -> Option<&DieselError>,
) -> Result<T, E> {
    let policy = RetryPolicy {
        max_attempts: u32::MAX,
        timeout,
        ..RetryPolicy::default()
    };
    run_again(&policy, AfterCtrlC::Stop, step, rerunnable)
}

/// The loop of `retry_rolled_back` and `retry_transaction`, through `retry`.
fn run_again<T, E: std::fmt::Display>(
    policy: &RetryPolicy,
    after_ctrl_c: AfterCtrlC,
    mut step: impl FnMut() -> Result<T, E>,
    rerunnable: impl Fn(&E) -> Option<&DieselError>,
) -> Result<T, E> {
    let mut cancels = 0;
    let mut last = None;
    let result = retry(policy, &mut RetryCounts::default(), |_| {
        crate::guard::tick();
        let e = match step() {
            Ok(value) => return Attempt::Done(value),
            Err(e) => e,
        };
        let again = rerunnable(&e).and_then(|d| conflict(d).map(|cause| (cause, is_cancel(d))));
        match again {
            Some((_, true)) if cancels >= STATEMENT_TIMEOUTS_RETRIED => Attempt::Fail(e),
            // Ctrl-C (or SIGTERM): no new attempt starts, as nothing new does elsewhere; the
            // caller says it was interrupted. Each attempt is a new one, nothing of it in
            // flight, and a seed or a demo held up by a lock went on until its `--timeout`.
            Some(_) if after_ctrl_c == AfterCtrlC::Stop && crate::interrupt::interrupted() => {
                Attempt::Fail(e)
            }
            Some((cause, cancel)) => {
                cancels += u32::from(cancel);
                let message = e.to_string();
                last = Some(e);
                Attempt::Retry { cause, message }
            }
            None => Attempt::Fail(e),
        }
    });
    match result {
        Ok(value) => Ok(value),
        Err(Stop::Failed(e)) => Err(e),
        Err(Stop::Exhausted { .. }) => match last {
            Some(e) => Err(e),
            // Out of time before a first attempt (a zero timeout): one, as asked.
            None => step(),
        },
    }
}

/// Every database error of a step may be run again (when a conflict of the moment).
fn itself(e: &DieselError) -> Option<&DieselError> {
    Some(e)
}

/// `retry_rolled_back` for a step whose every database error may be run again when it is a
/// conflict of the moment: a read, or a statement known to have applied nothing then.
pub fn retry_read<T>(
    timeout: Duration,
    step: impl FnMut() -> Result<T, DieselError>,
) -> Result<T, DieselError> {
    retry_rolled_back(timeout, step, itself)
}

#[cfg(test)]
pub(crate) mod tests {
    #[test]
    fn injected_retries_stop_after_the_third_retry_error() {
        use super::{stop_injecting, Cause};
        assert!(!stop_injecting(1, Cause::Serialization));
        assert!(!stop_injecting(2, Cause::Serialization));
        assert!(stop_injecting(3, Cause::Serialization));
        assert!(stop_injecting(7, Cause::Serialization));
        assert!(!stop_injecting(5, Cause::ConnectionLost));
    }

    use super::*;
    use diesel::result::DatabaseErrorInformation;

    struct Info(&'static str, Option<&'static str>);

    impl DatabaseErrorInformation for Info {
        fn message(&self) -> &str {
            self.0
        }
        fn details(&self) -> Option<&str> {
            None
        }
        fn hint(&self) -> Option<&str> {
            self.1
        }
        fn table_name(&self) -> Option<&str> {
            None
        }
        fn column_name(&self) -> Option<&str> {
            None
        }
        fn constraint_name(&self) -> Option<&str> {
            None
        }
        fn statement_position(&self) -> Option<i32> {
            None
        }
    }

    /// A database error with this kind and message (other modules' tests use it too).
    pub(crate) fn db(kind: DatabaseErrorKind, message: &'static str) -> DieselError {
        DieselError::DatabaseError(kind, Box::new(Info(message, None)))
    }

    /// `db` with the server's HINT.
    pub(crate) fn db_with_hint(
        kind: DatabaseErrorKind,
        message: &'static str,
        hint: &'static str,
    ) -> DieselError {
        DieselError::DatabaseError(kind, Box::new(Info(message, Some(hint))))
    }

    #[test]
    fn serialization_failures_are_retried_in_any_phase() {
        let pg = db(
            DatabaseErrorKind::SerializationFailure,
            "could not serialize access due to concurrent update",
        );
        let crdb = db(
            DatabaseErrorKind::SerializationFailure,
            "restart transaction: TransactionRetryWithProtoRefreshError: WriteTooOldError",
        );
        for phase in [Phase::BeforeCommit, Phase::Commit] {
            assert_eq!(classify(&pg, phase), Some(Cause::Serialization));
            assert_eq!(classify(&crdb, phase), Some(Cause::Serialization));
        }
    }

    #[test]
    fn deadlocks_are_retried() {
        let e = db(DatabaseErrorKind::Unknown, "deadlock detected");
        assert_eq!(classify(&e, Phase::BeforeCommit), Some(Cause::Deadlock));
    }

    #[test]
    fn ambiguous_results_are_ambiguous_in_any_phase() {
        let e = db(
            DatabaseErrorKind::Unknown,
            "result is ambiguous: error=rpc error (connection reset)",
        );
        assert_eq!(classify(&e, Phase::BeforeCommit), Some(Cause::Ambiguous));
        assert_eq!(classify(&e, Phase::Commit), Some(Cause::Ambiguous));
    }

    #[test]
    fn a_lost_connection_is_ambiguous_only_once_commit_was_sent() {
        let closed = db(
            DatabaseErrorKind::ClosedConnection,
            "server closed the connection unexpectedly",
        );
        let killed = db(
            DatabaseErrorKind::Unknown,
            "terminating connection due to administrator command",
        );
        for e in [&closed, &killed, &DieselError::BrokenTransactionManager] {
            assert_eq!(
                classify(e, Phase::BeforeCommit),
                Some(Cause::ConnectionLost)
            );
            assert_eq!(classify(e, Phase::Commit), Some(Cause::Ambiguous));
        }
    }

    /// CockroachDB's own words (transaction retry error reference, common errors, pgwire's
    /// draining messages). Diesel maps only 40001 to `SerializationFailure`; CR000, 40003 and
    /// 57P01 arrive as `Unknown` with their message.
    #[test]
    fn cockroachdb_errors_are_classified_as_its_documentation_says() {
        let retry = [
            (DatabaseErrorKind::SerializationFailure, "restart transaction: TransactionRetryWithProtoRefreshError: ReadWithinUncertaintyIntervalError: read at time 1591009232.376925064,0 encountered previous write with future timestamp 1591009232.493830170,0"),
            (DatabaseErrorKind::SerializationFailure, "restart transaction: TransactionRetryWithProtoRefreshError: TransactionRetryError: retry txn (RETRY_SERIALIZABLE - failed preemptive refresh due to conflicting locks on /Table/106/1/918951292305080321/0)"),
            (DatabaseErrorKind::Unknown, "restart transaction: TransactionRetryError: retry txn (RETRY_SERIALIZABLE)"),
            (DatabaseErrorKind::SerializationFailure, "restart transaction: TransactionRetryWithProtoRefreshError: injected by `inject_retry_errors_enabled` session variable"),
        ];
        for (kind, m) in retry {
            for phase in [Phase::BeforeCommit, Phase::Commit] {
                assert_eq!(
                    classify(&db(kind, m), phase),
                    Some(Cause::Serialization),
                    "{m}"
                );
            }
        }
        let ambiguous = db(
            DatabaseErrorKind::Unknown,
            "result is ambiguous (intent missing and record aborted)",
        );
        for phase in [Phase::BeforeCommit, Phase::Commit] {
            assert_eq!(classify(&ambiguous, phase), Some(Cause::Ambiguous));
        }
        for m in [
            "server is shutting down",
            "server is not accepting clients, try another node",
        ] {
            let e = db(DatabaseErrorKind::Unknown, m);
            assert_eq!(
                classify(&e, Phase::BeforeCommit),
                Some(Cause::ConnectionLost),
                "{m}"
            );
            assert_eq!(classify(&e, Phase::Commit), Some(Cause::Ambiguous), "{m}");
        }
    }

    #[test]
    fn lock_and_statement_timeouts_are_retried() {
        for m in [
            "canceling statement due to lock timeout",
            "canceling statement due to statement timeout",
            "query execution canceled due to statement timeout",
        ] {
            let e = db(DatabaseErrorKind::Unknown, m);
            assert_eq!(
                classify(&e, Phase::BeforeCommit),
                Some(Cause::Timeout),
                "{m}"
            );
        }
    }

    #[test]
    fn a_cockroachdb_cancel_at_the_commit_point_is_ambiguous_but_postgresql_s_is_not() {
        for (m, cause) in [
            ("canceling statement due to lock timeout", Cause::Timeout),
            // PostgreSQL's: nothing committed (it cannot cancel a commit under way).
            (
                "canceling statement due to statement timeout",
                Cause::Timeout,
            ),
            ("canceling statement due to user request", Cause::Timeout),
            // CockroachDB's: may have committed.
            (
                "query execution canceled due to statement timeout",
                Cause::Ambiguous,
            ),
            ("query execution canceled", Cause::Ambiguous),
        ] {
            let e = db(DatabaseErrorKind::Unknown, m);
            assert_eq!(classify(&e, Phase::Commit), Some(cause), "{m}");
        }
    }

    /// The server's words for a session it ended while idle (in a transaction, or outside one):
    /// what was sent after never ran, so at the commit point too it is a connection lost before
    /// the commit, not an ambiguous one.
    #[test]
    fn a_session_the_server_ended_while_idle_never_ran_its_commit() {
        for m in [
            "FATAL:  terminating connection due to idle-in-transaction timeout\nserver closed the \
             connection unexpectedly\n\tThis probably means the server terminated abnormally\n",
            "terminating connection due to idle-in-transaction timeout",
            "FATAL:  terminating connection due to idle-session timeout\n",
        ] {
            for kind in [
                DatabaseErrorKind::Unknown,
                DatabaseErrorKind::ClosedConnection,
                DatabaseErrorKind::UnableToSendCommand,
            ] {
                let e = db(kind, m);
                for phase in [Phase::BeforeCommit, Phase::Commit] {
                    assert_eq!(classify(&e, phase), Some(Cause::ConnectionLost), "{m}");
                }
                assert!(!may_have_committed(&e), "{m}");
            }
        }
        // Another session's end still leaves a COMMIT in flight unknown.
        let e = db(
            DatabaseErrorKind::Unknown,
            "terminating connection due to administrator command",
        );
        assert_eq!(classify(&e, Phase::Commit), Some(Cause::Ambiguous));
    }

    #[test]
    fn tls_connection_losses_are_recognised() {
        for m in [
            "SSL SYSCALL error: EOF detected",
            "SSL connection has been closed unexpectedly",
        ] {
            let e = db(DatabaseErrorKind::Unknown, m);
            assert_eq!(classify(&e, Phase::Commit), Some(Cause::Ambiguous), "{m}");
        }
    }

    #[test]
    fn read_only_transactions_are_retried_on_conflicts_only() {
        let policy = RetryPolicy {
            max_attempts: 5,
            base: Duration::from_micros(10),
            cap: Duration::from_micros(100),
            ..RetryPolicy::default()
        };
        let mut calls = 0;
        let result = retry_transaction(&policy, || {
            calls += 1;
            if calls < 3 {
                Err(db(
                    DatabaseErrorKind::SerializationFailure,
                    "could not serialize access",
                ))
            } else {
                Ok(calls)
            }
        });
        assert_eq!(result, Ok(3));
        let mut calls = 0;
        let result: Result<(), _> = retry_transaction(&policy, || {
            calls += 1;
            Err(DieselError::NotFound)
        });
        assert_eq!((result, calls), (Err(DieselError::NotFound), 1));
        let mut calls = 0;
        let result: Result<(), _> = retry_transaction(&policy, || {
            calls += 1;
            Err(db(DatabaseErrorKind::Unknown, "deadlock detected"))
        });
        assert!(matches!(result, Err(DieselError::DatabaseError(..))));
        assert_eq!(calls, 5);
    }

    /// A step rolled back by a lock timeout runs again until it is done; one cancelled by a
    /// statement timeout runs again only `STATEMENT_TIMEOUTS_RETRIED` times (the server's limit
    /// is shorter than the step: the same error came back until the deadline); one its caller
    /// says may not run again (a read that has written rows) fails at once.
    #[test]
    fn rolled_back_steps_run_again_but_statement_timeouts_only_a_few_times() {
        let timeout = Duration::from_secs(30);
        let mut calls = 0;
        let result = retry_read(timeout, || {
            calls += 1;
            match calls {
                1..=5 => Err(db(
                    DatabaseErrorKind::Unknown,
                    "canceling statement due to lock timeout",
                )),
                _ => Ok(calls),
            }
        });
        assert_eq!(result, Ok(6));
        let mut calls = 0;
        let started = Instant::now();
        let result: Result<(), _> = retry_read(timeout, || {
            calls += 1;
            Err(db(
                DatabaseErrorKind::Unknown,
                "canceling statement due to statement timeout",
            ))
        });
        assert!(matches!(result, Err(DieselError::DatabaseError(..))));
        assert_eq!(calls, STATEMENT_TIMEOUTS_RETRIED + 1);
        assert!(started.elapsed() < Duration::from_secs(1));
        let mut calls = 0;
        let result: Result<(), _> = retry_rolled_back(
            timeout,
            || {
                calls += 1;
                Err(db(DatabaseErrorKind::Unknown, "deadlock detected"))
            },
            |_| None,
        );
        assert!(result.is_err());
        assert_eq!(calls, 1);
        assert!(is_cancel(&db(
            DatabaseErrorKind::Unknown,
            "query execution canceled due to statement timeout"
        )));
        assert!(!is_cancel(&db(
            DatabaseErrorKind::Unknown,
            "canceling statement due to lock timeout"
        )));
        assert!(!is_cancel(&db(
            DatabaseErrorKind::Unknown,
            "canceling statement due to user request"
        )));
    }

    /// Only statement timeouts count toward `STATEMENT_TIMEOUTS_RETRIED`: lock timeouts before
    /// them leave a statement timeout its own retries. Counting every retry passed every test
    /// (a mutation review): a read held up by a lock for a moment, then cancelled once, failed.
    #[test]
    fn lock_timeouts_do_not_use_up_the_statement_timeouts_retried() {
        let mut calls = 0;
        let result = retry_read(Duration::from_secs(30), || {
            calls += 1;
            match calls {
                1..=3 => Err(db(
                    DatabaseErrorKind::Unknown,
                    "canceling statement due to lock timeout",
                )),
                4 => Err(db(
                    DatabaseErrorKind::Unknown,
                    "canceling statement due to statement timeout",
                )),
                _ => Ok(calls),
            }
        });
        assert_eq!(result, Ok(5));
    }

    #[test]
    fn the_loop_counts_retries_and_free_retries_cost_no_attempt() {
        let policy = RetryPolicy {
            max_attempts: 3,
            base: Duration::from_micros(10),
            cap: Duration::from_micros(100),
            ..RetryPolicy::default()
        };
        let mut counts = RetryCounts::default();
        let mut seen = Vec::new();
        let result: Result<(), Stop<()>> = retry(&policy, &mut counts, |n| {
            seen.push(n);
            if seen.len() == 1 {
                Attempt::RetryNow {
                    cause: Cause::ConnectionLost,
                    message: "idle connection died".into(),
                }
            } else {
                Attempt::Retry {
                    cause: Cause::Serialization,
                    message: "40001".into(),
                }
            }
        });
        assert_eq!(seen, [1, 1, 2, 3]);
        assert!(matches!(
            result,
            Err(Stop::Exhausted {
                attempts: 3,
                timed_out: false,
                ..
            })
        ));
        // Three retries made (the free one and two); the third failure is not retried.
        assert_eq!((counts.connection_lost, counts.serialization), (1, 2));
    }

    /// Out of time after free retries alone, the attempts made are counted: "timed out after
    /// 35.9s (0 attempts)" was said of a file whose one attempt found its connection ended while
    /// the process was paused (found by a helper playing a new user).
    #[test]
    fn a_deadline_counts_the_free_attempts_made() {
        let policy = RetryPolicy {
            max_attempts: 3,
            timeout: Duration::from_millis(30),
            ..RetryPolicy::default()
        };
        let result: Result<(), Stop<()>> = retry(&policy, &mut RetryCounts::default(), |_| {
            std::thread::sleep(Duration::from_millis(40));
            Attempt::RetryNow {
                cause: Cause::ConnectionLost,
                message: "idle connection died".into(),
            }
        });
        assert!(
            matches!(
                result,
                Err(Stop::Exhausted {
                    attempts: 1,
                    timed_out: true,
                    ..
                })
            ),
            "{result:?}"
        );
    }

    #[test]
    fn the_loop_stops_at_the_deadline() {
        let policy = RetryPolicy {
            max_attempts: u32::MAX,
            base: Duration::from_millis(5),
            cap: Duration::from_millis(5),
            timeout: Duration::from_millis(50),
        };
        let started = Instant::now();
        let result: Result<(), Stop<()>> =
            retry(&policy, &mut RetryCounts::default(), |_| Attempt::Retry {
                cause: Cause::Timeout,
                message: "lock timeout".into(),
            });
        assert!(matches!(
            result,
            Err(Stop::Exhausted {
                timed_out: true,
                ..
            })
        ));
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    #[test]
    fn a_commit_whose_rollback_failed_is_ambiguous() {
        let e = DieselError::RollbackErrorOnCommit {
            rollback_error: Box::new(DieselError::BrokenTransactionManager),
            commit_error: Box::new(db(DatabaseErrorKind::ClosedConnection, "lost")),
        };
        assert_eq!(classify(&e, Phase::Commit), Some(Cause::Ambiguous));
    }

    #[test]
    fn a_commit_point_failure_may_have_landed_unless_known_to_roll_back() {
        for (e, may) in [
            (
                db(
                    DatabaseErrorKind::SerializationFailure,
                    "could not serialize access",
                ),
                false,
            ),
            (db(DatabaseErrorKind::Unknown, "deadlock detected"), false),
            (
                db(
                    DatabaseErrorKind::Unknown,
                    "canceling statement due to lock timeout",
                ),
                false,
            ),
            (
                db(
                    DatabaseErrorKind::ClosedConnection,
                    "server closed the connection",
                ),
                true,
            ),
            (db(DatabaseErrorKind::Unknown, "result is ambiguous"), true),
            (db(DatabaseErrorKind::Unknown, "server conn crashed?"), true),
            (
                db(
                    DatabaseErrorKind::Unknown,
                    "result is ambiguous (dial tcp 10.0.0.1:26257: connect: permission denied)",
                ),
                true,
            ),
            (DieselError::BrokenTransactionManager, true),
            (
                db(
                    DatabaseErrorKind::Unknown,
                    "permission denied for table accounts",
                ),
                false,
            ),
            (
                db(
                    DatabaseErrorKind::ReadOnlyTransaction,
                    "cannot execute INSERT in a read-only transaction",
                ),
                false,
            ),
            (
                db(DatabaseErrorKind::UniqueViolation, "duplicate key"),
                true,
            ),
        ] {
            assert_eq!(may_have_committed(&e), may, "{e}");
        }
    }

    #[test]
    fn domain_errors_are_final() {
        for (kind, message) in [
            (
                DatabaseErrorKind::CheckViolation,
                "new row for relation \"accounts\" violates check constraint",
            ),
            (
                DatabaseErrorKind::UniqueViolation,
                "duplicate key value violates unique constraint \"transfers_pkey\"",
            ),
            (
                DatabaseErrorKind::ForeignKeyViolation,
                "insert or update on table \"transfers\" violates foreign key constraint",
            ),
            (
                DatabaseErrorKind::Unknown,
                "relation \"accounts\" does not exist",
            ),
        ] {
            assert_eq!(
                classify(&db(kind, message), Phase::Commit),
                None,
                "{message}"
            );
        }
        assert_eq!(classify(&DieselError::NotFound, Phase::Commit), None);
    }

    #[test]
    fn backoff_grows_exponentially_up_to_the_cap_with_jitter() {
        let policy = RetryPolicy {
            max_attempts: 10,
            base: Duration::from_millis(10),
            cap: Duration::from_millis(100),
            ..RetryPolicy::default()
        };
        let mut rng = rand::rng();
        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let first = policy.backoff(1, &mut rng);
            assert!(first >= Duration::from_millis(5) && first <= Duration::from_millis(10));
            firsts.insert(first);
            let third = policy.backoff(3, &mut rng);
            assert!(third >= Duration::from_millis(20) && third <= Duration::from_millis(40));
            let late = policy.backoff(30, &mut rng);
            assert!(late >= Duration::from_millis(50) && late <= Duration::from_millis(100));
        }
        // The jitter spreads clients that collided: a fixed wait (the ceiling every time, a
        // mutation round's survivor) kept them in step. 200 draws from 5 ms of nanoseconds.
        assert!(firsts.len() > 100, "{} distinct waits", firsts.len());
    }

    /// libpq's words for a connection that broke, as Diesel passes them when a query could not
    /// even be sent (`UnableToSendCommand`, a connection libpq already knew was bad) or with
    /// no SQLSTATE (`Unknown`): only the `ClosedConnection` kind was held by a test, and a
    /// reviewer's mutations dropping any one of these words passed every test. Each is a lost
    /// connection: nothing applied before COMMIT was sent, unknown once it was.
    #[test]
    fn libpq_s_words_for_a_broken_connection_are_a_lost_connection() {
        for m in [
            "no connection to the server\n",
            "server closed the connection unexpectedly\n\tThis probably means the server \
             terminated abnormally\n\tbefore or while processing the request.\n",
            "could not receive data from server: Connection reset by peer\n",
            "could not send data to server: Broken pipe\n",
            "connection to server was lost\n",
            "FATAL:  terminating connection due to administrator command\n",
            "FATAL:  the database system is shutting down\n",
            "FATAL:  the database system is starting up\n",
        ] {
            for kind in [
                DatabaseErrorKind::UnableToSendCommand,
                DatabaseErrorKind::Unknown,
            ] {
                let e = db(kind, m);
                assert_eq!(
                    classify(&e, Phase::BeforeCommit),
                    Some(Cause::ConnectionLost),
                    "{m}"
                );
                assert_eq!(classify(&e, Phase::Commit), Some(Cause::Ambiguous), "{m}");
                assert!(may_have_committed(&e), "{m}");
            }
        }
    }

    #[test]
    fn default_policy_tries_at_least_ten_times() {
        assert!(RetryPolicy::default().max_attempts >= 10);
    }
}
