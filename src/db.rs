//! Where the database is and how to reach it: URL resolution (flag, `DATABASE_URL`, `.env`),
//! password redaction, connecting with a timeout, and a `Session` that reconnects after a
//! connection is lost.

use std::fmt;
use std::time::Duration;

use diesel::connection::{Instrumentation, InstrumentationEvent, SimpleConnection};
use diesel::prelude::*;
use diesel::sql_types::Text;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::error::{ConfigError, ConnectError};

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Seconds libpq waits for a server before giving up; an unreachable host must fail fast.
const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 5;
/// libpq's smallest connect timeout.
const MIN_CONNECT_TIMEOUT_SECS: u64 = 2;

/// A validated `postgres://` URL. `Display` shows it with the password replaced by `***`, so it
/// can go into any message or log line; the secret itself is only handed to libpq.
///
/// The `url` crate parses it when it can. It cannot parse libpq's multi-host form
/// (`postgresql://u@h1:26257,h2:26257/db`, CockroachDB failover), which is therefore checked and
/// redacted as text.
#[derive(Clone)]
pub struct DbUrl {
    full: String,
    parsed: Option<url::Url>,
    /// The password, wherever the URL carries it (`user:password@`, `?password=`), as written
    /// and percent-decoded: `redact_text` hides both in messages from libpq or the server.
    secrets: Vec<String>,
}

impl DbUrl {
    /// Resolves the URL: `--database-url`, else `DATABASE_URL` (which `.env` may set: see
    /// `load_dotenv`).
    pub fn resolve(flag: Option<&str>) -> Result<DbUrl, ConfigError> {
        if let Some(url) = flag {
            return DbUrl::parse(url);
        }
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.trim().is_empty() => DbUrl::parse(&url),
            _ => Err(ConfigError::MissingUrl),
        }
    }

    pub fn parse(raw: &str) -> Result<DbUrl, ConfigError> {
        let raw = raw.trim();
        let secrets = secrets_of(raw);
        let malformed = |reason: &str| ConfigError::MalformedUrl {
            url: redact(raw, &secrets),
            reason: reason.to_string(),
        };
        let rest = raw
            .strip_prefix("postgres://")
            .or_else(|| raw.strip_prefix("postgresql://"))
            .ok_or_else(|| malformed("it must start with postgres:// or postgresql://"))?;
        if raw.chars().any(char::is_whitespace) {
            return Err(malformed("it contains whitespace"));
        }
        let authority = authority_of(rest);
        let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let host_param = rest.contains("host=");
        let parsed = if hosts.contains(',') {
            // libpq's list of hosts: each host:port must be sound.
            for host_port in hosts.split(',') {
                check_port(host_port).map_err(&malformed)?;
            }
            None
        } else {
            let url = url::Url::parse(raw).map_err(|e| match e {
                url::ParseError::InvalidPort => {
                    malformed("the port is not a number from 0 to 65535")
                }
                e => malformed(&e.to_string()),
            })?;
            Some(url)
        };
        let names_a_host = match &parsed {
            Some(url) => url.host_str().is_some_and(|h| !h.is_empty()),
            None => true,
        };
        if !names_a_host && !host_param {
            return Err(malformed("it names no host"));
        }
        Ok(DbUrl {
            full: raw.to_string(),
            parsed,
            secrets,
        })
    }

    /// The URL handed to libpq: the user's, plus what the user did not set of: a connect
    /// timeout, an application name, and TCP keepalives with `tcp_user_timeout`. The last two
    /// make a connection to a host that stopped answering (a network partition: packets dropped)
    /// fail within about `timeout` instead of TCP's retransmission limit (minutes). Unix-socket
    /// connections ignore them.
    fn connect_string(&self, application_name: &str, timeout: Duration) -> String {
        let secs = timeout.as_secs().max(1);
        let params = [
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
            ("tcp_user_timeout", (secs * 1000).to_string()),
        ];
        let mut url = self.full.clone();
        for (name, value) in params {
            if url.contains(&format!("{name}=")) {
                continue;
            }
            let sep = if url.contains('?') { '&' } else { '?' };
            url.push_str(&format!("{sep}{name}={value}"));
        }
        url
    }

    /// Removes the password from `text` (an error message from libpq or the server, say).
    pub fn redact_text(&self, text: &str) -> String {
        redact(text, &self.secrets)
    }

    pub fn password(&self) -> Option<&str> {
        self.secrets.first().map(String::as_str)
    }

    /// The same server, another database (tests and benchmarks use scratch databases).
    pub fn with_database(&self, database: &str) -> DbUrl {
        if let Some(url) = &self.parsed {
            let mut url = url.clone();
            url.set_path(&format!("/{database}"));
            return self.edited(url);
        }
        let (base, query) = match self.full.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (self.full.as_str(), None),
        };
        let scheme_end = base.find("://").map_or(0, |i| i + 3);
        let path_start = base[scheme_end..].find('/').map(|i| i + scheme_end);
        let root = path_start.map_or(base, |i| &base[..i]);
        let mut full = format!("{root}/{database}");
        if let Some(q) = query {
            full.push('?');
            full.push_str(q);
        }
        DbUrl {
            full,
            parsed: None,
            secrets: self.secrets.clone(),
        }
    }

    /// The host and port of a one-host URL (5432 when it names none).
    pub fn host_port(&self) -> Option<(String, u16)> {
        let url = self.parsed.as_ref()?;
        Some((url.host_str()?.to_string(), url.port().unwrap_or(5432)))
    }

    /// The same URL to another host and port, with `params` added (a one-host URL only: the test
    /// proxy stands in for the server with this).
    pub fn via(&self, host: &str, port: u16, params: &[(&str, &str)]) -> Option<DbUrl> {
        let mut url = self.parsed.clone()?;
        url.set_host(Some(host)).ok()?;
        url.set_port(Some(port)).ok()?;
        for (name, value) in params {
            url.query_pairs_mut().append_pair(name, value);
        }
        Some(self.edited(url))
    }

    fn edited(&self, url: url::Url) -> DbUrl {
        DbUrl {
            full: url.to_string(),
            parsed: Some(url),
            secrets: self.secrets.clone(),
        }
    }

    /// The raw URL, password included: only for handing to another program (tests, scripts).
    pub fn expose(&self) -> &str {
        &self.full
    }

    pub fn connect(&self) -> Result<PgConnection, ConnectError> {
        self.connect_as("bank")
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
        let mut conn = PgConnection::establish(&self.connect_string(application_name, timeout))
            .map_err(|e| ConnectError {
                url: self.to_string(),
                message: self.redact_text(e.to_string().trim()),
            })?;
        if log::log_enabled!(target: "bank::sql", log::Level::Trace) {
            conn.set_instrumentation(SqlLogger);
        }
        Ok(conn)
    }
}

/// The URL with its password, and only its password, replaced by `***`.
impl fmt::Display for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(url) = &self.parsed else {
            return f.write_str(&redact_structurally(&self.full));
        };
        let mut shown = url.clone();
        if shown.password().is_some() {
            let _ = shown.set_password(Some("***"));
        }
        if url.query_pairs().any(|(k, _)| k == "password") {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k == "password" { "***".into() } else { v };
                    (k.into_owned(), v.into_owned())
                })
                .collect();
            shown.query_pairs_mut().clear().extend_pairs(pairs);
        }
        // The query's `***` stays readable, not percent-encoded.
        f.write_str(&shown.as_str().replace("%2A%2A%2A", "***"))
    }
}

impl fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DbUrl({self})")
    }
}

/// `user:password@host…`: the part after `scheme://` up to the path or query.
fn authority_of(rest: &str) -> &str {
    // The userinfo ends at the last `@`, so an unencoded `/` or `?` in a password is still
    // inside it.
    let (userinfo, after) = match rest.rsplit_once('@') {
        Some((u, a)) => (Some(u), a),
        None => (None, rest),
    };
    let end = after.find(['/', '?']).unwrap_or(after.len());
    match userinfo {
        Some(u) => &rest[..u.len() + 1 + end],
        None => &rest[..end],
    }
}

/// One `host:port` of a URL: the port, if any, must be a number (an IPv6 `[…]` has colons).
fn check_port(host_port: &str) -> Result<(), &'static str> {
    if let Some((_, port)) = host_port.rsplit_once(':') {
        if !port.is_empty() && !host_port.ends_with(']') && port.parse::<u16>().is_err() {
            return Err("the port is not a number from 0 to 65535");
        }
    }
    Ok(())
}

/// A URL the `url` crate cannot parse, with the password of its userinfo and of a `password=`
/// parameter replaced by `***`, and nothing else touched.
fn redact_structurally(raw: &str) -> String {
    let Some((scheme, rest)) = raw.split_once("://") else {
        return raw.to_string();
    };
    let authority = authority_of(rest);
    let tail = &rest[authority.len()..];
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{hosts}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some(("password", _)) => "password=***".to_string(),
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// The secrets in a URL: the password of `scheme://user:password@host/...` and the value of a
/// `password=` parameter. The userinfo ends at the last `@`, so an unencoded `/`, `?` or `@` in a
/// password is still caught (at worst more than the password is hidden).
fn secrets_of(raw: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    let rest = raw.split_once("://").map_or(raw, |(_, r)| r);
    if let Some((userinfo, _)) = rest.rsplit_once('@') {
        if let Some((_, password)) = userinfo.split_once(':') {
            secrets.push(password.to_string());
        }
    }
    if let Some((_, query)) = rest.split_once('?') {
        for pair in query.split('&') {
            if let Some(("password", value)) = pair.split_once('=') {
                secrets.push(value.to_string());
            }
        }
    }
    // libpq decodes %XX; a message could carry either form.
    let decoded: Vec<String> = secrets
        .iter()
        .filter_map(|s| {
            url::form_urlencoded::parse(format!("p={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
        })
        .collect();
    secrets.extend(decoded);
    secrets.retain(|s| !s.is_empty());
    secrets.dedup();
    // Longest first, so a secret that contains another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets
}

fn redact(text: &str, secrets: &[String]) -> String {
    secrets.iter().fold(text.to_string(), |t, secret| {
        t.replace(secret.as_str(), "***")
    })
}

/// Loads `.env` (from the working directory or a parent) into the environment without overriding
/// what is already set. A missing `.env` is fine; one that cannot be parsed is an error, not
/// silently ignored. Called before the command line is parsed, so `.env` can also set the
/// `BANK_*` variables that flags default to.
pub fn load_dotenv() -> Result<(), ConfigError> {
    match dotenvy::dotenv() {
        Ok(_) => Ok(()),
        Err(e) if e.not_found() => Ok(()),
        // dotenvy's message quotes the whole line, which may hold a password: name the key only.
        Err(dotenvy::Error::LineParse(line, _)) => Err(ConfigError::DotEnv(format!(
            "malformed line for {}",
            line.split('=').next().unwrap_or_default().trim()
        ))),
        Err(e) => Err(ConfigError::DotEnv(e.to_string())),
    }
}

/// Runs the embedded migrations that have not run yet; returns their names.
pub fn run_migrations(conn: &mut PgConnection) -> Result<Vec<String>, crate::error::Error> {
    let done = conn
        .run_pending_migrations(MIGRATIONS)
        .map_err(crate::error::Error::Migration)?;
    Ok(done.iter().map(ToString::to_string).collect())
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
/// A failure of these settings is logged and ignored: they tune, they do not decide correctness.
pub struct Session {
    url: DbUrl,
    application_name: &'static str,
    timeout: Duration,
    conn: Option<PgConnection>,
    /// Connections opened so far (the first one included).
    pub connects: u64,
}

#[derive(QueryableByName)]
struct Timeouts {
    #[diesel(sql_type = Text)]
    statement: String,
    #[diesel(sql_type = Text)]
    idle_in_transaction: String,
}

impl Session {
    pub fn new(url: DbUrl, application_name: &'static str) -> Session {
        Session {
            url,
            application_name,
            timeout: crate::retry::RetryPolicy::default().timeout,
            conn: None,
            connects: 0,
        }
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
                let mut conn = self
                    .url
                    .connect_within(self.application_name, self.timeout)?;
                self.connects += 1;
                if let Err(e) = tune(&mut conn, self.timeout) {
                    log::debug!("tuning the session failed (ignored): {e}");
                }
                Ok(slot.insert(conn))
            }
        }
    }

    /// Whether a connection is open (it may still turn out to be dead when used).
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Drops the connection; the next `conn()` opens a new one.
    pub fn reset(&mut self) {
        self.conn = None;
    }
}

/// See `Session`. The timeouts are whole milliseconds that `bank` computed, not user text.
fn tune(conn: &mut PgConnection, timeout: Duration) -> QueryResult<()> {
    let current: Timeouts = diesel::sql_query(
        "SELECT current_setting('statement_timeout') AS statement, \
         current_setting('idle_in_transaction_session_timeout') AS idle_in_transaction",
    )
    .get_result(conn)?;
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128);
    let mut sql = String::new();
    for (name, value) in [
        ("statement_timeout", &current.statement),
        (
            "idle_in_transaction_session_timeout",
            &current.idle_in_transaction,
        ),
    ] {
        let stricter = parse_setting_ms(value).is_some_and(|v| v > 0 && v <= ms);
        if !stricter {
            sql.push_str(&format!("SET {name} = {ms}; "));
        }
    }
    sql.push_str("SET enable_seqscan = off");
    conn.batch_execute(&sql)
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

    fn shown(raw: &str) -> String {
        match DbUrl::parse(raw) {
            Ok(url) => url.to_string(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn passwords_are_hidden_wherever_the_url_carries_them() {
        assert_eq!(
            shown("postgres://bank:s3cret@db:5432/bank"),
            "postgres://bank:***@db:5432/bank"
        );
        assert_eq!(
            shown("postgresql://bank@db/bank?sslmode=require&password=s3cret"),
            "postgresql://bank@db/bank?sslmode=require&password=***"
        );
        for raw in [
            "postgres://bank:s3/cr?et@db/bank",
            "postgres://bank:s3cr@t@db/bank",
            "postgres://bank:s3cret@db:port/bank",
            "mysql://bank:s3cret@db/bank",
        ] {
            let text = shown(raw);
            assert!(!text.contains("s3"), "{raw} -> {text}");
        }
    }

    #[test]
    fn only_the_password_is_hidden() {
        assert_eq!(
            shown("postgres://bank:bank@127.0.0.1:54329/bank"),
            "postgres://bank:***@127.0.0.1:54329/bank"
        );
        assert_eq!(
            shown("postgresql://root:pw@h1:26257,h2:26257/defaultdb?sslmode=disable&password=pw"),
            "postgresql://root:***@h1:26257,h2:26257/defaultdb?sslmode=disable&password=***"
        );
        assert_eq!(
            shown("postgres://bank:p%40ss@db/bank"),
            "postgres://bank:***@db/bank"
        );
    }

    #[test]
    fn multi_host_urls_are_accepted_and_checked() {
        assert!(DbUrl::parse("postgresql://u@h1:26257,h2:26257/db").is_ok());
        assert!(DbUrl::parse("postgresql://u@h1:26257,h2:port/db").is_err());
        let url = DbUrl::parse("postgresql://u:pw@h1:1,h2:2/db?x=1").expect("valid");
        assert_eq!(
            url.with_database("other").expose(),
            "postgresql://u:pw@h1:1,h2:2/other?x=1"
        );
        assert_eq!(url.host_port(), None);
    }

    #[test]
    fn libpq_messages_are_redacted_too() {
        let url = DbUrl::parse("postgres://bank:s3cret@db/bank").expect("valid");
        assert_eq!(url.redact_text("failed for s3cret"), "failed for ***");
    }

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

    #[test]
    fn a_proxy_can_stand_in_for_the_server() {
        let url = DbUrl::parse("postgres://bank:pw@127.0.0.1:54329/bank").expect("valid");
        assert_eq!(url.host_port(), Some(("127.0.0.1".into(), 54329)));
        let via = url
            .via("127.0.0.1", 7000, &[("sslmode", "disable")])
            .expect("one host");
        assert_eq!(
            via.expose(),
            "postgres://bank:pw@127.0.0.1:7000/bank?sslmode=disable"
        );
    }

    #[test]
    fn another_database_keeps_the_rest() {
        let url = DbUrl::parse("postgres://bank:pw@db:5432/bank?sslmode=disable").expect("valid");
        assert_eq!(
            url.with_database("other").expose(),
            "postgres://bank:pw@db:5432/other?sslmode=disable"
        );
    }
}
