//! A file read twice (once to check it, once to apply it) must be the same file both times: a
//! digest per block of lines, taken on the first read and compared on the second.

use std::cell::Cell;
use std::collections::VecDeque;
use std::hash::{BuildHasher, DefaultHasher, Hash, Hasher, RandomState};
use std::rc::Rc;

use super::{Line, Malformed};

/// Lines per block of a `Fingerprint`: 16 bytes of memory per 64 lines, and a change is caught
/// at most 63 lines before the line that changed.
const BLOCK: usize = 64;

/// What the check of a file read, as a digest per block of lines: enough for the second reading
/// to apply only what the first one checked, without holding the file. Between the two the file
/// may be rewritten, appended to, or truncated.
#[derive(Debug, Default)]
pub struct Fingerprint {
    /// Each block's first line and digest.
    blocks: Vec<(u64, u64)>,
    open: Option<(u64, DefaultHasher, usize)>,
    /// SipHash keys drawn for this run (both readings use them): with the fixed keys of
    /// `DefaultHasher::new()` a change could be made to keep a block's digest.
    keys: RandomState,
}

fn digest_line(hasher: &mut DefaultHasher, l: &Line) {
    l.line.hash(hasher);
    l.transfer.hash(hasher);
}

impl Fingerprint {
    pub fn add(&mut self, l: &Line) {
        let (_, hasher, n) = self
            .open
            .get_or_insert_with(|| (l.line, self.keys.build_hasher(), 0));
        digest_line(hasher, l);
        *n += 1;
        if *n == BLOCK {
            self.close();
        }
    }

    fn close(&mut self) {
        if let Some((first, hasher, _)) = self.open.take() {
            self.blocks.push((first, hasher.finish()));
        }
    }

    /// The lines of a second reading, each given only once the whole block it is in was read
    /// and matches the check's; the first block that does not ends them, and its first line (as
    /// the check numbered it; or the first line past the checked ones) is then in `changed`.
    pub fn verify<I>(mut self, lines: I) -> (Unchanged<I>, Rc<Cell<Option<u64>>>)
    where
        I: Iterator<Item = Result<Line, Malformed>>,
    {
        self.close();
        let changed = Rc::new(Cell::new(None));
        let verified = Unchanged {
            lines,
            blocks: self.blocks.into_iter(),
            keys: self.keys,
            ready: VecDeque::new(),
            changed: Rc::clone(&changed),
            done: false,
        };
        (verified, changed)
    }
}

/// See `Fingerprint::verify`.
pub struct Unchanged<I> {
    lines: I,
    blocks: std::vec::IntoIter<(u64, u64)>,
    keys: RandomState,
    ready: VecDeque<Line>,
    changed: Rc<Cell<Option<u64>>>,
    done: bool,
}

impl<I: Iterator<Item = Result<Line, Malformed>>> Unchanged<I> {
    fn stop(&mut self, line: u64) {
        self.changed.set(Some(line));
        self.done = true;
    }
}

impl<I: Iterator<Item = Result<Line, Malformed>>> Iterator for Unchanged<I> {
    type Item = Line;

    fn next(&mut self) -> Option<Line> {
        if self.ready.is_empty() && !self.done {
            match self.blocks.next() {
                None => {
                    // Every checked line came back; anything after them was never checked.
                    self.done = true;
                    if let Some(extra) = self.lines.next() {
                        self.stop(match extra {
                            Ok(l) => l.line,
                            Err(m) => m.line,
                        });
                    }
                }
                Some((first, digest)) => {
                    let mut hasher = self.keys.build_hasher();
                    for item in self.lines.by_ref().take(BLOCK) {
                        match item {
                            Ok(l) => {
                                digest_line(&mut hasher, &l);
                                self.ready.push_back(l);
                            }
                            // Checked as well-formed, so it changed.
                            Err(_) => {
                                self.ready.clear();
                                break;
                            }
                        }
                    }
                    let whole = self.ready.len() == BLOCK || self.blocks.len() == 0;
                    if self.ready.is_empty() || !whole || hasher.finish() != digest {
                        self.ready.clear();
                        self.stop(first);
                    }
                }
            }
        }
        self.ready.pop_front()
    }
}
