//! The gateway's configuration: one typed struct built in three steps, as Vector does.
//! 1. [`ServeArgs`]: flags, each with a `REWIND_*` env twin (clap merges the two, flag first);
//! 2. [`FileConfig`]: the optional TOML file (`--config`), filling whatever flags and env left
//!    unset; unknown keys are an error naming the key;
//! 3. [`ServeArgs::resolve`] validates the merge into [`Config`], or fails naming the setting.
//!
//! A bad setting fails at start, never at the first event.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

/// Flags of `rewind serve`. Every one has an env twin and a config-file key of the same name
/// (with `_` for `-`). Defaults are applied in [`ServeArgs::resolve`], after the file.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML config file; its keys are the flag names with '_' (e.g. data_dir = "/var/lib/rewind").
    #[arg(long, env = "REWIND_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address for REST and gRPC (one port) [default: 127.0.0.1:8080].
    #[arg(long, env = "REWIND_LISTEN")]
    pub listen: Option<String>,
    /// Where the local bus, SQLite metastore and local archive live [default: ./rewind-data].
    #[arg(long, env = "REWIND_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Durable bus: `local` (a log in the data dir) or `nats://host:port` [default: local].
    #[arg(long, env = "REWIND_BUS")]
    pub bus: Option<String>,
    /// Metastore: `sqlite` (a file in the data dir), `sqlite:///path/file.db` or
    /// `postgres://user@host/db` [default: sqlite].
    #[arg(long, env = "REWIND_METASTORE")]
    pub metastore: Option<String>,
    /// Archive root: a local directory or `s3://bucket/prefix` [default: <data-dir>/archive].
    /// Read by the archiver.
    #[arg(long, env = "REWIND_ARCHIVE")]
    pub archive: Option<String>,
    /// Search backend: `embedded` or `http(s)://meilisearch:7700` [default: embedded].
    #[arg(long, env = "REWIND_SEARCH")]
    pub search: Option<String>,
    /// Meilisearch API key (the master key or a key with access to `rewind-*` indexes).
    #[arg(long, env = "REWIND_MEILI_KEY", hide_env_values = true)]
    pub meili_key: Option<String>,
    /// How long events stay in the search index, seconds; a collection can set its own
    /// (`search_window_secs`). Older ranges are read from the archive [default: 604800 (7 days)].
    #[arg(long, env = "REWIND_SEARCH_WINDOW_SECS")]
    pub search_window_secs: Option<u64>,
    /// Memory the embedded index may buffer before writing a segment, bytes [default: 67108864].
    #[arg(long, env = "REWIND_SEARCH_MEMORY_BYTES")]
    pub search_memory_bytes: Option<usize>,
    /// Longest an event waits before it is written to a Parquet file, seconds [default: 60].
    #[arg(long, env = "REWIND_ARCHIVE_FLUSH_SECS")]
    pub archive_flush_secs: Option<u64>,
    /// Payload bytes a collection's archive buffer collects before it is written [default: 16777216].
    #[arg(long, env = "REWIND_ARCHIVE_TARGET_BYTES")]
    pub archive_target_bytes: Option<usize>,
    /// Most payload bytes the archiver holds in memory across collections; above it, it stops
    /// reading the bus until a write succeeds [default: 67108864].
    #[arg(long, env = "REWIND_ARCHIVE_MAX_BUFFERED_BYTES")]
    pub archive_max_buffered_bytes: Option<usize>,
    /// How often compaction merges small Parquet files of an hour partition, seconds; files
    /// younger than this are left alone; 0 turns compaction off [default: 300].
    #[arg(long, env = "REWIND_ARCHIVE_COMPACT_SECS")]
    pub archive_compact_secs: Option<u64>,
    /// Size compaction grows Parquet files toward, bytes [default: 134217728].
    #[arg(long, env = "REWIND_ARCHIVE_FILE_TARGET_BYTES")]
    pub archive_file_target_bytes: Option<u64>,
    /// Let destination plugins reach loopback and private addresses (local setups, tests).
    #[arg(long, env = "REWIND_ALLOW_PRIVATE_DESTINATIONS", num_args = 0..=1, default_missing_value = "true")]
    pub allow_private_destinations: Option<bool>,
    /// Replays of one team that run at once; more wait as `pending` [default: 4].
    #[arg(long, env = "REWIND_REPLAY_MAX_RUNNING")]
    pub replay_max_running: Option<u32>,
    /// Events per second all of a team's replays together may deliver (the team's replay
    /// quota); 0 for no cap [default: 100000].
    #[arg(long, env = "REWIND_REPLAY_TEAM_RATE")]
    pub replay_team_rate: Option<u32>,
    /// Requests per second a team may make to the replay API (429 + Retry-After above it);
    /// bursts of twice that pass [default: 20].
    #[arg(long, env = "REWIND_REPLAY_API_RATE")]
    pub replay_api_rate: Option<u32>,
    /// Largest single event, bytes [default: 1048576].
    #[arg(long, env = "REWIND_MAX_EVENT_BYTES")]
    pub max_event_bytes: Option<usize>,
    /// Largest request body (REST) or message (gRPC decode limit), bytes [default: 33554432].
    #[arg(long, env = "REWIND_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<usize>,
    /// Most events in one request [default: 10000].
    #[arg(long, env = "REWIND_MAX_BATCH_EVENTS")]
    pub max_batch_events: Option<usize>,
    /// Most ingest bytes in flight (read, parsed, waiting for the bus) across all requests;
    /// beyond it requests wait up to 2 s, then get 503 + Retry-After [default: 33554432].
    #[arg(long, env = "REWIND_MAX_INFLIGHT_BYTES")]
    pub max_inflight_bytes: Option<usize>,
    /// Events per second each token may send; 0 turns the limit off [default: 100000].
    #[arg(long, env = "REWIND_RATE_LIMIT_EVENTS_PER_SEC")]
    pub rate_limit_events_per_sec: Option<u32>,
    /// Burst allowance of the per-token limit, events [default: the per-second rate].
    #[arg(long, env = "REWIND_RATE_LIMIT_BURST")]
    pub rate_limit_burst: Option<u32>,
    /// Most tokens the rate limiter tracks at once; beyond it the idlest are forgotten
    /// [default: 100000].
    #[arg(long, env = "REWIND_RATE_LIMIT_MAX_KEYS")]
    pub rate_limit_max_keys: Option<usize>,
    /// A top-level JSON field whose string value is the event's client id (idempotency key),
    /// e.g. `event_id`. Unset: only the `Idempotency-Key` header sets client ids.
    #[arg(long, env = "REWIND_ID_FIELD")]
    pub id_field: Option<String>,
    /// How long client ids are remembered for deduplication, seconds [default: 86400].
    #[arg(long, env = "REWIND_DEDUPE_WINDOW_SECS")]
    pub dedupe_window_secs: Option<u64>,
    /// Local bus: segments every consumer has passed are deleted once they are this old,
    /// seconds. Shorter than the de-duplication window, a retry sent across a restart may no
    /// longer be recognised (client ids are rebuilt from the log) [default: that window].
    #[arg(long, env = "REWIND_BUS_RETENTION_SECS")]
    pub bus_retention_secs: Option<u64>,
    /// Local bus: size at which a log segment is closed and a new one started, bytes
    /// [default: 134217728].
    #[arg(long, env = "REWIND_BUS_SEGMENT_BYTES")]
    pub bus_segment_bytes: Option<u64>,
    /// Local bus: write the log with direct I/O (`O_DIRECT`, Linux) where the file system
    /// allows it, keeping the copy into the page cache off the acknowledgement path; `false`:
    /// buffered writes [default: true].
    #[arg(long, env = "REWIND_BUS_DIRECT_IO")]
    pub bus_direct_io: Option<bool>,
    /// Most client ids remembered for deduplication [default: 1000000].
    #[arg(long, env = "REWIND_DEDUPE_MAX_KEYS")]
    pub dedupe_max_keys: Option<usize>,
    /// Log format: `text` or `json` [default: text].
    #[arg(long, env = "REWIND_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Seconds to let in-flight requests finish after SIGTERM [default: 30].
    #[arg(long, env = "REWIND_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
}

/// The `--config` file. Keys are the flag names with `_`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub bus: Option<String>,
    pub metastore: Option<String>,
    pub archive: Option<String>,
    pub search: Option<String>,
    pub meili_key: Option<String>,
    pub search_window_secs: Option<u64>,
    pub search_memory_bytes: Option<usize>,
    pub archive_flush_secs: Option<u64>,
    pub allow_private_destinations: Option<bool>,
    pub replay_max_running: Option<u32>,
    pub replay_team_rate: Option<u32>,
    pub replay_api_rate: Option<u32>,
    pub archive_target_bytes: Option<usize>,
    pub archive_max_buffered_bytes: Option<usize>,
    pub archive_compact_secs: Option<u64>,
    pub archive_file_target_bytes: Option<u64>,
    pub max_event_bytes: Option<usize>,
    pub max_request_bytes: Option<usize>,
    pub max_batch_events: Option<usize>,
    pub max_inflight_bytes: Option<usize>,
    pub rate_limit_events_per_sec: Option<u32>,
    pub rate_limit_burst: Option<u32>,
    pub rate_limit_max_keys: Option<usize>,
    pub id_field: Option<String>,
    pub dedupe_window_secs: Option<u64>,
    pub bus_retention_secs: Option<u64>,
    pub bus_segment_bytes: Option<u64>,
    pub bus_direct_io: Option<bool>,
    pub dedupe_max_keys: Option<usize>,
    pub log_format: Option<String>,
    pub shutdown_grace_secs: Option<u64>,
    pub root_token: Option<String>,
}

/// Where events are made durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusConfig {
    /// The append-only log under `<data-dir>/bus`.
    Local,
    /// NATS JetStream at this URL.
    Nats { url: String },
}

/// Where teams, tokens and collections are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetastoreConfig {
    Sqlite { path: PathBuf },
    Postgres { url: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Ingest limits, all in one place so REST and gRPC enforce the same ones.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_event_bytes: usize,
    pub max_request_bytes: usize,
    pub max_batch_events: usize,
    /// Ingest bytes in flight across requests (admission control).
    pub max_inflight_bytes: usize,
}

/// The per-token rate limit; `events_per_sec == 0` means off.
#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    pub events_per_sec: u32,
    pub burst: u32,
    pub max_keys: usize,
}

/// The validated configuration the server is built from.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub bus: BusConfig,
    pub metastore: MetastoreConfig,
    pub archive: String,
    pub search: String,
    pub meili_key: Option<String>,
    /// Default hot window of the search index.
    pub search_window: Duration,
    pub search_memory_bytes: usize,
    pub archive_flush: Duration,
    pub archive_target_bytes: usize,
    pub archive_max_buffered_bytes: usize,
    /// Compaction interval (also the least age of a file it merges); `None` when off.
    pub archive_compact: Option<Duration>,
    pub archive_file_target_bytes: u64,
    pub allow_private_destinations: bool,
    pub replay: crate::replay::ReplayOptions,
    pub limits: Limits,
    pub rate_limit: RateLimitConfig,
    pub id_field: Option<String>,
    pub dedupe_window: Duration,
    /// Local bus retention of consumed segments.
    pub bus_retention: Duration,
    /// Local bus segment size.
    pub bus_segment_bytes: u64,
    /// Local bus direct I/O (see `--bus-direct-io`).
    pub bus_direct_io: bool,
    pub dedupe_max_keys: usize,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
    /// From `REWIND_ROOT_TOKEN` or the file; `None` means "use or create `<data-dir>/root-token`".
    pub root_token: Option<String>,
}

/// A setting that cannot be used, with the setting's name and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("invalid setting `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

impl ServeArgs {
    /// Merges flags/env with the config file and validates the result.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        let root_token = std::env::var("REWIND_ROOT_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or(file.root_token.clone());
        let pick = |a: &Option<String>, b: &Option<String>| a.clone().or_else(|| b.clone());

        let listen_raw =
            pick(&self.listen, &file.listen).unwrap_or_else(|| "127.0.0.1:8080".into());
        let listen: SocketAddr = listen_raw.parse().map_err(|_| {
            invalid(
                "listen",
                format!("{listen_raw:?} is not an address like 127.0.0.1:8080 or [::]:8080"),
            )
        })?;
        let data_dir = self
            .data_dir
            .clone()
            .or(file.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from("./rewind-data"));

        let bus = match pick(&self.bus, &file.bus).as_deref() {
            None | Some("local") => BusConfig::Local,
            Some(url) if url.starts_with("nats://") || url.starts_with("tls://") => {
                BusConfig::Nats { url: url.into() }
            }
            Some(other) => {
                return Err(invalid(
                    "bus",
                    format!("{other:?}: use `local` or a NATS URL such as nats://127.0.0.1:4222"),
                ));
            }
        };

        let metastore = match pick(&self.metastore, &file.metastore).as_deref() {
            None | Some("sqlite") => MetastoreConfig::Sqlite {
                path: data_dir.join("metastore.db"),
            },
            Some(url) if url.starts_with("sqlite://") => MetastoreConfig::Sqlite {
                path: PathBuf::from(&url["sqlite://".len()..]),
            },
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                MetastoreConfig::Postgres { url: url.into() }
            }
            Some(other) => {
                return Err(invalid(
                    "metastore",
                    format!(
                        "{other:?}: use `sqlite`, sqlite:///path/to/file.db or postgres://user@host/db"
                    ),
                ));
            }
        };

        let archive = pick(&self.archive, &file.archive)
            .unwrap_or_else(|| data_dir.join("archive").display().to_string());
        let search = pick(&self.search, &file.search).unwrap_or_else(|| "embedded".into());
        if search != "embedded" && !search.starts_with("http://") && !search.starts_with("https://")
        {
            return Err(invalid(
                "search",
                format!(
                    "{search:?}: use `embedded` or a Meilisearch URL such as http://127.0.0.1:7700"
                ),
            ));
        }

        let max_event_bytes = self
            .max_event_bytes
            .or(file.max_event_bytes)
            .unwrap_or(1 << 20);
        let max_request_bytes = self
            .max_request_bytes
            .or(file.max_request_bytes)
            .unwrap_or(32 << 20);
        let max_batch_events = self
            .max_batch_events
            .or(file.max_batch_events)
            .unwrap_or(10_000);
        if max_event_bytes == 0 || max_request_bytes == 0 || max_batch_events == 0 {
            return Err(invalid(
                "max_event_bytes/max_request_bytes/max_batch_events",
                "must be above 0",
            ));
        }
        if max_event_bytes > max_request_bytes {
            return Err(invalid(
                "max_event_bytes",
                format!("{max_event_bytes} is larger than max_request_bytes ({max_request_bytes})"),
            ));
        }
        // The local log frames records with a u32 length; keep well clear of it.
        if max_request_bytes > 1 << 30 {
            return Err(invalid("max_request_bytes", "must be at most 1 GiB"));
        }

        let events_per_sec = self
            .rate_limit_events_per_sec
            .or(file.rate_limit_events_per_sec)
            .unwrap_or(100_000);
        let burst = self
            .rate_limit_burst
            .or(file.rate_limit_burst)
            .unwrap_or(events_per_sec);
        if events_per_sec > 0 && burst == 0 {
            return Err(invalid(
                "rate_limit_burst",
                "must be above 0 when the rate limit is on",
            ));
        }
        let max_keys = self
            .rate_limit_max_keys
            .or(file.rate_limit_max_keys)
            .unwrap_or(100_000)
            .max(16);

        let log_format = match pick(&self.log_format, &file.log_format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "log_format",
                    format!("{other:?}: use text or json"),
                ));
            }
        };
        let id_field = pick(&self.id_field, &file.id_field).filter(|f| !f.is_empty());

        Ok(Config {
            listen,
            data_dir,
            bus,
            metastore,
            archive,
            search,
            meili_key: pick(&self.meili_key, &file.meili_key).filter(|k| !k.is_empty()),
            search_window: Duration::from_secs(
                self.search_window_secs
                    .or(file.search_window_secs)
                    .unwrap_or(7 * 86_400),
            ),
            search_memory_bytes: self
                .search_memory_bytes
                .or(file.search_memory_bytes)
                .unwrap_or(64 << 20)
                .max(16 << 20),
            archive_flush: Duration::from_secs(
                self.archive_flush_secs
                    .or(file.archive_flush_secs)
                    .unwrap_or(60)
                    .max(1),
            ),
            archive_target_bytes: self
                .archive_target_bytes
                .or(file.archive_target_bytes)
                .unwrap_or(16 << 20)
                .max(1),
            archive_max_buffered_bytes: self
                .archive_max_buffered_bytes
                .or(file.archive_max_buffered_bytes)
                .unwrap_or(64 << 20)
                .max(1),
            archive_compact: match self
                .archive_compact_secs
                .or(file.archive_compact_secs)
                .unwrap_or(300)
            {
                0 => None,
                secs => Some(Duration::from_secs(secs)),
            },
            archive_file_target_bytes: self
                .archive_file_target_bytes
                .or(file.archive_file_target_bytes)
                .unwrap_or(128 << 20)
                .max(1),
            allow_private_destinations: self
                .allow_private_destinations
                .or(file.allow_private_destinations)
                .unwrap_or(false),
            replay: crate::replay::ReplayOptions {
                max_running_per_team: self
                    .replay_max_running
                    .or(file.replay_max_running)
                    .unwrap_or(4)
                    .max(1),
                team_rate: match self
                    .replay_team_rate
                    .or(file.replay_team_rate)
                    .unwrap_or(100_000)
                {
                    0 => None,
                    r => Some(r),
                },
                api_rate: self
                    .replay_api_rate
                    .or(file.replay_api_rate)
                    .unwrap_or(20)
                    .max(1),
            },
            limits: Limits {
                max_event_bytes,
                max_request_bytes,
                max_batch_events,
                max_inflight_bytes: self
                    .max_inflight_bytes
                    .or(file.max_inflight_bytes)
                    .unwrap_or(32 << 20)
                    .max(max_request_bytes),
            },
            rate_limit: RateLimitConfig {
                events_per_sec,
                burst,
                max_keys,
            },
            id_field,
            dedupe_window: Duration::from_secs(
                self.dedupe_window_secs
                    .or(file.dedupe_window_secs)
                    .unwrap_or(86_400),
            ),
            bus_segment_bytes: self
                .bus_segment_bytes
                .or(file.bus_segment_bytes)
                .unwrap_or(128 << 20)
                .max(4096),
            bus_direct_io: self.bus_direct_io.or(file.bus_direct_io).unwrap_or(true),
            bus_retention: Duration::from_secs(
                self.bus_retention_secs
                    .or(file.bus_retention_secs)
                    .unwrap_or(
                        self.dedupe_window_secs
                            .or(file.dedupe_window_secs)
                            .unwrap_or(86_400),
                    ),
            ),
            dedupe_max_keys: self
                .dedupe_max_keys
                .or(file.dedupe_max_keys)
                .unwrap_or(1_000_000),
            log_format,
            shutdown_grace: Duration::from_secs(
                self.shutdown_grace_secs
                    .or(file.shutdown_grace_secs)
                    .unwrap_or(30),
            ),
            root_token,
        })
    }
}

fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.into(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
        path: path.into(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_give_a_working_single_node() {
        let cfg = ServeArgs::default().resolve().unwrap();
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(cfg.bus, BusConfig::Local);
        assert_eq!(cfg.data_dir, PathBuf::from("./rewind-data"));
        assert!(
            matches!(cfg.metastore, MetastoreConfig::Sqlite { ref path } if path.ends_with("metastore.db"))
        );
        assert_eq!(cfg.limits.max_event_bytes, 1 << 20);
        assert_eq!(cfg.archive_flush, Duration::from_secs(60));
        assert!(!cfg.allow_private_destinations);
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rewind.toml");
        std::fs::write(
            &path,
            "listen = \"0.0.0.0:9000\"\nbus = \"nats://n:4222\"\nmax_batch_events = 7\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            listen: Some("127.0.0.1:7000".into()),
            ..Default::default()
        };
        let cfg = args.resolve().unwrap();
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(
            cfg.bus,
            BusConfig::Nats {
                url: "nats://n:4222".into()
            }
        );
        assert_eq!(cfg.limits.max_batch_events, 7);
    }

    #[test]
    fn bad_settings_name_the_key() {
        let err = ServeArgs {
            bus: Some("kafka://x".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("`bus`"), "{err}");
        let err = ServeArgs {
            listen: Some("nope".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("`listen`"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rewind.toml");
        std::fs::write(&path, "lisen = \"x\"\n").unwrap();
        let err = ServeArgs {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("lisen"), "{err}");
    }
}
