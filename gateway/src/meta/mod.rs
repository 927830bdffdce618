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
}
