//! The `rewind` binary: parses the command line and runs it.

use clap::Parser;

rewind_gateway::use_jemalloc!();

#[tokio::main]
async fn main() {
    let cli = rewind_gateway::cli::Cli::parse();
    if let Err(e) = rewind_gateway::cli::run(cli).await {
        eprintln!("rewind: error: {e:#}");
        std::process::exit(1);
    }
}
