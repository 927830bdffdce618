//! The `rewind` command line: `serve` runs the gateway; the other commands talk to one over
//! REST (`REWIND_URL`, `REWIND_TOKEN`), except `bus read`, which reads the bus directly.

mod client;
mod plugin;
mod replay;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::ServeArgs;

#[derive(Debug, Parser)]
#[command(
    name = "rewind",
    version,
    about = "Rewind: a multi-tenant event gateway — ingest, archive, search and replay events"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where the gateway is and who we are.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// Gateway URL.
    #[arg(
        long,
        env = "REWIND_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// A team token (`rw_…`), or the root token for `team create`.
    #[arg(long, env = "REWIND_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (REST + gRPC on one port).
    Serve(Box<ServeArgs>),
    /// Manage teams (root token).
    Team {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: TeamCommand,
    },
    /// Manage your team's tokens (admin scope).
    Token {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Manage your team's collections.
    Collection {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: CollectionCommand,
    },
    /// Send events to a collection: NDJSON (one JSON event per line) from files or stdin.
    Send(SendArgs),
    /// Export a collection's archived events as NDJSON, oldest first, to stdout.
    Export(ExportArgs),
    /// Search a collection's events, newest first: NDJSON events to stdout, the page's
    /// details (source, next cursor, facets) to stderr.
    Search(SearchArgs),
    /// Follow a collection: print matching events as NDJSON as they arrive, until interrupted.
    Tail(TailArgs),
    /// Write, build and upload WASM plugins (docs/plugins.md).
    Plugin {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Replay a slice of a collection's archive into a destination (docs/replays.md).
    Replay {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: replay::ReplayCommand,
    },
    /// Inspect the durable bus directly (gateway stopped, for the local bus).
    Bus {
        #[command(subcommand)]
        command: BusCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Create a plugin crate in ./NAME from a template of its kind.
    New {
        name: String,
        /// transform, destination or ingress.
        #[arg(long, default_value = "transform")]
        kind: String,
        /// The rewind-plugin-sdk to depend on (default: this repository's, else git).
        #[arg(long)]
        sdk_path: Option<std::path::PathBuf>,
    },
    /// Build the plugin crate in DIR for wasm32-wasip2 (adds the target if needed); prints
    /// the .wasm path.
    Build {
        #[arg(default_value = ".")]
        dir: std::path::PathBuf,
    },
    /// Upload a plugin (admin token): FILE, or what `build` made in --dir.
    Push {
        file: Option<std::path::PathBuf>,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        #[arg(long, default_value = ".")]
        dir: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum TeamCommand {
    /// Create a team; prints its id and first admin token (shown once). Uses REWIND_TOKEN,
    /// else REWIND_ROOT_TOKEN, else ./rewind-data/root-token.
    Create { name: String },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; the secret is printed once.
    Create {
        name: String,
        /// Scopes: admin, ingest, read, replay (repeat or comma-separate).
        #[arg(long = "scope", value_delimiter = ',', required = true)]
        scopes: Vec<String>,
    },
    /// List tokens (no secrets).
    List,
    /// Revoke a token by id; takes effect on its next request.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum CollectionCommand {
    Create {
        name: String,
        /// How long its events stay in the search index, seconds [default: the gateway's
        /// --search-window-secs].
        #[arg(long)]
        search_window_secs: Option<i64>,
    },
    /// Change how long a collection's events stay in the search index.
    SetWindow {
        /// Collection id or name.
        id: String,
        /// Seconds; omit to go back to the gateway's default.
        secs: Option<i64>,
    },
    List,
    /// Show one collection (by id or name).
    Get {
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct SendArgs {
    #[command(flatten)]
    pub remote: Remote,
    /// Collection id or name.
    pub collection: String,
    /// NDJSON files; `-` or none reads stdin.
    pub files: Vec<PathBuf>,
    /// Events per request.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Print the id of every stored event to stdout.
    #[arg(long)]
    pub print_ids: bool,
    /// How often a batch is retried after a 429 or 503 before giving up.
    #[arg(long, default_value_t = 20)]
    pub retries: u32,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub remote: Remote,
    /// Collection id or name.
    pub collection: String,
    /// Start of the range on received_at (RFC 3339), inclusive.
    #[arg(long)]
    pub from: Option<String>,
    /// End of the range (RFC 3339), exclusive.
    #[arg(long)]
    pub to: Option<String>,
    /// Only events matching this filter (docs/query.md), e.g. 'type = "login" AND amount > 5'.
    #[arg(long)]
    pub filter: Option<String>,
}

#[derive(Debug, Args)]
pub struct SearchArgs {
    #[command(flatten)]
    pub remote: Remote,
    /// Collection id or name.
    pub collection: String,
    /// Free text: every word must occur.
    #[arg(short, long)]
    pub q: Option<String>,
    /// Filter expression (docs/query.md), e.g. 'type = "account_created" AND amount > 100'.
    #[arg(long)]
    pub filter: Option<String>,
    /// Start of the range on received_at (RFC 3339), inclusive.
    #[arg(long)]
    pub from: Option<String>,
    /// End of the range (RFC 3339), exclusive.
    #[arg(long)]
    pub to: Option<String>,
    /// Events per page (at most 1000).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Continue after this cursor (printed by the previous page).
    #[arg(long)]
    pub cursor: Option<String>,
    /// Follow the cursors and print every matching event, not only the first page.
    #[arg(long)]
    pub all: bool,
    /// Print the counts of this field's values over all matches (to stderr).
    #[arg(long)]
    pub facet: Option<String>,
}

#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub remote: Remote,
    /// Collection id or name.
    pub collection: String,
    /// Free text: every word must occur.
    #[arg(short, long)]
    pub q: Option<String>,
    /// Only events matching this filter (docs/query.md).
    #[arg(long)]
    pub filter: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum BusCommand {
    /// Print the events on the bus as NDJSON, through a durable consumer, until the bus has
    /// been idle for --idle-ms. For the local bus the gateway must be stopped.
    Read(BusReadArgs),
    /// Forget a durable consumer of the local bus (its saved position), so it no longer holds
    /// back retention (docs/durability.md). The gateway must be stopped.
    Forget(BusForgetArgs),
}

#[derive(Debug, Args)]
pub struct BusForgetArgs {
    #[command(flatten)]
    pub serve: Box<ServeArgs>,
    /// The consumer's name (the file name in <data-dir>/bus/consumers/, without `.offset`).
    pub consumer: String,
}

#[derive(Debug, Args)]
pub struct BusReadArgs {
    #[command(flatten)]
    pub serve: Box<ServeArgs>,
    /// Consumer name; progress is kept per name.
    #[arg(long, default_value = "cli")]
    pub consumer: String,
    /// Acknowledge what was read (the next read with this name starts after it).
    #[arg(long)]
    pub ack: bool,
    #[arg(long, default_value_t = 1500)]
    pub idle_ms: u64,
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let config = args.resolve()?;
            crate::server::init_logging(config.log_format);
            crate::server::serve(config).await
        }
        Command::Team { remote, command } => client::team(remote, command).await,
        Command::Token { remote, command } => client::token(remote, command).await,
        Command::Collection { remote, command } => client::collection(remote, command).await,
        Command::Plugin { remote, command } => plugin::run(remote, command).await,
        Command::Replay { remote, command } => replay::run(remote, command).await,
        Command::Send(args) => client::send(args).await,
        Command::Export(args) => client::export(args).await,
        Command::Search(args) => client::search(args).await,
        Command::Tail(args) => client::tail(args).await,
        Command::Bus {
            command: BusCommand::Read(args),
        } => client::bus_read(args).await,
        Command::Bus {
            command: BusCommand::Forget(args),
        } => client::bus_forget(args),
    }
}
