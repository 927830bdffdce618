//! A read-through cache in front of any [`Metastore`], for the two look-ups every ingest
//! request makes: the token (by hash) and the collection (by id or name).
//!
//! Revocation must take effect on the next request. Revocations through this gateway drop the
//! cached token at once. A revocation made by *another* gateway sharing a PostgreSQL metastore
//! is seen once the entry is older than `token_ttl` (1 s by default for PostgreSQL; SQLite is a
//! single-gateway store, so there its entries live until revoked here). Collections are never
//! renamed or moved between teams, so cached ones stay valid; misses are not cached.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{ArchiveFile, Collection, MetaError, Metastore, StoredColumn, Team, TokenRecord};

/// Entries kept per cache before it is cleared and refilled (bounds memory).
const MAX_ENTRIES: usize = 100_000;

pub struct CachedMetastore {
    inner: Arc<dyn Metastore>,
    token_ttl: Option<Duration>,
    tokens: RwLock<HashMap<String, (TokenRecord, Instant)>>,
    collections: RwLock<HashMap<(String, String), Collection>>,
}

impl CachedMetastore {
    /// `token_ttl: None` caches tokens until revoked through this instance.
    pub fn new(inner: Arc<dyn Metastore>, token_ttl: Option<Duration>) -> Self {
        Self {
            inner,
            token_ttl,
            tokens: RwLock::default(),
            collections: RwLock::default(),
        }
    }
}

fn insert_bounded<K: std::hash::Hash + Eq, V>(map: &RwLock<HashMap<K, V>>, key: K, value: V) {
    let mut map = map.write().expect("lock");
    if map.len() >= MAX_ENTRIES {
        map.clear();
    }
    map.insert(key, value);
}

#[async_trait]
impl Metastore for CachedMetastore {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn ping(&self) -> Result<(), MetaError> {
        self.inner.ping().await
    }

    async fn create_team(&self, team: &Team, admin_token: &TokenRecord) -> Result<(), MetaError> {
        self.inner.create_team(team, admin_token).await
    }

    async fn create_token(&self, token: &TokenRecord) -> Result<(), MetaError> {
        self.inner.create_token(token).await
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, MetaError> {
        if let Some((record, at)) = self.tokens.read().expect("lock").get(hash)
            && self.token_ttl.is_none_or(|ttl| at.elapsed() < ttl)
        {
            return Ok(Some(record.clone()));
        }
        let found = self.inner.token_by_hash(hash).await?;
        if let Some(record) = &found
            && record.revoked_at.is_none()
        {
            insert_bounded(
                &self.tokens,
                hash.to_string(),
                (record.clone(), Instant::now()),
            );
        }
        Ok(found)
    }

    async fn list_tokens(&self, team_id: &str) -> Result<Vec<TokenRecord>, MetaError> {
        self.inner.list_tokens(team_id).await
    }

    async fn revoke_token(
        &self,
        team_id: &str,
        token_id: &str,
        at: i64,
    ) -> Result<bool, MetaError> {
        // Drop the cached entry first and again after: a look-up racing with the revocation
        // cannot leave a stale entry behind.
        self.tokens
            .write()
            .expect("lock")
            .retain(|_, (r, _)| r.id != token_id);
        let revoked = self.inner.revoke_token(team_id, token_id, at).await;
        self.tokens
            .write()
            .expect("lock")
            .retain(|_, (r, _)| r.id != token_id);
        revoked
    }

    async fn create_collection(&self, collection: &Collection) -> Result<(), MetaError> {
        self.inner.create_collection(collection).await
    }

    async fn get_collection(
        &self,
        team_id: &str,
        id_or_name: &str,
    ) -> Result<Option<Collection>, MetaError> {
        let key = (team_id.to_string(), id_or_name.to_string());
        if let Some(c) = self.collections.read().expect("lock").get(&key) {
            return Ok(Some(c.clone()));
        }
        let found = self.inner.get_collection(team_id, id_or_name).await?;
        if let Some(c) = &found {
            insert_bounded(&self.collections, key, c.clone());
        }
        Ok(found)
    }

    async fn list_collections(&self, team_id: &str) -> Result<Vec<Collection>, MetaError> {
        self.inner.list_collections(team_id).await
    }

    async fn set_search_window(
        &self,
        team_id: &str,
        collection_id: &str,
        secs: Option<i64>,
    ) -> Result<bool, MetaError> {
        let changed = self
            .inner
            .set_search_window(team_id, collection_id, secs)
            .await?;
        // Cached by id and by name: drop every entry of the collection.
        self.collections
            .write()
            .expect("lock")
            .retain(|_, c| !(c.team_id == team_id && c.id == collection_id));
        Ok(changed)
    }

    async fn create_plugin(&self, p: &super::PluginRecord) -> Result<(), MetaError> {
        self.inner.create_plugin(p).await
    }
    async fn get_plugin(
        &self,
        team_id: &str,
        r: &str,
    ) -> Result<Option<super::PluginRecord>, MetaError> {
        self.inner.get_plugin(team_id, r).await
    }
    async fn list_plugins(&self, team_id: &str) -> Result<Vec<super::PluginRecord>, MetaError> {
        self.inner.list_plugins(team_id).await
    }
    async fn delete_plugin(
        &self,
        team_id: &str,
        id: &str,
    ) -> Result<Result<bool, Vec<String>>, MetaError> {
        self.inner.delete_plugin(team_id, id).await
    }
    async fn get_pipeline(
        &self,
        team_id: &str,
        collection_id: &str,
    ) -> Result<Option<String>, MetaError> {
        self.inner.get_pipeline(team_id, collection_id).await
    }
    async fn set_pipeline(
        &self,
        team_id: &str,
        collection_id: &str,
        steps: Option<&str>,
    ) -> Result<(), MetaError> {
        self.inner.set_pipeline(team_id, collection_id, steps).await
    }
    async fn create_hook(&self, h: &super::HookRecord) -> Result<(), MetaError> {
        self.inner.create_hook(h).await
    }
    async fn hook_by_id(&self, id: &str) -> Result<Option<super::HookRecord>, MetaError> {
        self.inner.hook_by_id(id).await
    }
    async fn list_hooks(&self, team_id: &str) -> Result<Vec<super::HookRecord>, MetaError> {
        self.inner.list_hooks(team_id).await
    }
    async fn delete_hook(&self, team_id: &str, id: &str) -> Result<bool, MetaError> {
        self.inner.delete_hook(team_id, id).await
    }
    async fn create_source(&self, s: &super::SourceRecord) -> Result<(), MetaError> {
        self.inner.create_source(s).await
    }
    async fn list_sources(&self, team_id: &str) -> Result<Vec<super::SourceRecord>, MetaError> {
        self.inner.list_sources(team_id).await
    }
    async fn all_sources(&self) -> Result<Vec<super::SourceRecord>, MetaError> {
        self.inner.all_sources().await
    }
    async fn delete_source(&self, team_id: &str, id: &str) -> Result<bool, MetaError> {
        self.inner.delete_source(team_id, id).await
    }
    async fn create_destination(&self, d: &super::DestinationRecord) -> Result<(), MetaError> {
        self.inner.create_destination(d).await
    }
    async fn get_destination(
        &self,
        team_id: &str,
        r: &str,
    ) -> Result<Option<super::DestinationRecord>, MetaError> {
        self.inner.get_destination(team_id, r).await
    }
    async fn list_destinations(
        &self,
        team_id: &str,
    ) -> Result<Vec<super::DestinationRecord>, MetaError> {
        self.inner.list_destinations(team_id).await
    }
    async fn delete_destination(&self, team_id: &str, id: &str) -> Result<bool, MetaError> {
        self.inner.delete_destination(team_id, id).await
    }

    async fn all_collections(&self) -> Result<Vec<Collection>, MetaError> {
        self.inner.all_collections().await
    }

    async fn register_archive_files(
        &self,
        files: &[ArchiveFile],
        collection_id: &str,
        position: i64,
        columns: &[StoredColumn],
    ) -> Result<(), MetaError> {
        self.inner
            .register_archive_files(files, collection_id, position, columns)
            .await
    }

    async fn archive_checkpoints(&self) -> Result<Vec<(String, i64)>, MetaError> {
        self.inner.archive_checkpoints().await
    }

    async fn list_archive_files(
        &self,
        team_id: &str,
        collection_id: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<ArchiveFile>, MetaError> {
        self.inner
            .list_archive_files(team_id, collection_id, from, to)
            .await
    }

    async fn compaction_candidates(
        &self,
        max_bytes: i64,
        created_before: i64,
    ) -> Result<Vec<ArchiveFile>, MetaError> {
        self.inner
            .compaction_candidates(max_bytes, created_before)
            .await
    }

    async fn replace_archive_files(
        &self,
        old: &[ArchiveFile],
        merged: &ArchiveFile,
        owner: &str,
    ) -> Result<bool, MetaError> {
        self.inner.replace_archive_files(old, merged, owner).await
    }

    async fn add_pending_objects(
        &self,
        paths: &[String],
        owner: &str,
        now: i64,
    ) -> Result<(), MetaError> {
        self.inner.add_pending_objects(paths, owner, now).await
    }

    async fn pending_objects(
        &self,
        owner: &str,
        stale_before: i64,
    ) -> Result<Vec<(String, bool)>, MetaError> {
        self.inner.pending_objects(owner, stale_before).await
    }

    async fn remove_pending_objects(&self, paths: &[String]) -> Result<(), MetaError> {
        self.inner.remove_pending_objects(paths).await
    }

    async fn archive_paths(&self, collection_id: &str) -> Result<Vec<String>, MetaError> {
        self.inner.archive_paths(collection_id).await
    }

    async fn collection_columns(
        &self,
        collection_id: Option<&str>,
    ) -> Result<Vec<StoredColumn>, MetaError> {
        self.inner.collection_columns(collection_id).await
    }

    async fn create_replay(&self, r: &super::ReplayRecord) -> Result<(), MetaError> {
        self.inner.create_replay(r).await
    }
    async fn get_replay(
        &self,
        team_id: &str,
        id: &str,
    ) -> Result<Option<super::ReplayRecord>, MetaError> {
        self.inner.get_replay(team_id, id).await
    }
    async fn list_replays(
        &self,
        team_id: &str,
        limit: i64,
    ) -> Result<Vec<super::ReplayRecord>, MetaError> {
        self.inner.list_replays(team_id, limit).await
    }
    async fn set_replay_status(
        &self,
        team_id: &str,
        id: &str,
        from: &[&str],
        to: &str,
        error: Option<&str>,
    ) -> Result<bool, MetaError> {
        self.inner
            .set_replay_status(team_id, id, from, to, error)
            .await
    }
    async fn save_replay_progress(
        &self,
        id: &str,
        owner: &str,
        progress: &super::ReplayProgress,
        lease_until: i64,
    ) -> Result<bool, MetaError> {
        self.inner
            .save_replay_progress(id, owner, progress, lease_until)
            .await
    }
    async fn claim_replays(
        &self,
        owner: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Vec<super::ReplayRecord>, MetaError> {
        self.inner.claim_replays(owner, now, lease_until).await
    }
    async fn release_replay(&self, id: &str, owner: &str) -> Result<(), MetaError> {
        self.inner.release_replay(id, owner).await
    }
    async fn running_replays(&self, team_id: &str) -> Result<i64, MetaError> {
        self.inner.running_replays(team_id).await
    }
    async fn start_replay(
        &self,
        team_id: &str,
        id: &str,
        max_running: i64,
    ) -> Result<bool, MetaError> {
        self.inner.start_replay(team_id, id, max_running).await
    }
}
