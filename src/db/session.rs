//! Connections: what `bank` adds to the user's URL (timeouts, keepalives, an application name),
//! and the `Session` that transfers run on (tuned on connect, reopened after a loss).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use diesel::connection::{Instrumentation, InstrumentationEvent, SimpleConnection};
use diesel::prelude::*;
use diesel::sql_types::Text;

use super::DbUrl;
use crate::error::ConnectError;

/// Seconds libpq waits for a server before giving up; an unreachable host must fail fast.
const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 5;
/// libpq's smallest connect timeout.
const MIN_CONNECT_TIMEOUT_SECS: u64 = 2;

impl DbUrl {
    /// The URL handed to libpq: the user's, plus what the user did not set of: a connect
    /// timeout, an application name, and TCP keepalives with `tcp_user_timeout`. The last two
    /// make a connection to a host that stopped answering (a network partition: packets dropped)
    /// fail within about `timeout` instead of TCP's retransmission limit (minutes). Unix-socket
    /// connections ignore them.
    fn connect_string(&self, application_name: &str, timeout: Duration) -> String {
        let mut url = self.full.clone();
        // `…/db?` and `…?a=b&` are fine for libpq; with a parameter appended they made an empty
        // one (`?&…`, `&&…`), which it refuses. Only the '?' that starts the query goes: a later
        // one is part of a value (`?password=Ends?`, which psql takes; without its '?', the
        // server refused the password).
        loop {
            let starts_query = url.ends_with('?') && url.find('?') == Some(url.len() - 1);
            if !(url.ends_with('&') || starts_query) {
                break;
            }
            url.pop();
        }
        // The URL's own parameters, by name (`query_sets`): "fallback_application_name=x"
        // holds "application_name=", and taken for it, bank's sessions went unnamed (`doctor`
        // said "application_name=bank" all the same); a password could hold one too.
        let own = url.clone();
        for (name, value) in bank_defaults(application_name, timeout) {
            if super::query_sets(&own, name) || (name == "application_name" && appname_set()) {
                continue;
            }
            let sep = if url.contains('?') { '&' } else { '?' };
            url.push_str(&format!("{sep}{name}={value}"));
        }
        url
    }

    /// The libpq parameters `bank` sets, with the value in force for a connection made with
    /// `connect_within(application_name, timeout)`: the URL's own where it sets one (without
    /// decoding it), else `bank`'s. What `doctor` reports; none of them is secret.
    pub fn client_parameters(
        &self,
        application_name: &str,
        timeout: Duration,
    ) -> Vec<(&'static str, String)> {
        let query = self.full.split_once('?').map_or("", |(_, q)| q);
        bank_defaults(application_name, timeout)
            .into_iter()
            .map(|(name, default)| {
                // The key as `connect_string` reads it (percent-decoded, as libpq does): an
                // encoded one was reported as bank's default, which the URL's own replaced.
                let set = query.split('&').find_map(|kv| {
                    let (key, value) = kv.split_once('=')?;
                    super::url::key_is(key, name).then_some(value)
                });
                let from_env = (name == "application_name" && appname_set())
                    .then(|| std::env::var("PGAPPNAME").ok())
                    .flatten();
                (
                    name,
                    set.map(str::to_string).or(from_env).unwrap_or(default),
                )
            })
            .collect()
    }

    pub fn connect(&self) -> Result<PgConnection, ConnectError> {
        self.connect_as("bank")
    }

    /// `connect`, for a command that needs the schema: refused (not migrated) unless every one of
    /// this bank's migrations has run. A connection lost during the check is made again
    /// (`connect_checked`).
    pub fn connect_migrated(&self, timeout: Duration) -> Result<PgConnection, crate::error::Error> {
        self.connect_checked(timeout, |conn| super::require_migrated(conn, timeout))
            .map(|(conn, ())| conn)
    }

    /// `connect_migrated`, for a command that writes (`seed`, `reset`, a workload's setup): also
    /// refused when bank's tables were changed in ways its promise cannot survive
    /// (`db::require_unchanged`); its commits synchronous (`commit_synchronously`).
    pub fn connect_to_write(&self, timeout: Duration) -> Result<PgConnection, crate::error::Error> {
        self.to_write_again(&mut Reconnecting::new(timeout), timeout)
    }

    /// `connect_to_write` in place of a connection of this run's that it has just closed: the
    /// server may count that one against a connection limit until its backend has exited, so
    /// a refusal for want of a slot is tried again until `timeout` (a seed whose COPY lost its
    /// words, as a role allowed one connection, failed "too many connections for role" about
    /// once in a full test suite: its new connection came before the old backend's exit).
    pub fn connect_to_write_after_closing(
        &self,
        timeout: Duration,
    ) -> Result<PgConnection, crate::error::Error> {
        self.to_write_again(&mut Reconnecting::after_closing(timeout), timeout)
    }

    fn to_write_again(
        &self,
        again: &mut Reconnecting,
        timeout: Duration,
    ) -> Result<PgConnection, crate::error::Error> {
        self.checked_again(again, |conn| {
            super::require_writable(conn, timeout)?;
            commit_synchronously(conn)?;
            end_abandoned_transactions(conn, timeout);
            Ok(())
        })
        .map(|(conn, ())| conn)
    }

    /// A new connection on which `check` (the schema's, made before anything else is sent)
    /// passed, with what it read. One lost while `check` ran (its backend ended by a DBA or a
    /// pooler, the server restarted) is made again and `check` run again on it, until
    /// `timeout`: nothing was done on it, and every command ended at once with the server's
    /// words ("terminating connection due to administrator command", exit 1) where a transfer
    /// or a file connects again (found by a helper playing a new user). A first connection
    /// refused is said at once, as before; one refused after a loss is tried again.
    pub fn connect_checked<T>(
        &self,
        timeout: Duration,
        check: impl FnMut(&mut PgConnection) -> Result<T, crate::error::Error>,
    ) -> Result<(PgConnection, T), crate::error::Error> {
        self.checked_again(&mut Reconnecting::new(timeout), check)
    }

    /// The loop of `connect_checked`, on `again`'s deadline.
    fn checked_again<T>(
        &self,
        again: &mut Reconnecting,
        mut check: impl FnMut(&mut PgConnection) -> Result<T, crate::error::Error>,
    ) -> Result<(PgConnection, T), crate::error::Error> {
        again.until(|| {
            let mut conn = self.connect().map_err(|e| Box::new((e.into(), true)))?;
            let read = check(&mut conn).map_err(|e| Box::new((e, false)))?;
            Ok((conn, read))
        })
    }

    /// `read` on `conn` (made by `connect_migrated`), a read that has printed nothing when it
    /// fails with a database error (`commands::read_again` says one that had as cut short): a
    /// connection lost meanwhile (the read's first statement waited on a lock on bank's tables
    /// and its backend was ended) is made again, checked again (`require_migrated`), and `read`
    /// run again on it, until `timeout`. It ended at once with the server's words.
    pub fn read_reconnecting<T>(
        &self,
        conn: &mut PgConnection,
        timeout: Duration,
        mut read: impl FnMut(&mut PgConnection) -> Result<T, crate::error::Error>,
    ) -> Result<T, crate::error::Error> {
        let mut again = Reconnecting::new(timeout);
        loop {
            match read(conn) {
                Err(e) => {
                    again.after(e, false)?;
                    let (new, ()) =
                        self.checked_again(&mut again, |c| super::require_migrated(c, timeout))?;
                    *conn = new;
                }
                done => return done,
            }
        }
    }

    pub fn connect_as(&self, application_name: &str) -> Result<PgConnection, ConnectError> {
        self.connect_within(
            application_name,
            Duration::from_secs(DEFAULT_CONNECT_TIMEOUT_SECS),
        )
    }

    /// A connection whose TCP settings give up on a silent server within about `timeout`.
    pub fn connect_within(
        &self,
        application_name: &str,
        timeout: Duration,
    ) -> Result<PgConnection, ConnectError> {
        let connect_string = self.connect_string(application_name, timeout);
        let mut conn = PgConnection::establish(&connect_string).map_err(|e| ConnectError {
            url: self.to_string(),
            // libpq quotes a URL it cannot parse: the user's, not the one with bank's
            // parameters appended, which the user never wrote.
            message: self.redact_text(&said_once(
                e.to_string().replace(&connect_string, &self.full).trim(),
            )),
            // Diesel's own first statements (its time zone, its encoding) after the login.
            lost_after_login: matches!(
                &e,
                diesel::ConnectionError::CouldntSetupConfiguration(d) if lost_before_anything(d)
            ),
        })?;
        if log::log_enabled!(target: "bank::sql", log::Level::Trace) {
            conn.set_instrumentation(SqlLogger);
        }
        super::kept::keep(&mut conn, &self.full).map_err(|e| ConnectError {
            url: self.to_string(),
            // Its first query too: the failure need not be the search_path's (a hot standby
            // refuses SERIALIZABLE there).
            message: format!("the session could not be set up: {e}"),
            lost_after_login: lost_before_anything(&e),
        })?;
        Ok(conn)
    }
}

/// libpq's message with each host's failure said once: it tries a refused login again (a
/// setting the server does not know, `-c bogus_setting=1`) and said the same line twice.
/// (Other lines, "Is the server running on that host…", may rightly come once per host.)
fn said_once(message: &str) -> String {
    let mut seen = std::collections::HashSet::new();
    message
        .lines()
        .filter(|l| !l.starts_with("connection to server") || seen.insert(*l))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `PGAPPNAME` names the sessions, as it does psql's: libpq reads it when the URL sets no
/// `application_name`. bank's own name replaced it. (`PGCONNECT_TIMEOUT` does not replace bank's
/// connect timeout: the deadlines depend on it.)
fn appname_set() -> bool {
    std::env::var_os("PGAPPNAME").is_some_and(|v| !v.is_empty())
}

/// What `bank` adds to a URL that does not set it: a connect timeout, an application name, and
/// TCP keepalives with `tcp_user_timeout`, all scaled to `timeout`.
fn bank_defaults(application_name: &str, timeout: Duration) -> [(&'static str, String); 7] {
    let secs = timeout.as_secs().max(1);
    [
        (
            "connect_timeout",
            secs.clamp(MIN_CONNECT_TIMEOUT_SECS, DEFAULT_CONNECT_TIMEOUT_SECS)
                .to_string(),
        ),
        ("application_name", application_name.to_string()),
        ("keepalives", "1".to_string()),
        ("keepalives_idle", (secs / 3).clamp(1, 30).to_string()),
        ("keepalives_interval", (secs / 6).clamp(1, 10).to_string()),
        ("keepalives_count", "3".to_string()),
        // libpq reads it as a C int of milliseconds (24.8 days at most).
        (
            "tcp_user_timeout",
            secs.saturating_mul(1000).min(i32::MAX as u64).to_string(),
        ),
    ]
}

/// `-vv`: every statement diesel sends, with its binds.
struct SqlLogger;

impl Instrumentation for SqlLogger {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let InstrumentationEvent::StartQuery { query, .. } = event {
            log::trace!(target: "bank::sql", "{query}");
        }
    }
}

/// A connection that is opened on first use and again after it was lost. Transfers and the
/// workload hold one per worker for their whole run.
///
/// Each new connection is tuned for transfers:
/// - `statement_timeout` and `idle_in_transaction_session_timeout` are set to the session's
///   timeout unless the server already sets a shorter one, so that a transaction whose client
///   gave up (a frozen client, a partition) releases its row locks on the server by itself.
///   `bank` never idles inside a transaction, so the second one costs nothing.
/// - `enable_seqscan = off`. On PostgreSQL a serializable transaction that reads a table by
///   sequential scan takes a predicate lock on the whole table, so any two concurrent transfers
///   conflict and one is aborted (40001); on a small table the planner prefers that scan to the
///   primary key (BENCHMARKS.md has the figures). CockroachDB accepts it as a no-op.
///
/// - `synchronous_commit = on` where the server's default is `off`: a COMMIT answered before
///   its WAL is written is undone by a crash, and "applied" would be untrue.
///
/// A failure of the timeouts and `enable_seqscan` is logged and ignored: they tune, they do not
/// decide correctness. (Raising REPEATABLE READ to SERIALIZABLE and asynchronous commit to
/// synchronous, in `tune`, do; their failure fails the connection.)
pub struct Session {
    url: DbUrl,
    application_name: &'static str,
    timeout: Duration,
    conn: Option<PgConnection>,
    /// Connections opened so far (the first one included).
    pub connects: u64,
    /// Logins refused for want of a connection slot (max_connections, a CONNECTION LIMIT)
    /// before the first connection was opened.
    pub refused_before_first: u64,
    /// Whether the schema is checked on this session's first connection (`require_migrated`),
    /// and whether that check has passed.
    check_schema: bool,
    schema_checked: bool,
}

#[derive(QueryableByName)]
struct Timeouts {
    #[diesel(sql_type = Text)]
    statement: String,
    #[diesel(sql_type = Text)]
    idle_in_transaction: String,
    #[diesel(sql_type = Text)]
    isolation: String,
    /// None where the engine has no such setting.
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    synchronous_commit: Option<String>,
}

impl Session {
    pub fn new(url: DbUrl, application_name: &'static str) -> Session {
        Session {
            url,
            application_name,
            timeout: crate::retry::RetryPolicy::default().timeout,
            conn: None,
            connects: 0,
            refused_before_first: 0,
            check_schema: false,
            schema_checked: false,
        }
    }

    /// Checks the schema on the first connection (`schema_unchecked`): for commands that write,
    /// which on a database missing a migration applied what they could and failed the rest.
    pub fn checking_schema(mut self) -> Session {
        self.check_schema = true;
        self
    }

    /// Whether the schema is still to be checked before this session's first use.
    pub fn schema_unchecked(&self) -> bool {
        self.check_schema && !self.schema_checked
    }

    pub fn schema_checked(&mut self) {
        self.schema_checked = true;
    }

    /// How long one call may take: the TCP and server-side timeouts of its connections.
    pub fn with_timeout(mut self, timeout: Duration) -> Session {
        self.timeout = timeout;
        self
    }

    pub fn conn(&mut self) -> Result<&mut PgConnection, ConnectError> {
        match &mut self.conn {
            Some(conn) => Ok(conn),
            slot @ None => {
                // Lost while `tune` or the user's settings ran (after the login, before
                // anything of the command's) is `lost_after_login` as one lost in Diesel's
                // set-up or `kept::keep` is: it ended `demo` at once (a reviewer's reading).
                let mut conn = self
                    .url
                    .connect_within(self.application_name, self.timeout)
                    .inspect_err(|e| {
                        if self.connects == 0 && crate::error::is_connection_limit(&e.message) {
                            self.refused_before_first += 1;
                        }
                    })?;
                self.connects += 1;
                match tune(&mut conn, self.timeout) {
                    Ok(()) => {}
                    Err(Untuned::Tuning(e)) => {
                        log::debug!("tuning the session failed (ignored): {e}")
                    }
                    Err(Untuned::Unread(e)) => {
                        return Err(ConnectError {
                            url: self.url.to_string(),
                            lost_after_login: lost_before_anything(&e),
                            message: format!(
                                "the session's settings could not be read, so whether its \
                                 commits are durable (synchronous_commit) and its isolation safe \
                                 is unknown: {e}"
                            ),
                        })
                    }
                    // Not a tuning: a file's lines rely on it (see `tune`).
                    Err(Untuned::Isolation(e)) => {
                        return Err(ConnectError {
                            url: self.url.to_string(),
                            lost_after_login: lost_before_anything(&e),
                            message: format!(
                                "the session's default isolation is REPEATABLE READ, and raising \
                                 it to SERIALIZABLE failed: {e}"
                            ),
                        })
                    }
                    Err(Untuned::Durability(e)) => {
                        return Err(ConnectError {
                            url: self.url.to_string(),
                            lost_after_login: lost_before_anything(&e),
                            message: format!(
                                "the session commits asynchronously (synchronous_commit = off), \
                                 and making it commit synchronously failed: {e}"
                            ),
                        })
                    }
                }
                // Asked for by the user (`--inject-retries`), so a failure is an error.
                for (name, value) in &self.url.session_settings {
                    conn.batch_execute(&format!("SET {name} = {value}"))
                        .map_err(|e| ConnectError {
                            url: self.url.to_string(),
                            lost_after_login: lost_before_anything(&e),
                            message: format!("SET {name} = {value} failed: {e}"),
                        })?;
                }
                Ok(slot.insert(conn))
            }
        }
    }

    /// Turns `--inject-retries` off on the open connection (see `retry::stop_injecting`); a
    /// new connection turns it on again. Nothing to do without `--inject-retries`.
    pub fn stop_injecting(&mut self) {
        let injecting = self
            .url
            .session_settings
            .iter()
            .any(|(name, _)| *name == "inject_retry_errors_enabled");
        if let (true, Some(conn)) = (injecting, self.conn.as_mut()) {
            if let Err(e) = conn.batch_execute("SET inject_retry_errors_enabled = false") {
                log::debug!("turning inject_retry_errors_enabled off failed: {e}");
            }
        }
    }

    /// Whether a connection is open (it may still turn out to be dead when used).
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// `conn()`, once `check` (the schema's, made before anything else is sent) passed on it: a
    /// connection lost during the check is opened again and checked again, until `timeout`
    /// (`DbUrl::connect_checked`).
    pub fn checked(
        &mut self,
        timeout: Duration,
        mut check: impl FnMut(&mut PgConnection) -> Result<(), crate::error::Error>,
    ) -> Result<&mut PgConnection, crate::error::Error> {
        Reconnecting::new(timeout).until(|| {
            let conn = self.conn().map_err(|e| Box::new((e.into(), true)))?;
            check(conn).map_err(|e| {
                self.reset();
                Box::new((e, false))
            })
        })?;
        Ok(self.conn()?)
    }

    /// Drops the connection; the next `conn()` opens a new one.
    pub fn reset(&mut self) {
        self.conn = None;
    }
}

/// The loop of `DbUrl::connect_checked` and `Session::checked`: a connection lost before anything
/// was done on it (or, after such a loss, one not made yet: a server restarting) is tried again,
/// after a pause, until the deadline.
/// How long a backend whose client closed its connection may take to give up its slot.
const SLOT_FREES_WITHIN: Duration = Duration::from_secs(3);

struct Reconnecting {
    timeout: Duration,
    deadline: Option<std::time::Instant>,
    lost: u32,
    /// The run has just closed a connection of its own, whose slot may not be free yet
    /// (`DbUrl::connect_to_write_after_closing`): until when a refusal for want of a slot is
    /// taken for that one's.
    own_slot_closing: Option<std::time::Instant>,
    /// Pauses made so far, for the next one's length.
    pauses: u32,
}

impl Reconnecting {
    fn new(timeout: Duration) -> Reconnecting {
        Reconnecting {
            timeout,
            deadline: std::time::Instant::now().checked_add(timeout),
            lost: 0,
            own_slot_closing: None,
            pauses: 0,
        }
    }

    /// `new` in place of a connection just closed. Its backend exits within moments; a limit
    /// still met after `SLOT_FREES_WITHIN` is another's (a role allowed one connection that
    /// another client took), said then, not after the whole `timeout`.
    fn after_closing(timeout: Duration) -> Reconnecting {
        Reconnecting {
            own_slot_closing: std::time::Instant::now().checked_add(SLOT_FREES_WITHIN),
            ..Reconnecting::new(timeout)
        }
    }

    /// `attempt` again (after `after`'s pause) while its error, with whether it came from
    /// connecting, may be cured by connecting again.
    fn until<T>(
        &mut self,
        mut attempt: impl FnMut() -> Result<T, Box<(crate::error::Error, bool)>>,
    ) -> Result<T, crate::error::Error> {
        loop {
            match attempt() {
                Ok(done) => return Ok(done),
                Err(failed) => {
                    let (e, connecting) = *failed;
                    self.after(e, connecting)?
                }
            }
        }
    }

    /// `Ok` after a pause when `e` may be cured by connecting again and there is time left;
    /// otherwise the error to end with. `connecting`: `e` is a connection not made, tried again
    /// only after a loss (a first one refused is said at once). None after Ctrl-C.
    fn after(
        &mut self,
        e: crate::error::Error,
        connecting: bool,
    ) -> Result<(), crate::error::Error> {
        use crate::error::Error;
        let lost = match &e {
            // A connection lost while its session was set up is one lost before anything was
            // done, as one lost during the check (it ended every command but a transfer at
            // once, exit 1, "terminating connection due to administrator command": a helper
            // playing a new user, with a DBA's loop ending young backends).
            Error::Connect(c) => {
                connecting && (self.lost > 0 || c.lost_after_login) && c.is_transient()
            }
            Error::Database(d) => !connecting && lost_before_anything(d),
            _ => false,
        };
        let slot_not_free = self
            .own_slot_closing
            .is_some_and(|until| std::time::Instant::now() < until)
            && connecting
            && matches!(&e, Error::Connect(c) if c.is_connection_limit());
        if !lost && !slot_not_free {
            return Err(match self.lost {
                // Lost, then refused for good (a password changed meanwhile): said with the loss.
                1.. if connecting => Error::LostBeforeStart {
                    timeout: self.timeout,
                    last: Box::new(e),
                },
                _ => e,
            });
        }
        if crate::interrupt::interrupted() {
            return Err(Error::Stopped(crate::interrupt::reason()));
        }
        let left = self
            .deadline
            .map(|d| d.saturating_duration_since(std::time::Instant::now()));
        if left.is_some_and(|left| left.is_zero()) {
            return Err(match lost || self.lost > 0 {
                true => Error::LostBeforeStart {
                    timeout: self.timeout,
                    last: Box::new(e),
                },
                false => e,
            });
        }
        if lost {
            self.lost += 1;
            log::info!("the connection was lost before anything was done ({e}); connecting again");
        } else {
            log::info!(
                "the connection just closed may still hold its slot ({e}); connecting again"
            );
        }
        self.pauses += 1;
        let policy = crate::retry::RetryPolicy {
            base: Duration::from_millis(50),
            ..crate::retry::RetryPolicy::default()
        };
        let pause = policy.backoff(self.pauses, &mut rand::rng());
        std::thread::sleep(left.map_or(pause, |left| pause.min(left)));
        Ok(())
    }
}

/// Whether `e` is a connection lost before a COMMIT (`retry::classify`): on a statement that
/// wrote nothing (a check, a read), nothing was done.
fn lost_before_anything(e: &diesel::result::Error) -> bool {
    crate::retry::classify(e, crate::retry::Phase::BeforeCommit)
        == Some(crate::retry::Cause::ConnectionLost)
}

/// The statement_timeout `bank` set on its transfer sessions (its `--timeout`), in ms; 0 when
/// it set none (the server's own was shorter, or no transfer session was opened).
static OWN_STATEMENT_TIMEOUT_MS: AtomicU64 = AtomicU64::new(0);

/// Set when a session of this run kept the server's statement_timeout, stricter than bank's.
static SERVER_STATEMENT_TIMEOUT_KEPT: AtomicBool = AtomicBool::new(false);

/// The `--timeout` that `bank` set as its sessions' statement_timeout, if it set one: a
/// statement cancelled for a statement timeout was then cancelled by `bank`'s own deadline, not
/// by a setting of the server's, unless `server_statement_timeout_kept`.
pub fn own_statement_timeout() -> Option<Duration> {
    match OWN_STATEMENT_TIMEOUT_MS.load(Ordering::Relaxed) {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    }
}

/// Whether a session of this run kept the server's statement_timeout, stricter than bank's
/// `--timeout` (the role's or database's setting made stricter mid-run, met by a reconnect): a
/// cancellation may then be the server's, and was credited to bank's deadline alone (found by a
/// fault-injecting helper).
pub fn server_statement_timeout_kept() -> bool {
    SERVER_STATEMENT_TIMEOUT_KEPT.load(Ordering::Relaxed)
}

/// The server's idle_in_transaction_session_timeout, in ms, when a session of this run kept it
/// (stricter than bank's deadline); 0 otherwise.
static SERVER_IDLE_TIMEOUT_KEPT_MS: AtomicU64 = AtomicU64::new(0);

/// The server's idle_in_transaction_session_timeout that a session of this run kept, stricter
/// than bank's `--timeout`: a few milliseconds end bank's sessions between a transaction's
/// statements, and the connection is lost with no word of why (found by a new user).
pub fn server_idle_timeout_kept() -> Option<Duration> {
    match SERVER_IDLE_TIMEOUT_KEPT_MS.load(Ordering::Relaxed) {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    }
}

/// Why `tune` fell short: a tuning, ignored; or one of the settings that are not tunings.
enum Untuned {
    /// The settings could not be read, so whether the two below were needed is unknown: the
    /// connection is not used (it was kept, and a transfer committed asynchronously was
    /// reported applied; found by a reviewer).
    Unread(diesel::result::Error),
    Tuning(diesel::result::Error),
    Isolation(diesel::result::Error),
    Durability(diesel::result::Error),
}

/// `synchronous_commit = on` for a connection of its own (`seed`, `reset`, the workload's setup)
/// where the server's default is `off`, as `tune` does for the transfer sessions: rows a command
/// reported created were lost to a crash (found by a reviewer: accounts `seed` printed).
pub fn commit_synchronously(conn: &mut PgConnection) -> diesel::QueryResult<()> {
    #[derive(QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
        value: Option<String>,
    }
    let current: Setting =
        diesel::sql_query("SELECT current_setting('synchronous_commit', true) AS value")
            .get_result(conn)?;
    if current
        .value
        .as_deref()
        .is_some_and(|v| v.eq_ignore_ascii_case("off"))
    {
        conn.batch_execute("SET synchronous_commit = on")?;
    }
    Ok(())
}

/// `idle_in_transaction_session_timeout` = `timeout` for a connection of its own (`seed`,
/// `reset`, a workload's setup, `init`), unless the server already sets a shorter one, as `tune`
/// does for the transfer sessions. A COMMIT lost with its client (a link down, the client's host
/// gone) left the transaction idle on the server until its TCP keepalive noticed, two hours by
/// default: a reset's held its locks on up to 10,000 accounts, a migration's a whole table, and a
/// seed's open snapshot made every SERIALIZABLE read of the server fail ("canceled on conflict
/// out to old pivot"; found by a fault-injecting helper). The command itself has given up by
/// then: its `--timeout` is that of every step. A tuning: a failure is logged and ignored. The
/// value is whole milliseconds that `bank` computed, not user text.
pub fn end_abandoned_transactions(conn: &mut PgConnection, timeout: Duration) {
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128);
    let set =
        idle_timeout_ms(conn).and_then(|current| match current.filter(|v| *v > 0 && *v <= ms) {
            Some(_) => Ok(()),
            None => conn.batch_execute(&format!("SET idle_in_transaction_session_timeout = {ms}")),
        });
    if let Err(e) = set {
        log::info!("cannot bound idle_in_transaction_session_timeout ({e}); going on");
    }
}

/// The session's `idle_in_transaction_session_timeout` in ms (`None`: not a value bank reads).
fn idle_timeout_ms(conn: &mut PgConnection) -> diesel::QueryResult<Option<u128>> {
    #[derive(QueryableByName)]
    struct Setting {
        #[diesel(sql_type = Text)]
        value: String,
    }
    diesel::sql_query("SELECT current_setting('idle_in_transaction_session_timeout') AS value")
        .get_result::<Setting>(conn)
        .map(|s| parse_setting_ms(&s.value))
}

/// Runs `write`, output that waits for its reader as long as that takes (a seed's ids, written
/// before its COMMIT; bank's watch does not count that time), in `conn`'s open transaction
/// with `idle_in_transaction_session_timeout` lifted, and puts it back for the rest of the
/// transaction (its COMMIT, where a client lost leaves it idle): a seed piped to `less` lost
/// its chunk to the timeout `end_abandoned_transactions` set. The value put back is whole
/// milliseconds that `bank` parsed, not user text.
pub fn idle_timeout_lifted<T, E: From<diesel::result::Error>>(
    conn: &mut PgConnection,
    write: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    let ms = match idle_timeout_ms(conn)? {
        Some(ms) if ms > 0 => ms,
        _ => return write(),
    };
    conn.batch_execute("SET LOCAL idle_in_transaction_session_timeout = 0")?;
    let written = write()?;
    conn.batch_execute(&format!(
        "SET LOCAL idle_in_transaction_session_timeout = {ms}"
    ))?;
    Ok(written)
}

/// See `Session`. The timeouts are whole milliseconds that `bank` computed, not user text.
fn tune(conn: &mut PgConnection, timeout: Duration) -> Result<(), Untuned> {
    let current: Timeouts = diesel::sql_query(
        "SELECT current_setting('statement_timeout') AS statement, \
         current_setting('idle_in_transaction_session_timeout') AS idle_in_transaction, \
         current_setting('default_transaction_isolation') AS isolation, \
         current_setting('synchronous_commit', true) AS synchronous_commit",
    )
    .get_result(conn)
    .map_err(Untuned::Unread)?;
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128);
    let mut sql = String::new();
    for (name, value) in [
        ("statement_timeout", &current.statement),
        (
            "idle_in_transaction_session_timeout",
            &current.idle_in_transaction,
        ),
    ] {
        let server = parse_setting_ms(value).filter(|v| *v > 0 && *v <= ms);
        match (server, name == "statement_timeout") {
            (None, own) => {
                sql.push_str(&format!("SET {name} = {ms}; "));
                if own {
                    OWN_STATEMENT_TIMEOUT_MS.store(ms as u64, Ordering::Relaxed);
                }
            }
            (Some(_), true) => SERVER_STATEMENT_TIMEOUT_KEPT.store(true, Ordering::Relaxed),
            (Some(v), false) => SERVER_IDLE_TIMEOUT_KEPT_MS.store(v as u64, Ordering::Relaxed),
        }
    }
    // REPEATABLE READ as the default (the role's or the database's): a snapshot taken before a
    // rerun claimed an id hides that claim from the check a run makes once it holds the
    // accounts, and the rerun's locks raise no conflict there, so a file's line could apply
    // after the rerun said "not applied" (found by a reviewer). SERIALIZABLE makes one of the
    // two fail instead (READ COMMITTED reads the claims afresh). Every session, so that a
    // reconnect keeps it. A statement of its own, so that no tuning's failure skips it, and a
    // failure of its own fails the connection.
    if current.isolation.eq_ignore_ascii_case("repeatable read") {
        conn.batch_execute("SET default_transaction_isolation = 'serializable'")
            .map_err(Untuned::Isolation)?;
    }
    // Asynchronous commit (the database's or the role's default; anyone may set it): the server
    // answers COMMIT before its WAL is written, and a crash then takes the transfer back. bank
    // said "applied" for transfers that a crash undid, and a rerun applied them again (found by
    // a fault-injecting helper). `local` and the stronger levels are kept: the WAL is on this
    // server's disk before the answer. Like the isolation, decided here, and a failure fails the
    // connection.
    if current
        .synchronous_commit
        .as_deref()
        .is_some_and(|v| v.eq_ignore_ascii_case("off"))
    {
        conn.batch_execute("SET synchronous_commit = on")
            .map_err(Untuned::Durability)?;
    }
    sql.push_str("SET enable_seqscan = off");
    conn.batch_execute(&sql).map_err(Untuned::Tuning)
}

/// A time setting as `SHOW` prints it ("0", "500ms", "5s", "1min", "2h", "1d"; a bare number
/// is milliseconds), in milliseconds.
fn parse_setting_ms(value: &str) -> Option<u128> {
    let v = value.trim();
    let digits = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let n: u128 = v[..digits].parse().ok()?;
    let unit = match v[digits..].trim() {
        "" | "ms" => 1,
        "s" => 1_000,
        "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    Some(n * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_settings_are_read_in_every_unit() {
        assert_eq!(parse_setting_ms("0"), Some(0));
        assert_eq!(parse_setting_ms("500ms"), Some(500));
        assert_eq!(parse_setting_ms("5s"), Some(5_000));
        assert_eq!(parse_setting_ms("2min"), Some(120_000));
        assert_eq!(parse_setting_ms("1h"), Some(3_600_000));
        assert_eq!(parse_setting_ms("1d"), Some(86_400_000));
        assert_eq!(parse_setting_ms("1500"), Some(1_500));
        assert_eq!(parse_setting_ms("soon"), None);
    }

    #[test]
    fn connections_get_keepalives_and_a_user_timeout_unless_the_url_sets_them() {
        let url = DbUrl::parse("postgres://bank:pw@db/bank?tcp_user_timeout=999").expect("ok");
        let s = url.connect_string("bank", Duration::from_secs(3));
        assert!(s.contains("?tcp_user_timeout=999&connect_timeout=3&application_name=bank"));
        assert!(s.contains("&keepalives=1&keepalives_idle=1&keepalives_interval=1"));
        assert!(!s.contains("tcp_user_timeout=3000"), "{s}");
    }

    /// A password parameter that ends in '?' (a helper playing a new user): libpq takes the
    /// '?' as part of the value, as psql does; bank dropped it with the empty query's, and the
    /// server refused the password.
    #[test]
    fn a_question_mark_ending_a_value_stays_in_the_connection_string() {
        let url = DbUrl::parse("postgres://u@db/bank?password=Ends?").expect("ok");
        let s = url.connect_string("bank", Duration::from_secs(3));
        assert!(s.starts_with("postgres://u@db/bank?password=Ends?&"), "{s}");
        for (raw, start) in [
            (
                "postgres://u@db/bank?",
                "postgres://u@db/bank?connect_timeout=3",
            ),
            (
                "postgres://u@db/bank?a=b&",
                "postgres://u@db/bank?a=b&connect_timeout=3",
            ),
        ] {
            let s = DbUrl::parse(raw)
                .expect("ok")
                .connect_string("bank", Duration::from_secs(3));
            assert!(s.starts_with(start), "{raw}: {s}");
        }
    }

    /// A parameter whose name ends in one of bank's (`fallback_application_name`) is not it:
    /// taken for it, bank added no `application_name`, its sessions were named by the fallback,
    /// and `doctor` said "application_name=bank" (a helper playing a new user).
    #[test]
    fn only_the_parameter_itself_keeps_bank_from_setting_it() {
        let url =
            DbUrl::parse("postgres://u:pw@db/bank?fallback_application_name=app").expect("ok");
        let s = url.connect_string("bank", Duration::from_secs(3));
        assert!(s.contains("&application_name=bank"), "{s}");
        let url = DbUrl::parse("postgres://u:pw@db/bank?application_name=mine").expect("ok");
        let s = url.connect_string("bank", Duration::from_secs(3));
        assert!(!s.contains("application_name=bank"), "{s}");
        // libpq decodes keys: the URL's own connect timeout, written percent-encoded, was
        // overridden by bank's (a reviewer's nit).
        let url = DbUrl::parse("postgres://u:pw@db/bank?connect%5Ftimeout=7").expect("ok");
        let s = url.connect_string("bank", Duration::from_secs(3));
        assert!(!s.contains("&connect_timeout=3"), "{s}");
    }

    /// What `doctor` reports of bank's parameters is what the connection uses: the URL's own
    /// `connect%5Ftimeout=7` (libpq decodes keys, and `connect_string` keeps it) was reported as
    /// bank's 3 (found by a mutation-testing helper; a real defect, fixed with this test).
    #[test]
    fn the_parameters_doctor_reports_are_those_the_connection_uses() {
        let url = DbUrl::parse("postgres://u:pw@db/bank?connect%5Ftimeout=7&keepalives_idle=9")
            .expect("ok");
        let reported = url.client_parameters("bank", Duration::from_secs(3));
        let value = |name: &str| {
            reported
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            value("connect_timeout").as_deref(),
            Some("7"),
            "{reported:?}"
        );
        assert_eq!(
            value("keepalives_idle").as_deref(),
            Some("9"),
            "{reported:?}"
        );
        assert_eq!(
            value("keepalives_interval").as_deref(),
            Some("1"),
            "{reported:?}"
        );
    }

    #[test]
    fn a_timeout_of_a_year_still_makes_a_connection_string_libpq_takes() {
        // libpq reads tcp_user_timeout as a C int of milliseconds: `--timeout 1y` made
        // 31557600000, and every connection failed with "invalid integer value".
        let url = DbUrl::parse("postgres://bank:pw@db/bank").expect("ok");
        for timeout in [Duration::from_secs(31_557_600), Duration::MAX] {
            let s = url.connect_string("bank", timeout);
            let ms = s
                .split("tcp_user_timeout=")
                .nth(1)
                .and_then(|v| v.split('&').next())
                .and_then(|v| v.parse::<i64>().ok());
            assert_eq!(ms, Some(i64::from(i32::MAX)), "{s}");
        }
    }

    /// Tests from a fourth mutation round (each fails on its mutant, passes here).
    ///
    /// bank's own parameters, scaled to the deadline as the README says: a connect timeout of
    /// 5 s at most, keepalives idle a third of it (30 s at most), probes a sixth (10 s at
    /// most), `tcp_user_timeout` the deadline itself. No test held the caps: a connect timeout
    /// of the whole 30 s deadline, or keepalives idle for minutes, passed.
    #[test]
    fn bank_s_parameters_follow_the_deadline_within_their_caps() {
        let url = DbUrl::parse("postgres://u:pw@db/bank").expect("ok");
        for (secs, expected) in [
            (
                30,
                "connect_timeout=5&application_name=bank&keepalives=1&keepalives_idle=10&\
                 keepalives_interval=5&keepalives_count=3&tcp_user_timeout=30000",
            ),
            (
                3600,
                "connect_timeout=5&application_name=bank&keepalives=1&keepalives_idle=30&\
                 keepalives_interval=10&keepalives_count=3&tcp_user_timeout=3600000",
            ),
        ] {
            let s = url.connect_string("bank", Duration::from_secs(secs));
            assert_eq!(s, format!("postgres://u:pw@db/bank?{expected}"), "{secs}s");
        }
    }

    /// A login lost after it was made (`lost_after_login`) is tried again only when the
    /// refusal is one another attempt may not meet: a password refused is said at once, not
    /// tried again until the deadline.
    #[test]
    fn a_permanent_refusal_after_a_lost_login_is_said_at_once() {
        let refusal = crate::error::Error::Connect(ConnectError {
            url: "postgres://bank:***@db/bank".into(),
            message: "FATAL: password authentication failed for user \"teller\"".into(),
            lost_after_login: true,
        });
        let started = std::time::Instant::now();
        let said = Reconnecting::new(Duration::from_secs(600)).after(refusal, true);
        assert!(
            matches!(said, Err(crate::error::Error::Connect(_))),
            "{said:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    fn refused(message: &str) -> crate::error::Error {
        crate::error::Error::Connect(ConnectError {
            url: "postgres://bank:***@db/bank".into(),
            message: message.into(),
            lost_after_login: false,
        })
    }

    /// A connection made in place of one the run has just closed may be refused for want of a
    /// slot that the closed one's backend still holds: tried again, and only that refusal.
    /// Anywhere else a first refusal is said at once, in its own words.
    #[test]
    fn a_slot_the_run_just_freed_is_waited_for_and_nothing_else() {
        let full = "FATAL: too many connections for role \"teller\"";
        let after_closing = || Reconnecting::after_closing(Duration::from_secs(5));
        assert!(after_closing().after(refused(full), true).is_ok());
        let first = Reconnecting::new(Duration::from_secs(5)).after(refused(full), true);
        assert!(
            matches!(first, Err(crate::error::Error::Connect(_))),
            "{first:?}"
        );
        let password = "FATAL: password authentication failed for user \"teller\"";
        let refused_for_good = after_closing().after(refused(password), true);
        assert!(
            matches!(&refused_for_good, Err(crate::error::Error::Connect(c)) if c.message == password),
            "{refused_for_good:?}"
        );
        // Out of time: the refusal itself, not a loss that never happened.
        let late = Reconnecting::after_closing(Duration::ZERO).after(refused(full), true);
        assert!(
            matches!(late, Err(crate::error::Error::Connect(_))),
            "{late:?}"
        );
        // A slot still taken once the closed one's backend must have exited is another's: said
        // then, not after the whole deadline (a seed waited its --timeout for it).
        let mut long = Reconnecting::after_closing(Duration::from_secs(600));
        long.own_slot_closing = std::time::Instant::now().checked_sub(Duration::from_millis(1));
        let taken = long.after(refused(full), true);
        assert!(
            matches!(taken, Err(crate::error::Error::Connect(_))),
            "{taken:?}"
        );
    }
}
