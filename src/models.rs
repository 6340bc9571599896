//! Rows of `accounts` and `transfers`, as read (`Account`, `Transfer`) and as inserted
//! (`NewAccount`, `NewTransfer`).

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use crate::schema::{accounts, transfers};

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = accounts, check_for_backend(diesel::pg::Pg))]
pub struct Account {
    pub id: Uuid,
    pub balance: i64,
    pub opening_balance: i64,
}

/// An account as a transaction that holds its lock sees it: what the next change to it starts
/// from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = accounts, check_for_backend(diesel::pg::Pg))]
pub struct LockedAccount {
    pub id: Uuid,
    pub balance: i64,
    pub version: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Insertable)]
#[diesel(table_name = accounts, check_for_backend(diesel::pg::Pg))]
pub struct NewAccount {
    pub id: Uuid,
    pub balance: i64,
    pub opening_balance: i64,
}

impl NewAccount {
    /// A new account with a random (v4) id: random keys spread writes over CockroachDB's ranges.
    pub fn with_balance(balance: i64) -> Self {
        NewAccount {
            id: Uuid::new_v4(),
            balance,
            opening_balance: balance,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = transfers, check_for_backend(diesel::pg::Pg))]
pub struct Transfer {
    pub id: Uuid,
    pub from_id: Uuid,
    pub to_id: Uuid,
    pub amount: i64,
    pub created_at: DateTime<Utc>,
    /// Each side's version and balance after this transfer (its entry in the account's chain).
    pub from_version: i64,
    pub from_balance_after: i64,
    pub to_version: i64,
    pub to_balance_after: i64,
}

/// A transfer to apply. `id` is its idempotency key in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Insertable)]
#[diesel(table_name = transfers, check_for_backend(diesel::pg::Pg))]
pub struct NewTransfer {
    pub id: Uuid,
    pub from_id: Uuid,
    pub to_id: Uuid,
    pub amount: i64,
}

impl NewTransfer {
    /// Does this request describe the ledger row `t` (same accounts and amount)?
    pub fn matches(&self, t: &Transfer) -> bool {
        self.id == t.id
            && self.from_id == t.from_id
            && self.to_id == t.to_id
            && self.amount == t.amount
    }
}
