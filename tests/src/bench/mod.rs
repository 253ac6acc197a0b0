//! The comparative benchmark suite (`cargo xtask bench all|drop|goodput|clean|scale|revoke`):
//! idgate next to the tools a user would otherwise pick (nftables, iptables, HAProxy with
//! `jwt_verify`), measured side by side in one run on this machine.
//!
//! Every benchmark writes one JSON file of raw samples under `bench/results/`; [`report`] renders
//! `bench/REPORT.md` and one SVG chart per table from those files alone, so re-rendering never
//! needs a re-run. The claims are ratios between variants of the same run, never one absolute
//! figure: these are shared 2-core VMs.

/// The variant a deployment gets on a veth with the default `mode = "auto"` (TC: see the
/// clean-path benchmark, which measured it); the goals of benchmarks 2 and 3 are checked on it.
pub const DEFAULT_ON_VETH: &str = "idgate TC";

pub mod clean;
pub mod cpu;
pub mod drop;
pub mod goodput;
pub mod peers;
pub mod report;
pub mod revoke;
pub mod scale;
pub mod topo;
pub mod traffic;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

/// How much each benchmark measures.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Seconds-long check that every code path runs, not a measurement.
    pub smoke: bool,
    /// Repetitions of every measurement.
    pub runs: usize,
    /// Length of one load measurement.
    pub window: Duration,
}

impl Plan {
    /// The plan for a full (`smoke = false`) or smoke run.
    pub fn new(smoke: bool) -> Plan {
        if smoke {
            Plan {
                smoke,
                runs: 1,
                window: Duration::from_millis(400),
            }
        } else {
            Plan {
                smoke,
                runs: 5,
                window: Duration::from_secs(2),
            }
        }
    }
}

/// One variant's samples in a table.
#[derive(Clone, Debug)]
pub struct Row {
    /// The variant's name as the report shows it.
    pub variant: String,
    /// One figure per repetition.
    pub samples: Vec<f64>,
}

impl Row {
    /// The median of the samples (NaN when there are none).
    pub fn median(&self) -> f64 {
        median(&self.samples)
    }
}

/// The median of `v` (NaN for an empty slice).
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The `q` quantile (0..=1) of `v`, nearest rank.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let rank = ((s.len() as f64 * q).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// One table of a benchmark's result: variants measured under the same conditions.
#[derive(Clone, Debug)]
pub struct Table {
    /// Short id, also the chart's file name.
    pub id: String,
    /// Heading.
    pub title: String,
    /// Unit of the samples.
    pub unit: String,
    /// Whether a lower figure is better (shown in the report).
    pub lower_is_better: bool,
    /// The variants.
    pub rows: Vec<Row>,
}

impl Table {
    /// An empty table.
    pub fn new(id: &str, title: &str, unit: &str, lower_is_better: bool) -> Table {
        Table {
            id: id.into(),
            title: title.into(),
            unit: unit.into(),
            lower_is_better,
            rows: Vec::new(),
        }
    }

    /// Adds a variant's samples.
    pub fn push(&mut self, variant: &str, samples: Vec<f64>) {
        self.rows.push(Row {
            variant: variant.into(),
            samples,
        });
    }

    /// The median of a variant (NaN if absent).
    pub fn median_of(&self, variant: &str) -> f64 {
        self.rows
            .iter()
            .find(|r| r.variant == variant)
            .map_or(f64::NAN, Row::median)
    }

    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "title": self.title,
            "unit": self.unit,
            "lower_is_better": self.lower_is_better,
            "rows": self.rows.iter().map(|r| json!({
                "variant": r.variant,
                "samples": r.samples,
            })).collect::<Vec<_>>(),
        })
    }
}

/// A goal of the issue, checked against this run's figures.
#[derive(Clone, Debug)]
pub struct Goal {
    /// What was aimed for, e.g. "idgate XDP ≤ 1.15× bare XDP_DROP".
    pub text: String,
    /// The measured figure (a ratio or an absolute where the goal is one), with its unit.
    pub measured: String,
    /// Whether it was met.
    pub met: bool,
}

impl Goal {
    /// A goal `value ≤ limit` (or `≥` when `at_least`), with the value printed as `fmt`.
    pub fn check(text: &str, value: f64, limit: f64, at_least: bool, suffix: &str) -> Goal {
        let met = value.is_finite()
            && if at_least {
                value >= limit
            } else {
                value <= limit
            };
        Goal {
            text: text.into(),
            measured: if value.is_finite() {
                format!("{value:.2}{suffix}")
            } else {
                "not measured".into()
            },
            met,
        }
    }
}

/// A benchmark's result, as written to `bench/results/<bench>.json`.
#[derive(Debug)]
pub struct Outcome {
    /// The benchmark's id (`drop`, `goodput`, ...).
    pub bench: String,
    /// Heading in the report.
    pub title: String,
    /// The tables.
    pub tables: Vec<Table>,
    /// The goals and whether they were met.
    pub goals: Vec<Goal>,
    /// How it was measured: offered rate, pinning, where CPU is attributed.
    pub method: Vec<String>,
    /// What limited a missed goal, or other findings.
    pub findings: Vec<String>,
    /// How long the benchmark took.
    pub elapsed: Duration,
}

impl Outcome {
    /// An empty outcome for `bench`.
    pub fn new(bench: &str, title: &str) -> Outcome {
        Outcome {
            bench: bench.into(),
            title: title.into(),
            tables: Vec::new(),
            goals: Vec::new(),
            method: Vec::new(),
            findings: Vec::new(),
            elapsed: Duration::ZERO,
        }
    }

    /// Writes `<dir>/<bench>.json`, with the machine and the run's conditions.
    pub fn write(&self, dir: &Path, plan: &Plan) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let value = json!({
            "bench": self.bench,
            "title": self.title,
            "smoke": plan.smoke,
            "runs": plan.runs,
            "date": utc_now(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "machine": machine(),
            "tables": self.tables.iter().map(Table::to_json).collect::<Vec<_>>(),
            "goals": self.goals.iter().map(|g| json!({
                "text": g.text, "measured": g.measured, "met": g.met,
            })).collect::<Vec<_>>(),
            "method": self.method,
            "findings": self.findings,
        });
        let path = dir.join(format!("{}.json", self.bench));
        std::fs::write(&path, serde_json::to_string_pretty(&value)?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

/// Times `f`, storing the elapsed time in the outcome it returns.
pub fn timed(f: impl FnOnce() -> Result<Outcome>) -> Result<Outcome> {
    let start = Instant::now();
    let mut o = f()?;
    o.elapsed = start.elapsed();
    Ok(o)
}

/// Kernel, CPU count and model, and load averages now.
pub fn machine() -> Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_default();
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    json!({ "kernel": kernel, "cpus": cpus, "cpu_model": model, "loadavg": loadavg() })
}

/// `/proc/loadavg`'s three averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The one-minute load average.
pub fn load1() -> f64 {
    loadavg()
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The current UTC time, `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
