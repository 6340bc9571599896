//! The command line: clap types only. Doc comments are the help text.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

use crate::retry::RetryPolicy;
use crate::transfer::Mode;

/// Bank accounts in CockroachDB or PostgreSQL, with transfers that are applied exactly once.
#[derive(Debug, Parser)]
#[command(name = "bank", version, propagate_version = true)]
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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the tutorial's whole flow: create two accounts, show balances, transfer 100, show
    /// balances, remove what it created
    Demo,
    /// Create the schema: run the migrations that have not run yet (idempotent)
    Init,
    /// Create accounts: the tutorial's two (1000 and 250) by default
    Seed(SeedArgs),
    /// Move money between two accounts, exactly once
    Transfer(TransferArgs),
    /// List every account's balance, ordered by id
    Balances(JsonArg),
    /// Delete every account and transfer
    Reset(ResetArgs),
    /// Check, without changing anything, that no balance is negative and every balance agrees
    /// with the ledger
    Verify(JsonArg),
    /// Run random concurrent transfers and check the bank's invariants afterwards
    Workload(WorkloadArgs),
}

#[derive(Debug, Args)]
pub struct JsonArg {
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SeedArgs {
    /// Number of accounts to create [default: the tutorial's two accounts]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub accounts: Option<u64>,
    /// Opening balance of each account created with --accounts
    #[arg(long, value_name = "AMOUNT", default_value_t = 1000, value_parser = parse_balance, requires = "accounts")]
    pub balance: i64,
    /// Print the created accounts as a JSON array
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TransferArgs {
    /// Account to debit
    #[arg(long, value_name = "UUID")]
    pub from: Uuid,
    /// Account to credit
    #[arg(long, value_name = "UUID")]
    pub to: Uuid,
    /// Amount to move: a positive whole number
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = parse_amount)]
    pub amount: i64,
    /// Transfer id (idempotency key): running a transfer again with the same id applies it once
    /// [default: a random id]
    #[arg(long, value_name = "UUID")]
    pub id: Option<Uuid>,
    /// Print the result as JSON
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
}

/// How transfers run: the mode and the retry policy.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// How a transfer reaches the database
    #[arg(long, value_enum, default_value_t = Mode::Transaction)]
    pub mode: Mode,
    /// Retries after the first attempt before giving up
    #[arg(long, value_name = "N", default_value_t = 30, env = "BANK_MAX_RETRIES")]
    pub max_retries: u32,
    /// Backoff before the first retry; doubles with each retry (e.g. 2ms)
    #[arg(long, value_name = "DURATION", default_value = "2ms", value_parser = humantime::parse_duration, env = "BANK_RETRY_BASE")]
    pub retry_base: Duration,
    /// Longest backoff between two attempts (e.g. 1s)
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration, env = "BANK_RETRY_CAP")]
    pub retry_cap: Duration,
    /// Deadline for one transfer, all attempts included; one that may have reached COMMIT by
    /// then ends with an unknown outcome (exit 3), else as not applied (e.g. 30s, 500ms)
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_timeout, env = "BANK_TIMEOUT")]
    pub timeout: Duration,
}

impl RunArgs {
    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_retries.saturating_add(1),
            base: self.retry_base,
            cap: self.retry_cap.max(self.retry_base),
            timeout: self.timeout,
        }
    }
}

#[derive(Debug, Args)]
pub struct WorkloadArgs {
    /// Accounts to transfer between
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u64).range(2..=10_000_000))]
    pub accounts: u64,
    /// Use existing accounts (the first N by id) instead of creating new ones
    #[arg(long)]
    pub reuse_accounts: bool,
    /// Opening balance of each created account
    #[arg(long, value_name = "AMOUNT", default_value_t = 1000, value_parser = parse_balance)]
    pub balance: i64,
    /// Workers, each with its own connection
    #[arg(long, value_name = "C", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=512))]
    pub concurrency: u64,
    /// How long to run (e.g. 30s, 2m)
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, conflicts_with = "transfers", required_unless_present = "transfers")]
    pub duration: Option<Duration>,
    /// How many transfers to attempt in all
    #[arg(long, value_name = "T", value_parser = clap::value_parser!(u64).range(1..))]
    pub transfers: Option<u64>,
    /// Largest amount of one transfer (amounts are uniform in 1..=A)
    #[arg(long, value_name = "A", default_value_t = 100, value_parser = parse_amount)]
    pub max_amount: i64,
    /// Random seed, for a reproducible sequence of transfers per worker
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Print the final report as one JSON object
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub run: RunArgs,
}

/// A deadline: a positive duration.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be longer than 0".into());
    }
    Ok(d)
}

/// A transfer amount: a whole number from 1 to i64::MAX.
fn parse_amount(s: &str) -> Result<i64, String> {
    let n = parse_whole(s)?;
    if n <= 0 {
        return Err(format!("must be a positive whole number, got {s}"));
    }
    Ok(n)
}

/// An opening balance: a whole number from 0 to i64::MAX.
fn parse_balance(s: &str) -> Result<i64, String> {
    let n = parse_whole(s)?;
    if n < 0 {
        return Err(format!("must not be negative, got {s}"));
    }
    Ok(n)
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
    use clap::CommandFactory;

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
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
