//! Building and running the gateway from a [`Config`]: open the metastore and the bus, wire
//! the API, serve REST + gRPC on one port, and shut down gracefully on SIGTERM/SIGINT.
//!
//! Shutdown order matters for "ack nothing not durable": stop accepting connections, let
//! in-flight requests finish (each is answered only after its append is durable), then close
//! the bus, which flushes and fsyncs whatever is queued.

use std::sync::Arc;

use anyhow::Context;

use crate::api::{self, AppState};
use crate::auth::{Authenticator, load_or_create_root_token};
use crate::bus::Bus;
use crate::bus::local::{LocalBus, LocalBusOptions};
use crate::bus::nats::NatsBus;
use crate::config::{BusConfig, Config, MetastoreConfig};
use crate::ingest::Ingestor;
use crate::ingest::dedupe::DedupeIndex;
use crate::ingest::ratelimit::TokenRateLimiter;
use crate::meta::{CachedMetastore, Metastore, SqlMetastore};
use crate::metrics::Metrics;

/// Opens the configured metastore, behind the token/collection cache (see `meta::cache`).
pub async fn open_metastore(config: &Config) -> anyhow::Result<Arc<dyn Metastore>> {
    let (store, token_ttl): (Arc<dyn Metastore>, _) =
        match &config.metastore {
            // One gateway owns a SQLite file: its own revocations are the only ones.
            MetastoreConfig::Sqlite { path } => {
                (Arc::new(SqlMetastore::open_sqlite(path).await?), None)
            }
            MetastoreConfig::Postgres { url } => (
                Arc::new(SqlMetastore::open_postgres(url).await.context(
                    "check --metastore / REWIND_METASTORE and that PostgreSQL is running",
                )?),
                Some(std::time::Duration::from_secs(1)),
            ),
        };
    Ok(Arc::new(CachedMetastore::new(store, token_ttl)))
}

/// Whose consumers read the bus: the gateway's own (archiver, indexer) read a backlog of the
/// local log at background priority, an operator's tool (`rewind bus read`) reads all of it
/// at normal priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusReader {
    Gateway,
    Tool,
}

/// Opens the configured bus. NATS connects in the background (the gateway starts even if
/// NATS is down, and reports itself not ready until it connects).
pub async fn open_bus(config: &Config, reader: BusReader) -> anyhow::Result<Arc<dyn Bus>> {
    Ok(match &config.bus {
        BusConfig::Local => Arc::new(LocalBus::open(
            &config.data_dir.join("bus"),
            LocalBusOptions {
                segment_bytes: config.bus_segment_bytes,
                direct_io: config.bus_direct_io,
                background_reads: reader == BusReader::Gateway,
            },
        )?),
        BusConfig::Nats { url } => {
            let bus = NatsBus::start(url);
            if !bus.wait_ready(std::time::Duration::from_secs(3)).await {
                tracing::error!(%url, "NATS is not reachable yet: the gateway starts, /readyz reports the bus not ready, ingest answers 503 until it connects");
            }
            Arc::new(bus)
        }
    })
}

/// Runs the gateway until SIGTERM/SIGINT.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create the data dir {}", config.data_dir.display()))?;
    let (root_token, created) =
        load_or_create_root_token(config.root_token.as_deref(), &config.data_dir)
            .context("cannot read or create the root token file")?;
    if let Some(path) = created {
        // The path, never the token.
        eprintln!(
            "rewind: generated a root token in {} (mode 0600); use it to create teams",
            path.display()
        );
    }

    let meta = open_metastore(&config).await?;
    let bus = open_bus(&config, BusReader::Gateway).await?;
    let metrics = Arc::new(Metrics::new());
    let limiter = TokenRateLimiter::new(
        config.rate_limit.events_per_sec,
        config.rate_limit.burst,
        config.rate_limit.max_keys,
    );
    let dedupe = Arc::new(DedupeIndex::new(
        config.dedupe_window,
        config.dedupe_max_keys,
    ));
    let plugins = crate::plugins::host::PluginHost::new(Default::default())
        .context("cannot start the WASM plugin host")?;
    let ingest = Ingestor::new(
        bus.clone(),
        config.limits.clone(),
        limiter,
        dedupe,
        metrics.clone(),
        config.id_field.clone(),
    );
    match ingest.rebuild_dedupe(config.dedupe_window).await {
        Ok(n) if n > 0 => tracing::info!(keys = n, "restored client ids for de-duplication"),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "could not restore client ids; retries of events sent before the restart may be stored twice")
        }
    }
    let archive_store = crate::archive::store::open(&config.archive)?;
    let pipelines = Arc::new(crate::plugins::pipeline::Pipelines::new(
        plugins.clone(),
        meta.clone(),
        archive_store.clone(),
    ));
    let ingest = ingest.with_pipelines(pipelines.clone());
    let instance = load_or_create_instance_id(&config.data_dir)?;
    // Leftovers of this instance's previous life (an upload it never registered, inputs a
    // compaction had replaced but not deleted) go before its archiver writes anything new.
    match crate::archive::recover_pending(&archive_store, &meta, &instance, PENDING_STALE).await {
        Ok(n) if n > 0 => tracing::info!(removed = n, "removed archive objects left by a crash"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot clean up after a crash yet; will retry"),
    }
    let archiver = crate::archive::archiver::Archiver::new(
        bus.clone(),
        meta.clone(),
        archive_store.clone(),
        crate::archive::archiver::ArchiverOptions {
            flush_after: config.archive_flush,
            target_bytes: config.archive_target_bytes,
            max_buffered_bytes: config.archive_max_buffered_bytes,
            owner: instance.clone(),
        },
    );
    let archive_status = archiver.status.clone();
    let (archiver_stop, archiver_stop_rx) = tokio::sync::watch::channel(false);
    let archiver_task = tokio::spawn(archiver.run(archiver_stop_rx));
    {
        // Local bus retention: consumed segments past the retention age go, once a minute.
        let (bus, keep) = (bus.clone(), config.bus_retention);
        let every = keep.clamp(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(60),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let older_than = std::time::SystemTime::now() - keep;
                match bus.retain_before(older_than).await {
                    Ok(n) if n > 0 => tracing::info!(segments = n, "bus retention"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "bus retention failed; will retry"),
                }
            }
        });
    }
    if let Some(every) = config.archive_compact {
        let (store, meta) = (archive_store.clone(), meta.clone());
        let options = crate::archive::compact::CompactOptions {
            target_bytes: config.archive_file_target_bytes,
            min_age: every,
            owner: instance.clone(),
        };
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match crate::archive::compact::compact_once(&store, &meta, &options).await {
                    Ok(stats) if stats.merged_files > 0 => tracing::info!(
                        merged = stats.merged_files,
                        inputs = stats.input_files,
                        rows = stats.rows,
                        "archive compaction pass"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "archive compaction failed; will retry"),
                }
            }
        });
    }
    {
        let (store, meta) = (archive_store.clone(), meta.clone());
        tokio::spawn(async move {
            loop {
                // Other instances' leftovers, once no writer can still have them in flight.
                if let Err(e) =
                    crate::archive::recover_pending(&store, &meta, "", PENDING_STALE).await
                {
                    tracing::warn!(error = %e, "archive crash clean-up failed; will retry");
                }
                match crate::archive::cleanup_orphans(
                    &store,
                    &meta,
                    std::time::Duration::from_secs(3600),
                )
                .await
                {
                    Ok(n) if n > 0 => {
                        tracing::info!(removed = n, "removed unregistered archive objects")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "archive cleanup failed; will retry"),
                }
                tokio::time::sleep(std::time::Duration::from_secs(600)).await;
            }
        });
    }
    let search = start_search(
        &config,
        &bus,
        &meta,
        &instance,
        shutdown_rx_for_search(&archiver_stop),
    )
    .await?;
    // Destinations that publish to NATS use a connection of their own to the bus's server.
    let nats = match &config.bus {
        BusConfig::Nats { url } => Some(
            async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .name("rewind-destinations")
                .connect(url.as_str())
                .await
                .context("cannot set up the NATS connection for destinations")?,
        ),
        BusConfig::Local => None,
    };
    let state = Arc::new(AppState {
        plugins,
        pipelines,
        allow_private_destinations: config.allow_private_destinations,
        destination_http: crate::plugins::net::client(config.allow_private_destinations),
        nats,
        archive: archive_store,
        archive_status,
        search: search.service,
        meta: meta.clone(),
        auth: Authenticator::new(root_token, meta.clone()),
        ingest,
        bus: bus.clone(),
        metrics,
        max_message_bytes: config.limits.max_request_bytes,
        replays: crate::replay::Replays::new(instance.clone(), config.replay.clone()),
        sources: crate::sources::Sources::new(config.allow_private_destinations),
    });
    // Replays run until shutdown; on stop each finishes its batch and saves its checkpoint.
    let (replays_stop, replays_stop_rx) = tokio::sync::watch::channel(false);
    let replays_task = tokio::spawn(
        state
            .replays
            .clone()
            .run(state.clone(), replays_stop_rx.clone()),
    );
    // Sources subscribe until shutdown (stopped with the replays).
    let sources_task = tokio::spawn(state.sources.clone().run(state.clone(), replays_stop_rx));
    let app = api::router(state);

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (is another gateway running? change --listen)",
                config.listen
            )
        })?;
    let local = listener.local_addr()?;
    tracing::info!(listen = %local, bus = bus.kind(), metastore = meta.kind(), data_dir = %config.data_dir.display(), "rewind gateway listening (REST + gRPC)");
    eprintln!("rewind: listening on http://{local} (REST and gRPC)");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let grace = config.shutdown_grace;
    let server = crate::http_server::serve(listener, app, async move {
        shutdown_signal().await;
        tracing::info!("shutting down: finishing in-flight requests");
        let _ = stop_tx.send(true);
    });
    let mut stop_rx2 = stop_rx.clone();
    tokio::select! {
        () = server => {}
        _ = async {
            let _ = stop_rx2.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!(?grace, "in-flight requests did not finish within the grace period; their clients get no ack"),
    }
    let _ = replays_stop.send(true);
    let _ = tokio::time::timeout(grace, sources_task).await;
    if tokio::time::timeout(grace, replays_task).await.is_err() {
        tracing::warn!(
            "replays did not stop in the grace period; they resume from their checkpoints"
        );
    }
    // The archiver and the indexer write what they hold, then the bus flushes.
    let _ = archiver_stop.send(true);
    if tokio::time::timeout(grace, archiver_task).await.is_err() {
        tracing::warn!(
            "the archiver did not finish in the grace period; the bus redelivers what it held"
        );
    }
    if tokio::time::timeout(grace, search.indexer_task)
        .await
        .is_err()
    {
        tracing::warn!(
            "the indexer did not finish in the grace period; the bus redelivers what it held"
        );
    }
    bus.close().await;
    tracing::info!("stopped");
    Ok(())
}

fn shutdown_rx_for_search(
    stop: &tokio::sync::watch::Sender<bool>,
) -> tokio::sync::watch::Receiver<bool> {
    stop.subscribe()
}

struct Search {
    service: crate::search::SearchService,
    indexer_task: tokio::task::JoinHandle<()>,
}

/// Opens the configured search index and starts the indexer and the hot-window job.
async fn start_search(
    config: &Config,
    bus: &Arc<dyn Bus>,
    meta: &Arc<dyn Metastore>,
    instance: &str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Search> {
    use crate::search::indexer::{self, HotWindows, Indexer, IndexerOptions};
    let (index, consumer): (Arc<dyn crate::search::SearchIndex>, String) =
        if config.search == "embedded" {
            let index = crate::search::embedded::EmbeddedIndex::open(
                &config.data_dir.join("search"),
                &crate::search::embedded::EmbeddedOptions {
                    writer_memory_bytes: config.search_memory_bytes,
                    ..Default::default()
                },
            )?;
            // One index per gateway: with a shared bus each gateway reads every event.
            let consumer = match config.bus {
                BusConfig::Local => indexer::CONSUMER.to_string(),
                BusConfig::Nats { .. } => format!("{}-{instance}", indexer::CONSUMER),
            };
            (Arc::new(index), consumer)
        } else {
            let index =
                crate::search::meili::MeiliIndex::new(&config.search, config.meili_key.as_deref())?;
            (Arc::new(index), indexer::CONSUMER.to_string())
        };
    let windows = Arc::new(HotWindows::new(config.search_window));
    if let Err(e) = windows.refresh(meta.as_ref()).await {
        tracing::warn!(error = %e, "cannot read collections' search windows yet; using the default");
    }
    let indexer = Indexer::new(
        bus.clone(),
        index.clone(),
        windows.clone(),
        IndexerOptions {
            consumer: consumer.clone(),
            ..IndexerOptions::default()
        },
    );
    let status = indexer.status.clone();
    let indexer_task = tokio::spawn(indexer.run(stop));
    tokio::spawn(indexer::run_window_job(
        index.clone(),
        meta.clone(),
        windows.clone(),
        std::time::Duration::from_secs(60),
    ));
    Ok(Search {
        service: crate::search::SearchService {
            index,
            windows,
            status,
            consumer,
        },
        indexer_task,
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Sets up `tracing` logs: text (default) or JSON, level from `RUST_LOG` (default info).
pub fn init_logging(format: crate::config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,async_nats=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        crate::config::LogFormat::Json => builder.json().init(),
        crate::config::LogFormat::Text => builder.init(),
    }
}

/// Pending archive objects older than this belong to no running writer (a flush registers
/// its files seconds after writing them).
const PENDING_STALE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// This gateway's instance id (`<data-dir>/instance-id`), stable across restarts: it owns
/// the archive objects the instance has in flight.
fn load_or_create_instance_id(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join("instance-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        _ => {
            let id = crate::ids::new_id("gw");
            std::fs::write(&path, &id)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(id)
        }
    }
}
