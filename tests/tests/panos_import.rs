//! `idgate policy import-panos` on the fixtures in `tests/assets/panos/`:
//!
//! - an independent check of the fixtures' format: `generate.py` renders the same objects and
//!   rules with pan-os-python (the venv `cargo xtask setup` makes), and both documents must
//!   translate identically;
//! - the real `idgate` binary: the policy, the report and the exit codes, and `check-config` and
//!   `policy explain` on a configuration holding the imported policy.
//!
//! Needs no root. The binary is `target/<profile>/idgate` next to this test's executable
//! (`cargo test --workspace` builds it).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, ensure};
use idgate::{
    config::Config,
    policy::panos::{Import, Mapping, Status, import},
};
use serde_json::Value;

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/panos")
}

fn asset(name: &str) -> PathBuf {
    assets().join(name)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A scratch directory, removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("idgate-panos-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a scratch directory");
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

use idgate_tests::binary::{idgate, show};

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// The fixtures' idgate configuration with its [policy] replaced by `policy`.
fn with_policy(policy: &str) -> String {
    let text = read(&asset("idgate.toml"));
    let at = text
        .find("\n[policy]")
        .expect("idgate.toml ends with [policy]");
    format!("{}\n{policy}", &text[..at])
}

fn translate(xml: &Path, mapping: &str) -> Result<Import> {
    let (config, _) = Config::parse(&read(&asset("idgate.toml")))?;
    let mapping = Mapping::parse(&read(&asset(mapping)))?;
    Ok(import(&read(xml), &mapping, &config, &[])?)
}

#[test]
fn pan_os_python_renders_configurations_that_translate_like_the_fixtures() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace root")?;
    let python = root.join("target/venv/bin/python");
    ensure!(
        python.is_file(),
        "{} is missing: run `cargo xtask setup`, which creates the venv with pan-os-python",
        python.display()
    );
    let out = Scratch::new("generated");
    let run = Command::new(&python)
        .arg(asset("generate.py"))
        .arg(&out.0)
        .output()
        .context("running generate.py")?;
    ensure!(run.status.success(), "generate.py failed: {}", show(&run));

    for (xml, mapping, rules) in [
        ("firewall.xml", "mapping.toml", 14),
        ("panorama.xml", "panorama-mapping.toml", 4),
    ] {
        let hand = translate(&asset(xml), mapping)?;
        let generated = translate(&out.path(xml), mapping)?;
        assert_eq!(hand.report.rules.len(), rules, "{xml}: the fixture's rules");
        // Same rules, same resolved networks, services, matchers and actions, same report.
        assert_eq!(
            generated.rules, hand.rules,
            "{xml}: the idgate rules differ"
        );
        assert_eq!(generated.report, hand.report, "{xml}: the reports differ");
        assert_eq!(generated.policy_toml(), hand.policy_toml());
    }
    Ok(())
}

#[test]
fn a_partial_import_writes_nothing_unless_allowed_and_the_result_is_enforced() -> Result<()> {
    let dir = Scratch::new("cli");
    let (policy, report) = (dir.path("policy.toml"), dir.path("report.txt"));
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "policy",
            "import-panos",
            s(&asset("firewall.xml")),
            "--mapping",
            s(&asset("mapping.toml")),
            "--config",
            s(&asset("idgate.toml")),
            "--output",
            s(&policy),
            "--report",
            s(&report),
        ]
        .map(str::to_owned)
        .to_vec();
        v.extend(extra.iter().map(|x| (*x).to_owned()));
        v
    };

    // Refused rules: exit 1, the report says why, no policy written.
    let o = idgate(&strs(&args(&[])));
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(!policy.exists(), "a refused import wrote a policy");
    let text = read(&report);
    assert!(
        text.contains("#12 \"No unknown users\" (vsys1 rulebase, action deny): REFUSED"),
        "{text}"
    );
    assert!(
        text.contains("#14 \"Late LB\" (vsys1 rulebase, action allow): WITHHELD"),
        "{text}"
    );
    assert!(
        text.contains("#8 \"Database\" (vsys1 rulebase, action allow): skipped"),
        "{text}"
    );
    assert!(
        text.contains("summary: 14 rules: 9 translated, 2 skipped, 2 refused, 1 withheld"),
        "{text}"
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("--allow-partial"));

    // --allow-partial: the policy is written, and idgate takes it.
    let o = idgate(&strs(&args(&["--allow-partial"])));
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let imported = read(&policy);
    assert!(imported.contains("# PARTIAL"), "{imported}");
    assert!(
        !imported.contains("Late-LB"),
        "a withheld rule was written:\n{imported}"
    );
    let config = dir.path("idgate.toml");
    std::fs::write(&config, with_policy(&imported))?;
    let o = idgate(&["check-config", "--config", s(&config)]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("configuration OK"));

    // A member of cn=api-users reaches the API by "API users"; a contractor gets a reset.
    for (groups, rule, action) in [
        (r#"["api-users"]"#, "API-users", "allow"),
        (r#"["contractors"]"#, "Contractors-out", "reset"),
    ] {
        let identity = dir.path("identity.json");
        std::fs::write(
            &identity,
            format!(r#"{{"issuer": "https://idp.example.com", "user": "u", "groups": {groups}}}"#),
        )?;
        let o = idgate(&[
            "policy",
            "explain",
            "--config",
            s(&config),
            "--identity",
            s(&identity),
            "--source",
            "10.9.9.9",
            "--output",
            "json",
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", show(&o));
        let v: Value = serde_json::from_slice(&o.stdout)?;
        let api = v["services"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["decision"]["service"] == "api"))
            .with_context(|| format!("no api service in {v}"))?;
        assert_eq!(api["decision"]["action"], action, "{v}");
        assert_eq!(api["decision"]["rule"]["name"], rule, "{v}");
    }
    Ok(())
}

#[test]
fn a_complete_import_goes_to_stdout_with_a_json_report() -> Result<()> {
    let o = idgate(&[
        "policy",
        "import-panos",
        s(&asset("panorama.xml")),
        "--mapping",
        s(&asset("panorama-mapping.toml")),
        "--config",
        s(&asset("idgate.toml")),
        "--report-format",
        "json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let policy = String::from_utf8(o.stdout.clone())?;
    let (config, _) = Config::parse(&with_policy(&policy)).map_err(|e| anyhow::anyhow!("{e}"))?;
    let names: Vec<&str> = config
        .policy
        .rules
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "shared-pre-scanners",
            "dg-pre-admins",
            "dg-post-users",
            "shared-post-deny"
        ]
    );
    let report: Value = serde_json::from_slice(&o.stderr)?;
    let statuses: Vec<&str> = report["rules"]
        .as_array()
        .context("rules")?
        .iter()
        .filter_map(|r| r["status"].as_str())
        .collect();
    assert_eq!(statuses, ["translated"; 4]);
    assert_eq!(report["source"], "Panorama, device group dc-east");
    // Status is the library's word for the same thing.
    assert_eq!(
        serde_json::to_value(Status::Translated)?,
        Value::from("translated")
    );
    Ok(())
}

#[test]
fn bad_inputs_exit_with_distinct_codes_and_write_nothing() -> Result<()> {
    let dir = Scratch::new("bad");
    let policy = dir.path("policy.toml");
    let broken = dir.path("broken.xml");
    std::fs::write(&broken, "<config><devices>")?;
    let bad_mapping = dir.path("bad-mapping.toml");
    std::fs::write(&bad_mapping, "[users]\nalice = 3\n")?;
    let no_hosts = dir.path("no-hosts.toml");
    std::fs::write(&no_hosts, "vsys = \"vsys1\"\n")?;
    let bad_config = dir.path("idgate.toml");
    std::fs::write(&bad_config, "[dataplane]\n")?;
    let fw = asset("firewall.xml");
    let mapping = asset("mapping.toml");
    let config = asset("idgate.toml");
    for (xml, mapping, config, code, says) in [
        (&broken, &mapping, &config, 65, "not well-formed XML"),
        (&fw, &bad_mapping, &config, 65, "mapping"),
        (&fw, &no_hosts, &config, 64, "no host address"),
        (&fw, &mapping, &bad_config, 2, "configuration error"),
    ] {
        let o = idgate(&[
            "policy",
            "import-panos",
            s(xml),
            "--mapping",
            s(mapping),
            "--config",
            s(config),
            "--output",
            s(&policy),
            "--allow-partial",
        ]);
        assert_eq!(o.status.code(), Some(code), "{}", show(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(says),
            "{}",
            show(&o)
        );
        assert!(!policy.exists());
    }
    Ok(())
}
