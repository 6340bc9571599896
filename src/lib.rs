//! `bank`: bank accounts in CockroachDB or PostgreSQL with Diesel, transfers applied exactly once
//! under contention and failure, and a workload that proves it.
//!
//! Layers, each in its own file: `schema` (generated) and `models` (rows), `repo` (queries),
//! `transfer` (the transfer body and its retrying runner), `retry` (error classifier and
//! backoff), `verify` (invariants), `workload`, `db` (URLs and connections), `error`, `cli`
//! (clap types) and `commands` (what each subcommand does).

pub mod cli;
pub mod commands;
pub mod db;
pub mod error;
pub mod exit_code;
pub mod guard;
pub mod models;
pub mod repo;
pub mod retry;
pub mod schema;
pub mod transfer;
pub mod verify;
pub mod workload;

pub use commands::run;
