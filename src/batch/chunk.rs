//! Applying one chunk of a transfer file: the chunk statement, run until every line has its
//! verdict, each statement in a transaction of its own through `retry::retry`.
//!
//! A statement decides the lines up to the first refused one that the runner did not guess
//! (`Chunk::guess_short`); the runner sends the lines after it as the next statement. Each
//! statement runs inside BEGIN … COMMIT (at READ COMMITTED on PostgreSQL unless told otherwise,
//! see `batch::Isolation`: the statement locks what it reads, so it is exact at any level),
//! so that its verdicts are back before COMMIT is sent: when the COMMIT's answer is lost, the
//! runner knows which lines that attempt applied, and when the ledger later holds them it reports
//! them `applied`, not `already_applied`, as the one-transfer runner does.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use uuid::Uuid;

use super::input::Line;
use super::statement::Chunk;
use super::{Outcome, Verdict, ANSWERED_SINCE};
use crate::db::Session;
use crate::error::{ConnectError, TransferError};
use crate::guard::{GaveUp, Ticket};
use crate::models::{NewTransfer, Transfer};
use crate::repo;
use crate::retry::{
    classify, retry_counted_unless, Attempt, Cause, Phase, RetryCounts, RetryPolicy,
    SharedRetryCounts, Stop,
};
use crate::transfer::{after_step, claim_and_find, connection, first_reason_in};

/// What a claim after a refusal is given when the run ends with an `unknown` anyway: enough for a
/// claim on accounts nobody holds (a few round trips), not for a lock wait.
const CLAIM_AT_LEAST: Duration = Duration::from_millis(250);

/// How many of the database's refusals a chunk asks a statement with no line about
/// (`ChunkRunner::refused_with_no_line`) before it takes every other for a line's own: each
/// question is a transaction, and a DBA's trigger that names each line it refuses in its words
/// would otherwise cost one per refused line.
const ASKED_PER_CHUNK: usize = 4;

/// What a runner shares with whoever watches it for a frozen server: the ticket of the
/// statement under way, when that statement started, and the verdicts already given.
#[derive(Debug, Clone)]
pub struct Watch {
    pub ticket: Ticket,
    inner: Arc<Mutex<Progress>>,
}

#[derive(Debug)]
struct Progress {
    since: Instant,
    decided: Vec<Verdict>,
    /// Lines in the statement under way (the chunk's lines after them were not sent yet).
    statement: usize,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            ticket: Ticket::new(),
            inner: Arc::new(Mutex::new(Progress {
                since: Instant::now(),
                decided: Vec::new(),
                statement: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Progress> {
        // A poisoned lock only means a panic elsewhere; the data is still what it was.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Restarts the clock: a chunk is handed over now, no statement of it sent yet.
    pub fn start(&self) {
        let mut p = self.lock();
        p.since = Instant::now();
        p.statement = 0;
    }

    /// The wait for the statement under way counts from now: this process was stopped (Ctrl-Z,
    /// SIGSTOP) and continued, and the database's answer may have waited for it.
    pub fn wait_again(&self) {
        self.lock().since = Instant::now();
    }

    /// A statement of `lines` lines starts now.
    fn start_statement(&self, lines: usize) {
        let mut p = self.lock();
        p.since = Instant::now();
        p.statement = lines;
    }

    /// Lines in the statement under way: those after the verdicts given so far that may have
    /// been sent.
    pub fn in_statement(&self) -> usize {
        self.lock().statement
    }

    /// Gives up on the statement under way if it started `wait` ago or more (`Ticket::abandon`);
    /// `None` when it did not, or when it had finished. Checked and given up under the lock that
    /// `start_statement` takes: read apart, a statement that had just started after a slow one
    /// could be given up on for the slow one's time (a reviewer's point).
    pub fn give_up_if_older(&self, wait: std::time::Duration) -> Option<GaveUp> {
        let p = self.lock();
        if p.since.elapsed() < wait {
            return None;
        }
        self.ticket.abandon()
    }

    /// The verdicts given so far in the chunk under way.
    pub fn decided(&self) -> Vec<Verdict> {
        self.lock().decided.clone()
    }

    /// `decided` and `in_statement`, read together.
    pub fn progress(&self) -> (Vec<Verdict>, usize) {
        let p = self.lock();
        (p.decided.clone(), p.statement)
    }
}

/// Why a chunk could not go on at all: nothing about its lines can be said.
#[derive(Debug)]
pub enum Fatal {
    NotMigrated(crate::error::Unmigrated),
    Connect(ConnectError),
    /// The first connection's thread could not be started: nothing was sent.
    Thread(std::io::Error),
}

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fatal::NotMigrated(u) => write!(f, "{u}"),
            Fatal::Connect(e) => write!(f, "{e}"),
            Fatal::Thread(e) => write!(f, "cannot start a thread ({e})"),
        }
    }
}

/// Applies chunks on one session, one at a time.
pub struct ChunkRunner {
    pub session: Session,
    pub policy: RetryPolicy,
    pub retries: RetryCounts,
    pub watch: Watch,
    /// Where each retry is also counted as it happens (the workload's per-second figures).
    pub live_retries: Option<Arc<SharedRetryCounts>>,
    /// Called as each statement starts (the workload's watchdog times statements, not chunks).
    pub on_statement: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Whether Ctrl-C stops the chunk between two of its statements: its other lines are never
    /// sent (`Verdict::not_attempted`).
    pub interruptible: bool,
    /// When no further statement of a chunk may start (the workload's end): a chunk with many
    /// refused lines takes a statement for each, and outlived the run.
    pub stop_at: Option<Instant>,
    /// The most lines one statement takes (`--batch`): halved each time the server cancels a
    /// statement for its `statement_timeout` (see `apply`).
    limit: usize,
    /// The lines the next statement takes, at most `limit`. A statement ends at its first refused
    /// line, and the next one starts after it; taking `limit` lines each time made a file whose
    /// debited account ran dry cost a statement over a whole chunk per refused line (3,000 such
    /// lines: 38.8 s). So the size follows the gap between refusals: twice the lines the last
    /// statement decided after a refusal, doubling again after a statement without one.
    size: usize,
    /// The lines' ids come from the caller (a file), so an earlier run's attempt at them may
    /// exist: see `nobody_else_can_commit`. The workload's ids are its own.
    ids_given: bool,
    /// With `ids_given`: each undecided line's claim generation (`None`: not claimed) as the
    /// first attempt at it read it, kept across the statements it goes through (see
    /// `answered_since`); dropped once its line is decided.
    first_claims: HashMap<Uuid, Option<i64>>,
    /// Ids another run answered "not applied" while this run was at them (a line decided
    /// `Verdict::answered_elsewhere`), shared by the run's runners: a later line with one of
    /// them, whose claim's first reading would come after that answer, is answered so too (it
    /// applied the id after the answer; found by a reviewer).
    barred: Arc<Mutex<HashSet<Uuid>>>,
    /// How the next statement's refused lines are guessed (`Chunk::guess_short`).
    guesses: Guesses,
    /// The longest that a statement of the chunk under way which said no to a line took,
    /// retries and settling included (see `claim_refused`).
    spent: Duration,
    /// The database's refusals met in the chunk under way that a statement with no line does
    /// not meet (`refused_with_no_line`): a line's own, found by splitting the statement. At
    /// most `ASKED_PER_CHUNK`: a trigger whose words name each line it refuses is asked about
    /// no more than that.
    lines_own: HashSet<String>,
    /// The chunk under way had a statement refused for a reason that is no line's own: the
    /// reason, for the run's error line.
    pub refused_whole: Option<String>,
    /// The level of each statement's transaction.
    isolation: super::Isolation,
}

/// How a runner guesses the lines a statement refuses for insufficient funds, so that the
/// statement decides them without stopping at each. Guesses from the locked balances alone are
/// wrong only where a line's id is in the ledger already (a rerun): after the first wrong one,
/// they also read the ledger for the lines' ids (one indexed read per line, paid only then),
/// for the rest of the run; wrong even so (another client wrote one of the ids meanwhile), no
/// more guesses in this chunk, whose statements then stop at each refusal.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Guesses {
    FromBalances,
    WithLedger,
    NoneInThisChunk,
}

/// One statement's verdicts: by line, for the lines it decided (all of them when nothing was
/// refused), and the refused line if any.
#[derive(Clone)]
struct Decided {
    verdicts: HashMap<u64, Outcome>,
    refused: Option<u64>,
    /// Lines refused because their `to` account does not exist (else it is `from`).
    unknown_to: HashSet<u64>,
    /// `refused` is a line the runner guessed short that is not: undecided, it goes again.
    wrong_guess: bool,
}

impl ChunkRunner {
    pub fn new(session: Session, policy: RetryPolicy) -> ChunkRunner {
        ChunkRunner {
            session,
            policy,
            retries: RetryCounts::default(),
            watch: Watch::new(),
            live_retries: None,
            on_statement: None,
            interruptible: false,
            stop_at: None,
            limit: usize::MAX,
            size: usize::MAX,
            ids_given: false,
            first_claims: HashMap::new(),
            barred: Arc::default(),
            guesses: Guesses::FromBalances,
            spent: Duration::ZERO,
            lines_own: HashSet::new(),
            refused_whole: None,
            isolation: super::Isolation::default(),
        }
    }

    /// Statements' transactions at `isolation`.
    pub fn isolated(mut self, isolation: super::Isolation) -> ChunkRunner {
        self.isolation = isolation;
        self
    }

    /// Shares the ids answered elsewhere (`barred`) with the run's other runners.
    pub fn barring(mut self, barred: Arc<Mutex<HashSet<Uuid>>>) -> ChunkRunner {
        self.barred = barred;
        self
    }

    /// The lines' ids come from the caller, as `Runner::id_given`.
    pub fn ids_given(mut self) -> ChunkRunner {
        self.ids_given = true;
        self
    }

    /// Statements of at most `lines` lines.
    pub fn at_most(mut self, lines: usize) -> ChunkRunner {
        self.limit = lines.max(1);
        self
    }

    /// One verdict per line of `lines`, in order.
    pub fn apply(&mut self, lines: &[Line]) -> Result<Vec<Verdict>, Fatal> {
        self.watch.lock().decided.clear();
        // The chunk's verdicts as they are; the watcher sees them as `shown`.
        let mut decided: Vec<Verdict> = Vec::with_capacity(lines.len());
        self.size = self.limit;
        self.spent = Duration::ZERO;
        self.lines_own.clear();
        self.refused_whole = None;
        if self.guesses == Guesses::NoneInThisChunk {
            self.guesses = Guesses::WithLedger;
        }
        let mut start = 0;
        while start < lines.len() {
            let interrupted = self.interruptible && crate::interrupt::interrupted();
            let over = self.stop_at.is_some_and(|t| Instant::now() >= t);
            if start > 0 && (interrupted || over) {
                let never = Verdict::not_attempted(match interrupted {
                    true => crate::interrupt::reason(),
                    false => "the run's time was up",
                });
                let rest = lines.len() - start;
                decided.extend(vec![never.clone(); rest]);
                self.watch.lock().decided.extend(vec![never; rest]);
                break;
            }
            let size = self.size.min(self.limit);
            let rest = &lines[start..lines.len().min(start.saturating_add(size))];
            log::debug!(
                "chunk statement of {} lines, from line {}",
                rest.len(),
                rest.first().map_or(0, |l| l.line)
            );
            self.watch.start_statement(rest.len());
            if let Some(hook) = &self.on_statement {
                hook();
            }
            if !self.watch.ticket.begin() {
                // The watcher gave up on this runner: it reports the chunk itself.
                return Ok(Vec::new());
            }
            let sent = Instant::now();
            let step = self.statement(rest);
            let took = sent.elapsed();
            if !self.watch.ticket.finish() {
                // Given up on while the statement ran: the watcher counted its lines from what
                // was decided before it, so they are not added now (counted twice otherwise).
                return Ok(Vec::new());
            }
            let mut step = step?;
            // The database's own refusal: first, whether a statement with no line meets it too
            // (a privilege bank's statements need, a read-only transaction, a DBA's statement
            // trigger). Then no line is at fault and every statement would meet it: splitting
            // this one down to single lines refused each in turn, two statements a line (20,000
            // lines refused for a revoked INSERT: 40,035 statements, 46 s). Its lines get what
            // one transfer at a time says of each, at once, and the file goes on: each statement
            // after it is sent whole (the refusal may be lifted meanwhile, a privilege granted
            // back), and one it refuses again is asked about again: a statement trigger dropped
            // while a row trigger refusing some lines in the same words stays (one function for
            // both) made the later statement's other lines `refused` where one transfer at a
            // time applied them (`a_refusal_lifted_mid_file_is_asked_about_again`). A question
            // a statement, not a line: 20,000 lines, 200 statements and 200 questions.
            if let Err(failed) = &step {
                if failed.by_database
                    && self.lines_own.len() < ASKED_PER_CHUNK
                    && !self.lines_own.contains(&failed.reason)
                {
                    let reason = failed.reason.clone();
                    match self.watched(rest.len(), |r| r.refused_with_no_line()) {
                        None => return Ok(Vec::new()),
                        Some(Some(same)) if same == reason => {
                            step = Err(Failed {
                                whole: true,
                                ..Failed::new(Outcome::Refused, reason)
                            });
                        }
                        // A refusal some lines meet (a trigger's, a CHECK's): split until the
                        // line is alone, as before; not asked again in this chunk.
                        Some(_) => {
                            self.lines_own.insert(reason);
                        }
                    }
                }
            }
            let given: Vec<Verdict> = match step {
                Err(Failed {
                    whole: true,
                    reason,
                    ..
                }) => {
                    let settled =
                        match self.watched(rest.len(), |r| r.settle_refused_lines(rest, &reason)) {
                            Some(v) => v,
                            None => return Ok(Vec::new()),
                        };
                    log::debug!("a refusal that is no line's own: {reason}");
                    self.refused_whole.get_or_insert_with(|| {
                        format!("the database refuses any statement, whatever its lines ({reason})")
                    });
                    self.size = self.limit;
                    let mut given = settled;
                    // A line left unknown: as after any statement not settled, the chunk's
                    // lines after it are not sent (their outcomes could depend on it).
                    if let Some(first) = given.iter().find(|v| v.outcome.is_unsettled()) {
                        let did = first.outcome.held_up_because();
                        given.extend(lines[start + rest.len()..].iter().map(|_| {
                            Verdict::not_attempted(format_args!(
                                "an earlier statement {did} ({reason})"
                            ))
                        }));
                    }
                    given
                }
                // The server's statement_timeout cancelled the chunk statement, which changed
                // nothing: its lines go again, half as many per statement, so that a server
                // timeout shorter than a chunk's statement does not fail the file.
                Err(Failed { split: true, .. }) => {
                    self.limit = (rest.len() / 2).max(1);
                    continue;
                }
                // The database refused the statement with an error of its own (a DBA's trigger
                // or CHECK): the lines go again, half as many per statement, until the one it
                // refuses is alone; that one is `refused`, and the others get their one-by-one
                // outcomes. The statement holding it failed whole, and it and every line after it
                // were `not_applied`, on every rerun too.
                // Another run answered one line "not applied" while this statement was being
                // retried: the lines before it go again alone (their outcomes do not depend on
                // it), then it is `not_applied`, and the rest follow as after any refusal.
                Err(Failed {
                    answered: Some(line),
                    ..
                }) => match rest.iter().position(|l| l.line == line) {
                    Some(i) if i > 0 => {
                        self.size = i;
                        continue;
                    }
                    _ => {
                        self.size = 2;
                        if let Ok(mut barred) = self.barred.lock() {
                            barred.insert(rest[0].transfer.id);
                        }
                        vec![Verdict::answered_elsewhere()]
                    }
                },
                Err(failed) if failed.outcome == Outcome::Refused && rest.len() > 1 => {
                    self.size = (rest.len() / 2).max(1);
                    continue;
                }
                Err(failed) if failed.outcome == Outcome::Refused => {
                    // Back to larger statements after it, doubling as after any refusal.
                    self.size = 2;
                    match self.watched(1, |r| r.settle_refused(&rest[0], failed.reason)) {
                        Some(v) => vec![v],
                        None => return Ok(Vec::new()),
                    }
                }
                Ok(decided) => {
                    let refused = decided
                        .refused
                        .and_then(|r| rest.iter().position(|l| l.line == r));
                    // A line wrongly guessed short is undecided: it starts the next statement.
                    let end = refused.map_or(rest.len(), |i| i + usize::from(!decided.wrong_guess));
                    self.size = match refused {
                        Some(i) if decided.wrong_guess => {
                            self.guesses = match self.guesses {
                                Guesses::FromBalances => Guesses::WithLedger,
                                _ => Guesses::NoneInThisChunk,
                            };
                            log::debug!(
                                "line {} is not short as guessed: guesses now {:?}",
                                rest[i].line,
                                self.guesses
                            );
                            rest.len()
                        }
                        Some(_) => end.saturating_mul(2),
                        None => size.saturating_mul(2),
                    };
                    rest[..end].iter().map(|l| verdict(l, &decided)).collect()
                }
                // Not settled: every line of this statement shares its fate, and the chunk's
                // lines after it were never sent.
                // A line whose id the ledger has, after attempts that only waited on others'
                // locks, is answered from its row: committed, whoever holds the accounts now (a
                // rerun of lines applied long ago said "unknown" while a report held one
                // account; found by a helper playing a new user). Not after an attempt whose
                // COMMIT went unanswered: the row may be this run's own.
                Err(failed) => {
                    let ledger = match failed.held_up {
                        true => match self.watched(rest.len(), |r| r.ledger_rows(rest)) {
                            Some(rows) => rows,
                            None => return Ok(Vec::new()),
                        },
                        false => HashMap::new(),
                    };
                    let mut given: Vec<Verdict> = rest
                        .iter()
                        .map(|l| match ledger.get(&l.transfer.id) {
                            Some(row) => ledger_verdict(&l.transfer, row),
                            None => Verdict {
                                outcome: failed.outcome,
                                error: Some(failed.reason.clone()),
                            },
                        })
                        .collect();
                    given.extend(lines[start + rest.len()..].iter().map(|_| {
                        Verdict::not_attempted(format_args!(
                            "an earlier statement {} ({})",
                            failed.outcome.held_up_because(),
                            failed.reason
                        ))
                    }));
                    given
                }
            };
            // The lines a statement says no to are claimed with what is left of its deadline.
            if given.iter().any(says_no) {
                self.spent = self.spent.max(took);
            }
            for line in &lines[start..(start + given.len()).min(lines.len())] {
                self.first_claims.remove(&line.transfer.id);
            }
            start += given.len();
            let shown: Vec<Verdict> = given.iter().map(|v| self.shown(v)).collect();
            decided.extend(given);
            self.watch.lock().decided.extend(shown);
        }
        if self.ids_given {
            self.claim_refused(lines, &mut decided);
        }
        self.watch.lock().decided.clear();
        Ok(decided)
    }

    /// Claims the ids of the lines refused on their merits or by the database, or not applied
    /// (held up and settled) (`repo::claim_ids`), as `bank transfer --id` does before it says
    /// "not applied": a single statement of an earlier run's attempt at one of them that comes
    /// late then fails on its claim. A refused line the ledger has by then (such a statement
    /// committed while the claim waited for it) gets the ledger's answer; a claim that cannot be
    /// written leaves the lines `unknown`. `decided` holds the chunk's verdicts as they are; the
    /// watcher has seen these lines `unknown` since each was decided (`shown`), and sees them
    /// as they are once this is done.
    ///
    /// The claim is a statement with what is left of the deadline that the slowest statement
    /// refusing one of its lines spent, and at least `CLAIM_AT_LEAST` (for a lock freed just
    /// then); when a line
    /// of the chunk is `unknown` already, the run ends with exit 3 and a rerun settles every
    /// line anyway, and the claim has `CLAIM_AT_LEAST`. After a statement held up by another
    /// session's lock until its deadline, the claim waited on the same lock for a full deadline
    /// more, and the run took twice `--timeout` (found by a fault-injecting helper). Cut short
    /// whatever the chunk's other lines met, a line refused at once ended `unknown` where a
    /// claim in its own time would have settled it (found by a reviewer): a chunk whose refusing
    /// statements were quick gives its claim a whole deadline, however slow the statements that
    /// refused nothing. (One claim serves the chunk: a line refused quickly shares the wait of
    /// one refused by a slow statement.)
    fn claim_refused(&mut self, lines: &[Line], decided: &mut [Verdict]) {
        if !decided.iter().any(says_no) {
            return;
        }
        // A line an earlier line of these applied the id of (its statement committed) has the
        // one-by-one verdict of a repeat: already applied, or an id conflict. A statement the
        // server failed whole (a full disk) said "not applied" of such a line too, its id in
        // the ledger by this run's doing (found by a fault-injecting helper).
        let mut applied_before: HashMap<Uuid, NewTransfer> = HashMap::new();
        for (l, v) in lines.iter().zip(decided.iter_mut()) {
            match applied_before.get(&l.transfer.id) {
                Some(first) if says_no(v) => *v = repeat_verdict(&l.transfer, l.transfer == *first),
                Some(_) => {}
                None if v.outcome == Outcome::Applied => {
                    applied_before.insert(l.transfer.id, l.transfer);
                }
                None => {}
            }
        }
        if !decided.iter().any(says_no) {
            return;
        }
        // An id that a later line of these (the same id, funded by then) applied is in the
        // ledger by this run's doing: its refused line keeps its one-by-one verdict. (Every id
        // a line of these applied is in `applied_before` by now.)
        let mut ids = Vec::new();
        let mut refused = Vec::new();
        let mut accounts = Vec::new();
        for (i, (l, v)) in lines.iter().zip(decided.iter()).enumerate() {
            if says_no(v) && !applied_before.contains_key(&l.transfer.id) {
                ids.push(l.transfer.id);
                refused.push(i);
                accounts.extend([l.transfer.from_id, l.transfer.to_id]);
            }
        }
        if ids.is_empty() {
            return;
        }
        self.watch.start_statement(0);
        if !self.watch.ticket.begin() {
            return;
        }
        // What a statement of the chunk spent of its deadline, the claim does not get again: a
        // claim waiting a deadline more, on a lock the statement met (`transfer_claims` locked
        // by another session, which the check for other sessions' locks on the accounts and
        // the ledger does not see), or on a link that went down while an unanswered COMMIT was
        // being settled, took the run to twice `--timeout` (found by fault-injecting helpers).
        let wait = match decided.iter().any(|v| v.outcome == Outcome::Unknown) {
            true => CLAIM_AT_LEAST,
            false => self
                .policy
                .timeout
                .saturating_sub(self.spent)
                .max(CLAIM_AT_LEAST),
        }
        .min(self.policy.timeout);
        let policy = RetryPolicy {
            timeout: wait,
            ..self.policy
        };
        let ledger = claim_and_find(
            &mut self.session,
            &policy,
            &self.watch.ticket,
            &ids,
            &accounts,
            // Its statements' own bound, lowered only where bank set the session's: a server's
            // stricter statement_timeout is kept (raised, a claim could wait past it; found by
            // a reviewer).
            crate::db::own_statement_timeout()
                .filter(|own| wait < *own)
                .map(|_| wait),
        );
        let _ = self.watch.ticket.finish();
        for &i in &refused {
            let (Some(line), Some(v)) = (lines.get(i), decided.get_mut(i)) else {
                continue;
            };
            let t = &line.transfer;
            match &ledger {
                Ok(found) => {
                    if let Some(f) = found.iter().find(|f| f.id == t.id) {
                        *v = ledger_verdict(t, f);
                    }
                }
                Err(e) => {
                    let was = v.error.clone().unwrap_or_else(|| v.outcome.as_str().into());
                    *v = Verdict {
                        outcome: Outcome::Unknown,
                        error: Some(format!(
                            "not applied ({was}), but its id could not be claimed ({e}), so \
                             an earlier run's attempt at it may still commit"
                        )),
                    };
                }
            }
        }
    }

    /// A verdict as the watcher is to see it until the chunk is done: with ids given, a line
    /// this run says no to is `unknown` until its id is claimed (`claim_refused`). A run given
    /// up before that (a frozen server, a connection that could not be made again) reported the
    /// refusal with no claim written, and an earlier run's late statement could still apply it
    /// (found by reviewers, twice). "Confirmed": the claim's COMMIT may have been sent, its answer
    /// lost ("before it claimed the id" was untrue then; found by a fault-injecting helper).
    fn shown(&self, v: &Verdict) -> Verdict {
        if !self.ids_given || !says_no(v) {
            return v.clone();
        }
        let was = v.error.clone().unwrap_or_else(|| v.outcome.as_str().into());
        Verdict {
            outcome: Outcome::Unknown,
            error: Some(format!(
                "not applied ({was}), but the run stopped before its claim of the id was \
                 confirmed, so an earlier run's attempt at it may still commit"
            )),
        }
    }

    /// After attempts held up by other transactions' locks or a connection that failed: the
    /// lines' ids come from the file, so an earlier run's attempt at them (an orphan whose
    /// COMMIT is still on its way) may hold exactly those locks, or wait behind a table lock.
    /// Only when nothing holds the accounts or keeps a transfer out of the tables now
    /// (`repo::accounts_free`) and the ledger has none of the ids is "not applied" the truth;
    /// the same rule as `bank transfer --id` (`Runner`).
    fn nobody_else_can_commit(&mut self, accounts: &[Uuid], lines: &[Line]) -> bool {
        // Statements of their own, watched from the moment a connection is there (the held-up
        // statement's, on which the server has just answered, or a new one): run at the end of
        // the held-up statement's time, they had a mere grace left, and on a loaded machine the
        // lines were given up "no answer from the database" though the server had answered. A
        // new connection is made under the statement's own deadline: restarted before it, a
        // server that never answers a login made each restart wait again, and the run took
        // three times its deadline.
        let Ok(conn) = self.session.conn() else {
            return false;
        };
        self.watch.start_statement(lines.len());
        if !repo::accounts_free(conn, accounts) {
            return false;
        }
        let ids: Vec<Uuid> = lines.iter().map(|l| l.transfer.id).collect();
        repo::count_transfers_with_ids(conn, &ids) == Ok(0)
    }

    /// Runs `read`, the reads that settle a statement's `lines` once it has ended (a held-up
    /// statement's ledger rows, a refused line's probe), watched as a statement is: they ran
    /// after the watch had ended, so a server that froze in them kept the run waiting forever
    /// (its kernel still acknowledges every packet). `None` when the watcher gave up on them:
    /// it reports the chunk.
    fn watched<T>(&mut self, lines: usize, read: impl FnOnce(&mut Self) -> T) -> Option<T> {
        // Watched from the moment a connection is there; a new one is made under the
        // statement's own deadline (see `nobody_else_can_commit`).
        let connected = self.session.is_connected();
        if connected {
            self.watch.start_statement(lines);
        }
        if let Some(hook) = &self.on_statement {
            hook();
        }
        if !self.watch.ticket.begin() {
            return None;
        }
        if !connected && self.session.conn().is_ok() {
            self.watch.start_statement(lines);
        }
        let out = read(self);
        self.watch.ticket.finish().then_some(out)
    }

    /// The ledger rows of `lines`' ids, read without locks; none when the ledger cannot be
    /// asked.
    fn ledger_rows(&mut self, lines: &[Line]) -> HashMap<Uuid, Transfer> {
        let ids: Vec<Uuid> = lines.iter().map(|l| l.transfer.id).collect();
        let Ok(conn) = self.session.conn() else {
            return HashMap::new();
        };
        repo::transfers_by_id(conn, &ids).unwrap_or_default()
    }

    /// A line the database refused alone with an error of its own (a DBA's trigger or CHECK, a
    /// read-only database, a revoked privilege): `settle_refused_lines` for one line.
    fn settle_refused(&mut self, line: &Line, reason: String) -> Verdict {
        self.settle_refused_lines(std::slice::from_ref(line), &reason)
            .pop()
            .unwrap_or_else(|| Verdict::not_attempted("no verdict"))
    }

    /// Lines the database refused with an error of its own (a DBA's trigger or CHECK, a
    /// read-only database, a revoked privilege), each as `bank transfer --id` answers it. The
    /// ledger first: an id an earlier run applied is `already_applied` (with other details,
    /// `id_conflict`); the refusal said `refused` for those too. Then, since the refusal may
    /// have come before the lines' accounts were locked, the probe of a held-up attempt:
    /// `refused` only once nothing can still be committing the lines; an earlier run's attempt
    /// holding their accounts, or accounts that cannot even be probed (a read-only database),
    /// leave them `unknown`. One read of the ledger and one probe for all of them.
    fn settle_refused_lines(&mut self, lines: &[Line], reason: &str) -> Vec<Verdict> {
        let unknown = |why: &str| Verdict {
            outcome: Outcome::Unknown,
            error: Some(format!(
                "the database refused it ({reason}), {why}, so an earlier run's attempt at it \
                 may still commit"
            )),
        };
        let not_asked = || vec![unknown("and the ledger could not be asked"); lines.len()];
        let Ok(conn) = self.session.conn() else {
            return not_asked();
        };
        let ids: Vec<Uuid> = lines.iter().map(|l| l.transfer.id).collect();
        let Ok(ledger) = repo::transfers_by_id(conn, &ids) else {
            return not_asked();
        };
        let mut accounts: Vec<Uuid> = lines
            .iter()
            .filter(|l| !ledger.contains_key(&l.transfer.id))
            .flat_map(|l| [l.transfer.from_id, l.transfer.to_id])
            .collect();
        accounts.sort_unstable();
        accounts.dedup();
        // The accounts another transaction holds, asked for each at once: one held account (a
        // client's transaction that took it the moment this statement let it go) left every
        // line of the statement `unknown` (and the rest of the file unsent), where one transfer
        // at a time, as each line was answered before the lines were answered together,
        // refuses every line over free accounts (found by a reviewer). Not told apart (an
        // engine without `SKIP LOCKED`), all of them as before; `None`: none can be probed.
        let held = match !self.ids_given || accounts.is_empty() {
            true => Some(HashSet::new()),
            false => repo::accounts_held(conn, &accounts)
                .or_else(|| repo::accounts_free(conn, &accounts).then(HashSet::new)),
        };
        let free = |t: &NewTransfer| {
            held.as_ref()
                .is_some_and(|h| !h.contains(&t.from_id) && !h.contains(&t.to_id))
        };
        // A line bank refuses anyway gets bank's reason, as one transfer at a time gives it
        // (`own_reason_first`): none of these lines moved money, so each meets the balances as
        // they are. Unread, the database's refusal stands.
        let balances: Option<HashMap<Uuid, i64>> = match held.is_some() {
            true => repo::list_ids(conn, &accounts)
                .ok()
                .map(|rows| rows.into_iter().map(|a| (a.id, a.balance)).collect()),
            false => None,
        };
        lines
            .iter()
            .map(|l| match ledger.get(&l.transfer.id) {
                Some(found) => ledger_verdict(&l.transfer, found),
                None if free(&l.transfer) => {
                    let own = balances
                        .as_ref()
                        .and_then(|b| first_reason_in(&l.transfer, |id| b.get(&id).copied()));
                    match own {
                        Some(e) => Verdict {
                            outcome: Outcome::of_failure(&e),
                            error: Some(e.to_string()),
                        },
                        None => Verdict {
                            outcome: Outcome::Refused,
                            error: Some(reason.to_string()),
                        },
                    }
                }
                None => unknown("and its accounts could not be probed"),
            })
            .collect()
    }

    /// The error the chunk statement meets with no line at all, run as an attempt runs it (the
    /// claims read, the accounts locked, the ledger read, the statement) and rolled back; `None`
    /// when it meets none, or one that is no refusal (a conflict, a lost connection). Such an
    /// error is no line's own: a missing privilege (42501), a read-only transaction (25006, a
    /// hot standby too), a DBA's statement trigger. Asked rather than read from the words or
    /// the SQLSTATE, which a DBA's row trigger may raise for some lines only.
    fn refused_with_no_line(&mut self) -> Option<String> {
        let (ids_given, guesses) = (self.ids_given, self.guesses);
        let conn = self.session.conn().ok()?;
        // A DBA's trigger that runs after the statement sees what its lines changed: a reserve
        // account that must end each statement above a floor, below it now, refuses a statement
        // with no line, and the same statement over a line that tops it up not at all. Lines
        // one by one may pass it: they are split as for any line's own refusal.
        if repo::after_statement_triggers(conn).unwrap_or(false) {
            return None;
        }
        let probe = begin(conn, self.isolation).run::<(), DieselError, _>(|c| {
            if ids_given {
                repo::claim_generations(c, &[])?;
            }
            let locked = repo::lock_accounts(c, &[])?;
            if guesses == Guesses::WithLedger {
                repo::ids_in_ledger(c, &[])?;
            }
            Chunk::new(&[]).statement(&locked, Vec::new()).load::<(
                i64,
                String,
                Option<chrono::DateTime<chrono::Utc>>,
            )>(c)?;
            Err(DieselError::RollbackTransaction)
        });
        match probe {
            Err(e @ DieselError::DatabaseError(..))
                if classify(&e, Phase::BeforeCommit).is_none() =>
            {
                Some(TransferError::Database(e).to_string())
            }
            _ => None,
        }
    }

    /// Runs the statement over `lines` until it commits, or it cannot.
    fn statement(&mut self, lines: &[Line]) -> Result<Result<Decided, Failed>, Fatal> {
        let started = Instant::now();
        let mut retries = RetryCounts::default();
        let mut ambiguous = false;
        // The verdicts of each attempt whose COMMIT went unanswered. Each later attempt, holding
        // the accounts, asks whether one of them committed (`committed_attempt`): if one did, its
        // verdicts are the statement's; if none did, a line the ledger now has is another run's
        // doing, `already_applied` (it was taken for this run's, `applied`, found by a reviewer).
        let mut unanswered: Vec<Attempted> = Vec::new();
        let chunk = Chunk::new(lines);
        let mut accounts: Vec<Uuid> = lines
            .iter()
            .flat_map(|l| [l.transfer.from_id, l.transfer.to_id])
            .collect();
        accounts.sort_unstable();
        accounts.dedup();
        let (session, ticket) = (&mut self.session, &self.watch.ticket);
        let live_retries = self.live_retries.as_deref();
        let mut too_long = false;
        // The line found answered since the first attempt at it, if any (`answered_since`).
        let mut answered: Option<u64> = None;
        let ids_given = self.ids_given;
        let guesses = self.guesses;
        let isolation = self.isolation;
        let first_claims = &mut self.first_claims;
        let barred = Arc::clone(&self.barred);
        let gave_up = || ticket.is_abandoned();
        let result = retry_counted_unless(&self.policy, &mut retries, live_retries, gave_up, |n| {
            if ticket.is_abandoned() {
                return Attempt::Fail(TransferError::Abandoned);
            }
            let reused = session.is_connected();
            let conn = match connection(session) {
                Ok(conn) => conn,
                // Through `after_step`, as every other step: a connection lost while the schema
                // was checked is dropped there, and the next attempt connects anew (returned as
                // it was, each retry checked again on the dead connection until the retries
                // were spent, and the whole file ended `unknown`).
                Err(step) => return after_step(step, n, reused, session, ticket),
            };
            // This attempt's verdicts, once it has them.
            let mut last: Option<Attempted> = None;
            let mut committing = false;
            let mut locked_all = false;
            // The words of a session found gone before its COMMIT (`db::still_connected`),
            // which the failed ROLLBACK's would replace.
            let mut gone = None;
            let result = begin(conn, isolation).run(|c| {
                crate::db::wait_out_rewrites(c, "accounts, transfers, transfer_claims")?;
                // The claims of lines no attempt has read yet, first of all: an attempt that
                // failed before its verdicts (a lock timeout, a killed backend) recorded none,
                // and a retry took the generation a rerun had moved meanwhile for its starting
                // point (`answered_since`).
                if ids_given {
                    first_claims_of(c, lines, first_claims)?;
                }
                // Locked by a statement of its own, which returns the balances the chunk
                // statement starts from. Locked inside the chunk statement, at READ COMMITTED,
                // balances read by its CTE could be older than the rows its UPDATE moved (a CHECK
                // violation under contention,
                // `a_batched_workload_keeps_every_invariant_at_both_isolation_levels`).
                // A late COMMIT whose rows are in the ledger has landed for good: read first,
                // without the accounts, it is known even where this attempt could commit nothing
                // (a server whose commits wait for a synchronous standby that is gone: locking
                // the accounts is a write, and the lines stayed unknown).
                let landed = match unanswered.is_empty() {
                    true => None,
                    false => committed_attempt(c, lines, &unanswered)?,
                };
                let (locked, landed) = match landed {
                    Some(done) => (Vec::new(), Some(done)),
                    None => {
                        let locked = repo::lock_accounts(c, &accounts)?;
                        locked_all = true;
                        // Holding the accounts, so an attempt whose COMMIT is late has landed
                        // or never will.
                        let landed = committed_attempt(c, lines, &unanswered)?;
                        (locked, landed)
                    }
                };
                // If one committed, its verdicts stand: a line it refused (guessed short)
                // before lines it applied would be judged again against balances that hold those
                // later lines' moves (found with a cut COMMIT: a refused line came back applied).
                if let Some(done) = landed {
                    last = Some(done.clone());
                    if let Err(e) = crate::db::still_connected(c) {
                        gone = Some(e.to_string());
                        return Err(e.into());
                    }
                    if !ticket.enter_commit() {
                        return Err(Rollback::Abandoned);
                    }
                    committing = true;
                    return Ok(done.decided);
                }
                let short = match guesses {
                    Guesses::NoneInThisChunk => vec![false; lines.len()],
                    Guesses::FromBalances => chunk.guess_short(&locked, &HashSet::new()),
                    Guesses::WithLedger => {
                        let ids: Vec<Uuid> = lines.iter().map(|l| l.transfer.id).collect();
                        let found = repo::ids_in_ledger(c, &ids)?;
                        chunk.guess_short(&locked, &found.into_iter().collect())
                    }
                };
                let rows = chunk.statement(&locked, short).load::<(
                    i64,
                    String,
                    Option<chrono::DateTime<chrono::Utc>>,
                )>(c)?;
                let (decided, at) = read_rows(lines, rows)?;
                let applying: Vec<&Line> = applied(lines, &decided).collect();
                if ids_given {
                    if let Some(line) = answered_since(c, &applying, first_claims, &barred)? {
                        return Err(Rollback::AnsweredSince(line));
                    }
                }
                // The time this statement's rows carry (one `clock_timestamp()` for all, from
                // the statement's result): after a lost COMMIT, rows of another time are
                // another run's, though alike to the last detail (a second run of the same file
                // from the same balances).
                last = Some(Attempted {
                    decided: decided.clone(),
                    at,
                });
                // A session the server ended while bank was not reading fails here, before
                // COMMIT (see `db::still_connected`).
                if let Err(e) = crate::db::still_connected(c) {
                    gone = Some(e.to_string());
                    return Err(e.into());
                }
                if !ticket.enter_commit() {
                    return Err(Rollback::Abandoned);
                }
                committing = true;
                Ok(decided)
            });
            let result = match gone {
                Some(words) => Err(Rollback::Database(crate::db::closed_connection(words))),
                None => result,
            };
            // An attempt that failed before it read its lines' claims (it waited out a rewrite
            // of the claims table, or the reading itself waited behind a DBA's lock, until the
            // lock_timeout; its backend was ended) has begun all the same: each id it did not
            // read is taken for unclaimed then, so a claim found later is an answer given since.
            // Left unread, the retry took the generation a rerun had moved meanwhile for its
            // start and applied the line after the rerun refused it (found by a helper; as
            // `bank transfer --id`, `runner::first_reading_failed`).
            if ids_given && result.is_err() {
                for l in lines {
                    first_claims.entry(l.transfer.id).or_insert(None);
                }
            }
            let step = match result {
                Ok(decided) => Attempt::Done(decided),
                Err(Rollback::Abandoned) => Attempt::Fail(TransferError::Abandoned),
                Err(Rollback::Bug(message)) => Attempt::Fail(TransferError::Database(
                    DieselError::QueryBuilderError(message.into()),
                )),
                Err(Rollback::NoLedgerRow) => Attempt::Fail(TransferError::NoLedgerRow),
                Err(Rollback::NotUpdated) => Attempt::Fail(TransferError::AccountNotUpdated(None)),
                // Final for this statement: reported below as that line's verdict (`answered`).
                Err(Rollback::AnsweredSince(line)) => {
                    answered = Some(line);
                    let id = lines.iter().find(|l| l.line == line).map(|l| l.transfer.id);
                    Attempt::Fail(TransferError::NotApplied {
                        id: id.unwrap_or_default(),
                        reason: ANSWERED_SINCE.into(),
                    })
                }
                // Cancelled by a timeout once its locks were held: the statement itself
                // outlasted the server's statement_timeout, and a retry of the same lines would
                // too. (Waiting for locks, a retry may well get them.)
                Err(Rollback::Database(e))
                    if locked_all
                        && !committing
                        && !ambiguous
                        && lines.len() > 1
                        && cancelled_by_statement_timeout(&e) =>
                {
                    too_long = true;
                    Attempt::Fail(TransferError::from(e))
                }
                // The server answered the COMMIT with an error nobody classified (a deferred
                // trigger or constraint raising at COMMIT; or a middlebox's, after the server
                // committed). One look at the ledger tells: none of the lines there, it rolled
                // back. Taken for ambiguous, it was retried until the deadline and its lines
                // ended "unknown", on every rerun too.
                Err(Rollback::Database(e))
                    if committing
                        && commit_refused(conn, &e, lines, last.as_ref().map(|a| &a.decided)) =>
                {
                    Attempt::Fail(TransferError::from(e))
                }
                Err(Rollback::Database(e)) => failure(e, committing),
            };
            if committing {
                ticket.leave_commit(matches!(
                    step,
                    Attempt::Done(_)
                        | Attempt::Retry {
                            cause: Cause::Ambiguous,
                            ..
                        }
                ));
            }
            let step = after_step(step, n, reused, session, ticket);
            if let Attempt::Retry {
                cause: Cause::Ambiguous,
                ..
            } = &step
            {
                ambiguous = true;
                if let Some(attempted) = last {
                    unanswered.push(attempted);
                }
            }
            step
        });
        self.retries += retries;
        if too_long {
            // Counted as the retry it is: the same lines go again, in smaller statements.
            self.retries.add(Cause::Timeout);
            if let Some(live) = live_retries {
                live.add(Cause::Timeout);
            }
            return Ok(Err(Failed {
                split: true,
                ..Failed::new(
                    Outcome::NotApplied,
                    "cancelled by the server's statement_timeout".into(),
                )
            }));
        }
        if let Some(line) = answered {
            return Ok(Err(Failed {
                answered: Some(line),
                ..Failed::new(Outcome::NotApplied, ANSWERED_SINCE.into())
            }));
        }
        let fail = |outcome, reason: String| Ok(Err(Failed::new(outcome, reason)));
        match result {
            Ok(decided) => Ok(Ok(decided)),
            // First: after a COMMIT that went unanswered, even a schema missing or a server
            // that cannot be reached (a failover to another host) leaves these lines unknown;
            // the next statement meets the same and ends the run.
            Err(Stop::Failed(e)) if ambiguous => fail(
                Outcome::Unknown,
                format!("an attempt's COMMIT went unanswered, then: {e}"),
            ),
            // Changed in ways bank refuses, or out of this connection's reach: nothing was sent,
            // but whether an earlier run applied these lines cannot be learned until that is put
            // right (as for `--id`; `Unmigrated::ledger_may_hold_ids`).
            Err(Stop::Failed(TransferError::NotMigrated(u))) if u.ledger_may_hold_ids() => {
                fail(Outcome::Unknown, u.to_string())
            }
            Err(Stop::Failed(TransferError::NotMigrated(u))) => Err(Fatal::NotMigrated(u)),
            Err(Stop::Failed(TransferError::Connect(e))) => Err(Fatal::Connect(e)),
            // Out of disk or memory: no line is at fault, and halving the statement until one
            // is alone refused every line in turn, two statements and a claim each (ten minutes
            // for 100,000 lines on a full disk). Nothing applied; the file stops after it.
            Err(Stop::Failed(TransferError::Database(e @ DieselError::DatabaseError(..))))
                if crate::error::is_out_of_resources(&e.to_string()) =>
            {
                fail(Outcome::NotApplied, TransferError::Database(e).to_string())
            }
            // The server's own refusal, settled (nothing of the statement applied).
            Err(Stop::Failed(TransferError::Database(e @ DieselError::DatabaseError(..)))) => {
                Ok(Err(Failed {
                    by_database: true,
                    ..Failed::new(Outcome::Refused, TransferError::Database(e).to_string())
                }))
            }
            Err(Stop::Failed(
                e @ (TransferError::NoLedgerRow | TransferError::AccountNotUpdated(_)),
            )) => fail(Outcome::Refused, e.to_string()),
            Err(Stop::Failed(e)) => fail(Outcome::NotApplied, e.to_string()),
            Err(Stop::Exhausted {
                attempts,
                last,
                timed_out,
                cause,
            }) => {
                let how = if timed_out {
                    format!(
                        "timed out after {} ({})",
                        crate::text::seconds(started.elapsed()),
                        crate::retry::attempts(attempts)
                    )
                } else {
                    format!("gave up after {}", crate::retry::attempts(attempts))
                };
                let reason = format!("{how}; last error: {last}");
                let held = cause.is_some_and(Cause::is_held_up);
                if ambiguous {
                    fail(Outcome::Unknown, reason)
                } else if held && self.ids_given && !self.nobody_else_can_commit(&accounts, lines) {
                    Ok(Err(Failed {
                        held_up: true,
                        ..Failed::new(
                            Outcome::Unknown,
                            format!(
                                "this run applied nothing, but it was held up ({reason}) and \
                                 cannot tell whether an earlier run's attempt at these lines is \
                                 still about to commit"
                            ),
                        )
                    }))
                } else {
                    fail(Outcome::NotApplied, reason)
                }
            }
        }
    }
}

/// An attempt whose COMMIT went unanswered: its verdicts, and the time its ledger rows carry
/// (`None`: it wrote none).
#[derive(Clone)]
struct Attempted {
    decided: Decided,
    at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The attempt among `unanswered` (those whose COMMIT went unanswered) that committed, if one
/// did: the ledger holds each line it applied, with that line's details and that attempt's time.
/// Rows with other details, or of another time, are another run's doing: a count of ids alone
/// took another run's rows for this run's commit, and said `applied` for lines that never
/// committed (found by a reviewer). One that applied nothing moved nothing, and deciding its
/// lines again gives the same verdicts.
fn committed_attempt(
    conn: &mut PgConnection,
    lines: &[Line],
    unanswered: &[Attempted],
) -> Result<Option<Attempted>, Rollback> {
    if unanswered.is_empty() {
        return Ok(None);
    }
    let ids: Vec<Uuid> = lines.iter().map(|l| l.transfer.id).collect();
    let ledger = repo::transfers_by_id(conn, &ids)?;
    // At most one attempt committed (each later one asks this first, holding the accounts), and
    // the ledger holds its rows, of its time. Should two attempts' rows ever carry one time, an
    // earlier attempt that applied some of the same lines would match too, so the one that
    // applied the most is it (the oldest first took one that stopped at a refusal for the one
    // that went on past it, found by a reviewer, before times were compared); equal, the newest.
    let mut found: Option<(usize, &Attempted)> = None;
    for attempted in unanswered {
        let applying: Vec<&Line> = applied(lines, &attempted.decided).collect();
        let all_there = applying.iter().all(|l| {
            ledger.get(&l.transfer.id).is_some_and(|row| {
                l.transfer.matches(row) && attempted.at.is_none_or(|at| row.created_at == at)
            })
        });
        if !applying.is_empty() && all_there && found.is_none_or(|(n, _)| applying.len() >= n) {
            found = Some((applying.len(), attempted));
        }
    }
    Ok(found.map(|(_, attempted)| attempted.clone()))
}

/// Inside a statement's transaction, its accounts held and its verdicts read: the first of
/// `applying` (the lines it would apply) whose id another run has answered "not applied" since
/// the first attempt at that line (its claim's generation moved), as `bank transfer --id`
/// checks (`transfer::runner`). That answer stands for every run that began before it. The
/// first attempt at a line records what it saw in `first` (`first_claims_of`), kept until the line is decided (a
/// line may go through several statements: a split, a refusal before it). Lines the ledger has
/// are no concern (a rerun's claim moves the generation even when it then finds them applied).
fn answered_since(
    conn: &mut PgConnection,
    applying: &[&Line],
    first: &mut HashMap<Uuid, Option<i64>>,
    barred: &Mutex<HashSet<Uuid>>,
) -> Result<Option<u64>, Rollback> {
    let ids: Vec<Uuid> = applying.iter().map(|l| l.transfer.id).collect();
    let now: HashMap<Uuid, i64> = repo::claim_generations(conn, &ids)?.into_iter().collect();
    let barred = barred
        .lock()
        .map_err(|_| Rollback::Bug("a runner panicked".into()))?;
    let mut moved = None;
    for l in applying {
        let generation = now.get(&l.transfer.id).copied();
        let then = *first.entry(l.transfer.id).or_insert(generation);
        if (then != generation || barred.contains(&l.transfer.id)) && moved.is_none() {
            moved = Some(l.line);
        }
    }
    Ok(moved)
}

/// A statement's transaction, at `isolation` (`batch::Isolation`): READ COMMITTED asked for on
/// PostgreSQL only, where the connection has found it (`db::found_postgresql`).
fn begin(
    conn: &mut PgConnection,
    isolation: super::Isolation,
) -> diesel::pg::TransactionBuilder<'_, PgConnection> {
    let builder = conn.build_transaction();
    match isolation {
        super::Isolation::ReadCommitted if crate::db::found_postgresql() => {
            builder.read_committed()
        }
        _ => builder,
    }
}

/// Records in `first` the claim generation (`None`: not claimed) of each of `lines` that has
/// none there yet, read now, before this attempt asks for the accounts.
fn first_claims_of(
    conn: &mut PgConnection,
    lines: &[Line],
    first: &mut HashMap<Uuid, Option<i64>>,
) -> Result<(), Rollback> {
    let ids: Vec<Uuid> = lines
        .iter()
        .map(|l| l.transfer.id)
        .filter(|id| !first.contains_key(id))
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    let now: HashMap<Uuid, i64> = repo::claim_generations(conn, &ids)?.into_iter().collect();
    for id in ids {
        first.insert(id, now.get(&id).copied());
    }
    Ok(())
}

/// A statement that could not be settled: its lines are `unknown` or `not_applied`.
struct Failed {
    outcome: Outcome,
    reason: String,
    /// Cancelled by the server's statement_timeout before COMMIT: the lines can go again in
    /// smaller statements.
    split: bool,
    /// The line whose id another run answered "not applied" since this statement's first
    /// attempt (`Rollback::AnsweredSince`).
    answered: Option<u64>,
    /// Held up by locks another transaction holds, no attempt having reached its COMMIT: a
    /// line whose id the ledger already has is answered from its row.
    held_up: bool,
    /// The database's own error refused the statement (a DBA's trigger or CHECK, a privilege, a
    /// read-only transaction): the lines go again in smaller statements, unless a statement
    /// with no line meets it too (`whole`).
    by_database: bool,
    /// Refused for a reason that is no line's own (`ChunkRunner::refused_with_no_line`): its
    /// lines are answered together, none split off.
    whole: bool,
}

impl Failed {
    fn new(outcome: Outcome, reason: String) -> Failed {
        Failed {
            outcome,
            reason,
            split: false,
            answered: None,
            held_up: false,
            by_database: false,
            whole: false,
        }
    }
}

/// Why a statement's transaction was rolled back.
enum Rollback {
    Database(DieselError),
    Abandoned,
    /// The statement's counts disagree with its verdicts: never commit that.
    Bug(String),
    /// The statement wrote fewer ledger rows than it applied lines.
    NoLedgerRow,
    /// The statement moved fewer accounts than its lines touch.
    NotUpdated,
    /// Another run answered this line's id "not applied" since the first attempt (`answered`).
    AnsweredSince(u64),
}

impl From<DieselError> for Rollback {
    fn from(e: DieselError) -> Self {
        Rollback::Database(e)
    }
}

/// Whether a COMMIT that failed with `e` surely rolled back: the server answered it with an error
/// nobody classified (not a lost connection, not CockroachDB's ambiguous result), and the ledger
/// has none of the lines that the attempt (its verdicts: `decided`) would have written.
fn commit_refused(
    conn: &mut PgConnection,
    e: &DieselError,
    lines: &[Line],
    decided: Option<&Decided>,
) -> bool {
    if !matches!(e, DieselError::DatabaseError(..)) || classify(e, Phase::Commit).is_some() {
        return false;
    }
    let ids: Vec<Uuid> = decided
        .map(|d| applied(lines, d).map(|l| l.transfer.id).collect())
        .unwrap_or_default();
    !ids.is_empty() && repo::count_transfers_with_ids(conn, &ids) == Ok(0)
}

/// Whether the server cancelled the statement for its `statement_timeout` (PostgreSQL's
/// "canceling statement due to statement timeout", CockroachDB's "query execution canceled due
/// to statement timeout"): only then is the statement too long, and its lines go again in
/// smaller ones. A cancel by someone else (`pg_cancel_backend`, "due to user request") is the
/// same SQLSTATE, 57014; taken for a timeout, each one halved the statements for the rest of
/// the run (60,000 lines: 55 s instead of 5).
fn cancelled_by_statement_timeout(e: &DieselError) -> bool {
    matches!(e, DieselError::DatabaseError(_, info)
        if info.message().to_ascii_lowercase().contains("due to statement timeout"))
}

/// A verdict that says this run did not apply the line: its id is claimed before it is final
/// (`ChunkRunner::claim_refused`).
fn says_no(v: &Verdict) -> bool {
    matches!(
        v.outcome,
        Outcome::InsufficientFunds
            | Outcome::UnknownAccount
            | Outcome::BalanceOverflow
            | Outcome::Refused
            | Outcome::NotApplied
    )
}

/// An error of the statement or its COMMIT, as a step of the retry loop.
fn failure(e: DieselError, committing: bool) -> Attempt<Decided, TransferError> {
    if let Some(retry) = Attempt::retry_for(&e, committing) {
        return retry;
    }
    match &e {
        // Another client wrote one of the chunk's ids after this statement read the ledger:
        // the next attempt reads it.
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info)
            if !committing
                && !crate::transfer::other_unique_index(
                    info.constraint_name().unwrap_or_default(),
                    info.message(),
                ) =>
        {
            return Attempt::Retry {
                cause: Cause::Serialization,
                message: e.to_string(),
            }
        }
        _ => {}
    }
    match TransferError::from(e) {
        TransferError::Database(e) if committing => Attempt::Retry {
            cause: Cause::Ambiguous,
            message: format!("COMMIT failed: {e}"),
        },
        other => Attempt::Fail(other),
    }
}

/// The statement's verdicts, checked against its counts, and the time its ledger rows carry
/// (none when it wrote none).
fn read_rows(
    lines: &[Line],
    rows: Vec<(i64, String, Option<chrono::DateTime<chrono::Utc>>)>,
) -> Result<(Decided, Option<chrono::DateTime<chrono::Utc>>), Rollback> {
    let mut verdicts = HashMap::new();
    let mut refused = None;
    let mut unknown_to = HashSet::new();
    let mut wrong_guess = false;
    let (mut inserted, mut moved, mut at) = (None, None, None);
    for (n, word, time) in rows {
        let line = u64::try_from(n).unwrap_or_default();
        let outcome = match word.as_str() {
            "inserted" => {
                inserted = Some(n);
                at = time;
                continue;
            }
            "moved" => {
                moved = Some(n);
                continue;
            }
            "already_applied" => Outcome::AlreadyApplied,
            "id_conflict" => Outcome::IdConflict,
            "unknown_from" => Outcome::UnknownAccount,
            "unknown_to" => {
                unknown_to.insert(line);
                Outcome::UnknownAccount
            }
            "insufficient_funds" => Outcome::InsufficientFunds,
            "balance_overflow" => Outcome::BalanceOverflow,
            // A guess the statement confirmed: decided, and the statement went on.
            "short" => {
                verdicts.insert(line, Outcome::InsufficientFunds);
                continue;
            }
            "not_short" => {
                refused = Some(line);
                wrong_guess = true;
                continue;
            }
            other => return Err(Rollback::Bug(format!("unexpected verdict {other:?}"))),
        };
        if matches!(
            outcome,
            Outcome::InsufficientFunds | Outcome::BalanceOverflow
        ) {
            refused = Some(line);
        }
        verdicts.insert(line, outcome);
    }
    let decided = Decided {
        verdicts,
        refused,
        unknown_to,
        wrong_guess,
    };
    let mut transfers = 0;
    let mut accounts = HashSet::new();
    for l in applied(lines, &decided) {
        transfers += 1;
        accounts.extend([l.transfer.from_id, l.transfer.to_id]);
    }
    // Fewer ledger rows as asked than lines applied: a trigger on `transfers` skipped some
    // (BEFORE INSERT returning NULL), or changed them (another amount, another id: a rerun
    // took the id for taken, or applied it again). Rolled back, and the lines go again in smaller statements until
    // the skipped one is alone (`refused`), as for any refusal of the database's own.
    if inserted.is_some_and(|n| n < transfers as i64) {
        return Err(Rollback::NoLedgerRow);
    }
    // Fewer accounts moved as asked than the lines applied touch: a trigger on `accounts` left
    // one unchanged (BEFORE UPDATE returning NULL), or wrote it otherwise (keeping the old
    // balance: "applied" while no money moved). The same: rolled back, and split until the line
    // is alone (it was rolled back whole as a bug, and no line of the statement ever applied).
    if moved.is_some_and(|n| n < accounts.len() as i64) && inserted == Some(transfers as i64) {
        return Err(Rollback::NotUpdated);
    }
    if inserted != Some(transfers as i64) || moved != Some(accounts.len() as i64) {
        return Err(Rollback::Bug(format!(
            "the chunk statement inserted {inserted:?} ledger rows and moved {moved:?} \
             accounts, but its verdicts leave {transfers} transfers over {} accounts",
            accounts.len()
        )));
    }
    Ok((decided, at))
}

/// The verdict of a line whose id the ledger has: the same transfer, or another one.
fn ledger_verdict(t: &NewTransfer, found: &Transfer) -> Verdict {
    repeat_verdict(t, t.matches(found))
}

/// The one-by-one verdict of a line whose id was applied before it: already applied when
/// `same` (the same transfer), else an id conflict.
fn repeat_verdict(t: &NewTransfer, same: bool) -> Verdict {
    if same {
        Verdict {
            outcome: Outcome::AlreadyApplied,
            error: None,
        }
    } else {
        Verdict {
            outcome: Outcome::IdConflict,
            error: Some(id_conflict(t.id)),
        }
    }
}

fn id_conflict(id: Uuid) -> String {
    format!("transfer {id} is already in the ledger with different details (from, to or amount)")
}

/// The lines a statement applied: those before its refused line without a verdict.
fn applied<'a>(lines: &'a [Line], d: &'a Decided) -> impl Iterator<Item = &'a Line> + 'a {
    lines
        .iter()
        .take_while(move |l| d.refused.is_none_or(|r| l.line < r))
        .filter(move |l| !d.verdicts.contains_key(&l.line))
}

/// The verdict of a decided line (none: the statement applied it), with the error it reports.
fn verdict(l: &Line, d: &Decided) -> Verdict {
    let t = &l.transfer;
    let outcome = d.verdicts.get(&l.line).copied().unwrap_or(Outcome::Applied);
    let error = match outcome {
        Outcome::Applied | Outcome::AlreadyApplied => None,
        Outcome::InsufficientFunds => Some(
            TransferError::InsufficientFunds {
                account: t.from_id,
                amount: t.amount,
            }
            .to_string(),
        ),
        Outcome::BalanceOverflow => Some(
            TransferError::BalanceOverflow {
                account: t.to_id,
                amount: t.amount,
            }
            .to_string(),
        ),
        Outcome::UnknownAccount => Some(
            TransferError::UnknownAccount(if d.unknown_to.contains(&l.line) {
                t.to_id
            } else {
                t.from_id
            })
            .to_string(),
        ),
        Outcome::IdConflict => Some(id_conflict(t.id)),
        Outcome::NotApplied | Outcome::Unknown | Outcome::Refused => None,
    };
    Verdict { outcome, error }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_servers_statement_timeout_makes_a_statement_too_long() {
        let e = |m: &'static str| crate::retry::tests::db(DatabaseErrorKind::Unknown, m);
        assert!(cancelled_by_statement_timeout(&e(
            "canceling statement due to statement timeout"
        )));
        assert!(cancelled_by_statement_timeout(&e(
            "query execution canceled due to statement timeout"
        )));
        assert!(!cancelled_by_statement_timeout(&e(
            "canceling statement due to user request"
        )));
        assert!(!cancelled_by_statement_timeout(&e(
            "canceling statement due to lock timeout"
        )));
    }
}
