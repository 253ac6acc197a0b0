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

/// Watches the child's stdout (which must be piped) for `READY <issuer>` lines, as `idgate dev-idp`
/// prints them; the issuers arrive on the returned channel.
pub fn ready_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead as _;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(issuer) = line.strip_prefix("READY ") {
                let _ = tx.send(issuer.to_owned());
            }
        }
    });
    rx
}
