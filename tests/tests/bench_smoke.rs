//! The comparative benchmark harness in its smoke form (`bench all --smoke`): every benchmark
//! runs end to end in a temporary directory, every variant yields a figure, and the report and
//! charts are rendered. Speed is not asserted (it belongs in the benchmarks themselves).

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;

#[test]
fn smoke_run_measures_every_variant_and_renders_the_report() -> Result<()> {
    let out = std::env::temp_dir().join(format!("idgate-bench-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["all", "--smoke", "--out"])
        .arg(&out)
        .status()
        .context("running the bench binary")?;
    ensure!(status.success(), "bench all --smoke failed: {status}");
    let expected: &[(&str, &[&str])] = &[
        (
            "drop",
            &[
                "bare XDP_DROP",
                "idgate XDP native",
                "idgate XDP generic",
                "idgate TC",
                "nftables netdev ingress",
                "iptables raw (legacy)",
                "iptables INPUT conntrack (legacy)",
            ],
        ),
        (
            "goodput",
            &[
                "idgate XDP native",
                "idgate XDP generic",
                "idgate TC",
                "nftables address set",
                "haproxy jwt_verify",
            ],
        ),
        (
            "clean",
            &[
                "no filter",
                "idgate XDP native",
                "idgate XDP generic",
                "idgate TC",
                "haproxy jwt_verify",
            ],
        ),
        (
            "scale",
            &[
                "idgate @ 1k",
                "nftables set @ 1k",
                "iptables fwknop chain @ 1k",
            ],
        ),
        (
            "revoke",
            &[
                "after `sessions revoke` (admin API call)",
                "after token expiry (exp)",
            ],
        ),
    ];
    for (bench, variants) in expected {
        let path: PathBuf = out.join("results").join(format!("{bench}.json"));
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(&path).with_context(|| path.display().to_string())?,
        )?;
        let first = &v["tables"][0];
        ensure!(first["id"].is_string(), "{bench}: no table");
        for variant in *variants {
            let row = first["rows"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["variant"] == *variant)
                .with_context(|| format!("{bench}: no row for {variant}"))?;
            let figure = row["samples"][0].as_f64();
            // Revocation times may be negative: a drop before the token's exp instant (the
            // kernel's coarse clock) is a finding, not a harness failure.
            ensure!(
                figure.is_some_and(|f| f.is_finite() && (*bench == "revoke" || f > 0.0)),
                "{bench}/{variant}: no positive figure ({:?})",
                row["samples"]
            );
        }
        ensure!(
            v["goals"].as_array().is_some_and(|g| !g.is_empty()),
            "{bench}: no goals checked"
        );
    }
    let report = std::fs::read_to_string(out.join("REPORT.md"))?;
    for heading in ["## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## Goals"] {
        ensure!(report.contains(heading), "the report lacks {heading}");
    }
    let chart = std::fs::read_to_string(out.join("charts").join("drop_cost.svg"))?;
    ensure!(chart.starts_with("<svg"), "drop_cost.svg is not an SVG");
    std::fs::remove_dir_all(&out)?;
    Ok(())
}
