//! Process exit codes of the `idgate` command, defined once so scripts and units can rely on them.

/// Success.
pub const OK: i32 = 0;
/// A runtime failure not covered below.
pub const FAILURE: i32 = 1;
/// The configuration is invalid or unreadable.
pub const CONFIG: i32 = 2;
/// The agent is not running: its admin socket is missing or refuses connections.
pub const NOT_RUNNING: i32 = 3;
/// The admin socket exists but this user may not connect to it (EACCES).
pub const PERMISSION: i32 = 4;
/// The thing asked about does not exist (`whois` for an address with no session).
pub const NOT_FOUND: i32 = 5;
/// The command line itself is wrong (BSD `EX_USAGE`; clap's own 2 would collide with
/// [`CONFIG`]).
pub const USAGE: i32 = 64;
/// An input file other than the configuration (an identity, a token) is invalid or unreadable
/// (BSD `EX_DATAERR`).
pub const INPUT: i32 = 65;

/// The table above, for `idgate --help`.
pub const HELP: &str = "\
Exit codes:
  0   success
  1   failure (anything not listed below)
  2   configuration error
  3   agent not running (admin socket missing or connection refused)
  4   permission denied on the admin socket
  5   not found (e.g. whois for an address with no session)
  64  usage error (bad command line)
  65  bad input file (token, identity)";
