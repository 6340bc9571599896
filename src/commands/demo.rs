//! `demo`: the tutorial's flow.

use std::io::Write;

use diesel::pg::PgConnection;
use uuid::Uuid;

use super::accounts::{write_balances, TUTORIAL_BALANCES};
use super::transfer::receipt_line;
use crate::db::{DbUrl, Session};
use crate::error::Error;
use crate::models::{NewAccount, NewTransfer};
use crate::repo;
use crate::retry::RetryPolicy;
use crate::transfer::{Mode, Runner};

const DEMO_AMOUNT: i64 = 100;

/// The tutorial's flow, cleaning up after itself: only the rows it created are removed, even
/// when a step fails halfway.
pub(super) fn demo(url: &DbUrl, out: &mut impl Write) -> Result<(), Error> {
    let mut runner = Runner::new(
        Session::new(url.clone(), "bank-demo"),
        Mode::Transaction,
        RetryPolicy::default(),
    );
    let created: Vec<NewAccount> = TUTORIAL_BALANCES
        .into_iter()
        .map(NewAccount::with_balance)
        .collect();
    let ids: Vec<Uuid> = created.iter().map(|a| a.id).collect();
    let transfer_id = Uuid::new_v4();
    // A first Ctrl-C (or SIGTERM) stops the flow, not the process: killed, the demo left its
    // accounts behind and said nothing. What is in flight finishes, then the cleanup runs.
    crate::interrupt::catch();
    let mut creating = false;
    let flow = demo_flow(&mut runner, &created, transfer_id, &mut creating, out).and_then(|()| {
        match crate::interrupt::interrupted() {
            true => Err(Error::Stopped(crate::interrupt::reason())),
            false => Ok(()),
        }
    });
    let _ = out.flush();
    // Stopped before it created anything (no server, no schema): nothing to remove, and a
    // cleanup that failed the same way said it "could not remove" accounts never made.
    if !creating {
        return flow;
    }
    let cleanup = demo_cleanup(&mut runner.session, &ids, transfer_id);
    let removed = |(accounts, transfers): (usize, usize)| {
        format!(
            "{} and {}",
            crate::counted(accounts as u64, "account"),
            crate::counted(transfers as u64, "transfer")
        )
    };
    match (flow, cleanup) {
        (Ok(()), Ok(done)) => {
            writeln!(out, "Removed the demo's {}", removed(done))?;
            Ok(())
        }
        (Err(e), Ok((0, 0))) => Err(e),
        (Err(e), Ok(done)) => Err(Error::DemoStopped {
            source: Box::new(e),
            cleanup: format!("removed what it created: {}", removed(done)),
        }),
        (Ok(()), Err(e)) => Err(e),
        (Err(e), Err(cleanup)) => Err(Error::DemoStopped {
            source: Box::new(e),
            cleanup: format!(
                "could not remove what it created ({cleanup}): accounts {}",
                ids.iter()
                    .map(Uuid::to_string)
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
        }),
    }
}

fn demo_flow(
    runner: &mut Runner,
    created: &[NewAccount],
    transfer_id: Uuid,
    creating: &mut bool,
    out: &mut impl Write,
) -> Result<(), Error> {
    let conn = runner.session.conn()?;
    crate::db::require_migrated(conn)?;
    *creating = true;
    for account in created {
        repo::create(conn, account)?;
    }
    let [from, to] = [created[0].id, created[1].id];
    writeln!(out, "Created accounts {from} and {to}")?;
    print_demo_balances(conn, &[from, to], out)?;
    if crate::interrupt::interrupted() {
        return Err(Error::Stopped(crate::interrupt::reason()));
    }
    let t = NewTransfer {
        id: transfer_id,
        from_id: from,
        to_id: to,
        amount: DEMO_AMOUNT,
    };
    let receipt = runner.run(&t)?;
    writeln!(out, "{}", receipt_line(&receipt))?;
    print_demo_balances(runner.session.conn()?, &[from, to], out)?;
    Ok(())
}

fn print_demo_balances(
    conn: &mut PgConnection,
    ids: &[Uuid],
    out: &mut impl Write,
) -> Result<(), Error> {
    let accounts = repo::list_ids(conn, ids)?;
    write_balances(accounts.into_iter().map(Ok), false, out)
}

/// Deletes the demo's transfer (if it was made) and accounts; returns how many of each.
fn demo_cleanup(
    session: &mut Session,
    ids: &[Uuid],
    transfer_id: Uuid,
) -> Result<(usize, usize), Error> {
    let conn = session.conn()?;
    let result = conn.build_transaction().serializable().run(|conn| {
        let transfers = match repo::delete_transfer(conn, transfer_id) {
            Ok(()) => 1,
            Err(diesel::result::Error::NotFound) => 0,
            Err(e) => return Err(e),
        };
        let mut accounts = 0;
        for id in ids {
            match repo::delete(conn, *id) {
                Ok(()) => accounts += 1,
                Err(diesel::result::Error::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((accounts, transfers))
    })?;
    Ok(result)
}
