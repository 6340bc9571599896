//! The demo's own statements through the fault proxy: its accounts' INSERTs (each its own
//! commit), its cleanup's transaction and COMMIT, and what it says it left behind when its
//! transfer's COMMIT is lost or late. Earlier tests faulted only the transfer, so no fault
//! reached the demo's cleanup or its account of it (a mutation round's six survivors).

use std::thread;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use uuid::Uuid;

use crate::support::proxy::{upstream_of, At, Fault, Proxy, DRAINING};
use crate::support::{Bank, Run, ScratchDb};

/// Diesel's text for the demo's INSERT of an account, and its cleanup's DELETE of one.
const INSERT_ACCOUNT: &str = "INSERT INTO \"accounts\"";
const DELETE_ACCOUNT: &str = "DELETE FROM \"accounts\"";

/// `bank demo ARGS` through `proxy`, on a thread of its own.
fn demo(db: &ScratchDb, proxy: &Proxy, args: &[&str]) -> thread::JoinHandle<Run> {
    let mut all = vec![
        "--database-url".to_string(),
        proxy.url_for(&db.url),
        "demo".to_string(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    let bank = Bank::new().args(all);
    thread::spawn(move || bank.run())
}

/// Waits (up to 20 s) until `done` holds.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never happened: {what}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// The ids of the ledger's rows.
fn transfer_ids(db: &ScratchDb) -> Vec<Uuid> {
    use bank::schema::transfers;
    transfers::table
        .select(transfers::id)
        .load(&mut db.conn())
        .expect("transfer ids")
}

/// The first account's INSERT committed, and its answer was lost: the demo created nothing it
/// knows of, yet may have created that account. It runs its cleanup anyway, which removes it,
/// and says so; it does not end as if nothing had been made (the account stayed, unnamed).
#[test]
fn a_demo_whose_first_insert_committed_unanswered_removes_that_account() {
    let db = ScratchDb::migrated();
    let before = db.state();
    let proxy = Proxy::start(upstream_of(&db.url));
    proxy.lose_answer_to(INSERT_ACCOUNT, 1);
    let run = demo(&db, &proxy, &["--timeout", "10s"])
        .join()
        .expect("demo");
    assert_ne!(run.code, 0, "{run:?}");
    assert_eq!(db.state(), before, "{run:?}");
    assert!(
        run.stderr
            .contains("removed what it created: 1 account and 0 transfers"),
        "{run:?}"
    );
}

/// The same lost answer (at the first INSERT, or at the second once the first was answered),
/// and then no new connection can be made for the cleanup (a draining node refuses every
/// login): the demo names the account it may have created as one it may have ("if it was
/// created"), the one it knows it created plainly, and both are indeed left.
#[test]
fn a_demo_whose_unanswered_insert_cannot_be_cleaned_up_names_that_account() {
    for nth in [1, 2] {
        let db = ScratchDb::migrated();
        let before = db.state();
        let proxy = Proxy::start(upstream_of(&db.url));
        proxy.hold_parses_containing(INSERT_ACCOUNT);
        proxy.lose_answer_to(INSERT_ACCOUNT, nth);
        let run = demo(&db, &proxy, &["--timeout", "5s"]);
        // The demo's session is made and its INSERT on its way: every later login is refused.
        wait_until("the INSERT held", || proxy.parses_held() == 1);
        for _ in 0..1000 {
            proxy.arm_at(At::Connect, Fault::Crdb(DRAINING));
        }
        proxy.release_parses();
        let run = run.join().expect("demo");
        assert_ne!(run.code, 0, "{nth}: {run:?}");
        // The tutorial's balances tell its accounts apart: 1000 is created first, 250 second.
        let left: Vec<(Uuid, i64)> = db
            .state()
            .0
            .into_iter()
            .filter(|a| !before.0.contains(a))
            .collect();
        assert_eq!(left.len(), nth as usize, "{nth}: {run:?}");
        let named = |balance: i64| left.iter().find(|a| a.1 == balance).map(|a| a.0);
        let said = match (named(1000), named(250)) {
            (Some(first), None) => format!("account {first}, if it was created"),
            (Some(first), Some(second)) => {
                format!("account {first}, and {second} if it was created")
            }
            other => panic!("{nth}: left {other:?}: {run:?}"),
        };
        assert!(run.stderr.contains(&said), "{nth}: {said}: {run:?}");
        assert!(!run.stderr.contains("its transfer"), "{nth}: {run:?}");
    }
}

/// The first INSERT's connection lost before it was sent (nothing reached the server): the
/// demo ends with the loss alone, with no "removed what it created: 0 accounts" after it.
#[test]
fn a_demo_whose_first_insert_was_never_sent_says_only_why() {
    let db = ScratchDb::migrated();
    let before = db.state();
    let proxy = Proxy::start(upstream_of(&db.url));
    proxy.lose_binding_of(INSERT_ACCOUNT, 1);
    let run = demo(&db, &proxy, &["--timeout", "10s"])
        .join()
        .expect("demo");
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(db.state(), before, "{run:?}");
    assert!(!run.stderr.contains("removed"), "{run:?}");
    assert!(!run.stderr.contains("could not remove"), "{run:?}");
}

/// The cleanup's connection lost before its COMMIT was sent (its second DELETE of an account
/// answered by no one): nothing of it committed, so it runs again on a new connection and
/// removes everything, and the demo goes through.
#[test]
fn a_demo_whose_cleanup_lost_its_connection_before_the_commit_cleans_up_again() {
    let db = ScratchDb::migrated();
    let before = db.state();
    let proxy = Proxy::start(upstream_of(&db.url));
    proxy.lose_binding_of(DELETE_ACCOUNT, 2);
    let run = demo(&db, &proxy, &["--timeout", "10s"])
        .join()
        .expect("demo");
    went_through_and_cleaned_up(&run, &db, &before);
}

/// The cleanup's first attempt rolled back at its COMMIT (a 40001, CockroachDB's retry error),
/// its second attempt's connection then lost before that attempt's COMMIT: the flag that says a
/// COMMIT went out is the second attempt's, so it runs again on a new connection and removes
/// everything. (The first attempt's COMMIT, remembered, made the demo say it could not remove
/// what it created.)
#[test]
fn a_demo_whose_cleanup_was_retried_then_lost_before_its_commit_cleans_up_again() {
    let db = ScratchDb::migrated();
    let before = db.state();
    let proxy = Proxy::start(upstream_of(&db.url));
    proxy.hold_parses_containing(DELETE_ACCOUNT);
    // The first attempt binds the DELETE twice (two accounts); the second's first binding is
    // the third.
    proxy.lose_binding_of(DELETE_ACCOUNT, 3);
    let run = demo(&db, &proxy, &["--timeout", "10s"]);
    wait_until("the cleanup's DELETE held", || proxy.parses_held() == 1);
    let commits = proxy.commits();
    proxy.arm_at(At::Commit, Fault::Retry40001);
    proxy.release_parses();
    let run = run.join().expect("demo");
    assert_eq!(proxy.injected(), 1, "{run:?}");
    assert!(proxy.commits() > commits, "{run:?}");
    went_through_and_cleaned_up(&run, &db, &before);
}

/// The cleanup's COMMIT reached the server and its answer was lost: the demo said it "could
/// not remove what it created", naming rows that were gone (a mutation round's finding). A
/// cleanup is safe to run again, so it runs again on a new connection, which finds nothing
/// left: the lost COMMIT removed everything, and the demo says so and goes through.
#[test]
fn a_demo_whose_cleanup_commit_was_lost_settles_it_by_cleaning_up_again() {
    let db = ScratchDb::migrated();
    let before = db.state();
    let proxy = Proxy::start(upstream_of(&db.url));
    proxy.hold_parses_containing(DELETE_ACCOUNT);
    let run = demo(&db, &proxy, &["--timeout", "10s"]);
    wait_until("the cleanup's DELETE held", || proxy.parses_held() == 1);
    proxy.arm_at(At::Commit, Fault::CutAfterCommit);
    proxy.release_parses();
    let run = run.join().expect("demo");
    assert_eq!(proxy.injected(), 1, "{run:?}");
    went_through_and_cleaned_up(&run, &db, &before);
}

/// The same, the COMMIT lost before it reached the server (nothing of it committed): the
/// cleanup run again removes everything itself, and says how much.
#[test]
fn a_demo_whose_cleanup_commit_never_arrived_cleans_up_again() {
    let db = ScratchDb::migrated();
    let before = db.state();
    let proxy = Proxy::start(upstream_of(&db.url));
    proxy.hold_parses_containing(DELETE_ACCOUNT);
    let run = demo(&db, &proxy, &["--timeout", "10s"]);
    wait_until("the cleanup's DELETE held", || proxy.parses_held() == 1);
    proxy.arm_at(At::Commit, Fault::CutBeforeCommit);
    proxy.release_parses();
    let run = run.join().expect("demo");
    assert_eq!(proxy.injected(), 1, "{run:?}");
    went_through_and_cleaned_up(&run, &db, &before);
}

/// The cleanup's COMMIT lost, and no new connection can be made to run it again: the demo
/// cannot know whether its rows are gone, and says so; it does not say it removed them.
#[test]
fn a_demo_whose_cleanup_commit_was_lost_for_good_says_it_cannot_know() {
    let db = ScratchDb::migrated();
    let proxy = Proxy::start(upstream_of(&db.url));
    proxy.hold_parses_containing(DELETE_ACCOUNT);
    let run = demo(&db, &proxy, &["--timeout", "3s"]);
    wait_until("the cleanup's DELETE held", || proxy.parses_held() == 1);
    let transfer = transfer_ids(&db);
    assert_eq!(transfer.len(), 1);
    proxy.arm_at(At::Commit, Fault::CutAfterCommit);
    for _ in 0..1000 {
        proxy.arm_at(At::Connect, Fault::Crdb(DRAINING));
    }
    proxy.release_parses();
    let run = run.join().expect("demo");
    assert_ne!(run.code, 0, "{run:?}");
    assert!(!run.stdout.contains("Removed"), "{run:?}");
    assert!(
        run.stderr.contains("may or may not have removed"),
        "{run:?}"
    );
    assert!(
        run.stderr
            .contains(&format!("and its transfer {}", transfer[0])),
        "{run:?}"
    );
}

/// The transfer's COMMIT took effect and its answer was lost, and from then on no login is
/// accepted (a draining node): the transfer cannot be settled, nor the demo's rows removed.
/// What the demo says it left names that transfer as one that may have committed (it did).
#[test]
fn a_demo_whose_transfer_commit_was_lost_names_the_transfer_it_may_have_left() {
    let db = ScratchDb::migrated();
    let before = db.state();
    let proxy = Proxy::start(upstream_of(&db.url));
    proxy.hold_parses_containing("INSERT INTO transfers");
    let run = demo(&db, &proxy, &["--timeout", "2s"]);
    wait_until("the transfer's INSERT held", || proxy.parses_held() == 1);
    proxy.arm_at(At::Commit, Fault::CutAfterCommit);
    for _ in 0..1000 {
        proxy.arm_at(At::Connect, Fault::Crdb(DRAINING));
    }
    proxy.release_parses();
    let run = run.join().expect("demo");
    let transfer = transfer_ids(&db);
    assert_eq!(transfer.len(), 1, "{run:?}");
    assert_ne!(run.code, 0, "{run:?}");
    assert!(
        run.stderr
            .contains(&format!("its transfer {} if that committed", transfer[0])),
        "{run:?}"
    );
    // Leave the database as found.
    let (accounts, _) = db.state();
    let mut conn = db.conn();
    diesel::delete(bank::schema::transfers::table)
        .execute(&mut conn)
        .expect("delete the transfer");
    for (id, _) in accounts.iter().filter(|a| !before.0.contains(a)) {
        bank::repo::delete(&mut conn, *id).expect("delete the account");
    }
}

/// The demo exited 0 having removed its two accounts and its transfer.
fn went_through_and_cleaned_up(run: &Run, db: &ScratchDb, before: &(Vec<(Uuid, i64)>, i64)) {
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .contains("Removed the demo's 2 accounts and 1 transfer"),
        "{run:?}"
    );
    assert_eq!(&db.state(), before, "{run:?}");
}

/// The cleanup's first attempt rolled back at its COMMIT (a 40001), its second attempt's
/// connection lost before that attempt's COMMIT, and no new connection to be had: nothing of
/// the cleanup committed, and the demo says it could not remove its rows, not that it may have
/// (the first attempt's COMMIT is no COMMIT of the attempt that failed).
#[test]
fn a_demo_whose_retried_cleanup_was_lost_before_its_commit_could_not_remove_its_rows() {
    let db = ScratchDb::migrated();
    let proxy = Proxy::start(upstream_of(&db.url));
    proxy.hold_parses_containing(DELETE_ACCOUNT);
    proxy.lose_binding_of(DELETE_ACCOUNT, 3);
    let run = demo(&db, &proxy, &["--timeout", "3s"]);
    wait_until("the cleanup's DELETE held", || proxy.parses_held() == 1);
    proxy.arm_at(At::Commit, Fault::Retry40001);
    for _ in 0..1000 {
        proxy.arm_at(At::Connect, Fault::Crdb(DRAINING));
    }
    proxy.release_parses();
    let run = run.join().expect("demo");
    assert_ne!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("could not remove"), "{run:?}");
    assert!(
        !run.stderr.contains("may or may not have removed"),
        "{run:?}"
    );
    assert_eq!(db.state().0.len(), 2, "{run:?}");
}

/// The cleanup's COMMIT rolled back by a conflict on every attempt (CockroachDB's 40001, until
/// the deadline): it removed nothing, and the demo says it could not, not that it may have.
#[test]
fn a_demo_whose_cleanup_is_rolled_back_to_its_deadline_could_not_remove_its_rows() {
    let db = ScratchDb::migrated();
    let proxy = Proxy::start(upstream_of(&db.url));
    proxy.hold_parses_containing(DELETE_ACCOUNT);
    let run = demo(&db, &proxy, &["--timeout", "2s"]);
    wait_until("the cleanup's DELETE held", || proxy.parses_held() == 1);
    for _ in 0..1000 {
        proxy.arm_at(At::Commit, Fault::Retry40001);
    }
    proxy.release_parses();
    let run = run.join().expect("demo");
    assert_ne!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("could not remove"), "{run:?}");
    assert!(
        !run.stderr.contains("may or may not have removed"),
        "{run:?}"
    );
    assert_eq!(db.state().0.len(), 2, "{run:?}");
}

/// A server that stops answering while the demo creates its accounts (their INSERT held in the
/// network): the demo ends by its deadline and names both accounts as ones it may have created,
/// not "created nothing" (its watch's words before it starts creating).
#[test]
fn a_demo_frozen_while_creating_its_accounts_names_them_as_maybe_created() {
    let db = ScratchDb::migrated();
    let before = db.state();
    let proxy = Proxy::start(upstream_of(&db.url));
    proxy.hold_parses_containing(INSERT_ACCOUNT);
    let run = demo(&db, &proxy, &["--timeout", "1s"])
        .join()
        .expect("demo");
    assert_eq!(proxy.parses_held(), 1, "{run:?}");
    // The held INSERT goes nowhere: dropping the proxy closes its connection.
    drop(proxy);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("frozen or unreachable") && run.stderr.contains(", if it created them"),
        "{run:?}"
    );
    let named = run
        .stderr
        .split(|c: char| !(c.is_ascii_hexdigit() || c == '-'))
        .filter(|w| w.len() == 36 && w.parse::<Uuid>().is_ok())
        .count();
    assert_eq!(named, 2, "{run:?}");
    assert_eq!(db.state(), before, "{run:?}");
}
