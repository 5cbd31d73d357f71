//! Integration test kit: starts real local clusters of `sheep` processes with the release
//! `dog` binary, drives them from the outside like a user would, and cleans up after
//! itself, failed tests included.
//!
//! Every [`LocalCluster`] gets its own temporary directory and its own free peer and NBD
//! port ranges (never 7000 or 10809, the defaults a developer's own cluster uses), so
//! tests do not collide with each other or with leftovers. Tests never skip: a missing
//! binary or external tool fails loudly ([`bin`], [`require_tool`]).

mod cluster;
mod nbdsh;
mod process;

pub use cluster::{ClusterOpts, LocalCluster};
pub use nbdsh::{nbd_sha256, nbdsh, nbdsh_spawn};
pub use process::Running;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long one `dog` command may run before the test fails (64 MiB transfers included).
pub const DOG_TIMEOUT: Duration = Duration::from_secs(120);

/// The release binary `name` (`sheep`, `dog`), from `<workspace>/target/release` or from
/// `$SHEEPDOG_BIN_DIR`. Panics if it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("SHEEPDOG_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release"),
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "binary {} is missing: run `cargo build --release --bins` first (or set SHEEPDOG_BIN_DIR)",
        path.display()
    );
    path
}

/// The path of external tool `name` (qemu-io, nbdinfo, fio, ...) on PATH. Panics if it
/// is not installed: a test that needs it must fail, never silently skip.
pub fn require_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("required tool `{name}` is not installed (not on PATH); install it, tests do not skip"))
}

/// The sha256 of `bytes` in lowercase hex.
pub fn sha256_of(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `len` pseudo-random bytes, the same for the same `seed`.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

/// Writes `bytes` pseudo-random bytes (from `seed`) to `path`; returns their sha256.
pub fn random_file(path: &Path, bytes: usize, seed: u64) -> String {
    let data = random_bytes(bytes, seed);
    std::fs::write(path, &data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    sha256_of(&data)
}

/// Calls `f` every `poll` until it returns true or `timeout` has passed; returns whether
/// it ever returned true.
pub fn wait_until(timeout: Duration, poll: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(poll);
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on (just bound and released).
pub fn unused_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral port");
    listener
        .local_addr()
        .expect("local address of a bound socket")
        .port()
}

/// Status, stderr and the start of stdout of a finished command, for assertion messages.
pub fn describe(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let shown: String = stdout.chars().take(2000).collect();
    format!(
        "status: {}\nstderr: {}\nstdout: {shown}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts that a command failed (non-zero exit, no panic) and that its stderr names the
/// cause: it contains every one of `words`, ignoring case. Returns the stderr.
pub fn assert_fails_with(out: &Output, words: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "command succeeded but should have failed\n{}",
        describe(out)
    );
    assert!(
        out.status.code().is_some(),
        "command died from a signal\n{}",
        describe(out)
    );
    assert!(
        !stderr.contains("panicked"),
        "command panicked\n{}",
        describe(out)
    );
    let lower = stderr.to_lowercase();
    for word in words {
        assert!(
            lower.contains(&word.to_lowercase()),
            "error message does not mention {word:?}\n{}",
            describe(out)
        );
    }
    stderr
}

/// PATH with /usr/bin and /usr/sbin first: nbdsh must run under the system python3 (the
/// one with libnbd), not another python earlier on PATH.
pub fn tool_path() -> std::ffi::OsString {
    let rest = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")];
    dirs.extend(std::env::split_paths(&rest));
    std::env::join_paths(dirs).expect("PATH entries are joinable")
}

/// A command for external tool `name`, run with [`tool_path`]; fails the test loudly
/// (through [`require_tool`]) if it is not installed.
pub fn tool(name: &str) -> Command {
    let path = tool_path();
    let program = std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| require_tool(name));
    let mut cmd = Command::new(program);
    cmd.env("PATH", path);
    cmd
}

/// Runs `cmd` to completion with `input` on stdin (closed when `None`), collecting its
/// output; kills it after `timeout`. The one command runner of the test kit.
pub fn run_command(
    mut cmd: Command,
    input: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, String> {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {shown}: {e}"))?;
    let stdin = child.stdin.take();
    let mut stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let mut stderr = child.stderr.take().ok_or("no stderr pipe")?;
    std::thread::scope(|scope| {
        if let (Some(mut pipe), Some(data)) = (stdin, input) {
            // A command that stops reading early closes the pipe: not an error here.
            scope.spawn(move || drop(pipe.write_all(data)));
        }
        let out = scope.spawn(move || read_all(&mut stdout));
        let err = scope.spawn(move || read_all(&mut stderr));
        let status = process::wait_or_kill(&mut child, &shown, timeout)?;
        let stdout = out.join().map_err(|_| "stdout reader panicked")?;
        let stderr = err.join().map_err(|_| "stderr reader panicked")?;
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    })
}

fn read_all(pipe: &mut impl Read) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = pipe.read_to_end(&mut buf);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_file_is_deterministic_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let a = random_file(&dir.path().join("a"), 10_000, 7);
        let b = random_file(&dir.path().join("b"), 10_000, 7);
        assert_eq!(a, b);
        assert_eq!(a, sha256_of(&std::fs::read(dir.path().join("a")).unwrap()));
        assert_ne!(a, sha256_of(&random_bytes(10_000, 8)));
    }

    #[test]
    fn wait_until_reports_timeout_and_success() {
        assert!(!wait_until(
            Duration::from_millis(50),
            Duration::from_millis(10),
            || false
        ));
        let mut calls = 0;
        assert!(wait_until(
            Duration::from_secs(1),
            Duration::from_millis(1),
            || {
                calls += 1;
                calls == 3
            }
        ));
    }

    #[test]
    fn commands_get_stdin_and_time_out() {
        let mut cat = Command::new("cat");
        cat.arg("-");
        let out = run_command(cat, Some(b"hello"), Duration::from_secs(10)).unwrap();
        assert_eq!(out.stdout, b"hello");
        let mut sleep = Command::new("sleep");
        sleep.arg("10");
        assert!(run_command(sleep, None, Duration::from_millis(100)).is_err());
    }
}
