//! Transfers in batches: a file of transfers (`input`) applied a chunk per statement
//! (`statement`, `chunk`), several chunks at once where no outcome can depend on the order
//! (`pipeline`), with every line's outcome exactly what applying the lines one at a time, in file
//! order, with `bank transfer --id` would give.

mod chunk;
pub mod input;
mod pipeline;
mod statement;

pub use chunk::{ChunkRunner, Fatal, Watch};
pub use input::{Format, Line, Malformed};
pub use pipeline::{apply, Connections, Options, Summary};
pub use statement::Chunk;

use serde::Serialize;

/// The isolation level of a batch's transactions (`--batch-isolation`).
///
/// On PostgreSQL, READ COMMITTED whatever the server's default: a chunk locks every account it
/// reads, in one global order, before it decides anything, and claims are ordered by those
/// locks, so its verdicts are those of one-by-one application at any level (the property tests
/// run it over SERIALIZABLE and READ COMMITTED databases). At SERIALIZABLE, PostgreSQL's
/// predicate locks over a chunk's 2,000 accounts become one lock on the whole table (past
/// `max_pred_locks_per_transaction`), so any two chunks in flight abort each other, and a file
/// could use one connection only. READ COMMITTED also sees, once the accounts are held, a claim
/// that a rerun made while the chunk waited for them (at REPEATABLE READ it did not, and a
/// rerun's "not applied" was overturned; `answered_since`). On CockroachDB, whose serializable
/// conflicts are per row, and whose READ COMMITTED is a cluster setting, the server's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Isolation {
    /// READ COMMITTED on PostgreSQL; the server's default on CockroachDB
    #[default]
    ReadCommitted,
    /// The server's default level (SERIALIZABLE where that is REPEATABLE READ)
    // For a database where other applications write bank's tables at SERIALIZABLE without
    // locking what they read: PostgreSQL's serializable guarantee holds only among serializable
    // transactions.
    ServerDefault,
}

/// Lines per statement when `--batch` is not given: throughput grows little past it on
/// PostgreSQL, and a statement stays far inside CockroachDB's limits (README, BENCHMARKS.md).
pub const DEFAULT_BATCH: u64 = 1000;

/// What became of one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// This run applied it.
    Applied,
    /// The ledger held it already, with the same details: applied by an earlier run or line.
    AlreadyApplied,
    InsufficientFunds,
    UnknownAccount,
    /// The ledger holds this id with other details.
    IdConflict,
    /// The credited balance would leave INT8's range.
    BalanceOverflow,
    /// Not applied, and never will be by this run: rolled back, or never attempted because an
    /// earlier chunk could not be settled.
    NotApplied,
    /// It may or may not have been applied: a rerun of the file settles it (exit 3).
    Unknown,
    /// The database refused it with an error of its own (a DBA's trigger, a CHECK that is not
    /// bank's), alone in its statement: not applied, as one transfer at a time would be.
    Refused,
}

impl Outcome {
    pub const ALL: [Outcome; 9] = [
        Outcome::Applied,
        Outcome::AlreadyApplied,
        Outcome::InsufficientFunds,
        Outcome::UnknownAccount,
        Outcome::IdConflict,
        Outcome::BalanceOverflow,
        Outcome::Refused,
        Outcome::NotApplied,
        Outcome::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::AlreadyApplied => "already_applied",
            Outcome::InsufficientFunds => "insufficient_funds",
            Outcome::UnknownAccount => "unknown_account",
            Outcome::IdConflict => "id_conflict",
            Outcome::BalanceOverflow => "balance_overflow",
            Outcome::NotApplied => "not_applied",
            Outcome::Unknown => "unknown",
            Outcome::Refused => "refused",
        }
    }

    /// The outcome a line gets for the failure one transfer at a time meets: the file's
    /// vocabulary, which `transfer --json` gives as its `"reason"` too. `Unknown` where the
    /// failure cannot say it was not applied.
    pub fn of_failure(e: &crate::error::TransferError) -> Outcome {
        use crate::error::TransferError as E;
        match e {
            E::UnknownAccount(_) => Outcome::UnknownAccount,
            E::InsufficientFunds { .. } => Outcome::InsufficientFunds,
            E::IdConflict { .. } => Outcome::IdConflict,
            E::BalanceOverflow { .. } => Outcome::BalanceOverflow,
            E::Database(diesel::result::Error::DatabaseError(..))
            | E::NoLedgerRow
            | E::AccountNotUpdated(_) => Outcome::Refused,
            E::OutcomeUnknown { .. } | E::Abandoned => Outcome::Unknown,
            E::NonPositiveAmount(_)
            | E::SameAccount(_)
            | E::NotMigrated(_)
            | E::NotApplied { .. }
            | E::Connect(_)
            | E::Database(_) => Outcome::NotApplied,
        }
    }

    /// In the ledger, by this run or an earlier one.
    pub fn is_success(self) -> bool {
        matches!(self, Outcome::Applied | Outcome::AlreadyApplied)
    }

    /// A chunk that ends so could not be settled: later chunks may depend on it.
    pub fn is_unsettled(self) -> bool {
        matches!(self, Outcome::NotApplied | Outcome::Unknown)
    }

    /// What a chunk or statement that ended so did, as the lines after it say why they were not
    /// sent ("another chunk …"): a `not_applied` one was settled, rolled back (a full disk's
    /// "could not extend file" said it "could not be settled"); only an `unknown` one could not
    /// be. Either way the lines after it may depend on it, so they are not sent.
    pub fn held_up_because(self) -> &'static str {
        match self {
            Outcome::NotApplied => "was not applied",
            _ => "could not be settled",
        }
    }
}

/// One line's outcome, and why when it is not a success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: Outcome,
    pub error: Option<String>,
}

/// Why a line another run answered since this run's first attempt at it is `not_applied`.
pub(crate) use crate::transfer::ANSWERED_SINCE;

/// How the reason of a line this run never sent begins.
const NOT_ATTEMPTED: &str = "not attempted: ";

impl Verdict {
    /// A line this run never sent (Ctrl-C, a closed output, a group or server that could not go
    /// on): `unknown`, not `not_applied`. This run applied nothing of it, but a file's ids may
    /// have an earlier run's attempt still on its way to commit, which this run never met (it
    /// would have waited on that attempt's locks, and said unknown): a line reported
    /// `not_applied` after Ctrl-C was then applied by such an orphan (found by a reviewer). A
    /// rerun of the file settles it.
    pub fn not_attempted(why: impl std::fmt::Display) -> Verdict {
        Verdict {
            outcome: Outcome::Unknown,
            error: Some(format!("{NOT_ATTEMPTED}{why}")),
        }
    }

    /// A line whose id another run answered "not applied" while this run was at it: decided,
    /// as a refusal is (this run never applies it, and the lines after it are judged without
    /// it), so the rest of the file goes on.
    pub fn answered_elsewhere() -> Verdict {
        Verdict {
            outcome: Outcome::NotApplied,
            error: Some(ANSWERED_SINCE.into()),
        }
    }

    pub fn is_answered_elsewhere(&self) -> bool {
        self.outcome == Outcome::NotApplied && self.error.as_deref() == Some(ANSWERED_SINCE)
    }

    pub fn is_not_attempted(&self) -> bool {
        self.outcome == Outcome::Unknown
            && self
                .error
                .as_deref()
                .is_some_and(|e| e.starts_with(NOT_ATTEMPTED))
    }
}
