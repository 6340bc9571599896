//! What a workload reports: each worker's tally, the invariants, and the report as text or JSON.

use std::fmt;
use std::ops::AddAssign;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::error::WorkloadError;
use crate::retry::RetryCounts;
use crate::transfer::Mode;
use crate::verify::Report as VerifyReport;

/// One worker's counts, kept up to date after every transfer so that the report can include a
/// worker that is stuck on a frozen server and never returns.
#[derive(Debug, Clone)]
pub struct Tally {
    pub committed: u64,
    pub insufficient_funds: u64,
    /// Refused because the credit would take a balance past INT8's maximum.
    pub balance_overflow: u64,
    /// Not applied: retries or the deadline ran out, or the watchdog gave up on the transfer
    /// before any COMMIT was sent.
    pub given_up: u64,
    /// Outcome unknown: an attempt may have committed and nothing settled it. The ledger has
    /// the answer; the ledger check allows for these.
    pub indeterminate: u64,
    pub errors: u64,
    pub retries: RetryCounts,
    pub reconnects: u64,
    /// 1 for a worker whose transfers all ended without its ever getting a connection (a
    /// role's CONNECTION LIMIT, max_connections reached); summed over the workers.
    pub never_connected: u64,
    /// 1 for a worker whose first logins were refused for want of a connection slot (a role's
    /// CONNECTION LIMIT, max_connections reached), and that waited for one and got it (one
    /// that never got it is `never_connected`); summed.
    pub refused_at_first: u64,
    /// Latency of committed transfers, in microseconds.
    pub latency_us: Histogram<u64>,
    pub last_error: Option<String>,
    /// The ids of the transfers counted in `given_up` and in `indeterminate`: the final check
    /// asks the ledger about each, so that one reported not applied that committed is seen
    /// (counted only, it hid behind the unknown ones' allowance).
    pub given_up_ids: Vec<uuid::Uuid>,
    pub unknown_ids: Vec<uuid::Uuid>,
    /// The ids of the transfers refused on their merits (`insufficient_funds`,
    /// `balance_overflow`, a `--batch` line the database refused): none may be in the ledger.
    /// Counted only, a refusal that committed hid behind a transfer reported applied that did
    /// not, the counts equal (a mutation tester's case).
    pub refused_ids: Vec<uuid::Uuid>,
}

impl Tally {
    pub fn new() -> Result<Tally, WorkloadError> {
        Ok(Tally {
            committed: 0,
            insufficient_funds: 0,
            balance_overflow: 0,
            given_up: 0,
            indeterminate: 0,
            errors: 0,
            retries: RetryCounts::default(),
            reconnects: 0,
            never_connected: 0,
            refused_at_first: 0,
            latency_us: latency_histogram()?,
            last_error: None,
            given_up_ids: Vec::new(),
            unknown_ids: Vec::new(),
            refused_ids: Vec::new(),
        })
    }
}

impl Tally {
    /// One committed transfer's (or batch's) latency.
    pub(super) fn record_latency(&mut self, micros: u64) {
        record_latency(&mut self.latency_us, micros);
    }
}

/// The longest latency told apart, in microseconds: two years. `--timeout` allows a year, and
/// the watchdog gives a transfer a grace period past it.
const LATENCY_CEILING_US: u64 = 2 * 365 * 24 * 3600 * 1_000_000;

/// A latency histogram: microseconds, 3 significant digits. Sized for 10 minutes, which most
/// runs never pass, and growing past it on demand: fixed at 10 minutes it refused every longer
/// latency, and the report's p99 and max left out the slowest transfers.
pub(super) fn latency_histogram() -> Result<Histogram<u64>, WorkloadError> {
    let mut h = Histogram::new_with_bounds(1, 600_000_000, 3)?;
    h.auto(true);
    Ok(h)
}

/// Records `micros` in a histogram of `latency_histogram`: a value past the ceiling counts at
/// the ceiling rather than not at all.
pub(super) fn record_latency(h: &mut Histogram<u64>, micros: u64) {
    let micros = micros.clamp(1, LATENCY_CEILING_US);
    if h.record(micros).is_err() {
        // Growing failed (memory): the largest value the histogram holds still counts it.
        h.saturating_record(micros);
    }
}

impl AddAssign<&Tally> for Tally {
    fn add_assign(&mut self, other: &Tally) {
        self.committed += other.committed;
        self.insufficient_funds += other.insufficient_funds;
        self.balance_overflow += other.balance_overflow;
        self.given_up += other.given_up;
        self.indeterminate += other.indeterminate;
        self.errors += other.errors;
        self.retries += other.retries;
        self.reconnects += other.reconnects;
        self.never_connected += other.never_connected;
        self.refused_at_first += other.refused_at_first;
        // Both grow on demand, so the only failure (a value out of range) cannot happen.
        let _ = self.latency_us.add(&other.latency_us);
        if self.last_error.is_none() {
            self.last_error.clone_from(&other.last_error);
        }
        self.given_up_ids.extend_from_slice(&other.given_up_ids);
        self.unknown_ids.extend_from_slice(&other.unknown_ids);
        self.refused_ids.extend_from_slice(&other.refused_ids);
    }
}

/// What the final check read once the workers were done.
#[derive(Debug)]
pub struct FinalCheck {
    pub verify: VerifyReport,
    /// The workload's accounts' total.
    pub total: i128,
    /// What other clients' ledger rows moved into those accounts during the run (negative:
    /// out), read in the same snapshot as `total`.
    pub moved_by_others: i128,
    /// Ledger rows of this run's own transfers.
    pub ledger_rows: i64,
    /// Ledger rows not of this run (ids without its prefix) on its accounts since it began.
    pub others_rows: i64,
    /// Of the transfers reported given up (not applied), those the ledger holds: each a
    /// transfer reported not applied that committed.
    pub given_up_found: i64,
    /// Of the transfers of unknown outcome, those the ledger holds (they committed).
    pub unknown_found: i64,
    /// Of the transfers reported refused, those the ledger holds: each a refusal that committed.
    pub refused_found: i64,
    /// The workload's accounts that no longer exist (another client deleted them: a `bank
    /// reset` during the run).
    pub accounts_gone: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub ok: bool,
    pub mode: Mode,
    pub accounts: usize,
    pub concurrency: u64,
    pub elapsed_secs: f64,
    /// Stopped early by Ctrl-C or SIGTERM: the figures cover the run so far.
    pub interrupted: bool,
    pub transfers_committed: u64,
    pub rejected_insufficient_funds: u64,
    pub rejected_balance_overflow: u64,
    pub retries: RetryCounts,
    pub given_up: u64,
    pub indeterminate: u64,
    pub errors: u64,
    pub reconnects: u64,
    /// Workers that tried transfers but never got a connection: the run ran on fewer workers
    /// than asked.
    pub workers_never_connected: u64,
    /// Workers whose first logins the server refused for want of a connection slot, so that
    /// they waited (some until others had closed theirs, after the run's end): fewer workers
    /// ran at once than asked, and the waits count in the latency.
    pub workers_refused_at_first: u64,
    /// Workers of those asked for (`concurrency`) that the system would not start a thread for
    /// (`ulimit -u`, a pids limit), once others had started: the run went on without them.
    pub workers_not_started: u64,
    /// Workers given up on because a transfer of theirs outlived its deadline (and replaced).
    pub stuck_workers: u64,
    /// `--readers`; snapshot reads by them, and those whose total was not the opening total or
    /// that showed a negative balance. Readers none of whose reads finished fail the run: the
    /// check asked for did not run.
    pub readers: u64,
    pub reads: u64,
    pub wrong_total_reads: u64,
    /// Why a reader last could not read (a lost connection, a refusal), if one could not.
    pub read_error: Option<String>,
    pub throughput_per_sec: f64,
    pub latency_ms: Latency,
    pub starting_total: i128,
    /// `null` when the final check could not run (see `final_check_error`).
    pub final_total: Option<i128>,
    /// What other clients' transfers moved into the workload's accounts during the run
    /// (negative: out; `--reuse-accounts` on a database in use): part of the expected total.
    pub moved_by_other_clients: Option<i128>,
    /// Ledger rows of this run's own transfers (ids carry the run's prefix), so other clients
    /// writing to the same database cause no false alarm.
    pub ledger_rows_added: Option<i64>,
    /// Ledger rows that are not this run's (their ids lack its prefix) written on its accounts
    /// during the run, transfers between two of them included. A transfer applied twice, the
    /// second time under another id, is such a row, and nothing else shows it (the totals and
    /// the chains hold); so is another client's transfer, which the README promises is no false
    /// alarm (a `workload --reuse-accounts` started beside this run takes its accounts too:
    /// failing the run for it made a sound bank look broken, a reviewer's case). Counted, and
    /// warned of on accounts the run created; not an invariant.
    pub ledger_rows_by_others: Option<i64>,
    /// Of the transfers reported given up (not applied), those the ledger holds: a transfer
    /// reported not applied that committed, which breaks the promise. Must be 0.
    pub given_up_in_ledger: Option<i64>,
    /// Of the transfers reported refused (insufficient funds, a balance overflow, the database's
    /// refusal), those the ledger holds: a refusal that committed, which breaks the promise.
    /// Must be 0.
    pub refused_in_ledger: Option<i64>,
    /// Of the transfers of unknown outcome, those the ledger holds: the ledger's answer. With
    /// it the run's own rows must equal `transfers_committed` plus it exactly.
    pub indeterminate_committed: Option<i64>,
    /// The workload's accounts that another client deleted during the run (a `bank reset`),
    /// found by the final check: the totals and the ledger cannot match then, and the report
    /// says why instead of leaving it to look like money lost.
    pub accounts_deleted_by_others: Option<u64>,
    pub invariants: Invariants,
    pub verify: Option<VerifyReport>,
    pub final_check_error: Option<String>,
    /// Ctrl-C (or SIGTERM) came during the final check and stopped it: every transfer had
    /// ended (`interrupted` is false unless an earlier signal stopped them), no invariant was
    /// checked (`final_check_error` says so).
    pub final_check_interrupted: bool,
    pub last_error: Option<String>,
    /// `--reuse-accounts` (said in the text report only).
    #[serde(skip)]
    pub reuse_accounts: bool,
    /// Every transfer given up or of unknown outcome was known by its id, so the ledger check
    /// was exact, not a bound.
    #[serde(skip)]
    pub ids_known: bool,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

/// Each invariant: `Some(held)`, or `None` (JSON `null`) when the final check could not run and
/// nothing was looked at.
#[derive(Debug, Serialize)]
pub struct Invariants {
    /// The workload's accounts hold together what they held at the start.
    pub total_conserved: Option<bool>,
    pub no_negative_balance: Option<bool>,
    /// Ledger rows added = transfers reported committed (plus at most the indeterminate ones).
    pub ledger_matches_committed: Option<bool>,
    /// Every account's entries form an exact chain of versions and balances.
    pub chains_exact: Option<bool>,
    pub verify_ok: Option<bool>,
}

/// The run as the report describes it.
#[derive(Debug)]
pub struct Run {
    pub mode: Mode,
    pub accounts: usize,
    pub concurrency: u64,
    pub elapsed_secs: f64,
    pub starting_total: i128,
    pub stuck_workers: u64,
    /// Workers asked for that the system would not start a thread for.
    pub workers_not_started: u64,
    pub interrupted: bool,
    /// Ctrl-C (or SIGTERM) stopped the final check, after every transfer had ended.
    pub check_interrupted: bool,
    /// `--reuse-accounts`: other clients may move money on the run's accounts.
    pub reuse_accounts: bool,
    pub readers: u64,
    pub reads: u64,
    pub wrong_total_reads: u64,
    pub read_error: Option<String>,
}

impl Report {
    /// Judges the run: the tallies of every worker against what the final check read.
    pub fn new(run: Run, tally: Tally, check: Result<FinalCheck, String>) -> Report {
        let ms = |q: f64| tally.latency_us.value_at_quantile(q) as f64 / 1000.0;
        let committed = i64::try_from(tally.committed).unwrap_or(i64::MAX);
        let indeterminate = i64::try_from(tally.indeterminate).unwrap_or(i64::MAX);
        // Every transfer given up or of unknown outcome is known by its id (a count without
        // one leaves the bound alone to judge).
        let every_id = tally.given_up_ids.len() as u64 == tally.given_up
            && tally.unknown_ids.len() as u64 == tally.indeterminate;
        let (check, final_check_error) = match check {
            Ok(c) => (Some(c), None),
            Err(e) => (None, Some(e)),
        };
        let invariants = match &check {
            Some(c) => Invariants {
                total_conserved: Some(c.total == run.starting_total + c.moved_by_others),
                no_negative_balance: Some(c.verify.negative_balances == 0),
                // No transfer reported not applied is in the ledger; when every
                // transfer of unknown outcome is known by its id, the rows are exactly the
                // committed ones and those of them the ledger holds: a count alone let a
                // "not applied" that committed hide behind an unknown one that did not.
                ledger_matches_committed: Some(
                    c.ledger_rows >= committed
                        && c.ledger_rows <= committed.saturating_add(indeterminate)
                        && c.given_up_found == 0
                        && c.refused_found == 0
                        && (!every_id || c.ledger_rows == committed + c.unknown_found),
                ),
                chains_exact: Some(c.verify.broken_chains == 0),
                verify_ok: Some(c.verify.ok),
            },
            None => Invariants {
                total_conserved: None,
                no_negative_balance: None,
                ledger_matches_committed: None,
                chains_exact: None,
                verify_ok: None,
            },
        };
        let read = run.readers == 0 || run.reads > 0;
        let ok = invariants.all() && run.wrong_total_reads == 0 && read && tally.errors == 0;
        Report {
            ok,
            mode: run.mode,
            accounts: run.accounts,
            concurrency: run.concurrency,
            elapsed_secs: run.elapsed_secs,
            interrupted: run.interrupted,
            transfers_committed: tally.committed,
            rejected_insufficient_funds: tally.insufficient_funds,
            rejected_balance_overflow: tally.balance_overflow,
            retries: tally.retries,
            given_up: tally.given_up,
            indeterminate: tally.indeterminate,
            errors: tally.errors,
            reconnects: tally.reconnects,
            workers_never_connected: tally.never_connected,
            workers_refused_at_first: tally.refused_at_first,
            workers_not_started: run.workers_not_started,
            stuck_workers: run.stuck_workers,
            readers: run.readers,
            reads: run.reads,
            wrong_total_reads: run.wrong_total_reads,
            read_error: run.read_error.map(|e| crate::text::one_line(&e)),
            throughput_per_sec: tally.committed as f64 / run.elapsed_secs.max(1e-9),
            latency_ms: Latency {
                p50: ms(0.50),
                p95: ms(0.95),
                p99: ms(0.99),
                max: tally.latency_us.max() as f64 / 1000.0,
            },
            starting_total: run.starting_total,
            final_total: check.as_ref().map(|c| c.total),
            moved_by_other_clients: check.as_ref().map(|c| c.moved_by_others),
            ledger_rows_added: check.as_ref().map(|c| c.ledger_rows),
            ledger_rows_by_others: check.as_ref().map(|c| c.others_rows),
            given_up_in_ledger: check.as_ref().map(|c| c.given_up_found),
            refused_in_ledger: check.as_ref().map(|c| c.refused_found),
            indeterminate_committed: check.as_ref().map(|c| c.unknown_found),
            accounts_deleted_by_others: check.as_ref().map(|c| c.accounts_gone),
            invariants,
            verify: check.map(|c| c.verify),
            // One line each, as every message bank prints: a server's error may span several
            // (a trigger's RAISE with a newline split the report's line).
            final_check_error: final_check_error.map(|e| crate::text::one_line(&e)),
            final_check_interrupted: run.check_interrupted,
            last_error: tally.last_error.map(|e| crate::text::one_line(&e)),
            reuse_accounts: run.reuse_accounts,
            ids_known: every_id,
        }
    }
}

/// The text report, one line each.
impl Invariants {
    /// Every invariant was checked and held.
    fn all(&self) -> bool {
        [
            self.total_conserved,
            self.no_negative_balance,
            self.ledger_matches_committed,
            self.chains_exact,
            self.verify_ok,
        ]
        .iter()
        .all(|held| *held == Some(true))
    }
}

impl Report {
    /// Every invariant held and every snapshot read saw the opening total: what failed, if
    /// anything, was a transfer's error.
    pub fn invariants_hold(&self) -> bool {
        self.invariants.all() && self.wrong_total_reads == 0
    }

    /// What does not hold, in a few words each, for the run's one line on stderr.
    pub fn violations(&self) -> String {
        let mut broken = Vec::new();
        let held = |i: Option<bool>| i != Some(false);
        if !held(self.invariants.total_conserved) {
            let expected = self.starting_total + self.moved_by_other_clients.unwrap_or(0);
            broken.push(format!(
                "the run's accounts hold {} where the ledger explains {expected}",
                self.final_total
                    .map_or_else(|| "?".into(), |t| t.to_string())
            ));
        }
        if !held(self.invariants.no_negative_balance) {
            broken.push("a balance is negative".to_string());
        }
        if !held(self.invariants.ledger_matches_committed) {
            let rows = self.ledger_rows_added.unwrap_or(0);
            let (committed, unknown) = (self.transfers_committed, self.indeterminate);
            let before = broken.len();
            if rows < committed as i64 || rows > committed.saturating_add(unknown) as i64 {
                broken.push(format!(
                    "the ledger holds {rows} of the run's transfers where {committed} were \
                     reported committed (+ at most {unknown} of unknown outcome)"
                ));
            }
            if let Some(found @ 1..) = self.given_up_in_ledger {
                broken.push(format!(
                    "{found} transfers reported given up (not applied) are in the ledger"
                ));
            }
            if let Some(found @ 1..) = self.refused_in_ledger {
                broken.push(format!(
                    "{found} transfers reported refused are in the ledger"
                ));
            }
            let unknown = self.indeterminate_committed.unwrap_or(0);
            if broken.len() == before && self.ids_known && rows != committed as i64 + unknown {
                broken.push(format!(
                    "the ledger holds {rows} of the run's transfers where {committed} were \
                     reported committed and {unknown} of unknown outcome committed"
                ));
            }
        }
        if !held(self.invariants.chains_exact) {
            let n = self.verify.as_ref().map_or(0, |v| v.broken_chains);
            broken.push(format!("{n} accounts' chains of entries are broken"));
        }
        if !held(self.invariants.verify_ok) {
            broken.push("verify fails".to_string());
        }
        if self.wrong_total_reads > 0 {
            broken.push(format!(
                "{} reads saw a total other than the starting one or a negative balance",
                self.wrong_total_reads
            ));
        }
        match broken.is_empty() {
            true => "an invariant does not hold".to_string(),
            false => format!("invariants violated: {}", broken.join("; ")),
        }
    }

    /// `--readers` asked for a check that no read made.
    pub fn readers_never_read(&self) -> bool {
        self.readers > 0 && self.reads == 0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Without a final check nothing was found violated: it was not looked at.
        let mark = |held: Option<bool>| match held {
            Some(true) => "ok",
            Some(false) => "VIOLATED",
            None => "not checked",
        };
        fn known(n: Option<impl ToString>) -> String {
            n.map_or_else(|| "?".to_string(), |n| n.to_string())
        }
        let r = &self.retries;
        let mode = match self.mode {
            Mode::Transaction => "transaction",
            Mode::SingleStatement => "single-statement",
        };
        writeln!(
            f,
            "workload: {}, {}, mode {mode}, {:.1}s",
            crate::counted(self.accounts as u64, "account"),
            crate::counted(self.concurrency, "worker"),
            self.elapsed_secs
        )?;
        if self.interrupted {
            writeln!(
                f,
                "interrupted: no transfers started after the signal; the figures cover the run so far"
            )?;
        }
        writeln!(f, "transfers committed: {}", self.transfers_committed)?;
        writeln!(
            f,
            "rejected (insufficient funds): {}",
            self.rejected_insufficient_funds
        )?;
        if self.rejected_balance_overflow > 0 {
            writeln!(
                f,
                "rejected (the credit would pass the largest balance): {}",
                self.rejected_balance_overflow
            )?;
        }
        writeln!(
            f,
            "retries: {} (serialization {}, deadlock {}, ambiguous {}, connection lost {}, timeout {})",
            r.total(),
            r.serialization,
            r.deadlock,
            r.ambiguous,
            r.connection_lost,
            r.timeout
        )?;
        writeln!(f, "given up (not applied): {}", self.given_up)?;
        match self.indeterminate_committed {
            Some(found) if self.indeterminate > 0 => writeln!(
                f,
                "outcome unknown: {} (the ledger decides: it held {found} of them at the final \
                 check)",
                self.indeterminate
            )?,
            _ => writeln!(
                f,
                "outcome unknown: {} (the ledger decides; see the ledger check)",
                self.indeterminate
            )?,
        }
        writeln!(f, "other errors: {}", self.errors)?;
        writeln!(f, "reconnects: {}", self.reconnects)?;
        if self.workers_never_connected > 0 {
            writeln!(
                f,
                "workers that never connected: {} of {}",
                self.workers_never_connected, self.concurrency
            )?;
        }
        let waited = self.workers_refused_at_first;
        if waited > 0 {
            writeln!(
                f,
                "workers refused a connection at first, that waited for one: {waited} of {}",
                self.concurrency
            )?;
        }
        if self.workers_not_started > 0 {
            writeln!(
                f,
                "workers the system would not start a thread for: {} of {}",
                self.workers_not_started, self.concurrency
            )?;
        }
        if self.stuck_workers > 0 {
            writeln!(
                f,
                "workers stuck past the deadline and replaced: {}",
                self.stuck_workers
            )?;
        }
        if self.readers > 0 {
            writeln!(
                f,
                "reads: {} by {} (wrong total or negative balance: {})",
                self.reads,
                crate::counted(self.readers, "reader"),
                self.wrong_total_reads
            )?;
        }
        writeln!(f, "throughput: {:.0} transfers/s", self.throughput_per_sec)?;
        let l = &self.latency_ms;
        // Only committed transfers (or batches) are timed: with none, the zeros measured nothing.
        if self.transfers_committed == 0 {
            writeln!(f, "latency ms: none (no transfer committed)")?;
        } else {
            writeln!(
                f,
                "latency ms: p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}",
                l.p50, l.p95, l.p99, l.max
            )?;
        }
        writeln!(f, "invariants:")?;
        match &self.final_check_error {
            Some(e) if self.final_check_interrupted => writeln!(
                f,
                "  the final check was {e}: every transfer had ended, nothing was checked \
                 (`bank verify` checks the bank)"
            )?,
            Some(e) => writeln!(f, "  the final check could not run: {e}")?,
            None => {}
        }
        if let Some(gone @ 1..) = self.accounts_deleted_by_others {
            writeln!(
                f,
                "  {gone} of the run's {} accounts were deleted by another client during the \
                 run (a `bank reset`?): the totals and the ledger below cannot match",
                self.accounts
            )?;
        }
        let others = match self.moved_by_other_clients {
            Some(0) | None => String::new(),
            Some(n) => format!(" {n:+} moved by other clients' transfers"),
        };
        writeln!(
            f,
            "  total {} = starting total {}{others}: {}",
            known(self.final_total),
            self.starting_total,
            mark(self.invariants.total_conserved)
        )?;
        writeln!(
            f,
            "  no negative balance: {}",
            mark(self.invariants.no_negative_balance)
        )?;
        writeln!(
            f,
            "  ledger rows added {} = transfers committed {} (+ at most {} of unknown outcome): {}",
            known(self.ledger_rows_added),
            self.transfers_committed,
            self.indeterminate,
            mark(self.invariants.ledger_matches_committed)
        )?;
        if let Some(found @ 1..) = self.given_up_in_ledger {
            writeln!(
                f,
                "  transfers reported given up (not applied) that the ledger holds: {found}"
            )?;
        }
        if let Some(found @ 1..) = self.refused_in_ledger {
            writeln!(
                f,
                "  transfers reported refused that the ledger holds: {found}"
            )?;
        }
        if let Some(others @ 1..) = self.ledger_rows_by_others {
            writeln!(
                f,
                "  ledger rows on the run's accounts that are not the run's: {others}{}",
                match self.reuse_accounts {
                    false => {
                        " (on accounts the run created: another client's transfers, or a \
                         transfer applied twice under another id: look at them)"
                    }
                    true => "",
                }
            )?;
        }
        writeln!(
            f,
            "  chains of entries exact: {}",
            mark(self.invariants.chains_exact)
        )?;
        writeln!(f, "  verify: {}", mark(self.invariants.verify_ok))?;
        if self.readers > 0 {
            // The readers' own checks, made during the run.
            let read_ok = if self.wrong_total_reads > 0 {
                "VIOLATED"
            } else if self.reads == 0 {
                "not checked (no read finished)"
            } else {
                "ok"
            };
            writeln!(f, "  every read's total = starting total: {read_ok}")?;
        }
        if let (0, Some(e)) = (self.reads, &self.read_error) {
            writeln!(f, "last read error: {e}")?;
        }
        if let Some(e) = &self.last_error {
            writeln!(f, "last error: {e}")?;
        }
        let verdict = if self.ok {
            "workload: ok"
        } else {
            "workload: FAILED"
        };
        writeln!(f, "{verdict}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> Run {
        Run {
            mode: Mode::Transaction,
            accounts: 10,
            concurrency: 2,
            elapsed_secs: 1.0,
            starting_total: 10_000,
            stuck_workers: 0,
            workers_not_started: 0,
            interrupted: false,
            check_interrupted: false,
            reuse_accounts: false,
            readers: 0,
            reads: 0,
            wrong_total_reads: 0,
            read_error: None,
        }
    }

    /// A transfer may take as long as `--timeout` allows (up to 366 days): one that took longer
    /// than 10 minutes was dropped from the histogram, so p99 and max left it out.
    #[test]
    fn latencies_past_ten_minutes_count_in_the_report() {
        const DAY_US: u64 = 24 * 3600 * 1_000_000;
        let mut tally = Tally::new().expect("tally");
        tally.record_latency(1_000);
        tally.record_latency(11 * 60 * 1_000_000);
        let mut other = Tally::new().expect("tally");
        other.record_latency(365 * DAY_US);
        // Past any deadline there is: counted, at the largest value the histogram holds.
        other.record_latency(u64::MAX);
        tally += &other;
        assert_eq!(tally.latency_us.len(), 4);
        let report = Report::new(run(), tally, Err("not checked".into()));
        let day_ms = (DAY_US / 1000) as f64;
        assert!(report.latency_ms.max >= 365.0 * day_ms, "{report:?}");
        assert!(
            report.latency_ms.p50 >= 11.0 * 60_000.0 * 0.999,
            "{report:?}"
        );
    }

    /// "1 workers" (found by a helper).
    #[test]
    fn one_worker_is_one_worker() {
        let run = Run {
            concurrency: 1,
            ..run()
        };
        let report = Report::new(run, Tally::new().expect("tally"), Err("-".into()));
        let text = report.to_string();
        assert!(
            text.starts_with("workload: 10 accounts, 1 worker, mode"),
            "{text}"
        );
    }

    #[test]
    fn invariants_that_the_final_check_could_not_look_at_are_not_called_violated() {
        let run = Run {
            mode: Mode::Transaction,
            accounts: 10,
            concurrency: 2,
            elapsed_secs: 1.0,
            starting_total: 10_000,
            stuck_workers: 1,
            workers_not_started: 0,
            interrupted: false,
            check_interrupted: false,
            reuse_accounts: false,
            readers: 1,
            reads: 3,
            wrong_total_reads: 0,
            read_error: None,
        };
        let tally = Tally::new().expect("tally");
        let report = Report::new(run, tally, Err("no answer within 400ms".into()));
        let text = report.to_string();
        assert!(!report.ok);
        assert!(!text.contains("VIOLATED"), "{text}");
        assert!(text.contains("verify: not checked"), "{text}");
        assert!(text.contains("the final check could not run"), "{text}");
        assert!(text.contains("workload: FAILED"), "{text}");
        // JSON says the same: not looked at (null), not false (violated).
        let json = serde_json::to_value(&report).expect("json");
        for (name, value) in json["invariants"].as_object().expect("invariants") {
            assert!(value.is_null(), "{name}: {json}");
        }
        assert_eq!(json["ok"], false);
    }

    /// A final check that read a healthy ledger: 5 transfers committed, 5 rows, nothing wrong.
    fn healthy() -> FinalCheck {
        FinalCheck {
            verify: VerifyReport {
                ok: true,
                accounts: 10,
                transfers: 5,
                total_balance: 10_000,
                total_opening_balance: 10_000,
                negative_balances: 0,
                mismatched_accounts: 0,
                broken_chains: 0,
                violations: Vec::new(),
                violations_truncated: false,
            },
            total: 10_000,
            moved_by_others: 0,
            ledger_rows: 5,
            others_rows: 0,
            given_up_found: 0,
            refused_found: 0,
            unknown_found: 0,
            accounts_gone: 0,
        }
    }

    /// Each invariant the final check judges, broken alone, fails the run and is named: no test
    /// broke one (every workload test ran a healthy ledger), and turning any of five off passed
    /// every test (found by a reviewer mutating the checks). Rows between committed and
    /// committed + indeterminate are the bound, not a violation.
    #[test]
    fn each_invariant_broken_alone_fails_the_run_and_is_named() {
        let judged = |committed: u64, indeterminate: u64, check: FinalCheck| {
            let mut tally = Tally::new().expect("tally");
            tally.committed = committed;
            tally.indeterminate = indeterminate;
            Report::new(run(), tally, Ok(check))
        };
        let healthy_report = judged(5, 0, healthy());
        assert!(healthy_report.ok, "{healthy_report:?}");
        // Up to the indeterminate ones may have committed unseen.
        let bound = judged(
            5,
            2,
            FinalCheck {
                ledger_rows: 7,
                ..healthy()
            },
        );
        assert!(bound.ok, "{bound:?}");
        // With `--reuse-accounts`, other clients' rows on the run's accounts are expected.
        let shared = {
            let mut tally = Tally::new().expect("tally");
            tally.committed = 5;
            let run = Run {
                reuse_accounts: true,
                ..run()
            };
            let check = FinalCheck {
                others_rows: 3,
                ..healthy()
            };
            Report::new(run, tally, Ok(check))
        };
        assert!(shared.ok, "{shared:?}");
        // On accounts of its own too: another client's transfer is no violation (counted and
        // warned of).
        let own = {
            let mut tally = Tally::new().expect("tally");
            tally.committed = 5;
            let check = FinalCheck {
                others_rows: 1,
                ..healthy()
            };
            Report::new(run(), tally, Ok(check))
        };
        assert!(own.ok, "{own:?}");
        assert!(
            own.to_string().contains("another client's transfers"),
            "{own}"
        );
        let broken: [(&str, FinalCheck, u64); 6] = [
            // A transfer reported committed that the ledger does not hold.
            (
                "ledger_matches_committed",
                FinalCheck {
                    ledger_rows: 4,
                    ..healthy()
                },
                0,
            ),
            // A row more than committed and indeterminate can explain: applied twice.
            (
                "ledger_matches_committed",
                FinalCheck {
                    ledger_rows: 8,
                    ..healthy()
                },
                2,
            ),
            (
                "total_conserved",
                FinalCheck {
                    total: 9_999,
                    ..healthy()
                },
                0,
            ),
            (
                "no_negative_balance",
                FinalCheck {
                    verify: VerifyReport {
                        negative_balances: 1,
                        ..healthy().verify
                    },
                    ..healthy()
                },
                0,
            ),
            (
                "chains_exact",
                FinalCheck {
                    verify: VerifyReport {
                        broken_chains: 1,
                        ..healthy().verify
                    },
                    ..healthy()
                },
                0,
            ),
            (
                "verify_ok",
                FinalCheck {
                    verify: VerifyReport {
                        ok: false,
                        ..healthy().verify
                    },
                    ..healthy()
                },
                0,
            ),
        ];
        for (name, check, indeterminate) in broken {
            let report = judged(5, indeterminate, check);
            assert!(!report.ok, "{name}: {report:?}");
            let json = serde_json::to_value(&report).expect("json");
            assert_eq!(json["invariants"][name], false, "{name}: {json}");
            let text = report.to_string();
            assert!(text.contains("VIOLATED"), "{name}: {text}");
        }
    }

    /// A transfer reported given up (not applied) that the ledger holds breaks the promise, and
    /// fails the run however many of unknown outcome there were: counted only, it hid behind
    /// their allowance (the rows stayed within committed + indeterminate), and a bank mutated
    /// to say "not applied" of one committed transfer in 300 passed every run (found by a
    /// helper). With every such transfer known by its id the rows must be exactly the
    /// committed ones and those of unknown outcome the ledger holds.
    #[test]
    fn a_transfer_given_up_that_committed_fails_the_run_whatever_the_unknown_ones() {
        let judged = |found: i64, unknown_found: i64, rows: i64| {
            let mut tally = Tally::new().expect("tally");
            tally.committed = 5;
            tally.given_up = 1;
            tally.given_up_ids = vec![uuid::Uuid::from_u128(1)];
            tally.indeterminate = 2;
            tally.unknown_ids = vec![uuid::Uuid::from_u128(2), uuid::Uuid::from_u128(3)];
            let check = FinalCheck {
                ledger_rows: rows,
                given_up_found: found,
                unknown_found,
                ..healthy()
            };
            Report::new(run(), tally, Ok(check))
        };
        // The unknown ones' answer, as the ledger gives it.
        for (unknown_found, rows) in [(0, 5), (1, 6), (2, 7)] {
            let r = judged(0, unknown_found, rows);
            assert!(r.ok, "{r:?}");
            assert_eq!(r.indeterminate_committed, Some(unknown_found));
        }
        // Within the bound, but not what the ledger says of the ids.
        for (found, unknown_found, rows) in [(1, 0, 6), (0, 0, 6), (0, 2, 6)] {
            let r = judged(found, unknown_found, rows);
            assert!(!r.ok, "{r:?}");
            assert_eq!(r.invariants.ledger_matches_committed, Some(false));
            let why = r.violations();
            assert!(
                why.contains("the ledger holds") || why.contains("given up"),
                "{why}"
            );
        }
        // Two lies whose counts cancel: one reported given up that committed, one reported
        // committed that did not. The rows equal the committed ones and the unknown ones found;
        // only the question about the given-up ids sees it (dropped, a helper's mutation
        // passed).
        let r = judged(1, 0, 5);
        assert!(!r.ok, "{r:?}");
        assert!(r.violations().contains("given up"), "{}", r.violations());
    }

    /// The same swap with a refusal: one transfer reported refused (insufficient funds) that
    /// committed, one reported committed that did not. Every count and total holds; only the
    /// question about the refused ids sees it (counted only, such a bank passed).
    #[test]
    fn a_transfer_reported_refused_that_committed_fails_the_run() {
        let mut tally = Tally::new().expect("tally");
        tally.committed = 5;
        tally.insufficient_funds = 1;
        tally.refused_ids = vec![uuid::Uuid::from_u128(1)];
        let healthy_run = Report::new(
            run(),
            tally.clone(),
            Ok(FinalCheck {
                ledger_rows: 5,
                ..healthy()
            }),
        );
        assert!(healthy_run.ok, "{healthy_run:?}");
        let check = FinalCheck {
            ledger_rows: 5,
            refused_found: 1,
            ..healthy()
        };
        let r = Report::new(run(), tally, Ok(check));
        assert!(!r.ok, "{r:?}");
        assert_eq!(r.invariants.ledger_matches_committed, Some(false));
        assert_eq!(r.refused_in_ledger, Some(1));
        assert!(
            r.violations().contains("reported refused"),
            "{}",
            r.violations()
        );
        assert!(r
            .to_string()
            .contains("reported refused that the ledger holds: 1"));
    }

    /// A reader that saw a wrong total fails the run even when the final check finds the bank
    /// whole: what a reader sees mid-run (half a transfer visible) is gone by the end, and only
    /// the readers can catch it (found by a helper mutating the checks: dropping this passed
    /// every test, whose only wrong reads came with a balance the final check caught too).
    #[test]
    fn a_wrong_read_fails_a_run_whose_final_check_passed() {
        let run = Run {
            readers: 1,
            reads: 10,
            wrong_total_reads: 1,
            ..run()
        };
        let mut tally = Tally::new().expect("tally");
        tally.committed = 5;
        let report = Report::new(run, tally, Ok(healthy()));
        assert!(report.invariants.all(), "{report:?}");
        assert!(!report.ok, "{report:?}");
        // What the run's verdict names (an invariant violated, not errors).
        assert!(!report.invariants_hold(), "{report:?}");
        assert!(report.to_string().contains("workload: FAILED"));
    }

    /// Every count of a worker's tally reaches the run's: an indeterminate transfer left out
    /// made the ledger check's bound too tight (a committed one of unknown outcome failed the
    /// run) and the report said none was unknown.
    #[test]
    fn tallies_add_up_every_count() {
        let one = || {
            let mut t = Tally::new().expect("tally");
            t.committed = 1;
            t.insufficient_funds = 2;
            t.balance_overflow = 3;
            t.given_up = 4;
            t.indeterminate = 5;
            t.errors = 6;
            t.reconnects = 7;
            t.never_connected = 1;
            t.refused_at_first = 1;
            t.given_up_ids = vec![uuid::Uuid::from_u128(1)];
            t.unknown_ids = vec![uuid::Uuid::from_u128(2)];
            t.refused_ids = vec![uuid::Uuid::from_u128(3)];
            t
        };
        let mut sum = one();
        sum += &one();
        // The ids the final check asks about, each worker's (a refused id left out let a
        // refusal that committed pass), and the workers refused at first.
        assert_eq!(
            (
                sum.refused_at_first,
                sum.given_up_ids.len(),
                sum.unknown_ids.len(),
                sum.refused_ids.len()
            ),
            (2, 2, 2, 2)
        );
        assert_eq!(
            (
                sum.committed,
                sum.insufficient_funds,
                sum.balance_overflow,
                sum.given_up,
                sum.indeterminate,
                sum.errors,
                sum.reconnects,
                sum.never_connected
            ),
            (2, 4, 6, 8, 10, 12, 14, 2)
        );
    }

    // Tests from a fourth mutation round (each fails on its mutant, passes here).

    /// With `--reuse-accounts`, what other clients moved into the run's accounts is part of the
    /// expected total: the run holds what it started with plus that, and a total that ignores
    /// it is money lost (or a sound bank called broken), the number named being the expected one.
    #[test]
    fn the_total_expected_counts_what_other_clients_moved() {
        let judged = |total: i128| {
            let mut tally = Tally::new().expect("tally");
            tally.committed = 5;
            let run = Run {
                reuse_accounts: true,
                ..run()
            };
            let check = FinalCheck {
                total,
                moved_by_others: 300,
                others_rows: 1,
                ..healthy()
            };
            Report::new(run, tally, Ok(check))
        };
        let whole = judged(10_300);
        assert!(whole.ok, "{whole:?}");
        let lost = judged(10_000);
        assert!(!lost.ok, "{lost:?}");
        assert_eq!(lost.invariants.total_conserved, Some(false));
        assert!(
            lost.violations()
                .contains("hold 10000 where the ledger explains 10300"),
            "{}",
            lost.violations()
        );
    }

    /// A transfer reported committed that the ledger lacks fails the run when the ids of the
    /// given-up ones are not all known too (a count without ids: the bound alone judges): the
    /// lower bound dropped passed every test, whose counts all came with their ids.
    #[test]
    fn a_committed_transfer_missing_from_the_ledger_fails_the_run_without_ids() {
        let mut tally = Tally::new().expect("tally");
        tally.committed = 5;
        tally.given_up = 1;
        let check = FinalCheck {
            ledger_rows: 4,
            ..healthy()
        };
        let r = Report::new(run(), tally, Ok(check));
        assert!(!r.ids_known, "{r:?}");
        assert!(!r.ok, "{r:?}");
        assert_eq!(r.invariants.ledger_matches_committed, Some(false));
        assert!(
            r.violations().contains("the ledger holds 4"),
            "{}",
            r.violations()
        );
    }

    /// Errors, and readers none of whose reads finished, fail a run whose ledger is whole; and a
    /// run without readers never "never read".
    #[test]
    fn errors_or_readers_that_never_read_fail_a_whole_run() {
        let mut tally = Tally::new().expect("tally");
        tally.committed = 5;
        tally.errors = 1;
        let r = Report::new(run(), tally, Ok(healthy()));
        assert!(r.invariants_hold(), "{r:?}");
        assert!(!r.ok, "{r:?}");
        assert!(!r.readers_never_read(), "no readers were asked for");
        let mut tally = Tally::new().expect("tally");
        tally.committed = 5;
        let idle = Run {
            readers: 2,
            reads: 0,
            ..run()
        };
        let r = Report::new(idle, tally, Ok(healthy()));
        assert!(!r.ok, "{r:?}");
        assert!(r.readers_never_read(), "{r:?}");
    }

    /// Throughput over a run shorter than a second is per second still (a 0.5 s run of 100
    /// transfers is 200/s), and the latency's max is the slowest transfer, not a quantile.
    #[test]
    fn throughput_and_max_latency_are_the_run_s() {
        let mut tally = Tally::new().expect("tally");
        tally.committed = 100;
        for _ in 0..999 {
            tally.record_latency(1_000);
        }
        tally.record_latency(5_000_000);
        let short = Run {
            elapsed_secs: 0.5,
            ..run()
        };
        let r = Report::new(short, tally, Err("not checked".into()));
        assert!((r.throughput_per_sec - 200.0).abs() < 1e-6, "{r:?}");
        assert!(r.latency_ms.max >= 4_990.0, "{:?}", r.latency_ms);
    }
}
