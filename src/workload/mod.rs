//! `bank workload`: concurrent random transfers through the same runner `bank transfer` uses,
//! then a Jepsen-style check of the bank's invariants. `crew.rs` starts the workers and watches
//! them (a transfer stuck on a frozen server is given up on at its deadline and its worker
//! replaced), `worker.rs` is one worker, `report.rs` what the run reports.

mod crew;
mod histogram_log;
mod html;
mod output;
mod report;
mod timeline;
mod worker;

pub use report::{Invariants, Latency, Report};

use std::io::{self, Write};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use diesel::pg::PgConnection;
use diesel::Connection;
use rand::Rng;
use uuid::Uuid;

use crate::db::DbUrl;
use crate::error::{ConnectError, Error, WorkloadError};
use crate::models::NewAccount;
use crate::repo;
use crate::retry::{
    classify, may_have_committed, retry, retry_transaction, Attempt, Cause, Phase, RetryCounts,
    RetryPolicy, Stop,
};
use crate::transfer::Mode;
use crate::verify;
use crew::Crew;
use output::Output;
use report::FinalCheck;
use timeline::Timeline;
use worker::{IdPrefix, Live};

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub accounts: u64,
    /// Take the first `accounts` existing accounts instead of creating new ones.
    pub reuse_accounts: bool,
    pub balance: i64,
    pub concurrency: u64,
    /// Run for this long, or ...
    pub duration: Option<Duration>,
    /// ... attempt this many transfers in all.
    pub transfers: Option<u64>,
    pub max_amount: i64,
    pub seed: Option<u64>,
    pub mode: Mode,
    pub policy: RetryPolicy,
    pub json: bool,
    /// How often progress is shown (a live line on a terminal, a table line otherwise).
    pub display_every: Duration,
    /// Extra workers that read every balance in one snapshot, over and over (Jepsen's bank read).
    pub readers: u64,
    /// How long the final check may go without an answer.
    pub check_timeout: Duration,
    /// Where to write each interval's latency histogram (HdrHistogram interval log).
    pub histogram: Option<std::path::PathBuf>,
    /// Where to write the HTML report (charts per second and the final report).
    pub report: Option<std::path::PathBuf>,
    /// Each worker applies this many random transfers at a time, through `transfer --file`'s
    /// chunk statement.
    pub batch: Option<u64>,
    /// The isolation level of those transfers' transactions (`None`: `batch::Isolation`'s default).
    pub batch_isolation: Option<crate::batch::Isolation>,
}

pub fn run(url: &DbUrl, config: &Config, out: &mut impl Write) -> Result<(), Error> {
    let policy = config.policy;
    if config.batch.is_some() && config.mode == Mode::SingleStatement {
        return Err(Error::Usage(
            "--batch runs each chunk in a transaction: it cannot be combined with \
             --mode single-statement"
                .into(),
        ));
    }
    if config.batch_isolation.is_some() && config.batch.is_none() {
        return Err(Error::Usage(
            "--batch-isolation applies to --batch only: the other modes' transactions have \
             their own level"
                .into(),
        ));
    }
    // Checked first: a path that cannot be written is refused before anything changes.
    let (report_out, histogram_out) =
        output::prepare(config.report.as_deref(), config.histogram.as_deref())?;
    let histogram = histogram_out.as_ref().map(Output::writer).transpose()?;
    crate::interrupt::catch();
    // The setup's statements have no deadline of their own: on a frozen server, or a lock held
    // elsewhere, the workload waited forever before its first transfer. Each step (the
    // connection, a chunk of accounts, the totals, which read every account) may take what a
    // read may, `--check-timeout`, or the transfers' `--timeout` if longer: a run made to study
    // tight deadlines (`--timeout 2ms`) could not get past its setup. The transfers and the
    // final check that follow keep their own deadlines.
    let made = Arc::new(crate::guard::Created::default());
    let seen = Arc::clone(&made);
    let total = config.accounts;
    let setup_timeout = config.check_timeout.max(policy.timeout);
    let raise = match config.check_timeout >= policy.timeout {
        true => "--check-timeout",
        false => "--timeout",
    };
    crate::guard::watch(setup_timeout, move || {
        let (created, committing) = seen.read();
        format!(
            "a step of the setup is slower than that (raise {raise}), {}; the workload stopped \
             before its first transfer ({}{})",
            crate::guard::WRITE_STALLS,
            match created {
                0 => "it created no account".to_string(),
                n => format!("{n} of its {total} accounts created, which stay"),
            },
            match committing {
                0 => String::new(),
                n => format!("; {n} more, whose COMMIT was under way, may or may not have been"),
            }
        )
    })?;
    let mut setup = url.connect_to_write(setup_timeout)?;
    // Before anything: with `--reuse-accounts` nothing in the setup writes, and every worker's
    // transfer then failed in turn.
    if crate::repo::read_only(&mut setup)? {
        return Err(Error::WorkloadReadOnly);
    }
    crate::guard::tick();
    let ids = prepare_accounts(&mut setup, config, &made)?;
    // A read: run again while a conflict of the moment rolls it back (another session's lock
    // held past the server's lock_timeout; on CockroachDB, a read in a serializable
    // transaction meeting a write), as the chunks before it are: it failed the run at once.
    // Nothing is written by it: a connection lost meanwhile (its backend ended by a DBA or a
    // pooler, the server restarting) is made again and the read run again, until the setup's
    // deadline, whose watch says how many accounts were created. It ended the run at once,
    // exit 1, with the server's words alone, the accounts it had created left unsaid (a helper
    // playing a new user).
    let (starting_total, since) = url.read_reconnecting(&mut setup, setup_timeout, |setup| {
        crate::retry::retry_read(setup_timeout, || repo::totals_and_versions(setup, &ids))
            .map_err(Error::Database)
    })?;
    drop(setup);
    crate::guard::stop_watch();

    let started = Instant::now();
    let (histogram_log, histogram_written) = match histogram {
        Some(file) => {
            let (log, written) = histogram_log::HistogramLog::start(file, SystemTime::now())
                .map_err(Error::Thread)?;
            (Some(log), Some(written))
        }
        None => (None, None),
    };
    let end = match config.duration {
        Some(d) => Some(
            started
                .checked_add(d)
                .ok_or_else(|| Error::Usage(format!("--duration {d:?} is too long")))?,
        ),
        None => None,
    };
    let crew = Crew {
        url: url.clone(),
        ids: Arc::new(ids),
        since: Arc::new(since),
        live: Arc::new(Live::new(started)?),
        // Never from `--seed`: the prefix tells this run's ledger rows from every other run's,
        // the same seed's included.
        prefix: IdPrefix(rand::rng().random()),
        config: config.clone(),
        started,
        end,
        histogram_log: std::sync::Mutex::new(histogram_log),
    };
    let mut slots = Vec::new();
    let mut workers_not_started = 0;
    for w in 0..config.concurrency {
        log::debug!("workload: starting worker {w}");
        match crew.spawn(w) {
            Ok(slot) => slots.push(slot),
            // A thread the system will not start once others have: the started workers are
            // already transferring, and ending the run there (as it did) left their work
            // without a report. The run goes on with them, as `transfer --file` goes on with
            // the connections it has: a run on fewer workers still checks every invariant,
            // and its report counts the workers that did not start.
            Err(Error::Thread(e)) if w > 0 => {
                workers_not_started = config.concurrency - w;
                crew::started_fewer(w, config.concurrency, "worker", &e);
                break;
            }
            Err(e) => return Err(e),
        }
    }
    let readers = crew.readers(config.readers, starting_total);
    let probe = config.report.is_some().then(|| crew.probe());
    let watchdog = crew.watch(&mut slots, probe.as_ref())?;
    // The transfers' time: what follows (the readers' last reads, up to 250 ms; the histogram
    // log's last write) counted in it, and a 2 s run with readers said 2.27 s and a throughput
    // a ninth too low (found by a helper).
    let elapsed = started.elapsed();
    if let Some(p) = &probe {
        p.stop();
    }
    let reads = readers.stop();
    // A log that could not be written fails the run, after its report: the run itself is the
    // thing worth seeing.
    let histogram_result = histogram_written.map(|w| w.wait());

    // The final check reads every balance and the whole ledger, which takes longer as the
    // ledger grows: a read's timeout, not what was left of the transfers' deadline (with
    // --timeout 300ms it gave up on a healthy server).
    let budget = config.check_timeout;
    // Before the check, which asks the ledger about the transfers given up and of unknown
    // outcome by their ids. Every worker has returned or been given up on (and then leaves its
    // tally alone).
    let mut tally = watchdog.tally;
    for slot in &slots {
        tally += &*slot.tally.lock().map_err(|_| WorkloadError::Panicked)?;
    }
    let asked = Asked {
        given_up: Arc::new(tally.given_up_ids.clone()),
        unknown: Arc::new(tally.unknown_ids.clone()),
        refused: Arc::new(tally.refused_ids.clone()),
    };
    // A signal that came before the check (while the transfers ran or ended) is the one whose
    // checks follow, as the README says; one that comes during the check stops it.
    let (check, check_interrupted) =
        final_check(url, &policy, budget, &crew, starting_total, &asked);
    let report = Report::new(
        report::Run {
            mode: config.mode,
            accounts: crew.ids.len(),
            concurrency: config.concurrency,
            elapsed_secs: elapsed.as_secs_f64(),
            starting_total,
            stuck_workers: watchdog.stuck_workers,
            workers_not_started,
            // Whether the signal kept transfers from starting: one that came once every
            // transfer had ended (during the final check) left the figures whole, and the run
            // said "interrupted" of them (found by a helper).
            interrupted: watchdog.interrupted,
            check_interrupted,
            reuse_accounts: config.reuse_accounts,
            readers: config.readers,
            reads: reads.reads,
            wrong_total_reads: reads.wrong,
            read_error: reads.failure,
        },
        tally,
        check,
    );
    let printed = if config.json {
        serde_json::to_writer(&mut *out, &report)
            .map_err(io::Error::from)
            .and_then(|()| writeln!(out))
    } else {
        // Shown as stderr lines are: the server's words (the last error, why the final check
        // could not run) may hold control characters.
        write!(out, "{}", crate::for_terminal(&report.to_string()))
    };
    // Written whatever the verdict (a failed or interrupted run is the one worth looking at),
    // and whatever became of standard output: the page is the fuller account.
    let mut lost = Vec::new();
    if let (Some(page), Some(seconds)) = (report_out, watchdog.seconds) {
        let timeline = Timeline::new(seconds, crew.live.marks(), config.readers, starting_total);
        let written = page
            .writer()
            .and_then(|file| html::write(file, &report, &timeline));
        lost.extend(page.finish(written).err());
    }
    if let (Some(log), Some(written)) = (histogram_out, histogram_result) {
        lost.extend(log.finish(written).err());
    }
    printed?;
    // Not a failure (every invariant may hold), but not the run asked for either: the refused
    // logins were only counted among lost connections.
    if report.workers_never_connected > 0 {
        crate::say(format_args!(
            "bank: warning: {} of {} workers never connected (the database refused their \
             connections: a role's CONNECTION LIMIT or max_connections; -v shows why): the run \
             had fewer workers than asked",
            report.workers_never_connected, report.concurrency
        ));
    }
    let waited = report.workers_refused_at_first;
    if waited > 0 {
        crate::say(format_args!(
            "bank: warning: {waited} of {} workers were refused a connection at first (the \
             database had no slot to spare: a role's CONNECTION LIMIT or max_connections) and \
             waited for one: fewer workers ran at once than asked, and their waits count in \
             the latency",
            report.concurrency
        ));
    }
    // Not a failure either: another client may move money between the run's accounts (the
    // README promises no false alarm for it), and a transfer applied twice under another id
    // leaves the same row; only a look at them tells.
    if let (Some(others @ 1..), false) = (report.ledger_rows_by_others, config.reuse_accounts) {
        crate::say(format_args!(
            "bank: warning: {others} ledger rows on the accounts this run created are not the \
             run's: another client's transfers, or transfers applied twice under other ids \
             (ledger_rows_by_others)"
        ));
    }
    let verdict = verdict(report);
    if lost.is_empty() {
        return verdict.map_or(Ok(()), |e| Err(e.into()));
    }
    // The run is over and its work committed: a lost output is no usage error, and the line
    // has to say so, or a rerun would repeat what is already done.
    let verdict = verdict.map_or_else(
        || "every check passed, but".to_string(),
        |e| format!("{e}, and"),
    );
    Err(WorkloadError::OutputsLost(format!(
        "{verdict} cannot write {}: what the run did is committed and its report is on \
         standard output",
        lost.join(" nor ")
    ))
    .into())
}

/// What failed the run, if anything did.
fn verdict(report: Report) -> Option<WorkloadError> {
    if report.ok {
        None
    } else if let Some(e) = report.final_check_error {
        match report.final_check_interrupted {
            true => Some(WorkloadError::FinalCheckInterrupted(e)),
            false => Some(WorkloadError::FinalCheck(e)),
        }
    } else if let Some(gone @ 1..) = report.accounts_deleted_by_others {
        Some(WorkloadError::AccountsDeleted {
            gone,
            of: report.accounts,
        })
    } else if !report.invariants_hold() {
        Some(WorkloadError::InvariantViolated(report.violations()))
    } else if report.readers_never_read() {
        Some(WorkloadError::NoReads {
            readers: report.readers,
            why: match report.read_error {
                Some(e) => format!("the last attempt: {e}"),
                None => "none ended within the run and the moment given after it".into(),
            },
        })
    } else {
        // Only errors made the run fail: saying an invariant broke would send the reader after
        // the wrong thing.
        Some(WorkloadError::Errors {
            count: report.errors,
            last: report.last_error.unwrap_or_default(),
        })
    }
}

/// `made` counts the accounts as they are created.
fn prepare_accounts(
    conn: &mut PgConnection,
    config: &Config,
    made: &crate::guard::Created,
) -> Result<Vec<Uuid>, Error> {
    let n = usize::try_from(config.accounts)
        .map_err(|_| Error::Usage(format!("--accounts {} is too large", config.accounts)))?;
    if config.reuse_accounts {
        // Run again while a conflict of the moment rolls it back (see `totals_and_versions`
        // in `run`): a lock held for a moment elsewhere failed the run at once.
        let ids =
            crate::retry::retry_read(config.check_timeout.max(config.policy.timeout), || {
                repo::account_ids(conn, config.accounts.min(i64::MAX as u64) as i64)
            })?;
        if ids.len() < 2 {
            return Err(WorkloadError::TooFewAccounts(ids.len()).into());
        }
        if (ids.len() as u64) < config.accounts {
            // A run over 3 accounts is a different run (hot) from the 1000 asked for.
            crate::say(format_args!(
                "bank: warning: --reuse-accounts: {} accounts asked for, {} found; the workload \
                 uses those {}",
                config.accounts,
                ids.len(),
                ids.len()
            ));
        }
        return Ok(ids);
    }
    // A statement at a time, so that Ctrl-C stops the setup (400,000 accounts went on for 17 s
    // after it), and a failure part-way says how many accounts it left behind. Each chunk is
    // made just before its statement: made all at once first, 2,000,000 accounts kept a Ctrl-C
    // waiting for seconds before the first statement (a test's bound missed under load).
    let mut ids: Vec<Uuid> = Vec::new();
    let stopped = |why: String, created: usize, unsettled: u64| Error::WorkloadSetupStopped {
        why,
        created: created as u64,
        total: n as u64,
        unsettled,
    };
    while ids.len() < n {
        if crate::interrupt::interrupted() {
            return Err(stopped(
                crate::interrupt::reason().to_string(),
                ids.len(),
                0,
            ));
        }
        let chunk: Vec<NewAccount> = (0..repo::INSERT_CHUNK.min(n - ids.len()))
            .map(|_| NewAccount::with_balance(config.balance))
            .collect();
        // In a transaction of its own: a chunk given up on while it waits for a lock held
        // elsewhere was created once that lock went, after the run had said it was not (its
        // server does not notice a client gone while it waits). Its COMMIT is never sent now.
        // One rolled back by a conflict (a serialization failure, which CockroachDB may give
        // any transaction and no longer retries for the client once the INSERT has answered)
        // runs again.
        let step = retry_transaction(&config.policy, || {
            conn.transaction(|c| {
                let n = repo::create_many(c, &chunk)?;
                made.committing(n as u64);
                Ok::<_, diesel::result::Error>(n)
            })
        });
        match step {
            Ok(_) => {
                ids.extend(chunk.iter().map(|a| a.id));
                made.committed(ids.len() as u64);
            }
            Err(e) => {
                // Failed at its COMMIT with the answer lost (the connection went): the chunk
                // may be there.
                let committing = made.failed();
                let unsettled = match may_have_committed(&e) {
                    true => committing,
                    false => 0,
                };
                // A statement timeout (the server's: the setup sets none of its own) cancels
                // every chunk alike, the first included: its words alone named neither the step
                // nor what to change (found by a helper).
                if crate::retry::is_cancel(&e) {
                    let why = format!(
                        "{e}: a statement creating {} of the workload's accounts took longer \
                         than the server's statement_timeout allows (the setup sets none of its \
                         own): raise it, or lift it for this run; each step of the setup may \
                         then take up to {raise}",
                        repo::INSERT_CHUNK.min(n),
                        raise = match config.check_timeout >= config.policy.timeout {
                            true => "--check-timeout",
                            false => "--timeout",
                        }
                    );
                    return Err(stopped(why, ids.len(), unsettled));
                }
                if ids.is_empty() && unsettled == 0 {
                    return Err(e.into());
                }
                return Err(stopped(e.to_string(), ids.len(), unsettled));
            }
        }
    }
    log::debug!("workload: created {n} accounts");
    Ok(ids)
}

/// Verifies once the workers are done. The server may still be coming back from a restart, so
/// connecting and reading go through the retry loop; and it may be frozen, so the check runs on
/// a thread of its own and is given up after `budget`. Ctrl-C (or SIGTERM) that comes while it
/// runs stops it (the second value): every transfer has ended, and a check of a big ledger may
/// take minutes. One that came before it, while the transfers ran, is the one whose check
/// follows.
/// The ids the final check asks the ledger about.
struct Asked {
    /// Transfers reported given up (not applied): none may be in the ledger.
    given_up: Arc<Vec<Uuid>>,
    /// Transfers of unknown outcome: those in the ledger committed.
    unknown: Arc<Vec<Uuid>>,
    /// Transfers reported refused: none may be in the ledger.
    refused: Arc<Vec<Uuid>>,
}

fn final_check(
    url: &DbUrl,
    policy: &RetryPolicy,
    budget: Duration,
    crew: &Crew,
    starting_total: i128,
    asked: &Asked,
) -> (Result<FinalCheck, String>, bool) {
    let signalled_before = crate::interrupt::interrupted();
    let began = Instant::now();
    let (tx, rx) = mpsc::channel();
    let progress = Arc::new(std::sync::Mutex::new(CheckProgress::default()));
    let (url, ids, since, prefix, seen) = (
        url.clone(),
        Arc::clone(&crew.ids),
        Arc::clone(&crew.since),
        crew.prefix,
        Arc::clone(&progress),
    );
    let (given_up, unknown, refused) = (
        Arc::clone(&asked.given_up),
        Arc::clone(&asked.unknown),
        Arc::clone(&asked.refused),
    );
    let policy = RetryPolicy {
        timeout: budget,
        ..*policy
    };
    let spawned = crate::spawn(move || {
        let (low, high) = prefix.range();
        // A check the server's statement_timeout cancels again and again is longer than the
        // server allows: it ran again until the policy gave up (30 attempts, 17 s after a
        // 3 s run; a helper playing a new user), where every other read of bank's tries at
        // most `STATEMENT_TIMEOUTS_RETRIED` more times.
        let mut cancels = 0;
        let note = |f: &dyn Fn(&mut CheckProgress)| {
            if let Ok(mut p) = seen.lock() {
                f(&mut p);
            }
        };
        let result = retry(&policy, &mut RetryCounts::default(), |_| {
            let read = |conn: &mut PgConnection| -> diesel::QueryResult<FinalCheck> {
                let (total, expected, _, accounts_gone) =
                    crew::read_totals(conn, &ids, &since, starting_total, (low, high), true)?;
                // In one snapshot: a transfer of unknown outcome whose COMMIT lands during the
                // check (a frozen backend thawed, a partition healed) is then in both counts or
                // in neither; read apart, the exact comparison (the run's rows against those
                // reported committed and the unknown ones found) saw a violation that was none.
                let (ledger_rows, others_rows, given_up_found, unknown_found, refused_found) = conn
                    .build_transaction()
                    .read_only()
                    .repeatable_read()
                    .run(|conn| {
                        Ok::<_, diesel::result::Error>((
                            repo::count_transfers_between(conn, low, high)?,
                            repo::count_rows_by_others(conn, &since, low, high)?,
                            repo::count_in_ledger(conn, &given_up)?,
                            repo::count_in_ledger(conn, &unknown)?,
                            repo::count_in_ledger(conn, &refused)?,
                        ))
                    })?;
                Ok(FinalCheck {
                    verify: verify::verify(conn)?,
                    total,
                    moved_by_others: expected - starting_total,
                    ledger_rows,
                    others_rows,
                    given_up_found,
                    unknown_found,
                    refused_found,
                    accounts_gone,
                })
            };
            note(&|p| p.asking_since = Some(Instant::now()));
            let step = match url.connect_within("bank", budget) {
                Err(e) => {
                    if e.is_transient() {
                        note(&|p| p.refused = Some(e.message.clone()));
                    }
                    connect_step(e)
                }
                Ok(mut conn) => {
                    note(&|p| p.refused = None);
                    match read(&mut conn) {
                        Ok(check) => Attempt::Done(check),
                        Err(e) => match classify(&e, Phase::BeforeCommit) {
                            Some(_)
                                if crate::retry::is_cancel(&e)
                                    && cancels >= crate::retry::STATEMENT_TIMEOUTS_RETRIED =>
                            {
                                Attempt::Fail(Error::from(e).to_string())
                            }
                            Some(cause) => {
                                cancels += u32::from(crate::retry::is_cancel(&e));
                                Attempt::Retry {
                                    cause,
                                    message: e.to_string(),
                                }
                            }
                            None => Attempt::Fail(Error::from(e).to_string()),
                        },
                    }
                }
            };
            note(&|p| p.asking_since = None);
            step
        });
        let refused = seen.lock().ok().and_then(|p| p.refused.clone());
        let _ = tx.send(result.map_err(|stop| match stop {
            Stop::Failed(e) => e,
            // Out of attempts, every one of the last refused at login: said as a refusal.
            Stop::Exhausted { last, .. } => match refused {
                Some(refusal) => refused_for(&refusal, began.elapsed()),
                None => last,
            },
        }));
    });
    if let Err(e) = spawned {
        return (
            Err(format!(
                "the system would not start a thread for the final check ({e})"
            )),
            false,
        );
    }
    let mut deadline = began + budget;
    loop {
        let asked = Instant::now();
        let left = deadline.saturating_duration_since(asked);
        if left.is_zero() {
            break;
        }
        let answer = rx.recv_timeout(left.min(CHECK_LOOKS_EVERY));
        // The time this process did not run is not the database's silence.
        if let Some(stopped) = crate::guard::stopped_during(asked, CHECK_LOOKS_EVERY) {
            deadline += stopped;
        }
        match answer {
            Ok(result) => return (result, false),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if !signalled_before && crate::interrupt::interrupted() {
            return (
                Err(format!("{} before it finished", crate::interrupt::reason())),
                true,
            );
        }
    }
    // Out of time. A server that refused every login (stopped, no connection slot) gave an
    // answer, which is said, not "no answer" as of a frozen one (found by a helper); an
    // attempt still waiting for the server is a server that did not answer.
    let (asking_since, refused) = progress
        .lock()
        .map(|p| (p.asking_since, p.refused.clone()))
        .unwrap_or_default();
    let waiting = asking_since.is_some_and(|at| at.elapsed() >= REFUSAL_ANSWERS_WITHIN);
    let why = match refused {
        Some(refusal) if !waiting => refused_for(&refusal, budget),
        _ => format!("no answer from the database within {budget:?}"),
    };
    (Err(why), false)
}

/// How often the wait for the final check looks for Ctrl-C.
const CHECK_LOOKS_EVERY: Duration = Duration::from_millis(20);

/// A login refused comes back at once; an attempt waiting longer is waiting on the server.
const REFUSAL_ANSWERS_WITHIN: Duration = Duration::from_secs(1);

/// What the final check's thread has seen so far, for the line said when its time runs out.
#[derive(Default)]
struct CheckProgress {
    /// An attempt (connect and read) under way since then.
    asking_since: Option<Instant>,
    /// The last attempt's login was refused, in these words (the server stopped: connection
    /// refused; max_connections or a CONNECTION LIMIT reached).
    refused: Option<String>,
}

/// The final check's line when every login was refused for `how_long`: what was refused and
/// the server's (or libpq's) words.
fn refused_for(refusal: &str, how_long: Duration) -> String {
    let what = if crate::error::is_connection_limit(refusal) {
        "the server had no connection to spare (max_connections, or a role's or database's \
         CONNECTION LIMIT, reached)"
    } else if refusal.to_ascii_lowercase().contains("connection refused") {
        "nothing accepted the connection (the server is stopped, restarting, or listens \
         elsewhere)"
    } else {
        "the server refused the login"
    };
    format!(
        "cannot connect to the database: for {}, {what} (the last attempt: {refusal})",
        humantime::format_duration(Duration::from_millis(how_long.as_millis() as u64))
    )
}

/// A failed connect as a step of the retry loop: a server that is down or restarting may come
/// back, a wrong password will not.
fn connect_step<T>(e: ConnectError) -> Attempt<T, String> {
    if e.is_transient() {
        Attempt::Retry {
            cause: Cause::ConnectionLost,
            message: e.message,
        }
    } else {
        Attempt::Fail(e.to_string())
    }
}
