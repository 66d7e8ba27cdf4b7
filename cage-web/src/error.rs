//! The one error type of the web page: a status and a message that says what was wrong,
//! as an HTML page for the browser or as `{"error": "…"}` for the JSON API.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::backend::BackendError;
use crate::html;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebError {
    pub status: StatusCode,
    pub message: String,
    /// Answer in JSON (the API) rather than HTML (a page).
    pub api: bool,
    /// Seconds to wait, for 429.
    pub retry_after: Option<u64>,
}

impl WebError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> WebError {
        WebError {
            status,
            message: message.into(),
            api: false,
            retry_after: None,
        }
    }
    pub fn bad(message: impl Into<String>) -> WebError {
        WebError::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn forbidden(message: impl Into<String>) -> WebError {
        WebError::new(StatusCode::FORBIDDEN, message)
    }
    /// The same error, answered as JSON when `api`.
    pub fn api(mut self, api: bool) -> WebError {
        self.api = api;
        self
    }
    /// An error of an API handler (its own or the backend's): answered as JSON.
    pub fn for_api(e: impl Into<WebError>) -> WebError {
        e.into().api(true)
    }
}

impl From<BackendError> for WebError {
    fn from(e: BackendError) -> WebError {
        match e {
            BackendError::Refused(m) => WebError::new(StatusCode::UNPROCESSABLE_ENTITY, m),
            BackendError::Failed(m) => WebError::new(StatusCode::SERVICE_UNAVAILABLE, m),
        }
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let mut response = if self.api {
            (
                self.status,
                axum::Json(serde_json::json!({ "error": self.message })),
            )
                .into_response()
        } else {
            let title = self.status.canonical_reason().unwrap_or("Error");
            let body = format!(
                "<h1>{}</h1><p class=error id=error>{}</p><p><a href=\"/\">Back to the dashboard</a></p>",
                html::esc(title),
                html::esc(&self.message)
            );
            (self.status, html::bare_page(title, &body)).into_response()
        };
        if let Some(secs) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}
