//! `bank`: bank accounts in CockroachDB or PostgreSQL with Diesel, transfers applied exactly once
//! under contention and failure, and a workload that proves it.
//!
//! Data flows down, and each layer is found by its file name:
//! - `cli` (clap types only) and `commands/` (one file per job: reads its input, calls the layers
//!   below, prints; `batch.rs` also keeps the file's copy, and `mod.rs` the `init` checks);
//! - `batch/`: `transfer --file` (`input/` reads lines: `csv.rs`, `jsonl.rs`, and the
//!   `fingerprint.rs` that tells a file changed between two reads; `statement.rs` is the chunk statement,
//!   `chunk.rs` runs one chunk exactly once, `pipeline.rs` spreads chunks over connections);
//! - `transfer/`: `statement.rs` (the one statement that moves money) and `runner.rs` (exactly
//!   once: attempts, the ledger's last word, the deadline), with `guard` (giving up on a
//!   transfer stuck on a frozen server);
//! - `workload/`: the run (workers, watchdog, final check) and `report.rs`;
//! - `retry` (the error classifier and the one retry loop), `verify` (invariants), `repo`
//!   (queries), `schema` (generated) and `models` (rows);
//! - `db/`: `url.rs` (parsing, redaction) and `session.rs` (connections and their settings);
//! - `error` (typed errors) and `exit_code`;
//! - `text`: how every message is shown (escaped for a terminal, on one line, counted).

pub mod batch;
pub mod cli;
pub mod commands;
pub mod db;
pub mod error;
pub mod exit_code;
pub mod guard;
pub mod interrupt;
pub mod models;
pub mod repo;
pub mod retry;
pub mod schema;
pub mod text;
pub mod transfer;
pub mod verify;
pub mod workload;

pub use commands::run;
pub use text::{counted, for_terminal, of_total, one_line, say, was_or_were};

/// `std::thread::spawn`, but a thread the system will not start (a container's or systemd's
/// pids limit, `ulimit -u`, no memory for its stack) is an error to report, where
/// `std::thread::spawn` panicked: exit 101 and a backtrace, and a `transfer --file` that had
/// applied its first group when it could not start its second connection's thread never
/// reported those lines (found by a helper playing a new user: 3,437 lines applied, none
/// reported).
pub fn spawn<F, T>(f: F) -> std::io::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    std::thread::Builder::new().spawn(f)
}

/// How long the one line a signal's handler or a read's watch ends the run with is given.
const LAST_LINE_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Says `args` (one line on stderr, `say`), then ends the process with `code` (`exit_now`), the
/// line given `LAST_LINE_WITHIN` at most: standard error full with nobody reading it (`2>&1` into
/// a pipe whose reader stopped reading) held the line, and so the exit, for as long as it was not
/// read, SIGTERM and Ctrl-C included (found by a reviewer).
pub fn say_then_exit(args: std::fmt::Arguments<'_>, code: i32) -> ! {
    let line = args.to_string();
    let (said, heard) = std::sync::mpsc::channel();
    let saying = spawn(move || {
        say(format_args!("{line}"));
        let _ = said.send(());
    });
    if saying.is_ok() {
        let _ = heard.recv_timeout(LAST_LINE_WITHIN);
    }
    exit_now(code)
}

/// Ends the process at once with `code`, from any thread, once the one line that says why has been
/// written. `std::process::exit` runs the C library's exit handlers, among them OpenSSL's (loaded
/// by libpq), which freed what another thread still inside a connection attempt was using:
/// `balances --timeout 2ms` died of SIGSEGV in 6 runs of 60, after its line (found by a helper
/// playing a new user). `_exit` runs none. Output is not flushed: what the stuck thread was
/// writing is cut short either way, and flushing it would wait on that thread's lock. The kernel
/// closes the connections, as for kill -9, and the server rolls back what they had open.
#[allow(unsafe_code)]
pub fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` takes no pointer and never returns; it is async-signal-safe, so it is sound
    // from any thread at any moment.
    unsafe { libc::_exit(code) }
}
