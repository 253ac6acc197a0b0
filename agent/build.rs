//! Builds the eBPF programs with aya-build and leaves the object in `OUT_DIR/idgate-ebpf`.
//!
//! Without bpf-linker (or with `AYA_BUILD_SKIP=1`) an empty stub object is written instead, so the
//! userspace crates build and unit-test anywhere; loading the stub fails loudly at run time.
//! `IDGATE_REQUIRE_EBPF=1` (set by `cargo xtask`) turns a missing toolchain into a build error.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

const OBJECT: &str = "idgate-ebpf";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=IDGATE_REQUIRE_EBPF");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let required = env::var("IDGATE_REQUIRE_EBPF").is_ok_and(|v| v == "1");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let have_linker = which_bpf_linker();

    if skip || !have_linker {
        if required {
            return Err(anyhow!(
                "IDGATE_REQUIRE_EBPF=1 but the eBPF build is unavailable \
                 (AYA_BUILD_SKIP={skip}, bpf-linker on PATH: {have_linker}); run `cargo xtask setup`"
            ));
        }
        println!(
            "cargo:warning=eBPF build skipped (bpf-linker on PATH: {have_linker}); \
             the agent embeds an empty stub object and cannot load programs"
        );
        fs::write(out_dir.join(OBJECT), b"").context("writing the stub eBPF object")?;
        return Ok(());
    }

    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "idgate-ebpf")
        .context("package idgate-ebpf not in the workspace")?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .context("idgate-ebpf manifest has no parent directory")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

fn which_bpf_linker() -> bool {
    env::var_os("PATH")
        .is_some_and(|paths| env::split_paths(&paths).any(|dir| dir.join("bpf-linker").is_file()))
}
