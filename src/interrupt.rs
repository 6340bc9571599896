//! Ctrl-C (SIGINT) and SIGTERM for the long runs, `workload` and `transfer --file`: the first one
//! stops the run gracefully (nothing new starts, what is in flight finishes and is reported), a
//! second one exits at once.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether a first Ctrl-C or SIGTERM has come.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
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
