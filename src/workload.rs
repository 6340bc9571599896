//! `bank workload`: concurrent random transfers through the same service `bank transfer` uses,
//! then a Jepsen-style check of the bank's invariants. Workers keep going through killed
//! connections and server restarts; a transfer whose connection died is settled through the
//! ledger, never guessed.

use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
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

/// One worker's tally.
struct Tally {
    committed: u64,
    insufficient_funds: u64,
    given_up: u64,
    /// Given up after an ambiguous attempt: applied or not, the ledger decides.
    indeterminate: u64,
    errors: u64,
    retries: RetryCounts,
    reconnects: u64,
    latency_us: Histogram<u64>,
    last_error: Option<String>,
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
    pub throughput_per_sec: f64,
    pub latency_ms: Latency,
    pub starting_total: i64,
    pub final_total: i64,
    pub ledger_rows_added: i64,
    pub invariants: Invariants,
    pub verify: VerifyReport,
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

pub fn run(url: &DbUrl, args: &WorkloadArgs, out: &mut impl Write) -> Result<(), Error> {
    let policy = args.run.policy();
    let mut setup = url.connect()?;
    let ids = prepare_accounts(&mut setup, args)?;
    let starting_total = repo::total_balance(&mut setup, &ids)?;
    let ledger_before = repo::count_transfers(&mut setup)?;
    drop(setup);

    let ids = Arc::new(ids);
    let live = Arc::new(Live::default());
    let started = Instant::now();
    let deadline = match args.duration {
        Some(d) => Some(
            started
                .checked_add(d)
                .ok_or_else(|| Error::Usage(format!("--duration {d:?} is too long")))?,
        ),
        None => None,
    };
    let workers: Vec<_> = (0..args.concurrency)
        .map(|w| {
            let worker = Worker {
                url: url.clone(),
                ids: Arc::clone(&ids),
                live: Arc::clone(&live),
                mode: args.run.mode,
                policy,
                max_amount: args.max_amount,
                limit: args.transfers,
                deadline,
                rng: match args.seed {
                    Some(s) => StdRng::seed_from_u64(s.wrapping_add(w)),
                    None => StdRng::from_rng(&mut rand::rng()),
                },
            };
            thread::spawn(move || worker.run())
        })
        .collect();
    let ticker = io::stderr()
        .is_terminal()
        .then(|| spawn_ticker(Arc::clone(&live), started));

    let mut tallies = Vec::new();
    for w in workers {
        match w.join() {
            Ok(t) => tallies.push(t?),
            Err(_) => return Err(Error::Workload("a worker thread panicked".into())),
        }
    }
    let elapsed = started.elapsed();
    live.stop.store(true, Ordering::Relaxed);
    if let Some(t) = ticker {
        let _ = t.join();
    }

    let (verify, final_total, ledger_after) = final_check(url, &policy, &ids)?;
    let report = build_report(
        args,
        ids.len(),
        tallies,
        elapsed,
        starting_total,
        final_total,
        ledger_after - ledger_before,
        verify,
    )?;
    if args.json {
        serde_json::to_writer(&mut *out, &report).map_err(io::Error::from)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", report.render())?;
    }
    if report.ok {
        Ok(())
    } else {
        Err(Error::Workload(
            "an invariant does not hold (see the report)".into(),
        ))
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

/// Verifies once the workers are done. The server may still be coming back from a restart, so
/// connecting and reading are retried like a transfer.
fn final_check(
    url: &DbUrl,
    policy: &RetryPolicy,
    ids: &[Uuid],
) -> Result<(VerifyReport, i64, i64), Error> {
    let mut rng = rand::rng();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = url.connect().map_err(Error::from).and_then(|mut conn| {
            let report = verify::verify(&mut conn)?;
            let total = repo::total_balance(&mut conn, ids)?;
            let ledger = repo::count_transfers(&mut conn)?;
            Ok((report, total, ledger))
        });
        match result {
            Ok(r) => return Ok(r),
            Err(e) if attempt < policy.max_attempts => {
                log::debug!("workload: final check failed ({e}), retrying");
                thread::sleep(policy.backoff(attempt, &mut rng));
            }
            Err(e) => return Err(e),
        }
    }
}

struct Worker {
    url: DbUrl,
    ids: Arc<Vec<Uuid>>,
    live: Arc<Live>,
    mode: Mode,
    policy: RetryPolicy,
    max_amount: i64,
    limit: Option<u64>,
    deadline: Option<Instant>,
    rng: StdRng,
}

impl Worker {
    fn run(mut self) -> Result<Tally, Error> {
        let mut session = Session::new(self.url.clone(), "bank-workload");
        let mut tally = Tally {
            committed: 0,
            insufficient_funds: 0,
            given_up: 0,
            indeterminate: 0,
            errors: 0,
            retries: RetryCounts::default(),
            reconnects: 0,
            latency_us: Histogram::new_with_bounds(1, 600_000_000, 3)
                .map_err(|e| Error::Workload(e.to_string()))?,
            last_error: None,
        };
        while self.more() {
            let t = self.next_transfer();
            let mut retries = RetryCounts::default();
            let began = Instant::now();
            let result =
                transfer::run_counted(&mut session, &t, self.mode, &self.policy, &mut retries);
            let micros = began.elapsed().as_micros().min(u64::MAX as u128) as u64;
            self.live
                .retries
                .fetch_add(retries.total(), Ordering::Relaxed);
            tally.retries.merge(&retries);
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
                Err(TransferError::RetriesExhausted {
                    outcome_unknown, ..
                }) => {
                    tally.given_up += 1;
                    tally.indeterminate += u64::from(outcome_unknown);
                }
                Err(TransferError::NotMigrated) => return Err(Error::NotMigrated),
                Err(e) => {
                    log::warn!("workload: transfer {} failed: {e}", t.id);
                    tally.errors += 1;
                    tally.last_error = Some(e.to_string());
                    self.live.errors.fetch_add(1, Ordering::Relaxed);
                    // Whatever it was, do not reuse the connection it happened on.
                    session.reset();
                }
            }
        }
        tally.reconnects = session.connects.saturating_sub(1);
        Ok(tally)
    }

    /// Whether to start another transfer: before the deadline, or while transfers remain.
    fn more(&self) -> bool {
        if let Some(d) = self.deadline {
            return Instant::now() < d;
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
            id: uuid::Builder::from_random_bytes(self.rng.random()).into_uuid(),
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

#[allow(clippy::too_many_arguments)]
fn build_report(
    args: &WorkloadArgs,
    accounts: usize,
    tallies: Vec<Tally>,
    elapsed: Duration,
    starting_total: i64,
    final_total: i64,
    ledger_rows_added: i64,
    verify: VerifyReport,
) -> Result<Report, Error> {
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)
        .map_err(|e| Error::Workload(e.to_string()))?;
    let mut retries = RetryCounts::default();
    let (mut committed, mut insufficient, mut given_up, mut indeterminate) = (0, 0, 0, 0);
    let (mut errors, mut reconnects) = (0, 0);
    let mut last_error = None;
    for t in tallies {
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
        last_error = last_error.or(t.last_error);
    }
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    let committed_i = i64::try_from(committed).unwrap_or(i64::MAX);
    let indeterminate_i = i64::try_from(indeterminate).unwrap_or(i64::MAX);
    let invariants = Invariants {
        total_conserved: final_total == starting_total,
        no_negative_balance: verify.negative_balances == 0,
        ledger_matches_committed: ledger_rows_added >= committed_i
            && ledger_rows_added <= committed_i + indeterminate_i,
        verify_ok: verify.ok,
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
        last_error,
    })
}

impl Report {
    pub fn render(&self) -> String {
        let mark = |ok: bool| if ok { "ok" } else { "VIOLATED" };
        let r = &self.retries;
        let mut s = format!(
            "workload: {} accounts, {} workers, mode {}, {:.1}s\n\
             transfers committed: {}\n\
             rejected (insufficient funds): {}\n\
             retries: {} (serialization {}, deadlock {}, ambiguous {}, connection lost {})\n\
             given up: {} (of which outcome unknown: {})\n\
             other errors: {}\n\
             reconnects: {}\n\
             throughput: {:.0} transfers/s\n\
             latency ms: p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}\n\
             invariants:\n\
             \x20 total {} = starting total {}: {}\n\
             \x20 no negative balance: {}\n\
             \x20 ledger rows added {} = transfers committed {} (+ at most {} of unknown outcome): {}\n\
             \x20 verify: {}\n",
            self.accounts,
            self.concurrency,
            match self.mode {
                Mode::Transaction => "transaction",
                Mode::SingleStatement => "single-statement",
            },
            self.elapsed_secs,
            self.transfers_committed,
            self.rejected_insufficient_funds,
            r.total(),
            r.serialization,
            r.deadlock,
            r.ambiguous,
            r.connection_lost,
            self.given_up,
            self.indeterminate,
            self.errors,
            self.reconnects,
            self.throughput_per_sec,
            self.latency_ms.p50,
            self.latency_ms.p95,
            self.latency_ms.p99,
            self.latency_ms.max,
            self.final_total,
            self.starting_total,
            mark(self.invariants.total_conserved),
            mark(self.invariants.no_negative_balance),
            self.ledger_rows_added,
            self.transfers_committed,
            self.indeterminate,
            mark(self.invariants.ledger_matches_committed),
            mark(self.invariants.verify_ok),
        );
        if let Some(e) = &self.last_error {
            s.push_str(&format!("last error: {e}\n"));
        }
        s.push_str(if self.ok {
            "workload: ok\n"
        } else {
            "workload: FAILED\n"
        });
        s
    }
}
