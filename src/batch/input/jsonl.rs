//! JSON Lines: one `{"id","from","to","amount"}` object per line.

use std::io::BufRead;

use serde::Deserialize;

use super::{
    amount_text, malformed, names_shown, read_error, transfer, Line, Malformed, BOM, COLUMNS,
    NAMES_SHOWN,
};
use crate::text::shown;

/// JSON Lines; blank lines are skipped and unknown fields ignored. A line ends at LF, CRLF or
/// CR alone, as in CSV: a file saved with classic Mac OS line ends was one line, refused.
pub(super) struct JsonLines<R> {
    pub(super) input: R,
    pub(super) line: u64,
    /// The last line ended with a CR: an LF now is the second half of CRLF.
    pub(super) after_cr: bool,
    /// Reading failed: the rest of the input cannot be trusted.
    pub(super) done: bool,
}

impl<R: BufRead> JsonLines<R> {
    /// The next line into `text`, its line end left out; false at the end of the input.
    fn read_line(&mut self, text: &mut Vec<u8>) -> std::io::Result<bool> {
        let mut any = false;
        loop {
            let available = match self.input.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let Some(&first) = available.first() else {
                return Ok(any);
            };
            if std::mem::take(&mut self.after_cr) && first == b'\n' {
                self.input.consume(1);
                continue;
            }
            match available.iter().position(|b| matches!(b, b'\n' | b'\r')) {
                Some(end) => {
                    text.extend_from_slice(&available[..end]);
                    self.after_cr = available[end] == b'\r';
                    self.input.consume(end + 1);
                    return Ok(true);
                }
                None => {
                    let n = available.len();
                    text.extend_from_slice(available);
                    self.input.consume(n);
                    any = true;
                }
            }
        }
    }
}

/// Its keys are matched in any case, as a CSV header's names are: "ID" was an unknown key,
/// ignored, and the line refused for having no id.
#[derive(Default)]
struct JsonTransfer {
    id: Option<String>,
    from: Option<String>,
    to: Option<String>,
    /// As written, so that a message quotes it as the file has it (serde_json's number would
    /// print 5e2 as 500.0).
    amount: Option<Box<serde_json::value::RawValue>>,
    /// Which of id, from, to and amount were given as keys (null or not).
    given: [bool; 4],
    /// The object's keys as written, the first `NAMES_SHOWN` of them, and how many in all.
    keys: (Vec<String>, usize),
}

impl JsonTransfer {
    /// " (the object's keys are 'source', 'to' and 'amount')" when `reason` is a missing key
    /// of bank's that the object does not have at all: "no from" alone about
    /// `{"source": …}` or `{"transfer": {…}}` left the user to guess (found by a helper playing
    /// a new user), as a CSV header missing a column shows its names.
    fn keys_if_missing(&self, reason: &str) -> String {
        let missing = COLUMNS.iter().zip(self.given).any(|(name, given)| {
            !given
                && reason
                    .strip_prefix("no ")
                    .and_then(|r| r.strip_prefix(name))
                    .is_some_and(|r| r.is_empty() || r.starts_with(':'))
        });
        if !missing {
            return String::new();
        }
        let (first, all) = &self.keys;
        match names_shown(first.iter().map(String::as_str), *all) {
            None => " (the object has no keys)".to_string(),
            Some(names) if *all == 1 => format!(" (the object's only key is {names})"),
            Some(names) => format!(" (the object's keys are {names})"),
        }
    }
}

impl<'de> Deserialize<'de> for JsonTransfer {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(JsonTransferVisitor)
    }
}

struct JsonTransferVisitor;

impl<'de> serde::de::Visitor<'de> for JsonTransferVisitor {
    type Value = JsonTransfer;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object with the keys id, from, to and amount")
    }

    fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<JsonTransfer, M::Error> {
        let mut t = JsonTransfer::default();
        // Which keys were given, null ones included: {"id": null, "ID": "…"} names id twice too.
        let mut seen = [false; 4];
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if t.keys.0.len() < NAMES_SHOWN {
                t.keys.0.push(key.to_string());
            }
            t.keys.1 += 1;
            // As a CSV header's names: in any case, spaces around them aside.
            let Some(at) = COLUMNS
                .iter()
                .position(|c| key.trim().eq_ignore_ascii_case(c))
            else {
                map.next_value::<serde::de::IgnoredAny>()?;
                continue;
            };
            if std::mem::replace(&mut seen[at], true) {
                return Err(serde::de::Error::custom(format!(
                    "the object names {} twice (in any case, spaces aside): which one holds the \
                     transfer's {0} is not clear",
                    COLUMNS[at]
                )));
            }
            match at {
                0 => t.id = map.next_value()?,
                1 => t.from = map.next_value()?,
                2 => t.to = map.next_value()?,
                _ => t.amount = map.next_value()?,
            }
        }
        t.given = seen;
        Ok(t)
    }
}

fn amount_json(raw: Option<&serde_json::value::RawValue>) -> Result<i64, String> {
    let Some(written) = raw.map(serde_json::value::RawValue::get) else {
        return Err("no amount".into());
    };
    match serde_json::from_str(written) {
        Ok(serde_json::Value::Null) => Err("no amount".into()),
        Ok(serde_json::Value::Number(n)) => match n.as_i64() {
            Some(a) => Ok(a),
            // Below i64's range: negative before it is anything else.
            None if n.as_f64().is_some_and(|f| f < 0.0) => {
                Err(format!("amount must be positive, got {}", shown(written)))
            }
            None if n.is_u64() || n.as_f64().is_some_and(|f| f >= 9_223_372_036_854_775_808.0) => {
                Err(format!(
                    "amount {} is out of range (at most {})",
                    shown(written),
                    i64::MAX
                ))
            }
            // -0 (a float to serde_json) or 0.0; but 1e-400 is 0.0 to serde_json too, and not
            // a zero as written (it said "got 0").
            None if n.as_f64() == Some(0.0) => Err(if written.trim_start().starts_with('-') {
                format!("amount must be positive, got {}", shown(written))
            } else if written
                .split(['e', 'E'])
                .next()
                .is_some_and(|mantissa| mantissa.chars().any(|c| ('1'..='9').contains(&c)))
            {
                format!("amount {} is not a whole number", shown(written))
            } else {
                "amount must be positive, got 0".into()
            }),
            // 5e2 or 7.0: whole, perhaps, but written the way a float is, which an amount of
            // money is not.
            None if n.as_f64().is_some_and(|f| f.fract() == 0.0) => Err(format!(
                "amount {} is written as a decimal number: write it in digits only",
                shown(written)
            )),
            None => Err(format!("amount {} is not a whole number", shown(written))),
        },
        // Large amounts are often written as strings so that JavaScript keeps every digit.
        Ok(serde_json::Value::String(s)) => amount_text(Some(&s)),
        _ => Err(format!("amount {} is not a whole number", shown(written))),
    }
}

impl<R: BufRead> Iterator for JsonLines<R> {
    type Item = Result<Line, Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let mut bytes = Vec::new();
        loop {
            bytes.clear();
            self.line += 1;
            let line = self.line;
            match self.read_line(&mut bytes) {
                Ok(false) => return None,
                Ok(true) => {}
                Err(e) => {
                    self.done = true;
                    return Some(Err(read_error(line, &e)));
                }
            }
            let Ok(text) = std::str::from_utf8(&bytes) else {
                return Some(Err(malformed(line, "not UTF-8 text")));
            };
            let text = match line {
                1 => text.strip_prefix(BOM).unwrap_or(text),
                _ => text,
            };
            if text.trim().is_empty() {
                continue;
            }
            // serde would also take an array, field by field in order.
            let text_start = text.trim_start();
            if text_start.starts_with('[') {
                return Some(Err(malformed(
                    line,
                    "a JSON array, where JSON Lines has one transfer object per line",
                )));
            }
            if !text_start.starts_with('{') {
                // Its start shown: an invisible character before the `{` (a byte order mark
                // where two files were joined) is all that is wrong with a line that looks right.
                let rest = text_start.trim_end();
                let start: String = rest.chars().take(12).collect();
                let more = if start.len() < rest.len() { "…" } else { "" };
                // A CSV file named .json or given --format jsonl: said, as the reverse is.
                let names: Vec<String> = rest
                    .split(',')
                    .map(|n| n.trim().trim_matches('"').to_ascii_lowercase())
                    .collect();
                let csv = ["id", "from", "to", "amount"]
                    .iter()
                    .all(|c| names.iter().any(|n| n == c));
                let hint = match csv {
                    true => "; this looks like CSV: pass --format csv (or name the file .csv)",
                    false => "",
                };
                return Some(Err(malformed(
                    line,
                    format!(
                        "not a JSON object ('{}{more}'): each line must be one object with the \
                         keys id, from, to and amount{hint}",
                        shown(&start)
                    ),
                )));
            }
            // serde's position is given as a column: serde counts the lines of the text it is
            // given ("line 3: … at line 2 column 0").
            return Some(match serde_json::from_str::<JsonTransfer>(text) {
                Err(e) => {
                    let full = e.to_string();
                    let what = full
                        .rsplit_once(" at line ")
                        .map_or(full.as_str(), |(w, _)| w);
                    Err(malformed(
                        line,
                        format!("not a JSON transfer object: {what} (column {})", e.column()),
                    ))
                }
                Ok(j) => transfer(
                    line,
                    j.id.as_deref(),
                    j.from.as_deref(),
                    j.to.as_deref(),
                    amount_json(j.amount.as_deref()),
                )
                .map_err(|mut m| {
                    m.reason += &j.keys_if_missing(&m.reason);
                    m
                }),
            });
        }
    }
}
