//! Queries on accounts, the ledger and the claims. Each function takes a connection; most open
//! no transaction, so callers compose them inside their own (and tests inside a test
//! transaction). Those that need a snapshot or an isolation level of their own say so and open
//! it: `claim_and_find`, `accounts_free`, `delete_accounts_batch`, `totals_and_versions`,
//! `snapshot_totals_in_chunks`.

use std::io::{BufWriter, Write};

use chrono::{DateTime, Utc};
use diesel::pg::{Pg, PgConnection, PgRowByRowLoadingMode};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use uuid::Uuid;

use crate::models::{Account, LockedAccount, NewAccount, Transfer};
use crate::schema::{accounts, transfer_claims, transfers};

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
        .map_err(reason_lost)
}

/// What a COPY the server stopped midway says: Diesel 2.3 ends it on libpq's empty message and
/// leaves the server's unread, so "database error:" was all a seed said when a DBA's trigger
/// refused COPY (found writing a test for it). Said so, `seed` falls back to INSERT, which gets
/// the server's words, or works.
pub fn reason_lost(e: diesel::result::Error) -> diesel::result::Error {
    match copy_reason_lost(&e) {
        true => diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::Unknown,
            Box::new(COPY_REASON_LOST.to_string()),
        ),
        false => e,
    }
}

/// Whether `e`, from a COPY or from the rollback after one, is Diesel's error without the
/// server's words (see `reason_lost`).
pub fn copy_reason_lost(e: &diesel::result::Error) -> bool {
    matches!(e, diesel::result::Error::DatabaseError(_, info)
        if info.message().trim().is_empty() || info.message() == COPY_REASON_LOST)
}

const COPY_REASON_LOST: &str =
    "the server refused COPY and the driver lost its reason (a trigger, \
                                a rule or a constraint on accounts?); --method insert shows it";

/// Whether `copy_accounts` failed because the server will not let this user COPY, where a
/// multi-row INSERT may still work: CockroachDB lets only members of `admin` run COPY
/// (42501, "only users with the admin role …"), PostgreSQL refuses COPY FROM into a table under
/// row-level security (0A000, "COPY FROM not supported with row-level security"), and either
/// may say "permission denied". Diesel exposes no SQLSTATE, so the message decides; one Diesel
/// lost (`reason_lost`) counts: INSERT then tells.
pub fn is_copy_refused(e: &diesel::result::Error) -> bool {
    let diesel::result::Error::DatabaseError(_, info) = e else {
        return false;
    };
    if info.message() == COPY_REASON_LOST {
        return true;
    }
    let m = info.message().to_ascii_lowercase();
    [
        "admin role",
        "privilege",
        "permission denied",
        "row-level security",
    ]
    .iter()
    .any(|s| m.contains(s))
}

/// Every account, ordered by id, streamed row by row (libpq single-row mode): memory stays
/// constant however many accounts there are.
pub fn list(
    conn: &mut PgConnection,
) -> QueryResult<impl Iterator<Item = QueryResult<Account>> + '_> {
    list_query().load_iter::<Account, PgRowByRowLoadingMode>(conn)
}

/// Locks these accounts (those that exist) for the rest of the transaction, in key order: the
/// order every transfer statement locks in, so lockers never wait on each other in a cycle.
/// Returns them as locked: at READ COMMITTED a row that another transaction changed while this
/// one waited is returned as that transaction left it (PostgreSQL re-reads a row it locks), and
/// nobody else can change it before this transaction ends.
pub fn lock_accounts(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<Vec<LockedAccount>> {
    accounts::table
        .filter(accounts::id.eq_any(ids))
        .order(accounts::id)
        .select(LockedAccount::as_select())
        .for_update()
        .load(conn)
}

/// The given accounts, ordered by id (for the demo, which shows only its own).
pub fn list_ids(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<Vec<Account>> {
    // Sorted ids in bounded chunks, each read in id order: the chunks' rows come in id order.
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut rows = Vec::with_capacity(sorted.len());
    for part in sorted.chunks(MAX_IDS_PER_STATEMENT) {
        rows.extend(
            accounts::table
                .filter(accounts::id.eq_any(part))
                .select(Account::as_select())
                .order(accounts::id)
                .load(conn)?,
        );
    }
    Ok(rows)
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
/// Row by row: a page whose rows come slowly (a slow link) is written as they come, each row a
/// sign of life for the read's watch.
pub fn history_page(
    conn: &mut PgConnection,
    account: Uuid,
    low: i64,
    high: i64,
) -> QueryResult<impl Iterator<Item = QueryResult<Entry>> + '_> {
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
    .load_iter::<Entry, PgRowByRowLoadingMode>(conn)
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

/// The server's clock: the one `created_at` is written by.
pub fn server_now(conn: &mut PgConnection) -> QueryResult<DateTime<Utc>> {
    diesel::select(diesel::dsl::sql::<Timestamptz>("now()")).get_result(conn)
}

/// When the oldest transaction still open in this database (other than this session's) that has
/// written or locked a row began, if any: an entry it writes is timed after that, so balances as
/// of an earlier time are final. Only a client's transaction with a transaction id: bank times
/// an entry once its transaction holds its locks, and locking a row takes an id, so one without
/// an id now (a read left open, `bank balances | less`) will time any entry after now; a
/// background worker (autovacuum) writes none. And only one that holds more than a read's lock
/// on `accounts` or `transfers` (`pg_locks`, which every role sees whole): a transaction that has
/// locked no account yet times any entry after now too, and one of another application sharing
/// the database (a long batch job, a psql left open after an UPDATE elsewhere) made every
/// `--as-of` after its start fail. Nor a serializable transaction's read (`SIReadLock`, the
/// predicate lock a read takes at SERIALIZABLE, which `pg_locks` lists as a relation's lock
/// too: another application's report, with a write of its own, made `--as-of` fail there).
/// PostgreSQL's `pg_stat_activity`, which shows only the
/// sessions this role may see (all of them with `pg_read_all_stats`).
pub fn oldest_open_transaction(conn: &mut PgConnection) -> QueryResult<Option<DateTime<Utc>>> {
    diesel::select(
        diesel::dsl::sql::<diesel::sql_types::Nullable<Timestamptz>>(
            "(SELECT MIN(a.xact_start) FROM pg_stat_activity a \
         WHERE a.datname = current_database() \
         AND a.pid <> pg_backend_pid() AND a.xact_start IS NOT NULL \
         AND a.backend_type = 'client backend' AND a.backend_xid IS NOT NULL \
         AND EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.locktype = 'relation' \
         AND l.relation IN ('accounts'::regclass, 'transfers'::regclass) \
         AND l.mode NOT IN ('AccessShareLock', 'SIReadLock')))",
        ),
    )
    .get_result(conn)
}

/// Whether a trigger of the database's own fires after a statement on `accounts` or `transfers`
/// (`AFTER … FOR EACH STATEMENT`, not bank's: bank has none). Such a trigger sees what the
/// statement changed, so whether it refuses a statement depends on its lines: that a statement
/// with no line meets its refusal does not make the refusal no line's own
/// (`ChunkRunner::refused_with_no_line`). `tgtype` bit 1 is FOR EACH ROW, bits 2 and 64 BEFORE
/// and INSTEAD OF, bits 4 and 16 INSERT and UPDATE (what bank's statements do); a disabled
/// trigger (`tgenabled` 'D') fires for nobody.
pub fn after_statement_triggers(conn: &mut PgConnection) -> QueryResult<bool> {
    diesel::select(diesel::dsl::sql::<diesel::sql_types::Bool>(
        "EXISTS (SELECT 1 FROM pg_trigger WHERE NOT tgisinternal AND tgenabled <> 'D' \
         AND tgrelid IN ('accounts'::regclass, 'transfers'::regclass, \
         'transfer_claims'::regclass) \
         AND (tgtype & 67) = 0 AND (tgtype & 20) <> 0)",
    ))
    .get_result(conn)
}

/// Whether this role sees every session's open transaction in `pg_stat_activity`
/// (`oldest_open_transaction`): a superuser or a member of `pg_read_all_stats` does; another
/// role sees its own sessions' only.
pub fn sees_all_sessions(conn: &mut PgConnection) -> QueryResult<bool> {
    diesel::select(diesel::dsl::sql::<diesel::sql_types::Bool>(
        "pg_has_role('pg_read_all_stats', 'USAGE')",
    ))
    .get_result(conn)
}

/// Deletes one account; `NotFound` when there is none with this id.
pub fn delete(conn: &mut PgConnection, id: Uuid) -> QueryResult<()> {
    match diesel::delete(accounts::table.find(id)).execute(conn)? {
        0 => Err(diesel::result::Error::NotFound),
        _ => Ok(()),
    }
}

/// Deletes every transfer and every account in one go; returns (accounts, transfers) deleted.
/// For small databases (tests): `bank reset` deletes in batches instead
/// (`delete_transfers_batch`, `delete_accounts_batch`), since one transaction that deletes
/// millions of rows runs into CockroachDB's transaction size limits.
pub fn delete_all(conn: &mut PgConnection) -> QueryResult<(usize, usize)> {
    // Transfers first: they reference accounts.
    let transfers = diesel::delete(transfers::table).execute(conn)?;
    let accounts = diesel::delete(accounts::table).execute(conn)?;
    Ok((accounts, transfers))
}

/// Of `tables`, those this role lacks `privilege` on (`has_table_privilege`, on both engines).
pub fn tables_without(
    conn: &mut PgConnection,
    tables: &[&str],
    privilege: &str,
) -> QueryResult<Vec<String>> {
    #[derive(QueryableByName)]
    struct Name {
        #[diesel(sql_type = Text)]
        name: String,
    }
    let tables: Vec<String> = tables.iter().map(ToString::to_string).collect();
    let rows: Vec<Name> = diesel::sql_query(
        "SELECT t AS name FROM unnest(CAST($1 AS TEXT[])) AS t WHERE NOT has_table_privilege(t, $2)",
    )
    .bind::<diesel::sql_types::Array<Text>, _>(&tables)
    .bind::<Text, _>(privilege)
    .load(conn)?;
    Ok(rows.into_iter().map(|r| r.name).collect())
}

/// Rows `bank reset` deletes per statement (each its own transaction).
pub const DELETE_BATCH: i64 = 10_000;

/// Deletes up to `limit` ledger rows (any of them); returns how many. `DELETE … WHERE id IN
/// (SELECT id … LIMIT n)` is accepted by both engines, where `DELETE … LIMIT` is CockroachDB's
/// only.
pub fn delete_transfers_batch(conn: &mut PgConnection, limit: i64) -> QueryResult<usize> {
    diesel::sql_query("DELETE FROM transfers WHERE id IN (SELECT id FROM transfers LIMIT $1)")
        .bind::<BigInt, _>(limit)
        .execute(conn)
}

/// Sets to 0 the balance of up to `limit` accounts after `after` (all from the first when
/// `None`), in key order, locking them as transfers do; returns how many it set and the last
/// id, `None` when none was left. What `bank reset` does before it deletes any ledger row: a ledger row deleted
/// while its accounts stay made a rerun of its id (a file's, or `bank transfer --id`) apply it
/// again after a reset stopped part-way (Ctrl-C, `--timeout`, an error); with every balance
/// 0, such a rerun is refused for insufficient funds and moves nothing.
pub fn zero_balances_batch(
    conn: &mut PgConnection,
    after: Option<Uuid>,
    limit: i64,
) -> QueryResult<(usize, Option<Uuid>)> {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = SqlUuid)]
        id: Uuid,
    }
    let set: Vec<Id> = match after {
        None => diesel::sql_query(
            "UPDATE accounts SET balance = 0 WHERE id IN \
             (SELECT id FROM accounts ORDER BY id LIMIT $1 FOR UPDATE) RETURNING id",
        )
        .bind::<BigInt, _>(limit)
        .load(conn)?,
        Some(after) => diesel::sql_query(
            "UPDATE accounts SET balance = 0 WHERE id IN \
             (SELECT id FROM accounts WHERE id > $1 ORDER BY id LIMIT $2 FOR UPDATE) RETURNING id",
        )
        .bind::<SqlUuid, _>(after)
        .bind::<BigInt, _>(limit)
        .load(conn)?,
    };
    Ok((set.len(), set.into_iter().map(|r| r.id).max()))
}

/// Deletes up to `limit` claimed transfer ids (`claim_ids`); returns how many. After a DBA's
/// rewrite of `transfer_claims` it waited for, if any (`db::wait_out_rewrites`): at
/// SERIALIZABLE its snapshot, taken before it waited, saw no claim, and reset ended (exit 0)
/// leaving them all, the rewrite being no lock its other batches wait for.
pub fn delete_claims_batch(conn: &mut PgConnection, limit: i64) -> QueryResult<usize> {
    conn.transaction(|c| {
        crate::db::wait_out_rewrites(c, "transfer_claims")?;
        diesel::sql_query(
            "DELETE FROM transfer_claims WHERE id IN (SELECT id FROM transfer_claims LIMIT $1)",
        )
        .bind::<BigInt, _>(limit)
        .execute(c)
    })
}

/// Deletes up to `limit` accounts and the ledger rows that still name them, in one
/// transaction; returns (accounts, transfers) deleted. The accounts are locked first, in key
/// order as transfers lock them: a transfer under way on one of them finishes first, and no new
/// one can start until they are gone, so the ledger rows deleted next are all there are (the
/// caller drains the ledger before, in batches; these are what other clients wrote since).
/// Deleted by a plain `DELETE`, a transfer landing between the drain and the delete failed the
/// reset on the foreign keys. After a DBA's rewrite of the tables it waited for, if any
/// (`db::wait_out_rewrites`): at SERIALIZABLE its snapshot saw no account, and reset said
/// "deleted 0 accounts" (exit 0), leaving them all (found by a helper).
pub fn delete_accounts_batch(conn: &mut PgConnection, limit: i64) -> QueryResult<(usize, usize)> {
    conn.transaction(|c| {
        crate::db::wait_out_rewrites(c, "accounts, transfers")?;
        let ids: Vec<Uuid> = accounts::table
            .select(accounts::id)
            .order(accounts::id)
            .limit(limit)
            .for_update()
            .load(c)?;
        if ids.is_empty() {
            return Ok((0, 0));
        }
        let transfers = diesel::delete(
            transfers::table.filter(
                transfers::from_id
                    .eq_any(&ids)
                    .or(transfers::to_id.eq_any(&ids)),
            ),
        )
        .execute(c)?;
        let accounts =
            diesel::delete(accounts::table.filter(accounts::id.eq_any(&ids))).execute(c)?;
        Ok((accounts, transfers))
    })
}

/// The ledger row of transfer `id`: how an ambiguous commit is settled.
pub fn find_transfer(conn: &mut PgConnection, id: Uuid) -> QueryResult<Option<Transfer>> {
    find_transfer_query(id).get_result(conn).optional()
}

/// A server setting of this session (`current_setting`, on both engines).
pub fn setting(conn: &mut PgConnection, name: &str) -> QueryResult<Option<String>> {
    #[derive(QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
        value: Option<String>,
    }
    diesel::sql_query("SELECT current_setting($1) AS value")
        .bind::<Text, _>(name)
        .get_result::<Setting>(conn)
        .map(|s| s.value)
}

/// Whether this session may not write: a hot standby, or `default_transaction_read_only` (the
/// setting has this name on both engines).
pub fn read_only(conn: &mut PgConnection) -> QueryResult<bool> {
    setting(conn, "transaction_read_only").map(|v| v.as_deref() == Some("on"))
}

/// Claims these transfer ids (`transfer_claims`), those claimed already included (see
/// `claim_and_find`, which runs it): what a run does before it says a transfer with a given id was not
/// applied, so that a single statement of an earlier attempt at it that comes late fails on the
/// claim (see the migration). An insert, not a lookup: it waits for a statement still writing its
/// claim, so the ledger asked afterwards has the last word.
///
/// In key order, as transfers lock their accounts: two runs claiming the same ids in different
/// orders deadlocked (found by a reviewer). Callers retry it (`retry::retry_transaction`): at
/// SERIALIZABLE, a claim that meets one committed after its snapshot is a serialization failure.
pub fn claim_ids(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<usize> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let rows: Vec<_> = ids.iter().map(|id| transfer_claims::id.eq(*id)).collect();
    // A claim already there is answered again: its generation moves, which a run still
    // retrying since before this answer sees (`claim_generations`).
    let claimed = diesel::insert_into(transfer_claims::table)
        .values(rows)
        .on_conflict(transfer_claims::id)
        .do_update()
        .set(transfer_claims::generation.eq(transfer_claims::generation + 1))
        .execute(conn)?;
    // Fewer rows than ids: the database dropped some claims without an error (a rule, a
    // trigger returning NULL; found by a fault-injecting helper), and a run's "not applied" was
    // then overturned by an earlier attempt still retrying. The caller's transaction is rolled
    // back: the claim is not made, and its answer is unknown.
    if claimed < ids.len() {
        return Err(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::Unknown,
            Box::new(format!(
                "the database wrote {claimed} of {} claims without an error (a rule or a \
                 trigger on transfer_claims?)",
                ids.len()
            )),
        ));
    }
    Ok(claimed)
}

/// The claims of these ids, as (id, generation): which of them another run has answered "not
/// applied", and how many times. A run that retries compares them with what its first attempt
/// read.
pub fn claim_generations(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<Vec<(Uuid, i64)>> {
    transfer_claims::table
        .filter(transfer_claims::id.eq_any(ids))
        .select((transfer_claims::id, transfer_claims::generation))
        .order(transfer_claims::id)
        .load(conn)
}

/// The mark of `id`'s claim (`None` when unclaimed or claimed unmarked): a single statement marks
/// the claim it writes with its run's own (`transfer::statement::apply_claiming`), so the run
/// that finds the id's row after its answer was lost can tell whether the row is its own.
pub fn claim_mark(conn: &mut PgConnection, id: Uuid) -> QueryResult<Option<Uuid>> {
    claim(conn, id).map(Option::flatten)
}

/// `id`'s claim, if any, with its mark (`Some(None)`: claimed unmarked, by a run that answered
/// "not applied").
pub fn claim(conn: &mut PgConnection, id: Uuid) -> QueryResult<Option<Option<Uuid>>> {
    transfer_claims::table
        .find(id)
        .select(transfer_claims::claimed_by)
        .first::<Option<Uuid>>(conn)
        .optional()
}

/// Claims `ids` as a run does before it answers "not applied" (`claim_ids`), then reads their
/// ledger rows, once no transaction holds `accounts` any more: run at SERIALIZABLE, in a
/// transaction of its own. The locks wait for an attempt of these ids still under way in
/// another run; SERIALIZABLE makes an attempt whose snapshot missed the claim fail instead of
/// commit (see `claim_generations`). `wait` bounds each of its statements (the session's own
/// `statement_timeout` otherwise): a file's claim has what is left of a deadline.
pub fn claim_and_find(
    conn: &mut PgConnection,
    ids: &[Uuid],
    accounts: &[Uuid],
    wait: Option<std::time::Duration>,
) -> QueryResult<Vec<Transfer>> {
    conn.build_transaction().serializable().run(|c| {
        if let Some(wait) = wait {
            // Whole milliseconds bank computed, not user text.
            let ms = wait.as_millis().clamp(1, i32::MAX as u128);
            diesel::connection::SimpleConnection::batch_execute(
                c,
                &format!("SET LOCAL statement_timeout = {ms}"),
            )?;
        }
        let mut accounts = accounts.to_vec();
        accounts.sort_unstable();
        accounts.dedup();
        lock_accounts(c, &accounts)?;
        claim_ids(c, ids)?;
        find_transfers(c, ids)
    })
}

/// The ledger rows of these ids.
pub fn find_transfers(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<Vec<Transfer>> {
    transfers::table
        .filter(transfers::id.eq_any(ids))
        .select(Transfer::as_select())
        .load(conn)
}

/// `find_transfers`, by id.
pub fn transfers_by_id(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> QueryResult<std::collections::HashMap<Uuid, Transfer>> {
    Ok(find_transfers(conn, ids)?
        .into_iter()
        .map(|t| (t.id, t))
        .collect())
}

/// The time the ledger row `id` carries (its `created_at`), read exactly (binary, to the
/// microsecond): a file's statement reads its own back before it commits.
pub fn created_at(conn: &mut PgConnection, id: Uuid) -> QueryResult<DateTime<Utc>> {
    transfers::table
        .find(id)
        .select(transfers::created_at)
        .first(conn)
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

/// Ids one statement binds at most. A UUID array travels as 20 bytes per element (a 4-byte
/// length and 16 bytes), so 800,000 ids fill CockroachDB's default 16 MiB message limit
/// (`sql.conn.max_read_buffer_message_size`); 50,000 make a 1 MB Bind message.
pub const MAX_IDS_PER_STATEMENT: usize = 50_000;

/// The sum of the given accounts' balances, read in one snapshot (see `snapshot_totals`).
pub fn total_balance(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<i128> {
    snapshot_totals(conn, ids).map(|(total, _)| total)
}

/// The given accounts' total and how many of them are negative, read in one snapshot: what a
/// bank reader sees at one instant. Up to `MAX_IDS_PER_STATEMENT` ids this is one statement;
/// beyond, see `snapshot_totals_in_chunks`.
pub fn snapshot_totals(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<(i128, i64)> {
    snapshot_totals_in_chunks(conn, ids, MAX_IDS_PER_STATEMENT)
}

/// `snapshot_totals` with at most `chunk` ids bound per statement: every array a statement
/// binds stays bounded however many accounts the workload has. More than one chunk is summed
/// inside one read-only REPEATABLE READ transaction, so that all chunks read the same snapshot
/// (CockroachDB runs it as SERIALIZABLE, also one snapshot); called inside a transaction
/// already, it runs in that one, whose isolation level then decides.
pub fn snapshot_totals_in_chunks(
    conn: &mut PgConnection,
    ids: &[Uuid],
    chunk: usize,
) -> QueryResult<(i128, i64)> {
    let chunk = chunk.max(1);
    if ids.len() <= chunk {
        return totals_of(conn, ids);
    }
    let sum_chunks = |conn: &mut PgConnection| -> QueryResult<(i128, i64)> {
        let mut total = (0i128, 0i64);
        for part in ids.chunks(chunk) {
            let (sum, negative) = totals_of(conn, part)?;
            // i128 holds the sum of 2^64 balances at INT8's limit: no bank holds more rows.
            total.0 += sum;
            total.1 += negative;
        }
        Ok(total)
    };
    match conn
        .build_transaction()
        .repeatable_read()
        .read_only()
        .run(sum_chunks)
    {
        Err(diesel::result::Error::AlreadyInTransaction) => sum_chunks(conn),
        other => other,
    }
}

/// One statement: the total and the negative balances of these accounts. The sum comes back as
/// text: accounts that each fit in INT8 need not together.
fn totals_of(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<(i128, i64)> {
    let (sum, negative): (Option<String>, i64) = accounts::table
        .filter(accounts::id.eq_any(ids))
        .select((
            diesel::dsl::sql::<Nullable<Text>>("CAST(SUM(balance) AS TEXT)"),
            diesel::dsl::sql::<BigInt>("CAST(COUNT(*) FILTER (WHERE balance < 0) AS INT8)"),
        ))
        .get_result(conn)?;
    Ok((
        sum.as_deref().map(whole_number).transpose()?.unwrap_or(0),
        negative,
    ))
}

/// The given accounts' total and each one's version, read in one snapshot (as
/// `snapshot_totals`): where the workload starts, so that what other clients' ledger rows move
/// in or out afterwards can be told (`moved_in_by_others`). After a DBA's rewrite of `accounts`
/// it waited for, if any (`db::wait_out_rewrites`): its snapshot saw no account, and the run's
/// starting total was 0.
pub fn totals_and_versions(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> QueryResult<(i128, Vec<(Uuid, i64)>)> {
    conn.build_transaction()
        .repeatable_read()
        .read_only()
        .run(|c| {
            crate::db::wait_out_rewrites(c, "accounts")?;
            let total = total_balance(c, ids)?;
            let mut versions = Vec::with_capacity(ids.len());
            for part in ids.chunks(MAX_IDS_PER_STATEMENT) {
                versions.extend(
                    accounts::table
                        .filter(accounts::id.eq_any(part))
                        .select((accounts::id, accounts::version))
                        .load::<(Uuid, i64)>(c)?,
                );
            }
            Ok((total, versions))
        })
}

/// The net amount that ledger rows with ids outside `low..=high` (not the workload's own) moved
/// into these accounts after the given versions: a transfer between two of them moves nothing
/// in, one with an account outside moves its amount in or out. Each side is one range of its
/// (account, version) index.
pub fn moved_in_by_others(
    conn: &mut PgConnection,
    since: &[(Uuid, i64)],
    low: Uuid,
    high: Uuid,
) -> QueryResult<i128> {
    #[derive(QueryableByName)]
    struct Moved {
        #[diesel(sql_type = Nullable<Text>)]
        moved: Option<String>,
    }
    let mut total = 0i128;
    for part in since.chunks(MAX_IDS_PER_STATEMENT) {
        let ids: Vec<Uuid> = part.iter().map(|(id, _)| *id).collect();
        let versions: Vec<i64> = part.iter().map(|(_, v)| *v).collect();
        let moved: Moved = diesel::sql_query(
            "SELECT CAST(SUM(d) AS TEXT) AS moved FROM ( \
               SELECT -t.amount AS d FROM unnest(CAST($1 AS UUID[]), CAST($2 AS INT8[])) AS s (id, v) \
               JOIN transfers t ON t.from_id = s.id AND t.from_version > s.v \
               WHERE t.id NOT BETWEEN $3 AND $4 \
               UNION ALL \
               SELECT t.amount FROM unnest(CAST($1 AS UUID[]), CAST($2 AS INT8[])) AS s (id, v) \
               JOIN transfers t ON t.to_id = s.id AND t.to_version > s.v \
               WHERE t.id NOT BETWEEN $3 AND $4 \
             ) AS e",
        )
        .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>(&ids)
        .bind::<diesel::sql_types::Array<BigInt>, _>(&versions)
        .bind::<diesel::sql_types::Uuid, _>(low)
        .bind::<diesel::sql_types::Uuid, _>(high)
        .get_result(conn)?;
        total += moved
            .moved
            .as_deref()
            .map(whole_number)
            .transpose()?
            .unwrap_or(0);
    }
    Ok(total)
}

/// How many ledger rows with ids outside `low..=high` (not the workload's own) moved money in,
/// out of or between these accounts after the given versions. A transfer between two of them
/// moves nothing in (`moved_in_by_others` cannot see it), but it is a row all the same: on the
/// accounts a run created itself, a transfer its code path applied twice under another id.
pub fn count_rows_by_others(
    conn: &mut PgConnection,
    since: &[(Uuid, i64)],
    low: Uuid,
    high: Uuid,
) -> QueryResult<i64> {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = diesel::sql_types::Uuid)]
        id: Uuid,
    }
    // A row between two chunks' accounts is met by both chunks: its ids are gathered whole.
    let mut seen = std::collections::HashSet::new();
    for part in since.chunks(MAX_IDS_PER_STATEMENT) {
        let ids: Vec<Uuid> = part.iter().map(|(id, _)| *id).collect();
        let versions: Vec<i64> = part.iter().map(|(_, v)| *v).collect();
        let found: Vec<Id> = diesel::sql_query(
            "SELECT t.id FROM unnest(CAST($1 AS UUID[]), CAST($2 AS INT8[])) AS s (id, v) \
               JOIN transfers t ON t.from_id = s.id AND t.from_version > s.v \
               WHERE t.id NOT BETWEEN $3 AND $4 \
             UNION \
             SELECT t.id FROM unnest(CAST($1 AS UUID[]), CAST($2 AS INT8[])) AS s (id, v) \
               JOIN transfers t ON t.to_id = s.id AND t.to_version > s.v \
               WHERE t.id NOT BETWEEN $3 AND $4",
        )
        .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>(&ids)
        .bind::<diesel::sql_types::Array<BigInt>, _>(&versions)
        .bind::<diesel::sql_types::Uuid, _>(low)
        .bind::<diesel::sql_types::Uuid, _>(high)
        .load(conn)?;
        seen.extend(found.into_iter().map(|r| r.id));
    }
    Ok(seen.len() as i64)
}

/// A sum of INT8 as the database writes it: "123" on PostgreSQL (NUMERIC), possibly "123.0" on
/// CockroachDB (DECIMAL keeps a scale).
pub fn whole_number(text: &str) -> QueryResult<i128> {
    let (digits, fraction) = text.split_once('.').unwrap_or((text, ""));
    match digits.parse() {
        Ok(n) if fraction.bytes().all(|b| b == b'0') => Ok(n),
        _ => Err(diesel::result::Error::DeserializationError(
            format!("a sum of balances that is not a whole number: {text}").into(),
        )),
    }
}

/// Ledger rows whose id lies in `low..=high` (one primary-key range scan).
pub fn count_transfers_between(conn: &mut PgConnection, low: Uuid, high: Uuid) -> QueryResult<i64> {
    transfers::table
        .filter(transfers::id.between(low, high))
        .count()
        .get_result(conn)
}

/// Whether nothing that could still apply a transfer between these accounts is under way: no
/// other transaction holds a lock on either account, and nobody holds or waits for a lock on
/// the two tables that keeps a transfer's writes out. The latter is what an earlier attempt
/// whose statement is already on the server waits on before it locks any account (behind a
/// `CREATE INDEX` or a `LOCK TABLE`, say): it takes the same table locks as a transfer
/// (`ROW EXCLUSIVE` on both, `db::lock_as_a_writer`) with a `lock_timeout` of a moment, and the accounts `NOWAIT`, in a transaction that is then rolled back. Any error
/// (a lock, a wait, or a server that cannot be asked) counts as "not free".
pub fn accounts_free(conn: &mut PgConnection, ids: &[Uuid]) -> bool {
    let probe = conn.transaction::<(), diesel::result::Error, _>(|c| {
        // Transfers' own table locks never conflict with each other; only what keeps every
        // write out (DDL, LOCK TABLE) makes these wait.
        diesel::sql_query("SET LOCAL lock_timeout = '50ms'").execute(c)?;
        crate::db::lock_as_a_writer(c, &[("transfers", "amount"), ("accounts", "balance")])?;
        accounts::table
            .filter(accounts::id.eq_any(ids))
            .select(accounts::id)
            .for_update()
            .no_wait()
            .load::<Uuid>(c)?;
        Err(diesel::result::Error::RollbackTransaction)
    });
    matches!(probe, Err(diesel::result::Error::RollbackTransaction))
}

/// `accounts_free` for each of these accounts at once: the ones another transaction holds a
/// lock on (`SKIP LOCKED` tells them from those it could lock; an account that does not exist
/// is held by nobody), or `None` when it cannot be told for any (a lock on either table that
/// keeps a transfer's writes out, or any other error).
pub fn accounts_held(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Option<std::collections::HashSet<Uuid>> {
    let mut held = None;
    let probe = conn.transaction::<(), diesel::result::Error, _>(|c| {
        diesel::sql_query("SET LOCAL lock_timeout = '50ms'").execute(c)?;
        crate::db::lock_as_a_writer(c, &[("transfers", "amount"), ("accounts", "balance")])?;
        let lockable: std::collections::HashSet<Uuid> = accounts::table
            .filter(accounts::id.eq_any(ids))
            .select(accounts::id)
            .for_update()
            .skip_locked()
            .load::<Uuid>(c)?
            .into_iter()
            .collect();
        let existing: Vec<Uuid> = accounts::table
            .filter(accounts::id.eq_any(ids))
            .select(accounts::id)
            .load(c)?;
        held = Some(
            existing
                .into_iter()
                .filter(|id| !lockable.contains(id))
                .collect(),
        );
        Err(diesel::result::Error::RollbackTransaction)
    });
    match probe {
        Err(diesel::result::Error::RollbackTransaction) => held,
        _ => None,
    }
}

/// How many of these ids the ledger holds, `MAX_IDS_PER_STATEMENT` ids per statement.
pub fn count_in_ledger(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<i64> {
    let mut found = 0;
    for part in ids.chunks(MAX_IDS_PER_STATEMENT) {
        found += count_transfers_with_ids(conn, part)?;
    }
    Ok(found)
}

/// Which of these ids the ledger holds.
pub fn ids_in_ledger(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<Vec<Uuid>> {
    transfers::table
        .filter(transfers::id.eq_any(ids))
        .select(transfers::id)
        .load(conn)
}

/// How many of these accounts exist, `MAX_IDS_PER_STATEMENT` ids per statement.
pub fn count_accounts_with_ids(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<i64> {
    let mut found = 0;
    for part in ids.chunks(MAX_IDS_PER_STATEMENT) {
        found += accounts::table
            .filter(accounts::id.eq_any(part))
            .count()
            .get_result::<i64>(conn)?;
    }
    Ok(found)
}

/// How many of these ids the ledger holds.
pub fn count_transfers_with_ids(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<i64> {
    transfers::table
        .filter(transfers::id.eq_any(ids))
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

#[cfg(test)]
mod tests {
    use diesel::result::{DatabaseErrorKind, Error};

    use super::whole_number;

    fn db(message: &'static str) -> Error {
        crate::retry::tests::db(DatabaseErrorKind::Unknown, message)
    }

    #[test]
    fn a_copy_refused_for_privilege_falls_back_and_nothing_else_does() {
        for m in [
            // CockroachDB's wording for admin-only statements (pgcode 42501).
            "only users with the admin role are allowed to COPY FROM",
            "user bank does not have INSERT privilege on relation accounts",
            "permission denied for table accounts",
            "COPY FROM not supported with row-level security",
        ] {
            assert!(super::is_copy_refused(&db(m)), "{m}");
        }
        for m in [
            "relation \"accounts\" does not exist",
            "duplicate key value violates unique constraint \"accounts_pkey\"",
            "server closed the connection unexpectedly",
        ] {
            assert!(!super::is_copy_refused(&db(m)), "{m}");
        }
        assert!(!super::is_copy_refused(&Error::NotFound));
    }

    #[test]
    fn sums_read_back_whole_whatever_scale_the_engine_writes() {
        assert_eq!(
            whole_number("18446744073709551614").ok(),
            Some(2 * i128::from(i64::MAX))
        );
        assert_eq!(whole_number("-7.000").ok(), Some(-7));
        assert_eq!(whole_number("0").ok(), Some(0));
        assert!(whole_number("7.5").is_err());
        assert!(whole_number("").is_err());
        assert!(whole_number("1e3").is_err());
    }
}
