//! CockroachDB's failure modes, injected at COMMIT by the test proxy: each transfer is applied
//! exactly once, or reported failed and not applied, and `verify` passes.

use uuid::Uuid;

use crate::support::proxy::{upstream_of, Fault, Proxy};
use crate::support::{Bank, Run, ScratchDb};

struct Setup {
    db: ScratchDb,
    proxy: Proxy,
    from: Uuid,
    to: Uuid,
}

fn setup() -> Setup {
    let db = ScratchDb::migrated();
    let ids = db.accounts(&[1000, 0]);
    let proxy = Proxy::start(upstream_of(db.url.expose()));
    Setup {
        db,
        proxy,
        from: ids[0],
        to: ids[1],
    }
}

impl Setup {
    /// `bank transfer` of 100 through the proxy, with the given id and extra arguments.
    fn transfer(&self, id: Uuid, extra: &[&str]) -> Run {
        Bank::new()
            .args(["--database-url", &self.proxy.url_for(self.db.url.expose())])
            .args([
                "transfer",
                "--from",
                &self.from.to_string(),
                "--to",
                &self.to.to_string(),
            ])
            .args([
                "--amount",
                "100",
                "--id",
                &id.to_string(),
                "--json",
                "--retry-base",
                "1ms",
            ])
            .args(extra)
            .run()
    }

    fn balances(&self) -> (i64, i64) {
        (self.db.balance(self.from), self.db.balance(self.to))
    }

    fn ledger_has(&self, id: Uuid) -> bool {
        bank::repo::find_transfer(&mut self.db.conn(), id)
            .expect("query")
            .is_some()
    }

    #[track_caller]
    fn verify_passes(&self) {
        let report = bank::verify::verify(&mut self.db.conn()).expect("verify");
        assert!(report.ok, "{report:?}");
    }

    /// The transfer went through exactly once, after `attempts` attempts.
    #[track_caller]
    fn applied_once(&self, run: &Run, id: Uuid, attempts: u64) {
        run.success();
        let j = run.json();
        assert_eq!(j["id"], id.to_string(), "{run:?}");
        assert_eq!(j["attempts"], attempts, "{run:?}");
        assert_eq!(j["already_applied"], false, "{run:?}");
        assert_eq!(self.balances(), (900, 100), "{run:?}");
        assert!(self.ledger_has(id));
        assert_eq!(self.proxy.injected(), 1);
        self.verify_passes();
    }
}

#[test]
fn the_proxy_is_transparent_when_unarmed() {
    let s = setup();
    let id = Uuid::new_v4();
    let run = s.transfer(id, &[]);
    run.success();
    assert_eq!(run.json()["attempts"], 1);
    assert_eq!(s.balances(), (900, 100));
    assert_eq!(s.proxy.commits(), 1);
    assert_eq!(s.proxy.injected(), 0);
}

#[test]
fn a_40001_at_commit_is_retried_and_applied_once() {
    let s = setup();
    s.proxy.arm(Fault::Retry40001);
    let id = Uuid::new_v4();
    let run = s.transfer(id, &[]);
    s.applied_once(&run, id, 2);
    assert_eq!(run.json()["retries"]["serialization"], 1);
}

#[test]
fn a_40001_with_no_retries_left_is_reported_and_not_applied() {
    let s = setup();
    s.proxy.arm(Fault::Retry40001);
    let id = Uuid::new_v4();
    let run = s.transfer(id, &["--max-retries", "0"]);
    run.fails_json(
        1,
        "failed",
        &format!("transfer {id} not applied: gave up after 1 attempts"),
    );
    assert!(run.stderr.contains("restart transaction"), "{run:?}");
    assert_eq!(s.balances(), (1000, 0));
    assert!(!s.ledger_has(id));
    s.verify_passes();
}

#[test]
fn a_connection_cut_after_commit_is_settled_by_the_ledger() {
    let s = setup();
    s.proxy.arm(Fault::CutAfterCommit);
    let id = Uuid::new_v4();
    let run = s.transfer(id, &[]);
    // The first attempt committed: the second finds it in the ledger and applies nothing.
    s.applied_once(&run, id, 2);
    assert_eq!(run.json()["retries"]["ambiguous"], 1);
    assert_eq!(s.proxy.commits(), 1, "no second COMMIT was needed");
}

#[test]
fn a_connection_cut_before_commit_runs_the_transfer_again() {
    let s = setup();
    s.proxy.arm(Fault::CutBeforeCommit);
    let id = Uuid::new_v4();
    let run = s.transfer(id, &[]);
    // The first attempt did not commit: the ledger says so, and the second applies it.
    s.applied_once(&run, id, 2);
    assert_eq!(s.proxy.commits(), 2);
}

#[test]
fn a_cut_with_no_retries_left_is_reported_as_unknown_and_settled_by_a_rerun() {
    let s = setup();
    s.proxy.arm(Fault::CutBeforeCommit);
    let id = Uuid::new_v4();
    let run = s.transfer(id, &["--max-retries", "0"]);
    run.fails_json(
        3,
        "unknown",
        &format!("transfer {id} may or may not have been applied"),
    );
    assert!(run.stderr.contains("--id"), "{run:?}");
    assert_eq!(s.balances(), (1000, 0));
    // Running it again with the same id settles it: applied exactly once.
    let again = s.transfer(id, &[]);
    again.success();
    assert_eq!(again.json()["already_applied"], false);
    assert_eq!(s.balances(), (900, 100));
    s.verify_passes();
}

#[test]
fn a_cut_after_commit_with_no_retries_left_is_settled_by_a_rerun() {
    let s = setup();
    s.proxy.arm(Fault::CutAfterCommit);
    let id = Uuid::new_v4();
    let run = s.transfer(id, &["--max-retries", "0"]);
    run.fails_json(3, "unknown", "may or may not have been applied");
    // It did commit; the rerun finds it and applies nothing more.
    assert_eq!(s.balances(), (900, 100));
    let again = s.transfer(id, &[]);
    again.success();
    assert_eq!(again.json()["already_applied"], true);
    assert_eq!(s.balances(), (900, 100));
    s.verify_passes();
}

#[test]
fn a_40003_ambiguous_result_is_settled_by_the_ledger() {
    let s = setup();
    s.proxy.arm(Fault::Ambiguous40003);
    let id = Uuid::new_v4();
    let run = s.transfer(id, &["-v"]);
    s.applied_once(&run, id, 2);
    assert_eq!(run.json()["retries"]["ambiguous"], 1);
    assert!(run.stderr.contains("result is ambiguous"), "{run:?}");
    assert!(run.stderr.contains("found in the ledger"), "{run:?}");
    assert_eq!(s.proxy.commits(), 1);
}

#[test]
fn faults_in_a_row_are_all_survived() {
    let s = setup();
    for f in [Fault::Retry40001, Fault::CutBeforeCommit, Fault::Retry40001] {
        s.proxy.arm(f);
    }
    let id = Uuid::new_v4();
    let run = s.transfer(id, &[]);
    run.success();
    assert_eq!(run.json()["attempts"], 4);
    assert_eq!(s.balances(), (900, 100));
    s.verify_passes();
}
