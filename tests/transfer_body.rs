//! The transfer body inside a test transaction: what it changes and how it refuses.

use bank::error::TransferError;
use bank::models::{NewAccount, NewTransfer};
use bank::repo;
use bank::transfer::{apply, BodyError};
use diesel::pg::PgConnection;
use diesel::Connection;
use uuid::Uuid;

use crate::support::{self, ScratchDb};

fn two_accounts(conn: &mut PgConnection, a: i64, b: i64) -> (Uuid, Uuid) {
    let x = repo::create(conn, &NewAccount::with_balance(a)).expect("create");
    let y = repo::create(conn, &NewAccount::with_balance(b)).expect("create");
    (x.id, y.id)
}

fn transfer(from: Uuid, to: Uuid, amount: i64) -> NewTransfer {
    NewTransfer {
        id: Uuid::new_v4(),
        from_id: from,
        to_id: to,
        amount,
    }
}

/// Runs the body in a savepoint, so a failure leaves the test transaction usable.
fn apply_in_savepoint(conn: &mut PgConnection, t: &NewTransfer) -> Result<(), BodyError> {
    conn.transaction(|c| apply(c, t))
}

fn balances(conn: &mut PgConnection, ids: [Uuid; 2]) -> [i64; 2] {
    ids.map(|id| {
        support::get(conn, id)
            .expect("get")
            .expect("exists")
            .balance
    })
}

#[test]
fn moves_money_and_writes_the_ledger() {
    let db = ScratchDb::migrated();
    let conn = &mut db.test_conn();
    let (a, b) = two_accounts(conn, 1000, 250);
    let t = transfer(a, b, 100);
    apply(conn, &t).expect("transfer");
    assert_eq!(balances(conn, [a, b]), [900, 350]);
    let row = repo::find_transfer(conn, t.id)
        .expect("query")
        .expect("ledger row");
    assert!(t.matches(&row));
}

#[test]
fn may_empty_an_account_but_not_overdraw_it() {
    let db = ScratchDb::migrated();
    let conn = &mut db.test_conn();
    let (a, b) = two_accounts(conn, 100, 0);
    let err = apply_in_savepoint(conn, &transfer(a, b, 101)).expect_err("overdraft");
    assert!(matches!(
        err,
        BodyError::Refused(TransferError::InsufficientFunds { account, amount: 101 }) if account == a
    ));
    assert_eq!(balances(conn, [a, b]), [100, 0]);
    assert_eq!(support::count_transfers(conn).expect("count"), 0);
    apply_in_savepoint(conn, &transfer(a, b, 100)).expect("exactly the balance");
    assert_eq!(balances(conn, [a, b]), [0, 100]);
}

#[test]
fn refuses_unknown_accounts_on_either_side() {
    let db = ScratchDb::migrated();
    let conn = &mut db.test_conn();
    let (a, b) = two_accounts(conn, 100, 100);
    let ghost = Uuid::new_v4();
    let err = apply_in_savepoint(conn, &transfer(ghost, b, 1)).expect_err("unknown from");
    assert!(matches!(err, BodyError::Refused(TransferError::UnknownAccount(id)) if id == ghost));
    let err = apply_in_savepoint(conn, &transfer(a, ghost, 1)).expect_err("unknown to");
    assert!(matches!(err, BodyError::Refused(TransferError::UnknownAccount(id)) if id == ghost));
    assert_eq!(balances(conn, [a, b]), [100, 100]);
    assert_eq!(support::count_transfers(conn).expect("count"), 0);
}

#[test]
fn refuses_a_transfer_id_already_in_the_ledger() {
    let db = ScratchDb::migrated();
    let conn = &mut db.test_conn();
    let (a, b) = two_accounts(conn, 100, 100);
    let t = transfer(a, b, 10);
    apply_in_savepoint(conn, &t).expect("first");
    let err = apply_in_savepoint(conn, &t).expect_err("second");
    assert!(matches!(err, BodyError::DuplicateId));
    assert_eq!(balances(conn, [a, b]), [90, 110]);
}

#[test]
fn opens_no_transaction_of_its_own() {
    let db = ScratchDb::migrated();
    let conn = &mut db.test_conn();
    let (a, b) = two_accounts(conn, 100, 100);
    // Inside the test transaction the body runs; the runner's BEGIN would be refused here.
    apply(conn, &transfer(a, b, 1)).expect("body runs inside the caller's transaction");
    let runner = conn.build_transaction().serializable().run(|c| {
        apply(c, &transfer(a, b, 1)).map_err(|_| diesel::result::Error::RollbackTransaction)
    });
    assert!(matches!(
        runner,
        Err(diesel::result::Error::AlreadyInTransaction)
    ));
}
