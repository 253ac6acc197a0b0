//! `cargo xtask bench all|drop|goodput|clean|scale|revoke [--smoke]`: idgate next to nftables,
//! iptables and HAProxy with `jwt_verify`, measured in one run; writes `bench/results/*.json`
//! and renders `bench/REPORT.md` with SVG charts (see `idgate_tests::bench`).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use idgate_tests::bench::{self, Plan};

#[derive(Parser)]
#[command(about = "idgate's comparative benchmark suite")]
struct Args {
    /// all, drop, goodput, clean, scale, revoke, or report (re-render from saved results).
    which: String,
    /// A seconds-long version of every benchmark: checks the harness, measures little.
    #[arg(long)]
    smoke: bool,
    /// Where REPORT.md, the charts and results/ go (default: the repository's bench/).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Wait up to this many seconds for the 1-minute load average to drop below 0.8 first.
    #[arg(long, default_value_t = 0)]
    wait_quiet: u64,
}

const ALL: &[&str] = &["drop", "goodput", "clean", "scale", "revoke"];

fn main() -> Result<()> {
    if std::env::var_os("RUST_LOG").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("RUST_LOG", "warn") };
    }
    let args = Args::parse();
    let out = match args.out {
        Some(o) => o,
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("workspace root")?
            .join("bench"),
    };
    let results = out.join("results");
    let which: Vec<&str> = match args.which.as_str() {
        "all" => ALL.to_vec(),
        "report" => Vec::new(),
        w if ALL.contains(&w) => vec![w],
        other => bail!(
            "unknown benchmark {other:?}: expected all, {}, or report",
            ALL.join(", ")
        ),
    };
    if !which.is_empty() {
        bench::peers::ensure_installed()?;
        wait_quiet(Duration::from_secs(args.wait_quiet));
    }
    let plan = Plan::new(args.smoke);
    let load_before = bench::loadavg();
    let start = Instant::now();
    for w in &which {
        println!("== {w} ({})", bench::utc_now());
        let outcome = bench::timed(|| match *w {
            "drop" => bench::drop::run(&plan),
            "goodput" => bench::goodput::run(&plan),
            "clean" => bench::clean::run(&plan),
            "scale" => bench::scale::run(&plan),
            _ => bench::revoke::run(&plan),
        })
        .with_context(|| format!("benchmark {w}"))?;
        let path = outcome.write(&results, &plan)?;
        for t in &outcome.tables {
            println!("{} ({})", t.title, t.unit);
            for r in &t.rows {
                println!(
                    "  {:<40} median {:>12.3}  n={}",
                    r.variant,
                    r.median(),
                    r.samples.len()
                );
            }
        }
        for g in &outcome.goals {
            println!(
                "  goal {}: {} — {}",
                g.text,
                g.measured,
                if g.met { "met" } else { "MISSED" }
            );
        }
        println!(
            "  → {} ({:.0} s)",
            path.display(),
            outcome.elapsed.as_secs_f64()
        );
    }
    if which.len() > 1 {
        std::fs::write(
            results.join("run.json"),
            serde_json::to_string_pretty(&serde_json::json!({
                "benches": which,
                "smoke": plan.smoke,
                "total_s": start.elapsed().as_secs_f64(),
                "load_before": load_before,
                "load_after": bench::loadavg(),
                "date": bench::utc_now(),
            }))?,
        )?;
    }
    bench::report::render(&out)?;
    println!("report: {}", out.join("REPORT.md").display());
    Ok(())
}

/// Waits (up to `limit`) for the machine to go quiet; runs anyway after, the report says so.
fn wait_quiet(limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit && bench::load1() >= 0.8 {
        std::thread::sleep(Duration::from_secs(10));
    }
}
