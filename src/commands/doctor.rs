//! `doctor`: what a user checks before anything else. Which server this is, whether the schema
//! is there, the connection settings in force, and how many rows there are. Reads only.

use std::collections::BTreeMap;
use std::io::{self, Write};

use diesel::prelude::*;
use diesel::sql_types::Bool;
use serde::Serialize;

use crate::db::{self, DbUrl, Engine};
use crate::error::Error;
use crate::repo;
use crate::schema::{accounts, transfers};

#[derive(Serialize)]
struct Report {
    engine: Engine,
    release: String,
    version: String,
    default_isolation: Option<String>,
    /// `None` (null) when it cannot be told (`migrations_readable` false).
    migrated: Option<bool>,
    /// Whether this role may read Diesel's migrations table; when not, `migrated` and
    /// `pending_migrations` are null (they said false and every migration pending).
    migrations_readable: bool,
    /// The newest migration applied (its version), if any.
    migration_version: Option<String>,
    pending_migrations: Option<usize>,
    /// Applied migrations this bank does not have (a newer bank migrated the database).
    unknown_migrations: Vec<String>,
    /// Relations that bank's pending migrations would create and the schema already has
    /// (another application's): `init` refuses while there are any.
    init_blocked_by: Vec<String>,
    /// Schemas off this connection's search_path that hold bank's tables, when none is on it:
    /// the search_path to fix, not `init` to run.
    tables_off_search_path: Vec<String>,
    /// Bank's tables this connection finds first in another schema than bank's (another
    /// application's table of the same name): every command that needs the schema refuses it.
    tables_in_other_schemas: Vec<String>,
    /// Bank's tables that its recorded migrations made and this connection's search_path does
    /// not find (dropped or renamed by hand since): `migrated` is then false.
    tables_missing: Vec<String>,
    /// Bank's columns missing, or of another type than its migrations gave them, on tables that
    /// are there ("transfers.amount is numeric, not bigint"): changed by hand since; `migrated`
    /// is then false.
    columns_changed: Vec<String>,
    /// Changes to bank's tables its promise cannot survive, each with its undo
    /// (`db::unsafe_changes`): every command that writes refuses them (reads go on, and
    /// `migrated` stays true: the schema is bank's, altered). `None` (null)
    /// when the catalogs could not be read (then nothing refuses them: said, not hidden).
    unsafe_changes: Option<Vec<String>>,
    /// Server-side settings of this session.
    settings: BTreeMap<String, Option<String>>,
    /// Whether this connection is encrypted; `None` when the server does not say.
    tls: Option<bool>,
    /// The libpq parameters `bank` connects with (the URL's, else its own).
    client: BTreeMap<String, String>,
    accounts: Option<i64>,
    transfers: Option<i64>,
    /// Whether this role may claim transfer ids (INSERT on `transfer_claims`): without it a
    /// refused `--id` transfer stays unknown and single-statement transfers fail. `None` when
    /// not migrated, or the server cannot say.
    claims_writable: Option<bool>,
    /// Of the privileges bank's commands take on its tables (SELECT, INSERT, UPDATE and DELETE
    /// on each), those this role lacks, as "INSERT on accounts"; empty when not migrated or the
    /// server cannot say.
    missing_privileges: Vec<String>,
    /// How many of the synchronous standbys `synchronous_standby_names` asks for are not
    /// connected (PostgreSQL's primary only; 0 when none is asked for or all are there): while
    /// any is missing, every COMMIT that writes waits for it, forever. `None` (null) on
    /// CockroachDB, on a standby, or when the server does not say.
    synchronous_standbys_missing: Option<i64>,
}

/// `synchronous_standby_names` and the standbys that may count towards it.
#[derive(QueryableByName)]
struct SyncRep {
    #[diesel(sql_type = diesel::sql_types::Text)]
    names: String,
    /// Connected standbys that are synchronous (or quorum) now, and those whose state this
    /// role may not see (`pg_read_all_stats` shows it): as many as may be.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    connected: i64,
}

#[derive(QueryableByName)]
struct Tls {
    #[diesel(sql_type = Bool)]
    ssl: bool,
}

/// The server settings `doctor` shows: the timeouts that bound a stuck transaction, the name the
/// session goes by, and whether a COMMIT's answer waits for its WAL.
const SETTINGS: [&str; 6] = [
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "application_name",
    // `off` is the database's or the role's choice, which bank's sessions override (see
    // `db::session::tune`); shown, since other clients of the database lose commits to a crash.
    "synchronous_commit",
    // `on` on a hot standby (or with `default_transaction_read_only`): every transfer fails
    // there, and doctor said nothing of it (found by a fault-injecting helper).
    "transaction_read_only",
];

pub(super) fn doctor(
    url: &DbUrl,
    json: bool,
    timeout: std::time::Duration,
    out: &mut impl Write,
) -> Result<(), Error> {
    // Read on a connection made again when it is lost before the migrations are read (a DBA
    // ending its backend while it waits on a lock on Diesel's table), as every command's first
    // check is (`DbUrl::connect_checked`): doctor ended at once with the server's words.
    let (mut conn, (server, default_isolation, settings, tls, applied)) =
        url.connect_checked(timeout, |conn| {
            let server = db::engine::detect(conn)?;
            let default_isolation = setting(conn, "default_transaction_isolation");
            let settings: BTreeMap<String, Option<String>> = SETTINGS
                .iter()
                .map(|name| (name.to_string(), setting(conn, name)))
                .collect();
            // PostgreSQL's view of this connection; a server without it leaves TLS unknown.
            let tls = diesel::sql_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .get_result::<Tls>(conn)
                .map(|t| t.ssl)
                .ok();
            // A role granted the application's tables only may not read Diesel's: doctor cannot
            // tell then, and says so (it said "not migrated", and init, which it advised, was
            // refused). Read again while a conflict of the moment stops it (a DBA's lock on
            // Diesel's table held past the server's lock_timeout failed doctor at once).
            let applied = crate::retry::retry_read(timeout, || db::applied_migrations(conn));
            let applied = match applied {
                Ok(applied) => Some(applied),
                Err(diesel::result::Error::DatabaseError(_, info))
                    if crate::error::is_privilege_denied(info.message()) =>
                {
                    None
                }
                Err(e) => return Err(e.into()),
            };
            Ok((server, default_isolation, settings, tls, applied))
        })?;
    let (applied, migrations_readable) = match applied {
        Some(applied) => (applied, true),
        None => (Vec::new(), false),
    };
    let unknown_migrations = db::unknown_migrations(&applied)?;
    let pending = db::pending_migrations(&applied)?;
    let pending_migrations = pending.len();
    let shadowed = match migrations_readable && !applied.is_empty() {
        true => db::shadowed_tables(&mut conn).ok().flatten(),
        false => None,
    };
    // Recorded as migrated, but a table dropped or renamed by hand since: every command that
    // needs it refuses, so the schema is not whole (it said "migrated").
    // Only once every migration ran: a pending one may be what makes the table.
    let whole_on_record = migrations_readable && !applied.is_empty() && pending_migrations == 0;
    let tables_missing = match whole_on_record && shadowed.is_none() {
        true => db::bank_tables_missing(&mut conn).unwrap_or_else(|e| {
            log::debug!("doctor: whether bank's tables are all there is not known ({e})");
            Vec::new()
        }),
        false => Vec::new(),
    };
    let columns_changed = match whole_on_record && shadowed.is_none() {
        true => db::bank_columns_changed(&mut conn).unwrap_or_else(|e| {
            log::debug!("doctor: whether bank's columns are as migrated is not known ({e})");
            Vec::new()
        }),
        false => Vec::new(),
    };
    let migrated = !applied.is_empty()
        && pending_migrations == 0
        && shadowed.is_none()
        && tables_missing.is_empty()
        && columns_changed.is_empty();
    let (unsafe_changes, unchecked) = match migrated {
        true => match db::unsafe_changes(&mut conn) {
            Ok(changes) => (Some(changes), None),
            Err(e) => (None, Some(e.to_string())),
        },
        false => (Some(Vec::new()), None),
    };
    // What `init` would find in the way: advised to a database it would refuse, it sent the
    // user round in a loop.
    let init_blocked_by = match migrations_readable {
        true => db::in_the_way(&mut conn, &pending)?,
        false => Vec::new(),
    };
    let off_path = match (applied.is_empty(), migrations_readable) {
        (true, true) => db::unmigrated(&mut conn),
        _ => Default::default(),
    };
    // Counted only when the schema is bank's whole: a partly migrated database, or another
    // application's, may lack either table, and doctor is there to report it, not to fail.
    // A role that may not read them is what doctor is there to report (it failed with
    // "permission denied" instead).
    // Counted again while a conflict of the moment stops the count (another session's lock
    // held past the server's lock_timeout: doctor failed at once).
    let (accounts, transfers) = if migrated {
        // A connection lost before they answered (they waited on a lock on the tables, where
        // a DBA ended the backend) is made again (`DbUrl::read_reconnecting`).
        url.read_reconnecting(&mut conn, timeout, |conn| {
            Ok((
                unless_denied(crate::retry::retry_read(timeout, || {
                    accounts::table.count().get_result(conn)
                }))?,
                unless_denied(crate::retry::retry_read(timeout, || {
                    transfers::table.count().get_result(conn)
                }))?,
            ))
        })?
    } else if !migrations_readable {
        (
            accounts::table.count().get_result(&mut conn).ok(),
            transfers::table.count().get_result(&mut conn).ok(),
        )
    } else {
        (None, None)
    };
    // Every privilege bank's commands take: reset deletes from all three tables, a transfer's
    // probe of a held-up earlier attempt takes UPDATE's locks on both ledger tables, and a role
    // made for another application has none (its transfers then ended "unknown", and a rerun
    // the same way). A role provisioned before migration 7 was granted the two other tables
    // only; since migration 8 a claim is an upsert (UPDATE) and every retried attempt reads
    // claims (SELECT): `claims_writable`, from the same reading.
    let missing = (migrated || !migrations_readable)
        .then(|| missing_privileges(&mut conn))
        .flatten();
    let claims_writable = missing.as_ref().map(|missing| {
        !missing
            .iter()
            .any(|(table, privilege)| *table == "transfer_claims" && *privilege != "DELETE")
    });
    let missing_privileges = missing
        .unwrap_or_default()
        .into_iter()
        .map(|(table, privilege)| format!("{privilege} on {table}"))
        .collect();
    // What a transfer connects with: its deadline (`--timeout`, else `BANK_TIMEOUT`, else 30 s)
    // sets tcp_user_timeout and the keepalives (doctor showed those of a 5 s deadline).
    let default = crate::retry::RetryPolicy::default().timeout;
    let deadline = match std::env::var("BANK_TIMEOUT") {
        Ok(v) => crate::cli::parse_timeout(&v).unwrap_or_else(|why| {
            // Every transfer refuses it: doctor says so rather than show the default as if it
            // were in force.
            crate::say(format_args!(
                "bank: warning: BANK_TIMEOUT={} is no --timeout ({why}): transfers refuse it; \
                 shown here with the default, {}s",
                v.escape_debug(),
                default.as_secs()
            ));
            default
        }),
        Err(_) => default,
    };
    let client = url
        .client_parameters("bank", deadline)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    // A primary whose synchronous_standby_names names standbys that are not there makes every
    // COMMIT wait for them: each transfer then hangs to its deadline (an operator's server).
    // PostgreSQL's alone: CockroachDB replicates by itself, and on a standby it means nothing.
    let sync_rep = match server.engine {
        Engine::PostgreSQL => diesel::sql_query(
            "SELECT current_setting('synchronous_standby_names') AS names, \
             (SELECT COUNT(*) FROM pg_stat_replication \
              WHERE sync_state IN ('sync', 'quorum') OR sync_state IS NULL) AS connected \
             WHERE NOT pg_is_in_recovery()",
        )
        .get_result::<SyncRep>(&mut conn)
        .ok(),
        Engine::CockroachDB => None,
    };
    let sync_needed = sync_rep
        .as_ref()
        .map(|r| synchronous_standbys_needed(&r.names));
    let report = Report {
        engine: server.engine,
        release: server.release.clone(),
        version: server.version.clone(),
        default_isolation,
        migrated: migrations_readable.then_some(migrated),
        migrations_readable,
        migration_version: applied.iter().max().cloned(),
        pending_migrations: migrations_readable.then_some(pending_migrations),
        unknown_migrations,
        init_blocked_by,
        tables_off_search_path: off_path.elsewhere.clone(),
        unsafe_changes,
        tables_in_other_schemas: shadowed
            .as_ref()
            .map(|(_, tables)| tables.clone())
            .unwrap_or_default(),
        tables_missing,
        columns_changed,
        settings,
        tls,
        client,
        accounts,
        transfers,
        claims_writable,
        missing_privileges,
        synchronous_standbys_missing: sync_rep
            .as_ref()
            .zip(sync_needed)
            .map(|(r, needed)| (needed - r.connected).max(0)),
    };
    if json {
        serde_json::to_writer(&mut *out, &report).map_err(io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    // Rendered first, then shown as stderr lines are (`for_terminal`): the server's words (its
    // version string, a schema's name, a setting) may hold control characters.
    let shown = out;
    let mut text: Vec<u8> = Vec::new();
    let out = &mut text;
    let unknown = || "unknown".to_string();
    writeln!(out, "server: {server}")?;
    writeln!(out, "version(): {}", report.version)?;
    writeln!(
        out,
        "default isolation: {}",
        report.default_isolation.clone().unwrap_or_else(unknown)
    )?;
    let foreign = db::is_foreign(&applied, &report.unknown_migrations);
    match (&report.migration_version, migrated) {
        _ if !migrations_readable => writeln!(
            out,
            "schema: cannot tell (this role may not read __diesel_schema_migrations: grant it \
             SELECT on that table to check)"
        )?,
        _ if foreign => writeln!(
            out,
            "schema: another application's (its migrations: {}; none of bank's)",
            report.unknown_migrations.join(", ")
        )?,
        _ if !off_path.elsewhere.is_empty() => writeln!(out, "schema: {off_path}")?,
        _ if shadowed.is_some() => {
            let split = crate::error::Unmigrated {
                search_path: db::search_path(&mut conn).unwrap_or_default(),
                shadowed: shadowed.clone().map(Box::new),
                ..Default::default()
            };
            writeln!(out, "schema: {split}")?
        }
        (Some(v), _) if !report.tables_missing.is_empty() => {
            let (are, them) = match report.tables_missing.len() {
                1 => ("is", "it"),
                _ => ("are", "them"),
            };
            writeln!(
                out,
                "schema: migrated on record (version {v}), but {} {are} missing on this \
                 connection's search_path ({}): dropped or renamed by hand since, and every \
                 command that needs {them} refuses; `bank init` finds nothing to do: restore \
                 {them} (the migration's up.sql under migrations/ made {them})",
                report.tables_missing.join(" and "),
                db::search_path(&mut conn).unwrap_or_default(),
            )?
        }
        (Some(v), _) if !report.columns_changed.is_empty() => writeln!(
            out,
            "schema: migrated on record (version {v}), but changed by hand since: {}; the \
             commands that read them fail, and `bank init` finds nothing to do: restore them as \
             the migrations' up.sql under migrations/ made them",
            report.columns_changed.join("; "),
        )?,
        _ if crate::error::is_bank_s_own(report.init_blocked_by.iter().map(String::as_str)) => {
            writeln!(
                out,
                "schema: not migrated on record, but the database has {}: {}",
                report.init_blocked_by.join(", "),
                crate::error::RECORD_LOST
            )?
        }
        _ if !report.init_blocked_by.is_empty() => writeln!(
            out,
            "schema: not migrated, and `bank init` would refuse: the database already has {} \
             (another application's?); give bank a database or schema of its own",
            report.init_blocked_by.join(", ")
        )?,
        (None, _) => match init_would_fail(&mut conn) {
            Some(advice) => writeln!(out, "schema: not migrated ({advice})")?,
            None => writeln!(out, "schema: not migrated (run `bank init`)")?,
        },
        (Some(_), true) if !report.unknown_migrations.is_empty() => writeln!(
            out,
            "schema: migrated by a newer bank (migrations not known to this one: {})",
            report.unknown_migrations.join(", ")
        )?,
        (Some(v), true) => writeln!(out, "schema: migrated (version {v})")?,
        (Some(v), false) => writeln!(
            out,
            "schema: version {v}, {pending_migrations} {} pending (run `bank init`)",
            if pending_migrations == 1 {
                "migration"
            } else {
                "migrations"
            }
        )?,
    }
    match (&report.unsafe_changes, unchecked) {
        (Some(changes), _) if !changes.is_empty() => writeln!(
            out,
            "unsafe changes (every command that writes refuses them; lookup, balances, history \
             and verify go on): {}",
            changes.join("; ")
        )?,
        // A role that may not read the catalogs: the check every connection makes is skipped.
        (None, Some(why)) => writeln!(
            out,
            "unsafe changes: not checked ({}): rules, keys, triggers on transfer_claims and \
             UNLOGGED tables go unnoticed for this role",
            crate::one_line(&why)
        )?,
        _ => {}
    }
    for (name, value) in &report.settings {
        writeln!(out, "{name}: {}", value.clone().unwrap_or_else(unknown))?;
    }
    if report
        .settings
        .get("transaction_read_only")
        .is_some_and(|v| v.as_deref() == Some("on"))
    {
        writeln!(
            out,
            "read only: every command that writes (transfer, seed, init, reset, workload, demo) \
             fails on this connection (a hot standby: connect to the primary; or \
             default_transaction_read_only: turn it off for this role or database)"
        )?;
    }
    let tls = match report.tls {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown (the server does not say)",
    };
    writeln!(out, "tls: {tls}")?;
    let client: Vec<String> = report
        .client
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    writeln!(out, "client: {}", client.join(" "))?;
    if let (Some(a), Some(t)) = (accounts, transfers) {
        writeln!(out, "accounts: {a}")?;
        writeln!(out, "transfers: {t}")?;
    }
    if claims_writable == Some(false) {
        writeln!(
            out,
            "warning: this role cannot insert into transfer_claims (or lacks SELECT or UPDATE \
             on it): grant it SELECT, INSERT, UPDATE and DELETE as on the other tables, or a \
             refused transfer with --id stays of unknown outcome, and single-statement \
             transfers, transfers with --id and files fail"
        )?;
    }
    if !report.missing_privileges.is_empty() {
        writeln!(
            out,
            "warning: this role lacks {}: bank's commands need SELECT, INSERT, UPDATE and DELETE \
             on accounts, transfers and transfer_claims",
            report.missing_privileges.join(", ")
        )?;
    }
    if let (Some(rep), Some(needed), Some(1..)) =
        (&sync_rep, sync_needed, report.synchronous_standbys_missing)
    {
        writeln!(
            out,
            "warning: synchronous_standby_names is '{}': every COMMIT that writes waits until \
             {needed} synchronous {} confirm{} it, and {} {} connected: transfers, seed, init \
             and reset wait until their deadline; start or reconnect the standby, or clear the \
             setting (ALTER SYSTEM SET synchronous_standby_names = ''; SELECT pg_reload_conf())",
            rep.names,
            if needed == 1 { "standby" } else { "standbys" },
            if needed == 1 { "s" } else { "" },
            rep.connected,
            if rep.connected == 1 { "is" } else { "are" },
        )?;
    }
    shown.write_all(crate::for_terminal(&String::from_utf8_lossy(&text)).as_bytes())?;
    Ok(())
}

/// How many synchronous standbys `synchronous_standby_names` makes a COMMIT wait for:
/// `FIRST n (…)`, `ANY n (…)` and the older `n (…)` say it; a bare list or `*` means one; an
/// empty setting none.
fn synchronous_standbys_needed(names: &str) -> i64 {
    let names = names.trim();
    if names.is_empty() {
        return 0;
    }
    let lower = names.to_ascii_lowercase();
    let rest = ["first", "any"]
        .iter()
        .find_map(|word| {
            lower
                .strip_prefix(word)
                .filter(|rest| rest.starts_with(char::is_whitespace))
        })
        .unwrap_or(&lower)
        .trim_start();
    let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    match rest[digits..].trim_start().starts_with('(') {
        true => rest[..digits].parse().unwrap_or(1),
        false => 1,
    }
}

/// `None` for a query this role may not run (either engine's words); other errors stand.
fn unless_denied<T>(result: QueryResult<T>) -> Result<Option<T>, Error> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(diesel::result::Error::DatabaseError(_, info))
            if crate::error::is_privilege_denied(info.message()) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Of SELECT, INSERT, UPDATE and DELETE on each of bank's tables, those this role lacks, as
/// (table, privilege), by table; `None` when the server cannot say.
fn missing_privileges(conn: &mut PgConnection) -> Option<Vec<(String, &'static str)>> {
    const TABLES: [&str; 3] = ["accounts", "transfers", "transfer_claims"];
    let mut missing = Vec::new();
    for privilege in ["SELECT", "INSERT", "UPDATE", "DELETE"] {
        let tables = repo::tables_without(conn, &TABLES, privilege).ok()?;
        missing.extend(tables.into_iter().map(|t| (t, privilege)));
    }
    missing.sort_by_key(|(t, _)| TABLES.iter().position(|known| known == t));
    Some(missing)
}

/// A server setting of this session, or `None` when the server does not have it.
fn setting(conn: &mut PgConnection, name: &str) -> Option<String> {
    repo::setting(conn, name).ok().flatten()
}

/// Why `bank init` would not build bank on this unmigrated database, as doctor's advice: no
/// schema on the search_path to build in (or the session's temporary one first), which init
/// refuses; or, on PostgreSQL 15 and later, `public` for a role that does not own the database,
/// which gets no CREATE there. Doctor advised an `init` that then failed (found by helpers).
/// `None` when init would build, or when the server cannot say.
fn init_would_fail(conn: &mut PgConnection) -> Option<String> {
    #[derive(QueryableByName)]
    struct Right {
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
        schema: Option<String>,
        #[diesel(sql_type = diesel::sql_types::Nullable<Bool>)]
        may: Option<bool>,
    }
    let right: Right = diesel::sql_query(
        "SELECT current_schema() AS schema, \
         has_schema_privilege(current_schema(), 'CREATE') AS may",
    )
    .get_result(conn)
    .map_err(|e| log::debug!("doctor: whether this role may create tables is not known ({e})"))
    .ok()?;
    // As `init` tells them apart (`Error::NoSchemaToCreateIn`).
    let why = match &right.schema {
        None => "names none that exists",
        Some(s) if s.starts_with("pg_temp") => {
            "puts the session's temporary schema first, where tables vanish when it disconnects"
        }
        Some(schema) => {
            return (right.may == Some(false)).then(|| {
                format!(
                    "run `bank init` as a role that may create tables in schema {}: this one \
                     may not",
                    crate::text::escaped(schema)
                )
            })
        }
    };
    Some(format!(
        "`bank init` would refuse: this connection's search_path ({}) {why}; name a schema in \
         the URL (e.g. options=-csearch_path%3Dpublic) or the role's search_path",
        db::search_path(conn).unwrap_or_default()
    ))
}

#[cfg(test)]
mod tests {
    use super::synchronous_standbys_needed as needed;

    #[test]
    fn the_synchronous_standbys_a_commit_waits_for() {
        assert_eq!(needed(""), 0);
        assert_eq!(needed("  "), 0);
        assert_eq!(needed("ghost"), 1);
        assert_eq!(needed("*"), 1);
        assert_eq!(needed("a, b"), 1);
        assert_eq!(needed("FIRST 2 (a, b, c)"), 2);
        assert_eq!(needed("any 3(a,b,c)"), 3);
        assert_eq!(needed("2 (a, b)"), 2);
        // Standbys named like the keywords, or starting with a digit.
        assert_eq!(needed("first"), 1);
        assert_eq!(needed("any, first"), 1);
        assert_eq!(needed("2nd"), 1);
    }
}
