//! `demo`: the tutorial's flow.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use diesel::pg::PgConnection;
use uuid::Uuid;

use super::accounts::{write_balances, TUTORIAL_BALANCES};
use super::transfer::receipt_line;
use crate::cli::DemoArgs;
use crate::db::{DbUrl, Session};
use crate::error::{Error, TransferError};
use crate::models::{NewAccount, NewTransfer};
use crate::repo;
use crate::retry::{
    classify, may_have_committed, retry_read, retry_rolled_back, retry_transaction, Cause, Phase,
    RetryPolicy,
};
use crate::transfer::{Mode, Runner};

const DEMO_AMOUNT: i64 = 100;

/// How far the demo got, for the one line it exits with when the database stops answering.
#[derive(Clone, Copy)]
#[repr(u8)]
enum Stage {
    Starting,
    Creating,
    Created,
    Transferring,
    Transferred,
}

/// The tutorial's flow, cleaning up after itself: only the rows it created are removed, even
/// when a step fails halfway.
pub(super) fn demo(url: &DbUrl, args: &DemoArgs, out: &mut impl Write) -> Result<(), Error> {
    let policy = RetryPolicy {
        timeout: args.timeout,
        ..RetryPolicy::default()
    };
    let session = || Session::new(url.clone(), "bank-demo").with_timeout(args.timeout);
    // The transfer has a runner and a connection of its own, given up at its deadline even on
    // a frozen server (`run_guarded`); the other steps share one, closed while the transfer
    // runs (see `demo_flow`).
    let runner = Runner::new(session(), Mode::Transaction, policy);
    let mut steps = session();
    let created: Vec<NewAccount> = TUTORIAL_BALANCES
        .into_iter()
        .map(NewAccount::with_balance)
        .collect();
    let ids: Vec<Uuid> = created.iter().map(|a| a.id).collect();
    let transfer_id = Uuid::new_v4();
    // A frozen server (SIGSTOP, a paused VM) answers no statement, and its kernel keeps the
    // connection open: only the transfer had a deadline, and the demo waited forever elsewhere.
    // Now each step may go `--timeout` without an answer; then the demo ends, naming what it
    // leaves behind, since it cannot remove it.
    let stage = Arc::new(AtomicU8::new(Stage::Starting as u8));
    let seen = Arc::clone(&stage);
    let names = ids
        .iter()
        .map(Uuid::to_string)
        .collect::<Vec<_>>()
        .join(" and ");
    crate::guard::watch(args.timeout, move || {
        let stage = seen.load(Ordering::SeqCst);
        let ours = match stage {
            s if s == Stage::Starting as u8 => return "the demo created nothing".to_string(),
            s if s == Stage::Creating as u8 => format!("accounts {names}, if it created them"),
            _ => format!("accounts {names}{}", transfer_left(stage, transfer_id)),
        };
        format!(
            "the server is frozen or unreachable; the demo could not remove what it created: \
             {ours}"
        )
    })?;
    // A first Ctrl-C (or SIGTERM) stops the flow, not the process: killed, the demo left its
    // accounts behind and said nothing. What is in flight finishes, then the cleanup runs.
    crate::interrupt::catch();
    let mut made = Made::default();
    let flow = demo_flow(
        &mut steps,
        runner,
        &created,
        transfer_id,
        &stage,
        &mut made,
        out,
    )
    .and_then(|()| match crate::interrupt::interrupted() {
        true => Err(Error::Stopped(crate::interrupt::reason())),
        false => Ok(()),
    });
    let _ = out.flush();
    // Stopped before it created anything (no server, no schema, an INSERT the server
    // refused or cancelled): nothing to remove, and a cleanup that failed the same way said it
    // "could not remove" accounts never made.
    if made.created == 0 && !made.unsure {
        return flow;
    }
    let cleanup = demo_cleanup(&mut steps, &policy, &ids, transfer_id);
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
            source: Box::new(settled_by_cleanup(e, done)),
            cleanup: format!("removed what it created: {}", removed(done)),
        }),
        // What is left is named, the transfer too once it committed or may have: a cleanup
        // that failed after a flow that went through said only the database's error.
        (flow, Err(cleanup)) => {
            let transfer = transfer_left(stage.load(Ordering::SeqCst), transfer_id);
            let left = format!("{}{transfer}", made.named(&ids));
            let (said, cleanup, again) = match cleanup {
                CleanupFailed::Failed(e) => ("could not remove", e, None),
                // Its COMMIT's answer lost, and no second run to settle it: "could not
                // remove" would send the user looking for rows that may be gone.
                CleanupFailed::Unknown { lost, again } => (
                    "may or may not have removed",
                    lost,
                    Some(format!("running it again failed: {again}")),
                ),
            };
            Err(match flow {
                Ok(()) => Error::DemoStopped {
                    cleanup: match again {
                        Some(again) => format!("{said} what it created ({again}): {left}"),
                        None => format!("{said} what it created: {left}"),
                    },
                    source: cleanup,
                },
                Err(e) => Error::DemoStopped {
                    source: Box::new(e),
                    cleanup: match again {
                        Some(again) => {
                            format!("{said} what it created ({cleanup}; {again}): {left}")
                        }
                        None => format!("{said} what it created ({cleanup}): {left}"),
                    },
                },
            })
        }
    }
}

/// The demo's transfer among what it leaves behind at `stage`: named once it committed, or may
/// have.
fn transfer_left(stage: u8, transfer_id: Uuid) -> String {
    match stage {
        s if s == Stage::Transferred as u8 => format!(", and its transfer {transfer_id}"),
        s if s == Stage::Transferring as u8 => {
            format!(", and its transfer {transfer_id} if that committed")
        }
        _ => String::new(),
    }
}

/// How many of its accounts the demo created, for what it says it could not remove.
#[derive(Default)]
struct Made {
    created: usize,
    /// The next one's INSERT was under way when its connection went: it may exist.
    unsure: bool,
}

impl Made {
    /// "accounts A and B", "account A", or "account A, and B if it was created".
    fn named(&self, ids: &[Uuid]) -> String {
        let sure: Vec<String> = ids.iter().take(self.created).map(Uuid::to_string).collect();
        let maybe = ids.get(self.created).filter(|_| self.unsure);
        match (sure.as_slice(), maybe) {
            ([], Some(m)) => format!("account {m}, if it was created"),
            ([one], None) => format!("account {one}"),
            ([one], Some(m)) => format!("account {one}, and {m} if it was created"),
            (all, _) => format!("accounts {}", all.join(" and ")),
        }
    }
}

fn demo_flow(
    session: &mut Session,
    runner: Runner,
    created: &[NewAccount],
    transfer_id: Uuid,
    stage: &AtomicU8,
    made: &mut Made,
    out: &mut impl Write,
) -> Result<(), Error> {
    let reached = |s: Stage| {
        stage.store(s as u8, Ordering::SeqCst);
        crate::guard::tick();
    };
    // `--timeout`, the transfer's deadline, bounds the other steps' retries too.
    let timeout = runner.policy.timeout;
    let conn = session.checked(timeout, |conn| crate::db::require_writable(conn, timeout))?;
    reached(Stage::Creating);
    for account in created {
        // Run again while a conflict of the moment rolled it back (another session's lock held
        // past the server's lock_timeout: the demo failed at once), until `--timeout`.
        let create = retry_rolled_back(timeout, || repo::create(conn, account), rolled_back);
        if let Err(e) = create {
            // A statement that is its own commit: a timeout or a conflict created nothing; a
            // connection lost meanwhile, or an error nobody classified, may have.
            made.unsure = may_have_committed(&e);
            // Ctrl-C stopped it being run again (`retry_rolled_back`): said as such.
            if crate::retry::stopped_by_ctrl_c(&e) {
                return Err(Error::Stopped(crate::interrupt::reason()));
            }
            return Err(e.into());
        }
        made.created += 1;
    }
    reached(Stage::Created);
    let [from, to] = [created[0].id, created[1].id];
    writeln!(out, "Created accounts {from} and {to}")?;
    print_demo_balances(conn, &[from, to], timeout, out)?;
    crate::guard::tick();
    if crate::interrupt::interrupted() {
        return Err(Error::Stopped(crate::interrupt::reason()));
    }
    let t = NewTransfer {
        id: transfer_id,
        from_id: from,
        to_id: to,
        amount: DEMO_AMOUNT,
    };
    // One connection at a time: a role may be allowed only one (`CONNECTION LIMIT 1`), and the
    // transfer's was refused at login until its deadline while this one sat idle.
    session.reset();
    reached(Stage::Transferring);
    // The transfer keeps its own deadline (the same `--timeout`) and says how it ended.
    let receipt = crate::guard::untimed(|| runner.run_guarded(&t)).inspect_err(|e| {
        // Refused, or given up before its COMMIT was sent: nothing of it can commit, and the
        // line a frozen server ends with must not send the user looking for it.
        if !matches!(e, TransferError::OutcomeUnknown { .. }) {
            reached(Stage::Created);
        }
    })?;
    reached(Stage::Transferred);
    writeln!(out, "{}", receipt_line(&receipt))?;
    again_if_lost(session, |conn, _| {
        print_demo_balances(conn, &[from, to], timeout, &mut *out)
    })?;
    crate::guard::tick();
    Ok(())
}

fn print_demo_balances(
    conn: &mut PgConnection,
    ids: &[Uuid],
    timeout: std::time::Duration,
    out: &mut impl Write,
) -> Result<(), Error> {
    // A read, run again while a conflict of the moment stops it (`retry_read`).
    let accounts = retry_read(timeout, || repo::list_ids(conn, ids))?;
    write_balances(accounts.into_iter().map(Ok), false, out)
}

/// `e` when it says its statement, its own commit, applied nothing (a conflict of the moment
/// then runs it again: `retry_rolled_back`); none when it may have committed.
fn rolled_back(e: &diesel::result::Error) -> Option<&diesel::result::Error> {
    (!may_have_committed(e)).then_some(e)
}

/// Runs `step` on `session`'s connection, and once more on a new one if the first was found
/// lost before `step` reached a COMMIT (`step` sets its flag as it is about to commit). The
/// demo's steps share a connection that sits idle while the transfer runs on its own: a server
/// that closes idle sessions (`idle_session_timeout`), or a restart meanwhile, left the last
/// steps and the cleanup failing on it, and the demo's rows behind.
fn again_if_lost<T>(
    session: &mut Session,
    mut step: impl FnMut(&mut PgConnection, &mut bool) -> Result<T, Error>,
) -> Result<T, Error> {
    let mut committing = false;
    let first = step(connected(session)?, &mut committing);
    match first {
        Err(Error::Database(e))
            if !committing && classify(&e, Phase::BeforeCommit) == Some(Cause::ConnectionLost) =>
        {
            log::debug!("demo: the connection was lost ({e}); again on a new one");
            session.reset();
            step(connected(session)?, &mut false)
        }
        first => first,
    }
}

/// `session`'s connection, opened if need be. The transfer's connection, closed a moment ago,
/// may still count against the role's limit on the server, so a login refused for a reason
/// that may pass is tried again for up to a second.
fn connected(session: &mut Session) -> Result<&mut PgConnection, Error> {
    let started = std::time::Instant::now();
    loop {
        match session.conn() {
            Ok(_) => break,
            Err(e) if e.is_transient() && started.elapsed() < LOGIN_AGAIN_FOR => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(session.conn()?)
}

/// How long the demo tries again a login refused for a reason that may pass (`connected`).
const LOGIN_AGAIN_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// Deletes the demo's transfer (if it was made) and accounts; returns how many of each.
///
/// Run again while a conflict of the moment rolls it back (a deadlock, a serialization failure,
/// the server's `lock_timeout`), as every transaction of bank's is: after a Ctrl-C, the transfer
/// given up on may still hold its locks on the server until its statement ends, and the cleanup
/// that met them failed at once, leaving the demo's accounts behind.
fn demo_cleanup(
    session: &mut Session,
    policy: &RetryPolicy,
    ids: &[Uuid],
    transfer_id: Uuid,
) -> Result<(usize, usize), CleanupFailed> {
    // What the attempt whose COMMIT went out removed, should that COMMIT's answer be lost.
    let mut sent = None;
    let cleanup = |session: &mut Session, sent: &mut Option<(usize, usize)>| {
        again_if_lost(session, |conn, committing| {
            // Each attempt is a sign of life (`retry_transaction` ticks): the watch must not
            // take a cleanup that is being rolled back and run again for a frozen server.
            Ok(retry_transaction(policy, || {
                *sent = None;
                let removed = remove_demo_rows(conn, ids, transfer_id, sent);
                *committing = sent.is_some();
                removed
            })?)
        })
    };
    match cleanup(session, &mut sent) {
        // The COMMIT went out and its answer was lost: it removed all of the demo's rows or
        // none. Removing them is safe to run again, and what a run on a new connection finds
        // settles it: nothing left is the lost COMMIT's doing. The demo said it "could not
        // remove" rows that were gone (a mutation round's finding).
        Err(Error::Database(e)) if may_have_committed(&e) => {
            let Some(lost) = sent else {
                return Err(CleanupFailed::Failed(Box::new(Error::Database(e))));
            };
            log::debug!("demo: the cleanup's COMMIT was lost ({e}); again on a new connection");
            session.reset();
            match cleanup(session, &mut None) {
                Ok((0, 0)) => Ok(lost),
                Ok(again) => Ok(again),
                Err(again) => Err(CleanupFailed::Unknown {
                    lost: Box::new(Error::Database(e)),
                    again: Box::new(again),
                }),
            }
        }
        done => done.map_err(|e| CleanupFailed::Failed(Box::new(e))),
    }
}

/// Why `demo_cleanup` did not remove the demo's rows, or may not have.
enum CleanupFailed {
    /// It failed before its COMMIT, or its COMMIT was refused: nothing was removed.
    Failed(Box<Error>),
    /// Its COMMIT's answer was lost (`lost`), and running it again failed (`again`): the rows
    /// may or may not be gone.
    Unknown { lost: Box<Error>, again: Box<Error> },
}

/// `demo_cleanup` on one connection; `sending` is set to what it removed as its COMMIT is about
/// to be sent.
fn remove_demo_rows(
    conn: &mut PgConnection,
    ids: &[Uuid],
    transfer_id: Uuid,
    sending: &mut Option<(usize, usize)>,
) -> Result<(usize, usize), diesel::result::Error> {
    conn.build_transaction().serializable().run(|conn| {
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
        *sending = Some((accounts, transfers));
        Ok((accounts, transfers))
    })
}

/// The transfer's unknown outcome (its COMMIT unanswered at its deadline), settled by a cleanup
/// that removed both accounts: deleting them waited for the transfer's transaction to end (its
/// row locks), and the cleanup's serializable transaction then saw its ledger row if it
/// committed. A row removed is the transfer applied; none, one that was not and cannot be, its
/// accounts gone. The error told the user to rerun `bank transfer --id` of accounts the demo
/// had just removed (found by a fault-injecting helper).
fn settled_by_cleanup(e: Error, (accounts, transfers): (usize, usize)) -> Error {
    match e {
        Error::Transfer(TransferError::OutcomeUnknown { id, reason })
            if accounts == TUTORIAL_BALANCES.len() =>
        {
            Error::DemoTransferSettled {
                id,
                reason,
                applied: transfers > 0,
            }
        }
        e => e,
    }
}
