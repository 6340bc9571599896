//! A TCP proxy between a client and PostgreSQL that injects CockroachDB's failure modes, and
//! those of a stalled server, at a commit. It parses just enough of the wire protocol to find
//! message boundaries and two commit points: the simple query `COMMIT` (Diesel commits an
//! explicit transaction with it) and the implicit commit of the transfer statement run alone
//! with the extended protocol (see `At::Statement`). Clients must connect with
//! `sslmode=disable`; an SSL or GSS request is answered "no" by the proxy itself.

use std::collections::{HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use bank::db::DbUrl;

/// What to do to one commit (see `At` for the two kinds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)] // Not every test uses every fault.
pub enum Fault {
    /// Nothing commits: answer CockroachDB's 40001 retry error. At COMMIT the transaction is
    /// rolled back on the server; a statement is not sent to the server at all.
    Retry40001,
    /// Forward the commit, wait until the server answered, then cut the client off before the
    /// reply.
    CutAfterCommit,
    /// Cut both connections before the commit reaches the server (the server aborts). A
    /// statement is sent without its Sync first: it runs and takes its locks, but never commits.
    CutBeforeCommit,
    /// Forward the commit, then answer CockroachDB's 40003 "result is ambiguous" instead of the
    /// reply.
    Ambiguous40003,
    /// Forward the commit, then answer an error no classifier knows (XX000) instead of the
    /// reply: it committed, whatever the error says.
    UnknownError,
    /// Cut the client off at once but keep the server connection, whose transaction stays open
    /// and holds its row locks; after the delay, send the commit there, read the server's
    /// answer and close it. (A statement is sent at once without its Sync; the Sync is late.)
    LateCommit(Duration),
    /// Cut the client off at once and send nothing yet; after the delay, send the whole commit
    /// point (the statement's Bind..Sync) to the server, read its answer and close: a statement
    /// held in the network (a middlebox, a pooler's queue) that arrives after its client gave
    /// up. Counted in `late_commits` once answered, whatever the answer.
    LateStatement(Duration),
    /// Hold the commit point (the statement's Bind..Sync) for the delay, the client still
    /// connected and waiting, then send it and relay the answer: a statement slow in the
    /// network while its run is still alive.
    HeldStatement(Duration),
    /// Relay nothing more on this connection either way and answer nothing, with both
    /// connections left open (the transaction stays open), until `Proxy::thaw` or the proxy is
    /// dropped; then close both.
    Freeze,
    /// Answer one of CockroachDB's own errors (see `CrdbError` and the constants below it).
    Crdb(CrdbError),
}

/// An error as CockroachDB sends it, and what happened on the server before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrdbError {
    pub code: &'static str,
    pub message: &'static str,
    /// The commit is forwarded first, so it takes effect; otherwise nothing commits (a ROLLBACK
    /// is sent in place of COMMIT, a bare Sync in place of the statement).
    pub commits: bool,
    /// Sent as FATAL without ReadyForQuery, and the connection is closed after it: what
    /// CockroachDB does to a session when it drains (57P01).
    pub fatal: bool,
}

/// 40001 ReadWithinUncertaintyIntervalError, as the transaction retry error reference shows it.
pub const UNCERTAINTY: CrdbError = CrdbError {
    code: "40001",
    message: "restart transaction: TransactionRetryWithProtoRefreshError: \
              ReadWithinUncertaintyIntervalError: read at time 1591009232.376925064,0 encountered \
              previous write with future timestamp 1591009232.493830170,0 within uncertainty \
              interval `t <= 1591009232.587671686,0`; observed timestamps: \
              [{1 1591009232.587671686,0} {5 1591009232.376925064,0}]",
    commits: false,
    fatal: false,
};

/// 40001 RETRY_SERIALIZABLE, as the transaction retry error reference shows it.
pub const RETRY_SERIALIZABLE: CrdbError = CrdbError {
    code: "40001",
    message: "restart transaction: TransactionRetryWithProtoRefreshError: TransactionRetryError: \
              retry txn (RETRY_SERIALIZABLE - failed preemptive refresh due to conflicting locks \
              on /Table/106/1/918951292305080321/0 [reason=wait_policy])",
    commits: false,
    fatal: false,
};

/// 40003 "result is ambiguous" after the commit took effect (common-errors; the text in the
/// parentheses from cockroachdb/cockroach#54899).
pub const AMBIGUOUS_COMMITTED: CrdbError = CrdbError {
    code: "40003",
    message: "result is ambiguous (intent missing and record aborted)",
    commits: true,
    fatal: false,
};

/// 40003 when the commit did not take effect: the client cannot tell the two apart.
pub const AMBIGUOUS_NOT_COMMITTED: CrdbError = CrdbError {
    commits: false,
    ..AMBIGUOUS_COMMITTED
};

/// 57P01 to an open session of a draining node (pgwire's `ErrDrainingExistingConn`), after the
/// commit reached the server.
pub const SHUTTING_DOWN_COMMITTED: CrdbError = CrdbError {
    code: "57P01",
    message: "server is shutting down",
    commits: true,
    fatal: true,
};

/// 57P01 "server is shutting down" before the commit reached the server.
pub const SHUTTING_DOWN_NOT_COMMITTED: CrdbError = CrdbError {
    commits: false,
    ..SHUTTING_DOWN_COMMITTED
};

/// 57014 at the commit point after the commit took effect: CockroachDB's statement timeout
/// cancels the statement's context, and the docs list timeouts among the causes of an
/// ambiguous COMMIT (common-errors, "result is ambiguous"), so its answer may be this one.
pub const STATEMENT_TIMEOUT_COMMITTED: CrdbError = CrdbError {
    code: "57014",
    message: "query execution canceled due to statement timeout",
    commits: true,
    fatal: false,
};

/// The same when the commit did not take effect.
pub const STATEMENT_TIMEOUT_NOT_COMMITTED: CrdbError = CrdbError {
    commits: false,
    ..STATEMENT_TIMEOUT_COMMITTED
};

/// 57P01 to a new connection of a draining node (pgwire's `ErrDrainingNewConn`): inject it with
/// `At::Connect`.
pub const DRAINING: CrdbError = CrdbError {
    code: "57P01",
    message: "server is not accepting clients, try another node",
    commits: false,
    fatal: true,
};

/// CR000, CockroachDB's former code for a retryable error (cockroach-go still retries it), with
/// the "restart transaction" text every retry error carries.
pub const CR000: CrdbError = CrdbError {
    code: "CR000",
    message: "restart transaction: TransactionRetryError: retry txn (RETRY_SERIALIZABLE)",
    commits: false,
    fatal: false,
};

/// Where a fault strikes. Each point has its own queue of armed faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// The simple query `COMMIT`.
    Commit,
    /// The implicit commit of the transfer statement (a prepared statement whose text contains
    /// `INSERT INTO transfers`) run outside any transaction: its Bind..Sync batch, sent while
    /// the server is idle, is a transaction of its own that the Sync commits.
    Statement,
    /// A new connection's startup message: only `Fault::Crdb` applies, answered at once.
    Connect,
    /// The simple query that opens a transaction (`BEGIN …`): only `Fault::HeldStatement`
    /// applies (the BEGIN reaches the server late, its session idle and in no transaction).
    Begin,
}

pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    at_commit: Mutex<VecDeque<Fault>>,
    at_statement: Mutex<VecDeque<Fault>>,
    at_connect: Mutex<VecDeque<Fault>>,
    at_begin: Mutex<VecDeque<Fault>>,
    commits: AtomicU64,
    statements: AtomicU64,
    injected: AtomicU64,
    late_commits: AtomicU64,
    /// Parses held by `hold_parses_containing` so far.
    parses_held: AtomicU64,
    /// Answers held by `close_after_reply_to` so far.
    replies_held: AtomicU64,
    /// `slow_rows`: a pause after every so many rows.
    slow_rows: Mutex<Option<(u64, std::time::Duration)>>,
    gate: Mutex<Gate>,
    /// Wakes the threads waiting on `gate`.
    wake: Condvar,
}

/// What the freezes wait for.
#[derive(Default)]
struct Gate {
    /// `freeze_all` is in force: nothing is relayed.
    frozen_all: bool,
    /// `freeze_queries`: connections are made (startup and authentication answered), but what
    /// a session sends after that goes nowhere.
    frozen_queries: bool,
    /// `thaw` calls so far: a connection frozen by `Fault::Freeze` waits for the next one.
    thaws: u64,
    /// The proxy was dropped: every frozen connection is closed.
    closed: bool,
    /// `pool_of`: how many sessions may send queries at once; the others' first query waits.
    pool: Option<usize>,
    /// Sessions holding one of the pool's places (they sent a query).
    seated: usize,
    /// When sessions whose first query found the pool full began to wait for a place.
    queued: Vec<std::time::Instant>,
    /// `hold_parses_containing`: a Parse of a statement whose text contains this waits.
    held_parse: Option<String>,
    /// `close_after_reply_to`: the text of the statement whose answer ends its session, and
    /// which binding of it.
    close_after: Option<(String, u32)>,
    /// What becomes of that binding: its answer is held (`close_after_reply_to`), lost
    /// (`lose_answer_to`), or the binding itself is never sent (`lose_binding_of`).
    close_how: CloseHow,
    /// `close_after_reply_to` holds that answer until `release_reply`.
    reply_held: bool,
}

/// How the binding `close_after` chose ends its session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum CloseHow {
    /// Its answer reaches the client (held until `release_reply`), then the link drops.
    #[default]
    AfterReply,
    /// It reaches the server, whose answer is dropped; then the link drops: a statement that is
    /// its own commit committed, and its client cannot know.
    AnswerLost,
    /// The link drops before it is sent: the server never runs it.
    NeverSent,
}

impl Shared {
    /// The next fault armed at `at`, counted as injected.
    fn take_fault(&self, at: At) -> Option<Fault> {
        let queue = match at {
            At::Commit => &self.at_commit,
            At::Statement => &self.at_statement,
            At::Connect => &self.at_connect,
            At::Begin => &self.at_begin,
        };
        let fault = queue.lock().expect("lock").pop_front();
        if fault.is_some() {
            self.injected.fetch_add(1, Ordering::SeqCst);
        }
        fault
    }

    fn gate(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().expect("lock")
    }

    /// Blocks while `freeze_all` is in force, so the message just read goes nowhere; fails if
    /// the proxy is dropped meanwhile.
    fn hold(&self) -> io::Result<()> {
        self.hold_while(|gate| gate.frozen_all)
    }

    /// `hold` for a message of a session past its startup: `freeze_queries` holds it too.
    fn hold_session(&self) -> io::Result<()> {
        self.hold_while(|gate| gate.frozen_all || gate.frozen_queries)
    }

    /// Under `pool_of`, waits for a place in the pool before a session's first query, as a
    /// session pooler does for a client it has no server connection for.
    fn take_seat(&self, link: &Link) -> io::Result<()> {
        if link.seated.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut gate = self.gate();
        if gate.pool.is_some_and(|n| gate.seated >= n) {
            gate.queued.push(std::time::Instant::now());
        }
        while gate.pool.is_some_and(|n| gate.seated >= n) && !gate.closed {
            gate = self.wake.wait(gate).expect("lock");
        }
        if gate.closed {
            return Err(io::Error::other("the proxy was dropped while queued"));
        }
        gate.seated += 1;
        link.seated.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn hold_while(&self, frozen: impl Fn(&Gate) -> bool) -> io::Result<()> {
        let mut gate = self.gate();
        while frozen(&gate) && !gate.closed {
            gate = self.wake.wait(gate).expect("lock");
        }
        if frozen(&gate) {
            return Err(io::Error::other("the proxy was dropped while frozen"));
        }
        Ok(())
    }

    /// Blocks until the next `thaw` or until the proxy is dropped.
    fn wait_for_thaw(&self) {
        let mut gate = self.gate();
        let thaws = gate.thaws;
        while gate.thaws == thaws && !gate.closed {
            gate = self.wake.wait(gate).expect("lock");
        }
    }

    fn closed(&self) -> bool {
        self.gate().closed
    }
}

/// One client connection and its server connection, as both relay threads see them.
struct Link {
    client: TcpStream,
    server: TcpStream,
    /// What the server-to-client side does with the server's next messages.
    reply: Mutex<OnReply>,
    /// The status byte of the server's last ReadyForQuery: `b'I'` when no transaction is open.
    status: AtomicU8,
    /// A `Fault::Freeze` struck: nothing more is relayed, and nothing is closed.
    frozen: AtomicBool,
    /// It holds a place of the pool (`pool_of`), given back when it ends.
    seated: AtomicBool,
    /// `close_after_reply_to` chose this session.
    closing: Mutex<Option<Closing>>,
    /// The binding `close_after_reply_to` waits for was sent: the next ReadyForQuery is the
    /// last thing relayed, then both connections are closed, without a word.
    close_at_ready: AtomicBool,
}

/// The statement whose answer ends a session (`close_after_reply_to`).
struct Closing {
    /// What its text contains.
    text: String,
    /// The names of the session's prepared statements of that text.
    names: HashSet<Vec<u8>>,
    /// Bindings of them still to come, the last one's answer included.
    left: u32,
}

impl Link {
    fn set_reply(&self, on_reply: OnReply) {
        *self.reply.lock().expect("lock") = on_reply;
    }

    fn close(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }
}

/// What the server-to-client side does with the reply to a commit the client side tampered with.
#[derive(Debug, Clone)]
enum OnReply {
    Forward,
    /// Drop the server's messages up to ReadyForQuery, then send these bytes instead.
    Replace(Vec<u8>),
    /// Drop the server's messages up to ReadyForQuery, then close both connections.
    Cut,
    /// Drop everything: the client was cut off, the server connection is kept.
    Discard,
    /// Drop the server's messages up to ReadyForQuery, then close the server connection: the
    /// answer to a late commit.
    Close,
    /// Drop the server's messages up to ReadyForQuery, send these bytes instead, then close
    /// both connections (a FATAL error).
    ReplaceThenCut(Vec<u8>),
}

/// How the client-to-server side leaves a connection.
enum End {
    /// Close both connections now.
    Close,
    /// The server-to-client side closes the server connection once the server answered.
    AwaitReply,
}

impl Proxy {
    /// Listens on an ephemeral port of 127.0.0.1 and forwards to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared::default());
        let accept_shared = Arc::clone(&shared);
        thread::spawn(move || {
            for client in listener.incoming() {
                // Dropping the proxy wakes this loop with a connection of its own.
                if accept_shared.closed() {
                    break;
                }
                let Ok(client) = client else { continue };
                let shared = Arc::clone(&accept_shared);
                thread::spawn(move || relay(client, upstream, shared));
            }
        });
        Proxy { port, shared }
    }

    /// The next commit point of kind `at`, on any connection, gets `fault`.
    pub fn arm_at(&self, at: At, fault: Fault) {
        let queue = match at {
            At::Commit => &self.shared.at_commit,
            At::Statement => &self.shared.at_statement,
            At::Connect => &self.shared.at_connect,
            At::Begin => &self.shared.at_begin,
        };
        queue.lock().expect("lock").push_back(fault);
    }

    /// COMMITs seen so far.
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::SeqCst)
    }

    /// Faults injected so far, at either point.
    pub fn injected(&self) -> u64 {
        self.shared.injected.load(Ordering::SeqCst)
    }

    /// `url` (a postgres:// URL) pointed at the proxy, without TLS.
    pub fn url_for(&self, url: &DbUrl) -> String {
        url.via("127.0.0.1", self.port, &[("sslmode", "disable")])
            .expect("the test server's URL names one host")
            .expose()
            .to_string()
    }
}

/// Counters and stalls that only some tests use.
#[allow(dead_code)]
impl Proxy {
    /// Statement commit points (`At::Statement`) seen so far.
    pub fn statements(&self) -> u64 {
        self.shared.statements.load(Ordering::SeqCst)
    }

    /// `LateCommit`s whose commit has reached the server and been answered.
    pub fn late_commits(&self) -> u64 {
        self.shared.late_commits.load(Ordering::SeqCst)
    }

    /// From now on nothing is relayed, on any connection, either way, and new connections are
    /// accepted but never answered: a stopped server whose kernel still acknowledges. Every
    /// socket stays open.
    pub fn freeze_all(&self) {
        self.shared.gate().frozen_all = true;
    }

    /// Ends `freeze_all`: relaying resumes where it stopped.
    pub fn thaw_all(&self) {
        let mut gate = self.shared.gate();
        gate.frozen_all = false;
        gate.frozen_queries = false;
        self.shared.wake.notify_all();
    }

    /// A session pooler (PgBouncer, `pool_mode = session`) with `n` server connections: a
    /// session logs in, and its first query waits until fewer than `n` other sessions hold one
    /// (until one of them ends).
    pub fn pool_of(&self, n: usize) {
        self.shared.gate().pool = Some(n);
    }

    /// A slow link that keeps moving: the server's rows (DataRow messages) reach the client
    /// with a pause of `pause` after every `every` of them.
    pub fn slow_rows(&self, every: u64, pause: std::time::Duration) {
        *self.shared.slow_rows.lock().expect("lock") = Some((every, pause));
    }

    /// When sessions whose first query found `pool_of`'s places taken began to wait for one.
    pub fn queued(&self) -> Vec<std::time::Instant> {
        self.shared.gate().queued.clone()
    }

    /// A server that freezes once a session is made: new connections are answered and log in,
    /// and nothing a session sends after that is relayed, until `thaw_all`.
    pub fn freeze_queries(&self) {
        self.shared.gate().frozen_queries = true;
    }

    /// From now on a session's Parse of a statement whose text contains `text` is held (the
    /// session waits for its answer) until `release_parses`: a statement slow to arrive at a
    /// moment a test chooses.
    pub fn hold_parses_containing(&self, text: &str) {
        self.shared.gate().held_parse = Some(text.to_string());
    }

    /// Parses held by `hold_parses_containing` so far.
    pub fn parses_held(&self) -> u64 {
        self.shared.parses_held.load(Ordering::SeqCst)
    }

    /// Ends `hold_parses_containing`: the held Parses go on.
    pub fn release_parses(&self) {
        self.shared.gate().held_parse = None;
        self.shared.wake.notify_all();
    }

    /// The next session to prepare a statement whose text contains `text` gets the answer to
    /// its `nth` binding of it (1: the first), held until `release_reply`, and then loses both
    /// connections at once, without a word from the server (a pooler or a middlebox that drops
    /// the link): its end of file waits in the client's socket behind the answer.
    pub fn close_after_reply_to(&self, text: &str, nth: u32) {
        let mut gate = self.shared.gate();
        gate.close_after = Some((text.to_string(), nth));
        gate.close_how = CloseHow::AfterReply;
        gate.reply_held = true;
    }

    /// The next session to prepare a statement whose text contains `text` has its `nth`
    /// binding of it run by the server, and then loses both connections before any of the
    /// answer reaches it: a statement that is its own commit (an INSERT outside a transaction)
    /// committed unanswered.
    pub fn lose_answer_to(&self, text: &str, nth: u32) {
        let mut gate = self.shared.gate();
        gate.close_after = Some((text.to_string(), nth));
        gate.close_how = CloseHow::AnswerLost;
    }

    /// The next session to prepare a statement whose text contains `text` loses both
    /// connections as it sends its `nth` binding of it, which never reaches the server.
    pub fn lose_binding_of(&self, text: &str, nth: u32) {
        let mut gate = self.shared.gate();
        gate.close_after = Some((text.to_string(), nth));
        gate.close_how = CloseHow::NeverSent;
    }

    /// Answers held by `close_after_reply_to` so far.
    pub fn replies_held(&self) -> u64 {
        self.shared.replies_held.load(Ordering::SeqCst)
    }

    /// Lets the answer held by `close_after_reply_to` go, and its session end.
    pub fn release_reply(&self) {
        self.shared.gate().reply_held = false;
        self.shared.wake.notify_all();
    }

    /// Closes every connection frozen by `Fault::Freeze` so far, on both sides (the server
    /// aborts its transaction). Traffic is not resumed.
    pub fn thaw(&self) {
        self.shared.gate().thaws += 1;
        self.shared.wake.notify_all();
    }
}

impl Drop for Proxy {
    /// Closes the frozen connections and stops listening; the others carry on.
    fn drop(&mut self) {
        self.shared.gate().closed = true;
        self.shared.wake.notify_all();
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// The host:port of a postgres:// URL.
pub fn upstream_of(url: &DbUrl) -> SocketAddr {
    let (host, port) = url
        .host_port()
        .expect("the test server's URL names one host");
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        &host
    };
    format!("{host}:{port}")
        .parse()
        .expect("the test server's URL must name an IP address")
}

fn relay(mut client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) -> io::Result<()> {
    // Under `freeze_all` a new connection is accepted (the kernel did that) but not answered.
    shared.hold()?;
    let mut server = TcpStream::connect(upstream)?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    // Startup: untyped messages. Refuse SSL/GSS encryption ourselves, forward the rest.
    loop {
        let msg = read_untyped(&mut client)?;
        shared.hold()?;
        let code = msg
            .get(4..8)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        if matches!(code, Some(80_877_103) | Some(80_877_104)) {
            client.write_all(b"N")?;
            continue;
        }
        if let Some(Fault::Crdb(e)) = shared.take_fault(At::Connect) {
            client.write_all(&error_message(e.code, e.message, true))?;
            return Ok(());
        }
        server.write_all(&msg)?;
        break;
    }
    let link = Arc::new(Link {
        client: client.try_clone()?,
        server: server.try_clone()?,
        reply: Mutex::new(OnReply::Forward),
        status: AtomicU8::new(0),
        frozen: AtomicBool::new(false),
        seated: AtomicBool::new(false),
        closing: Mutex::new(None),
        close_at_ready: AtomicBool::new(false),
    });
    let back = {
        let (server, client) = (server.try_clone()?, client.try_clone()?);
        let (link, shared) = (Arc::clone(&link), Arc::clone(&shared));
        thread::spawn(move || server_to_client(server, client, &link, &shared))
    };
    let end = client_to_server(&mut client, &mut server, &link, &shared);
    if !matches!(end, Ok(End::AwaitReply)) {
        link.close();
    }
    let _ = back.join();
    link.close();
    if link.seated.load(Ordering::SeqCst) {
        shared.gate().seated -= 1;
        shared.wake.notify_all();
    }
    end.map(drop)
}

fn client_to_server(
    client: &mut TcpStream,
    server: &mut TcpStream,
    link: &Link,
    shared: &Shared,
) -> io::Result<End> {
    // Names of the prepared statements that insert into `transfers` ("" is the unnamed one).
    let mut transfer_statements = HashSet::new();
    loop {
        let msg = read_typed(client)?;
        shared.hold_session()?;
        // A pooler logs its clients in itself: the password goes through at once.
        if msg[0] != b'p' {
            shared.take_seat(link)?;
        }
        // A binding of the statement `close_after_reply_to` chose: the last one's answer is
        // the session's last.
        if msg[0] == b'B' {
            if let Some(c) = link.closing.lock().expect("lock").as_mut() {
                let bound = cstrings(&msg).nth(1).unwrap_or_default();
                if c.left > 0 && c.names.contains(bound) {
                    c.left -= 1;
                    if c.left == 0 {
                        match shared.gate().close_how {
                            CloseHow::AfterReply => {
                                link.close_at_ready.store(true, Ordering::SeqCst)
                            }
                            CloseHow::AnswerLost => link.set_reply(OnReply::Cut),
                            CloseHow::NeverSent => return Ok(End::Close),
                        }
                    }
                }
            }
        }
        // A commit point, as the messages that make it up: COMMIT, or a statement's Bind..Sync.
        let (at, batch) = match msg[0] {
            b'Q' if is_commit(&msg) => {
                shared.commits.fetch_add(1, Ordering::SeqCst);
                (At::Commit, vec![msg])
            }
            b'Q' if is_begin(&msg) => (At::Begin, vec![msg]),
            b'P' => {
                let mut fields = cstrings(&msg);
                let name = fields.next().unwrap_or_default().to_vec();
                let query = fields.next().unwrap_or_default();
                let text = String::from_utf8_lossy(query).into_owned();
                let held =
                    |gate: &Gate| gate.held_parse.as_deref().is_some_and(|t| text.contains(t));
                if held(&shared.gate()) {
                    shared.parses_held.fetch_add(1, Ordering::SeqCst);
                    shared.hold_while(held)?;
                }
                {
                    let mut closing = link.closing.lock().expect("lock");
                    if closing.is_none() {
                        let chosen = shared
                            .gate()
                            .close_after
                            .take_if(|(t, _)| text.contains(t.as_str()));
                        *closing = chosen.map(|(text, left)| Closing {
                            text,
                            names: HashSet::new(),
                            left,
                        });
                    }
                    if let Some(c) = closing.as_mut() {
                        match text.contains(&c.text) {
                            true => c.names.insert(name.clone()),
                            false => c.names.remove(&name),
                        };
                    }
                }
                // A Parse of a name replaces the statement it named before.
                if String::from_utf8_lossy(query).contains("INSERT INTO transfers") {
                    transfer_statements.insert(name);
                } else {
                    transfer_statements.remove(&name);
                }
                server.write_all(&msg)?;
                continue;
            }
            b'B' if transfer_statements.contains(cstrings(&msg).nth(1).unwrap_or_default()) => {
                let batch = read_batch(client, msg, shared)?;
                // Only a batch that ends with Sync while no transaction is open commits.
                let ends_in_sync = batch.last().is_some_and(|m| m[0] == b'S');
                if !(ends_in_sync && link.status.load(Ordering::SeqCst) == b'I') {
                    server.write_all(&batch.concat())?;
                    continue;
                }
                shared.statements.fetch_add(1, Ordering::SeqCst);
                (At::Statement, batch)
            }
            _ => {
                server.write_all(&msg)?;
                continue;
            }
        };
        let Some(fault) = shared.take_fault(at) else {
            server.write_all(&batch.concat())?;
            continue;
        };
        if let Some(end) = inject(fault, at, &batch, server, link, shared)? {
            return Ok(end);
        }
    }
}

/// Does `fault` to the commit point `batch`. Returns how the connection ends, if it does.
fn inject(
    fault: Fault,
    at: At,
    batch: &[Vec<u8>],
    server: &mut TcpStream,
    link: &Link,
    shared: &Shared,
) -> io::Result<Option<End>> {
    // What commits is the last message (COMMIT, or the statement's Sync); `before` is the rest.
    let Some((commit, before)) = batch.split_last() else {
        return Ok(None);
    };
    // Set what happens to the reply before the server can send it.
    match fault {
        Fault::Retry40001 => {
            link.set_reply(OnReply::Replace(error_then_idle(
                "40001",
                "restart transaction: TransactionRetryWithProtoRefreshError: \
                 ReadWithinUncertaintyIntervalError: injected by the test proxy",
            )));
            // The server answers in place of the statement too: a bare Sync (a no-op outside a
            // transaction), so its replies and ours cannot interleave.
            match at {
                At::Statement => server.write_all(commit)?,
                _ => server.write_all(&query("ROLLBACK"))?,
            }
        }
        Fault::Ambiguous40003 => {
            link.set_reply(OnReply::Replace(error_then_idle(
                "40003",
                "result is ambiguous: error=rpc error: connection reset (injected by the test proxy)",
            )));
            server.write_all(&batch.concat())?;
        }
        Fault::UnknownError => {
            link.set_reply(OnReply::Replace(error_then_idle(
                "XX000",
                "internal error: something odd (injected by the test proxy)",
            )));
            server.write_all(&batch.concat())?;
        }
        Fault::Crdb(e) => {
            let reply = if e.fatal {
                OnReply::ReplaceThenCut(error_message(e.code, e.message, true))
            } else {
                OnReply::Replace(error_then_idle(e.code, e.message))
            };
            link.set_reply(reply);
            match (e.commits, at) {
                (true, _) => server.write_all(&batch.concat())?,
                (false, At::Statement) => server.write_all(commit)?,
                (false, _) => server.write_all(&query("ROLLBACK"))?,
            }
        }
        Fault::CutAfterCommit => {
            link.set_reply(OnReply::Cut);
            server.write_all(&batch.concat())?;
        }
        Fault::CutBeforeCommit => {
            link.set_reply(OnReply::Discard);
            server.write_all(&before.concat())?;
            return Ok(Some(End::Close));
        }
        Fault::LateCommit(delay) => {
            link.set_reply(OnReply::Discard);
            server.write_all(&before.concat())?;
            let _ = link.client.shutdown(Shutdown::Both);
            // This connection's own thread waits; the other connections keep flowing.
            thread::sleep(delay);
            shared.hold()?;
            link.set_reply(OnReply::Close);
            server.write_all(commit)?;
            return Ok(Some(End::AwaitReply));
        }
        Fault::LateStatement(delay) => {
            link.set_reply(OnReply::Discard);
            let _ = link.client.shutdown(Shutdown::Both);
            thread::sleep(delay);
            shared.hold()?;
            link.set_reply(OnReply::Close);
            server.write_all(&batch.concat())?;
            return Ok(Some(End::AwaitReply));
        }
        Fault::HeldStatement(delay) => {
            thread::sleep(delay);
            shared.hold()?;
            server.write_all(&batch.concat())?;
        }
        Fault::Freeze => {
            link.frozen.store(true, Ordering::SeqCst);
            // This thread keeps both sockets open and relays nothing; the other side stops at
            // its next message.
            shared.wait_for_thaw();
            return Ok(Some(End::Close));
        }
    }
    Ok(None)
}

fn server_to_client(
    server: TcpStream,
    client: TcpStream,
    link: &Link,
    shared: &Shared,
) -> io::Result<()> {
    let result = forward_replies(server, client, link, shared);
    // Without its server the client has nothing to wait for, unless it is to see a frozen one.
    if !link.frozen.load(Ordering::SeqCst) {
        let _ = link.client.shutdown(Shutdown::Both);
    }
    result
}

fn forward_replies(
    mut server: TcpStream,
    mut client: TcpStream,
    link: &Link,
    shared: &Shared,
) -> io::Result<()> {
    let mut rows = 0u64;
    loop {
        let msg = read_typed(&mut server)?;
        if msg[0] == b'D' {
            rows += 1;
            let slow = *shared.slow_rows.lock().expect("lock");
            if let Some((_, pause)) = slow.filter(|(every, _)| rows.is_multiple_of(*every)) {
                std::thread::sleep(pause);
            }
        }
        shared.hold()?;
        if link.frozen.load(Ordering::SeqCst) {
            return Ok(());
        }
        let ready = msg[0] == b'Z';
        if ready {
            // Set before the client sees it, so its next message finds it up to date.
            link.status
                .store(msg.get(5).copied().unwrap_or(0), Ordering::SeqCst);
        }
        if ready && link.close_at_ready.load(Ordering::SeqCst) {
            shared.replies_held.fetch_add(1, Ordering::SeqCst);
            shared.hold_while(|gate| gate.reply_held)?;
            client.write_all(&msg)?;
            link.close();
            return Ok(());
        }
        let action = link.reply.lock().expect("lock").clone();
        match action {
            OnReply::Forward => client.write_all(&msg)?,
            OnReply::Discard => {}
            OnReply::Replace(bytes) => {
                if ready {
                    link.set_reply(OnReply::Forward);
                    client.write_all(&bytes)?;
                }
            }
            OnReply::Cut => {
                if ready {
                    link.close();
                    return Ok(());
                }
            }
            OnReply::ReplaceThenCut(bytes) => {
                if ready {
                    client.write_all(&bytes)?;
                    link.close();
                    return Ok(());
                }
            }
            OnReply::Close => {
                if ready {
                    shared.late_commits.fetch_add(1, Ordering::SeqCst);
                    let _ = link.server.shutdown(Shutdown::Both);
                    return Ok(());
                }
            }
        }
    }
}

/// A simple query that opens a transaction: `BEGIN`, with or without its modes.
fn is_begin(msg: &[u8]) -> bool {
    msg[0] == b'Q'
        && std::str::from_utf8(&msg[5..]).is_ok_and(|q| {
            let q = q.trim_start().to_ascii_uppercase();
            q == "BEGIN"
                || q.starts_with("BEGIN ")
                || q.starts_with("BEGIN;")
                || q.starts_with("BEGIN\0")
        })
}

fn is_commit(msg: &[u8]) -> bool {
    msg[0] == b'Q'
        && std::str::from_utf8(&msg[5..])
            .map(|q| {
                q.trim_end_matches('\0')
                    .trim()
                    .trim_end_matches(';')
                    .eq_ignore_ascii_case("COMMIT")
            })
            .unwrap_or(false)
}

/// The client's messages from `first` (a Bind) up to and including the next Sync: one batch.
/// A Flush also ends it, since the client may wait for replies before it sends more.
fn read_batch(client: &mut TcpStream, first: Vec<u8>, shared: &Shared) -> io::Result<Vec<Vec<u8>>> {
    let mut batch = vec![first];
    while !batch.last().is_some_and(|m| matches!(m[0], b'S' | b'H')) {
        let msg = read_typed(client)?;
        shared.hold()?;
        batch.push(msg);
    }
    Ok(batch)
}

/// The NUL-terminated strings at the start of a typed message's body.
fn cstrings(msg: &[u8]) -> impl Iterator<Item = &[u8]> {
    msg.get(5..).unwrap_or_default().split(|b| *b == 0)
}

/// A startup-phase message: length (including itself), then the body.
fn read_untyped(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let n = u32::from_be_bytes(len) as usize;
    let mut msg = len.to_vec();
    msg.resize(n.max(4), 0);
    s.read_exact(&mut msg[4..])?;
    Ok(msg)
}

/// A regular message: type byte, length (including itself), body.
fn read_typed(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    let n = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut msg = head.to_vec();
    msg.resize(1 + n.max(4), 0);
    s.read_exact(&mut msg[5..])?;
    Ok(msg)
}

fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    typed(b'Q', &body)
}

/// ErrorResponse with this SQLSTATE and message, then ReadyForQuery (idle).
fn error_then_idle(code: &str, message: &str) -> Vec<u8> {
    let mut out = error_message(code, message, false);
    out.extend(typed(b'Z', b"I"));
    out
}

/// ErrorResponse with this SQLSTATE and message, of severity FATAL or ERROR.
fn error_message(code: &str, message: &str, fatal: bool) -> Vec<u8> {
    let severity = if fatal { "FATAL" } else { "ERROR" };
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', message),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    typed(b'E', &body)
}

fn typed(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}
