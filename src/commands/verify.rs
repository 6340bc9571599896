//! `verify`: the invariants, as text or JSON; exit 1 on a violation.

use std::io::{self, Write};

use crate::db::DbUrl;
use crate::error::Error;
use crate::verify;

pub(super) fn verify_cmd(
    url: &DbUrl,
    json: bool,
    timeout: std::time::Duration,
    out: &mut impl Write,
) -> Result<(), Error> {
    let mut conn = url.connect_migrated(timeout)?;
    // Run again while a conflict of the moment rolls it back, until the read's `--timeout` (it
    // was 30 s whatever that said: a shorter one's watch ended it with "the read is slower than
    // that" on a lock held elsewhere); the server's statement_timeout, which cancels a check
    // longer than it allows every time, only a few times (it ran again for 30 s).
    // A connection lost before it answered is made again (`DbUrl::read_reconnecting`).
    let report = url.read_reconnecting(&mut conn, timeout, |conn| {
        Ok(crate::retry::retry_read(timeout, || verify::verify(conn))?)
    })?;
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
