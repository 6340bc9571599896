//! Reading a file of transfers: CSV with a header (`id,from,to,amount`, in any order) or JSON
//! Lines (`{"id","from","to","amount"}`), one transfer per line, each checked as it is read.
//!
//! Every transfer needs its id: the id is what makes a rerun of the same file apply each transfer
//! once, so a file without ids is refused rather than given random ones.

use std::io::{BufRead, Read};
use std::path::Path;

use thiserror::Error;
use uuid::Uuid;

use crate::models::NewTransfer;
use crate::text::shown;

mod csv;
mod fingerprint;
mod jsonl;

use csv::CsvLines;
pub use fingerprint::{Fingerprint, Unchanged};
use jsonl::JsonLines;

/// How a transfer file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Comma-separated values with a header line naming the columns id, from, to, amount
    Csv,
    /// One JSON object per line: {"id": "...", "from": "...", "to": "...", "amount": 100}
    Jsonl,
}

impl Format {
    /// The format a file's name says (`.csv`, `.jsonl`, `.ndjson`, `.json`), if any.
    pub fn of_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(Format::Csv),
            "jsonl" | "ndjson" | "json" => Some(Format::Jsonl),
            _ => None,
        }
    }

    /// The format of input whose name says nothing (standard input): JSON Lines when its first
    /// non-blank byte opens an object, CSV otherwise.
    pub fn sniff(first_bytes: &[u8]) -> Format {
        let text = first_bytes
            .strip_prefix(BOM.as_bytes())
            .unwrap_or(first_bytes);
        match text.iter().find(|b| !b.is_ascii_whitespace()) {
            // An array is not JSON Lines either, but is refused as JSON, which says why.
            Some(b'{' | b'[') => Format::Jsonl,
            _ => Format::Csv,
        }
    }
}

/// The columns a file of transfers has, in CSV's header or as JSON keys.
const COLUMNS: [&str; 4] = ["id", "from", "to", "amount"];

/// The byte order mark that some Windows tools open UTF-8 text with: not part of the text.
const BOM: &str = "\u{feff}";

/// One transfer of the file, with the line it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line {
    /// 1-based line number in the file (blank lines and a CSV header count).
    pub line: u64,
    pub transfer: NewTransfer,
}

/// A line that is not a valid transfer, or a file that cannot be read.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("line {line}: {reason}")]
pub struct Malformed {
    pub line: u64,
    pub reason: String,
}

fn malformed(line: u64, reason: impl Into<String>) -> Malformed {
    Malformed {
        line,
        reason: reason.into(),
    }
}

/// The transfers of `input`, in file order; a malformed line is an `Err` and reading goes on.
pub fn read<'a, R: BufRead + 'a>(
    mut input: R,
    format: Format,
) -> Box<dyn Iterator<Item = Result<Line, Malformed>> + 'a> {
    // UTF-16 (Windows' "Unicode"), by its byte order mark: named, where "not UTF-8 text" left
    // the user guessing.
    if input
        .fill_buf()
        .is_ok_and(|b| b.starts_with(b"\xff\xfe") || b.starts_with(b"\xfe\xff"))
    {
        return Box::new(std::iter::once(Err(malformed(
            1,
            "UTF-16 text, not UTF-8: save the file as UTF-8",
        ))));
    }
    let input = LineLimit {
        inner: input,
        line: 1,
        length: 0,
        after_cr: false,
    };
    match format {
        Format::Csv => Box::new(CsvLines::new(input)),
        Format::Jsonl => Box::new(JsonLines {
            input: std::io::BufReader::new(input),
            line: 0,
            after_cr: false,
            done: false,
        }),
    }
}

/// The longest line, or CSV record, read: a transfer takes about 150 bytes. Both readers hold a
/// whole line (the csv reader a whole record), so without a bound a file with no newlines (a JSON
/// array on one line, say) was held whole: 235 MB of memory for a 231 MB array, before it was
/// refused; and a quoted CSV field over many lines as well: 88 MB for a 30 MB field.
const MAX_LINE: usize = 1 << 20;

/// A reader that fails, with `TooLong`, once a line outgrows `MAX_LINE`. A line ends at LF, CRLF
/// or CR alone, as for both readers: counting LF alone, a file of CR-ended lines was one line,
/// refused once past 1 MiB.
struct LineLimit<R> {
    inner: R,
    /// The line being read, 1-based.
    line: u64,
    /// Its bytes so far, its line end left out.
    length: usize,
    /// The byte before was a CR: an LF now is the second half of CRLF, not a line of its own.
    after_cr: bool,
}

#[derive(Debug, Error)]
enum TooLong {
    #[error(
        "longer than 1 MiB, where a transfer takes about 150 bytes: JSON Lines has one object \
         per line (not a JSON array), and CSV one transfer per line"
    )]
    Line { line: u64 },
    #[error(
        "a quote opens a field here that runs past 1 MiB, where a transfer takes about 150 \
         bytes: if the quote is never closed, every line after it is part of that field"
    )]
    Quoted { line: u64 },
    #[error(
        "a transfer over several lines (a quoted field holds line ends) runs past 1 MiB, where \
         one takes about 150 bytes"
    )]
    Record { line: u64 },
}

impl TooLong {
    fn line(&self) -> u64 {
        match self {
            TooLong::Line { line } | TooLong::Quoted { line } | TooLong::Record { line } => *line,
        }
    }

    fn into_io(self) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, self)
    }
}

impl<R: Read> LineLimit<R> {
    fn check(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        for &b in bytes {
            match b {
                b'\n' if self.after_cr => {}
                b'\n' | b'\r' => {
                    self.line += 1;
                    self.length = 0;
                }
                _ => {
                    self.length += 1;
                    if self.length > MAX_LINE {
                        let line = self.line;
                        return Err(TooLong::Line { line }.into_io());
                    }
                }
            }
            self.after_cr = b == b'\r';
        }
        Ok(())
    }
}

impl<R: Read> Read for LineLimit<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.check(&buf[..n])?;
        Ok(n)
    }
}

/// The line and reason of a read that failed.
fn read_error(line: u64, e: &std::io::Error) -> Malformed {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<TooLong>())
    {
        Some(too_long) => malformed(too_long.line(), too_long.to_string()),
        None => malformed(line, format!("cannot read: {e}")),
    }
}

/// Checks one transfer's fields, as text or as JSON values.
fn transfer(
    line: u64,
    id: Option<&str>,
    from: Option<&str>,
    to: Option<&str>,
    amount: Result<i64, String>,
) -> Result<Line, Malformed> {
    let uuid = |name: &str, value: Option<&str>| -> Result<Uuid, Malformed> {
        let value = value.map(str::trim).unwrap_or_default();
        if value.is_empty() {
            return Err(malformed(line, format!("no {name}")));
        }
        Uuid::parse_str(value)
            .map_err(|_| malformed(line, format!("{name} '{}' is not a UUID", shown(value))))
    };
    let id = match id.map(str::trim) {
        None | Some("") => {
            return Err(malformed(
                line,
                "no id: every transfer needs its own id (a UUID), which is what makes a rerun \
                 of the file apply each transfer once",
            ))
        }
        Some(_) => uuid("id", id)?,
    };
    let from_id = uuid("from", from)?;
    let to_id = uuid("to", to)?;
    let amount = amount.map_err(|reason| malformed(line, reason))?;
    if amount <= 0 {
        return Err(malformed(
            line,
            format!("amount must be positive, got {amount}"),
        ));
    }
    if from_id == to_id {
        return Err(malformed(
            line,
            format!("from and to are the same account ({from_id})"),
        ));
    }
    Ok(Line {
        line,
        transfer: NewTransfer {
            id,
            from_id,
            to_id,
            amount,
        },
    })
}

fn amount_text(value: Option<&str>) -> Result<i64, String> {
    let value = value.map(str::trim).unwrap_or_default();
    if value.is_empty() {
        return Err("no amount".into());
    }
    // One sign at most: `+-5` is no number (it was read as -5).
    let (plus, digits) = match value.strip_prefix('+') {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let digits_only = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if digits_only(digits) || (!plus && digits.strip_prefix('-').is_some_and(digits_only)) {
        digits
            .parse::<i64>()
            .map_err(|_| match digits.starts_with('-') {
                true => format!("amount must be positive, got {}", shown(value)),
                false => format!(
                    "amount {} is out of range (at most {})",
                    shown(value),
                    i64::MAX
                ),
            })
    } else {
        Err(format!("amount '{}' is not a whole number", shown(value)))
    }
}

#[cfg(test)]
mod tests;
