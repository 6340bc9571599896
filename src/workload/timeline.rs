//! The run second by second, for `--report`: what the workers did in each second (sampled by
//! the watchdog as each second ends) and what the readers and the watchdog marked as it
//! happened (the readers' totals, the seconds of lost connections or an unanswering server).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::worker::{Live, Marks};
use crate::retry::RetryCounts;

/// One second of the run (the last one may be shorter).
#[derive(Debug, Clone)]
pub(super) struct Second {
    /// How long the sample covers, in seconds (about 1).
    pub(super) length: f64,
    pub(super) committed: u64,
    /// Latency of the transfers committed in it; `None` when none was.
    pub(super) p50_ms: Option<f64>,
    pub(super) p99_ms: Option<f64>,
    pub(super) retries: RetryCounts,
}

impl Second {
    pub(super) fn rate(&self) -> f64 {
        self.committed as f64 / self.length.max(1e-3)
    }
}

/// Takes one `Second` at each whole second of the run, so that second `s` of the samples is
/// second `s` of the marks.
pub(super) struct Sampler {
    started: Instant,
    at: Instant,
    committed: u64,
    retries: RetryCounts,
    seconds: Vec<Second>,
}

/// A last sample shorter than this joins the second before it: a rate over a few
/// milliseconds says little.
const SHORTEST: Duration = Duration::from_millis(250);

impl Sampler {
    pub(super) fn new(started: Instant) -> Sampler {
        Sampler {
            started,
            at: started,
            committed: 0,
            retries: RetryCounts::default(),
            seconds: Vec::new(),
        }
    }

    /// Samples once the next whole second of the run has passed.
    pub(super) fn tick(&mut self, live: &Live) {
        let next = Duration::from_secs(self.seconds.len() as u64 + 1);
        if self.started.elapsed() >= next {
            let second = self.sample(live);
            self.seconds.push(second);
        }
    }

    /// The last, partial second, and all of them.
    pub(super) fn finish(mut self, live: &Live) -> Vec<Second> {
        let short = self.at.elapsed() < SHORTEST;
        let last = self.sample(live);
        match self.seconds.last_mut() {
            Some(previous) if short => {
                previous.length += last.length;
                previous.committed += last.committed;
                previous.retries += last.retries;
            }
            _ => self.seconds.push(last),
        }
        self.seconds
    }

    fn sample(&mut self, live: &Live) -> Second {
        let now = Instant::now();
        let committed = live.committed.load(Ordering::Relaxed);
        let retries = live.retries.snapshot();
        let h = live.take_second().filter(|h| !h.is_empty());
        let ms = |q: f64| h.as_ref().map(|h| h.value_at_quantile(q) as f64 / 1000.0);
        let second = Second {
            length: now.duration_since(self.at).as_secs_f64(),
            committed: committed.saturating_sub(self.committed),
            p50_ms: ms(0.50),
            p99_ms: ms(0.99),
            retries: retries.since(&self.retries),
        };
        self.at = now;
        self.committed = committed;
        self.retries = retries;
        second
    }
}

/// The whole run, second by second.
#[derive(Debug, Clone)]
pub struct Timeline {
    pub(super) seconds: Vec<Second>,
    /// Per second: a connection was lost (a retry for a lost connection or an ambiguous
    /// commit, a failed read or connect of a reader) or the server did not answer (the probe's
    /// question went unanswered, or the watchdog gave up on a transfer in that second).
    pub(super) faults: Vec<bool>,
    /// Per second: the lowest and highest total the readers' snapshots saw.
    pub(super) totals: Vec<Option<(i128, i128)>>,
    pub(super) readers: u64,
    pub(super) starting_total: i128,
}

impl Timeline {
    pub(super) fn new(
        seconds: Vec<Second>,
        marks: Marks,
        readers: u64,
        starting_total: i128,
    ) -> Timeline {
        let n = seconds
            .len()
            .max(marks.faults.len())
            .max(marks.totals.len());
        let mut faults = marks.faults;
        faults.resize(n, false);
        for (s, second) in seconds.iter().enumerate() {
            let r = &second.retries;
            if r.connection_lost + r.ambiguous > 0 {
                faults[s] = true;
            }
        }
        let mut totals = marks.totals;
        totals.resize(n, None);
        Timeline {
            seconds,
            faults,
            totals,
            readers,
            starting_total,
        }
    }

    /// How many seconds the charts span.
    pub(super) fn len(&self) -> usize {
        self.faults.len().max(1)
    }

    /// The fault seconds as ranges of whole seconds, `(first, last)`.
    pub(super) fn fault_ranges(&self) -> Vec<(usize, usize)> {
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        for (s, _) in self.faults.iter().enumerate().filter(|(_, f)| **f) {
            match ranges.last_mut() {
                Some((_, last)) if *last + 1 == s => *last = s,
                _ => ranges.push((s, s)),
            }
        }
        ranges
    }
}
