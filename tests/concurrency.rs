//! Committed data, several real connections, a Barrier: conflicts happen and are retried.

use std::sync::{Arc, Barrier};
use std::thread;

use bank::db::Session;
use bank::models::NewTransfer;
use bank::retry::{classify, Cause, Phase, RetryCounts, RetryPolicy};
use bank::transfer::{Mode, Runner};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::Uuid as SqlUuid;
use std::time::Duration;
use uuid::Uuid;

use crate::support::{Iso, ScratchDb};

/// Two serializable transactions update the same row: PostgreSQL aborts one with 40001, and the
/// classifier calls it a serialization failure.
#[test]
fn a_real_serialization_failure_is_classified_retryable() {
    let db = ScratchDb::migrated();
    let [id] = db.accounts(&[100])[..] else {
        panic!("one account")
    };
    let barrier = Arc::new(Barrier::new(2));
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let url = db.url.clone();
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                let mut conn = url.connect().expect("connect");
                conn.build_transaction().serializable().run(|c| {
                    // Both take their snapshot before either writes.
                    c.batch_execute("SELECT balance FROM accounts")?;
                    barrier.wait();
                    diesel::sql_query("UPDATE accounts SET balance = balance + 1 WHERE id = $1")
                        .bind::<SqlUuid, _>(id)
                        .execute(c)?;
                    Ok::<_, diesel::result::Error>(())
                })
            })
        })
        .collect();
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    let failures: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(failures.len(), 1, "exactly one loses: {results:?}");
    assert_eq!(
        classify(failures[0], Phase::BeforeCommit),
        Some(Cause::Serialization),
        "{:?}",
        failures[0]
    );
    assert_eq!(db.balance(id), 101);
}

/// Runs `work(worker, session)` on `workers` threads, each with its own connection, all
/// starting together.
fn run_workers<T: Send + 'static>(
    db: &ScratchDb,
    workers: usize,
    work: impl Fn(usize, Session) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let barrier = Arc::new(Barrier::new(workers));
    let work = Arc::new(work);
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let mut session = Session::new(db.url.clone(), "bank-test");
            let barrier = Arc::clone(&barrier);
            let work = Arc::clone(&work);
            thread::spawn(move || {
                session.conn().expect("connect");
                barrier.wait();
                work(w, session)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("worker"))
        .collect()
}

/// Workers hammer the same two accounts in both directions through the transfer service: they
/// conflict, retry, and every transfer lands exactly once with the total conserved.
#[test]
fn conflicting_transfers_are_retried_and_conserve_the_total() {
    const WORKERS: usize = 4;
    const EACH: usize = 25;
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[1_000_000, 1_000_000]);
    let policy = RetryPolicy {
        max_attempts: 50,
        base: Duration::from_millis(1),
        cap: Duration::from_millis(50),
        ..RetryPolicy::default()
    };
    let per_worker = run_workers(&db, WORKERS, move |w, session| {
        let mut runner = Runner::new(session, Mode::Transaction, policy);
        for i in 0..EACH {
            let (from, to) = if (w + i) % 2 == 0 {
                (ids[0], ids[1])
            } else {
                (ids[1], ids[0])
            };
            let t = NewTransfer {
                id: Uuid::new_v4(),
                from_id: from,
                to_id: to,
                amount: 1 + i as i64,
            };
            runner.run(&t).expect("transfer commits");
        }
        runner.retries
    });
    let mut retries = RetryCounts::default();
    for r in per_worker {
        retries += r;
    }
    assert!(
        retries.serialization > 0,
        "expected serialization failures: {retries:?}"
    );
    let (accounts, transfers) = db.state();
    assert_eq!(transfers, (WORKERS * EACH) as i64);
    assert_eq!(accounts.iter().map(|a| a.1).sum::<i64>(), 2_000_000);
    let report = bank::verify::verify(&mut db.conn()).expect("verify");
    assert!(report.ok, "{report:?}");
}

/// The single-statement mode under the same contention, at both isolation levels.
#[test]
fn single_statement_transfers_conserve_the_total_under_contention() {
    for iso in Iso::BOTH {
        single_statement_under_contention(iso);
    }
}

fn single_statement_under_contention(iso: Iso) {
    const WORKERS: usize = 4;
    const EACH: usize = 25;
    let db = ScratchDb::migrated_at(iso);
    let ids = db.accounts(&[500, 500, 500]);
    let committed: i64 = run_workers(&db, WORKERS, move |w, session| {
        let mut runner = Runner::new(session, Mode::SingleStatement, RetryPolicy::default());
        let mut committed = 0;
        for i in 0..EACH {
            let t = NewTransfer {
                id: Uuid::new_v4(),
                from_id: ids[(w + i) % 3],
                to_id: ids[(w + i + 1) % 3],
                amount: 7,
            };
            match runner.run(&t) {
                Ok(_) => committed += 1,
                Err(bank::error::TransferError::InsufficientFunds { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        committed
    })
    .into_iter()
    .sum();
    let (accounts, transfers) = db.state();
    assert_eq!(transfers, committed);
    assert_eq!(accounts.iter().map(|a| a.1).sum::<i64>(), 1500);
    let report = bank::verify::verify(&mut db.conn()).expect("verify");
    assert!(report.ok && report.negative_balances == 0, "{report:?}");
}
