//! Giving up on a transfer that is stuck in the database driver.
//!
//! A frozen server (SIGSTOP, a VM pause) or a half-open connection leaves a blocking libpq call
//! waiting: the server's kernel keeps acknowledging packets, so neither TCP keepalives nor
//! `tcp_user_timeout` fire, and Diesel's `PgConnection` offers no way to cancel a query from
//! another thread. Only the caller can stop waiting. A transfer therefore runs on a thread of
//! its own with a `Ticket`, and the caller that gives up on it abandons the ticket; the thread,
//! if it ever wakes, finds the ticket abandoned and never sends a COMMIT after that.
//!
//! What the caller may report then depends on how far the transfer got, and the ticket records
//! exactly that: before any COMMIT was sent (or the single statement that is its own commit),
//! nothing was applied; once one was sent and its answer not read, or an earlier attempt's
//! outcome was ambiguous, the outcome is unknown. The state is one atomic, so "the runner sends
//! COMMIT" and "the caller gives up" cannot both win.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

const COMMITTING: u8 = 1;
const AMBIGUOUS: u8 = 2;
const FINISHED: u8 = 4;
const ABANDONED: u8 = 8;

/// What a caller that gave up on a transfer may say about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GaveUp {
    /// No COMMIT was sent, and none will be: nothing was applied.
    NotApplied,
    /// A COMMIT may have reached the server: only the ledger can tell, later.
    Unknown,
}

/// The shared state of one transfer between the thread running it and the caller waiting for
/// it. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct Ticket(Arc<AtomicU8>);

impl Ticket {
    pub fn new() -> Ticket {
        Ticket::default()
    }

    /// Starts the next transfer on this ticket; `false` when the ticket was abandoned.
    pub fn begin(&self) -> bool {
        self.update(|s| (s & ABANDONED == 0).then_some(0)).is_ok()
    }

    /// The runner is about to send a COMMIT (or the statement that commits itself). `false`
    /// when the caller has given up: the runner must roll back instead.
    pub fn enter_commit(&self) -> bool {
        self.update(|s| (s & ABANDONED == 0).then_some(s | COMMITTING))
            .is_ok()
    }

    /// The COMMIT's answer arrived. `maybe_applied`: it did not say "rolled back" (it said
    /// "committed", or nothing clear); an ambiguous outcome stays with the ticket until the end.
    pub fn leave_commit(&self, maybe_applied: bool) {
        let _ = self.update(|s| {
            let s = s & !COMMITTING;
            Some(if maybe_applied { s | AMBIGUOUS } else { s })
        });
    }

    /// An earlier attempt's outcome is unknown.
    pub fn mark_ambiguous(&self) {
        let _ = self.update(|s| Some(s | AMBIGUOUS));
    }

    /// The runner has its result; `false` when the caller gave up first (the result is then
    /// nobody's: the caller already reported what `abandon` told it).
    pub fn finish(&self) -> bool {
        self.update(|s| (s & ABANDONED == 0).then_some(s | FINISHED))
            .is_ok()
    }

    /// The caller gives up. `None` when the runner finished first: its result is on its way.
    pub fn abandon(&self) -> Option<GaveUp> {
        match self.update(|s| (s & FINISHED == 0).then_some(s | ABANDONED)) {
            Err(_) => None,
            Ok(s) if s & (COMMITTING | AMBIGUOUS) != 0 => Some(GaveUp::Unknown),
            Ok(_) => Some(GaveUp::NotApplied),
        }
    }

    pub fn is_abandoned(&self) -> bool {
        self.0.load(Ordering::SeqCst) & ABANDONED != 0
    }

    /// Whether a transfer is under way: begun and neither finished nor abandoned.
    pub fn is_running(&self) -> bool {
        self.0.load(Ordering::SeqCst) & (FINISHED | ABANDONED) == 0
    }

    fn update(&self, f: impl FnMut(u8) -> Option<u8>) -> Result<u8, u8> {
        self.0.fetch_update(Ordering::SeqCst, Ordering::SeqCst, f)
    }
}

/// The causes `WRITE_STALLS` and `COMMIT_STALLS` share, as one literal for both.
macro_rules! commit_stalls {
    () => {
        "its COMMIT waits for a synchronous standby that is not connected (`bank doctor` checks \
         for one), or the server is frozen or unreachable"
    };
}

/// Why a step that writes heard nothing for its deadline, after what the step itself may be.
/// A COMMIT waiting for a synchronous standby that is not connected waits for good, PostgreSQL
/// lifting its statement_timeout there; only `doctor` said so (an operator's server).
pub const WRITE_STALLS: &str = concat!("waits on a lock another session holds, ", commit_stalls!());

/// Why a transfer or a file's statement heard nothing for its deadline: not a lock, whose wait
/// the server's statement_timeout (bank's `--timeout`) ends first, with its own words.
pub const COMMIT_STALLS: &str = commit_stalls!();

/// Reads (`balances`, `verify`, `history`, `lookup`, `doctor`) have no ticket to abandon: they
/// commit nothing. One that hears nothing from the database for `timeout` (its output makes no
/// progress: see `tick`) ends the process, exit 1, with one line; the frozen server's kernel
/// would otherwise keep it waiting forever.
pub fn watch_reads(timeout: std::time::Duration) -> Result<(), crate::error::Error> {
    watch(timeout, || {
        let why =
            "the read is slower than that (a large ledger: raise --timeout), waits on a lock \
                   another session holds, or the server is frozen or unreachable";
        // Part of a listing printed: said as for a read the database fails part-way.
        match PRINTED.load(Ordering::Relaxed) {
            true => format!("{why}; what was printed is incomplete"),
            false => why.to_string(),
        }
    })
}

/// `watch_reads` for a command that writes in committed steps (`reset`): `then` says how far it
/// got, in the one line it exits with. `Err` when the watch's thread could not be started: the
/// command must not start without its deadline.
pub fn watch(
    timeout: std::time::Duration,
    then: impl Fn() -> String + Send + 'static,
) -> Result<(), crate::error::Error> {
    use std::time::{Duration, Instant};
    let started = *READS_STARTED.get_or_init(Instant::now);
    tick();
    let every = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
    crate::spawn(move || loop {
        let slept = Instant::now();
        std::thread::sleep(every);
        if STOPPED.load(Ordering::Relaxed) {
            return;
        }
        // A sleep that overran by far: this process was stopped (Ctrl-Z, SIGSTOP) and has just
        // been continued. The database's answer may have waited for it all along: the silence
        // is counted again from now (a read continued past its deadline ended with "no answer
        // from the database", a helper playing a new user).
        if stopped_during(slept, every).is_some() {
            tick();
            continue;
        }
        let last = Duration::from_millis(LAST_TICK.load(Ordering::Relaxed));
        // A write that blocks waits on the reader of the output (`| less`), not the database.
        if WRITING.load(Ordering::Relaxed) {
            continue;
        }
        if started.elapsed().saturating_sub(last) > timeout {
            crate::say_then_exit(
                format_args!(
                    "bank: error: no answer from the database within {}: {}",
                    humantime::format_duration(timeout),
                    then()
                ),
                i32::from(crate::exit_code::ExitCode::Failure),
            );
        }
    })
    .map(|_| ())
    .map_err(crate::error::Error::Thread)
}

/// Ends the watch: the steps it covered are done, and what follows has deadlines of its own (a
/// workload's transfers and final check).
pub fn stop_watch() {
    STOPPED.store(true, Ordering::Relaxed);
}

/// A thread that slept this much longer than it asked did not run meanwhile: its process was
/// stopped. Far beyond what a loaded machine's scheduler delays a thread by.
const STOPPED_AT_LEAST: std::time::Duration = std::time::Duration::from_secs(1);

/// How long this process did not run during a wait begun at `began` that was to last at most
/// `wait`, when it overran by more than `STOPPED_AT_LEAST`: the process was stopped (Ctrl-Z,
/// SIGSTOP) and continued. Every watch of a silent database counts that time out: the answer
/// may have waited for the process, not the other way round (a read, a transfer, a file and a
/// workload continued past their deadlines each said "no answer from the database", or gave up
/// on transfers that had committed; found by a helper playing a new user and a reviewer).
/// `Instant` is CLOCK_MONOTONIC, which runs on while a process is stopped (not while the
/// machine sleeps, when no deadline passes either).
pub fn stopped_during(
    began: std::time::Instant,
    wait: std::time::Duration,
) -> Option<std::time::Duration> {
    let overran = began.elapsed().saturating_sub(wait);
    (overran > STOPPED_AT_LEAST).then_some(overran)
}

static STOPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static READS_STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
/// Milliseconds from `READS_STARTED` to the read's last sign of life.
static LAST_TICK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A write of `Ticking` is under way: the watch waits for it (a slow reader of the output was
/// reported as a frozen database, and the output cut short; found by a reviewer).
static WRITING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Output of a command has been written (`Ticking`): a read given up on by its watch then
/// printed part of what it was to print (a streamed `balances` cut short by a link down said only
/// "no answer from the database"; found by a fault-injecting helper).
static PRINTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A sign of life from the database: output written from what it sent.
pub fn tick() {
    if let Some(started) = READS_STARTED.get() {
        let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        LAST_TICK.store(ms, Ordering::Relaxed);
    }
}

/// How far a command that creates rows in chunks, each committed on its own (`seed`, a
/// workload's setup), has got: for the line its watch ends it with, read on the watch's thread.
#[derive(Debug, Default)]
pub struct Created {
    /// Rows committed.
    done: std::sync::atomic::AtomicU64,
    /// Rows of the chunk whose COMMIT is under way: they may or may not exist if it goes
    /// unanswered.
    committing: std::sync::atomic::AtomicU64,
}

impl Created {
    /// A chunk of `n` rows is about to commit.
    pub fn committing(&self, n: u64) {
        self.committing.store(n, Ordering::SeqCst);
    }

    /// The chunk committed, `done` rows in all now: a sign of life (`tick`).
    pub fn committed(&self, done: u64) {
        self.done.store(done, Ordering::SeqCst);
        self.committing.store(0, Ordering::SeqCst);
        tick();
    }

    /// The chunk's COMMIT failed: how many rows it held.
    pub fn failed(&self) -> u64 {
        self.committing.swap(0, Ordering::SeqCst)
    }

    /// (committed, committing), read in the order opposite to the writes': a chunk that
    /// committed meanwhile is then at worst said uncertain, never left out.
    pub fn read(&self) -> (u64, u64) {
        let committing = self.committing.load(Ordering::SeqCst);
        (self.done.load(Ordering::SeqCst), committing)
    }
}

/// Output that counts as a sign of life (`tick`) each time it is written.
///
/// A standard output in non-blocking mode (O_NONBLOCK, which a parent such as Node.js may set on
/// the pipe or terminal it shares) refuses a write with EAGAIN while its reader is behind, where
/// a blocking one waits: that is a slow reader, not a failed output, so the write is tried again
/// once the reader has had a moment. Taken for a failure, a file stopped part-way with its
/// outcomes lost and exit 3, and a seed rolled back, for a reader that was merely slow (found by
/// a helper playing a new user).
pub struct Ticking<W>(pub W);

impl<W: std::io::Write> std::io::Write for Ticking<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = writing(|| again_while_it_would_block(|| self.0.write(buf)));
        if written.as_ref().is_ok_and(|n| *n > 0) {
            PRINTED.store(true, Ordering::Relaxed);
        }
        written
    }

    fn flush(&mut self) -> std::io::Result<()> {
        writing(|| again_while_it_would_block(|| self.0.flush()))
    }
}

/// Runs `step` (a read or a write) again while it says it would block (a non-blocking standard
/// output whose reader is behind, a non-blocking standard input whose writer has not written yet),
/// pausing between tries (from 1 ms, doubling up to 50 ms), as a blocking descriptor would wait;
/// any other result is returned as it is. A `Read` or `Write` call that fails has moved nothing
/// of its buffer, so trying it again reads or writes nothing twice.
pub(crate) fn again_while_it_would_block<T>(
    mut step: impl FnMut() -> std::io::Result<T>,
) -> std::io::Result<T> {
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        match step() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(50));
            }
            done => return done,
        }
    }
}

/// Runs `step` with the watch paused: a step with a deadline of its own (a transfer, whose
/// runner gives up by itself and says how), which the watch would cut short without a verdict.
pub fn untimed<T>(step: impl FnOnce() -> T) -> T {
    writing(step)
}

/// Runs a write with the watch paused, and counts its end as a sign of life: the database's
/// time starts again only once the output took what it had sent.
fn writing<T>(write: impl FnOnce() -> T) -> T {
    tick();
    WRITING.store(true, Ordering::Relaxed);
    let result = write();
    // Before the watch resumes: a poll between the two saw the old sign of life.
    tick();
    WRITING.store(false, Ordering::Relaxed);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn giving_up_before_any_commit_means_not_applied_and_blocks_the_commit() {
        let t = Ticket::new();
        assert!(t.begin());
        assert_eq!(t.abandon(), Some(GaveUp::NotApplied));
        assert!(!t.enter_commit(), "no COMMIT after the caller gave up");
        assert!(!t.finish());
        assert!(!t.begin());
    }

    #[test]
    fn giving_up_during_a_commit_means_unknown() {
        let t = Ticket::new();
        assert!(t.begin());
        assert!(t.enter_commit());
        assert_eq!(t.abandon(), Some(GaveUp::Unknown));
    }

    #[test]
    fn a_rolled_back_commit_leaves_nothing_applied_but_an_ambiguous_one_stays_unknown() {
        let t = Ticket::new();
        assert!(t.begin());
        assert!(t.enter_commit());
        t.leave_commit(false);
        assert_eq!(t.clone().abandon(), Some(GaveUp::NotApplied));

        let t = Ticket::new();
        assert!(t.begin());
        assert!(t.enter_commit());
        t.leave_commit(true);
        assert!(t.enter_commit());
        t.leave_commit(false);
        assert_eq!(t.abandon(), Some(GaveUp::Unknown));
    }

    #[test]
    fn a_finished_transfer_cannot_be_abandoned() {
        let t = Ticket::new();
        assert!(t.begin());
        assert!(t.finish());
        assert!(!t.is_running());
        assert_eq!(t.abandon(), None);
        assert!(t.begin(), "the next transfer starts afresh");
        assert!(t.is_running());
    }

    /// An ambiguous commit belongs to its transfer: the next transfer on the same ticket, given
    /// up on before its own COMMIT, applied nothing.
    #[test]
    fn the_next_transfer_does_not_inherit_an_ambiguous_commit() {
        let t = Ticket::new();
        assert!(t.begin());
        assert!(t.enter_commit());
        t.leave_commit(true);
        assert!(t.finish());
        assert!(t.begin());
        assert_eq!(t.abandon(), Some(GaveUp::NotApplied));
    }
}
