//! Where the database is and how to reach it: `url` (parsing and redaction), `session`
//! (connecting, session settings, reconnecting), `kept` (what every connection of a run keeps
//! from its first: the search_path, messages in English), `.env`, and the embedded migrations.

pub mod engine;
mod kept;
pub(crate) use kept::refuses_serializable;
mod session;
mod url;

/// Set once a connection of this run found PostgreSQL (an engine with `exit_on_error`), whose
/// `LOCK TABLE` takes no snapshot; CockroachDB has no `LOCK TABLE`.
static TABLE_LOCKS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set once a connection of this run found PostgreSQL (by `version()`), not CockroachDB.
static POSTGRESQL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a connection of this run has found the server to be PostgreSQL (a run talks to one
/// server). False before the first connection is set up, and on CockroachDB.
pub fn found_postgresql() -> bool {
    POSTGRESQL.load(std::sync::atomic::Ordering::Relaxed)
}

/// The first statement of a REPEATABLE READ or SERIALIZABLE transaction over `tables` (a list
/// such as `accounts, transfers`): on PostgreSQL it waits, before the transaction's snapshot is
/// taken, for a DBA's table rewrite in progress (`ALTER TABLE … ADD COLUMN … DEFAULT random()`,
/// `ALTER COLUMN … TYPE`), which PostgreSQL documents as not MVCC-safe: a snapshot taken before
/// the rewrite committed sees the table empty. Without it, a statement that waited for the
/// rewrite's lock found no rows: a transfer was refused for "a trigger or rule" that did not
/// exist, a file's chunk was reported `unknown_account` for accounts that exist, `history`
/// printed an account without its entries (exit 0), `verify` failed a sound ledger, and a
/// workload's reader counted a wrong total (found by a helper playing an operator). On
/// CockroachDB, nothing is sent.
///
/// `LOCK TABLE … IN ACCESS SHARE MODE` needs SELECT (or a writing privilege) on the whole
/// table, where a read needs it only on the columns it reads: a role a DBA granted bank's
/// columns alone (a column of the DBA's own kept from it) reads and transfers, but its
/// `history` and `verify` failed with "permission denied for table accounts" and a file
/// refused every line that one transfer at a time applied. Such a role goes without the wait,
/// as before it: the lock is taken in a savepoint (which takes no snapshot either), rolled back
/// when refused, and not asked for again in the run.
pub fn wait_out_rewrites(conn: &mut PgConnection, tables: &str) -> QueryResult<()> {
    use std::sync::atomic::Ordering;
    static REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !TABLE_LOCKS.load(Ordering::Relaxed) || REFUSED.load(Ordering::Relaxed) {
        return Ok(());
    }
    if !lock_unless_refused(conn, &format!("{tables} IN ACCESS SHARE MODE"))? {
        REFUSED.store(true, Ordering::Relaxed);
    }
    Ok(())
}

/// Takes the table locks a transfer's writes take (`ROW EXCLUSIVE` on each of `tables`, a
/// table and one of its columns) without writing, so that it waits where a transfer would
/// (behind DDL or a `LOCK TABLE`). On PostgreSQL `LOCK TABLE`, which fires no trigger or rule
/// and needs only INSERT on the table: the `UPDATE … WHERE false` it replaces there met a DBA's
/// statement trigger (an append-only ledger's, accounts closed for an audit) or a role without
/// UPDATE on the ledger, and every probe that asked failed. A role granted bank's columns alone
/// may not lock the whole table: there (as on CockroachDB, which has no `LOCK TABLE`) the
/// `UPDATE` stands in, after a savepoint's rollback.
pub fn lock_as_a_writer(conn: &mut PgConnection, tables: &[(&str, &str)]) -> QueryResult<()> {
    let lock = TABLE_LOCKS.load(std::sync::atomic::Ordering::Relaxed);
    for (table, column) in tables {
        if !(lock && lock_unless_refused(conn, &format!("{table} IN ROW EXCLUSIVE MODE"))?) {
            diesel::connection::SimpleConnection::batch_execute(
                conn,
                &format!("UPDATE {table} SET {column} = {column} WHERE false"),
            )?;
        }
    }
    Ok(())
}

/// `LOCK TABLE {what}` in a savepoint (which takes no snapshot): `false` when the role may not
/// lock the whole table (a role granted bank's columns alone), the savepoint rolled back so
/// that the transaction goes on without the lock.
fn lock_unless_refused(conn: &mut PgConnection, what: &str) -> QueryResult<bool> {
    use diesel::connection::SimpleConnection;
    let locked = conn.batch_execute(&format!(
        "SAVEPOINT bank_lock; LOCK TABLE {what}; RELEASE SAVEPOINT bank_lock"
    ));
    match locked {
        Err(diesel::result::Error::DatabaseError(_, info))
            if crate::error::is_privilege_denied(info.message()) =>
        {
            log::debug!("LOCK TABLE {what}: {}; going without", info.message());
            conn.batch_execute("ROLLBACK TO SAVEPOINT bank_lock; RELEASE SAVEPOINT bank_lock")?;
            Ok(false)
        }
        locked => locked.map(|()| true),
    }
}

/// Whether the server still holds this connection's session, asked of the socket alone (nothing
/// is sent): the last step before a COMMIT (or a statement that is its own commit). A server
/// that ended the session while bank was not reading (its `idle_in_transaction_session_timeout`
/// while bank was stopped, Ctrl-Z or SIGSTOP, or slow) left its FATAL and its end of file in the
/// socket; libpq, idle, hands that FATAL to Diesel's notice processor, which drops it, so the
/// COMMIT then failed with "server closed the connection unexpectedly" alone, taken for a COMMIT
/// whose answer was lost (outcome unknown, exit 3) though it was never sent. Found here, the
/// loss comes before the COMMIT: not applied, and tried again. Twice: the first read may take in
/// the server's last message, the second its end of file. Notifications (bank LISTENs to none)
/// are passed over. The error names the loss as one before the commit; a caller inside Diesel's
/// transaction keeps its words and gives them back (`closed_connection`): the ROLLBACK Diesel
/// tries next fails too, and its error ("no connection to the server") is the one the
/// transaction returns.
pub fn still_connected(conn: &mut PgConnection) -> QueryResult<()> {
    for _ in 0..2 {
        for notification in conn.notifications_iter() {
            if let Err(e) = notification {
                return Err(closed_connection(format!(
                    "the session was gone before its COMMIT was sent, so nothing of it \
                     committed ({})",
                    e.to_string().trim_end()
                )));
            }
        }
    }
    Ok(())
}

/// A lost connection's error with these words (`still_connected`'s, kept across a ROLLBACK).
pub fn closed_connection(words: String) -> diesel::result::Error {
    diesel::result::Error::DatabaseError(
        diesel::result::DatabaseErrorKind::ClosedConnection,
        Box::new(words),
    )
}

pub use engine::{Engine, Server};
pub use session::{
    commit_synchronously, end_abandoned_transactions, idle_timeout_lifted, own_statement_timeout,
    server_idle_timeout_kept, server_statement_timeout_kept, Session,
};
pub(crate) use url::query_sets;
pub use url::{redact_message, DbUrl};

use diesel::migration::MigrationSource;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::error::{ConfigError, Unmigrated};

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Loads `.env` (from the working directory or a parent) into the environment without overriding
/// what is already set. A missing `.env` is fine; one that cannot be parsed is an error, not
/// silently ignored. Called before the command line is parsed, so `.env` can also set the
/// `BANK_*` variables that flags default to.
pub fn load_dotenv() -> Result<(), ConfigError> {
    // Set but empty (`export DATABASE_URL=`) counts as not set, as `DbUrl::resolve` takes it; left
    // in place it kept .env's URL out. So does each of the `BANK_*` variables flags default to
    // (`BANK_TIMEOUT=` was refused as an invalid duration).
    unset_empty(std::iter::once("DATABASE_URL").chain(crate::cli::VARIABLES));
    let Some(path) = find_dotenv()? else {
        return Ok(());
    };
    let failed = |why: String| ConfigError::DotEnv {
        path: path.display().to_string(),
        why,
    };
    // Parsed whole before anything is set: dotenvy's own loader sets the lines above a malformed
    // one, so a .env said to be ignored still chose the database (and the BANK_* defaults).
    // A UTF-8 byte order mark (some Windows editors write one) is no part of the first key: it
    // made a well-formed .env "malformed".
    let text = match read_dotenv(&path) {
        Ok(bytes) => bytes,
        Err(e) => return Err(failed(e.to_string())),
    };
    let text = text.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&text);
    let parsed = dotenvy::from_read_iter(text).collect::<Result<Vec<_>, _>>();
    match parsed {
        // A NUL byte is no part of any environment variable: `set_var` panicked on one, printing
        // the line's value (a password) in the panic message.
        Ok(vars) if vars.iter().any(|(_, v)| v.contains('\0')) => {
            let key = vars
                .iter()
                .find(|(_, v)| v.contains('\0'))
                .map_or_else(String::new, |(k, _)| k.clone());
            let number = String::from_utf8_lossy(text)
                .lines()
                .position(|l| dotenv_key(l) == Some(key.as_str()) && l.contains('\0'))
                .map_or_else(String::new, |i| format!(" (line {})", i + 1));
            Err(failed(format!(
                "malformed line for {key}{number}: it holds a NUL byte, which no environment \
                 variable can"
            )))
        }
        Ok(vars) => {
            let defined = |name: &str| {
                std::env::var_os(name).is_some() || vars.iter().any(|(k, _)| k == name)
            };
            let url_expands_to_nothing = std::env::var_os("DATABASE_URL").is_none()
                && String::from_utf8_lossy(text)
                    .lines()
                    .filter(|l| dotenv_key(l) == Some("DATABASE_URL"))
                    .any(|l| refers_to_unset(l, &defined));
            // The environment wins over the file; within the file the last line for a key wins,
            // as when a shell sources it (`set -a; . ./.env`) and in docker's env files, where
            // dotenvy kept the first (an edit appended below the old line went unused). Said, by
            // key only: the values may hold passwords.
            let preset: std::collections::HashSet<String> = vars
                .iter()
                .filter(|(k, _)| std::env::var_os(k).is_some())
                .map(|(k, _)| k.clone())
                .collect();
            let mut seen = std::collections::HashSet::new();
            let mut twice = std::collections::BTreeSet::new();
            for (key, value) in vars {
                if preset.contains(&key) {
                    continue;
                }
                if !seen.insert(key.clone()) {
                    twice.insert(key.clone());
                }
                std::env::set_var(key, value);
            }
            // `BANK_TIMEOUT=` in .env is no setting either (an empty `DATABASE_URL` there is
            // told apart by `DbUrl::resolve`).
            unset_empty(crate::cli::VARIABLES);
            for key in twice {
                crate::say(format_args!(
                    "bank: warning: {} sets {key} more than once; the last one is used",
                    path.display()
                ));
            }
            if url_expands_to_nothing {
                let _ = DOTENV_URL_SHORTENED.set(());
            }
            Ok(())
        }
        // dotenvy's message quotes the line (or the rest of it), which may hold a password:
        // name the key only, when the text starts with one.
        // Its number, found by its text, so that the user can look at it.
        Err(dotenvy::Error::LineParse(line, _)) => {
            let first = line.lines().next().unwrap_or_default().trim();
            let number = String::from_utf8_lossy(text)
                .lines()
                .position(|l| !first.is_empty() && l.trim() == first)
                .map_or_else(String::new, |i| format!(" (line {})", i + 1));
            Err(failed(match dotenv_key(&line) {
                Some(key) => format!("malformed line for {key}{number}"),
                None => format!(
                    "a malformed line{number}, not shown: it may hold a password; each line \
                     must be KEY=value"
                ),
            }))
        }
        Err(e) => Err(failed(e.to_string())),
    }
}

/// Removes from the environment each of `names` that is set but empty (or blank): not set.
fn unset_empty<'a>(names: impl IntoIterator<Item = &'a str>) {
    for name in names {
        if std::env::var_os(name).is_some_and(|v| v.to_string_lossy().trim().is_empty()) {
            std::env::remove_var(name);
        }
    }
}

/// The `.env` to read, as dotenvy finds it: the first file of that name in the working directory
/// or a parent. Found here rather than by dotenvy so that a message can say which file it was.
fn find_dotenv() -> Result<Option<std::path::PathBuf>, ConfigError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(cwd) = std::env::current_dir() else {
        return Ok(None);
    };
    for dir in cwd.ancestors() {
        let candidate = dir.join(".env");
        match std::fs::metadata(&candidate) {
            // A named pipe is read too: a secrets manager may serve .env through one.
            Ok(meta) if meta.is_file() || meta.file_type().is_fifo() => return Ok(Some(candidate)),
            // A directory (a Python venv named .env), a device or a socket is no .env.
            Ok(_) => {}
            // A symbolic link whose target is missing (a secrets file moved, not mounted yet)
            // was taken for no .env at all, and bank went on without its settings.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Ok(target) = std::fs::read_link(&candidate) {
                    return Err(ConfigError::DotEnv {
                        path: candidate.display().to_string(),
                        why: format!(
                            "it is a symbolic link to {}, which does not exist",
                            target.display()
                        ),
                    });
                }
            }
            Err(e) => {
                return Err(ConfigError::DotEnv {
                    path: candidate.display().to_string(),
                    why: e.to_string(),
                })
            }
        }
    }
    Ok(None)
}

/// The bytes of the `.env` at `path`. A named pipe is read until its writer closes it, as a
/// shell's `source .env` reads it, for at most `DOTENV_PIPE_WAIT`: one that no program writes
/// to held up every run, `--version` and runs given `--database-url` included, for good (a cron
/// job would hang unseen; found by a reviewer). Past that it is a `.env` that cannot be read:
/// an error when the URL was to come from it, else a warning.
fn read_dotenv(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileTypeExt;
    let fifo = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo());
    if !fifo {
        return std::fs::read(path);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let owned = path.to_path_buf();
    // Left blocked in its `open` if no writer comes: it ends with the process.
    std::thread::Builder::new()
        .name("dotenv".into())
        .spawn(move || {
            let _ = tx.send(std::fs::read(owned));
        })?;
    rx.recv_timeout(DOTENV_PIPE_WAIT).unwrap_or_else(|_| {
        Err(std::io::Error::other(format!(
            "it is a named pipe that no program wrote to within {}s",
            DOTENV_PIPE_WAIT.as_secs()
        )))
    })
}

/// How long a `.env` that is a named pipe is waited for (`read_dotenv`).
const DOTENV_PIPE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The key of a `.env` line `KEY=…` or `export KEY=…`; none when the text does not start so.
fn dotenv_key(line: &str) -> Option<&str> {
    let line = line.trim_start();
    let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
    let end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .unwrap_or(line.len());
    let (key, rest) = line.split_at(end);
    (!key.is_empty() && rest.trim_start().starts_with('=')).then_some(key)
}

/// Whether the `.env` line `KEY=value` has a `$` that dotenvy (0.15) replaces by nothing: one
/// naming a variable that is not `defined`, or naming none (`pa$@host`: the `$` goes). Its rules,
/// not a shell's: an unbraced name is letters and digits only, so `$FOO_BAR` is `$FOO` then
/// `_BAR`; `${…}` names everything up to `}`; single-quoted text and `\$` are taken as written.
fn refers_to_unset(line: &str, defined: &dyn Fn(&str) -> bool) -> bool {
    let Some((_, value)) = line.split_once('=') else {
        return false;
    };
    let mut chars = value.trim_start().chars().peekable();
    let (mut single, mut double) = (false, false);
    while let Some(c) = chars.next() {
        match c {
            '\'' if !double => single = !single,
            _ if single => {}
            '"' => double = !double,
            '\\' => {
                chars.next();
            }
            '$' => {
                let name: String = if chars.next_if_eq(&'{').is_some() {
                    chars.by_ref().take_while(|c| *c != '}').collect()
                } else {
                    std::iter::from_fn(|| chars.next_if(|c| c.is_alphanumeric())).collect()
                };
                if name.is_empty() || !defined(&name) {
                    return true;
                }
            }
            _ => {}
        }
    }
    false
}

/// Set when `.env`'s `DATABASE_URL` refers to a variable that is not set (`load_dotenv`).
static DOTENV_URL_SHORTENED: std::sync::OnceLock<()> = std::sync::OnceLock::new();

/// Whether the URL in the environment came from a `.env` line with a `$name` that expanded to
/// nothing: most likely a '$' in the password, which the server then refuses.
pub(crate) fn dotenv_url_shortened() -> bool {
    DOTENV_URL_SHORTENED.get().is_some()
}

/// Why `.env` could not be read, kept for the one command that needs it: a malformed `.env`
/// (perhaps another tool's, in a parent directory) stopped every command, `--version` included.
static DOTENV_ERROR: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();

/// Keeps `e` (from `load_dotenv`) for `dotenv_error`.
pub fn defer_dotenv_error(e: &ConfigError) {
    let _ = DOTENV_ERROR.set(match e {
        ConfigError::DotEnv { path, why } => (path.clone(), why.clone()),
        other => (".env".to_string(), other.to_string()),
    });
}

/// The `.env` that could not be read and why, if one could not.
pub fn dotenv_error() -> Option<ConfigError> {
    DOTENV_ERROR.get().map(|(path, why)| ConfigError::DotEnv {
        path: path.clone(),
        why: why.clone(),
    })
}

/// The relations (tables, and the indexes behind keys) each of this bank's migrations creates, by
/// version. Diesel commits each migration on its own, so a name already taken in the schema
/// (another application's `transfers`) failed the second migration after the first had
/// committed, leaving part of bank behind: `init` looks for these first (`in_the_way`). A unit
/// test checks the list against the migrations' SQL.
const CREATES: [(&str, &[&str]); 4] = [
    ("20261124000001", &["accounts", "accounts_pkey"]),
    (
        "20261124000002",
        &[
            "transfers",
            "transfers_pkey",
            "transfers_from_id_created_at_idx",
            "transfers_to_id_created_at_idx",
        ],
    ),
    (
        "20261124000006",
        &[
            "transfers_from_id_from_version_key",
            "transfers_to_id_to_version_key",
        ],
    ),
    (
        "20261125000001",
        &["transfer_claims", "transfer_claims_pkey"],
    ),
];

/// Of the relations the `pending` migrations create, those the schema they would go to
/// (`current_schema()`) already has.
pub fn in_the_way(conn: &mut PgConnection, pending: &[String]) -> QueryResult<Vec<String>> {
    #[derive(QueryableByName)]
    struct Name {
        #[diesel(sql_type = Text)]
        name: String,
    }
    let names: Vec<String> = CREATES
        .iter()
        .filter(|(version, _)| pending.iter().any(|p| p == version))
        .flat_map(|(_, names)| names.iter().map(ToString::to_string))
        .collect();
    if names.is_empty() {
        return Ok(Vec::new());
    }
    Ok(diesel::sql_query(
        "SELECT c.relname AS name FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = current_schema() AND c.relname = ANY($1) ORDER BY c.relname",
    )
    .bind::<diesel::sql_types::Array<Text>, _>(&names)
    .load::<Name>(conn)?
    .into_iter()
    .map(|n| n.name)
    .collect())
}

/// The first of the `pending` migrations that creates one of `taken`.
pub fn maker_of(pending: &[String], taken: &[String]) -> Option<String> {
    CREATES
        .iter()
        .find(|(version, names)| {
            pending.iter().any(|p| p == version)
                && names.iter().any(|n| taken.contains(&n.to_string()))
        })
        .map(|(version, _)| version.to_string())
}

/// A migration the harness ran that failed because what it makes is already there (`… already
/// exists`): it is not recorded, though it ran (its record deleted by hand), and Diesel's words
/// ("Failed to run 2026-11-24-000003_… with: …") said neither that nor what to do.
pub fn unrecorded_migration(e: crate::error::Error) -> crate::error::Error {
    let crate::error::Error::Migration(inner) = &e else {
        return e;
    };
    // Diesel's error type for it is private: its words are "Failed to run {name} with: {why}",
    // the name being the migration's directory (`2026-11-24-000003_transfers_distinct_accounts`).
    let text = inner.to_string();
    let Some((name, why)) = text
        .strip_prefix("Failed to run ")
        .and_then(|rest| rest.split_once(" with: "))
    else {
        return e;
    };
    // PostgreSQL's words, and CockroachDB's for a constraint.
    let there = why.contains("already exists") || why.contains("duplicate constraint name");
    let version: String = name
        .split('_')
        .next()
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    match there && !version.is_empty() {
        true => crate::error::Error::MigrationUnrecorded {
            version,
            what: format!("running it again failed: {why}"),
        },
        false => e,
    }
}

/// Runs the embedded migrations that have not run yet; returns their names.
pub fn run_migrations(conn: &mut PgConnection) -> Result<Vec<String>, crate::error::Error> {
    let done = conn
        .run_pending_migrations(MIGRATIONS)
        .map_err(crate::error::Error::Migration)?;
    Ok(done.iter().map(ToString::to_string).collect())
}

/// The versions of this bank's migrations.
pub fn known_migrations() -> Result<Vec<String>, crate::error::Error> {
    Ok(MigrationSource::<diesel::pg::Pg>::migrations(&MIGRATIONS)
        .map_err(crate::error::Error::Migration)?
        .iter()
        .map(|m| m.name().version().to_string())
        .collect())
}

/// The versions of the migrations applied, none when Diesel's table is not there (without
/// creating it, as Diesel's own harness would).
pub fn applied_migrations(conn: &mut PgConnection) -> QueryResult<Vec<String>> {
    #[derive(QueryableByName)]
    struct Version {
        #[diesel(sql_type = Text)]
        version: String,
    }
    if migrations_schema(conn)?.is_none() {
        return Ok(Vec::new());
    }
    Ok(
        diesel::sql_query("SELECT version FROM __diesel_schema_migrations ORDER BY version")
            .load::<Version>(conn)?
            .into_iter()
            .map(|v| v.version)
            .collect(),
    )
}

/// The schema of the migrations table the other statements read: the first on the search_path
/// that has one (`current_schemas`), found in the catalog, which shows it to a role that may not
/// read it. `information_schema` in `current_schema()` missed both: a role without a grant on it
/// (so doctor said "not migrated"), and bank's tables behind a schema named like the role,
/// first on the default search_path ("$user", public), where init then built a second bank.
pub fn migrations_schema(conn: &mut PgConnection) -> QueryResult<Option<String>> {
    #[derive(QueryableByName)]
    struct Name {
        #[diesel(sql_type = Text)]
        name: String,
    }
    Ok(diesel::sql_query(
        "SELECT n.nspname AS name FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relname = $1 AND n.nspname = ANY(current_schemas(false)) \
         ORDER BY array_position(current_schemas(false), n.nspname) LIMIT 1",
    )
    .bind::<Text, _>("__diesel_schema_migrations")
    .load::<Name>(conn)?
    .into_iter()
    .next()
    .map(|n| n.name))
}

/// The schema new tables go to (`current_schema()`).
pub fn creation_schema(conn: &mut PgConnection) -> QueryResult<Option<String>> {
    #[derive(QueryableByName)]
    struct Name {
        #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
        name: Option<String>,
    }
    Ok(diesel::sql_query("SELECT current_schema() AS name")
        .get_result::<Name>(conn)?
        .name)
}

/// Whether the migrations applied are another application's: some are recorded, none of them
/// this bank's (a newer bank would have applied this one's too).
pub fn is_foreign(applied: &[String], unknown: &[String]) -> bool {
    !applied.is_empty() && applied.len() == unknown.len()
}

/// This bank's migrations not among `applied`, oldest first: what `init` would run.
pub fn pending_migrations(applied: &[String]) -> Result<Vec<String>, crate::error::Error> {
    Ok(known_migrations()?
        .into_iter()
        .filter(|v| !applied.contains(v))
        .collect())
}

/// Applied migrations that are not this bank's, in version order: a newer bank migrated the
/// database (or something else wrote Diesel's table).
pub fn unknown_migrations(applied: &[String]) -> Result<Vec<String>, crate::error::Error> {
    let known = known_migrations()?;
    Ok(applied
        .iter()
        .filter(|v| !known.contains(v))
        .cloned()
        .collect())
}

/// Schemas that the search_path does not name but that hold bank's tables (Diesel's migrations
/// table and `transfers`), and the search_path itself: what to say instead of "run `bank init`"
/// when a role's or URL's search_path misses them. Best effort: if the catalog cannot be read,
/// nothing is found.
pub fn unmigrated(conn: &mut PgConnection) -> Unmigrated {
    #[derive(QueryableByName)]
    struct Name {
        #[diesel(sql_type = Text)]
        name: String,
    }
    let elsewhere = diesel::sql_query(
        "SELECT n.nspname AS name FROM pg_catalog.pg_namespace n \
         WHERE NOT (n.nspname = ANY(current_schemas(false))) \
           AND EXISTS (SELECT 1 FROM pg_catalog.pg_class c \
                       WHERE c.relnamespace = n.oid AND c.relname = $1) \
           AND EXISTS (SELECT 1 FROM pg_catalog.pg_class c \
                       WHERE c.relnamespace = n.oid AND c.relname = $2) \
         ORDER BY n.nspname",
    )
    .bind::<Text, _>("__diesel_schema_migrations")
    .bind::<Text, _>("transfers")
    .load::<Name>(conn);
    let search_path = search_path(conn);
    let here = creation_schema(conn).map(|s| s.filter(|s| !s.starts_with("pg_temp")));
    // What init would find in the way (another application's `transfers`, say): "run `bank
    // init` first" sent the user to a command that refuses (found by a helper).
    let in_the_way = known_migrations()
        .ok()
        .and_then(|all| in_the_way(conn, &all).ok())
        .unwrap_or_default();
    match (elsewhere, search_path, here) {
        (Ok(elsewhere), Ok(path), Ok(creation_schema)) => Unmigrated {
            elsewhere: elsewhere.into_iter().map(|n| n.name).collect(),
            search_path: path,
            creation_schema: creation_schema.map(Box::new),
            in_the_way,
            ..Unmigrated::default()
        },
        _ => Unmigrated::default(),
    }
}

/// bank's tables (`accounts`, `transfers`, `transfer_claims`) in schemas this connection's
/// search_path does not name, each as "accounts in schema other": where a table a statement
/// found missing may have been moved.
pub fn tables_off_the_search_path(conn: &mut PgConnection) -> QueryResult<Vec<String>> {
    #[derive(QueryableByName)]
    struct Found {
        #[diesel(sql_type = Text)]
        found: String,
    }
    Ok(diesel::sql_query(
        "SELECT c.relname || ' in schema ' || n.nspname AS found \
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relname = ANY($1) AND c.relkind = 'r' \
           AND NOT (n.nspname = ANY(current_schemas(true))) \
         ORDER BY n.nspname, c.relname",
    )
    .bind::<diesel::sql_types::Array<Text>, _>(&BANK_TABLES[1..])
    .load::<Found>(conn)?
    .into_iter()
    .map(|f| f.found)
    .collect())
}

/// Bank's tables (`accounts`, `transfers`, `transfer_claims`) this connection's search_path does
/// not find: dropped or renamed by hand since the migrations that made them ran, which `doctor`
/// called "migrated" while every command that needs one refused (a helper playing a new user).
pub fn bank_tables_missing(conn: &mut PgConnection) -> QueryResult<Vec<String>> {
    #[derive(QueryableByName)]
    struct Name {
        #[diesel(sql_type = Text)]
        name: String,
    }
    Ok(diesel::sql_query(
        "SELECT t AS name FROM unnest(CAST($1 AS TEXT[])) WITH ORDINALITY AS u(t, n) \
         WHERE to_regclass(quote_ident(t)) IS NULL ORDER BY n",
    )
    .bind::<diesel::sql_types::Array<Text>, _>(&BANK_TABLES[1..])
    .load::<Name>(conn)?
    .into_iter()
    .map(|n| n.name)
    .collect())
}

/// Bank's columns, each with the type its migrations gave it (`format_type`'s words, which
/// CockroachDB gives alike for these types), in src/schema.rs's order. A migration that changes
/// a column without this list fails
/// `readiness::bank_s_columns_are_listed_with_the_types_its_migrations_give`.
pub const BANK_COLUMN_TYPES: [(&str, &str, &str); 17] = [
    ("accounts", "id", "uuid"),
    ("accounts", "balance", "bigint"),
    ("accounts", "opening_balance", "bigint"),
    ("accounts", "version", "bigint"),
    ("accounts", "created_at", "timestamp with time zone"),
    ("transfer_claims", "id", "uuid"),
    ("transfer_claims", "generation", "bigint"),
    ("transfer_claims", "claimed_by", "uuid"),
    ("transfers", "id", "uuid"),
    ("transfers", "from_id", "uuid"),
    ("transfers", "to_id", "uuid"),
    ("transfers", "amount", "bigint"),
    ("transfers", "created_at", "timestamp with time zone"),
    ("transfers", "from_version", "bigint"),
    ("transfers", "from_balance_after", "bigint"),
    ("transfers", "to_version", "bigint"),
    ("transfers", "to_balance_after", "bigint"),
];

/// Bank's columns that are not as its migrations made them, on the tables this connection's
/// search_path finds: "transfers.amount is numeric, not bigint", "transfers.amount is missing".
/// A column retyped by hand (`ALTER … TYPE numeric`) left `doctor` saying "migrated" while
/// `history` failed with Diesel's "Received more than 8 bytes while decoding an i64".
pub fn bank_columns_changed(conn: &mut PgConnection) -> QueryResult<Vec<String>> {
    #[derive(QueryableByName)]
    struct Found {
        #[diesel(sql_type = Text)]
        name: String,
        #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
        found: Option<String>,
        #[diesel(sql_type = Text)]
        want: String,
    }
    let (mut tables, mut columns, mut types) = (Vec::new(), Vec::new(), Vec::new());
    for (t, c, ty) in BANK_COLUMN_TYPES {
        tables.push(t);
        columns.push(c);
        types.push(ty);
    }
    let found: Vec<Found> = diesel::sql_query(
        "SELECT u.t || '.' || u.c AS name, format_type(a.atttypid, a.atttypmod) AS found, \
                u.ty AS want \
         FROM (SELECT t, (CAST($2 AS TEXT[]))[n] AS c, (CAST($3 AS TEXT[]))[n] AS ty, n \
               FROM unnest(CAST($1 AS TEXT[])) WITH ORDINALITY AS v(t, n)) AS u \
         LEFT JOIN pg_catalog.pg_attribute a \
           ON a.attrelid = to_regclass(quote_ident(u.t)) AND a.attname = u.c \
              AND a.attnum > 0 AND NOT a.attisdropped \
         WHERE to_regclass(quote_ident(u.t)) IS NOT NULL \
         ORDER BY u.n",
    )
    .bind::<diesel::sql_types::Array<Text>, _>(&tables)
    .bind::<diesel::sql_types::Array<Text>, _>(&columns)
    .bind::<diesel::sql_types::Array<Text>, _>(&types)
    .load(conn)?;
    Ok(found
        .into_iter()
        .filter_map(|f| match f.found {
            None => Some(format!("{} is missing", f.name)),
            Some(found) if found != f.want => {
                Some(format!("{} is {found}, not {}", f.name, f.want))
            }
            Some(_) => None,
        })
        .collect())
}

/// The tables bank's statements name, as this connection's search_path finds them.
const BANK_TABLES: [&str; 4] = [
    "__diesel_schema_migrations",
    "accounts",
    "transfers",
    "transfer_claims",
];

/// Bank's schema (its migrations table's) and those of its tables that this connection's
/// search_path finds first in another schema, each as "accounts in schema other"; `None` when
/// all are in one. Another application's table named `accounts` in a schema before bank's made
/// transfers move the money in it and write their ledger rows in bank's `transfers` (found by a
/// helper playing a new user).
pub fn shadowed_tables(conn: &mut PgConnection) -> QueryResult<Option<(String, Vec<String>)>> {
    #[derive(QueryableByName)]
    struct Found {
        #[diesel(sql_type = Text)]
        table_name: String,
        #[diesel(sql_type = Text)]
        schema_name: String,
    }
    let found = diesel::sql_query(
        "SELECT DISTINCT ON (c.relname) c.relname AS table_name, n.nspname AS schema_name \
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relname = ANY($1) AND c.relkind IN ('r', 'p', 'v', 'm', 'f') \
           AND n.nspname = ANY(current_schemas(false)) \
         ORDER BY c.relname, array_position(current_schemas(false), n.nspname)",
    )
    .bind::<diesel::sql_types::Array<Text>, _>(&BANK_TABLES[..])
    .load::<Found>(conn)?;
    let Some(bank) = found
        .iter()
        .find(|f| f.table_name == BANK_TABLES[0])
        .map(|f| f.schema_name.clone())
    else {
        return Ok(None);
    };
    let shadowed: Vec<String> = found
        .iter()
        .filter(|f| f.schema_name != bank)
        .map(|f| format!("{} in schema {}", f.table_name, f.schema_name))
        .collect();
    Ok((!shadowed.is_empty()).then_some((bank, shadowed)))
}

/// `require_migrated`, then `require_unchanged`: what a connection that writes must pass before
/// it sends anything.
pub fn require_writable(
    conn: &mut PgConnection,
    timeout: std::time::Duration,
) -> Result<(), crate::error::Error> {
    require_migrated(conn, timeout)?;
    require_unchanged(conn)
}

/// Refuses bank's tables changed in ways its promise cannot survive (`unsafe_changes`), before
/// a command that writes sends anything; reads go on (`lookup` is how an unknown outcome is
/// settled, and none of these changes alters what a read sees). A catalog this role may not
/// read leaves the check unmade (`doctor` says so).
pub fn require_unchanged(conn: &mut PgConnection) -> Result<(), crate::error::Error> {
    match unsafe_changes(conn) {
        Ok(changes) if !changes.is_empty() => Err(crate::error::Error::NotMigrated(Unmigrated {
            unsafe_changes: Some(Box::new(changes)),
            ..Unmigrated::default()
        })),
        Ok(_) => Ok(()),
        Err(e) => {
            log::debug!("bank's tables could not be checked for changes ({e})");
            Ok(())
        }
    }
}

/// Changes a DBA made to bank's tables (as this connection's search_path finds them) that its
/// promise cannot survive, each said with how to undo it; found by a fault-injecting helper:
/// - a rule on one of them rewrites bank's statements (one redirecting the ledger's inserts made
///   every rerun of a file apply its lines again);
/// - no immediate unique index on `id` alone (a primary key made DEFERRABLE let two runs of one
///   id both say "moved"; dropped, the money moved twice);
/// - a trigger on `transfer_claims` (rewriting a run's mark made it call its own apply another
///   run's; dropping a claim overturned a rerun's "not applied");
/// - an UNLOGGED table (a crash empties it, and a rerun moved the money again);
/// - a view or a foreign table in a table's place.
///
/// PostgreSQL's alone: CockroachDB has no rules, unlogged tables or deferrable keys, and its
/// catalogs would take a hash-sharded primary key (its shard column first) for no key on `id`
/// (a reviewer's point): there the query returns nothing.
pub fn unsafe_changes(conn: &mut PgConnection) -> QueryResult<Vec<String>> {
    #[derive(QueryableByName)]
    struct Change {
        #[diesel(sql_type = Text)]
        change: String,
    }
    Ok(diesel::sql_query(
        "WITH r AS (SELECT t.name, to_regclass(t.name) AS oid FROM unnest(CAST($1 AS TEXT[])) AS t(name) \
           WHERE strpos(version(), 'CockroachDB') = 0) \
         SELECT r.name || ' has a rule (' || quote_ident(w.rulename) || ') that rewrites bank''s \
           statements: DROP RULE ' || quote_ident(w.rulename) || ' ON ' || r.name AS change \
         FROM r JOIN pg_catalog.pg_rewrite w ON w.ev_class = r.oid \
         WHERE w.rulename <> '_RETURN' AND w.ev_enabled <> 'D' \
         UNION ALL \
         SELECT r.name || ' is a ' || CASE c.relkind WHEN 'v' THEN 'view' WHEN 'f' THEN \
           'foreign table' WHEN 'm' THEN 'materialized view' ELSE 'relation of another kind' END \
           || ', not a table: give bank its table back' \
         FROM r JOIN pg_catalog.pg_class c ON c.oid = r.oid WHERE c.relkind NOT IN ('r', 'p') \
         UNION ALL \
         SELECT r.name || ' is UNLOGGED (a crash empties it): ALTER TABLE ' || r.name \
           || ' SET LOGGED' \
         FROM r JOIN pg_catalog.pg_class c ON c.oid = r.oid WHERE c.relpersistence = 'u' \
         UNION ALL \
         SELECT r.name || ' has no immediate unique index on id alone (its primary key was \
           dropped, or made DEFERRABLE), so one id could be applied twice: restore its PRIMARY \
           KEY (id)' \
         FROM r JOIN pg_catalog.pg_class c ON c.oid = r.oid WHERE c.relkind IN ('r', 'p') \
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attname = 'id' \
             WHERE i.indrelid = r.oid AND i.indisunique AND i.indimmediate AND i.indisvalid \
               AND i.indnkeyatts = 1 AND i.indkey[0] = a.attnum AND i.indpred IS NULL) \
         UNION ALL \
         SELECT 'transfer_claims has a trigger (' || quote_ident(g.tgname) || ') that may change \
           or drop the claims bank writes: DROP TRIGGER ' || quote_ident(g.tgname) \
           || ' ON transfer_claims' \
         FROM r JOIN pg_catalog.pg_trigger g ON g.tgrelid = r.oid \
         WHERE r.name = 'transfer_claims' AND NOT g.tgisinternal AND g.tgenabled <> 'D'",
    )
    .bind::<diesel::sql_types::Array<Text>, _>(&BANK_TABLES[1..])
    .load::<Change>(conn)?
    .into_iter()
    .map(|c| c.change)
    .collect())
}

/// The connection's `search_path` as the run found it (`kept::search_path_as_found`).
pub fn search_path(conn: &mut PgConnection) -> QueryResult<String> {
    Ok(kept::search_path_as_found(shown_search_path(conn)?))
}

/// The connection's `search_path`, as the server shows it.
fn shown_search_path(conn: &mut PgConnection) -> QueryResult<String> {
    #[derive(QueryableByName)]
    struct Path {
        #[diesel(sql_type = Text)]
        path: String,
    }
    Ok(
        diesel::sql_query("SELECT current_setting('search_path') AS path")
            .get_result::<Path>(conn)?
            .path,
    )
}

/// Refuses a database that lacks any of this bank's migrations, before a command reads or
/// writes it: on a partly migrated one `seed` wrote, `balances` listed and `verify` failed with a
/// raw "column does not exist". One query: how many of the known versions are applied, read
/// again while a conflict of the moment stops it until `timeout` (`retry::retry_read`): another
/// session holding Diesel's table past the server's lock_timeout (a DBA's `LOCK TABLE`, a
/// `VACUUM FULL`) failed every command at once.
pub fn require_migrated(
    conn: &mut PgConnection,
    timeout: std::time::Duration,
) -> Result<(), crate::error::Error> {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let known = known_migrations()?;
    let applied = crate::retry::retry_read(timeout, || {
        diesel::sql_query(
            "SELECT CAST(COUNT(*) AS INT8) AS n FROM __diesel_schema_migrations \
             WHERE version = ANY($1)",
        )
        .bind::<diesel::sql_types::Array<Text>, _>(&known)
        .get_result::<Count>(conn)
    });
    match applied {
        Ok(c) if c.n as usize >= known.len() => match shadowed_tables(conn) {
            Ok(Some(shadowed)) => Err(crate::error::Error::NotMigrated(Unmigrated {
                search_path: search_path(conn).unwrap_or_default(),
                shadowed: Some(Box::new(shadowed)),
                ..Unmigrated::default()
            })),
            // Not readable (a catalog a role may not read): the migrations' check stands.
            _ => Ok(()),
        },
        // Some of them ran: the ledger may hold a given id (`Unmigrated::ledger_may_hold_ids`).
        Ok(c) => Err(crate::error::Error::NotMigrated(Unmigrated {
            partly_migrated: c.n > 0,
            ..Unmigrated::default()
        })),
        // No migrations table on the search_path: never migrated, or migrated elsewhere.
        Err(diesel::result::Error::DatabaseError(_, info))
            if info.message().contains("does not exist") =>
        {
            Err(crate::error::Error::NotMigrated(unmigrated(conn)))
        }
        // A role granted only the application's tables: the check cannot be made, and a schema
        // too old still fails the command's own statement as not migrated.
        // (CockroachDB's words: "user … does not have SELECT privilege on relation …".)
        Err(diesel::result::Error::DatabaseError(_, info))
            if crate::error::is_privilege_denied(info.message()) =>
        {
            log::debug!(
                "the migrations cannot be read ({}); not checked",
                info.message()
            );
            Ok(())
        }
        // Ctrl-C (or SIGTERM) stopped it being read again (`retry_read`): said as such, where
        // the lock's words said a seed or a reset stopped by one had failed (exit 1).
        Err(e) if crate::retry::stopped_by_ctrl_c(&e) => {
            log::debug!("the migrations' check: {e}; interrupted");
            Err(crate::error::Error::Stopped(crate::interrupt::reason()))
        }
        Err(e) => Err(e.into()),
    }
}

/// Drops Diesel's migrations table if it records nothing: what a first `bank init` that failed
/// left behind. Best effort: a failure leaves it, as before.
///
/// Read, then dropped, the table could be another init's whose first migration committed in
/// between (the DROP waited for that very transaction's lock, then took its record away). So
/// the transaction's first statement renames it (the one lock-taking statement both engines
/// accept; LOCK TABLE is PostgreSQL's), and reads it only then. On PostgreSQL the rename's lock
/// makes the table this transaction's alone, and READ COMMITTED lets the read see what
/// committed while the rename waited. The statements are valid on CockroachDB (which runs a
/// READ COMMITTED transaction whose first statement is a schema change as SERIALIZABLE, and
/// refuses a schema change after a read), but its rename takes no lock, so `init` does not call
/// this there. `conn` must be a migration session (`engine::prepare_migration_session`).
pub fn drop_empty_migrations_table(conn: &mut PgConnection) {
    const HELD: &str = "__bank_dropping_diesel_schema_migrations";
    if !migrations_schema(conn).is_ok_and(|s| s.is_some()) {
        return;
    }
    let dropped = conn
        .build_transaction()
        .read_committed()
        .run(|conn| -> QueryResult<bool> {
            diesel::sql_query(format!(
                "ALTER TABLE IF EXISTS __diesel_schema_migrations RENAME TO {HELD}"
            ))
            .execute(conn)?;
            #[derive(QueryableByName)]
            struct Count {
                #[diesel(sql_type = BigInt)]
                n: i64,
            }
            let rows = diesel::sql_query(format!("SELECT CAST(COUNT(*) AS INT8) AS n FROM {HELD}"))
                .get_result::<Count>(conn)?
                .n;
            if rows > 0 {
                // Someone else's migrations: the rename goes with the rollback.
                return Err(diesel::result::Error::RollbackTransaction);
            }
            diesel::sql_query(format!("DROP TABLE {HELD}")).execute(conn)?;
            Ok(true)
        });
    match dropped {
        Ok(_) | Err(diesel::result::Error::RollbackTransaction) => {}
        Err(e) => log::debug!("init: the empty migrations table stays ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `CREATES` names every relation the migrations' SQL creates, by version.
    #[test]
    fn the_relations_each_migration_creates_are_all_listed() {
        for m in MigrationSource::<diesel::pg::Pg>::migrations(&MIGRATIONS).expect("migrations") {
            let version = m.name().version().to_string();
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations")
                .join(m.name().to_string());
            let sql = std::fs::read_to_string(dir.join("up.sql")).expect("up.sql");
            let mut found = Vec::new();
            let words: Vec<&str> = sql.split_whitespace().collect();
            for (i, w) in words.iter().enumerate() {
                let next = |k: usize| words.get(i + k).map(|n| n.trim_end_matches(['(', ';']));
                match *w {
                    "TABLE" if i > 0 && words[i - 1] == "CREATE" => found.extend(next(1)),
                    "INDEX" if i > 0 && words[..i].ends_with(&["CREATE"]) => found.extend(next(1)),
                    "INDEX" if i > 1 && words[i - 2..i] == ["CREATE", "UNIQUE"] => {
                        found.extend(next(1))
                    }
                    "CONSTRAINT" if next(2) == Some("PRIMARY") || next(2) == Some("UNIQUE") => {
                        found.extend(next(1))
                    }
                    _ => {}
                }
            }
            found.sort_unstable();
            let mut listed: Vec<&str> = CREATES
                .iter()
                .find(|(v, _)| *v == version)
                .map(|(_, names)| names.to_vec())
                .unwrap_or_default();
            listed.sort_unstable();
            assert_eq!(found, listed, "migration {version}");
        }
    }
}
