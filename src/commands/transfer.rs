//! `transfer`: one transfer, its receipt or its failure, as text or JSON.

use std::io::{self, Write};

use serde::Serialize;
use uuid::Uuid;

use crate::cli::TransferArgs;
use crate::db::{DbUrl, Session};
use crate::error::{Error, TransferError};
use crate::models::NewTransfer;
use crate::retry::RetryCounts;
use crate::transfer::{self, Receipt, Runner};

#[derive(Serialize)]
struct TransferJson {
    id: Uuid,
    from: Uuid,
    to: Uuid,
    amount: i64,
    /// "applied" or "already_applied".
    outcome: &'static str,
    attempts: u32,
    already_applied: bool,
    retries: RetryCounts,
}

/// `transfer --json` when the transfer failed: "failed" (not applied) or "unknown" (exit 3).
#[derive(Serialize)]
struct TransferFailureJson {
    id: Uuid,
    outcome: &'static str,
    /// The outcome a line of a file gets for the same failure (`insufficient_funds`,
    /// `unknown_account`, …): a program told them apart only by the error's words.
    reason: &'static str,
    error: String,
}

pub(super) fn transfer_cmd(
    url: &DbUrl,
    args: &TransferArgs,
    out: &mut impl Write,
) -> Result<(), Error> {
    if let Some(path) = &args.file {
        return super::batch::transfer_file(url, args, path, out);
    }
    // Checked here: clap's `requires = "file"` on them let `--batch 5` on one transfer through
    // (tests/cli.rs, options_of_a_file_without_a_file_are_refused).
    let file_only = [
        ("--batch", args.batch.is_some()),
        ("--format", args.format.is_some()),
        ("--connections", args.connections.is_some()),
        ("--batch-isolation", args.batch_isolation.is_some()),
    ];
    if let Some((flag, _)) = file_only.iter().find(|(_, given)| *given) {
        return Err(Error::Usage(format!(
            "{flag} applies to --file only: one transfer is one statement"
        )));
    }
    // clap requires all three without --file.
    let (Some(from_id), Some(to_id), Some(amount)) = (args.from, args.to, args.amount) else {
        return Err(Error::Usage(
            "--from, --to and --amount are required (or --file)".into(),
        ));
    };
    let t = NewTransfer {
        id: args.id.unwrap_or_else(Uuid::new_v4),
        from_id,
        to_id,
        amount,
    };
    // Checked before connecting: bad input never reaches the database.
    transfer::validate(&t)?;
    let policy = args.run.policy();
    let session = Session::new(url.clone(), "bank")
        .with_timeout(policy.timeout)
        .checking_schema();
    let mut runner = Runner::new(session, args.run.mode(), policy);
    runner.id_given = args.id.is_some();
    // A first Ctrl-C ends the wait with the outcome as far as it is known (see `run_guarded`).
    crate::interrupt::catch();
    let receipt = match runner.run_guarded(&t) {
        Ok(receipt) => receipt,
        Err(e) => {
            let reason = crate::batch::Outcome::of_failure(&e).as_str();
            // The database's own refusal (a DBA's trigger, a read-only database) is named as the
            // transfer it refused, not applied: the line said only "database error: ...", and
            // never showed the id this run made up. (The runner keeps the error's type: a
            // file's one-by-one oracle tells refusals apart by it.)
            let e = match e {
                e @ (TransferError::Database(diesel::result::Error::DatabaseError(..))
                | TransferError::NoLedgerRow) => TransferError::NotApplied {
                    id: t.id,
                    reason: format!("the database refused it ({e})"),
                },
                e => e,
            };
            // A usage error (a URL libpq refuses) prints nothing on stdout, as exit 2 promises.
            let usage = Error::from(e);
            let usage_error = usage.exit_code() == crate::exit_code::ExitCode::Usage;
            let Error::Transfer(e) = usage else {
                return Err(usage);
            };
            if args.json && !usage_error {
                let outcome = match e {
                    TransferError::OutcomeUnknown { .. } => "unknown",
                    _ => "failed",
                };
                // With the hints stderr gives (whose timeout, what to grant).
                let error = crate::one_line(&crate::error::with_hints(e.to_string()));
                serde_json::to_writer(
                    &mut *out,
                    &TransferFailureJson {
                        id: t.id,
                        outcome,
                        reason: match outcome {
                            "unknown" => "unknown",
                            _ => reason,
                        },
                        error,
                    },
                )
                .map_err(io::Error::from)?;
                writeln!(out)?;
            }
            return Err(e.into());
        }
    };
    // The transfer is in the ledger whatever becomes of its receipt.
    write_receipt(out, args.json, &t, &receipt)
        .and_then(|()| out.flush())
        .map_err(|source| Error::ReceiptLost {
            id: t.id,
            how: match receipt.already_applied {
                true => "already applied",
                false => "applied",
            },
            source,
        })
}

fn write_receipt(
    out: &mut impl Write,
    json: bool,
    t: &NewTransfer,
    receipt: &Receipt,
) -> io::Result<()> {
    if json {
        serde_json::to_writer(
            &mut *out,
            &TransferJson {
                id: t.id,
                from: t.from_id,
                to: t.to_id,
                amount: t.amount,
                outcome: if receipt.already_applied {
                    "already_applied"
                } else {
                    "applied"
                },
                attempts: receipt.attempts,
                already_applied: receipt.already_applied,
                retries: receipt.retries,
            },
        )
        .map_err(io::Error::from)?;
        writeln!(out)
    } else {
        writeln!(out, "{}", receipt_line(receipt))
    }
}

pub(super) fn receipt_line(r: &Receipt) -> String {
    let t = &r.transfer;
    if r.already_applied {
        return format!(
            "transfer {} already exists: {} from {} to {} was applied earlier; nothing changed",
            t.id, t.amount, t.from_id, t.to_id
        );
    }
    format!(
        "transfer {}: moved {} from {} to {} ({})",
        t.id,
        t.amount,
        t.from_id,
        t.to_id,
        crate::retry::attempts(r.attempts)
    )
}
