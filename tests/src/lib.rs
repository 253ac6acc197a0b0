//! Helpers for idgate's privileged suites: packet building, program runs through
//! BPF_PROG_TEST_RUN, network namespaces that clean up after themselves, and an independent
//! OpenID provider to hold the token verifier to.

pub mod bench;
pub mod binary;
pub mod daemon;
pub mod fixture;
pub mod idp;
pub mod netns;
pub mod oidc;
pub mod oracle;
pub mod packet;
pub mod run;
