//! [`Metastore`] over SQL through sqlx's `Any` driver: the same queries and migrations run on
//! SQLite and PostgreSQL. Types are limited to what both share (TEXT, BIGINT), which is all the
//! metastore needs; timestamps are microseconds since the epoch.

use std::path::Path;
use std::str::FromStr;

use async_trait::async_trait;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use super::{
    ArchiveFile, Collection, DestinationRecord, HookRecord, MetaError, Metastore, PluginRecord,
    ReplayProgress, ReplayRecord, SourceRecord, StoredColumn, Team, TokenRecord,
};
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
        search_window_secs: row.try_get("search_window_secs")?,
    })
}

fn plugin_from_row(row: &AnyRow) -> Result<PluginRecord, sqlx::Error> {
    Ok(PluginRecord {
        id: row.try_get("id")?,
        team_id: row.try_get("team_id")?,
        name: row.try_get("name")?,
        version: row.try_get("version")?,
        kind: row.try_get("kind")?,
        sha256: row.try_get("sha256")?,
        bytes: row.try_get("bytes")?,
        created_at: row.try_get("created_at")?,
    })
}

fn destination_from_row(row: &AnyRow) -> Result<DestinationRecord, sqlx::Error> {
    Ok(DestinationRecord {
        id: row.try_get("id")?,
        team_id: row.try_get("team_id")?,
        name: row.try_get("name")?,
        plugin_id: row.try_get("plugin_id")?,
        config: row.try_get("config")?,
        created_at: row.try_get("created_at")?,
    })
}

fn hook_from_row(row: &AnyRow) -> Result<HookRecord, sqlx::Error> {
    Ok(HookRecord {
        id: row.try_get("id")?,
        team_id: row.try_get("team_id")?,
        name: row.try_get("name")?,
        plugin_id: row.try_get("plugin_id")?,
        collection_id: row.try_get("collection_id")?,
        config: row.try_get("config")?,
        created_at: row.try_get("created_at")?,
    })
}

fn source_from_row(row: &AnyRow) -> Result<SourceRecord, sqlx::Error> {
    Ok(SourceRecord {
        id: row.try_get("id")?,
        team_id: row.try_get("team_id")?,
        name: row.try_get("name")?,
        plugin_id: row.try_get("plugin_id")?,
        collection_id: row.try_get("collection_id")?,
        config: row.try_get("config")?,
        url: row.try_get("url")?,
        subject: row.try_get("subject")?,
        created_at: row.try_get("created_at")?,
    })
}

const SOURCE_COLUMNS: &str =
    "id, team_id, name, plugin_id, collection_id, config, url, subject, created_at";
const HOOK_COLUMNS: &str = "id, team_id, name, plugin_id, collection_id, config, created_at";
const PLUGIN_COLUMNS: &str = "id, team_id, name, version, kind, sha256, bytes, created_at";
const DESTINATION_COLUMNS: &str = "id, team_id, name, plugin_id, config, created_at";

fn archive_file_from_row(row: &AnyRow) -> Result<ArchiveFile, sqlx::Error> {
    Ok(ArchiveFile {
        id: row.try_get("id")?,
        team_id: row.try_get("team_id")?,
        collection_id: row.try_get("collection_id")?,
        path: row.try_get("path")?,
        rows: row.try_get("rows")?,
        bytes: row.try_get("bytes")?,
        min_received_at: row.try_get("min_received_at")?,
        max_received_at: row.try_get("max_received_at")?,
        min_position: row.try_get("min_position")?,
        max_position: row.try_get("max_position")?,
        schema_version: row.try_get("schema_version")?,
        created_at: row.try_get("created_at")?,
    })
}

fn column_from_row(row: &AnyRow) -> Result<StoredColumn, sqlx::Error> {
    Ok(StoredColumn {
        collection_id: row.try_get("collection_id")?,
        name: row.try_get("name")?,
        type_name: row.try_get("type")?,
        first_seen: row.try_get("first_seen")?,
        widened_at: row.try_get("widened_at")?,
        widened_from: row.try_get("widened_from")?,
    })
}

const ARCHIVE_FILE_COLUMNS: &str = "id, team_id, collection_id, path, rows, bytes, min_received_at, max_received_at, \
     min_position, max_position, schema_version, created_at";

/// Registers one file in the manifest (inside the caller's transaction).
async fn insert_archive_file(
    conn: &mut sqlx::AnyConnection,
    f: &ArchiveFile,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO archive_files ({ARCHIVE_FILE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
    ))
    .bind(&f.id)
    .bind(&f.team_id)
    .bind(&f.collection_id)
    .bind(&f.path)
    .bind(f.rows)
    .bind(f.bytes)
    .bind(f.min_received_at)
    .bind(f.max_received_at)
    .bind(f.min_position)
    .bind(f.max_position)
    .bind(f.schema_version)
    .bind(f.created_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records an object as pending (about to be written, or to be deleted).
async fn insert_pending(
    conn: &mut sqlx::AnyConnection,
    path: &str,
    owner: &str,
    at: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO archive_pending (path, owner, created_at) VALUES ($1, $2, $3) \
         ON CONFLICT (path) DO NOTHING",
    )
    .bind(path)
    .bind(owner)
    .bind(at)
    .execute(conn)
    .await?;
    Ok(())
}

async fn delete_pending(conn: &mut sqlx::AnyConnection, path: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM archive_pending WHERE path = $1")
        .bind(path)
        .execute(conn)
        .await?;
    Ok(())
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

    async fn create_plugin(&self, p: &PluginRecord) -> Result<(), MetaError> {
        sqlx::query(
            "INSERT INTO plugins (id, team_id, name, version, kind, sha256, bytes, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&p.id)
        .bind(&p.team_id)
        .bind(&p.name)
        .bind(&p.version)
        .bind(&p.kind)
        .bind(&p.sha256)
        .bind(p.bytes)
        .bind(p.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| map_insert_error(e, "plugin", &format!("{}@{}", p.name, p.version)))?;
        Ok(())
    }

    async fn get_plugin(
        &self,
        team_id: &str,
        id_or_ref: &str,
    ) -> Result<Option<PluginRecord>, MetaError> {
        let (name, version) = id_or_ref.split_once('@').unwrap_or((id_or_ref, ""));
        let row = sqlx::query(&format!(
            "SELECT {PLUGIN_COLUMNS} FROM plugins WHERE team_id = $1 AND (id = $2 OR (name = $3 AND version = $4))"
        ))
        .bind(team_id)
        .bind(id_or_ref)
        .bind(name)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(plugin_from_row).transpose()?)
    }

    async fn list_plugins(&self, team_id: &str) -> Result<Vec<PluginRecord>, MetaError> {
        let rows = sqlx::query(&format!(
            "SELECT {PLUGIN_COLUMNS} FROM plugins WHERE team_id = $1 ORDER BY name, created_at"
        ))
        .bind(team_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(plugin_from_row).collect::<Result<_, _>>()?)
    }

    async fn delete_plugin(
        &self,
        team_id: &str,
        id: &str,
    ) -> Result<Result<bool, Vec<String>>, MetaError> {
        let mut tx = self.pool.begin().await?;
        let users: Vec<String> = sqlx::query(
            "SELECT name FROM destinations WHERE team_id = $1 AND plugin_id = $2 ORDER BY name",
        )
        .bind(team_id)
        .bind(id)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| {
            r.try_get::<String, _>("name")
                .map(|n| format!("destination {n}"))
        })
        .collect::<Result<_, _>>()?;
        let mut users = users;
        for row in sqlx::query(
            "SELECT name FROM hooks WHERE team_id = $1 AND plugin_id = $2 ORDER BY name",
        )
        .bind(team_id)
        .bind(id)
        .fetch_all(&mut *tx)
        .await?
        {
            users.push(format!("hook {}", row.try_get::<String, _>("name")?));
        }
        for row in sqlx::query(
            "SELECT name FROM sources WHERE team_id = $1 AND plugin_id = $2 ORDER BY name",
        )
        .bind(team_id)
        .bind(id)
        .fetch_all(&mut *tx)
        .await?
        {
            users.push(format!("source {}", row.try_get::<String, _>("name")?));
        }
        let pattern = format!("%\"plugin_id\":\"{id}\"%");
        for row in sqlx::query(
            "SELECT c.name AS name FROM pipelines p JOIN collections c ON c.id = p.collection_id \
             WHERE p.team_id = $1 AND p.steps LIKE $2 ORDER BY c.name",
        )
        .bind(team_id)
        .bind(&pattern)
        .fetch_all(&mut *tx)
        .await?
        {
            users.push(format!(
                "the pipeline of collection {}",
                row.try_get::<String, _>("name")?
            ));
        }
        if !users.is_empty() {
            return Ok(Err(users));
        }
        let done = sqlx::query("DELETE FROM plugins WHERE team_id = $1 AND id = $2")
            .bind(team_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Ok(done.rows_affected() == 1))
    }

    async fn get_pipeline(
        &self,
        team_id: &str,
        collection_id: &str,
    ) -> Result<Option<String>, MetaError> {
        let row =
            sqlx::query("SELECT steps FROM pipelines WHERE team_id = $1 AND collection_id = $2")
                .bind(team_id)
                .bind(collection_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| r.try_get("steps")).transpose()?)
    }

    async fn set_pipeline(
        &self,
        team_id: &str,
        collection_id: &str,
        steps: Option<&str>,
    ) -> Result<(), MetaError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM pipelines WHERE team_id = $1 AND collection_id = $2")
            .bind(team_id)
            .bind(collection_id)
            .execute(&mut *tx)
            .await?;
        if let Some(steps) = steps {
            sqlx::query(
                "INSERT INTO pipelines (collection_id, team_id, steps, updated_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(collection_id)
            .bind(team_id)
            .bind(steps)
            .bind(crate::ids::now_micros())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn create_hook(&self, h: &HookRecord) -> Result<(), MetaError> {
        sqlx::query(
            "INSERT INTO hooks (id, team_id, name, plugin_id, collection_id, config, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&h.id)
        .bind(&h.team_id)
        .bind(&h.name)
        .bind(&h.plugin_id)
        .bind(&h.collection_id)
        .bind(&h.config)
        .bind(h.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| map_insert_error(e, "hook", &h.name))?;
        Ok(())
    }

    async fn hook_by_id(&self, id: &str) -> Result<Option<HookRecord>, MetaError> {
        let row = sqlx::query(&format!("SELECT {HOOK_COLUMNS} FROM hooks WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(hook_from_row).transpose()?)
    }

    async fn list_hooks(&self, team_id: &str) -> Result<Vec<HookRecord>, MetaError> {
        let rows = sqlx::query(&format!(
            "SELECT {HOOK_COLUMNS} FROM hooks WHERE team_id = $1 ORDER BY name"
        ))
        .bind(team_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(hook_from_row).collect::<Result<_, _>>()?)
    }

    async fn create_source(&self, s: &SourceRecord) -> Result<(), MetaError> {
        sqlx::query(
            "INSERT INTO sources (id, team_id, name, plugin_id, collection_id, config, url, subject, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&s.id)
        .bind(&s.team_id)
        .bind(&s.name)
        .bind(&s.plugin_id)
        .bind(&s.collection_id)
        .bind(&s.config)
        .bind(&s.url)
        .bind(&s.subject)
        .bind(s.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| map_insert_error(e, "source", &s.name))?;
        Ok(())
    }

    async fn list_sources(&self, team_id: &str) -> Result<Vec<SourceRecord>, MetaError> {
        let rows = sqlx::query(&format!(
            "SELECT {SOURCE_COLUMNS} FROM sources WHERE team_id = $1 ORDER BY name"
        ))
        .bind(team_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(source_from_row).collect::<Result<_, _>>()?)
    }

    async fn all_sources(&self) -> Result<Vec<SourceRecord>, MetaError> {
        let rows = sqlx::query(&format!(
            "SELECT {SOURCE_COLUMNS} FROM sources ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(source_from_row).collect::<Result<_, _>>()?)
    }

    async fn delete_source(&self, team_id: &str, id_or_name: &str) -> Result<bool, MetaError> {
        let done = sqlx::query("DELETE FROM sources WHERE team_id = $1 AND (id = $2 OR name = $2)")
            .bind(team_id)
            .bind(id_or_name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn delete_hook(&self, team_id: &str, id_or_name: &str) -> Result<bool, MetaError> {
        let done = sqlx::query("DELETE FROM hooks WHERE team_id = $1 AND (id = $2 OR name = $2)")
            .bind(team_id)
            .bind(id_or_name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn create_destination(&self, d: &DestinationRecord) -> Result<(), MetaError> {
        sqlx::query(
            "INSERT INTO destinations (id, team_id, name, plugin_id, config, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&d.id)
        .bind(&d.team_id)
        .bind(&d.name)
        .bind(&d.plugin_id)
        .bind(&d.config)
        .bind(d.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| map_insert_error(e, "destination", &d.name))?;
        Ok(())
    }

    async fn get_destination(
        &self,
        team_id: &str,
        id_or_name: &str,
    ) -> Result<Option<DestinationRecord>, MetaError> {
        let row = sqlx::query(&format!(
            "SELECT {DESTINATION_COLUMNS} FROM destinations WHERE team_id = $1 AND (id = $2 OR name = $2) \
             ORDER BY (id = $2) DESC LIMIT 1"
        ))
        .bind(team_id)
        .bind(id_or_name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(destination_from_row).transpose()?)
    }

    async fn list_destinations(&self, team_id: &str) -> Result<Vec<DestinationRecord>, MetaError> {
        let rows = sqlx::query(&format!(
            "SELECT {DESTINATION_COLUMNS} FROM destinations WHERE team_id = $1 ORDER BY name"
        ))
        .bind(team_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(destination_from_row)
            .collect::<Result<_, _>>()?)
    }

    async fn delete_destination(&self, team_id: &str, id: &str) -> Result<bool, MetaError> {
        let done = sqlx::query("DELETE FROM destinations WHERE team_id = $1 AND id = $2")
            .bind(team_id)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn create_collection(&self, c: &Collection) -> Result<(), MetaError> {
        sqlx::query(
            "INSERT INTO collections (id, team_id, name, created_at, search_window_secs) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&c.id)
        .bind(&c.team_id)
        .bind(&c.name)
        .bind(c.created_at)
        .bind(c.search_window_secs)
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
            "SELECT id, team_id, name, created_at, search_window_secs FROM collections \
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
            "SELECT id, team_id, name, created_at, search_window_secs FROM collections WHERE team_id = $1 ORDER BY name",
        )
        .bind(team_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(collection_from_row)
            .collect::<Result<_, _>>()?)
    }

    async fn set_search_window(
        &self,
        team_id: &str,
        collection_id: &str,
        secs: Option<i64>,
    ) -> Result<bool, MetaError> {
        let done = sqlx::query(
            "UPDATE collections SET search_window_secs = $1 WHERE team_id = $2 AND id = $3",
        )
        .bind(secs)
        .bind(team_id)
        .bind(collection_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn all_collections(&self) -> Result<Vec<Collection>, MetaError> {
        let rows = sqlx::query(
            "SELECT id, team_id, name, created_at, search_window_secs FROM collections ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(collection_from_row)
            .collect::<Result<_, _>>()?)
    }

    async fn register_archive_files(
        &self,
        files: &[ArchiveFile],
        collection_id: &str,
        position: i64,
        columns: &[StoredColumn],
    ) -> Result<(), MetaError> {
        let mut tx = self.pool.begin().await?;
        for f in files {
            insert_archive_file(&mut tx, f).await?;
            delete_pending(&mut tx, &f.path).await?;
        }
        sqlx::query(
            "INSERT INTO archive_checkpoints (collection_id, position) VALUES ($1, $2) \
             ON CONFLICT (collection_id) DO UPDATE SET position = excluded.position",
        )
        .bind(collection_id)
        .bind(position)
        .execute(&mut *tx)
        .await?;
        for c in columns {
            sqlx::query(
                "INSERT INTO collection_columns (collection_id, name, type, first_seen, widened_at, widened_from) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (collection_id, name) DO UPDATE SET \
                 type = excluded.type, widened_at = excluded.widened_at, widened_from = excluded.widened_from",
            )
            .bind(&c.collection_id)
            .bind(&c.name)
            .bind(&c.type_name)
            .bind(c.first_seen)
            .bind(c.widened_at)
            .bind(&c.widened_from)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn archive_checkpoints(&self) -> Result<Vec<(String, i64)>, MetaError> {
        let rows = sqlx::query("SELECT collection_id, position FROM archive_checkpoints")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| Ok((r.try_get("collection_id")?, r.try_get("position")?)))
            .collect::<Result<_, sqlx::Error>>()?)
    }

    async fn list_archive_files(
        &self,
        team_id: &str,
        collection_id: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<ArchiveFile>, MetaError> {
        let rows = sqlx::query(&format!(
            "SELECT {ARCHIVE_FILE_COLUMNS} FROM archive_files WHERE team_id = $1 AND collection_id = $2 \
             AND max_received_at >= $3 AND min_received_at < $4 ORDER BY min_received_at, min_position"
        ))
        .bind(team_id)
        .bind(collection_id)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(archive_file_from_row)
            .collect::<Result<_, _>>()?)
    }

    async fn compaction_candidates(
        &self,
        max_bytes: i64,
        created_before: i64,
    ) -> Result<Vec<ArchiveFile>, MetaError> {
        let rows = sqlx::query(&format!(
            "SELECT {ARCHIVE_FILE_COLUMNS} FROM archive_files WHERE bytes < $1 AND created_at < $2 \
             ORDER BY collection_id, min_position"
        ))
        .bind(max_bytes)
        .bind(created_before)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(archive_file_from_row)
            .collect::<Result<_, _>>()?)
    }

    async fn replace_archive_files(
        &self,
        old: &[ArchiveFile],
        merged: &ArchiveFile,
        owner: &str,
    ) -> Result<bool, MetaError> {
        let mut tx = self.pool.begin().await?;
        for f in old {
            let done =
                sqlx::query("DELETE FROM archive_files WHERE id = $1 AND collection_id = $2")
                    .bind(&f.id)
                    .bind(&merged.collection_id)
                    .execute(&mut *tx)
                    .await?;
            if done.rows_affected() != 1 {
                tx.rollback().await?;
                return Ok(false);
            }
            insert_pending(&mut tx, &f.path, owner, merged.created_at).await?;
        }
        delete_pending(&mut tx, &merged.path).await?;
        insert_archive_file(&mut tx, merged).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn add_pending_objects(
        &self,
        paths: &[String],
        owner: &str,
        now: i64,
    ) -> Result<(), MetaError> {
        let mut tx = self.pool.begin().await?;
        for path in paths {
            insert_pending(&mut tx, path, owner, now).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn pending_objects(
        &self,
        owner: &str,
        stale_before: i64,
    ) -> Result<Vec<(String, bool)>, MetaError> {
        let rows = sqlx::query(
            "SELECT p.path AS path, COALESCE(f.rows, -1) AS registered_rows FROM archive_pending p \
             LEFT JOIN archive_files f ON f.path = p.path WHERE p.owner = $1 OR p.created_at < $2",
        )
        .bind(owner)
        .bind(stale_before)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                Ok((
                    r.try_get::<String, _>("path")?,
                    r.try_get::<i64, _>("registered_rows")? >= 0,
                ))
            })
            .collect::<Result<_, sqlx::Error>>()?)
    }

    async fn remove_pending_objects(&self, paths: &[String]) -> Result<(), MetaError> {
        let mut tx = self.pool.begin().await?;
        for path in paths {
            delete_pending(&mut tx, path).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn archive_paths(&self, collection_id: &str) -> Result<Vec<String>, MetaError> {
        let rows = sqlx::query("SELECT path FROM archive_files WHERE collection_id = $1")
            .bind(collection_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| r.try_get("path"))
            .collect::<Result<_, _>>()?)
    }

    async fn collection_columns(
        &self,
        collection_id: Option<&str>,
    ) -> Result<Vec<StoredColumn>, MetaError> {
        let base = "SELECT collection_id, name, type, first_seen, widened_at, widened_from FROM collection_columns";
        let rows = match collection_id {
            Some(id) => {
                sqlx::query(&format!(
                    "{base} WHERE collection_id = $1 ORDER BY first_seen, name"
                ))
                .bind(id)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!("{base} ORDER BY collection_id, first_seen, name"))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        Ok(rows.iter().map(column_from_row).collect::<Result<_, _>>()?)
    }

    async fn create_replay(&self, r: &ReplayRecord) -> Result<(), MetaError> {
        sqlx::query(
            "INSERT INTO replays (id, team_id, collection_id, spec, status, total, delivered, \
             failed, retried, checkpoint_at, checkpoint_id, rate_milli, error, owner, lease_until, \
             created_at, updated_at, started_at, finished_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)",
        )
        .bind(&r.id)
        .bind(&r.team_id)
        .bind(&r.collection_id)
        .bind(&r.spec)
        .bind(&r.status)
        .bind(r.total)
        .bind(r.delivered)
        .bind(r.failed)
        .bind(r.retried)
        .bind(r.checkpoint.as_ref().map(|c| c.0))
        .bind(r.checkpoint.as_ref().map(|c| c.1.clone()))
        .bind(r.rate_milli)
        .bind(r.error.clone())
        .bind(r.owner.clone())
        .bind(r.lease_until)
        .bind(r.created_at)
        .bind(r.updated_at)
        .bind(r.started_at)
        .bind(r.finished_at)
        .execute(&self.pool)
        .await
        .map_err(|e| map_insert_error(e, "replay", &r.id))?;
        Ok(())
    }

    async fn get_replay(&self, team_id: &str, id: &str) -> Result<Option<ReplayRecord>, MetaError> {
        let row = sqlx::query(&format!(
            "SELECT {REPLAY_COLUMNS} FROM replays WHERE team_id = $1 AND id = $2"
        ))
        .bind(team_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(replay_from_row).transpose()?)
    }

    async fn list_replays(
        &self,
        team_id: &str,
        limit: i64,
    ) -> Result<Vec<ReplayRecord>, MetaError> {
        let rows = sqlx::query(&format!(
            "SELECT {REPLAY_COLUMNS} FROM replays WHERE team_id = $1 \
             ORDER BY created_at DESC, id DESC LIMIT $2"
        ))
        .bind(team_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(replay_from_row).collect::<Result<_, _>>()?)
    }

    async fn set_replay_status(
        &self,
        team_id: &str,
        id: &str,
        from: &[&str],
        to: &str,
        error: Option<&str>,
    ) -> Result<bool, MetaError> {
        if from.is_empty() {
            return Ok(false);
        }
        let now = crate::ids::now_micros();
        let terminal = matches!(to, "completed" | "failed" | "cancelled");
        let placeholders: Vec<String> = (0..from.len()).map(|i| format!("${}", i + 7)).collect();
        let sql = format!(
            "UPDATE replays SET status = $1, error = COALESCE($2, error), updated_at = $3, \
             started_at = CASE WHEN $1 = 'running' AND started_at IS NULL THEN $3 ELSE started_at END, \
             finished_at = CASE WHEN $4 = 1 THEN $3 ELSE finished_at END \
             WHERE team_id = $5 AND id = $6 AND status IN ({})",
            placeholders.join(", ")
        );
        let mut q = sqlx::query(&sql)
            .bind(to)
            .bind(error)
            .bind(now)
            .bind(i64::from(terminal))
            .bind(team_id)
            .bind(id);
        for f in from {
            q = q.bind(*f);
        }
        Ok(q.execute(&self.pool).await?.rows_affected() == 1)
    }

    async fn save_replay_progress(
        &self,
        id: &str,
        owner: &str,
        p: &ReplayProgress,
        lease_until: i64,
    ) -> Result<bool, MetaError> {
        let done = sqlx::query(
            "UPDATE replays SET total = COALESCE($1, total), delivered = $2, failed = $3, \
             retried = $4, checkpoint_at = COALESCE($5, checkpoint_at), \
             checkpoint_id = COALESCE($6, checkpoint_id), rate_milli = $7, lease_until = $8, \
             updated_at = $9 WHERE id = $10 AND owner = $11",
        )
        .bind(p.total)
        .bind(p.delivered)
        .bind(p.failed)
        .bind(p.retried)
        .bind(p.checkpoint.as_ref().map(|c| c.0))
        .bind(p.checkpoint.as_ref().map(|c| c.1.clone()))
        .bind(p.rate_milli)
        .bind(lease_until)
        .bind(crate::ids::now_micros())
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn claim_replays(
        &self,
        owner: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Vec<ReplayRecord>, MetaError> {
        // One conditional update per candidate, so two gateways never both win one.
        let candidates = sqlx::query(
            "SELECT id FROM replays WHERE status IN ('pending', 'running', 'paused') \
             AND (owner IS NULL OR owner = $1 OR lease_until < $2) ORDER BY created_at",
        )
        .bind(owner)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        let mut claimed = Vec::new();
        for row in candidates {
            let id: String = row.try_get("id")?;
            let won = sqlx::query(
                "UPDATE replays SET owner = $1, lease_until = $2 WHERE id = $3 \
                 AND status IN ('pending', 'running', 'paused') \
                 AND (owner IS NULL OR owner = $1 OR lease_until < $4)",
            )
            .bind(owner)
            .bind(lease_until)
            .bind(&id)
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected()
                == 1;
            if won
                && let Some(row) = sqlx::query(&format!(
                    "SELECT {REPLAY_COLUMNS} FROM replays WHERE id = $1"
                ))
                .bind(&id)
                .fetch_optional(&self.pool)
                .await?
            {
                claimed.push(replay_from_row(&row)?);
            }
        }
        Ok(claimed)
    }

    async fn release_replay(&self, id: &str, owner: &str) -> Result<(), MetaError> {
        sqlx::query(
            "UPDATE replays SET owner = NULL, lease_until = 0 WHERE id = $1 AND owner = $2",
        )
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn running_replays(&self, team_id: &str) -> Result<i64, MetaError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM replays WHERE team_id = $1 AND status = 'running'",
        )
        .bind(team_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("n")?)
    }

    async fn start_replay(
        &self,
        team_id: &str,
        id: &str,
        max_running: i64,
    ) -> Result<bool, MetaError> {
        let mut tx = self.pool.begin().await?;
        // Writing the team's row first serializes concurrent starts of one team: a row lock
        // on PostgreSQL, the database's write lock on SQLite.
        sqlx::query("UPDATE teams SET name = name WHERE id = $1")
            .bind(team_id)
            .execute(&mut *tx)
            .await?;
        let started = sqlx::query(
            "UPDATE replays SET status = 'running', updated_at = $1, \
             started_at = COALESCE(started_at, $1) \
             WHERE team_id = $2 AND id = $3 AND status = 'pending' \
             AND (SELECT COUNT(*) FROM replays r WHERE r.team_id = $2 AND r.status = 'running') < $4 \
             AND NOT EXISTS (SELECT 1 FROM replays o WHERE o.team_id = $2 AND o.status = 'pending' \
                 AND (o.created_at < replays.created_at \
                      OR (o.created_at = replays.created_at AND o.id < replays.id)))",
        )
        .bind(crate::ids::now_micros())
        .bind(team_id)
        .bind(id)
        .bind(max_running)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        tx.commit().await?;
        Ok(started)
    }
}

const REPLAY_COLUMNS: &str = "id, team_id, collection_id, spec, status, total, delivered, failed, \
     retried, checkpoint_at, checkpoint_id, rate_milli, error, owner, lease_until, created_at, \
     updated_at, started_at, finished_at";

fn replay_from_row(row: &AnyRow) -> Result<ReplayRecord, sqlx::Error> {
    let at: Option<i64> = row.try_get("checkpoint_at")?;
    let cid: Option<String> = row.try_get("checkpoint_id")?;
    Ok(ReplayRecord {
        id: row.try_get("id")?,
        team_id: row.try_get("team_id")?,
        collection_id: row.try_get("collection_id")?,
        spec: row.try_get("spec")?,
        status: row.try_get("status")?,
        total: row.try_get("total")?,
        delivered: row.try_get("delivered")?,
        failed: row.try_get("failed")?,
        retried: row.try_get("retried")?,
        checkpoint: at.zip(cid),
        rate_milli: row.try_get("rate_milli")?,
        error: row.try_get("error")?,
        owner: row.try_get("owner")?,
        lease_until: row.try_get("lease_until")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}
