//! What the tests that run the `idgate` binary as a child process share.

use std::{process::Child, time::Duration};

/// The binary under test.
pub const IDGATE: &str = env!("CARGO_BIN_EXE_idgate");
/// How long the process may take to start or stop.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Kills the child when the test ends, however it ends.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
