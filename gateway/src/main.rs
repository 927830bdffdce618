//! The `rewind` binary: parses the command line and runs it.

use clap::Parser;

// mimalloc: less page-fault churn than glibc's malloc under the archiver's large, short-lived
// buffers, and a flatter RSS.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    rewind_gateway::tune_allocator();
    let cli = rewind_gateway::cli::Cli::parse();
    if let Err(e) = rewind_gateway::cli::run(cli).await {
        eprintln!("rewind: error: {e:#}");
        std::process::exit(1);
    }
}
