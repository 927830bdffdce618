//! The metastore: teams, tokens and collections (and, in later issues, schemas, plugins,
//! replays and the archive manifest). One trait, [`Metastore`], with one SQL implementation
//! that runs on SQLite (the embedded default, a file in the data dir) and on PostgreSQL; one
//! contract suite (`contract_tests`) runs against both.

mod cache;
#[cfg(test)]
mod contract_tests;
mod sql;

pub use cache::CachedMetastore;
pub use sql::SqlMetastore;

use async_trait::async_trait;

use crate::auth::Scopes;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Team {
    pub id: String,
    pub name: String,
    pub created_at: i64,
}

/// A stored token: never the secret, only its hash and a short display prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub team_id: String,
    pub name: String,
    pub hash: String,
    pub prefix: String,
    pub scopes: Scopes,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collection {
    pub id: String,
    pub team_id: String,
    pub name: String,
    pub created_at: i64,
    /// How long its events stay searchable in the index; `None`: the gateway's default.
    pub search_window_secs: Option<i64>,
}

/// A Parquet file registered in the archive manifest. Readers see only registered files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveFile {
    pub id: String,
    pub team_id: String,
    pub collection_id: String,
    /// Object path under the archive root (Hive layout).
    pub path: String,
    pub rows: i64,
    pub bytes: i64,
    pub min_received_at: i64,
    pub max_received_at: i64,
    /// Bus positions of the first and last message whose events the file holds.
    pub min_position: i64,
    pub max_position: i64,
    pub schema_version: i64,
    pub created_at: i64,
}

/// One inferred column of a collection, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredColumn {
    pub collection_id: String,
    pub name: String,
    pub type_name: String,
    pub first_seen: i64,
    pub widened_at: Option<i64>,
    pub widened_from: Option<String>,
}

/// An uploaded plugin: `name@version` of a team, content-addressed by `sha256`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginRecord {
    pub id: String,
    pub team_id: String,
    pub name: String,
    pub version: String,
    /// `transform`, `destination` or `ingress`.
    pub kind: String,
    pub sha256: String,
    pub bytes: i64,
    pub created_at: i64,
}

/// A destination: a destination plugin with its config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationRecord {
    pub id: String,
    pub team_id: String,
    pub name: String,
    pub plugin_id: String,
    /// JSON object.
    pub config: String,
    pub created_at: i64,
}

/// A webhook ingress: a public URL bound to an ingress plugin and a collection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookRecord {
    pub id: String,
    pub team_id: String,
    pub name: String,
    pub plugin_id: String,
    pub collection_id: String,
    pub config: String,
    pub created_at: i64,
}

/// A source: a subscription on a team's NATS server whose messages an ingress plugin turns
/// into events of a collection (docs/plugins.md#sources).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRecord {
    pub id: String,
    pub team_id: String,
    pub name: String,
    pub plugin_id: String,
    pub collection_id: String,
    pub config: String,
    /// `nats://[user:password@]host:port` (credentials are never shown back).
    pub url: String,
    pub subject: String,
    pub created_at: i64,
}

/// A replay (docs/replays.md) with its progress and lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayRecord {
    pub id: String,
    pub team_id: String,
    pub collection_id: String,
    /// What to replay: JSON of `replay::ReplaySpec`.
    pub spec: String,
    /// `pending`, `running`, `paused`, `completed`, `failed` or `cancelled`.
    pub status: String,
    /// Events selected, once counted.
    pub total: Option<i64>,
    pub delivered: i64,
    /// Dead-lettered (permanent failures, exhausted retries, failed transforms).
    pub failed: i64,
    /// Delivery attempts that were retried.
    pub retried: i64,
    /// The last event done, as (received_at µs, id): a resumed replay starts after it.
    pub checkpoint: Option<(i64, String)>,
    /// Current delivery rate in events per 1000 s.
    pub rate_milli: i64,
    pub error: Option<String>,
    /// The gateway running it, and until when its lease holds (µs).
    pub owner: Option<String>,
    pub lease_until: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

/// Progress a replay's runner records after each batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayProgress {
    pub total: Option<i64>,
    pub delivered: i64,
    pub failed: i64,
    pub retried: i64,
    pub checkpoint: Option<(i64, String)>,
    pub rate_milli: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{what} {name:?} already exists")]
    AlreadyExists { what: &'static str, name: String },
    #[error("metastore unavailable: {0}")]
    Unavailable(String),
    #[error("metastore migration failed: {0}")]
    Migration(String),
}

impl From<sqlx::Error> for MetaError {
    fn from(e: sqlx::Error) -> Self {
        MetaError::Unavailable(e.to_string())
    }
}

/// Everything the gateway keeps about teams and their objects. Every read that takes a
/// `team_id` returns only that team's objects: isolation is enforced here, not in handlers.
#[async_trait]
pub trait Metastore: Send + Sync {
    /// "postgres" or "sqlite", for `/readyz`.
    fn kind(&self) -> &'static str;
    async fn ping(&self) -> Result<(), MetaError>;

    /// Creates a team together with its first (admin) token, atomically.
    async fn create_team(&self, team: &Team, admin_token: &TokenRecord) -> Result<(), MetaError>;
    async fn create_token(&self, token: &TokenRecord) -> Result<(), MetaError>;
    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, MetaError>;
    async fn list_tokens(&self, team_id: &str) -> Result<Vec<TokenRecord>, MetaError>;
    /// Marks the token revoked; false if the team has no such (unrevoked) token.
    async fn revoke_token(&self, team_id: &str, token_id: &str, at: i64)
    -> Result<bool, MetaError>;

    async fn create_collection(&self, collection: &Collection) -> Result<(), MetaError>;
    /// By id, or by name when no id matches; only within `team_id`.
    async fn get_collection(
        &self,
        team_id: &str,
        id_or_name: &str,
    ) -> Result<Option<Collection>, MetaError>;
    async fn list_collections(&self, team_id: &str) -> Result<Vec<Collection>, MetaError>;
    /// Sets (or, with `None`, resets to the default) a collection's search window; false if
    /// the team has no such collection.
    async fn set_search_window(
        &self,
        team_id: &str,
        collection_id: &str,
        secs: Option<i64>,
    ) -> Result<bool, MetaError>;
    /// Every collection of every team (for the gateway's background jobs, never for an API
    /// answer).
    async fn all_collections(&self) -> Result<Vec<Collection>, MetaError>;

    /// Registers archive files, moves the collection's archive checkpoint to `position`, and
    /// records new or widened columns — all in one transaction, so after a crash either the
    /// files and the checkpoint are both there or neither is.
    async fn register_archive_files(
        &self,
        files: &[ArchiveFile],
        collection_id: &str,
        position: i64,
        columns: &[StoredColumn],
    ) -> Result<(), MetaError>;
    /// The archiver's checkpoint of every collection: the highest bus position archived.
    async fn archive_checkpoints(&self) -> Result<Vec<(String, i64)>, MetaError>;
    /// Registered files of a collection overlapping `[from, to)` on `received_at`, by
    /// `min_received_at`.
    async fn list_archive_files(
        &self,
        team_id: &str,
        collection_id: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<ArchiveFile>, MetaError>;
    /// Files of every collection smaller than `max_bytes` and created before `created_before`
    /// (compaction candidates), by collection and bus position.
    async fn compaction_candidates(
        &self,
        max_bytes: i64,
        created_before: i64,
    ) -> Result<Vec<ArchiveFile>, MetaError>;
    /// Replaces the files `old` by `merged` in one transaction, and marks the old paths
    /// pending deletion (owned by `owner`). False (and nothing changed) when one of them is no
    /// longer registered.
    async fn replace_archive_files(
        &self,
        old: &[ArchiveFile],
        merged: &ArchiveFile,
        owner: &str,
    ) -> Result<bool, MetaError>;
    /// Records objects about to be written (or to be deleted) by `owner`: until registered
    /// (which clears them) they are removed after a crash. See [`crate::archive::recover_pending`].
    async fn add_pending_objects(
        &self,
        paths: &[String],
        owner: &str,
        now: i64,
    ) -> Result<(), MetaError>;
    /// Pending objects of `owner`, and of anyone when older than `stale_before`: each with
    /// whether it is registered in the manifest.
    async fn pending_objects(
        &self,
        owner: &str,
        stale_before: i64,
    ) -> Result<Vec<(String, bool)>, MetaError>;
    async fn remove_pending_objects(&self, paths: &[String]) -> Result<(), MetaError>;
    /// Every archive path registered under a team/collection (for cleaning up orphans).
    async fn archive_paths(&self, collection_id: &str) -> Result<Vec<String>, MetaError>;
    /// Inferred columns, of one collection or (None) of all.
    /// Registers an uploaded plugin (`AlreadyExists` for a taken `name@version`).
    async fn create_plugin(&self, plugin: &PluginRecord) -> Result<(), MetaError>;
    /// A team's plugin by id or `name@version`.
    async fn get_plugin(
        &self,
        team_id: &str,
        id_or_ref: &str,
    ) -> Result<Option<PluginRecord>, MetaError>;
    async fn list_plugins(&self, team_id: &str) -> Result<Vec<PluginRecord>, MetaError>;
    /// Deletes a plugin; `Err(names)` lists what still uses it (and nothing is deleted).
    async fn delete_plugin(
        &self,
        team_id: &str,
        id: &str,
    ) -> Result<Result<bool, Vec<String>>, MetaError>;
    async fn create_destination(&self, d: &DestinationRecord) -> Result<(), MetaError>;
    /// A team's destination by id or name.
    async fn get_destination(
        &self,
        team_id: &str,
        id_or_name: &str,
    ) -> Result<Option<DestinationRecord>, MetaError>;
    async fn list_destinations(&self, team_id: &str) -> Result<Vec<DestinationRecord>, MetaError>;
    async fn delete_destination(&self, team_id: &str, id: &str) -> Result<bool, MetaError>;
    /// A collection's pipeline steps (JSON), if it has one.
    async fn get_pipeline(
        &self,
        team_id: &str,
        collection_id: &str,
    ) -> Result<Option<String>, MetaError>;
    /// Sets (or with `None` removes) a collection's pipeline.
    async fn set_pipeline(
        &self,
        team_id: &str,
        collection_id: &str,
        steps: Option<&str>,
    ) -> Result<(), MetaError>;
    async fn create_hook(&self, h: &HookRecord) -> Result<(), MetaError>;
    /// A hook by its id alone: the id is the public URL's secret, so the caller is the world.
    async fn hook_by_id(&self, id: &str) -> Result<Option<HookRecord>, MetaError>;
    async fn list_hooks(&self, team_id: &str) -> Result<Vec<HookRecord>, MetaError>;
    async fn delete_hook(&self, team_id: &str, id_or_name: &str) -> Result<bool, MetaError>;
    async fn create_source(&self, s: &SourceRecord) -> Result<(), MetaError>;
    async fn list_sources(&self, team_id: &str) -> Result<Vec<SourceRecord>, MetaError>;
    /// Every team's sources (the gateway subscribes to all of them).
    async fn all_sources(&self) -> Result<Vec<SourceRecord>, MetaError>;
    async fn delete_source(&self, team_id: &str, id_or_name: &str) -> Result<bool, MetaError>;
    async fn collection_columns(
        &self,
        collection_id: Option<&str>,
    ) -> Result<Vec<StoredColumn>, MetaError>;

    async fn create_replay(&self, r: &ReplayRecord) -> Result<(), MetaError>;
    async fn get_replay(&self, team_id: &str, id: &str) -> Result<Option<ReplayRecord>, MetaError>;
    /// The team's replays, newest first.
    async fn list_replays(&self, team_id: &str, limit: i64)
    -> Result<Vec<ReplayRecord>, MetaError>;
    /// Moves a replay from one of `from` to `to` (with `error` when it failed); `false` when
    /// it was in none of them. Terminal states set `finished_at`, `running` sets `started_at`
    /// the first time.
    async fn set_replay_status(
        &self,
        team_id: &str,
        id: &str,
        from: &[&str],
        to: &str,
        error: Option<&str>,
    ) -> Result<bool, MetaError>;
    /// Records progress and renews the lease, if `owner` still holds it (`false` otherwise).
    async fn save_replay_progress(
        &self,
        id: &str,
        owner: &str,
        progress: &ReplayProgress,
        lease_until: i64,
    ) -> Result<bool, MetaError>;
    /// Takes the lease of every unfinished replay that has no owner, is `owner`'s already,
    /// or whose lease ran out before `now`; returns those now held by `owner`.
    async fn claim_replays(
        &self,
        owner: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Vec<ReplayRecord>, MetaError>;
    /// Gives a replay's lease up (on shutdown), so another gateway may take it at once.
    async fn release_replay(&self, id: &str, owner: &str) -> Result<(), MetaError>;
    /// How many of the team's replays are `running`.
    async fn running_replays(&self, team_id: &str) -> Result<i64, MetaError>;
    /// Moves a `pending` replay to `running` if fewer than `max_running` of the team's
    /// replays run and no older replay of the team is still pending (first come, first
    /// served); atomic per team across gateways. `true` when it started.
    async fn start_replay(
        &self,
        team_id: &str,
        id: &str,
        max_running: i64,
    ) -> Result<bool, MetaError>;
}
