//! `seed`, `balances` and `reset`: accounts in bulk.

use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use chrono::{SecondsFormat, Utc};
use diesel::{Connection, PgConnection};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use uuid::Uuid;

use crate::cli::{BalancesArgs, ResetArgs, SeedArgs, SeedMethod};
use crate::db::DbUrl;
use crate::error::Error;
use crate::models::{Account, NewAccount};
use crate::repo;

/// The tutorial's two accounts.
pub(super) const TUTORIAL_BALANCES: [i64; 2] = [1000, 250];
/// Accounts per COPY in `seed`.
const SEED_CHUNK: usize = 100_000;

#[derive(Serialize)]
struct AccountJson {
    id: Uuid,
    balance: i64,
}

pub(super) fn seed(url: &DbUrl, args: &SeedArgs, out: &mut impl Write) -> Result<(), Error> {
    // Ctrl-C stops the seed between chunks, not in the middle of one (see below).
    crate::interrupt::catch();
    let total = args.accounts.unwrap_or(TUTORIAL_BALANCES.len() as u64);
    // A frozen server, or a lock held elsewhere, kept a chunk (or the connection) waiting
    // forever: given up on after `--timeout` without a chunk done, saying how far it got.
    // Accounts created, those whose ids are written but whose chunk is not committed yet, and
    // whether the JSON array has opened (with its first row).
    let progress = Arc::new((
        crate::guard::Created::default(),
        std::sync::atomic::AtomicBool::new(false),
    ));
    let seen = Arc::clone(&progress);
    let json = args.json;
    crate::guard::watch(args.timeout, move || {
        let (created, unsettled) = seen.0.read();
        let stopped = Error::SeedStopped {
            why: format!(
                "a step (the connection, a chunk) is slower than that (raise --timeout), {}",
                crate::guard::WRITE_STALLS
            ),
            created,
            total,
            unsettled,
        };
        // The process ends here, on another thread than the one writing standard output.
        match json && seen.1.load(Ordering::SeqCst) {
            true => format!("{stopped}; the JSON array on standard output is left unclosed"),
            false => stopped.to_string(),
        }
    })?;
    let mut conn = url.connect_to_write(args.timeout)?;
    crate::guard::tick();
    let balances: Box<dyn Iterator<Item = i64>> = match args.accounts {
        None => Box::new(TUTORIAL_BALANCES.into_iter()),
        Some(n) => Box::new(std::iter::repeat_n(args.balance, n as usize)),
    };
    let bar = progress_bar(total);
    let mut balances = balances.peekable();
    let mut list = AccountList::start(out, args.json, None)?;
    let mut method = args.method;
    let mut created = 0u64;
    let stopped = |why: String, created: u64| Error::SeedStopped {
        why,
        created,
        total,
        unsettled: 0,
    };
    // One COPY per chunk, each its own transaction: a huge seed never builds one huge
    // transaction (CockroachDB limits their size), and the progress bar moves per chunk.
    while balances.peek().is_some() {
        let chunk: Vec<NewAccount> = balances
            .by_ref()
            .take(SEED_CHUNK)
            .map(NewAccount::with_balance)
            .collect();
        // A chunk rolled back by a conflict before its ids were written runs again (a
        // serialization failure, which CockroachDB may give any transaction; another session's
        // lock held past the server's lock_timeout) until `--timeout`, a statement timeout a few
        // times only, no attempt after Ctrl-C (`retry::retry_rolled_back`, as every step of
        // bank's). Once its ids are written, it cannot without listing them twice.
        let written = std::cell::Cell::new(false);
        let step = loop {
            let step = crate::retry::retry_rolled_back(
                args.timeout,
                || {
                    written.set(false);
                    conn.transaction(|c| {
                        let n = load_chunk(c, &chunk, &mut method)?;
                        // The ids are written before the COMMIT, and a chunk whose ids cannot be
                        // written (a full disk, a reader gone) or that Ctrl-C came before is
                        // rolled back: every account created has its id written, so none is
                        // created that nobody is told of.
                        if crate::interrupt::interrupted() {
                            return Err(Stop::Interrupted);
                        }
                        // The reader may be slow (`| less`): the server's idle timeout, set to
                        // `--timeout` for a client that vanished, waits meanwhile.
                        crate::db::idle_timeout_lifted(c, || {
                            chunk
                                .iter()
                                .try_for_each(|a| list.row(out, a.id, a.balance))
                                .and_then(|()| out.flush())
                                .map_err(Stop::Output)
                        })?;
                        written.set(true);
                        progress.0.committing(chunk.len() as u64);
                        progress.1.store(true, Ordering::SeqCst);
                        Ok(n)
                    })
                },
                |e| match e {
                    Stop::Database(d) if !written.get() => Some(d),
                    _ => None,
                },
            );
            match step {
                // Ctrl-C stopped a chunk rolled back from being run again: said as Ctrl-C.
                Err(Stop::Database(e)) if !written.get() && crate::retry::stopped_by_ctrl_c(&e) => {
                    log::debug!("seed: chunk rolled back ({e}); interrupted");
                    break Err(Stop::Interrupted);
                }
                // COPY stopped midway: Diesel lost the server's words, left its results unread
                // (the savepoint's rollback failed on them, and the next INSERT read the COPY's
                // result for its own: 0 rows), so the connection is closed. The chunk runs again
                // with INSERT on a new one, which works or gets the words.
                Err(Stop::Database(e))
                    if !written.get()
                        && matches!(method, SeedMethod::Auto)
                        && repo::copy_reason_lost(&e) =>
                {
                    log::info!("seed: COPY refused ({COPY_LOST}); loading with INSERT instead");
                    method = SeedMethod::Insert;
                    // Closed first: a role allowed one connection (a DBA's quota) was refused
                    // the second. Only the first chunk loads by `Auto`: nothing is created yet,
                    // so a failure here is told as it is, not as a seed stopped midway.
                    drop(conn);
                    conn = url.connect_to_write_after_closing(args.timeout)?;
                }
                step => break step,
            }
        };
        let written = written.get();
        let n = match step {
            Ok(n) => n,
            Err(Stop::Interrupted) => {
                // What was created is listed as a whole (a JSON array that parses).
                list.finish(out)?;
                out.flush()?;
                return Err(stopped(crate::interrupt::reason().to_string(), created));
            }
            Err(Stop::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
                return Err(stopped("the output was closed".into(), created));
            }
            Err(Stop::Output(e)) => {
                return Err(stopped(format!("cannot write the ids ({e})"), created));
            }
            Err(Stop::Database(e)) if created == 0 && !written => {
                return Err(repo::reason_lost(e).into())
            }
            Err(Stop::Database(e)) => {
                // Its load failed, or its COMMIT after its ids were written. The server may
                // have answered (a deferred trigger refusing at COMMIT): then the database says
                // whether they exist, and the array they are listed in is closed as it is for
                // Ctrl-C, the message saying which were rolled back. Otherwise they may or may
                // not.
                let ids: Vec<Uuid> = chunk.iter().map(|a| a.id).collect();
                let found = match written {
                    true => repo::list_ids(&mut conn, &ids).ok().map(|rows| rows.len()),
                    false => Some(0),
                };
                let (created, unsettled) = match found {
                    Some(0) => (created, 0),
                    Some(n) if n == ids.len() => (created + n as u64, 0),
                    _ => (created, ids.len() as u64),
                };
                // Settled: the array lists the chunks committed, and this one's ids when they
                // were written (the message says they were rolled back). Left open when the
                // chunk failed before its ids were written, the listing did not parse (found
                // by a fault-injecting helper, with a full disk).
                if unsettled == 0 {
                    let _ = list.finish(out).and_then(|_| out.flush());
                }
                return Err(Error::SeedStopped {
                    why: e.to_string(),
                    created,
                    total,
                    unsettled,
                });
            }
        };
        created += n as u64;
        progress.0.committed(created);
        log::debug!("seed: loaded {n} accounts ({method})");
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    list.finish(out)?;
    Ok(())
}

/// What a COPY that Diesel lost the server's words for is logged as.
const COPY_LOST: &str = "the driver lost the server's reason";

/// Why a chunk of the seed was rolled back.
enum Stop {
    Database(diesel::result::Error),
    Output(io::Error),
    Interrupted,
}

/// For the log line of a chunk run again.
impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Database(e) => e.fmt(f),
            Stop::Output(e) => write!(f, "cannot write the ids ({e})"),
            Stop::Interrupted => f.write_str(crate::interrupt::reason()),
        }
    }
}

impl From<diesel::result::Error> for Stop {
    fn from(e: diesel::result::Error) -> Self {
        Stop::Database(e)
    }
}

/// Loads one chunk in the caller's transaction: with COPY, or multi-row INSERTs (each within
/// PostgreSQL's 65,535 bind parameters and about 1 MB, far below CockroachDB's 16 MiB message
/// limit). `Auto` tries COPY first and keeps to what worked; a refused COPY is retried as
/// INSERTs from a savepoint, as the transaction is aborted by then.
fn load_chunk(
    conn: &mut PgConnection,
    chunk: &[NewAccount],
    method: &mut SeedMethod,
) -> diesel::QueryResult<usize> {
    match method {
        SeedMethod::Insert => repo::create_many(conn, chunk),
        SeedMethod::Copy => repo::copy_accounts(conn, chunk),
        SeedMethod::Auto => match conn.transaction(|c| repo::copy_accounts(c, chunk)) {
            Ok(n) => {
                *method = SeedMethod::Copy;
                Ok(n)
            }
            Err(e) if repo::is_copy_refused(&e) => {
                log::info!("seed: COPY refused ({e}); loading with INSERT instead");
                *method = SeedMethod::Insert;
                repo::create_many(conn, chunk)
            }
            Err(e) => Err(e),
        },
    }
}

/// A progress bar on a terminal; a hidden one otherwise (scripts and pipes get no noise).
fn progress_bar(total: u64) -> ProgressBar {
    if total < 10_000 || !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} accounts ({per_sec}, eta {eta})")
    {
        bar.set_style(style);
    }
    bar
}

/// A list of accounts written as it is produced: text rows (`account id: …  balance: $N`, after an
/// optional header) or one JSON array of `{"id", "balance"}`. Holds nothing but a row count, so
/// a listing of millions of rows takes constant memory.
struct AccountList {
    json: bool,
    rows: u64,
}

impl AccountList {
    fn start(out: &mut impl Write, json: bool, header: Option<&str>) -> io::Result<AccountList> {
        if let (false, Some(header)) = (json, header) {
            writeln!(out, "{header}")?;
        }
        Ok(AccountList { json, rows: 0 })
    }

    fn row(&mut self, out: &mut impl Write, id: Uuid, balance: i64) -> io::Result<()> {
        if !self.json {
            writeln!(out, "account id: {id}  balance: ${balance}")?;
        } else {
            // The array opens with its first row, so a command that fails before any row was
            // made prints nothing on stdout.
            write!(out, "{}", if self.rows == 0 { "[" } else { "," })?;
            serde_json::to_writer(&mut *out, &AccountJson { id, balance })?;
        }
        self.rows += 1;
        Ok(())
    }

    fn finish(self, out: &mut impl Write) -> io::Result<u64> {
        if self.json {
            writeln!(out, "{}", if self.rows == 0 { "[]" } else { "]" })?;
        }
        Ok(self.rows)
    }
}

pub(super) fn balances(
    url: &DbUrl,
    args: &BalancesArgs,
    out: &mut impl Write,
) -> Result<(), Error> {
    let mut conn = url.connect_migrated(args.read.timeout)?;
    // Run again while a conflict of the moment stops it before its first line (another
    // session's lock held past the server's lock_timeout: it failed at once); its warnings
    // are said once.
    let mut warned = false;
    // A connection lost before its first line is made again (`DbUrl::read_reconnecting`).
    url.read_reconnecting(&mut conn, args.read.timeout, |conn| {
        super::read_again(args.read.timeout, out, |out| {
            balances_on(conn, args, &mut warned, out)
        })
    })
}

/// `balances` on `conn`: its header is written once its first row is read.
fn balances_on(
    conn: &mut PgConnection,
    args: &BalancesArgs,
    warned: &mut bool,
    out: &mut impl Write,
) -> Result<(), Error> {
    let Some(at) = args.as_of else {
        let rows = repo::list(conn)?;
        return write_balances(rows, args.json, out);
    };
    // Later transfers will change balances at a time still to come: they are not known yet.
    let now = repo::server_now(conn)?;
    if at > now {
        return Err(Error::Usage(format!(
            "--as-of {} is in the future (the database's time is {}): balances then are not \
             known yet",
            at.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            now.to_rfc3339_opts(SecondsFormat::Secs, true)
        )));
    }
    // CockroachDB's pg_stat_activity is empty: the open transactions cannot be seen there, so
    // a time in the last moments may not be settled yet, and the answer is not waited for.
    // Nor on PostgreSQL for a role that sees only its own sessions there (without
    // pg_read_all_stats): another role's transfer about to commit went unseen, and the answer
    // changed a moment later without a word.
    let server = crate::db::engine::detect(conn)?;
    let recent = now.signed_duration_since(at) < chrono::Duration::seconds(60);
    if std::mem::replace(warned, true) {
        // Said by an earlier attempt.
    } else if server.is_cockroachdb() && recent {
        crate::say(format_args!(
            "bank: warning: {server} does not show other sessions' open transactions \
             (pg_stat_activity is empty there): balances as of the last minute may still change"
        ));
    } else if recent && !repo::sees_all_sessions(conn).unwrap_or(true) {
        crate::say(format_args!(
            "bank: warning: this role sees only its own sessions' open transactions (it is not \
             granted pg_read_all_stats): balances as of the last minute may still change while \
             another role's transfer commits"
        ));
    }
    wait_for_transactions_begun_before(conn, at, args.read.timeout)?;
    let header = format!(
        "Balances at {}:",
        at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    );
    // The first row read before the header is written: until then, a conflict of the moment
    // runs the read again (`balances`).
    let mut rows = repo::balances_as_of(conn, at)?;
    let first = rows.next().transpose()?;
    let mut list = AccountList::start(out, args.json, Some(&header))?;
    for row in first.map(Ok).into_iter().chain(rows) {
        let a = row?;
        list.row(out, a.id, a.balance)?;
    }
    list.finish(out)?;
    Ok(())
}

/// An entry is timed once its transfer holds its locks, and committed a moment later (a file's
/// chunk: up to its statement's length): balances as of a time that a transaction still open
/// began before may still change. So the read waits until every transaction begun by then that
/// holds a lock (`repo::oldest_open_transaction`) has ended, for at most half the read's timeout (5 s at most), and says so if one stays open,
/// rather than answer without its entries. Best effort: a server without `pg_stat_activity`
/// (or one that hides other roles' sessions) is not waited for.
fn wait_for_transactions_begun_before(
    conn: &mut PgConnection,
    at: chrono::DateTime<Utc>,
    read_timeout: std::time::Duration,
) -> Result<(), Error> {
    let patience = (read_timeout / 2).min(std::time::Duration::from_secs(5));
    let started = std::time::Instant::now();
    loop {
        let oldest = match repo::oldest_open_transaction(conn) {
            Ok(Some(oldest)) if oldest <= at => oldest,
            Ok(_) => return Ok(()),
            Err(e) => {
                log::debug!("balances --as-of: open transactions not known ({e})");
                return Ok(());
            }
        };
        if started.elapsed() >= patience {
            return Err(Error::AsOfUnsettled {
                at: at.to_rfc3339_opts(SecondsFormat::AutoSi, true),
                since: oldest.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `Balances at <time>:` and the accounts, as they arrive from the database.
pub(super) fn write_balances(
    rows: impl Iterator<Item = diesel::QueryResult<Account>>,
    json: bool,
    out: &mut impl Write,
) -> Result<(), Error> {
    // The first row read before the header is written: until then, a conflict of the moment
    // runs the read again (`balances`).
    let mut rows = rows.into_iter();
    let first = rows.next().transpose()?;
    let header = format!(
        "Balances at {}:",
        Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
    );
    let mut list = AccountList::start(out, json, Some(&header))?;
    for row in first.map(Ok).into_iter().chain(rows) {
        let a = row?;
        list.row(out, a.id, a.balance)?;
    }
    let count = list.finish(out)?;
    log::debug!("balances: {count} accounts");
    Ok(())
}

pub(super) fn reset(url: &DbUrl, args: &ResetArgs, out: &mut impl Write) -> Result<(), Error> {
    if !args.yes {
        if !io::stdin().is_terminal() {
            return Err(Error::Usage(
                "reset deletes every account and transfer: pass --yes to confirm (stdin is not a terminal)"
                    .into(),
            ));
        }
        if !confirm(&format!(
            "Delete every account and transfer in {url}? [y/N] "
        ))? {
            return Err(Error::Cancelled("reset"));
        }
    }
    // Stopped between batches, it says how far it got (killed, it said nothing, the ledger gone
    // and the accounts left); a statement in flight finishes first.
    crate::interrupt::catch();
    // A frozen server keeps a step waiting forever (its kernel acknowledges every packet), and
    // a lock another session holds as long as it likes: given up on after `--timeout` without
    // a step done, saying how far it got. From the start: the connection and the schema's
    // check wait like any batch (5 s for a 500 ms deadline, or forever on a lock).
    let deleted = Arc::new(Deleted::default());
    let seen = Arc::clone(&deleted);
    crate::guard::watch(args.timeout, move || {
        let (accounts, transfers) = seen.counts();
        format!(
            "a batch is slower than that (raise --timeout), {}; reset stopped \
             after deleting {} and {}{} (the batch in flight, if any, may or may not have been \
             done); run it again to finish",
            crate::guard::WRITE_STALLS,
            crate::counted(accounts as u64, "account"),
            crate::counted(transfers as u64, "transfer"),
            seen.zeroed()
        )
    })?;
    let mut conn = url.connect_to_write(args.timeout)?;
    crate::guard::tick();
    // Asked first: the batches commit as they go, and a refusal at the last table left every
    // account and transfer deleted behind an error that did not say so.
    let denied = repo::tables_without(
        &mut conn,
        &["transfers", "accounts", "transfer_claims"],
        "DELETE",
    )?;
    if !denied.is_empty() {
        return Err(Error::ResetNotAllowed(denied.join(" and ")));
    }
    crate::guard::tick();
    let claims = match delete_in_batches(&mut conn, repo::DELETE_BATCH, args.timeout, &deleted) {
        Ok(claims) => claims,
        // How far it got, none included: the bare error left the user to guess.
        Err(e) => {
            let (accounts, transfers) = deleted.counts();
            let read_only = matches!(
                &e,
                Error::Database(diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::ReadOnlyTransaction,
                    _
                ))
            );
            let zeroed = deleted.zeroed();
            if read_only && accounts == 0 && transfers == 0 && zeroed.is_empty() {
                return Err(Error::ResetReadOnly);
            }
            // Each batch is a statement that is its own commit: one whose answer was lost may
            // have deleted its rows, uncounted (it said "after deleting 0", found by a reviewer).
            let in_flight = match &e {
                Error::Database(d) => crate::retry::may_have_committed(d),
                _ => false,
            };
            return Err(Error::ResetStopped {
                accounts,
                transfers,
                zeroed,
                in_flight,
                source: Box::new(e),
            });
        }
    };
    let (accounts, transfers) = deleted.counts();
    log::debug!("reset: deleted {accounts} accounts, {transfers} transfers, {claims} claims");
    // Claims are rows too (a refused `--id` run writes one): said when there were any.
    let claims = match claims {
        0 => String::new(),
        1 => ", and 1 claimed transfer id".to_string(),
        n => format!(", and {n} claimed transfer ids"),
    };
    super::report_done(
        out,
        &format!(
            "deleted {} and {}{claims}",
            crate::counted(accounts as u64, "account"),
            crate::counted(transfers as u64, "transfer")
        ),
    )
}

/// Sets every balance to 0, then deletes every ledger row, then every account, `batch` rows per
/// statement, each statement its own transaction: one transaction deleting millions of rows
/// would run into CockroachDB's transaction size limits (and hold every lock until the end on
/// both engines). A reset is therefore not atomic: stopped halfway, it leaves some rows, and
/// running it again finishes it. Ledger rows are drained again before each batch of accounts,
/// in case a client added some meanwhile (the foreign keys refuse to delete an account that has
/// any). Counts what it deletes in `deleted`, as it goes: a failure part-way says how far it
/// got.
/// Returns the number of transfer claims deleted last.
fn delete_in_batches(
    conn: &mut diesel::PgConnection,
    batch: i64,
    timeout: std::time::Duration,
    deleted: &Deleted,
) -> Result<usize, Error> {
    let go_on = || match crate::interrupt::interrupted() {
        true => Err(Error::Stopped(crate::interrupt::reason())),
        false => Ok(()),
    };
    // Each batch is one statement, its own transaction: one rolled back by a conflict of the
    // moment (a lock held past the server's `lock_timeout`, a deadlock) applied nothing and runs
    // again until `--timeout`, a statement timeout at most twice (`retry::retry_read`); no new
    // attempt starts after Ctrl-C. It ran under the transfers' policy (31 attempts, about 20 s
    // whatever `--timeout` said, statement timeouts again and again) and went on after Ctrl-C
    // until the lock was gone, then set balances to 0.
    // Every balance 0 before the first ledger row goes: a reset stopped between the two
    // (Ctrl-C, its `--timeout`, an error) left accounts whose transfers a rerun of a file then
    // applied a second time; now such a rerun is refused for insufficient funds.
    let mut after = None;
    loop {
        go_on()?;
        // In a transaction of its own, not a statement that is its own commit: one waiting on a
        // lock when the deadline ended the process was run by the server once the lock went,
        // and committed, zeroing balances after the reset had said it stopped
        // (faults::commands_that_write_end_by_their_deadline_before_their_first_step). Without
        // its COMMIT, a session whose client has gone commits nothing.
        // After a DBA's rewrite of `accounts` it waited for, if any (`db::wait_out_rewrites`):
        // at SERIALIZABLE its snapshot saw no account, and the ledger went before a balance was 0.
        let zeroed = batch_step(timeout, || {
            conn.transaction(|c| {
                crate::db::wait_out_rewrites(c, "accounts")?;
                repo::zero_balances_batch(c, after, batch)
            })
        })?;
        match zeroed {
            (_, None) => break,
            (n, last) => {
                deleted.add_zeroed(n);
                after = last;
            }
        }
    }
    loop {
        loop {
            go_on()?;
            let n = batch_step(timeout, || repo::delete_transfers_batch(conn, batch))?;
            deleted.add(0, n);
            log::debug!(
                "reset: deleted {n} transfers ({} so far)",
                deleted.counts().1
            );
            if n == 0 {
                break;
            }
        }
        go_on()?;
        let (n, stragglers) = batch_step(timeout, || repo::delete_accounts_batch(conn, batch))?;
        deleted.add(n, stragglers);
        log::debug!(
            "reset: deleted {n} accounts ({} so far) and {stragglers} transfers written since \
             the ledger was drained",
            deleted.counts().0
        );
        if n == 0 {
            break;
        }
    }
    // The ids claimed by single-statement transfers and by reruns' "not applied": with their
    // transfers gone, nothing is left for a claim to protect.
    let mut claims = 0;
    loop {
        go_on()?;
        match batch_step(timeout, || repo::delete_claims_batch(conn, batch))? {
            0 => return Ok(claims),
            n => claims += n,
        }
        crate::guard::tick();
    }
}

/// Runs one of reset's batches (a statement, its own transaction) as `delete_in_batches` says;
/// after Ctrl-C (or SIGTERM) its error is that the reset was interrupted.
fn batch_step<T>(
    timeout: std::time::Duration,
    step: impl FnMut() -> diesel::QueryResult<T>,
) -> Result<T, Error> {
    crate::retry::retry_read(timeout, step).map_err(|e| match crate::retry::stopped_by_ctrl_c(&e) {
        true => Error::Stopped(crate::interrupt::reason()),
        false => Error::from(e),
    })
}

/// What a reset has deleted so far (accounts, transfers), read by its watchdog too. Each batch
/// counted is a sign of life from the database (`guard::tick`).
#[derive(Default)]
struct Deleted {
    accounts: AtomicUsize,
    transfers: AtomicUsize,
    /// Balances set to 0 before the ledger is drained (`repo::zero_balances_batch`).
    zeroed: AtomicUsize,
}

impl Deleted {
    fn add_zeroed(&self, balances: usize) {
        self.zeroed.fetch_add(balances, Ordering::Relaxed);
        crate::guard::tick();
    }

    /// How a message says the balances set to 0 so far: nothing when none was.
    fn zeroed(&self) -> String {
        match self.zeroed.load(Ordering::Relaxed) {
            0 => String::new(),
            n => format!(
                " (having set {} to 0 first)",
                crate::counted(n as u64, "balance")
            ),
        }
    }

    fn add(&self, accounts: usize, transfers: usize) {
        self.accounts.fetch_add(accounts, Ordering::Relaxed);
        self.transfers.fetch_add(transfers, Ordering::Relaxed);
        crate::guard::tick();
    }

    fn counts(&self) -> (usize, usize) {
        (
            self.accounts.load(Ordering::Relaxed),
            self.transfers.load(Ordering::Relaxed),
        )
    }
}

fn confirm(prompt: &str) -> Result<bool, Error> {
    let _ = write!(std::io::stderr(), "{prompt}");
    io::stderr().flush()?;
    let mut answer = String::new();
    // A terminal left in non-blocking mode (by a Node.js program, say) has no answer yet when
    // asked: its EAGAIN ended the reset as "cannot write output: Resource temporarily
    // unavailable" before anyone could answer (found by a helper playing a new user).
    let read = crate::guard::again_while_it_would_block(|| io::stdin().read_line(&mut answer))?;
    if read == 0 {
        // An end of input (Ctrl-D) leaves the cursor after the prompt.
        let _ = writeln!(io::stderr());
    }
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}
