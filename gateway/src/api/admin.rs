//! Team, token and collection management, once for both surfaces: REST handlers and gRPC
//! services are thin adapters over these functions.

use crate::auth::{Principal, Scope, Scopes, tokens};
use crate::ids::{new_id, now_micros, validate_name};
use crate::meta::{Collection, Metastore, Team, TokenRecord};

use super::ApiError;

/// A token as created: the secret is only ever in this value.
pub struct CreatedToken {
    pub record: TokenRecord,
    pub secret: String,
}

fn new_token(team_id: &str, name: &str, scopes: Scopes) -> CreatedToken {
    let secret = tokens::generate();
    CreatedToken {
        record: TokenRecord {
            id: new_id("tok"),
            team_id: team_id.into(),
            name: name.into(),
            hash: tokens::hash(&secret),
            prefix: secret[..tokens::DISPLAY_PREFIX_LEN].into(),
            scopes,
            created_at: now_micros(),
            revoked_at: None,
        },
        secret,
    }
}

pub async fn create_team(
    meta: &dyn Metastore,
    who: &Principal,
    name: &str,
) -> Result<(Team, CreatedToken), ApiError> {
    who.require_root()?;
    validate_name("team", name).map_err(ApiError::bad_request)?;
    let team = Team {
        id: new_id("tm"),
        name: name.into(),
        created_at: now_micros(),
    };
    let token = new_token(&team.id, "admin", [Scope::Admin].into_iter().collect());
    meta.create_team(&team, &token.record).await?;
    tracing::info!(team = %team.id, name = %team.name, "team created");
    Ok((team, token))
}

pub fn parse_scopes<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Scopes, ApiError> {
    let mut scopes = Vec::new();
    for name in names {
        scopes.push(Scope::parse(name).ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown scope {name:?}: use admin, ingest, read or replay"
            ))
        })?);
    }
    if scopes.is_empty() {
        return Err(ApiError::bad_request(
            "a token needs at least one scope: admin, ingest, read or replay",
        ));
    }
    Ok(scopes.into_iter().collect())
}

pub async fn create_token(
    meta: &dyn Metastore,
    who: &Principal,
    name: &str,
    scopes: Scopes,
) -> Result<CreatedToken, ApiError> {
    let caller = who.require(Scope::Admin)?;
    if name.is_empty() || name.len() > 128 {
        return Err(ApiError::bad_request(
            "a token name must be 1 to 128 characters",
        ));
    }
    let token = new_token(&caller.team_id, name, scopes);
    meta.create_token(&token.record).await?;
    tracing::info!(team = %caller.team_id, token = %token.record.id, "token created");
    Ok(token)
}

pub async fn list_tokens(
    meta: &dyn Metastore,
    who: &Principal,
) -> Result<Vec<TokenRecord>, ApiError> {
    let caller = who.require(Scope::Admin)?;
    Ok(meta.list_tokens(&caller.team_id).await?)
}

pub async fn revoke_token(meta: &dyn Metastore, who: &Principal, id: &str) -> Result<(), ApiError> {
    let caller = who.require(Scope::Admin)?;
    if meta.revoke_token(&caller.team_id, id, now_micros()).await? {
        tracing::info!(team = %caller.team_id, token = %id, "token revoked");
        Ok(())
    } else {
        Err(ApiError::not_found(&format!(
            "token {id:?} (or it is already revoked)"
        )))
    }
}

pub async fn create_collection(
    meta: &dyn Metastore,
    who: &Principal,
    name: &str,
    search_window_secs: Option<i64>,
) -> Result<Collection, ApiError> {
    let caller = who.require(Scope::Admin)?;
    validate_name("collection", name).map_err(ApiError::bad_request)?;
    validate_search_window(search_window_secs)?;
    let collection = Collection {
        id: new_id("col"),
        team_id: caller.team_id.clone(),
        name: name.into(),
        created_at: now_micros(),
        search_window_secs,
    };
    meta.create_collection(&collection).await?;
    Ok(collection)
}

/// Longest search window a collection may ask for: ten years.
pub const MAX_SEARCH_WINDOW_SECS: i64 = 10 * 366 * 86_400;

fn validate_search_window(secs: Option<i64>) -> Result<(), ApiError> {
    match secs {
        Some(s) if !(0..=MAX_SEARCH_WINDOW_SECS).contains(&s) => {
            Err(ApiError::bad_request(format!(
                "`search_window_secs` must be between 0 (index nothing) and {MAX_SEARCH_WINDOW_SECS} (ten years), or null for the gateway's default"
            )))
        }
        _ => Ok(()),
    }
}

/// Changes how long a collection's events stay in the search index (`None`: the default).
pub async fn set_search_window(
    meta: &dyn Metastore,
    who: &Principal,
    id_or_name: &str,
    secs: Option<i64>,
) -> Result<Collection, ApiError> {
    let caller = who.require(Scope::Admin)?;
    validate_search_window(secs)?;
    let mut c = get_collection(meta, &caller.team_id, id_or_name).await?;
    if !meta.set_search_window(&caller.team_id, &c.id, secs).await? {
        return Err(ApiError::collection_not_found(id_or_name));
    }
    c.search_window_secs = secs;
    Ok(c)
}

/// A collection of the caller's team, or 404 (also for another team's collection).
pub async fn get_collection(
    meta: &dyn Metastore,
    team_id: &str,
    id_or_name: &str,
) -> Result<Collection, ApiError> {
    meta.get_collection(team_id, id_or_name)
        .await?
        .ok_or_else(|| ApiError::collection_not_found(id_or_name))
}

pub async fn list_collections(
    meta: &dyn Metastore,
    who: &Principal,
) -> Result<Vec<Collection>, ApiError> {
    let caller = who.team()?;
    Ok(meta.list_collections(&caller.team_id).await?)
}
