//! `--histogram FILE`: each display interval's latency histogram in HdrHistogram's interval-log
//! format, written by the `hdrhistogram` crate's writer, so HdrHistogram's plotters read it.
//! Values are microseconds; the log's max column is in milliseconds.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder;
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::Histogram;

/// One interval: its start (since the run began), its length, its histogram.
type Interval = (Duration, Duration, Histogram<u64>);

/// The log, written on a thread of its own (the crate's writer borrows its file).
pub(super) struct HistogramLog {
    tx: Sender<Interval>,
}

/// Waits for the log to be complete.
pub(super) struct Written(JoinHandle<io::Result<()>>);

impl HistogramLog {
    /// Starts the log in `file`, whose times count from `started`.
    /// `Err`: the system would not start its thread.
    pub(super) fn start(file: File, started: SystemTime) -> io::Result<(HistogramLog, Written)> {
        let (tx, rx) = mpsc::channel::<Interval>();
        let handle = crate::spawn(move || -> io::Result<()> {
            let mut out = BufWriter::new(file);
            let mut serializer = V2DeflateSerializer::new();
            let mut log = IntervalLogWriterBuilder::new()
                .add_comment("bank workload: transfer latency, microseconds")
                .with_start_time(started)
                .with_base_time(started)
                .with_max_value_divisor(1000.0)
                .begin_log_with(&mut out, &mut serializer)?;
            for (start, length, histogram) in rx {
                log.write_histogram(&histogram, start, length, None)
                    .map_err(|e| io::Error::other(format!("{e:?}")))?;
            }
            drop(log);
            out.flush()
        })?;
        Ok((HistogramLog { tx }, Written(handle)))
    }

    pub(super) fn send(&self, start: Duration, length: Duration, histogram: Histogram<u64>) {
        // The writer stops only on an error, which `Written::wait` reports.
        let _ = self.tx.send((start, length, histogram));
    }
}

impl Written {
    /// Once every `HistogramLog` is gone: the file's final state.
    pub(super) fn wait(self) -> io::Result<()> {
        self.0
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the histogram writer panicked")))
    }
}
