//! `bank workload`: concurrent random transfers through the same service `bank transfer` uses,
//! then a Jepsen-style check of the bank's invariants. Workers keep going through killed
//! connections and server restarts; a transfer whose connection died is settled through the
//! ledger, never guessed.

use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use diesel::pg::PgConnection;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use uuid::Uuid;

use crate::cli::WorkloadArgs;
use crate::db::{DbUrl, Session};
use crate::error::{Error, TransferError};
use crate::guard::{GaveUp, Ticket};
use crate::models::{NewAccount, NewTransfer};
use crate::repo;
use crate::retry::RetryPolicy;
use crate::transfer::{self, Mode, RetryCounts};
use crate::verify::{self, Report as VerifyReport};

/// What the workers share while they run: live counters for the progress line.
#[derive(Default)]
struct Live {
    committed: AtomicU64,
    retries: AtomicU64,
    errors: AtomicU64,
    issued: AtomicU64,
    stop: AtomicBool,
}

/// One worker's tally, kept up to date after every transfer, so that the report can include a
/// worker that is stuck on a frozen server and never returns.
struct Tally {
    committed: u64,
    insufficient_funds: u64,
    /// Not applied: retries or the deadline ran out, or the worker was given up on before any
    /// COMMIT was sent.
    given_up: u64,
    /// Outcome unknown: an attempt may have committed and nothing settled it. The ledger has the
    /// answer; the check below allows for these.
    indeterminate: u64,
    errors: u64,
    retries: RetryCounts,
    reconnects: u64,
    latency_us: Histogram<u64>,
    last_error: Option<String>,
}

impl Tally {
    fn new() -> Result<Tally, Error> {
        Ok(Tally {
            committed: 0,
            insufficient_funds: 0,
            given_up: 0,
            indeterminate: 0,
            errors: 0,
            retries: RetryCounts::default(),
            reconnects: 0,
            latency_us: new_histogram()?,
            last_error: None,
        })
    }
}

fn new_histogram() -> Result<Histogram<u64>, Error> {
    Histogram::new_with_bounds(1, 600_000_000, 3).map_err(|e| Error::Workload(e.to_string()))
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub ok: bool,
    pub mode: Mode,
    pub accounts: usize,
    pub concurrency: u64,
    pub elapsed_secs: f64,
    pub transfers_committed: u64,
    pub rejected_insufficient_funds: u64,
    pub retries: RetryCounts,
    pub given_up: u64,
    pub indeterminate: u64,
    pub errors: u64,
    pub reconnects: u64,
    /// Workers given up on because a transfer of theirs outlived its deadline (and replaced).
    pub stuck_workers: u64,
    pub throughput_per_sec: f64,
    pub latency_ms: Latency,
    pub starting_total: i64,
    /// `null` when the final check could not run (see `final_check_error`).
    pub final_total: Option<i64>,
    /// Ledger rows of this run's own transfers (ids carry the run's prefix), so other clients
    /// writing to the same database cause no false alarm.
    pub ledger_rows_added: Option<i64>,
    pub invariants: Invariants,
    pub verify: Option<VerifyReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_check_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Serialize)]
pub struct Invariants {
    /// The workload's accounts hold together what they held at the start.
    pub total_conserved: bool,
    pub no_negative_balance: bool,
    /// Ledger rows added = transfers reported committed (plus at most the indeterminate ones).
    pub ledger_matches_committed: bool,
    pub verify_ok: bool,
}

/// Ids of one run's transfers: the first six bytes are the run's, the rest random, so the
/// run's ledger rows are one primary-key range.
#[derive(Debug, Clone, Copy)]
struct IdPrefix([u8; 6]);

impl IdPrefix {
    fn id(&self, rng: &mut impl Rng) -> Uuid {
        let mut bytes: [u8; 16] = rng.random();
        bytes[..6].copy_from_slice(&self.0);
        // Sets the version and variant bits (bytes 6 and 8); the prefix stays.
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }

    fn range(&self) -> (Uuid, Uuid) {
        let mut low = [0u8; 16];
        let mut high = [0xffu8; 16];
        low[..6].copy_from_slice(&self.0);
        high[..6].copy_from_slice(&self.0);
        (Uuid::from_bytes(low), Uuid::from_bytes(high))
    }
}

pub fn run(url: &DbUrl, args: &WorkloadArgs, out: &mut impl Write) -> Result<(), Error> {
    let policy = args.run.policy();
    let mut setup = url.connect()?;
    let ids = prepare_accounts(&mut setup, args)?;
    let starting_total = repo::total_balance(&mut setup, &ids)?;
    drop(setup);

    let mut seeder = match args.seed {
        Some(s) => StdRng::seed_from_u64(s),
        None => StdRng::from_rng(&mut rand::rng()),
    };
    let prefix = IdPrefix(seeder.random());
    let ids = Arc::new(ids);
    let live = Arc::new(Live::default());
    let started = Instant::now();
    let end = match args.duration {
        Some(d) => Some(
            started
                .checked_add(d)
                .ok_or_else(|| Error::Usage(format!("--duration {d:?} is too long")))?,
        ),
        None => None,
    };
    let spawn = |n: u64| -> Result<Arc<Slot>, Error> {
        let slot = Arc::new(Slot {
            ticket: Ticket::new(),
            started_us: AtomicU64::new(0),
            tally: Mutex::new(Tally::new()?),
            done: AtomicBool::new(false),
        });
        let worker = Worker {
            url: url.clone(),
            ids: Arc::clone(&ids),
            live: Arc::clone(&live),
            slot: Arc::clone(&slot),
            epoch: started,
            mode: args.run.mode,
            policy,
            max_amount: args.max_amount,
            limit: args.transfers,
            end,
            prefix,
            rng: match args.seed {
                Some(s) => StdRng::seed_from_u64(s.wrapping_add(n)),
                None => StdRng::from_rng(&mut rand::rng()),
            },
        };
        thread::spawn(move || worker.run());
        Ok(slot)
    };
    let mut slots = Vec::new();
    for w in 0..args.concurrency {
        slots.push(spawn(w)?);
    }
    let ticker = io::stderr()
        .is_terminal()
        .then(|| spawn_ticker(Arc::clone(&live), started));

    let watchdog = watch(&mut slots, &spawn, started, end, &policy, &live, args)?;
    let elapsed = started.elapsed();
    live.stop.store(true, Ordering::Relaxed);
    if let Some(t) = ticker {
        let _ = t.join();
    }

    // The whole run ends by its end plus one deadline: the check gets what is left of that
    // (and at least a moment, for a run whose workers all finished in time).
    let budget = end
        .and_then(|e| e.checked_add(policy.timeout))
        .map_or(policy.timeout, |stop| {
            stop.saturating_duration_since(Instant::now())
        })
        .max(transfer::GRACE * 2);
    let check = final_check(url, &policy, budget, &ids, prefix);
    let report = build_report(
        args,
        ids.len(),
        &slots,
        watchdog,
        elapsed,
        starting_total,
        check,
    )?;
    if args.json {
        serde_json::to_writer(&mut *out, &report).map_err(io::Error::from)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", report.render())?;
    }
    if report.ok {
        Ok(())
    } else if let Some(e) = &report.final_check_error {
        Err(Error::Workload(format!(
            "the final check could not run ({e}); see the report"
        )))
    } else {
        Err(Error::Workload(
            "an invariant does not hold (see the report)".into(),
        ))
    }
}

/// What the watchdog saw: transfers it gave up on, by what may be said of them.
#[derive(Debug, Default)]
struct Watchdog {
    given_up: u64,
    indeterminate: u64,
    stuck_workers: u64,
}

/// Waits for the workers, giving up on any transfer that outlives its deadline (its worker is
/// stuck in the driver: a frozen server) and starting a fresh worker in its place while the run
/// goes on. Returns at the latest at the end of the run plus one deadline, whatever the
/// database does.
fn watch(
    slots: &mut Vec<Arc<Slot>>,
    spawn: &dyn Fn(u64) -> Result<Arc<Slot>, Error>,
    started: Instant,
    end: Option<Instant>,
    policy: &RetryPolicy,
    live: &Live,
    args: &WorkloadArgs,
) -> Result<Watchdog, Error> {
    let patience = policy.timeout + transfer::GRACE;
    let hard_stop = end.and_then(|e| e.checked_add(patience));
    let mut seen = Watchdog::default();
    let give_up = |slot: &Slot, seen: &mut Watchdog| match slot.ticket.abandon() {
        Some(GaveUp::NotApplied) => seen.given_up += 1,
        Some(GaveUp::Unknown) => seen.indeterminate += 1,
        None => {}
    };
    loop {
        let now = Instant::now();
        let over = hard_stop.is_some_and(|h| now >= h);
        let mut replace = 0;
        for slot in slots.iter() {
            if slot.done.load(Ordering::SeqCst) || slot.ticket.is_abandoned() {
                continue;
            }
            let running_for = now.saturating_duration_since(
                started + Duration::from_micros(slot.started_us.load(Ordering::SeqCst)),
            );
            if over || (slot.ticket.is_running() && running_for > patience) {
                give_up(slot, &mut seen);
                if slot.ticket.is_abandoned() {
                    log::warn!(
                        "workload: a transfer outlived its deadline; its worker is abandoned"
                    );
                    seen.stuck_workers += 1;
                    replace += 1;
                }
            }
        }
        if over {
            return Ok(seen);
        }
        let more = end.is_some_and(|e| Instant::now() < e)
            || args
                .transfers
                .is_some_and(|n| live.issued.load(Ordering::Relaxed) < n);
        for _ in 0..if more { replace } else { 0 } {
            let n = slots.len() as u64;
            slots.push(spawn(n)?);
        }
        let running = slots
            .iter()
            .any(|s| !s.done.load(Ordering::SeqCst) && !s.ticket.is_abandoned());
        if !running {
            return Ok(seen);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn prepare_accounts(conn: &mut PgConnection, args: &WorkloadArgs) -> Result<Vec<Uuid>, Error> {
    let n = usize::try_from(args.accounts)
        .map_err(|_| Error::Usage(format!("--accounts {} is too large", args.accounts)))?;
    if args.reuse_accounts {
        let ids = repo::account_ids(conn, args.accounts.min(i64::MAX as u64) as i64)?;
        if ids.len() < 2 {
            return Err(Error::Workload(format!(
                "--reuse-accounts needs at least 2 existing accounts, found {}",
                ids.len()
            )));
        }
        return Ok(ids);
    }
    let new: Vec<NewAccount> = (0..n)
        .map(|_| NewAccount::with_balance(args.balance))
        .collect();
    repo::create_many(conn, &new)?;
    log::debug!("workload: created {n} accounts");
    Ok(new.into_iter().map(|a| a.id).collect())
}

/// What the final check found: `verify`, the workload accounts' total, this run's ledger rows.
type Check = Result<(VerifyReport, i64, i64), String>;

/// Verifies once the workers are done. The server may still be coming back from a restart, so
/// connecting and reading are retried like a transfer; and it may be frozen, so the check runs
/// on a thread of its own and is given up after one deadline.
fn final_check(
    url: &DbUrl,
    policy: &RetryPolicy,
    budget: Duration,
    ids: &Arc<Vec<Uuid>>,
    prefix: IdPrefix,
) -> Check {
    let (tx, rx) = std::sync::mpsc::channel();
    let (url, policy, ids) = (url.clone(), *policy, Arc::clone(ids));
    let deadline = Instant::now() + budget;
    thread::spawn(move || {
        let mut rng = rand::rng();
        let mut attempt = 0;
        let (low, high) = prefix.range();
        let result = loop {
            attempt += 1;
            let result = url
                .connect_within("bank", budget)
                .map_err(Error::from)
                .and_then(|mut conn| {
                    let report = verify::verify(&mut conn)?;
                    let total = repo::total_balance(&mut conn, &ids)?;
                    let ledger = repo::count_transfers_between(&mut conn, low, high)?;
                    Ok((report, total, ledger))
                });
            match result {
                Ok(r) => break Ok(r),
                Err(e) if attempt < policy.max_attempts && Instant::now() < deadline => {
                    log::debug!("workload: final check failed ({e}), retrying");
                    thread::sleep(policy.backoff(attempt, &mut rng));
                }
                Err(e) => break Err(e.to_string()),
            }
        };
        let _ = tx.send(result);
    });
    rx.recv_timeout(budget)
        .unwrap_or_else(|_| Err(format!("no answer from the database within {budget:?}")))
}

/// One worker's state, shared with the watchdog.
struct Slot {
    /// The transfer under way: the watchdog gives up on it through the ticket.
    ticket: Ticket,
    /// When that transfer began, in microseconds since the run began.
    started_us: AtomicU64,
    tally: Mutex<Tally>,
    /// The worker has returned.
    done: AtomicBool,
}

struct Worker {
    url: DbUrl,
    ids: Arc<Vec<Uuid>>,
    live: Arc<Live>,
    slot: Arc<Slot>,
    epoch: Instant,
    mode: Mode,
    policy: RetryPolicy,
    max_amount: i64,
    limit: Option<u64>,
    end: Option<Instant>,
    prefix: IdPrefix,
    rng: StdRng,
}

impl Worker {
    fn run(mut self) {
        let mut session =
            Session::new(self.url.clone(), "bank-workload").with_timeout(self.policy.timeout);
        while self.more() {
            let t = self.next_transfer();
            self.slot.started_us.store(
                self.epoch.elapsed().as_micros().min(u64::MAX as u128) as u64,
                Ordering::SeqCst,
            );
            if !self.slot.ticket.begin() {
                return;
            }
            let mut retries = RetryCounts::default();
            let began = Instant::now();
            let result = transfer::run_watched(
                &mut session,
                &t,
                self.mode,
                &self.policy,
                &mut retries,
                &self.slot.ticket,
            );
            if !self.slot.ticket.finish() {
                // The watchdog gave up on this transfer and counted it; this worker, and its
                // connection, are done.
                return;
            }
            let micros = began.elapsed().as_micros().min(u64::MAX as u128) as u64;
            self.live
                .retries
                .fetch_add(retries.total(), Ordering::Relaxed);
            let Ok(mut tally) = self.slot.tally.lock() else {
                return;
            };
            tally.retries.merge(&retries);
            tally.reconnects = session.connects.saturating_sub(1);
            match result {
                Ok(receipt) => {
                    // Random v4 ids never repeat, so "already applied" would be a bug.
                    if receipt.already_applied {
                        tally.errors += 1;
                        tally.last_error = Some(format!("transfer {} applied twice?", t.id));
                    } else {
                        tally.committed += 1;
                        self.live.committed.fetch_add(1, Ordering::Relaxed);
                        let _ = tally.latency_us.record(micros.max(1));
                    }
                }
                Err(TransferError::InsufficientFunds { .. }) => tally.insufficient_funds += 1,
                Err(TransferError::NotApplied { .. }) => tally.given_up += 1,
                Err(TransferError::OutcomeUnknown { .. }) => tally.indeterminate += 1,
                Err(e) => {
                    log::warn!("workload: transfer {} failed: {e}", t.id);
                    tally.errors += 1;
                    tally.last_error = Some(e.to_string());
                    self.live.errors.fetch_add(1, Ordering::Relaxed);
                    // Whatever it was, do not reuse the connection it happened on.
                    session.reset();
                    if matches!(e, TransferError::NotMigrated) {
                        break;
                    }
                }
            }
        }
        self.slot.done.store(true, Ordering::SeqCst);
    }

    /// Whether to start another transfer: before the end, or while transfers remain.
    fn more(&self) -> bool {
        if self.live.stop.load(Ordering::Relaxed) {
            return false;
        }
        if let Some(e) = self.end {
            return Instant::now() < e;
        }
        let limit = self.limit.unwrap_or(0);
        self.live.issued.fetch_add(1, Ordering::Relaxed) < limit
    }

    fn next_transfer(&mut self) -> NewTransfer {
        let n = self.ids.len();
        let from = self.rng.random_range(0..n);
        // A different account, uniformly among the others.
        let to = (from + self.rng.random_range(1..n)) % n;
        NewTransfer {
            // From the worker's generator, so that --seed reproduces the ids too.
            id: self.prefix.id(&mut self.rng),
            from_id: self.ids[from],
            to_id: self.ids[to],
            amount: self.rng.random_range(1..=self.max_amount),
        }
    }
}

/// The live line on stderr, once a second, while stderr is a terminal.
fn spawn_ticker(live: Arc<Live>, started: Instant) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut last = 0;
        let mut last_at = Instant::now();
        while !live.stop.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(100));
            if last_at.elapsed() < Duration::from_secs(1) {
                continue;
            }
            let committed = live.committed.load(Ordering::Relaxed);
            let rate = (committed - last) as f64 / last_at.elapsed().as_secs_f64();
            last = committed;
            last_at = Instant::now();
            eprint!(
                "\r{:>5.0}s  {rate:>8.0} transfers/s  {committed} committed  {} retries  {} errors ",
                started.elapsed().as_secs_f64(),
                live.retries.load(Ordering::Relaxed),
                live.errors.load(Ordering::Relaxed),
            );
        }
        eprintln!();
    })
}

fn build_report(
    args: &WorkloadArgs,
    accounts: usize,
    slots: &[Arc<Slot>],
    watchdog: Watchdog,
    elapsed: Duration,
    starting_total: i64,
    check: Check,
) -> Result<Report, Error> {
    let mut latency = new_histogram()?;
    let mut retries = RetryCounts::default();
    let (mut committed, mut insufficient) = (0, 0);
    let (mut given_up, mut indeterminate) = (watchdog.given_up, watchdog.indeterminate);
    let (mut errors, mut reconnects) = (0, 0);
    let mut last_error = None;
    for slot in slots {
        let t = slot
            .tally
            .lock()
            .map_err(|_| Error::Workload("a worker thread panicked".into()))?;
        latency
            .add(&t.latency_us)
            .map_err(|e| Error::Workload(e.to_string()))?;
        retries.merge(&t.retries);
        committed += t.committed;
        insufficient += t.insufficient_funds;
        given_up += t.given_up;
        indeterminate += t.indeterminate;
        errors += t.errors;
        reconnects += t.reconnects;
        last_error = last_error.or_else(|| t.last_error.clone());
    }
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    let committed_i = i64::try_from(committed).unwrap_or(i64::MAX);
    let indeterminate_i = i64::try_from(indeterminate).unwrap_or(i64::MAX);
    let (verify, final_total, ledger_rows_added, final_check_error) = match check {
        Ok((v, total, ledger)) => (Some(v), Some(total), Some(ledger), None),
        Err(e) => (None, None, None, Some(e)),
    };
    let invariants = Invariants {
        total_conserved: final_total == Some(starting_total),
        no_negative_balance: verify.as_ref().is_some_and(|v| v.negative_balances == 0),
        ledger_matches_committed: ledger_rows_added
            .is_some_and(|n| n >= committed_i && n <= committed_i.saturating_add(indeterminate_i)),
        verify_ok: verify.as_ref().is_some_and(|v| v.ok),
    };
    let ok = invariants.total_conserved
        && invariants.no_negative_balance
        && invariants.ledger_matches_committed
        && invariants.verify_ok
        && errors == 0;
    Ok(Report {
        ok,
        mode: args.run.mode,
        accounts,
        concurrency: args.concurrency,
        elapsed_secs: elapsed.as_secs_f64(),
        transfers_committed: committed,
        rejected_insufficient_funds: insufficient,
        retries,
        given_up,
        indeterminate,
        errors,
        reconnects,
        stuck_workers: watchdog.stuck_workers,
        throughput_per_sec: committed as f64 / elapsed.as_secs_f64().max(1e-9),
        latency_ms: Latency {
            p50: ms(0.50),
            p95: ms(0.95),
            p99: ms(0.99),
            max: latency.max() as f64 / 1000.0,
        },
        starting_total,
        final_total,
        ledger_rows_added,
        invariants,
        verify,
        final_check_error,
        last_error,
    })
}

impl Report {
    pub fn render(&self) -> String {
        self.to_string()
    }
}

/// The text report, one line each.
impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = |ok: bool| if ok { "ok" } else { "VIOLATED" };
        let known = |n: Option<i64>| n.map_or_else(|| "?".to_string(), |n| n.to_string());
        let r = &self.retries;
        let mode = match self.mode {
            Mode::Transaction => "transaction",
            Mode::SingleStatement => "single-statement",
        };
        writeln!(
            f,
            "workload: {} accounts, {} workers, mode {mode}, {:.1}s",
            self.accounts, self.concurrency, self.elapsed_secs
        )?;
        writeln!(f, "transfers committed: {}", self.transfers_committed)?;
        writeln!(
            f,
            "rejected (insufficient funds): {}",
            self.rejected_insufficient_funds
        )?;
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
        writeln!(
            f,
            "outcome unknown: {} (the ledger decides; see the ledger check)",
            self.indeterminate
        )?;
        writeln!(f, "other errors: {}", self.errors)?;
        writeln!(f, "reconnects: {}", self.reconnects)?;
        if self.stuck_workers > 0 {
            writeln!(
                f,
                "workers stuck past the deadline and replaced: {}",
                self.stuck_workers
            )?;
        }
        writeln!(f, "throughput: {:.0} transfers/s", self.throughput_per_sec)?;
        let l = &self.latency_ms;
        writeln!(
            f,
            "latency ms: p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}",
            l.p50, l.p95, l.p99, l.max
        )?;
        writeln!(f, "invariants:")?;
        if let Some(e) = &self.final_check_error {
            writeln!(f, "  the final check could not run: {e}")?;
        }
        writeln!(
            f,
            "  total {} = starting total {}: {}",
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
        writeln!(f, "  verify: {}", mark(self.invariants.verify_ok))?;
        if let Some(e) = &self.last_error {
            writeln!(f, "last error: {e}")?;
        }
        writeln!(
            f,
            "{}",
            if self.ok {
                "workload: ok"
            } else {
                "workload: FAILED"
            }
        )
    }
}
