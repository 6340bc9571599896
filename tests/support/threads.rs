//! Threads the system refuses, as any user: a `pthread_create` shim loaded with `LD_PRELOAD`.
//!
//! A per-user thread limit (`ulimit -u`, `prlimit --nproc`) binds only users other than root,
//! and the tests may run as root; a container's pids limit needs a cgroup. The shim refuses
//! `pthread_create` with `EAGAIN`, as the kernel does at such a limit, at chosen calls: the
//! first `allow` calls go through, the next `refuse` are refused (all of them without
//! `refuse`), those after go through again. `std::thread::Builder::spawn` then returns that
//! error. Asked to, it writes one line on stderr per call (`thread-shim: 3 created`), in the
//! process's own order, so that a test can place the calls among `bank -v`'s lines and count
//! them instead of guessing (a thread added to `bank` later moves the count, not the test).
//!
//! Compiled from C with the system's `cc` on first use (once per test process, into cargo's
//! target directory under a name that is the source's hash). Only the tests use it: nothing of it
//! is in `bank`.

use std::path::PathBuf;
use std::sync::OnceLock;

use super::Bank;

/// Calls to `pthread_create` that go through before refusals begin.
pub const ALLOW: &str = "THREAD_SHIM_ALLOW";
/// How many calls are refused after those (unset: every one after them).
pub const REFUSE: &str = "THREAD_SHIM_REFUSE";
/// Set: one line on stderr per call.
pub const LOG: &str = "THREAD_SHIM_LOG";

const SOURCE: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

typedef int (*create_fn)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);

static unsigned long calls;

static unsigned long number(const char *name, unsigned long otherwise) {
    const char *v = getenv(name);
    if (v == NULL || *v == '\0') return otherwise;
    return strtoul(v, NULL, 10);
}

int pthread_create(pthread_t *thread, const pthread_attr_t *attr,
                   void *(*start)(void *), void *arg) {
    create_fn real = (create_fn)dlsym(RTLD_NEXT, "pthread_create");
    unsigned long n = __atomic_add_fetch(&calls, 1, __ATOMIC_SEQ_CST);
    unsigned long allow = number("THREAD_SHIM_ALLOW", (unsigned long)-1);
    unsigned long refuse = number("THREAD_SHIM_REFUSE", (unsigned long)-1);
    int refused = n > allow && n - allow <= refuse;
    if (getenv("THREAD_SHIM_LOG") != NULL) {
        char line[64];
        int len = snprintf(line, sizeof line, "thread-shim: %lu %s\n", n,
                           refused ? "refused" : "created");
        if (len > 0) {
            ssize_t ignored = write(2, line, (size_t)len);
            (void)ignored;
        }
    }
    if (refused) return EAGAIN;
    if (real == NULL) return ENOSYS;
    return real(thread, attr, start, arg);
}
"#;

/// The shim's path, compiled on first use. Without a C compiler the test fails, saying what to
/// install: tests never skip themselves.
pub fn shim() -> PathBuf {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(compile).clone()
}

fn compile() -> PathBuf {
    use std::hash::{Hash, Hasher};
    let mut hash = std::collections::hash_map::DefaultHasher::new();
    SOURCE.hash(&mut hash);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let so = dir.join(format!("thread-shim-{:016x}.so", hash.finish()));
    if so.exists() {
        return so;
    }
    // Built in a directory of its own and moved into place: test processes running at once
    // may compile it together.
    let work = tempfile::tempdir_in(&dir).expect("a temporary directory for the thread shim");
    let c = work.path().join("shim.c");
    std::fs::write(&c, SOURCE).expect("write the thread shim's source");
    let built = work.path().join("shim.so");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let output = std::process::Command::new(&cc)
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&built)
        .arg(&c)
        .arg("-ldl")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run the C compiler `{cc}` ({e}): the thread-limit tests build a \
                 pthread_create shim with it; install gcc (Debian: apt-get install gcc), or \
                 set CC to a C compiler"
            )
        });
    assert!(
        output.status.success(),
        "`{cc} -shared -fPIC` could not build the thread shim: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::rename(&built, &so).expect("move the thread shim into place");
    so
}

/// `bank` with the shim loaded: the first `allow` threads start, the next `refuse` (every one
/// after, with `None`) are refused with EAGAIN.
pub fn limited(bank: Bank, allow: usize, refuse: Option<usize>) -> Bank {
    let mut bank = bank;
    bank.cmd
        .env("LD_PRELOAD", shim())
        .env(ALLOW, allow.to_string())
        .env_remove(LOG);
    match refuse {
        Some(n) => bank.cmd.env(REFUSE, n.to_string()),
        None => bank.cmd.env_remove(REFUSE),
    };
    bank
}

/// `bank` with the shim loaded to count: every thread starts, and each call to
/// `pthread_create` writes a line on stderr (`calls`).
pub fn counted(bank: Bank) -> Bank {
    let mut bank = bank;
    bank.cmd
        .env("LD_PRELOAD", shim())
        .env(LOG, "1")
        .env_remove(ALLOW)
        .env_remove(REFUSE);
    bank
}

/// The number of the shim's last call logged in `stderr` before the first line that contains
/// `marker` (0 when none came before it). Panics when no line contains `marker`.
pub fn calls_before(stderr: &str, marker: &str) -> usize {
    let mut last = 0;
    for line in stderr.lines() {
        if line.contains(marker) {
            return last;
        }
        if let Some(n) = call(line) {
            last = n;
        }
    }
    panic!("no line of stderr contains {marker:?}: {stderr}")
}

/// The calls the shim logged in `stderr`.
pub fn calls(stderr: &str) -> usize {
    stderr.lines().filter_map(call).max().unwrap_or(0)
}

fn call(line: &str) -> Option<usize> {
    let rest = line.strip_prefix("thread-shim: ")?;
    rest.split(' ').next()?.parse().ok()
}
