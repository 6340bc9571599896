//! `bank`: bank accounts in CockroachDB or PostgreSQL with Diesel, transfers applied exactly once
//! under contention and failure, and a workload that proves it.
//!
//! Data flows down, and each layer is found by its file name:
//! - `cli` (clap types only) and `commands/` (one file per job: reads its input, calls the layers
//!   below, prints; `batch.rs` also keeps the file's copy, and `mod.rs` the `init` checks);
//! - `batch/`: `transfer --file` (`input.rs` reads lines, `statement.rs` is the chunk statement,
//!   `chunk.rs` runs one chunk exactly once, `pipeline.rs` spreads chunks over connections);
//! - `transfer/`: `statement.rs` (the one statement that moves money) and `runner.rs` (exactly
//!   once: attempts, the ledger's last word, the deadline), with `guard` (giving up on a
//!   transfer stuck on a frozen server);
//! - `workload/`: the run (workers, watchdog, final check) and `report.rs`;
//! - `retry` (the error classifier and the one retry loop), `verify` (invariants), `repo`
//!   (queries), `schema` (generated) and `models` (rows);
//! - `db/`: `url.rs` (parsing, redaction) and `session.rs` (connections and their settings);
//! - `error` (typed errors) and `exit_code`.

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
pub mod transfer;
pub mod verify;
pub mod workload;

pub use commands::run;

/// A line on stderr that cannot fail the process: `eprintln!` panics when stderr cannot be
/// written (a full disk, a closed pipe), which turned every exit code into 101.
/// Passwords are hidden here once more, whatever the line quotes: a URL typed where another value
/// goes reached stderr whole from messages that did not expect one.
pub fn say(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let line = for_terminal(&args.to_string());
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// `text` as every stderr line shows it, log lines included, and as text results on stdout show
/// the server's words (a file's lines, the workload's report, `doctor`): passwords hidden, and
/// control and invisible characters escaped line by line. The server's own words (a trigger's
/// exception, a database name from the URL) may hold an escape sequence that recolours the
/// terminal, or a right-to-left override that reorders the rest of the line.
pub fn for_terminal(text: &str) -> String {
    db::redact_message(text)
        .split('\n')
        .map(batch::input::escaped)
        .collect::<Vec<_>>()
        .join("\n")
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

/// "1 transfer", "2 transfers": a count with its noun, for messages a person reads.
pub fn counted(n: impl Into<u64>, noun: &str) -> String {
    match n.into() {
        1 => format!("1 {noun}"),
        n => format!("{n} {noun}s"),
    }
}

/// "1 of 1 transfer", "3 of 5 transfers": a part of a whole, the noun agreeing with the whole.
pub fn of_total(part: u64, total: u64, noun: &str) -> String {
    format!("{part} of {}", counted(total, noun))
}

/// The verb after `of_total`, agreeing with the part: "1 of 5 transfers was", "3 of 5 … were".
pub fn was_or_were(part: u64) -> &'static str {
    if part == 1 {
        "was"
    } else {
        "were"
    }
}

/// Text on one line, as every output shows a message (stderr, `--json`, a file's results):
/// libpq's messages span several ("... failed: Connection refused\n\tIs the server
/// running ...?"), and became one run-on sentence; its lines are joined with "; ", and a line
/// that starts with punctuation (", so the seed stopped") is joined without a space.
pub fn one_line(text: &str) -> String {
    let mut out = String::new();
    for l in text.lines() {
        let l = l.split_whitespace().collect::<Vec<_>>().join(" ");
        if l.is_empty() {
            continue;
        }
        if !out.is_empty() {
            let glued = l.starts_with([',', ';', ':', '.', ')']);
            let sep = match (glued, out.ends_with([':', ';', ',', '('])) {
                (true, _) => "",
                (false, true) => " ",
                (false, false) => "; ",
            };
            out.push_str(sep);
        }
        out.push_str(&l);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::one_line;

    /// libpq's two-line refusal read as a run-on sentence ("Connection refused Is the server
    /// running ..."), and a reason ending in a line break left "server , so the seed stopped"
    /// (found by a reviewer).
    #[test]
    fn lines_are_joined_as_sentences() {
        assert_eq!(
            one_line("port 1 failed: Connection refused\n\tIs the server running?\n"),
            "port 1 failed: Connection refused; Is the server running?"
        );
        assert_eq!(
            one_line("no connection to the server\n, so the seed stopped"),
            "no connection to the server, so the seed stopped"
        );
        assert_eq!(one_line("a:\n  b   c"), "a: b c");
    }
}
