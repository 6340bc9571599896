//! One test binary (it links once): library tests on a real database and end-to-end tests of
//! the `bank` binary. Needs `TEST_DATABASE_URL`; `scripts/test` provides it.

mod support;

mod batch;
mod cli;
mod concurrency;
mod demo_faults;
mod faults;
mod ledger;
mod promise;
mod readiness;
mod repo;
mod report;
mod standby;
mod tls;
mod transfer_body;
mod workload;
