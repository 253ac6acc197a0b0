//! Renders `REPORT.md` and one SVG bar chart per table from the JSON files under `results/`:
//! re-rendering never needs a re-run.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use serde_json::Value;

use super::{median, quantile};

const ORDER: &[&str] = &["drop", "goodput", "clean", "scale", "revoke"];

/// Writes `<dir>/REPORT.md` and `<dir>/charts/*.svg` from `<dir>/results/*.json`.
pub fn render(dir: &Path) -> Result<()> {
    let results = dir.join("results");
    let charts = dir.join("charts");
    std::fs::create_dir_all(&charts)?;
    let load = |name: &str| -> Option<Value> {
        let text = std::fs::read_to_string(results.join(format!("{name}.json"))).ok()?;
        serde_json::from_str(&text).ok()
    };
    let benches: Vec<Value> = ORDER.iter().filter_map(|b| load(b)).collect();
    let run = load("run");
    let mut md = String::new();
    md.push_str("# idgate benchmark report\n\n");
    md.push_str(
        "idgate next to the tools a user would otherwise pick, measured side by side in one run \
         on this machine by `cargo xtask bench all`. Absolute figures vary from run to run on \
         shared VMs; the claims are the ratios between variants of the same run.\n\n",
    );
    if let Some(first) = benches.first() {
        let m = &first["machine"];
        let _ = writeln!(
            md,
            "- Machine: Linux {}, {} CPUs ({})",
            s(&m["kernel"]),
            m["cpus"],
            s(&m["cpu_model"])
        );
        let _ = writeln!(md, "- Date: {}", s(&first["date"]));
        if first["smoke"].as_bool() == Some(true) {
            md.push_str("- **Smoke run**: one short repetition, checks the harness only — not a measurement.\n");
        }
    }
    if let Some(r) = &run {
        let _ = writeln!(
            md,
            "- Total time of `bench all`: {:.1} min; load average (1, 5, 15 min) before: {}, \
             after: {}",
            r["total_s"].as_f64().unwrap_or(0.0) / 60.0,
            s(&r["load_before"]),
            s(&r["load_after"])
        );
    }
    if let Some(r) = &run {
        let all_ended = s(&r["date"]);
        let later: Vec<String> = benches
            .iter()
            .filter(|b| s(&b["date"]) > all_ended)
            .map(|b| format!("{} (at {})", s(&b["bench"]), s(&b["date"])))
            .collect();
        if !later.is_empty() {
            let _ = writeln!(
                md,
                "- Re-run on its own after the `bench all` run: {}; its ratios are still all \
                 from one run of that benchmark. The `all` run's own results for it are kept \
                 under `results/earlier/`.",
                later.join(", ")
            );
        }
    }
    md.push_str(
        "- Reproduce: `cargo xtask bench all` (or `drop`, `goodput`, `clean`, `scale`, `revoke`; \
         `--smoke` for a seconds-long check); re-render: `cargo run --release -p idgate-tests \
         --bin bench -- report`.\n\n",
    );

    md.push_str("## Goals\n\n| benchmark | goal | measured | |\n|---|---|---|---|\n");
    for b in &benches {
        for g in b["goals"].as_array().into_iter().flatten() {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                s(&b["bench"]),
                s(&g["text"]),
                s(&g["measured"]),
                if g["met"].as_bool() == Some(true) {
                    "met"
                } else {
                    "**missed**"
                }
            );
        }
    }
    md.push('\n');

    for b in &benches {
        let _ = writeln!(md, "## {}\n", s(&b["title"]));
        let _ = writeln!(
            md,
            "{} repetition(s) per measurement; run {}; took {:.0} s; load average at the end: \
             {}.\n",
            b["runs"],
            s(&b["date"]),
            b["elapsed_s"].as_f64().unwrap_or(0.0),
            s(&b["machine"]["loadavg"])
        );
        for t in b["tables"].as_array().into_iter().flatten() {
            let id = s(&t["id"]);
            let unit = s(&t["unit"]);
            let lower = t["lower_is_better"].as_bool() == Some(true);
            let rows: Vec<(String, Vec<f64>)> = t["rows"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    (
                        s(&r["variant"]),
                        r["samples"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|x| x.as_f64().unwrap_or(f64::NAN))
                            .collect(),
                    )
                })
                .collect();
            let _ = writeln!(
                md,
                "### {} ({unit}, {} is better)\n",
                s(&t["title"]),
                if lower { "lower" } else { "higher" }
            );
            let base = rows.first().map_or(f64::NAN, |r| median(&r.1));
            let _ = writeln!(
                md,
                "| variant | median | min | max | n | ÷ {} |\n|---|---:|---:|---:|---:|---:|",
                rows.first().map_or("", |r| r.0.as_str())
            );
            for (v, x) in &rows {
                let (lo, hi) = (quantile(x, 0.0), quantile(x, 1.0));
                let _ = writeln!(
                    md,
                    "| {v} | {} | {} | {} | {} | {} |",
                    num(median(x)),
                    num(lo),
                    num(hi),
                    x.iter().filter(|v| v.is_finite()).count(),
                    if base.is_finite() && base != 0.0 {
                        format!("{:.2}×", median(x) / base)
                    } else {
                        "–".into()
                    }
                );
            }
            let svg = chart(&s(&t["title"]), &unit, &rows);
            std::fs::write(charts.join(format!("{id}.svg")), svg)
                .with_context(|| format!("writing the chart {id}"))?;
            let _ = writeln!(md, "\n![{}](charts/{id}.svg)\n", s(&t["title"]));
        }
        let goals: Vec<&Value> = b["goals"].as_array().into_iter().flatten().collect();
        if !goals.is_empty() {
            md.push_str("**Goals**\n\n");
            for g in goals {
                let _ = writeln!(
                    md,
                    "- {}: {} — {}",
                    s(&g["text"]),
                    s(&g["measured"]),
                    if g["met"].as_bool() == Some(true) {
                        "met"
                    } else {
                        "**missed**"
                    }
                );
            }
            md.push('\n');
        }
        let findings: Vec<&Value> = b["findings"].as_array().into_iter().flatten().collect();
        if !findings.is_empty() {
            md.push_str("**Findings and limits**\n\n");
            for f in findings {
                let _ = writeln!(md, "- {}", s(f));
            }
            md.push('\n');
        }
        md.push_str("**Method**\n\n");
        for m in b["method"].as_array().into_iter().flatten() {
            let _ = writeln!(md, "- {}", s(m));
        }
        md.push('\n');
    }
    std::fs::write(dir.join("REPORT.md"), md)?;
    Ok(())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn num(x: f64) -> String {
    if !x.is_finite() {
        "–".into()
    } else if x.abs() >= 1000.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A horizontal bar chart: one bar per variant at its median, a line from min to max.
pub fn chart(title: &str, unit: &str, rows: &[(String, Vec<f64>)]) -> String {
    const W: f64 = 820.0;
    const LABEL: f64 = 320.0;
    const ROW: f64 = 28.0;
    const TOP: f64 = 44.0;
    let plot = W - LABEL - 110.0;
    let max = rows
        .iter()
        .map(|r| quantile(&r.1, 1.0))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let min0 = rows
        .iter()
        .map(|r| quantile(&r.1, 0.0))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::min);
    // Log scale when the figures span more than two decades (a linear chain against a hash).
    let smallest = rows
        .iter()
        .map(|r| median(&r.1))
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    let log = min0 >= 0.0 && smallest.is_finite() && max / smallest > 100.0;
    let floor = if log { (smallest / 2.0).log10() } else { 0.0 };
    let span = if log { max.log10() - floor } else { max - min0 };
    let x = |v: f64| {
        if log {
            LABEL + (v.max(smallest / 2.0).log10() - floor) / span * plot
        } else {
            LABEL + (v - min0) / span * plot
        }
    };
    let h = TOP + ROW * rows.len() as f64 + 30.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{h}\" \
         font-family=\"sans-serif\" font-size=\"13\">\n<rect width=\"100%\" height=\"100%\" \
         fill=\"white\"/>\n<text x=\"10\" y=\"22\" font-size=\"15\" font-weight=\"bold\">{} \
         ({})</text>\n",
        esc(title),
        esc(unit)
    );
    for (i, (name, v)) in rows.iter().enumerate() {
        let y = TOP + ROW * i as f64;
        let (m, lo, hi) = (median(v), quantile(v, 0.0), quantile(v, 1.0));
        let colour = if name.starts_with("idgate") {
            "#2b6cb0"
        } else {
            "#a0aec0"
        };
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            LABEL - 8.0,
            y + 17.0,
            esc(name)
        );
        if !m.is_finite() {
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\">not measured</text>",
                LABEL + 4.0,
                y + 17.0
            );
            continue;
        }
        let _ = writeln!(
            svg,
            "<rect x=\"{LABEL}\" y=\"{}\" width=\"{:.1}\" height=\"{}\" fill=\"{colour}\"/>",
            y + 4.0,
            (x(m) - LABEL).max(1.0),
            ROW - 8.0
        );
        let mid = y + ROW / 2.0;
        let _ = writeln!(
            svg,
            "<path d=\"M{:.1} {mid} H{:.1} M{:.1} {} V{} M{:.1} {} V{}\" stroke=\"black\" \
             stroke-width=\"1.5\"/>",
            x(lo),
            x(hi),
            x(lo),
            mid - 5.0,
            mid + 5.0,
            x(hi),
            mid - 5.0,
            mid + 5.0
        );
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\">{}</text>",
            x(hi) + 6.0,
            y + 17.0,
            num(m)
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"10\" y=\"{}\" fill=\"#555\" font-size=\"11\">bar: median; line: min–max \
         over the repetitions{}</text>\n</svg>",
        h - 10.0,
        if log { "; logarithmic scale" } else { "" }
    );
    svg
}

#[cfg(test)]
mod tests {
    #[test]
    fn chart_has_one_bar_per_variant() {
        let svg = super::chart(
            "t",
            "ns",
            &[("a".into(), vec![1.0, 2.0, 3.0]), ("b".into(), vec![4.0])],
        );
        assert_eq!(svg.matches("<rect x=").count(), 2);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }
}
