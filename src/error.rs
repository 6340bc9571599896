//! Error policy: library code returns these typed errors and never prints or exits. Each message
//! carries its context (which account, which URL, how many attempts) and never a password: URLs
//! appear only through `DbUrl`'s redacting `Display`. `main` prints the chain once, on one line,
//! and maps the error to an exit code with `Error::exit_code`: 2 for bad usage or input caught
//! before the database is touched, 3 for a transfer whose outcome is unknown (a rerun with the
//! same id settles it), 1 for every other failure.

use thiserror::Error;
use uuid::Uuid;

use crate::exit_code::ExitCode;

/// Whether a database error is a missing privilege: PostgreSQL says "permission denied for table
/// accounts", CockroachDB "user bank does not have SELECT privilege on relation accounts".
pub fn is_privilege_denied(message: &str) -> bool {
    message.contains("permission denied")
        || (message.contains("does not have") && message.contains(" privilege on "))
}

/// The server (or a pooler in front of it) refused a login for want of a connection slot.
pub fn is_connection_limit(message: &str) -> bool {
    const LIMIT: [&str; 4] = [
        "too many connections",
        "too many clients",
        "connection slots are reserved",
        "no more connections allowed",
    ];
    let m = message.to_ascii_lowercase();
    LIMIT.iter().any(|p| m.contains(p))
}

/// Whether a database error says the server is out of disk or memory (SQLSTATE 53100, 53200, or
/// an I/O error writing a file): no statement's line is at fault, and none will pass until an
/// operator acts. Diesel exposes no SQLSTATE, so the words decide: PostgreSQL's ("could not
/// extend file …: No space left on device", "out of memory") and CockroachDB's ("disk full",
/// "insufficient disk space", "memory budget exceeded").
pub fn is_out_of_resources(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "no space left on device",
        "could not extend file",
        "disk full",
        "insufficient disk space",
        "disk quota exceeded",
        "out of memory",
        // 53200 of the lock tables (predicate locks at SERIALIZABLE, max_locks_per_transaction):
        // each line of a file met it in turn, refused one by one (found by a fault-injecting
        // helper).
        "out of shared memory",
        "memory budget exceeded",
    ]
    .iter()
    .any(|w| m.contains(w))
}

/// Which of bank's tables a missing-privilege error names, if one (`is_privilege_denied`).
pub fn table_denied(message: &str) -> Option<&'static str> {
    if !is_privilege_denied(message) {
        return None;
    }
    ["accounts", "transfers", "transfer_claims"]
        .into_iter()
        .find(|t| {
            message.contains(&format!("for table {t}"))
                || message.contains(&format!("on relation {t}"))
                || message.contains(&format!(".{t}"))
        })
}

fn libpq_variables_hint(set: &[&str]) -> String {
    match set.is_empty() {
        true => String::new(),
        false => format!(
            "; {} {} set: --database-url postgresql:/// connects with libpq's defaults, \
             which they give",
            set.join(", "),
            if set.len() == 1 { "is" } else { "are" }
        ),
    }
}

/// Where the database is: problems found before connecting.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error(
        "no database URL: pass --database-url URL or set DATABASE_URL (in the environment or in \
         .env){}",
        libpq_variables_hint(libpq)
    )]
    MissingUrl {
        /// libpq's variables that are set (`PGHOST`, …): `postgresql:///` would use them.
        libpq: Vec<&'static str>,
    },
    /// `.env`'s `DATABASE_URL` is made of variables that are not set (`${DB_URL}`), replaced by
    /// nothing as a shell does.
    #[error(
        "no database URL: DATABASE_URL in .env refers to a variable that is not set, which .env \
         replaces by nothing, as a shell does: set it in the environment, or write the URL there \
         (in single quotes if it holds a '$')"
    )]
    DotEnvUrlEmpty,
    #[error("malformed database URL {url}: {reason}")]
    MalformedUrl { url: String, reason: String },
    /// `path` is the `.env` found (in the working directory or a parent).
    #[error("cannot read {path}: {why}")]
    DotEnv { path: String, why: String },
}

/// Why the schema is not there: never migrated, or migrated in schemas that this connection's
/// search_path does not name, where `bank init` is the wrong advice (it fails with "no schema
/// has been selected to create in", or builds a second, empty bank).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unmigrated {
    /// Schemas off the search_path that hold bank's tables (none: never migrated).
    pub elsewhere: Vec<String>,
    /// The connection's `search_path`, as the server shows it.
    pub search_path: String,
    /// Where `init` would create bank's tables (`current_schema()`), unless that is nowhere or
    /// the session's temporary schema: a second bank there may be what is wanted (a tenant).
    /// (A thin `Box<String>`: every error carries this struct, which clippy's `result_large_err`
    /// bounds.)
    pub creation_schema: Option<Box<String>>,
    /// Migrated, but some of bank's tables are found first in another schema than bank's (the
    /// schema named here), each as "accounts in schema other" (`db::shadowed_tables`).
    pub shadowed: Option<Box<(String, Vec<String>)>>,
    /// A statement met a table or column of bank's missing (the command's own statement, after
    /// the migrations' check passed or could not be made).
    pub missing: Option<Box<Missing>>,
    /// Never migrated, and relations bank's migrations would create are there already (another
    /// application's): `init` refuses, so it is no advice.
    pub in_the_way: Vec<String>,
    /// Migrated, but bank's tables were changed since in ways its promise cannot survive (a
    /// rule, a key made deferrable, a trigger on the claims, UNLOGGED), each with how to undo it
    /// (`db::unsafe_changes`).
    pub unsafe_changes: Option<Box<Vec<String>>>,
    /// Some of bank's migrations ran, not all (`db::require_migrated`): a binary upgraded before
    /// `bank init`, or the newest migrations reverted to put an older one back. The ledger is
    /// there all the same.
    pub partly_migrated: bool,
}

impl Unmigrated {
    /// Whether bank's ledger is there, only not usable on this connection: its tables changed
    /// in ways bank refuses, one found first in another schema, all of them off the
    /// search_path, or a part of them missing since the migrations ran. An earlier run may then
    /// have applied a given id, and a refusal must not read as "not applied": "failed" (exit 1)
    /// was said of ids the ledger held, for a role's search_path naming another application's
    /// `accounts` first or no schema of bank's, for a claims table renamed, and for the record
    /// of bank's migrations dropped (found by a fault-injecting helper), and for a database whose
    /// newest migrations had not run (a rerun of an old binary's ids after an upgrade, before
    /// `bank init`). Only a database never migrated holds no ledger.
    pub fn ledger_may_hold_ids(&self) -> bool {
        self.partly_migrated
            || self.unsafe_changes.is_some()
            || self.shadowed.is_some()
            || !self.elsewhere.is_empty()
            || self.missing.is_some()
            || self.record_lost()
    }

    /// bank's own tables are here, but not the record of its migrations: `transfer_claims` is
    /// named for bank alone, and its migration came after the ledger's.
    fn record_lost(&self) -> bool {
        is_bank_s_own(self.in_the_way.iter().map(String::as_str))
    }
}

/// Of relations bank's migrations would create, found already there (`db::in_the_way`): whether
/// they are bank's own, left without the record of its migrations. `transfer_claims` is named
/// for bank alone, and its migration came after the ledger's.
pub fn is_bank_s_own<'a>(mut in_the_way: impl Iterator<Item = &'a str>) -> bool {
    in_the_way.any(|n| n == "transfer_claims")
}

/// What to do about bank's own tables found without the record of its migrations (a dump of the
/// tables alone restored, that record dropped): "give bank a database of its own" was said of
/// its ledger (found by a fault-injecting helper).
pub const RECORD_LOST: &str =
    "these are bank's own tables, without the record of its migrations (table \
     __diesel_schema_migrations, dropped or left out of a dump); restore that table (from the \
     backup, or the database the tables came from), so that bank and `bank init` see the schema \
     as migrated";

/// What a statement found missing (`Unmigrated::missing`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Missing {
    /// The server's words.
    pub words: String,
    /// bank's tables found in schemas the search_path does not name, each as "accounts in
    /// schema other" (`db::tables_off_the_search_path`).
    pub moved: Vec<String>,
}

impl std::fmt::Display for Unmigrated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(changes) = self.unsafe_changes.as_deref() {
            return write!(
                f,
                "bank's tables were changed in a way that could apply a transfer twice or report \
                 it wrongly, so nothing was sent: {}",
                changes.join("; ")
            );
        }
        if let Some((bank, shadowed)) = self.shadowed.as_deref() {
            return write!(
                f,
                "bank's tables are in schema {bank}, but this connection's search_path ({}) \
                 finds {} first: a transfer would use {} with bank's others in schema {bank}, \
                 moving money or writing its ledger and claims where bank does not look; put \
                 schema {bank} first (e.g. `options=-csearch_path%3D{}` in the URL), or rename \
                 the other {}",
                self.search_path,
                shadowed.join(" and "),
                if shadowed.len() == 1 { "it" } else { "them" },
                quote_ident(bank),
                if shadowed.len() == 1 {
                    "table"
                } else {
                    "tables"
                }
            );
        }
        if let Some(m) = self.missing.as_deref().filter(|m| !m.moved.is_empty()) {
            return write!(
                f,
                "{}: this connection's search_path ({}) does not reach {}; put that schema on \
                 the search_path (e.g. `options=-csearch_path%3D<schema>,public` in the URL, or \
                 the role's `ALTER ROLE ... SET search_path`), or move the tables back",
                m.words,
                self.search_path,
                m.moved.join(" and ")
            );
        }
        match self.elsewhere.first() {
            // Every migration may be recorded (then `init` says the schema is up to date, and
            // sending the user there went in a circle): what is missing is named.
            None => match self.missing.as_deref().map(|m| &m.words) {
                Some(missing) => write!(
                    f,
                    "database not migrated, or changed by hand since its migrations ran: \
                     {missing}; run `bank init`, and if it says the schema is up to date, \
                     restore what is missing (the migration's up.sql under migrations/ made it)"
                ),
                None if self.record_lost() => write!(
                    f,
                    "database not migrated on record, but it has {}: {RECORD_LOST}",
                    self.in_the_way.join(", ")
                ),
                None if !self.in_the_way.is_empty() => write!(
                    f,
                    "database not migrated, and it already has {}, which bank's migrations would \
                     create, so `bank init` would refuse: give bank a database (or schema) of \
                     its own",
                    self.in_the_way.join(", ")
                ),
                None => f.write_str("database not migrated: run `bank init` first"),
            },
            Some(first) => {
                write!(
                    f,
                    "database not migrated on this connection's search_path ({}): bank's tables \
                     are in schema {}; add it to the search_path (e.g. \
                     `options=-csearch_path%3D{}` in the URL, or the role's `ALTER ROLE ... SET \
                     search_path`)",
                    self.search_path,
                    self.elsewhere.join(", schema "),
                    quote_ident(first)
                )?;
                match &self.creation_schema {
                    Some(here) => write!(
                        f,
                        ", or run `bank init` to create a separate bank in schema {here}"
                    ),
                    None => Ok(()),
                }
            }
        }
    }
}

/// A schema name as a search_path takes it: bare when PostgreSQL would not fold or split it.
fn quote_ident(name: &str) -> String {
    let bare = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    match bare && !name.is_empty() {
        true => name.to_string(),
        false => format!("\"{}\"", name.replace('"', "\"\"")),
    }
}

#[derive(Debug, Error)]
#[error("cannot connect to {url}: {message}")]
pub struct ConnectError {
    /// Redacted.
    pub url: String,
    /// Redacted.
    pub message: String,
    /// The server took the login, and the connection was then lost while the session was set
    /// up (its backend ended by a DBA or a pooler, the server restarting), before anything of
    /// the command's was sent: a loss, not a refusal.
    pub lost_after_login: bool,
}

impl ConnectError {
    /// Whether trying again later may succeed: anything but the failures that will not change
    /// by waiting (a wrong password, an unknown database or role, a refused TLS setting, a host
    /// name that does not resolve, a malformed option). A server that is down, restarting or in
    /// recovery says many different things, so the test is for the permanent ones.
    /// libpq refused the URL's parameters (`sslmode=bogus`, an unknown option, `%ZZ`) before
    /// connecting, or the service file or a setting the connection asked for was refused: bad
    /// input, as a malformed URL is, not a failure to connect.
    pub fn is_malformed(&self) -> bool {
        self.refused_by_libpq() || self.is_service_missing() || self.is_refused_setting()
    }

    /// libpq's own refusal of the URL's words, before any server or file was asked: a refusal
    /// of a parameter the URL does not set is of a value from elsewhere (`PGSSLMODE=bogus`, a
    /// service file), which an earlier run of the same URL may not have met.
    fn url_refused_by_libpq(&self) -> bool {
        self.refused_by_libpq()
            && refused_parameter(&self.message)
                .is_none_or(|name| crate::db::query_sets(&self.url, &name))
    }

    /// libpq refused a connection parameter before connecting, wherever it was set: the URL,
    /// a `PG…` variable of the environment, a service file.
    fn refused_by_libpq(&self) -> bool {
        let m = self.message.to_ascii_lowercase();
        m.contains("invalid connection option")
            || m.contains("invalid percent-encoded token")
            || m.contains("invalid uri query parameter")
            || m.contains("key/value separator")
            || m.contains("forbidden value")
            // libpq's URI parser: "... in IPv6 host address in URI", "unexpected character ...
            // in URI".
            || m.contains(" in uri")
            || (m.contains("invalid ") && m.contains(" value"))
            // "could not match 2 port numbers to 1 hosts", "… host names to 2 hostaddr values":
            // lists of unequal length (retried as a lost connection until --timeout).
            || m.contains("could not match ")
            // "could not parse network address \"notanip\"": a `hostaddr` that is no address.
            || m.contains("could not parse network address")
    }

    /// libpq found no service file (`PGSERVICEFILE`, `~/.pg_service.conf`) or no section of the
    /// URL's `?service=` in it: the user's configuration, to fix as a malformed URL is, but not
    /// the URL's own words: the same URL may have logged in for an earlier run, before the file
    /// was moved or its section removed.
    pub fn is_service_missing(&self) -> bool {
        let m = self.message.to_ascii_lowercase();
        (m.contains("definition of service") && m.contains("not found"))
            || (m.contains("service file") && m.contains("not found"))
    }

    /// The server refused, at login, a setting the connection asked for (the URL's
    /// `options=-c …`, or `PGOPTIONS`): the user's configuration, to fix as a malformed URL is
    /// (exit 2; with an id or a file, unknown, as a wrong password: see `reaches_no_database`).
    /// Only `-c work_mem=abc` was (its words hold "invalid … value"); `-c bogus=1` exited 1.
    /// bank's own settings, made after login, are worded apart
    /// ("the session could not be set up: …").
    pub fn is_refused_setting(&self) -> bool {
        const REFUSED: [&str; 7] = [
            "unrecognized configuration parameter",
            // `-c bogus`
            "requires a value",
            // `shared_buffers`, fixed at the server's start; `cannot be changed now`
            "cannot be changed",
            // `invalid value for parameter "…"`, `… is outside the valid range for parameter
            // "…"`, `parameter "…" requires a Boolean value`
            "parameter \"",
            // `transaction_isolation`, which only SET TRANSACTION may change
            "must be called before any query",
            "permission denied to set parameter",
            // `PGOPTIONS=--bogus`
            "invalid command-line argument",
        ];
        let m = self.message.to_ascii_lowercase();
        // libpq 14 and later name the server first; older ones give its words alone.
        let at_login = m.starts_with("connection to server") || m.starts_with("fatal:");
        at_login && REFUSED.iter().any(|w| m.contains(w))
    }

    /// The server has no database of that name: no earlier run can have a transfer on its way
    /// to it.
    pub fn is_no_such_database(&self) -> bool {
        self.message.contains("database \"") && self.message.contains("does not exist")
    }

    /// A URL libpq refuses, or one naming a database the server does not have: no run can have
    /// sent anything through it, so nothing of an earlier attempt can be on its way to commit.
    pub fn reaches_no_database(&self) -> bool {
        // libpq tries a multi-host URL's hosts in turn, and its message is about the host that
        // answered: an earlier run may have reached another (found by a reviewer). A comma
        // anywhere in the URL is taken for several hosts, on the safe side.
        // A setting the server refused at login is no URL libpq refuses: the server decides,
        // and the same URL (or another PGOPTIONS) logged in for an earlier run, before a
        // `REVOKE SET ON PARAMETER` or a role made no longer superuser. Taken for one, a rerun
        // of an id that run applied (or left unknown) said "bad input" (exit 2), where the same
        // rerun after a changed password says the outcome is unknown (exit 3).
        // So is a service file (`?service=…`) moved or its section removed since: an id that
        // run applied was said to be bad input (exit 2) on a rerun (found by a reviewer).
        // (`-c work_mem=abc` is worded as libpq's "invalid … value" too: the server's still.)
        (self.url_refused_by_libpq() && !self.is_refused_setting())
            || (self.is_no_such_database() && !self.url.contains(','))
    }

    /// The server (or a pooler in front of it) has no connection to spare for this login: a
    /// role's or a database's `CONNECTION LIMIT`, `max_connections`, PgBouncer's
    /// `max_client_conn`. Transient for a run's first connection (others may close theirs), but
    /// a run that already holds one may go on with the connections it has.
    pub fn is_connection_limit(&self) -> bool {
        is_connection_limit(&self.message)
    }

    /// libpq could not make a socket: this process has as many files open as it may (EMFILE,
    /// `ulimit -n`) or the system has (ENFILE).
    pub fn is_out_of_client_files(&self) -> bool {
        self.message.contains("could not create socket")
            && self
                .message
                .to_ascii_lowercase()
                .contains("too many open files")
    }

    pub fn is_transient(&self) -> bool {
        // Refusals of this login that another attempt meets again: retried, they took the whole
        // deadline (31 attempts) and ended "may or may not have been applied".
        const PERMANENT: [&str; 22] = [
            "authentication failed",
            // libpq's fe_sendauth: the server asks a password the URL does not give.
            "no password supplied",
            "pg_hba.conf rejects",
            // A setting in `options=-c …` the server does not know, or without a value, or one
            // it fixes at start (`shared_buffers`).
            "unrecognized configuration parameter",
            "requires a value",
            "cannot be changed",
            // Any other refusal of a setting names it (`invalid value for parameter "…"`, `… is
            // outside the valid range for parameter "…"`); and one that only SET TRANSACTION may
            // change (`transaction_isolation`) is refused in its own words.
            "parameter \"",
            "must be called before any query",
            // A hot standby refusing the SERIALIZABLE that the default isolation asks for, in
            // the session's first query: every attempt meets it (found by a reviewer: a file
            // ended unknown, exit 3, at every rerun).
            "in a hot standby",
            "does not exist",
            "no pg_hba.conf entry",
            "permission denied",
            "server does not support ssl",
            "ssl is not enabled",
            "sslmode",
            "certificate",
            "could not translate host name",
            "invalid",
            "unsupported",
            "not permitted",
            // `channel_binding=require` or `gssencmode=require` that this server cannot meet.
            "channel binding",
            "gssapi encryption required",
        ];
        let m = self.message.to_ascii_lowercase();
        !self.is_malformed() && !PERMANENT.iter().any(|p| m.contains(p))
    }
}

/// The connection parameter libpq names as refused: `invalid sslmode value: "bogus"`, `invalid
/// integer value "abc" for connection option "port"`.
fn refused_parameter(message: &str) -> Option<String> {
    let m = message.to_ascii_lowercase();
    if m.contains("could not match ") {
        // The list libpq could not pair with the hosts: its length is what is wrong.
        let name = if m.contains(" port numbers ") {
            "port"
        } else {
            "hostaddr"
        };
        return Some(name.to_string());
    }
    if m.contains("could not parse network address") {
        return Some("hostaddr".to_string());
    }
    if let Some((_, rest)) = m.split_once("for connection option \"") {
        return rest.split_once('"').map(|(name, _)| name.to_string());
    }
    let (_, rest) = m.split_once("invalid ")?;
    let (name, _) = rest.split_once(" value")?;
    let name = name.trim();
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    (!name.is_empty() && name.chars().all(word) && name != "integer").then(|| name.to_string())
}

/// Why a transfer was not applied.
#[derive(Debug, Error)]
pub enum TransferError {
    #[error("amount must be positive, got {0}")]
    NonPositiveAmount(i64),
    #[error("cannot transfer from account {0} to itself")]
    SameAccount(Uuid),
    #[error("account {0} does not exist")]
    UnknownAccount(Uuid),
    #[error("account {account} has insufficient funds for a transfer of {amount}")]
    InsufficientFunds { account: Uuid, amount: i64 },
    #[error(
        "transfer {id} already exists with different details \
         (from {from} to {to}, amount {amount}); choose another --id"
    )]
    IdConflict {
        id: Uuid,
        from: Uuid,
        to: Uuid,
        amount: i64,
    },
    /// The statement wrote no ledger row as asked (a trigger on `transfers` skipped it, or
    /// changed its id or details), so it failed and applied nothing.
    #[error(
        "the transfer statement wrote no ledger row as asked (a trigger on transfers may have \
         skipped or changed it), so it applied nothing"
    )]
    NoLedgerRow,
    /// An account the transfer moves exists, but the database left it unchanged (a trigger of
    /// its own, BEFORE UPDATE returning NULL): the statement failed and applied nothing. `None`
    /// when which one is not known (a file's statement, which moves many).
    #[error("{}", not_updated(*.0))]
    AccountNotUpdated(Option<Uuid>),
    #[error("{0}")]
    NotMigrated(Unmigrated),
    #[error(
        "account {account} cannot receive {amount}: its balance would exceed the largest \
         amount an account can hold ({max})", max = i64::MAX
    )]
    BalanceOverflow { account: Uuid, amount: i64 },
    /// Definitely not applied: every attempt was rolled back, and none will commit later.
    #[error("transfer {id} not applied: {reason}")]
    NotApplied { id: Uuid, reason: String },
    /// An attempt may have committed and nothing settled it: exit code 3.
    #[error(
        "transfer {id} may or may not have been applied (outcome unknown): {reason}; run \
         `bank transfer` again with --id {id} to settle it"
    )]
    OutcomeUnknown { id: Uuid, reason: String },
    /// The caller stopped waiting for this transfer (it reports the outcome itself).
    #[error("abandoned by its caller")]
    Abandoned,
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("database error: {}{}{}", .0, server_hint(.0), pooler_hint(.0))]
    Database(diesel::result::Error),
}

impl TransferError {
    /// The database refused the transfer on its merits, after the ledger said the id is not
    /// there: final even after an ambiguous attempt, whose rerun got past the row locks.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            TransferError::InsufficientFunds { .. }
                | TransferError::UnknownAccount(_)
                | TransferError::BalanceOverflow { .. }
                | TransferError::IdConflict { .. }
        )
    }
}

/// Everything a command can fail with.
#[derive(Debug, Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error("{0}")]
    NotMigrated(Unmigrated),
    #[error("account {0} does not exist")]
    UnknownAccount(Uuid),
    #[error(
        "no transfer {0} in the ledger (yet: after an unknown outcome an earlier attempt may still \
         commit, and only `bank transfer --id {0}` with the same accounts and amount settles it)"
    )]
    NoTransfer(Uuid),
    /// `lookup` on a read-only session (a hot standby, `default_transaction_read_only`): a
    /// standby may not have replayed what the primary committed, so its "no" settles nothing.
    #[error(
        "no transfer {0} in the ledger as this read-only connection sees it (a hot standby may \
         not have the primary's latest commits yet: look it up on the primary; after an unknown \
         outcome only `bank transfer --id {0}` with the same accounts and amount settles it)"
    )]
    NoTransferReadOnly(Uuid),
    /// `lookup` of an id a run answered "not applied" and claimed: nothing can commit it late.
    #[error(
        "no transfer {0} in the ledger: a run said it was not applied and claimed its id, so no \
         earlier attempt of it can still commit (a refusal, such as insufficient funds, is a \
         'not applied' too)"
    )]
    NoTransferClaimed(Uuid),
    /// `lookup` of an id whose claim a single statement marked: it committed, and its ledger
    /// row is gone since (deleted by hand, or by a DBA's trigger).
    #[error(
        "no transfer {0} in the ledger, but a single statement applied it earlier (its claim \
         says so): its ledger row is gone since; restore it, and see `bank verify`"
    )]
    NoTransferRowGone(Uuid),
    /// The connection was lost before the command had done anything (its check of the schema
    /// on connecting), and none made again was kept within its `--timeout`
    /// (`DbUrl::connect_checked`).
    #[error(
        "the connection to the database was lost before anything was done, and connecting \
         again did not get further within {}: {last}",
        humantime::format_duration(*.timeout)
    )]
    LostBeforeStart {
        timeout: std::time::Duration,
        last: Box<Error>,
    },
    #[error("migration failed")]
    Migration(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("database error: {}{}{}", .0, server_hint(.0), pooler_hint(.0))]
    Database(diesel::result::Error),
    #[error(
        "verification failed: {}, {} with the ledger, {} of entries, total {total} vs opening \
         {opening}",
        crate::counted(count(*negative), "negative balance"),
        match *mismatched {
            1 => "1 balance disagrees".to_string(),
            n => format!("{n} balances disagree"),
        },
        crate::counted(count(*broken), "broken chain")
    )]
    Verify {
        negative: i64,
        mismatched: i64,
        broken: i64,
        total: i128,
        opening: i128,
    },
    #[error("workload failed")]
    Workload(#[from] WorkloadError),
    /// `transfer --file`: some lines may or may not have been applied (exit 3); `not_attempted`
    /// of them this run never sent, having stopped early (`stopped` says why, when it was not
    /// the server).
    #[error("{}", batch_unknown(stopped.as_deref(), *unknown, *not_attempted, *total))]
    BatchUnknown {
        unknown: u64,
        not_attempted: u64,
        total: u64,
        stopped: Option<String>,
    },
    /// `transfer --file` that could not connect before its first line (exit 3, as for
    /// `transfer --id`): this run applied nothing, but a file's ids may have an earlier run's
    /// attempt still on its way to commit, which only a rerun can settle. A rerun that could
    /// not log in said exit 1, and an earlier run's lines then committed (found by a reviewer).
    #[error(
        "{0}: no line was attempted, but an earlier run of this file may still apply some \
         (outcome unknown): run the same file again to settle them"
    )]
    FileNotStarted(ConnectError),
    /// `transfer --file` interrupted (Ctrl-C, SIGTERM) while its lines were being checked: none
    /// was sent, but an earlier run of the file may still apply some, as for `FileNotStarted`
    /// (exit 3). `{0}`: how it was interrupted.
    #[error(
        "{0} while the file was being checked: no line was attempted, but an earlier run of this \
         file may still apply some (outcome unknown): run the same file again to settle them"
    )]
    FileCheckInterrupted(String),
    /// `transfer --file` whose first connection's thread the system would not start: none was
    /// sent, but an earlier run of the file may still apply some, as for `FileNotStarted`
    /// (exit 3).
    #[error(
        "cannot start a thread ({0}): no line was attempted, but an earlier run of this file may \
         still apply some (outcome unknown): run the same file again to settle them (the system \
         limits this process's threads: ulimit -u, a container's or systemd's pids limit, or its \
         memory)"
    )]
    FileNoThread(std::io::Error),
    /// `transfer --file`: some lines were refused or not applied, and none is unknown (exit 1).
    /// `because`: the database refused statements for a reason that is no line's own (its
    /// words, which `with_hints` explains).
    #[error(
        "{}{}{} {} not applied (each line's outcome is above)",
        if *interrupted { "interrupted (Ctrl-C, SIGTERM or SIGHUP): " } else { "" },
        because.as_deref().map(|why| format!("{why}: ")).unwrap_or_default(),
        crate::of_total(*failed, *total, "transfer"),
        crate::was_or_were(*failed)
    )]
    BatchFailed {
        failed: u64,
        total: u64,
        interrupted: bool,
        because: Option<String>,
    },
    /// `transfer --file` whose file changed after it was checked: it stopped there (exit 1).
    #[error(
        "{name} changed after it was checked: nothing from line {line} on was applied (the \
         lines above were); check the file and run it again, which reports what this run \
         applied as already_applied"
    )]
    FileChanged { name: String, line: u64 },
    /// `transfer --file` whose results could not be written after every line was decided
    /// (exit 1; a line left undecided makes it `BatchUnknown`).
    #[error(
        "{why}: every line was decided (the summary above counts them), but not every result \
         was written; run the file again to see them all (what this run applied is then \
         already_applied)"
    )]
    OutputFailed { why: String },
    /// A transfer committed, but its receipt could not be written (a full disk): it was applied,
    /// and the exit code (0) says so; main prints this as a warning.
    #[error("transfer {id} was {how}, but its receipt could not be written")]
    ReceiptLost {
        id: Uuid,
        how: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A command did its work (committed), but its report could not be written (a full disk):
    /// the exit code (0) says the work stands; main prints this as a warning.
    #[error("{done}, but that could not be written ({source})")]
    ReportLost {
        done: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write output: {0}")]
    Io(#[from] std::io::Error),
    /// A thread the system would not start (`crate::spawn`), before the command sent anything
    /// that it needed the thread for.
    #[error(
        "cannot start a thread ({0}): the system limits this process's threads (ulimit -u, a \
         container's or systemd's pids limit) or its memory"
    )]
    Thread(std::io::Error),
    /// The copy of standard input `transfer --file -` reads twice could not be made or written
    /// (a temporary directory missing or full): the machine's failure, not bad input (exit 1).
    #[error("cannot {what}: {source}")]
    Spool {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// `seed` stopped before every account was created (exit 1); each one created had its id
    /// written.
    #[error("{}, so the seed stopped: {}", clause(why), seed_stopped(*created, *total, *unsettled))]
    SeedStopped {
        why: String,
        created: u64,
        total: u64,
        /// Ids written whose chunk's COMMIT went unanswered: created or not, nobody can say.
        unsettled: u64,
    },
    /// `workload` stopped while it created its accounts (exit 1): those created stay.
    #[error(
        "{why}, so the workload stopped while creating its accounts: {}",
        match (created, unsettled) {
            (0, 0) => format!("none of {total} created"),
            (c, 0) => format!("{c} of {total} created, which stay (`bank reset` deletes every account)"),
            (0, u) => format!(
                "none of {total} created for sure; {u} whose COMMIT went unanswered may or may \
                 not have been, and stay if so (`bank reset` deletes every account)"
            ),
            (c, u) => format!(
                "{c} of {total} created, which stay, and {u} more whose COMMIT went unanswered \
                 may or may not have been (`bank reset` deletes every account)"
            ),
        }
    )]
    WorkloadSetupStopped {
        why: String,
        created: u64,
        total: u64,
        /// Accounts of the chunk whose COMMIT's answer was lost: created or not, nobody knows.
        unsettled: u64,
    },
    /// `init` on a database whose migrations are all another application's.
    #[error(
        "the database holds another application's migrations ({0}) and none of bank's: give \
         bank a database of its own (nothing was changed)"
    )]
    ForeignDatabase(String),
    /// `init` when the search_path puts a schema in front of the one holding the migrations
    /// table (exit 1).
    #[error(
        "the migrations table is in schema {theirs}, but schema {first} comes first on the \
         search_path, and init would build a second bank there that hides the first: drop \
         schema {first} if it is empty, or set the search_path in the URL \
         (options=-csearch_path%3D{theirs}); nothing was changed"
    )]
    SchemaInFront { theirs: String, first: String },
    /// `init` on a connection whose search_path names no schema that exists, or puts the
    /// session's temporary one first (exit 1). `why` says which.
    #[error(
        "no schema to create bank's tables in: this connection's search_path ({search_path}) \
         {why}; name one in the URL (e.g. options=-csearch_path%3Dpublic) or the role's \
         search_path; nothing was changed"
    )]
    NoSchemaToCreateIn {
        search_path: String,
        why: &'static str,
    },
    /// `init` whose migrations would create relations the database already has (exit 1).
    #[error(
        "the database already has {0}, which bank's migrations would create: nothing was \
         changed; {advice}",
        advice = match is_bank_s_own(.0.split(", ")) {
            true => RECORD_LOST,
            false => "give bank a database (or schema) of its own",
        }
    )]
    InitBlocked(String),
    /// `init` met what a migration makes though the migration is not recorded: its row of
    /// `__diesel_schema_migrations` was deleted by hand (exit 1).
    #[error(
        "migration {version} is not recorded in __diesel_schema_migrations, but {what}: its \
         record was deleted by hand, and what it made was left; if the schema has all of its \
         up.sql (migrations/ in bank's source), record it again with `INSERT INTO \
         __diesel_schema_migrations (version) VALUES ('{version}')` and run `bank init` \
         again; this migration changed nothing"
    )]
    MigrationUnrecorded { version: String, what: String },
    /// `balances --as-of`: a transaction begun before that time is still open, and may still
    /// add entries timed before it (exit 1).
    #[error(
        "balances as of {at} are not settled yet: a transaction open since {since} is still \
         open and may add entries timed before then; ask again once it ends, or for an earlier \
         time"
    )]
    AsOfUnsettled { at: String, since: String },
    /// `reset` as a role that may not delete from every table it empties (exit 1).
    #[error("reset needs DELETE on {0}, which this role has not: grant it; nothing was deleted")]
    ResetNotAllowed(String),
    /// `reset` on a connection that may not write (a hot standby, `default_transaction_read_only`)
    /// before it deleted anything: "run it again to finish" was no advice (found by a helper).
    #[error(
        "the database is read-only on this connection (a hot standby: reset on the primary; or \
         default_transaction_read_only: turn it off for this role or database): nothing was \
         deleted"
    )]
    ResetReadOnly,
    /// `workload` on a connection that may not write: every transfer failed and reconnected for
    /// the whole run (224 errors in 2 s with `--reuse-accounts` on a hot standby; an operator's
    /// finding), where one line says where to go.
    #[error(
        "the database is read-only on this connection (a hot standby: run the workload on the \
         primary; or default_transaction_read_only: turn it off for this role or database): \
         nothing was done"
    )]
    WorkloadReadOnly,
    /// `reset` that failed part-way: it deletes in batches, each committed (exit 1).
    #[error(
        "reset stopped after deleting {} and {}{}{}: {}; run it again to finish",
        crate::counted(*accounts as u64, "account"),
        crate::counted(*transfers as u64, "transfer"),
        zeroed,
        if *in_flight { " (and the batch in flight may or may not have been done)" } else { "" },
        clause(&source.to_string())
    )]
    ResetStopped {
        accounts: usize,
        transfers: usize,
        /// " (having set N balances to 0 first)", or nothing when none was.
        zeroed: String,
        /// The failure may hide the commit of the batch in flight (an answer lost or ambiguous).
        in_flight: bool,
        source: Box<Error>,
    },
    /// `demo` that failed or was stopped part-way, and what became of the rows it created.
    #[error("{source}; the demo {cleanup}")]
    DemoStopped { source: Box<Error>, cleanup: String },
    /// The demo's transfer whose COMMIT went unanswered, settled by the demo's cleanup, which
    /// removed both its accounts (`demo::settled_by_cleanup`).
    #[error(
        "transfer {id}'s COMMIT went unanswered ({reason}), and the demo's cleanup settled it: {}",
        match applied {
            true => "it was applied, and is removed with the demo's accounts",
            false => "it was not applied, and never can be: its accounts are gone",
        }
    )]
    DemoTransferSettled {
        id: Uuid,
        reason: String,
        applied: bool,
    },
    /// A read that failed after writing part of its output.
    #[error("{0}; what was printed is incomplete")]
    CutShort(Box<Error>),
    /// A command that writes in steps stopped between two (Ctrl-C, SIGTERM): why.
    #[error("{0}")]
    Stopped(&'static str),
    /// The user answered no to a confirmation (exit 1: what was asked was not done).
    #[error("{0} cancelled: nothing deleted")]
    Cancelled(&'static str),
}

/// A count from the database (never negative) as `counted` takes it.
fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or_default()
}

/// A message as a clause inside a longer one: libpq's end with a full stop ("… processing the
/// request.") and read "request., so".
fn clause(message: &str) -> &str {
    message.trim_end().trim_end_matches('.')
}

/// What a stopped seed created: the accounts of the first ids written, never those written
/// after them (their chunk was rolled back), unless the last chunk's COMMIT went unanswered.
fn seed_stopped(created: u64, total: u64, unsettled: u64) -> String {
    if unsettled > 0 && created == 0 {
        return format!(
            "none of the {} was created for sure; the {unsettled} ids written last may or may \
             not have been (their COMMIT went unanswered: `bank balances` shows which exist)",
            crate::counted(total, "account")
        );
    }
    if unsettled > 0 {
        return format!(
            "{} {} created for sure, those of the first {created} ids written; the {unsettled} \
             written after them may or may not have been (their COMMIT went unanswered: \
             `bank balances` shows which exist)",
            crate::of_total(created, total, "account"),
            crate::was_or_were(created)
        );
    }
    match created {
        0 => format!(
            "none of the {} was created (any id written belongs to a chunk that was rolled \
             back)",
            crate::counted(total, "account")
        ),
        n => format!(
            "{} {} created, those of the first {n} ids written (any id written after them \
             belongs to a chunk that was rolled back)",
            crate::of_total(n, total, "account"),
            crate::was_or_were(n)
        ),
    }
}

/// Why `bank workload` failed.
#[derive(Debug, Error)]
pub enum WorkloadError {
    /// What does not hold, in a few words each: the line alone said "an invariant does not
    /// hold", and with `--json` the reader had to dig for which.
    #[error("{0} (see the report)")]
    InvariantViolated(String),
    #[error(
        "{gone} of the run's {of} accounts were deleted by another client during the run (a \
         `bank reset`?), so its invariants could not be checked (see the report)"
    )]
    AccountsDeleted { gone: u64, of: usize },
    #[error(
        "every invariant holds, but {} failed with an error (the last: {last})",
        crate::counted(*count, "transfer")
    )]
    Errors { count: u64, last: String },
    #[error("the final check could not run ({0}); see the report")]
    FinalCheck(String),
    /// Ctrl-C (or SIGTERM) came during the final check, after every transfer had ended.
    #[error(
        "the final check was {0}: every transfer had ended and the report's figures are whole, \
         but no invariant was checked (`bank verify` checks the bank)"
    )]
    FinalCheckInterrupted(String),
    /// `--readers`, none of whose reads finished: its check did not run.
    #[error(
        "no reader finished a read ({} asked for), so the readers' check did not run ({why})",
        crate::counted(*readers, "reader")
    )]
    NoReads { readers: u64, why: String },
    #[error("--reuse-accounts needs at least 2 existing accounts, found {0}")]
    TooFewAccounts(usize),
    #[error("cannot make a latency histogram")]
    Histogram(#[from] hdrhistogram::CreationError),
    #[error("cannot merge latency histograms")]
    HistogramMerge(#[from] hdrhistogram::AdditionError),
    #[error("a worker thread panicked")]
    Panicked,
    /// `--report` or `--histogram` could not be written once the run was over.
    #[error("{0}")]
    OutputsLost(String),
}

impl Error {
    /// Output went to a pipe whose reader has gone.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Error::Io(e) | Error::ReceiptLost { source: e, .. } | Error::ReportLost { source: e, .. }
            if e.kind() == std::io::ErrorKind::BrokenPipe)
    }

    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Usage(_) | Error::Config(_) => ExitCode::Usage,
            Error::Connect(e) | Error::Transfer(TransferError::Connect(e)) if e.is_malformed() => {
                ExitCode::Usage
            }
            Error::Transfer(
                TransferError::NonPositiveAmount(_) | TransferError::SameAccount(_),
            ) => ExitCode::Usage,
            Error::Transfer(TransferError::OutcomeUnknown { .. })
            | Error::BatchUnknown { .. }
            | Error::FileNotStarted(_)
            | Error::FileCheckInterrupted(_)
            | Error::FileNoThread(_) => ExitCode::OutcomeUnknown,
            Error::ReceiptLost { .. } | Error::ReportLost { .. } => ExitCode::Success,
            _ => ExitCode::Failure,
        }
    }
}

impl From<crate::batch::Fatal> for Error {
    fn from(f: crate::batch::Fatal) -> Self {
        match f {
            crate::batch::Fatal::NotMigrated(u) => Error::NotMigrated(u),
            // A URL libpq refuses (bad input, exit 2) or a database that is not there: nothing
            // of an earlier run can be on its way to commit through it.
            crate::batch::Fatal::Connect(e) if e.reaches_no_database() => Error::Connect(e),
            crate::batch::Fatal::Connect(e) => Error::FileNotStarted(e),
            crate::batch::Fatal::Thread(e) => Error::FileNoThread(e),
        }
    }
}

/// The columns of bank's tables, by their names in src/schema.rs.
const BANK_COLUMNS: [&str; 14] = {
    use crate::schema::{accounts as a, transfer_claims as c, transfers as t};
    use diesel::Column;
    [
        a::id::NAME,
        a::balance::NAME,
        a::opening_balance::NAME,
        a::version::NAME,
        a::created_at::NAME,
        t::from_id::NAME,
        t::to_id::NAME,
        t::amount::NAME,
        t::from_version::NAME,
        t::from_balance_after::NAME,
        t::to_version::NAME,
        t::to_balance_after::NAME,
        c::claimed_by::NAME,
        c::generation::NAME,
    ]
};

/// The one place a database error becomes a domain error: a query on tables or columns that do
/// not exist yet means `bank init` has not run (or not since the code's newest migration).
impl From<diesel::result::Error> for TransferError {
    fn from(e: diesel::result::Error) -> Self {
        let not_migrated = match &e {
            diesel::result::Error::DatabaseError(_, info) => {
                // A table, or (a schema older than the code) one of its columns.
                let m = info.message();
                let ours = [
                    "\"accounts\"",
                    "\"transfers\"",
                    "\"transfer_claims\"",
                    "accounts.",
                    "transfers.",
                    "transfer_claims.",
                ];
                // A column renamed or dropped by hand: PostgreSQL names it alone (`column
                // "amount" does not exist`), and verify printed that raw (a helper playing a new
                // user). bank's statements name no column of anyone else's.
                let column = m
                    .strip_prefix("column \"")
                    .and_then(|rest| rest.split_once('"'))
                    .is_some_and(|(name, after)| {
                        after.contains("does not exist") && BANK_COLUMNS.contains(&name)
                    });
                column || (m.contains("does not exist") && ours.iter().any(|t| m.contains(t)))
            }
            _ => false,
        };
        if not_migrated {
            let missing = match &e {
                diesel::result::Error::DatabaseError(_, info) => Some(Box::new(Missing {
                    words: info.message().to_string(),
                    moved: Vec::new(),
                })),
                _ => None,
            };
            TransferError::NotMigrated(Unmigrated {
                missing,
                ..Unmigrated::default()
            })
        } else {
            TransferError::Database(e)
        }
    }
}

impl From<diesel::result::Error> for Error {
    fn from(e: diesel::result::Error) -> Self {
        match TransferError::from(e) {
            TransferError::Database(e) => Error::Database(e),
            TransferError::NotMigrated(u) => Error::NotMigrated(u),
            _ => Error::NotMigrated(Unmigrated::default()),
        }
    }
}

fn not_updated(account: Option<Uuid>) -> String {
    let which = match account {
        Some(id) => format!("account {id} exists, but the database"),
        None => "the database".to_string(),
    };
    let what = match account {
        Some(_) => "left it unchanged",
        None => "left an account unchanged, or changed it otherwise than asked",
    };
    format!(
        "{which} {what} (a trigger or rule of the database's own), so the transfer applied nothing"
    )
}

fn batch_unknown(stopped: Option<&str>, unknown: u64, not_attempted: u64, total: u64) -> String {
    let stopped = stopped.map(|why| format!("{why}: ")).unwrap_or_default();
    let never = match not_attempted {
        0 => String::new(),
        n if n == unknown => ", none of them attempted by this run, but an earlier run of the \
                               file, if one was cut short, may still apply them"
            .to_string(),
        n => format!(", {n} of them not attempted by this run"),
    };
    format!(
        "{stopped}{} may or may not have been applied (outcome unknown{never}): run the same \
         file again to settle them",
        crate::of_total(unknown, total, "transfer")
    )
}

/// The server's HINT, when it gave one its message does not hold already: PostgreSQL's words for
/// what to change ("You might need to increase max_locks_per_transaction." after "out of shared
/// memory"). Diesel shows the message alone, and a workload's last error dropped the hint.
fn server_hint(e: &diesel::result::Error) -> String {
    // A value of another type than bank's schema gives its column: Diesel's words ("Received
    // more than 8 bytes while decoding an i64") named neither the column nor the cause.
    if let diesel::result::Error::DeserializationError(_) = e {
        return " (a value of another type than bank's schema gives it: a column of bank's \
                 tables changed by hand since its migrations ran? `bank doctor` names them)"
            .to_string();
    }
    let diesel::result::Error::DatabaseError(_, info) = e else {
        return String::new();
    };
    match info.hint().map(str::trim) {
        Some(hint) if !hint.is_empty() && !info.message().contains(hint) => {
            format!(" (HINT: {hint})")
        }
        _ => String::new(),
    }
}

/// PostgreSQL's words for a statement stopped by the server's `temp_file_limit`.
const TEMP_FILE_LIMIT: &str = "exceeds temp_file_limit";

/// Whether `message` is PostgreSQL's refusal of a statement that wrote more temporary files than
/// the server's `temp_file_limit` allows (53400): the statement failed and rolled back.
pub fn is_temp_file_limit(message: &str) -> bool {
    message.contains(TEMP_FILE_LIMIT)
}

/// Bank's prepared statements met another client's, or lost their own, on one server
/// connection: a pooler in transaction mode (PgBouncer's `pool_mode = transaction`) gives each
/// transaction whichever server connection is free, and bank names its prepared statements and
/// sets its timeouts once per session. Said where the error is, since "prepared statement
/// \"__diesel_stmt_1\" already exists" names neither the cause nor the fix (found by a reviewer).
fn pooler_hint(e: &diesel::result::Error) -> &'static str {
    let m = e.to_string();
    let ours = m.contains("prepared statement \"__diesel_stmt_");
    if ours && (m.contains("already exists") || m.contains("does not exist")) {
        " (a pooler in transaction mode, such as PgBouncer's pool_mode = transaction, shares \
         one server connection among clients; bank needs a session of its own: use session \
         pooling or connect to the database directly)"
    } else {
        ""
    }
}

/// Where this run's sessions kept the server's idle_in_transaction_session_timeout (stricter than
/// bank's deadline), what it does to a connection and how to lift it: a few milliseconds between
/// a transaction's statements end the session, and the words of a lost connection ("no
/// connection to the server") name no cause (found by a new user). Only for a timeout under a
/// second: bank idles longer than that inside a transaction only when something else holds it
/// up, and a DBA's 10 s was blamed for a login refused mid-run (found by a reviewer).
pub fn idle_timeout_hint() -> Option<String> {
    const SHORT: std::time::Duration = std::time::Duration::from_secs(1);
    crate::db::server_idle_timeout_kept()
        .filter(|idle| *idle < SHORT)
        .map(|idle| {
            format!(
                "this run's sessions kept the server's idle_in_transaction_session_timeout of {}, \
                 which ends a session that long idle inside a transaction; \
                 PGOPTIONS='-c idle_in_transaction_session_timeout=0' lifts it for one run",
                humantime::format_duration(idle)
            )
        })
}

/// `line` (an error's words) with what helps act on them, as stderr and `--json` show it: whose
/// timeout cancelled a statement (bank's own `--timeout`, the server's, or PGOPTIONS's), what to
/// grant a role refused a table, and what to change where a row-level security policy is in the
/// way.
pub fn with_hints(mut line: String) -> String {
    // A statement cancelled by a timeout: bank's own deadline (it sets statement_timeout from
    // --timeout on transfer sessions), or the server's limit, set for the role or the database:
    // say which, and how one run can lift the server's (libpq passes PGOPTIONS at connect).
    for (what, setting) in [
        ("statement timeout", "statement_timeout"),
        ("lock timeout", "lock_timeout"),
    ] {
        // PostgreSQL's "canceling statement due to …", CockroachDB's "query execution canceled
        // due to …".
        if !line.contains(&format!("due to {what}")) {
            continue;
        }
        let said =
            match crate::db::own_statement_timeout().filter(|_| setting == "statement_timeout") {
                // bank's deadline, which it sets as its sessions' statement_timeout; or, where
                // some sessions of the run kept the server's stricter one, either.
                Some(own) if crate::db::server_statement_timeout_kept() => format!(
                    " (bank's --timeout {}, or a stricter statement_timeout set for this role \
                     or database, which some of this run's connections kept; \
                     PGOPTIONS='-c statement_timeout=0' lifts that one for one run)",
                    humantime::format_duration(own)
                ),
                Some(own) => format!(" (bank's --timeout {})", humantime::format_duration(own)),
                // PGOPTIONS set it: lifting it with PGOPTIONS is no advice.
                None if std::env::var("PGOPTIONS").is_ok_and(|o| o.contains(setting)) => {
                    format!(" (a {setting} set by PGOPTIONS in the environment)")
                }
                None => format!(
                    " (a {setting} set for this role or database, or by the URL's options; \
                 PGOPTIONS='-c {setting}=0' lifts one set on the server for one run)"
                ),
            };
        // Next to the words it explains, not at the end of a long line about something else.
        let at = line
            .find(&format!("due to {what}"))
            .map_or(line.len(), |i| i + "due to ".len() + what.len());
        line.insert_str(at, &said);
    }
    // What to grant, once: a role provisioned before migrations 7 and 8 lacks transfer_claims
    // alone; one made for another application, bank's tables altogether (and a rerun, which an
    // unknown outcome advises, fails the same way until it has them).
    if table_denied(&line).is_some() {
        line.push_str(
            " (grant this role SELECT, INSERT, UPDATE and DELETE on accounts, transfers and \
             transfer_claims; bank doctor lists what it lacks)",
        );
    } else if is_privilege_denied(&line) && line.contains("__diesel_schema_migrations") {
        // `init` on a database already migrated only reads Diesel's table; migrating needs the
        // role that owns bank's tables.
        line.push_str(
            " (GRANT SELECT ON __diesel_schema_migrations to this role to let it check the \
             schema, or run `bank init` as the role that owns bank's tables)",
        );
    }
    // `init` as a role that may not create in the schema (PostgreSQL 15 grants CREATE on
    // `public` to its owner alone): the words named the schema, not what to grant.
    if let Some(at) = line.find("permission denied for schema ") {
        let rest = &line[at + "permission denied for schema ".len()..];
        let schema = rest.split_whitespace().next().unwrap_or("").to_string();
        // The same words for a missing USAGE (any command) as for a missing CREATE (init).
        line.push_str(&format!(
            " (GRANT USAGE ON SCHEMA {schema} to this role, and CREATE for bank init, which \
             creates bank's tables; or run init as the schema's owner)"
        ));
    }
    // A statement stopped by the server's temp_file_limit: its words name the setting, not whose
    // it is or how to lift it, and "run it again" meets it again (a reset stopped by it).
    if let Some(at) = line.find(TEMP_FILE_LIMIT) {
        // Next to the words it explains: after "(64kB)", if the server's size is there.
        let at = line[at..].find(')').map_or(line.len(), |end| at + end + 1);
        line.insert_str(
            at,
            " (the server's temp_file_limit, set for this role or database or in \
             postgresql.conf, caps the temporary files one statement may write: a superuser can \
             raise it, e.g. ALTER ROLE ... SET temp_file_limit = '1GB', or -1 for none)",
        );
    }
    // A write on a read-only connection: `seed` gave the server's words alone, where `reset`
    // said what to change (found by a helper playing a new user).
    if line.contains("in a read-only transaction") {
        line.push_str(
            " (a hot standby: connect to the primary; or default_transaction_read_only: turn it \
             off for this role or database)",
        );
    }
    // What a hot standby refuses to do at all, whatever the transaction (`seed`'s COPY: "cannot
    // execute COPY during recovery"; a lock a writer takes: "… while recovery is in progress"):
    // the server's words alone did not say where to go (found by an operator).
    if (line.contains(" during recovery") || line.contains("while recovery is in progress"))
        && !line.contains("connect to the primary")
    {
        line.push_str(" (a hot standby: connect to the primary)");
    }
    // A hot standby whose default isolation is SERIALIZABLE (the database's setting, copied from
    // the primary) refuses every transaction, the session's first query included: said as a
    // failure to keep the search_path, which it is not (found by a fault-injecting helper).
    if line.contains("cannot use serializable mode in a hot standby") {
        line.push_str(
            " (a hot standby, which runs no SERIALIZABLE transaction, the level bank's \
             sessions ask for here: connect to the primary)",
        );
    }
    // A login the server had no slot for: libpq's words name neither the setting nor the cure
    // (found by a helper playing a new user).
    if is_connection_limit(&line) {
        line.push_str(
            " (every connection this login may open is taken: close idle sessions (see \
             pg_stat_activity), or raise the role's or database's CONNECTION LIMIT or the \
             server's max_connections)",
        );
    }
    // bank's sessions refuse to see part of a table (see `db::kept`): a rerun cannot settle
    // anything until the policy stops applying to the role.
    if line.contains("would be affected by row-level security policy") {
        line.push_str(
            " (bank must see every row of its tables: drop or disable the policy on bank's \
             tables, or ALTER ROLE … BYPASSRLS; until then no rerun can settle an outcome)",
        );
    }
    line
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_hot_standby_refusing_serializable_says_to_connect_to_the_primary() {
        let line = with_hints(
            "cannot connect to postgres://u:***@h/db: the session could not be set up: \
             cannot use serializable mode in a hot standby"
                .to_string(),
        );
        assert!(line.ends_with("connect to the primary)"), "{line}");
        assert_eq!(with_hints("another error".to_string()), "another error");
    }

    /// `seed` on a hot standby gave the server's words alone.
    #[test]
    fn what_a_hot_standby_cannot_do_says_to_connect_to_the_primary() {
        for words in [
            "database error: cannot execute COPY during recovery",
            "database error: cannot acquire lock mode RowExclusiveLock on database objects while \
             recovery is in progress",
        ] {
            let line = with_hints(words.to_string());
            assert!(
                line.ends_with("(a hot standby: connect to the primary)"),
                "{line}"
            );
        }
    }

    /// A statement the server's temp_file_limit stopped: the setting is named with how to lift
    /// it, and the statement rolled back (a reset stopped by it said its batch in flight "may
    /// or may not have been done").
    #[test]
    fn a_statement_stopped_by_temp_file_limit_names_it_and_applied_nothing() {
        let words = "temporary file size exceeds temp_file_limit (64kB)";
        let line = with_hints(format!(
            "reset stopped: database error: {words}; run it again"
        ));
        assert!(
            line.contains("(64kB) (the server's temp_file_limit, set for"),
            "{line}"
        );
        assert!(line.ends_with("; run it again"), "{line}");
        assert!(line.contains("temp_file_limit = '1GB'"), "{line}");
        let e = crate::retry::tests::db(diesel::result::DatabaseErrorKind::Unknown, words);
        assert!(!crate::retry::may_have_committed(&e));
    }

    /// The server's HINT is kept with its message ("out of shared memory" with what to raise),
    /// and not said twice.
    #[test]
    fn a_database_error_keeps_the_server_s_hint() {
        let e = crate::retry::tests::db_with_hint(
            diesel::result::DatabaseErrorKind::Unknown,
            "out of shared memory",
            "You might need to increase max_locks_per_transaction.",
        );
        assert_eq!(
            TransferError::Database(e).to_string(),
            "database error: out of shared memory (HINT: You might need to increase \
             max_locks_per_transaction.)"
        );
        let plain = crate::retry::tests::db(diesel::result::DatabaseErrorKind::Unknown, "x");
        assert_eq!(Error::Database(plain).to_string(), "database error: x");
    }

    #[test]
    fn a_full_lock_table_is_out_of_resources() {
        assert!(super::is_out_of_resources(
            "out of shared memory (HINT: You might need to increase max_pred_locks_per_transaction.)"
        ));
        assert!(!super::is_out_of_resources("integer out of range"));
    }

    /// Each engine's words for a server out of disk or memory (a reviewer's mutations dropping
    /// "out of memory", or CockroachDB's words, passed every test): a file stops on them
    /// instead of refusing its lines one by one.
    #[test]
    fn every_engine_s_words_for_out_of_disk_or_memory_are_known() {
        for m in [
            "could not extend file \"base/16384/16385\": No space left on device",
            "could not write to file \"pg_wal/xlogtemp.42\": No space left on device",
            "out of memory (DETAIL: Failed on request of size 8192 in memory context \"x\".)",
            "could not extend file \"base/1/2\": Disk quota exceeded",
            "disk full",
            "insufficient disk space",
            "root: memory budget exceeded: 10240 bytes requested, 134217728 currently allocated",
        ] {
            assert!(super::is_out_of_resources(m), "{m}");
        }
        for m in [
            "account x has insufficient funds",
            "value out of range",
            "memory",
        ] {
            assert!(!super::is_out_of_resources(m), "{m}");
        }
    }

    use super::*;

    /// With the ledger shadowed, "a transfer would move the money there and write its ledger in
    /// schema public" said the reverse of what happens (found by a fault-injecting helper).
    #[test]
    fn a_shadowed_ledger_is_not_said_to_move_the_money() {
        let u = Unmigrated {
            search_path: "bank, public".into(),
            shadowed: Some(Box::new((
                "public".into(),
                vec!["transfers in schema bank".into()],
            ))),
            ..Unmigrated::default()
        };
        let text = u.to_string();
        assert!(!text.contains("move the money there"), "{text}");
        assert!(
            text.contains("finds transfers in schema bank first: a transfer would use it with"),
            "{text}"
        );
    }

    fn connect_error(message: &str) -> ConnectError {
        ConnectError {
            url: "postgres://bank:***@db/bank".into(),
            message: message.into(),
            lost_after_login: false,
        }
    }

    #[test]
    fn a_schema_older_than_the_code_is_not_migrated() {
        // Only the first migrations applied: the tables exist, a column does not, and the
        // commands failed with the raw database error.
        use diesel::result::DatabaseErrorKind;
        for m in [
            "relation \"accounts\" does not exist",
            "column accounts.version does not exist",
            "column \"from_version\" of relation \"transfers\" does not exist",
            // Migration 9 missing, for a role that cannot read the migrations table (the
            // schema check is skipped then): a reviewer's find.
            "column \"claimed_by\" of relation \"transfer_claims\" does not exist",
            "relation \"transfer_claims\" does not exist",
            "column transfer_claims.generation does not exist",
        ] {
            let e = crate::retry::tests::db(DatabaseErrorKind::Unknown, m);
            assert!(
                matches!(TransferError::from(e), TransferError::NotMigrated(_)),
                "{m}"
            );
        }
        let e = crate::retry::tests::db(DatabaseErrorKind::Unknown, "column \"x\" does not exist");
        assert!(matches!(TransferError::from(e), TransferError::Database(_)));
    }

    #[test]
    fn a_missing_privilege_is_told_on_both_engines() {
        for (m, table) in [
            ("permission denied for table accounts", Some("accounts")),
            (
                "permission denied for table transfer_claims",
                Some("transfer_claims"),
            ),
            (
                "user bank does not have SELECT privilege on relation transfers",
                Some("transfers"),
            ),
            (
                "user bank does not have INSERT privilege on relation bank.public.transfer_claims",
                Some("transfer_claims"),
            ),
            ("permission denied for schema public", None),
            ("relation \"accounts\" does not exist", None),
        ] {
            assert_eq!(table_denied(m), table, "{m}");
        }
        assert!(is_privilege_denied("permission denied for schema public"));
        assert!(!is_privilege_denied("relation \"accounts\" does not exist"));
    }

    #[test]
    fn parameters_libpq_refuses_are_bad_input() {
        for m in [
            "invalid sslmode value: \"bogus\"",
            "invalid connection option \"bogus\"",
            "invalid integer value \"abc\" for connection option \"connect_timeout\"",
            "invalid percent-encoded token: \"%ZZ\"",
            "end of string reached when looking for matching \"]\" in IPv6 host address in \
             URI: \"postgres://bank@h:1,[::1/bank\"",
            "unexpected character \"x\" at position 20 in URI (expected \":\" or \"/\")",
            "definition of service \"nosuch\" not found",
            "service file \"/nonexistent\" not found",
        ] {
            let mut e = connect_error(m);
            e.url = "postgres://bank:***@db/bank?sslmode=bogus&connect_timeout=abc".into();
            assert!(e.is_malformed(), "{m}");
            // A service file is no part of the URL: an earlier run may have logged in with it.
            assert_eq!(e.reaches_no_database(), !m.contains("service"), "{m}");
        }
        // A parameter the URL does not set came from the environment (`PGSSLMODE=bogus`) or a
        // service file: bad input, but no part of the URL, which an earlier run may have used.
        for m in [
            "invalid sslmode value: \"bogus\"",
            "invalid target_session_attrs value: \"bogus\"",
            "invalid integer value \"abc\" for connection option \"port\"",
            "could not match 2 port numbers to 1 hosts",
            "could not match 1 host names to 2 hostaddr values",
            "could not parse network address \"notanip\": Name or service not known",
        ] {
            let e = connect_error(m);
            assert!(e.is_malformed(), "{m}");
            assert!(!e.reaches_no_database(), "{m}");
        }
        // libpq decodes a key's %XX: the URL's own, however it is written.
        let mut e = connect_error("invalid sslmode value: \"bogus\"");
        e.url = "postgres://bank:***@db/bank?ssl%6Dode=bogus".into();
        assert!(e.reaches_no_database());
        let mut e = connect_error("could not match 2 port numbers to 1 hosts");
        e.url = "postgres://bank:***@db/bank?port=1,2".into();
        assert!(e.reaches_no_database());
        for m in [
            "connection to server at \"127.0.0.1\", port 1 failed: Connection refused",
            "FATAL: password authentication failed for user \"bank\"",
        ] {
            assert!(!connect_error(m).is_malformed(), "{m}");
        }
    }

    /// A setting the server refuses at login (the URL's options, PGOPTIONS) is the user's
    /// configuration, as `-c work_mem=abc` was: `-c bogus_setting=1` exited 1 (3 with `--id`).
    /// Not the words of bank's own session set-up, nor a permission on a table.
    #[test]
    fn a_setting_the_server_refuses_at_login_is_bad_configuration() {
        let at = "connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  ";
        for m in [
            "unrecognized configuration parameter \"bogus_setting\"",
            "-c bogus requires a value",
            "parameter \"shared_buffers\" cannot be changed without restarting the server",
            "1 kB is outside the valid range for parameter \"work_mem\" (64 .. 2147483647)",
            "invalid value for parameter \"work_mem\": \"abc\"",
            "parameter \"enable_seqscan\" requires a Boolean value",
            "SET TRANSACTION ISOLATION LEVEL must be called before any query",
            "permission denied to set parameter \"log_statement\"",
            "invalid command-line argument for server process: --bogus",
        ] {
            let e = connect_error(&format!("{at}{m}"));
            // Bad input (exit 2) without an id; with one, or for a file, the server decided and an
            // earlier run may have logged in: unknown.
            assert!(e.is_malformed() && !e.reaches_no_database(), "{m}");
            assert!(!e.is_transient(), "{m}");
        }
        assert!(connect_error("FATAL:  unrecognized configuration parameter \"x\"").is_malformed());
        for m in [
            format!("{at}password authentication failed for user \"bank\""),
            format!("{at}permission denied for database \"bank\""),
            "the session could not be set up: permission denied to set parameter \"x\"".into(),
            "the session could not be set up: cannot use serializable mode in a hot standby".into(),
        ] {
            assert!(!connect_error(&m).is_malformed(), "{m}");
        }
    }

    #[test]
    fn only_passing_connect_failures_are_transient() {
        for m in [
            "connection to server at \"127.0.0.1\", port 5432 failed: Connection refused",
            "FATAL: the database system is starting up",
            "FATAL: the database system is not yet accepting connections",
            "timeout expired",
        ] {
            assert!(connect_error(m).is_transient(), "{m}");
        }
        for m in [
            "FATAL: password authentication failed for user \"bank\"",
            "FATAL: database \"nope\" does not exist",
            "could not translate host name \"nohost\" to address",
            "connection to server at \"127.0.0.1\", port 5432 failed: fe_sendauth: no password \
             supplied",
            "FATAL: pg_hba.conf rejects connection for host \"127.0.0.1\", user \"u\"",
            "FATAL: unrecognized configuration parameter \"bogus\"",
            "FATAL: -c bogus requires a value",
            "FATAL: parameter \"shared_buffers\" cannot be changed without restarting the server",
            "FATAL: 1 kB is outside the valid range for parameter \"work_mem\" (64 .. 2147483647)",
            "FATAL: SET TRANSACTION ISOLATION LEVEL must be called before any query",
            "connection to server at \"127.0.0.1\", port 5432 failed: channel binding required, \
             but SSL not in use",
            "connection to server at \"127.0.0.1\", port 5432 failed: GSSAPI encryption required \
             but was impossible (possibly no credential cache, no server support, or using a \
             local socket)",
            "the session could not be set up: cannot use serializable mode in a hot standby",
        ] {
            assert!(!connect_error(m).is_transient(), "{m}");
        }
    }
}
