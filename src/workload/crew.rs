//! The workers of one run and the watchdog over them.

use std::io::{self, IsTerminal};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::SeedableRng;
use uuid::Uuid;

use super::histogram_log::HistogramLog;
use super::report::Tally;
use super::timeline::{Sampler, Second};
use super::worker::{mark_started, IdPrefix, Live, Worker};
use super::Config;
use crate::batch::ChunkRunner;
use crate::db::{DbUrl, Session};
use crate::error::Error;
use crate::guard::{GaveUp, Ticket};
use crate::retry::{classify, Cause, Phase};
use crate::transfer::{Runner, GRACE};

use super::worker::tally_verdict;

/// How often the watch loop looks at the workers, the clock and the progress display.
const LOOK_EVERY: Duration = Duration::from_millis(20);

/// Everything workers are made from.
pub(super) struct Crew {
    pub(super) url: DbUrl,
    pub(super) ids: Arc<Vec<Uuid>>,
    /// Each account's version when the starting total was read (`repo::totals_and_versions`):
    /// what other clients' ledger rows moved in or out since is part of the expected total.
    pub(super) since: Arc<Vec<(Uuid, i64)>>,
    pub(super) live: Arc<Live>,
    pub(super) prefix: IdPrefix,
    pub(super) config: Config,
    pub(super) started: Instant,
    pub(super) end: Option<Instant>,
    /// `--histogram`: handed to the progress display, which sends it each interval.
    pub(super) histogram_log: Mutex<Option<HistogramLog>>,
}

/// One worker's state, shared with the watchdog.
pub(super) struct Slot {
    /// The runner's ticket: the watchdog gives up on the transfer under way through it.
    pub(super) ticket: Ticket,
    /// When that transfer began, in microseconds since the run began.
    pub(super) started_us: AtomicU64,
    /// Transfers under way: 1, or a `--batch` chunk's size.
    pub(super) in_flight: AtomicU64,
    /// The ids of the transfers in hand, in order (a `--batch` chunk's lines): those the
    /// watchdog gives up on are counted by their ids.
    pub(super) ids: Mutex<Vec<Uuid>>,
    /// `--batch`: the chunk runner's progress, so that a chunk given up on counts the lines it
    /// decided as decided, and only its statement under way as given up or unknown.
    pub(super) chunk: Option<crate::batch::Watch>,
    pub(super) tally: Mutex<Tally>,
    /// The worker has returned.
    pub(super) done: AtomicBool,
}

/// What the watchdog saw: transfers it gave up on, counted as `given_up` (no COMMIT was sent)
/// or `indeterminate` (one may have been).
pub(super) struct Watchdog {
    pub(super) tally: Tally,
    pub(super) stuck_workers: u64,
    /// The run second by second, when `--report` asks for it.
    pub(super) seconds: Option<Vec<Second>>,
    /// Ctrl-C (or SIGTERM) came while transfers remained to be started: the figures cover the
    /// run so far. One that came once every transfer had started leaves them whole.
    pub(super) interrupted: bool,
    /// A stuck worker's replacement could not be started (said once).
    unreplaced: bool,
}

impl Crew {
    pub(super) fn spawn(&self, n: u64) -> Result<Arc<Slot>, Error> {
        let session = Session::new(self.url.clone(), "bank-workload")
            .with_timeout(self.config.policy.timeout);
        let mut runner = Runner::new(session, self.config.mode, self.config.policy);
        runner.live_retries = Some(Arc::clone(&self.live.retries));
        let batch = self.config.batch.map(|n| {
            let session = Session::new(self.url.clone(), "bank-workload")
                .with_timeout(self.config.policy.timeout);
            let mut chunk = ChunkRunner::new(session, self.config.policy)
                .isolated(self.config.batch_isolation.unwrap_or_default());
            chunk.watch.ticket = runner.ticket.clone();
            chunk.live_retries = Some(Arc::clone(&self.live.retries));
            // Ctrl-C and the run's end stop a chunk between its statements: one with many
            // refused lines takes a statement each, and outlived the run.
            chunk.interruptible = true;
            chunk.stop_at = self.end;
            (n, chunk)
        });
        let slot = Arc::new(Slot {
            ticket: runner.ticket.clone(),
            // Now, not the run's start: until the worker begins its first transfer, the
            // watchdog must not take a fresh worker for one stuck since the run began.
            started_us: AtomicU64::new(self.started.elapsed().as_micros() as u64),
            in_flight: AtomicU64::new(1),
            ids: Mutex::new(Vec::new()),
            chunk: batch.as_ref().map(|(_, chunk)| chunk.watch.clone()),
            tally: Mutex::new(Tally::new()?),
            done: AtomicBool::new(false),
        });
        let batch = batch.map(|(n, mut chunk)| {
            let (watched, epoch) = (Arc::clone(&slot), self.started);
            chunk.on_statement = Some(Arc::new(move || mark_started(&watched, epoch)));
            (n, chunk)
        });
        let worker = Worker {
            runner,
            batch,
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
            // The first `concurrency` are the workers asked for (`run`); the watchdog's come after.
            replacement: n >= self.config.concurrency,
        };
        crate::spawn(move || worker.run()).map_err(crate::error::Error::Thread)?;
        Ok(slot)
    }

    /// Waits for the workers, giving up on any transfer that outlives its deadline (its worker
    /// is stuck in the driver: a frozen server) and starting a fresh worker in its place while
    /// the run goes on. Returns at the latest at the end of the run plus one deadline, whatever
    /// the database does. Draws the live line on a terminal meanwhile.
    pub(super) fn watch(
        &self,
        slots: &mut Vec<Arc<Slot>>,
        probe: Option<&Probe>,
    ) -> Result<Watchdog, Error> {
        let patience = self.config.policy.timeout + GRACE;
        let mut hard_stop = self.end.and_then(|e| e.checked_add(patience));
        let mut interrupted = false;
        let mut seen = Watchdog {
            tally: Tally::new()?,
            stuck_workers: 0,
            seconds: None,
            interrupted: false,
            unreplaced: false,
        };
        let mut sampler = self
            .config
            .report
            .is_some()
            .then(|| Sampler::new(self.started));
        let log = self.histogram_log.lock().ok().and_then(|mut l| l.take());
        let line = LiveLine::new(self.started, self.config.display_every, log);
        // When this loop last looked, and when this process last ran again after it was
        // stopped (Ctrl-Z, SIGSTOP): the time it did not run is not the database's silence.
        // Continued past its deadlines, it gave up on every transfer in flight, whose answers
        // had waited for it ("a transfer outlived its deadline", stuck workers, transfers
        // counted given up or unknown that committed; a reviewer's find).
        let mut looked = Instant::now();
        let mut resumed: Option<Instant> = None;
        loop {
            let stopped = crate::guard::stopped_during(looked, LOOK_EVERY);
            let now = Instant::now();
            if let Some(stopped) = stopped {
                hard_stop = hard_stop.map(|h| h.checked_add(stopped).unwrap_or(h));
                resumed = Some(now);
            }
            looked = now;
            if !interrupted && crate::interrupt::interrupted() {
                // No new transfers from now on; those in flight get one deadline to finish.
                interrupted = true;
                seen.interrupted = self.transfers_remain();
                log::warn!("workload: interrupted; finishing the transfers in flight");
                let stop = now.checked_add(patience);
                hard_stop = match (hard_stop, stop) {
                    (Some(h), Some(s)) => Some(h.min(s)),
                    (h, s) => h.or(s),
                };
            }
            let over = hard_stop.is_some_and(|h| now >= h);
            let mut stuck = 0;
            for slot in slots.iter() {
                if slot.done.load(Ordering::SeqCst) || slot.ticket.is_abandoned() {
                    continue;
                }
                let began =
                    self.started + Duration::from_micros(slot.started_us.load(Ordering::SeqCst));
                let began = resumed.map_or(began, |r| began.max(r));
                let late =
                    slot.ticket.is_running() && now.saturating_duration_since(began) > patience;
                if !(over || late) {
                    continue;
                }
                let Some(how) = slot.ticket.abandon() else {
                    continue;
                };
                let mut in_hand = slot.in_flight.load(Ordering::SeqCst);
                let ids = slot.ids.lock().map(|ids| ids.clone()).unwrap_or_default();
                let mut first = 0;
                if let Some(chunk) = &slot.chunk {
                    // The chunk's lines decided so far count as such; of the rest, only those
                    // of the statement under way were sent.
                    let (decided, statement) = chunk.progress();
                    for (i, v) in decided.iter().enumerate() {
                        tally_verdict(&mut seen.tally, &self.live, ids.get(i).copied(), v);
                    }
                    let undecided = in_hand.saturating_sub(decided.len() as u64);
                    in_hand = undecided.min(statement as u64);
                    first = decided.len();
                }
                let sent = ids.iter().skip(first).take(in_hand as usize);
                match how {
                    GaveUp::NotApplied => {
                        seen.tally.given_up += in_hand;
                        seen.tally.given_up_ids.extend(sent);
                    }
                    GaveUp::Unknown => {
                        seen.tally.indeterminate += in_hand;
                        seen.tally.unknown_ids.extend(sent);
                    }
                }
                // Once: a frozen server strands every worker and then each replacement, one line
                // each (131 of them for 40 workers, found by a new user); the report counts them.
                if seen.stuck_workers == 0 && stuck == 0 {
                    log::warn!(
                        "workload: a transfer outlived its deadline; its worker is abandoned \
                         (the report counts any others as stuck_workers)"
                    );
                }
                // Only the second it was given up in: the transfer may have been answered for a
                // while (retries after serialization failures) before the server stopped
                // answering, and marking from its start shaded seconds before a freeze. The
                // seconds the server did not answer are the probe's to mark.
                self.live.mark_fault(now, now);
                stuck += 1;
            }
            seen.stuck_workers += stuck;
            if over {
                line.finish(&self.live);
                seen.seconds = sampler.map(|s| s.finish(&self.live));
                return Ok(seen);
            }
            if self.more() {
                for _ in 0..stuck {
                    match self.spawn(slots.len() as u64) {
                        Ok(slot) => slots.push(slot),
                        // The run goes on with the workers it has (see `run`): ending it here
                        // left the others' transfers without a report.
                        Err(Error::Thread(e)) => {
                            if !seen.unreplaced {
                                crate::say(format_args!(
                                    "bank: warning: a stuck worker could not be replaced: the \
                                     system would not start a thread ({e}); the run goes on \
                                     with the workers it has"
                                ));
                            }
                            seen.unreplaced = true;
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            let running = slots
                .iter()
                .any(|s| !s.done.load(Ordering::SeqCst) && !s.ticket.is_abandoned());
            if !running {
                line.finish(&self.live);
                seen.seconds = sampler.map(|s| s.finish(&self.live));
                return Ok(seen);
            }
            line.tick(&self.live);
            if let Some(s) = sampler.as_mut() {
                s.tick(&self.live);
            }
            if let Some(p) = probe {
                p.check(now, &self.live);
            }
            thread::sleep(LOOK_EVERY);
        }
    }

    /// Starts `n` readers. Every read's total must be `total`, with no negative balance: a
    /// stale or non-serializable read (a follower read on CockroachDB, say) shows otherwise.
    pub(super) fn readers(&self, n: u64, total: i128) -> Readers {
        let readers = Readers {
            stop: Arc::new(AtomicBool::new(false)),
            reads: Arc::new(AtomicU64::new(0)),
            wrong: Arc::new(AtomicU64::new(0)),
            running: Arc::new(AtomicU64::new(n)),
            failure: Arc::new(Mutex::new(None)),
        };
        for r in 0..n {
            log::debug!("workload: starting reader {r}");
            let (stop, reads, wrong, running, failure) = (
                Arc::clone(&readers.stop),
                Arc::clone(&readers.reads),
                Arc::clone(&readers.wrong),
                Arc::clone(&readers.running),
                Arc::clone(&readers.failure),
            );
            let (url, ids, since, timeout, live) = (
                self.url.clone(),
                Arc::clone(&self.ids),
                Arc::clone(&self.since),
                self.config.policy.timeout,
                Arc::clone(&self.live),
            );
            let (low, high) = self.prefix.range();
            let (failed, left) = (Arc::clone(&readers.failure), Arc::clone(&readers.running));
            let spawned = crate::spawn(move || {
                let mut conn = None;
                // At least one read, however short the run: a reader that had not begun when a
                // 1 ms run stopped failed the run for a check it never made (a reviewer's find).
                let mut first = true;
                while std::mem::take(&mut first) || !stop.load(Ordering::SeqCst) {
                    let began = Instant::now();
                    if conn.is_none() {
                        match url.connect_within("bank-reader", timeout) {
                            Ok(c) => conn = Some(c),
                            Err(e) => {
                                if e.is_transient() {
                                    live.mark_fault(began, Instant::now());
                                }
                                note(&failure, format_args!("could not connect: {e}"));
                                thread::sleep(Duration::from_millis(50));
                                continue;
                            }
                        }
                    }
                    let Some(c) = conn.as_mut() else {
                        continue;
                    };
                    match read_totals(c, &ids, &since, total, (low, high), false) {
                        Ok((sum, expected, negative, _)) => {
                            // A read that ends after the run still read one snapshot: it
                            // counts (over many accounts, it may be the only one), though the
                            // chart's seconds are over.
                            reads.fetch_add(1, Ordering::SeqCst);
                            if !stop.load(Ordering::SeqCst) {
                                live.read_total(Instant::now(), sum);
                            }
                            // Once, as above: every read after a tampered balance saw it (85 lines
                            // in a short run); the report counts them as wrong_total_reads.
                            if (sum != expected || negative != 0)
                                && wrong.fetch_add(1, Ordering::SeqCst) == 0
                            {
                                log::warn!("workload: a read saw total {sum} (expected {expected}) and {negative} negative balances (the report counts any others as wrong_total_reads)");
                            }
                        }
                        // A lost connection or a conflict says nothing about the bank: read again.
                        Err(e) => {
                            log::debug!("workload: a read failed ({e})");
                            note(&failure, format_args!("a read failed: {e}"));
                            if classify(&e, Phase::BeforeCommit) == Some(Cause::ConnectionLost) {
                                live.mark_fault(began, Instant::now());
                            }
                            conn = None;
                        }
                    }
                }
                // Closed before the reader counts as stopped (see `Readers::stop`).
                drop(conn);
                running.fetch_sub(1, Ordering::SeqCst);
            });
            // A reader the system would not start reads nothing: the run goes on with the others,
            // says so, and says why in its readers' last failure (with none started, the run
            // fails for want of a read).
            if let Err(e) = spawned {
                note(&failed, format_args!("a reader could not start: {e}"));
                // Readers `0..r` started; this one and the rest never will.
                left.fetch_sub(n - r, Ordering::SeqCst);
                started_fewer(r, n, "reader", &e);
                break;
            }
        }
        readers
    }

    /// Starts the probe of `--report`: `SELECT 1` on a connection of its own, every
    /// `PROBE_EVERY`, so that the seconds in which the server did not answer are known even
    /// when no transfer or read happened to fail in them (a frozen server answers nothing and
    /// reports no error).
    pub(super) fn probe(&self) -> Probe {
        let probe = Probe {
            stop: Arc::new(AtomicBool::new(false)),
            asking_since_us: Arc::new(AtomicU64::new(IDLE)),
            started: self.started,
        };
        let (stop, since) = (Arc::clone(&probe.stop), Arc::clone(&probe.asking_since_us));
        let (url, live, timeout, started) = (
            self.url.clone(),
            Arc::clone(&self.live),
            self.config.policy.timeout,
            self.started,
        );
        let spawned = crate::spawn(move || {
            let mut conn = None;
            while !stop.load(Ordering::SeqCst) {
                let began = Instant::now();
                since.store(
                    began.duration_since(started).as_micros() as u64,
                    Ordering::SeqCst,
                );
                let answered = match conn.as_mut() {
                    None => match url.connect_within("bank-probe", timeout) {
                        Ok(c) => {
                            conn = Some(c);
                            true
                        }
                        Err(e) => !e.is_transient(),
                    },
                    Some(c) => match diesel::RunQueryDsl::execute(diesel::sql_query("SELECT 1"), c)
                    {
                        Ok(_) => true,
                        Err(e) => {
                            conn = None;
                            classify(&e, Phase::BeforeCommit) != Some(Cause::ConnectionLost)
                        }
                    },
                };
                since.store(IDLE, Ordering::SeqCst);
                if !answered {
                    live.mark_fault(began, Instant::now());
                }
                thread::sleep(PROBE_EVERY);
            }
        });
        // Without it the report's shaded seconds are those the transfers saw fail only.
        if let Err(e) = spawned {
            log::warn!("workload: the probe of --report could not start: {e}");
        }
        probe
    }

    /// Whether the run goes on: before its end, or while transfers remain to be issued.
    pub(super) fn more(&self) -> bool {
        !crate::interrupt::interrupted() && self.transfers_remain()
    }

    /// Whether transfers remain to be started, Ctrl-C aside: before the end, or while some of
    /// those asked for are not issued yet.
    fn transfers_remain(&self) -> bool {
        self.end.is_some_and(|e| Instant::now() < e)
            || self
                .config
                .transfers
                .is_some_and(|n| self.live.issued.load(Ordering::Relaxed) < n)
    }
}

/// One snapshot of the workload's accounts: their total, the total expected there (the starting
/// total, plus what other clients' ledger rows moved in or out since, `repo::moved_in_by_others`),
/// and how many are negative. Other clients may use the same accounts (`--reuse-accounts`):
/// their transfers through the ledger are no violation, money without a ledger row is. With
/// `always` false the ledger is asked only when the total is not the starting one (a reader's
/// every read would otherwise scan each account's new entries); the final check asks always,
/// and then also how many of the accounts are gone (another client deleted them), in the same
/// snapshot.
pub(super) fn read_totals(
    conn: &mut diesel::PgConnection,
    ids: &[Uuid],
    since: &[(Uuid, i64)],
    starting_total: i128,
    (low, high): (Uuid, Uuid),
    always: bool,
) -> diesel::QueryResult<(i128, i128, i64, u64)> {
    conn.build_transaction()
        .repeatable_read()
        .read_only()
        .run(|c| {
            crate::db::wait_out_rewrites(c, "accounts, transfers")?;
            let (sum, negative) = crate::repo::snapshot_totals(c, ids)?;
            let moved = match always || sum != starting_total {
                true => crate::repo::moved_in_by_others(c, since, low, high)?,
                false => 0,
            };
            let gone = match always {
                true => (ids.len() as u64)
                    .saturating_sub(crate::repo::count_accounts_with_ids(c, ids)?.max(0) as u64),
                false => 0,
            };
            Ok((sum, starting_total + moved, negative, gone))
        })
}

/// How often the probe asks, and how long an answer may take before the server counts as not
/// answering.
const PROBE_EVERY: Duration = Duration::from_millis(200);
const PROBE_PATIENCE: Duration = Duration::from_secs(1);
/// The probe is not asking.
const IDLE: u64 = u64::MAX;

/// The probe of a run (see `Crew::probe`).
pub(super) struct Probe {
    stop: Arc<AtomicBool>,
    /// When the question under way was asked, in microseconds since the run began, or `IDLE`.
    asking_since_us: Arc<AtomicU64>,
    started: Instant,
}

impl Probe {
    /// Marks the time since the question under way was asked when it has gone unanswered for
    /// longer than `PROBE_PATIENCE`.
    fn check(&self, now: Instant, live: &Live) {
        let since = self.asking_since_us.load(Ordering::SeqCst);
        if since == IDLE {
            return;
        }
        let asked = self.started + Duration::from_micros(since);
        if now.saturating_duration_since(asked) > PROBE_PATIENCE {
            live.mark_fault(asked, now);
        }
    }

    /// Stops the probe (one stuck on a frozen server is left behind).
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The readers of a run: each reads the workload's accounts in one snapshot, over and over.
pub(super) struct Readers {
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
    wrong: Arc<AtomicU64>,
    /// Readers that have not yet closed their connection.
    running: Arc<AtomicU64>,
    /// The last reason a reader could not read.
    failure: Arc<Mutex<Option<String>>>,
}

/// Keeps `what` as the readers' last failure.
fn note(failure: &Mutex<Option<String>>, what: std::fmt::Arguments<'_>) {
    if let Ok(mut last) = failure.lock() {
        *last = Some(what.to_string());
    }
}

/// What the readers saw.
pub(super) struct Reads {
    pub(super) reads: u64,
    pub(super) wrong: u64,
    /// Why a reader last could not read, if one could not.
    pub(super) failure: Option<String>,
}

impl Readers {
    /// Stops the readers and returns their counts (a reader stuck on a frozen server is left
    /// behind: its read is not counted).
    pub(super) fn stop(self) -> Reads {
        self.stop.store(true, Ordering::SeqCst);
        // A reader closing its connection while the process exits races libpq's exit handlers
        // (a run killed by a signal after its report); a read takes milliseconds, a frozen one
        // is left behind after 250 ms.
        let waited = Instant::now();
        while self.running.load(Ordering::SeqCst) > 0
            && waited.elapsed() < Duration::from_millis(250)
        {
            thread::sleep(Duration::from_millis(5));
        }
        Reads {
            reads: self.reads.load(Ordering::SeqCst),
            wrong: self.wrong.load(Ordering::SeqCst),
            failure: self.failure.lock().ok().and_then(|mut f| f.take()),
        }
    }
}

/// Progress while the run goes on, every `--display-every` (1 s by default): on a terminal, one
/// live line (indicatif; none when TERM is "dumb"); otherwise one line per interval on stderr in
/// `cockroach workload`'s layout, with a retries column, so logs and CI show the run's shape.
pub(super) struct LiveLine {
    bar: Option<ProgressBar>,
    /// Where each interval's latency histogram goes (`--histogram`).
    log: Option<HistogramLog>,
    every: Duration,
    started: Instant,
    last: Mutex<Interval>,
}

/// Counters at the start of the current interval.
struct Interval {
    at: Instant,
    committed: u64,
    errors: u64,
    retries: u64,
    header_shown: bool,
}

impl LiveLine {
    pub(super) fn new(started: Instant, every: Duration, log: Option<HistogramLog>) -> LiveLine {
        let bar = io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template("{msg}") {
                bar.set_style(style);
            }
            bar
        });
        LiveLine {
            bar,
            log,
            every,
            started,
            last: Mutex::new(Interval {
                at: started,
                committed: 0,
                errors: 0,
                retries: 0,
                header_shown: false,
            }),
        }
    }

    pub(super) fn tick(&self, live: &Live) {
        self.show(live, false);
    }

    fn show(&self, live: &Live, last_one: bool) {
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        let since = last.at.elapsed();
        if since < self.every && !last_one {
            return;
        }
        let interval = live.take_interval();
        if let (Some(log), Some(h)) = (&self.log, &interval) {
            log.send(last.at.duration_since(self.started), since, h.clone());
        }
        let committed = live.committed.load(Ordering::Relaxed);
        let errors = live.errors.load(Ordering::Relaxed);
        let retries = live.retries.snapshot().total();
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = per_second(committed.saturating_sub(last.committed), since);
        match &self.bar {
            Some(bar) => bar.set_message(format!(
                "{elapsed:>5.0}s  {rate:>8.0} transfers/s  {committed} committed  {retries} retries  {errors} errors"
            )),
            None => {
                if !last.header_shown {
                    crate::say(format_args!("_elapsed___errors__ops/sec(inst)___ops/sec(cum)__p50(ms)__p95(ms)__p99(ms)_pMax(ms)__retries"));
                    last.header_shown = true;
                }
                let ms = |q: f64| {
                    interval
                        .as_ref()
                        .map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1000.0)
                };
                crate::say(format_args!(
                    "{:>7.1}s {:>8} {:>14.1} {:>14.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8} transfer",
                    elapsed,
                    errors.saturating_sub(last.errors),
                    rate,
                    committed as f64 / elapsed.max(1e-9),
                    ms(0.50),
                    ms(0.95),
                    ms(0.99),
                    ms(1.0),
                    retries.saturating_sub(last.retries),
                ));
            }
        }
        *last = Interval {
            at: Instant::now(),
            committed,
            errors,
            retries,
            header_shown: last.header_shown,
        };
    }

    /// Clears the live line: the report follows.
    pub(super) fn finish(&self, live: &Live) {
        self.show(live, true);
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `count` over `since`, as a rate per second. The last interval ends with the run, however
/// soon after the one before: over next to no time the rate was a huge number, or NaN (0 / 0).
/// The watch loop looks every `LOOK_EVERY`, so no interval is measured finer than that.
fn per_second(count: u64, since: Duration) -> f64 {
    count as f64 / since.max(LOOK_EVERY).as_secs_f64()
}

/// The one line said when the system would not start a thread for the next of `asked` workers
/// or readers, `started` of them running: the run goes on with those.
pub(super) fn started_fewer(started: u64, asked: u64, what: &str, e: &std::io::Error) {
    crate::say(format_args!(
        "bank: warning: started {}: the system would not start a thread for another ({e}; \
         ulimit -u, a container's or systemd's pids limit, or memory){}",
        crate::of_total(started, asked, what),
        match started {
            0 => String::new(),
            k => format!(": the run goes on with {k}"),
        }
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_over_next_to_no_time_is_finite() {
        for since in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_micros(50),
        ] {
            assert_eq!(per_second(0, since), 0.0, "{since:?}");
            let rate = per_second(3, since);
            assert!(rate.is_finite() && rate <= 3.0 / 0.02, "{since:?}: {rate}");
        }
        assert_eq!(per_second(50, Duration::from_millis(500)), 100.0);
        assert_eq!(per_second(3, Duration::from_millis(20)), 150.0);
    }
}
