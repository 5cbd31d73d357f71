//! A child process a test starts and keeps running beside it (a client tool under
//! load, a hand-started daemon), with its output collected and a deadline on the wait.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A started child process. Its stdout is passed on line by line (so a test can react
/// to progress) and collected; stderr is collected. Killed if dropped before it was
/// waited for, so a failing test leaves nothing behind.
pub struct Running {
    child: Option<Child>,
    shown: String,
    lines: mpsc::Receiver<String>,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl Running {
    /// Starts `cmd` with stdin closed and stdout and stderr collected.
    pub fn spawn(mut cmd: Command) -> Running {
        let shown = format!("{cmd:?}");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
        let out = child.stdout.take().expect("stdout is piped");
        let mut err = child.stderr.take().expect("stderr is piped");
        let (send, lines) = mpsc::channel();
        let stdout = std::thread::spawn(move || {
            let mut all = Vec::new();
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                all.extend_from_slice(line.as_bytes());
                all.push(b'\n');
                let _ = send.send(line);
            }
            all
        });
        let stderr = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = err.read_to_end(&mut buf);
            buf
        });
        Running {
            child: Some(child),
            shown,
            lines,
            stdout: Some(stdout),
            stderr: Some(stderr),
        }
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits for a stdout line containing `marker`; false if the process closed its
    /// stdout or `timeout` passed first.
    pub fn wait_for_line(&self, marker: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(marker) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }

    /// Waits for the process to exit; kills it and fails the test after `timeout`.
    pub fn wait(mut self, timeout: Duration) -> Output {
        let mut child = self.child.take().expect("waited once");
        let status =
            wait_or_kill(&mut child, &self.shown, timeout).unwrap_or_else(|e| panic!("{e}"));
        let join = |h: Option<JoinHandle<Vec<u8>>>| {
            h.map(|h| h.join().expect("output reader thread"))
                .unwrap_or_default()
        };
        Output {
            status,
            stdout: join(self.stdout.take()),
            stderr: join(self.stderr.take()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for `child` to exit, at most `timeout`; then kills it and says so (`shown`
/// names the command).
pub(crate) fn wait_or_kill(
    child: &mut Child,
    shown: &str,
    timeout: Duration,
) -> Result<std::process::ExitStatus, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{shown} did not finish within {} s; killed",
                    timeout.as_secs()
                ));
            }
            Err(e) => return Err(format!("waiting for {shown}: {e}")),
        }
    }
}
