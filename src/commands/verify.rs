//! `verify`: the invariants, as text or JSON; exit 1 on a violation.

use std::io::{self, Write};

use crate::db::DbUrl;
use crate::error::Error;
use crate::retry::{retry_transaction, RetryPolicy};
use crate::verify;

pub(super) fn verify_cmd(url: &DbUrl, json: bool, out: &mut impl Write) -> Result<(), Error> {
    let mut conn = url.connect_migrated()?;
    let report = retry_transaction(&RetryPolicy::default(), || verify::verify(&mut conn))?;
    if json {
        serde_json::to_writer(&mut *out, &report).map_err(io::Error::from)?;
        writeln!(out)?;
    } else {
        write!(out, "{report}")?;
    }
    if report.ok {
        Ok(())
    } else {
        Err(Error::Verify {
            negative: report.negative_balances,
            mismatched: report.mismatched_accounts,
            broken: report.broken_chains,
            total: report.total_balance,
            opening: report.total_opening_balance,
        })
    }
}
