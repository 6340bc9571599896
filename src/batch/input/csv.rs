//! CSV with a header (`id,from,to,amount`, in any order; extra columns ignored), read record by
//! record with each record's line number.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::Read;
use std::rc::Rc;

use super::{
    amount_text, malformed, names_shown, read_error, transfer, Line, Malformed, TooLong, BOM,
    COLUMNS, MAX_LINE,
};
use crate::text::{escaped, shown};

/// CSV with a header; extra columns are ignored.
pub(super) struct CsvLines<R: Read> {
    reader: csv::Reader<Newlines<R>>,
    columns: Result<[usize; 4], Option<Malformed>>,
    record: csv::StringRecord,
    /// Fields per line: the header's.
    width: usize,
    lines: Rc<RefCell<LineIndex>>,
}

/// A reader that notes where each record begins and on which line, so that a record's byte
/// offset gives its line number (the csv crate's own count leaves out blank lines); and that
/// fails, with `TooLong`, once a record outgrows `MAX_LINE`, as a line does.
struct Newlines<R> {
    inner: R,
    read: u64,
    index: Rc<RefCell<LineIndex>>,
}

struct LineIndex {
    /// Each record read and not yet given by the csv reader: its line and where it ends
    /// (`u64::MAX` while it has not). Records are given in order and the csv reader reads ahead
    /// by no more than its buffer, so this holds few. An entry per line end instead took 1.18 GB
    /// for a file of 50 M blank lines (the csv reader skips them, so nothing asked for them and
    /// nothing dropped them), and 754 MB for a quoted field of 30 M line ends.
    records: VecDeque<Record>,
    /// The line being read, 1-based.
    line: u64,
    /// The byte before was a carriage return: a line end of its own (as the csv crate takes it),
    /// or the first half of CRLF.
    after_cr: bool,
    /// The record being read has its first byte other than a space at this offset.
    begun: Option<u64>,
    /// Where the bytes read so far leave a field, as the csv crate reads them (RFC 4180).
    field: Field,
    /// Where the quoted field being read opened, and on which line.
    opened: (u64, u64),
    /// At the end of the input, the offset and line of a quote still open: the csv crate then
    /// ends the field there, so the rest of the file (however many lines) is one field, and no
    /// error.
    unclosed: Option<(u64, u64)>,
    /// Bytes of a byte order mark read so far at the start of the input.
    bom: u8,
}

struct Record {
    line: u64,
    end: u64,
}

impl Default for LineIndex {
    fn default() -> Self {
        LineIndex {
            records: VecDeque::new(),
            line: 1,
            after_cr: false,
            begun: None,
            field: Field::Start,
            opened: (0, 1),
            unclosed: None,
            bom: 0,
        }
    }
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Field {
    #[default]
    Start,
    Unquoted,
    Quoted,
    /// A quote inside a quoted field: it closes the field, or a second quote escapes it.
    QuoteInQuoted,
}

impl LineIndex {
    fn byte(&mut self, at: u64, b: u8) -> Result<(), TooLong> {
        // A byte order mark opening the input is the csv crate's to strip, not text: taken for
        // text, a quote after it opened no field here, and the field went unbounded.
        if at < 3 && at == u64::from(self.bom) && BOM.as_bytes().get(at as usize) == Some(&b) {
            self.bom += 1;
            return Ok(());
        }
        // Inside a quoted field a line end is part of the field, not the end of the record.
        let quoted = self.field == Field::Quoted;
        match b {
            b'\n' if self.after_cr => {}
            b'\n' | b'\r' => {
                self.line += 1;
                if !quoted && self.begun.take().is_some() {
                    if let Some(r) = self.records.back_mut() {
                        r.end = at;
                    }
                }
            }
            // What the csv crate trims: a line of these alone is a blank line.
            b' ' | b'\t' | b'\x0c' => {}
            _ if self.begun.is_none() => {
                self.begun = Some(at);
                self.records.push_back(Record {
                    line: self.line,
                    end: u64::MAX,
                });
            }
            _ => {}
        }
        self.after_cr = b == b'\r';
        self.field = match (self.field, b) {
            (Field::Quoted, b'"') => Field::QuoteInQuoted,
            (Field::Quoted, _) => Field::Quoted,
            (Field::QuoteInQuoted, b'"') => Field::Quoted,
            (Field::Start, b'"') => {
                self.opened = (at, self.line);
                Field::Quoted
            }
            (_, b',' | b'\n' | b'\r') => Field::Start,
            _ => Field::Unquoted,
        };
        // A record on one line is bounded by `LineLimit` already; one over several lines (a
        // quoted field holding line ends) is bounded here, blank lines before it left out.
        match self.begun {
            Some(begun) if at - begun >= MAX_LINE as u64 => {
                let line = self.records.back().map_or(self.line, |r| r.line);
                Err(match self.field {
                    Field::Quoted => TooLong::Quoted {
                        line: self.opened.1,
                    },
                    _ => TooLong::Record { line },
                })
            }
            _ => Ok(()),
        }
    }

    fn end(&mut self) {
        if self.field == Field::Quoted {
            self.unclosed = Some(self.opened);
        }
    }
}

/// A record that holds a quote never closed, with the line that quote opens on.
fn unclosed(lines: &RefCell<LineIndex>, start: u64, end: u64) -> Option<Malformed> {
    let index = lines.borrow();
    let (_, line) = index.unclosed.filter(|(q, _)| (start..end).contains(q))?;
    Some(malformed(
        line,
        "a quote opens a field here and is never closed, so every line after it would be \
         part of that field",
    ))
}

impl LineIndex {
    /// The 1-based line of the record the csv crate says starts at `offset` (it starts a record
    /// at the line ends and blank lines before it); offsets must not go backwards. Records
    /// before it are forgotten.
    fn line_at(&mut self, offset: u64) -> u64 {
        while self.records.front().is_some_and(|r| r.end < offset) {
            self.records.pop_front();
        }
        self.records.front().map_or(self.line, |r| r.line)
    }
}

impl<R: Read> Read for Newlines<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut index = self.index.borrow_mut();
        for (i, b) in buf[..n].iter().enumerate() {
            index
                .byte(self.read + i as u64, *b)
                .map_err(TooLong::into_io)?;
        }
        if n == 0 && !buf.is_empty() {
            index.end();
        }
        self.read += n as u64;
        Ok(n)
    }
}

impl<R: Read> CsvLines<R> {
    pub(super) fn new(input: R) -> Self {
        let lines = Rc::new(RefCell::new(LineIndex::default()));
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .trim(csv::Trim::All)
            // Field counts are checked here, so that a line of spaces counts as blank.
            .flexible(true)
            .from_reader(Newlines {
                inner: input,
                read: 0,
                index: Rc::clone(&lines),
            });
        // Read as bytes: a name that is not UTF-8 (Windows-1252's "bénéficiaire") is no name
        // of bank's, and need not stop the file.
        let mut header = reader.byte_headers().cloned().map(lossy);
        // A line of spaces is blank, before the header as after it; the csv crate skips only
        // empty lines before the header, and took it for the header ("no id column").
        let blank = |r: &csv::StringRecord| r.len() == 1 && r[0].is_empty();
        if header.as_ref().is_ok_and(blank) {
            let mut record = csv::ByteRecord::new();
            header = loop {
                match reader.read_byte_record(&mut record) {
                    Ok(true) if blank(&lossy(record.clone())) => {
                        // Not asked for, so its entry would stay (a line of U+3000, say).
                        lines.borrow_mut().line_at(reader.position().byte());
                        continue;
                    }
                    Ok(true) => {
                        reader.set_byte_headers(record.clone());
                        break Ok(lossy(record));
                    }
                    Ok(false) => break Ok(csv::StringRecord::new()),
                    Err(e) => break Err(e),
                }
            };
        }
        // The width every line is checked against.
        let width = header.as_ref().map_or(0, csv::StringRecord::len);
        let end = reader.position().byte();
        let columns = match header {
            Err(e) => Err(Some(csv_error(&lines, &e))),
            Ok(h) => match unclosed(&lines, 0, end) {
                Some(m) => Err(Some(m)),
                None if h.is_empty() => Err(Some(malformed(
                    1,
                    "no header: a CSV file of transfers starts with the line id,from,to,amount \
                     (the columns in any order)",
                ))),
                // Blank lines before it are skipped: the header is not always line 1.
                None => {
                    let line = h
                        .position()
                        .map_or(1, |p| lines.borrow_mut().line_at(p.byte()));
                    header_columns(&h, line).map_err(Some)
                }
            },
        };
        CsvLines {
            reader,
            columns,
            record: csv::StringRecord::new(),
            width,
            lines,
        }
    }
}

/// A record as text, a byte that is not UTF-8 shown as U+FFFD, trimmed as the csv crate trims
/// a `StringRecord` (Unicode spaces too).
fn lossy(record: csv::ByteRecord) -> csv::StringRecord {
    let position = record.position().cloned();
    let mut r = csv::StringRecord::from_byte_record_lossy(record);
    // The lossy copy has none, and the header's line number comes from it.
    r.set_position(position);
    r.trim();
    r
}

/// Where the header (on `line`) puts id, from, to and amount.
fn header_columns(header: &csv::StringRecord, line: u64) -> Result<[usize; 4], Malformed> {
    let mut found = [None; 4];
    for (name, at) in COLUMNS.iter().zip(&mut found) {
        let mut named = (0..header.len()).filter(|&i| header[i].eq_ignore_ascii_case(name));
        *at = named.next();
        if let (Some(first), Some(second)) = (*at, named.next()) {
            return Err(malformed(
                line,
                format!(
                    "the header names {name} twice (columns {} and {}): which one holds the \
                     transfer's {name} is not clear",
                    first + 1,
                    second + 1
                ),
            ));
        }
    }
    if let [Some(i), Some(f), Some(t), Some(a)] = found {
        return Ok([i, f, t, a]);
    }
    // JSON Lines read as CSV (a .csv name, or --format csv): its "header" is an object, and
    // "no id column" blamed ids that are there.
    if header
        .get(0)
        .is_some_and(|f| f.trim_start().starts_with('{'))
    {
        return Err(malformed(
            line,
            "this looks like JSON Lines, not CSV: pass --format jsonl (or name the file .jsonl, without --format csv)",
        ));
    }
    let separators = [';', '\t', '|'];
    if let [only] = header.iter().collect::<Vec<_>>()[..] {
        if only.contains(separators) {
            return Err(malformed(
                line,
                format!(
                    "the header \"{}\" is not separated by commas: the columns must be id, \
                     from, to and amount, separated by commas",
                    shown(only)
                ),
            ));
        }
    }
    // A name holding a character that shows as nothing (a second byte order mark, a
    // zero-width space) looks like the column it misses: the names are shown as they are.
    let hidden: Vec<String> = header
        .iter()
        .filter(|f| escaped(f) != *f)
        .map(|f| format!("'{}'", shown(f)))
        .collect();
    // Otherwise the names as read: a line the user took for no header at all (a spreadsheet's
    // `sep=,` line) or a name that only looks right (` "from"`: quotes after a space stay part of
    // the name) got "no id column" about a file whose header seemed to name it.
    let hidden = match hidden.is_empty() {
        true => format!(
            " (the header names {})",
            names_shown(header.iter(), header.len()).unwrap_or_else(|| "nothing".into())
        ),
        false => format!(
            " (the header's {} {} characters that show as nothing)",
            hidden.join(", "),
            if hidden.len() == 1 { "holds" } else { "hold" }
        ),
    };
    if found[0].is_none() {
        return Err(malformed(
            line,
            format!(
                "no id column{hidden}: every transfer needs its own id (a UUID), which is what \
                 makes a rerun of the file apply each transfer once; the header must name id, \
                 from, to and amount"
            ),
        ));
    }
    let missing: Vec<&str> = COLUMNS
        .iter()
        .zip(found)
        .filter(|(_, at)| at.is_none())
        .map(|(name, _)| *name)
        .collect();
    Err(malformed(
        line,
        format!(
            "no {} column{hidden}: the header must name id, from, to and amount",
            missing.join(", no ")
        ),
    ))
}

fn csv_error(lines: &RefCell<LineIndex>, e: &csv::Error) -> Malformed {
    let mut index = lines.borrow_mut();
    let line = match e.position() {
        Some(p) => index.line_at(p.byte()),
        None => index.line,
    };
    match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => malformed(line, fields_where_the_header_has(*len, *expected_len)),
        csv::ErrorKind::Utf8 { .. } => malformed(line, "not UTF-8 text"),
        csv::ErrorKind::Io(e) => read_error(line, e),
        _ => malformed(line, e.to_string()),
    }
}

impl<R: Read> Iterator for CsvLines<R> {
    type Item = Result<Line, Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        let [i, f, t, a] = match &mut self.columns {
            Ok(columns) => *columns,
            Err(e) => return e.take().map(Err),
        };
        loop {
            let mut bytes = std::mem::take(&mut self.record).into_byte_record();
            let read = self.reader.read_byte_record(&mut bytes);
            // Only bank's four columns need be text: another column's byte that is not UTF-8
            // (a name from a Windows-1252 spreadsheet) is no concern of bank's.
            let bytes = match csv::StringRecord::from_byte_record(bytes) {
                Ok(mut text) => {
                    // As `read_record` does: its trim takes Unicode spaces, the bytes' ASCII only.
                    text.trim();
                    self.record = text;
                    None
                }
                Err(e) => Some(e.into_byte_record()),
            };
            match read {
                Ok(false) => return None,
                Err(e) => {
                    // An I/O error ends the file; a bad record is one malformed line.
                    let io = matches!(e.kind(), csv::ErrorKind::Io(_));
                    let m = csv_error(&self.lines, &e);
                    if io {
                        self.columns = Err(None);
                    }
                    return Some(Err(m));
                }
                Ok(true) => {}
            }
            // Not text: read as bytes, and only bank's four columns need be text.
            let (position, len) = match &bytes {
                Some(b) => (b.position().cloned(), b.len()),
                None => (self.record.position().cloned(), self.record.len()),
            };
            let start = position.as_ref().map_or(0, csv::Position::byte);
            if let Some(m) = unclosed(&self.lines, start, self.reader.position().byte()) {
                self.columns = Err(None);
                return Some(Err(m));
            }
            // A blank line (or one of spaces); a line of empty fields is a transfer without id.
            if bytes.is_none() && len == 1 && self.record[0].is_empty() {
                // Not asked for, so its entry would stay (a line of U+3000, say).
                self.lines
                    .borrow_mut()
                    .line_at(self.reader.position().byte());
                continue;
            }
            let line = match position {
                Some(p) => self.lines.borrow_mut().line_at(p.byte()),
                None => self.lines.borrow().line,
            };
            if len != self.width {
                // A Windows-1252 no-break space alone is no blank line as bytes: say what it is.
                let not_text = match bytes.is_some() {
                    true => " (and not UTF-8 text)",
                    false => "",
                };
                let why = fields_where_the_header_has(len as u64, self.width as u64);
                return Some(Err(malformed(line, format!("{why}{not_text}"))));
            }
            let mut text = [None; 4];
            for ((at, name), value) in [i, f, t, a].into_iter().zip(COLUMNS).zip(&mut text) {
                *value = match &bytes {
                    None => self.record.get(at),
                    Some(b) => match b.get(at).map(std::str::from_utf8).transpose() {
                        Ok(v) => v,
                        Err(_) => {
                            let why = format!("not UTF-8 text in the {name} column");
                            return Some(Err(malformed(line, why)));
                        }
                    },
                };
            }
            let [id, from, to, amount] = text;
            return Some(transfer(line, id, from, to, amount_text(amount)));
        }
    }
}

/// "1 field where the header has 4", not "1 fields".
fn fields_where_the_header_has(len: u64, expected: u64) -> String {
    let s = if len == 1 { "" } else { "s" };
    format!("{len} field{s} where the header has {expected}")
}
