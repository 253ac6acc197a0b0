//! Helpers for idgate's privileged suites: packet building, program runs through
//! BPF_PROG_TEST_RUN, and network namespaces that clean up after themselves.

pub mod fixture;
pub mod netns;
pub mod oracle;
pub mod packet;
pub mod run;
