//! `dog`: the Sheepdog admin CLI. Talks the peer protocol to one sheep (`-a HOST:PORT`).

mod cmd_cluster;
mod cmd_node;
mod cmd_vdi;
mod conn;
mod local;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "dog",
    version,
    about = "Sheepdog admin CLI",
    propagate_version = true
)]
struct Cli {
    /// Address of the sheep to talk to.
    #[arg(
        short = 'a',
        long = "address",
        global = true,
        default_value = "127.0.0.1:7000"
    )]
    address: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Cluster-wide operations: format, info, shutdown.
    #[command(subcommand)]
    Cluster(cmd_cluster::ClusterCmd),
    /// Node operations: list, info.
    #[command(subcommand)]
    Node(cmd_node::NodeCmd),
    /// Virtual disk operations.
    #[command(subcommand)]
    Vdi(cmd_vdi::VdiCmd),
    /// A whole cluster on this host, for trying things out and for tests.
    #[command(subcommand)]
    Local(local::LocalCmd),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dog: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Cluster(c) => cmd_cluster::run(&cli.address, c).await,
            Command::Node(c) => cmd_node::run(&cli.address, c).await,
            Command::Vdi(c) => cmd_vdi::run(&cli.address, c).await,
            Command::Local(c) => local::run(c).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dog: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a value as pretty JSON (for `--json`).
pub fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
