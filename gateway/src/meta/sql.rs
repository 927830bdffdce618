//! [`Metastore`] over SQL through sqlx's `Any` driver: the same queries and migrations run on
//! SQLite and PostgreSQL. Types are limited to what both share (TEXT, BIGINT), which is all the
//! metastore needs; timestamps are microseconds since the epoch.

use std::path::Path;
use std::str::FromStr;

use async_trait::async_trait;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use super::{Collection, MetaError, Metastore, Team, TokenRecord};
use crate::auth::Scopes;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub struct SqlMetastore {
    pool: AnyPool,
    kind: &'static str,
}

impl SqlMetastore {
    /// Opens (creating if needed) a SQLite metastore file and applies migrations.
    pub async fn open_sqlite(path: &Path) -> Result<Self, MetaError> {
        sqlx::any::install_default_drivers();
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                MetaError::Unavailable(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    // WAL lets readers run beside the writer; FULL sync makes every commit
                    // survive power loss; busy_timeout makes concurrent writers queue.
                    for pragma in [
                        "PRAGMA journal_mode = WAL",
                        "PRAGMA synchronous = FULL",
                        "PRAGMA busy_timeout = 5000",
                        "PRAGMA foreign_keys = ON",
                    ] {
                        sqlx::query(pragma).execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(|e| {
                MetaError::Unavailable(format!("cannot open SQLite at {}: {e}", path.display()))
            })?;
        Self::migrate(pool, "sqlite").await
    }

    /// Connects to PostgreSQL and applies migrations.
    pub async fn open_postgres(url: &str) -> Result<Self, MetaError> {
        sqlx::any::install_default_drivers();
        let opts = sqlx::any::AnyConnectOptions::from_str(url)
            .map_err(|e| MetaError::Unavailable(format!("bad PostgreSQL URL: {e}")))?;
        let pool = AnyPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect_with(opts)
            .await
            .map_err(|e| MetaError::Unavailable(format!("cannot connect to PostgreSQL: {e}")))?;
        Self::migrate(pool, "postgres").await
    }

    async fn migrate(pool: AnyPool, kind: &'static str) -> Result<Self, MetaError> {
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| MetaError::Migration(e.to_string()))?;
        Ok(Self { pool, kind })
    }
}

/// Unique-constraint violations become `AlreadyExists`; the rest `Unavailable`.
fn map_insert_error(e: sqlx::Error, what: &'static str, name: &str) -> MetaError {
    if let sqlx::Error::Database(db) = &e
        && db.is_unique_violation()
    {
        return MetaError::AlreadyExists {
            what,
            name: name.to_string(),
        };
    }
    e.into()
}

fn token_from_row(row: &AnyRow) -> Result<TokenRecord, sqlx::Error> {
    Ok(TokenRecord {
        id: row.try_get("id")?,
        team_id: row.try_get("team_id")?,
        name: row.try_get("name")?,
        hash: row.try_get("hash")?,
        prefix: row.try_get("prefix")?,
        scopes: Scopes::from_bits(row.try_get("scopes")?),
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

fn collection_from_row(row: &AnyRow) -> Result<Collection, sqlx::Error> {
    Ok(Collection {
        id: row.try_get("id")?,
        team_id: row.try_get("team_id")?,
        name: row.try_get("name")?,
        created_at: row.try_get("created_at")?,
    })
}

const TOKEN_COLUMNS: &str = "id, team_id, name, hash, prefix, scopes, created_at, revoked_at";

async fn insert_token<'c, E>(executor: E, t: &TokenRecord) -> Result<(), MetaError>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    sqlx::query(
        "INSERT INTO tokens (id, team_id, name, hash, prefix, scopes, created_at, revoked_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, NULL)",
    )
    .bind(&t.id)
    .bind(&t.team_id)
    .bind(&t.name)
    .bind(&t.hash)
    .bind(&t.prefix)
    .bind(t.scopes.bits())
    .bind(t.created_at)
    .execute(executor)
    .await
    .map_err(|e| map_insert_error(e, "token", &t.name))?;
    Ok(())
}

#[async_trait]
impl Metastore for SqlMetastore {
    fn kind(&self) -> &'static str {
        self.kind
    }

    async fn ping(&self) -> Result<(), MetaError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_team(&self, team: &Team, admin_token: &TokenRecord) -> Result<(), MetaError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO teams (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(&team.id)
            .bind(&team.name)
            .bind(team.created_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| map_insert_error(e, "team", &team.name))?;
        insert_token(&mut *tx, admin_token).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn create_token(&self, token: &TokenRecord) -> Result<(), MetaError> {
        insert_token(&self.pool, token).await
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, MetaError> {
        let row = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = $1"
        ))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(token_from_row).transpose()?)
    }

    async fn list_tokens(&self, team_id: &str) -> Result<Vec<TokenRecord>, MetaError> {
        let rows = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE team_id = $1 ORDER BY created_at, id"
        ))
        .bind(team_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(token_from_row).collect::<Result<_, _>>()?)
    }

    async fn revoke_token(
        &self,
        team_id: &str,
        token_id: &str,
        at: i64,
    ) -> Result<bool, MetaError> {
        let done = sqlx::query(
            "UPDATE tokens SET revoked_at = $1 WHERE team_id = $2 AND id = $3 AND revoked_at IS NULL",
        )
        .bind(at)
        .bind(team_id)
        .bind(token_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn create_collection(&self, c: &Collection) -> Result<(), MetaError> {
        sqlx::query(
            "INSERT INTO collections (id, team_id, name, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&c.id)
        .bind(&c.team_id)
        .bind(&c.name)
        .bind(c.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| map_insert_error(e, "collection", &c.name))?;
        Ok(())
    }

    async fn get_collection(
        &self,
        team_id: &str,
        id_or_name: &str,
    ) -> Result<Option<Collection>, MetaError> {
        let row = sqlx::query(
            "SELECT id, team_id, name, created_at FROM collections \
             WHERE team_id = $1 AND (id = $2 OR name = $2) ORDER BY (id = $2) DESC LIMIT 1",
        )
        .bind(team_id)
        .bind(id_or_name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(collection_from_row).transpose()?)
    }

    async fn list_collections(&self, team_id: &str) -> Result<Vec<Collection>, MetaError> {
        let rows = sqlx::query(
            "SELECT id, team_id, name, created_at FROM collections WHERE team_id = $1 ORDER BY name",
        )
        .bind(team_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(collection_from_row)
            .collect::<Result<_, _>>()?)
    }
}
