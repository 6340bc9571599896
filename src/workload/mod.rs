//! `bank workload`: concurrent random transfers through the same runner `bank transfer` uses,
//! then a Jepsen-style check of the bank's invariants. Workers keep going through killed
//! connections and server restarts; a transfer whose connection died is settled through the
//! ledger, never guessed; one stuck on a frozen server is given up on by a watchdog at its
//! deadline. The report is in `report`.

mod report;

pub use report::{Invariants, Latency, Report};

use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use diesel::pg::PgConnection;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

use crate::db::{DbUrl, Session};
use crate::error::{ConnectError, Error, TransferError, WorkloadError};
use crate::guard::GaveUp;
use crate::models::{NewAccount, NewTransfer};
use crate::repo;
use crate::retry::{classify, retry, Attempt, Cause, Phase, RetryCounts, RetryPolicy, Stop};
use crate::transfer::{Mode, Runner, GRACE};
use crate::verify;
use report::{FinalCheck, Tally};

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub accounts: u64,
    /// Take the first `accounts` existing accounts instead of creating new ones.
    pub reuse_accounts: bool,
    pub balance: i64,
    pub concurrency: u64,
    /// Run for this long, or ...
    pub duration: Option<Duration>,
    /// ... attempt this many transfers in all.
    pub transfers: Option<u64>,
    pub max_amount: i64,
    pub seed: Option<u64>,
    pub mode: Mode,
    pub policy: RetryPolicy,
    pub json: bool,
}

/// What the workers share while they run: live counters for the progress line.
#[derive(Default)]
struct Live {
    committed: AtomicU64,
    retries: AtomicU64,
    errors: AtomicU64,
    issued: AtomicU64,
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

pub fn run(url: &DbUrl, config: &Config, out: &mut impl Write) -> Result<(), Error> {
    let policy = config.policy;
    let mut setup = url.connect()?;
    let ids = prepare_accounts(&mut setup, config)?;
    let starting_total = repo::total_balance(&mut setup, &ids)?;
    drop(setup);

    let mut seeder = match config.seed {
        Some(s) => StdRng::seed_from_u64(s),
        None => StdRng::from_rng(&mut rand::rng()),
    };
    let started = Instant::now();
    let end = match config.duration {
        Some(d) => Some(
            started
                .checked_add(d)
                .ok_or_else(|| Error::Usage(format!("--duration {d:?} is too long")))?,
        ),
        None => None,
    };
    let crew = Crew {
        url: url.clone(),
        ids: Arc::new(ids),
        live: Arc::new(Live::default()),
        prefix: IdPrefix(seeder.random()),
        config: config.clone(),
        started,
        end,
    };
    let mut slots = Vec::new();
    for w in 0..config.concurrency {
        slots.push(crew.spawn(w)?);
    }
    let watchdog = crew.watch(&mut slots)?;
    let elapsed = started.elapsed();

    // The whole run ends by its end plus one deadline: the check gets what is left of that
    // (and at least a moment, for a run whose workers all finished in time).
    let budget = end
        .and_then(|e| e.checked_add(policy.timeout))
        .map_or(policy.timeout, |stop| {
            stop.saturating_duration_since(Instant::now())
        })
        .max(GRACE * 2);
    let check = final_check(url, &policy, budget, &crew.ids, crew.prefix);
    let mut tally = watchdog.tally;
    for slot in &slots {
        tally += &*slot.tally.lock().map_err(|_| WorkloadError::Panicked)?;
    }
    let report = Report::new(
        report::Run {
            mode: config.mode,
            accounts: crew.ids.len(),
            concurrency: config.concurrency,
            elapsed_secs: elapsed.as_secs_f64(),
            starting_total,
            stuck_workers: watchdog.stuck_workers,
        },
        tally,
        check,
    );
    if config.json {
        serde_json::to_writer(&mut *out, &report).map_err(io::Error::from)?;
        writeln!(out)?;
    } else {
        write!(out, "{report}")?;
    }
    if report.ok {
        Ok(())
    } else if let Some(e) = report.final_check_error {
        Err(WorkloadError::FinalCheck(e).into())
    } else {
        Err(WorkloadError::InvariantViolated.into())
    }
}

/// Everything workers are made from.
struct Crew {
    url: DbUrl,
    ids: Arc<Vec<Uuid>>,
    live: Arc<Live>,
    prefix: IdPrefix,
    config: Config,
    started: Instant,
    end: Option<Instant>,
}

/// One worker's state, shared with the watchdog.
struct Slot {
    /// The runner's ticket: the watchdog gives up on the transfer under way through it.
    ticket: crate::guard::Ticket,
    /// When that transfer began, in microseconds since the run began.
    started_us: AtomicU64,
    tally: Mutex<Tally>,
    /// The worker has returned.
    done: AtomicBool,
}

/// What the watchdog saw: transfers it gave up on, counted as `given_up` (no COMMIT was sent)
/// or `indeterminate` (one may have been).
struct Watchdog {
    tally: Tally,
    stuck_workers: u64,
}

impl Crew {
    fn spawn(&self, n: u64) -> Result<Arc<Slot>, Error> {
        let session = Session::new(self.url.clone(), "bank-workload")
            .with_timeout(self.config.policy.timeout);
        let runner = Runner::new(session, self.config.mode, self.config.policy);
        let slot = Arc::new(Slot {
            ticket: runner.ticket.clone(),
            started_us: AtomicU64::new(0),
            tally: Mutex::new(Tally::new()?),
            done: AtomicBool::new(false),
        });
        let worker = Worker {
            runner,
            ids: Arc::clone(&self.ids),
            live: Arc::clone(&self.live),
            slot: Arc::clone(&slot),
            epoch: self.started,
            max_amount: self.config.max_amount,
            limit: self.config.transfers,
            end: self.end,
            prefix: self.prefix,
            rng: match self.config.seed {
                Some(s) => StdRng::seed_from_u64(s.wrapping_add(n)),
                None => StdRng::from_rng(&mut rand::rng()),
            },
        };
        thread::spawn(move || worker.run());
        Ok(slot)
    }

    /// Waits for the workers, giving up on any transfer that outlives its deadline (its worker
    /// is stuck in the driver: a frozen server) and starting a fresh worker in its place while
    /// the run goes on. Returns at the latest at the end of the run plus one deadline, whatever
    /// the database does. Draws the live line on a terminal meanwhile.
    fn watch(&self, slots: &mut Vec<Arc<Slot>>) -> Result<Watchdog, Error> {
        let patience = self.config.policy.timeout + GRACE;
        let hard_stop = self.end.and_then(|e| e.checked_add(patience));
        let mut seen = Watchdog {
            tally: Tally::new()?,
            stuck_workers: 0,
        };
        let line = LiveLine::new(self.started);
        loop {
            let now = Instant::now();
            let over = hard_stop.is_some_and(|h| now >= h);
            let mut stuck = 0;
            for slot in slots.iter() {
                if slot.done.load(Ordering::SeqCst) || slot.ticket.is_abandoned() {
                    continue;
                }
                let began =
                    self.started + Duration::from_micros(slot.started_us.load(Ordering::SeqCst));
                let late =
                    slot.ticket.is_running() && now.saturating_duration_since(began) > patience;
                if !(over || late) {
                    continue;
                }
                match slot.ticket.abandon() {
                    Some(GaveUp::NotApplied) => seen.tally.given_up += 1,
                    Some(GaveUp::Unknown) => seen.tally.indeterminate += 1,
                    None => continue,
                }
                log::warn!("workload: a transfer outlived its deadline; its worker is abandoned");
                stuck += 1;
            }
            seen.stuck_workers += stuck;
            if over {
                line.finish(&self.live);
                return Ok(seen);
            }
            if self.more() {
                for _ in 0..stuck {
                    slots.push(self.spawn(slots.len() as u64)?);
                }
            }
            let running = slots
                .iter()
                .any(|s| !s.done.load(Ordering::SeqCst) && !s.ticket.is_abandoned());
            if !running {
                line.finish(&self.live);
                return Ok(seen);
            }
            line.tick(&self.live);
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the run goes on: before its end, or while transfers remain to be issued.
    fn more(&self) -> bool {
        self.end.is_some_and(|e| Instant::now() < e)
            || self
                .config
                .transfers
                .is_some_and(|n| self.live.issued.load(Ordering::Relaxed) < n)
    }
}

/// The live line on a terminal (hidden otherwise, and on a terminal whose TERM is "dumb"), once
/// a second.
struct LiveLine {
    bar: ProgressBar,
    started: Instant,
    last: Mutex<(u64, Instant)>,
}

impl LiveLine {
    fn new(started: Instant) -> LiveLine {
        let target = if io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(None, target);
        if let Ok(style) = ProgressStyle::with_template("{msg}") {
            bar.set_style(style);
        }
        LiveLine {
            bar,
            started,
            last: Mutex::new((0, started)),
        }
    }

    fn tick(&self, live: &Live) {
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        let since = last.1.elapsed();
        if since < Duration::from_secs(1) {
            return;
        }
        let committed = live.committed.load(Ordering::Relaxed);
        let rate = committed.saturating_sub(last.0) as f64 / since.as_secs_f64();
        *last = (committed, Instant::now());
        self.bar.set_message(format!(
            "{:>5.0}s  {rate:>8.0} transfers/s  {committed} committed  {} retries  {} errors",
            self.started.elapsed().as_secs_f64(),
            live.retries.load(Ordering::Relaxed),
            live.errors.load(Ordering::Relaxed),
        ));
    }

    /// Clears the line: the report follows.
    fn finish(&self, live: &Live) {
        self.tick(live);
        self.bar.finish_and_clear();
    }
}

fn prepare_accounts(conn: &mut PgConnection, config: &Config) -> Result<Vec<Uuid>, Error> {
    let n = usize::try_from(config.accounts)
        .map_err(|_| Error::Usage(format!("--accounts {} is too large", config.accounts)))?;
    if config.reuse_accounts {
        let ids = repo::account_ids(conn, config.accounts.min(i64::MAX as u64) as i64)?;
        if ids.len() < 2 {
            return Err(WorkloadError::TooFewAccounts(ids.len()).into());
        }
        return Ok(ids);
    }
    let new: Vec<NewAccount> = (0..n)
        .map(|_| NewAccount::with_balance(config.balance))
        .collect();
    repo::create_many(conn, &new)?;
    log::debug!("workload: created {n} accounts");
    Ok(new.into_iter().map(|a| a.id).collect())
}

/// Verifies once the workers are done. The server may still be coming back from a restart, so
/// connecting and reading go through the retry loop; and it may be frozen, so the check runs on
/// a thread of its own and is given up after `budget`.
fn final_check(
    url: &DbUrl,
    policy: &RetryPolicy,
    budget: Duration,
    ids: &Arc<Vec<Uuid>>,
    prefix: IdPrefix,
) -> Result<FinalCheck, String> {
    let (tx, rx) = mpsc::channel();
    let (url, ids) = (url.clone(), Arc::clone(ids));
    let policy = RetryPolicy {
        timeout: budget,
        ..*policy
    };
    thread::spawn(move || {
        let (low, high) = prefix.range();
        let result = retry(&policy, &mut RetryCounts::default(), |_| {
            let read = |conn: &mut PgConnection| -> diesel::QueryResult<FinalCheck> {
                Ok(FinalCheck {
                    verify: verify::verify(conn)?,
                    total: repo::total_balance(conn, &ids)?,
                    ledger_rows: repo::count_transfers_between(conn, low, high)?,
                })
            };
            match url.connect_within("bank", budget) {
                Err(e) => connect_step(e),
                Ok(mut conn) => match read(&mut conn) {
                    Ok(check) => Attempt::Done(check),
                    Err(e) => match classify(&e, Phase::BeforeCommit) {
                        Some(cause) => Attempt::Retry {
                            cause,
                            message: e.to_string(),
                        },
                        None => Attempt::Fail(Error::from(e).to_string()),
                    },
                },
            }
        });
        let _ = tx.send(result.map_err(|stop| match stop {
            Stop::Failed(e) => e,
            Stop::Exhausted { last, .. } => last,
        }));
    });
    rx.recv_timeout(budget)
        .unwrap_or_else(|_| Err(format!("no answer from the database within {budget:?}")))
}

/// A failed connect as a step of the retry loop: a server that is down or restarting may come
/// back, a wrong password will not.
fn connect_step<T>(e: ConnectError) -> Attempt<T, String> {
    if e.is_transient() {
        Attempt::Retry {
            cause: Cause::ConnectionLost,
            message: e.message,
        }
    } else {
        Attempt::Fail(e.to_string())
    }
}

struct Worker {
    runner: Runner,
    ids: Arc<Vec<Uuid>>,
    live: Arc<Live>,
    slot: Arc<Slot>,
    epoch: Instant,
    max_amount: i64,
    limit: Option<u64>,
    end: Option<Instant>,
    prefix: IdPrefix,
    rng: StdRng,
}

impl Worker {
    fn run(mut self) {
        while self.more() {
            let t = self.next_transfer();
            self.slot.started_us.store(
                self.epoch.elapsed().as_micros().min(u64::MAX as u128) as u64,
                Ordering::SeqCst,
            );
            if !self.slot.ticket.begin() {
                return;
            }
            let retries_before = self.runner.retries;
            let began = Instant::now();
            let result = self.runner.run(&t);
            if !self.slot.ticket.finish() {
                // The watchdog gave up on this transfer and counted it; this worker, and its
                // connection, are done.
                return;
            }
            let micros = began.elapsed().as_micros().min(u64::MAX as u128) as u64;
            let retries = self.runner.retries.total() - retries_before.total();
            self.live.retries.fetch_add(retries, Ordering::Relaxed);
            let Ok(mut tally) = self.slot.tally.lock() else {
                return;
            };
            tally.retries = self.runner.retries;
            tally.reconnects = self.runner.session.connects.saturating_sub(1);
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
                    self.runner.session.reset();
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
