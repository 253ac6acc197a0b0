use idgate_tests::{packet::Spec, run::*};

#[test]
fn loads_and_runs() {
    let dp = load();
    let p = Spec::syn("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap(), 8000).build();
    let r = run(&dp, Hook::Xdp, &p).unwrap();
    assert_eq!(r.outcome, Outcome::Pass);
    let r = run(&dp, Hook::Tc, &p).unwrap();
    assert_eq!(r.outcome, Outcome::Pass);
}
