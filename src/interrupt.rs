//! Ctrl-C (SIGINT) and SIGTERM for `transfer`, `seed`, `workload`, `transfer --file`, `reset` and
//! `demo` (which stop between their steps, the demo removing what it created): the
//! first one stops the run gracefully (nothing new starts, what is in flight finishes and is
//! reported; one `transfer` stops waiting, as at its deadline, and says what it knows), a second
//! one exits at once (130). `transfer --file` stops the same way when its results cannot be
//! written. The commands that only read end at the first signal, with one line
//! (`while_reading`).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static OUTPUT_FAILED: AtomicBool = AtomicBool::new(false);
/// Set while a file is opened and checked (`before_sending`): nothing has been sent yet.
static NOTHING_SENT: AtomicBool = AtomicBool::new(false);

/// Given by the binary when SIGHUP was ignored as bank started (`nohup bank …`, or a parent's
/// `trap '' HUP`): what sets it back to ignored once the handler is installed. The handler
/// catches SIGINT, SIGTERM and SIGHUP together, so a run under `nohup` stopped when the terminal
/// closed, the very thing nohup is for: a file left its lines `unknown` (exit 3), a workload ended
/// early (found by a helper playing a new user). Programs leave a signal ignored at their start
/// ignored, as shells do.
static KEEP_HANGUP_IGNORED: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// SIGHUP was ignored when bank started: `ignore_again` ignores it again after each handler is
/// installed (see `KEEP_HANGUP_IGNORED`).
pub fn keep_hangup_ignored(ignore_again: fn()) {
    let _ = KEEP_HANGUP_IGNORED.set(ignore_again);
}

/// After a handler is installed: SIGHUP back to ignored if it was ignored at the start.
fn installed() {
    if let Some(ignore_again) = KEEP_HANGUP_IGNORED.get() {
        ignore_again();
    }
}

/// Runs `f` (opening and checking a file) with the first signal ending the run at once, with
/// one line and exit 3: nothing was sent, and the handler cannot interrupt a read blocked on a
/// pipe whose writer is silent (a first SIGTERM from `timeout` was left waiting for the
/// writer; found by a reviewer).
pub fn before_sending<T>(f: impl FnOnce() -> T) -> T {
    NOTHING_SENT.store(true, Ordering::SeqCst);
    let result = f();
    NOTHING_SENT.store(false, Ordering::SeqCst);
    result
}

/// Whether the run is to stop: a first Ctrl-C or SIGTERM has come, or its results could not be
/// written.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst) || OUTPUT_FAILED.load(Ordering::SeqCst)
}

/// The run's results cannot be written: the reader of a pipe has gone (`bank transfer --file
/// f.csv | head -1`), or the disk is full. Going on would apply transfers whose outcome nobody is
/// told, so the run stops as for Ctrl-C.
pub fn output_failed() {
    OUTPUT_FAILED.store(true, Ordering::SeqCst);
}

/// Why the run stopped, for the lines it did not attempt.
pub fn reason() -> &'static str {
    if OUTPUT_FAILED.load(Ordering::SeqCst) {
        "the results could not be written"
    } else {
        "interrupted (Ctrl-C, SIGTERM or SIGHUP)"
    }
}

/// For the commands that only read (`balances`, `history`, `lookup`, `verify`, `doctor`): the
/// first signal ends the run with one line and exit 130. They were killed by it with no word,
/// where every other command says what it did (found by a helper playing a new user).
pub fn while_reading() {
    let installed = ctrlc::set_handler(|| {
        crate::say_then_exit(
            format_args!(
                "bank: error: interrupted (Ctrl-C, SIGTERM or SIGHUP): nothing was changed; what \
                 was printed is incomplete"
            ),
            130,
        );
    });
    match installed {
        Ok(()) => self::installed(),
        Err(e) => log::debug!("no Ctrl-C handler ({e})"),
    }
}

/// For `init`, whose migrations each commit on their own and whose "applied migration" lines
/// are written at its end: the first signal ends the run with one line saying that what it
/// applied stays, exit 1 (as its `--timeout` does). It was killed by the signal's default
/// action with no word (found by a helper playing a new user). A migration under way rolls back
/// with the connection, unless its COMMIT was already on its way; either way the next `init`
/// runs what is missing.
pub fn while_migrating() {
    let installed = ctrlc::set_handler(|| {
        crate::say_then_exit(
            format_args!(
                "bank: error: interrupted (Ctrl-C, SIGTERM or SIGHUP): init stopped; the \
                 migrations it applied stay (each commits on its own): run `bank init` again to \
                 apply the rest"
            ),
            i32::from(crate::exit_code::ExitCode::Failure),
        );
    });
    match installed {
        Ok(()) => self::installed(),
        Err(e) => log::debug!("no Ctrl-C handler ({e})"),
    }
}

/// Installs the handler; without it (it cannot be installed twice) the signals keep their
/// default action.
pub fn catch() {
    let installed = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            crate::exit_now(130);
        }
        if NOTHING_SENT.load(Ordering::SeqCst) {
            let e = crate::error::Error::FileCheckInterrupted(reason().to_string());
            crate::say_then_exit(
                format_args!("bank: error: {e}"),
                i32::from(crate::exit_code::ExitCode::OutcomeUnknown),
            );
        }
        // Someone at a terminal pressed Ctrl-C and sees nothing happen while what is in flight
        // finishes (on a frozen server, up to its deadline): the run seemed stuck. Said on a
        // terminal only: a script reads the run's one closing line.
        if std::io::stderr().is_terminal() {
            crate::say(format_args!(
                "bank: stopping: nothing new starts (a second Ctrl-C quits at once, leaving what \
                 is in flight unknown)"
            ));
        }
    });
    match installed {
        Ok(()) => self::installed(),
        Err(e) => log::debug!("no Ctrl-C handler ({e})"),
    }
}
