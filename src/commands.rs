//! What each subcommand does: connect, call the repository or the transfer service, print.
//! Output goes to stdout; diagnostics go to stderr through `log`.

use std::io::{self, BufWriter, IsTerminal, Write};

use chrono::{SecondsFormat, Utc};
use diesel::pg::PgConnection;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use uuid::Uuid;

use crate::cli::{Cli, Command, ResetArgs, SeedArgs, TransferArgs};
use crate::db::{self, DbUrl, Session};
use crate::error::{Error, TransferError};
use crate::models::{Account, NewAccount, NewTransfer};
use crate::repo;
use crate::retry::{retry_transaction, RetryCounts, RetryPolicy};
use crate::transfer::{self, Mode, Receipt, Runner};
use crate::verify;
use crate::workload;

/// The tutorial's two accounts.
const TUTORIAL_BALANCES: [i64; 2] = [1000, 250];
const DEMO_AMOUNT: i64 = 100;
/// Accounts per COPY in `seed`.
const SEED_CHUNK: usize = 100_000;

pub fn run(cli: Cli) -> Result<(), Error> {
    let url = DbUrl::resolve(cli.database_url.as_deref())?;
    let out = io::stdout().lock();
    let mut out = BufWriter::new(out);
    let result = match cli.command {
        Command::Demo => demo(&url, &mut out),
        Command::Init => init(&url, &mut out),
        Command::Seed(args) => seed(&url, &args, &mut out),
        Command::Transfer(args) => transfer_cmd(&url, &args, &mut out),
        Command::Balances(args) => balances(&url, args.json, &mut out),
        Command::Reset(args) => reset(&url, &args, &mut out),
        Command::Verify(args) => verify_cmd(&url, args.json, &mut out),
        Command::Workload(args) => workload::run(&url, &args.config(), &mut out),
    };
    // Whatever was printed before a failure still reaches stdout.
    out.flush()?;
    result
}

fn init(url: &DbUrl, out: &mut impl Write) -> Result<(), Error> {
    let mut conn = url.connect()?;
    let ran = db::run_migrations(&mut conn)?;
    if ran.is_empty() {
        writeln!(out, "schema is up to date")?;
    }
    for name in ran {
        writeln!(out, "applied migration {name}")?;
    }
    Ok(())
}

#[derive(Serialize)]
struct AccountJson {
    id: Uuid,
    balance: i64,
}

fn seed(url: &DbUrl, args: &SeedArgs, out: &mut impl Write) -> Result<(), Error> {
    let mut conn = url.connect()?;
    let balances: Box<dyn Iterator<Item = i64>> = match args.accounts {
        None => Box::new(TUTORIAL_BALANCES.into_iter()),
        Some(n) => Box::new(std::iter::repeat_n(args.balance, n as usize)),
    };
    let total = args.accounts.unwrap_or(TUTORIAL_BALANCES.len() as u64);
    let bar = progress_bar(total);
    let mut balances = balances.peekable();
    let mut list = AccountList::start(out, args.json, None)?;
    // One COPY per chunk, each its own transaction: a huge seed never builds one huge
    // transaction (CockroachDB limits their size), and the progress bar moves per chunk.
    while balances.peek().is_some() {
        let chunk: Vec<NewAccount> = balances
            .by_ref()
            .take(SEED_CHUNK)
            .map(NewAccount::with_balance)
            .collect();
        let n = repo::copy_accounts(&mut conn, &chunk)?;
        log::debug!("seed: copied {n} accounts");
        bar.inc(n as u64);
        for a in &chunk {
            list.row(out, a.id, a.balance)?;
        }
    }
    bar.finish_and_clear();
    list.finish(out)?;
    Ok(())
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

fn balances(url: &DbUrl, json: bool, out: &mut impl Write) -> Result<(), Error> {
    let mut conn = url.connect()?;
    let rows = repo::list(&mut conn)?;
    write_balances(rows, json, out)
}

/// `Balances at <time>:` and the accounts, as they arrive from the database.
fn write_balances(
    rows: impl Iterator<Item = diesel::QueryResult<Account>>,
    json: bool,
    out: &mut impl Write,
) -> Result<(), Error> {
    let header = format!(
        "Balances at {}:",
        Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
    );
    let mut list = AccountList::start(out, json, Some(&header))?;
    for row in rows {
        let a = row?;
        list.row(out, a.id, a.balance)?;
    }
    let count = list.finish(out)?;
    log::debug!("balances: {count} accounts");
    Ok(())
}

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
    error: String,
}

fn transfer_cmd(url: &DbUrl, args: &TransferArgs, out: &mut impl Write) -> Result<(), Error> {
    let t = NewTransfer {
        id: args.id.unwrap_or_else(Uuid::new_v4),
        from_id: args.from,
        to_id: args.to,
        amount: args.amount,
    };
    // Checked before connecting: bad input never reaches the database.
    transfer::validate(&t)?;
    let policy = args.run.policy();
    let session = Session::new(url.clone(), "bank").with_timeout(policy.timeout);
    let runner = Runner::new(session, args.run.mode(), policy);
    let receipt = match runner.run_guarded(&t) {
        Ok(receipt) => receipt,
        Err(e) => {
            if args.json {
                let outcome = match e {
                    TransferError::OutcomeUnknown { .. } => "unknown",
                    _ => "failed",
                };
                let error = e
                    .to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ");
                serde_json::to_writer(
                    &mut *out,
                    &TransferFailureJson {
                        id: t.id,
                        outcome,
                        error,
                    },
                )
                .map_err(io::Error::from)?;
                writeln!(out)?;
            }
            return Err(e.into());
        }
    };
    if args.json {
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
        writeln!(out)?;
    } else {
        writeln!(out, "{}", receipt_line(&receipt))?;
    }
    Ok(())
}

fn receipt_line(r: &Receipt) -> String {
    let t = &r.transfer;
    if r.already_applied {
        return format!(
            "transfer {} already exists: {} from {} to {} was applied earlier; nothing changed",
            t.id, t.amount, t.from_id, t.to_id
        );
    }
    let plural = if r.attempts == 1 { "" } else { "s" };
    format!(
        "transfer {}: moved {} from {} to {} ({} attempt{plural})",
        t.id, t.amount, t.from_id, t.to_id, r.attempts
    )
}

fn reset(url: &DbUrl, args: &ResetArgs, out: &mut impl Write) -> Result<(), Error> {
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
            writeln!(out, "nothing deleted")?;
            return Ok(());
        }
    }
    let mut conn = url.connect()?;
    let (accounts, transfers) = retry_transaction(&RetryPolicy::default(), || {
        conn.build_transaction()
            .serializable()
            .run(repo::delete_all)
    })?;
    log::debug!("reset: deleted {accounts} accounts and {transfers} transfers");
    writeln!(out, "deleted {accounts} accounts and {transfers} transfers")?;
    Ok(())
}

fn confirm(prompt: &str) -> Result<bool, Error> {
    eprint!("{prompt}");
    io::stderr().flush()?;
    let mut answer = String::new();
    io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

fn verify_cmd(url: &DbUrl, json: bool, out: &mut impl Write) -> Result<(), Error> {
    let mut conn = url.connect()?;
    let report = retry_transaction(&RetryPolicy::default(), || verify::verify(&mut conn))?;
    if json {
        serde_json::to_writer(&mut *out, &report).map_err(io::Error::from)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", report.render())?;
    }
    if report.ok {
        Ok(())
    } else {
        Err(Error::Verify {
            negative: report.negative_balances,
            mismatched: report.mismatched_accounts,
            total: report.total_balance,
            opening: report.total_opening_balance,
        })
    }
}

/// The tutorial's flow, cleaning up after itself: only the rows it created are removed, even
/// when a step fails halfway.
fn demo(url: &DbUrl, out: &mut impl Write) -> Result<(), Error> {
    let mut runner = Runner::new(
        Session::new(url.clone(), "bank-demo"),
        Mode::Transaction,
        RetryPolicy::default(),
    );
    let created: Vec<NewAccount> = TUTORIAL_BALANCES
        .into_iter()
        .map(NewAccount::with_balance)
        .collect();
    let ids: Vec<Uuid> = created.iter().map(|a| a.id).collect();
    let transfer_id = Uuid::new_v4();
    let flow = demo_flow(&mut runner, &created, transfer_id, out);
    let cleanup = demo_cleanup(&mut runner.session, &ids, transfer_id);
    flow?;
    let (accounts, transfers) = cleanup?;
    writeln!(
        out,
        "Removed the demo's {accounts} accounts and {transfers} transfer"
    )?;
    Ok(())
}

fn demo_flow(
    runner: &mut Runner,
    created: &[NewAccount],
    transfer_id: Uuid,
    out: &mut impl Write,
) -> Result<(), Error> {
    let conn = runner.session.conn()?;
    for account in created {
        repo::create(conn, account)?;
    }
    let [from, to] = [created[0].id, created[1].id];
    writeln!(out, "Created accounts {from} and {to}")?;
    print_demo_balances(conn, &[from, to], out)?;
    let t = NewTransfer {
        id: transfer_id,
        from_id: from,
        to_id: to,
        amount: DEMO_AMOUNT,
    };
    let receipt = runner.run(&t)?;
    writeln!(out, "{}", receipt_line(&receipt))?;
    print_demo_balances(runner.session.conn()?, &[from, to], out)?;
    Ok(())
}

fn print_demo_balances(
    conn: &mut PgConnection,
    ids: &[Uuid],
    out: &mut impl Write,
) -> Result<(), Error> {
    let accounts = repo::list_ids(conn, ids)?;
    write_balances(accounts.into_iter().map(Ok), false, out)
}

/// Deletes the demo's transfer (if it was made) and accounts; returns how many of each.
fn demo_cleanup(
    session: &mut Session,
    ids: &[Uuid],
    transfer_id: Uuid,
) -> Result<(usize, usize), Error> {
    let conn = session.conn()?;
    let result = conn.build_transaction().serializable().run(|conn| {
        let transfers = match repo::delete_transfer(conn, transfer_id) {
            Ok(()) => 1,
            Err(diesel::result::Error::NotFound) => 0,
            Err(e) => return Err(e),
        };
        let mut accounts = 0;
        for id in ids {
            match repo::delete(conn, *id) {
                Ok(()) => accounts += 1,
                Err(diesel::result::Error::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((accounts, transfers))
    })?;
    Ok(result)
}
