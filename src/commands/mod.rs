//! What each subcommand does: connect, call the repository or the transfer runner, print. One
//! file per job; output goes to stdout, diagnostics to stderr through `log`.

mod accounts;
mod batch;
mod demo;
mod doctor;
mod ledger;
mod transfer;
mod verify;

use std::io::{self, BufWriter, Write};

use clap::CommandFactory;
use diesel::pg::PgConnection;

use crate::cli::{Cli, Command, InitArgs};
use crate::db::{self, DbUrl};
use crate::error::{Error, TransferError};
use crate::workload;

pub fn run(cli: Cli) -> Result<(), Error> {
    let out = crate::guard::Ticking(io::stdout().lock());
    let mut out = BufWriter::new(out);
    // The commands that describe `bank` itself need no database.
    match &cli.command {
        Command::Completions(args) => {
            // clap_complete panics when its writer fails (a full disk): it writes to memory,
            // and the one write that can fail is this command's own.
            let mut script = Vec::new();
            clap_complete::generate(args.shell, &mut Cli::command(), "bank", &mut script);
            out.write_all(&script)?;
            out.flush()?;
            return Ok(());
        }
        Command::Man(args) => {
            // clap's own `help` has no page (`bank man help` is refused), so the pages do not
            // name one either (bank-help(1) was listed).
            let mut cmd = Cli::command().disable_help_subcommand(true);
            // Built, every subcommand has its full name (bank-seed) and its help flags.
            cmd.build();
            let page =
                match &args.command {
                    None => cmd,
                    // clap's own `help` is no command of bank's: its page named pages that do not
                    // exist (bank-help-demo(1)).
                    Some(name) if name == "help" => return Err(Error::Usage(
                        "`help` has no page of its own: `bank man` prints bank(1), which names \
                         every command's page"
                            .into(),
                    )),
                    Some(name) => cmd.find_subcommand(name).cloned().ok_or_else(|| {
                        let name = match name.is_empty() {
                            true => "''".to_string(),
                            false => crate::text::shown(name),
                        };
                        Error::Usage(format!("no command {name}: `bank --help` lists them"))
                    })?,
                };
            render_man(page, &mut out)?;
            out.flush()?;
            return Ok(());
        }
        _ => {}
    }
    let url = DbUrl::resolve(cli.database_url.as_deref())?;
    let read = match &cli.command {
        Command::Balances(a) => Some(&a.read),
        Command::History(a) => Some(&a.read),
        Command::Lookup(a) => Some(&a.read),
        Command::Verify(a) | Command::Doctor(a) => Some(&a.read),
        _ => None,
    };
    if let Some(read) = read {
        crate::guard::watch_reads(read.timeout)?;
        crate::interrupt::while_reading();
    }
    let result = match cli.command {
        Command::Completions(_) | Command::Man(_) => Ok(()),
        Command::Demo(args) => demo::demo(&url, &args, &mut out),
        Command::Init(args) => init(&url, &args, &mut out),
        Command::Seed(args) => accounts::seed(&url, &args, &mut out),
        Command::Transfer(args) => with_injection(&url, &args.run)
            .and_then(|url| transfer::transfer_cmd(&url, &args, &mut out)),
        Command::Balances(args) => accounts::balances(&url, &args, &mut out),
        Command::History(args) => ledger::history(&url, &args, &mut out),
        Command::Lookup(args) => ledger::lookup(&url, &args, &mut out),
        Command::Reset(args) => accounts::reset(&url, &args, &mut out),
        Command::Verify(args) => verify::verify_cmd(&url, args.json, args.read.timeout, &mut out),
        Command::Doctor(args) => doctor::doctor(&url, args.json, args.read.timeout, &mut out),
        Command::Workload(args) => with_injection(&url, &args.run)
            .and_then(|url| workload::run(&url, &args.config(), &mut out)),
    };
    // Whatever was printed before a failure still reaches stdout; the failure is what is said.
    let flushed = out.flush();
    result
        .map_err(|e| locate_missing(&url, e))
        .and(flushed.map_err(Error::from))
}

/// A statement met a table of bank's missing, though its migrations' check passed (or could
/// not be made): its tables may have been moved to a schema off the search_path (a DBA's
/// `ALTER TABLE … SET SCHEMA`, the migrations table left behind). The schemas that hold them
/// are named; the advice was to restore them "or use a fresh database", for intact data (a
/// reviewer's point). Best effort: the error stands as it was when they cannot be looked for.
fn locate_missing(url: &DbUrl, e: Error) -> Error {
    match e {
        Error::NotMigrated(mut u) => {
            locate(url, &mut u);
            Error::NotMigrated(u)
        }
        Error::Transfer(TransferError::NotMigrated(mut u)) => {
            locate(url, &mut u);
            Error::Transfer(TransferError::NotMigrated(u))
        }
        e => e,
    }
}

/// `locate_missing` for one error.
fn locate(url: &DbUrl, u: &mut crate::error::Unmigrated) {
    if !u.elsewhere.is_empty() {
        return;
    }
    let (Some(m), Ok(mut conn)) = (u.missing.as_deref_mut(), url.connect()) else {
        return;
    };
    m.moved = db::tables_off_the_search_path(&mut conn).unwrap_or_else(|e| {
        log::debug!("bank's tables could not be looked for: {e}");
        Vec::new()
    });
    if !m.moved.is_empty() {
        u.search_path = db::search_path(&mut conn).unwrap_or_default();
    }
}

/// `page` as clap_mangen renders it, but for the text after the options: clap_mangen fills it
/// as prose under a heading named EXTRA, so examples came out justified and hyphenated
/// (`--histogram la-` / `tency.hlog`) and could not be copied (a helper playing a new user).
/// It is set as typed instead, under EXAMPLES (a command's) or NOTES (the exit codes and
/// environment of `bank`'s own page).
fn render_man(page: clap::Command, out: &mut impl Write) -> io::Result<()> {
    let after = page
        .get_after_long_help()
        .or_else(|| page.get_after_help())
        .map(|text| text.to_string());
    // The footer names the program for every page; clap_mangen's default is the command's own
    // name ("seed 0.1.0").
    let version = format!("bank {}", env!("CARGO_PKG_VERSION"));
    let man = clap_mangen::Man::new(page.clone()).source(version);
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    if page.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(out)?;
    }
    if page.has_subcommands() {
        man.render_subcommands_section(out)?;
    }
    if let Some(text) = after {
        let heading = if text.starts_with("Example") {
            "EXAMPLES"
        } else {
            "NOTES"
        };
        writeln!(out, ".SH {heading}\n.nf")?;
        for line in text.lines() {
            writeln!(out, "{}", roff_literal(line))?;
        }
        writeln!(out, ".fi")?;
    }
    if page.get_version().is_some() {
        man.render_version_section(out)?;
    }
    Ok(())
}

/// A line of text as roff shows it literally: backslashes and minus signs escaped (a bare `-`
/// may print as a hyphen, which a shell does not take for an option's), and a leading `.` or
/// `'` kept from being read as a request.
fn roff_literal(line: &str) -> String {
    let escaped = line.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with(['.', '\'']) {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

fn init(url: &DbUrl, args: &InitArgs, out: &mut impl Write) -> Result<(), Error> {
    // A frozen server, or a lock its migration needs held elsewhere for longer than the
    // deadline: it waited forever. Each migration commits on its own, so what was applied stays
    // and the next init runs the rest. A migration's COMMIT waits for a synchronous standby as
    // a transfer's does: an upgrade on a primary whose standby was gone blamed a lock.
    crate::guard::watch(args.timeout, || {
        format!(
            "a migration may be waiting on a lock another session holds (a long transaction on \
             bank's tables), or {}, or slower than that; the migrations applied so far stay: \
             run `bank init` again",
            crate::guard::COMMIT_STALLS
        )
    })?;
    crate::interrupt::while_migrating();
    let (mut conn, server) = first_migration_connection(url, args.timeout)?;
    // Every host of a deployment may run `init` as it starts. Each migration commits on its own,
    // so another init's progress between this one's reads and writes made it fail, in a way of
    // the moment: a relation it was about to create now "in the way", a duplicate key in the
    // catalog, a column already added. The database having moved on since the attempt began
    // tells those apart from a failure of this init's own, and the next attempt starts from
    // where the database now is. Each retry needs such progress, so there are few.
    let started = state_or_reconnect(url, args.timeout, &mut conn)?;
    let mut before = started.clone();
    let mut attempts = 1;
    // A warning is said once, however many attempts it takes.
    let mut warned = false;
    // Migrations applied by attempts whose connection was lost (read on the next connection).
    let mut lost_attempts: Vec<String> = Vec::new();
    let ran = loop {
        match migrate(&mut conn, &before, &mut warned) {
            Ok(ran) => break ran,
            // It gave way to a lock held elsewhere (`MIGRATION_LOCK_TIMEOUT`), or a deadlock or
            // a serialization failure rolled it back (it failed then, unless another init had
            // moved the schema on): wait, and queue again. The watch ends it when the lock
            // outlasts `--timeout`.
            Err(e) if waited_for_a_lock(&e) => {
                log::info!("init: a lock held elsewhere; trying again ({e})");
                give_way();
                before = state_or_reconnect(url, args.timeout, &mut conn)?;
            }
            // The connection went (the server restarted, a connection cut), at a migration's
            // COMMIT or before: it ended init at once, where every other command connects
            // again. Whether that migration committed is read on the new connection, with
            // the rest; the watch ends a server that does not come back within `--timeout`.
            Err(e) if connection_lost(&e) => {
                log::info!("init: the connection was lost ({e}); connecting again");
                let known_before = std::mem::take(&mut before.applied);
                (conn, before) = reconnect(url, args.timeout)?;
                // Those applied since on the connection lost (the one at whose COMMIT it went
                // included) are this run's: its lines named only the attempt that finished
                // ("schema is up to date" when the last migration's answer was lost).
                lost_attempts.extend(
                    before
                        .applied
                        .iter()
                        .filter(|v| !known_before.contains(v))
                        .cloned(),
                );
            }
            Err(e) => {
                // Another init's migration commits when this one's ends: give it that moment.
                std::thread::sleep(std::time::Duration::from_millis(100));
                let now = migration_state(&mut conn).ok();
                if attempts < 20 && now.as_ref().is_some_and(|now| *now != before) {
                    log::info!("init: another init moved the schema on ({e}); starting again");
                    before = now.unwrap_or_default();
                    attempts += 1;
                    continue;
                }
                // Nothing of bank's was there (another application's database, say): leave
                // nothing of it behind, the harness's own table included. Only once this init
                // gives up: while another init runs, the table is that one's. Not on
                // CockroachDB, whose rename takes no lock: another init's record, written
                // through its cached copy of the table's definition, could land in the table
                // as it is dropped (a reviewer's reading of its source); an empty table left
                // there does no harm.
                if started.applied.is_empty() && !server.is_cockroachdb() {
                    db::drop_empty_migrations_table(&mut conn);
                }
                return Err(e);
            }
        }
    };
    let ran: Vec<String> = lost_attempts.into_iter().chain(ran).collect();
    let done: Vec<String> = match ran.is_empty() {
        true => vec!["schema is up to date".to_string()],
        false => ran
            .iter()
            .map(|n| format!("applied migration {n}"))
            .collect(),
    };
    report_done(out, &done.join("\n"))
}

/// A connection for `init`, its session prepared for migrations.
fn migration_connection(
    url: &DbUrl,
    timeout: std::time::Duration,
) -> Result<(PgConnection, db::engine::Server), Error> {
    let mut conn = url.connect()?;
    let server = db::engine::detect(&mut conn)?;
    db::engine::prepare_migration_session(&mut conn, &server)?;
    // "applied migration" is said of a migration that a crash cannot take back.
    db::commit_synchronously(&mut conn)?;
    // A migration whose COMMIT is lost with init (a link down) holds its table's lock until
    // the server ends it (`end_abandoned_transactions`).
    db::end_abandoned_transactions(&mut conn, timeout);
    Ok((conn, server))
}

/// `migration_connection`, made again when the connection is lost once the server took the
/// login, before anything was sent (its backend ended by a DBA or a pooler, the server
/// restarting, while the session was set up): init ended at once, exit 1, "terminating
/// connection due to administrator command" (a helper playing a new user). A first connection
/// refused is said at once, as before; the watch bounds the rest by `--timeout`.
fn first_migration_connection(
    url: &DbUrl,
    timeout: std::time::Duration,
) -> Result<(PgConnection, db::engine::Server), Error> {
    let lost_after_login = |e: &Error| match e {
        Error::Connect(c) => c.lost_after_login && c.is_transient(),
        e => connection_lost(e),
    };
    match migration_connection(url, timeout) {
        Err(e) if lost_after_login(&e) => {
            log::info!(
                "init: the connection was lost before anything was done ({e}); connecting again"
            );
            loop {
                give_way();
                match migration_connection(url, timeout) {
                    Err(e) if connection_lost(&e) => log::info!("init: not connected yet ({e})"),
                    again => return again,
                }
            }
        }
        first => first,
    }
}

/// A new `migration_connection` and the state read on it, once the server takes one again:
/// the watch ends a server that does not come back within `--timeout`.
fn reconnect(
    url: &DbUrl,
    timeout: std::time::Duration,
) -> Result<(PgConnection, MigrationState), Error> {
    loop {
        give_way();
        let again = migration_connection(url, timeout).and_then(|(mut conn, _)| {
            let state = settled_state(&mut conn)?;
            Ok((conn, state))
        });
        match again {
            Ok(again) => return Ok(again),
            Err(e) if connection_lost(&e) => {
                log::info!("init: not connected yet ({e})");
            }
            Err(e) => return Err(e),
        }
    }
}

/// `settled_state`, read on a new connection (`reconnect`) when `conn` is lost: while init
/// waited on another session's lock on Diesel's table (every host of a deployment running
/// init) the server restarted, and init ended at once, exit 1, where a connection lost at a
/// migration connects again. Nothing was written on `conn` since its last migration.
fn state_or_reconnect(
    url: &DbUrl,
    timeout: std::time::Duration,
    conn: &mut PgConnection,
) -> Result<MigrationState, Error> {
    match settled_state(conn) {
        Err(e) if connection_lost(&e) => {
            log::info!("init: the connection was lost ({e}); connecting again");
            let (again, state) = reconnect(url, timeout)?;
            *conn = again;
            Ok(state)
        }
        read => read,
    }
}

/// Whether `e`, or an error under it, is a lost connection or a server not accepting them yet
/// (one restarting): what connecting again may cure.
fn connection_lost(e: &Error) -> bool {
    match e {
        Error::Connect(c) => c.is_transient(),
        e => says(e, crate::retry::reads_as_lost_connection),
    }
}

/// `migration_state`, read again after a pause whenever it gives way to a lock held elsewhere
/// (on the migrations table).
fn settled_state(conn: &mut PgConnection) -> Result<MigrationState, Error> {
    loop {
        match migration_state(conn) {
            Err(e) if waited_for_a_lock(&e) => give_way(),
            read => return read,
        }
    }
}

/// The pause before a step that gave way to a lock queues for it again: others get through.
fn give_way() {
    std::thread::sleep(std::time::Duration::from_millis(rand::random_range(
        100..400,
    )));
}

/// Whether `e`, or an error under it, is a lock timeout (a migration gave way), or a conflict
/// of the moment that rolled the migration back whole (a deadlock, a serialization failure:
/// PostgreSQL's words and CockroachDB's "restart transaction"). A migration's errors reach
/// `init` as text only (Diesel's migration harness boxes them), so the words decide.
fn waited_for_a_lock(e: &Error) -> bool {
    const CONFLICTS: [&str; 4] = [
        "lock timeout",
        "deadlock detected",
        "could not serialize access",
        "restart transaction",
    ];
    says(e, |words| CONFLICTS.iter().any(|c| words.contains(c)))
}

/// Whether `e`, or an error under it, says what `words` looks for: a migration's errors reach
/// `init` as text only (Diesel's migration harness boxes them).
fn says(e: &Error, words: impl Fn(&str) -> bool) -> bool {
    let mut next: Option<&dyn std::error::Error> = Some(e);
    while let Some(e) = next {
        if words(&e.to_string()) {
            return true;
        }
        next = e.source();
    }
    false
}

/// What `init` sees of the migrations: whether their table is there, and which have run.
#[derive(Debug, Clone, Default, PartialEq)]
struct MigrationState {
    table: Option<String>,
    applied: Vec<String>,
}

fn migration_state(conn: &mut PgConnection) -> Result<MigrationState, Error> {
    Ok(MigrationState {
        table: db::migrations_schema(conn)?,
        applied: db::applied_migrations(conn)?,
    })
}

/// One attempt at `init`, from `state` as just read: checks where the tables would go, then runs
/// the pending migrations; returns their names.
fn migrate(
    conn: &mut PgConnection,
    state: &MigrationState,
    warned: &mut bool,
) -> Result<Vec<String>, Error> {
    let mut applied = state.applied.clone();
    let mut unknown = db::unknown_migrations(&applied)?;
    // The migrations table the statements read is in a schema behind the one new tables go to.
    if let (Some(theirs), Some(first)) = (state.table.clone(), db::creation_schema(conn)?) {
        if theirs != first {
            // bank's (a schema named like the role, first on the default search_path): the
            // migrations would build a second, empty bank in front of it.
            if !db::is_foreign(&applied, &unknown) {
                return Err(Error::SchemaInFront { theirs, first });
            }
            // Another application's, further down the path: bank gets a schema of its own, as
            // the refusals advise, and Diesel makes its own table there.
            applied.clear();
            unknown.clear();
        }
    }
    if db::is_foreign(&applied, &unknown) {
        return Err(Error::ForeignDatabase(unknown.join(", ")));
    }
    if !unknown.is_empty() && !std::mem::replace(warned, true) {
        // Not refused: putting the older binary back after an upgrade must still start; but
        // this bank's statements may not be what the newer schema expects.
        crate::say(format_args!(
            "bank: warning: the database has migrations this bank does not know ({}): it was \
             migrated by a newer bank",
            unknown.join(", ")
        ));
    }
    // Up to date: nothing to run, and Diesel's harness, which creates its table first, would
    // need a CREATE privilege that a role using the tables may well not have.
    let pending = db::pending_migrations(&applied)?;
    let taken = db::in_the_way(conn, &pending)?;
    if !taken.is_empty() {
        // A later migration of bank's is recorded: what is in the way is bank's own, made by
        // a migration whose record was deleted (not another application's). With none later,
        // this is an upgrade, and a table of that name may be a DBA's own: called bank's, the
        // advice to record the migration had bank use it.
        let maker = db::maker_of(&pending, &taken)
            .filter(|version| applied.iter().any(|a| a.as_str() > version.as_str()));
        if let Some(version) = maker {
            return Err(Error::MigrationUnrecorded {
                version,
                what: format!(
                    "the database already has {}, which it creates",
                    taken.join(", ")
                ),
            });
        }
        return Err(Error::InitBlocked(taken.join(", ")));
    }
    // Where the tables would go: nowhere (a search_path naming no schema that exists: "no schema
    // has been selected to create in"), or the session's temporary schema (one naming pg_temp
    // and no other that exists), where init said "applied" and the tables vanished at
    // disconnect. If bank's tables are in a schema the search_path misses, that is the fix.
    if !pending.is_empty() {
        let target = db::creation_schema(conn)?;
        if target.as_deref().is_none_or(|s| s.starts_with("pg_temp")) {
            let off_path = db::unmigrated(conn);
            if applied.is_empty() && !off_path.elsewhere.is_empty() {
                return Err(Error::NotMigrated(off_path));
            }
            // current_schema() is NULL before the session's temporary schema exists, though a
            // CREATE would then make it and put the tables there.
            let lists_temp = off_path
                .search_path
                .split(',')
                .any(|s| s.trim().trim_matches('"') == "pg_temp");
            let why = match target {
                Some(_) => {
                    "puts the session's temporary schema first, where tables vanish when it \
                     disconnects"
                }
                None if lists_temp => {
                    "names none that exists but the session's temporary schema, where tables \
                     vanish when it disconnects"
                }
                None => "names none that exists",
            };
            return Err(Error::NoSchemaToCreateIn {
                search_path: off_path.search_path,
                why,
            });
        }
    }
    match pending.is_empty() {
        true => Ok(Vec::new()),
        false => db::run_migrations(conn).map_err(db::unrecorded_migration),
    }
}

/// What a command did, written once it is done (committed). Its report that cannot be written
/// (a full disk) is a warning, and the exit code (0) says the work stands, as for a transfer's
/// receipt: exit 1 said nothing was done.
pub(super) fn report_done(out: &mut impl Write, done: &str) -> Result<(), Error> {
    writeln!(out, "{done}")
        .and_then(|()| out.flush())
        .map_err(|source| Error::ReportLost {
            done: done.replace('\n', "; "),
            source,
        })
}

/// The run's flags checked (`RunArgs::check`), and for `--inject-retries` the URL whose transfer
/// sessions turn on CockroachDB's `inject_retry_errors_enabled`; refused (exit 2, nothing
/// changed) on any other engine, which has no such variable.
fn with_injection(url: &DbUrl, run: &crate::cli::RunArgs) -> Result<DbUrl, Error> {
    run.check()?;
    if !run.inject_retries {
        return Ok(url.clone());
    }
    let server = db::engine::detect(&mut url.connect()?)?;
    if !server.is_cockroachdb() {
        return Err(Error::Usage(format!(
            "--inject-retries needs CockroachDB (its inject_retry_errors_enabled session \
             variable); this server is {server}"
        )));
    }
    Ok(url.with_session_setting("inject_retry_errors_enabled", "true"))
}

/// Standard output as a read writes it, noting whether anything was written (`read_again`).
pub(super) struct Noted<'a, W: ?Sized> {
    out: &'a mut W,
    wrote: &'a std::cell::Cell<bool>,
}

impl<W: Write + ?Sized> Write for Noted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !buf.is_empty() {
            self.wrote.set(true);
        }
        self.out.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Runs `read`, writing to `out`, again while a conflict of the moment (another session's lock
/// held past the server's `lock_timeout`, a deadlock, a serialization failure) stops it before
/// it has written anything, until `timeout` (`retry::retry_rolled_back`): `balances`, `history`
/// and `lookup` failed at once where every transaction of bank's is run again. Once a line is
/// out, the error is the answer (the output cannot be taken back).
pub(super) fn read_again<W: Write + ?Sized, T>(
    timeout: std::time::Duration,
    out: &mut W,
    mut read: impl FnMut(&mut Noted<'_, W>) -> Result<T, Error>,
) -> Result<T, Error> {
    let wrote = std::cell::Cell::new(false);
    let mut noted = Noted { out, wrote: &wrote };
    crate::retry::retry_rolled_back(
        timeout,
        || read(&mut noted),
        |e| match e {
            Error::Database(d) if !wrote.get() => Some(d),
            _ => None,
        },
    )
    .map_err(|e| match e {
        // Rows were out when the database failed it (a statement_timeout part-way through a
        // long listing, a connection lost): the error said nothing of the output cut short,
        // where a Ctrl-C says so.
        Error::Database(_) if wrote.get() => Error::CutShort(Box::new(e)),
        e => e,
    })
}
