//! Running a transfer exactly once: attempts through `retry::retry`, the ledger's last word, and
//! a deadline that holds even when the database never answers.
//!
//! After an ambiguous outcome the ledger decides: the row is there (the earlier attempt
//! committed) or the transfer runs again. A failure is then final only when a rerun got past the
//! transfer's row locks and was refused on its merits; anything else (running out of attempts or
//! time, a lock timeout behind an orphaned attempt) is reported as an unknown outcome.

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use uuid::Uuid;

use diesel::pg::PgConnection;
use diesel::result::Error as DieselError;

use super::statement::{apply, apply_claiming, BodyError};
use super::{validate, Mode};
use crate::db::Session;
use crate::error::TransferError;
use crate::guard::{GaveUp, Ticket};
use crate::models::{NewTransfer, Transfer};
use crate::repo;
use crate::retry::{
    classify, retry, retry_counted_unless, stop_injecting, Attempt, Cause, Phase, RetryCounts,
    RetryPolicy, SharedRetryCounts, Stop,
};

/// Why a transfer of a given id, or a file's line, another run answered since this run's first
/// attempt at it is not applied. Not "while this one was retrying": the first attempt may still be
/// waiting for its locks, and the other run may be one killed before it printed its answer,
/// whose claim landed late (a helper's case).
pub(crate) const ANSWERED_SINCE: &str =
    "another run answered this id \"not applied\" after this run began on it (one killed \
     before it said so, too), and that answer stands: run it again to apply it";

/// How long a caller waits past the deadline for the runner's own answer.
pub const GRACE: Duration = Duration::from_millis(200);

/// How often a caller waiting for a transfer looks for a Ctrl-C.
const INTERRUPT_POLL: Duration = Duration::from_millis(50);

/// A transfer that is in the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub transfer: NewTransfer,
    /// Attempts this call made (1 when the first one committed).
    pub attempts: u32,
    /// The ledger already held this transfer before this call: it was applied by an earlier run
    /// with the same id, and this call changed nothing.
    pub already_applied: bool,
    /// This transfer's retries.
    pub retries: RetryCounts,
}

/// Runs transfers on one session, one at a time: `bank transfer`, the demo, each workload
/// worker.
pub struct Runner {
    pub session: Session,
    pub mode: Mode,
    pub policy: RetryPolicy,
    /// Retries of every transfer this runner ran, failed ones included.
    pub retries: RetryCounts,
    /// Where a caller on another thread can give up on the transfer under way (see `guard`).
    pub ticket: Ticket,
    /// Also counts each retry here as it happens (the workload's live figures).
    pub live_retries: Option<Arc<SharedRetryCounts>>,
    /// The transfer's id came from the caller (`--id`), so an earlier attempt of it, in another
    /// process, may exist: see `held_up`.
    pub id_given: bool,
}

impl Runner {
    pub fn new(session: Session, mode: Mode, policy: RetryPolicy) -> Runner {
        Runner {
            session,
            mode,
            policy,
            retries: RetryCounts::default(),
            ticket: Ticket::new(),
            live_retries: None,
            id_given: false,
        }
    }

    /// Applies `t` exactly once: validates it, runs it until it commits, is refused, or the
    /// policy (attempts, deadline) runs out.
    pub fn run(&mut self, t: &NewTransfer) -> Result<Receipt, TransferError> {
        validate(t)?;
        let started = Instant::now();
        let mut retries = RetryCounts::default();
        let mut ambiguous = false;
        let mut made = 0;
        let (session, ticket, mode) = (&mut self.session, &self.ticket, self.mode);
        let live_retries = self.live_retries.as_deref();
        // A given id may be answered by another run while this one retries: its claim, as the
        // first attempt read it (see `answered_since`). A made-up id is nobody else's.
        // A given id may also be in the ledger already (a rerun): then the row is the answer,
        // read before any attempt waits on the accounts' locks (see `attempt`).
        let mut given = self.id_given.then_some(GivenId {
            claim: ClaimSeen::NotRead,
            ledger_unread: true,
        });
        // How this run knows its own ledger row: after a lost COMMIT, a row alike to the last
        // detail may be another run's (found by a reviewer: two runs said "applied" for one row).
        let mut own = match mode {
            Mode::Transaction if self.id_given => Own::Times(Vec::new()),
            Mode::Transaction => Own::Any,
            Mode::SingleStatement => Own::Mark(Uuid::new_v4()),
        };
        let gave_up = || ticket.is_abandoned();
        // An attempt found an account the statement could not see, which exists (see
        // `stale_snapshot`): the next attempt is its one second chance.
        let mut stale_seen = false;
        let result = retry_counted_unless(&self.policy, &mut retries, live_retries, gave_up, |n| {
            made = n;
            if ticket.is_abandoned() {
                // Whatever happens now is nobody's result: stop touching the database.
                return Attempt::Fail(TransferError::Abandoned);
            }
            log::debug!("transfer {}: attempt {n} ({mode})", t.id);
            // A connection that was open before this attempt may have died while idle (a
            // server restart, a killed backend); losing it before COMMIT says nothing.
            let reused = session.is_connected();
            let step = attempt(
                session,
                t,
                mode,
                ambiguous,
                ticket,
                given.as_mut(),
                &mut own,
            );
            let step = match step {
                Attempt::Fail(TransferError::AccountNotUpdated(Some(account))) if !stale_seen => {
                    stale_seen = true;
                    stale_snapshot(t, account)
                }
                step => step,
            };
            let step = after_step(step, n, reused, session, ticket);
            if let Attempt::Retry {
                cause: Cause::Ambiguous,
                ..
            } = &step
            {
                ambiguous = true;
            }
            step
        });
        self.retries += retries;
        let answer = match result {
            Ok(already_applied) => Ok(Receipt {
                transfer: *t,
                attempts: made,
                already_applied,
                retries,
            }),
            // A claim by another run makes this run's "not applied" final (see `attempt`).
            Err(Stop::Failed(e))
                if ambiguous
                    && !e.is_refusal()
                    && !matches!(
                        e,
                        TransferError::NotApplied { .. } | TransferError::OutcomeUnknown { .. }
                    ) =>
            {
                Err(TransferError::OutcomeUnknown {
                    id: t.id,
                    reason: format!("an attempt's outcome was ambiguous, then: {e}"),
                })
            }
            // bank's tables changed in ways it refuses (`db::require_unchanged`), or out of this
            // connection's reach (`Unmigrated::ledger_may_hold_ids`): nothing was sent, but a
            // rerun of a given id cannot learn whether it was applied before, and "failed" (exit
            // 1) was said of an id the ledger held (found by a reviewer, then a helper).
            Err(Stop::Failed(TransferError::NotMigrated(u)))
                if self.id_given && u.ledger_may_hold_ids() =>
            {
                let undo = match u.unsafe_changes.is_some() {
                    true => "once it is undone",
                    false => "once that is put right",
                };
                Err(TransferError::OutcomeUnknown {
                    id: t.id,
                    reason: format!("{u}; {undo}, run it again (or `bank lookup`) to settle it"),
                })
            }
            // A refusal of the database's own may have come before the accounts were locked (a
            // read-only database, a revoked privilege), or the database could not be reached at
            // all (a role that may no longer log in): an earlier attempt of a given id may still
            // be about to commit, exactly as after a held-up run. It said "not applied", and the
            // earlier attempt then committed.
            Err(Stop::Failed(e))
                if self.id_given
                    && (refused_by_the_database(&e)
                        || matches!(&e, TransferError::Connect(c) if !c.reaches_no_database())) =>
            {
                let refused = format!("the database refused it ({e})");
                let ended = Ended {
                    attempts: made,
                    retries,
                    ambiguous,
                };
                self.settle(t, refused, e, ended, &own)
            }
            Err(Stop::Failed(e)) => Err(e),
            Err(Stop::Exhausted {
                attempts,
                last,
                cause,
                timed_out,
            }) => {
                let reason = exhausted(attempts, &last, timed_out, started.elapsed());
                if ambiguous {
                    Err(TransferError::OutcomeUnknown { id: t.id, reason })
                } else if self.id_given && cause.is_some_and(Cause::is_held_up) {
                    let not_applied = TransferError::NotApplied {
                        id: t.id,
                        reason: reason.clone(),
                    };
                    let ended = Ended {
                        attempts: made,
                        retries,
                        ambiguous,
                    };
                    self.settle(
                        t,
                        format!("it was held up ({reason})"),
                        not_applied,
                        ended,
                        &own,
                    )
                } else {
                    Err(TransferError::NotApplied { id: t.id, reason })
                }
            }
        };
        // An id given may have an earlier run's attempt still on its way; one this run made up
        // has this run's own, once an attempt was ambiguous (a statement held in the network).
        match answer {
            Err(e) if (self.id_given || ambiguous) && says_not_applied(&e) => {
                self.claim_first(t, e, made, retries, ambiguous, &own)
            }
            answer => answer,
        }
    }

    /// A run with a given id that is about to say "not applied" (refused on its merits, or
    /// settled after it was held up) claims the id first (`repo::claim_ids`): an earlier attempt
    /// sent in single-statement mode that is still in the network (a middlebox holding it) then
    /// fails on the claim when it arrives, where it applied after this answer. The ledger is then
    /// asked once more: the claim waited for such a statement still being written, and if it
    /// committed, its outcome is the answer. A claim that cannot be written (a read-only
    /// database) leaves the outcome unknown. A row found is this run's own only after an
    /// ambiguous attempt, and then only if `own` does not show it is another run's: its own
    /// statement that came late was reported "already applied", so no run said it applied it.
    fn claim_first(
        &mut self,
        t: &NewTransfer,
        no: TransferError,
        attempts: u32,
        retries: RetryCounts,
        ambiguous: bool,
        own: &Own,
    ) -> Result<Receipt, TransferError> {
        let policy = self.policy;
        let ledger = claim_and_find(
            &mut self.session,
            &policy,
            &self.ticket,
            &[t.id],
            &[t.from_id, t.to_id],
            None,
        )
        .map(|found| found.into_iter().next());
        let found = match ledger {
            Ok(found) => found,
            Err(e) => {
                return Err(held_up(
                    t,
                    format!("it could not claim the id ({e}) after: {no}"),
                ))
            }
        };
        let Some(found) = found else {
            return Err(no);
        };
        let ended = Ended {
            attempts,
            retries,
            ambiguous,
        };
        self.answer_found(t, &found, ended, own, no.to_string())
    }

    /// The answer for `t` once its ledger row is `found`: committed, whoever wrote it, so
    /// applied (by this run, after an ambiguous attempt, unless `own` shows it is another's),
    /// already applied, or an id conflict. `no`: what the run would have said otherwise, for
    /// the line that says the row's owner could not be asked.
    fn answer_found(
        &mut self,
        t: &NewTransfer,
        found: &Transfer,
        ended: Ended,
        own: &Own,
        no: String,
    ) -> Result<Receipt, TransferError> {
        let step = match self.session.conn() {
            Ok(conn) => resolve_found(conn, t, found, ended.ambiguous, own),
            Err(e) => {
                return Err(held_up(
                    t,
                    format!("it could not ask whose the row is ({e}) after: {no}"),
                ))
            }
        };
        match step {
            Attempt::Done(already_applied) => Ok(Receipt {
                transfer: *t,
                attempts: ended.attempts,
                already_applied,
                retries: ended.retries,
            }),
            Attempt::Fail(e) => Err(e),
            _ => Err(held_up(t, no)),
        }
    }

    /// The end of a run with a given id that applied nothing but never got past the accounts'
    /// locks for sure (see `held_up`; `why` says how). If no transaction holds either account or
    /// keeps a transfer out of the tables now (`repo::accounts_free`), any earlier attempt of
    /// this id has ended, and `absent` goes on to `claim_first`, where the ledger has the last
    /// word; otherwise, or when the accounts cannot even be probed, nobody can know yet.
    ///
    /// Unless the ledger already has the id's row: committed, that is the answer, whoever holds
    /// the accounts (a rerun of a transfer applied long ago said "unknown" while a report held
    /// one of its accounts; found by a helper playing a new user). The row is read without
    /// locks, so that read does not wait on them.
    fn settle(
        &mut self,
        t: &NewTransfer,
        why: String,
        absent: TransferError,
        ended: Ended,
        own: &Own,
    ) -> Result<Receipt, TransferError> {
        let free = self
            .session
            .conn()
            .is_ok_and(|conn| repo::accounts_free(conn, &[t.from_id, t.to_id]));
        if free {
            return Err(absent);
        }
        let found = self
            .session
            .conn()
            .ok()
            .and_then(|conn| repo::find_transfer(conn, t.id).ok().flatten());
        match found {
            Some(found) => self.answer_found(t, &found, ended, own, why),
            None => Err(held_up(t, why)),
        }
    }

    /// `run` on a thread of its own, given up at the deadline even when the database never
    /// answers (a frozen server). Consumes the runner: one its caller gave up on is never used
    /// again.
    pub fn run_guarded(mut self, t: &NewTransfer) -> Result<Receipt, TransferError> {
        validate(t)?;
        let ticket = self.ticket.clone();
        let wait = self.policy.timeout + GRACE;
        let id_given = self.id_given;
        let (tx, rx) = mpsc::channel();
        let t = *t;
        let started = Instant::now();
        let started_thread = crate::spawn(move || {
            let result = self.run(&t);
            // Closed before the answer goes out: the caller may exit at once, and libpq's exit
            // handlers must not race a connection closing on this thread.
            drop(self);
            let _ = tx.send(result);
        });
        // Nothing was sent: not applied, or, with an id given, unknown as for any run held up
        // before its first statement (an earlier run's attempt may still be on its way).
        if let Err(e) = started_thread {
            return Err(match id_given {
                true => held_up(&t, format!("it could not start a thread ({e})")),
                false => gave_up(
                    &t,
                    GaveUp::NotApplied,
                    format!("the system would not start a thread for it ({e})"),
                ),
            });
        }
        // The runner watches the same deadline between attempts; the grace lets it report its
        // own, more precise, result when it is not stuck. A Ctrl-C (or SIGTERM) ends the wait
        // as the deadline does: killed without a word, the run never named the id it made up,
        // and a statement it had sent still committed.
        let mut deadline = started + wait;
        let why = loop {
            let asked = Instant::now();
            let left = deadline.saturating_duration_since(asked);
            let answer = rx.recv_timeout(left.min(INTERRUPT_POLL));
            // The time this process did not run is not the database's silence.
            if let Some(stopped) = crate::guard::stopped_during(asked, INTERRUPT_POLL) {
                deadline += stopped;
            }
            match answer {
                Ok(result) => return result,
                Err(mpsc::RecvTimeoutError::Timeout) if crate::interrupt::interrupted() => {
                    break format!(
                        "{} after {}",
                        crate::interrupt::reason(),
                        crate::text::seconds(started.elapsed())
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => continue,
                Err(_) => break no_answer(started),
            }
        };
        // An answer sent just as the deadline came is the answer (a reviewer's point: the
        // runner never finishes its ticket, so `abandon` alone would take it for none).
        if let Ok(result) = rx.try_recv() {
            return result;
        }
        match ticket.abandon() {
            None => rx
                .recv()
                .unwrap_or_else(|_| Err(gave_up(&t, GaveUp::Unknown, why))),
            Some(GaveUp::NotApplied) if id_given => {
                Err(held_up(&t, format!("it was held up ({why})")))
            }
            Some(how) => Err(gave_up(&t, how, why)),
        }
    }
}

/// How a run's attempts ended, for the answer given from a ledger row found afterwards.
struct Ended {
    attempts: u32,
    retries: RetryCounts,
    /// An attempt's outcome was ambiguous: the row may be this run's own.
    ambiguous: bool,
}

/// This run's attempts were rolled back, but it was held up (waiting on another transaction's
/// locks, or a server it could not reach or that did not answer), or refused before it surely
/// held the accounts, and never learned whether an earlier attempt of this id, in another
/// process, is still on its way to commit: an orphan whose COMMIT arrives late holds exactly
/// those locks. Its ledger row is not there yet, so "not applied" could turn false a moment
/// later: the outcome is unknown, and the next rerun with the same id settles it. A transfer
/// whose id this run made up has no earlier attempt. `why`: "it was held up (…)".
fn held_up(t: &NewTransfer, why: String) -> TransferError {
    TransferError::OutcomeUnknown {
        id: t.id,
        reason: format!(
            "this run applied nothing, but {why} and cannot tell whether an earlier attempt of \
             this id is still about to commit"
        ),
    }
}

/// The attempt after one whose statement found no row of `account`, though the accounts read
/// afterwards show it there with nothing of bank's against the transfer (`first_reason`): run
/// once more, in a new transaction. Either a DBA's trigger left the row unchanged, and the next
/// attempt meets it again and is refused for it as before; or the statement did not see the
/// row: its snapshot was taken before a DBA's table rewrite of `accounts` committed (`ALTER
/// TABLE … ADD COLUMN … DEFAULT random()`, which PostgreSQL documents as not MVCC-safe), since
/// PostgreSQL takes it before the statement waits for the rewrite's lock (the transaction's, at
/// SERIALIZABLE; a single statement's when it was prepared already, as on a workload's
/// connections). Refused for "a trigger or rule" that did not exist, such a transfer applied
/// nothing where one by one it applies (a lead's known case: the file's chunks take the tables'
/// lock first, `db::wait_out_rewrites`, which in every transfer cost a quarter of transaction
/// mode's throughput; this costs nothing until a statement misses an account). Safe: the
/// statement failed, so its transaction rolled back with everything in it (a single
/// statement's claim of the id too), and the next attempt's snapshot, taken once the rewrite
/// committed, sees the new table. Counted as a serialization retry: it is one, in all but the
/// rewrite's SQLSTATE.
fn stale_snapshot(t: &NewTransfer, account: Uuid) -> Attempt<bool, TransferError> {
    Attempt::Retry {
        cause: Cause::Serialization,
        message: format!(
            "transfer {}: its statement found no row of account {account}, which exists: a \
             trigger or rule of the database's own left it unchanged, or the statement's \
             snapshot was taken before a table rewrite committed (run again to tell)",
            t.id
        ),
    }
}

/// Why a caller gave up on a transfer the database did not answer, with the causes an operator
/// can look for (a COMMIT waiting for a synchronous standby that is gone waits for good).
fn no_answer(started: Instant) -> String {
    format!(
        "no answer from the database within {} ({})",
        crate::text::seconds(started.elapsed()),
        crate::guard::COMMIT_STALLS
    )
}

/// "gave up after N attempts; last error: …" or "timed out after …".
fn exhausted(attempts: u32, last: &str, timed_out: bool, elapsed: Duration) -> String {
    if timed_out {
        format!(
            "timed out after {} ({}); last error: {last}",
            crate::text::seconds(elapsed),
            crate::retry::attempts(attempts)
        )
    } else {
        format!(
            "gave up after {}; last error: {last}",
            crate::retry::attempts(attempts)
        )
    }
}

/// The error for a transfer its caller stopped waiting for, and why it stopped.
pub fn gave_up(t: &NewTransfer, how: GaveUp, reason: String) -> TransferError {
    match how {
        GaveUp::NotApplied => TransferError::NotApplied { id: t.id, reason },
        GaveUp::Unknown => TransferError::OutcomeUnknown { id: t.id, reason },
    }
}

/// The session's connection for an attempt, or the step that ends the attempt: one that cannot
/// be opened now is retried, one that never can (a wrong password, say) is final.
pub(crate) fn connection<T>(
    session: &mut Session,
) -> Result<&mut PgConnection, Attempt<T, TransferError>> {
    let failed = |e: crate::error::ConnectError| {
        if e.is_transient() {
            Attempt::Retry {
                cause: Cause::ConnectionLost,
                message: e.message,
            }
        } else {
            Attempt::Fail(TransferError::Connect(e))
        }
    };
    // Before anything is sent: a database missing one of this bank's migrations is refused
    // here, as other commands refuse it.
    if session.schema_unchecked() {
        let conn = session.conn().map_err(failed)?;
        // Once: a conflict of the moment fails this attempt, which the transfer's own policy
        // runs again.
        match crate::db::require_writable(conn, std::time::Duration::ZERO) {
            Ok(()) => session.schema_checked(),
            Err(crate::error::Error::NotMigrated(u)) => {
                return Err(Attempt::Fail(TransferError::NotMigrated(u)))
            }
            // Nothing of the transfer was sent: the check is made again on a new connection.
            Err(e) => {
                return Err(Attempt::Retry {
                    cause: Cause::ConnectionLost,
                    message: format!("the schema could not be checked: {e}"),
                })
            }
        }
    }
    session.conn().map_err(failed)
}

/// Claims `ids` and reads their ledger rows (`repo::claim_and_find`), as a run does before it
/// says "not applied", until that is done or `policy` gives up; the error's text otherwise.
/// Retried: another run claiming the same ids at once is a conflict, not an unknown. Running the
/// claim again is safe (a claim made twice only moves its generation twice, and the rest is a
/// read), so a connection lost on the way, even in its COMMIT, is retried on a new connection
/// (tried once, a server that crashed and came back well within the deadline left the answer
/// unknown). Not once `ticket`'s caller has given up: the answer would be nobody's.
pub(crate) fn claim_and_find(
    session: &mut Session,
    policy: &RetryPolicy,
    ticket: &Ticket,
    ids: &[uuid::Uuid],
    accounts: &[uuid::Uuid],
    wait: Option<std::time::Duration>,
) -> Result<Vec<Transfer>, String> {
    let result = retry(policy, &mut RetryCounts::default(), |n| {
        if ticket.is_abandoned() {
            return Attempt::Fail(TransferError::Abandoned);
        }
        let reused = session.is_connected();
        let step =
            match connection(session).map(|conn| repo::claim_and_find(conn, ids, accounts, wait)) {
                Err(step) => step,
                Ok(Ok(found)) => Attempt::Done(found),
                Ok(Err(e)) => match classify(&e, Phase::BeforeCommit) {
                    Some(cause) => Attempt::Retry {
                        cause,
                        message: e.to_string(),
                    },
                    None => Attempt::Fail(TransferError::from(e)),
                },
            };
        // Counted nowhere (the claim is not the transfer's attempt); BeforeCommit: never
        // ambiguous, so the ticket is not marked.
        after_step(step, n, reused, session, ticket)
    });
    match result {
        Ok(found) => Ok(found),
        // The database's own words, as the claim's callers quote them.
        Err(Stop::Failed(TransferError::Database(e))) => Err(e.to_string()),
        Err(Stop::Failed(e)) => Err(e.to_string()),
        Err(Stop::Exhausted { last, .. }) => Err(last),
    }
}

/// What every runner (one transfer, a chunk of a file) does with an attempt's transient failure
/// (`retry::retry_counted` counts the retry, where the workload watches too, once it is made):
/// turns `--inject-retries` off after the third injected error, marks the ticket when the
/// COMMIT's outcome is unknown, drops a connection that must be replaced, and makes the loss of a
/// connection that had been idle (`reused`) a free retry: it says nothing about the work.
pub(crate) fn after_step<T>(
    step: Attempt<T, TransferError>,
    n: u32,
    reused: bool,
    session: &mut Session,
    ticket: &Ticket,
) -> Attempt<T, TransferError> {
    let Attempt::Retry { cause, message } = step else {
        return step;
    };
    if stop_injecting(n, cause) {
        session.stop_injecting();
    }
    if cause == Cause::Ambiguous {
        ticket.mark_ambiguous();
    }
    if cause.needs_reconnect() {
        session.reset();
    }
    if cause == Cause::ConnectionLost && reused {
        Attempt::RetryNow { cause, message }
    } else {
        Attempt::Retry { cause, message }
    }
}

/// What a run with a given id keeps across its attempts.
struct GivenId {
    claim: ClaimSeen,
    /// The ledger has not yet been asked for the id's row (before the first attempt).
    ledger_unread: bool,
}

/// A given id's claim as a run's first attempt read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClaimSeen {
    NotRead,
    /// Its generation then, or `None`: not claimed.
    Read(Option<i64>),
}

/// Inside an attempt's transaction (first thing in the first attempt, then once it holds the
/// accounts, where READ COMMITTED reads the claim afresh): whether another run has answered
/// this id "not applied" since this run's first attempt (its claim's generation moved). That
/// answer was final for every run that began before it, so this attempt must not commit: a run
/// still retrying applied the id after a concurrent rerun refused it (the README's limit until
/// then). The first attempt records what it saw first of all, before it asks for the accounts.
/// At SERIALIZABLE a claim committed after this transaction's snapshot is not seen here, but the claiming run read the
/// ledger at SERIALIZABLE too (`repo::claim_and_find`), so one of the two fails to commit.
fn answered_since(
    conn: &mut PgConnection,
    t: &NewTransfer,
    seen: &mut ClaimSeen,
) -> Result<(), BodyError> {
    let now = claim_now(conn, t).map_err(BodyError::Database)?;
    match *seen {
        ClaimSeen::NotRead => {
            *seen = ClaimSeen::Read(now);
            Ok(())
        }
        ClaimSeen::Read(then) if then == now => Ok(()),
        ClaimSeen::Read(_) => Err(BodyError::Final(TransferError::NotApplied {
            id: t.id,
            reason: ANSWERED_SINCE.into(),
        })),
    }
}

/// The first reading of the claim was sent and failed (it waited behind a lock on the claims
/// table until the server's lock_timeout, its backend was ended): this run has begun, so the
/// id is taken to have been unclaimed then, and a claim a later reading finds is an answer
/// given since. Left unread, the retry took the generation a rerun had moved meanwhile for its
/// start, and applied the id after the rerun refused it (found by a helper, with the claims
/// table locked by a DBA). A claim older than this run then stops it too: "not applied", safe,
/// and a run begun after it applies the id.
fn first_reading_failed(seen: &mut ClaimSeen) {
    if *seen == ClaimSeen::NotRead {
        *seen = ClaimSeen::Read(None);
    }
}

/// `t`'s claim generation now (`None`: not claimed).
fn claim_now(conn: &mut PgConnection, t: &NewTransfer) -> diesel::QueryResult<Option<i64>> {
    Ok(repo::claim_generations(conn, &[t.id])?
        .first()
        .map(|(_, g)| *g))
}

/// One attempt. `Done(true)` when the ledger already had the transfer from an earlier run.
fn attempt(
    session: &mut Session,
    t: &NewTransfer,
    mode: Mode,
    after_ambiguous: bool,
    ticket: &Ticket,
    given: Option<&mut GivenId>,
    own: &mut Own,
) -> Attempt<bool, TransferError> {
    let conn = match connection(session) {
        Ok(conn) => conn,
        Err(step) => return step,
    };
    let (mut claim, ledger_unread) = match given {
        Some(GivenId {
            claim,
            ledger_unread,
        }) => (Some(claim), Some(ledger_unread)),
        None => (None, None),
    };
    // A rerun of a transfer the ledger has: its committed row is the answer, whoever holds the
    // accounts now. Read without locks, before the attempt waits on them: a rerun while a
    // report held one account waited until its deadline, and on a loaded machine the ledger's
    // read after that wait came too late to answer (it said "unknown"). Nothing of this run
    // exists yet, so a row found is an earlier run's.
    if let Some(unread) = ledger_unread.filter(|u| **u && !after_ambiguous) {
        // The claim's first reading comes first of all (see `answered_since`): the ledger's
        // read may wait (on CockroachDB, on another transaction's intent), and a rerun that
        // answered "not applied" meanwhile would have been taken for the starting point. (A
        // single statement checks the claim itself.)
        let first_claim = claim.as_mut().filter(|s| ***s == ClaimSeen::NotRead);
        if let Some(seen) = first_claim.filter(|_| mode == Mode::Transaction) {
            match claim_now(conn, t) {
                Ok(now) => **seen = ClaimSeen::Read(now),
                Err(e) => {
                    first_reading_failed(seen);
                    return looked_up_again(e);
                }
            }
        }
        match lookup(conn, t) {
            Ok(Some(found)) => return resolve_found(conn, t, &found, false, own),
            Ok(None) => *unread = false,
            Err(step) => return step,
        }
    }
    if after_ambiguous {
        match lookup(conn, t) {
            Ok(Some(found)) => {
                log::debug!("transfer {}: found in the ledger", t.id);
                return resolve_found(conn, t, &found, true, own);
            }
            Ok(None) => log::debug!("transfer {}: not in the ledger, running it again", t.id),
            Err(step) => return step,
        }
    }
    let mut committing = false;
    // The words of a session found gone before its COMMIT (`db::still_connected`), which the
    // failed ROLLBACK's would replace.
    let mut gone = None;
    let result = match mode {
        Mode::Transaction => conn.build_transaction().serializable().run(|c| {
            // Read first, before anything that can fail on the way to the accounts (a lock
            // timeout, a killed backend): an attempt that failed there recorded nothing, and
            // the retry took the generation a rerun had moved meanwhile for its starting point.
            if let Some(seen) = claim.as_mut().filter(|s| ***s == ClaimSeen::NotRead) {
                answered_since(c, t, seen)?;
            }
            apply(c, t)?;
            if let Some(seen) = claim.as_mut() {
                answered_since(c, t, seen)?;
            }
            if let Own::Times(times) = &mut *own {
                // Gone already, within this transaction: a DBA's trigger moved it elsewhere (it
                // said "database error: Record not found"; found by a fault-injecting helper).
                times.push(repo::created_at(c, t.id).map_err(|e| match e {
                    DieselError::NotFound => BodyError::Final(TransferError::NoLedgerRow),
                    e => BodyError::Database(e),
                })?);
            }
            // A session the server ended while bank was not reading fails here, before COMMIT
            // (see `db::still_connected`).
            if let Err(e) = crate::db::still_connected(c) {
                gone = Some(e.to_string());
                return Err(e.into());
            }
            if !ticket.enter_commit() {
                return Err(BodyError::Abandoned);
            }
            committing = true;
            Ok::<_, BodyError>(())
        }),
        Mode::SingleStatement => {
            // A connection idle since the last transfer may have been ended by the server
            // (its idle_session_timeout): found before the statement is sent, that is no commit.
            if let Err(e) = crate::db::still_connected(conn) {
                return match Attempt::retry_for(&e, false) {
                    Some(retry) => retry,
                    None => Attempt::Fail(TransferError::from(e)),
                };
            }
            if !ticket.enter_commit() {
                return Attempt::Fail(TransferError::Abandoned);
            }
            committing = true;
            apply_claiming(conn, t, own.mark())
        }
    };
    let result = match gone {
        Some(words) => Err(BodyError::Database(crate::db::closed_connection(words))),
        None => result,
    };
    // Single-statement mode found its id claimed: by a run that said "not applied" (or by an
    // earlier attempt of its own that committed: the ledger tells). The claim is there to stop a
    // statement that comes late, and this one may be just that (held in the network since
    // before that answer, its run still waiting): it cannot apply now. A transaction claims
    // nothing and is never late, so the message says to use one.
    let step = match result {
        Err(BodyError::Claimed) => match lookup(conn, t) {
            Ok(Some(found)) => resolve_found(conn, t, &found, after_ambiguous, own),
            // A marked claim is a single statement's that committed, with its ledger row: the
            // row is gone since (deleted by hand, or by a DBA's trigger), and "run it with
            // --mode transaction" moved the money a second time (found by a fault-injecting
            // helper).
            Ok(None) if repo::claim_mark(conn, t.id).is_ok_and(|m| m.is_some()) => {
                Attempt::Fail(TransferError::NotApplied {
                    id: t.id,
                    reason: "a single statement applied this id earlier (its claim says so), but \
                             its ledger row is gone (deleted since?): applying it again could \
                             move the money twice; restore the row, and see `bank verify`"
                        .into(),
                })
            }
            Ok(None) => Attempt::Fail(TransferError::NotApplied {
                id: t.id,
                reason: "its id is claimed by a run that said it was not applied, so a single \
                         statement cannot apply it (one that comes late must not); run it with \
                         --mode transaction to apply it now"
                    .into(),
            }),
            Err(step) => step,
        },
        Ok(()) => Attempt::Done(false),
        Err(BodyError::Abandoned) => Attempt::Fail(TransferError::Abandoned),
        Err(BodyError::Final(e)) => Attempt::Fail(e),
        // Refused, or the id is taken: the ledger has the last word on this id.
        Err(BodyError::Refused(e)) => match lookup(conn, t) {
            Ok(Some(found)) => {
                log::debug!("transfer {}: refused ({e}), but the ledger has it", t.id);
                resolve_found(conn, t, &found, after_ambiguous, own)
            }
            // Only a credit past INT8 can hide an earlier reason: the credited row may be
            // updated before the debited one. Insufficient funds means the debited row exists
            // and is short, so it is already the first reason, and costs no extra query. An
            // account the statement found no row of may exist after all, left unchanged by a
            // trigger of the database's: the accounts are read to tell.
            Ok(None)
                if matches!(
                    e,
                    TransferError::BalanceOverflow { .. } | TransferError::UnknownAccount(_)
                ) =>
            {
                Attempt::Fail(first_reason(conn, t, e))
            }
            Ok(None) => Attempt::Fail(e),
            Err(step) => step,
        },
        // The balances say whether it was the credit past INT8; if they show no reason of
        // bank's, a DBA's trigger overflowed a column of its own, and its words are the answer
        // (a false "balance would exceed" was given; found by a fault-injecting helper).
        Err(BodyError::OutOfRange(e)) => match lookup(conn, t) {
            Ok(Some(found)) => resolve_found(conn, t, &found, after_ambiguous, own),
            Ok(None) => Attempt::Fail(match reason_in_balances(conn, t) {
                Ok(Some(reason)) => reason,
                Ok(None) => TransferError::Database(e),
                // Unread, the statement's own reading stands.
                Err(()) => TransferError::BalanceOverflow {
                    account: t.to_id,
                    amount: t.amount,
                },
            }),
            Err(step) => step,
        },
        Err(BodyError::DuplicateId) => match lookup(conn, t) {
            Ok(Some(found)) => resolve_found(conn, t, &found, after_ambiguous, own),
            Ok(None) => Attempt::Retry {
                cause: Cause::Serialization,
                message: format!("transfer {} was reported a duplicate but is absent", t.id),
            },
            Err(step) => step,
        },
        Err(BodyError::Database(e)) => database_failure(conn, t, mode, committing, e, own),
    };
    let step = match step {
        // The server's own answer, so nothing was applied (a COMMIT it refused included; one
        // whose row the ledger has is not a failure by now).
        Attempt::Fail(e) if refused_by_the_database(&e) => {
            own_reason_first(conn, t, e, after_ambiguous, own)
        }
        step => step,
    };
    if committing {
        let maybe_applied = matches!(
            step,
            Attempt::Done(_)
                | Attempt::Retry {
                    cause: Cause::Ambiguous,
                    ..
                }
        );
        ticket.leave_commit(maybe_applied);
    }
    step
}

/// A database error the statement's own mapping left to the runner.
fn database_failure(
    conn: &mut PgConnection,
    t: &NewTransfer,
    mode: Mode,
    committing: bool,
    e: DieselError,
    own: &Own,
) -> Attempt<bool, TransferError> {
    // A COMMIT (or the statement that is its own commit) whose answer was lost may have been
    // applied; so may a COMMIT that failed in a way the classifier does not know.
    if let Some(retry) = Attempt::retry_for(&e, committing) {
        return retry;
    }
    match TransferError::from(e) {
        // Not the server's answer (a COMMIT whose ROLLBACK failed too, a broken connection):
        // whether it took effect is unknown.
        TransferError::Database(e)
            if committing
                && mode == Mode::Transaction
                && !matches!(e, DieselError::DatabaseError(..)) =>
        {
            Attempt::Retry {
                cause: Cause::Ambiguous,
                message: format!("COMMIT failed: {e}"),
            }
        }
        // The COMMIT (or the statement that is its own commit) failed in a way nobody
        // classified: the server says it rolled back (a deferred trigger or constraint raising
        // at COMMIT; taken for ambiguous, it was retried until the deadline and said "unknown",
        // and so did every rerun), but a middlebox may have said it instead. One look at the
        // ledger costs little and makes "applied" exact.
        TransferError::Database(e) if committing => match lookup(conn, t) {
            Ok(Some(found)) => {
                log::debug!("transfer {}: failed ({e}), but the ledger has it", t.id);
                resolve_found(conn, t, &found, true, own)
            }
            Ok(None) => Attempt::Fail(TransferError::Database(e)),
            // The COMMIT may have landed, whatever kept the ledger from answering: the run stays
            // ambiguous (a reviewer's find: taken for a lost connection, a run out of retries
            // said "not applied", or later took its own row for an earlier run's).
            Err(_) => Attempt::Retry {
                cause: Cause::Ambiguous,
                message: format!("COMMIT failed ({e}) and the ledger could not be asked"),
            },
        },
        domain => Attempt::Fail(domain),
    }
}

/// The ledger row of `t`'s id, if any. A lookup that fails transiently is retried: until the
/// ledger answers, no verdict can be given.
fn lookup(
    conn: &mut PgConnection,
    t: &NewTransfer,
) -> Result<Option<Transfer>, Attempt<bool, TransferError>> {
    repo::find_transfer(conn, t.id).map_err(looked_up_again)
}

/// A lookup that failed: retried when transient, since until the ledger answers no verdict can
/// be given.
fn looked_up_again<T>(e: DieselError) -> Attempt<T, TransferError> {
    match classify(&e, Phase::BeforeCommit) {
        Some(cause) => Attempt::Retry {
            cause,
            message: e.to_string(),
        },
        None => Attempt::Fail(TransferError::from(e)),
    }
}

/// A transfer that fails for more than one reason at once fails for the first, in the order
/// `transfer --file` decides in: an unknown debited account, insufficient funds, an unknown
/// credited account, a credit past INT8. The statement stops at whichever constraint the engine
/// hits first, which follows the order it updates the two rows in: the reason depended on which
/// id sorted first. The accounts are read again (the statement's transaction is over) and the
/// reason that read shows first is given; when it shows none (another transfer moved them since),
/// the statement's own.
fn first_reason(conn: &mut PgConnection, t: &NewTransfer, refused: TransferError) -> TransferError {
    match reason_in_balances(conn, t) {
        Ok(Some(reason)) => reason,
        // Both accounts are there: the one the statement found missing was left unchanged by
        // the database (a trigger), not absent; "does not exist" sent the user looking for it.
        Ok(None) => match refused {
            TransferError::UnknownAccount(id) => TransferError::AccountNotUpdated(Some(id)),
            other => other,
        },
        Err(()) => refused,
    }
}

/// The first of bank's reasons to refuse `t` that the accounts show now, in `transfer --file`'s
/// order; `None` when they show none, `Err` when they cannot be read.
fn reason_in_balances(
    conn: &mut PgConnection,
    t: &NewTransfer,
) -> Result<Option<TransferError>, ()> {
    let accounts = repo::list_ids(conn, &[t.from_id, t.to_id]).map_err(|_| ())?;
    Ok(first_reason_in(t, |id| {
        accounts.iter().find(|a| a.id == id).map(|a| a.balance)
    }))
}

/// The first of bank's reasons to refuse `t` given each account's balance (`None`: no such
/// account), in `transfer --file`'s order; `None` when there is none.
pub(crate) fn first_reason_in(
    t: &NewTransfer,
    balance: impl Fn(Uuid) -> Option<i64>,
) -> Option<TransferError> {
    match (balance(t.from_id), balance(t.to_id)) {
        (None, _) => Some(TransferError::UnknownAccount(t.from_id)),
        (Some(from), _) if from < t.amount => Some(TransferError::InsufficientFunds {
            account: t.from_id,
            amount: t.amount,
        }),
        (_, None) => Some(TransferError::UnknownAccount(t.to_id)),
        (_, Some(to)) if to.checked_add(t.amount).is_none() => {
            Some(TransferError::BalanceOverflow {
                account: t.to_id,
                amount: t.amount,
            })
        }
        _ => None,
    }
}

/// An answer that says the transfer was not applied, and that a statement of an earlier attempt
/// arriving late could make false (an id conflict cannot be: the ledger has the id).
fn says_not_applied(e: &TransferError) -> bool {
    matches!(
        e,
        TransferError::InsufficientFunds { .. }
            | TransferError::UnknownAccount(_)
            | TransferError::BalanceOverflow { .. }
            | TransferError::NotApplied { .. }
            | TransferError::NoLedgerRow
            | TransferError::AccountNotUpdated(_)
            | TransferError::Database(_)
    ) || matches!(e, TransferError::Connect(c) if !c.reaches_no_database())
}

/// A refusal of the database's own (a DBA's trigger or CHECK, a skipped ledger row), not one of
/// bank's reasons.
fn refused_by_the_database(e: &TransferError) -> bool {
    matches!(
        e,
        TransferError::NoLedgerRow | TransferError::Database(DieselError::DatabaseError(..))
    )
}

/// A DBA's refusal of a transfer bank would refuse anyway: bank's reason is given, as a file
/// gives it (its statement decides the ledger's verdicts, then unknown accounts and funds,
/// before it writes): the ledger first (the id applied already, or taken with other details),
/// then `first_reason`. One transfer at a time gave the trigger's error instead.
fn own_reason_first(
    conn: &mut PgConnection,
    t: &NewTransfer,
    refused: TransferError,
    after_ambiguous: bool,
    own: &Own,
) -> Attempt<bool, TransferError> {
    match lookup(conn, t) {
        Ok(Some(found)) => resolve_found(conn, t, &found, after_ambiguous, own),
        Ok(None) => Attempt::Fail(first_reason(conn, t, refused)),
        Err(_) => Attempt::Fail(refused),
    }
}

/// How a run tells its own ledger row from another run's with the same id and details (a second
/// run of the same transfer, while this one backed off after a lost answer).
#[derive(Debug)]
enum Own {
    /// No way: a transaction with an id this run made up, which nobody else has.
    Any,
    /// The times this run's attempts gave the row (transaction mode, a given id), read back
    /// before each COMMIT.
    Times(Vec<chrono::DateTime<chrono::Utc>>),
    /// The mark this run's statements put on the id's claim (single-statement mode: a statement
    /// is its own commit, so its row's time would come back only with the answer that was lost;
    /// its claim, written by the same statement, carries the mark instead).
    Mark(Uuid),
}

impl Own {
    fn mark(&self) -> Uuid {
        match self {
            Own::Mark(mark) => *mark,
            Own::Any | Own::Times(_) => Uuid::nil(),
        }
    }
}

/// `found`, the ledger's row of `t`'s id, as this run's answer. Before any attempt of this run may
/// have committed, an earlier run's (`already_applied`); after one whose outcome was lost
/// (`may_be_ours`), this run's, unless `own` shows it is another run's, though alike to the last
/// detail (a second run of the same transfer while this one backed off; found by a reviewer, two
/// runs said "applied").
fn resolve_found(
    conn: &mut PgConnection,
    t: &NewTransfer,
    found: &Transfer,
    may_be_ours: bool,
    own: &Own,
) -> Attempt<bool, TransferError> {
    let others = may_be_ours
        && t.matches(found)
        && match own {
            Own::Any => false,
            // None at all: no attempt of this run reached its COMMIT (an answer taken for
            // ambiguous came before it, CockroachDB's 40003 on a statement), so the row is
            // another run's (it said "applied" too; found by a reviewer).
            Own::Times(ts) => !ts.contains(&found.created_at),
            // The claim and the row are written by one statement: a row whose claim carries
            // another mark is another run's. A claim without a mark, or none, is written by
            // no statement of this run's, unless the database blanked or skipped it (a
            // trigger, a truncated table): the run took its own row for another's and said
            // "already applied" for money it had just moved (found by a reviewer). Whose row
            // it is cannot be told then.
            // Asked only after an attempt whose outcome was lost: it stays so until answered.
            Own::Mark(mark) => match repo::claim_mark(conn, t.id) {
                Ok(Some(claimed_by)) => claimed_by != *mark,
                Ok(None) => {
                    return Attempt::Fail(TransferError::OutcomeUnknown {
                        id: t.id,
                        reason: "the answer to its statement was lost, and the ledger has the \
                                 transfer, but the id's claim carries no run's mark (missing or \
                                 blank: a trigger, or a table emptied by hand), so whether this \
                                 run or another applied it cannot be told"
                            .into(),
                    })
                }
                Err(e) => {
                    return Attempt::Retry {
                        cause: Cause::Ambiguous,
                        message: format!("the ledger could not say whose the row is: {e}"),
                    }
                }
            },
        };
    resolve_duplicate(t, found, !may_be_ours || others)
}

fn resolve_duplicate(
    t: &NewTransfer,
    found: &Transfer,
    already_applied: bool,
) -> Attempt<bool, TransferError> {
    if t.matches(found) {
        Attempt::Done(already_applied)
    } else {
        Attempt::Fail(TransferError::IdConflict {
            id: found.id,
            from: found.from_id,
            to: found.to_id,
            amount: found.amount,
        })
    }
}
