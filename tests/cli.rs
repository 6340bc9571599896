//! The `bank` binary end to end, on a scratch database per test: exact output, exit codes, and
//! the database state after every bad input.

use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::support::{password, server_url, Bank, ScratchDb};

fn ids_of(json: &serde_json::Value) -> Vec<Uuid> {
    json.as_array()
        .expect("array")
        .iter()
        .map(|a| a["id"].as_str().expect("id").parse().expect("uuid"))
        .collect()
}

/// `Balances at <RFC 3339 time>:` and the rest of the lines.
fn split_balances(stdout: &str) -> (String, Vec<String>) {
    let mut lines = stdout.lines();
    let header = lines.next().expect("header").to_string();
    (header, lines.map(str::to_string).collect())
}

#[test]
fn init_creates_the_schema_once() {
    let db = ScratchDb::empty();
    let first = db.bank().args(["init"]).run();
    first.success();
    assert_eq!(first.stdout, crate::support::all_migrations_applied());
    let again = db.bank().args(["init"]).run();
    again.success();
    assert_eq!(again.stdout, "schema is up to date\n");
}

#[test]
fn the_tutorial_flow_seed_transfer_balances() {
    let db = ScratchDb::migrated();
    let seeded = db.bank().args(["seed", "--json"]).run();
    seeded.success();
    let json = seeded.json();
    let balances: Vec<i64> = json
        .as_array()
        .expect("array")
        .iter()
        .map(|a| a["balance"].as_i64().expect("n"))
        .collect();
    assert_eq!(balances, [1000, 250]);
    let ids = ids_of(&json);
    let (a, b) = (ids[0], ids[1]);

    let id = Uuid::new_v4();
    let t = db
        .transfer(a, b, 100)
        .args(["--id", &id.to_string(), "--json"])
        .run();
    t.success();
    let j = t.json();
    assert_eq!(j["id"], id.to_string());
    assert_eq!(j["from"], a.to_string());
    assert_eq!(j["to"], b.to_string());
    assert_eq!(j["amount"], 100);
    assert_eq!(j["attempts"], 1);

    let listed = db.bank().args(["balances"]).run();
    listed.success();
    let (header, rows) = split_balances(&listed.stdout);
    assert!(
        header.starts_with("Balances at 20") && header.ends_with("Z:"),
        "{header}"
    );
    let mut expected = [(a, 900), (b, 350)];
    expected.sort();
    let expected: Vec<String> = expected
        .iter()
        .map(|(id, bal)| format!("account id: {id}  balance: ${bal}"))
        .collect();
    assert_eq!(rows, expected);

    let json = db.bank().args(["balances", "--json"]).run();
    json.success();
    let mut want = [(a, 900), (b, 350)];
    want.sort();
    let want: Vec<serde_json::Value> = want
        .iter()
        .map(|(id, bal)| serde_json::json!({"id": id.to_string(), "balance": bal}))
        .collect();
    assert_eq!(json.json(), serde_json::Value::Array(want));
}

/// `--as-of` a time without its zone (`2026-11-24T10:00:00`, as `date` or a spreadsheet writes
/// local times) or a date alone was refused as "premature end of input", chrono's words, which
/// do not say what is missing (a helper playing a new user). Refused before any connection.
#[test]
fn an_as_of_time_without_its_zone_is_refused_saying_what_is_missing() {
    for time in [
        "2026-11-24T10:00:00",
        "2026-11-24 10:00:00.5",
        "2026-11-24t10:00:00",
    ] {
        let run = Bank::new()
            .args(["--database-url", "postgres://u@127.0.0.1:1/none"])
            .args(["balances", "--as-of", time])
            .run();
        run.fails_with(
            2,
            "has no time zone: add Z for UTC or an offset such as +01:00",
        );
        assert!(!run.stderr.contains("premature"), "{}", run.stderr);
    }
    let run = Bank::new()
        .args(["--database-url", "postgres://u@127.0.0.1:1/none"])
        .args(["balances", "--as-of", "2026-11-24"])
        .run();
    run.fails_with(
        2,
        "is a date alone: add a time and a zone, as in 2026-11-24T00:00:00Z",
    );
}

#[test]
fn an_empty_bank_lists_no_accounts() {
    let db = ScratchDb::migrated();
    assert_eq!(
        db.bank()
            .args(["balances", "--json"])
            .run()
            .success()
            .stdout,
        "[]\n"
    );
    let text = db.bank().args(["balances"]).run();
    text.success();
    assert_eq!(text.stdout.lines().count(), 1, "{text:?}");
}

#[test]
fn transfer_text_output_names_the_id_and_attempts() {
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[50, 0]);
    let id = Uuid::new_v4();
    let run = db
        .transfer(ids[0], ids[1], 50)
        .args(["--id", &id.to_string()])
        .run();
    run.success();
    assert_eq!(
        run.stdout,
        format!(
            "transfer {id}: moved 50 from {} to {} (1 attempt)\n",
            ids[0], ids[1]
        )
    );
    assert_eq!(run.stderr, "");
    assert_eq!(db.balance(ids[0]), 0);
    assert_eq!(db.balance(ids[1]), 50);
}

#[test]
fn seed_creates_n_accounts_with_a_balance() {
    let db = ScratchDb::migrated();
    let run = db
        .bank()
        .args(["seed", "--accounts", "25", "--balance", "7", "--json"])
        .run();
    run.success();
    let ids = ids_of(&run.json());
    assert_eq!(ids.len(), 25);
    let (accounts, transfers) = db.state();
    assert_eq!(accounts.len(), 25);
    assert!(accounts.iter().all(|a| a.1 == 7));
    assert_eq!(transfers, 0);
    let text = db.bank().args(["seed", "--accounts", "3"]).run();
    text.success();
    assert_eq!(text.stdout.lines().count(), 3);
    assert!(text
        .stdout
        .lines()
        .all(|l| l.starts_with("account id: ") && l.ends_with("balance: $1000")));
}

#[test]
fn demo_runs_the_tutorial_and_removes_exactly_what_it_created() {
    let db = ScratchDb::migrated();
    let bystander = db.accounts(&[42]);
    let before = db.state();
    let run = db.bank().args(["demo"]).run();
    run.success();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 9, "{}", run.stdout);
    assert!(lines[0].starts_with("Created accounts "));
    assert!(lines[1].starts_with("Balances at "));
    let mut first: Vec<&str> = lines[2..4]
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap_or(""))
        .collect();
    first.sort();
    assert_eq!(first, ["$1000", "$250"]);
    assert!(lines[4].starts_with("transfer ") && lines[4].contains(": moved 100 from "));
    assert!(lines[5].starts_with("Balances at "));
    let mut second: Vec<&str> = lines[6..8]
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap_or(""))
        .collect();
    second.sort();
    assert_eq!(second, ["$350", "$900"]);
    assert_eq!(lines[8], "Removed the demo's 2 accounts and 1 transfer");
    assert_eq!(db.state(), before);
    assert_eq!(db.balance(bystander[0]), 42);
}

#[test]
fn reset_with_yes_deletes_everything() {
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[10, 10]);
    db.transfer(ids[0], ids[1], 1).run().success();
    let run = db.bank().args(["reset", "--yes"]).run();
    run.success();
    assert_eq!(run.stdout, "deleted 2 accounts and 1 transfer\n");
    assert_eq!(db.state(), (vec![], 0));
}

#[test]
fn reset_counts_the_claims_it_deletes() {
    // A refused `--id` transfer claims its id (so that a late attempt of it cannot apply): a
    // row in transfer_claims, which reset deleted without saying so (a reviewer).
    use diesel::connection::SimpleConnection;
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[10, 10]);
    let id = Uuid::new_v4().to_string();
    let refused = db.transfer(ids[0], ids[1], 11).args(["--id", &id]).run();
    assert_eq!(refused.code, 1, "{refused:?}");
    let run = db.bank().args(["reset", "--yes"]).run();
    run.success();
    assert_eq!(
        run.stdout,
        "deleted 2 accounts and 0 transfers, and 1 claimed transfer id\n"
    );
    let mut conn = db.conn();
    conn.batch_execute(
        "DO $$ BEGIN IF EXISTS (SELECT 1 FROM transfer_claims) THEN RAISE 'left'; END IF; END $$",
    )
    .expect("no claim left");
}

/// `reset` whose batch of accounts waited for a DBA's rewrite of `accounts` (`ALTER TABLE …
/// ADD COLUMN … DEFAULT random()`, not MVCC-safe in PostgreSQL), held open then committed: at
/// SERIALIZABLE the batch's snapshot, taken before it waited, saw no account, and reset said
/// "deleted 0 accounts and 1 transfer" (exit 0), leaving both accounts, their ledger gone
/// (found by a helper). The ledger is held first, so that reset waits there after the balances
/// are 0, and the rewrite begins before it asks for the accounts.
#[test]
fn reset_waiting_behind_a_rewrite_of_accounts_deletes_them() {
    use crate::promise::{begin_rewrite, commit_rewrite, wait_for_statements_waiting};
    use diesel::connection::SimpleConnection;
    for iso in crate::support::Iso::BOTH {
        let db = ScratchDb::migrated_at(iso);
        let ids = db.accounts(&[10, 10]);
        db.transfer(ids[0], ids[1], 1).run().success();
        let mut holder = db.conn();
        holder
            .batch_execute("BEGIN; LOCK TABLE transfers IN SHARE MODE")
            .expect("hold the ledger");
        let child = db.spawn(&["reset", "--yes", "--timeout", "20s"]);
        wait_for_statements_waiting(&db, 1, "DELETE FROM transfers%");
        let mut dba = db.conn();
        begin_rewrite(&mut dba, "accounts");
        holder.batch_execute("COMMIT").expect("let the ledger go");
        // The batch's first statement: its read of the accounts, or (PostgreSQL) its lock first.
        wait_for_statements_waiting(&db, 1, "%accounts%");
        commit_rewrite(&mut dba);
        let run = crate::support::Run::from(child.wait_with_output().expect("wait"));
        run.success();
        assert_eq!(run.stdout, "deleted 2 accounts and 1 transfer\n", "{iso:?}");
        assert_eq!(db.state(), (vec![], 0), "{iso:?}");
    }
}

/// `reset`'s first step, every balance set to 0, waited for a DBA's rewrite of `accounts` (held
/// open, then committed): at SERIALIZABLE its snapshot, taken before it waited, saw no account,
/// so no balance was set to 0, and the ledger was deleted next. Stopped before the accounts went
/// (a row lock held elsewhere, until its `--timeout`), the reset left accounts with their
/// balances and no ledger: the state "every balance 0 before the first ledger row goes" is
/// there to prevent (a rerun of a file applied its transfers again). The balances are 0 now.
#[test]
fn reset_whose_zeroing_waited_behind_a_rewrite_zeroes_the_balances() {
    use crate::promise::{begin_rewrite, commit_rewrite, wait_for_statements_waiting};
    use diesel::connection::SimpleConnection;
    for iso in crate::support::Iso::BOTH {
        let db = ScratchDb::migrated_at(iso);
        let ids = db.accounts(&[10, 10]);
        db.transfer(ids[0], ids[1], 1).run().success();
        let mut ledger = db.conn();
        ledger
            .batch_execute("BEGIN; LOCK TABLE transfers IN SHARE MODE")
            .expect("hold the ledger");
        let mut dba = db.conn();
        begin_rewrite(&mut dba, "accounts");
        let child = db.spawn(&["reset", "--yes", "--timeout", "3s"]);
        wait_for_statements_waiting(&db, 1, "%accounts%");
        commit_rewrite(&mut dba);
        wait_for_statements_waiting(&db, 1, "DELETE FROM transfers%");
        // The accounts' rows held, so that the reset stops before deleting them.
        let mut rows = db.conn();
        rows.batch_execute("BEGIN; SELECT id FROM accounts FOR KEY SHARE")
            .expect("hold the accounts' keys");
        ledger.batch_execute("COMMIT").expect("let the ledger go");
        let run = crate::support::Run::from(child.wait_with_output().expect("wait"));
        assert_ne!(run.code, 0, "{iso:?}: {run:?}");
        rows.batch_execute("COMMIT").expect("let the accounts go");
        assert_eq!(db.state().1, 0, "{iso:?}: the ledger went: {run:?}");
        assert_eq!(
            (db.balance(ids[0]), db.balance(ids[1])),
            (0, 0),
            "{iso:?}: every balance 0 before the ledger went: {run:?}"
        );
    }
}

/// `reset`'s last step, deleting the claimed transfer ids, waited for a DBA's rewrite of
/// `transfer_claims` (held open, then committed): at SERIALIZABLE its statement's snapshot,
/// taken before it waited, saw no claim, and reset said "deleted 2 accounts and 0 transfers"
/// (exit 0), leaving the claim (found by a reviewer, beside `reset_waiting_behind_a_rewrite_…`).
#[test]
fn reset_waiting_behind_a_rewrite_of_the_claims_deletes_them() {
    use crate::promise::{begin_rewrite, commit_rewrite, wait_for_statements_waiting};
    use diesel::connection::SimpleConnection;
    for iso in crate::support::Iso::BOTH {
        let db = ScratchDb::migrated_at(iso);
        let ids = db.accounts(&[10, 10]);
        let id = Uuid::new_v4().to_string();
        let refused = db.transfer(ids[0], ids[1], 11).args(["--id", &id]).run();
        assert_eq!(refused.code, 1, "{refused:?}");
        let mut dba = db.conn();
        begin_rewrite(&mut dba, "transfer_claims");
        let child = db.spawn(&["reset", "--yes", "--timeout", "20s"]);
        wait_for_statements_waiting(&db, 1, "%transfer_claims%");
        commit_rewrite(&mut dba);
        let run = crate::support::Run::from(child.wait_with_output().expect("wait"));
        run.success();
        assert_eq!(
            run.stdout, "deleted 2 accounts and 0 transfers, and 1 claimed transfer id\n",
            "{iso:?}"
        );
        db.conn()
            .batch_execute(
                "DO $$ BEGIN IF EXISTS (SELECT 1 FROM transfer_claims) THEN RAISE 'left'; \
                 END IF; END $$",
            )
            .expect("no claim left");
    }
}
#[test]
fn verify_reports_ok_and_json() {
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[10, 10]);
    db.transfer(ids[0], ids[1], 3).run().success();
    let text = db.bank().args(["verify"]).run();
    text.success();
    assert!(text.stdout.ends_with("verify: ok\n"), "{}", text.stdout);
    let json = db.bank().args(["verify", "--json"]).run();
    json.success();
    let j = json.json();
    assert_eq!(j["ok"], true);
    assert_eq!(j["accounts"], 2);
    assert_eq!(j["transfers"], 1);
    assert_eq!(j["total_balance"], 20);
}

#[test]
fn verify_fails_on_a_balance_the_ledger_does_not_explain() {
    use diesel::connection::SimpleConnection;
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[10, 10]);
    db.conn()
        .batch_execute(&format!(
            "UPDATE accounts SET balance = 11 WHERE id = '{}'",
            ids[0]
        ))
        .expect("tamper");
    let run = db.bank().args(["verify", "--json"]).run();
    assert_eq!(run.code, 1, "{run:?}");
    let j = run.json();
    assert_eq!(j["ok"], false);
    assert_eq!(j["mismatched_accounts"], 1);
    assert_eq!(j["violations"][0]["id"], ids[0].to_string());
    assert_eq!(j["violations"][0]["expected"], 10);
    assert!(
        run.stderr.starts_with("bank: error: verification failed"),
        "{run:?}"
    );
}

#[test]
fn rerunning_a_transfer_id_applies_it_once() {
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[100, 0]);
    let id = Uuid::new_v4().to_string();
    let transfer = |amount| db.transfer(ids[0], ids[1], amount).args(["--id", &id]);
    transfer(30).run().success();
    let again = transfer(30).run();
    again.success();
    assert!(again.stdout.contains("already exists"), "{again:?}");
    assert!(again.stdout.contains("nothing changed"), "{again:?}");
    assert_eq!(db.balance(ids[0]), 70);
    let json = transfer(30).args(["--json"]).run();
    json.success();
    assert_eq!(json.json()["already_applied"], true);
    let before = db.state();
    transfer(31)
        .run()
        .fails_with(1, "already exists with different details");
    assert_eq!(db.state(), before);
}

#[test]
fn verbose_logs_attempts_and_very_verbose_the_sql() {
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[10, 10]);
    let transfer = |v: &str| db.transfer(ids[0], ids[1], 1).args([v]).run();
    let v = transfer("-v");
    v.success().no_password();
    assert!(v.stderr.contains("attempt 1"), "{v:?}");
    // The flag's own words, not Rust's names (`Transaction`, `Copy`: a reviewer).
    assert!(v.stderr.contains("attempt 1 (transaction)"), "{v:?}");
    let seed = db.bank().args(["-v", "seed", "--accounts", "3"]).run();
    seed.success();
    assert!(seed.stderr.contains("(copy)"), "{seed:?}");
    assert!(v.stderr.contains("1 ledger rows inserted"), "{v:?}");
    assert!(!v.stderr.contains("UPDATE accounts"), "{v:?}");
    let vv = transfer("-vv");
    vv.success().no_password();
    assert!(
        vv.stderr
            .contains("BEGIN TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
        "{vv:?}"
    );
    assert!(vv.stderr.contains("UPDATE accounts"), "{vv:?}");
    assert!(vv.stderr.contains("COMMIT"), "{vv:?}");
}

#[test]
fn the_url_comes_from_the_environment_or_dotenv() {
    let db = ScratchDb::migrated();
    db.accounts(&[5]);
    let mut env = Bank::new().args(["balances"]);
    env.cmd.env("DATABASE_URL", db.url.expose());
    assert_eq!(env.run().success().stdout.lines().count(), 2);

    let dotenv = Bank::new().args(["balances"]);
    std::fs::write(
        dotenv.dir.path().join(".env"),
        format!("DATABASE_URL={}\n", db.url.expose()),
    )
    .expect("write .env");
    assert_eq!(dotenv.run().success().stdout.lines().count(), 2);

    let broken = Bank::new().args(["balances"]);
    // An unterminated quote; the message must not quote the line, which holds the password.
    std::fs::write(
        broken.dir.path().join(".env"),
        format!("DATABASE_URL='{}\n", db.url.expose()),
    )
    .expect("write .env");
    broken
        .run()
        .fails_with(2, "/.env: malformed line for DATABASE_URL (line 1)");
}

// ---- bad input: one line on stderr, non-zero exit, nothing changed --------------------------

/// Runs `bank` with `args` on a seeded database and checks it fails with `code` and `needle`
/// and leaves the database as it was.
#[track_caller]
fn refused(args: &[&str], code: i32, needle: &str) {
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[100, 100]);
    let before = db.state();
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            a.replace("{A}", &ids[0].to_string())
                .replace("{B}", &ids[1].to_string())
        })
        .collect();
    db.bank().args(&args).run().fails_with(code, needle);
    assert_eq!(db.state(), before, "database changed by {args:?}");
}

#[test]
fn malformed_uuid_is_refused() {
    refused(
        &[
            "transfer",
            "--from",
            "not-a-uuid",
            "--to",
            "{B}",
            "--amount",
            "1",
        ],
        2,
        "invalid value 'not-a-uuid' for '--from",
    );
    refused(
        &["transfer", "--from", "{A}", "--to", "1234", "--amount", "1"],
        2,
        "--to",
    );
    refused(
        &[
            "transfer", "--from", "{A}", "--to", "{B}", "--amount", "1", "--id", "x",
        ],
        2,
        "--id",
    );
}

#[test]
fn unknown_accounts_are_refused() {
    let ghost = Uuid::new_v4().to_string();
    refused(
        &["transfer", "--from", &ghost, "--to", "{B}", "--amount", "1"],
        1,
        &format!("account {ghost} does not exist"),
    );
    refused(
        &["transfer", "--from", "{A}", "--to", &ghost, "--amount", "1"],
        1,
        &format!("account {ghost} does not exist"),
    );
}

#[test]
fn bad_amounts_are_refused() {
    refused(
        &["transfer", "--from", "{A}", "--to", "{B}", "--amount", "0"],
        2,
        "must be a positive whole number, got 0",
    );
    refused(
        &["transfer", "--from", "{A}", "--to", "{B}", "--amount", "-5"],
        2,
        "must be a positive whole number, got -5",
    );
    refused(
        &[
            "transfer", "--from", "{A}", "--to", "{B}", "--amount", "ten",
        ],
        2,
        "must be a whole number, got 'ten'",
    );
    refused(
        &[
            "transfer", "--from", "{A}", "--to", "{B}", "--amount", "1.5",
        ],
        2,
        "must be a whole number",
    );
    refused(
        &[
            "transfer",
            "--from",
            "{A}",
            "--to",
            "{B}",
            "--amount",
            "9223372036854775808",
        ],
        2,
        "out of range (at most 9223372036854775807)",
    );
}

#[test]
fn a_transfer_to_the_same_account_is_refused() {
    refused(
        &["transfer", "--from", "{A}", "--to", "{A}", "--amount", "1"],
        2,
        "to itself",
    );
}

#[test]
fn insufficient_funds_are_refused() {
    refused(
        &[
            "transfer", "--from", "{A}", "--to", "{B}", "--amount", "101",
        ],
        1,
        "insufficient funds for a transfer of 101",
    );
}

#[test]
fn reset_without_yes_and_without_a_terminal_is_refused() {
    refused(&["reset"], 2, "pass --yes");
}

#[test]
fn a_missing_url_names_the_flag_and_the_variable() {
    let run = Bank::new().args(["balances"]).run();
    run.fails_with(2, "--database-url");
    assert!(run.stderr.contains("DATABASE_URL"), "{run:?}");
}

#[test]
fn a_malformed_url_is_refused_without_showing_the_password() {
    let pw = password();
    for url in [
        format!("mysql://bank:{pw}@127.0.0.1/bank"),
        format!("postgres://bank:{pw}@127.0.0.1:notaport/bank"),
        format!("postgres://bank:{pw}@127.0.0.1:0/bank"),
        format!("postgres://bank:{pw}@127.0.0.1/bank?port=99999"),
    ] {
        let run = Bank::new().args(["--database-url", &url, "balances"]).run();
        run.fails_with(2, "malformed database URL");
        assert!(run.stderr.contains("***"), "{run:?}");
    }
}

#[test]
fn an_unreachable_server_fails_within_seconds() {
    let pw = password();
    let started = Instant::now();
    // Port 9 (discard) on loopback: nothing listens there.
    let url = format!("postgres://bank:{pw}@127.0.0.1:9/bank");
    let run = Bank::new().args(["--database-url", &url, "balances"]).run();
    run.fails_with(1, "cannot connect to postgres://bank:***@127.0.0.1:9/bank");
    assert!(started.elapsed() < Duration::from_secs(10));
    // A wrong password is refused by the server, and still not echoed.
    let wrong = server_url().expose().replace(&pw, "wrong-password-123");
    let run = Bank::new()
        .args(["--database-url", &wrong, "balances"])
        .run();
    run.fails_with(1, "password authentication failed");
    assert!(!run.stderr.contains("wrong-password-123"), "{run:?}");
    // A transfer retries a server that is down, but not a wrong password.
    let started = Instant::now();
    let (a, b) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
    let run = Bank::new()
        .args([
            "--database-url",
            &wrong,
            "transfer",
            "--from",
            &a,
            "--to",
            &b,
        ])
        .args(["--amount", "1"])
        .run();
    run.fails_with(1, "password authentication failed");
    assert!(started.elapsed() < Duration::from_secs(2), "{run:?}");
    // With --json its reason is the file's word for a line refused at login, `not_applied`
    // (`Outcome::of_failure`): mapped to `unknown` (a helper's mutation), every other test
    // passed, and the JSON said "unknown" of a transfer that failed, exit 1.
    let run = Bank::new()
        .args(["--database-url", &wrong, "transfer", "--json"])
        .args(["--from", &a, "--to", &b, "--amount", "1"])
        .run();
    run.fails_json(1, "failed", "password authentication failed");
    assert_eq!(run.json()["reason"], "not_applied", "{run:?}");
}

/// Login refusals that no retry can cure were retried for the whole deadline (31 attempts,
/// 16–22 s), then reported as "gave up", or as "may or may not have been applied" with `--id`
/// and for a file's lines (found by a helper playing a new user): a URL without the password
/// the server asks for, a setting the server does not know, one without a value, one it cannot
/// change for a session, a value out of range, a setting only SET TRANSACTION may change. They fail at once now, as a wrong password did, in the server's words:
/// a missing password exits 1, or 3 where an id is given (an earlier run of that id, through
/// another URL, may still be about to commit: this run cannot ask); a refused setting (the URL's
/// options, PGOPTIONS) is the user's configuration, exit 2 without an id (`-c bogus=1` exited
/// 1), and unknown (3) with one or for a file, as for a password (`login_refusals_…_unknown`).
#[test]
fn login_refusals_that_retrying_cannot_cure_fail_at_once() {
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[100, 100]);
    let (from, to) = (ids[0].to_string(), ids[1].to_string());
    // libpq decodes %20, not the `+` of a form's encoding.
    let with_options = |o: &str| {
        let url = db.url.expose();
        let sep = if url.contains('?') { '&' } else { '?' };
        let o = o.replace(' ', "%20").replace('=', "%3D");
        format!("{url}{sep}options={o}")
    };
    let no_password = {
        let (_, url) = db.role("LOGIN", "");
        let mut url = url::Url::parse(&url).expect("role URL");
        url.set_password(None).expect("no password");
        url.to_string()
    };
    let cases = [
        (no_password, "no password supplied"),
        (
            with_options("-c bogus=1"),
            "unrecognized configuration parameter",
        ),
        (with_options("-cbogus"), "requires a value"),
        (with_options("-c shared_buffers=1MB"), "cannot be changed"),
        // A value out of the setting's range, a setting the server takes only from SET
        // TRANSACTION (found by a new user: 31 attempts, 17 s).
        (with_options("-c work_mem=1"), "is outside the valid range"),
        (
            with_options("-c transaction_isolation=serializable"),
            "must be called before any query",
        ),
    ];
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("one.csv");
    std::fs::write(
        &file,
        format!("id,from,to,amount\n{},{from},{to},1\n", Uuid::new_v4()),
    )
    .expect("write file");
    let file = file.to_str().expect("utf-8 path").to_string();
    for (url, words) in &cases {
        let id = Uuid::new_v4().to_string();
        let one = ["transfer", "--from", &from, "--to", &to, "--amount", "1"];
        let setting = *words != "no password supplied";
        // A refused setting is bad input (exit 2) without an id; with one, or for a file, the
        // server decided, and an earlier run may have logged in: unknown, as for a password.
        let (code, given) = if setting { (2, 3) } else { (1, 3) };
        let runs: [(Vec<&str>, i32); 3] = [
            (one.to_vec(), code),
            ([&one[..], &["--id", &id]].concat(), given),
            (vec!["transfer", "--file", &file], given),
        ];
        for (args, code) in runs {
            let started = Instant::now();
            let run = Bank::new()
                .args(["--database-url", url.as_str()])
                .args(&args)
                .run();
            let took = started.elapsed();
            assert_eq!(run.code, code, "{words}: {args:?}: {run:?}");
            assert!(run.stderr.contains(words), "{words}: {args:?}: {run:?}");
            assert!(
                took < Duration::from_secs(3),
                "{words}: {args:?} took {took:?}"
            );
            run.no_password();
            if setting {
                // One line, the server's words once (libpq tries the login again and said
                // them twice).
                assert_eq!(run.stderr.lines().count(), 1, "{words}: {run:?}");
                assert_eq!(run.stderr.matches(words).count(), 1, "{words}: {run:?}");
            }
        }
    }
    // PGOPTIONS as the URL's options: the same words, the same exit.
    for (options, words) in [
        ("-c bogus_setting=1", "unrecognized configuration parameter"),
        ("-c work_mem=abc", "invalid value for parameter"),
    ] {
        let mut run = db.transfer(ids[0], ids[1], 1);
        run.cmd.env("PGOPTIONS", options);
        run.run().fails_with(2, words);
    }
    assert_eq!(db.state().1, 0, "nothing applied");
}

/// A setting the server refuses at login depends on the server, not on the URL alone: the same
/// URL logged in for an earlier run of an id, before the role lost its `SET` on the parameter
/// (`REVOKE SET ON PARAMETER`, a role made no longer superuser). A rerun of that id said "bad
/// input" (exit 2) of an id applied (or left unknown) by that run, where the same rerun after a
/// changed password says the outcome is unknown and to run it again (exit 3). Unknown now, for
/// `--id` and a file; without an id, bad input (exit 2) still.
#[test]
fn a_setting_refused_at_login_leaves_a_given_id_unknown() {
    use diesel::connection::SimpleConnection;
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[100, 0]);
    let (from, to) = (ids[0].to_string(), ids[1].to_string());
    let (role, url) = db.teller("LOGIN");
    let sep = if url.contains('?') { '&' } else { '?' };
    let url = format!("{url}{sep}options=-c%20log_statement%3Dnone");
    db.conn()
        .batch_execute(&format!("GRANT SET ON PARAMETER log_statement TO {role}"))
        .expect("grant");
    let id = Uuid::new_v4().to_string();
    let one = ["transfer", "--from", &from, "--to", &to, "--amount", "1"];
    let run = |args: &[&str]| {
        Bank::new()
            .args(["--database-url", url.as_str()])
            .args(args)
            .run()
    };
    run(&[&one[..], &["--id", &id]].concat()).success();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = one_line_file(dir.path(), &id, &from, &to);
    db.conn()
        .batch_execute(&format!(
            "REVOKE SET ON PARAMETER log_statement FROM {role}"
        ))
        .expect("revoke");
    let words = "permission denied to set parameter";
    let rerun = run(&[&one[..], &["--id", &id]].concat());
    rerun.fails_with(3, words);
    assert!(rerun.stderr.contains("may or may not"), "{rerun:?}");
    run(&["transfer", "--file", &file]).fails_with(3, words);
    run(&one).fails_with(2, words);
    assert_eq!(db.balance(ids[1]), 1, "applied once, by the first run");
}

/// `one.csv` in `dir`: the file of one line moving 1 from `from` to `to` under `id` (the line a
/// single transfer with that id applies); its path.
fn one_line_file(dir: &std::path::Path, id: &str, from: &str, to: &str) -> String {
    let file = dir.join("one.csv");
    std::fs::write(&file, format!("id,from,to,amount\n{id},{from},{to},1\n")).expect("file");
    file.to_str().expect("utf-8 path").to_string()
}

/// A service file (`?service=…`, `PGSERVICEFILE`) is no part of the URL: the same URL logged in
/// for an earlier run of an id, before the file was moved or its section removed. A rerun of an
/// id that run applied said "bad input" (exit 2: "service file … not found") of it, where the
/// same rerun after a refused setting or a changed password says the outcome is unknown (exit
/// 3). Unknown with `--id` and for a file; without an id, bad input (exit 2) still.
#[test]
fn a_service_file_gone_leaves_a_given_id_unknown() {
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[100, 0]);
    let (from, to) = (ids[0].to_string(), ids[1].to_string());
    let dir = tempfile::tempdir().expect("temp dir");
    let services = dir.path().join("pg_service.conf");
    std::fs::write(&services, "[bank_h8]\napplication_name=bank\n").expect("service file");
    let services = services.to_str().expect("utf-8 path").to_string();
    let url = db.url.expose();
    let sep = if url.contains('?') { '&' } else { '?' };
    let url = format!("{url}{sep}service=bank_h8");
    let id = Uuid::new_v4().to_string();
    let file = one_line_file(dir.path(), &id, &from, &to);
    let one = ["transfer", "--from", &from, "--to", &to, "--amount", "1"];
    let run = |args: &[&str], services: &str| {
        let mut bank = Bank::new()
            .args(["--database-url", url.as_str()])
            .args(args);
        bank.cmd.env("PGSERVICEFILE", services);
        bank.run()
    };
    run(&[&one[..], &["--id", &id]].concat(), &services).success();
    for gone in [format!("{services}.moved"), "/dev/null".to_string()] {
        let rerun = run(&[&one[..], &["--id", &id]].concat(), &gone);
        rerun.fails_with(3, "service");
        assert!(rerun.stderr.contains("may or may not"), "{gone}: {rerun:?}");
        let lines = run(&["transfer", "--file", &file, "--json"], &gone);
        assert_eq!(lines.code, 3, "{gone}: {lines:?}");
        run(&one, &gone).fails_with(2, "service");
    }
    assert_eq!(db.balance(ids[1]), 1, "applied once, by the first run");
}

/// A libpq variable of the environment whose value libpq refuses (`PGSSLMODE=bogus`) lives
/// outside the command line, as a service file does: an earlier run of the id, before the
/// variable was set, may have logged in through the same URL. With `--id` and for a file it was
/// bad input (exit 2), where a refused `PGOPTIONS` or a service file gone says the outcome is
/// unknown (exit 3); without an id it stays bad input (exit 2), and the URL's own
/// `sslmode=bogus` stays bad input with an id too (`a_url_that_reaches_no_database_…`).
#[test]
fn an_invalid_libpq_variable_leaves_a_given_id_unknown() {
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[100, 0]);
    let (from, to) = (ids[0].to_string(), ids[1].to_string());
    let dir = tempfile::tempdir().expect("temp dir");
    let id = Uuid::new_v4().to_string();
    let file = one_line_file(dir.path(), &id, &from, &to);
    let one = ["transfer", "--from", &from, "--to", &to, "--amount", "1"];
    let run = |args: &[&str], var: Option<(&str, &str)>| {
        let mut bank = Bank::new()
            .args(["--database-url", db.url.expose()])
            .args(args);
        if let Some((name, value)) = var {
            bank.cmd.env(name, value);
        }
        bank.run()
    };
    run(&[&one[..], &["--id", &id]].concat(), None).success();
    for var in [
        ("PGSSLMODE", "bogus"),
        ("PGGSSENCMODE", "bogus"),
        ("PGTARGETSESSIONATTRS", "bogus"),
        ("PGCHANNELBINDING", "bogus"),
        // Unequal lists (the URL names one host): retried until --timeout as a lost connection.
        ("PGHOSTADDR", "127.0.0.1,127.0.0.1"),
        ("PGSERVICE", "bank_no_such_service"),
        ("PGOPTIONS", "-c bogus_setting=1"),
    ] {
        let rerun = run(&[&one[..], &["--id", &id]].concat(), Some(var));
        assert_eq!(rerun.code, 3, "{var:?}: {rerun:?}");
        assert!(
            !rerun.stderr.contains("attempts"),
            "not retried: {var:?}: {rerun:?}"
        );
        assert!(
            rerun.stderr.contains("may or may not"),
            "{var:?}: {rerun:?}"
        );
        rerun.no_password();
        let lines = run(&["transfer", "--file", &file, "--json"], Some(var));
        assert_eq!(lines.code, 3, "{var:?}: {lines:?}");
        let without_id = run(&one, Some(var));
        assert_eq!(without_id.code, 2, "{var:?}: {without_id:?}");
    }
    assert_eq!(db.balance(ids[1]), 1, "applied once, by the first run");
}

/// A value clap refuses is shown escaped, as the file's values are: clap's own rendering strips
/// escape sequences, and `--amount $'\e[31m5'` read "invalid value '5' … got '5'" (found by a
/// helper playing a new user).
#[test]
fn control_characters_in_a_refused_argument_are_shown_escaped() {
    let (a, b) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
    let run = Bank::new()
        .args([
            "transfer",
            "--from",
            &a,
            "--to",
            &b,
            "--amount",
            "\u{1b}[31m5",
        ])
        .run();
    run.fails_with(2, "invalid value '\\u{1b}[31m5' for '--amount <N>'");
    assert!(!run.stderr.contains('\u{1b}'), "{run:?}");
    assert!(run.stderr.contains("got '\\u{1b}[31m5'"), "{run:?}");
    // A value outside a list too (a reviewer's case).
    let run = Bank::new()
        .args(["transfer", "--from", &a, "--to", &b, "--amount", "5"])
        .args(["--mode", "\u{1b}[31mx"])
        .run();
    run.fails_with(2, "invalid value '\\u{1b}[31mx' for '--mode <MODE>'");
    assert!(
        run.stderr.contains("possible values: transaction"),
        "{run:?}"
    );
    // An empty path: "[possible values: ]" named no list (found by a helper).
    for args in [
        vec!["transfer", "--file", ""],
        vec!["workload", "--report", ""],
        vec!["workload", "--histogram", ""],
    ] {
        let run = Bank::new().args(&args).run();
        run.fails_with(2, &format!("invalid value '' for '{} <", args[1]));
        assert!(run.stderr.contains("': it is empty"), "{run:?}");
        assert!(!run.stderr.contains("possible values"), "{run:?}");
    }
}

#[test]
fn an_unmigrated_database_asks_for_init() {
    let db = ScratchDb::empty();
    let a = Uuid::new_v4().to_string();
    let b = Uuid::new_v4().to_string();
    for args in [
        vec!["balances"],
        vec!["seed"],
        vec!["seed", "--json"],
        vec!["balances", "--json"],
        vec!["verify"],
        vec!["transfer", "--from", &a, "--to", &b, "--amount", "1"],
    ] {
        db.bank()
            .args(&args)
            .run()
            .fails_with(1, "database not migrated: run `bank init` first");
    }
    db.bank()
        .args(["demo"])
        .run()
        .fails_with(1, "run `bank init`");
    // Nothing was created: the schema is still entirely missing.
    let init = db.bank().args(["init"]).run();
    init.success();
    assert_eq!(init.stdout, crate::support::all_migrations_applied());
    // Another application's `transfers` there, where init refuses: advising it sent the user
    // in a circle (found by a helper).
    let other = ScratchDb::empty();
    diesel::connection::SimpleConnection::batch_execute(
        &mut other.conn(),
        "CREATE TABLE transfers (id INT PRIMARY KEY)",
    )
    .expect("another application's table");
    for args in [
        vec!["balances"],
        vec!["verify"],
        vec!["transfer", "--from", &a, "--to", &b, "--amount", "1"],
    ] {
        let run = other.bank().args(&args).run();
        run.fails_with(1, "database not migrated, and it already has transfers");
        assert!(!run.stderr.contains("run `bank init` first"), "{run:?}");
    }
    other
        .bank()
        .args(["init"])
        .run()
        .fails_with(1, "already has transfers");
}

/// `script -qec CMD /dev/null`: runs CMD on a pseudo-terminal. Checked once first, so that a
/// machine without one (a chroot without devpts) fails these tests with the reason, not with
/// an empty output.
fn script(cmd: &str) -> std::process::Command {
    static CHECKED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    CHECKED.get_or_init(|| {
        let out = std::process::Command::new("script")
            .args(["-qec", "true", "/dev/null"])
            .stdin(std::process::Stdio::null())
            .output();
        match out {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "these tests run bank on a pseudo-terminal with script(1), which failed: {} \
                 (in a chroot, mount devpts: mount -t devpts devpts /dev/pts)",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => panic!(
                "these tests run bank on a pseudo-terminal with script(1) (util-linux), which \
                 could not be run: {e}"
            ),
        }
    });
    let mut command = std::process::Command::new("script");
    command.args(["-qec", cmd, "/dev/null"]);
    command
}

/// Runs `bank args` on a pseudo-terminal (`script`), typing `input`; returns what it showed.
fn on_terminal(db: &ScratchDb, args: &str, input: &str) -> String {
    on_terminal_with_status(db, args, input).0
}

/// `on_terminal`, with bank's exit code (`script -e` passes it on).
fn on_terminal_with_status(db: &ScratchDb, args: &str, input: &str) -> (String, Option<i32>) {
    use std::io::Write;
    use std::process::Stdio;
    let bank = assert_cmd::cargo::cargo_bin("bank");
    let cmd = format!(
        "{} --database-url '{}' {args}",
        bank.display(),
        db.url.expose()
    );
    let out = script(&cmd)
        .env_remove("DATABASE_URL")
        // A terminal user's TERM: CI may run with none, or "dumb", where no live line is drawn.
        .env("TERM", "xterm-256color")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())?;
            child.wait_with_output()
        })
        .expect("run script");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code(),
    )
}

#[test]
fn reset_asks_on_a_terminal() {
    let db = ScratchDb::migrated();
    db.accounts(&[10, 10]);
    // A declined reset did not do what was asked: a script (or `&&`) must not go on as if the
    // database were empty. An end of input (Ctrl-D) is a "no" too.
    for answer in ["n\n", "", "maybe\n"] {
        let (no, code) = on_terminal_with_status(&db, "reset", answer);
        assert!(
            no.contains("Delete every account and transfer in postgres://"),
            "{no}"
        );
        assert!(no.contains("reset cancelled: nothing deleted"), "{no}");
        assert!(!no.contains(&password()), "{no}");
        assert_eq!(code, Some(1), "{answer:?}: {no}");
        assert_eq!(db.state().0.len(), 2);
    }
    let (yes, code) = on_terminal_with_status(&db, "reset", "y\n");
    assert!(yes.contains("deleted 2 accounts and 0 transfers"), "{yes}");
    assert_eq!(code, Some(0), "{yes}");
    assert_eq!(db.state(), (vec![], 0));
}

#[test]
fn workload_shows_a_live_line_on_a_terminal() {
    let db = ScratchDb::migrated();
    let shown = on_terminal(
        &db,
        "workload --accounts 10 --concurrency 2 --duration 2500ms",
        "",
    );
    assert!(shown.contains(" transfers/s "), "{shown}");
    assert!(shown.contains(" retries "), "{shown}");
    assert!(shown.contains("workload: ok"), "{shown}");
}

#[test]
fn bad_timeouts_are_refused() {
    const TRANSFER: [&str; 7] = ["transfer", "--from", "{A}", "--to", "{B}", "--amount", "1"];
    // Below a millisecond the transfer "timed out after 0.0s (0 attempts)"; a negative one was
    // "unexpected argument '-1'".
    for (timeout, message) in [
        ("0s", "must be longer than 0"),
        ("soon", "--timeout"),
        // humantime's words ("expected number at 0") named its parser, not what to type.
        (
            "soon",
            "not a duration: a number and a unit, as in 500ms, 5s",
        ),
        ("1e3s", "not a duration: a number and a unit"),
        ("1us", "must be at least 1ms"),
        ("999us", "must be at least 1ms"),
        ("-1s", "must not be negative"),
    ] {
        refused(
            &[&TRANSFER[..], &["--timeout", timeout]].concat(),
            2,
            message,
        );
    }
    // Near the largest duration, adding the moment bank waits past a deadline overflowed: a
    // panic (exit 101) after the transfer, or after a workload had created accounts and run.
    let huge = "18446744073709551615s999ms";
    let workload = ["workload", "--accounts", "2", "--concurrency", "1"];
    for args in [
        [&TRANSFER[..], &["--timeout", huge]].concat(),
        vec!["transfer", "--file", "-", "--timeout", huge],
        [&TRANSFER[..], &["--retry-cap", huge]].concat(),
        vec!["balances", "--timeout", huge],
        [&workload[..], &["--duration", "1s", "--timeout", huge]].concat(),
        [&workload[..], &["--duration", huge]].concat(),
        [
            &workload[..],
            &["--transfers", "1", "--check-timeout", huge],
        ]
        .concat(),
    ] {
        refused(&args, 2, "must be at most 366 days");
    }
    // A year as humantime counts it (365.25 days) is within the bound: "must be at most 365
    // days, got 1y" read as a contradiction (found by a helper).
    let db = ScratchDb::migrated();
    db.bank()
        .args(["balances", "--timeout", "1y"])
        .run()
        .success();
}

/// `BANK_TIMEOUT` in `.env` sets the deadline like the other `BANK_*` variables: an invalid one
/// is reported as such.
#[test]
fn the_timeout_comes_from_dotenv_too() {
    let db = ScratchDb::migrated();
    let [a, b] = db.accounts(&[10, 0])[..] else {
        panic!("two accounts")
    };
    let run = db.transfer(a, b, 1);
    std::fs::write(run.dir.path().join(".env"), "BANK_TIMEOUT=0s\n").expect("write .env");
    run.run().fails_with(2, "must be longer than 0");
    assert_eq!(db.balance(a), 10);
}

/// Every `BANK_*` variable set but empty (or blank), in the environment or in `.env`, counts as
/// not set, as `DATABASE_URL=` does: `BANK_TIMEOUT=` was refused ("invalid value ''", exit 2).
/// An empty one in the environment leaves `.env`'s in force, as for `DATABASE_URL`; and the
/// help says so.
#[test]
fn every_bank_variable_set_but_empty_counts_as_unset() {
    let db = ScratchDb::migrated();
    let [a, b] = db.accounts(&[100, 0])[..] else {
        panic!("two accounts")
    };
    let (a, b) = (a.to_string(), b.to_string());
    let transfer = ["transfer", "--from", &a, "--to", &b, "--amount", "1"];
    let cases: [(&str, &[&str]); 6] = [
        ("BANK_TIMEOUT", &transfer),
        ("BANK_MAX_RETRIES", &transfer),
        ("BANK_RETRY_BASE", &transfer),
        ("BANK_RETRY_CAP", &transfer),
        ("BANK_READ_TIMEOUT", &["balances"]),
        ("BANK_SEED_METHOD", &["seed"]),
    ];
    for (var, args) in cases {
        for value in ["", " "] {
            let mut run = db.bank().args(args);
            run.cmd.env(var, value);
            let run = run.run();
            assert_eq!(run.code, 0, "{var}={value:?}: {run:?}");
        }
        let run = db.bank().args(args);
        std::fs::write(run.dir.path().join(".env"), format!("{var}=\n")).expect("write .env");
        let run = run.run();
        assert_eq!(run.code, 0, "{var}= in .env: {run:?}");
    }
    let mut run = db.bank().args(transfer);
    run.cmd.env("BANK_TIMEOUT", "");
    std::fs::write(run.dir.path().join(".env"), "BANK_TIMEOUT=0s\n").expect("write .env");
    run.run().fails_with(2, "must be longer than 0");
    let help = Bank::new().args(["--help"]).run();
    assert!(help.stdout.contains("set but empty is unset"), "{help:?}");
}

/// A reset the server's `temp_file_limit` stops (each batch's sort spills past it): the line
/// named the setting only in the server's words, with no word of whose it is or how to lift it
/// ("run it again to finish" meets it again), and said its batch in flight "may or may not have
/// been done" of a statement the server refused (rolled back).
#[test]
fn a_reset_stopped_by_temp_file_limit_names_the_setting() {
    let db = ScratchDb::migrated();
    db.accounts(&[10; 2000]);
    db.alter("work_mem = '64kB'");
    db.alter("temp_file_limit = '64kB'");
    let run = db.bank().args(["reset", "--yes"]).run();
    run.fails_with(
        1,
        "exceeds temp_file_limit (64kB) (the server's temp_file_limit, set for",
    );
    assert!(
        !run.stderr.contains("may or may not have been done"),
        "{run:?}"
    );
    assert_eq!(db.state().0.len(), 2000, "nothing deleted");
}

/// An unquoted `$` in `.env` starts a variable, as in a shell: `pa$word` became `pa` when `word`
/// is not set, and the server's refusal was all the user saw (a reviewer). Said, without the
/// piece of password that reads as a variable's name.
#[test]
fn a_dollar_in_a_dotenv_url_that_expands_to_nothing_is_said() {
    for (line, warned) in [
        (
            "DATABASE_URL=postgres://bank:pa$wordX9@127.0.0.1:1/bank",
            true,
        ),
        (
            "DATABASE_URL=\"postgres://bank:pa${wordX9}@127.0.0.1:1/bank\"",
            true,
        ),
        (
            "DATABASE_URL='postgres://bank:pa$wordX9@127.0.0.1:1/bank'",
            false,
        ),
        (
            "DATABASE_URL=postgres://bank:pa\\$wordX9@127.0.0.1:1/bank",
            false,
        ),
        (
            "PW=x\nDATABASE_URL=postgres://bank:$PW@127.0.0.1:1/bank",
            false,
        ),
        // dotenvy drops a `$` that names nothing (found by a helper playing a new user).
        ("DATABASE_URL=postgres://bank:pa$@127.0.0.1:1/bank", true),
        // Its names end at `_`: `$FOO_BAR` is `$FOO`, not set, then `_BAR`.
        (
            "DATABASE_URL=postgres://bank:ab$FOOY9_BAR@127.0.0.1:1/bank",
            true,
        ),
        (
            "DATABASE_URL=postgres://bank:ab$FOOX9@127.0.0.1:1/bank",
            false,
        ),
    ] {
        let mut run = Bank::new().args(["balances"]);
        run.cmd.env("FOOY9_BAR", "zz").env("FOOX9", "zz");
        std::fs::write(run.dir.path().join(".env"), format!("{line}\n")).expect(".env");
        let run = run.run();
        assert_eq!(run.code, 1, "{line}: {run:?}");
        assert_eq!(
            run.stderr.contains("single quotes"),
            warned,
            "{line}: {run:?}"
        );
        assert!(!run.stderr.contains("wordX9"), "{line}: {run:?}");
    }
}

/// A `.env` URL made of nothing but a variable that is not set (`DATABASE_URL=${DB_URL}`, the
/// variable meant to come from elsewhere): "no database URL … or set DATABASE_URL (in the
/// environment or in .env)", which it is (found by a reviewer). It names the line's variable
/// problem instead, and still exits 2.
#[test]
fn a_dotenv_url_that_expands_to_nothing_at_all_is_said() {
    for line in ["DATABASE_URL=${DB_URL_X9}", "DATABASE_URL=$DBURLX9"] {
        let run = Bank::new().args(["balances"]);
        std::fs::write(run.dir.path().join(".env"), format!("{line}\n")).expect(".env");
        let run = run.run();
        run.fails_with(2, "DATABASE_URL in .env");
        assert!(run.stderr.contains("not set"), "{line}: {run:?}");
    }
}

/// A `.env` that sets `DATABASE_URL` twice (an edit appended below the old line): the first
/// was used, silently, where a shell sourcing the file (`set -a; . ./.env`) and docker's
/// env files take the last (found by a reviewer). The last is used, and a warning names the key.
#[test]
fn a_dotenv_key_set_twice_takes_the_last_and_says_so() {
    let db = ScratchDb::migrated();
    let run = Bank::new().args(["balances"]);
    std::fs::write(
        run.dir.path().join(".env"),
        format!(
            "DATABASE_URL=postgres://bank:SECRET_X9@127.0.0.1:1/bank\nDATABASE_URL={}\n",
            db.url.expose()
        ),
    )
    .expect(".env");
    let run = run.run();
    run.success();
    assert!(
        run.stderr.contains("warning")
            && run.stderr.contains("DATABASE_URL")
            && run.stderr.contains("last"),
        "{run:?}"
    );
    assert!(!run.stderr.contains("SECRET_X9"), "{run:?}");
}

/// `bank balances | head -1`: the reader leaves early; `bank` ends quietly with status 0.
#[test]
fn a_closed_pipe_is_a_normal_end() {
    let db = ScratchDb::migrated();
    db.accounts(&[5; 2000]);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("bank"))
        .args(["--database-url", db.url.expose(), "balances"])
        .current_dir(dir.path())
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn bank");
    // Read one line, then close the pipe.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 16];
    std::io::Read::read_exact(&mut stdout, &mut first).expect("first bytes");
    drop(stdout);
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "{out:?}");
}

#[test]
fn numeric_flags_say_their_bounds() {
    let db = ScratchDb::migrated();
    for (args, message) in [
        (vec!["seed", "--accounts", "0"], "must be at least 1, got 0"),
        (
            vec!["seed", "--accounts", "2", "--balance", "-5"],
            "must not be negative, got -5",
        ),
        (
            vec!["workload", "--accounts", "-3", "--transfers", "1"],
            "must be a whole number from 2 to 10000000, got -3",
        ),
        (
            vec!["workload", "--concurrency", "0", "--transfers", "1"],
            "must be from 1 to 512, got 0",
        ),
        (
            vec!["workload", "--max-amount", "-5", "--transfers", "1"],
            "must be a positive whole number, got -5",
        ),
        (
            vec!["workload", "--transfers", "-1"],
            "must be a whole number at least 1, got -1",
        ),
        // clap took these for unknown flags ("unexpected argument '-1s' found"); a workload of
        // no time created its accounts and reported ok (found by a reviewer).
        (
            vec!["workload", "--duration", "-1s"],
            "must not be negative, got -1s",
        ),
        (
            vec!["workload", "--duration", "0s"],
            "must be longer than 0",
        ),
        (
            vec!["workload", "--duration", "5s", "--retry-base", "-1ms"],
            "must not be negative, got -1ms",
        ),
        (
            vec!["workload", "--duration", "5s", "--retry-cap", "-1s"],
            "must not be negative, got -1s",
        ),
        // A first backoff longer than the longest: the cap was raised to it, silently.
        (
            vec![
                "workload",
                "--duration",
                "5s",
                "--retry-base",
                "2s",
                "--retry-cap",
                "500ms",
            ],
            "--retry-base 2s is longer than --retry-cap 500ms",
        ),
        (
            vec!["workload", "--duration", "5s", "--retry-base", "3s"],
            "--retry-base 3s is longer than --retry-cap 1s",
        ),
        // Debug's "0ns" for the `0s` typed.
        (
            vec!["workload", "--duration", "5s", "--retry-cap", "0s"],
            "--retry-base 2ms is longer than --retry-cap 0s,",
        ),
    ] {
        db.bank().args(&args).run().fails_with(2, message);
    }
    let [a, b] = db.accounts(&[100, 0])[..] else {
        panic!("two accounts")
    };
    let before = db.state();
    db.transfer(a, b, 5)
        .args(["--retry-base", "1500ms", "--retry-cap", "1s"])
        .run()
        .fails_with(2, "--retry-base 1.5s is longer than --retry-cap 1s");
    let mut from_env = db.transfer(a, b, 5);
    from_env.cmd.env("BANK_RETRY_BASE", "2s");
    from_env
        .run()
        .fails_with(2, "--retry-base 2s is longer than --retry-cap 1s");
    assert_eq!(db.state(), before);
}

/// libpq's multi-host URL (CockroachDB failover): the first host refuses, the second answers.
/// The URL is shown with its password hidden and everything else as written.
#[test]
fn a_multi_host_url_fails_over_to_the_next_host() {
    let db = ScratchDb::migrated();
    db.accounts(&[7]);
    let (host, port) = db.url.host_port().expect("one host");
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_port = dead.local_addr().expect("addr").port();
    drop(dead);
    let raw = db.url.expose().replacen(
        &format!("{host}:{port}"),
        &format!("127.0.0.1:{dead_port},{host}:{port}"),
        1,
    );
    let url = bank::db::DbUrl::parse(&raw).expect("multi-host URL");
    assert_eq!(
        url.to_string(),
        raw.replace(&crate::support::password(), "***")
    );
    let run = Bank::new()
        .args(["--database-url", &raw, "balances", "--json"])
        .run();
    run.success().no_password();
    assert_eq!(run.json()[0]["balance"], 7);
}

/// libpq's URLs without a host (its defaults: PGHOST, PGPORT, a service file, the Unix socket):
/// `postgresql:///db` and `postgresql://user@/db` were refused ("it names no host", exit 2)
/// where psql takes them (found by a reviewer).
#[test]
fn a_url_without_a_host_takes_libpq_s_defaults() {
    let db = ScratchDb::migrated();
    db.accounts(&[7]);
    let (host, port) = db.url.host_port().expect("one host");
    let parsed = url::Url::parse(db.url.expose()).expect("url");
    let name = parsed.path().trim_start_matches('/').to_string();
    let user = parsed.username().to_string();
    for raw in [
        format!("postgresql:///{name}"),
        format!("postgresql://{user}@/{name}"),
    ] {
        let mut run = Bank::new().args(["--database-url", &raw, "balances", "--json"]);
        run.cmd
            .env("PGHOST", &host)
            .env("PGPORT", port.to_string())
            .env("PGUSER", &user)
            .env("PGPASSWORD", crate::support::password());
        let run = run.run();
        run.success();
        assert_eq!(run.json()[0]["balance"], 7, "{raw}");
    }
}

/// Completions and the man page come from the clap definitions, with no database.
#[test]
fn completions_and_the_man_page_need_no_database() {
    for (shell, marker) in [
        ("bash", "_bank()"),
        ("zsh", "#compdef bank"),
        ("fish", "complete -c bank"),
        ("elvish", "edit:completion:arg-completer[bank]"),
        ("powershell", "Register-ArgumentCompleter"),
    ] {
        let run = Bank::new().args(["completions", shell]).run();
        run.success();
        assert!(
            run.stdout.contains(marker),
            "{shell}: {}",
            &run.stdout[..200.min(run.stdout.len())]
        );
        assert!(run.stdout.contains("workload"), "{shell}");
    }
    let man = Bank::new().args(["man"]).run();
    man.success();
    assert!(man.stdout.starts_with(".ie"), "{}", &man.stdout[..100]);
    assert!(man.stdout.contains(".TH bank 1"), "roff title");
    assert!(man.stdout.contains("transfer"), "subcommands listed");
    // Only pages that exist: clap's `help` has none (found by a reviewer).
    assert!(!man.stdout.contains("bank\\-help"), "bank-help(1) listed");
    // The page refers to bank-seed(1) and the others: each is there to print.
    for sub in ["seed", "transfer", "workload", "doctor", "man"] {
        assert!(man.stdout.contains(&format!("bank\\-{sub}(1)")), "{sub}");
        let page = Bank::new().args(["man", sub]).run();
        page.success();
        assert!(
            page.stdout.contains(&format!(".TH bank-{sub} 1")),
            "{sub}: {}",
            &page.stdout[..200.min(page.stdout.len())]
        );
        // The footer names the program, not the command ("seed 0.1.0").
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            page.stdout.contains(&format!("\"bank {version}\"")),
            "{sub}: {}",
            &page.stdout[..200.min(page.stdout.len())]
        );
    }
    // The exit codes and the variables, in the page and in --help.
    for needle in ["Exit status", "BANK_READ_TIMEOUT", "DATABASE_URL"] {
        assert!(man.stdout.contains(needle), "{needle}");
        let help = Bank::new().args(["--help"]).run();
        assert!(help.stdout.contains(needle), "{needle}: {help:?}");
    }
    let seed = Bank::new().args(["man", "seed"]).run().stdout;
    assert!(seed.contains("accounts"), "{seed}");
    Bank::new()
        .args(["man", "sede"])
        .run()
        .fails_with(2, "no command sede");
    // An empty name is quoted, not a gap ("no command : …"; found by a helper).
    Bank::new()
        .args(["man", ""])
        .run()
        .fails_with(2, "no command '': `bank --help` lists them");
    Bank::new()
        .args(["completions", "tcsh"])
        .run()
        .fails_with(2, "invalid value 'tcsh'");
}

/// Colour only on a terminal, and never with NO_COLOR (https://no-color.org).
#[test]
fn no_color_is_respected() {
    let bank = assert_cmd::cargo::cargo_bin("bank");
    let help = |no_color: bool| {
        let mut cmd = script(&format!("{} workload --help", bank.display()));
        cmd.env("TERM", "xterm-256color").env_remove("NO_COLOR");
        if no_color {
            cmd.env("NO_COLOR", "1");
        }
        let out = cmd.output().expect("run script");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(help(false).contains('\u{1b}'), "coloured on a terminal");
    let plain = help(true);
    assert!(plain.contains("Example:"), "{plain}");
    assert!(!plain.contains('\u{1b}'), "{plain:?}");
}

#[test]
fn options_of_a_file_without_a_file_are_refused() {
    // `--batch 5` on one transfer was accepted and ignored (clap does not check `requires` on an
    // argument with a default value), leaving the user to think it meant something.
    for extra in [
        &["--batch", "5"][..],
        &["--format", "csv"],
        &["--connections", "2"],
        &["--batch-isolation", "server-default"],
    ] {
        let mut args = vec!["transfer", "--from", "{A}", "--to", "{B}", "--amount", "1"];
        args.extend_from_slice(extra);
        refused(&args, 2, "--file");
    }
}

#[test]
fn a_transfer_whose_receipt_cannot_be_written_still_says_it_was_applied() {
    // The output is a file on a full disk: the transfer committed, so exit 0 (applied) is the
    // truth, and stderr says the receipt is missing; exit 1 said "failed and not applied".
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[100, 100]);
    let id = Uuid::new_v4();
    for extra in [&[][..], &["--json"]] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
        let output = std::process::Command::new(assert_cmd::cargo::cargo_bin("bank"))
            .args([
                "--database-url",
                db.url.expose(),
                "transfer",
                "--amount",
                "7",
            ])
            .args(["--from", &ids[0].to_string(), "--to", &ids[1].to_string()])
            .args(["--id", &id.to_string()])
            .args(extra)
            .stdout(full)
            .output()
            .expect("run bank");
        let run = crate::support::Run::from(output);
        assert_eq!(run.code, 0, "{extra:?}: {run:?}");
        assert!(
            run.stderr.contains(&id.to_string()) && run.stderr.contains("applied"),
            "{extra:?}: {run:?}"
        );
    }
    assert_eq!(db.balance(ids[0]), 93, "applied once");
}

/// `init` and `reset` with their output on a full disk did all their work (the schema migrated,
/// every account deleted) and then exited 1, which says nothing was done. The work stands, as a
/// transfer's does: exit 0, and a warning that its report could not be written.
#[test]
fn init_and_reset_whose_report_cannot_be_written_say_what_they_did() {
    let db = ScratchDb::empty();
    let run = |args: &[&str]| {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
        crate::support::Run::from(
            std::process::Command::new(assert_cmd::cargo::cargo_bin("bank"))
                .args(["--database-url", db.url.expose()])
                .args(args)
                .stdout(full)
                .output()
                .expect("run bank"),
        )
    };
    let init = run(&["init"]);
    assert_eq!(init.code, 0, "{init:?}");
    assert!(init.stderr.starts_with("bank: warning: "), "{init:?}");
    assert!(init.stderr.contains("applied migration"), "{init:?}");
    db.bank().args(["doctor", "--json"]).run().success();
    db.accounts(&[5, 5]);
    let reset = run(&["reset", "--yes"]);
    assert_eq!(reset.code, 0, "{reset:?}");
    assert!(
        reset.stderr.contains("deleted 2 accounts and 0 transfers"),
        "{reset:?}"
    );
    assert_eq!(db.state().0.len(), 0);
}

/// `bank seed` with its ids on a full disk: it stops before committing accounts whose ids it
/// could not write (it created them, lost their ids and said only "cannot write output").
#[test]
fn a_seed_whose_ids_cannot_be_written_creates_nothing() {
    let db = ScratchDb::migrated();
    for extra in [&[][..], &["--json"]] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
        let output = std::process::Command::new(assert_cmd::cargo::cargo_bin("bank"))
            .args(["--database-url", db.url.expose(), "seed", "--accounts", "5"])
            .args(extra)
            .stdout(full)
            .output()
            .expect("run bank");
        let run = crate::support::Run::from(output);
        assert_eq!(run.code, 1, "{extra:?}: {run:?}");
        assert!(
            run.stderr
                .starts_with("bank: error: cannot write the ids (")
                && run.stderr.ends_with(
                    "), so the seed stopped: none of the 5 accounts was created (any id \
                     written belongs to a chunk that was rolled back)\n"
                )
                && run.stderr.lines().count() == 1,
            "{extra:?}: {run:?}"
        );
        assert_eq!(db.state().0.len(), 0, "{extra:?}");
    }
}

/// `bank seed --accounts 250000 | head -100000`: the reader leaves after the first chunk. The
/// seed stops there and says how many it created, every one of them listed; it went on with exit
/// 0 after 100,000 of 250,000 and said nothing.
#[test]
fn a_seed_whose_reader_leaves_stops_and_says_how_many_it_created() {
    use std::io::BufRead;
    let db = ScratchDb::migrated();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("bank"))
        .args([
            "--database-url",
            db.url.expose(),
            "seed",
            "--accounts",
            "250000",
        ])
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn bank");
    let stdout = child.stdout.take().expect("stdout");
    let read: Vec<String> = std::io::BufReader::new(stdout)
        .lines()
        .take(100_000)
        .map(|l| l.expect("a line"))
        .collect();
    let out = child.wait_with_output().expect("wait");
    let run = crate::support::Run::from(out);
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        run.stderr,
        "bank: error: the output was closed, so the seed stopped: 100000 of 250000 accounts \
         were created, those of the first 100000 ids written (any id written after them \
         belongs to a chunk that was rolled back)\n"
    );
    let (accounts, _) = db.state();
    assert_eq!(accounts.len(), 100_000);
    let listed: std::collections::HashSet<&str> = read
        .iter()
        .map(|l| l.split_whitespace().nth(2).expect("an id"))
        .collect();
    assert!(accounts
        .iter()
        .all(|(id, _)| listed.contains(id.to_string().as_str())));
}

/// Ctrl-C during a long seed: it stops after the chunk in hand, and what it printed is exactly
/// what it created (a JSON array that parses); killed by SIGINT's default action it could
/// commit a chunk whose ids were never written.
#[test]
fn an_interrupted_seed_lists_exactly_what_it_created() {
    use std::io::Read;
    let db = ScratchDb::migrated();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("bank"))
        .args([
            "--database-url",
            db.url.expose(),
            "seed",
            "--accounts",
            "2000000",
        ])
        .arg("--json")
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn bank");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 1];
    stdout
        .read_exact(&mut first)
        .expect("the first chunk's output");
    crate::support::interrupt(child.id());
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).expect("the rest");
    let run = crate::support::Run::from(child.wait_with_output().expect("wait"));
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.starts_with(
            "bank: error: interrupted (Ctrl-C, SIGTERM or SIGHUP), so the seed stopped: "
        ) && run.stderr.lines().count() == 1,
        "{run:?}"
    );
    let listed: serde_json::Value =
        serde_json::from_str(&format!("{}{rest}", first[0] as char)).expect("a JSON array");
    let listed: std::collections::HashSet<String> = listed
        .as_array()
        .expect("an array")
        .iter()
        .map(|a| a["id"].as_str().expect("an id").to_string())
        .collect();
    let (accounts, _) = db.state();
    assert!(accounts.len() < 2_000_000, "{}", accounts.len());
    assert_eq!(listed.len(), accounts.len());
    assert!(accounts
        .iter()
        .all(|(id, _)| listed.contains(&id.to_string())));
    assert!(
        run.stderr.contains(&format!(
            ": {} of 2000000 accounts were created",
            accounts.len()
        )),
        "{run:?}"
    );
}

#[test]
fn verify_sums_balances_past_the_range_of_one() {
    // Two accounts at the largest balance there is: each fits in INT8, their total does not,
    // and verify failed with "bigint out of range" instead of checking them.
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[i64::MAX, i64::MAX, 0]);
    db.transfer(ids[0], ids[2], 5).run().success();
    let json = db.bank().args(["verify", "--json"]).run();
    json.success();
    let total = format!("\"total_balance\":{}", 2 * i128::from(i64::MAX));
    assert!(json.stdout.contains(&total), "{json:?}");
    let text = db.bank().args(["verify"]).run();
    text.success();
    assert!(text.stdout.contains("18446744073709551614"), "{text:?}");
}

#[test]
fn no_malformed_url_or_dotenv_line_shows_its_password() {
    // Both printed the password: a libpq keyword/value string passed as the URL, and a .env
    // line that dotenvy could not parse past the URL.
    let pw = "Sekr3t-pw";
    let keyword = format!("host=127.0.0.1 port=1 user=bank password={pw} dbname=bank");
    let quoted = format!("host=127.0.0.1 password='{pw}' dbname=bank");
    for url in [keyword.as_str(), quoted.as_str()] {
        let run = Bank::new().args(["--database-url", url, "balances"]).run();
        run.fails_with(2, "malformed database URL");
        assert!(!run.stderr.contains(pw), "{run:?}");
    }
    for line in [
        format!("DATABASE_URL=postgres://bank:{pw}@127.0.0.1:1/bank x"),
        format!("export DATABASE_URL postgres://bank:{pw}@127.0.0.1:1/bank"),
        format!("postgres://bank:{pw}@127.0.0.1:1/bank"),
    ] {
        let run = Bank::new().args(["balances"]);
        std::fs::write(run.dir.path().join(".env"), format!("{line}\n")).expect("write .env");
        let run = run.run();
        run.fails_with(2, "/.env: ");
        assert!(!run.stderr.contains(pw), "{line}: {run:?}");
    }
}

/// A `.env` value holding a NUL byte (a file saved by a tool that pads with them, a paste from a
/// binary) made bank panic in `set_var`, exit 101 with a backtrace, and print the value, the
/// password in the URL included. It is a malformed line, named by its key only.
#[test]
fn a_dotenv_value_with_a_nul_byte_is_malformed_and_not_shown() {
    let db = ScratchDb::migrated();
    db.accounts(&[3]);
    let pw = "Sekr3t-pw";
    let url_line = format!("DATABASE_URL=postgres://bank:{pw}\0x@127.0.0.1:1/bank\n");
    let run = Bank::new().args(["balances"]);
    std::fs::write(run.dir.path().join(".env"), &url_line).expect("write .env");
    let run = run.run();
    run.fails_with(2, "/.env: malformed line for DATABASE_URL (line 1)");
    assert!(!run.stderr.contains(pw), "{run:?}");
    assert!(!run.stderr.contains("panicked"), "{run:?}");
    // Another key's NUL, with the URL from the environment: a warning, and the command runs.
    let mut run = Bank::new().args(["balances", "--json"]);
    run.cmd.env("DATABASE_URL", db.url.expose());
    std::fs::write(run.dir.path().join(".env"), "BANK_READ_TIMEOUT=5\0s\n").expect("write .env");
    let run = run.run();
    run.success();
    assert!(
        run.stderr
            .contains("malformed line for BANK_READ_TIMEOUT (line 1): it holds a NUL byte"),
        "{run:?}"
    );
    assert_eq!(run.json()[0]["balance"], 3, "{run:?}");
}

#[test]
fn a_read_cancelled_by_the_servers_statement_timeout_says_how_to_lift_it() {
    // A database whose statement_timeout is shorter than reading every balance takes: the
    // error said only "canceling statement due to statement timeout".
    let db = ScratchDb::migrated();
    db.bank()
        .args(["seed", "--accounts", "20000"])
        .run()
        .success();
    db.alter("statement_timeout = '1ms'");
    // Balances stream: some may be printed before the cancel.
    let cut = db.bank().args(["balances"]).run();
    assert_eq!(cut.code, 1, "{cut:?}");
    assert!(
        cut.stderr
            .contains("statement timeout (a statement_timeout set for this role or database")
            && cut.stderr.contains("PGOPTIONS='-c statement_timeout=0'"),
        "{}",
        cut.stderr
    );
    let mut lifted = db.bank().args(["balances"]);
    lifted.cmd.env("PGOPTIONS", "-c statement_timeout=0");
    assert_eq!(lifted.run().success().stdout.lines().count(), 20_001);
    db.alter("statement_timeout = 0");
    // Set by PGOPTIONS itself: the advice to set PGOPTIONS was no advice (found by a helper).
    let mut own = db.bank().args(["balances"]);
    own.cmd.env("PGOPTIONS", "-c statement_timeout=1");
    let own = own.run();
    assert_eq!(own.code, 1, "{own:?}");
    assert!(
        own.stderr
            .contains("statement timeout (a statement_timeout set by PGOPTIONS in the environment")
            && !own.stderr.contains("lifts one"),
        "{}",
        own.stderr
    );
}

/// A transfer that waits on a lock until its own deadline is cancelled by the statement_timeout
/// bank sets from `--timeout`: the message blamed "the server's statement_timeout, set for this
/// role or database" and told the user to lift it with PGOPTIONS, which changes nothing. A
/// shorter one the server sets still gets that hint.
#[test]
fn a_transfer_cancelled_by_its_own_deadline_does_not_blame_the_server() {
    use diesel::connection::SimpleConnection;
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[10, 0]);
    let mut holder = db.hold(&[ids[0]]);
    let transfer = |timeout: &str| {
        db.bank()
            .args(["transfer", "--amount", "1", "--timeout", timeout])
            .args(["--from", &ids[0].to_string(), "--to", &ids[1].to_string()])
            .run()
    };
    let own = transfer("1s");
    assert_eq!(own.code, 1, "{own:?}");
    assert!(
        // Next to the cancel it explains (it came at the end of the line, after the advice).
        own.stderr
            .contains("canceling statement due to statement timeout (bank's --timeout 1s)")
            && !own.stderr.contains("PGOPTIONS")
            && !own.stderr.contains("role or database"),
        "{own:?}"
    );
    // `--json`'s "error" gives the same hint (it had the bare words; found by a helper).
    let json = db
        .bank()
        .args(["transfer", "--amount", "1", "--timeout", "1s", "--json"])
        .args(["--from", &ids[0].to_string(), "--to", &ids[1].to_string()])
        .run();
    assert_eq!(json.code, 1, "{json:?}");
    assert!(
        json.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("statement timeout (bank's --timeout 1s)")),
        "{json:?}"
    );
    db.alter("statement_timeout = '300ms'");
    // One attempt: retried until the deadline, the last one could still be waiting when the
    // watchdog gave up ("no answer from the database").
    let server = db
        .bank()
        .args([
            "transfer",
            "--amount",
            "1",
            "--timeout",
            "2s",
            "--max-retries",
            "0",
        ])
        .args(["--from", &ids[0].to_string(), "--to", &ids[1].to_string()])
        .run();
    assert_eq!(server.code, 1, "{server:?}");
    assert!(
        server
            .stderr
            .contains("(a statement_timeout set for this role or database")
            && server.stderr.contains("PGOPTIONS='-c statement_timeout=0'"),
        "{server:?}"
    );
    db.alter("statement_timeout = 0");
    holder.batch_execute("ROLLBACK").expect("rollback");
}

#[test]
fn a_stderr_that_cannot_be_written_changes_no_exit_code() {
    // eprintln! panics when stderr cannot be written: a refused transfer with stderr on a full
    // disk (or a closed pipe) exited 101, a panic, instead of 1.
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[10, 0]);
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let status = std::process::Command::new(assert_cmd::cargo::cargo_bin("bank"))
        .args(["--database-url", db.url.expose(), "transfer"])
        .args(["--from", &ids[0].to_string(), "--to", &ids[1].to_string()])
        .args(["--amount", "99"])
        .stdout(std::process::Stdio::null())
        .stderr(full)
        .status()
        .expect("run");
    assert_eq!(status.code(), Some(1), "{status:?}");
    // clap_complete panicked on a full disk under stdout.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let status = std::process::Command::new(assert_cmd::cargo::cargo_bin("bank"))
        .args(["completions", "bash"])
        .stdout(full)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run");
    assert_eq!(status.code(), Some(1), "{status:?}");
}

#[test]
fn a_dotenv_bank_does_not_need_cannot_stop_it() {
    // A .env in the directory or a parent, written for another tool's parser, stopped every
    // command (--version and --help too) although the URL came from --database-url.
    let db = ScratchDb::migrated();
    db.accounts(&[5]);
    let run = Bank::new().args(["--version"]);
    std::fs::write(run.dir.path().join(".env"), "APP_TITLE=My App\n").expect("write .env");
    run.run().success();
    let run = Bank::new().args(["--database-url", db.url.expose(), "balances"]);
    std::fs::write(run.dir.path().join(".env"), "APP_TITLE=My App\n").expect("write .env");
    let run = run.run();
    run.success();
    assert!(
        run.stderr.contains("warning") && run.stderr.contains(".env"),
        "{run:?}"
    );
    // Needed for the URL, it is the error.
    let run = Bank::new().args(["balances"]);
    std::fs::write(run.dir.path().join(".env"), "APP_TITLE=My App\n").expect("write .env");
    run.run().fails_with(2, "/.env: ");
}

#[test]
fn an_empty_database_url_in_the_environment_does_not_hide_the_dotenv_one() {
    // `export DATABASE_URL=` (empty) kept .env's URL out, and the command said "no database URL";
    // so did a blank one (`DATABASE_URL=' '`).
    let db = ScratchDb::migrated();
    db.accounts(&[5]);
    for value in ["", "  "] {
        let mut run = Bank::new().args(["balances"]);
        run.cmd.env("DATABASE_URL", value);
        std::fs::write(
            run.dir.path().join(".env"),
            format!("DATABASE_URL={}\n", db.url.expose()),
        )
        .expect("write .env");
        assert_eq!(run.run().success().stdout.lines().count(), 2, "{value:?}");
    }
}

/// A malformed `.env` is named by its path: bank takes the first one found in the working
/// directory or a parent, so "cannot read .env" left the user looking in the wrong place.
#[test]
fn a_malformed_dotenv_is_named_by_its_path() {
    let mut run = Bank::new().args(["balances"]);
    let sub = run.dir.path().join("project").join("src");
    std::fs::create_dir_all(&sub).expect("mkdir");
    std::fs::write(run.dir.path().join(".env"), "A=1\n\nnot a line\n").expect("write .env");
    run.cmd.current_dir(&sub);
    let path = run.dir.path().join(".env");
    // Which line, by its number (found by a helper playing a new user), not its text.
    run.run().fails_with(
        2,
        &format!("cannot read {}: a malformed line (line 3)", path.display()),
    );
}

/// A `.env` that is a symbolic link to a file that is gone (a secrets file moved or not yet
/// mounted) was skipped as if there were no `.env`: bank went on without its URL ("no database
/// URL") or with another's from a parent directory. It is an error that names the link and its
/// target. A `.env` that is a named pipe (a secrets manager serving it, `mkfifo`) was skipped
/// too: it is read, as a shell's `source .env` reads it, and a directory (a Python venv called
/// `.env`) is still no `.env`.
#[test]
fn a_dotenv_that_is_a_dangling_link_is_named_and_a_pipe_is_read() {
    let db = ScratchDb::migrated();
    // A dangling link in the working directory, and a good .env in the parent: the link wins,
    // as it would were its target there.
    let mut run = Bank::new().args(["balances"]);
    let sub = run.dir.path().join("project");
    std::fs::create_dir_all(&sub).expect("mkdir");
    std::fs::write(
        run.dir.path().join(".env"),
        format!("DATABASE_URL={}\n", db.url.expose()),
    )
    .expect("write .env");
    let target = run.dir.path().join("secrets").join("bank.env");
    std::os::unix::fs::symlink(&target, sub.join(".env")).expect("symlink");
    run.cmd.current_dir(&sub);
    let run = run.run();
    run.fails_with(
        2,
        &format!(
            "cannot read {}: it is a symbolic link to {}, which does not exist",
            sub.join(".env").display(),
            target.display()
        ),
    );
    // A named pipe that a writer fills.
    let mut bank = Bank::new().args(["balances", "--json"]);
    let fifo = bank.dir.path().join(".env");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let text = format!("DATABASE_URL={}\n", db.url.expose());
    let writer = std::thread::spawn(move || std::fs::write(&fifo, text).expect("write the pipe"));
    bank.cmd.env_remove("DATABASE_URL");
    let run = bank.run();
    // Joined once bank has read it: a bank that skipped the pipe leaves the writer waiting.
    run.success();
    writer.join().expect("writer");
    assert_eq!(run.stdout, "[]\n", "{run:?}");
    // A directory is no .env: bank goes on without one.
    let bank = Bank::new().args(["balances"]);
    std::fs::create_dir_all(bank.dir.path().join(".env").join("bin")).expect("mkdir");
    bank.run().fails_with(2, "no database URL");
    // A named pipe no program writes to held up every run for good, one given its URL on the
    // command line included (a cron job would hang unseen; a reviewer's): it is waited for a
    // few seconds, then it is a .env that cannot be read, a warning when the URL comes from
    // elsewhere, an error when it was to come from the pipe.
    let url = db.url.expose().to_string();
    for given in [true, false] {
        let mut bank = match given {
            true => Bank::new().args(["--database-url", url.as_str(), "balances", "--json"]),
            false => Bank::new().args(["balances", "--json"]),
        };
        let fifo = bank.dir.path().join(".env");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        bank.cmd.timeout(std::time::Duration::from_secs(30));
        let run = bank.run();
        let words = "it is a named pipe that no program wrote to within 5s";
        match given {
            true => {
                run.success();
                assert_eq!(run.stdout, "[]\n", "{run:?}");
                assert!(run.stderr.contains(words), "{run:?}");
            }
            false => {
                run.fails_with(2, words);
            }
        }
    }
}

/// A `.env` that begins with a UTF-8 byte order mark (Notepad's "UTF-8 with BOM") is read: it
/// was "a malformed line", whose key the mark preceded.
#[test]
fn a_dotenv_with_a_byte_order_mark_is_read() {
    let db = ScratchDb::migrated();
    db.accounts(&[3]);
    let run = Bank::new().args(["balances", "--json"]);
    std::fs::write(
        run.dir.path().join(".env"),
        format!("\u{feff}DATABASE_URL={}\r\n", db.url.expose()),
    )
    .expect("write .env");
    let run = run.run();
    run.success();
    assert_eq!(run.json()[0]["balance"], 3, "{run:?}");
}

/// `bank transfer` alone named --from, --to and --amount only; a file of transfers is the
/// other way (found by a helper playing a new user).
#[test]
fn transfer_alone_names_the_file_way_too() {
    Bank::new()
        .args(["transfer"])
        .run()
        .fails_with(2, "--amount <N> (or --file PATH)");
}

/// `bank man help` printed a page for clap's `help` that named pages that do not exist
/// (bank-help-demo(1)): refused. It said "no command help: `bank --help` lists them", and
/// `bank --help` lists `help`: it now says where the help is.
#[test]
fn man_has_no_page_for_help() {
    let run = Bank::new().args(["man", "help"]).run();
    run.fails_with(2, "`help` has no page of its own");
    assert!(run.stderr.contains("`bank man` prints bank(1)"), "{run:?}");
}

/// A `.env` with a malformed line is not used at all: dotenvy had set the lines above it, so
/// `bank seed` wrote into the database a malformed `.env` named, after saying "its settings are
/// ignored" (with a URL from the environment) or refusing it (without).
#[test]
fn a_malformed_dotenv_sets_nothing() {
    let db = ScratchDb::migrated();
    let other = ScratchDb::migrated();
    let dotenv = format!(
        "DATABASE_URL={}\nBANK_READ_TIMEOUT=abc\nthis is not a line\n",
        other.url.expose()
    );
    // The URL from the environment: the .env's warning, and nothing of it used.
    let mut run = Bank::new().args(["seed"]);
    run.cmd.env("DATABASE_URL", db.url.expose());
    std::fs::write(run.dir.path().join(".env"), &dotenv).expect("write .env");
    let run = run.run();
    run.success();
    assert!(run.stderr.contains("its settings are ignored"), "{run:?}");
    assert_eq!(db.state().0.len(), 2);
    assert_eq!(other.state().0.len(), 0);
    // BANK_READ_TIMEOUT=abc above the bad line is not read either.
    let mut run = Bank::new().args(["verify"]);
    run.cmd.env("DATABASE_URL", db.url.expose());
    std::fs::write(run.dir.path().join(".env"), &dotenv).expect("write .env");
    run.run().success();
    // The URL needed from it: refused, nothing written anywhere.
    let run = Bank::new().args(["seed"]);
    std::fs::write(run.dir.path().join(".env"), &dotenv).expect("write .env");
    run.run().fails_with(2, "/.env: ");
    assert_eq!(other.state().0.len(), 0);
}

/// Two ways a password was printed: a URL given where clap expects no argument (clap's "unexpected
/// argument" quoted it), and the client key's `sslpassword=` (and a `PASSWORD=` in the wrong
/// case), which only `password=` was hidden for.
#[test]
fn no_password_is_shown_by_usage_errors_or_other_password_parameters() {
    let pw = "Sekr3t-pw";
    let url = format!("postgres://bank:{pw}@127.0.0.1:1/bank");
    for args in [vec!["doctor", url.as_str()], vec![url.as_str()]] {
        let run = Bank::new().args(&args).run();
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(!run.stderr.contains(pw), "{args:?}: {run:?}");
        assert!(
            run.stderr.contains("postgres://bank:***@127.0.0.1:1/bank"),
            "{run:?}"
        );
    }
    let db = ScratchDb::migrated();
    for param in ["sslpassword", "PASSWORD", "SSLPassword"] {
        let url = format!(
            "postgres://bank:wrong@127.0.0.1:{}/bank?sslmode=disable&{param}={pw}",
            db.url.host_port().expect("host").1
        );
        let run = Bank::new().args(["--database-url", &url, "doctor"]).run();
        assert_ne!(run.code, 0, "{param}: {run:?}");
        assert!(!run.stderr.contains(pw), "{param}: {run:?}");
        let run = Bank::new()
            .args(["--database-url", &url, "-vv", "verify"])
            .run();
        assert!(!run.stderr.contains(pw), "{param}: {run:?}");
    }
}

/// Passwords that were printed (a reviewer): under a percent-encoded key (`pass%77ord=`, which
/// libpq decodes) in a URL redacted as text; with a space, in clap's quote of the argument; and
/// in keyword/value strings read otherwise than libpq reads them (quotes and backslashes, no `&`).
#[test]
fn no_password_is_shown_however_it_is_written() {
    let urls = [
        (
            "postgres://u@127.0.0.1:1,127.0.0.1:2/db?pass%77ord=SEKRET1",
            &["SEKRET1"][..],
        ),
        (
            "postgres://u@/db?host=/nonexistent&pass%77ord=SEKRET5",
            &["SEKRET5"],
        ),
        (
            "postgres://u@127.0.0.1:1,127.0.0.1:2/db?PASS%57ORD=SEKRETKEY",
            &["SEKRETKEY"],
        ),
        (
            "postgres://u@127.0.0.1:1/db?password=SEK#RET9",
            &["SEK", "RET9"],
        ),
        (
            "postgres://u:p%40ssSEKRET@127.0.0.1:1,127.0.0.1:2/db",
            &["ssSEKRET"],
        ),
        // The '=' left out: libpq quotes the key, as written.
        ("postgres://u@127.0.0.1:1/db?passwordSEKRET", &["SEKRET"]),
        (
            "postgres://u@127.0.0.1:1,127.0.0.1:2/db?pass%77ordSEK%52ET",
            &["SEK"],
        ),
        (
            r"host=127.0.0.1 password='SEKa\'SEKb SEKc'",
            &["SEKa", "SEKb", "SEKc"],
        ),
        (r"host=127.0.0.1 password=SEKa\ SEKb", &["SEKa", "SEKb"]),
        ("host=127.0.0.1 password=SEKa&SEKb", &["SEKa", "SEKb"]),
        ("host=127.0.0.1 password = 'SEKa SEKb'", &["SEKa", "SEKb"]),
    ];
    let shows = |run: &crate::support::Run, what: &str, secrets: &[&str]| {
        for secret in secrets {
            assert!(!run.stderr.contains(secret), "{what}: {run:?}");
            assert!(!run.stdout.contains(secret), "{what}: {run:?}");
        }
        assert!(run.stderr.contains("***"), "{what}: {run:?}");
    };
    for (url, secrets) in urls {
        for args in [
            vec!["--database-url", url, "doctor"],
            vec!["--database-url", url, "doctor", "--json"],
            vec!["--database-url", url, "-vv", "verify"],
        ] {
            let run = Bank::new().args(&args).run();
            assert_ne!(run.code, 0, "{args:?}: {run:?}");
            shows(&run, url, secrets);
        }
    }
    let spaced = "postgres://u:SEKRET with space@127.0.0.1:1/db";
    for args in [vec![spaced], vec!["doctor", spaced], vec!["man", spaced]] {
        let run = Bank::new().args(&args).run();
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        shows(&run, spaced, &["SEKRET", "with space"]);
        assert!(
            run.stderr.contains("postgres://u:***@127.0.0.1:1/db"),
            "{run:?}"
        );
    }
}

/// A '?' in a password, not percent-encoded (a helper playing a new user): libpq ends the user
/// and password at the first '@' when no '/' comes before it, so it reads
/// "weird:5?a=b@127.0.0.1:…" as the password "5?a=b"; bank read host "weird", port 5 and a query,
/// accepted the URL, and every message showed it whole: "cannot connect to
/// postgres://weird:5?a=b@127.0.0.1:…/bank: … database "bank&connect_timeout=5&…" does not
/// exist" (bank's own parameters, appended after '&', ended in the database's name). With
/// other characters it was refused as a bad port, the password shown whole too.
#[test]
fn a_question_mark_in_the_password_is_refused_without_showing_it() {
    let port = server_url().host_port().map_or(5432, |(_, p)| p);
    for (pw, secret) in [
        ("5?a=b", "5?a=b"),
        ("SEKa?SEKb+SEKc;SEKd=", "SEK"),
        ("SEKa?SEKb=SEKc@SEKd", "SEK"),
        // A '/' after the '?' and before the '@': libpq finds no userinfo, the url crate an
        // empty port or a port, and both a query; libpq refused its first key, and the URL
        // was shown whole, password and all ("cannot connect to
        // postgres://weird?SEKa=SEKb/SEKc@127.0.0.1:…: invalid URI query parameter: "SEKa"").
        ("?SEKa=SEKb/SEKc", "SEK"),
        ("?SEKa=W/V$=", "SEK"),
        ("12?SEKa=SEKb/SEKc", "SEK"),
    ] {
        let url = format!("postgres://weird:{pw}@127.0.0.1:{port}/bank");
        for args in [
            vec!["--database-url", url.as_str(), "doctor"],
            vec!["--database-url", url.as_str(), "-vv", "balances"],
        ] {
            let run = Bank::new().args(&args).run();
            run.fails_with(2, "percent-encoded");
            assert!(!run.stderr.contains(secret), "{args:?}: {run:?}");
            assert!(!run.stdout.contains(secret), "{args:?}: {run:?}");
        }
    }
}

/// libpq takes `ssl=true` in a URL's query for `sslmode=require` (JDBC's spelling, which it
/// accepts on purpose): after `password=…` it was taken for the rest of a password holding '&',
/// and the URL refused as malformed ("the password parameter's value holds '&'", exit 2), where
/// psql logs in with it. It reaches libpq: on a server without TLS, libpq's own refusal.
#[test]
fn a_jdbc_ssl_parameter_after_the_password_is_no_part_of_it() {
    let db = ScratchDb::migrated();
    let (_, url) = db.teller("LOGIN");
    let mut url = url::Url::parse(&url).expect("the role's URL");
    url.set_password(None).expect("no password");
    for query in ["password=pw&ssl=true", "ssl=true&password=pw"] {
        url.set_query(Some(query));
        let id = Uuid::new_v4().to_string();
        let run = Bank::new()
            .args(["--database-url", url.as_str(), "lookup", &id])
            .run();
        assert!(!run.stderr.contains("malformed"), "{query}: {run:?}");
        assert!(!run.stderr.contains("%26"), "{query}: {run:?}");
        // Logged in (a server with TLS), or libpq's refusal (one without).
        assert!(
            run.stderr.contains("no transfer") || run.stderr.contains("SSL"),
            "{query}: {run:?}"
        );
    }
}

/// An '@' in a parameter's value (`application_name=deploy@ci`, `user=admin@server` as some
/// hosted servers name their roles): every message's URL lost its host, port, database and
/// query, and read as another host: "cannot connect to postgres://bank:***@ci: connection to
/// server at "127.0.0.1", port 1 failed" (the redaction took everything from the password to
/// the last '@' for a password).
#[test]
fn an_at_sign_in_a_parameter_leaves_the_url_shown_whole() {
    for (url, shown) in [
        (
            "postgres://bank:SEKRET9@127.0.0.1:1/bank?application_name=deploy@ci",
            "postgres://bank:***@127.0.0.1:1/bank?application_name=deploy@ci:",
        ),
        (
            "postgres://bank@127.0.0.1:1/bank?password=SEKRET9&application_name=deploy@ci",
            "postgres://bank@127.0.0.1:1/bank?password=***&application_name=deploy%40ci:",
        ),
    ] {
        let run = Bank::new().args(["--database-url", url, "balances"]).run();
        assert_eq!(run.code, 1, "{run:?}");
        assert!(run.stderr.contains(shown), "{url}: {run:?}");
        assert!(!run.stderr.contains("SEKRET9"), "{url}: {run:?}");
    }
}

/// A URL typed where another value goes reached stderr whole when bank, not clap, refused the
/// value: `bank man URL` ("no command …") and `transfer --file URL` ("cannot read …"). Every
/// line bank writes to stderr now has passwords hidden.
#[test]
fn no_password_is_shown_when_a_url_is_given_as_another_value() {
    let db = ScratchDb::migrated();
    let pw = "Sekr3t-pw";
    let url = format!("postgres://bank:{pw}@127.0.0.1:1/bank");
    for args in [
        vec!["man", url.as_str()],
        vec!["transfer", "--file", url.as_str()],
        vec!["history", url.as_str()],
        vec!["lookup", url.as_str()],
    ] {
        let mut run = Bank::new().args(&args);
        run.cmd.env("DATABASE_URL", db.url.expose());
        let run = run.run();
        assert_ne!(run.code, 0, "{args:?}: {run:?}");
        assert!(!run.stderr.contains(pw), "{args:?}: {run:?}");
        assert!(run.stderr.contains("bank:***@"), "{args:?}: {run:?}");
    }
}

/// URL parameters libpq refuses are usage errors (exit 2, one line), however libpq words its
/// refusal; and a URL that ends in `?` or `&`, which libpq accepts, works: bank appended its own
/// parameters after it and made an empty one that libpq refused ("missing key/value separator").
#[test]
fn url_parameters_libpq_refuses_are_usage_errors_and_a_trailing_separator_is_fine() {
    let db = ScratchDb::migrated();
    let url = db.url.expose().to_string();
    for bad in [
        format!("{url}?sslmode=bogus"),
        format!("{url}?foo=bar"),
        format!("{url}?sslmode"),
        format!("{url}?application_name=a%00b"),
        format!("{url}?dbname=bank%20password=x"),
    ] {
        let run = Bank::new().args(["--database-url", &bad, "verify"]).run();
        assert_eq!(run.code, 2, "{bad}: {run:?}");
        assert_eq!(run.stderr.lines().count(), 1, "{bad}: {run:?}");
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    for good in [format!("{url}{sep}"), format!("{url}{sep}sslmode=disable&")] {
        let run = Bank::new().args(["--database-url", &good, "verify"]).run();
        assert_eq!(run.code, 0, "{good}: {run:?}");
    }
}

/// libpq's message, which spans lines ("Connection refused\n\tIs the server running…"), reads
/// the same on stderr, in `transfer --json`, and in a file's text and JSON lines: it was worded
/// three ways, the file's JSON with the raw line end (a reviewer).
#[test]
fn a_server_message_reads_the_same_in_every_output() {
    let (a, b, id) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let closed = "postgres://bank:pw@127.0.0.1:1/bank";
    let quick = ["--timeout", "300ms", "--retry-base", "1ms"];
    let bank = Bank::new();
    let path = bank.dir.path().join("f.csv");
    std::fs::write(&path, format!("id,from,to,amount\n{id},{a},{b},1\n")).expect("file");
    let path = path.to_str().expect("utf-8").to_string();
    let one = ["transfer", "--from", &a.to_string(), "--to", &b.to_string()]
        .map(String::from)
        .to_vec();
    let one = [
        one,
        ["--amount", "1", "--id", &id.to_string()]
            .map(String::from)
            .to_vec(),
    ]
    .concat();
    let wanted = "Connection refused; Is the server running";
    for (args, on_stdout) in [
        (one.clone(), false),
        ([one, vec!["--json".into()]].concat(), true),
        (vec!["transfer".into(), "--file".into(), path.clone()], true),
        (
            vec!["transfer".into(), "--file".into(), path, "--json".into()],
            true,
        ),
    ] {
        let run = Bank::new()
            .args(["--database-url", closed])
            .args(&args)
            .args(quick)
            .run();
        assert_eq!(run.code, 3, "{args:?}: {run:?}");
        let text = if on_stdout { &run.stdout } else { &run.stderr };
        assert!(text.contains(wanted), "{args:?}: {run:?}");
        assert!(
            !text.contains("\\n") && !text.contains('\t'),
            "{args:?}: {run:?}"
        );
    }
}

/// A URL libpq refuses reaches no database, and nor does one naming a database that is not
/// there: nothing of an earlier run can be on its way to commit through either. A transfer with
/// `--id` said "may or may not have been applied" (exit 3, "the database refused it") of both
/// (found by a reviewer); it is a usage error (exit 2) and a failure (exit 1), as without `--id`
/// and as a file says.
#[test]
fn a_url_that_reaches_no_database_is_no_unknown_outcome_with_an_id() {
    let db = ScratchDb::migrated();
    let url = db.url.expose().to_string();
    let sep = if url.contains('?') { '&' } else { '?' };
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let id = Uuid::new_v4().to_string();
    let mut missing = url::Url::parse(&url).expect("url");
    missing.set_path("/no_such_database_here");
    // A host list libpq's URI parser refuses (a character after an IPv6 address's ']'): it
    // was retried 31 times as a lost connection, and its message showed the parameters bank
    // adds to the URL (a reviewer).
    let authority = url.split('/').nth(2).expect("authority").to_string();
    let refused_hosts = url.replacen(&authority, &format!("{authority},[::1]x:5"), 1);
    for (bad, code) in [
        (format!("{url}{sep}sslmode=bogus"), 2),
        // libpq decodes a key's %XX: the URL's own sslmode (it was taken for PGSSLMODE's, and
        // a given id said unknown, exit 3).
        (format!("{url}{sep}ssl%6Dode=bogus"), 2),
        (format!("{url}{sep}target%5Fsession_attrs=bogus"), 2),
        (format!("{url}{sep}connect_timeout=abc"), 2),
        // Retried as a lost connection until --timeout: an address libpq cannot parse.
        (format!("{url}{sep}hostaddr=notanip"), 2),
        (refused_hosts, 2),
        (missing.to_string(), 1),
    ] {
        for mode in ["transaction", "single-statement"] {
            for with_id in [false, true] {
                let mut args = vec!["--database-url".to_string(), bad.clone()];
                args.extend(["transfer", "--mode", mode, "--retry-base", "1ms"].map(String::from));
                args.extend(["--from".into(), a.to_string(), "--to".into(), b.to_string()]);
                args.extend(["--amount", "1"].map(String::from));
                if with_id {
                    args.extend(["--id".to_string(), id.clone()]);
                }
                let run = Bank::new().args(&args).run();
                assert_eq!(run.code, code, "{bad} {mode} id={with_id}: {run:?}");
                assert_eq!(run.stderr.lines().count(), 1, "{bad}: {run:?}");
                assert!(!run.stderr.contains("may or may not"), "{bad}: {run:?}");
                assert!(!run.stderr.contains("keepalives"), "{bad}: {run:?}");
                run.no_password();
                // With --json, a usage error (exit 2) prints nothing on stdout, as the README
                // says; a JSON line said "failed" (found by a reviewer).
                args.push("--json".into());
                let run = Bank::new().args(&args).run();
                assert_eq!(run.code, code, "{bad} {mode} --json: {run:?}");
                if code == 2 {
                    assert_eq!(run.stdout, "", "{bad} {mode} --json: {run:?}");
                }
            }
        }
        let bank = Bank::new();
        let path = bank.dir.path().join("f.csv");
        std::fs::write(&path, format!("id,from,to,amount\n{id},{a},{b},1\n")).expect("file");
        let run = bank
            .args(["--database-url", &bad, "transfer", "--file"])
            .args([path.to_str().expect("utf-8")])
            .run();
        assert_eq!(run.code, code, "{bad} file: {run:?}");
    }
    // A multi-host URL's "does not exist" is about the host that answered: an earlier run may
    // have reached another, so with an id it stays unknown (found by a reviewer).
    let host = missing.host_str().expect("host").to_string();
    let port = missing.port().unwrap_or(5432);
    let several = missing.as_str().replacen(
        &format!("{host}:{port}"),
        &format!("{host}:{port},{host}:{port}"),
        1,
    );
    assert!(several.contains(','), "{several}");
    let run = Bank::new()
        .args([
            "--database-url",
            &several,
            "transfer",
            "--retry-base",
            "1ms",
        ])
        .args([
            "--from",
            &a.to_string(),
            "--to",
            &b.to_string(),
            "--amount",
            "1",
        ])
        .args(["--id", &id, "--timeout", "3s"])
        .run();
    assert_eq!(run.code, 3, "{several}: {run:?}");
    run.no_password();
}

/// `reset --yes` while another client writes transfers: a transfer landing between the drain
/// of the ledger and the delete of the accounts failed it with the raw foreign-key error. It
/// drains again and finishes; never the raw error.
#[test]
fn a_reset_during_transfers_finishes() {
    for iso in crate::support::Iso::BOTH {
        reset_during_transfers(iso);
    }
}

fn reset_during_transfers(iso: crate::support::Iso) {
    let db = ScratchDb::migrated_at(iso);
    db.accounts(&[1_000_000; 20]);
    let writer = {
        let bank = db
            .bank()
            .args(["workload", "--accounts", "20", "--reuse-accounts"])
            .args([
                "--concurrency",
                "4",
                "--duration",
                "3s",
                "--mode",
                "single-statement",
            ]);
        std::thread::spawn(move || bank.run())
    };
    let mut conn = db.conn();
    while crate::support::transfers_so_far(&mut conn) < 100 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let run = db.bank().args(["reset", "--yes"]).run();
    assert!(
        !run.stderr.contains("violates foreign key"),
        "{iso:?}: {run:?}"
    );
    assert_eq!(run.code, 0, "{iso:?}: {run:?}");
    // The workload fails once its accounts are gone; what it wrote before went with them.
    let _ = writer.join().expect("writer");
    assert_eq!(db.state().0, vec![]);
}

/// `transfer --file -` on a terminal, and one Ctrl-D on an empty input: it waited for a second
/// one (the format was guessed from a first read, and the file read again). Now one is enough.
#[test]
fn one_ctrl_d_ends_an_empty_file_typed_on_a_terminal() {
    use std::io::Write;
    use std::process::Stdio;
    let db = ScratchDb::migrated();
    let bank = assert_cmd::cargo::cargo_bin("bank");
    let cmd = format!(
        "{} --database-url '{}' transfer --file -",
        bank.display(),
        db.url.expose()
    );
    let mut child = script(&cmd)
        .env_remove("DATABASE_URL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run script");
    let mut stdin = child.stdin.take().expect("stdin");
    std::thread::sleep(std::time::Duration::from_millis(500));
    stdin.write_all(b"\x04").expect("Ctrl-D");
    stdin.flush().expect("flush");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if started.elapsed() > std::time::Duration::from_secs(5) {
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    if status.is_none() {
        let _ = child.kill();
    }
    drop(stdin);
    let out = child.wait_with_output().expect("output");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{shown}");
    assert!(shown.contains("no header"), "{shown}");
}

/// `bank --help > /dev/full` (and --version) said nothing and exited 0: the help was lost as a
/// man page on a full disk is, which exits 1. A reader that leaves early is still a normal end.
#[test]
fn a_help_that_cannot_be_written_is_a_failure() {
    for args in [&["--help"][..], &["--version"], &["seed", "--help"]] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
        let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("bank"))
            .args(args)
            .stdout(full)
            .output()
            .expect("run bank");
        let run = crate::support::Run::from(out);
        assert_eq!(run.code, 1, "{args:?}: {run:?}");
        assert!(
            run.stderr.contains("cannot write output"),
            "{args:?}: {run:?}"
        );
    }
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("bank"))
        .arg("--help")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

/// A bad value from a BANK_* variable named the flag only ("invalid value '-1s' for
/// '--timeout'"), which the user never typed: the variable is named too.
#[test]
fn a_bad_value_from_the_environment_names_its_variable() {
    let db = ScratchDb::migrated();
    let mut run = db.bank().args(["verify"]);
    run.cmd.env("BANK_READ_TIMEOUT", "-1s");
    let run = run.run();
    run.fails_with(2, "(from BANK_READ_TIMEOUT, in the environment or .env)");
    // Typed on the command line, the flag is what is wrong.
    let mut run = db.bank().args(["verify", "--timeout", "-1s"]);
    run.cmd.env("BANK_READ_TIMEOUT", "-1s");
    let run = run.run();
    assert_eq!(run.code, 2, "{run:?}");
    assert!(!run.stderr.contains("BANK_READ_TIMEOUT"), "{run:?}");
}

/// A typo in a command or a flag: clap's "did you mean" was cut with the rest of its message,
/// and every usage error sent the user to `bank --help`, which does not list a command's flags
/// (found by a reviewer). One line still, with the suggestion and the command's own help.
#[test]
fn a_typo_gets_the_suggestion_and_the_command_s_help() {
    for (args, wanted) in [
        (
            vec!["balanse"],
            ["did you mean 'balances'?", "(see bank --help)"],
        ),
        (
            vec!["transfer", "--frm", "x"],
            ["did you mean '--from'?", "(see bank transfer --help)"],
        ),
        (
            vec!["seed", "--balance", "5"],
            ["--accounts", "(see bank seed --help)"],
        ),
        // The uuid crate's reason alone ("invalid length: found 1") did not say a UUID was due.
        (
            vec!["transfer", "--from", "a", "--to", "b", "--amount", "1"],
            ["not a UUID", "one looks like"],
        ),
        (vec!["history", "xyz"], ["not a UUID", "one looks like"]),
        // A bad value (clap's message has no usage block) sent the user to `bank --help`.
        (
            vec![
                "transfer",
                "--from",
                "00000000-0000-4000-8000-000000000001",
                "--to",
                "00000000-0000-4000-8000-000000000002",
                "--amount",
                "0",
            ],
            ["--amount", "(see bank transfer --help)"],
        ),
        (
            vec!["--verbose", "seed", "--accounts", "x"],
            ["--accounts", "(see bank seed --help)"],
        ),
        // Found by a reviewer: no command printed the whole help on stderr; a workload without
        // its length named only --duration; --balance was ignored with --reuse-accounts.
        (
            vec![],
            [
                "no command given: one of demo, init, seed",
                "(see bank --help)",
            ],
        ),
        (vec!["workload"], ["--duration", "--transfers"]),
        (
            vec![
                "workload",
                "--reuse-accounts",
                "--balance",
                "5",
                "--transfers",
                "1",
            ],
            ["--balance", "--reuse-accounts"],
        ),
    ] {
        let run = Bank::new().args(&args).run();
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert_eq!(run.stderr.lines().count(), 1, "{args:?}: {run:?}");
        for w in wanted {
            assert!(run.stderr.contains(w), "{args:?} wants {w}: {run:?}");
        }
    }
}

/// Ctrl-C (or SIGTERM) during a reset: it deletes in committed batches, so stopped part-way it
/// must say how far it got and that running it again finishes it, as its README promises. It
/// was killed without a word, the ledger gone and the accounts left (found by a helper playing
/// a new user). Here the reset waits on an account another session holds; Ctrl-C comes; the
/// holder lets go; the reset stops after that batch.
#[test]
fn reset_stopped_by_ctrl_c_says_how_far_it_got() {
    use diesel::connection::SimpleConnection;
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[100, 100]);
    db.transfer(ids[0], ids[1], 10).run().success();
    let mut holder = db.hold(&[ids[0]]);
    let url = db.url.expose().to_string();
    let child = crate::support::spawn_bank(&["--database-url", &url, "reset", "--yes"]);
    crate::support::wait_for_lock_wait(&db);
    crate::support::interrupt(child.id());
    std::thread::sleep(std::time::Duration::from_millis(300));
    holder.batch_execute("ROLLBACK").expect("rollback");
    let run = crate::support::Run::from(child.wait_with_output().expect("wait"));
    run.fails_with(1, "reset stopped after deleting");
    assert!(run.stderr.contains("run it again to finish"), "{run:?}");
    assert!(run.stderr.contains("interrupted"), "{run:?}");
    db.bank().args(["reset", "--yes"]).run().success();
    assert_eq!(db.state(), (vec![], 0));
}

/// A reset stopped part-way, with no other client writing, then the rerun a user makes of a file
/// whose run was cut short (what a rerun is for): the ledger rows the reset had deleted while
/// their accounts stayed were applied a second time, every line `applied` again and the money
/// moved twice (found by a helper playing a new user: Ctrl-C on a reset of 10,500 transfers,
/// then the file again, 10,000 lines applied again). The reset sets every balance to 0 before
/// the first ledger row goes, so the rerun is refused and moves nothing. Here the reset's
/// first ledger batch waits on a row another session holds; Ctrl-C comes; the holder lets go;
/// the reset stops after that batch, every ledger row gone and the accounts left.
#[test]
fn a_file_rerun_after_a_reset_stopped_part_way_applies_nothing_again() {
    use diesel::connection::SimpleConnection;
    for iso in crate::support::Iso::BOTH {
        let db = ScratchDb::migrated_at(iso);
        let ids = db.accounts(&[1000, 1000]);
        let file: String = std::iter::once("id,from,to,amount\n".to_string())
            .chain((0..3).map(|_| format!("{},{},{},100\n", Uuid::new_v4(), ids[0], ids[1])))
            .collect();
        let url = db.url.expose().to_string();
        let first = crate::support::run_file(&url, "pay.csv", &file, &[]);
        first.success();
        let mut holder = db.conn();
        holder
            .batch_execute("BEGIN; SELECT id FROM transfers FOR UPDATE")
            .expect("the ledger held");
        let child = crate::support::spawn_bank(&["--database-url", &url, "reset", "--yes"]);
        crate::support::wait_for_lock_wait(&db);
        crate::support::interrupt(child.id());
        std::thread::sleep(Duration::from_millis(300));
        holder.batch_execute("ROLLBACK").expect("rollback");
        let run = crate::support::Run::from(child.wait_with_output().expect("wait"));
        run.fails_with(1, "reset stopped after deleting 0 accounts and 3 transfers");
        let before = db.state();
        let rerun = crate::support::run_file(&url, "pay.csv", &file, &[]);
        let outcomes = crate::support::json_outcomes(&rerun);
        assert_eq!(outcomes.len(), 3, "{iso:?}: {rerun:?}");
        assert!(
            outcomes.iter().all(|o| o != "applied" && o != "unknown"),
            "{iso:?}: applied again after a reset stopped part-way: {rerun:?}"
        );
        assert_eq!(db.state(), before, "{iso:?}: {rerun:?}");
        db.bank().args(["reset", "--yes"]).run().success();
        assert_eq!(db.state(), (vec![], 0));
    }
}

/// Ctrl-C while the demo's transfer waits (another session holds the ledger): the demo removes
/// the accounts it created and says so. It was killed without a word and left them, 1,250 of
/// opening money nobody could find (found by a helper playing a new user).
#[test]
fn demo_stopped_by_ctrl_c_removes_what_it_created() {
    use diesel::connection::SimpleConnection;
    let db = ScratchDb::migrated();
    let before = db.state();
    let mut holder = db.conn();
    holder
        .batch_execute("BEGIN; LOCK TABLE transfers IN EXCLUSIVE MODE")
        .expect("lock");
    let url = db.url.expose().to_string();
    let child = crate::support::spawn_bank(&["--database-url", &url, "demo"]);
    crate::support::wait_for_lock_wait(&db);
    crate::support::interrupt(child.id());
    std::thread::sleep(std::time::Duration::from_millis(300));
    holder.batch_execute("ROLLBACK").expect("rollback");
    let run = crate::support::Run::from(child.wait_with_output().expect("wait"));
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.contains("Created accounts"), "{run:?}");
    let err: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(err.len(), 1, "{run:?}");
    assert!(
        err[0].contains("interrupted") && err[0].contains("removed"),
        "{run:?}"
    );
    assert_eq!(db.state(), before, "{run:?}");
}

/// The demo's cleanup after a Ctrl-C meets a conflict of the moment: the transfer it gave up
/// on may still hold its locks on the server, or another session the table, and the server's
/// `lock_timeout` (or its deadlock detector) rolls the cleanup back. It runs again, like every
/// other transaction of bank's, until its deadline: it failed at once ("could not remove what it
/// created (database error: deadlock detected)"; a CI run, and here with a lock timeout).
#[test]
fn demo_cleanup_held_up_for_a_moment_runs_again() {
    use diesel::connection::SimpleConnection;
    for iso in crate::support::Iso::BOTH {
        let db = ScratchDb::migrated_at(iso);
        let before = db.state();
        db.alter("lock_timeout = '100ms'");
        let mut holder = db.conn();
        holder
            .batch_execute("BEGIN; LOCK TABLE transfers IN EXCLUSIVE MODE")
            .expect("lock");
        let url = db.url.expose().to_string();
        let child =
            crate::support::spawn_bank(&["--database-url", &url, "demo", "--timeout", "10s"]);
        crate::support::wait_for_lock_wait(&db);
        crate::support::interrupt(child.id());
        // Longer than the lock timeout: the cleanup's first attempt meets it.
        std::thread::sleep(std::time::Duration::from_millis(700));
        holder.batch_execute("ROLLBACK").expect("rollback");
        let run = crate::support::Run::from(child.wait_with_output().expect("wait"));
        assert_eq!(run.code, 1, "{iso:?}: {run:?}");
        let err: Vec<&str> = run.stderr.lines().collect();
        assert_eq!(err.len(), 1, "{iso:?}: {run:?}");
        assert!(
            err[0].contains("interrupted") && err[0].contains("removed what it created"),
            "{iso:?}: {run:?}"
        );
        assert_eq!(db.state(), before, "{iso:?}: {run:?}");
    }
}

/// A reset that hears nothing from the database (a frozen server; here a batch waiting on a row
/// another session holds, which looks the same from the client) gives up after `--timeout` and
/// says how far it got. It waited forever on a SIGSTOPped server (found by a helper playing a
/// new user).
#[test]
fn reset_gives_up_on_a_database_that_does_not_answer() {
    use diesel::connection::SimpleConnection;
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[100, 100]);
    let mut holder = db.hold(&[ids[0]]);
    let started = std::time::Instant::now();
    let run = db.bank().args(["reset", "--yes", "--timeout", "1s"]).run();
    let took = started.elapsed();
    holder.batch_execute("ROLLBACK").expect("rollback");
    run.fails_with(1, "no answer from the database within 1s");
    assert!(
        run.stderr
            .contains("reset stopped after deleting 0 accounts and 0 transfers")
            && run.stderr.contains("run it again to finish"),
        "{run:?}"
    );
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
    assert_eq!(db.state().0.len(), 2);
}

/// A read whose `--timeout` runs out while it is still connecting exits 1 after its line, every
/// time: the C library's exit handlers (OpenSSL's, loaded by libpq) freed what the connecting
/// thread was using, and `balances --timeout 2ms` died of SIGSEGV in about one run in ten
/// (found by a helper playing a new user).
#[test]
fn a_read_timing_out_while_it_connects_exits_cleanly() {
    let db = ScratchDb::migrated();
    db.accounts(&[1, 2]);
    for n in 0..30 {
        for command in ["balances", "verify", "doctor"] {
            let run = db.bank().args([command, "--timeout", "2ms"]).run();
            // 0: it was quicker than that; -1: a signal ended it.
            assert!(run.code == 1 || run.code == 0, "{command} #{n}: {run:?}");
        }
    }
}

/// A demo that stops before it creates anything (no schema, no server) says only why: it said
/// it "could not remove" two accounts it never made, and named them (found by a reviewer).
#[test]
fn a_demo_that_created_nothing_names_no_accounts() {
    let db = ScratchDb::empty();
    db.bank()
        .args(["demo"])
        .run()
        .fails_with(1, "database not migrated: run `bank init` first");
    let run = Bank::new()
        .args(["--database-url", "postgres://u:p@127.0.0.1:1/x", "demo"])
        .run();
    assert_eq!(run.code, 1, "{run:?}");
    assert!(!run.stderr.contains("accounts"), "{run:?}");
}

/// A Ctrl-C typed at a terminal while a file waits (here on a lock; on a frozen server, up to
/// its --timeout): the run said nothing and seemed stuck, what is in flight finishing first.
/// It now says so at once, and that a second Ctrl-C quits. `script` (util-linux, in every
/// Debian) gives the run a terminal, and the Ctrl-C goes in as the byte a keyboard sends.
#[test]
fn a_ctrl_c_at_a_terminal_says_what_the_run_waits_for() {
    use std::io::Write;
    let db = ScratchDb::migrated();
    let [a, b] = db.accounts(&[100, 0])[..] else {
        panic!("two accounts")
    };
    let bank = Bank::new();
    let file = bank.dir.path().join("pay.csv");
    std::fs::write(
        &file,
        format!("id,from,to,amount\n{},{a},{b},5\n", Uuid::new_v4()),
    )
    .expect("write the file");
    let command = format!(
        "exec '{}' --database-url '{}' transfer --file '{}' --timeout 20s",
        env!("CARGO_BIN_EXE_bank"),
        db.url.expose(),
        file.display()
    );
    let holder = db.hold(&[a]);
    let mut child = script(&command)
        .env_remove("DATABASE_URL")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("script");
    crate::support::wait_for_lock_wait(&db);
    let mut keyboard = child.stdin.take().expect("stdin");
    keyboard.write_all(b"\x03").expect("Ctrl-C");
    keyboard.flush().expect("flush");
    std::thread::sleep(Duration::from_millis(500));
    drop(holder);
    let out = child.wait_with_output();
    drop(keyboard);
    let out = out.expect("wait");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        screen.contains("what is in flight") && screen.contains("a second Ctrl-C quits"),
        "{screen:?}"
    );
    // What was in flight finished: the line was applied, and said so.
    assert!(screen.contains("applied"), "{screen:?}");
    assert_eq!(db.balance(b), 5);
}

/// A character a terminal shows as nothing, typed into a flag's value, went to stderr as it was
/// (clap's message quotes the value, and uuid's names the character): "found `` at 0" about
/// a value that looked empty (found by a helper playing a new user). It is shown escaped, as a
/// file's values are.
#[test]
fn an_invisible_character_in_a_flag_s_value_is_shown_escaped() {
    let run = Bank::new()
        .args([
            "transfer", "--from", "\u{200b}", "--to", "x", "--amount", "5",
        ])
        .run();
    run.fails_with(2, "'\\u{200b}'");
    assert!(!run.stderr.contains('\u{200b}'), "{run:?}");
}

/// An argument that is not UTF-8 next to a usage error (a Latin-1 file name, a stray byte in a
/// URL) panicked, exit 101, and the panic printed the argument raw: a URL's password with it
/// (found by a helper playing a new user). It is a usage error, one line, exit 2.
#[test]
fn an_argument_that_is_not_utf8_is_a_usage_error_not_a_panic() {
    use std::os::unix::ffi::OsStrExt;
    let secret = "TopSecret99";
    let url = format!("postgres://bank:{secret}@127.0.0.1:1/bank\u{ff}");
    let mut url = url.into_bytes();
    // The last character as the single Latin-1 byte 0xff, not UTF-8.
    url.truncate(url.len() - 2);
    url.push(0xff);
    let bytes: [&[u8]; 3] = [&url, b"\xff", b"/tmp/x\xff.csv"];
    let [url, byte, path] = bytes.map(|b| std::ffi::OsStr::from_bytes(b).to_os_string());
    let cases: [Vec<std::ffi::OsString>; 4] = [
        vec!["--database-url".into(), url.clone(), "verify".into()],
        vec![byte.clone()],
        vec![
            "transfer".into(),
            "--file".into(),
            path.clone(),
            "--timeout".into(),
            "abc".into(),
        ],
        vec![
            "workload".into(),
            "--report".into(),
            path,
            "--accounts".into(),
            "1".into(),
        ],
    ];
    for args in cases {
        let run = Bank::new().args(&args).run();
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert_eq!(run.stderr.lines().count(), 1, "{args:?}: {run:?}");
        assert!(!run.stderr.contains(secret), "{args:?}: {run:?}");
        assert!(!run.stderr.contains("panicked"), "{args:?}: {run:?}");
    }
    // Which argument: clap said only "invalid UTF-8 was detected in one or more arguments"
    // (found by a helper).
    let run = Bank::new()
        .args([
            std::ffi::OsStr::new("transfer"),
            std::ffi::OsStr::new("--from"),
            &byte,
        ])
        .run();
    run.fails_with(2, "the value of '--from' is not valid UTF-8: \"\\xFF\"");
    // After a flag that takes no value, the argument is not its value (`-v` was named).
    let run = Bank::new()
        .args([
            std::ffi::OsStr::new("man"),
            std::ffi::OsStr::new("-v"),
            &byte,
        ])
        .run();
    run.fails_with(2, "argument 3 is not valid UTF-8: \"\\xFF\"");
}

/// The server's own words reached stderr raw: a trigger's exception with an escape sequence
/// recoloured the terminal, and a right-to-left override reordered the rest of the line
/// (found by a helper playing a new user; `--json` escaped them). Every stderr line, the
/// error's and `-v`'s log lines, shows them escaped, as a file's values are.
#[test]
fn control_characters_in_the_server_s_words_are_shown_escaped() {
    let db = ScratchDb::migrated();
    let [a, b] = db.accounts(&[100, 0])[..] else {
        panic!("two accounts")
    };
    diesel::connection::SimpleConnection::batch_execute(
        &mut db.conn(),
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           RAISE EXCEPTION E'no \\x1b[31mred\\x1b[0m here \\u202Eevil'; END $$; \
         CREATE TRIGGER refuse BEFORE INSERT ON transfers \
           FOR EACH ROW EXECUTE FUNCTION refuse()",
    )
    .expect("the trigger");
    let (a, b) = (a.to_string(), b.to_string());
    let run = db
        .bank()
        .args(["-v", "transfer", "--from", &a, "--to", &b, "--amount", "5"])
        .run();
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("no \\u{1b}[31mred"), "{run:?}");
    assert!(
        !run.stderr.contains('\u{1b}') && !run.stderr.contains('\u{202e}'),
        "{run:?}"
    );
    // The same words in the results written to stdout as text: a file's lines, the workload's
    // report (they reached the terminal raw; found by a reviewer).
    let bank = db.bank();
    let file = bank.dir.path().join("f.csv");
    std::fs::write(
        &file,
        format!("id,from,to,amount\n{},{a},{b},5\n", uuid::Uuid::new_v4()),
    )
    .expect("the file");
    let lines = bank.args(["transfer", "--file"]).args([&file]).run();
    let workload = db
        .bank()
        .args(["workload", "--accounts", "2", "--duration", "300ms"])
        .run();
    for run in [lines, workload] {
        assert!(run.stdout.contains("no \\u{1b}[31mred"), "{run:?}");
        assert!(
            !run.stdout.contains('\u{1b}') && !run.stdout.contains('\u{202e}'),
            "{run:?}"
        );
    }
}

/// A file-size limit on the output (`ulimit -f`, a scheduler's quota): the kernel killed bank
/// with SIGXFSZ at its first write, after the transfers committed and before a word was said,
/// exit 153 (found by a fault-injecting helper). The write now fails as on a full disk: a
/// transfer says it was applied and its receipt could not be written, a file says its results
/// could not be written, each with its exit code.
#[test]
fn a_file_size_limit_on_the_output_is_said_not_a_kill() {
    let db = ScratchDb::migrated();
    let [a, b] = db.accounts(&[100, 0])[..] else {
        panic!("two accounts")
    };
    let bank = Bank::new();
    let file = bank.dir.path().join("f.csv");
    std::fs::write(
        &file,
        format!("id,from,to,amount\n{},{a},{b},5\n", uuid::Uuid::new_v4()),
    )
    .expect("the file");
    let out = bank.dir.path().join("out");
    let limited = |args: &[&str]| -> crate::support::Run {
        std::process::Command::new("sh")
            .arg("-c")
            .arg("ulimit -f 0; exec \"$0\" \"$@\" > \"$OUT\"")
            .arg(assert_cmd::cargo::cargo_bin("bank"))
            .args(["--database-url", db.url.expose()])
            .args(args)
            .env("OUT", &out)
            .output()
            .expect("sh")
            .into()
    };
    let (a, b) = (a.to_string(), b.to_string());
    let one = limited(&["transfer", "--from", &a, "--to", &b, "--amount", "5"]);
    assert_eq!(one.code, 0, "{one:?}");
    assert!(
        one.stderr.contains("receipt could not be written"),
        "{one:?}"
    );
    let path = file.to_str().expect("utf-8 path");
    let lines = limited(&["transfer", "--file", path, "--json"]);
    assert_eq!(lines.code, 1, "{lines:?}");
    assert!(
        lines.stderr.contains("cannot write the results"),
        "{lines:?}"
    );
    assert_eq!(db.balance(uuid::Uuid::parse_str(&a).expect("uuid")), 90);
}

/// A man page's examples and notes came out justified and hyphenated under a heading named
/// EXTRA: `--histogram la-` / `tency.hlog`, which cannot be copied (found by a helper playing a
/// new user). They are set as typed (no fill, minus signs as such) under EXAMPLES or NOTES.
#[test]
fn man_pages_show_examples_as_typed() {
    let page = Bank::new().args(["man", "workload"]).run();
    page.success();
    assert!(!page.stdout.contains(".SH EXTRA"), "{}", page.stdout);
    let examples = page
        .stdout
        .split(".SH EXAMPLES")
        .nth(1)
        .unwrap_or_else(|| panic!("no EXAMPLES section: {}", page.stdout));
    assert!(examples.trim_start().starts_with(".nf"), "{examples}");
    assert!(examples.contains("\\-\\-histogram"), "{examples}");
    let root = Bank::new().args(["man"]).run();
    assert!(root.stdout.contains(".SH NOTES"), "{}", root.stdout);
    assert!(!root.stdout.contains(".SH EXTRA"), "{}", root.stdout);
}

/// Ctrl-C on a command that only reads (here `balances` writing into a pipe nobody reads) killed
/// it with no word, exit 130, where every other command says what it did (found by a helper
/// playing a new user). One line now, the same exit code, nothing changed. SIGTERM and SIGHUP
/// (a terminal closed) the same, the line naming them.
#[test]
fn ctrl_c_on_a_read_says_so_in_one_line() {
    use std::process::{Command, Stdio};
    let db = ScratchDb::migrated();
    db.bank()
        .args(["seed", "--accounts", "20000"])
        .run()
        .success();
    let before = db.state();
    for (args, signal) in [
        (&["balances"][..], "INT"),
        (&["balances", "--json"], "INT"),
        (&["balances"], "TERM"),
        (&["balances"], "HUP"),
    ] {
        // SIGHUP at its default whatever this suite was started under: under `nohup` it stays
        // ignored in bank, as meant, and the hang-up case waited forever (`.ci/run` run under
        // nohup; `env --default-signal`, coreutils 8.31 and later, execs bank in its place).
        let mut child = Command::new("env")
            .arg("--default-signal=HUP")
            .arg(assert_cmd::cargo::cargo_bin("bank"))
            .args(["--database-url", db.url.expose()])
            .args(args)
            .env_remove("DATABASE_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bank");
        // Its output fills the pipe (20,000 rows), and it waits to write the rest (a fixed
        // 1.5 s could come before its handler was installed on a loaded machine).
        crate::support::wait_until_blocked(child.id(), crate::support::Blocked::WritingStdout);
        crate::support::signal(child.id(), signal);
        let mut stderr = String::new();
        use std::io::Read;
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut stderr)
            .expect("read stderr");
        let status = child.wait().expect("wait");
        assert_eq!(status.code(), Some(130), "{args:?}: {status:?} {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains("interrupted (Ctrl-C, SIGTERM or SIGHUP)"),
            "{args:?} {signal}: {stderr}"
        );
    }
    assert_eq!(db.state(), before);
}

/// A signal on a read whose standard output and standard error share a pipe nobody reads (`2>&1`
/// into a reader that stopped reading, as `timeout 60 bank balances 2>&1 | stuck` leaves it): the
/// handler's one line could not be written, and the handler waited for it before exiting, so
/// SIGTERM and Ctrl-C left the process running for as long as the pipe was not read (only
/// SIGKILL ended it). Blocking or non-blocking (where the wait on EAGAIN made it so), the line is
/// given a moment, and the run ends (found by a reviewer).
#[test]
fn a_signal_ends_a_read_whose_standard_error_nobody_reads() {
    use std::os::unix::net::UnixStream;
    use std::process::{Command, Stdio};
    let db = ScratchDb::migrated();
    db.bank()
        .args(["seed", "--accounts", "20000"])
        .run()
        .success();
    for non_blocking in [false, true] {
        let (reader, writer) = UnixStream::pair().expect("socket pair");
        writer.set_nonblocking(non_blocking).expect("mode");
        let stderr = writer.try_clone().expect("clone");
        let mut child = Command::new(assert_cmd::cargo::cargo_bin("bank"))
            .args(["--database-url", db.url.expose(), "balances"])
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(writer)))
            .stderr(Stdio::from(std::os::fd::OwnedFd::from(stderr)))
            .spawn()
            .expect("spawn bank");
        if non_blocking {
            // It waits on EAGAIN, sleeping between tries: no write blocks to be seen.
            std::thread::sleep(Duration::from_millis(2000));
        } else {
            crate::support::wait_until_blocked(child.id(), crate::support::Blocked::WritingStdout);
        }
        crate::support::signal(child.id(), "TERM");
        let sent = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break Some(status);
            }
            if sent.elapsed() > Duration::from_secs(10) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        drop(reader);
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(130),
            "non-blocking {non_blocking}: still running 10 s after SIGTERM"
        );
    }
}

/// A run under `nohup` (SIGHUP ignored as bank starts, here by `trap '' HUP`, as nohup does)
/// goes on when the terminal hangs up: bank's Ctrl-C handler took SIGHUP over, so a closed
/// terminal stopped the very run nohup was meant to keep going (a workload ended "interrupted",
/// a file left its lines `unknown` with exit 3, a read ended with exit 130; found by a helper
/// playing a new user). Without nohup, SIGHUP still stops a run
/// (`ctrl_c_on_a_read_says_so_in_one_line`).
#[test]
fn a_run_under_nohup_goes_on_when_the_terminal_hangs_up() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let db = ScratchDb::migrated();
    db.bank()
        .args(["seed", "--accounts", "20000"])
        .run()
        .success();
    let nohup = |args: &[&str]| {
        Command::new("sh")
            .args(["-c", "trap '' HUP; exec \"$0\" \"$@\""])
            .arg(assert_cmd::cargo::cargo_bin("bank"))
            .args(["--database-url", db.url.expose()])
            .args(args)
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bank")
    };
    let finish = |mut child: std::process::Child| {
        let mut stdout = String::new();
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut stdout)
            .expect("read stdout");
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut stderr)
            .expect("read stderr");
        let status = child.wait().expect("wait");
        (status.code(), stdout, stderr)
    };
    // A read whose output fills the pipe, hung up on while it waits to write the rest.
    let child = nohup(&["balances"]);
    crate::support::wait_until_blocked(child.id(), crate::support::Blocked::WritingStdout);
    crate::support::signal(child.id(), "HUP");
    let (code, stdout, stderr) = finish(child);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout.lines().count(),
        20_001,
        "a header and every account: {stderr}"
    );
    // A workload hung up on again and again while it runs.
    let child = nohup(&[
        "workload",
        "--accounts",
        "4",
        "--concurrency",
        "2",
        "--duration",
        "2s",
        "--json",
    ]);
    let pid = child.id();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(500));
        crate::support::signal(pid, "HUP");
    }
    let (code, stdout, stderr) = finish(child);
    assert_eq!(code, Some(0), "{stdout} {stderr}");
    assert!(stdout.contains("\"interrupted\":false"), "{stdout}");
}

/// A URL with a blank in it (a password typed with a space, a database name cut from a
/// sentence) is malformed, a usage error (exit 2) said before anything connects, without the
/// password: no test had one, so the check could go with every test passing, and the URL then
/// reached libpq, which read the blank as part of a value and failed to connect (exit 1; found
/// by a reviewer mutating `DbUrl::parse`).
#[test]
fn a_url_with_a_blank_in_it_is_malformed() {
    let db = ScratchDb::migrated();
    let url = db.url.expose();
    let pw = password();
    let with_blank = [
        url.replacen(&format!(":{pw}@"), &format!(":{pw} x@"), 1),
        format!("{url} x"),
        url.replacen(&format!(":{pw}@"), &format!(":{pw}\tx@"), 1),
    ];
    for url in with_blank {
        let run = Bank::new().args(["--database-url", &url, "balances"]).run();
        run.fails_with(2, "contains whitespace");
    }
}

/// The environment wins over `.env` (README: `.env` "without overriding what is already set"):
/// a `DATABASE_URL` exported for one database and a `.env` naming another, the exported one is
/// used. No test had both, so `.env` could override the environment with every test passing
/// (found by a reviewer mutating `load_dotenv`); a seed then wrote into the other database.
#[test]
fn the_environment_wins_over_dotenv() {
    let db = ScratchDb::migrated();
    let other = ScratchDb::migrated();
    let mut run = Bank::new().args(["seed"]);
    run.cmd.env("DATABASE_URL", db.url.expose());
    std::fs::write(
        run.dir.path().join(".env"),
        format!("DATABASE_URL={}\n", other.url.expose()),
    )
    .expect("write .env");
    run.run().success();
    assert_eq!(db.state().0.len(), 2);
    assert_eq!(other.state().0.len(), 0);
}

/// No URL anywhere, but libpq's variables set (PGHOST, PGUSER, …, as psql users have them): the
/// error said only "pass --database-url URL or set DATABASE_URL", where `postgresql:///` takes
/// libpq's defaults from them, as the README says (found by a new user). It says so, naming the
/// variables it saw; without any, the message is as before.
#[test]
fn no_url_with_libpq_s_variables_set_says_how_to_use_them() {
    let without_libpq = || {
        let mut bank = Bank::new().args(["balances"]);
        for v in [
            "PGHOST",
            "PGHOSTADDR",
            "PGPORT",
            "PGUSER",
            "PGDATABASE",
            "PGSERVICE",
        ] {
            bank.cmd.env_remove(v);
        }
        bank
    };
    let mut bank = without_libpq();
    bank.cmd.env("PGHOST", "127.0.0.1").env("PGUSER", "someone");
    let run = bank.run();
    run.fails_with(2, "no database URL");
    assert!(
        run.stderr.contains("PGHOST, PGUSER")
            && run.stderr.contains("--database-url postgresql:///"),
        "{run:?}"
    );
    let run = without_libpq().run();
    run.fails_with(2, "no database URL");
    assert!(!run.stderr.contains("postgresql:///"), "{run:?}");
}

/// A reset held up by a lock another session holds past the server's `lock_timeout` stops at
/// Ctrl-C, nothing changed: its batches ran under the transfers' retry policy, which starts new
/// attempts after Ctrl-C, so it went on until the lock was gone and then set every balance to 0
/// before it said "interrupted" (and gave up after 31 attempts, about 20 s, whatever its
/// `--timeout` said).
#[test]
fn reset_held_up_by_a_lock_stops_at_ctrl_c_with_nothing_changed() {
    use diesel::connection::SimpleConnection;
    for iso in crate::support::Iso::BOTH {
        let db = ScratchDb::migrated_at(iso);
        db.accounts(&[100, 250]);
        let before = db.state();
        db.alter("lock_timeout = '100ms'");
        let mut holder = db.conn();
        holder
            .batch_execute("BEGIN; LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
            .expect("lock");
        let url = db.url.expose().to_string();
        let child = crate::support::spawn_bank(&[
            "--database-url",
            &url,
            "reset",
            "--yes",
            "--timeout",
            "20s",
        ]);
        std::thread::sleep(std::time::Duration::from_millis(1500));
        crate::support::interrupt(child.id());
        std::thread::sleep(std::time::Duration::from_millis(700));
        holder.batch_execute("ROLLBACK").expect("rollback");
        let run = crate::support::Run::from(child.wait_with_output().expect("wait"));
        assert_eq!(run.code, 1, "{iso:?}: {run:?}");
        assert_eq!(run.stderr.lines().count(), 1, "{iso:?}: {run:?}");
        assert!(run.stderr.contains("interrupted"), "{iso:?}: {run:?}");
        assert!(!run.stderr.contains("to 0"), "{iso:?}: {run:?}");
        assert_eq!(db.state(), before, "{iso:?}: {run:?}");
    }
}

/// A listing the database fails part-way, its first rows already printed (a connection ended
/// by the server here; a `statement_timeout` in a long `balances`, found by a helper playing a
/// new user): the one error line says what was printed is incomplete, as a Ctrl-C's does. It
/// gave the database's words alone, 12,056 of 200,000 rows above them.
#[test]
fn a_listing_failed_part_way_says_its_output_is_incomplete() {
    use diesel::connection::SimpleConnection;
    let db = ScratchDb::migrated();
    // More than the sockets' buffers hold: the server is still sending when its session ends.
    db.bank()
        .args(["seed", "--accounts", "300000"])
        .run()
        .success();
    let url = db.url.expose().to_string();
    let mut child = crate::support::spawn_bank(&["--database-url", &url, "balances"]);
    // Its output unread: bank blocks writing it, the server's rows waiting behind.
    crate::support::wait_until_blocked(child.id(), crate::support::Blocked::WritingStdout);
    db.conn()
        .batch_execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{}' AND application_name LIKE 'bank%' AND pid <> pg_backend_pid()",
            db.name
        ))
        .expect("terminate");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut printed = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut printed).expect("read");
    let run = crate::support::Run::from(child.wait_with_output().expect("wait"));
    assert!(printed.starts_with("Balances at"), "{printed:.200}");
    assert!(printed.lines().count() < 300_001, "{run:?}");
    assert_eq!(run.code, 1, "{run:?}");
    let err: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(err.len(), 1, "{run:?}");
    assert!(
        err[0].ends_with("what was printed is incomplete"),
        "{run:?}"
    );
}

/// A listing the server's statement_timeout cancels once its first rows are out (the server
/// held up sending while the reader was slow): the error is the answer, and the read is not run
/// again, which would print the listing a second time under the first part. Reading again
/// whatever had been written passed every test (a mutation review of `read_again`).
#[test]
fn a_listing_cancelled_after_its_first_rows_is_not_printed_twice() {
    let db = ScratchDb::migrated();
    db.bank()
        .args(["seed", "--accounts", "300000"])
        .run()
        .success();
    db.alter("statement_timeout = '1s'");
    let url = db.url.expose().to_string();
    let mut child = crate::support::spawn_bank(&["--database-url", &url, "balances"]);
    // Its output unread: bank blocks writing it, the server's rows waiting behind, until the
    // statement_timeout has passed.
    crate::support::wait_until_blocked(child.id(), crate::support::Blocked::WritingStdout);
    std::thread::sleep(Duration::from_millis(1500));
    let mut stdout = child.stdout.take().expect("stdout");
    let mut printed = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut printed).expect("read");
    let run = crate::support::Run::from(child.wait_with_output().expect("wait"));
    db.alter("statement_timeout = 0");
    let headers = printed
        .lines()
        .filter(|l| l.starts_with("Balances at"))
        .count();
    assert_eq!(headers, 1, "{run:?}");
    assert!(printed.lines().count() < 300_001, "{run:?}");
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("statement timeout")
            && run.stderr.contains("what was printed is incomplete"),
        "{run:?}"
    );
}

/// Standard output closed (`bank balances >&-`): Rust's runtime reopens it on /dev/null, so every
/// command "wrote" its results to nothing and exited 0 (balances, verify --json, a transfer
/// --json, a file's outcomes, a workload's report). Each is refused before anything is sent:
/// one line on stderr and exit 2, nothing applied. A reader that leaves (`| head -1`) is not
/// this: there the reader chose what to see (as for ripgrep and fd).
#[test]
fn a_closed_standard_output_is_refused_before_anything_is_done() {
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[100, 0]);
    let (from, to) = (ids[0].to_string(), ids[1].to_string());
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("one.csv");
    let line = Uuid::new_v4().to_string();
    std::fs::write(&file, format!("id,from,to,amount\n{line},{from},{to},1\n")).expect("file");
    let file = file.to_str().expect("utf-8 path").to_string();
    let id = Uuid::new_v4().to_string();
    let one = ["transfer", "--from", &from, "--to", &to, "--amount", "1"];
    let workload = ["workload", "--accounts", "2", "--transfers", "2", "--json"];
    for args in [
        vec!["balances"],
        vec!["balances", "--json"],
        vec!["history", &from],
        vec!["lookup", &id],
        vec!["verify", "--json"],
        [&one[..], &["--id", &id, "--json"]].concat(),
        one.to_vec(),
        vec!["transfer", "--file", &file, "--json"],
        vec!["transfer", "--file", &file],
        workload.to_vec(),
        vec!["seed"],
        vec!["completions", "bash"],
    ] {
        let output = std::process::Command::new("sh")
            .args(["-c", "exec \"$0\" \"$@\" >&-"])
            .arg(assert_cmd::cargo::cargo_bin("bank"))
            .args(["--database-url", db.url.expose()])
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run bank");
        let run = crate::support::Run::from(output);
        run.fails_with(2, "standard output is closed");
    }
    assert_eq!(db.balance(ids[1]), 0, "nothing applied");
    assert_eq!(db.state().0.len(), 2, "no account created");
}

/// Standard output in non-blocking mode (O_NONBLOCK, which a parent such as Node.js may set on
/// the pipe it hands down) with a reader that is behind: each write the pipe cannot take yet
/// fails with EAGAIN, where a blocking pipe waits. bank took it for a failed output: a seed of
/// 20,000 accounts rolled back and exited 1, and a file stopped part-way (exit 3, its outcomes
/// lost). A slow reader is waited for, as on a blocking pipe, and sees every line once, in
/// order (found by a helper playing a new user).
#[test]
fn a_non_blocking_standard_output_with_a_slow_reader_gets_every_line() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[1_000_000, 0]);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("many.csv");
    let mut text = String::from("id,from,to,amount\n");
    for _ in 0..5000 {
        text.push_str(&format!("{},{},{},1\n", Uuid::new_v4(), ids[0], ids[1]));
    }
    std::fs::write(&file, text).expect("file");
    let file = file.to_str().expect("utf-8 path").to_string();
    // Each run's output is past a socket's buffer (about 200 KB), so the reader falls behind.
    let seed = ["seed", "--accounts", "20000"];
    let lines = ["transfer", "--file", &file, "--json"];
    for (args, want) in [(&seed[..], 20_000), (&lines[..], 5_000)] {
        let (mut reader, writer) = UnixStream::pair().expect("socket pair");
        writer.set_nonblocking(true).expect("non-blocking");
        let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("bank"))
            .args(["--database-url", db.url.expose()])
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::from(std::os::fd::OwnedFd::from(
                writer,
            )))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run bank");
        // A reader that is behind: the buffer fills, and bank's writes would block.
        std::thread::sleep(Duration::from_millis(1500));
        let mut stdout = String::new();
        reader.read_to_string(&mut stdout).expect("read stdout");
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            e.read_to_string(&mut stderr).expect("read stderr");
        }
        let status = child.wait().expect("wait");
        assert_eq!(status.code(), Some(0), "{args:?}: {stderr}");
        assert_eq!(stdout.lines().count(), want, "{args:?}: {stderr}");
        if args[0] == "transfer" {
            for (n, l) in stdout.lines().enumerate() {
                let want = format!("{{\"line\":{},", n + 2);
                assert!(l.starts_with(&want) && l.ends_with("\"applied\"}"), "{l}");
            }
        }
    }
    // Standard error into the same pipe (`2>&1`): the summary, written once the pipe is full,
    // comes out whole too (an EAGAIN part-way dropped the rest of the line).
    let mut text = String::from("id,from,to,amount\n");
    for _ in 0..5000 {
        text.push_str(&format!("{},{},{},1\n", Uuid::new_v4(), ids[0], ids[1]));
    }
    std::fs::write(&file, text).expect("file");
    let (mut reader, writer) = UnixStream::pair().expect("socket pair");
    writer.set_nonblocking(true).expect("non-blocking");
    let stderr = writer.try_clone().expect("clone");
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("bank"))
        .args([
            "--database-url",
            db.url.expose(),
            "transfer",
            "--file",
            &file,
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            writer,
        )))
        .stderr(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            stderr,
        )))
        .spawn()
        .expect("run bank");
    std::thread::sleep(Duration::from_millis(1500));
    let mut both = String::new();
    reader.read_to_string(&mut both).expect("read");
    let status = child.wait().expect("wait");
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        both.lines().last().unwrap_or_default()
    );
    assert_eq!(both.lines().count(), 5_001, "every line and the summary");
    let summary = both.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with("5000 transfers in ") && summary.ends_with(": 5000 applied"),
        "{summary}"
    );
    assert_eq!(db.state().0.len(), 20_002, "every account seeded");
    assert_eq!(db.balance(ids[1]), 10_000, "every line applied once");
}

/// Standard output open for reading only (`1</dev/null`, or a descriptor a parent left
/// read-only): every write fails with EBADF, which Rust's standard output takes for a closed
/// descriptor and swallows. A seed created accounts whose ids nobody saw, and a file applied its
/// every line with each outcome written to nothing and "each line's outcome is above" under
/// nothing, exit 0 for a seed and a sound file (found by a helper playing a new user). Refused
/// as `>&-` is, before anything is done.
#[test]
fn a_standard_output_open_for_reading_only_is_refused_before_anything_is_done() {
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[100, 0]);
    let (from, to) = (ids[0].to_string(), ids[1].to_string());
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("one.csv");
    let line = Uuid::new_v4().to_string();
    std::fs::write(&file, format!("id,from,to,amount\n{line},{from},{to},1\n")).expect("file");
    let file = file.to_str().expect("utf-8 path").to_string();
    let one = ["transfer", "--from", &from, "--to", &to, "--amount", "1"];
    for args in [
        vec!["seed"],
        vec!["seed", "--accounts", "3", "--json"],
        one.to_vec(),
        [&one[..], &["--json"]].concat(),
        vec!["transfer", "--file", &file],
        vec!["transfer", "--file", &file, "--json"],
        vec!["balances"],
    ] {
        let output = std::process::Command::new("sh")
            .args(["-c", "exec \"$0\" \"$@\" 1</dev/null"])
            .arg(assert_cmd::cargo::cargo_bin("bank"))
            .args(["--database-url", db.url.expose()])
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run bank");
        let run = crate::support::Run::from(output);
        run.fails_with(2, "standard output is open for reading only");
    }
    assert_eq!(db.balance(ids[1]), 0, "nothing applied");
    assert_eq!(db.state().0.len(), 2, "no account created");
}
