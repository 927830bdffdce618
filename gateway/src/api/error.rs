//! The one error type of the API: a stable `code`, a human `message` that says what to do,
//! and the HTTP status; rendered as `{"error":{"code","message"}}` on REST and as a
//! `tonic::Status` with the matching gRPC code. Handlers return `Result<_, ApiError>`.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::auth::AuthError;
use crate::bus::BusError;
use crate::ingest::IngestError;
use crate::ingest::parse::ParseError;
use crate::meta::MetaError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// For 429 and 503: when to retry, and (429) the limit's burst for the RateLimit headers.
    pub retry_after: Option<Duration>,
    pub rate_limit_burst: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            rate_limit_burst: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    pub fn collection_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("collection {id:?} not found in your team: list them with GET /v1/collections"),
        )
    }

    fn retry_secs(&self) -> Option<u64> {
        self.retry_after
            .map(|d| d.as_secs_f64().ceil().max(1.0) as u64)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(secs) = self.retry_secs() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            if let Some(burst) = self.rate_limit_burst {
                // IETF draft-ietf-httpapi-ratelimit-headers (structured fields) and the older
                // three-header form that many clients still read.
                let policy = format!("\"per-token\";q={burst};w=1");
                let state = format!("\"per-token\";r=0;t={secs}");
                headers.insert(
                    "ratelimit-policy",
                    HeaderValue::from_str(&policy).expect("ascii"),
                );
                headers.insert("ratelimit", HeaderValue::from_str(&state).expect("ascii"));
                headers.insert("ratelimit-limit", HeaderValue::from(burst));
                headers.insert("ratelimit-remaining", HeaderValue::from(0));
                headers.insert("ratelimit-reset", HeaderValue::from(secs));
            }
        }
        response
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let code = match e.status {
            StatusCode::BAD_REQUEST | StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                tonic::Code::InvalidArgument
            }
            StatusCode::UNAUTHORIZED => tonic::Code::Unauthenticated,
            StatusCode::FORBIDDEN => tonic::Code::PermissionDenied,
            StatusCode::NOT_FOUND => tonic::Code::NotFound,
            StatusCode::CONFLICT => tonic::Code::AlreadyExists,
            StatusCode::PAYLOAD_TOO_LARGE => tonic::Code::InvalidArgument,
            StatusCode::TOO_MANY_REQUESTS => tonic::Code::ResourceExhausted,
            StatusCode::SERVICE_UNAVAILABLE => tonic::Code::Unavailable,
            _ => tonic::Code::Internal,
        };
        let secs = e.retry_secs();
        let mut status = tonic::Status::new(code, format!("{}: {}", e.code, e.message));
        if let Some(secs) = secs
            && let Ok(v) = secs.to_string().parse()
        {
            status.metadata_mut().insert("retry-after", v);
        }
        status
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match &e {
            AuthError::Backend(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            ),
            _ if e.is_unauthenticated() => {
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", e.to_string())
            }
            _ => ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string()),
        }
    }
}

impl From<MetaError> for ApiError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::AlreadyExists { .. } => {
                ApiError::new(StatusCode::CONFLICT, "already_exists", e.to_string())
            }
            other => {
                tracing::error!(error = %other, "metastore error");
                let mut err = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    format!("{other}; retry shortly"),
                );
                err.retry_after = Some(Duration::from_secs(1));
                err
            }
        }
    }
}

impl From<ParseError> for ApiError {
    fn from(e: ParseError) -> Self {
        match e {
            ParseError::EventTooLarge { .. } | ParseError::BatchTooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.to_string())
            }
            ParseError::Empty => {
                ApiError::new(StatusCode::BAD_REQUEST, "empty_body", e.to_string())
            }
            _ => ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.to_string()),
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::RateLimited(wait) => {
                let mut err =
                    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", e.to_string());
                err.retry_after = Some(wait);
                err
            }
            IngestError::LargerThanBurst { .. } | IngestError::TooLarge(_) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.to_string())
            }
            IngestError::Invalid(m) => ApiError::bad_request(m),
            IngestError::Overloaded { .. } => {
                let mut err =
                    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", e.to_string());
                err.retry_after = Some(Duration::from_secs(1));
                err
            }
            IngestError::Pipeline(_) => {
                let mut err = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "pipeline_unavailable",
                    e.to_string(),
                );
                err.retry_after = Some(Duration::from_secs(1));
                err
            }
            IngestError::Bus(BusError::Rejected(m)) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "rejected", m)
            }
            IngestError::Bus(bus) => {
                tracing::warn!(error = %bus, "ingest not acknowledged: bus unavailable");
                let mut err = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "bus_unavailable",
                    format!(
                        "{bus}. Nothing from this request was acknowledged; retry it (with the same idempotency keys)"
                    ),
                );
                err.retry_after = Some(Duration::from_secs(1));
                err
            }
        }
    }
}
