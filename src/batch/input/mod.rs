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

/// Names a message shows of what a line holds (a CSV header's, a JSON object's keys):
/// `'a', 'b' and 2 more`, the first `NAMES_SHOWN` quoted, of `count` in all; `None` for none.
fn names_shown<'a>(first: impl IntoIterator<Item = &'a str>, count: usize) -> Option<String> {
    let mut names: Vec<String> = first
        .into_iter()
        .take(NAMES_SHOWN)
        // A quote inside a name escaped: `'a', 'b'` was also what the one name `a', 'b` gave.
        // A quote inside a name escaped: `'a', 'b'` was also what the one name `a', 'b` gave.
        .map(|n| format!("'{}'", shown(n).replace('\'', "\\'")))
        .collect();
    if count > names.len() {
        names.push(format!("{} more", count - names.len()));
    }
    let (last, rest) = names.split_last()?;
    Some(match rest {
        [] => last.clone(),
        _ => format!("{} and {last}", rest.join(", ")),
    })
}

/// Names `names_shown` lists before "N more".
const NAMES_SHOWN: usize = 6;

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
mod tests {
    use super::*;

    const A: &str = "00000000-0000-0000-0000-00000000000a";
    const B: &str = "00000000-0000-0000-0000-00000000000b";
    const X: &str = "00000000-0000-0000-0000-000000000001";

    #[test]
    fn a_quote_inside_a_name_shown_is_escaped() {
        assert_eq!(names_shown(["a', 'b"], 1).as_deref(), Some("'a\\', \\'b'"));
        assert_eq!(names_shown(["a", "b"], 2).as_deref(), Some("'a' and 'b'"));
    }

    fn all(text: &str, format: Format) -> Vec<Result<Line, Malformed>> {
        read(text.as_bytes(), format).collect()
    }

    fn reason(r: &Result<Line, Malformed>) -> (u64, String) {
        match r {
            Err(m) => (m.line, m.reason.clone()),
            Ok(l) => panic!("line {} parsed", l.line),
        }
    }

    #[test]
    fn csv_columns_come_in_any_order_and_lines_count_from_the_header() {
        let text = format!("amount,to,memo,id,from\n100,{B},rent,{X},{A}\n\n7,{B},x,{X},{B}\n");
        let got = all(&text, Format::Csv);
        assert_eq!(got.len(), 2);
        let first = got[0].as_ref().expect("line 2 parses");
        assert_eq!(first.line, 2);
        assert_eq!(first.transfer.amount, 100);
        assert_eq!(first.transfer.id.to_string(), X);
        assert_eq!(first.transfer.from_id.to_string(), A);
        assert_eq!(
            reason(&got[1]),
            (4, format!("from and to are the same account ({B})"))
        );
    }

    #[test]
    fn line_numbers_count_blank_lines_and_crlf_endings() {
        let text = format!("id,from,to,amount\r\n\r\n{X},{A},{B},5\r\n   \r\n{X},{A},{A},5\r\n");
        let got = all(&text, Format::Csv);
        assert_eq!(got[0].as_ref().map(|l| l.line), Ok(3));
        assert_eq!(reason(&got[1]).0, 5);
    }

    #[test]
    fn json_lines_read_as_csv_are_named_as_such() {
        let text = format!("{{\"id\":\"{A}\",\"from\":\"{A}\",\"to\":\"{B}\",\"amount\":5}}\n");
        let got = all(&text, Format::Csv);
        let (line, why) = reason(&got[0]);
        assert_eq!(line, 1);
        assert!(why.contains("--format jsonl"), "{why}");
    }

    /// A byte order mark at a later line's start (two Windows files joined with `cat`) got "not
    /// a JSON object" with nothing shown: the user sees an object (found by a helper playing a
    /// new user). The line's start is shown, escaped.
    #[test]
    fn a_json_line_opening_with_an_invisible_character_is_shown() {
        let line = format!("{{\"id\":\"{X}\",\"from\":\"{A}\",\"to\":\"{B}\",\"amount\":5}}");
        let got = all(&format!("{line}\n\u{feff}{line}\n"), Format::Jsonl);
        let (n, why) = reason(&got[1]);
        assert_eq!(n, 2);
        assert!(why.contains("'\\u{feff}{\"id\""), "{why}");
    }

    /// UTF-16 files are named as such; CSV given as JSON Lines is named as CSV (found by a
    /// helper playing a new user).
    #[test]
    fn utf16_and_csv_as_json_lines_are_named() {
        for format in [Format::Csv, Format::Jsonl] {
            let got: Vec<_> = read(&b"\xff\xfei\x00d\x00\n\x00"[..], format).collect();
            assert_eq!(
                reason(&got[0]),
                (1, "UTF-16 text, not UTF-8: save the file as UTF-8".into())
            );
        }
        let (_, why) = reason(
            &all(
                &format!("id,from,to,amount\n{X},{A},{B},5\n"),
                Format::Jsonl,
            )[0],
        );
        assert!(why.contains("looks like CSV: pass --format csv"), "{why}");
    }

    /// A header opening with two byte order marks (one stripped as the file's, one left in
    /// the first name) got "no id column" with nothing shown: the user sees an `id` column.
    #[test]
    fn a_header_name_holding_an_invisible_character_is_shown() {
        let got = all(
            &format!("\u{feff}\u{feff}id,from,to\u{200b},amount\n{X},{A},{B},5\n"),
            Format::Csv,
        );
        let (line, why) = reason(&got[0]);
        assert_eq!(line, 1);
        assert!(
            why.contains("'\\u{feff}id'") && why.contains("'to\\u{200b}'"),
            "{why}"
        );
    }

    #[test]
    fn a_file_without_ids_is_refused_and_says_why() {
        let got = all(&format!("from,to,amount\n{A},{B},5\n"), Format::Csv);
        let (line, why) = reason(&got[0]);
        assert_eq!(line, 1);
        assert!(
            why.contains("no id column") && why.contains("rerun"),
            "{why}"
        );
        assert_eq!(got.len(), 1, "nothing is read past a bad header");

        let got = all(
            &format!("{{\"from\":\"{A}\",\"to\":\"{B}\",\"amount\":5}}\n"),
            Format::Jsonl,
        );
        assert!(reason(&got[0]).1.starts_with("no id"), "{got:?}");
    }

    #[test]
    fn bad_fields_name_their_line_and_reason() {
        let text = format!(
            "id,from,to,amount\n{X},{A},{B},0\n{X},{A},{B},1.5\n{X},nope,{B},3\n{X},{A},{B},-2\n{X},{A},{B}\n{X},{A},{B},99999999999999999999\n{X}\n"
        );
        let got: Vec<_> = all(&text, Format::Csv).iter().map(reason).collect();
        assert_eq!(
            got,
            vec![
                (2, "amount must be positive, got 0".to_string()),
                (3, "amount '1.5' is not a whole number".to_string()),
                (4, "from 'nope' is not a UUID".to_string()),
                (5, "amount must be positive, got -2".to_string()),
                (6, "3 fields where the header has 4".to_string()),
                (
                    7,
                    format!(
                        "amount 99999999999999999999 is out of range (at most {})",
                        i64::MAX
                    )
                ),
                (8, "1 field where the header has 4".to_string()),
            ]
        );
    }

    #[test]
    fn json_lines_take_numbers_or_digit_strings_and_skip_blank_lines() {
        let text = format!(
            "{{\"id\":\"{X}\",\"from\":\"{A}\",\"to\":\"{B}\",\"amount\":12}}\n\n\
             {{\"id\":\"{X}\",\"from\":\"{A}\",\"to\":\"{B}\",\"amount\":\"13\"}}\n\
             {{\"id\":\"{X}\",\"from\":\"{A}\",\"to\":\"{B}\",\"amount\":1.5}}\n\
             [1,2]\n"
        );
        let got = all(&text, Format::Jsonl);
        assert_eq!(
            got[0].as_ref().map(|l| (l.line, l.transfer.amount)),
            Ok((1, 12))
        );
        assert_eq!(
            got[1].as_ref().map(|l| (l.line, l.transfer.amount)),
            Ok((3, 13))
        );
        assert_eq!(
            reason(&got[2]),
            (4, "amount 1.5 is not a whole number".into())
        );
        assert_eq!(reason(&got[3]).0, 5);
    }

    #[test]
    fn a_quote_that_never_closes_is_refused_where_it_opens() {
        // The rest of the file became one memo: two lines were never applied nor reported, and
        // the run said success.
        let y = "00000000-0000-0000-0000-000000000002";
        let text = format!(
            "id,from,to,amount,memo\n{X},{A},{B},1,pay\n{X},{A},{B},2,\"bonus\n{y},{A},{B},3,pay\n{y},{A},{B},4,pay\n"
        );
        let got = all(&text, Format::Csv);
        assert!(got[0].is_ok(), "{got:?}");
        let (line, why) = reason(&got[1]);
        assert_eq!(line, 3, "{why}");
        assert!(why.contains("never closed"), "{why}");
        assert_eq!(got.len(), 2, "{got:?}");
        let got = all(
            &format!("id,from,\"to,amount\n{X},{A},{B},1\n"),
            Format::Csv,
        );
        let (line, why) = reason(&got[0]);
        assert!(line == 1 && why.contains("never closed"), "{got:?}");
        // A quoted field may hold line ends when its quote closes.
        let text = format!(
            "id,from,to,amount,memo\n{X},{A},{B},2,\"two\nlines\"\n{y},{A},{B},3,\"a \"\"b\"\"\"\n"
        );
        let got = all(&text, Format::Csv);
        assert_eq!(
            got.iter()
                .map(|l| l.as_ref().map(|l| l.line))
                .collect::<Vec<_>>(),
            [Ok(2), Ok(4)]
        );
    }

    #[test]
    fn lines_ended_by_a_carriage_return_alone_count_as_lines() {
        // Classic Mac OS line ends (Excel's "CSV (Macintosh)"): every line was "line 1".
        let text = format!("id,from,to,amount\r{X},{A},{B},5\r\r{X},{A},{A},5\r{X},{A},{B},x\r");
        let got = all(&text, Format::Csv);
        assert_eq!(got[0].as_ref().map(|l| l.line), Ok(2));
        assert_eq!(reason(&got[1]).0, 4);
        assert_eq!(reason(&got[2]).0, 5);
    }

    #[test]
    fn a_csv_file_without_a_header_or_with_an_empty_row_is_refused() {
        for text in ["", "\n\n\n", "\r\n"] {
            let (line, why) = reason(&all(text, Format::Csv)[0]);
            assert_eq!(line, 1, "{text:?}");
            assert!(why.contains("no header"), "{text:?}: {why}");
        }
        let text = format!("id,from,to,amount\n{X},{A},{B},5\n,,,\n");
        let got = all(&text, Format::Csv);
        assert!(got[0].is_ok());
        assert_eq!(reason(&got[1]).0, 3);
        assert!(reason(&got[1]).1.starts_with("no id"), "{got:?}");
        // JSON Lines has no header: an empty file is no transfers.
        assert!(all("", Format::Jsonl).is_empty());
    }

    #[test]
    fn a_value_quoted_in_a_reason_is_short_and_cannot_drive_the_terminal() {
        // A file's bytes went to stderr as they were: escape sequences reached the terminal,
        // and a 900 KB amount made a 900 KB line.
        let long = "9".repeat(100_000);
        let text = format!(
            "id,from,to,amount\n{X},{A},{B},\u{1b}]0;pwned\u{7}\n{X},{A},{B},{long}\n{X},\u{1b}[31m,{B},1\n"
        );
        for r in all(&text, Format::Csv) {
            let (_, why) = reason(&r);
            assert!(!why.chars().any(char::is_control), "{why:?}");
            assert!(why.len() < 200, "{} bytes", why.len());
        }
        let text =
            format!("{{\"id\":\"{X}\",\"from\":\"{A}\",\"to\":\"{B}\",\"amount\":[\"{long}\"]}}\n");
        let (_, why) = reason(&all(&text, Format::Jsonl)[0]);
        assert!(why.len() < 200, "{} bytes", why.len());
    }

    #[test]
    fn json_amounts_past_the_range_or_zero_say_so() {
        let line = |amount: &str| {
            format!("{{\"id\":\"{X}\",\"from\":\"{A}\",\"to\":\"{B}\",\"amount\":{amount}}}\n")
        };
        let why = |amount: &str| reason(&all(&line(amount), Format::Jsonl)[0]).1;
        assert!(
            why("18446744073709551616").contains("out of range"),
            "{}",
            why("18446744073709551616")
        );
        assert!(why("1e30").contains("out of range"));
        assert!(why("-0").contains("must be positive"), "{}", why("-0"));
        assert_eq!(why("0.0"), "amount must be positive, got 0");
        // Zero to serde_json, not as written.
        assert_eq!(why("-1e-400"), "amount must be positive, got -1e-400");
        assert_eq!(why("1e-400"), "amount 1e-400 is not a whole number");
        assert_eq!(why("0e5"), "amount must be positive, got 0");
        assert!(why("5e2").contains("decimal"));
    }

    #[test]
    fn an_amount_below_the_range_is_refused_for_being_negative() {
        // It was "written as a decimal number" (JSON) or "out of range (at most …)" (CSV).
        let amount = "-9223372036854775809";
        let json =
            format!("{{\"id\":\"{X}\",\"from\":\"{A}\",\"to\":\"{B}\",\"amount\":{amount}}}\n");
        let csv = format!("id,from,to,amount\n{X},{A},{B},{amount}\n");
        for (text, format) in [(json, Format::Jsonl), (csv, Format::Csv)] {
            let why = reason(&all(&text, format)[0]).1;
            assert!(why.contains("must be positive"), "{format:?}: {why}");
        }
    }

    #[test]
    fn a_sign_after_a_plus_is_not_a_whole_number() {
        // `+-5` was read as -5: "amount must be positive, got -5", a value the file does not
        // hold (found by a helper playing a new user); `--amount +-5` says it is no number.
        let csv = format!("id,from,to,amount\n{X},{A},{B},+-5\n");
        let json =
            format!("{{\"id\":\"{X}\",\"from\":\"{A}\",\"to\":\"{B}\",\"amount\":\"+-5\"}}\n");
        for (text, format) in [(csv, Format::Csv), (json, Format::Jsonl)] {
            let why = reason(&all(&text, format)[0]).1;
            assert_eq!(why, "amount '+-5' is not a whole number", "{format:?}");
        }
        assert_eq!(amount_text(Some("+5")), Ok(5));
    }

    #[test]
    fn a_line_of_spaces_before_the_header_is_blank() {
        // It was taken for the header: "line 2: no id column" about a good header.
        for lead in [" \n", "\t\n", " \t\r\n", "\n  \n\n"] {
            let got = all(
                &format!("{lead}id,from,to,amount\n{X},{A},{B},5\n"),
                Format::Csv,
            );
            assert_eq!(got.len(), 1, "{lead:?}: {got:?}");
            let line = got[0].as_ref().map(|l| l.line);
            assert_eq!(
                line.ok(),
                Some(lead.matches('\n').count() as u64 + 2),
                "{lead:?}: {got:?}"
            );
        }
        // Nothing but such lines: no header.
        let got = all(" \n\t\n", Format::Csv);
        assert!(reason(&got[0]).1.contains("no header"), "{got:?}");
    }

    #[test]
    fn a_json_line_s_syntax_error_names_its_column_not_a_line_of_its_own() {
        // serde counts lines inside the text it is given: "line 3: … at line 2 column 0".
        let text = format!("\n\n{{\"id\":\"{X}\",\"from\":\"{A}\"\n");
        let (line, why) = reason(&all(&text, Format::Jsonl)[0]);
        assert_eq!(line, 3);
        assert!(!why.contains("at line"), "{why}");
        // The column where the object is cut short, its line's length (it showed serde's line
        // number, 1, as the column: a helper's mutant).
        let cut = format!("{{\"id\":\"{X}\",\"from\":\"{A}\"");
        assert!(why.ends_with(&format!("(column {})", cut.len())), "{why}");
    }

    #[test]
    fn json_lines_ended_by_a_carriage_return_alone_count_as_lines() {
        // As in CSV: the whole file was one line, refused ("line 1"), however many it held.
        let line = format!("{{\"id\":\"{X}\",\"from\":\"{A}\",\"to\":\"{B}\",\"amount\":5}}");
        let bad = line.replace('5', "x");
        for end in ["\r", "\n", "\r\n"] {
            let got = all(&format!("{line}{end}{end}{bad}{end}{line}"), Format::Jsonl);
            assert_eq!(got.len(), 3, "{end:?}");
            assert_eq!(got[0].as_ref().map(|l| l.line), Ok(1), "{end:?}");
            assert_eq!(reason(&got[1]).0, 3, "{end:?}");
            assert_eq!(got[2].as_ref().map(|l| l.line), Ok(4), "{end:?}");
        }
    }

    #[test]
    fn a_header_naming_a_column_twice_is_refused() {
        // Which of the two amounts was meant cannot be known; JSON refuses a repeated key too.
        let got = all(
            &format!("id,from,to,amount,Amount\n{X},{A},{B},5,6\n"),
            Format::Csv,
        );
        assert_eq!(got.len(), 1, "nothing is read past a bad header");
        let (line, why) = reason(&got[0]);
        assert_eq!(line, 1);
        assert!(why.contains("amount") && why.contains("twice"), "{why}");
    }

    #[test]
    fn a_bad_header_after_blank_lines_is_named_by_its_own_line() {
        // The csv crate skips blank lines before the header: "line 1" pointed at a blank line.
        for (text, line) in [
            ("\n\nid,from,to\n", 3),
            ("\n  \nid,from,to,amount,ID\n", 3),
            ("\r\nid;from;to;amount\n", 2),
        ] {
            let got = all(text, Format::Csv);
            assert_eq!(got.len(), 1, "{text:?}");
            assert_eq!(reason(&got[0]).0, line, "{text:?}");
        }
        // And the lines after it still count from the file's first line.
        let got = all(
            &format!("\n\nid,from,to,amount\n{X},{A},{A},5\n"),
            Format::Csv,
        );
        assert_eq!(reason(&got[0]).0, 4);
    }

    #[test]
    fn a_header_separated_by_something_else_than_commas_says_so() {
        for sep in [";", "\t", "|"] {
            let header = COLUMNS.join(sep);
            let got = all(
                &format!("{header}\n{X}{sep}{A}{sep}{B}{sep}5\n"),
                Format::Csv,
            );
            let (line, why) = reason(&got[0]);
            assert_eq!(line, 1);
            assert!(why.contains("commas"), "{sep:?}: {why}");
        }
    }

    #[test]
    fn a_json_line_must_be_an_object_and_its_amount_digits() {
        // serde would read a struct from an array by position: ["id","from","to",5].
        let text = format!(
            "[\"{X}\",\"{A}\",\"{B}\",5]\n\
             {{\"id\":\"{X}\",\"from\":\"{A}\",\"to\":\"{B}\",\"amount\":5e2}}\n\
             {{\"id\":\"{X}\",\"from\":\"{A}\",\"to\":\"{B}\",\"amount\":7.0}}\n"
        );
        let got: Vec<_> = all(&text, Format::Jsonl).iter().map(reason).collect();
        assert_eq!(got.len(), 3);
        assert!(got[0].1.contains("a JSON array"), "{got:?}");
        for ((_, why), written) in got[1..].iter().zip(["5e2", "7.0"]) {
            // 5e2 and 7.0 are whole numbers, written in a way an amount of money is not.
            assert!(
                !why.contains("not a whole number") && why.contains("digits"),
                "{why}"
            );
            // Quoted as the file has it (serde_json would print 5e2 as 500.0).
            assert!(why.contains(&format!("amount {written} ")), "{why}");
        }
        for (amount, quoted) in [("1.50", "1.50"), ("1E+30", "1E+30"), ("-0.0", "-0.0")] {
            let line =
                format!("{{\"id\":\"{X}\",\"from\":\"{A}\",\"to\":\"{B}\",\"amount\":{amount}}}\n");
            let got = all(&line, Format::Jsonl);
            let (_, why) = reason(&got[0]);
            assert!(
                why.contains(quoted) || why.contains("positive"),
                "{amount}: {why}"
            );
        }
    }

    #[test]
    fn a_line_longer_than_a_mebibyte_is_refused_without_being_held() {
        let object = format!("{{\"id\":\"{X}\",\"from\":\"{A}\",\"to\":\"{B}\",\"amount\":5}}");
        let array = format!("[{}]\n", vec![object.as_str(); 20_000].join(","));
        let field = "x".repeat(3 << 20);
        for (text, format, line) in [
            (format!("{object}\n\n{array}"), Format::Jsonl, 3),
            (
                format!("id,from,to,amount\n{X},{A},{B},{field}\n"),
                Format::Csv,
                2,
            ),
            (format!("{field}\n"), Format::Csv, 1),
        ] {
            let got = all(&text, format);
            let refused = got.iter().find(|r| r.is_err()).map(reason);
            let (at, why) = refused.unwrap_or_default();
            assert_eq!(at, line, "{format:?}: {why}");
            assert!(why.contains("longer than 1 MiB"), "{format:?}: {why}");
        }
    }

    #[test]
    fn the_format_follows_the_name_or_the_first_byte() {
        assert_eq!(Format::of_path(Path::new("a.CSV")), Some(Format::Csv));
        assert_eq!(Format::of_path(Path::new("a.ndjson")), Some(Format::Jsonl));
        assert_eq!(Format::of_path(Path::new("a.txt")), None);
        assert_eq!(Format::sniff(b"  \n{\"id\""), Format::Jsonl);
        assert_eq!(Format::sniff(b"id,from"), Format::Csv);
        assert_eq!(Format::sniff(b"[{\"id\""), Format::Jsonl);
        assert_eq!(Format::sniff(b"\xef\xbb\xbf{\"id\""), Format::Jsonl);
    }

    #[test]
    fn a_byte_order_mark_opening_the_file_is_not_part_of_it() {
        // Some Windows tools open UTF-8 text with one (csv strips it from the header itself).
        let body = format!("{{\"id\":\"{X}\",\"from\":\"{A}\",\"to\":\"{B}\",\"amount\":5}}\n");
        for format in [Format::Jsonl, Format::Csv] {
            let text = match format {
                Format::Jsonl => format!("\u{feff}{body}"),
                Format::Csv => format!("\u{feff}id,from,to,amount\n{X},{A},{B},5\n"),
            };
            let got = all(&text, format);
            assert_eq!(got.len(), 1, "{format:?}");
            let l = got[0].as_ref().expect("parsed");
            assert_eq!(
                (l.transfer.amount, l.transfer.id.to_string()),
                (5, X.to_string())
            );
        }
    }

    #[test]
    fn a_file_past_a_mebibyte_with_lines_ended_by_a_carriage_return_alone_is_read_line_by_line() {
        // Only \n ended a line for the 1 MiB bound: "line 1: longer than 1 MiB".
        let csv = numbered(10_000).replace('\n', "\r");
        assert!(csv.len() > MAX_LINE);
        let got: Vec<_> = all(&csv, Format::Csv)
            .into_iter()
            .map(|l| l.map(|l| l.line))
            .collect();
        assert_eq!(got, (2..10_002).map(Ok).collect::<Vec<_>>());
        let jsonl: String = (1..=10_000)
            .map(|k| {
                format!(
                    "{{\"id\":\"{}\",\"from\":\"{A}\",\"to\":\"{B}\",\"amount\":{k}}}\r",
                    Uuid::from_u128(k)
                )
            })
            .collect();
        assert!(jsonl.len() > MAX_LINE);
        let got: Vec<_> = all(&jsonl, Format::Jsonl)
            .into_iter()
            .map(|l| l.map(|l| l.line))
            .collect();
        assert_eq!(got, (1..10_001).map(Ok).collect::<Vec<_>>());
    }

    #[test]
    fn a_csv_record_over_many_lines_is_bounded_as_a_line_is() {
        // The bound counted lines: a quoted field of 30 MB over many lines was held whole, and an
        // unclosed quote took every line after it, blank ones included, before it was refused.
        let y = "00000000-0000-0000-0000-000000000002";
        let head = format!("id,from,to,amount,memo\n{X},{A},{B},1,pay\n");
        let many = "memo\n".repeat(300_000);
        for (text, line) in [
            (
                format!("{head}{y},{A},{B},2,\"{many}\"\n{y},{A},{B},3,x\n"),
                3,
            ),
            (
                format!("{head}\n\n{y},{A},{B},2,\"pay\n{}", "\n".repeat(3 << 20)),
                5,
            ),
            (format!("{head}{y},{A},{B},2,\"a\nb\",\"{many}\"\n"), 4),
            (format!("\"id\n{many}\",from,to,amount\n"), 1),
            // After a byte order mark (Excel's "CSV UTF-8"), which the csv crate strips: the
            // index took it for text, saw no quote open, and 60 MB took 299 MB (a reviewer's find).
            (format!("{BOM}\"id\n{many}\",from,to,amount\n"), 1),
        ] {
            let got = all(&text, Format::Csv);
            let refused = got.iter().find(|r| r.is_err()).map(reason);
            let (at, why) = refused.unwrap_or_default();
            assert_eq!(at, line, "{why}");
            assert!(why.contains("1 MiB") && why.contains("quote"), "{why}");
            assert!(got.len() <= 2, "nothing is read past it");
        }
        // Under the bound, a quoted field holds as many line ends as it likes.
        let text = format!(
            "{head}{y},{A},{B},2,\"{}\"\n{y},{A},{B},3,x\n",
            "\n".repeat(1000)
        );
        let got: Vec<_> = all(&text, Format::Csv)
            .into_iter()
            .map(|l| l.map(|l| l.line))
            .collect();
        assert_eq!(got, [Ok(2), Ok(3), Ok(1004)]);
    }

    #[test]
    fn blank_lines_count_toward_no_bound() {
        for blank in ["\n", "\r", "\r\n"] {
            // Past the bound either side of the header, so that a bound counting them would refuse it.
            let lines = MAX_LINE / blank.len() + 1000;
            let text = format!(
                "{}id,from,to,amount\n{}{X},{A},{B},5",
                blank.repeat(lines),
                blank.repeat(lines)
            );
            let got = all(&text, Format::Csv);
            assert_eq!(got.len(), 1, "{blank:?}");
            assert_eq!(
                got[0].as_ref().map(|l| l.line),
                Ok(2 * lines as u64 + 2),
                "{blank:?}"
            );
            let text = format!(
                "{}{{\"id\":\"{X}\",\"from\":\"{A}\",\"to\":\"{B}\",\"amount\":5}}",
                blank.repeat(lines)
            );
            let got = all(&text, Format::Jsonl);
            assert_eq!(got.len(), 1, "{blank:?}");
            assert_eq!(
                got[0].as_ref().map(|l| l.line),
                Ok(lines as u64 + 1),
                "{blank:?}"
            );
        }
    }

    #[test]
    fn a_byte_order_mark_inside_the_file_is_shown_in_the_reason() {
        // Two files joined with `cat`: the second one's mark went to the terminal as nothing,
        // "id 'e6dc…' is not a UUID" about what looked like a UUID.
        let text = format!("id,from,to,amount\n{X},{A},{B},5\n\u{feff}{X},{A},{B},5\n");
        let got = all(&text, Format::Csv);
        let (line, why) = reason(&got[1]);
        assert_eq!(line, 3);
        assert!(why.contains("'\\u{feff}0000"), "{why}");
        // Other characters that show as nothing, or reorder what follows, are shown too.
        // Every default-ignorable code point (Unicode's list of what renderers show as
        // nothing), and the line and paragraph separators that break a terminal's line: tag
        // characters, variation selectors, the Hangul fillers were shown as nothing.
        for c in [
            '\u{200b}',
            '\u{202e}',
            '\u{2066}',
            '\u{34f}',
            '\u{115f}',
            '\u{17b4}',
            '\u{180b}',
            '\u{2028}',
            '\u{2029}',
            '\u{3164}',
            '\u{fe00}',
            '\u{fe0f}',
            '\u{ffa0}',
            '\u{fff0}',
            '\u{1bca0}',
            '\u{1d173}',
            '\u{e0001}',
            '\u{e0041}',
            '\u{e0100}',
            '\u{e0fff}',
        ] {
            let escaped: String = c.escape_default().collect();
            assert_eq!(shown(&format!("a{c}b")), format!("a{escaped}b"));
        }
    }

    #[test]
    fn json_keys_are_matched_in_any_case_as_csv_headers_are() {
        // "ID" was an unknown key, ignored: "no id" about a line that has one.
        let text = format!("{{\"ID\":\"{X}\",\"From\":\"{A}\",\"TO\":\"{B}\",\"Amount\":5}}\n");
        let got = all(&text, Format::Jsonl);
        let l = got[0].as_ref().expect("parsed");
        assert_eq!(
            (l.transfer.id.to_string(), l.transfer.amount),
            (X.to_string(), 5)
        );
        // Two keys for one field: which was meant cannot be known, as for a CSV header.
        let text = format!(
            "{{\"id\":\"{X}\",\"Id\":\"{A}\",\"from\":\"{A}\",\"to\":\"{B}\",\"amount\":5}}\n"
        );
        let (_, why) = reason(&all(&text, Format::Jsonl)[0]);
        assert!(why.contains("id") && why.contains("twice"), "{why}");
        // Spaces around a key, as around a CSV header's names ("ID , From"): "amount " was an
        // unknown key, ignored, and the line had "no amount" (found by a helper playing a new
        // user).
        let text = format!("{{\" id\":\"{X}\",\"from \":\"{A}\",\"to\":\"{B}\",\" Amount \":5}}\n");
        let got = all(&text, Format::Jsonl);
        let l = got[0].as_ref().expect("parsed");
        assert_eq!(
            (l.transfer.id.to_string(), l.transfer.amount),
            (X.to_string(), 5)
        );
    }

    #[test]
    fn a_json_line_that_is_not_utf8_is_one_malformed_line() {
        // As in CSV; it ended the reading, and its reason was std's "stream did not contain …".
        let line = format!("{{\"id\":\"{X}\",\"from\":\"{A}\",\"to\":\"{B}\",\"amount\":5}}\n");
        let text = [line.as_bytes(), b"{\"id\":\"\xff\"}\n", line.as_bytes()].concat();
        let got: Vec<_> = read(&text[..], Format::Jsonl).collect();
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(reason(&got[1]), (2, "not UTF-8 text".to_string()));
        assert_eq!(got[2].as_ref().map(|l| l.line), Ok(3));
    }
    /// A CSV file of `n` transfers (lines 2..=n+1), line k moving k.
    fn numbered(n: usize) -> String {
        let mut s = String::from("id,from,to,amount\n");
        for k in 1..=n {
            s.push_str(&format!("{},{A},{B},{k}\n", Uuid::from_u128(k as u128)));
        }
        s
    }

    /// The lines a second reading of `second` gives after a check of `first`, and where it
    /// stopped.
    fn reread(first: &str, second: &str) -> (Vec<u64>, Option<u64>) {
        let mut fingerprint = Fingerprint::default();
        for l in read(first.as_bytes(), Format::Csv) {
            fingerprint.add(&l.expect("well-formed"));
        }
        let (lines, changed) = fingerprint.verify(read(second.as_bytes(), Format::Csv));
        let got = lines.map(|l| l.line).collect();
        (got, changed.get())
    }

    #[test]
    fn a_second_reading_gives_every_checked_line_and_nothing_else() {
        for n in [0, 1, 63, 64, 65, 200] {
            let (got, changed) = reread(&numbered(n), &numbered(n));
            assert_eq!(got, (2..n as u64 + 2).collect::<Vec<_>>(), "{n} lines");
            assert_eq!(changed, None, "{n} lines");
        }
        // Appended to: the checked lines, then a stop at the first line never checked.
        let (got, changed) = reread(&numbered(128), &numbered(129));
        assert_eq!((got.len(), changed), (128, Some(130)));
        let (got, changed) = reread(&numbered(100), &numbered(101));
        assert_eq!(
            (got.len(), changed),
            (64, Some(66)),
            "the open block holds the new line"
        );
        // Truncated: the last block is short.
        let (got, changed) = reread(&numbered(200), &numbered(150));
        assert_eq!((got.len(), changed), (128, Some(130)));
    }

    #[test]
    fn a_changed_line_stops_the_second_reading_at_its_block() {
        let first = numbered(200);
        // Line 150 (the 149th transfer, in the third block: lines 130..=193) moves 1 more.
        let second = first.replace(",149\n", ",150\n");
        assert_ne!(first, second);
        let (got, changed) = reread(&first, &second);
        assert_eq!(got, (2..130).collect::<Vec<_>>());
        assert_eq!(changed, Some(130));
        // A line that no longer parses, and a blank line added (it moves every line after it).
        let (got, changed) = reread(&first, &first.replace(",149\n", ",x\n"));
        assert_eq!((got.len(), changed), (128, Some(130)));
        let (got, changed) = reread(&first, &first.replacen("\n", "\n\n", 2));
        assert_eq!((got.len(), changed), (0, Some(2)));
    }

    /// The test above changes an amount; a change of the id, from or to alone is caught too (a
    /// digest that left any one of them out passed every test, found by a reviewer mutating it):
    /// the second reading must not apply a line the check never saw.
    #[test]
    fn a_line_with_any_one_field_changed_stops_the_second_reading() {
        let first = numbered(200);
        // Line 150, the 149th transfer (in the third block: lines 130..=193).
        let id = Uuid::from_u128(149).to_string();
        let line = format!("{id},{A},{B},149\n");
        assert!(first.contains(&line));
        let other = "00000000-0000-0000-0000-0000000000ff";
        for changed in [
            format!("{other},{A},{B},149\n"),
            format!("{id},{other},{B},149\n"),
            format!("{id},{A},{other},149\n"),
            format!("{id},{A},{B},150\n"),
        ] {
            let (got, stopped) = reread(&first, &first.replace(&line, &changed));
            assert_eq!(got, (2..130).collect::<Vec<_>>(), "{changed}");
            assert_eq!(stopped, Some(130), "{changed}");
        }
    }

    /// An amount written as a string is read as digits are, sign and all: "-5" is negative, not
    /// 5 (no test held a string's sign).
    #[test]
    fn a_json_amount_written_as_a_string_keeps_its_sign() {
        let line = |amount: &str| {
            format!("{{\"id\":\"{X}\",\"from\":\"{A}\",\"to\":\"{B}\",\"amount\":{amount}}}\n")
        };
        for (amount, reason_) in [
            ("\"-5\"", "amount must be positive, got -5"),
            ("\"0\"", "amount must be positive, got 0"),
            ("\"1.5\"", "amount '1.5' is not a whole number"),
        ] {
            let got = all(&line(amount), Format::Jsonl);
            assert_eq!(reason(&got[0]), (1, reason_.to_string()), "{amount}");
        }
        let got = all(&line("\"+7\""), Format::Jsonl);
        assert_eq!(got[0].as_ref().map(|l| l.transfer.amount), Ok(7));
    }

    /// A reader that fails on every read (a disk error that does not go away): one malformed
    /// line, then the end. Reading on after it, the check of the file counted "more malformed
    /// lines" for ever.
    #[test]
    fn a_read_that_keeps_failing_ends_the_lines() {
        struct Failing;
        impl std::io::Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("the disk is gone"))
            }
        }
        for format in [Format::Jsonl, Format::Csv] {
            let got: Vec<_> = read(std::io::BufReader::new(Failing), format)
                .take(5)
                .collect();
            assert_eq!(got.len(), 1, "{format:?}: {got:?}");
            let (line, why) = reason(&got[0]);
            assert_eq!(line, 1, "{format:?}");
            assert!(why.contains("the disk is gone"), "{format:?}: {why}");
        }
    }

    /// A CSV line that is not UTF-8 is one malformed line, and the lines after it are read on
    /// (counted in "and N more malformed lines"), as in JSON Lines.
    #[test]
    fn a_csv_line_that_is_not_utf8_is_one_malformed_line() {
        let text = [
            "id,from,to,amount\n".as_bytes(),
            format!("{X},{A},{B},5\n").as_bytes(),
            b"\xff,a,b,5\n",
            format!("{X},{A},{B},7\n").as_bytes(),
        ]
        .concat();
        let got: Vec<_> = read(&text[..], Format::Csv).collect();
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(
            reason(&got[1]),
            (3, "not UTF-8 text in the id column".to_string())
        );
        assert_eq!(got[2].as_ref().map(|l| l.line), Ok(4));
    }

    /// A JSON Lines object missing one of bank's keys shows the keys it has, as a CSV header
    /// missing a column shows its names; a key given as null is no missing key.
    #[test]
    fn a_json_object_missing_a_key_shows_the_keys_it_has() {
        let text = format!(
            "{{\"id\":\"{X}\",\"source\":\"{A}\",\"to\":\"{B}\",\"amount\":5}}\n\
             {{\"transfer\":{{\"id\":\"{X}\"}}}}\n\
             {{\"id\":\"{X}\",\"from\":null,\"to\":\"{B}\",\"amount\":5}}\n"
        );
        let got: Vec<_> = read(text.as_bytes(), Format::Jsonl).collect();
        assert_eq!(
            reason(&got[0]),
            (
                1,
                "no from (the object's keys are 'id', 'source', 'to' and 'amount')".to_string()
            )
        );
        let (line, why) = reason(&got[1]);
        assert_eq!(line, 2);
        assert!(
            why.starts_with("no id: every transfer")
                && why.ends_with(" once (the object's only key is 'transfer')"),
            "{why}"
        );
        assert_eq!(reason(&got[2]), (3, "no from".to_string()));
    }

    /// A spreadsheet saved as "CSV" in Windows-1252 (Excel's default outside "CSV UTF-8"): a
    /// payee's name with an accent in a column bank does not read refused the whole file ("not
    /// UTF-8 text"), header included, though every value bank reads is ASCII (found by a helper
    /// playing a new user). Only the columns bank reads must be UTF-8, and the line says which.
    #[test]
    fn bytes_that_are_not_utf8_matter_only_in_the_columns_bank_reads() {
        let text = [
            b"id,from,to,amount,b\xe9n\xe9ficiaire\n".as_slice(),
            format!("{X},{A},{B},5,").as_bytes(),
            b"Ren\xe9e M\xfcller\n",
            format!("{X},{A},{B},").as_bytes(),
            b"7\xa0,Ren\xe9e\n",
            format!("{X},{A},{B},9,\u{3000}\n").as_bytes(),
        ]
        .concat();
        let got: Vec<_> = read(&text[..], Format::Csv).collect();
        assert_eq!(got.len(), 3, "{got:?}");
        let l = got[0].as_ref().expect("the name column is not bank's");
        assert_eq!((l.line, l.transfer.amount), (2, 5));
        assert_eq!(
            reason(&got[1]),
            (3, "not UTF-8 text in the amount column".to_string())
        );
        assert_eq!(
            got[2].as_ref().map(|l| (l.line, l.transfer.amount)),
            Ok((4, 9))
        );
        // A line of a Windows-1252 no-break space alone: not blank as bytes, and said so.
        let text = b"id,from,to,amount,name\n\xa0\n";
        let got: Vec<_> = read(&text[..], Format::Csv).collect();
        assert_eq!(
            reason(&got[0]),
            (
                2,
                "1 field where the header has 5 (and not UTF-8 text)".to_string()
            )
        );
    }

    // Tests from a fourth mutation round (each fails on its mutant, passes here).

    /// UTF-16 big-endian (its mark FE FF) is named as little-endian is: dropping that half of
    /// the check left "not UTF-8 text".
    #[test]
    fn a_utf16_big_endian_file_is_named_too() {
        for format in [Format::Csv, Format::Jsonl] {
            let got: Vec<_> = read(&b"\xfe\xff\x00i\x00d\x00\n"[..], format).collect();
            assert_eq!(
                reason(&got[0]),
                (1, "UTF-16 text, not UTF-8: save the file as UTF-8".into()),
                "{format:?}"
            );
        }
    }

    /// The 1 MiB bound names the long line itself in a file of CRLF lines: counting CR and LF
    /// apart, it named line 3 for line 2.
    #[test]
    fn a_line_past_the_bound_after_crlf_lines_is_named_by_its_own_number() {
        let object = format!("{{\"id\":\"{X}\",\"from\":\"{A}\",\"to\":\"{B}\",\"amount\":5}}");
        let field = "x".repeat(2 << 20);
        for (text, format) in [
            (
                format!("id,from,to,amount\r\n{X},{A},{B},5\r\n{X},{A},{B},{field}\r\n"),
                Format::Csv,
            ),
            (
                format!("{object}\r\n{object}\r\n[{field}]\r\n"),
                Format::Jsonl,
            ),
        ] {
            let got = all(&text, format);
            let refused = got.iter().find(|r| r.is_err()).map(reason);
            let (at, why) = refused.unwrap_or_default();
            assert_eq!(at, 3, "{format:?}: {why}");
            assert!(why.contains("longer than 1 MiB"), "{format:?}: {why}");
        }
    }

    /// An unclosed quote after an escaped one ("") still takes the rest of the file: refused
    /// where it opens. A tracker that took "" for a closing quote let the lines after it vanish
    /// into one memo with no error (a run that said success).
    #[test]
    fn a_quote_left_open_after_an_escaped_quote_is_refused() {
        let y = "00000000-0000-0000-0000-000000000002";
        let text = format!(
            "id,from,to,amount,memo\n{X},{A},{B},1,pay\n{X},{A},{B},2,\"bonus \"\"x\"\"\n{y},{A},{B},3,pay\n{y},{A},{B},4,pay\n"
        );
        let got = all(&text, Format::Csv);
        assert!(got[0].is_ok(), "{got:?}");
        let (line, why) = reason(&got[1]);
        assert_eq!(line, 3, "{why}");
        assert!(why.contains("never closed"), "{why}");
        assert_eq!(got.len(), 2, "{got:?}");
    }

    /// A quote inside an unquoted field (an inch mark: 5" screen) is a character, as the csv
    /// crate reads it, and opens nothing: taken for an opening quote, the good file was refused
    /// ("never closed").
    #[test]
    fn a_quote_inside_an_unquoted_field_is_a_character() {
        let y = "00000000-0000-0000-0000-000000000002";
        let text = format!("id,from,to,amount,memo\n{X},{A},{B},2,5\" screen\n{y},{A},{B},3,x\n");
        let got: Vec<_> = all(&text, Format::Csv)
            .into_iter()
            .map(|l| l.map(|l| l.line))
            .collect();
        assert_eq!(got, [Ok(2), Ok(3)]);
    }

    /// A header missing two columns names both.
    #[test]
    fn a_header_missing_several_columns_names_each() {
        let (line, why) = reason(&all(&format!("id,from\n{X},{A}\n"), Format::Csv)[0]);
        assert_eq!(line, 1);
        assert!(why.starts_with("no to, no amount column"), "{why}");
    }

    /// A line with more fields than the header is refused: an amount written with a thousands
    /// separator (1,000) was read as 1, the extra field dropped, where it must not move money.
    #[test]
    fn a_line_with_more_fields_than_the_header_is_refused() {
        let got = all(
            &format!("id,from,to,amount\n{X},{A},{B},1,000\n"),
            Format::Csv,
        );
        assert_eq!(
            reason(&got[0]),
            (2, "5 fields where the header has 4".to_string())
        );
    }

    // Tests from mutation round 4b (each fails on its mutant, passes here).

    /// The byte path trims as the text path did: a Unicode space around a value (a no-break
    /// space pasted from a web page) is no part of it, and a line of ideographic spaces alone
    /// is blank. Without `trim` on the record read as bytes, "amount ' 5 ' is not a whole
    /// number" and "1 field where the header has 4".
    #[test]
    fn a_csv_line_trims_unicode_spaces_as_text() {
        let text =
            format!("id,from,to,amount\n{X},{A},{B},\u{a0}5\u{a0}\n\u{3000}\n{X},{A},{B},7\n");
        let got: Vec<_> = all(&text, Format::Csv)
            .into_iter()
            .map(|l| l.map(|l| (l.line, l.transfer.amount)))
            .collect();
        assert_eq!(got, [Ok((2, 5)), Ok((4, 7))]);
    }

    /// A quote never closed in a line that is not UTF-8 (a Windows-1252 name) is refused as in
    /// a line of text: left to the byte path alone, the line was a transfer and every line after
    /// it vanished into its name, with no error.
    #[test]
    fn a_quote_left_open_in_a_line_that_is_not_utf8_is_refused() {
        let y = "00000000-0000-0000-0000-000000000002";
        let text = [
            format!("id,from,to,amount,name\n{X},{A},{B},5,\"Ren").as_bytes(),
            b"\xe9e\n",
            format!("{y},{A},{B},6,x\n").as_bytes(),
        ]
        .concat();
        let got: Vec<_> = read(&text[..], Format::Csv).collect();
        assert_eq!(got.len(), 1, "{got:?}");
        let (line, why) = reason(&got[0]);
        assert_eq!(line, 2, "{why}");
        assert!(why.contains("never closed"), "{why}");
    }

    /// A JSON object with no keys says so, and one with more keys than are shown counts the
    /// rest: without the count, "the object's keys are" named six of eight as if they were all.
    #[test]
    fn a_json_object_missing_a_key_counts_the_keys_not_shown() {
        let text = format!(
            "{{}}\n{{\"id\":\"{X}\",\"source\":\"{A}\",\"to\":\"{B}\",\"amount\":5,\
             \"a\":1,\"b\":2,\"c\":3,\"d\":4}}\n"
        );
        let got: Vec<_> = read(text.as_bytes(), Format::Jsonl).collect();
        let (line, why) = reason(&got[0]);
        assert_eq!(line, 1);
        assert!(
            why.starts_with("no id: ") && why.ends_with(" (the object has no keys)"),
            "{why}"
        );
        assert_eq!(
            reason(&got[1]),
            (
                2,
                "no from (the object's keys are 'id', 'source', 'to', 'amount', 'a', 'b' and 2 \
                 more)"
                    .to_string()
            )
        );
    }
}
