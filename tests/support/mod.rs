//! Test support: a real PostgreSQL (never a mock), a scratch database per test, the `bank`
//! binary, and a fault-injecting proxy.

pub mod proxy;
pub mod threads;

use std::process::Output;
use std::thread;
use std::time::{Duration, Instant};

use assert_cmd::Command;
use bank::db::DbUrl;
use bank::models::{Account, NewAccount};
use bank::schema::{accounts, transfers};
use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use uuid::Uuid;

const HOW_TO_START: &str = "run the suite with `scripts/test` (it starts a throwaway PostgreSQL), \
or start one with `scripts/pg start` and `export TEST_DATABASE_URL=$(scripts/pg url)`";

/// The server the tests run on: `TEST_DATABASE_URL`. Without it the suite fails, loudly.
pub fn server_url() -> DbUrl {
    let raw = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| panic!("TEST_DATABASE_URL is not set: {HOW_TO_START}"));
    DbUrl::parse(&raw).unwrap_or_else(|e| panic!("TEST_DATABASE_URL: {e}"))
}

/// The password of the test server's URL: no output of `bank` may contain it.
pub fn password() -> String {
    server_url()
        .password()
        .expect("TEST_DATABASE_URL must carry a password, so tests can check that none is printed")
        .to_string()
}

/// One account, if it exists (reads the test needs; `bank` itself never reads one account).
pub fn get(conn: &mut PgConnection, id: Uuid) -> QueryResult<Option<Account>> {
    accounts::table
        .find(id)
        .select(Account::as_select())
        .first(conn)
        .optional()
}

pub fn count_accounts(conn: &mut PgConnection) -> QueryResult<i64> {
    accounts::table.count().get_result(conn)
}

pub fn count_transfers(conn: &mut PgConnection) -> QueryResult<i64> {
    transfers::table.count().get_result(conn)
}

/// Waits until the ledger holds more than `rows` rows: a run's own transfers are landing, so its
/// setup (connections, accounts, starting totals) is done. A fixed sleep in its place came
/// before that on a loaded machine, or after the run. Panics after 20 s.
pub fn wait_for_transfers_past(conn: &mut PgConnection, rows: i64) {
    let started = std::time::Instant::now();
    while transfers_so_far(conn) <= rows {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "no transfer landed within 20 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The ledger's rows, counted while a run writes: at SERIALIZABLE the count may itself be the
/// transaction aborted (40001), which is no answer yet, not a failure (it failed full suite
/// runs twice), so it is read again.
pub fn transfers_so_far(conn: &mut PgConnection) -> i64 {
    loop {
        match count_transfers(conn) {
            Err(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::SerializationFailure,
                _,
            )) => std::thread::sleep(std::time::Duration::from_millis(5)),
            n => return n.expect("count transfers"),
        }
    }
}

/// A database of its own for one test, dropped when the test ends.
pub struct ScratchDb {
    pub name: String,
    pub url: DbUrl,
    /// The server it is on: the test server, or a test's `OwnCluster`.
    server: DbUrl,
    /// Roles `role` made for it, dropped with it: they can log in (password `pw`) to every
    /// database of the server, the user's own included (found by a helper: ten left per run).
    roles: std::sync::Mutex<Vec<String>>,
}

/// The isolation level a scratch database gives its transactions by default (the test server's
/// own default is SERIALIZABLE, as on CockroachDB; READ COMMITTED is PostgreSQL's default, what
/// most servers run). Transaction mode asks for SERIALIZABLE itself; single-statement transfers,
/// ledger lookups and reads get this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Iso {
    ReadCommitted,
    Serializable,
}

impl Iso {
    pub const BOTH: [Iso; 2] = [Iso::ReadCommitted, Iso::Serializable];

    fn sql(self) -> &'static str {
        match self {
            Iso::ReadCommitted => "read committed",
            Iso::Serializable => "serializable",
        }
    }
}

impl ScratchDb {
    /// A new database with the schema migrated.
    pub fn migrated() -> ScratchDb {
        let db = ScratchDb::empty();
        let mut conn = db.conn();
        bank::db::run_migrations(&mut conn).expect("migrations run");
        db
    }

    /// A migrated database whose transactions default to `iso`.
    pub fn migrated_at(iso: Iso) -> ScratchDb {
        ScratchDb::migrated_on(server_url(), iso)
    }

    /// `migrated_at` on another server (an `OwnCluster`).
    pub fn migrated_on(server: DbUrl, iso: Iso) -> ScratchDb {
        let db = ScratchDb::empty_on(server);
        bank::db::run_migrations(&mut db.conn()).expect("migrations run");
        db.alter(&format!("default_transaction_isolation = '{}'", iso.sql()));
        db
    }

    /// `ALTER DATABASE <this> SET <setting>`: a server-side setting every new session gets.
    pub fn alter(&self, setting: &str) {
        let mut admin = self
            .server
            .with_database("postgres")
            .connect()
            .expect("connect as admin");
        admin
            .batch_execute(&format!("ALTER DATABASE {} SET {setting}", self.name))
            .expect("alter database");
    }

    /// A new database without any tables.
    pub fn empty() -> ScratchDb {
        ScratchDb::empty_on(server_url())
    }

    /// `empty` on another server (an `OwnCluster`).
    pub fn empty_on(server: DbUrl) -> ScratchDb {
        let name = format!("bank_test_{}", Uuid::new_v4().simple());
        let mut admin = server
            .with_database("postgres")
            .connect()
            .unwrap_or_else(|e| panic!("{e}: {HOW_TO_START}"));
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create scratch database");
        let url = server.with_database(&name);
        ScratchDb {
            name,
            url,
            server,
            roles: std::sync::Mutex::default(),
        }
    }

    pub fn conn(&self) -> PgConnection {
        self.url.connect().expect("connect to scratch database")
    }

    /// A connection inside a test transaction: nothing it does is ever committed.
    pub fn test_conn(&self) -> PgConnection {
        let mut conn = self.conn();
        conn.begin_test_transaction()
            .expect("begin test transaction");
        conn
    }

    /// A new role of this server (`CREATE ROLE … {options} PASSWORD 'pw'`, then `grants` with
    /// `{role}` standing for its name); returns its name and a URL to this database as it.
    pub fn role(&self, options: &str, grants: &str) -> (String, String) {
        let role = format!("teller_{}", Uuid::new_v4().simple());
        self.conn()
            .batch_execute(&format!(
                "CREATE ROLE {role} {options} PASSWORD 'pw'; {}",
                grants.replace("{role}", &role)
            ))
            .expect("create the role");
        self.roles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(role.clone());
        let mut url = url::Url::parse(self.url.expose()).expect("one-host URL");
        url.set_username(&role).expect("user");
        url.set_password(Some("pw")).expect("password");
        (role, url.to_string())
    }

    /// A role with these `options` (`LOGIN CONNECTION LIMIT 1`) and the privileges bank's
    /// commands need, as a DBA would provision a teller: (its name, a URL logging in as it).
    pub fn teller(&self, options: &str) -> (String, String) {
        self.role(
            options,
            "GRANT SELECT, INSERT, UPDATE, DELETE ON accounts, transfers, transfer_claims, \
             __diesel_schema_migrations TO {role}",
        )
    }

    /// A session of its own holding these accounts' rows (`FOR UPDATE`, in key order) until it
    /// rolls back or is dropped: another transaction in bank's way.
    pub fn hold(&self, ids: &[Uuid]) -> PgConnection {
        let mut holder = self.conn();
        holder.batch_execute("BEGIN").expect("begin");
        diesel::sql_query("SELECT id FROM accounts WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>(ids)
            .execute(&mut holder)
            .expect("hold the accounts");
        holder
    }

    /// A DBA's trigger that leaves `account` unchanged: `BEFORE UPDATE … RETURN NULL`.
    pub fn leave_unchanged(&self, account: Uuid) {
        self.conn()
            .batch_execute(&format!(
                "CREATE FUNCTION frozen() RETURNS trigger LANGUAGE plpgsql AS \
                 $$BEGIN IF OLD.id = '{account}' THEN RETURN NULL; END IF; RETURN NEW; END$$; \
                 CREATE TRIGGER frozen BEFORE UPDATE ON accounts FOR EACH ROW \
                 EXECUTE FUNCTION frozen()"
            ))
            .expect("trigger");
    }

    /// Creates committed accounts with these balances; returns their ids.
    pub fn accounts(&self, balances: &[i64]) -> Vec<Uuid> {
        let new: Vec<NewAccount> = balances
            .iter()
            .map(|b| NewAccount::with_balance(*b))
            .collect();
        bank::repo::create_many(&mut self.conn(), &new).expect("create accounts");
        new.iter().map(|a| a.id).collect()
    }

    /// Every (id, balance), ordered by id, and the number of ledger rows: "the database state".
    pub fn state(&self) -> (Vec<(Uuid, i64)>, i64) {
        let mut conn = self.conn();
        let accounts = bank::repo::list(&mut conn)
            .expect("list")
            .map(|a| a.map(|a| (a.id, a.balance)))
            .collect::<Result<Vec<_>, _>>()
            .expect("rows");
        let transfers = count_transfers(&mut conn).expect("count");
        (accounts, transfers)
    }

    pub fn balance(&self, id: Uuid) -> i64 {
        get(&mut self.conn(), id)
            .expect("get")
            .expect("account exists")
            .balance
    }

    /// `bank transfer --from --to --amount` here; add arguments before `run()`.
    pub fn transfer(&self, from: Uuid, to: Uuid, amount: i64) -> Bank {
        self.bank().args([
            "transfer".to_string(),
            "--from".into(),
            from.to_string(),
            "--to".into(),
            to.to_string(),
            "--amount".into(),
            amount.to_string(),
        ])
    }

    /// `spawn_bank` with `--database-url` pointing here, then `args`.
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        let url = self.url.expose().to_string();
        let mut all = vec!["--database-url", &url];
        all.extend_from_slice(args);
        spawn_bank(&all)
    }

    /// `bank` with `--database-url` pointing here, run from an empty directory (no `.env`).
    pub fn bank(&self) -> Bank {
        let mut b = Bank::new();
        b.cmd.arg("--database-url").arg(self.url.expose());
        b
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = self.server.with_database("postgres").connect() {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
            // Its grants went with the database; what it was granted elsewhere (a membership)
            // goes with the role.
            let roles = self.roles.lock().unwrap_or_else(|e| e.into_inner());
            for role in roles.iter() {
                let _ = admin.batch_execute(&format!("DROP ROLE IF EXISTS {role}"));
            }
        }
    }
}

/// The `bank` binary in an empty working directory, with no `DATABASE_URL` inherited.
pub struct Bank {
    pub cmd: Command,
    pub dir: tempfile::TempDir,
}

impl Bank {
    pub fn new() -> Bank {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cmd = Command::cargo_bin("bank").expect("bank binary");
        cmd.current_dir(dir.path())
            .env_remove("DATABASE_URL")
            .env_remove("BANK_MAX_RETRIES")
            .env_remove("BANK_RETRY_BASE")
            .env_remove("BANK_RETRY_CAP")
            .env_remove("BANK_TIMEOUT")
            .env_remove("BANK_SEED_METHOD")
            .env("NO_COLOR", "1");
        Bank { cmd, dir }
    }

    pub fn args<I, S>(mut self, args: I) -> Bank
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.cmd.args(args);
        self
    }

    /// Runs it with stdin closed (not a terminal).
    pub fn run(mut self) -> Run {
        let output = self.cmd.write_stdin("").output().expect("run bank");
        Run::from(output)
    }
}

/// What a run of `bank` printed and how it exited.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    #[track_caller]
    pub fn success(&self) -> &Run {
        assert_eq!(self.code, 0, "bank failed: {self:?}");
        self
    }

    /// A failure: exit `code`, exactly one line on stderr containing `needle`, nothing on
    /// stdout, and no password anywhere.
    #[track_caller]
    pub fn fails_with(&self, code: i32, needle: &str) -> &Run {
        self.one_error_line(code, needle);
        assert_eq!(self.stdout, "", "stdout: {self:?}");
        self.no_password()
    }

    /// Exit `code` and exactly one line on stderr, containing `needle`.
    #[track_caller]
    fn one_error_line(&self, code: i32, needle: &str) {
        assert_eq!(self.code, code, "exit code: {self:?}");
        assert_eq!(
            self.stderr.lines().count(),
            1,
            "one line on stderr: {self:?}"
        );
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}: {self:?}"
        );
    }

    /// A failed `transfer --json`: exit `code`, one line on stderr containing `needle`, and on
    /// stdout `{"id", "outcome": outcome, "error"}` with the same message.
    #[track_caller]
    pub fn fails_json(&self, code: i32, outcome: &str, needle: &str) -> &Run {
        self.one_error_line(code, needle);
        let j = self.json();
        assert_eq!(j["outcome"], outcome, "{self:?}");
        assert!(j["id"].is_string(), "{self:?}");
        // The word a file's line would get (README, "Outcomes"): "unknown" exactly when the
        // outcome is.
        let reasons = [
            "insufficient_funds",
            "unknown_account",
            "id_conflict",
            "balance_overflow",
            "refused",
            "not_applied",
        ];
        match outcome {
            "unknown" => assert_eq!(j["reason"], "unknown", "{self:?}"),
            _ => assert!(
                j["reason"].as_str().is_some_and(|r| reasons.contains(&r)),
                "{self:?}"
            ),
        }
        let error = j["error"].as_str().expect("error is a string");
        assert!(error.contains(needle), "{self:?}");
        self.no_password()
    }

    #[track_caller]
    pub fn no_password(&self) -> &Run {
        let pw = password();
        assert!(!self.stdout.contains(&pw), "password on stdout: {self:?}");
        assert!(!self.stderr.contains(&pw), "password on stderr: {self:?}");
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.stdout))
    }
}

/// `bank` with these arguments, started in the background: stdin closed, stdout and stderr
/// piped (`Run::from(child.wait_with_output()…)` reads them).
pub fn spawn_bank(args: &[&str]) -> std::process::Child {
    std::process::Command::new(assert_cmd::cargo::cargo_bin("bank"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn bank")
}

/// `bank transfer` of (from, to, amount) on `url`, started and left running; `extra` holds its
/// other flags (`--id`, `--mode`, deadlines).
pub fn spawn_transfer(
    url: &str,
    (from, to, amount): (Uuid, Uuid, i64),
    extra: &[&str],
) -> std::process::Child {
    let (from, to, amount) = (from.to_string(), to.to_string(), amount.to_string());
    let mut args = vec![
        "--database-url",
        url,
        "transfer",
        "--from",
        &from,
        "--to",
        &to,
        "--amount",
        &amount,
    ];
    args.extend_from_slice(extra);
    spawn_bank(&args)
}

/// Sends SIGINT to `pid` through the shell's own `kill` (a minimal Debian has no `kill` binary:
/// procps is not installed; every POSIX shell has the builtin).
pub fn interrupt(pid: u32) {
    signal(pid, "INT")
}

/// Sends the signal named `name` (`INT`, `TERM`, `HUP`) to `pid`.
pub fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("sh")
        .args(["-c", "kill -$2 \"$1\"", "sh", &pid.to_string(), name])
        .status()
        .expect("run sh");
    assert!(status.success(), "kill -{name} {pid}: {status}");
    if name == "STOP" {
        wait_until_stopped(pid);
    }
}

/// Waits until every thread of process `pid` is stopped (`T` in `/proc/PID/task/*/stat`), or the
/// process is gone. `kill -STOP` returns before the target has stopped: each of its threads stops
/// as it next leaves the kernel, which on a loaded machine can come after the test has gone on,
/// so a client "stopped" before a lock was released could still take its answer and send its
/// next statement (seen once in a full run, beside another suite:
/// `faults::a_session_ended_by_a_dba_before_the_statement_or_commit_is_sent_is_not_applied`
/// applied in 1 attempt with no connection lost, where the session was to be ended first).
fn wait_until_stopped(pid: u32) {
    let stopped = |stat: &str| {
        // "PID (COMM) STATE …": COMM may hold spaces and parentheses.
        stat.rfind(')')
            .and_then(|end| stat[end + 1..].trim_start().chars().next())
            .is_some_and(|state| matches!(state, 'T' | 't'))
    };
    let started = Instant::now();
    loop {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return;
        };
        let all = tasks.flatten().all(|task| {
            std::fs::read_to_string(task.path().join("stat")).map_or(true, |s| stopped(&s))
        });
        if all {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "process {pid} did not stop within 10 s of SIGSTOP"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Linux's number of the system call `read` (`write` is the next one up).
#[cfg(target_arch = "x86_64")]
const SYS_READ: u32 = 0;
#[cfg(target_arch = "aarch64")]
const SYS_READ: u32 = 63;

/// What a process can be seen blocked in: a read of standard input, a write to standard output.
#[derive(Debug, Clone, Copy)]
pub enum Blocked {
    ReadingStdin,
    WritingStdout,
}

/// Waits until a thread of process `pid` is blocked in `what` (`/proc/PID/task/*/syscall`):
/// past its start, its signal handlers installed. A fixed sleep in its place came before that
/// on a loaded machine, and the signal the test sent next killed the process or met it
/// elsewhere. Panics after 20 s.
pub fn wait_until_blocked(pid: u32, what: Blocked) {
    let (call, fd) = match what {
        Blocked::ReadingStdin => (SYS_READ, 0),
        Blocked::WritingStdout => (SYS_READ + 1, 1),
    };
    let wanted = format!("{call} {fd:#x} ");
    let started = Instant::now();
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap_or_else(|e| panic!("process {pid} is gone ({e})"));
        let blocked = tasks.flatten().any(|task| {
            std::fs::read_to_string(task.path().join("syscall"))
                .is_ok_and(|s| s.starts_with(&wanted))
        });
        if blocked {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "process {pid} never blocked {what:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

#[derive(QueryableByName)]
pub struct Count {
    #[diesel(sql_type = BigInt)]
    pub n: i64,
}

/// Waits until a `bank` session of this database waits on a lock.
/// Ends, from `conn`, the backends of `bank` sessions of its database that wait on a lock (as
/// a DBA's `pg_terminate_backend` does).
pub fn end_bank_sessions_waiting_on_a_lock(conn: &mut PgConnection) {
    conn.batch_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name LIKE 'bank%' \
         AND wait_event_type = 'Lock'",
    )
    .expect("end the waiting backends");
}

pub fn wait_for_lock_wait(db: &ScratchDb) {
    wait_for_lock_waits(db, 1)
}

/// Waits until `sessions` `bank` sessions of this database wait on a lock.
pub fn wait_for_lock_waits(db: &ScratchDb, sessions: i64) {
    let mut conn = db.conn();
    let started = Instant::now();
    loop {
        let c: Count = diesel::sql_query(
            "SELECT CAST(COUNT(*) AS INT8) AS n FROM pg_stat_activity \
             WHERE datname = $1 AND application_name LIKE 'bank%' AND wait_event_type = 'Lock'",
        )
        .bind::<Text, _>(&db.name)
        .get_result(&mut conn)
        .expect("pg_stat_activity");
        if c.n >= sessions {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} of {sessions} bank sessions waited on a lock",
            c.n
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A deferred trigger of the test's own on the ledger: the next COMMIT that writes ledger rows
/// (a transaction's, or a single statement's own) takes the row of `slow_commit` and sleeps a
/// second before it commits (`stop_slowing_commits` drops it). Without JIT: bank's sessions
/// disable sequential scans, and the planner's cost for the one left here (the table has no
/// index) then had each row's check compiled, about 7 ms a row, so that a 20-line COMMIT took
/// longer than a test's deadline before it even reached the sleep.
pub fn slow_down_the_next_commit(conn: &mut PgConnection) {
    slow_down_the_next_commit_by(conn, 1)
}

/// `slow_down_the_next_commit`, asleep for `seconds`.
pub fn slow_down_the_next_commit_by(conn: &mut PgConnection, seconds: u32) {
    slow_down_a_commit_after(conn, 0, seconds)
}

/// `slow_down_the_next_commit`, armed before a run starts for the first transaction that
/// writes ledger rows after `skip` others did: a test that arms it once a run is under way can
/// miss the run's last COMMIT on a slow machine. Transactions are counted by their ids, one at
/// a time (for runs on one connection: concurrent ones would wait on `slow_commit`'s row).
/// Asleep for `seconds`: a server's `statement_timeout` does not cut a COMMIT short.
pub fn slow_down_a_commit_after(conn: &mut PgConnection, skip: u32, seconds: u32) {
    conn.batch_execute(&format!(
        "CREATE TABLE slow_commit (skip INT, last_tx BIGINT); \
         INSERT INTO slow_commit VALUES ({skip}, NULL); \
         CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql SET jit = off AS $$ BEGIN \
           IF EXISTS (SELECT 1 FROM slow_commit WHERE last_tx = txid_current()) THEN \
             NULL; \
           ELSIF EXISTS (SELECT 1 FROM slow_commit WHERE skip > 0) THEN \
             UPDATE slow_commit SET skip = skip - 1, last_tx = txid_current(); \
           ELSIF EXISTS (SELECT 1 FROM slow_commit) THEN \
             DELETE FROM slow_commit; PERFORM pg_sleep({seconds}); \
           END IF; RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON transfers \
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()"
    ))
    .expect("slow commit trigger");
}

/// Drops `slow_down_the_next_commit`'s trigger: it runs its check at every COMMIT that writes
/// ledger rows, and after a crash its sleep, rolled back, is armed again.
pub fn stop_slowing_commits(db: &ScratchDb) {
    db.conn()
        .batch_execute("DROP TRIGGER slow_commit ON transfers")
        .expect("drop the slow-commit trigger");
}

/// Waits until `condition` (SQL, a boolean) holds on `conn`, polling every few milliseconds;
/// panics with `what` after 10 s. What a test waits for instead of a fixed sleep.
pub fn wait_until(conn: &mut PgConnection, condition: &str, what: &str) {
    wait_until_unless(conn, condition, what, Duration::from_secs(10), || false);
}

/// `wait_until` for up to `limit`, unless `gone` says first that it will never hold (false
/// then).
fn wait_until_unless(
    conn: &mut PgConnection,
    condition: &str,
    what: &str,
    limit: Duration,
    mut gone: impl FnMut() -> bool,
) -> bool {
    let started = Instant::now();
    loop {
        let holds: bool = diesel::select(diesel::dsl::sql::<diesel::sql_types::Bool>(condition))
            .get_result(conn)
            .expect("the condition");
        if holds {
            return true;
        }
        if gone() {
            return false;
        }
        assert!(started.elapsed() < limit, "{what}");
        thread::sleep(Duration::from_millis(2));
    }
}

/// A `bank` session of this database (not the caller's) asleep in a COMMIT that
/// `slow_down_the_next_commit` slowed down.
const A_COMMIT_ASLEEP: &str = "EXISTS (SELECT 1 FROM pg_stat_activity \
    WHERE datname = current_database() AND application_name = 'bank' \
    AND pid <> pg_backend_pid() AND wait_event = 'PgSleep')";

/// Waits until a `bank` session of this database (not the caller's) is asleep in the COMMIT
/// that `slow_down_the_next_commit` slowed down: its outcome is then unsettled.
pub fn wait_for_a_commit_asleep(conn: &mut PgConnection) {
    wait_until(conn, A_COMMIT_ASLEEP, "no COMMIT fell asleep");
}

/// `wait_for_a_commit_asleep`, unless `child` exits first (false then): a run that a slow
/// machine took past its deadline before its COMMIT.
pub fn wait_for_a_commit_asleep_or_exit(
    conn: &mut PgConnection,
    child: &mut std::process::Child,
) -> bool {
    wait_until_unless(
        conn,
        A_COMMIT_ASLEEP,
        "no COMMIT fell asleep",
        Duration::from_secs(20),
        || child.try_wait().expect("the run's status").is_some(),
    )
}

/// A PostgreSQL cluster of one test's own (`scripts/pg` on a free port, in a directory of its
/// own), for faults that would stop every other test on the shared server: `freeze` sends
/// SIGSTOP to the postmaster and every server process, as a VM pause or `kill -STOP` does.
/// Stopped and deleted when dropped.
pub struct OwnCluster {
    port: u16,
    dir: String,
}

impl OwnCluster {
    /// On a port the system says is free; one taken between that answer and the server's bind
    /// (another test's cluster or proxy, an outgoing connection) fails the start, which is then
    /// made again on another.
    pub fn start() -> OwnCluster {
        OwnCluster::on_a_free_port("scripts/pg start", |cluster| {
            let out = cluster
                .command(&["start"])
                .output()
                .expect("run scripts/pg");
            match out.status.success() {
                true => Ok(()),
                false => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
            }
        })
    }

    /// A cluster of a directory of its own on a port the system says is free, made by `make`
    /// (an `Err` says why not); tried again on another port up to 5 times, since the port may
    /// be taken between that answer and the server's bind.
    fn on_a_free_port(
        what: &str,
        mut make: impl FnMut(&OwnCluster) -> Result<(), String>,
    ) -> OwnCluster {
        let mut failures = Vec::new();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let cluster = OwnCluster {
                port,
                dir: format!("/tmp/bank-pg-test-{}", Uuid::new_v4().simple()),
            };
            match make(&cluster) {
                Ok(()) => return cluster,
                Err(why) => failures.push(format!("port {port}: {why}")),
            }
        }
        panic!("{what} failed 5 times: {failures:#?}");
    }

    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command =
            std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg"));
        command
            .args(args)
            .env("BANK_PG_PORT", self.port.to_string())
            .env("BANK_PG_DIR", &self.dir);
        command
    }

    /// `scripts/pg ARGS` for this cluster; its output.
    fn pg(&self, args: &[&str]) -> String {
        let out = self.command(args).output().expect("run scripts/pg");
        assert!(
            out.status.success(),
            "scripts/pg {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The URL of its `postgres` database, to make scratch databases on.
    pub fn server(&self) -> DbUrl {
        DbUrl::parse(&self.pg(&["url", "postgres"])).expect("scripts/pg url")
    }

    pub fn freeze(&self) {
        self.pg(&["freeze"]);
    }

    pub fn thaw(&self) {
        self.pg(&["thaw"]);
    }

    /// Kills the server as a crash does (`pg_ctl stop -m immediate`: no checkpoint, every
    /// backend gone at once), then starts it again; it recovers from its WAL.
    pub fn crash(&self) {
        self.pg(&["restart"]);
    }
}

impl OwnCluster {
    /// A hot standby of this cluster (see `Standby`).
    pub fn standby(&self) -> Standby {
        Standby(OwnCluster::on_a_free_port("a standby", |me| {
            Standby::make(me, self)
        }))
    }

    /// Caps the size of every file the server's processes started from now on write (its new
    /// sessions: `prlimit --fsize` on the postmaster, whose children inherit it; PostgreSQL
    /// ignores SIGXFSZ, so a write past it fails with EFBIG): a full disk for the tables
    /// bigger than `bytes`, without one. At least a WAL segment (16 MiB), which a session
    /// writes into. Needs no root: the postmaster is the test's user's (or root's `postgres`).
    pub fn limit_file_size(&self, bytes: u64) {
        let pid = std::fs::read_to_string(format!("{}/data/postmaster.pid", self.dir))
            .expect("postmaster.pid");
        let pid = pid.lines().next().expect("the postmaster's pid");
        let fsize = format!("--fsize={bytes}");
        // As the postmaster's user: root's `postgres` (scripts/pg) may not be changed by root
        // without CAP_SYS_RESOURCE, which a container may lack.
        let uid = |path: &str| {
            std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(path).expect("a process"))
        };
        let mut prlimit = match uid("/proc/self") == uid(&format!("/proc/{pid}")) {
            true => std::process::Command::new("prlimit"),
            false => {
                let mut runuser = std::process::Command::new("runuser");
                runuser.args(["-u", "postgres", "--", "prlimit"]);
                runuser
            }
        };
        let out = prlimit
            .args(["--pid", pid, &fsize])
            .output()
            .expect("run prlimit (util-linux)");
        assert!(
            out.status.success(),
            "prlimit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The primary's WAL position now, for `Standby::catch_up`.
    fn wal_lsn(&self) -> String {
        self.pg(&[
            "psql",
            "-d",
            "postgres",
            "-tAc",
            "SELECT pg_current_wal_lsn()",
        ])
    }
}

/// A hot standby of an `OwnCluster`, as an operator runs one to spare the primary its reads:
/// `pg_basebackup -R` of the primary (the test cluster's pg_hba, initdb's, lets its superuser
/// replicate over loopback), then `scripts/pg start` on its own port and directory, which waits
/// until it accepts connections. Its default isolation is READ COMMITTED: the primary's,
/// SERIALIZABLE, is refused by a standby for every transaction (as in any replica of a server
/// that defaults to it; then nothing works there). Stopped and deleted when dropped.
pub struct Standby(OwnCluster);

impl Standby {
    /// `me` made a standby of `primary` (`me` is stopped and removed when dropped, made or not).
    fn make(me: &OwnCluster, primary: &OwnCluster) -> Result<(), String> {
        std::fs::create_dir_all(&me.dir).map_err(|e| e.to_string())?;
        let data = format!("{}/data", me.dir);
        let source = primary.server();
        let out = me
            .command(&[
                "exec",
                "pg_basebackup",
                "-R",
                "-c",
                "fast",
                "-D",
                &data,
                "-d",
                source.expose(),
            ])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "pg_basebackup: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        // Later lines win over the primary's own.
        let conf = format!(
            "port = {}\nunix_socket_directories = '{}'\n\
             default_transaction_isolation = 'read committed'\n",
            me.port, me.dir
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(format!("{data}/postgresql.conf"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, conf.as_bytes()))
            .map_err(|e| e.to_string())?;
        // As root the server runs as `postgres` (scripts/pg), which must own its files.
        if std::os::unix::fs::MetadataExt::uid(
            &std::fs::metadata(&me.dir).map_err(|e| e.to_string())?,
        ) == 0
        {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres:", &me.dir])
                .status()
                .map_err(|e| e.to_string())?;
            if !status.success() {
                return Err("chown".into());
            }
        }
        let out = me.command(&["start"]).output().map_err(|e| e.to_string())?;
        match out.status.success() {
            true => Ok(()),
            false => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        }
    }

    /// The URL of its `postgres` database (`with_database` for another).
    pub fn server(&self) -> DbUrl {
        self.0.server()
    }

    /// Waits until it has replayed everything the primary has written so far (20 s at most).
    pub fn catch_up(&self, primary: &OwnCluster) {
        let lsn = primary.wal_lsn();
        let started = Instant::now();
        loop {
            let replayed = self.0.pg(&[
                "psql",
                "-d",
                "postgres",
                "-tAc",
                &format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'"),
            ]);
            if replayed == "t" {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the standby did not replay up to {lsn} within 20 s"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl OwnCluster {
    /// TLS on, as CockroachDB's secure clusters and cloud PostgreSQL run: the self-signed
    /// certificate of `tests/fixtures/tls` (localhost and 127.0.0.1, valid to 2126), its key
    /// owned by the server's user with no access for others (the server refuses it otherwise).
    /// Returns once a new session with `sslmode=require` is served.
    pub fn enable_tls(&self) {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let data = std::fs::metadata(format!("{}/data", self.dir)).expect("the data directory");
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls");
        for name in ["server.crt", "server.key"] {
            let to = format!("{}/{name}", self.dir);
            std::fs::copy(format!("{fixtures}/{name}"), &to).expect("copy the certificate");
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
                .expect("chmod 600");
            std::os::unix::fs::chown(&to, Some(data.uid()), Some(data.gid()))
                .expect("chown to the server's user");
        }
        let mut conn = self.server().connect().expect("connect");
        for (name, value) in [
            ("ssl_cert_file", format!("{}/server.crt", self.dir)),
            ("ssl_key_file", format!("{}/server.key", self.dir)),
            ("ssl", "on".to_string()),
        ] {
            conn.batch_execute(&format!("ALTER SYSTEM SET {name} = '{value}'"))
                .expect("ALTER SYSTEM");
        }
        conn.batch_execute("SELECT pg_reload_conf()")
            .expect("reload");
        let tls =
            DbUrl::parse(&format!("{}?sslmode=require", self.server().expose())).expect("url");
        let started = Instant::now();
        while let Err(e) = tls.connect() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no TLS within 20 s: {e}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `synchronous_standby_names` on the scratch database's server (server-wide: a cluster of the
/// test's own); reset when dropped, even when an assertion fails, before the database is
/// dropped (its DROP would wait for the standby too).
pub struct SyncNames<'a>(pub &'a ScratchDb);

impl SyncNames<'_> {
    /// Sets it and waits until new sessions see it and, with `walreceiver`, until the standby
    /// `pg_basebackup -R` made (it connects as `walreceiver`) is in that state (`sync` when the
    /// setting names it, else `async`).
    pub fn set(db: &ScratchDb, names: &str, walreceiver: Option<&str>) {
        let mut conn = db.conn();
        // Two statements: ALTER SYSTEM runs in no transaction block, an implicit one included.
        conn.batch_execute(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = '{}'",
            names.replace('\'', "''")
        ))
        .expect("set synchronous_standby_names");
        conn.batch_execute("SELECT pg_reload_conf()")
            .expect("reload");
        let started = Instant::now();
        while !SyncNames::in_force(&mut db.conn(), names, walreceiver).expect("read the setting") {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "synchronous_standby_names = {names:?} not in force within 20 s"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether a session started now sees `names` (a reload reaches the postmaster and the
    /// walsender a moment later), and the standby is in its state.
    fn in_force(
        conn: &mut PgConnection,
        names: &str,
        walreceiver: Option<&str>,
    ) -> QueryResult<bool> {
        #[derive(QueryableByName)]
        struct Seen {
            #[diesel(sql_type = diesel::sql_types::Bool)]
            ok: bool,
        }
        let seen: Vec<Seen> = diesel::sql_query(
            "SELECT current_setting('synchronous_standby_names') = $1 \
             AND ($2 IS NULL OR EXISTS (SELECT FROM pg_stat_replication \
               WHERE application_name = 'walreceiver' AND sync_state = $2)) AS ok",
        )
        .bind::<Text, _>(names)
        .bind::<diesel::sql_types::Nullable<Text>, _>(walreceiver)
        .load(conn)?;
        Ok(seen.first().is_some_and(|s| s.ok))
    }
}

impl Drop for SyncNames<'_> {
    fn drop(&mut self) {
        let Ok(mut conn) = self.0.url.connect() else {
            return;
        };
        let _ = conn.batch_execute("ALTER SYSTEM RESET synchronous_standby_names");
        let _ = conn.batch_execute("SELECT pg_reload_conf()");
        // Until new sessions see it: one started before the reload reached the postmaster
        // would wait for the standby too.
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            let Ok(mut fresh) = self.0.url.connect() else {
                return;
            };
            // Never a panic here: a test's own failure may be unwinding.
            if SyncNames::in_force(&mut fresh, "", None).unwrap_or(true) {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        // A failed test may leave it frozen, and a frozen server does not stop.
        let _ = self.command(&["thaw"]).output();
        let _ = self.command(&["stop"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The versions of the migrations in `migrations/`, in order (`2026-11-24-000001_…` is
/// `20261124000001`), as `bank init` reports them.
pub fn migration_versions() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut versions: Vec<String> = std::fs::read_dir(&dir)
        .expect("the migrations directory")
        .map(|e| {
            let name = e.expect("a migration").file_name();
            let name = name.to_string_lossy();
            let (date, _) = name.split_once('_').expect("a migration's name");
            date.replace('-', "")
        })
        .collect();
    versions.sort();
    versions
}

/// What `bank init` prints on a database that has none of them.
pub fn all_migrations_applied() -> String {
    migration_versions()
        .iter()
        .map(|v| format!("applied migration {v}\n"))
        .collect()
}

/// Makes the next INSERT into `db`'s accounts fail once with a serialization failure (40001),
/// rolled back as a real one is: a trigger counting with a sequence, which no rollback undoes.
pub fn fail_the_first_insert_into_accounts(db: &ScratchDb) {
    db.conn()
        .batch_execute(
            "CREATE SEQUENCE fail_once; \
             CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               IF nextval('fail_once') = 1 THEN \
                 RAISE EXCEPTION 'could not serialize access due to concurrent update' \
                   USING ERRCODE = 'serialization_failure'; \
               END IF; RETURN NULL; END $$; \
             CREATE TRIGGER fail_once AFTER INSERT ON accounts \
               FOR EACH STATEMENT EXECUTE FUNCTION fail_once()",
        )
        .expect("the trigger");
}

/// `bank transfer --file PATH --json` with extra arguments; the file is written to the run's
/// own directory.
pub fn run_file(url: &str, name: &str, text: &(impl AsRef<[u8]> + ?Sized), extra: &[&str]) -> Run {
    let bank = Bank::new();
    let path = bank.dir.path().join(name);
    std::fs::write(&path, text).expect("write file");
    bank.args(["--database-url", url, "transfer", "--file"])
        .args([
            path.to_str().expect("utf-8 path"),
            "--json",
            "--retry-base",
            "1ms",
        ])
        .args(extra)
        .run()
}

/// Each line's `outcome` in a `--json` run's output.
pub fn json_outcomes(run: &Run) -> Vec<String> {
    run.stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .map(|j| j["outcome"].as_str().unwrap_or_default().to_string())
        .collect()
}
