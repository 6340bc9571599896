//! A hot standby of a cluster of the test's own (`OwnCluster::standby`), as an operator runs
//! one to spare the primary its reads: what bank reads there, and what it refuses to write there.

use uuid::Uuid;

use crate::support::{Bank, Iso, OwnCluster, ScratchDb, SyncNames};

/// `bank --database-url URL ARGS`.
fn bank_at(url: &str, args: &[&str]) -> crate::support::Run {
    Bank::new().args(["--database-url", url]).args(args).run()
}

/// `verify` failed there ("cannot use serializable mode in a hot standby": it asked for a
/// read-only SERIALIZABLE transaction) while `balances`, `history`, `lookup` and `doctor`
/// worked; and `seed` said "cannot execute COPY during recovery" without saying where to go
/// (an operator's findings). Every read works on the standby, every write says to connect to the
/// primary, and the primary is left as it was.
#[test]
fn a_hot_standby_answers_every_read_and_sends_writes_to_the_primary() {
    let cluster = OwnCluster::start();
    let standby = cluster.standby();
    // At SERIALIZABLE too, the database's default (as `scripts/pg` sets it, and as a standby
    // copies a primary's): the standby refuses every SERIALIZABLE transaction, and every command
    // failed as its session was set up (found by a mutation-testing helper).
    for iso in Iso::BOTH {
        let db = ScratchDb::migrated_on(cluster.server(), iso);
        let ids = db.accounts(&[100, 50]);
        let id = Uuid::new_v4().to_string();
        db.transfer(ids[0], ids[1], 30)
            .args(["--id", &id])
            .run()
            .success();
        standby.catch_up(&cluster);
        let replica = standby.server().with_database(&db.name);
        let replica = replica.expose();
        let before = db.state();

        let verify = bank_at(replica, &["verify"]);
        verify.success().no_password();
        assert!(verify.stdout.ends_with("verify: ok\n"), "{verify:?}");
        let j = bank_at(replica, &["verify", "--json"]).success().json();
        assert_eq!(j["ok"], true, "{j}");
        assert_eq!(
            (j["accounts"].as_i64(), j["transfers"].as_i64()),
            (Some(2), Some(1)),
            "{j}"
        );

        let balances = bank_at(replica, &["balances"]);
        balances.success();
        assert!(balances.stdout.contains("balance: $70"), "{balances:?}");
        assert!(balances.stdout.contains("balance: $80"), "{balances:?}");
        let history = bank_at(replica, &["history", &ids[0].to_string()]);
        history.success();
        assert!(history.stdout.contains(&id), "{history:?}");
        let lookup = bank_at(replica, &["lookup", &id]);
        lookup.success();
        assert!(lookup.stdout.contains(&id), "{lookup:?}");
        let doctor = bank_at(replica, &["doctor"]);
        doctor.success();
        assert!(doctor.stdout.contains("read only:"), "{doctor:?}");
        assert!(!doctor.stdout.contains("warning"), "{doctor:?}");

        let (from, to) = (ids[0].to_string(), ids[1].to_string());
        bank_at(
            replica,
            &["transfer", "--from", &from, "--to", &to, "--amount", "1"],
        )
        .fails_with(1, "connect to the primary");
        bank_at(replica, &["seed"]).fails_with(1, "connect to the primary");
        bank_at(replica, &["seed", "--accounts", "3"]).fails_with(1, "connect to the primary");
        bank_at(replica, &["reset", "--yes"]).fails_with(1, "on the primary");
        // Its transfers failed in turn for the whole run (224 errors and 217 reconnects in 2 s),
        // where one line says where to go.
        let workload = bank_at(
            replica,
            &["workload", "--reuse-accounts", "--duration", "2s", "--json"],
        );
        workload.fails_with(1, "run the workload on the primary");
        assert_eq!(workload.stdout, "", "{workload:?}");
        assert_eq!(db.state(), before);
    }
}

/// A primary whose `synchronous_standby_names` names a standby that is not connected makes
/// every COMMIT that writes wait for it, forever, and doctor said nothing of it (an operator's
/// server). The setting is server-wide: set here on a cluster of the test's own, never on the
/// shared test server, whose commits it would stop.
#[test]
fn doctor_warns_when_commits_wait_for_a_synchronous_standby_that_is_not_there() {
    let cluster = OwnCluster::start();
    let standby = cluster.standby();
    let db = ScratchDb::migrated_on(cluster.server(), Iso::ReadCommitted);
    // Cleared before the scratch database is dropped (a DROP DATABASE would wait forever too),
    // even when an assertion fails.
    let _clear = SyncNames(&db);
    let primary = db.url.expose().to_string();
    // The standby connects as `walreceiver` (pg_basebackup -R names none), and is `sync` when
    // the setting names it, else `async`.
    let doctor = |names: &str, walreceiver: &str| {
        SyncNames::set(&db, names, Some(walreceiver));
        let text = bank_at(&primary, &["doctor"]);
        text.success();
        let j = bank_at(&primary, &["doctor", "--json"]).success().json();
        (text.stdout, j["synchronous_standbys_missing"].clone())
    };
    let warning = "warning: synchronous_standby_names";

    let (text, missing) = doctor("", "async");
    assert!(!text.contains(warning), "{text}");
    assert_eq!(missing, 0);
    // A role that may not see the standbys' states counts each as one that may be synchronous:
    // with none asked for, none is missing, not -1 (from mutation round 4b).
    let (_, teller) = db.teller("LOGIN");
    let j = bank_at(&teller, &["doctor", "--json"]).success().json();
    assert_eq!(j["synchronous_standbys_missing"], 0, "{j}");
    let (text, missing) = doctor("walreceiver", "sync");
    assert!(!text.contains(warning), "{text}");
    assert_eq!(missing, 0);
    let (text, missing) = doctor("ghost", "async");
    assert!(text.contains(&format!("{warning} is 'ghost'")), "{text}");
    assert!(
        text.contains("until 1 synchronous standby confirms it"),
        "{text}"
    );
    assert!(text.contains("0 are connected"), "{text}");
    assert_eq!(missing, 1);
    let (text, missing) = doctor("FIRST 2 (walreceiver, ghost)", "sync");
    assert!(
        text.contains("waits until 2 synchronous standbys confirm it"),
        "{text}"
    );
    assert!(text.contains("1 is connected"), "{text}");
    assert_eq!(missing, 1);
    // On the standby the setting means nothing: no warning, and nothing to count.
    let replica = standby.server().with_database(&db.name);
    let j = bank_at(replica.expose(), &["doctor", "--json"])
        .success()
        .json();
    assert!(j["synchronous_standbys_missing"].is_null(), "{j}");
}

/// `verify` on a hot standby whose connection is lost at its read's COMMIT (cut before it
/// reaches the server) reads again on a new connection, which must default to REPEATABLE READ
/// as the first did: at a SERIALIZABLE default the standby refuses every transaction. With the
/// setting left to the first session only (a mutation-testing helper dropped it from
/// `kept::keep`), the second session was refused ("cannot use serializable mode in a hot
/// standby") and `verify` failed on a sound bank; each test ran one session per command.
#[test]
fn verify_on_a_hot_standby_reads_again_after_a_lost_connection_at_both_levels() {
    use crate::support::proxy::{upstream_of, At, Fault, Proxy};
    let cluster = OwnCluster::start();
    let standby = cluster.standby();
    for iso in Iso::BOTH {
        let db = ScratchDb::migrated_on(cluster.server(), iso);
        let ids = db.accounts(&[100, 50]);
        db.transfer(ids[0], ids[1], 30).run().success();
        standby.catch_up(&cluster);
        let replica = standby.server().with_database(&db.name);
        let proxy = Proxy::start(upstream_of(&replica));
        proxy.arm_at(At::Commit, Fault::CutBeforeCommit);
        let verify = bank_at(&proxy.url_for(&replica), &["verify", "--json"]);
        assert_eq!(proxy.injected(), 1, "{iso:?}: {verify:?}");
        let j = verify.success().json();
        assert_eq!(j["ok"], true, "{iso:?}: {j}");
        assert_eq!(j["transfers"].as_i64(), Some(1), "{iso:?}: {j}");
    }
}

/// An upgrade (`bank init` with migrations pending) on a primary whose
/// `synchronous_standby_names` names a standby that is not connected: each migration's COMMIT
/// waits for it, and init ended at its deadline blaming "a lock another session holds", or a
/// frozen server, where `seed`, `reset` and transfers name the missing standby (and `doctor`
/// says init waits for it). Found upgrading a database left by a bank before migration 7 while
/// an old transfer's COMMIT waited for the standby. Once the setting is cleared, the migration
/// whose COMMIT waited is there, and the next init runs the rest.
#[test]
fn an_upgrade_stalled_by_a_missing_synchronous_standby_names_it() {
    use diesel_migrations::MigrationHarness;
    let cluster = OwnCluster::start();
    let db = ScratchDb::empty_on(cluster.server());
    {
        let mut conn = db.conn();
        // The schema of a bank from before `transfer_claims` (migrations 1 to 6).
        for _ in 0..6 {
            conn.run_next_migration(bank::db::MIGRATIONS)
                .expect("a migration");
        }
    }
    let _clear = SyncNames(&db);
    SyncNames::set(&db, "ghost", None);
    let url = db.url.expose().to_string();
    let init = bank_at(&url, &["init", "--timeout", "2s"]);
    init.fails_with(1, "within 2s");
    assert!(init.stderr.contains("synchronous standby"), "{init:?}");
    assert!(init.stderr.contains("bank doctor"), "{init:?}");
    SyncNames::set(&db, "", None);
    bank_at(&url, &["init"]).success();
    let doctor = bank_at(&url, &["doctor", "--json"]).success().json();
    assert_eq!(doctor["migrated"], true, "{doctor}");
    assert_eq!(doctor["pending_migrations"], 0, "{doctor}");
}
