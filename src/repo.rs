//! Queries on accounts and the ledger. Every function takes a connection and opens no
//! transaction, so callers compose them inside their own transactions (and tests inside a test
//! transaction).

use std::io::{BufWriter, Write};

use chrono::{DateTime, Utc};
use diesel::pg::{Pg, PgConnection, PgRowByRowLoadingMode};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Timestamptz, Uuid as SqlUuid};
use uuid::Uuid;

use crate::models::{Account, NewAccount, Transfer};
use crate::schema::{accounts, transfers};

/// PostgreSQL accepts at most 65535 bind parameters in one statement.
const MAX_BINDS: usize = 65535;
/// Columns bound per `NewAccount` row.
const ACCOUNT_COLUMNS: usize = 3;
/// Rows per multi-row INSERT in `create_many`.
pub const INSERT_CHUNK: usize = MAX_BINDS / ACCOUNT_COLUMNS;

pub fn create(conn: &mut PgConnection, account: &NewAccount) -> QueryResult<Account> {
    diesel::insert_into(accounts::table)
        .values(account)
        .returning(Account::as_returning())
        .get_result(conn)
}

/// Inserts `accounts` with one multi-row INSERT per `INSERT_CHUNK` rows; returns rows inserted.
pub fn create_many(conn: &mut PgConnection, accounts: &[NewAccount]) -> QueryResult<usize> {
    let mut inserted = 0;
    for chunk in accounts.chunks(INSERT_CHUNK) {
        inserted += diesel::insert_into(accounts::table)
            .values(chunk)
            .execute(conn)?;
    }
    Ok(inserted)
}

/// Inserts `accounts` with one `COPY … FROM STDIN` (text format, which CockroachDB accepts too):
/// the fastest bulk load both engines offer. Returns rows inserted.
pub fn copy_accounts(conn: &mut PgConnection, accounts: &[NewAccount]) -> QueryResult<usize> {
    diesel::copy_from(accounts::table)
        .from_raw_data(
            (accounts::id, accounts::balance, accounts::opening_balance),
            |sink: &mut dyn Write| -> QueryResult<()> {
                // Diesel sends every write as one CopyData message; batch them.
                let mut sink = BufWriter::with_capacity(1 << 16, sink);
                let write = |sink: &mut BufWriter<_>| -> std::io::Result<()> {
                    for a in accounts {
                        writeln!(sink, "{}\t{}\t{}", a.id, a.balance, a.opening_balance)?;
                    }
                    sink.flush()
                };
                write(&mut sink).map_err(|e| diesel::result::Error::SerializationError(e.into()))
            },
        )
        .execute(conn)
}

/// Every account, ordered by id, streamed row by row (libpq single-row mode): memory stays
/// constant however many accounts there are.
pub fn list(
    conn: &mut PgConnection,
) -> QueryResult<impl Iterator<Item = QueryResult<Account>> + '_> {
    list_query().load_iter::<Account, PgRowByRowLoadingMode>(conn)
}

/// The given accounts, ordered by id (for the demo, which shows only its own).
pub fn list_ids(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<Vec<Account>> {
    accounts::table
        .filter(accounts::id.eq_any(ids))
        .select(Account::as_select())
        .order(accounts::id)
        .load(conn)
}

/// One entry of an account's history: a transfer seen from the account (or its opening, version
/// 0, with no transfer and no counterparty).
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct Entry {
    #[diesel(sql_type = BigInt)]
    pub version: i64,
    #[diesel(sql_type = Timestamptz)]
    pub at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    pub transfer_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    pub counterparty: Option<Uuid>,
    /// Signed: negative for a debit.
    #[diesel(sql_type = BigInt)]
    pub amount: i64,
    #[diesel(sql_type = BigInt)]
    pub balance_after: i64,
}

/// The current version of an account (its number of entries), or `None` if it does not exist.
pub fn account_version(conn: &mut PgConnection, id: Uuid) -> QueryResult<Option<i64>> {
    accounts::table
        .find(id)
        .select(accounts::version)
        .first(conn)
        .optional()
}

/// An account's entries with versions in `low..high`, newest first (version 0 is the opening).
/// Versions are one sequence over both sides of the ledger, so a range of them is one bounded
/// range of each side's (account, version) index: every page is fast however long the history,
/// where one `ORDER BY version DESC` over both sides made PostgreSQL sort all of them first.
pub fn history_page(
    conn: &mut PgConnection,
    account: Uuid,
    low: i64,
    high: i64,
) -> QueryResult<Vec<Entry>> {
    diesel::sql_query(
        "SELECT version, at, transfer_id, counterparty, amount, balance_after FROM ( \
         SELECT from_version AS version, created_at AS at, id AS transfer_id, \
                to_id AS counterparty, -amount AS amount, from_balance_after AS balance_after \
         FROM transfers WHERE from_id = $1 AND from_version >= $2 AND from_version < $3 \
         UNION ALL \
         SELECT to_version, created_at, id, from_id, amount, to_balance_after \
         FROM transfers WHERE to_id = $1 AND to_version >= $2 AND to_version < $3 \
         UNION ALL \
         SELECT CAST(0 AS INT8), created_at, CAST(NULL AS UUID), CAST(NULL AS UUID), \
                opening_balance, opening_balance \
         FROM accounts WHERE id = $1 AND $2 <= 0 AND 0 < $3 \
         ) h ORDER BY version DESC",
    )
    .bind::<SqlUuid, _>(account)
    .bind::<BigInt, _>(low)
    .bind::<BigInt, _>(high)
    .load(conn)
}

/// An account's balance at a time.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct BalanceAt {
    #[diesel(sql_type = SqlUuid)]
    pub id: Uuid,
    #[diesel(sql_type = BigInt)]
    pub balance: i64,
}

/// Every account created at or before `at`, ordered by id, with its balance after its last
/// entry at or before `at` (its opening balance if none), streamed row by row.
pub fn balances_as_of(
    conn: &mut PgConnection,
    at: DateTime<Utc>,
) -> QueryResult<impl Iterator<Item = QueryResult<BalanceAt>> + '_> {
    // One pass over the entries up to `at` (DISTINCT ON keeps each account's newest), joined to
    // the accounts: 6x faster at 100,000 accounts than a correlated subquery per account, which
    // walks each account's index backwards past the entries after `at`. CockroachDB has
    // DISTINCT ON too.
    diesel::sql_query(
        "SELECT a.id, COALESCE(l.after, a.opening_balance) AS balance \
         FROM accounts a LEFT JOIN ( \
           SELECT DISTINCT ON (account) account, after FROM ( \
             SELECT from_id AS account, from_version AS version, from_balance_after AS after \
             FROM transfers WHERE created_at <= $1 \
             UNION ALL \
             SELECT to_id, to_version, to_balance_after FROM transfers WHERE created_at <= $1 \
           ) e ORDER BY account, version DESC \
         ) l ON l.account = a.id \
         WHERE a.created_at <= $1 ORDER BY a.id",
    )
    .bind::<Timestamptz, _>(at)
    .load_iter::<BalanceAt, PgRowByRowLoadingMode>(conn)
}

/// Deletes one account; `NotFound` when there is none with this id.
pub fn delete(conn: &mut PgConnection, id: Uuid) -> QueryResult<()> {
    match diesel::delete(accounts::table.find(id)).execute(conn)? {
        0 => Err(diesel::result::Error::NotFound),
        _ => Ok(()),
    }
}

/// Deletes every transfer and every account; returns (accounts, transfers) deleted.
pub fn delete_all(conn: &mut PgConnection) -> QueryResult<(usize, usize)> {
    // Transfers first: they reference accounts.
    let transfers = diesel::delete(transfers::table).execute(conn)?;
    let accounts = diesel::delete(accounts::table).execute(conn)?;
    Ok((accounts, transfers))
}

/// The ledger row of transfer `id`: how an ambiguous commit is settled.
pub fn find_transfer(conn: &mut PgConnection, id: Uuid) -> QueryResult<Option<Transfer>> {
    find_transfer_query(id).get_result(conn).optional()
}

/// The SQL `find_transfer` sends, for tests that pin it.
pub fn find_transfer_query(
    id: Uuid,
) -> impl diesel::query_dsl::methods::LoadQuery<'static, PgConnection, Transfer>
       + diesel::query_builder::QueryFragment<Pg> {
    transfers::table
        .find(id)
        .select(Transfer::as_select())
        .limit(1)
}

/// Deletes one ledger row; `NotFound` when there is none with this id.
pub fn delete_transfer(conn: &mut PgConnection, id: Uuid) -> QueryResult<()> {
    match diesel::delete(transfers::table.find(id)).execute(conn)? {
        0 => Err(diesel::result::Error::NotFound),
        _ => Ok(()),
    }
}

/// The sum of the given accounts' balances (one `= ANY($1)` array bind, whatever their number).
pub fn total_balance(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<i64> {
    snapshot_totals(conn, ids).map(|(total, _)| total)
}

/// The given accounts' total and how many of them are negative, read by one statement (one
/// snapshot): what a bank reader sees at one instant.
pub fn snapshot_totals(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<(i64, i64)> {
    let (sum, negative): (Option<i64>, i64) = accounts::table
        .filter(accounts::id.eq_any(ids))
        .select((
            diesel::dsl::sql::<Nullable<BigInt>>("CAST(SUM(balance) AS INT8)"),
            diesel::dsl::sql::<BigInt>("CAST(COUNT(*) FILTER (WHERE balance < 0) AS INT8)"),
        ))
        .get_result(conn)?;
    Ok((sum.unwrap_or(0), negative))
}

/// Ledger rows whose id lies in `low..=high` (one primary-key range scan).
pub fn count_transfers_between(conn: &mut PgConnection, low: Uuid, high: Uuid) -> QueryResult<i64> {
    transfers::table
        .filter(transfers::id.between(low, high))
        .count()
        .get_result(conn)
}

/// Ids of existing accounts, up to `limit` (the workload reuses them).
pub fn account_ids(conn: &mut PgConnection, limit: i64) -> QueryResult<Vec<Uuid>> {
    accounts::table
        .select(accounts::id)
        .order(accounts::id)
        .limit(limit)
        .load(conn)
}

/// The query `list` sends (tests pin its SQL).
pub fn list_query(
) -> impl diesel::query_dsl::methods::LoadQuery<'static, PgConnection, Account, PgRowByRowLoadingMode>
       + diesel::query_builder::QueryFragment<Pg> {
    accounts::table
        .select(Account::as_select())
        .order(accounts::id)
}
