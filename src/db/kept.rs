//! What every connection of a run keeps from the run's first: the search_path that connection
//! found (and `require_migrated` checked), the server's messages in English, and every row of
//! bank's tables in sight.
//!
//! The search_path: PostgreSQL resolves names again whenever the schemas a path names change: a
//! schema named after the role made mid-run (`"$user"` comes first on the default path), or
//! `ALTER SYSTEM SET search_path` with a reload, took the ledger and the claims of the
//! connections already open to another schema's tables, and a rerun applied the same ids again
//! (found by a fault-injecting helper). Each connection sets the schemas the first one found
//! (those of its path that exist), as quoted identifiers (a `SET` takes no bind parameters; the
//! names are the server's); the session's own temporary schema is `pg_temp`, whatever its
//! number. Nothing is set where no schema of the path exists: no table of bank's resolves then
//! either.
//!
//! The messages: the errors bank retries (a lock or statement timeout, a deadlock, a
//! cancellation, a terminated connection) and the ones it explains (a full disk, a missing
//! privilege) are told apart by their words, Diesel giving no SQLSTATE for them. Under a role's
//! `lc_messages = 'de_DE.UTF-8'` a lock timeout was reported as the database's refusal and not
//! retried (found by a fault-injecting helper). Where `lc_messages` is not `C`, each session
//! sets it so; a role that may not (superusers may, or `GRANT SET ON PARAMETER lc_messages`) is
//! warned once and goes on: outcomes stay true either way (an error bank does not know is no
//! proof of anything).
//!
//! The session's end at an error: under `exit_on_error = on` (a role's, a database's, or
//! `PGOPTIONS`') the server ends the session at its first error, and bank meets errors by design:
//! a refused `lc_messages` ended every session of a role that may not set it before its first
//! statement (every command failed with "the session could not be set up: no connection to the
//! server"), and a transfer refused for insufficient funds lost its connection instead, so a
//! single statement said its outcome was unknown (exit 3, after 31 attempts) where it was
//! refused (found by a helper playing a new user). Where the engine has the setting, each session
//! sets `exit_on_error = off` first, in the same round trip.
//!
//! The isolation on a hot standby: one whose default is SERIALIZABLE (a primary's
//! `default_transaction_isolation`, copied by `pg_basebackup` or set on the database, as
//! `scripts/pg` sets CockroachDB's default) refuses every transaction there, reads included
//! ("cannot use serializable mode in a hot standby"), so every command failed as the session was
//! set up, `verify`'s own fallback never reached (found by a mutation-testing helper). Where the
//! first query meets that refusal, each session of the run defaults to REPEATABLE READ: one
//! snapshot per transaction, what PostgreSQL offers a standby (it runs no writes there to keep
//! apart).
//!
//! The rows: a DBA's row-level security policy that hid ledger rows from bank's role made a
//! committed id look absent, and its rerun said "not applied" (found by a fault-injecting
//! helper); hidden accounts make `verify` report violations that are not there. Each session
//! sets `row_security = off`, as pg_dump does: a query a policy would filter fails instead, and
//! a run that cannot read the ledger says its outcome is unknown. Where the engine has no such
//! setting, nothing is set.

use std::sync::{Mutex, MutexGuard};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{Array, Nullable, Text};

/// What the first connection of this run to one URL found. A run has one URL; the tests, many.
struct Kept {
    url: String,
    /// The search_path as the server showed it, before it was kept: what messages name.
    found: String,
    /// The schemas it named that exist, as a `SET` takes them; empty when none does.
    path: String,
    /// Each session sets `lc_messages = 'C'` (the server's is another, and this role may).
    english: bool,
    /// Each session sets `row_security = off` (the engine has the setting, and it is on).
    all_rows: bool,
    /// Each session sets `exit_on_error = off` (the engine has the setting).
    stay: bool,
    /// Each session defaults to REPEATABLE READ (a hot standby that refuses its SERIALIZABLE).
    repeatable: bool,
}

static KEPT: Mutex<Vec<Kept>> = Mutex::new(Vec::new());

/// A poisoned lock (a thread panicked holding it) still holds what was kept.
fn kept() -> MutexGuard<'static, Vec<Kept>> {
    KEPT.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sets what the run's first connection to `url` found on `conn` (see the module's comment);
/// the first connection finds it. An error fails the connection: the names could resolve
/// elsewhere.
pub(super) fn keep(conn: &mut PgConnection, url: &str) -> QueryResult<()> {
    let known = kept()
        .iter()
        .find(|k| k.url == url)
        .map(|k| (k.path.clone(), k.english, k.all_rows, k.stay, k.repeatable));
    let Some((path, english, all_rows, stay, repeatable)) = known else {
        return first(conn, url);
    };
    if repeatable {
        conn.batch_execute(REPEATABLE)?;
    }
    set(conn, &path, english, all_rows, stay).map(|_| ())
}

/// With `stay` `exit_on_error = off` first, `SET search_path = path` (unless empty), with
/// `all_rows` `row_security = off`, and with `english` `lc_messages = 'C'`, in one round trip;
/// whether the last was set. A refused `lc_messages` (the privilege revoked since) costs the
/// words, not the session (`exit_on_error` was already off when it failed): the others, which
/// its failure rolled back, are set again alone.
fn set(
    conn: &mut PgConnection,
    path: &str,
    english: bool,
    all_rows: bool,
    stay: bool,
) -> QueryResult<bool> {
    let mut sql = match stay {
        true => "SET exit_on_error = off; ".to_string(),
        false => String::new(),
    };
    if !path.is_empty() {
        sql.push_str(&format!("SET search_path = {path}; "));
    }
    if all_rows {
        sql.push_str("SET row_security = off; ");
    }
    if english {
        match conn.batch_execute(&format!("{sql}SET lc_messages = 'C'")) {
            Ok(()) => return Ok(true),
            Err(e) => log::debug!("lc_messages could not be set: {e}"),
        }
    }
    if !sql.is_empty() {
        conn.batch_execute(&sql)?;
    }
    Ok(false)
}

/// What a session on a hot standby that refuses SERIALIZABLE defaults to.
const REPEATABLE: &str = "SET default_transaction_isolation = 'repeatable read'";

/// PostgreSQL's refusal of a SERIALIZABLE transaction on a hot standby (SQLSTATE 0A000, which
/// Diesel does not give: told by its words, which bank's sessions keep in English).
pub(crate) fn refuses_serializable(e: &diesel::result::Error) -> bool {
    matches!(e, diesel::result::Error::DatabaseError(_, info)
        if info.message().contains("cannot use serializable mode in a hot standby"))
}

fn first(conn: &mut PgConnection, url: &str) -> QueryResult<()> {
    #[derive(QueryableByName)]
    struct Found {
        #[diesel(sql_type = Array<Text>)]
        schemas: Vec<String>,
        #[diesel(sql_type = Text)]
        path: String,
        /// `None` where the engine has no such setting.
        #[diesel(sql_type = Nullable<Text>)]
        messages: Option<String>,
        /// `None` where the engine has no such setting.
        #[diesel(sql_type = Nullable<Text>)]
        row_security: Option<String>,
        /// `None` where the engine has no such setting.
        #[diesel(sql_type = Nullable<Text>)]
        exit_on_error: Option<String>,
        /// `version()`, which tells the engine (`engine::Server::parse`).
        #[diesel(sql_type = Text)]
        version: String,
    }
    // The settings an engine may lack are read from `pg_settings` (no row: `None`), not with
    // `current_setting(…, true)`: CockroachDB refuses that for the PostgreSQL settings it lists
    // as unsupported (`exit_on_error` among them: "unimplemented: the configuration setting …
    // is not supported", whatever `missing_ok` says), which failed every session there.
    let query = diesel::sql_query(
        "SELECT current_schemas(false) AS schemas, current_setting('search_path') AS path, \
         (SELECT setting FROM pg_catalog.pg_settings WHERE name = 'lc_messages') AS messages, \
         (SELECT setting FROM pg_catalog.pg_settings WHERE name = 'row_security') \
           AS row_security, \
         (SELECT setting FROM pg_catalog.pg_settings WHERE name = 'exit_on_error') \
           AS exit_on_error, \
         version() AS version",
    );
    let mut repeatable = false;
    let found: Found = match query.clone().get_result(conn) {
        Err(e) if refuses_serializable(&e) => {
            conn.batch_execute(REPEATABLE)?;
            repeatable = true;
            query.get_result(conn)?
        }
        found => found?,
    };
    let path = found
        .schemas
        .iter()
        .map(|name| match name.starts_with("pg_temp_") {
            true => "pg_temp".to_string(),
            false => format!("\"{}\"", name.replace('"', "\"\"")),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let language = found
        .messages
        .filter(|m| !matches!(m.as_str(), "C" | "POSIX" | ""));
    let all_rows = found.row_security.is_some_and(|r| r != "off");
    // Set wherever the engine has it, on or not: a DBA may turn it on mid-run.
    let stay = found.exit_on_error.is_some();
    // By the engine too, not by the setting alone: a CockroachDB that came to list
    // `exit_on_error` (as it lists other PostgreSQL settings it ignores) would have been sent
    // `LOCK TABLE`, which it does not have (a dialect audit's point).
    let postgresql = !super::engine::Server::parse(&found.version).is_cockroachdb();
    if postgresql {
        super::POSTGRESQL.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if stay && postgresql {
        super::TABLE_LOCKS.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let english = set(conn, &path, language.is_some(), all_rows, stay)?;
    if let (Some(language), false) = (&language, english) {
        // English in all but name ("en_US.UTF-8", "C.UTF-8"): nothing to say.
        if !(language.starts_with("en") || language.starts_with("C.")) {
            warn_once(url, language);
        }
    }
    let mut all = kept();
    match all.iter().find(|k| k.url == url) {
        // Another connection of the run kept one meanwhile: the first stands.
        Some(k) if k.path != path && !k.path.is_empty() => {
            conn.batch_execute(&format!("SET search_path = {}", k.path))?;
        }
        Some(_) => {}
        None => all.push(Kept {
            url: url.to_string(),
            found: found.path,
            path,
            english,
            all_rows,
            stay,
            repeatable,
        }),
    }
    Ok(())
}

/// The warning that the server's messages stay in `language`, once per URL (a file's workers
/// connect together).
fn warn_once(url: &str, language: &str) {
    static WARNED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned.iter().any(|u| u == url) {
        return;
    }
    warned.push(url.to_string());
    log::warn!(
        "the server writes its messages in {language} (lc_messages) and this role may not set \
         them to English: bank tells lock timeouts, deadlocks and cancellations apart by \
         their words, so it may report them as refusals instead of retrying; a superuser can run \
         ALTER ROLE … SET lc_messages = 'C', or GRANT SET ON PARAMETER lc_messages TO the role"
    );
}

/// The search_path the run found, for a session whose setting `keep` replaced (`shown`, as the
/// server shows it): messages name the user's setting ("nowhere, pg_temp"), not bank's.
pub(super) fn search_path_as_found(shown: String) -> String {
    // As the server shows a path: quotes only where a name needs them.
    let bare = |p: &str| p.replace(['"', ' '], "");
    let all = kept();
    match all
        .iter()
        .find(|k| !k.path.is_empty() && bare(&k.path) == bare(&shown))
    {
        Some(k) => k.found.clone(),
        None => shown,
    }
}
