//! Empty on purpose: the programs are in the `idgate-ebpf` binary. This library target lets the
//! agent name the crate as a build-dependency, so cargo rebuilds the agent when it changes.
#![no_std]
