//! Helpers for idgate's privileged suites: packet building, program runs through
//! BPF_PROG_TEST_RUN, and network namespaces that clean up after themselves.

pub mod packet;
pub mod run;
