//! The conformance suite run against the `local` driver, each case in its own fresh
//! temporary directory.

use async_trait::async_trait;
use cluster::conformance::{run_all, TestCluster};
use cluster::LocalDriver;
use tempfile::TempDir;

/// A fresh local cluster: a temporary shared directory, removed when the case ends.
struct LocalCluster {
    dir: TempDir,
}

#[async_trait]
impl TestCluster for LocalCluster {
    type Driver = LocalDriver;

    async fn handle(&self) -> LocalDriver {
        LocalDriver::open(self.dir.path()).expect("open local cluster")
    }
}

/// Every conformance case passes on the local driver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_driver_passes_conformance_suite() {
    run_all(|| async {
        LocalCluster {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    })
    .await;
}
