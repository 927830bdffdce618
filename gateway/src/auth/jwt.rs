//! Dashboard session tokens (JWT). One pinned algorithm (HS256 with a server secret), and
//! `exp`, `iss`, `aud` and `sub` are required: a token missing any of them, signed with another
//! algorithm (including `none`), expired, or meant for another audience is refused.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, encode};
use serde::{Deserialize, Serialize};

pub const ISSUER: &str = "rewind";
pub const AUDIENCE: &str = "rewind-dashboard";

/// What a dashboard session token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DashboardClaims {
    /// The user or token the session was opened for.
    pub sub: String,
    /// The team the session may see.
    pub team: String,
    pub iss: String,
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("the session token is not valid ({0}): log in again")]
    Invalid(String),
    #[error("cannot sign a session token: {0}")]
    Sign(String),
}

/// Signs and verifies dashboard sessions with one secret.
pub struct DashboardJwt {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl DashboardJwt {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.leeway = 30;
        validation.validate_exp = true;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// A session for `sub` in `team`, valid for `ttl_secs`.
    pub fn issue(&self, sub: &str, team: &str, ttl_secs: i64) -> Result<String, JwtError> {
        let now = chrono::Utc::now().timestamp();
        let claims = DashboardClaims {
            sub: sub.into(),
            team: team.into(),
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            exp: now + ttl_secs,
            iat: now,
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| JwtError::Sign(e.to_string()))
    }

    pub fn verify(&self, token: &str) -> Result<DashboardClaims, JwtError> {
        decode::<DashboardClaims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| JwtError::Invalid(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &[u8] = b"test-secret-of-reasonable-length-0123456789";

    fn sign(header: Header, claims: serde_json::Value) -> String {
        encode(&header, &claims, &EncodingKey::from_secret(SECRET)).unwrap()
    }

    #[test]
    fn round_trip() {
        let jwt = DashboardJwt::new(SECRET);
        let token = jwt.issue("user-1", "tm_1", 60).unwrap();
        let claims = jwt.verify(&token).unwrap();
        assert_eq!(claims.sub, "user-1");
        assert_eq!(claims.team, "tm_1");
    }

    #[test]
    fn refuses_expired_wrong_audience_missing_claims_and_other_algorithms() {
        let jwt = DashboardJwt::new(SECRET);
        let now = chrono::Utc::now().timestamp();
        let good = json!({"sub":"u","team":"t","iss":ISSUER,"aud":AUDIENCE,"exp":now+60,"iat":now});

        let mut expired = good.clone();
        expired["exp"] = json!(now - 3600);
        assert!(
            jwt.verify(&sign(Header::new(Algorithm::HS256), expired))
                .is_err()
        );

        let mut other_aud = good.clone();
        other_aud["aud"] = json!("someone-else");
        assert!(
            jwt.verify(&sign(Header::new(Algorithm::HS256), other_aud))
                .is_err()
        );

        let mut other_iss = good.clone();
        other_iss["iss"] = json!("evil");
        assert!(
            jwt.verify(&sign(Header::new(Algorithm::HS256), other_iss))
                .is_err()
        );

        for claim in ["exp", "iss", "aud", "sub"] {
            let mut missing = good.clone();
            missing.as_object_mut().unwrap().remove(claim);
            // `team` and `iat` are ours; a token without a spec claim must fail either way.
            assert!(
                jwt.verify(&sign(Header::new(Algorithm::HS256), missing))
                    .is_err(),
                "{claim}"
            );
        }

        assert!(
            jwt.verify(&sign(Header::new(Algorithm::HS384), good.clone()))
                .is_err()
        );
        // alg=none: header {"alg":"none"} with an empty signature.
        let b64 = |v: &serde_json::Value| base64url(&serde_json::to_vec(v).unwrap());
        let none = format!(
            "{}.{}.",
            b64(&json!({"alg":"none","typ":"JWT"})),
            b64(&good)
        );
        assert!(jwt.verify(&none).is_err());
        assert!(
            jwt.verify(&sign(Header::new(Algorithm::HS256), good))
                .is_ok()
        );
    }

    fn base64url(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n =
                chunk.iter().fold(0u32, |acc, b| (acc << 8) | *b as u32) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}
