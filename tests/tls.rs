//! Over TLS (`sslmode=require`), as CockroachDB's secure clusters and cloud PostgreSQL run, on a
//! cluster of the test's own (`OwnCluster::enable_tls`): faults whose outcome is not settled
//! when the client looks, where the words libpq gives for a lost connection are OpenSSL's.

use diesel::connection::SimpleConnection;
use uuid::Uuid;

use crate::support::{
    spawn_transfer, wait_for_lock_wait, wait_until, Bank, Iso, OwnCluster, Run, ScratchDb,
    SyncNames,
};

/// A COMMIT the server made, then ended its session before answering: it waits for a
/// synchronous standby that is not there (`synchronous_standby_names = 'ghost'`), its rows
/// already seen by other sessions, and a DBA ends it (`pg_terminate_backend`: "terminating
/// connection … The transaction has already committed locally"). Then a server frozen
/// (SIGSTOP) while a transfer waits for a row, past the run's deadline. Both modes, a file,
/// both levels: every answer true (a run that gets its answer back says applied; one that
/// cannot says unknown), every rerun settles, and each transfer is applied once.
#[test]
fn over_tls_a_commit_ended_before_its_answer_and_a_frozen_server_keep_the_promise() {
    let cluster = OwnCluster::start();
    cluster.enable_tls();
    for iso in Iso::BOTH {
        let db = ScratchDb::migrated_on(cluster.server(), iso);
        let url = over_tls(&db);
        let ids = db.accounts(&[1_000, 1_000]);
        let (a, b) = (ids[0], ids[1]);
        let doctor = Bank::new()
            .args(["--database-url", &url, "doctor", "--json"])
            .run();
        let j = doctor.success().json();
        assert_eq!(j["tls"], true, "{iso:?}: {j}");

        let mut given = Vec::new();
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("two.csv");
        let lines = [(Uuid::new_v4(), a, b, 5), (Uuid::new_v4(), b, a, 2)];
        let text: String = lines
            .iter()
            .map(|(id, from, to, amount)| format!("{id},{from},{to},{amount}\n"))
            .collect();
        std::fs::write(&file, format!("id,from,to,amount\n{text}")).expect("file");
        let file = file.to_str().expect("utf-8").to_string();
        let late = dir.path().join("late.csv");
        let late = late.to_str().expect("utf-8").to_string();
        let (late_line, late_id) = (Uuid::new_v4(), Uuid::new_v4());
        let (from, to) = (a.to_string(), b.to_string());
        {
            // Cleared before the database is dropped (its DROP would wait for the standby
            // too), even when an assertion fails.
            let _ghost = SyncNames(&db);
            SyncNames::set(&db, "ghost", None);
            for mode in ["transaction", "single-statement"] {
                let id = Uuid::new_v4().to_string();
                let child = spawn_transfer(
                    &url,
                    (a, b, 1),
                    &["--id", &id, "--mode", mode, "--timeout", "20s"],
                );
                end_the_commit_waiting_for_the_standby(&db);
                let run = Run::from(child.wait_with_output().expect("the run"));
                // Its retry reads the row its COMMIT wrote, which needs no commit of its own.
                run.success().no_password();
                assert!(run.stdout.contains("moved 1"), "{iso:?} {mode}: {run:?}");
                given.push(id);
            }
            let child = crate::support::spawn_bank(&[
                "--database-url",
                &url,
                "transfer",
                "--file",
                &file,
                "--json",
                "--timeout",
                "3s",
            ]);
            end_the_commit_waiting_for_the_standby(&db);
            let run = Run::from(child.wait_with_output().expect("the file"));
            run.no_password();
            // Its retry reads the ledger before it locks the accounts, a write whose commit
            // would wait for the standby too: the lines stayed unknown until --timeout.
            run.success();
            let outcomes: Vec<String> = run
                .stdout
                .lines()
                .map(|l| {
                    let j: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
                    j["outcome"].as_str().expect("an outcome").to_string()
                })
                .collect();
            assert_eq!(outcomes, ["applied", "applied"], "{iso:?}: {run:?}");
            // A command that writes in steps says why it may hear nothing: its COMMIT waits for
            // the standby (it named a lock, a slow step and a frozen server only).
            let seed = Bank::new()
                .args(["--database-url", &url, "seed", "--accounts", "1"])
                .args(["--timeout", "2s"])
                .run();
            assert_eq!(seed.code, 1, "{iso:?}: {seed:?}");
            assert!(
                seed.stderr
                    .contains("waits for a synchronous standby that is not connected"),
                "{iso:?}: {seed:?}"
            );
            // So do a file and a transfer left with no answer (they said "no answer from the
            // database" only). Each COMMIT is then ended, committed locally, before the next
            // run, whose locks it would hold.
            std::fs::write(&late, format!("id,from,to,amount\n{late_line},{a},{b},1\n"))
                .expect("file");
            let run = Bank::new()
                .args(["--database-url", &url, "transfer", "--file", &late])
                .args(["--timeout", "2s"])
                .run();
            assert_eq!(run.code, 3, "{iso:?}: {run:?}");
            assert!(
                run.stderr
                    .contains("waits for a synchronous standby that is not connected"),
                "{iso:?}: {run:?}"
            );
            run.no_password();
            end_the_commit_waiting_for_the_standby(&db);
            let run = Bank::new()
                .args([
                    "--database-url",
                    &url,
                    "transfer",
                    "--from",
                    &from,
                    "--to",
                    &to,
                ])
                .args([
                    "--amount",
                    "1",
                    "--timeout",
                    "2s",
                    "--id",
                    &late_id.to_string(),
                ])
                .run();
            run.fails_with(3, "waits for a synchronous standby that is not connected");
            end_the_commit_waiting_for_the_standby(&db);
        }
        let again = Bank::new()
            .args(["--database-url", &url, "transfer", "--file", &late])
            .run();
        again.success();
        assert!(
            again.stdout.contains("already_applied"),
            "{iso:?}: {again:?}"
        );
        given.push(late_id.to_string());
        let rerun = Bank::new()
            .args([
                "--database-url",
                &url,
                "transfer",
                "--file",
                &file,
                "--json",
            ])
            .run();
        rerun.success();
        assert_eq!(
            rerun.stdout.matches("\"already_applied\"").count(),
            2,
            "{iso:?}: {rerun:?}"
        );
        for id in &given {
            let again = db.transfer(a, b, 1).args(["--id", id.as_str()]).run();
            again.success();
            assert!(
                again.stdout.contains("already exists"),
                "{iso:?}: {again:?}"
            );
        }
        assert_eq!((db.balance(a), db.balance(b)), (993, 1_007), "{iso:?}");

        // Frozen while the transfer waits for a row another session holds: the run gives up at
        // its deadline, and the statement may still run when the server wakes.
        for mode in ["transaction", "single-statement"] {
            let mut holder = db.conn();
            holder
                .batch_execute(&format!(
                    "BEGIN; SELECT 1 FROM accounts WHERE id = '{a}' FOR UPDATE"
                ))
                .expect("hold the row");
            let id = Uuid::new_v4().to_string();
            let child = spawn_transfer(
                &url,
                (a, b, 10),
                &["--id", &id, "--mode", mode, "--timeout", "3s"],
            );
            wait_for_lock_wait(&db);
            cluster.freeze();
            let run = Run::from(child.wait_with_output().expect("the run"));
            cluster.thaw();
            holder.batch_execute("COMMIT").expect("release the row");
            run.fails_with(3, "may or may not have been applied");
            let rerun = db
                .transfer(a, b, 10)
                .args(["--id", id.as_str(), "--mode", mode, "--timeout", "20s"])
                .run();
            rerun.success();
            assert!(
                rerun.stdout.contains("moved 10") || rerun.stdout.contains("already exists"),
                "{iso:?} {mode}: {rerun:?}"
            );
        }
        assert_eq!((db.balance(a), db.balance(b)), (973, 1_027), "{iso:?}");
        let verify = Bank::new().args(["--database-url", &url, "verify"]).run();
        verify.success();
    }
}

/// The scratch database's URL with `sslmode=require`.
fn over_tls(db: &ScratchDb) -> String {
    let url = db.url.expose();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}sslmode=require")
}

/// Waits until a `bank` session's COMMIT waits for the synchronous standby, then ends it.
fn end_the_commit_waiting_for_the_standby(db: &ScratchDb) {
    let waiting = "FROM pg_stat_activity WHERE datname = current_database() \
                   AND application_name LIKE 'bank%' AND wait_event = 'SyncRep'";
    let mut conn = db.conn();
    wait_until(
        &mut conn,
        &format!("EXISTS (SELECT 1 {waiting})"),
        "no COMMIT waited for the standby",
    );
    conn.batch_execute(&format!("SELECT pg_terminate_backend(pid) {waiting}"))
        .expect("end it");
}
