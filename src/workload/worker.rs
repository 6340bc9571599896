//! One worker: random transfers through its own runner, its tally kept up to date for the
//! report.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::Rng;
use uuid::Uuid;

use super::crew::Slot;
use super::report::{latency_histogram, record_latency, Tally};
use hdrhistogram::Histogram;

use crate::batch::{ChunkRunner, Line, Outcome, Verdict};
use crate::error::{TransferError, WorkloadError};
use crate::models::NewTransfer;
use crate::retry::SharedRetryCounts;
use crate::transfer::Runner;

/// What the workers share while they run: live counters for the progress line and the
/// per-second figures of `--report`.
pub(super) struct Live {
    pub(super) committed: AtomicU64,
    /// Retries by cause, counted by each runner as they happen.
    pub(super) retries: Arc<SharedRetryCounts>,
    pub(super) errors: AtomicU64,
    pub(super) issued: AtomicU64,
    /// Latency of the transfers committed in the current display interval, in microseconds.
    interval: Mutex<Histogram<u64>>,
    /// The same for the current second of `--report`.
    second: Mutex<Histogram<u64>>,
    started: Instant,
    marks: Mutex<Marks>,
}

/// What happened in which second of the run (its index), as it happened.
#[derive(Debug, Default, Clone)]
pub(super) struct Marks {
    /// Seconds in which a connection was lost or the server did not answer.
    pub(super) faults: Vec<bool>,
    /// The lowest and highest total of the snapshot reads that ended in each second.
    pub(super) totals: Vec<Option<(i128, i128)>>,
}

impl Live {
    pub(super) fn new(started: Instant) -> Result<Live, WorkloadError> {
        Ok(Live {
            committed: AtomicU64::new(0),
            retries: Arc::new(SharedRetryCounts::default()),
            errors: AtomicU64::new(0),
            issued: AtomicU64::new(0),
            interval: Mutex::new(latency_histogram()?),
            second: Mutex::new(latency_histogram()?),
            started,
            marks: Mutex::new(Marks::default()),
        })
    }

    fn record(&self, micros: u64) {
        for h in [&self.interval, &self.second] {
            if let Ok(mut h) = h.lock() {
                record_latency(&mut h, micros);
            }
        }
    }

    /// The interval's histogram, leaving an empty one for the next interval.
    pub(super) fn take_interval(&self) -> Option<Histogram<u64>> {
        take(&self.interval)
    }

    /// The same for `--report`'s current second.
    pub(super) fn take_second(&self) -> Option<Histogram<u64>> {
        take(&self.second)
    }

    /// The second of the run that `at` falls in.
    fn second_of(&self, at: Instant) -> usize {
        at.saturating_duration_since(self.started).as_secs() as usize
    }

    /// From `from` to `to` a connection was lost or the server did not answer.
    pub(super) fn mark_fault(&self, from: Instant, to: Instant) {
        let (first, last) = (self.second_of(from), self.second_of(to));
        if let Ok(mut m) = self.marks.lock() {
            if m.faults.len() <= last {
                m.faults.resize(last + 1, false);
            }
            for f in &mut m.faults[first..=last] {
                *f = true;
            }
        }
    }

    /// A snapshot read that ended at `at` saw `total`.
    pub(super) fn read_total(&self, at: Instant, total: i128) {
        let s = self.second_of(at);
        if let Ok(mut m) = self.marks.lock() {
            if m.totals.len() <= s {
                m.totals.resize(s + 1, None);
            }
            m.totals[s] = Some(match m.totals[s] {
                Some((low, high)) => (low.min(total), high.max(total)),
                None => (total, total),
            });
        }
    }

    pub(super) fn marks(&self) -> Marks {
        self.marks.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

fn take(h: &Mutex<Histogram<u64>>) -> Option<Histogram<u64>> {
    let mut h = h.lock().ok()?;
    let taken = h.clone();
    h.reset();
    Some(taken)
}

/// Ids of one run's transfers: the first six bytes are the run's, the rest random, so the
/// run's ledger rows are one primary-key range.
#[derive(Debug, Clone, Copy)]
pub(super) struct IdPrefix(pub(super) [u8; 6]);

impl IdPrefix {
    pub(super) fn id(&self, rng: &mut impl Rng) -> Uuid {
        let mut bytes: [u8; 16] = rng.random();
        bytes[..6].copy_from_slice(&self.0);
        // Sets the version and variant bits (bytes 6 and 8); the prefix stays.
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }

    pub(super) fn range(&self) -> (Uuid, Uuid) {
        let mut low = [0u8; 16];
        let mut high = [0xffu8; 16];
        low[..6].copy_from_slice(&self.0);
        high[..6].copy_from_slice(&self.0);
        (Uuid::from_bytes(low), Uuid::from_bytes(high))
    }
}

/// How often a worker's pause after a failure looks for Ctrl-C.
const PAUSE_LOOKS_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

pub(super) struct Worker {
    pub(super) runner: Runner,
    /// `--batch N`: N transfers at a time through the chunk statement, instead of `runner`.
    pub(super) batch: Option<(u64, ChunkRunner)>,
    pub(super) ids: Arc<Vec<Uuid>>,
    pub(super) live: Arc<Live>,
    pub(super) slot: Arc<Slot>,
    pub(super) epoch: Instant,
    pub(super) max_amount: i64,
    pub(super) limit: Option<u64>,
    pub(super) end: Option<Instant>,
    pub(super) prefix: IdPrefix,
    pub(super) rng: StdRng,
    /// Started by the watchdog in a stuck worker's place: one that cannot log in (the server
    /// still frozen) is no worker the database refused, and is counted as stuck already.
    pub(super) replacement: bool,
}

impl Worker {
    pub(super) fn run(mut self) {
        if let Some((n, chunk)) = self.batch.take() {
            return self.run_batches(n, chunk);
        }
        // Transfers in a row that failed with an error (not refused on their merits): the next
        // waits, longer each time, as a retry does.
        let mut failed_in_a_row = 0u32;
        while self.more() {
            let t = self.next_transfer();
            self.in_hand(&[t.id]);
            self.started_now();
            if !self.slot.ticket.begin() {
                return;
            }
            let began = Instant::now();
            let result = self.runner.run(&t);
            if !self.slot.ticket.finish() {
                // The watchdog gave up on this transfer and counted it; this worker, and its
                // connection, are done.
                return;
            }
            let mut failed = false;
            let micros = began.elapsed().as_micros().min(u64::MAX as u128) as u64;
            let Ok(mut tally) = self.slot.tally.lock() else {
                return;
            };
            tally.retries = self.runner.retries;
            tally.reconnects = self.runner.session.connects.saturating_sub(1);
            tally.never_connected =
                u64::from(!self.replacement && self.runner.session.connects == 0);
            let session = &self.runner.session;
            tally.refused_at_first = u64::from(
                !self.replacement && session.refused_before_first > 0 && session.connects > 0,
            );
            match result {
                Ok(receipt) => {
                    // Random v4 ids never repeat, so "already applied" would be a bug.
                    if receipt.already_applied {
                        tally.errors += 1;
                        tally.last_error = Some(format!("transfer {} applied twice?", t.id));
                    } else {
                        tally.committed += 1;
                        self.live.committed.fetch_add(1, Ordering::Relaxed);
                        self.live.record(micros);
                        tally.record_latency(micros);
                    }
                }
                Err(TransferError::InsufficientFunds { .. }) => {
                    tally.insufficient_funds += 1;
                    tally.refused_ids.push(t.id);
                }
                Err(TransferError::BalanceOverflow { .. }) => {
                    tally.balance_overflow += 1;
                    tally.refused_ids.push(t.id);
                }
                Err(TransferError::NotApplied { .. }) => {
                    tally.given_up += 1;
                    tally.given_up_ids.push(t.id);
                }
                Err(TransferError::OutcomeUnknown { .. }) => {
                    tally.indeterminate += 1;
                    tally.unknown_ids.push(t.id);
                }
                Err(e) => {
                    warn_once(t.id, &e);
                    failed = true;
                    tally.errors += 1;
                    tally.last_error = Some(e.to_string());
                    self.live.errors.fetch_add(1, Ordering::Relaxed);
                    // Whatever it was, do not reuse the connection it happened on.
                    self.runner.session.reset();
                    if matches!(e, TransferError::NotMigrated(_)) {
                        break;
                    }
                }
            }
            drop(tally);
            // A server that fails every statement at once (a full lock table: "out of shared
            // memory") was sent the next transfer at once, on a new connection: some 75 a
            // second per worker.
            failed_in_a_row = match failed {
                true => failed_in_a_row.saturating_add(1),
                false => 0,
            };
            self.pause(failed_in_a_row);
        }
        // The connection closes before the worker says it is done: the process may exit as soon
        // as every worker is done, and libpq's exit handlers must not race a closing connection.
        let slot = Arc::clone(&self.slot);
        drop(self);
        slot.done.store(true, Ordering::SeqCst);
    }

    /// Whether to start another transfer: before the end, or while transfers remain.
    pub(super) fn more(&self) -> bool {
        self.take(1) == 1
    }

    /// How many of the next `n` transfers to start: `n` before the end, else what remains.
    fn take(&self, n: u64) -> u64 {
        if crate::interrupt::interrupted() {
            return 0;
        }
        if let Some(e) = self.end {
            return if Instant::now() < e { n } else { 0 };
        }
        let limit = self.limit.unwrap_or(0);
        let before = self.live.issued.fetch_add(n, Ordering::Relaxed);
        n.min(limit.saturating_sub(before))
    }

    /// `--batch`: chunks of random transfers, each applied as one statement (or more, when a
    /// line is refused). A chunk's latency is one sample: the histogram is per batch.
    fn run_batches(mut self, n: u64, mut chunk: ChunkRunner) {
        // Batches in a row that applied nothing because the server failed them (not a line
        // refused on its merits): the next waits, longer each time, as a retry does.
        let mut failed_in_a_row = 0u32;
        loop {
            let count = self.take(n);
            if count == 0 {
                break;
            }
            let lines: Vec<Line> = (1..=count)
                .map(|line| Line {
                    line,
                    transfer: self.next_transfer(),
                })
                .collect();
            self.slot.in_flight.store(count, Ordering::SeqCst);
            let ids: Vec<Uuid> = lines.iter().map(|l| l.transfer.id).collect();
            self.in_hand(&ids);
            self.started_now();
            if !self.slot.ticket.begin() {
                return;
            }
            let began = Instant::now();
            let result = chunk.apply(&lines);
            if !self.slot.ticket.finish() {
                // The watchdog gave up on this chunk and counted it.
                return;
            }
            let micros = began.elapsed().as_micros().min(u64::MAX as u128) as u64;
            let Ok(mut tally) = self.slot.tally.lock() else {
                return;
            };
            tally.retries = chunk.retries;
            tally.reconnects = chunk.session.connects.saturating_sub(1);
            tally.never_connected = u64::from(!self.replacement && chunk.session.connects == 0);
            tally.refused_at_first = u64::from(
                !self.replacement
                    && chunk.session.refused_before_first > 0
                    && chunk.session.connects > 0,
            );
            let verdicts = match result {
                Ok(v) => v,
                Err(fatal) => {
                    // Statements of this chunk may have committed before its connection was
                    // lost and could not be made again (a role refused its login meanwhile):
                    // their lines count as decided, the statement in hand as of unknown outcome
                    // (the ledger decides, by their ids), the rest was never sent. Dropped, the
                    // ledger held more of the run's rows than it reported committed: "invariants
                    // violated" on a sound bank.
                    let (decided, statement) = chunk.watch.progress();
                    for (l, v) in lines.iter().zip(&decided) {
                        tally_verdict(&mut tally, &self.live, Some(l.transfer.id), v);
                    }
                    let in_hand: Vec<Uuid> = lines
                        .iter()
                        .skip(decided.len())
                        .take(statement)
                        .map(|l| l.transfer.id)
                        .collect();
                    tally.indeterminate += in_hand.len() as u64;
                    tally.unknown_ids.extend(in_hand);
                    tally.errors += 1;
                    // The connection's own words: as a `bank::Error` it spoke of "this file" and
                    // of running it again, a file's advice (a reviewer's nit).
                    tally.last_error = Some(fatal.to_string());
                    self.live.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            };
            let mut applied = 0;
            for (l, v) in lines.iter().zip(&verdicts) {
                applied += tally_verdict(&mut tally, &self.live, Some(l.transfer.id), v);
            }
            if applied > 0 {
                self.live.record(micros);
                tally.record_latency(micros);
            }
            drop(tally);
            // A server that fails every statement at once (a full lock table: "out of shared
            // memory") was sent the next batch at once: 123,744 errors in 4 s (found by a
            // fault-injecting helper).
            let failed = verdicts
                .iter()
                .any(|v| matches!(v.outcome, Outcome::NotApplied | Outcome::Refused));
            failed_in_a_row = match applied == 0 && failed {
                true => failed_in_a_row.saturating_add(1),
                false => 0,
            };
            self.pause(failed_in_a_row);
        }
        let slot = Arc::clone(&self.slot);
        drop(chunk);
        drop(self);
        slot.done.store(true, Ordering::SeqCst);
    }

    /// After `failed_in_a_row` failures (none: no pause), a pause that grows as a retry's does,
    /// ending by the run's end, or at Ctrl-C: slept whole, it kept a run by count (which has no
    /// end to cut it) from stopping for up to a second after the signal.
    fn pause(&self, failed_in_a_row: u32) {
        if failed_in_a_row == 0 {
            return;
        }
        // Not from the worker's generator, whose sequence `--seed` reproduces.
        let mut pause =
            crate::retry::RetryPolicy::default().backoff(failed_in_a_row, &mut rand::rng());
        if let Some(end) = self.end {
            pause = pause.min(end.saturating_duration_since(Instant::now()));
        }
        let until = Instant::now() + pause;
        while !crate::interrupt::interrupted() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(PAUSE_LOOKS_EVERY));
        }
    }

    /// Tells the watchdog the ids of the transfers about to be sent (one, or a batch's lines in
    /// order), so that those it gives up on are known by their ids.
    fn in_hand(&self, ids: &[Uuid]) {
        if let Ok(mut hand) = self.slot.ids.lock() {
            hand.clear();
            hand.extend_from_slice(ids);
        }
    }

    /// Tells the watchdog that a transfer (or a batch's statement) starts now.
    fn started_now(&self) {
        mark_started(&self.slot, self.epoch);
    }

    pub(super) fn next_transfer(&mut self) -> NewTransfer {
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

/// Notes in `slot` that its worker's transfer (or statement) starts now.
pub(super) fn mark_started(slot: &Slot, epoch: Instant) {
    slot.started_us.store(
        epoch.elapsed().as_micros().min(u64::MAX as u128) as u64,
        Ordering::SeqCst,
    );
}

/// Counts one `--batch` line's verdict in `tally` (and `live`); returns 1 when it applied. A line
/// never sent (the run ended or was interrupted between the chunk's statements) counts as
/// nothing: the workload's ids are its own, so nobody else can apply it.
pub(super) fn tally_verdict(
    tally: &mut Tally,
    live: &Live,
    line: Option<Uuid>,
    v: &Verdict,
) -> u64 {
    let id = || line.map_or_else(|| "?".to_string(), |id| id.to_string());
    match v.outcome {
        Outcome::Applied => {
            tally.committed += 1;
            live.committed.fetch_add(1, Ordering::Relaxed);
            return 1;
        }
        Outcome::InsufficientFunds => {
            tally.insufficient_funds += 1;
            tally.refused_ids.extend(line);
        }
        Outcome::BalanceOverflow => {
            tally.balance_overflow += 1;
            tally.refused_ids.extend(line);
        }
        // Refused by the database outright (read-only, a permission, a trigger): an error, as
        // without --batch; counted as given up, a read-only database's run said "ok".
        Outcome::Refused => {
            tally.refused_ids.extend(line);
            tally.errors += 1;
            tally.last_error = v.error.clone();
            live.errors.fetch_add(1, Ordering::Relaxed);
        }
        // Not applied because the server is out of disk or memory (a full disk's "could not
        // extend file", a full lock table's "out of shared memory"): an error, as without
        // --batch. Counted as given up, with no word of why, a run whose every batch met a full
        // disk said "workload: ok" where the same run without --batch failed naming the disk
        // (found by a helper, a real tmpfs filled under the server).
        Outcome::NotApplied
            if v.error
                .as_deref()
                .is_some_and(crate::error::is_out_of_resources) =>
        {
            tally.errors += 1;
            tally.last_error = v.error.clone();
            live.errors.fetch_add(1, Ordering::Relaxed);
        }
        Outcome::NotApplied => {
            log::debug!(
                "workload: transfer {} not applied: {}",
                id(),
                v.error.as_deref().unwrap_or("no reason given")
            );
            tally.given_up += 1;
            tally.given_up_ids.extend(line);
        }
        Outcome::Unknown if v.is_not_attempted() => {}
        Outcome::Unknown => {
            tally.indeterminate += 1;
            tally.unknown_ids.extend(line);
        }
        // Random ids over existing accounts: anything else is a bug.
        other => {
            tally.errors += 1;
            tally.last_error = Some(format!("transfer {}: {}", id(), other.as_str()));
            live.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    0
}

/// The kinds of failure already shown: a database error by its message without the transfer's
/// id, any other by its kind alone (an unknown account's names the account: a reset under way
/// printed one line per account).
static SHOWN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Shows a failure the first time one like it comes: a database that refuses every transfer
/// the same way (set read-only, a missing privilege) printed a line per transfer, thousands of
/// them. The summary counts them all, and gives the last.
fn warn_once(id: Uuid, e: &TransferError) {
    // On one line, as every line bank writes to stderr: a server's error may span several.
    let text = crate::text::one_line(&e.to_string());
    let kind = match e {
        TransferError::Database(_) => text.replace(&id.to_string(), ""),
        other => format!("{:?}", std::mem::discriminant(other)),
    };
    let first = match SHOWN.lock() {
        Ok(shown) if shown.contains(&kind) => false,
        Ok(mut shown) => {
            shown.push(kind);
            true
        }
        // A worker panicked holding it: show rather than hide.
        Err(_) => true,
    };
    if first {
        log::warn!(
            "workload: transfer {id} failed: {text} (failures like it are counted, not shown)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The live histograms (the progress line, `--histogram`, `--report`) dropped a latency past
    /// 10 minutes, which `--timeout` allows.
    #[test]
    fn live_latencies_past_ten_minutes_are_kept() {
        let live = Live::new(Instant::now()).expect("live");
        let year_us = 365 * 24 * 3600 * 1_000_000;
        live.record(11 * 60 * 1_000_000);
        live.record(year_us);
        for h in [live.take_interval(), live.take_second()] {
            let h = h.expect("a histogram");
            assert_eq!(h.len(), 2);
            assert!(h.max() >= year_us * 999 / 1000, "{}", h.max());
        }
    }
}
