//! Which server `bank` talks to. Both engines speak PostgreSQL's protocol and most of its SQL;
//! the few places that differ (the migration session, `--inject-retries`, `doctor`) ask once
//! per connection with `SELECT version()`, whose text starts with "CockroachDB" on CockroachDB
//! and with "PostgreSQL" on PostgreSQL.

use std::fmt;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::Text;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Engine {
    PostgreSQL,
    CockroachDB,
}

/// The server, as `SELECT version()` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Server {
    pub engine: Engine,
    /// The release: "15.4", "v24.3.5"; empty when the text names none.
    pub release: String,
    /// `version()`'s whole text.
    pub version: String,
}

impl Server {
    /// Reads `version()`'s text. Anything that does not say CockroachDB is taken for
    /// PostgreSQL, whose SQL `bank` speaks (forks such as YugabyteDB also begin "PostgreSQL").
    pub fn parse(version: &str) -> Server {
        let version = version.trim();
        let engine = if version.contains("CockroachDB") {
            Engine::CockroachDB
        } else {
            Engine::PostgreSQL
        };
        // The release is the first word that starts with a digit, or with 'v' and a digit.
        let release = version
            .split(|c: char| c.is_whitespace() || c == ',')
            .find(|w| {
                let digits = w.strip_prefix('v').unwrap_or(w);
                digits.starts_with(|c: char| c.is_ascii_digit())
            })
            .unwrap_or_default()
            .to_string();
        Server {
            engine,
            release,
            version: version.to_string(),
        }
    }

    pub fn is_cockroachdb(&self) -> bool {
        self.engine == Engine::CockroachDB
    }

    /// The `SET`s a migration session needs on this engine, each sent on its own. CockroachDB
    /// v25.1 turned `autocommit_before_ddl` on by default: a schema change inside an explicit
    /// transaction first commits the transaction. Diesel runs each migration, and the row that
    /// records it, in one BEGIN … COMMIT, so with the setting on the DDL could commit apart from
    /// its bookkeeping; off, they commit together (as on PostgreSQL and older CockroachDB). And
    /// with that setting off, CockroachDB aborts a schema change that follows another statement
    /// in an explicit READ COMMITTED transaction (read-committed-limitations), which a cluster or
    /// role whose default is READ COMMITTED would make every migration: migrations run
    /// SERIALIZABLE.
    pub fn migration_session_sql(&self) -> &'static [&'static str] {
        match self.is_cockroachdb() {
            true => &[
                "SET default_transaction_isolation = 'serializable'",
                "SET autocommit_before_ddl = false",
            ],
            false => &[],
        }
    }
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.engine {
            Engine::PostgreSQL => "PostgreSQL",
            Engine::CockroachDB => "CockroachDB",
        };
        if self.release.is_empty() {
            write!(f, "{name}")
        } else {
            write!(f, "{name} {}", self.release)
        }
    }
}

#[derive(QueryableByName)]
struct Version {
    #[diesel(sql_type = Text)]
    version: String,
}

/// Asks the server what it is.
pub fn detect(conn: &mut PgConnection) -> QueryResult<Server> {
    let v: Version = diesel::sql_query("SELECT version() AS version").get_result(conn)?;
    Ok(Server::parse(&v.version))
}

/// How long one statement of a migration waits for a lock before it gives way (55P03). A schema
/// change queued behind another session's lock (a long report on `transfers`) holds up every
/// session that comes to the table after it, transfers included: an upgrade stalled the bank
/// for as long as that report ran. `init` tries again after a pause, until its `--timeout`.
pub const MIGRATION_LOCK_TIMEOUT: &str = "SET lock_timeout = '1s'";

/// Prepares `conn` for running migrations on `server` (see `Server::migration_session_sql`,
/// and `MIGRATION_LOCK_TIMEOUT`).
/// A server that does not know the setting (CockroachDB before v24.3) commits nothing early,
/// so "unrecognized configuration parameter" is fine.
pub fn prepare_migration_session(conn: &mut PgConnection, server: &Server) -> QueryResult<()> {
    let common = [MIGRATION_LOCK_TIMEOUT];
    for sql in server.migration_session_sql().iter().chain(&common) {
        match conn.batch_execute(sql) {
            Err(diesel::result::Error::DatabaseError(_, info))
                if is_unknown_setting(info.message()) =>
            {
                log::debug!("init: {server} does not know `{sql}`: fine");
            }
            other => other?,
        }
    }
    Ok(())
}

/// PostgreSQL's and CockroachDB's words for a `SET` of a variable they do not have.
pub fn is_unknown_setting(message: &str) -> bool {
    message.contains("unrecognized configuration parameter")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `version()` as each engine prints it (sources in the comments; CockroachDB's SQL shell
    /// prints `version()` in its "Server version:" banner).
    #[test]
    fn the_engine_and_release_are_read_from_real_version_strings() {
        let cases = [
            // A CockroachDB quick-start's `SELECT version();` (its text as quoted, cut short).
            (
                "CockroachDB CCL v24.3.5 (x86_64-pc-linux-gnu, built 2025/02/03 17:28:15, ...)",
                Engine::CockroachDB,
                "v24.3.5",
            ),
            // `cockroach sql`'s "Server version:" banners.
            (
                "CockroachDB CCL v21.1.1 (x86_64-apple-darwin19, built 2021/05/24 15:00:00, go1.15.11)",
                Engine::CockroachDB,
                "v21.1.1",
            ),
            (
                "CockroachDB CCL v20.1.15 (x86_64-unknown-linux-gnu, built 2021/04/26 16:11:58, go1.13.9)",
                Engine::CockroachDB,
                "v20.1.15",
            ),
            // This machine's test server.
            (
                "PostgreSQL 15.18 (Debian 15.18-0+deb12u1) on x86_64-pc-linux-gnu, compiled by gcc (Debian 12.2.0-14+deb12u1) 12.2.0, 64-bit",
                Engine::PostgreSQL,
                "15.18",
            ),
            ("PostgreSQL 17devel", Engine::PostgreSQL, "17devel"),
            // The Windows installer's build: the release ends at a comma (from mutation round
            // 4b: split at spaces alone, doctor said "PostgreSQL 16.1,").
            (
                "PostgreSQL 16.1, compiled by Visual C++ build 1937, 64-bit",
                Engine::PostgreSQL,
                "16.1",
            ),
        ];
        for (text, engine, release) in cases {
            let s = Server::parse(text);
            assert_eq!((s.engine, s.release.as_str()), (engine, release), "{text}");
            assert_eq!(s.version, text);
        }
        assert_eq!(
            Server::parse("CockroachDB CCL v24.3.5 (x86_64-pc-linux-gnu, …)").to_string(),
            "CockroachDB v24.3.5"
        );
    }

    #[test]
    fn only_cockroachdb_migrations_turn_autocommit_before_ddl_off() {
        let crdb = Server::parse("CockroachDB CCL v25.1.4 (x86_64-pc-linux-gnu, built 2025/04/09)");
        assert_eq!(
            crdb.migration_session_sql(),
            [
                "SET default_transaction_isolation = 'serializable'",
                "SET autocommit_before_ddl = false"
            ]
        );
        let pg = Server::parse("PostgreSQL 15.14 on x86_64-pc-linux-gnu");
        assert!(pg.migration_session_sql().is_empty());
    }

    #[test]
    fn an_unknown_setting_is_recognised_in_both_engines_words() {
        // PostgreSQL and CockroachDB (pgcode 42704) word it the same.
        assert!(is_unknown_setting(
            "unrecognized configuration parameter \"autocommit_before_ddl\""
        ));
        assert!(!is_unknown_setting("permission denied to set parameter"));
    }
}
