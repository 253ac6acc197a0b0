//! Process exit codes of the `idgate` command, defined once so scripts and units can rely on them.

/// Success.
pub const OK: i32 = 0;
/// A runtime failure not covered below.
pub const FAILURE: i32 = 1;
/// The configuration is invalid or unreadable.
pub const CONFIG: i32 = 2;
/// The command line itself is wrong (BSD `EX_USAGE`; clap's own 2 would collide with
/// [`CONFIG`]).
pub const USAGE: i32 = 64;
/// An input file other than the configuration (an identity, a token) is invalid or unreadable
/// (BSD `EX_DATAERR`).
pub const INPUT: i32 = 65;
