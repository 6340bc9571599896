//! `bank workload --report FILE.html`: the page's charts, its table against `--json`'s report,
//! the shading of a frozen server's seconds, and the report on Ctrl-C, when the final check
//! fails, and for a path that cannot be written.

use std::collections::BTreeMap;
use std::thread;
use std::time::Duration;

use serde_json::Value;

use crate::support::proxy::{upstream_of, Proxy};
use crate::support::{Bank, Iso, ScratchDb};

const CHARTS: [&str; 4] = [
    "Transfers committed per second",
    "Latency of committed transfers per second",
    "Retries per second by cause",
    "Total balance in the readers",
];

/// The fill of a shaded (fault) second in the charts.
const FAULT_FILL: &str = "fill=\"#F6C9C4\"";

#[test]
fn the_html_report_has_every_chart_and_the_json_reports_figures() {
    for iso in Iso::BOTH {
        let db = ScratchDb::migrated_at(iso);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("report.html");
        let run = db
            .bank()
            .args(["workload", "--accounts", "10", "--concurrency", "3"])
            .args(["--readers", "2", "--duration", "2500ms", "--json"])
            .args(["--report", path.to_str().expect("utf-8 path")])
            .run();
        run.success();
        let json = run.json();
        let html = std::fs::read_to_string(&path).expect("the report");
        self_contained(&html);
        let svgs: Vec<&str> = html.split("<svg").skip(1).collect();
        assert_eq!(svgs.len(), CHARTS.len(), "{html}");
        // Each chart has its title, its x axis, and its lines (their legend is drawn with the
        // first segment of each).
        let lines: [&[&str]; 4] = [
            &["committed"],
            &["p50", "p99"],
            &["serialization", "no retries"],
            &["lowest read", "highest read"],
        ];
        for ((svg, title), lines) in svgs.iter().zip(CHARTS).zip(lines) {
            assert!(svg.contains(title), "{title} missing: {svg}");
            assert!(svg.contains("seconds since the start"), "{svg}");
            let text = |l: &&str| svg.contains(&format!(">\n{l}\n</text>"));
            assert!(lines.iter().any(text), "{title}: {lines:?}: {svg}");
        }
        assert!(
            !html.contains("no readers ran"),
            "the readers' totals are drawn"
        );
        assert!(json["reads"].as_u64() > Some(0), "{json}");
        assert_eq!(table(&html), leaves(&json), "the table is --json's report");
    }
}

/// Without readers the total chart says so instead of drawing nothing.
#[test]
fn the_html_report_without_readers_says_the_total_was_not_read() {
    let db = ScratchDb::migrated();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("report.html");
    let run = db
        .bank()
        .args(["workload", "--accounts", "10", "--concurrency", "2"])
        .args(["--transfers", "50", "--json"])
        .args(["--report", path.to_str().expect("utf-8 path")])
        .run();
    run.success();
    let html = std::fs::read_to_string(&path).expect("the report");
    self_contained(&html);
    assert_eq!(html.matches("<svg").count(), CHARTS.len());
    assert!(
        html.contains("no readers ran: run with --readers N"),
        "{html}"
    );
    assert_eq!(table(&html), leaves(&run.json()));
}

/// The server freezes (the proxy relays nothing) 2.2 s into a 4 s run with `--timeout 1s` and
/// never thaws: the final check cannot run and the run fails, but the report is written, its
/// seconds from the freeze on are shaded on every chart, and the first second is not. (At 1.2 s
/// into a 3 s run, a question the probe asked late in second 0 and the loaded machine had not yet
/// answered at the freeze shaded second 0: the full suite failed once that way.)
#[test]
fn a_frozen_server_is_shaded_in_the_report_written_when_the_final_check_fails() {
    for iso in Iso::BOTH {
        let db = ScratchDb::migrated_at(iso);
        let proxy = Proxy::start(upstream_of(&db.url));
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("report.html");
        let run = {
            let bank = Bank::new()
                .args(["--database-url", &proxy.url_for(&db.url)])
                .args(["workload", "--accounts", "10", "--concurrency", "3"])
                .args(["--readers", "1", "--duration", "4s", "--timeout", "1s"])
                .args(["--check-timeout", "1s"])
                .args(["--json", "--report", path.to_str().expect("utf-8 path")]);
            thread::spawn(move || bank.run())
        };
        // 2.2 s into the run itself, which starts once the process has connected and made its
        // accounts: timed from the spawn, a slow start put the freeze in second 0.
        let mut conn = db.conn();
        let started = std::time::Instant::now();
        while crate::support::transfers_so_far(&mut conn) == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the workload never started"
            );
            thread::sleep(Duration::from_millis(5));
        }
        thread::sleep(Duration::from_millis(2200));
        proxy.freeze_all();
        let run = run.join().expect("workload thread");
        assert_eq!(run.code, 1, "{run:?}");
        let json = run.json();
        assert!(json["final_check_error"].is_string(), "{json}");
        let html = std::fs::read_to_string(&path).expect("the report");
        self_contained(&html);
        assert!(html.contains("The final check could not run"), "{html}");
        let shaded = fault_seconds(&html);
        assert!(
            !shaded.contains(&0),
            "second 0 was before the freeze: {shaded:?} {json} {}",
            run.stderr
        );
        // The run's end (4 s) was well into the freeze.
        assert!(shaded.contains(&3), "{shaded:?}");
        for svg in html.split("<svg").skip(1) {
            assert!(svg.contains(FAULT_FILL), "not shaded: {svg}");
            assert!(
                svg.contains(">\nconnection lost / no answer\n</text>"),
                "no legend: {svg}"
            );
        }
        assert_eq!(table(&html), leaves(&json));
    }
}

/// Ctrl-C (a real SIGINT) stops the run early; the report is written all the same.
#[test]
fn the_html_report_is_written_on_ctrl_c() {
    use std::process::{Command, Stdio};
    let db = ScratchDb::migrated();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("report.html");
    let child = Command::new(assert_cmd::cargo::cargo_bin("bank"))
        .args(["--database-url", db.url.expose(), "workload"])
        .args([
            "--accounts",
            "10",
            "--concurrency",
            "2",
            "--duration",
            "30s",
        ])
        .args(["--json", "--report", path.to_str().expect("utf-8 path")])
        .current_dir(dir.path())
        .env_remove("DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bank");
    // Once its transfers land: a fixed 1.5 s could come during its setup on a loaded machine.
    crate::support::wait_for_transfers_past(&mut db.conn(), 0);
    crate::support::interrupt(child.id());
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(json["interrupted"], true);
    let html = std::fs::read_to_string(&path).expect("the report");
    self_contained(&html);
    assert!(html.contains("Interrupted: no transfers started"), "{html}");
    assert_eq!(
        table(&html).get("interrupted").map(String::as_str),
        Some("true")
    );
    assert_eq!(table(&html), leaves(&json));
}

/// A report that cannot be written is refused before anything changes: usage error, exit 2.
#[test]
fn an_unwritable_report_path_is_refused_before_anything_changes() {
    let db = ScratchDb::migrated();
    let before = db.state();
    db.bank()
        .args(["workload", "--accounts", "10", "--transfers", "5"])
        .args(["--report", "/nonexistent/dir/report.html"])
        .run()
        .fails_with(2, "cannot write --report /nonexistent/dir/report.html");
    assert_eq!(db.state(), before, "nothing changed");
    // A directory is no file either.
    let dir = tempfile::tempdir().expect("temp dir");
    db.bank()
        .args(["workload", "--accounts", "10", "--transfers", "5"])
        .args(["--report", dir.path().to_str().expect("utf-8 path")])
        .run()
        .fails_with(2, "cannot write --report");
    assert_eq!(db.state(), before, "nothing changed");
}

/// Nothing runs or is fetched: no script, no external resource.
#[track_caller]
fn self_contained(html: &str) {
    assert!(html.starts_with("<!DOCTYPE html>"), "{html}");
    assert!(html.trim_end().ends_with("</html>"));
    let lower = html.to_ascii_lowercase();
    for banned in [
        "<script", "<link", "<img", "<iframe", "src=", "href=", "url(", "@import",
    ] {
        assert!(!lower.contains(banned), "{banned} in the report");
    }
}

/// The seconds listed as shaded, e.g. "3–5, 8" → {3, 4, 5, 8}.
fn fault_seconds(html: &str) -> Vec<u64> {
    let start = html
        .find("id=\"fault-seconds\">")
        .expect("the fault seconds")
        + 19;
    let text = &html[start..start + html[start..].find('<').expect("end of span")];
    if text == "none" {
        return Vec::new();
    }
    let mut seconds = Vec::new();
    for part in text.split(", ") {
        let bounds: Vec<u64> = part
            .split('\u{2013}')
            .map(|n| n.parse().expect("a second"))
            .collect();
        seconds.extend(bounds[0]..=*bounds.last().expect("a bound"));
    }
    seconds
}

/// The report table's rows: field → value, unescaped.
fn table(html: &str) -> BTreeMap<String, String> {
    let cell = |row: &str, open: &str, close: &str| -> Option<String> {
        let start = row.find(open)? + open.len();
        let end = start + row[start..].find(close)?;
        Some(unescape(&row[start..end]))
    };
    let mut rows = BTreeMap::new();
    for row in html.split("<tr").skip(1) {
        if let (Some(k), Some(v)) = (cell(row, "<th>", "</th>"), cell(row, "<td>", "</td>")) {
            assert!(rows.insert(k.clone(), v).is_none(), "{k} twice");
        }
    }
    rows
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// The JSON report's values by their dotted paths, strings without quotes.
fn leaves(json: &Value) -> BTreeMap<String, String> {
    fn walk(key: String, v: &Value, out: &mut BTreeMap<String, String>) {
        let join = |k: &str| {
            if key.is_empty() {
                k.to_string()
            } else {
                format!("{key}.{k}")
            }
        };
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, v) in m {
                    walk(join(k), v, out);
                }
            }
            Value::Array(a) if !a.is_empty() => {
                for (i, v) in a.iter().enumerate() {
                    walk(join(&i.to_string()), v, out);
                }
            }
            Value::String(s) => {
                out.insert(key, s.clone());
            }
            v => {
                out.insert(key, v.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(String::new(), json, &mut out);
    out
}

/// Balances at INT8's maximum: the readers' total chart spans about 10^19, and the page panicked
/// (exit 101, no report) turning that span into a count of decades, a figure only a log chart
/// uses, with `as usize + 1`.
#[test]
fn the_html_report_draws_totals_past_int8() {
    let db = ScratchDb::migrated();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("report.html");
    let run = db
        .bank()
        .args(["workload", "--accounts", "100", "--concurrency", "2"])
        .args(["--balance", &i64::MAX.to_string(), "--readers", "1"])
        .args(["--duration", "1s", "--json"])
        .args(["--report", path.to_str().expect("utf-8 path")])
        .run();
    run.success();
    let total = (100 * i128::from(i64::MAX)).to_string();
    assert!(
        run.stdout.contains(&format!("\"starting_total\":{total},")),
        "{run:?}"
    );
    let html = std::fs::read_to_string(&path).expect("the report");
    self_contained(&html);
    let svgs: Vec<&str> = html.split("<svg").skip(1).collect();
    assert_eq!(svgs.len(), CHARTS.len(), "{html}");
    assert!(svgs[3].contains(CHARTS[3]), "{html}");
    // The table says what --json says, to the last digit (it said 9.223372036854776e+20).
    let table = table(&html);
    assert_eq!(table["ok"], "true", "{html}");
    for field in ["starting_total", "final_total", "verify.total_balance"] {
        assert_eq!(table[field], total, "{field}: {html}");
    }
}
