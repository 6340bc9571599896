//! Chunks of a file on several connections, results in file order.
//!
//! Chunks are taken in file order. A chunk starts on a free connection only when it shares no
//! account and no transfer id with any chunk still in flight: its outcomes then cannot depend on
//! how those chunks end, so the one-by-one order holds. Otherwise it waits for them (the file is
//! never reordered). Results are written in file order as chunks finish.
//!
//! A frozen server is watched for: a statement that outlives its deadline (plus `GRACE`) is given
//! up, its lines reported `unknown` when its COMMIT may have been sent and `not_applied` when not
//! (see `guard`). After any line ends `unknown` or `not_applied`, no new chunk starts (later lines
//! may depend on it): the rest of the file is reported `not_applied`, and a rerun of the same
//! file settles everything.

use std::collections::{BTreeMap, HashSet};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::chunk::{ChunkRunner, Fatal, Watch};
use super::input::Line;
use super::{Outcome, Verdict};
use crate::db::{DbUrl, Session};
use crate::guard::GaveUp;
use crate::retry::{RetryCounts, RetryPolicy};
use crate::transfer::GRACE;

/// How a file is applied.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Lines per chunk (per statement when none is refused).
    pub batch: usize,
    /// Connections applying chunks at once.
    pub connections: usize,
    pub policy: RetryPolicy,
}

/// Counts per outcome, retries, elapsed time.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub counts: BTreeMap<Outcome, u64>,
    pub retries: RetryCounts,
    pub elapsed: Duration,
}

impl Summary {
    pub fn count(&self, o: Outcome) -> u64 {
        self.counts.get(&o).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }
}

struct Job {
    seq: u64,
    lines: Vec<Line>,
}

struct Done {
    worker: usize,
    seq: u64,
    result: Result<Vec<Verdict>, Fatal>,
    retries: RetryCounts,
}

struct Worker {
    jobs: mpsc::Sender<Job>,
    watch: Watch,
    /// Given up on (frozen): never sent another chunk.
    lost: bool,
}

struct InFlight {
    seq: u64,
    worker: usize,
    lines: Vec<Line>,
    keys: HashSet<Uuid>,
}

/// Every account and id a chunk touches.
fn keys(lines: &[Line]) -> HashSet<Uuid> {
    lines
        .iter()
        .flat_map(|l| [l.transfer.id, l.transfer.from_id, l.transfer.to_id])
        .collect()
}

/// Applies `lines` in chunks and calls `emit` for each line, in file order. `Err` only when
/// nothing more can be said (the schema is missing, the database refuses the connection).
pub fn apply<E>(
    url: &DbUrl,
    options: Options,
    lines: impl Iterator<Item = Line>,
    mut emit: impl FnMut(&Line, &Verdict) -> Result<(), E>,
) -> Result<Summary, E>
where
    E: From<Fatal>,
{
    let started = Instant::now();
    let (done_tx, done_rx) = mpsc::channel::<Done>();
    let mut workers: Vec<Worker> = (0..options.connections.max(1))
        .map(|n| spawn(url, options.policy, n, done_tx.clone()))
        .collect();
    drop(done_tx);

    let batch = options.batch.max(1);
    let wait = options.policy.timeout + GRACE;
    let mut lines = lines.peekable();
    let mut summary = Summary::default();
    let mut next_seq = 0u64;
    let mut next_emit = 0u64;
    let mut pending: Option<(Vec<Line>, HashSet<Uuid>)> = None;
    let mut in_flight: Vec<InFlight> = Vec::new();
    let mut finished: BTreeMap<u64, (Vec<Line>, Vec<Verdict>)> = BTreeMap::new();
    let mut idle: Vec<usize> = (0..workers.len()).rev().collect();
    let mut stopping: Option<String> = None;
    let mut record = |summary: &mut Summary, l: &Line, v: &Verdict| {
        *summary.counts.entry(v.outcome).or_default() += 1;
        emit(l, v)
    };

    loop {
        // Start every chunk that may start.
        while stopping.is_none() && !idle.is_empty() {
            if pending.is_none() {
                let chunk: Vec<Line> = lines.by_ref().take(batch).collect();
                if chunk.is_empty() {
                    break;
                }
                let k = keys(&chunk);
                pending = Some((chunk, k));
            }
            let Some((_, k)) = &pending else { break };
            if in_flight.iter().any(|f| !f.keys.is_disjoint(k)) {
                break;
            }
            let Some((chunk, k)) = pending.take() else {
                break;
            };
            let Some(worker) = idle.pop() else { break };
            let seq = next_seq;
            next_seq += 1;
            workers[worker].watch.start();
            if workers[worker]
                .jobs
                .send(Job {
                    seq,
                    lines: chunk.clone(),
                })
                .is_err()
            {
                // The worker's thread is gone (it cannot be, short of a panic): report the chunk.
                finished.insert(seq, (chunk, Vec::new()));
                stopping = Some("a worker thread ended".into());
                continue;
            }
            in_flight.push(InFlight {
                seq,
                worker,
                lines: chunk,
                keys: k,
            });
        }
        if in_flight.is_empty() {
            // Stopping, or the file is done: what is left was never attempted.
            let reason = stopping.clone();
            emit_ready(&mut finished, &mut next_emit, &mut summary, &mut record)?;
            let Some(reason) = reason else {
                if pending.is_none() && lines.peek().is_none() {
                    break;
                }
                continue;
            };
            let never = Verdict {
                outcome: Outcome::NotApplied,
                error: Some(format!("not attempted: {reason}")),
            };
            for l in pending.take().map(|(c, _)| c).into_iter().flatten() {
                record(&mut summary, &l, &never)?;
            }
            for l in lines.by_ref() {
                record(&mut summary, &l, &never)?;
            }
            break;
        }
        match done_rx.recv_timeout(Duration::from_millis(20)) {
            Ok(done) => {
                let Some(at) = in_flight.iter().position(|f| f.seq == done.seq) else {
                    // A chunk given up on earlier, finishing late: already reported.
                    continue;
                };
                let f = in_flight.swap_remove(at);
                summary.retries += done.retries;
                idle.push(done.worker);
                let verdicts = match done.result {
                    Ok(v) => v,
                    Err(fatal) => {
                        emit_ready(&mut finished, &mut next_emit, &mut summary, &mut record)?;
                        return Err(E::from(fatal));
                    }
                };
                if let Some(v) = verdicts.iter().find(|v| v.outcome.is_unsettled()) {
                    stopping.get_or_insert_with(|| {
                        format!(
                            "an earlier chunk could not be settled ({})",
                            v.error.as_deref().unwrap_or("no reason given")
                        )
                    });
                }
                finished.insert(f.seq, (f.lines, verdicts));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                stopping.get_or_insert_with(|| "the workers ended".into());
            }
        }
        // A statement past its deadline: the server is frozen or unreachable.
        let mut i = 0;
        while i < in_flight.len() {
            let w = &workers[in_flight[i].worker];
            if w.watch.since().elapsed() < wait {
                i += 1;
                continue;
            }
            let Some(how) = w.watch.ticket.abandon() else {
                i += 1;
                continue;
            };
            let f = in_flight.swap_remove(i);
            workers[f.worker].lost = true;
            let mut verdicts = workers[f.worker].watch.decided();
            let (outcome, what) = match how {
                GaveUp::NotApplied => (Outcome::NotApplied, "before its COMMIT was sent"),
                GaveUp::Unknown => (Outcome::Unknown, "after its COMMIT was sent"),
            };
            let error = format!(
                "no answer from the database within {:.1}s, {what}",
                wait.as_secs_f64()
            );
            let n = f.lines.len().saturating_sub(verdicts.len());
            verdicts.extend((0..n).map(|_| Verdict {
                outcome,
                error: Some(error.clone()),
            }));
            stopping.get_or_insert(error);
            finished.insert(f.seq, (f.lines, verdicts));
        }
        emit_ready(&mut finished, &mut next_emit, &mut summary, &mut record)?;
    }
    // Idle workers end when their job channel closes; lost ones are left to the OS.
    drop(workers.drain(..).filter(|w| !w.lost).collect::<Vec<_>>());
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// Writes the finished chunks that are next in file order.
fn emit_ready<E>(
    finished: &mut BTreeMap<u64, (Vec<Line>, Vec<Verdict>)>,
    next_emit: &mut u64,
    summary: &mut Summary,
    record: &mut impl FnMut(&mut Summary, &Line, &Verdict) -> Result<(), E>,
) -> Result<(), E> {
    while let Some((lines, verdicts)) = finished.remove(next_emit) {
        let missing = Verdict {
            outcome: Outcome::NotApplied,
            error: Some("not attempted: an earlier chunk could not be settled".into()),
        };
        for (i, l) in lines.iter().enumerate() {
            record(summary, l, verdicts.get(i).unwrap_or(&missing))?;
        }
        *next_emit += 1;
    }
    Ok(())
}

fn spawn(url: &DbUrl, policy: RetryPolicy, n: usize, done: mpsc::Sender<Done>) -> Worker {
    let (jobs, rx) = mpsc::channel::<Job>();
    let session = Session::new(url.clone(), "bank").with_timeout(policy.timeout);
    let mut runner = ChunkRunner::new(session, policy);
    let watch = runner.watch.clone();
    thread::spawn(move || {
        for job in rx {
            let result = runner.apply(&job.lines);
            let retries = std::mem::take(&mut runner.retries);
            let stop = result.is_err();
            if done
                .send(Done {
                    worker: n,
                    seq: job.seq,
                    result,
                    retries,
                })
                .is_err()
                || stop
            {
                break;
            }
        }
    });
    Worker {
        jobs,
        watch,
        lost: false,
    }
}
