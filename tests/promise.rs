//! The promise: a transfer is applied at most once, and `bank` reports it applied if and only if
//! it committed. Each test runs at READ COMMITTED and at SERIALIZABLE, in both modes.

use std::thread;
use std::time::Duration;

use bank::models::NewAccount;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Uuid as SqlUuid};
use uuid::Uuid;

use crate::support::{json_outcomes, run_file, wait_for_lock_wait, Iso, ScratchDb};

const MODES: [&str; 2] = ["transaction", "single-statement"];

/// A database at `iso` with two accounts, holding 1000 and 0.
fn two_accounts(iso: Iso) -> (ScratchDb, Uuid, Uuid) {
    two_accounts_holding(iso, [1000, 0])
}

/// A database at `iso` with two accounts holding `balances`.
fn two_accounts_holding(iso: Iso, balances: [i64; 2]) -> (ScratchDb, Uuid, Uuid) {
    let db = ScratchDb::migrated_at(iso);
    let [a, b] = db.accounts(&balances)[..] else {
        panic!("two accounts")
    };
    (db, a, b)
}

/// Case 1 of the issue: X moved 600 of A's 1000; A now has 400, so running X again can only be
/// refused for insufficient funds if the ledger is not asked first. It must say "already applied".
#[test]
fn a_rerun_after_the_funds_were_spent_is_already_applied() {
    for iso in Iso::BOTH {
        for mode in MODES {
            let (db, a, b) = two_accounts_holding(iso, [1000, 250]);
            let id = Uuid::new_v4();
            let run = || {
                db.transfer(a, b, 600)
                    .args(["--id", &id.to_string(), "--json", "--mode", mode])
                    .run()
            };
            let first = run();
            first.success();
            assert_eq!(
                first.json()["outcome"],
                "applied",
                "{iso:?} {mode}: {first:?}"
            );
            let again = run();
            again.success();
            let j = again.json();
            assert_eq!(j["outcome"], "already_applied", "{iso:?} {mode}: {again:?}");
            assert_eq!(j["already_applied"], true, "{iso:?} {mode}");
            assert_eq!((db.balance(a), db.balance(b)), (400, 850), "{iso:?} {mode}");
            assert_eq!(db.state().1, 1);
        }
    }
}

/// A rerun of a transfer applied long ago, while another session holds one of its accounts (a
/// report, a DBA's transaction): its attempts waited on the lock until the deadline, and it said
/// "unknown" (exit 3), though the ledger had the row all along (found by a helper playing a new
/// user). The row is read without locks: already applied, exit 0; other details, an id conflict.
/// A single transfer in both modes, and a file's line (which reads it after the lock wait), at
/// both isolation levels.
#[test]
fn a_rerun_held_up_by_a_lock_answers_from_the_ledger() {
    let mut from_the_ledger = 0;
    for iso in Iso::BOTH {
        for mode in MODES {
            let (db, a, b) = two_accounts_holding(iso, [1000, 250]);
            let id = Uuid::new_v4().to_string();
            let run = |amount: i64| {
                db.transfer(a, b, amount)
                    .args(["--id", &id, "--json", "--mode", mode, "--timeout", "1s"])
                    .run()
            };
            run(600).success();
            let holder = db.hold(&[b]);
            let again = run(600);
            let conflict = run(7);
            let bank = db.bank();
            let file = bank.dir.path().join("again.csv");
            std::fs::write(&file, format!("id,from,to,amount\n{id},{a},{b},600\n"))
                .expect("write the file");
            let line = bank
                .args(["transfer", "--json", "--timeout", "1s", "--file"])
                .args([&file])
                .run();
            drop(holder);
            let case = format!("{iso:?} {mode}");
            // A single transfer reads the ledger before it waits on the accounts, so its answer
            // is the ledger's. A file's line waits on them first: a run gives up on a statement
            // that has no answer by its deadline plus 200 ms, to bound a frozen server, and on a
            // loaded machine the lock wait, which ends at the deadline, and the ledger's read
            // after it can outlast that; the line's answer is then, truthfully, unknown (seen in
            // three full-suite runs). So a line's answer is either that or the ledger's, and the
            // ledger's must come at least once.
            let timed_out = |r: &crate::support::Run| {
                r.code == 3 && r.stdout.contains("no answer from the database")
            };
            for (r, code, words, file) in [
                (&again, 0, "already_applied", false),
                (&conflict, 1, "different details", false),
                (&line, 0, "already_applied", true),
            ] {
                if file && timed_out(r) {
                    continue;
                }
                assert_eq!(r.code, code, "{case}: {r:?}");
                assert!(
                    r.stdout.contains(words) || r.stderr.contains(words),
                    "{case}: {r:?}"
                );
                from_the_ledger += 1;
            }
            assert_eq!((db.balance(a), db.balance(b)), (400, 850), "{case}");
            assert_eq!(db.state().1, 1, "{case}");
        }
    }
    assert!(from_the_ledger > 8, "no line's answer came from the ledger");
}

/// A rerun of a transfer the ledger already has does not wait for its accounts at all: the row
/// is committed, so it is the answer whoever holds them. It waited on the lock until its
/// deadline, and on a loaded machine the ledger's read after that wait could miss the
/// deadline's grace and say "unknown" (seen in full-suite runs). Both modes, both isolation
/// levels, the same details (already applied) and others (an id conflict), each well before the
/// deadline that the held lock would otherwise use up.
#[test]
fn a_rerun_of_a_transfer_in_the_ledger_does_not_wait_for_its_accounts() {
    for iso in Iso::BOTH {
        for mode in MODES {
            let (db, a, b) = two_accounts_holding(iso, [1000, 250]);
            let id = Uuid::new_v4().to_string();
            let run = |amount: i64| {
                let started = std::time::Instant::now();
                let r = db
                    .transfer(a, b, amount)
                    .args(["--id", &id, "--json", "--mode", mode, "--timeout", "5s"])
                    .run();
                (r, started.elapsed())
            };
            run(600).0.success();
            let holder = db.hold(&[b]);
            let case = format!("{iso:?} {mode}");
            let (again, took) = run(600);
            assert_eq!(again.code, 0, "{case}: {again:?}");
            assert_eq!(again.json()["outcome"], "already_applied", "{case}");
            assert!(took < Duration::from_secs(4), "{case}: waited {took:?}");
            let (conflict, took) = run(7);
            assert_eq!(conflict.code, 1, "{case}: {conflict:?}");
            assert!(
                conflict.stderr.contains("different details"),
                "{case}: {conflict:?}"
            );
            assert!(took < Duration::from_secs(4), "{case}: waited {took:?}");
            drop(holder);
            assert_eq!((db.balance(a), db.balance(b)), (400, 850), "{case}");
            assert_eq!(db.state().1, 1, "{case}");
        }
    }
}

/// The same id with other details, once the funds are gone: an id conflict, not "insufficient
/// funds", whatever order the engine checks its constraints in.
#[test]
fn a_reused_id_after_the_funds_were_spent_is_an_id_conflict() {
    for iso in Iso::BOTH {
        for mode in MODES {
            let (db, a, b) = two_accounts_holding(iso, [1000, 250]);
            let id = Uuid::new_v4().to_string();
            db.transfer(a, b, 600)
                .args(["--id", &id, "--mode", mode])
                .run()
                .success();
            db.transfer(a, b, 700)
                .args(["--id", &id, "--mode", mode])
                .run()
                .fails_with(1, "already exists with different details");
            // An unknown account too: the ledger speaks first.
            db.transfer(a, Uuid::new_v4(), 600)
                .args(["--id", &id, "--mode", mode])
                .run()
                .fails_with(1, "already exists with different details");
            assert_eq!((db.balance(a), db.balance(b)), (400, 850), "{iso:?} {mode}");
        }
    }
}

/// Case 4: both modes lock the two rows in key order, whatever the order of the rows in the heap
/// and of the accounts in the transfer. A second session holds the row with the greater id; the
/// transfer must then hold the smaller one while it waits (a NOWAIT probe of it fails), and
/// must not hold it when the smaller one is the one held (the greater is free).
#[test]
fn transfers_lock_their_two_rows_in_key_order() {
    for iso in Iso::BOTH {
        for mode in MODES {
            for forward in [true, false] {
                lock_order_case(iso, mode, forward);
            }
        }
    }
}

fn lock_order_case(iso: Iso, mode: &str, forward: bool) {
    let db = ScratchDb::migrated_at(iso);
    let mut pair = [Uuid::new_v4(), Uuid::new_v4()];
    pair.sort();
    let [low, high] = pair;
    // The greater id first in the heap: a plan that locks in heap order locks it first.
    let rows: Vec<NewAccount> = [high, low]
        .iter()
        .map(|id| NewAccount {
            id: *id,
            balance: 1000,
            opening_balance: 1000,
        })
        .collect();
    bank::repo::create_many(&mut db.conn(), &rows).expect("accounts");
    let (from, to) = if forward { (low, high) } else { (high, low) };
    for (held, free) in [(high, low), (low, high)] {
        let mut holder = db.conn();
        holder.batch_execute("BEGIN").expect("begin");
        lock(&mut holder, held, false).expect("hold the row");
        let transfer = {
            let run = db.transfer(from, to, 1).args(["--mode", mode, "--json"]);
            thread::spawn(move || run.run())
        };
        wait_for_lock_wait(&db);
        let mut probe = db.conn();
        let probed = lock(&mut probe, free, true);
        holder.batch_execute("COMMIT").expect("commit");
        let run = transfer.join().expect("transfer thread");
        run.success();
        let case = format!("{iso:?} {mode} forward={forward} held={}", held == high);
        if held == high {
            // Waiting for the greater id, the transfer must already hold the smaller.
            let err = probed.expect_err(&format!("{case}: the smaller id was not locked first"));
            assert!(
                err.to_string().contains("could not obtain lock"),
                "{case}: {err}"
            );
        } else {
            // Waiting for the smaller id, it must hold nothing else.
            probed.unwrap_or_else(|e| panic!("{case}: the greater id was locked first: {e}"));
        }
    }
}

fn lock(conn: &mut PgConnection, id: Uuid, nowait: bool) -> QueryResult<usize> {
    let sql = if nowait {
        "SELECT id FROM accounts WHERE id = $1 FOR UPDATE NOWAIT"
    } else {
        "SELECT id FROM accounts WHERE id = $1 FOR UPDATE"
    };
    diesel::sql_query(sql).bind::<SqlUuid, _>(id).execute(conn)
}

/// Case 4's load: 2 accounts, 16 clients, 5 s. No deadlock, nothing given up, and the run ends
/// soon after its duration.
fn hot_rows(iso: Iso) {
    for mode in MODES {
        let db = ScratchDb::migrated_at(iso);
        let run = db
            .bank()
            .args(["workload", "--accounts", "2", "--concurrency", "16"])
            .args(["--duration", "5s", "--balance", "1000000", "--mode", mode])
            .args(["--json"])
            .run();
        run.success();
        let j = run.json();
        let case = format!("{iso:?} {mode}: {j}");
        assert_eq!(j["ok"], true, "{case}");
        assert_eq!(j["retries"]["deadlock"], 0, "{case}");
        assert_eq!(j["given_up"], 0, "{case}");
        assert_eq!(j["indeterminate"], 0, "{case}");
        assert!(
            j["transfers_committed"].as_u64().expect("n") > 100,
            "{case}"
        );
        // Deadlocks made this 14-20 s. The 1-second bound itself is a figure of scripts/bench
        // (hot accounts), measured alone: here other tests share the two cores.
        assert!(j["elapsed_secs"].as_f64().expect("s") < 8.0, "{case}");
    }
}

#[test]
fn hot_rows_at_read_committed_neither_deadlock_nor_give_up() {
    hot_rows(Iso::ReadCommitted);
}

#[test]
fn hot_rows_at_serializable_neither_deadlock_nor_give_up() {
    hot_rows(Iso::Serializable);
}

/// Case 6: a credit past INT8's range names the account, changes nothing, and is not "a
/// database error".
/// A credit that fits the balance it meets once it holds the account: another transaction had
/// just debited the account from INT8's largest value, and at READ COMMITTED the statement's
/// check read the row as its snapshot had it, before the update it waited for. Single-statement
/// mode said "its balance would exceed the largest amount" (exit 1) for a credit that fit, and
/// before that check the stale sum overflowed into the database's "bigint out of range" (found
/// by a reviewer). Both modes, both levels: the transfer applies.
#[test]
fn a_credit_that_fits_the_balance_it_waited_for_is_applied() {
    for iso in Iso::BOTH {
        for mode in MODES {
            let (db, a, m) = two_accounts_holding(iso, [1000, i64::MAX]);
            let mut debit = db.conn();
            debit
                .batch_execute(&format!(
                    "BEGIN; UPDATE accounts SET balance = balance - 100 WHERE id = '{m}'"
                ))
                .expect("a debit of m under way");
            let child = crate::support::spawn_transfer(
                db.url.expose(),
                (a, m, 50),
                &["--mode", mode, "--timeout", "20s"],
            );
            crate::support::wait_for_lock_wait(&db);
            debit.batch_execute("COMMIT").expect("commit the debit");
            let run = crate::support::Run::from(child.wait_with_output().expect("wait"));
            run.success();
            assert_eq!(
                (db.balance(a), db.balance(m)),
                (950, i64::MAX - 50),
                "{iso:?} {mode}: {run:?}"
            );
        }
    }
}

#[test]
fn a_balance_overflow_names_the_credited_account() {
    for iso in Iso::BOTH {
        eprintln!("at {iso:?}");
        for mode in MODES {
            let db = ScratchDb::migrated_at(iso);
            let [a, b] = db.accounts(&[1000, i64::MAX - 10])[..] else {
                panic!("two accounts")
            };
            db.transfer(a, b, 100)
                .args(["--mode", mode])
                .run()
                .fails_with(1, &format!("account {b} cannot receive 100"));
            assert_eq!((db.balance(a), db.balance(b)), (1000, i64::MAX - 10));
            assert_eq!(db.state().1, 0);
            // Up to the largest exactly: applied (`<` for `<=` passed every test, found by a
            // reviewer mutating the statement's checks).
            db.transfer(a, b, 10).args(["--mode", mode]).run().success();
            assert_eq!((db.balance(a), db.balance(b)), (990, i64::MAX));
        }
    }
}

/// Case 6: the ledger itself refuses a transfer from an account to itself, whoever writes it.
#[test]
fn the_ledger_refuses_a_transfer_to_the_same_account() {
    let db = ScratchDb::migrated();
    let [a] = db.accounts(&[1000])[..] else {
        panic!("one account")
    };
    let err = diesel::sql_query(
        "INSERT INTO transfers (id, from_id, to_id, amount, from_version, from_balance_after, \
         to_version, to_balance_after) VALUES ($1, $2, $2, 5, 1, 995, 2, 1000)",
    )
    .bind::<SqlUuid, _>(Uuid::new_v4())
    .bind::<SqlUuid, _>(a)
    .execute(&mut db.conn())
    .expect_err("refused");
    assert!(
        err.to_string().contains("transfers_distinct_accounts"),
        "{err}"
    );
}

/// Case 5: the workload's ledger check counts its own transfers only, so another client
/// writing transfers to the same database during the run is no false alarm.
#[test]
fn the_workload_ledger_check_ignores_other_clients() {
    let db = ScratchDb::migrated();
    let [a, b] = db.accounts(&[1_000_000, 0])[..] else {
        panic!("two accounts")
    };
    let url = db.url.clone();
    let other = thread::spawn(move || {
        let mut runner = bank::transfer::Runner::new(
            bank::db::Session::new(url, "other-client"),
            bank::transfer::Mode::Transaction,
            Default::default(),
        );
        for _ in 0..50 {
            let t = bank::models::NewTransfer {
                id: Uuid::new_v4(),
                from_id: a,
                to_id: b,
                amount: 1,
            };
            runner.run(&t).expect("transfer");
            thread::sleep(Duration::from_millis(20));
        }
    });
    let run = db
        .bank()
        .args(["workload", "--accounts", "10", "--concurrency", "2"])
        .args(["--duration", "1s", "--json"])
        .run();
    other.join().expect("other client");
    run.success();
    let j = run.json();
    assert_eq!(j["ok"], true, "{j}");
    assert_eq!(j["ledger_rows_added"], j["transfers_committed"], "{j}");
    assert_eq!(
        db.state().1,
        j["transfers_committed"].as_i64().expect("n") + 50
    );
}

/// Issue 9: after concurrent transfers, every account's entries form an exact chain (versions
/// 1, 2, 3, … and balances that follow), at both isolation levels and in both modes.
#[test]
fn the_chain_of_entries_is_exact_after_concurrent_transfers() {
    for iso in Iso::BOTH {
        for mode in MODES {
            let db = ScratchDb::migrated_at(iso);
            db.accounts(&[300; 4]);
            let run = db
                .bank()
                .args(["workload", "--accounts", "4", "--reuse-accounts"])
                .args(["--concurrency", "6", "--transfers", "300", "--mode", mode])
                .args(["--max-amount", "200", "--json"])
                .run();
            run.success();
            let j = run.json();
            assert_eq!(j["verify"]["broken_chains"], 0, "{iso:?} {mode}: {j}");
            assert!(j["transfers_committed"].as_u64() > Some(100), "{j}");
            // The chain, read directly: per account, versions without gaps and balances that
            // follow from the opening balance.
            let mut conn = db.conn();
            for (id, balance) in db.state().0 {
                let entries: Vec<Entry> = diesel::sql_query(
                    "SELECT version, after, delta FROM ( \
                     SELECT from_version AS version, from_balance_after AS after, -amount AS delta \
                     FROM transfers WHERE from_id = $1 UNION ALL \
                     SELECT to_version, to_balance_after, amount FROM transfers WHERE to_id = $1 \
                     ) e ORDER BY version",
                )
                .bind::<SqlUuid, _>(id)
                .load(&mut conn)
                .expect("entries");
                let mut before = 300;
                for (n, e) in entries.iter().enumerate() {
                    assert_eq!(e.version, n as i64 + 1, "{iso:?} {mode} {id}");
                    assert_eq!(e.after, before + e.delta, "{iso:?} {mode} {id}");
                    before = e.after;
                }
                assert_eq!(before, balance, "{iso:?} {mode} {id}");
            }
        }
    }
}

#[derive(QueryableByName)]
struct Entry {
    #[diesel(sql_type = BigInt)]
    version: i64,
    #[diesel(sql_type = BigInt)]
    after: i64,
    #[diesel(sql_type = BigInt)]
    delta: i64,
}

/// Issue 9: a ledger row changed by hand breaks its accounts' chains; verify says so and exits 1.
#[test]
fn verify_catches_a_tampered_ledger_row() {
    let db = ScratchDb::migrated();
    let [a, b] = db.accounts(&[1000, 0])[..] else {
        panic!("two accounts")
    };
    for amount in [100, 200, 300] {
        db.transfer(a, b, amount).run().success();
    }
    db.bank().args(["verify"]).run().success();
    // The middle transfer's debit side now claims another balance; sums are untouched.
    diesel::sql_query(
        "UPDATE transfers SET from_balance_after = from_balance_after + 1 \
         WHERE from_id = $1 AND from_version = 2",
    )
    .bind::<SqlUuid, _>(a)
    .execute(&mut db.conn())
    .expect("tamper");
    let run = db.bank().args(["verify", "--json"]).run();
    assert_eq!(run.code, 1, "{run:?}");
    let j = run.json();
    assert_eq!(j["ok"], false, "{j}");
    assert_eq!(j["mismatched_accounts"], 0, "{j}");
    assert_eq!(j["broken_chains"], 1, "{j}");
    assert_eq!(j["violations"][0]["id"], a.to_string(), "{j}");
    assert_eq!(j["violations"][0]["chain_ok"], false, "{j}");
    assert!(run.stderr.contains("1 broken chain of entries"), "{run:?}");
}

/// A transfer refused for two reasons at once is refused for the same one whatever the order
/// of its accounts' ids: the first of an unknown debited account, insufficient funds, an unknown
/// credited account, a credit past INT8 (the order `transfer --file` decides in). Which
/// constraint PostgreSQL hit first followed the order it updated the two rows in, so the reason
/// depended on which id sorted first.
#[test]
fn a_transfer_refused_twice_over_gives_the_first_reason_whatever_the_id_order() {
    for iso in Iso::BOTH {
        eprintln!("at {iso:?}");
        let low = |n: u128| Uuid::from_u128(n);
        let high = |n: u128| Uuid::from_u128(u128::MAX - n);
        for mode in MODES {
            for (from, to) in [(low(1), high(1)), (high(2), low(2))] {
                let db = ScratchDb::migrated_at(iso);
                let mut conn = db.conn();
                for (id, balance) in [(from, 10), (to, i64::MAX - 5)] {
                    bank::repo::create(
                        &mut conn,
                        &NewAccount {
                            id,
                            balance,
                            opening_balance: balance,
                        },
                    )
                    .expect("account");
                }
                db.transfer(from, to, 100)
                    .args(["--mode", mode])
                    .run()
                    .fails_with(1, "insufficient funds");
                // The debited account does not exist, the credit would overflow.
                let ghost = if from < to { low(0) } else { high(0) };
                db.transfer(ghost, to, 100)
                    .args(["--mode", mode])
                    .run()
                    .fails_with(1, &format!("account {ghost} does not exist"));
                assert_eq!(db.state().1, 0, "{mode}");
            }
        }
    }
}

/// A DBA's trigger that skips the ledger row (a BEFORE INSERT trigger returning NULL): in
/// single-statement mode the balances moved and committed without it, bank said "failed"
/// (exit 1), and every rerun of the same --id moved the money again. The statement now fails
/// unless it wrote its ledger row, so nothing is applied, in both modes, at both levels.
#[test]
fn a_transfer_whose_ledger_row_a_trigger_skips_applies_nothing() {
    for iso in Iso::BOTH {
        let db = ScratchDb::migrated_at(iso);
        db.conn()
            .batch_execute(
                "CREATE FUNCTION skip19() RETURNS trigger LANGUAGE plpgsql AS \
                 $$BEGIN IF NEW.amount = 19 THEN RETURN NULL; END IF; RETURN NEW; END$$; \
                 CREATE TRIGGER t19 BEFORE INSERT ON transfers FOR EACH ROW \
                 EXECUTE FUNCTION skip19()",
            )
            .expect("trigger");
        let ids = db.accounts(&[1000, 0]);
        for mode in ["transaction", "single-statement"] {
            let id = Uuid::new_v4().to_string();
            for _ in 0..3 {
                let run = db
                    .transfer(ids[0], ids[1], 19)
                    .args(["--mode", mode, "--id", &id])
                    .run();
                assert_eq!(run.code, 1, "{iso:?} {mode}: {run:?}");
                assert!(run.stderr.contains("ledger row"), "{iso:?} {mode}: {run:?}");
                assert_eq!(db.balance(ids[0]), 1000, "{iso:?} {mode}: nothing moved");
            }
        }
        // Other amounts go through, ledger and all.
        db.transfer(ids[0], ids[1], 5)
            .args(["--mode", "single-statement"])
            .run()
            .success();
        assert_eq!(db.balance(ids[0]), 995, "{iso:?}");
        db.bank().args(["verify"]).run().success();
    }
}

/// A DBA's trigger that leaves one account unchanged (BEFORE UPDATE returning NULL): the transfer
/// was refused with "account … does not exist", of an account that exists (found by a
/// reviewer). It says the database left the account unchanged, applies nothing, in both modes
/// and both directions; and a file applies every other line (batch::…_an_account_a_trigger_…).
#[test]
fn an_account_a_trigger_leaves_unchanged_is_not_called_unknown() {
    for iso in Iso::BOTH {
        let db = ScratchDb::migrated_at(iso);
        let ids = db.accounts(&[1000, 1000]);
        db.leave_unchanged(ids[1]);
        for mode in ["transaction", "single-statement"] {
            for (from, to) in [(ids[0], ids[1]), (ids[1], ids[0])] {
                let run = db
                    .transfer(from, to, 5)
                    .args(["--mode", mode, "--id", &Uuid::new_v4().to_string()])
                    .run();
                let case = format!("{iso:?} {mode} {from}->{to}");
                assert_eq!(run.code, 1, "{case}: {run:?}");
                assert!(!run.stderr.contains("does not exist"), "{case}: {run:?}");
                assert!(
                    run.stderr.contains(&format!(
                        "account {} exists, but the database left it unchanged",
                        ids[1]
                    )),
                    "{case}: {run:?}"
                );
                assert_eq!(db.balance(ids[0]), 1000, "{case}: nothing moved");
            }
        }
        db.bank().args(["verify"]).run().success();
    }
}

/// A CHECK of a DBA's on accounts (a cap on balances) refusing the credit was reported as
/// "insufficient funds" on the debited account, which held plenty: the refusal names the
/// database's reason now, and nothing is applied, in both modes.
#[test]
fn a_check_of_someone_elses_is_not_called_insufficient_funds() {
    for iso in Iso::BOTH {
        let db = ScratchDb::migrated_at(iso);
        let ids = db.accounts(&[1000, 1000]);
        db.conn()
            .batch_execute("ALTER TABLE accounts ADD CONSTRAINT dba_cap CHECK (balance <= 1100)")
            .expect("check");
        for mode in ["transaction", "single-statement"] {
            let run = db
                .transfer(ids[0], ids[1], 200)
                .args(["--mode", mode, "--id", &Uuid::new_v4().to_string()])
                .run();
            assert_eq!(run.code, 1, "{iso:?} {mode}: {run:?}");
            assert!(run.stderr.contains("dba_cap"), "{iso:?} {mode}: {run:?}");
            assert!(
                !run.stderr.contains("insufficient"),
                "{iso:?} {mode}: {run:?}"
            );
        }
        assert_eq!((db.balance(ids[0]), db.balance(ids[1])), (1000, 1000));
    }
}

/// The balance CHECK dropped by hand (`ALTER TABLE accounts DROP CONSTRAINT
/// accounts_balance_nonnegative`): the transfer statement relied on it to refuse an overdraft,
/// and `bank transfer` moved 2000 out of 250 (found by a fault-injecting helper), where a file's
/// line said `insufficient_funds`. The statement checks the debited balance itself now: refused,
/// nothing moved, in both modes, at both levels, as a file's line is.
#[test]
fn an_overdraft_is_refused_without_the_balance_check() {
    for iso in Iso::BOTH {
        let db = ScratchDb::migrated_at(iso);
        let ids = db.accounts(&[250, 0]);
        db.conn()
            .batch_execute("ALTER TABLE accounts DROP CONSTRAINT accounts_balance_nonnegative")
            .expect("drop the check");
        // By much, and by one (a boundary no test held: `< -1` passed every test, found by a
        // reviewer mutating the statement's checks).
        for (mode, amount) in MODES.iter().flat_map(|m| [(*m, 2000), (*m, 251)]) {
            let run = db
                .transfer(ids[0], ids[1], amount)
                .args(["--mode", mode, "--id", &Uuid::new_v4().to_string()])
                .run();
            run.fails_with(1, "insufficient funds");
        }
        assert_eq!(
            (db.balance(ids[0]), db.balance(ids[1])),
            (250, 0),
            "{iso:?}"
        );
        assert_eq!(db.state().1, 0, "{iso:?}");
        // A transfer the balance covers still goes through.
        db.transfer(ids[0], ids[1], 250).run().success();
        assert_eq!(
            (db.balance(ids[0]), db.balance(ids[1])),
            (0, 250),
            "{iso:?}"
        );
    }
}

/// A COMMIT the server refuses (a deferred trigger raising at commit): the server said the
/// transaction rolled back, yet bank took every unclassified COMMIT error for an ambiguous one,
/// retried until its deadline and said "unknown" (exit 3), and so did every rerun. Now it is
/// "not applied" (exit 1) at once, for a single transfer and for a file's lines, both levels.
#[test]
fn a_commit_the_server_refuses_is_not_applied_not_unknown() {
    for iso in Iso::BOTH {
        let db = ScratchDb::migrated_at(iso);
        db.conn()
            .batch_execute(
                "CREATE FUNCTION no17() RETURNS trigger LANGUAGE plpgsql AS \
                 $$BEGIN IF NEW.amount = 17 THEN RAISE EXCEPTION 'amount 17 refused at commit'; \
                 END IF; RETURN NULL; END$$; \
                 CREATE CONSTRAINT TRIGGER t17 AFTER INSERT ON transfers \
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION no17()",
            )
            .expect("trigger");
        let ids = db.accounts(&[1000, 0]);
        let id = Uuid::new_v4().to_string();
        for _ in 0..2 {
            let started = std::time::Instant::now();
            let run = db
                .transfer(ids[0], ids[1], 17)
                .args(["--id", &id, "--timeout", "5s"])
                .run();
            assert_eq!(run.code, 1, "{iso:?}: {run:?}");
            assert!(
                run.stderr.contains("amount 17 refused at commit"),
                "{iso:?}: {run:?}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{iso:?}: {run:?}"
            );
        }
        let file = format!(
            "id,from,to,amount\n{},{},{},5\n{},{},{},17\n",
            Uuid::new_v4(),
            ids[0],
            ids[1],
            Uuid::new_v4(),
            ids[0],
            ids[1]
        );
        let run = db
            .bank()
            .args(["transfer", "--file", "-", "--json", "--timeout", "5s"])
            .cmd
            .write_stdin(file)
            .output()
            .expect("run");
        let run = crate::support::Run::from(run);
        assert_eq!(run.code, 1, "{iso:?}: {run:?}");
        assert!(!run.stdout.contains("\"unknown\""), "{iso:?}: {run:?}");
        // As one at a time: the first line applied, the second refused alone.
        let outcomes: Vec<String> = run
            .stdout
            .lines()
            .map(|l| {
                let j: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
                j["outcome"].as_str().expect("outcome").to_string()
            })
            .collect();
        assert_eq!(outcomes, ["applied", "refused"], "{iso:?}: {run:?}");
        assert_eq!(db.balance(ids[0]), 995, "{iso:?}");
    }
}

/// A DBA's trigger that refuses a transfer bank would refuse for its own reason (the id taken
/// with other details, an unknown account, insufficient funds): one transfer at a time gave the
/// trigger's error, a file the reason of bank's, which it checks first. Both give bank's now.
#[test]
fn bank_s_own_reasons_come_before_a_dba_s_refusal() {
    for iso in Iso::BOTH {
        let db = ScratchDb::migrated_at(iso);
        db.conn()
            .batch_execute(
                "CREATE FUNCTION dba7() RETURNS trigger LANGUAGE plpgsql AS \
                 $$BEGIN IF NEW.amount % 7 = 0 THEN RAISE EXCEPTION 'DBA_REFUSED'; END IF; \
                 RETURN NEW; END$$; \
                 CREATE TRIGGER dba7 BEFORE INSERT ON transfers FOR EACH ROW \
                 EXECUTE FUNCTION dba7(); \
                 CREATE FUNCTION poor() RETURNS trigger LANGUAGE plpgsql AS \
                 $$BEGIN IF OLD.balance < 20 THEN RAISE EXCEPTION 'DBA_REFUSED_POOR'; END IF; \
                 RETURN NEW; END$$; \
                 CREATE TRIGGER poor BEFORE UPDATE ON accounts FOR EACH ROW \
                 EXECUTE FUNCTION poor()",
            )
            .expect("triggers");
        let ids = db.accounts(&[1000, 1000, 5, 14]);
        let id = Uuid::new_v4().to_string();
        for mode in ["transaction", "single-statement"] {
            db.transfer(ids[0], ids[1], 10)
                .args(["--mode", mode, "--id", &id])
                .run()
                .success();
            let conflict = db
                .transfer(ids[0], ids[1], 14)
                .args(["--mode", mode, "--id", &id])
                .run();
            conflict.fails_with(1, "already exists with different details");
            let unknown = db
                .transfer(Uuid::new_v4(), ids[1], 14)
                .args(["--mode", mode])
                .run();
            unknown.fails_with(1, "does not exist");
            let poor = db.transfer(ids[2], ids[1], 15).args(["--mode", mode]).run();
            poor.fails_with(1, "insufficient funds");
            // Nothing of bank's to say: the DBA's refusal, in its words.
            let dba = db.transfer(ids[0], ids[1], 21).args(["--mode", mode]).run();
            dba.fails_with(1, "DBA_REFUSED");
            // An account's whole balance is no insufficient funds: the DBA's refusal stands (a
            // mutation round's survivor took `balance <= amount` for bank's reason).
            let all = db.transfer(ids[3], ids[1], 14).args(["--mode", mode]).run();
            all.fails_with(1, "DBA_REFUSED");
            assert!(!all.stderr.contains("insufficient"), "{mode}: {all:?}");
        }
        assert_eq!(db.balance(ids[0]), 990, "{iso:?}");
        assert_eq!(db.balance(ids[3]), 14, "{iso:?}");
    }
}

/// Ctrl-C (or SIGTERM) on one transfer killed it without a word (exit 130): the id it had made
/// up was never shown, and in single-statement mode the statement it had sent still committed,
/// so the user, told nothing, would run it again. The first Ctrl-C now ends the wait as the
/// deadline does: "not applied" (exit 1) when no COMMIT was sent, "unknown" (exit 3) when one
/// may have been, naming the id either way, and the rerun with that id settles it.
#[test]
fn ctrl_c_on_a_transfer_names_its_id_and_tells_the_truth() {
    for iso in Iso::BOTH {
        for (mode, code, outcome) in [
            ("transaction", 1, "failed"),
            ("single-statement", 3, "unknown"),
        ] {
            let (db, a, b) = two_accounts(iso);
            let mut holder = db.conn();
            holder.batch_execute("BEGIN").expect("begin");
            lock(&mut holder, a, false).expect("lock");
            let child = crate::support::spawn_transfer(
                db.url.expose(),
                (a, b, 10),
                &["--mode", mode, "--json", "--timeout", "20s"],
            );
            wait_for_lock_wait(&db);
            crate::support::interrupt(child.id());
            let run = crate::support::Run::from(child.wait_with_output().expect("wait"));
            holder.batch_execute("ROLLBACK").expect("rollback");
            let case = format!("{iso:?} {mode}");
            assert_eq!(run.code, code, "{case}: {run:?}");
            let j = run.json();
            assert_eq!(j["outcome"], outcome, "{case}: {run:?}");
            let id = j["id"].as_str().expect("the id").to_string();
            assert!(run.stderr.contains(&id), "{case}: {run:?}");
            assert!(run.stderr.contains("interrupted"), "{case}: {run:?}");
            // What it said holds: the statement sent in single-statement mode commits once the
            // lock is gone; nothing else does.
            thread::sleep(Duration::from_millis(500));
            let applied = db.balance(b) == 10;
            assert_eq!(applied, code == 3 && db.state().1 == 1, "{case}");
            if code == 1 {
                assert_eq!(db.state().1, 0, "{case}");
            }
            let rerun = db.transfer(a, b, 10).args(["--id", &id, "--json"]).run();
            rerun.success();
            let want = if applied {
                "already_applied"
            } else {
                "applied"
            };
            assert_eq!(rerun.json()["outcome"], want, "{case}: {rerun:?}");
            assert_eq!(db.balance(b), 10, "{case}");
        }
    }
}

/// A DBA's trigger refusing every ledger row of amount 13: the database's refusal, decided
/// before any commit.
fn refuse_amount_13(db: &ScratchDb) {
    db.conn()
        .batch_execute(
            "CREATE FUNCTION no13() RETURNS trigger LANGUAGE plpgsql AS \
             $$BEGIN IF NEW.amount = 13 THEN RAISE EXCEPTION 'amount 13 is unlucky'; \
             END IF; RETURN NEW; END$$; \
             CREATE TRIGGER t13 BEFORE INSERT ON transfers FOR EACH ROW \
             EXECUTE FUNCTION no13()",
        )
        .expect("trigger");
}

/// The database's own refusal of a transfer without `--id` (a DBA's trigger, a read-only
/// database): the line said only "database error: ...", so the id bank made up for it was never
/// shown and nothing said it was not applied (found by a reviewer). Both modes, both levels.
#[test]
fn a_transfer_the_database_refuses_is_named_and_not_applied() {
    for iso in Iso::BOTH {
        let db = ScratchDb::migrated_at(iso);
        refuse_amount_13(&db);
        let ids = db.accounts(&[1000, 0]);
        for mode in ["transaction", "single-statement"] {
            let run = db
                .transfer(ids[0], ids[1], 13)
                .args(["--mode", mode, "--timeout", "5s"])
                .run();
            run.fails_with(1, "amount 13 is unlucky");
            assert!(
                run.stderr.starts_with("bank: error: transfer ")
                    && run.stderr.contains(" not applied: "),
                "{iso:?} {mode}: {run:?}"
            );
        }
        assert_eq!(
            (db.balance(ids[0]), db.balance(ids[1])),
            (1000, 0),
            "{iso:?}"
        );
    }
}

/// A rerun the database refuses before it writes anything (a read-only database here) finds the
/// earlier run's row: that row is not the rerun's, in either mode (found by a reviewer: in
/// single-statement mode the rerun said "applied", so two runs reported one row applied).
#[test]
fn a_rerun_the_database_refuses_does_not_take_an_earlier_run_s_row_for_its_own() {
    for iso in Iso::BOTH {
        for first_mode in MODES {
            for mode in MODES {
                let case = format!("{iso:?}, first {first_mode}, rerun {mode}");
                let (db, a, b) = two_accounts(iso);
                let id = Uuid::new_v4().to_string();
                let first = db
                    .transfer(a, b, 100)
                    .args(["--id", &id, "--json", "--mode", first_mode])
                    .run();
                first.success();
                assert_eq!(first.json()["already_applied"], false, "{case}: {first:?}");
                db.alter("default_transaction_read_only = on");
                let again = db
                    .transfer(a, b, 100)
                    .args(["--id", &id, "--json", "--mode", mode])
                    .run();
                db.alter("default_transaction_read_only = off");
                again.success();
                assert_eq!(again.json()["already_applied"], true, "{case}: {again:?}");
            }
        }
    }
}

/// An account whose version a DBA set back by hand: its next entry's version is taken, and the
/// ledger's unique (account, version) index refuses it. That was taken for a reused transfer id
/// and retried as a serialization failure until the deadline ("timed out … reported a duplicate
/// but is absent"; found by a reviewer). It is the database's refusal, named, at once.
#[test]
fn a_version_set_back_by_hand_is_the_database_s_refusal_not_a_retry() {
    for iso in Iso::BOTH {
        for mode in MODES {
            let case = format!("{iso:?} {mode}");
            let (db, a, b) = two_accounts(iso);
            db.transfer(a, b, 1).run().success();
            db.conn()
                .batch_execute(&format!("UPDATE accounts SET version = 0 WHERE id = '{a}'"))
                .expect("edit");
            let started = std::time::Instant::now();
            let run = db
                .transfer(a, b, 1)
                .args(["--mode", mode, "--id", &Uuid::new_v4().to_string()])
                .args(["--timeout", "20s"])
                .run();
            assert_eq!(run.code, 1, "{case}: {run:?}");
            assert!(
                run.stderr.contains("transfers_from_id_from_version_key"),
                "{case}: {run:?}"
            );
            assert!(!run.stderr.contains("timed out"), "{case}: {run:?}");
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{case}: {run:?}"
            );
            assert_eq!((db.balance(a), db.balance(b)), (999, 1), "{case}");
        }
    }
}

/// A rerun of an id whose earlier run commits while the rerun waits on the accounts' locks,
/// and whose own attempt then goes unanswered (its backend terminated while it waits: a DBA, a
/// failover): it finds the earlier row and must not take it for its own (found by a
/// fault-testing helper: in single-statement mode the rerun said "applied" too). The earlier
/// run is asleep in its COMMIT when the rerun starts, so the rerun's first look at the ledger
/// finds nothing and it goes on to the locks.
#[test]
fn a_rerun_whose_answer_is_lost_does_not_take_an_earlier_run_s_row_for_its_own() {
    for iso in Iso::BOTH {
        for mode in MODES {
            let case = format!("{iso:?}, rerun {mode}");
            let (db, a, b) = two_accounts(iso);
            let id = Uuid::new_v4().to_string();
            crate::support::slow_down_the_next_commit_by(&mut db.conn(), 3);
            let url = db.url.expose().to_string();
            let first = crate::support::spawn_transfer(&url, (a, b, 100), &["--id", &id, "--json"]);
            crate::support::wait_for_a_commit_asleep(&mut db.conn());
            let rerun = crate::support::spawn_transfer(
                &url,
                (a, b, 100),
                &["--id", &id, "--mode", mode, "--json", "--timeout", "20s"],
            );
            wait_for_lock_wait(&db);
            db.conn()
                .batch_execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = 'bank' AND wait_event_type = 'Lock'",
                )
                .expect("terminate");
            let first = crate::support::Run::from(first.wait_with_output().expect("wait"));
            first.success();
            assert_eq!(first.json()["outcome"], "applied", "{case}: {first:?}");
            let rerun = crate::support::Run::from(rerun.wait_with_output().expect("wait"));
            match mode {
                "transaction" => {
                    rerun.success();
                    assert_eq!(rerun.json()["already_applied"], true, "{case}: {rerun:?}");
                }
                // Its statement's claim would carry its mark; the row found has none (the
                // earlier run's transaction writes no claim), and neither would a row of its
                // own whose claim a trigger blanked (a_lost_answer_whose_claim_lost_its_mark_…):
                // whose row it is cannot be told, so unknown, and the next rerun settles it.
                _ => {
                    assert_eq!(rerun.code, 3, "{case}: {rerun:?}");
                    assert_eq!(rerun.json()["outcome"], "unknown", "{case}: {rerun:?}");
                    let settled = db
                        .transfer(a, b, 100)
                        .args(["--id", &id, "--mode", mode, "--json"])
                        .run();
                    settled.success();
                    assert_eq!(
                        settled.json()["already_applied"],
                        true,
                        "{case}: {settled:?}"
                    );
                }
            }
            assert_eq!((db.balance(a), db.balance(b)), (900, 100), "{case}");
        }
    }
}

/// A run whose attempts fail with "result is ambiguous" before any COMMIT (CockroachDB's 40003
/// on a statement; here a trigger's words) while another run commits the same transfer: no
/// attempt of the first run reached its COMMIT, so the row it then finds is the other run's,
/// already applied. It said "applied", and two runs reported one row applied (found by a
/// reviewer). The other run connects with a setting the trigger lets through.
#[test]
fn a_run_whose_attempts_were_ambiguous_before_any_commit_does_not_take_another_s_row() {
    for iso in Iso::BOTH {
        let (db, a, b) = two_accounts(iso);
        db.conn()
            .batch_execute(
                "CREATE SEQUENCE refusals; \
                 CREATE FUNCTION ambiguous() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN \
                   IF current_setting('bank_test.through', true) IS DISTINCT FROM 'on' THEN \
                     PERFORM nextval('refusals'); \
                     RAISE EXCEPTION 'result is ambiguous (a test''s trigger)'; \
                   END IF; RETURN NEW; END$$; \
                 CREATE TRIGGER ambiguous BEFORE INSERT ON transfers FOR EACH ROW \
                 EXECUTE FUNCTION ambiguous()",
            )
            .expect("the trigger");
        let id = Uuid::new_v4().to_string();
        let url = db.url.expose().to_string();
        let first = crate::support::spawn_transfer(
            &url,
            (a, b, 100),
            &["--id", &id, "--json", "--timeout", "4s"],
        );
        // Its first attempts fail, ambiguous, before the other run commits: once the trigger
        // has refused one (a sequence counts them, outside any transaction). A fixed 800 ms
        // could come before that, and the test then passed without its case.
        crate::support::wait_until(
            &mut db.conn(),
            "(SELECT is_called FROM refusals)",
            &format!("{iso:?}: no refusal"),
        );
        let through = format!("{url}?options=-c%20bank_test.through%3Don");
        let other = crate::support::spawn_transfer(&through, (a, b, 100), &["--id", &id, "--json"]);
        let other = crate::support::Run::from(other.wait_with_output().expect("wait"));
        other.success();
        assert_eq!(other.json()["outcome"], "applied", "{iso:?}: {other:?}");
        let first = crate::support::Run::from(first.wait_with_output().expect("wait"));
        assert_eq!(first.code, 0, "{iso:?}: {first:?}");
        assert_eq!(first.json()["already_applied"], true, "{iso:?}: {first:?}");
        assert!(
            first.json()["retries"]["ambiguous"].as_u64() > Some(0),
            "{iso:?}: {first:?}"
        );
        assert_eq!((db.balance(a), db.balance(b)), (900, 100), "{iso:?}");
    }
}

/// A DBA's trigger that fails on a table of its own with a value out of range (22003: an audit
/// counter in an INT4 column) or a NULL it refuses (23502): `transfer` took the first for a
/// credit past INT8 ("cannot receive …: its balance would exceed …", balances of 1000) and the
/// second for an account left unchanged, hiding the database's words, where `transfer --file`
/// gave them (found by a fault-injecting helper). Both modes give the database's words now,
/// exit 1, nothing applied.
#[test]
fn a_dba_s_trigger_failing_on_its_own_table_is_not_taken_for_bank_s_reason() {
    for iso in Iso::BOTH {
        eprintln!("at {iso:?}");
        for (sql, words) in [
            (
                "CREATE TABLE audit (n INT4 NOT NULL); \
                 CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS \
                 $$BEGIN INSERT INTO audit VALUES (2147483647 + NEW.amount); RETURN NEW; END$$; \
                 CREATE TRIGGER audit BEFORE INSERT ON transfers FOR EACH ROW \
                 EXECUTE FUNCTION audit()",
                "integer out of range",
            ),
            (
                "CREATE TABLE audit (approved_by TEXT NOT NULL); \
                 CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS \
                 $$BEGIN INSERT INTO audit VALUES (NULL); RETURN NEW; END$$; \
                 CREATE TRIGGER audit BEFORE INSERT ON transfers FOR EACH ROW \
                 EXECUTE FUNCTION audit()",
                "null value in column \"approved_by\"",
            ),
            // The same, in a column or a key a DBA added to the ledger itself (a helper playing
            // a new user): "account … exists, but the database left it unchanged".
            (
                "ALTER TABLE transfers ADD COLUMN approved_by TEXT; \
                 ALTER TABLE transfers ALTER COLUMN approved_by SET NOT NULL",
                "null value in column \"approved_by\"",
            ),
            (
                "CREATE TABLE tenants (id INT4 PRIMARY KEY); \
                 ALTER TABLE transfers ADD COLUMN tenant INT4 DEFAULT 5 \
                 CONSTRAINT transfers_tenant_fkey REFERENCES tenants",
                "transfers_tenant_fkey",
            ),
        ] {
            let db = ScratchDb::migrated_at(iso);
            db.conn().batch_execute(sql).expect("the trigger");
            let [a, b] = db.accounts(&[1000, 1000])[..] else {
                panic!("two accounts")
            };
            for mode in MODES {
                let run = db.transfer(a, b, 10).args(["--mode", mode]).run();
                run.fails_with(1, words);
                assert!(
                    !run.stderr.contains("cannot receive") && !run.stderr.contains("unchanged"),
                    "{mode}: {run:?}"
                );
            }
            assert_eq!(db.state().1, 0);
        }
    }
}

/// A row-level security policy of the DBA's that hides ledger rows from bank's role: a rerun of
/// a committed id found no row, was refused a duplicate, took that for a race, and said "not
/// applied" (exit 1) at every rerun, and a file's rerun did the same (found by a
/// fault-injecting helper). bank must see every row of its tables: a hidden row is an error,
/// never an absence, and nothing can say "not applied" for an id the ledger may hold. Both
/// modes, a file, both levels; a policy on the claims too.
#[test]
fn a_policy_hiding_ledger_rows_never_makes_a_committed_id_not_applied() {
    for iso in Iso::BOTH {
        for table in ["transfers", "transfer_claims"] {
            let (db, a, b) = two_accounts(iso);
            let (role, url) = db.teller("LOGIN");
            let id = Uuid::new_v4();
            let bank = || {
                crate::support::Bank::new().args([
                    "--database-url",
                    &url,
                    "transfer",
                    "--json",
                    "--timeout",
                    "2s",
                ])
            };
            let transfer = |mode: &str| {
                bank()
                    .args(["--from", &a.to_string(), "--to", &b.to_string()])
                    .args(["--amount", "10", "--id", &id.to_string(), "--mode", mode])
                    .run()
            };
            transfer("single-statement").success();
            db.conn()
                .batch_execute(&format!(
                    "ALTER TABLE {table} ENABLE ROW LEVEL SECURITY; \
                     CREATE POLICY hide ON {table} TO {role} USING (false) WITH CHECK (true)"
                ))
                .expect("the policy");
            for mode in MODES {
                let again = transfer(mode);
                assert_ne!(again.code, 1, "{iso:?} {table} {mode}: {again:?}");
                assert!(
                    again.code == 0 || (again.code == 3 && again.stderr.contains("BYPASSRLS")),
                    "{iso:?} {table} {mode}: {again:?}"
                );
            }
            let text = format!("id,from,to,amount\n{id},{a},{b},10\n");
            let file = run_file(&url, "f.csv", &text, &["--timeout", "2s"]);
            assert_ne!(file.code, 1, "{iso:?} {table}: {file:?}");
            assert!(
                !file.stdout.contains("not_applied") && !file.stdout.contains("insufficient"),
                "{iso:?} {table}: {file:?}"
            );
            assert_eq!((db.balance(a), db.balance(b)), (990, 10), "{iso:?} {table}");
            db.conn()
                .batch_execute(&format!("DROP POLICY hide ON {table}"))
                .expect("drop the policy");
        }
    }
}

/// A DBA's trigger that writes the ledger row with other details than bank asked for (the
/// amount doubled, another id): the balances moved by the amount asked, bank said "moved 5" and
/// the ledger said 10, and a rerun then called the id taken ("choose another id"), so the
/// transfer could be applied twice (found by a fault-injecting helper); with the id changed, a
/// rerun applied it again. A row not written as asked is a row not written: nothing is
/// applied, in both modes and in a file, at both levels, and reruns say the same.
#[test]
fn a_ledger_row_a_trigger_changes_applies_nothing() {
    for iso in Iso::BOTH {
        // The accounts too, to a third one (no test changed them: a check of the amount and id
        // alone passed every test, found by a reviewer mutating the statement's checks).
        let third = "(SELECT id FROM accounts WHERE id NOT IN (NEW.from_id, NEW.to_id) LIMIT 1)";
        for change in [
            "NEW.amount := NEW.amount * 2".to_string(),
            "NEW.id := gen_random_uuid()".to_string(),
            format!("NEW.to_id := {third}"),
            format!("NEW.from_id := {third}"),
        ] {
            let case = format!("{iso:?} {change}");
            let db = ScratchDb::migrated_at(iso);
            db.conn()
                .batch_execute(&format!(
                    "CREATE FUNCTION change7() RETURNS trigger LANGUAGE plpgsql AS \
                     $$BEGIN IF NEW.amount = 7 THEN {change}; END IF; RETURN NEW; END$$; \
                     CREATE TRIGGER t7 BEFORE INSERT ON transfers FOR EACH ROW \
                     EXECUTE FUNCTION change7()"
                ))
                .expect("trigger");
            let [a, b, _] = db.accounts(&[1000, 0, 0])[..] else {
                panic!("three accounts")
            };
            for mode in MODES {
                let id = Uuid::new_v4().to_string();
                for _ in 0..2 {
                    let run = db
                        .transfer(a, b, 7)
                        .args(["--mode", mode, "--id", &id])
                        .run();
                    assert_eq!(run.code, 1, "{case} {mode}: {run:?}");
                    assert!(run.stderr.contains("ledger row"), "{case} {mode}: {run:?}");
                    assert!(!run.stderr.contains("another id"), "{case} {mode}: {run:?}");
                }
            }
            let (x, y) = (Uuid::new_v4(), Uuid::new_v4());
            let text = format!("id,from,to,amount\n{x},{a},{b},5\n{y},{a},{b},7\n");
            for _ in 0..2 {
                let file = run_file(db.url.expose(), "f.csv", &text, &[]);
                assert_eq!(file.code, 1, "{case}: {file:?}");
                let outcomes = json_outcomes(&file);
                assert_ne!(outcomes[1], "applied", "{case}: {file:?}");
                assert_ne!(outcomes[1], "id_conflict", "{case}: {file:?}");
            }
            assert_eq!((db.balance(a), db.balance(b)), (995, 5), "{case}");
            db.bank().args(["verify"]).run().success();
        }
    }
}

/// A DBA's trigger that writes an account otherwise than asked (it keeps the old balance for
/// moves of 3): bank said "moved" (exit 0), in both modes and in a file, while no money moved
/// and the ledger said it had (found by a fault-injecting helper). A row not written as asked
/// applies nothing: the transfer is refused, and a file's other lines apply. Both levels.
/// The version kept too (no test kept it: a check of the balance alone passed every test, found
/// by a reviewer mutating the statements' checks): the account's chain of entries would break.
#[test]
fn an_account_a_trigger_writes_otherwise_applies_nothing() {
    for (iso, keep) in Iso::BOTH
        .into_iter()
        .flat_map(|iso| [(iso, "balance"), (iso, "version")])
    {
        let db = ScratchDb::migrated_at(iso);
        db.conn()
            .batch_execute(&format!(
                "CREATE FUNCTION keep3() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN \
                   IF abs(NEW.balance - OLD.balance) = 3 THEN NEW.{keep} := OLD.{keep}; END IF; \
                   RETURN NEW; END$$; \
                 CREATE TRIGGER keep3 BEFORE UPDATE ON accounts FOR EACH ROW \
                 EXECUTE FUNCTION keep3()",
            ))
            .expect("trigger");
        let iso = format!("{iso:?} {keep}");
        let [a, b, c, d] = db.accounts(&[1000, 0, 1000, 0])[..] else {
            panic!("four accounts")
        };
        for mode in MODES {
            let run = db
                .transfer(a, b, 3)
                .args(["--mode", mode, "--id", &Uuid::new_v4().to_string()])
                .run();
            assert_eq!(run.code, 1, "{iso:?} {mode}: {run:?}");
            assert!(
                run.stderr.contains("otherwise than asked"),
                "{iso:?} {mode}: {run:?}"
            );
        }
        let (x, y) = (Uuid::new_v4(), Uuid::new_v4());
        let text = format!("id,from,to,amount\n{x},{c},{d},5\n{y},{a},{b},3\n");
        let file = run_file(db.url.expose(), "f.csv", &text, &[]);
        assert_eq!(file.code, 1, "{iso:?}: {file:?}");
        assert_eq!(
            json_outcomes(&file),
            ["applied", "refused"],
            "{iso:?}: {file:?}"
        );
        assert_eq!((db.balance(a), db.balance(b)), (1000, 0), "{iso:?}");
        assert_eq!((db.balance(c), db.balance(d)), (995, 5), "{iso:?}");
        db.bank().args(["verify"]).run().success();
    }
}

/// A single statement's transfer whose ledger row was deleted since (by hand, or by a DBA's
/// "archiving" trigger): its rerun in single-statement mode found the id claimed and advised
/// "run it with --mode transaction to apply it now", which moved the money a second time (found
/// by a fault-injecting helper). The claim carries the mark of the statement that applied it:
/// the rerun says the row is gone, and advises no second apply. Both levels.
#[test]
fn a_rerun_of_an_id_whose_ledger_row_was_deleted_does_not_advise_a_second_apply() {
    for iso in Iso::BOTH {
        let (db, a, b) = two_accounts(iso);
        let id = Uuid::new_v4().to_string();
        let run = || {
            db.transfer(a, b, 10)
                .args(["--id", &id, "--mode", "single-statement"])
                .run()
        };
        run().success();
        db.conn()
            .batch_execute(&format!("DELETE FROM transfers WHERE id = '{id}'"))
            .expect("delete the row");
        let again = run();
        again.fails_with(1, "its ledger row is gone");
        assert!(
            !again.stderr.contains("--mode transaction"),
            "{iso:?}: {again:?}"
        );
        assert_eq!((db.balance(a), db.balance(b)), (990, 10), "{iso:?}");
    }
}

/// `lookup` of an id a run answered "not applied" (and so claimed) said an earlier attempt "may
/// still commit", which the claim rules out (found by a helper playing a new user); of an id a
/// single statement applied whose row was deleted since, it said nothing of that. Each now says
/// what the claim shows; an id never seen keeps the cautious words.
#[test]
fn lookup_says_what_an_id_s_claim_shows() {
    for iso in Iso::BOTH {
        let (db, a, b) = two_accounts_holding(iso, [5, 0]);
        let refused = Uuid::new_v4().to_string();
        let run = db.transfer(a, b, 10).args(["--id", &refused]).run();
        assert_eq!(run.code, 1, "{iso:?}: {run:?}");
        db.bank()
            .args(["lookup", &refused])
            .run()
            .fails_with(1, "a run said it was not applied and claimed its id");
        let gone = Uuid::new_v4().to_string();
        db.transfer(a, b, 1)
            .args(["--id", &gone, "--mode", "single-statement"])
            .run()
            .success();
        db.conn()
            .batch_execute(&format!("DELETE FROM transfers WHERE id = '{gone}'"))
            .expect("delete the row");
        db.bank()
            .args(["lookup", &gone])
            .run()
            .fails_with(1, "its ledger row is gone since");
        db.bank()
            .args(["lookup", &Uuid::new_v4().to_string()])
            .run()
            .fails_with(1, "may still commit");
    }
}

/// A DBA's rules that every transfer meets, and that an earlier attempt's probe of the accounts
/// met too: a refused transfer with `--id` was "unknown" (exit 3) on every rerun, since the
/// probe of whether an earlier attempt can still commit (`repo::accounts_free`) took the tables'
/// locks with an `UPDATE … WHERE false`, which fires statement triggers and needs the UPDATE
/// privilege on the ledger. An append-only ledger (a trigger refusing UPDATE and DELETE, or
/// the role without those privileges) is a common rule; a statement trigger closing the
/// accounts refused the probe as it refused every transfer. Found while reviewing the probe.
/// Now the refusal is said (exit 1), in both modes, for a single transfer and a file's line,
/// and nothing moves; also for a role granted bank's columns alone, which may not `LOCK` the
/// whole table (the probe's first `LOCK TABLE` made it unknown; a reviewer's case).
#[test]
fn a_refused_transfer_is_settled_under_a_dba_s_append_only_ledger_or_closed_accounts() {
    const CAP: &str = "ALTER TABLE accounts ADD CONSTRAINT dba_cap CHECK (balance <= 1100)";
    const APPEND_ONLY: &str = "CREATE FUNCTION append_only() RETURNS trigger LANGUAGE plpgsql AS \
         $$BEGIN RAISE EXCEPTION 'the ledger is append-only'; END$$; \
         CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON transfers \
         FOR EACH STATEMENT EXECUTE FUNCTION append_only()";
    const CLOSED: &str = "CREATE FUNCTION closed() RETURNS trigger LANGUAGE plpgsql AS \
         $$BEGIN RAISE EXCEPTION 'accounts closed for audit'; END$$; \
         CREATE TRIGGER closed BEFORE UPDATE ON accounts \
         FOR EACH STATEMENT EXECUTE FUNCTION closed()";
    let cases = [
        (
            "an append-only ledger by trigger",
            format!("{CAP}; {APPEND_ONLY}"),
            "dba_cap",
        ),
        (
            "an append-only ledger by privilege",
            CAP.to_string(),
            "dba_cap",
        ),
        (
            "a role granted bank's columns alone",
            format!("{CAP}; ALTER TABLE accounts ADD COLUMN owner_email TEXT"),
            "dba_cap",
        ),
        (
            "closed accounts",
            CLOSED.to_string(),
            "accounts closed for audit",
        ),
    ];
    for iso in Iso::BOTH {
        for (case, rule, words) in &cases {
            let db = ScratchDb::migrated_at(iso);
            let ids = db.accounts(&[1000, 1000]);
            db.conn().batch_execute(rule).expect("the DBA's rule");
            let url = match *case {
                "an append-only ledger by privilege" => {
                    db.role(
                        "LOGIN",
                        "GRANT SELECT, INSERT, UPDATE, DELETE ON accounts, transfer_claims, \
                         __diesel_schema_migrations TO {role}; \
                         GRANT SELECT, INSERT ON transfers TO {role}",
                    )
                    .1
                }
                // `LOCK TABLE` needs a privilege on the whole table: the probe falls back.
                "a role granted bank's columns alone" => {
                    db.role(
                        "LOGIN",
                        "GRANT SELECT (id, balance, opening_balance, version, created_at), \
                         UPDATE (balance, version) ON accounts TO {role}; \
                         GRANT SELECT, INSERT, UPDATE, DELETE ON transfers, transfer_claims \
                         TO {role}; GRANT SELECT ON __diesel_schema_migrations TO {role}",
                    )
                    .1
                }
                _ => db.url.expose().to_string(),
            };
            for mode in MODES {
                let id = Uuid::new_v4().to_string();
                for run in 1..=2 {
                    let got = crate::support::Bank::new()
                        .args(["--database-url", &url, "transfer", "--mode", mode])
                        .args(["--from", &ids[0].to_string(), "--to", &ids[1].to_string()])
                        .args(["--amount", "200", "--id", &id])
                        .run();
                    let what = format!("{iso:?}, {case}, {mode}, run {run}");
                    got.fails_with(1, words);
                    assert!(got.stderr.contains("not applied"), "{what}: {got:?}");
                }
            }
            let line = format!(
                "id,from,to,amount\n{},{},{},200\n",
                Uuid::new_v4(),
                ids[0],
                ids[1]
            );
            let file = run_file(&url, "f.csv", &line, &[]);
            assert_eq!(file.code, 1, "{iso:?}, {case}, file: {file:?}");
            assert_eq!(json_outcomes(&file), ["refused"], "{iso:?}, {case}");
            assert_eq!(
                (db.balance(ids[0]), db.balance(ids[1]), db.state().1),
                (1000, 1000, 0),
                "{iso:?}, {case}"
            );
        }
    }
}

/// A bank statement that waits for a lock: `THE_TRANSFER` (the transfer statement itself, not a
/// check made on connecting or a first read of the ledger), or `ANY` statement.
pub(crate) const THE_TRANSFER: &str = "WITH locked AS%";
const ANY: &str = "%";

/// Waits until `sessions` `bank` sessions of `db` wait on a lock in a statement `LIKE` `query`
/// (`THE_TRANSFER`, `ANY`): one whose snapshot a table rewrite committed meanwhile would hide
/// every row of the rewritten table from.
pub(crate) fn wait_for_statements_waiting(db: &ScratchDb, sessions: i64, query: &str) {
    crate::support::wait_until(
        &mut db.conn(),
        &format!(
            "(SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name LIKE 'bank%' AND wait_event_type = 'Lock' \
             AND query LIKE '{query}') >= {sessions}"
        ),
        "no bank statement waited on the rewrite's lock",
    );
}

/// A DBA's rewrite of `table` (`ALTER TABLE … ADD COLUMN … DEFAULT random()`, which PostgreSQL
/// documents as not MVCC-safe), begun and held open on `dba`: every statement on the table
/// queues behind it until `commit_rewrite`.
pub(crate) fn begin_rewrite(dba: &mut PgConnection, table: &str) {
    dba.batch_execute(&format!(
        "BEGIN; ALTER TABLE {table} ADD COLUMN dba_note FLOAT8 DEFAULT random()"
    ))
    .expect("the DBA's rewrite");
}

/// Commits `begin_rewrite`'s rewrite.
pub(crate) fn commit_rewrite(dba: &mut PgConnection) {
    dba.batch_execute("COMMIT").expect("commit the rewrite");
}

/// `bank transfer` of `transfer` with `args`, started while a DBA's rewrite of `table` is held
/// open, which commits once a statement `LIKE` `query` of the run waits for it; the run, and the
/// rewrite's column dropped again (no rewrite).
fn transfer_behind_a_rewrite(
    db: &ScratchDb,
    table: &str,
    query: &str,
    transfer: (Uuid, Uuid, i64),
    args: &[&str],
) -> crate::support::Run {
    let mut dba = db.conn();
    begin_rewrite(&mut dba, table);
    let child = crate::support::spawn_transfer(db.url.expose(), transfer, args);
    wait_for_statements_waiting(db, 1, query);
    commit_rewrite(&mut dba);
    let run = crate::support::Run::from(child.wait_with_output().expect("wait"));
    dba.batch_execute(&format!("ALTER TABLE {table} DROP COLUMN dba_note"))
        .expect("drop the DBA's column");
    run
}

/// A single transfer whose statement waited for a DBA's rewrite of `accounts` (held open, then
/// committed): in transaction mode its snapshot, taken before it waited, saw no row of the new
/// table, and it was refused, "account … exists, but the database left it unchanged (a trigger
/// or rule of the database's own)" (exit 1), at both levels (the transaction is SERIALIZABLE),
/// where one by one it applies (and a rerun applied it). It applies now, once (the ledger and
/// the balances say so), in both modes, with and without an id, at both levels; and so it does
/// behind a rewrite of the ledger (`transfers`), where a rerun of an id the ledger has, whose
/// first read of the ledger waited for the rewrite, answers "already applied" and moves nothing
/// (a lead's known case, reproduced by a helper; a workload's single statements, prepared
/// already, failed the same way at SERIALIZABLE:
/// `workload::workers_waiting_behind_a_rewrite_count_no_errors`).
#[test]
fn a_transfer_waiting_behind_a_table_rewrite_applies_once() {
    for iso in Iso::BOTH {
        for (table, query) in [("accounts", THE_TRANSFER), ("transfers", ANY)] {
            let (db, a, b) = two_accounts(iso);
            let mut moved = 0;
            for mode in MODES {
                for given in [false, true] {
                    let case = format!("{iso:?} {table} {mode} id given: {given}");
                    let id = Uuid::new_v4().to_string();
                    let mut args = vec!["--mode", mode, "--json", "--timeout", "20s"];
                    if given {
                        args.extend(["--id", &id]);
                    }
                    let run = transfer_behind_a_rewrite(&db, table, query, (a, b, 10), &args);
                    assert_eq!(run.code, 0, "{case}: {run:?}");
                    assert_eq!(run.json()["outcome"], "applied", "{case}: {run:?}");
                    moved += 10;
                    assert_eq!(
                        (db.balance(a), db.balance(b)),
                        (1000 - moved, moved),
                        "{case}"
                    );
                    if given {
                        // A rerun of a ledger's row is answered before the accounts are asked
                        // for: only a rewrite of the ledger keeps it waiting.
                        let rerun = match table {
                            "transfers" => {
                                transfer_behind_a_rewrite(&db, table, ANY, (a, b, 10), &args)
                            }
                            _ => db.transfer(a, b, 10).args(&args).run(),
                        };
                        assert_eq!(rerun.code, 0, "{case}: {rerun:?}");
                        assert_eq!(rerun.json()["outcome"], "already_applied", "{case}");
                        assert_eq!(db.balance(a), 1000 - moved, "{case}: applied once");
                    }
                    assert_eq!(db.state().1, moved / 10, "{case}: one ledger row each");
                }
            }
            db.bank().args(["verify"]).run().success();
        }
    }
}

/// A transfer whose claim of its id waited for a DBA's rewrite of `transfer_claims` (held open,
/// then committed): a single statement claims its id as it applies, and a refused transfer with
/// an id claims it before it says "not applied" (in both modes). Each gets its one-by-one
/// outcome, once, at both levels: the applied one applied (a rerun `already_applied`), the
/// refused one refused with nothing moved and no ledger row.
#[test]
fn a_transfer_whose_claim_waited_behind_a_rewrite_of_the_claims_gets_its_outcome() {
    for iso in Iso::BOTH {
        let (db, a, b) = two_accounts(iso);
        let mut moved = 0;
        for given in [false, true] {
            let case = format!("{iso:?} single-statement id given: {given}");
            let id = Uuid::new_v4().to_string();
            let mut args = vec!["--mode", "single-statement", "--json", "--timeout", "20s"];
            if given {
                args.extend(["--id", &id]);
            }
            let run = transfer_behind_a_rewrite(&db, "transfer_claims", ANY, (a, b, 10), &args);
            assert_eq!(run.code, 0, "{case}: {run:?}");
            assert_eq!(run.json()["outcome"], "applied", "{case}: {run:?}");
            moved += 10;
            assert_eq!(
                (db.balance(a), db.balance(b)),
                (1000 - moved, moved),
                "{case}"
            );
            if given {
                let rerun = db.transfer(a, b, 10).args(&args).run();
                assert_eq!(rerun.code, 0, "{case}: {rerun:?}");
                assert_eq!(rerun.json()["outcome"], "already_applied", "{case}");
            }
            assert_eq!(db.state().1, moved / 10, "{case}: one ledger row each");
        }
        for mode in MODES {
            let case = format!("{iso:?} {mode} refused");
            let id = Uuid::new_v4().to_string();
            let args = ["--mode", mode, "--json", "--timeout", "20s", "--id", &id];
            let run = transfer_behind_a_rewrite(&db, "transfer_claims", ANY, (a, b, 5000), &args);
            assert_eq!(run.code, 1, "{case}: {run:?}");
            assert_eq!(run.json()["outcome"], "failed", "{case}: {run:?}");
            assert!(run.stderr.contains("insufficient funds"), "{case}: {run:?}");
            assert_eq!(
                (db.balance(a), db.balance(b)),
                (1000 - moved, moved),
                "{case}"
            );
            assert_eq!(db.state().1, moved / 10, "{case}: no ledger row");
            let rerun = db.transfer(a, b, 5000).args(args).run();
            assert_eq!(rerun.code, 1, "{case}: {rerun:?}");
            assert_eq!(rerun.json()["outcome"], "failed", "{case}");
        }
        db.bank().args(["verify"]).run().success();
    }
}

/// A failed transfer's `--json` says why in the word a file's line gets for the same failure
/// (`"reason"`): a program told an overdraft from an unknown account only by the error's
/// words (a helper playing a new user). Each case is run both ways, one transfer and a
/// one-line file, at both levels, and the two words must agree.
#[test]
fn a_failed_transfer_s_json_gives_the_reason_a_file_s_line_would() {
    for iso in Iso::BOTH {
        let (db, a, b) = two_accounts(iso);
        let ghost = Uuid::new_v4();
        let taken = Uuid::new_v4();
        db.transfer(a, b, 1)
            .args(["--id", &taken.to_string()])
            .run()
            .success();
        let rich = db.accounts(&[i64::MAX])[0];
        db.conn()
            .batch_execute("ALTER TABLE transfers ADD CONSTRAINT dba_cap CHECK (amount < 900)")
            .expect("the DBA's cap");
        let cases = [
            ("insufficient_funds", b, a, 800, None),
            ("unknown_account", a, ghost, 1, None),
            ("unknown_account", ghost, a, 1, None),
            ("id_conflict", a, b, 2, Some(taken)),
            ("balance_overflow", a, rich, 5, None),
            // a holds 999: the DBA's cap refuses it.
            ("refused", a, b, 900, None),
        ];
        for (word, from, to, amount, id) in cases {
            let case = format!("{iso:?} {word} {amount}");
            let single_id = id.unwrap_or_else(Uuid::new_v4).to_string();
            let run = db
                .transfer(from, to, amount)
                .args(["--json", "--id", &single_id])
                .run();
            assert_eq!(run.code, 1, "{case}: {run:?}");
            assert_eq!(run.json()["outcome"], "failed", "{case}: {run:?}");
            let file_id = id.unwrap_or_else(Uuid::new_v4);
            let bank = db.bank();
            let path = bank.dir.path().join("one.csv");
            std::fs::write(
                &path,
                format!("id,from,to,amount\n{file_id},{from},{to},{amount}\n"),
            )
            .expect("write the file");
            let path = path.to_str().expect("utf-8 path").to_string();
            let file = bank.args(["transfer", "--file", &path, "--json"]).run();
            assert_eq!(file.code, 1, "{case}: {file:?}");
            let line: serde_json::Value =
                serde_json::from_str(file.stdout.lines().next().unwrap_or_default())
                    .unwrap_or_else(|e| panic!("{case}: not JSON ({e}): {file:?}"));
            assert_eq!(line["outcome"], word, "{case}: {file:?}");
            assert_eq!(run.json()["reason"], word, "{case}: {run:?}");
        }
    }
}

// The next two were written by a helper mutating the runner: each decision they hold could be
// broken with every other test passing, and each fails on its mutation.

/// A transfer with a given id that the database refuses with an error of its own (a DBA's
/// trigger) claims its id before it says "not applied", as one refused on its merits does: a
/// single statement of an earlier run's attempt that comes late must not apply the id after
/// that answer. With a refusal of the database's left out of `says_not_applied` (a mutation),
/// every other test passed, no claim was written, and a late single statement with the id
/// applied it after "not applied". Both modes, both levels.
#[test]
fn a_transfer_the_database_refuses_claims_its_id_before_saying_not_applied() {
    for iso in Iso::BOTH {
        for mode in MODES {
            let case = format!("{iso:?} {mode}");
            let (db, a, b) = two_accounts(iso);
            refuse_amount_13(&db);
            let id = Uuid::new_v4();
            let run = db
                .transfer(a, b, 13)
                .args(["--id", &id.to_string(), "--mode", mode, "--timeout", "5s"])
                .run();
            run.fails_with(1, "amount 13 is unlucky");
            let claims = bank::repo::claim_generations(&mut db.conn(), &[id]).expect("claims");
            assert_eq!(claims.len(), 1, "{case}: no claim of the id: {run:?}");
            // The trigger gone, a single statement with the id (an earlier attempt's, late)
            // cannot apply it after that answer.
            db.conn()
                .batch_execute("DROP TRIGGER t13 ON transfers")
                .expect("drop the trigger");
            let late = db
                .transfer(a, b, 13)
                .args(["--id", &id.to_string(), "--mode", "single-statement"])
                .run();
            late.fails_with(1, "claimed");
            assert_eq!(
                (db.balance(a), db.balance(b)),
                (1000, 0),
                "{case}: {late:?}"
            );
            assert_eq!(db.state().1, 0, "{case}");
        }
    }
}

/// A transfer with a given id refused on its merits by a role that may read `transfer_claims`
/// but not write it: the id cannot be claimed, so an earlier run's attempt at it may still
/// commit after "not applied": unknown (exit 3), as a file's line is
/// (`batch::a_refused_line_whose_claim_cannot_be_written_is_unknown`). With the claim's failure
/// turned into the refusal itself (a mutation), every other test passed and the run said "not
/// applied" (exit 1). Both modes, both levels.
#[test]
fn a_refused_transfer_whose_claim_cannot_be_written_is_unknown() {
    for iso in Iso::BOTH {
        for mode in MODES {
            let case = format!("{iso:?} {mode}");
            let (db, a, b) = two_accounts_holding(iso, [5, 0]);
            let (_, url) = db.role(
                "LOGIN",
                "GRANT SELECT, INSERT, UPDATE, DELETE ON accounts, transfers TO {role}; \
                 GRANT SELECT ON transfer_claims, __diesel_schema_migrations TO {role}",
            );
            let id = Uuid::new_v4().to_string();
            let run = crate::support::Bank::new()
                .args(["--database-url", &url, "transfer", "--mode", mode])
                .args(["--from", &a.to_string(), "--to", &b.to_string()])
                .args(["--amount", "7", "--id", &id, "--timeout", "5s"])
                .run();
            assert_eq!(run.code, 3, "{case}: {run:?}");
            assert!(
                run.stderr.contains("could not claim the id"),
                "{case}: {run:?}"
            );
            assert_eq!((db.balance(a), db.balance(b)), (5, 0), "{case}");
            assert_eq!(db.state().1, 0, "{case}");
        }
    }
}
