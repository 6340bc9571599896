//! `transfer --file`: every line of a file of transfers checked first (a malformed file applies
//! nothing), then applied in chunks, each line's outcome streamed in file order, a summary on
//! stderr.
//!
//! The file is read twice, so that memory stays bounded whatever its size: once to check it, once
//! to apply it; the second reading applies only what the first checked (a file changed in between
//! stops there). Standard input and pipes are copied to a temporary file during the first reading.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use uuid::Uuid;

use crate::batch::input::Fingerprint;
use crate::batch::{self, Format, Line, Malformed, Outcome, Summary, Verdict};
use crate::cli::TransferArgs;
use crate::db::DbUrl;
use crate::error::Error;
use crate::transfer::Mode;

#[derive(Serialize)]
struct LineJson<'a> {
    line: u64,
    id: Uuid,
    outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

pub(super) fn transfer_file(
    url: &DbUrl,
    args: &TransferArgs,
    path: &Path,
    out: &mut impl Write,
) -> Result<(), Error> {
    if args.run.mode() == Mode::SingleStatement {
        return Err(Error::Usage(
            "--mode single-statement is for one transfer: --file runs each chunk in a \
             transaction, so that a lost COMMIT can be settled line by line"
                .into(),
        ));
    }
    // Ctrl-C: no new chunk starts, those under way finish, the rest is reported unknown (not
    // attempted). From the start: during the file's check it killed bank at once, with no word
    // and exit 130 (found by a helper playing a new user).
    crate::interrupt::catch();
    let (format, mut input) = crate::interrupt::before_sending(|| {
        let source = Source::open(path, args.format)?;
        let format = source.format;
        source.check().map(|input| (format, input))
    })?;
    let isolation = args.batch_isolation.unwrap_or_default();
    let connections = match args.connections {
        Some(n) => batch::Connections::Given(usize::try_from(n).unwrap_or(1)),
        None => {
            let (url, timeout) = (url.clone(), args.run.policy().timeout);
            batch::Connections::Asked(Box::new(move || {
                connections_asked(&url, timeout, isolation)
            }))
        }
    };
    let options = batch::Options {
        batch: usize::try_from(args.batch.unwrap_or(batch::DEFAULT_BATCH)).unwrap_or(usize::MAX),
        connections,
        policy: args.run.policy(),
        isolation,
    };
    let reader = input.reader()?;
    let (lines, changed) =
        std::mem::take(&mut input.fingerprint).verify(batch::input::read(reader, format));
    let mut results = Results {
        out,
        json: args.json,
        failed: None,
        lost: false,
    };
    let started = std::time::Instant::now();
    let applied = batch::apply(url, options, lines, |l: &Line, v: &Verdict| {
        results.write(l, v);
        Ok::<(), Error>(())
    });
    let summary = match applied {
        Ok(summary) => summary,
        Err(e) => {
            // Nothing sent (a login refused, no thread for the first connection): with --json,
            // every line is `unknown`, not attempted, one object each, as when the server cannot
            // be reached at all (a program reading the results found none of the file's lines
            // here, one per line there). As text, the error line alone says it.
            let why = match &e {
                Error::FileNotStarted(c) if args.json => Some(c.to_string()),
                Error::FileNoThread(io) if args.json => {
                    Some(format!("cannot start a thread ({io})"))
                }
                _ => None,
            };
            if let Some(why) = why {
                let mut summary = batch::Summary::default();
                let again = input.reader().map(|r| batch::input::read(r, format));
                for l in again.into_iter().flatten().flatten() {
                    results.write(&l, &Verdict::not_attempted(&why));
                    *summary.counts.entry(Outcome::Unknown).or_default() += 1;
                    summary.not_attempted += 1;
                }
                results.flush();
                summary.elapsed = started.elapsed();
                crate::say(format_args!("{}", summary_line(&summary)));
            }
            return Err(e);
        }
    };
    results.flush();
    if let Some((used, connections, why)) = &summary.fewer_connections {
        crate::say(format_args!(
            "bank: warning: applied on {used} connection{} of {connections}: {why}",
            if *used == 1 { "" } else { "s" }
        ));
    }
    crate::say(format_args!("{}", summary_line(&summary)));
    let total = summary.total();
    let unknown = summary.count(Outcome::Unknown);
    let failed = total - summary.count(Outcome::Applied) - summary.count(Outcome::AlreadyApplied);
    let output = |e: &io::Error| match is_closed(e) {
        true => "the output was closed".to_string(),
        false => format!("cannot write the results ({e})"),
    };
    if unknown > 0 {
        // Each line's error gives the words of a lost connection; the cause, where it may be
        // the server's setting that a rerun meets again, is said once.
        if let Some(hint) = results.lost.then(crate::error::idle_timeout_hint).flatten() {
            crate::say(format_args!("bank: warning: connections were lost: {hint}"));
        }
        // Settled by a rerun, which checks the file again.
        let stopped = match (&results.failed, crate::interrupt::interrupted()) {
            (Some(e), _) => Some(output(e)),
            (None, true) => Some("interrupted (Ctrl-C, SIGTERM or SIGHUP)".to_string()),
            // The database refused statements for a reason that is no line's own: said once,
            // with its hint (what to grant, where to connect), as a single transfer says it.
            // Or the run stopped (a connection that could not be made again: the database
            // renamed, the password changed): said why, as a single transfer says it; the line
            // gave the count alone.
            (None, false) => summary
                .refused_whole
                .clone()
                .or_else(|| summary.stopped.clone()),
        };
        Err(Error::BatchUnknown {
            unknown,
            not_attempted: summary.not_attempted,
            total,
            stopped,
        })
    } else if let Some(line) = changed.get() {
        // Not a usage error (exit 2 says nothing was applied): the lines above it were.
        Err(Error::FileChanged {
            name: input.name.clone(),
            line,
        })
    } else if let Some(e) = results.failed.filter(|e| failed > 0 || !is_closed(e)) {
        Err(Error::OutputFailed { why: output(&e) })
    } else if failed > 0 {
        Err(Error::BatchFailed {
            failed,
            total,
            interrupted: crate::interrupt::interrupted(),
            because: summary.refused_whole.clone(),
        })
    } else {
        Ok(())
    }
}

/// Where each line's result goes. Once it cannot be written (the reader of a pipe has gone, the
/// disk is full), the run stops as for Ctrl-C: going on would apply transfers whose outcome
/// nobody is told.
struct Results<'a, W: Write> {
    out: &'a mut W,
    json: bool,
    failed: Option<io::Error>,
    /// A line was left unknown by a lost connection.
    lost: bool,
}

impl<W: Write> Results<'_, W> {
    fn write(&mut self, l: &Line, v: &Verdict) {
        self.lost |= v.outcome == Outcome::Unknown
            && v.error
                .as_deref()
                .is_some_and(crate::retry::reads_as_lost_connection);
        if self.failed.is_none() {
            if let Err(e) = write_line(self.out, self.json, l, v) {
                self.fail(e);
            }
        }
    }

    fn flush(&mut self) {
        if self.failed.is_none() {
            if let Err(e) = self.out.flush() {
                self.fail(e);
            }
        }
    }

    fn fail(&mut self, e: io::Error) {
        self.failed = Some(e);
        crate::interrupt::output_failed();
    }
}

/// The reader of a pipe has gone (`... | head -2`): once every line is applied, a normal end.
fn is_closed(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe
}

/// `--connections` when not given: 2, but 1 on a PostgreSQL that runs transactions SERIALIZABLE
/// by default when the file's transactions run at that default (`--batch-isolation
/// server-default`). Its predicate locks are per index page, and past
/// `max_pred_locks_per_transaction` per table, so two groups that share no row still abort each
/// other, and one connection was faster there (12.4–13.9k against 9.5–11.7k transfers/s,
/// BENCHMARKS.md). CockroachDB's serializable transactions conflict on rows only.
///
/// A server that cannot be asked (refusing a second connection for this role, frozen) gets
/// one connection: the file goes on with the one it has. The question comes once the first
/// group is done (`batch::Connections::Asked`), off the run's path. Asked before the first line,
/// such a server ended the run with exit 1, or kept it waiting forever when it froze after the
/// connection was made (found by a reviewer); then, bounded by a quarter of `--timeout`, it still
/// came on top of the first statement's deadline.
fn connections_asked(url: &DbUrl, timeout: Duration, isolation: batch::Isolation) -> usize {
    match ask_isolation(url, timeout) {
        Ok((cockroachdb, default)) => connections_for(cockroachdb, &default, isolation),
        Err(e) => {
            log::debug!("transfer --file: the default isolation level is not known ({e})");
            1
        }
    }
}

/// Whether the server is CockroachDB, and its default isolation level.
fn ask_isolation(url: &DbUrl, timeout: Duration) -> Result<(bool, String), Error> {
    #[derive(diesel::QueryableByName)]
    struct Isolation {
        #[diesel(sql_type = diesel::sql_types::Text)]
        isolation: String,
    }
    let mut conn = url.connect_within("bank", timeout)?;
    let server = crate::db::engine::detect(&mut conn).map_err(Error::from)?;
    let iso: Isolation = diesel::RunQueryDsl::get_result(
        diesel::sql_query("SELECT current_setting('default_transaction_isolation') AS isolation"),
        &mut conn,
    )
    .map_err(Error::from)?;
    Ok((server.is_cockroachdb(), iso.isolation))
}

/// REPEATABLE READ counts as SERIALIZABLE: bank's sessions run at SERIALIZABLE there
/// (`db::session::tune`).
fn connections_for(
    cockroachdb: bool,
    default_isolation: &str,
    isolation: batch::Isolation,
) -> usize {
    let serializable = ["serializable", "repeatable read"]
        .iter()
        .any(|level| default_isolation.eq_ignore_ascii_case(level));
    if !cockroachdb && serializable && isolation == batch::Isolation::ServerDefault {
        1
    } else {
        2
    }
}

fn write_line(out: &mut impl Write, json: bool, l: &Line, v: &Verdict) -> io::Result<()> {
    // A server's message may hold line ends (libpq's do): one result, one line. With the hints a
    // single transfer's error gives (what to grant a role refused a table, a read-only
    // database's cure, whose timeout): a refused line said the server's words alone.
    let error = v
        .error
        .as_deref()
        .map(|e| crate::one_line(&crate::error::with_hints(e.to_string())));
    if json {
        serde_json::to_writer(
            &mut *out,
            &LineJson {
                line: l.line,
                id: l.transfer.id,
                outcome: v.outcome,
                error: error.as_deref(),
            },
        )?;
        writeln!(out)
    } else {
        match &error {
            Some(e) => writeln!(
                out,
                "line {}: {} {}: {}",
                l.line,
                l.transfer.id,
                v.outcome.as_str(),
                crate::for_terminal(e)
            ),
            None => writeln!(
                out,
                "line {}: {} {}",
                l.line,
                l.transfer.id,
                v.outcome.as_str()
            ),
        }
    }
}

/// "1000 transfers in 0.08s (12500/s): 990 applied, 10 insufficient_funds; retries: 2
/// serialization".
fn summary_line(s: &Summary) -> String {
    let secs = s.elapsed.max(Duration::from_micros(1)).as_secs_f64();
    let counts: Vec<String> = Outcome::ALL
        .iter()
        .filter(|o| s.count(**o) > 0)
        .map(|o| format!("{} {}", s.count(*o), o.as_str()))
        .collect();
    // The rate of the lines this run sent: those it never sent (Ctrl-C, `| head`, a stop) took
    // no time, and counted, `| head -2` made a file look 40 times faster (found by a reviewer).
    let sent = s.total().saturating_sub(s.not_attempted);
    let mut line = format!(
        "{} in {secs:.2}s ({:.0}/s): {}",
        crate::counted(s.total(), "transfer"),
        sent as f64 / secs,
        if counts.is_empty() {
            "nothing to do".to_string()
        } else {
            counts.join(", ")
        }
    );
    if s.retries.total() > 0 {
        let retries: Vec<String> = crate::retry::Cause::ALL
            .iter()
            .filter(|c| s.retries.get(**c) > 0)
            .map(|c| format!("{} {}", s.retries.get(*c), c.as_str()))
            .collect();
        line.push_str(&format!("; retries: {}", retries.join(", ")));
    }
    line
}

/// Where the transfers come from.
struct Source {
    name: String,
    format: Format,
    input: Box<dyn BufRead>,
    /// The copy of standard input or a pipe, read again to apply it.
    spool: Option<Spool>,
    path: Option<PathBuf>,
}

impl Source {
    fn open(path: &Path, format: Option<Format>) -> Result<Source, Error> {
        let stdin = path == Path::new("-");
        // Control characters in a name would reach the terminal raw (an escape sequence): shown
        // escaped, as values from inside the file are.
        let name = if stdin {
            "standard input".to_string()
        } else {
            crate::text::escaped(&path.display().to_string())
        };
        // A pipe (`--file <(command)`, a FIFO, /dev/stdin) can be read only once: like standard
        // input, it is copied as it is checked, and the copy is applied.
        let mut once = stdin;
        let mut input: Box<dyn BufRead> = if stdin {
            Box::new(BufReader::new(Waiting(io::stdin().lock())))
        } else {
            let cannot = |e: io::Error| Error::Usage(format!("cannot read {name}: {e}"));
            let file = File::open(path).map_err(cannot)?;
            let metadata = file.metadata().map_err(cannot)?;
            // Said as such: it was "line 1: cannot read: Is a directory (os error 21) (the rest
            // was not read)", a line and a rest of a file that is none (found by a helper
            // playing a new user).
            if metadata.is_dir() {
                return Err(Error::Usage(format!(
                    "cannot read {name}: it is a directory, not a file of transfers"
                )));
            }
            once = !metadata.is_file();
            Box::new(BufReader::new(file))
        };
        // The input's start, up to its first byte that is not blank: what its format is sniffed
        // from, and whole for the readers after (a byte order mark the csv reader strips only
        // when its first read holds all of it). The first read alone, as it was, took what a pipe
        // had so far: a producer whose first write was a blank line, or half a byte order mark,
        // had its JSON Lines taken for CSV and refused (exit 2; found by a helper playing a new
        // user).
        let (head, ended) =
            head_of(&mut input).map_err(|e| Error::Usage(format!("cannot read {name}: {e}")))?;
        let format = match format.or_else(|| (!stdin).then(|| Format::of_path(path)).flatten()) {
            Some(f) => f,
            None => Format::sniff(&head),
        };
        input = match ended {
            // At its end already: a terminal's Ctrl-D is read once, and reading again waited for
            // a second one.
            true => Box::new(io::Cursor::new(head)),
            false => Box::new(io::Cursor::new(head).chain(input)),
        };
        let spool = if once { Some(Spool::create()?) } else { None };
        Ok(Source {
            name,
            format,
            input,
            spool,
            path: (!once).then(|| path.to_path_buf()),
        })
    }

    /// Reads every line once: the first malformed one refuses the whole file.
    fn check(self) -> Result<Checked, Error> {
        let Source {
            name,
            format,
            input,
            spool,
            path,
        } = self;
        let mut copy = spool.as_ref().map(|s| s.writer()).transpose()?;
        // Why the copy failed, if it did: the machine's failure, not a malformed line (it was
        // "line 1: cannot read: File too large", exit 2; found by a fault-injecting helper).
        let copy_failed = std::rc::Rc::new(std::cell::RefCell::new(None));
        let reader: Box<dyn BufRead> = match copy.take() {
            Some(w) => Box::new(BufReader::new(Tee {
                input,
                copy: w,
                failed: std::rc::Rc::clone(&copy_failed),
            })),
            None => input,
        };
        // Input read once (standard input, a pipe) is read no further than its first malformed
        // line: nothing of it will be applied, and counting the rest copied all of it to the
        // temporary file first (3 GB of random bytes filled /tmp before one line was said), or
        // never ended on a producer that does not stop.
        let once = spool.is_some();
        let mut first: Option<Malformed> = None;
        let mut more = 0u64;
        let mut fingerprint = Fingerprint::default();
        for r in batch::input::read(reader, format) {
            if crate::interrupt::interrupted() {
                return Err(Error::FileCheckInterrupted(
                    crate::interrupt::reason().to_string(),
                ));
            }
            match r {
                Ok(line) => fingerprint.add(&line),
                Err(m) if first.is_none() => {
                    first = Some(m);
                    if once {
                        break;
                    }
                }
                Err(_) => more += 1,
            }
        }
        if let Some(e) = copy_failed.borrow_mut().take() {
            return Err(Spool::cannot(e));
        }
        if let Some(m) = first {
            let also = match more {
                _ if once => " (the rest was not read)".to_string(),
                0 => String::new(),
                1 => " (and 1 more malformed line)".to_string(),
                n => format!(" (and {n} more malformed lines)"),
            };
            return Err(Error::Usage(format!(
                "{name}: {m}{also}; nothing was applied"
            )));
        }
        Ok(Checked {
            spool,
            path,
            name,
            fingerprint,
        })
    }
}

/// Standard input that waits for its writer even in non-blocking mode (O_NONBLOCK, which a
/// parent such as Node.js may set on the pipe it hands down): a read before the writer has
/// written fails with EAGAIN there, where a blocking pipe waits. It was taken for a read error: a
/// sound file from a producer that paused was refused ("line 51: cannot read: Resource
/// temporarily unavailable", exit 2), where `--file /dev/stdin`, a descriptor of its own, was
/// read whole (found by a helper playing a new user).
struct Waiting<R>(R);

impl<R: Read> Read for Waiting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        crate::guard::again_while_it_would_block(|| self.0.read(buf))
    }
}

/// At most this much of an input's start is read to sniff its format: past it, the input is
/// taken for CSV (as blank lines alone are), and nothing that long is held.
const HEAD_AT_MOST: usize = 64 * 1024;

/// Reads `input` until its first byte that is not blank, after a whole byte order mark, with at
/// least 4 bytes read (UTF-16's mark is 2), or its end, or `HEAD_AT_MOST` bytes: the bytes read,
/// to be read again, and whether the input ended.
fn head_of(input: &mut dyn BufRead) -> io::Result<(Vec<u8>, bool)> {
    let bom = "\u{feff}".as_bytes();
    let decided = |head: &[u8]| {
        let text = head.strip_prefix(bom).unwrap_or(head);
        head.len() >= 4 && text.iter().any(|b| !b.is_ascii_whitespace())
    };
    let mut head = Vec::new();
    loop {
        let buf = input.fill_buf()?;
        if buf.is_empty() {
            return Ok((head, true));
        }
        let n = buf.len().min(HEAD_AT_MOST - head.len());
        head.extend_from_slice(&buf[..n]);
        input.consume(n);
        if decided(&head) || head.len() >= HEAD_AT_MOST {
            return Ok((head, false));
        }
    }
}

/// A file whose every line is a valid transfer.
struct Checked {
    spool: Option<Spool>,
    path: Option<PathBuf>,
    name: String,
    /// What the check read, which the second reading must find again.
    fingerprint: Fingerprint,
}

impl Checked {
    fn reader(&self) -> Result<Box<dyn BufRead>, Error> {
        let file = match (&self.spool, &self.path) {
            (Some(s), _) => s.reader()?,
            (None, Some(p)) => File::open(p)
                .map_err(|e| Error::Usage(format!("cannot read {} again: {e}", self.name)))?,
            (None, None) => return Err(Error::Usage(format!("cannot read {}", self.name))),
        };
        Ok(Box::new(BufReader::new(file)))
    }
}

/// Copies what is read to a file; a failure to write the copy is kept in `failed` (the read
/// fails too, and the caller tells the two apart).
struct Tee<R, W> {
    input: R,
    copy: W,
    failed: std::rc::Rc<std::cell::RefCell<Option<io::Error>>>,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.read(buf)?;
        let copied = match self.copy.write_all(&buf[..n]) {
            Ok(()) if n == 0 => self.copy.flush(),
            done => done,
        };
        if let Err(e) = copied {
            let kind = e.kind();
            *self.failed.borrow_mut() = Some(e);
            return Err(io::Error::new(
                kind,
                "the temporary copy could not be written",
            ));
        }
        Ok(n)
    }
}

/// A temporary file without a name: no other user can open it, and the kernel frees it when
/// the process ends, however it ends (a named copy in the temporary directory was readable by
/// every local user and outlived kill -9).
struct Spool {
    file: File,
}

impl Spool {
    fn create() -> Result<Spool, Error> {
        let file = tempfile::tempfile().map_err(|source| Error::Spool {
            what: format!(
                "make a temporary copy of the input in {}",
                std::env::temp_dir().display()
            ),
            source,
        })?;
        Ok(Spool { file })
    }

    fn cannot(e: io::Error) -> Error {
        Error::Spool {
            what: "copy the input to a temporary file".into(),
            source: e,
        }
    }

    fn writer(&self) -> Result<io::BufWriter<File>, Error> {
        Ok(io::BufWriter::new(
            self.file.try_clone().map_err(Spool::cannot)?,
        ))
    }

    /// The copy from its start. The handles share one offset: the writer is done by now.
    fn reader(&self) -> Result<File, Error> {
        let mut file = self.file.try_clone().map_err(Spool::cannot)?;
        file.seek(io::SeekFrom::Start(0)).map_err(Spool::cannot)?;
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::connections_for;

    #[test]
    fn the_rate_counts_only_the_lines_sent() {
        let mut s = super::Summary::default();
        s.counts.insert(super::Outcome::Applied, 4000);
        s.counts.insert(super::Outcome::Unknown, 16000);
        s.not_attempted = 16000;
        s.elapsed = std::time::Duration::from_secs(2);
        assert_eq!(
            super::summary_line(&s),
            "20000 transfers in 2.00s (2000/s): 4000 applied, 16000 unknown"
        );
        let mut one = super::Summary::default();
        one.counts.insert(super::Outcome::Applied, 1);
        one.elapsed = std::time::Duration::from_secs(1);
        assert_eq!(
            super::summary_line(&one),
            "1 transfer in 1.00s (1/s): 1 applied"
        );
    }

    #[test]
    fn one_connection_on_a_serializable_postgresql_at_its_default_else_two() {
        use crate::batch::Isolation::{ReadCommitted, ServerDefault};
        assert_eq!(connections_for(false, "serializable", ServerDefault), 1);
        assert_eq!(connections_for(false, "read committed", ServerDefault), 2);
        assert_eq!(connections_for(false, "repeatable read", ServerDefault), 1);
        assert_eq!(connections_for(true, "serializable", ServerDefault), 2);
        for default in ["serializable", "repeatable read", "read committed"] {
            assert_eq!(
                connections_for(false, default, ReadCommitted),
                2,
                "{default}"
            );
            assert_eq!(
                connections_for(true, default, ReadCommitted),
                2,
                "{default}"
            );
        }
    }
}
