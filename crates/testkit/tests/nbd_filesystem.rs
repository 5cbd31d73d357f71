//! A real filesystem on a VDI (issue 3, item 6): nbdfuse exposes the NBD export as a
//! file, losetup turns it into a block device, and ext4 is made, filled, checked and
//! mounted again from another gateway. Every mount, loop device and FUSE mount is torn
//! down by a guard, failed tests included.

mod common;

use common::nbd::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use testkit::{describe, random_bytes, sha256_of, wait_until};

/// The name of the file nbdfuse shows in its mount directory.
const DISK_FILE: &str = "disk";

/// One VDI attached to this host as a block device (nbdfuse + losetup), and optionally
/// mounted. Dropping it unmounts, detaches the loop device, unmounts the FUSE directory
/// and stops nbdfuse, whatever state it is in.
struct AttachedDisk {
    fuse_dir: PathBuf,
    mount_dir: PathBuf,
    nbdfuse: Option<Child>,
    loop_device: Option<String>,
    mounted: bool,
}

impl AttachedDisk {
    /// Serves `url` as `<fuse_dir>/disk` with nbdfuse, then attaches it to a loop device.
    fn attach(url: &str, fuse_dir: &Path, mount_dir: &Path) -> AttachedDisk {
        std::fs::create_dir_all(fuse_dir).expect("creating the FUSE directory");
        std::fs::create_dir_all(mount_dir).expect("creating the mount directory");
        tool("fusermount3"); // needed by the guard to unmount: fail now if missing
        let pidfile = fuse_dir.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let mut cmd = tool("nbdfuse");
        cmd.arg("-P")
            .arg(&pidfile)
            .arg(fuse_dir.join(DISK_FILE))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nbdfuse: {e}"));
        let mut disk = AttachedDisk {
            fuse_dir: fuse_dir.to_owned(),
            mount_dir: mount_dir.to_owned(),
            nbdfuse: Some(child),
            loop_device: None,
            mounted: false,
        };
        let ready = wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
            pidfile.exists()
                || matches!(
                    disk.nbdfuse.as_mut().map(|c| c.try_wait()),
                    Some(Ok(Some(_)))
                )
        });
        let exited = matches!(
            disk.nbdfuse.as_mut().map(|c| c.try_wait()),
            Some(Ok(Some(_)))
        );
        assert!(
            ready && !exited,
            "nbdfuse did not come up serving {url} (exited: {exited})"
        );
        let mut losetup = tool("losetup");
        losetup
            .args(["--find", "--show"])
            .arg(fuse_dir.join(DISK_FILE));
        let out = run_ok(losetup, "losetup --find --show");
        let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            device.starts_with("/dev/loop"),
            "losetup printed {device:?}"
        );
        disk.loop_device = Some(device);
        disk
    }

    fn device(&self) -> &str {
        self.loop_device.as_deref().expect("loop device attached")
    }

    fn mount(&mut self) {
        let mut cmd = tool("mount");
        cmd.arg(self.device()).arg(&self.mount_dir);
        run_ok(cmd, "mount");
        self.mounted = true;
    }

    fn unmount(&mut self) {
        let mut cmd = tool("umount");
        cmd.arg(&self.mount_dir);
        run_ok(cmd, "umount");
        self.mounted = false;
    }

    /// Detaches the loop device and the FUSE mount; nbdfuse then exits, closing its NBD
    /// connections (the gateway then flushes and releases the VDI's lock).
    fn detach(&mut self) {
        if let Some(device) = self.loop_device.take() {
            let mut cmd = tool("losetup");
            cmd.args(["-d", &device]);
            run_ok(cmd, "losetup -d");
        }
        let mut cmd = tool("fusermount3");
        cmd.arg("-u").arg(&self.fuse_dir);
        run_ok(cmd, "fusermount3 -u");
        if let Some(mut child) = self.nbdfuse.take() {
            let exited = wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
            if !exited {
                let _ = child.kill();
                let _ = child.wait();
                panic!("nbdfuse did not exit after its FUSE directory was unmounted");
            }
        }
    }
}

impl Drop for AttachedDisk {
    fn drop(&mut self) {
        // Best effort, quietly: a test that failed half-way leaves any of these behind.
        let quiet = |mut cmd: Command| {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
            let _ = cmd.status();
        };
        if self.mounted {
            let mut cmd = Command::new("umount");
            cmd.arg(&self.mount_dir);
            quiet(cmd);
            let mut lazy = Command::new("umount");
            lazy.arg("-l").arg(&self.mount_dir);
            quiet(lazy);
        }
        if let Some(device) = self.loop_device.take() {
            let mut cmd = Command::new("losetup");
            cmd.args(["-d", &device]);
            quiet(cmd);
        }
        if let Some(mut child) = self.nbdfuse.take() {
            let mut cmd = Command::new("fusermount3");
            cmd.arg("-u").arg(&self.fuse_dir);
            quiet(cmd);
            let exited = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
            if !exited {
                let mut lazy = Command::new("fusermount3");
                lazy.arg("-uz").arg(&self.fuse_dir);
                quiet(lazy);
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// Makes a directory tree of 3 levels with files of awkward sizes (empty, one byte,
/// sub-block, multi-block, several MiB; about 30 MiB in all).
fn make_tree(root: &Path) {
    const SIZES: [usize; 8] = [0, 1, 511, 4096, 65_537, 300_000, 1_048_579, 3 * MIB + 7];
    let mut seed = 0u64;
    for a in 0..3 {
        for b in 0..3 {
            let dir = root.join(format!("dir{a}")).join(format!("sub{b}"));
            std::fs::create_dir_all(&dir).expect("creating a tree directory");
            for (k, size) in SIZES.iter().enumerate() {
                if (a + b + k) % 2 == 1 && *size > MIB {
                    continue; // keep the tree near 30 MiB
                }
                seed += 1;
                std::fs::write(dir.join(format!("file{k}.bin")), random_bytes(*size, seed))
                    .expect("writing a tree file");
            }
        }
        std::fs::create_dir_all(root.join(format!("dir{a}/empty")))
            .expect("creating an empty directory");
    }
}

/// Relative path -> sha256 of every regular file under `root`, and "<dir>" for
/// directories.
fn manifest(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        {
            let path = entry.expect("directory entry").path();
            let rel = path
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            if path.is_dir() {
                out.insert(rel, "<dir>".into());
                walk(root, &path, out);
            } else {
                let data = std::fs::read(&path)
                    .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
                out.insert(rel, sha256_of(&data));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn ext4_on_nbdfuse_loop_device_passes_fsck_and_remounts_through_another_node_with_matching_checksums(
) {
    // Item 6: mkfs.ext4 + mount over nbdfuse/losetup, copy a tree in, unmount, fsck -fn clean, mount again via node 1, checksums match.
    for name in [
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "fsck.ext4",
        "mount",
        "umount",
        "cp",
    ] {
        tool(name);
    }
    let cluster = cluster(false);
    create_vdi(&cluster, "fs", "256M", None, None);
    let dir = tempfile::tempdir().expect("temp dir");
    let source = dir.path().join("source");
    make_tree(&source);
    let expected = manifest(&source);
    let files = expected.values().filter(|v| *v != "<dir>").count();
    eprintln!(
        "phase: made a source tree of {files} files in {} entries",
        expected.len()
    );

    eprintln!("phase: nbdfuse of the VDI through node 0, losetup, mkfs.ext4, mount");
    let mut disk = AttachedDisk::attach(
        &cluster.nbd_url(0, "fs"),
        &dir.path().join("fuse0"),
        &dir.path().join("mnt"),
    );
    let mut mkfs = tool("mkfs.ext4");
    mkfs.args(["-q", "-F", disk.device()]);
    run_ok(mkfs, "mkfs.ext4");
    disk.mount();

    eprintln!("phase: copy the tree in (cp -a) and compare it while mounted");
    let target = dir.path().join("mnt/tree");
    let mut cp = tool("cp");
    cp.arg("-a").arg(&source).arg(&target);
    run_ok(cp, "cp -a");
    run_ok(tool("sync"), "sync");
    assert_eq!(
        manifest(&target),
        expected,
        "the copy differs while still mounted"
    );

    eprintln!("phase: umount, detach the loop device and nbdfuse (its connections close: the gateway flushes and unlocks)");
    disk.unmount();
    disk.detach();
    drop(disk);
    assert!(
        wait_unlocked(&cluster, "fs", Duration::from_secs(15)),
        "VDI fs still locked: {:?}",
        locks(&cluster)
    );

    eprintln!("phase: attach again through node 1 (nothing cached on this host); fsck.ext4 -fn must be clean");
    let mut disk = AttachedDisk::attach(
        &cluster.nbd_url(1, "fs"),
        &dir.path().join("fuse1"),
        &dir.path().join("mnt"),
    );
    let mut fsck = tool("fsck.ext4");
    fsck.args(["-f", "-n", disk.device()]);
    let out = run(fsck, TOOL_TIMEOUT);
    assert_eq!(
        out.status.code(),
        Some(0),
        "fsck.ext4 -fn found problems\n{}",
        describe(&out)
    );

    eprintln!("phase: mount again: every file's checksum matches the source");
    disk.mount();
    assert_eq!(
        manifest(&target),
        expected,
        "the tree read back through node 1 differs"
    );

    eprintln!("phase: clean teardown");
    disk.unmount();
    disk.detach();
}
