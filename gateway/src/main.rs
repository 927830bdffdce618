//! The `rewind` binary: parses the command line and runs it.

use clap::Parser;

// mimalloc: in the ingest benchmark it doubled HTTP batch throughput over glibc's malloc and
// cut the archiver's page-fault churn (docs/benchmarks.md). Its own MIMALLOC_* variables
// apply (e.g. MIMALLOC_PURGE_DELAY=250 trades RSS for archiver CPU).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let cli = rewind_gateway::cli::Cli::parse();
    if let Err(e) = rewind_gateway::cli::run(cli).await {
        eprintln!("rewind: error: {e:#}");
        std::process::exit(1);
    }
}
