//! `history` and `lookup`: the ledger's read side.

use std::io::{self, Write};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::cli::{HistoryArgs, LookupArgs};
use crate::db::DbUrl;
use crate::error::Error;
use crate::repo::{self, Entry};

fn time(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

#[derive(Serialize)]
struct EntryJson {
    version: i64,
    at: String,
    transfer_id: Option<Uuid>,
    counterparty: Option<Uuid>,
    amount: i64,
    balance_after: i64,
}

/// Versions in the first page of `history`: small, so the first line comes at once; later pages
/// grow to `LAST_PAGE`, which bounds memory.
const FIRST_PAGE: i64 = 64;
const LAST_PAGE: i64 = 16_384;

/// Streams an account's entries, newest first, page by page in one snapshot: memory stays
/// constant however long the history.
pub(super) fn history(url: &DbUrl, args: &HistoryArgs, out: &mut impl Write) -> Result<(), Error> {
    let mut conn = url.connect_migrated(args.read.timeout)?;
    let limit = args
        .limit
        .map_or(i64::MAX, |l| i64::try_from(l).unwrap_or(i64::MAX));
    let before = args
        .before
        .map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
    let account = args.account;
    let json = args.json;
    // Run again while a conflict of the moment stops it before its first line (another
    // session's lock held past the server's lock_timeout: it failed at once); on a new
    // connection when it is lost before then (`DbUrl::read_reconnecting`).
    let shown = url.read_reconnecting(&mut conn, args.read.timeout, |conn| {
        super::read_again(args.read.timeout, out, |out| {
            conn.build_transaction().repeatable_read().read_only().run(
                |conn| -> Result<u64, Error> {
                    crate::db::wait_out_rewrites(conn, "accounts, transfers")?;
                    let version = repo::account_version(conn, account)?
                        .ok_or(Error::UnknownAccount(account))?;
                    // Written once the first page's first row is read: until then, a conflict of the moment runs
                    // the read again (`read_again`).
                    let mut header = !json;
                    let mut high = before.min(version.saturating_add(1));
                    // The version the next entry should have (newest first): an entry deleted
                    // by hand left no trace in the listing, versions 5 then 3 (`verify` says
                    // the chain is broken; the text says where).
                    let mut next = high.saturating_sub(1);
                    let mut page = FIRST_PAGE;
                    let mut shown = 0u64;
                    while high > 0 && (shown as i64) < limit {
                        // No more versions than the rows still wanted (an account's entries are
                        // one version each): a page cut short by `--limit` left its cursor to read
                        // the rest when dropped, with nothing written, and the read's watch ended
                        // a listing already complete on a slow link.
                        let wanted = limit.saturating_sub(shown as i64);
                        let low = high.saturating_sub(page.min(wanted)).max(0);
                        // The page's first row read before the header is written: until then, a
                        // conflict of the moment runs the read again.
                        let mut entries = repo::history_page(conn, account, low, high)?;
                        let first = entries.next().transpose()?;
                        if std::mem::take(&mut header) {
                            writeln!(out, "history of account {account} (newest first):")?;
                        }
                        for e in first.map(Ok).into_iter().chain(entries) {
                            let e = e?;
                            if (shown as i64) >= limit {
                                break;
                            }
                            let version = e.version;
                            if json {
                                write!(out, "{}", if shown == 0 { "[" } else { "," })?;
                                serde_json::to_writer(&mut *out, &entry_json(e))
                                    .map_err(io::Error::from)?;
                            } else {
                                if e.version < next {
                                    writeln!(out, "{}", gap(e.version + 1, next))?;
                                }
                                writeln!(out, "{}", entry_line(&e))?;
                            }
                            next = version.saturating_sub(1);
                            shown += 1;
                        }
                        out.flush()?;
                        high = low;
                        page = (page * 4).min(LAST_PAGE);
                    }
                    if header {
                        writeln!(out, "history of account {account} (newest first):")?;
                    }
                    Ok(shown)
                },
            )
        })
    })?;
    if json {
        writeln!(out, "{}", if shown == 0 { "[]" } else { "]" })?;
    }
    log::debug!("history: {shown} entries");
    Ok(())
}

fn entry_json(e: Entry) -> EntryJson {
    EntryJson {
        version: e.version,
        at: time(&e.at),
        transfer_id: e.transfer_id,
        counterparty: e.counterparty,
        amount: e.amount,
        balance_after: e.balance_after,
    }
}

/// The line for versions `low..=high` missing between two entries (deleted by hand).
fn gap(low: i64, high: i64) -> String {
    let which = match low == high {
        true => format!("version {low} is"),
        false => format!("versions {low} to {high} are"),
    };
    format!("({which} missing from the ledger: `bank verify` reports the account's chain broken)")
}

/// `version 3  2026-11-24T10:00:00.000000Z  -100  balance 900  transfer … to …`
fn entry_line(e: &Entry) -> String {
    let what = match (e.transfer_id, e.counterparty) {
        (Some(t), Some(c)) if e.amount < 0 => format!("transfer {t} to {c}"),
        (Some(t), Some(c)) => format!("transfer {t} from {c}"),
        _ => "opening balance".to_string(),
    };
    format!(
        "version {}  {}  {:+}  balance {}  {what}",
        e.version,
        time(&e.at),
        e.amount,
        e.balance_after
    )
}

#[derive(Serialize)]
struct LookupJson {
    id: Uuid,
    from: Uuid,
    to: Uuid,
    amount: i64,
    at: String,
    from_version: i64,
    from_balance_after: i64,
    to_version: i64,
    to_balance_after: i64,
}

/// One transfer from the ledger, or "no transfer <id>" (exit 1).
pub(super) fn lookup(url: &DbUrl, args: &LookupArgs, out: &mut impl Write) -> Result<(), Error> {
    let mut conn = url.connect_migrated(args.read.timeout)?;
    // Read again while a conflict of the moment stops it (another session's lock held past the
    // server's lock_timeout): the command that settles an unknown outcome failed at once.
    // A connection lost before it answered is made again (`DbUrl::read_reconnecting`).
    let found = url.read_reconnecting(&mut conn, args.read.timeout, |conn| {
        Ok(crate::retry::retry_read(args.read.timeout, || {
            repo::find_transfer(conn, args.id)
        })?)
    })?;
    let Some(t) = found else {
        // A claimed id: a run said "not applied" and claimed it, and no earlier attempt can
        // commit after that; the hint that one still might was stale (found by a helper playing
        // a new user). A claim a single statement marked is that statement's, committed: its
        // row is gone since. A claim that cannot be read leaves the cautious hint.
        let claim = crate::retry::retry_read(args.read.timeout, || repo::claim(&mut conn, args.id));
        return Err(match claim {
            Ok(Some(Some(_))) => Error::NoTransferRowGone(args.id),
            Ok(Some(None)) => Error::NoTransferClaimed(args.id),
            Ok(None) | Err(_) if repo::read_only(&mut conn).unwrap_or(false) => {
                Error::NoTransferReadOnly(args.id)
            }
            Ok(None) | Err(_) => Error::NoTransfer(args.id),
        });
    };
    if args.json {
        let json = LookupJson {
            id: t.id,
            from: t.from_id,
            to: t.to_id,
            amount: t.amount,
            at: time(&t.created_at),
            from_version: t.from_version,
            from_balance_after: t.from_balance_after,
            to_version: t.to_version,
            to_balance_after: t.to_balance_after,
        };
        serde_json::to_writer(&mut *out, &json).map_err(io::Error::from)?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "transfer {}: {} at {}",
            t.id,
            t.amount,
            time(&t.created_at)
        )?;
        writeln!(
            out,
            "  from {}: balance after {} (version {})",
            t.from_id, t.from_balance_after, t.from_version
        )?;
        writeln!(
            out,
            "  to   {}: balance after {} (version {})",
            t.to_id, t.to_balance_after, t.to_version
        )?;
    }
    Ok(())
}
