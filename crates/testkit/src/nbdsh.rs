//! Short nbdsh runs: a Python script against an export, for tests that drive data
//! through NBD with a client nobody on the team wrote (libnbd).

use crate::{describe, tool, Running};
use std::time::Duration;

/// How long one nbdsh run may take before the test fails.
const NBDSH_TIMEOUT: Duration = Duration::from_secs(300);

/// Starts a Python `script` in nbdsh connected to `url` (the libnbd handle is `h`),
/// without waiting for it.
pub fn nbdsh_spawn(url: &str, script: &str) -> Running {
    let mut cmd = tool("nbdsh");
    cmd.args(["-u", url, "-c", script]);
    Running::spawn(cmd)
}

/// Runs a Python `script` in nbdsh connected to `url` to completion and returns its
/// stdout; fails the test if nbdsh fails (`what` names the run).
pub fn nbdsh(url: &str, script: &str, what: &str) -> String {
    let out = nbdsh_spawn(url, script).wait(NBDSH_TIMEOUT);
    assert!(
        out.status.success(),
        "nbdsh {what} on {url} failed\n{}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The sha256 of `len` bytes at `offset` of the export at `url`, read with nbdsh in
/// 4 MiB requests.
pub fn nbd_sha256(url: &str, offset: u64, len: u64) -> String {
    let script = format!(
        "import hashlib\n\
         s = hashlib.sha256()\n\
         off, end = {offset}, {end}\n\
         while off < end:\n\
         \x20   n = min(4 << 20, end - off)\n\
         \x20   s.update(h.pread(n, off))\n\
         \x20   off += n\n\
         print(s.hexdigest())\n",
        end = offset + len
    );
    let out = nbdsh(url, &script, "sha256");
    out.lines().last().unwrap_or_default().trim().to_string()
}
