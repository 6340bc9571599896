//! Chunks of a file on several connections, results in file order.
//!
//! The file is read a window at a time (`--batch` lines per connection). A window's lines are
//! split into groups that share no account and no transfer id with each other (the connected
//! components of "shares an account or an id", packed into one group per connection), each group
//! keeping file order. A line's one-by-one outcome depends only on earlier lines it is connected
//! to, and those are all in its own group, so the groups can run at once on their connections and
//! every outcome is still the one-by-one outcome. A group starts only when it shares nothing with
//! any group still in flight (from an earlier window); otherwise it waits. Over many accounts a
//! window falls apart into many small components and both connections work; over a few hot
//! accounts it is one component and one connection does it.
//!
//! A frozen server is watched for: a statement that outlives its deadline (plus `GRACE`) is given
//! up, its lines reported `unknown` (see `guard`). After any line ends `unknown` or
//! `not_applied` (but for one another run answered, `Verdict::answered_elsewhere`), no new group starts (later lines may depend on it): the rest of the file is
//! reported `unknown`, not attempted (`Verdict::not_attempted`), and a rerun of the same file
//! settles everything.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::chunk::{ChunkRunner, Fatal, Watch};
use super::input::Line;
use super::{Outcome, Verdict};
use crate::db::{DbUrl, Session};
use crate::guard::GaveUp;
use crate::retry::{RetryCounts, RetryPolicy};
use crate::transfer::GRACE;

/// How a file is applied.
pub struct Options {
    /// Lines per chunk (per statement when none is refused).
    pub batch: usize,
    /// Connections applying chunks at once.
    pub connections: Connections,
    pub policy: RetryPolicy,
    /// The level of every statement's transaction.
    pub isolation: super::Isolation,
}

/// How many connections apply the file.
pub enum Connections {
    /// As many as asked for (`--connections`).
    Given(usize),
    /// As many as the answer says, once it comes. The first connection works alone until it has
    /// finished a group anyway (see `spawn`); the question is asked then, on a thread of its
    /// own, and the others join when it is answered. Asked before the first group, its round
    /// trips came before every file's first statement, and a frozen server cost the run a
    /// quarter of `--timeout` more than its deadline.
    Asked(Box<dyn FnOnce() -> usize + Send>),
}

/// Counts per outcome, retries, elapsed time.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub counts: BTreeMap<Outcome, u64>,
    /// Of the `unknown` lines, those this run never sent.
    pub not_attempted: u64,
    pub retries: RetryCounts,
    pub elapsed: Duration,
    /// Connections that applied the file and connections meant to, when fewer: the database
    /// refused the others at login for want of a connection slot (its error).
    pub fewer_connections: Option<(usize, usize, String)>,
    /// The database refused statements for a reason that is no line's own
    /// (`ChunkRunner::refused_whole`): the first such, for the run's error line.
    pub refused_whole: Option<String>,
    /// Why the run stopped before its last line, when it did ("the run stopped: the connection
    /// was lost and could not be made again (… password authentication failed …)"): for the
    /// run's error line, which said only how many lines were left unknown (each line's error
    /// said why).
    pub stopped: Option<String>,
}

impl Summary {
    pub fn count(&self, o: Outcome) -> u64 {
        self.counts.get(&o).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }
}

struct Job {
    seq: u64,
    lines: Vec<Line>,
}

struct Done {
    worker: usize,
    seq: u64,
    result: Result<Vec<Verdict>, Fatal>,
    retries: RetryCounts,
    /// The job was not run: this worker's first connection was refused for want of a
    /// connection slot (the error), so it ends and its group goes to another.
    retired: Option<String>,
    /// The database refused a statement of the group for a reason that is no line's own
    /// (`ChunkRunner::refused_whole`).
    refused_whole: Option<String>,
}

struct Worker {
    jobs: mpsc::Sender<Job>,
    thread: thread::JoinHandle<()>,
    watch: Watch,
    /// Given up on (frozen): never sent another chunk.
    lost: bool,
    /// Making its first session, before any statement of its first group: nothing of that
    /// group is sent until it has one.
    connecting: Arc<AtomicBool>,
}

/// Lines that go to one connection as one chunk: positions in their window, in file order.
struct Group {
    window: u64,
    positions: Vec<usize>,
    keys: HashSet<Uuid>,
}

struct InFlight {
    seq: u64,
    worker: usize,
    group: Group,
}

/// A window of the file and its verdicts as groups finish.
struct Window {
    lines: Vec<Line>,
    verdicts: Vec<Option<Verdict>>,
    groups_left: usize,
}

/// Groups per connection in a window. The first group of a window almost always shares an
/// account with the last group of the window before (over 100,000 accounts, two groups of 1,000
/// lines share 40 accounts on average), so it waits for it: with one group per connection, every
/// window ended with connections idle, waiting for the slowest group.
const GROUPS_PER_CONNECTION: usize = 4;

/// How long the loop waits for a worker's answer before it looks at the deadlines again.
const POLL: Duration = Duration::from_millis(20);

/// Every account and id a line touches.
fn line_keys(l: &Line) -> [Uuid; 3] {
    [l.transfer.id, l.transfer.from_id, l.transfer.to_id]
}

/// Splits `lines` into at most `n` groups that share no account and no id, each in file order,
/// as even in size as the connected components allow.
fn split(lines: &[Line], n: usize) -> Vec<Vec<usize>> {
    if n <= 1 || lines.len() <= 1 {
        return vec![(0..lines.len()).collect()];
    }
    // Union-find over keys: a line joins its id and both accounts.
    let mut node: HashMap<Uuid, usize> = HashMap::new();
    let mut parent: Vec<usize> = Vec::new();
    fn find(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    let mut roots = Vec::with_capacity(lines.len());
    for l in lines {
        let ids = line_keys(l).map(|k| {
            *node.entry(k).or_insert_with(|| {
                parent.push(parent.len());
                parent.len() - 1
            })
        });
        let r = find(&mut parent, ids[0]);
        for other in &ids[1..] {
            let o = find(&mut parent, *other);
            parent[o] = r;
        }
        roots.push(ids[0]);
    }
    let mut components: HashMap<usize, Vec<usize>> = HashMap::new();
    for (pos, first) in roots.into_iter().enumerate() {
        let root = find(&mut parent, first);
        components.entry(root).or_default().push(pos);
    }
    // Largest first into the smallest group (longest-processing-time packing).
    let mut components: Vec<Vec<usize>> = components.into_values().collect();
    components.sort_by_key(|c| std::cmp::Reverse(c.len()));
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); n];
    for c in components {
        if let Some(smallest) = groups.iter_mut().min_by_key(|g| g.len()) {
            smallest.extend(c);
        }
    }
    groups.retain(|g| !g.is_empty());
    for g in &mut groups {
        g.sort_unstable();
    }
    groups
}

/// Applies `lines` in chunks and calls `emit` for each line, in file order. `Err` only when
/// nothing more can be said (the schema is missing, the database refuses the connection).
pub fn apply<E>(
    url: &DbUrl,
    options: Options,
    lines: impl Iterator<Item = Line>,
    mut emit: impl FnMut(&Line, &Verdict) -> Result<(), E>,
) -> Result<Summary, E>
where
    E: From<Fatal>,
{
    let started = Instant::now();
    let (batch, policy, isolation) = (options.batch, options.policy, options.isolation);
    let (connections, mut ask) = match options.connections {
        Connections::Given(n) => (n.max(1), None),
        Connections::Asked(ask) => (1, Some(ask)),
    };
    // The answer about how many connections, while it is awaited.
    let mut answer: Option<mpsc::Receiver<usize>> = None;
    let (done_tx, done_rx) = mpsc::channel::<Done>();
    // Ids another run answered "not applied" while this one was at them: no line of any
    // connection applies one afterwards (`ChunkRunner::barring`).
    let barred = std::sync::Arc::new(std::sync::Mutex::new(HashSet::new()));
    // Why a worker ended before its first statement (`Done::retired`), or never started (no
    // thread for it), and the workers that applied a group: the warning counts those, not the
    // ones that merely never had to retire.
    let mut fewer: Option<String> = None;
    // Workers that retired before their first statement: windows are made for the others.
    let mut retired = 0usize;
    let mut workers: Vec<Worker> = Vec::new();
    for n in 0..connections {
        match spawn(url, (batch, policy, isolation), n, done_tx.clone(), &barred) {
            Ok(w) => workers.push(w),
            // Nothing sent yet.
            Err(e) if n == 0 => return Err(E::from(Fatal::Thread(e))),
            Err(e) => {
                fewer.get_or_insert(no_thread(&e));
                break;
            }
        }
    }
    // Connections meant to apply the file, for the warning when fewer did.
    let mut meant = connections;
    // Kept for the workers an answer adds.
    let mut done_tx = ask.is_some().then_some(done_tx);

    let windows_for = |connections: usize| {
        // One connection gains nothing from groups but their order, largest first: lines
        // applied out of file order, where another client's transfer could fall between a
        // later line and an earlier one (a helper's finding; several connections cannot help
        // it, the README says so). So one connection takes the file in order.
        let lines = connections.max(1).saturating_mul(GROUPS_PER_CONNECTION);
        let groups = match connections {
            0 | 1 => 1,
            _ => lines,
        };
        // The same window either way: one group of it, in statements of `batch` lines.
        (groups, batch.max(1).saturating_mul(lines))
    };
    let (mut groups_per_window, mut window_size) = windows_for(connections);
    let wait = policy.timeout + GRACE;
    let mut lines = lines.peekable();
    let mut summary = Summary::default();
    let mut next_seq = 0u64;
    let mut next_window = 0u64;
    let mut windows: BTreeMap<u64, Window> = BTreeMap::new();
    let mut queue: VecDeque<Group> = VecDeque::new();
    let mut in_flight: Vec<InFlight> = Vec::new();
    // The first worker alone until it has finished a group: the others then connect while it
    // holds its connection, so that a database with a single slot for this role gives it to the
    // first (see `spawn`).
    let mut idle: Vec<usize> = vec![0];
    let mut others_idle = false;
    let mut stopping: Option<String> = None;
    let mut used: HashSet<usize> = HashSet::new();
    // Whether any group has come back decided: until then a fatal error ends the run as one.
    let mut any_done = false;
    let mut record = |summary: &mut Summary, l: &Line, v: &Verdict| {
        *summary.counts.entry(v.outcome).or_default() += 1;
        summary.not_attempted += u64::from(v.is_not_attempted());
        emit(l, v)
    };

    let mut looked = Instant::now();
    loop {
        if stopping.is_none() && crate::interrupt::interrupted() {
            stopping = Some(format!(
                "{}; run the file again to apply the rest",
                crate::interrupt::reason()
            ));
        }
        if let Some(rx) = &answer {
            match rx.try_recv() {
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => answer = None,
                Ok(n) => {
                    answer = None;
                    log::debug!("transfer --file: the server's answer: {n} connection(s)");
                    if let (None, Some(tx)) = (&stopping, done_tx.take()) {
                        let from = workers.len();
                        meant = meant.max(n);
                        for k in from..n {
                            match spawn(url, (batch, policy, isolation), k, tx.clone(), &barred) {
                                Ok(w) => workers.push(w),
                                Err(e) => {
                                    fewer.get_or_insert(no_thread(&e));
                                    break;
                                }
                            }
                        }
                        idle.extend((from..workers.len()).rev());
                        (groups_per_window, window_size) =
                            windows_for(workers.len().saturating_sub(retired));
                    }
                }
            }
        }
        // Start every group that may start.
        while stopping.is_none() && !idle.is_empty() {
            if queue.is_empty() {
                let chunk: Vec<Line> = lines.by_ref().take(window_size).collect();
                if chunk.is_empty() {
                    break;
                }
                let w = next_window;
                next_window += 1;
                let groups = split(&chunk, groups_per_window);
                for positions in groups.iter() {
                    let keys = positions
                        .iter()
                        .flat_map(|p| line_keys(&chunk[*p]))
                        .collect();
                    queue.push_back(Group {
                        window: w,
                        positions: positions.clone(),
                        keys,
                    });
                }
                windows.insert(
                    w,
                    Window {
                        verdicts: vec![None; chunk.len()],
                        lines: chunk,
                        groups_left: groups.len(),
                    },
                );
            }
            let Some(next) = queue.front() else { break };
            if in_flight
                .iter()
                .any(|f| !f.group.keys.is_disjoint(&next.keys))
            {
                break;
            }
            let (Some(group), Some(worker)) = (queue.pop_front(), idle.pop()) else {
                break;
            };
            let Some(window) = windows.get(&group.window) else {
                break;
            };
            let job_lines: Vec<Line> = group.positions.iter().map(|p| window.lines[*p]).collect();
            let seq = next_seq;
            next_seq += 1;
            workers[worker].watch.start();
            if workers[worker]
                .jobs
                .send(Job {
                    seq,
                    lines: job_lines,
                })
                .is_err()
            {
                // The worker's thread is gone (it cannot be, short of a panic).
                finish_group(&mut windows, &group, Vec::new());
                stopping = Some("a worker thread ended".into());
                continue;
            }
            in_flight.push(InFlight { seq, worker, group });
        }
        if in_flight.is_empty() {
            emit_ready(&mut windows, &mut summary, &mut record)?;
            let Some(reason) = stopping.clone() else {
                if queue.is_empty() && lines.peek().is_none() {
                    break;
                }
                continue;
            };
            // Stopping: what is left was never attempted.
            let never = Verdict::not_attempted(&reason);
            for group in queue.drain(..) {
                let verdicts = vec![never.clone(); group.positions.len()];
                finish_group(&mut windows, &group, verdicts);
            }
            emit_ready(&mut windows, &mut summary, &mut record)?;
            for l in lines.by_ref() {
                record(&mut summary, &l, &never)?;
            }
            break;
        }
        match done_rx.recv_timeout(POLL) {
            Ok(done) => {
                let Some(at) = in_flight.iter().position(|f| f.seq == done.seq) else {
                    // A chunk given up on earlier, finishing late: already reported.
                    continue;
                };
                let f = in_flight.swap_remove(at);
                summary.retries += done.retries;
                if !others_idle {
                    others_idle = true;
                    idle.extend((1..workers.len()).rev());
                    // Not for a file whose lines are all under way: its only use is more
                    // connections for what remains, and a login then abandoned at exit is all
                    // a small file got of it (found by a reviewer).
                    let more = !queue.is_empty() || lines.peek().is_some();
                    if let Some(ask) = ask.take().filter(|_| more) {
                        let (tx, rx) = mpsc::channel();
                        // No thread to ask on: the file goes on with the connection it has.
                        match crate::spawn(move || {
                            let _ = tx.send(ask());
                        }) {
                            Ok(_) => answer = Some(rx),
                            Err(e) => log::debug!("transfer --file: not asked: {e}"),
                        }
                    }
                }
                if let Some(refused) = done.retired {
                    // Nothing of the group was sent: it goes first to the next worker free, and
                    // the groups behind it in the queue still wait for it.
                    fewer.get_or_insert(refused);
                    // The windows still to come, for the connections left: one left takes them
                    // in file order (a reviewer's nit: they stayed split into groups).
                    retired += 1;
                    (groups_per_window, window_size) =
                        windows_for(workers.len().saturating_sub(retired));
                    queue.push_front(f.group);
                    continue;
                }
                used.insert(done.worker);
                idle.push(done.worker);
                let verdicts = match done.result {
                    Ok(v) => {
                        any_done = true;
                        v
                    }
                    Err(fatal) => {
                        let worker = &workers[f.worker];
                        // Nothing applied anywhere yet (a URL that never connects, a schema that
                        // is not there): the one error says it all.
                        if !any_done && worker.watch.decided().is_empty() {
                            emit_ready(&mut windows, &mut summary, &mut record)?;
                            return Err(E::from(fatal));
                        }
                        // Statements of this group committed before the connection was lost
                        // and could not be made again: their lines were never reported. The
                        // statement in hand may have reached its COMMIT; the rest was not sent.
                        let error = fatal.to_string();
                        let in_hand = format!(
                            "the connection was lost and could not be made again ({error})"
                        );
                        let stop = format!("the run stopped: {in_hand}");
                        let verdicts = cut_short(&worker.watch, &f.group, &in_hand, &stop);
                        stopping.get_or_insert(stop);
                        verdicts
                    }
                };
                // A line merely not attempted (Ctrl-C) is no chunk that could not be settled,
                // nor one another run answered (found with runs of one file at once: the rest of
                // the file ended `unknown`): this run never applies that id, so the lines after
                // it are judged as after a refusal. (Only a run of its own can have answered it,
                // so file order across reruns, which stopping keeps for this run's own failures,
                // is already shared with another run.)
                if let Some(why) = done.refused_whole {
                    summary.refused_whole.get_or_insert(why);
                }
                if let Some(v) = verdicts.iter().find(|v| {
                    v.outcome.is_unsettled() && !v.is_not_attempted() && !v.is_answered_elsewhere()
                }) {
                    stopping.get_or_insert_with(|| stop_reason(v));
                }
                finish_group(&mut windows, &f.group, verdicts);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                stopping.get_or_insert_with(|| "the workers ended".into());
            }
        }
        // This process did not run (`guard::stopped_during`): the statements in flight wait
        // again from now.
        if crate::guard::stopped_during(looked, POLL).is_some() {
            for f in &in_flight {
                workers[f.worker].watch.wait_again();
            }
        }
        looked = Instant::now();
        // A statement past its deadline: the server is frozen or unreachable.
        let mut i = 0;
        while i < in_flight.len() {
            let w = &workers[in_flight[i].worker];
            let Some(how) = w.watch.give_up_if_older(wait) else {
                i += 1;
                continue;
            };
            let f = in_flight.swap_remove(i);
            workers[f.worker].lost = true;
            // Its first session never answered (a session pooler at its limit logs a client in
            // and holds its queries until a server connection is free, which the other workers
            // keep until the run ends): nothing of the group was sent, and its abandoned ticket
            // keeps the worker from sending any, should the session come. The group goes to a
            // worker that has a connection, as for a login refused for want of a slot; the run
            // stopped there, every later line unknown, on every rerun (found by a
            // fault-injecting helper with PgBouncer).
            if workers[f.worker].connecting.load(Ordering::SeqCst) {
                fewer.get_or_insert_with(|| {
                    format!(
                        "a new session's first query got no answer within {}, as from a \
                         session pooler whose server connections are all taken",
                        crate::text::seconds(wait)
                    )
                });
                // Nor does any other new session get one: the workers that have none yet are
                // not given a group again (each waited a deadline in turn, found by a reviewer).
                idle.retain(|w| used.contains(w));
                queue.push_front(f.group);
                continue;
            }
            // Before its COMMIT this run applied nothing, but a file's ids may have an earlier
            // run's attempt still on its way to commit (an orphan holding the very locks this
            // statement waited on), and a server that does not answer cannot be asked: unknown
            // either way, as for a statement given up held up
            // (`ChunkRunner::nobody_else_can_commit`).
            let what = match how {
                GaveUp::NotApplied => {
                    "before its COMMIT was sent (this run applied nothing, but cannot tell \
                     whether an earlier run's attempt at these lines is still about to commit)"
                }
                GaveUp::Unknown => "after its COMMIT was sent",
            };
            let error = format!(
                "no answer from the database within {}, {what}",
                crate::text::seconds(wait)
            );
            // The lines never sent are told why the run stopped, not what the statement in
            // hand met ("after its COMMIT was sent" read as theirs).
            let stop = format!(
                "the run stopped: a statement got no answer from the database within {}",
                crate::text::seconds(wait)
            );
            let verdicts = cut_short(&workers[f.worker].watch, &f.group, &error, &stop);
            // The summary, said once, names the causes an operator can look for; each line
            // keeps the short reason.
            stopping.get_or_insert(format!("{stop} ({})", crate::guard::COMMIT_STALLS));
            finish_group(&mut windows, &f.group, verdicts);
        }
        emit_ready(&mut windows, &mut summary, &mut record)?;
    }
    // Workers end when their job channel closes; each is waited for, so that no thread is still
    // closing its connection while the process exits (libpq's and OpenSSL's exit handlers then
    // race it: a run killed by a signal after printing every line was seen). Lost (frozen) ones
    // are left behind.
    for w in workers.drain(..) {
        drop(w.jobs);
        if !w.lost {
            let _ = w.thread.join();
        }
    }
    summary.elapsed = started.elapsed();
    summary.fewer_connections = fewer.map(|refused| (used.len().max(1), meant, refused));
    // Only a run that stopped: the last chunk left unknown set `stopping` too ("another chunk
    // could not be settled"), and a one-line file held up said "the run stopped: another chunk
    // could not be settled (…)" of its only line.
    let left = summary.not_attempted > 0;
    let stopped = stopping.filter(|why| left || why.starts_with("the run stopped"));
    summary.stopped = stopped.map(|why| match why.starts_with("the run stopped") {
        true => why,
        false => format!("the run stopped: {why}"),
    });
    Ok(summary)
}

/// Why the run stops after a chunk whose line ended with `v` (`not_applied` or `unknown`).
fn stop_reason(v: &Verdict) -> String {
    format!(
        "another chunk {} ({})",
        v.outcome.held_up_because(),
        v.error.as_deref().unwrap_or("no reason given")
    )
}

/// The verdicts of a group whose worker stopped short (a frozen server, a connection that
/// could not be made again): those decided so far, then `unknown` (with `in_hand`) for the
/// statement under way, which may have reached its COMMIT, and `not_applied` for the lines after
/// it, which were never sent.
fn cut_short(watch: &Watch, group: &Group, in_hand: &str, error: &str) -> Vec<Verdict> {
    let mut verdicts = watch.decided();
    let n = group.positions.len().saturating_sub(verdicts.len());
    let sent = watch.in_statement().min(n);
    verdicts.extend((0..sent).map(|_| Verdict {
        outcome: Outcome::Unknown,
        error: Some(in_hand.to_string()),
    }));
    verdicts.extend((sent..n).map(|_| Verdict::not_attempted(error)));
    verdicts
}

/// Files a group's verdicts in its window; a line without one was never attempted.
fn finish_group(windows: &mut BTreeMap<u64, Window>, group: &Group, verdicts: Vec<Verdict>) {
    let Some(w) = windows.get_mut(&group.window) else {
        return;
    };
    let mut verdicts = verdicts.into_iter();
    for p in &group.positions {
        w.verdicts[*p] = Some(
            verdicts
                .next()
                .unwrap_or_else(|| Verdict::not_attempted("another chunk could not be settled")),
        );
    }
    w.groups_left = w.groups_left.saturating_sub(1);
}

/// Writes the finished windows that are next in file order.
fn emit_ready<E>(
    windows: &mut BTreeMap<u64, Window>,
    summary: &mut Summary,
    record: &mut impl FnMut(&mut Summary, &Line, &Verdict) -> Result<(), E>,
) -> Result<(), E> {
    while let Some(entry) = windows.first_entry() {
        if entry.get().groups_left > 0 {
            break;
        }
        let w = entry.remove();
        let missing = Verdict::not_attempted("another chunk could not be settled");
        for (l, v) in w.lines.iter().zip(&w.verdicts) {
            record(summary, l, v.as_ref().unwrap_or(&missing))?;
        }
    }
    Ok(())
}

fn spawn(
    url: &DbUrl,
    (batch, policy, isolation): (usize, RetryPolicy, super::Isolation),
    n: usize,
    done: mpsc::Sender<Done>,
    barred: &std::sync::Arc<std::sync::Mutex<HashSet<Uuid>>>,
) -> std::io::Result<Worker> {
    let (jobs, rx) = mpsc::channel::<Job>();
    let session = Session::new(url.clone(), "bank")
        .with_timeout(policy.timeout)
        .checking_schema();
    // A group holds up to a window's lines (--batch per connection); a statement, --batch.
    let mut runner = ChunkRunner::new(session, policy)
        .at_most(batch.max(1))
        .ids_given()
        .isolated(isolation)
        .barring(std::sync::Arc::clone(barred));
    runner.interruptible = true;
    let watch = runner.watch.clone();
    let connecting = Arc::new(AtomicBool::new(false));
    let marked = Arc::clone(&connecting);
    log::debug!("transfer --file: starting connection {n}");
    let thread = crate::spawn(move || {
        for job in rx {
            // A connection the database has no slot for (a role's CONNECTION LIMIT) while the
            // first worker holds one (it finishes a group before any other worker starts): the
            // file goes on with the connections it has, where retrying this one until the
            // deadline left its group unknown, on every rerun. The first worker's connection is
            // retried as any failure to connect (a slot may free up), and so is one lost mid-file.
            if n > 0 && runner.session.connects == 0 {
                connecting.store(true, Ordering::SeqCst);
                let first = runner.session.conn().map(|_| ());
                connecting.store(false, Ordering::SeqCst);
                if let Err(e) = first {
                    // Nor has this process a file for another socket (`ulimit -n`): the first
                    // worker holds the one there was, and retrying left the group unknown at
                    // the deadline (exit 3) where the file could go on (a helper playing a new
                    // user).
                    let why = match () {
                        _ if e.is_connection_limit() => Some("the database had no slot for"),
                        _ if e.is_out_of_client_files() => {
                            Some("this process may open no more files (ulimit -n) for")
                        }
                        _ => None,
                    };
                    if let Some(why) = why {
                        let _ = done.send(Done {
                            worker: n,
                            seq: job.seq,
                            result: Ok(Vec::new()),
                            retries: RetryCounts::default(),
                            retired: Some(format!("{why} another ({e})")),
                            refused_whole: None,
                        });
                        break;
                    }
                    // Retried in `apply`, as any failure to connect.
                    log::debug!("connection {n}: {e}");
                }
            }
            log::debug!("connection {n}: a group of {} lines", job.lines.len());
            let result = runner.apply(&job.lines);
            let retries = std::mem::take(&mut runner.retries);
            let stop = result.is_err();
            if done
                .send(Done {
                    worker: n,
                    seq: job.seq,
                    result,
                    retries,
                    retired: None,
                    refused_whole: runner.refused_whole.take(),
                })
                .is_err()
                || stop
            {
                break;
            }
        }
    })?;
    Ok(Worker {
        jobs,
        thread,
        watch,
        lost: false,
        connecting: marked,
    })
}

/// Why a file has fewer connections than meant: the thread for the next could not start.
fn no_thread(e: &std::io::Error) -> String {
    format!("the system would not start a thread for another connection ({e})")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::NewTransfer;

    fn line(n: u64, from: u128, to: u128) -> Line {
        Line {
            line: n,
            transfer: NewTransfer {
                id: Uuid::from_u128(1000 + n as u128),
                from_id: Uuid::from_u128(from),
                to_id: Uuid::from_u128(to),
                amount: 1,
            },
        }
    }

    #[test]
    fn a_window_splits_into_groups_that_share_nothing_and_keep_file_order() {
        // 1-2, 3-4 and 2-5 (joined to the first through account 2), 6-7.
        let lines = [line(1, 1, 2), line(2, 3, 4), line(3, 2, 5), line(4, 6, 7)];
        let groups = split(&lines, 2);
        assert_eq!(groups.len(), 2);
        for g in &groups {
            assert!(g.windows(2).all(|w| w[0] < w[1]), "file order: {groups:?}");
        }
        let of = |p: usize| groups.iter().position(|g| g.contains(&p));
        assert_eq!(of(0), of(2), "lines sharing an account stay together");
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 4);
        assert_eq!(split(&lines, 1), vec![vec![0, 1, 2, 3]]);
    }

    /// A chunk rolled back by a full disk ("could not extend file") was settled `not_applied`,
    /// and the run said it "could not be settled" (an operator's finding).
    #[test]
    fn a_run_stopped_by_a_chunk_says_what_became_of_it() {
        let why = |outcome| {
            stop_reason(&Verdict {
                outcome,
                error: Some("could not extend file \"base/1/2\": No space left on device".into()),
            })
        };
        assert_eq!(
            why(Outcome::NotApplied),
            "another chunk was not applied (could not extend file \"base/1/2\": No space left \
             on device)"
        );
        assert_eq!(
            why(Outcome::Unknown),
            "another chunk could not be settled (could not extend file \"base/1/2\": No space \
             left on device)"
        );
    }

    #[test]
    fn lines_sharing_an_id_stay_together() {
        let mut a = line(1, 1, 2);
        let mut b = line(2, 3, 4);
        b.transfer.id = a.transfer.id;
        a.line = 1;
        let groups = split(&[a, b], 2);
        assert_eq!(groups, vec![vec![0, 1]]);
    }
}
