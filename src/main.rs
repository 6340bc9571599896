//! The `bank` binary: parse, run, print the error once, exit with its code.

use bank::exit_code::ExitCode as Code;

use clap::Parser;

/// A file-size limit on the output (`ulimit -f`) makes the kernel kill the process with SIGXFSZ
/// at the write that passes it: transfers committed, and not a word said (found by a
/// fault-injecting helper). Ignored, the write fails with EFBIG instead, and bank says so as on
/// a full disk.
#[allow(unsafe_code)]
fn ignore_file_size_limit() {
    // SAFETY: `signal` takes no pointer; SIG_IGN is a valid disposition for SIGXFSZ, set here
    // before any other thread exists.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// Whether SIGHUP was ignored when bank started (`nohup bank …`): if so, it is kept ignored
/// (`interrupt::keep_hangup_ignored`), where the Ctrl-C handler took it over and a closed terminal
/// stopped the run nohup was meant to keep going.
#[allow(unsafe_code)]
fn hangup_ignored() -> bool {
    // SAFETY: with a null new action, `sigaction` only reads SIGHUP's disposition into `old`, a
    // zeroed `sigaction` of ours (all-zero is a valid value of that C struct).
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Ignores SIGHUP again, once the Ctrl-C handler has taken it (see `hangup_ignored`).
#[allow(unsafe_code)]
fn ignore_hangup() {
    // SAFETY: `signal` takes no pointer; SIG_IGN is a valid disposition for SIGHUP.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

/// Whether standard output was closed when bank was started (`bank balances >&-`), recorded by
/// `note_closed_stdout` before Rust's runtime starts: that runtime reopens a closed descriptor 0,
/// 1 or 2 on /dev/null, so every command wrote its results to nothing and exited 0.
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether standard output was open for reading only when bank was started (`bank seed
/// 1</dev/null`, a descriptor inherited read-only), recorded by `note_closed_stdout`: every write
/// to it fails with EBADF, which Rust's standard output takes for a closed descriptor and
/// swallows, so results went to nothing as with `>&-` (a seed created accounts whose ids nobody
/// saw, a file applied with every line's outcome lost, exit 0; found by a helper playing a new
/// user).
static STDOUT_READ_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Run by the C library before `main` (and so before Rust's runtime replaces a closed standard
/// output with /dev/null): notes whether descriptor 1 is open, and open for writing.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
extern "C" fn note_closed_stdout() {
    // SAFETY: `fcntl(F_GETFL)` on a descriptor number only reads the process's table.
    let flags = unsafe { libc::fcntl(libc::STDOUT_FILENO, libc::F_GETFL) };
    let closed = flags == -1;
    // O_PATH descriptors (no I/O at all) have O_RDONLY's access mode too.
    let read_only = !closed && (flags & libc::O_ACCMODE) == libc::O_RDONLY;
    STDOUT_CLOSED.store(closed, std::sync::atomic::Ordering::Relaxed);
    STDOUT_READ_ONLY.store(read_only, std::sync::atomic::Ordering::Relaxed);
}

// SAFETY: `.init_array` holds functions the C library calls before `main`, with no argument
// they need; this one touches only an atomic.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
#[used]
#[unsafe(link_section = ".init_array")]
static NOTE_CLOSED_STDOUT: extern "C" fn() = note_closed_stdout;

/// Ends through `exit_now` once standard output is flushed: the C library's exit handlers
/// (OpenSSL's, loaded by libpq) raced a thread still closing a connection, and a run that had
/// printed its one correct line was seen to die by a signal (exit -1 to its caller, 1 in about
/// 600 runs of the suite, not reproduced on demand). `_exit` runs none of them.
fn main() {
    let code = bank_main();
    use std::io::Write;
    let _ = std::io::stdout().flush();
    bank::exit_now(i32::from(code))
}

fn bank_main() -> Code {
    ignore_file_size_limit();
    if hangup_ignored() {
        bank::interrupt::keep_hangup_ignored(ignore_hangup);
    }
    // A .env that cannot be read stops only a command that needs it for its URL (see
    // `DbUrl::resolve`); any other says so once and goes on.
    let dotenv = bank::db::load_dotenv();
    if let Err(e) = &dotenv {
        bank::db::defer_dotenv_error(e);
    }
    // Every command's result goes to standard output: with it closed, none could be seen, so
    // none is run (a transfer applied, a file's outcomes lost, and exit 0).
    if STDOUT_CLOSED.load(std::sync::atomic::Ordering::Relaxed) {
        bank::say(format_args!(
            "bank: error: standard output is closed (>&-), where bank writes its results: \
             nothing was done (to discard them, send them to /dev/null)"
        ));
        return Code::Usage;
    }
    if STDOUT_READ_ONLY.load(std::sync::atomic::Ordering::Relaxed) {
        bank::say(format_args!(
            "bank: error: standard output is open for reading only (as with 1</dev/null), where \
             bank writes its results: nothing was done (to discard them, send them to /dev/null \
             with >/dev/null)"
        ));
        return Code::Usage;
    }
    let cli = match bank::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    let describes_itself = matches!(
        cli.command,
        bank::cli::Command::Completions(_) | bank::cli::Command::Man(_)
    );
    if let (Err(e), false) = (&dotenv, describes_itself) {
        if cli.database_url.is_some() || std::env::var_os("DATABASE_URL").is_some() {
            bank::say(format_args!(
                "bank: warning: {}; its settings are ignored",
                error_line(e)
            ));
        }
    }
    init_logging(cli.verbose);
    match bank::run(cli) {
        Ok(()) => Code::Success,
        // The reader went away (`bank balances | head -1`): a normal end, as for ripgrep.
        Err(e) if e.is_broken_pipe() => Code::Success,
        Err(e) => {
            let code = e.exit_code();
            let what = match code {
                Code::Success => "warning",
                _ => "error",
            };
            bank::say(format_args!("bank: {what}: {}", error_line(&e)));
            code
        }
    }
}

/// Help and version go to stdout with status 0; a usage error becomes one line on stderr.
fn usage_error(e: &clap::Error) -> Code {
    use clap::error::ErrorKind;
    // `bank` alone: one line that names the commands, as for any other usage error (clap
    // printed the whole help on stderr).
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        use clap::CommandFactory;
        let cli = bank::cli::Cli::command();
        let names: Vec<&str> = cli
            .get_subcommands()
            .filter(|c| !c.is_hide_set())
            .map(|c| c.get_name())
            .collect();
        bank::say(format_args!(
            "bank: error: no command given: one of {} (see bank --help)",
            names.join(", ")
        ));
        return Code::Usage;
    }
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        use std::io::Write;
        // A help that could not be written (a full disk) is a failure, as for `bank man`.
        let written = e.print().and_then(|()| std::io::stdout().flush());
        return match written {
            Ok(()) => Code::Success,
            // The reader went away (`bank --help | head -1`): a normal end.
            Err(why) if why.kind() == std::io::ErrorKind::BrokenPipe => Code::Success,
            Err(why) => {
                bank::say(format_args!("bank: error: cannot write output: {why}"));
                Code::Failure
            }
        };
    }
    let text = e.to_string();
    // clap's message, without the usage block and the "try --help" tip that follow it.
    let message = refused_value(e).or_else(|| not_utf8(e)).unwrap_or_else(|| {
        text.split("\n\n")
            .next()
            .unwrap_or_default()
            .trim_start_matches("error: ")
            .to_string()
    });
    // clap quotes the argument it did not expect: a URL given without --database-url.
    let command = command_of(&text);
    // `bank transfer` alone named --from, --to and --amount only: a file is the other way.
    let or_file = match (command.as_str(), e.kind()) {
        ("bank transfer", ErrorKind::MissingRequiredArgument) => " (or --file PATH)",
        _ => "",
    };
    bank::say(format_args!(
        "bank: error: {}{or_file}{}{} (see {command} --help)",
        bank::text::escaped(&bank::db::redact_message(&bank::one_line(&message))),
        from_environment(e),
        did_you_mean(e),
    ));
    Code::Usage
}

/// Which argument is not UTF-8: clap says only "invalid UTF-8 was detected in one or more
/// arguments" (found by a helper). Its bytes are shown as Rust escapes them.
fn not_utf8(e: &clap::Error) -> Option<String> {
    if e.kind() != clap::error::ErrorKind::InvalidUtf8 {
        return None;
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let at = args.iter().position(|a| a.to_str().is_none())?;
    let shown = format!("{:?}", args[at]);
    Some(match args[..at].last().and_then(|a| a.to_str()) {
        Some(flag) if flag.starts_with('-') && at > 1 && takes_a_value(flag) => {
            format!("the value of '{flag}' is not valid UTF-8: {shown}")
        }
        _ => format!("argument {at} is not valid UTF-8: {shown}"),
    })
}

/// Whether `flag` (`--from`, `-v`) takes a value in any of bank's commands: a flag that takes
/// none (`-v`) was named as the owner of the argument after it (found by a helper).
fn takes_a_value(flag: &str) -> bool {
    use clap::CommandFactory;
    fn any(cmd: &clap::Command, flag: &str) -> bool {
        cmd.get_arguments().any(|a| {
            let named = match flag.strip_prefix("--") {
                Some(long) => a.get_long() == Some(long),
                None => flag.len() == 2 && a.get_short() == flag.chars().nth(1),
            };
            named && a.get_action().takes_values()
        }) || cmd.get_subcommands().any(|c| any(c, flag))
    }
    any(&bank::cli::Cli::command(), flag)
}

/// A value a parser refused, in clap's words but from its parts: clap's rendering strips escape
/// sequences, the value's and the parser's message's, so that `--amount $'\e[31m5'` read
/// "invalid value '5' … got '5'". They are escaped afterwards, as everywhere.
fn refused_value(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    use std::error::Error as _;
    let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
        e.get(ContextKind::InvalidArg),
        e.get(ContextKind::InvalidValue),
    ) else {
        return None;
    };
    match (e.kind(), e.source(), e.get(ContextKind::ValidValue)) {
        (ErrorKind::ValueValidation, Some(why), _) => {
            Some(format!("invalid value '{value}' for '{arg}': {why}"))
        }
        // A value outside a list (`--mode`, `--format`; found by a reviewer).
        (ErrorKind::InvalidValue, _, Some(ContextValue::Strings(valid))) if !valid.is_empty() => {
            Some(format!(
                "invalid value '{value}' for '{arg}' [possible values: {}]",
                valid.join(", ")
            ))
        }
        // An empty path (clap refuses it with an empty list of possible values).
        (ErrorKind::InvalidValue, _, _) if value.is_empty() => {
            Some(format!("invalid value '' for '{arg}': it is empty"))
        }
        _ => None,
    }
}

/// clap's suggestion for a mistyped command or flag, which its message gives in a later
/// paragraph, cut with the usage block.
fn did_you_mean(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let mut similar = Vec::new();
    for kind in [ContextKind::SuggestedSubcommand, ContextKind::SuggestedArg] {
        match e.get(kind) {
            Some(ContextValue::String(s)) => similar.push(s.clone()),
            Some(ContextValue::Strings(s)) => similar.extend(s.iter().cloned()),
            _ => {}
        }
    }
    match similar.is_empty() {
        true => String::new(),
        false => format!(" (did you mean '{}'?)", similar.join("' or '")),
    }
}

/// The command whose help lists what went wrong (`bank transfer`), read off clap's usage line:
/// `bank --help` does not list a command's flags.
fn command_of(text: &str) -> String {
    let words: Vec<&str> = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("Usage: "))
        .map(|usage| {
            usage
                .split_whitespace()
                .take_while(|w| !w.starts_with(['[', '<', '-', '(']))
                .collect()
        })
        .unwrap_or_default();
    match words.first() {
        Some(&"bank") if words.len() > 1 => words.join(" "),
        // A bad value: clap's message has no usage block. The command is the first argument
        // that names one.
        _ => {
            use clap::CommandFactory;
            let cli = bank::cli::Cli::command();
            // `args_os`: `args` panics on an argument that is not UTF-8, and the panic printed
            // it raw, a URL's password with it.
            std::env::args_os()
                .skip(1)
                .find_map(|a| {
                    let a = a.to_str()?;
                    cli.get_subcommands()
                        .any(|c| c.get_name() == a)
                        .then(|| a.to_string())
                })
                .map_or_else(|| "bank".to_string(), |c| format!("bank {c}"))
        }
    }
}

/// Where a refused value came from when the user did not type the flag clap names: one of the
/// `BANK_*` variables (in the environment or in .env), which clap does not say.
fn from_environment(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    use clap::CommandFactory;
    let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
        e.get(ContextKind::InvalidArg),
        e.get(ContextKind::InvalidValue),
    ) else {
        return String::new();
    };
    let flag = arg.split_whitespace().next().unwrap_or_default();
    let typed = |a: &str| a == flag || a.starts_with(&format!("{flag}="));
    if std::env::args_os().any(|a| a.to_str().is_some_and(typed)) {
        return String::new();
    }
    // The variables the flag reads, as the clap definitions name them (`env = "BANK_…"`).
    let cli = bank::cli::Cli::command();
    let from = std::iter::once(&cli)
        .chain(cli.get_subcommands())
        .flat_map(|c| c.get_arguments())
        .filter(|a| {
            a.get_long()
                .is_some_and(|l| flag.strip_prefix("--") == Some(l))
        })
        .filter_map(|a| a.get_env())
        .find(|var| std::env::var_os(var).is_some_and(|v| v == value.as_str()));
    match from {
        Some(var) => format!(
            " (from {}, in the environment or .env)",
            var.to_string_lossy()
        ),
        None => String::new(),
    }
}

/// The error and its sources on one line, each said once.
fn error_line(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    bank::one_line(&bank::error::with_hints(line))
}

fn init_logging(verbosity: u8) {
    let level = match verbosity {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Warn)
        .filter_module("bank", level)
        .format_timestamp_millis()
        // env_logger's layout, shown as every stderr line is (`for_terminal`); a warning of
        // bank's own as its other warnings read (the workload's came out as "[WARN  bank::…]"
        // without -v; a helper playing a new user), a library's still under its name.
        .format(|buf, record| {
            use std::io::Write;
            let text = bank::for_terminal(&record.args().to_string());
            if record.level() == log::Level::Warn && record.target().starts_with("bank") {
                return writeln!(buf, "bank: warning: {text}");
            }
            writeln!(buf, "[{:<5} {}] {}", record.level(), record.target(), text)
        })
        .target(env_logger::Target::Stderr)
        .init();
}
