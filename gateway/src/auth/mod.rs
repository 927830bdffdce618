//! Who is calling: the root token (operator; manages teams only) or a team token with scopes.
//! [`Authenticator`] turns the bearer string from REST or gRPC into a [`Principal`]; the same
//! code serves both surfaces so they cannot disagree.

pub mod jwt;
pub mod tokens;

use std::sync::Arc;

use crate::meta::{MetaError, Metastore};

/// A token scope. Stored as a bit set in the metastore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Admin,
    Ingest,
    Read,
    Replay,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Admin, Scope::Ingest, Scope::Read, Scope::Replay];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Ingest => "ingest",
            Scope::Read => "read",
            Scope::Replay => "replay",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == s)
    }

    fn bit(self) -> i64 {
        match self {
            Scope::Admin => 1,
            Scope::Ingest => 2,
            Scope::Read => 4,
            Scope::Replay => 8,
        }
    }
}

/// A set of scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(i64);

impl Scopes {
    pub fn from_bits(bits: i64) -> Self {
        Scopes(bits & 0xf)
    }
    pub fn bits(self) -> i64 {
        self.0
    }
    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }
    pub fn list(self) -> Vec<Scope> {
        Scope::ALL
            .into_iter()
            .filter(|s| self.contains(*s))
            .collect()
    }
    pub fn names(self) -> Vec<&'static str> {
        self.list().into_iter().map(Scope::as_str).collect()
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        Scopes(iter.into_iter().fold(0, |acc, s| acc | s.bit()))
    }
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub enum Principal {
    /// The operator's root token: may create teams, nothing else.
    Root,
    Team(TeamCaller),
}

#[derive(Debug, Clone)]
pub struct TeamCaller {
    pub team_id: String,
    pub token_id: String,
    pub scopes: Scopes,
}

/// Why a request was not let in. Maps to 401/403 (REST) and UNAUTHENTICATED/PERMISSION_DENIED.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials: send `Authorization: Bearer <token>`")]
    Missing,
    #[error("the Authorization header must be `Bearer <token>`")]
    NotBearer,
    #[error("{0}")]
    BadFormat(#[from] tokens::TokenFormatError),
    #[error("unknown or revoked token: ask a team admin for a new one")]
    Unknown,
    #[error("the root token can only manage teams: create a team token for this")]
    RootNotAllowed,
    #[error("this call needs the root token (REWIND_ROOT_TOKEN)")]
    RootRequired,
    #[error("the token lacks the `{0}` scope this call needs")]
    MissingScope(&'static str),
    #[error("cannot check the token right now: {0}")]
    Backend(#[from] MetaError),
}

impl AuthError {
    /// True for errors that mean "you are not who you say" (401), false for "not allowed" (403).
    pub fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            AuthError::Missing
                | AuthError::NotBearer
                | AuthError::BadFormat(_)
                | AuthError::Unknown
        )
    }
}

/// Checks bearer tokens against the root token and the metastore.
pub struct Authenticator {
    root_token: String,
    meta: Arc<dyn Metastore>,
}

impl Authenticator {
    pub fn new(root_token: String, meta: Arc<dyn Metastore>) -> Self {
        Self { root_token, meta }
    }

    /// Parses an `Authorization` header value and authenticates it.
    pub async fn authenticate_header(&self, header: Option<&str>) -> Result<Principal, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(AuthError::NotBearer)?
            .trim();
        self.authenticate(token).await
    }

    pub async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        if tokens::secrets_equal(token, &self.root_token) {
            return Ok(Principal::Root);
        }
        tokens::check_format(token)?;
        let hash = tokens::hash(token);
        let record = self
            .meta
            .token_by_hash(&hash)
            .await?
            .ok_or(AuthError::Unknown)?;
        // The look-up was by hash; compare again in constant time so no code path depends on
        // a byte-by-byte comparison of secrets.
        if !tokens::secrets_equal(&record.hash, &hash) || record.revoked_at.is_some() {
            return Err(AuthError::Unknown);
        }
        Ok(Principal::Team(TeamCaller {
            team_id: record.team_id,
            token_id: record.id,
            scopes: record.scopes,
        }))
    }
}

impl Principal {
    /// The team caller, if it holds `scope`.
    pub fn require(&self, scope: Scope) -> Result<&TeamCaller, AuthError> {
        match self {
            Principal::Root => Err(AuthError::RootNotAllowed),
            Principal::Team(caller) if caller.scopes.contains(scope) => Ok(caller),
            Principal::Team(_) => Err(AuthError::MissingScope(scope.as_str())),
        }
    }

    /// Any team token, whatever its scopes (reading collection metadata).
    pub fn team(&self) -> Result<&TeamCaller, AuthError> {
        match self {
            Principal::Root => Err(AuthError::RootNotAllowed),
            Principal::Team(caller) => Ok(caller),
        }
    }

    pub fn require_root(&self) -> Result<(), AuthError> {
        match self {
            Principal::Root => Ok(()),
            Principal::Team(_) => Err(AuthError::RootRequired),
        }
    }
}

/// Loads the root token: `REWIND_ROOT_TOKEN` if set, else `<data-dir>/root-token`, created
/// (mode 0600) with a fresh token on first start. Returns the token and, when it was created,
/// the file's path, so the caller can print where it is.
pub fn load_or_create_root_token(
    configured: Option<&str>,
    data_dir: &std::path::Path,
) -> std::io::Result<(String, Option<std::path::PathBuf>)> {
    if let Some(token) = configured {
        return Ok((token.to_string(), None));
    }
    let path = data_dir.join("root-token");
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => return Ok((token.trim().to_string(), None)),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let token = format!("rwroot_{}", &tokens::generate()[3..]);
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    file.write_all(token.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    Ok((token, Some(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_round_trip_through_bits() {
        let s: Scopes = [Scope::Ingest, Scope::Read].into_iter().collect();
        assert!(s.contains(Scope::Ingest) && s.contains(Scope::Read));
        assert!(!s.contains(Scope::Admin));
        assert_eq!(Scopes::from_bits(s.bits()), s);
        assert_eq!(s.names(), vec!["ingest", "read"]);
        assert_eq!(Scope::parse("replay"), Some(Scope::Replay));
        assert_eq!(Scope::parse("root"), None);
    }

    #[test]
    fn root_token_file_is_created_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (a, created) = load_or_create_root_token(None, dir.path()).unwrap();
        assert!(created.is_some());
        let mode = std::fs::metadata(dir.path().join("root-token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (b, created) = load_or_create_root_token(None, dir.path()).unwrap();
        assert_eq!(a, b);
        assert!(created.is_none());
        let (c, _) = load_or_create_root_token(Some("given"), dir.path()).unwrap();
        assert_eq!(c, "given");
    }
}
