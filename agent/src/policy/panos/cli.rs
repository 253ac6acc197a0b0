//! The `idgate policy import-panos` command: reads the files, runs the import, writes the policy
//! and the report, and chooses the exit code.

use std::{net::IpAddr, path::PathBuf};

use super::{Import, ImportError, Mapping, Status};
use crate::{
    config::{self, Config, LoadError},
    exit,
};

/// The report's format.
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum ReportFormat {
    /// A readable list, one PAN-OS rule after another.
    #[default]
    Text,
    /// JSON, for scripts.
    Json,
}

/// Arguments of `idgate policy import-panos`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// The exported PAN-OS configuration (XML: a firewall's or Panorama's).
    pub panos_config: PathBuf,
    /// The mapping file (TOML): PAN-OS users, groups and applications to their idgate meaning,
    /// the vsys or device group to read, this host's addresses.
    #[arg(long)]
    pub mapping: PathBuf,
    /// The idgate configuration: its services are what is protected here.
    #[arg(long, default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// An address of this host (repeatable); replaces the mapping's host_addresses.
    #[arg(long = "host-address")]
    pub host_addresses: Vec<IpAddr>,
    /// Where to write the [policy] section [default: standard output].
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Where to write the translation report [default: standard error].
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// The report's format.
    #[arg(long, value_enum, default_value_t)]
    pub report_format: ReportFormat,
    /// Write the policy even though some rules were refused or withheld (it then allows nothing
    /// PAN-OS denied, but less than PAN-OS allowed). Without it, such an import writes no policy
    /// and exits 1.
    #[arg(long)]
    pub allow_partial: bool,
}

/// Runs the command; returns the process exit code.
pub fn run(args: &Args) -> i32 {
    let config = match Config::load(&args.config) {
        Ok((c, _)) => c,
        Err(e @ LoadError::Read { .. }) => {
            eprintln!("error: {e}");
            return exit::CONFIG;
        }
        Err(LoadError::Invalid { path, errors }) => {
            eprintln!("error: {}: {errors}", path.display());
            return exit::CONFIG;
        }
    };
    let mapping = match Mapping::load(&args.mapping) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::INPUT;
        }
    };
    let xml = match std::fs::read_to_string(&args.panos_config) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: reading {}: {e}", args.panos_config.display());
            return exit::INPUT;
        }
    };
    let import = match super::import(&xml, &mapping, &config, &args.host_addresses) {
        Ok(i) => i,
        Err(e @ ImportError::NoHostAddress) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
        Err(e @ ImportError::SelfCheck(_)) => {
            eprintln!("error: {e}");
            return exit::FAILURE;
        }
        Err(e) => {
            eprintln!("error: {}: {e}", args.panos_config.display());
            return exit::INPUT;
        }
    };
    if let Err(e) = write_report(args, &import) {
        eprintln!("error: {e}");
        return exit::FAILURE;
    }
    let report = &import.report;
    if !report.is_complete() && !args.allow_partial {
        eprintln!(
            "error: {} PAN-OS rule(s) refused and {} withheld (see the report); no policy written. \
             Fix the mapping, or pass --allow-partial to write the partial policy, which allows \
             nothing PAN-OS denied",
            report.count(Status::Refused),
            report.count(Status::Withheld)
        );
        return exit::FAILURE;
    }
    let policy = import.policy_toml();
    let written = match &args.output {
        Some(path) => {
            std::fs::write(path, &policy).map_err(|e| format!("writing {}: {e}", path.display()))
        }
        None => {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            match out.write_all(policy.as_bytes()).and_then(|()| out.flush()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    Err(format!("writing the policy: {e}"))
                }
                _ => Ok(()),
            }
        }
    };
    if let Err(e) = written {
        eprintln!("error: {e}");
        return exit::FAILURE;
    }
    if !report.is_complete() {
        eprintln!(
            "warning: partial policy written: {} PAN-OS rule(s) refused and {} withheld",
            report.count(Status::Refused),
            report.count(Status::Withheld)
        );
    }
    exit::OK
}

fn write_report(args: &Args, import: &Import) -> Result<(), String> {
    let text = match args.report_format {
        ReportFormat::Text => import.report.to_string(),
        ReportFormat::Json => {
            serde_json::to_string_pretty(&import.report)
                .map_err(|e| format!("encoding the report: {e}"))?
                + "\n"
        }
    };
    match &args.report {
        Some(path) => {
            std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
        }
        None => {
            eprint!("{text}");
            Ok(())
        }
    }
}
