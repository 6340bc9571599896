//! The command line: clap types only. Doc comments are the help text.

use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

use crate::error::Error;
use crate::retry::RetryPolicy;
use crate::transfer::Mode;
use crate::workload;

/// Bank accounts in CockroachDB or PostgreSQL, with transfers that are applied exactly once.
#[derive(Debug, Parser)]
#[command(name = "bank", version, propagate_version = true, after_long_help = AFTER_HELP)]
pub struct Cli {
    /// Database URL [default: DATABASE_URL from the environment or from .env]
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,

    /// Log to stderr: -v every attempt, retry, backoff and row count; -vv also the SQL
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

/// The exit codes other programs branch on, and the variables `bank` reads (shown by `bank
/// --help` and in the man page).
const AFTER_HELP: &str = "\
Exit status:
  0  success (a transfer applied, or already applied with the same details)
  1  failed: a transfer not applied (refused, not migrated, unreachable without --id); a
     file with lines refused or not applied (the others applied); verify or workload found
     a violation, or could not check
  2  bad usage or input: nothing was changed
  3  a transfer's outcome is unknown: run the same `bank transfer --id` (or file) again

Environment (also read from .env; the command line wins; set but empty is unset):
  DATABASE_URL       the database, when --database-url is not given
  BANK_TIMEOUT       --timeout of transfer, workload and demo (default 30s)
  BANK_READ_TIMEOUT  --timeout of reads, init, seed and reset, --check-timeout of workload (default 2min)
  BANK_MAX_RETRIES, BANK_RETRY_BASE, BANK_RETRY_CAP   the retry policy
  BANK_SEED_METHOD   seed --method (auto, copy, insert)
  NO_COLOR           no colour in help and logs";

/// The variables bank's flags default to (each `env = "BANK_…"` below; a test keeps the two in
/// step). Set but empty, each counts as not set, as `DATABASE_URL` does (`db::load_dotenv`):
/// `BANK_TIMEOUT=` was refused as "invalid value ''" where `DATABASE_URL=` was not.
pub const VARIABLES: [&str; 6] = [
    "BANK_TIMEOUT",
    "BANK_READ_TIMEOUT",
    "BANK_MAX_RETRIES",
    "BANK_RETRY_BASE",
    "BANK_RETRY_CAP",
    "BANK_SEED_METHOD",
];

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the tutorial's whole flow: create two accounts, show balances, transfer 100, show
    /// balances, remove what it created
    #[command(after_help = "Example:\n  bank demo")]
    Demo(DemoArgs),
    /// Create the schema: run the migrations that have not run yet (idempotent)
    #[command(after_help = "Example:\n  bank --database-url postgres://bank@localhost/bank init")]
    Init(InitArgs),
    /// Create accounts: the tutorial's two (1000 and 250) by default
    #[command(after_help = "Example:\n  bank seed --accounts 1000 --balance 500 --json")]
    Seed(SeedArgs),
    /// Move money between two accounts, exactly once; or apply a file of transfers (--file)
    #[command(
        after_help = "Example:\n  bank transfer --from 06bbabc7-736f-4f64-b8ff-46f84023f4f6 --to 991bfe5f-9a71-4cfb-8591-504ee5992c0a --amount 100 --id 11111111-1111-1111-1111-111111111111\n  bank transfer --file payroll.csv --json      # a file of transfers (CSV or JSON Lines)\n\nExit codes: 0 applied (or already applied), 1 failed and not applied, 2 bad input,\n3 outcome unknown: run the same command (same --id) again to settle it."
    )]
    Transfer(TransferArgs),
    /// List every account's balance, ordered by id (now, or as of a time)
    #[command(after_help = "Example:\n  bank balances --as-of 2026-11-24T10:00:00Z --json")]
    Balances(BalancesArgs),
    /// Delete every account and transfer
    #[command(after_help = "Example:\n  bank reset --yes")]
    Reset(ResetArgs),
    /// Check, without changing anything, that no balance is negative and every balance agrees
    /// with the ledger
    #[command(after_help = "Example:\n  bank verify --json")]
    Verify(JsonArg),
    /// An account's entries, newest first: version, time, transfer, counterparty, amount and
    /// balance after; the opening balance is version 0
    #[command(
        after_help = "Example:\n  bank history 06bbabc7-736f-4f64-b8ff-46f84023f4f6 --limit 20 --before 100"
    )]
    History(HistoryArgs),
    /// One transfer: its accounts, amount, time and both balances after (what to run after an
    /// unknown outcome)
    #[command(after_help = "Example:\n  bank lookup 11111111-1111-1111-1111-111111111111 --json")]
    Lookup(LookupArgs),
    /// Print a shell completion script (e.g. `bank completions bash > /etc/bash_completion.d/bank`)
    #[command(after_help = "Example:\n  bank completions zsh > ~/.zfunc/_bank")]
    Completions(CompletionsArgs),
    /// Print the man page in roff (e.g. `bank man > bank.1 && man ./bank.1`), or a command's
    /// (`bank man seed` prints bank-seed(1))
    #[command(after_help = "Example:\n  bank man > bank.1\n  bank man transfer > bank-transfer.1")]
    Man(ManArgs),
    /// Check the database before anything else: the engine and its version, the default
    /// isolation level, whether the schema is migrated, the connection settings in force (timeouts,
    /// TLS, keepalives, application name) and row counts; exits 1 if it cannot connect
    #[command(after_help = "Example:\n  bank doctor --json")]
    Doctor(JsonArg),
    /// Run random concurrent transfers and check the bank's invariants afterwards
    #[command(
        after_help = "Example:\n  bank workload --accounts 100 --concurrency 8 --duration 60s --readers 2 --histogram latency.hlog --report report.html"
    )]
    Workload(WorkloadArgs),
}

#[derive(Debug, Args)]
pub struct JsonArg {
    /// Print JSON
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub read: ReadArgs,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// The command whose page to print (bank's own page when none)
    #[arg(value_name = "COMMAND")]
    pub command: Option<String>,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// How long a read may go without an answer from the database: a frozen server (SIGSTOP, a VM
/// pause) answers nothing, and its kernel keeps the connection alive.
#[derive(Debug, Args)]
pub struct ReadArgs {
    /// Give up on the database after this long without an answer (e.g. 30s, 10min); a read
    /// that streams (balances, history) counts from its last row, one that does not (verify) from
    /// its start: verify took 4.7 s over 1.77 million transfers
    #[arg(long, value_name = "DURATION", default_value = "2min", allow_hyphen_values = true, value_parser = parse_timeout, env = "BANK_READ_TIMEOUT")]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct BalancesArgs {
    /// Balances as they were at this time (RFC 3339, e.g. 2026-11-24T10:00:00Z): accounts
    /// created by then, each with its balance after its last entry by then
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub as_of: Option<DateTime<Utc>>,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub read: ReadArgs,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The account
    #[arg(value_name = "ACCOUNT", value_parser = parse_uuid)]
    pub account: Uuid,
    /// At most this many entries
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = whole::<1, { i64::MAX as u64 }>)]
    pub limit: Option<u64>,
    /// Only entries with a version below this one (the next page starts below the last
    /// version shown)
    #[arg(long, value_name = "VERSION", allow_negative_numbers = true, value_parser = whole::<0, { i64::MAX as u64 }>)]
    pub before: Option<u64>,
    /// Print a JSON array
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub read: ReadArgs,
}

#[derive(Debug, Args)]
pub struct LookupArgs {
    /// The transfer's id
    #[arg(value_name = "TRANSFER_ID", value_parser = parse_uuid)]
    pub id: Uuid,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub read: ReadArgs,
}

#[derive(Debug, Args)]
pub struct SeedArgs {
    /// Number of accounts to create [default: the tutorial's two accounts]
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = whole::<1, { u64::MAX }>)]
    pub accounts: Option<u64>,
    /// Opening balance of each account created with --accounts
    #[arg(long, value_name = "AMOUNT", default_value_t = 1000, allow_negative_numbers = true, value_parser = parse_balance, requires = "accounts")]
    pub balance: i64,
    /// Print the created accounts as a JSON array
    #[arg(long)]
    pub json: bool,
    /// How to load the accounts: COPY, falling back to multi-row INSERTs when the server refuses
    /// COPY (CockroachDB lets only `admin` members run it), or either one forced
    #[arg(long, value_enum, value_name = "METHOD", default_value_t = SeedMethod::Auto, env = "BANK_SEED_METHOD")]
    pub method: SeedMethod,
    /// Give up on the database after this long without an answer (a frozen server, a lock held
    /// elsewhere), saying how far the seed got (e.g. 30s, 10min)
    #[arg(long, value_name = "DURATION", default_value = "2min", allow_hyphen_values = true, value_parser = parse_timeout, env = "BANK_READ_TIMEOUT")]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Give up after this long without progress (a frozen server, a lock held elsewhere that its
    /// migration needs); the migrations already applied stay (e.g. 30s, 10min)
    #[arg(long, value_name = "DURATION", default_value = "2min", allow_hyphen_values = true, value_parser = parse_timeout, env = "BANK_READ_TIMEOUT")]
    pub timeout: Duration,
}

/// `seed --method` (`BANK_SEED_METHOD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeedMethod {
    /// COPY, and INSERT if COPY is refused for lack of privilege
    Auto,
    /// COPY only
    Copy,
    /// Multi-row INSERTs only (at most 65,535 bind parameters each)
    Insert,
}

/// The name `--method` takes, for logs.
impl std::fmt::Display for SeedMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum;
        match self.to_possible_value() {
            Some(v) => f.write_str(v.get_name()),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Args)]
pub struct TransferArgs {
    /// Account to debit
    #[arg(long, value_name = "UUID", value_parser = parse_uuid, required_unless_present = "file")]
    pub from: Option<Uuid>,
    /// Account to credit
    #[arg(long, value_name = "UUID", value_parser = parse_uuid, required_unless_present = "file")]
    pub to: Option<Uuid>,
    /// Amount to move: a positive whole number
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = parse_amount, required_unless_present = "file")]
    pub amount: Option<i64>,
    /// Transfer id (idempotency key): running a transfer again with the same id applies it once
    /// [default: a random id]
    #[arg(long, value_name = "UUID", value_parser = parse_uuid)]
    pub id: Option<Uuid>,
    /// Apply a file of transfers (`-`: standard input), CSV with the header id,from,to,amount
    /// or JSON Lines; each line gets its own outcome, exactly as if applied one at a time in file
    /// order; a rerun of the same file applies nothing twice
    #[arg(long, value_name = "PATH", conflicts_with_all = ["from", "to", "amount", "id"])]
    pub file: Option<std::path::PathBuf>,
    /// Transfers per statement with --file [default: 1000]
    // An Option, so that `--batch` on one transfer can be refused (commands/transfer.rs).
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = whole::<1, 10_000>)]
    pub batch: Option<u64>,
    /// Format of --file [default: from its extension (.csv; .jsonl, .ndjson or .json for JSON
    /// Lines; in any case), else from its first line]
    #[arg(long, value_enum)]
    pub format: Option<crate::batch::Format>,
    /// Connections applying --file at once, each a group of lines that shares no account or id
    /// with the others [default: 2; 1 with --batch-isolation server-default on a PostgreSQL
    /// whose default isolation is SERIALIZABLE, where concurrent groups abort each other]
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = whole::<1, 64>)]
    pub connections: Option<u64>,
    /// Isolation level of --file's transactions; each locks every account it reads first, so
    /// outcomes are the same at either [default: read-committed]
    #[arg(long, value_enum, value_name = "LEVEL")]
    pub batch_isolation: Option<crate::batch::Isolation>,
    /// Print the result as JSON (with --file: one JSON object per line of the file)
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Args)]
pub struct ResetArgs {
    /// Do not ask for confirmation (required when stdin is not a terminal)
    #[arg(long)]
    pub yes: bool,
    /// Give up on the database after this long without an answer (a frozen server), saying
    /// how far the reset got (e.g. 30s, 10min)
    #[arg(long, value_name = "DURATION", default_value = "2min", allow_hyphen_values = true, value_parser = parse_timeout, env = "BANK_READ_TIMEOUT")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Deadline for the demo's transfer, and how long any other step may go without an answer
    /// from the database (a frozen server) before the demo gives up and names what it left
    #[arg(long, value_name = "DURATION", default_value = "30s", allow_hyphen_values = true, value_parser = parse_timeout, env = "BANK_TIMEOUT")]
    pub timeout: Duration,
}

/// How transfers run: the mode and the retry policy.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// How a transfer reaches the database
    #[arg(long, value_enum, default_value_t = ModeArg::Transaction)]
    pub mode: ModeArg,
    /// Retries after the first attempt before giving up
    #[arg(long, value_name = "N", default_value_t = 30, env = "BANK_MAX_RETRIES", allow_negative_numbers = true, value_parser = whole::<0, { u32::MAX as u64 }>)]
    pub max_retries: u64,
    /// Backoff before the first retry; doubles with each retry (e.g. 2ms)
    #[arg(long, value_name = "DURATION", default_value = "2ms", allow_hyphen_values = true, value_parser = parse_backoff, env = "BANK_RETRY_BASE")]
    pub retry_base: Duration,
    /// Longest backoff between two attempts (e.g. 1s)
    #[arg(long, value_name = "DURATION", default_value = "1s", allow_hyphen_values = true, value_parser = parse_duration, env = "BANK_RETRY_CAP")]
    pub retry_cap: Duration,
    /// Deadline for one transfer, all attempts included; one that may have reached COMMIT by
    /// then ends with an unknown outcome (exit 3), else as not applied (e.g. 30s, 500ms)
    #[arg(long, value_name = "DURATION", default_value = "30s", allow_hyphen_values = true, value_parser = parse_timeout, env = "BANK_TIMEOUT")]
    pub timeout: Duration,
    /// CockroachDB only: make the server fail statements in explicit transactions with 40001
    /// (`inject_retry_errors_enabled`), to watch the retry loop work; refused on PostgreSQL
    #[arg(long)]
    pub inject_retries: bool,
}

/// `--mode`: the command line's names for `transfer::Mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// BEGIN ISOLATION LEVEL SERIALIZABLE; the transfer statement; COMMIT
    Transaction,
    /// The transfer statement alone, as an implicit transaction: one round trip
    SingleStatement,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Transaction => Mode::Transaction,
            ModeArg::SingleStatement => Mode::SingleStatement,
        }
    }
}

impl RunArgs {
    pub fn mode(&self) -> Mode {
        self.mode.into()
    }

    /// Refuses a first backoff longer than the longest (`--retry-base` above `--retry-cap`, from
    /// the command line, the environment or the defaults): the cap was raised to it, silently,
    /// and the user's limit did not hold.
    pub fn check(&self) -> Result<(), Error> {
        if self.retry_base > self.retry_cap {
            return Err(Error::Usage(format!(
                "--retry-base {:?} is longer than --retry-cap {}, the longest backoff (each from \
                 its flag, else BANK_RETRY_BASE or BANK_RETRY_CAP, else its default): lower the \
                 one or raise the other",
                self.retry_base,
                // As typed: `0s`, which Debug shows as "0ns" (found by a helper).
                match self.retry_cap.is_zero() {
                    true => "0s".to_string(),
                    false => format!("{:?}", self.retry_cap),
                }
            )));
        }
        Ok(())
    }

    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: u32::try_from(self.max_retries)
                .unwrap_or(u32::MAX)
                .saturating_add(1),
            base: self.retry_base,
            cap: self.retry_cap,
            timeout: self.timeout,
        }
    }
}

#[derive(Debug, Args)]
// One of --duration and --transfers: an error without either names both.
#[command(group(clap::ArgGroup::new("length").required(true).multiple(false)))]
pub struct WorkloadArgs {
    /// Accounts to transfer between
    #[arg(long, value_name = "N", default_value_t = 100, allow_negative_numbers = true, value_parser = whole::<2, 10_000_000>)]
    pub accounts: u64,
    /// Use existing accounts (the first N by id) instead of creating new ones; with fewer than N,
    /// those (and a warning)
    #[arg(long)]
    pub reuse_accounts: bool,
    /// Opening balance of each created account
    #[arg(long, value_name = "AMOUNT", default_value_t = 1000, allow_negative_numbers = true, value_parser = parse_balance, conflicts_with = "reuse_accounts")]
    pub balance: i64,
    /// Workers, each with its own connection
    #[arg(long, value_name = "C", default_value_t = 8, allow_negative_numbers = true, value_parser = whole::<1, 512>)]
    pub concurrency: u64,
    /// How long to run (e.g. 30s, 2m)
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true, value_parser = parse_run_duration, group = "length")]
    pub duration: Option<Duration>,
    /// How many transfers to attempt in all
    #[arg(long, value_name = "T", allow_negative_numbers = true, value_parser = whole::<1, { u64::MAX }>, group = "length")]
    pub transfers: Option<u64>,
    /// Largest amount of one transfer (amounts are uniform in 1..=A)
    #[arg(long, value_name = "A", default_value_t = 100, allow_negative_numbers = true, value_parser = parse_amount)]
    pub max_amount: i64,
    /// Random seed, for a reproducible sequence of transfers per worker
    #[arg(long, value_name = "S", allow_negative_numbers = true, value_parser = whole::<0, { u64::MAX }>)]
    pub seed: Option<u64>,
    /// Print the final report as one JSON object
    #[arg(long)]
    pub json: bool,
    /// How often to show progress on stderr: a live line on a terminal, else one table line in
    /// `cockroach workload`'s layout (e.g. 1s, 500ms)
    #[arg(long, value_name = "DURATION", default_value = "1s", allow_hyphen_values = true, value_parser = parse_timeout)]
    pub display_every: Duration,
    /// Extra workers that read every balance in one snapshot, over and over: each read's total
    /// must be the opening total (Jepsen's bank read)
    #[arg(long, value_name = "N", default_value_t = 0, allow_negative_numbers = true, value_parser = whole::<0, 512>)]
    pub readers: u64,
    /// Give up on the final check (a read of every balance and the whole ledger) after this long
    /// without an answer, and on a step of the setup (its accounts, their totals) after this long
    /// or --timeout, whichever is longer; not the transfer --timeout alone, as the reads grow
    /// with the ledger
    #[arg(long, value_name = "DURATION", default_value = "2min", allow_hyphen_values = true, value_parser = parse_timeout, env = "BANK_READ_TIMEOUT")]
    pub check_timeout: std::time::Duration,
    /// Write each interval's latency histogram to FILE in HdrHistogram's interval-log format
    /// (microseconds; HdrHistogram's plotters read it). FILE is replaced once the run is over;
    /// a run that does not start leaves it as it was
    #[arg(long, value_name = "FILE")]
    pub histogram: Option<std::path::PathBuf>,
    /// Write a self-contained HTML report to FILE: transfers/s, latency and retries by cause
    /// per second, the readers' totals, the seconds of lost connections shaded, the final report.
    /// FILE is replaced once the run is over; a run that does not start leaves it as it was
    #[arg(long, value_name = "FILE")]
    pub report: Option<std::path::PathBuf>,
    /// Each worker applies N random transfers at a time, through the chunk statement of
    /// `transfer --file` (latency is then per batch)
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = whole::<1, 10_000>)]
    pub batch: Option<u64>,
    /// Isolation level of --batch's transactions, as `transfer --file --batch-isolation`
    /// [default: read-committed]
    #[arg(long, value_enum, value_name = "LEVEL")]
    pub batch_isolation: Option<crate::batch::Isolation>,
    #[command(flatten)]
    pub run: RunArgs,
}

impl WorkloadArgs {
    pub fn config(&self) -> workload::Config {
        workload::Config {
            accounts: self.accounts,
            reuse_accounts: self.reuse_accounts,
            balance: self.balance,
            concurrency: self.concurrency,
            duration: self.duration,
            transfers: self.transfers,
            max_amount: self.max_amount,
            seed: self.seed,
            mode: self.run.mode(),
            policy: self.run.policy(),
            json: self.json,
            display_every: self.display_every,
            readers: self.readers,
            check_timeout: self.check_timeout,
            histogram: self.histogram.clone(),
            report: self.report.clone(),
            batch: self.batch,
            batch_isolation: self.batch_isolation,
        }
    }
}

/// A time in RFC 3339, as the database takes it: to the nearest microsecond, a leap second
/// (`:60`) the next minute's first. The header echoed what was typed (`03:00:60Z`, nanoseconds)
/// while the balances were those of the time the database read (a helper playing a new user).
/// PostgreSQL rounds a finer time (`59.9999999` is the next minute's first microsecond), where
/// cutting the nanoseconds off read balances a microsecond earlier than `psql` does (a
/// reviewer's find).
fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    let t = DateTime::parse_from_rfc3339(s.trim()).map_err(|e| {
        format!(
            "must be a time in RFC 3339 such as 2026-11-24T10:00:00Z ({})",
            what_the_time_lacks(s.trim()).map_or_else(|| e.to_string(), str::to_string)
        )
    })?;
    let up = i64::from(t.timestamp_subsec_nanos() % 1_000 >= 500);
    let micros = t.timestamp_micros().checked_add(up);
    micros
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(|| {
            format!(
                "must be a time between the years 1 and 9999, got {}",
                s.trim()
            )
        })
}

/// What a time refused as RFC 3339 lacks when it is a local time or a date alone, which chrono
/// called "premature end of input" (a helper playing a new user).
fn what_the_time_lacks(s: &str) -> Option<&'static str> {
    use chrono::{NaiveDate, NaiveDateTime};
    let local = [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dt%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
    ];
    if local
        .iter()
        .any(|f| NaiveDateTime::parse_from_str(s, f).is_ok())
    {
        return Some("it has no time zone: add Z for UTC or an offset such as +01:00");
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .is_ok()
        .then_some("it is a date alone: add a time and a zone, as in 2026-11-24T00:00:00Z")
}

/// The longest duration any option takes. Deadlines are added to the present and to a grace
/// period: near `Duration::MAX` that overflowed, a panic after the work was done.
/// A leap year's days: a year as humantime counts it (`1y`, 365.25 days) is within it.
const LONGEST: Duration = Duration::from_secs(366 * 24 * 3600);

/// A duration ("250ms", "2min", "1h 30m"), at most `LONGEST`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.trim_start().starts_with('-') {
        return Err(format!("must not be negative, got {}", s.trim()));
    }
    // humantime reads "M" as months and "m" as minutes: `--timeout 1M` was a month's deadline,
    // where `30S` is refused (a helper playing a new user). The one unit told apart by its case
    // alone is refused, with what to write.
    if months_as_m(s) {
        return Err(format!(
            "'M' means months here, got {}: write minutes as m or min (as in 1m or 2min), or \
             months as month",
            s.trim()
        ));
    }
    // humantime's own words ("expected number at 0", its list of units "and few variations")
    // name its parser, not what to type (found by a helper playing a new user).
    let d = humantime::parse_duration(s).map_err(|_| {
        "not a duration: a number and a unit, as in 500ms, 5s, 2min or 1h 30m".to_string()
    })?;
    if d > LONGEST {
        return Err(format!("must be at most 366 days, got {}", s.trim()));
    }
    Ok(d)
}

/// Whether a duration has humantime's unit `M` (months), which differs from `m` (minutes) by
/// its case alone.
fn months_as_m(s: &str) -> bool {
    s.split(|c: char| c.is_ascii_digit() || c.is_whitespace() || c == '.')
        .any(|unit| unit == "M")
}

/// The first backoff: at least a millisecond. Nothing retried a refused connection in a tight
/// loop (157,359 attempts in 2 s against a closed port).
fn parse_backoff(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(1) {
        return Err(format!("must be at least 1ms, got {}", s.trim()));
    }
    Ok(d)
}

/// A run's length: longer than nothing (a workload of no time created its accounts, ran nothing
/// and said ok).
fn parse_run_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be longer than 0".into());
    }
    Ok(d)
}

/// A UUID, or a reason that says one was expected: the uuid crate's own ("invalid length:
/// found 1") did not say what the value should have been.
fn parse_uuid(s: &str) -> Result<Uuid, String> {
    Uuid::parse_str(s.trim()).map_err(|e| {
        format!("not a UUID ({e}); one looks like 06bbabc7-736f-4f64-b8ff-46f84023f4f6")
    })
}

/// A deadline: a positive duration.
pub(crate) fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be longer than 0".into());
    }
    // The deadlines go to the server as whole milliseconds: below one, nothing was attempted.
    if d < Duration::from_millis(1) {
        return Err(format!("must be at least 1ms, got {}", s.trim()));
    }
    Ok(d)
}

/// A count: a whole number from MIN to MAX, with a message that says so ("must be at least 1",
/// not clap's "0 is not in 1..18446744073709551615").
fn whole<const MIN: u64, const MAX: u64>(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.strip_prefix('+').unwrap_or(t);
    let negative = digits
        .strip_prefix('-')
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
    let bound = match (MIN, MAX) {
        (min, u64::MAX) => format!("at least {min}"),
        (0, max) => format!("at most {max}"),
        (min, max) => format!("from {min} to {max}"),
    };
    if negative {
        // "at most 4294967295, got -1" named the bound that was kept.
        let bound = match MAX {
            u64::MAX => format!("at least {MIN}"),
            max => format!("from {MIN} to {max}"),
        };
        return Err(format!("must be a whole number {bound}, got {s}"));
    }
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("must be a whole number, got '{s}'"));
    }
    match digits.parse::<u64>() {
        Ok(n) if (MIN..=MAX).contains(&n) => Ok(n),
        Ok(_) => Err(format!("must be {bound}, got {s}")),
        // Past u64: "must be at least 1" said the opposite of what was wrong.
        Err(_) => Err(format!("is too large (at most {MAX}), got {s}")),
    }
}

/// A transfer amount: a whole number from 1 to i64::MAX. Negative is said as such however
/// large (past i64::MIN it was "out of range (at most …)", where a file's line says "must be
/// positive").
fn parse_amount(s: &str) -> Result<i64, String> {
    match parse_whole(s) {
        Ok(n) if n > 0 => Ok(n),
        Ok(_) => Err(format!("must be a positive whole number, got {s}")),
        Err(_) if is_negative(s) => Err(format!("must be a positive whole number, got {s}")),
        Err(e) => Err(e),
    }
}

/// An opening balance: a whole number from 0 to i64::MAX.
fn parse_balance(s: &str) -> Result<i64, String> {
    match parse_whole(s) {
        Ok(n) if n >= 0 => Ok(n),
        Ok(_) => Err(format!("must not be negative, got {s}")),
        Err(_) if is_negative(s) => Err(format!("must not be negative, got {s}")),
        Err(e) => Err(e),
    }
}

/// `-` and digits only.
fn is_negative(s: &str) -> bool {
    s.trim()
        .strip_prefix('-')
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

fn parse_whole(s: &str) -> Result<i64, String> {
    let t = s.trim();
    let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("must be a whole number, got '{s}'"));
    }
    t.parse::<i64>()
        .map_err(|_| format!("{s} is out of range (at most {})", i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::SecondsFormat;
    use clap::CommandFactory;

    /// `VARIABLES` names every variable a flag defaults to, and no other.
    #[test]
    fn the_variables_are_those_the_flags_read() {
        let cli = Cli::command();
        let mut read: Vec<String> = std::iter::once(&cli)
            .chain(cli.get_subcommands())
            .flat_map(|c| c.get_arguments())
            .filter_map(|a| a.get_env())
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        read.sort();
        read.dedup();
        let mut named: Vec<String> = VARIABLES.iter().map(|v| v.to_string()).collect();
        named.sort();
        assert_eq!(read, named);
    }

    #[test]
    fn a_time_is_taken_as_the_database_takes_it() {
        let at = |s: &str| parse_time(s).map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true));
        assert_eq!(
            at("2026-12-07T03:00:60Z"),
            Ok("2026-12-07T03:01:00Z".into())
        );
        // Rounded, as PostgreSQL reads the same text.
        assert_eq!(
            at("2026-12-07T03:00:59.123456789Z"),
            Ok("2026-12-07T03:00:59.123457Z".into())
        );
        assert_eq!(
            at("2026-12-07T03:00:59.1234564Z"),
            Ok("2026-12-07T03:00:59.123456Z".into())
        );
        assert_eq!(
            at("2026-12-07T03:00:59.9999999Z"),
            Ok("2026-12-07T03:01:00Z".into())
        );
        assert_eq!(
            at("2026-12-07T03:00:60.9999996Z"),
            Ok("2026-12-07T03:01:01Z".into())
        );
        assert_eq!(
            at("1969-12-31T23:59:59.9999996Z"),
            Ok("1970-01-01T00:00:00Z".into())
        );
        assert_eq!(
            at(" 2026-12-07T05:00:00+02:00 "),
            Ok("2026-12-07T03:00:00Z".into())
        );
        assert!(at("2026-12-07").is_err());
    }

    /// A backoff of nothing retried a refused connection in a tight loop: 157,359 attempts in
    /// 2 s against a closed port (found by a reviewer).
    #[test]
    fn months_written_m_are_refused() {
        for s in ["1M", "1h 2M", " 3M "] {
            let e = parse_timeout(s).expect_err(s);
            assert!(e.contains("'M' means months"), "{s}: {e}");
        }
        for (s, secs) in [("1m", 60), ("2min", 120), ("1h 30m", 5400), ("7d", 604_800)] {
            assert_eq!(parse_timeout(s), Ok(Duration::from_secs(secs)), "{s}");
        }
        assert!(parse_timeout("1month").is_ok());
        assert!(parse_timeout("1y").is_ok());
    }

    #[test]
    fn the_first_backoff_is_at_least_a_millisecond() {
        let args = |base: &str| {
            let (a, b) = (
                "00000000-0000-4000-8000-000000000001",
                "00000000-0000-4000-8000-000000000002",
            );
            let argv = ["bank", "transfer", "--from", a, "--to", b, "--amount", "1"];
            Cli::try_parse_from(argv.into_iter().chain(["--retry-base", base]))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        for base in ["0s", "1ns", "999us"] {
            let e = args(base).err().unwrap_or_default();
            assert!(e.contains("at least 1ms"), "{base}: {e}");
        }
        assert_eq!(args("1ms"), Ok(()));
    }

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_shows_an_example() {
        let mut cli = Cli::command();
        for sub in cli.get_subcommands_mut() {
            let help = sub.render_help().to_string();
            assert!(
                help.contains("Example:\n  bank "),
                "{}: {help}",
                sub.get_name()
            );
        }
    }

    #[test]
    fn counts_say_their_bounds() {
        assert_eq!(whole::<1, { u64::MAX }>("3"), Ok(3));
        assert_eq!(
            whole::<1, { u64::MAX }>("0"),
            Err("must be at least 1, got 0".into())
        );
        assert_eq!(
            whole::<1, { u64::MAX }>("-5"),
            Err("must be a whole number at least 1, got -5".into())
        );
        assert_eq!(
            whole::<2, 10>("11"),
            Err("must be from 2 to 10, got 11".into())
        );
        assert_eq!(
            whole::<0, 7>("x"),
            Err("must be a whole number, got 'x'".into())
        );
        assert_eq!(
            whole::<1, { u64::MAX }>("18446744073709551616"),
            Err("is too large (at most 18446744073709551615), got 18446744073709551616".into())
        );
    }

    #[test]
    fn amounts_must_be_positive_whole_numbers_within_i64() {
        assert_eq!(parse_amount("100"), Ok(100));
        assert!(parse_amount("0").is_err());
        assert!(parse_amount("-5").is_err());
        assert!(parse_amount("ten").is_err());
        assert!(parse_amount("1.5").is_err());
        assert!(parse_amount("9223372036854775808").is_err());
        assert_eq!(parse_amount("9223372036854775807"), Ok(i64::MAX));
        // Past i64::MIN: negative still, as a file's line says (found by a helper playing a new
        // user); and a bounded count's negative names both bounds.
        assert_eq!(
            parse_amount("-9223372036854775809"),
            Err("must be a positive whole number, got -9223372036854775809".into())
        );
        assert_eq!(
            parse_balance("-9223372036854775809"),
            Err("must not be negative, got -9223372036854775809".into())
        );
        assert_eq!(
            whole::<0, 10>("-1"),
            Err("must be a whole number from 0 to 10, got -1".into())
        );
    }

    #[test]
    fn retry_flags_make_the_policy() {
        let cli = Cli::try_parse_from([
            "bank",
            "transfer",
            "--from",
            "00000000-0000-0000-0000-000000000001",
            "--to",
            "00000000-0000-0000-0000-000000000002",
            "--amount",
            "5",
            "--max-retries",
            "20",
            "--retry-base",
            "5ms",
            "--retry-cap",
            "2s",
        ])
        .map_err(|e| e.to_string());
        let Ok(Cli {
            command: Command::Transfer(t),
            ..
        }) = cli
        else {
            panic!("did not parse: {cli:?}");
        };
        let p = t.run.policy();
        assert_eq!(p.max_attempts, 21);
        assert_eq!(p.base, Duration::from_millis(5));
        assert_eq!(p.cap, Duration::from_secs(2));
    }
}
