//! `--report FILE.html`: one self-contained page (inline SVG drawn by `plotters`, no script,
//! nothing fetched) with the run second by second and the final report as a table. Every
//! string put into the page goes through `escape`; the charts' own text is escaped by
//! `plotters`' SVG backend.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::ops::Range;

use plotters::prelude::*;
use serde_json::value::RawValue;

use super::report::Report;
use super::timeline::Timeline;
use crate::retry::Cause;
use crate::transfer::Mode;

const WIDTH: u32 = 700;
const LEGEND_WIDTH: u32 = 200;
const HEIGHT: u32 = 330;
/// The shading of a second in which a connection was lost or the server did not answer.
pub(super) const FAULT_FILL: RGBColor = RGBColor(0xf6, 0xc9, 0xc4);
const GREY: RGBColor = RGBColor(0xc8, 0xc8, 0xc8);
/// A palette that stays apart for the colour-blind (Okabe and Ito).
const BLUE: RGBColor = RGBColor(0x00, 0x72, 0xb2);
const ORANGE: RGBColor = RGBColor(0xe6, 0x9f, 0x00);
const GREEN: RGBColor = RGBColor(0x00, 0x9e, 0x73);
const VERMILION: RGBColor = RGBColor(0xd5, 0x5e, 0x00);
const PURPLE: RGBColor = RGBColor(0xcc, 0x79, 0xa7);
const SKY: RGBColor = RGBColor(0x56, 0xb4, 0xe9);

/// Writes the page to `file`.
pub(super) fn write(file: File, report: &Report, timeline: &Timeline) -> io::Result<()> {
    let page = page(report, timeline).map_err(io::Error::other)?;
    let mut out = BufWriter::new(file);
    out.write_all(page.as_bytes())?;
    out.flush()
}

/// Escapes text for HTML, in element content and in quoted attribute values alike.
pub(super) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(report: &Report, timeline: &Timeline) -> Result<String, String> {
    let verdict = if report.ok { "ok" } else { "FAILED" };
    let mode = match report.mode {
        Mode::Transaction => "transaction",
        Mode::SingleStatement => "single-statement",
    };
    let mut h = String::new();
    let w = &mut h;
    // `write!` into a String cannot fail.
    let _ = write!(
        w,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>bank workload: {verdict}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <h1>bank workload: <span class=\"{}\">{verdict}</span></h1>\n",
        if report.ok { "good" } else { "bad" }
    );
    let _ = writeln!(
        w,
        "<p>{}, {}, mode {mode}, {:.1} s, {}; {} committed, {:.0} transfers/s.</p>",
        crate::counted(report.accounts as u64, "account"),
        crate::counted(report.concurrency, "worker"),
        report.elapsed_secs,
        crate::counted(timeline.readers, "reader"),
        crate::counted(report.transfers_committed, "transfer"),
        report.throughput_per_sec
    );
    if report.interrupted {
        let _ = writeln!(
            w,
            "<p class=\"bad\">Interrupted: no transfers started after the signal; the figures \
             cover the run so far.</p>"
        );
    }
    if let Some(e) = &report.final_check_error {
        let _ = writeln!(
            w,
            "<p class=\"bad\">The final check could not run: {}</p>",
            escape(e)
        );
    }
    let ranges = timeline.fault_ranges();
    let listed = if ranges.is_empty() {
        "none".to_string()
    } else {
        ranges
            .iter()
            .map(|(a, b)| {
                if a == b {
                    format!("{a}")
                } else {
                    format!("{a}\u{2013}{b}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        w,
        "<p><span class=\"swatch\"></span> Shaded on every chart: the seconds in which a \
         connection was lost or the server did not answer (a retry after a lost connection or \
         an ambiguous commit, a transfer given up at its deadline, a failed read or connect of \
         a reader, a probe's unanswered SELECT 1). Seconds, counted from 0: <span id=\"fault-seconds\">{listed}</span>.</p>"
    );
    let _ = writeln!(w, "<div class=\"charts\">");
    for chart in charts(timeline) {
        let svg = draw(&chart, timeline)?;
        let _ = writeln!(
            w,
            "<figure>{svg}<figcaption>{}</figcaption></figure>",
            escape(chart.caption)
        );
    }
    let _ = writeln!(w, "</div>");
    let _ = writeln!(
        w,
        "<h2>Final report</h2>\n<p>The fields of <code>--json</code>'s report, by their \
         names.</p>\n<div class=\"tables\">"
    );
    let rows = rows(report).map_err(|e| e.to_string())?;
    // Side by side in three tables: one long one would leave most of the page empty.
    for (i, (key, value)) in rows.iter().enumerate() {
        if i % rows.len().div_ceil(3).max(1) == 0 {
            if i > 0 {
                let _ = writeln!(w, "</table>");
            }
            let _ = writeln!(w, "<table>\n<tr><th>field</th><th>value</th></tr>");
        }
        let bad = value == "false" && (key == "ok" || key.starts_with("invariants."));
        let _ = writeln!(
            w,
            "<tr{}><th>{}</th><td>{}</td></tr>",
            if bad { " class=\"bad\"" } else { "" },
            escape(key),
            escape(value)
        );
    }
    let _ = writeln!(w, "</table>\n</div>\n</body>\n</html>");
    Ok(h)
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.5em}\
.good{color:#00704a}.bad{color:#b00020;font-weight:bold}\
.swatch{display:inline-block;width:1em;height:1em;vertical-align:middle;background:#f6c9c4;border:1px solid #d99}\
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(620px,1fr));gap:1em}\
figure{margin:0}svg{max-width:100%;height:auto}figcaption{font-size:0.85em;color:#555;margin:0.2em 0 0 4.5em}\
.tables{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}\
table{border-collapse:collapse;font-size:0.9em}th,td{border:1px solid #ccc;padding:0.2em 0.6em;text-align:left}\
td{font-family:monospace}tr.bad td,tr.bad th{background:#fde8e8}";

/// The report's fields as `--json` prints them, nested ones by their dotted path (`retries.
/// serialization`, `verify.violations.0.id`), in the report's order; strings without their
/// quotes, whole numbers as `--json` writes them.
pub(super) fn rows(report: &Report) -> Result<Vec<(String, String)>, serde_json::Error> {
    let text = serde_json::to_string(report)?;
    let mut rows = Vec::new();
    flatten("", serde_json::from_str(&text)?, &mut rows)?;
    Ok(rows)
}

/// Walks the report's own text: a `serde_json::Value` keeps a number only as an i64, a u64 or
/// an f64, so the totals past INT8 (balances at its maximum) showed as 9.223372036854776e+20.
fn flatten(
    key: &str,
    raw: &RawValue,
    rows: &mut Vec<(String, String)>,
) -> Result<(), serde_json::Error> {
    let join = |k: &str| {
        if key.is_empty() {
            k.to_string()
        } else {
            format!("{key}.{k}")
        }
    };
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'{') if text != "{}" => {
            for (k, v) in ordered(text)? {
                flatten(&join(&k), v, rows)?;
            }
        }
        Some(b'[') if text != "[]" => {
            let items: Vec<&RawValue> = serde_json::from_str(text)?;
            for (i, v) in items.into_iter().enumerate() {
                flatten(&join(&i.to_string()), v, rows)?;
            }
        }
        Some(b'"') => rows.push((key.to_string(), serde_json::from_str::<String>(text)?)),
        // Fractions as before, through a `Value`: the page then agrees with `--json` read by
        // serde_json's default parser, which can land one ulp off the text.
        _ if text.contains(['.', 'e', 'E']) => {
            let value: serde_json::Value = serde_json::from_str(text)?;
            rows.push((key.to_string(), value.to_string()))
        }
        _ => rows.push((key.to_string(), text.to_string())),
    }
    Ok(())
}

/// An object's fields in the order of its text.
fn ordered(text: &str) -> Result<Vec<(String, &RawValue)>, serde_json::Error> {
    let map: BTreeMap<String, &RawValue> = serde_json::from_str(text)?;
    let mut fields: Vec<(usize, String, &RawValue)> = map
        .into_iter()
        .map(|(k, v)| {
            // A value is a slice of `text`: its place there is the field's.
            let at = (v.get().as_ptr() as usize).saturating_sub(text.as_ptr() as usize);
            (at, k, v)
        })
        .collect();
    fields.sort_by_key(|(at, _, _)| *at);
    Ok(fields.into_iter().map(|(_, k, v)| (k, v)).collect())
}

/// One chart: lines of one value per second (`None`: no value that second).
struct Chart {
    title: &'static str,
    y_desc: &'static str,
    y: Range<f64>,
    /// Values are log10 of what the labels say.
    log: bool,
    lines: Vec<Line>,
    /// Said in the middle of the chart when there is nothing to draw.
    note: Option<&'static str>,
    /// Said under the chart.
    caption: &'static str,
}

struct Line {
    name: String,
    color: RGBColor,
    width: u32,
    values: Vec<Option<f64>>,
}

fn charts(t: &Timeline) -> Vec<Chart> {
    let rate: Vec<Option<f64>> = t.seconds.iter().map(|s| Some(s.rate())).collect();
    let top = rate.iter().flatten().fold(0.0f64, |a, b| a.max(*b));
    let throughput = Chart {
        title: "Transfers committed per second",
        y_desc: "transfers/s",
        y: 0.0..(top * 1.15).max(1.0),
        log: false,
        lines: vec![Line {
            name: "committed".into(),
            color: BLUE,
            width: 2,
            values: rate,
        }],
        note: None,
        caption: "Transfers committed in each second of the run.",
    };

    let log = |v: Option<f64>| v.map(|ms| ms.max(0.001).log10());
    let p50: Vec<Option<f64>> = t.seconds.iter().map(|s| log(s.p50_ms)).collect();
    let p99: Vec<Option<f64>> = t.seconds.iter().map(|s| log(s.p99_ms)).collect();
    let all = p50.iter().chain(&p99).flatten();
    let (low, high) = all.fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(*v), h.max(*v)));
    let (low, high) = if low > high {
        (0.0, 1.0)
    } else {
        (low.floor(), (high + 0.1).ceil().max(low.floor() + 1.0))
    };
    let latency = Chart {
        title: "Latency of committed transfers per second",
        y_desc: "ms (log scale)",
        y: low..high,
        log: true,
        lines: vec![
            Line {
                name: "p50".into(),
                color: BLUE,
                width: 2,
                values: p50,
            },
            Line {
                name: "p99".into(),
                color: VERMILION,
                width: 2,
                values: p99,
            },
        ],
        note: t
            .seconds
            .iter()
            .all(|s| s.p50_ms.is_none())
            .then_some("no transfer committed"),
        caption: "p50 and p99 of the transfers committed in each second, retries included.",
    };

    let colors = [BLUE, ORANGE, GREEN, VERMILION, PURPLE];
    let mut lines = Vec::new();
    let mut top = 0u64;
    for (cause, color) in Cause::ALL.into_iter().zip(colors) {
        let values: Vec<u64> = t.seconds.iter().map(|s| s.retries.get(cause)).collect();
        let most = values.iter().copied().max().unwrap_or(0);
        if most == 0 {
            continue;
        }
        top = top.max(most);
        lines.push(Line {
            name: cause.as_str().replace('_', " "),
            color,
            width: 2,
            values: values.into_iter().map(|v| Some(v as f64)).collect(),
        });
    }
    let retries = Chart {
        title: "Retries per second by cause",
        y_desc: "retries/s",
        y: 0.0..(top as f64 * 1.15).max(1.0),
        log: false,
        note: lines.is_empty().then_some("no retries"),
        lines,
        caption: "Counted as they happen. The final report leaves out the retries of a transfer \
                  given up on at its deadline; this chart counts them.",
    };

    let start = t.starting_total as f64;
    let lows: Vec<Option<f64>> = t.totals.iter().map(|v| v.map(|v| v.0 as f64)).collect();
    let highs: Vec<Option<f64>> = t.totals.iter().map(|v| v.map(|v| v.1 as f64)).collect();
    let off = lows
        .iter()
        .chain(&highs)
        .flatten()
        .fold(0.0f64, |a, v| a.max((v - start).abs()));
    let half = (off * 1.5).max(start.abs() * 0.02).max(10.0);
    let read = t.totals.iter().any(Option::is_some);
    let total = Chart {
        title: "Total balance in the readers' snapshots",
        y_desc: "total",
        y: (start - half)..(start + half),
        log: false,
        lines: vec![
            Line {
                name: format!("opening total {}", t.starting_total),
                color: GREY,
                width: 7,
                values: vec![Some(start); t.len()],
            },
            Line {
                name: "lowest read".into(),
                color: BLUE,
                width: 2,
                values: lows,
            },
            Line {
                name: "highest read".into(),
                color: SKY,
                width: 1,
                values: highs,
            },
        ],
        note: (!read).then_some(if t.readers == 0 {
            "no readers ran: run with --readers N to read the total in snapshots"
        } else {
            "no snapshot read completed"
        }),
        caption: "Each reader sums every workload account's balance in one snapshot, over and \
                  over: the lowest and the highest total read in each second must stay flat at \
                  the opening total. No point: no read ended in that second.",
    };
    vec![throughput, latency, retries, total]
}

/// One chart as an SVG element.
fn draw(chart: &Chart, t: &Timeline) -> Result<String, String> {
    let mut svg = String::new();
    draw_into(&mut svg, chart, t).map_err(|e| format!("cannot draw a chart: {e}"))?;
    // The SVG backend writes a standalone document; inside HTML only its element is wanted.
    let start = svg.find("<svg").unwrap_or(0);
    Ok(svg[start..].to_string())
}

fn draw_into(
    svg: &mut String,
    chart: &Chart,
    t: &Timeline,
) -> Result<(), DrawingAreaErrorKind<<SVGBackend<'static> as DrawingBackend>::ErrorType>> {
    let root = SVGBackend::with_string(svg, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    // The legend has a strip of its own on the right: inside the plot it would hide data.
    let (plot, side) = root.split_horizontally(WIDTH - LEGEND_WIDTH);
    let n = t.len() as f64;
    let y = chart.y.clone();
    let mut c = ChartBuilder::on(&plot)
        .caption(chart.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..n, y.clone())?;
    c.draw_series(
        t.faults
            .iter()
            .enumerate()
            .filter(|(_, f)| **f)
            .map(|(s, _)| {
                Rectangle::new(
                    [(s as f64, y.start), (s as f64 + 1.0, y.end)],
                    FAULT_FILL.filled(),
                )
            }),
    )?;
    let log = chart.log;
    let label_y = move |v: &f64| {
        if log {
            let ms = 10f64.powf(*v);
            if ms >= 1.0 {
                format!("{ms:.0}")
            } else {
                format!("{ms:.2}")
            }
        } else if (y.end - y.start) >= 10.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        }
    };
    // One label per decade on a log chart. Only a log chart's span counts decades: a linear
    // one's can be 10^19 (balances at INT8's maximum), and `as usize + 1` on that overflowed.
    // A log chart spans milliseconds from 0.001 to a year's worth: never 20 decades.
    let y_labels = if log {
        let decades = (chart.y.end - chart.y.start).round().clamp(0.0, 20.0) as usize;
        decades.saturating_add(1).max(2)
    } else {
        6
    };
    c.configure_mesh()
        .x_desc("seconds since the start")
        .y_desc(chart.y_desc)
        .x_labels((t.len() + 1).min(16))
        .y_labels(y_labels)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&label_y)
        .light_line_style(RGBColor(0xee, 0xee, 0xee))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    for line in &chart.lines {
        let style = line.color.stroke_width(line.width);
        for segment in segments(&line.values) {
            if segment.len() == 1 {
                c.draw_series(segment.iter().map(|p| Circle::new(*p, 3, style.filled())))?;
            } else {
                c.draw_series(LineSeries::new(segment, style))?;
            }
        }
    }
    if let Some(note) = chart.note {
        let area = c.plotting_area();
        let (xs, ys) = (area.get_x_range(), area.get_y_range());
        let middle = ((xs.start + xs.end) / 2.0, (ys.start + ys.end) / 2.0);
        let style = ("sans-serif", 17).into_font().color(&BLACK).pos(
            plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Center,
            ),
        );
        area.draw(&Text::new(note, middle, style))?;
    }
    legend(&side, chart, t)?;
    root.present()?;
    Ok(())
}

/// The chart's legend: the shading when a second is shaded, then each line.
fn legend(
    side: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    chart: &Chart,
    t: &Timeline,
) -> Result<(), DrawingAreaErrorKind<<SVGBackend<'static> as DrawingBackend>::ErrorType>> {
    let mut entries: Vec<(&str, RGBColor, u32)> = Vec::new();
    if t.faults.iter().any(|f| *f) {
        entries.push(("connection lost / no answer", FAULT_FILL, 0));
    }
    for line in &chart.lines {
        entries.push((&line.name, line.color, line.width.clamp(2, 6)));
    }
    let font =
        ("sans-serif", 15)
            .into_font()
            .color(&BLACK)
            .pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Left,
                plotters::style::text_anchor::VPos::Center,
            ));
    for (i, (name, color, width)) in entries.into_iter().enumerate() {
        let y = 52 + 24 * i as i32;
        if width == 0 {
            side.draw(&Rectangle::new([(2, y - 7), (22, y + 7)], color.filled()))?;
        } else {
            side.draw(&PathElement::new(
                vec![(2, y), (22, y)],
                color.stroke_width(width),
            ))?;
        }
        side.draw(&Text::new(name.to_string(), (28, y), font.clone()))?;
    }
    Ok(())
}

/// Runs of seconds with a value, as points in the middle of their second.
fn segments(values: &[Option<f64>]) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current = Vec::new();
    for (s, v) in values.iter().enumerate() {
        match v {
            Some(v) => current.push((s as f64 + 0.5, *v)),
            None if !current.is_empty() => out.push(std::mem::take(&mut current)),
            None => {}
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(
            escape(r#"<script>alert("x") & 'y'</script>"#),
            "&lt;script&gt;alert(&quot;x&quot;) &amp; &#39;y&#39;&lt;/script&gt;"
        );
    }

    #[test]
    fn segments_break_at_missing_seconds() {
        let s = segments(&[Some(1.0), Some(2.0), None, Some(3.0)]);
        assert_eq!(s, vec![vec![(0.5, 1.0), (1.5, 2.0)], vec![(3.5, 3.0)]]);
    }
}
