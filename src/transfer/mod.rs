//! Moving money: `statement` (the one statement that applies a transfer, and what its errors
//! mean) and `runner` (running it exactly once: retries, the ledger's last word, the deadline).

mod runner;
mod statement;

pub(crate) use runner::{after_step, claim_and_find, connection, first_reason_in, ANSWERED_SINCE};
pub use runner::{gave_up, Receipt, Runner, GRACE};
pub(crate) use statement::other_unique_index;
pub use statement::{apply, apply_claiming, BodyError, TransferStatement};

use serde::Serialize;

use crate::error::TransferError;
use crate::models::NewTransfer;

/// How a transfer reaches the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// BEGIN ISOLATION LEVEL SERIALIZABLE; the transfer statement; COMMIT.
    #[default]
    Transaction,
    /// The transfer statement alone, as an implicit transaction: one round trip. CockroachDB
    /// retries such statements on the server; the client loop still covers what reaches it.
    SingleStatement,
}

/// The name `--mode` takes, for logs and messages.
impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Transaction => "transaction",
            Mode::SingleStatement => "single-statement",
        })
    }
}

/// Checks a request before it reaches the database.
pub fn validate(t: &NewTransfer) -> Result<(), TransferError> {
    if t.amount <= 0 {
        return Err(TransferError::NonPositiveAmount(t.amount));
    }
    if t.from_id == t.to_id {
        return Err(TransferError::SameAccount(t.from_id));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn validation_rejects_bad_requests_before_the_database() {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        let t = |from, to, amount| NewTransfer {
            id: Uuid::nil(),
            from_id: from,
            to_id: to,
            amount,
        };
        assert!(matches!(
            validate(&t(a, b, 0)),
            Err(TransferError::NonPositiveAmount(0))
        ));
        assert!(matches!(
            validate(&t(a, b, -5)),
            Err(TransferError::NonPositiveAmount(-5))
        ));
        assert!(matches!(
            validate(&t(a, a, 5)),
            Err(TransferError::SameAccount(_))
        ));
        assert!(validate(&t(a, b, 5)).is_ok());
    }
}
