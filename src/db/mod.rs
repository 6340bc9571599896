//! Where the database is and how to reach it: `url` (parsing and redaction), `session`
//! (connecting, session settings, reconnecting), `.env`, and the embedded migrations.

pub mod engine;
mod session;
mod url;

pub use engine::{Engine, Server};
pub use session::Session;
pub use url::DbUrl;

use diesel::prelude::*;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::error::ConfigError;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

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
