//! Ctrl-C (SIGINT) and SIGTERM for the long runs, `workload` and `transfer --file`: the first one
//! stops the run gracefully (nothing new starts, what is in flight finishes and is reported), a
//! second one exits at once. `transfer --file` stops the same way when its output is closed.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static OUTPUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Whether the run is to stop: a first Ctrl-C or SIGTERM has come, or its output was closed.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst) || OUTPUT_CLOSED.load(Ordering::SeqCst)
}

/// The reader of the run's results has gone (`bank transfer --file f.csv | head -1`). Going on
/// would apply transfers whose outcome nobody is told, so the run stops as for Ctrl-C.
pub fn output_closed() {
    OUTPUT_CLOSED.store(true, Ordering::SeqCst);
}

/// Why the run stopped, for the lines it did not attempt.
pub fn reason() -> &'static str {
    if OUTPUT_CLOSED.load(Ordering::SeqCst) {
        "the output was closed"
    } else {
        "interrupted (Ctrl-C or SIGTERM)"
    }
}

/// Installs the handler; without it (it cannot be installed twice) the signals keep their
/// default action.
pub fn catch() {
    let installed = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
    if let Err(e) = installed {
        log::debug!("no Ctrl-C handler ({e})");
    }
}
